/**
 * Bucket planning: a pure function from a checkpoint's tensors to the buckets an update
 * moves. Each bucket is copied host-to-device by one GPU (the one whose share of host memory
 * holds those bytes), then broadcast to all; a tensor larger than a bucket is split.
 */

import type { TensorRecord } from "../checkpoints/registry.ts";

/** What planning needs of a registered tensor: its size, its file and its offset there. */
export type PlanTensor = Pick<TensorRecord, "name" | "dtype" | "shape" | "bytes" | "file" | "offset">;

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
  /** Global ranks of the GPUs whose hosts hold the checkpoint: file f belongs to owners[f mod n]. */
  owners: number[];
  /** Slots per GPU; owners[j] uses the slots s with s mod n = j, in turn. */
  slots: number;
  /** Offsets inside a bucket are aligned to this (bytes, power of two). */
  align?: number;
}

/**
 * Splits the tensors into buckets, in file order per owner, never mixing owners within a
 * bucket, then interleaves the owners' buckets (GPU 0, GPU 1, ..., GPU 0, ...) so that every
 * GPU's host-to-device engine has work in flight at once.
 */
export function planBuckets(tensors: PlanTensor[], opts: PlanOptions): Bucket[] {
  const n = opts.owners.length;
  if (n < 1 || opts.slots < n) throw new RangeError(`${opts.slots} slots cannot serve ${n} owners`);
  const perOwner = opts.owners.map((owner, j) => {
    const mine = Array.from({ length: opts.slots }, (_, s) => s).filter((s) => s % n === j);
    return packBuckets(
      tensors.filter((t) => t.file % n === j),
      opts,
    ).map((b, k) => ({ ...b, owner, slot: mine[k % mine.length] as number }));
  });
  const out: Bucket[] = [];
  for (let i = 0; perOwner.some((list) => i < list.length); i++) {
    for (const list of perOwner) {
      const b = list[i];
      if (b) out.push({ ...b, index: out.length });
    }
  }
  return out;
}

function packBuckets(tensors: PlanTensor[], opts: PlanOptions): Omit<Bucket, "owner" | "slot">[] {
  const align = opts.align ?? 256;
  if (!(opts.bucketBytes >= align) || opts.bucketBytes % align !== 0) {
    throw new RangeError(`bucketBytes ${opts.bucketBytes} must be a positive multiple of ${align}`);
  }
  const ordered = [...tensors].sort((a, b) => a.file - b.file || a.offset - b.offset);
  type Packed = Omit<Bucket, "owner" | "slot">;
  const buckets: Packed[] = [];
  let cur: Packed | undefined;
  const fresh = (): Packed => {
    cur = { index: buckets.length, bytes: 0, pieces: [] };
    buckets.push(cur);
    return cur;
  };
  for (const t of ordered) {
    let done = 0;
    do {
      let b = cur ?? fresh();
      let at = Math.ceil(b.bytes / align) * align;
      if (at >= opts.bucketBytes || (at + (t.bytes - done) > opts.bucketBytes && t.bytes <= opts.bucketBytes)) {
        // Whole tensors that fit a bucket are not split; start a new bucket for them.
        b = fresh();
        at = 0;
      }
      const n = Math.min(t.bytes - done, opts.bucketBytes - at);
      b.pieces.push({
        name: t.name,
        dtype: t.dtype,
        shape: t.shape,
        bytes: t.bytes,
        slotOffset: at,
        range: [done, done + n],
        file: t.file,
        fileOffset: t.offset + done,
      });
      b.bytes = at + n;
      done += n;
    } while (done < t.bytes);
  }
  return buckets;
}
