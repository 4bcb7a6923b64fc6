/**
 * Membership across a real network link: two daemons in network namespaces of their own,
 * joined by a veth pair that this test makes and removes (root and iproute2 needed; skipped
 * without them, unless CI=true). The link is taken down: each daemon finds the other down
 * within peerDownMs; brought up again: each finds the other up.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { daemonCommand, type Running, startProcess, tempDir } from "./helpers.ts";
import { ip, netnsUsable, runTag } from "./netns.ts";

const can = netnsUsable();

const tag = runTag(6);
const ns = [`ckptd-a-${tag}`, `ckptd-b-${tag}`];
const addr = ["10.77.0.1", "10.77.0.2"];
const inNs = (n: string, ...args: string[]) => ip("netns", "exec", n, "ip", ...args);

describe.skipIf(!can)("membership across a network link (namespaces, veth)", () => {
  const running: Running[] = [];

  beforeAll(() => {
    for (const n of ns) ip("netns", "add", n);
    ip(
      "link",
      "add",
      `va-${tag}`,
      "netns",
      ns[0] as string,
      "type",
      "veth",
      "peer",
      "name",
      `vb-${tag}`,
      "netns",
      ns[1] as string,
    );
    for (const [i, n] of ns.entries()) {
      const dev = i === 0 ? `va-${tag}` : `vb-${tag}`;
      inNs(n, "addr", "add", `${addr[i]}/24`, "dev", dev);
      inNs(n, "link", "set", dev, "up");
      inNs(n, "link", "set", "lo", "up");
    }
  });

  afterAll(async () => {
    for (const p of running) {
      p.proc.kill("SIGKILL");
      await p.exited;
    }
    for (const n of ns) ip("netns", "del", n);
  });

  async function start(i: number, seeds: string[]): Promise<Running> {
    const [cmd, args] = daemonCommand("node");
    const flags = ["--backend", "host", "--host-devices", "1", "--host", addr[i] as string];
    const fast = [
      "--heartbeat-ms",
      "100",
      "--peer-down-ms",
      "600",
      ...(seeds.length ? ["--peers", seeds.join(",")] : []),
    ];
    const p = await startProcess(
      ["ip", ["netns", "exec", ns[i] as string, cmd, ...args]],
      [...flags, ...fast],
      {},
      { stateDir: tempDir() },
    );
    running.push(p);
    return p;
  }

  /** Resolves once a log line of `p` says `msg` (after line `from`), bounded. */
  async function logged(p: Running, msg: string, from: number, ms = 5000): Promise<number> {
    const end = Date.now() + ms;
    for (;;) {
      const i = p.logs.findIndex((l, k) => k >= from && l.includes(`"msg":"${msg}"`));
      if (i >= 0) return i;
      if (Date.now() > end)
        throw new Error(`no "${msg}" in the log after line ${from}:\n${p.logs.slice(from).join("\n")}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  it("finds the other down when the link goes down, and up again when it comes back", async () => {
    const a = await start(0, []);
    const b = await start(1, [`http://${addr[0]}:${a.port}`]);
    let atA = await logged(a, "peer up", 0);
    let atB = await logged(b, "peer up", 0);
    const cut = Date.now();
    inNs(ns[0] as string, "link", "set", `va-${tag}`, "down");
    atA = await logged(a, "peer down", atA);
    atB = await logged(b, "peer down", atB);
    expect(Date.now() - cut).toBeGreaterThanOrEqual(500);
    inNs(ns[0] as string, "link", "set", `va-${tag}`, "up");
    await logged(a, "peer up again", atA);
    await logged(b, "peer up again", atB);
  }, 30_000);
});
