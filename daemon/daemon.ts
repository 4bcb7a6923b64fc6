import type { Logger } from "pino";
import { type Context, openBackend } from "../ffi/index.ts";
import { Keyring } from "./auth/credentials.ts";
import { pushRoutes } from "./checkpoints/push-routes.ts";
import { Registry } from "./checkpoints/registry.ts";
import { checkpointRoutes, type PullSpec } from "./checkpoints/routes.ts";
import { StagingAreas } from "./checkpoints/staging.ts";
import { type RestoreReport, restoreRegistry, saveRegistry } from "./checkpoints/store.ts";
import { openUploadArea, removeOrphans, type UploadArea } from "./checkpoints/upload-dir.ts";
import { uploadRoutes } from "./checkpoints/upload-routes.ts";
import type { Config } from "./config/index.ts";
import { Deltas } from "./deltas/derive.ts";
import { bucketOrderFor } from "./engines/plan.ts";
import { createApp } from "./http/app.ts";
import { auth } from "./http/auth.ts";
import { isLoopback, loadTls, validityWarning } from "./http/tls.ts";
import { metricsOf } from "./metrics.ts";
import { advertiseUrlOf } from "./peers/advertise.ts";
import { Gossip } from "./peers/gossip.ts";
import { Members, type SelfInfo } from "./peers/members.ts";
import { peerRoutes } from "./peers/routes.ts";
import { updateSpan } from "./peers/select.ts";
import { Join } from "./pull/join.ts";
import { type PullDeps, startPull } from "./pull/pull.ts";
import { pullRoutes } from "./pull/routes.ts";
import { PullSource } from "./pull/serve.ts";
import { PullTransport } from "./pull/transport.ts";
import type { Runtime } from "./runtime/index.ts";
import { type NcclStatus, ncclStatus, statusOf } from "./status.ts";
import { DataPath } from "./update/data-path.ts";
import { openSocketDir } from "./update/engine-access.ts";
import { checkEngineGpus } from "./update/engines.ts";
import { fingerprint } from "./update/fingerprint.ts";
import type { PeerSigner } from "./update/peers.ts";
import { type Receiver, ReceiverHub } from "./update/receivers.ts";
import { updateRoutes } from "./update/routes.ts";
import { Updates } from "./update/updates.ts";
import { VERSION } from "./version.ts";

export interface Daemon {
  port: number;
  context: Context;
  registry: Registry;
  /** Reads the tokens and the cluster secret again (SIGHUP); false if they stayed as they were. */
  reload(): boolean;
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

/** The daemon's parts, before it serves. */
interface Parts {
  context: Context;
  nccl: NcclStatus;
  registry: Registry;
  restore: RestoreReport;
  path: DataPath;
  hub: ReceiverHub;
  updates: Updates;
  uploads: UploadArea;
  staging: StagingAreas;
  members: Members;
  transport: PullTransport;
  source: PullSource;
  /** Called after a receiver said hello and was greeted. */
  greeted: ((r: Receiver) => void)[];
}

async function openParts(
  { config, log, nodeId, libDir }: StartOptions,
  sign: PeerSigner,
  advertisedHost: () => string,
): Promise<Parts> {
  // Before the data plane: an upload directory that is not the daemon's own stops the start.
  const uploads = await openUploadArea(config, nodeId);
  const sockets = await openSocketDir(config, uploads.uid);
  const { context, reason } = await openBackend(config.backend, libDir, {
    hostDevices: config.hostDevices,
    ncclPath: config.ncclPath,
  });
  // What is open so far, closed in reverse if a later part cannot be made.
  const undo: (() => Promise<void>)[] = [() => context.destroy()];
  try {
    checkEngineGpus(config.engines, context.devices().length);
    const nccl = ncclStatus(context);
    log.info({ backend: context.backend, reason, library: context.lib.path, nccl }, "data plane ready");
    const registry = new Registry({
      ctx: context,
      log,
      budgetBytes: config.pinnedBudgetBytes,
      maxVersions: config.maxVersions,
      threads: config.ioThreads,
      files: uploads.files,
      onChange: (r) => saveRegistry(config.stateDir, r),
    });
    undo.unshift(() => registry.close());
    new Deltas({ ctx: context, log, registry, threads: config.ioThreads });
    const staging = new StagingAreas(registry, uploads.dir, uploads.group);
    undo.unshift(() => staging.close());
    const restore = await restoreRegistry(config.stateDir, registry, log);
    const kept = new Set(registry.list().flatMap((v) => v.files.map((f) => f.path)));
    uploads.orphansRemoved = await removeOrphans(uploads.dir, uploads.uid, kept);
    if (uploads.orphansRemoved.length) log.warn({ removed: uploads.orphansRemoved }, "orphaned staging files removed");
    // Made at start, before engines take the GPU memory, and kept.
    const { bucketSlots, bucketBytes, bucketMemoryBytes } = config;
    const receivers = () => hub.connected();
    const path = await DataPath.open({ ctx: context, log, bucketSlots, bucketBytes, bucketMemoryBytes, receivers });
    undo.unshift(() => path.close());
    const socketDir = sockets.dir;
    const peerCred = (fd: number) => context.lib.peerCred(fd);
    const greeted: ((r: Receiver) => void)[] = [];
    const greet = (r: Receiver) => {
      path.greet(r);
      for (const f of greeted) f(r);
    };
    const hub = new ReceiverHub(socketDir, path.gpus, log, greet, { ...sockets.access, peerCred });
    registry.holders = (id) =>
      hub
        .connected()
        .filter((r) => r.holds?.version === id)
        .map((r) => `receiver ${r.label}`);
    undo.unshift(() => hub.close());
    await hub.listen(context.devices().map((d) => d.uuid));
    const members = new Members(nodeId, config.peerDownMs);
    const peers = (asked?: string[]) => updateSpan(members.list(), members.unheardSeeds(config.peers), asked);
    const { receiverTimeoutMs, engines } = config;
    const updates = new Updates({
      ctx: context,
      log,
      registry,
      hub,
      path,
      socketDir,
      peers,
      sign,
      nodeId,
      receiverTimeoutMs,
      engines,
      bucketOrder: bucketOrderFor(config.bucketOrder, engines),
      verifyUpdates: config.verifyUpdates,
      threads: config.ioThreads,
    });
    log.info({ gpus: path.gpus, ...path.geometry, sockets: hub.socketDir }, "update path ready");
    const transport = new PullTransport({
      ctx: context,
      log,
      host: config.host,
      port: config.ucxPort,
      advertisedHost,
      ucpPath: config.ucxPath,
      transports: config.ucxTransports,
      corrupt: config.testFaults.includes("corrupt-serve"),
      lanes: config.ucxLanes,
    });
    undo.splice(undo.length - 1, 0, () => transport.close()); // after the registry (which stops serving), before the context
    const source = new PullSource({ nodeId, ctx: context, registry, transport, threads: config.ioThreads });
    return {
      context,
      nccl,
      registry,
      restore,
      path,
      hub,
      updates,
      uploads,
      staging,
      members,
      transport,
      source,
      greeted,
    };
  } catch (err) {
    for (const close of undo) await close().catch(() => undefined);
    throw err;
  }
}

/** What this daemon says of itself to its peers (peers/members.ts). */
function selfInfo(p: Parts, nodeId: string, url: string): Omit<SelfInfo, "beat" | "startedAt"> {
  const versions = p.registry
    .list()
    .filter((v) => v.state === "ready")
    .map((v) => ({
      name: v.name,
      version: v.version,
      fingerprint: fingerprint(v),
      bytes: v.bytes,
      registeredAt: v.createdAt,
    }));
  const delivered = p.updates.delivered;
  const last = delivered ? { delivered: delivered.fingerprint, deliveredAt: delivered.at } : {};
  return { nodeId, url, backend: p.context.backend, gpus: p.path.gpus, versions, ...last };
}

function appOf(
  opts: StartOptions,
  p: Parts,
  keyring: Keyring,
  startedAt: number,
  peers: { gossip: Gossip; self: () => SelfInfo },
  pullDeps: PullDeps,
  join: Join | undefined,
) {
  const { gossip, self } = peers;
  const { config, runtime, log, nodeId } = opts;
  const status = () =>
    statusOf({
      ...p,
      nodeId,
      runtime: runtime.name,
      startedAt,
      budgetBytes: config.pinnedBudgetBytes,
      buckets: p.path.geometry,
      ...(join ? { join: join.status() } : {}),
    });
  const app = createApp({
    log,
    status,
    maxBodyBytes: config.maxBodyBytes,
    auth: auth({ credentials: () => keyring.credentials(), nodeId, maxBodyBytes: config.maxBodyBytes }),
  });
  const pull = (name: string, spec: PullSpec) => startPull({ name, ...spec }, pullDeps);
  checkpointRoutes(app, p.registry, config.pinnedBudgetBytes, p.uploads.files, pull);
  pullRoutes(app, p.source, p.registry);
  uploadRoutes(app, p.registry, p.uploads.dir);
  pushRoutes(app, p.staging, { ctx: p.context, registry: p.registry, threads: config.ioThreads, log });
  const pullFor = (name: string, fingerprint?: string) =>
    startPull({ name, from: "peers", ...(fingerprint ? { fingerprint } : {}) }, pullDeps);
  updateRoutes(app, p.updates, p.registry, { nodeId, gpus: p.path.gpus }, pullFor);
  peerRoutes(app, p.members, gossip, self);
  app.get("/metrics", (c) =>
    c.text(metricsOf(p.registry, p.updates, p.hub, p.path.gpus), 200, {
      "content-type": "text/plain; version=0.0.4",
    }),
  );
  return app;
}

/** What pulls need of the daemon's parts. */
function pullDepsOf(p: Parts, config: Config, log: Logger, sign: PeerSigner): PullDeps {
  return {
    ctx: p.context,
    log,
    registry: p.registry,
    transport: p.transport,
    sign,
    holders: () => p.members.up().map((m) => m.info),
    stallMs: config.pullStallMs,
    chunkBytes: config.pullChunkBytes,
    threads: config.ioThreads,
  };
}

/** The elastic start of config `join`, if any: its engines get the fleet's version as they connect. */
function joinOf(p: Parts, config: Config, log: Logger, pullDeps: PullDeps): Join | undefined {
  if (!config.join) return undefined;
  const name = config.join.checkpoint;
  const join = new Join({
    name,
    registry: p.registry,
    updates: p.updates,
    log,
    pull: () => startPull({ name, from: "peers" }, pullDeps),
    receivers: () => p.hub.connected().length,
    retryMs: Math.max(config.heartbeatMs, 100),
  });
  p.greeted.push(() => join.connected());
  return join;
}

/** Frees the parts, in the reverse order of their making. */
async function release(p: Parts): Promise<void> {
  await p.hub.close();
  await p.path.close();
  await p.staging.close();
  await p.registry.close();
  await p.transport.close();
  await p.context.destroy();
}

/** Opens the data plane and serves the API; resolves once the port is bound. */
export async function startDaemon(opts: StartOptions): Promise<Daemon> {
  const { config, runtime, log } = opts;
  const startedAt = Date.now();
  // First: a bad tokens file or secret stops the start before anything is opened.
  const keyring = new Keyring(config, log);
  const tls = loadTls(config);
  let advertised = config.advertiseUrl.replace(/\/+$/, "");
  const parts = await openParts(opts, keyring.sign, () => new URL(advertised).hostname);
  let server: Awaited<ReturnType<Runtime["serve"]>>;
  const { host: hostname, port } = config;
  const self = (): SelfInfo => ({ ...selfInfo(parts, opts.nodeId, advertised), startedAt, beat: gossip.beats });
  const gossip = new Gossip({
    members: parts.members,
    self,
    sign: keyring.sign,
    log,
    heartbeatMs: config.heartbeatMs,
    dns: config.peerDns,
  });
  for (const seed of config.peers) parts.members.propose(seed, true);
  const pullDeps = pullDepsOf(parts, config, log, keyring.sign);
  const join = joinOf(parts, config, log, pullDeps);
  try {
    const certificate = tls && { cert: tls.cert, key: tls.key };
    const app = appOf(opts, parts, keyring, startedAt, { gossip, self }, pullDeps, join);
    server = await runtime.serve(app.fetch, { hostname, port, tls: certificate });
  } catch (err) {
    await release(parts);
    throw new Error(`cannot listen on ${hostname}:${port}: ${(err as Error).message}`);
  }
  const scheme = tls ? "https" : "http";
  advertised ||= advertiseUrlOf(hostname, server.port, scheme);
  log.info(
    { host: hostname, port: server.port, scheme, runtime: runtime.name, version: VERSION, advertiseUrl: advertised },
    "listening",
  );
  if (!config.advertiseUrl && /\/\/(127\.|\[::1\])/.test(advertised) && !isLoopback(hostname)) {
    log.warn(
      { advertiseUrl: advertised },
      "no address of this machine that peers could reach was found: set advertiseUrl",
    );
  }
  gossip.start();
  join?.start();
  const expiry = tls && validityWarning(tls, new Date());
  if (expiry) log.warn({ tlsCertFile: config.tlsCertFile }, expiry);
  if (!tls && !isLoopback(hostname)) {
    log.warn(
      { host: hostname },
      "the API listens beyond loopback without TLS: tokens and requests travel in clear (set tlsCertFile and tlsKeyFile)",
    );
  }
  let stopping: Promise<void> | undefined;
  return {
    port: server.port,
    context: parts.context,
    registry: parts.registry,
    reload: () => keyring.reload(),
    stop() {
      stopping ??= (async () => {
        // The update in flight is aborted first (its client waits on an open connection, which
        // server.close() would wait for), then the peers are told this daemon leaves.
        gossip.stop();
        join?.stop();
        const closing = server.close();
        await parts.updates.close();
        await gossip.leave();
        await closing;
        await release(parts);
      })();
      return stopping;
    },
  };
}
