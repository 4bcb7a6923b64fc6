import type { Registry } from "./checkpoints/registry.ts";
import { renderMetrics } from "./http/metrics.ts";
import type { ReceiverHub } from "./update/receivers.ts";
import type { Updates } from "./update/updates.ts";

/** The daemon's numbers for GET /metrics. */
export function metricsOf(registry: Registry, updates: Updates, hub: ReceiverHub, gpus: number): string {
  const all = updates.list();
  const last = all.at(-1);
  const count = (state: string) => all.filter((u) => u.state === state).length;
  return renderMetrics([
    { name: "ckptd_up", help: "1 while the daemon serves", type: "gauge", samples: [{ value: 1 }] },
    {
      name: "ckptd_checkpoint_versions",
      help: "Registered versions",
      type: "gauge",
      samples: [{ value: registry.list().length }],
    },
    {
      name: "ckptd_pinned_bytes",
      help: "Pinned host memory held by checkpoints",
      type: "gauge",
      samples: [{ value: registry.pinnedBytes() }],
    },
    {
      name: "ckptd_updates",
      help: "Updates kept in history, by state",
      type: "gauge",
      samples: ["running", "succeeded", "failed"].map((state) => ({ labels: { state }, value: count(state) })),
    },
    {
      name: "ckptd_last_update_seconds",
      help: "Duration of the last update",
      type: "gauge",
      samples: [{ value: last?.timings.seconds ?? 0 }],
    },
    {
      name: "ckptd_last_update_bytes",
      help: "Bytes moved by the last update",
      type: "gauge",
      samples: [{ value: last?.progress.bytesDone ?? 0 }],
    },
    {
      name: "ckptd_last_update_stall_seconds",
      help: "Time the last update waited for engines to free a bucket slot",
      type: "gauge",
      samples: [{ value: last?.timings.stallSeconds ?? 0 }],
    },
    {
      name: "ckptd_receivers",
      help: "Connected engine receivers per GPU",
      type: "gauge",
      samples: Array.from({ length: gpus }, (_, gpu) => ({
        labels: { gpu },
        value: hub.connected().filter((r) => r.gpu === gpu).length,
      })),
    },
  ]);
}
