/**
 * The data-plane side of registration: read and check headers, pin the files (in place on
 * tmpfs, else read into pinned memory), hash every tensor. Bytes move only in libckpt;
 * this file decides what and in which order, reports progress and unwinds on failure.
 */
import { type FileHandle, open, statfs } from "node:fs/promises";
import { type Context, HostMemory } from "../../ffi/index.ts";
import { DaemonError } from "../errors.ts";
import { type Header, headerLength, parseHeader, SafetensorsError } from "./safetensors.ts";

const TMPFS_MAGIC = 0x01021994;
/** Bytes read per call when copying a file into pinned memory: the unit of progress and cancel. */
const READ_CHUNK = 1 << 30;

export interface InspectedFile {
  path: string;
  size: number;
  mtimeMs: number;
  /** Status change time: moves on every write, and cannot be set back as mtime can. */
  ctimeMs: number;
  /** Inode and device, so that a file replaced under the same path is told apart. */
  ino: number;
  dev: number;
  tmpfs: boolean;
  /** The first dataStart bytes, to check the pinned copy against. */
  prefix: Uint8Array;
  header: Header;
}

export interface PinnedFile {
  path: string;
  size: number;
  mtimeMs: number;
  inPlace: boolean;
  /** The file's bytes (its size; a pooled block may be larger). */
  mem: HostMemory;
  /** The pooled block holding them, when not in place: it goes back to the pool. */
  block?: HostMemory;
  /** A copy's tensor hashes (header order), computed as it was read. */
  hashes?: string[];
}

/** Where copies get pinned memory and give it back (checkpoints/pool.ts). */
export interface Blocks {
  take(len: number): Promise<HostMemory>;
  give(block: HostMemory): Promise<void> | void;
}

/** Blocks pinned for each copy and unpinned after it (no pool). */
export function unpooled(ctx: Context): Blocks {
  return { take: (len) => ctx.hostAlloc(len), give: (block) => ctx.hostFree(block) };
}

/** How far a registration has come, in bytes; reported while it runs. */
export interface RegistrationProgress {
  bytesTotal: number;
  bytesPinned: number;
  bytesHashed: number;
}

/**
 * Checks an opened file: where it really is (given its /proc/self/fd path; the path a caller
 * named may be swapped for a symlink between a check and an open, so every open is checked
 * through its descriptor, and the data plane opens that descriptor, not the path), and, by
 * its stat, whether the daemon may read it for whoever asked.
 */
export type Confine = (fdPath: string, path: string, st: { uid: number; gid: number; mode: number }) => Promise<void>;

/** Opens `path` once, checks the open file with `confine`, runs `fn` on its /proc/self/fd path. */
async function withOpened<T>(
  path: string,
  confine: Confine | undefined,
  fn: (handle: FileHandle, fdPath: string) => Promise<T>,
): Promise<T> {
  const handle = await open(path, "r");
  try {
    const fdPath = `/proc/self/fd/${handle.fd}`;
    if (confine) await confine(fdPath, path, await handle.stat());
    return await fn(handle, fdPath);
  } finally {
    await handle.close();
  }
}

export interface PinOptions {
  /** Copy into pinned memory even when the file is on tmpfs. */
  copy: boolean;
  /** Where copies' pinned memory comes from (default: pinned for each copy, unpinned after). */
  blocks?: Blocks;
  /** Where opened files may be (the registry's FilePolicy). */
  confine?: Confine;
  threads: number;
  signal: AbortSignal;
  progress: RegistrationProgress;
  /**
   * Work on each file once its bytes are readable (hashing it). In place: before the file is
   * pinned, while the previous one pins; reading it faults its pages in on many threads,
   * which pinning would otherwise do on one. A copy: once read, while the next one reads.
   * pinFiles returns, or unwinds, only once every such work has settled.
   */
  onReadable?: (index: number, file: PinnedFile) => Promise<void>;
  /** Told when releasing what a failed pinFiles pinned failed too (the first failure is what it throws). */
  onReleaseFailure?: (err: unknown) => void;
}

async function onTmpfs(path: string): Promise<boolean> {
  try {
    return (await statfs(path)).type === TMPFS_MAGIC;
  } catch {
    return path.startsWith("/dev/shm/");
  }
}

/** A broken format rule as the API reports it: a 400 naming the file, the tensor and the rule. */
export function invalidSafetensors(err: SafetensorsError): DaemonError {
  return new DaemonError("invalid_safetensors", err.message, { file: err.file, tensor: err.tensor, rule: err.rule });
}

/** Reads and checks one file's header; a broken rule is a 400 naming file, tensor and rule. */
export async function inspectFile(path: string, confine?: Confine): Promise<InspectedFile> {
  return withOpened(path, confine, (handle) => inspectOpened(path, handle));
}

async function inspectOpened(path: string, handle: FileHandle): Promise<InspectedFile> {
  try {
    const st = await handle.stat();
    const head = new Uint8Array(8);
    await handle.read(head, 0, 8, 0);
    const len = headerLength(head, st.size, path);
    const prefix = new Uint8Array(8 + len);
    const { bytesRead } = await handle.read(prefix, 0, prefix.byteLength, 0);
    if (bytesRead !== prefix.byteLength) throw new SafetensorsError(path, undefined, "header is truncated");
    const header = parseHeader(prefix, st.size, path);
    const tmpfs = await onTmpfs(path);
    const { size, mtimeMs, ctimeMs, ino, dev } = st;
    return { path, size, mtimeMs, ctimeMs, ino, dev, tmpfs, prefix, header };
  } catch (err) {
    if (err instanceof SafetensorsError) throw invalidSafetensors(err);
    throw err;
  }
}

function checkAborted(signal: AbortSignal): void {
  if (signal.aborted) throw new DaemonError("cancelled", "registration was cancelled");
}

async function release(ctx: Context, file: PinnedFile, blocks: Blocks): Promise<void> {
  if (file.block) return await blocks.give(file.block);
  await ctx.hostUnregister(file.mem).catch(() => undefined);
  await ctx.fileUnmap(file.mem);
}

/** Releases what pinFiles pinned (copies' blocks go back to the pool); one failure does not keep the others. */
export async function unpinFiles(ctx: Context, files: PinnedFile[], blocks = unpooled(ctx)): Promise<void> {
  let first: unknown;
  // A pull pins its files in parallel: one that failed leaves a hole.
  for (const file of files) if (file) await release(ctx, file, blocks).catch((err) => (first ??= err));
  if (first) throw first;
}

/** Maps or reads one file (opened and checked again): readable, not pinned yet if in place. */
async function readable(ctx: Context, file: InspectedFile, opts: PinOptions): Promise<PinnedFile> {
  return withOpened(file.path, opts.confine, async (handle, fdPath) => {
    const st = await handle.stat();
    if (st.ino !== file.ino || st.dev !== file.dev) throw new Error(`${file.path} was replaced while registering`);
    return file.tmpfs && !opts.copy ? mapInPlace(ctx, file, fdPath) : readIntoBlock(ctx, file, fdPath, opts);
  });
}

/** Maps the file open at `fdPath` (its /proc/self/fd path) where it lies; pinned later (pinInPlace). */
async function mapInPlace(ctx: Context, file: InspectedFile, fdPath: string): Promise<PinnedFile> {
  const mem = await ctx.fileMap(fdPath);
  if (mem.len !== file.size) {
    await ctx.fileUnmap(mem);
    throw new Error(`${file.path} changed size while registering`);
  }
  return { path: file.path, size: file.size, mtimeMs: file.mtimeMs, inPlace: true, mem };
}

async function pinInPlace(ctx: Context, file: PinnedFile, progress: RegistrationProgress): Promise<void> {
  await ctx.hostRegister(file.mem.address, file.mem.len, true);
  progress.bytesPinned += file.size;
}

/**
 * Reads the file open at `fdPath` into a pinned block, hashing its tensors as they land, in
 * pieces of whole tensors of about READ_CHUNK bytes (the unit of progress and cancel).
 */
async function readIntoBlock(ctx: Context, file: InspectedFile, fdPath: string, opts: PinOptions): Promise<PinnedFile> {
  const blocks = opts.blocks ?? unpooled(ctx);
  const block = await blocks.take(file.size);
  const mem = new HostMemory(block.address, file.size);
  const hashes: string[] = [];
  try {
    for (const piece of readPieces(file)) {
      checkAborted(opts.signal);
      const ranges = new BigUint64Array(
        piece.tensors.flatMap((i) => {
          const t = file.header.tensors[i] as { begin: number; end: number };
          return [BigInt(t.begin), BigInt(t.end - t.begin)];
        }),
      );
      const len = piece.end - piece.begin;
      const got = await ctx.fileReadHash(
        fdPath,
        piece.begin,
        len,
        mem.address + BigInt(piece.begin),
        ranges,
        opts.threads,
      );
      piece.tensors.forEach((i, k) => {
        hashes[i] = (got[k] as bigint).toString(16).padStart(16, "0");
      });
      opts.progress.bytesPinned += len;
      opts.progress.bytesHashed += len;
    }
  } catch (err) {
    await ctx.hostFree(block); // a failure leaves nothing pinned, not even in the pool
    throw err;
  }
  return { path: file.path, size: file.size, mtimeMs: file.mtimeMs, inPlace: false, mem, block, hashes };
}

/** The file cut between tensors into pieces of READ_CHUNK bytes or more: each piece's span and tensors (header indices). */
export function readPieces(file: { size: number; header: { tensors: { begin: number; end: number }[] } }) {
  const order = file.header.tensors.map((t, i) => ({ ...t, i })).sort((a, b) => a.begin - b.begin);
  const pieces: { begin: number; end: number; tensors: number[] }[] = [];
  let current = { begin: 0, end: 0, tensors: [] as number[] };
  for (const t of order) {
    current.tensors.push(t.i);
    current.end = t.end;
    if (current.end - current.begin >= READ_CHUNK) {
      pieces.push(current);
      current = { begin: current.end, end: current.end, tensors: [] };
    }
  }
  const last = pieces.at(-1);
  if (last && current.tensors.length === 0)
    last.end = file.size; // only padding is left
  else pieces.push({ ...current, end: file.size });
  return pieces;
}

/**
 * Pins every file, in order, running opts.onReadable's work on each (see there); on a failure
 * or cancel of either, waits for that work and the pinning in flight, releases what it
 * pinned and rethrows.
 */
export async function pinFiles(ctx: Context, files: InspectedFile[], opts: PinOptions): Promise<PinnedFile[]> {
  const pinned: PinnedFile[] = [];
  const started: Promise<void>[] = [];
  // The first failure of that work or of a pinning, caught as it happens (never an unhandled
  // rejection), stops the files after it.
  let failed: { err: unknown } | undefined;
  const caught = (work: Promise<void>) =>
    work.catch((err) => {
      failed ??= { err };
    });
  const stopIfFailed = () => {
    if (failed) throw failed.err;
  };
  let pinning: Promise<void> = Promise.resolve(); // the previous in-place file's
  try {
    for (const file of files) {
      checkAborted(opts.signal);
      stopIfFailed();
      const p = await readable(ctx, file, opts);
      pinned.push(p);
      // The header was checked before; the mapped or read bytes must still be that header.
      // Read through the library: a file truncated under its mapping by now would fault.
      const head = await ctx.hostRead(p.mem, file.prefix.byteLength).catch((err: Error) => {
        throw new Error(`${file.path} was truncated while registering: ${err.message}`);
      });
      if (Buffer.compare(head, file.prefix) !== 0) throw new Error(`${file.path} changed while registering`);
      const work = opts.onReadable?.(pinned.length - 1, p) ?? Promise.resolve();
      if (!p.inPlace) {
        started.push(caught(work));
        continue;
      }
      await work; // its pages are mapped now: pinning them is the driver's work alone
      await pinning;
      stopIfFailed();
      pinning = caught(pinInPlace(ctx, p, opts.progress));
    }
    await pinning;
    await Promise.all(started);
    stopIfFailed();
    return pinned;
  } catch (err) {
    await Promise.allSettled([...started, pinning]); // nothing may still read the memory about to be released
    // Unpinned, not pooled: a failure leaves nothing pinned.
    await unpinFiles(ctx, pinned).catch((e) => opts.onReleaseFailure?.(e));
    throw err;
  }
}

/**
 * The ckpt hash of every tensor of every file in one call (the threads balance best over all
 * tensors at once), with the bytes hashed so far in progress; as 16 hex digits, per file.
 */
export async function hashTensors(
  ctx: Context,
  files: { pinned: PinnedFile; tensors: { begin: number; end: number }[] }[],
  opts: { threads: number; signal: AbortSignal; progress: RegistrationProgress },
): Promise<string[][]> {
  checkAborted(opts.signal);
  const count = files.reduce((n, f) => n + f.tensors.length, 0);
  const ranges = new BigUint64Array(count * 2);
  let k = 0;
  for (const { pinned, tensors } of files) {
    for (const t of tensors) {
      ranges[k++] = pinned.mem.address + BigInt(t.begin);
      ranges[k++] = BigInt(t.end - t.begin);
    }
  }
  // Header bytes are not hashed; progress counts them as done so it ends at bytesTotal. Calls
  // may run at once (a file each): each adds what it hashed since it last said.
  const headers =
    files.reduce((n, f) => n + f.pinned.size, 0) -
    files.reduce((n, f) => n + f.tensors.reduce((m, t) => m + t.end - t.begin, 0), 0);
  let said = 0;
  const say = (done: number) => {
    opts.progress.bytesHashed += done - said;
    said = done;
  };
  const hashes = await ctx.hash(ranges, opts.threads, (bytes) => say(headers + bytes));
  say(headers + Number(ranges.reduce((n, x, k) => (k % 2 ? n + x : n), 0n))); // hash says nothing for a file without tensors
  const hex = [...hashes].map((h) => h.toString(16).padStart(16, "0"));
  let at = 0;
  return files.map((f) => {
    const mine = hex.slice(at, at + f.tensors.length);
    at += f.tensors.length;
    return mine;
  });
}
