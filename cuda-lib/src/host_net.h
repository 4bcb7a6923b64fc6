/* Sockets for the host backend's communicators (host_net.c): blocking TCP over IPv4, every
 * wait bounded. Knows nothing of communicators; host_boot.c and host_comm.c build on it. */
#ifndef CKPT_HOST_NET_H
#define CKPT_HOST_NET_H

#include "common.h"

/* Milliseconds on the monotonic clock. */
int64_t mono_ms(void);
/* Milliseconds left until `deadline` (on the monotonic clock), at most cap and at least 1. */
int64_t left_ms(int64_t deadline, int64_t cap);
/* "a.b.c.d:port" of an IPv4 address in network order, for messages. */
void addr_name(uint32_t addr, uint32_t port, char *out, size_t len);

/* Sends (sending != 0) or receives exactly len bytes: 0, an errno, or -1 when the peer
 * closed the connection first. *done (if not NULL) gets the bytes moved. */
int io_all(int fd, void *p, size_t len, int sending, size_t *done);
/* A message for io_all's result. Static string. */
const char *io_error(int rc);

/* Limits blocking sends and receives on fd to ms milliseconds (0: no limit). */
void sock_timeouts(int fd, int64_t ms);
/* Options of a data connection (best effort): no Nagle delay, large buffers where the kernel
 * grants them, keepalive probes. */
void sock_tune(int fd);
/* Connects to addr:port, retrying until the deadline (ms on the monotonic clock). A tuned,
 * blocking socket, or -1 with the last errno in *err. */
int connect_to(uint32_t addr, uint32_t port, int64_t deadline, int *err);
/* A tuned listener on addr (network order), its port chosen by the kernel. */
int listen_on(ckpt_ctx *ctx, uint32_t addr, int *fd_out, uint32_t *port_out);
/* The address to listen on: $CKPT_HOST_COMM_ADDR if set, else dflt (network order). */
int env_addr(ckpt_ctx *ctx, uint32_t dflt, uint32_t *out);
/* len random bytes from the kernel (getrandom, else /dev/urandom). */
int random_bytes(ckpt_ctx *ctx, void *p, size_t len);

#endif
