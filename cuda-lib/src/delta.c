/* Sparse deltas between two versions of a tensor in host memory (see ckpt_delta_count in ckpt.h):
 * the elements that differ, found a word at a time, the range split into parts that threads
 * take in turn. Counting and filling both read under the SIGBUS guard. CPU only; the same in
 * both backends. */
#include "common.h"
#include "guard.h"

#include <stdatomic.h>
#include <stdlib.h>

/* Elements per part: a few hundred KiB of each range, so threads share a tensor evenly. */
#define PART_ELEMS ((uint64_t)1 << 18)

typedef struct {
  const uint8_t *base, *next;
  uint64_t elems;
  uint32_t elem;
  uint64_t limit;          /* counting: stop once the total exceeds it */
  uint64_t *counts;        /* per part */
  uint64_t *first;         /* filling: per part, the index of its first difference */
  uint32_t *positions;
  uint8_t *new_values, *old_values;
  size_t parts;
  atomic_size_t next_part;
  atomic_uint_fast64_t total;
  atomic_int failed;
  uintptr_t fault;
} delta_job;

/* One part's work, as ckpt__guarded2 runs it. */
typedef struct {
  delta_job *job;
  size_t part;
} delta_part;

static int differs(const uint8_t *a, const uint8_t *b, uint32_t elem) { return memcmp(a, b, elem) != 0; }

/* The differences in elements [lo, hi): counted, or (job->first set) written out. */
static void scan(delta_job *j, size_t part, int fill) {
  uint64_t lo = (uint64_t)part * PART_ELEMS, hi = lo + PART_ELEMS < j->elems ? lo + PART_ELEMS : j->elems;
  uint32_t es = j->elem;
  uint64_t k = fill ? j->first[part] : 0, n = 0;
  uint64_t per_word = 8 / es, e = lo;
  /* Whole 8-byte words compared at once (most are equal), then their elements one by one. */
  for (; e + per_word <= hi; e += per_word) {
    uint64_t a, b;
    memcpy(&a, j->base + e * es, 8);
    memcpy(&b, j->next + e * es, 8);
    if (a == b) continue;
    for (uint64_t x = e; x < e + per_word; x++) {
      if (!differs(j->base + x * es, j->next + x * es, es)) continue;
      if (fill) {
        j->positions[k + n] = (uint32_t)x;
        memcpy(j->new_values + (k + n) * es, j->next + x * es, es);
        if (j->old_values) memcpy(j->old_values + (k + n) * es, j->base + x * es, es);
      }
      n++;
    }
  }
  for (; e < hi; e++) {
    if (!differs(j->base + e * es, j->next + e * es, es)) continue;
    if (fill) {
      j->positions[k + n] = (uint32_t)e;
      memcpy(j->new_values + (k + n) * es, j->next + e * es, es);
      if (j->old_values) memcpy(j->old_values + (k + n) * es, j->base + e * es, es);
    }
    n++;
  }
  j->counts[part] = n;
}

static void run_count(void *arg) {
  delta_part *p = arg;
  scan(p->job, p->part, 0);
}

static void run_fill(void *arg) {
  delta_part *p = arg;
  scan(p->job, p->part, 1);
}

/* Takes parts in turn and runs `fn` on each under the guard of both ranges' part. */
static void parts_loop(delta_job *j, void (*fn)(void *), int counting) {
  while (!atomic_load_explicit(&j->failed, memory_order_relaxed)) {
    if (counting && atomic_load_explicit(&j->total, memory_order_relaxed) > j->limit) break;
    size_t part = atomic_fetch_add_explicit(&j->next_part, 1, memory_order_relaxed);
    if (part >= j->parts) break;
    uint64_t lo = (uint64_t)part * PART_ELEMS * j->elem;
    uint64_t len = (part + 1 == j->parts ? j->elems * j->elem : lo + PART_ELEMS * j->elem) - lo;
    delta_part x = {j, part};
    uintptr_t fault = 0;
    if (ckpt__guarded2(fn, &x, j->base + lo, (size_t)len, j->next + lo, (size_t)len, &fault) != CKPT_OK) {
      int no = 0;
      if (atomic_compare_exchange_strong(&j->failed, &no, 1)) j->fault = fault;
      break;
    }
    if (counting) atomic_fetch_add_explicit(&j->total, j->counts[part], memory_order_relaxed);
  }
}

static void *count_worker(void *arg) {
  parts_loop(arg, run_count, 1);
  return NULL;
}

static void *fill_worker(void *arg) {
  parts_loop(arg, run_fill, 0);
  return NULL;
}

/* Checks the arguments both calls share and sets up the job (counts allocated). */
static int job_init(ckpt_ctx *ctx, const char *fn, delta_job *j, const void *base, const void *next, uint64_t len,
                    uint32_t elem) {
  CHECK_ARG(ctx, base != NULL && next != NULL);
  if (elem != 1 && elem != 2 && elem != 4 && elem != 8)
    return FAIL(ctx, CKPT_EINVAL, "%s: element size %u is not 1, 2, 4 or 8 bytes", fn, elem);
  if (len % elem != 0)
    return FAIL(ctx, CKPT_EINVAL, "%s: %llu bytes are not whole %u-byte elements", fn, (unsigned long long)len, elem);
  if (len / elem > UINT32_MAX + 1ull)
    return FAIL(ctx, CKPT_EINVAL, "%s: %llu elements do not fit 32-bit positions", fn,
                (unsigned long long)(len / elem));
  if ((uintptr_t)base + len < (uintptr_t)base || (uintptr_t)next + len < (uintptr_t)next)
    return FAIL(ctx, CKPT_EINVAL, "%s: a range wraps the address space", fn);
  memset(j, 0, sizeof *j);
  j->base = base, j->next = next, j->elems = len / elem, j->elem = elem;
  j->parts = (size_t)((j->elems + PART_ELEMS - 1) / PART_ELEMS);
  j->counts = calloc(j->parts + 1, sizeof *j->counts);
  if (j->counts == NULL) return FAIL(ctx, CKPT_ENOMEM, "%s: %zu parts", fn, j->parts);
  atomic_init(&j->next_part, 0);
  atomic_init(&j->total, 0);
  atomic_init(&j->failed, 0);
  return CKPT_OK;
}

static int faulted(ckpt_ctx *ctx, const char *fn, const delta_job *j) {
  uintptr_t at = j->fault;
  int in_base = at >= (uintptr_t)j->base && at < (uintptr_t)j->base + j->elems * j->elem;
  uintptr_t start = in_base ? (uintptr_t)j->base : (uintptr_t)j->next;
  return FAIL(ctx, CKPT_EFAULT, "%s: bus error at 0x%llx, offset %llu of the %s range: the file mapped there was truncated",
              fn, (unsigned long long)at, (unsigned long long)(at - start), in_base ? "base" : "next");
}

CKPT_API int ckpt_delta_count(ckpt_ctx *ctx, const void *base, const void *next, uint64_t len, uint32_t elem,
                              uint64_t limit, int32_t threads, uint64_t *count) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, count != NULL);
  *count = 0;
  delta_job j;
  CHECK(job_init(ctx, "ckpt_delta_count", &j, base, next, len, elem));
  j.limit = limit;
  ckpt__run_workers(count_worker, &j, threads, j.parts);
  int failed = atomic_load(&j.failed);
  uint64_t total = atomic_load(&j.total);
  free(j.counts);
  if (failed) return faulted(ctx, "ckpt_delta_count", &j);
  *count = total > limit ? limit + 1 : total;
  return CKPT_OK;
}

CKPT_API int ckpt_delta_fill(ckpt_ctx *ctx, const void *base, const void *next, uint64_t len, uint32_t elem,
                             uint64_t count, uint32_t *positions, void *new_values, void *old_values,
                             int32_t threads) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, count == 0 || (positions != NULL && new_values != NULL));
  delta_job j;
  CHECK(job_init(ctx, "ckpt_delta_fill", &j, base, next, len, elem));
  /* Counted again per part (each part's first index), then written where its count says. */
  j.limit = UINT64_MAX;
  ckpt__run_workers(count_worker, &j, threads, j.parts);
  uint64_t total = atomic_load(&j.total);
  int st = CKPT_OK;
  if (atomic_load(&j.failed)) {
    st = faulted(ctx, "ckpt_delta_fill", &j);
  } else if (total != count) {
    st = FAIL(ctx, CKPT_EINVAL, "ckpt_delta_fill: %llu elements differ, not the %llu counted: the ranges changed",
              (unsigned long long)total, (unsigned long long)count);
  } else {
    j.first = malloc(j.parts * sizeof *j.first);
    if (j.first == NULL) {
      st = FAIL(ctx, CKPT_ENOMEM, "ckpt_delta_fill: %zu parts", j.parts);
    } else {
      uint64_t at = 0;
      for (size_t p = 0; p < j.parts; p++) j.first[p] = at, at += j.counts[p];
      j.positions = positions, j.new_values = new_values, j.old_values = old_values;
      atomic_store(&j.next_part, 0);
      ckpt__run_workers(fill_worker, &j, threads, j.parts);
      if (atomic_load(&j.failed)) st = faulted(ctx, "ckpt_delta_fill", &j);
      free(j.first);
    }
  }
  free(j.counts);
  return st;
}

/* The delta's writes, as ckpt__guarded runs them. */
typedef struct {
  uint8_t *dst;
  uint32_t elem;
  const uint32_t *positions;
  const uint8_t *values;
  uint64_t count;
} apply_job;

static void run_apply(void *arg) {
  apply_job *a = arg;
  for (uint64_t i = 0; i < a->count; i++) memcpy(a->dst + (uint64_t)a->positions[i] * a->elem, a->values + i * a->elem, a->elem);
}

CKPT_API int ckpt_delta_apply(ckpt_ctx *ctx, void *dst, uint64_t len, uint32_t elem, const uint32_t *positions,
                              const void *values, uint64_t count) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, dst != NULL && (count == 0 || (positions != NULL && values != NULL)));
  if (elem != 1 && elem != 2 && elem != 4 && elem != 8)
    return FAIL(ctx, CKPT_EINVAL, "ckpt_delta_apply: element size %u is not 1, 2, 4 or 8 bytes", elem);
  uint64_t elems = len / elem;
  for (uint64_t i = 0; i < count; i++) {
    if (positions[i] >= elems)
      return FAIL(ctx, CKPT_ERANGE, "ckpt_delta_apply: position %u (change %llu) is past the tensor's %llu elements",
                  positions[i], (unsigned long long)i, (unsigned long long)elems);
  }
  apply_job a = {dst, elem, positions, values, count};
  uintptr_t fault = 0;
  if (count == 0 || ckpt__guarded(run_apply, &a, dst, (size_t)len, &fault) == CKPT_OK) return CKPT_OK;
  return FAIL(ctx, CKPT_EFAULT, "ckpt_delta_apply: bus error at 0x%llx, offset %llu: the file mapped there was truncated",
              (unsigned long long)fault, (unsigned long long)(fault - (uintptr_t)dst));
}
