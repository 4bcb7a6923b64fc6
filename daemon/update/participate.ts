/** A participant's flow: runs a coordinator's plan (POST /v1/peer/updates) on this daemon's GPUs and engines. */
import type { CheckpointVersion } from "../checkpoints/registry.ts";
import type { Buffers } from "./buffers.ts";
import type { DataPath } from "./data-path.ts";
import type { Part } from "./local-run.ts";
import type { PeerPlan } from "./peers.ts";
import type { Group } from "./pipeline.ts";
import type { Flow } from "./run-update.ts";
import { expectedOf, versionChunks } from "./verify.ts";

export class Participation implements Flow {
  /** Atomic cutover: settles once this daemon's engines staged (or the update failed first). */
  readonly stagedHere: Promise<void>;
  private markStaged: (failure?: Error) => void = () => undefined;
  /** Atomic cutover: the coordinator's word to commit. */
  private ordered = false;
  /** The wait for the commit ended without it: the staged update is dropped. */
  private late = false;
  private onOrder: () => void = () => undefined;

  constructor(
    private readonly path: DataPath,
    private readonly assigned: PeerPlan,
    private readonly version: CheckpointVersion | undefined,
    private readonly timeoutMs: number,
    private readonly threads = 1,
    private readonly signal?: AbortSignal,
  ) {
    this.stagedHere = new Promise<void>((resolve, reject) => {
      this.markStaged = (failure) => (failure ? reject(failure) : resolve());
    });
    this.stagedHere.catch(() => undefined);
  }

  async plan(buffers: Buffers): Promise<Part> {
    const p = this.assigned;
    if (buffers.slots !== p.slots || buffers.slotBytes !== p.slotBytes) {
      throw new Error(
        `this daemon has ${buffers.slots} slots of ${buffers.slotBytes} bytes, the coordinator ${p.slots} of ${p.slotBytes}: configure bucketSlots and bucketBytes alike`,
      );
    }
    if (!p.verify || !this.version) return { version: this.version, buckets: p.buckets };
    const chunks = await versionChunks(this.path.ctx, this.version, this.threads);
    return { version: this.version, buckets: p.buckets, expected: expectedOf(chunks, new Map()) };
  }

  async join(): Promise<Group> {
    const comm = await this.path.joinShared(this.assigned.comm, this.assigned.firstRank, this.timeoutMs);
    return { comm, firstRank: this.assigned.firstRank, ordered: true };
  }

  async others(): Promise<void> {}

  /**
   * Tells the coordinator (waiting on /staged) that this daemon's engines staged, then waits
   * for its /commit: within six receiver timeouts (the coordinator waits up to four for the
   * others to stage), else the staged update is dropped here (a coordinator lost between stage and commit leaves every engine it did not tell on
   * what it held).
   */
  async staged(): Promise<void> {
    if (this.signal?.aborted) throw new Error(String(this.signal.reason ?? "aborted"));
    this.markStaged();
    const bound = this.assigned.commitWithinMs ?? 6 * this.timeoutMs;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.late = true; // a commit that comes now finds the staging dropped
        this.signal?.removeEventListener("abort", aborted);
        reject(
          new Error(
            `the coordinator did not say commit within ${bound} ms of every engine here staging: the staged update is dropped`,
          ),
        );
      }, bound);
      const done = () => {
        clearTimeout(timer);
        this.signal?.removeEventListener("abort", aborted);
        resolve();
      };
      const aborted = () => {
        clearTimeout(timer);
        reject(new Error(String(this.signal?.reason ?? "aborted")));
      };
      this.signal?.addEventListener("abort", aborted);
      if (this.ordered) done();
      else this.onOrder = done;
    });
  }

  /** The coordinator's word to commit (POST /v1/peer/updates/{id}/commit): false once it is too late. */
  order(): boolean {
    if (this.late) return false;
    if (!this.ordered) {
      this.ordered = true;
      this.onOrder();
    }
    return true;
  }

  /** The coordinator waiting on /staged hears the real cause. */
  async cause(err: unknown): Promise<undefined> {
    this.markStaged(err instanceof Error ? err : new Error(String(err)));
    return undefined;
  }

  get atomic(): boolean {
    return this.assigned.cutover === "atomic";
  }

  /** The coordinator aborts too; a broadcast may be waiting for the failed rank. */
  async release(): Promise<void> {
    this.markStaged(new Error("the update failed here before its engines staged it"));
    await this.path.dropShared(true);
  }
}
