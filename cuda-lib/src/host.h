/* Internals of the host backend shared by its two files: host.c (context, devices, pinned
 * memory, buffers, IPC, streams, events) and host_comm.c (communicators and broadcasts, within
 * one process and over TCP between processes). */
#ifndef CKPT_HOST_H
#define CKPT_HOST_H

#include "common.h"

/* Like CHECK_SYS, for functions that must unwind: ESYS naming the call and errno. */
#define SYS_GOTO(ctx, cond, st, label, what) \
  CHECK_GOTO((cond) ? CKPT_OK : sys_fail((ctx), __FILE__, __LINE__, (what)), st, label)
int sys_fail(ckpt_ctx *ctx, const char *file, int line, const char *what);

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

/* Defined in host.c. */
int check_device(ckpt_ctx *ctx, int32_t index);
void stream_push(ckpt_stream *s, stream_op *op);

/* Defined in host_comm.c: the stream worker's side of the broadcast operations. */
void bcast_root(bcast *b);
void bcast_await_root(bcast *b);
void bcast_copied(bcast *b);
void xbcast_stream(ckpt_stream *s, xbcast *x);

#endif
