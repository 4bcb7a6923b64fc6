/**
 * Moving one update's buckets through this daemon's GPUs: the host-to-device copy by the
 * bucket's owner (when that GPU is here), the broadcast to every rank, and the hand-off to
 * the engines on each local GPU, overlapped across slots and ordered by events on streams.
 * A slot is reused only after every engine on every local GPU acked the bucket it held.
 */
import type { Comm, Context } from "../../ffi/index.ts";
import type { CheckpointVersion } from "../checkpoints/registry.ts";
import type { Bucket } from "./plan.ts";
import type { Receiver } from "./receivers.ts";
import { at, type Transfer } from "./transfer.ts";

/** The ranks a bucket is broadcast to: this daemon's GPUs are ranks firstRank.. of comm. */
export interface Group {
  /** Absent when there is a single rank in all (one GPU, no peers). */
  comm?: Comm;
  firstRank: number;
  /** Ranks live in other processes too: collectives must be issued in plan order. */
  ordered: boolean;
}

/** What an update reports as it goes (the caller's record). */
export interface Progress {
  progress: { bucketsDone: number; bytesDone: number };
  timings: { stallSeconds: number };
}

export interface TransmitOptions {
  ctx: Context;
  transfer: Transfer;
  group: Group;
  buckets: Bucket[];
  /** The registered version, on daemons whose host holds it (it copies its owned buckets). */
  version?: CheckpointVersion;
  update: string;
  receivers: Receiver[];
  acked: Map<Receiver, number>;
  timeoutMs: number;
  record: Progress;
  /** Set by the caller to stop issuing (another participant failed). */
  signal?: AbortSignal;
}

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve = () => {};
  const promise = new Promise<void>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

/** Runs every bucket through; rejects with the first failure after the work in flight settles. */
export async function transmit(o: TransmitOptions): Promise<void> {
  const { transfer: t, group, buckets } = o;
  let failure: Error | undefined;
  const stopped = deferred();
  const stop = (err: Error) => {
    failure ??= err;
    stopped.resolve();
  };
  const onAbort = () => stop(new Error(String(o.signal?.reason ?? "aborted")));
  if (o.signal?.aborted) onAbort();
  o.signal?.addEventListener("abort", onAbort, { once: true });
  // A bucket may use its slot once the previous bucket in that slot was delivered everywhere here.
  const delivered = buckets.map(() => deferred());
  const copied = buckets.map(() => deferred());
  const last = new Map<number, number>();
  const free = buckets.map((b) => {
    const prev = last.get(b.slot);
    last.set(b.slot, b.index);
    return prev === undefined ? Promise.resolve() : at(delivered, prev).promise;
  });
  /** Waits for p unless the update stopped; true if it may go on. `stall`: count the wait. */
  const until = async (p: Promise<void>, stall = false) => {
    const waited = performance.now();
    await Promise.race([p, stopped.promise]);
    if (stall) o.record.timings.stallSeconds += (performance.now() - waited) / 1000;
    return failure === undefined;
  };
  const local = (b: Bucket) => b.owner - group.firstRank >= 0 && b.owner - group.firstRank < t.gpus.length;
  const inflight: Promise<void>[] = [];
  const send = (b: Bucket) => {
    try {
      broadcast(o, b);
    } catch (err) {
      stop(err as Error);
      return;
    }
    inflight.push(
      deliver(o, b)
        .catch(stop)
        .finally(() => at(delivered, b.index).resolve()),
    );
  };
  // Every local GPU copies its own buckets as soon as their slots are free, so one GPU's
  // copies never wait behind another's engines.
  const copies = t.gpus.map(async (_, g) => {
    for (const b of buckets) {
      if (b.owner !== group.firstRank + g) continue;
      if (!(await until(at(free, b.index), true))) return;
      try {
        copy(o, b);
      } catch (err) {
        stop(err as Error);
        return;
      }
      // All ranks here, one call per broadcast: any order of calls is the same on every rank.
      if (!group.ordered) send(b);
      at(copied, b.index).resolve();
    }
  });
  // Ranks in other processes: the broadcasts follow the plan's order, the same everywhere.
  const ordered = group.ordered
    ? (async () => {
        for (const b of buckets) {
          if (!(await until(local(b) ? at(copied, b.index).promise : at(free, b.index)))) return;
          send(b);
        }
      })()
    : Promise.resolve();
  await Promise.all([...copies, ordered]);
  // Work already queued must settle before the slots can be reused or freed.
  await Promise.all(inflight);
  o.signal?.removeEventListener("abort", onAbort);
  if (failure) throw failure;
}

/** Queues bucket b's host-to-device copy on its owner, which is here. */
function copy(o: TransmitOptions, b: Bucket): void {
  const { ctx, transfer: t, group } = o;
  const s = b.slot;
  const local = at(t.gpus, b.owner - group.firstRank);
  const version = o.version;
  if (!version) throw new Error(`bucket ${b.index} is owned here, but this host does not hold the checkpoint`);
  const ranges = new BigUint64Array(b.pieces.length * 3);
  b.pieces.forEach((p, i) => {
    const file = at(version.pinned, p.file);
    ranges[3 * i] = file.mem.address + BigInt(p.fileOffset);
    ranges[3 * i + 1] = BigInt(p.slotOffset);
    ranges[3 * i + 2] = BigInt(p.range[1] - p.range[0]);
  });
  ctx.h2dAsync(local.copy, at(local.slots, s), ranges);
  ctx.eventRecord(at(local.copied, s), local.copy);
}

/** Queues bucket b's broadcast to every rank (after its copy, when the root is here). */
function broadcast(o: TransmitOptions, b: Bucket): void {
  const { ctx, transfer: t, group } = o;
  const s = b.slot;
  const local = t.gpus[b.owner - group.firstRank];
  if (group.comm) {
    if (local) ctx.streamWaitEvent(local.bcast, at(local.copied, s));
    ctx.broadcast(
      group.comm,
      b.owner,
      t.gpus.map((g) => at(g.slots, s)),
      t.gpus.map((g) => g.bcast),
      0,
      b.bytes,
    );
    for (const g of t.gpus) ctx.eventRecord(at(g.landed, s), g.bcast);
  } else if (local) {
    ctx.eventRecord(at(local.landed, s), local.copy);
  }
}

/** Waits for bucket b's bytes on each local GPU, hands it to that GPU's engines, awaits their acks. */
async function deliver(o: TransmitOptions, b: Bucket): Promise<void> {
  const { ctx, transfer: t, timeoutMs: timeout } = o;
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
    })),
  };
  await Promise.all(
    t.gpus.map(async (g, gpu) => {
      if (!(await ctx.eventWait(at(g.landed, b.slot), timeout))) {
        throw new Error(`bucket ${b.index} did not reach GPU ${gpu} within ${timeout} ms`);
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
          );
          o.acked.set(r, (o.acked.get(r) ?? 0) + 1);
        }),
      );
    }),
  );
  o.record.progress.bucketsDone++;
  o.record.progress.bytesDone += b.bytes;
}
