/**
 * The daemon's one UCX worker (ffi/ucx.ts), made on first use: a daemon without UCX starts
 * and serves as before, and a pull there fails naming the missing library. It listens on the
 * API's host; peers learn the port over the signed peer API. Fetch completions come back
 * through one pump that waits in the library while any fetch is in flight.
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

export class PullTransport {
  private opening?: Promise<Ucx>;
  private worker?: Ucx;
  private readonly waiting = new Map<bigint, (status: number) => void>();
  private pumping?: Promise<void>;
  private closed = false;

  constructor(private readonly opts: TransportOptions) {}

  /** The worker, made on first call; a failure is thrown to this caller and retried by the next. */
  ucx(): Promise<Ucx> {
    if (this.closed) return Promise.reject(new DaemonError("busy", "the daemon is stopping"));
    this.opening ??= this.open().catch((err) => {
      this.opening = undefined;
      throw new DaemonError("ucx_unavailable", `UCX cannot be used: ${(err as Error).message}`);
    });
    return this.opening;
  }

  private async open(): Promise<Ucx> {
    const { ctx, log, host, port, ucpPath, transports, corrupt } = this.opts;
    const listen = hostPort(await numericHost(host), port);
    const ucx = await Ucx.create(ctx, { ucpPath, transports, listen, corrupt });
    this.worker = ucx;
    log.info({ listen: ucx.address, ucx: ucx.version, transports: transports || "UCX's choice" }, "UCX ready");
    if (corrupt) log.warn("test fault corrupt-serve: every range this daemon serves has a byte changed");
    return ucx;
  }

  /** Where peers fetch from: the advertised host and the listener's port. */
  async address(): Promise<string> {
    const ucx = await this.ucx();
    const port = Number(ucx.address.slice(ucx.address.lastIndexOf(":") + 1));
    return hostPort(this.opts.advertisedHost().replace(/^\[(.*)\]$/, "$1"), port);
  }

  async expose(mem: { address: bigint; len: number }): Promise<Exposed> {
    return (await this.ucx()).expose(mem);
  }

  async unexpose(region: Exposed): Promise<void> {
    await this.worker?.unexpose(region.id, 5000);
  }

  /** A connection to the source at `address` (a host name is resolved first). */
  async connect(address: string): Promise<UcxPeer> {
    const ucx = await this.ucx();
    const colon = address.lastIndexOf(":");
    const ip = await numericHost(address.slice(0, colon));
    return ucx.connect(hostPort(ip, Number(address.slice(colon + 1))));
  }

  /** Fetches a range of the source's region into dst; resolves with its status (CKPT_OK is 0). */
  fetch(peer: UcxPeer, region: Exposed, offset: number, len: number, dst: bigint): Promise<number> {
    let op: bigint;
    try {
      op = peer.fetch(region, offset, len, dst);
    } catch (err) {
      return Promise.reject(err);
    }
    const done = new Promise<number>((resolve) => this.waiting.set(op, resolve));
    this.pumping ??= this.pump(peer.ucx);
    return done;
  }

  /** Hands completions to their fetches while any is waiting (it ends, synchronously, when none is). */
  private async pump(ucx: Ucx): Promise<void> {
    for (;;) {
      if (this.waiting.size === 0) {
        this.pumping = undefined;
        return;
      }
      let done: { op: bigint; status: number }[] = [];
      try {
        done = await ucx.wait(100);
      } catch (err) {
        // Cannot happen with valid arguments. A fetch is never said done while the library may
        // still write its memory, so this only waits and tries again.
        this.opts.log.error({ err }, "waiting for UCX completions");
        await new Promise((r) => setTimeout(r, 100));
      }
      for (const c of done) {
        this.waiting.get(c.op)?.(c.status);
        this.waiting.delete(c.op);
      }
    }
  }

  /** Frees the worker; fetches in flight end cancelled first. */
  async close(): Promise<void> {
    this.closed = true;
    const ucx = await this.opening?.catch(() => undefined);
    if (!ucx) return;
    await this.pumping;
    await ucx.destroy();
  }
}
