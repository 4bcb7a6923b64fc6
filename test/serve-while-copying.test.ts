import pino from "pino";
import { expect, it } from "vitest";
import { defaults } from "../daemon/config/index.ts";
import { startDaemon } from "../daemon/daemon.ts";
import { nodeRuntime } from "../daemon/runtime/node.ts";
import { tempDir } from "./helpers.ts";

it("answers HTTP while a long copy runs on the data plane", async () => {
  const config = {
    ...defaults({}),
    port: 0,
    backend: "host" as const,
    stateDir: tempDir(),
    uploadDir: tempDir("ckptd-test-", "/dev/shm"),
  };
  const libDir = new URL("../cuda-lib/build/", import.meta.url).pathname;
  const daemon = await startDaemon({
    config,
    runtime: nodeRuntime,
    log: pino({ level: "silent" }),
    nodeId: "t",
    libDir,
  });
  const ctx = daemon.context;
  const len = 256 << 20;
  const mem = await ctx.hostAlloc(len);
  const buf = await ctx.bufAlloc(0, len);
  const stream = ctx.streamCreate(0);
  const event = ctx.eventCreate(0);
  ctx.h2dAsync(
    stream,
    buf,
    new BigUint64Array(Array.from({ length: 24 }, () => [mem.address, 0n, BigInt(len)]).flat()),
  );
  ctx.eventRecord(event, stream);
  let copied = false;
  const waiting = ctx.eventWait(event, -1).then(() => {
    copied = true;
  });
  const res = await fetch(`http://127.0.0.1:${daemon.port}/v1/healthz`);
  expect(await res.json()).toEqual({ ok: true });
  expect(copied).toBe(false);
  await waiting;
  ctx.eventDestroy(event);
  await ctx.streamDestroy(stream);
  await ctx.bufFree(buf);
  await ctx.hostFree(mem);
  await daemon.stop();
});
