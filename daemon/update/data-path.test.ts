/** The data path kept between updates: greeting receivers, re-making broken buffers, shared communicators. */
import { truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import pino from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { type Context, type HostMemory, openBackend } from "../../ffi/index.ts";
import { tempDir } from "../../test/helpers.ts";
import { LIB_DIR } from "../../test/in-process.ts";
import { at, Buffers } from "./buffers.ts";
import { DataPath } from "./data-path.ts";
import type { Message, Receiver } from "./receivers.ts";

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

/** A receiver stand-in on `gpu` that records what it was sent. */
function fakeReceiver(gpu: number) {
  const sent: Message[] = [];
  return { r: { gpu, send: (m: Message) => sent.push(m) } as unknown as Receiver, sent };
}

async function open(gpus: number, receivers: Receiver[] = []) {
  const ctx = (await openBackend("host", LIB_DIR, { hostDevices: gpus })).context;
  const path = await DataPath.open({
    ctx,
    log: pino({ level: "silent" }),
    receivers: () => receivers,
    bucketSlots: 2,
    bucketBytes: 1 << 20,
    bucketMemoryBytes: 64 << 20,
  });
  cleanups.push(async () => {
    await path.close();
    await ctx.destroy();
  });
  return { ctx, path };
}

/** Makes the buffers' copy stream fail (a copy from a file truncated under it), so they never drain. */
async function breakBuffers(ctx: Context, b: Buffers): Promise<void> {
  const file = join(tempDir(), "weights");
  writeFileSync(file, Buffer.alloc(8192, 1));
  const mem: HostMemory = await ctx.fileMap(file);
  await ctx.hostRegister(mem.address, mem.len, true);
  cleanups.push(async () => {
    await ctx.hostUnregister(mem);
    await ctx.fileUnmap(mem);
  });
  truncateSync(file, 0);
  const g = at(b.gpus, 0);
  ctx.h2dAsync(g.copy, at(g.slots, 0), new BigUint64Array([mem.address, 0n, 4096n]));
  ctx.eventRecord(at(g.copied, 0), g.copy);
}

describe("DataPath", () => {
  it("greets a receiver with its GPU and the buffers of that GPU", async () => {
    const { ctx, path } = await open(2);
    const b = await path.buffers();
    const { r, sent } = fakeReceiver(1);
    path.greet(r);
    expect(sent).toEqual([
      { op: "welcome", protocol: 1, gpu: 1, uuid: ctx.deviceInfo(1).uuid, backend: "host" },
      { op: "buffers", generation: b.generation, slots: b.handles(1) },
    ]);
    expect(b.handles(1)).toHaveLength(path.geometry.slots);
  });

  it("keeps buffers that settle, and discards and re-makes broken ones, announcing them", async () => {
    const a = fakeReceiver(0);
    const { ctx, path } = await open(1, [a.r]);
    const first = await path.buffers();
    await path.settle(first, 1000);
    expect(await path.buffers()).toBe(first);

    await breakBuffers(ctx, first);
    await path.settle(first, 1000);
    expect(first.gpus).toEqual([]); // closed

    // Discarded: a receiver greeted now gets no buffers until they are made anew.
    const late = fakeReceiver(0);
    path.greet(late.r);
    expect(late.sent.map((m) => m.op)).toEqual(["welcome"]);

    const [second, again] = await Promise.all([path.buffers(), path.buffers()]);
    expect(again).toBe(second);
    expect(second.generation).toBeGreaterThan(first.generation);
    expect(a.sent).toEqual([{ op: "buffers", generation: second.generation, slots: second.handles(0) }]);

    // Broken again: made anew again, not the set of the last opening.
    await breakBuffers(ctx, second);
    await path.settle(second, 1000);
    const third = await path.buffers();
    expect(third.generation).toBeGreaterThan(second.generation);
    expect(third.gpus).toHaveLength(1);
  });

  it("settling buffers that are not the current ones leaves the current ones", async () => {
    const { ctx, path } = await open(1);
    const current = await path.buffers();
    // A set an earlier update held, made before the current one.
    const earlier = await Buffers.open(ctx, 1, 2, 1 << 20);
    await breakBuffers(ctx, earlier);
    await path.settle(earlier, 1000);
    expect(earlier.gpus).toEqual([]);
    expect(await path.buffers()).toBe(current);
  });

  it("closes after its buffers were discarded, and twice", async () => {
    const { ctx, path } = await open(1);
    const b = await path.buffers();
    await breakBuffers(ctx, b);
    await path.settle(b, 1000);
    await path.close();
    await path.close();
  });

  it("joins a fresh shared communicator, reuses it by key and id, refuses an unknown one", async () => {
    const { ctx, path } = await open(2);
    expect(path.sharedComm()).toBeUndefined();
    const id = Buffer.from(ctx.commIdNew()).toString("hex");
    const unknown = { key: "k1", id, fresh: false, nranks: 2 };
    await expect(path.joinShared(unknown, 0, 5000)).rejects.toMatchObject({
      name: "DaemonError",
      code: "comm_lost",
      message: "communicator k1 is not known here",
    });
    const comm = await path.joinShared({ ...unknown, fresh: true }, 0, 5000);
    expect(path.sharedComm()).toEqual({ key: "k1", id });
    expect(await path.joinShared(unknown, 0, 5000)).toBe(comm);

    const otherId = Buffer.from(ctx.commIdNew()).toString("hex");
    await expect(path.joinShared({ ...unknown, id: otherId }, 0, 5000)).rejects.toMatchObject({ code: "comm_lost" });
    await expect(path.joinShared({ ...unknown, key: "k2" }, 0, 5000)).rejects.toMatchObject({ code: "comm_lost" });

    const next = await path.joinShared({ key: "k2", id: otherId, fresh: true, nranks: 2 }, 0, 5000);
    expect(next).not.toBe(comm);
    expect(path.sharedComm()).toEqual({ key: "k2", id: otherId });

    await path.dropShared(false);
    expect(path.sharedComm()).toBeUndefined();
  });
});
