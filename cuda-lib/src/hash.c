/* XXH64 (seed 0) of host ranges, spread over threads. Written from the algorithm's
 * published description: four lanes over 32-byte stripes, a merge of the lanes, a tail in
 * 8-, 4- and 1-byte steps, then an avalanche. CPU only; the same in both backends. */
#include "common.h"
#include "guard.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define P1 11400714785074694791ull
#define P2 14029467366897019727ull
#define P3 1609587929392839161ull
#define P4 9650029242287828579ull
#define P5 2870177450012600261ull

#define MAX_THREADS 64

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t load64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap64(v);
#endif
  return v;
}

static inline uint32_t load32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap32(v);
#endif
  return v;
}

/* One lane step: mixes 8 input bytes into an accumulator. */
static inline uint64_t lane(uint64_t acc, uint64_t in) {
  acc += in * P2;
  acc = rotl64(acc, 31);
  return acc * P1;
}

/* Folds a finished lane into the converged hash. */
static inline uint64_t merge(uint64_t h, uint64_t acc) {
  h ^= lane(0, acc);
  return h * P1 + P4;
}

static uint64_t xxh64(const uint8_t *p, size_t len) {
  const uint8_t *end = p + len;
  uint64_t h;
  if (len >= 32) {
    uint64_t a = P1 + P2, b = P2, c = 0, d = 0 - P1;
    const uint8_t *last = end - 32; /* the last stripe starts at or before this */
    do {
      a = lane(a, load64(p));
      b = lane(b, load64(p + 8));
      c = lane(c, load64(p + 16));
      d = lane(d, load64(p + 24));
      p += 32;
    } while (p <= last);
    h = rotl64(a, 1) + rotl64(b, 7) + rotl64(c, 12) + rotl64(d, 18);
    h = merge(h, a);
    h = merge(h, b);
    h = merge(h, c);
    h = merge(h, d);
  } else {
    h = P5;
  }
  h += (uint64_t)len;
  size_t rest = (size_t)(end - p); /* < 32 */
  for (; rest >= 8; rest -= 8, p += 8) {
    h ^= lane(0, load64(p));
    h = rotl64(h, 27) * P1 + P4;
  }
  if (rest >= 4) {
    h ^= (uint64_t)load32(p) * P1;
    h = rotl64(h, 23) * P2 + P3;
    p += 4;
    rest -= 4;
  }
  for (; rest > 0; rest--, p++) {
    h ^= (uint64_t)*p * P5;
    h = rotl64(h, 11) * P1;
  }
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return h;
}

typedef struct {
  uint64_t len;
  size_t index;
} by_len;

static int longer_first(const void *x, const void *y) {
  const by_len *a = x, *b = y;
  if (a->len != b->len) return a->len < b->len ? 1 : -1;
  return (a->index > b->index) - (a->index < b->index);
}

/* One range's hash, as ckpt__guarded runs it. */
typedef struct {
  const uint8_t *p;
  size_t len;
  uint64_t hash;
} hash_one;

static void run_hash(void *arg) {
  hash_one *x = arg;
  x->hash = xxh64(x->p, x->len);
}

/* Hashes range i into hashes[i] under the guard: CKPT_EFAULT, the address in *fault, when the
 * range's pages are gone. */
static int hash_range(const uint64_t *ranges, size_t i, uint64_t *hashes, uintptr_t *fault) {
  hash_one x = {(const uint8_t *)(uintptr_t)ranges[2 * i], (size_t)ranges[2 * i + 1], 0};
  int st = ckpt__guarded(run_hash, &x, x.p, x.len, fault);
  if (st == CKPT_OK) hashes[i] = x.hash;
  return st;
}

typedef struct {
  const uint64_t *ranges;
  uint64_t *hashes;
  const by_len *order;
  size_t n;
  atomic_size_t next;
  _Atomic uint64_t *done_bytes; /* may be NULL */
  atomic_int failed;            /* the first faulting worker sets it, and the two below */
  size_t failed_range;
  uintptr_t fault;
} hash_job;

static void *hash_worker(void *arg) {
  hash_job *job = arg;
  while (!atomic_load_explicit(&job->failed, memory_order_relaxed)) {
    size_t k = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
    if (k >= job->n) return NULL;
    size_t i = job->order[k].index;
    uintptr_t fault = 0;
    if (hash_range(job->ranges, i, job->hashes, &fault) != CKPT_OK) {
      int no = 0;
      if (atomic_compare_exchange_strong(&job->failed, &no, 1)) { /* read after the joins */
        job->failed_range = i;
        job->fault = fault;
      }
      return NULL;
    }
    if (job->done_bytes)
      atomic_fetch_add_explicit(job->done_bytes, job->ranges[2 * i + 1], memory_order_relaxed);
  }
  return NULL;
}

/* The failure of a range whose pages faulted. */
static int hash_fault(ckpt_ctx *ctx, const uint64_t *ranges, size_t i, uintptr_t fault) {
  unsigned long long addr = ranges[2 * i];
  return FAIL(ctx, CKPT_EFAULT,
              "ckpt_hash64: range %zu (0x%llx, %llu bytes): bus error at 0x%llx, offset %llu of "
              "the range: the file mapped there was truncated",
              i, addr, (unsigned long long)ranges[2 * i + 1], (unsigned long long)fault,
              (unsigned long long)fault - addr);
}

CKPT_API int ckpt_hash64(ckpt_ctx *ctx, const uint64_t *ranges, size_t n, uint64_t *hashes,
                         int32_t threads, uint64_t *done_bytes) {
  CHECK_ARG(NULL, ctx != NULL);
  if (n == 0) return CKPT_OK;
  if (ranges == NULL || hashes == NULL)
    return FAIL(ctx, CKPT_EINVAL, "ckpt_hash64: %s is NULL with n=%zu",
                ranges == NULL ? "ranges" : "hashes", n);
  for (size_t i = 0; i < n; i++) {
    uint64_t addr = ranges[2 * i], len = ranges[2 * i + 1];
    if (len > 0 && (addr == 0 || addr + len < addr || len > SIZE_MAX))
      return FAIL(ctx, CKPT_EINVAL, "ckpt_hash64: range %zu (address 0x%llx, len %llu) is not valid memory",
                  i, (unsigned long long)addr, (unsigned long long)len);
  }
  size_t workers = threads <= 0 ? 1 : threads > MAX_THREADS ? MAX_THREADS : (size_t)threads;
  if (workers > n) workers = n;
  /* The counter is read by other threads while this runs, hence atomic (same layout). */
  _Atomic uint64_t *done = (_Atomic uint64_t *)done_bytes;
  if (workers == 1) {
    for (size_t i = 0; i < n; i++) {
      uintptr_t fault = 0;
      if (hash_range(ranges, i, hashes, &fault) != CKPT_OK) return hash_fault(ctx, ranges, i, fault);
      if (done) atomic_fetch_add_explicit(done, ranges[2 * i + 1], memory_order_relaxed);
    }
    return CKPT_OK;
  }
  by_len *order = malloc(n * sizeof *order);
  if (order == NULL) return FAIL(ctx, CKPT_ENOMEM, "ckpt_hash64: order of %zu ranges", n);
  for (size_t i = 0; i < n; i++) order[i] = (by_len){ranges[2 * i + 1], i};
  qsort(order, n, sizeof *order, longer_first);
  hash_job job = {.ranges = ranges, .hashes = hashes, .order = order, .n = n, .done_bytes = done};
  atomic_init(&job.next, 0);
  atomic_init(&job.failed, 0);
  pthread_t tid[MAX_THREADS];
  size_t started = 0;
  /* The calling thread is one of the workers; if a thread cannot start, the others
   * (at least this one) take its share through the counter. */
  for (; started + 1 < workers; started++)
    if (pthread_create(&tid[started], NULL, hash_worker, &job) != 0) break;
  hash_worker(&job);
  for (size_t t = 0; t < started; t++) pthread_join(tid[t], NULL);
  free(order);
  if (atomic_load(&job.failed)) return hash_fault(ctx, ranges, job.failed_range, job.fault);
  return CKPT_OK;
}
