/**
 * One update from start to end, the same steps for every flow: plan what moves, join whom it
 * moves with, then (engines are asked only once everything that can fail before them has
 * succeeded) move it through this daemon, and hear the other participants out. What differs
 * between a coordinator and a participant is its Flow.
 */
import type { Buffers } from "./buffers.ts";
import type { DataPath } from "./data-path.ts";
import { type LocalDeps, LocalRun, type Part } from "./local-run.ts";
import type { Group } from "./pipeline.ts";
import type { Receiver } from "./receivers.ts";
import type { UpdateRecord } from "./record.ts";

export interface Flow {
  /** What moves; throws (before anyone joins a communicator) when it cannot. */
  plan(buffers: Buffers): Promise<Part>;
  /**
   * Once the receivers are known: what moves to them, leaving out what they all hold already
   * (skip.ts). A flow whose plan other daemons follow keeps it whole.
   */
  narrow?(part: Part, receivers: Receiver[]): Part;
  /** The ranks it moves to: joins whatever communicator that takes. */
  join(buffers: Buffers): Promise<Group>;
  /** After this daemon's part: waits for the other participants' ends. */
  others(): Promise<void>;
  /**
   * Atomic cutover, once this daemon's receivers staged: resolves when the update may commit
   * (a coordinator: every participant staged; a participant: the coordinator said so, within
   * its bound); throws otherwise.
   */
  staged?(): Promise<void>;
  /** Atomic cutover: tells the participants to commit (a coordinator), as this daemon commits. */
  commit?(): Promise<void>;
  /** After a failure, before the engines are told: may name a better cause than `err`. */
  cause(err: unknown): Promise<string | undefined>;
  /** After the engines were told of a failure: releases what join made. */
  release(): Promise<void>;
}

/** Runs an update; never rejects: the record says how it ended. `abort` stops it from outside. */
export async function runUpdate(
  deps: LocalDeps & { path: DataPath },
  record: UpdateRecord,
  flow: Flow,
  abort: AbortController,
): Promise<void> {
  const run = new LocalRun(deps, record);
  let buffers: Buffers | undefined;
  try {
    buffers = await deps.path.buffers();
    const planned = await flow.plan(buffers);
    const group = await flow.join(buffers);
    await run.engage(abort.signal);
    const part = flow.narrow?.(planned, run.engaged) ?? planned;
    record.progress.buckets = part.buckets.length;
    record.progress.bytes = part.buckets.reduce((sum, b) => sum + b.bytes, 0);
    if (part.skipped) record.skipped = part.skipped;
    if (part.deltas) record.deltas = part.deltas;
    record.timings.planSeconds = (performance.now() - record.t0) / 1000;
    run.watchEngines(abort);
    await run.move(part, group, buffers, abort.signal);
    if (record.cutover === "atomic") {
      // Every receiver of every daemon staged, and nothing failed: now all of them switch.
      await flow.staged?.();
      if (abort.signal.aborted) throw new Error(String(abort.signal.reason));
      await Promise.all([flow.commit?.(), run.commit()]);
    }
    await flow.others();
    if (abort.signal.aborted) throw new Error(String(abort.signal.reason));
    await run.checkEngines();
    await run.completeEngines();
    record.state = "succeeded";
  } catch (err) {
    if (!abort.signal.aborted) abort.abort((err as Error).message);
    const cause = await flow.cause(err);
    run.fail(err, cause ?? String(abort.signal.reason));
    await flow.release();
    if (buffers) await deps.path.settle(buffers, deps.receiverTimeoutMs);
    await run.recoverEngines();
  }
  run.finish();
}
