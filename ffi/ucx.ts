/**
 * Pulls between daemons over UCX (ckpt_ucx_* of ckpt.h): a Ucx is one worker with its
 * progress thread, serving exposed pinned memory and fetching peers' ranges into this
 * process's. Fetches and exposes only queue work for that thread, so they are synchronous;
 * waits and unexposes block, so they run on koffi's threads.
 */
import type { Context, HostMemory } from "./ckpt.ts";
import { promisify } from "./ckpt.ts";
import { CKPT_UCX_FAULT_CORRUPT, CKPT_UCX_KEY_BYTES } from "./constants.ts";
import { sizeOf, UcxOptions } from "./library.ts";

type Ptr = bigint;

export interface UcxConfig {
  /** libucp to load (default libucp.so.0). */
  ucpPath?: string;
  /** A UCX_TLS-style transport list; empty: UCX picks. */
  transports?: string;
  /** "ip:port" to serve on (port 0: any); absent: fetch only. */
  listen?: string;
  /** Requests served at once per connection (default 64). */
  maxInflight?: number;
  /** A connection naming no region with its key for this long is closed (default 60 s). */
  idleMs?: number;
  /** Tests only: every range served has a byte changed. */
  corrupt?: boolean;
}

/** A region this process serves: its id and the key a peer must name. */
export interface Exposed {
  id: bigint;
  key: Uint8Array;
}

export interface Completion {
  op: bigint;
  /** CKPT_OK, or the status it failed with. */
  status: number;
}

export class Ucx {
  private constructor(
    readonly ctx: Context,
    readonly handle: Ptr,
    /** Where peers reach it ("ip:port"; "" when fetch-only). */
    readonly address: string,
    /** UCX's version, "1.13.1". */
    readonly version: string,
  ) {}

  static async create(ctx: Context, config: UcxConfig = {}): Promise<Ucx> {
    const native = ctx.lib.native;
    // ckpt_ucx_create sets these defaults itself (ucx.c says why), but on the worker thread that
    // runs it: set here, on the thread that reads the environment, they need no setenv there.
    process.env.UCX_ERROR_SIGNALS ??= "";
    process.env.UCX_MEM_EVENTS ??= "no";
    const opts = {
      size: sizeOf(UcxOptions),
      flags: config.corrupt ? CKPT_UCX_FAULT_CORRUPT : 0,
      ucp_path: config.ucpPath ?? null,
      transports: config.transports || null,
      listen: config.listen ?? null,
      max_inflight: config.maxInflight ?? 0,
      idle_ms: config.idleMs ?? 0,
    };
    const out: Ptr[] = [0n];
    ctx.lib.check("ckpt_ucx_create", await promisify<number>(native.ucxCreate, [ctx.ptr, opts, out]), ctx.ptr);
    const handle = out[0] as Ptr;
    const buf = Buffer.alloc(128);
    const version = [0];
    native.ucxInfo(handle, buf, buf.length, version);
    const v = version[0] as number;
    const text = `${Math.floor(v / 10000)}.${Math.floor(v / 100) % 100}.${v % 100}`;
    return new Ucx(ctx, handle, buf.toString("utf8", 0, buf.indexOf(0)), text);
  }

  private check(call: string, status: number): void {
    this.ctx.lib.check(call, status, this.ctx.ptr);
  }

  /** Serves `mem` (pinned memory of the context) to peers that name the returned id and key. */
  expose(mem: Pick<HostMemory, "address" | "len">): Exposed {
    const id = [0n];
    const key = new Uint8Array(CKPT_UCX_KEY_BYTES);
    this.check("ckpt_ucx_expose", this.ctx.lib.native.ucxExpose(this.handle, mem.address, mem.len, id, key));
    return { id: BigInt(id[0] as bigint | number), key };
  }

  /** Stops serving a region; resolves once nothing reads it (readers past timeoutMs are cut off). */
  async unexpose(id: bigint, timeoutMs: number): Promise<void> {
    const status = await promisify<number>(this.ctx.lib.native.ucxUnexpose, [this.handle, id, timeoutMs]);
    this.check("ckpt_ucx_unexpose", status);
  }

  /** A connection to the Ucx at `address` ("ip:port"); a failure shows in its fetches. */
  connect(address: string): UcxPeer {
    const out: Ptr[] = [0n];
    this.check("ckpt_ucx_connect", this.ctx.lib.native.ucxConnect(this.handle, address, out));
    return new UcxPeer(this, out[0] as Ptr, address);
  }

  /** Completions of fetches, waiting up to timeoutMs for the first. */
  async wait(timeoutMs: number, max = 256): Promise<Completion[]> {
    const ops = new BigUint64Array(max);
    const statuses = new Int32Array(max);
    const n = [0];
    const args = [this.handle, timeoutMs, ops, statuses, max, n];
    this.check("ckpt_ucx_wait", await promisify<number>(this.ctx.lib.native.ucxWait, args));
    const count = n[0] as number;
    return Array.from({ length: count }, (_, i) => ({ op: ops[i] as bigint, status: statuses[i] as number }));
  }

  /** Drops every peer and connection and frees the worker; nothing else may be using it. */
  async destroy(): Promise<void> {
    this.check("ckpt_ucx_destroy", await promisify<number>(this.ctx.lib.native.ucxDestroy, [this.handle]));
  }
}

export class UcxPeer {
  constructor(
    readonly ucx: Ucx,
    readonly handle: Ptr,
    readonly address: string,
  ) {}

  /** Queues a fetch of [offset, offset+len) of the peer's region into dst (pinned); returns its op id. */
  fetch(region: Exposed, offset: number, len: number, dst: Ptr): bigint {
    const op = [0n];
    const status = this.ucx.ctx.lib.native.ucxFetch(this.handle, region.id, region.key, offset, len, dst, op);
    this.ucx.ctx.lib.check("ckpt_ucx_fetch", status, this.ucx.ctx.ptr);
    return BigInt(op[0] as bigint | number);
  }

  /** Why the connection failed, if it did. */
  error(): string | undefined {
    const buf = Buffer.alloc(256);
    const status = this.ucx.ctx.lib.native.ucxPeerError(this.handle, buf, buf.length);
    return status === 0 ? undefined : buf.toString("utf8", 0, buf.indexOf(0));
  }

  /** Closes it: fetches in flight end cancelled. The handle is not used again. */
  disconnect(): void {
    this.ucx.ctx.lib.check("ckpt_ucx_disconnect", this.ucx.ctx.lib.native.ucxDisconnect(this.handle), this.ucx.ctx.ptr);
  }
}
