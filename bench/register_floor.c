/* register_floor: the least it costs to pin safetensors files in place for the GPU, with
 * nothing but mmap and cudaHostRegister. The daemon's in-place pinning (ckpt_file_map +
 * ckpt_host_register) is compared against this floor.
 *
 *   nvcc -O2 -o cuda-lib/build/register_floor bench/register_floor.c
 *   (or: gcc -O2 -std=gnu11 -I$CUDA_HOME/include bench/register_floor.c -L$CUDA_HOME/lib64 -lcudart
 *        -o build/register_floor)
 *   ./build/register_floor model-00001-of-00004.safetensors model-00002-of-00004.safetensors ...
 *
 * For each file, in order: open + fstat (not timed), mmap(PROT_READ, MAP_SHARED|MAP_POPULATE)
 * (timed: map_seconds), cudaHostRegister(cudaHostRegisterReadOnly|cudaHostRegisterPortable)
 * (timed: register_seconds). The CUDA context is created before any timing. Prints one JSON
 * line on stdout:
 *   {"files": N, "bytes": B, "map_seconds": s, "register_seconds": s, "register_gbps": g}
 * where register_gbps = bytes / register_seconds / 1e9. Everything is unregistered and
 * unmapped afterwards (not timed). Errors go to stderr, exit status 1.
 *
 * MAP_POPULATE reads pages that are not in the page cache, so map_seconds includes disk
 * reads for cold files; warm the cache first (or use files on tmpfs) to time only the
 * page-table setup. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cuda_runtime_api.h>

typedef struct {
  void *base;
  size_t len;
  int registered;
} mapping;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
  if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
    fprintf(stderr, "usage: %s FILE.safetensors...\n", argv[0]);
    return 2;
  }
  int nfiles = argc - 1, rc = 0;
  mapping *m = calloc((size_t)nfiles, sizeof *m);
  if (m == NULL) {
    fprintf(stderr, "register_floor: out of memory\n");
    return 1;
  }
  cudaError_t err = cudaFree(0); /* creates the context, outside the timed part */
  if (err != cudaSuccess) {
    fprintf(stderr, "register_floor: CUDA init: %s\n", cudaGetErrorString(err));
    free(m);
    return 1;
  }
  double map_s = 0, reg_s = 0;
  uint64_t bytes = 0;
  for (int i = 0; i < nfiles && rc == 0; i++) {
    const char *path = argv[i + 1];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat sb;
    if (fd < 0 || fstat(fd, &sb) != 0) {
      fprintf(stderr, "register_floor: %s: %s\n", path, strerror(errno));
      if (fd >= 0) close(fd);
      rc = 1;
      break;
    }
    if (!S_ISREG(sb.st_mode) || sb.st_size == 0) {
      fprintf(stderr, "register_floor: %s: not a non-empty regular file\n", path);
      close(fd);
      rc = 1;
      break;
    }
    size_t len = (size_t)sb.st_size;
    double t0 = now_s();
    /* NO_POPULATE=1: no prefault; cudaHostRegister faults the pages in itself. */
    int flags = MAP_SHARED | (getenv("NO_POPULATE") ? 0 : MAP_POPULATE);
    void *p = mmap(NULL, len, PROT_READ, flags, fd, 0);
    map_s += now_s() - t0;
    int map_errno = errno;
    close(fd);
    if (p == MAP_FAILED) {
      fprintf(stderr, "register_floor: mmap %s: %s\n", path, strerror(map_errno));
      rc = 1;
      break;
    }
    m[i].base = p;
    m[i].len = len;
    t0 = now_s();
    err = cudaHostRegister(p, len, cudaHostRegisterReadOnly | cudaHostRegisterPortable);
    reg_s += now_s() - t0;
    if (err != cudaSuccess) {
      fprintf(stderr, "register_floor: cudaHostRegister %s (%zu bytes): %s\n", path, len,
              cudaGetErrorString(err));
      rc = 1;
      break;
    }
    m[i].registered = 1;
    bytes += len;
  }
  if (rc == 0)
    printf("{\"files\": %d, \"bytes\": %llu, \"map_seconds\": %.6f, \"register_seconds\": %.6f, "
           "\"register_gbps\": %.3f}\n",
           nfiles, (unsigned long long)bytes, map_s, reg_s,
           reg_s > 0 ? (double)bytes / reg_s / 1e9 : 0.0);
  for (int i = 0; i < nfiles; i++) {
    if (m[i].registered && cudaHostUnregister(m[i].base) != cudaSuccess) rc = 1;
    if (m[i].base != NULL) munmap(m[i].base, m[i].len);
  }
  free(m);
  return rc;
}
