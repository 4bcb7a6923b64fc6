/** Engines listed in the configuration: triggering them, and waiting for their receivers. */
import type { EngineConfig } from "../config/index.ts";
import type { Receiver, ReceiverHub } from "./receivers.ts";

/** An engine's update call in flight: resolves (never rejects) to an error message, or undefined. */
export interface Triggered {
  engine: EngineConfig;
  result: Promise<string | undefined>;
}

/**
 * Asks the configured engines to receive an update (vLLM: its /collective_rpc endpoint
 * calling the ckptd worker extension; http: the configured request). The calls return
 * when the engines are done; their failures are reported by name.
 */
export function triggerEngines(engines: EngineConfig[], socketDir: string, timeout: number): Triggered[] {
  return engines
    .filter((e) => e.kind !== "receiver")
    .map((engine) => {
      const url = engine.kind === "vllm" ? `${engine.url?.replace(/\/$/, "")}/collective_rpc` : (engine.url as string);
      const body =
        engine.kind === "vllm"
          ? { method: "ckptd_update", args: [socketDir], kwargs: {}, timeout: timeout / 1000 }
          : (engine.body ?? {});
      const result = fetch(url, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(body),
        signal: AbortSignal.timeout(timeout * 4),
      })
        .then(async (res) => {
          const text = await res.text();
          if (!res.ok) return `${url} answered ${res.status}: ${text.slice(0, 300)}`;
          // vLLM: {"results": [per worker]}; the ckptd extension returns {ok, error?}. Other
          // engines may answer anything: only an explicit {ok: false} is a failure.
          let parsed: unknown;
          try {
            parsed = JSON.parse(text);
          } catch {
            return undefined;
          }
          const results = (parsed as { results?: unknown })?.results;
          const bad = Array.isArray(results)
            ? (results as { ok?: boolean; error?: string }[]).find((r) => r && r.ok === false)
            : undefined;
          return bad ? `a worker failed: ${bad.error ?? JSON.stringify(bad)}` : undefined;
        })
        .catch((err: Error) => `${url}: ${err?.message ?? err}`);
      return { engine, result };
    });
}

/** Refuses engines configured on GPUs this host does not have, naming the engine and the count. */
export function checkEngineGpus(engines: EngineConfig[], gpus: number): void {
  for (const e of engines) {
    const missing = e.gpus.filter((g) => g >= gpus);
    if (missing.length === 0) continue;
    const has = gpus === 1 ? "1 GPU (GPU 0)" : `${gpus} GPUs (0 to ${gpus - 1})`;
    throw new Error(`engine "${e.name}" is configured on GPU ${missing.join(", ")}, but this host has ${has}`);
  }
}

/** Waits until every configured engine has a receiver on each of its GPUs. */
export async function awaitReceivers(
  hub: ReceiverHub,
  engines: EngineConfig[],
  triggered: Triggered[],
  timeout: number,
  signal?: AbortSignal,
): Promise<Receiver[]> {
  const missing = () =>
    engines.flatMap((e) =>
      e.gpus.filter((g) => !hub.connected().some((r) => r.gpu === g)).map((g) => ({ engine: e, gpu: g })),
    );
  const until = performance.now() + timeout;
  const early = new Map<EngineConfig, string>();
  for (const t of triggered) void t.result.then((err) => err && early.set(t.engine, err));
  while (missing().length > 0) {
    if (signal?.aborted) throw new Error(String(signal.reason));
    const first = missing()[0];
    const err = first && early.get(first.engine);
    if (first && (err || performance.now() > until)) {
      throw new Error(
        `engine ${first.engine.name} has no receiver on GPU ${first.gpu}${err ? `: ${err}` : ` after ${timeout} ms`}`,
      );
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  return hub.connected();
}
