/**
 * Pinned host memory that outlives versions: what a dropped version held (copied files,
 * pulls) comes back here instead of being unpinned, and the next version of a similar size
 * takes it, so an RL loop that keeps a few versions pins nothing new in steady state. Pinning
 * fresh memory costs about 0.4 s per GB on an H200 host (cudaHostAlloc, serialized by the
 * driver); taking a pooled block costs nothing. The pool's blocks count against the
 * pinned-memory budget, and the registry trims them when a version needs the room.
 */
import type { Context, HostMemory } from "../../ffi/index.ts";

/** A block is reused for a request of `len` when it is at most this much larger. */
export const SLACK = (len: number) => Math.floor(len / 8) + (64 << 20);

export interface PoolStats {
  /** Bytes in blocks waiting to be reused. */
  bytes: number;
  blocks: number;
  /** Requests served from the pool, and those that pinned fresh memory. */
  reused: number;
  fresh: number;
}

export class PinnedPool {
  /** Free blocks, smallest first. */
  private readonly free: HostMemory[] = [];
  private readonly stats = { reused: 0, fresh: 0 };

  constructor(private readonly ctx: Context) {}

  /** The index of the block `take(len)` would reuse among `free`, or -1. */
  private fit(free: readonly HostMemory[], len: number): number {
    const k = free.findIndex((b) => b.len >= len);
    const b = free[k];
    return b && b.len <= len + SLACK(len) ? k : -1;
  }

  /** A pinned block of at least `len` bytes: a pooled one that fits closely, else fresh. */
  async take(len: number): Promise<HostMemory> {
    const k = this.fit(this.free, len);
    if (k >= 0) {
      this.stats.reused++;
      return this.free.splice(k, 1)[0] as HostMemory;
    }
    this.stats.fresh++;
    try {
      return await this.ctx.hostAlloc(len);
    } catch {
      await this.trim(0); // the pool's blocks may be what stands in the way
      return this.ctx.hostAlloc(len);
    }
  }

  /** Pins blocks until `count` of those pooled would serve take(len); how many it pinned. */
  async stock(len: number, count: number): Promise<number> {
    const rest = [...this.free];
    let have = 0;
    for (let k = this.fit(rest, len); k >= 0 && have < count; k = this.fit(rest, len)) {
      rest.splice(k, 1);
      have++;
    }
    for (let i = have; i < count; i++) this.give(await this.ctx.hostAlloc(len));
    return count - have;
  }

  /** Takes a block back for reuse. Its contents stay as they were until it is taken again. */
  give(block: HostMemory): void {
    const k = this.free.findIndex((b) => b.len > block.len);
    this.free.splice(k < 0 ? this.free.length : k, 0, block);
  }

  /**
   * Unpins pooled blocks, largest first but not those that requests of `sizes` would take,
   * until the others hold at most `keep` bytes.
   */
  async trimKeeping(sizes: readonly number[], keep: number): Promise<void> {
    const spared = new Set<HostMemory>();
    const rest = [...this.free];
    for (const len of sizes) {
      const k = this.fit(rest, len);
      if (k >= 0) spared.add(rest.splice(k, 1)[0] as HostMemory);
    }
    let others = rest.reduce((n, b) => n + b.len, 0);
    for (let i = this.free.length - 1; i >= 0 && others > keep; i--) {
      const b = this.free[i] as HostMemory;
      if (spared.has(b)) continue;
      this.free.splice(i, 1);
      others -= b.len;
      await this.ctx.hostFree(b);
    }
  }

  /** Unpins pooled blocks (largest first) until at most `keep` bytes stay pooled. */
  async trim(keep: number): Promise<void> {
    while (this.bytes() > keep) {
      const b = this.free.pop() as HostMemory;
      await this.ctx.hostFree(b);
    }
  }

  bytes(): number {
    return this.free.reduce((n, b) => n + b.len, 0);
  }

  status(): PoolStats {
    return { bytes: this.bytes(), blocks: this.free.length, ...this.stats };
  }

  /** Unpins everything pooled (shutdown). */
  close(): Promise<void> {
    return this.trim(0);
  }
}
