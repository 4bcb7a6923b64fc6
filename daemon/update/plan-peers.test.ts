import { describe, expect, it } from "vitest";
import { thrown } from "../../test/helpers.ts";
import { geometry } from "./geometry.ts";
import type { PeerInfo } from "./peers.ts";
import { type PeersInput, planWithPeers } from "./plan-peers.ts";

const MiB = 1 << 20;
const peer = (url: string, info: Partial<PeerInfo> = {}) => ({
  url,
  info: { nodeId: url, gpus: 1, slots: 4, slotBytes: MiB, ...info },
});
const input = (o: Partial<PeersInput> = {}): PeersInput => ({ gpus: 2, slots: 4, slotBytes: MiB, peers: [], ...o });
/** The key planWithPeers gives these members, to build a kept communicator from. */
const keyOf = (o: PeersInput) => planWithPeers(o).comm?.key as string;

describe("planWithPeers", () => {
  it.each([
    {
      name: "no peers: the local GPUs only, no shared communicator",
      input: input(),
      want: { ranks: [], nranks: 2, owners: [0, 1], fresh: undefined },
    },
    {
      name: "ranks follow the peers in order; only peers that hold the checkpoint copy it",
      input: input({
        slots: 8,
        peers: [peer("a", { gpus: 2, slots: 8, holds: "m@3" }), peer("b", { gpus: 3, slots: 8 })],
      }),
      want: { ranks: [2, 4], nranks: 7, owners: [0, 1, 2, 3], fresh: true },
    },
    {
      name: "a peer that holds nothing adds ranks, not owners",
      input: input({ peers: [peer("a", { gpus: 4 })] }),
      want: { ranks: [2], nranks: 6, owners: [0, 1], fresh: true },
    },
  ])("$name", ({ input, want }) => {
    const plan = planWithPeers(input);
    expect(plan.participants.map((p) => p.firstRank)).toEqual(want.ranks);
    expect(plan.nranks).toBe(want.nranks);
    expect(plan.owners).toEqual(want.owners);
    expect(plan.comm?.fresh).toBe(want.fresh);
  });

  it.each([
    {
      name: "a peer busy with an update",
      input: input({ peers: [peer("a"), peer("b", { running: "u-7" })] }),
      error: "peer b is busy with update u-7",
    },
    {
      name: "a peer with other slots",
      input: input({ peers: [peer("a", { slots: 3 })] }),
      error:
        "peer a has 3 slots of 1048576 bytes, this daemon 4 of 1048576: set bucketSlots to 4 and bucketBytes to 1048576 on every daemon (bucketSlots is raised to 2 per GPU; buckets shrink to fit bucketMemoryBytes and free GPU memory)",
    },
    {
      name: "a peer with other bucket bytes",
      input: input({ peers: [peer("a", { slotBytes: 2 * MiB })] }),
      error:
        /^peer a has 4 slots of 2097152 bytes, this daemon 4 of 1048576: set bucketSlots to 4 and bucketBytes to 1048576/,
    },
    {
      name: "more copying GPUs than slots",
      input: input({ peers: [peer("a", { gpus: 3, holds: "m@1" })] }),
      error: "5 GPUs copy this checkpoint but there are 4 slots; raise bucketSlots",
    },
  ])("refuses $name before anyone joins", ({ input, error }) => {
    expect(() => planWithPeers(input)).toThrow(error);
    expect(thrown(() => planWithPeers(input)).code).toBe("update_failed");
  });

  it("takes as many copying GPUs as there are slots", () => {
    const plan = planWithPeers(input({ peers: [peer("a", { gpus: 2, holds: "m@1" })] }));
    expect(plan.owners).toEqual([0, 1, 2, 3]);
  });

  describe("the shared communicator", () => {
    const members = input({ peers: [peer("a"), peer("b")] });
    const key = keyOf(members);
    const withComm = (a?: string, b?: string): PeersInput => ({
      ...members,
      shared: { key, id: "abcd" },
      peers: [peer("a", { comm: a }), peer("b", { comm: b })],
    });
    it.each([
      { name: "is made when this daemon keeps none", input: members, fresh: true },
      { name: "is reused when every peer keeps the same", input: withComm(`${key} abcd`, `${key} abcd`), fresh: false },
      { name: "is made anew when one peer lost it", input: withComm(`${key} abcd`, undefined), fresh: true },
      { name: "is made anew when a peer keeps another id", input: withComm(`${key} abcd`, `${key} ef01`), fresh: true },
      {
        name: "is made anew when the members changed",
        input: { ...withComm(`${key} abcd`, `${key} abcd`), gpus: 1 },
        fresh: true,
      },
    ])("$name", ({ input, fresh }) => {
      expect(planWithPeers(input).comm?.fresh).toBe(fresh);
    });
  });
});

describe("geometry", () => {
  const base = { gpus: 2, bucketSlots: 3, bucketBytes: 256 * MiB, bucketMemoryBytes: 1 << 30, freeBytes: [80e9, 80e9] };
  it.each([
    { name: "raises slots to two per GPU", o: { gpus: 8 }, want: { slots: 16, slotBytes: 64 * MiB } },
    { name: "keeps more slots when configured", o: { bucketSlots: 6 }, want: { slots: 6, slotBytes: 170 * MiB } },
    { name: "keeps the cap when everything fits", o: { bucketBytes: 8 * MiB }, want: { slots: 4, slotBytes: 8 * MiB } },
    {
      name: "fits a tenth of the freest GPU",
      o: { freeBytes: [80e9, 400 * MiB] },
      want: { slots: 4, slotBytes: 10 * MiB },
    },
    { name: "never below 1 MiB", o: { bucketMemoryBytes: MiB }, want: { slots: 4, slotBytes: MiB } },
  ])("$name", ({ o, want }) => {
    expect(geometry({ ...base, ...o })).toEqual(want);
  });
});
