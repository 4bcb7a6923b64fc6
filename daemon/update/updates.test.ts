/**
 * Updates through the API of in-process daemons (host backend): what the record says, the
 * errors a caller gets, and the peer API driven directly, as a coordinator would, with a plan
 * of one rank.
 */
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import pino from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { ckptHash, type WrittenTensor, writeSafetensors } from "../../test/checkpoint-files.ts";
import { AUTH, CLUSTER_SECRET, endSigned, tempDir, testCredentials, within } from "../../test/helpers.ts";
import { apiOf, LIB_DIR } from "../../test/in-process.ts";
import { type Behaviour, ReferenceReceiver } from "../../test/reference-receiver.ts";
import { signedHeaders } from "../auth/signature.ts";
import { type Config, defaults } from "../config/index.ts";
import { type Daemon, startDaemon } from "../daemon.ts";
import { nodeRuntime } from "../runtime/node.ts";
import { fingerprint } from "./fingerprint.ts";
import type { PeerPlan } from "./peers.ts";
import { planBuckets } from "./plan.ts";

const cleanup: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

type Line = { msg: string; [k: string]: unknown };

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
    receiverTimeoutMs: 1000,
    ...testCredentials(),
    ...overrides,
  };
  const logs: Line[] = [];
  const log = pino({ level: "info" }, { write: (s: string) => void logs.push(JSON.parse(s)) });
  const daemon: Daemon = await startDaemon({ config, runtime: nodeRuntime, log, nodeId: "t", libDir: LIB_DIR });
  cleanup.push(() => daemon.stop());
  const api = apiOf(daemon.port);
  const receiver = async (gpu: number, name: string, behaviour: Behaviour = {}) => {
    const r = new ReferenceReceiver(`${stateDir}/sockets/gpu-${gpu}.sock`, name, behaviour);
    await r.connect();
    cleanup.push(() => r.close());
    return r;
  };
  /** A request of the peer API, signed with the cluster secret as a coordinator signs it. */
  const peer = async (method: string, path: string, body?: unknown) => {
    const url = `http://127.0.0.1:${daemon.port}${path}`;
    const bytes = body === undefined ? undefined : new TextEncoder().encode(JSON.stringify(body));
    const headers = {
      ...signedHeaders(Buffer.from(CLUSTER_SECRET), method, url, "t", bytes),
      ...(bytes ? { "content-type": "application/json" } : {}),
    };
    const res = await fetch(url, { method, headers, body: bytes });
    // biome-ignore lint/suspicious/noExplicitAny: checked field by field
    return { status: res.status, body: (await res.json()) as any };
  };
  return { daemon, api, receiver, peer, logs };
}
type Started = Awaited<ReturnType<typeof start>>;

/** Registers `name`: tensors over two files, some larger than a 1 MiB bucket. */
async function register(api: Started["api"], name = "m", cols = 300): Promise<WrittenTensor[]> {
  const dir = tempDir();
  const tensors = [
    ...writeSafetensors(`${dir}/a.safetensors`, [
      { name: "a.big", dtype: "F32", shape: [cols, 1024] },
      { name: "a.small", dtype: "BF16", shape: [64, 64] },
    ]),
    ...writeSafetensors(`${dir}/b.safetensors`, [
      { name: "b.mid", dtype: "F32", shape: [200, 1024] },
      { name: "b.norm", dtype: "F32", shape: [1024] },
    ]),
  ];
  expect((await api("POST", "/v1/checkpoints", { name, dir })).status).toBe(201);
  return tensors;
}

async function expectDelivered(r: ReferenceReceiver, update: string, tensors: WrittenTensor[]) {
  const got = r.hashes.get(update);
  expect(got?.size).toBe(tensors.length);
  for (const t of tensors) expect(got?.get(t.name)).toBe(await ckptHash(t.bytes));
}

async function until<T>(get: () => Promise<T>, ok: (x: T) => boolean, ms = 5000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const x = await get();
    if (ok(x) || Date.now() > end) return x;
    await new Promise((r) => setTimeout(r, 10));
  }
}

describe("an update's record and the errors a caller gets", () => {
  it("answers at once with 202 and where to follow it, then records what moved and how long it took", async () => {
    const { api, receiver, daemon, logs } = await start();
    const tensors = await register(api);
    expect((await api("GET", "/v1/updates/u-1")).body.error).toEqual({ code: "not_found", message: "no update u-1" });
    const r0 = await receiver(0, "engine-0");
    await receiver(1, "engine-1");
    const started = performance.now();
    const res = await fetch(`http://127.0.0.1:${daemon.port}/v1/updates`, {
      method: "POST",
      headers: { ...AUTH, "content-type": "application/json" },
      body: JSON.stringify({ checkpoint: "m", wait: false }),
    });
    expect(res.status).toBe(202);
    expect(res.headers.get("location")).toBe("/v1/updates/u-1");
    expect(await res.json()).toMatchObject({ id: "u-1", checkpoint: "m@1", state: "running" });
    const record = (
      await until(
        () => api("GET", "/v1/updates/u-1"),
        (r) => r.body.state !== "running",
      )
    ).body;
    const elapsed = (performance.now() - started) / 1000;
    expect(record.state).toBe("succeeded");
    expect(record).not.toHaveProperty("buckets");

    // Bytes: every bucket, as the timeline lists them.
    const { buckets } = (await api("GET", "/v1/updates/u-1?buckets=true")).body;
    expect(buckets).toHaveLength(record.progress.buckets);
    const bytes = buckets.reduce((n: number, b: { bytes: number }) => n + b.bytes, 0);
    const tensorBytes = tensors.reduce((n, t) => n + t.bytes.byteLength, 0);
    expect(record.progress.bytes).toBe(bytes);
    expect(record.progress.bytesDone).toBe(bytes);
    expect(bytes).toBeGreaterThanOrEqual(tensorBytes);

    // Timings: each phase within the whole, the whole within what the client waited.
    const { seconds, planSeconds, finishSeconds, gbps } = record.timings;
    expect(seconds).toBeGreaterThan(0);
    expect(seconds).toBeLessThanOrEqual(elapsed);
    expect(planSeconds).toBeGreaterThan(0);
    expect(planSeconds).toBeLessThan(seconds);
    expect(finishSeconds).toBeGreaterThan(0);
    expect(finishSeconds).toBeLessThan(seconds);
    expect(gbps).toBeCloseTo(bytes / seconds / 1e9, 9);
    expect(Date.parse(record.finishedAt)).toBeGreaterThanOrEqual(Date.parse(record.createdAt));

    // Each receiver was told what comes.
    expect(r0.seen.find((m) => m.op === "begin")).toEqual({
      op: "begin",
      update: "u-1",
      checkpoint: "m@1",
      tensors: tensors.length,
      buckets: record.progress.buckets,
      skipped: 0,
    });
    await expectDelivered(r0, "u-1", tensors);
    const line = logs.find((l) => l.msg === "update succeeded");
    expect(line).toMatchObject({ update: "u-1", checkpoint: "m@1", seconds, gbps });
    expect(logs.some((l) => l.msg === "update failed")).toBe(false);
  });

  it("refuses an update without receivers, and a second one while one runs, naming it", async () => {
    const { api, receiver, peer } = await start();
    await register(api);
    const none = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(none.status).toBe(409);
    expect(none.body.error).toEqual({
      code: "no_receivers",
      message: "no engine receiver is connected to this daemon",
    });
    // Refusing it took no lease: the version can go, and come back.
    await receiver(0, "slow", { stallAt: 1 });
    expect((await api("POST", "/v1/updates", { checkpoint: "m", wait: false })).status).toBe(202);
    const second = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(second.status).toBe(409);
    expect(second.body.error).toEqual({
      code: "update_running",
      message: "update u-1 of m@1 is running",
      details: { running: "u-1" },
    });
    expect((await peer("GET", "/v1/peer/info")).body.running).toBe("u-1");
    const ended = await until(
      () => api("GET", "/v1/updates/u-1"),
      (r) => r.body.state !== "running",
    );
    expect(ended.body.state).toBe("failed");
    // Idle again once its buffers settled.
    const idle = await until(
      () => peer("GET", "/v1/peer/info"),
      (r) => r.body.running === undefined,
    );
    expect(idle.body).not.toHaveProperty("running");
  });

  it("answers a failed update with its record's error code and message, and logs it", async () => {
    const { api, receiver, logs } = await start();
    await register(api);
    await receiver(0, "good");
    await receiver(1, "bad", { failAt: 1 });
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.code).toBe("receiver_failed");
    expect(res.body.error.message).toMatch(/^receiver bad \(pid \d+, GPU 1\) failed: injected failure at bucket 1$/);
    expect(res.body.error.details).toMatchObject({ id: "u-1", state: "failed", error: { code: "receiver_failed" } });
    const line = logs.find((l) => l.msg === "update failed");
    expect(line).toMatchObject({ update: "u-1", error: { code: "receiver_failed", message: res.body.error.message } });
    expect(logs.some((l) => l.msg === "update succeeded")).toBe(false);
  });

  it("says failed only once the daemon is idle again: the next update can start as soon as a poller sees it", async () => {
    const { api, receiver } = await start({ receiverTimeoutMs: 400 });
    await register(api);
    await receiver(0, "stuck", { stallAt: 1 });
    await receiver(1, "fine");
    expect((await api("POST", "/v1/updates", { checkpoint: "m", wait: false })).status).toBe(202);
    let record = (await api("GET", "/v1/updates/u-1")).body;
    while (record.state === "running") {
      expect(record.finishedAt).toBeUndefined();
      await new Promise((r) => setTimeout(r, 5));
      record = (await api("GET", "/v1/updates/u-1")).body;
    }
    expect(record).toMatchObject({ state: "failed", error: { code: "receiver_failed" } });
    expect(record.finishedAt).toBeDefined();
    const next = await api("POST", "/v1/updates", { checkpoint: "m", wait: false });
    expect(next.status).toBe(202);
    expect(next.body.id).toBe("u-2");
  });

  it("waits for `done` of this very update: another message does not end it", async () => {
    const { api, receiver } = await start({ hostDevices: 1, receiverTimeoutMs: 500 });
    await register(api);
    const r = await receiver(0, "confused", { neverDone: true });
    void r.next("end").then(() => {
      const send = (m: object) => (r as unknown as { send(m: object): void }).send(m);
      send({ op: "done", update: "u-0" });
      send({ op: "ack", update: "u-1", bucket: 0 });
    });
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(
      /^receiver confused \(pid \d+, GPU 0\) did not answer within 500 ms \(waiting for done\)$/,
    );
  });

  it("keeps the last 100 updates", async () => {
    const { api, receiver } = await start({ hostDevices: 1 });
    await register(api, "m", 1);
    await receiver(0, "engine");
    for (let i = 1; i <= 101; i++)
      expect((await api("POST", "/v1/updates", { checkpoint: "m" })).body.id).toBe(`u-${i}`);
    const ids = (await api("GET", "/v1/updates")).body.updates.map((u: { id: string }) => u.id);
    expect(ids).toEqual(Array.from({ length: 100 }, (_, i) => `u-${i + 2}`));
    expect((await api("GET", "/v1/updates/u-1")).status).toBe(404);
    expect((await api("GET", "/v1/updates/u-2")).body.state).toBe("succeeded");
  });

  it("plans each checkpoint for itself: the next one delivers its own tensors", async () => {
    const { api, receiver } = await start({ hostDevices: 1 });
    const m = await register(api, "m", 300);
    const n = await register(api, "n", 500);
    const r = await receiver(0, "engine");
    expect((await api("POST", "/v1/updates", { checkpoint: "m" })).body.state).toBe("succeeded");
    expect((await api("POST", "/v1/updates", { checkpoint: "n" })).body.state).toBe("succeeded");
    expect((await api("POST", "/v1/updates", { checkpoint: "m" })).body.state).toBe("succeeded");
    await expectDelivered(r, "u-1", m);
    await expectDelivered(r, "u-2", n);
    await expectDelivered(r, "u-3", m);
  });
});

describe("the peer API, driven as a coordinator drives it", () => {
  /** A plan for this daemon alone (one rank), of `ref`'s buckets owned by `owners`. */
  function plan(d: Daemon, update: string, o: { owners?: number[]; fresh?: boolean; fp?: string } = {}): PeerPlan {
    const v = d.registry.list().find((x) => x.id === "m@1");
    if (!v) throw new Error("m@1 is not registered");
    const { slots, slotBytes } = { slots: 3, slotBytes: 1 << 20 };
    const buckets = planBuckets(v.tensors, { bucketBytes: slotBytes, owners: [0], slots });
    const owners = o.owners ?? [0];
    return {
      update,
      coordinator: "c",
      checkpoint: { name: "m", fingerprint: o.fp ?? fingerprint(v) },
      comm: {
        key: `solo-${update}`,
        id: Buffer.from(d.context.commIdNew()).toString("hex"),
        fresh: o.fresh ?? true,
        nranks: 1,
      },
      firstRank: 0,
      slots,
      slotBytes,
      buckets: buckets.map((b, i) => ({ ...b, owner: owners[i % owners.length] as number })),
    };
  }

  it("describes itself: GPUs, geometry, what it holds, and the communicator it keeps after taking part", async () => {
    const { api, daemon, receiver, peer } = await start({ hostDevices: 1 });
    const tensors = await register(api);
    const fp = fingerprint(daemon.registry.list()[0] as never);
    const info = await peer("GET", `/v1/peer/info?checkpoint=m&fingerprint=${fp}`);
    expect(info.body).toEqual({ nodeId: "t", gpus: 1, slots: 3, slotBytes: 1 << 20, holds: "m@1", atomic: true });
    expect((await peer("GET", "/v1/peer/info?checkpoint=m&fingerprint=00")).body).not.toHaveProperty("holds");

    const r = await receiver(0, "engine");
    const p = plan(daemon, "u-5");
    const res = await peer("POST", "/v1/peer/updates", p);
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ id: "u-5@c", checkpoint: "m@1", state: "succeeded" });
    await expectDelivered(r, "u-5@c", tensors);
    expect((await peer("GET", "/v1/peer/info")).body.comm).toBe(`${p.comm.key} ${p.comm.id}`);

    // Its own update, which fails, leaves that communicator to the next multi-daemon update.
    r.behaviour = { failAt: 0 };
    expect((await api("POST", "/v1/updates", { checkpoint: "m" })).status).toBe(502);
    expect((await peer("GET", "/v1/peer/info")).body.comm).toBe(`${p.comm.key} ${p.comm.id}`);
  });

  it("stages an atomic part, commits at the coordinator's word, and drops it when no word comes", async () => {
    const { api, daemon, receiver, peer } = await start({ hostDevices: 1, receiverTimeoutMs: 300 });
    const tensors = await register(api);
    const r = await receiver(0, "engine", { stageBytes: 64 << 20 });
    const part = peer("POST", "/v1/peer/updates", { ...plan(daemon, "u-7"), cutover: "atomic" });
    expect(await peer("POST", "/v1/peer/updates/u-7@c/staged", {})).toMatchObject({
      status: 200,
      body: { staged: true },
    });
    expect(r.seen.some((m) => m.op === "commit")).toBe(false);
    expect(await peer("POST", "/v1/peer/updates/u-7@c/commit", {})).toMatchObject({
      status: 200,
      body: { committing: true },
    });
    expect((await part).body).toMatchObject({ id: "u-7@c", state: "succeeded", cutover: "atomic" });
    await expectDelivered(r, "u-7@c", tensors);
    // The coordinator is gone after the stage (no commit comes): within the bound, the engine
    // drops what it staged and keeps what it held, and the daemon says so.
    const held = await r.model();
    const lost = await peer("POST", "/v1/peer/updates", { ...plan(daemon, "u-8"), cutover: "atomic" });
    expect(lost.status).toBe(502);
    expect(lost.body.error.message).toMatch(
      /^the coordinator did not say commit within 1800 ms of every engine here staging/,
    );
    expect(lost.body.error.details.receivers).toMatchObject([{ state: "untouched", holds: "m@1" }]);
    expect(await r.model()).toEqual(held);
    expect(await r.saw((m) => m.op === "abort" && m.update === "u-8@c")).toBe(true);
    expect((await peer("POST", "/v1/peer/updates/u-9@c/staged", {})).status).toBe(404);
  });

  it("refuses an atomic part where an engine cannot stage, leasing nothing", async () => {
    const engines = [
      {
        name: "v",
        kind: "vllm" as const,
        api: "worker-extension" as const,
        pause: "none" as const,
        url: "http://127.0.0.1:9",
        gpus: [0],
      },
    ];
    const { api, daemon, peer } = await start({ hostDevices: 1, engines });
    await register(api);
    const res = await peer("POST", "/v1/peer/updates", { ...plan(daemon, "u-3"), cutover: "atomic" });
    expect(res.status).toBe(400);
    expect(res.body.error.message).toMatch(/^atomic cutover stages through receivers/);
    expect((await api("DELETE", "/v1/checkpoints/m@1")).status).toBe(200); // not leased
  });

  it("answers a failed part with its record's error code", async () => {
    const { api, daemon, receiver, peer } = await start({ hostDevices: 1 });
    await register(api);
    await receiver(0, "bad", { failAt: 1 });
    const res = await peer("POST", "/v1/peer/updates", plan(daemon, "u-2"));
    expect(res.status).toBe(502);
    expect(res.body.error.code).toBe("receiver_failed");
    expect(res.body.error.message).toMatch(/^receiver bad \(pid \d+, GPU 0\) failed: injected failure at bucket 1$/);
    expect(res.body.error.details).toMatchObject({ id: "u-2@c", state: "failed" });
  });

  it.each([
    { name: "every bucket", owners: [0] },
    { name: "some buckets", owners: [1, 0] },
  ])("refuses to copy $name of a checkpoint it does not hold", async ({ owners }) => {
    const { api, daemon, peer } = await start({ hostDevices: 1 });
    await register(api);
    const res = await peer("POST", "/v1/peer/updates", plan(daemon, "u-1", { owners, fp: "00" }));
    expect(res.status).toBe(409);
    expect(res.body.error).toEqual({ code: "not_held", message: "no ready version of m with that content" });
    expect((await api("GET", "/v1/updates")).body.updates).toEqual([]);
  });

  it.each([
    { name: "ranks below its own", owners: [-1] },
    { name: "ranks above its own", owners: [1, 2] },
  ])("takes part without the checkpoint when $name copy it", async ({ owners }) => {
    const { api, daemon, receiver, peer } = await start({ hostDevices: 1 });
    await register(api);
    await receiver(0, "engine");
    // A communicator it does not keep: the part fails at once, after its record was made.
    const res = await peer("POST", "/v1/peer/updates", plan(daemon, "u-1", { owners, fp: "00", fresh: false }));
    expect(res.status).toBe(502);
    expect(res.body.error.details).toMatchObject({
      id: "u-1@c",
      checkpoint: "m (from c)",
      state: "failed",
      error: { code: "update_failed", message: "communicator solo-u-1 is not known here" },
    });
  });

  it("aborts its part when the coordinator says so, with the coordinator's reason, and only that update", async () => {
    const { api, daemon, receiver, peer } = await start({ hostDevices: 1, receiverTimeoutMs: 10_000 });
    await register(api);
    expect((await peer("POST", "/v1/peer/updates/u-1/abort", { reason: "x" })).body).toEqual({ aborted: false });
    const r = await receiver(0, "engine", { stallAt: 1 });
    for (const [update, reason, want] of [
      ["u-1", "receiver elsewhere failed", "receiver elsewhere failed"],
      ["u-2", undefined, "aborted by the coordinator"],
    ] as const) {
      const pending = peer("POST", "/v1/peer/updates", plan(daemon, update));
      expect(await r.saw((m) => m.op === "bucket" && m.bucket === 1 && m.update === `${update}@c`, 5000)).toBe(true);
      expect((await peer("POST", "/v1/peer/updates/u-9/abort", { reason: "not this one" })).body).toEqual({
        aborted: false,
      });
      expect((await api("GET", `/v1/updates/${update}@c`)).body.state).toBe("running");
      const abort = await peer("POST", `/v1/peer/updates/${update}/abort`, reason ? { reason } : undefined);
      expect(abort).toEqual({ status: 200, body: { aborted: true } });
      const res = await within(3000, pending);
      expect(res.status).toBe(502);
      expect(res.body.error.message).toBe(want);
      expect(await r.saw((m) => m.op === "abort" && m.update === `${update}@c`)).toBe(true);
    }
  });
});

describe("updates across two daemons", () => {
  /** Two daemons that both hold m, of `cols` x 1024 floats and more: more buckets than slots when large. */
  async function pair(o: Partial<Config> = {}, cols = 300) {
    const peer = await start({ hostDevices: 1, ...o });
    const coordinator = await start({ hostDevices: 1, peers: [`http://127.0.0.1:${peer.daemon.port}`], ...o });
    const tensors = await register(coordinator.api, "m", cols);
    const dir = tensors[0]?.file.split("/").slice(0, -1).join("/");
    expect((await peer.api("POST", "/v1/checkpoints", { name: "m", dir })).status).toBe(201);
    return { peer, coordinator, tensors };
  }

  it("aborts the peer's part when the coordinator's own engine fails", async () => {
    // Bucket 1 never acked: its slot is not reused, so the peer waits for broadcasts that never come.
    const { peer, coordinator } = await pair({ receiverTimeoutMs: 10_000 }, 3000);
    await coordinator.receiver(0, "engine-a", { failAt: 1 });
    const b = await peer.receiver(0, "engine-b");
    const started = performance.now();
    const res = await coordinator.api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(
      /^receiver engine-a \(pid \d+, GPU 0\) failed: injected failure at bucket 1$/,
    );
    const part = await until(
      () => peer.api("GET", "/v1/updates/u-1@t"),
      (r) => r.body.state !== "running",
    );
    expect(part.body.state).toBe("failed");
    // The coordinator's reason, or the transport error of the communicator it aborted, whichever came first.
    const reason = part.body.error.message as string;
    expect(reason === res.body.error.message || reason.startsWith("ckpt_")).toBe(true);
    expect(await b.saw((m) => m.op === "abort" && m.update === "u-1@t")).toBe(true);
    expect(performance.now() - started).toBeLessThan(5000); // not the 10 s receiver timeout
  });

  it("fails when a peer's engine fails after this daemon's part ended, and reuses the communicator after", async () => {
    const { peer, coordinator, tensors } = await pair();
    const ctx = coordinator.daemon.context;
    const join = ctx.commInit.bind(ctx);
    let joins = 0;
    ctx.commInit = (...args: Parameters<typeof join>) => {
      joins++;
      return join(...args);
    };
    const a = await coordinator.receiver(0, "engine-a");
    const b = await peer.receiver(0, "engine-b");
    for (const id of ["u-1", "u-2"]) {
      expect((await coordinator.api("POST", "/v1/updates", { checkpoint: "m" })).body.state).toBe("succeeded");
      await expectDelivered(b, `${id}@t`, tensors);
    }
    // The same members with the same geometry: joined once.
    expect(joins).toBe(1);
    // A peer busy with its own update fails the next one before anything is joined or dropped.
    b.behaviour = { stallAt: 0 };
    expect((await peer.api("POST", "/v1/updates", { checkpoint: "m", wait: false })).status).toBe(202);
    const busy = await coordinator.api("POST", "/v1/updates", { checkpoint: "m" });
    expect(busy.body.error.message).toMatch(/^peer http:\/\/127\.0\.0\.1:\d+ is busy with update u-1$/);
    await until(
      () => peer.peer("GET", "/v1/peer/info"),
      (r) => r.body.running === undefined,
    );
    b.behaviour = {};
    expect((await coordinator.api("POST", "/v1/updates", { checkpoint: "m" })).body.state).toBe("succeeded");
    expect(joins).toBe(1);
    b.behaviour = { neverDone: true };
    const res = await coordinator.api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(
      /^peer http:\/\/127\.0\.0\.1:\d+ failed: receiver engine-b \(pid \d+, GPU 0\) did not answer within 1000 ms \(waiting for done\)$/,
    );
    // Its own engine has the whole version.
    await expectDelivered(a, "u-5", tensors);
    expect(res.body.error.details.receivers).toEqual([
      {
        name: "engine-a",
        pid: process.pid,
        gpu: 0,
        bucketsAcked: res.body.error.details.progress.buckets,
        state: "applied",
        holds: null, // the update failed: what it holds is not known
      },
    ]);
  });

  it("ends the peer's part at once when the coordinator fails, though the peer waits on its own engine", async () => {
    const { peer, coordinator } = await pair({ receiverTimeoutMs: 10_000 }, 3000);
    await coordinator.receiver(0, "engine-a", { failAt: 2 });
    await peer.receiver(0, "engine-b", { stallAt: 0 });
    const started = performance.now();
    expect((await coordinator.api("POST", "/v1/updates", { checkpoint: "m" })).status).toBe(502);
    const part = await until(
      () => peer.api("GET", "/v1/updates/u-1@t"),
      (r) => r.body.state !== "running",
    );
    expect(part.body.state).toBe("failed");
    expect(performance.now() - started).toBeLessThan(5000); // not its engine's 10 s timeout
  });

  it("gives up within the time limit on a peer that never answers the plan", async () => {
    // Describes itself like the coordinator and holds the checkpoint, then never answers the plan.
    const plans: string[] = [];
    const silent = createServer((req, res) => {
      res.setHeader("content-type", "application/json");
      if (req.url?.startsWith("/v1/peer/info")) {
        endSigned(req, res, JSON.stringify({ nodeId: "silent", gpus: 1, slots: 3, slotBytes: 1 << 20, holds: "m@1" }));
      } else if (req.url === "/v1/peer/updates") {
        plans.push(req.url);
      } else {
        endSigned(req, res, JSON.stringify({ aborted: false }));
      }
    });
    await new Promise<void>((r) => silent.listen(0, "127.0.0.1", r));
    cleanup.push(async () => {
      silent.closeAllConnections();
      await new Promise((r) => silent.close(r));
    });
    const url = `http://127.0.0.1:${(silent.address() as AddressInfo).port}`;
    const coordinator = await start({ hostDevices: 1, peers: [url], receiverTimeoutMs: 500 });
    await register(coordinator.api);
    await coordinator.receiver(0, "engine-a");
    const res = await within(4000, coordinator.api("POST", "/v1/updates", { checkpoint: "m" }));
    expect(res.status).toBe(502);
    expect(plans).toEqual(["/v1/peer/updates"]);
    expect((await coordinator.api("GET", "/v1/healthz")).body).toEqual({ ok: true });
  });
});
