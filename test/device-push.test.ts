/**
 * Pushes from a trainer's device memory (POST /v1/pushes through ckptd.trainer.push_cuda) on
 * the host backend: the trainer's tensors live in shared-memory stand-ins for two GPUs, the
 * daemon opens their handles and copies device-to-host into pooled pinned memory, hashing the
 * buffers where they are (on the device); a bad handle, a tensor past its buffer or a device the daemon lacks fail
 * naming it, leaving nothing registered or pinned. Real torch, as torch-receiver.test.ts.
 */
import { spawn } from "node:child_process";
import { createHash, randomFillSync } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { ckptHash } from "./checkpoint-files.ts";
import { ADMIN_TOKEN, ROOT, tempDir, torchPython, within } from "./helpers.ts";
import { apiOf, startInProcess, testConfig } from "./in-process.ts";

const PYTHON = torchPython();
const REQUIRED = process.env.REQUIRE_TORCH === "1";

const cleanup: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

// Tensors on two stand-in devices; the big one spans several of the daemon's 256 MiB batches.
const TRAINER = `
import hashlib, json, sys
import torch
from integrations.ckptd.trainer import HostDeviceMemory, push_cuda

url, token, dev0, dev1 = sys.argv[1:5]
g = torch.Generator().manual_seed(1)
m0, m1 = HostDeviceMemory(300 << 20, dev0), HostDeviceMemory(1 << 20, dev1)
tensors = {"big": m0.tensor(torch.bfloat16, [300, 1 << 19]), "bias": m1.tensor(torch.float32, [1000]),
           "empty": m1.tensor(torch.float32, [0])}
tensors["big"].copy_(torch.randn(300, 1 << 19, generator=g).to(torch.bfloat16))
tensors["bias"].copy_(torch.arange(1000, dtype=torch.float32))
def raw(t):
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
summary = push_cuda(url, "policy", tensors, token=token, memory=[m0, m1])
out = {"first": summary, "sha": {k: hashlib.sha256(raw(t)).hexdigest() for k, t in tensors.items()}}
errors = []
try:
    push_cuda(url, "policy", {"cpu": torch.zeros(3)}, token=token, memory=[m0])
except ValueError as e:
    errors.append(str(e))
out["errors"] = errors
print(json.dumps(out))
`;

describe.skipIf(!PYTHON && !REQUIRED)("pushes from device memory (host backend, real torch)", () => {
  it("copies a trainer's tensors out of its device memory into a version, bit for bit", async () => {
    const config = testConfig({ hostDevices: 2, bucketSlots: 4, maxVersions: 2 });
    const d = await startInProcess(config);
    cleanup.push(() => d.stop());
    const api = apiOf(d.port);
    const gpus = (await api("GET", "/v1/status")).body.gpus.map((g: { uuid: string }) => g.uuid);
    const proc = spawn(PYTHON as string, ["-c", TRAINER, `http://127.0.0.1:${d.port}`, ADMIN_TOKEN, ...gpus], {
      cwd: ROOT,
    });
    let stdout = "";
    let stderr = "";
    proc.stdout.on("data", (b) => (stdout += b));
    proc.stderr.on("data", (b) => (stderr += b));
    expect(await new Promise((r) => proc.on("close", r)), stderr).toBe(0);
    const out = JSON.parse(stdout.trim().split("\n").at(-1) as string);
    expect(out.first).toMatchObject({ id: "policy@1", state: "ready", origin: "push" });
    const v = d.registry.get("policy@1");
    const view = Buffer.from(v.pinned[0]?.mem.view() as Uint8Array);
    expect(v.tensors.map((t) => t.name)).toEqual(["big", "bias", "empty"]);
    for (const t of v.tensors) {
      const bytes = view.subarray(t.offset, t.offset + t.bytes);
      expect(createHash("sha256").update(bytes).digest("hex"), t.name).toBe(out.sha[t.name]);
    }
    expect(out.errors).toEqual(["tensor 'cpu' is on cpu, not in device memory (use a StagingArea)"]);
  }, 60_000);
});

// Reads 1 MiB from stdin into a memfd sealed at its size, prints its /proc path, and waits.
const HOLDER = `
import fcntl, os, sys, time
data = sys.stdin.buffer.read()
fd = os.memfd_create("ckptd-test", os.MFD_ALLOW_SEALING)
os.write(fd, data)
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
print(f"/proc/{os.getpid()}/fd/{fd}", flush=True)
time.sleep(600)
`;

describe("pushes from device memory (API)", () => {
  /**
   * A daemon, and a "device buffer" of 1 MiB of random bytes: a sealed memfd, as the host
   * backend exports one, held by a python process (Node cannot make memfds) until the test ends.
   */
  async function rig(extra = {}) {
    const d = await startInProcess(testConfig({ hostDevices: 1, bucketSlots: 2, ...extra }));
    cleanup.push(() => d.stop());
    const api = apiOf(d.port);
    const device = (await api("GET", "/v1/status")).body.gpus[0].uuid as string;
    const bytes = randomFillSync(Buffer.alloc(1 << 20));
    const holder = spawn("python3", ["-c", HOLDER], { stdio: ["pipe", "pipe", "inherit"] });
    cleanup.push(async () => {
      holder.kill();
    });
    holder.stdin.write(bytes);
    holder.stdin.end();
    const path = await new Promise<string>((resolve) => holder.stdout.once("data", (b) => resolve(String(b).trim())));
    const buffer = {
      kind: "host",
      device,
      len: bytes.byteLength,
      pid: holder.pid as number,
      handle: Buffer.from(`${path}\0`).toString("base64"),
    };
    return { d, api, bytes, buffer };
  }
  const tensor = (name: string, offset: number, n: number) => ({ name, dtype: "U8", shape: [n], buffer: 0, offset });

  it("makes a version of the tensors' bytes, hashed as the registry hashes files", async () => {
    const { d, api, bytes, buffer } = await rig();
    const res = await api("POST", "/v1/pushes", {
      name: "m",
      buffers: [buffer],
      tensors: [tensor("a", 100, 5000), tensor("b", 0, 100)],
    });
    expect(res.status, JSON.stringify(res.body)).toBe(201);
    expect(res.body).toMatchObject({ id: "m@1", state: "ready", origin: "push" });
    const v = d.registry.get("m");
    const view = Buffer.from(v.pinned[0]?.mem.view() as Uint8Array);
    const [a, b] = v.tensors;
    expect(Buffer.compare(view.subarray(a?.offset, (a?.offset ?? 0) + 5000), bytes.subarray(100, 5100))).toBe(0);
    expect(Buffer.compare(view.subarray(b?.offset, (b?.offset ?? 0) + 100), bytes.subarray(0, 100))).toBe(0);
    expect(a?.hash).toBe(await ckptHash(bytes.subarray(100, 5100)));
    // The same bytes registered from a file hash the same: the version is as good as a registered one.
    const dir = tempDir("ckptd-test-", "/dev/shm");
    writeFileSync(join(dir, "m.safetensors"), view);
    const again = await api("POST", "/v1/checkpoints", { name: "n", files: [join(dir, "m.safetensors")] });
    expect(again.status).toBe(201);
    expect(d.registry.get("n").tensors.map((t) => t.hash)).toEqual(v.tensors.map((t) => t.hash));
  });

  it("makes a version on a base from the tensors pushed and the base's others, and refuses a base that does not fit", async () => {
    const { d, api, bytes, buffer } = await rig();
    const full = await api("POST", "/v1/pushes", {
      name: "m",
      buffers: [buffer],
      tensors: [tensor("a", 0, 4096), tensor("b", 4096, 8192), tensor("c", 12288, 100)],
    });
    expect(full.status, JSON.stringify(full.body)).toBe(201);
    // m@2: b from another part of the buffer, a and c as in m@1.
    const delta = await api("POST", "/v1/pushes", {
      name: "m",
      base: "m@1",
      buffers: [buffer],
      tensors: [tensor("b", 500_000, 8192)],
    });
    expect(delta.status, JSON.stringify(delta.body)).toBe(201);
    const [v1, v2] = [d.registry.get("m@1"), d.registry.get("m@2")];
    expect(v2.tensors.map((t) => t.name)).toEqual(["a", "b", "c"]);
    const view = Buffer.from(v2.pinned[0]?.mem.view() as Uint8Array);
    const at = (name: string) =>
      v2.tensors.find((t) => t.name === name) as { offset: number; bytes: number; hash: string };
    const content = (name: string) => view.subarray(at(name).offset, at(name).offset + at(name).bytes);
    expect(Buffer.compare(content("a"), bytes.subarray(0, 4096))).toBe(0);
    expect(Buffer.compare(content("b"), bytes.subarray(500_000, 508_192))).toBe(0);
    expect(Buffer.compare(content("c"), bytes.subarray(12288, 12388))).toBe(0);
    expect(at("a").hash).toBe(v1.tensors[0]?.hash);
    expect(at("b").hash).toBe(await ckptHash(bytes.subarray(500_000, 508_192)));
    expect(at("c").hash).toBe(await ckptHash(bytes.subarray(12288, 12388)));

    const refused = async (body: object) =>
      (await api("POST", "/v1/pushes", { name: "m", buffers: [buffer], ...body })).body.error;
    expect(await refused({ base: "m@9", tensors: [tensor("b", 0, 8192)] })).toMatchObject({ code: "not_found" });
    expect((await refused({ base: "m@1", tensors: [tensor("z", 0, 16)] })).message).toBe(
      'tensor "z" is not in the base m@1',
    );
    expect((await refused({ base: "m@1", tensors: [tensor("b", 0, 16)] })).message).toMatch(
      /^tensor "b" is U8 \[16\] where the base m@1 has U8 \[8192\]: push it whole, without a base$/,
    );
    expect(
      (await refused({ base: "m@1", tensors: [tensor("b", 0, 8192)], part: { id: "s", index: 0, of: 2 } })).message,
    ).toBe("a sharded push cannot name a base");
    // Refused before anything was reserved: only the two versions are listed.
    expect((await api("GET", "/v1/checkpoints")).body.checkpoints.map((c: { id: string }) => c.id)).toEqual([
      "m@1",
      "m@2",
    ]);
  });

  it("pushes on a base that maxVersions drops once the new version is ready", async () => {
    const { d, api, buffer } = await rig({ maxVersions: 1 });
    const t = [tensor("a", 0, 4096), tensor("b", 4096, 8192)];
    expect((await api("POST", "/v1/pushes", { name: "m", buffers: [buffer], tensors: t })).status).toBe(201);
    const delta = await within(
      5000,
      api("POST", "/v1/pushes", { name: "m", base: "m@1", buffers: [buffer], tensors: [t[1]] }),
    );
    expect(delta.status, JSON.stringify(delta.body)).toBe(201);
    expect(d.registry.list().map((v) => v.id)).toEqual(["m@2"]);
  });

  it("refuses a tensor past its buffer, a buffer of a device it lacks, or one it cannot open, keeping nothing", async () => {
    const { api, buffer } = await rig();
    const past = await api("POST", "/v1/pushes", {
      name: "m",
      buffers: [buffer],
      tensors: [tensor("a", 1 << 19, (1 << 19) + 1)],
    });
    expect(past.status).toBe(400);
    expect(past.body.error.message).toMatch(
      /^tensor "a" \(\d+ bytes at offset 524288\) does not fit in buffer 0 of 1048576 bytes$/,
    );
    const elsewhere = await api("POST", "/v1/pushes", {
      name: "m",
      buffers: [{ ...buffer, device: "GPU-00000000-0000-0000-0000-000000000000" }],
      tensors: [tensor("a", 0, 1)],
    });
    expect(elsewhere.status).toBe(400);
    expect(elsewhere.body.error.message).toMatch(
      /^buffer 0 is on device GPU-0+-0000-0000-0000-0+, which this daemon does not have/,
    );
    const dir = tempDir("ckptd-test-", "/dev/shm");
    writeFileSync(join(dir, "plain"), Buffer.alloc(1 << 20));
    const file = await api("POST", "/v1/pushes", {
      name: "m",
      buffers: [{ ...buffer, handle: Buffer.from(`${join(dir, "plain")}\0`).toString("base64") }],
      tensors: [tensor("a", 0, 1)],
    });
    expect(file.status).toBe(422);
    expect(file.body.error.message).toMatch(/is not \/proc\/\d+\/fd\/<n> of its exporter/);
    const long = await api("POST", "/v1/pushes", {
      name: "m",
      buffers: [{ ...buffer, handle: Buffer.alloc(129, 47).toString("base64") }],
      tensors: [tensor("a", 0, 1)],
    });
    expect(long.status).toBe(400);
    expect(long.body.error.message).toBe("buffer 0: a handle is at most 128 bytes, not 129");
    const gone = await api("POST", "/v1/pushes", {
      name: "m",
      buffers: [{ ...buffer, handle: Buffer.from("/proc/1/fd/999999\0").toString("base64") }],
      tensors: [tensor("a", 0, 1)],
    });
    expect(gone.status).toBe(422);
    expect(gone.body.error.code).toBe("push_failed");
    expect(gone.body.error.message).toMatch(
      /^m@2: buffer 0 \(a host handle of process \d+ on HOST-.*\) cannot be opened: /,
    );
    const list = (await api("GET", "/v1/checkpoints")).body;
    expect(list.pinnedBytes).toBe(0);
    expect(list.checkpoints.map((c: { state: string }) => c.state)).toEqual(["failed", "failed"]);
    expect((await api("GET", "/v1/status")).body.checkpoints.pool).toMatchObject({ bytes: 0 });
  });

  it("fails every part of a sharded push when one never comes, registering nothing", async () => {
    const { api, buffer } = await rig();
    const part = (index: number, extra = {}) => ({
      name: "m",
      buffers: [buffer],
      tensors: [tensor(`t${index}`, 0, 16)],
      part: { id: "step-1", index, of: 3, waitMs: 300, ...extra },
    });
    const first = api("POST", "/v1/pushes", part(0));
    await new Promise((r) => setTimeout(r, 50));
    const again = await api("POST", "/v1/pushes", part(0));
    expect(again.status).toBe(409);
    expect(again.body.error.message).toBe('part 0 of push step-1 of "m" was given already');
    const other = await api("POST", "/v1/pushes", part(1, { of: 2 }));
    expect(other.body.error.message).toBe("push step-1 has 3 parts, not 2");
    const past = await api("POST", "/v1/pushes", part(3));
    expect(past.body.error.message).toBe("part 3 of 3: parts count from 0");
    const second = api("POST", "/v1/pushes", part(2));
    const [a, b] = await Promise.all([first, second]);
    for (const res of [a, b]) {
      expect(res.status).toBe(400);
      expect(res.body.error.message).toBe(
        'push step-1 of "m": part 1 of 3 did not come within 300 ms; nothing was registered',
      );
    }
    expect((await api("GET", "/v1/checkpoints")).body.checkpoints).toEqual([]);
  });

  it("refuses a push larger than the pinned-memory budget leaves", async () => {
    const { api, buffer } = await rig({ pinnedBudgetBytes: 4096 });
    const res = await api("POST", "/v1/pushes", { name: "m", buffers: [buffer], tensors: [tensor("a", 0, 8192)] });
    expect(res.status).toBe(507);
    expect(res.body.error.message).toMatch(/^pushing \d+ bytes would exceed the pinned-memory budget/);
  });
});

// One rank of a sharded trainer: its own tensors on its own stand-in device.
const RANK = `
import hashlib, json, sys
import torch
from integrations.ckptd.trainer import HostDeviceMemory, push_cuda

url, token, device, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
m = HostDeviceMemory(8 << 20, device)
t = m.tensor(torch.bfloat16, [1024, 1024])
t.copy_(torch.full((1024, 1024), float(rank + 1)))
summary = push_cuda(url, "sharded", {f"layer.{rank}.weight": t}, token=token, memory=[m], part=(rank, 2, "step-7"))
print(json.dumps({"summary": summary, "sha": hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()}))
`;

describe.skipIf(!PYTHON && !REQUIRED)("sharded pushes (host backend, real torch)", () => {
  it("makes one version of two ranks' parts, each rank answered with it", async () => {
    const d = await startInProcess(testConfig({ hostDevices: 2, bucketSlots: 4 }));
    cleanup.push(() => d.stop());
    const api = apiOf(d.port);
    const gpus = (await api("GET", "/v1/status")).body.gpus.map((g: { uuid: string }) => g.uuid);
    const rank = (r: number) =>
      new Promise<{ code: unknown; out: string; err: string }>((resolve) => {
        const proc = spawn(
          PYTHON as string,
          ["-c", RANK, `http://127.0.0.1:${d.port}`, ADMIN_TOKEN, gpus[r], String(r)],
          {
            cwd: ROOT,
          },
        );
        let out = "";
        let err = "";
        proc.stdout.on("data", (b) => (out += b));
        proc.stderr.on("data", (b) => (err += b));
        proc.on("close", (code) => resolve({ code, out, err }));
      });
    const results = await Promise.all([rank(0), rank(1)]);
    for (const r of results) expect(r.code, r.err).toBe(0);
    const outs = results.map((r) => JSON.parse(r.out.trim().split("\n").at(-1) as string));
    expect(outs.map((o) => o.summary.id)).toEqual(["sharded@1", "sharded@1"]);
    const v = d.registry.get("sharded@1");
    expect(v.files.map((f) => f.path)).toEqual(["push/0", "push/1"]);
    for (const [r, name] of ["layer.0.weight", "layer.1.weight"].entries()) {
      const t = v.tensors.find((x) => x.name === name);
      const view = Buffer.from(v.pinned[t?.file ?? -1]?.mem.view() as Uint8Array);
      const bytes = view.subarray(t?.offset, (t?.offset ?? 0) + (t?.bytes ?? 0));
      expect(createHash("sha256").update(bytes).digest("hex"), name).toBe(outs[r].sha);
    }
  }, 60_000);
});
