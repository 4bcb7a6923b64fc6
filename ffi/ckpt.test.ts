import { mkdtempSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CKPT_EFAULT, CkptError, type Context, Library, libraryPath, openBackend, viewMemory } from "./index.ts";

const LIB_DIR = fileURLToPath(new URL("../cuda-lib/build/", import.meta.url));
let ctx: Context;

beforeAll(async () => {
  ctx = await new Library(libraryPath(LIB_DIR, "host")).createContext({ hostDevices: 2 });
});
afterAll(async () => {
  await ctx.destroy();
});

function fill(address: bigint, len: number, seed: number): Uint8Array {
  const view = viewMemory(address, len);
  for (let i = 0; i < len; i++) view[i] = (i * 31 + seed) & 0xff;
  return view;
}

describe("ffi over the host backend", () => {
  it("reports the backend and its simulated devices", () => {
    expect(ctx.backend).toBe("host");
    const devices = ctx.devices();
    expect(devices.map((d) => d.index)).toEqual([0, 1]);
    expect(devices[0]?.uuid).toMatch(/^HOST-/);
    expect(devices[0]?.totalBytes).toBeGreaterThan(0);
  });

  it("copies ranges from pinned memory to a buffer, bit for bit", async () => {
    const mem = await ctx.hostAlloc(1 << 20);
    const src = fill(mem.address, mem.len, 7);
    const buf = await ctx.bufAlloc(1, 1 << 20);
    const stream = ctx.streamCreate(1);
    const event = ctx.eventCreate(1);
    // Two ranges, swapped halves: checks every offset arithmetic.
    const half = BigInt(mem.len / 2);
    ctx.h2dAsync(stream, buf, new BigUint64Array([mem.address, half, half, mem.address + half, 0n, half]));
    ctx.eventRecord(event, stream);
    expect(await ctx.eventWait(event, 5000)).toBe(true);
    expect(ctx.eventQuery(event)).toBe(true);
    const out = new Uint8Array(mem.len);
    await ctx.bufRead(buf, 0, out);
    expect(Buffer.compare(out.subarray(mem.len / 2), src.subarray(0, mem.len / 2))).toBe(0);
    expect(Buffer.compare(out.subarray(0, mem.len / 2), src.subarray(mem.len / 2))).toBe(0);
    ctx.eventDestroy(event);
    await ctx.streamDestroy(stream);
    await ctx.bufFree(buf);
    await ctx.hostFree(mem);
  });

  it("refuses a bad range with a typed error and queues nothing", async () => {
    const mem = await ctx.hostAlloc(4096);
    fill(mem.address, 4096, 1);
    const buf = await ctx.bufAlloc(0, 4096);
    const stream = ctx.streamCreate(0);
    const ranges = new BigUint64Array([mem.address, 0n, 100n, mem.address, 4000n, 200n]);
    let caught: unknown;
    try {
      ctx.h2dAsync(stream, buf, ranges);
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(CkptError);
    expect(caught).toMatchObject({ code: -8, status: "CKPT_ERANGE" });
    expect((caught as CkptError).detail).toMatch(/range 1 .*past the end of the buffer/);
    await ctx.streamDestroy(stream);
    const out = new Uint8Array(100);
    await ctx.bufRead(buf, 0, out);
    expect(out.every((b) => b === 0)).toBe(true);
    await ctx.bufFree(buf);
    await ctx.hostFree(mem);
  });

  it("names the problem when a pointer was never pinned", async () => {
    const mem = await ctx.hostAlloc(4096);
    await ctx.hostFree(mem);
    await expect(ctx.hostFree(mem)).rejects.toMatchObject({ status: "CKPT_EINVAL", detail: /not the start of memory/ });
  });

  it("shares a buffer through an IPC handle", async () => {
    const mem = await ctx.hostAlloc(8192);
    const src = fill(mem.address, 8192, 3);
    const buf = await ctx.bufAlloc(0, 8192);
    const stream = ctx.streamCreate(0);
    const event = ctx.eventCreate(0);
    ctx.h2dAsync(stream, buf, new BigUint64Array([mem.address, 0n, 8192n]));
    ctx.eventRecord(event, stream);
    await ctx.eventWait(event, -1);
    const other = await new Library(libraryPath(LIB_DIR, "host")).createContext();
    const imported = await other.bufImport(ctx.bufExport(buf));
    const out = new Uint8Array(8192);
    await other.bufRead(imported, 0, out);
    expect(Buffer.compare(out, src)).toBe(0);
    await other.bufFree(imported);
    await other.destroy();
    ctx.eventDestroy(event);
    await ctx.streamDestroy(stream);
    await ctx.bufFree(buf);
    await ctx.hostFree(mem);
  });

  it("refuses to destroy a context with live handles, and says how many", async () => {
    const other = await new Library(libraryPath(LIB_DIR, "host")).createContext();
    const buf = await other.bufAlloc(0, 64);
    await expect(other.destroy()).rejects.toMatchObject({ status: "CKPT_EBUSY", detail: /1 handles/ });
    await other.bufFree(buf);
    await other.destroy();
  });

  it("keeps the event loop free while a long copy runs", async () => {
    const len = 256 << 20;
    const mem = await ctx.hostAlloc(len);
    const buf = await ctx.bufAlloc(0, len);
    const stream = ctx.streamCreate(0);
    const event = ctx.eventCreate(0);
    const ranges = new BigUint64Array(Array.from({ length: 16 }, () => [mem.address, 0n, BigInt(len)]).flat());
    ctx.h2dAsync(stream, buf, ranges);
    ctx.eventRecord(event, stream);
    let done = false;
    const waiting = ctx.eventWait(event, -1).then(() => {
      done = true;
    });
    let ticks = 0;
    while (!done && ticks < 5) {
      await new Promise((resolve) => setTimeout(resolve, 1));
      ticks++;
    }
    expect(done).toBe(false);
    expect(ticks).toBe(5);
    await waiting;
    ctx.eventDestroy(event);
    await ctx.streamDestroy(stream);
    await ctx.bufFree(buf);
    await ctx.hostFree(mem);
  });

  it("reads and hashes a mapped file truncated underneath with CKPT_EFAULT, not a crash", async () => {
    const dir = mkdtempSync("/dev/shm/ckpt-ffi-");
    try {
      const path = join(dir, "f");
      writeFileSync(path, new Uint8Array(64 << 10).fill(3));
      const mem = await ctx.fileMap(path);
      expect([...(await ctx.hostRead(mem, 4, 100))]).toEqual([3, 3, 3, 3]);
      truncateSync(path, 4096);
      const err = (await ctx.hostRead(mem, 8192).catch((e) => e)) as CkptError;
      expect(err).toBeInstanceOf(CkptError);
      expect(err.code).toBe(CKPT_EFAULT);
      expect(err.detail).toContain("offset 4096");
      const hashed = (await ctx.hash(new BigUint64Array([mem.address, 8192n]), 2).catch((e) => e)) as CkptError;
      expect(hashed.status).toBe("CKPT_EFAULT");
      await expect(ctx.hostRead(mem, 1, mem.len)).rejects.toThrow(RangeError);
      await ctx.fileUnmap(mem);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("backend selection", () => {
  it("falls back to the host backend without a GPU, and says why", async () => {
    const { context, reason } = await openBackend("auto", LIB_DIR);
    expect(context.backend).toBe("host");
    expect(reason).toMatch(/no GPU visible|CUDA backend unavailable/);
    await context.destroy();
  });

  it("fails when cuda is required but no GPU is usable", async () => {
    await expect(openBackend("cuda", LIB_DIR)).rejects.toThrow(/backend "cuda" was requested but/);
  });

  it("says which file is missing", async () => {
    await expect(openBackend("host", "/nonexistent")).rejects.toThrow("/nonexistent/libckpt-host.so does not exist");
  });

  it("reports NCCL as unsupported on the host backend", () => {
    expect(() => ctx.ncclVersion()).toThrow(/CKPT_EUNSUPPORTED/);
  });
});
