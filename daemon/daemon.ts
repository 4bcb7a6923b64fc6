import type { Logger } from "pino";
import { CkptError, type Context, openBackend } from "../ffi/index.ts";
import { Registry } from "./checkpoints/registry.ts";
import { checkpointRoutes } from "./checkpoints/routes.ts";
import { type RestoreReport, restoreRegistry, saveRegistry } from "./checkpoints/store.ts";
import { uploadRoutes } from "./checkpoints/uploads.ts";
import type { Config } from "./config/index.ts";
import { createApp } from "./http/app.ts";
import type { Runtime } from "./runtime/index.ts";
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

  const app = createApp({
    log,
    status: () => ({
      nodeId: opts.nodeId,
      version: VERSION,
      runtime: runtime.name,
      backend: context.backend,
      nccl,
      gpus: context.devices().map((d) => ({
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
    }),
  });
  checkpointRoutes(app, registry, config.pinnedBudgetBytes);
  uploadRoutes(app, registry, config.uploadDir);

  let server: Awaited<ReturnType<Runtime["serve"]>>;
  try {
    server = await runtime.serve(app.fetch, config.host, config.port);
  } catch (err) {
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
        await registry.close();
        await context.destroy();
      })();
      return stopping;
    },
  };
}
