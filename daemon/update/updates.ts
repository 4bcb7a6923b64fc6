/**
 * Broadcast updates: push a registered version into every engine of this host. Buckets move
 * through three overlapping stages (host-to-device copy by the owning GPU, broadcast to every
 * GPU, engines copying out of the slot and acking), ordered by events on streams; a slot is
 * reused only after every engine on every GPU acked the bucket it held.
 */
import type { Logger } from "pino";
import type { Context } from "../../ffi/index.ts";
import type { CheckpointVersion, Registry } from "../checkpoints/registry.ts";
import type { EngineConfig } from "../config/index.ts";
import { ApiError } from "../http/errors.ts";
import { type Bucket, planBuckets } from "./plan.ts";
import { type Receiver, ReceiverError, type ReceiverHub } from "./receivers.ts";
import { at, type Transfer } from "./transfer.ts";

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
  error?: { code: string; message: string; receiver?: string };
  progress = { buckets: 0, bucketsDone: 0, bytes: 0, bytesDone: 0 };
  timings = { seconds: 0, gbps: 0, planSeconds: 0, stallSeconds: 0, finishSeconds: 0 };
  receivers: ReceiverResult[] = [];

  constructor(
    readonly id: string,
    readonly checkpoint: string,
  ) {}

  toJSON() {
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
    if (!r) throw new ApiError(404, "not_found", `no update ${id}`);
    return r;
  }

  list(): UpdateRecord[] {
    return [...this.records.values()];
  }

  /** Checks and starts an update; returns its record and a promise of its end. */
  start(ref: string): { record: UpdateRecord; done: Promise<void> } {
    if (this.running) {
      throw new ApiError(409, "update_running", `update ${this.running.id} of ${this.running.checkpoint} is running`, {
        running: this.running.id,
      });
    }
    const lease = this.opts.registry.acquire(ref);
    if (this.opts.engines.length === 0 && this.opts.hub.connected().length === 0) {
      lease.release();
      throw new ApiError(409, "no_receivers", "no engine receiver is connected to this daemon");
    }
    const record = new UpdateRecord(`u-${++this.seq}`, lease.version.id);
    this.records.set(record.id, record);
    this.trim();
    this.running = record;
    const done = this.run(record, lease.version).finally(() => {
      lease.release();
      this.running = undefined;
    });
    return { record, done };
  }

  private trim(): void {
    const keep = this.opts.history ?? 100;
    for (const id of [...this.records.keys()].slice(0, Math.max(0, this.records.size - keep))) this.records.delete(id);
  }

  /**
   * Asks the configured engines to receive an update (vLLM: its /collective_rpc endpoint
   * calling the ckptd worker extension; http: the configured request). The calls return
   * when the engines are done; their failures are reported by name.
   */
  private triggerEngines(): { engine: EngineConfig; result: Promise<string | undefined> }[] {
    const timeout = this.opts.receiverTimeoutMs;
    return this.opts.engines
      .filter((e) => e.kind !== "receiver")
      .map((engine) => {
        const url =
          engine.kind === "vllm" ? `${engine.url?.replace(/\/$/, "")}/collective_rpc` : (engine.url as string);
        const body =
          engine.kind === "vllm"
            ? { method: "ckptd_update", args: [this.opts.socketDir], kwargs: {}, timeout: timeout / 1000 }
            : (engine.body ?? {});
        const result = fetch(url, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify(body),
          signal: AbortSignal.timeout(timeout * 4),
        }).then(
          async (res) => {
            const text = await res.text();
            if (!res.ok) return `${url} answered ${res.status}: ${text.slice(0, 300)}`;
            // vLLM: {"results": [per worker]}; the ckptd extension returns {ok, error?}.
            const results =
              (JSON.parse(text || "{}") as { results?: { ok?: boolean; error?: string }[] }).results ?? [];
            const bad = results.find((r) => r && r.ok === false);
            return bad ? `a worker failed: ${bad.error ?? JSON.stringify(bad)}` : undefined;
          },
          (err: Error) => `${url}: ${err.message}`,
        );
        return { engine, result };
      });
  }

  /** Waits until every configured engine has a receiver on each of its GPUs. */
  private async awaitReceivers(triggered: { engine: EngineConfig; result: Promise<string | undefined> }[]) {
    const { hub, engines, receiverTimeoutMs: timeout } = this.opts;
    const missing = () =>
      engines.flatMap((e) =>
        e.gpus.filter((g) => !hub.connected().some((r) => r.gpu === g)).map((g) => ({ engine: e, gpu: g })),
      );
    const until = performance.now() + timeout;
    const early = new Map<EngineConfig, string>();
    for (const t of triggered) void t.result.then((err) => err && early.set(t.engine, err));
    while (missing().length > 0) {
      const first = missing()[0];
      const err = first && early.get(first.engine);
      if (first && (err || performance.now() > until)) {
        throw new Error(
          `engine ${first.engine.name} has no receiver on GPU ${first.gpu}${err ? `: ${err}` : ` after ${timeout} ms`}`,
        );
      }
      await new Promise((r) => setTimeout(r, 10));
    }
    return hub.connected();
  }

  private async run(record: UpdateRecord, version: CheckpointVersion): Promise<void> {
    const { log, receiverTimeoutMs: timeout } = this.opts;
    const t0 = performance.now();
    const triggered = this.triggerEngines();
    let receivers: Receiver[] = [];
    const acked = new Map<Receiver, number>();
    let failure: Error | undefined;
    let transfer: Transfer | undefined;
    try {
      receivers = await this.awaitReceivers(triggered);
      for (const r of receivers) acked.set(r, 0);
      transfer = await this.opts.transfer();
      const buckets = planBuckets(version.tensors, { bucketBytes: transfer.slotBytes, gpus: transfer.gpus.length });
      record.progress.buckets = buckets.length;
      record.progress.bytes = buckets.reduce((s, b) => s + b.bytes, 0);
      record.timings.planSeconds = (performance.now() - t0) / 1000;
      for (const r of receivers) {
        r.send({
          op: "begin",
          update: record.id,
          checkpoint: version.id,
          tensors: version.tensors.length,
          buckets: buckets.length,
        });
      }
      // Each GPU issues its own buckets into its own slots, so one engine's slow ack holds up
      // only that GPU's next copy. Every broadcast is queued on all GPUs' streams in one call,
      // so the collectives keep one order everywhere whatever order the loops run in.
      const t = transfer;
      const slots: Promise<void>[] = Array.from({ length: t.slots }, () => Promise.resolve());
      const loops = t.gpus.map(async (_, owner) => {
        const mine = Array.from({ length: t.slots }, (_, s) => s).filter((s) => s % t.gpus.length === owner);
        let k = 0;
        for (const b of buckets) {
          if (b.owner !== owner) continue;
          const s = at(mine, k++ % mine.length);
          const waited = performance.now();
          await slots[s];
          record.timings.stallSeconds += (performance.now() - waited) / 1000;
          if (failure) return;
          this.issue(t, version, b, s);
          slots[s] = this.deliver(t, record, b, s, receivers, acked).catch((err) => {
            failure ??= err;
          });
        }
      });
      await Promise.all(loops);
      await Promise.all(slots);
      if (failure) throw failure;
      const finishing = performance.now();
      for (const r of receivers) r.send({ op: "end", update: record.id });
      await Promise.all(
        receivers.map((r) => r.expect((m) => m.op === "done" && m.update === record.id, record.id, timeout, "done")),
      );
      record.timings.finishSeconds = (performance.now() - finishing) / 1000;
      for (const t of triggered) {
        const err = await t.result;
        if (err) throw new Error(`engine ${t.engine.name}: ${err}`);
      }
      record.state = "succeeded";
    } catch (err) {
      record.state = "failed";
      const e = err as Error;
      record.error = {
        code: err instanceof ReceiverError ? "receiver_failed" : "update_failed",
        message: e.message,
        ...(err instanceof ReceiverError ? { receiver: err.receiver.label } : {}),
      };
      for (const r of receivers) r.send({ op: "abort", update: record.id, reason: e.message });
      // Queued copies may still read or write the slots: wait for them before the next update.
      if (transfer && !(await transfer.drain(timeout).catch(() => false))) await this.opts.discard();
      log.warn({ update: record.id, error: record.error }, "update failed");
    }
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
    if (record.state === "succeeded") {
      log.info({ update: record.id, checkpoint: version.id, ...record.timings }, "update succeeded");
    }
  }

  /** Queues bucket b: host-to-device on its owner, then the broadcast to every GPU. */
  private issue(t: Transfer, version: CheckpointVersion, b: Bucket, s: number): void {
    const { ctx } = this.opts;
    const owner = t.gpus[b.owner];
    if (!owner) throw new Error(`bucket ${b.index} belongs to GPU ${b.owner}, which this daemon does not have`);
    const ranges = new BigUint64Array(b.pieces.length * 3);
    b.pieces.forEach((p, i) => {
      const file = version.pinned[p.file];
      if (!file) throw new Error(`${version.id} is not pinned`);
      ranges[3 * i] = file.mem.address + BigInt(p.fileOffset);
      ranges[3 * i + 1] = BigInt(p.slotOffset);
      ranges[3 * i + 2] = BigInt(p.range[1] - p.range[0]);
    });
    ctx.h2dAsync(owner.copy, at(owner.slots, s), ranges);
    ctx.eventRecord(at(owner.copied, s), owner.copy);
    if (t.comm) {
      ctx.streamWaitEvent(owner.bcast, at(owner.copied, s));
      ctx.broadcast(
        t.comm,
        b.owner,
        t.gpus.map((g) => at(g.slots, s)),
        t.gpus.map((g) => g.bcast),
        0,
        b.bytes,
      );
      for (const g of t.gpus) ctx.eventRecord(at(g.landed, s), g.bcast);
    } else {
      ctx.eventRecord(at(owner.landed, s), owner.copy);
    }
  }

  /** Waits for bucket b's bytes on each GPU, hands it to that GPU's receivers, awaits their acks. */
  private async deliver(
    t: Transfer,
    record: UpdateRecord,
    b: Bucket,
    s: number,
    receivers: Receiver[],
    acked: Map<Receiver, number>,
  ): Promise<void> {
    const { ctx, receiverTimeoutMs: timeout } = this.opts;
    const msg = {
      op: "bucket",
      update: record.id,
      bucket: b.index,
      slot: s,
      tensors: b.pieces.map((p) => ({
        name: p.name,
        dtype: p.dtype,
        shape: p.shape,
        bytes: p.bytes,
        offset: p.slotOffset,
        range: p.range,
      })),
    };
    await Promise.all(
      t.gpus.map(async (g, gpu) => {
        if (!(await ctx.eventWait(at(g.landed, s), timeout))) {
          throw new Error(`bucket ${b.index} did not reach GPU ${gpu} within ${timeout} ms`);
        }
        const mine = receivers.filter((r) => r.gpu === gpu);
        for (const r of mine) r.send(msg);
        await Promise.all(
          mine.map(async (r) => {
            await r.expect(
              (m) => m.op === "ack" && m.update === record.id && m.bucket === b.index,
              record.id,
              timeout,
              `the ack of bucket ${b.index}`,
            );
            acked.set(r, (acked.get(r) ?? 0) + 1);
          }),
        );
      }),
    );
    record.progress.bucketsDone++;
    record.progress.bytesDone += b.bytes;
  }
}
