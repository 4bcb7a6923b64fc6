/** The daemon's own numbers, as the families GET /metrics serves (rendered by http/prometheus.ts). */
import type { Registry } from "./checkpoints/registry.ts";
import { type Family, renderPrometheus } from "./http/prometheus.ts";
import type { PullProgress } from "./pull/pull.ts";
import type { ReceiverHub } from "./update/receivers.ts";
import type { Updates } from "./update/updates.ts";

const gauge = (name: string, help: string, value: number): Family => ({
  name,
  help,
  type: "gauge",
  samples: [{ value }],
});

/** Pulls of versions still registering (and the last pull's figures, kept by its version). */
function pullFamilies(registry: Registry): Family[] {
  const pulls = registry
    .list()
    .filter((v) => v.origin === "pull")
    .map((v) => ({ v, p: (v.progress as { pull?: PullProgress }).pull }))
    .filter((x): x is { v: (typeof x)["v"]; p: PullProgress } => x.p !== undefined);
  const by = (value: (p: PullProgress) => number) =>
    pulls.map(({ v, p }) => ({ labels: { checkpoint: v.id, state: v.state }, value: value(p) }));
  return [
    {
      name: "ckptd_pull_source_bytes",
      help: "Bytes a pull landed from each source",
      type: "gauge",
      samples: pulls.flatMap(({ v, p }) =>
        p.sources.map((s) => ({ labels: { checkpoint: v.id, source: s.nodeId, state: s.state }, value: s.bytes })),
      ),
    },
    {
      name: "ckptd_pull_verified_bytes",
      help: "Bytes of a pull checked against the sources' hashes",
      type: "gauge",
      samples: by((p) => p.bytesVerified),
    },
    { name: "ckptd_pull_gbps", help: "A pull's rate so far, GB/s", type: "gauge", samples: by((p) => p.gbps) },
    {
      name: "ckptd_pull_eta_seconds",
      help: "Seconds a pull still needs at its rate",
      type: "gauge",
      samples: by((p) => p.etaSeconds ?? -1),
    },
    {
      name: "ckptd_pull_mismatches",
      help: "Pieces of a pull that hashed wrong and were fetched again",
      type: "gauge",
      samples: by((p) => p.mismatches),
    },
  ];
}

/** The daemon's numbers for GET /metrics. */
export function metricsOf(registry: Registry, updates: Updates, hub: ReceiverHub, gpus: number): string {
  const all = updates.list();
  const last = all.at(-1);
  const count = (state: string) => all.filter((u) => u.state === state).length;
  return renderPrometheus([
    gauge("ckptd_up", "1 while the daemon serves", 1),
    gauge("ckptd_checkpoint_versions", "Registered versions", registry.list().length),
    gauge("ckptd_pinned_bytes", "Pinned host memory held by checkpoints", registry.pinnedBytes()),
    gauge("ckptd_pinned_pool_bytes", "Pinned host memory of dropped versions, kept for reuse", registry.pool.bytes()),
    {
      name: "ckptd_pinned_pool_takes",
      help: "Pinned blocks asked of the pool, reused or pinned fresh",
      type: "counter",
      samples: (["reused", "fresh"] as const).map((how) => ({ labels: { how }, value: registry.pool.status()[how] })),
    },
    {
      name: "ckptd_updates",
      help: "Updates kept in history, by state",
      type: "gauge",
      samples: ["running", "succeeded", "failed"].map((state) => ({ labels: { state }, value: count(state) })),
    },
    gauge("ckptd_last_update_seconds", "Duration of the last update", last?.timings.seconds ?? 0),
    gauge("ckptd_last_update_bytes", "Bytes moved by the last update", last?.progress.bytesDone ?? 0),
    gauge(
      "ckptd_last_update_stall_seconds",
      "Time the last update waited for engines to free a bucket slot",
      last?.timings.stallSeconds ?? 0,
    ),
    {
      name: "ckptd_receivers",
      help: "Connected engine receivers per GPU",
      type: "gauge",
      samples: Array.from({ length: gpus }, (_, gpu) => ({
        labels: { gpu },
        value: hub.connected().filter((r) => r.gpu === gpu).length,
      })),
    },
    ...pullFamilies(registry),
  ]);
}
