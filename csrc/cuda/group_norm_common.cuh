// Device helpers shared by the group-norm kernels (group_norm.cu: the three-launch path,
// group_norm_onepass.cu: the one-kernel cluster path): shifted Welford statistics with Chan
// merges, warp/block merges, the (row, column) tracker and the address of a group.
#pragma once
#include "common.cuh"

namespace flashdiff {
namespace cuda {
namespace gn {

// Running statistics of a set of (shifted) values: count, mean, sum of squared deviations.
struct Welford {
  float n, mean, m2;
};

// Chan et al.'s pairwise merge: exact in exact arithmetic, no cancellation of large squares.
__device__ __forceinline__ Welford merge(const Welford& a, const Welford& b) {
  const float n = a.n + b.n;
  if (n == 0.f) return {0.f, 0.f, 0.f};
  const float delta = b.mean - a.mean;
  const float wb = b.n / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

__device__ __forceinline__ Welford shfl_xor(const Welford& w, int mask) {
  return {__shfl_xor_sync(0xffffffffu, w.n, mask), __shfl_xor_sync(0xffffffffu, w.mean, mask),
          __shfl_xor_sync(0xffffffffu, w.m2, mask)};
}

// Butterfly merge over a full warp. Lanes end with totals merged in different orders (they may
// differ in the last bits): callers that need one answer take lane 0's.
__device__ __forceinline__ Welford warp_merge(Welford w) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) w = merge(w, shfl_xor(w, mask));
  return w;
}

// Merge of one value per thread over a block of THREADS threads (a multiple of 32).
// warp_acc: THREADS/32 Welfords of shared memory. Every thread must call it (one
// __syncthreads inside); the total is valid in thread 0 only.
template <int THREADS>
__device__ __forceinline__ Welford block_merge(Welford acc, Welford* warp_acc) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "block_merge: whole warps, at most 32");
  acc = warp_merge(acc);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_acc[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < THREADS / 32 ? warp_acc[lane] : Welford{0.f, 0.f, 0.f};
    acc = warp_merge(acc);
  }
  return acc;
}

// Adds VEC values, already shifted by the group's K, to `acc`: exact two-pass statistics of the
// VEC values, then one Chan merge (one division per vector, not per element).
template <int VEC>
__device__ __forceinline__ void add_shifted(Welford& acc, const float (&e)[VEC]) {
  float m = 0.f;
#pragma unroll
  for (int j = 0; j < VEC; ++j) m += e[j];
  m *= 1.0f / VEC;
  float m2 = 0.f;
#pragma unroll
  for (int j = 0; j < VEC; ++j) m2 += (e[j] - m) * (e[j] - m);
  acc = merge(acc, Welford{float(VEC), m, m2});
}

// v = q·P + r, advanced by a fixed stride without a division per step. I: int64_t where v can
// pass 2^31 (the multi-launch path's chunks), int where it cannot (a group held in shared memory).
template <typename I>
struct DivModTracker {
  I q, r;
  I P, sq, sr;
  __device__ __forceinline__ DivModTracker(I v, I period, I stride) : P(period) {
    q = v / period;
    r = v - q * period;
    sq = stride / period;
    sr = stride - sq * period;
  }
  __device__ __forceinline__ void advance() {
    q += sq;
    r += sr;
    if (r >= P) {
      r -= P;
      ++q;
    }
  }
};

// First element of group (n, g). The group seen as a [rows, width] array with row stride ld:
//   NCHW:          rows 1, width Cg·S (contiguous)      channels_last: rows S, width Cg, ld C
// int64 offsets: N·C·S passes 2^31 for a batch of large latents (the group itself never does
// in the one-kernel path: it fits in shared memory).
template <typename T, bool CHANNELS_LAST>
__device__ __forceinline__ const T* group_base(const T* x, int64_t n, int64_t g, int64_t C, int64_t S,
                                               int64_t Cg) {
  return CHANNELS_LAST ? x + n * S * C + g * Cg : x + (n * C + g * Cg) * S;
}
template <typename T, bool CHANNELS_LAST>
__device__ __forceinline__ T* group_base(T* y, int64_t n, int64_t g, int64_t C, int64_t S, int64_t Cg) {
  return CHANNELS_LAST ? y + n * S * C + g * Cg : y + (n * C + g * Cg) * S;
}

}  // namespace gn
}  // namespace cuda
}  // namespace flashdiff
