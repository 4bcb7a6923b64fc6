/**
 * Verifying an update's bytes where they landed: each bucket, once on a GPU, is hashed there
 * chunk by chunk (ckpt_buf_hash, a kernel on that GPU; C threads on the host backend) and
 * compared with the chunk hashes of what it should hold, before its engines are told of it.
 * A version's chunk hashes are computed once, from its pinned memory, and checked against its
 * registered tensor hashes, so that what the GPU is compared with is what was registered; a
 * delta's, when the delta is made (deltas/derive.ts).
 */
import { CKPT_HASH_CHUNK, type Context, type DeviceBuffer } from "../../ffi/index.ts";
import type { CheckpointVersion } from "../checkpoints/registry.ts";
import type { Chosen } from "../deltas/choose.ts";
import { DaemonError } from "../errors.ts";
import { at } from "./buffers.ts";
import type { Bucket, BucketPiece } from "./plan.ts";

/** The chunk hashes of the bytes a bucket piece's tensor (or delta) holds, all of them; undefined: none known. */
export type Expected = (p: BucketPiece) => BigUint64Array | undefined;

const hex = (h: bigint) => h.toString(16).padStart(16, "0");

/** What each piece should hash to: its tensor's chunks, or its delta's (forward or back). */
export function expectedOf(chunks: Map<string, BigUint64Array>, deltas: Map<string, Chosen>): Expected {
  return (p) => {
    if (!p.delta) return chunks.get(p.name);
    const c = deltas.get(p.name);
    return c && (c.back ? c.delta.hashes.back : c.delta.hashes.forward);
  };
}

/**
 * The version's chunk hashes per tensor, computed from its pinned memory on `threads` threads
 * the first time (then kept on the version). Throws naming the first tensor whose bytes no
 * longer hash as registered: its pinned memory changed since.
 */
export async function versionChunks(
  ctx: Context,
  version: CheckpointVersion,
  threads: number,
): Promise<Map<string, BigUint64Array>> {
  if (version.chunks) return version.chunks;
  const ranges = new BigUint64Array(version.tensors.length * 2);
  version.tensors.forEach((t, i) => {
    ranges[2 * i] = at(version.pinned, t.file).mem.address + BigInt(t.offset);
    ranges[2 * i + 1] = BigInt(t.bytes);
  });
  const { hashes, chunks } = await ctx.chunkHashes(ranges, threads);
  const out = new Map<string, BigUint64Array>();
  let k = 0;
  version.tensors.forEach((t, i) => {
    const n = Math.ceil(t.bytes / CKPT_HASH_CHUNK);
    const got = hex(hashes[i] as bigint);
    if (got !== t.hash) {
      throw new DaemonError(
        "update_failed",
        `verification: tensor ${t.name} of ${version.id} hashes ${got} in pinned memory, not ${t.hash} as registered: its memory changed since`,
      );
    }
    out.set(t.name, chunks.subarray(k, k + n));
    k += n;
  });
  version.chunks = out;
  return out;
}

/**
 * Hashes bucket b in its slot on one GPU (`slot`, the buffer there) and compares every chunk
 * with `expected`; throws naming the GPU, the bucket, the tensor and the bytes that differ.
 * A piece must start on a chunk of its tensor (the planner cuts there).
 */
export async function verifyBucket(
  ctx: Context,
  slot: DeviceBuffer,
  gpu: number,
  b: Bucket,
  expected: Expected,
  threads: number,
): Promise<void> {
  const ranges = new BigUint64Array(b.pieces.length * 3);
  b.pieces.forEach((p, i) => {
    if (p.range[0] % CKPT_HASH_CHUNK !== 0) {
      throw new Error(
        `bucket ${b.index} holds ${p.name} from byte ${p.range[0]}, not a chunk's start: it cannot be verified`,
      );
    }
    ranges[3 * i + 1] = BigInt(p.slotOffset);
    ranges[3 * i + 2] = BigInt(p.range[1] - p.range[0]);
  });
  const got = await ctx.bufChunkHashes([slot], ranges, threads);
  let k = 0;
  for (const p of b.pieces) {
    const want = expected(p);
    const first = p.range[0] / CKPT_HASH_CHUNK;
    const n = Math.ceil((p.range[1] - p.range[0]) / CKPT_HASH_CHUNK);
    if (!want) throw new Error(`bucket ${b.index}: no chunk hashes are known for ${p.name}`);
    for (let c = 0; c < n; c++) {
      const a = got[k + c] as bigint;
      const e = want[first + c];
      if (a === e) continue;
      const from = p.range[0] + c * CKPT_HASH_CHUNK;
      const what = p.delta ? `the delta of ${p.name}` : `tensor ${p.name}`;
      throw new DaemonError(
        "update_failed",
        `verification failed on GPU ${gpu}: bucket ${b.index}, ${what}, bytes [${from}, ${Math.min(from + CKPT_HASH_CHUNK, p.range[1])}) hash ${hex(a)} there, not ${e === undefined ? "(none)" : hex(e)}`,
        { gpu, bucket: b.index, tensor: p.name, offset: from },
      );
    }
    k += n;
  }
}
