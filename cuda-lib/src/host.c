/* The host backend: "devices" are host memory, buffers are memfds, streams are threads, and
 * collectives are copies between the streams of one process, or run over TCP between
 * processes (one connection between every two processes, served by one thread per
 * communicator). */
#define _GNU_SOURCE
#include "common.h"

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
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <time.h>
#include <unistd.h>

/* Like CHECK_SYS, for functions that must unwind: ESYS naming the call and errno. */
#define SYS_GOTO(ctx, cond, st, label, what) \
  CHECK_GOTO((cond) ? CKPT_OK : sys_fail((ctx), __FILE__, __LINE__, (what)), st, label)

static int sys_fail(ckpt_ctx *ctx, const char *file, int line, const char *what) {
  return ckpt__fail(ctx, CKPT_ESYS, file, line, "%s: %s", what, strerror(errno));
}

struct ckpt_buf {
  ckpt_ctx *ctx;
  uint8_t *address;  /* a MAP_SHARED mapping of fd */
  size_t len;
  int32_t device;
  int fd;            /* memfd, allocated here or opened through /proc/<pid>/fd */
  int imported;
};

typedef struct bcast bcast;
typedef struct xbcast xbcast;

typedef enum op_kind {
  OP_COPY,        /* copies the ranges into dst */
  OP_MARK,        /* completes record `seq` of event */
  OP_WAIT,        /* waits until event has completed record `seq` */
  OP_BCAST_ROOT,  /* a broadcast's root: releases the copies, waits until they are done */
  OP_BCAST_COPY,  /* a broadcast's destination: waits for the root, then copies the ranges */
  OP_XBCAST,      /* a broadcast across processes: arrives, then waits for the comm thread */
} op_kind;

/* One queued operation. */
typedef struct stream_op {
  struct stream_op *next;
  op_kind kind;
  ckpt_event *event;  /* OP_MARK, OP_WAIT */
  uint64_t seq;       /* OP_MARK, OP_WAIT */
  bcast *bc;          /* OP_BCAST_ROOT, OP_BCAST_COPY */
  xbcast *xb;         /* OP_XBCAST */
  uint8_t *dst;       /* OP_COPY, OP_BCAST_COPY */
  size_t n;
  ckpt_range ranges[];
} stream_op;

struct ckpt_stream {
  ckpt_ctx *ctx;
  int32_t device;
  pthread_t thread;
  pthread_mutex_t mu;  /* guards the queue and stop */
  pthread_cond_t cv;   /* signalled when work is queued or stop is set */
  stream_op *head, *tail;
  int stop;
  /* Set by the worker when a collective queued on the stream failed, and kept (as a CUDA
   * stream keeps a fault): every event recorded on the stream afterwards reports it. Only
   * the worker reads or writes these. */
  int fail_status;
  char fail_detail[320];
};

/* Lifetime: ckpt_event_destroy waits until no queued marker or wait references the event
 * (pending == 0), so a stream worker never touches a freed event and no refcount is
 * needed. The wait is bounded by the work queued ahead of those operations (a wait only
 * ever waits for a marker queued before it). */
struct ckpt_event {
  ckpt_ctx *ctx;
  int32_t device;
  pthread_mutex_t mu;
  pthread_cond_t cv;   /* CLOCK_MONOTONIC; broadcast when a marker or a wait completes */
  uint64_t recorded;   /* sequence number of the latest record */
  uint64_t completed;  /* highest sequence number whose marker the worker reached */
  uint64_t pending;    /* markers and waits queued but not reached or passed yet */
  int fail_status;     /* the stream's failure when the marker `completed` was reached */
  char fail_detail[320];
};

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

CKPT_API const char *ckpt_backend(void) { return "host"; }

/* ---- context ------------------------------------------------------------------------ */
CKPT_API int ckpt_ctx_create(const ckpt_ctx_options *opts, ckpt_ctx **out) {
  CHECK_ARG(NULL, out != NULL);
  *out = NULL;
  ckpt_ctx *ctx = calloc(1, sizeof *ctx);
  if (ctx == NULL) return FAIL(NULL, CKPT_ENOMEM, "ckpt_ctx_create: context");
  int st = ckpt__ctx_init(ctx, opts);
  if (st == CKPT_OK) *out = ctx;
  else free(ctx);
  return st;
}

CKPT_API int ckpt_ctx_destroy(ckpt_ctx *ctx) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK(ckpt__ctx_fini(ctx));
  free(ctx);
  return CKPT_OK;
}

/* ---- devices ------------------------------------------------------------------------ */
static int check_device(ckpt_ctx *ctx, int32_t index) {
  if (index < 0 || index >= ctx->host_devices)
    return FAIL(ctx, CKPT_ENODEV, "device %d does not exist: this context has %d host devices",
                index, ctx->host_devices);
  return CKPT_OK;
}

/* 8 hex chars naming this machine: /etc/machine-id, else an FNV-1a hash of the hostname. */
static void machine_tag(char out[9]) {
  FILE *f = fopen("/etc/machine-id", "re");
  int ok = f != NULL && fscanf(f, "%8[0-9a-f]", out) == 1 && strlen(out) == 8;
  if (f != NULL) fclose(f);
  if (ok) return;
  char host[256] = "";
  if (gethostname(host, sizeof host - 1) != 0) host[0] = '\0';
  uint32_t h = 2166136261u;
  for (const char *p = host; *p; p++) h = (h ^ (uint8_t)*p) * 16777619u;
  snprintf(out, 9, "%08x", (unsigned)h);
}

static void meminfo(uint64_t *avail, uint64_t *total) {
  unsigned long long kb, t = 0, a = 0;
  char line[128];
  FILE *f = fopen("/proc/meminfo", "re");
  while (f != NULL && fgets(line, sizeof line, f) != NULL) {
    if (sscanf(line, "MemTotal: %llu kB", &kb) == 1) t = kb * 1024;
    else if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) a = kb * 1024;
  }
  if (f != NULL) fclose(f);
  struct sysinfo si;
  if ((t == 0 || a == 0) && sysinfo(&si) == 0) {  /* no procfs, or a kernel before 3.14 */
    t = (unsigned long long)si.totalram * si.mem_unit;
    a = ((unsigned long long)si.freeram + si.bufferram) * si.mem_unit;
  }
  *total = t;
  *avail = a;
}

CKPT_API int ckpt_device_count(ckpt_ctx *ctx, int32_t *count) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, count != NULL);
  *count = ctx->host_devices;
  return CKPT_OK;
}

CKPT_API int ckpt_device_info_get(ckpt_ctx *ctx, int32_t index, ckpt_device_info *info) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, info != NULL);
  if (info->size != sizeof(ckpt_device_info))
    return FAIL(ctx, CKPT_EABI, "ckpt_device_info size %u, library expects %zu", info->size,
                sizeof(ckpt_device_info));
  CHECK(check_device(ctx, index));
  char tag[9];
  machine_tag(tag);
  *info = (ckpt_device_info){.size = sizeof *info, .index = index, .pci_bus = -1, .numa_node = -1};
  snprintf(info->uuid, sizeof info->uuid, "HOST-%s-%d", tag, (int)index);
  snprintf(info->name, sizeof info->name, "host memory");
  meminfo(&info->free_bytes, &info->total_bytes);
  return CKPT_OK;
}

/* ---- pinned host memory ------------------------------------------------------------- */
CKPT_API int ckpt_host_alloc(ckpt_ctx *ctx, size_t len, void **out) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, out != NULL);
  *out = NULL;
  CHECK_ARG(ctx, len > 0);
  void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    return FAIL(ctx, CKPT_ENOMEM, "ckpt_host_alloc of %zu bytes: mmap: %s", len, strerror(errno));
  int st = ckpt__region_add(ctx, p, len, 1);
  if (st == CKPT_OK) *out = p;
  else munmap(p, len);
  return st;
}

CKPT_API int ckpt_host_free(ckpt_ctx *ctx, void *ptr) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, ptr != NULL);
  size_t len;
  CHECK(ckpt__region_remove(ctx, ptr, 1, &len));
  munmap(ptr, len);
  return CKPT_OK;
}

CKPT_API int ckpt_host_register(ckpt_ctx *ctx, void *ptr, size_t len, uint32_t flags) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, ptr != NULL);
  CHECK_ARG(ctx, len > 0);
  CHECK_ARG(ctx, (flags & ~CKPT_REGISTER_READONLY) == 0);
  /* The mapping stays the caller's; nothing to pin on the host, only bookkeeping. */
  return ckpt__region_add(ctx, ptr, len, 0);
}

CKPT_API int ckpt_host_unregister(ckpt_ctx *ctx, void *ptr) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, ptr != NULL);
  size_t len;
  return ckpt__region_remove(ctx, ptr, 0, &len);
}

/* ---- buffers ------------------------------------------------------------------------ */
/* Maps fd (proto.len bytes, shared) into a new handle that owns fd; closes fd on failure. */
static int buf_wrap(ckpt_ctx *ctx, int fd, ckpt_buf proto, ckpt_buf **out) {
  int st = CKPT_OK;
  ckpt_buf *b = malloc(sizeof *b);
  CHECK_GOTO(b != NULL ? CKPT_OK : FAIL(ctx, CKPT_ENOMEM, "buffer handle"), st, fail);
  void *p = mmap(NULL, proto.len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  SYS_GOTO(ctx, p != MAP_FAILED, st, fail, "mmap of the buffer memfd");
  *b = proto;
  b->ctx = ctx;
  b->fd = fd;
  b->address = p;
  ckpt__live(ctx, +1);
  *out = b;
  return CKPT_OK;
fail:
  free(b);
  close(fd);
  return st;
}

CKPT_API int ckpt_buf_alloc(ckpt_ctx *ctx, int32_t device, size_t len, ckpt_buf **out) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, out != NULL);
  *out = NULL;
  CHECK(check_device(ctx, device));
  CHECK_ARG(ctx, len > 0);
  int st = CKPT_OK;
  int fd = memfd_create("ckpt-buf", MFD_CLOEXEC);
  CHECK_SYS(ctx, fd >= 0, "memfd_create");
  SYS_GOTO(ctx, ftruncate(fd, (off_t)len) == 0, st, fail, "ftruncate of the buffer memfd");
  return buf_wrap(ctx, fd, (ckpt_buf){.device = device, .len = len}, out);
fail:
  close(fd);
  return st;
}

CKPT_API int ckpt_buf_free(ckpt_buf *buf) {
  CHECK_ARG(NULL, buf != NULL);
  munmap(buf->address, buf->len);
  close(buf->fd);
  ckpt__live(buf->ctx, -1);
  free(buf);
  return CKPT_OK;
}

CKPT_API int ckpt_buf_info(ckpt_buf *buf, uint64_t *address, uint64_t *len, int32_t *device) {
  CHECK_ARG(NULL, buf != NULL);
  if (address != NULL) *address = (uint64_t)(uintptr_t)buf->address;
  if (len != NULL) *len = buf->len;
  if (device != NULL) *device = buf->device;
  return CKPT_OK;
}

CKPT_API int ckpt_buf_read(ckpt_buf *buf, uint64_t offset, void *dst, uint64_t len) {
  CHECK_ARG(NULL, buf != NULL);
  CHECK_ARG(buf->ctx, dst != NULL || len == 0);
  if (offset > buf->len || len > buf->len - offset)
    return FAIL(buf->ctx, CKPT_ERANGE, "read of %llu bytes at offset %llu of a %zu-byte buffer",
                (unsigned long long)len, (unsigned long long)offset, buf->len);
  if (len > 0) memcpy(dst, buf->address + offset, len);
  return CKPT_OK;
}

/* ---- IPC ---------------------------------------------------------------------------- */
CKPT_API int ckpt_buf_export(ckpt_buf *buf, ckpt_ipc_handle *out) {
  CHECK_ARG(NULL, buf != NULL);
  CHECK_ARG(buf->ctx, out != NULL);
  if (out->size != sizeof(ckpt_ipc_handle))
    return FAIL(buf->ctx, CKPT_EABI, "ckpt_ipc_handle size %u, library expects %zu", out->size,
                sizeof(ckpt_ipc_handle));
  if (buf->imported)
    return FAIL(buf->ctx, CKPT_EINVAL, "an imported buffer cannot be exported again");
  *out = (ckpt_ipc_handle){.size = sizeof *out, .kind = CKPT_IPC_HOST, .len = buf->len,
                           .device = buf->device, .pid = (int32_t)getpid()};
  snprintf((char *)out->data, sizeof out->data, "/proc/%d/fd/%d", (int)out->pid, buf->fd);
  return CKPT_OK;
}

CKPT_API int ckpt_buf_import(ckpt_ctx *ctx, const ckpt_ipc_handle *handle, ckpt_buf **out) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, handle != NULL && out != NULL);
  *out = NULL;
  if (handle->size != sizeof(ckpt_ipc_handle))
    return FAIL(ctx, CKPT_EABI, "ckpt_ipc_handle size %u, library expects %zu", handle->size,
                sizeof(ckpt_ipc_handle));
  if (handle->kind == CKPT_IPC_CUDA)
    return FAIL(ctx, CKPT_EHANDLE, "a CUDA IPC handle cannot be imported by the host backend");
  if (handle->kind != CKPT_IPC_HOST)
    return FAIL(ctx, CKPT_EHANDLE, "unknown IPC handle kind %u", handle->kind);
  if (memchr(handle->data, '\0', sizeof handle->data) == NULL)
    return FAIL(ctx, CKPT_EHANDLE, "IPC handle path is not NUL-terminated");
  if (handle->len == 0)
    return FAIL(ctx, CKPT_EHANDLE, "IPC handle length %llu", (unsigned long long)handle->len);
  CHECK(check_device(ctx, handle->device));
  const char *path = (const char *)handle->data;
  int fd = open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0)
    return FAIL(ctx, CKPT_ESYS, "open %s (exporter pid %d): %s", path, (int)handle->pid,
                strerror(errno));
  int st = CKPT_OK;
  struct stat sb;
  SYS_GOTO(ctx, fstat(fd, &sb) == 0, st, fail, "fstat of the imported buffer");
  if ((uint64_t)sb.st_size != handle->len) {
    st = FAIL(ctx, CKPT_EHANDLE, "%s is %lld bytes but the handle says %llu", path,
              (long long)sb.st_size, (unsigned long long)handle->len);
    goto fail;
  }
  return buf_wrap(ctx, fd, (ckpt_buf){.device = handle->device, .len = handle->len, .imported = 1},
                  out);
fail:
  close(fd);
  return st;
}

/* ---- streams ------------------------------------------------------------------------ */
static void event_reached(ckpt_event *ev, uint64_t seq, const ckpt_stream *s) {
  pthread_mutex_lock(&ev->mu);
  if (seq > ev->completed) {
    ev->completed = seq;
    ev->fail_status = s->fail_status;
    if (s->fail_status != CKPT_OK) memcpy(ev->fail_detail, s->fail_detail, sizeof ev->fail_detail);
  }
  ev->pending--;
  pthread_cond_broadcast(&ev->cv);
  pthread_mutex_unlock(&ev->mu);  /* after this the event may be destroyed */
}

/* Blocks the worker until the event's record `seq` has completed. */
static void event_await(ckpt_event *ev, uint64_t seq) {
  pthread_mutex_lock(&ev->mu);
  while (ev->completed < seq) pthread_cond_wait(&ev->cv, &ev->mu);
  ev->pending--;
  pthread_cond_broadcast(&ev->cv);  /* ckpt_event_destroy may wait for pending == 0 */
  pthread_mutex_unlock(&ev->mu);    /* after this the event may be destroyed */
}

static void comm_op_done(ckpt_comm *c) {
  pthread_mutex_lock(&c->mu);
  c->inflight--;
  pthread_cond_broadcast(&c->cv);
  pthread_mutex_unlock(&c->mu);  /* after this the communicator may be destroyed */
}

/* The root's side: earlier work on the root stream is done, so the destinations may copy;
 * later work on it waits until they have (as NCCL's root does until its sends are done), so
 * that it may overwrite the root buffer and an event recorded after it means completion. */
static void bcast_root(bcast *b) {
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

static void bcast_await_root(bcast *b) {
  pthread_mutex_lock(&b->mu);
  while (!b->root_reached) pthread_cond_wait(&b->cv, &b->mu);
  pthread_mutex_unlock(&b->mu);
}

static void bcast_copied(bcast *b) {
  pthread_mutex_lock(&b->mu);
  if (--b->copies_left == 0) pthread_cond_broadcast(&b->cv);
  pthread_mutex_unlock(&b->mu);  /* after this the root may free b */
}

static void run_copies(const stream_op *op) {
  for (size_t i = 0; i < op->n; i++)
    memcpy(op->dst + op->ranges[i].dst_offset, (const void *)(uintptr_t)op->ranges[i].src,
           op->ranges[i].len);
}

static void xbcast_stream(ckpt_stream *s, xbcast *x);

static void *stream_worker(void *arg) {
  ckpt_stream *s = arg;
  for (;;) {
    pthread_mutex_lock(&s->mu);
    while (s->head == NULL && !s->stop) pthread_cond_wait(&s->cv, &s->mu);
    stream_op *op = s->head;
    if (op != NULL && (s->head = op->next) == NULL) s->tail = NULL;
    pthread_mutex_unlock(&s->mu);
    if (op == NULL) return NULL;  /* stop requested and the queue is drained */
    switch (op->kind) {
      case OP_COPY: run_copies(op); break;
      case OP_MARK: event_reached(op->event, op->seq, s); break;
      case OP_WAIT: event_await(op->event, op->seq); break;
      case OP_BCAST_ROOT: bcast_root(op->bc); break;
      case OP_BCAST_COPY:
        bcast_await_root(op->bc);
        run_copies(op);
        bcast_copied(op->bc);
        break;
      case OP_XBCAST: xbcast_stream(s, op->xb); break;
    }
    free(op);
  }
}

static void stream_push(ckpt_stream *s, stream_op *op) {
  op->next = NULL;
  pthread_mutex_lock(&s->mu);
  if (s->tail != NULL) s->tail->next = op;
  else s->head = op;
  s->tail = op;
  pthread_cond_signal(&s->cv);
  pthread_mutex_unlock(&s->mu);
}

CKPT_API int ckpt_stream_create(ckpt_ctx *ctx, int32_t device, ckpt_stream **out) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, out != NULL);
  *out = NULL;
  CHECK(check_device(ctx, device));
  ckpt_stream *s = calloc(1, sizeof *s);
  if (s == NULL) return FAIL(ctx, CKPT_ENOMEM, "ckpt_stream_create: handle");
  *s = (ckpt_stream){.ctx = ctx, .device = device};
  pthread_mutex_init(&s->mu, NULL);
  pthread_cond_init(&s->cv, NULL);
  int rc = pthread_create(&s->thread, NULL, stream_worker, s);
  if (rc != 0) {
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s);
    return FAIL(ctx, CKPT_ESYS, "pthread_create of a stream worker: %s", strerror(rc));
  }
  pthread_setname_np(s->thread, "ckpt-stream");
  ckpt__live(ctx, +1);
  *out = s;
  return CKPT_OK;
}

CKPT_API int ckpt_stream_destroy(ckpt_stream *stream) {
  CHECK_ARG(NULL, stream != NULL);
  pthread_mutex_lock(&stream->mu);
  stream->stop = 1;
  pthread_cond_signal(&stream->cv);
  pthread_mutex_unlock(&stream->mu);
  pthread_join(stream->thread, NULL);  /* the worker drains the queue before it exits */
  pthread_cond_destroy(&stream->cv);
  pthread_mutex_destroy(&stream->mu);
  ckpt__live(stream->ctx, -1);
  free(stream);
  return CKPT_OK;
}

CKPT_API int ckpt_h2d_async(ckpt_stream *stream, ckpt_buf *dst, const ckpt_range *ranges,
                            size_t n) {
  CHECK_ARG(NULL, stream != NULL);
  ckpt_ctx *ctx = stream->ctx;
  CHECK_ARG(ctx, dst != NULL);
  CHECK(ckpt__ranges_check(ctx, ranges, n, dst->len));
  if (dst->device != stream->device)
    return FAIL(ctx, CKPT_EINVAL, "buffer on device %d, stream on device %d", dst->device,
                stream->device);
  if (n == 0) return CKPT_OK;
  stream_op *op = malloc(sizeof *op + n * sizeof *ranges);
  if (op == NULL) return FAIL(ctx, CKPT_ENOMEM, "copy batch of %zu ranges", n);
  *op = (stream_op){.kind = OP_COPY, .dst = dst->address, .n = n};
  memcpy(op->ranges, ranges, n * sizeof *ranges);
  stream_push(stream, op);
  return CKPT_OK;
}

/* ---- events ------------------------------------------------------------------------- */
CKPT_API int ckpt_event_create(ckpt_ctx *ctx, int32_t device, ckpt_event **out) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, out != NULL);
  *out = NULL;
  CHECK(check_device(ctx, device));
  ckpt_event *ev = calloc(1, sizeof *ev);
  if (ev == NULL) return FAIL(ctx, CKPT_ENOMEM, "ckpt_event_create: handle");
  *ev = (ckpt_event){.ctx = ctx, .device = device};
  pthread_condattr_t attr;
  pthread_condattr_init(&attr);
  pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
  pthread_cond_init(&ev->cv, &attr);
  pthread_condattr_destroy(&attr);
  pthread_mutex_init(&ev->mu, NULL);
  ckpt__live(ctx, +1);
  *out = ev;
  return CKPT_OK;
}

CKPT_API int ckpt_event_destroy(ckpt_event *event) {
  CHECK_ARG(NULL, event != NULL);
  pthread_mutex_lock(&event->mu);
  while (event->pending > 0) pthread_cond_wait(&event->cv, &event->mu);
  pthread_mutex_unlock(&event->mu);
  pthread_cond_destroy(&event->cv);
  pthread_mutex_destroy(&event->mu);
  ckpt__live(event->ctx, -1);
  free(event);
  return CKPT_OK;
}

CKPT_API int ckpt_event_record(ckpt_event *event, ckpt_stream *stream) {
  CHECK_ARG(NULL, event != NULL);
  CHECK_ARG(event->ctx, stream != NULL);
  if (event->device != stream->device)
    return FAIL(event->ctx, CKPT_EINVAL, "event on device %d, stream on device %d",
                event->device, stream->device);
  stream_op *op = malloc(sizeof *op);
  if (op == NULL) return FAIL(event->ctx, CKPT_ENOMEM, "event marker");
  *op = (stream_op){.kind = OP_MARK, .event = event};
  pthread_mutex_lock(&event->mu);
  op->seq = ++event->recorded;
  event->pending++;
  pthread_mutex_unlock(&event->mu);
  stream_push(stream, op);
  return CKPT_OK;
}

CKPT_API int ckpt_stream_wait_event(ckpt_stream *stream, ckpt_event *event) {
  CHECK_ARG(NULL, stream != NULL);
  ckpt_ctx *ctx = stream->ctx;
  CHECK_ARG(ctx, event != NULL);
  if (event->ctx != ctx) return FAIL(ctx, CKPT_EHANDLE, "event belongs to another context");
  /* The event may be on another device. Allocated first: a failure then changes nothing. */
  stream_op *op = malloc(sizeof *op);
  if (op == NULL) return FAIL(ctx, CKPT_ENOMEM, "event wait");
  pthread_mutex_lock(&event->mu);
  uint64_t target = event->recorded;  /* a later record does not move this wait */
  int needed = event->completed < target;  /* never recorded, or complete: nothing to wait for */
  if (needed) event->pending++;  /* keeps the event alive until the worker has passed the wait */
  pthread_mutex_unlock(&event->mu);
  if (!needed) {
    free(op);
    return CKPT_OK;
  }
  *op = (stream_op){.kind = OP_WAIT, .event = event, .seq = target};
  stream_push(stream, op);
  return CKPT_OK;
}

/* A completed event's status: CKPT_OK, or its stream's failure (with the detail recorded on
 * the context) when a collective queued before it on that stream failed. */
static int event_status(ckpt_event *event) {
  char detail[sizeof event->fail_detail];
  pthread_mutex_lock(&event->mu);
  int st = event->fail_status;
  if (st != CKPT_OK) memcpy(detail, event->fail_detail, sizeof detail);
  pthread_mutex_unlock(&event->mu);
  if (st == CKPT_OK) return CKPT_OK;
  return FAIL(event->ctx, st, "event %p: a collective queued before it failed: %s", (void *)event,
              detail);
}

CKPT_API int ckpt_event_query(ckpt_event *event) {
  CHECK_ARG(NULL, event != NULL);
  pthread_mutex_lock(&event->mu);
  int done = event->completed >= event->recorded;
  pthread_mutex_unlock(&event->mu);
  return done ? event_status(event) : CKPT_EAGAIN;
}

CKPT_API int ckpt_event_wait(ckpt_event *event, int64_t timeout_ms) {
  CHECK_ARG(NULL, event != NULL);
  int forever = timeout_ms < 0;
  struct timespec deadline;
  clock_gettime(CLOCK_MONOTONIC, &deadline);
  if (!forever) {  /* INT64_MAX ms is ~2.9e8 years: no time_t overflow */
    long ns = deadline.tv_nsec + (long)(timeout_ms % 1000) * 1000000L;
    deadline.tv_sec += (time_t)(timeout_ms / 1000) + ns / 1000000000L;
    deadline.tv_nsec = ns % 1000000000L;
  }
  pthread_mutex_lock(&event->mu);
  uint64_t target = event->recorded;  /* a record made while waiting does not extend the wait */
  int timed_out = 0;
  while (event->completed < target && !timed_out) {
    if (forever) pthread_cond_wait(&event->cv, &event->mu);
    else timed_out = pthread_cond_timedwait(&event->cv, &event->mu, &deadline) == ETIMEDOUT;
  }
  int done = event->completed >= target;
  pthread_mutex_unlock(&event->mu);
  return done ? event_status(event)
              : FAIL(event->ctx, CKPT_ETIMEDOUT, "event %p not complete after %lld ms",
                     (void *)event, (long long)timeout_ms);
}

/* ---- collectives -------------------------------------------------------------------- */
/* A broadcast queues operations on several streams. Pushing all of one broadcast's under this
 * lock gives every stream the same order of broadcasts, so that two broadcasts queued at once
 * from different threads cannot wait for each other in a cycle. */
static pthread_mutex_t bcast_enqueue_mu = PTHREAD_MUTEX_INITIALIZER;

#define MAX_LOCAL_RANKS 64  /* distinct devices of one context: at most host_devices (<= 64) */

CKPT_API int ckpt_comm_id_new(ckpt_ctx *ctx, uint8_t id[CKPT_COMM_ID_BYTES]) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, id != NULL);
  size_t got = 0;
  while (got < CKPT_COMM_ID_BYTES) {
    ssize_t n = getrandom(id + got, CKPT_COMM_ID_BYTES - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == ENOSYS) break;  /* a kernel before 3.17: /dev/urandom below */
    CHECK_SYS(ctx, n > 0, "getrandom for a communicator id");
    got += (size_t)n;
  }
  if (got == CKPT_COMM_ID_BYTES) return CKPT_OK;
  int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  CHECK_SYS(ctx, fd >= 0, "open /dev/urandom");
  while (got < CKPT_COMM_ID_BYTES) {
    ssize_t n = read(fd, id + got, CKPT_COMM_ID_BYTES - got);
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

CKPT_API int ckpt_comm_init(ckpt_ctx *ctx, const uint8_t id[CKPT_COMM_ID_BYTES], int32_t nranks,
                            int32_t first_rank, int32_t ndev, const int32_t *devices,
                            ckpt_comm **out) {
  CHECK_ARG(NULL, ctx != NULL);
  CHECK_ARG(ctx, out != NULL);
  *out = NULL;
  CHECK_ARG(ctx, id != NULL);
  if (ndev < 1) return FAIL(ctx, CKPT_EINVAL, "ndev %d: a communicator needs a local device", ndev);
  CHECK_ARG(ctx, devices != NULL);
  if (first_rank < 0 || nranks < 1 || (int64_t)first_rank + ndev > nranks)
    return FAIL(ctx, CKPT_EINVAL, "local ranks %d..%lld do not fit in a communicator of %d ranks",
                first_rank, (long long)first_rank + ndev - 1, nranks);
  for (int32_t i = 0; i < ndev; i++) {
    CHECK(check_device(ctx, devices[i]));
    for (int32_t j = 0; j < i; j++)
      if (devices[j] == devices[i])
        return FAIL(ctx, CKPT_EINVAL, "device %d is listed twice (local ranks %d and %d)",
                    devices[i], j, i);
  }
  if (nranks != ndev || first_rank != 0)
    return FAIL(ctx, CKPT_EUNSUPPORTED,
                "communicator of %d ranks with ranks %d..%d in this process: the host backend's "
                "TCP transport between processes is not implemented yet",
                nranks, first_rank, first_rank + ndev - 1);
  /* All ranks are local: the id names nothing to join, and nothing waits for other ranks. */
  ckpt_comm *c = calloc(1, sizeof *c + (size_t)ndev * sizeof *devices);
  if (c == NULL) return FAIL(ctx, CKPT_ENOMEM, "ckpt_comm_init: communicator of %d devices", ndev);
  c->ctx = ctx;
  c->nranks = nranks;
  c->ndev = ndev;
  memcpy(c->devices, devices, (size_t)ndev * sizeof *devices);
  pthread_mutex_init(&c->mu, NULL);
  pthread_cond_init(&c->cv, NULL);
  ckpt__live(ctx, +1);
  *out = c;
  return CKPT_OK;
}

CKPT_API int ckpt_comm_destroy(ckpt_comm *comm) {
  CHECK_ARG(NULL, comm != NULL);
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

/* No peer can hang a host communicator (all ranks are local): abort is destroy. */
CKPT_API int ckpt_comm_abort(ckpt_comm *comm) { return ckpt_comm_destroy(comm); }

/* The root's stream gets one operation: once the root stream's earlier work is done it lets
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
    if (b == NULL || s == NULL)
      return FAIL(ctx, CKPT_EINVAL, "local rank %d: %s is NULL", i, b == NULL ? "buffer" : "stream");
    if (b->ctx != ctx || s->ctx != ctx)
      return FAIL(ctx, CKPT_EHANDLE, "local rank %d: %s belongs to another context", i,
                  b->ctx != ctx ? "buffer" : "stream");
    if (b->device != comm->devices[i] || s->device != comm->devices[i])
      return FAIL(ctx, CKPT_EINVAL, "local rank %d is device %d, but its %s is on device %d", i,
                  comm->devices[i], b->device != comm->devices[i] ? "buffer" : "stream",
                  b->device != comm->devices[i] ? b->device : s->device);
    if (offset > b->len || len > b->len - offset)
      return FAIL(ctx, CKPT_ERANGE,
                  "broadcast of %llu bytes at offset %llu: local rank %d's buffer has %zu bytes",
                  (unsigned long long)len, (unsigned long long)offset, i, b->len);
  }
  if (root < 0 || root >= comm->nranks)
    return FAIL(ctx, CKPT_EINVAL, "root %d outside the communicator's ranks 0..%d", root,
                comm->nranks - 1);
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
