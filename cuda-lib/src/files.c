/* Files: whole-file read-only mappings, parallel pread into caller memory, and guarded reads
 * of mapped memory. CPU only; the same in both backends. */
#define _GNU_SOURCE
#include "common.h"
#include "guard.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_THREADS 64
#define CHUNK (64ull << 20) /* the least a thread reads at a time */

/* Opens path read-only and checks it is a non-empty regular file; its size goes to *size. */
static int open_regular(ckpt_ctx *ctx, const char *what, const char *path, int *fd_out,
                        uint64_t *size) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return FAIL(ctx, CKPT_ESYS, "%s: open %s: %s", what, path, strerror(errno));
  struct stat sb;
  if (fstat(fd, &sb) != 0) {
    int err = errno;
    close(fd);
    return FAIL(ctx, CKPT_ESYS, "%s: fstat %s: %s", what, path, strerror(err));
  }
  if (!S_ISREG(sb.st_mode)) {
    close(fd);
    return FAIL(ctx, CKPT_EINVAL, "%s: %s is not a regular file", what, path);
  }
  *fd_out = fd;
  *size = (uint64_t)sb.st_size;
  return CKPT_OK;
}

/* Regions registered with ckpt_host_register that overlap [p, p+len): an unmap under them
 * would leave the device pinning pages the process no longer maps. */
static int registered_overlap(ckpt_ctx *ctx, uintptr_t p, uint64_t len) {
  int found = 0;
  pthread_mutex_lock(&ctx->mu);
  for (size_t i = 0; i < ctx->nregions && !found; i++) {
    const ckpt_region *r = &ctx->regions[i];
    found = r->base < p + len && p < r->base + r->len;
  }
  pthread_mutex_unlock(&ctx->mu);
  return found;
}

CKPT_API int ckpt_file_map(ckpt_ctx *ctx, const char *path, void **out, uint64_t *len) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, out != NULL && len != NULL);
  *out = NULL;
  *len = 0;
  CHECK_ARG(ctx, path != NULL);
  int fd;
  uint64_t size;
  CHECK(open_regular(ctx, "ckpt_file_map", path, &fd, &size));
  if (size == 0) {
    close(fd);
    return FAIL(ctx, CKPT_EINVAL, "ckpt_file_map: %s is empty", path);
  }
  if (size > SIZE_MAX) {
    close(fd);
    return FAIL(ctx, CKPT_EINVAL, "ckpt_file_map: %s is too large to map", path);
  }
  void *p = mmap(NULL, (size_t)size, PROT_READ, MAP_SHARED | (ckpt__map_populate ? MAP_POPULATE : 0), fd, 0);
  int err = errno;
  close(fd); /* the mapping keeps the file */
  if (p == MAP_FAILED)
    return FAIL(ctx, CKPT_ESYS, "ckpt_file_map: mmap of %s (%llu bytes): %s", path,
                (unsigned long long)size, strerror(err));
  *out = p;
  *len = size;
  return CKPT_OK;
}

CKPT_API int ckpt_file_unmap(ckpt_ctx *ctx, void *ptr, uint64_t len) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, ptr != NULL);
  CHECK_ARG(ctx, len > 0 && len <= SIZE_MAX);
  if (registered_overlap(ctx, (uintptr_t)ptr, len))
    return FAIL(ctx, CKPT_EBUSY,
                "ckpt_file_unmap: %p+%llu is still registered; ckpt_host_unregister it first", ptr,
                (unsigned long long)len);
  if (munmap(ptr, (size_t)len) != 0)
    return FAIL(ctx, CKPT_ESYS, "ckpt_file_unmap: munmap of %p+%llu: %s", ptr,
                (unsigned long long)len, strerror(errno));
  return CKPT_OK;
}

/* ---- parallel read ------------------------------------------------------------------- */

typedef struct {
  int fd;
  uint64_t offset, len; /* of the whole read, in the file */
  uint8_t *dst;
  size_t chunks;        /* the last one also takes the remainder */
  atomic_size_t next;
  atomic_int failed;    /* set by the first failing thread; the others stop taking chunks */
  pthread_mutex_t mu;   /* guards the first failure's detail below */
  int err;              /* errno, or 0 for an unexpected end of file */
  uint64_t err_offset;  /* file offset of the failed pread */
} read_job;

static void read_failed(read_job *job, int err, uint64_t at) {
  pthread_mutex_lock(&job->mu);
  if (!atomic_load(&job->failed)) {
    job->err = err;
    job->err_offset = at;
    atomic_store(&job->failed, 1);
  }
  pthread_mutex_unlock(&job->mu);
}

static void *read_worker(void *arg) {
  read_job *job = arg;
  while (!atomic_load_explicit(&job->failed, memory_order_relaxed)) {
    size_t k = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
    if (k >= job->chunks) break;
    uint64_t begin = k * CHUNK, end = k + 1 == job->chunks ? job->len : begin + CHUNK;
    while (begin < end) {
      ssize_t got = pread(job->fd, job->dst + begin, (size_t)(end - begin),
                          (off_t)(job->offset + begin));
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) { /* 0: the file shrank under us */
        read_failed(job, got < 0 ? errno : 0, job->offset + begin);
        return NULL;
      }
      begin += (uint64_t)got;
    }
  }
  return NULL;
}

CKPT_API int ckpt_file_read(ckpt_ctx *ctx, const char *path, uint64_t offset, uint64_t len,
                            void *dst, int32_t threads) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, path != NULL);
  CHECK_ARG(ctx, dst != NULL || len == 0);
  CHECK_ARG(ctx, len <= SIZE_MAX);
  int fd;
  uint64_t size;
  CHECK(open_regular(ctx, "ckpt_file_read", path, &fd, &size));
  if (offset > size || len > size - offset) {
    close(fd);
    return FAIL(ctx, CKPT_ESYS,
                "ckpt_file_read: %s holds %llu bytes, too few for %llu bytes at offset %llu", path,
                (unsigned long long)size, (unsigned long long)len, (unsigned long long)offset);
  }
  if (len == 0) {
    close(fd);
    return CKPT_OK;
  }
  read_job job = {.fd = fd, .offset = offset, .len = len, .dst = dst};
  job.chunks = len / CHUNK > 0 ? (size_t)(len / CHUNK) : 1;
  atomic_init(&job.next, 0);
  atomic_init(&job.failed, 0);
  pthread_mutex_init(&job.mu, NULL);
  size_t workers = threads <= 0 ? 1 : threads > MAX_THREADS ? MAX_THREADS : (size_t)threads;
  if (workers > job.chunks) workers = job.chunks;
  pthread_t tid[MAX_THREADS];
  size_t started = 0;
  /* The calling thread is one of the workers; a thread that cannot start leaves its share
   * to the others through the counter. */
  for (; started + 1 < workers; started++)
    if (pthread_create(&tid[started], NULL, read_worker, &job) != 0) break;
  read_worker(&job);
  for (size_t t = 0; t < started; t++) pthread_join(tid[t], NULL);
  close(fd);
  pthread_mutex_destroy(&job.mu);
  if (atomic_load(&job.failed))
    return FAIL(ctx, CKPT_ESYS, "ckpt_file_read: pread of %s at offset %llu: %s", path,
                (unsigned long long)job.err_offset,
                job.err ? strerror(job.err) : "unexpected end of file (the file shrank)");
  return CKPT_OK;
}

/* ---- guarded read of host memory ------------------------------------------------------- */

typedef struct {
  const void *src;
  void *dst;
  size_t len;
} host_read;

static void run_host_read(void *arg) {
  const host_read *x = arg;
  memcpy(x->dst, x->src, x->len);
}

CKPT_API int ckpt_host_read(ckpt_ctx *ctx, const void *src, void *dst, uint64_t len) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, (src != NULL && dst != NULL) || len == 0);
  CHECK_ARG(ctx, len <= SIZE_MAX && (uintptr_t)src + len >= (uintptr_t)src);
  host_read x = {src, dst, (size_t)len};
  uintptr_t fault = 0;
  if (len == 0 || ckpt__guarded(run_host_read, &x, src, (size_t)len, &fault) == CKPT_OK) return CKPT_OK;
  return FAIL(ctx, CKPT_EFAULT,
              "ckpt_host_read of %p+%llu: bus error at 0x%llx, offset %llu: the file mapped there "
              "was truncated", src, (unsigned long long)len, (unsigned long long)fault,
              (unsigned long long)(fault - (uintptr_t)src));
}
