// Attention forward: argument checks and the head-dim bucket switch. The kernels live in
// attention_kernel.cuh, instantiated once per bucket in attention_hdim*.cu.
#include <cmath>
#include <string>

#include "api.cuh"
#include "attention.cuh"
#include "common.cuh"

namespace flashdiff {
namespace cuda {

// D -> the smallest bucket >= D as the constant kHeadDim (flash-attention's HEADDIM_SWITCH).
#define FD_HEADDIM_SWITCH(D, ...)                                 \
  [&] {                                                           \
    if ((D) <= 32) { constexpr static int kHeadDim = 32; return __VA_ARGS__(); }   \
    if ((D) <= 64) { constexpr static int kHeadDim = 64; return __VA_ARGS__(); }   \
    if ((D) <= 96) { constexpr static int kHeadDim = 96; return __VA_ARGS__(); }   \
    if ((D) <= 128) { constexpr static int kHeadDim = 128; return __VA_ARGS__(); } \
    if ((D) <= 160) { constexpr static int kHeadDim = 160; return __VA_ARGS__(); } \
    if ((D) <= 192) { constexpr static int kHeadDim = 192; return __VA_ARGS__(); } \
    constexpr static int kHeadDim = 256;                          \
    return __VA_ARGS__();                                         \
  }()

void attention_fwd(const AttentionParams& p, cudaStream_t stream, int block_rows) {
  FD_REQUIRE(p.B >= 0 && p.H >= 0 && p.Sq >= 0 && p.Skv >= 0, "attention_fwd: sizes must be >= 0");
  if (p.B == 0 || p.H == 0 || p.Sq == 0) return;
  FD_REQUIRE(p.D >= 1 && p.D <= kAttentionMaxHeadDim,
             "attention_fwd: head_dim must be in [1, 256], got " + std::to_string(p.D));
  FD_REQUIRE(p.B <= 65535 && p.H <= 65535, "attention_fwd: batch and heads must each be <= 65535");
  FD_REQUIRE(ceil_div(p.Sq, 64) <= 0x7fffffffLL, "attention_fwd: Sq too large");
  FD_REQUIRE(std::isfinite(p.scale), "attention_fwd: scale must be finite");
  FD_REQUIRE(block_rows == 64 || block_rows == 128,
             "attention_fwd: block_rows must be 64 or 128, got " + std::to_string(block_rows));
  FD_REQUIRE(p.q && p.o && (p.Skv == 0 || (p.k && p.v)), "attention_fwd: q, k, v and o must be non-null");
  FD_REQUIRE(p.key_padding_mask == nullptr || p.Skv == 0 || p.mask_stride_b >= 0,
             "attention_fwd: mask_stride_b must be >= 0");
  const bool vec_ok = attention_vec_ok(p);
  FD_HALF_DTYPE_SWITCH(p.dtype, [&] {
    FD_HEADDIM_SWITCH(p.D, [&] { run_attention_fwd<elem_t, kHeadDim>(p, vec_ok, stream, block_rows); });
  });
}

}  // namespace cuda
}  // namespace flashdiff
