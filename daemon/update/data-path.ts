/**
 * The data path of updates: the bucket buffers (made at start, before engines take the GPU
 * memory, kept between updates, re-made only when a failure broke them), their announcement
 * to the receivers, and the communicators: the one over the local GPUs (with the buffers) and
 * the one over every rank of a multi-daemon update (kept while its members are).
 */
import type { Logger } from "pino";
import type { Comm, Context } from "../../ffi/index.ts";
import { DaemonError } from "../errors.ts";
import { Buffers } from "./buffers.ts";
import { type Geometry, type GeometryOptions, geometry } from "./geometry.ts";
import type { PeerPlan } from "./peers.ts";
import type { Receiver } from "./receivers.ts";

export interface DataPathOptions extends Omit<GeometryOptions, "gpus" | "freeBytes"> {
  ctx: Context;
  log: Logger;
  /** The receivers to announce re-made buffers to. */
  receivers: () => Receiver[];
}

/** A communicator over the ranks of several daemons, under the key of its members. */
interface SharedComm {
  key: string;
  id: string;
  comm: Comm;
}

export class DataPath {
  private current?: Buffers;
  private opening?: Promise<Buffers>;
  private shared?: SharedComm;

  private constructor(
    private readonly o: DataPathOptions,
    readonly gpus: number,
    readonly geometry: Geometry,
  ) {}

  get ctx(): Context {
    return this.o.ctx;
  }

  /** Sizes the buckets for the GPUs as they are now and makes the buffers. */
  static async open(o: DataPathOptions): Promise<DataPath> {
    const devices = o.ctx.devices();
    const freeBytes = devices.map((d) => d.freeBytes);
    const path = new DataPath(o, devices.length, geometry({ ...o, gpus: devices.length, freeBytes }));
    path.current = await path.make();
    return path;
  }

  private make(): Promise<Buffers> {
    return Buffers.open(this.o.ctx, this.gpus, this.geometry.slots, this.geometry.slotBytes);
  }

  /** The buffers; made anew (and announced to every receiver) if a failure discarded them. */
  buffers(): Promise<Buffers> {
    if (this.current) return Promise.resolve(this.current);
    // One opening at a time: two callers must not make two sets.
    this.opening ??= this.make()
      .then((b) => {
        this.current = b;
        for (const r of this.o.receivers()) this.announce(r, b);
        return b;
      })
      .finally(() => {
        this.opening = undefined;
      });
    return this.opening;
  }

  /** What a receiver gets after hello: its GPU, and the buffers to map if there are any. */
  greet(r: Receiver): void {
    const { ctx } = this.o;
    r.send({ op: "welcome", protocol: 1, gpu: r.gpu, uuid: ctx.deviceInfo(r.gpu).uuid, backend: ctx.backend });
    if (this.current) this.announce(r, this.current);
  }

  private announce(r: Receiver, b: Buffers): void {
    r.send({ op: "buffers", generation: b.generation, slots: b.handles(r.gpu) });
  }

  /**
   * After a failed update: waits (bounded) for the buffers' last work; buffers that do not
   * settle are discarded (nothing we can free is leaked) and made anew by the next update.
   */
  async settle(b: Buffers, timeoutMs: number): Promise<void> {
    if (await b.drain(timeoutMs).catch(() => false)) return;
    if (this.current === b) this.current = undefined;
    await b.close().catch((err) => this.o.log.error({ err }, "closing broken buffers"));
  }

  /** The shared communicator kept from the last multi-daemon update, if any. */
  sharedComm(): { key: string; id: string } | undefined {
    return this.shared && { key: this.shared.key, id: this.shared.id };
  }

  /** Joins (or reuses) the communicator of a multi-daemon update; bounded by timeoutMs. */
  async joinShared(comm: PeerPlan["comm"], firstRank: number, timeoutMs: number): Promise<Comm> {
    const kept = this.shared;
    if (!comm.fresh && kept?.key === comm.key && kept.id === comm.id) return kept.comm;
    if (!comm.fresh) throw new DaemonError("comm_lost", `communicator ${comm.key} is not known here`);
    await this.dropShared(false);
    const devices = Array.from({ length: this.gpus }, (_, g) => g);
    // Bounded: a participant that never joins (it died, or refused the plan) fails the update.
    const id = Buffer.from(comm.id, "hex");
    const made = await this.o.ctx.commInit(id, comm.nranks, firstRank, devices, timeoutMs);
    this.shared = { key: comm.key, id: comm.id, comm: made };
    return made;
  }

  /** Frees the shared communicator; abort: a collective may wait for a rank that will never come. */
  async dropShared(abort: boolean): Promise<void> {
    const shared = this.shared;
    this.shared = undefined;
    if (!shared) return;
    const { ctx, log } = this.o;
    await (abort ? ctx.commAbort(shared.comm) : ctx.commDestroy(shared.comm)).catch((err) =>
      log.error({ err }, "freeing a communicator"),
    );
  }

  /** Shutdown, once no update runs: frees the communicators and the buffers. */
  async close(): Promise<void> {
    await this.dropShared(true);
    await this.opening?.catch(() => undefined);
    const b = this.current;
    this.current = undefined;
    await b?.close();
  }
}
