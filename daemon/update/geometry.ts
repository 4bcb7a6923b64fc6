/**
 * The bucket geometry of a daemon: how many slot buffers each GPU has and how large they are.
 * Pure; fixed at start, and every daemon of a multi-daemon update must have the same one.
 */
import { CKPT_HASH_CHUNK } from "../../ffi/constants.ts";

/** Every GPU gets at least this many slots of its own, so its copies overlap its engines' reads. */
export const MIN_SLOTS_PER_GPU = 2;

export interface GeometryOptions {
  gpus: number;
  /** Configured slots (bucketSlots), raised to MIN_SLOTS_PER_GPU x gpus when lower. */
  bucketSlots: number;
  /** Configured cap on a bucket's size (bucketBytes). */
  bucketBytes: number;
  /** What one GPU's slots may take in all (bucketMemoryBytes). */
  bucketMemoryBytes: number;
  /** Free memory of each GPU now. */
  freeBytes: number[];
}

export interface Geometry {
  slots: number;
  slotBytes: number;
}

/**
 * The slots, and the bucket size: the configured cap, lowered (in whole MiB, at least one) so
 * that one GPU's slots fit in bucketMemoryBytes and in a tenth of the freest GPU's free memory,
 * and to whole 64 KiB hash chunks, so that buckets cut tensors where verification can check them.
 */
export function geometry(o: GeometryOptions): Geometry {
  const slots = Math.max(o.bucketSlots, MIN_SLOTS_PER_GPU * o.gpus);
  const free = Math.min(...o.freeBytes);
  const fit = Math.floor(Math.min(free / 10, o.bucketMemoryBytes) / slots / (1 << 20)) * (1 << 20);
  const chunks = Math.floor(Math.min(o.bucketBytes, fit) / CKPT_HASH_CHUNK) * CKPT_HASH_CHUNK;
  return { slots, slotBytes: Math.max(1 << 20, chunks) };
}
