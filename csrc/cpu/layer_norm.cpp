// Row norms over the last dim on the CPU: adaLN LayerNorm (+ SiLU/GELU) and RMSNorm.
//
//   layer_norm_fwd: y = act((xhat * w + b) * (1 + scale) + shift), xhat = (x - mean) * rstd
//   rms_norm_fwd:   y = x * rstd * w,                              rstd = 1 / sqrt(mean(x^2) + eps)
//
// x is R contiguous rows of D elements (DiT-XL/2: D = 1152, rows = N * 256 tokens; q/k norm:
// D = 64..128). One pass over memory per row: a row (<= 16 KB of fp32 at D = 4096) is pulled
// into L1 by the statistics and re-read from there by the normalize loop, so the DRAM traffic
// is read x once, write y once (the time of x.clone()), plus the modulation rows, which stay
// in cache while the T tokens of a sample use them.
// Statistics in fp32, two-pass over the row (never E[x^2] - E[x]^2): LayerNorm shifts values
// by K = x[0] so that sums are of the size of the spread, not of |mean| (a 1e4 + N(0, 1) row),
// and normalizes ((x - K) - (mean - K)) * rstd without forming mean in fp32.
// The affine and modulation are folded once per modulation row (per sample for an [N, D]
// scale) into Wm = w * (1 + scale), Bm = b * (1 + scale) + shift, so the normalize loop is
// y = act(((x - K) - m) * rstd * Wm + Bm): two subtracts, a multiply and an FMA per vector,
// the activation run 8 vectors in lock-step (vactivation_batch, cpu_vec.h; docs/internals.md).
// OpenMP over rows, contiguous row ranges per thread.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "flashdiff/cpu_vec.h"
#include "flashdiff/params.h"
#include "kernels.h"
#include "dtype_switch.h"

namespace flashdiff {
namespace cpu {
namespace FD_CPU_ISA {  // one copy per ISA level (kernels.h)
namespace {

// Below this many elements a call runs on the calling thread: a fork costs ~1 us and, with the
// other core busy, can wait a scheduler slice (the group norm kernel's measured threshold).
constexpr int64_t kParallelMin = 1 << 16;
constexpr int kBatch = 8;  // vectors per activation batch (cpu_vec.h: 3 registers each)

// Sum of (x[i] - k) over n elements (four accumulators: the add latency, not the loads,
// bounds one chain); and the sum of ((x[i] - k1) - k2)^2, the squared deviations from
// k1 + k2 without rounding k1 + k2 to fp32 (k1 = K, k2 = mean - K). Tails are scalar.
template <typename T>
float shifted_sum(const T* x, int64_t n, float k) {
  const vfloat vk = vset1(k);
  vfloat a0 = vset1(0.f), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 4 * kVec <= n; i += 4 * kVec) {
    a0 += vload(x + i) - vk;
    a1 += vload(x + i + kVec) - vk;
    a2 += vload(x + i + 2 * kVec) - vk;
    a3 += vload(x + i + 3 * kVec) - vk;
  }
  for (; i + kVec <= n; i += kVec) a0 += vload(x + i) - vk;
  float tail = 0.f;
  for (; i < n; ++i) tail += to_float(x[i]) - k;
  return vsum((a0 + a1) + (a2 + a3)) + tail;
}

template <typename T>
float shifted_sum_sq(const T* x, int64_t n, float k1, float k2) {
  const vfloat v1 = vset1(k1), v2 = vset1(k2);
  vfloat a0 = vset1(0.f), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 4 * kVec <= n; i += 4 * kVec) {
    const vfloat d0 = (vload(x + i) - v1) - v2, d1 = (vload(x + i + kVec) - v1) - v2;
    const vfloat d2 = (vload(x + i + 2 * kVec) - v1) - v2, d3 = (vload(x + i + 3 * kVec) - v1) - v2;
    a0 = vfma(d0, d0, a0);
    a1 = vfma(d1, d1, a1);
    a2 = vfma(d2, d2, a2);
    a3 = vfma(d3, d3, a3);
  }
  for (; i + kVec <= n; i += kVec) {
    const vfloat d = (vload(x + i) - v1) - v2;
    a0 = vfma(d, d, a0);
  }
  float tail = 0.f;
  for (; i < n; ++i) {
    const float d = (to_float(x[i]) - k1) - k2;
    tail += d * d;
  }
  return vsum((a0 + a1) + (a2 + a3)) + tail;
}

// y[i] = act(((x[i] - k) * a + c) * W[i] + B[i]) over one row of n elements (W, B null: 1, 0).
// kBatch vectors go through the activation together (their dependency chains overlap).
// LayerNorm: k = K + (mean - K) split in two subtracts (k1, k2), a = rstd, c = 0.
template <typename T, Activation ACT>
void normalize_row(const T* x, T* y, int64_t n, float k1, float k2, float a, const float* W,
                   const float* B) {
  constexpr bool kFast = !std::is_same<T, float>::value;  // 16-bit output: see cpu_vec.h
  const vfloat vk1 = vset1(k1), vk2 = vset1(k2), va = vset1(a);
  auto pre = [&](vfloat v, int64_t i) {
    vfloat z = ((v - vk1) - vk2) * va;
    if (W != nullptr) z = vfma(z, vloadu(W + i), vloadu(B + i));
    return z;
  };
  int64_t i = 0;
  for (; i + kBatch * kVec <= n; i += kBatch * kVec) {
    vfloat v[kBatch];
#pragma GCC unroll 8
    for (int j = 0; j < kBatch; ++j) v[j] = pre(vload(x + i + j * kVec), i + j * kVec);
    vactivation_batch<ACT, kFast>(v);
#pragma GCC unroll 8
    for (int j = 0; j < kBatch; ++j) vstore(y + i + j * kVec, v[j]);
  }
  for (; i + kVec <= n; i += kVec) vstore(y + i, vactivation<ACT, kFast>(pre(vload(x + i), i)));
  if (i < n) {
    const int64_t r = n - i;
    vfloat z = ((vload_partial(x + i, r) - vk1) - vk2) * va;
    if (W != nullptr) z = vfma(z, vload_partial(W + i, r), vload_partial(B + i, r));
    vstore_partial(y + i, vactivation<ACT, kFast>(z), r);
  }
}

// Rows [r0, r1) on the calling thread, or all R rows split over the threads in contiguous
// ranges (each row independent; a thread's range stays within whole modulation rows where
// it can, so Wm/Bm are folded about once per sample per thread).
template <typename RowRange>
void run_rows(int64_t R, int64_t D, const RowRange& rows) {
  const int nt = R * D >= kParallelMin ? std::max(1, omp_get_max_threads()) : 1;
  if (nt == 1 || R == 1) {
    rows(0, R);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    rows(R * tid / nth, R * (tid + 1) / nth);
  }
}

template <typename T, Activation ACT>
void layer_norm_rows(const LayerNormParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int64_t D = p.D;
  const bool affine = p.weight || p.bias || p.scale || p.shift;
  run_rows(p.R, D, [&](int64_t r0, int64_t r1) {
    // Wm, Bm (+ kVec of slack for whole-vector loads past a row of n % 16 != 0: never read).
    std::vector<float> Wm(affine ? D + kVec : 0), Bm(Wm.size());
    int64_t folded = -1;  // modulation row that Wm, Bm hold
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t m = r / p.rows_per_mod;
      if (affine && m != folded) {
        const float* sc = p.scale ? p.scale + m * D : nullptr;
        const float* sh = p.shift ? p.shift + m * D : nullptr;
        for (int64_t d = 0; d < D; ++d) {
          const float k = sc ? 1.0f + sc[d] : 1.0f;
          Wm[d] = (p.weight ? p.weight[d] : 1.0f) * k;
          Bm[d] = (p.bias ? p.bias[d] : 0.0f) * k + (sh ? sh[d] : 0.0f);
        }
        folded = m;
      }
      const T* xr = x + r * D;
      const float K = to_float(xr[0]);
      const float mean_k = shifted_sum(xr, D, K) / static_cast<float>(D);  // mean - K
      const float m2 = shifted_sum_sq(xr, D, K, mean_k);  // deviations from the mean
      const float rstd = 1.0f / std::sqrt(m2 / static_cast<float>(D) + p.eps);
      normalize_row<T, ACT>(xr, y + r * D, D, K, mean_k, rstd, affine ? Wm.data() : nullptr,
                            affine ? Bm.data() : nullptr);
    }
  });
}

template <typename T>
void rms_norm_rows(const LayerNormParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int64_t D = p.D;
  run_rows(p.R, D, [&](int64_t r0, int64_t r1) {
    std::vector<float> zeros(p.weight ? D : 0, 0.0f);  // bias of the shared normalize loop
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * D;
      const float rstd = 1.0f / std::sqrt(shifted_sum_sq(xr, D, 0.0f, 0.0f) / static_cast<float>(D) + p.eps);
      normalize_row<T, Activation::kNone>(xr, y + r * D, D, 0.0f, 0.0f, rstd, p.weight,
                                          p.weight ? zeros.data() : nullptr);
    }
  });
}

void validate(const LayerNormParams& p, const char* who, bool rms) {
  auto fail = [who](const std::string& msg) {
    throw std::invalid_argument(std::string("flashdiff._cpu.") + who + ": " + msg);
  };
  const int dt = static_cast<int>(p.dtype), act = static_cast<int>(p.activation);
  if (dt < 0 || dt > 2)
    fail("dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dt));
  if (act < 0 || act > 2)
    fail("activation code must be 0 (none), 1 (silu) or 2 (gelu), got " + std::to_string(act));
  if (p.R < 0 || p.D < 0)
    fail("sizes must be non-negative, got R=" + std::to_string(p.R) + ", D=" + std::to_string(p.D));
  if (p.D > 0 && p.R > std::numeric_limits<int64_t>::max() / p.D) fail("R * D overflows int64");
  if (p.rows_per_mod <= 0 || (p.R > 0 && p.R % p.rows_per_mod != 0))
    fail("rows_per_mod must be a positive divisor of R=" + std::to_string(p.R) + ", got " +
         std::to_string(p.rows_per_mod));
  if (!(p.eps >= 0.f) || std::isinf(p.eps))
    fail("eps must be a finite non-negative number, got " + std::to_string(p.eps));
  if (rms && (p.bias || p.scale || p.shift || p.activation != Activation::kNone))
    fail("bias, scale, shift and activation are LayerNorm's; rms_norm takes x, y, weight only");
  if (p.R * p.D != 0 && (p.x == nullptr || p.y == nullptr))
    fail("x and y must be non-null data pointers");
}

}  // namespace

void layer_norm_fwd(const LayerNormParams& params) {
  validate(params, "layer_norm_fwd", false);
  if (params.R * params.D == 0) return;
  FD_DTYPE_SWITCH(params.dtype, T, [&] {
    FD_ACTIVATION_SWITCH(params.activation, kAct, [&] { layer_norm_rows<T, kAct>(params); });
  });
}

void rms_norm_fwd(const LayerNormParams& params) {
  validate(params, "rms_norm_fwd", true);
  if (params.R * params.D == 0) return;
  FD_DTYPE_SWITCH(params.dtype, T, [&] { rms_norm_rows<T>(params); });
}

}  // namespace FD_CPU_ISA
}  // namespace cpu
}  // namespace flashdiff
