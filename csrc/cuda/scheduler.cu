// The generic sampler update (params.h SchedulerUpdateParams), one fused elementwise pass.
//
//   m    = has uncond ? u + g·(c − u) : c
//   x0   = clamp(a_x·x + a_m·m, −clip, clip)
//   eps  = e_x·x + e_m·m + e_0·x0
//   prev = p_x·x + p_0·x0 + p_e·eps + p_n·noise + p_d·prev_x0
//
// Traffic per element: reads x, c (+u, +noise, +prev_x0), writes prev (+x0), all in the data
// dtype; the 12 fp32 coefficients are read once per thread from device memory (no host sync,
// so a sampling loop can be captured in a CUDA graph). Memory-bound: the roofline is
// bytes / HBM bandwidth (DDIM + CFG in bf16: 8 B/element, ~2.4 µs per 1M elements on an H100).
#include "api.cuh"
#include "common.cuh"

namespace flashdiff {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC, bool HAS_U, bool HAS_NOISE, bool HAS_PREV, bool WRITE_X0>
__device__ __forceinline__ void sched_elements(const SchedulerUpdateParams& p, const float (&k)[kNumSchedCoefs],
                                               int64_t i) {
  float x[VEC], c[VEC], u[VEC], nz[VEC], px[VEC], prev[VEC], x0v[VEC];
  load_vec<T, VEC>(x, static_cast<const T*>(p.sample) + i);
  load_vec<T, VEC>(c, static_cast<const T*>(p.model_output) + i);
  if constexpr (HAS_U) load_vec<T, VEC>(u, static_cast<const T*>(p.model_output_uncond) + i);
  if constexpr (HAS_NOISE) load_vec<T, VEC>(nz, static_cast<const T*>(p.noise) + i);
  if constexpr (HAS_PREV) load_vec<T, VEC>(px, static_cast<const T*>(p.prev_x0) + i);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    float m = c[j];
    if constexpr (HAS_U) m = u[j] + k[kGuidance] * (c[j] - u[j]);
    const float x0 = clamp_keep_nan(k[kX0FromX] * x[j] + k[kX0FromM] * m, k[kClip]);
    const float eps = k[kEpsFromX] * x[j] + k[kEpsFromM] * m + k[kEpsFromX0] * x0;
    float r = k[kPrevFromX] * x[j] + k[kPrevFromX0] * x0 + k[kPrevFromEps] * eps;
    if constexpr (HAS_NOISE) r += k[kPrevFromNoise] * nz[j];
    if constexpr (HAS_PREV) r += k[kPrevFromPrevX0] * px[j];
    prev[j] = r;
    x0v[j] = x0;
  }
  store_vec<T, VEC>(static_cast<T*>(p.prev_sample) + i, prev);
  if constexpr (WRITE_X0) store_vec<T, VEC>(static_cast<T*>(p.x0_out) + i, x0v);
}

// VEC elements per access (16 bytes when the pointers allow it, else 1); elements past the
// last full vector are done one by one by the first threads of the grid.
template <typename T, int VEC, bool HAS_U, bool HAS_NOISE, bool HAS_PREV, bool WRITE_X0>
__global__ void __launch_bounds__(kThreads) scheduler_update_kernel(const SchedulerUpdateParams p) {
  float k[kNumSchedCoefs];
#pragma unroll
  for (int j = 0; j < kNumSchedCoefs; ++j) k[j] = __ldg(p.coefs + j);

  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t nvec = p.numel / VEC;
  for (int64_t v = tid; v < nvec; v += stride) {
    sched_elements<T, VEC, HAS_U, HAS_NOISE, HAS_PREV, WRITE_X0>(p, k, v * VEC);
  }
  if constexpr (VEC > 1) {
    const int64_t tail = nvec * VEC + tid;
    if (tail < p.numel) sched_elements<T, 1, HAS_U, HAS_NOISE, HAS_PREV, WRITE_X0>(p, k, tail);
  }
}

template <typename T, bool HAS_U, bool HAS_NOISE, bool HAS_PREV, bool WRITE_X0>
void launch(const SchedulerUpdateParams& p, bool vectorize, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int vec = vectorize ? kVec : 1;
  const int64_t work = ceil_div(p.numel, vec);
  // Enough blocks to fill every SM a few times over; the grid-stride loop does the rest.
  const int64_t blocks = std::min<int64_t>(ceil_div(work, kThreads), int64_t(sm_count()) * 8);
  if (vectorize) {
    scheduler_update_kernel<T, kVec, HAS_U, HAS_NOISE, HAS_PREV, WRITE_X0>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  } else {
    scheduler_update_kernel<T, 1, HAS_U, HAS_NOISE, HAS_PREV, WRITE_X0>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  }
  FD_CHECK_LAUNCH("scheduler_update_kernel");
}

}  // namespace

void scheduler_update(const SchedulerUpdateParams& p, cudaStream_t stream) {
  FD_REQUIRE(p.numel >= 0, "scheduler_update: numel must be >= 0");
  if (p.numel == 0) return;
  FD_REQUIRE(p.sample && p.model_output && p.prev_sample && p.coefs,
             "scheduler_update: sample, model_output, coefs and prev_sample must be non-null");
  const bool vectorize = aligned16(p.sample) && aligned16(p.model_output) && aligned16(p.prev_sample) &&
                         (!p.model_output_uncond || aligned16(p.model_output_uncond)) &&
                         (!p.noise || aligned16(p.noise)) && (!p.prev_x0 || aligned16(p.prev_x0)) &&
                         (!p.x0_out || aligned16(p.x0_out));
  FD_DTYPE_SWITCH(p.dtype, elem_t, [&] {
    FD_BOOL_SWITCH(p.model_output_uncond != nullptr, kHasU, [&] {
      FD_BOOL_SWITCH(p.noise != nullptr, kHasNoise, [&] {
        FD_BOOL_SWITCH(p.prev_x0 != nullptr, kHasPrev, [&] {
          FD_BOOL_SWITCH(p.x0_out != nullptr, kWriteX0, [&] {
            launch<elem_t, kHasU, kHasNoise, kHasPrev, kWriteX0>(p, vectorize, stream);
          });
        });
      });
    });
  });
}

}  // namespace cuda
}  // namespace flashdiff
