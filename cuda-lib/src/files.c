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

#define CHUNK (64ull << 20) /* the least a thread reads at a time */
/* What a thread reads at a time where it hashes what it reads: a few chunks, still in cache. */
#define HASHED_PIECE (16ull * CKPT_HASH_CHUNK)

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

/* A piece of a read: `len` bytes at file offset `at`; if hash >= 0, hashed into chunk hash
 * number `hash` right after it is read, while it is still in the CPU's cache. */
typedef struct {
  uint64_t at, len;
  int64_t hash;
} piece;

typedef struct {
  int fd;
  uint64_t offset;      /* of the whole read, in the file: dst holds the bytes from there */
  uint8_t *dst;
  const piece *pieces;
  size_t n;
  uint64_t *chunks;     /* chunk hashes, for pieces with hash >= 0 */
  atomic_size_t next;
  atomic_int failed;    /* set by the first failing thread; the others stop taking pieces */
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
    if (k >= job->n) break;
    const piece *p = &job->pieces[k];
    uint8_t *dst = job->dst + (p->at - job->offset);
    for (uint64_t done = 0; done < p->len;) {
      ssize_t got = pread(job->fd, dst + done, (size_t)(p->len - done), (off_t)(p->at + done));
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) { /* 0: the file shrank under us */
        read_failed(job, got < 0 ? errno : 0, p->at + done);
        return NULL;
      }
      done += (uint64_t)got;
    }
    /* A hashed piece holds up to HASHED_PIECE / CKPT_HASH_CHUNK chunks, numbered from p->hash. */
    for (uint64_t at = 0; p->hash >= 0 && at < p->len; at += CKPT_HASH_CHUNK) {
      size_t n = (size_t)(p->len - at < CKPT_HASH_CHUNK ? p->len - at : CKPT_HASH_CHUNK);
      job->chunks[p->hash + (int64_t)(at / CKPT_HASH_CHUNK)] = ckpt__xxh64(dst + at, n);
    }
  }
  return NULL;
}

/* Opens path and checks that it holds [offset, offset + len) (CKPT_ESYS naming it if not). */
static int open_for_read(ckpt_ctx *ctx, const char *what, const char *path, uint64_t offset, uint64_t len, int *fd) {
  uint64_t size;
  CHECK(open_regular(ctx, what, path, fd, &size));
  if (offset > size || len > size - offset) {
    close(*fd);
    return FAIL(ctx, CKPT_ESYS, "%s: %s holds %llu bytes, too few for %llu bytes at offset %llu", what, path,
                (unsigned long long)size, (unsigned long long)len, (unsigned long long)offset);
  }
  return CKPT_OK;
}

/* Reads the job's pieces on up to `threads` threads, then closes the file. */
static int read_run(ckpt_ctx *ctx, const char *what, const char *path, read_job *job, int32_t threads) {
  atomic_init(&job->next, 0);
  atomic_init(&job->failed, 0);
  pthread_mutex_init(&job->mu, NULL);
  ckpt__run_workers(read_worker, job, threads, job->n);
  close(job->fd);
  pthread_mutex_destroy(&job->mu);
  if (atomic_load(&job->failed))
    return FAIL(ctx, CKPT_ESYS, "%s: pread of %s at offset %llu: %s", what, path,
                (unsigned long long)job->err_offset,
                job->err ? strerror(job->err) : "unexpected end of file (the file shrank)");
  return CKPT_OK;
}

/* Appends the pieces of [at, end) that no range hashes, at most CHUNK bytes each. */
static size_t gap_pieces(piece *out, size_t k, uint64_t at, uint64_t end) {
  for (; at < end; at += CHUNK) out[k++] = (piece){at, end - at < CHUNK ? end - at : CHUNK, -1};
  return k;
}

CKPT_API int ckpt_file_read(ckpt_ctx *ctx, const char *path, uint64_t offset, uint64_t len,
                            void *dst, int32_t threads) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, path != NULL);
  CHECK_ARG(ctx, dst != NULL || len == 0);
  CHECK_ARG(ctx, len <= SIZE_MAX);
  int fd;
  CHECK(open_for_read(ctx, "ckpt_file_read", path, offset, len, &fd));
  size_t n = (size_t)(len / CHUNK) + 1;
  piece *pieces = malloc(n * sizeof *pieces);
  if (pieces == NULL) {
    close(fd);
    return FAIL(ctx, CKPT_ENOMEM, "ckpt_file_read: %zu pieces", n);
  }
  read_job job = {.fd = fd, .offset = offset, .dst = dst, .pieces = pieces};
  job.n = gap_pieces(pieces, 0, offset, offset + len);
  int st = read_run(ctx, "ckpt_file_read", path, &job, threads);
  free(pieces);
  return st;
}

typedef struct {
  uint64_t at, len;
  size_t index;
} by_offset;

static int earlier(const void *x, const void *y) {
  const by_offset *a = x, *b = y;
  if (a->at != b->at) return (a->at > b->at) - (a->at < b->at);
  return (a->len > b->len) - (a->len < b->len); /* an empty range first: it overlaps nothing */
}

CKPT_API int ckpt_file_read_hash(ckpt_ctx *ctx, const char *path, uint64_t offset, uint64_t len, void *dst,
                                 const uint64_t *ranges, size_t n, uint64_t *hashes, int32_t threads) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, path != NULL);
  CHECK_ARG(ctx, dst != NULL || len == 0);
  CHECK_ARG(ctx, len <= SIZE_MAX);
  CHECK_ARG(ctx, n == 0 || (ranges != NULL && hashes != NULL));
  by_offset *order = malloc(n * sizeof *order + 1);
  size_t *first = malloc((n + 1) * sizeof *first);
  if (order == NULL || first == NULL) {
    free(order), free(first);
    return FAIL(ctx, CKPT_ENOMEM, "ckpt_file_read_hash: %zu ranges", n);
  }
  for (size_t i = 0; i < n; i++) order[i] = (by_offset){ranges[2 * i], ranges[2 * i + 1], i};
  qsort(order, n, sizeof *order, earlier);
  /* Inside the read and apart: each byte is read once. */
  uint64_t end = offset;
  int st = CKPT_OK;
  for (size_t k = 0; k < n && st == CKPT_OK; k++) {
    const by_offset *r = &order[k];
    if (r->len == 0 && r->at >= offset && r->at <= offset + len) continue; /* no bytes: inside another is fine */
    if (r->at < end || r->at > offset + len || r->len > offset + len - r->at)
      st = FAIL(ctx, CKPT_EINVAL,
                "ckpt_file_read_hash: range %zu (%llu bytes at %llu) is %s", r->index, (unsigned long long)r->len,
                (unsigned long long)r->at, r->at < end && r->at >= offset ? "overlapping another" : "outside the read");
    else
      end = r->at + r->len;
  }
  first[0] = 0;
  for (size_t i = 0; i < n; i++) first[i + 1] = first[i] + ckpt__hash_chunks(ranges[2 * i + 1]);
  /* Every chunk, and the gaps between the ranges in CHUNK pieces. */
  size_t cap = first[n] + 2 * n + (size_t)(len / CHUNK) + 2;
  piece *pieces = st == CKPT_OK ? malloc(cap * sizeof *pieces) : NULL;
  uint64_t *chunks = st == CKPT_OK ? malloc(first[n] * sizeof *chunks + 1) : NULL;
  if (st == CKPT_OK && (pieces == NULL || chunks == NULL))
    st = FAIL(ctx, CKPT_ENOMEM, "ckpt_file_read_hash: %zu chunks", first[n]);
  int fd = -1;
  if (st == CKPT_OK) st = open_for_read(ctx, "ckpt_file_read_hash", path, offset, len, &fd);
  if (st == CKPT_OK) {
    size_t m = 0;
    uint64_t at = offset;
    for (size_t k = 0; k < n; k++) {
      const by_offset *r = &order[k];
      if (r->len == 0) continue; /* no chunk, and it may lie inside another range */
      m = gap_pieces(pieces, m, at, r->at);
      for (uint64_t from = r->at; from < r->at + r->len; from += HASHED_PIECE) {
        uint64_t l = r->at + r->len - from;
        int64_t c = (int64_t)(first[r->index] + (from - r->at) / CKPT_HASH_CHUNK);
        pieces[m++] = (piece){from, l < HASHED_PIECE ? l : HASHED_PIECE, c};
      }
      at = r->at + r->len;
    }
    m = gap_pieces(pieces, m, at, offset + len);
    read_job job = {.fd = fd, .offset = offset, .dst = dst, .pieces = pieces, .n = m, .chunks = chunks};
    st = read_run(ctx, "ckpt_file_read_hash", path, &job, threads);
  }
  if (st == CKPT_OK)
    for (size_t i = 0; i < n; i++) hashes[i] = ckpt__hash_combine(chunks + first[i], first[i + 1] - first[i]);
  free(order), free(first), free(pieces), free(chunks);
  return st;
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

/* ---- parallel guarded copies of host memory --------------------------------------------- */

typedef struct {
  const uint64_t *ranges; /* (dst, src, len) */
  const size_t *first;    /* first[i]: index of range i's first CHUNK piece; first[n]: all */
  size_t n;
  atomic_size_t next;
  atomic_int failed;
  size_t failed_range;
  uintptr_t fault;
} copy_job;

static void *copy_worker(void *arg) {
  copy_job *job = arg;
  size_t total = job->first[job->n];
  size_t i = 0; /* the range of the last piece: pieces are taken in ascending order */
  while (!atomic_load_explicit(&job->failed, memory_order_relaxed)) {
    size_t k = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
    if (k >= total) break;
    while (job->first[i + 1] <= k) i++;
    const uint64_t *r = &job->ranges[3 * i];
    uint64_t at = (uint64_t)(k - job->first[i]) * CHUNK, len = r[2] - at < CHUNK ? r[2] - at : CHUNK;
    host_read x = {(const void *)(uintptr_t)(r[1] + at), (void *)(uintptr_t)(r[0] + at), (size_t)len};
    uintptr_t fault = 0;
    if (ckpt__guarded(run_host_read, &x, x.src, x.len, &fault) != CKPT_OK) {
      int no = 0;
      if (atomic_compare_exchange_strong(&job->failed, &no, 1)) job->failed_range = i, job->fault = fault;
      break;
    }
  }
  return NULL;
}

CKPT_API int ckpt_host_copy(ckpt_ctx *ctx, const uint64_t *ranges, size_t n, int32_t threads) {
  CHECK_ARG(NULL, ctx != NULL);
  if (n == 0) return CKPT_OK;
  CHECK_ARG(ctx, ranges != NULL);
  size_t *first = malloc((n + 1) * sizeof *first);
  if (first == NULL) return FAIL(ctx, CKPT_ENOMEM, "ckpt_host_copy: %zu ranges", n);
  first[0] = 0;
  for (size_t i = 0; i < n; i++) {
    uint64_t dst = ranges[3 * i], src = ranges[3 * i + 1], len = ranges[3 * i + 2];
    if (len > 0 && (dst == 0 || src == 0 || dst + len < dst || src + len < src || len > SIZE_MAX)) {
      free(first);
      return FAIL(ctx, CKPT_EINVAL, "ckpt_host_copy: range %zu (0x%llx <- 0x%llx, %llu bytes) is not valid memory", i,
                  (unsigned long long)dst, (unsigned long long)src, (unsigned long long)len);
    }
    first[i + 1] = first[i] + (size_t)((len + CHUNK - 1) / CHUNK);
  }
  copy_job job = {.ranges = ranges, .first = first, .n = n};
  atomic_init(&job.next, 0);
  atomic_init(&job.failed, 0);
  ckpt__run_workers(copy_worker, &job, threads, first[n]);
  free(first);
  if (!atomic_load(&job.failed)) return CKPT_OK;
  const uint64_t *r = &ranges[3 * job.failed_range];
  return FAIL(ctx, CKPT_EFAULT,
              "ckpt_host_copy: range %zu (%llu bytes from 0x%llx): bus error at 0x%llx, offset %llu: the file "
              "mapped there was truncated",
              job.failed_range, (unsigned long long)r[2], (unsigned long long)r[1], (unsigned long long)job.fault,
              (unsigned long long)(job.fault - r[1]));
}
