/**
 * Bucket planning: a pure function from a checkpoint's tensors to the buckets an update
 * moves. Each bucket is copied host-to-device by one GPU (the one whose share of host memory
 * holds those bytes), then broadcast to all; a tensor larger than a bucket is split.
 */

export interface PlanTensor {
  name: string;
  dtype: string;
  shape: number[];
  bytes: number;
  /** Index of the file holding it, and its byte offset there. */
  file: number;
  offset: number;
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
}

export interface Bucket {
  index: number;
  /** Local GPU index that copies this bucket from host memory. */
  owner: number;
  bytes: number;
  pieces: BucketPiece[];
}

export interface PlanOptions {
  /** Bucket capacity in bytes. */
  bucketBytes: number;
  /** Number of local GPUs; file f belongs to GPU f mod gpus. */
  gpus: number;
  /** Offsets inside a bucket are aligned to this (bytes, power of two). */
  align?: number;
}

/**
 * Splits the tensors into buckets, in file order per owner, never mixing owners within a
 * bucket, then interleaves the owners' buckets (GPU 0, GPU 1, ..., GPU 0, ...) so that every
 * GPU's host-to-device engine has work in flight at once.
 */
export function planBuckets(tensors: PlanTensor[], opts: PlanOptions): Bucket[] {
  const perOwner = Array.from({ length: opts.gpus }, (_, owner) =>
    packBuckets(
      tensors.filter((t) => t.file % opts.gpus === owner),
      opts,
    ),
  );
  const out: Bucket[] = [];
  for (let i = 0; perOwner.some((list) => i < list.length); i++) {
    for (const list of perOwner) {
      const b = list[i];
      if (b) out.push({ ...b, index: out.length });
    }
  }
  return out;
}

function packBuckets(tensors: PlanTensor[], opts: PlanOptions): Bucket[] {
  const align = opts.align ?? 256;
  if (!(opts.bucketBytes >= align) || opts.bucketBytes % align !== 0) {
    throw new RangeError(`bucketBytes ${opts.bucketBytes} must be a positive multiple of ${align}`);
  }
  if (!Number.isInteger(opts.gpus) || opts.gpus < 1) throw new RangeError(`gpus ${opts.gpus} must be >= 1`);
  const ordered = [...tensors].sort((a, b) => a.file - b.file || a.offset - b.offset);
  const buckets: Bucket[] = [];
  let cur: Bucket | undefined;
  const fresh = (owner: number): Bucket => {
    cur = { index: buckets.length, owner, bytes: 0, pieces: [] };
    buckets.push(cur);
    return cur;
  };
  for (const t of ordered) {
    const owner = t.file % opts.gpus;
    let done = 0;
    do {
      let b = cur && cur.owner === owner ? cur : fresh(owner);
      let at = Math.ceil(b.bytes / align) * align;
      if (at >= opts.bucketBytes || (at + (t.bytes - done) > opts.bucketBytes && t.bytes <= opts.bucketBytes)) {
        // Whole tensors that fit a bucket are not split; start a new bucket for them.
        b = fresh(owner);
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
