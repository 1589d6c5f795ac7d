// Host entry points of the CUDA kernels, called by csrc/bindings/cuda_module.cu.
// Each takes a plain parameter struct and the caller's stream, launches asynchronously,
// returns without launching on empty input, and throws std::runtime_error on a CUDA error.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "flashdiff/params.h"

namespace flashdiff {

// Attention forward parameters (kept here, not in params.h: only the CUDA module uses them).
// q [B, H, Sq, D], k/v [B, H, Skv, D], o like q: element strides per batch/head/row, the last
// dimension has stride 1. lse fp32 [B, H, Sq] contiguous or null; key_padding_mask uint8/bool
// [B, Skv] (nonzero = attend) with row stride mask_stride_b, or null.
struct AttentionParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* lse = nullptr;
  const uint8_t* key_padding_mask = nullptr;
  int64_t B = 0, H = 0, Sq = 0, Skv = 0, D = 0;
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_s = 0;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_s = 0;
  int64_t o_stride_b = 0, o_stride_h = 0, o_stride_s = 0;
  int64_t mask_stride_b = 0;
  float scale = 1.0f;
  DType dtype = DType::kFloat16;
};

namespace cuda {

void scheduler_update(const SchedulerUpdateParams& p, cudaStream_t stream);

// Scratch memory is taken from the stream-ordered allocator (cudaMallocAsync on `stream`,
// the device's default pool) and handed back with cudaFreeAsync on the same stream.
void group_norm_fwd(const GroupNormParams& p, cudaStream_t stream);

// The same op in one kernel (group_norm_onepass.cu): a thread-block cluster per (n, group)
// holds the group in shared memory, so x is read once and y written once. No scratch memory,
// no per-call device queries beyond cudaGetDevice. Returns false, having launched nothing,
// where it cannot serve the call (device older than sm_90, or a group too large for a cluster
// of 8 CTAs' shared memory): the caller then runs group_norm_fwd. Empty input: true, no launch.
bool group_norm_fwd_onepass(const GroupNormParams& p, cudaStream_t stream);

void attention_fwd(const AttentionParams& p, cudaStream_t stream, int block_rows = 64);

// Cross-attention for short key sets (attention_cross.cu): K and V of a (batch, head) held in
// shared memory, one softmax pass without rescaling. Same parameters as attention_fwd. Returns
// false, having launched nothing, where it cannot serve the call (Skv > 256, D > 160, B·H >
// 65535, K/V plus a 64-row Q tile over the device's shared memory per block, or arguments
// attention_fwd would refuse): the caller then runs attention_fwd. Empty input: true, no launch.
bool attention_fwd_cross(const AttentionParams& p, cudaStream_t stream);

// Head-dim buckets served by attention_fwd: D is rounded up to the first bucket >= D.
constexpr int kAttentionMaxHeadDim = 256;

}  // namespace cuda
}  // namespace flashdiff
