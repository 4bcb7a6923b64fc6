/** The record of one update, as GET /v1/updates/{id} shows it. */

import type { EngineResult } from "../engines/run.ts";
import type { ErrorCode } from "../errors.ts";
import type { BucketTiming } from "./pipeline.ts";

export type UpdateState = "running" | "succeeded" | "failed";

export interface ReceiverResult {
  name: string;
  pid: number;
  gpu: number;
  bucketsAcked: number;
  /**
   * applied: answered `done` to `end`, so it holds the whole new version; untouched: acked no
   * bucket; aborted: was told to abort after acking `bucketsAcked` buckets; partial: acked some,
   * then went away before either.
   */
  state: "applied" | "aborted" | "partial" | "untouched";
  /** The version it holds now, as far as this daemon knows (null: not known, e.g. after a failure). */
  holds: string | null;
  /** Atomic cutover: the milliseconds in which it served neither version (applying what it staged). */
  windowMs?: number;
}

/** How the engines switch: each as its buckets come (direct), or all at once after staging (atomic). */
export type Cutover = "direct" | "atomic";

export class UpdateRecord {
  state: UpdateState = "running";
  readonly createdAt = new Date().toISOString();
  finishedAt?: string;
  error?: { code: ErrorCode; message: string; receiver?: string };
  progress = { buckets: 0, bucketsDone: 0, bytes: 0, bytesDone: 0 };
  timings = { seconds: 0, gbps: 0, planSeconds: 0, stallSeconds: 0, finishSeconds: 0, verifySeconds: 0 };
  /** Every bucket is hashed on each GPU it reached and compared with the manifest (verify.ts). */
  verify = false;
  cutover: Cutover = "direct";
  /** Atomic cutover: the pace of the staging copies, GB/s (unset: as fast as they go). */
  paceGBps?: number;
  /** Atomic cutover: seconds until every receiver had staged, and of the commit after that. */
  atomic?: { stageSeconds: number; commitSeconds: number; committed: number };
  /** Per bucket, in milliseconds from the update's start (GET /v1/updates/{id}?buckets=true). */
  buckets: BucketTiming[] = [];
  readonly t0 = performance.now();
  receivers: ReceiverResult[] = [];
  /** The configured engines' calls (engines/plan.ts), in order. */
  engines: EngineResult[] = [];
  /** What the engines are told they hold once it succeeded. */
  weightVersion?: string;
  /** Tensors left out because every receiver held them already. */
  skipped = { tensors: 0, bytes: 0 };
  /** Tensors sent as deltas: how many, the deltas' bytes and the whole tensors' bytes they replaced. */
  deltas = { tensors: 0, bytes: 0, wholeBytes: 0 };
  /** Peers left out because they were not up when it started. */
  leftOut: { nodeId: string; url: string; state: string }[] = [];

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
      ...(this.weightVersion ? { weightVersion: this.weightVersion } : {}),
      state: this.state,
      createdAt: this.createdAt,
      ...(this.finishedAt ? { finishedAt: this.finishedAt } : {}),
      progress: this.progress,
      verify: this.verify,
      ...(this.cutover === "atomic" ? { cutover: this.cutover, atomic: this.atomic } : {}),
      ...(this.paceGBps ? { paceGBps: this.paceGBps } : {}),
      skipped: this.skipped,
      deltas: this.deltas,
      timings: this.timings,
      receivers: this.receivers,
      ...(this.engines.length > 0 ? { engines: this.engines } : {}),
      ...(this.leftOut.length > 0 ? { leftOut: this.leftOut } : {}),
      ...(this.error ? { error: this.error } : {}),
      ...(withBuckets ? { buckets: this.buckets } : {}),
    };
  }
}

/** What a receiver holds once an update ended: whether it finished (`done`), acked anything, was told to abort. */
export function receiverState(r: { done: boolean; acked: number; aborted: boolean }): ReceiverResult["state"] {
  if (r.done) return "applied";
  if (r.acked === 0) return "untouched";
  return r.aborted ? "aborted" : "partial";
}
