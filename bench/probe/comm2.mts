// Two processes, one GPU each, one NCCL communicator over both through libckpt (diagnostic).
import { spawnSync, spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { Library, libraryPath } from "../../ffi/index.ts";
const lib = fileURLToPath(new URL("../../cuda-lib/build/", import.meta.url));
const role = process.argv[2] ?? "a";
console.log(role, "start"); 
const ctx = await new Library(libraryPath(lib, "cuda")).createContext();
console.log(role, "ctx", ctx.deviceCount());
let idHex = process.argv[3];
let child;
if (role === "a") {
  const id = ctx.commIdNew();
  console.log("a id", Buffer.from(id).toString("hex").slice(0, 32));
  idHex = Buffer.from(id).toString("hex");
  child = spawn(process.execPath, ["--import", "tsx", fileURLToPath(import.meta.url), "b", idHex], { stdio: "inherit", env: { ...process.env, CUDA_VISIBLE_DEVICES: "1" } });
}
const comm = await ctx.commInit(Buffer.from(idHex as string, "hex"), 2, role === "a" ? 0 : 1, [0]);
console.log(role, "comm ok");
const buf = await ctx.bufAlloc(0, 1 << 20); const s = ctx.streamCreate(0); const e = ctx.eventCreate(0);
ctx.broadcast(comm, 0, [buf], [s], 0, 1 << 20); ctx.eventRecord(e, s); console.log(role, "bcast", await ctx.eventWait(e, 10000));
await ctx.commDestroy(comm); console.log(role, "done");
if (child) await new Promise((r) => child.on("exit", r));
void spawnSync;
