/** A participant's flow: runs a coordinator's plan (POST /v1/peer/updates) on this daemon's GPUs and engines. */
import type { CheckpointVersion } from "../checkpoints/registry.ts";
import type { Buffers } from "./buffers.ts";
import type { DataPath } from "./data-path.ts";
import type { Part } from "./local-run.ts";
import type { PeerPlan } from "./peers.ts";
import type { Group } from "./pipeline.ts";
import type { Flow } from "./run-update.ts";

export class Participation implements Flow {
  constructor(
    private readonly path: DataPath,
    private readonly assigned: PeerPlan,
    private readonly version: CheckpointVersion | undefined,
    private readonly timeoutMs: number,
  ) {}

  async plan(buffers: Buffers): Promise<Part> {
    const p = this.assigned;
    if (buffers.slots !== p.slots || buffers.slotBytes !== p.slotBytes) {
      throw new Error(
        `this daemon has ${buffers.slots} slots of ${buffers.slotBytes} bytes, the coordinator ${p.slots} of ${p.slotBytes}: configure bucketSlots and bucketBytes alike`,
      );
    }
    return { version: this.version, buckets: p.buckets };
  }

  async join(): Promise<Group> {
    const comm = await this.path.joinShared(this.assigned.comm, this.assigned.firstRank, this.timeoutMs);
    return { comm, firstRank: this.assigned.firstRank, ordered: true };
  }

  async others(): Promise<void> {}

  async cause(): Promise<undefined> {
    return undefined;
  }

  /** The coordinator aborts too; a broadcast may be waiting for the failed rank. */
  async release(): Promise<void> {
    await this.path.dropShared(true);
  }
}
