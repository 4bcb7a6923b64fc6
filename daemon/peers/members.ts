/**
 * The fleet as this daemon knows it: every peer it heard of, its state and what it holds. A
 * pure state machine over time (`now` is given); peers/gossip.ts feeds it heartbeats.
 *
 * Each daemon counts its heartbeats (`beat`, within its run that began at `startedAt`) and
 * sends one each round to a few members that are up, one that is down (a probe) and every
 * candidate; whom it knows, with the last (startedAt, beat) it saw of each, travels with it. A
 * peer is `up` while that pair keeps rising, heard directly or through others, and `down` once
 * `downMs` pass without; `left` once it said it stops. A pair that is not newer is no news: a
 * replayed heartbeat brings no one back. Peers first named by others are candidates, contacted
 * until they answer themselves (nobody joins on hearsay); a candidate that keeps failing is
 * dropped, and members down or left for `forgetMs` are forgotten, so neither list grows for ever.
 */

/** What a daemon says of itself in each heartbeat. */
export interface SelfInfo {
  nodeId: string;
  url: string;
  backend: string;
  gpus: number;
  /** Its ready checkpoint versions. */
  versions: { name: string; version: number; fingerprint: string; bytes: number; registeredAt: string }[];
  /** The fingerprint its engines last received in a successful update, if any, and when. */
  delivered?: string;
  deliveredAt?: string;
  /** When its current run began (ms since the epoch): a restarted daemon counts beats anew. */
  startedAt: number;
  /** Its heartbeat count in this run. */
  beat: number;
}

export type MemberState = "up" | "down" | "left";

export interface Member {
  nodeId: string;
  url: string;
  state: MemberState;
  /** When it was last heard from, or of (ms since the epoch). */
  lastSeen: number;
  info: SelfInfo;
}

/** A member as others are told of it: enough to reach it, and the last beat of it seen. */
export interface Rumor {
  nodeId: string;
  url: string;
  state: MemberState;
  startedAt: number;
  beat: number;
}

/** Whether (startedAt, beat) `a` comes after `b`. */
export function newer(a: { startedAt: number; beat: number }, b: { startedAt: number; beat: number }): boolean {
  return a.startedAt > b.startedAt || (a.startedAt === b.startedAt && a.beat > b.beat);
}

/** Rounds a candidate may fail before it is dropped (seeds are kept: they may come up later). */
export const CANDIDATE_FAILURES = 30;
/** Candidates at most (rumors cannot make this list grow without bound). */
export const MAX_CANDIDATES = 1024;

export class Members {
  private readonly byId = new Map<string, Member>();
  /** URLs to contact that no heartbeat answered yet, with the rounds they failed. */
  private readonly candidates = new Map<string, number>();
  /** Seeds: candidates kept however often they fail. */
  private readonly sticky = new Set<string>();
  /** URLs that answered as this daemon itself: never contacted again. */
  private readonly selfUrls = new Set<string>();
  /** URLs that answered, and the node id that answered there. */
  private readonly answeredBy = new Map<string, string>();

  constructor(
    readonly selfId: string,
    private readonly downMs: number,
    private readonly forgetMs = Math.max(60_000, 12 * downMs),
  ) {}

  /** A URL worth contacting (sticky: a seed, kept however often it fails); ignored when known. */
  propose(url: string, sticky = false): void {
    const u = normalize(url);
    if (sticky) this.sticky.add(u);
    if (this.selfUrls.has(u) || this.answeredBy.has(u) || this.candidates.has(u)) return;
    if ([...this.byId.values()].some((m) => m.url === u)) return;
    if (this.candidates.size < MAX_CANDIDATES) this.candidates.set(u, 0);
  }

  /**
   * The daemon at `url` answered as `nodeId`. Another daemon with this daemon's node id (a
   * copied state directory) is not this one: it stays a candidate, tried each round.
   */
  answered(url: string, nodeId: string, itself: boolean): void {
    const u = normalize(url);
    if (nodeId === this.selfId && !itself) return;
    this.candidates.delete(u);
    if (itself) this.selfUrls.add(u);
    else this.answeredBy.set(u, nodeId);
  }

  /** A candidate did not answer this round; one failing too often is dropped (seeds never). */
  failed(url: string): void {
    const u = normalize(url);
    const n = this.candidates.get(u);
    if (n === undefined) return;
    if (n + 1 >= CANDIDATE_FAILURES && !this.sticky.has(u)) this.candidates.delete(u);
    else this.candidates.set(u, n + 1);
  }

  /** A URL given to POST /v1/peers that did not answer: not tried again. */
  drop(url: string): void {
    const u = normalize(url);
    if (!this.sticky.has(u)) this.candidates.delete(u);
  }

  /**
   * A daemon spoke for itself. signed: in a request signed with the cluster secret (else in the
   * answer to ours, which only says who answered at the URL we chose): an answer never moves a
   * known member to another URL. A (startedAt, beat) not newer than the one known is no news.
   */
  heard(info: SelfInfo, now: number, signed: boolean): Member | undefined {
    if (info.nodeId === this.selfId) return undefined;
    const url = normalize(info.url);
    const known = this.byId.get(info.nodeId);
    if (known && !signed && known.url !== url) return undefined;
    if (known && !newer(info, known.info)) return known;
    this.candidates.delete(url);
    // Another node id at that URL: the daemon there was replaced (a new state directory).
    for (const m of this.byId.values()) if (m.url === url && m.nodeId !== info.nodeId) this.byId.delete(m.nodeId);
    const member: Member = { nodeId: info.nodeId, url, state: "up", lastSeen: now, info: { ...info, url } };
    this.byId.set(info.nodeId, member);
    return member;
  }

  /**
   * Others' view: a member whose (startedAt, beat) they saw rise is alive (heard of now); one
   * they saw leave in the run this daemon knows of, or a later one, has left (a leave reaches
   * the members the leaver saw up; the others learn it here); up members this daemon does not
   * know yet become candidates. Only a member's own word brings it back from `left`.
   */
  rumors(list: Rumor[], now: number): void {
    for (const r of list) {
      if (r.nodeId === this.selfId) continue;
      const m = this.byId.get(r.nodeId);
      if (!m) {
        if (r.state === "up") this.propose(r.url);
      } else if (r.state === "left" && m.state !== "left" && !newer(m.info, r)) {
        m.state = "left";
        m.lastSeen = now;
      } else if (m.state !== "left" && r.state !== "left" && newer(r, m.info)) {
        m.info = { ...m.info, startedAt: r.startedAt, beat: r.beat };
        m.lastSeen = now;
        m.state = "up";
      }
    }
  }

  /** The member said it stops. */
  left(nodeId: string, now: number): void {
    const m = this.byId.get(nodeId);
    if (m) {
      m.state = "left";
      m.lastSeen = now;
    }
  }

  /**
   * Marks members not heard of within downMs `down` and forgets those down or left for
   * forgetMs; returns those that just went down.
   */
  sweep(now: number): Member[] {
    const gone: Member[] = [];
    for (const m of [...this.byId.values()]) {
      if (m.state === "up" && now - m.lastSeen > this.downMs) {
        m.state = "down";
        gone.push(m);
      } else if (m.state !== "up" && now - m.lastSeen > this.forgetMs) {
        this.byId.delete(m.nodeId);
      }
    }
    return gone;
  }

  /**
   * Whom to send this round's heartbeats to: `fanout` members that are up (those heard of least
   * recently first, ties at random), one member that is down (to see it come back), and every
   * candidate. Down members never take the up members' places: a few dead ones must not starve
   * the live ones of heartbeats.
   */
  targets(fanout = Number.POSITIVE_INFINITY, random: () => number = Math.random): { url: string; nodeId?: string }[] {
    const byAge = (list: Member[]) =>
      list
        .map((m) => ({ m, key: m.lastSeen + random() }))
        .sort((a, b) => a.key - b.key)
        .map(({ m }) => ({ url: m.url, nodeId: m.nodeId }));
    const all = [...this.byId.values()];
    const up = byAge(all.filter((m) => m.state === "up")).slice(0, fanout);
    const down = all.filter((m) => m.state === "down");
    const probe = down.length > 0 ? [down[Math.floor(random() * down.length)] as Member] : [];
    return [
      ...up,
      ...probe.map((m) => ({ url: m.url, nodeId: m.nodeId })),
      ...[...this.candidates.keys()].map((url) => ({ url })),
    ];
  }

  /** URLs still to be answered from (seeds, DNS addresses, rumors). */
  pending(): string[] {
    return [...this.candidates.keys()].sort();
  }

  /** The seeds that are neither this daemon nor a member under another URL, and have not answered. */
  unheardSeeds(seeds: string[]): string[] {
    const urls = new Set([...this.byId.values()].map((m) => m.url));
    return seeds.map(normalize).filter((u) => !this.selfUrls.has(u) && !this.answeredBy.has(u) && !urls.has(u));
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
    return this.list().map(({ nodeId, url, state, info }) => ({
      nodeId,
      url,
      state,
      startedAt: info.startedAt,
      beat: info.beat,
    }));
  }
}

/** A daemon's URL without a trailing slash. */
export function normalize(url: string): string {
  return url.replace(/\/+$/, "");
}
