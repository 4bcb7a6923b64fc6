/**
 * Broadcast updates: push a registered version into every engine of this host. Buckets move
 * through three overlapping stages (host-to-device copy by the owning GPU, broadcast to every
 * GPU, engines copying out of the slot and acking), ordered by events on streams; a slot is
 * reused only after every engine on every GPU acked the bucket it held.
 */
import type { Logger } from "pino";
import type { Comm, Context } from "../../ffi/index.ts";
import type { CheckpointVersion, Registry } from "../checkpoints/registry.ts";
import type { EngineConfig } from "../config/index.ts";
import { DaemonError, type ErrorCode } from "../errors.ts";
import { awaitReceivers, type Triggered, triggerEngines } from "./engines.ts";
import { fingerprint, type Participant, type PeerPlan, peerAbort, peerInfo, peerRun } from "./peers.ts";
import { type BucketTiming, type Group, transmit } from "./pipeline.ts";
import { type Bucket, type PlanOptions, planBuckets } from "./plan.ts";
import { type Receiver, ReceiverError, type ReceiverHub } from "./receivers.ts";
import type { Transfer } from "./transfer.ts";

export type UpdateState = "running" | "succeeded" | "failed";

export interface ReceiverResult {
  name: string;
  pid: number;
  gpu: number;
  bucketsAcked: number;
  /** applied: has the whole new version; partial: some of it; untouched: none of it. */
  state: "applied" | "partial" | "untouched";
}

export class UpdateRecord {
  state: UpdateState = "running";
  readonly createdAt = new Date().toISOString();
  finishedAt?: string;
  error?: { code: ErrorCode; message: string; receiver?: string };
  progress = { buckets: 0, bucketsDone: 0, bytes: 0, bytesDone: 0 };
  timings = { seconds: 0, gbps: 0, planSeconds: 0, stallSeconds: 0, finishSeconds: 0 };
  /** Per bucket, in milliseconds from the update's start (GET /v1/updates/{id}?buckets=true). */
  buckets: BucketTiming[] = [];
  readonly t0 = performance.now();
  receivers: ReceiverResult[] = [];

  constructor(
    readonly id: string,
    readonly checkpoint: string,
  ) {}

  toJSON() {
    return this.view(false);
  }

  /** The record as the API shows it; with the per-bucket timeline when asked. */
  view(withBuckets: boolean) {
    return {
      id: this.id,
      checkpoint: this.checkpoint,
      state: this.state,
      createdAt: this.createdAt,
      ...(this.finishedAt ? { finishedAt: this.finishedAt } : {}),
      progress: this.progress,
      timings: this.timings,
      receivers: this.receivers,
      ...(this.error ? { error: this.error } : {}),
      ...(withBuckets ? { buckets: this.buckets } : {}),
    };
  }
}

export interface UpdateOptions {
  ctx: Context;
  log: Logger;
  registry: Registry;
  hub: ReceiverHub;
  /** The current data path (made at start, re-made after a failure that broke it). */
  transfer: () => Promise<Transfer>;
  /** Mark the data path broken: the next update re-makes it. */
  discard: () => Promise<void>;
  receiverTimeoutMs: number;
  /** Engines to trigger and wait for; none: whichever receivers are connected take part. */
  engines: EngineConfig[];
  socketDir: string;
  /** Other daemons that take part in this daemon's updates (base URLs). */
  peers: string[];
  nodeId: string;
  /** Local GPUs. */
  gpus: number;
  /** Updates kept for GET /v1/updates/{id}. */
  history?: number;
}

/** Serializes updates: a second request while one runs gets a 409 naming it. */
export class Updates {
  private readonly records = new Map<string, UpdateRecord>();
  private running?: UpdateRecord;
  private seq = 0;

  constructor(private readonly opts: UpdateOptions) {}

  get(id: string): UpdateRecord {
    const r = this.records.get(id);
    if (!r) throw new DaemonError("not_found", `no update ${id}`);
    return r;
  }

  list(): UpdateRecord[] {
    return [...this.records.values()];
  }

  /** Checks and starts an update; returns its record and a promise of its end. */
  start(ref: string): { record: UpdateRecord; done: Promise<void> } {
    if (this.running) {
      throw new DaemonError("update_running", `update ${this.running.id} of ${this.running.checkpoint} is running`, {
        running: this.running.id,
      });
    }
    const lease = this.opts.registry.acquire(ref);
    const o = this.opts;
    if (o.engines.length === 0 && o.peers.length === 0 && o.hub.connected().length === 0) {
      lease.release();
      throw new DaemonError("no_receivers", "no engine receiver is connected to this daemon");
    }
    const record = new UpdateRecord(`u-${++this.seq}`, lease.version.id);
    this.records.set(record.id, record);
    this.trim();
    this.running = record;
    const done = this.run(record, lease.version).finally(() => {
      lease.release();
      this.running = undefined;
      this.current = undefined;
    });
    this.ending = done;
    return { record, done };
  }

  private trim(): void {
    const keep = this.opts.history ?? 100;
    for (const id of [...this.records.keys()].slice(0, Math.max(0, this.records.size - keep))) this.records.delete(id);
  }

  private triggerEngines(): Triggered[] {
    return triggerEngines(this.opts.engines, this.opts.socketDir, this.opts.receiverTimeoutMs);
  }

  private awaitReceivers(triggered: Triggered[]): Promise<Receiver[]> {
    return awaitReceivers(this.opts.hub, this.opts.engines, triggered, this.opts.receiverTimeoutMs);
  }

  /** The communicator over every rank of a multi-daemon update, kept while its members are. */
  private shared?: { key: string; id: string; comm: Comm };

  /** The last plan: the same version over the same GPUs and slots is planned once. */
  private lastPlan?: { key: string; buckets: Bucket[] };

  private plan(version: CheckpointVersion, opts: PlanOptions): Bucket[] {
    const key = JSON.stringify([version.id, opts]);
    if (this.lastPlan?.key !== key) this.lastPlan = { key, buckets: planBuckets(version.tensors, opts) };
    return this.lastPlan.buckets;
  }

  private async dropShared(abort: boolean): Promise<void> {
    const shared = this.shared;
    this.shared = undefined;
    if (!shared) return;
    const { ctx, log } = this.opts;
    await (abort ? ctx.commAbort(shared.comm) : ctx.commDestroy(shared.comm)).catch((err) =>
      log.error({ err }, "freeing a communicator"),
    );
  }

  /** Joins (or reuses) the communicator of a multi-daemon update. */
  private async sharedComm(comm: PeerPlan["comm"], firstRank: number, gpus: number): Promise<Comm> {
    if (!comm.fresh && this.shared?.key === comm.key && this.shared.id === comm.id) return this.shared.comm;
    if (!comm.fresh) throw new DaemonError("comm_lost", `communicator ${comm.key} is not known here`);
    await this.dropShared(false);
    const devices = Array.from({ length: gpus }, (_, g) => g);
    // Bounded: a participant that never joins (it died, or refused the plan) fails the update.
    const made = await this.opts.ctx.commInit(
      Buffer.from(comm.id, "hex"),
      comm.nranks,
      firstRank,
      devices,
      this.opts.receiverTimeoutMs,
    );
    this.shared = { key: comm.key, id: comm.id, comm: made };
    return made;
  }

  /** What this daemon tells a coordinator about itself (GET /v1/peer/info). */
  async describe(): Promise<{ slots: number; slotBytes: number; comm?: string }> {
    const t = await this.opts.transfer();
    return {
      slots: t.slots,
      slotBytes: t.slotBytes,
      ...(this.shared ? { comm: `${this.shared.key} ${this.shared.id}` } : {}),
    };
  }

  /** The abort of the coordinated update in flight, and its end. */
  private current?: AbortController;
  private ending?: Promise<void>;

  /** Shutdown: aborts the update in flight, waits for it, frees the shared communicator. */
  async close(): Promise<void> {
    this.current?.abort("the daemon is shutting down");
    for (const a of this.aborts.values()) a.abort("the daemon is shutting down");
    await this.ending;
    await this.dropShared(true);
  }

  /** Coordinator: plans over every participant, runs its own part, collects the peers'. */
  private async run(record: UpdateRecord, version: CheckpointVersion): Promise<void> {
    const { receiverTimeoutMs: timeout, peers } = this.opts;
    const t0 = record.t0;
    let triggered: Triggered[] = [];
    let receivers: Receiver[] = [];
    const acked = new Map<Receiver, number>();
    const aborted = new AbortController();
    this.current = aborted;
    let transfer: Transfer | undefined;
    let remote: Participant[] = [];
    const peerResults: Promise<void>[] = [];
    const peerFailures: { url: string; message: string; code?: string }[] = [];
    try {
      transfer = await this.opts.transfer();
      const t = transfer;
      const fp = fingerprint(version);
      let rank = t.gpus.length;
      const infos = await Promise.all(peers.map((url) => peerInfo(url, version.name, fp, timeout)));
      for (const [i, url] of peers.entries()) {
        const info = infos[i] as (typeof infos)[number];
        // Checked before anyone joins a communicator: a rank that never joins would block the others.
        if (info.running) throw new Error(`peer ${url} is busy with update ${info.running}`);
        if (info.slots !== t.slots || info.slotBytes !== t.slotBytes) {
          // bucketSlots is raised to 2 per GPU, and buckets shrink to fit bucketMemoryBytes and
          // the GPUs' free memory: the same settings can give different geometries.
          throw new Error(
            `peer ${url} has ${info.slots} slots of ${info.slotBytes} bytes, this daemon ${t.slots} of ${t.slotBytes}: set bucketSlots to ${Math.max(info.slots, t.slots)} and bucketBytes to ${Math.min(info.slotBytes, t.slotBytes)} on every daemon (bucketSlots is raised to 2 per GPU; buckets shrink to fit bucketMemoryBytes and free GPU memory)`,
          );
        }
        remote.push({ url, info, firstRank: rank });
        rank += info.gpus;
      }
      const owners = [
        ...t.gpus.map((_, g) => g),
        ...remote
          .filter((p) => p.info.holds)
          .flatMap((p) => Array.from({ length: p.info.gpus }, (_, g) => p.firstRank + g)),
      ];
      if (t.slots < owners.length) {
        throw new Error(`${owners.length} GPUs copy this checkpoint but there are ${t.slots} slots; raise bucketSlots`);
      }
      const buckets = this.plan(version, { bucketBytes: t.slotBytes, owners, slots: t.slots });
      record.progress.buckets = buckets.length;
      record.progress.bytes = buckets.reduce((sum, b) => sum + b.bytes, 0);
      let group: Group = { comm: t.comm, firstRank: 0, ordered: false };
      if (remote.length > 0) {
        const key = JSON.stringify([
          t.gpus.length,
          t.slots,
          t.slotBytes,
          remote.map((p) => [p.url, p.info.nodeId, p.info.gpus]),
        ]);
        const mine = this.shared && `${this.shared.key} ${this.shared.id}`;
        const fresh = this.shared?.key !== key || remote.some((p) => p.info.comm !== mine);
        const id = fresh ? Buffer.from(this.opts.ctx.commIdNew()).toString("hex") : (this.shared?.id as string);
        for (const p of remote) {
          const plan: PeerPlan = {
            update: record.id,
            coordinator: this.opts.nodeId,
            checkpoint: { name: version.name, fingerprint: fp },
            comm: { key, id, fresh, nranks: rank },
            firstRank: p.firstRank,
            slots: t.slots,
            slotBytes: t.slotBytes,
            buckets,
          };
          peerResults.push(
            // Not cancelled when this daemon fails: the peer's answer may name the cause.
            peerRun(p.url, plan).then((r) => {
              if (r.ok) return;
              const code = (r.record as { error?: { code?: string } } | undefined)?.error?.code;
              peerFailures.push({ url: p.url, message: r.message ?? "failed", code });
              if (!aborted.signal.aborted) aborted.abort(`peer ${p.url} failed: ${r.message}`);
            }),
          );
        }
        group = {
          comm: await this.sharedComm({ key, id, fresh, nranks: rank }, 0, t.gpus.length),
          firstRank: 0,
          ordered: true,
        };
      }
      record.timings.planSeconds = (performance.now() - t0) / 1000;
      // Engines are asked only once everything that can fail before them has succeeded.
      triggered = this.triggerEngines();
      receivers = await this.awaitReceivers(triggered);
      for (const r of receivers) acked.set(r, 0);
      await this.moveAndFinish({
        record,
        version,
        buckets,
        group,
        transfer: t,
        receivers,
        acked,
        signal: aborted.signal,
      });
      await Promise.all(peerResults);
      if (aborted.signal.aborted) throw new Error(String(aborted.signal.reason));
      for (const tr of triggered) {
        const err = await tr.result;
        if (err) throw new Error(`engine ${tr.engine.name}: ${err}`);
      }
      record.state = "succeeded";
    } catch (err) {
      const local = (err as Error).message;
      if (!aborted.signal.aborted) aborted.abort(local);
      if (remote.length > 0) {
        // A collective may be waiting for a rank that will never come: abort (made anew next
        // time), tell the peers, and hear them out: a peer's failing engine explains the
        // transport error this daemon saw when that peer dropped out.
        await this.dropShared(true);
        await Promise.all(remote.map((p) => peerAbort(p.url, record.id, local, timeout)));
        await Promise.race([Promise.all(peerResults), new Promise((r) => setTimeout(r, timeout))]);
      }
      const cause = err instanceof ReceiverError ? undefined : peerFailures.find((f) => f.code === "receiver_failed");
      this.fail(
        record,
        err,
        receivers,
        cause ? `peer ${cause.url} failed: ${cause.message}` : String(aborted.signal.reason),
      );
      if (transfer && !(await transfer.drain(timeout).catch(() => false))) await this.opts.discard();
      remote = [];
    }
    this.finish(record, receivers, acked, t0, version.id);
  }

  /** Participant: runs a coordinator's plan on this daemon's GPUs and engines. */
  async participate(plan: PeerPlan): Promise<UpdateRecord> {
    if (this.running) {
      throw new DaemonError("update_running", `update ${this.running.id} of ${this.running.checkpoint} is running`);
    }
    const { registry, receiverTimeoutMs: timeout } = this.opts;
    const version = registry
      .list()
      .find(
        (v) => v.name === plan.checkpoint.name && v.state === "ready" && fingerprint(v) === plan.checkpoint.fingerprint,
      );
    const owned = plan.buckets.some((b) => b.owner >= plan.firstRank && b.owner < plan.firstRank + this.opts.gpus);
    if (owned && !version)
      throw new DaemonError("not_held", `no ready version of ${plan.checkpoint.name} with that content`);
    const lease = version ? registry.acquire(version.id) : undefined;
    // "u-N@coordinator": this daemon's own updates are numbered u-1, u-2, ... as well.
    const record = new UpdateRecord(
      `${plan.update}@${plan.coordinator}`,
      version?.id ?? `${plan.checkpoint.name} (from ${plan.coordinator})`,
    );
    this.records.set(record.id, record);
    this.trim();
    this.running = record;
    const aborted = new AbortController();
    this.aborts.set(plan.update, aborted);
    let ended = () => {};
    this.ending = new Promise<void>((r) => {
      ended = r;
    });
    const t0 = record.t0;
    let receivers: Receiver[] = [];
    const acked = new Map<Receiver, number>();
    let transfer: Transfer | undefined;
    try {
      transfer = await this.opts.transfer();
      if (transfer.slots !== plan.slots || transfer.slotBytes !== plan.slotBytes) {
        throw new Error(
          `this daemon has ${transfer.slots} slots of ${transfer.slotBytes} bytes, the coordinator ${plan.slots} of ${plan.slotBytes}: configure bucketSlots and bucketBytes alike`,
        );
      }
      record.progress.buckets = plan.buckets.length;
      record.progress.bytes = plan.buckets.reduce((sum, b) => sum + b.bytes, 0);
      const comm = await this.sharedComm(plan.comm, plan.firstRank, transfer.gpus.length);
      const triggered = this.triggerEngines();
      receivers = await this.awaitReceivers(triggered);
      for (const r of receivers) acked.set(r, 0);
      const group: Group = { comm, firstRank: plan.firstRank, ordered: true };
      await this.moveAndFinish({
        record,
        version,
        buckets: plan.buckets,
        group,
        transfer,
        receivers,
        acked,
        signal: aborted.signal,
      });
      if (aborted.signal.aborted) throw new Error(String(aborted.signal.reason));
      record.state = "succeeded";
    } catch (err) {
      this.fail(
        record,
        err,
        receivers,
        aborted.signal.aborted ? String(aborted.signal.reason) : (err as Error).message,
      );
      await this.dropShared(true);
      if (transfer && !(await transfer.drain(timeout).catch(() => false))) await this.opts.discard();
    } finally {
      lease?.release();
      this.aborts.delete(plan.update);
      this.running = undefined;
      ended();
    }
    this.finish(record, receivers, acked, t0, record.checkpoint);
    return record;
  }

  /** Aborts a participant's update (the coordinator saw a failure elsewhere). */
  abort(update: string, reason: string): boolean {
    const a = this.aborts.get(update);
    if (!a) return false;
    a.abort(reason);
    // A broadcast may be waiting for the failed rank: abort the communicator to release it.
    void this.dropShared(true);
    return true;
  }

  private readonly aborts = new Map<string, AbortController>();

  /** Tells the engines, moves every bucket, ends the update with them. */
  private async moveAndFinish(o: {
    record: UpdateRecord;
    version?: CheckpointVersion;
    buckets: Bucket[];
    group: Group;
    transfer: Transfer;
    receivers: Receiver[];
    acked: Map<Receiver, number>;
    signal: AbortSignal;
  }): Promise<void> {
    const { record, receivers } = o;
    const timeout = this.opts.receiverTimeoutMs;
    const tensors = new Set(o.buckets.flatMap((b) => b.pieces.map((p) => p.name))).size;
    for (const r of receivers) {
      r.send({ op: "begin", update: record.id, checkpoint: record.checkpoint, tensors, buckets: o.buckets.length });
    }
    await transmit({
      ctx: this.opts.ctx,
      transfer: o.transfer,
      group: o.group,
      buckets: o.buckets,
      version: o.version,
      update: record.id,
      receivers,
      acked: o.acked,
      timeoutMs: timeout,
      record,
      signal: o.signal,
    });
    const finishing = performance.now();
    for (const r of receivers) r.send({ op: "end", update: record.id });
    await Promise.all(
      receivers.map((r) => r.expect((m) => m.op === "done" && m.update === record.id, record.id, timeout, "done")),
    );
    record.timings.finishSeconds = (performance.now() - finishing) / 1000;
  }

  private fail(record: UpdateRecord, err: unknown, receivers: Receiver[], reason: string): void {
    record.state = "failed";
    record.error = {
      code: err instanceof ReceiverError ? "receiver_failed" : "update_failed",
      message: reason,
      ...(err instanceof ReceiverError ? { receiver: err.receiver.label } : {}),
    };
    for (const r of receivers) r.send({ op: "abort", update: record.id, reason });
    this.opts.log.warn({ update: record.id, error: record.error }, "update failed");
  }

  private finish(record: UpdateRecord, receivers: Receiver[], acked: Map<Receiver, number>, t0: number, what: string) {
    for (const r of receivers) r.forget(record.id);
    const seconds = (performance.now() - t0) / 1000;
    record.timings.seconds = seconds;
    record.timings.gbps = record.progress.bytesDone / seconds / 1e9;
    record.finishedAt = new Date().toISOString();
    const total = record.progress.buckets;
    record.receivers = receivers.map((r) => {
      const n = acked.get(r) ?? 0;
      const state =
        record.state === "succeeded" ? "applied" : n === 0 ? "untouched" : n === total ? "applied" : "partial";
      return { name: r.name, pid: r.pid, gpu: r.gpu, bucketsAcked: n, state };
    });
    if (record.state === "succeeded")
      this.opts.log.info({ update: record.id, checkpoint: what, ...record.timings }, "update succeeded");
  }
}
