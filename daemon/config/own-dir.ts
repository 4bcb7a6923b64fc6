/**
 * Directories the configuration names that must be the daemon's own (the upload directory,
 * the engines' socket directory): made by it with the mode it wants, or refused at start
 * when someone else owns one, may write to it beyond its group, or may swap it (exit 2).
 */
import type { Stats } from "node:fs";
import { chmod, chown, lstat, mkdir, realpath, stat } from "node:fs/promises";
import { dirname, isAbsolute } from "node:path";
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

/** Why a directory above ours lets someone other than the daemon or root swap what is below it. */
function unsafe(st: Stats, uid: number): string | undefined {
  if (st.uid !== uid && st.uid !== 0) return `is owned by uid ${st.uid}`;
  if (st.mode & 0o022 && !(st.mode & 0o1000)) return "others may write to (and is not sticky)";
  return undefined;
}

/** "/", "/a", "/a/b" for "/a/b". */
function prefixes(path: string): string[] {
  const parts = path.split("/").filter(Boolean);
  return ["/", ...parts.map((_, i) => `/${parts.slice(0, i + 1).join("/")}`)];
}

/**
 * Whoever may change a directory above `dir` could rename it away and put theirs in its
 * place; whoever owns a symlink on the way could point it elsewhere. Checks the path as named
 * (lstat: symlinks must be root's or the daemon's) up to the first missing part, then makes
 * the missing parents and checks where the path really leads.
 */
async function checkAbove(dir: string, uid: number, refuse: (why: string) => never): Promise<void> {
  for (const up of prefixes(dirname(dir))) {
    const st = await lstat(up).catch(() => undefined);
    if (!st) break; // made below, by the daemon
    if (st.isSymbolicLink()) {
      if (st.uid !== uid && st.uid !== 0) refuse(`is reached through the symlink ${up}, owned by uid ${st.uid}`);
      continue;
    }
    const why = unsafe(st, uid);
    if (why) refuse(`is in ${up}, which ${why}`);
  }
  await mkdir(dirname(dir), { recursive: true, mode: 0o755 });
  for (const up of prefixes(await realpath(dirname(dir)))) {
    const why = unsafe(await stat(up), uid);
    if (why) refuse(`leads through ${up}, which ${why}`);
  }
}

/**
 * Makes `dir`, or checks the one there: an absolute path to a directory (not a symlink) owned
 * by `uid`, writable by no one but its owner (and `gid`, when given), below directories only
 * the daemon or root may change (or sticky ones). A directory it makes, or shares with `gid`,
 * gets `mode`; one that was there keeps its own. Throws ConfigError naming the key, the
 * directory and what is wrong.
 */
export async function prepareOwnDir({ key, dir, uid, mode, gid, groupKey }: OwnDir): Promise<void> {
  const refuse = (why: string): never => {
    throw new ConfigError(`${key} ${dir}: ${why}; remove it or choose another ${key}`);
  };
  if (!isAbsolute(dir)) refuse("is not an absolute path");
  try {
    await checkAbove(dir, uid, refuse);
    let made = true;
    try {
      await mkdir(dir, { mode: 0o700 });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
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
    if (writers & 0o020 && !(mode & 0o020)) {
      refuse(`is writable by ${groupKey} (mode ${octal}), which may not write there`);
    }
    if (gid !== undefined) {
      await chown(dir, uid, gid).catch((err: NodeJS.ErrnoException) =>
        refuse(
          `cannot be given to ${groupKey} (gid ${gid}): ${err.code}; the daemon's user must be root or in that group`,
        ),
      );
    }
    // mkdir's mode is cut by the umask: the daemon sets the one it wants on what it made.
    if (made || gid !== undefined) await chmod(dir, mode);
  } catch (err) {
    if (err instanceof ConfigError) throw err;
    refuse(`cannot be prepared: ${(err as Error).message}`);
  }
}
