import { describe, expect, it } from "vitest";
import type { CheckpointVersion } from "../checkpoints/registry.ts";
import type { Buffers } from "./buffers.ts";
import type { DataPath } from "./data-path.ts";
import { Participation } from "./participate.ts";
import type { PeerPlan } from "./peers.ts";

const assigned: PeerPlan = {
  update: "u-4",
  coordinator: "a",
  checkpoint: { name: "m", fingerprint: "ff" },
  comm: { key: "k", id: "0a0b", fresh: true, nranks: 3 },
  firstRank: 2,
  slots: 4,
  slotBytes: 1 << 20,
  buckets: [{ index: 0, owner: 0, slot: 0, bytes: 8, pieces: [] }],
};

/** A data path that records how its shared communicator is joined and dropped. */
function fakePath() {
  const calls: unknown[][] = [];
  const path = {
    joinShared: async (...args: unknown[]) => {
      calls.push(["join", ...args]);
      return "comm-handle";
    },
    dropShared: async (abort: boolean) => {
      calls.push(["drop", abort]);
    },
  } as unknown as DataPath;
  return { path, calls };
}

const buffers = (slots: number, slotBytes: number) => ({ slots, slotBytes }) as Buffers;
const version = { id: "m@2" } as CheckpointVersion;

describe("a participant's part of a coordinator's update", () => {
  it("moves the coordinator's buckets, with its own version of the checkpoint", async () => {
    const p = new Participation(fakePath().path, assigned, version, 500);
    expect(await p.plan(buffers(4, 1 << 20))).toEqual({ version, buckets: assigned.buckets });
    const none = new Participation(fakePath().path, assigned, undefined, 500);
    expect(await none.plan(buffers(4, 1 << 20))).toEqual({ version: undefined, buckets: assigned.buckets });
  });

  it.each([
    { name: "other slots", slots: 6, slotBytes: 1 << 20 },
    { name: "other bucket bytes", slots: 4, slotBytes: 1 << 19 },
  ])("refuses a plan made for $name, saying what to configure", async ({ slots, slotBytes }) => {
    const p = new Participation(fakePath().path, assigned, version, 500);
    await expect(p.plan(buffers(slots, slotBytes))).rejects.toThrow(
      `this daemon has ${slots} slots of ${slotBytes} bytes, the coordinator 4 of 1048576: configure bucketSlots and bucketBytes alike`,
    );
  });

  it("joins the coordinator's communicator at its ranks, within the time limit, in the plan's order", async () => {
    const { path, calls } = fakePath();
    const group = await new Participation(path, assigned, version, 500).join();
    expect(group).toEqual({ comm: "comm-handle", firstRank: 2, ordered: true });
    expect(calls).toEqual([["join", assigned.comm, 2, 500]]);
  });

  it("aborts the communicator after a failure (a broadcast may wait for the failed rank), and has nothing to wait for", async () => {
    const { path, calls } = fakePath();
    const p = new Participation(path, assigned, version, 500);
    await p.others();
    expect(await p.cause(new Error("a rank failed"))).toBeUndefined();
    await expect(p.stagedHere).rejects.toThrow("a rank failed"); // what a coordinator on /staged hears
    await p.release();
    expect(calls).toEqual([["drop", true]]);
  });
});
