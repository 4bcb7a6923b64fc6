/**
 * Pushes straight from a trainer's GPUs: the trainer names its tensors by the IPC handles of
 * the device memory holding them (CUDA IPC; on the host backend, a shared-memory buffer), and
 * the daemon copies them device-to-host into a pooled pinned block laid out as safetensors,
 * with its own streams, while a kernel on each device hashes the same bytes where they are
 * (ckpt_buf_hash: every 64 KiB chunk on a thread of its own, a few ms for 16 GB, where the
 * host's CPUs would take longer than the copy). No byte goes
 * through HTTP or through the trainer's host memory; the trainer may change its tensors once
 * the push has answered. The version lives in memory, as a pulled one does.
 */

import type { Logger } from "pino";
import type { Context, DeviceBuffer, Event, Stream } from "../../ffi/index.ts";
import { CKPT_IPC_CUDA, CKPT_IPC_HOST, HostMemory } from "../../ffi/index.ts";
import { DaemonError } from "../errors.ts";
import { sized } from "./declared.ts";
import { batches, type Copy, type PushBuffer, type PushRequest, planPush } from "./push-plan.ts";
import type { CheckpointVersion, Registry, TensorRecord } from "./registry.ts";

/** The longest one batch may take to land before the push fails (a hung device). */
const BATCH_TIMEOUT_MS = 60_000;

export interface PushDeps {
  ctx: Context;
  registry: Registry;
  threads: number;
  log: Logger;
}

/**
 * Registers the pushed tensors as the next version of their checkpoint, ready once copied and
 * hashed: one part (a push), or the parts of a sharded push, each a file of the version, all
 * copied at once. A tensor name in two parts is a 400, as in two files.
 */
export async function pushFromDevices(parts: PushRequest[], deps: PushDeps): Promise<CheckpointVersion> {
  const base = leaseBase(parts, deps.registry);
  try {
    return await pushParts(parts, deps, base);
  } finally {
    base?.release();
  }
}

/** The base a push names, leased until the push ends (404, 409 or a stale version's error otherwise). */
function leaseBase(parts: PushRequest[], registry: Registry) {
  const ref = parts[0]?.base;
  if (ref === undefined) return undefined;
  if (parts.length > 1) throw new DaemonError("invalid_request", "a sharded push cannot name a base");
  const lease = registry.acquire(ref);
  if (lease.version.name !== parts[0]?.name) {
    lease.release();
    throw new DaemonError("invalid_request", `the base ${lease.version.id} is not a version of ${parts[0]?.name}`);
  }
  return lease;
}

async function pushParts(
  parts: PushRequest[],
  deps: PushDeps,
  base?: { version: CheckpointVersion; release: () => void },
): Promise<CheckpointVersion> {
  const plans = parts.map((req) => planPush(req, deps.ctx.devices(), base?.version));
  sized(parts.flatMap((p) => p.tensors)); // names unique over every part
  const files = plans.map((plan, i) => ({
    path: `push/${i}`,
    size: plan.layout.size,
    mtimeMs: 0,
    inPlace: false,
    adopted: false,
  }));
  const name = (parts[0] as PushRequest).name;
  const fill = async (v: CheckpointVersion) => {
    // Every part's copies end before a failure is told: the registry then releases the blocks.
    const done = await Promise.allSettled(parts.map((req, i) => fillPart(v, i, req, plans[i] as Plan, deps)));
    // Copied from: once the version is ready, maxVersions may drop the base (which waits for its leases).
    base?.release();
    const failed = done.find((d) => d.status === "rejected");
    if (failed) throw (failed as PromiseRejectedResult).reason;
    v.tensors = done.flatMap((d) => (d as PromiseFulfilledResult<TensorRecord[]>).value);
  };
  const version = await deps.registry.reserve(name, files, fill, "push");
  await version.finished();
  return version;
}

type Plan = ReturnType<typeof planPush>;

/** Copies one part into its block (file `file` of the version) and hashes it; its tensor records. */
async function fillPart(
  version: CheckpointVersion,
  file: number,
  req: PushRequest,
  plan: Plan,
  deps: PushDeps,
): Promise<TensorRecord[]> {
  const { ctx, registry, threads } = deps;
  const started = performance.now();
  const size = plan.layout.size;
  const block = await registry.pool.take(size);
  const mem = new HostMemory(block.address, size);
  version.pinned[file] = { path: `push/${file}`, size, mtimeMs: 0, inPlace: false, mem, block };
  mem.view(plan.layout.header.byteLength).set(plan.layout.header);
  version.progress.bytesPinned += plan.layout.header.byteLength;
  version.progress.bytesHashed += plan.layout.header.byteLength;
  const bufs: (DeviceBuffer | undefined)[] = [];
  const streams = new Map<number, Stream>();
  const events: Event[] = [];
  let hashing: Promise<Map<string, string>> | undefined;
  let based: Promise<Map<string, string>> | undefined;
  try {
    // At once: each open waits on the driver, and a push names hundreds of allocations.
    const opened = await Promise.allSettled(
      req.buffers.map((b, i) => importBuffer(ctx, b, i, plan.deviceOf[i] as number)),
    );
    for (const o of opened) bufs.push(o.status === "fulfilled" ? o.value : undefined);
    const refused = opened.find((o) => o.status === "rejected");
    if (refused) throw (refused as PromiseRejectedResult).reason;
    const imported = performance.now();
    const landed: { batch: Copy[]; event: Event }[] = [];
    for (const batch of batches(plan.copies)) {
      const device = (batch[0] as Copy).device;
      let stream = streams.get(device);
      if (!stream) {
        stream = ctx.streamCreate(device);
        streams.set(device, stream);
      }
      for (const c of batch) {
        const ranges = new BigUint64Array([
          mem.address + BigInt(c.tensor.offset),
          BigInt(c.from),
          BigInt(c.tensor.bytes),
        ]);
        ctx.d2hAsync(stream, bufs[c.buffer] as DeviceBuffer, ranges);
      }
      const event = ctx.eventCreate(device);
      events.push(event);
      ctx.eventRecord(event, stream);
      landed.push({ batch, event });
    }
    hashing = hashOnDevices(ctx, plan.copies, bufs as DeviceBuffer[], threads, version);
    hashing.catch(() => undefined); // awaited below, after the copies
    based = copyFromBase(ctx, mem, plan, threads, version);
    based.catch(() => undefined);
    await awaitLanded(ctx, landed, version);
    const hashes = new Map([...(await hashing), ...(await based)]);
    const s = (a: number, b: number) => Number(((b - a) / 1000).toFixed(4));
    deps.log.debug(
      {
        checkpoint: version.id,
        part: file,
        buffers: req.buffers.length,
        importSeconds: s(started, imported),
        copyAndHashSeconds: s(imported, performance.now()),
      },
      "push copied",
    );
    // Every handle is closed before the push answers: the trainer may free its memory then.
    await release();
    return plan.layout.tensors.map(
      (t): TensorRecord => ({
        name: t.name,
        dtype: t.dtype,
        shape: t.shape,
        bytes: t.bytes,
        file,
        offset: t.offset,
        hash: hashes.get(t.name) as string,
      }),
    );
  } catch (err) {
    await release(); // copies in flight end before the registry gives the block back
    throw err;
  }

  async function release(): Promise<void> {
    await hashing?.catch(() => undefined); // no kernel reads a buffer about to be freed
    await based?.catch(() => undefined); // nor a copy writes the block
    for (const s of streams.values()) await ctx.streamDestroy(s).catch(() => undefined);
    for (const e of events) ctx.eventDestroy(e);
    // At once, as they were opened.
    await Promise.all(bufs.map((b) => b && ctx.bufFree(b).catch(() => undefined)));
  }
}

/** Copies a base's tensors that were not pushed into the block; their hashes, name to 16 hex digits. */
async function copyFromBase(
  ctx: Context,
  mem: HostMemory,
  plan: Plan,
  threads: number,
  version: CheckpointVersion,
): Promise<Map<string, string>> {
  const from = plan.fromBase;
  if (from.length === 0) return new Map();
  const ranges = new BigUint64Array(from.length * 3);
  for (const [k, f] of from.entries()) {
    ranges.set([mem.address + BigInt(f.tensor.offset), f.src, BigInt(f.tensor.bytes)], 3 * k);
  }
  await ctx.hostCopy(ranges, threads).catch((err: Error) => {
    throw new DaemonError("push_failed", `copying the base's tensors: ${err.message}`);
  });
  const bytes = from.reduce((n, f) => n + f.tensor.bytes, 0);
  version.progress.bytesPinned += bytes;
  if (!plan.trusted) {
    // Pinned where its files lie: what was copied must still be what the base was hashed as.
    const again = await ctx.hash(
      new BigUint64Array(from.flatMap((f, k) => [ranges[3 * k] as bigint, BigInt(f.tensor.bytes)])),
      threads,
    );
    const changed = from.find((f, k) => (again[k] as bigint).toString(16).padStart(16, "0") !== f.hash);
    if (changed) {
      throw new DaemonError(
        "push_failed",
        `tensor "${changed.tensor.name}" of the base changed in its file while it was copied: register the base again`,
      );
    }
  }
  const hashes = from.map((f) => f.hash);
  version.progress.bytesHashed += bytes;
  return new Map(from.map((f, k) => [f.tensor.name, hashes[k] as string]));
}

/** Waits for each batch to land, moving the progress; a batch over BATCH_TIMEOUT_MS is a hung device. */
async function awaitLanded(ctx: Context, landed: { batch: Copy[]; event: Event }[], version: CheckpointVersion) {
  for (const { batch, event } of landed) {
    if (!(await ctx.eventWait(event, BATCH_TIMEOUT_MS))) {
      throw new DaemonError(
        "push_failed",
        `copying from device ${(batch[0] as Copy).device} took over ${BATCH_TIMEOUT_MS} ms`,
      );
    }
    version.progress.bytesPinned += batch.reduce((n, c) => n + c.tensor.bytes, 0);
  }
}

/**
 * Every tensor's hash, computed on the device that holds it, a call per device at once (the
 * host backend's share the threads); tensor name to 16 hex digits.
 */
async function hashOnDevices(
  ctx: Context,
  copies: Copy[],
  bufs: DeviceBuffer[],
  threads: number,
  version: CheckpointVersion,
): Promise<Map<string, string>> {
  const byDevice = new Map<number, Copy[]>();
  for (const c of copies) {
    const mine = byDevice.get(c.device) ?? [];
    mine.push(c);
    byDevice.set(c.device, mine);
  }
  const share = Math.max(1, Math.floor(threads / byDevice.size));
  const hashes = new Map<string, string>();
  await Promise.all(
    [...byDevice.values()].map(async (mine) => {
      const used = [...new Set(mine.map((c) => c.buffer))];
      const index = new Map(used.map((b, k) => [b, k]));
      const ranges = new BigUint64Array(mine.length * 3);
      mine.forEach((c, k) => {
        ranges[3 * k] = BigInt(index.get(c.buffer) as number);
        ranges[3 * k + 1] = BigInt(c.from);
        ranges[3 * k + 2] = BigInt(c.tensor.bytes);
      });
      const out = await ctx.bufHash(
        used.map((b) => bufs[b] as DeviceBuffer),
        ranges,
        share,
      );
      for (const [k, c] of mine.entries()) hashes.set(c.tensor.name, (out[k] as bigint).toString(16).padStart(16, "0"));
      version.progress.bytesHashed += mine.reduce((n, c) => n + c.tensor.bytes, 0);
    }),
  );
  return hashes;
}

async function importBuffer(ctx: Context, b: PushBuffer, i: number, device: number): Promise<DeviceBuffer> {
  const data = new Uint8Array(128);
  data.set(Buffer.from(b.handle, "base64")); // at most 128 bytes (planPush)
  const kind = b.kind === "cuda" ? CKPT_IPC_CUDA : CKPT_IPC_HOST;
  try {
    return await ctx.bufImport({ kind, len: b.len, device, pid: b.pid, data });
  } catch (err) {
    throw new DaemonError(
      "push_failed",
      `buffer ${i} (a ${b.kind} handle of process ${b.pid} on ${b.device}) cannot be opened: ${(err as Error).message} (freed, or of another machine?)`,
    );
  }
}
