/* C tests of the file and hashing functions of libckpt-host, run under AddressSanitizer and
 * UBSan by `build.sh test`. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ckpt.h"
#include "harness.h"

/* ---- helpers of this file ----------------------------------------------------------- */

/* Pseudo-random bytes, 8 at a time (fast enough for hundreds of MiB under ASan). */
static void fill(uint8_t *p, size_t len, uint64_t seed) {
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  size_t i = 0;
  for (; i + 8 <= len; i += 8) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    memcpy(p + i, &x, 8);
  }
  for (; i < len; i++) p[i] = (uint8_t)(x >> (8 * (i & 7)));
}

/* Writes len bytes of `data` to a new temporary file; its path goes to path (64 bytes). */
static int write_temp_file(char path[64], const uint8_t *data, size_t len) {
  snprintf(path, 64, "/tmp/ckpt-files-XXXXXX");
  int fd = mkstemp(path);
  if (fd < 0) return 0;
  size_t done = 0;
  while (done < len) {
    ssize_t n = write(fd, data + done, len - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += (size_t)n;
  }
  close(fd);
  if (done != len) unlink(path);
  return done == len;
}

/* The ckpt hash of one range. */
static uint64_t hash1(ckpt_ctx *ctx, const void *p, size_t len) {
  uint64_t r[2] = {(uint64_t)(uintptr_t)p, len}, h = 0;
  return ckpt_hash(ctx, r, 1, &h, NULL, 1, NULL) == CKPT_OK ? h : 0;
}

/* Plain XXH64 of at most one chunk: the range's only chunk hash. */
static uint64_t xxh1(ckpt_ctx *ctx, const void *p, size_t len) {
  uint64_t r[2] = {(uint64_t)(uintptr_t)p, len}, h = 0, chunk = 0;
  return len > 0 && len <= CKPT_HASH_CHUNK && ckpt_hash(ctx, r, 1, &h, &chunk, 1, NULL) == CKPT_OK ? chunk : 0;
}

/* ---- tests -------------------------------------------------------------------------- */

static int test_file_map(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  size_t len = (3 << 20) + 4097;
  uint8_t *data = malloc(len);
  EXPECT(data != NULL);
  fill(data, len, 1);
  char path[64];
  EXPECT(write_temp_file(path, data, len));
  void *p = NULL;
  uint64_t got_len = 0;
  EXPECT_OK(ctx, ckpt_file_map(ctx, path, &p, &got_len));
  EXPECT(p != NULL && got_len == len);
  EXPECT(unlink(path) == 0);  /* the mapping outlives the name */
  EXPECT(memcmp(p, data, len) == 0);
  EXPECT_OK(ctx, ckpt_file_unmap(ctx, p, got_len));

  /* Empty file, directory, missing path. */
  EXPECT(write_temp_file(path, data, 0));
  p = (void *)1;
  got_len = 7;
  EXPECT_ST(ctx, ckpt_file_map(ctx, path, &p, &got_len), CKPT_EINVAL);
  EXPECT(p == NULL && got_len == 0);
  EXPECT_DETAIL(ctx, path);
  EXPECT_DETAIL(ctx, "empty");
  unlink(path);
  EXPECT_ST(ctx, ckpt_file_map(ctx, "/tmp", &p, &got_len), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "/tmp is not a regular file");
  EXPECT(p == NULL);
  const char *missing = "/nonexistent/ckpt-files/model.safetensors";
  EXPECT_ST(ctx, ckpt_file_map(ctx, missing, &p, &got_len), CKPT_ESYS);
  EXPECT_DETAIL(ctx, missing);
  EXPECT_DETAIL(ctx, strerror(ENOENT));
  EXPECT(ckpt_last_error(ctx, NULL, 0) == CKPT_ESYS);

  /* Arguments. */
  EXPECT_ST(NULL, ckpt_file_map(NULL, "/tmp", &p, &got_len), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_file_map(ctx, NULL, &p, &got_len), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_file_map(ctx, "/tmp", NULL, &got_len), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_file_map(ctx, "/tmp", &p, NULL), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_file_unmap(ctx, NULL, 4096), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_file_unmap(ctx, data, 0), CKPT_EINVAL);
  EXPECT_ST(NULL, ckpt_file_unmap(NULL, data, 4096), CKPT_EINVAL);
  free(data);
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* A mapped file, registered read-only, copied to a buffer and read back. */
static int test_file_map_copy(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  size_t len = (8 << 20) + 333;
  uint8_t *data = malloc(len), *got = malloc(len);
  EXPECT(data && got);
  fill(data, len, 2);
  char path[64];
  EXPECT(write_temp_file(path, data, len));
  uint8_t *p;
  uint64_t flen;
  EXPECT_OK(ctx, ckpt_file_map(ctx, path, (void **)&p, &flen));
  unlink(path);
  EXPECT(flen == len);
  EXPECT_OK(ctx, ckpt_host_register(ctx, p, flen, CKPT_REGISTER_READONLY));
  /* Unmapping memory that is still registered would leave it pinned: refused. */
  EXPECT_ST(ctx, ckpt_file_unmap(ctx, p, flen), CKPT_EBUSY);
  EXPECT_DETAIL(ctx, "ckpt_host_unregister");
  ckpt_buf *b;
  ckpt_stream *s;
  EXPECT_OK(ctx, ckpt_buf_alloc(ctx, 0, len, &b));
  EXPECT_OK(ctx, ckpt_stream_create(ctx, 0, &s));
  const ckpt_range rg[] = {
      {(uintptr_t)p + 1000, 0, len - 1000},  /* the file from byte 1000 ... */
      {(uintptr_t)p, len - 1000, 1000},      /* ... then its first 1000 bytes */
  };
  EXPECT_OK(ctx, ckpt_h2d_async(s, b, rg, 2));
  EXPECT_OK(ctx, sync_stream(ctx, s));
  EXPECT_OK(ctx, ckpt_buf_read(b, 0, got, len));
  EXPECT(memcmp(got, data + 1000, len - 1000) == 0);
  EXPECT(memcmp(got + len - 1000, data, 1000) == 0);
  EXPECT_OK(ctx, ckpt_stream_destroy(s));
  EXPECT_OK(ctx, ckpt_buf_free(b));
  EXPECT_OK(ctx, ckpt_host_unregister(ctx, p));
  EXPECT_OK(ctx, ckpt_file_unmap(ctx, p, flen));
  free(data), free(got);
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

static int test_file_read(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  size_t len = 200u << 20;
  uint8_t *data = malloc(len), *got = malloc(len);
  EXPECT(data && got);
  fill(data, len, 3);
  char path[64];
  EXPECT(write_temp_file(path, data, len));
  memset(got, 0, len);
  EXPECT_OK(ctx, ckpt_file_read(ctx, path, 0, len, got, 4));
  EXPECT(memcmp(got, data, len) == 0);

  /* Unaligned offset and length; thread counts that are clamped. */
  const int32_t threads[] = {0, -3, 1, 3, 1000};
  for (size_t i = 0; i < sizeof threads / sizeof threads[0]; i++) {
    uint64_t off = 12345 + i, n = (130u << 20) + 7 * i;
    memset(got, 0, n + 1);
    EXPECT_OK(ctx, ckpt_file_read(ctx, path, off, n, got, threads[i]));
    EXPECT(memcmp(got, data + off, n) == 0);
    EXPECT(got[n] == 0);  /* nothing past len */
  }
  EXPECT_OK(ctx, ckpt_file_read(ctx, path, len - 10, 10, got, 8));  /* ends at the end */
  EXPECT(memcmp(got, data + len - 10, 10) == 0);
  EXPECT_OK(ctx, ckpt_file_read(ctx, path, len, 0, NULL, 4));       /* empty, at the end */

  /* Past the end: fails naming the path and sizes, reads nothing. */
  EXPECT_ST(ctx, ckpt_file_read(ctx, path, len - 10, 11, got, 4), CKPT_ESYS);
  EXPECT_DETAIL(ctx, path);
  EXPECT_DETAIL(ctx, "209715200 bytes");
  EXPECT_ST(ctx, ckpt_file_read(ctx, path, len + 1, 0, got, 4), CKPT_ESYS);
  EXPECT_ST(ctx, ckpt_file_read(ctx, path, UINT64_MAX, 2, got, 4), CKPT_ESYS);
  const char *missing = "/nonexistent/ckpt-files/shard-00001.safetensors";
  EXPECT_ST(ctx, ckpt_file_read(ctx, missing, 0, 1, got, 1), CKPT_ESYS);
  EXPECT_DETAIL(ctx, missing);
  EXPECT_DETAIL(ctx, strerror(ENOENT));
  EXPECT_ST(ctx, ckpt_file_read(ctx, "/tmp", 0, 1, got, 1), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "/tmp");
  EXPECT_ST(ctx, ckpt_file_read(ctx, path, 0, 1, NULL, 1), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_file_read(ctx, NULL, 0, 1, got, 1), CKPT_EINVAL);
  EXPECT_ST(NULL, ckpt_file_read(NULL, path, 0, 1, got, 1), CKPT_EINVAL);
  unlink(path);
  free(data), free(got);
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* ckpt_file_read_hash reads what ckpt_file_read does and hashes its ranges as ckpt_hash does. */
static int test_file_read_hash(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  size_t len = (70u << 20) + 77;
  uint8_t *data = malloc(len), *got = malloc(len + 1);
  EXPECT(data && got);
  fill(data, len, 5);
  char path[64];
  EXPECT(write_temp_file(path, data, len));
  /* Out of order, one empty, one ending at the end, gaps of every size between them. */
  const uint64_t mib = 1 << 20; /* 16 chunks: pieces read several at a time */
  uint64_t r[10] = {3 * mib + 200, 1000, 100, 3 * mib + 5, 4 * mib, 0, 4 * mib + 10, mib, 6 * mib, len - 6 * mib};
  uint64_t h[5], want[5], abs[10];
  for (int i = 0; i < 5; i++) abs[2 * i] = (uint64_t)(uintptr_t)data + r[2 * i], abs[2 * i + 1] = r[2 * i + 1];
  EXPECT_OK(ctx, ckpt_hash(ctx, abs, 5, want, NULL, 2, NULL));
  const int32_t threads[] = {1, 3, 16};
  for (int t = 0; t < 3; t++) {
    memset(got, 0, len + 1);
    memset(h, 0, sizeof h);
    EXPECT_OK(ctx, ckpt_file_read_hash(ctx, path, 0, len, got, r, 5, h, threads[t]));
    EXPECT(memcmp(got, data, len) == 0 && got[len] == 0);
    EXPECT(memcmp(h, want, sizeof h) == 0);
  }
  /* A window of the file: ranges are file offsets, dst holds the window. */
  EXPECT_OK(ctx, ckpt_file_read_hash(ctx, path, 50, 4 * mib, got, r + 2, 1, h, 4));
  EXPECT(memcmp(got, data + 50, 4 * mib) == 0 && h[0] == want[1]);
  EXPECT_OK(ctx, ckpt_file_read_hash(ctx, path, 0, 10, got, NULL, 0, NULL, 4)); /* hashes nothing */
  EXPECT(memcmp(got, data, 10) == 0);
  /* Empty ranges anywhere inside the read, even inside another range: nothing to hash. */
  uint64_t empties[8] = {200, 0, 100, 3 * mib + 5, 150, 0, 3 * mib + 105, 0};
  uint64_t he[4];
  memset(got, 0, len);
  EXPECT_OK(ctx, ckpt_file_read_hash(ctx, path, 0, len, got, empties, 4, he, 2));
  EXPECT(memcmp(got, data, len) == 0);
  EXPECT(he[1] == want[1] && he[0] == 0xEF46DB3751D8E999ull && he[2] == he[0] && he[3] == he[0]);
  /* Overlapping ranges, a range outside the window, a file too short: refused naming it. */
  uint64_t bad[4] = {100, 3 * mib, 3 * mib + 99, 10};
  EXPECT_ST(ctx, ckpt_file_read_hash(ctx, path, 0, len, got, bad, 2, h, 4), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "range 1 (10 bytes at 3145827) is overlapping another");
  EXPECT_ST(ctx, ckpt_file_read_hash(ctx, path, 200, len - 200, got, bad, 1, h, 4), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "range 0 (3145728 bytes at 100) is outside the read");
  EXPECT_ST(ctx, ckpt_file_read_hash(ctx, path, 0, len + 1, got, NULL, 0, NULL, 4), CKPT_ESYS);
  EXPECT_DETAIL(ctx, "too few");
  unlink(path);
  free(data), free(got);
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* Byte i of the vector pattern. */
static uint8_t pattern(size_t i) { return (uint8_t)(i * 131u + 7u); }

static int test_hash_vectors(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  EXPECT(hash1(ctx, "", 0) == 0xEF46DB3751D8E999ull);
  EXPECT(xxh1(ctx, "a", 1) == 0xD24EC4F1A98C6E5Bull);
  EXPECT(xxh1(ctx, "abc", 3) == 0x44BC2CF5AD770999ull);
  /* Checked against xxhash-wasm (an independent XXH64) for every length 0..200 of this
   * pattern; these cover each tail path and the 32-byte stripe boundaries. */
  static const struct {
    size_t len;
    uint64_t h;
  } v[] = {
      {0, 0xef46db3751d8e999ull},   {1, 0xa96c7f0ce858bbb7ull},   {7, 0x2744460dd675d2c0ull},
      {8, 0x994b676b71ce94ddull},   {31, 0x6711d55e306b5d8full},  {32, 0x07f7b8e3bc5d6e25ull},
      {33, 0x09f85eeb4e1cbe9full},  {63, 0xb7c9968c066cb6a5ull},  {64, 0x50d4159a0411632eull},
      {100, 0x9ddada11d3dc2d8full}, {199, 0x7f3aea62b83742f6ull},
  };
  uint8_t buf[256 + 8];
  for (size_t off = 0; off < 8; off += 3) {  /* also at unaligned addresses */
    for (size_t i = 0; i < 256; i++) buf[off + i] = pattern(i);
    for (size_t k = 0; k < sizeof v / sizeof v[0]; k++) {
      uint64_t h = v[k].len ? xxh1(ctx, buf + off, v[k].len) : hash1(ctx, buf + off, 0);
      if (h != v[k].h) {
        snprintf(g_msg, sizeof g_msg, "%s:%d: XXH64 of %zu pattern bytes at offset %zu: %016llx, expected %016llx",
                 __FILE__, __LINE__, v[k].len, off, (unsigned long long)h,
                 (unsigned long long)v[k].h);
        return 0;
      }
    }
  }
  /* An empty range may sit at address 0. */
  uint64_t r[2] = {0, 0}, h = 0;
  EXPECT_OK(ctx, ckpt_hash(ctx, r, 1, &h, NULL, 4, NULL));
  EXPECT(h == 0xEF46DB3751D8E999ull);
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

static int test_hash_many(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  size_t blen = 48u << 20, n = 1500;
  uint8_t *base = malloc(blen);
  uint64_t *r = malloc(2 * n * sizeof *r), *h1 = malloc(n * sizeof *h1), *h8 = malloc(n * sizeof *h8);
  EXPECT(base && r && h1 && h8);
  fill(base, blen, 4);
  uint64_t x = 99;
  for (size_t i = 0; i < n; i++) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    uint64_t len = i % 100 == 0 ? (x % (16u << 20)) : i % 3 == 0 ? x % 64 : x % 100000;
    uint64_t off = (x >> 20) % (blen - len + 1);
    r[2 * i] = (uint64_t)(uintptr_t)(base + off);
    r[2 * i + 1] = len;
  }
  uint64_t done = 0, total = 0;
  for (size_t i = 0; i < n; i++) total += r[2 * i + 1];
  EXPECT_OK(ctx, ckpt_hash(ctx, r, n, h1, NULL, 1, &done));
  EXPECT(done == total); /* the progress counter ends at the sum of the lengths */
  done = 0;
  EXPECT_OK(ctx, ckpt_hash(ctx, r, n, h8, NULL, 8, &done));
  EXPECT(done == total);
  const int32_t threads[] = {8, 0, -1, 2, 64, 1000};
  for (size_t t = 0; t < sizeof threads / sizeof threads[0]; t++) {
    memset(h8, 0, n * sizeof *h8);
    EXPECT_OK(ctx, ckpt_hash(ctx, r, n, h8, NULL, threads[t], NULL));
    EXPECT(memcmp(h1, h8, n * sizeof *h1) == 0);
  }
  for (size_t i = 0; i < n; i += 97)
    EXPECT(h1[i] == hash1(ctx, (const void *)(uintptr_t)r[2 * i], r[2 * i + 1]));
  /* Same bytes at different addresses hash the same; a one-bit change does not. */
  memcpy(base + 1, base + (1 << 20), 4096);
  EXPECT(hash1(ctx, base + 1, 4096) == hash1(ctx, base + (1 << 20), 4096));
  base[1 + 2000] ^= 0x10;
  EXPECT(hash1(ctx, base + 1, 4096) != hash1(ctx, base + (1 << 20), 4096));

  /* n = 0 needs no arrays; n > 0 does. Bad ranges are refused before anything is hashed. */
  EXPECT_OK(ctx, ckpt_hash(ctx, NULL, 0, NULL, NULL, 8, NULL));
  EXPECT_ST(ctx, ckpt_hash(ctx, NULL, 1, h8, NULL, 1, NULL), CKPT_EINVAL);
  EXPECT_ST(ctx, ckpt_hash(ctx, r, 1, NULL, NULL, 1, NULL), CKPT_EINVAL);
  EXPECT_ST(NULL, ckpt_hash(NULL, r, 1, h8, NULL, 1, NULL), CKPT_EINVAL);
  uint64_t bad[4] = {(uint64_t)(uintptr_t)base, 16, 0, 16};  /* range 1: NULL with a length */
  EXPECT_ST(ctx, ckpt_hash(ctx, bad, 2, h8, NULL, 1, NULL), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "range 1");
  bad[2] = UINT64_MAX - 8;  /* wraps around the address space */
  EXPECT_ST(ctx, ckpt_hash(ctx, bad, 2, h8, NULL, 2, NULL), CKPT_EINVAL);
  free(base), free(r), free(h1), free(h8);
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* A range's hash is XXH64 of its 1 MiB chunks' XXH64s, and the chunks come back in order. */
static int test_hash_chunks(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  const size_t len = 3 * CKPT_HASH_CHUNK + 12345, k = 4;
  uint8_t *base = malloc(len + 1);
  uint64_t chunks[1 + 4 + 1], want[4], h[3] = {0};
  EXPECT(base != NULL);
  fill(base, len + 1, 11);
  for (size_t c = 0; c < k; c++) {
    size_t at = c * CKPT_HASH_CHUNK, n = len - at < CKPT_HASH_CHUNK ? len - at : CKPT_HASH_CHUNK;
    want[c] = xxh1(ctx, base + 1 + at, n);
  }
  /* Three ranges: one chunk of 100 bytes, the big one (at an odd address), an empty one. */
  uint64_t r[6] = {(uint64_t)(uintptr_t)base, 100, (uint64_t)(uintptr_t)(base + 1), len, 0, 0};
  const int32_t threads[] = {1, 3, 16};
  for (size_t t = 0; t < 3; t++) {
    memset(chunks, 0, sizeof chunks);
    EXPECT_OK(ctx, ckpt_hash(ctx, r, 3, h, chunks, threads[t], NULL));
    EXPECT(chunks[0] == xxh1(ctx, base, 100));
    EXPECT(memcmp(chunks + 1, want, sizeof want) == 0);
    EXPECT(chunks[5] == 0); /* the empty range has no chunk: nothing written past the big one's */
    EXPECT(h[0] == xxh1(ctx, chunks, 8));
    EXPECT(h[1] == xxh1(ctx, want, sizeof want));
    EXPECT(h[2] == 0xEF46DB3751D8E999ull); /* XXH64 of nothing */
  }
  /* A one-bit change in the last chunk changes that chunk's hash only. */
  base[1 + len - 1] ^= 1;
  EXPECT_OK(ctx, ckpt_hash(ctx, r + 2, 1, h, chunks, 4, NULL));
  EXPECT(memcmp(chunks, want, 3 * 8) == 0 && chunks[3] != want[3]);
  free(base);
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* ---- mapped files truncated under their mapping --------------------------------------- */

/* A file of `len` pseudo-random bytes on tmpfs, mapped by the library; path gets its name. */
static uint8_t *map_shm_file(ckpt_ctx *ctx, char path[64], size_t len) {
  snprintf(path, 64, "/dev/shm/ckpt-guard-XXXXXX");
  int fd = mkstemp(path);
  if (fd < 0) return NULL;
  uint8_t *data = malloc(len);
  int ok = data != NULL;
  if (ok) fill(data, len, 7);
  ok = ok && write(fd, data, len) == (ssize_t)len;
  close(fd);
  free(data);
  void *p = NULL;
  uint64_t got = 0;
  if (ok && ckpt_file_map(ctx, path, &p, &got) == CKPT_OK && got == len) return p;
  unlink(path);
  return NULL;
}

/* ckpt_host_copy copies every range, large ones split over threads, and names a truncated source. */
static int test_host_copy(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  size_t len = (140u << 20) + 13;
  uint8_t *src = malloc(len), *dst = malloc(len + 64);
  EXPECT(src && dst);
  fill(src, len, 9);
  const int32_t threads[] = {1, 4};
  for (int t = 0; t < 2; t++) {
    memset(dst, 0, len + 64);
    /* Out of order, one empty, one of a single byte: dst gets src at the same offsets. */
    uint64_t r[12] = {(uint64_t)(uintptr_t)(dst + 1000), (uint64_t)(uintptr_t)(src + 1000), len - 1000,
                      (uint64_t)(uintptr_t)dst, (uint64_t)(uintptr_t)src, 999,
                      (uint64_t)(uintptr_t)(dst + 999), (uint64_t)(uintptr_t)(src + 999), 1,
                      0, 0, 0};
    EXPECT_OK(ctx, ckpt_host_copy(ctx, r, 4, threads[t]));
    EXPECT(memcmp(dst, src, len) == 0);
    EXPECT(dst[len] == 0); /* nothing past the ranges */
  }
  uint64_t bad[3] = {(uint64_t)(uintptr_t)dst, 0, 10};
  EXPECT_ST(ctx, ckpt_host_copy(ctx, bad, 1, 2), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "range 0");
  EXPECT_OK(ctx, ckpt_host_copy(ctx, NULL, 0, 2));
  /* A source whose file was truncated under its mapping. */
  char path[64];
  uint8_t *m = map_shm_file(ctx, path, 64 << 10);
  EXPECT(m != NULL);
  int cut = truncate(path, 4096) == 0;
  unlink(path);
  EXPECT(cut);
  uint64_t r2[6] = {(uint64_t)(uintptr_t)dst, (uint64_t)(uintptr_t)m, 4096,
                    (uint64_t)(uintptr_t)dst, (uint64_t)(uintptr_t)m + 8192, 4096};
  EXPECT_ST(ctx, ckpt_host_copy(ctx, r2, 2, 2), CKPT_EFAULT);
  EXPECT_DETAIL(ctx, "range 1");
  EXPECT_OK(ctx, ckpt_file_unmap(ctx, m, 64 << 10));
  free(src), free(dst);
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

static int test_hash_truncated(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  const size_t len = 64 << 10;
  char path[64];
  uint8_t *m = map_shm_file(ctx, path, len);
  EXPECT(m != NULL);
  uint64_t want = hash1(ctx, m, 4096);
  int cut = truncate(path, 4096) == 0;
  unlink(path); /* the mapping keeps the file; nothing stays in /dev/shm if the test fails */
  EXPECT(cut);
  /* Ranges 0 and 1 lie in the page that is left; range 2 reaches past it. */
  uint64_t r[6] = {(uint64_t)(uintptr_t)m, 4096, (uint64_t)(uintptr_t)m, 100,
                   (uint64_t)(uintptr_t)m + 4096, 8192};
  uint64_t h[3] = {0}, done = 0;
  const int32_t threads[] = {1, 3};
  for (size_t t = 0; t < 2; t++) {
    EXPECT_ST(ctx, ckpt_hash(ctx, r, 3, h, NULL, threads[t], &done), CKPT_EFAULT);
    EXPECT_DETAIL(ctx, "range 2");
    EXPECT_DETAIL(ctx, "bus error at 0x");
    EXPECT_DETAIL(ctx, "offset 0 of the range");
  }
  /* The process lives on, and so does the part of the mapping that is still the file's. */
  EXPECT_OK(ctx, ckpt_hash(ctx, r, 2, h, NULL, 2, NULL));
  EXPECT(h[0] == want);
  /* A guarded read: what is left reads, what is gone is an error naming its offset. */
  uint8_t got[8192];
  EXPECT_OK(ctx, ckpt_host_read(ctx, m + 96, got, 4000));
  EXPECT(hash1(ctx, got, 4000) == hash1(ctx, m + 96, 4000));
  EXPECT_ST(ctx, ckpt_host_read(ctx, m + 96, got, sizeof got), CKPT_EFAULT);
  EXPECT_DETAIL(ctx, "offset 4000:");
  EXPECT_OK(ctx, ckpt_host_read(ctx, NULL, NULL, 0));
  EXPECT_ST(ctx, ckpt_host_read(ctx, NULL, got, 1), CKPT_EINVAL);
  EXPECT_OK(ctx, ckpt_file_unmap(ctx, m, len));
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

static int test_copy_truncated(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  const size_t len = 64 << 10;
  char path[64];
  uint8_t *m = map_shm_file(ctx, path, len);
  EXPECT(m != NULL);
  EXPECT_OK(ctx, ckpt_host_register(ctx, m, len, CKPT_REGISTER_READONLY));
  ckpt_buf *buf;
  ckpt_stream *s, *s2;
  ckpt_event *ev, *ev2;
  EXPECT_OK(ctx, ckpt_buf_alloc(ctx, 0, len, &buf));
  EXPECT_OK(ctx, ckpt_stream_create(ctx, 0, &s));
  EXPECT_OK(ctx, ckpt_stream_create(ctx, 0, &s2));
  EXPECT_OK(ctx, ckpt_event_create(ctx, 0, &ev));
  EXPECT_OK(ctx, ckpt_event_create(ctx, 0, &ev2));
  int cut = truncate(path, 8192) == 0;
  unlink(path);
  EXPECT(cut);
  /* Range 0 is in what is left of the file; range 1 starts there and runs past its end. */
  ckpt_range r[2] = {{(uint64_t)(uintptr_t)m, 0, 4096}, {(uint64_t)(uintptr_t)m + 4096, 4096, 16384}};
  EXPECT_OK(ctx, ckpt_h2d_async(s, buf, r, 2));
  EXPECT_OK(ctx, ckpt_event_record(ev, s));
  EXPECT_ST(ctx, ckpt_event_wait(ev, 10000), CKPT_EFAULT);
  EXPECT_DETAIL(ctx, "copy of range 1 of 2");
  EXPECT_DETAIL(ctx, "offset 4096 of the range");
  /* Work ordered after it on another stream fails too, rather than looking complete. */
  EXPECT_OK(ctx, ckpt_stream_wait_event(s2, ev));
  EXPECT_OK(ctx, ckpt_event_record(ev2, s2));
  EXPECT_ST(ctx, ckpt_event_wait(ev2, 10000), CKPT_EFAULT);
  EXPECT_ST(ctx, ckpt_event_query(ev2), CKPT_EFAULT);
  uint8_t got[4096];
  EXPECT_OK(ctx, ckpt_buf_read(buf, 0, got, sizeof got));
  EXPECT(memcmp(got, m, sizeof got) == 0);
  EXPECT_OK(ctx, ckpt_event_destroy(ev2));
  EXPECT_OK(ctx, ckpt_event_destroy(ev));
  EXPECT_OK(ctx, ckpt_stream_destroy(s2));
  EXPECT_OK(ctx, ckpt_stream_destroy(s));
  EXPECT_OK(ctx, ckpt_buf_free(buf));
  EXPECT_OK(ctx, ckpt_host_unregister(ctx, m));
  EXPECT_OK(ctx, ckpt_file_unmap(ctx, m, len));
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* A buffer's memfd is sealed: an importer cannot shrink it under the copies into it. */
static int test_buffer_sealed(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  ckpt_buf *buf;
  EXPECT_OK(ctx, ckpt_buf_alloc(ctx, 0, 1 << 16, &buf));
  ckpt_ipc_handle h = {.size = sizeof h};
  EXPECT_OK(ctx, ckpt_buf_export(buf, &h));
  int fd = open((const char *)h.data, O_RDWR | O_CLOEXEC);
  EXPECT(fd >= 0);
  EXPECT(ftruncate(fd, 4096) != 0 && errno == EPERM);
  close(fd);
  EXPECT_OK(ctx, ckpt_buf_free(buf));
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* The child of test_sigbus_chains, in a fresh process: a handler of its own installed before
 * the library's, then a guarded fault (an error) and an unguarded one (its handler). */
static void chain_handler(int sig) {
  (void)sig;
  _exit(42);
}

static int chain_child(void) {
  struct sigaction sa = {.sa_handler = chain_handler};
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGBUS, &sa, NULL) != 0) return 3;
  ckpt_ctx *ctx = new_ctx(1);
  char path[64];
  uint8_t *m = ctx != NULL ? map_shm_file(ctx, path, 16384) : NULL;
  if (m == NULL) return 3;
  int truncated = truncate(path, 4096) == 0;
  unlink(path);
  if (!truncated) return 4;
  uint64_t r[2] = {(uint64_t)(uintptr_t)m + 8192, 4096}, h = 0;
  if (ckpt_hash(ctx, r, 1, &h, NULL, 1, NULL) != CKPT_EFAULT) return 5;
  volatile const uint8_t *p = m + 8192;
  return *p == 0 ? 6 : 7; /* unguarded: chain_handler exits 42 first */
}

static int test_sigbus_chains(void) {
  pid_t pid = fork();
  EXPECT(pid >= 0);
  if (pid == 0) {
    execl("/proc/self/exe", "test-files", "--chain-child", (char *)NULL);
    _exit(2);
  }
  int status = 0;
  EXPECT(waitpid(pid, &status, 0) == pid);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 42) {
    snprintf(g_msg, sizeof g_msg, "child ended with %s %d, expected exit 42",
             WIFEXITED(status) ? "exit" : "signal",
             WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
    return 0;
  }
  return 1;
}

/* ---- sparse deltas ------------------------------------------------------------------------ */

/* Differences in every lane of a word, at part boundaries and in the tail are all found, in
 * order, with both versions' values; applying the delta to the base gives next. */
static int test_delta_roundtrip(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  const uint32_t sizes[] = {1, 2, 4, 8};
  for (size_t s = 0; s < 4; s++) {
    uint32_t es = sizes[s];
    uint64_t elems = (1u << 19) + 3; /* two parts and a tail that is not a whole word */
    uint64_t len = elems * es;
    uint8_t *base = malloc(len), *next = malloc(len), *got = malloc(len);
    EXPECT(base != NULL && next != NULL && got != NULL);
    for (uint64_t i = 0; i < len; i++) base[i] = (uint8_t)(i * 31 + 7);
    memcpy(next, base, len);
    const uint64_t at[] = {0, 1, 2, 3, 4, (1u << 18) - 1, 1u << 18, 777777 % elems, elems - 2, elems - 1};
    size_t k = sizeof at / sizeof at[0];
    for (size_t i = 0; i < k; i++) next[at[i] * es + (i % es)] ^= 0x5a; /* one byte of the element */
    uint64_t count = 0, limited = 0;
    ckpt_delta *d = NULL, *none = NULL;
    EXPECT_OK(ctx, ckpt_delta_find(ctx, base, next, len, es, 4, 3, &none, &limited));
    EXPECT(limited == 5 && none == NULL); /* more than the limit: limit + 1, no delta */
    EXPECT_OK(ctx, ckpt_delta_find(ctx, base, next, len, es, elems, 3, &d, &count));
    EXPECT(count == k && d != NULL);
    EXPECT_ST(ctx, ckpt_ctx_destroy(ctx), CKPT_EBUSY); /* a live handle until taken */
    uint32_t pos[16];
    uint8_t nv[16 * 8], ov[16 * 8];
    EXPECT_OK(ctx, ckpt_delta_take(d, pos, nv, ov));
    uint64_t sorted[16];
    memcpy(sorted, at, sizeof at);
    for (size_t i = 1; i < k; i++) /* at[] is ascending but for 777777 % elems */
      for (size_t j = i; j > 0 && sorted[j - 1] > sorted[j]; j--) {
        uint64_t t = sorted[j];
        sorted[j] = sorted[j - 1], sorted[j - 1] = t;
      }
    for (size_t i = 0; i < k; i++) {
      EXPECT(pos[i] == sorted[i]);
      EXPECT(memcmp(nv + i * es, next + pos[i] * es, es) == 0);
      EXPECT(memcmp(ov + i * es, base + pos[i] * es, es) == 0);
    }
    memcpy(got, base, len);
    EXPECT_OK(ctx, ckpt_delta_apply(ctx, got, len, es, pos, nv, count));
    EXPECT(memcmp(got, next, len) == 0);
    /* and back: the old values undo it */
    EXPECT_OK(ctx, ckpt_delta_apply(ctx, got, len, es, pos, ov, count));
    EXPECT(memcmp(got, base, len) == 0);
    /* a delta not taken is freed */
    EXPECT_OK(ctx, ckpt_delta_find(ctx, base, next, len, es, elems, 1, &d, &count));
    ckpt_delta_free(d);
    free(base), free(next), free(got);
  }
  uint8_t a[8] = {0}, b[8] = {0};
  uint64_t n = 9;
  ckpt_delta *d = (ckpt_delta *)1;
  EXPECT_OK(ctx, ckpt_delta_find(ctx, a, b, 8, 2, 8, 1, &d, &n));
  EXPECT(n == 0 && d == NULL); /* nothing differs: no delta */
  EXPECT_ST(ctx, ckpt_delta_find(ctx, a, b, 8, 3, 0, 1, &d, &n), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "element size 3");
  EXPECT_ST(ctx, ckpt_delta_find(ctx, a, b, 7, 2, 0, 1, &d, &n), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "not whole 2-byte elements");
  EXPECT_ST(ctx, ckpt_delta_find(ctx, a, b, (UINT32_MAX + 2ull) * 2, 2, 0, 1, &d, &n), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "do not fit 32-bit positions");
  uint32_t past = 4;
  uint16_t v = 1;
  EXPECT_ST(ctx, ckpt_delta_apply(ctx, a, 8, 2, &past, &v, 1), CKPT_ERANGE);
  EXPECT_DETAIL(ctx, "position 4 (change 0) is past the tensor's 4 elements");
  EXPECT(memcmp(a, b, 8) == 0);
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* A version whose file was truncated under its mapping fails the delta naming the range. */
static int test_delta_truncated(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  char path[64];
  uint8_t *m = map_shm_file(ctx, path, 1 << 20);
  EXPECT(m != NULL);
  uint8_t *other = calloc(1, 1 << 20);
  EXPECT(other != NULL);
  int cut = truncate(path, 4096) == 0;
  unlink(path);
  EXPECT(cut);
  uint64_t n = 0;
  ckpt_delta *d = NULL;
  EXPECT_ST(ctx, ckpt_delta_find(ctx, other, m, 1 << 20, 2, 1 << 20, 2, &d, &n), CKPT_EFAULT);
  EXPECT_DETAIL(ctx, "of the next range: the file mapped there was truncated");
  EXPECT_ST(ctx, ckpt_delta_find(ctx, m, other, 1 << 20, 2, 1 << 20, 2, &d, &n), CKPT_EFAULT);
  EXPECT_DETAIL(ctx, "of the base range");
  EXPECT(d == NULL);
  free(other);
  EXPECT_OK(ctx, ckpt_file_unmap(ctx, m, 1 << 20));
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* ---- runner ------------------------------------------------------------------------- */

static const harness_test tests[] = {
    TEST(test_file_map),     TEST(test_file_map_copy), TEST(test_file_read),
    TEST(test_hash_vectors), TEST(test_hash_many), TEST(test_hash_chunks), TEST(test_file_read_hash), TEST(test_host_copy), TEST(test_hash_truncated),
    TEST(test_copy_truncated), TEST(test_buffer_sealed), TEST(test_sigbus_chains), TEST(test_delta_roundtrip),
    TEST(test_delta_truncated),
};

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "--chain-child") == 0) return chain_child();
  return RUN_TESTS(tests);
}
