// FlashAttention-2-style forward kernel on tensor cores (mma.sync m16n8k16, fp16/bf16 in,
// fp32 accumulate). Included by attention_hdim*.cu and attention_cross.cu.
//
// One block = kWarps warps (4 or 8) = 64 or 128 query rows of one (batch, head); each warp owns
// 16 rows end to end (its rows of Q, S = Q·Kᵀ, P, O), so warps only meet at the shared K and V
// tiles. 128 rows (variant "cuda:m128") copy each K/V tile into shared memory once per 128 query
// rows instead of 64: half the K/V traffic from L2, the same registers per thread.
// Per key block of kBlockN rows:
//   wait K_j, sync → issue cp.async V_j → S = Q·K_jᵀ (ldmatrix + mma) → scale, mask, online
//   softmax in fp32 with exp2 → wait V_j, sync → issue cp.async K_{j+1} → O += P·V_j.
// so the V load overlaps Q·Kᵀ and the next K load overlaps P·V (FA2's single-buffer schedule).
//
// Work: 4·B·H·Sq·Skv·D FLOPs; memory: Q, O once, K and V once per query block (64 or 128 rows).
// Shared memory rows are padded by 8 elements (16 bytes), which makes the 8 row addresses of
// every ldmatrix fall in distinct bank groups (no conflicts) without a swizzle.
//
// The PTX wrappers, the tile loader, the fragment loaders and the warp epilogue below are also
// used by the cross-attention kernel (attention_cross.cu), which includes this header.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "attention.cuh"
#include "common.cuh"

namespace flashdiff {
namespace cuda {
namespace attn {

constexpr int kPad = 8;

// ------------------------------------------------------------------ PTX wrappers
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  // src_bytes == 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// d += a·b for a 16x16 (row) by 16x8 (col) tile, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one register holding two T (lo = the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// ------------------------------------------------------------------ tiles
// Copy rows [0, n_rows) x columns [0, kHeadDim) of a strided global tile into shared memory
// (row stride kHeadDim + kPad) with the kNThreads threads of the block. Rows >= rows_valid and
// columns >= D are zero-filled.
template <typename T, int kHeadDim, int kNThreads>
__device__ __forceinline__ void load_rows(T* smem, const T* gmem, int64_t row_stride, int n_rows,
                                          int64_t rows_valid, int D, bool vec_ok) {
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  constexpr int kStride = kHeadDim + kPad;
  if (vec_ok) {  // D % 8 == 0: a chunk is entirely inside or outside the head dim
#pragma unroll
    for (int i = threadIdx.x; i < n_rows * kChunks; i += kNThreads) {
      const int r = i / kChunks, col = (i % kChunks) * 8;
      const bool valid = r < rows_valid && col < D;
      cp_async_16(smem + r * kStride + col, valid ? gmem + r * row_stride + col : gmem, valid ? 16 : 0);
    }
  } else {
    for (int i = threadIdx.x; i < n_rows * kChunks; i += kNThreads) {
      const int r = i / kChunks, col = (i % kChunks) * 8;
      Vec<T, 8> tmp;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        tmp.v[j] = (r < rows_valid && col + j < D) ? gmem[r * row_stride + col + j] : from_float<T>(0.f);
      }
      *reinterpret_cast<Vec<T, 8>*>(smem + r * kStride + col) = tmp;
    }
  }
}

// load_rows for a compile-time row count and a block of kThreads.
template <typename T, int kRows, int kHeadDim, int kThreads>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t row_stride, int64_t rows_valid, int D,
                                          bool vec_ok) {
  load_rows<T, kHeadDim, kThreads>(smem, gmem, row_stride, kRows, rows_valid, D, vec_ok);
}

// ------------------------------------------------------------------ fragments
// The ldmatrix addressing of the three mma operands, for shared tiles of row stride kStride.
// A of S = Q·Kᵀ: 16 query rows x 16 columns at `rows` (already offset to the k-step's column);
// lanes 0-15 address rows 0-15, lanes 16-31 the same rows 8 columns on.
template <int kStride, typename T>
__device__ __forceinline__ void load_frag_q(uint32_t (&a)[4], const T* rows, int lane) {
  ldmatrix_x4(a, rows + (lane % 16) * kStride + (lane / 16) * 8);
}
// B of S = Q·Kᵀ for two n-tiles (16 keys) x 16 columns at `keys`: matrices (keys 0-7, k lo),
// (keys 0-7, k hi), (keys 8-15, k lo), (keys 8-15, k hi): b[0], b[1] feed the first n-tile,
// b[2], b[3] the second.
template <int kStride, typename T>
__device__ __forceinline__ void load_frag_k(uint32_t (&b)[4], const T* keys, int lane) {
  ldmatrix_x4(b, keys + ((lane % 8) + (lane / 16) * 8) * kStride + ((lane / 8) % 2) * 8);
}
// B of O += P·V for 16 keys x two n-tiles of head dim (16 columns) at `keys`, transposed:
// matrices (keys lo, d lo), (keys hi, d lo), (keys lo, d hi), (keys hi, d hi).
template <int kStride, typename T>
__device__ __forceinline__ void load_frag_v(uint32_t (&b)[4], const T* keys, int lane) {
  ldmatrix_x4_trans(b, keys + ((lane % 8) + ((lane / 8) % 2) * 8) * kStride + (lane / 16) * 8);
}

// P (fp32 scores after exp, mma accumulator layout, n-tiles 2·kk and 2·kk + 1) as the A fragment
// of O += P·V: the accumulator layout of two n-tiles is the A layout of one 16-wide k-step.
template <typename T>
__device__ __forceinline__ void pack_frag_p(uint32_t (&a)[4], const float (&s0)[4], const float (&s1)[4]) {
  a[0] = pack2<T>(s0[0], s0[1]);
  a[1] = pack2<T>(s0[2], s0[3]);
  a[2] = pack2<T>(s1[0], s1[1]);
  a[3] = pack2<T>(s1[2], s1[3]);
}

// ------------------------------------------------------------------ epilogue
// The end of a warp that owns query rows row0 .. row0 + 15 of (b, h): O /= l, lse, and O stored
// through the warp's 16 rows of shared memory `sO` (only this warp may use them) as coalesced
// 16-byte stores. row_max: per thread rows g, g + 8, in log2 units (scores · scale · log2 e);
// row_sum: this thread's columns only, reduced over the quad here. The caller makes sure no
// cp.async into sO is still in flight.
template <typename T, int kHeadDim>
__device__ __forceinline__ void finish_warp_rows(const AttentionParams& p, int64_t b, int64_t h, int64_t row0,
                                                 float (&acc_o)[kHeadDim / 8][4], const float (&row_max)[2],
                                                 const float (&row_sum)[2], T* sO, bool vec_ok) {
  constexpr int kStride = kHeadDim + kPad;
  constexpr int kDTiles = kHeadDim / 8;
  const int lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;
  const int D = static_cast<int>(p.D);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    // fully masked row: sum == 0 -> output 0 and lse = +inf (so exp(s - lse) = 0 in a backward);
    // NaN inputs keep NaN
    const float inv = sum == 0.f ? 0.f : 1.f / sum;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      acc_o[dt][2 * r] *= inv;
      acc_o[dt][2 * r + 1] *= inv;
    }
    if (p.lse != nullptr && t == 0) {
      const int64_t row = row0 + g + 8 * r;
      if (row < p.Sq) {
        p.lse[(b * p.H + h) * p.Sq + row] = sum == 0.f ? INFINITY : row_max[r] * 0.6931471805599453f + logf(sum);
      }
    }
  }
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      *reinterpret_cast<uint32_t*>(sO + (g + 8 * r) * kStride + dt * 8 + 2 * t) =
          pack2<T>(acc_o[dt][2 * r], acc_o[dt][2 * r + 1]);
    }
  }
  __syncwarp();
  T* o = static_cast<T*>(p.o) + b * p.o_stride_b + h * p.o_stride_h;
  for (int i = lane; i < 16 * kDTiles; i += 32) {
    const int r = i / kDTiles, col = (i % kDTiles) * 8;
    const int64_t row = row0 + r;
    if (row >= p.Sq || col >= D) continue;
    T* dst = o + row * p.o_stride_s + col;
    const T* src = sO + r * kStride + col;
    if (vec_ok) {
      *reinterpret_cast<Vec<T, 8>*>(dst) = *reinterpret_cast<const Vec<T, 8>*>(src);
    } else {
      for (int j = 0; j < 8 && col + j < D; ++j) dst[j] = src[j];
    }
  }
}

// ------------------------------------------------------------------ kernel
// Grid: (ceil(Sq / kBlockM), H, B), kBlockM = 16·kWarps. Dynamic shared memory: (kBlockM +
// 2·kBlockN) rows.
template <typename T, int kHeadDim, int kBlockN, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) attention_fwd_kernel(const AttentionParams p, const bool vec_ok) {
  static_assert(kHeadDim % 32 == 0 && kBlockN % 16 == 0, "tile shapes");
  static_assert(kWarps == 4 || kWarps == 8, "64- or 128-row blocks");
  constexpr int kThreads = kWarps * 32;
  constexpr int kBlockM = 16 * kWarps;
  constexpr int kStride = kHeadDim + kPad;
  constexpr int kNTiles = kBlockN / 8;   // n-tiles of S per warp
  constexpr int kDTiles = kHeadDim / 8;  // n-tiles of O per warp
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kStride;
  T* sV = sK + kBlockN * kStride;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t = lane & 3;  // mma fragment coordinate: thread in its row group (the column pair)
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int D = static_cast<int>(p.D);

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + m0 * p.q_stride_s;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + h * p.v_stride_h;
  const uint8_t* mask = p.key_padding_mask ? p.key_padding_mask + b * p.mask_stride_b : nullptr;
  const float scale_log2 = p.scale * 1.4426950408889634f;  // exp(x·scale) = exp2(x·scale·log2 e)
  const int64_t n_blocks = (p.Skv + kBlockN - 1) / kBlockN;

  load_tile<T, kBlockM, kHeadDim, kThreads>(sQ, q, p.q_stride_s, p.Sq - m0, D, vec_ok);
  if (n_blocks > 0) load_tile<T, kBlockN, kHeadDim, kThreads>(sK, k, p.k_stride_s, p.Skv, D, vec_ok);
  cp_async_commit();

  float acc_o[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) acc_o[i][0] = acc_o[i][1] = acc_o[i][2] = acc_o[i][3] = 0.f;
  // per thread: rows g and g + 8 of the warp's 16; max in log2 units (scores · scale · log2 e)
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this thread's columns only; reduced over the quad at the end

  const T* sQw = sQ + warp * 16 * kStride;
  for (int64_t nb = 0; nb < n_blocks; ++nb) {
    const int64_t n0 = nb * kBlockN;
    cp_async_wait_all();
    __syncthreads();  // K_nb (and Q) landed; every warp is done with V_{nb-1}
    load_tile<T, kBlockN, kHeadDim, kThreads>(sV, v + n0 * p.v_stride_s, p.v_stride_s, p.Skv - n0, D, vec_ok);
    cp_async_commit();

    // ---- S = Q · K^T  (16 x kBlockN per warp)
    float s[kNTiles][4];
#pragma unroll
    for (int i = 0; i < kNTiles; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      if (kk * 16 >= D) break;  // the rest of the bucket is zero padding
      uint32_t a[4];
      load_frag_q<kStride>(a, sQw + kk * 16, lane);
#pragma unroll
      for (int nt = 0; nt < kNTiles; nt += 2) {
        uint32_t bk[4];
        load_frag_k<kStride>(bk, sK + nt * 8 * kStride + kk * 16, lane);
        mma_16816<T>(s[nt], a, bk[0], bk[1]);
        mma_16816<T>(s[nt + 1], a, bk[2], bk[3]);
      }
    }

    // ---- scale into log2 units, mask key tail and padding with -inf
    const bool need_mask = (n0 + kBlockN > p.Skv) || mask != nullptr;
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] *= scale_log2;
        if (need_mask) {
          const int64_t col = n0 + nt * 8 + 2 * t + (e & 1);
          const bool keep = col < p.Skv && (mask == nullptr || mask[col] != 0);
          if (!keep) s[nt][e] = -INFINITY;
        }
      }
    }

    // ---- online softmax; a row lives in the 4 threads of a quad (lanes 4g .. 4g+3)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // a row with no key so far keeps max -inf; subtracting 0 instead keeps exp2 at 0, not NaN
      const float m_use = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2f(row_max[r] - m_use);
      row_max[r] = mx;
      row_sum[r] *= alpha;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        acc_o[dt][2 * r] *= alpha;
        acc_o[dt][2 * r + 1] *= alpha;
      }
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float pe = exp2f(s[nt][2 * r + j] - m_use);
          s[nt][2 * r + j] = pe;
          row_sum[r] += pe;
        }
      }
    }

    cp_async_wait_all();
    __syncthreads();  // V_nb landed; every warp is done with K_nb
    if (nb + 1 < n_blocks) {
      load_tile<T, kBlockN, kHeadDim, kThreads>(sK, k + (n0 + kBlockN) * p.k_stride_s, p.k_stride_s, p.Skv - n0 - kBlockN, D,
                                      vec_ok);
    }
    cp_async_commit();

    // ---- O += P · V; P's accumulator layout is the A-fragment layout of the next mma
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      pack_frag_p<T>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dt = 0; dt < kDTiles; dt += 2) {
        if (dt * 8 >= D) break;  // padded head-dim columns are never stored
        uint32_t bv[4];
        load_frag_v<kStride>(bv, sV + kk * 16 * kStride + dt * 8, lane);
        mma_16816<T>(acc_o[dt], a, bv[0], bv[1]);
        mma_16816<T>(acc_o[dt + 1], a, bv[2], bv[3]);
      }
    }
  }

  // ---- epilogue: O / l, lse, store through this warp's rows of sQ (coalesced 16-byte stores)
  // With Skv == 0 the Q copies (issued by all threads, for all warps' rows) may still be in
  // flight: wait for ours, then for everyone's, before this warp reuses its rows of sQ.
  cp_async_wait_all();
  __syncthreads();
  // only this warp ever read its rows of sQ
  finish_warp_rows<T, kHeadDim>(p, b, h, m0 + warp * 16, acc_o, row_max, row_sum, sQ + warp * 16 * kStride, vec_ok);
}

}  // namespace attn

// Block shape per bucket: 64 or 128 query rows (kWarps 4 or 8); 64 keys per step up to
// D = 160, 32 above (keeps the fp32 O accumulator + S tile within the register file). Shared
// memory (kBlockM + 2·kBlockN)·(kHeadDim + 8)·2 B: 34 KB at hd 128 with 64 rows, 70 KB with 128;
// at most 101 KB (hd 256, 128 rows), within sm_80's 163 KB.
template <typename T, int kHeadDim, int kWarps>
void launch_attention_fwd(const AttentionParams& p, bool vec_ok, cudaStream_t stream) {
  constexpr int kBlockN = kHeadDim <= 160 ? 64 : 32;
  constexpr int kBlockM = 16 * kWarps;
  constexpr size_t kSmem = static_cast<size_t>(kBlockM + 2 * kBlockN) * (kHeadDim + attn::kPad) * sizeof(T);
  auto kernel = attn::attention_fwd_kernel<T, kHeadDim, kBlockN, kWarps>;
  if (kSmem > 48 * 1024) {
    FD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem)));
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(p.Sq, kBlockM)), static_cast<unsigned>(p.H),
                  static_cast<unsigned>(p.B));
  kernel<<<grid, kWarps * 32, kSmem, stream>>>(p, vec_ok);
  FD_CHECK_LAUNCH("attention_fwd_kernel");
}

template <typename T, int kHeadDim>
void run_attention_fwd(const AttentionParams& p, bool vec_ok, cudaStream_t stream, int block_rows) {
  if (block_rows == 128) {
    launch_attention_fwd<T, kHeadDim, 8>(p, vec_ok, stream);
  } else {
    launch_attention_fwd<T, kHeadDim, 4>(p, vec_ok, stream);
  }
}

}  // namespace cuda
}  // namespace flashdiff
