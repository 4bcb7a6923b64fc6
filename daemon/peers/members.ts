/**
 * The fleet as this daemon knows it: every peer it heard of, its state and what it holds. A
 * pure state machine over time (`now` is given); peers/gossip.ts feeds it heartbeats.
 *
 * Each daemon counts its heartbeats (`beat`) and sends one to a few members each round (and to
 * every candidate); whom it knows, with the last beat it saw of each, travels with it. A peer
 * is `up` while its count keeps rising, heard directly or through others, and `down` once
 * `downMs` pass without a higher count; `left` once it said it stops. Peers first named by
 * others are candidates, contacted until they answer themselves: nobody joins on hearsay, but
 * a member stays up on it (each daemon hearing from all the others every round would cost the
 * fleet N x N requests a round).
 */

/** What a daemon says of itself in each heartbeat. */
export interface SelfInfo {
  nodeId: string;
  url: string;
  backend: string;
  gpus: number;
  /** Its ready checkpoint versions. */
  versions: { name: string; version: number; fingerprint: string; bytes: number; registeredAt: string }[];
  /** The fingerprint its engines last received in a successful update, if any. */
  delivered?: string;
  /** Its heartbeat count: rises every round while it runs. */
  beat: number;
}

export type MemberState = "up" | "down" | "left";

export interface Member {
  nodeId: string;
  url: string;
  state: MemberState;
  /** When it was last heard from (ms since the epoch). */
  lastSeen: number;
  info: SelfInfo;
}

/** A member as others are told of it: enough to reach it, and the last beat of it seen. */
export interface Rumor {
  nodeId: string;
  url: string;
  state: MemberState;
  beat: number;
}

export class Members {
  private readonly byId = new Map<string, Member>();
  /** URLs to contact that no heartbeat answered yet (seeds, DNS, gossip, POST /v1/peers). */
  private readonly candidates = new Set<string>();

  constructor(
    readonly selfId: string,
    private readonly downMs: number,
  ) {}

  /** A URL worth contacting; ignored when it is a member's already. */
  propose(url: string): void {
    const u = normalize(url);
    if (![...this.byId.values()].some((m) => m.url === u)) this.candidates.add(u);
  }

  /** A candidate URL answered (as a member, or as this daemon itself): no longer a candidate. */
  answered(url: string): void {
    this.candidates.delete(normalize(url));
  }

  /** A daemon spoke for itself (its heartbeat, or its answer to ours). */
  heard(info: SelfInfo, now: number): Member | undefined {
    if (info.nodeId === this.selfId) return undefined;
    const url = normalize(info.url);
    this.candidates.delete(url);
    // Another node id at that URL: the daemon there was replaced (a new state directory).
    for (const m of this.byId.values()) if (m.url === url && m.nodeId !== info.nodeId) this.byId.delete(m.nodeId);
    const member: Member = { nodeId: info.nodeId, url, state: "up", lastSeen: now, info: { ...info, url } };
    this.byId.set(info.nodeId, member);
    return member;
  }

  /**
   * Others' view: a member whose beat they saw rise is alive (heard of now); members this
   * daemon does not know yet become candidates.
   */
  rumors(list: Rumor[], now: number): void {
    for (const r of list) {
      if (r.nodeId === this.selfId || r.state === "left") continue;
      const m = this.byId.get(r.nodeId);
      if (!m) {
        this.propose(r.url);
      } else if (r.beat > m.info.beat && m.state !== "left") {
        m.info = { ...m.info, beat: r.beat };
        m.lastSeen = now;
        m.state = "up";
      }
    }
  }

  /** The member said it stops. */
  left(nodeId: string): void {
    const m = this.byId.get(nodeId);
    if (m) m.state = "left";
  }

  /** Marks members not heard from within downMs `down`; returns those that just went down. */
  sweep(now: number): Member[] {
    const gone: Member[] = [];
    for (const m of this.byId.values()) {
      if (m.state === "up" && now - m.lastSeen > this.downMs) {
        m.state = "down";
        gone.push(m);
      }
    }
    return gone;
  }

  /**
   * Whom to send this round's heartbeats to: `fanout` members not `left` (those heard of least
   * recently first, ties at random), and every candidate.
   */
  targets(fanout = Number.POSITIVE_INFINITY, random: () => number = Math.random): { url: string; nodeId?: string }[] {
    const picked = [...this.byId.values()]
      .filter((m) => m.state !== "left")
      .map((m) => ({ m, key: m.lastSeen + random() }))
      .sort((a, b) => a.key - b.key)
      .slice(0, fanout)
      .map(({ m }) => ({ url: m.url, nodeId: m.nodeId }));
    return [...picked, ...[...this.candidates].map((url) => ({ url }))];
  }

  /** URLs still to be answered from (seeds, DNS addresses, rumors). */
  pending(): string[] {
    return [...this.candidates].sort();
  }

  list(): Member[] {
    return [...this.byId.values()].sort((a, b) => a.url.localeCompare(b.url));
  }

  get(nodeId: string): Member | undefined {
    return this.byId.get(nodeId);
  }

  up(): Member[] {
    return this.list().filter((m) => m.state === "up");
  }

  /** What this daemon tells others of the fleet. */
  rumorsOut(): Rumor[] {
    return this.list().map(({ nodeId, url, state, info }) => ({ nodeId, url, state, beat: info.beat }));
  }
}

/** A daemon's URL without a trailing slash. */
export function normalize(url: string): string {
  return url.replace(/\/+$/, "");
}
