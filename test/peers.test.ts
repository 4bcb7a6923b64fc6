/**
 * Daemons finding each other (host backend, loopback): from one seed, through POST /v1/peers,
 * heartbeats spreading what each knows; a daemon that stops says it left, one killed is down
 * after peerDownMs and up again when it returns; updates span the daemons that are up and name
 * those left out; the peer routes refuse what is not signed and never show the secret.
 */
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import pino from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { checkAnswer, signedHeaders } from "../daemon/auth/signature.ts";
import type { Config } from "../daemon/config/index.ts";
import { Gossip } from "../daemon/peers/gossip.ts";
import { Members } from "../daemon/peers/members.ts";
import { ckptHash, writeModel } from "./checkpoint-files.ts";
import { CLUSTER_SECRET, daemonCommand, type Running, startProcess, tempDir, within } from "./helpers.ts";
import { apiOf, startInProcess, testConfig } from "./in-process.ts";
import { ReferenceReceiver } from "./reference-receiver.ts";

const cleanup: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

const FAST = { heartbeatMs: 50, peerDownMs: 400 };

async function daemon(nodeId: string, extra: Partial<Config> = {}) {
  const stateDir = tempDir();
  const d = await startInProcess(
    testConfig({ hostDevices: 1, stateDir, registerRoots: ["/dev/shm", tmpdir()], bucketSlots: 2, ...FAST, ...extra }),
    nodeId,
  );
  let stopped = false;
  const stop = async () => {
    if (!stopped) await d.stop();
    stopped = true;
  };
  cleanup.push(stop);
  return { d, api: apiOf(d.port), url: `http://127.0.0.1:${d.port}`, stateDir, stop };
}

type Peer = { nodeId: string; state: string; url: string };

/** Polls GET /v1/peers until `pred` holds of the peers (bounded). */
async function until(api: ReturnType<typeof apiOf>, pred: (peers: Peer[]) => boolean, ms = 3000): Promise<Peer[]> {
  const end = Date.now() + ms;
  for (;;) {
    const peers = (await api("GET", "/v1/peers")).body.peers as Peer[];
    if (pred(peers)) return peers;
    if (Date.now() > end) throw new Error(`peers never matched: ${JSON.stringify(peers)}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}
const states = (peers: Peer[]) => Object.fromEntries(peers.map((p) => [p.nodeId, p.state]));

describe("membership", () => {
  it("finds the whole fleet from one seed and from POST /v1/peers to any one daemon", async () => {
    const a = await daemon("node-a");
    const b = await daemon("node-b", { peers: [a.url] });
    const c = await daemon("node-c", { peers: ["http://127.0.0.1:1"] });
    expect((await c.api("GET", "/v1/peers")).body.contacting).toEqual(["http://127.0.0.1:1"]); // a seed not up yet
    const joined = await c.api("POST", "/v1/peers", { url: `${b.url}/` });
    expect(joined.status).toBe(200);
    expect(joined.body).toMatchObject({ nodeId: "node-b", state: "up", url: b.url, backend: "host", gpus: 1 });
    // c knew only b; a knew nobody: each learns the two others through the heartbeats
    for (const [x, others] of [
      [a, ["node-b", "node-c"]],
      [b, ["node-a", "node-c"]],
      [c, ["node-a", "node-b"]],
    ] as const) {
      const peers = await until(x.api, (p) => others.every((id) => states(p)[id] === "up"));
      expect(peers.map((p) => p.nodeId).sort()).toEqual([...others]);
    }
    const self = (await a.api("GET", "/v1/peers")).body.self;
    expect(self).toMatchObject({ nodeId: "node-a", url: a.url, backend: "host", gpus: 1, versions: [] });
  });

  it("says what each daemon holds, and what its engines received last", async () => {
    const a = await daemon("node-a");
    const b = await daemon("node-b", { peers: [a.url] });
    const dir = tempDir();
    writeModel(dir, 1, 1, 64);
    expect((await b.api("POST", "/v1/checkpoints", { name: "m", dir })).status).toBe(201);
    const r = new ReferenceReceiver(`${b.stateDir}/sockets/gpu-0.sock`, "engine-b");
    await r.connect();
    cleanup.push(() => r.close());
    expect((await b.api("POST", "/v1/updates", { checkpoint: "m", peers: [] })).body.state).toBe("succeeded");
    const peers = await until(a.api, (p) => p.some((x) => (x as unknown as { delivered?: string }).delivered));
    const seen = peers.find((p) => p.nodeId === "node-b") as unknown as {
      versions: { name: string; version: number; fingerprint: string; bytes: number }[];
      delivered: string;
      lastSeen: string;
    };
    expect(seen.versions).toEqual([
      {
        name: "m",
        version: 1,
        fingerprint: expect.stringMatching(/^[0-9a-f]{64}$/),
        bytes: expect.any(Number),
        registeredAt: expect.any(String),
      },
    ]);
    expect(seen.delivered).toBe(seen.versions[0]?.fingerprint);
    expect(Date.now() - Date.parse(seen.lastSeen)).toBeLessThan(2000);
  });

  it("a daemon stopping says it left; one killed is down after peerDownMs, and up again when it returns", async () => {
    const a = await daemon("node-a");
    const c = await daemon("node-c", { peers: [a.url] });
    const stateDir = tempDir();
    const args = ["--host-devices", "1", "--heartbeat-ms", "50", "--peer-down-ms", "400", "--peers", a.url];
    const run = () => startProcess(daemonCommand("node"), ["--backend", "host", ...args], {}, { stateDir });
    let p: Running = await run();
    cleanup.push(async () => {
      p.proc.kill("SIGKILL");
      await p.exited;
    });
    const pid = (await until(a.api, (peers) => peers.length === 2 && peers.every((x) => x.state === "up"))).find(
      (x) => x.nodeId !== "node-c",
    )?.nodeId as string;
    await c.stop();
    expect(states(await until(a.api, (peers) => states(peers)["node-c"] === "left"))["node-c"]).toBe("left");
    const killed = Date.now();
    p.proc.kill("SIGKILL");
    await p.exited;
    await until(a.api, (peers) => states(peers)[pid] === "down", 3000);
    expect(Date.now() - killed).toBeGreaterThanOrEqual(350); // peerDownMs, not another failure
    p = await run(); // the same state directory: the same node id
    expect(states(await until(a.api, (peers) => states(peers)[pid] === "up"))[pid]).toBe("up");
  });

  it("an update spans the daemons that are up, leaves out and names the others, or takes only those asked", async () => {
    const a = await daemon("node-a");
    const b = await daemon("node-b", { peers: [a.url] });
    const dir = tempDir();
    const tensors = writeModel(dir, 1, 2, 64);
    expect((await a.api("POST", "/v1/checkpoints", { name: "m", dir })).status).toBe(201);
    const ra = new ReferenceReceiver(`${a.stateDir}/sockets/gpu-0.sock`, "engine-a");
    const rb = new ReferenceReceiver(`${b.stateDir}/sockets/gpu-0.sock`, "engine-b");
    for (const r of [ra, rb]) {
      await r.connect();
      cleanup.push(() => r.close());
    }
    await until(a.api, (peers) => states(peers)["node-b"] === "up");
    const both = await a.api("POST", "/v1/updates", { checkpoint: "m" });
    expect(both.body.state).toBe("succeeded");
    for (const t of tensors) expect(rb.hashes.get("u-1@node-a")?.get(t.name)).toBe(await ckptHash(t.bytes));
    const alone = await a.api("POST", "/v1/updates", { checkpoint: "m", peers: [] });
    expect(alone.body.state).toBe("succeeded");
    expect(rb.hashes.has("u-2@node-a")).toBe(false);
    const unknown = await a.api("POST", "/v1/updates", { checkpoint: "m", peers: ["node-z"] });
    expect(unknown.status).toBe(400);
    expect(unknown.body.error.message).toBe("peers: node-z is no daemon this one knows (GET /v1/peers)");
    await b.stop();
    await until(a.api, (peers) => states(peers)["node-b"] === "left");
    const after = await a.api("POST", "/v1/updates", { checkpoint: "m" });
    expect(after.body.state).toBe("succeeded");
    expect(after.body.leftOut).toEqual([{ nodeId: "node-b", url: b.url, state: "left" }]);
  });

  it("refuses unsigned or wrongly signed peer requests, and shows the secret nowhere", async () => {
    const a = await daemon("node-a");
    const b = await daemon("node-b", { peers: [a.url] });
    await until(a.api, (peers) => states(peers)["node-b"] === "up");
    const body = JSON.stringify({
      self: { nodeId: "evil", url: "http://10.9.9.9:1", backend: "host", gpus: 1, versions: [], startedAt: 1, beat: 1 },
      members: [],
    });
    const unsigned: Record<string, string>[] = [
      {},
      { "x-ckptd-signature": "00", "x-ckptd-timestamp": String(Date.now() / 1000), "x-ckptd-to": "*" },
    ];
    for (const headers of unsigned) {
      const res = await fetch(`${a.url}/v1/peer/heartbeat`, {
        method: "POST",
        headers: { "content-type": "application/json", ...headers },
        body,
      });
      expect(res.status).toBe(401);
      expect((await res.json()).error.code).toBe("unauthorized");
    }
    expect(states((await a.api("GET", "/v1/peers")).body.peers)).toEqual({ "node-b": "up" });
    const leave = await fetch(`${a.url}/v1/peer/leave`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: '{"nodeId":"node-b"}',
    });
    expect(leave.status).toBe(401);
    for (const x of [a, b])
      expect(JSON.stringify((await x.api("GET", "/v1/peers")).body)).not.toContain(CLUSTER_SECRET);
  });

  it("resolves a peerDns name to every address, contacts each, keeps trying those that do not answer", async () => {
    const b = await daemon("node-b");
    const log = pino({ level: "silent" });
    const members = new Members("node-x", 1000);
    const secret = Buffer.from(CLUSTER_SECRET);
    const asked: string[] = [];
    const gossip = new Gossip({
      members,
      self: () => ({
        nodeId: "node-x",
        url: "http://127.0.0.1:9",
        backend: "host",
        gpus: 1,
        versions: [],
        startedAt: 1,
        beat: 1,
      }),
      sign: Object.assign(
        (method: string, url: string, to: string, body?: Uint8Array) => signedHeaders(secret, method, url, to, body),
        {
          answered: (rs: string, body: Uint8Array, given: string | null) => checkAnswer(secret, rs, body, given),
        },
      ),
      log,
      heartbeatMs: 200,
      dns: [`http://fleet.test:${b.d.port}`],
      resolve: async (host) => {
        asked.push(host);
        return ["127.0.0.1", "::1"]; // b listens on 127.0.0.1 only
      },
    });
    await gossip.tick();
    expect(asked).toEqual(["fleet.test"]);
    expect(members.up().map((m) => m.nodeId)).toEqual(["node-b"]);
    expect(members.pending()).toEqual([`http://[::1]:${b.d.port}`]);
    expect(states(await until(b.api, (p) => states(p)["node-x"] === "up"))["node-x"]).toBe("up");
  });

  it("takes no answer that is not signed with the cluster secret (an impostor cannot claim a member's node id)", async () => {
    const a = await daemon("node-a");
    const b = await daemon("node-b", { peers: [a.url] });
    await until(a.api, (peers) => states(peers)["node-b"] === "up");
    const impostor = createServer((_req, res) => {
      const self = {
        nodeId: "node-b",
        url: "http://127.0.0.1:1",
        backend: "host",
        gpus: 8,
        versions: [],
        startedAt: 9e12,
        beat: 1,
      };
      res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ self, members: [] }));
    });
    await new Promise<void>((r) => impostor.listen(0, "127.0.0.1", r));
    cleanup.push(() => new Promise((r) => impostor.close(() => r(undefined))));
    const url = `http://127.0.0.1:${(impostor.address() as AddressInfo).port}`;
    const res = await a.api("POST", "/v1/peers", { url });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(/answered without the cluster secret's signature/);
    const seen = (await a.api("GET", "/v1/peers")).body.peers.find((p: Peer) => p.nodeId === "node-b");
    expect(seen).toMatchObject({ url: b.url, gpus: 1 });
  });

  it("answers POST /v1/peers with a 502 naming a URL where no daemon answers", async () => {
    const a = await daemon("node-a");
    const res = await within(5000, a.api("POST", "/v1/peers", { url: "http://127.0.0.1:1" }));
    expect(res.status).toBe(502);
    expect(res.body.error.code).toBe("peer_unreachable");
    expect(res.body.error.message).toMatch(/^cannot join http:\/\/127\.0\.0\.1:1: /);
    expect((await a.api("POST", "/v1/peers", { url: "ftp://x" })).status).toBe(400);
    const self = await a.api("POST", "/v1/peers", { url: a.url });
    expect(self.status).toBe(502);
    expect(self.body.error.message).toBe(`cannot join ${a.url}: ${a.url} answered as this daemon itself`);
    expect((await a.api("GET", "/v1/peers")).body).toMatchObject({ peers: [], contacting: [] }); // not tried again
  });
});
