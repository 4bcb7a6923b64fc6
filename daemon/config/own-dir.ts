/**
 * Directories the configuration names that must be the daemon's own (the upload directory,
 * the engines' socket directory): made by it with the mode it wants, or refused at start
 * when someone else owns one, may write to it beyond its group, or may swap it (exit 2).
 */
import { chmod, chown, lstat, mkdir, stat } from "node:fs/promises";
import { dirname } from "node:path";
import { ConfigError } from "./load.ts";

export interface OwnDir {
  /** The configuration key that names it, for the error. */
  key: string;
  dir: string;
  /** The daemon's user. */
  uid: number;
  /** The mode it must have (group bits only with `gid`). */
  mode: number;
  /** The group it is shared with, if any, and the key that names that group. */
  gid?: number;
  groupKey: string;
}

/**
 * Makes `dir`, or checks the one there: a directory (not a symlink) owned by `uid`, writable
 * by no one but its owner (and `gid`, when given), below directories only the daemon or root
 * may change (or sticky ones). Throws ConfigError naming the key, the directory and what is
 * wrong.
 */
export async function prepareOwnDir({ key, dir, uid, mode, gid, groupKey }: OwnDir): Promise<void> {
  const refuse = (why: string): never => {
    throw new ConfigError(`${key} ${dir}: ${why}; remove it or choose another ${key}`);
  };
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
    await mkdir(dir, { mode: 0o700 });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EEXIST") refuse(`cannot create it: ${(err as Error).message}`);
    made = false;
  }
  const st = await lstat(dir);
  if (st.isSymbolicLink()) refuse("is a symlink");
  if (!st.isDirectory()) refuse("is not a directory");
  if (st.uid !== uid) refuse(`is owned by uid ${st.uid}, not by the daemon's user (uid ${uid})`);
  const writers = st.mode & 0o022;
  const octal = (st.mode & 0o7777).toString(8);
  if (writers & 0o002) refuse(`is writable by every user (mode ${octal})`);
  if (writers & 0o020 && st.gid !== gid) {
    refuse(`is writable by group ${st.gid}, which is not ${groupKey} (mode ${octal})`);
  }
  if (writers & 0o020 && !(mode & 0o020))
    refuse(`is writable by ${groupKey} (mode ${octal}), which may not write there`);
  // The daemon's own directory: it sets the mode it wants (mkdir's is cut by the umask).
  if (gid !== undefined) await chown(dir, uid, gid);
  if (made || gid !== undefined || (st.mode & 0o7777) !== mode) await chmod(dir, mode);
}
