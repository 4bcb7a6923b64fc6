/* Pulls of pinned host memory between daemons over UCX (ucp active messages), on both
 * backends. One ckpt_ucx is a UCX worker driven by its own progress thread: it serves the
 * regions this process exposes to the peers that connect to its listener, and fetches ranges
 * of other daemons' regions into this process's pinned memory.
 *
 * A fetch is a request message (AM_REQUEST: region, its key, offset, length, op id) to the
 * source, which answers with one reply (AM_REPLY: op id, status) carrying the bytes straight
 * from the exposed memory: UCX picks eager or rendezvous (zero-copy where the transport has it,
 * RDMA reads on verbs) by size, and the receiver lands them in the op's destination. Every UCX
 * call happens on the progress thread; the API's calls queue commands for it and wake it.
 * Completions are collected for ckpt_ucx_wait. UCX itself is loaded with dlopen on the first
 * ckpt_ucx_create (ucx_abi.h declares what is used). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/random.h>
#include <time.h>

#include "common.h"
#include "ucx_abi.h"

#define AM_REQUEST 17u
#define AM_REPLY 18u
#define WIRE_MAGIC 0x636b7074u /* "ckpt" */
#define WIRE_VERSION 1u
#define MAX_CONNS 256
/* Connections from one address that have not yet named a region with its key: a stranger who
 * reconnects holds at most an eighth of the MAX_CONNS slots (a puller proves each of its lanes
 * with its first request, within milliseconds; two pullers of 16 lanes on one host fit). */
#define MAX_UNPROVEN_PER_HOST 32
#define DEFAULT_INFLIGHT 64
#define DEFAULT_IDLE_MS 60000
#define DETAIL 256

typedef struct req_hdr {
  uint32_t magic, version;
  uint64_t op, region, offset, len;
  uint8_t key[CKPT_UCX_KEY_BYTES];
} req_hdr;

typedef struct rep_hdr {
  uint32_t magic;
  int32_t status;
  uint64_t op, len;
} rep_hdr;

typedef struct region {
  uint64_t id;
  uintptr_t base;
  uint64_t len;
  uint8_t key[CKPT_UCX_KEY_BYTES];
  int closing;
  int64_t refs; /* sends reading it, under ucx->mu */
  struct region *next;
} region;

/* A connection a peer opened to this process's listener (progress thread only). */
typedef struct conn {
  ux_ep_h ep;
  int broken;       /* close now (an error, a flood): sends in flight are cut */
  int done;         /* close once its sends are out (it was refused, or stayed idle) */
  int64_t last_ms;  /* its last request that named a region and its key */
  int proven;       /* it has named a region with its key */
  struct sockaddr_storage from; /* the peer's address (port aside, what MAX_UNPROVEN_PER_HOST counts) */
  int64_t inflight;
  void *closing; /* the close request, once closed */
  struct conn *next;
} conn;

/* One reply being sent: what it reads and from which connection. */
typedef struct send_rec {
  struct ckpt_ucx *ucx;
  region *reg;
  conn *via;
  rep_hdr hdr;
  void *bounce; /* the test fault's corrupted copy */
  struct send_rec *prev, *next; /* ucx->sends: every send in flight (progress thread only) */
} send_rec;

enum { OP_QUEUED, OP_REQUESTED, OP_LANDING, OP_RECEIVING };

typedef struct op {
  uint64_t id;
  struct ckpt_ucx_peer *peer;
  int state;
  req_hdr hdr;
  void *dst;
  uint64_t len;
  void *desc; /* a rendezvous descriptor to receive (OP_LANDING) */
  struct op *prev, *next;
} op;

struct ckpt_ucx_peer {
  struct ckpt_ucx *ucx;
  char name[80];
  struct sockaddr_storage addr;
  socklen_t addrlen;
  ux_ep_h ep;
  int status;          /* CKPT_OK until it fails or is disconnected */
  char error[DETAIL];  /* why, under ucx->mu */
  int dropped;         /* ckpt_ucx_disconnect was called */
  int64_t ops;         /* outstanding */
  int64_t queued;      /* commands naming it, not run yet: it is not freed before they ran */
  void *closing;
  struct ckpt_ucx_peer *next;
};

enum { CMD_CONNECT, CMD_FETCH, CMD_DISCONNECT, CMD_KILL_READERS };
typedef struct cmd {
  int kind;
  struct ckpt_ucx_peer *peer;
  op *o;
  uint64_t region; /* CMD_KILL_READERS: the region whose readers are cut (0: every connection sending) */
  struct cmd *next;
} cmd;

typedef struct done_rec {
  uint64_t op;
  int32_t status;
} done_rec;

struct ckpt_ucx {
  ckpt_ctx *ctx;
  ux_api api;
  void *lib;
  ux_context_h context;
  ux_worker_h worker;
  ux_listener_h listener;
  int efd;
  uint32_t flags;
  int64_t max_inflight;
  int64_t idle_ms;
  char address[80];
  unsigned version[3];
  pthread_t thread;
  /* progress thread only */
  op *ops; /* outstanding, requested or receiving */
  struct send_rec *sends; /* replies in flight */
  conn *conns;
  int nconns;
  /* under mu */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int stop;
  cmd *cmds, *cmds_tail;
  done_rec *done;
  size_t ndone, cap_done;
  size_t reserved; /* fetches not finished: done has room for each of them */
  region *regions;
  uint64_t next_region, next_op;
  struct ckpt_ucx_peer *peers;
};

/* ---- loading UCX ------------------------------------------------------------------- */

static int ucx_load(ckpt_ctx *ctx, const char *path, ux_api *api, void **lib_out) {
  /* UCX installs handlers for SIGSEGV, SIGBUS and others as it loads, replacing the guard's
   * (see Signals in ckpt.h): a read of a truncated mapped file would then kill the process.
   * Unless the user chose otherwise, it installs none. */
  setenv("UCX_ERROR_SIGNALS", "", 0);
  /* UCX's memory hooks (UCM) test themselves when first installed, during the first ucp_init:
   * that test moves the program break up a page and back to the value it read before, while
   * this process's other threads may be growing the malloc heap with brk at the same time (in
   * Node ckpt_ucx_create runs on a worker thread). The restore then cuts off heap memory malloc
   * has just handed out, and a later touch of it kills the process (SIGSEGV in a source daemon
   * of the P2P tests, about one CI run in four). The hooks also patch libc's mmap, munmap, brk
   * and madvise in place while other threads run them. Unless the user chose otherwise, none
   * are installed: UCX then registers memory per transfer instead of caching registrations. */
  setenv("UCX_MEM_EVENTS", "no", 0);
  /* RTLD_NODELETE: UCX keeps threads and atexit handlers of its own. */
  void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (lib == NULL) {
    const char *e = dlerror();
    return FAIL(ctx, CKPT_EUCX, "UCX is not available: dlopen %s: %s (install UCX, e.g. Debian's libucx0)", path,
                e ? e : "unknown error");
  }
  const struct {
    const char *name;
    void *slot;
  } syms[] = {
      {"ucp_get_version", &api->get_version},
      {"ucp_config_read", &api->config_read},
      {"ucp_config_modify", &api->config_modify},
      {"ucp_config_release", &api->config_release},
      {"ucp_init_version", &api->init_version},
      {"ucp_cleanup", &api->cleanup},
      {"ucp_worker_create", &api->worker_create},
      {"ucp_worker_destroy", &api->worker_destroy},
      {"ucp_worker_progress", &api->worker_progress},
      {"ucp_worker_get_efd", &api->worker_get_efd},
      {"ucp_worker_arm", &api->worker_arm},
      {"ucp_worker_signal", &api->worker_signal},
      {"ucp_worker_set_am_recv_handler", &api->worker_set_am_recv_handler},
      {"ucp_listener_create", &api->listener_create},
      {"ucp_listener_destroy", &api->listener_destroy},
      {"ucp_listener_query", &api->listener_query},
      {"ucp_listener_reject", &api->listener_reject},
      {"ucp_conn_request_query", &api->conn_request_query},
      {"ucp_ep_create", &api->ep_create},
      {"ucp_ep_close_nbx", &api->ep_close_nbx},
      {"ucp_am_send_nbx", &api->am_send_nbx},
      {"ucp_am_recv_data_nbx", &api->am_recv_data_nbx},
      {"ucp_am_data_release", &api->am_data_release},
      {"ucp_request_check_status", &api->request_check_status},
      {"ucp_request_free", &api->request_free},
      {"ucs_status_string", &api->status_string},
  };
  for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
    dlerror();
    void *p = dlsym(lib, syms[i].name);
    if (p == NULL) {
      const char *e = dlerror();
      dlclose(lib);
      return FAIL(ctx, CKPT_EUCX, "dlsym %s in %s: %s (UCX too old? 1.11 or newer is needed)", syms[i].name, path,
                  e ? e : "symbol not found");
    }
    memcpy(syms[i].slot, &p, sizeof p);
  }
  *lib_out = lib;
  return CKPT_OK;
}

#define UFAIL(u, st, what) \
  FAIL((u)->ctx, CKPT_EUCX, "%s: %s", (what), (u)->api.status_string((ux_status)(st)))

/* ---- addresses --------------------------------------------------------------------- */

/* "ip:port" or "[ip6]:port" into a socket address. */
static int parse_addr(ckpt_ctx *ctx, const char *text, struct sockaddr_storage *out, socklen_t *len) {
  char host[64];
  const char *colon = strrchr(text, ':');
  if (colon == NULL || colon == text) return FAIL(ctx, CKPT_EINVAL, "address \"%s\" is not ip:port", text);
  const char *h = text;
  size_t hl = (size_t)(colon - text);
  if (h[0] == '[' && hl >= 2 && h[hl - 1] == ']') h++, hl -= 2;
  if (hl >= sizeof host) return FAIL(ctx, CKPT_EINVAL, "address \"%s\" is too long", text);
  memcpy(host, h, hl);
  host[hl] = 0;
  struct addrinfo hints = {.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV, .ai_socktype = SOCK_STREAM}, *res = NULL;
  int rc = getaddrinfo(host, colon + 1, &hints, &res);
  if (rc != 0) return FAIL(ctx, CKPT_EINVAL, "address \"%s\": %s", text, gai_strerror(rc));
  memcpy(out, res->ai_addr, res->ai_addrlen);
  *len = res->ai_addrlen;
  freeaddrinfo(res);
  return CKPT_OK;
}

static void format_addr(const struct sockaddr_storage *a, char *out, size_t len) {
  char host[INET6_ADDRSTRLEN] = "?";
  if (a->ss_family == AF_INET6) {
    const struct sockaddr_in6 *s = (const struct sockaddr_in6 *)a;
    inet_ntop(AF_INET6, &s->sin6_addr, host, sizeof host);
    snprintf(out, len, "[%s]:%u", host, ntohs(s->sin6_port));
  } else {
    const struct sockaddr_in *s = (const struct sockaddr_in *)a;
    inet_ntop(AF_INET, &s->sin_addr, host, sizeof host);
    snprintf(out, len, "%s:%u", host, ntohs(s->sin_port));
  }
}

/* ---- completions ------------------------------------------------------------------- */

/* Hands op's outcome to ckpt_ucx_wait and frees it. Progress thread. */
static void op_finish(struct ckpt_ucx *u, op *o, int status) {
  if (o->state != OP_QUEUED) {
    if (o->prev) o->prev->next = o->next;
    else u->ops = o->next;
    if (o->next) o->next->prev = o->prev;
  }
  pthread_mutex_lock(&u->mu);
  u->done[u->ndone++] = (done_rec){o->id, status}; /* room reserved by ckpt_ucx_fetch */
  u->reserved--;
  o->peer->ops--;
  pthread_cond_broadcast(&u->cv);
  pthread_mutex_unlock(&u->mu);
  free(o);
}

/* Marks a peer failed with a detail (the first failure is kept). */
static void peer_fail(struct ckpt_ucx_peer *p, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void peer_fail(struct ckpt_ucx_peer *p, int status, const char *fmt, ...) {
  pthread_mutex_lock(&p->ucx->mu);
  if (p->status == CKPT_OK) {
    p->status = status;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->error, sizeof p->error, fmt, ap);
    va_end(ap);
  }
  pthread_mutex_unlock(&p->ucx->mu);
}

/* Ends every op of peer p that is not mid-receive (UCX completes those): they fail with its status. */
static void peer_fail_ops(struct ckpt_ucx *u, struct ckpt_ucx_peer *p) {
  for (op *o = u->ops, *next; o; o = next) {
    next = o->next;
    if (o->peer != p || o->state == OP_RECEIVING) continue;
    if (o->state == OP_LANDING) u->api.am_data_release(u->worker, o->desc);
    op_finish(u, o, p->status);
  }
}

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Closes an endpoint: forced (what is in flight is dropped), or flushed first. */
static void close_ep(struct ckpt_ucx *u, ux_ep_h ep, void **closing, int force) {
  ux_request_param prm = {.op_attr_mask = UX_OP_ATTR_FIELD_FLAGS, .flags = force ? UX_EP_CLOSE_FLAG_FORCE : 0};
  void *r = u->api.ep_close_nbx(ep, &prm);
  *closing = (r == NULL || UX_PTR_IS_ERR(r)) ? (void *)1 : r;
}

/* Whether a close request has finished (and frees it). */
static int closed(struct ckpt_ucx *u, void **closing) {
  if (*closing == NULL) return 0;
  if (*closing == (void *)1) return 1;
  if (u->api.request_check_status(*closing) == UX_INPROGRESS) return 0;
  u->api.request_free(*closing);
  *closing = (void *)1;
  return 1;
}

/* ---- the serving side -------------------------------------------------------------- */

static void send_release(send_rec *s) {
  struct ckpt_ucx *u = s->ucx;
  if (s->prev) s->prev->next = s->next;
  else if (u->sends == s) u->sends = s->next;
  if (s->next) s->next->prev = s->prev;
  if (s->via) s->via->inflight--;
  if (s->reg) {
    pthread_mutex_lock(&u->mu);
    s->reg->refs--;
    pthread_cond_broadcast(&u->cv);
    pthread_mutex_unlock(&u->mu);
  }
  free(s->bounce);
  free(s);
}

static void send_done(void *request, ux_status status, void *user) {
  send_rec *s = (send_rec *)user;
  struct ckpt_ucx *u = s->ucx;
  if (status != UX_OK && s->via) s->via->broken = 1;
  send_release(s);
  u->api.request_free(request);
}

/* Sends the reply for one request: the bytes of reg (or none, with an error status). */
static void reply(struct ckpt_ucx *u, conn *c, uint64_t op_id, int status, region *reg, const void *src, uint64_t len) {
  send_rec *s = (send_rec *)calloc(1, sizeof *s);
  if (s == NULL) {
    if (reg) {
      pthread_mutex_lock(&u->mu);
      reg->refs--;
      pthread_mutex_unlock(&u->mu);
    }
    c->broken = 1; /* nothing can be said: the peer sees the connection close */
    return;
  }
  *s = (send_rec){.ucx = u, .reg = reg, .via = c, .hdr = {WIRE_MAGIC, status, op_id, status ? 0 : len}};
  if (status == CKPT_OK && (u->flags & CKPT_UCX_FAULT_CORRUPT) && len > 0) {
    s->bounce = malloc(len);
    if (s->bounce) {
      memcpy(s->bounce, src, len);
      ((uint8_t *)s->bounce)[len / 2] ^= 0x5a;
      src = s->bounce;
    }
  }
  c->inflight++;
  s->next = u->sends;
  if (u->sends) u->sends->prev = s;
  u->sends = s;
  /* REPLY: the puller learns which connection the answer came on, and takes answers to its
   * requests only from the connection it asked on. */
  ux_request_param prm = {.op_attr_mask = UX_OP_ATTR_FIELD_CALLBACK | UX_OP_ATTR_FIELD_USER_DATA |
                                          UX_OP_ATTR_FIELD_MEMORY_TYPE | UX_OP_ATTR_FIELD_FLAGS,
                          .flags = UX_AM_SEND_FLAG_REPLY,
                          .cb = {.send = send_done},
                          .user_data = s,
                          .memory_type = UX_MEMORY_TYPE_HOST};
  void *r = u->api.am_send_nbx(c->ep, AM_REPLY, &s->hdr, sizeof s->hdr, status ? NULL : src,
                               status ? 0 : len, &prm);
  if (r == NULL || UX_PTR_IS_ERR(r)) {
    if (r != NULL) c->broken = 1;
    send_release(s);
  }
}

static conn *conn_of(struct ckpt_ucx *u, ux_ep_h ep) {
  for (conn *c = u->conns; c; c = c->next)
    if (c->ep == ep) return c;
  return NULL;
}

static int keys_equal(const uint8_t *a, const uint8_t *b) {
  uint8_t diff = 0;
  for (int i = 0; i < CKPT_UCX_KEY_BYTES; i++) diff |= (uint8_t)(a[i] ^ b[i]);
  return diff == 0;
}

/* AM_REQUEST: checks the request against the exposed regions and answers it. */
static ux_status on_request(void *arg, const void *header, size_t header_len, void *data, size_t length,
                            const ux_am_recv_param *param) {
  struct ckpt_ucx *u = (struct ckpt_ucx *)arg;
  (void)data;
  if (!(param->recv_attr & UX_AM_RECV_ATTR_FIELD_REPLY_EP)) return UX_OK;
  conn *c = conn_of(u, param->reply_ep);
  if (c == NULL || c->broken) return UX_OK;
  req_hdr h;
  if (header_len != sizeof h || length != 0) {
    c->broken = 1; /* not a ckpt peer: it is disconnected */
    return UX_OK;
  }
  memcpy(&h, header, sizeof h);
  if (h.magic != WIRE_MAGIC || h.version != WIRE_VERSION) {
    c->broken = 1;
    return UX_OK;
  }
  if (c->inflight >= u->max_inflight) {
    /* More at once than any ckpt puller asks (answers to refused requests count too): a peer
     * that floods is cut off rather than answered, so it cannot make this worker queue sends. */
    c->broken = 1;
    return UX_OK;
  }
  pthread_mutex_lock(&u->mu);
  region *r = u->regions;
  while (r && r->id != h.region) r = r->next;
  int status = CKPT_OK;
  if (r == NULL || r->closing || !keys_equal(r->key, h.key)) status = CKPT_EHANDLE;
  else if (h.offset > r->len || h.len > r->len - h.offset) status = CKPT_ERANGE;
  else r->refs++;
  pthread_mutex_unlock(&u->mu);
  if (status != CKPT_OK) {
    /* Told why, then let go: a puller with a wrong key or range has nothing more to ask here. */
    reply(u, c, h.op, status, NULL, NULL, 0);
    c->done = 1;
  } else {
    c->last_ms = now_ms();
    c->proven = 1;
    reply(u, c, h.op, CKPT_OK, r, (const void *)(r->base + h.offset), h.len);
  }
  return UX_OK;
}

static void on_conn_error(void *arg, ux_ep_h ep, ux_status status) {
  (void)status;
  conn *c = conn_of((struct ckpt_ucx *)arg, ep);
  if (c) c->broken = 1;
}

/* Whether two socket addresses name the same host (the port aside). */
static int same_host(const struct sockaddr_storage *a, const struct sockaddr_storage *b) {
  if (a->ss_family != b->ss_family) return 0;
  if (a->ss_family == AF_INET)
    return ((const struct sockaddr_in *)a)->sin_addr.s_addr == ((const struct sockaddr_in *)b)->sin_addr.s_addr;
  if (a->ss_family == AF_INET6)
    return memcmp(&((const struct sockaddr_in6 *)a)->sin6_addr, &((const struct sockaddr_in6 *)b)->sin6_addr,
                  sizeof(struct in6_addr)) == 0;
  return 0;
}

/* Connections from the host of `from` that are open and have not proven themselves yet. */
static int unproven_from(struct ckpt_ucx *u, const struct sockaddr_storage *from) {
  int n = 0;
  for (conn *c = u->conns; c; c = c->next) n += !c->proven && !c->broken && c->closing == NULL && same_host(&c->from, from);
  return n;
}

static void on_conn_request(ux_conn_request_h req, void *arg) {
  struct ckpt_ucx *u = (struct ckpt_ucx *)arg;
  ux_conn_request_attr attr = {.field_mask = UX_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR};
  int known = u->api.conn_request_query(req, &attr) == UX_OK;
  int crowded = known && unproven_from(u, &attr.client_address) >= MAX_UNPROVEN_PER_HOST;
  conn *c = u->nconns < MAX_CONNS && !crowded ? (conn *)calloc(1, sizeof *c) : NULL;
  if (c == NULL) {
    u->api.listener_reject(u->listener, req);
    return;
  }
  if (known) c->from = attr.client_address;
  ux_ep_params prm = {
      .field_mask = UX_EP_PARAM_FIELD_CONN_REQUEST | UX_EP_PARAM_FIELD_ERR_HANDLING_MODE | UX_EP_PARAM_FIELD_ERR_HANDLER,
      .err_mode = UX_ERR_HANDLING_MODE_PEER,
      .err_handler = {on_conn_error, u},
      .conn_request = req,
  };
  if (u->api.ep_create(u->worker, &prm, &c->ep) != UX_OK) {
    free(c);
    return;
  }
  c->last_ms = now_ms();
  c->next = u->conns;
  u->conns = c;
  u->nconns++;
}

/* Closes broken connections, and frees closed ones once their sends are done. */
static void reap_conns(struct ckpt_ucx *u) {
  for (conn **pc = &u->conns; *pc;) {
    conn *c = *pc;
    /* A connection that names no region with its key for idle_ms is closed: a stranger cannot
     * keep one of the MAX_CONNS slots (pullers disconnect after each pull). */
    if (!c->broken && !c->done && c->inflight == 0 && now_ms() - c->last_ms > u->idle_ms) c->done = 1;
    if (c->closing == NULL && c->broken) close_ep(u, c->ep, &c->closing, 1);
    else if (c->closing == NULL && c->done && c->inflight == 0) close_ep(u, c->ep, &c->closing, 0);
    if (c->closing && c->inflight == 0 && closed(u, &c->closing)) {
      *pc = c->next;
      u->nconns--;
      free(c);
      continue;
    }
    pc = &c->next;
  }
}

/* ---- the fetching side ------------------------------------------------------------- */

static void recv_done(void *request, ux_status status, size_t length, void *user) {
  op *o = (op *)user;
  struct ckpt_ucx *u = o->peer->ucx;
  int st = CKPT_OK;
  if (status != UX_OK) {
    peer_fail(o->peer, CKPT_EUCX, "receiving from %s: %s", o->peer->name, u->api.status_string(status));
    st = CKPT_EUCX;
  } else if (length != o->len) {
    st = CKPT_EUCX;
  }
  op_finish(u, o, st);
  if (request) u->api.request_free(request);
}

static op *op_by_id(struct ckpt_ucx *u, uint64_t id) {
  for (op *o = u->ops; o; o = o->next)
    if (o->id == id && o->state == OP_REQUESTED) return o;
  return NULL;
}

/* AM_REPLY: the answer to one of this process's requests. */
static ux_status on_reply(void *arg, const void *header, size_t header_len, void *data, size_t length,
                          const ux_am_recv_param *param) {
  struct ckpt_ucx *u = (struct ckpt_ucx *)arg;
  rep_hdr h;
  if (header_len != sizeof h) return UX_OK;
  memcpy(&h, header, sizeof h);
  op *o = h.magic == WIRE_MAGIC ? op_by_id(u, h.op) : NULL;
  if (o == NULL) return UX_OK; /* an op that was cancelled: its bytes are dropped */
  /* Only the source asked may answer: not another peer connected to this worker's listener. */
  if (!(param->recv_attr & UX_AM_RECV_ATTR_FIELD_REPLY_EP) || param->reply_ep != o->peer->ep) return UX_OK;
  if (h.status != CKPT_OK) {
    /* Only this op failed (the source refused it); the peer stays usable. */
    int known = h.status == CKPT_EHANDLE || h.status == CKPT_ERANGE;
    op_finish(u, o, known ? h.status : CKPT_EUCX);
    return UX_OK;
  }
  if (length != o->len || h.len != o->len) {
    op_finish(u, o, CKPT_EUCX);
    return UX_OK;
  }
  if (param->recv_attr & UX_AM_RECV_ATTR_FLAG_RNDV) {
    o->state = OP_LANDING; /* received in the loop, after this callback returns */
    o->desc = data;
    return UX_INPROGRESS;
  }
  memcpy(o->dst, data, length);
  op_finish(u, o, CKPT_OK);
  return UX_OK;
}

/* Starts the receive of every rendezvous reply that arrived. */
static void land(struct ckpt_ucx *u) {
  for (op *o = u->ops, *next; o; o = next) {
    next = o->next;
    if (o->state != OP_LANDING) continue;
    o->state = OP_RECEIVING;
    ux_request_param prm = {.op_attr_mask = UX_OP_ATTR_FIELD_CALLBACK | UX_OP_ATTR_FIELD_USER_DATA |
                                            UX_OP_ATTR_FIELD_MEMORY_TYPE,
                            .cb = {.recv_am = recv_done},
                            .user_data = o,
                            .memory_type = UX_MEMORY_TYPE_HOST};
    void *r = u->api.am_recv_data_nbx(u->worker, o->desc, o->dst, o->len, &prm);
    if (r == NULL) op_finish(u, o, CKPT_OK);
    else if (UX_PTR_IS_ERR(r)) op_finish(u, o, CKPT_EUCX);
  }
}

static void on_peer_error(void *arg, ux_ep_h ep, ux_status status) {
  struct ckpt_ucx_peer *p = (struct ckpt_ucx_peer *)arg;
  (void)ep;
  peer_fail(p, CKPT_EUCX, "connection to %s failed: %s", p->name, p->ucx->api.status_string(status));
}

static void do_connect(struct ckpt_ucx *u, struct ckpt_ucx_peer *p) {
  ux_ep_params prm = {
      .field_mask = UX_EP_PARAM_FIELD_FLAGS | UX_EP_PARAM_FIELD_SOCK_ADDR | UX_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UX_EP_PARAM_FIELD_ERR_HANDLER,
      .err_mode = UX_ERR_HANDLING_MODE_PEER,
      .err_handler = {on_peer_error, p},
      .flags = UX_EP_PARAMS_FLAGS_CLIENT_SERVER,
      .sockaddr = {(const struct sockaddr *)&p->addr, p->addrlen},
  };
  ux_status st = u->api.ep_create(u->worker, &prm, &p->ep);
  if (st != UX_OK) {
    p->ep = NULL;
    peer_fail(p, CKPT_EUCX, "connecting to %s: %s", p->name, u->api.status_string(st));
  }
}

static void request_sent(void *request, ux_status status, void *user) {
  (void)status; /* a failed send fails the endpoint, which fails the op */
  ((struct ckpt_ucx_peer *)user)->ucx->api.request_free(request);
}

static void do_fetch(struct ckpt_ucx *u, op *o) {
  struct ckpt_ucx_peer *p = o->peer;
  o->state = OP_REQUESTED;
  o->next = u->ops;
  if (u->ops) u->ops->prev = o;
  u->ops = o;
  pthread_mutex_lock(&u->mu);
  int status = p->status;
  pthread_mutex_unlock(&u->mu);
  if (status != CKPT_OK || p->ep == NULL) {
    op_finish(u, o, status != CKPT_OK ? status : CKPT_EUCX);
    return;
  }
  ux_request_param prm = {.op_attr_mask = UX_OP_ATTR_FIELD_CALLBACK | UX_OP_ATTR_FIELD_USER_DATA |
                                          UX_OP_ATTR_FIELD_FLAGS,
                          .flags = UX_AM_SEND_FLAG_REPLY,
                          .cb = {.send = request_sent},
                          .user_data = p};
  void *r = u->api.am_send_nbx(p->ep, AM_REQUEST, &o->hdr, sizeof o->hdr, NULL, 0, &prm);
  if (UX_PTR_IS_ERR(r)) {
    peer_fail(p, CKPT_EUCX, "requesting from %s: %s", p->name, u->api.status_string(UX_PTR_STATUS(r)));
    op_finish(u, o, CKPT_EUCX);
  }
}

/* Frees peers that were disconnected, once closed and without ops. */
static void reap_peers(struct ckpt_ucx *u) {
  for (struct ckpt_ucx_peer **pp = &u->peers, *p; (p = *pp);) {
    pthread_mutex_lock(&u->mu);
    int failed = p->status != CKPT_OK;
    pthread_mutex_unlock(&u->mu);
    if (failed) peer_fail_ops(u, p);
    if ((failed || p->dropped) && p->ep && p->closing == NULL) close_ep(u, p->ep, &p->closing, 1);
    pthread_mutex_lock(&u->mu);
    int gone = p->dropped && p->ops == 0 && p->queued == 0 && (p->ep == NULL || closed(u, &p->closing));
    if (gone) *pp = p->next;
    pthread_mutex_unlock(&u->mu);
    if (gone) free(p);
    else pp = &p->next;
  }
}

/* ---- the progress thread ----------------------------------------------------------- */

static void run_cmd(struct ckpt_ucx *u, cmd *c) {
  switch (c->kind) {
    case CMD_CONNECT:
      pthread_mutex_lock(&u->mu);
      c->peer->next = u->peers;
      u->peers = c->peer;
      pthread_mutex_unlock(&u->mu);
      do_connect(u, c->peer);
      break;
    case CMD_FETCH: do_fetch(u, c->o); break;
    case CMD_DISCONNECT:
      peer_fail(c->peer, CKPT_ECANCELED, "disconnected from %s", c->peer->name);
      c->peer->dropped = 1;
      break;
    case CMD_KILL_READERS:
      for (send_rec *r = u->sends; r; r = r->next)
        if (r->via && (c->region == 0 || (r->reg && r->reg->id == c->region))) r->via->broken = 1;
      break;
  }
  free(c);
}

static void *progress_main(void *arg) {
  struct ckpt_ucx *u = (struct ckpt_ucx *)arg;
  for (;;) {
    pthread_mutex_lock(&u->mu);
    cmd *c = u->cmds;
    u->cmds = u->cmds_tail = NULL;
    int stop = u->stop;
    pthread_mutex_unlock(&u->mu);
    while (c) {
      cmd *next = c->next;
      struct ckpt_ucx_peer *p = c->peer;
      run_cmd(u, c);
      if (p) {
        pthread_mutex_lock(&u->mu);
        p->queued--;
        pthread_mutex_unlock(&u->mu);
      }
      c = next;
    }
    while (u->api.worker_progress(u->worker)) {
    }
    land(u);
    reap_peers(u);
    reap_conns(u);
    if (stop) break;
    ux_status st = u->api.worker_arm(u->worker);
    if (st == UX_ERR_BUSY) continue;
    struct pollfd pfd = {.fd = u->efd, .events = POLLIN};
    poll(&pfd, 1, st == UX_OK ? 100 : 1);
  }
  return NULL;
}

/* Queues a command for the progress thread and wakes it. */
static int enqueue(struct ckpt_ucx *u, int kind, struct ckpt_ucx_peer *p, op *o, uint64_t region) {
  cmd *c = (cmd *)calloc(1, sizeof *c);
  if (c == NULL) return FAIL(u->ctx, CKPT_ENOMEM, "UCX command");
  *c = (cmd){.kind = kind, .peer = p, .o = o, .region = region};
  pthread_mutex_lock(&u->mu);
  if (p) p->queued++;
  if (u->cmds_tail) u->cmds_tail->next = c;
  else u->cmds = c;
  u->cmds_tail = c;
  pthread_mutex_unlock(&u->mu);
  u->api.worker_signal(u->worker);
  return CKPT_OK;
}

/* ---- the API ----------------------------------------------------------------------- */

static int set_handler(struct ckpt_ucx *u, unsigned id, ux_am_recv_cb cb) {
  ux_am_handler_param prm = {.field_mask = UX_AM_HANDLER_PARAM_FIELD_ID | UX_AM_HANDLER_PARAM_FIELD_CB |
                                           UX_AM_HANDLER_PARAM_FIELD_ARG | UX_AM_HANDLER_PARAM_FIELD_FLAGS,
                             .id = id,
                             .flags = UX_AM_FLAG_WHOLE_MSG,
                             .cb = cb,
                             .arg = u};
  ux_status st = u->api.worker_set_am_recv_handler(u->worker, &prm);
  return st == UX_OK ? CKPT_OK : UFAIL(u, st, "ucp_worker_set_am_recv_handler");
}

static int open_listener(struct ckpt_ucx *u, const char *listen) {
  struct sockaddr_storage addr;
  socklen_t len;
  CHECK(parse_addr(u->ctx, listen, &addr, &len));
  ux_listener_params prm = {.field_mask = UX_LISTENER_PARAM_FIELD_SOCK_ADDR | UX_LISTENER_PARAM_FIELD_CONN_HANDLER,
                            .sockaddr = {(const struct sockaddr *)&addr, len},
                            .conn_handler = {on_conn_request, u}};
  ux_status st = u->api.listener_create(u->worker, &prm, &u->listener);
  if (st != UX_OK) {
    u->listener = NULL;
    return FAIL(u->ctx, CKPT_EUCX, "listening on %s: %s", listen, u->api.status_string(st));
  }
  ux_listener_attr attr = {.field_mask = UX_LISTENER_ATTR_FIELD_SOCKADDR};
  st = u->api.listener_query(u->listener, &attr);
  if (st != UX_OK) return UFAIL(u, st, "ucp_listener_query");
  format_addr(&attr.sockaddr, u->address, sizeof u->address);
  return CKPT_OK;
}

static int open_worker(struct ckpt_ucx *u, const ckpt_ucx_options *opts) {
  ux_config *cfg = NULL;
  ux_status st = u->api.config_read(NULL, NULL, &cfg);
  if (st != UX_OK) return UFAIL(u, st, "ucp_config_read");
  if (opts->transports && opts->transports[0]) {
    st = u->api.config_modify(cfg, "TLS", opts->transports);
    if (st != UX_OK) {
      u->api.config_release(cfg);
      return FAIL(u->ctx, CKPT_EINVAL, "UCX transports \"%s\": %s", opts->transports, u->api.status_string(st));
    }
  }
  ux_params prm = {.field_mask = UX_PARAM_FIELD_FEATURES | UX_PARAM_FIELD_NAME,
                   .features = UX_FEATURE_AM | UX_FEATURE_WAKEUP,
                   .name = "ckptd"};
  st = u->api.init_version(UX_API_MAJOR, UX_API_MINOR, &prm, cfg, &u->context);
  u->api.config_release(cfg);
  if (st != UX_OK) {
    u->context = NULL;
    return UFAIL(u, st, "ucp_init");
  }
  /* Room past the declared fields, which UCX leaves unread while their bits are clear. */
  union {
    ux_worker_params p;
    char room[1024];
  } wp;
  memset(&wp, 0, sizeof wp);
  wp.p.field_mask = UX_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.p.thread_mode = UX_THREAD_MODE_SINGLE;
  st = u->api.worker_create(u->context, &wp.p, &u->worker);
  if (st != UX_OK) {
    u->worker = NULL;
    return UFAIL(u, st, "ucp_worker_create");
  }
  st = u->api.worker_get_efd(u->worker, &u->efd);
  if (st != UX_OK) return UFAIL(u, st, "ucp_worker_get_efd");
  CHECK(set_handler(u, AM_REQUEST, on_request));
  CHECK(set_handler(u, AM_REPLY, on_reply));
  if (opts->listen && opts->listen[0]) CHECK(open_listener(u, opts->listen));
  return CKPT_OK;
}

/* Frees what open_worker made (progress thread stopped or never started). */
static void close_worker(struct ckpt_ucx *u) {
  if (u->listener) u->api.listener_destroy(u->listener);
  if (u->worker) u->api.worker_destroy(u->worker);
  if (u->context) u->api.cleanup(u->context);
}

int CKPT_API ckpt_ucx_create(ckpt_ctx *ctx, const ckpt_ucx_options *opts, ckpt_ucx **out) {
  CHECK_ARG(ctx, out != NULL);
  *out = NULL;
  CHECK_ARG(ctx, opts != NULL);
  if (opts->size != sizeof *opts)
    return FAIL(ctx, CKPT_EABI, "ckpt_ucx_options.size %u, expected %zu", opts->size, sizeof *opts);
  struct ckpt_ucx *u = (struct ckpt_ucx *)calloc(1, sizeof *u);
  if (u == NULL) return FAIL(ctx, CKPT_ENOMEM, "UCX worker");
  u->ctx = ctx;
  u->flags = opts->flags;
  u->max_inflight = opts->max_inflight ? opts->max_inflight : DEFAULT_INFLIGHT;
  u->idle_ms = opts->idle_ms ? opts->idle_ms : DEFAULT_IDLE_MS;
  u->next_region = 1;
  u->next_op = 1;
  pthread_mutex_init(&u->mu, NULL);
  pthread_cond_init(&u->cv, NULL);
  int st = ucx_load(ctx, opts->ucp_path ? opts->ucp_path : "libucp.so.0", &u->api, &u->lib);
  if (st == CKPT_OK) {
    u->api.get_version(&u->version[0], &u->version[1], &u->version[2]);
    st = open_worker(u, opts);
  }
  if (st == CKPT_OK && pthread_create(&u->thread, NULL, progress_main, u) != 0)
    st = FAIL(ctx, CKPT_ESYS, "pthread_create: %s", strerror(errno));
  if (st != CKPT_OK) {
    if (u->lib) close_worker(u);
    pthread_cond_destroy(&u->cv);
    pthread_mutex_destroy(&u->mu);
    free(u);
    return st;
  }
  ckpt__live(ctx, 1);
  *out = u;
  return CKPT_OK;
}

int CKPT_API ckpt_ucx_info(ckpt_ucx *u, char *address, size_t len, uint32_t *version) {
  if (u == NULL) return CKPT_EINVAL;
  if (address && len) snprintf(address, len, "%s", u->address);
  if (version) *version = u->version[0] * 10000 + u->version[1] * 100 + u->version[2];
  return CKPT_OK;
}

int CKPT_API ckpt_ucx_destroy(ckpt_ucx *u) {
  if (u == NULL) return CKPT_EINVAL;
  /* Every peer is dropped and every connection closed; the thread runs until they are gone. */
  pthread_mutex_lock(&u->mu);
  for (struct ckpt_ucx_peer *p = u->peers; p; p = p->next) {
    if (p->status == CKPT_OK) {
      p->status = CKPT_ECANCELED;
      snprintf(p->error, sizeof p->error, "the UCX worker was closed");
    }
    p->dropped = 1;
  }
  pthread_mutex_unlock(&u->mu);
  enqueue(u, CMD_KILL_READERS, NULL, NULL, 0);
  for (int i = 0; i < 200; i++) {
    pthread_mutex_lock(&u->mu);
    int busy = u->peers != NULL;
    pthread_mutex_unlock(&u->mu);
    if (!busy) break;
    u->api.worker_signal(u->worker);
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  pthread_mutex_lock(&u->mu);
  u->stop = 1;
  pthread_mutex_unlock(&u->mu);
  u->api.worker_signal(u->worker);
  pthread_join(u->thread, NULL);
  for (conn *c = u->conns; c; c = c->next) {
    if (c->closing == NULL) close_ep(u, c->ep, &c->closing, 1);
  }
  for (int i = 0; i < 100 && u->conns; i++) {
    u->api.worker_progress(u->worker);
    reap_conns(u);
  }
  close_worker(u);
  /* What the thread left: peers it listed after the drop above (a connect queued just before
   * destroy), and their ops; their endpoints went with the worker. */
  for (op *o = u->ops, *n; o; o = n) n = o->next, free(o);
  for (struct ckpt_ucx_peer *p = u->peers, *n; p; p = n) n = p->next, free(p);
  for (region *r = u->regions, *n; r; r = n) n = r->next, free(r);
  for (cmd *c = u->cmds, *n; c; c = n) {
    n = c->next;
    if (c->kind == CMD_CONNECT) free(c->peer); /* never listed */
    free(c->o);
    free(c);
  }
  free(u->done);
  pthread_cond_destroy(&u->cv);
  pthread_mutex_destroy(&u->mu);
  ckpt__live(u->ctx, -1);
  free(u);
  return CKPT_OK;
}

/* 16 random bytes without ever blocking the caller (the API's thread): getrandom, else
 * /dev/urandom while the kernel's pool is still starting (early after boot). */
static int random_key(uint8_t key[CKPT_UCX_KEY_BYTES]) {
  if (getrandom(key, CKPT_UCX_KEY_BYTES, GRND_NONBLOCK) == CKPT_UCX_KEY_BYTES) return CKPT_OK;
  FILE *f = fopen("/dev/urandom", "rb");
  size_t got = f ? fread(key, 1, CKPT_UCX_KEY_BYTES, f) : 0;
  if (f) fclose(f);
  return got == CKPT_UCX_KEY_BYTES ? CKPT_OK : CKPT_ESYS;
}

/* Checks that [p, p+len) lies inside pinned memory of ctx. */
static int check_pinned(ckpt_ctx *ctx, const void *p, uint64_t len) {
  ckpt_range r = {(uint64_t)(uintptr_t)p, 0, len};
  return ckpt__ranges_check(ctx, &r, 1, len);
}

int CKPT_API ckpt_ucx_expose(ckpt_ucx *u, const void *ptr, uint64_t len, uint64_t *id,
                             uint8_t key[CKPT_UCX_KEY_BYTES]) {
  if (u == NULL) return CKPT_EINVAL;
  CHECK_ARG(u->ctx, ptr != NULL && len > 0 && id != NULL && key != NULL);
  CHECK(check_pinned(u->ctx, ptr, len));
  region *r = (region *)calloc(1, sizeof *r);
  if (r == NULL) return FAIL(u->ctx, CKPT_ENOMEM, "UCX region");
  if (random_key(r->key) != CKPT_OK) {
    free(r);
    return FAIL(u->ctx, CKPT_ESYS, "no random bytes for a region key: %s", strerror(errno));
  }
  r->base = (uintptr_t)ptr;
  r->len = len;
  pthread_mutex_lock(&u->mu);
  r->id = u->next_region++;
  r->next = u->regions;
  u->regions = r;
  pthread_mutex_unlock(&u->mu);
  *id = r->id;
  memcpy(key, r->key, sizeof r->key);
  return CKPT_OK;
}

/* Waits on cv until region r has no reader or the deadline passes. Caller holds mu. */
static int wait_unread(struct ckpt_ucx *u, region *r, const struct timespec *deadline) {
  while (r->refs > 0) {
    if (deadline == NULL) pthread_cond_wait(&u->cv, &u->mu);
    else if (pthread_cond_timedwait(&u->cv, &u->mu, deadline) == ETIMEDOUT) return 0;
  }
  return 1;
}

static struct timespec after_ms(int64_t ms) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  ts.tv_sec += ms / 1000;
  ts.tv_nsec += (ms % 1000) * 1000000;
  if (ts.tv_nsec >= 1000000000) ts.tv_sec++, ts.tv_nsec -= 1000000000;
  return ts;
}

int CKPT_API ckpt_ucx_unexpose(ckpt_ucx *u, uint64_t id, int64_t timeout_ms) {
  if (u == NULL) return CKPT_EINVAL;
  pthread_mutex_lock(&u->mu);
  region **pr = &u->regions;
  while (*pr && (*pr)->id != id) pr = &(*pr)->next;
  region *r = *pr;
  if (r == NULL || r->closing) {
    pthread_mutex_unlock(&u->mu);
    return FAIL(u->ctx, CKPT_EHANDLE, "no exposed region %llu", (unsigned long long)id);
  }
  r->closing = 1;
  struct timespec deadline = after_ms(timeout_ms < 0 ? 0 : timeout_ms);
  if (!wait_unread(u, r, &deadline)) {
    /* Readers that take too long lose their connection; their sends then end. */
    pthread_mutex_unlock(&u->mu);
    enqueue(u, CMD_KILL_READERS, NULL, NULL, id);
    pthread_mutex_lock(&u->mu);
    wait_unread(u, r, NULL);
  }
  for (pr = &u->regions; *pr != r;) pr = &(*pr)->next;
  *pr = r->next;
  pthread_mutex_unlock(&u->mu);
  free(r);
  return CKPT_OK;
}

int CKPT_API ckpt_ucx_connect(ckpt_ucx *u, const char *address, ckpt_ucx_peer **out) {
  if (u == NULL) return CKPT_EINVAL;
  CHECK_ARG(u->ctx, address != NULL && out != NULL);
  *out = NULL;
  struct ckpt_ucx_peer *p = (struct ckpt_ucx_peer *)calloc(1, sizeof *p);
  if (p == NULL) return FAIL(u->ctx, CKPT_ENOMEM, "UCX peer");
  int st = parse_addr(u->ctx, address, &p->addr, &p->addrlen);
  if (st != CKPT_OK) {
    free(p);
    return st;
  }
  p->ucx = u;
  snprintf(p->name, sizeof p->name, "%s", address);
  /* The progress thread lists it (CMD_CONNECT): only that thread changes the list of peers. */
  st = enqueue(u, CMD_CONNECT, p, NULL, 0);
  if (st != CKPT_OK) {
    free(p);
    return st;
  }
  *out = p;
  return CKPT_OK;
}

int CKPT_API ckpt_ucx_disconnect(ckpt_ucx_peer *p) {
  if (p == NULL) return CKPT_EINVAL;
  return enqueue(p->ucx, CMD_DISCONNECT, p, NULL, 0);
}

int CKPT_API ckpt_ucx_peer_error(ckpt_ucx_peer *p, char *buf, size_t len) {
  if (p == NULL) return CKPT_EINVAL;
  pthread_mutex_lock(&p->ucx->mu);
  int st = p->status;
  if (buf && len) snprintf(buf, len, "%s", p->error);
  pthread_mutex_unlock(&p->ucx->mu);
  return st;
}

int CKPT_API ckpt_ucx_fetch(ckpt_ucx_peer *p, uint64_t region_id, const uint8_t key[CKPT_UCX_KEY_BYTES],
                            uint64_t offset, uint64_t len, void *dst, uint64_t *op_id) {
  if (p == NULL) return CKPT_EINVAL;
  struct ckpt_ucx *u = p->ucx;
  CHECK_ARG(u->ctx, key != NULL && dst != NULL && op_id != NULL && len > 0);
  CHECK(check_pinned(u->ctx, dst, len));
  op *o = (op *)calloc(1, sizeof *o);
  if (o == NULL) return FAIL(u->ctx, CKPT_ENOMEM, "UCX fetch");
  pthread_mutex_lock(&u->mu);
  if (u->ndone + u->reserved + 1 > u->cap_done) {
    size_t cap = u->cap_done ? u->cap_done * 2 : 64;
    done_rec *d = (done_rec *)realloc(u->done, cap * sizeof *d);
    if (d == NULL) {
      pthread_mutex_unlock(&u->mu);
      free(o);
      return FAIL(u->ctx, CKPT_ENOMEM, "UCX completions");
    }
    u->done = d, u->cap_done = cap;
  }
  u->reserved++;
  o->id = u->next_op++;
  p->ops++;
  pthread_mutex_unlock(&u->mu);
  o->peer = p;
  o->dst = dst;
  o->len = len;
  o->hdr = (req_hdr){.magic = WIRE_MAGIC, .version = WIRE_VERSION, .op = o->id, .region = region_id,
                     .offset = offset, .len = len};
  memcpy(o->hdr.key, key, CKPT_UCX_KEY_BYTES);
  *op_id = o->id;
  int st = enqueue(u, CMD_FETCH, p, o, 0);
  if (st != CKPT_OK) {
    pthread_mutex_lock(&u->mu);
    p->ops--;
    u->reserved--;
    pthread_mutex_unlock(&u->mu);
    free(o);
  }
  return st;
}

int CKPT_API ckpt_ucx_wait(ckpt_ucx *u, int64_t timeout_ms, uint64_t *ops, int32_t *statuses, int32_t max,
                           int32_t *n) {
  if (u == NULL) return CKPT_EINVAL;
  CHECK_ARG(u->ctx, ops != NULL && statuses != NULL && n != NULL && max > 0);
  struct timespec deadline = after_ms(timeout_ms < 0 ? 0 : timeout_ms);
  pthread_mutex_lock(&u->mu);
  while (u->ndone == 0 && !u->stop && timeout_ms != 0) {
    if (pthread_cond_timedwait(&u->cv, &u->mu, &deadline) == ETIMEDOUT) break;
  }
  size_t k = u->ndone < (size_t)max ? u->ndone : (size_t)max;
  for (size_t i = 0; i < k; i++) ops[i] = u->done[i].op, statuses[i] = u->done[i].status;
  memmove(u->done, u->done + k, (u->ndone - k) * sizeof *u->done);
  u->ndone -= k;
  pthread_mutex_unlock(&u->mu);
  *n = (int32_t)k;
  return CKPT_OK;
}
