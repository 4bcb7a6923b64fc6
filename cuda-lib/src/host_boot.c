/* The host backend's bootstrap (see host_boot.h): how the processes of a communicator find
 * each other. ckpt_comm_id_new opens a bootstrap listener and starts a detached thread that
 * accepts one connection per participating process, learns its ranks and data listener, and
 * once ranks 0..nranks-1 are all covered sends every process the table of all of them (or an
 * error to all), then exits. Each process then connects to every process with a higher first
 * rank and accepts a connection from every process with a lower one: one TCP connection
 * between every two processes.
 *
 * Messages are fixed-size structs of 32- and 64-bit fields in the host byte order (every
 * process of a communicator runs on a little-endian host), each starting with a magic of its
 * own so that a connection out of step is caught. */
#define _GNU_SOURCE
#include "host_boot.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "host_net.h"

#define ID_MAGIC 0x31485443u     /* "CTH1": an id from the host backend, version 1 */
#define HELLO_MAGIC 0x32485443u
#define REPLY_MAGIC 0x33485443u
#define SHAKE_MAGIC 0x34485443u

#define BOOT_TIMEOUT_MS 60000    /* the bootstrap gives up when not every rank joined by then */
#define CONNECT_RETRY_MS 10000   /* how long connecting to the bootstrap or a peer is retried */
#define PEER_TIMEOUT_MS 30000    /* for the connections between processes to come up */

typedef struct comm_id {  /* the first bytes of an id; the rest are zero */
  uint32_t magic;
  uint32_t addr;          /* the bootstrap listener: IPv4 address in network order */
  uint32_t port;
  uint32_t reserved;
  uint64_t nonce;         /* random; names the communicator in every handshake */
} comm_id;
_Static_assert(sizeof(comm_id) <= CKPT_COMM_ID_BYTES, "comm_id does not fit in an id");

typedef struct boot_hello {  /* participant to bootstrap */
  uint32_t magic;
  int32_t nranks, first_rank, ndev;
  uint64_t nonce;
  uint32_t addr, port;       /* the participant's data listener */
} boot_hello;

typedef struct boot_entry {  /* one process of the table */
  int32_t first_rank, ndev;
  uint32_t addr, port;
} boot_entry;

typedef struct boot_reply {  /* bootstrap to participant; nprocs boot_entry follow on success */
  uint32_t magic;
  int32_t status;            /* CKPT_OK, or the failure that `error` explains */
  uint32_t nprocs;
  uint32_t reserved;
  char error[256];
} boot_reply;

typedef struct peer_shake {  /* the first message each way on a connection between processes */
  uint32_t magic;
  int32_t first_rank;
  uint64_t nonce;
} peer_shake;
/* ---- the bootstrap thread ----------------------------------------------------------- */
/* A bootstrap in this process. The thread owns it; boots lists the live ones so that a
 * communicator made of local ranks only can stop the bootstrap of its id at once (through
 * cancel_fd) instead of leaving it to time out. */
typedef struct boot {
  struct boot *next;  /* guarded by boots_mu */
  uint64_t nonce;
  int lfd;            /* the listener */
  int cancel_fd;      /* eventfd */
} boot;

static pthread_mutex_t boots_mu = PTHREAD_MUTEX_INITIALIZER;
static boot *boots;

typedef struct boot_member {
  int fd;
  boot_hello h;
} boot_member;

static int member_cmp(const void *a, const void *b) {
  int32_t x = ((const boot_member *)a)->h.first_rank, y = ((const boot_member *)b)->h.first_rank;
  return (x > y) - (x < y);
}

/* Sends the reply (and on success the n-entry table) to one participant, best effort. */
static void boot_reply_send(int fd, int status, const char *error, const boot_entry *t, size_t n) {
  boot_reply r = {.magic = REPLY_MAGIC, .status = status, .nprocs = status == CKPT_OK ? (uint32_t)n : 0};
  snprintf(r.error, sizeof r.error, "%s", error);
  sock_timeouts(fd, 5000);
  if (io_all(fd, &r, sizeof r, 1, NULL) == 0 && status == CKPT_OK)
    (void)io_all(fd, (void *)t, n * sizeof *t, 1, NULL);
}

static void member_name(const boot_hello *h, char *out, size_t len) {
  char a[48];
  addr_name(h->addr, h->port, a, sizeof a);
  snprintf(out, len, "ranks %d..%d at %s", h->first_rank, h->first_rank + h->ndev - 1, a);
}
/* What the bootstrap thread has learnt: the participants so far, and whether it failed. */
typedef struct boot_state {
  boot_member *m;
  size_t n, cap;
  int32_t nranks;    /* as the first participant says */
  int64_t covered;   /* ranks of the participants so far (they never overlap) */
  int status;        /* CKPT_OK, or the failure that error explains to every participant */
  char error[256];
} boot_state;

static void boot_stop(boot_state *s, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void boot_stop(boot_state *s, int status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(s->error, sizeof s->error, fmt, ap);
  va_end(ap);
  s->status = status;
}

/* Waits for the next connection until the deadline. The connection, or -1: nothing to
 * accept yet, or the bootstrap must stop (s->status says why). */
static int boot_accept(const boot *b, int64_t deadline, boot_state *s) {
  int64_t left = deadline - mono_ms();
  if (left <= 0) {
    boot_stop(s, CKPT_ETIMEDOUT, "only %lld of %d ranks joined within %d s", (long long)s->covered,
              (int)s->nranks, BOOT_TIMEOUT_MS / 1000);
    return -1;
  }
  struct pollfd pf[2] = {{.fd = b->lfd, .events = POLLIN}, {.fd = b->cancel_fd, .events = POLLIN}};
  int pr = poll(pf, 2, (int)left);
  if (pr < 0 && errno != EINTR) {
    boot_stop(s, CKPT_ESYS, "bootstrap poll: %s", strerror(errno));
    return -1;
  }
  if (pr <= 0) return -1;
  if (pf[1].revents != 0) {
    boot_stop(s, CKPT_EINVAL, "the id was used for a communicator within one process");
    return -1;
  }
  if ((pf[0].revents & (POLLERR | POLLHUP | POLLNVAL)) != 0) {
    boot_stop(s, CKPT_ESYS, "the bootstrap listener failed");
    return -1;
  }
  int fd = accept4(b->lfd, NULL, NULL, SOCK_CLOEXEC);
  if (fd < 0 && errno != EINTR && errno != ECONNABORTED) usleep(10 * 1000);  /* EMFILE and the like */
  return fd;
}

/* Reads a participant's hello from a new connection. 0, with fd closed, when it is none, or
 * one with another communicator's id (which is told so). */
static int boot_greet(const boot *b, int fd, boot_hello *h) {
  sock_timeouts(fd, 5000);
  if (io_all(fd, h, sizeof *h, 0, NULL) != 0 || h->magic != HELLO_MAGIC) {
    close(fd);  /* not a participant */
    return 0;
  }
  if (h->nonce != b->nonce) {
    boot_reply_send(fd, CKPT_EINVAL, "communicator id mismatch (a stale id?)", NULL, 0);
    close(fd);
    return 0;
  }
  return 1;
}

/* Adds a participant (who then gets the bootstrap's reply); out of memory, tells it so,
 * closes fd and stops the bootstrap. */
static void boot_add(boot_state *s, int fd, const boot_hello *h) {
  if (s->n == s->cap) {
    size_t cap = s->cap ? 2 * s->cap : 8;
    boot_member *grown = realloc(s->m, cap * sizeof *s->m);
    if (grown == NULL) {
      boot_reply_send(fd, CKPT_ENOMEM, "bootstrap out of memory", NULL, 0);
      close(fd);
      boot_stop(s, CKPT_ENOMEM, "bootstrap out of memory");
      return;
    }
    s->m = grown;
    s->cap = cap;
  }
  s->m[s->n++] = (boot_member){.fd = fd, .h = *h};
}

/* Checks the newest participant against the communicator and the others: its ranks inside
 * 0..nranks-1, the same nranks as the first, overlapping nobody's. Counts its ranks. */
static void boot_check_newest(boot_state *s) {
  const boot_hello *h = &s->m[s->n - 1].h;
  char who[96], other[96];
  member_name(h, who, sizeof who);
  if (h->nranks < 1 || h->first_rank < 0 || h->ndev < 1 ||
      (int64_t)h->first_rank + h->ndev > h->nranks) {
    boot_stop(s, CKPT_EINVAL, "%s: not inside a communicator of %d ranks", who, h->nranks);
    return;
  }
  if (s->n == 1) s->nranks = h->nranks;
  if (h->nranks != s->nranks) {
    member_name(&s->m[0].h, other, sizeof other);
    boot_stop(s, CKPT_EINVAL, "nranks mismatch: %s says %d ranks, %s says %d", other, (int)s->nranks,
              who, (int)h->nranks);
    return;
  }
  for (size_t j = 0; j + 1 < s->n; j++) {
    const boot_hello *o = &s->m[j].h;
    if (h->first_rank < o->first_rank + o->ndev && o->first_rank < h->first_rank + h->ndev) {
      member_name(o, other, sizeof other);
      boot_stop(s, CKPT_EINVAL, "ranks overlap: %s and %s", other, who);
      return;
    }
  }
  s->covered += h->ndev;
}

/* Every rank is covered: no overlaps, all inside 0..nranks-1, as many as nranks. */
static int boot_complete(const boot_state *s) { return s->n > 0 && s->covered == s->nranks; }

/* The table of every participant, by first rank; NULL (and the bootstrap stopped) when out of
 * memory. */
static boot_entry *boot_table(boot_state *s) {
  qsort(s->m, s->n, sizeof *s->m, member_cmp);
  boot_entry *t = calloc(s->n, sizeof *t);
  if (t == NULL) {
    boot_stop(s, CKPT_ENOMEM, "bootstrap out of memory");
    return NULL;
  }
  for (size_t i = 0; i < s->n; i++)
    t[i] = (boot_entry){.first_rank = s->m[i].h.first_rank, .ndev = s->m[i].h.ndev,
                        .addr = s->m[i].h.addr, .port = s->m[i].h.port};
  return t;
}

/* Gives every participant the outcome (on success the table) and closes its connection. */
static void boot_reply_all(boot_state *s, const boot_entry *t) {
  for (size_t i = 0; i < s->n; i++) {
    boot_reply_send(s->m[i].fd, s->status, s->error, t, s->n);
    close(s->m[i].fd);
  }
  free(s->m);
}

/* Unlinks the bootstrap from boots and frees it. */
static void boot_free(boot *b) {
  pthread_mutex_lock(&boots_mu);
  for (boot **p = &boots; *p != NULL; p = &(*p)->next)
    if (*p == b) {
      *p = b->next;
      break;
    }
  pthread_mutex_unlock(&boots_mu);
  close(b->lfd);
  close(b->cancel_fd);
  free(b);
}

static void *boot_main(void *arg) {
  boot *b = arg;
  boot_state s = {.status = CKPT_OK};
  const int64_t deadline = mono_ms() + BOOT_TIMEOUT_MS;
  while (s.status == CKPT_OK && !boot_complete(&s)) {
    boot_hello h;
    int fd = boot_accept(b, deadline, &s);
    if (fd < 0 || !boot_greet(b, fd, &h)) continue;
    boot_add(&s, fd, &h);
    if (s.status == CKPT_OK) boot_check_newest(&s);
  }
  boot_entry *t = s.status == CKPT_OK ? boot_table(&s) : NULL;
  boot_reply_all(&s, t);
  free(t);
  boot_free(b);
  return NULL;
}

void boot_cancel(const uint8_t id[CKPT_COMM_ID_BYTES]) {
  comm_id v;
  memcpy(&v, id, sizeof v);
  if (v.magic != ID_MAGIC) return;  /* not an id of this backend: no bootstrap to stop */
  pthread_mutex_lock(&boots_mu);
  for (boot *b = boots; b != NULL; b = b->next)
    if (b->nonce == v.nonce) {
      uint64_t one = 1;
      ssize_t w = write(b->cancel_fd, &one, sizeof one);
      (void)w;
    }
  pthread_mutex_unlock(&boots_mu);
}

static int id_parse(ckpt_ctx *ctx, const uint8_t id[CKPT_COMM_ID_BYTES], comm_id *out) {
  memcpy(out, id, sizeof *out);
  if (out->magic != ID_MAGIC || out->port == 0 || out->port > 65535)
    return FAIL(ctx, CKPT_EINVAL,
                "communicator id not made by the host backend's ckpt_comm_id_new (magic 0x%08x)",
                out->magic);
  return CKPT_OK;
}

/* ---- joining: bootstrap, then one connection to every other process ---------------- */
/* Sends this process's ranks to the bootstrap and receives the table of every process.
 * On success *lfd is this process's data listener, named in the table. */
static int join_bootstrap(ckpt_ctx *ctx, const comm_id *id, int32_t nranks, int32_t first_rank,
                          int32_t ndev, int64_t deadline, int *lfd, boot_entry **table,
                          uint32_t *nprocs) {
  char bname[48];
  addr_name(id->addr, id->port, bname, sizeof bname);
  int err = 0;
  int bfd = connect_to(id->addr, id->port, mono_ms() + left_ms(deadline, CONNECT_RETRY_MS), &err);
  if (bfd < 0)
    return FAIL(ctx, CKPT_ESYS,
                "communicator bootstrap at %s: connect: %s (tried for %d s: has the process that "
                "made the id exited, or did every rank join already?)",
                bname, strerror(err), CONNECT_RETRY_MS / 1000);
  int st = CKPT_OK;
  struct sockaddr_in local;
  socklen_t sl = sizeof local;
  uint32_t laddr, lport;
  boot_reply r;
  *lfd = -1;
  *table = NULL;
  SYS_GOTO(ctx, getsockname(bfd, (struct sockaddr *)&local, &sl) == 0, st, out,
           "getsockname of the bootstrap connection");
  /* By default the data listener is on the address that reaches the bootstrap. */
  CHECK_GOTO(env_addr(ctx, local.sin_addr.s_addr, &laddr), st, out);
  CHECK_GOTO(listen_on(ctx, laddr, lfd, &lport), st, out);
  boot_hello h = {.magic = HELLO_MAGIC, .nranks = nranks, .first_rank = first_rank, .ndev = ndev,
                  .nonce = id->nonce, .addr = laddr, .port = lport};
  sock_timeouts(bfd, left_ms(deadline, BOOT_TIMEOUT_MS + 5000));
  int rc = io_all(bfd, &h, sizeof h, 1, NULL);
  if (rc == 0) rc = io_all(bfd, &r, sizeof r, 0, NULL);
  if (rc == EAGAIN || rc == EWOULDBLOCK) {
    st = FAIL(ctx, CKPT_ETIMEDOUT, "communicator bootstrap at %s: not all %d ranks joined in time",
              bname, nranks);
    goto out;
  }
  if (rc != 0) {
    st = FAIL(ctx, CKPT_ESYS, "communicator bootstrap at %s: waiting for every rank to join: %s",
              bname, io_error(rc));
    goto out;
  }
  if (r.magic != REPLY_MAGIC) {
    st = FAIL(ctx, CKPT_ESYS, "communicator bootstrap at %s: not a bootstrap reply", bname);
    goto out;
  }
  if (r.status != CKPT_OK) {
    r.error[sizeof r.error - 1] = '\0';
    int s = r.status == CKPT_EINVAL || r.status == CKPT_ETIMEDOUT ? r.status : CKPT_ESYS;
    st = FAIL(ctx, s, "communicator bootstrap at %s: %s", bname, r.error);
    goto out;
  }
  if (r.nprocs < 2 || r.nprocs > (uint32_t)nranks) {
    st = FAIL(ctx, CKPT_ESYS, "communicator bootstrap at %s: a table of %u processes", bname,
              r.nprocs);
    goto out;
  }
  *table = calloc(r.nprocs, sizeof **table);
  if (*table == NULL) {
    st = FAIL(ctx, CKPT_ENOMEM, "table of %u processes", r.nprocs);
    goto out;
  }
  rc = io_all(bfd, *table, r.nprocs * sizeof **table, 0, NULL);
  if (rc != 0) {
    st = FAIL(ctx, CKPT_ESYS, "communicator bootstrap at %s: receiving the table: %s", bname,
              io_error(rc));
    goto out;
  }
  *nprocs = r.nprocs;
out:
  close(bfd);
  if (st != CKPT_OK) {
    if (*lfd >= 0) close(*lfd);
    *lfd = -1;
    free(*table);
    *table = NULL;
  }
  return st;
}

void peers_close(comm_peer *p, int32_t n) {
  for (int32_t i = 0; p != NULL && i < n; i++)
    if (p[i].fd >= 0) close(p[i].fd);
  free(p);
}

/* Connects to every process of the table with a higher first rank and accepts a connection
 * from every one with a lower first rank; each connection starts with a handshake both ways
 * naming the communicator (nonce) and the sender. Connecting does not wait for the other
 * side to accept (the kernel queues the connection on its listener), so connecting to every
 * higher process first, then accepting, cannot deadlock. */
static int connect_peers(ckpt_ctx *ctx, uint64_t nonce, int32_t me, int lfd, const boot_entry *t,
                         uint32_t n, int64_t until, comm_peer **out, int32_t *nout) {
  comm_peer *p = calloc(n, sizeof *p);
  if (p == NULL) return FAIL(ctx, CKPT_ENOMEM, "peer table of %u processes", n);
  int32_t np = 0, lower = 0, self = 0;
  for (uint32_t i = 0; i < n; i++) {
    if (t[i].first_rank == me) {
      self++;
      continue;
    }
    if (np == (int32_t)n - 1) break;  /* this process is missing from the table: caught below */
    p[np] = (comm_peer){.fd = -1, .first_rank = t[i].first_rank, .ndev = t[i].ndev};
    addr_name(t[i].addr, t[i].port, p[np].name, sizeof p[np].name);
    if (t[i].first_rank < me) lower++;
    np++;
  }
  int st = CKPT_OK, rc;
  const peer_shake mine = {.magic = SHAKE_MAGIC, .first_rank = me, .nonce = nonce};
  peer_shake got;
  if (self != 1) {
    st = FAIL(ctx, CKPT_ESYS, "the bootstrap's table lists this process %d times", self);
    goto fail;
  }
  for (int32_t k = 0, i = 0; k < np; k++, i++) {
    if (t[i].first_rank == me) i++;  /* t[i] is the entry of p[k] */
    if (p[k].first_rank < me) continue;
    int err = 0;
    p[k].fd = connect_to(t[i].addr, t[i].port, mono_ms() + left_ms(until, CONNECT_RETRY_MS), &err);
    if (p[k].fd < 0) {
      st = FAIL(ctx, CKPT_ESYS, "connect to ranks %d..%d at %s: %s", p[k].first_rank,
                p[k].first_rank + p[k].ndev - 1, p[k].name, strerror(err));
      goto fail;
    }
    sock_timeouts(p[k].fd, left_ms(until, PEER_TIMEOUT_MS));
    rc = io_all(p[k].fd, (void *)&mine, sizeof mine, 1, NULL);
    if (rc != 0) {
      st = FAIL(ctx, CKPT_ESYS, "handshake with ranks %d..%d at %s: %s", p[k].first_rank,
                p[k].first_rank + p[k].ndev - 1, p[k].name, io_error(rc));
      goto fail;
    }
  }
  int64_t deadline = mono_ms() + left_ms(until, PEER_TIMEOUT_MS);
  while (lower > 0) {
    int64_t left = deadline - mono_ms();
    if (left <= 0) {
      int32_t k = 0;
      while (!(p[k].first_rank < me && p[k].fd < 0)) k++;
      st = FAIL(ctx, CKPT_ETIMEDOUT,
                "ranks %d..%d at %s (and %d more processes) did not connect in time",
                p[k].first_rank, p[k].first_rank + p[k].ndev - 1, p[k].name, lower - 1);
      goto fail;
    }
    struct pollfd pf = {.fd = lfd, .events = POLLIN};
    if (poll(&pf, 1, (int)left) <= 0) continue;
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno != EINTR && errno != ECONNABORTED) usleep(10 * 1000);  /* EMFILE and the like */
      continue;
    }
    sock_timeouts(fd, left_ms(until, 5000));
    int32_t k = -1;
    if (io_all(fd, &got, sizeof got, 0, NULL) == 0 && got.magic == SHAKE_MAGIC && got.nonce == nonce)
      for (int32_t j = 0; j < np; j++)
        if (p[j].first_rank == got.first_rank && got.first_rank < me && p[j].fd < 0) k = j;
    if (k < 0) {
      close(fd);  /* a stray connection */
      continue;
    }
    sock_tune(fd);
    sock_timeouts(fd, left_ms(until, PEER_TIMEOUT_MS));
    p[k].fd = fd;
    lower--;
    rc = io_all(fd, (void *)&mine, sizeof mine, 1, NULL);
    if (rc != 0) {
      st = FAIL(ctx, CKPT_ESYS, "handshake with ranks %d..%d at %s: %s", p[k].first_rank,
                p[k].first_rank + p[k].ndev - 1, p[k].name, io_error(rc));
      goto fail;
    }
  }
  for (int32_t k = 0; k < np; k++) {
    if (p[k].first_rank < me) continue;
    rc = io_all(p[k].fd, &got, sizeof got, 0, NULL);
    if (rc != 0 || got.magic != SHAKE_MAGIC || got.nonce != nonce || got.first_rank != p[k].first_rank) {
      st = FAIL(ctx, rc == EAGAIN || rc == EWOULDBLOCK ? CKPT_ETIMEDOUT : CKPT_ESYS,
                "handshake with ranks %d..%d at %s: %s", p[k].first_rank,
                p[k].first_rank + p[k].ndev - 1, p[k].name,
                rc != 0 ? io_error(rc) : "a wrong reply (another communicator listens there?)");
      goto fail;
    }
  }
  for (int32_t k = 0; k < np; k++) sock_timeouts(p[k].fd, 0);
  *out = p;
  *nout = np;
  return CKPT_OK;
fail:
  peers_close(p, np);
  return st;
}

int boot_join(ckpt_ctx *ctx, const uint8_t idb[CKPT_COMM_ID_BYTES], int32_t nranks, int32_t first_rank,
              int32_t ndev, int64_t timeout_ms, comm_peer **peers, int32_t *npeers) {
  /* A limit beyond a century is no limit (and cannot overflow the deadline). */
  const int64_t deadline =
      timeout_ms < 0 || timeout_ms > ((int64_t)100 * 365 * 86400 * 1000) ? INT64_MAX / 2 : mono_ms() + timeout_ms;
  comm_id id;
  CHECK(id_parse(ctx, idb, &id));
  int lfd = -1;
  boot_entry *table = NULL;
  uint32_t nprocs = 0;
  int st = join_bootstrap(ctx, &id, nranks, first_rank, ndev, deadline, &lfd, &table, &nprocs);
  if (st == CKPT_OK)
    st = connect_peers(ctx, id.nonce, first_rank, lfd, table, nprocs, deadline, peers, npeers);
  if (lfd >= 0) close(lfd);
  free(table);
  return st;
}

/* ---- ids ------------------------------------------------------------------------------ */
/* Opens a bootstrap listener and starts its thread (see the top of this file); the id names
 * it. An id made for a communicator of local ranks only is never joined: ckpt_comm_init stops
 * its bootstrap at once; otherwise it lasts until every rank joined, or 60 s. */
CKPT_API int ckpt_comm_id_new(ckpt_ctx *ctx, uint8_t id[CKPT_COMM_ID_BYTES]) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, id != NULL);
  comm_id v = {.magic = ID_MAGIC};
  CHECK(random_bytes(ctx, &v.nonce, sizeof v.nonce));
  CHECK(env_addr(ctx, htonl(INADDR_LOOPBACK), &v.addr));
  boot *b = calloc(1, sizeof *b);
  if (b == NULL) return FAIL(ctx, CKPT_ENOMEM, "communicator bootstrap");
  b->nonce = v.nonce;
  b->cancel_fd = -1;
  int st = listen_on(ctx, v.addr, &b->lfd, &v.port);
  if (st != CKPT_OK) {
    free(b);
    return st;
  }
  b->cancel_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (b->cancel_fd < 0) st = FAIL(ctx, CKPT_ESYS, "eventfd for a bootstrap: %s", strerror(errno));
  pthread_attr_t attr;
  pthread_t th;
  int rc = 0;
  if (st == CKPT_OK) {
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_mutex_lock(&boots_mu);  /* the thread unlinks b under it when it is done */
    b->next = boots;
    boots = b;
    rc = pthread_create(&th, &attr, boot_main, b);
    if (rc != 0) boots = b->next;
    else pthread_setname_np(th, "ckpt-bootstrap");
    pthread_mutex_unlock(&boots_mu);
    pthread_attr_destroy(&attr);
    if (rc != 0) st = FAIL(ctx, CKPT_ESYS, "pthread_create of a bootstrap thread: %s", strerror(rc));
  }
  if (st != CKPT_OK) {
    close(b->lfd);
    if (b->cancel_fd >= 0) close(b->cancel_fd);
    free(b);
    return st;
  }
  memset(id, 0, CKPT_COMM_ID_BYTES);
  memcpy(id, &v, sizeof v);
  return CKPT_OK;
}
