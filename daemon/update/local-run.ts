/**
 * This daemon's part of an update, the same whether it coordinates or takes part: asking its
 * engines, moving the buckets through its GPUs to their receivers, ending the update with them,
 * and recording who holds what.
 */
import type { Logger } from "pino";
import type { Context } from "../../ffi/index.ts";
import type { CheckpointVersion } from "../checkpoints/registry.ts";
import type { EngineConfig } from "../config/index.ts";
import type { Buffers } from "./buffers.ts";
import { awaitReceivers, type Triggered, triggerEngines } from "./engines.ts";
import { type Group, transmit } from "./pipeline.ts";
import type { Bucket } from "./plan.ts";
import { type Receiver, ReceiverError, type ReceiverHub } from "./receivers.ts";
import { receiverState, type UpdateRecord } from "./record.ts";

export interface LocalDeps {
  ctx: Context;
  log: Logger;
  hub: ReceiverHub;
  /** Engines to trigger and wait for; none: whichever receivers are connected take part. */
  engines: EngineConfig[];
  socketDir: string;
  receiverTimeoutMs: number;
}

/** What moves: the buckets, and the registered version on daemons whose host holds it. */
export interface Part {
  version?: CheckpointVersion;
  buckets: Bucket[];
}

export class LocalRun {
  private triggered: Triggered[] = [];
  private receivers: Receiver[] = [];
  private readonly acked = new Map<Receiver, number>();
  /** Receivers that answered `done` to `end`, and those told to abort before that. */
  private readonly done = new Set<Receiver>();
  private readonly aborted = new Set<Receiver>();

  constructor(
    private readonly deps: LocalDeps,
    readonly record: UpdateRecord,
  ) {}

  /** Asks the configured engines to receive, and waits for a receiver on each of their GPUs. */
  async engage(signal: AbortSignal): Promise<void> {
    const { hub, engines, socketDir, receiverTimeoutMs: timeout } = this.deps;
    this.triggered = triggerEngines(engines, socketDir, timeout);
    this.receivers = await awaitReceivers(hub, engines, this.triggered, timeout, signal);
    for (const r of this.receivers) this.acked.set(r, 0);
  }

  /** Tells the receivers, moves every bucket, ends the update with them. */
  async move(part: Part, group: Group, buffers: Buffers, signal: AbortSignal): Promise<void> {
    const { record, receivers } = this;
    const timeout = this.deps.receiverTimeoutMs;
    const tensors = new Set(part.buckets.flatMap((b) => b.pieces.map((p) => p.name))).size;
    for (const r of receivers) {
      r.send({ op: "begin", update: record.id, checkpoint: record.checkpoint, tensors, buckets: part.buckets.length });
    }
    await transmit({
      ctx: this.deps.ctx,
      buffers,
      group,
      buckets: part.buckets,
      version: part.version,
      update: record.id,
      receivers,
      acked: this.acked,
      timeoutMs: timeout,
      record,
      signal,
    });
    const finishing = performance.now();
    for (const r of receivers) r.send({ op: "end", update: record.id });
    await Promise.all(
      receivers.map(async (r) => {
        await r.expect((m) => m.op === "done" && m.update === record.id, record.id, timeout, "done", signal);
        this.done.add(r);
      }),
    );
    record.timings.finishSeconds = (performance.now() - finishing) / 1000;
  }

  /** Throws naming the first engine whose update call answered with a failure. */
  async checkEngines(): Promise<void> {
    for (const t of this.triggered) {
      const err = await t.result;
      if (err) throw new Error(`engine ${t.engine.name}: ${err}`);
    }
  }

  /** Records the failure and tells every receiver to drop the update. */
  fail(err: unknown, reason: string): void {
    const { record } = this;
    // The state turns "failed" in finish(), once the daemon is idle again: a client that sees
    // it may start the next update at once.
    record.error = {
      code: err instanceof ReceiverError ? "receiver_failed" : "update_failed",
      message: reason,
      ...(err instanceof ReceiverError ? { receiver: err.receiver.label } : {}),
    };
    for (const r of this.receivers) {
      if (r.closed) continue;
      r.send({ op: "abort", update: record.id, reason });
      if (!this.done.has(r)) this.aborted.add(r);
    }
    this.deps.log.warn({ update: record.id, error: record.error }, "update failed");
  }

  /** Closes the record: timings, and what each receiver now holds. */
  finish(): void {
    const { record } = this;
    for (const r of this.receivers) r.forget(record.id);
    const seconds = (performance.now() - record.t0) / 1000;
    record.timings.seconds = seconds;
    record.timings.gbps = record.progress.bytesDone / seconds / 1e9;
    record.finishedAt = new Date().toISOString();
    if (record.error) record.state = "failed";
    const succeeded = record.state === "succeeded";
    record.receivers = this.receivers.map((r) => {
      const n = this.acked.get(r) ?? 0;
      const state = receiverState({ done: this.done.has(r), acked: n, aborted: this.aborted.has(r) });
      return { name: r.name, pid: r.pid, gpu: r.gpu, bucketsAcked: n, state };
    });
    if (succeeded)
      this.deps.log.info({ update: record.id, checkpoint: record.checkpoint, ...record.timings }, "update succeeded");
  }
}
