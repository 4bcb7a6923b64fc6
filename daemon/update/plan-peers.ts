/**
 * Planning an update over several daemons: a pure function from what each peer said of itself
 * (GET /v1/peer/info) to the ranks of every participant, the GPUs that copy the checkpoint and
 * the communicator to use. Everything here is checked before anyone joins a communicator: a
 * rank that never joins would block the others until the join's limit.
 */
import { DaemonError } from "../errors.ts";
import { MIN_SLOTS_PER_GPU } from "./geometry.ts";
import type { PeerInfo } from "./peers.ts";

export interface PeersInput {
  /** This daemon's GPUs (ranks 0..gpus-1) and bucket geometry. */
  gpus: number;
  slots: number;
  slotBytes: number;
  /** The configured peers, in order, with their answers. */
  peers: { url: string; info: PeerInfo }[];
  /** The shared communicator this daemon keeps from its last multi-daemon update. */
  shared?: { key: string; id: string };
}

/** A peer taking part: its ranks are firstRank..firstRank+info.gpus-1. */
export interface Participant {
  url: string;
  info: PeerInfo;
  firstRank: number;
}

export interface PeersPlan {
  participants: Participant[];
  /** Every rank over all daemons. */
  nranks: number;
  /** Global ranks of the GPUs whose hosts hold the checkpoint (they copy it). */
  owners: number[];
  /** With participants: the communicator's key, and whether to make it anew or reuse `shared`. */
  comm?: { key: string; fresh: boolean };
}

/** Checks the peers (busy, geometry, enough slots) and gives their ranks; throws naming the first at fault. */
export function planWithPeers(input: PeersInput): PeersPlan {
  const participants: Participant[] = [];
  let rank = input.gpus;
  for (const { url, info } of input.peers) {
    if (info.running) throw new DaemonError("update_failed", `peer ${url} is busy with update ${info.running}`);
    checkGeometry(input, url, info);
    participants.push({ url, info, firstRank: rank });
    rank += info.gpus;
  }
  const owners = [
    ...ranks(0, input.gpus),
    ...participants.filter((p) => p.info.holds).flatMap((p) => ranks(p.firstRank, p.info.gpus)),
  ];
  if (input.slots < owners.length) {
    throw new DaemonError(
      "update_failed",
      `${owners.length} GPUs copy this checkpoint but there are ${input.slots} slots; raise bucketSlots`,
    );
  }
  if (participants.length === 0) return { participants, nranks: rank, owners };
  return { participants, nranks: rank, owners, comm: commOf(input, participants) };
}

function ranks(first: number, count: number): number[] {
  return Array.from({ length: count }, (_, g) => first + g);
}

function checkGeometry(input: PeersInput, url: string, info: PeerInfo): void {
  if (info.slots === input.slots && info.slotBytes === input.slotBytes) return;
  // bucketSlots is raised per GPU, and buckets shrink to fit bucketMemoryBytes and the GPUs'
  // free memory: the same settings can give different geometries.
  const slots = Math.max(info.slots, input.slots);
  const bytes = Math.min(info.slotBytes, input.slotBytes);
  throw new DaemonError(
    "update_failed",
    `peer ${url} has ${info.slots} slots of ${info.slotBytes} bytes, this daemon ${input.slots} of ${input.slotBytes}: set bucketSlots to ${slots} and bucketBytes to ${bytes} on every daemon (bucketSlots is raised to ${MIN_SLOTS_PER_GPU} per GPU; buckets shrink to fit bucketMemoryBytes and free GPU memory)`,
  );
}

/** The same members with the same geometry reuse the communicator, if every one of them still has it. */
function commOf(input: PeersInput, participants: Participant[]): { key: string; fresh: boolean } {
  const key = JSON.stringify([
    input.gpus,
    input.slots,
    input.slotBytes,
    participants.map((p) => [p.url, p.info.nodeId, p.info.gpus]),
  ]);
  const mine = input.shared && `${input.shared.key} ${input.shared.id}`;
  const fresh = input.shared?.key !== key || participants.some((p) => p.info.comm !== mine);
  return { key, fresh };
}
