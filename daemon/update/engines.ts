/** Engines listed in the configuration: their GPUs, and waiting for their receivers. */
import type { EngineConfig } from "../config/index.ts";
import type { Receiver, ReceiverHub } from "./receivers.ts";

/** An engine's receive call in flight (engines/run.ts): resolves (never rejects) to an error message, or undefined. */
export interface Triggered {
  engine: EngineConfig;
  result: Promise<string | undefined>;
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
