/**
 * Deltas between versions: once a version is ready, the elements of each changed tensor that
 * differ from the previous ready version of its name, found in C in one pass on several
 * threads (ckpt_delta_find) and kept in pinned memory beside the version. Updates
 * then move those instead of whole tensors (choose.ts). A delta is only how bytes travel:
 * every version stays whole, and dropping either version drops the delta.
 */
import type { Logger } from "pino";
import { CKPT_HASH_CHUNK, type Context, type FoundDelta, type HostMemory } from "../../ffi/index.ts";
import type { CheckpointVersion, Registry, TensorRecord } from "../checkpoints/registry.ts";
import { DTYPE_BITS } from "../checkpoints/safetensors.ts";
import { assertUnchanged } from "../checkpoints/watch.ts";
import { at } from "../update/buffers.ts";
import { heldAs } from "../update/skip.ts";

/**
 * One tensor's delta in its version's delta memory: at `offset`, the new values, then the
 * positions (uint32 element indices, ascending), then the old values, each padded to 8 bytes.
 * Forward (base to this version) the receiver gets [values, positions]; back, [positions, old
 * values]: each a contiguous span (spans below).
 */
export interface TensorDelta {
  name: string;
  dtype: string;
  shape: number[];
  /** What a receiver holds of the tensor in the base version, and in this one (skip.ts heldAs). */
  from: string;
  to: string;
  /** The base version's tensor hash (a puller holding it fetches the delta: pull/pull.ts). */
  baseHash: string;
  count: number;
  offset: number;
  valuesBytes: number;
  positionsBytes: number;
  /** The chunk hashes of the span each way (verified updates check the buckets against them). */
  hashes: { forward: BigUint64Array; back: BigUint64Array };
}

/** A version's deltas against its base. */
export interface VersionDelta {
  /** The base version's id. */
  base: string;
  mem: HostMemory;
  tensors: Map<string, TensorDelta>;
  /** Seconds it took, after the version was ready. */
  seconds: number;
}

/** Where, in the version's delta memory, a receiver finds what it applies. */
export interface DeltaSpan {
  offset: number;
  bytes: number;
  /** Offsets of the positions and of the values inside the span. */
  positions: number;
  values: number;
}

/** The span that takes the base's tensor to this version's (forward) or back. */
export function span(d: TensorDelta, back: boolean): DeltaSpan {
  const { offset, valuesBytes: v, positionsBytes: p } = d;
  return back
    ? { offset: offset + v, bytes: p + v, positions: 0, values: p }
    : { offset, bytes: v + p, positions: v, values: 0 };
}

const pad8 = (n: number) => Math.ceil(n / 8) * 8;

/**
 * A delta pays only where it moves much less than the tensor: at most a quarter of its bytes
 * one way (k x (4 + element size)). Smaller tensors than this go whole: a scatter on the
 * receiver costs more than their copy.
 */
export const DELTA_MIN_BYTES = 64 << 10;
/** Receivers read positions as int32 (torch has no uint32 index): a delta's tensor has at most 2^31 elements. */
const MAX_ELEMENTS = 2 ** 31;

/** The element size a delta of this tensor would use, or 0 when it cannot have one. Pure. */
export function deltaElem(t: TensorRecord, base: TensorRecord | undefined, minBytes = DELTA_MIN_BYTES): number {
  if (!base || base.hash === t.hash || base.dtype !== t.dtype || base.bytes !== t.bytes) return 0;
  if (base.shape.join("x") !== t.shape.join("x") || t.bytes < minBytes) return 0;
  const bits = DTYPE_BITS[t.dtype] ?? 0;
  if (![8, 16, 32, 64].includes(bits)) return 0;
  const elem = bits / 8;
  return t.bytes / elem <= MAX_ELEMENTS ? elem : 0;
}

/** Most changes a delta of this tensor may have. */
export const deltaLimit = (bytes: number, elem: number) => Math.floor(bytes / 4 / (4 + elem));

/** Sets each delta's chunk hashes, of its span forward and back, from the delta memory. */
async function hashSpans(ctx: Context, mem: HostMemory, deltas: TensorDelta[], threads: number): Promise<void> {
  const spans = deltas.flatMap((d) => [span(d, false), span(d, true)]);
  const ranges = new BigUint64Array(spans.length * 2);
  spans.forEach((s, i) => {
    ranges[2 * i] = mem.address + BigInt(s.offset);
    ranges[2 * i + 1] = BigInt(s.bytes);
  });
  const { chunks } = await ctx.chunkHashes(ranges, threads);
  let k = 0;
  const next = (bytes: number) => {
    const n = Math.ceil(bytes / CKPT_HASH_CHUNK);
    k += n;
    return chunks.subarray(k - n, k);
  };
  for (const d of deltas) {
    const forward = next(span(d, false).bytes);
    d.hashes = { forward, back: next(span(d, true).bytes) };
  }
}

export interface DeltasOptions {
  ctx: Context;
  log: Logger;
  registry: Registry;
  threads: number;
  minBytes?: number;
}

/** One delta being made: both versions' memory stays until it settles. */
interface Job {
  base: CheckpointVersion;
  next: CheckpointVersion;
  abort: AbortController;
  done: Promise<void>;
}

/** Makes each ready version's deltas against the one before it, and frees them with either. */
export class Deltas {
  private readonly jobs = new Set<Job>();

  constructor(private readonly o: DeltasOptions) {
    o.registry.afterReady((v) => this.derive(v));
    // Last: a pull source stops serving the delta memory before it goes back to the pool.
    o.registry.beforeDrop((v) => this.forget(v), true);
  }

  /** Starts the deltas of `next` against the newest older ready version of its name, if any. */
  derive(next: CheckpointVersion): void {
    const base = this.o.registry
      .list()
      .filter((v) => v.name === next.name && v.version < next.version && v.state === "ready")
      .at(-1);
    if (!base || next.delta || !this.o.registry.listed(next)) return;
    const job: Job = { base, next, abort: new AbortController(), done: Promise.resolve() };
    job.done = this.run(job)
      .catch((err) => this.o.log.warn({ checkpoint: next.id, base: base.id, err }, "no deltas: making them failed"))
      .finally(() => this.jobs.delete(job));
    this.jobs.add(job);
  }

  /** Before a version's memory goes: stops the deltas made from or into it, frees its own. */
  async forget(v: CheckpointVersion): Promise<void> {
    const mine = [...this.jobs].filter((j) => j.base === v || j.next === v);
    for (const j of mine) j.abort.abort();
    await Promise.all(mine.map((j) => j.done));
    const delta = v.delta;
    v.delta = undefined;
    if (delta) this.o.registry.pool.give(delta.mem);
  }

  private async run({ base, next, abort }: Job): Promise<void> {
    const { ctx, log, registry, threads } = this.o;
    const started = performance.now();
    const before = new Map(base.tensors.map((t) => [t.name, t]));
    const address = (v: CheckpointVersion, t: TensorRecord) => at(v.pinned, t.file).mem.address + BigInt(t.offset);
    const found: { t: TensorRecord; b: TensorRecord; elem: number; count: number; delta: FoundDelta }[] = [];
    const freeAll = () => {
      for (const f of found) f.delta.free();
    };
    try {
      for (const t of next.tensors) {
        const b = before.get(t.name);
        const elem = b ? deltaElem(t, b, this.o.minBytes) : 0;
        if (!b || elem === 0) continue;
        if (abort.signal.aborted) return freeAll();
        const limit = deltaLimit(t.bytes, elem);
        const { count, delta } = await ctx.deltaFind(address(base, b), address(next, t), t.bytes, elem, limit, threads);
        if (delta) found.push({ t, b, elem, count, delta });
      }
      // An in-place file that changed while it was read would make a delta of other bytes.
      assertUnchanged(base);
      assertUnchanged(next);
    } catch (err) {
      freeAll();
      throw err;
    }
    if (found.length === 0 || abort.signal.aborted) return freeAll();
    let bytes = 0;
    const tensors = new Map<string, TensorDelta>();
    for (const { t, b, elem, count } of found) {
      const valuesBytes = pad8(count * elem);
      const positionsBytes = pad8(count * 4);
      tensors.set(t.name, {
        name: t.name,
        dtype: t.dtype,
        shape: t.shape,
        from: heldAs(b),
        to: heldAs(t),
        baseHash: b.hash,
        count,
        offset: bytes,
        valuesBytes,
        positionsBytes,
        hashes: { forward: new BigUint64Array(0), back: new BigUint64Array(0) },
      });
      bytes += 2 * valuesBytes + positionsBytes;
    }
    const foundAt = performance.now();
    // Reserved against the budget until the delta is set on the version (which counts it then).
    const reserved = await registry.makeRoom([bytes], bytes, "deltas of").catch((err: Error) => {
      freeAll();
      log.warn({ checkpoint: next.id, bytes, reason: err.message }, "no deltas: no room for them");
    });
    if (!reserved) return;
    // Pooled: each step's deltas are about the size of the last one's, whose block comes back.
    const mem = await registry.pool.take(bytes).catch((err) => {
      freeAll();
      reserved();
      throw err;
    });
    const pinned = performance.now();
    try {
      for (const { t, delta } of found) {
        const d = tensors.get(t.name) as TensorDelta;
        const where = mem.address + BigInt(d.offset);
        const positions = where + BigInt(d.valuesBytes);
        await delta.take(positions, where, positions + BigInt(d.positionsBytes));
      }
      await hashSpans(ctx, mem, [...tensors.values()], threads);
      // Either version dropped meanwhile (its forget ran before this job began): no delta.
      if (abort.signal.aborted || !registry.listed(next) || !registry.listed(base)) throw new Error("cancelled");
    } catch (err) {
      freeAll();
      reserved();
      registry.pool.give(mem);
      if (abort.signal.aborted || !registry.listed(next)) return;
      throw err;
    }
    const seconds = (performance.now() - started) / 1000;
    next.delta = { base: base.id, mem, tensors, seconds };
    reserved();
    const phases = { findSeconds: (foundAt - started) / 1000, pinSeconds: (pinned - foundAt) / 1000 };
    log.info({ checkpoint: next.id, base: base.id, tensors: tensors.size, bytes, seconds, ...phases }, "deltas made");
  }
}
