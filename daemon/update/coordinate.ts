/**
 * The coordinator's flow (the daemon that got POST /v1/updates): asks each configured peer
 * what it has, plans over every GPU of every participant, sends each peer the plan and the
 * communicator id, and collects their ends. Every participant moves the same buckets in the
 * same order; one that fails makes every other one abort its communicator.
 */
import type { Context } from "../../ffi/index.ts";
import type { CheckpointVersion } from "../checkpoints/registry.ts";
import { chooseDeltas, type DeltaItems, deltaItems } from "../deltas/choose.ts";
import type { VersionDelta } from "../deltas/derive.ts";
import { DaemonError } from "../errors.ts";
import type { Buffers } from "./buffers.ts";
import type { DataPath } from "./data-path.ts";
import { fingerprint } from "./fingerprint.ts";
import type { Part } from "./local-run.ts";
import { type PeerPlan, type PeerSigner, peerAbort, peerCommit, peerInfo, peerRun, peerStaged } from "./peers.ts";
import type { Group } from "./pipeline.ts";
import { type Bucket, type PlanOptions, smallerBuckets } from "./plan.ts";
import { type PeersPlan, planWithPeers } from "./plan-peers.ts";
import { type Receiver, ReceiverError } from "./receivers.ts";
import type { UpdateRecord } from "./record.ts";
import type { Flow } from "./run-update.ts";
import { heldByAll } from "./skip.ts";
import { expectedOf, versionChunks } from "./verify.ts";

export interface CoordinationDeps {
  ctx: Context;
  path: DataPath;
  /** Other daemons that take part (base URLs). */
  peers: string[];
  nodeId: string;
  receiverTimeoutMs: number;
  /** Signs each request to a peer. */
  sign: PeerSigner;
  /**
   * Plans the buckets of the version's tensors but those in `skip`, with `deltas` in place of
   * the tensors they stand for (the same plan is made once).
   */
  plan: (version: CheckpointVersion, opts: PlanOptions, skip?: Set<string>, deltas?: DeltaItems) => Bucket[];
  /** The deltas of versions whose base is the one updated to (they take engines back to it). */
  later: VersionDelta[];
  /** Threads for hashing on the host. */
  threads: number;
}

export class Coordination implements Flow {
  private peersPlan?: PeersPlan;
  /** The version's chunk hashes, when the update verifies. */
  private chunks?: Map<string, BigUint64Array>;
  private planOptions?: PlanOptions;
  private buckets: Bucket[] = [];
  private readonly ends: Promise<void>[] = [];
  private readonly failures: { url: string; message: string; code?: string }[] = [];
  /** Atomic cutover: when this daemon's engines had staged. */
  private stagedAt = 0;

  constructor(
    private readonly deps: CoordinationDeps,
    private readonly record: UpdateRecord,
    private readonly version: CheckpointVersion,
    private readonly abort: AbortController,
  ) {}

  async plan(buffers: Buffers): Promise<Part> {
    const { peers, receiverTimeoutMs: timeout } = this.deps;
    // What verification compares with, before anyone is asked to take part (the first time, its
    // chunk hashes are computed from pinned memory: about a second for 16 GB on 16 threads).
    if (this.record.verify) this.chunks = await versionChunks(this.deps.ctx, this.version, this.deps.threads);
    const { slots, slotBytes } = buffers;
    const fp = fingerprint(this.version);
    const infos = await Promise.all(peers.map((url) => peerInfo(this.deps.sign, url, this.version.name, fp, timeout)));
    const asked = peers.map((url, i) => ({ url, info: infos[i] as (typeof infos)[number] }));
    const unable = this.record.cutover === "atomic" ? asked.find((p) => p.info.atomic !== true) : undefined;
    if (unable) {
      throw new DaemonError(
        "invalid_request",
        `peer ${unable.url} cannot take part in an atomic cutover (an older daemon, or engines that do not stage): update without it, or directly`,
      );
    }
    const shared = this.deps.path.sharedComm();
    const plan = planWithPeers({ gpus: buffers.gpus.length, slots, slotBytes, peers: asked, shared });
    this.peersPlan = plan;
    this.planOptions = { bucketBytes: slotBytes, owners: plan.owners, slots };
    // Alone, the buckets are planned once the receivers are known (narrow), not twice.
    this.buckets = plan.participants.length > 0 ? this.deps.plan(this.version, this.planOptions) : [];
    const expected = this.chunks && expectedOf(this.chunks, new Map());
    return { version: this.version, buckets: this.buckets, ...(expected ? { expected } : {}) };
  }

  /**
   * Leaves out what every receiver holds already, and sends deltas of what they can patch,
   * when this daemon's receivers are all there is: peers follow the plan they were sent, whole.
   */
  narrow(part: Part, receivers: Receiver[]): Part {
    if ((this.peersPlan?.participants.length ?? 0) > 0) return part;
    const { version } = this;
    const skip = heldByAll(version.tensors, receivers);
    const chosen = chooseDeltas(version.tensors, receivers, version.delta, this.deps.later, skip);
    const bytes = version.tensors.reduce((n, t) => n + (skip.has(t.name) ? t.bytes : 0), 0);
    const items = deltaItems(version, chosen);
    const moved = version.tensors.reduce((n, t) => n + (skip.has(t.name) || chosen.has(t.name) ? 0 : t.bytes), 0);
    const sent = moved + items.items.reduce((n, t) => n + t.bytes, 0);
    const opts = smallerBuckets(this.planOptions as PlanOptions, sent, this.record.paceGBps);
    this.buckets = this.deps.plan(version, opts, skip, items);
    const deltaBytes = items.items.reduce((n, t) => n + t.bytes, 0);
    return {
      version,
      buckets: this.buckets,
      skipped: { tensors: skip.size, bytes },
      deltas: { tensors: chosen.size, bytes: deltaBytes, wholeBytes: items.wholeBytes },
      sources: items.sources,
      ...(this.chunks ? { expected: expectedOf(this.chunks, chosen) } : {}),
    };
  }

  async join(buffers: Buffers): Promise<Group> {
    const plan = this.peersPlan as PeersPlan;
    if (!plan.comm) return { comm: buffers.comm, firstRank: 0, ordered: false };
    const { key, fresh } = plan.comm;
    const id = fresh
      ? Buffer.from(this.deps.ctx.commIdNew()).toString("hex")
      : (this.deps.path.sharedComm()?.id as string);
    const comm = { key, id, fresh, nranks: plan.nranks };
    for (const p of plan.participants) this.send(p.url, p.info.nodeId, this.peerPlan(buffers, comm, p.firstRank));
    const joined = await this.deps.path.joinShared(comm, 0, this.deps.receiverTimeoutMs);
    return { comm: joined, firstRank: 0, ordered: true };
  }

  private peerPlan(buffers: Buffers, comm: PeerPlan["comm"], firstRank: number): PeerPlan {
    return {
      update: this.record.id,
      coordinator: this.deps.nodeId,
      checkpoint: { name: this.version.name, fingerprint: fingerprint(this.version) },
      weightVersion: this.record.weightVersion,
      comm,
      firstRank,
      slots: buffers.slots,
      slotBytes: buffers.slotBytes,
      buckets: this.buckets,
      ...(this.record.cutover === "atomic" ? { cutover: "atomic" as const, commitWithinMs: this.commitWithinMs } : {}),
      ...(this.record.verify ? { verify: true } : {}),
    };
  }

  /** Not cancelled when this daemon fails: the peer's answer may name the cause. */
  private send(url: string, nodeId: string, plan: PeerPlan): void {
    const end = peerRun(this.deps.sign, url, nodeId, plan).then((r) => {
      if (r.ok) return;
      this.failures.push({ url, message: r.message, code: r.code });
      if (!this.abort.signal.aborted) this.abort.abort(`peer ${url} failed: ${r.message}`);
    });
    this.ends.push(end);
  }

  async others(): Promise<void> {
    await Promise.all(this.ends);
  }

  /** The participants' name for this update: its id and this daemon's node id (no other coordinator's). */
  private get remoteId(): string {
    return `${this.record.id}@${this.deps.nodeId}`;
  }

  /** Atomic cutover: waits until every participant's engines staged (bounded). */
  async staged(): Promise<void> {
    const { sign, receiverTimeoutMs: timeout } = this.deps;
    const participants = this.peersPlan?.participants ?? [];
    this.stagedAt = performance.now();
    await Promise.all(participants.map((p) => peerStaged(sign, p.url, p.info.nodeId, this.remoteId, 4 * timeout)));
  }

  /**
   * Atomic cutover: tells every participant to commit, again and again while one is not
   * reached, until the time it waits for the word (commitWithinMs) is over. One that is never
   * reached drops its staging: its own record (this update's end) says so.
   */
  async commit(): Promise<void> {
    const { sign, receiverTimeoutMs: timeout } = this.deps;
    const until = this.stagedAt + this.commitWithinMs;
    const tell = async (p: { url: string; info: { nodeId: string } }) => {
      while ((await peerCommit(sign, p.url, p.info.nodeId, this.remoteId, timeout)) === "unreached") {
        if (performance.now() > until) return;
        await new Promise((r) => setTimeout(r, 100));
      }
    };
    await Promise.all((this.peersPlan?.participants ?? []).map(tell));
  }

  /** How long a participant waits for the commit after staging (it is told so in the plan). */
  private get commitWithinMs(): number {
    return 6 * this.deps.receiverTimeoutMs;
  }

  /**
   * A collective may be waiting for a rank that will never come: abort the communicator (made
   * anew next time), tell the peers, and hear them out: a peer's failing engine explains the
   * transport error this daemon saw when that peer dropped out.
   */
  async cause(err: unknown): Promise<string | undefined> {
    const participants = this.peersPlan?.participants ?? [];
    if (participants.length === 0) return undefined;
    const { path, receiverTimeoutMs: timeout } = this.deps;
    const reason = (err as Error).message;
    await path.dropShared(true);
    const abort = (p: (typeof participants)[number]) =>
      peerAbort(this.deps.sign, p.url, p.info.nodeId, this.record.id, reason, timeout);
    await Promise.all(participants.map(abort));
    await Promise.race([Promise.all(this.ends), new Promise((r) => setTimeout(r, timeout))]);
    if (err instanceof ReceiverError) return undefined;
    const cause = this.failures.find((f) => f.code === "receiver_failed");
    return cause && `peer ${cause.url} failed: ${cause.message}`;
  }

  /** Done in `cause`: the communicator had to go before the peers could be heard out. */
  async release(): Promise<void> {}
}
