// Shared CUDA helpers: error checks, compile-time switches, element conversions, 16-byte vectors.
// No torch headers (DESIGN.md decision 1). Errors become std::runtime_error, which pybind11
// turns into a Python RuntimeError carrying the CUDA message.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "flashdiff/math.h"
#include "flashdiff/params.h"
#include "flashdiff/static_switch.h"

namespace flashdiff {
namespace cuda {

// ------------------------------------------------------------------ errors
[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string("flashdiff._cuda: ") + what + " failed: " + cudaGetErrorName(err) +
                           " (" + cudaGetErrorString(err) + ") at " + file + ":" + std::to_string(line));
}

// Check a runtime call.
#define FD_CUDA_CHECK(expr)                                                         \
  do {                                                                              \
    cudaError_t fd_err_ = (expr);                                                   \
    if (fd_err_ != cudaSuccess) {                                                   \
      ::flashdiff::cuda::throw_cuda_error(fd_err_, #expr, __FILE__, __LINE__);      \
    }                                                                               \
  } while (0)

// Check the launch just made (configuration errors surface here; faults surface later, on
// the caller's next synchronizing call, as with any asynchronous CUDA work).
#define FD_CHECK_LAUNCH(name)                                                       \
  do {                                                                              \
    cudaError_t fd_err_ = cudaGetLastError();                                       \
    if (fd_err_ != cudaSuccess) {                                                   \
      ::flashdiff::cuda::throw_cuda_error(fd_err_, "launch of " name, __FILE__, __LINE__); \
    }                                                                               \
  } while (0)

#define FD_REQUIRE(cond, msg)                                                       \
  do {                                                                              \
    if (!(cond)) throw std::runtime_error(std::string("flashdiff._cuda: ") + (msg)); \
  } while (0)

// ------------------------------------------------------------------ static switches
// FD_BOOL_SWITCH and FD_ACTIVATION_SWITCH come from flashdiff/static_switch.h (shared with the
// CPU kernels); here the dtype switch names CUDA's 16-bit types (callers name the type elem_t).
#define FD_DTYPE_SWITCH(DTYPE, TYPE_NAME, ...) \
  FD_DTYPE_SWITCH_AS(DTYPE, TYPE_NAME, __half, __nv_bfloat16, "flashdiff._cuda", __VA_ARGS__)

// Half-precision only (attention).
#define FD_HALF_DTYPE_SWITCH(DTYPE, ...)                                             \
  [&] {                                                                              \
    switch (DTYPE) {                                                                 \
      case ::flashdiff::DType::kFloat16: { using elem_t = __half; return __VA_ARGS__(); }         \
      case ::flashdiff::DType::kBFloat16: { using elem_t = __nv_bfloat16; return __VA_ARGS__(); } \
      default: break;                                                                \
    }                                                                                \
    throw std::runtime_error("flashdiff._cuda: attention_fwd needs dtype 1 (float16) or 2 (bfloat16)"); \
  }()

// ------------------------------------------------------------------ element conversions
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N elements of T moved as one access (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_vec(float (&out)[N], const T* p) {
  Vec<T, N> tmp = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(tmp.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  Vec<T, N> tmp;
#pragma unroll
  for (int i = 0; i < N; ++i) tmp.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = tmp;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// ------------------------------------------------------------------ device facts
// Multiprocessor count of the current device, cached per device (an attribute query is
// cheap but not free, and these ops sit on the sampler's hot path).
inline int sm_count() {
  static std::atomic<int> cache[64];  // static storage: zero-initialized
  int dev = 0;
  FD_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 0 && dev < 64) {
    int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  FD_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
  if (dev >= 0 && dev < 64) cache[dev].store(v, std::memory_order_relaxed);
  return v > 0 ? v : 1;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace flashdiff
