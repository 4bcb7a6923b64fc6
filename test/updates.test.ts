import { randomBytes } from "node:crypto";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { afterEach, describe, expect, it } from "vitest";
import { type Config, defaults } from "../daemon/config/index.ts";
import type { Daemon } from "../daemon/daemon.ts";
import { viewMemory } from "../ffi/index.ts";
import { ckptHash, type WrittenTensor, writeModel, writeSafetensors, writeTensors } from "./checkpoint-files.ts";
import { endSigned, tempDir, testCredentials, within } from "./helpers.ts";
import { apiOf, startInProcess } from "./in-process.ts";
import { type Behaviour, ReferenceReceiver } from "./reference-receiver.ts";

const cleanup: (() => Promise<void>)[] = [];

afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

async function start(overrides: Partial<Config> = {}) {
  const stateDir = tempDir();
  const config: Config = {
    ...defaults({}),
    port: 0,
    backend: "host",
    hostDevices: 2,
    stateDir,
    uploadDir: tempDir("ckptd-test-", "/dev/shm"),
    registerRoots: ["/dev/shm", tmpdir()],
    ioThreads: 2,
    bucketBytes: 1 << 20,
    bucketSlots: 3,
    receiverTimeoutMs: 2000,
    ...testCredentials(),
    ...overrides,
  };
  const daemon: Daemon = await startInProcess(config);
  cleanup.push(() => daemon.stop());
  const api = apiOf(daemon.port);
  const receiver = async (gpu: number, name: string, behaviour: Behaviour = {}) => {
    const r = new ReferenceReceiver(`${stateDir}/sockets/gpu-${gpu}.sock`, name, behaviour);
    await r.connect();
    cleanup.push(() => r.close());
    return r;
  };
  return { daemon, api, receiver };
}

/** Registers a model whose biggest tensors span several 1 MiB buckets. */
async function register(api: Awaited<ReturnType<typeof start>>["api"], name = "m"): Promise<WrittenTensor[]> {
  const dir = tempDir();
  const tensors = writeModel(dir, 2, 3, 512); // 100 x 512 bf16 = 100 KiB ... up to 1 MiB tensors
  tensors.push(...writeSafetensors(`${dir}/big.safetensors`, [{ name: "big", dtype: "F32", shape: [700, 1024] }]));
  const res = await api("POST", "/v1/checkpoints", { name, dir });
  expect(res.status).toBe(201);
  return tensors;
}

async function expectDelivered(r: ReferenceReceiver, update: string, tensors: WrittenTensor[]) {
  const got = r.hashes.get(update);
  expect(got?.size).toBe(tensors.length);
  for (const t of tensors) expect(got?.get(t.name)).toBe(await ckptHash(t.bytes));
}

/** Registers these tensors (with their bytes) as the next version of `name`. */
async function registerTensors(api: Awaited<ReturnType<typeof start>>["api"], name: string, tensors: WrittenTensor[]) {
  const path = `${tempDir()}/model.safetensors`;
  writeTensors(path, tensors);
  const res = await api("POST", "/v1/checkpoints", { name, files: [path] });
  expect(res.status, JSON.stringify(res.body)).toBe(201);
  return res.body.id as string;
}

/** The receiver's weights are exactly these tensors' bytes. */
async function expectModel(r: ReferenceReceiver, tensors: WrittenTensor[]) {
  expect(Object.fromEntries(await r.model())).toEqual(
    Object.fromEntries(await Promise.all(tensors.map(async (t) => [t.name, await ckptHash(t.bytes)]))),
  );
}

describe("updates that move only what changed", () => {
  // a spans two 1 MiB buckets; b and c are small.
  const specs = [
    { name: "a", dtype: "F32", shape: [600, 1024] },
    { name: "b", dtype: "BF16", shape: [64, 64] },
    { name: "c", dtype: "F32", shape: [1000] },
  ];
  const version = (bytes: (t: (typeof specs)[number], i: number) => Uint8Array): WrittenTensor[] =>
    specs.map((t, i) => ({ ...t, bytes: bytes(t, i), file: "" }));
  const fresh = (t: (typeof specs)[number]) =>
    randomBytes(t.shape.reduce((x, y) => x * y, 1) * (t.dtype === "F32" ? 4 : 2));

  it("sends a receiver only the tensors it lacks, says what it left out, and rolls back bit for bit", async () => {
    const { api, receiver } = await start({ hostDevices: 1 });
    const v1 = version(fresh);
    expect(await registerTensors(api, "m", v1)).toBe("m@1");
    const r = await receiver(0, "engine", { partial: true });
    const first = (await api("POST", "/v1/updates", { checkpoint: "m" })).body;
    expect(first.skipped).toEqual({ tensors: 0, bytes: 0 });
    expect(first.receivers[0]).toMatchObject({ state: "applied", holds: "m@1" });
    await expectModel(r, v1);

    // m@2 changes b only: b moves, a and c stay where they are.
    const v2 = version((t, i) => (i === 1 ? fresh(t) : (v1[i] as WrittenTensor).bytes));
    expect(await registerTensors(api, "m", v2)).toBe("m@2");
    const second = (await api("POST", "/v1/updates", { checkpoint: "m" })).body;
    expect(second.state).toBe("succeeded");
    expect(second.skipped).toEqual({ tensors: 2, bytes: 600 * 1024 * 4 + 1000 * 4 });
    expect(second.progress.bytes).toBeLessThan(1 << 20);
    expect(r.seen.find((m) => m.op === "begin" && m.update === "u-2")).toMatchObject({ tensors: 1, skipped: 2 });
    expect([...(r.hashes.get("u-2")?.keys() ?? [])]).toEqual(["b"]);
    await expectModel(r, v2);
    const status = (await api("GET", "/v1/status")).body;
    expect(status.gpus[0].holdings).toEqual([
      { receiver: expect.stringMatching(/^engine /), holds: "m@2", partial: true },
    ]);

    // The same version again moves nothing; going back to m@1 moves b back.
    const again = (await api("POST", "/v1/updates", { checkpoint: "m@2" })).body;
    expect(again).toMatchObject({ state: "succeeded", progress: { buckets: 0, bytes: 0 }, skipped: { tensors: 3 } });
    const back = (await api("POST", "/v1/updates", { checkpoint: "m@1", verify: true })).body;
    expect(back).toMatchObject({ state: "succeeded", skipped: { tensors: 2 } });
    await expectModel(r, v1);
  });

  it("keeps a version an engine holds: a delete is refused naming the engine, maxVersions evicts around it", async () => {
    const { api, receiver } = await start({ hostDevices: 1, maxVersions: 1 });
    const v1 = version(fresh);
    await registerTensors(api, "m", v1);
    await receiver(0, "engine", { partial: true });
    expect((await api("POST", "/v1/updates", { checkpoint: "m@1" })).body.state).toBe("succeeded");
    const refused = await api("DELETE", "/v1/checkpoints/m@1");
    expect(refused.status).toBe(409);
    expect(refused.body.error.message).toMatch(/m@1 is held by receiver engine \(pid \d+, GPU 0\)/);
    // m@2 is the one maxVersions keeps, but the engine holds m@1: it stays, and rollback to it works.
    await registerTensors(api, "m", version(fresh));
    const ids = async () => (await api("GET", "/v1/checkpoints")).body.checkpoints.map((c: { id: string }) => c.id);
    expect(await ids()).toEqual(["m@1", "m@2"]);
    // Once the engine holds m@2, m@1 goes.
    expect((await api("POST", "/v1/updates", { checkpoint: "m@2" })).body.state).toBe("succeeded");
    await expect.poll(ids, { timeout: 2000 }).toEqual(["m@2"]);
  });

  it("sends everything when a receiver holds nothing known: one that just connected, or after a failed update", async () => {
    const { api, receiver } = await start({ hostDevices: 2 });
    const v1 = version(fresh);
    await registerTensors(api, "m", v1);
    const r0 = await receiver(0, "engine-0", { partial: true });
    expect((await api("POST", "/v1/updates", { checkpoint: "m" })).body.state).toBe("succeeded");
    // A second engine connects (on the other GPU): buckets reach every GPU, so it all moves.
    const r1 = await receiver(1, "engine-1", { partial: true });
    const both = (await api("POST", "/v1/updates", { checkpoint: "m" })).body;
    expect(both).toMatchObject({ state: "succeeded", skipped: { tensors: 0 } });
    await expectModel(r1, v1);
    // An update that fails part-way leaves what they hold unknown: the next one moves it all.
    const v2 = version((t, i) => (i === 0 ? fresh(t) : (v1[i] as WrittenTensor).bytes));
    await registerTensors(api, "m", v2);
    r1.behaviour = { failAt: 1 };
    const failed = (await api("POST", "/v1/updates", { checkpoint: "m" })).body;
    expect(failed.error.details.receivers.map((x: { holds: unknown }) => x.holds)).toEqual([null, null]);
    r1.behaviour = {};
    // Back to m@1, which they held before: engine-0 took part of m@2's a, so all of it moves.
    const after = (await api("POST", "/v1/updates", { checkpoint: "m@1" })).body;
    expect(after).toMatchObject({ state: "succeeded", skipped: { tensors: 0 } });
    await expectModel(r0, v1);
    await expectModel(r1, v1);
    // A receiver that does not say partial (every receiver before it could) gets everything every time.
    const whole = await receiver(0, "whole");
    const withWhole = (await api("POST", "/v1/updates", { checkpoint: "m@2" })).body;
    expect(withWhole).toMatchObject({ state: "succeeded", skipped: { tensors: 0 } });
    await expectModel(whole, v2);
  });
});

describe("updates that send deltas", () => {
  // big: 16 MiB, its 4% delta (1.3 MiB) spans two 1 MiB buckets; mid: 2.4 MB; small: below a delta's minimum.
  const specs = [
    { name: "big", dtype: "F32", shape: [4096, 1024] },
    { name: "mid", dtype: "BF16", shape: [1200, 1024] },
    { name: "small", dtype: "F32", shape: [1000] },
  ];
  const size = (t: (typeof specs)[number]) => t.shape.reduce((x, y) => x * y, 1) * (t.dtype === "F32" ? 4 : 2);
  const first = (): WrittenTensor[] => specs.map((t) => ({ ...t, bytes: randomBytes(size(t)), file: "" }));
  /** `from` with a `share` of each tensor's elements changed, at positions that depend on `seed`. */
  const changed = (from: WrittenTensor[], share: number[], seed: number): WrittenTensor[] =>
    from.map((t, i) => {
      const bytes = Buffer.from(t.bytes);
      const elem = t.dtype === "F32" ? 4 : 2;
      const n = bytes.length / elem;
      const k = Math.round(n * (share[i] as number));
      for (let j = 0; j < k; j++) {
        const at = ((j * 2654435761 + seed * 97) % n) * elem;
        bytes[at] = (bytes[at] as number) ^ (1 + ((j + seed) % 255));
      }
      return { ...t, bytes };
    });
  const deltaOf = async (api: Awaited<ReturnType<typeof start>>["api"], id: string) => {
    await expect
      .poll(async () => (await api("GET", `/v1/checkpoints/${id}`)).body.delta, { timeout: 5000 })
      .toBeDefined();
    return (await api("GET", `/v1/checkpoints/${id}`)).body.delta;
  };

  it("moves the changed elements of a tensor, not the tensor, forward and back, bit for bit", async () => {
    const { api, receiver } = await start({ hostDevices: 2 });
    const v1 = first();
    await registerTensors(api, "m", v1);
    const r0 = await receiver(0, "engine-0", { partial: true, deltas: true });
    const r1 = await receiver(1, "engine-1", { partial: true, deltas: true });
    expect((await api("POST", "/v1/updates", { checkpoint: "m" })).body.deltas.tensors).toBe(0);

    // big and mid change sparsely, small wholly (too small for a delta).
    const v2 = changed(v1, [0.04, 0.01, 1], 1);
    await registerTensors(api, "m", v2);
    const made = await deltaOf(api, "m@2");
    expect(made).toMatchObject({ base: "m@1", tensors: 2 });
    expect(made.changes).toBe(Math.round(4096 * 1024 * 0.04) + Math.round(1200 * 1024 * 0.01));
    const step = (await api("POST", "/v1/updates", { checkpoint: "m", verify: true })).body;
    expect(step.state, JSON.stringify(step.error)).toBe("succeeded");
    expect(step.verify).toBe(true); // the deltas' bytes too, against their own chunk hashes
    expect(step.deltas).toMatchObject({ tensors: 2, wholeBytes: 4096 * 1024 * 4 + 1200 * 1024 * 2 });
    // 4% of big at 8 bytes a change, 1% of mid at 6, and small whole.
    expect(step.progress.bytes).toBeLessThan(0.04 * 8 * 4096 * 1024 + 0.01 * 6 * 1200 * 1024 + 4096 + 4 * 4096);
    expect(step.deltas.bytes).toBeLessThan(step.deltas.wholeBytes / 5);
    for (const r of [r0, r1]) {
      await expectModel(r, v2);
      expect(r.deltasApplied.map((d) => d.name).sort()).toEqual(["big", "mid"]);
    }

    // Back to m@1: m@2's deltas carry the old values too.
    const back = (await api("POST", "/v1/updates", { checkpoint: "m@1", verify: true })).body;
    expect(back).toMatchObject({ state: "succeeded", deltas: { tensors: 2 } });
    await expectModel(r0, v1);
    await expectModel(r1, v1);
    // And forward again, to the version they held a moment ago.
    expect((await api("POST", "/v1/updates", { checkpoint: "m@2" })).body.deltas.tensors).toBe(2);
    await expectModel(r1, v2);
  });

  it("sends whole tensors where a delta would not apply: a base nobody holds, a receiver without deltas, one that holds nothing", async () => {
    const { api, receiver } = await start({ hostDevices: 1, maxVersions: 5 });
    const v1 = first();
    await registerTensors(api, "m", v1);
    const r = await receiver(0, "engine", { partial: true, deltas: true });
    await api("POST", "/v1/updates", { checkpoint: "m" });
    // m@3's deltas are against m@2, which the engine never held: big and mid move whole.
    const v2 = changed(v1, [0.01, 0.01, 0], 2);
    const v3 = changed(v2, [0.01, 0.01, 0], 3);
    await registerTensors(api, "m", v2);
    await registerTensors(api, "m", v3);
    expect((await deltaOf(api, "m@3")).base).toBe("m@2");
    const skipBase = (await api("POST", "/v1/updates", { checkpoint: "m@3" })).body;
    expect(skipBase).toMatchObject({ state: "succeeded", deltas: { tensors: 0 }, skipped: { tensors: 1 } });
    await expectModel(r, v3);
    expect(r.deltasApplied).toEqual([]);
    // A receiver that does not apply deltas, beside one that does: whole tensors for both.
    const plain = await receiver(0, "plain", { partial: true });
    await api("POST", "/v1/updates", { checkpoint: "m@3" }); // plain now holds m@3 as well
    const mixed = (await api("POST", "/v1/updates", { checkpoint: "m@2" })).body;
    expect(mixed).toMatchObject({ state: "succeeded", deltas: { tensors: 0 }, skipped: { tensors: 1 } });
    await expectModel(plain, v2);
    await expectModel(r, v2);
    // An engine restarted (connected anew) holds nothing known: everything, whole.
    await plain.close();
    const fresh = await receiver(0, "restarted", { partial: true, deltas: true });
    const all = (await api("POST", "/v1/updates", { checkpoint: "m@3" })).body;
    expect(all).toMatchObject({ state: "succeeded", deltas: { tensors: 0 }, skipped: { tensors: 0 } });
    await expectModel(fresh, v3);
    await expectModel(r, v3);
  });
});

describe("atomic cutover", () => {
  const room = 64 << 20;
  async function twoVersions(api: Awaited<ReturnType<typeof start>>["api"]) {
    const dir = tempDir();
    const v1 = writeModel(dir, 2, 3, 512);
    expect((await api("POST", "/v1/checkpoints", { name: "m", dir })).status).toBe(201);
    const v2 = v1.map((t) => ({ ...t, bytes: randomBytes(t.bytes.byteLength) }));
    await registerTensors(api, "m", v2);
    return { v1, v2 };
  }

  it("stages on every GPU while the engines keep their weights, then switches them all", async () => {
    const { api, receiver } = await start({ hostDevices: 2 });
    const { v1, v2 } = await twoVersions(api);
    const r0 = await receiver(0, "engine-0", { stageBytes: room });
    const r1 = await receiver(1, "engine-1", { stageBytes: room });
    expect((await api("POST", "/v1/updates", { checkpoint: "m@1" })).body.state).toBe("succeeded");
    // What the engine holds as each bucket is acked: still m@1, until the commit.
    const during: Promise<Map<string, string>>[] = [];
    r0.behaviour.beforeAck = () => during.push(r0.model());
    const res = (await api("POST", "/v1/updates", { checkpoint: "m@2", cutover: "atomic" })).body;
    expect(res).toMatchObject({ state: "succeeded", cutover: "atomic", atomic: { committed: 2 } });
    expect(during.length).toBeGreaterThan(1);
    const before = Object.fromEntries(await Promise.all(v1.map(async (t) => [t.name, await ckptHash(t.bytes)])));
    for (const m of await Promise.all(during)) expect(Object.fromEntries(m)).toEqual(before);
    expect(res.atomic.stageSeconds).toBeGreaterThan(0);
    for (const r of res.receivers)
      expect(r).toMatchObject({ state: "applied", holds: "m@2", windowMs: expect.any(Number) });
    await expectModel(r0, v2);
    await expectModel(r1, v2);
    // The engines' weights did not move before the commit: every `commit` came after every ack.
    for (const r of [r0, r1]) {
      const seen = r.seen.filter((m) => m.update === "u-2").map((m) => m.op);
      expect(seen.indexOf("commit")).toBeGreaterThan(seen.lastIndexOf("bucket"));
    }
  });

  it("leaves every engine on the old version when one fails to stage, or lacks room", async () => {
    const { api, receiver } = await start({ hostDevices: 2 });
    const { v1 } = await twoVersions(api);
    const r0 = await receiver(0, "engine-0", { stageBytes: room });
    const r1 = await receiver(1, "engine-1", { stageBytes: room });
    await api("POST", "/v1/updates", { checkpoint: "m@1" });
    r1.behaviour.failAt = 1;
    const failed = await api("POST", "/v1/updates", { checkpoint: "m@2", cutover: "atomic" });
    expect(failed.status).toBe(502);
    expect(
      failed.body.error.details.receivers.map((x: { state: string; holds: string }) => [x.state, x.holds]),
    ).toEqual([
      ["untouched", "m@1"],
      ["untouched", "m@1"],
    ]);
    await expectModel(r0, v1);
    await expectModel(r1, v1);
    const status = (await api("GET", "/v1/status")).body;
    expect(status.gpus.map((g: { holdings: { holds: string }[] }) => g.holdings[0]?.holds)).toEqual(["m@1", "m@1"]);
    // A receiver that declared too little room: refused before any bucket moves.
    r1.behaviour = { stageBytes: 0 };
    const small = await receiver(1, "small", { stageBytes: 1000 });
    const refused = await api("POST", "/v1/updates", { checkpoint: "m@2", cutover: "atomic" });
    expect(refused.status).toBe(400);
    expect(refused.body.error.message).toMatch(
      /^atomic cutover stages this update's \d+ bytes on every GPU before any engine switches, but small \(pid \d+, GPU 1\) declared 1000 bytes/,
    );
    expect(small.seen.some((m) => m.op === "bucket")).toBe(false);
    await expectModel(r0, v1);
  });

  it("says who holds what when a commit fails after others committed", async () => {
    const { api, receiver } = await start({ hostDevices: 2 });
    const { v1, v2 } = await twoVersions(api);
    const r0 = await receiver(0, "engine-0", { stageBytes: room });
    const r1 = await receiver(1, "engine-1", { stageBytes: room, failCommit: true });
    const res = await api("POST", "/v1/updates", { checkpoint: "m@2", cutover: "atomic" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(
      /^the commit failed after 1 of 2 receivers committed \(engine-0 \(pid \d+, GPU 0\) committed, engine-1 \(pid \d+, GPU 1\) did not\)/,
    );
    expect(
      res.body.error.details.receivers.map((x: { state: string; holds: string | null }) => [x.state, x.holds]),
    ).toEqual([
      ["applied", "m@2"],
      ["partial", null],
    ]);
    await expectModel(r0, v2);
    void v1;
    void r1;
  });

  it("paces its staging when asked, so that engines serving meanwhile keep their pace", async () => {
    const { api, receiver } = await start({ hostDevices: 1 });
    await twoVersions(api);
    await receiver(0, "engine", { stageBytes: room });
    const res = (await api("POST", "/v1/updates", { checkpoint: "m@2", cutover: "atomic", paceGBps: 0.02 })).body;
    expect(res).toMatchObject({ state: "succeeded", paceGBps: 0.02 });
    // Every bucket but the last waited for its share of 20 MB/s.
    const buckets: { bytes: number }[] = (await api("GET", `/v1/updates/${res.id}?buckets=1`)).body.buckets;
    const paced = buckets.slice(0, -1).reduce((n, b) => n + b.bytes, 0) / 0.02e9;
    expect(res.atomic.stageSeconds).toBeGreaterThanOrEqual(paced * 0.95);
    const direct = await api("POST", "/v1/updates", { checkpoint: "m@1", paceGBps: 1 });
    expect(direct.status).toBe(400);
    expect(direct.body.error.message).toBe("paceGBps paces the staging of atomic updates: give cutover: atomic");
  });

  it("is refused with engines updated through their own calls, which do not stage", async () => {
    const { api } = await start({
      hostDevices: 1,
      engines: [
        { name: "vllm-0", kind: "vllm", api: "worker-extension", pause: "none", url: "http://127.0.0.1:9", gpus: [0] },
      ],
    });
    await register(api);
    const res = await api("POST", "/v1/updates", { checkpoint: "m", cutover: "atomic" });
    expect(res.status).toBe(400);
    expect(res.body.error.message).toBe(
      "atomic cutover stages through receivers that commit between forward passes; engine vllm-0 (vllm) is updated through its own pause and reload calls, which do not stage yet",
    );
    expect((await api("GET", "/v1/updates")).body.updates).toEqual([]);
  });
});

describe("verified updates", () => {
  it("hashes every bucket where it landed, and refuses a corrupted one before any engine sees it, naming it", async () => {
    const { api, receiver, daemon } = await start({ hostDevices: 2 });
    const tensors = await register(api); // copied into pinned memory: only the daemon writes it
    const r0 = await receiver(0, "engine-0");
    const r1 = await receiver(1, "engine-1");
    const ok = (await api("POST", "/v1/updates", { checkpoint: "m", verify: true })).body;
    expect(ok).toMatchObject({ state: "succeeded", verify: true });
    expect(ok.timings.verifySeconds).toBeGreaterThan(0);
    await expectDelivered(r0, "u-1", tensors);
    await expectDelivered(r1, "u-1", tensors);

    // A byte of "big" changes in the daemon's pinned memory, under the version.
    const version = daemon.registry.get("m@1");
    const big = version.tensors.find((t) => t.name === "big");
    if (!big) throw new Error("no big");
    const mem = version.pinned[big.file]?.mem;
    if (!mem) throw new Error("no memory");
    const at = big.offset + 5 * 65536 + 17;
    const byte = viewMemory(mem.address + BigInt(at), 1);
    byte[0] = (byte[0] as number) ^ 0xff;
    const caught = await api("POST", "/v1/updates", { checkpoint: "m", verify: true });
    expect(caught.status).toBe(502);
    expect(caught.body.error.message).toMatch(
      /^verification failed on GPU [01]: bucket \d+, tensor big, bytes \[327680, 393216\) hash [0-9a-f]{16} there, not [0-9a-f]{16}/,
    );
    // The bucket that held it reached no receiver.
    const bucket = Number(/bucket (\d+)/.exec(caught.body.error.message)?.[1]);
    for (const r of [r0, r1])
      expect(r.seen.some((m) => m.update === "u-2" && m.op === "bucket" && m.bucket === bucket)).toBe(false);
    // Without verification the same bytes go through: the check is what caught them.
    const unchecked = (await api("POST", "/v1/updates", { checkpoint: "m", verify: false })).body;
    expect(unchecked).toMatchObject({ state: "succeeded", verify: false });
    expect(r0.hashes.get("u-3")?.get("big")).not.toBe(
      await ckptHash(tensors.find((t) => t.name === "big")?.bytes as Uint8Array),
    );
  });

  it("checks a version's pinned memory against its registered hashes before its first verified update", async () => {
    const { api, receiver, daemon } = await start({ hostDevices: 1 });
    await register(api);
    await receiver(0, "engine");
    const version = daemon.registry.get("m@1");
    const t = version.tensors[0];
    const mem = t && version.pinned[t.file]?.mem;
    if (!t || !mem) throw new Error("no tensor");
    const byte = viewMemory(mem.address + BigInt(t.offset), 1);
    byte[0] = (byte[0] as number) ^ 1;
    const refused = await api("POST", "/v1/updates", { checkpoint: "m", verify: true });
    expect(refused.status).toBe(502);
    expect(refused.body.error.message).toMatch(
      new RegExp(
        `^verification: tensor ${t.name} of m@1 hashes [0-9a-f]{16} in pinned memory, not ${t.hash} as registered: its memory changed since`,
      ),
    );
    expect(refused.body.error.message).not.toContain(`hashes ${t.hash}`);
  });
});

describe("broadcast updates on the host backend", () => {
  it("delivers every byte of the checkpoint to an engine on each GPU, and again on the next update", async () => {
    const { api, receiver } = await start();
    const tensors = await register(api);
    const r0 = await receiver(0, "engine-0");
    const r1 = await receiver(1, "engine-1");
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ id: "u-1", checkpoint: "m@1", state: "succeeded" });
    expect(res.body.progress.buckets).toBeGreaterThan(3);
    expect(res.body.progress.bucketsDone).toBe(res.body.progress.buckets);
    expect(res.body.receivers).toEqual([
      {
        name: "engine-0",
        pid: process.pid,
        gpu: 0,
        bucketsAcked: res.body.progress.buckets,
        state: "applied",
        holds: "m@1",
      },
      {
        name: "engine-1",
        pid: process.pid,
        gpu: 1,
        bucketsAcked: res.body.progress.buckets,
        state: "applied",
        holds: "m@1",
      },
    ]);
    await expectDelivered(r0, "u-1", tensors);
    await expectDelivered(r1, "u-1", tensors);
    // Buffers persist: the second update sends no new buffers.
    const buffers = r0.seen.filter((m) => m.op === "buffers").length;
    expect((await api("POST", "/v1/updates", { checkpoint: "m@1" })).body.state).toBe("succeeded");
    await expectDelivered(r0, "u-2", tensors);
    expect(r0.seen.filter((m) => m.op === "buffers").length).toBe(buffers);
    expect((await api("GET", "/v1/updates/u-2")).body.state).toBe("succeeded");
    // The per-bucket timeline: every bucket, each stage after the one before it.
    const timed = (await api("GET", "/v1/updates/u-2?buckets=true")).body;
    expect(timed.buckets.map((b: { bucket: number }) => b.bucket).sort((x: number, y: number) => x - y)).toEqual(
      Array.from({ length: timed.progress.buckets }, (_, i) => i),
    );
    for (const b of timed.buckets) expect(b.issued <= b.landed && b.landed <= b.acked).toBe(true);
    expect(new Set(timed.buckets.map((b: { owner: number }) => b.owner))).toEqual(new Set([0, 1]));
  });

  it("shrinks buckets so that all of a GPU's slots fit in bucketMemoryBytes", async () => {
    const { api } = await start({ hostDevices: 8, bucketBytes: 256 << 20, bucketSlots: 4, bucketMemoryBytes: 1 << 30 });
    // Eight GPUs get two slots each; every GPU holds all 16: 1 GiB / 16 = 64 MiB.
    expect((await api("GET", "/v1/status")).body.buckets).toEqual({ slots: 16, slotBytes: 64 << 20 });
  });

  it("refuses a second update while one runs, and an update without engines", async () => {
    const { api, receiver } = await start();
    await register(api);
    expect((await api("POST", "/v1/updates", { checkpoint: "m" })).body.error.code).toBe("no_receivers");
    await receiver(0, "slow", { stallAt: 2 });
    const first = await api("POST", "/v1/updates", { checkpoint: "m", wait: false });
    expect(first.status).toBe(202);
    const second = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(second.status).toBe(409);
    expect(second.body.error.message).toBe("update u-1 of m@1 is running");
    // The version in use cannot be deleted meanwhile.
    expect((await api("DELETE", "/v1/checkpoints/m@1")).status).toBe(409);
  });

  it.each([
    {
      name: "an engine that raises",
      behaviour: { failAt: 2 },
      message: /receiver bad \(pid \d+, GPU 1\) failed: injected failure at bucket 2/,
      held: ["aborted", "untouched"],
    },
    {
      name: "a receiver that dies",
      behaviour: { dieAt: 1 },
      message: /receiver bad \(pid \d+, GPU 1\) disconnected/,
      held: ["partial", "untouched"],
    },
    {
      name: "a receiver that stops answering",
      behaviour: { stallAt: 3 },
      message: /receiver bad \(pid \d+, GPU 1\) did not answer within 2000 ms \(waiting for the ack of bucket 3\)/,
      held: ["aborted", "untouched"],
    },
  ])("aborts on $name, names it, and the next update works", async ({ behaviour, message, held }) => {
    const { api, receiver } = await start();
    const tensors = await register(api);
    const good = await receiver(0, "good");
    const bad = await receiver(1, "bad", behaviour);
    const started = Date.now();
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(Date.now() - started).toBeLessThan(5000);
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(message);
    const record = res.body.error.details;
    expect(record.state).toBe("failed");
    expect(record.error.receiver).toMatch(/^bad/);
    // The result says who holds what.
    const states = Object.fromEntries(record.receivers.map((r: { name: string; state: string }) => [r.name, r.state]));
    // Still connected: it was told to abort; gone: it holds what it acked.
    expect(held).toContain(states.bad);
    expect(await good.saw((m) => m.op === "abort" && m.update === "u-1")).toBe(true);
    expect((await api("GET", "/v1/healthz")).body).toEqual({ ok: true });
    // Once the bad engine is gone, the next update goes through on the same buffers.
    await bad.close();
    while ((await api("GET", "/v1/status")).body.gpus[1].receivers.length > 0)
      await new Promise((r) => setTimeout(r, 10));
    const again = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(again.body.state).toBe("succeeded");
    await expectDelivered(good, "u-2", tensors);
  });
});

describe("what a failed update leaves, and how fast it fails", () => {
  it("waits for every receiver of a GPU, not only the first: a second one that stalls fails the update", async () => {
    const { api, receiver } = await start({ receiverTimeoutMs: 500 });
    await register(api);
    await receiver(0, "first");
    await receiver(0, "second", { stallAt: 1 });
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(/^receiver second \(pid \d+, GPU 0\) did not answer within 500 ms/);
    expect(res.body.error.details.error.receiver).toMatch(/^second/);
  });

  it.each([
    { name: "one that never acked a bucket is untouched", behaviour: { failFrom: 0 }, state: "untouched" },
    { name: "one told to abort after acking some buckets is aborted", behaviour: { failAt: 4 }, state: "aborted" },
  ])("reports each receiver's exact state: $name", async ({ behaviour, state }) => {
    const { api, receiver } = await start();
    await register(api);
    await receiver(0, "good");
    await receiver(1, "bad", behaviour);
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    const record = res.body.error.details;
    // Bucket 4 reuses bucket 0's slot, so it is sent only once bucket 0 was acked everywhere.
    expect(record.progress.buckets).toBeGreaterThan(4);
    const bad = record.receivers.find((r: { name: string }) => r.name === "bad");
    expect(bad.state).toBe(state);
    if (state === "untouched") expect(bad.bucketsAcked).toBe(0);
    else expect(bad.bucketsAcked).toBeGreaterThan(0);
    expect(bad.bucketsAcked).toBeLessThan(record.progress.buckets);
  });

  it("reports a receiver that acked every bucket but never finished as aborted, not applied", async () => {
    const { api, receiver } = await start({ receiverTimeoutMs: 500 });
    await register(api);
    await receiver(0, "good");
    const stuck = await receiver(1, "stuck", { neverDone: true });
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(
      /^receiver stuck \(pid \d+, GPU 1\) did not answer within 500 ms \(waiting for done\)/,
    );
    const record = res.body.error.details;
    const total = record.progress.buckets;
    expect(record.receivers).toEqual([
      { name: "good", pid: process.pid, gpu: 0, bucketsAcked: total, state: "applied", holds: null },
      { name: "stuck", pid: process.pid, gpu: 1, bucketsAcked: total, state: "aborted", holds: null },
    ]);
    expect(await stuck.saw((m) => m.op === "abort" && m.update === "u-1")).toBe(true);
    expect((await api("GET", "/v1/updates/u-1")).body.receivers).toEqual(record.receivers);
  });

  it("aborts a stalled update everywhere on shutdown and answers its client, naming the shutdown", async () => {
    const { daemon, api, receiver } = await start({ receiverTimeoutMs: 60_000 });
    await register(api);
    const good = await receiver(0, "good");
    const stalled = await receiver(1, "stalled", { stallAt: 1 });
    const pending = api("POST", "/v1/updates", { checkpoint: "m" });
    expect(await stalled.saw((m) => m.op === "bucket" && m.bucket === 1, 5000)).toBe(true);
    const started = performance.now();
    const stopped = daemon.stop();
    const res = await within(5000, pending);
    expect(res.status).toBe(502);
    expect(res.body.error).toMatchObject({ code: "update_failed", message: "the daemon is shutting down" });
    expect(res.body.error.details.state).toBe("failed");
    for (const r of [good, stalled]) expect(r.seen.some((m) => m.op === "abort" && m.update === "u-1")).toBe(true);
    expect(res.body.error.details.receivers.find((r: { name: string }) => r.name === "stalled").state).toMatch(
      /^(aborted|untouched)$/,
    );
    await within(5000, stopped);
    expect(performance.now() - started).toBeLessThan(2000); // not the 60 s receiver timeout
  });

  it("fails within about receiverTimeoutMs when a receiver stops answering", async () => {
    const { api, receiver } = await start({ receiverTimeoutMs: 500 });
    await register(api);
    await receiver(0, "good");
    await receiver(1, "bad", { stallAt: 3 });
    // The bound is the assertion: a broken timer fails here, not by the test runner's limit.
    const started = performance.now();
    const res = await within(2000, api("POST", "/v1/updates", { checkpoint: "m" }));
    expect(performance.now() - started).toBeGreaterThanOrEqual(500); // the receiver's timer, not another failure
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(/^receiver bad \(pid \d+, GPU 1\) did not answer within 500 ms/);
  });
});

/**
 * A stand-in for vLLM's /collective_rpc with the ckptd worker extension: one receiver per call.
 * Calls without a body (reset_prefix_cache) are answered 200 and counted in `others`.
 */
async function fakeVllm(
  status = 200,
  answer = JSON.stringify({ results: [{ ok: true }] }),
): Promise<{ url: string; calls: unknown[]; others: string[]; receivers: ReferenceReceiver[] }> {
  const calls: unknown[] = [];
  const others: string[] = [];
  const receivers: ReferenceReceiver[] = [];
  const server: Server = createServer((req, res) => {
    let body = "";
    req.on("data", (c) => {
      body += c;
    });
    req.on("end", async () => {
      if (body === "") {
        others.push(req.url ?? "");
        res.writeHead(200).end();
        return;
      }
      const call = JSON.parse(body) as { method: string; args: [string] };
      calls.push(call);
      if (status !== 200) {
        res.writeHead(status).end("collective_rpc is off");
        return;
      }
      const r = new ReferenceReceiver(`${call.args[0]}/gpu-0.sock`, "vllm-worker-0");
      receivers.push(r);
      await r.connect();
      await r.next("end");
      res.writeHead(200, { "content-type": "application/json" }).end(answer);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  cleanup.push(async () => {
    for (const r of receivers) await r.close();
    await new Promise((resolve) => server.close(resolve));
  });
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, calls, others, receivers };
}

describe("engines listed in the configuration", () => {
  it("triggers a vLLM engine through /collective_rpc and waits for its receivers", async () => {
    const vllm = await fakeVllm();
    const { api } = await start({
      engines: [{ name: "vllm-0", kind: "vllm", api: "worker-extension", pause: "none", url: vllm.url, gpus: [0] }],
    });
    const tensors = await register(api);
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.body.state).toBe("succeeded");
    expect(vllm.calls).toEqual([
      {
        method: "ckptd_update",
        args: [expect.stringMatching(/sockets$/)],
        kwargs: { timeout_s: "2", reload: "auto", update: "u-1" },
        timeout: 8,
      },
    ]);
    expect(vllm.others).toEqual(["/reset_prefix_cache?reset_running_requests=true"]);
    await expectDelivered(vllm.receivers[0] as ReferenceReceiver, "u-1", tensors);
  });

  it("fails naming the engine when its final answer reports a failed worker, though every byte arrived", async () => {
    const answer = JSON.stringify({ results: [{ ok: false, error: "worker 0 raised: CUDA out of memory" }] });
    const vllm = await fakeVllm(200, answer);
    const { api } = await start({
      engines: [{ name: "vllm-0", kind: "vllm", api: "worker-extension", pause: "none", url: vllm.url, gpus: [0] }],
    });
    await register(api);
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toBe(
      "engine vllm-0: a worker failed: worker 0 raised: CUDA out of memory; engine vllm-0 took all of the update",
    );
    const record = res.body.error.details;
    expect(record.state).toBe("failed");
    // The receiver acked every bucket: it holds the new version, whatever its engine said after.
    expect(record.receivers).toEqual([
      {
        name: "vllm-worker-0",
        pid: process.pid,
        gpu: 0,
        bucketsAcked: record.progress.buckets,
        state: "applied",
        holds: null,
      },
    ]);
  });

  it("takes any answer of an http engine that is not an explicit failure", async () => {
    const engine = await fakeVllm(200, "OK");
    const socketDir = tempDir();
    const { api } = await start({
      socketDir,
      engines: [{ name: "custom", kind: "http", url: `${engine.url}/trigger`, body: { args: [socketDir] }, gpus: [0] }],
    });
    const tensors = await register(api);
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.body.state).toBe("succeeded");
    expect(engine.calls).toEqual([{ args: [socketDir] }]);
    await expectDelivered(engine.receivers[0] as ReferenceReceiver, "u-1", tensors);
  });

  it("names the engine when triggering it fails", async () => {
    const vllm = await fakeVllm(404);
    const { api } = await start({
      engines: [{ name: "vllm-0", kind: "vllm", api: "worker-extension", pause: "none", url: vllm.url, gpus: [0] }],
    });
    await register(api);
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(
      /engine vllm-0 has no receiver on GPU 0: .*answered 404: collective_rpc is off/,
    );
  });

  it.each([
    { hostDevices: 1, gpus: [0, 1], has: "1 GPU (GPU 0)", missing: "1" },
    { hostDevices: 2, gpus: [1, 2, 3], has: "2 GPUs (0 to 1)", missing: "2, 3" },
  ])("refuses to start with an engine on GPUs the host lacks: $gpus on $hostDevices", async (c) => {
    const engines = [{ name: "tp", kind: "receiver" as const, gpus: c.gpus }];
    await expect(start({ hostDevices: c.hostDevices, engines })).rejects.toThrow(
      `engine "tp" is configured on GPU ${c.missing}, but this host has ${c.has}`,
    );
  });

  it("waits for a receiver engine on each of its GPUs, within the timeout", async () => {
    const { api } = await start({
      engines: [{ name: "torch", kind: "receiver", gpus: [0, 1] }],
      receiverTimeoutMs: 300,
    });
    await register(api);
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toBe("engine torch has no receiver on GPU 0 after 300 ms");
  });
});

describe("updates across daemons (host backend, TCP collectives)", () => {
  async function pair(opts: { peerHolds: boolean }) {
    const peer = await start({ hostDevices: 1 });
    const coordinator = await start({ hostDevices: 1, peers: [`http://127.0.0.1:${peer.daemon.port}`] });
    const tensors = await register(coordinator.api);
    if (opts.peerHolds) {
      const dir = tensors[0]?.file.split("/").slice(0, -1).join("/");
      expect((await peer.api("POST", "/v1/checkpoints", { name: "m", dir })).status).toBe(201);
    }
    return { peer, coordinator, tensors };
  }

  it.each([
    { name: "both hosts hold the checkpoint", peerHolds: true },
    { name: "only the coordinator holds it", peerHolds: false },
  ])("delivers every byte to the engines of both daemons when $name", async ({ peerHolds }) => {
    const { peer, coordinator, tensors } = await pair({ peerHolds });
    const a = await coordinator.receiver(0, "engine-a");
    const b = await peer.receiver(0, "engine-b");
    if (peerHolds) {
      // The peer's own update numbers u-1 too; its part of the coordinator's is u-1@<node>.
      expect((await peer.api("POST", "/v1/updates", { checkpoint: "m" })).body.id).toBe("u-1");
      await expectDelivered(b, "u-1", tensors);
    }
    for (const id of ["u-1", "u-2"]) {
      const res = await coordinator.api("POST", "/v1/updates", { checkpoint: "m" });
      expect(res.body.error?.message).toBeUndefined();
      expect(res.body.state).toBe("succeeded");
      await expectDelivered(a, id, tensors);
      await expectDelivered(b, `${id}@t`, tensors);
    }
    // The peer keeps its own record of its part; when it holds the checkpoint it copies half.
    expect((await peer.api("GET", "/v1/updates/u-1@t")).body.state).toBe("succeeded");
    const ids = (await peer.api("GET", "/v1/updates")).body.updates.map((u: { id: string }) => u.id);
    expect(ids).toEqual(peerHolds ? ["u-1", "u-1@t", "u-2@t"] : ["u-1@t", "u-2@t"]);
    const { buckets } = (await coordinator.api("GET", "/v1/updates/u-1?buckets=1")).body;
    const owned = [0, 1].map((o) =>
      buckets
        .filter((b: { owner: number }) => b.owner === o)
        .reduce((n: number, b: { bytes: number }) => n + b.bytes, 0),
    );
    if (peerHolds) expect(Math.abs(owned[0] - owned[1]) / (owned[0] + owned[1])).toBeLessThan(0.05);
    else expect(owned[1]).toBe(0);
  });

  it("switches the engines of both daemons at once in an atomic update, or none of them", async () => {
    const { peer, coordinator, tensors } = await pair({ peerHolds: true });
    const room = { stageBytes: 64 << 20 };
    const a = await coordinator.receiver(0, "engine-a", room);
    const b = await peer.receiver(0, "engine-b", room);
    const ok = (await coordinator.api("POST", "/v1/updates", { checkpoint: "m", cutover: "atomic", verify: true }))
      .body;
    expect(ok).toMatchObject({ state: "succeeded", cutover: "atomic", verify: true });
    // The peer holds the version: it verified the buckets on its own GPU.
    const part = (await peer.api("GET", "/v1/updates/u-1@t")).body;
    expect(part).toMatchObject({ state: "succeeded", cutover: "atomic", verify: true });
    expect(part.timings.verifySeconds).toBeGreaterThan(0);
    await expectDelivered(a, "u-1", tensors);
    await expectDelivered(b, "u-1@t", tensors);
    // Neither engine switched before both had staged: each got commit after every bucket of both.
    for (const r of [a, b]) expect(r.seen.filter((m) => m.op === "commit").length).toBe(1);
    // The peer's engine fails to stage the next ones, at a bucket or once every bucket came:
    // no engine commits, both keep what they hold.
    const held = [await a.model(), await b.model()];
    for (const [k, fault] of [{ failAt: 1 }, { failStage: true }].entries()) {
      b.behaviour = { ...room, ...fault };
      const failed = await coordinator.api("POST", "/v1/updates", { checkpoint: "m", cutover: "atomic" });
      expect(failed.status).toBe(502);
      expect(failed.body.error.message).toMatch(/engine-b .*injected failure (at bucket 1|to stage)/);
      expect(a.seen.some((m) => m.op === "commit" && m.update === `u-${k + 2}`)).toBe(false);
      expect([await a.model(), await b.model()]).toEqual(held);
      expect((await coordinator.api("GET", "/v1/status")).body.gpus[0].holdings[0].holds).toBe("m@1");
    }
  });

  it("refuses an atomic update spanning a peer that cannot stage, before anything moves", async () => {
    const peer = await start({
      hostDevices: 1,
      engines: [
        { name: "v", kind: "vllm", api: "worker-extension", pause: "none", url: "http://127.0.0.1:9", gpus: [0] },
      ],
    });
    const coordinator = await start({ hostDevices: 1, peers: [`http://127.0.0.1:${peer.daemon.port}`] });
    await register(coordinator.api);
    const a = await coordinator.receiver(0, "engine-a", { stageBytes: 64 << 20 });
    const res = await coordinator.api("POST", "/v1/updates", { checkpoint: "m", cutover: "atomic" });
    expect(res.status).toBe(400);
    expect(res.body.error.message).toMatch(/^peer http:\/\/127.0.0.1:\d+ cannot take part in an atomic cutover/);
    expect(a.seen.some((m) => m.op === "begin")).toBe(false);
  });

  it("aborts everywhere when an engine on the peer fails, naming it, and the next update works", async () => {
    const { peer, coordinator, tensors } = await pair({ peerHolds: true });
    const a = await coordinator.receiver(0, "engine-a");
    const bad = await peer.receiver(0, "engine-b", { failAt: 2 });
    const res = await coordinator.api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(
      /peer http:\/\/127.0.0.1:\d+ failed: receiver engine-b .* failed: injected failure at bucket 2/,
    );
    expect(await a.saw((m) => m.op === "abort" && m.update === "u-1")).toBe(true);
    await bad.close();
    const b = await peer.receiver(0, "engine-b2");
    const again = await coordinator.api("POST", "/v1/updates", { checkpoint: "m" });
    expect(again.body.state).toBe("succeeded");
    await expectDelivered(a, "u-2", tensors);
    await expectDelivered(b, "u-2@t", tensors);
  });

  it("refuses a peer busy with its own update before joining any communicator", async () => {
    const { peer, coordinator } = await pair({ peerHolds: true });
    await peer.receiver(0, "busy", { stallAt: 0 });
    expect((await peer.api("POST", "/v1/updates", { checkpoint: "m", wait: false })).status).toBe(202);
    const a = await coordinator.receiver(0, "engine-a");
    const ctx = coordinator.daemon.context;
    const join = ctx.commInit.bind(ctx);
    let joins = 0;
    ctx.commInit = (...args: Parameters<typeof join>) => {
      joins++;
      return join(...args);
    };
    const res = await coordinator.api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toBe(`peer http://127.0.0.1:${peer.daemon.port} is busy with update u-1`);
    expect(joins).toBe(0);
    expect(a.seen.some((m) => m.op === "begin")).toBe(false);
    // The peer's own update was left alone.
    expect((await peer.api("GET", "/v1/updates/u-1")).body.state).toBe("running");
  });

  it("fails within the timeout, naming the peer, when the peer daemon is gone", async () => {
    const { peer, coordinator } = await pair({ peerHolds: false });
    await coordinator.receiver(0, "engine-a");
    await peer.daemon.stop();
    const started = Date.now();
    const res = await coordinator.api("POST", "/v1/updates", { checkpoint: "m" });
    expect(Date.now() - started).toBeLessThan(5000);
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(/peer http:\/\/127.0.0.1:\d+ did not answer/);
    expect((await coordinator.api("GET", "/v1/healthz")).body).toEqual({ ok: true });
  });

  it("fails naming the peer and the secret when the peer has another cluster secret, and nothing runs there", async () => {
    const peer = await start({ hostDevices: 1, clusterSecretFile: "", clusterSecret: "another-cluster-secret-0123" });
    const coordinator = await start({ hostDevices: 1, peers: [`http://127.0.0.1:${peer.daemon.port}`] });
    await register(coordinator.api);
    await coordinator.receiver(0, "engine-a");
    const res = await coordinator.api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toBe(
      `peer http://127.0.0.1:${peer.daemon.port} did not answer: the signature does not match (do both daemons have the same cluster secret?)`,
    );
    expect((await peer.api("GET", "/v1/updates")).body.updates).toEqual([]);
  });

  it("refuses peers whose bucket geometry differs, saying what to set", async () => {
    // bucketSlots 3 is raised to 4 on the daemon with 2 GPUs, not on the one with 1.
    const peer = await start({ hostDevices: 1, bucketSlots: 3 });
    const coordinator = await start({
      hostDevices: 2,
      bucketSlots: 3,
      peers: [`http://127.0.0.1:${peer.daemon.port}`],
    });
    await register(coordinator.api);
    const res = await coordinator.api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(
      /has 3 slots of 1048576 bytes, this daemon 4 of 1048576: set bucketSlots to 4 and bucketBytes to 1048576 on every daemon/,
    );
  });

  it("gives up joining the communicator within the timeout when a peer refuses the plan", async () => {
    // A peer that describes itself like the coordinator (same geometry, holds the checkpoint)
    // but refuses every plan: the coordinator has started joining a communicator that this
    // peer never joins.
    let coordinatorUrl = "";
    const fake = createServer(async (req, res) => {
      res.setHeader("content-type", "application/json");
      if (req.url?.startsWith("/v1/peer/info")) {
        // The coordinator's own info says it is busy (with this very update): the fake is idle.
        // Passed on with the coordinator's signature, which that daemon has not seen yet.
        const signed = {
          "x-ckptd-to": String(req.headers["x-ckptd-to"]),
          "x-ckptd-timestamp": String(req.headers["x-ckptd-timestamp"]),
          "x-ckptd-signature": String(req.headers["x-ckptd-signature"]),
          "x-ckptd-body-sha256": String(req.headers["x-ckptd-body-sha256"]),
        };
        const { running: _, ...info } = await (await fetch(`${coordinatorUrl}${req.url}`, { headers: signed })).json();
        endSigned(req, res, JSON.stringify({ ...info, nodeId: "refuser", holds: "m@1" }));
      } else {
        res.statusCode = 409;
        endSigned(
          req,
          res,
          JSON.stringify({ error: { code: "update_running", message: "update u-9 of other@1 is running" } }),
        );
      }
    });
    await new Promise<void>((r) => fake.listen(0, "127.0.0.1", r));
    cleanup.push(() => new Promise((r) => fake.close(() => r())));
    const fakeUrl = `http://127.0.0.1:${(fake.address() as AddressInfo).port}`;
    const coordinator = await start({ hostDevices: 1, peers: [fakeUrl], receiverTimeoutMs: 500 });
    coordinatorUrl = `http://127.0.0.1:${coordinator.daemon.port}`;
    await register(coordinator.api);
    await coordinator.receiver(0, "engine-a");
    for (let i = 0; i < 2; i++) {
      const started = Date.now();
      const res = await coordinator.api("POST", "/v1/updates", { checkpoint: "m" });
      expect(Date.now() - started).toBeLessThan(3000);
      expect(res.status).toBe(502);
      expect(res.body.error.message).toBe(`peer ${fakeUrl} failed: update u-9 of other@1 is running`);
    }
    expect((await coordinator.api("GET", "/v1/healthz")).body).toEqual({ ok: true });
  });
});
