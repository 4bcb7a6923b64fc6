/**
 * Discovery through DNS: three daemons, each in a network namespace of its own on a bridge
 * this test makes (root, iproute2; skipped without them, unless CI=true), none given a seed,
 * all given `peerDns` with one name. The system resolver inside the namespaces asks a DNS
 * server this test runs on the bridge (`ip netns exec` puts /etc/netns/<ns>/resolv.conf in
 * place), which answers the name with every daemon's address: each finds the two others up.
 * Then one of them pulls a version from the peers it found that way.
 */
import { createSocket, type Socket } from "node:dgram";
import { existsSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { writeModel } from "./checkpoint-files.ts";
import { daemonCommand, type Running, startProcess, tempDir } from "./helpers.ts";
import { apiAt } from "./in-process.ts";
import { ip, netnsUsable, removeNetwork, runTag } from "./netns.ts";

const can = netnsUsable();

const tag = runTag(5);
const bridge = `ckdb${tag}`;
const nsOf = (i: number) => `ckd${tag}-${i}`;
const addrOf = (i: number) => `10.80.0.${i + 1}`;
const SERVER = "10.80.0.254";
const NAME = "fleet.ckptd.test";
const inNs = (i: number, ...args: string[]) => ip("netns", "exec", nsOf(i), "ip", ...args);

/** A DNS answer to `query`: A records of `addresses` for NAME, nothing for other types, NXDOMAIN for other names. */
function answer(query: Buffer, addresses: string[]): Buffer {
  let at = 12;
  const labels: string[] = [];
  while (query[at] !== 0 && at < query.length) {
    const len = query[at] as number;
    labels.push(query.subarray(at + 1, at + 1 + len).toString());
    at += 1 + len;
  }
  const question = query.subarray(12, at + 5);
  const qtype = query.readUInt16BE(at + 1);
  const known = labels.join(".").toLowerCase() === NAME;
  const records = known && qtype === 1 ? addresses : [];
  const head = Buffer.alloc(12);
  head.writeUInt16BE(query.readUInt16BE(0), 0); // the query's id
  head.writeUInt16BE(known ? 0x8180 : 0x8183, 2); // a response, recursion available; NXDOMAIN if unknown
  head.writeUInt16BE(1, 4);
  head.writeUInt16BE(records.length, 6);
  const rrs = records.map((a) => {
    const rr = Buffer.alloc(16);
    rr.writeUInt16BE(0xc00c, 0); // the name, as in the question
    rr.writeUInt16BE(1, 2); // A
    rr.writeUInt16BE(1, 4); // IN
    rr.writeUInt32BE(1, 6); // TTL 1 s
    rr.writeUInt16BE(4, 10);
    for (const [k, o] of a.split(".").entries()) rr.writeUInt8(Number(o), 12 + k);
    return rr;
  });
  return Buffer.concat([head, question, ...rrs]);
}

const api = (url: string, method: string, path: string, body?: unknown) => apiAt(url)(method, path, body);

describe.skipIf(!can)("discovery through a DNS name (namespaces, a DNS server of the test's)", () => {
  const running: Running[] = [];
  let server: Socket | undefined;
  const asked: string[] = [];
  const hadNetnsDir = existsSync("/etc/netns");

  beforeAll(async () => {
    ip("link", "add", bridge, "type", "bridge");
    ip("addr", "add", `${SERVER}/24`, "dev", bridge);
    ip("link", "set", bridge, "up");
    for (let i = 0; i < 3; i++) {
      ip("netns", "add", nsOf(i));
      ip("link", "add", `ckdh${tag}-${i}`, "type", "veth", "peer", "name", "eth0", "netns", nsOf(i));
      ip("link", "set", `ckdh${tag}-${i}`, "master", bridge, "up");
      inNs(i, "addr", "add", `${addrOf(i)}/24`, "dev", "eth0");
      inNs(i, "link", "set", "eth0", "up");
      inNs(i, "link", "set", "lo", "up");
      mkdirSync(`/etc/netns/${nsOf(i)}`, { recursive: true });
      writeFileSync(`/etc/netns/${nsOf(i)}/resolv.conf`, `nameserver ${SERVER}\noptions timeout:1 attempts:2\n`);
    }
    const s = createSocket("udp4");
    server = s;
    s.on("message", (msg, from) => {
      asked.push(from.address);
      s.send(answer(msg, [0, 1, 2].map(addrOf)), from.port, from.address);
    });
    await new Promise<void>((resolve) => s.bind(53, SERVER, resolve));
  });

  afterAll(async () => {
    if (process.env.DNS_TEST_LOGS) for (const p of running) console.log(p.logs.slice(-15).join("\n"));
    for (const p of running) {
      p.proc.kill("SIGKILL");
      await p.exited;
    }
    server?.close();
    for (let i = 0; i < 3; i++) rmSync(`/etc/netns/${nsOf(i)}`, { recursive: true, force: true });
    removeNetwork([0, 1, 2].map(nsOf), bridge);
    if (!hadNetnsDir) rmSync("/etc/netns", { recursive: true, force: true });
  });

  it("finds every daemon the name resolves to, with no seed, and pulls from them", async () => {
    const [cmd, args] = daemonCommand("node");
    const dir = tempDir("ckptd-test-", "/dev/shm");
    writeModel(dir, 2, 4, 256);
    for (let i = 0; i < 3; i++) {
      const flags = [
        ...["--backend", "host", "--host-devices", "1", "--host", addrOf(i), "--port", "8470"],
        ...["--heartbeat-ms", "100", "--peer-down-ms", "800", "--ucx-transports", "tcp"],
        ...["--peer-dns", `http://${NAME}:8470`],
      ];
      const p = await startProcess(
        ["ip", ["netns", "exec", nsOf(i), cmd, ...args]],
        flags,
        {},
        { stateDir: tempDir() },
      );
      running.push(p);
    }
    const urls = [0, 1, 2].map((i) => `http://${addrOf(i)}:8470`);
    const ids = await Promise.all(urls.map(async (u) => (await api(u, "GET", "/v1/status")).body.nodeId as string));
    for (const [i, url] of urls.entries()) {
      const others = ids.filter((_, k) => k !== i);
      const end = Date.now() + 10_000;
      for (;;) {
        const peers = (await api(url, "GET", "/v1/peers")).body.peers as { nodeId: string; state: string }[];
        if (others.every((id) => peers.some((p) => p.nodeId === id && p.state === "up"))) break;
        if (Date.now() > end) throw new Error(`${url} never saw ${others} up: ${JSON.stringify(peers)}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    expect(new Set(asked)).toEqual(new Set([0, 1, 2].map(addrOf))); // each asked the test's server
    for (const u of urls.slice(0, 2))
      expect((await api(u, "POST", "/v1/checkpoints", { name: "m", dir })).status).toBe(201);
    const end = Date.now() + 10_000;
    for (;;) {
      const peers = (await api(urls[2] as string, "GET", "/v1/peers")).body.peers as { versions: unknown[] }[];
      if (peers.filter((p) => p.versions.length > 0).length === 2 || Date.now() > end) break;
      await new Promise((r) => setTimeout(r, 50)); // until the heartbeats say who holds it
    }
    let pulled: {
      status: number;
      body: { progress?: { pull?: { sources: { nodeId: string }[]; leftOut: string[] } } };
    };
    for (;;) {
      pulled = await api(urls[2] as string, "POST", "/v1/checkpoints", { name: "m", pull: {} });
      if (pulled.status === 201 || Date.now() > end) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(pulled.status, JSON.stringify(pulled.body)).toBe(201);
    // (A source left out says why in leftOut: CI once saw one missing under load.)
    expect(
      pulled.body.progress?.pull?.sources.map((s) => s.nodeId).sort(),
      JSON.stringify(pulled.body.progress?.pull?.leftOut),
    ).toEqual([ids[0], ids[1]].sort());
  }, 60_000);
});
