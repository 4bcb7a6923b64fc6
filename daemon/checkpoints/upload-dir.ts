/**
 * The upload directory is the daemon's own: made by it 0700 (01770 with the upload group),
 * refused at start when someone else owns it or may write to it beyond that (they could
 * swap a staged file before commit), and swept of staging files no upload owns.
 */
import { existsSync } from "node:fs";
import { chmod, chown, lstat, mkdir, readdir, realpath, stat, unlink } from "node:fs/promises";
import { dirname, join } from "node:path";
import { ConfigError } from "../config/index.ts";
import { FilePolicy, type Group, lookupGroup } from "./confine.ts";

/** The daemon's staging files: `<upload id>-<file>.safetensors` (see uploads.ts). */
export const STAGING_FILE = /^[0-9a-f]{16}-[A-Za-z0-9._-]+\.safetensors$/;

/** The default upload directory: per node, so two daemons of a host never share one. */
export function defaultUploadDir(nodeId: string, stateDir: string, shm: string | undefined): string {
  return shm ? join(shm, `ckptd-${nodeId}`) : join(stateDir, "uploads");
}

/**
 * Makes the upload directory, or checks the one there: a directory (not a symlink) owned
 * by `uid`, writable by no one but its owner (and `group`, when given). Throws ConfigError
 * naming the directory and what is wrong, so the daemon stops at start (exit 2).
 */
export async function prepareUploadDir(dir: string, uid: number, group?: Group): Promise<void> {
  const refuse = (why: string): never => {
    throw new ConfigError(`uploadDir ${dir}: ${why}; remove it or choose another uploadDir`);
  };
  // Sticky with a group: members may add files but not rename or remove the daemon's.
  const mode = group ? 0o1770 : 0o700;
  await mkdir(dirname(dir), { recursive: true, mode: 0o755 });
  // Whoever may write to a directory above it could rename it away and put theirs in its place.
  for (let up = dirname(dir); ; up = dirname(up)) {
    const above = await stat(up);
    if ((above.uid !== uid && above.uid !== 0) || (above.mode & 0o022 && !(above.mode & 0o1000))) {
      refuse(`is in ${up}, which others may write to (and is not sticky)`);
    }
    if (up === dirname(up)) break;
  }
  let made = true;
  try {
    await mkdir(dir, { mode });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EEXIST") refuse(`cannot create it: ${(err as Error).message}`);
    made = false;
  }
  const st = await lstat(dir);
  if (st.isSymbolicLink()) refuse("is a symlink");
  if (!st.isDirectory()) refuse("is not a directory");
  if (st.uid !== uid) refuse(`is owned by uid ${st.uid}, not by the daemon's user (uid ${uid})`);
  const writers = st.mode & 0o022;
  if (writers & 0o002) refuse(`is writable by every user (mode ${(st.mode & 0o7777).toString(8)})`);
  if (writers & 0o020 && (!group || st.gid !== group.gid)) {
    refuse(`is writable by group ${st.gid}, which is not uploadGroup (mode ${(st.mode & 0o7777).toString(8)})`);
  }
  // The daemon's own directory: it sets the mode it wants (mkdir's is cut by the umask).
  if (group) await chown(dir, uid, group.gid);
  if (made || group) await chmod(dir, mode);
}

/** A staging file removed at start, with its size. */
export interface Orphan {
  file: string;
  bytes: number;
}

/**
 * Removes the daemon's staging files in `dir` that no version holds (`kept`): uploads do not
 * survive a restart, so what they staged before it is nobody's. Files of other names, or
 * not the daemon's own, are left alone.
 */
export async function removeOrphans(dir: string, uid: number, kept: Set<string>): Promise<Orphan[]> {
  const removed: Orphan[] = [];
  for (const name of await readdir(dir)) {
    const file = join(dir, name);
    if (!STAGING_FILE.test(name) || kept.has(file)) continue;
    const st = await lstat(file).catch(() => undefined);
    if (!st?.isFile() || st.uid !== uid) continue;
    await unlink(file);
    removed.push({ file, bytes: st.size });
  }
  return removed;
}

/** The upload directory, the rules for registered files, and what the start removed. */
export interface UploadArea {
  dir: string;
  /** The daemon's user: the owner of the directory and of its staging files. */
  uid: number;
  files: FilePolicy;
  orphansRemoved: Orphan[];
}

/**
 * Resolves the upload group, makes or checks the upload directory and sets the file rules;
 * a missing group or a directory not the daemon's own is a ConfigError (exit 2).
 */
export async function openUploadArea(
  config: { uploadDir: string; uploadGroup: string; registerRoots: string[]; stateDir: string },
  nodeId: string,
): Promise<UploadArea> {
  const uid = process.getuid?.() ?? 0;
  let group: Group | undefined;
  if (config.uploadGroup) {
    group = await lookupGroup(config.uploadGroup);
    if (!group) throw new ConfigError(`uploadGroup: no group "${config.uploadGroup}" in /etc/group`);
  }
  const wanted =
    config.uploadDir || defaultUploadDir(nodeId, config.stateDir, existsSync("/dev/shm") ? "/dev/shm" : undefined);
  await prepareUploadDir(wanted, uid, group);
  // Adopted files must be named by their real path (confine.ts): the directory's is used.
  const dir = await realpath(wanted);
  const files = new FilePolicy({ roots: config.registerRoots, uploadDir: dir, uploadGroup: group, uid });
  return { dir, uid, files, orphansRemoved: [] };
}
