/* ckpt-gpu-test: checks every operation of libckpt-cuda.so on a real GPU.
 *   ckpt-gpu-test                  run the checks; "ok - name" / "FAIL - name: detail" per check,
 *                                  then "N passed, N failed"; exit 1 on any failure
 *   ckpt-gpu-test --bandwidth [G]  host-to-device bandwidth with G GiB (default 4) per copy
 *   ckpt-gpu-test --child HEX      (internal) the importing side of the IPC check */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ckpt.h"

#define MIB (1ull << 20)
#define GIB (1ull << 30)
#define WAIT_MS 60000

static int g_passed, g_failed;
static ckpt_ctx *g_ctx; /* whose last error a failure line shows */

static void report(int ok, const char *name, const char *fmt, ...) {
  if (ok) {
    printf("ok - %s\n", name);
    g_passed++;
  } else {
    char detail[512] = "", last[512] = "";
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    if (g_ctx != NULL) ckpt_last_error(g_ctx, last, sizeof last);
    printf("FAIL - %s: %s [last_error: %s]\n", name, detail, last);
    g_failed++;
  }
  fflush(stdout);
}

/* Checks that a call returned `want`. */
static int expect(int got, int want, const char *name) {
  report(got == want, name, "got %s, want %s", ckpt_err_name(got), ckpt_err_name(want));
  return got == want;
}

static const char *last_error(ckpt_ctx *ctx) {
  static char buf[512];
  ckpt_last_error(ctx, buf, sizeof buf);
  return buf;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static ckpt_ctx_options options(void) {
  ckpt_ctx_options o;
  memset(&o, 0, sizeof o);
  o.size = sizeof o;
  o.abi_version = CKPT_ABI_VERSION;
  return o;
}

static uint64_t splitmix(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* A position-dependent pattern: byte i of the pattern `seed`. */
static void fill_pattern(uint8_t *p, size_t len, uint64_t seed) {
  size_t i = 0;
  for (; i + 8 <= len; i += 8) {
    uint64_t s = seed ^ (i * 0x100000001b3ull), w = splitmix(&s);
    memcpy(p + i, &w, 8);
  }
  for (; i < len; i++) p[i] = (uint8_t)(seed + i * 131);
}

/* Offset of the first byte that differs from the pattern, or -1. */
static long long check_pattern(const uint8_t *p, size_t len, uint64_t seed) {
  size_t i = 0;
  for (; i + 8 <= len; i += 8) {
    uint64_t s = seed ^ (i * 0x100000001b3ull), w = splitmix(&s);
    if (memcmp(p + i, &w, 8) != 0) {
      for (size_t j = 0; j < 8; j++)
        if (p[i + j] != ((uint8_t *)&w)[j]) return (long long)(i + j);
    }
  }
  for (; i < len; i++)
    if (p[i] != (uint8_t)(seed + i * 131)) return (long long)i;
  return -1;
}

static long long first_diff(const uint8_t *a, const uint8_t *b, size_t len) {
  for (size_t i = 0; i < len; i++)
    if (a[i] != b[i]) return (long long)i;
  return -1;
}

/* Records `ev` on `s` and waits for it. */
static int sync_stream(ckpt_event *ev, ckpt_stream *s) {
  int st = ckpt_event_record(ev, s);
  return st != CKPT_OK ? st : ckpt_event_wait(ev, WAIT_MS);
}

/* Copies [src, src+len) into buf at offset 0 and waits. */
static int copy_wait(ckpt_stream *s, ckpt_event *ev, ckpt_buf *buf, const void *src, size_t len) {
  ckpt_range r = {(uint64_t)(uintptr_t)src, 0, len};
  int st = ckpt_h2d_async(s, buf, &r, 1);
  return st != CKPT_OK ? st : sync_stream(ev, s);
}

/* ---- IPC child ------------------------------------------------------------------------ */

#define IPC_LEN (256 * MIB)
#define IPC_SEED1 0x1111u
#define IPC_SEED2 0x2222u

static int child_fail(int code, ckpt_ctx *ctx, const char *what, int st) {
  printf("# child: %s: %s: %s\n", what, ckpt_err_name(st), ctx ? last_error(ctx) : "");
  fflush(stdout);
  return code;
}

/* The importing process: verifies the first pattern, writes the second. */
static int child_main(const char *hex) {
  ckpt_ipc_handle h;
  if (strlen(hex) != 2 * sizeof h) return child_fail(2, NULL, "handle hex length", 0);
  for (size_t i = 0; i < sizeof h; i++) {
    unsigned v;
    if (sscanf(hex + 2 * i, "%2x", &v) != 1) return child_fail(2, NULL, "handle hex", 0);
    ((uint8_t *)&h)[i] = (uint8_t)v;
  }
  ckpt_ctx_options o = options();
  ckpt_ctx *ctx = NULL;
  int st = ckpt_ctx_create(&o, &ctx);
  if (st != CKPT_OK) return child_fail(3, NULL, "ctx_create", st);
  ckpt_buf *buf = NULL;
  if ((st = ckpt_buf_import(ctx, &h, &buf)) != CKPT_OK) return child_fail(4, ctx, "import", st);
  uint64_t len = 0;
  int32_t dev = -1;
  ckpt_buf_info(buf, NULL, &len, &dev);
  if (len != IPC_LEN || dev != h.device) return child_fail(5, ctx, "buf_info of the import", 0);
  uint8_t *host = malloc(IPC_LEN);
  if (host == NULL) return child_fail(6, ctx, "malloc", 0);
  if ((st = ckpt_buf_read(buf, 0, host, IPC_LEN)) != CKPT_OK)
    return child_fail(7, ctx, "buf_read", st);
  long long bad = check_pattern(host, IPC_LEN, IPC_SEED1);
  if (bad >= 0) {
    printf("# child: first pattern differs at byte %lld\n", bad);
    return 8;
  }
  ckpt_ipc_handle again;
  memset(&again, 0, sizeof again);
  again.size = sizeof again;
  if ((st = ckpt_buf_export(buf, &again)) != CKPT_EINVAL)
    return child_fail(9, ctx, "export of an imported buffer (want CKPT_EINVAL)", st);
  void *src = NULL;
  ckpt_stream *s = NULL;
  ckpt_event *ev = NULL;
  if ((st = ckpt_host_alloc(ctx, IPC_LEN, &src)) != CKPT_OK)
    return child_fail(10, ctx, "host_alloc", st);
  fill_pattern(src, IPC_LEN, IPC_SEED2);
  if ((st = ckpt_stream_create(ctx, dev, &s)) != CKPT_OK)
    return child_fail(11, ctx, "stream_create", st);
  if ((st = ckpt_event_create(ctx, dev, &ev)) != CKPT_OK)
    return child_fail(12, ctx, "event_create", st);
  if ((st = copy_wait(s, ev, buf, src, IPC_LEN)) != CKPT_OK)
    return child_fail(13, ctx, "h2d into the import", st);
  if ((st = ckpt_event_destroy(ev)) != CKPT_OK) return child_fail(14, ctx, "event_destroy", st);
  if ((st = ckpt_stream_destroy(s)) != CKPT_OK) return child_fail(15, ctx, "stream_destroy", st);
  if ((st = ckpt_buf_free(buf)) != CKPT_OK) return child_fail(16, ctx, "buf_free", st);
  if ((st = ckpt_host_free(ctx, src)) != CKPT_OK) return child_fail(17, ctx, "host_free", st);
  if ((st = ckpt_ctx_destroy(ctx)) != CKPT_OK) return child_fail(18, ctx, "ctx_destroy", st);
  free(host);
  return 0;
}

/* ---- checks ---------------------------------------------------------------------------- */

static int cmp_double(const void *a, const void *b);

static void check_errors(void) {
  report(strcmp(ckpt_err_name(CKPT_OK), "CKPT_OK") == 0 &&
             strcmp(ckpt_err_name(CKPT_ERANGE), "CKPT_ERANGE") == 0 &&
             strcmp(ckpt_err_name(CKPT_EUNSUPPORTED), "CKPT_EUNSUPPORTED") == 0 &&
             strcmp(ckpt_err_name(12345), "CKPT_UNKNOWN") == 0,
         "err_name", "%s %s %s", ckpt_err_name(CKPT_OK), ckpt_err_name(CKPT_ERANGE),
         ckpt_err_name(12345));
  report(ckpt_strerror(CKPT_ETIMEDOUT)[0] != '\0' && ckpt_strerror(-999)[0] != '\0', "strerror",
         "empty message");
  report(strcmp(ckpt_backend(), "cuda") == 0 && ckpt_abi_version() == CKPT_ABI_VERSION,
         "backend is cuda, ABI version matches", "backend %s, ABI %u", ckpt_backend(),
         ckpt_abi_version());
  ckpt_ctx_options o = options();
  o.size -= 8;
  ckpt_ctx *ctx = (ckpt_ctx *)&o;
  expect(ckpt_ctx_create(&o, &ctx), CKPT_EABI, "ctx_create with a wrong options size -> EABI");
  report(ctx == NULL, "failed ctx_create leaves *out NULL", "*out is %p", (void *)ctx);
  o = options();
  o.abi_version = CKPT_ABI_VERSION + 1;
  expect(ckpt_ctx_create(&o, &ctx), CKPT_EABI, "ctx_create with a wrong ABI version -> EABI");
}

static void check_devices(ckpt_ctx *ctx, int32_t n) {
  char name[160];
  for (int32_t d = 0; d < n; d++) {
    ckpt_device_info info;
    memset(&info, 0, sizeof info);
    info.size = sizeof info;
    snprintf(name, sizeof name, "device_info %d", d);
    if (!expect(ckpt_device_info_get(ctx, d, &info), CKPT_OK, name)) continue;
    printf("# device %d: %s %s pci_bus %d numa %d, %.2f of %.2f GiB free\n", d, info.name,
           info.uuid, info.pci_bus, info.numa_node, info.free_bytes / (double)GIB,
           info.total_bytes / (double)GIB);
    snprintf(name, sizeof name, "device_info %d: uuid, name, sizes", d);
    report(strncmp(info.uuid, "GPU-", 4) == 0 && strlen(info.uuid) == 40 && info.name[0] &&
               info.total_bytes > 0 && info.free_bytes <= info.total_bytes && info.index == d,
           name, "uuid '%s' name '%s' free %llu total %llu index %d", info.uuid, info.name,
           (unsigned long long)info.free_bytes, (unsigned long long)info.total_bytes, info.index);
  }
  ckpt_device_info info;
  memset(&info, 0, sizeof info);
  info.size = sizeof info - 4;
  expect(ckpt_device_info_get(ctx, 0, &info), CKPT_EABI, "device_info with a wrong size -> EABI");
  info.size = sizeof info;
  expect(ckpt_device_info_get(ctx, n, &info), CKPT_ENODEV, "device_info past the last -> ENODEV");
  expect(ckpt_device_info_get(ctx, -1, &info), CKPT_ENODEV, "device_info -1 -> ENODEV");
  double t0 = now_s();
  for (int i = 0; i < 100; i++) ckpt_device_info_get(ctx, 0, &info);
  printf("# device_info: %.1f us per call\n", (now_s() - t0) * 1e4);
}

static void check_host_alloc(ckpt_ctx *ctx) {
  void *p = NULL;
  size_t len = 8 * MIB + 123;
  if (!expect(ckpt_host_alloc(ctx, len, &p), CKPT_OK, "host_alloc 8 MiB + 123")) return;
  memset(p, 0xab, len); /* the whole allocation is writable */
  expect(ckpt_host_unregister(ctx, p), CKPT_EINVAL, "host_unregister of allocated memory -> EINVAL");
  expect(ckpt_host_free(ctx, p), CKPT_OK, "host_free");
  expect(ckpt_host_free(ctx, p), CKPT_EINVAL, "host_free twice -> EINVAL");
  int local;
  expect(ckpt_host_free(ctx, &local), CKPT_EINVAL, "host_free of foreign memory -> EINVAL");
}

/* A read-only shared mapping of a file filled with `seed`'s pattern (in /dev/shm if present). */
static void *map_readonly_file(size_t len, uint64_t seed) {
  char path[64];
  snprintf(path, sizeof path, "%s/ckpt-gpu-test-XXXXXX",
           access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
  int fd = mkstemp(path);
  if (fd < 0) return NULL;
  unlink(path); /* the mappings keep the file alive */
  void *ro = MAP_FAILED;
  if (ftruncate(fd, (off_t)len) == 0) {
    void *rw = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (rw != MAP_FAILED) {
      fill_pattern(rw, len, seed);
      munmap(rw, len);
      ro = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
    }
  }
  close(fd);
  return ro == MAP_FAILED ? NULL : ro;
}

typedef struct {
  uint8_t *base;
  size_t len;
} source;

/* Ranges of mixed sizes (tiny, unaligned, large) from the sources into a `dst_len` buffer;
 * applies them to `expected` as the copy should. */
static size_t make_ranges(ckpt_range *r, size_t max, const source *src, int nsrc, size_t dst_len,
                          uint8_t *expected) {
  uint64_t rng = 42;
  size_t k = 0, off = 0;
  while (k + 2 < max) {
    uint64_t x = splitmix(&rng), c = x % 10, len;
    if (c < 4) len = 1 + splitmix(&rng) % 16;
    else if (c < 7) len = 17 + splitmix(&rng) % 4080;
    else if (c < 9) len = 4096 + splitmix(&rng) % (256 * 1024);
    else len = 256 * 1024 + splitmix(&rng) % (4 * MIB);
    off += splitmix(&rng) % 64;
    if (off + len > dst_len) break;
    const source *s = &src[splitmix(&rng) % (uint64_t)nsrc];
    size_t so = splitmix(&rng) % (s->len - len + 1);
    r[k++] = (ckpt_range){(uint64_t)(uintptr_t)(s->base + so), off, len};
    memcpy(expected + off, s->base + so, len);
    off += len;
  }
  r[k++] = (ckpt_range){(uint64_t)(uintptr_t)src[0].base, off / 2, 0}; /* empty range */
  if (off + 7 <= dst_len) { /* one that ends exactly at the end of the buffer */
    r[k++] = (ckpt_range){(uint64_t)(uintptr_t)(src[0].base + 3), dst_len - 7, 7};
    memcpy(expected + dst_len - 7, src[0].base + 3, 7);
  }
  return k;
}

/* Copies ranges from allocated, registered and read-only registered memory, then checks
 * the bad-range cases leave the destination untouched. */
static void check_copies(ckpt_ctx *ctx, ckpt_stream *s, ckpt_event *ev) {
  const size_t SRC = 64 * MIB, DST = 64 * MIB;
  void *alloc = NULL, *anon = MAP_FAILED, *ro = NULL;
  ckpt_buf *dst = NULL;
  uint8_t *expected = calloc(1, DST), *got = malloc(DST), *unpinned = malloc(4096);
  ckpt_range *r = calloc(4096, sizeof *r);
  if (!expected || !got || !unpinned || !r) {
    report(0, "copies: test memory", "malloc failed");
    goto out;
  }
  if (!expect(ckpt_host_alloc(ctx, SRC, &alloc), CKPT_OK, "host_alloc 64 MiB")) goto out;
  anon = mmap(NULL, SRC, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (anon == MAP_FAILED) {
    report(0, "copies: mmap 64 MiB", "%s", strerror(errno));
    goto out;
  }
  fill_pattern(anon, SRC, 2);
  expect(ckpt_host_register(ctx, anon, SRC, 0), CKPT_OK, "host_register 64 MiB anonymous");
  expect(ckpt_host_register(ctx, anon, SRC, 0), CKPT_EINVAL, "host_register twice -> EINVAL");
  expect(ckpt_host_register(ctx, (uint8_t *)anon + 4096, 4096, 0), CKPT_EINVAL,
         "host_register inside a registered region -> EINVAL");
  expect(ckpt_host_register(ctx, unpinned, 4096, 0x80), CKPT_EINVAL,
         "host_register with unknown flags -> EINVAL");
  ro = map_readonly_file(SRC, 3);
  if (ro == NULL) report(0, "copies: read-only file mapping", "%s", strerror(errno));
  else
    expect(ckpt_host_register(ctx, ro, SRC, CKPT_REGISTER_READONLY), CKPT_OK,
           "host_register 64 MiB read-only file mapping with CKPT_REGISTER_READONLY");
  if (!expect(ckpt_buf_alloc(ctx, 0, DST, &dst), CKPT_OK, "buf_alloc 64 MiB")) goto out;
  uint64_t addr = 0, blen = 0;
  int32_t bdev = -1;
  expect(ckpt_buf_info(dst, &addr, &blen, &bdev), CKPT_OK, "buf_info");
  report(addr != 0 && blen == DST && bdev == 0, "buf_info values", "address %llx len %llu dev %d",
         (unsigned long long)addr, (unsigned long long)blen, bdev);

  /* Zero the destination from the allocation, then fill the sources. */
  memset(alloc, 0, DST);
  expect(copy_wait(s, ev, dst, alloc, DST), CKPT_OK, "h2d of the whole buffer + wait");
  fill_pattern(alloc, SRC, 1);
  source src[3] = {{alloc, SRC}, {anon, SRC}, {ro, SRC}};
  size_t n = make_ranges(r, 4096, src, ro ? 3 : 2, DST, expected);
  printf("# %zu ranges\n", n);
  expect(ckpt_h2d_async(s, dst, NULL, 0), CKPT_OK, "h2d_async of 0 ranges");
  expect(ckpt_h2d_async(s, dst, r, n), CKPT_OK, "h2d_async of many mixed ranges");
  expect(ckpt_event_record(ev, s), CKPT_OK, "event_record");
  expect(ckpt_event_wait(ev, WAIT_MS), CKPT_OK, "event_wait");
  expect(ckpt_event_query(ev), CKPT_OK, "event_query after wait");
  expect(ckpt_buf_read(dst, 0, got, DST), CKPT_OK, "buf_read 64 MiB");
  long long bad = first_diff(got, expected, DST);
  report(bad < 0, "mixed ranges arrived byte for byte", "first difference at byte %lld", bad);
  expect(ckpt_buf_read(dst, DST - 5, got, 6), CKPT_ERANGE, "buf_read past the end -> ERANGE");
  expect(ckpt_buf_read(dst, DST + 1, got, 0), CKPT_ERANGE, "buf_read offset past the end -> ERANGE");

  /* Bad ranges: nothing may be queued, not even the good range before the bad one. */
  memset(unpinned, 0xee, 4096);
  memset(alloc, 0xee, 4096);
  uint64_t a = (uint64_t)(uintptr_t)alloc, u = (uint64_t)(uintptr_t)unpinned;
  ckpt_range bad_src[2] = {{a, 0, 4096}, {u, 8192, 16}};
  ckpt_range crosses[1] = {{a + SRC - 10, 0, 20}};
  ckpt_range past_end[2] = {{a, 0, 4096}, {a, DST - 10, 20}};
  ckpt_range off_past[1] = {{a, DST + 1, 0}};
  ckpt_range wraps[1] = {{a, 8, UINT64_MAX}};
  expect(ckpt_h2d_async(s, dst, bad_src, 2), CKPT_ERANGE, "h2d from unpinned memory -> ERANGE");
  expect(ckpt_h2d_async(s, dst, crosses, 1), CKPT_ERANGE,
         "h2d crossing the end of pinned memory -> ERANGE");
  expect(ckpt_h2d_async(s, dst, past_end, 2), CKPT_ERANGE,
         "h2d past the end of the destination -> ERANGE");
  expect(ckpt_h2d_async(s, dst, off_past, 1), CKPT_ERANGE,
         "h2d with offset past the end of the destination -> ERANGE");
  expect(ckpt_h2d_async(s, dst, wraps, 1), CKPT_ERANGE, "h2d with a wrapping length -> ERANGE");
  expect(ckpt_h2d_async(s, dst, NULL, 1), CKPT_EINVAL, "h2d with NULL ranges -> EINVAL");
  expect(sync_stream(ev, s), CKPT_OK, "wait after the bad ranges");
  expect(ckpt_buf_read(dst, 0, got, DST), CKPT_OK, "buf_read after the bad ranges");
  bad = first_diff(got, expected, DST);
  report(bad < 0, "bad ranges left the destination untouched", "first difference at byte %lld",
         bad);

out:
  if (dst) expect(ckpt_buf_free(dst), CKPT_OK, "buf_free");
  if (ro) {
    expect(ckpt_host_unregister(ctx, ro), CKPT_OK, "host_unregister of the read-only mapping");
    munmap(ro, SRC);
  }
  if (anon != MAP_FAILED) {
    expect(ckpt_host_unregister(ctx, anon), CKPT_OK, "host_unregister");
    expect(ckpt_host_unregister(ctx, anon), CKPT_EINVAL, "host_unregister twice -> EINVAL");
    munmap(anon, SRC);
  }
  if (alloc) expect(ckpt_host_free(ctx, alloc), CKPT_OK, "host_free 64 MiB");
  free(expected);
  free(got);
  free(unpinned);
  free(r);
}

/* Event states while a 1 GiB copy runs; stream_destroy waits for queued work. */
static void check_events(ckpt_ctx *ctx, ckpt_stream *s, ckpt_event *ev) {
  void *src = NULL;
  ckpt_buf *dst = NULL;
  ckpt_stream *s2 = NULL;
  ckpt_event *fresh = NULL;
  if (!expect(ckpt_host_alloc(ctx, GIB, &src), CKPT_OK, "host_alloc 1 GiB")) goto out;
  if (!expect(ckpt_buf_alloc(ctx, 0, GIB, &dst), CKPT_OK, "buf_alloc 1 GiB")) goto out;
  expect(ckpt_event_create(ctx, 0, &fresh), CKPT_OK, "event_create");
  if (fresh) expect(ckpt_event_query(fresh), CKPT_OK, "event_query of a never recorded event");
  expect(copy_wait(s, ev, dst, src, GIB), CKPT_OK, "warm-up 1 GiB copy");

  expect(ckpt_host_free(ctx, (void *)(uintptr_t)0x1000), CKPT_EINVAL, "host_free of a bogus pointer");
  ckpt_range r = {(uint64_t)(uintptr_t)src, 0, GIB};
  double t0 = now_s();
  expect(ckpt_h2d_async(s, dst, &r, 1), CKPT_OK, "h2d_async 1 GiB");
  expect(ckpt_event_record(ev, s), CKPT_OK, "event_record after 1 GiB");
  int q = ckpt_event_query(ev);
  if (q == CKPT_OK) {
    report(1, "event_query during a 1 GiB copy (copy finished first; EAGAIN not seen)", "");
  } else if (expect(q, CKPT_EAGAIN, "event_query during a 1 GiB copy -> EAGAIN")) {
    report(ckpt_last_error(ctx, NULL, 0) == CKPT_EINVAL, "EAGAIN is not recorded as a failure",
           "last status %s", ckpt_err_name(ckpt_last_error(ctx, NULL, 0)));
  }
  int w = ckpt_event_wait(ev, 0);
  report(w == CKPT_ETIMEDOUT || w == CKPT_OK, "event_wait(0) during the copy -> ETIMEDOUT or OK",
         "got %s", ckpt_err_name(w));
  if (w == CKPT_ETIMEDOUT)
    report(ckpt_last_error(ctx, NULL, 0) == CKPT_ETIMEDOUT, "ETIMEDOUT is recorded",
           "last status %s", ckpt_err_name(ckpt_last_error(ctx, NULL, 0)));
  expect(ckpt_event_wait(ev, WAIT_MS), CKPT_OK, "event_wait after the timeout");
  printf("# 1 GiB copy: %.1f ms\n", (now_s() - t0) * 1e3);
  expect(ckpt_event_query(ev), CKPT_OK, "event_query after the copy");

  if (expect(ckpt_stream_create(ctx, 0, &s2), CKPT_OK, "stream_create")) {
    expect(ckpt_h2d_async(s2, dst, &r, 1), CKPT_OK, "h2d_async 1 GiB on a second stream");
    expect(ckpt_event_record(ev, s2), CKPT_OK, "event_record on the second stream");
    expect(ckpt_stream_destroy(s2), CKPT_OK, "stream_destroy with queued work");
    expect(ckpt_event_query(ev), CKPT_OK, "stream_destroy waited for the queued copy");
  }
out:
  if (fresh) expect(ckpt_event_destroy(fresh), CKPT_OK, "event_destroy");
  if (dst) expect(ckpt_buf_free(dst), CKPT_OK, "buf_free 1 GiB");
  if (src) expect(ckpt_host_free(ctx, src), CKPT_OK, "host_free 1 GiB");
}

static void check_nccl(ckpt_ctx *ctx) {
  int32_t v = 0;
  int st = ckpt_nccl_version(ctx, &v);
  if (st == CKPT_OK) {
    printf("# NCCL version %d\n", v);
    report(v > 0, "nccl_version", "version %d", v);
    int32_t v2 = 0;
    expect(ckpt_nccl_version(ctx, &v2), CKPT_OK, "nccl_version again");
    report(v2 == v, "nccl_version is stable", "%d then %d", v, v2);
  } else {
    printf("# NCCL unavailable: %s\n", last_error(ctx));
    expect(st, CKPT_ENCCL, "nccl_version without NCCL -> ENCCL");
  }
  ckpt_ctx_options o = options();
  o.nccl_path = "/nonexistent/libnccl.so.2";
  ckpt_ctx *other = NULL;
  if (expect(ckpt_ctx_create(&o, &other), CKPT_OK, "ctx_create with a missing NCCL path")) {
    expect(ckpt_nccl_version(other, &v), CKPT_ENCCL, "nccl_version of a missing path -> ENCCL");
    report(strstr(last_error(other), "nonexistent") != NULL, "ENCCL names the loader's message",
           "'%s'", last_error(other));
    expect(ckpt_ctx_destroy(other), CKPT_OK, "ctx_destroy of the second context");
  }
}

/* Exports a 256 MiB buffer to a child process that checks it and writes a new pattern. */
static void check_ipc(ckpt_ctx *ctx, int32_t ndev, ckpt_stream *s, ckpt_event *ev) {
  void *src = NULL;
  ckpt_buf *buf = NULL, *self = NULL;
  uint8_t *host = malloc(IPC_LEN);
  if (host == NULL) {
    report(0, "ipc: malloc", "out of memory");
    return;
  }
  if (!expect(ckpt_host_alloc(ctx, IPC_LEN, &src), CKPT_OK, "ipc: host_alloc 256 MiB")) goto out;
  if (!expect(ckpt_buf_alloc(ctx, 0, IPC_LEN, &buf), CKPT_OK, "ipc: buf_alloc 256 MiB")) goto out;
  fill_pattern(src, IPC_LEN, IPC_SEED1);
  if (!expect(copy_wait(s, ev, buf, src, IPC_LEN), CKPT_OK, "ipc: fill the buffer")) goto out;

  ckpt_ipc_handle h;
  memset(&h, 0, sizeof h);
  h.size = sizeof h - 1;
  expect(ckpt_buf_export(buf, &h), CKPT_EABI, "buf_export with a wrong size -> EABI");
  h.size = sizeof h;
  if (!expect(ckpt_buf_export(buf, &h), CKPT_OK, "buf_export")) goto out;
  report(h.kind == CKPT_IPC_CUDA && h.len == IPC_LEN && h.device == 0 && h.pid == getpid(),
         "buf_export fields", "kind %u len %llu device %d pid %d", h.kind,
         (unsigned long long)h.len, h.device, h.pid);
  ckpt_ipc_handle bad = h;
  bad.size = sizeof bad + 8;
  expect(ckpt_buf_import(ctx, &bad, &self), CKPT_EABI, "buf_import with a wrong size -> EABI");
  bad = h;
  bad.kind = CKPT_IPC_HOST;
  expect(ckpt_buf_import(ctx, &bad, &self), CKPT_EHANDLE, "buf_import of a host handle -> EHANDLE");
  bad = h;
  bad.device = ndev;
  expect(ckpt_buf_import(ctx, &bad, &self), CKPT_ENODEV, "buf_import on a missing device -> ENODEV");
  expect(ckpt_buf_import(ctx, &h, &self), CKPT_ECUDA, "buf_import in the exporting process -> ECUDA");
  if (self) ckpt_buf_free(self);

  char hex[2 * sizeof h + 1];
  for (size_t i = 0; i < sizeof h; i++) sprintf(hex + 2 * i, "%02x", ((uint8_t *)&h)[i]);
  char *args[] = {(char *)"ckpt-gpu-test", (char *)"--child", hex, NULL};
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  if (pid == 0) { /* the child execs at once: a forked CUDA process must not use CUDA */
    execv("/proc/self/exe", args);
    _exit(127);
  }
  if (pid < 0) {
    report(0, "ipc: fork", "%s", strerror(errno));
    goto out;
  }
  int wst = 0;
  while (waitpid(pid, &wst, 0) < 0 && errno == EINTR) {
  }
  report(WIFEXITED(wst) && WEXITSTATUS(wst) == 0,
         "ipc: child imported, verified and rewrote the buffer", "child %s %d",
         WIFEXITED(wst) ? "exited with" : "killed by signal",
         WIFEXITED(wst) ? WEXITSTATUS(wst) : WTERMSIG(wst));
  if (expect(ckpt_buf_read(buf, 0, host, IPC_LEN), CKPT_OK, "ipc: buf_read after the child")) {
    long long at = check_pattern(host, IPC_LEN, IPC_SEED2);
    report(at < 0, "ipc: the child's pattern arrived bit-exact", "first difference at %lld", at);
  }
out:
  if (buf) expect(ckpt_buf_free(buf), CKPT_OK, "ipc: buf_free");
  if (src) expect(ckpt_host_free(ctx, src), CKPT_OK, "ipc: host_free");
  free(host);
}

/* Copies on every other device, and device mismatches against device 0. */
static void check_multi_gpu(ckpt_ctx *ctx, int32_t ndev, ckpt_stream *s0) {
  const size_t LEN = 16 * MIB;
  void *src = NULL;
  uint8_t *got = malloc(LEN);
  char name[128];
  if (got == NULL || !expect(ckpt_host_alloc(ctx, LEN, &src), CKPT_OK, "multi-gpu: host_alloc"))
    goto out;
  fill_pattern(src, LEN, 7);
  for (int32_t d = 1; d < ndev; d++) {
    ckpt_buf *buf = NULL;
    ckpt_stream *s = NULL;
    ckpt_event *ev = NULL;
    snprintf(name, sizeof name, "device %d: buf_alloc, stream_create, event_create", d);
    int ok = ckpt_buf_alloc(ctx, d, LEN, &buf) == CKPT_OK &&
             ckpt_stream_create(ctx, d, &s) == CKPT_OK && ckpt_event_create(ctx, d, &ev) == CKPT_OK;
    report(ok, name, "a call failed");
    if (ok) {
      snprintf(name, sizeof name, "device %d: h2d + wait", d);
      expect(copy_wait(s, ev, buf, src, LEN), CKPT_OK, name);
      memset(got, 0, LEN);
      snprintf(name, sizeof name, "device %d: buf_read", d);
      expect(ckpt_buf_read(buf, 0, got, LEN), CKPT_OK, name);
      long long at = check_pattern(got, LEN, 7);
      snprintf(name, sizeof name, "device %d: data arrived bit-exact", d);
      report(at < 0, name, "first difference at %lld", at);
      ckpt_range r = {(uint64_t)(uintptr_t)src, 0, 16};
      snprintf(name, sizeof name, "device %d buffer on a device 0 stream -> EINVAL", d);
      expect(ckpt_h2d_async(s0, buf, &r, 1), CKPT_EINVAL, name);
      snprintf(name, sizeof name, "device %d event on a device 0 stream -> EINVAL", d);
      expect(ckpt_event_record(ev, s0), CKPT_EINVAL, name);
    }
    if (ev) ckpt_event_destroy(ev);
    if (s) ckpt_stream_destroy(s);
    if (buf) ckpt_buf_free(buf);
  }
out:
  if (src) expect(ckpt_host_free(ctx, src), CKPT_OK, "multi-gpu: host_free");
  free(got);
}

/* Several threads copying at once, each with its own stream, event and buffer. */
typedef struct {
  ckpt_ctx *ctx;
  int32_t device;
  const uint8_t *src;
  size_t len;
  int ok;
} worker;

static void *worker_main(void *arg) {
  worker *w = arg;
  ckpt_buf *buf = NULL;
  ckpt_stream *s = NULL;
  ckpt_event *ev = NULL;
  uint8_t *got = malloc(w->len);
  w->ok = got && ckpt_buf_alloc(w->ctx, w->device, w->len, &buf) == CKPT_OK &&
          ckpt_stream_create(w->ctx, w->device, &s) == CKPT_OK &&
          ckpt_event_create(w->ctx, w->device, &ev) == CKPT_OK;
  for (int i = 0; w->ok && i < 20; i++) {
    w->ok = copy_wait(s, ev, buf, w->src, w->len) == CKPT_OK &&
            ckpt_buf_read(buf, 0, got, w->len) == CKPT_OK && memcmp(got, w->src, w->len) == 0;
  }
  if (ev) ckpt_event_destroy(ev);
  if (s) ckpt_stream_destroy(s);
  if (buf) ckpt_buf_free(buf);
  free(got);
  return NULL;
}

static void check_threads(ckpt_ctx *ctx, int32_t ndev) {
  enum { NT = 8 };
  const size_t LEN = 8 * MIB;
  void *src = NULL;
  if (!expect(ckpt_host_alloc(ctx, LEN, &src), CKPT_OK, "threads: host_alloc")) return;
  fill_pattern(src, LEN, 9);
  worker w[NT];
  pthread_t t[NT];
  int started[NT] = {0};
  for (int i = 0; i < NT; i++) {
    w[i] = (worker){ctx, (int32_t)(i % ndev), src, LEN, 0};
    started[i] = pthread_create(&t[i], NULL, worker_main, &w[i]) == 0;
  }
  int ok = 1;
  for (int i = 0; i < NT; i++) {
    if (started[i]) pthread_join(t[i], NULL);
    ok = ok && started[i] && w[i].ok;
  }
  report(ok, "8 threads copying at once on their own streams", "a thread failed");
  expect(ckpt_host_free(ctx, src), CKPT_OK, "threads: host_free");
}

/* ---- stream waits and collectives -------------------------------------------------------- */

/* A second stream on device 0 waits for an event recorded after a 256 MiB copy on the first,
 * then overwrites the head of the same buffer: the head must end up with the second copy's
 * bytes (without the wait the small copy lands first). Across devices when there are two. */
static void check_stream_wait_event(ckpt_ctx *ctx, int32_t ndev, ckpt_stream *sa) {
  const size_t LEN = 256 * MIB, HEAD = 4096;
  void *big = NULL, *small = NULL;
  ckpt_buf *x = NULL, *y = NULL;
  ckpt_stream *sb = NULL, *s1 = NULL;
  ckpt_event *e = NULL, *f = NULL, *never = NULL, *e1 = NULL;
  uint8_t *got = malloc(LEN);
  if (got == NULL) {
    report(0, "wait_event: malloc", "out of memory");
    return;
  }
  if (!expect(ckpt_host_alloc(ctx, LEN, &big), CKPT_OK, "wait_event: host_alloc 256 MiB") ||
      !expect(ckpt_host_alloc(ctx, HEAD, &small), CKPT_OK, "wait_event: host_alloc 4 KiB") ||
      !expect(ckpt_buf_alloc(ctx, 0, LEN, &x), CKPT_OK, "wait_event: buf_alloc 256 MiB") ||
      !expect(ckpt_stream_create(ctx, 0, &sb), CKPT_OK, "wait_event: second stream on device 0") ||
      !expect(ckpt_event_create(ctx, 0, &e), CKPT_OK, "wait_event: event_create") ||
      !expect(ckpt_event_create(ctx, 0, &f), CKPT_OK, "wait_event: event_create") ||
      !expect(ckpt_event_create(ctx, 0, &never), CKPT_OK, "wait_event: event_create"))
    goto out;
  fill_pattern(big, LEN, 0x5151u);
  fill_pattern(small, HEAD, 0x5252u);
  expect(copy_wait(sa, e, x, big, LEN), CKPT_OK, "wait_event: warm-up copy");
  ckpt_range rbig = {(uint64_t)(uintptr_t)big, 0, LEN}, rsmall = {(uint64_t)(uintptr_t)small, 0, HEAD};
  expect(ckpt_h2d_async(sa, x, &rbig, 1), CKPT_OK, "wait_event: 256 MiB copy on stream A");
  expect(ckpt_event_record(e, sa), CKPT_OK, "wait_event: record E on A");
  expect(ckpt_stream_wait_event(sb, e), CKPT_OK, "stream_wait_event: B waits for E");
  expect(ckpt_h2d_async(sb, x, &rsmall, 1), CKPT_OK, "wait_event: 4 KiB copy on B over the head");
  expect(ckpt_event_record(f, sb), CKPT_OK, "wait_event: record F on B");
  expect(ckpt_event_wait(f, WAIT_MS), CKPT_OK, "wait_event: wait for F");
  expect(ckpt_event_query(e), CKPT_OK, "stream_wait_event: E is complete once F is");
  if (expect(ckpt_buf_read(x, 0, got, LEN), CKPT_OK, "wait_event: buf_read")) {
    long long at = first_diff(got, small, HEAD);
    if (at < 0) {
      at = first_diff(got + HEAD, (uint8_t *)big + HEAD, LEN - HEAD);
      if (at >= 0) at += HEAD;
    }
    report(at < 0, "stream_wait_event orders B's copy after A's", "first difference at %lld", at);
  }
  expect(ckpt_stream_wait_event(sb, never), CKPT_OK, "stream_wait_event on a never recorded event");
  expect(sync_stream(f, sb), CKPT_OK, "a never recorded event makes no wait");
  expect(ckpt_stream_wait_event(NULL, e), CKPT_EINVAL, "stream_wait_event with no stream -> EINVAL");
  expect(ckpt_stream_wait_event(sb, NULL), CKPT_EINVAL, "stream_wait_event with no event -> EINVAL");

  if (ndev >= 2) {
    if (expect(ckpt_buf_alloc(ctx, 1, LEN, &y), CKPT_OK, "wait_event: buf_alloc on device 1") &&
        expect(ckpt_stream_create(ctx, 1, &s1), CKPT_OK, "wait_event: stream on device 1") &&
        expect(ckpt_event_create(ctx, 1, &e1), CKPT_OK, "wait_event: event on device 1")) {
      expect(copy_wait(s1, e1, y, big, LEN), CKPT_OK, "wait_event: warm-up copy on device 1");
      expect(ckpt_h2d_async(s1, y, &rbig, 1), CKPT_OK, "wait_event: 256 MiB copy on device 1");
      expect(ckpt_event_record(e1, s1), CKPT_OK, "wait_event: record on device 1");
      expect(ckpt_stream_wait_event(sb, e1), CKPT_OK,
             "stream_wait_event: a device 0 stream waits for a device 1 event");
      expect(sync_stream(f, sb), CKPT_OK, "wait_event: wait for the device 0 stream");
      expect(ckpt_event_query(e1), CKPT_OK, "stream_wait_event: the device 1 event completed first");
    }
  }
out:
  if (e1) ckpt_event_destroy(e1);
  if (s1) ckpt_stream_destroy(s1);
  if (y) ckpt_buf_free(y);
  if (never) ckpt_event_destroy(never);
  if (f) ckpt_event_destroy(f);
  if (e) ckpt_event_destroy(e);
  if (sb) ckpt_stream_destroy(sb);
  if (x) ckpt_buf_free(x);
  if (small) ckpt_host_free(ctx, small);
  if (big) ckpt_host_free(ctx, big);
  free(got);
}

#define MAX_RANKS 8

/* Records ev[d] on s[d] for every device and waits for all. */
static int sync_all(ckpt_stream **s, ckpt_event **ev, int32_t n) {
  for (int32_t d = 0; d < n; d++) {
    int st = ckpt_event_record(ev[d], s[d]);
    if (st != CKPT_OK) return st;
  }
  for (int32_t d = 0; d < n; d++) {
    int st = ckpt_event_wait(ev[d], WAIT_MS);
    if (st != CKPT_OK) return st;
  }
  return CKPT_OK;
}

/* Broadcasts of 256 MiB from roots 0 and 1 (bit-exact everywhere), a subrange, the 1 GiB
 * broadcast bandwidth, and the argument errors. */
static void check_broadcasts(ckpt_ctx *ctx, ckpt_comm *comm, int32_t n, ckpt_stream **s,
                             ckpt_event **ev) {
  const size_t LEN = 256 * MIB;
  const uint64_t OFF = MIB + 3, SUB = 5 * MIB + 1;
  ckpt_buf *b[MAX_RANKS] = {0};
  void *src_root = NULL, *src_other = NULL;
  uint8_t *got = malloc(LEN), *want = malloc(LEN);
  char name[160];
  if (got == NULL || want == NULL) {
    report(0, "broadcast: malloc", "out of memory");
    goto out;
  }
  if (!expect(ckpt_host_alloc(ctx, LEN, &src_root), CKPT_OK, "broadcast: host_alloc 256 MiB") ||
      !expect(ckpt_host_alloc(ctx, LEN, &src_other), CKPT_OK, "broadcast: host_alloc 256 MiB"))
    goto out;
  for (int32_t d = 0; d < n; d++) {
    snprintf(name, sizeof name, "broadcast: buf_alloc 256 MiB on device %d", d);
    if (!expect(ckpt_buf_alloc(ctx, d, LEN, &b[d]), CKPT_OK, name)) goto out;
  }
  for (int32_t root = 0; root < 2; root++) {
    uint64_t seed = 0x6000u + (uint64_t)root;
    fill_pattern(src_root, LEN, seed);
    fill_pattern(src_other, LEN, 0x7000u + (uint64_t)root);
    int ok = 1;
    for (int32_t d = 0; d < n; d++) {  /* the root's copy is on its stream, right before */
      ckpt_range r = {(uint64_t)(uintptr_t)(d == root ? src_root : src_other), 0, LEN};
      ok = ok && ckpt_h2d_async(s[d], b[d], &r, 1) == CKPT_OK;
    }
    report(ok, "broadcast: fill the buffers", "h2d_async failed");
    snprintf(name, sizeof name, "broadcast 256 MiB from root %d", root);
    expect(ckpt_broadcast(comm, root, b, s, 0, LEN), CKPT_OK, name);
    snprintf(name, sizeof name, "broadcast from root %d: events on every stream complete", root);
    expect(sync_all(s, ev, n), CKPT_OK, name);
    for (int32_t d = 0; d < n; d++) {
      memset(got, 0, LEN);
      long long at = ckpt_buf_read(b[d], 0, got, LEN) == CKPT_OK ? check_pattern(got, LEN, seed) : 0;
      snprintf(name, sizeof name, "broadcast from root %d: device %d bit-exact", root, d);
      report(at < 0, name, "first difference at %lld", at);
    }
  }
  /* Every buffer now holds pattern 0x6001; root 0 gets 0x6100 and sends a subrange. */
  fill_pattern(src_root, LEN, 0x6100u);
  fill_pattern(want, LEN, 0x6001u);
  memcpy(want + OFF, (uint8_t *)src_root + OFF, SUB);
  {
    ckpt_range r = {(uint64_t)(uintptr_t)src_root, 0, LEN};
    expect(ckpt_h2d_async(s[0], b[0], &r, 1), CKPT_OK, "broadcast: refill the root");
    expect(ckpt_broadcast(comm, 0, b, s, OFF, SUB), CKPT_OK, "broadcast of a subrange");
    expect(sync_all(s, ev, n), CKPT_OK, "broadcast of a subrange: wait");
    for (int32_t d = 1; d < n; d++) {
      long long at = ckpt_buf_read(b[d], 0, got, LEN) == CKPT_OK ? first_diff(got, want, LEN) : 0;
      snprintf(name, sizeof name, "subrange broadcast: device %d has it, and nothing outside it", d);
      report(at < 0, name, "first difference at %lld", at);
    }
  }

  /* Argument errors; none of them queues anything. */
  {
    ckpt_buf *swapped_b[MAX_RANKS];
    ckpt_stream *swapped_s[MAX_RANKS];
    for (int32_t d = 0; d < n; d++) swapped_b[d] = b[(d + 1) % n], swapped_s[d] = s[(d + 1) % n];
    expect(ckpt_broadcast(comm, 0, swapped_b, s, 0, 16), CKPT_EINVAL,
           "broadcast with a buffer on the wrong device -> EINVAL");
    expect(ckpt_broadcast(comm, 0, b, swapped_s, 0, 16), CKPT_EINVAL,
           "broadcast with a stream on the wrong device -> EINVAL");
    expect(ckpt_broadcast(comm, 0, b, s, LEN - 8, 9), CKPT_ERANGE, "broadcast past the end -> ERANGE");
    expect(ckpt_broadcast(comm, 0, b, s, UINT64_MAX - 3, 8), CKPT_ERANGE,
           "broadcast with a wrapping offset -> ERANGE");
    expect(ckpt_broadcast(comm, n, b, s, 0, 16), CKPT_EINVAL, "broadcast from root nranks -> EINVAL");
    expect(ckpt_broadcast(comm, -1, b, s, 0, 16), CKPT_EINVAL, "broadcast from root -1 -> EINVAL");
    expect(ckpt_broadcast(comm, 0, NULL, s, 0, 16), CKPT_EINVAL, "broadcast with no buffers -> EINVAL");
    expect(ckpt_broadcast(comm, 1, b, s, LEN, 0), CKPT_OK, "broadcast of 0 bytes at the end");
  }

  /* Bandwidth: 1 GiB from device 0 to all, median of 5 after a warm-up. */
  for (int32_t d = 0; d < n; d++) {
    ckpt_buf_free(b[d]);
    b[d] = NULL;
  }
  {
    int ok = 1;
    for (int32_t d = 0; d < n && ok; d++) ok = ckpt_buf_alloc(ctx, d, GIB, &b[d]) == CKPT_OK;
    report(ok, "broadcast: buf_alloc 1 GiB on every device", "%s", last_error(ctx));
    if (!ok) goto out;
    double t[5];
    ok = ckpt_broadcast(comm, 0, b, s, 0, GIB) == CKPT_OK && sync_all(s, ev, n) == CKPT_OK;
    for (int i = 0; i < 5 && ok; i++) {
      double t0 = now_s();
      ok = ckpt_broadcast(comm, 0, b, s, 0, GIB) == CKPT_OK && sync_all(s, ev, n) == CKPT_OK;
      t[i] = now_s() - t0;
    }
    report(ok, "broadcast 1 GiB from device 0, 6 times", "%s", last_error(ctx));
    if (ok) {
      qsort(t, 5, sizeof *t, cmp_double);
      printf("# broadcast of 1 GiB from device 0 to %d devices: %.1f GB/s (median of 5: %.2f ms; "
             "best %.1f GB/s)\n",
             n, GIB / 1e9 / t[2], t[2] * 1e3, GIB / 1e9 / t[0]);
    }
  }
out:
  for (int32_t d = 0; d < n; d++)
    if (b[d]) ckpt_buf_free(b[d]);
  if (src_root) ckpt_host_free(ctx, src_root);
  if (src_other) ckpt_host_free(ctx, src_other);
  free(got);
  free(want);
}

/* A communicator over every local device (one is enough: nranks = ndev = 1). */
static void check_collectives(ckpt_ctx *ctx, int32_t ndev) {
  uint8_t id[CKPT_COMM_ID_BYTES], id2[CKPT_COMM_ID_BYTES], zero[CKPT_COMM_ID_BYTES];
  memset(zero, 0, sizeof zero);
  int32_t v = 0;
  if (ckpt_nccl_version(ctx, &v) != CKPT_OK) {
    printf("# NCCL unavailable, collectives not checked: %s\n", last_error(ctx));
    expect(ckpt_comm_id_new(ctx, id), CKPT_ENCCL, "comm_id_new without NCCL -> ENCCL");
    return;
  }
  int32_t n = ndev < MAX_RANKS ? ndev : MAX_RANKS;
  int32_t devs[MAX_RANKS];
  ckpt_stream *s[MAX_RANKS] = {0};
  ckpt_event *ev[MAX_RANKS] = {0};
  ckpt_comm *comm = NULL, *other = NULL;
  char name[160];
  memset(id, 0, sizeof id);
  if (!expect(ckpt_comm_id_new(ctx, id), CKPT_OK, "comm_id_new")) return;
  report(memcmp(id, zero, sizeof id) != 0, "comm_id_new fills the id", "all zero");
  expect(ckpt_comm_id_new(ctx, NULL), CKPT_EINVAL, "comm_id_new with no id -> EINVAL");
  for (int32_t d = 0; d < n; d++) {
    devs[d] = d;
    snprintf(name, sizeof name, "collectives: stream and event on device %d", d);
    int ok = ckpt_stream_create(ctx, d, &s[d]) == CKPT_OK && ckpt_event_create(ctx, d, &ev[d]) == CKPT_OK;
    report(ok, name, "%s", last_error(ctx));
    if (!ok) goto out;
  }

  /* Argument errors, before anything would block waiting for ranks. */
  const int32_t dup[2] = {0, 0}, missing[1] = {ndev};
  ckpt_comm *none = NULL;
  expect(ckpt_comm_init(ctx, id, 1, 0, 0, devs, -1, &none), CKPT_EINVAL, "comm_init with ndev 0 -> EINVAL");
  expect(ckpt_comm_init(ctx, id, 2, 0, 2, dup, -1, &none), CKPT_EINVAL, "comm_init with a device twice -> EINVAL");
  expect(ckpt_comm_init(ctx, id, n, 1, n, devs, -1, &none), CKPT_EINVAL,
         "comm_init with first_rank + ndev > nranks -> EINVAL");
  expect(ckpt_comm_init(ctx, id, 1, 0, 1, missing, -1, &none), CKPT_ENODEV,
         "comm_init on a missing device -> ENODEV");
  expect(ckpt_comm_init(ctx, NULL, n, 0, n, devs, -1, &none), CKPT_EINVAL, "comm_init with no id -> EINVAL");
  report(none == NULL, "failed comm_init leaves *out NULL", "%p", (void *)none);

  /* A rank that never joins: the bounded wait ends, nothing is left behind. */
  uint8_t lonely[CKPT_COMM_ID_BYTES];
  double t0 = now_s();
  if (expect(ckpt_comm_id_new(ctx, lonely), CKPT_OK, "comm_id_new for a communicator nobody completes")) {
    snprintf(name, sizeof name, "comm_init of %d of %d ranks with a 500 ms limit -> ETIMEDOUT", n, n + 1);
    expect(ckpt_comm_init(ctx, lonely, n + 1, 0, n, devs, 500, &none), CKPT_ETIMEDOUT, name);
    double waited = now_s() - t0;
    report(waited >= 0.45 && waited < 5 && none == NULL, "the wait for the missing rank is bounded",
           "%.2f s, comm %p", waited, (void *)none);
  }

  /* The communicator of the tests below is bounded (non-blocking in NCCL); `other` is not. */
  t0 = now_s();
  snprintf(name, sizeof name, "comm_init over all %d local devices, with a 10 s limit", n);
  if (!expect(ckpt_comm_init(ctx, id, n, 0, n, devs, 10000, &comm), CKPT_OK, name)) goto out;
  printf("# comm_init of %d ranks: %.0f ms\n", n, (now_s() - t0) * 1e3);

  if (n == 1) {
    void *src = NULL;
    ckpt_buf *b = NULL;
    if (expect(ckpt_host_alloc(ctx, 4096, &src), CKPT_OK, "collectives: host_alloc") &&
        expect(ckpt_buf_alloc(ctx, 0, 4096, &b), CKPT_OK, "collectives: buf_alloc")) {
      fill_pattern(src, 4096, 0x6666u);
      ckpt_range r = {(uint64_t)(uintptr_t)src, 0, 4096};
      expect(ckpt_h2d_async(s[0], b, &r, 1), CKPT_OK, "collectives: fill the buffer");
      expect(ckpt_broadcast(comm, 0, &b, s, 0, 4096), CKPT_OK, "broadcast over one rank (a no-op)");
      expect(sync_all(s, ev, 1), CKPT_OK, "broadcast over one rank: wait");
      uint8_t got[4096];
      report(ckpt_buf_read(b, 0, got, sizeof got) == CKPT_OK && check_pattern(got, sizeof got, 0x6666u) < 0,
             "broadcast over one rank leaves the bytes", "they changed");
      expect(ckpt_broadcast(comm, 1, &b, s, 0, 4096), CKPT_EINVAL, "broadcast from root 1 of 1 -> EINVAL");
      expect(ckpt_broadcast(comm, 0, &b, s, 1, 4096), CKPT_ERANGE, "broadcast past the end -> ERANGE");
    }
    if (b) ckpt_buf_free(b);
    if (src) ckpt_host_free(ctx, src);
  } else {
    check_broadcasts(ctx, comm, n, s, ev);
  }
  expect(ckpt_comm_destroy(comm), CKPT_OK, "comm_destroy");

  /* A second communicator, aborted. */
  if (expect(ckpt_comm_id_new(ctx, id2), CKPT_OK, "comm_id_new again")) {
    report(memcmp(id, id2, sizeof id) != 0, "a new id differs", "the same id twice");
    if (expect(ckpt_comm_init(ctx, id2, n, 0, n, devs, -1, &other), CKPT_OK, "comm_init of a second communicator"))
      expect(ckpt_comm_abort(other), CKPT_OK, "comm_abort");
  }
out:
  for (int32_t d = 0; d < n; d++) {
    if (ev[d]) ckpt_event_destroy(ev[d]);
    if (s[d]) ckpt_stream_destroy(s[d]);
  }
}

/* ---- files and hashing ------------------------------------------------------------------ */

#define FILE_LEN (256 * MIB)
#define FILE_SEED 0x3333u

/* Maps a 256 MiB file (in /dev/shm if present), pins it read-only, copies it to the GPU and
 * reads it back; ckpt_file_read of the same file. */
static void check_file_map(ckpt_ctx *ctx, ckpt_stream *s, ckpt_event *ev) {
  char path[64];
  snprintf(path, sizeof path, "%s/ckpt-gpu-file-XXXXXX",
           access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
  uint8_t *host = malloc(FILE_LEN), *mapped = NULL;
  ckpt_buf *buf = NULL;
  int registered = 0, named = 0;
  uint64_t len = 0;
  if (host == NULL) {
    report(0, "files: malloc", "out of memory");
    return;
  }
  int fd = mkstemp(path);
  if (fd < 0) {
    report(0, "files: mkstemp", "%s: %s", path, strerror(errno));
    goto out;
  }
  named = 1;
  void *rw = ftruncate(fd, (off_t)FILE_LEN) == 0
                 ? mmap(NULL, FILE_LEN, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
                 : MAP_FAILED;
  close(fd);
  if (rw == MAP_FAILED) {
    report(0, "files: write the 256 MiB file", "%s", strerror(errno));
    goto out;
  }
  fill_pattern(rw, FILE_LEN, FILE_SEED);
  munmap(rw, FILE_LEN);

  double t0 = now_s();
  if (!expect(ckpt_file_map(ctx, path, (void **)&mapped, &len), CKPT_OK, "file_map 256 MiB"))
    goto out;
  double t_map = now_s() - t0;
  report(len == FILE_LEN, "file_map length", "len %llu", (unsigned long long)len);
  t0 = now_s();
  registered = expect(ckpt_host_register(ctx, mapped, len, CKPT_REGISTER_READONLY), CKPT_OK,
                      "host_register of the mapped file, READONLY");
  double t_reg = now_s() - t0;
  if (!registered) goto out;
  expect(ckpt_file_unmap(ctx, mapped, len), CKPT_EBUSY, "file_unmap while registered -> EBUSY");
  if (!expect(ckpt_buf_alloc(ctx, 0, FILE_LEN, &buf), CKPT_OK, "files: buf_alloc 256 MiB")) goto out;
  expect(copy_wait(s, ev, buf, mapped, FILE_LEN), CKPT_OK, "files: warm-up copy of the mapping");
  t0 = now_s();
  expect(copy_wait(s, ev, buf, mapped, FILE_LEN), CKPT_OK, "h2d of the mapped file + wait");
  double t_copy = now_s() - t0;
  memset(host, 0, FILE_LEN);
  if (expect(ckpt_buf_read(buf, 0, host, FILE_LEN), CKPT_OK, "files: buf_read 256 MiB")) {
    long long at = check_pattern(host, FILE_LEN, FILE_SEED);
    report(at < 0, "mapped file arrived on the GPU bit-exact", "first difference at %lld", at);
  }
  printf("# %s: file_map 256 MiB %.1f ms, host_register %.1f ms, copy %.2f GB/s\n", path,
         t_map * 1e3, t_reg * 1e3, FILE_LEN / 1e9 / t_copy);

  memset(host, 0, FILE_LEN);
  t0 = now_s();
  if (expect(ckpt_file_read(ctx, path, 0, FILE_LEN, host, 8), CKPT_OK, "file_read 256 MiB, 8 threads")) {
    double t_read = now_s() - t0;
    long long at = check_pattern(host, FILE_LEN, FILE_SEED);
    report(at < 0, "file_read bytes are the file's", "first difference at %lld", at);
    printf("# file_read 256 MiB, 8 threads: %.2f GB/s\n", FILE_LEN / 1e9 / t_read);
  }
  expect(ckpt_file_read(ctx, path, 1, FILE_LEN, host, 8), CKPT_ESYS, "file_read past the end -> ESYS");
  report(strstr(last_error(ctx), path) != NULL, "file_read past the end names the path", "'%s'",
         last_error(ctx));
  void *none = NULL;
  uint64_t none_len = 0;
  expect(ckpt_file_map(ctx, "/nonexistent/ckpt-gpu-file", &none, &none_len), CKPT_ESYS,
         "file_map of a missing path -> ESYS");
out:
  if (buf) expect(ckpt_buf_free(buf), CKPT_OK, "files: buf_free");
  if (registered) expect(ckpt_host_unregister(ctx, mapped), CKPT_OK, "files: host_unregister");
  if (mapped && len) expect(ckpt_file_unmap(ctx, mapped, len), CKPT_OK, "file_unmap");
  if (named) unlink(path);
  free(host);
}

/* XXH64 vectors, and a 1 GiB pinned buffer hashed in 4 MiB ranges with 1 and 16 threads. */
static void check_hash(ckpt_ctx *ctx) {
  static const struct {
    const char *s;
    uint64_t h;
  } v[] = {{"", 0xEF46DB3751D8E999ull}, {"a", 0xD24EC4F1A98C6E5Bull}, {"abc", 0x44BC2CF5AD770999ull}};
  for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
    uint64_t r[2] = {(uint64_t)(uintptr_t)v[i].s, strlen(v[i].s)}, h = 0;
    char name[64];
    uint64_t chunk = 0xEF46DB3751D8E999ull; /* an empty range has no chunk: XXH64 of nothing */
    snprintf(name, sizeof name, "XXH64 of \"%s\"", v[i].s);
    report(ckpt_hash(ctx, r, 1, &h, &chunk, 1, NULL) == CKPT_OK && chunk == v[i].h, name, "got %016llx want %016llx",
           (unsigned long long)chunk, (unsigned long long)v[i].h);
  }
  expect(ckpt_hash(ctx, NULL, 0, NULL, NULL, 16, NULL), CKPT_OK, "hash of 0 ranges");
  expect(ckpt_hash(ctx, NULL, 1, NULL, NULL, 16, NULL), CKPT_EINVAL, "hash with NULL arrays -> EINVAL");

  enum { NR = 256 };
  const size_t PIECE = GIB / NR;
  void *src = NULL;
  uint64_t r[2 * NR], h1[NR], h16[NR];
  if (!expect(ckpt_host_alloc(ctx, GIB, &src), CKPT_OK, "hash: host_alloc 1 GiB")) return;
  fill_pattern(src, GIB, 0x4444u);
  for (size_t i = 0; i < NR; i++) {
    r[2 * i] = (uint64_t)(uintptr_t)src + i * PIECE;
    r[2 * i + 1] = PIECE;
  }
  double t0 = now_s();
  expect(ckpt_hash(ctx, r, NR, h1, NULL, 1, NULL), CKPT_OK, "hash of 1 GiB, 1 thread");
  double t1 = now_s() - t0;
  t0 = now_s();
  expect(ckpt_hash(ctx, r, NR, h16, NULL, 16, NULL), CKPT_OK, "hash of 1 GiB, 16 threads");
  double t16 = now_s() - t0;
  report(memcmp(h1, h16, sizeof h1) == 0, "hash with 1 and 16 threads agree", "they differ");
  printf("# hash of 1 GiB pinned (%d ranges of %zu MiB): 1 thread %.2f GB/s, 16 threads %.2f GB/s\n",
         NR, PIECE / (size_t)MIB, GIB / 1e9 / t1, GIB / 1e9 / t16);
  expect(ckpt_host_free(ctx, src), CKPT_OK, "hash: host_free 1 GiB");
}

/* ckpt_buf_hash on the GPU agrees with ckpt_hash of the same bytes on the CPU, chunk by chunk,
 * at every alignment and tail length; and its speed over 1 GiB. */
static void check_buf_hash(ckpt_ctx *ctx, ckpt_stream *s, ckpt_event *ev) {
  enum { NR = 12 };
  void *host = NULL;
  ckpt_buf *buf = NULL;
  if (!expect(ckpt_host_alloc(ctx, GIB, &host), CKPT_OK, "buf_hash: host_alloc 1 GiB")) return;
  fill_pattern(host, GIB, 0x5151u);
  if (!expect(ckpt_buf_alloc(ctx, 0, GIB, &buf), CKPT_OK, "buf_hash: buf_alloc 1 GiB")) goto out;
  if (!expect(copy_wait(s, ev, buf, host, GIB), CKPT_OK, "buf_hash: h2d 1 GiB")) goto out;
  /* (offset, len): aligned and not, empty, tails of every kind, several chunks, the whole. */
  const uint64_t off[NR] = {0, 1, 3, 8, 16, 4096, 5, 0, 12, 7, GIB - 31, 0};
  const uint64_t len[NR] = {0, 1, 31, 33, 100, MIB, MIB + 7, 3 * MIB + 129, 64 * MIB + 3, 1000, 31, GIB};
  uint64_t dr[3 * NR], hr[2 * NR], dh[NR], hh[NR];
  size_t nchunks = 0;
  for (size_t i = 0; i < NR; i++) {
    dr[3 * i] = 0, dr[3 * i + 1] = off[i], dr[3 * i + 2] = len[i];
    hr[2 * i] = (uint64_t)(uintptr_t)host + off[i], hr[2 * i + 1] = len[i];
    nchunks += (size_t)((len[i] + CKPT_HASH_CHUNK - 1) / CKPT_HASH_CHUNK);
  }
  uint64_t *dc = calloc(nchunks, 8), *hc = calloc(nchunks, 8);
  if (dc && hc) {
    expect(ckpt_buf_hash(&buf, 1, dr, NR, dh, dc, 0), CKPT_OK, "buf_hash of 12 ranges");
    expect(ckpt_hash(ctx, hr, NR, hh, hc, 16, NULL), CKPT_OK, "hash of the same 12 ranges on the CPU");
    report(memcmp(dh, hh, sizeof dh) == 0, "buf_hash agrees with ckpt_hash for every range", "they differ");
    report(memcmp(dc, hc, nchunks * 8) == 0, "buf_hash's chunk hashes agree with ckpt_hash's", "they differ");
  }
  free(dc), free(hc);
  uint64_t bad[6] = {0, 0, 1, 0, GIB - 10, 11};
  expect(ckpt_buf_hash(&buf, 1, bad, 2, dh, NULL, 0), CKPT_ERANGE, "buf_hash of a range past the buffer -> ERANGE");
  bad[3] = 1;
  expect(ckpt_buf_hash(&buf, 1, bad, 2, dh, NULL, 0), CKPT_EINVAL, "buf_hash naming buffer 1 of 1 -> EINVAL");
  double best = 1e9;
  for (int k = 0; k < 3; k++) {
    double t0 = now_s();
    expect(ckpt_buf_hash(&buf, 1, dr + 3 * (NR - 1), 1, dh, NULL, 0), CKPT_OK, "buf_hash of 1 GiB");
    double t = now_s() - t0;
    if (t < best) best = t;
  }
  printf("# buf_hash of 1 GiB on the GPU: %.2f ms (%.0f GB/s)\n", best * 1e3, GIB / 1e9 / best);
  uint64_t bucket[3] = {0, 0, 256 * MIB}; /* what an update verifies at a time */
  best = 1e9;
  for (int k = 0; k < 5; k++) {
    double t0 = now_s();
    expect(ckpt_buf_hash(&buf, 1, bucket, 1, dh, NULL, 0), CKPT_OK, "buf_hash of 256 MiB");
    double t = now_s() - t0;
    if (t < best) best = t;
  }
  printf("# buf_hash of 256 MiB (a bucket) on the GPU: %.2f ms (%.0f GB/s)\n", best * 1e3, 256 * MIB / 1e9 / best);
out:
  if (buf) expect(ckpt_buf_free(buf), CKPT_OK, "buf_hash: buf_free");
  expect(ckpt_host_free(ctx, host), CKPT_OK, "buf_hash: host_free");
}

static void run_checks(void) {
  check_errors();
  ckpt_ctx_options o = options();
  ckpt_ctx *ctx = NULL;
  if (!expect(ckpt_ctx_create(&o, &ctx), CKPT_OK, "ctx_create")) return;
  g_ctx = ctx;
  int32_t ndev = 0;
  expect(ckpt_device_count(ctx, &ndev), CKPT_OK, "device_count");
  report(ndev >= 1, "device_count >= 1", "%d devices", ndev);
  if (ndev < 1) return;
  check_devices(ctx, ndev);
  check_host_alloc(ctx);

  ckpt_stream *s = NULL;
  ckpt_event *ev = NULL;
  if (!expect(ckpt_stream_create(ctx, 0, &s), CKPT_OK, "stream_create on device 0") ||
      !expect(ckpt_event_create(ctx, 0, &ev), CKPT_OK, "event_create on device 0"))
    return;
  ckpt_stream *no_stream = NULL;
  expect(ckpt_stream_create(ctx, ndev, &no_stream), CKPT_ENODEV,
         "stream_create on a missing device -> ENODEV");
  ckpt_buf *none = NULL;
  expect(ckpt_buf_alloc(ctx, ndev, 4096, &none), CKPT_ENODEV, "buf_alloc on a missing device -> ENODEV");

  check_copies(ctx, s, ev);
  check_events(ctx, s, ev);
  check_stream_wait_event(ctx, ndev, s);
  check_nccl(ctx);

  ckpt_buf *live = NULL;
  if (expect(ckpt_buf_alloc(ctx, 0, 4096, &live), CKPT_OK, "buf_alloc 4 KiB")) {
    expect(ckpt_ctx_destroy(ctx), CKPT_EBUSY, "ctx_destroy with live handles -> EBUSY");
    expect(ckpt_buf_free(live), CKPT_OK, "buf_free 4 KiB");
  }
  check_ipc(ctx, ndev, s, ev);
  if (ndev >= 2) check_multi_gpu(ctx, ndev, s);
  check_collectives(ctx, ndev);
  check_threads(ctx, ndev);
  check_file_map(ctx, s, ev);
  check_hash(ctx);
  check_buf_hash(ctx, s, ev);

  expect(ckpt_event_destroy(ev), CKPT_OK, "event_destroy on device 0");
  expect(ckpt_stream_destroy(s), CKPT_OK, "stream_destroy on device 0");
  g_ctx = NULL;
  expect(ckpt_ctx_destroy(ctx), CKPT_OK, "ctx_destroy");
}

/* ---- bandwidth --------------------------------------------------------------------------- */

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

#define REPS 10

/* One range of `len` bytes to each device in `devs` at once; returns the seconds it took. */
static double timed_copy(ckpt_stream **s, ckpt_event **ev, ckpt_buf **buf, const int32_t *devs,
                         int n, void *src, size_t len, int *err) {
  ckpt_range r = {(uint64_t)(uintptr_t)src, 0, len};
  double t0 = now_s();
  for (int i = 0; i < n; i++) {
    int d = devs[i];
    if (ckpt_h2d_async(s[d], buf[d], &r, 1) != CKPT_OK || ckpt_event_record(ev[d], s[d]) != CKPT_OK)
      *err = 1;
  }
  for (int i = 0; i < n; i++)
    if (ckpt_event_wait(ev[devs[i]], WAIT_MS) != CKPT_OK) *err = 1;
  return now_s() - t0;
}

static int bandwidth(double gib) {
  size_t len = (size_t)(gib * (double)GIB);
  if (len == 0) {
    fprintf(stderr, "bandwidth: size must be > 0 GiB\n");
    return 2;
  }
  ckpt_ctx_options o = options();
  ckpt_ctx *ctx = NULL;
  if (ckpt_ctx_create(&o, &ctx) != CKPT_OK) return 1;
  int32_t ndev = 0;
  void *src = NULL;
  int err = 0;
  ckpt_buf *buf[64] = {0};
  ckpt_stream *s[64] = {0};
  ckpt_event *ev[64] = {0};
  int32_t devs[64];
  if (ckpt_device_count(ctx, &ndev) != CKPT_OK || ndev < 1) {
    fprintf(stderr, "bandwidth: no device: %s\n", last_error(ctx));
    err = 1;
    goto out;
  }
  if (ndev > 64) ndev = 64;
  if (ckpt_host_alloc(ctx, len, &src) != CKPT_OK) {
    fprintf(stderr, "bandwidth: host_alloc: %s\n", last_error(ctx));
    err = 1;
    goto out;
  }
  memset(src, 0x5a, len);
  for (int32_t d = 0; d < ndev; d++) {
    devs[d] = d;
    if (ckpt_buf_alloc(ctx, d, len, &buf[d]) != CKPT_OK ||
        ckpt_stream_create(ctx, d, &s[d]) != CKPT_OK || ckpt_event_create(ctx, d, &ev[d]) != CKPT_OK) {
      fprintf(stderr, "bandwidth: device %d: %s\n", d, last_error(ctx));
      err = 1;
      goto out;
    }
  }
  printf("host-to-device, one range of %.2f GiB from ckpt_host_alloc memory, median of %d\n", gib,
         REPS);
  double t[REPS];
  for (int32_t d = 0; d < ndev && !err; d++) {
    ckpt_device_info info;
    memset(&info, 0, sizeof info);
    info.size = sizeof info;
    ckpt_device_info_get(ctx, d, &info);
    timed_copy(s, ev, buf, &devs[d], 1, src, len, &err); /* warm-up */
    for (int i = 0; i < REPS; i++) t[i] = timed_copy(s, ev, buf, &devs[d], 1, src, len, &err);
    qsort(t, REPS, sizeof *t, cmp_double);
    printf("device %d (%s, numa %d): %.2f GB/s (min %.2f, max %.2f)\n", d, info.name,
           info.numa_node, len / 1e9 / ((t[REPS / 2 - 1] + t[REPS / 2]) / 2), len / 1e9 / t[REPS - 1],
           len / 1e9 / t[0]);
  }
  if (ndev >= 2 && !err) {
    timed_copy(s, ev, buf, devs, ndev, src, len, &err);
    for (int i = 0; i < REPS; i++) t[i] = timed_copy(s, ev, buf, devs, ndev, src, len, &err);
    qsort(t, REPS, sizeof *t, cmp_double);
    double agg = (double)len * ndev / 1e9 / ((t[REPS / 2 - 1] + t[REPS / 2]) / 2);
    printf("all %d devices at once (same source): %.2f GB/s in total, %.2f GB/s per device\n",
           ndev, agg, agg / ndev);
  }
  if (err) fprintf(stderr, "bandwidth: a copy failed: %s\n", last_error(ctx));
out:
  for (int32_t d = 0; d < ndev; d++) {
    if (ev[d]) ckpt_event_destroy(ev[d]);
    if (s[d]) ckpt_stream_destroy(s[d]);
    if (buf[d]) ckpt_buf_free(buf[d]);
  }
  if (src) ckpt_host_free(ctx, src);
  if (ckpt_ctx_destroy(ctx) != CKPT_OK) err = 1;
  return err;
}

int main(int argc, char **argv) {
  if (argc >= 3 && strcmp(argv[1], "--child") == 0) return child_main(argv[2]);
  if (argc >= 2 && strcmp(argv[1], "--bandwidth") == 0)
    return bandwidth(argc >= 3 ? atof(argv[2]) : 4.0);
  if (argc >= 2) {
    fprintf(stderr, "usage: %s [--bandwidth [GiB]]\n", argv[0]);
    return 2;
  }
  run_checks();
  printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed ? 1 : 0;
}
