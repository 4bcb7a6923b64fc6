/** Update buffers on the host backend: what is made, what receivers get, draining and freeing. */
import { existsSync, truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { type Context, openBackend } from "../../ffi/index.ts";
import { tempDir } from "../../test/helpers.ts";
import { LIB_DIR } from "../../test/in-process.ts";
import { at, Buffers } from "./buffers.ts";

async function context(hostDevices: number): Promise<Context> {
  return (await openBackend("host", LIB_DIR, { hostDevices })).context;
}

describe("at", () => {
  it("returns the item, and names the index and the range when it is outside", () => {
    expect(at(["a", "b"], 1)).toBe("b");
    expect(() => at(["a", "b"], 2)).toThrow(new RangeError("index 2 outside 0..1"));
    expect(() => at([], 0)).toThrow("index 0 outside 0..-1");
  });
});

describe("Buffers", () => {
  it("makes the slots of each GPU and a communicator only over several GPUs", async () => {
    const ctx = await context(2);
    const one = await Buffers.open(ctx, 1, 3, 1 << 20);
    const two = await Buffers.open(ctx, 2, 2, 1 << 20);
    expect(one.comm).toBeUndefined();
    expect(two.comm).toBeDefined();
    expect(two.generation).toBeGreaterThan(one.generation);
    expect(one.gpus).toHaveLength(1);
    expect(one.gpus[0]?.slots).toHaveLength(3);
    expect(one.gpus[0]?.copied).toHaveLength(3);
    expect(one.gpus[0]?.landed).toHaveLength(3);
    expect(two.gpus.map((p) => p.slots.length)).toEqual([2, 2]);
    await one.close();
    await two.close();
    expect(two.gpus).toEqual([]);
    expect(two.comm).toBeUndefined();
    // Destroying the context fails while anything made from it is alive.
    await ctx.destroy();
  });

  it("hands receivers one mappable file per slot of their GPU, none for a GPU it lacks", async () => {
    const ctx = await context(2);
    const b = await Buffers.open(ctx, 2, 2, 1 << 20);
    const handles = b.handles(1);
    expect(handles.map(({ slot, bytes, kind }) => ({ slot, bytes, kind }))).toEqual([
      { slot: 0, bytes: 1 << 20, kind: "host" },
      { slot: 1, bytes: 1 << 20, kind: "host" },
    ]);
    for (const h of handles) {
      expect(h.path).toMatch(/^\/\S+$/);
      expect(h.path).not.toContain("\0");
      expect(existsSync(h.path as string)).toBe(true);
    }
    expect(new Set(handles.map((h) => h.path)).size).toBe(2);
    expect(b.handles(5)).toEqual([]);
    await b.close();
    await ctx.destroy();
  });

  it("frees what it made when a GPU cannot be set up", async () => {
    const ctx = await context(1);
    await expect(Buffers.open(ctx, 2, 2, 1 << 20)).rejects.toThrow();
    await ctx.destroy();
  });

  it("drains settled work, and reports work that failed", async () => {
    const ctx = await context(1);
    const b = await Buffers.open(ctx, 1, 2, 1 << 20);
    expect(await b.drain(1000)).toBe(true);
    const path = at(b.gpus, 0);
    const file = join(tempDir(), "weights");
    writeFileSync(file, Buffer.alloc(8192, 1));
    const mem = await ctx.fileMap(file);
    await ctx.hostRegister(mem.address, mem.len, true);
    truncateSync(file, 0);
    ctx.h2dAsync(path.copy, at(path.slots, 1), new BigUint64Array([mem.address, 0n, 4096n]));
    ctx.eventRecord(at(path.copied, 1), path.copy);
    expect(await b.drain(1000)).toBe(false);
    await ctx.hostUnregister(mem);
    await ctx.fileUnmap(mem);
    await b.close();
    await ctx.destroy();
  });
});
