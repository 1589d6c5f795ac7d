// Attention forward: the per-head-dim launcher declaration shared by attention.cu (dispatch)
// and attention_hdim*.cu (one translation unit per head-dim bucket, compiled in parallel).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "api.cuh"
#include "common.cuh"

namespace flashdiff {
namespace cuda {

// T: __half or __nv_bfloat16. kHeadDim: the bucket (32, 64, 96, 128, 160, 192, 256), >= p.D;
// columns p.D..kHeadDim-1 are zero-filled on load and never stored. vec_ok: every pointer is
// 16-byte aligned and D and every row/head/batch stride is a multiple of 8 elements, so tiles
// move with 16-byte cp.async; otherwise the kernel falls back to element loads and stores.
// block_rows: query rows per CTA, 64 (4 warps) or 128 (8 warps).
template <typename T, int kHeadDim>
void run_attention_fwd(const AttentionParams& p, bool vec_ok, cudaStream_t stream, int block_rows);

// The vec_ok above for p (also the cross-attention kernel's, attention_cross.cu).
inline bool attention_vec_ok(const AttentionParams& p) {
  const auto s8 = [](int64_t s) { return s % 8 == 0; };
  return p.D % 8 == 0 && aligned16(p.q) && aligned16(p.o) && (p.Skv == 0 || (aligned16(p.k) && aligned16(p.v))) &&
         s8(p.q_stride_b) && s8(p.q_stride_h) && s8(p.q_stride_s) && s8(p.k_stride_b) && s8(p.k_stride_h) &&
         s8(p.k_stride_s) && s8(p.v_stride_b) && s8(p.v_stride_h) && s8(p.v_stride_s) && s8(p.o_stride_b) &&
         s8(p.o_stride_h) && s8(p.o_stride_s);
}

}  // namespace cuda
}  // namespace flashdiff
