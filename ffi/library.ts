/**
 * Every koffi declaration of libckpt (cuda-lib/include/ckpt.h). Nothing else in the
 * codebase imports koffi. Parameters carry their C types; pointers are BigInts (koffi 3).
 */
import koffi from "koffi";
import { CKPT_DEVICE_NAME_BYTES, CKPT_IPC_DATA_BYTES, CKPT_UUID_BYTES } from "./constants.ts";

/**
 * The ABI these declarations are written for, by hand: when ckpt.h's CKPT_ABI_VERSION moves,
 * a test fails until the declarations below are brought up to date and this is raised.
 */
export const ABI_VERSION = 6;

export const CtxOptions = koffi.struct("ckpt_ctx_options", {
  size: "uint32_t",
  abi_version: "uint32_t",
  host_devices: "int32_t",
  reserved: "int32_t",
  nccl_path: "const char *",
});

export const DeviceInfo = koffi.struct("ckpt_device_info", {
  size: "uint32_t",
  index: "int32_t",
  uuid: koffi.array("char", CKPT_UUID_BYTES, "String"),
  name: koffi.array("char", CKPT_DEVICE_NAME_BYTES, "String"),
  free_bytes: "uint64_t",
  total_bytes: "uint64_t",
  pci_bus: "int32_t",
  numa_node: "int32_t",
});

export const IpcHandle = koffi.struct("ckpt_ipc_handle", {
  size: "uint32_t",
  kind: "uint32_t",
  len: "uint64_t",
  device: "int32_t",
  pid: "int32_t",
  data: koffi.array("uint8_t", CKPT_IPC_DATA_BYTES, "Typed"),
});

export const UcxOptions = koffi.struct("ckpt_ucx_options", {
  size: "uint32_t",
  flags: "uint32_t",
  ucp_path: "const char *",
  transports: "const char *",
  listen: "const char *",
  max_inflight: "uint32_t",
  idle_ms: "uint32_t",
});

for (const name of [
  "ckpt_ctx",
  "ckpt_buf",
  "ckpt_stream",
  "ckpt_event",
  "ckpt_comm",
  "ckpt_ucx",
  "ckpt_ucx_peer",
  "ckpt_delta",
]) {
  koffi.pointer(name, koffi.opaque());
}

const SIGNATURES = {
  backend: "const char *ckpt_backend(void)",
  abiVersion: "uint32_t ckpt_abi_version(void)",
  errName: "const char *ckpt_err_name(int status)",
  strerror: "const char *ckpt_strerror(int status)",
  lastError: "int ckpt_last_error(ckpt_ctx ctx, char *buf, size_t len)",
  ctxCreate: "int ckpt_ctx_create(const ckpt_ctx_options *opts, _Out_ ckpt_ctx *out)",
  ctxDestroy: "int ckpt_ctx_destroy(ckpt_ctx ctx)",
  deviceCount: "int ckpt_device_count(ckpt_ctx ctx, _Out_ int32_t *count)",
  deviceInfo: "int ckpt_device_info_get(ckpt_ctx ctx, int32_t index, _Inout_ ckpt_device_info *info)",
  hostAlloc: "int ckpt_host_alloc(ckpt_ctx ctx, size_t len, _Out_ void **out)",
  hostFree: "int ckpt_host_free(ckpt_ctx ctx, void *ptr)",
  hostRegister: "int ckpt_host_register(ckpt_ctx ctx, void *ptr, size_t len, uint32_t flags)",
  hostUnregister: "int ckpt_host_unregister(ckpt_ctx ctx, void *ptr)",
  bufAlloc: "int ckpt_buf_alloc(ckpt_ctx ctx, int32_t device, size_t len, _Out_ ckpt_buf *out)",
  bufFree: "int ckpt_buf_free(ckpt_buf buf)",
  bufInfo: "int ckpt_buf_info(ckpt_buf buf, _Out_ uint64_t *address, _Out_ uint64_t *len, _Out_ int32_t *device)",
  bufRead: "int ckpt_buf_read(ckpt_buf buf, uint64_t offset, void *dst, uint64_t len)",
  bufExport: "int ckpt_buf_export(ckpt_buf buf, _Inout_ ckpt_ipc_handle *out)",
  bufImport: "int ckpt_buf_import(ckpt_ctx ctx, const ckpt_ipc_handle *handle, _Out_ ckpt_buf *out)",
  streamCreate: "int ckpt_stream_create(ckpt_ctx ctx, int32_t device, _Out_ ckpt_stream *out)",
  streamDestroy: "int ckpt_stream_destroy(ckpt_stream stream)",
  h2dAsync: "int ckpt_h2d_async(ckpt_stream stream, ckpt_buf dst, const void *ranges, size_t n)",
  d2hAsync: "int ckpt_d2h_async(ckpt_stream stream, ckpt_buf src, const void *ranges, size_t n)",
  eventCreate: "int ckpt_event_create(ckpt_ctx ctx, int32_t device, _Out_ ckpt_event *out)",
  eventDestroy: "int ckpt_event_destroy(ckpt_event event)",
  eventRecord: "int ckpt_event_record(ckpt_event event, ckpt_stream stream)",
  eventQuery: "int ckpt_event_query(ckpt_event event)",
  streamWaitEvent: "int ckpt_stream_wait_event(ckpt_stream stream, ckpt_event event)",
  commIdNew: "int ckpt_comm_id_new(ckpt_ctx ctx, _Out_ uint8_t *id)",
  commInit:
    "int ckpt_comm_init(ckpt_ctx ctx, const uint8_t *id, int32_t nranks, int32_t first_rank, int32_t ndev, const int32_t *devices, int64_t timeout_ms, _Out_ ckpt_comm *out)",
  commDestroy: "int ckpt_comm_destroy(ckpt_comm comm)",
  commAbort: "int ckpt_comm_abort(ckpt_comm comm)",
  broadcast:
    "int ckpt_broadcast(ckpt_comm comm, int32_t root, const void *bufs, const void *streams, uint64_t offset, uint64_t len)",
  eventWait: "int ckpt_event_wait(ckpt_event event, int64_t timeout_ms)",
  fileMap: "int ckpt_file_map(ckpt_ctx ctx, const char *path, _Out_ void **out, _Out_ uint64_t *len)",
  fileUnmap: "int ckpt_file_unmap(ckpt_ctx ctx, void *ptr, uint64_t len)",
  fileRead:
    "int ckpt_file_read(ckpt_ctx ctx, const char *path, uint64_t offset, uint64_t len, void *dst, int32_t threads)",
  fileReadHash:
    "int ckpt_file_read_hash(ckpt_ctx ctx, const char *path, uint64_t offset, uint64_t len, void *dst, const void *ranges, size_t n, _Out_ uint64_t *hashes, int32_t threads)",
  hostRead: "int ckpt_host_read(ckpt_ctx ctx, void *src, void *dst, uint64_t len)",
  hostCopy: "int ckpt_host_copy(ckpt_ctx ctx, const void *ranges, size_t n, int32_t threads)",
  hash: "int ckpt_hash(ckpt_ctx ctx, const void *ranges, size_t n, _Out_ uint64_t *hashes, void *chunk_hashes, int32_t threads, void *done_bytes)",
  deltaFind:
    "int ckpt_delta_find(ckpt_ctx ctx, void *base, void *next, uint64_t len, uint32_t elem, uint64_t limit, int32_t threads, _Out_ ckpt_delta *out, _Out_ uint64_t *count)",
  deltaTake: "int ckpt_delta_take(ckpt_delta delta, void *positions, void *new_values, void *old_values)",
  deltaFree: "void ckpt_delta_free(ckpt_delta delta)",
  deltaApply:
    "int ckpt_delta_apply(ckpt_ctx ctx, void *dst, uint64_t len, uint32_t elem, void *positions, void *values, uint64_t count)",
  bufHash:
    "int ckpt_buf_hash(const void *bufs, size_t nbufs, const void *ranges, size_t n, _Out_ uint64_t *hashes, void *chunk_hashes, int32_t threads)",
  ncclVersion: "int ckpt_nccl_version(ckpt_ctx ctx, _Out_ int32_t *version)",
  ucxCreate: "int ckpt_ucx_create(ckpt_ctx ctx, const ckpt_ucx_options *opts, _Out_ ckpt_ucx *out)",
  ucxDestroy: "int ckpt_ucx_destroy(ckpt_ucx ucx)",
  ucxInfo: "int ckpt_ucx_info(ckpt_ucx ucx, char *address, size_t len, _Out_ uint32_t *version)",
  ucxExpose: "int ckpt_ucx_expose(ckpt_ucx ucx, void *ptr, uint64_t len, _Out_ uint64_t *id, _Out_ uint8_t *key)",
  ucxUnexpose: "int ckpt_ucx_unexpose(ckpt_ucx ucx, uint64_t id, int64_t timeout_ms)",
  ucxConnect: "int ckpt_ucx_connect(ckpt_ucx ucx, const char *address, _Out_ ckpt_ucx_peer *out)",
  ucxDisconnect: "int ckpt_ucx_disconnect(ckpt_ucx_peer peer)",
  ucxPeerError: "int ckpt_ucx_peer_error(ckpt_ucx_peer peer, char *buf, size_t len)",
  ucxFetch:
    "int ckpt_ucx_fetch(ckpt_ucx_peer peer, uint64_t id, const uint8_t *key, uint64_t offset, uint64_t len, void *dst, _Out_ uint64_t *op)",
  ucxWait:
    "int ckpt_ucx_wait(ckpt_ucx ucx, int64_t timeout_ms, _Out_ uint64_t *ops, _Out_ int32_t *statuses, int32_t max, _Out_ int32_t *n)",
  sdNotify: "int ckpt_sd_notify(const char *state)",
  peerCred: "int ckpt_peer_cred(int32_t fd, _Out_ int32_t *pid, _Out_ uint32_t *uid, _Out_ uint32_t *gid)",
  peerGroups: "int ckpt_peer_groups(int32_t fd, uint32_t *groups, _Inout_ int32_t *n)",
} as const;

// biome-ignore lint/suspicious/noExplicitAny: koffi functions are typed by their C signature
type NativeFn = ((...args: any[]) => any) & { async: (...args: any[]) => void };

/** The bound functions of one loaded libckpt, keyed as in SIGNATURES. */
export type Native = { [K in keyof typeof SIGNATURES]: NativeFn };

let configured = false;

/** Loads a libckpt shared object and binds every function; throws if a symbol is missing. */
export function loadNative(path: string): Native {
  if (!configured) {
    // Async calls run on koffi's own stacks, 128 KiB by default: NCCL's communicator setup
    // across processes overflows that. Every libckpt call gets as much as a sync call has.
    // Updates wait on an event per slot and GPU at once: allow many queued async calls.
    koffi.config({ ...koffi.config(), async_stack_size: 2 << 20, max_async_calls: 4096 });
    configured = true;
  }
  const lib = koffi.load(path);
  const fns = {} as Record<string, NativeFn>;
  for (const [key, signature] of Object.entries(SIGNATURES)) {
    fns[key] = lib.func(signature) as NativeFn;
  }
  return fns as Native;
}

/** A view of native memory as bytes (for tests and checks, never the data path). */
export function viewMemory(address: bigint, len: number): Uint8Array {
  return new Uint8Array(koffi.view(address, len));
}

/** A uint64 counter in native memory that C threads update while a call runs. */
export class NativeCounter {
  readonly address: bigint = koffi.alloc("uint64_t", 1) as bigint;

  constructor() {
    koffi.encode(this.address, "uint64_t", 0);
  }

  read(): number {
    return Number(koffi.decode(this.address, "uint64_t"));
  }

  free(): void {
    koffi.free(this.address);
  }
}

/** Size in bytes of a declared struct, to check against the library at load. */
export function sizeOf(type: typeof CtxOptions | typeof UcxOptions): number {
  return koffi.sizeof(type);
}
