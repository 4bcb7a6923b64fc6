/* Tests of the UCX pulls (ckpt_ucx_*) on loopback, host backend: a server and a client worker
 * in one process. Needs UCX's libucp.so.0 (Debian: libucx0); without it only the clear
 * failure to load is checked. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

#define MiB (1024ull * 1024)

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int have_ucx = 1;

static uint32_t g_inflight; /* the next servers' max_inflight (0: the default) */
static uint32_t g_idle;     /* the next servers' idle_ms (0: the default) */

static ckpt_ucx *new_ucx(ckpt_ctx *ctx, const char *listen, uint32_t flags) {
  ckpt_ucx_options o = {.size = sizeof o, .flags = flags, .transports = "tcp", .listen = listen,
                        .max_inflight = g_inflight, .idle_ms = g_idle};
  ckpt_ucx *u = NULL;
  return ckpt_ucx_create(ctx, &o, &u) == CKPT_OK ? u : NULL;
}

/* Waits for n completions (30 s at most: the suite runs under ASan, maybe beside other load);
 * their statuses go to st[] in the order of ids[]. */
static int wait_all(ckpt_ucx *u, size_t n, const uint64_t *ids, int32_t *st) {
  for (size_t i = 0; i < n; i++) st[i] = 1;
  size_t got = 0;
  double until = now_s() + 30;
  while (got < n && now_s() < until) {
    uint64_t ops[16];
    int32_t sts[16], k = 0;
    if (ckpt_ucx_wait(u, 100, ops, sts, 16, &k) != CKPT_OK) return 0;
    for (int32_t j = 0; j < k; j++)
      for (size_t i = 0; i < n; i++)
        if (ids[i] == ops[j]) st[i] = sts[j], got++;
  }
  return got == n;
}

static void fill(uint8_t *p, size_t len, uint32_t seed) {
  for (size_t i = 0; i < len; i++) p[i] = (uint8_t)((i * 2654435761u + seed) >> 13);
}

typedef struct {
  ckpt_ctx *ctx;
  ckpt_ucx *server, *client;
  char address[80];
  uint8_t *src, *dst;
  size_t len;
  uint64_t region;
  uint8_t key[CKPT_UCX_KEY_BYTES];
} rig;

static int rig_open(rig *r, size_t len, uint32_t flags) {
  memset(r, 0, sizeof *r);
  r->ctx = new_ctx(1);
  EXPECT(r->ctx != NULL);
  r->server = new_ucx(r->ctx, "127.0.0.1:0", flags);
  EXPECT(r->server != NULL);
  r->client = new_ucx(r->ctx, NULL, 0);
  EXPECT(r->client != NULL);
  EXPECT_OK(r->ctx, ckpt_ucx_info(r->server, r->address, sizeof r->address, NULL));
  EXPECT(strncmp(r->address, "127.0.0.1:", 10) == 0 && atoi(r->address + 10) > 0);
  r->len = len;
  EXPECT_OK(r->ctx, ckpt_host_alloc(r->ctx, len, (void **)&r->src));
  EXPECT_OK(r->ctx, ckpt_host_alloc(r->ctx, len, (void **)&r->dst));
  fill(r->src, len, 7);
  memset(r->dst, 0, len);
  EXPECT_OK(r->ctx, ckpt_ucx_expose(r->server, r->src, len, &r->region, r->key));
  return 1;
}

static int rig_close(rig *r) {
  EXPECT_OK(r->ctx, ckpt_ucx_unexpose(r->server, r->region, 1000));
  EXPECT_OK(r->ctx, ckpt_ucx_destroy(r->client));
  EXPECT_OK(r->ctx, ckpt_ucx_destroy(r->server));
  EXPECT_OK(r->ctx, ckpt_host_free(r->ctx, r->src));
  EXPECT_OK(r->ctx, ckpt_host_free(r->ctx, r->dst));
  EXPECT_OK(r->ctx, ckpt_ctx_destroy(r->ctx));
  return 1;
}

/* Ranges of every size class (eager and rendezvous) land byte for byte. */
static int test_fetch(void) {
  rig r;
  if (!rig_open(&r, 64 * MiB, 0)) return 0;
  ckpt_ucx_peer *p;
  EXPECT_OK(r.ctx, ckpt_ucx_connect(r.client, r.address, &p));
  const uint64_t at[][2] = {{0, 1}, {1, 100}, {4096, 8192}, {1 * MiB, 7 * MiB + 3}, {8 * MiB, 56 * MiB}};
  uint64_t ids[5];
  int32_t st[5];
  for (int i = 0; i < 5; i++)
    EXPECT_OK(r.ctx, ckpt_ucx_fetch(p, r.region, r.key, at[i][0], at[i][1], r.dst + at[i][0], &ids[i]));
  EXPECT(wait_all(r.client, 5, ids, st));
  for (int i = 0; i < 5; i++) {
    EXPECT(st[i] == CKPT_OK);
    EXPECT(memcmp(r.dst + at[i][0], r.src + at[i][0], at[i][1]) == 0);
  }
  EXPECT(ckpt_ucx_peer_error(p, NULL, 0) == CKPT_OK);
  EXPECT_OK(r.ctx, ckpt_ucx_disconnect(p));
  return rig_close(&r);
}

/* Fetches one range on a fresh connection; its status. */
static int32_t fetch_one(rig *r, uint64_t region, const uint8_t *key, uint64_t offset, uint64_t len, ckpt_ucx_peer **out) {
  ckpt_ucx_peer *p;
  uint64_t id;
  int32_t st = 99;
  if (ckpt_ucx_connect(r->client, r->address, &p) != CKPT_OK) return 98;
  if (ckpt_ucx_fetch(p, region, key, offset, len, r->dst, &id) != CKPT_OK) return 97;
  if (!wait_all(r->client, 1, &id, &st)) return 96;
  *out = p;
  return st;
}

/* A wrong key, an unknown region and a range past the end are refused (the source says which),
 * and the source then closes that connection: a puller refused has nothing more to ask. */
static int test_refused(void) {
  rig r;
  if (!rig_open(&r, 1 * MiB, 0)) return 0;
  uint8_t bad[CKPT_UCX_KEY_BYTES];
  memcpy(bad, r.key, sizeof bad);
  bad[15] ^= 1;
  ckpt_ucx_peer *p[4];
  EXPECT(fetch_one(&r, r.region, bad, 0, 100, &p[0]) == CKPT_EHANDLE);
  EXPECT(fetch_one(&r, r.region + 99, r.key, 0, 100, &p[1]) == CKPT_EHANDLE);
  EXPECT(fetch_one(&r, r.region, r.key, r.len - 10, 11, &p[2]) == CKPT_ERANGE);
  EXPECT(memcmp(r.dst, (uint8_t[100]){0}, 100) == 0); /* the refused ones wrote nothing */
  EXPECT(fetch_one(&r, r.region, r.key, r.len - 10, 10, &p[3]) == CKPT_OK);
  EXPECT(memcmp(r.dst, r.src + r.len - 10, 10) == 0);
  /* The refused connection is closed by the source: a later fetch on it fails. */
  uint64_t id;
  int32_t st = 0;
  for (int i = 0; i < 100 && ckpt_ucx_peer_error(p[0], NULL, 0) == CKPT_OK; i++) {
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  EXPECT(ckpt_ucx_peer_error(p[0], NULL, 0) == CKPT_EUCX);
  EXPECT_OK(r.ctx, ckpt_ucx_fetch(p[0], r.region, r.key, 0, 10, r.dst, &id));
  EXPECT(wait_all(r.client, 1, &id, &st));
  EXPECT(st == CKPT_EUCX);
  EXPECT(ckpt_ucx_peer_error(p[3], NULL, 0) == CKPT_OK); /* the good one stays */
  /* The destination must be pinned memory of the context. */
  uint8_t plain[64];
  EXPECT_ST(r.ctx, ckpt_ucx_fetch(p[3], r.region, r.key, 0, sizeof plain, plain, &id), CKPT_ERANGE);
  EXPECT_ST(r.ctx, ckpt_ucx_expose(r.server, plain, sizeof plain, &id, bad), CKPT_ERANGE);
  for (int i = 0; i < 4; i++) EXPECT_OK(r.ctx, ckpt_ucx_disconnect(p[i]));
  return rig_close(&r);
}

/* A connection that asks nothing for idle_ms is closed by the source. */
static int test_idle(void) {
  g_idle = 200;
  rig r;
  int opened = rig_open(&r, 1 * MiB, 0);
  g_idle = 0;
  if (!opened) return 0;
  ckpt_ucx_peer *p;
  EXPECT(fetch_one(&r, r.region, r.key, 0, 100, &p) == CKPT_OK); /* connected and used */
  for (int i = 0; i < 300 && ckpt_ucx_peer_error(p, NULL, 0) == CKPT_OK; i++) {
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  EXPECT(ckpt_ucx_peer_error(p, NULL, 0) == CKPT_EUCX);
  EXPECT_OK(r.ctx, ckpt_ucx_disconnect(p));
  return rig_close(&r);
}

/* Connections from one host that name no region with its key are held to 32: one more is
 * refused at once; one that proves itself (a keyed request) frees its place for another. */
static int test_unproven_cap(void) {
  rig r;
  if (!rig_open(&r, 1 * MiB, 0)) return 0;
  ckpt_ucx_peer *idle[32];
  for (int i = 0; i < 32; i++) EXPECT_OK(r.ctx, ckpt_ucx_connect(r.client, r.address, &idle[i]));
  struct timespec settle = {1, 0}; /* the source has taken the 32 */
  nanosleep(&settle, NULL);
  ckpt_ucx_peer *ninth, *tenth;
  EXPECT(fetch_one(&r, r.region, r.key, 0, 100, &ninth) == CKPT_EUCX);
  EXPECT_OK(r.ctx, ckpt_ucx_disconnect(ninth));
  /* One of the 32 asks (and so proves itself); then a new connection is taken. */
  uint64_t id;
  int32_t st = 99;
  EXPECT_OK(r.ctx, ckpt_ucx_fetch(idle[0], r.region, r.key, 0, 100, r.dst, &id));
  EXPECT(wait_all(r.client, 1, &id, &st) && st == CKPT_OK);
  EXPECT(fetch_one(&r, r.region, r.key, 0, 100, &tenth) == CKPT_OK);
  EXPECT_OK(r.ctx, ckpt_ucx_disconnect(tenth));
  for (int i = 0; i < 32; i++) EXPECT_OK(r.ctx, ckpt_ucx_disconnect(idle[i]));
  return rig_close(&r);
}

/* Nobody listening: the fetches fail with CKPT_EUCX and the peer says why. */
static int test_unreachable(void) {
  rig r;
  if (!rig_open(&r, 1 * MiB, 0)) return 0;
  ckpt_ucx_peer *p;
  EXPECT_OK(r.ctx, ckpt_ucx_connect(r.client, "127.0.0.1:1", &p));
  uint64_t id;
  int32_t st;
  EXPECT_OK(r.ctx, ckpt_ucx_fetch(p, r.region, r.key, 0, 100, r.dst, &id));
  EXPECT(wait_all(r.client, 1, &id, &st));
  EXPECT(st == CKPT_EUCX);
  char why[256];
  EXPECT(ckpt_ucx_peer_error(p, why, sizeof why) == CKPT_EUCX);
  EXPECT(strstr(why, "127.0.0.1:1") != NULL);
  EXPECT_OK(r.ctx, ckpt_ucx_disconnect(p));
  EXPECT_ST(r.ctx, ckpt_ucx_connect(r.client, "nowhere", &p), CKPT_EINVAL);
  EXPECT_DETAIL(r.ctx, "not ip:port");
  return rig_close(&r);
}

/* Disconnecting with fetches in flight: each completes (OK or cancelled), none is lost. */
static int test_disconnect_in_flight(void) {
  rig r;
  if (!rig_open(&r, 64 * MiB, 0)) return 0;
  ckpt_ucx_peer *p;
  EXPECT_OK(r.ctx, ckpt_ucx_connect(r.client, r.address, &p));
  uint64_t ids[8];
  int32_t st[8];
  for (int i = 0; i < 8; i++)
    EXPECT_OK(r.ctx, ckpt_ucx_fetch(p, r.region, r.key, i * 8 * MiB, 8 * MiB, r.dst + i * 8 * MiB, &ids[i]));
  EXPECT_OK(r.ctx, ckpt_ucx_disconnect(p));
  EXPECT(wait_all(r.client, 8, ids, st));
  for (int i = 0; i < 8; i++) {
    EXPECT(st[i] == CKPT_OK || st[i] == CKPT_ECANCELED || st[i] == CKPT_EUCX);
    if (st[i] == CKPT_OK) EXPECT(memcmp(r.dst + i * 8 * MiB, r.src + i * 8 * MiB, 8 * MiB) == 0);
  }
  return rig_close(&r);
}

/* The test fault serves changed bytes: the range lands, and differs. */
static int test_fault_corrupt(void) {
  rig r;
  if (!rig_open(&r, 1 * MiB, CKPT_UCX_FAULT_CORRUPT)) return 0;
  ckpt_ucx_peer *p;
  EXPECT_OK(r.ctx, ckpt_ucx_connect(r.client, r.address, &p));
  uint64_t id;
  int32_t st;
  EXPECT_OK(r.ctx, ckpt_ucx_fetch(p, r.region, r.key, 0, r.len, r.dst, &id));
  EXPECT(wait_all(r.client, 1, &id, &st));
  EXPECT(st == CKPT_OK);
  EXPECT(memcmp(r.dst, r.src, r.len) != 0);
  EXPECT(memcmp(r.dst, r.src, r.len / 2) == 0);
  EXPECT_OK(r.ctx, ckpt_ucx_disconnect(p));
  return rig_close(&r);
}

/* Unexposing stops new requests at once; a region freed after it is never read. */
static int test_unexpose(void) {
  rig r;
  if (!rig_open(&r, 16 * MiB, 0)) return 0;
  ckpt_ucx_peer *p;
  EXPECT_OK(r.ctx, ckpt_ucx_connect(r.client, r.address, &p));
  uint64_t ids[2];
  int32_t st[2];
  EXPECT_OK(r.ctx, ckpt_ucx_fetch(p, r.region, r.key, 0, 16 * MiB, r.dst, &ids[0]));
  EXPECT(wait_all(r.client, 1, ids, st));
  EXPECT(st[0] == CKPT_OK);
  EXPECT_OK(r.ctx, ckpt_ucx_unexpose(r.server, r.region, 1000));
  EXPECT_ST(r.ctx, ckpt_ucx_unexpose(r.server, r.region, 1000), CKPT_EHANDLE);
  EXPECT_OK(r.ctx, ckpt_ucx_fetch(p, r.region, r.key, 0, 100, r.dst, &ids[1]));
  EXPECT(wait_all(r.client, 1, ids + 1, st + 1));
  EXPECT(st[1] == CKPT_EHANDLE);
  EXPECT_OK(r.ctx, ckpt_ucx_expose(r.server, r.src, r.len, &r.region, r.key)); /* for rig_close */
  EXPECT_OK(r.ctx, ckpt_ucx_disconnect(p));
  return rig_close(&r);
}

/* Unexposing while sends read the region: with no time given, their connections are cut, and
 * it returns once nothing reads it; the fetches end, failed or whole. */
static int test_unexpose_in_flight(void) {
  rig r;
  if (!rig_open(&r, 64 * MiB, 0)) return 0;
  ckpt_ucx_peer *p;
  EXPECT_OK(r.ctx, ckpt_ucx_connect(r.client, r.address, &p));
  uint64_t ids[8];
  int32_t st[8];
  for (int i = 0; i < 8; i++)
    EXPECT_OK(r.ctx, ckpt_ucx_fetch(p, r.region, r.key, i * 8 * MiB, 8 * MiB, r.dst + i * 8 * MiB, &ids[i]));
  struct timespec ts = {0, 2 * 1000 * 1000};
  nanosleep(&ts, NULL);
  EXPECT_OK(r.ctx, ckpt_ucx_unexpose(r.server, r.region, 0));
  EXPECT(wait_all(r.client, 8, ids, st));
  for (int i = 0; i < 8; i++) {
    EXPECT(st[i] == CKPT_OK || st[i] == CKPT_EHANDLE || st[i] == CKPT_EUCX);
    if (st[i] == CKPT_OK) EXPECT(memcmp(r.dst + i * 8 * MiB, r.src + i * 8 * MiB, 8 * MiB) == 0);
  }
  EXPECT_OK(r.ctx, ckpt_ucx_disconnect(p));
  EXPECT_OK(r.ctx, ckpt_ucx_expose(r.server, r.src, r.len, &r.region, r.key)); /* for rig_close */
  return rig_close(&r);
}

/* A connection asking more than max_inflight at once is cut off (a flood is not answered):
 * its fetches end failed or whole, none lost, and the peer says why. */
static int test_flood(void) {
  g_inflight = 1;
  rig r;
  int opened = rig_open(&r, 64 * MiB, 0);
  g_inflight = 0;
  if (!opened) return 0;
  ckpt_ucx_peer *p;
  EXPECT_OK(r.ctx, ckpt_ucx_connect(r.client, r.address, &p));
  uint64_t ids[16];
  int32_t st[16];
  for (int i = 0; i < 16; i++)
    EXPECT_OK(r.ctx, ckpt_ucx_fetch(p, r.region, r.key, i * 4 * MiB, 4 * MiB, r.dst + i * 4 * MiB, &ids[i]));
  EXPECT(wait_all(r.client, 16, ids, st));
  int failed = 0;
  for (int i = 0; i < 16; i++) {
    if (st[i] == CKPT_OK) EXPECT(memcmp(r.dst + i * 4 * MiB, r.src + i * 4 * MiB, 4 * MiB) == 0);
    else failed++;
  }
  EXPECT(failed > 0);
  EXPECT(ckpt_ucx_peer_error(p, NULL, 0) == CKPT_EUCX);
  EXPECT_OK(r.ctx, ckpt_ucx_disconnect(p));
  return rig_close(&r);
}

/* Throughput of one connection, for the record (not a pass condition). */
static int test_throughput(void) {
  rig r;
  if (!rig_open(&r, 256 * MiB, 0)) return 0;
  ckpt_ucx_peer *p;
  EXPECT_OK(r.ctx, ckpt_ucx_connect(r.client, r.address, &p));
  const size_t chunk = 16 * MiB, n = r.len / chunk;
  uint64_t ids[16];
  int32_t st[16];
  double t0 = now_s();
  for (size_t i = 0; i < n; i++)
    EXPECT_OK(r.ctx, ckpt_ucx_fetch(p, r.region, r.key, i * chunk, chunk, r.dst + i * chunk, &ids[i]));
  EXPECT(wait_all(r.client, n, ids, st));
  double s = now_s() - t0;
  for (size_t i = 0; i < n; i++) EXPECT(st[i] == CKPT_OK);
  EXPECT(memcmp(r.dst, r.src, r.len) == 0);
  printf("     256 MiB over UCX tcp on loopback: %.2f GB/s\n", (double)r.len / s / 1e9);
  EXPECT_OK(r.ctx, ckpt_ucx_disconnect(p));
  return rig_close(&r);
}

/* Without UCX the create fails naming the library. */
static int test_missing_library(void) {
  ckpt_ctx *ctx = new_ctx(1);
  EXPECT(ctx != NULL);
  ckpt_ucx_options o = {.size = sizeof o, .ucp_path = "libucp-not-here.so.0"};
  ckpt_ucx *u = (ckpt_ucx *)1;
  EXPECT_ST(ctx, ckpt_ucx_create(ctx, &o, &u), CKPT_EUCX);
  EXPECT(u == NULL);
  EXPECT_DETAIL(ctx, "libucp-not-here.so.0");
  o.size = 3;
  EXPECT_ST(ctx, ckpt_ucx_create(ctx, &o, &u), CKPT_EABI);
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* Loading UCX (ckpt_ucx_create) leaves the library's SIGBUS guard on: UCX installs signal
 * handlers of its own by default, which would kill the process on a read of a truncated file
 * that the guard turns into CKPT_EFAULT. In a child, so that a crash fails the test only. */
static int test_guard_survives_ucx(void) {
  pid_t pid = fork();
  EXPECT(pid >= 0);
  if (pid == 0) {
    ckpt_ctx *ctx = new_ctx(1);
    ckpt_ucx *u = ctx ? new_ucx(ctx, "127.0.0.1:0", 0) : NULL;
    char path[] = "/dev/shm/ckpt-test-ucx-guard-XXXXXX";
    int fd = mkstemp(path);
    if (u == NULL || fd < 0 || ftruncate(fd, 16384) != 0) _exit(3);
    close(fd);
    void *m = NULL;
    uint64_t len = 0;
    int mapped = ckpt_file_map(ctx, path, &m, &len) == CKPT_OK;
    int cut = truncate(path, 4096) == 0;
    unlink(path);
    if (!mapped || !cut) _exit(4);
    uint64_t r[2] = {(uint64_t)(uintptr_t)m + 8192, 4096}, h = 0;
    _exit(ckpt_hash(ctx, r, 1, &h, NULL, 1, NULL) == CKPT_EFAULT ? 0 : 5);
  }
  int status = 0;
  EXPECT(waitpid(pid, &status, 0) == pid);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    snprintf(g_msg, sizeof g_msg, "child %s %d", WIFEXITED(status) ? "exited" : "died of signal",
             WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
    return 0;
  }
  return 1;
}

static const harness_test tests[] = {
    TEST(test_missing_library), TEST(test_fetch),       TEST(test_refused),      TEST(test_unreachable),
    TEST(test_disconnect_in_flight), TEST(test_fault_corrupt), TEST(test_unexpose), TEST(test_unexpose_in_flight),
    TEST(test_flood),          TEST(test_idle),           TEST(test_unproven_cap),  TEST(test_throughput),
    TEST(test_guard_survives_ucx),
};

int main(void) {
  ckpt_ctx *ctx = new_ctx(1);
  ckpt_ucx *u = ctx ? new_ucx(ctx, NULL, 0) : NULL;
  have_ucx = u != NULL;
  if (u) ckpt_ucx_destroy(u);
  if (ctx) ckpt_ctx_destroy(ctx);
  if (!have_ucx) {
    printf("UCX (libucp.so.0) is not installed: only its absence is tested\n");
    return harness_run(tests, 1);
  }
  return RUN_TESTS(tests);
}
