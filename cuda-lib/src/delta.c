/* Sparse deltas between two versions of a tensor in host memory (see ckpt_delta_find in ckpt.h):
 * the elements that differ, found a word at a time in one pass, the range split into parts
 * that threads take in turn, each part's differences kept packed until they are gathered in
 * order. Read under the SIGBUS guard. CPU only; the same in both backends. */
#include "common.h"
#include "guard.h"

#include <stdatomic.h>
#include <stdlib.h>

/* Elements per part: a few hundred KiB of each range, so threads share a tensor evenly. */
#define PART_ELEMS ((uint64_t)1 << 18)

/* What one part found: its differences' positions, new and old values, back to back. */
typedef struct {
  uint64_t n;
  uint8_t *found; /* n uint32 positions, then n new values, then n old values */
} part_found;

struct ckpt_delta {
  ckpt_ctx *ctx;
  uint32_t elem;
  uint64_t count;
  size_t parts;
  part_found *found;
};

typedef struct {
  const uint8_t *base, *next;
  uint64_t elems;
  uint32_t elem;
  uint64_t limit;  /* stop once the total exceeds it */
  part_found *found;
  size_t parts;
  atomic_size_t next_part;
  atomic_uint_fast64_t total;
  atomic_int failed; /* 1: a bus error, 2: out of memory */
  uintptr_t fault;
} delta_job;

/* One part's scan, as ckpt__guarded2 runs it: into the thread's scratch, which holds a whole
 * part's worth of differences. */
typedef struct {
  delta_job *job;
  size_t part;
  uint32_t *pos;
  uint8_t *nv, *ov;
  uint64_t n;
} part_scan;

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#error "delta.c finds an element in a word by its low bits first: little-endian only"
#endif

/* The differences of elements [lo, hi) of `es` bytes (a constant where inlined), 8 bytes at a
 * time: the XOR of a word that differs names its differing elements by their set bits (low
 * bits first: the elements in ascending order, on little-endian machines). */
static inline uint64_t scan_es(const uint8_t *base, const uint8_t *next, uint64_t lo, uint64_t hi, uint32_t es,
                               uint32_t *pos, uint8_t *nv, uint8_t *ov) {
  uint64_t n = 0, e = lo, per_word = 8 / es;
  uint64_t lane = es == 8 ? ~0ull : (1ull << (8 * es)) - 1;
  for (; e + per_word <= hi; e += per_word) {
    const uint8_t *a = base + e * es, *b = next + e * es;
    uint64_t x, y;
    memcpy(&x, a, 8);
    memcpy(&y, b, 8);
    for (uint64_t d = x ^ y; d != 0;) {
      uint32_t k = (uint32_t)__builtin_ctzll(d) / (8 * es);
      pos[n] = (uint32_t)(e + k);
      memcpy(nv + n * es, b + k * es, es);
      memcpy(ov + n * es, a + k * es, es);
      n++;
      d &= ~(lane << (8 * es * k));
    }
  }
  for (; e < hi; e++) {
    if (memcmp(base + e * es, next + e * es, es) == 0) continue;
    pos[n] = (uint32_t)e;
    memcpy(nv + n * es, next + e * es, es);
    memcpy(ov + n * es, base + e * es, es);
    n++;
  }
  return n;
}

static void scan(void *arg) {
  part_scan *x = arg;
  const delta_job *j = x->job;
  uint64_t lo = (uint64_t)x->part * PART_ELEMS, hi = lo + PART_ELEMS < j->elems ? lo + PART_ELEMS : j->elems;
  switch (j->elem) { /* each size its own loop, its copies of constant size */
    case 1: x->n = scan_es(j->base, j->next, lo, hi, 1, x->pos, x->nv, x->ov); break;
    case 2: x->n = scan_es(j->base, j->next, lo, hi, 2, x->pos, x->nv, x->ov); break;
    case 4: x->n = scan_es(j->base, j->next, lo, hi, 4, x->pos, x->nv, x->ov); break;
    default: x->n = scan_es(j->base, j->next, lo, hi, 8, x->pos, x->nv, x->ov); break;
  }
}

static void *find_worker(void *arg) {
  delta_job *j = arg;
  uint32_t es = j->elem;
  uint8_t *scratch = malloc(PART_ELEMS * (4 + 2 * (size_t)es));
  if (scratch == NULL) {
    int no = 0;
    atomic_compare_exchange_strong(&j->failed, &no, 2);
    return NULL;
  }
  part_scan x = {.job = j, .pos = (uint32_t *)scratch, .nv = scratch + PART_ELEMS * 4};
  x.ov = x.nv + PART_ELEMS * es;
  while (!atomic_load_explicit(&j->failed, memory_order_relaxed) &&
         atomic_load_explicit(&j->total, memory_order_relaxed) <= j->limit) {
    size_t part = atomic_fetch_add_explicit(&j->next_part, 1, memory_order_relaxed);
    if (part >= j->parts) break;
    uint64_t lo = (uint64_t)part * PART_ELEMS * es;
    uint64_t len = (part + 1 == j->parts ? j->elems * es : lo + PART_ELEMS * es) - lo;
    x.part = part;
    uintptr_t fault = 0;
    if (ckpt__guarded2(scan, &x, j->base + lo, (size_t)len, j->next + lo, (size_t)len, &fault) != CKPT_OK) {
      int no = 0;
      if (atomic_compare_exchange_strong(&j->failed, &no, 1)) j->fault = fault;
      break;
    }
    if (atomic_fetch_add_explicit(&j->total, x.n, memory_order_relaxed) + x.n > j->limit || x.n == 0) continue;
    /* Kept, packed to its size, until ckpt_delta_take gathers the parts in order. */
    uint8_t *kept = malloc(x.n * (4 + 2 * (size_t)es));
    if (kept == NULL) {
      int no = 0;
      atomic_compare_exchange_strong(&j->failed, &no, 2);
      break;
    }
    memcpy(kept, x.pos, x.n * 4);
    memcpy(kept + x.n * 4, x.nv, x.n * es);
    memcpy(kept + x.n * (4 + es), x.ov, x.n * es);
    j->found[part] = (part_found){x.n, kept};
  }
  free(scratch);
  return NULL;
}

static void found_free(part_found *found, size_t parts) {
  for (size_t p = 0; found != NULL && p < parts; p++) free(found[p].found);
  free(found);
}

CKPT_API int ckpt_delta_find(ckpt_ctx *ctx, const void *base, const void *next, uint64_t len, uint32_t elem,
                             uint64_t limit, int32_t threads, ckpt_delta **out, uint64_t *count) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, out != NULL && count != NULL);
  *out = NULL;
  *count = 0;
  CHECK_ARG(ctx, base != NULL && next != NULL);
  const char *fn = "ckpt_delta_find";
  if (elem != 1 && elem != 2 && elem != 4 && elem != 8)
    return FAIL(ctx, CKPT_EINVAL, "%s: element size %u is not 1, 2, 4 or 8 bytes", fn, elem);
  if (len % elem != 0)
    return FAIL(ctx, CKPT_EINVAL, "%s: %llu bytes are not whole %u-byte elements", fn, (unsigned long long)len, elem);
  if (len / elem > UINT32_MAX + 1ull)
    return FAIL(ctx, CKPT_EINVAL, "%s: %llu elements do not fit 32-bit positions", fn,
                (unsigned long long)(len / elem));
  if ((uintptr_t)base + len < (uintptr_t)base || (uintptr_t)next + len < (uintptr_t)next)
    return FAIL(ctx, CKPT_EINVAL, "%s: a range wraps the address space", fn);
  delta_job j = {.base = base, .next = next, .elems = len / elem, .elem = elem, .limit = limit};
  j.parts = (size_t)((j.elems + PART_ELEMS - 1) / PART_ELEMS);
  j.found = calloc(j.parts + 1, sizeof *j.found);
  if (j.found == NULL) return FAIL(ctx, CKPT_ENOMEM, "%s: %zu parts", fn, j.parts);
  atomic_init(&j.next_part, 0);
  atomic_init(&j.total, 0);
  atomic_init(&j.failed, 0);
  ckpt__run_workers(find_worker, &j, threads, j.parts);
  int failed = atomic_load(&j.failed);
  uint64_t total = atomic_load(&j.total);
  if (failed || total > limit || total == 0) found_free(j.found, j.parts);
  if (failed == 2) return FAIL(ctx, CKPT_ENOMEM, "%s: keeping the differences of %llu elements", fn, (unsigned long long)j.elems);
  if (failed == 1) {
    uintptr_t at = j.fault;
    int in_base = at >= (uintptr_t)base && at < (uintptr_t)base + len;
    uintptr_t start = in_base ? (uintptr_t)base : (uintptr_t)next;
    return FAIL(ctx, CKPT_EFAULT, "%s: bus error at 0x%llx, offset %llu of the %s range: the file mapped there was truncated",
                fn, (unsigned long long)at, (unsigned long long)(at - start), in_base ? "base" : "next");
  }
  *count = total > limit ? limit + 1 : total;
  if (total > limit || total == 0) return CKPT_OK;
  ckpt_delta *d = malloc(sizeof *d);
  if (d == NULL) {
    found_free(j.found, j.parts);
    return FAIL(ctx, CKPT_ENOMEM, "%s", fn);
  }
  *d = (ckpt_delta){ctx, elem, total, j.parts, j.found};
  ckpt__live(ctx, 1);
  *out = d;
  return CKPT_OK;
}

CKPT_API int ckpt_delta_take(ckpt_delta *d, uint32_t *positions, void *new_values, void *old_values) {
  CHECK_ARG(NULL, d != NULL);
  CHECK_ARG(d->ctx, positions != NULL && new_values != NULL);
  uint64_t at = 0, es = d->elem;
  for (size_t p = 0; p < d->parts; p++) {
    const part_found *f = &d->found[p];
    if (f->n == 0) continue;
    memcpy(positions + at, f->found, f->n * 4);
    memcpy((uint8_t *)new_values + at * es, f->found + f->n * 4, f->n * es);
    if (old_values != NULL) memcpy((uint8_t *)old_values + at * es, f->found + f->n * (4 + es), f->n * es);
    at += f->n;
  }
  ckpt_delta_free(d);
  return CKPT_OK;
}

CKPT_API void ckpt_delta_free(ckpt_delta *d) {
  if (d == NULL) return;
  found_free(d->found, d->parts);
  ckpt__live(d->ctx, -1);
  free(d);
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
