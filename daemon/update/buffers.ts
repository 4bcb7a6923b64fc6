/**
 * One set of update buffers (see DataPath, which keeps it between updates): per GPU a copy
 * stream, a broadcast stream, `slots` bucket buffers shared with the engines, and events; one
 * communicator over the local GPUs.
 */
import type { Comm, Context, DeviceBuffer, Event, Stream } from "../../ffi/index.ts";

export interface SlotHandle {
  slot: number;
  bytes: number;
  kind: "cuda" | "host";
  /** CUDA: the cudaIpcMemHandle_t as hex. */
  handle?: string;
  /** Host backend: a file to mmap. */
  path?: string;
}

export interface GpuPath {
  copy: Stream;
  bcast: Stream;
  slots: DeviceBuffer[];
  /** Completion of the host-to-device copy into each slot (on the owner). */
  copied: Event[];
  /** Completion of each slot's bytes on this GPU (after the broadcast). */
  landed: Event[];
}

/** items[i], which the caller knows exists (slot and GPU indices are always in range). */
export function at<T>(items: readonly T[], i: number): T {
  const x = items[i];
  if (x === undefined) throw new RangeError(`index ${i} outside 0..${items.length - 1}`);
  return x;
}

let generations = 0;

export class Buffers {
  readonly generation = ++generations;
  readonly gpus: GpuPath[] = [];
  comm?: Comm;

  private constructor(
    readonly ctx: Context,
    readonly slots: number,
    readonly slotBytes: number,
  ) {}

  /** Allocates `slots` slots on each of `gpus` local GPUs (see geometry); on failure frees what it made. */
  static async open(ctx: Context, gpus: number, slots: number, slotBytes: number): Promise<Buffers> {
    const b = new Buffers(ctx, slots, slotBytes);
    try {
      for (let g = 0; g < gpus; g++) await b.addGpu(g);
      if (gpus > 1) {
        const devices = Array.from({ length: gpus }, (_, g) => g);
        b.comm = await ctx.commInit(ctx.commIdNew(), gpus, 0, devices);
      }
    } catch (err) {
      await b.close();
      throw err;
    }
    return b;
  }

  private async addGpu(g: number): Promise<void> {
    const { ctx } = this;
    const copy = ctx.streamCreate(g);
    let bcast: Stream;
    try {
      bcast = ctx.streamCreate(g);
    } catch (err) {
      await ctx.streamDestroy(copy);
      throw err;
    }
    const path: GpuPath = { copy, bcast, slots: [], copied: [], landed: [] };
    this.gpus.push(path);
    for (let s = 0; s < this.slots; s++) {
      path.slots.push(await ctx.bufAlloc(g, this.slotBytes));
      path.copied.push(ctx.eventCreate(g));
      path.landed.push(ctx.eventCreate(g));
    }
  }

  /** What a receiver on `gpu` needs to map the slots. */
  handles(gpu: number): SlotHandle[] {
    return (this.gpus[gpu]?.slots ?? []).map((buf, slot) => {
      const h = this.ctx.bufExport(buf);
      const kind = this.ctx.backend;
      if (kind === "cuda") {
        return { slot, bytes: buf.len, kind, handle: Buffer.from(h.data.subarray(0, 64)).toString("hex") };
      }
      const end = h.data.indexOf(0);
      return {
        slot,
        bytes: buf.len,
        kind,
        path: Buffer.from(h.data.subarray(0, end < 0 ? undefined : end)).toString(),
      };
    });
  }

  /** Waits for every slot's last work (bounded); false if it did not finish in time or failed. */
  async drain(timeoutMs: number): Promise<boolean> {
    // One wait at a time: every stream's work is ordered, so the last events settle last.
    // An event that reports a failure means its stream is broken: the path must be made anew.
    for (const e of this.gpus.flatMap((p) => [...p.copied, ...p.landed])) {
      if (!(await this.ctx.eventWait(e, timeoutMs).catch(() => false))) return false;
    }
    return true;
  }

  async close(): Promise<void> {
    const { ctx } = this;
    if (this.comm) await ctx.commDestroy(this.comm);
    this.comm = undefined;
    for (const p of this.gpus) {
      await ctx.streamDestroy(p.copy);
      await ctx.streamDestroy(p.bcast);
      for (const e of [...p.copied, ...p.landed]) ctx.eventDestroy(e);
      for (const b of p.slots) await ctx.bufFree(b);
    }
    this.gpus.length = 0;
  }
}
