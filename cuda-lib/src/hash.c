/* The ckpt hash of host ranges (see ckpt_hash in ckpt.h): XXH64 (seed 0) of every 64 KiB chunk,
 * spread over threads chunk by chunk, then XXH64 (xxh64.h) of each range's chunk hashes. CPU
 * only; the same in both backends. */
#include "common.h"
#include "guard.h"
#include "xxh64.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

static uint64_t xxh64(const uint8_t *p, size_t len) {
  size_t stripes = len / 32;
  uint64_t h = XXH_P5;
  if (stripes > 0) {
    uint64_t v[4] = XXH_LANES_INIT;
    for (size_t s = 0; s < stripes; s++, p += 32) {
      v[0] = xxh_lane(v[0], xxh_load64(p));
      v[1] = xxh_lane(v[1], xxh_load64(p + 8));
      v[2] = xxh_lane(v[2], xxh_load64(p + 16));
      v[3] = xxh_lane(v[3], xxh_load64(p + 24));
    }
    h = xxh_converge(v);
  }
  return xxh_finish(h, len, p, len % 32);
}

uint64_t ckpt__xxh64(const void *p, size_t len) { return xxh64(p, len); }

uint64_t ckpt__hash_combine(const uint64_t *chunks, size_t k) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  uint8_t *le = malloc(k * 8 + 1); /* the hashes as little-endian bytes */
  if (le == NULL) abort();
  for (size_t i = 0; i < k; i++) {
    uint64_t v = __builtin_bswap64(chunks[i]);
    memcpy(le + 8 * i, &v, 8);
  }
  uint64_t h = xxh64(le, k * 8);
  free(le);
  return h;
#else
  return xxh64((const uint8_t *)chunks, k * 8);
#endif
}

size_t ckpt__hash_chunks(uint64_t len) { return (size_t)((len + CKPT_HASH_CHUNK - 1) / CKPT_HASH_CHUNK); }

/* One chunk's hash, as ckpt__guarded runs it. */
typedef struct {
  const uint8_t *p;
  size_t len;
  uint64_t hash;
} hash_one;

static void run_hash(void *arg) {
  hash_one *x = arg;
  x->hash = xxh64(x->p, x->len);
}

typedef struct {
  const uint64_t *table; /* every chunk's (address, len) */
  size_t total;          /* chunks */
  uint64_t *chunks;      /* their hashes */
  atomic_size_t next;    /* the next chunk to take */
  _Atomic uint64_t *done_bytes; /* may be NULL */
  atomic_int failed;     /* the first faulting worker sets it, and the two below */
  size_t failed_chunk;
  uintptr_t fault;
} hash_job;

static void *hash_worker(void *arg) {
  hash_job *job = arg;
  while (!atomic_load_explicit(&job->failed, memory_order_relaxed)) {
    size_t c = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
    if (c >= job->total) return NULL;
    hash_one x = {(const uint8_t *)(uintptr_t)job->table[2 * c], (size_t)job->table[2 * c + 1], 0};
    uintptr_t fault = 0;
    if (ckpt__guarded(run_hash, &x, x.p, x.len, &fault) != CKPT_OK) {
      int no = 0;
      if (atomic_compare_exchange_strong(&job->failed, &no, 1)) { /* read after the joins */
        job->failed_chunk = c;
        job->fault = fault;
      }
      return NULL;
    }
    job->chunks[c] = x.hash;
    if (job->done_bytes) atomic_fetch_add_explicit(job->done_bytes, x.len, memory_order_relaxed);
  }
  return NULL;
}

/* The range that chunk c belongs to (first[] ascends; empty ranges own no chunk). */
static size_t range_of(const size_t *first, size_t n, size_t c) {
  size_t lo = 0, hi = n; /* first[lo] <= c < first[hi] */
  while (hi - lo > 1) {
    size_t mid = lo + (hi - lo) / 2;
    if (first[mid] <= c) lo = mid;
    else hi = mid;
  }
  return lo;
}

/* The failure of a range whose pages faulted. */
static int hash_fault(ckpt_ctx *ctx, const uint64_t *ranges, size_t i, uintptr_t fault) {
  unsigned long long addr = ranges[2 * i];
  return FAIL(ctx, CKPT_EFAULT,
              "ckpt_hash: range %zu (0x%llx, %llu bytes): bus error at 0x%llx, offset %llu of "
              "the range: the file mapped there was truncated",
              i, addr, (unsigned long long)ranges[2 * i + 1], (unsigned long long)fault,
              (unsigned long long)fault - addr);
}

CKPT_API int ckpt_hash(ckpt_ctx *ctx, const uint64_t *ranges, size_t n, uint64_t *hashes,
                       uint64_t *chunk_hashes, int32_t threads, uint64_t *done_bytes) {
  CHECK_ARG(NULL, ctx != NULL);
  if (n == 0) return CKPT_OK;
  if (ranges == NULL || hashes == NULL)
    return FAIL(ctx, CKPT_EINVAL, "ckpt_hash: %s is NULL with n=%zu",
                ranges == NULL ? "ranges" : "hashes", n);
  for (size_t i = 0; i < n; i++) {
    uint64_t addr = ranges[2 * i], len = ranges[2 * i + 1];
    if (len > 0 && (addr == 0 || addr + len < addr || len > SIZE_MAX - CKPT_HASH_CHUNK))
      return FAIL(ctx, CKPT_EINVAL, "ckpt_hash: range %zu (address 0x%llx, len %llu) is not valid memory",
                  i, (unsigned long long)addr, (unsigned long long)len);
  }
  uint64_t *table;
  size_t *first;
  CHECK(ckpt__chunk_table(ctx, ranges, n, &table, &first));
  size_t total = first[n];
  uint64_t *chunks = chunk_hashes ? chunk_hashes : malloc(total * sizeof *chunks + 1);
  if (chunks == NULL) {
    free(table), free(first);
    return FAIL(ctx, CKPT_ENOMEM, "ckpt_hash: %zu chunk hashes", total);
  }
  /* The counter is read by other threads while this runs, hence atomic (same layout). */
  hash_job job = {.table = table, .total = total, .chunks = chunks, .done_bytes = (_Atomic uint64_t *)done_bytes};
  atomic_init(&job.next, 0);
  atomic_init(&job.failed, 0);
  ckpt__run_workers(hash_worker, &job, threads, total);
  int st = CKPT_OK;
  if (atomic_load(&job.failed)) st = hash_fault(ctx, ranges, range_of(first, n, job.failed_chunk), job.fault);
  else
    for (size_t i = 0; i < n; i++) hashes[i] = ckpt__hash_combine(chunks + first[i], first[i + 1] - first[i]);
  if (chunks != chunk_hashes) free(chunks);
  free(table), free(first);
  return st;
}

int ckpt__buf_ranges(const ckpt__places *places, ckpt_buf *const *bufs, size_t nbufs, const uint64_t *ranges,
                     size_t n, uint64_t **out) {
  *out = NULL;
  const ckpt__place first = places->buf(bufs[0]);
  ckpt_ctx *ctx = (ckpt_ctx *)first.ctx;
  for (size_t k = 1; k < nbufs; k++) {
    if (bufs[k] == NULL) return FAIL(ctx, CKPT_EINVAL, "ckpt_buf_hash: buffer %zu is NULL", k);
    const ckpt__place b = places->buf(bufs[k]);
    if (b.ctx != first.ctx || b.device != first.device)
      return FAIL(ctx, CKPT_EINVAL, "ckpt_buf_hash: buffer %zu is of another context or device than buffer 0", k);
  }
  if (ranges == NULL) return FAIL(ctx, CKPT_EINVAL, "ckpt_buf_hash: ranges is NULL with n=%zu", n);
  uint64_t *abs = malloc(2 * n * sizeof *abs);
  if (abs == NULL) return FAIL(ctx, CKPT_ENOMEM, "ckpt_buf_hash: %zu ranges", n);
  for (size_t i = 0; i < n; i++) {
    uint64_t k = ranges[3 * i], off = ranges[3 * i + 1], l = ranges[3 * i + 2];
    if (k >= nbufs) {
      free(abs);
      return FAIL(ctx, CKPT_EINVAL, "ckpt_buf_hash: range %zu names buffer %llu of %zu", i, (unsigned long long)k, nbufs);
    }
    const ckpt__place b = places->buf(bufs[k]);
    if (off > b.len || l > b.len - off) {
      free(abs);
      return FAIL(ctx, CKPT_ERANGE,
                  "ckpt_buf_hash: range %zu (%llu bytes at offset %llu) is outside buffer %llu of %llu bytes", i,
                  (unsigned long long)l, (unsigned long long)off, (unsigned long long)k, (unsigned long long)b.len);
    }
    abs[2 * i] = l > 0 ? (uint64_t)b.base + off : 0;
    abs[2 * i + 1] = l;
  }
  *out = abs;
  return CKPT_OK;
}

int ckpt__chunk_table(ckpt_ctx *ctx, const uint64_t *ranges, size_t n, uint64_t **table, size_t **first) {
  *table = NULL;
  size_t *f = malloc((n + 1) * sizeof *f);
  if (f == NULL) return FAIL(ctx, CKPT_ENOMEM, "chunk index of %zu ranges", n);
  f[0] = 0;
  for (size_t i = 0; i < n; i++) f[i + 1] = f[i] + ckpt__hash_chunks(ranges[2 * i + 1]);
  size_t total = f[n];
  uint64_t *t = malloc(2 * total * sizeof *t + 1);
  if (t == NULL) {
    free(f);
    return FAIL(ctx, CKPT_ENOMEM, "chunk table of %zu chunks", total);
  }
  for (size_t i = 0; i < n; i++)
    for (size_t c = f[i]; c < f[i + 1]; c++) {
      uint64_t at = (uint64_t)(c - f[i]) * CKPT_HASH_CHUNK, len = ranges[2 * i + 1] - at;
      t[2 * c] = ranges[2 * i] + at;
      t[2 * c + 1] = len < CKPT_HASH_CHUNK ? len : CKPT_HASH_CHUNK;
    }
  *table = t;
  *first = f;
  return CKPT_OK;
}
