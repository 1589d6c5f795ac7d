// Group normalization forward with fused per-sample modulation and activation
// (params.h GroupNormParams), NCHW or channels_last, fp32 / fp16 / bf16 data, fp32 statistics.
//
//   y = act(((x − mean)·rstd·weight + bias)·(1 + scale) + shift),  stats per (n, group)
//
// Three launches on the caller's stream:
//   1. stats:    each block reduces one chunk of one (n, g) group to a (count, mean, M2)
//                partial: per-thread Welford over 16-byte vectors, Chan merges across the
//                block. Groups are split in many chunks so batch 1 fills the GPU. Values are
//                shifted by K, the group's first element, so that the running means are of
//                the size of the spread, not of |mean| (fp32 running means of 1e4 + N(0, 1)
//                drift by ulps of 1e4 per merge; the CPU and Triton paths failed the
//                tolerance rule that way). Reads x once (N·C·S elements).
//   2. finalize: one warp per (n, g) merges its partials (Chan), adds K back, writes
//                mean/rstd if asked, and folds weight, bias, scale, shift into per-(n, c) fp32
//                triples (M, A, B).
//   3. apply:    y = act((x − M[n,c])·A[n,c] + B[n,c]), 16-byte loads and stores.
//                Reads x again, writes y: 2·N·C·S elements.
// Total traffic ≈ 3 passes over x (2 reads + 1 write); the roofline is 3·bytes(x)/HBM bandwidth
// ([2, 320, 64, 64] bf16: 15.7 MB, ≈ 5 µs on an H100).
//
// Scratch (partials + the folded triples, ≈ 12·N·G·chunks + 12·N·C bytes) comes from the
// stream-ordered allocator: cudaMallocAsync on the caller's stream (the device's default
// memory pool, so steady-state calls do not reach the driver) and cudaFreeAsync on the same
// stream after the last launch, also when a launch fails. Both are capturable in a CUDA graph.
//
// Why x − M instead of x·A + (B − M·A): the folded form loses |mean|/std digits in fp32 when a
// group sits far from zero; subtracting first costs one FADD per element.
#include "api.cuh"
#include "common.cuh"
#include "group_norm_common.cuh"

namespace flashdiff {
namespace cuda {
namespace {

constexpr int kStatThreads = 256;
constexpr int kFinalizeWarps = 8;
constexpr int kApplyThreads = 256;

using gn::Welford;
using gn::merge;
using gn::warp_merge;
using gn::group_base;
using DivModTracker = gn::DivModTracker<int64_t>;

// ------------------------------------------------------------------ pass 1: partial statistics
// A group (n, g) seen as a [rows, width] array with row stride ld:
//   NCHW:          rows 1, width Cg·S (contiguous)      channels_last: rows S, width Cg, ld C
// Block (blockIdx.x = n·G + g, blockIdx.y = chunk) reduces vectors [chunk·chunk_v, …) of it
// (the group's address: gn::group_base).
template <typename T, int VEC, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kStatThreads)
group_norm_stats_kernel(const T* __restrict__ x, Welford* __restrict__ partials, int64_t C, int64_t S, int64_t G,
                        int64_t chunk_v) {
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / G, g = ng - n * G;
  const int64_t Cg = C / G;
  const int64_t width_v = CHANNELS_LAST ? Cg / VEC : Cg * S / VEC;  // vectors per row
  const int64_t total_v = CHANNELS_LAST ? S * width_v : width_v;
  const T* base = group_base<T, CHANNELS_LAST>(x, n, g, C, S, Cg);
  const float shift = to_float(base[0]);  // K: every chunk of the group uses the same one

  const int64_t begin = static_cast<int64_t>(blockIdx.y) * chunk_v;
  const int64_t end = min(begin + chunk_v, total_v);

  Welford acc = {0.f, 0.f, 0.f};
  const int64_t v0 = begin + threadIdx.x;
  if (v0 < end) {
    DivModTracker pos(v0, width_v, kStatThreads);  // (row, vector in row)
    for (int64_t v = v0; v < end; v += kStatThreads, pos.advance()) {
      const T* p = CHANNELS_LAST ? base + pos.q * C + pos.r * VEC : base + v * VEC;
      float e[VEC];
      load_vec<T, VEC>(e, p);
#pragma unroll
      for (int j = 0; j < VEC; ++j) e[j] -= shift;
      gn::add_shifted<VEC>(acc, e);
    }
  }

  __shared__ Welford warp_acc[kStatThreads / 32];
  acc = gn::block_merge<kStatThreads>(acc, warp_acc);
  if (threadIdx.x == 0) partials[ng * gridDim.y + blockIdx.y] = acc;
}

// ------------------------------------------------------------------ pass 2: finalize + fold
// One warp per (n, g). fold = [M | A | B], each [N·C] (padded to a multiple of 8 floats).
template <typename T, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kFinalizeWarps * 32)
group_norm_finalize_kernel(const Welford* __restrict__ partials, int64_t chunks, GroupNormParams p,
                           float* __restrict__ fold, int64_t fold_stride) {
  const int64_t ng = static_cast<int64_t>(blockIdx.x) * kFinalizeWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (ng >= p.N * p.G) return;  // whole warp leaves together
  Welford acc = {0.f, 0.f, 0.f};
  for (int64_t i = lane; i < chunks; i += 32) acc = merge(acc, partials[ng * chunks + i]);
  acc = warp_merge(acc);
  // lanes merged in different orders: take lane 0's total so every channel sees one mean
  const int64_t n = ng / p.G, g = ng - n * p.G;
  const float shift = to_float(*group_base<T, CHANNELS_LAST>(static_cast<const T*>(p.x), n, g, p.C, p.S, p.C / p.G));
  const float mean = shift + __shfl_sync(0xffffffffu, acc.mean, 0);
  const float var = fmaxf(__shfl_sync(0xffffffffu, acc.m2, 0) / __shfl_sync(0xffffffffu, acc.n, 0), 0.f);  // biased
  const float rstd = rsqrtf(var + p.eps);
  if (lane == 0) {
    if (p.mean_out) p.mean_out[ng] = mean;
    if (p.rstd_out) p.rstd_out[ng] = rstd;
  }
  const int64_t Cg = p.C / p.G;
  for (int64_t c = g * Cg + lane; c < (g + 1) * Cg; c += 32) {
    const float w = p.weight ? p.weight[c] : 1.f;
    const float b = p.bias ? p.bias[c] : 0.f;
    const float s1 = 1.f + (p.scale ? p.scale[n * p.C + c] : 0.f);
    const float sh = p.shift ? p.shift[n * p.C + c] : 0.f;
    const int64_t i = n * p.C + c;
    fold[i] = mean;
    fold[fold_stride + i] = rstd * w * s1;
    fold[2 * fold_stride + i] = b * s1 + sh;
  }
}

// ------------------------------------------------------------------ pass 3: apply
// Grid: x = chunks of one sample's N·C·S/VEC vectors, y = samples (looped past 65535).
// NCHW: a vector lies in one channel (S % VEC == 0), channel = v / (S/VEC).
// channels_last: a vector spans VEC consecutive channels (C % VEC == 0), first = (v % (C/VEC))·VEC.
template <typename T, int VEC, bool CHANNELS_LAST, Activation ACT>
__global__ void __launch_bounds__(kApplyThreads)
group_norm_apply_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ fold,
                        int64_t fold_stride, int64_t N, int64_t C, int64_t S) {
  const int64_t per_sample_v = C * S / VEC;
  const int64_t v0 = static_cast<int64_t>(blockIdx.x) * kApplyThreads + threadIdx.x;
  if (v0 >= per_sample_v) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kApplyThreads;
  const DivModTracker start(v0, CHANNELS_LAST ? C / VEC : S / VEC, stride);
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const int64_t off = n * C * S;
    const float* fm = fold + n * C;
    const float* fa = fm + fold_stride;
    const float* fb = fm + 2 * fold_stride;
    DivModTracker pos = start;
    for (int64_t v = v0; v < per_sample_v; v += stride, pos.advance()) {
      float e[VEC], mm[VEC], aa[VEC], bb[VEC];
      load_vec<T, VEC>(e, x + off + v * VEC);
      if constexpr (CHANNELS_LAST) {
        const int64_t c = pos.r * VEC;  // fold is 32-byte aligned and C % VEC == 0
        load_vec<float, VEC>(mm, fm + c);
        load_vec<float, VEC>(aa, fa + c);
        load_vec<float, VEC>(bb, fb + c);
      } else {
        const int64_t c = pos.q;
        const float m = __ldg(fm + c), a = __ldg(fa + c), b = __ldg(fb + c);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          mm[j] = m;
          aa[j] = a;
          bb[j] = b;
        }
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) e[j] = apply_activation(fmaf(e[j] - mm[j], aa[j], bb[j]), ACT);
      store_vec<T, VEC>(y + off + v * VEC, e);
    }
  }
}

// Frees the scratch on the stream when the launcher leaves, normally or by an exception.
struct StreamScratch {
  void* ptr = nullptr;
  cudaStream_t stream;
  StreamScratch(size_t bytes, cudaStream_t s) : stream(s) { FD_CUDA_CHECK(cudaMallocAsync(&ptr, bytes, stream)); }
  ~StreamScratch() {
    if (ptr) cudaFreeAsync(ptr, stream);
  }
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
};

// STATS_VEC / APPLY_VEC: elements per access in pass 1 / pass 3 (16 bytes or 1).
template <typename T, int STATS_VEC, int APPLY_VEC, bool CHANNELS_LAST>
void run(const GroupNormParams& p, cudaStream_t stream) {
  const int64_t N = p.N, C = p.C, S = p.S, G = p.G, Cg = C / G;
  const int64_t sms = sm_count();

  // pass-1 split: aim for ~4 waves of 256-thread blocks, each thread reducing >= 4 vectors.
  const int64_t group_v = Cg * S / STATS_VEC;
  const int64_t min_chunk_v = kStatThreads * 4;
  int64_t chunks = std::max<int64_t>(1, ceil_div(sms * 4 * (2048 / kStatThreads), N * G));
  chunks = std::min<int64_t>({chunks, ceil_div(group_v, min_chunk_v), 65535});
  chunks = std::max<int64_t>(chunks, 1);
  const int64_t chunk_v = ceil_div(group_v, chunks);
  chunks = ceil_div(group_v, chunk_v);

  const int64_t fold_stride = ceil_div(N * C, 8) * 8;  // keeps each fold array 32-byte aligned
  const size_t partial_bytes = static_cast<size_t>(ceil_div(N * G * chunks * sizeof(Welford), 256) * 256);
  const size_t fold_bytes = static_cast<size_t>(3 * fold_stride) * sizeof(float);
  StreamScratch scratch(partial_bytes + fold_bytes, stream);
  Welford* partials = static_cast<Welford*>(scratch.ptr);
  float* fold = reinterpret_cast<float*>(static_cast<char*>(scratch.ptr) + partial_bytes);

  FD_REQUIRE(N * G <= 0x7fffffffLL, "group_norm_fwd: N * num_groups is too large for one launch");
  group_norm_stats_kernel<T, STATS_VEC, CHANNELS_LAST>
      <<<dim3(static_cast<unsigned>(N * G), static_cast<unsigned>(chunks)), kStatThreads, 0, stream>>>(
          static_cast<const T*>(p.x), partials, C, S, G, chunk_v);
  FD_CHECK_LAUNCH("group_norm_stats_kernel");

  group_norm_finalize_kernel<T, CHANNELS_LAST>
      <<<static_cast<unsigned>(ceil_div(N * G, kFinalizeWarps)), kFinalizeWarps * 32, 0, stream>>>(
          partials, chunks, p, fold, fold_stride);
  FD_CHECK_LAUNCH("group_norm_finalize_kernel");

  const int64_t per_sample_v = C * S / APPLY_VEC;
  const int64_t grid_y = std::min<int64_t>(N, 65535);
  const int64_t grid_x = std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(per_sample_v, kApplyThreads), ceil_div(sms * 8, grid_y)));
  FD_ACTIVATION_SWITCH(p.activation, kAct, [&] {
    group_norm_apply_kernel<T, APPLY_VEC, CHANNELS_LAST, kAct>
        <<<dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y)), kApplyThreads, 0, stream>>>(
            static_cast<const T*>(p.x), static_cast<T*>(p.y), fold, fold_stride, N, C, S);
    FD_CHECK_LAUNCH("group_norm_apply_kernel");
  });
}

}  // namespace

void group_norm_fwd(const GroupNormParams& p, cudaStream_t stream) {
  FD_REQUIRE(p.N >= 0 && p.C >= 0 && p.S >= 0 && p.G > 0, "group_norm_fwd: need N, C, S >= 0 and G > 0");
  FD_REQUIRE(p.C % p.G == 0, "group_norm_fwd: num_groups must divide C");
  if (p.N == 0 || p.C == 0 || p.S == 0) return;
  FD_REQUIRE(p.x && p.y, "group_norm_fwd: x and y must be non-null");
  FD_DTYPE_SWITCH(p.dtype, elem_t, [&] {
    constexpr int kVec = 16 / sizeof(elem_t);
    const int64_t Cg = p.C / p.G;
    // 16-byte accesses need aligned pointers and vectors that never straddle what the kernels
    // hold constant across a vector: pass 1, one group row (NCHW: S % VEC, channels_last:
    // Cg % VEC); pass 3, one channel (NCHW: S % VEC) or whole channels (channels_last: C % VEC).
    const bool aligned = aligned16(p.x) && aligned16(p.y);
    const bool stats_vec = aligned && (p.channels_last ? Cg % kVec == 0 : p.S % kVec == 0);
    const bool apply_vec = aligned && (p.channels_last ? p.C % kVec == 0 : p.S % kVec == 0);
    FD_BOOL_SWITCH(p.channels_last, kChannelsLast, [&] {
      if (stats_vec) {  // implies apply_vec
        run<elem_t, kVec, kVec, kChannelsLast>(p, stream);
      } else if (apply_vec) {
        run<elem_t, 1, kVec, kChannelsLast>(p, stream);
      } else {
        run<elem_t, 1, 1, kChannelsLast>(p, stream);
      }
    });
  });
}

}  // namespace cuda
}  // namespace flashdiff
