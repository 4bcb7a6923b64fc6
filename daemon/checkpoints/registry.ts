/**
 * The checkpoint registry: versions per name, their pinned memory, leases held by updates,
 * the pinned-memory budget and the versions-kept limit. A registration is checked whole
 * before anything is pinned, and a failed or cancelled one leaves nothing pinned behind.
 */
import { lstat, unlink } from "node:fs/promises";
import type { Logger } from "pino";
import type { Context } from "../../ffi/index.ts";
import type { VersionDelta } from "../deltas/derive.ts";
import { DaemonError, type ErrorCode } from "../errors.ts";
import type { FilePolicy } from "./confine.ts";
import {
  type Confine,
  hashTensors,
  type InspectedFile,
  inspectFile,
  invalidSafetensors,
  type PinnedFile,
  pinFiles,
  type RegistrationProgress,
  unpinFiles,
} from "./pin.ts";
import { PinnedPool } from "./pool.ts";
import { checkUniqueNames, SafetensorsError } from "./safetensors.ts";
import { checkWeightMap, type ResolvedSource } from "./sources.ts";
import { checkFiles, faultedFile, type RegisteredFile, replaced, watchFiles } from "./watch.ts";

/** stale: a file pinned in place changed since it was registered (see watch.ts); no update may use it. */
export type VersionState = "registering" | "ready" | "stale" | "failed";

export interface TensorRecord {
  name: string;
  dtype: string;
  shape: number[];
  bytes: number;
  /** Index into the version's files. */
  file: number;
  /** Byte offset of the tensor in its file. */
  offset: number;
  /** The ckpt hash of the tensor's bytes (ckpt.h: XXH64 of each 64 KiB, then of those), 16 hex digits. */
  hash: string;
}

/** A file of a version: what watch.ts compares (path, size, mtime, inode), and ownership. */
export interface FileRecord extends RegisteredFile {
  /** Pinned where it lies (tmpfs), not copied. */
  inPlace: boolean;
  /** Owned by the daemon: deleted when the version is dropped. */
  adopted: boolean;
}

export interface RegisterRequest {
  name: string;
  source: ResolvedSource;
  copy: boolean;
  adopt: boolean;
  /** Restoring a saved version: its number, and the hashes its tensors must still have (if known). */
  restore?: { version: number; createdAt: string; files: FileRecord[]; tensors?: TensorRecord[] };
  /** "staged": a staging area's commit, kept in memory only (default "files"). */
  origin?: "files" | "staged";
}

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

/** Checks a checkpoint name: letters, digits, '.', '_' and '-', at most 128, no '@' or '/'. */
export function checkName(name: string): void {
  if (!NAME.test(name)) {
    throw new DaemonError("invalid_name", `checkpoint name "${name}" must match ${NAME.source}`);
  }
}

/** Splits "name" or "name@N" (N a positive integer). */
export function parseRef(ref: string): { name: string; version?: number } {
  const at = ref.lastIndexOf("@");
  if (at < 0) return { name: ref };
  const v = ref.slice(at + 1);
  if (!/^[1-9]\d{0,9}$/.test(v)) throw new DaemonError("invalid_ref", `"${ref}": version must be a positive integer`);
  return { name: ref.slice(0, at), version: Number(v) };
}

/**
 * Whether two modification times are the same: Node reports fractional milliseconds (rounded
 * from nanoseconds), Deno whole ones (truncated), so a registry saved under one runtime is
 * compared to within a millisecond under the other. Restoring re-checks every hash anyway.
 */
export function sameMtime(a: number, b: number): boolean {
  return Math.abs(a - b) <= 1;
}

/** Restoring: each file must have the size and modification time it had when saved. */
function checkUnchanged(inspected: InspectedFile[], saved: FileRecord[]): void {
  if (inspected.length !== saved.length) throw new Error("the set of files changed");
  inspected.forEach((f, i) => {
    const s = saved[i] as FileRecord;
    if (f.path !== s.path || f.size !== s.size || !sameMtime(f.mtimeMs, s.mtimeMs)) {
      throw new Error(`${f.path} changed since it was registered (size or modification time)`);
    }
  });
}

/** Restoring: every tensor must hash as it did when saved. */
function checkHashes(now: TensorRecord[], saved: TensorRecord[]): void {
  const before = new Map(saved.map((t) => [t.name, t.hash]));
  for (const t of now) {
    if (before.get(t.name) !== t.hash)
      throw new Error(`tensor "${t.name}" no longer has the hash it was registered with`);
  }
  if (now.length !== saved.length) throw new Error("the set of tensors changed");
}

/** What GET /v1/checkpoints says of a version's deltas. */
function deltaSummary(d: VersionDelta) {
  const changes = [...d.tensors.values()].reduce((n, t) => n + t.count, 0);
  return { base: d.base, tensors: d.tensors.size, changes, bytes: d.mem.len, seconds: d.seconds };
}

export class CheckpointVersion {
  state: VersionState = "registering";
  files: FileRecord[] = [];
  tensors: TensorRecord[] = [];
  error?: { code: ErrorCode; message: string; details?: unknown };
  /** Seconds spent pinning and hashing, once ready. */
  timings?: { pinSeconds: number; hashSeconds: number };
  leases = 0;
  /** Where its bytes came from: files registered here, or a pull from peers (never saved: pulled again). */
  /**
   * files: registered from files (persisted, restored at start); staged: a staging area's
   * commit (a copy of a file the area deletes); pull: from peers; push: from a trainer's GPUs.
   */
  origin: "files" | "staged" | "pull" | "push" = "files";
  /**
   * While a pull fills it: resolves once every byte of these file spans is verified (rejects
   * if the pull fails), so that an update can send each bucket as soon as its bytes are good.
   */
  gate?: (spans: readonly { file: number; begin: number; end: number }[]) => Promise<void>;
  /** Set once a delete has begun: no new lease may be taken. */
  deleting = false;
  pinned: PinnedFile[] = [];
  /** Its deltas against the version before it, once made (deltas/derive.ts). */
  delta?: VersionDelta;
  /** Its tensors' chunk hashes, once a verified update needed them (update/verify.ts). */
  chunks?: Map<string, BigUint64Array>;
  /** Stops watching the in-place files (set once ready). */
  unwatch: () => void = () => undefined;
  readonly abort = new AbortController();
  readonly progress: RegistrationProgress;
  /** Settles when registration has finished, failed or been cancelled. */
  done: Promise<void> = Promise.resolve();

  constructor(
    readonly name: string,
    readonly version: number,
    readonly bytes: number,
    readonly createdAt: string,
  ) {
    this.progress = { bytesTotal: bytes, bytesPinned: 0, bytesHashed: 0 };
  }

  get id(): string {
    return `${this.name}@${this.version}`;
  }

  summary() {
    return {
      id: this.id,
      name: this.name,
      version: this.version,
      state: this.state,
      bytes: this.bytes,
      tensorCount: this.tensors.length,
      createdAt: this.createdAt,
      inUse: this.leases > 0,
      origin: this.origin,
      progress: { ...this.progress },
      ...(this.timings ? { timings: this.timings } : {}),
      ...(this.delta ? { delta: deltaSummary(this.delta) } : {}),
      ...(this.error ? { error: this.error } : {}),
    };
  }

  /** Marks a ready version stale: `file` changed as `reason` says (see watch.ts). */
  markStale(file: string, reason: string): void {
    if (this.state !== "ready") return;
    this.state = "stale";
    this.error = { code: "stale", message: `${file} ${reason}`, details: { file, reason } };
  }

  manifest() {
    return { ...this.summary(), files: this.files, tensors: this.tensors };
  }

  /** Waits for the registration to end: the summary once ready, else throws why it failed. */
  async finished(): Promise<ReturnType<CheckpointVersion["summary"]>> {
    await this.done;
    if (this.state === "ready") return this.summary();
    const err = this.error ?? { code: "registration_failed", message: this.state };
    throw new DaemonError(err.code, `${this.id}: ${err.message}`, err.details);
  }
}

export interface RegistryOptions {
  ctx: Context;
  log: Logger;
  /** Pinned bytes allowed over all versions; 0: no limit. */
  budgetBytes: number;
  /** Ready versions kept per name; older unused ones are dropped. */
  maxVersions: number;
  threads: number;
  /** Where registered files may be, and which adopted ones may be deleted. */
  files: FilePolicy;
  /** Called after every change of the set of ready versions (persistence). */
  onChange?: (registry: Registry) => Promise<void>;
}

/** Who holds a version now (engines' receivers, by label); set once the receivers' hub exists. */
export type Holders = (versionId: string) => string[];

export class Registry {
  private readonly versions = new Map<string, CheckpointVersion[]>();
  private readonly next = new Map<string, number>();
  /** Called with each version about to be dropped, before its memory is released. */
  private readonly dropHooks: ((v: CheckpointVersion) => Promise<void>)[] = [];
  private readonly lastDropHooks: ((v: CheckpointVersion) => Promise<void>)[] = [];
  /** Called with each version once it is ready (not awaited). */
  private readonly readyHooks: ((v: CheckpointVersion) => void)[] = [];

  /** Pinned memory kept for reuse across versions: copies and pulls take from it. */
  readonly pool: PinnedPool;
  /** Bytes of registrations checked against the budget and not listed yet. */
  private reservedBytes = 0;
  /** The largest version seen: without a budget, the pool keeps at most this much. */
  private largest = 0;
  /** Who holds a version: such a version is not dropped (delete: 409; eviction: kept). */
  holders: Holders = () => [];

  constructor(private readonly opts: RegistryOptions) {
    this.pool = new PinnedPool(opts.ctx);
  }

  /**
   * Runs `hook` before any version's memory is released (one that serves it stops first);
   * `last`: after every other hook (what releases memory that others may still serve).
   */
  beforeDrop(hook: (v: CheckpointVersion) => Promise<void>, last = false): void {
    if (last) this.lastDropHooks.push(hook);
    else this.dropHooks.push(hook);
  }

  /** Runs `hook` once each version is ready and listed (after the eviction it caused). */
  afterReady(hook: (v: CheckpointVersion) => void): void {
    this.readyHooks.push(hook);
  }

  /** After a version turned ready: evicts around it, saves, and tells the hooks. */
  private async readied(version: CheckpointVersion): Promise<void> {
    const { log } = this.opts;
    await this.evictOld(version.name).catch((err) => log.error({ err }, "dropping old versions"));
    await this.opts.onChange?.(this).catch((err) => log.error({ err }, "saving the registry"));
    // Dropped meanwhile (a delete, the next version's eviction): nothing to tell.
    if (version.state !== "ready" || !this.listed(version)) return;
    for (const hook of this.readyHooks) hook(version);
  }

  /** Whether the version is still in the registry, not being deleted. */
  listed(version: CheckpointVersion): boolean {
    return !version.deleting && (this.versions.get(version.name) ?? []).includes(version);
  }

  private async dropped(version: CheckpointVersion): Promise<void> {
    for (const hook of [...this.dropHooks, ...this.lastDropHooks])
      await hook(version).catch((err) => this.opts.log.error({ err }, "before a drop"));
  }

  /** Pinned bytes held or reserved by registering and ready versions. */
  pinnedBytes(): number {
    let sum = this.reservedBytes;
    for (const list of this.versions.values()) {
      for (const v of list) {
        // A pooled block may be larger than its file: what is pinned is the block.
        const blocks = v.pinned.reduce((n, p) => n + (p?.block?.len ?? p?.size ?? 0), 0);
        if (v.state !== "failed") sum += Math.max(v.bytes, blocks) + (v.delta?.mem.len ?? 0);
      }
    }
    return sum;
  }

  list(): CheckpointVersion[] {
    return [...this.versions.values()].flat().sort((a, b) => a.name.localeCompare(b.name) || a.version - b.version);
  }

  /** The next version number per name, kept across restarts so numbers are never reused. */
  nextVersions(): Record<string, number> {
    return Object.fromEntries(this.next);
  }

  setNextVersions(next: Record<string, number>): void {
    for (const [name, n] of Object.entries(next)) this.next.set(name, Math.max(n, this.next.get(name) ?? 1));
  }

  /** A version by "name" (the newest in a `newest` state: ready) or "name@N"; 404 naming what is missing. */
  get(ref: string, newest: VersionState[] = ["ready"]): CheckpointVersion {
    const { name, version } = parseRef(ref);
    const list = this.versions.get(name) ?? [];
    const found =
      version === undefined
        ? list.filter((v) => newest.includes(v.state)).at(-1)
        : list.find((v) => v.version === version);
    if (!found) {
      const what =
        version === undefined ? `no ready version of checkpoint "${name}"` : `no checkpoint ${name}@${version}`;
      throw new DaemonError("not_found", what);
    }
    return found;
  }

  /**
   * Marks a ready version as used by an update; returns the release function. Its in-place
   * files are checked first: one that changed makes it stale, a 409 naming the file ("name"
   * whose newest version is stale is refused too, rather than falling back to an older one).
   */
  acquire(ref: string, filling = false): { version: CheckpointVersion; release: () => void } {
    const version = this.get(ref, ["ready", "stale"]);
    // A version still being pulled may be leased by an update that waits on its gate.
    if (filling && version.state === "registering" && version.gate && !version.deleting) return this.lease(version);
    this.recheck(version);
    if (version.state === "stale") {
      const why = version.error?.message ?? "a file changed";
      throw new DaemonError("stale", `${version.id} is stale: ${why}; register it again`, version.error?.details);
    }
    if (version.state !== "ready" || version.deleting) {
      throw new DaemonError("not_ready", `${version.id} is ${version.deleting ? "being deleted" : version.state}`);
    }
    return this.lease(version);
  }

  private lease(version: CheckpointVersion): { version: CheckpointVersion; release: () => void } {
    version.leases++;
    let released = false;
    return {
      version,
      release: () => {
        if (!released) version.leases--;
        released = true;
      },
    };
  }

  /** A ready version whose in-place files changed turns stale (before each update, and on inotify events). */
  private recheck(version: CheckpointVersion): void {
    const changed = version.state === "ready" ? checkFiles(version.files) : undefined;
    if (!changed) return;
    version.markStale(changed.file, changed.reason);
    version.unwatch();
    this.opts.log.warn({ checkpoint: version.id, ...changed }, "checkpoint is stale: a file changed");
  }

  /**
   * Checks every file, then reserves the bytes and starts pinning and hashing in the
   * background. Returns the new version in state "registering"; await its `done`.
   */
  async register(req: RegisterRequest): Promise<CheckpointVersion> {
    checkName(req.name);
    const inspected: InspectedFile[] = [];
    for (const path of req.source.files) await this.opts.files.confine(path);
    if (req.adopt) for (const path of req.source.files) await this.opts.files.checkAdoptable(path);
    for (const path of req.source.files) inspected.push(await inspectFile(path, this.confineOpened));
    try {
      checkUniqueNames(inspected.map((f) => ({ file: f.path, tensors: f.header.tensors })));
    } catch (err) {
      throw err instanceof SafetensorsError ? invalidSafetensors(err) : err;
    }
    if (req.source.weightMap) {
      const found = new Map(inspected.flatMap((f) => f.header.tensors.map((t) => [t.name, f.path] as const)));
      checkWeightMap(req.source.weightMap, found);
    }
    const bytes = inspected.reduce((sum, f) => sum + f.size, 0);
    const reserved = await this.makeRoom(
      inspected.filter((f) => req.copy || !f.tmpfs).map((f) => f.size),
      bytes,
    );
    try {
      if (req.restore) checkUnchanged(inspected, req.restore.files);
    } catch (err) {
      reserved();
      throw err;
    }
    const number = req.restore?.version ?? this.next.get(req.name) ?? 1;
    this.next.set(req.name, Math.max(number + 1, this.next.get(req.name) ?? 1));
    const version = new CheckpointVersion(req.name, number, bytes, req.restore?.createdAt ?? new Date().toISOString());
    version.origin = req.origin ?? "files";
    version.files = inspected.map((f) => ({
      path: f.path,
      size: f.size,
      mtimeMs: f.mtimeMs,
      ctimeMs: f.ctimeMs,
      ino: f.ino,
      dev: f.dev,
      inPlace: f.tmpfs && !req.copy,
      adopted: req.adopt,
    }));
    const list = this.versions.get(req.name) ?? [];
    list.push(version);
    this.versions.set(req.name, list);
    reserved(); // listed: its bytes count from here
    version.done = this.load(version, inspected, req.copy, req.restore?.tensors);
    // Saved before the caller hears the number: a restart never hands it out again.
    if (!req.restore)
      await this.opts.onChange?.(this).catch((err) => this.opts.log.error({ err }, "saving the registry"));
    return version;
  }

  /**
   * Registers a version whose bytes `fill` brings (a pull, a push from GPUs): the budget is checked and the
   * number taken now; `fill` pins into version.pinned as it goes and sets the tensors. A
   * failure or cancel (version.abort) releases what it pinned and records why.
   */
  async reserve(
    name: string,
    files: FileRecord[],
    fill: (version: CheckpointVersion) => Promise<void>,
    origin: "pull" | "push" = "pull",
  ): Promise<CheckpointVersion> {
    checkName(name);
    const bytes = files.reduce((sum, f) => sum + f.size, 0);
    const reserved = await this.makeRoom(
      files.map((f) => f.size),
      bytes,
      origin === "pull" ? "pulling" : "pushing",
    );
    const number = this.next.get(name) ?? 1;
    this.next.set(name, number + 1);
    const version = new CheckpointVersion(name, number, bytes, new Date().toISOString());
    version.origin = origin;
    version.files = files;
    const list = this.versions.get(name) ?? [];
    list.push(version);
    this.versions.set(name, list);
    reserved();
    version.done = this.settle(version, () => fill(version));
    await this.opts.onChange?.(this).catch((err) => this.opts.log.error({ err }, "saving the registry"));
    return version;
  }

  /** Runs a pull's fill to a ready version, or unwinds it to nothing pinned. */
  private async settle(version: CheckpointVersion, fill: () => Promise<void>): Promise<void> {
    const { ctx, log } = this.opts;
    const started = performance.now();
    try {
      await fill();
      if (version.abort.signal.aborted) throw new DaemonError("cancelled", `the ${version.origin} was cancelled`);
      version.state = "ready";
      version.timings = { pinSeconds: (performance.now() - started) / 1000, hashSeconds: 0 };
      log.info(
        { checkpoint: version.id, bytes: version.bytes, seconds: version.timings.pinSeconds },
        version.origin === "pull" ? "checkpoint pulled" : "checkpoint pushed",
      );
    } catch (err) {
      // An update may have leased it while it filled: its copies read this memory until it ends.
      while (version.leases > 0) await new Promise((r) => setTimeout(r, 20));
      await unpinFiles(ctx, version.pinned).catch((e) => log.error({ err: e }, "unpinning a failed pull"));
      version.pinned = [];
      version.state = "failed";
      version.error =
        err instanceof DaemonError
          ? { code: err.code, message: err.message, ...(err.details ? { details: err.details } : {}) }
          : { code: `${version.origin as "pull" | "push"}_failed`, message: (err as Error).message };
      log.warn({ checkpoint: version.id, error: version.error }, `${version.origin} failed`);
      return;
    }
    await this.readied(version);
  }

  /** Bytes the pinned-memory budget leaves (Infinity without a budget). */
  budgetLeft(): number {
    const budget = this.opts.budgetBytes;
    return budget > 0 ? Math.max(0, budget - this.pinnedBytes()) : Number.POSITIVE_INFINITY;
  }

  /** An opened file must really be under the roots, and readable for the caller (pin.ts checks every open). */
  private readonly confineOpened: Confine = async (fdPath, path, st) => {
    await this.opts.files.confine(fdPath);
    await this.opts.files.checkReadable(fdPath, path, st);
  };

  /**
   * Checks that `bytes` more fit the budget (507 otherwise) and reserves them at once, before
   * anything is awaited, so that requests arriving together cannot both take the same room;
   * then unpins pooled blocks, other than those the new files (`sizes`, copied or pulled) will
   * take, until the pool fits beside the versions. Returns the release of the reservation,
   * called once the version is listed (or its registration refused).
   */
  async makeRoom(sizes: number[], bytes: number, what = "registering"): Promise<() => void> {
    this.checkBudget(bytes, what);
    this.reservedBytes += bytes;
    this.largest = Math.max(this.largest, bytes);
    let held = true;
    const release = () => {
      if (held) this.reservedBytes -= bytes;
      held = false;
    };
    const budget = this.opts.budgetBytes;
    try {
      if (budget > 0) await this.pool.trimKeeping(sizes, Math.max(0, budget - this.pinnedBytes()));
    } catch (err) {
      release();
      throw err;
    }
    return release;
  }

  /**
   * Has the pool keep `count` blocks for copies of `len` bytes ready (a staging area's next
   * commits), as far as the budget leaves room beside the versions and the pool.
   */
  async stock(len: number, count: number): Promise<void> {
    const budget = this.opts.budgetBytes;
    const room = budget > 0 ? budget - this.pinnedBytes() - this.pool.bytes() : Number.POSITIVE_INFINITY;
    const blocks = Math.min(count, Math.floor(Math.max(0, room) / len));
    this.largest = Math.max(this.largest, len);
    // Reserved until pooled, so that requests arriving together do not count the same room.
    this.reservedBytes += blocks * len;
    try {
      await this.pool.stock(len, blocks);
    } finally {
      this.reservedBytes -= blocks * len;
    }
  }

  /** 507 when `bytes` more would exceed the pinned-memory budget; `what` names them in the message. */
  checkBudget(bytes: number, what = "registering"): void {
    const budget = this.opts.budgetBytes;
    const used = this.pinnedBytes();
    if (budget > 0 && used + bytes > budget) {
      const held = this.list()
        .map((v) => ({ id: v.id, by: this.holders(v.id) }))
        .filter((h) => h.by.length > 0);
      const holding = held.map((h) => `${h.id} is held by ${h.by.join(", ")}`).join("; ");
      throw new DaemonError(
        "over_budget",
        `${what} ${bytes} bytes would exceed the pinned-memory budget of ${budget} bytes by ${used + bytes - budget} bytes (${used} in use${holding ? `; ${holding} and is kept while it is` : ""})`,
        { bytes, budgetBytes: budget, usedBytes: used, overBytes: used + bytes - budget, ...(holding ? { held } : {}) },
      );
    }
  }

  /** Pins and hashes; on any failure unwinds to nothing pinned and records why. */
  private async load(
    version: CheckpointVersion,
    inspected: InspectedFile[],
    copy: boolean,
    expected?: TensorRecord[],
  ): Promise<void> {
    const { ctx, log, threads } = this.opts;
    const signal = version.abort.signal;
    const started = performance.now();
    try {
      const confine = this.confineOpened;
      const blocks = this.pool;
      // Each file is hashed as soon as it is readable, while the others pin (pin.ts).
      const hashes: string[][] = [];
      let pinnedAt = started;
      const onReadable = async (i: number, pinned: PinnedFile) => {
        if (i === inspected.length - 1) pinnedAt = performance.now();
        if (pinned.hashes) {
          hashes[i] = pinned.hashes; // a copy, hashed as it was read
          return;
        }
        const tensors = (inspected[i] as InspectedFile).header.tensors;
        const [mine] = await hashTensors(ctx, [{ pinned, tensors }], {
          threads,
          signal,
          progress: version.progress,
        }).catch((err) => {
          const fault = faultedFile(err, [pinned]);
          throw fault
            ? new Error(`${fault.file} was truncated while it was hashed (bus error at byte ${fault.offset})`)
            : err;
        });
        hashes[i] = mine as string[];
      };
      version.pinned = await pinFiles(ctx, inspected, {
        copy,
        blocks,
        threads,
        signal,
        progress: version.progress,
        confine,
        onReadable,
        onReleaseFailure: (err) => log.error({ err }, "unpinning a failed registration"),
      });
      version.tensors = inspected.flatMap((f, file) =>
        f.header.tensors.map((t, i) => ({
          name: t.name,
          dtype: t.dtype,
          shape: t.shape,
          bytes: t.end - t.begin,
          file,
          offset: t.begin,
          hash: hashes[file]?.[i] as string,
        })),
      );
      if (signal.aborted) throw new DaemonError("cancelled", "registration was cancelled");
      if (expected) checkHashes(version.tensors, expected);
      version.state = "ready";
      version.unwatch = watchFiles(version.files, () => this.recheck(version));
      // hashSeconds: the hashing left once the last file was pinned (the rest overlapped pinning).
      version.timings = { pinSeconds: (pinnedAt - started) / 1000, hashSeconds: (performance.now() - pinnedAt) / 1000 };
      log.info({ checkpoint: version.id, bytes: version.bytes, ...version.timings }, "checkpoint registered");
    } catch (err) {
      await unpinFiles(ctx, version.pinned).catch((e) => log.error({ err: e }, "unpinning a failed registration"));
      version.pinned = [];
      version.state = "failed";
      version.error =
        err instanceof DaemonError
          ? { code: err.code, message: err.message, ...(err.details ? { details: err.details } : {}) }
          : { code: "registration_failed", message: (err as Error).message };
      log.warn({ checkpoint: version.id, error: version.error }, "registration failed");
      return;
    }
    // The version is ready (and may already be leased): housekeeping failures are only logged.
    await this.readied(version);
  }

  /**
   * Drops the versions of `name` older than its newest maxVersions, oldest first, but those in
   * use (leased) or held by an engine: they stay until a later version is ready and they are
   * neither. The newest are never dropped, so a leased or held old version cannot make room by
   * taking the one just registered.
   */
  private async evictOld(name: string): Promise<boolean> {
    const ready = (this.versions.get(name) ?? [])
      .filter((v) => v.state === "ready" || v.state === "stale")
      .sort((a, b) => a.version - b.version);
    let dropped = false;
    for (const v of ready.slice(0, Math.max(0, ready.length - this.opts.maxVersions))) {
      if (v.leases > 0 || this.holders(v.id).length > 0) continue;
      await this.drop(v);
      dropped = true;
      this.opts.log.info({ checkpoint: v.id, maxVersions: this.opts.maxVersions }, "dropped an old version");
    }
    return dropped;
  }

  /** After an update: drops what maxVersions kept of `name` only because it was used or held. */
  async updated(name: string): Promise<void> {
    const { log } = this.opts;
    const dropped = await this.evictOld(name).catch((err) => log.error({ err }, "dropping old versions"));
    if (dropped) await this.opts.onChange?.(this).catch((err) => log.error({ err }, "saving the registry"));
  }

  /** Releases a version's memory, deletes adopted files and forgets it. */
  private async drop(version: CheckpointVersion): Promise<void> {
    const list = this.versions.get(version.name) ?? [];
    this.versions.set(
      version.name,
      list.filter((v) => v !== version),
    );
    version.unwatch();
    await this.dropped(version);
    await unpinFiles(this.opts.ctx, version.pinned, this.pool);
    // Without a budget the pool keeps one version's worth (the largest seen), no more.
    if (this.opts.budgetBytes === 0) await this.pool.trim(this.largest);
    version.pinned = [];
    for (const file of version.files) {
      if (file.adopted && !replaced(file)) await this.removeAdopted(file.path);
    }
  }

  /** Deletes an adopted file, unless it became one the daemon may not delete since it was registered. */
  private async removeAdopted(path: string): Promise<void> {
    if (!(await lstat(path).catch(() => undefined))) return; // already gone
    const why = await this.opts.files.whyNotAdoptable(path);
    if (why === undefined) await unlink(path).catch(() => undefined);
    else this.opts.log.warn({ file: path, why }, "adopted file left in place");
  }

  /**
   * Deletes "name@N" (cancelling it if still registering) or every version of "name".
   * 409, and nothing deleted, while an update uses any of them or an engine holds one (the
   * message names the holders).
   */
  async delete(ref: string): Promise<CheckpointVersion[]> {
    const { name, version } = parseRef(ref);
    const targets = version === undefined ? [...(this.versions.get(name) ?? [])] : [this.get(ref)];
    if (targets.length === 0) throw new DaemonError("not_found", `no checkpoint "${name}"`);
    const busy = targets.filter((v) => v.leases > 0 || v.deleting);
    if (busy.length > 0) {
      throw new DaemonError(
        "in_use",
        `${busy.map((v) => v.id).join(", ")} is in use (by an update, or a pull or push copying from it)`,
      );
    }
    const held = targets.map((v) => ({ id: v.id, by: this.holders(v.id) })).filter((h) => h.by.length > 0);
    if (held.length > 0) {
      const who = held.map((h) => `${h.id} is held by ${h.by.join(", ")}`).join("; ");
      throw new DaemonError("in_use", `${who}: update them to another version first`, { held });
    }
    // Marked before the first await, so no update can lease what is about to be freed.
    for (const v of targets) v.deleting = true;
    for (const v of targets) {
      if (v.state === "registering") {
        v.abort.abort();
        await v.done;
      }
      await this.drop(v);
    }
    await this.opts.onChange?.(this);
    return targets;
  }

  /** Drops everything (shutdown). */
  async close(): Promise<void> {
    // Every registration, pull and push ends first: a pull may be copying from another version.
    const all = this.list();
    for (const v of all) v.abort.abort();
    await Promise.all(all.map((v) => v.done));
    for (const v of all) {
      const list = this.versions.get(v.name) ?? [];
      this.versions.set(
        v.name,
        list.filter((x) => x !== v),
      );
      v.unwatch();
      await this.dropped(v);
      await unpinFiles(this.opts.ctx, v.pinned);
    }
    await this.pool.close();
  }
}
