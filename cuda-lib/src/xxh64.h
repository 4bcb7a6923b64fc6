/* XXH64 (seed 0), written from the algorithm's published description: four lanes over 32-byte
 * stripes, a merge of the lanes, a tail in 8-, 4- and 1-byte steps, then an avalanche. The
 * steps are shared by the CPU (hash.c) and the GPU kernel (cuda.cu), which walk the stripes
 * each in their own way. Loads are little-endian (the GPU is). */
#ifndef CKPT_XXH64_H
#define CKPT_XXH64_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define XXH_FN static __host__ __device__ __forceinline__
#else
#define XXH_FN static inline
#endif

#define XXH_P1 11400714785074694791ull
#define XXH_P2 14029467366897019727ull
#define XXH_P3 1609587929392839161ull
#define XXH_P4 9650029242287828579ull
#define XXH_P5 2870177450012600261ull

XXH_FN uint64_t xxh_rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

XXH_FN uint64_t xxh_load64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
#if !defined(__CUDA_ARCH__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap64(v);
#endif
  return v;
}

XXH_FN uint32_t xxh_load32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
#if !defined(__CUDA_ARCH__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap32(v);
#endif
  return v;
}

/* One lane step: mixes 8 input bytes into an accumulator. */
XXH_FN uint64_t xxh_lane(uint64_t acc, uint64_t in) {
  acc += in * XXH_P2;
  acc = xxh_rotl(acc, 31);
  return acc * XXH_P1;
}

/* Folds a finished lane into the converged hash. */
XXH_FN uint64_t xxh_merge(uint64_t h, uint64_t acc) {
  h ^= xxh_lane(0, acc);
  return h * XXH_P1 + XXH_P4;
}

/* The four lanes' state before the first stripe: a, b, c, d. */
#define XXH_LANES_INIT {XXH_P1 + XXH_P2, XXH_P2, 0, 0 - XXH_P1}

/* The lanes converged, once every whole stripe went through them. */
XXH_FN uint64_t xxh_converge(const uint64_t v[4]) {
  uint64_t h = xxh_rotl(v[0], 1) + xxh_rotl(v[1], 7) + xxh_rotl(v[2], 12) + xxh_rotl(v[3], 18);
  for (int i = 0; i < 4; i++) h = xxh_merge(h, v[i]);
  return h;
}

/* The hash of `len` bytes from h (converged, or P5 under 32 bytes) and the last `rest` (< 32)
 * bytes at p: the tail steps, then the avalanche. */
XXH_FN uint64_t xxh_finish(uint64_t h, uint64_t len, const uint8_t *p, size_t rest) {
  h += len;
  for (; rest >= 8; rest -= 8, p += 8) {
    h ^= xxh_lane(0, xxh_load64(p));
    h = xxh_rotl(h, 27) * XXH_P1 + XXH_P4;
  }
  if (rest >= 4) {
    h ^= (uint64_t)xxh_load32(p) * XXH_P1;
    h = xxh_rotl(h, 23) * XXH_P2 + XXH_P3;
    p += 4;
    rest -= 4;
  }
  for (; rest > 0; rest--, p++) {
    h ^= (uint64_t)*p * XXH_P5;
    h = xxh_rotl(h, 11) * XXH_P1;
  }
  h ^= h >> 33;
  h *= XXH_P2;
  h ^= h >> 29;
  h *= XXH_P3;
  h ^= h >> 32;
  return h;
}

#endif
