/**
 * The Python receiver with real torch: a daemon on the host backend pushes a checkpoint into a
 * torch nn.Module through `apply_to_params(dict(model.named_parameters()))`, the README's usage.
 * Needs a python that imports torch ($TORCH_PYTHON, python3 or /usr/bin/python3); skipped
 * without one unless REQUIRE_TORCH=1, where that is a failure.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterEach, describe, expect, it } from "vitest";
import { writeSafetensors, writeTensors } from "./checkpoint-files.ts";
import { AUTH, ROOT, tempDir, torchPython } from "./helpers.ts";
import { startInProcess, testConfig } from "./in-process.ts";

const PYTHON = torchPython();
const REQUIRED = process.env.REQUIRE_TORCH === "1";

// Two linear layers; the first one's weight (512 x 1024 F32, 2 MiB) is larger than the 1 MiB
// buckets, so it arrives in pieces, which apply_to_params copies straight into place.
const ENGINE = `
import ctypes, hashlib, json, sys
import torch
from integrations.ckptd_receiver import Receiver, apply_to_params

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.ReLU(), torch.nn.Linear(512, 8))
updates, deltas = int(sys.argv[2]), sys.argv[3] == "deltas"
r = Receiver(sys.argv[1], name="torch-engine", timeout=30, partial=deltas, deltas=deltas, stage_bytes=64 << 20)
print(json.dumps({"connected": True}), flush=True)
try:
    for _ in range(updates):
        summary = r.receive(apply_to_params(dict(model.named_parameters())))
        params = {n: {"sha256": hashlib.sha256(ctypes.string_at(p.data_ptr(), p.numel() * p.element_size())).hexdigest(),
                      "requiresGrad": p.requires_grad, "isLeaf": p.is_leaf} for n, p in model.named_parameters()}
        print(json.dumps({"summary": summary, "params": params}), flush=True)
finally:
    r.close()
model(torch.ones(2, 1024)).sum().backward()
print(json.dumps({"trainable": all(p.grad is not None for p in model.parameters())}), flush=True)
`;

const cleanup: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

/** Runs the engine; resolves `connected` once its receiver holds the daemon's buffers. */
function startEngine(python: string, socket: string, updates = 1, deltas = false) {
  const args = ["-c", ENGINE, socket, String(updates), deltas ? "deltas" : "whole"];
  const proc: ChildProcess = spawn(python, args, { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"] });
  cleanup.push(() => {
    proc.kill();
  });
  const lines: Record<string, unknown>[] = [];
  let stderr = "";
  let buffered = "";
  let onConnected: () => void = () => {};
  const connected = new Promise<void>((resolve) => {
    onConnected = resolve;
  });
  proc.stdout?.on("data", (chunk: Buffer) => {
    buffered += chunk.toString();
    const parts = buffered.split("\n");
    buffered = parts.pop() ?? "";
    for (const line of parts) {
      const msg = JSON.parse(line) as Record<string, unknown>;
      lines.push(msg);
      if (msg.connected) onConnected();
    }
  });
  proc.stderr?.on("data", (chunk: Buffer) => {
    stderr += chunk.toString();
  });
  const exited = new Promise<number | null>((resolve) => proc.on("exit", (code) => resolve(code)));
  const failed = exited.then((code) => {
    throw new Error(`the engine exited with ${code}:\n${stderr}`);
  });
  failed.catch(() => {});
  return { connected: Promise.race([connected, failed]), exited, lines, stderr: () => stderr };
}

/** A daemon on the host backend (one GPU, 1 MiB buckets), and a POST to it. */
async function start() {
  const config = testConfig({
    hostDevices: 1,
    registerRoots: ["/dev/shm", tmpdir()],
    bucketBytes: 1 << 20,
    bucketSlots: 3,
    receiverTimeoutMs: 10_000,
  });
  const { stateDir } = config;
  const daemon = await startInProcess(config);
  cleanup.push(() => daemon.stop());
  const api = async (path: string, body: unknown) => {
    const res = await fetch(`http://127.0.0.1:${daemon.port}${path}`, {
      method: "POST",
      headers: { ...AUTH, "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    return { status: res.status, body: (await res.json()) as Record<string, unknown> };
  };
  return { daemon, api, stateDir };
}

describe.skipIf(PYTHON === undefined && !REQUIRED)("the Python receiver in a torch engine", () => {
  it("loads an update into an nn.Module whose parameters require grad, byte for byte", async () => {
    if (PYTHON === undefined) throw new Error("REQUIRE_TORCH=1, but no python here imports torch");
    const { api, stateDir } = await start();

    const dir = tempDir();
    cleanup.push(() => rmSync(dir, { recursive: true }));
    const tensors = writeSafetensors(`${dir}/model.safetensors`, [
      { name: "0.weight", dtype: "F32", shape: [512, 1024] },
      { name: "0.bias", dtype: "F32", shape: [512] },
      { name: "2.weight", dtype: "F32", shape: [8, 512] },
      { name: "2.bias", dtype: "F32", shape: [8] },
    ]);
    expect((await api("/v1/checkpoints", { name: "m", dir })).status).toBe(201);

    const engine = startEngine(PYTHON, `${stateDir}/sockets/gpu-0.sock`);
    await engine.connected;
    const update = await api("/v1/updates", { checkpoint: "m" });
    expect(update.body.error).toBeUndefined();
    expect(update.body.state).toBe("succeeded");
    expect(await engine.exited, engine.stderr()).toBe(0);

    const result = engine.lines.find((l) => "summary" in l) as {
      summary: { update: string; buckets: number; tensors: number; bytes: number; unknown: string[] };
      params: Record<string, { sha256: string; requiresGrad: boolean; isLeaf: boolean }>;
    };
    expect(result.summary).toMatchObject({ update: "u-1", tensors: 4, unknown: [] });
    expect(result.summary.buckets).toBeGreaterThan(2); // 0.weight came in pieces
    expect(result.summary.bytes).toBe(tensors.reduce((n, t) => n + t.bytes.byteLength, 0));
    expect(result.params).toEqual(
      Object.fromEntries(
        tensors.map((t) => [
          t.name,
          { sha256: createHash("sha256").update(t.bytes).digest("hex"), requiresGrad: true, isLeaf: true },
        ]),
      ),
    );
    expect(engine.lines.at(-1)).toEqual({ trainable: true });
  });

  it("patches a parameter with a delta, forward and back (atomically), byte for byte", async () => {
    if (PYTHON === undefined) throw new Error("REQUIRE_TORCH=1, but no python here imports torch");
    const { daemon, api, stateDir } = await start();
    const dir = tempDir();
    cleanup.push(() => rmSync(dir, { recursive: true }));
    const specs = [
      { name: "0.weight", dtype: "F32", shape: [512, 1024] },
      { name: "0.bias", dtype: "F32", shape: [512] },
      { name: "2.weight", dtype: "F32", shape: [8, 512] },
      { name: "2.bias", dtype: "F32", shape: [8] },
    ];
    const v1 = writeSafetensors(`${dir}/m1.safetensors`, specs);
    // m@2: 1% of 0.weight's elements change (a delta), 2.weight all of it (too small for one).
    const v2 = v1.map((t) => ({ ...t, bytes: Buffer.from(t.bytes) }));
    const [w, , small] = v2.map((t) => t.bytes);
    if (!w || !small) throw new Error("the model has four tensors");
    for (let i = 0; i < w.length / 4; i += 100) w.writeFloatLE(i * 0.5, i * 4);
    small.fill(7);
    writeTensors(`${dir}/m2.safetensors`, v2);
    expect((await api("/v1/checkpoints", { name: "m", files: [`${dir}/m1.safetensors`] })).status).toBe(201);
    expect((await api("/v1/checkpoints", { name: "m", files: [`${dir}/m2.safetensors`] })).status).toBe(201);
    await expect.poll(() => daemon.registry.get("m@2").delta?.tensors.size, { timeout: 5000 }).toBe(1);

    const engine = startEngine(PYTHON, `${stateDir}/sockets/gpu-0.sock`, 3, true);
    await engine.connected;
    const steps = [];
    // The last one atomic: staged (the delta too), then committed in one batch.
    for (const [checkpoint, cutover] of [
      ["m@1", "direct"],
      ["m@2", "direct"],
      ["m@1", "atomic"],
    ]) {
      const res = await api("/v1/updates", { checkpoint, cutover });
      expect(res.body.state, JSON.stringify(res.body.error)).toBe("succeeded");
      steps.push(res.body);
    }
    expect(await engine.exited, engine.stderr()).toBe(0);
    expect(steps.map((s) => (s.deltas as { tensors: number }).tensors)).toEqual([0, 1, 1]);
    expect(steps[2]).toMatchObject({ cutover: "atomic", atomic: { committed: 1 } });
    const summaries = engine.lines
      .filter((l) => "summary" in l)
      .map((l) => l.summary as { window_seconds: number | null });
    expect(summaries.map((s) => s.window_seconds === null)).toEqual([true, true, false]);
    const sha = (ts: { bytes: Uint8Array }[]) => ts.map((t) => createHash("sha256").update(t.bytes).digest("hex"));
    const got = engine.lines
      .filter((l) => "params" in l)
      .map((l) => Object.values(l.params as Record<string, { sha256: string }>).map((p) => p.sha256));
    expect(got).toEqual([sha(v1), sha(v2), sha(v1)]);
  });
});
