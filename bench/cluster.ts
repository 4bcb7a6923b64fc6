/**
 * A simulated fleet (issue 12): N daemons (default 32), each in a network namespace of its own,
 * joined by veth pairs to one bridge that this script makes and removes (root and iproute2).
 * All but the first know only the first (one seed). Reports how long until every daemon sees
 * every other one up (membership converged). Then a checkpoint of --pull-mb MB (512) is
 * registered on a quarter of them (sources, each sending at --rate-mbit, 800, by tc) and the
 * last daemon joins by pulling it from all of them at once; two sources are killed with
 * SIGKILL mid-pull. Reports the pull's throughput, that it completed with every piece verified
 * and the same fingerprint, and how long until every other daemon saw the two down. Runs the
 * single binary (dist/ckptd, `bash build.sh`) when there is one, else the sources under node.
 *   node --import tsx bench/cluster.ts [--daemons 32] [--heartbeat-ms 1000] [--peer-down-ms 5000] [--pull-mb 512] [--rate-mbit 800]
 */
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeModel } from "../test/checkpoint-files.ts";
import { daemonCommand } from "../test/helpers.ts";
import { ip, removeNetwork } from "../test/netns.ts";
import { AUTH, arg, ROOT, Scratch, sleep, table } from "./lib/daemon.ts";

const N = arg("daemons", 32);
const HEARTBEAT = arg("heartbeat-ms", 1000);
const DOWN = arg("peer-down-ms", 5000);
const PULL_MB = arg("pull-mb", 512);
const RATE = arg("rate-mbit", 800);
const PORT = 8470;
const tag = String(process.pid % 10000);
const bridge = `ckbr${tag}`;
const nsOf = (i: number) => `ckc${tag}-${i}`;
const addrOf = (i: number) => `10.78.${Math.floor((i + 1) / 250)}.${((i + 1) % 250) + 1}`;
const urlOf = (i: number) => `http://${addrOf(i)}:${PORT}`;

function network(): void {
  ip("link", "add", bridge, "type", "bridge");
  ip("addr", "add", "10.78.255.254/16", "dev", bridge);
  ip("link", "set", bridge, "up");
  for (let i = 0; i < N; i++) {
    const ns = nsOf(i);
    ip("netns", "add", ns);
    ip("link", "add", `ckh${tag}-${i}`, "type", "veth", "peer", "name", "eth0", "netns", ns);
    ip("link", "set", `ckh${tag}-${i}`, "master", bridge, "up");
    ip("netns", "exec", ns, "ip", "addr", "add", `${addrOf(i)}/16`, "dev", "eth0");
    ip("netns", "exec", ns, "ip", "link", "set", "eth0", "up");
    ip("netns", "exec", ns, "ip", "link", "set", "lo", "up");
  }
}

function teardown(): void {
  removeNetwork(
    Array.from({ length: N }, (_, i) => nsOf(i)),
    bridge,
  );
}

function start(scratch: Scratch, i: number): ChildProcess {
  const home = scratch.dir();
  writeFileSync(join(home, "tokens"), `admin:${AUTH.authorization.slice(7)}\n`, { mode: 0o600 });
  writeFileSync(join(home, "secret"), "bench-cluster-secret-0123456789abcdef\n", { mode: 0o600 });
  const binary = join(ROOT, "dist/ckptd");
  const [cmd, base] = existsSync(binary) ? [binary, []] : daemonCommand("node");
  const args = [
    ...["--backend", "host", "--host-devices", "1", "--host", addrOf(i), "--port", String(PORT)],
    ...["--state-dir", join(home, "state"), "--upload-dir", join(scratch.dir("/dev/shm"), "uploads")],
    ...["--tokens-file", join(home, "tokens"), "--cluster-secret-file", join(home, "secret"), "--log-level", "error"],
    ...["--heartbeat-ms", String(HEARTBEAT), "--peer-down-ms", String(DOWN)],
    ...["--ucx-transports", "tcp", "--pull-stall-ms", "3000", "--pull-chunk-bytes", String(4 << 20)],
    ...(i > 0 ? ["--peers", urlOf(0)] : []),
  ];
  const proc = spawn("ip", ["netns", "exec", nsOf(i), cmd, ...base, ...args], { cwd: ROOT, stdio: "ignore" });
  scratch.procs.add(proc);
  return proc;
}

// biome-ignore lint/suspicious/noExplicitAny: JSON answers, checked where used
async function call(i: number, method: string, path: string, body?: unknown): Promise<{ status: number; body: any }> {
  const res = await fetch(`${urlOf(i)}${path}`, {
    method,
    headers: body ? { ...AUTH, "content-type": "application/json" } : AUTH,
    body: body ? JSON.stringify(body) : undefined,
  });
  return { status: res.status, body: await res.json() };
}

async function peersOf(i: number): Promise<{ nodeId: string; state: string }[] | undefined> {
  try {
    const res = await fetch(`${urlOf(i)}/v1/peers`, { headers: AUTH, signal: AbortSignal.timeout(1000) });
    return res.ok ? ((await res.json()) as { peers: { nodeId: string; state: string }[] }).peers : undefined;
  } catch {
    return undefined;
  }
}

/** Polls every daemon in `who` until `ok` holds of each one's peers; the seconds it took. */
async function until(who: number[], ok: (peers: { nodeId: string; state: string }[]) => boolean, limitMs: number) {
  const t0 = performance.now();
  for (;;) {
    const views = await Promise.all(who.map(peersOf));
    if (views.every((v) => v && ok(v))) return (performance.now() - t0) / 1000;
    if (performance.now() - t0 > limitMs) {
      const ups = views.map((v) => (v ? v.filter((x) => x.state === "up").length : "no answer"));
      throw new Error(`no convergence within ${limitMs} ms; peers up per daemon: ${ups.join(" ")}`);
    }
    await sleep(250);
  }
}

async function main(): Promise<number> {
  const scratch = new Scratch();
  teardown();
  network();
  try {
    const t0 = performance.now();
    const procs = Array.from({ length: N }, (_, i) => start(scratch, i));
    const all = Array.from({ length: N }, (_, i) => i);
    // every API answering
    await until(all, () => true, 120_000);
    const started = (performance.now() - t0) / 1000;
    const converged = await until(all, (p) => p.filter((x) => x.state === "up").length === N - 1, 60_000);
    const ids = new Map<number, string>();
    for (const i of all) {
      const me = (await fetch(`${urlOf(i)}/v1/peers`, { headers: AUTH }).then((r) => r.json())) as {
        self: { nodeId: string };
      };
      ids.set(i, me.self.nodeId);
    }
    // A quarter of the daemons hold the checkpoint (one set of files in /dev/shm, pinned in place by each).
    const dir = scratch.dir("/dev/shm");
    const hidden = 2048;
    writeModel(dir, 4, Math.max(1, Math.round((PULL_MB << 20) / (4 * hidden * hidden))), hidden);
    const sources = all.filter((i) => i > 0 && i < N - 1 && i % 4 === 1);
    for (const i of sources) {
      const r = await call(i, "POST", "/v1/checkpoints", { name: "m", dir });
      if (r.status !== 201) throw new Error(`registering on daemon ${i}: ${JSON.stringify(r.body)}`);
      ip(
        "netns",
        "exec",
        nsOf(i),
        "tc",
        "qdisc",
        "add",
        "dev",
        "eth0",
        "root",
        "tbf",
        "rate",
        `${RATE}mbit`,
        "burst",
        "512kb",
        "latency",
        "100ms",
      );
    }
    const fingerprint = (await call(sources[0] as number, "GET", "/v1/peers")).body.self.versions[0].fingerprint;
    const joiner = N - 1;
    for (let k = 0; k < 400; k++) {
      const peers = (await call(joiner, "GET", "/v1/peers")).body.peers as { versions: unknown[] }[];
      if (peers.filter((p) => p.versions.length > 0).length === sources.length) break;
      await sleep(50);
    }
    const pullAt = performance.now();
    const started2 = await call(joiner, "POST", "/v1/checkpoints", { name: "m", pull: {}, wait: false });
    if (started2.status !== 202) throw new Error(`pull: ${JSON.stringify(started2.body)}`);
    let v = started2.body;
    while (v.state === "registering" && v.progress.pull.bytesFetched < v.bytes / 4) {
      await sleep(20);
      v = (await call(joiner, "GET", `/v1/checkpoints/${started2.body.id}`)).body;
    }
    const victims = sources.slice(0, 2);
    const killedAt = performance.now();
    const killedAfter = v.progress.pull.bytesFetched;
    for (const x of victims) procs[x]?.kill("SIGKILL");
    const rest = all.filter((i) => !victims.includes(i));
    const gone = new Set(victims.map((v) => ids.get(v)));
    for (;;) {
      v = (await call(joiner, "GET", `/v1/checkpoints/${started2.body.id}`)).body;
      if (v.state !== "registering") break;
      await sleep(50);
    }
    const pullSeconds = (performance.now() - pullAt) / 1000;
    const mine = (await call(joiner, "GET", "/v1/peers")).body.self.versions.find(
      (x: { name: string }) => x.name === "m",
    );
    const noticed = await until(
      rest,
      (p) => p.filter((x) => gone.has(x.nodeId) && x.state === "down").length === 2,
      60_000,
    );
    console.log(
      `${N} daemons (host backend, the single binary: ${existsSync(join(ROOT, "dist/ckptd"))}), one network namespace each on a bridge; one seed; heartbeatMs ${HEARTBEAT}, peerDownMs ${DOWN}`,
    );
    console.log(
      table(
        [
          "daemons",
          "all answering (s)",
          "membership converged after (s)",
          "2 killed: all others saw them down after (s)",
        ],
        [
          [
            N,
            started.toFixed(2),
            converged.toFixed(2),
            `${noticed.toFixed(2)} (${((performance.now() - killedAt) / 1000).toFixed(2)} incl. polling)`,
          ],
        ],
      ),
    );
    const pull = v.progress.pull;
    const dropped = pull.sources.filter((x: { state: string }) => x.state === "failed").length;
    console.log(
      `pull of ${(v.bytes / 1e6).toFixed(0)} MB by daemon ${joiner} from ${sources.length} sources (each sending at ${RATE} Mbit/s by tc), ` +
        `2 killed after ${(killedAfter / 1e6).toFixed(0)} MB: ${v.state} in ${pullSeconds.toFixed(2)} s (API), ` +
        `${pull.gbps.toFixed(3)} GB/s from the first fetch; ${dropped} sources dropped; every piece verified: ${pull.bytesVerified === v.bytes}; ` +
        `fingerprint equal: ${mine?.fingerprint === fingerprint}; killed ${((killedAt - pullAt) / 1000).toFixed(2)} s into it`,
    );
    return v.state === "ready" && mine?.fingerprint === fingerprint ? 0 : 1;
  } finally {
    scratch.cleanup();
    teardown();
  }
}

process.exit(await main());
