/* ckpt.h: the ckptd data plane. The only public header of libckpt-cuda.so and
 * libckpt-host.so, which export the same API.
 *
 * Conventions
 * - Every function returns an int: CKPT_OK (0) on success, a negative ckpt_status on failure.
 *   ckpt_last_error() copies out the detail of the context's last failure (which call,
 *   which CUDA error or errno, file:line).
 * - Handles are opaque. Every handle belongs to the context it was made from; a context is
 *   destroyed only after all of its handles are.
 * - Calls on different handles may run on different threads at once; a handle must not be
 *   freed while another thread uses it.
 * - Structs that cross the FFI start with a `size` field that the caller sets to
 *   sizeof(struct); a mismatch fails with CKPT_EABI before anything is touched.
 * - Ownership: the library never frees memory it did not allocate. Arrays passed in
 *   (ranges, handles, options) are copied or read during the call and not used after it
 *   returns; the bytes a range points at must stay valid until the copy's event completes.
 * - Signals: the first ckpt_ctx_create installs one process-wide SIGBUS handler (sigaction,
 *   SA_SIGINFO) and keeps the disposition it replaced. The library's CPU reads of host memory
 *   that may be a mapped file (ckpt_hash, ckpt_host_read, ckpt_host_copy, the host backend's
 *   ckpt_h2d_async copies) run under a per-thread guard: a SIGBUS inside the range being read (its file was
 *   truncated under the mapping) fails that operation with CKPT_EFAULT, naming the range and
 *   the faulting address, instead of killing the process. Every other SIGBUS goes to the
 *   replaced disposition (its handler is called; the default kills the process as before).
 *   The handler stays installed until the process exits, also after the library is unloaded,
 *   so do not dlclose it; a handler that the application installs later, without calling the
 *   one it replaces, switches the guard off. Buffers' memory and pinned allocations are the
 *   library's; mapped files stay the caller's (ckpt_file_map's mapping is unmapped only by
 *   ckpt_file_unmap), and a guarded failure leaves them mapped.
 */
#ifndef CKPT_H
#define CKPT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CKPT_ABI_VERSION 6

/* X(name, value, message): the one table of errors; names and messages derive from it. */
#define CKPT_STATUS_MAP(X)                                                        \
  X(OK, 0, "success")                                                             \
  X(EINVAL, -1, "invalid argument")                                               \
  X(EABI, -2, "struct size or ABI version mismatch between caller and library")   \
  X(ENOMEM, -3, "out of host memory")                                             \
  X(EDEVMEM, -4, "out of device memory")                                          \
  X(ENODEV, -5, "no such device")                                                 \
  X(ECUDA, -6, "CUDA call failed")                                                \
  X(ESYS, -7, "system call failed")                                               \
  X(ERANGE, -8, "range outside its buffer or outside pinned memory")              \
  X(EAGAIN, -9, "not complete yet")                                               \
  X(ETIMEDOUT, -10, "timed out")                                                  \
  X(EBUSY, -11, "resource still in use")                                          \
  X(EHANDLE, -12, "invalid, foreign or stale handle")                             \
  X(ENCCL, -13, "NCCL unavailable or failed")                                     \
  X(EUNSUPPORTED, -14, "not supported by this backend")                         \
  X(EFAULT, -15, "bus error reading mapped memory: its file was truncated under the mapping") \
  X(EUCX, -16, "UCX unavailable or failed")                                       \
  X(ECANCELED, -17, "cancelled")

typedef enum ckpt_status {
#define CKPT_X_ENUM(name, value, msg) CKPT_##name = value,
  CKPT_STATUS_MAP(CKPT_X_ENUM)
#undef CKPT_X_ENUM
} ckpt_status;

typedef struct ckpt_ctx ckpt_ctx;         /* a backend instance: devices, errors, regions */
typedef struct ckpt_buf ckpt_buf;         /* device memory, allocated here or imported */
typedef struct ckpt_stream ckpt_stream;   /* an ordered queue of asynchronous work on a device */
typedef struct ckpt_event ckpt_event;     /* a point in a stream that can be polled or waited on */

/* ---- library and errors ------------------------------------------------------------- */

/* The backend this library implements: "cuda" or "host". Static string. */
const char *ckpt_backend(void);
/* CKPT_ABI_VERSION as compiled into the library. */
uint32_t ckpt_abi_version(void);
/* "CKPT_EINVAL" etc. for a status; "CKPT_UNKNOWN" for other values. Static string. */
const char *ckpt_err_name(int status);
/* One-sentence message for a status. Static string. */
const char *ckpt_strerror(int status);
/* Copies the detail of the context's most recent failure into buf (NUL-terminated,
 * truncated to len; a detail is at most CKPT_ERROR_BYTES with its NUL). Returns the status of
 * that failure, CKPT_OK if none. */
int ckpt_last_error(ckpt_ctx *ctx, char *buf, size_t len);
#define CKPT_ERROR_BYTES 512

/* ---- context ------------------------------------------------------------------------- */

typedef struct ckpt_ctx_options {
  uint32_t size;          /* sizeof(ckpt_ctx_options) */
  uint32_t abi_version;   /* CKPT_ABI_VERSION of the caller */
  int32_t host_devices;   /* host backend: number of simulated devices, 0 means 1 */
  int32_t reserved;
  const char *nccl_path;  /* NCCL library to dlopen on first use; NULL: "libnccl.so.2" */
} ckpt_ctx_options;

/* Creates a context. Cheap on the host backend; initializes the CUDA runtime on the CUDA
 * backend (about a second). On failure *out is NULL and no detail is available beyond
 * the status, so a failure is also printed to stderr. */
int ckpt_ctx_create(const ckpt_ctx_options *opts, ckpt_ctx **out);
/* Destroys a context. CKPT_EBUSY, and nothing is freed, while any of its handles or
 * pinned regions is alive. */
int ckpt_ctx_destroy(ckpt_ctx *ctx);

/* ---- devices ------------------------------------------------------------------------- */

#define CKPT_UUID_BYTES 48         /* ckpt_device_info.uuid, NUL included */
#define CKPT_DEVICE_NAME_BYTES 96  /* ckpt_device_info.name, NUL included */

typedef struct ckpt_device_info {
  uint32_t size;          /* sizeof(ckpt_device_info), set by the caller */
  int32_t index;          /* device ordinal in this context */
  char uuid[CKPT_UUID_BYTES]; /* "GPU-xxxxxxxx-xxxx-..." (CUDA) or "HOST-<machine>-<index>" */
  char name[CKPT_DEVICE_NAME_BYTES]; /* marketing name, or "host memory" */
  uint64_t free_bytes;    /* free device memory now (host: MemAvailable) */
  uint64_t total_bytes;   /* total device memory (host: MemTotal) */
  int32_t pci_bus;        /* PCI bus id, -1 on the host backend */
  int32_t numa_node;      /* NUMA node closest to the device, -1 if unknown */
} ckpt_device_info;

/* Number of devices; 0 (and CKPT_OK) on a machine with no usable GPU. */
int ckpt_device_count(ckpt_ctx *ctx, int32_t *count);
/* Fills *info for device `index`. Queries the driver; a few microseconds. */
int ckpt_device_info_get(ckpt_ctx *ctx, int32_t index, ckpt_device_info *info);

/* ---- pinned host memory -------------------------------------------------------------- */

#define CKPT_REGISTER_READONLY 1u  /* the device only reads the region (mapped read-only files) */

/* Allocates len bytes of page-locked host memory; its contents are undefined until written.
 * Blocking; costly (page pinning):
 * allocate once and reuse. Free with ckpt_host_free. */
int ckpt_host_alloc(ckpt_ctx *ctx, size_t len, void **out);
int ckpt_host_free(ckpt_ctx *ctx, void *ptr);
/* Pins an existing mapping [ptr, ptr+len) in place (cudaHostRegister), so copies from it
 * run at full speed. The caller keeps owning the mapping and must keep it mapped until
 * ckpt_host_unregister. Blocking; about 0.05 s per GiB on CUDA (tmpfs mapping, H200).
 * A mapped file truncated while registered: the pinned pages leave the file but stay alive
 * until ckpt_host_unregister, so device copies keep reading what they held (no fault, and
 * nothing written to the file later reaches them), while CPU reads of the mapping fault
 * (CKPT_EFAULT in the library's guarded reads). */
int ckpt_host_register(ckpt_ctx *ctx, void *ptr, size_t len, uint32_t flags);
int ckpt_host_unregister(ckpt_ctx *ctx, void *ptr);

/* ---- device buffers ------------------------------------------------------------------ */

/* Allocates len bytes on a device. The bytes are undefined until written. Blocking. */
int ckpt_buf_alloc(ckpt_ctx *ctx, int32_t device, size_t len, ckpt_buf **out);
/* Frees an allocated buffer, or unmaps an imported one. Waits for nothing: the caller
 * ensures no stream still uses it. */
int ckpt_buf_free(ckpt_buf *buf);
/* Device address of the buffer (host backend: a host address) and its length. */
int ckpt_buf_info(ckpt_buf *buf, uint64_t *address, uint64_t *len, int32_t *device);
/* Copies len bytes at `offset` of the buffer into host memory dst. Blocking; for checks
 * and small reads, not the data path. */
int ckpt_buf_read(ckpt_buf *buf, uint64_t offset, void *dst, uint64_t len);

/* ---- sharing a device buffer with another process ------------------------------------ */

#define CKPT_IPC_DATA_BYTES 128    /* ckpt_ipc_handle.data */

typedef struct ckpt_ipc_handle {
  uint32_t size;          /* sizeof(ckpt_ipc_handle) */
  uint32_t kind;          /* 1: CUDA IPC handle in data[0..63]; 2: host, a path in data */
  uint64_t len;           /* buffer length in bytes */
  int32_t device;         /* device ordinal in the exporting process */
  int32_t pid;            /* exporting process */
  uint8_t data[CKPT_IPC_DATA_BYTES]; /* cudaIpcMemHandle_t, or a NUL-terminated "/proc/<pid>/fd/<n>" */
} ckpt_ipc_handle;

#define CKPT_IPC_CUDA 1u
#define CKPT_IPC_HOST 2u

/* Describes an allocated buffer so another process can map it. The handle stays valid
 * while the buffer is alive in this process. Cheap; the handle is plain bytes that can be
 * sent over any channel. Imported buffers cannot be exported again. */
int ckpt_buf_export(ckpt_buf *buf, ckpt_ipc_handle *out);
/* Maps another process's buffer into this one (cudaIpcOpenMemHandle; host: mmap of the
 * exporter's memfd). The mapping lives until ckpt_buf_free. A CUDA buffer cannot be
 * imported by the process that exported it (CKPT_ECUDA). */
int ckpt_buf_import(ckpt_ctx *ctx, const ckpt_ipc_handle *handle, ckpt_buf **out);

/* ---- streams, events, copies --------------------------------------------------------- */

/* One copy between host memory and a device buffer: len bytes at host address `host` (inside
 * memory pinned by ckpt_host_alloc or ckpt_host_register) and at byte `offset` of the buffer;
 * ckpt_h2d_async copies host to buffer, ckpt_d2h_async buffer to host. 24 bytes, fixed
 * layout, so callers can build arrays of them as packed little-endian uint64 triples. */
typedef struct ckpt_range {
  uint64_t host;
  uint64_t offset;
  uint64_t len;
} ckpt_range;

int ckpt_stream_create(ckpt_ctx *ctx, int32_t device, ckpt_stream **out);
/* Waits for the stream's queued work, then destroys it. */
int ckpt_stream_destroy(ckpt_stream *stream);

/* Queues host-to-device copies of n ranges into dst on the stream, and returns without
 * waiting. Every range is checked first (inside pinned memory, inside dst): one bad range
 * fails the call with CKPT_ERANGE and queues nothing. Record an event after it to learn
 * when the bytes have arrived. Host backend: a source whose file was truncated under its
 * mapping fails the stream with CKPT_EFAULT (guarded, see Signals), which every event recorded
 * on it afterwards, and every stream that waits on such an event, reports. CUDA: the copy is
 * DMA from the pages pinned by ckpt_host_register, which stay alive after a truncation, so
 * the device gets the bytes the pages held (see ckpt_host_register). */
int ckpt_h2d_async(ckpt_stream *stream, ckpt_buf *dst, const ckpt_range *ranges, size_t n);
/* Queues device-to-host copies of n ranges out of src (a buffer of this process or one
 * imported from another) into pinned host memory, on the stream, and returns without
 * waiting; every range is checked first, as for ckpt_h2d_async. Record an event after it to
 * learn when the bytes are in host memory. */
int ckpt_d2h_async(ckpt_stream *stream, ckpt_buf *src, const ckpt_range *ranges, size_t n);

int ckpt_event_create(ckpt_ctx *ctx, int32_t device, ckpt_event **out);
int ckpt_event_destroy(ckpt_event *event);
/* Marks the current end of the stream's queue; the event completes when the work queued
 * before it has. Re-recording an event moves it. Non-blocking. */
int ckpt_event_record(ckpt_event *event, ckpt_stream *stream);
/* Makes all work queued on `stream` after this call wait until `event` completes (its
 * latest record), without blocking the host; the event may belong to another device.
 * Non-blocking. */
int ckpt_stream_wait_event(ckpt_stream *stream, ckpt_event *event);

/* CKPT_OK if complete (or never recorded), CKPT_EAGAIN if not yet. Non-blocking. */
int ckpt_event_query(ckpt_event *event);
/* Blocks until the event completes or timeout_ms passes (negative: no limit).
 * CKPT_ETIMEDOUT on timeout; the event stays usable. */
int ckpt_event_wait(ckpt_event *event, int64_t timeout_ms);

/* ---- files and hashing (both backends, CPU only) ------------------------------------- */

/* Maps a whole file read-only and shared (the pages are the file's own: on tmpfs, no copy),
 * prefaulting them on the host backend (on CUDA, ckpt_host_register faults them in, faster).
 * *len gets the file size; an empty or non-regular file is CKPT_EINVAL.
 * The file may be renamed or unlinked afterwards; the mapping lives until ckpt_file_unmap,
 * which refuses (CKPT_EBUSY) while the mapping is still registered. To copy from it at full
 * speed, pin it with ckpt_host_register(..., CKPT_REGISTER_READONLY). Blocking: on the host
 * backend about 0.05 s per GiB on tmpfs (page-table setup), and on disk it reads the whole
 * file first; on CUDA it returns at once. */
int ckpt_file_map(ckpt_ctx *ctx, const char *path, void **out, uint64_t *len);
int ckpt_file_unmap(ckpt_ctx *ctx, void *ptr, uint64_t len);
/* Reads len bytes at `offset` of the file at `path` into dst with up to `threads` threads
 * issuing pread in parallel chunks. Fails with CKPT_ESYS naming the path if the file is
 * shorter than offset + len. Blocking. */
int ckpt_file_read(ckpt_ctx *ctx, const char *path, uint64_t offset, uint64_t len, void *dst,
                   int32_t threads);
/* ckpt_file_read that also hashes n ranges of what it reads (ckpt_hash's hashes), each chunk
 * right after it lands, while it is still in the CPU's cache: about the time of the read
 * alone. ranges holds (file offset, len) pairs inside [offset, offset + len) that do not
 * overlap (CKPT_EINVAL naming the first that does). Blocking. */
int ckpt_file_read_hash(ckpt_ctx *ctx, const char *path, uint64_t offset, uint64_t len, void *dst,
                        const uint64_t *ranges, size_t n, uint64_t *hashes, int32_t threads);
/* Copies len bytes of host memory at src (a mapped file, say) into dst, under the SIGBUS guard
 * (see Signals): CKPT_EFAULT naming the address instead of a crash when src's file was
 * truncated under its mapping. Blocking; for headers and checks, not the data path. */
int ckpt_host_read(ckpt_ctx *ctx, const void *src, void *dst, uint64_t len);
/* Copies n ranges of host memory, ranges holding (dst, src, len) triples of uint64, on up to
 * `threads` threads, each source read under the SIGBUS guard: CKPT_EFAULT naming the range
 * when its mapped file was truncated (what was copied is then undefined). Ranges must not
 * overlap one another's destinations. Blocking. */
int ckpt_host_copy(ckpt_ctx *ctx, const uint64_t *ranges, size_t n, int32_t threads);
/* The ckpt hash: XXH64 (seed 0) of each CKPT_HASH_CHUNK-byte chunk of a range (the last one
 * may be shorter; an empty range has none), then XXH64 of those chunk hashes taken as
 * little-endian uint64s. The chunks let many threads (or a GPU) hash one large tensor at once,
 * and let a part of a tensor be checked alone. */
#define CKPT_HASH_CHUNK 65536u /* 64 KiB: a 256 MiB bucket is 4096 chunks, hashed by as many GPU threads */

/* The ckpt hash of each of n host ranges; ranges holds n (address, len) pairs of uint64,
 * hashes receives n values. If chunk_hashes is not NULL it receives every range's chunk
 * hashes, range after range (ceil(len / CKPT_HASH_CHUNK) each). Chunks are spread over up to
 * `threads` threads; the memory need not be pinned. If done_bytes is not NULL, each chunk's
 * length is added to it atomically as that chunk finishes, so another thread can read the
 * progress while the call runs. A range whose mapped file was truncated fails the call with
 * CKPT_EFAULT naming the range (guarded, see Signals); the hashes are then undefined. Blocking. */
int ckpt_hash(ckpt_ctx *ctx, const uint64_t *ranges, size_t n, uint64_t *hashes, uint64_t *chunk_hashes,
              int32_t threads, uint64_t *done_bytes);

/* The ckpt hash of n ranges of device buffers, computed where the bytes are: one kernel over
 * every chunk, on the buffers' device and a stream of its own (host backend: ckpt_hash with
 * `threads` threads; CUDA ignores it). bufs holds nbufs buffers of one context and one device
 * (CKPT_EINVAL otherwise); ranges holds n (buffer index, offset, len) triples of uint64, each
 * inside its buffer (CKPT_ERANGE naming the first that is not); hashes and chunk_hashes as for
 * ckpt_hash. The bytes are read as they are when the kernel runs: work that writes them must
 * be complete first. Blocking. */
int ckpt_buf_hash(ckpt_buf *const *bufs, size_t nbufs, const uint64_t *ranges, size_t n, uint64_t *hashes,
                  uint64_t *chunk_hashes, int32_t threads);

/* ---- sparse deltas ------------------------------------------------------------------------ */

typedef struct ckpt_delta ckpt_delta; /* the differences found between two ranges */

/* Where two host ranges of len bytes (a tensor's base version and its next one) differ, element
 * by element, in one pass over both, spread over up to `threads` threads and read under the
 * SIGBUS guard (CKPT_EFAULT naming the range and offset); the memory need not be pinned. elem
 * is the element size (1, 2, 4 or 8 bytes; len a multiple of it); positions are uint32 element
 * indices (CKPT_EINVAL beyond 2^32 elements). *count receives how many elements differ, and
 * *out the delta to take, unless none do (*out NULL) or more than `limit` do: then the search
 * stops early, *count is limit + 1 and *out NULL (too many for a delta to pay). A delta is a
 * live handle of ctx until ckpt_delta_take or ckpt_delta_free. Blocking. */
int ckpt_delta_find(ckpt_ctx *ctx, const void *base, const void *next, uint64_t len, uint32_t elem,
                    uint64_t limit, int32_t threads, ckpt_delta **out, uint64_t *count);
/* Writes a delta's *count differences, their positions ascending: the positions, their values
 * in next (new_values, count x elem bytes) and, unless old_values is NULL, in base (the delta
 * back); then frees it. */
int ckpt_delta_take(ckpt_delta *delta, uint32_t *positions, void *new_values, void *old_values);
/* Frees a delta not taken. NULL is ignored. */
void ckpt_delta_free(ckpt_delta *delta);
/* Writes a delta into a host range of len bytes: element positions[i] takes values[i] (elem
 * bytes each), for i < count; CKPT_ERANGE naming the first position past the range, before
 * anything is written. Under the SIGBUS guard. Blocking. */
int ckpt_delta_apply(ckpt_ctx *ctx, void *dst, uint64_t len, uint32_t elem, const uint32_t *positions,
                     const void *values, uint64_t count);

/* ---- collectives ----------------------------------------------------------------------- */

typedef struct ckpt_comm ckpt_comm;   /* the ranks of one communicator that this process owns */

#define CKPT_COMM_ID_BYTES 128

/* Makes a new communicator id (ncclGetUniqueId; host: the bootstrap's address and a random
 * nonce), to be passed to every participant of ckpt_comm_init. Blocking (CUDA: may open a
 * socket); cheap. It starts a bootstrap thread in the calling process, which must stay alive
 * until every rank has joined. */
int ckpt_comm_id_new(ckpt_ctx *ctx, uint8_t id[CKPT_COMM_ID_BYTES]);
/* Joins communicator `id` of nranks ranks, with this process's ndev devices as ranks
 * first_rank .. first_rank + ndev - 1 (devices[i] is rank first_rank + i). Blocks until
 * every rank has joined, or fails with CKPT_ETIMEDOUT after timeout_ms (-1: no limit),
 * freeing what it made. CUDA: with a limit the communicator is non-blocking (NCCL >= 2.14;
 * an older NCCL blocks), and every later wait on it (a broadcast connecting the ranks, the
 * destroy's flush) has the same limit. The host backend connects the processes over TCP, binding and
 * advertising the IPv4 address in $CKPT_HOST_COMM_ADDR when it is set (otherwise loopback
 * for ckpt_comm_id_new's bootstrap, and the address that reaches the bootstrap for each
 * process's connections). */
int ckpt_comm_init(ckpt_ctx *ctx, const uint8_t id[CKPT_COMM_ID_BYTES], int32_t nranks, int32_t first_rank,
                   int32_t ndev, const int32_t *devices, int64_t timeout_ms, ckpt_comm **out);
/* Frees the communicator after its queued work completes: blocks until the queued
 * collectives finish, which needs the other processes to take part; use ckpt_comm_abort
 * when a peer may be gone. */
int ckpt_comm_destroy(ckpt_comm *comm);
/* Aborts the communicator's work in flight (ncclCommAbort), so that a dead peer cannot hang
 * the process, and frees it. */
int ckpt_comm_abort(ckpt_comm *comm);
/* Queues a broadcast of len bytes at byte `offset` of every rank's buffer, from global rank
 * `root` to all ranks (in place at the root). bufs[i] and streams[i] belong to this process's
 * local rank i (device devices[i] of ckpt_comm_init); each buffer must hold offset + len bytes
 * (CKPT_ERANGE). Returns without waiting for the bytes: record events on the streams to learn
 * completion. On a communicator joined with a time limit (CUDA: non-blocking NCCL) it may
 * wait up to that limit for NCCL to take the work: the first collective connects the ranks.
 * A communicator must be used by one thread at a time, with the same sequence of broadcasts
 * on every process; an event recorded on the root's stream after the call completes when the root's
 * buffer may be reused. */
int ckpt_broadcast(ckpt_comm *comm, int32_t root, ckpt_buf *const *bufs, ckpt_stream *const *streams,
                   uint64_t offset, uint64_t len);

/* ---- NCCL ---------------------------------------------------------------------------- */

/* Loads NCCL (dlopen, once per context) and reports its version as NCCL encodes it
 * (2.28.3 = 22803). CKPT_ENCCL with the loader's message when it is absent;
 * CKPT_EUNSUPPORTED on the host backend, whose collectives run over TCP. */
int ckpt_nccl_version(ckpt_ctx *ctx, int32_t *version);

/* ---- pulls between daemons over UCX --------------------------------------------------- */

typedef struct ckpt_ucx ckpt_ucx;           /* a UCX worker with its progress thread */
typedef struct ckpt_ucx_peer ckpt_ucx_peer; /* a connection to another process's ckpt_ucx */

#define CKPT_UCX_KEY_BYTES 16
#define CKPT_UCX_FAULT_CORRUPT 1u /* tests only: every range served has one byte changed */

typedef struct ckpt_ucx_options {
  uint32_t size;            /* sizeof(ckpt_ucx_options) */
  uint32_t flags;           /* CKPT_UCX_FAULT_CORRUPT or 0 */
  const char *ucp_path;     /* UCX's libucp to dlopen; NULL: "libucp.so.0" */
  const char *transports;   /* UCX_TLS-style list ("tcp", "rc,sm"...); NULL or "": UCX picks */
  const char *listen;       /* "ip:port" to serve exposed regions on (port 0: any); NULL: fetch only */
  uint32_t max_inflight;    /* requests served at once per connection: a peer asking more at
                             * once is disconnected; 0: 64 */
  uint32_t idle_ms;         /* a connection that names no region with its key for this long
                             * is closed, as is one refused (a wrong key or range) once told
                             * why; 0: 60000 */
} ckpt_ucx_options;

/* Loads UCX (dlopen; CKPT_EUCX naming the library when it is absent), makes a worker and
 * its progress thread, and listens when opts->listen is set. UCX reads its UCX_* variables;
 * UCX_ERROR_SIGNALS, unless set, is set to "" first, so that UCX installs no signal handler
 * over the SIGBUS guard (see Signals). Every UCX call runs on the progress thread; the calls
 * below queue work for it. */
int ckpt_ucx_create(ckpt_ctx *ctx, const ckpt_ucx_options *opts, ckpt_ucx **out);
/* Drops every peer (their fetches fail with CKPT_ECANCELED), closes every connection and the
 * listener, and frees the worker. No other call on it or its peers may be running. */
int ckpt_ucx_destroy(ckpt_ucx *ucx);
/* The listener's address as "ip:port" ("" without one) and UCX's version (1.13.1 = 11301). */
int ckpt_ucx_info(ckpt_ucx *ucx, char *address, size_t len, uint32_t *version);

/* Serves [ptr, ptr+len), which must lie in pinned memory of the context, to any peer that
 * names its id and key (16 random bytes, made here): hand both out only to whom may read it.
 * Requests outside it fail with CKPT_ERANGE, a wrong key with CKPT_EHANDLE. */
int ckpt_ucx_expose(ckpt_ucx *ucx, const void *ptr, uint64_t len, uint64_t *id, uint8_t key[CKPT_UCX_KEY_BYTES]);
/* Stops serving region `id` and returns once no send reads it any longer; the connections
 * of sends still reading it after timeout_ms are cut. Then the memory may be freed. Blocking. */
int ckpt_ucx_unexpose(ckpt_ucx *ucx, uint64_t id, int64_t timeout_ms);

/* Connects to the ckpt_ucx listening at "ip:port" ("[ip6]:port"). Returns at once; a
 * failure to connect fails the peer's fetches with CKPT_EUCX (see ckpt_ucx_peer_error).
 * Answers are taken only from this connection (another peer cannot answer its fetches). */
int ckpt_ucx_connect(ckpt_ucx *ucx, const char *address, ckpt_ucx_peer **out);
/* Closes the connection: fetches in flight complete with CKPT_ECANCELED (a range being
 * received completes once UCX has stopped writing it). The handle is freed once they have;
 * do not use it after this call. */
int ckpt_ucx_disconnect(ckpt_ucx_peer *peer);
/* CKPT_OK while the peer works; else its status, with why in buf ("connection to ... failed: ..."). */
int ckpt_ucx_peer_error(ckpt_ucx_peer *peer, char *buf, size_t len);
/* Fetches len bytes at `offset` of the peer's region `id` into dst (inside pinned memory of
 * the context), and returns at once with the op's id; its outcome comes from ckpt_ucx_wait.
 * dst must stay valid until then. */
int ckpt_ucx_fetch(ckpt_ucx_peer *peer, uint64_t id, const uint8_t key[CKPT_UCX_KEY_BYTES], uint64_t offset,
                   uint64_t len, void *dst, uint64_t *op);
/* Waits up to timeout_ms (0: not at all) for fetches to complete; writes up to max of them
 * (op id, status: CKPT_OK, or why it failed) and their count to *n (0 on timeout). */
int ckpt_ucx_wait(ckpt_ucx *ucx, int64_t timeout_ms, uint64_t *ops, int32_t *statuses, int32_t max, int32_t *n);

/* ---- service manager ----------------------------------------------------------------- */

/* Sends `state` (e.g. "READY=1") to the datagram socket named by $NOTIFY_SOCKET, as
 * sd_notify(3) does; an abstract socket when the name starts with '@'. CKPT_OK without
 * sending when the variable is unset. Non-blocking. Needs no context. */
int ckpt_sd_notify(const char *state);

/* The process at the other end of the connected Unix socket `fd`, as the kernel recorded it
 * when that process connected (SO_PEERCRED): its pid, uid and gid. Needs no context. */
int ckpt_peer_cred(int32_t fd, int32_t *pid, uint32_t *uid, uint32_t *gid);

/* The supplementary groups of that process, as of its connect (SO_PEERGROUPS): `*n` holds
 * the capacity of `groups` on entry and the count on return; CKPT_EINVAL with the count
 * needed in `*n` when they do not fit. Needs no context. */
int ckpt_peer_groups(int32_t fd, uint32_t *groups, int32_t *n);

#ifdef __cplusplus
}
#endif
#endif /* CKPT_H */
