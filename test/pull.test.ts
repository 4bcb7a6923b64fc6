/**
 * Pulls between daemons over UCX (host backend, loopback, UCX's tcp): a version registered on
 * one daemon is pulled by another from the peers that hold it, striped over them, every byte
 * checked; a source serving corrupted bytes, one that dies and one that was never there leave
 * the pull complete from the others, or failed naming what is missing, with nothing pinned.
 */

import { randomBytes } from "node:crypto";
import { readFileSync, truncateSync } from "node:fs";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import type { Config } from "../daemon/config/index.ts";
import { writeModel, writeTensors } from "./checkpoint-files.ts";
import { AUTH, tempDir } from "./helpers.ts";
import { apiOf, startInProcess, testConfig } from "./in-process.ts";
import { ReferenceReceiver } from "./reference-receiver.ts";

const cleanup: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

const FAST = { heartbeatMs: 50, peerDownMs: 400, ucxTransports: "tcp", pullChunkBytes: 64 << 10, pullStallMs: 2000 };

async function daemon(nodeId: string, extra: Partial<Config> = {}) {
  const stateDir = tempDir();
  const d = await startInProcess(testConfig({ hostDevices: 1, stateDir, bucketSlots: 2, ...FAST, ...extra }), nodeId);
  let stopped = false;
  const stop = async () => {
    if (!stopped) await d.stop();
    stopped = true;
  };
  cleanup.push(stop);
  return { d, api: apiOf(d.port), url: `http://127.0.0.1:${d.port}`, stateDir, stop };
}

/** Waits until `x` sees every one of `ids` up. */
async function seesUp(x: { api: ReturnType<typeof apiOf> }, ids: string[]): Promise<void> {
  const end = Date.now() + 5000;
  for (;;) {
    const peers = (await x.api("GET", "/v1/peers")).body.peers as {
      nodeId: string;
      state: string;
      versions: unknown[];
    }[];
    if (ids.every((id) => peers.some((p) => p.nodeId === id && p.state === "up" && p.versions.length > 0))) return;
    if (Date.now() > end) throw new Error(`never saw ${ids} up: ${JSON.stringify(peers)}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** Waits until `x` sees an up peer holding a version with this fingerprint. */
async function seesVersion(x: { api: ReturnType<typeof apiOf> }, fingerprint: string): Promise<void> {
  const end = Date.now() + 5000;
  for (;;) {
    const peers = (await x.api("GET", "/v1/peers")).body.peers as {
      state: string;
      versions: { fingerprint: string }[];
    }[];
    if (peers.some((p) => p.state === "up" && p.versions.some((v) => v.fingerprint === fingerprint))) return;
    if (Date.now() > end) throw new Error(`never saw ${fingerprint}: ${JSON.stringify(peers)}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** The fingerprint of version n of the first checkpoint `x` holds. */
async function fingerprintOf(x: { api: ReturnType<typeof apiOf> }, n: number): Promise<string> {
  const versions = (await x.api("GET", "/v1/peers")).body.self.versions as { version: number; fingerprint: string }[];
  return (versions.find((v) => v.version === n) as { fingerprint: string }).fingerprint;
}

/** The files of a model written under /dev/shm, and their bytes. */
function model(files = 2, layers = 8, hidden = 256) {
  const dir = tempDir("ckptd-test-", "/dev/shm");
  writeModel(dir, files, layers, hidden);
  const paths = Array.from({ length: files }, (_, f) => join(dir, `model-${f + 1}-of-${files}.safetensors`));
  return { dir, bytes: paths.map((p) => readFileSync(p)) };
}

describe("pull over UCX", () => {
  it("pulls a version from two sources, striped, each byte the sources' own", async () => {
    const m = model();
    const a = await daemon("node-a");
    const b = await daemon("node-b", { peers: [a.url] });
    expect((await a.api("POST", "/v1/checkpoints", { name: "m", dir: m.dir })).status).toBe(201);
    expect((await b.api("POST", "/v1/checkpoints", { name: "m", dir: m.dir })).status).toBe(201);
    const c = await daemon("node-c", { peers: [a.url] });
    await seesUp(c, ["node-a", "node-b"]);
    const res = await c.api("POST", "/v1/checkpoints", { name: "m", pull: {} });
    expect(res.status, JSON.stringify(res.body)).toBe(201);
    expect(res.body).toMatchObject({ name: "m", version: 1, state: "ready", origin: "pull" });
    const pulled = c.d.registry.get("m");
    for (const [i, p] of pulled.pinned.entries())
      expect(Buffer.compare(Buffer.from(p.mem.view()), m.bytes[i] as Buffer)).toBe(0);
    const pull = (await c.api("GET", "/v1/checkpoints/m@1")).body.progress.pull;
    expect(pull.sources.map((s: { nodeId: string }) => s.nodeId).sort()).toEqual(["node-a", "node-b"]);
    expect(pull.sources.every((s: { bytes: number }) => s.bytes > 0)).toBe(true);
    expect(pull.bytesVerified).toBe(pulled.bytes);
    expect(pull.leftOut).toEqual([]);
    const fpA = (await a.api("GET", "/v1/peers")).body.self.versions[0].fingerprint;
    const fpC = (await c.api("GET", "/v1/peers")).body.self.versions[0].fingerprint;
    expect(fpC).toBe(fpA);
    const metrics = await (await fetch(`${c.url}/metrics`, { headers: AUTH })).text();
    expect(metrics).toMatch(/ckptd_pull_source_bytes\{checkpoint="m@1",source="node-a",state="done"\} [1-9]\d*/);
    expect(metrics).toContain(`ckptd_pull_verified_bytes{checkpoint="m@1",state="ready"} ${pulled.bytes}`);
  });
});

/** Five F32 tensors of side x side, and the writing of their bytes to a new file in /dev/shm. */
function fiveTensors(side: number) {
  const specs = ["a", "b", "c", "d", "e"].map((name) => ({ name, dtype: "F32", shape: [side, side] }));
  const write = (bytes: Buffer[]) => {
    const path = join(tempDir("ckptd-test-", "/dev/shm"), "m.safetensors");
    writeTensors(
      path,
      specs.map((t, i) => ({ ...t, bytes: bytes[i] as Buffer })),
    );
    return path;
  };
  return { specs, write };
}

describe("pulls of a version next to one held here", () => {
  // Five tensors of 64 KiB; version 2 changes two of them.
  const { specs, write } = fiveTensors(128);

  it("copies the tensors it holds with the same hash and fetches only the others; a held copy that hashes wrong is fetched", async () => {
    const v1 = specs.map(() => randomBytes(128 * 128 * 4));
    const v2 = v1.map((b, i) => (i === 1 || i === 3 ? randomBytes(b.length) : b));
    const a = await daemon("node-a");
    expect((await a.api("POST", "/v1/checkpoints", { name: "m", files: [write(v1)] })).status).toBe(201);
    const c = await daemon("node-c", { peers: [a.url] });
    await seesUp(c, ["node-a"]);
    const first = await c.api("POST", "/v1/checkpoints", { name: "m", pull: {} });
    expect(first.status).toBe(201);
    const v2file = write(v2);
    expect((await a.api("POST", "/v1/checkpoints", { name: "m", files: [v2file] })).status).toBe(201);
    const fp2 = await fingerprintOf(a, 2);
    await seesVersion(c, fp2);
    const second = await c.api("POST", "/v1/checkpoints", { name: "m", pull: { fingerprint: fp2 } });
    expect(second.status, JSON.stringify(second.body)).toBe(201);
    const pulled = c.d.registry.get(second.body.id);
    expect(Buffer.compare(Buffer.from(pulled.pinned[0]?.mem.view() as Uint8Array), readFileSync(v2file))).toBe(0);
    const pull = (await c.api("GET", `/v1/checkpoints/${second.body.id}`)).body.progress.pull;
    expect(pull.bytesLocal).toBe(3 * 128 * 128 * 4);
    expect(pull.bytesFetched).toBe(pulled.bytes - pull.bytesLocal);
    expect(pull.mismatches).toBe(0);

    // The held version's memory is damaged: its tensors hash wrong here and come from the source.
    const held = c.d.registry.get(second.body.id).pinned[0]?.mem.view() as Uint8Array;
    held[held.length - 10] = (held[held.length - 10] as number) ^ 0xff; // inside e, which m@3 keeps
    const v3file = write(v2.map((b, i) => (i === 0 ? randomBytes(b.length) : b)));
    expect((await a.api("POST", "/v1/checkpoints", { name: "m", files: [v3file] })).status).toBe(201);
    const fp3 = await fingerprintOf(a, 3);
    await seesVersion(c, fp3);
    const third = await c.api("POST", "/v1/checkpoints", { name: "m", pull: { fingerprint: fp3 } });
    expect(third.status, JSON.stringify(third.body)).toBe(201);
    const again = c.d.registry.get(third.body.id);
    expect(Buffer.compare(Buffer.from(again.pinned[0]?.mem.view() as Uint8Array), readFileSync(v3file))).toBe(0);
    const pull3 = (await c.api("GET", `/v1/checkpoints/${third.body.id}`)).body.progress.pull;
    expect(pull3.mismatches).toBeGreaterThanOrEqual(1);
  });
});

describe("pulls of the version after one held here, with deltas", () => {
  const { specs, write } = fiveTensors(256);

  it("fetches the deltas of the changed tensors instead of the tensors: a few % of the bytes on the wire", async () => {
    const v1 = specs.map(() => randomBytes(256 * 256 * 4));
    // 1% of the elements of b and d change; the rest stays.
    const v2 = v1.map((b, i) => {
      const out = Buffer.from(b);
      if (i === 1 || i === 3) for (let e = 0; e < out.length / 4; e += 100) out.writeFloatLE(e, e * 4);
      return out;
    });
    const a = await daemon("node-a");
    expect((await a.api("POST", "/v1/checkpoints", { name: "m", files: [write(v1)] })).status).toBe(201);
    const c = await daemon("node-c", { peers: [a.url] });
    await seesUp(c, ["node-a"]);
    expect((await c.api("POST", "/v1/checkpoints", { name: "m", pull: {} })).status).toBe(201);
    const v2file = write(v2);
    expect((await a.api("POST", "/v1/checkpoints", { name: "m", files: [v2file] })).status).toBe(201);
    await expect
      .poll(async () => (await a.api("GET", "/v1/checkpoints/m@2")).body.delta?.tensors, { timeout: 5000 })
      .toBe(2);
    const fp2 = await fingerprintOf(a, 2);
    await seesVersion(c, fp2);
    const second = await c.api("POST", "/v1/checkpoints", { name: "m", pull: { fingerprint: fp2 } });
    expect(second.status, JSON.stringify(second.body)).toBe(201);
    const pulled = c.d.registry.get(second.body.id);
    expect(Buffer.compare(Buffer.from(pulled.pinned[0]?.mem.view() as Uint8Array), readFileSync(v2file))).toBe(0);
    const pull = (await c.api("GET", `/v1/checkpoints/${second.body.id}`)).body.progress.pull;
    expect(pull.mismatches).toBe(0);
    expect(pull.bytesLocal).toBe(5 * 256 * 256 * 4); // every tensor: three held, two patched
    expect(pull.bytesFetched).toBeLessThan(0.05 * pulled.bytes);
    expect(pull.bytesFetched).toBeGreaterThan(2 * 656 * 8); // the deltas did come over the wire
  });
});

describe("pulls into pooled memory", () => {
  it("pins nothing new for a pull after a version of the same layout was dropped", async () => {
    const m = model();
    const a = await daemon("node-a");
    expect((await a.api("POST", "/v1/checkpoints", { name: "m", dir: m.dir })).status).toBe(201);
    const c = await daemon("node-c", { peers: [a.url] });
    await seesUp(c, ["node-a"]);
    const first = await c.api("POST", "/v1/checkpoints", { name: "m", pull: {} });
    expect(first.status).toBe(201);
    expect((await c.api("DELETE", `/v1/checkpoints/${first.body.id}`)).status).toBe(200);
    const pooled = (await c.api("GET", "/v1/status")).body.checkpoints.pool;
    expect(pooled).toMatchObject({ blocks: 2, fresh: 2, reused: 0 });
    const second = await c.api("POST", "/v1/checkpoints", { name: "m", pull: {} });
    expect(second.status).toBe(201);
    expect((await c.api("GET", "/v1/status")).body.checkpoints.pool).toMatchObject({ blocks: 0, fresh: 2, reused: 2 });
    const pulled = c.d.registry.get("m");
    for (const [i, p] of pulled.pinned.entries())
      expect(Buffer.compare(Buffer.from(p.mem.view()), m.bytes[i] as Buffer)).toBe(0);
  });
});

describe("pull failures", () => {
  it("refetches what a corrupting source served from the other source, and completes verified", async () => {
    // Tensors of 16 KiB or less: every range holds whole ones, so a source alone serves some;
    // one lane of four ranges each, so that both sources get some of the few ranges there are.
    const m = model(2, 16, 64);
    const one = { ucxLanes: 1 };
    const a = await daemon("node-a", { testFaults: ["corrupt-serve"], ...one });
    const b = await daemon("node-b", { peers: [a.url], ...one });
    for (const x of [a, b])
      expect((await x.api("POST", "/v1/checkpoints", { name: "m", dir: m.dir })).status).toBe(201);
    const c = await daemon("node-c", { peers: [a.url], ...one });
    await seesUp(c, ["node-a", "node-b"]);
    const res = await c.api("POST", "/v1/checkpoints", { name: "m", pull: {} });
    expect(res.status, JSON.stringify(res.body)).toBe(201);
    const pull = res.body.progress.pull;
    expect(pull.mismatches).toBeGreaterThan(0);
    // a piece that only it served hashed wrong: it is dropped, and the rest came from node-b
    const byId = Object.fromEntries(pull.sources.map((s: { nodeId: string }) => [s.nodeId, s]));
    expect(byId["node-a"]).toMatchObject({
      state: "failed",
      error: expect.stringMatching(/that do not match its hash/),
    });
    expect(byId["node-b"].state).toBe("done");
    const pulled = c.d.registry.get("m");
    for (const [i, p] of pulled.pinned.entries())
      expect(Buffer.compare(Buffer.from(p.mem.view()), m.bytes[i] as Buffer)).toBe(0);
  });

  it("fails naming what is missing when only a corrupting source has it, leaves nothing pinned, and the next pull works", async () => {
    const m = model(1, 4, 128);
    const a = await daemon("node-a", { testFaults: ["corrupt-serve"] });
    expect((await a.api("POST", "/v1/checkpoints", { name: "m", dir: m.dir })).status).toBe(201);
    const c = await daemon("node-c", { peers: [a.url] });
    await seesUp(c, ["node-a"]);
    const res = await c.api("POST", "/v1/checkpoints", { name: "m", pull: {} });
    expect(res.status).toBe(502);
    expect(res.body.error.code).toBe("pull_failed");
    expect(res.body.error.message).toMatch(/no live source can give \d+ of \d+ bytes \("model\./);
    const list = (await c.api("GET", "/v1/checkpoints")).body;
    expect(list.pinnedBytes).toBe(0);
    expect((await c.api("GET", "/v1/status")).body.checkpoints.pool).toMatchObject({ bytes: 0, blocks: 0 });
    expect(list.checkpoints.map((x: { state: string }) => x.state)).toEqual(["failed"]);
    const b = await daemon("node-b", { peers: [a.url] });
    expect((await b.api("POST", "/v1/checkpoints", { name: "m", dir: m.dir })).status).toBe(201);
    await seesUp(c, ["node-b"]);
    const again = await c.api("POST", "/v1/checkpoints", { name: "m", pull: { from: [b.url] } });
    expect(again.status, JSON.stringify(again.body)).toBe(201);
    expect(again.body.progress.pull.sources.map((s: { nodeId: string }) => s.nodeId)).toEqual(["node-b"]);
  });

  it("survives a source file truncated while it is served: the source turns stale, the pull fails naming it", async () => {
    // 256 MiB in ranges of 64 KiB: the file is cut while the source is still sending. UCX's tcp
    // sends from the file's pages with the kernel, which answers EIO for the pages cut, not a
    // SIGBUS: the connection fails, the daemon does not.
    const dir = tempDir("ckptd-test-", "/dev/shm");
    writeModel(dir, 1, 64, 1024);
    const a = await daemon("node-a", { ucxLanes: 1 });
    expect((await a.api("POST", "/v1/checkpoints", { name: "m", dir })).status).toBe(201);
    const c = await daemon("node-c", { peers: [a.url], ucxLanes: 1 });
    await seesUp(c, ["node-a"]);
    const pull = c.api("POST", "/v1/checkpoints", { name: "m", pull: {} });
    for (let verified = 0; verified === 0; await new Promise((r) => setTimeout(r, 2))) {
      verified = (await c.api("GET", "/v1/checkpoints/m@1")).body.progress?.pull?.bytesVerified ?? 0;
    }
    truncateSync(join(dir, "model-1-of-1.safetensors"), 4096);
    const res = await pull;
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(/no live source can give \d+ of \d+ bytes .*node-a: /);
    const served = (await a.api("GET", "/v1/checkpoints")).body.checkpoints;
    expect(served.map((x: { state: string }) => x.state)).toEqual(["stale"]);
    expect((await c.api("GET", "/v1/checkpoints")).body.pinnedBytes).toBe(0);
    // The source still answers, and serves what is registered again.
    writeModel(dir, 1, 4, 64);
    expect((await a.api("POST", "/v1/checkpoints", { name: "m", dir })).status).toBe(201);
    await seesUp(c, ["node-a"]);
    const again = await c.api("POST", "/v1/checkpoints", { name: "m", pull: {} });
    expect(again.status, JSON.stringify(again.body)).toBe(201);
  });

  it("says clearly when no peer holds what is asked, and refuses a pull beside files", async () => {
    const a = await daemon("node-a");
    const c = await daemon("node-c", { peers: [a.url] });
    const none = await c.api("POST", "/v1/checkpoints", { name: "nope", pull: {} });
    expect(none.status).toBe(409);
    expect(none.body.error).toMatchObject({ code: "no_source", message: 'no up peer holds a version of "nope"' });
    const fp = "ab".repeat(32);
    const byFp = await c.api("POST", "/v1/checkpoints", { name: "nope", pull: { fingerprint: fp } });
    expect(byFp.body.error.message).toBe(`no up peer holds "nope" with fingerprint ${fp.slice(0, 16)}`);
    const gone = await c.api("POST", "/v1/checkpoints", { name: "m", pull: { from: ["http://127.0.0.1:1"] } });
    expect(gone.status).toBe(409);
    expect(gone.body.error.message).toMatch(/no source could give "m"/);
    const both = await c.api("POST", "/v1/checkpoints", { name: "m", dir: "/dev/shm", pull: {} });
    expect(both.status).toBe(400);
    expect((await c.api("GET", "/v1/checkpoints")).body.checkpoints).toEqual([]);
  });

  it("answers a pull manifest only to a request signed with the cluster secret", async () => {
    const a = await daemon("node-a");
    const res = await fetch(`${a.url}/v1/peer/pull`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ name: "m" }),
    });
    expect(res.status).toBe(401);
  });
});

describe("updates with pull", () => {
  async function receiverOn(stateDir: string, name: string) {
    const r = new ReferenceReceiver(join(stateDir, "sockets", "gpu-0.sock"), name);
    await r.connect();
    cleanup.push(() => r.close());
    return r;
  }

  it("pulls what this daemon lacks and gives each bucket to its engines once verified", async () => {
    const m = model();
    const a = await daemon("node-a");
    expect((await a.api("POST", "/v1/checkpoints", { name: "m", dir: m.dir })).status).toBe(201);
    const c = await daemon("node-c", { peers: [a.url], bucketBytes: 1 << 20 });
    await seesUp(c, ["node-a"]);
    const r = await receiverOn(c.stateDir, "engine-c");
    // verify: a version still being pulled is checked piece by piece as it lands, not on the GPU.
    const res = await c.api("POST", "/v1/updates", { checkpoint: "m", pull: true, verify: true });
    expect(res.status, JSON.stringify(res.body)).toBe(200);
    expect(res.body).toMatchObject({ state: "succeeded", checkpoint: "m@1" });
    const source = (await a.api("GET", "/v1/checkpoints/m")).body.tensors as { name: string; hash: string }[];
    expect(Object.fromEntries(r.hashes.get(res.body.id) ?? [])).toEqual(
      Object.fromEntries(source.map((t) => [t.name, t.hash])),
    );
    expect((await c.api("GET", "/v1/checkpoints/m@1")).body).toMatchObject({ state: "ready", origin: "pull" });
    // held now: the next update with pull sends it without pulling again
    const next = await c.api("POST", "/v1/updates", { checkpoint: "m", pull: true });
    expect(next.body).toMatchObject({ state: "succeeded", checkpoint: "m@1" });
    expect((await c.api("GET", "/v1/checkpoints")).body.checkpoints).toHaveLength(1);
  });

  it("fails the update with the pull's reason when the pull fails, and keeps nothing pinned", async () => {
    const m = model(1, 4, 128);
    const a = await daemon("node-a", { testFaults: ["corrupt-serve"] });
    expect((await a.api("POST", "/v1/checkpoints", { name: "m", dir: m.dir })).status).toBe(201);
    const c = await daemon("node-c", { peers: [a.url], bucketBytes: 1 << 20 });
    await seesUp(c, ["node-a"]);
    await receiverOn(c.stateDir, "engine-c");
    const res = await c.api("POST", "/v1/updates", { checkpoint: "m", pull: true });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(/no live source can give/);
    const end = Date.now() + 3000;
    while ((await c.api("GET", "/v1/checkpoints")).body.pinnedBytes !== 0 && Date.now() < end)
      await new Promise((x) => setTimeout(x, 20));
    expect((await c.api("GET", "/v1/checkpoints")).body.pinnedBytes).toBe(0);
    const bad = await c.api("POST", "/v1/updates", { checkpoint: "m", pull: true, peers: [] });
    expect(bad.status).toBe(400);
    expect(bad.body.error.message).toMatch(/give no peers/);
  });
});

describe("elastic start (join)", () => {
  it("pulls the fleet's version at start, and every engine that connects gets it without a call", async () => {
    const m = model();
    const a = await daemon("node-a");
    expect((await a.api("POST", "/v1/checkpoints", { name: "m", dir: m.dir })).status).toBe(201);
    const source = (await a.api("GET", "/v1/checkpoints/m")).body.tensors as { name: string; hash: string }[];
    const expected = Object.fromEntries(source.map((t) => [t.name, t.hash]));
    const c = await daemon("node-c", { peers: [a.url], join: { checkpoint: "m" }, bucketBytes: 1 << 20 });
    const first = new ReferenceReceiver(join(c.stateDir, "sockets", "gpu-0.sock"), "engine-1");
    await first.connect();
    cleanup.push(() => first.close());
    const got = async (r: ReferenceReceiver) => {
      const end = Date.now() + 10_000;
      while (r.hashes.size === 0 && Date.now() < end) await new Promise((x) => setTimeout(x, 25));
      return Object.fromEntries([...r.hashes.values()].at(-1) ?? []);
    };
    expect(await got(first)).toEqual(expected);
    expect((await c.api("GET", "/v1/status")).body.join).toMatchObject({
      checkpoint: "m",
      state: "ready",
      version: "m@1",
    });
    const later = new ReferenceReceiver(join(c.stateDir, "sockets", "gpu-0.sock"), "engine-2");
    await later.connect();
    cleanup.push(() => later.close());
    expect(await got(later)).toEqual(expected);
  });
});
