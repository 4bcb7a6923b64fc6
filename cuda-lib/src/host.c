/* The host backend: "devices" are host memory, buffers are memfds, streams are threads, and
 * collectives are copies between the streams of one process, or run over TCP between
 * processes. This file holds the context, devices, pinned memory, buffers, IPC, streams and
 * events, and host.h what the other files use of them; the communicators are in host_comm.c
 * (on host_boot.c's bootstrap and host_net.c's sockets). */
#define _GNU_SOURCE
#include "host.h"
#include "guard.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <time.h>
#include <unistd.h>

const int ckpt__map_populate = 1;

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

struct ckpt_stream {
  ckpt_ctx *ctx;
  int32_t device;
  pthread_t thread;
  pthread_mutex_t mu;  /* guards the queue and stop */
  pthread_cond_t cv;   /* signalled when work is queued or stop is set */
  stream_op *head, *tail;
  int stop;
  /* Set by stream_fail and kept (as a CUDA stream keeps a fault): every event recorded on
   * the stream afterwards reports it. Only the worker reads or writes these. */
  int fail_status;
  char fail_detail[320];
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
int check_device(ckpt_ctx *ctx, int32_t index) {
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
  /* Resident at once, as cudaHostAlloc's pages are: a copy into it never waits on page faults. */
  void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
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
  /* The mapping stays the caller's; nothing to pin on the host, only bookkeeping. */
  return ckpt__register_add(ctx, ptr, len, flags);
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
  int fd = memfd_create("ckpt-buf", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  CHECK_SYS(ctx, fd >= 0, "memfd_create");
  SYS_GOTO(ctx, ftruncate(fd, (off_t)len) == 0, st, fail, "ftruncate of the buffer memfd");
  /* Importers open it read-write through /proc: sealed so that none can shrink it under the
   * copies into it (which would fault). */
  SYS_GOTO(ctx, fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) == 0, st, fail,
           "sealing the buffer memfd");
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

CKPT_API int ckpt_buf_hash(ckpt_buf *const *bufs, size_t nbufs, const uint64_t *ranges, size_t n,
                           uint64_t *hashes, uint64_t *chunk_hashes, int32_t threads) {
  CHECK_ARG(NULL, bufs != NULL && nbufs > 0 && bufs[0] != NULL);
  ckpt_ctx *ctx = bufs[0]->ctx;
  if (n == 0) return CKPT_OK;
  CHECK_ARG(ctx, hashes != NULL);
  uint64_t *abs;
  CHECK(ckpt__buf_ranges(&host_places, bufs, nbufs, ranges, n, &abs));
  int st = ckpt_hash(ctx, abs, n, hashes, chunk_hashes, threads, NULL);
  free(abs);
  return st;
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
  /* Only the exporter's own descriptor, as ckpt_buf_export names it: no other path is opened. */
  int pid = -1, n = -1, end = 0;
  if (sscanf(path, "/proc/%d/fd/%d%n", &pid, &n, &end) != 2 || path[end] != '\0' || pid != handle->pid || n < 0)
    return FAIL(ctx, CKPT_EHANDLE, "IPC handle path \"%.64s\" is not /proc/%d/fd/<n> of its exporter", path,
                (int)handle->pid);
  int fd = open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0)
    return FAIL(ctx, CKPT_ESYS, "open %s (exporter pid %d): %s", path, (int)handle->pid,
                strerror(errno));
  int st = CKPT_OK;
  /* Only a buffer as ckpt_buf_export makes it: a memfd sealed at its size. Not a file that
   * someone can truncate under the mapping, nor one reached by a name (any path the caller
   * names is opened by this process, which may be root). */
  int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0 || (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW)) {
    st = FAIL(ctx, CKPT_EHANDLE, "%s is not a memfd sealed against shrinking and growing (exporter pid %d)", path,
              (int)handle->pid);
    goto fail;
  }
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
/* Copies ranges into a buffer (ckpt_h2d_async) or out of one (ckpt_d2h_async). */
typedef struct copy_op {
  stream_op op;
  uint8_t *buf;
  int to_host;
  size_t n;
  ckpt_range ranges[];
} copy_op;

/* Completes record `seq` of an event (ckpt_event_record), or waits until that record has
 * completed (ckpt_stream_wait_event). */
typedef struct event_op {
  stream_op op;
  ckpt_event *event;
  uint64_t seq;
} event_op;

/* One range of a copy, as ckpt__guarded runs it. */
typedef struct copy_one {
  uint8_t *dst;
  const uint8_t *src;
  size_t len;
} copy_one;

static void run_copy_one(void *arg) {
  const copy_one *x = arg;
  memcpy(x->dst, x->src, x->len);
}

/* Each range under the guard (the source may be a mapped file): a fault fails the stream,
 * naming the range, and leaves the rest of the batch uncopied. */
static void run_copy(stream_op *op) {
  const copy_op *c = (const copy_op *)op;
  for (size_t i = 0; i < c->n; i++) {
    const ckpt_range *r = &c->ranges[i];
    uint8_t *host = (uint8_t *)(uintptr_t)r->host;
    copy_one x = c->to_host ? (copy_one){host, c->buf + r->offset, (size_t)r->len}
                            : (copy_one){c->buf + r->offset, host, (size_t)r->len};
    uintptr_t fault = 0;
    /* The side read may be a mapped file (h2d) or another process's memfd (d2h). */
    if (ckpt__guarded(run_copy_one, &x, x.src, x.len, &fault) == CKPT_OK) continue;
    char detail[320];
    snprintf(detail, sizeof detail,
             "copy of range %zu of %zu (src 0x%llx, %llu bytes): bus error at 0x%llx, offset %llu "
             "of the range: the file mapped there was truncated", i, c->n,
             (unsigned long long)(uintptr_t)x.src, (unsigned long long)r->len, (unsigned long long)fault,
             (unsigned long long)(fault - (uintptr_t)x.src));
    stream_fail(op->stream, CKPT_EFAULT, detail);
    return;
  }
}

static void run_mark(stream_op *op) {
  const event_op *m = (const event_op *)op;
  const ckpt_stream *s = op->stream;
  ckpt_event *ev = m->event;
  pthread_mutex_lock(&ev->mu);
  if (m->seq > ev->completed) {
    ev->completed = m->seq;
    ev->fail_status = s->fail_status;
    if (s->fail_status != CKPT_OK) memcpy(ev->fail_detail, s->fail_detail, sizeof ev->fail_detail);
  }
  ev->pending--;
  pthread_cond_broadcast(&ev->cv);
  pthread_mutex_unlock(&ev->mu);  /* after this the event may be destroyed */
}

/* Blocks the worker until the event's record `seq` has completed. A failure the event reports
 * fails this stream too: work ordered after failed work must not look complete. */
static void run_wait(stream_op *op) {
  const event_op *w = (const event_op *)op;
  ckpt_event *ev = w->event;
  pthread_mutex_lock(&ev->mu);
  while (ev->completed < w->seq) pthread_cond_wait(&ev->cv, &ev->mu);
  if (ev->fail_status != CKPT_OK) stream_fail(op->stream, ev->fail_status, ev->fail_detail);
  ev->pending--;
  pthread_cond_broadcast(&ev->cv);  /* ckpt_event_destroy may wait for pending == 0 */
  pthread_mutex_unlock(&ev->mu);    /* after this the event may be destroyed */
}

static void *stream_worker(void *arg) {
  ckpt_stream *s = arg;
  for (;;) {
    pthread_mutex_lock(&s->mu);
    while (s->head == NULL && !s->stop) pthread_cond_wait(&s->cv, &s->mu);
    stream_op *op = s->head;
    if (op != NULL && (s->head = op->next) == NULL) s->tail = NULL;
    pthread_mutex_unlock(&s->mu);
    if (op == NULL) return NULL;  /* stop requested and the queue is drained */
    op->run(op);
    free(op);
  }
}

void stream_push(ckpt_stream *s, stream_op *op) {
  op->next = NULL;
  op->stream = s;
  pthread_mutex_lock(&s->mu);
  if (s->tail != NULL) s->tail->next = op;
  else s->head = op;
  s->tail = op;
  pthread_cond_signal(&s->cv);
  pthread_mutex_unlock(&s->mu);
}

void stream_fail(ckpt_stream *s, int status, const char *detail) {
  if (s->fail_status != CKPT_OK) return;
  s->fail_status = status;
  snprintf(s->fail_detail, sizeof s->fail_detail, "%s", detail);
}

static ckpt__place buf_place(const ckpt_buf *b) {
  return (ckpt__place){b->ctx, b->device, b->len, (uintptr_t)b->address};
}
static ckpt__place stream_place(const ckpt_stream *s) { return (ckpt__place){s->ctx, s->device, 0, 0}; }
const ckpt__places host_places = {buf_place, stream_place};

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

static int copy_async(ckpt_stream *stream, ckpt_buf *buf, const ckpt_range *ranges, size_t n, int to_host) {
  CHECK_ARG(NULL, stream != NULL);
  ckpt_ctx *ctx = stream->ctx;
  CHECK_ARG(ctx, buf != NULL);
  CHECK(ckpt__ranges_check(ctx, ranges, n, buf->len));
  if (buf->device != stream->device)
    return FAIL(ctx, CKPT_EINVAL, "buffer on device %d, stream on device %d", buf->device,
                stream->device);
  if (n == 0) return CKPT_OK;
  copy_op *op = malloc(sizeof *op + n * sizeof *ranges);
  if (op == NULL) return FAIL(ctx, CKPT_ENOMEM, "copy batch of %zu ranges", n);
  *op = (copy_op){.op.run = run_copy, .buf = buf->address, .to_host = to_host, .n = n};
  memcpy(op->ranges, ranges, n * sizeof *ranges);
  stream_push(stream, &op->op);
  return CKPT_OK;
}

CKPT_API int ckpt_h2d_async(ckpt_stream *stream, ckpt_buf *dst, const ckpt_range *ranges,
                            size_t n) {
  return copy_async(stream, dst, ranges, n, 0);
}

CKPT_API int ckpt_d2h_async(ckpt_stream *stream, ckpt_buf *src, const ckpt_range *ranges,
                            size_t n) {
  return copy_async(stream, src, ranges, n, 1);
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
  event_op *op = malloc(sizeof *op);
  if (op == NULL) return FAIL(event->ctx, CKPT_ENOMEM, "event marker");
  *op = (event_op){.op.run = run_mark, .event = event};
  pthread_mutex_lock(&event->mu);
  op->seq = ++event->recorded;
  event->pending++;
  pthread_mutex_unlock(&event->mu);
  stream_push(stream, &op->op);
  return CKPT_OK;
}

CKPT_API int ckpt_stream_wait_event(ckpt_stream *stream, ckpt_event *event) {
  CHECK_ARG(NULL, stream != NULL);
  ckpt_ctx *ctx = stream->ctx;
  CHECK_HANDLE(ctx, event);
  /* The event may be on another device. Allocated first: a failure then changes nothing. */
  event_op *op = malloc(sizeof *op);
  if (op == NULL) return FAIL(ctx, CKPT_ENOMEM, "event wait");
  pthread_mutex_lock(&event->mu);
  uint64_t target = event->recorded;  /* a later record does not move this wait */
  /* Never recorded, or complete: nothing to wait for, unless to pass its failure on. */
  int needed = event->completed < target || (target > 0 && event->fail_status != CKPT_OK);
  if (needed) event->pending++;  /* keeps the event alive until the worker has passed the wait */
  pthread_mutex_unlock(&event->mu);
  if (!needed) {
    free(op);
    return CKPT_OK;
  }
  *op = (event_op){.op.run = run_wait, .event = event, .seq = target};
  stream_push(stream, &op->op);
  return CKPT_OK;
}

/* A completed event's status: CKPT_OK, or its stream's failure (with the detail recorded on
 * the context) when work queued before it on that stream failed: a collective, a guarded
 * copy, or a wait on an event that reported a failure. */
static int event_status(ckpt_event *event) {
  char detail[sizeof event->fail_detail];
  pthread_mutex_lock(&event->mu);
  int st = event->fail_status;
  if (st != CKPT_OK) memcpy(detail, event->fail_detail, sizeof detail);
  pthread_mutex_unlock(&event->mu);
  if (st == CKPT_OK) return CKPT_OK;
  return FAIL(event->ctx, st, "event %p: work queued before it failed: %s", (void *)event, detail);
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
