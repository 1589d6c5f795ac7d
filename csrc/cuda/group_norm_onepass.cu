// Group normalization forward in ONE kernel: x read once from DRAM, y written once
// (the same math as group_norm.cu, GroupNormParams in params.h):
//
//   y = act(((x − mean)·rstd·weight + bias)·(1 + scale) + shift),  stats per (n, group)
//
// Grid: one thread-block cluster of `cs` CTAs (cs = 1, 2, 4 or 8, the portable maximum) per
// (n, g); grid.x = N·G·cs, so cluster (n·G + g) is blocks [ng·cs, ng·cs + cs) and a CTA's
// rank in it is blockIdx.x % cs. Each CTA holds a 1/cs slice of its group in shared memory:
//
//   1. copy:  cp.async (16-byte, 4-byte or one element per copy) global -> shared, every copy
//             of the slice in flight at once (no registers held, unlike a load loop); meanwhile
//             the per-channel coefficient tables A' = w·(1 + s), B = b·(1 + s) + sh are filled.
//   2. stats: each thread reads back the vectors IT copied (cp.async.wait_all makes a thread's
//             own copies visible to it, so no block barrier is needed for the data) and keeps a
//             shifted Welford (count, mean, M2) of x − K, K = the group's first element (fp32
//             running means of 1e4 + N(0, 1) would drift by ulps of 1e4 per merge otherwise);
//             a block merge (Chan) leaves the CTA's partial in shared memory.
//   3. cluster barrier; then thread 0 of EVERY CTA reads the cs partials through distributed
//             shared memory (cluster.map_shared_rank) and merges them in rank order 0..cs-1:
//             each CTA gets bitwise the same mean and rstd with no second exchange.
//             It arrives on a second cluster barrier right after those reads and waits on it
//             only before exiting: no CTA may leave (its shared memory is then gone) while a
//             peer may still read its partial, and the wait costs nothing by then.
//   4. apply: y = act(((x − K) − m)·rstd·A'[c] + B[c]) from shared memory (m: the shifted
//             mean; x − K is exact-ish for a group far from zero, so no |mean|/std digits lost),
//             written with the same vector width as the copy.
//
// DRAM traffic: N·C·S elements read + N·C·S written, the floor for this op
// ([1, 320, 128, 128] bf16: 10.5 MB each way). The multi-launch path moves 3 passes.
//
// Shared memory per CTA: 2·Cg fp32 coefficient words (16-byte padded) + ceil(group/cs)
// elements of x in its own dtype. The launcher picks the smallest cs that (a) fills the
// machine (N·G·cs >= SMs while each thread still gets a whole vector) and (b) keeps a CTA at or
// under half the opt-in shared memory, so two CTAs share an SM and one's copies overlap the
// other's stores; cs = 8 still over the whole opt-in limit (~227 KB on sm_90: 1.8 MB per group)
// returns false and the caller takes the multi-launch path. SD/SDXL groups are at most 640 KB
// (fp32 [*, 320, 128, 128], G = 32): 80 KB per CTA at cs = 8.
//
// Host side per call: no scratch allocation, no pointer-attribute query; device facts (SM
// count, opt-in shared memory, compute capability) and each kernel's shared-memory opt-in are
// set once per device and cached. Clusters need sm_90: elsewhere the launcher returns false.
#include <cooperative_groups.h>

#include "api.cuh"
#include "common.cuh"
#include "group_norm_common.cuh"

namespace flashdiff {
namespace cuda {
namespace onepass {  // named, not anonymous: the sm_80 pass compiles the kernel body out

// ------------------------------------------------------------------ device-side helpers
// Copy BYTES (4, 8 or 16) global -> shared without a register round trip. 16 bytes: .cg
// (L2 only: x is read once); smaller: .ca (the only form the ISA has for them).
template <int BYTES>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async moves 4, 8 or 16 bytes");
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const size_t g = __cvta_generic_to_global(gmem);
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(g) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(s), "l"(g), "n"(BYTES) : "memory");
  }
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// The two halves of a cluster barrier (cluster.sync() is arrive + wait back to back). release:
// this thread's earlier memory accesses (distributed shared memory reads included) happen
// before any peer passes the wait; acquire: peers' earlier writes are visible after it.
// .aligned: every thread of the warp executes it together (all calls below are uniform).
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"); }

}  // namespace onepass

namespace {

namespace cg = cooperative_groups;
using gn::Welford;
using onepass::cp_async;
using onepass::cp_async_wait_all;
using onepass::cluster_arrive;
using onepass::cluster_wait;

constexpr int kThreads = 256;    // 8 warps; two CTAs per SM keep 16 warps of stores in flight
constexpr int kMaxCluster = 8;   // portable cluster size limit (no non-portable opt-in)
constexpr int kMaxDevices = 64;

// Bytes of the coefficient tables A', B (2·Cg fp32) rounded up to 16 so the x slice after them
// is 16-byte aligned for cp.async and the vector reads.
__host__ __device__ __forceinline__ int64_t coef_bytes(int64_t Cg) { return (2 * Cg * 4 + 15) / 16 * 16; }

// VEC: elements per copy (16 bytes, 4 bytes or one element). Host guarantees: x, y aligned to
// VEC·sizeof(T); NCHW: S % VEC == 0 (a vector stays in one channel, group starts are aligned);
// channels_last: Cg % VEC == 0 (a vector stays in one group row). Group elements Cg·S < 2^31
// (the group fits in a cluster's shared memory), so in-group indices are int.
template <typename T, int VEC, bool CHANNELS_LAST, Activation ACT>
__global__ void __launch_bounds__(kThreads, 2)
group_norm_onepass_kernel(GroupNormParams p, int slice_v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int cs = static_cast<int>(cluster.num_blocks());
  const int64_t ng = blockIdx.x / cs;
  const int64_t n = ng / p.G, g = ng - n * p.G;
  const int Cg = static_cast<int>(p.C / p.G);
  const int S = static_cast<int>(p.S);
  const int group_v = Cg * S / VEC;
  // period of the (row, column) tracker: NCHW rows are channels (S/VEC vectors each),
  // channels_last rows are spatial positions (Cg/VEC vectors of the group each).
  const int period = CHANNELS_LAST ? Cg / VEC : S / VEC;
  const int begin = rank * slice_v;
  const int end = min(begin + slice_v, group_v);  // a trailing rank may get nothing: end <= begin
  const T* xg = gn::group_base<T, CHANNELS_LAST>(static_cast<const T*>(p.x), n, g, p.C, p.S, Cg);
  T* yg = gn::group_base<T, CHANNELS_LAST>(static_cast<T*>(p.y), n, g, p.C, p.S, Cg);

  extern __shared__ float4 smem_raw[];  // float4: 16-byte alignment of the dynamic block
  float* coef_a = reinterpret_cast<float*>(smem_raw);  // [Cg]  w·(1 + s)
  float* coef_b = coef_a + Cg;                          // [Cg]  b·(1 + s) + sh
  T* slice = reinterpret_cast<T*>(reinterpret_cast<char*>(smem_raw) + coef_bytes(Cg));
  __shared__ Welford warp_acc[kThreads / 32];
  __shared__ Welford cta_acc;       // this CTA's partial, read by every CTA of the cluster
  __shared__ float group_stat[2];   // shifted mean m, rstd

  const float K = to_float(xg[0]);  // the shift; every CTA of the group reads the same element

  // 1. copies in flight, then the coefficient tables while they land
  constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
  if (begin + static_cast<int>(threadIdx.x) < end) {
    gn::DivModTracker<int> pos(begin + threadIdx.x, period, kThreads);
    for (int v = begin + threadIdx.x; v < end; v += kThreads, pos.advance()) {
      const int64_t off = CHANNELS_LAST ? static_cast<int64_t>(pos.q) * p.C + pos.r * VEC : static_cast<int64_t>(v) * VEC;
      if constexpr (kBytes >= 4) {
        cp_async<kBytes>(slice + static_cast<int64_t>(v - begin) * VEC, xg + off);
      } else {
        slice[v - begin] = xg[off];  // one 2-byte element: below cp.async's minimum
      }
    }
  }
  for (int c = threadIdx.x; c < Cg; c += kThreads) {
    const int64_t ch = g * Cg + c;
    const float w = p.weight ? p.weight[ch] : 1.f;
    const float b = p.bias ? p.bias[ch] : 0.f;
    const float s1 = 1.f + (p.scale ? p.scale[n * p.C + ch] : 0.f);
    const float sh = p.shift ? p.shift[n * p.C + ch] : 0.f;
    coef_a[c] = w * s1;
    coef_b[c] = b * s1 + sh;
  }
  cp_async_wait_all();

  // 2. this thread's shifted statistics, then the CTA's
  Welford acc = {0.f, 0.f, 0.f};
  for (int v = begin + threadIdx.x; v < end; v += kThreads) {
    float e[VEC];
    load_vec<T, VEC>(e, slice + static_cast<int64_t>(v - begin) * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) e[j] -= K;
    gn::add_shifted<VEC>(acc, e);
  }
  acc = gn::block_merge<kThreads>(acc, warp_acc);
  if (threadIdx.x == 0) cta_acc = acc;

  // 3. exchange: the barrier publishes every CTA's cta_acc (and this CTA's coefficient tables:
  // it is also a full barrier of this block's threads)
  cluster_arrive();
  cluster_wait();
  if (threadIdx.x == 0) {
    Welford total = {0.f, 0.f, 0.f};
    for (int r = 0; r < cs; ++r) total = gn::merge(total, *cluster.map_shared_rank(&cta_acc, r));
    const float var = total.n > 0.f ? fmaxf(total.m2 / total.n, 0.f) : 0.f;  // biased, as torch
    const float rstd = rsqrtf(var + p.eps);
    group_stat[0] = total.mean;
    group_stat[1] = rstd;
    if (rank == 0) {
      if (p.mean_out) p.mean_out[ng] = K + total.mean;
      if (p.rstd_out) p.rstd_out[ng] = rstd;
    }
  }
  __syncthreads();
  cluster_arrive();  // after thread 0's remote reads (program order + release); waited at exit
  const float m = group_stat[0], rstd = group_stat[1];

  // 4. apply from shared memory; each thread rewrites exactly the vectors it copied
  if (begin + static_cast<int>(threadIdx.x) < end) {
    gn::DivModTracker<int> pos(begin + threadIdx.x, period, kThreads);
    for (int v = begin + threadIdx.x; v < end; v += kThreads, pos.advance()) {
      float e[VEC];
      load_vec<T, VEC>(e, slice + static_cast<int64_t>(v - begin) * VEC);
      int64_t off;
      if constexpr (CHANNELS_LAST) {
        off = static_cast<int64_t>(pos.q) * p.C + pos.r * VEC;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const int c = pos.r * VEC + j;
          e[j] = apply_activation(fmaf(((e[j] - K) - m) * rstd, coef_a[c], coef_b[c]), ACT);
        }
      } else {
        off = static_cast<int64_t>(v) * VEC;
        const float a = coef_a[pos.q] * rstd, b = coef_b[pos.q];
#pragma unroll
        for (int j = 0; j < VEC; ++j) e[j] = apply_activation(fmaf((e[j] - K) - m, a, b), ACT);
      }
      store_vec<T, VEC>(yg + off, e);
    }
  }
  cluster_wait();  // no CTA exits while a peer may still read its cta_acc
#else
  __trap();  // clusters need sm_90; the launcher never launches this elsewhere
#endif
}

// ------------------------------------------------------------------ host side
// Per-device facts, queried once (attribute queries are cheap but not free, and this op sits
// on the sampler's hot path). 0 = not yet queried.
struct DeviceFacts {
  int major;       // compute capability major
  int smem_optin;  // bytes of shared memory one block may opt in to
};

DeviceFacts device_facts(int dev) {
  static std::atomic<int> major_cache[kMaxDevices], smem_cache[kMaxDevices];  // zero-initialized
  const bool cacheable = dev >= 0 && dev < kMaxDevices;
  if (cacheable) {
    const int mj = major_cache[dev].load(std::memory_order_relaxed);
    const int sm = smem_cache[dev].load(std::memory_order_relaxed);
    if (mj > 0 && sm > 0) return {mj, sm};
  }
  DeviceFacts f{0, 0};
  FD_CUDA_CHECK(cudaDeviceGetAttribute(&f.major, cudaDevAttrComputeCapabilityMajor, dev));
  FD_CUDA_CHECK(cudaDeviceGetAttribute(&f.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (cacheable) {
    major_cache[dev].store(f.major, std::memory_order_relaxed);
    smem_cache[dev].store(f.smem_optin, std::memory_order_relaxed);
  }
  return f;
}

// Static shared memory of the kernel (warp partials, the CTA partial, the group's two floats:
// ~120 bytes) is taken out of the opt-in limit with a margin.
constexpr int kStaticSmemMargin = 1024;

// Raises one kernel instantiation's dynamic shared-memory limit to everything the device
// allows, once per device: the attribute only permits, so a launch asking for less runs at the
// occupancy its own request gives. Templated on the kernel's parameters (not on its pointer
// type, which every instantiation shares) so each instantiation keeps its own cache.
template <typename T, int VEC, bool CHANNELS_LAST, Activation ACT>
void allow_smem_once(int dev, int bytes) {
  static std::atomic<int> done[kMaxDevices];  // zero-initialized; one array per instantiation
  const bool cacheable = dev >= 0 && dev < kMaxDevices;
  if (cacheable && done[dev].load(std::memory_order_relaxed) >= bytes) return;
  FD_CUDA_CHECK(cudaFuncSetAttribute(group_norm_onepass_kernel<T, VEC, CHANNELS_LAST, ACT>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (cacheable) done[dev].store(bytes, std::memory_order_relaxed);
}

template <typename T, int VEC, bool CHANNELS_LAST>
bool run_onepass(const GroupNormParams& p, cudaStream_t stream, int dev, const DeviceFacts& f) {
  const int64_t N = p.N, G = p.G, Cg = p.C / p.G, S = p.S;
  const int64_t group_elems = Cg * S;
  if (group_elems > 0x7fffffffLL) return false;
  const int64_t group_v = group_elems / VEC;
  const int64_t budget = f.smem_optin - kStaticSmemMargin;
  const int64_t sms = sm_count();
  auto smem_for = [&](int64_t cs) { return coef_bytes(Cg) + ceil_div(group_v, cs) * VEC * int64_t(sizeof(T)); };

  // Smallest cluster that keeps a CTA within half the budget (two CTAs per SM) and fills the
  // SMs; stop growing for filling once a CTA would get less than one vector per thread.
  int64_t cs = 1;
  while (cs < kMaxCluster) {
    const bool too_big = smem_for(cs) > budget / 2;
    const bool underfilled = N * G * cs < sms && ceil_div(group_v, 2 * cs) >= kThreads;
    if (!too_big && !underfilled) break;
    cs *= 2;
  }
  const int64_t smem = smem_for(cs);
  if (smem > budget) return false;  // the group does not fit in a cluster: multi-launch path
  if (N * G * cs > 0x7fffffffLL) return false;
  const int slice_v = static_cast<int>(ceil_div(group_v, cs));

  bool launched = false;
  FD_ACTIVATION_SWITCH(p.activation, kAct, [&] {
    auto kernel = group_norm_onepass_kernel<T, VEC, CHANNELS_LAST, kAct>;
    allow_smem_once<T, VEC, CHANNELS_LAST, kAct>(dev, static_cast<int>(budget));

    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(N * G * cs), 1, 1);  // a multiple of the cluster size
    cfg.blockDim = dim3(kThreads, 1, 1);
    cfg.dynamicSmemBytes = static_cast<size_t>(smem);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(cs);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, p, slice_v);
    if (err != cudaSuccess) {
      cudaGetLastError();  // a refused launch is not sticky: leave no error for the next op's check
      throw_cuda_error(err, "cudaLaunchKernelEx(group_norm_onepass_kernel)", __FILE__, __LINE__);
    }
    launched = true;
  });
  return launched;
}

}  // namespace

bool group_norm_fwd_onepass(const GroupNormParams& p, cudaStream_t stream) {
  FD_REQUIRE(p.N >= 0 && p.C >= 0 && p.S >= 0 && p.G > 0, "group_norm_fwd_onepass: need N, C, S >= 0 and G > 0");
  FD_REQUIRE(p.C % p.G == 0, "group_norm_fwd_onepass: num_groups must divide C");
  if (p.N == 0 || p.C == 0 || p.S == 0) return true;
  FD_REQUIRE(p.x && p.y, "group_norm_fwd_onepass: x and y must be non-null");
  int dev = 0;
  FD_CUDA_CHECK(cudaGetDevice(&dev));
  const DeviceFacts f = device_facts(dev);
  if (f.major < 9) return false;  // thread-block clusters are sm_90+
  bool done = false;
  FD_DTYPE_SWITCH(p.dtype, elem_t, [&] {
    const int64_t Cg = p.C / p.G;
    // Widest copy whose vectors never straddle a channel (NCHW: S % VEC) or a group row
    // (channels_last: Cg % VEC) and whose addresses are aligned to its size.
    auto fits = [&](int vec) {
      const std::uintptr_t mask = static_cast<std::uintptr_t>(vec * sizeof(elem_t)) - 1;
      const bool aligned = ((reinterpret_cast<std::uintptr_t>(p.x) | reinterpret_cast<std::uintptr_t>(p.y)) & mask) == 0;
      return aligned && (p.channels_last ? Cg % vec == 0 : p.S % vec == 0);
    };
    constexpr int kVec16 = 16 / sizeof(elem_t);                          // 4 fp32, 8 half
    constexpr int kVec4 = sizeof(elem_t) >= 4 ? 1 : 4 / sizeof(elem_t);  // 1 fp32, 2 half
    FD_BOOL_SWITCH(p.channels_last, kChannelsLast, [&] {
      if (fits(kVec16)) {
        done = run_onepass<elem_t, kVec16, kChannelsLast>(p, stream, dev, f);
      } else if (kVec4 > 1 && fits(kVec4)) {
        done = run_onepass<elem_t, kVec4, kChannelsLast>(p, stream, dev, f);
      } else {
        done = run_onepass<elem_t, 1, kChannelsLast>(p, stream, dev, f);
      }
    });
  });
  return done;
}

}  // namespace cuda
}  // namespace flashdiff
