/* The host backend's core as its communicators see it (host.c defines all of it): buffers,
 * devices, and the stream API on which host_comm.c queues its work. Dependencies point one
 * way: host_comm.c uses this, host_boot.c and host_net.c; host_boot.c uses host_net.c; all of
 * them use common.c; host.c uses only common.c. */
#ifndef CKPT_HOST_H
#define CKPT_HOST_H

#include "common.h"

struct ckpt_buf {
  ckpt_ctx *ctx;
  uint8_t *address;  /* a MAP_SHARED mapping of fd */
  size_t len;
  int32_t device;
  int fd;            /* memfd, allocated here or opened through /proc/<pid>/fd */
  int imported;
};

/* CKPT_ENODEV unless `index` is a device of this context. */
int check_device(ckpt_ctx *ctx, int32_t index);

/* The places of the host backend's buffers and streams, for ckpt__bcast_check. */
extern const ckpt__places host_places;

/* ---- streams ---------------------------------------------------------------------------- */
/* One operation queued on a stream, as libuv's uv__work: the stream's worker thread calls
 * run(op) once the work queued before it is done, then frees op. The worker knows no kinds
 * of operation; each is a malloc'd block that starts with this struct and carries what its
 * run needs after it. Whatever run waits for must not wait for later work on the stream. */
typedef struct stream_op stream_op;
struct stream_op {
  stream_op *next;          /* the stream's queue */
  ckpt_stream *stream;      /* set by stream_push */
  void (*run)(stream_op *op);
};

/* Queues op (made as above, run set) at the end of the stream; never fails. */
void stream_push(ckpt_stream *s, stream_op *op);
/* From a run function only: fails the stream, as a CUDA stream keeps a fault. The first
 * failure is kept; every event recorded on the stream afterwards reports it. */
void stream_fail(ckpt_stream *s, int status, const char *detail);

#endif
