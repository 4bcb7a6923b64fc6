/**
 * The daemon's UCX workers (ffi/ucx.ts), `ucxLanes` of them, made on first use: a daemon
 * without UCX starts and serves as before, and a pull there fails naming the missing library.
 * Each worker is a lane with its own progress thread and listener (on the API's host; peers
 * learn the ports over the signed peer API): a puller connects one lane of its own to each
 * lane of a source, so a transfer is spread over as many cores on both sides. A lane's fetch
 * completions come back through one pump that waits in the library while any is in flight.
 */
import { lookup } from "node:dns/promises";
import { isIP } from "node:net";
import type { Logger } from "pino";
import type { Context } from "../../ffi/index.ts";
import { type Exposed, Ucx, type UcxPeer } from "../../ffi/index.ts";
import { DaemonError } from "../errors.ts";

export interface TransportOptions {
  ctx: Context;
  log: Logger;
  /** The API's host (an address or a name); UCX listens there. */
  host: string;
  port: number;
  /** The host peers reach this daemon at (the advertised URL's). */
  advertisedHost: () => string;
  ucpPath: string;
  transports: string;
  corrupt: boolean;
  /** UCX workers, each with a progress thread of its own: one connection is bound by one core. */
  lanes: number;
}

/** A host name or address as the data plane takes it: an address ("[v6]" unbracketed). */
export async function numericHost(host: string): Promise<string> {
  const bare = host.replace(/^\[(.*)\]$/, "$1");
  if (isIP(bare)) return bare;
  return (await lookup(bare)).address;
}

/** "ip:port", bracketing an IPv6 address. */
export function hostPort(ip: string, port: number): string {
  return isIP(ip) === 6 ? `[${ip}]:${port}` : `${ip}:${port}`;
}

/** One UCX worker of the transport, with the fetches waiting on it. */
interface Lane {
  ucx: Ucx;
  waiting: Map<bigint, (status: number) => void>;
  pumping?: Promise<void>;
}

export class PullTransport {
  private opening?: Promise<Lane[]>;
  private lanes: Lane[] = [];
  private closed = false;

  constructor(private readonly opts: TransportOptions) {}

  /** The workers, made on first call; a failure is thrown to this caller and retried by the next. */
  private open(): Promise<Lane[]> {
    if (this.closed) return Promise.reject(new DaemonError("busy", "the daemon is stopping"));
    this.opening ??= this.make().catch((err) => {
      this.opening = undefined;
      throw new DaemonError("ucx_unavailable", `UCX cannot be used: ${(err as Error).message}`);
    });
    return this.opening;
  }

  /** `lanes` workers, each with its own progress thread and listener (on port, port + 1, ...; any when 0). */
  private async make(): Promise<Lane[]> {
    const { ctx, log, host, port, ucpPath, transports, corrupt, lanes } = this.opts;
    const ip = await numericHost(host);
    const made: Lane[] = [];
    try {
      for (let i = 0; i < lanes; i++) {
        const listen = hostPort(ip, port === 0 ? 0 : port + i);
        made.push({ ucx: await Ucx.create(ctx, { ucpPath, transports, listen, corrupt }), waiting: new Map() });
      }
    } catch (err) {
      for (const l of made) await l.ucx.destroy().catch(() => undefined);
      throw err;
    }
    this.lanes = made;
    const first = made[0] as Lane;
    const listening = made.map((l) => l.ucx.address);
    log.info({ listen: listening, ucx: first.ucx.version, transports: transports || "UCX's choice" }, "UCX ready");
    if (corrupt) log.warn("test fault corrupt-serve: every range this daemon serves has a byte changed");
    return made;
  }

  /** Where peers fetch from, one address per lane: the advertised host and each listener's port. */
  async addresses(): Promise<string[]> {
    const host = this.opts.advertisedHost().replace(/^\[(.*)\]$/, "$1");
    return (await this.open()).map((l) =>
      hostPort(host, Number(l.ucx.address.slice(l.ucx.address.lastIndexOf(":") + 1))),
    );
  }

  /** Serves `mem` on every lane; a region (id and key) per lane. */
  async expose(mem: { address: bigint; len: number }): Promise<Exposed[]> {
    const regions: Exposed[] = [];
    try {
      for (const l of await this.open()) regions.push(l.ucx.expose(mem));
    } catch (err) {
      await this.unexpose(regions);
      throw err;
    }
    return regions;
  }

  /** Stops serving the regions, on every lane at once (each waits for its readers). */
  async unexpose(regions: Exposed[]): Promise<void> {
    await Promise.all(regions.map((r, i) => this.lanes[i]?.ucx.unexpose(r.id, 5000)));
  }

  /** Connections to a source's lanes (host names resolved first), spread over this daemon's lanes. */
  async connect(addresses: string[]): Promise<UcxPeer[]> {
    const lanes = await this.open();
    const peers: UcxPeer[] = [];
    try {
      for (const [i, address] of addresses.entries()) {
        const colon = address.lastIndexOf(":");
        const ip = await numericHost(address.slice(0, colon)).catch((err: Error) => {
          throw new Error(`${address}: ${err.message}`);
        });
        peers.push((lanes[i % lanes.length] as Lane).ucx.connect(hostPort(ip, Number(address.slice(colon + 1)))));
      }
    } catch (err) {
      for (const p of peers) p.disconnect();
      throw err;
    }
    return peers;
  }

  /** Fetches a range of the source's region into dst; resolves with its status (CKPT_OK is 0). */
  fetch(peer: UcxPeer, region: Exposed, offset: number, len: number, dst: bigint): Promise<number> {
    const lane = this.lanes.find((l) => l.ucx === peer.ucx);
    let op: bigint;
    try {
      if (!lane) throw new Error("a connection of another transport");
      op = peer.fetch(region, offset, len, dst);
    } catch (err) {
      return Promise.reject(err);
    }
    const done = new Promise<number>((resolve) => lane.waiting.set(op, resolve));
    lane.pumping ??= this.pump(lane);
    return done;
  }

  /** Hands a lane's completions to their fetches while any is waiting (ends, synchronously, when none is). */
  private async pump(lane: Lane): Promise<void> {
    for (;;) {
      if (lane.waiting.size === 0) {
        lane.pumping = undefined;
        return;
      }
      let done: { op: bigint; status: number }[] = [];
      try {
        done = await lane.ucx.wait(100);
      } catch (err) {
        // Cannot happen with valid arguments. A fetch is never said done while the library may
        // still write its memory, so this only waits and tries again.
        this.opts.log.error({ err }, "waiting for UCX completions");
        await new Promise((r) => setTimeout(r, 100));
      }
      for (const c of done) {
        lane.waiting.get(c.op)?.(c.status);
        lane.waiting.delete(c.op);
      }
    }
  }

  /** Frees the workers; fetches in flight end cancelled first. */
  async close(): Promise<void> {
    this.closed = true;
    const lanes = await this.opening?.catch(() => undefined);
    for (const l of lanes ?? []) {
      await l.pumping;
      await l.ucx.destroy();
    }
  }
}
