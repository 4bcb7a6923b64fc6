/**
 * Heartbeats: every `heartbeatMs` this daemon tells a few members (FANOUT) and every candidate
 * (peers/members.ts) who it is and whom it knows, over the signed peer API, and learns the same
 * from the answer; knowing one peer is enough to learn them all. Names in `peerDns` are resolved again every
 * `DNS_EVERY` heartbeats (a Kubernetes headless service answers with every pod). On SIGTERM the
 * daemon tells the members it leaves.
 */
import { lookup } from "node:dns/promises";
import type { Logger } from "pino";
import { type PeerSigner, peerCall } from "../update/peers.ts";
import { type Member, type Members, normalize, type Rumor, type SelfInfo } from "./members.ts";

/** POST /v1/peer/heartbeat, both ways: who speaks, and whom it knows. */
export interface Heartbeat {
  self: SelfInfo;
  members: Rumor[];
}

export const DNS_EVERY = 10;

/** The shape of a heartbeat answer (the routes check requests in full with valibot). */
function isHeartbeat(x: unknown): x is Heartbeat {
  const hb = x as Heartbeat | undefined;
  const s = hb?.self;
  return (
    typeof s?.nodeId === "string" &&
    typeof s.url === "string" &&
    /^https?:\/\//.test(s.url) &&
    Number.isInteger(s.beat) &&
    Number.isInteger(s.startedAt) &&
    Array.isArray(s.versions) &&
    Array.isArray(hb?.members)
  );
}
/** Members sent a heartbeat each round (besides every candidate): what each knows spreads from there. */
export const FANOUT = 3;

export interface GossipDeps {
  members: Members;
  self: () => SelfInfo;
  sign: PeerSigner;
  log: Logger;
  heartbeatMs: number;
  /** URLs whose host names resolve to many daemons: "http://ckptd.ns.svc:8470". */
  dns: string[];
  /** Addresses of a host name (a seam for tests; default: the system resolver, every address). */
  resolve?: (host: string) => Promise<string[]>;
}

export class Gossip {
  private timer?: ReturnType<typeof setInterval>;
  private ticks = 0;
  /** This daemon's heartbeat count (SelfInfo.beat). */
  beats = 0;
  /** URLs where another daemon answered with this daemon's node id (said once each). */
  private readonly twins = new Set<string>();
  private running?: Promise<void>;

  constructor(private readonly deps: GossipDeps) {}

  start(): void {
    this.timer = setInterval(() => void this.tick(), this.deps.heartbeatMs);
    this.timer.unref?.();
    void this.tick();
  }

  /** One round: DNS now and then, a heartbeat to every target, then who went down. */
  tick(): Promise<void> {
    this.running ??= (async () => {
      const { members, log } = this.deps;
      if (this.ticks++ % DNS_EVERY === 0) await this.resolveDns();
      this.beats++;
      await Promise.all(
        members.targets(FANOUT).map((t) => this.beat(t.url, t.nodeId).catch(() => members.failed(t.url))),
      );
      for (const m of members.sweep(Date.now())) log.warn({ peer: m.nodeId, url: m.url }, "peer down");
    })().finally(() => {
      this.running = undefined;
    });
    return this.running;
  }

  /** Contacts `url` now (POST /v1/peers); resolves with the member it answered as. */
  async join(url: string): Promise<Member> {
    this.deps.members.propose(url);
    try {
      const m = await this.beat(normalize(url));
      if (!m) throw new Error(`${url} answered as this daemon itself`);
      return m;
    } catch (err) {
      this.deps.members.drop(url); // the caller was told: it is not tried again
      throw err;
    }
  }

  /** Set once this daemon said it leaves: it answers no more heartbeats (peers/routes.ts). */
  leaving = false;

  /** Tells every member it leaves (each request bounded by one heartbeat period). */
  async leave(): Promise<void> {
    this.leaving = true;
    await this.running; // a heartbeat of ours still on its way would say we are up
    const { members, sign, heartbeatMs } = this.deps;
    const self = this.deps.self().nodeId;
    await Promise.all(
      members
        .up()
        .map((m) =>
          peerCall(
            sign,
            `${m.url}/v1/peer/leave`,
            { method: "POST", json: { nodeId: self }, to: m.nodeId },
            heartbeatMs,
          ).catch(() => undefined),
        ),
    );
  }

  stop(): void {
    clearInterval(this.timer);
  }

  /** One heartbeat to `url`; the answer is a heartbeat of its own. */
  private async beat(url: string, nodeId?: string): Promise<Member | undefined> {
    const { members, sign, heartbeatMs } = this.deps;
    const json: Heartbeat = { self: this.deps.self(), members: members.rumorsOut() };
    const { status, body } = await peerCall<Heartbeat & { error?: { message: string } }>(
      sign,
      `${url}/v1/peer/heartbeat`,
      { method: "POST", json, to: nodeId ?? "*" },
      heartbeatMs * 2,
    );
    if (status !== 200 || !isHeartbeat(body)) {
      throw new Error(
        `${url}/v1/peer/heartbeat answered ${status}: ${body?.error?.message ?? JSON.stringify(body).slice(0, 200)}`,
      );
    }
    const me = this.deps.self();
    const itself = body.self.nodeId === me.nodeId && body.self.startedAt === me.startedAt && body.self.url === me.url;
    if (body.self.nodeId === me.nodeId && !itself && !this.twins.has(url)) {
      this.twins.add(url);
      this.deps.log.warn({ url }, "a daemon there has this daemon's node id (a copied state directory?)");
    }
    members.answered(url, body.self.nodeId, itself);
    return this.heard(body, false);
  }

  /**
   * A heartbeat: its sender is up, and whom it knows are candidates. signed: a request signed
   * with the cluster secret (an answer only says who answered where we asked).
   */
  heard(hb: Heartbeat, signed: boolean): Member | undefined {
    const { members, log } = this.deps;
    const before = members.get(hb.self.nodeId)?.state;
    const m = members.heard(hb.self, Date.now(), signed);
    members.rumors(hb.members ?? [], Date.now());
    if (m && m.state === "up" && before !== "up")
      log.info({ peer: m.nodeId, url: m.url }, before ? "peer up again" : "peer up");
    return m;
  }

  private async resolveDns(): Promise<void> {
    const resolve =
      this.deps.resolve ?? ((host: string) => lookup(host, { all: true }).then((a) => a.map((x) => x.address)));
    for (const name of this.deps.dns) {
      try {
        const u = new URL(name);
        const host = u.hostname.replace(/^\[|\]$/g, "");
        for (const address of await resolve(host)) {
          const at = address.includes(":") ? `[${address}]` : address;
          this.deps.members.propose(`${u.protocol}//${at}${u.port ? `:${u.port}` : ""}`);
        }
      } catch (err) {
        this.deps.log.warn({ peerDns: name, reason: (err as Error).message }, "peerDns: cannot resolve");
      }
    }
  }
}
