/**
 * Host-to-device bandwidth through the daemon's own path (ffi -> libckpt), the number that
 * bounds every update. Usage: node --import tsx bench/h2d.ts [--gib 4] [--backend cuda]
 * Copies one pinned region of that size to device 0, 10 times after a warm-up, checks
 * sampled bytes after the last copy, and prints bytes, seconds (median), GB/s and #wrong.
 */

import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { openBackend, viewMemory } from "../ffi/index.ts";

const { values } = parseArgs({
  options: { gib: { type: "string", default: "4" }, backend: { type: "string", default: "cuda" } },
});
const bytes = Math.round(Number(values.gib) * 2 ** 30);
const libDir = fileURLToPath(new URL("../cuda-lib/build/", import.meta.url));
const { context: ctx } = await openBackend(values.backend as "cuda" | "host", libDir);

const mem = await ctx.hostAlloc(bytes);
const buf = await ctx.bufAlloc(0, bytes);
const stream = ctx.streamCreate(0);
const event = ctx.eventCreate(0);

// Sample windows (start, middle, end) carry a pattern that must arrive intact.
const WINDOW = 1 << 20;
const windows = [0, Math.floor(bytes / 2 / WINDOW) * WINDOW, bytes - WINDOW];
for (const [w, offset] of windows.entries()) {
  const view = viewMemory(mem.address + BigInt(offset), WINDOW);
  for (let i = 0; i < WINDOW; i++) view[i] = (i * 131 + w * 7 + 1) & 0xff;
}

const ranges = new BigUint64Array([mem.address, 0n, BigInt(bytes)]);
async function copyOnce(): Promise<number> {
  const t0 = performance.now();
  ctx.h2dAsync(stream, buf, ranges);
  ctx.eventRecord(event, stream);
  await ctx.eventWait(event, -1);
  return (performance.now() - t0) / 1000;
}

await copyOnce();
const times: number[] = [];
for (let i = 0; i < 10; i++) times.push(await copyOnce());
times.sort((a, b) => a - b);
const median = ((times[4] as number) + (times[5] as number)) / 2;

let wrong = 0;
for (const [w, offset] of windows.entries()) {
  const out = new Uint8Array(WINDOW);
  await ctx.bufRead(buf, offset, out);
  for (let i = 0; i < WINDOW; i++) if (out[i] !== ((i * 131 + w * 7 + 1) & 0xff)) wrong++;
}
const device = ctx.deviceInfo(0).name;
console.log(
  JSON.stringify({
    what: "h2d via ffi",
    device,
    bytes,
    seconds: median,
    gbps: bytes / median / 1e9,
    min: times[0],
    max: times[9],
    wrong,
  }),
);

ctx.eventDestroy(event);
await ctx.streamDestroy(stream);
await ctx.bufFree(buf);
await ctx.hostFree(mem);
await ctx.destroy();
if (wrong > 0) process.exit(1);
