/* The host backend's bootstrap (host_boot.c): communicator ids, and joining a communicator
 * that spans processes up to the point where every two of its processes are connected.
 * Builds on host_net.c's sockets; host_comm.c builds on it. */
#ifndef CKPT_HOST_BOOT_H
#define CKPT_HOST_BOOT_H

#include "common.h"

/* One other process of a communicator spanning processes, and the connection to it. */
typedef struct comm_peer {
  int fd;
  int32_t first_rank, ndev;
  char name[48];  /* "address:port" of its data listener, for messages */
} comm_peer;

/* Joins communicator `id` (made by ckpt_comm_id_new, in any process) with this process's
 * ranks first_rank .. first_rank + ndev - 1: meets every other process through the id's
 * bootstrap, then connects to each. Blocks until done, or CKPT_ETIMEDOUT after timeout_ms
 * (negative: no limit, beyond the bootstrap's own). On success *peers (free with
 * peers_close) holds one connected, blocking socket per other process, by first rank. */
int boot_join(ckpt_ctx *ctx, const uint8_t id[CKPT_COMM_ID_BYTES], int32_t nranks, int32_t first_rank,
              int32_t ndev, int64_t timeout_ms, comm_peer **peers, int32_t *npeers);
/* Closes the n connections and frees the table. */
void peers_close(comm_peer *p, int32_t n);
/* Stops this process's bootstrap of `id`, if it is one of this backend's and still runs:
 * its participants fail at once instead of waiting for the bootstrap's time limit. */
void boot_cancel(const uint8_t id[CKPT_COMM_ID_BYTES]);

#endif
