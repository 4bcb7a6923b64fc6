/**
 * Who may connect to the engines' sockets. Whoever connects can write the shared buckets
 * (a CUDA IPC mapping cannot be made read-only), so this is the boundary: the daemon's user,
 * root, and the members of engineGroup when one is set (the socket files are then 0660).
 */
import { join } from "node:path";
import type { PeerCred } from "../../ffi/index.ts";
import { type Group, lookupGroup } from "../checkpoints/confine.ts";
import { ConfigError } from "../config/index.ts";
import { prepareOwnDir } from "../config/own-dir.ts";

export interface EngineAccess {
  /** The daemon's user. */
  uid: number;
  /** engineGroup, when engines run as other users. */
  group?: Group;
}

/** Why the process of `cred` may not connect, or undefined when it may. */
export function refusal(cred: PeerCred, { uid, group }: EngineAccess): string | undefined {
  if (cred.uid === 0 || cred.uid === uid) return undefined;
  // The groups the kernel gave the process, not /etc/group as it was at start.
  if (group && (cred.gid === group.gid || cred.groups.includes(group.gid))) return undefined;
  if (!group) return `uid ${cred.uid} is not the daemon's user (uid ${uid}); engines of other users need engineGroup`;
  return `uid ${cred.uid} is neither the daemon's user (uid ${uid}) nor in engineGroup ${group.name}`;
}

/**
 * Resolves engineGroup and makes or checks the socket directory: the daemon's own, 0700, or
 * 0710 with engineGroup (its members reach the sockets, and cannot add or swap any). A
 * missing group or a directory not the daemon's own is a ConfigError (exit 2).
 */
export async function openSocketDir(
  config: { socketDir: string; stateDir: string; engineGroup: string },
  uid: number,
): Promise<{ dir: string; access: EngineAccess }> {
  let group: Group | undefined;
  if (config.engineGroup) {
    group = await lookupGroup(config.engineGroup);
    if (!group) throw new ConfigError(`engineGroup: no group "${config.engineGroup}" in /etc/group`);
  }
  const dir = config.socketDir || join(config.stateDir, "sockets");
  const mode = group ? 0o710 : 0o700;
  await prepareOwnDir({ key: "socketDir", dir, uid, mode, gid: group?.gid, groupKey: "engineGroup" });
  return { dir, access: { uid, group } };
}
