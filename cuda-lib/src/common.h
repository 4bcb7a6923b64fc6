/* Internals shared by both backends: the context, error recording, pinned-region table. */
#ifndef CKPT_COMMON_H
#define CKPT_COMMON_H

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <string.h>

#include "ckpt.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CKPT_API __attribute__((visibility("default")))

typedef struct ckpt_region {
  uintptr_t base;
  size_t len;
  int allocated; /* 1: ckpt_host_alloc, 0: ckpt_host_register */
} ckpt_region;

struct ckpt_ctx {
  pthread_mutex_t mu;           /* guards everything below */
  int last_status;
  char last_error[CKPT_ERROR_BYTES];
  int64_t live_handles;         /* buffers, streams, events not yet freed */
  ckpt_region *regions;         /* sorted by base, never overlapping */
  size_t nregions, cap_regions;
  int32_t host_devices;
  char nccl_path[256];
  void *nccl_lib;               /* CUDA backend: its nccl_api, the table of NCCL functions
                                 * resolved on first use (NULL until then and on the host) */
};

/* Records a failure on ctx (if any) with file:line and a formatted detail; returns status. */
int ckpt__fail(ckpt_ctx *ctx, int status, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

#define FAIL(ctx, status, ...) ckpt__fail((ctx), (status), __FILE__, __LINE__, __VA_ARGS__)
/* Propagates a failed ckpt_status; the callee has recorded the detail. */
#define CHECK(call)                      \
  do {                                   \
    int ckpt_s_ = (call);                \
    if (ckpt_s_ != CKPT_OK) return ckpt_s_; \
  } while (0)
/* Stores a failed status in `st` and jumps to the cleanup label. */
#define CHECK_GOTO(call, st, label) \
  do {                              \
    (st) = (call);                  \
    if ((st) != CKPT_OK) goto label; \
  } while (0)
/* errno-setting system calls: fails with CKPT_ESYS naming the call and the errno. */
#define CHECK_SYS(ctx, cond, what)                                                    \
  do {                                                                                \
    if (!(cond)) return FAIL((ctx), CKPT_ESYS, "%s: %s", (what), strerror(errno));    \
  } while (0)
/* Like CHECK_SYS, for functions that must unwind: ESYS naming the call and errno. */
#define SYS_GOTO(ctx, cond, st, label, what) \
  CHECK_GOTO((cond) ? CKPT_OK : ckpt__sys_fail((ctx), __FILE__, __LINE__, (what)), st, label)
int ckpt__sys_fail(ckpt_ctx *ctx, const char *file, int line, const char *what);
#define CHECK_ARG(ctx, cond)                                                          \
  do {                                                                                \
    if (!(cond)) return FAIL((ctx), CKPT_EINVAL, "invalid argument: %s", #cond);      \
  } while (0)

/* A handle passed beside another: given (CKPT_EINVAL), and made from ctx (CKPT_EHANDLE). */
#define CHECK_HANDLE(ctx, h)                                                               \
  do {                                                                                     \
    CHECK_ARG((ctx), h != NULL);                                                           \
    if ((h)->ctx != (ctx)) return FAIL((ctx), CKPT_EHANDLE, "%s belongs to another context", #h); \
  } while (0)

/* Where a buffer or stream lives, for the argument checks both backends share. */
typedef struct ckpt__place {
  const ckpt_ctx *ctx;
  int32_t device;
  uint64_t len;   /* buffers only */
  uintptr_t base; /* buffers only: the address of its first byte (device or host) */
} ckpt__place;

/* How the shared checks see a backend's buffers and streams (each backend has its own
 * structs): the place of a handle that is not NULL. */
typedef struct ckpt__places {
  ckpt__place (*buf)(const ckpt_buf *buf);
  ckpt__place (*stream)(const ckpt_stream *stream);
} ckpt__places;

/* Checks every argument of ckpt_broadcast on a communicator of nranks ranks whose local rank
 * i is device devices[i] (ndev of them): bufs and streams given, each of ctx and on its
 * rank's device, each buffer holding offset + len bytes, root one of the ranks. */
int ckpt__bcast_check(ckpt_ctx *ctx, const ckpt__places *places, int32_t nranks, int32_t ndev,
                      const int32_t *devices, int32_t root, ckpt_buf *const *bufs,
                      ckpt_stream *const *streams, uint64_t offset, uint64_t len);
/* Checks ckpt_comm_init's arguments (ctx given), each device with the backend's `exists`;
 * clears *out first. */
int ckpt__comm_init_check(ckpt_ctx *ctx, const uint8_t *id, int32_t nranks, int32_t first_rank,
                          int32_t ndev, const int32_t *devices, ckpt_comm **out,
                          int (*exists)(ckpt_ctx *, int32_t));

/* Validates options and fills the shared part of a zeroed context. */
int ckpt__ctx_init(ckpt_ctx *ctx, const ckpt_ctx_options *opts);
/* Frees the shared part; CKPT_EBUSY while handles or regions are alive. */
int ckpt__ctx_fini(ckpt_ctx *ctx);
void ckpt__live(ckpt_ctx *ctx, int delta);

/* Adds [p, p+len) to the pinned-region table; CKPT_EINVAL if it overlaps another. */
int ckpt__region_add(ckpt_ctx *ctx, void *p, size_t len, int allocated);
/* Removes the region starting at p that was added with the same `allocated`; its length
 * goes to *len. CKPT_EINVAL naming the pointer if there is none. */
int ckpt__region_remove(ckpt_ctx *ctx, void *p, int allocated, size_t *len);
/* Checks ckpt_host_register's arguments (ctx given) and adds [ptr, ptr+len) to the table
 * as registered memory; the backend pins it after. */
int ckpt__register_add(ckpt_ctx *ctx, void *ptr, size_t len, uint32_t flags);
/* Checks every range: host memory inside one pinned region, offset and length inside dst_len. */
int ckpt__ranges_check(ckpt_ctx *ctx, const ckpt_range *r, size_t n, uint64_t dst_len);
/* Whether ckpt_file_map prefaults its mapping (MAP_POPULATE), per backend: the host backend
 * does; CUDA's cudaHostRegister faults the pages in itself, faster than prefaulting them first
 * (q8b on an H200: 1.3 s, against 0.8 s of prefault and 0.9 s of register after it). */
extern const int ckpt__map_populate;

/* hash.c: how many CKPT_HASH_CHUNK chunks a range of len bytes has, and a range's hash from
 * its chunk hashes (XXH64 of them as little-endian uint64s). */
size_t ckpt__hash_chunks(uint64_t len);
/* Plain XXH64 (seed 0) of len bytes: one chunk's hash. */
uint64_t ckpt__xxh64(const void *p, size_t len);
uint64_t ckpt__hash_combine(const uint64_t *chunks, size_t k);
/* ckpt_buf_hash's arguments checked: nbufs buffers of one context and one device
 * (CKPT_EINVAL), n (buffer index, offset, len) triples each inside its buffer (CKPT_ERANGE
 * naming the range); the ranges made (address, len) pairs in *out (malloc'd). */
/* Runs worker(arg) on up to `threads` threads (at most 64, at least 1, no more than `items`),
 * the calling thread among them, and returns once all have; a worker takes items through a
 * counter in arg, so a thread that cannot start leaves its share to the others. */
void ckpt__run_workers(void *(*worker)(void *), void *arg, int32_t threads, size_t items);
int ckpt__buf_ranges(const ckpt__places *places, ckpt_buf *const *bufs, size_t nbufs, const uint64_t *ranges,
                     size_t n, uint64_t **out);
/* Every chunk of n (address, len) ranges as (address, len) pairs in *table, and in *first
 * (n + 1 values) the index of each range's first chunk (first[n]: all of them); malloc'd. */
int ckpt__chunk_table(ckpt_ctx *ctx, const uint64_t *ranges, size_t n, uint64_t **table, size_t **first);

#ifdef __cplusplus
}
#endif
#endif
