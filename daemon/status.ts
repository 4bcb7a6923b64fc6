/** The body of GET /v1/status: what this daemon is, runs on, holds and serves. */
import { CkptError, type Context } from "../ffi/index.ts";
import type { Registry } from "./checkpoints/registry.ts";
import type { RestoreReport } from "./checkpoints/store.ts";
import type { UploadArea } from "./checkpoints/upload-dir.ts";
import type { Geometry } from "./update/geometry.ts";
import type { ReceiverHub } from "./update/receivers.ts";
import { VERSION } from "./version.ts";

export type NcclStatus = { version: number } | { error: string };

/** The NCCL the data plane loaded, or why none. */
export function ncclStatus(context: Context): NcclStatus {
  try {
    return { version: context.ncclVersion() };
  } catch (err) {
    return { error: err instanceof CkptError ? `${err.status}: ${err.detail}` : String(err) };
  }
}

export interface StatusSources {
  nodeId: string;
  runtime: string;
  startedAt: number;
  context: Context;
  nccl: NcclStatus;
  hub: ReceiverHub;
  registry: Registry;
  budgetBytes: number;
  restore: RestoreReport;
  buckets: Geometry;
  uploads: UploadArea;
  /** The elastic start (config join), if configured. */
  join?: { checkpoint: string; state: string; version?: string; lastError?: string };
}

/** The daemon's status now. */
export function statusOf(s: StatusSources) {
  return {
    nodeId: s.nodeId,
    version: VERSION,
    runtime: s.runtime,
    backend: s.context.backend,
    nccl: s.nccl,
    gpus: s.context.devices().map((d) => ({
      socket: s.hub.socketPath(d.index),
      receivers: s.hub
        .connected()
        .filter((r) => r.gpu === d.index)
        .map((r) => r.label),
      /** What each receiver holds, as far as this daemon knows (null: nothing known). */
      holdings: s.hub
        .connected()
        .filter((r) => r.gpu === d.index)
        .map((r) => ({ receiver: r.label, holds: r.holds?.version ?? null, partial: r.partial })),
      index: d.index,
      uuid: d.uuid,
      name: d.name,
      memory: { freeBytes: d.freeBytes, totalBytes: d.totalBytes },
      pciBus: d.pciBus,
      numaNode: d.numaNode,
    })),
    uptimeSeconds: (Date.now() - s.startedAt) / 1000,
    checkpoints: {
      versions: s.registry.list().length,
      pinnedBytes: s.registry.pinnedBytes(),
      budgetBytes: s.budgetBytes,
      /** Pinned memory of dropped versions, kept for the next ones (within the budget). */
      pool: s.registry.pool.status(),
      restore: s.restore,
    },
    buckets: { slots: s.buckets.slots, slotBytes: s.buckets.slotBytes },
    uploads: { dir: s.uploads.dir, orphansRemoved: s.uploads.orphansRemoved },
    ...(s.join ? { join: s.join } : {}),
  };
}
