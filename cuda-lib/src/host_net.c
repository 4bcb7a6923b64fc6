/* The host backend's sockets (see host_net.h): blocking TCP over IPv4, with timeouts. */
#define _GNU_SOURCE
#include "host_net.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define SOCK_BUF_BYTES (4 << 20)

int64_t mono_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

void addr_name(uint32_t addr, uint32_t port, char *out, size_t len) {
  char a[INET_ADDRSTRLEN] = "?";
  inet_ntop(AF_INET, &addr, a, sizeof a);
  snprintf(out, len, "%s:%u", a, (unsigned)port);
}

/* Sends or receives exactly len bytes: 0, an errno, or -1 when the peer closed the
 * connection first. *done (if not NULL) gets the bytes moved. */
int io_all(int fd, void *p, size_t len, int sending, size_t *done) {
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

const char *io_error(int rc) {
  if (rc == -1) return "connection closed by the other side";
  if (rc == EAGAIN || rc == EWOULDBLOCK) return "timed out";
  return strerror(rc);
}

/* Limits blocking sends and receives on fd to ms milliseconds (0: no limit). */
void sock_timeouts(int fd, int64_t ms) {
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
void sock_tune(int fd) {
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
int64_t left_ms(int64_t deadline, int64_t cap) {
  int64_t left = deadline - mono_ms();
  return left < 1 ? 1 : left < cap ? left : cap;
}

/* Connects to addr:port, retrying until the deadline (ms on the monotonic clock). A tuned,
 * blocking socket, or -1 with the last errno in *err. */
int connect_to(uint32_t addr, uint32_t port, int64_t deadline, int *err) {
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
int listen_on(ckpt_ctx *ctx, uint32_t addr, int *fd_out, uint32_t *port_out) {
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
int env_addr(ckpt_ctx *ctx, uint32_t dflt, uint32_t *out) {
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

int random_bytes(ckpt_ctx *ctx, void *p, size_t len) {
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
