/* C tests of libckpt-host, run under AddressSanitizer and UBSan by `build.sh test`. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ckpt.h"
#include "harness.h"

/* ---- helpers of this file ----------------------------------------------------------- */

static void fill(uint8_t *p, size_t len, uint32_t seed) {
  uint32_t x = seed * 2654435761u + 1;
  for (size_t i = 0; i < len; i++) {
    x ^= x << 13, x ^= x >> 17, x ^= x << 5;
    p[i] = (uint8_t)x;
  }
}

/* ---- tests -------------------------------------------------------------------------- */

static int test_errors(void) {
  static const struct { int st; const char *name; } all[] = {
#define X(name, value, msg) {value, "CKPT_" #name},
      CKPT_STATUS_MAP(X)
#undef X
  };
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
    EXPECT(strcmp(ckpt_err_name(all[i].st), all[i].name) == 0);
    EXPECT(strlen(ckpt_strerror(all[i].st)) > 0);
    EXPECT(strcmp(ckpt_strerror(all[i].st), "unknown status") != 0);
  }
  EXPECT(strcmp(ckpt_err_name(CKPT_ETIMEDOUT), "CKPT_ETIMEDOUT") == 0);
  EXPECT(strcmp(ckpt_strerror(CKPT_OK), "success") == 0);
  EXPECT(strcmp(ckpt_err_name(-999), "CKPT_UNKNOWN") == 0);
  EXPECT(strcmp(ckpt_err_name(7), "CKPT_UNKNOWN") == 0);
  EXPECT(strcmp(ckpt_strerror(-999), "unknown status") == 0);
  EXPECT(strcmp(ckpt_backend(), "host") == 0);
  EXPECT(ckpt_abi_version() == CKPT_ABI_VERSION);
  return 1;
}

static int test_ctx_create(void) {
  ckpt_ctx_options o = {.size = sizeof o + 8, .abi_version = CKPT_ABI_VERSION};
  ckpt_ctx *ctx = (ckpt_ctx *)&o;  /* must be overwritten with NULL */
  EXPECT_ST(NULL, ckpt_ctx_create(&o, &ctx), CKPT_EABI);
  EXPECT(ctx == NULL);
  o.size = sizeof o;
  o.abi_version = CKPT_ABI_VERSION + 1;
  EXPECT_ST(NULL, ckpt_ctx_create(&o, &ctx), CKPT_EABI);
  EXPECT(ctx == NULL);
  EXPECT_ST(NULL, ckpt_ctx_create(NULL, &ctx), CKPT_EINVAL);
  EXPECT_ST(NULL, ckpt_ctx_destroy(NULL), CKPT_EINVAL);
  ctx = new_ctx(0);
  EXPECT(ctx != NULL);
  char buf[64] = "x";
  EXPECT(ckpt_last_error(ctx, buf, sizeof buf) == CKPT_OK && buf[0] == '\0');
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* A caller built against an older, shorter ckpt_ctx_options must be refused before its
 * options are read past their end, as a longer one is. */
static int test_ctx_options_too_small(void) {
  ckpt_ctx_options o = {.size = sizeof o - 8, .abi_version = CKPT_ABI_VERSION};
  ckpt_ctx *ctx = (ckpt_ctx *)&o;  /* must be overwritten with NULL */
  EXPECT_ST(NULL, ckpt_ctx_create(&o, &ctx), CKPT_EABI);
  EXPECT(ctx == NULL);
  o.size = 0;
  EXPECT_ST(NULL, ckpt_ctx_create(&o, &ctx), CKPT_EABI);
  EXPECT(ctx == NULL);
  return 1;
}

/* A source range whose end wraps past the top of the address space (src + len overflows)
 * lands below a pinned region's end; it must be refused, not copied from. */
static int test_range_wraps(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  void *a;
  ckpt_buf *b;
  ckpt_stream *s;
  EXPECT_OK(ctx, ckpt_host_alloc(ctx, 4096, &a));
  EXPECT_OK(ctx, ckpt_buf_alloc(ctx, 0, 4096, &b));
  EXPECT_OK(ctx, ckpt_stream_create(ctx, 0, &s));
  /* src + len is 89: inside the allocation's end, were the sum not checked for overflow. */
  ckpt_range wrap = {UINT64_MAX - 10, 0, 100};
  EXPECT_ST(ctx, ckpt_h2d_async(s, b, &wrap, 1), CKPT_ERANGE);
  EXPECT_DETAIL(ctx, "range 0");
  EXPECT_DETAIL(ctx, "host memory not inside pinned");
  EXPECT_OK(ctx, ckpt_stream_destroy(s));
  EXPECT_OK(ctx, ckpt_buf_free(b));
  EXPECT_OK(ctx, ckpt_host_free(ctx, a));
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

static int test_devices(void) {
  ckpt_ctx *ctx = new_ctx(2);
  EXPECT(ctx != NULL);
  int32_t n = 0;
  EXPECT_OK(ctx, ckpt_device_count(ctx, &n));
  EXPECT(n == 2);
  ckpt_device_info info = {.size = sizeof info};
  EXPECT_OK(ctx, ckpt_device_info_get(ctx, 1, &info));
  EXPECT(info.index == 1);
  EXPECT(strncmp(info.uuid, "HOST-", 5) == 0);
  EXPECT(strlen(info.uuid) == 15 && strcmp(info.uuid + 13, "-1") == 0);
  EXPECT(strcmp(info.name, "host memory") == 0);
  EXPECT(info.total_bytes > 0 && info.free_bytes > 0 && info.free_bytes <= info.total_bytes);
  EXPECT(info.pci_bus == -1 && info.numa_node == -1);
  ckpt_device_info info0 = {.size = sizeof info0};
  EXPECT_OK(ctx, ckpt_device_info_get(ctx, 0, &info0));
  EXPECT(strncmp(info0.uuid, info.uuid, 13) == 0 && strcmp(info0.uuid + 13, "-0") == 0);

  info.size = sizeof info - 4;
  EXPECT_ST(ctx, ckpt_device_info_get(ctx, 0, &info), CKPT_EABI);
  info.size = sizeof info;
  EXPECT_ST(ctx, ckpt_device_info_get(ctx, 7, &info), CKPT_ENODEV);
  EXPECT(ckpt_last_error(ctx, NULL, 0) == CKPT_ENODEV);
  EXPECT_DETAIL(ctx, "device 7");
  EXPECT_ST(ctx, ckpt_device_info_get(ctx, -1, &info), CKPT_ENODEV);
  EXPECT_ST(ctx, ckpt_device_count(ctx, NULL), CKPT_EINVAL);
  EXPECT_ST(NULL, ckpt_device_count(NULL, &n), CKPT_EINVAL);
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

static int test_host_alloc(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  uint8_t *p = NULL;
  EXPECT_OK(ctx, ckpt_host_alloc(ctx, 1 << 20, (void **)&p));
  for (size_t i = 0; i < (1 << 20); i++) EXPECT(p[i] == 0);
  memset(p, 0xab, 1 << 20);
  void *q = (void *)1;
  EXPECT_ST(ctx, ckpt_host_alloc(ctx, 0, &q), CKPT_EINVAL);
  EXPECT(q == NULL);
  EXPECT_ST(ctx, ckpt_host_free(ctx, p + 64), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_ctx_destroy(ctx), CKPT_EBUSY);  /* a pinned region is alive */
  EXPECT_OK(ctx, ckpt_host_free(ctx, p));
  EXPECT_ST(ctx, ckpt_host_free(ctx, p), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "ckpt_host_alloc");
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* A temporary file of len bytes holding fill(seed), mapped shared; the file is unlinked. */
static uint8_t *map_temp_file(size_t len, uint32_t seed) {
  char path[] = "/tmp/ckpt-test-XXXXXX";
  int fd = mkstemp(path);
  if (fd < 0) return NULL;
  unlink(path);
  uint8_t *p = MAP_FAILED;
  if (ftruncate(fd, (off_t)len) == 0)
    p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return NULL;
  fill(p, len, seed);
  return p;
}

static int test_register(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  size_t len = 1 << 20;
  uint8_t *m = map_temp_file(len, 3);
  EXPECT(m != NULL);
  EXPECT_OK(ctx, ckpt_host_register(ctx, m, len, CKPT_REGISTER_READONLY));
  EXPECT_ST(ctx, ckpt_host_register(ctx, m + 4096, 4096, 0), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "overlaps");
  EXPECT_ST(ctx, ckpt_host_register(ctx, m - 4096, 8192, 0), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_host_register(ctx, m, 0, 0), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_host_free(ctx, m), CKPT_EINVAL);  /* registered, not allocated */
  EXPECT_OK(ctx, ckpt_host_unregister(ctx, m));
  EXPECT_ST(ctx, ckpt_host_unregister(ctx, m), CKPT_EINVAL);
  uint8_t check[64];
  fill(check, sizeof check, 3);
  EXPECT(memcmp(m, check, sizeof check) == 0);  /* still mapped and untouched */
  EXPECT(munmap(m, len) == 0);
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

static int test_copies(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  size_t alen = 3 << 20, rlen = 2 << 20, blen = 8 << 20;
  uint8_t *a, *r = map_temp_file(rlen, 11);
  EXPECT(r != NULL);
  EXPECT_OK(ctx, ckpt_host_alloc(ctx, alen, (void **)&a));
  fill(a, alen, 10);
  EXPECT_OK(ctx, ckpt_host_register(ctx, r, rlen, CKPT_REGISTER_READONLY));
  ckpt_buf *b;
  ckpt_stream *s;
  ckpt_event *ev;
  EXPECT_OK(ctx, ckpt_buf_alloc(ctx, 0, blen, &b));
  EXPECT_OK(ctx, ckpt_stream_create(ctx, 0, &s));
  EXPECT_OK(ctx, ckpt_event_create(ctx, 0, &ev));
  EXPECT_OK(ctx, ckpt_event_query(ev));   /* never recorded */
  EXPECT_OK(ctx, ckpt_event_wait(ev, 0));
  uint64_t addr = 0, len = 0;
  int32_t dev = -1;
  EXPECT_OK(ctx, ckpt_buf_info(b, &addr, &len, &dev));
  EXPECT(addr != 0 && len == blen && dev == 0);
  EXPECT_OK(ctx, ckpt_buf_info(b, NULL, NULL, NULL));

  uint8_t *zero = calloc(1, blen), *want = malloc(blen), *got = malloc(blen);
  EXPECT(zero && want && got);
  EXPECT_OK(ctx, ckpt_buf_read(b, 0, zero, blen));  /* whatever it holds now */
  memcpy(want, zero, blen);
  const ckpt_range rg[] = {
      {(uintptr_t)a, 0, alen},                         /* all of the allocation */
      {(uintptr_t)r + 4096, 4 << 20, rlen - 4096},     /* most of the registered file */
      {(uintptr_t)a + 1000, (7 << 20) + 13, 12345},    /* unaligned pieces */
      {(uintptr_t)r + 1, blen - 777, 777},             /* the buffer's last byte */
  };
  size_t n = sizeof rg / sizeof rg[0];
  for (size_t i = 0; i < n; i++)
    memcpy(want + rg[i].offset, (const void *)(uintptr_t)rg[i].host, rg[i].len);
  EXPECT_OK(ctx, ckpt_h2d_async(s, b, rg, n));
  EXPECT_OK(ctx, ckpt_event_record(ev, s));
  EXPECT_OK(ctx, ckpt_event_wait(ev, -1));
  EXPECT_OK(ctx, ckpt_event_query(ev));
  EXPECT_OK(ctx, ckpt_buf_read(b, 0, got, blen));
  EXPECT(memcmp(got, want, blen) == 0);

  /* One bad range anywhere in the batch queues nothing. */
  uint8_t outside[64];
  ckpt_range bad[] = {
      {(uintptr_t)a, 0, 4096},
      {(uintptr_t)outside, 4096, sizeof outside},  /* source not pinned */
  };
  EXPECT_ST(ctx, ckpt_h2d_async(s, b, bad, 2), CKPT_ERANGE);
  EXPECT_DETAIL(ctx, "range 1");
  bad[1] = (ckpt_range){(uintptr_t)a, blen - 10, 11};  /* one byte past the buffer */
  EXPECT_ST(ctx, ckpt_h2d_async(s, b, bad, 2), CKPT_ERANGE);
  bad[1] = (ckpt_range){(uintptr_t)a + alen - 10, 0, 11};  /* one byte past the allocation */
  EXPECT_ST(ctx, ckpt_h2d_async(s, b, bad, 2), CKPT_ERANGE);
  bad[1] = (ckpt_range){(uintptr_t)a, UINT64_MAX - 5, 10};  /* offset overflow */
  EXPECT_ST(ctx, ckpt_h2d_async(s, b, bad, 2), CKPT_ERANGE);
  EXPECT_OK(ctx, ckpt_h2d_async(s, b, NULL, 0));
  EXPECT_OK(ctx, ckpt_h2d_async(s, b, bad, 0));
  EXPECT_ST(ctx, ckpt_h2d_async(s, b, NULL, 1), CKPT_EINVAL);
  EXPECT_OK(ctx, sync_stream(ctx, s));
  EXPECT_OK(ctx, ckpt_buf_read(b, 0, got, blen));
  EXPECT(memcmp(got, want, blen) == 0);  /* nothing from the failed calls landed */

  EXPECT_ST(ctx, ckpt_buf_read(b, blen - 1, got, 2), CKPT_ERANGE);
  EXPECT_ST(ctx, ckpt_buf_read(b, UINT64_MAX, got, 2), CKPT_ERANGE);
  EXPECT_OK(ctx, ckpt_buf_read(b, blen, got, 0));

  /* Device to host: the buffer's bytes back into the allocation, in unaligned pieces. */
  const ckpt_range back[] = {
      {(uintptr_t)a + 3, 5 << 20, 1 << 20},
      {(uintptr_t)a + (2 << 20), blen - 999, 999},
  };
  EXPECT_OK(ctx, ckpt_d2h_async(s, b, back, 2));
  EXPECT_OK(ctx, sync_stream(ctx, s));
  EXPECT(memcmp(a + 3, want + (5 << 20), 1 << 20) == 0);
  EXPECT(memcmp(a + (2 << 20), want + blen - 999, 999) == 0);
  ckpt_range out_bad[] = {{(uintptr_t)a, 0, 16}, {(uintptr_t)outside, 0, sizeof outside}};
  EXPECT_ST(ctx, ckpt_d2h_async(s, b, out_bad, 2), CKPT_ERANGE); /* into memory not pinned */
  EXPECT_DETAIL(ctx, "range 1");
  out_bad[1] = (ckpt_range){(uintptr_t)a, blen - 10, 11};
  EXPECT_ST(ctx, ckpt_d2h_async(s, b, out_bad, 2), CKPT_ERANGE); /* past the buffer */
  EXPECT_DETAIL(ctx, "past the end of the buffer");

  free(zero), free(want), free(got);
  EXPECT_OK(ctx, ckpt_event_destroy(ev));
  EXPECT_OK(ctx, ckpt_stream_destroy(s));
  EXPECT_OK(ctx, ckpt_buf_free(b));
  EXPECT_OK(ctx, ckpt_host_unregister(ctx, r));
  EXPECT_OK(ctx, ckpt_host_free(ctx, a));
  EXPECT(munmap(r, rlen) == 0);
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

static int test_devices_mismatch(void) {
  ckpt_ctx *ctx = new_ctx(2);
  EXPECT(ctx != NULL);
  ckpt_buf *b1;
  ckpt_stream *s0;
  ckpt_event *e1;
  void *a;
  EXPECT_ST(ctx, ckpt_buf_alloc(ctx, 2, 4096, &b1), CKPT_ENODEV);
  EXPECT_ST(ctx, ckpt_stream_create(ctx, -1, &s0), CKPT_ENODEV);
  EXPECT_ST(ctx, ckpt_event_create(ctx, 5, &e1), CKPT_ENODEV);
  EXPECT_ST(ctx, ckpt_buf_alloc(ctx, 0, 0, &b1), CKPT_EINVAL);
  EXPECT_OK(ctx, ckpt_host_alloc(ctx, 4096, &a));
  EXPECT_OK(ctx, ckpt_buf_alloc(ctx, 1, 4096, &b1));
  EXPECT_OK(ctx, ckpt_stream_create(ctx, 0, &s0));
  EXPECT_OK(ctx, ckpt_event_create(ctx, 1, &e1));
  ckpt_range rg = {(uintptr_t)a, 0, 4096};
  EXPECT_ST(ctx, ckpt_h2d_async(s0, b1, &rg, 1), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_event_record(e1, s0), CKPT_EINVAL);
  EXPECT_OK(ctx, ckpt_event_destroy(e1));
  EXPECT_OK(ctx, ckpt_stream_destroy(s0));
  EXPECT_OK(ctx, ckpt_buf_free(b1));
  EXPECT_OK(ctx, ckpt_host_free(ctx, a));
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* ckpt_buf_hash over several buffers of a device hashes what ckpt_hash does at their addresses,
 * and refuses a buffer of another device, an index past the buffers and a range past its end. */
static int test_buf_hash(void) {
  ckpt_ctx *ctx = new_ctx(2);
  EXPECT(ctx != NULL);
  ckpt_buf *b[3];
  const size_t len[3] = {3 * CKPT_HASH_CHUNK + 5, 4096, 4096};
  EXPECT_OK(ctx, ckpt_buf_alloc(ctx, 0, len[0], &b[0]));
  EXPECT_OK(ctx, ckpt_buf_alloc(ctx, 0, len[1], &b[1]));
  EXPECT_OK(ctx, ckpt_buf_alloc(ctx, 1, len[2], &b[2]));
  uint64_t at[3];
  for (int k = 0; k < 3; k++) {
    EXPECT_OK(ctx, ckpt_buf_info(b[k], &at[k], NULL, NULL));
    for (size_t i = 0; i < len[k]; i++) ((uint8_t *)(uintptr_t)at[k])[i] = (uint8_t)(i * 7 + k);
  }
  /* (buffer, offset, len): across both buffers of device 0, one empty. */
  uint64_t r[12] = {1, 10, 4000, 0, 1, len[0] - 1, 0, 7, 0, 1, 0, 4096};
  uint64_t abs[8] = {at[1] + 10, 4000, at[0] + 1, len[0] - 1, at[0] + 7, 0, at[1], 4096};
  uint64_t got[4], want[4], gc[6], wc[6]; /* chunks: 1 + 4 + 0 + 1 */
  EXPECT_OK(ctx, ckpt_buf_hash(b, 2, r, 4, got, gc, 2));
  EXPECT_OK(ctx, ckpt_hash(ctx, abs, 4, want, wc, 1, NULL));
  EXPECT(memcmp(got, want, sizeof got) == 0 && memcmp(gc, wc, sizeof gc) == 0);
  EXPECT_ST(ctx, ckpt_buf_hash(b, 3, r, 4, got, NULL, 2), CKPT_EINVAL); /* b[2] is on device 1 */
  EXPECT_DETAIL(ctx, "buffer 2");
  r[9] = 2;
  EXPECT_ST(ctx, ckpt_buf_hash(b, 2, r, 4, got, NULL, 2), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "range 3 names buffer 2 of 2");
  r[9] = 1, r[11] = 4097;
  EXPECT_ST(ctx, ckpt_buf_hash(b, 2, r, 4, got, NULL, 2), CKPT_ERANGE);
  EXPECT_DETAIL(ctx, "range 3");
  EXPECT_OK(ctx, ckpt_buf_hash(b, 2, r, 0, NULL, NULL, 2));
  for (int k = 0; k < 3; k++) EXPECT_OK(ctx, ckpt_buf_free(b[k]));
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

#define BIG (256u << 20)

static int test_query_in_flight(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  uint8_t *a;
  ckpt_buf *b;
  ckpt_stream *s;
  ckpt_event *ev;
  EXPECT_OK(ctx, ckpt_host_alloc(ctx, BIG, (void **)&a));
  memset(a, 0x5a, BIG);
  EXPECT_OK(ctx, ckpt_buf_alloc(ctx, 0, BIG, &b));
  EXPECT_OK(ctx, ckpt_stream_create(ctx, 0, &s));
  EXPECT_OK(ctx, ckpt_event_create(ctx, 0, &ev));
  ckpt_range rg = {(uintptr_t)a, 0, BIG};
  EXPECT_OK(ctx, ckpt_h2d_async(s, b, &rg, 1));
  EXPECT_OK(ctx, ckpt_event_record(ev, s));
  /* The buffer's pages are first touched by this copy: it takes far longer than a query. */
  EXPECT_ST(ctx, ckpt_event_query(ev), CKPT_EAGAIN);
  EXPECT_OK(ctx, ckpt_event_wait(ev, -1));
  EXPECT_OK(ctx, ckpt_event_query(ev));
  uint8_t tail[4096];
  EXPECT_OK(ctx, ckpt_buf_read(b, BIG - sizeof tail, tail, sizeof tail));
  for (size_t i = 0; i < sizeof tail; i++) EXPECT(tail[i] == 0x5a);
  EXPECT_OK(ctx, ckpt_event_destroy(ev));
  EXPECT_OK(ctx, ckpt_stream_destroy(s));
  EXPECT_OK(ctx, ckpt_buf_free(b));
  EXPECT_OK(ctx, ckpt_host_free(ctx, a));
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

static int test_wait_timeout(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  size_t big = 2 * BIG;
  uint8_t *a;
  ckpt_buf *b;
  ckpt_stream *s;
  ckpt_event *ev, *late;
  EXPECT_OK(ctx, ckpt_host_alloc(ctx, big, (void **)&a));
  memset(a, 0x77, big);
  EXPECT_OK(ctx, ckpt_buf_alloc(ctx, 0, big, &b));
  EXPECT_OK(ctx, ckpt_stream_create(ctx, 0, &s));
  EXPECT_OK(ctx, ckpt_event_create(ctx, 0, &ev));
  EXPECT_OK(ctx, ckpt_event_create(ctx, 0, &late));
  ckpt_range rg = {(uintptr_t)a, 0, big};
  EXPECT_OK(ctx, ckpt_h2d_async(s, b, &rg, 1));
  EXPECT_OK(ctx, ckpt_event_record(ev, s));
  int st = ckpt_event_wait(ev, 0);
  EXPECT(st == CKPT_ETIMEDOUT || st == CKPT_OK);
  if (st == CKPT_ETIMEDOUT) {
    EXPECT(ckpt_last_error(ctx, NULL, 0) == CKPT_ETIMEDOUT);
    EXPECT_DETAIL(ctx, "after 0 ms");
  }
  st = ckpt_event_wait(ev, 1);
  EXPECT(st == CKPT_ETIMEDOUT || st == CKPT_OK);
  /* Destroying an event whose marker is still queued waits for the marker. */
  EXPECT_OK(ctx, ckpt_event_record(late, s));
  EXPECT_OK(ctx, ckpt_event_destroy(late));
  EXPECT_OK(ctx, ckpt_event_query(ev));
  EXPECT_OK(ctx, ckpt_event_wait(ev, -1));
  EXPECT_OK(ctx, ckpt_event_wait(ev, 0));
  /* Re-recording moves the event; the stream destroy then drains the queued copy. */
  rg.len = 4096;
  EXPECT_OK(ctx, ckpt_h2d_async(s, b, &rg, 1));
  EXPECT_OK(ctx, ckpt_event_record(ev, s));
  EXPECT_OK(ctx, ckpt_event_wait(ev, 10000));
  EXPECT_OK(ctx, ckpt_stream_destroy(s));
  uint8_t last;
  EXPECT_OK(ctx, ckpt_buf_read(b, big - 1, &last, 1));
  EXPECT(last == 0x77);
  EXPECT_OK(ctx, ckpt_event_destroy(ev));
  EXPECT_OK(ctx, ckpt_buf_free(b));
  EXPECT_OK(ctx, ckpt_host_free(ctx, a));
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* The child of test_ipc: imports, checks the parent's bytes, writes its own. 0 on success. */
static int ipc_child(const ckpt_ipc_handle *h) {
  ckpt_ctx *ctx = new_ctx(1);
  if (ctx == NULL) return 10;
  size_t len = h->len;
  ckpt_buf *b = NULL;
  ckpt_stream *s = NULL;
  uint8_t *src = NULL, *want = malloc(len), *got = malloc(len);
  int rc = 0;
  if (want == NULL || got == NULL) rc = 11;
  else if (ckpt_buf_import(ctx, h, &b) != CKPT_OK) rc = 12;
  if (rc != 0) goto out;
  fill(want, len, 42);
  if (ckpt_buf_read(b, 0, got, len) != CKPT_OK || memcmp(got, want, len) != 0) rc = 13;
  else if (ckpt_host_alloc(ctx, len, (void **)&src) != CKPT_OK) rc = 14;
  if (rc == 0) {
    fill(src, len, 43);
    ckpt_range rg = {(uintptr_t)src, 0, len};
    if (ckpt_stream_create(ctx, 0, &s) != CKPT_OK) rc = 15;
    else {
      if (ckpt_h2d_async(s, b, &rg, 1) != CKPT_OK || sync_stream(ctx, s) != CKPT_OK) rc = 16;
      if (ckpt_stream_destroy(s) != CKPT_OK) rc = 17;
    }
    if (ckpt_host_free(ctx, src) != CKPT_OK) rc = 18;
  }
  if (ckpt_buf_free(b) != CKPT_OK) rc = 19;
out:
  free(want), free(got);
  if (ckpt_ctx_destroy(ctx) != CKPT_OK && rc == 0) rc = 20;
  return rc;
}

static int test_ipc(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  size_t len = (4 << 20) + 123;
  uint8_t *src, *got = malloc(len), *want = malloc(len);
  EXPECT(got && want);
  ckpt_buf *b, *self;
  ckpt_stream *s;
  EXPECT_OK(ctx, ckpt_host_alloc(ctx, len, (void **)&src));
  fill(src, len, 42);
  EXPECT_OK(ctx, ckpt_buf_alloc(ctx, 0, len, &b));
  EXPECT_OK(ctx, ckpt_stream_create(ctx, 0, &s));
  ckpt_range rg = {(uintptr_t)src, 0, len};
  EXPECT_OK(ctx, ckpt_h2d_async(s, b, &rg, 1));
  EXPECT_OK(ctx, sync_stream(ctx, s));
  EXPECT_OK(ctx, ckpt_stream_destroy(s));  /* fork with no other thread alive */

  ckpt_ipc_handle h = {.size = sizeof h - 1};
  EXPECT_ST(ctx, ckpt_buf_export(b, &h), CKPT_EABI);
  h.size = sizeof h;
  EXPECT_OK(ctx, ckpt_buf_export(b, &h));
  EXPECT(h.kind == CKPT_IPC_HOST && h.len == len && h.device == 0 && h.pid == getpid());
  EXPECT(strncmp((char *)h.data, "/proc/", 6) == 0);

  fflush(NULL);
  pid_t pid = fork();
  EXPECT(pid >= 0);
  if (pid == 0) _exit(ipc_child(&h));  /* _exit: the child owns none of the parent's handles */
  int status;
  EXPECT(waitpid(pid, &status, 0) == pid);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    snprintf(g_msg, sizeof g_msg, "%s:%d: importing child ended with wait status 0x%x",
             __FILE__, __LINE__, status);
    return 0;
  }
  fill(want, len, 43);
  EXPECT_OK(ctx, ckpt_buf_read(b, 0, got, len));
  EXPECT(memcmp(got, want, len) == 0);

  /* The host backend can import its own export; an import cannot be exported again. */
  EXPECT_OK(ctx, ckpt_buf_import(ctx, &h, &self));
  EXPECT_OK(ctx, ckpt_buf_read(self, len - 100, got, 100));
  EXPECT(memcmp(got, want + len - 100, 100) == 0);
  ckpt_ipc_handle h2 = {.size = sizeof h2};
  EXPECT_ST(ctx, ckpt_buf_export(self, &h2), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_ctx_destroy(ctx), CKPT_EBUSY);
  EXPECT_OK(ctx, ckpt_buf_free(self));

  ckpt_ipc_handle bad = h;
  bad.len = len + 1;
  EXPECT_ST(ctx, ckpt_buf_import(ctx, &bad, &self), CKPT_EHANDLE);
  EXPECT(self == NULL);
  bad = h;
  snprintf((char *)bad.data, sizeof bad.data, "/proc/%d/fd/999999", (int)getpid());
  EXPECT_ST(ctx, ckpt_buf_import(ctx, &bad, &self), CKPT_ESYS);
  EXPECT_DETAIL(ctx, "/fd/999999");
  EXPECT_DETAIL(ctx, strerror(ENOENT));
  /* Only the exporter's /proc/<pid>/fd/<n>: no other path is even opened. */
  bad = h;
  snprintf((char *)bad.data, sizeof bad.data, "/etc/passwd");
  EXPECT_ST(ctx, ckpt_buf_import(ctx, &bad, &self), CKPT_EHANDLE);
  EXPECT_DETAIL(ctx, "is not /proc/");
  bad = h;
  bad.pid = h.pid + 1;
  EXPECT_ST(ctx, ckpt_buf_import(ctx, &bad, &self), CKPT_EHANDLE);
  bad = h;
  bad.kind = CKPT_IPC_CUDA;
  EXPECT_ST(ctx, ckpt_buf_import(ctx, &bad, &self), CKPT_EHANDLE);
  EXPECT_DETAIL(ctx, "CUDA");
  bad.kind = 9;
  EXPECT_ST(ctx, ckpt_buf_import(ctx, &bad, &self), CKPT_EHANDLE);
  bad = h;
  memset(bad.data, 'x', sizeof bad.data);
  EXPECT_ST(ctx, ckpt_buf_import(ctx, &bad, &self), CKPT_EHANDLE);
  bad = h;
  bad.size = 8;
  EXPECT_ST(ctx, ckpt_buf_import(ctx, &bad, &self), CKPT_EABI);
  /* A path to a file, or to a memfd that is not sealed at its size: refused, whoever asks. */
  char file[] = "/dev/shm/ckpt-test-import-XXXXXX";
  int ffd = mkstemp(file);
  EXPECT(ffd >= 0 && ftruncate(ffd, (off_t)len) == 0);
  bad = h;
  snprintf((char *)bad.data, sizeof bad.data, "/proc/%d/fd/%d", (int)getpid(), ffd);
  EXPECT_ST(ctx, ckpt_buf_import(ctx, &bad, &self), CKPT_EHANDLE);
  EXPECT_DETAIL(ctx, "not a memfd sealed");
  unlink(file);
  close(ffd);
  int mfd = memfd_create("ckpt-test-unsealed", MFD_CLOEXEC);
  EXPECT(mfd >= 0 && ftruncate(mfd, (off_t)len) == 0);
  bad = h;
  snprintf((char *)bad.data, sizeof bad.data, "/proc/%d/fd/%d", (int)getpid(), mfd);
  EXPECT_ST(ctx, ckpt_buf_import(ctx, &bad, &self), CKPT_EHANDLE);
  close(mfd);

  free(got), free(want);
  EXPECT_OK(ctx, ckpt_buf_free(b));
  EXPECT_OK(ctx, ckpt_host_free(ctx, src));
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* An exporter that has exited leaves a handle whose path is gone: ESYS with ENOENT. */
static int test_ipc_dead_exporter(void) {
  int fds[2];
  EXPECT(pipe(fds) == 0);
  fflush(NULL);
  pid_t pid = fork();
  EXPECT(pid >= 0);
  if (pid == 0) {
    close(fds[0]);
    ckpt_ctx *c = new_ctx(1);
    ckpt_buf *b;
    ckpt_ipc_handle h = {.size = sizeof h};
    int ok = c && ckpt_buf_alloc(c, 0, 4096, &b) == CKPT_OK && ckpt_buf_export(b, &h) == CKPT_OK &&
             write(fds[1], &h, sizeof h) == (ssize_t)sizeof h;
    _exit(ok ? 0 : 1);
  }
  close(fds[1]);
  ckpt_ipc_handle h;
  ssize_t got = read(fds[0], &h, sizeof h);
  close(fds[0]);
  int status;
  EXPECT(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT(got == (ssize_t)sizeof h);
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  ckpt_buf *b;
  EXPECT_ST(ctx, ckpt_buf_import(ctx, &h, &b), CKPT_ESYS);
  EXPECT_DETAIL(ctx, strerror(ENOENT));
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

static int test_busy_ctx(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  ckpt_buf *b;
  ckpt_stream *s;
  ckpt_event *ev;
  EXPECT_OK(ctx, ckpt_buf_alloc(ctx, 0, 4096, &b));
  EXPECT_ST(ctx, ckpt_ctx_destroy(ctx), CKPT_EBUSY);
  EXPECT_DETAIL(ctx, "1 handles");
  EXPECT_OK(ctx, ckpt_buf_free(b));
  EXPECT_OK(ctx, ckpt_stream_create(ctx, 0, &s));
  EXPECT_ST(ctx, ckpt_ctx_destroy(ctx), CKPT_EBUSY);
  EXPECT_OK(ctx, ckpt_stream_destroy(s));
  EXPECT_OK(ctx, ckpt_event_create(ctx, 0, &ev));
  EXPECT_ST(ctx, ckpt_ctx_destroy(ctx), CKPT_EBUSY);
  EXPECT_OK(ctx, ckpt_event_destroy(ev));
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

static int test_nccl(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  int32_t v = -1;
  EXPECT_ST(ctx, ckpt_nccl_version(ctx, &v), CKPT_EUNSUPPORTED);
  EXPECT(ckpt_last_error(ctx, NULL, 0) == CKPT_EUNSUPPORTED);
  EXPECT_DETAIL(ctx, "TCP");
  EXPECT_ST(NULL, ckpt_nccl_version(NULL, &v), CKPT_EINVAL);
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* ---- stream waits and broadcasts ------------------------------------------------------ */

/* Queues an h2d of len bytes from pinned src into buf at offset 0. */
static int h2d(ckpt_stream *s, ckpt_buf *buf, const void *src, uint64_t off, size_t len) {
  ckpt_range rg = {(uintptr_t)src, off, len};
  return ckpt_h2d_async(s, buf, &rg, 1);
}

/* The buffer holds want[0..len) at offset off. */
static int buf_equals(ckpt_buf *b, uint64_t off, const uint8_t *want, size_t len) {
  uint8_t *got = malloc(len);
  int ok = got != NULL && ckpt_buf_read(b, off, got, len) == CKPT_OK && memcmp(got, want, len) == 0;
  free(got);
  return ok;
}

static int test_stream_wait_event(void) {
  ckpt_ctx *ctx = new_ctx(2);
  EXPECT(ctx != NULL);
  uint8_t *a, *small;
  ckpt_buf *x, *y;
  ckpt_stream *sa, *sb, *sc;
  ckpt_event *e, *f, *never, *e1;
  EXPECT_OK(ctx, ckpt_host_alloc(ctx, BIG, (void **)&a));
  EXPECT_OK(ctx, ckpt_host_alloc(ctx, 4096, (void **)&small));
  fill(a, BIG, 21);
  fill(small, 4096, 22);
  EXPECT_OK(ctx, ckpt_buf_alloc(ctx, 0, BIG, &x));
  EXPECT_OK(ctx, ckpt_buf_alloc(ctx, 1, 4096, &y));
  EXPECT_OK(ctx, ckpt_stream_create(ctx, 0, &sa));
  EXPECT_OK(ctx, ckpt_stream_create(ctx, 0, &sb));
  EXPECT_OK(ctx, ckpt_stream_create(ctx, 1, &sc));
  EXPECT_OK(ctx, ckpt_event_create(ctx, 0, &e));
  EXPECT_OK(ctx, ckpt_event_create(ctx, 0, &f));
  EXPECT_OK(ctx, ckpt_event_create(ctx, 0, &never));
  EXPECT_OK(ctx, ckpt_event_create(ctx, 1, &e1));

  /* A: 256 MiB into x, then E. B: wait for E, then 4 KiB over the head of x. Without the
   * wait B's small copy would land first and be overwritten by A's. */
  EXPECT_OK(ctx, h2d(sa, x, a, 0, BIG));
  EXPECT_OK(ctx, ckpt_event_record(e, sa));
  EXPECT_OK(ctx, ckpt_stream_wait_event(sb, e));
  EXPECT_OK(ctx, h2d(sb, x, small, 0, 4096));
  EXPECT_OK(ctx, ckpt_event_record(f, sb));
  EXPECT_ST(ctx, ckpt_event_query(f), CKPT_EAGAIN);  /* held behind A's first-touch copy */
  EXPECT_OK(ctx, ckpt_event_wait(f, -1));
  EXPECT_OK(ctx, ckpt_event_query(e));
  EXPECT(buf_equals(x, 0, small, 4096));
  EXPECT(buf_equals(x, 4096, a + 4096, 4096));
  EXPECT(buf_equals(x, BIG - 4096, a + BIG - 4096, 4096));

  /* A never recorded event, and a completed one, make no wait. */
  EXPECT_OK(ctx, ckpt_stream_wait_event(sb, never));
  EXPECT_OK(ctx, ckpt_stream_wait_event(sb, e));
  EXPECT_OK(ctx, sync_stream(ctx, sb));

  /* Across devices: a device-1 stream waits for a device-0 event. */
  EXPECT_OK(ctx, h2d(sa, x, a, 0, BIG));
  EXPECT_OK(ctx, ckpt_event_record(e, sa));
  EXPECT_OK(ctx, ckpt_stream_wait_event(sc, e));
  EXPECT_OK(ctx, h2d(sc, y, small, 0, 4096));
  EXPECT_OK(ctx, ckpt_event_record(e1, sc));
  EXPECT_OK(ctx, ckpt_event_wait(e1, -1));
  EXPECT_OK(ctx, ckpt_event_query(e));
  EXPECT(buf_equals(y, 0, small, 4096));

  /* The wait is for E's record made before it: re-recording E behind another copy on A does
   * not hold B any longer, so F completes while A's second copy still runs. */
  EXPECT_OK(ctx, h2d(sa, x, a, 0, 4096));
  EXPECT_OK(ctx, ckpt_event_record(e, sa));
  EXPECT_OK(ctx, ckpt_stream_wait_event(sb, e));
  EXPECT_OK(ctx, h2d(sa, x, a, 0, BIG));
  EXPECT_OK(ctx, ckpt_event_record(e, sa));
  EXPECT_OK(ctx, ckpt_event_record(f, sb));
  EXPECT_OK(ctx, ckpt_event_wait(f, -1));
  EXPECT_ST(ctx, ckpt_event_query(e), CKPT_EAGAIN);
  EXPECT_OK(ctx, ckpt_event_wait(e, -1));

  /* Destroying an event that a queued wait references waits until the wait has passed;
   * destroying a stream drains a queued wait. */
  EXPECT_OK(ctx, h2d(sa, x, a, 0, BIG));
  EXPECT_OK(ctx, ckpt_event_record(e, sa));
  EXPECT_OK(ctx, ckpt_stream_wait_event(sb, e));
  EXPECT_OK(ctx, ckpt_stream_wait_event(sc, e));
  EXPECT_OK(ctx, ckpt_event_destroy(e));
  EXPECT_OK(ctx, h2d(sa, x, a, 0, BIG));
  EXPECT_OK(ctx, ckpt_event_record(f, sa));
  EXPECT_OK(ctx, ckpt_stream_wait_event(sb, f));
  EXPECT_OK(ctx, ckpt_stream_destroy(sb));
  EXPECT_OK(ctx, ckpt_event_query(f));

  /* Argument errors. */
  EXPECT_ST(NULL, ckpt_stream_wait_event(NULL, f), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_stream_wait_event(sa, NULL), CKPT_EINVAL);
  ckpt_ctx *other = new_ctx(1);
  EXPECT(other != NULL);
  ckpt_event *foreign;
  EXPECT_OK(other, ckpt_event_create(other, 0, &foreign));
  EXPECT_ST(ctx, ckpt_stream_wait_event(sa, foreign), CKPT_EHANDLE);
  EXPECT_DETAIL(ctx, "another context");
  EXPECT_OK(other, ckpt_event_destroy(foreign));
  EXPECT_OK(other, ckpt_ctx_destroy(other));

  EXPECT_OK(ctx, ckpt_event_destroy(f));
  EXPECT_OK(ctx, ckpt_event_destroy(never));
  EXPECT_OK(ctx, ckpt_event_destroy(e1));
  EXPECT_OK(ctx, ckpt_stream_destroy(sa));
  EXPECT_OK(ctx, ckpt_stream_destroy(sc));
  EXPECT_OK(ctx, ckpt_buf_free(x));
  EXPECT_OK(ctx, ckpt_buf_free(y));
  EXPECT_OK(ctx, ckpt_host_free(ctx, a));
  EXPECT_OK(ctx, ckpt_host_free(ctx, small));
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* One buffer, stream and event per device of a `ndev`-device context, and a communicator. */
typedef struct {
  ckpt_ctx *ctx;
  int32_t ndev;
  size_t len;
  ckpt_comm *comm;
  ckpt_buf *buf[4];
  ckpt_stream *s[4];
  ckpt_event *ev[4];
  uint8_t *pat[4];  /* pinned, len bytes each: fill(seed 100 + i) */
} ranks;

static int ranks_open(ranks *r, int32_t ndev, size_t len) {
  memset(r, 0, sizeof *r);
  r->ndev = ndev;
  r->len = len;
  r->ctx = new_ctx(ndev);
  if (r->ctx == NULL) return CKPT_ENOMEM;
  int32_t devs[4] = {0, 1, 2, 3};
  uint8_t id[CKPT_COMM_ID_BYTES];
  int st = ckpt_comm_id_new(r->ctx, id);
  if (st == CKPT_OK) st = ckpt_comm_init(r->ctx, id, ndev, 0, ndev, devs, -1, &r->comm);
  for (int32_t i = 0; i < ndev && st == CKPT_OK; i++) {
    st = ckpt_host_alloc(r->ctx, len, (void **)&r->pat[i]);
    if (st == CKPT_OK) fill(r->pat[i], len, 100 + (uint32_t)i);
    if (st == CKPT_OK) st = ckpt_buf_alloc(r->ctx, i, len, &r->buf[i]);
    if (st == CKPT_OK) st = ckpt_stream_create(r->ctx, i, &r->s[i]);
    if (st == CKPT_OK) st = ckpt_event_create(r->ctx, i, &r->ev[i]);
  }
  return st;
}

/* Waits for every stream: an event recorded on each, then waited for. */
static int ranks_sync(ranks *r) {
  for (int32_t i = 0; i < r->ndev; i++) {
    int st = ckpt_event_record(r->ev[i], r->s[i]);
    if (st != CKPT_OK) return st;
  }
  for (int32_t i = 0; i < r->ndev; i++) {
    int st = ckpt_event_wait(r->ev[i], -1);
    if (st != CKPT_OK) return st;
  }
  return CKPT_OK;
}

/* Every buffer i filled with pattern i (on its own stream), then waited for. */
static int ranks_fill(ranks *r) {
  for (int32_t i = 0; i < r->ndev; i++) {
    int st = h2d(r->s[i], r->buf[i], r->pat[i], 0, r->len);
    if (st != CKPT_OK) return st;
  }
  return ranks_sync(r);
}

static int ranks_close(ranks *r) {
  int st = CKPT_OK;
  if (r->ctx == NULL) return st;
  if (r->comm && ckpt_comm_destroy(r->comm) != CKPT_OK) st = CKPT_EINVAL;
  for (int32_t i = 0; i < r->ndev; i++) {
    if (r->ev[i] && ckpt_event_destroy(r->ev[i]) != CKPT_OK) st = CKPT_EINVAL;
    if (r->s[i] && ckpt_stream_destroy(r->s[i]) != CKPT_OK) st = CKPT_EINVAL;
    if (r->buf[i] && ckpt_buf_free(r->buf[i]) != CKPT_OK) st = CKPT_EINVAL;
    if (r->pat[i] && ckpt_host_free(r->ctx, r->pat[i]) != CKPT_OK) st = CKPT_EINVAL;
  }
  if (ckpt_ctx_destroy(r->ctx) != CKPT_OK) st = CKPT_EBUSY;
  return st;
}

static int test_broadcast_two(void) {
  ranks r;
  const size_t len = 64u << 20;
  int st = ranks_open(&r, 2, len);
  ckpt_ctx *ctx = r.ctx;
  EXPECT_OK(ctx, st);
  /* The copy comes after the root stream's earlier work: the root is kept busy writing
   * pattern 1 for a while, then gets pattern 0, which is what must arrive. */
  EXPECT_OK(ctx, ranks_fill(&r));
  for (int k = 0; k < 6; k++) EXPECT_OK(ctx, h2d(r.s[0], r.buf[0], r.pat[1], 0, len));
  EXPECT_OK(ctx, h2d(r.s[0], r.buf[0], r.pat[0], 0, len));
  EXPECT_OK(ctx, ckpt_broadcast(r.comm, 0, r.buf, r.s, 0, len));
  EXPECT_OK(ctx, ckpt_event_record(r.ev[1], r.s[1]));
  EXPECT_OK(ctx, ckpt_event_wait(r.ev[1], -1));
  EXPECT(buf_equals(r.buf[1], 0, r.pat[0], len));
  EXPECT_OK(ctx, ranks_sync(&r));
  EXPECT(buf_equals(r.buf[0], 0, r.pat[0], len));  /* the root's bytes are untouched */

  /* From root 1, right behind the copy into the root on the same stream. */
  EXPECT_OK(ctx, h2d(r.s[1], r.buf[1], r.pat[1], 0, len));
  EXPECT_OK(ctx, ckpt_broadcast(r.comm, 1, r.buf, r.s, 0, len));
  EXPECT_OK(ctx, ranks_sync(&r));
  EXPECT(buf_equals(r.buf[0], 0, r.pat[1], len));
  EXPECT(buf_equals(r.buf[1], 0, r.pat[1], len));

  /* Work queued on the root after the broadcast may overwrite the root buffer: the
   * destination, kept busy for a while, still gets the bytes from before. Work queued on
   * the destination after the broadcast lands over the broadcast's bytes. */
  EXPECT_OK(ctx, ranks_fill(&r));
  for (int k = 0; k < 6; k++) EXPECT_OK(ctx, h2d(r.s[1], r.buf[1], r.pat[1], 0, len));
  EXPECT_OK(ctx, ckpt_broadcast(r.comm, 0, r.buf, r.s, 0, len));
  EXPECT_OK(ctx, h2d(r.s[0], r.buf[0], r.pat[1], 0, len));
  EXPECT_OK(ctx, h2d(r.s[1], r.buf[1], r.pat[1], 0, 4096));
  EXPECT_OK(ctx, ranks_sync(&r));
  EXPECT(buf_equals(r.buf[0], 0, r.pat[1], len));
  EXPECT(buf_equals(r.buf[1], 0, r.pat[1], 4096));
  EXPECT(buf_equals(r.buf[1], 4096, r.pat[0] + 4096, len - 4096));

  /* A subrange: the bytes outside it stay as they were, on every rank. */
  EXPECT_OK(ctx, ranks_fill(&r));
  const uint64_t off = 4096 + 13, n = (1u << 20) + 7;
  EXPECT_OK(ctx, ckpt_broadcast(r.comm, 0, r.buf, r.s, off, n));
  EXPECT_OK(ctx, ranks_sync(&r));
  EXPECT(buf_equals(r.buf[0], 0, r.pat[0], len));
  EXPECT(buf_equals(r.buf[1], 0, r.pat[1], off));
  EXPECT(buf_equals(r.buf[1], off, r.pat[0] + off, n));
  EXPECT(buf_equals(r.buf[1], off + n, r.pat[1] + off + n, len - off - n));
  /* The last byte, and nothing at the very end. */
  EXPECT_OK(ctx, ckpt_broadcast(r.comm, 0, r.buf, r.s, len - 1, 1));
  EXPECT_OK(ctx, ckpt_broadcast(r.comm, 1, r.buf, r.s, len, 0));
  EXPECT_OK(ctx, ranks_sync(&r));
  EXPECT(buf_equals(r.buf[1], len - 1, r.pat[0] + len - 1, 1));
  EXPECT(buf_equals(r.buf[1], off + n, r.pat[1] + off + n, len - off - n - 1));

  /* The daemon's pattern: the root's broadcast stream waits for the copy stream's event. */
  ckpt_stream *copy;
  ckpt_event *copied;
  EXPECT_OK(ctx, ranks_fill(&r));
  EXPECT_OK(ctx, ckpt_stream_create(ctx, 0, &copy));
  EXPECT_OK(ctx, ckpt_event_create(ctx, 0, &copied));
  EXPECT_OK(ctx, h2d(copy, r.buf[0], r.pat[1], 0, len));
  EXPECT_OK(ctx, ckpt_event_record(copied, copy));
  EXPECT_OK(ctx, ckpt_stream_wait_event(r.s[0], copied));
  EXPECT_OK(ctx, ckpt_broadcast(r.comm, 0, r.buf, r.s, 0, len));
  EXPECT_OK(ctx, ranks_sync(&r));
  EXPECT(buf_equals(r.buf[1], 0, r.pat[1], len));
  EXPECT_OK(ctx, ckpt_event_destroy(copied));
  EXPECT_OK(ctx, ckpt_stream_destroy(copy));

  EXPECT_OK(ctx, ranks_close(&r));
  return 1;
}

static int test_broadcast_three(void) {
  ranks r;
  const size_t len = (3u << 20) + 5;
  int st = ranks_open(&r, 3, len);
  ckpt_ctx *ctx = r.ctx;
  EXPECT_OK(ctx, st);
  for (int32_t root = 2; root >= 0; root--) {
    EXPECT_OK(ctx, ranks_fill(&r));
    EXPECT_OK(ctx, ckpt_broadcast(r.comm, root, r.buf, r.s, 0, len));
    EXPECT_OK(ctx, ranks_sync(&r));
    for (int32_t i = 0; i < 3; i++) EXPECT(buf_equals(r.buf[i], 0, r.pat[root], len));
  }
  /* Many in a row, alternating roots, each over a piece that the next one's root rewrites. */
  EXPECT_OK(ctx, ranks_fill(&r));
  for (int k = 0; k < 300; k++) {
    int32_t root = k % 3;
    uint64_t off = (uint64_t)(k % 17) * 4099;
    EXPECT_OK(ctx, h2d(r.s[root], r.buf[root], r.pat[root] + off, off, 4099));
    EXPECT_OK(ctx, ckpt_broadcast(r.comm, root, r.buf, r.s, off, 4099));
  }
  EXPECT_OK(ctx, ranks_sync(&r));
  for (int k = 283; k < 300; k++) {  /* the last broadcast over each of the 17 pieces */
    uint64_t off = (uint64_t)(k % 17) * 4099;
    for (int32_t i = 0; i < 3; i++) EXPECT(buf_equals(r.buf[i], off, r.pat[k % 3] + off, 4099));
  }
  EXPECT_OK(ctx, ranks_close(&r));
  return 1;
}

static int test_broadcast_errors(void) {
  ranks r;
  const size_t len = 1u << 20;
  int st = ranks_open(&r, 2, len);
  ckpt_ctx *ctx = r.ctx;
  EXPECT_OK(ctx, st);
  EXPECT_OK(ctx, ranks_fill(&r));
  ckpt_buf *swapped_b[2] = {r.buf[1], r.buf[0]};
  ckpt_stream *swapped_s[2] = {r.s[1], r.s[0]};
  ckpt_buf *null_b[2] = {r.buf[0], NULL};
  EXPECT_ST(ctx, ckpt_broadcast(r.comm, 0, swapped_b, r.s, 0, 16), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "its buffer is on device 1");
  EXPECT_ST(ctx, ckpt_broadcast(r.comm, 0, r.buf, swapped_s, 0, 16), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "its stream is on device 1");
  EXPECT_ST(ctx, ckpt_broadcast(r.comm, 0, null_b, r.s, 0, 16), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_broadcast(r.comm, 0, NULL, r.s, 0, 16), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_broadcast(r.comm, 0, r.buf, NULL, 0, 16), CKPT_EINVAL);
  EXPECT_ST(NULL, ckpt_broadcast(NULL, 0, r.buf, r.s, 0, 16), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_broadcast(r.comm, 0, r.buf, r.s, 1, len), CKPT_ERANGE);
  EXPECT_DETAIL(ctx, "buffer has");
  EXPECT_ST(ctx, ckpt_broadcast(r.comm, 0, r.buf, r.s, len + 1, 0), CKPT_ERANGE);
  EXPECT_ST(ctx, ckpt_broadcast(r.comm, 0, r.buf, r.s, UINT64_MAX - 5, 10), CKPT_ERANGE);
  EXPECT_ST(ctx, ckpt_broadcast(r.comm, 0, r.buf, r.s, 8, UINT64_MAX - 5), CKPT_ERANGE);
  EXPECT_ST(ctx, ckpt_broadcast(r.comm, 2, r.buf, r.s, 0, 16), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "root 2");
  EXPECT_ST(ctx, ckpt_broadcast(r.comm, -1, r.buf, r.s, 0, 16), CKPT_EINVAL);
  /* A buffer of another context. */
  ckpt_ctx *other = new_ctx(2);
  EXPECT(other != NULL);
  ckpt_buf *ob;
  EXPECT_OK(other, ckpt_buf_alloc(other, 1, len, &ob));
  ckpt_buf *foreign_b[2] = {r.buf[0], ob};
  EXPECT_ST(ctx, ckpt_broadcast(r.comm, 0, foreign_b, r.s, 0, 16), CKPT_EHANDLE);
  EXPECT_OK(other, ckpt_buf_free(ob));
  EXPECT_OK(other, ckpt_ctx_destroy(other));
  /* The failed calls queued nothing. */
  EXPECT_OK(ctx, ranks_sync(&r));
  EXPECT(buf_equals(r.buf[0], 0, r.pat[0], len));
  EXPECT(buf_equals(r.buf[1], 0, r.pat[1], len));

  /* Communicator arguments. */
  uint8_t id[CKPT_COMM_ID_BYTES], id2[CKPT_COMM_ID_BYTES], zero[CKPT_COMM_ID_BYTES] = {0};
  EXPECT_OK(ctx, ckpt_comm_id_new(ctx, id));
  EXPECT_OK(ctx, ckpt_comm_id_new(ctx, id2));
  EXPECT(memcmp(id, id2, sizeof id) != 0 && memcmp(id, zero, sizeof id) != 0);
  EXPECT_ST(ctx, ckpt_comm_id_new(ctx, NULL), CKPT_EINVAL);
  EXPECT_ST(NULL, ckpt_comm_id_new(NULL, id), CKPT_EINVAL);
  const int32_t d01[2] = {0, 1}, d00[2] = {0, 0}, d05[2] = {0, 5}, dneg[1] = {-1};
  ckpt_comm *c = (ckpt_comm *)&r;  /* must be overwritten with NULL */
  /* Ranks in other processes need an id from ckpt_comm_id_new (tested in test_comm.c). */
  EXPECT_ST(ctx, ckpt_comm_init(ctx, zero, 4, 0, 2, d01, -1, &c), CKPT_EINVAL);
  EXPECT(c == NULL);
  EXPECT_DETAIL(ctx, "not made by the host backend");
  EXPECT_ST(ctx, ckpt_comm_init(ctx, zero, 3, 1, 2, d01, -1, &c), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_comm_init(ctx, id, 2, 1, 2, d01, -1, &c), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "do not fit");
  EXPECT_ST(ctx, ckpt_comm_init(ctx, id, 2, -1, 1, d01, -1, &c), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_comm_init(ctx, id, 0, 0, 0, d01, -1, &c), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_comm_init(ctx, id, 2, 0, 0, d01, -1, &c), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_comm_init(ctx, id, 2, 0, 2, d00, -1, &c), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "device 0 is listed twice");
  EXPECT_ST(ctx, ckpt_comm_init(ctx, id, 2, 0, 2, d05, -1, &c), CKPT_ENODEV);
  EXPECT_ST(ctx, ckpt_comm_init(ctx, id, 1, 0, 1, dneg, -1, &c), CKPT_ENODEV);
  EXPECT_ST(ctx, ckpt_comm_init(ctx, id, 2, 0, 2, NULL, -1, &c), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_comm_init(ctx, NULL, 2, 0, 2, d01, -1, &c), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_comm_init(ctx, id, 2, 0, 2, d01, -1, NULL), CKPT_EINVAL);
  EXPECT_ST(NULL, ckpt_comm_init(NULL, id, 2, 0, 2, d01, -1, &c), CKPT_EINVAL);
  EXPECT_ST(NULL, ckpt_comm_destroy(NULL), CKPT_EINVAL);
  EXPECT_ST(NULL, ckpt_comm_abort(NULL), CKPT_EINVAL);

  /* A second communicator over one device (device 1 alone): broadcasts are no-ops. */
  const int32_t d1[1] = {1};
  EXPECT_OK(ctx, ckpt_comm_init(ctx, id, 1, 0, 1, d1, -1, &c));
  EXPECT_OK(ctx, ckpt_broadcast(c, 0, &r.buf[1], &r.s[1], 0, len));
  EXPECT_ST(ctx, ckpt_broadcast(c, 1, &r.buf[1], &r.s[1], 0, len), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_broadcast(c, 0, &r.buf[0], &r.s[0], 0, len), CKPT_EINVAL);
  EXPECT_OK(ctx, ckpt_comm_abort(c));
  EXPECT_OK(ctx, ranks_sync(&r));
  EXPECT(buf_equals(r.buf[1], 0, r.pat[1], len));
  EXPECT_OK(ctx, ranks_close(&r));

  /* The context outlives no communicator. */
  ctx = new_ctx(2);
  EXPECT(ctx != NULL);
  EXPECT_OK(ctx, ckpt_comm_id_new(ctx, id));
  EXPECT_OK(ctx, ckpt_comm_init(ctx, id, 2, 0, 2, d01, -1, &c));
  EXPECT_ST(ctx, ckpt_ctx_destroy(ctx), CKPT_EBUSY);
  EXPECT_DETAIL(ctx, "1 handles");
  EXPECT_OK(ctx, ckpt_comm_destroy(c));
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* Destroying the communicator or the streams right after a broadcast is queued: each waits
 * for (or drains) the work, and the bytes still arrive. */
static int test_broadcast_lifetimes(void) {
  ranks r;
  const size_t len = 32u << 20;
  int st = ranks_open(&r, 2, len);
  ckpt_ctx *ctx = r.ctx;
  EXPECT_OK(ctx, st);
  EXPECT_OK(ctx, h2d(r.s[0], r.buf[0], r.pat[0], 0, len));
  EXPECT_OK(ctx, ckpt_broadcast(r.comm, 0, r.buf, r.s, 0, len));
  EXPECT_OK(ctx, ckpt_comm_destroy(r.comm));  /* waits for the broadcast */
  r.comm = NULL;
  EXPECT(buf_equals(r.buf[1], 0, r.pat[0], len));

  uint8_t id[CKPT_COMM_ID_BYTES];
  const int32_t d01[2] = {0, 1};
  EXPECT_OK(ctx, ckpt_comm_id_new(ctx, id));
  EXPECT_OK(ctx, ckpt_comm_init(ctx, id, 2, 0, 2, d01, -1, &r.comm));
  EXPECT_OK(ctx, h2d(r.s[1], r.buf[1], r.pat[1], 0, len));
  EXPECT_OK(ctx, ckpt_broadcast(r.comm, 1, r.buf, r.s, 0, len));
  EXPECT_OK(ctx, ckpt_stream_destroy(r.s[0]));  /* drains the destination's copy */
  EXPECT(buf_equals(r.buf[0], 0, r.pat[1], len));
  EXPECT_OK(ctx, ckpt_stream_create(ctx, 0, &r.s[0]));
  EXPECT_OK(ctx, h2d(r.s[0], r.buf[0], r.pat[0], 0, len));
  EXPECT_OK(ctx, ckpt_broadcast(r.comm, 0, r.buf, r.s, 0, len));
  EXPECT_OK(ctx, ckpt_stream_destroy(r.s[0]));  /* the root's operation waits for the copy */
  r.s[0] = NULL;
  EXPECT(buf_equals(r.buf[1], 0, r.pat[0], len));
  EXPECT_OK(ctx, ckpt_comm_abort(r.comm));
  r.comm = NULL;
  EXPECT_OK(ctx, ckpt_stream_create(ctx, 0, &r.s[0]));
  EXPECT_OK(ctx, ranks_close(&r));
  return 1;
}

/* Two threads broadcasting at once through one communicator and the same two streams, from
 * opposite roots, each into its own buffers: no deadlock, and each gets its bytes. */
typedef struct {
  ranks *r;
  int32_t root;
  ckpt_buf *buf[2];
  ckpt_event *ev[2];
  int ok;
} bthread;

static void *bthread_main(void *arg) {
  bthread *t = arg;
  ranks *r = t->r;
  const size_t piece = 64 << 10;
  int ok = 1;
  for (int k = 0; ok && k < 100; k++) {
    uint64_t off = (uint64_t)(k % 8) * piece;
    ok = h2d(r->s[t->root], t->buf[t->root], r->pat[t->root] + off + (size_t)k, off, piece) == CKPT_OK &&
         ckpt_broadcast(r->comm, t->root, t->buf, r->s, off, piece) == CKPT_OK;
  }
  for (int i = 0; ok && i < 2; i++) ok = ckpt_event_record(t->ev[i], r->s[i]) == CKPT_OK;
  for (int i = 0; ok && i < 2; i++) ok = ckpt_event_wait(t->ev[i], -1) == CKPT_OK;
  for (int k = 92; ok && k < 100; k++) {
    uint64_t off = (uint64_t)(k % 8) * piece;
    for (int i = 0; ok && i < 2; i++) ok = buf_equals(t->buf[i], off, r->pat[t->root] + off + (size_t)k, piece);
  }
  t->ok = ok;
  return NULL;
}

static int test_broadcast_threads(void) {
  ranks r;
  const size_t len = 1u << 20;
  int st = ranks_open(&r, 2, len);
  ckpt_ctx *ctx = r.ctx;
  EXPECT_OK(ctx, st);
  bthread t[2];
  pthread_t th[2];
  for (int j = 0; j < 2; j++) {
    t[j] = (bthread){.r = &r, .root = j};
    for (int i = 0; i < 2; i++) {
      EXPECT_OK(ctx, ckpt_buf_alloc(ctx, i, len, &t[j].buf[i]));
      EXPECT_OK(ctx, ckpt_event_create(ctx, i, &t[j].ev[i]));
    }
  }
  for (int j = 0; j < 2; j++) EXPECT(pthread_create(&th[j], NULL, bthread_main, &t[j]) == 0);
  for (int j = 0; j < 2; j++) pthread_join(th[j], NULL);
  for (int j = 0; j < 2; j++) {
    EXPECT(t[j].ok);
    for (int i = 0; i < 2; i++) {
      EXPECT_OK(ctx, ckpt_event_destroy(t[j].ev[i]));
      EXPECT_OK(ctx, ckpt_buf_free(t[j].buf[i]));
    }
  }
  EXPECT_OK(ctx, ranks_close(&r));
  return 1;
}

/* Binds a datagram socket at addr (name_len bytes of sun_path); -1 on failure. */
static int bind_dgram(const struct sockaddr_un *addr, size_t name_len) {
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  socklen_t alen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + name_len);
  if (bind(fd, (const struct sockaddr *)addr, alen) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

static int test_sd_notify(void) {
  char dir[] = "/tmp/ckpt-notify-XXXXXX";
  EXPECT(mkdtemp(dir) != NULL);
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  snprintf(addr.sun_path, sizeof addr.sun_path, "%s/notify", dir);
  int fd = bind_dgram(&addr, strlen(addr.sun_path));
  EXPECT(fd >= 0);
  char msg[64];
  EXPECT(setenv("NOTIFY_SOCKET", addr.sun_path, 1) == 0);
  EXPECT_OK(NULL, ckpt_sd_notify("READY=1"));
  ssize_t n = recv(fd, msg, sizeof msg - 1, MSG_DONTWAIT);
  EXPECT(n == 7 && memcmp(msg, "READY=1", 7) == 0);
  EXPECT_ST(NULL, ckpt_sd_notify(NULL), CKPT_EINVAL);
  EXPECT(unsetenv("NOTIFY_SOCKET") == 0);
  EXPECT_OK(NULL, ckpt_sd_notify("STATUS=unset"));
  EXPECT(recv(fd, msg, sizeof msg, MSG_DONTWAIT) < 0 && (errno == EAGAIN || errno == EWOULDBLOCK));
  EXPECT(setenv("NOTIFY_SOCKET", "relative/path", 1) == 0);
  EXPECT_ST(NULL, ckpt_sd_notify("READY=1"), CKPT_EINVAL);
  close(fd);
  unlink(addr.sun_path);
  rmdir(dir);
  EXPECT(setenv("NOTIFY_SOCKET", addr.sun_path, 1) == 0);  /* nobody listens any more */
  EXPECT_ST(NULL, ckpt_sd_notify("READY=1"), CKPT_ESYS);

  /* Abstract namespace: '@' in the variable, a leading NUL in the address. */
  char name[64];
  snprintf(name, sizeof name, "@ckpt-test-%d", (int)getpid());
  memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  memcpy(addr.sun_path, name, strlen(name));
  addr.sun_path[0] = '\0';
  fd = bind_dgram(&addr, strlen(name));
  EXPECT(fd >= 0);
  EXPECT(setenv("NOTIFY_SOCKET", name, 1) == 0);
  EXPECT_OK(NULL, ckpt_sd_notify("STOPPING=1"));
  n = recv(fd, msg, sizeof msg - 1, MSG_DONTWAIT);
  EXPECT(n == 10 && memcmp(msg, "STOPPING=1", 10) == 0);
  close(fd);
  EXPECT(unsetenv("NOTIFY_SOCKET") == 0);
  return 1;
}

static int test_peer_cred(void) {
  int fds[2];
  EXPECT(socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0);
  int32_t pid = -1;
  uint32_t uid = 12345, gid = 12345;
  EXPECT_OK(NULL, ckpt_peer_cred(fds[0], &pid, &uid, &gid));
  EXPECT(pid == (int32_t)getpid() && uid == (uint32_t)getuid() && gid == (uint32_t)getgid());
  EXPECT_ST(NULL, ckpt_peer_cred(fds[0], NULL, &uid, &gid), CKPT_EINVAL);
  gid_t mine[256];
  int count = getgroups(256, mine);
  EXPECT(count >= 0);
  uint32_t groups[256];
  int32_t n = 256;
  EXPECT_OK(NULL, ckpt_peer_groups(fds[0], groups, &n));
  EXPECT(n == count);
  for (int i = 0; i < n; i++) EXPECT(groups[i] == (uint32_t)mine[i]);
  if (count > 0) {
    n = 0;
    EXPECT_ST(NULL, ckpt_peer_groups(fds[0], groups, &n), CKPT_EINVAL);
    EXPECT(n == count); /* the count needed */
  }
  close(fds[0]);
  close(fds[1]);
  EXPECT_ST(NULL, ckpt_peer_cred(fds[0], &pid, &uid, &gid), CKPT_ESYS); /* closed */
  return 1;
}

/* ---- runner ------------------------------------------------------------------------- */

static const harness_test tests[] = {
    TEST(test_errors),        TEST(test_ctx_create),       TEST(test_ctx_options_too_small),
    TEST(test_devices),       TEST(test_range_wraps),
    TEST(test_host_alloc),    TEST(test_register),         TEST(test_copies),
    TEST(test_devices_mismatch), TEST(test_buf_hash), TEST(test_query_in_flight), TEST(test_wait_timeout),
    TEST(test_ipc),           TEST(test_ipc_dead_exporter), TEST(test_busy_ctx),
    TEST(test_nccl),          TEST(test_sd_notify),            TEST(test_peer_cred),
    TEST(test_stream_wait_event),
    TEST(test_broadcast_two), TEST(test_broadcast_three),      TEST(test_broadcast_errors),
    TEST(test_broadcast_lifetimes), TEST(test_broadcast_threads),
};

int main(void) { return RUN_TESTS(tests); }
