// Cross-attention forward for short key sets (text context): Skv <= 256, head dim <= 160,
// fp16/bf16, optional key-padding mask. Served as the dispatch variant "cuda:cross"
// (docs/internals.md, "Decision: a CUDA cross-attention specialist").
//
// One CTA = kWarps warps = 16·kWarps query rows (64 or 128) of one (batch, head); every CTA
// copies the whole K and V of its (b, h) into shared memory once, so there is no key loop and
// no online softmax: each warp computes all scores of its 16 rows against all keys in registers
// (mma.sync m16n8k16), takes the row max and the row sum once, and multiplies P·V. Schedule:
//   cp.async Q, K (group 1) and V (group 2) → wait for group 1 → S = Q·Kᵀ while V lands →
//   scale, mask, max, exp2, sum, P packed to 16 bits → wait for V → O = P·V → O / l, lse, store.
// The PTX wrappers, the tile loader, the fragment addressing and the warp epilogue are the
// FlashAttention-2 kernel's (attention_kernel.cuh), included, not copied.
//
// Roofline (SD 1.5 at 64x64 latents, CFG batch: B·H = 2·8, Sq = 4096, Skv = 77, D = 40, bf16):
//   DRAM bytes  Q and O 2·B·H·Sq·D·2 = 10.5 MB, K and V 2·B·H·Skv·D·2 = 0.2 MB, lse B·H·Sq·4
//               = 0.26 MB: ~11 MB, 2.3 µs at the H200's 4.8 TB/s. K and V are re-read from L2
//               by every CTA of their (b, h) (32 CTAs of 128 rows here: 6.3 MB of L2 reads).
//   FLOPs       4·B·H·Sq·Skv·D = 0.81 GFLOP; the tensor cores execute the padded 80 keys x 48
//               columns (1.0 GFLOP), ~1.5 µs at a mma.sync rate of ~660 TFLOP/s.
//   Intensity   ~Skv FLOP per byte of Q and O (4·Skv·D FLOPs per 4·D bytes) against a bf16 ridge
//               of ~200 on an H200: every cross-attention this kernel takes with Skv < ~200 is
//               bound by streaming Q in and O out, which is what it is built to do at once.
#include <atomic>
#include <cmath>

#include "api.cuh"
#include "attention.cuh"
#include "attention_kernel.cuh"
#include "common.cuh"

namespace flashdiff {
namespace cuda {
namespace cross {

using attn::kPad;

// K and V of one (b, h) live in shared memory: keys x (D + kPad) x 2 bytes x 2. At the limits
// (256 keys, bucket 160): 256·168·2·2 = 168 KB, plus a 64-row Q tile (21 KB) = 189 KB, within the
// sm_90 opt-in maximum (227 KB) but not sm_80's (163 KB): the host checks the device's limit.
constexpr int kMaxKeys = 256;
constexpr int kMaxHeadDim = 160;

// All but the most recent commit group have landed (this thread's copies).
__device__ __forceinline__ void cp_async_wait_all_but_one() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

// Shared memory of a CTA: sQ [kBlockM][stride], sK and sV [n16][stride] (T), keep [n16] (bytes).
template <typename T, int kHeadDim, int kWarps>
constexpr size_t smem_bytes(int n16) {
  return static_cast<size_t>(16 * kWarps + 2 * n16) * (kHeadDim + kPad) * sizeof(T) + static_cast<size_t>(n16);
}

// Grid: (ceil(Sq / kBlockM), B·H). kKeys: the register bucket of the score rows (128 or 256),
// >= Skv; the work done follows n16 = Skv rounded up to 16 (the k of the P·V mma), not kKeys.
template <typename T, int kHeadDim, int kKeys, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) attention_cross_kernel(const AttentionParams p, const bool vec_ok) {
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= kMaxHeadDim && kKeys % 16 == 0 && kKeys <= kMaxKeys, "shapes");
  constexpr int kThreads = kWarps * 32;
  constexpr int kBlockM = 16 * kWarps;
  constexpr int kStride = kHeadDim + kPad;
  constexpr int kNTiles = kKeys / 8;    // n-tiles of S per warp (8 keys each)
  constexpr int kKSteps = kKeys / 16;   // k-steps of P·V (16 keys each)
  constexpr int kDTiles = kHeadDim / 8;  // n-tiles of O per warp
  const int n_keys = static_cast<int>(p.Skv);
  const int n16 = (n_keys + 15) / 16 * 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kStride;
  T* sV = sK + n16 * kStride;
  uint8_t* keep = reinterpret_cast<uint8_t*>(sV + n16 * kStride);  // 1 = attend; 0 = masked or past Skv

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t = lane & 3;  // mma fragment coordinate: thread in its row group (the column pair)
  const int64_t bh = blockIdx.y;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int D = static_cast<int>(p.D);

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + m0 * p.q_stride_s;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + h * p.v_stride_h;
  const float scale_log2 = p.scale * 1.4426950408889634f;  // exp(x·scale) = exp2(x·scale·log2 e)

  // Bytes in flight per CTA: (kBlockM + 2·n16)·D·2, e.g. (128 + 160)·40·2 = 23 KB at SD 1.5's
  // first block; Q·Kᵀ only needs group 1, so V's copy overlaps it.
  attn::load_rows<T, kHeadDim, kThreads>(sQ, q, p.q_stride_s, kBlockM, p.Sq - m0, D, vec_ok);
  attn::load_rows<T, kHeadDim, kThreads>(sK, k, p.k_stride_s, n16, p.Skv, D, vec_ok);
  attn::cp_async_commit();
  attn::load_rows<T, kHeadDim, kThreads>(sV, v, p.v_stride_s, n16, p.Skv, D, vec_ok);
  attn::cp_async_commit();
  // The key tail and the padding mask as one byte per key (n16 <= 256 bytes): the score loop
  // then reads shared memory instead of testing the mask in global memory per element.
  const uint8_t* mask = p.key_padding_mask ? p.key_padding_mask + b * p.mask_stride_b : nullptr;
  for (int j = threadIdx.x; j < n16; j += kThreads) {
    keep[j] = j < n_keys && (mask == nullptr || mask[j] != 0);
  }
  cp_async_wait_all_but_one();
  __syncthreads();  // Q, K and keep are visible to every warp

  // ---- S = Q · Kᵀ: 16 x n16 per warp, all in registers (kKeys / 2 floats per thread)
  float s[kNTiles][4];
#pragma unroll
  for (int i = 0; i < kNTiles; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
  T* const sQw = sQ + warp * 16 * kStride;
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    if (kk * 16 >= D) break;  // the rest of the bucket is zero padding
    uint32_t a[4];
    attn::load_frag_q<kStride>(a, sQw + kk * 16, lane);
#pragma unroll
    for (int nt = 0; nt < kNTiles; nt += 2) {
      if (nt * 8 >= n16) break;  // keys past n16 are not in shared memory (and not computed)
      uint32_t bk[4];
      attn::load_frag_k<kStride>(bk, sK + nt * 8 * kStride + kk * 16, lane);
      attn::mma_16816<T>(s[nt], a, bk[0], bk[1]);
      attn::mma_16816<T>(s[nt + 1], a, bk[2], bk[3]);
    }
  }

  // ---- scale into log2 units, masked keys and the tail to -inf, row max over all keys.
  // Per thread: rows g and g + 8 (elements 0-1 and 2-3 of a tile), columns nt·8 + 2t + (0, 1).
  float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
    if (nt * 8 >= n16) break;
    const int col = nt * 8 + 2 * t;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = keep[col + (e & 1)] ? s[nt][e] * scale_log2 : -INFINITY;
      row_max[e >> 1] = fmaxf(row_max[e >> 1], s[nt][e]);
    }
  }
  float m_use[2];  // the row max, 0 for a row with no key (exp2 then gives 0, not NaN)
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // a row lives in the 4 threads of a quad (lanes 4g .. 4g+3)
    row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(0xffffffffu, row_max[r], 1));
    row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(0xffffffffu, row_max[r], 2));
    m_use[r] = row_max[r] == -INFINITY ? 0.f : row_max[r];
  }

  // ---- P = exp2(S - max) once (no rescaling: the max is final), the row sums in fp32 from the
  // unrounded P, and P packed to 16 bits as the A fragments of P·V (kKeys / 4 registers): the
  // fp32 scores die here, before the O accumulator is live.
  float row_sum[2] = {0.f, 0.f};
  uint32_t pa[kKSteps][4];
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    if (kk * 16 >= n16) break;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = exp2f(s[2 * kk + j][e] - m_use[e >> 1]);
        s[2 * kk + j][e] = pe;
        row_sum[e >> 1] += pe;
      }
    }
    attn::pack_frag_p<T>(pa[kk], s[2 * kk], s[2 * kk + 1]);
  }

  attn::cp_async_wait_all();
  __syncthreads();  // V landed (every thread's copies)

  // ---- O = P · V: 16 x D per warp
  float acc_o[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) acc_o[i][0] = acc_o[i][1] = acc_o[i][2] = acc_o[i][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    if (kk * 16 >= n16) break;
#pragma unroll
    for (int dt = 0; dt < kDTiles; dt += 2) {
      if (dt * 8 >= D) break;  // padded head-dim columns are never stored
      uint32_t bv[4];
      attn::load_frag_v<kStride>(bv, sV + kk * 16 * kStride + dt * 8, lane);
      attn::mma_16816<T>(acc_o[dt], pa[kk], bv[0], bv[1]);
      attn::mma_16816<T>(acc_o[dt + 1], pa[kk], bv[2], bv[3]);
    }
  }

  // ---- O / l, lse, store through this warp's own rows of sQ (no copy into them is in flight:
  // every group was waited for above, and only this warp ever read them)
  attn::finish_warp_rows<T, kHeadDim>(p, b, h, m0 + warp * 16, acc_o, row_max, row_sum, sQw, vec_ok);
}

// ------------------------------------------------------------------ host
// Per-device facts, queried once: the opt-in shared memory per block, and whether a kernel was
// already allowed that much dynamic shared memory (cudaFuncSetAttribute is per device; it is
// always set to the device's maximum, so concurrent first calls cannot lower it for each other).
constexpr int kMaxDevices = 64;

int smem_optin(int dev) {
  static std::atomic<int> cache[kMaxDevices];  // static storage: zero-initialized
  int v = dev >= 0 && dev < kMaxDevices ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (v > 0) return v;
  FD_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

template <typename T, int kHeadDim, int kKeys, int kWarps>
void launch(const AttentionParams& p, bool vec_ok, int n16, int dev, cudaStream_t stream) {
  auto kernel = attention_cross_kernel<T, kHeadDim, kKeys, kWarps>;
  const size_t smem = smem_bytes<T, kHeadDim, kWarps>(n16);
  static std::atomic<bool> opted_in[kMaxDevices];  // per instantiation and device
  const bool known = dev >= 0 && dev < kMaxDevices && opted_in[dev].load(std::memory_order_relaxed);
  if (smem > 48 * 1024 && !known) {
    FD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin(dev)));
    if (dev >= 0 && dev < kMaxDevices) opted_in[dev].store(true, std::memory_order_relaxed);
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(p.Sq, 16 * kWarps)), static_cast<unsigned>(p.B * p.H));
  kernel<<<grid, kWarps * 32, smem, stream>>>(p, vec_ok);
  FD_CHECK_LAUNCH("attention_cross_kernel");
}

// 64 or 128 query rows per CTA: 128 halves the K/V copies per query (each CTA copies all of its
// (b, h)'s K and V, 2·n16·D·2 bytes) but halves the CTAs; take it only while there are still
// >= 2 CTAs per SM, so long-Sq calls (SD's 4096 queries) get it and short ones keep the parallelism.
template <typename T, int kHeadDim, int kKeys>
bool run(const AttentionParams& p, bool vec_ok, int n16, cudaStream_t stream) {
  int dev = 0;
  FD_CUDA_CHECK(cudaGetDevice(&dev));
  const size_t limit = static_cast<size_t>(smem_optin(dev));
  const bool fits64 = smem_bytes<T, kHeadDim, 4>(n16) <= limit;
  const bool fits128 = smem_bytes<T, kHeadDim, 8>(n16) <= limit;
  if (!fits64) return false;  // e.g. 256 keys at head dim 160 on sm_80 (189 KB > 163 KB)
  const bool many = ceil_div(p.Sq, 128) * p.B * p.H >= 2 * static_cast<int64_t>(sm_count());
  if (fits128 && many && ceil_div(p.Sq, 128) <= 0x7fffffffLL) {
    launch<T, kHeadDim, kKeys, 8>(p, vec_ok, n16, dev, stream);
  } else {
    launch<T, kHeadDim, kKeys, 4>(p, vec_ok, n16, dev, stream);
  }
  return true;
}

template <typename T, int kHeadDim>
bool run_keys(const AttentionParams& p, bool vec_ok, int n16, cudaStream_t stream) {
  if (n16 <= 128) return run<T, kHeadDim, 128>(p, vec_ok, n16, stream);
  return run<T, kHeadDim, 256>(p, vec_ok, n16, stream);
}

template <typename T>
bool run_head_dim(const AttentionParams& p, bool vec_ok, int n16, cudaStream_t stream) {
  // the CUDA kernel's head-dim buckets up to kMaxHeadDim (attention.cu's FD_HEADDIM_SWITCH)
  if (p.D <= 32) return run_keys<T, 32>(p, vec_ok, n16, stream);
  if (p.D <= 64) return run_keys<T, 64>(p, vec_ok, n16, stream);
  if (p.D <= 96) return run_keys<T, 96>(p, vec_ok, n16, stream);
  if (p.D <= 128) return run_keys<T, 128>(p, vec_ok, n16, stream);
  return run_keys<T, 160>(p, vec_ok, n16, stream);
}

}  // namespace cross

bool attention_fwd_cross(const AttentionParams& p, cudaStream_t stream) {
  FD_REQUIRE(p.B >= 0 && p.H >= 0 && p.Sq >= 0 && p.Skv >= 0, "attention_fwd_cross: sizes must be >= 0");
  if (p.B == 0 || p.H == 0 || p.Sq == 0) return true;
  // Not served here (attention_fwd takes them, or raises the named error): more keys than fit
  // on chip, wide heads, B·H past grid.y, Sq past grid.x, anything attention_fwd would refuse.
  if (p.Skv > cross::kMaxKeys || p.D < 1 || p.D > cross::kMaxHeadDim) return false;
  if (p.B > 65535 || p.H > 65535 || p.B * p.H > 65535 || ceil_div(p.Sq, 64) > 0x7fffffffLL) return false;
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return false;
  if (!std::isfinite(p.scale) || !p.q || !p.o || (p.Skv > 0 && (!p.k || !p.v))) return false;
  if (p.key_padding_mask != nullptr && p.Skv > 0 && p.mask_stride_b < 0) return false;
  const bool vec_ok = attention_vec_ok(p);
  const int n16 = static_cast<int>((p.Skv + 15) / 16 * 16);
  return FD_HALF_DTYPE_SWITCH(p.dtype, [&] { return cross::run_head_dim<elem_t>(p, vec_ok, n16, stream); });
}

}  // namespace cuda
}  // namespace flashdiff
