/**
 * The upload directory is the daemon's own: made by it 0700 (01770 with the upload group),
 * refused at start when someone else owns it or may write to it beyond that (they could
 * swap a staged file before commit), and swept of staging files no upload owns.
 */
import { existsSync } from "node:fs";
import { lstat, readdir, realpath, unlink } from "node:fs/promises";
import { join } from "node:path";
import { ConfigError } from "../config/index.ts";
import { prepareOwnDir } from "../config/own-dir.ts";
import { FilePolicy, type Group, lookupGroup } from "./confine.ts";

/** The daemon's staging files: `<upload id>-<file>.safetensors` (see uploads.ts). */
export const STAGING_FILE = /^[0-9a-f]{16}-[A-Za-z0-9._-]+\.safetensors$/;

/** The default upload directory: per node, so two daemons of a host never share one. */
export function defaultUploadDir(nodeId: string, stateDir: string, shm: string | undefined): string {
  return shm ? join(shm, `ckptd-${nodeId}`) : join(stateDir, "uploads");
}

/**
 * Makes the upload directory, or checks the one there (see own-dir.ts): sticky and shared
 * with `group` when given, so that members may add files but not rename or remove the
 * daemon's.
 */
export function prepareUploadDir(dir: string, uid: number, group?: Group): Promise<void> {
  const mode = group ? 0o1770 : 0o700;
  return prepareOwnDir({ key: "uploadDir", dir, uid, mode, gid: group?.gid, groupKey: "uploadGroup" });
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
  /** The upload group, whose members may write the staging areas' files. */
  group?: Group;
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
  return { dir, uid, files, ...(group ? { group } : {}), orphansRemoved: [] };
}
