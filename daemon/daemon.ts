import { join } from "node:path";
import type { Logger } from "pino";
import { CkptError, type Context, openBackend } from "../ffi/index.ts";
import { Registry } from "./checkpoints/registry.ts";
import { checkpointRoutes } from "./checkpoints/routes.ts";
import { type RestoreReport, restoreRegistry, saveRegistry } from "./checkpoints/store.ts";
import { uploadRoutes } from "./checkpoints/uploads.ts";
import type { Config } from "./config/index.ts";
import { createApp } from "./http/app.ts";
import { metricsOf } from "./metrics.ts";
import type { Runtime } from "./runtime/index.ts";
import { ReceiverHub } from "./update/receivers.ts";
import { updateRoutes } from "./update/routes.ts";
import { Transfer } from "./update/transfer.ts";
import { Updates } from "./update/updates.ts";
import { VERSION } from "./version.ts";

export interface Daemon {
  port: number;
  context: Context;
  registry: Registry;
  /** Stops serving, releases the data plane; idempotent. */
  stop(): Promise<void>;
}

export interface StartOptions {
  config: Config;
  runtime: Runtime;
  log: Logger;
  nodeId: string;
  /** Directory of libckpt-*.so. */
  libDir: string;
}

function ncclStatus(context: Context): { version: number } | { error: string } {
  try {
    return { version: context.ncclVersion() };
  } catch (err) {
    return { error: err instanceof CkptError ? `${err.status}: ${err.detail}` : String(err) };
  }
}

/**
 * Bucket size: the configured cap, lowered so that every GPU's slots (at least two per GPU,
 * see Transfer.open) fit in bucketMemoryBytes and in a tenth of the freest GPU's free memory.
 */
function bucketSize(context: Context, cap: number, slots: number, total: number): number {
  const free = Math.min(...context.devices().map((d) => d.freeBytes));
  const fit = Math.floor(Math.min(free / 10, total) / slots / (1 << 20)) * (1 << 20);
  return Math.max(1 << 20, Math.min(cap, fit));
}

/** Opens the data plane and serves the API; resolves once the port is bound. */
export async function startDaemon(opts: StartOptions): Promise<Daemon> {
  const { config, runtime, log } = opts;
  const startedAt = Date.now();
  const { context, reason } = await openBackend(config.backend, opts.libDir, {
    hostDevices: config.hostDevices,
    ncclPath: config.ncclPath,
  });
  const nccl = ncclStatus(context);
  log.info({ backend: context.backend, reason, library: context.lib.path, nccl }, "data plane ready");

  const registry = new Registry({
    ctx: context,
    log,
    budgetBytes: config.pinnedBudgetBytes,
    maxVersions: config.maxVersions,
    threads: config.ioThreads,
    onChange: (r) => saveRegistry(config.stateDir, r),
  });
  const restore: RestoreReport = await restoreRegistry(config.stateDir, registry, log);

  // The update data path is made at start, before engines take the GPU memory, and kept.
  const gpus = context.deviceCount();
  const slotBytes = bucketSize(
    context,
    config.bucketBytes,
    Math.max(config.bucketSlots, 2 * gpus),
    config.bucketMemoryBytes,
  );
  let transfer: Transfer | undefined = await Transfer.open(context, gpus, config.bucketSlots, slotBytes);
  let opening: Promise<Transfer> | undefined;
  const socketDir = config.socketDir || join(config.stateDir, "sockets");
  const hub = new ReceiverHub(socketDir, gpus, log, (r) => {
    const info = context.deviceInfo(r.gpu);
    r.send({ op: "welcome", protocol: 1, gpu: r.gpu, uuid: info.uuid, backend: context.backend });
    if (transfer) r.send({ op: "buffers", generation: transfer.generation, slots: transfer.handles(r.gpu) });
  });
  await hub.listen();
  const updates = new Updates({
    ctx: context,
    log,
    registry,
    hub,
    receiverTimeoutMs: config.receiverTimeoutMs,
    engines: config.engines,
    socketDir,
    peers: config.peers.map((u) => u.replace(/\/$/, "")),
    nodeId: opts.nodeId,
    gpus,
    transfer: async () => {
      if (transfer) return transfer;
      // One opening at a time: two callers must not make two paths.
      opening ??= Transfer.open(context, gpus, config.bucketSlots, slotBytes)
        .then((t) => {
          transfer = t;
          for (const r of hub.connected()) r.send({ op: "buffers", generation: t.generation, slots: t.handles(r.gpu) });
          return t;
        })
        .finally(() => {
          opening = undefined;
        });
      return opening;
    },
    discard: async () => {
      // A device that did not finish in time: leak nothing we can free, make anew next time.
      const t = transfer;
      transfer = undefined;
      await t?.close().catch((err) => log.error({ err }, "closing a broken data path"));
    },
  });
  log.info({ gpus, slots: config.bucketSlots, slotBytes, sockets: hub.socketDir }, "update path ready");

  const app = createApp({
    log,
    status: () => ({
      nodeId: opts.nodeId,
      version: VERSION,
      runtime: runtime.name,
      backend: context.backend,
      nccl,
      gpus: context.devices().map((d) => ({
        socket: hub.socketPath(d.index),
        receivers: hub
          .connected()
          .filter((r) => r.gpu === d.index)
          .map((r) => r.label),
        index: d.index,
        uuid: d.uuid,
        name: d.name,
        memory: { freeBytes: d.freeBytes, totalBytes: d.totalBytes },
        pciBus: d.pciBus,
        numaNode: d.numaNode,
      })),
      uptimeSeconds: (Date.now() - startedAt) / 1000,
      checkpoints: {
        versions: registry.list().length,
        pinnedBytes: registry.pinnedBytes(),
        budgetBytes: config.pinnedBudgetBytes,
        restore,
      },
      buckets: { slots: transfer?.slots, slotBytes: transfer?.slotBytes },
    }),
  });
  checkpointRoutes(app, registry, config.pinnedBudgetBytes);
  uploadRoutes(app, registry, config.uploadDir);
  updateRoutes(app, updates, registry, { nodeId: opts.nodeId, gpus });
  app.get("/metrics", (c) =>
    c.text(metricsOf(registry, updates, hub, gpus), 200, { "content-type": "text/plain; version=0.0.4" }),
  );

  let server: Awaited<ReturnType<Runtime["serve"]>>;
  try {
    server = await runtime.serve(app.fetch, config.host, config.port);
  } catch (err) {
    await hub.close();
    await transfer?.close();
    await registry.close();
    await context.destroy();
    throw new Error(`cannot listen on ${config.host}:${config.port}: ${(err as Error).message}`);
  }
  log.info({ host: config.host, port: server.port, runtime: runtime.name, version: VERSION }, "listening");

  let stopping: Promise<void> | undefined;
  return {
    port: server.port,
    context,
    registry,
    stop() {
      stopping ??= (async () => {
        await server.close();
        await updates.close();
        await hub.close();
        await transfer?.close();
        await registry.close();
        await context.destroy();
      })();
      return stopping;
    },
  };
}
