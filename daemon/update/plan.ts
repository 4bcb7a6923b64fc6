/**
 * Bucket planning: a pure function from a checkpoint's tensors to the buckets an update
 * moves. Each bucket is copied host-to-device by one GPU, then broadcast to all. Every GPU
 * copies an equal share of the bytes, from its own share of host memory first; buckets are
 * packed largest tensor first (or, for engines that reload layer by layer, in layer order); a
 * tensor is cut only when it is larger than a bucket or straddles two GPUs' shares.
 */

import { CKPT_HASH_CHUNK } from "../../ffi/constants.ts";
import type { TensorRecord } from "../checkpoints/registry.ts";
import { FirstFit } from "./first-fit.ts";

/** What planning needs of a registered tensor: its size, its file and its offset there. */
export type PlanTensor = Pick<TensorRecord, "name" | "dtype" | "shape" | "bytes" | "file" | "offset"> & {
  /** Set when the bytes are a delta of the tensor (dtype and shape are the tensor's). */
  delta?: DeltaLayout;
};

/** A delta's bytes as the receiver reads them (PROTOCOL.md): `count` changes, where its parts lie. */
export interface DeltaLayout {
  count: number;
  /** Byte offsets, inside the delta's bytes, of the uint32 positions and of the values. */
  positions: number;
  values: number;
}

/** A piece of a tensor in a bucket. */
export interface BucketPiece {
  name: string;
  dtype: string;
  shape: number[];
  /** The whole tensor's size. */
  bytes: number;
  /** Where the piece lies in the bucket buffer. */
  slotOffset: number;
  /** Which bytes of the tensor this piece holds: [begin, end); [0, bytes) when whole. */
  range: [number, number];
  file: number;
  /** Byte offset in the file of the piece's first byte. */
  fileOffset: number;
  /** The piece is of a delta's bytes (`bytes` and `range` count those). */
  delta?: DeltaLayout;
}

export interface Bucket {
  index: number;
  /** Global rank of the GPU that copies this bucket from its host's memory (the root). */
  owner: number;
  /** Slot buffer the bucket occupies on every GPU. */
  slot: number;
  bytes: number;
  pieces: BucketPiece[];
}

export interface PlanOptions {
  /** Bucket capacity in bytes. */
  bucketBytes: number;
  /** Global ranks of the GPUs whose hosts hold the checkpoint; file f is local to owners[f mod n]. */
  owners: number[];
  /** Slots per GPU; owners[j] uses the slots s with s mod n = j, in turn. */
  slots: number;
  /** Offsets inside a bucket are aligned to this (bytes, power of two). */
  align?: number;
  /**
   * size (default): largest first, the fullest buckets; layers: by layer number in the name,
   * then name, so that an engine reloading layer by layer (vLLM's layerwise reload of quantized
   * models) completes each layer early and holds about one layer's copies at a time.
   */
  order?: BucketOrder;
}

export type BucketOrder = "size" | "layers";

/** The least bucket of an update that smallerBuckets shrinks. */
const MIN_BUCKET = 16 << 20;

/**
 * An update of few bytes (deltas, a few changed tensors) in buckets small enough that each
 * slot is used about twice: the copy of the next bucket then overlaps the engines' work on
 * the last one, where a single full bucket would make them wait for all of it. Whole updates
 * keep the slots' size.
 */
export function smallerBuckets(opts: PlanOptions, bytes: number, paceGBps?: number): PlanOptions {
  // Paced staging beside serving engines: a bucket of about 4 ms of the pace, so that what an
  // engine copies out at once is a small burst between its forward passes.
  const cap = paceGBps ? Math.max(MIN_BUCKET, paceGBps * 1e9 * 0.004) : bytes / (2 * opts.slots);
  const share = Math.floor(cap / CKPT_HASH_CHUNK) * CKPT_HASH_CHUNK;
  return { ...opts, bucketBytes: Math.min(opts.bucketBytes, Math.max(MIN_BUCKET, share)) };
}

/**
 * Splits the tensors into buckets, never mixing owners within a bucket, then interleaves the
 * owners' buckets (GPU 0, GPU 1, ..., GPU 0, ...) so that every GPU's host-to-device engine
 * has work in flight at once. Every owner copies the same number of bytes, to within
 * owners x `align` (see shares), packed into as few buckets as fit (see packBuckets).
 */
export function planBuckets(tensors: PlanTensor[], opts: PlanOptions): Bucket[] {
  const n = opts.owners.length;
  if (n < 1 || opts.slots < n) throw new RangeError(`${opts.slots} slots cannot serve ${n} owners`);
  const align = opts.align ?? 256;
  if (!(opts.bucketBytes >= align) || opts.bucketBytes % align !== 0) {
    throw new RangeError(`bucketBytes ${opts.bucketBytes} must be a positive multiple of ${align}`);
  }
  // Shares are cut at whole hash chunks of a tensor, so that every piece can be verified on its
  // GPU (verify.ts); buckets are whole chunks (geometry.ts), so their cuts are too.
  const cut = opts.bucketBytes % CKPT_HASH_CHUNK === 0 ? CKPT_HASH_CHUNK : align;
  const perOwner = shares(tensors, n, align, cut).map((segments, j) => {
    const mine = Array.from({ length: opts.slots }, (_, s) => s).filter((s) => s % n === j);
    const pack = opts.order === "layers" ? packInLayerOrder : packBuckets;
    const owner = opts.owners[j] as number;
    return pack(segments, opts.bucketBytes, align).map((b, k): Bucket => {
      b.owner = owner;
      b.slot = mine[k % mine.length] as number;
      return b;
    });
  });
  const out: Bucket[] = [];
  for (let i = 0; perOwner.some((list) => i < list.length); i++) {
    for (const list of perOwner) {
      const b = list[i];
      if (!b) continue;
      b.index = out.length;
      out.push(b);
    }
  }
  return out;
}

/** Bytes [begin, end) of a tensor. */
interface Segment {
  t: PlanTensor;
  begin: number;
  end: number;
}

const len = (s: Segment) => s.end - s.begin;
const size = (list: Segment[]) => list.reduce((sum, s) => sum + len(s), 0);

/**
 * What each of n owners copies: file f belongs to owner f mod n, in file order; an owner
 * holding more than an equal share keeps its first `quota` bytes and the rest goes, in
 * order, to the owners under their share (a tensor may be cut there, at a multiple of
 * `cut` from its start).
 */
function shares(tensors: PlanTensor[], n: number, align: number, cut: number): Segment[][] {
  const byPlace = (a: PlanTensor, b: PlanTensor) => a.file - b.file || a.offset - b.offset;
  // A registered version lists its tensors in that order already: then no sort is needed.
  const sorted = tensors.every((t, i) => i === 0 || byPlace(tensors[i - 1] as PlanTensor, t) <= 0);
  const ordered = sorted ? tensors : [...tensors].sort(byPlace);
  const lists: Segment[][] = Array.from({ length: n }, () => []);
  for (const t of ordered) lists[t.file % n]?.push({ t, begin: 0, end: t.bytes });
  const total = tensors.reduce((sum, t) => sum + t.bytes, 0);
  const quota = Math.ceil(total / n / align) * align;
  // (concat, not push(...x): a spread of 100k+ segments overflows the stack)
  let excess: Segment[] = [];
  for (const [j, list] of lists.entries()) {
    const { head, rest } = take(list, quota, cut);
    lists[j] = head;
    excess = excess.concat(rest);
  }
  for (const [j, list] of lists.entries()) {
    const got = take(excess, quota - size(list), cut);
    lists[j] = list.concat(got.head);
    excess = got.rest;
  }
  // What rounding to `align` left over goes to the owner with the fewest bytes.
  if (excess.length > 0) {
    const j = lists.reduce((min, list, k) => (size(list) < size(lists[min] as Segment[]) ? k : min), 0);
    lists[j] = (lists[j] as Segment[]).concat(excess);
  }
  return lists;
}

/** The first `bytes` (rounded down to `align` inside a tensor) of a list, and the rest. */
function take(list: Segment[], bytes: number, align: number): { head: Segment[]; rest: Segment[] } {
  let left = bytes;
  let i = 0;
  for (; i < list.length && len(list[i] as Segment) <= left; i++) left -= len(list[i] as Segment);
  const s = list[i];
  if (!s) return { head: list, rest: [] };
  const cut = s.begin + Math.floor(left / align) * align;
  if (cut === s.begin) return { head: list.slice(0, i), rest: list.slice(i) };
  const head = list.slice(0, i + 1);
  const rest = list.slice(i);
  head[i] = { ...s, end: cut };
  rest[0] = { ...s, begin: cut };
  return { head, rest };
}

/** A bucket as packed; planBuckets gives it its owner, slot and index. */
function bucket(bytes: number, pieces: BucketPiece[]): Bucket {
  return { index: 0, owner: 0, slot: 0, bytes, pieces };
}

/**
 * Packs one owner's segments into buckets: a segment larger than a bucket is cut into full
 * buckets and a remainder; the others go, largest first, into the first bucket with room
 * (offsets aligned), so buckets come out nearly full without cutting tensors that fit one.
 */
function packBuckets(segments: Segment[], bucketBytes: number, align: number): Bucket[] {
  const buckets: Bucket[] = [];
  const items: Segment[] = [];
  for (const s of segments) {
    let begin = s.begin;
    for (; s.end - begin > bucketBytes; begin += bucketBytes) {
      buckets.push(bucket(bucketBytes, [piece(s, begin, begin + bucketBytes, 0)]));
    }
    items.push(begin === s.begin ? s : { ...s, begin });
  }
  const bins = new FirstFit(bucketBytes);
  const open: Bucket[] = [];
  const alignUp = (n: number) => Math.ceil(n / align) * align;
  for (const s of largestFirst(items)) {
    const len = s.end - s.begin;
    let k = bins.find(len);
    if (k < 0) {
      k = bins.open();
      open.push(bucket(0, []));
      buckets.push(open[k] as Bucket);
    }
    const b = open[k] as Bucket;
    const at = alignUp(b.bytes);
    b.pieces.push(piece(s, s.begin, s.end, at));
    b.bytes = at + len;
    bins.set(k, bucketBytes - alignUp(b.bytes));
  }
  return buckets;
}

/**
 * Segments largest first, those of equal size in list order: grouped by size, then the groups
 * in order. A checkpoint's tensors come in few sizes (its layers repeat), so this takes a few
 * milliseconds where a comparison sort of 100k+ segments takes tens.
 */
function largestFirst(items: Segment[]): Segment[] {
  const bySize = new Map<number, Segment[]>();
  for (const s of items) {
    const group = bySize.get(len(s));
    if (group) group.push(s);
    else bySize.set(len(s), [s]);
  }
  const sizes = Float64Array.from(bySize.keys()).sort().reverse();
  const out: Segment[] = [];
  for (const size of sizes) for (const s of bySize.get(size) as Segment[]) out.push(s);
  return out;
}

/** The layer number in a tensor's name ("model.layers.12.mlp.up_proj.weight": 12), or -1. */
export function layerOf(name: string): number {
  const m = /(?:^|\.)(?:layers|h|blocks)\.(\d+)\./.exec(name);
  return m ? Number(m[1]) : -1;
}

/**
 * Packs one owner's segments in layer order (then by name), each into the current bucket when
 * it fits, else into a new one; a segment larger than a bucket fills whole buckets and its
 * remainder opens the next.
 */
function packInLayerOrder(segments: Segment[], bucketBytes: number, align: number): Bucket[] {
  const items = [...segments].sort(
    (a, b) =>
      layerOf(a.t.name) - layerOf(b.t.name) ||
      (a.t.name < b.t.name ? -1 : a.t.name > b.t.name ? 1 : 0) ||
      a.begin - b.begin,
  );
  const buckets: Bucket[] = [];
  const alignUp = (n: number) => Math.ceil(n / align) * align;
  let current: Bucket | undefined;
  for (const s of items) {
    let begin = s.begin;
    if (!current || alignUp(current.bytes) + s.end - begin > bucketBytes) {
      for (; s.end - begin > bucketBytes; begin += bucketBytes) {
        buckets.push(bucket(bucketBytes, [piece(s, begin, begin + bucketBytes, 0)]));
      }
      current = bucket(0, []);
      buckets.push(current);
    }
    const at = alignUp(current.bytes);
    current.pieces.push(piece(s, begin, s.end, at));
    current.bytes = at + s.end - begin;
  }
  return buckets;
}

function piece({ t }: Segment, begin: number, end: number, slotOffset: number): BucketPiece {
  return {
    name: t.name,
    dtype: t.dtype,
    shape: t.shape,
    bytes: t.bytes,
    slotOffset,
    range: [begin, end],
    file: t.file,
    fileOffset: t.offset + begin,
    ...(t.delta ? { delta: t.delta } : {}),
  };
}
