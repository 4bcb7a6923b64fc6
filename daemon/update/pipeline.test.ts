/** Moving buckets through local GPUs on the host backend, to engines that check what landed and ack. */
import type { Socket } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { type Context, type HostMemory, openBackend } from "../../ffi/index.ts";
import { LIB_DIR } from "../../test/in-process.ts";
import type { CheckpointVersion } from "../checkpoints/registry.ts";
import { at, Buffers } from "./buffers.ts";
import { type Group, transmit, type UpdateProgress } from "./pipeline.ts";
import type { Bucket } from "./plan.ts";
import { type Message, Receiver } from "./receivers.ts";

const MiB = 1 << 20;
const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

interface Setup {
  ctx: Context;
  buffers: Buffers;
  source: HostMemory;
  version: CheckpointVersion;
}

/** A context of `gpus` host devices, their buffers, and a pinned source of `sourceBytes` bytes. */
async function setup(gpus: number, slots: number, slotBytes: number, sourceBytes: number): Promise<Setup> {
  const ctx = (await openBackend("host", LIB_DIR, { hostDevices: gpus })).context;
  const buffers = await Buffers.open(ctx, gpus, slots, slotBytes);
  const source = await ctx.hostAlloc(sourceBytes);
  cleanups.push(async () => {
    await buffers.close();
    await ctx.hostFree(source);
    await ctx.destroy();
  });
  const version = {
    state: "ready",
    files: [{ path: "/model.safetensors", size: sourceBytes, mtimeMs: 0, inPlace: false }],
    pinned: [{ path: "/model.safetensors", size: sourceBytes, mtimeMs: 0, inPlace: false, mem: source }],
    markStale: () => undefined,
  } as unknown as CheckpointVersion;
  return { ctx, buffers, source, version };
}

/**
 * Bucket `index` of `bytes` bytes: one tensor read from source offset index*bytes, which
 * setup fills with the byte index+1.
 */
function bucket(index: number, owner: number, slot: number, bytes: number, source?: HostMemory): Bucket {
  source?.view(bytes, index * bytes).fill(index + 1);
  return {
    index,
    owner,
    slot,
    bytes,
    pieces: [
      {
        name: `t${index}`,
        dtype: "U8",
        shape: [bytes],
        bytes,
        slotOffset: 0,
        range: [0, bytes],
        file: 0,
        fileOffset: index * bytes,
      },
    ],
  };
}

interface EngineOptions {
  ackMs?: number;
  /** Sends an error instead of the ack of this bucket. */
  failOn?: number;
  /** Sends messages that look like acks but are not this bucket's first. */
  strays?: boolean;
}

/**
 * An engine's receiver on `gpu`: on each bucket it checks every byte of the slot, holds the
 * slot until it acks, and notes a bucket that arrives in a slot it still holds.
 */
function engine(s: Setup, gpu: number, update: string, opts: EngineOptions = {}) {
  const got: { bucket: number; slot: number; intact: boolean; tensors: unknown }[] = [];
  const problems: string[] = [];
  const held = new Set<number>();
  const onBucket = async (m: { bucket: number; slot: number; tensors: { bytes: number }[] }) => {
    if (held.has(m.slot)) problems.push(`bucket ${m.bucket} in slot ${m.slot} before its last bucket was acked`);
    held.add(m.slot);
    const bytes = m.tensors[0]?.bytes ?? 0;
    const slot = at(at(s.buffers.gpus, gpu).slots, m.slot);
    // The last bytes first: a copy still running has not written them yet.
    const tail = new Uint8Array(Math.min(4096, bytes));
    await s.ctx.bufRead(slot, bytes - tail.length, tail);
    const dst = new Uint8Array(bytes);
    await s.ctx.bufRead(slot, 0, dst);
    const intact = [tail, dst].every((a) => a.every((x) => x === m.bucket + 1));
    got.push({ bucket: m.bucket, slot: m.slot, intact, tensors: m.tensors });
    if (opts.strays) {
      r.deliver({ op: "ack", update: "another-update", bucket: m.bucket });
      r.deliver({ op: "ack", update, bucket: m.bucket + 100 });
      r.deliver({ op: "progress", update, bucket: m.bucket });
    }
    setTimeout(() => {
      held.delete(m.slot);
      if (opts.failOn === m.bucket) r.deliver({ op: "error", update, message: `bucket ${m.bucket} did not fit` });
      else r.deliver({ op: "ack", update, bucket: m.bucket });
    }, opts.ackMs ?? 10);
  };
  const socket = {
    write: (line: string) => {
      const m = JSON.parse(line) as Message;
      if (m.op === "bucket") void onBucket(m as unknown as Parameters<typeof onBucket>[0]);
      return true;
    },
    destroy: () => undefined,
  } as unknown as Socket;
  const r = new Receiver(gpu, socket);
  r.ready = true;
  return { r, got, problems };
}

function progress(): UpdateProgress {
  return {
    t0: performance.now(),
    progress: { bucketsDone: 0, bytesDone: 0 },
    timings: { stallSeconds: 0, verifySeconds: 0 },
    buckets: [],
  };
}

describe("transmit", () => {
  it("copies, broadcasts and hands every bucket to the engines of every local GPU", async () => {
    const s = await setup(2, 2, MiB, 4 * MiB);
    const B = MiB / 2;
    const buckets = [bucket(0, 0, 0, B, s.source), bucket(1, 1, 1, B, s.source), bucket(2, 0, 0, B, s.source)];
    const engines = [engine(s, 0, "u", { ackMs: 40 }), engine(s, 1, "u", { ackMs: 40 })];
    const record = progress();
    const acked = new Map<Receiver, number>();
    const started = performance.now();
    await transmit({
      ctx: s.ctx,
      buffers: s.buffers,
      group: { comm: s.buffers.comm, firstRank: 0, ordered: false },
      buckets,
      version: s.version,
      update: "u",
      receivers: engines.map((e) => e.r),
      acked,
      timeoutMs: 5000,
      record,
    });
    const elapsedMs = performance.now() - started;
    for (const e of engines) {
      expect(e.problems).toEqual([]);
      expect(e.got.map((g) => [g.bucket, g.slot, g.intact]).sort()).toEqual([
        [0, 0, true],
        [1, 1, true],
        [2, 0, true],
      ]);
      expect(acked.get(e.r)).toBe(3);
    }
    expect(engines[0]?.got.find((g) => g.bucket === 0)?.tensors).toEqual([
      { name: "t0", dtype: "U8", shape: [B], bytes: B, offset: 0, range: [0, B] },
    ]);
    expect(record.progress).toEqual({ bucketsDone: 3, bytesDone: 3 * B });
    // Bucket 2 waited for slot 0, that is for the acks of bucket 0.
    expect(record.timings.stallSeconds).toBeGreaterThanOrEqual(0.02);
    expect(record.timings.stallSeconds).toBeLessThanOrEqual(elapsedMs / 1000);
    expect(record.buckets.map((t) => [t.bucket, t.owner, t.bytes])).toEqual([
      [0, 0, B],
      [1, 1, B],
      [2, 0, B],
    ]);
    for (const t of record.buckets) {
      expect(t.issued).toBeGreaterThanOrEqual(0);
      expect(t.landed).toBeGreaterThanOrEqual(t.issued);
      expect(t.acked).toBeGreaterThanOrEqual((t.landed ?? 0) + 30);
      expect(t.acked).toBeLessThanOrEqual(elapsedMs + 1);
    }
  });

  it("unordered, a slow ack holds up only the next bucket of the same slot's owner", async () => {
    const s = await setup(2, 2, MiB, 3 * MiB);
    const B = MiB / 4;
    // Plan order: both of GPU 0's buckets in slot 0, then GPU 1's.
    const buckets = [bucket(0, 0, 0, B, s.source), bucket(1, 0, 0, B, s.source), bucket(2, 1, 1, B, s.source)];
    const run = async (ordered: boolean) => {
      const record = progress();
      await transmit({
        ctx: s.ctx,
        buffers: s.buffers,
        group: { comm: s.buffers.comm, firstRank: 0, ordered },
        buckets,
        version: s.version,
        update: `u-${ordered}`,
        receivers: [engine(s, 0, `u-${ordered}`, { ackMs: 30 }).r, engine(s, 1, `u-${ordered}`, { ackMs: 30 }).r],
        acked: new Map(),
        timeoutMs: 5000,
        record,
      });
      return record.buckets.map((t) => t.bucket);
    };
    expect(await run(false)).toEqual([0, 2, 1]);
    expect(await run(true)).toEqual([0, 1, 2]);
  });

  it("on a single GPU hands a bucket over only once its copy is complete", async () => {
    const B = 48 * MiB;
    const s = await setup(1, 2, B, 2 * B);
    const engines = [engine(s, 0, "u")];
    await transmit({
      ctx: s.ctx,
      buffers: s.buffers,
      group: { firstRank: 0, ordered: false },
      buckets: [bucket(0, 0, 0, B, s.source), bucket(1, 0, 1, B, s.source)],
      version: s.version,
      update: "u",
      receivers: engines.map((e) => e.r),
      acked: new Map(),
      timeoutMs: 5000,
      record: progress(),
    });
    expect(engines[0]?.got.map((g) => [g.bucket, g.intact]).sort()).toEqual([
      [0, true],
      [1, true],
    ]);
  });

  it("takes only the ack of the right update and bucket", async () => {
    const s = await setup(1, 2, MiB, 4 * MiB);
    const B = MiB / 2;
    const e = engine(s, 0, "u", { strays: true, ackMs: 20 });
    const record = progress();
    await transmit({
      ctx: s.ctx,
      buffers: s.buffers,
      group: { firstRank: 0, ordered: false },
      buckets: [0, 1, 2, 3].map((i) => bucket(i, 0, i % 2, B, s.source)),
      version: s.version,
      update: "u",
      receivers: [e.r],
      acked: new Map(),
      timeoutMs: 5000,
      record,
    });
    expect(e.problems).toEqual([]);
    expect(e.got.map((g) => g.bucket).sort()).toEqual([0, 1, 2, 3]);
    // The strays are left for nobody; the real acks were consumed.
    expect(e.r.inbox.filter((m) => m.op === "ack" && m.update === "u" && Number(m.bucket) < 100)).toEqual([]);
    expect(e.r.inbox).toHaveLength(12);
  });

  it("stops issuing after an engine fails, and rejects with its error once the rest settles", async () => {
    const s = await setup(1, 2, MiB, 4 * MiB);
    const B = MiB / 2;
    const e = engine(s, 0, "u", { failOn: 0, ackMs: 20 });
    const record = progress();
    await expect(
      transmit({
        ctx: s.ctx,
        buffers: s.buffers,
        group: { firstRank: 0, ordered: true },
        buckets: [0, 1, 2, 3].map((i) => bucket(i, 0, i % 2, B, s.source)),
        version: s.version,
        update: "u",
        receivers: [e.r],
        acked: new Map(),
        timeoutMs: 5000,
        record,
      }),
    ).rejects.toThrow(`receiver ${e.r.label} failed: bucket 0 did not fit`);
    expect(record.buckets.map((t) => t.bucket)).toEqual([0, 1]);
    expect(e.got.map((g) => g.bucket).sort()).toEqual([0, 1]);
    // Bucket 0 failed: it never counts as done.
    expect(record.buckets[0]?.acked).toBeUndefined();
  });

  it("issues nothing once the caller aborted, failing with the reason", async () => {
    const s = await setup(1, 2, MiB, MiB);
    const e = engine(s, 0, "u");
    const ac = new AbortController();
    ac.abort("a peer failed");
    const record = progress();
    await expect(
      transmit({
        ctx: s.ctx,
        buffers: s.buffers,
        group: { firstRank: 0, ordered: true },
        buckets: [bucket(0, 0, 0, MiB / 2, s.source)],
        version: s.version,
        update: "u",
        receivers: [e.r],
        acked: new Map(),
        timeoutMs: 5000,
        record,
        signal: ac.signal,
      }),
    ).rejects.toThrow("a peer failed");
    expect(record.buckets).toEqual([]);
    expect(e.got).toEqual([]);
  });

  it("refuses a bucket owned here when this host does not hold the checkpoint", async () => {
    const s = await setup(1, 2, MiB, MiB);
    const group: Group = { firstRank: 0, ordered: false };
    await expect(
      transmit({
        ctx: s.ctx,
        buffers: s.buffers,
        group,
        buckets: [bucket(7, 0, 0, MiB / 2)],
        update: "u",
        receivers: [],
        acked: new Map(),
        timeoutMs: 5000,
        record: progress(),
      }),
    ).rejects.toThrow("bucket 7 is owned here, but this host does not hold the checkpoint");
  });
});
