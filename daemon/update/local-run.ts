/**
 * This daemon's part of an update, the same whether it coordinates or takes part: driving its
 * engines' calls (pause, receive, finish, resume: engines/plan.ts), moving the buckets through
 * its GPUs to their receivers, ending the update with them, and recording who holds what.
 */
import type { Logger } from "pino";
import type { Context, HostMemory } from "../../ffi/index.ts";
import type { CheckpointVersion } from "../checkpoints/registry.ts";
import type { EngineConfig } from "../config/index.ts";
import { planEngine } from "../engines/plan.ts";
import { EngineRun } from "../engines/run.ts";
import { DaemonError } from "../errors.ts";
import type { Buffers } from "./buffers.ts";
import { awaitReceivers, type Triggered } from "./engines.ts";
import { type Group, transmit } from "./pipeline.ts";
import type { Bucket } from "./plan.ts";
import { type Holding, type Receiver, ReceiverError, type ReceiverHub } from "./receivers.ts";
import { type ReceiverResult, receiverState, type UpdateRecord } from "./record.ts";
import { heldAs } from "./skip.ts";
import type { Expected } from "./verify.ts";

export interface LocalDeps {
  ctx: Context;
  log: Logger;
  hub: ReceiverHub;
  /** Engines to trigger and wait for; none: whichever receivers are connected take part. */
  engines: EngineConfig[];
  socketDir: string;
  receiverTimeoutMs: number;
  /** Threads for hashing on the host backend (verification). */
  threads?: number;
}

/** What moves: the buckets, and the registered version on daemons whose host holds it. */
export interface Part {
  version?: CheckpointVersion;
  buckets: Bucket[];
  /** Tensors left out because every receiver holds them already (skip.ts). */
  skipped?: { tensors: number; bytes: number };
  /** Tensors sent as deltas (deltas/choose.ts): how many, their bytes, the bytes they replace. */
  deltas?: { tensors: number; bytes: number; wholeBytes: number };
  /** The deltas' memory, which pieces past the version's files copy from. */
  sources?: readonly HostMemory[];
  /** What each piece should hash to on the GPUs, when the update verifies (verify.ts). */
  expected?: Expected;
}

export class LocalRun {
  private engines: EngineRun[] = [];
  private triggered: Triggered[] = [];
  private receivers: Receiver[] = [];
  private moved?: Part;
  private readonly acked = new Map<Receiver, number>();
  /** Receivers that answered `done` to `end` (atomic: `committed` to `commit`), and those told to abort before that. */
  private readonly done = new Set<Receiver>();
  private readonly aborted = new Set<Receiver>();
  /** Atomic cutover: receivers told to commit, and how long each served neither version. */
  private readonly told = new Set<Receiver>();
  private readonly windows = new Map<Receiver, number>();

  constructor(
    private readonly deps: LocalDeps,
    readonly record: UpdateRecord,
  ) {}

  /**
   * Readies the configured engines (pause, open the update), asks them to receive, and waits
   * for a receiver on each of their GPUs.
   */
  async engage(signal: AbortSignal): Promise<void> {
    const { hub, engines, socketDir, receiverTimeoutMs: timeout } = this.deps;
    const { record } = this;
    const facts = {
      update: record.id,
      version: record.weightVersion ?? record.checkpoint,
      socketDir,
      receiverTimeoutMs: timeout,
    };
    this.engines = engines.map(
      (e) => new EngineRun(e, planEngine(e, facts), { callMs: timeout * 4, pauseMs: e.pauseTimeoutMs ?? PAUSE_MS }),
    );
    record.engines = this.engines.map((run) => run.result);
    await firstFailure(this.engines.map((run) => run.before()));
    this.triggered = this.engines.map((run) => ({ engine: run.engine, result: run.receive() }));
    this.receivers = await awaitReceivers(hub, engines, this.triggered, timeout, signal);
    for (const r of this.receivers) this.acked.set(r, 0);
  }

  /** The receivers the update goes to, once engaged. */
  get engaged(): Receiver[] {
    return this.receivers;
  }

  /**
   * Tells the receivers, moves every bucket, ends the update with them. Atomic cutover: they
   * stage it (and keep what they hold) and answer `staged`; commit() switches them.
   */
  async move(part: Part, group: Group, buffers: Buffers, signal: AbortSignal): Promise<void> {
    const { record, receivers } = this;
    const timeout = this.deps.receiverTimeoutMs;
    const tensors = new Set(part.buckets.flatMap((b) => b.pieces.map((p) => p.name))).size;
    this.moved = part;
    const skipped = part.skipped?.tensors ?? 0;
    const atomic = record.cutover === "atomic";
    if (atomic) checkStaging(receivers, part);
    for (const r of receivers) {
      if (!atomic) r.holds = undefined; // until it has applied all of this update
      r.send({
        op: "begin",
        update: record.id,
        checkpoint: record.checkpoint,
        tensors,
        buckets: part.buckets.length,
        skipped,
        ...(atomic ? { stage: true } : {}),
      });
    }
    await transmit({
      ctx: this.deps.ctx,
      buffers,
      group,
      buckets: part.buckets,
      version: part.version,
      sources: part.sources,
      ...(part.expected ? { verify: { expected: part.expected, threads: this.deps.threads ?? 1 } } : {}),
      paceBytesPerSecond: atomic ? (record.paceGBps ?? 0) * 1e9 : 0,
      update: record.id,
      receivers,
      acked: this.acked,
      timeoutMs: timeout,
      record,
      signal,
    });
    const finishing = performance.now();
    for (const r of receivers) r.send({ op: "end", update: record.id });
    const answer = atomic ? "staged" : "done";
    await Promise.all(
      receivers.map(async (r) => {
        await r.expect((m) => m.op === answer && m.update === record.id, record.id, timeout, answer, signal);
        if (!atomic) this.done.add(r);
      }),
    );
    record.timings.finishSeconds = (performance.now() - finishing) / 1000;
    if (atomic)
      record.atomic = { stageSeconds: (performance.now() - record.t0) / 1000, commitSeconds: 0, committed: 0 };
  }

  /**
   * Atomic cutover, once every receiver staged: tells them all to commit and waits for each to
   * answer `committed` with its window. Throws, once every answer is in, naming the receivers
   * that failed and what each receiver holds then.
   */
  async commit(): Promise<void> {
    const { record, receivers } = this;
    const started = performance.now();
    for (const r of receivers) {
      r.send({ op: "commit", update: record.id });
      this.told.add(r);
    }
    const ends = await Promise.allSettled(
      receivers.map(async (r) => {
        const m = await r.expect(
          (x) => x.op === "committed" && x.update === record.id,
          record.id,
          this.deps.receiverTimeoutMs,
          "committed",
        );
        this.done.add(r);
        if (typeof m.windowMs === "number" && Number.isFinite(m.windowMs)) this.windows.set(r, m.windowMs);
      }),
    );
    const atomic = record.atomic as NonNullable<UpdateRecord["atomic"]>;
    atomic.commitSeconds = (performance.now() - started) / 1000;
    atomic.committed = this.done.size;
    const failed = ends.flatMap((e) => (e.status === "rejected" ? [(e.reason as Error).message] : []));
    if (failed.length === 0) return;
    const who = receivers.map((r) => `${r.label} ${this.done.has(r) ? "committed" : "did not"}`).join(", ");
    throw new Error(
      `the commit failed after ${this.done.size} of ${receivers.length} receivers committed (${who}): ${failed.join("; ")}`,
    );
  }

  /** Throws naming the first engine whose update call answered with a failure. */
  async checkEngines(): Promise<void> {
    const limit = this.deps.receiverTimeoutMs * 4;
    for (const t of this.triggered) {
      const late = `its update call did not answer within ${limit} ms after its receivers were done`;
      const err = await Promise.race([t.result, sleep(limit).then(() => late)]);
      if (err) throw new Error(`engine ${t.engine.name}: ${err}`);
    }
  }

  /** Aborts the update as soon as an engine's receive call fails, naming the engine. */
  watchEngines(abort: AbortController): void {
    for (const t of this.triggered) {
      void t.result.then((err) => {
        if (err && !abort.signal.aborted) abort.abort(`engine ${t.engine.name}: ${err}`);
      });
    }
  }

  /** The engines' calls after a successful update (finish with the version, reset caches, resume). */
  async completeEngines(): Promise<void> {
    await firstFailure(this.engines.map((run) => run.after()));
  }

  /**
   * After a failure: once the engines' receive calls have answered (bounded by the receiver
   * timeout), closes what they opened and resumes them on whatever they hold.
   */
  async recoverEngines(): Promise<void> {
    const answered = Promise.all(this.triggered.map((t) => t.result));
    await Promise.race([answered, sleep(this.deps.receiverTimeoutMs * 4)]);
    this.countLateAcks();
    const version = this.record.weightVersion ?? this.record.checkpoint;
    await Promise.all(this.engines.map((run) => run.recover(this.took(run.engine), version)));
  }

  /** What an engine's receivers took of the update: all (every one `done`), none (no ack), or part. */
  private took(engine: EngineConfig): "none" | "part" | "all" {
    const mine = this.receivers.filter((r) => engine.gpus.includes(r.gpu));
    if (mine.length > 0 && mine.every((r) => this.done.has(r))) return "all";
    return mine.some((r) => (this.acked.get(r) ?? 0) > 0) ? "part" : "none";
  }

  /** Records the failure and tells every receiver to drop the update. */
  fail(err: unknown, reason: string): void {
    const { record } = this;
    // The state turns "failed" in finish(), once the daemon is idle again: a client that sees
    // it may start the next update at once.
    record.error = {
      // A request that turned out not to be possible once the receivers were known (atomic
      // cutover without room to stage) is the caller's error; everything else is the update's.
      code: err instanceof ReceiverError ? "receiver_failed" : refused(err) ? "invalid_request" : "update_failed",
      message: reason,
      ...(err instanceof ReceiverError ? { receiver: err.receiver.label } : {}),
    };
    for (const r of this.receivers) {
      if (r.closed || this.done.has(r)) continue;
      r.send({ op: "abort", update: record.id, reason });
      this.aborted.add(r);
    }
    // Engines asked to receive whose receivers the update had not taken in yet (it failed
    // before they all connected) wait for it: the abort ends their wait.
    const gpus = new Set(this.deps.engines.filter((e) => e.kind !== "receiver").flatMap((e) => e.gpus));
    for (const r of this.deps.hub.connected()) {
      if (!this.receivers.includes(r) && gpus.has(r.gpu)) r.send({ op: "abort", update: record.id, reason });
    }
    this.deps.log.warn({ update: record.id, error: record.error }, "update failed");
  }

  /** Closes the record: timings, and what each receiver now holds. */
  /** Acks that came but no wait consumed (the update failed first) count too: those buckets were applied. */
  private countLateAcks(): void {
    for (const r of this.receivers) this.acked.set(r, (this.acked.get(r) ?? 0) + r.takeAcks(this.record.id));
  }

  finish(): void {
    const { record } = this;
    this.countLateAcks();
    for (const r of this.receivers) r.forget(record.id);
    const seconds = (performance.now() - record.t0) / 1000;
    record.timings.seconds = seconds;
    record.timings.gbps = record.progress.bytesDone / seconds / 1e9;
    record.finishedAt = new Date().toISOString();
    if (record.error) record.state = "failed";
    const succeeded = record.state === "succeeded";
    const version = this.moved?.version;
    const moved = version && { version: version.id, hashes: new Map(version.tensors.map((t) => [t.name, heldAs(t)])) };
    record.receivers = this.receivers.map((r) => this.result(r, moved, succeeded));
    if (record.error && this.engines.some((run) => run.driven)) record.error.message += `; ${this.holdings()}`;
    if (succeeded)
      this.deps.log.info({ update: record.id, checkpoint: record.checkpoint, ...record.timings }, "update succeeded");
  }

  /** What a receiver took of the update, as the record says it; sets what it holds now. */
  private result(r: Receiver, moved: Holding | undefined, succeeded: boolean): ReceiverResult {
    const acked = this.acked.get(r) ?? 0;
    const done = this.done.has(r);
    let state: ReceiverResult["state"];
    if (this.record.cutover === "atomic") {
      // Staged, never applied: it serves what it held. Told to commit but not done: unknown.
      state = done ? "applied" : this.told.has(r) ? "partial" : "untouched";
      if (state === "applied") r.holds = moved;
      if (state === "partial") r.holds = undefined;
    } else {
      state = receiverState({ done, acked, aborted: this.aborted.has(r) });
      if (succeeded && state === "applied") r.holds = moved;
    }
    const window = this.windows.get(r);
    const { name, pid, gpu } = r;
    return {
      name,
      pid,
      gpu,
      bucketsAcked: acked,
      state,
      holds: r.holds?.version ?? null,
      ...(window !== undefined ? { windowMs: window } : {}),
    };
  }

  /**
   * After a failure, what each engine took of the update (by its receivers' acks: every
   * bucket and `done`, none, or part) and whether it was resumed.
   */
  private holdings(): string {
    const buckets = this.record.progress.buckets;
    return this.engines
      .filter((run) => run.driven)
      .map((run) => {
        const took = this.took(run.engine);
        const acked = this.receivers.filter((r) => run.engine.gpus.includes(r.gpu)).map((r) => this.acked.get(r) ?? 0);
        const what =
          took === "part"
            ? `part of the update (${span(acked)} of ${buckets} buckets acked per rank)`
            : `${took} of the update`;
        const paused = run.describe();
        return `engine ${run.engine.name} took ${what}${paused ? `, ${paused}` : ""}`;
      })
      .join("; ");
  }
}

const refused = (err: unknown) => err instanceof DaemonError && err.code === "invalid_request";

/**
 * Atomic cutover stages what each receiver takes in its GPU's memory: refused (before anything
 * moves) where a receiver declared less room than the update's bytes.
 */
function checkStaging(receivers: Receiver[], part: Part): void {
  const need = part.buckets.reduce((n, b) => n + b.pieces.reduce((m, p) => m + p.range[1] - p.range[0], 0), 0);
  const short = receivers.filter((r) => r.stageBytes < need);
  if (short.length === 0) return;
  const who = short.map((r) => `${r.label} declared ${r.stageBytes}`).join(", ");
  throw new DaemonError(
    "invalid_request",
    `atomic cutover stages this update's ${need} bytes on every GPU before any engine switches, but ${who} bytes of staging memory (hello stageBytes): update with deltas, or give it room`,
  );
}

/** "3", or "2 to 5": the least and most of some counts. */
function span(counts: number[]): string {
  const [lo, hi] = [Math.min(...counts), Math.max(...counts)];
  return lo === hi ? String(lo) : `${lo} to ${hi}`;
}

/** How long a pause may take unless the engine's pauseTimeoutMs says otherwise (vLLM's `wait` drains requests). */
const PAUSE_MS = 600_000;

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms).unref());

/** Waits for every promise; then rejects with the first rejection, if any. */
async function firstFailure(all: Promise<void>[]): Promise<void> {
  const failed = (await Promise.allSettled(all)).find((r) => r.status === "rejected");
  if (failed) throw (failed as PromiseRejectedResult).reason;
}
