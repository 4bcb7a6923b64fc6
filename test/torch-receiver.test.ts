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
import { type Config, defaults } from "../daemon/config/index.ts";
import { writeSafetensors } from "./checkpoint-files.ts";
import { AUTH, ROOT, tempDir, testCredentials, torchPython } from "./helpers.ts";
import { startInProcess } from "./in-process.ts";

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
r = Receiver(sys.argv[1], name="torch-engine", timeout=30)
print(json.dumps({"connected": True}), flush=True)
try:
    summary = r.receive(apply_to_params(dict(model.named_parameters())))
finally:
    r.close()
params = {n: {"sha256": hashlib.sha256(ctypes.string_at(p.data_ptr(), p.numel() * p.element_size())).hexdigest(),
              "requiresGrad": p.requires_grad, "isLeaf": p.is_leaf} for n, p in model.named_parameters()}
model(torch.ones(2, 1024)).sum().backward()
print(json.dumps({"summary": summary, "params": params,
                  "trainable": all(p.grad is not None for p in model.parameters())}), flush=True)
`;

const cleanup: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

/** Runs the engine; resolves `connected` once its receiver holds the daemon's buffers. */
function startEngine(python: string, socket: string) {
  const proc: ChildProcess = spawn(python, ["-c", ENGINE, socket], { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"] });
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

describe.skipIf(PYTHON === undefined && !REQUIRED)("the Python receiver in a torch engine", () => {
  it("loads an update into an nn.Module whose parameters require grad, byte for byte", async () => {
    if (PYTHON === undefined) throw new Error("REQUIRE_TORCH=1, but no python here imports torch");
    const stateDir = tempDir();
    const config: Config = {
      ...defaults({}),
      port: 0,
      backend: "host",
      hostDevices: 1,
      stateDir,
      uploadDir: tempDir("ckptd-test-", "/dev/shm"),
      registerRoots: ["/dev/shm", tmpdir()],
      bucketBytes: 1 << 20,
      bucketSlots: 3,
      receiverTimeoutMs: 10_000,
      ...testCredentials(),
    };
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
      trainable: boolean;
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
    expect(result.trainable).toBe(true);
  });
});
