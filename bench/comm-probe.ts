/**
 * Two processes, one GPU each, one communicator over both through libckpt: the smallest
 * check that collectives across processes work on a machine (NCCL on CUDA, TCP on the host
 * backend). Usage: node --import tsx bench/comm-probe.ts [cuda|host]
 */
import { type ChildProcess, spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { type Backend, Library, libraryPath } from "../ffi/index.ts";

const backend = (process.argv[2] ?? "cuda") as Backend;
const idHex = process.argv[3];
const role = idHex ? "rank 1" : "rank 0";
const lib = fileURLToPath(new URL("../cuda-lib/build/", import.meta.url));
const ctx = await new Library(libraryPath(lib, backend)).createContext();
let child: ChildProcess | undefined;
let id = idHex ? Buffer.from(idHex, "hex") : undefined;
if (!id) {
  id = Buffer.from(ctx.commIdNew());
  // The other rank sees the second GPU as its device 0.
  child = spawn(process.execPath, ["--import", "tsx", fileURLToPath(import.meta.url), backend, id.toString("hex")], {
    stdio: "inherit",
    env: { ...process.env, CUDA_VISIBLE_DEVICES: "1" },
  });
}
const comm = await ctx.commInit(id, 2, idHex ? 1 : 0, [0]);
const buf = await ctx.bufAlloc(0, 1 << 20);
const stream = ctx.streamCreate(0);
const event = ctx.eventCreate(0);
ctx.broadcast(comm, 0, [buf], [stream], 0, 1 << 20);
ctx.eventRecord(event, stream);
console.log(`${role}: communicator up, broadcast ${(await ctx.eventWait(event, 10_000)) ? "done" : "timed out"}`);
await ctx.commDestroy(comm);
ctx.eventDestroy(event);
await ctx.streamDestroy(stream);
await ctx.bufFree(buf);
await ctx.destroy();
if (child) await new Promise((resolve) => child.on("exit", resolve));
