/**
 * Inputs the fuzzer (bench/fuzz.ts) found to crash the daemon or answer 500, each now a clear
 * 4xx or refusal with the daemon still serving.
 */
import { writeFileSync } from "node:fs";
import { createConnection } from "node:net";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import type { Daemon } from "../daemon/daemon.ts";
import { AUTH, tempDir } from "./helpers.ts";
import { apiOf, startInProcess, testConfig } from "./in-process.ts";

const running: Daemon[] = [];
afterEach(async () => {
  for (const d of running.splice(0)) await d.stop();
});

async function start() {
  const stateDir = tempDir();
  const daemon = await startInProcess(testConfig({ stateDir }));
  running.push(daemon);
  return { daemon, api: apiOf(daemon.port), socket: join(stateDir, "sockets", "gpu-0.sock") };
}

/** Sends one line on an engine socket; resolves with the first line back (or "" on hang-up). */
function sendLine(path: string, line: string): Promise<string> {
  return new Promise((resolve) => {
    const s = createConnection(path);
    let got = "";
    s.on("data", (d) => {
      got += d;
      if (got.includes("\n")) {
        s.destroy();
        resolve(got.split("\n")[0] as string);
      }
    });
    s.on("error", () => resolve(got));
    s.on("close", () => resolve(got));
    s.write(`${line}\n`);
  });
}

describe("hostile input", () => {
  it("refuses a hello whose protocol is an object that cannot become a string, and stays up", async () => {
    const { api, socket } = await start();
    const answer = await sendLine(socket, JSON.stringify({ op: "hello", protocol: { toString: 0 }, name: "x" }));
    expect(JSON.parse(answer)).toEqual({ op: "refused", reason: 'protocol {"toString":0} is not 1' });
    expect((await api("GET", "/v1/healthz")).status).toBe(200);
  });

  it("answers 400 for a safetensors shape nested 100000 deep, naming the tensor without printing it all", async () => {
    const { api } = await start();
    const dir = tempDir("ckptd-test-", "/dev/shm");
    const shape = `${"[".repeat(100_000)}1${"]".repeat(100_000)}`;
    const json = Buffer.from(`{"w":{"dtype":"F32","shape":${shape},"data_offsets":[0,4]}}`);
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.byteLength));
    writeFileSync(join(dir, "deep.safetensors"), Buffer.concat([len, json, Buffer.alloc(4)]));
    const res = await api("POST", "/v1/checkpoints", { name: "deep", files: [join(dir, "deep.safetensors")] });
    expect(res.status).toBe(400);
    expect(res.body.error.code).toBe("invalid_safetensors");
    expect(res.body.error.message).toBe(
      `${join(dir, "deep.safetensors")}: tensor "w": shape [... nested too deeply to print] is not a list of non-negative integers`,
    );
  });

  it("answers 415 for bytes of an upload sent as JSON or CBOR, and takes them as octet-stream after", async () => {
    const { daemon, api } = await start();
    const created = await api("POST", "/v1/uploads", { name: "p", tensors: [{ name: "w", dtype: "F32", shape: [1] }] });
    const put = (type: string | undefined, body: BodyInit) =>
      fetch(`http://127.0.0.1:${daemon.port}/v1/uploads/${created.body.id}/tensors/w`, {
        method: "PUT",
        headers: type ? { ...AUTH, "content-type": type } : AUTH,
        body,
      });
    for (const type of ["application/json", "application/cbor"]) {
      const res = await put(type, type === "application/json" ? '{"a":1}' : new Uint8Array([0xa0]));
      expect(res.status).toBe(415);
      expect((await res.json()).error).toEqual({
        code: "unsupported_media_type",
        message: `uploaded bytes are sent as application/octet-stream, not "${type}"`,
      });
    }
    expect((await put("application/octet-stream", new Uint8Array(4))).status).toBe(200);
  });

  it("keeps a declared tensor named __proto__ like any other", async () => {
    const { daemon, api } = await start();
    const tensors = [
      { name: "__proto__", dtype: "F32", shape: [1] },
      { name: "w", dtype: "F32", shape: [1] },
    ];
    const created = await api("POST", "/v1/uploads", { name: "p", tensors });
    for (const t of tensors) {
      const res = await fetch(`http://127.0.0.1:${daemon.port}/v1/uploads/${created.body.id}/tensors/${t.name}`, {
        method: "PUT",
        headers: { ...AUTH, "content-type": "application/octet-stream" },
        body: new Uint8Array(4),
      });
      expect(res.status).toBe(200);
    }
    const committed = await api("POST", `/v1/uploads/${created.body.id}/commit`);
    expect(committed.status).toBe(201);
    expect(committed.body.tensorCount).toBe(2);
  });
});
