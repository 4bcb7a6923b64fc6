/* C tests of libckpt-host's communicators spanning processes (TCP), run under AddressSanitizer
 * and UBSan by `build.sh test`. Each test forks its processes before any of them makes a
 * thread or a context; process 0 makes the id and passes it to the others through pipes.
 * alarm() in every process turns a hang into a failure. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ckpt.h"
#include "harness.h"

/* ---- helpers of this file ----------------------------------------------------------- */

/* A call fails with neither CKPT_OK nor CKPT_ETIMEDOUT (nor CKPT_EAGAIN). */
#define EXPECT_FAILS(ctx, call)                                                            \
  do {                                                                                     \
    int got_ = (call);                                                                     \
    if (got_ == CKPT_OK || got_ == CKPT_ETIMEDOUT || got_ == CKPT_EAGAIN) {                \
      snprintf(g_msg, sizeof g_msg, "%s:%d: %s gave %s, expected a failure", __FILE__,     \
               __LINE__, #call, ckpt_err_name(got_));                                      \
      return 0;                                                                            \
    }                                                                                      \
  } while (0)

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void fill(uint8_t *p, size_t len, uint32_t seed) {
  uint32_t x = seed * 2654435761u + 1;
  for (size_t i = 0; i < len; i++) {
    x ^= x << 13, x ^= x >> 17, x ^= x << 5;
    p[i] = (uint8_t)x;
  }
}

#define MAX_PROCS 4
#define MAX_RANKS 4

/* One process of a test: its ranks first_rank .. first_rank+ndev-1 of nranks, a buffer,
 * stream and event per local rank, and the pattern of every global rank (pinned). */
typedef struct proc {
  int idx, nprocs;
  int32_t nranks, first_rank, ndev;
  size_t len;
  uint8_t id[CKPT_COMM_ID_BYTES];
  ckpt_ctx *ctx;
  ckpt_comm *comm;
  ckpt_buf *buf[MAX_RANKS];
  ckpt_stream *s[MAX_RANKS];
  ckpt_event *ev[MAX_RANKS];
  uint8_t *pat[MAX_RANKS];  /* pat[r]: fill(seed 100 + r), len bytes */
} proc;

typedef struct spec {
  int nprocs;
  int32_t ndev[MAX_PROCS];  /* local ranks of each process, in rank order */
  size_t len;
  int timeout_s;
  int (*fn)(proc *p);
} spec;

static int proc_open(proc *p) {
  ckpt_ctx_options o = {.size = sizeof o, .abi_version = CKPT_ABI_VERSION, .host_devices = p->ndev};
  EXPECT_OK(NULL, ckpt_ctx_create(&o, &p->ctx));
  ckpt_ctx *ctx = p->ctx;
  for (int32_t r = 0; r < p->nranks; r++) {
    EXPECT_OK(ctx, ckpt_host_alloc(ctx, p->len, (void **)&p->pat[r]));
    fill(p->pat[r], p->len, 100 + (uint32_t)r);
  }
  for (int32_t i = 0; i < p->ndev; i++) {
    EXPECT_OK(ctx, ckpt_buf_alloc(ctx, i, p->len, &p->buf[i]));
    EXPECT_OK(ctx, ckpt_stream_create(ctx, i, &p->s[i]));
    EXPECT_OK(ctx, ckpt_event_create(ctx, i, &p->ev[i]));
  }
  return 1;
}

static int proc_close(proc *p) {
  ckpt_ctx *ctx = p->ctx;
  if (ctx == NULL) return 1;
  if (p->comm != NULL) EXPECT_OK(ctx, ckpt_comm_destroy(p->comm));
  p->comm = NULL;
  for (int32_t i = 0; i < p->ndev; i++) {
    if (p->ev[i]) EXPECT_OK(ctx, ckpt_event_destroy(p->ev[i]));
    if (p->s[i]) EXPECT_OK(ctx, ckpt_stream_destroy(p->s[i]));
    if (p->buf[i]) EXPECT_OK(ctx, ckpt_buf_free(p->buf[i]));
    p->ev[i] = NULL, p->s[i] = NULL, p->buf[i] = NULL;
  }
  for (int32_t r = 0; r < p->nranks; r++)
    if (p->pat[r]) EXPECT_OK(ctx, ckpt_host_free(ctx, p->pat[r]));
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  p->ctx = NULL;
  return 1;
}

static int proc_join(proc *p) {
  int32_t devs[MAX_RANKS] = {0, 1, 2, 3};
  EXPECT_OK(p->ctx, ckpt_comm_init(p->ctx, p->id, p->nranks, p->first_rank, p->ndev, devs, -1, &p->comm));
  EXPECT(p->comm != NULL);
  return 1;
}

static int h2d(proc *p, int32_t i, const uint8_t *src, uint64_t off, size_t len) {
  ckpt_range r = {.host = (uint64_t)(uintptr_t)src, .offset = off, .len = len};
  return ckpt_h2d_async(p->s[i], p->buf[i], &r, 1);
}

/* Records an event on every local stream and waits for each. */
static int proc_sync(proc *p) {
  for (int32_t i = 0; i < p->ndev; i++) {
    int st = ckpt_event_record(p->ev[i], p->s[i]);
    if (st != CKPT_OK) return st;
  }
  for (int32_t i = 0; i < p->ndev; i++) {
    int st = ckpt_event_wait(p->ev[i], 30000);
    if (st != CKPT_OK) return st;
  }
  return CKPT_OK;
}

/* Every local rank's buffer gets its own rank's pattern. */
static int proc_fill(proc *p) {
  for (int32_t i = 0; i < p->ndev; i++) {
    int st = h2d(p, i, p->pat[p->first_rank + i], 0, p->len);
    if (st != CKPT_OK) return st;
  }
  return proc_sync(p);
}

static int buf_equals(ckpt_buf *b, uint64_t off, const uint8_t *want, size_t len) {
  uint8_t *got = malloc(len ? len : 1);
  int ok = got != NULL && ckpt_buf_read(b, off, got, len) == CKPT_OK && memcmp(got, want, len) == 0;
  free(got);
  return ok;
}

static int broadcast(proc *p, int32_t root, uint64_t off, uint64_t len) {
  return ckpt_broadcast(p->comm, root, p->buf, p->s, off, len);
}

/* The child's whole life: context, id, the test, cleanup; writes g_msg to `report` on failure. */
static void child(const spec *sp, int idx, int id_pipes[MAX_PROCS][2], int report) {
  alarm((unsigned)sp->timeout_s);
  proc p = {.idx = idx, .nprocs = sp->nprocs, .ndev = sp->ndev[idx], .len = sp->len};
  for (int i = 0; i < sp->nprocs; i++) {
    if (i < idx) p.first_rank += sp->ndev[i];
    p.nranks += sp->ndev[i];
  }
  int ok = proc_open(&p);
  if (ok && idx == 0) {
    int st = ckpt_comm_id_new(p.ctx, p.id);
    if (st != CKPT_OK) {
      snprintf(g_msg, sizeof g_msg, "ckpt_comm_id_new: %s", ckpt_err_name(st));
      ok = 0;
    }
    for (int i = 1; i < sp->nprocs; i++)  /* an id of zeros when id_new failed */
      if (write(id_pipes[i][1], p.id, sizeof p.id) != (ssize_t)sizeof p.id) ok = 0;
  } else if (idx > 0) {
    ok = read(id_pipes[idx][0], p.id, sizeof p.id) == (ssize_t)sizeof p.id && ok;
    if (!ok && g_msg[0] == '\0') snprintf(g_msg, sizeof g_msg, "no id from process 0");
  }
  if (ok) ok = sp->fn(&p);
  if (!ok) {
    char keep[sizeof g_msg];
    memcpy(keep, g_msg, sizeof keep);
    (void)proc_close(&p);  /* best effort; keeps the first failure */
    memcpy(g_msg, keep, sizeof keep);
  } else {
    ok = proc_close(&p);
  }
  if (!ok) {
    size_t n = strlen(g_msg);
    if (write(report, g_msg, n) != (ssize_t)n) _exit(3);
  }
  exit(ok ? 0 : 1);
}

/* Runs the spec's processes; 1 if every one exited 0. */
static int run_procs(const spec *sp) {
  int id_pipes[MAX_PROCS][2], reports[MAX_PROCS][2];
  pid_t pids[MAX_PROCS];
  for (int i = 0; i < sp->nprocs; i++) {
    EXPECT(pipe(id_pipes[i]) == 0);
    EXPECT(pipe(reports[i]) == 0);
  }
  fflush(stdout);
  fflush(stderr);
  for (int i = 0; i < sp->nprocs; i++) {
    pids[i] = fork();
    EXPECT(pids[i] >= 0);
    if (pids[i] == 0) {
      for (int j = 0; j < sp->nprocs; j++) {
        if (j != i) close(reports[j][1]);
        close(reports[j][0]);
      }
      child(sp, i, id_pipes, reports[i][1]);
    }
  }
  for (int i = 0; i < sp->nprocs; i++) {
    close(id_pipes[i][0]);
    close(id_pipes[i][1]);
    close(reports[i][1]);
  }
  int ok = 1;
  for (int i = 0; i < sp->nprocs; i++) {
    int status = 0;
    pid_t w;
    while ((w = waitpid(pids[i], &status, 0)) < 0 && errno == EINTR) {
    }
    char msg[sizeof g_msg - 64] = "";
    ssize_t n = read(reports[i][0], msg, sizeof msg - 1);
    msg[n > 0 ? n : 0] = '\0';
    close(reports[i][0]);
    if (w != pids[i] || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      if (ok) {
        if (w == pids[i] && WIFSIGNALED(status))
          snprintf(g_msg, sizeof g_msg, "process %d killed by signal %d%s", i, WTERMSIG(status),
                   WTERMSIG(status) == SIGALRM ? " (hung past its alarm)" : "");
        else
          snprintf(g_msg, sizeof g_msg, "process %d: %s", i, msg[0] ? msg : "failed");
      }
      ok = 0;
    }
  }
  return ok;
}

/* ---- the processes' sides ----------------------------------------------------------- */

/* (a) 2 processes, 1 device each: 64 MiB from rank 0, then from rank 1, in stream order. */
static int two_fn(proc *p) {
  ckpt_ctx *ctx = p->ctx;
  const size_t len = p->len;
  EXPECT(proc_join(p));
  EXPECT_OK(ctx, proc_fill(p));
  /* The root's earlier work is what is sent: it rewrites its buffer with pattern 1 a few
   * times, then pattern 0. Work queued after the broadcast on the root may overwrite it. */
  if (p->first_rank == 0) {
    for (int k = 0; k < 4; k++) EXPECT_OK(ctx, h2d(p, 0, p->pat[1], 0, len));
    EXPECT_OK(ctx, h2d(p, 0, p->pat[0], 0, len));
  }
  EXPECT_OK(ctx, broadcast(p, 0, 0, len));
  if (p->first_rank == 0) EXPECT_OK(ctx, h2d(p, 0, p->pat[1], 0, len));
  else EXPECT_OK(ctx, h2d(p, 0, p->pat[1], 0, 4096));  /* lands over the broadcast's bytes */
  EXPECT_OK(ctx, proc_sync(p));
  if (p->first_rank == 0) {
    EXPECT(buf_equals(p->buf[0], 0, p->pat[1], len));
  } else {
    EXPECT(buf_equals(p->buf[0], 0, p->pat[1], 4096));
    EXPECT(buf_equals(p->buf[0], 4096, p->pat[0] + 4096, len - 4096));
  }
  /* From rank 1, right behind the copy into the root on the same stream. */
  if (p->first_rank == 1) EXPECT_OK(ctx, h2d(p, 0, p->pat[1], 0, len));
  EXPECT_OK(ctx, broadcast(p, 1, 0, len));
  EXPECT_OK(ctx, proc_sync(p));
  EXPECT(buf_equals(p->buf[0], 0, p->pat[1], len));
  EXPECT_OK(ctx, ckpt_event_query(p->ev[0]));
  return 1;
}

/* The bytes of local rank i after a broadcast of [off, off+n) from `root` over buffers that
 * each held their own rank's pattern. */
static int check_range(proc *p, int32_t i, int32_t root, uint64_t off, uint64_t n) {
  const uint8_t *own = p->pat[p->first_rank + i];
  return buf_equals(p->buf[i], 0, own, off) && buf_equals(p->buf[i], off, p->pat[root] + off, n) &&
         buf_equals(p->buf[i], off + n, own + off + n, p->len - off - n);
}

/* (b) 3 processes, ranks 0 | 1,2 | 3: roots 0, 2, 3, whole and subranges. */
static int three_fn(proc *p) {
  ckpt_ctx *ctx = p->ctx;
  EXPECT(proc_join(p));
  const int32_t roots[3] = {0, 2, 3};
  for (int k = 0; k < 3; k++) {
    int32_t root = roots[k];
    EXPECT_OK(ctx, proc_fill(p));
    EXPECT_OK(ctx, broadcast(p, root, 0, p->len));
    EXPECT_OK(ctx, proc_sync(p));
    for (int32_t i = 0; i < p->ndev; i++) EXPECT(buf_equals(p->buf[i], 0, p->pat[root], p->len));
    EXPECT_OK(ctx, proc_fill(p));
    const uint64_t off = 4096 + 13 * (uint64_t)root, n = (1u << 20) + 7 * (uint64_t)k;
    EXPECT_OK(ctx, broadcast(p, root, off, n));
    EXPECT_OK(ctx, proc_sync(p));
    for (int32_t i = 0; i < p->ndev; i++) EXPECT(check_range(p, i, root, off, n));
    /* The very last byte. */
    EXPECT_OK(ctx, proc_fill(p));
    EXPECT_OK(ctx, broadcast(p, root, p->len - 1, 1));
    EXPECT_OK(ctx, broadcast(p, root, p->len, 0));  /* nothing */
    EXPECT_OK(ctx, proc_sync(p));
    for (int32_t i = 0; i < p->ndev; i++) EXPECT(check_range(p, i, root, p->len - 1, 1));
  }
  return 1;
}

/* (c) 50 small broadcasts in a row, alternating roots, each over a piece that a later one's
 * root rewrites first, with no waiting in between. */
static int many_fn(proc *p) {
  ckpt_ctx *ctx = p->ctx;
  EXPECT(proc_join(p));
  EXPECT_OK(ctx, proc_fill(p));
  const int count = 50, pieces = 7;
  const size_t piece = 4099;
  for (int k = 0; k < count; k++) {
    int32_t root = k % p->nranks;
    uint64_t off = (uint64_t)(k % pieces) * piece;
    int32_t li = root - p->first_rank;
    if (li >= 0 && li < p->ndev) EXPECT_OK(ctx, h2d(p, li, p->pat[root] + off + k, off, piece));
    EXPECT_OK(ctx, broadcast(p, root, off, piece));
  }
  EXPECT_OK(ctx, proc_sync(p));
  for (int k = count - pieces; k < count; k++) {  /* the last broadcast over each piece */
    uint64_t off = (uint64_t)(k % pieces) * piece;
    for (int32_t i = 0; i < p->ndev; i++)
      EXPECT(buf_equals(p->buf[i], off, p->pat[k % p->nranks] + off + k, piece));
  }
  return 1;
}

/* The survivor's side of a failure: the event recorded after the broadcast completes with an
 * error within a few seconds; later broadcasts fail at once; the communicator is freed. */
static int expect_failed(proc *p, const char *needle) {
  ckpt_ctx *ctx = p->ctx;
  double t0 = now_s();
  EXPECT_FAILS(ctx, ckpt_event_wait(p->ev[0], 10000));
  EXPECT(now_s() - t0 < 5.0);
  EXPECT_DETAIL(ctx, needle);
  EXPECT_FAILS(ctx, ckpt_event_query(p->ev[0]));
  EXPECT_FAILS(ctx, broadcast(p, 0, 0, 16));
  EXPECT_DETAIL(ctx, "communicator failed");
  /* The stream stays failed: an event recorded on it later reports the failure too. */
  EXPECT_OK(ctx, ckpt_event_record(p->ev[0], p->s[0]));
  EXPECT_FAILS(ctx, ckpt_event_wait(p->ev[0], 10000));
  t0 = now_s();
  EXPECT_OK(ctx, ckpt_comm_destroy(p->comm));
  p->comm = NULL;
  EXPECT(now_s() - t0 < 2.0);
  return 1;
}

/* (d1) Process 1 exits abruptly while process 0 waits for its broadcast. */
static int exit_recv_fn(proc *p) {
  ckpt_ctx *ctx = p->ctx;
  EXPECT(proc_join(p));
  if (p->idx == 1) {
    usleep(200 * 1000);
    _exit(0);  /* as if it crashed: no cleanup */
  }
  EXPECT_OK(ctx, broadcast(p, 1, 0, p->len));
  EXPECT_OK(ctx, ckpt_event_record(p->ev[0], p->s[0]));
  return expect_failed(p, "closed");
}

/* (d2) Process 1 exits while process 0 is sending it 64 MiB. */
static int exit_send_fn(proc *p) {
  ckpt_ctx *ctx = p->ctx;
  EXPECT(proc_join(p));
  if (p->idx == 1) {
    usleep(300 * 1000);
    _exit(0);
  }
  EXPECT_OK(ctx, broadcast(p, 0, 0, p->len));
  EXPECT_OK(ctx, ckpt_event_record(p->ev[0], p->s[0]));
  return expect_failed(p, "sending to ranks 1..1");
}

/* (d3) Process 0 aborts while waiting for a broadcast that process 1 never queues. */
static int abort_fn(proc *p) {
  ckpt_ctx *ctx = p->ctx;
  EXPECT(proc_join(p));
  if (p->idx == 1) {
    usleep(1500 * 1000);
    return 1;  /* proc_close destroys its communicator: nothing is queued on it */
  }
  EXPECT_OK(ctx, broadcast(p, 1, 0, p->len));
  EXPECT_OK(ctx, ckpt_event_record(p->ev[0], p->s[0]));
  usleep(200 * 1000);
  EXPECT_ST(ctx, ckpt_event_query(p->ev[0]), CKPT_EAGAIN);
  double t0 = now_s();
  EXPECT_OK(ctx, ckpt_comm_abort(p->comm));
  p->comm = NULL;
  EXPECT(now_s() - t0 < 1.0);
  EXPECT_FAILS(ctx, ckpt_event_wait(p->ev[0], 5000));
  EXPECT_DETAIL(ctx, "aborted");
  return 1;
}

/* (e) Processes disagreeing on nranks: both inits fail, with nothing left behind. */
static int mismatch_fn(proc *p) {
  ckpt_ctx *ctx = p->ctx;
  const int32_t devs[1] = {0};
  ckpt_comm *c = (ckpt_comm *)p;  /* must be overwritten with NULL */
  int32_t nranks = p->idx == 0 ? 2 : 3;
  EXPECT_ST(ctx, ckpt_comm_init(ctx, p->id, nranks, p->idx, 1, devs, -1, &c), CKPT_EINVAL);
  EXPECT(c == NULL);
  EXPECT_DETAIL(ctx, "nranks mismatch");
  return 1;
}

/* (e) Two processes claiming rank 0. */
static int overlap_fn(proc *p) {
  ckpt_ctx *ctx = p->ctx;
  const int32_t devs[1] = {0};
  ckpt_comm *c = NULL;
  EXPECT_ST(ctx, ckpt_comm_init(ctx, p->id, 2, 0, 1, devs, -1, &c), CKPT_EINVAL);
  EXPECT(c == NULL);
  EXPECT_DETAIL(ctx, "ranks overlap");
  return 1;
}

/* The processes disagree on a broadcast's length: the receiver fails with CKPT_EINVAL
 * instead of writing anything; the sender's part went into the socket and completes. */
static int seq_mismatch_fn(proc *p) {
  ckpt_ctx *ctx = p->ctx;
  EXPECT(proc_join(p));
  EXPECT_OK(ctx, proc_fill(p));
  EXPECT_OK(ctx, broadcast(p, 0, 0, p->idx == 0 ? 4096 : 8192));
  EXPECT_OK(ctx, ckpt_event_record(p->ev[0], p->s[0]));
  if (p->idx == 0) {
    EXPECT_OK(ctx, ckpt_event_wait(p->ev[0], 10000));
    return 1;
  }
  EXPECT_ST(ctx, ckpt_event_wait(p->ev[0], 10000), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "collective sequence mismatch");
  EXPECT(buf_equals(p->buf[0], 0, p->pat[1], p->len));  /* untouched */
  EXPECT_ST(ctx, broadcast(p, 0, 0, 16), CKPT_EINVAL);
  return 1;
}

/* Destroying the communicator right after queuing: it waits, and the bytes arrive. */
static int destroy_fn(proc *p) {
  ckpt_ctx *ctx = p->ctx;
  EXPECT(proc_join(p));
  EXPECT_OK(ctx, proc_fill(p));
  EXPECT_OK(ctx, broadcast(p, 1, 0, p->len));
  EXPECT_OK(ctx, ckpt_comm_destroy(p->comm));
  p->comm = NULL;
  EXPECT_OK(ctx, proc_sync(p));
  EXPECT(buf_equals(p->buf[0], 0, p->pat[1], p->len));
  return 1;
}

/* (f) Loopback throughput of a 256 MiB broadcast, as the receiver sees it. */
static int throughput_fn(proc *p) {
  ckpt_ctx *ctx = p->ctx;
  EXPECT(proc_join(p));
  EXPECT_OK(ctx, proc_fill(p));
  double best = 0;
  for (int k = 0; k < 3; k++) {
    EXPECT_OK(ctx, broadcast(p, 0, 0, 4096));  /* roughly lines the two processes up */
    EXPECT_OK(ctx, proc_sync(p));
    double t0 = now_s();
    EXPECT_OK(ctx, broadcast(p, 0, 0, p->len));
    EXPECT_OK(ctx, proc_sync(p));
    double dt = now_s() - t0, gbs = (double)p->len / dt / 1e9;
    if (gbs > best) best = gbs;
  }
  EXPECT(buf_equals(p->buf[0], 0, p->pat[0], p->len));
  if (p->idx == 1) {
    printf("# loopback broadcast of %zu MiB between 2 processes: %.2f GB/s (best of 3)\n",
           p->len >> 20, best);
    fflush(stdout);
  }
  return 1;
}

/* ---- tests -------------------------------------------------------------------------- */

static int test_two_procs(void) {
  spec sp = {.nprocs = 2, .ndev = {1, 1}, .len = 64u << 20, .timeout_s = 60, .fn = two_fn};
  return run_procs(&sp);
}

static int test_three_procs(void) {
  spec sp = {.nprocs = 3, .ndev = {1, 2, 1}, .len = (3u << 20) + 5, .timeout_s = 60, .fn = three_fn};
  return run_procs(&sp);
}

static int test_ordering(void) {
  spec sp = {.nprocs = 3, .ndev = {1, 2, 1}, .len = 1u << 20, .timeout_s = 60, .fn = many_fn};
  return run_procs(&sp);
}

static int test_peer_exit_recv(void) {
  spec sp = {.nprocs = 2, .ndev = {1, 1}, .len = 1u << 20, .timeout_s = 30, .fn = exit_recv_fn};
  return run_procs(&sp);
}

static int test_peer_exit_send(void) {
  spec sp = {.nprocs = 2, .ndev = {1, 1}, .len = 64u << 20, .timeout_s = 30, .fn = exit_send_fn};
  return run_procs(&sp);
}

static int test_abort(void) {
  spec sp = {.nprocs = 2, .ndev = {1, 1}, .len = 1u << 20, .timeout_s = 30, .fn = abort_fn};
  return run_procs(&sp);
}

static int test_nranks_mismatch(void) {
  spec sp = {.nprocs = 2, .ndev = {1, 1}, .len = 4096, .timeout_s = 30, .fn = mismatch_fn};
  return run_procs(&sp);
}

static int test_ranks_overlap(void) {
  spec sp = {.nprocs = 2, .ndev = {1, 1}, .len = 4096, .timeout_s = 30, .fn = overlap_fn};
  return run_procs(&sp);
}

static int test_seq_mismatch(void) {
  spec sp = {.nprocs = 2, .ndev = {1, 1}, .len = 1u << 20, .timeout_s = 30, .fn = seq_mismatch_fn};
  return run_procs(&sp);
}

static int test_destroy_waits(void) {
  spec sp = {.nprocs = 2, .ndev = {1, 1}, .len = 32u << 20, .timeout_s = 60, .fn = destroy_fn};
  return run_procs(&sp);
}

static int test_throughput(void) {
  spec sp = {.nprocs = 2, .ndev = {1, 1}, .len = 256u << 20, .timeout_s = 120, .fn = throughput_fn};
  return run_procs(&sp);
}

/* In one process: ids, and ids that name no bootstrap. */
static int test_ids(void) {
  ckpt_ctx_options o = {.size = sizeof o, .abi_version = CKPT_ABI_VERSION, .host_devices = 2};
  ckpt_ctx *ctx = NULL;
  EXPECT_OK(NULL, ckpt_ctx_create(&o, &ctx));
  uint8_t id[CKPT_COMM_ID_BYTES], id2[CKPT_COMM_ID_BYTES], zero[CKPT_COMM_ID_BYTES] = {0};
  EXPECT_OK(ctx, ckpt_comm_id_new(ctx, id));
  EXPECT_OK(ctx, ckpt_comm_id_new(ctx, id2));
  EXPECT(memcmp(id, id2, sizeof id) != 0 && memcmp(id, zero, sizeof id) != 0);
  const int32_t d01[2] = {0, 1};
  ckpt_comm *c = NULL;
  EXPECT_ST(ctx, ckpt_comm_init(ctx, zero, 3, 0, 2, d01, -1, &c), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "not made by the host backend");
  /* Local-only communicators take any id (and stop the id's bootstrap). */
  EXPECT_OK(ctx, ckpt_comm_init(ctx, id, 2, 0, 2, d01, -1, &c));
  EXPECT_OK(ctx, ckpt_comm_destroy(c));
  EXPECT_OK(ctx, ckpt_comm_init(ctx, id2, 2, 0, 2, d01, -1, &c));
  EXPECT_OK(ctx, ckpt_comm_destroy(c));
  /* A rank that never joins: the wait ends at the limit, with nothing left behind. */
  uint8_t lonely[CKPT_COMM_ID_BYTES];
  EXPECT_OK(ctx, ckpt_comm_id_new(ctx, lonely));
  double t0 = now_s();
  EXPECT_ST(ctx, ckpt_comm_init(ctx, lonely, 2, 0, 1, d01, 300, &c), CKPT_ETIMEDOUT);
  double waited = now_s() - t0;
  EXPECT(waited >= 0.25 && waited < 3.0);
  EXPECT_DETAIL(ctx, "not all 2 ranks joined");
  EXPECT(c == NULL);
  setenv("CKPT_HOST_COMM_ADDR", "not-an-address", 1);
  EXPECT_ST(ctx, ckpt_comm_id_new(ctx, id), CKPT_EINVAL);
  EXPECT_DETAIL(ctx, "CKPT_HOST_COMM_ADDR");
  unsetenv("CKPT_HOST_COMM_ADDR");
  EXPECT_OK(ctx, ckpt_ctx_destroy(ctx));
  return 1;
}

/* ---- runner ------------------------------------------------------------------------- */

static const harness_test tests[] = {
    TEST(test_two_procs),      TEST(test_three_procs),     TEST(test_ordering),
    TEST(test_peer_exit_recv), TEST(test_peer_exit_send),  TEST(test_abort),
    TEST(test_nranks_mismatch), TEST(test_ranks_overlap),  TEST(test_seq_mismatch),
    TEST(test_destroy_waits),
    TEST(test_throughput),
    TEST(test_ids),  /* last: it makes threads in this process, which forks the others */
};

int main(void) { return RUN_TESTS(tests); }
