/* The host backend's communicators (see host.c for the backend as a whole): broadcasts
 * between the streams of one process, and the TCP transport between processes (the
 * bootstrap, the connections, the communicator thread). */
#define _GNU_SOURCE
#include "host.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* One other process of a communicator spanning processes, and the connection to it. */
typedef struct comm_peer {
  int fd;
  int32_t first_rank, ndev;
  char name[48];  /* "address:port" of its data listener, for messages */
} comm_peer;

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
  xbcast *head, *tail; /* queued collectives, in call order */
  int stop;            /* ckpt_comm_destroy or abort: the thread exits once the queue is empty */
  int aborting;        /* atomic: ckpt_comm_abort; queued collectives fail without running */
  int err_status;      /* sticky: the first failure; later collectives fail fast */
  char err_detail[320];
  uint64_t next_seq;   /* sequence number of the next collective queued */
  int32_t ndev;
  int32_t devices[];
};

/* One broadcast in flight, shared by the root stream's operation and each destination's.
 * The root operation frees it: it is the last to use it, as it waits for every copy. */
struct bcast {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int root_reached;     /* the root stream got to the broadcast: its earlier work is done */
  int32_t copies_left;  /* destination copies not finished yet */
  ckpt_comm *comm;
};

/* ---- broadcasts within one process: the stream workers' side ------------------------ */
static void comm_op_done(ckpt_comm *c) {
  pthread_mutex_lock(&c->mu);
  c->inflight--;
  pthread_cond_broadcast(&c->cv);
  pthread_mutex_unlock(&c->mu);  /* after this the communicator may be destroyed */
}

/* The root's side: earlier work on the root stream is done, so the destinations may copy;
 * later work on it waits until they have (as NCCL's root does until its sends are done), so
 * that it may overwrite the root buffer and an event recorded after it means completion. */
void bcast_root(bcast *b) {
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

void bcast_await_root(bcast *b) {
  pthread_mutex_lock(&b->mu);
  while (!b->root_reached) pthread_cond_wait(&b->cv, &b->mu);
  pthread_mutex_unlock(&b->mu);
}

void bcast_copied(bcast *b) {
  pthread_mutex_lock(&b->mu);
  if (--b->copies_left == 0) pthread_cond_broadcast(&b->cv);
  pthread_mutex_unlock(&b->mu);  /* after this the root may free b */
}

/* ---- collectives -------------------------------------------------------------------- */
/* A broadcast queues operations on several streams. Pushing all of one broadcast's under this
 * lock gives every stream the same order of broadcasts, so that two broadcasts queued at once
 * from different threads cannot wait for each other in a cycle. */
static pthread_mutex_t bcast_enqueue_mu = PTHREAD_MUTEX_INITIALIZER;

#define MAX_LOCAL_RANKS 64  /* distinct devices of one context: at most host_devices (<= 64) */

/* ---- collectives across processes: wire formats and sockets ------------------------- */
/* A communicator spanning processes comes up in two steps. ckpt_comm_id_new opens a bootstrap
 * listener and starts a detached thread that accepts one connection per participating
 * process, learns its ranks and data listener, and once ranks 0..nranks-1 are all covered
 * sends every process the table of all of them (or an error to all), then exits. Each
 * process then connects to every process with a higher first rank and accepts a connection
 * from every process with a lower one: one TCP connection between every two processes.
 *
 * Messages are fixed-size structs of 32- and 64-bit fields in the host byte order (every
 * process of a communicator runs on a little-endian host), each starting with a magic of its
 * own so that a connection out of step is caught. */
#define ID_MAGIC 0x31485443u     /* "CTH1": an id from the host backend, version 1 */
#define HELLO_MAGIC 0x32485443u
#define REPLY_MAGIC 0x33485443u
#define SHAKE_MAGIC 0x34485443u
#define COLL_MAGIC 0x35485443u

#define BOOT_TIMEOUT_MS 60000    /* the bootstrap gives up when not every rank joined by then */
#define CONNECT_RETRY_MS 10000   /* how long connecting to the bootstrap or a peer is retried */
#define PEER_TIMEOUT_MS 30000    /* for the connections between processes to come up */
#define SOCK_BUF_BYTES (4 << 20)
#define SEND_CHUNK ((uint64_t)4 << 20)  /* a root sends to its peers in turn, this much each */

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

typedef struct coll_header {  /* sent before each broadcast's payload */
  uint32_t magic;
  int32_t root;
  uint64_t seq, offset, len;
} coll_header;

static int64_t mono_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void addr_name(uint32_t addr, uint32_t port, char *out, size_t len) {
  char a[INET_ADDRSTRLEN] = "?";
  inet_ntop(AF_INET, &addr, a, sizeof a);
  snprintf(out, len, "%s:%u", a, (unsigned)port);
}

/* Sends or receives exactly len bytes: 0, an errno, or -1 when the peer closed the
 * connection first. *done (if not NULL) gets the bytes moved. */
static int io_all(int fd, void *p, size_t len, int sending, size_t *done) {
  size_t got = 0;
  int rc = 0;
  while (got < len) {
    size_t want = len - got < ((size_t)1 << 30) ? len - got : ((size_t)1 << 30);
    ssize_t n = sending ? send(fd, (uint8_t *)p + got, want, MSG_NOSIGNAL)
                        : recv(fd, (uint8_t *)p + got, want, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      rc = n < 0 ? errno : -1;
      break;
    }
    got += (size_t)n;
  }
  if (done != NULL) *done = got;
  return rc;
}

static const char *io_error(int rc) {
  if (rc == -1) return "connection closed by the other side";
  if (rc == EAGAIN || rc == EWOULDBLOCK) return "timed out";
  return strerror(rc);
}

/* Limits blocking sends and receives on fd to ms milliseconds (0: no limit). */
static void sock_timeouts(int fd, int64_t ms) {
  struct timeval tv = {.tv_sec = (time_t)(ms / 1000), .tv_usec = (suseconds_t)(ms % 1000) * 1000};
  (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  (void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static long read_sysctl(const char *path) {
  long v = -1;
  FILE *f = fopen(path, "re");
  if (f != NULL && fscanf(f, "%ld", &v) != 1) v = -1;
  if (f != NULL) fclose(f);
  return v;
}

/* Whether the kernel grants SOCK_BUF_BYTES socket buffers. Setting a buffer size turns the
 * kernel's autotuning off; clamped to a small net.core.*mem_max (208 KiB on many hosts), it
 * would cap the TCP window far below what autotuning reaches, so it is only set when granted. */
static int sock_bufs_granted;
static pthread_once_t sock_bufs_once = PTHREAD_ONCE_INIT;
static void sock_bufs_probe(void) {
  sock_bufs_granted = read_sysctl("/proc/sys/net/core/rmem_max") >= SOCK_BUF_BYTES &&
                      read_sysctl("/proc/sys/net/core/wmem_max") >= SOCK_BUF_BYTES;
}

/* Options of a data connection (best effort): no Nagle delay, large buffers, and keepalive
 * probes so that a peer host that vanished fails the connection within a minute. */
static void sock_tune(int fd) {
  int one = 1, buf = SOCK_BUF_BYTES, idle = 20, intvl = 5, cnt = 6;
  (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  pthread_once(&sock_bufs_once, sock_bufs_probe);
  if (sock_bufs_granted) {
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
  }
  (void)setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
  (void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
  (void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
  (void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
}

/* Milliseconds left until `deadline` (on the monotonic clock), at most cap and at least 1. */
static int64_t left_ms(int64_t deadline, int64_t cap) {
  int64_t left = deadline - mono_ms();
  return left < 1 ? 1 : left < cap ? left : cap;
}

/* Connects to addr:port, retrying until the deadline (ms on the monotonic clock). A tuned,
 * blocking socket, or -1 with the last errno in *err. */
static int connect_to(uint32_t addr, uint32_t port, int64_t deadline, int *err) {
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                           .sin_addr = {.s_addr = addr}};
  for (;;) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      *err = errno;
      return -1;
    }
    sock_tune(fd);
    int64_t left = deadline - mono_ms();
    sock_timeouts(fd, left > 1000 ? left : 1000);  /* bounds connect() to an unreachable host */
    if (connect(fd, (const struct sockaddr *)&sa, sizeof sa) == 0) {
      sock_timeouts(fd, 0);
      return fd;
    }
    *err = errno;
    close(fd);
    if (mono_ms() >= deadline) return -1;
    usleep(50 * 1000);
  }
}

/* A listener on addr, port chosen by the kernel. */
static int listen_on(ckpt_ctx *ctx, uint32_t addr, int *fd_out, uint32_t *port_out) {
  char name[48];
  addr_name(addr, 0, name, sizeof name);
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return FAIL(ctx, CKPT_ESYS, "socket for a listener on %s: %s", name, strerror(errno));
  sock_tune(fd);  /* accepted connections inherit the buffer sizes */
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr = {.s_addr = addr}};
  socklen_t sl = sizeof sa;
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(fd, 512) != 0 ||
      getsockname(fd, (struct sockaddr *)&sa, &sl) != 0) {
    int err = errno;
    close(fd);
    return FAIL(ctx, CKPT_ESYS, "listen on %s: %s", name, strerror(err));
  }
  *fd_out = fd;
  *port_out = ntohs(sa.sin_port);
  return CKPT_OK;
}

/* The address to listen on: $CKPT_HOST_COMM_ADDR if set, else dflt (network order). */
static int env_addr(ckpt_ctx *ctx, uint32_t dflt, uint32_t *out) {
  const char *s = getenv("CKPT_HOST_COMM_ADDR");
  struct in_addr a;
  if (s == NULL || s[0] == '\0') {
    *out = dflt;
    return CKPT_OK;
  }
  if (inet_pton(AF_INET, s, &a) != 1)
    return FAIL(ctx, CKPT_EINVAL, "CKPT_HOST_COMM_ADDR '%s' is not an IPv4 address", s);
  *out = a.s_addr;
  return CKPT_OK;
}

static int random_bytes(ckpt_ctx *ctx, void *p, size_t len) {
  uint8_t *out = p;
  size_t got = 0;
  while (got < len) {
    ssize_t n = getrandom(out + got, len - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == ENOSYS) break;  /* a kernel before 3.17: /dev/urandom below */
    CHECK_SYS(ctx, n > 0, "getrandom for a communicator id");
    got += (size_t)n;
  }
  if (got == len) return CKPT_OK;
  int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  CHECK_SYS(ctx, fd >= 0, "open /dev/urandom");
  while (got < len) {
    ssize_t n = read(fd, out + got, len - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int err = n < 0 ? errno : EIO;
      close(fd);
      return FAIL(ctx, CKPT_ESYS, "read /dev/urandom: %s", strerror(err));
    }
    got += (size_t)n;
  }
  close(fd);
  return CKPT_OK;
}

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

static void *boot_main(void *arg) {
  boot *b = arg;
  boot_member *m = NULL;
  size_t n = 0, cap = 0;
  int32_t nranks = 0;
  int64_t covered = 0, deadline = mono_ms() + BOOT_TIMEOUT_MS;
  int status = CKPT_OK;
  char error[256] = "";
  for (;;) {
    int64_t left = deadline - mono_ms();
    if (left <= 0) {
      status = CKPT_ETIMEDOUT;
      snprintf(error, sizeof error, "only %lld of %d ranks joined within %d s", (long long)covered,
               (int)nranks, BOOT_TIMEOUT_MS / 1000);
      break;
    }
    struct pollfd pf[2] = {{.fd = b->lfd, .events = POLLIN}, {.fd = b->cancel_fd, .events = POLLIN}};
    int pr = poll(pf, 2, (int)left);
    if (pr < 0 && errno != EINTR) {
      status = CKPT_ESYS;
      snprintf(error, sizeof error, "bootstrap poll: %s", strerror(errno));
      break;
    }
    if (pr <= 0) continue;
    if (pf[1].revents != 0) {
      status = CKPT_EINVAL;
      snprintf(error, sizeof error, "the id was used for a communicator within one process");
      break;
    }
    if ((pf[0].revents & (POLLERR | POLLHUP | POLLNVAL)) != 0) {
      status = CKPT_ESYS;
      snprintf(error, sizeof error, "the bootstrap listener failed");
      break;
    }
    int fd = accept4(b->lfd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno != EINTR && errno != ECONNABORTED) usleep(10 * 1000);  /* EMFILE and the like */
      continue;
    }
    boot_hello h;
    sock_timeouts(fd, 5000);
    if (io_all(fd, &h, sizeof h, 0, NULL) != 0 || h.magic != HELLO_MAGIC) {
      close(fd);  /* not a participant */
      continue;
    }
    if (h.nonce != b->nonce) {
      boot_reply_send(fd, CKPT_EINVAL, "communicator id mismatch (a stale id?)", NULL, 0);
      close(fd);
      continue;
    }
    if (n == cap) {
      size_t ncap = cap ? 2 * cap : 8;
      boot_member *grown = realloc(m, ncap * sizeof *m);
      if (grown == NULL) {
        boot_reply_send(fd, CKPT_ENOMEM, "bootstrap out of memory", NULL, 0);
        close(fd);
        status = CKPT_ENOMEM;
        snprintf(error, sizeof error, "bootstrap out of memory");
        break;
      }
      m = grown;
      cap = ncap;
    }
    m[n++] = (boot_member){.fd = fd, .h = h};
    char who[96], other[96];
    member_name(&h, who, sizeof who);
    if (h.nranks < 1 || h.first_rank < 0 || h.ndev < 1 || (int64_t)h.first_rank + h.ndev > h.nranks) {
      status = CKPT_EINVAL;
      snprintf(error, sizeof error, "%s: not inside a communicator of %d ranks", who, h.nranks);
      break;
    }
    if (n == 1) nranks = h.nranks;
    if (h.nranks != nranks) {
      member_name(&m[0].h, other, sizeof other);
      status = CKPT_EINVAL;
      snprintf(error, sizeof error, "nranks mismatch: %s says %d ranks, %s says %d", other,
               (int)nranks, who, (int)h.nranks);
      break;
    }
    for (size_t j = 0; j + 1 < n && status == CKPT_OK; j++) {
      const boot_hello *o = &m[j].h;
      if (h.first_rank < o->first_rank + o->ndev && o->first_rank < h.first_rank + h.ndev) {
        member_name(o, other, sizeof other);
        status = CKPT_EINVAL;
        snprintf(error, sizeof error, "ranks overlap: %s and %s", other, who);
      }
    }
    if (status != CKPT_OK) break;
    covered += h.ndev;
    if (covered == nranks) break;  /* no overlaps, all inside 0..nranks-1: all covered */
  }
  boot_entry *t = NULL;
  if (status == CKPT_OK) {
    qsort(m, n, sizeof *m, member_cmp);
    t = calloc(n, sizeof *t);
    if (t == NULL) {
      status = CKPT_ENOMEM;
      snprintf(error, sizeof error, "bootstrap out of memory");
    }
    for (size_t i = 0; t != NULL && i < n; i++)
      t[i] = (boot_entry){.first_rank = m[i].h.first_rank, .ndev = m[i].h.ndev,
                          .addr = m[i].h.addr, .port = m[i].h.port};
  }
  for (size_t i = 0; i < n; i++) {
    boot_reply_send(m[i].fd, status, error, t, n);
    close(m[i].fd);
  }
  free(t);
  free(m);
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
  return NULL;
}

/* Stops this process's bootstrap for `nonce`, if it still runs. */
static void boot_cancel(uint64_t nonce) {
  pthread_mutex_lock(&boots_mu);
  for (boot *b = boots; b != NULL; b = b->next)
    if (b->nonce == nonce) {
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
static int comm_join(ckpt_ctx *ctx, const comm_id *id, int32_t nranks, int32_t first_rank,
                     int32_t ndev, int64_t deadline, int *lfd, boot_entry **table, uint32_t *nprocs) {
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

static void peers_close(comm_peer *p, int32_t n) {
  for (int32_t i = 0; p != NULL && i < n; i++)
    if (p[i].fd >= 0) close(p[i].fd);
  free(p);
}

/* Connects to every process of the table with a higher first rank and accepts a connection
 * from every one with a lower first rank; each connection starts with a handshake both ways
 * naming the communicator (nonce) and the sender. Connecting does not wait for the other
 * side to accept (the kernel queues the connection on its listener), so connecting to every
 * higher process first, then accepting, cannot deadlock. */
static int comm_connect(ckpt_ctx *ctx, uint64_t nonce, int32_t me, int lfd, const boot_entry *t,
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

/* ---- broadcasts across processes ---------------------------------------------------- */
/* One broadcast of a communicator spanning processes. Each local stream gets an OP_XBCAST
 * operation that marks its arrival (the stream's earlier work is done) and then holds the
 * stream until the communicator thread has finished the broadcast, so that later work on
 * the stream sees the bytes. The communicator thread runs broadcasts in call order: waits
 * for every local stream to arrive, then sends the root's bytes to every other process (the
 * root is local) or receives them into local rank 0's buffer (it is not), then copies to
 * the other local ranks. The last of the stream operations and the thread frees it. */
struct xbcast {
  xbcast *next;            /* the communicator's queue */
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

static void xbcast_release(xbcast *x) {
  pthread_mutex_lock(&x->mu);
  int last = --x->refs == 0;
  pthread_mutex_unlock(&x->mu);
  if (!last) return;
  pthread_cond_destroy(&x->cv);
  pthread_mutex_destroy(&x->mu);
  free(x);
}

/* The stream worker's side. A failed broadcast fails the stream (see ckpt_stream). */
void xbcast_stream(ckpt_stream *s, xbcast *x) {
  pthread_mutex_lock(&x->mu);
  x->arrived++;
  pthread_cond_broadcast(&x->cv);
  while (!x->done) pthread_cond_wait(&x->cv, &x->mu);
  if (x->status != CKPT_OK && s->fail_status == CKPT_OK) {
    s->fail_status = x->status;
    memcpy(s->fail_detail, x->detail, sizeof s->fail_detail);
  }
  pthread_mutex_unlock(&x->mu);
  xbcast_release(x);
}

static int comm_aborting(ckpt_comm *c) { return __atomic_load_n(&c->aborting, __ATOMIC_ACQUIRE); }

/* Waits until every local stream has reached the broadcast; 0 if the communicator is aborted
 * first (checked every 100 ms). */
static int xbcast_await_streams(ckpt_comm *c, xbcast *x) {
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
static int xbcast_run(ckpt_comm *c, xbcast *x, char *detail, size_t dlen) {
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
    xbcast *x = c->head;
    if (x != NULL && (c->head = x->next) == NULL) c->tail = NULL;
    int st = c->err_status;
    if (x != NULL && st != CKPT_OK)
      detailf(detail, sizeof detail, "broadcast #%llu not run: the communicator failed: %s",
               (unsigned long long)x->seq, c->err_detail);
    pthread_mutex_unlock(&c->mu);
    if (x == NULL) return NULL;  /* stop requested and the queue is drained */
    if (st == CKPT_OK && (!xbcast_await_streams(c, x) || comm_aborting(c))) {
      st = CKPT_ESYS;
      snprintf(detail, sizeof detail, "broadcast #%llu not run: the communicator was aborted",
               (unsigned long long)x->seq);
    }
    if (st == CKPT_OK) {
      st = xbcast_run(c, x, detail, sizeof detail);
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
    xbcast_release(x);
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
  /* A limit beyond a century is no limit (and cannot overflow the deadline). */
  const int64_t deadline =
      timeout_ms < 0 || timeout_ms > ((int64_t)100 * 365 * 86400 * 1000) ? INT64_MAX / 2 : mono_ms() + timeout_ms;
  comm_id id;
  CHECK(id_parse(ctx, idb, &id));
  int lfd = -1;
  boot_entry *table = NULL;
  uint32_t nprocs = 0;
  comm_peer *peers = NULL;
  int32_t npeers = 0;
  int st = comm_join(ctx, &id, nranks, first_rank, ndev, deadline, &lfd, &table, &nprocs);
  if (st == CKPT_OK)
    st = comm_connect(ctx, id.nonce, first_rank, lfd, table, nprocs, deadline, &peers, &npeers);
  if (lfd >= 0) close(lfd);
  free(table);
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

static int xbcast_enqueue(ckpt_comm *c, int32_t root, ckpt_buf *const *bufs,
                          ckpt_stream *const *streams, uint64_t offset, uint64_t len) {
  ckpt_ctx *ctx = c->ctx;
  char detail[sizeof c->err_detail];
  pthread_mutex_lock(&c->mu);
  int st = c->err_status;
  if (st != CKPT_OK) memcpy(detail, c->err_detail, sizeof detail);
  pthread_mutex_unlock(&c->mu);
  if (st != CKPT_OK) return FAIL(ctx, st, "the communicator failed: %s", detail);
  if (len == 0) return CKPT_OK;
  /* Everything allocated first: a failure queues nothing. */
  stream_op *ops[MAX_LOCAL_RANKS] = {0};
  xbcast *x = calloc(1, sizeof *x + (size_t)c->ndev * sizeof x->dst[0]);
  int ok = x != NULL;
  for (int32_t i = 0; ok && i < c->ndev; i++) ok = (ops[i] = malloc(sizeof *ops[i])) != NULL;
  if (!ok) {
    for (int32_t i = 0; i < c->ndev; i++) free(ops[i]);
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
    *ops[i] = (stream_op){.kind = OP_XBCAST, .xb = x};
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
/* Opens a bootstrap listener and starts its thread (see above); the id names it. An id made
 * for a communicator of local ranks only is never joined: ckpt_comm_init stops its bootstrap
 * at once; otherwise it lasts until every rank joined, or 60 s. */
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

CKPT_API int ckpt_comm_init(ckpt_ctx *ctx, const uint8_t id[CKPT_COMM_ID_BYTES], int32_t nranks,
                            int32_t first_rank, int32_t ndev, const int32_t *devices,
                            int64_t timeout_ms, ckpt_comm **out) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK(ckpt__comm_init_check(ctx, id, nranks, first_rank, ndev, devices, out, check_device));
  if (nranks != ndev)
    return comm_init_remote(ctx, id, nranks, first_rank, ndev, devices, timeout_ms, out);
  /* All ranks are local: nothing waits for other ranks, and the id's bootstrap (if it runs in
   * this process) is not needed. Any id is accepted. */
  comm_id v;
  memcpy(&v, id, sizeof v);
  if (v.magic == ID_MAGIC) boot_cancel(v.nonce);
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

/* Across processes: see "broadcasts across processes" above. All ranks local:
 * the root's stream gets one operation: once the root stream's earlier work is done it lets
 * every destination copy, then holds the root stream until they have. Each other stream gets
 * one operation that waits for the root to get there, after the stream's own earlier work,
 * and copies len bytes at offset from the root buffer into its own. */
CKPT_API int ckpt_broadcast(ckpt_comm *comm, int32_t root, ckpt_buf *const *bufs,
                            ckpt_stream *const *streams, uint64_t offset, uint64_t len) {
  CHECK_ARG(NULL, comm != NULL);
  ckpt_ctx *ctx = comm->ctx;
  CHECK_ARG(ctx, bufs != NULL && streams != NULL);
  /* Every argument before anything is queued. */
  for (int32_t i = 0; i < comm->ndev; i++) {
    const ckpt_buf *b = bufs[i];
    const ckpt_stream *s = streams[i];
    const ckpt__place bp = {b ? b->ctx : NULL, b ? b->device : -1, b ? (uint64_t)b->len : 0};
    const ckpt__place sp = {s ? s->ctx : NULL, s ? s->device : -1, 0};
    CHECK(ckpt__bcast_check_rank(ctx, i, comm->devices[i], b ? &bp : NULL, s ? &sp : NULL, offset, len));
  }
  CHECK(ckpt__bcast_check_root(ctx, root, comm->nranks));
  if (comm->remote) return xbcast_enqueue(comm, root, bufs, streams, offset, len);
  if (len == 0 || comm->ndev == 1) return CKPT_OK;  /* nothing to copy */

  /* Everything allocated first: a failure queues nothing. Global rank r is local rank r. */
  stream_op *ops[MAX_LOCAL_RANKS] = {0};
  bcast *b = malloc(sizeof *b);
  int ok = b != NULL;
  for (int32_t i = 0; ok && i < comm->ndev; i++) {
    ops[i] = malloc(sizeof *ops[i] + (i == root ? 0 : sizeof(ckpt_range)));
    ok = ops[i] != NULL;
  }
  if (!ok) {
    for (int32_t i = 0; i < comm->ndev; i++) free(ops[i]);
    free(b);
    return FAIL(ctx, CKPT_ENOMEM, "broadcast over %d devices", comm->ndev);
  }
  *b = (bcast){.copies_left = comm->ndev - 1, .comm = comm};
  pthread_mutex_init(&b->mu, NULL);
  pthread_cond_init(&b->cv, NULL);
  uint64_t src = (uint64_t)(uintptr_t)bufs[root]->address + offset;
  for (int32_t i = 0; i < comm->ndev; i++) {
    if (i == root) {
      *ops[i] = (stream_op){.kind = OP_BCAST_ROOT, .bc = b};
    } else {
      *ops[i] = (stream_op){.kind = OP_BCAST_COPY, .bc = b, .dst = bufs[i]->address, .n = 1};
      ops[i]->ranges[0] = (ckpt_range){.src = src, .dst_offset = offset, .len = len};
    }
  }
  pthread_mutex_lock(&comm->mu);
  comm->inflight++;
  pthread_mutex_unlock(&comm->mu);
  pthread_mutex_lock(&bcast_enqueue_mu);
  for (int32_t i = 0; i < comm->ndev; i++) stream_push(streams[i], ops[i]);
  pthread_mutex_unlock(&bcast_enqueue_mu);
  return CKPT_OK;
}

/* ---- NCCL --------------------------------------------------------------------------- */
CKPT_API int ckpt_nccl_version(ckpt_ctx *ctx, int32_t *version) {
  CHECK_ARG(NULL, ctx != NULL);
  if (version != NULL) *version = 0;
  return FAIL(ctx, CKPT_EUNSUPPORTED, "host backend: collectives run over TCP, not NCCL");
}
