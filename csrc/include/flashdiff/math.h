// Scalar math shared by CPU and CUDA kernels: activations and the float <-> half/bf16 bits.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "flashdiff/params.h"

#if defined(__CUDACC__)
#define FD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FD_HOST_DEVICE inline
#endif

namespace flashdiff {

FD_HOST_DEVICE float silu(float v) { return v / (1.0f + expf(-v)); }
FD_HOST_DEVICE float gelu_erf(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }

FD_HOST_DEVICE float apply_activation(float v, Activation act) {
  return act == Activation::kSilu ? silu(v) : (act == Activation::kGelu ? gelu_erf(v) : v);
}

// Clamp that keeps NaN (comparisons with NaN are false, so NaN passes through).
FD_HOST_DEVICE float clamp_keep_nan(float v, float r) { return v < -r ? -r : (v > r ? r : v); }

}  // namespace flashdiff
