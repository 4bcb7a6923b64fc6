/* The CUDA backend of ckpt.h: pinned host memory, device buffers, IPC, streams, events, and
 * collectives through NCCL (loaded at run time). */
#include "common.h"
#include "xxh64.h"

#include <cuda_runtime.h>
#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

extern "C" const int ckpt__map_populate = 0;

static_assert(sizeof(cudaIpcMemHandle_t) <= sizeof(((ckpt_ipc_handle *)0)->data),
              "cudaIpcMemHandle_t must fit in ckpt_ipc_handle.data");

struct ckpt_buf {
  ckpt_ctx *ctx;
  int32_t device;
  void *ptr;
  size_t len;
  int imported; /* 1: cudaIpcOpenMemHandle, 0: cudaMalloc */
};

struct ckpt_stream {
  ckpt_ctx *ctx;
  int32_t device;
  cudaStream_t stream;
};

struct ckpt_event {
  ckpt_ctx *ctx;
  int32_t device;
  cudaEvent_t event;
};

static ckpt__place buf_place(const ckpt_buf *b) { return ckpt__place{b->ctx, b->device, b->len, (uintptr_t)b->ptr}; }
static ckpt__place stream_place(const ckpt_stream *s) { return ckpt__place{s->ctx, s->device, 0, 0}; }
/* How ckpt__bcast_check sees this backend's handles. */
static const ckpt__places cuda_places = {buf_place, stream_place};

/* The ckpt_status for a CUDA error; oom_status is EDEVMEM or ENOMEM by what was allocated. */
static int cuda_status(cudaError_t err, int oom_status) {
  if (err == cudaErrorMemoryAllocation) return oom_status;
  if (err == cudaErrorInvalidDevice || err == cudaErrorNoDevice) return CKPT_ENODEV;
  return CKPT_ECUDA;
}

/* Records a failed CUDA call. cudaGetLastError() clears the (non-sticky) per-thread error
 * so that it does not resurface in a later, unrelated call. */
static int cuda_fail(ckpt_ctx *ctx, cudaError_t err, int status, const char *file, int line,
                     const char *what) {
  (void)cudaGetLastError();
  return ckpt__fail(ctx, status, file, line, "%s: %s: %s", what, cudaGetErrorName(err),
                    cudaGetErrorString(err));
}

/* `what` is the call's text, stringized here so that flag macros stay unexpanded. */
#define CUDA_CHECK_AS(ctx, call, what, oom_status)                                         \
  do {                                                                                     \
    cudaError_t ckpt_e_ = (call);                                                          \
    if (ckpt_e_ != cudaSuccess)                                                            \
      return cuda_fail((ctx), ckpt_e_, cuda_status(ckpt_e_, (oom_status)), __FILE__,       \
                       __LINE__, (what));                                                  \
  } while (0)
#define CUDA_CHECK(ctx, call) CUDA_CHECK_AS(ctx, call, #call, CKPT_EDEVMEM)
#define CUDA_CHECK_HOST(ctx, call) CUDA_CHECK_AS(ctx, call, #call, CKPT_ENOMEM)
#define CUDA_CHECK_GOTO(ctx, call, st, label)                                              \
  do {                                                                                     \
    cudaError_t ckpt_e_ = (call);                                                          \
    if (ckpt_e_ != cudaSuccess) {                                                          \
      (st) = cuda_fail((ctx), ckpt_e_, cuda_status(ckpt_e_, CKPT_EDEVMEM), __FILE__,       \
                       __LINE__, #call);                                                   \
      goto label;                                                                          \
    }                                                                                      \
  } while (0)

/* Errors that mean "no usable GPU here" rather than "the GPU failed". */
static int no_gpu_error(cudaError_t err) {
  return err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver ||
         err == cudaErrorStubLibrary;
}

CKPT_API const char *ckpt_backend(void) { return "cuda"; }

/* NCCL's entry points (see the NCCL section); ctx->nccl_lib holds one once loaded. */
typedef struct nccl_api nccl_api;
static void nccl_api_free(nccl_api *api);

/* ---- context ------------------------------------------------------------------------- */

CKPT_API int ckpt_ctx_create(const ckpt_ctx_options *opts, ckpt_ctx **out) {
  CHECK_ARG(NULL, out != NULL);
  *out = NULL;
  ckpt_ctx *ctx = (ckpt_ctx *)calloc(1, sizeof *ctx);
  if (ctx == NULL) return FAIL(NULL, CKPT_ENOMEM, "ckpt_ctx_create: calloc");
  int st = ckpt__ctx_init(ctx, opts);
  if (st != CKPT_OK) {
    free(ctx);
    return st;
  }
  /* Initializes the driver now rather than in the first timed call; a machine without a
   * GPU or driver still gets a context (device_count then reports 0). */
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) (void)cudaGetLastError();
  *out = ctx;
  return CKPT_OK;
}

CKPT_API int ckpt_ctx_destroy(ckpt_ctx *ctx) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK(ckpt__ctx_fini(ctx));
  nccl_api_free((nccl_api *)ctx->nccl_lib);
  free(ctx);
  return CKPT_OK;
}

/* ---- devices ------------------------------------------------------------------------- */

CKPT_API int ckpt_device_count(ckpt_ctx *ctx, int32_t *count) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, count != NULL);
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess && no_gpu_error(err)) {
    (void)cudaGetLastError();
    n = 0;
  } else if (err != cudaSuccess) {
    return cuda_fail(ctx, err, cuda_status(err, CKPT_EDEVMEM), __FILE__, __LINE__,
                     "cudaGetDeviceCount");
  }
  *count = n;
  return CKPT_OK;
}

/* Fails with CKPT_ENODEV unless `device` is an ordinal of this machine. */
static int device_check(ckpt_ctx *ctx, int32_t device) {
  int32_t n = 0;
  CHECK(ckpt_device_count(ctx, &n));
  if (device < 0 || device >= n)
    return FAIL(ctx, CKPT_ENODEV, "device %d does not exist (%d devices)", device, n);
  return CKPT_OK;
}

/* The current device is per thread, so every call that touches a device sets it. */
static int set_device(ckpt_ctx *ctx, int32_t device) {
  CUDA_CHECK(ctx, cudaSetDevice(device));
  return CKPT_OK;
}

static void copy_str(char *dst, size_t cap, const char *src) {
  size_t n = strnlen(src, cap - 1);
  memcpy(dst, src, n);
  dst[n] = '\0';
}

CKPT_API int ckpt_device_info_get(ckpt_ctx *ctx, int32_t index, ckpt_device_info *info) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, info != NULL);
  if (info->size != sizeof(ckpt_device_info))
    return FAIL(ctx, CKPT_EABI, "ckpt_device_info: caller has size %u, library %zu", info->size,
                sizeof(ckpt_device_info));
  CHECK(device_check(ctx, index));
  CHECK(set_device(ctx, index));
  cudaDeviceProp prop;
  CUDA_CHECK(ctx, cudaGetDeviceProperties(&prop, index));
  size_t free_b = 0, total_b = 0;
  CUDA_CHECK(ctx, cudaMemGetInfo(&free_b, &total_b));
  int numa = -1;
  if (cudaDeviceGetAttribute(&numa, cudaDevAttrHostNumaId, index) != cudaSuccess) {
    (void)cudaGetLastError(); /* older drivers do not know the attribute */
    numa = -1;
  }
  const unsigned char *u = (const unsigned char *)prop.uuid.bytes;
  info->index = index;
  snprintf(info->uuid, sizeof info->uuid,
           "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1],
           u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
  copy_str(info->name, sizeof info->name, prop.name);
  info->free_bytes = free_b;
  info->total_bytes = total_b;
  info->pci_bus = prop.pciBusID;
  info->numa_node = numa;
  return CKPT_OK;
}

/* ---- pinned host memory -------------------------------------------------------------- */

CKPT_API int ckpt_host_alloc(ckpt_ctx *ctx, size_t len, void **out) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, out != NULL);
  CHECK_ARG(ctx, len > 0);
  *out = NULL;
  void *p = NULL;
  CUDA_CHECK_HOST(ctx, cudaHostAlloc(&p, len, cudaHostAllocPortable));
  int st = ckpt__region_add(ctx, p, len, 1);
  if (st != CKPT_OK) {
    cudaFreeHost(p);
    return st;
  }
  *out = p;
  return CKPT_OK;
}

CKPT_API int ckpt_host_free(ckpt_ctx *ctx, void *ptr) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, ptr != NULL);
  size_t len = 0;
  /* Removed first, so that no new copy can name it once it is being freed. */
  CHECK(ckpt__region_remove(ctx, ptr, 1, &len));
  CUDA_CHECK(ctx, cudaFreeHost(ptr));
  return CKPT_OK;
}

CKPT_API int ckpt_host_register(ckpt_ctx *ctx, void *ptr, size_t len, uint32_t flags) {
  CHECK_ARG(NULL, ctx != NULL);
  /* The table first: an overlap then fails with CKPT_EINVAL as on the host backend. */
  CHECK(ckpt__register_add(ctx, ptr, len, flags));
  unsigned int cflags =
      cudaHostRegisterPortable | ((flags & CKPT_REGISTER_READONLY) ? cudaHostRegisterReadOnly : 0);
  cudaError_t err = cudaHostRegister(ptr, len, cflags);
  if (err != cudaSuccess) {
    size_t ignored;
    ckpt__region_remove(ctx, ptr, 0, &ignored);
    /* Pinned by someone else (another context) is a caller error, not a CUDA failure. */
    int st = err == cudaErrorHostMemoryAlreadyRegistered ? CKPT_EINVAL
                                                          : cuda_status(err, CKPT_ENOMEM);
    return cuda_fail(ctx, err, st, __FILE__, __LINE__, "cudaHostRegister");
  }
  return CKPT_OK;
}

CKPT_API int ckpt_host_unregister(ckpt_ctx *ctx, void *ptr) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, ptr != NULL);
  size_t len = 0;
  CHECK(ckpt__region_remove(ctx, ptr, 0, &len));
  CUDA_CHECK(ctx, cudaHostUnregister(ptr));
  return CKPT_OK;
}

/* ---- device buffers ------------------------------------------------------------------ */

CKPT_API int ckpt_buf_alloc(ckpt_ctx *ctx, int32_t device, size_t len, ckpt_buf **out) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, out != NULL);
  CHECK_ARG(ctx, len > 0);
  *out = NULL;
  CHECK(device_check(ctx, device));
  CHECK(set_device(ctx, device));
  ckpt_buf *b = (ckpt_buf *)calloc(1, sizeof *b);
  if (b == NULL) return FAIL(ctx, CKPT_ENOMEM, "ckpt_buf_alloc: calloc");
  int st = CKPT_OK;
  CUDA_CHECK_GOTO(ctx, cudaMalloc(&b->ptr, len), st, fail);
  b->ctx = ctx;
  b->device = device;
  b->len = len;
  ckpt__live(ctx, 1);
  *out = b;
  return CKPT_OK;
fail:
  free(b);
  return st;
}

/* The handle is released even when CUDA reports an error, so that a failure here cannot
 * keep the context from being destroyed; the error is still returned. */
CKPT_API int ckpt_buf_free(ckpt_buf *buf) {
  CHECK_ARG(NULL, buf != NULL);
  ckpt_ctx *ctx = buf->ctx;
  int st = set_device(ctx, buf->device);
  if (st == CKPT_OK) {
    if (buf->imported) {
      CUDA_CHECK_GOTO(ctx, cudaIpcCloseMemHandle(buf->ptr), st, done);
    } else {
      CUDA_CHECK_GOTO(ctx, cudaFree(buf->ptr), st, done);
    }
  }
done:
  ckpt__live(ctx, -1);
  free(buf);
  return st;
}

CKPT_API int ckpt_buf_info(ckpt_buf *buf, uint64_t *address, uint64_t *len, int32_t *device) {
  CHECK_ARG(NULL, buf != NULL);
  if (address != NULL) *address = (uint64_t)(uintptr_t)buf->ptr;
  if (len != NULL) *len = buf->len;
  if (device != NULL) *device = buf->device;
  return CKPT_OK;
}

CKPT_API int ckpt_buf_read(ckpt_buf *buf, uint64_t offset, void *dst, uint64_t len) {
  CHECK_ARG(NULL, buf != NULL);
  ckpt_ctx *ctx = buf->ctx;
  CHECK_ARG(ctx, dst != NULL || len == 0);
  if (offset > buf->len || len > buf->len - offset)
    return FAIL(ctx, CKPT_ERANGE, "read of %llu bytes at offset %llu from a buffer of %zu bytes",
                (unsigned long long)len, (unsigned long long)offset, buf->len);
  if (len == 0) return CKPT_OK;
  CHECK(set_device(ctx, buf->device));
  CUDA_CHECK(ctx, cudaMemcpy(dst, (const char *)buf->ptr + offset, len, cudaMemcpyDeviceToHost));
  return CKPT_OK;
}

/* ---- hashing on the device ------------------------------------------------------------ */

/* XXH64 (xxh64.h) on the device, one thread per chunk, with 128 bytes loaded at a time where
 * the chunk is 16-byte aligned. */
__device__ uint64_t d_xxh64(const uint8_t *p, size_t len) {
  size_t stripes = len / 32, s = 0;
  uint64_t h = XXH_P5;
  if (stripes > 0) {
    uint64_t v[4] = XXH_LANES_INIT;
    if (((uintptr_t)p & 15) == 0) {
      const ulonglong2 *q = (const ulonglong2 *)p;
      for (; s + 4 <= stripes; s += 4) {
        ulonglong2 x[8];
#pragma unroll
        for (int j = 0; j < 8; j++) x[j] = q[2 * s + j];
#pragma unroll
        for (int j = 0; j < 4; j++) {
          v[0] = xxh_lane(v[0], x[2 * j].x);
          v[1] = xxh_lane(v[1], x[2 * j].y);
          v[2] = xxh_lane(v[2], x[2 * j + 1].x);
          v[3] = xxh_lane(v[3], x[2 * j + 1].y);
        }
      }
    }
    for (; s < stripes; s++) {
      const uint8_t *r = p + 32 * s;
      v[0] = xxh_lane(v[0], xxh_load64(r));
      v[1] = xxh_lane(v[1], xxh_load64(r + 8));
      v[2] = xxh_lane(v[2], xxh_load64(r + 16));
      v[3] = xxh_lane(v[3], xxh_load64(r + 24));
    }
    h = xxh_converge(v);
  }
  return xxh_finish(h, len, p + 32 * stripes, len % 32);
}

/* table: k (device address, len) pairs; out[i] gets chunk i's XXH64. */
__global__ void hash_chunks(const uint64_t *table, uint64_t *out, size_t k) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i < k) out[i] = d_xxh64((const uint8_t *)(uintptr_t)table[2 * i], (size_t)table[2 * i + 1]);
}

/* Runs hash_chunks over the k chunks of `table` (host memory) on a stream of its own, and
 * copies their hashes into chunks (host memory). */
static int device_chunk_hashes(ckpt_ctx *ctx, const uint64_t *table, size_t k, uint64_t *chunks) {
  int st = CKPT_OK;
  cudaStream_t stream = NULL;
  uint64_t *dev = NULL; /* the table, then the hashes */
  CUDA_CHECK_GOTO(ctx, cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), st, out);
  CUDA_CHECK_GOTO(ctx, cudaMallocAsync((void **)&dev, 3 * k * sizeof *dev, stream), st, out);
  CUDA_CHECK_GOTO(ctx, cudaMemcpyAsync(dev, table, 2 * k * sizeof *dev, cudaMemcpyHostToDevice, stream), st, out);
  {
    const unsigned threads = 128;
    hash_chunks<<<(unsigned)((k + threads - 1) / threads), threads, 0, stream>>>(dev, dev + 2 * k, k);
  }
  CUDA_CHECK_GOTO(ctx, cudaGetLastError(), st, out);
  CUDA_CHECK_GOTO(ctx, cudaMemcpyAsync(chunks, dev + 2 * k, k * sizeof *dev, cudaMemcpyDeviceToHost, stream), st, out);
  CUDA_CHECK_GOTO(ctx, cudaStreamSynchronize(stream), st, out);
out:
  if (dev != NULL) cudaFreeAsync(dev, stream);
  if (stream != NULL) {
    cudaStreamSynchronize(stream);
    cudaStreamDestroy(stream);
  }
  return st;
}

CKPT_API int ckpt_buf_hash(ckpt_buf *const *bufs, size_t nbufs, const uint64_t *ranges, size_t n,
                           uint64_t *hashes, uint64_t *chunk_hashes, int32_t threads) {
  (void)threads;
  CHECK_ARG(NULL, bufs != NULL && nbufs > 0 && bufs[0] != NULL);
  ckpt_ctx *ctx = bufs[0]->ctx;
  if (n == 0) return CKPT_OK;
  CHECK_ARG(ctx, hashes != NULL);
  uint64_t *abs = NULL, *table = NULL, *chunks = NULL;
  size_t *first = NULL;
  CHECK(ckpt__buf_ranges(&cuda_places, bufs, nbufs, ranges, n, &abs));
  int st = ckpt__chunk_table(ctx, abs, n, &table, &first);
  if (st == CKPT_OK) {
    chunks = chunk_hashes ? chunk_hashes : (uint64_t *)malloc(first[n] * sizeof *chunks + 1);
    if (chunks == NULL) st = FAIL(ctx, CKPT_ENOMEM, "ckpt_buf_hash: %zu chunk hashes", first[n]);
  }
  if (st == CKPT_OK) st = set_device(ctx, bufs[0]->device);
  if (st == CKPT_OK && first[n] > 0) st = device_chunk_hashes(ctx, table, first[n], chunks);
  if (st == CKPT_OK)
    for (size_t i = 0; i < n; i++) hashes[i] = ckpt__hash_combine(chunks + first[i], first[i + 1] - first[i]);
  if (chunks != chunk_hashes) free(chunks);
  free(abs), free(table), free(first);
  return st;
}

/* ---- IPC ----------------------------------------------------------------------------- */

CKPT_API int ckpt_buf_export(ckpt_buf *buf, ckpt_ipc_handle *out) {
  CHECK_ARG(NULL, buf != NULL);
  ckpt_ctx *ctx = buf->ctx;
  CHECK_ARG(ctx, out != NULL);
  if (out->size != sizeof(ckpt_ipc_handle))
    return FAIL(ctx, CKPT_EABI, "ckpt_ipc_handle: caller has size %u, library %zu", out->size,
                sizeof(ckpt_ipc_handle));
  if (buf->imported)
    return FAIL(ctx, CKPT_EINVAL, "an imported buffer cannot be exported again");
  CHECK(set_device(ctx, buf->device));
  cudaIpcMemHandle_t h;
  CUDA_CHECK(ctx, cudaIpcGetMemHandle(&h, buf->ptr));
  out->kind = CKPT_IPC_CUDA;
  out->len = buf->len;
  out->device = buf->device;
  out->pid = (int32_t)getpid();
  memset(out->data, 0, sizeof out->data);
  memcpy(out->data, &h, sizeof h);
  return CKPT_OK;
}

CKPT_API int ckpt_buf_import(ckpt_ctx *ctx, const ckpt_ipc_handle *handle, ckpt_buf **out) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, handle != NULL);
  CHECK_ARG(ctx, out != NULL);
  *out = NULL;
  if (handle->size != sizeof(ckpt_ipc_handle))
    return FAIL(ctx, CKPT_EABI, "ckpt_ipc_handle: caller has size %u, library %zu",
                handle->size, sizeof(ckpt_ipc_handle));
  if (handle->kind != CKPT_IPC_CUDA)
    return FAIL(ctx, CKPT_EHANDLE,
                handle->kind == CKPT_IPC_HOST
                    ? "a host handle cannot be imported by the CUDA backend"
                    : "unknown IPC handle kind");
  if (handle->len == 0)
    return FAIL(ctx, CKPT_EHANDLE, "IPC handle has length %llu", (unsigned long long)handle->len);
  CHECK(device_check(ctx, handle->device));
  CHECK(set_device(ctx, handle->device));
  ckpt_buf *b = (ckpt_buf *)calloc(1, sizeof *b);
  if (b == NULL) return FAIL(ctx, CKPT_ENOMEM, "ckpt_buf_import: calloc");
  int st = CKPT_OK;
  cudaIpcMemHandle_t h;
  memcpy(&h, handle->data, sizeof h);
  CUDA_CHECK_GOTO(ctx, cudaIpcOpenMemHandle(&b->ptr, h, cudaIpcMemLazyEnablePeerAccess), st,
                  fail);
  b->ctx = ctx;
  b->device = handle->device;
  b->len = (size_t)handle->len;
  b->imported = 1;
  ckpt__live(ctx, 1);
  *out = b;
  return CKPT_OK;
fail:
  free(b);
  return st;
}

/* ---- streams and copies -------------------------------------------------------------- */

CKPT_API int ckpt_stream_create(ckpt_ctx *ctx, int32_t device, ckpt_stream **out) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, out != NULL);
  *out = NULL;
  CHECK(device_check(ctx, device));
  CHECK(set_device(ctx, device));
  ckpt_stream *s = (ckpt_stream *)calloc(1, sizeof *s);
  if (s == NULL) return FAIL(ctx, CKPT_ENOMEM, "ckpt_stream_create: calloc");
  int st = CKPT_OK;
  /* Non-blocking: no implicit synchronization with the legacy default stream. */
  CUDA_CHECK_GOTO(ctx, cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking), st, fail);
  s->ctx = ctx;
  s->device = device;
  ckpt__live(ctx, 1);
  *out = s;
  return CKPT_OK;
fail:
  free(s);
  return st;
}

CKPT_API int ckpt_stream_destroy(ckpt_stream *stream) {
  CHECK_ARG(NULL, stream != NULL);
  ckpt_ctx *ctx = stream->ctx;
  int st = set_device(ctx, stream->device);
  if (st == CKPT_OK) {
    /* A failed synchronize (an earlier asynchronous error) still destroys the stream. */
    cudaError_t err = cudaStreamSynchronize(stream->stream);
    if (err != cudaSuccess)
      st = cuda_fail(ctx, err, cuda_status(err, CKPT_EDEVMEM), __FILE__, __LINE__,
                     "cudaStreamSynchronize");
    err = cudaStreamDestroy(stream->stream);
    if (err != cudaSuccess && st == CKPT_OK)
      st = cuda_fail(ctx, err, cuda_status(err, CKPT_EDEVMEM), __FILE__, __LINE__,
                     "cudaStreamDestroy");
  }
  ckpt__live(ctx, -1);
  free(stream);
  return st;
}

static int copy_async(ckpt_stream *stream, ckpt_buf *buf, const ckpt_range *ranges, size_t n, int to_host) {
  CHECK_ARG(NULL, stream != NULL);
  ckpt_ctx *ctx = stream->ctx;
  CHECK_HANDLE(ctx, buf);
  /* Every range before any copy, so that one bad range queues nothing. */
  CHECK(ckpt__ranges_check(ctx, ranges, n, buf->len));
  if (buf->device != stream->device)
    return FAIL(ctx, CKPT_EINVAL, "buffer on device %d, stream on device %d", buf->device,
                stream->device);
  if (n == 0) return CKPT_OK;
  CHECK(set_device(ctx, stream->device));
  char *base = (char *)buf->ptr;
  for (size_t k = 0; k < n; k++) {
    if (ranges[k].len == 0) continue;
    char *host = (char *)(uintptr_t)ranges[k].host;
    cudaError_t err = to_host ? cudaMemcpyAsync(host, base + ranges[k].offset, (size_t)ranges[k].len,
                                                cudaMemcpyDeviceToHost, stream->stream)
                              : cudaMemcpyAsync(base + ranges[k].offset, host, (size_t)ranges[k].len,
                                                cudaMemcpyHostToDevice, stream->stream);
    if (err != cudaSuccess) {
      char what[96];
      snprintf(what, sizeof what, "cudaMemcpyAsync of range %zu of %zu", k, n);
      return cuda_fail(ctx, err, cuda_status(err, CKPT_EDEVMEM), __FILE__, __LINE__, what);
    }
  }
  return CKPT_OK;
}

CKPT_API int ckpt_h2d_async(ckpt_stream *stream, ckpt_buf *dst, const ckpt_range *ranges,
                            size_t n) {
  return copy_async(stream, dst, ranges, n, 0);
}

CKPT_API int ckpt_d2h_async(ckpt_stream *stream, ckpt_buf *src, const ckpt_range *ranges,
                            size_t n) {
  return copy_async(stream, src, ranges, n, 1);
}

/* ---- events -------------------------------------------------------------------------- */

CKPT_API int ckpt_event_create(ckpt_ctx *ctx, int32_t device, ckpt_event **out) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, out != NULL);
  *out = NULL;
  CHECK(device_check(ctx, device));
  CHECK(set_device(ctx, device));
  ckpt_event *e = (ckpt_event *)calloc(1, sizeof *e);
  if (e == NULL) return FAIL(ctx, CKPT_ENOMEM, "ckpt_event_create: calloc");
  int st = CKPT_OK;
  CUDA_CHECK_GOTO(ctx, cudaEventCreateWithFlags(&e->event, cudaEventDisableTiming), st, fail);
  e->ctx = ctx;
  e->device = device;
  ckpt__live(ctx, 1);
  *out = e;
  return CKPT_OK;
fail:
  free(e);
  return st;
}

CKPT_API int ckpt_event_destroy(ckpt_event *event) {
  CHECK_ARG(NULL, event != NULL);
  ckpt_ctx *ctx = event->ctx;
  int st = set_device(ctx, event->device);
  if (st == CKPT_OK) {
    CUDA_CHECK_GOTO(ctx, cudaEventDestroy(event->event), st, done);
  }
done:
  ckpt__live(ctx, -1);
  free(event);
  return st;
}

CKPT_API int ckpt_event_record(ckpt_event *event, ckpt_stream *stream) {
  CHECK_ARG(NULL, event != NULL);
  ckpt_ctx *ctx = event->ctx;
  CHECK_HANDLE(ctx, stream);
  if (stream->device != event->device)
    return FAIL(ctx, CKPT_EINVAL, "event on device %d, stream on device %d", event->device,
                stream->device);
  CHECK(set_device(ctx, event->device));
  CUDA_CHECK(ctx, cudaEventRecord(event->event, stream->stream));
  return CKPT_OK;
}

CKPT_API int ckpt_stream_wait_event(ckpt_stream *stream, ckpt_event *event) {
  CHECK_ARG(NULL, stream != NULL);
  ckpt_ctx *ctx = stream->ctx;
  CHECK_HANDLE(ctx, event);
  /* The event may be on another device: CUDA waits across devices. A never recorded event
   * makes no wait. */
  CHECK(set_device(ctx, stream->device));
  CUDA_CHECK(ctx, cudaStreamWaitEvent(stream->stream, event->event, 0));
  return CKPT_OK;
}

/* One cudaEventQuery: CKPT_OK, CKPT_EAGAIN (not recorded as a failure) or a failure. */
static int event_poll(ckpt_event *event) {
  cudaError_t err = cudaEventQuery(event->event);
  if (err == cudaSuccess) return CKPT_OK;
  if (err == cudaErrorNotReady) {
    (void)cudaGetLastError(); /* "not ready" is no error; leave none behind */
    return CKPT_EAGAIN;
  }
  return cuda_fail(event->ctx, err, cuda_status(err, CKPT_EDEVMEM), __FILE__, __LINE__,
                   "cudaEventQuery");
}

CKPT_API int ckpt_event_query(ckpt_event *event) {
  CHECK_ARG(NULL, event != NULL);
  CHECK(set_device(event->ctx, event->device));
  return event_poll(event);
}

static int64_t mono_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

CKPT_API int ckpt_event_wait(ckpt_event *event, int64_t timeout_ms) {
  CHECK_ARG(NULL, event != NULL);
  CHECK(set_device(event->ctx, event->device));
  /* Spin briefly (copies often finish within microseconds of the first poll), then sleep
   * in steps growing from 20 us to 200 us, which bounds the added latency. */
  const int64_t spin_ns = 50 * 1000, max_nap_ns = 200 * 1000;
  int64_t nap_ns = 20 * 1000;
  int64_t start = mono_ns();
  for (;;) {
    int st = event_poll(event);
    if (st != CKPT_EAGAIN) return st;
    int64_t elapsed = mono_ns() - start;
    if (timeout_ms >= 0 && elapsed / 1000000 >= timeout_ms)
      return FAIL(event->ctx, CKPT_ETIMEDOUT, "event not complete after %lld ms",
                  (long long)timeout_ms);
    if (elapsed < spin_ns) continue;
    struct timespec ts = {0, (long)nap_ns};
    nanosleep(&ts, NULL); /* an early wake-up (EINTR) only polls sooner */
    nap_ns = nap_ns * 2 < max_nap_ns ? nap_ns * 2 : max_nap_ns;
  }
}

/* ---- NCCL ---------------------------------------------------------------------------- */

/* nccl.h is not needed at build time: the few types used here, as NCCL 2.x defines them.
 * ncclResult_t and ncclDataType_t are int enums (0 = ncclSuccess; ncclUint8 = 1). */
typedef int nccl_result;
typedef struct nccl_comm_s *nccl_comm;                     /* ncclComm_t */
typedef struct nccl_unique_id { char internal[CKPT_COMM_ID_BYTES]; } nccl_unique_id;
enum { NCCL_UINT8 = 1, NCCL_IN_PROGRESS = 7 };

/* The head of ncclConfig_t, as NCCL 2.14 defined it. NCCL copies `size` bytes of the caller's
 * struct over its defaults and ignores fields newer than `version`, so a struct this short
 * sets `blocking` and leaves everything else at NCCL's defaults. */
typedef struct nccl_config {
  size_t size;
  unsigned int magic;
  unsigned int version;
  int blocking;
} nccl_config;
#define NCCL_CONFIG_MAGIC 0xcafebeefu
#define NCCL_VERSION_2_14 21400u

/* The library and its entry points, resolved once per context. ctx->nccl_lib points at one
 * of these (it is NULL until NCCL is first used). */
struct nccl_api {
  void *lib;
  nccl_result (*get_version)(int *);
  nccl_result (*get_unique_id)(nccl_unique_id *);
  nccl_result (*comm_init_rank)(nccl_comm *, int, nccl_unique_id, int);
  nccl_result (*comm_init_rank_config)(nccl_comm *, int, nccl_unique_id, int, nccl_config *); /* >= 2.14 */
  nccl_result (*comm_get_async_error)(nccl_comm, nccl_result *);                           /* >= 2.14 */
  nccl_result (*comm_finalize)(nccl_comm);                                                  /* >= 2.14 */
  nccl_result (*group_start)(void);
  nccl_result (*group_end)(void);
  nccl_result (*broadcast)(const void *, void *, size_t, int, int, nccl_comm, cudaStream_t);
  nccl_result (*comm_destroy)(nccl_comm);
  nccl_result (*comm_abort)(nccl_comm);
  const char *(*get_error_string)(nccl_result);
  const char *(*get_last_error)(nccl_comm); /* NCCL >= 2.13; NULL before */
};

static void nccl_api_free(nccl_api *api) {
  if (api == NULL) return;
  dlclose(api->lib);
  free(api);
}

/* Loads NCCL and resolves its entry points on first use. The load runs outside ctx->mu (it
 * guards the copy path's region table); a thread that loses the race drops its copy. */
static int nccl_load(ckpt_ctx *ctx, const nccl_api **out) {
  pthread_mutex_lock(&ctx->mu);
  nccl_api *api = (nccl_api *)ctx->nccl_lib;
  pthread_mutex_unlock(&ctx->mu);
  if (api != NULL) {
    *out = api;
    return CKPT_OK;
  }
  /* RTLD_NODELETE: NCCL leaves threads behind (ncclGetUniqueId's bootstrap root waits for
   * ranks that may never come), so its code must stay mapped after dlclose. */
  void *lib = dlopen(ctx->nccl_path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (lib == NULL) {
    const char *e = dlerror();
    return FAIL(ctx, CKPT_ENCCL, "dlopen %s: %s", ctx->nccl_path, e ? e : "unknown error");
  }
  api = (nccl_api *)calloc(1, sizeof *api);
  if (api == NULL) {
    dlclose(lib);
    return FAIL(ctx, CKPT_ENOMEM, "NCCL entry point table");
  }
  api->lib = lib;
  const struct {
    const char *name;
    void *slot;
    int required;
  } syms[] = {
      {"ncclGetVersion", &api->get_version, 1},
      {"ncclGetUniqueId", &api->get_unique_id, 1},
      {"ncclCommInitRank", &api->comm_init_rank, 1},
      {"ncclGroupStart", &api->group_start, 1},
      {"ncclGroupEnd", &api->group_end, 1},
      {"ncclBroadcast", &api->broadcast, 1},
      {"ncclCommDestroy", &api->comm_destroy, 1},
      {"ncclCommAbort", &api->comm_abort, 1},
      {"ncclGetErrorString", &api->get_error_string, 1},
      {"ncclGetLastError", &api->get_last_error, 0},
      {"ncclCommInitRankConfig", &api->comm_init_rank_config, 0},
      {"ncclCommGetAsyncError", &api->comm_get_async_error, 0},
      {"ncclCommFinalize", &api->comm_finalize, 0},
  };
  for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
    dlerror();
    void *p = dlsym(lib, syms[i].name);
    if (p == NULL && syms[i].required) {
      const char *e = dlerror();
      int st = FAIL(ctx, CKPT_ENCCL, "dlsym %s in %s: %s", syms[i].name, ctx->nccl_path,
                    e ? e : "symbol not found");
      nccl_api_free(api);
      return st;
    }
    memcpy(syms[i].slot, &p, sizeof p); /* a function pointer's bytes, as dlsym gives them */
  }
  pthread_mutex_lock(&ctx->mu);
  if (ctx->nccl_lib == NULL) ctx->nccl_lib = api;
  nccl_api *won = (nccl_api *)ctx->nccl_lib;
  pthread_mutex_unlock(&ctx->mu);
  if (won != api) nccl_api_free(api);
  *out = won;
  return CKPT_OK;
}

/* Records a failed NCCL call: CKPT_ENCCL with the call (printf-style), NCCL's message for the
 * code and, where this NCCL has it, its last error detail. */
static int nccl_fail(ckpt_ctx *ctx, const nccl_api *api, nccl_result r, const char *file, int line,
                     const char *fmt, ...) __attribute__((format(printf, 6, 7)));
static int nccl_fail(ckpt_ctx *ctx, const nccl_api *api, nccl_result r, const char *file, int line,
                     const char *fmt, ...) {
  char what[160];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  const char *msg = api->get_error_string ? api->get_error_string(r) : NULL;
  const char *last = api->get_last_error ? api->get_last_error(NULL) : NULL;
  return ckpt__fail(ctx, CKPT_ENCCL, file, line, "%s: ncclResult_t %d: %s%s%s%s", what, r,
                    msg ? msg : "unknown", last && last[0] ? " (" : "", last && last[0] ? last : "",
                    last && last[0] ? ")" : "");
}

#define NCCL_FAIL(ctx, api, r, ...) nccl_fail((ctx), (api), (r), __FILE__, __LINE__, __VA_ARGS__)

CKPT_API int ckpt_nccl_version(ckpt_ctx *ctx, int32_t *version) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, version != NULL);
  const nccl_api *api = NULL;
  CHECK(nccl_load(ctx, &api));
  int v = 0;
  nccl_result r = api->get_version(&v);
  if (r != 0) return NCCL_FAIL(ctx, api, r, "ncclGetVersion");
  *version = v;
  return CKPT_OK;
}

/* ---- collectives --------------------------------------------------------------------- */

struct ckpt_comm {
  ckpt_ctx *ctx;
  const nccl_api *api;
  int32_t nranks;
  int32_t first_rank;
  int32_t ndev;
  int32_t *devices; /* devices[i] holds global rank first_rank + i */
  nccl_comm *comms; /* one per local device */
  int64_t timeout_ms; /* non-blocking communicators: the bound of each wait for NCCL */
  int nonblocking;
};

/* Non-blocking communicators: waits until no local rank's last call is still in progress
 * (ncclCommGetAsyncError), napping 100 us between polls; CKPT_ETIMEDOUT after timeout_ms. */
static int comm_settle(ckpt_comm *c, const char *what) {
  if (!c->nonblocking) return CKPT_OK;
  int64_t start = mono_ns();
  for (;;) {
    int busy = 0;
    for (int32_t i = 0; i < c->ndev; i++) {
      nccl_result state = 0;
      nccl_result r = c->api->comm_get_async_error(c->comms[i], &state);
      if (r != 0) return NCCL_FAIL(c->ctx, c->api, r, "ncclCommGetAsyncError after %s", what);
      if (state == NCCL_IN_PROGRESS) busy = 1;
      else if (state != 0)
        return NCCL_FAIL(c->ctx, c->api, state, "%s (rank %d, device %d)", what, c->first_rank + i,
                         c->devices[i]);
    }
    if (!busy) return CKPT_OK;
    if ((mono_ns() - start) / 1000000 >= c->timeout_ms)
      return FAIL(c->ctx, CKPT_ETIMEDOUT, "%s: not done after %lld ms (a rank of the %d that never "
                  "took part?)", what, (long long)c->timeout_ms, c->nranks);
    struct timespec ts = {0, 100 * 1000};
    nanosleep(&ts, NULL);
  }
}

CKPT_API int ckpt_comm_id_new(ckpt_ctx *ctx, uint8_t id[CKPT_COMM_ID_BYTES]) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, id != NULL);
  const nccl_api *api = NULL;
  CHECK(nccl_load(ctx, &api));
  nccl_unique_id uid;
  memset(&uid, 0, sizeof uid);
  nccl_result r = api->get_unique_id(&uid);
  if (r != 0) return NCCL_FAIL(ctx, api, r, "ncclGetUniqueId");
  memcpy(id, uid.internal, CKPT_COMM_ID_BYTES);
  return CKPT_OK;
}

/* Aborts and frees whatever communicators were made (the path of failures and of abort). */
static void comm_free(ckpt_comm *c, int abort_comms) {
  for (int32_t i = 0; abort_comms && i < c->ndev; i++) {
    if (c->comms[i] == NULL) continue;
    if (cudaSetDevice(c->devices[i]) != cudaSuccess) (void)cudaGetLastError();
    (void)c->api->comm_abort(c->comms[i]);
  }
  free(c->comms);
  free(c->devices);
  free(c);
}

CKPT_API int ckpt_comm_init(ckpt_ctx *ctx, const uint8_t id[CKPT_COMM_ID_BYTES], int32_t nranks,
                            int32_t first_rank, int32_t ndev, const int32_t *devices,
                            int64_t timeout_ms, ckpt_comm **out) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK(ckpt__comm_init_check(ctx, id, nranks, first_rank, ndev, devices, out, device_check));
  const nccl_api *api = NULL;
  CHECK(nccl_load(ctx, &api));
  /* Each device once before the group, so that a failure there needs no NCCL cleanup. */
  for (int32_t i = 0; i < ndev; i++) CHECK(set_device(ctx, devices[i]));

  ckpt_comm *c = (ckpt_comm *)calloc(1, sizeof *c);
  if (c != NULL) {
    c->devices = (int32_t *)calloc((size_t)ndev, sizeof *c->devices);
    c->comms = (nccl_comm *)calloc((size_t)ndev, sizeof *c->comms);
  }
  if (c == NULL || c->devices == NULL || c->comms == NULL) {
    if (c != NULL) free(c->devices), free(c->comms), free(c);
    return FAIL(ctx, CKPT_ENOMEM, "ckpt_comm_init: communicator of %d devices", ndev);
  }
  c->ctx = ctx;
  c->api = api;
  c->nranks = nranks;
  c->first_rank = first_rank;
  c->ndev = ndev;
  memcpy(c->devices, devices, (size_t)ndev * sizeof *devices);
  /* A bounded wait needs a non-blocking communicator (NCCL >= 2.14): its init returns at once
   * and can be aborted. Without a bound, or with an older NCCL, init blocks. */
  c->nonblocking = timeout_ms >= 0 && api->comm_init_rank_config != NULL &&
                   api->comm_get_async_error != NULL;
  c->timeout_ms = timeout_ms;
  nccl_config config = {offsetof(nccl_config, blocking) + sizeof(int), NCCL_CONFIG_MAGIC,
                        NCCL_VERSION_2_14, 0};
  nccl_unique_id uid;
  memcpy(uid.internal, id, CKPT_COMM_ID_BYTES);

  /* One thread initializing several ranks must do so inside a group: each ncclCommInitRank
   * waits for all ranks otherwise. Errors inside the group are collected by NCCL, which then
   * launches nothing at ncclGroupEnd. */
  int st = CKPT_OK;
  nccl_result r = api->group_start();
  if (r != 0) {
    st = NCCL_FAIL(ctx, api, r, "ncclGroupStart");
    comm_free(c, 0);
    return st;
  }
  for (int32_t i = 0; i < ndev; i++) {
    cudaError_t err = cudaSetDevice(devices[i]);
    if (err != cudaSuccess) {
      st = cuda_fail(ctx, err, cuda_status(err, CKPT_EDEVMEM), __FILE__, __LINE__, "cudaSetDevice");
      /* An invalid rank makes NCCL fail the whole group, so that ncclGroupEnd does not start
       * the ranks queued so far (they would wait for this one for ever). */
      nccl_comm dummy = NULL;
      (void)api->comm_init_rank(&dummy, nranks, uid, -1);
      break;
    }
    r = c->nonblocking ? api->comm_init_rank_config(&c->comms[i], nranks, uid, first_rank + i, &config)
                       : api->comm_init_rank(&c->comms[i], nranks, uid, first_rank + i);
    if (r != 0) {
      st = NCCL_FAIL(ctx, api, r, "ncclCommInitRank (rank %d of %d, device %d)", first_rank + i,
                     nranks, devices[i]);
      break;
    }
  }
  r = api->group_end();
  if (r != 0 && r != NCCL_IN_PROGRESS && st == CKPT_OK)
    st = NCCL_FAIL(ctx, api, r, "ncclGroupEnd after ncclCommInitRank of ranks %d..%d of %d",
                   first_rank, first_rank + ndev - 1, nranks);
  if (st == CKPT_OK) st = comm_settle(c, "joining the communicator");
  if (st != CKPT_OK) {
    comm_free(c, 1);
    return st;
  }
  ckpt__live(ctx, 1);
  *out = c;
  return CKPT_OK;
}

CKPT_API int ckpt_comm_destroy(ckpt_comm *comm) {
  CHECK_ARG(NULL, comm != NULL);
  ckpt_ctx *ctx = comm->ctx;
  int st = CKPT_OK;
  /* A non-blocking communicator is finalized first (its queued work flushed, bounded by its
   * timeout); ncclCommDestroy of a blocking one waits for its queued work. The handle is
   * released even when a call fails, so that a failure cannot keep the context from being
   * destroyed; a communicator that did not finalize in time is aborted. */
  if (comm->nonblocking && comm->api->comm_finalize != NULL) {
    for (int32_t i = 0; i < comm->ndev && st == CKPT_OK; i++) {
      nccl_result r = comm->api->comm_finalize(comm->comms[i]);
      if (r != 0 && r != NCCL_IN_PROGRESS)
        st = NCCL_FAIL(ctx, comm->api, r, "ncclCommFinalize (rank %d)", comm->first_rank + i);
    }
    if (st == CKPT_OK) st = comm_settle(comm, "ncclCommFinalize");
    if (st != CKPT_OK) {
      int aborted = ckpt_comm_abort(comm);
      (void)aborted;
      return st;
    }
  }
  for (int32_t i = 0; i < comm->ndev; i++) {
    cudaError_t err = cudaSetDevice(comm->devices[i]);
    if (err != cudaSuccess && st == CKPT_OK)
      st = cuda_fail(ctx, err, cuda_status(err, CKPT_EDEVMEM), __FILE__, __LINE__, "cudaSetDevice");
    nccl_result r = comm->api->comm_destroy(comm->comms[i]);
    if (r != 0 && r != NCCL_IN_PROGRESS && st == CKPT_OK)
      st = NCCL_FAIL(ctx, comm->api, r, "ncclCommDestroy (rank %d, device %d)",
                     comm->first_rank + i, comm->devices[i]);
    comm->comms[i] = NULL;
  }
  ckpt__live(ctx, -1);
  comm_free(comm, 0);
  return st;
}

CKPT_API int ckpt_comm_abort(ckpt_comm *comm) {
  CHECK_ARG(NULL, comm != NULL);
  ckpt_ctx *ctx = comm->ctx;
  int st = CKPT_OK;
  for (int32_t i = 0; i < comm->ndev; i++) {
    if (cudaSetDevice(comm->devices[i]) != cudaSuccess) (void)cudaGetLastError();
    nccl_result r = comm->api->comm_abort(comm->comms[i]);
    if (r != 0 && r != NCCL_IN_PROGRESS && st == CKPT_OK)
      st = NCCL_FAIL(ctx, comm->api, r, "ncclCommAbort (rank %d, device %d)",
                     comm->first_rank + i, comm->devices[i]);
    comm->comms[i] = NULL;
  }
  ckpt__live(ctx, -1);
  comm_free(comm, 0);
  return st;
}

CKPT_API int ckpt_broadcast(ckpt_comm *comm, int32_t root, ckpt_buf *const *bufs,
                            ckpt_stream *const *streams, uint64_t offset, uint64_t len) {
  CHECK_ARG(NULL, comm != NULL);
  ckpt_ctx *ctx = comm->ctx;
  CHECK(ckpt__bcast_check(ctx, &cuda_places, comm->nranks, comm->ndev, comm->devices, root, bufs,
                          streams, offset, len));
  if (len == 0) return CKPT_OK;
  const nccl_api *api = comm->api;
  nccl_result r = api->group_start();
  if (r != 0) return NCCL_FAIL(ctx, api, r, "ncclGroupStart");
  int st = CKPT_OK;
  for (int32_t i = 0; i < comm->ndev; i++) {
    char *p = (char *)bufs[i]->ptr + offset;
    r = api->broadcast(p, p, (size_t)len, NCCL_UINT8, root, comm->comms[i], streams[i]->stream);
    if (r != 0) {
      /* NCCL records the error in the group, whose end then launches nothing. */
      st = NCCL_FAIL(ctx, api, r, "ncclBroadcast of %llu bytes from rank %d (local rank %d)",
                     (unsigned long long)len, root, i);
      break;
    }
  }
  r = api->group_end();
  if (r != 0 && r != NCCL_IN_PROGRESS && st == CKPT_OK)
    st = NCCL_FAIL(ctx, api, r, "ncclGroupEnd after ncclBroadcast of %llu bytes from rank %d",
                   (unsigned long long)len, root);
  /* A non-blocking communicator's first collectives connect the ranks in the background. */
  if (st == CKPT_OK) st = comm_settle(comm, "ncclBroadcast");
  return st;
}
