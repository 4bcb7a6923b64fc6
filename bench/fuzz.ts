/**
 * Fuzzing benchmark (issue 10): generated inputs over safetensors headers, JSON and CBOR
 * bodies, the receiver protocol and the peer API, against a daemon child process on the host
 * backend. Counts findings (a crash, a hang, a 5xx, an answer without the error shape, an
 * input refused the wrong way), samples the daemon's RSS, and reports inputs per second.
 *
 * Usage: node --import tsx bench/fuzz.ts [--inputs N] [--seed S] [--replay TARGET:INDEX[-LAST]]
 * (a replay runs those inputs of that target alone, one at a time, with the same seed)
 */
import { readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { parseArgs } from "node:util";
import { ChildDaemon } from "./fuzz/daemon.ts";
import { describe, type Finding } from "./fuzz/findings.ts";
import { httpTarget } from "./fuzz/http-bodies.ts";
import { peerTarget } from "./fuzz/peer.ts";
import { receiverTarget } from "./fuzz/receiver.ts";
import { Runner, type Runner as RunnerType, type Target, type TargetResult } from "./fuzz/run.ts";
import { safetensorsTarget } from "./fuzz/safetensors.ts";

/** Each target's share of the inputs. */
const SHARES: [string, number][] = [
  ["safetensors", 0.4],
  ["http-bodies", 0.3],
  ["receiver", 0.15],
  ["peer", 0.15],
];

function options() {
  const { values } = parseArgs({
    options: { inputs: { type: "string", default: "100000" }, seed: { type: "string" }, replay: { type: "string" } },
  });
  const seed = values.seed === undefined ? Math.floor(Math.random() * 2 ** 31) : Number(values.seed);
  const inputs = Number(values.inputs);
  if (!Number.isSafeInteger(seed) || !Number.isSafeInteger(inputs) || inputs < 1) {
    throw new Error("--inputs and --seed take integers");
  }
  const [target, range = "0"] = values.replay?.split(":") ?? [];
  const [from, to = from] = range.split("-").map(Number) as [number, number?];
  const indices = Array.from({ length: Math.max(0, (to ?? from) - from + 1) }, (_, i) => from + i);
  return { seed, inputs, replay: target === undefined ? undefined : { target, indices } };
}

/** Entries of /dev/shm and the temp directory this script or its daemon may make (ckptd-<node id>: a default upload directory). */
function ours(): string[] {
  const mine = (n: string) => n.startsWith("ckptd-fuzz-") || /^ckptd-[0-9a-f]{8}-/.test(n);
  const list = (dir: string) =>
    readdirSync(dir)
      .filter(mine)
      .map((n) => `${dir}/${n}`);
  return [...list("/dev/shm"), ...list(tmpdir())];
}

const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;

function table(results: TargetResult[], runner: RunnerType, slowHealth: number, seed: number): string {
  const rows = results.map((r) =>
    [
      r.name.padEnd(12),
      String(r.inputs).padStart(8),
      (r.inputs / r.seconds).toFixed(0).padStart(10),
      String(r.findings.length).padStart(9),
    ].join("  "),
  );
  const total = results.reduce((s, r) => s + r.inputs, 0);
  const seconds = results.reduce((s, r) => s + r.seconds, 0);
  const found = results.reduce((s, r) => s + r.findings.length, 0);
  return [
    `${"target".padEnd(12)}  ${"inputs".padStart(8)}  ${"inputs/s".padStart(10)}  ${"findings".padStart(9)}`,
    ...rows,
    [
      `${"total".padEnd(12)}`,
      String(total).padStart(8),
      (total / seconds).toFixed(0).padStart(10),
      String(found).padStart(9),
    ].join("  "),
    `daemon RSS: start ${mib(runner.rssStart)}, peak ${mib(runner.rssPeak)}, end ${mib(runner.rssEnd)}`,
    `daemon deaths (each restarted): ${runner.deaths}; /v1/healthz over 1 s once, then in time: ${slowHealth}`,
    `seed ${seed}`,
  ].join("\n");
}

/** The findings, one block per distinct kind (the first input of each), with how many more there were. */
function report(findings: Finding[], seed: number): string {
  const kinds = new Map<string, { first: Finding; count: number }>();
  for (const f of findings) {
    const key = `${f.target} ${f.what.replace(/\d+/g, "N").slice(0, 120)}`;
    const k = kinds.get(key);
    if (k) k.count++;
    else kinds.set(key, { first: f, count: 1 });
  }
  return [...kinds.values()]
    .map(({ first, count }) => `${describe(first, seed)}${count > 1 ? `\n  (${count - 1} more like it)` : ""}`)
    .join("\n");
}

async function main(): Promise<number> {
  const { seed, inputs, replay } = options();
  const before = new Set(ours());
  const daemon = new ChildDaemon();
  const stop = () => void daemon.stop().then(() => process.exit(130));
  process.once("SIGINT", stop);
  process.once("SIGTERM", stop);
  try {
    await daemon.start();
    const runner = new Runner(daemon, seed);
    await runner.check("start", 0);
    const targets: Record<string, () => Target> = {
      safetensors: () => safetensorsTarget(daemon),
      "http-bodies": () => httpTarget(daemon),
      receiver: () => receiverTarget(daemon),
      peer: () => peerTarget(daemon),
    };
    const results: TargetResult[] = [];
    for (const [name, share] of SHARES) {
      if (replay && replay.target !== name) continue;
      const make = targets[name] as () => Target;
      const target = make();
      // Replayed one at a time, so that a death names its input; the peer target learns the daemon's geometry at #0.
      if (replay) target.concurrency = 1;
      const indices = replay && name === "peer" && replay.indices[0] !== 0 ? [0, ...replay.indices] : replay?.indices;
      const result = await runner.run(target, Math.max(1, Math.round(inputs * share)), indices);
      results.push(result);
      console.error(
        `${name}: ${result.inputs} inputs in ${result.seconds.toFixed(1)} s, ${result.findings.length} findings`,
      );
    }
    const findings = results.flatMap((r) => r.findings);
    if (daemon.errorLogs > 0) console.log(`the daemon logged ${daemon.errorLogs} lines at level error or above`);
    if (findings.length) console.log(report(findings, seed));
    console.log(table(results, runner, daemon.slowHealth, seed));
    return findings.length > 0 ? 1 : 0;
  } finally {
    await daemon.stop();
    const left = ours().filter((p) => !before.has(p));
    console.log(
      left.length ? `left behind: ${left.join(", ")}` : "left behind: nothing in /dev/shm or the temp directory",
    );
  }
}

process.exitCode = await main();
