/**
 * Which files a registration may name (those whose real path lies under `registerRoots` or
 * the upload directory) and which of them the daemon may delete when a version adopting them
 * is dropped. The daemon runs as root: without this, any caller could have it read, pin and
 * delete any file of the host.
 */
import { lstat, readFile, realpath } from "node:fs/promises";
import { dirname, isAbsolute, resolve } from "node:path";
import { DaemonError } from "../errors.ts";

/** A group as /etc/group and /etc/passwd define it: its id and the uids of its members. */
export interface Group {
  name: string;
  gid: number;
  members: Set<number>;
}

/**
 * Finds `group` (a name or a number) in the texts of /etc/group and /etc/passwd; its members
 * are the users it lists and those whose primary group it is. A number not in /etc/group (a
 * directory service's group) is taken as it is; a name not there is undefined.
 */
export function findGroup(group: string, groupText: string, passwdText: string): Group | undefined {
  const rows = (text: string) =>
    text
      .split("\n")
      .filter((l) => l && !l.startsWith("#"))
      .map((l) => l.split(":"));
  const numeric = /^\d+$/.test(group);
  const row =
    rows(groupText).find((r) => r[0] === group || (numeric && r[2] === group)) ??
    (numeric ? [group, "x", group, ""] : undefined);
  if (!row || !/^\d+$/.test(row[2] ?? "")) return undefined;
  const gid = Number(row[2]);
  const names = new Set((row[3] ?? "").split(",").filter(Boolean));
  const members = new Set<number>();
  for (const user of rows(passwdText)) {
    if (!/^\d+$/.test(user[2] ?? "")) continue;
    if (names.has(user[0] as string) || user[3] === String(gid)) members.add(Number(user[2]));
  }
  return { name: row[0] as string, gid, members };
}

/** Reads the system's group and user tables for `group`. */
export async function lookupGroup(group: string): Promise<Group | undefined> {
  const [groups, passwd] = await Promise.all([readFile("/etc/group", "utf8"), readFile("/etc/passwd", "utf8")]);
  return findGroup(group, groups, passwd);
}

/** Whether `path` is `root` or lies beneath it (both absolute, normalized). */
export function isInside(path: string, root: string): boolean {
  return path === root || path.startsWith(root.endsWith("/") ? root : `${root}/`);
}

async function realOrUndefined(path: string): Promise<string | undefined> {
  try {
    return await realpath(path);
  } catch {
    return undefined;
  }
}

export interface FilePolicyOptions {
  /** Directories registrations may name files under (the upload directory is added). */
  roots: string[];
  uploadDir: string;
  /** Members of this group may leave files in the upload directory for the daemon to adopt. */
  uploadGroup?: Group;
  /** The daemon's own uid (files it may delete are its own). */
  uid: number;
}

/** The rules for files named by registrations: where they may be, and which may be adopted. */
export class FilePolicy {
  readonly roots: string[];

  constructor(private readonly opts: FilePolicyOptions) {
    this.roots = [...new Set([...opts.roots, opts.uploadDir].map((r) => resolve(r)))];
  }

  /** The roots' real paths now (a root that does not exist confines nothing). */
  private async realRoots(): Promise<string[]> {
    const real = await Promise.all(this.roots.map(realOrUndefined));
    return real.filter((r): r is string => r !== undefined);
  }

  private forbidden(path: string, why: string): DaemonError {
    return new DaemonError(
      "forbidden_path",
      `${path} ${why}; registrations may only name files under ${this.roots.join(", ")} (registerRoots)`,
      { path, registerRoots: this.roots },
    );
  }

  /**
   * Checks that `path` (a file or directory) is, once every symlink is resolved, under a root;
   * 403 naming the roots otherwise. A path that does not exist is judged by its nearest existing
   * ancestor; a relative one is left for the caller to refuse.
   */
  async confine(path: string): Promise<void> {
    if (!isAbsolute(path)) return; // refused as it is by sources.ts
    const abs = resolve(path);
    const real = await realOrUndefined(abs);
    let judged = real;
    // A missing path is judged by its nearest existing ancestor, so nothing outside is probed.
    for (let up = abs; judged === undefined && up !== dirname(up); ) {
      up = dirname(up);
      judged = await realOrUndefined(up);
    }
    if (judged !== undefined && (await this.inRoots(judged))) return;
    const how = real !== undefined && real !== abs ? `leads to ${real}, outside every root` : "is outside every root";
    throw this.forbidden(abs, how);
  }

  private async inRoots(real: string): Promise<boolean> {
    return (await this.realRoots()).some((root) => isInside(real, root));
  }

  /**
   * Registering reads a file for whoever asks, with the daemon's rights: only a file its owner
   * lets others read, the daemon's own, one of the upload group that the group may read, or one
   * in the upload directory (handed to the daemon there). 403 naming the rule otherwise.
   */
  async checkReadable(fdPath: string, path: string, st: { uid: number; gid: number; mode: number }): Promise<void> {
    const { uid, uploadGroup, uploadDir } = this.opts;
    if (st.uid === uid || st.mode & 0o004) return;
    if (uploadGroup && st.gid === uploadGroup.gid && st.mode & 0o040) return;
    const real = await realOrUndefined(fdPath);
    const uploads = await realOrUndefined(resolve(uploadDir));
    if (real && uploads && isInside(real, uploads)) return;
    throw new DaemonError(
      "forbidden_path",
      `${path} is owned by uid ${st.uid} and not readable by others (mode ${(st.mode & 0o777).toString(8).padStart(4, "0")}): ` +
        "the daemon registers only files their owner lets others read, its own, or the upload group's",
      { path },
    );
  }

  /**
   * Why the daemon may not delete `path`, or undefined when it may: it must be confined, be
   * named by its real path (no symlink on the way), be a regular file and be owned by the
   * daemon's user, or, in the upload directory, by a member of the upload group.
   */
  async whyNotAdoptable(path: string): Promise<string | undefined> {
    const abs = resolve(path);
    let st: Awaited<ReturnType<typeof lstat>>;
    try {
      st = await lstat(abs);
    } catch (err) {
      return (err as Error).message;
    }
    if (st.isSymbolicLink()) return "it is a symlink";
    if (!st.isFile()) return "it is not a regular file";
    const real = await realOrUndefined(abs);
    if (real !== abs) return `its path goes through a symlink (the file is ${real})`;
    if (!(await this.inRoots(real))) return "it is outside every root";
    if (st.nlink > 1) return `it has ${st.nlink} hard links (only a file's one name can be adopted)`;
    const unsafe = await this.unsafeAncestor(real);
    if (unsafe) return unsafe;
    const { uid, uploadGroup } = this.opts;
    if (st.uid === uid) return undefined;
    const uploads = await realOrUndefined(resolve(this.opts.uploadDir));
    const inUploads = uploads !== undefined && isInside(real, uploads);
    if (inUploads && uploadGroup && (uploadGroup.members.has(st.uid) || st.gid === uploadGroup.gid)) return undefined;
    const group = uploadGroup ? `, nor by a member of group ${uploadGroup.name} in the upload directory` : "";
    return `it is owned by uid ${st.uid}, not by the daemon's user (uid ${uid})${group}`;
  }

  /**
   * Why another user could swap a directory on the way to `real` (and so turn the daemon's
   * later unlink elsewhere), or undefined: every ancestor must be owned by the daemon's user
   * or root, and not writable by group or others unless sticky.
   */
  private async unsafeAncestor(real: string): Promise<string | undefined> {
    for (let dir = dirname(real); ; dir = dirname(dir)) {
      const st = await lstat(dir);
      if (st.uid !== this.opts.uid && st.uid !== 0) return `directory ${dir} is owned by uid ${st.uid}`;
      if ((st.mode & 0o022) !== 0 && (st.mode & 0o1000) === 0) {
        return `directory ${dir} is writable by others (mode ${(st.mode & 0o7777).toString(8)}) and not sticky`;
      }
      if (dir === dirname(dir)) return undefined;
    }
  }

  /** Refuses (400, at registration) a file the daemon could not later delete. */
  async checkAdoptable(path: string): Promise<void> {
    const why = await this.whyNotAdoptable(path);
    if (why !== undefined) {
      throw new DaemonError("invalid_source", `cannot adopt ${path}: ${why}`, { path });
    }
  }
}
