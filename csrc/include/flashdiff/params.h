// Plain parameter structs shared by the CPU (g++) and CUDA (nvcc) kernels.
// No torch headers here or anywhere in csrc/ (DESIGN.md decision 1): bindings fill these
// structs from integers (data pointers, sizes, strides) handed over by Python.
#pragma once
#include <cstdint>

namespace flashdiff {

// Element type of the big tensors. Small parameter tensors (weight, bias, scale, shift,
// scheduler coefficients) are always fp32: Python converts them (a few KB at most).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum class Activation : int { kNone = 0, kSilu = 1, kGelu = 2 };  // gelu = exact (erf)

// y = act(((x - mean) * rstd * weight + bias) * (1 + scale) + shift), statistics per (n, group).
// Kernels fold the affine and modulation into y = act((x - mean) * A[n, c] + B[n, c]): a subtract
// and an FMA per element after the stats. (Folding the mean into B too, act(x * A + B'), loses
// fp32 digits when a group's mean is large against its spread: measured, not taken.)
struct GroupNormParams {
  const void* x = nullptr;       // [N, C, S] (NCHW, S = prod(spatial)) or [N, S, C] (channels_last)
  void* y = nullptr;             // same layout and dtype as x
  const float* weight = nullptr; // [C] or null (= 1)
  const float* bias = nullptr;   // [C] or null (= 0)
  const float* scale = nullptr;  // [N, C] contiguous or null (= 0): per-sample modulation
  const float* shift = nullptr;  // [N, C] contiguous or null (= 0)
  float* mean_out = nullptr;     // [N, G] or null: saved for backward
  float* rstd_out = nullptr;     // [N, G] or null
  int64_t N = 0, C = 0, S = 0, G = 0;
  float eps = 1e-5f;
  Activation activation = Activation::kNone;
  bool channels_last = false;
  DType dtype = DType::kFloat32;
};

// Row norms over the last dim of x, seen as R contiguous rows of D elements:
//   layer_norm_fwd: y = act((xhat * weight + bias) * (1 + scale) + shift), xhat = (x - mean) * rstd
//   rms_norm_fwd:   y = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps)  (uses x, y, weight,
//                   R, D, eps, dtype; the other fields must stay null / none)
// Statistics per row in fp32, two-pass, biased variance. Row r reads modulation row
// r / rows_per_mod: rows_per_mod = T for adaLN's [N, D] scale with x [N, T, D], 1 per token.
struct LayerNormParams {
  const void* x = nullptr;        // [R, D] contiguous
  void* y = nullptr;              // [R, D] contiguous, x's dtype
  const float* weight = nullptr;  // [D] or null (= 1)
  const float* bias = nullptr;    // [D] or null (= 0)
  const float* scale = nullptr;   // [R / rows_per_mod, D] contiguous or null (= 0)
  const float* shift = nullptr;   // same shape as scale, or null (= 0)
  int64_t R = 0, D = 0, rows_per_mod = 1;
  float eps = 1e-6f;
  Activation activation = Activation::kNone;
  DType dtype = DType::kFloat32;
};

// The generic sampler update. Every family (DDIM, DDPM, flow Euler, DPM-Solver++ 2M) is this
// affine map with family-specific coefficients, computed in Python (float64) and read here
// from a device/host fp32 array, so a step never synchronizes with the host.
//   m    = has uncond ? u + g * (c - u) : c                    (classifier-free guidance)
//   x0   = clamp(a_x * x + a_m * m, -clip, clip)               (clip = +inf: no clipping)
//   eps  = e_x * x + e_m * m + e_0 * x0
//   prev = p_x * x + p_0 * x0 + p_e * eps + p_n * noise + p_d * prev_x0
enum SchedCoef : int {
  kGuidance = 0, kX0FromX, kX0FromM, kClip,
  kEpsFromX, kEpsFromM, kEpsFromX0,
  kPrevFromX, kPrevFromX0, kPrevFromEps, kPrevFromNoise, kPrevFromPrevX0,
  kNumSchedCoefs  // = 12
};

struct SchedulerUpdateParams {
  const void* sample = nullptr;        // x
  const void* model_output = nullptr;  // c (the conditional output when guidance is used)
  const void* model_output_uncond = nullptr;  // u, or null: no guidance
  const void* noise = nullptr;         // or null
  const void* prev_x0 = nullptr;       // or null (DPM-Solver++ 2M history)
  const float* coefs = nullptr;        // [kNumSchedCoefs] fp32, same device as the data
  void* prev_sample = nullptr;         // out
  void* x0_out = nullptr;              // out, or null
  int64_t numel = 0;                   // all tensors dense with identical strides
  DType dtype = DType::kFloat32;       // every tensor above except coefs
};

}  // namespace flashdiff
