/**
 * The typed surface of libckpt: a Library (one loaded .so) makes Contexts; a Context owns
 * pinned memory, device buffers, streams and events. Every status passes through check().
 * Calls that may block (allocation, pinning, waits, reads) are async and run on koffi's
 * worker threads, so the event loop keeps serving.
 */
import {
  CKPT_COMM_ID_BYTES,
  CKPT_EABI,
  CKPT_EAGAIN,
  CKPT_EINVAL,
  CKPT_ERROR_BYTES,
  CKPT_ETIMEDOUT,
  CKPT_HASH_CHUNK,
  CKPT_REGISTER_READONLY,
} from "./constants.ts";
import { CkptError } from "./errors.ts";
import {
  ABI_VERSION,
  CtxOptions,
  DeviceInfo,
  IpcHandle,
  loadNative,
  type Native,
  NativeCounter,
  sizeOf,
  viewMemory,
} from "./library.ts";

export type Backend = "cuda" | "host";

export interface DeviceInfoRecord {
  index: number;
  uuid: string;
  name: string;
  freeBytes: number;
  totalBytes: number;
  pciBus: number;
  numaNode: number;
}

/** Plain bytes describing a device buffer that another process can map. */
export interface IpcHandleRecord {
  kind: number;
  len: number;
  device: number;
  pid: number;
  data: Uint8Array;
}

export interface ContextOptions {
  /** Host backend: number of simulated devices (default 1). */
  hostDevices?: number;
  /** NCCL library to dlopen (default libnccl.so.2). */
  ncclPath?: string;
}

type Ptr = bigint;

/** The arguments of async calls in flight: memory they pass by pointer stays alive until the call returns. */
const inFlight = new Set<unknown[]>();

export function promisify<T>(fn: Native[keyof Native], args: unknown[]): Promise<T> {
  return new Promise((resolve, reject) => {
    inFlight.add(args);
    fn.async(...args, (err: unknown, res: T) => {
      inFlight.delete(args);
      if (err) reject(err);
      else resolve(res);
    });
  });
}

/** ckpt_broadcast's arguments: the local ranks' buffers and streams as arrays of handles. */
function broadcastArgs(comm: Comm, root: number, bufs: DeviceBuffer[], streams: Stream[], offset: number, len: number) {
  const handles = (xs: { handle: Ptr }[]) => new BigUint64Array(xs.map((x) => x.handle));
  return [comm.handle, root, handles(bufs), handles(streams), offset, len];
}

/** One loaded libckpt shared object. */
export class Library {
  readonly native: Native;
  readonly backend: Backend;
  readonly path: string;

  constructor(path: string) {
    this.path = path;
    this.native = loadNative(path);
    const abi = this.native.abiVersion();
    if (abi !== ABI_VERSION) {
      throw new CkptError("load", CKPT_EABI, "CKPT_EABI", `${path} has ABI ${abi}, ffi/ declares ${ABI_VERSION}`, "");
    }
    this.backend = this.native.backend() as Backend;
  }

  /** Throws a CkptError for a negative status; ctx supplies the detail when given. */
  check(call: string, status: number, ctx?: Ptr): void {
    if (status >= 0) return;
    let detail = "";
    if (ctx !== undefined) {
      const buf = Buffer.alloc(CKPT_ERROR_BYTES);
      this.native.lastError(ctx, buf, buf.length);
      detail = buf.toString("utf8", 0, buf.indexOf(0));
    }
    throw new CkptError(call, status, this.native.errName(status), this.native.strerror(status), detail);
  }

  /** Creates a context; on the CUDA backend this initializes the runtime (about a second). */
  async createContext(options: ContextOptions = {}): Promise<Context> {
    const opts = {
      size: sizeOf(CtxOptions),
      abi_version: ABI_VERSION,
      host_devices: options.hostDevices ?? 0,
      reserved: 0,
      nccl_path: options.ncclPath ?? null,
    };
    const out: Ptr[] = [0n];
    this.check("ckpt_ctx_create", await promisify<number>(this.native.ctxCreate, [opts, out]));
    return new Context(this, out[0] as Ptr);
  }

  /** Sends a state line to systemd's NOTIFY_SOCKET, if set (sd_notify). */
  sdNotify(state: string): void {
    this.check("ckpt_sd_notify", this.native.sdNotify(state));
  }

  /** Who is at the other end of a connected Unix socket (SO_PEERCRED, SO_PEERGROUPS, as of its connect). */
  peerCred(fd: number): PeerCred {
    const pid = [0];
    const uid = [0];
    const gid = [0];
    this.check("ckpt_peer_cred", this.native.peerCred(fd, pid, uid, gid));
    // Room for the usual few groups; more (up to NGROUPS_MAX) on a second call, told how many.
    let groups = new Uint32Array(PEER_GROUPS_GUESS);
    const n = [groups.length];
    let status = this.native.peerGroups(fd, groups, n);
    if (status === CKPT_EINVAL && (n[0] as number) > groups.length) {
      groups = new Uint32Array(n[0] as number);
      status = this.native.peerGroups(fd, groups, n);
    }
    this.check("ckpt_peer_groups", status);
    return { pid: pid[0] as number, uid: uid[0] as number, gid: gid[0] as number, groups: [...groups.slice(0, n[0])] };
  }
}

/** Supplementary groups a connecting process is first assumed to have at most. */
const PEER_GROUPS_GUESS = 64;

export interface PeerCred {
  pid: number;
  uid: number;
  gid: number;
  /** Supplementary groups. */
  groups: number[];
}

/** A delta ckpt_delta_find found: written out (and freed) by take, or freed. */
export interface FoundDelta {
  /** Writes the positions, the new values and the old values to these host addresses (on a worker thread). */
  take(positions: bigint, newValues: bigint, oldValues: bigint): Promise<void>;
  free(): void;
}

export class HostMemory {
  constructor(
    readonly address: Ptr,
    readonly len: number,
  ) {}

  /** The bytes as a Uint8Array without a copy (for checks and small writes, not the data path). */
  view(len = this.len, offset = 0): Uint8Array {
    return viewMemory(this.address + BigInt(offset), len);
  }
}

export class DeviceBuffer {
  constructor(
    readonly handle: Ptr,
    readonly device: number,
    readonly len: number,
    readonly address: Ptr,
  ) {}
}

export class Stream {
  constructor(
    readonly handle: Ptr,
    readonly device: number,
  ) {}
}

export class Event {
  constructor(
    readonly handle: Ptr,
    readonly device: number,
  ) {}
}

/** Ranks of one communicator owned by this process, one per local device. */
export class Comm {
  constructor(
    readonly handle: Ptr,
    readonly nranks: number,
    readonly firstRank: number,
    readonly devices: number[],
  ) {}
}

export class Context {
  constructor(
    readonly lib: Library,
    readonly ptr: Ptr,
  ) {}

  private check(call: string, status: number): void {
    this.lib.check(call, status, this.ptr);
  }

  get backend(): Backend {
    return this.lib.backend;
  }

  deviceCount(): number {
    const out = [0];
    this.check("ckpt_device_count", this.lib.native.deviceCount(this.ptr, out));
    return out[0] as number;
  }

  deviceInfo(index: number): DeviceInfoRecord {
    const info = { size: sizeOf(DeviceInfo) } as Record<string, unknown>;
    this.check("ckpt_device_info_get", this.lib.native.deviceInfo(this.ptr, index, info));
    return {
      index: info.index as number,
      uuid: info.uuid as string,
      name: info.name as string,
      freeBytes: Number(info.free_bytes),
      totalBytes: Number(info.total_bytes),
      pciBus: info.pci_bus as number,
      numaNode: info.numa_node as number,
    };
  }

  devices(): DeviceInfoRecord[] {
    return Array.from({ length: this.deviceCount() }, (_, i) => this.deviceInfo(i));
  }

  /** Allocates pinned host memory; its contents are undefined until written (as in ckpt.h). */
  async hostAlloc(len: number): Promise<HostMemory> {
    const out: Ptr[] = [0n];
    this.check("ckpt_host_alloc", await promisify(this.lib.native.hostAlloc, [this.ptr, len, out]));
    return new HostMemory(out[0] as Ptr, len);
  }

  async hostFree(mem: HostMemory): Promise<void> {
    this.check("ckpt_host_free", await promisify(this.lib.native.hostFree, [this.ptr, mem.address]));
  }

  /** Pins an existing mapping in place; the caller keeps it mapped until hostUnregister. */
  async hostRegister(address: Ptr, len: number, readonly = false): Promise<HostMemory> {
    const flags = readonly ? CKPT_REGISTER_READONLY : 0;
    const status = await promisify<number>(this.lib.native.hostRegister, [this.ptr, address, len, flags]);
    this.check("ckpt_host_register", status);
    return new HostMemory(address, len);
  }

  async hostUnregister(mem: HostMemory): Promise<void> {
    this.check("ckpt_host_unregister", await promisify(this.lib.native.hostUnregister, [this.ptr, mem.address]));
  }

  async bufAlloc(device: number, len: number): Promise<DeviceBuffer> {
    const out: Ptr[] = [0n];
    this.check("ckpt_buf_alloc", await promisify(this.lib.native.bufAlloc, [this.ptr, device, len, out]));
    return this.describe(out[0] as Ptr);
  }

  private describe(handle: Ptr): DeviceBuffer {
    const address: Ptr[] = [0n];
    const len = [0];
    const device = [0];
    this.check("ckpt_buf_info", this.lib.native.bufInfo(handle, address, len, device));
    return new DeviceBuffer(handle, device[0] as number, Number(len[0]), BigInt(address[0] as Ptr));
  }

  async bufFree(buf: DeviceBuffer): Promise<void> {
    this.check("ckpt_buf_free", await promisify(this.lib.native.bufFree, [buf.handle]));
  }

  /** Reads bytes of a device buffer into dst (blocking copy, on a worker thread). */
  async bufRead(buf: DeviceBuffer, offset: number, dst: Uint8Array): Promise<void> {
    const status = await promisify<number>(this.lib.native.bufRead, [buf.handle, offset, dst, dst.byteLength]);
    this.check("ckpt_buf_read", status);
  }

  bufExport(buf: DeviceBuffer): IpcHandleRecord {
    const h = { size: sizeOf(IpcHandle) } as Record<string, unknown>;
    this.check("ckpt_buf_export", this.lib.native.bufExport(buf.handle, h));
    return {
      kind: h.kind as number,
      len: Number(h.len),
      device: h.device as number,
      pid: h.pid as number,
      data: new Uint8Array(h.data as Uint8Array),
    };
  }

  /**
   * The chunk hashes (ckpt.h: CKPT_HASH_CHUNK bytes each) of each (buffer index, offset, len)
   * triple of `ranges` over `bufs`, hashed where the bytes are (a kernel on their GPU), range
   * after range: ceil(len / CKPT_HASH_CHUNK) per range.
   */
  async bufChunkHashes(bufs: DeviceBuffer[], ranges: BigUint64Array, threads: number): Promise<BigUint64Array> {
    if (ranges.length % 3 !== 0) throw new RangeError("ranges must hold (buffer, offset, len) triples");
    const n = ranges.length / 3;
    let total = 0;
    for (let i = 0; i < n; i++) total += Math.ceil(Number(ranges[3 * i + 2]) / CKPT_HASH_CHUNK);
    const chunks = new BigUint64Array(Math.max(1, total));
    if (n === 0) return chunks.subarray(0, 0);
    const handles = new BigUint64Array(bufs.map((b) => b.handle));
    const args = [handles, bufs.length, ranges, n, new BigUint64Array(n), chunks, threads];
    this.check("ckpt_buf_hash", await promisify<number>(this.lib.native.bufHash, args));
    return chunks.subarray(0, total);
  }

  /**
   * The ckpt hash of each (address, len) pair of host memory, and its chunk hashes (range after
   * range), on up to `threads` threads.
   */
  async chunkHashes(
    ranges: BigUint64Array,
    threads: number,
  ): Promise<{ hashes: BigUint64Array; chunks: BigUint64Array }> {
    if (ranges.length % 2 !== 0) throw new RangeError("ranges must hold (address, len) pairs");
    const n = ranges.length / 2;
    let total = 0;
    for (let i = 0; i < n; i++) total += Math.ceil(Number(ranges[2 * i + 1]) / CKPT_HASH_CHUNK);
    const chunks = new BigUint64Array(Math.max(1, total));
    const hashes = new BigUint64Array(n);
    if (n === 0) return { hashes, chunks: chunks.subarray(0, 0) };
    const args = [this.ptr, ranges, n, hashes, chunks, threads, null];
    this.check("ckpt_hash", await promisify<number>(this.lib.native.hash, args));
    return { hashes, chunks: chunks.subarray(0, total) };
  }

  /**
   * The ckpt hash of each (buffer index, offset, len) triple in `ranges`, over buffers of one
   * device, computed on that device (host backend: on up to `threads` threads).
   */
  async bufHash(bufs: DeviceBuffer[], ranges: BigUint64Array, threads: number): Promise<BigUint64Array> {
    if (ranges.length % 3 !== 0) throw new RangeError("ranges must hold (buffer, offset, len) triples");
    const hashes = new BigUint64Array(ranges.length / 3);
    if (hashes.length === 0) return hashes;
    const handles = new BigUint64Array(bufs.map((b) => b.handle));
    const args = [handles, bufs.length, ranges, hashes.length, hashes, null, threads];
    this.check("ckpt_buf_hash", await promisify<number>(this.lib.native.bufHash, args));
    return hashes;
  }

  async bufImport(handle: IpcHandleRecord): Promise<DeviceBuffer> {
    const h = { size: sizeOf(IpcHandle), ...handle };
    const out: Ptr[] = [0n];
    this.check("ckpt_buf_import", await promisify(this.lib.native.bufImport, [this.ptr, h, out]));
    return this.describe(out[0] as Ptr);
  }

  streamCreate(device: number): Stream {
    const out: Ptr[] = [0n];
    this.check("ckpt_stream_create", this.lib.native.streamCreate(this.ptr, device, out));
    return new Stream(out[0] as Ptr, device);
  }

  /** Waits for the stream's work, then destroys it. */
  async streamDestroy(stream: Stream): Promise<void> {
    this.check("ckpt_stream_destroy", await promisify(this.lib.native.streamDestroy, [stream.handle]));
  }

  /**
   * Queues host-to-device copies; `ranges` holds (host address, buffer offset, len) triples.
   * Returns at once; record an event to learn when the bytes arrived.
   */
  h2dAsync(stream: Stream, dst: DeviceBuffer, ranges: BigUint64Array): void {
    if (ranges.length % 3 !== 0) throw new RangeError("ranges must hold (host, offset, len) triples");
    this.check("ckpt_h2d_async", this.lib.native.h2dAsync(stream.handle, dst.handle, ranges, ranges.length / 3));
  }

  /** Queues device-to-host copies out of `src`, over the same (host address, buffer offset, len) triples. */
  d2hAsync(stream: Stream, src: DeviceBuffer, ranges: BigUint64Array): void {
    if (ranges.length % 3 !== 0) throw new RangeError("ranges must hold (host, offset, len) triples");
    this.check("ckpt_d2h_async", this.lib.native.d2hAsync(stream.handle, src.handle, ranges, ranges.length / 3));
  }

  eventCreate(device: number): Event {
    const out: Ptr[] = [0n];
    this.check("ckpt_event_create", this.lib.native.eventCreate(this.ptr, device, out));
    return new Event(out[0] as Ptr, device);
  }

  eventDestroy(event: Event): void {
    this.check("ckpt_event_destroy", this.lib.native.eventDestroy(event.handle));
  }

  eventRecord(event: Event, stream: Stream): void {
    this.check("ckpt_event_record", this.lib.native.eventRecord(event.handle, stream.handle));
  }

  /** Work queued on `stream` after this waits for `event`, without blocking the host. */
  streamWaitEvent(stream: Stream, event: Event): void {
    this.check("ckpt_stream_wait_event", this.lib.native.streamWaitEvent(stream.handle, event.handle));
  }

  /** A new communicator id to give every participant of commInit. */
  commIdNew(): Uint8Array {
    const id = new Uint8Array(CKPT_COMM_ID_BYTES);
    this.check("ckpt_comm_id_new", this.lib.native.commIdNew(this.ptr, id));
    return id;
  }

  /**
   * Joins communicator `id` with `devices` as ranks firstRank..; waits until all ranks joined,
   * or fails (CKPT_ETIMEDOUT) after timeoutMs (omitted: no limit).
   */
  async commInit(id: Uint8Array, nranks: number, firstRank: number, devices: number[], timeoutMs = -1): Promise<Comm> {
    const out: Ptr[] = [0n];
    const args = [this.ptr, id, nranks, firstRank, devices.length, new Int32Array(devices), timeoutMs, out];
    this.check("ckpt_comm_init", await promisify(this.lib.native.commInit, args));
    return new Comm(out[0] as Ptr, nranks, firstRank, [...devices]);
  }

  async commDestroy(comm: Comm): Promise<void> {
    this.check("ckpt_comm_destroy", await promisify(this.lib.native.commDestroy, [comm.handle]));
  }

  async commAbort(comm: Comm): Promise<void> {
    this.check("ckpt_comm_abort", await promisify(this.lib.native.commAbort, [comm.handle]));
  }

  /** Queues a broadcast from global rank `root` of [offset, offset+len) of each local rank's buffer. */
  broadcast(comm: Comm, root: number, bufs: DeviceBuffer[], streams: Stream[], offset: number, len: number): void {
    this.check("ckpt_broadcast", this.lib.native.broadcast(...broadcastArgs(comm, root, bufs, streams, offset, len)));
  }

  /**
   * The same on a worker thread: on a communicator joined with a time limit (non-blocking in
   * NCCL) the call waits, up to that limit, for NCCL to take the work; its first collective
   * connects the ranks. Calls on one communicator must not overlap: await each.
   */
  async broadcastAsync(
    comm: Comm,
    root: number,
    bufs: DeviceBuffer[],
    streams: Stream[],
    offset: number,
    len: number,
  ): Promise<void> {
    const args = broadcastArgs(comm, root, bufs, streams, offset, len);
    this.check("ckpt_broadcast", await promisify<number>(this.lib.native.broadcast, args));
  }

  /** True when the event has completed. */
  eventQuery(event: Event): boolean {
    const status = this.lib.native.eventQuery(event.handle);
    if (status === CKPT_EAGAIN) return false;
    this.check("ckpt_event_query", status);
    return true;
  }

  /** Waits on a worker thread; false on timeout (timeoutMs < 0: no limit). */
  async eventWait(event: Event, timeoutMs: number): Promise<boolean> {
    const status = await promisify<number>(this.lib.native.eventWait, [event.handle, timeoutMs]);
    if (status === CKPT_ETIMEDOUT) return false;
    this.check("ckpt_event_wait", status);
    return true;
  }

  /** Maps a whole file read-only (on tmpfs: the file's own pages, no copy). */
  async fileMap(path: string): Promise<HostMemory> {
    const out: Ptr[] = [0n];
    const len = [0];
    this.check("ckpt_file_map", await promisify(this.lib.native.fileMap, [this.ptr, path, out, len]));
    return new HostMemory(out[0] as Ptr, Number(len[0]));
  }

  async fileUnmap(mem: HostMemory): Promise<void> {
    this.check("ckpt_file_unmap", await promisify(this.lib.native.fileUnmap, [this.ptr, mem.address, mem.len]));
  }

  /** Reads len bytes at offset of a file to a host address, with parallel preads. */
  async fileRead(path: string, offset: number, len: number, dst: Ptr, threads: number): Promise<void> {
    const status = await promisify<number>(this.lib.native.fileRead, [this.ptr, path, offset, len, dst, threads]);
    this.check("ckpt_file_read", status);
  }

  /** Copies each (dst, src, len) triple of host memory, on up to `threads` threads (sources guarded). */
  async hostCopy(ranges: BigUint64Array, threads: number): Promise<void> {
    if (ranges.length % 3 !== 0) throw new RangeError("ranges must hold (dst, src, len) triples");
    if (ranges.length === 0) return;
    const args = [this.ptr, ranges, ranges.length / 3, threads];
    this.check("ckpt_host_copy", await promisify<number>(this.lib.native.hostCopy, args));
  }

  /**
   * fileRead that also returns the ckpt hash of each (file offset, len) pair in `ranges`,
   * each chunk hashed as it lands (inside the read, not overlapping).
   */
  async fileReadHash(
    path: string,
    offset: number,
    len: number,
    dst: Ptr,
    ranges: BigUint64Array,
    threads: number,
  ): Promise<BigUint64Array> {
    if (ranges.length % 2 !== 0) throw new RangeError("ranges must hold (offset, len) pairs");
    const hashes = new BigUint64Array(Math.max(1, ranges.length / 2));
    const args = [this.ptr, path, offset, len, dst, ranges, ranges.length / 2, hashes, threads];
    this.check("ckpt_file_read_hash", await promisify<number>(this.lib.native.fileReadHash, args));
    return hashes.subarray(0, ranges.length / 2);
  }

  /**
   * Copies len bytes of host memory (a mapped file) out, on a worker thread; a read of pages
   * its file lost (truncated under the mapping) throws CKPT_EFAULT instead of killing the
   * process, as a view() of them would. For headers and checks, not the data path.
   */
  async hostRead(mem: HostMemory, len: number, offset = 0): Promise<Uint8Array> {
    if (offset < 0 || len < 0 || offset + len > mem.len) {
      throw new RangeError(`read of ${len} bytes at ${offset} outside ${mem.len} bytes`);
    }
    const out = new Uint8Array(len);
    const args = [this.ptr, mem.address + BigInt(offset), out, len];
    this.check("ckpt_host_read", await promisify<number>(this.lib.native.hostRead, args));
    return out;
  }

  /**
   * The ckpt hash (ckpt.h: XXH64 of each 64 KiB, then of those) of each (address, len) pair in
   * `ranges`, on up to `threads` threads. onProgress, if given, sees the bytes hashed so far
   * every `everyMs` while it runs.
   */
  async hash(
    ranges: BigUint64Array,
    threads: number,
    onProgress?: (bytes: number) => void,
    everyMs = 50,
  ): Promise<BigUint64Array> {
    if (ranges.length % 2 !== 0) throw new RangeError("ranges must hold (address, len) pairs");
    const hashes = new BigUint64Array(ranges.length / 2);
    if (hashes.length === 0) return hashes;
    const counter = new NativeCounter();
    const timer = onProgress ? setInterval(() => onProgress(counter.read()), everyMs) : undefined;
    try {
      const args = [this.ptr, ranges, hashes.length, hashes, null, threads, counter.address];
      this.check("ckpt_hash", await promisify<number>(this.lib.native.hash, args));
      onProgress?.(counter.read());
    } finally {
      clearInterval(timer);
      counter.free();
    }
    return hashes;
  }

  /**
   * The elements of `elem` bytes that differ between len bytes at `base` and at `next` (host
   * addresses, read guarded), found in one pass on up to `threads` threads: their count, and
   * the delta to take (none when nothing differs, or when more than `limit` do: count is then
   * limit + 1). A delta holds memory until taken or freed.
   */
  async deltaFind(
    base: bigint,
    next: bigint,
    len: number,
    elem: number,
    limit: number,
    threads: number,
  ): Promise<{ count: number; delta?: FoundDelta }> {
    const out: unknown[] = [null];
    const count = [0];
    const args = [this.ptr, base, next, len, elem, limit, threads, out, count];
    this.check("ckpt_delta_find", await promisify<number>(this.lib.native.deltaFind, args));
    const n = Number(count[0]);
    if (!out[0]) return { count: n };
    const native = this.lib.native;
    let handle: unknown = out[0];
    const take = async (positions: bigint, newValues: bigint, oldValues: bigint) => {
      if (!handle) throw new Error("a delta is taken once");
      const h = handle;
      handle = undefined;
      const status = await promisify<number>(native.deltaTake, [h, positions, newValues, oldValues]);
      this.check("ckpt_delta_take", status);
    };
    const free = () => {
      if (handle) native.deltaFree(handle);
      handle = undefined;
    };
    return { count: n, delta: { take, free } };
  }

  /** Element positions[i] of the len bytes at `dst` takes values[i], for each of `count` (host addresses). */
  async deltaApply(dst: bigint, len: number, elem: number, positions: bigint, values: bigint, count: number) {
    const args = [this.ptr, dst, len, elem, positions, values, count];
    this.check("ckpt_delta_apply", await promisify<number>(this.lib.native.deltaApply, args));
  }

  /** NCCL's version (2.28.3 = 22803); throws CkptError when NCCL is absent or unsupported. */
  ncclVersion(): number {
    const out = [0];
    this.check("ckpt_nccl_version", this.lib.native.ncclVersion(this.ptr, out));
    return out[0] as number;
  }

  /** Destroys the context; throws CKPT_EBUSY while anything made from it is alive. */
  async destroy(): Promise<void> {
    this.check("ckpt_ctx_destroy", await promisify(this.lib.native.ctxDestroy, [this.ptr]));
  }
}
