/* Errors, the context's shared part, the pinned-region table, sd_notify and peer credentials. */
#define _GNU_SOURCE /* struct ucred */
#include "common.h"
#include "guard.h"

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

CKPT_API uint32_t ckpt_abi_version(void) { return CKPT_ABI_VERSION; }

CKPT_API const char *ckpt_err_name(int status) {
  switch (status) {
#define CKPT_X_NAME(name, value, msg) \
  case value:                         \
    return "CKPT_" #name;
    CKPT_STATUS_MAP(CKPT_X_NAME)
#undef CKPT_X_NAME
  }
  return "CKPT_UNKNOWN";
}

CKPT_API const char *ckpt_strerror(int status) {
  switch (status) {
#define CKPT_X_MSG(name, value, msg) \
  case value:                        \
    return msg;
    CKPT_STATUS_MAP(CKPT_X_MSG)
#undef CKPT_X_MSG
  }
  return "unknown status";
}

int ckpt__fail(ckpt_ctx *ctx, int status, const char *file, int line, const char *fmt, ...) {
  char detail[400];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(detail, sizeof detail, fmt, ap);
  va_end(ap);
  const char *base = strrchr(file, '/');
  if (ctx == NULL) {
    fprintf(stderr, "ckpt: %s: %s (%s:%d)\n", ckpt_err_name(status), detail, base ? base + 1 : file,
            line);
    return status;
  }
  pthread_mutex_lock(&ctx->mu);
  ctx->last_status = status;
  snprintf(ctx->last_error, sizeof ctx->last_error, "%s (%s:%d)", detail, base ? base + 1 : file,
           line);
  pthread_mutex_unlock(&ctx->mu);
  return status;
}

int ckpt__sys_fail(ckpt_ctx *ctx, const char *file, int line, const char *what) {
  return ckpt__fail(ctx, CKPT_ESYS, file, line, "%s: %s", what, strerror(errno));
}

CKPT_API int ckpt_last_error(ckpt_ctx *ctx, char *buf, size_t len) {
  if (ctx == NULL) return CKPT_EINVAL;
  pthread_mutex_lock(&ctx->mu);
  int status = ctx->last_status;
  if (buf != NULL && len > 0) snprintf(buf, len, "%s", ctx->last_error);
  pthread_mutex_unlock(&ctx->mu);
  return status;
}

int ckpt__ctx_init(ckpt_ctx *ctx, const ckpt_ctx_options *opts) {
  if (opts == NULL) return FAIL(NULL, CKPT_EINVAL, "ckpt_ctx_create: options are NULL");
  if (opts->size != sizeof(ckpt_ctx_options) || opts->abi_version != CKPT_ABI_VERSION)
    return FAIL(NULL, CKPT_EABI,
                "ckpt_ctx_create: caller has options size %u ABI %u, library %zu ABI %u",
                opts->size, opts->abi_version, sizeof(ckpt_ctx_options), CKPT_ABI_VERSION);
  if (opts->host_devices < 0 || opts->host_devices > 64)
    return FAIL(NULL, CKPT_EINVAL, "host_devices %d outside 0..64", opts->host_devices);
  const char *nccl = opts->nccl_path ? opts->nccl_path : "libnccl.so.2";
  if (strlen(nccl) >= sizeof ctx->nccl_path)
    return FAIL(NULL, CKPT_EINVAL, "nccl_path longer than %zu bytes", sizeof ctx->nccl_path - 1);
  CHECK(ckpt__guard_install(NULL));
  pthread_mutex_init(&ctx->mu, NULL);
  ctx->host_devices = opts->host_devices ? opts->host_devices : 1;
  strcpy(ctx->nccl_path, nccl);
  return CKPT_OK;
}

int ckpt__ctx_fini(ckpt_ctx *ctx) {
  pthread_mutex_lock(&ctx->mu);
  int64_t live = ctx->live_handles;
  size_t regions = ctx->nregions;
  pthread_mutex_unlock(&ctx->mu);
  if (live > 0 || regions > 0)
    return FAIL(ctx, CKPT_EBUSY, "context still has %lld handles and %zu pinned regions",
                (long long)live, regions);
  free(ctx->regions);
  pthread_mutex_destroy(&ctx->mu);
  return CKPT_OK;
}

void ckpt__live(ckpt_ctx *ctx, int delta) {
  pthread_mutex_lock(&ctx->mu);
  ctx->live_handles += delta;
  pthread_mutex_unlock(&ctx->mu);
}

/* First region whose base is > p, by binary search. Caller holds ctx->mu. */
static size_t region_upper(const ckpt_ctx *ctx, uintptr_t p) {
  size_t lo = 0, hi = ctx->nregions;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (ctx->regions[mid].base <= p) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

int ckpt__region_add(ckpt_ctx *ctx, void *p, size_t len, int allocated) {
  uintptr_t base = (uintptr_t)p;
  pthread_mutex_lock(&ctx->mu);
  size_t i = region_upper(ctx, base);
  int overlaps = (i > 0 && ctx->regions[i - 1].base + ctx->regions[i - 1].len > base) ||
                 (i < ctx->nregions && ctx->regions[i].base < base + len);
  if (overlaps) {
    pthread_mutex_unlock(&ctx->mu);
    return FAIL(ctx, CKPT_EINVAL, "region %p+%zu overlaps memory already pinned", p, len);
  }
  if (ctx->nregions == ctx->cap_regions) {
    size_t cap = ctx->cap_regions ? ctx->cap_regions * 2 : 16;
    ckpt_region *grown = realloc(ctx->regions, cap * sizeof *grown);
    if (grown == NULL) {
      pthread_mutex_unlock(&ctx->mu);
      return FAIL(ctx, CKPT_ENOMEM, "region table of %zu entries", cap);
    }
    ctx->regions = grown;
    ctx->cap_regions = cap;
  }
  memmove(&ctx->regions[i + 1], &ctx->regions[i], (ctx->nregions - i) * sizeof *ctx->regions);
  ctx->regions[i] = (ckpt_region){base, len, allocated};
  ctx->nregions++;
  pthread_mutex_unlock(&ctx->mu);
  return CKPT_OK;
}

int ckpt__region_remove(ckpt_ctx *ctx, void *p, int allocated, size_t *len) {
  uintptr_t base = (uintptr_t)p;
  pthread_mutex_lock(&ctx->mu);
  size_t i = region_upper(ctx, base);
  if (i == 0 || ctx->regions[i - 1].base != base || ctx->regions[i - 1].allocated != allocated) {
    pthread_mutex_unlock(&ctx->mu);
    return FAIL(ctx, CKPT_EINVAL, "%p is not the start of memory %s by this context", p,
                allocated ? "allocated by ckpt_host_alloc" : "registered by ckpt_host_register");
  }
  *len = ctx->regions[i - 1].len;
  memmove(&ctx->regions[i - 1], &ctx->regions[i], (ctx->nregions - i) * sizeof *ctx->regions);
  ctx->nregions--;
  pthread_mutex_unlock(&ctx->mu);
  return CKPT_OK;
}

int ckpt__register_add(ckpt_ctx *ctx, void *ptr, size_t len, uint32_t flags) {
  CHECK_ARG(ctx, ptr != NULL);
  CHECK_ARG(ctx, len > 0);
  CHECK_ARG(ctx, (flags & ~CKPT_REGISTER_READONLY) == 0);
  return ckpt__region_add(ctx, ptr, len, 0);
}

int ckpt__ranges_check(ckpt_ctx *ctx, const ckpt_range *r, size_t n, uint64_t dst_len) {
  if (n > 0 && r == NULL) return FAIL(ctx, CKPT_EINVAL, "ranges is NULL with n=%zu", n);
  pthread_mutex_lock(&ctx->mu);
  for (size_t k = 0; k < n; k++) {
    uint64_t src = r[k].host, off = r[k].offset, len = r[k].len;
    int dst_ok = off <= dst_len && len <= dst_len - off;
    size_t i = region_upper(ctx, (uintptr_t)src);
    int src_ok = src + len >= src && i > 0 && src + len <= ctx->regions[i - 1].base + ctx->regions[i - 1].len;
    if (!dst_ok || !src_ok) {
      pthread_mutex_unlock(&ctx->mu);
      return FAIL(ctx, CKPT_ERANGE,
                  "range %zu (host 0x%llx, offset %llu, len %llu): %s", k,
                  (unsigned long long)src, (unsigned long long)off, (unsigned long long)len,
                  !dst_ok ? "past the end of the buffer"
                          : "host memory not inside pinned or registered host memory");
    }
  }
  pthread_mutex_unlock(&ctx->mu);
  return CKPT_OK;
}

/* Local rank i of a broadcast: buffer and stream given, of ctx, on `device`, the buffer
 * holding offset + len bytes. */
static int bcast_check_rank(ckpt_ctx *ctx, const ckpt__places *places, int32_t i, int32_t device,
                            const ckpt_buf *b, const ckpt_stream *s, uint64_t offset, uint64_t len) {
  if (b == NULL || s == NULL)
    return FAIL(ctx, CKPT_EINVAL, "local rank %d: %s is NULL", i, b == NULL ? "buffer" : "stream");
  const ckpt__place buf = places->buf(b), stream = places->stream(s);
  if (buf.ctx != ctx || stream.ctx != ctx)
    return FAIL(ctx, CKPT_EHANDLE, "local rank %d: %s belongs to another context", i,
                buf.ctx != ctx ? "buffer" : "stream");
  if (buf.device != device || stream.device != device)
    return FAIL(ctx, CKPT_EINVAL, "local rank %d is device %d, but its %s is on device %d", i, device,
                buf.device != device ? "buffer" : "stream",
                buf.device != device ? buf.device : stream.device);
  if (offset > buf.len || len > buf.len - offset)
    return FAIL(ctx, CKPT_ERANGE,
                "broadcast of %llu bytes at offset %llu: local rank %d's buffer has %llu bytes",
                (unsigned long long)len, (unsigned long long)offset, i, (unsigned long long)buf.len);
  return CKPT_OK;
}

int ckpt__bcast_check(ckpt_ctx *ctx, const ckpt__places *places, int32_t nranks, int32_t ndev,
                      const int32_t *devices, int32_t root, ckpt_buf *const *bufs,
                      ckpt_stream *const *streams, uint64_t offset, uint64_t len) {
  CHECK_ARG(ctx, bufs != NULL && streams != NULL);
  for (int32_t i = 0; i < ndev; i++)
    CHECK(bcast_check_rank(ctx, places, i, devices[i], bufs[i], streams[i], offset, len));
  if (root < 0 || root >= nranks)
    return FAIL(ctx, CKPT_EINVAL, "root %d outside the communicator's ranks 0..%d", root, nranks - 1);
  return CKPT_OK;
}

int ckpt__comm_init_check(ckpt_ctx *ctx, const uint8_t *id, int32_t nranks, int32_t first_rank,
                          int32_t ndev, const int32_t *devices, ckpt_comm **out,
                          int (*exists)(ckpt_ctx *, int32_t)) {
  CHECK_ARG(ctx, out != NULL);
  *out = NULL;
  CHECK_ARG(ctx, id != NULL);
  if (ndev < 1) return FAIL(ctx, CKPT_EINVAL, "ndev %d: a communicator needs a local device", ndev);
  CHECK_ARG(ctx, devices != NULL);
  if (first_rank < 0 || nranks < 1 || (int64_t)first_rank + ndev > nranks)
    return FAIL(ctx, CKPT_EINVAL, "local ranks %d..%lld do not fit in a communicator of %d ranks",
                first_rank, (long long)first_rank + ndev - 1, nranks);
  for (int32_t i = 0; i < ndev; i++) {
    CHECK(exists(ctx, devices[i]));
    for (int32_t j = 0; j < i; j++)
      if (devices[j] == devices[i])
        return FAIL(ctx, CKPT_EINVAL, "device %d is listed twice (local ranks %d and %d)",
                    devices[i], j, i);
  }
  return CKPT_OK;
}

CKPT_API int ckpt_sd_notify(const char *state) {
  const char *path = getenv("NOTIFY_SOCKET");
  if (path == NULL || path[0] == '\0') return CKPT_OK;
  if (state == NULL) return FAIL(NULL, CKPT_EINVAL, "sd_notify: state is NULL");
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  size_t plen = strlen(path);
  if ((path[0] != '/' && path[0] != '@') || plen >= sizeof addr.sun_path)
    return FAIL(NULL, CKPT_EINVAL, "NOTIFY_SOCKET '%s' is not a socket path", path);
  memcpy(addr.sun_path, path, plen);
  if (path[0] == '@') addr.sun_path[0] = '\0';
  socklen_t alen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen);
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return FAIL(NULL, CKPT_ESYS, "sd_notify socket: %s", strerror(errno));
  ssize_t sent = sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&addr, alen);
  int err = errno;
  close(fd);
  if (sent < 0) return FAIL(NULL, CKPT_ESYS, "sd_notify to %s: %s", path, strerror(err));
  return CKPT_OK;
}

CKPT_API int ckpt_peer_cred(int32_t fd, int32_t *pid, uint32_t *uid, uint32_t *gid) {
  if (pid == NULL || uid == NULL || gid == NULL) return FAIL(NULL, CKPT_EINVAL, "peer_cred: NULL output");
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0)
    return FAIL(NULL, CKPT_ESYS, "peer_cred of fd %d: %s", fd, strerror(errno));
  *pid = cred.pid;
  *uid = cred.uid;
  *gid = cred.gid;
  return CKPT_OK;
}

CKPT_API int ckpt_peer_groups(int32_t fd, uint32_t *groups, int32_t *n) {
  if (groups == NULL || n == NULL || *n < 0) return FAIL(NULL, CKPT_EINVAL, "peer_groups: NULL output or negative capacity");
  socklen_t len = (socklen_t)((size_t)*n * sizeof(gid_t));
  if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) != 0) {
    int err = errno;
    if (err == ERANGE) {
      *n = (int32_t)(len / sizeof(gid_t));
      return FAIL(NULL, CKPT_EINVAL, "peer_groups: %d groups do not fit", *n);
    }
    return FAIL(NULL, CKPT_ESYS, "peer_groups of fd %d: %s", fd, strerror(err));
  }
  *n = (int32_t)(len / sizeof(gid_t));
  return CKPT_OK;
}

#define MAX_WORKERS 64

void ckpt__run_workers(void *(*worker)(void *), void *arg, int32_t threads, size_t items) {
  size_t workers = threads <= 0 ? 1 : threads > MAX_WORKERS ? MAX_WORKERS : (size_t)threads;
  if (workers > items) workers = items > 0 ? items : 1;
  pthread_t tid[MAX_WORKERS];
  size_t started = 0;
  for (; started + 1 < workers; started++)
    if (pthread_create(&tid[started], NULL, worker, arg) != 0) break;
  worker(arg);
  for (size_t t = 0; t < started; t++) pthread_join(tid[t], NULL);
}
