/**
 * An HTTP load generator in a process of its own (keep-alive node:http agent), for bench/load.ts.
 * Open loop: requests go out on a fixed schedule whatever the answers, and each latency is
 * counted from its scheduled send time (no coordinated omission). Closed loop: `concurrency`
 * connections each send their next request when the last one was answered.
 * Usage: node --import tsx bench/lib/loadgen.ts '{"mode": "open"|"closed", ...Spec}'; writes one JSON line.
 */
import { Agent, request } from "node:http";

interface Spec {
  mode: "open" | "closed";
  url: string;
  paths: string[];
  headers?: Record<string, string>;
  seconds: number;
  /** Open loop: requests per second, over all paths (sent in turn). */
  rate?: number;
  /** Closed loop: connections, each with one request outstanding. */
  concurrency?: number;
}

/** Per path: latencies in ms (from the scheduled send, in open loop) and errors. */
export interface PathResult {
  path: string;
  latencies: number[];
  errors: number;
  firstError?: string;
}

export interface LoadResult {
  mode: string;
  seconds: number;
  sent: number;
  /** Open loop: how late the generator itself sent requests after their scheduled time, at most (ms). */
  maxSendLagMs: number;
  paths: PathResult[];
}

const spec = JSON.parse(process.argv[2] as string) as Spec;
const target = new URL(spec.url);
const agent = new Agent({ keepAlive: true, maxSockets: spec.mode === "open" ? 256 : (spec.concurrency ?? 50) });
const results = spec.paths.map((path): PathResult => ({ path, latencies: [], errors: 0 }));

/** One GET; resolves once answered (or failed) with the time it ended, counting a failure as an error. */
function get(result: PathResult, from: number): Promise<void> {
  return new Promise((resolve) => {
    const fail = (why: string) => {
      result.errors++;
      result.firstError ??= why;
      resolve();
    };
    const req = request(
      { agent, host: target.hostname, port: target.port, path: result.path, headers: spec.headers },
      (res) => {
        res.on("data", () => undefined);
        res.on("end", () => {
          if (res.statusCode !== 200) return fail(`HTTP ${res.statusCode}`);
          result.latencies.push(performance.now() - from);
          resolve();
        });
        res.on("error", (err) => fail(err.message));
      },
    );
    req.setTimeout(5000, () => req.destroy(new Error("no answer in 5 s")));
    req.on("error", (err) => fail((err as NodeJS.ErrnoException).code ?? err.message));
    req.end();
  });
}

async function openLoop(): Promise<LoadResult> {
  const rate = spec.rate ?? 1000;
  const total = Math.round(rate * spec.seconds);
  const interval = 1000 / rate;
  const pending: Promise<void>[] = [];
  let maxSendLagMs = 0;
  let i = 0;
  const start = performance.now() + 50;
  await new Promise<void>((done) => {
    const tick = () => {
      const now = performance.now();
      while (i < total && start + i * interval <= now) {
        const scheduled = start + i * interval;
        maxSendLagMs = Math.max(maxSendLagMs, now - scheduled);
        pending.push(get(results[i % results.length] as PathResult, scheduled));
        i++;
      }
      if (i < total) setTimeout(tick, Math.max(0, start + i * interval - performance.now()));
      else done();
    };
    setTimeout(tick, 50);
  });
  await Promise.all(pending);
  return { mode: "open", seconds: spec.seconds, sent: i, maxSendLagMs, paths: results };
}

async function closedLoop(): Promise<LoadResult> {
  const deadline = performance.now() + spec.seconds * 1000;
  let sent = 0;
  const worker = async (w: number) => {
    for (let n = w; performance.now() < deadline; n++) {
      sent++;
      await get(results[n % results.length] as PathResult, performance.now());
    }
  };
  await Promise.all(Array.from({ length: spec.concurrency ?? 50 }, (_, w) => worker(w)));
  return { mode: "closed", seconds: spec.seconds, sent, maxSendLagMs: 0, paths: results };
}

// Connections opened first (their answers not counted), so the run measures requests, not connects.
const warm: PathResult = { path: spec.paths[0] as string, latencies: [], errors: 0 };
await Promise.all(Array.from({ length: spec.concurrency ?? 32 }, () => get(warm, performance.now())));
process.stdout.write(`${JSON.stringify({ warm: true })}\n`);
const result = spec.mode === "open" ? await openLoop() : await closedLoop();
agent.destroy();
process.stdout.write(`${JSON.stringify(result)}\n`);
