/**
 * Moving one update's buckets through this daemon's GPUs: the host-to-device copy by the
 * bucket's owner (when that GPU is here), the broadcast to every rank, and the hand-off to
 * the engines on each local GPU, overlapped across slots and ordered by events on streams.
 * A slot is reused only after every engine on every local GPU acked the bucket it held.
 */
import type { Comm, Context, HostMemory } from "../../ffi/index.ts";
import type { CheckpointVersion } from "../checkpoints/registry.ts";
import { assertUnchanged, changedUnderneath } from "../checkpoints/watch.ts";
import { at, type Buffers } from "./buffers.ts";
import type { Bucket } from "./plan.ts";
import type { Receiver } from "./receivers.ts";
import { type Expected, verifyBucket } from "./verify.ts";

/** The ranks a bucket is broadcast to: this daemon's GPUs are ranks firstRank.. of comm. */
export interface Group {
  /** Absent when there is a single rank in all (one GPU, no peers). */
  comm?: Comm;
  firstRank: number;
  /** Ranks live in other processes too: collectives must be issued in plan order. */
  ordered: boolean;
}

/** When a bucket went through each stage here, in ms from the update's start (t0). */
export interface BucketTiming {
  bucket: number;
  owner: number;
  bytes: number;
  /** Copy and broadcast queued (its slot was free). */
  issued: number;
  /** Its bytes were on every local GPU. */
  landed?: number;
  /** Every local engine acked it. */
  acked?: number;
}

/** What an update reports as it goes (the caller's record). */
export interface UpdateProgress {
  readonly t0: number;
  progress: { bucketsDone: number; bytesDone: number };
  timings: { stallSeconds: number; verifySeconds: number };
  buckets: BucketTiming[];
}

export interface TransmitOptions {
  ctx: Context;
  buffers: Buffers;
  group: Group;
  buckets: Bucket[];
  /** The registered version, on daemons whose host holds it (it copies its owned buckets). */
  version?: CheckpointVersion;
  /** The deltas' memory: a piece whose `file` is past the version's files is in sources[file - files]. */
  sources?: readonly HostMemory[];
  /** Hash each bucket on each GPU it lands on and compare it with `expected` before the engines see it. */
  verify?: { expected: Expected; threads: number };
  /** Issue at most this many bytes per second (atomic staging beside serving engines); 0: as fast as it goes. */
  paceBytesPerSecond?: number;
  update: string;
  receivers: Receiver[];
  acked: Map<Receiver, number>;
  timeoutMs: number;
  record: UpdateProgress;
  /** Set by the caller to stop issuing (another participant failed). */
  signal?: AbortSignal;
}

/** Runs every bucket through; rejects with the first failure after the work in flight settles. */
export async function transmit(o: TransmitOptions): Promise<void> {
  const { buffers: t, group } = o;
  let failure: Error | undefined;
  const slots: Promise<void>[] = Array.from({ length: t.slots }, () => Promise.resolve());
  const pace = paced(o.paceBytesPerSecond ?? 0);
  const step = async (b: Bucket) => {
    await pace(b.bytes);
    const waited = performance.now();
    await slots[b.slot];
    o.record.timings.stallSeconds += (performance.now() - waited) / 1000;
    if (failure) return false;
    if (o.signal?.aborted) {
      failure = new Error(String(o.signal.reason ?? "aborted"));
      return false;
    }
    try {
      await bytesReady(o, b);
      await issue(o, b);
    } catch (err) {
      failure ??= err as Error;
      return false;
    }
    const timing: BucketTiming = { bucket: b.index, owner: b.owner, bytes: b.bytes, issued: since(o.record.t0) };
    o.record.buckets.push(timing);
    slots[b.slot] = deliver(o, b, timing).catch((err) => {
      failure ??= err;
    });
    return true;
  };
  if (group.ordered) {
    for (const b of o.buckets) if (!(await step(b))) break;
  } else {
    // Each local GPU issues its own buckets, so one engine's slow ack holds up only that GPU's
    // next copy; every broadcast is queued on all local ranks in one call, so the order of the
    // collectives is the same on every rank whatever order these loops run in.
    await Promise.all(
      t.gpus.map(async (_, g) => {
        for (const b of o.buckets) if (b.owner === group.firstRank + g && !(await step(b))) return;
      }),
    );
  }
  await Promise.all(slots);
  if (failure) throw o.version ? changedUnderneath(o.version, failure) : failure;
  if (o.version) assertUnchanged(o.version);
}

/**
 * Waits, before each bucket, until the one before it had its share of `rate` bytes per second
 * (a copy's bus and an engine's copy-out take time from what else runs on the GPU).
 */
function paced(rate: number): (bytes: number) => Promise<void> {
  if (!(rate > 0)) return async () => undefined;
  // When the next bucket may go: time spent waiting for engines earns no credit to burst with.
  let next = 0;
  return async (bytes) => {
    const now = performance.now();
    const due = Math.max(next, now);
    next = due + (bytes / rate) * 1000;
    if (due > now) await new Promise((r) => setTimeout(r, due - now));
  };
}

/** A version still being pulled: waits until the bytes of the bucket's pieces owned here are verified. */
async function bytesReady(o: TransmitOptions, b: Bucket): Promise<void> {
  const gate = o.version?.gate;
  if (!gate || !o.buffers.gpus[b.owner - o.group.firstRank]) return;
  const waited = performance.now();
  await gate(b.pieces.map((p) => ({ file: p.file, begin: p.fileOffset, end: p.fileOffset + p.range[1] - p.range[0] })));
  o.record.timings.stallSeconds += (performance.now() - waited) / 1000;
}

/** Communicators across processes that have run a collective (their ranks are connected). */
const connected = new WeakSet<Comm>();

/** Queues bucket b: the host-to-device copy if its owner is here, then the broadcast. */
async function issue(o: TransmitOptions, b: Bucket): Promise<void> {
  const { ctx, buffers: t, group } = o;
  const s = b.slot;
  const local = t.gpus[b.owner - group.firstRank];
  if (local) {
    const version = o.version;
    if (!version) throw new Error(`bucket ${b.index} is owned here, but this host does not hold the checkpoint`);
    const ranges = new BigUint64Array(b.pieces.length * 3);
    b.pieces.forEach((p, i) => {
      // A version's own memory is looked up now: a version still being pulled pins it as it goes.
      const files = version.files.length;
      const mem = p.file < files ? at(version.pinned, p.file).mem : at(o.sources ?? [], p.file - files);
      ranges[3 * i] = mem.address + BigInt(p.fileOffset);
      ranges[3 * i + 1] = BigInt(p.slotOffset);
      ranges[3 * i + 2] = BigInt(p.range[1] - p.range[0]);
    });
    ctx.h2dAsync(local.copy, at(local.slots, s), ranges);
    ctx.eventRecord(at(local.copied, s), local.copy);
  }
  if (group.comm) {
    // Every local rank's broadcast waits for the root's copy, not only the root's: an NCCL
    // kernel launched before its bytes exist spins on its GPU, and the engines' copies (other
    // processes, whose contexts share the GPU by time slices) would wait behind it.
    if (local) for (const g of t.gpus) ctx.streamWaitEvent(g.bcast, at(local.copied, s));
    const bufs = t.gpus.map((g) => at(g.slots, s));
    const streams = t.gpus.map((g) => g.bcast);
    // Across processes the communicator's first collective connects the ranks, waiting for
    // them (up to the join's limit): on a worker thread, so the daemon keeps serving. Later
    // ones only hand NCCL the work, which is quicker done here than through a thread.
    if (group.ordered && !connected.has(group.comm)) {
      await ctx.broadcastAsync(group.comm, b.owner, bufs, streams, 0, b.bytes);
      connected.add(group.comm);
    } else {
      ctx.broadcast(group.comm, b.owner, bufs, streams, 0, b.bytes);
    }
    for (const g of t.gpus) ctx.eventRecord(at(g.landed, s), g.bcast);
  } else if (local) {
    ctx.eventRecord(at(local.landed, s), local.copy);
  }
}

/** Waits for bucket b's bytes on each local GPU, hands it to that GPU's engines, awaits their acks. */
async function deliver(o: TransmitOptions, b: Bucket, timing: BucketTiming): Promise<void> {
  const { ctx, buffers: t, timeoutMs: timeout } = o;
  const msg = {
    op: "bucket",
    update: o.update,
    bucket: b.index,
    slot: b.slot,
    tensors: b.pieces.map((p) => ({
      name: p.name,
      dtype: p.dtype,
      shape: p.shape,
      bytes: p.bytes,
      offset: p.slotOffset,
      range: p.range,
      ...(p.delta ? { delta: p.delta } : {}),
    })),
  };
  await Promise.all(
    t.gpus.map(async (g, gpu) => {
      if (!(await ctx.eventWait(at(g.landed, b.slot), timeout))) {
        throw new Error(`bucket ${b.index} did not reach GPU ${gpu} within ${timeout} ms`);
      }
      timing.landed = Math.max(timing.landed ?? 0, since(o.record.t0));
      if (o.verify) {
        const started = performance.now();
        await verifyBucket(ctx, at(g.slots, b.slot), gpu, b, o.verify.expected, o.verify.threads);
        o.record.timings.verifySeconds += (performance.now() - started) / 1000;
      }
      const mine = o.receivers.filter((r) => r.gpu === gpu);
      for (const r of mine) r.send(msg);
      await Promise.all(
        mine.map(async (r) => {
          await r.expect(
            (m) => m.op === "ack" && m.update === o.update && m.bucket === b.index,
            o.update,
            timeout,
            `the ack of bucket ${b.index}`,
            o.signal,
          );
          o.acked.set(r, (o.acked.get(r) ?? 0) + 1);
        }),
      );
    }),
  );
  timing.acked = since(o.record.t0);
  o.record.progress.bucketsDone++;
  o.record.progress.bytesDone += b.bytes;
}

const since = (t0: number) => Math.round((performance.now() - t0) * 1000) / 1000;
