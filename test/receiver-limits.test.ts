/** A receiver that breaks the protocol is cut off, named once in the log, and stalls nothing. */
import { createConnection, type Socket } from "node:net";
import pino from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { type Config, defaults } from "../daemon/config/index.ts";
import { type Daemon, startDaemon } from "../daemon/daemon.ts";
import { nodeRuntime } from "../daemon/runtime/node.ts";
import { MAX_INBOX, MAX_INVALID, MAX_LINE_BYTES } from "../daemon/update/receivers.ts";
import { AUTH, tempDir, testCredentials } from "./helpers.ts";

const LIB_DIR = new URL("../cuda-lib/build/", import.meta.url).pathname;
const running: Daemon[] = [];
const sockets: Socket[] = [];

afterEach(async () => {
  for (const s of sockets.splice(0)) s.destroy();
  for (const d of running.splice(0)) await d.stop();
});

async function start() {
  const stateDir = tempDir();
  const config: Config = {
    ...defaults({}),
    port: 0,
    backend: "host",
    stateDir,
    uploadDir: tempDir("ckptd-test-", "/dev/shm"),
    ioThreads: 2,
    ...testCredentials(),
  };
  const logs: { msg: string; receiver?: string; reason?: string }[] = [];
  const log = pino({ level: "info" }, { write: (line: string) => logs.push(JSON.parse(line)) });
  const daemon = await startDaemon({ config, runtime: nodeRuntime, log, nodeId: "t", libDir: LIB_DIR });
  running.push(daemon);
  return { daemon, logs, socket: `${stateDir}/sockets/gpu-0.sock` };
}

/** Connects to an engine socket; `closed` resolves when the daemon hangs up. */
async function connect(path: string) {
  const socket = createConnection(path);
  sockets.push(socket);
  socket.on("error", () => undefined); // writes after the daemon hung up
  await new Promise<void>((resolve) => socket.once("connect", () => resolve()));
  const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
  return { socket, closed };
}

const cutOff = (logs: { msg: string }[]) => logs.filter((l) => l.msg === "receiver broke the protocol; disconnected");

describe("receivers that break the protocol", () => {
  it("disconnects one writing 64 MiB without a newline, while healthz keeps answering", async () => {
    const { daemon, logs, socket: path } = await start();
    const { socket, closed } = await connect(path);
    let isClosed = false;
    void closed.then(() => {
      isClosed = true;
    });
    const chunk = Buffer.alloc(1 << 20, "x");
    let written = 0;
    const writing = (async () => {
      for (let i = 0; i < 64 && !isClosed; i++) {
        if (!socket.write(chunk)) await new Promise((r) => socket.once("drain", r).once("close", r));
        written += chunk.byteLength;
      }
    })();
    // healthz, timed, while the bytes flow.
    const latencies: number[] = [];
    while (!isClosed) {
      const t = performance.now();
      const res = await fetch(`http://127.0.0.1:${daemon.port}/v1/healthz`, { headers: AUTH });
      expect(res.status).toBe(200);
      latencies.push(performance.now() - t);
    }
    await writing;
    await closed;
    expect(latencies.length).toBeGreaterThan(0);
    expect(Math.max(...latencies)).toBeLessThan(1000);
    expect(written).toBeLessThan(64 << 20); // cut off well before the end
    expect(cutOff(logs)).toEqual([
      expect.objectContaining({
        receiver: expect.stringMatching(new RegExp(`^connection #\\d+ \\(pid ${process.pid}, GPU 0, no hello yet\\)$`)),
        reason: `sent a line of over ${MAX_LINE_BYTES} bytes`,
      }),
    ]);
    // The daemon still takes receivers.
    const next = await connect(path);
    next.socket.write(`${JSON.stringify({ op: "hello", protocol: 1, pid: 42, name: "next" })}\n`);
    await new Promise((r) => next.socket.once("data", r));
    const status = await (await fetch(`http://127.0.0.1:${daemon.port}/v1/status`, { headers: AUTH })).json();
    expect(status.gpus[0].receivers).toEqual([`next (pid ${process.pid}, GPU 0)`]);
  });

  it("cuts off one sending garbage after a few invalid messages, naming it in one log line", async () => {
    const { logs, socket: path } = await start();
    const { socket, closed } = await connect(path);
    socket.write(`${JSON.stringify({ op: "hello", protocol: 1, pid: 4242, name: "noisy" })}\n`);
    await new Promise((r) => socket.once("data", r));
    socket.write("not json\n".repeat(1000));
    await closed;
    expect(cutOff(logs)).toEqual([
      expect.objectContaining({
        receiver: `noisy (pid ${process.pid}, GPU 0)`,
        reason: `sent ${MAX_INVALID} invalid messages (not JSON with an "op"), the first: not json`,
      }),
    ]);
    // Nothing else about it but its arrival: not a line per message.
    const about = logs.filter((l) => l.receiver?.startsWith("noisy"));
    expect(about.map((l) => l.msg)).toEqual(["receiver connected", "receiver broke the protocol; disconnected"]);
  });

  it("takes fewer invalid messages than the bound, and cuts off a flood of messages nobody waits for", async () => {
    const { logs, socket: path } = await start();
    const { socket, closed } = await connect(path);
    socket.write(`${JSON.stringify({ op: "hello", protocol: 1, pid: 7, name: "chatty" })}\n`);
    await new Promise((r) => socket.once("data", r));
    socket.write("{}\n".repeat(MAX_INVALID - 1));
    await new Promise((r) => setTimeout(r, 100));
    expect(cutOff(logs)).toEqual([]);
    socket.write(`${JSON.stringify({ op: "ack", update: "u-0", bucket: 0 })}\n`.repeat(MAX_INBOX + 1));
    await closed;
    expect(cutOff(logs)).toEqual([
      expect.objectContaining({
        receiver: `chatty (pid ${process.pid}, GPU 0)`,
        reason: `sent over ${MAX_INBOX} messages nobody waited for`,
      }),
    ]);
  });
});
