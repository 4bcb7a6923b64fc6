/**
 * A pull: a version registered here by fetching its bytes from the pinned memory of every
 * source that holds it, striped over them (pull/stripe.ts), each piece checked against the
 * source's hash as soon as all of its bytes are here. A source that fails or lands nothing
 * for `stallMs` is dropped and its ranges go to the others; the pull fails, naming what is
 * missing, only when no live source can give it. Nothing stays pinned after a failure: the
 * registry releases what the pull pinned, once no fetch can write into it any longer.
 */
import type { Logger } from "pino";
import {
  CKPT_ECANCELED,
  CKPT_EHANDLE,
  CKPT_ERANGE,
  type Context,
  type Exposed,
  HostMemory,
  type UcxPeer,
} from "../../ffi/index.ts";
import type { CheckpointVersion, FileRecord, Registry, TensorRecord } from "../checkpoints/registry.ts";
import { DTYPE_BITS, parseHeader } from "../checkpoints/safetensors.ts";
import { DaemonError } from "../errors.ts";
import type { PeerSigner } from "../update/peers.ts";
import type { Holder } from "./choose.ts";
import { type Manifest, piecesOf } from "./manifest.ts";
import { type Found, findSources } from "./sources.ts";
import { type Piece, type Range, Stripe } from "./stripe.ts";
import type { PullTransport } from "./transport.ts";

export interface PullRequest {
  name: string;
  fingerprint?: string;
  /** The up peers that hold it, or these daemons' URLs. */
  from: "peers" | string[];
}

export interface PullDeps {
  ctx: Context;
  log: Logger;
  registry: Registry;
  transport: PullTransport;
  sign: PeerSigner;
  /** The up members, as they describe themselves. */
  holders: () => Holder[];
  stallMs: number;
  chunkBytes: number;
  threads: number;
}

/** Ranges in flight per lane of a source: enough to keep one connection busy. */
export const DEPTH = 4;

export interface SourceProgress {
  nodeId: string;
  url: string;
  state: "pulling" | "done" | "failed";
  bytes: number;
  error?: string;
}

export interface PullProgress {
  fingerprint: string;
  sources: SourceProgress[];
  /** Daemons asked that were not used, and why ("<url>: <reason>"). */
  leftOut: string[];
  bytesFetched: number;
  /** Bytes of tensors this daemon held already (the same hash in a version of its own): copied here, not fetched. */
  bytesLocal: number;
  bytesVerified: number;
  /** Pieces that hashed wrong and were fetched again. */
  mismatches: number;
  gbps: number;
  etaSeconds: number | null;
  /** Seconds from the first fetch to the last piece verified, once done. */
  seconds?: number;
}

type Span = { file: number; begin: number; end: number };

/** One of a source's lanes: a connection, the regions of every file on it, the ranges in flight. */
interface Lane {
  address: string;
  regions: Exposed[];
  peer?: UcxPeer;
  inflight: number;
}

interface Source {
  progress: SourceProgress;
  lanes: Lane[];
  /** Set once connected, cleared when dropped. */
  connected: boolean;
  inflight: number;
  lastLanded: number;
}

/** Why a source failed a range, in words. */
function refusal(status: number): string {
  if (status === CKPT_EHANDLE) return "it no longer serves this version (dropped there, or the key is wrong)";
  if (status === CKPT_ERANGE) return "its memory is smaller than its manifest says";
  if (status === CKPT_ECANCELED) return "cancelled";
  return `the transfer failed (status ${status})`;
}

const keyOf = (r: Manifest["files"][number]["regions"][number]): Exposed => ({
  id: BigInt(r.id),
  key: Buffer.from(r.key, "hex"),
});

/**
 * Starts a pull of `req`: resolves with the version in state "registering" once its sources
 * answered and its memory is reserved; `version.done` settles when it is ready or failed.
 */
export async function startPull(req: PullRequest, deps: PullDeps): Promise<CheckpointVersion> {
  const { found, leftOut } = await findSources(req, deps);
  const first = found[0] as Manifest;
  const files: FileRecord[] = first.files.map((f, i) => ({
    path: `pull:${first.fingerprint.slice(0, 16)}/${i}`,
    size: f.size,
    mtimeMs: 0,
    ctimeMs: 0,
    ino: 0,
    dev: 0,
    inPlace: false,
    adopted: false,
  }));
  return deps.registry.reserve(req.name, files, (version) => new PullRun(version, found, leftOut, deps).run());
}

/** One pull in progress: the sources, the stripe, the pump that keeps every source busy. */
class PullRun {
  private readonly stripe: Stripe;
  private readonly pieces: Piece[];
  private readonly sources: Source[];
  private readonly progress: PullProgress;
  private hashing = 0;
  /** Files whose memory is still being pinned, or filled from versions held here. */
  private allocating = 0;
  /** Pieces held here: piece index -> where the same bytes lie in a version of this daemon's. */
  private readonly here = new Map<number, bigint>();
  /** Leases on the versions those bytes are copied from. */
  private readonly leases: { release: () => void }[] = [];
  /**
   * Pieces of which this daemon holds the base of the first source's delta: the base is copied
   * here (in `here`), then patched with the delta fetched from that source.
   */
  private readonly patches = new Map<number, NonNullable<Manifest["deltas"]>["tensors"][number]>();
  /** The first source's first lane, once connected (undefined: it could not be). */
  private readonly firstLane: Promise<Lane | undefined>;
  private laneReady: (lane: Lane | undefined) => void = () => undefined;
  /** Updates waiting for spans of bytes to be verified (version.gate). */
  private waiters: { spans: readonly Span[]; resolve: () => void; reject: (err: Error) => void }[] = [];
  private error?: Error;
  private settle?: { resolve: () => void; reject: (err: Error) => void };
  /** When the first fetch went out (memory pinned, sources connected). */
  private started = performance.now();

  constructor(
    private readonly version: CheckpointVersion,
    private readonly manifests: Found[],
    leftOut: string[],
    private readonly deps: PullDeps,
  ) {
    const first = manifests[0] as Manifest;
    this.firstLane = new Promise((resolve) => {
      this.laneReady = resolve;
    });
    this.pieces = piecesOf(first);
    this.findHere(first);
    this.stripe = new Stripe(
      first.files.map((f) => f.size),
      this.pieces,
      deps.chunkBytes,
      new Set(this.here.keys()),
    );
    this.sources = manifests.map((m) => ({
      progress: { nodeId: m.nodeId, url: m.url, state: "pulling", bytes: 0 },
      lanes: m.addresses.map((address, j) => ({
        address,
        regions: m.files.map((f) => keyOf(f.regions[j] as Manifest["files"][number]["regions"][number])),
        inflight: 0,
      })),
      connected: false,
      inflight: 0,
      lastLanded: performance.now(),
    }));
    this.progress = {
      fingerprint: first.fingerprint,
      sources: this.sources.map((s) => s.progress),
      leftOut,
      bytesFetched: 0,
      bytesLocal: 0,
      bytesVerified: 0,
      mismatches: 0,
      gbps: 0,
      etaSeconds: null,
    };
    (version.progress as { pull?: PullProgress }).pull = this.progress;
    version.tensors = first.tensors as TensorRecord[];
    version.gate = (spans) => this.gate(spans);
  }

  /**
   * The tensors this daemon holds already: a ready version of its own with a tensor of the same
   * hash and size (the step before, a frozen part). Those are copied, not fetched, from a
   * version leased until the pull ends.
   */
  private findHere(m: Manifest): void {
    const names = new Set(m.tensors.map((t) => t.name));
    const held = new Map<string, { version: CheckpointVersion; tensor: TensorRecord }>();
    for (const version of this.deps.registry.list()) {
      if (version.state !== "ready" || version === this.version) continue;
      for (const tensor of version.tensors) if (tensor.bytes > 0) held.set(tensor.hash, { version, tensor });
    }
    const leased = new Set<CheckpointVersion>();
    const deltas = new Map((m.deltas?.tensors ?? []).map((d) => [d.name, d]));
    this.pieces.forEach((p, i) => {
      let found = names.has(p.name) ? held.get(p.hash) : undefined;
      const delta = found ? undefined : deltas.get(p.name);
      if (delta) found = held.get(delta.from);
      if (!found || found.tensor.bytes !== p.end - p.begin) return;
      if (!leased.has(found.version)) {
        try {
          this.leases.push(this.deps.registry.acquire(found.version.id));
        } catch {
          return; // stale or going: fetched instead
        }
        leased.add(found.version);
      }
      const mem = found.version.pinned[found.tensor.file]?.mem;
      if (!mem) return;
      this.here.set(i, mem.address + BigInt(found.tensor.offset));
      if (delta) this.patches.set(i, delta);
    });
  }

  /**
   * Patches the pieces of `mine` copied from a delta's base: fetches each delta from the first
   * source (once connected) and writes its new values in place. A delta that cannot be fetched
   * or applied leaves the base's bytes, which then hash wrong and are fetched whole.
   */
  private async patch(mine: number[]): Promise<void> {
    const m = this.manifests[0] as Manifest;
    const dtypes = new Map(m.tensors.map((t) => [t.name, t.dtype]));
    const todo = mine.flatMap((i) => {
      const d = this.patches.get(i);
      const p = this.pieces[i] as Piece;
      const elem = (DTYPE_BITS[dtypes.get(p.name) ?? ""] ?? 0) / 8;
      // What a source says of a delta is checked as far as it can be: its parts inside its
      // bytes, and no more bytes than a delta may take (a quarter of the tensor's, padded).
      const fits =
        d &&
        [1, 2, 4, 8].includes(elem) &&
        d.bytes <= (p.end - p.begin) / 4 + 16 &&
        d.positions + 4 * d.count <= d.bytes &&
        d.values + elem * d.count <= d.bytes;
      return fits ? [{ p, d, elem }] : [];
    });
    const region = m.deltas?.regions[0];
    const lane = todo.length > 0 && region ? await this.firstLane : undefined;
    const source = this.sources[0];
    if (!lane || !region || !source) return;
    const total = todo.reduce((n, x) => n + x.d.bytes, 0);
    // Any failure here leaves the bases, which hash wrong and are fetched whole.
    const scratch = await this.deps.ctx.hostAlloc(total).catch(() => undefined);
    if (!scratch) return;
    try {
      let at = 0n;
      // Settled, every one, before the scratch goes: a fetch may still be writing into it.
      await Promise.allSettled(
        todo.map(async ({ p, d, elem }) => {
          const where = scratch.address + at;
          at += BigInt(d.bytes);
          const peer = lane.peer; // the source may have been dropped meanwhile
          if (!peer) return;
          // Counted in flight like ranges: a source that stops answering is dropped for it.
          source.inflight++;
          lane.inflight++;
          const status = await this.deps.transport
            .fetch(peer, keyOf(region), d.offset, d.bytes, where)
            .catch(() => -1)
            .finally(() => {
              source.inflight--;
              lane.inflight--;
              source.lastLanded = performance.now();
            });
          if (status !== 0) return;
          this.progress.bytesFetched += d.bytes;
          source.progress.bytes += d.bytes;
          const dst = (this.version.pinned[p.file]?.mem.address as bigint) + BigInt(p.begin);
          await this.deps.ctx.deltaApply(
            dst,
            p.end - p.begin,
            elem,
            where + BigInt(d.positions),
            where + BigInt(d.values),
            d.count,
          );
        }),
      );
    } finally {
      await this.deps.ctx.hostFree(scratch);
    }
  }

  /** Copies the pieces of file `file` that are here, then checks them as fetched ones (a mismatch fetches them). */
  private async copyHere(file: number): Promise<void> {
    const mine = [...this.here].filter(([i]) => (this.pieces[i] as Piece).file === file);
    if (mine.length === 0) return;
    const dst = this.version.pinned[file]?.mem.address as bigint;
    const ranges = new BigUint64Array(mine.length * 3);
    mine.forEach(([i, src], k) => {
      const p = this.pieces[i] as Piece;
      ranges.set([dst + BigInt(p.begin), src, BigInt(p.end - p.begin)], 3 * k);
    });
    const copied = await this.deps.ctx.hostCopy(ranges, this.deps.threads).then(
      () => true,
      (err: Error) => {
        this.deps.log.warn(
          { checkpoint: this.version.id, err: err.message },
          "copying held tensors failed: fetched instead",
        );
        return false;
      },
    );
    if (copied) {
      const p = (i: number) => this.pieces[i] as Piece;
      this.progress.bytesLocal += mine.reduce((n, [i]) => n + p(i).end - p(i).begin, 0);
      await this.patch(mine.map(([i]) => i));
    }
    if (!this.error) this.verify(mine.map(([i]) => i));
  }

  /** Resolves once every byte of `spans` is verified; rejects if the pull fails first. */
  private gate(spans: readonly Span[]): Promise<void> {
    if (this.error) return Promise.reject(this.error);
    if (this.covered(spans)) return Promise.resolve();
    return new Promise((resolve, reject) => this.waiters.push({ spans, resolve, reject }));
  }

  private covered(spans: readonly Span[]): boolean {
    return spans.every((s) => this.stripe.verifiedSpan(s.file, s.begin, s.end));
  }

  /** Wakes the updates whose spans are all verified now, or all of them with the pull's error. */
  private wake(): void {
    const waiting = this.waiters;
    this.waiters = [];
    for (const w of waiting) {
      if (this.error) w.reject(this.error);
      else if (this.covered(w.spans)) w.resolve();
      else this.waiters.push(w);
    }
  }

  async run(): Promise<void> {
    const onAbort = () => this.fail(new DaemonError("cancelled", "the pull was cancelled"));
    this.version.abort.signal.addEventListener("abort", onAbort);
    // Every file's memory is pinned at once, in parallel, and fetching into a file starts as
    // soon as its memory is there: pinning fresh memory overlaps the transfer.
    const allocated = Promise.all(this.manifests[0]?.files.map((f, i) => this.allocate(i, f.size)) ?? []);
    // Every file's held tensors are copied once its memory is there: their versions are free then.
    void allocated.then(() => {
      for (const lease of this.leases.splice(0)) lease.release();
    });
    for (const s of this.sources) {
      try {
        const peers = await this.deps.transport.connect(s.lanes.map((l) => l.address));
        for (const [j, l] of s.lanes.entries()) l.peer = peers[j];
        s.connected = true;
      } catch (err) {
        this.drop(s, `cannot connect: ${(err as Error).message}`);
      }
    }
    const first = this.sources[0];
    this.laneReady(first?.connected ? first.lanes[0] : undefined);
    this.started = performance.now();
    const stall = setInterval(() => this.checkStalls(), Math.max(5, Math.floor(this.deps.stallMs / 4)));
    if (this.version.abort.signal.aborted) onAbort();
    try {
      await new Promise<void>((resolve, reject) => {
        this.settle = { resolve, reject };
        this.pump();
      });
    } finally {
      this.laneReady(undefined); // a patch still waiting for a connection gives up
      await allocated; // nothing is pinned after the run has ended
      clearInterval(stall);
      this.version.abort.signal.removeEventListener("abort", onAbort);
      for (const s of this.sources) this.disconnect(s);
      for (const lease of this.leases.splice(0)) lease.release();
      this.version.gate = undefined;
    }
    await this.checkHeaders();
    this.progress.seconds = (performance.now() - this.started) / 1000;
    this.progress.gbps = this.version.bytes / this.progress.seconds / 1e9;
    this.progress.etaSeconds = 0;
    this.version.progress.bytesHashed = this.version.bytes;
  }

  /** Pins file i's memory (failing the pull if it cannot), then lets the pump fetch into it. */
  private async allocate(i: number, size: number): Promise<void> {
    this.allocating++;
    try {
      if (this.version.abort.signal.aborted) throw new DaemonError("cancelled", "the pull was cancelled");
      const block = await this.deps.registry.pool.take(size);
      const mem = new HostMemory(block.address, size);
      this.version.pinned[i] = { path: `pull/${i}`, size, mtimeMs: 0, inPlace: false, mem, block };
      this.version.progress.bytesPinned += size;
      await this.copyHere(i);
    } catch (err) {
      this.fail(
        err instanceof DaemonError
          ? err
          : new DaemonError("pull_failed", `pinning ${size} bytes: ${(err as Error).message}`),
      );
    } finally {
      this.allocating--;
      this.pump();
    }
  }

  /** Each pulled file's safetensors header must describe exactly the manifest's tensors of that file. */
  private async checkHeaders(): Promise<void> {
    const first = this.manifests[0] as Manifest;
    for (const [file, p] of this.version.pinned.entries()) {
      const head = await this.deps.ctx.hostRead(p.mem, 8);
      const len = Number(Buffer.from(head).readBigUInt64LE(0));
      const name = `file ${file} of ${this.version.id}`;
      let parsed: ReturnType<typeof parseHeader>;
      try {
        parsed = parseHeader(await this.deps.ctx.hostRead(p.mem, Math.min(8 + len, p.size)), p.size, name);
      } catch (err) {
        throw new DaemonError("pull_failed", `the pulled header of ${name} is not valid: ${(err as Error).message}`);
      }
      const said = (ts: { name: string; dtype: string; shape: number[]; begin: number; end: number }[]) =>
        JSON.stringify(ts.map((t) => [t.name, t.dtype, t.shape, t.begin, t.end]).sort());
      const expected = first.tensors
        .filter((t) => t.file === file)
        .map((t) => ({ ...t, begin: t.offset, end: t.offset + t.bytes }));
      if (said(parsed.tensors) !== said(expected)) {
        throw new DaemonError(
          "pull_failed",
          `the pulled header of ${name} does not describe the tensors of its manifest`,
        );
      }
    }
  }

  /** Keeps DEPTH ranges in flight on every live source; ends the run when nothing more can happen. */
  private pump(): void {
    if (!this.settle) return;
    if (!this.error && !this.stripe.done()) {
      for (const s of this.live()) {
        for (const lane of s.lanes) {
          while (lane.inflight < DEPTH) {
            const r = this.stripe.take(s.progress.nodeId, (file) => this.version.pinned[file] !== undefined);
            if (!r) break;
            this.launch(s, lane, r);
          }
        }
      }
    }
    const busy = this.sources.some((s) => s.inflight > 0) || this.hashing > 0 || this.allocating > 0;
    if (busy) return;
    const { resolve, reject } = this.settle;
    if (this.error) {
      this.settle = undefined;
      this.wake();
      reject(this.error);
    } else if (this.stripe.done()) {
      for (const s of this.live()) s.progress.state = "done";
      this.settle = undefined;
      resolve();
    } else {
      this.fail(this.missing());
      this.pump();
    }
  }

  private live(): Source[] {
    return this.sources.filter((s) => s.progress.state === "pulling" && s.connected);
  }

  private launch(s: Source, lane: Lane, r: Range & { pieces: number[] }): void {
    const peer = lane.peer as UcxPeer;
    const region = lane.regions[r.file] as Exposed;
    const dst = (this.version.pinned[r.file]?.mem.address as bigint) + BigInt(r.offset);
    if (s.inflight === 0) s.lastLanded = performance.now(); // an idle source's clock starts with its first range
    s.inflight++;
    lane.inflight++;
    this.deps.transport
      .fetch(peer, region, r.offset, r.len, dst)
      .catch(() => -1)
      .then((status) => {
        s.inflight--;
        lane.inflight--;
        this.landed(s, lane, r, status);
        this.pump();
      });
  }

  private landed(s: Source, lane: Lane, r: Range & { pieces: number[] }, status: number): void {
    if (status === 0) {
      s.progress.bytes += r.len;
      s.lastLanded = performance.now();
      this.progress.bytesFetched += r.len;
      this.rate();
      const ready = this.stripe.landed(r, s.progress.nodeId);
      if (ready.length > 0 && !this.error) this.verify(ready);
      return;
    }
    this.stripe.failed(r, s.progress.nodeId);
    if (s.progress.state === "pulling") this.drop(s, lane.peer?.error() ?? refusal(status));
  }

  /** Hashes pieces whose bytes are all here; a mismatch sends them back to other sources. */
  private verify(ready: number[]): void {
    const ranges = new BigUint64Array(ready.length * 2);
    ready.forEach((i, k) => {
      const p = this.pieces[i] as Piece;
      ranges[2 * k] = (this.version.pinned[p.file]?.mem.address as bigint) + BigInt(p.begin);
      ranges[2 * k + 1] = BigInt(p.end - p.begin);
    });
    this.hashing++;
    this.deps.ctx
      .hash(ranges, this.deps.threads)
      .then((hashes) => {
        ready.forEach((i, k) => {
          const p = this.pieces[i] as Piece;
          if ((hashes[k] as bigint).toString(16).padStart(16, "0") === p.hash) {
            this.stripe.verified(i);
            return;
          }
          this.progress.mismatches++;
          const { served, guilty } = this.stripe.mismatch(
            i,
            this.live().map((s) => s.progress.nodeId),
          );
          const at = { checkpoint: this.version.id, piece: p.name, servedBy: served };
          this.deps.log.warn(at, "pulled bytes hashed wrong: fetched again");
          const culprit = this.sources.find((s) => s.progress.nodeId === guilty);
          if (culprit) this.drop(culprit, `served bytes of "${p.name}" that do not match its hash`);
        });
        this.progress.bytesVerified = this.stripe.verifiedBytes;
        this.version.progress.bytesHashed = this.stripe.verifiedBytes;
        this.wake();
      })
      .catch((err: Error) => this.fail(new DaemonError("pull_failed", `${this.version.id}: ${err.message}`)))
      .finally(() => {
        this.hashing--;
        this.pump();
      });
  }

  private checkStalls(): void {
    const now = performance.now();
    for (const s of this.live()) {
      if (s.inflight > 0 && now - s.lastLanded > this.deps.stallMs) {
        this.drop(s, `landed nothing for ${this.deps.stallMs} ms`);
      }
    }
    this.pump();
  }

  /** Stops using a source: its ranges in flight come back cancelled and go to the others. */
  private drop(s: Source, why: string): void {
    if (s.progress.state !== "pulling") return;
    s.progress.state = "failed";
    s.progress.error = why;
    this.deps.log.warn({ checkpoint: this.version.id, source: s.progress.nodeId, why }, "pull source dropped");
    this.disconnect(s); // its fetches in flight come back cancelled, and their ranges go back
    this.stripe.release(s.progress.nodeId);
  }

  private disconnect(s: Source): void {
    for (const l of s.lanes) l.peer?.disconnect();
    for (const l of s.lanes) l.peer = undefined;
    s.connected = false;
  }

  private fail(err: Error): void {
    this.error ??= err;
    for (const s of this.sources) this.drop(s, "the pull ended");
  }

  /** Why the pull cannot complete: what is missing, and what became of each source. */
  private missing(): DaemonError {
    const missing = this.stripe.missing();
    const bytes = missing.reduce((n, p) => n + p.end - p.begin, 0);
    const names = missing
      .slice(0, 3)
      .map((p) => `"${p.name}"`)
      .join(", ");
    const more = missing.length > 3 ? ` and ${missing.length - 3} more` : "";
    const sources = this.sources.map((s) => `${s.progress.nodeId}: ${s.progress.error ?? s.progress.state}`).join("; ");
    return new DaemonError(
      "pull_failed",
      `${this.version.id}: no live source can give ${bytes} of ${this.version.bytes} bytes (${names}${more}); sources: ${sources}`,
      { missingBytes: bytes, missing: missing.slice(0, 100).map((p) => p.name), sources: this.progress.sources },
    );
  }

  private rate(): void {
    const s = (performance.now() - this.started) / 1000;
    this.progress.gbps = s > 0 ? this.progress.bytesFetched / s / 1e9 : 0;
    const left = this.version.bytes - this.progress.bytesFetched;
    this.progress.etaSeconds = this.progress.gbps > 0 ? Math.max(0, left / (this.progress.gbps * 1e9)) : null;
  }
}
