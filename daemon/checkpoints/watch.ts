/**
 * Files changing underneath a registered version. A version pinned in place copies straight
 * from its files' pages, so a file truncated, replaced or rewritten after registration means
 * the engines would get bytes that are not the manifest's, or (truncated) a bus error in the
 * copy. Before every update, and after its copies, each in-place file is stat'ed and compared
 * with what was registered; a difference makes the version `stale`. A bus error the data plane
 * reports anyway (truncated between the check and the copy) becomes an error naming the file.
 * Where inotify is there (fs.watch, under Node and Deno) a change is noticed sooner, without
 * waiting for an update. A write(2) whose mtime is put back afterwards still moves the status
 * change time (ctime), which no one can set. Writes through a shared mapping change neither
 * and raise no inotify event: only the hashes catch those.
 */
import { type FSWatcher, statSync, watch } from "node:fs";
import { CKPT_EFAULT, CkptError } from "../../ffi/index.ts";
import { DaemonError } from "../errors.ts";

/** What the registry kept of a file when it was registered (the FileRecord fields used here). */
export interface RegisteredFile {
  path: string;
  size: number;
  mtimeMs: number;
  /** Inode, device and status change time; absent in records made before they were kept (then not compared). */
  ino?: number;
  dev?: number;
  ctimeMs?: number;
  inPlace: boolean;
}

/** A stat of the path now, or why it could not be made (an errno code such as ENOENT). */
export type Observed = { size: number; mtimeMs: number; ctimeMs: number; ino: number; dev: number } | { error: string };

const at = (ms: number) => new Date(ms).toISOString();

/** Why a file is no longer the one registered; undefined while it is. Pure. */
export function staleReason(file: RegisteredFile, now: Observed): string | undefined {
  if ("error" in now) {
    return now.error === "ENOENT" ? "was removed" : `cannot be stat'ed (${now.error})`;
  }
  if ((file.ino !== undefined && now.ino !== file.ino) || (file.dev !== undefined && now.dev !== file.dev)) {
    return `was replaced by another file (inode ${now.ino}, registered ${file.ino})`;
  }
  if (now.size < file.size) return `was truncated to ${now.size} bytes (registered with ${file.size})`;
  if (now.size > file.size) return `grew to ${now.size} bytes (registered with ${file.size})`;
  if (now.mtimeMs !== file.mtimeMs) {
    return `was modified at ${at(now.mtimeMs)} (registered at ${at(file.mtimeMs)})`;
  }
  // A write whose modification time was put back (touch -r, rsync -t) still moves this one.
  if (file.ctimeMs !== undefined && now.ctimeMs !== file.ctimeMs) {
    return `was changed at ${at(now.ctimeMs)} (its status change time; registered at ${at(file.ctimeMs)}): written with its modification time put back, or its mode or owner changed`;
  }
  return undefined;
}

/** The first in-place file that changed and why, given a stat per file; undefined if none. Pure. */
export function firstStale(
  files: readonly RegisteredFile[],
  observed: readonly Observed[],
): { file: string; reason: string } | undefined {
  for (const [i, file] of files.entries()) {
    if (!file.inPlace) continue; // copied into pinned memory: later changes cannot reach it
    const reason = staleReason(file, observed[i] ?? { error: "ENOENT" });
    if (reason) return { file: file.path, reason };
  }
  return undefined;
}

/** Stats a path (following links, as registration did). */
export function observe(path: string): Observed {
  try {
    const st = statSync(path);
    return { size: st.size, mtimeMs: st.mtimeMs, ctimeMs: st.ctimeMs, ino: st.ino, dev: st.dev };
  } catch (err) {
    return { error: (err as NodeJS.ErrnoException).code ?? String(err) };
  }
}

/** Stats every in-place file of a version (microseconds each on tmpfs) and decides. */
export function checkFiles(files: readonly RegisteredFile[]): { file: string; reason: string } | undefined {
  return firstStale(
    files,
    files.map((f) => (f.inPlace ? observe(f.path) : { error: "not checked" })),
  );
}

/** A pinned file's mapping, to find which file a faulting address lies in. */
export interface MappedFile {
  path: string;
  mem: { address: bigint; len: number };
}

/** The file whose mapping holds the faulting address of a CKPT_EFAULT detail ("bus error at 0x..."). Pure. */
export function faultedFile(
  err: unknown,
  files: readonly MappedFile[],
): { file: string; offset: number; detail: string } | undefined {
  if (!(err instanceof CkptError) || err.code !== CKPT_EFAULT) return undefined;
  const m = /bus error at (0x[0-9a-f]+)/.exec(err.detail);
  if (!m) return undefined;
  const addr = BigInt(m[1] as string);
  for (const f of files) {
    if (f && addr >= f.mem.address && addr < f.mem.address + BigInt(f.mem.len)) {
      return { file: f.path, offset: Number(addr - f.mem.address), detail: err.detail };
    }
  }
  return undefined;
}

/** Whether the path now names another file than the one registered (dropping an adopted file then deletes nothing). */
export function replaced(file: RegisteredFile): boolean {
  const now = observe(file.path);
  return !("error" in now) && file.ino !== undefined && (now.ino !== file.ino || now.dev !== file.dev);
}

/**
 * An update's failure as it reports it: a copy that faulted on one of the version's files
 * (truncated after the check) names the file and marks the version stale; others as they are.
 */
export function changedUnderneath(
  version: { pinned: readonly MappedFile[]; markStale(file: string, reason: string): void },
  err: unknown,
): unknown {
  const fault = faultedFile(err, version.pinned);
  if (!fault) return err;
  const reason = `was truncated under its mapping while an update copied it (bus error at byte ${fault.offset})`;
  version.markStale(fault.file, reason);
  return new DaemonError("stale", `${fault.file} ${reason}`, { file: fault.file, reason });
}

/**
 * Calls onEvent whenever inotify reports something on one of the in-place files (the caller
 * checks them again: an event is a hint, the stat decides). Returns what stops watching. A
 * file that cannot be watched is skipped: the check before each update still covers it.
 */
export function watchFiles(files: readonly RegisteredFile[], onEvent: () => void): () => void {
  const watchers: FSWatcher[] = [];
  for (const f of files) {
    if (!f.inPlace) continue;
    try {
      const w = watch(f.path, { persistent: false }, onEvent);
      w.on("error", () => w.close());
      watchers.push(w);
    } catch {
      // no inotify (or no such file any more): the check before each update remains
    }
  }
  return () => {
    for (const w of watchers.splice(0)) w.close();
  };
}

/**
 * After an update's copies, before the engines are told to apply them: throws, the version
 * marked stale, when one of its in-place files changed while they ran (the engines then get
 * `abort` instead of `end`; bytes rewritten without a new size or mtime still pass).
 */
export function assertUnchanged(version: {
  state: string;
  files: readonly RegisteredFile[];
  error?: { message: string; details?: unknown };
  markStale(file: string, reason: string): void;
}): void {
  const changed = version.state === "ready" ? checkFiles(version.files) : undefined;
  if (changed) version.markStale(changed.file, changed.reason);
  if (version.state !== "stale") return;
  const why = version.error?.message ?? "a file changed";
  throw new DaemonError("stale", `${why} while the update copied it`, version.error?.details);
}
