/* The host backend's communicators (see host.c for the backend as a whole): broadcasts
 * between the streams of one process, and between processes over the connections that
 * host_boot.c sets up, served by one thread per communicator. Work reaches the streams
 * through host.h's stream API only. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "host.h"
#include "host_boot.h"
#include "host_net.h"

#define MAX_LOCAL_RANKS 64  /* distinct devices of one context: at most host_devices (<= 64) */
#define COLL_MAGIC 0x35485443u          /* see host_boot.c for the other messages */
#define SEND_CHUNK ((uint64_t)4 << 20)  /* a root sends to its peers in turn, this much each */

typedef struct coll_header {  /* sent before each broadcast's payload, to every other process */
  uint32_t magic;
  int32_t root;
  uint64_t seq, offset, len;
} coll_header;

typedef struct remote_bcast remote_bcast;

/* A communicator. When its ranks are all local (remote == 0), broadcasts copy between the
 * ranks' streams, and ckpt_comm_destroy waits until no broadcast it queued is in flight
 * (inflight == 0). Otherwise broadcasts go through an ordered queue served by `thread`,
 * which talks to the other processes over `peers`. */
struct ckpt_comm {
  ckpt_ctx *ctx;
  int32_t nranks;
  pthread_mutex_t mu;  /* guards inflight, and for remote: the queue, stop, err_*, next_seq */
  pthread_cond_t cv;   /* broadcast when inflight drops, or work is queued or stop is set */
  int64_t inflight;    /* broadcasts queued whose root operation has not finished */
  int remote;          /* the communicator spans processes */
  int32_t first_rank;  /* global rank of local rank 0 */
  int32_t npeers;
  comm_peer *peers;
  pthread_t thread;
  remote_bcast *head, *tail; /* queued collectives, in call order */
  int stop;            /* ckpt_comm_destroy or abort: the thread exits once the queue is empty */
  int aborting;        /* atomic: ckpt_comm_abort; queued collectives fail without running */
  int err_status;      /* sticky: the first failure; later collectives fail fast */
  char err_detail[320];
  uint64_t next_seq;   /* sequence number of the next collective queued */
  int32_t ndev;
  int32_t devices[];
};

/* A broadcast queues operations on several streams. Pushing all of one broadcast's under this
 * lock gives every stream the same order of broadcasts, so that two broadcasts queued at once
 * from different threads cannot wait for each other in a cycle. */
static pthread_mutex_t bcast_enqueue_mu = PTHREAD_MUTEX_INITIALIZER;

/* Allocates n stream operations of `size` bytes each: everything a broadcast queues is
 * allocated before anything is queued, so that a failure queues nothing. 0 if out of memory,
 * with nothing left allocated. */
static int ops_alloc(stream_op **ops, int32_t n, size_t size) {
  int32_t i = 0;
  while (i < n && (ops[i] = malloc(size)) != NULL) i++;
  if (i == n) return 1;
  while (i > 0) free(ops[--i]);
  return 0;
}

/* ---- broadcasts within one process ------------------------------------------------------ */
/* One broadcast in flight, shared by the root stream's operation and each destination's.
 * The root operation frees it: it is the last to use it, as it waits for every copy. */
typedef struct local_bcast {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int root_reached;     /* the root stream got to the broadcast: its earlier work is done */
  int32_t copies_left;  /* destination copies not finished yet */
  ckpt_comm *comm;
  const uint8_t *src;   /* the root buffer's bytes at the broadcast's offset */
  uint64_t offset, len;
} local_bcast;

/* The operation on one rank's stream: run_local_root on the root's, run_local_copy on the
 * others'. */
typedef struct local_bcast_op {
  stream_op op;
  local_bcast *b;
  uint8_t *dst;         /* the rank's buffer */
} local_bcast_op;

static void comm_op_done(ckpt_comm *c) {
  pthread_mutex_lock(&c->mu);
  c->inflight--;
  pthread_cond_broadcast(&c->cv);
  pthread_mutex_unlock(&c->mu);  /* after this the communicator may be destroyed */
}

/* The root's side: earlier work on the root stream is done, so the destinations may copy;
 * later work on it waits until they have (as NCCL's root does until its sends are done), so
 * that it may overwrite the root buffer and an event recorded after it means completion. */
static void run_local_root(stream_op *op) {
  local_bcast *b = ((local_bcast_op *)op)->b;
  pthread_mutex_lock(&b->mu);
  b->root_reached = 1;
  pthread_cond_broadcast(&b->cv);
  while (b->copies_left > 0) pthread_cond_wait(&b->cv, &b->mu);
  pthread_mutex_unlock(&b->mu);
  ckpt_comm *c = b->comm;
  pthread_cond_destroy(&b->cv);
  pthread_mutex_destroy(&b->mu);
  free(b);
  comm_op_done(c);
}

/* A destination's side: after the stream's own earlier work, waits for the root to get
 * there, then copies from the root buffer into its own. */
static void run_local_copy(stream_op *op) {
  const local_bcast_op *o = (const local_bcast_op *)op;
  local_bcast *b = o->b;
  pthread_mutex_lock(&b->mu);
  while (!b->root_reached) pthread_cond_wait(&b->cv, &b->mu);
  pthread_mutex_unlock(&b->mu);
  memcpy(o->dst + b->offset, b->src, b->len);
  pthread_mutex_lock(&b->mu);
  if (--b->copies_left == 0) pthread_cond_broadcast(&b->cv);
  pthread_mutex_unlock(&b->mu);  /* after this the root may free b */
}

/* Global rank r is local rank r. The root's stream gets one operation: once the root stream's
 * earlier work is done it lets every destination copy, then holds the root stream until they
 * have. Each other stream gets one operation that copies once the root got there. */
static int local_bcast_enqueue(ckpt_comm *comm, int32_t root, ckpt_buf *const *bufs,
                               ckpt_stream *const *streams, uint64_t offset, uint64_t len) {
  stream_op *ops[MAX_LOCAL_RANKS] = {0};
  local_bcast *b = malloc(sizeof *b);
  if (b == NULL || !ops_alloc(ops, comm->ndev, sizeof(local_bcast_op))) {
    free(b);
    return FAIL(comm->ctx, CKPT_ENOMEM, "broadcast over %d devices", comm->ndev);
  }
  *b = (local_bcast){.copies_left = comm->ndev - 1, .comm = comm,
                     .src = bufs[root]->address + offset, .offset = offset, .len = len};
  pthread_mutex_init(&b->mu, NULL);
  pthread_cond_init(&b->cv, NULL);
  for (int32_t i = 0; i < comm->ndev; i++)
    *(local_bcast_op *)ops[i] = (local_bcast_op){
        .op.run = i == root ? run_local_root : run_local_copy, .b = b, .dst = bufs[i]->address};
  pthread_mutex_lock(&comm->mu);
  comm->inflight++;
  pthread_mutex_unlock(&comm->mu);
  pthread_mutex_lock(&bcast_enqueue_mu);
  for (int32_t i = 0; i < comm->ndev; i++) stream_push(streams[i], ops[i]);
  pthread_mutex_unlock(&bcast_enqueue_mu);
  return CKPT_OK;
}

/* ---- broadcasts across processes ---------------------------------------------------- */
/* One broadcast of a communicator spanning processes. Each local stream gets a
 * remote_bcast_op that marks its arrival (the stream's earlier work is done) and then holds the
 * stream until the communicator thread has finished the broadcast, so that later work on
 * the stream sees the bytes. The communicator thread runs broadcasts in call order: waits
 * for every local stream to arrive, then sends the root's bytes to every other process (the
 * root is local) or receives them into local rank 0's buffer (it is not), then copies to
 * the other local ranks. The last of the stream operations and the thread frees it. */
struct remote_bcast {
  remote_bcast *next;            /* the communicator's queue */
  pthread_mutex_t mu;
  pthread_cond_t cv;       /* CLOCK_MONOTONIC; broadcast on arrival and on done */
  int32_t arrived;         /* local streams that reached the broadcast */
  int done;                /* the communicator thread finished it; status says how */
  int status;
  char detail[320];        /* why it failed */
  int32_t refs;            /* stream operations and the thread still using it */
  int32_t root;
  uint64_t seq, offset, len;
  int32_t ndev;
  uint8_t *dst[];          /* each local rank's buffer */
};

static void remote_bcast_release(remote_bcast *x) {
  pthread_mutex_lock(&x->mu);
  int last = --x->refs == 0;
  pthread_mutex_unlock(&x->mu);
  if (!last) return;
  pthread_cond_destroy(&x->cv);
  pthread_mutex_destroy(&x->mu);
  free(x);
}

/* The operation on each local stream. */
typedef struct remote_bcast_op {
  stream_op op;
  remote_bcast *x;
} remote_bcast_op;

/* The stream worker's side. A failed broadcast fails the stream (see stream_fail). */
static void run_remote(stream_op *op) {
  remote_bcast *x = ((remote_bcast_op *)op)->x;
  pthread_mutex_lock(&x->mu);
  x->arrived++;
  pthread_cond_broadcast(&x->cv);
  while (!x->done) pthread_cond_wait(&x->cv, &x->mu);
  if (x->status != CKPT_OK) stream_fail(op->stream, x->status, x->detail);
  pthread_mutex_unlock(&x->mu);
  remote_bcast_release(x);
}

static int comm_aborting(ckpt_comm *c) { return __atomic_load_n(&c->aborting, __ATOMIC_ACQUIRE); }

/* Waits until every local stream has reached the broadcast; 0 if the communicator is aborted
 * first (checked every 100 ms). */
static int remote_bcast_await_streams(ckpt_comm *c, remote_bcast *x) {
  pthread_mutex_lock(&x->mu);
  while (x->arrived < x->ndev && !comm_aborting(c)) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    t.tv_nsec += 100 * 1000000L;
    if (t.tv_nsec >= 1000000000L) {
      t.tv_sec++;
      t.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&x->cv, &x->mu, &t);
  }
  int all = x->arrived == x->ndev;
  pthread_mutex_unlock(&x->mu);
  return all;
}

#define PEER_FMT "ranks %d..%d at %s"
#define PEER_ARGS(p) (p)->first_rank, (p)->first_rank + (p)->ndev - 1, (p)->name

/* Moves one broadcast's bytes. On failure fills detail and returns the status. */
static int remote_bcast_run(ckpt_comm *c, remote_bcast *x, char *detail, size_t dlen) {
  const unsigned long long seq = (unsigned long long)x->seq, len = (unsigned long long)x->len;
  const int32_t li = x->root - c->first_rank;
  const coll_header h = {.magic = COLL_MAGIC, .root = x->root, .seq = x->seq, .offset = x->offset,
                         .len = x->len};
  size_t done = 0;
  int rc;
  if (li >= 0 && li < c->ndev) {
    const uint8_t *src = x->dst[li] + x->offset;
    for (int32_t k = 0; k < c->npeers; k++) {
      comm_peer *p = &c->peers[k];
      if ((rc = io_all(p->fd, (void *)&h, sizeof h, 1, NULL)) != 0) {
        snprintf(detail, dlen, "broadcast #%llu from rank %d: sending to " PEER_FMT ": %s", seq,
                 x->root, PEER_ARGS(p), io_error(rc));
        return CKPT_ESYS;
      }
    }
    for (uint64_t off = 0; off < x->len; off += SEND_CHUNK) {
      size_t n = (size_t)(x->len - off < SEND_CHUNK ? x->len - off : SEND_CHUNK);
      for (int32_t k = 0; k < c->npeers; k++) {
        comm_peer *p = &c->peers[k];
        if ((rc = io_all(p->fd, (void *)(src + off), n, 1, &done)) != 0) {
          snprintf(detail, dlen,
                   "broadcast #%llu from rank %d: sending to " PEER_FMT ": %s after %llu of %llu "
                   "bytes", seq, x->root, PEER_ARGS(p), io_error(rc),
                   (unsigned long long)(off + done), len);
          return CKPT_ESYS;
        }
      }
    }
    for (int32_t i = 0; i < c->ndev; i++)
      if (i != li) memcpy(x->dst[i] + x->offset, src, x->len);
    return CKPT_OK;
  }
  comm_peer *p = NULL;
  for (int32_t k = 0; k < c->npeers && p == NULL; k++)
    if (x->root >= c->peers[k].first_rank && x->root < c->peers[k].first_rank + c->peers[k].ndev)
      p = &c->peers[k];
  if (p == NULL) {  /* cannot happen: the table covers every rank */
    snprintf(detail, dlen, "broadcast #%llu: no process holds root rank %d", seq, x->root);
    return CKPT_EINVAL;
  }
  coll_header got;
  if ((rc = io_all(p->fd, &got, sizeof got, 0, NULL)) != 0) {
    snprintf(detail, dlen, "broadcast #%llu from rank %d: receiving from " PEER_FMT ": %s", seq,
             x->root, PEER_ARGS(p), io_error(rc));
    return CKPT_ESYS;
  }
  if (got.magic != h.magic || got.root != h.root || got.seq != h.seq || got.offset != h.offset ||
      got.len != h.len) {
    snprintf(detail, dlen,
             "collective sequence mismatch: this process runs broadcast #%llu (root %d, offset "
             "%llu, len %llu), " PEER_FMT " sent #%llu (root %d, offset %llu, len %llu%s)",
             seq, x->root, (unsigned long long)x->offset, len, PEER_ARGS(p),
             (unsigned long long)got.seq, got.root, (unsigned long long)got.offset,
             (unsigned long long)got.len, got.magic != h.magic ? ", bad magic" : "");
    return CKPT_EINVAL;
  }
  uint8_t *dst = x->dst[0] + x->offset;
  if ((rc = io_all(p->fd, dst, (size_t)x->len, 0, &done)) != 0) {
    snprintf(detail, dlen,
             "broadcast #%llu from rank %d: receiving from " PEER_FMT ": %s after %llu of %llu bytes",
             seq, x->root, PEER_ARGS(p), io_error(rc), (unsigned long long)done, len);
    return CKPT_ESYS;
  }
  for (int32_t i = 1; i < c->ndev; i++) memcpy(x->dst[i] + x->offset, dst, x->len);
  return CKPT_OK;
}

/* Makes the communicator's first failure sticky, and shuts its connections down so that the
 * other processes, blocked on this one, fail too instead of hanging. */
static void comm_fail(ckpt_comm *c, int st, const char *detail) {
  pthread_mutex_lock(&c->mu);
  if (c->err_status == CKPT_OK) {
    c->err_status = st;
    snprintf(c->err_detail, sizeof c->err_detail, "%s", detail);
  }
  pthread_mutex_unlock(&c->mu);
  for (int32_t k = 0; k < c->npeers; k++) shutdown(c->peers[k].fd, SHUT_RDWR);
}

/* snprintf that may truncate (details quote other details). */
static void detailf(char *out, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void detailf(char *out, size_t len, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(out, len, fmt, ap);
  va_end(ap);
}

static void *comm_main(void *arg) {
  ckpt_comm *c = arg;
  char detail[320];
  for (;;) {
    pthread_mutex_lock(&c->mu);
    while (c->head == NULL && !c->stop) pthread_cond_wait(&c->cv, &c->mu);
    remote_bcast *x = c->head;
    if (x != NULL && (c->head = x->next) == NULL) c->tail = NULL;
    int st = c->err_status;
    if (x != NULL && st != CKPT_OK)
      detailf(detail, sizeof detail, "broadcast #%llu not run: the communicator failed: %s",
               (unsigned long long)x->seq, c->err_detail);
    pthread_mutex_unlock(&c->mu);
    if (x == NULL) return NULL;  /* stop requested and the queue is drained */
    if (st == CKPT_OK && (!remote_bcast_await_streams(c, x) || comm_aborting(c))) {
      st = CKPT_ESYS;
      snprintf(detail, sizeof detail, "broadcast #%llu not run: the communicator was aborted",
               (unsigned long long)x->seq);
    }
    if (st == CKPT_OK) {
      st = remote_bcast_run(c, x, detail, sizeof detail);
      if (st != CKPT_OK && comm_aborting(c))
        snprintf(detail, sizeof detail, "broadcast #%llu interrupted: the communicator was aborted",
                 (unsigned long long)x->seq);
      if (st != CKPT_OK) comm_fail(c, st, detail);
    }
    pthread_mutex_lock(&x->mu);
    x->done = 1;
    x->status = st;
    if (st != CKPT_OK) memcpy(x->detail, detail, sizeof x->detail);
    pthread_cond_broadcast(&x->cv);
    pthread_mutex_unlock(&x->mu);
    remote_bcast_release(x);
  }
}

/* A communicator of these local ranks, its lock and condition made; NULL when out of memory. */
static ckpt_comm *comm_alloc(ckpt_ctx *ctx, int32_t nranks, int32_t first_rank, int32_t ndev,
                             const int32_t *devices) {
  ckpt_comm *c = calloc(1, sizeof *c + (size_t)ndev * sizeof *devices);
  if (c == NULL) return NULL;
  c->ctx = ctx;
  c->nranks = nranks;
  c->first_rank = first_rank;
  c->ndev = ndev;
  memcpy(c->devices, devices, (size_t)ndev * sizeof *devices);
  pthread_mutex_init(&c->mu, NULL);
  pthread_cond_init(&c->cv, NULL);
  return c;
}

static int comm_init_remote(ckpt_ctx *ctx, const uint8_t idb[CKPT_COMM_ID_BYTES], int32_t nranks,
                            int32_t first_rank, int32_t ndev, const int32_t *devices,
                            int64_t timeout_ms, ckpt_comm **out) {
  comm_peer *peers = NULL;
  int32_t npeers = 0;
  int st = boot_join(ctx, idb, nranks, first_rank, ndev, timeout_ms, &peers, &npeers);
  if (st != CKPT_OK) return st;
  ckpt_comm *c = comm_alloc(ctx, nranks, first_rank, ndev, devices);
  if (c == NULL) {
    peers_close(peers, npeers);
    return FAIL(ctx, CKPT_ENOMEM, "ckpt_comm_init: communicator of %d devices", ndev);
  }
  c->remote = 1;
  c->peers = peers;
  c->npeers = npeers;
  int rc = pthread_create(&c->thread, NULL, comm_main, c);
  if (rc != 0) {
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    peers_close(peers, npeers);
    free(c);
    return FAIL(ctx, CKPT_ESYS, "pthread_create of a communicator thread: %s", strerror(rc));
  }
  pthread_setname_np(c->thread, "ckpt-comm");
  ckpt__live(ctx, +1);
  *out = c;
  return CKPT_OK;
}

/* Destroy (abort == 0): the thread runs what is queued, then exits. Abort: the connections are
 * shut down so that blocked transfers return, and what is queued fails without running. */
static int comm_stop(ckpt_comm *c, int abort) {
  if (abort) {
    __atomic_store_n(&c->aborting, 1, __ATOMIC_RELEASE);
    for (int32_t k = 0; k < c->npeers; k++) shutdown(c->peers[k].fd, SHUT_RDWR);
  }
  pthread_mutex_lock(&c->mu);
  c->stop = 1;
  pthread_cond_broadcast(&c->cv);
  pthread_mutex_unlock(&c->mu);
  pthread_join(c->thread, NULL);
  peers_close(c->peers, c->npeers);
  pthread_cond_destroy(&c->cv);
  pthread_mutex_destroy(&c->mu);
  ckpt__live(c->ctx, -1);
  free(c);
  return CKPT_OK;
}

/* See remote_bcast. */
static int remote_bcast_enqueue(ckpt_comm *c, int32_t root, ckpt_buf *const *bufs,
                                ckpt_stream *const *streams, uint64_t offset, uint64_t len) {
  ckpt_ctx *ctx = c->ctx;
  char detail[sizeof c->err_detail];
  pthread_mutex_lock(&c->mu);
  int st = c->err_status;
  if (st != CKPT_OK) memcpy(detail, c->err_detail, sizeof detail);
  pthread_mutex_unlock(&c->mu);
  if (st != CKPT_OK) return FAIL(ctx, st, "the communicator failed: %s", detail);
  if (len == 0) return CKPT_OK;
  stream_op *ops[MAX_LOCAL_RANKS] = {0};
  remote_bcast *x = calloc(1, sizeof *x + (size_t)c->ndev * sizeof x->dst[0]);
  if (x == NULL || !ops_alloc(ops, c->ndev, sizeof(remote_bcast_op))) {
    free(x);
    return FAIL(ctx, CKPT_ENOMEM, "broadcast over %d devices", c->ndev);
  }
  x->refs = c->ndev + 1;
  x->root = root;
  x->offset = offset;
  x->len = len;
  x->ndev = c->ndev;
  for (int32_t i = 0; i < c->ndev; i++) {
    x->dst[i] = bufs[i]->address;
    *(remote_bcast_op *)ops[i] = (remote_bcast_op){.op.run = run_remote, .x = x};
  }
  pthread_condattr_t attr;
  pthread_condattr_init(&attr);
  pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
  pthread_cond_init(&x->cv, &attr);
  pthread_condattr_destroy(&attr);
  pthread_mutex_init(&x->mu, NULL);
  pthread_mutex_lock(&bcast_enqueue_mu);
  pthread_mutex_lock(&c->mu);
  x->seq = c->next_seq++;
  if (c->tail != NULL) c->tail->next = x;
  else c->head = x;
  c->tail = x;
  pthread_cond_broadcast(&c->cv);
  pthread_mutex_unlock(&c->mu);
  for (int32_t i = 0; i < c->ndev; i++) stream_push(streams[i], ops[i]);
  pthread_mutex_unlock(&bcast_enqueue_mu);
  return CKPT_OK;
}

/* ---- communicators ------------------------------------------------------------------ */
CKPT_API int ckpt_comm_init(ckpt_ctx *ctx, const uint8_t id[CKPT_COMM_ID_BYTES], int32_t nranks,
                            int32_t first_rank, int32_t ndev, const int32_t *devices,
                            int64_t timeout_ms, ckpt_comm **out) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK(ckpt__comm_init_check(ctx, id, nranks, first_rank, ndev, devices, out, check_device));
  if (nranks != ndev)
    return comm_init_remote(ctx, id, nranks, first_rank, ndev, devices, timeout_ms, out);
  /* All ranks are local: nothing waits for other ranks, and the id's bootstrap (if it runs in
   * this process) is not needed. Any id is accepted. */
  boot_cancel(id);
  ckpt_comm *c = comm_alloc(ctx, nranks, first_rank, ndev, devices);
  if (c == NULL) return FAIL(ctx, CKPT_ENOMEM, "ckpt_comm_init: communicator of %d devices", ndev);
  ckpt__live(ctx, +1);
  *out = c;
  return CKPT_OK;
}

/* Across processes: waits for the queued broadcasts, which need the other processes to take
 * part; a broadcast whose peer is gone fails at once (its connection is closed), and once
 * one failed the rest fail without running. */
CKPT_API int ckpt_comm_destroy(ckpt_comm *comm) {
  CHECK_ARG(NULL, comm != NULL);
  if (comm->remote) return comm_stop(comm, 0);
  /* The queued broadcasts reference the communicator until their root operations finish;
   * those never wait for anything outside this process, so this wait is bounded. */
  pthread_mutex_lock(&comm->mu);
  while (comm->inflight > 0) pthread_cond_wait(&comm->cv, &comm->mu);
  pthread_mutex_unlock(&comm->mu);
  pthread_cond_destroy(&comm->cv);
  pthread_mutex_destroy(&comm->mu);
  ckpt__live(comm->ctx, -1);
  free(comm);
  return CKPT_OK;
}

/* Local ranks only: no peer can hang the communicator, so abort is destroy. Across processes:
 * the broadcast in flight and those queued fail (their streams go on, failed). */
CKPT_API int ckpt_comm_abort(ckpt_comm *comm) {
  CHECK_ARG(NULL, comm != NULL);
  if (comm->remote) return comm_stop(comm, 1);
  return ckpt_comm_destroy(comm);
}

/* All ranks local: see local_bcast_enqueue. Across processes: see remote_bcast. */
CKPT_API int ckpt_broadcast(ckpt_comm *comm, int32_t root, ckpt_buf *const *bufs,
                            ckpt_stream *const *streams, uint64_t offset, uint64_t len) {
  CHECK_ARG(NULL, comm != NULL);
  CHECK(ckpt__bcast_check(comm->ctx, &host_places, comm->nranks, comm->ndev, comm->devices, root, bufs,
                          streams, offset, len));
  if (comm->remote) return remote_bcast_enqueue(comm, root, bufs, streams, offset, len);
  if (len == 0 || comm->ndev == 1) return CKPT_OK;  /* nothing to copy */
  return local_bcast_enqueue(comm, root, bufs, streams, offset, len);
}

/* ---- NCCL --------------------------------------------------------------------------- */
CKPT_API int ckpt_nccl_version(ckpt_ctx *ctx, int32_t *version) {
  CHECK_ARG(NULL, ctx != NULL);
  if (version != NULL) *version = 0;
  return FAIL(ctx, CKPT_EUNSUPPORTED, "host backend: collectives run over TCP, not NCCL");
}
