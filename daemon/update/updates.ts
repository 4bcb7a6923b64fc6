/**
 * Broadcast updates: push a registered version into every engine of this host (and of the
 * peers it coordinates). Updates are serialized: one runs at a time, whether this daemon
 * coordinates it or takes part in another daemon's; a second request gets a 409 naming it.
 */
import type { Logger } from "pino";
import type { Context } from "../../ffi/index.ts";
import type { CheckpointVersion, Registry } from "../checkpoints/registry.ts";
import type { EngineConfig } from "../config/index.ts";
import type { DeltaItems } from "../deltas/choose.ts";
import type { VersionDelta } from "../deltas/derive.ts";
import { DaemonError } from "../errors.ts";
import type { Span } from "../peers/select.ts";
import { Coordination } from "./coordinate.ts";
import type { DataPath } from "./data-path.ts";
import { fingerprint, weightVersion, withFingerprint } from "./fingerprint.ts";
import { Participation } from "./participate.ts";
import type { PeerPlan, PeerSigner } from "./peers.ts";
import { type Bucket, type BucketOrder, type PlanOptions, type PlanTensor, planBuckets } from "./plan.ts";
import type { ReceiverHub } from "./receivers.ts";
import { type Cutover, UpdateRecord } from "./record.ts";
import { type Flow, runUpdate } from "./run-update.ts";

export type { ReceiverResult, UpdateState } from "./record.ts";
export { UpdateRecord };

export interface UpdateOptions {
  ctx: Context;
  log: Logger;
  registry: Registry;
  hub: ReceiverHub;
  path: DataPath;
  receiverTimeoutMs: number;
  /** Engines to trigger and wait for; none: whichever receivers are connected take part. */
  engines: EngineConfig[];
  socketDir: string;
  /** The other daemons an update spans (peers/select.ts), narrowed to `asked` (node ids or URLs). */
  peers: (asked?: string[]) => Span;
  /** Signs each request to a peer (the cluster secret). */
  sign: PeerSigner;
  nodeId: string;
  /** Updates kept for GET /v1/updates/{id}. */
  history?: number;
  /** How buckets are packed (plan.ts). */
  bucketOrder?: BucketOrder;
  /** Whether updates verify their buckets on the GPUs unless they say otherwise (verify.ts). */
  verifyUpdates?: boolean;
  /** Threads for hashing on the host (a version's chunk hashes, the host backend's buckets). */
  threads?: number;
}

/** How an update this daemon coordinates goes (POST /v1/updates). */
export interface StartOptions {
  /** Node ids or URLs of the peers to span (default: every peer that is up, and the seeds). */
  peers?: string[];
  /** The version may still be filling (a pull): buckets wait for their bytes. */
  filling?: boolean;
  /** Verify every bucket on its GPUs (default: the daemon's verifyUpdates). */
  verify?: boolean;
  cutover?: Cutover;
  /** Atomic cutover: stage at most this many GB/s, so that engines serving meanwhile keep their pace. */
  paceGBps?: number;
}

/** Atomic cutover drives receivers through staging and commit, not engines it calls. */
function checkAtomic(engines: EngineConfig[]): void {
  const called = engines.filter((e) => e.kind !== "receiver");
  if (called.length > 0) {
    throw new DaemonError(
      "invalid_request",
      `atomic cutover stages through receivers that commit between forward passes; engine ${called[0]?.name} (${called[0]?.kind}) is updated through its own pause and reload calls, which do not stage yet`,
    );
  }
}

/** The update running now: its record, how to stop it, and its end. */
interface InFlight {
  record: UpdateRecord;
  abort: AbortController;
  done: Promise<void>;
  /** When taking part in another daemon's update: that update's id there (its abort names it). */
  remote?: string;
  /** Its flow, when taking part (atomic cutover's /staged and /commit reach it). */
  participation?: Participation;
}

export class Updates {
  private readonly records = new Map<string, UpdateRecord>();
  private inFlight?: InFlight;
  private seq = 0;
  /** The last plan: the same version over the same GPUs and slots is planned once. */
  private lastPlan?: { key: string; buckets: Bucket[] };
  private lastDelivered?: { fingerprint: string; at: string };

  constructor(private readonly opts: UpdateOptions) {}

  get(id: string): UpdateRecord {
    const r = this.records.get(id);
    if (!r) throw new DaemonError("not_found", `no update ${id}`);
    return r;
  }

  list(): UpdateRecord[] {
    return [...this.records.values()];
  }

  /** Checks and starts an update this daemon coordinates; returns its record and a promise of its end. */
  start(ref: string, how: StartOptions = {}): { record: UpdateRecord; done: Promise<void> } {
    this.assertIdle();
    const o = this.opts;
    const { filling = false, verify, cutover = "direct" } = how;
    const span = o.peers(how.peers);
    if (cutover === "atomic") checkAtomic(o.engines);
    if (how.paceGBps !== undefined && cutover !== "atomic") {
      throw new DaemonError("invalid_request", "paceGBps paces the staging of atomic updates: give cutover: atomic");
    }
    const lease = o.registry.acquire(ref, filling);
    if (o.engines.length === 0 && span.urls.length === 0 && o.hub.connected().length === 0) {
      lease.release();
      throw new DaemonError("no_receivers", "no engine receiver is connected to this daemon");
    }
    const later = this.laterDeltas(lease.version);
    const record = new UpdateRecord(`u-${++this.seq}`, lease.version.id);
    // A version still being pulled is verified piece by piece as it lands (pull.ts), not here:
    // its chunk hashes cannot be taken from memory not yet filled.
    record.verify = (verify ?? o.verifyUpdates ?? false) && lease.version.state === "ready";
    record.cutover = cutover;
    record.paceGBps = how.paceGBps;
    record.weightVersion = weightVersion(lease.version.id, fingerprint(lease.version));
    record.leftOut = span.leftOut;
    const fp = fingerprint(lease.version);
    const deps = {
      ...o,
      peers: span.urls,
      plan: (v: CheckpointVersion, p: PlanOptions, skip?: Set<string>, deltas?: DeltaItems) =>
        this.plan(v, p, skip, deltas),
      later: later.map((l) => l.version.delta as VersionDelta),
      threads: o.threads ?? 1,
    };
    const release = () => {
      for (const l of [lease, ...later]) l.release();
    };
    const leases = { version: lease.version, release };
    const done = this.launch(record, leases, (abort) => new Coordination(deps, record, lease.version, abort)).then(
      () => {
        if (record.state === "succeeded") this.lastDelivered = { fingerprint: fp, at: new Date().toISOString() };
      },
    );
    return { record, done };
  }

  /** Takes part in a coordinator's update; resolves with this daemon's record of it once it ended. */
  async participate(plan: PeerPlan): Promise<UpdateRecord> {
    this.assertIdle();
    const { registry, path } = this.opts;
    const version = withFingerprint(registry.list(), plan.checkpoint.name, plan.checkpoint.fingerprint);
    const owned = plan.buckets.some((b) => b.owner >= plan.firstRank && b.owner < plan.firstRank + path.gpus);
    if (owned && !version) {
      throw new DaemonError("not_held", `no ready version of ${plan.checkpoint.name} with that content`);
    }
    if (plan.cutover === "atomic") checkAtomic(this.opts.engines); // before anything is leased
    const lease = version ? registry.acquire(version.id) : undefined;
    // "u-N@coordinator": this daemon's own updates are numbered u-1, u-2, ... as well.
    const what = version?.id ?? `${plan.checkpoint.name} (from ${plan.coordinator})`;
    const record = new UpdateRecord(`${plan.update}@${plan.coordinator}`, what);
    record.cutover = plan.cutover ?? "direct";
    record.verify = plan.verify === true && version !== undefined;
    record.weightVersion = plan.weightVersion ?? weightVersion(plan.checkpoint.name, plan.checkpoint.fingerprint);
    const timeout = this.opts.receiverTimeoutMs;
    let participation: Participation | undefined;
    const flow = (abort: AbortController) => {
      participation = new Participation(path, plan, version, timeout, this.opts.threads ?? 1, abort.signal);
      return participation;
    };
    const ended = this.launch(record, lease, flow, plan.update);
    if (this.inFlight?.record === record) this.inFlight.participation = participation;
    await ended;
    if (record.state === "succeeded")
      this.lastDelivered = { fingerprint: plan.checkpoint.fingerprint, at: new Date().toISOString() };
    return record;
  }

  /**
   * Atomic cutover: resolves once this daemon's engines staged the coordinator's `update`. The
   * coordinator may ask before this daemon has read its plan: it is waited for, within the
   * receiver timeout.
   */
  async staged(update: string): Promise<void> {
    const until = performance.now() + this.opts.receiverTimeoutMs;
    while (this.inFlight?.record.id !== update && performance.now() < until) await new Promise((r) => setTimeout(r, 5));
    const taking = this.taking(update);
    if (!taking.atomic) throw new DaemonError("invalid_request", `update ${update} is not an atomic cutover here`);
    await taking.stagedHere;
  }

  /** Atomic cutover: the coordinator's word to commit `update`. */
  commitOrder(update: string): boolean {
    return this.taking(update).order();
  }

  /** The flow of the coordinator's update `update` ("u-N@<its node id>") this daemon takes part in now; 404 if none. */
  private taking(update: string): Participation {
    const running = this.inFlight;
    if (!running?.participation || running.record.id !== update) {
      throw new DaemonError("not_found", `this daemon takes part in no update ${update} now`);
    }
    return running.participation;
  }

  /** Aborts this daemon's part of a coordinator's update (it saw a failure elsewhere). */
  abort(update: string, reason: string): boolean {
    const running = this.inFlight;
    if (!running || running.remote !== update) return false;
    running.abort.abort(reason);
    // A broadcast may be waiting for the failed rank: abort the communicator to release it.
    void this.opts.path.dropShared(true);
    return true;
  }

  /**
   * What this daemon tells a coordinator about itself (GET /v1/peer/info). Buffers a failure
   * discarded are made again first: a peer that cannot make them fails here, before anyone
   * joins a communicator.
   */
  async describe(): Promise<{ slots: number; slotBytes: number; comm?: string; running?: string; atomic: boolean }> {
    await this.opts.path.buffers();
    const shared = this.opts.path.sharedComm();
    return {
      ...this.opts.path.geometry,
      // Whether it can stage here: only receivers, no engines updated through their own calls.
      atomic: this.opts.engines.every((e) => e.kind === "receiver"),
      ...(shared ? { comm: `${shared.key} ${shared.id}` } : {}),
      ...(this.inFlight ? { running: this.inFlight.record.id } : {}),
    };
  }

  /** Shutdown: aborts the update in flight and waits for it. */
  async close(): Promise<void> {
    this.inFlight?.abort.abort("the daemon is shutting down");
    await this.inFlight?.done;
  }

  /** 409 naming the update in flight, if any. */
  assertIdle(): void {
    const running = this.inFlight?.record;
    if (!running) return;
    throw new DaemonError("update_running", `update ${running.id} of ${running.checkpoint} is running`, {
      running: running.id,
    });
  }

  /** Records the update and runs it as the one in flight; resolves when it ended. */
  private launch(
    record: UpdateRecord,
    lease: { version: CheckpointVersion; release: () => void } | undefined,
    flow: (abort: AbortController) => Flow,
    remote?: string,
  ): Promise<void> {
    this.records.set(record.id, record);
    this.trim();
    const abort = new AbortController();
    const done = runUpdate(this.opts, record, flow(abort), abort).finally(() => {
      lease?.release();
      if (this.inFlight?.record === record) this.inFlight = undefined;
      // The engines may have left a version that maxVersions kept only because they held it.
      if (lease) void this.opts.registry.updated(lease.version.name);
    });
    this.inFlight = { record, abort, done, remote };
    return done;
  }

  private trim(): void {
    const keep = this.opts.history ?? 100;
    for (const id of [...this.records.keys()].slice(0, Math.max(0, this.records.size - keep))) this.records.delete(id);
  }

  /** The fingerprint this daemon's engines last received in a successful update, and when. */
  get delivered(): { fingerprint: string; at: string } | undefined {
    return this.lastDelivered;
  }

  /**
   * Leases of the versions whose deltas take engines back to `version` (their base), so that
   * their memory stays while an update reads it; those that cannot be leased now are left out.
   */
  private laterDeltas(version: CheckpointVersion): { version: CheckpointVersion; release: () => void }[] {
    const later = this.opts.registry.list().filter((v) => v.name === version.name && v.delta?.base === version.id);
    return later.flatMap((v) => {
      try {
        return [this.opts.registry.acquire(v.id)];
      } catch {
        return [];
      }
    });
  }

  private plan(
    version: CheckpointVersion,
    given: PlanOptions,
    skip = new Set<string>(),
    deltas?: DeltaItems,
  ): Bucket[] {
    const opts = { ...given, order: this.opts.bucketOrder ?? "size" };
    const sent = deltas?.items ?? [];
    const from = deltas?.sources.map((m) => String(m.address)) ?? [];
    const key = JSON.stringify([
      version.id,
      opts,
      [...skip].sort(),
      from,
      sent.map((t) => [t.name, t.file, t.offset, t.bytes, t.delta]),
    ]);
    if (this.lastPlan?.key !== key) {
      const whole = new Set([...skip, ...sent.map((t) => t.name)]);
      const tensors = whole.size > 0 ? version.tensors.filter((t) => !whole.has(t.name)) : version.tensors;
      this.lastPlan = { key, buckets: planBuckets((tensors as PlanTensor[]).concat(sent), opts) };
    }
    return this.lastPlan.buckets;
  }
}
