/**
 * Staging areas with a real torch trainer (integrations/ckptd/trainer.py's StagingArea): the
 * daemon lays out a file, the trainer writes its tensors into it through a mapping and
 * commits, each commit is a copy in pooled pinned memory that later writes cannot reach; bad
 * writes and commits fail naming what is wrong, leaving nothing registered or pinned. Needs a
 * python that imports torch, as torch-receiver.test.ts.
 */
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { readFileSync, statSync, truncateSync } from "node:fs";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { ADMIN_TOKEN, ROOT, torchPython } from "./helpers.ts";
import { apiOf, startInProcess, testConfig } from "./in-process.ts";

const PYTHON = torchPython();
const REQUIRED = process.env.REQUIRE_TORCH === "1";

const cleanup: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

async function daemon(extra = {}) {
  const config = testConfig({ hostDevices: 1, bucketSlots: 2, maxVersions: 1, ...extra });
  const d = await startInProcess(config);
  cleanup.push(() => d.stop());
  return {
    d,
    api: apiOf(d.port),
    url: `http://127.0.0.1:${d.port}`,
    uploadDir: config.uploadDir,
    stateDir: config.stateDir,
  };
}

// The trainer: a bf16 matrix and an f32 vector whose values are a function of the step.
const TRAINER = `
import hashlib, json, sys
import torch
from integrations.ckptd.trainer import StagingArea

url, token, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
def tensors(step):
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(300, 128, generator=g).to(torch.bfloat16), "b": torch.full((7,), float(step))}
def raw(t):
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bfloat16 else \\
        t.contiguous().view(torch.int16).numpy().tobytes()
area = StagingArea(url, "policy", tensors(0), token=token)
out = {"area": area.info, "steps": []}
for step in range(steps):
    ts = tensors(step)
    area.write(ts)
    summary = area.commit()
    out["steps"].append({"version": summary["id"], "sha": {k: hashlib.sha256(raw(t)).hexdigest() for k, t in ts.items()}})
    # Written after the commit: must not reach the committed version.
    area.write({"b": torch.full((7,), -1.0)})
errors = []
for bad in ({"b": torch.zeros(8)}, {"nope": torch.zeros(1)}, {"w": torch.zeros(300, 128)}):
    try:
        area.write(bad)
    except ValueError as e:
        errors.append(str(e))
out["errors"] = errors
print(json.dumps(out))
`;

/** Runs the trainer against the daemon (asynchronously: the daemon runs in this process). */
async function runTrainer(url: string, steps: number) {
  const proc = spawn(PYTHON as string, ["-c", TRAINER, url, ADMIN_TOKEN, String(steps)], { cwd: ROOT });
  let stdout = "";
  let stderr = "";
  proc.stdout.on("data", (b) => (stdout += b));
  proc.stderr.on("data", (b) => (stderr += b));
  const code = await new Promise((resolve) => proc.on("close", resolve));
  if (code !== 0) throw new Error(`trainer failed (${code}): ${stderr}`);
  return JSON.parse(stdout.trim().split("\n").at(-1) as string);
}

const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

describe.skipIf(!PYTHON && !REQUIRED)("staging areas (real torch)", () => {
  it("commits each step's tensors as a copy no later write reaches, from pooled memory", async () => {
    const { d, api, url, uploadDir } = await daemon();
    const out = await runTrainer(url, 3);
    expect(out.area.path.startsWith(uploadDir)).toBe(true);
    expect(out.steps.map((s: { version: string }) => s.version)).toEqual(["policy@1", "policy@2", "policy@3"]);
    // maxVersions 1: only the last is kept, and its bytes are the last step's, not the -1s written after.
    const v = d.registry.get("policy");
    expect(v.id).toBe("policy@3");
    const view = Buffer.from(v.pinned[0]?.mem.view() as Uint8Array);
    for (const t of v.tensors) {
      const bytes = view.subarray(t.offset, t.offset + t.bytes);
      expect(sha256(bytes), t.name).toBe(out.steps[2].sha[t.name]);
    }
    // The first two commits took the blocks stocked when the area was made, the third the first's.
    expect((await api("GET", "/v1/status")).body.checkpoints.pool).toMatchObject({ blocks: 1, fresh: 0, reused: 3 });
    expect(out.errors).toEqual([
      "tensor 'b' is F32 [8], declared F32 [7]",
      `tensor 'nope' is not declared in staging area ${out.area.id}`,
      "tensor 'w' is F32 [300, 128], declared BF16 [300, 128]",
    ]);
    expect((statSync(out.area.path).mode & 0o777).toString(8)).toBe("600");
  });
});

describe("staging areas (API)", () => {
  it("refuses what it cannot lay out or hold, leaving no file", async () => {
    const { api } = await daemon({ pinnedBudgetBytes: 1 << 20 });
    const empty = await api("POST", "/v1/staging", { name: "m", tensors: [] });
    expect(empty.status).toBe(400);
    expect(empty.body.error.message).toMatch(/at least one tensor/);
    const twice = await api("POST", "/v1/staging", {
      name: "m",
      tensors: [
        { name: "a", dtype: "F32", shape: [1] },
        { name: "a", dtype: "F32", shape: [1] },
      ],
    });
    expect(twice.body.error.message).toBe('tensor "a" is declared twice');
    const big = await api("POST", "/v1/staging", {
      name: "m",
      tensors: [{ name: "a", dtype: "F32", shape: [1 << 20] }],
    });
    expect(big.status).toBe(507);
    expect(big.body.error.message).toMatch(/^a staging area of \d+ bytes would exceed the pinned-memory budget/);
    expect((await api("GET", "/v1/staging")).body.areas).toEqual([]);
  });

  it("fails a commit of a file cut short naming it, keeps nothing pinned, and commits again once whole", async () => {
    const { d, api, stateDir } = await daemon();
    const made = await api("POST", "/v1/staging", { name: "m", tensors: [{ name: "a", dtype: "F32", shape: [4096] }] });
    expect(made.status).toBe(201);
    const { id, path, bytes } = made.body;
    truncateSync(path, 100);
    const res = await api("POST", `/v1/staging/${id}/commit`);
    expect(res.status).toBeGreaterThanOrEqual(400);
    expect(JSON.stringify(res.body.error)).toContain(path);
    expect((await api("GET", "/v1/checkpoints")).body.pinnedBytes).toBe(0);
    // The header (the first 100 bytes) is whole: at its size again, the file commits.
    truncateSync(path, bytes);
    const ok = await api("POST", `/v1/staging/${id}/commit`);
    expect(ok.status, JSON.stringify(ok.body)).toBe(201);
    expect(ok.body).toMatchObject({ id: "m@1", state: "ready", origin: "staged" });
    // In memory only: a copy of a file the area deletes is not saved to be restored.
    const saved = JSON.parse(readFileSync(join(stateDir, "registry.json"), "utf8"));
    expect(JSON.stringify(saved)).not.toContain(path);
    expect(d.registry.get("m").pinned[0]?.inPlace).toBe(false);
    expect((await api("DELETE", `/v1/staging/${id}`)).status).toBe(200);
    expect(() => statSync(path)).toThrow();
    expect((await api("POST", `/v1/staging/${id}/commit`)).status).toBe(404);
    expect(d.registry.get("m").state).toBe("ready"); // committed versions outlive their area
  });
});
