// Group normalization forward (+ per-sample scale/shift, + SiLU/GELU) on the CPU.
//
// y = act(((x - mean) * rstd * w + b) * (1 + scale) + shift), statistics per (sample, group) in
// fp32 chunks combined in double; folded into y = act((x - mean) * A[n, c] + B[n, c]) after
// the stats (a subtract and an FMA per element). Subtracting the mean before scaling, rather
// than the one-FMA form x * A + (B - mean * A), keeps the result exact where x - mean is
// (a group of one element, or |mean| >> std would otherwise cancel to ~rstd * |x| * 2^-24).
//
// Memory traffic: read x once from DRAM, write y once (the same as a copy of x). Each unit of
// work (an (n, g) block for NCHW, a thread's rows of a sample for channels_last) is read twice:
// the statistics pass pulls it into the core's cache and the normalize pass re-reads it from
// there (channels_last: a sample is one unit, larger than L2 at SD sizes, so its normalize
// pass re-reads L3). Statistics take one pass over x: per-lane exact block statistics merged
// with Chan's formula, over 4096-element NCHW chunks (contiguous_stats) or ~64K-element
// channels_last chunks (cl_chunk_stats). Chunks are combined with Chan's formula in double,
// in chunk order, so results do not depend on the thread count.
// Roofline: DRAM bandwidth (~2 bytes moved per fp32 byte of x), i.e. the time of x.clone(). In
// practice SiLU's arithmetic bounds the normalize loop: it runs the activation on 8 vectors in
// lock-step (batched_act) so that their dependency chains overlap.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
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

constexpr int64_t kChunk = 4096;           // elements per statistics chunk (16 KB of fp32)
constexpr int64_t kParallelMin = 1 << 16;  // fewer elements: the calling thread (thread_count)

// vsum's pairwise tree (lane i + i+8, + i+4, + i+2, + i+1: the same bits) kept in registers:
// g++ compiles vsum's loop through the stack, ~30 cycles that dominated blocks of 64 elements.
inline float hsum(vfloat v) {
#if defined(__AVX512F__)
  const __m512 z = (__m512)v;  // swap 256-bit halves, then 128-bit quarters
  const __m512 s8 = _mm512_add_ps(z, _mm512_maskz_shuffle_f32x4(0xffff, z, z, 0x4e));
  const __m512 s4 = _mm512_add_ps(s8, _mm512_maskz_shuffle_f32x4(0xffff, s8, s8, 0xb1));
  const vfloat q = (vfloat)s4;
  return (q[0] + q[2]) + (q[1] + q[3]);
#else
  return vsum(v);
#endif
}

// In double: chunk means rounded to fp32 before Chan's merge put a 1e4 + N(0, 1) group one
// fp32 ulp (1e-3) off its mean after 2-5 chunks, past the tolerance rule (the chunks themselves
// are exact to ~3e-7).
struct ChunkStat {
  int64_t count;
  double mean;
  double m2;  // sum of squared deviations from `mean`
};

// Chan et al.'s combination of chunk statistics, in double and in chunk order.
void combine_stats(const ChunkStat* st, int64_t nchunks, int64_t stride, float eps,
                   float* mean_out, float* rstd_out) {
  double count = 0.0, sum = 0.0;
  for (int64_t k = 0; k < nchunks; ++k) {
    const ChunkStat& s = st[k * stride];
    count += static_cast<double>(s.count);
    sum += static_cast<double>(s.count) * s.mean;
  }
  const double mean = sum / count;
  double m2 = 0.0;
  for (int64_t k = 0; k < nchunks; ++k) {
    const ChunkStat& s = st[k * stride];
    const double d = s.mean - mean;
    m2 += s.m2 + static_cast<double>(s.count) * d * d;
  }
  const double var = m2 / count;  // biased, like torch
  *mean_out = static_cast<float>(mean);
  *rstd_out = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
}

// A, B for channels [c0, c0 + nc) of sample n, whose group has rstd: y = (x - mean) * A + B.
// In double, 8 channels per vector (a group of 64 channels, adaLN's LayerNorm, took as long
// scalar as its statistics); the same operations as the scalar tail, so every channel gets
// the same bits whichever loop computes it (-std=c++17: no FMA contraction).
void channel_coefs(const GroupNormParams& p, int64_t n, int64_t c0, int64_t nc, float rstd,
                   float* A, float* B) {
  typedef double vdouble8 __attribute__((vector_size(64)));
  typedef float vfloat8 __attribute__((vector_size(32)));
  auto load8 = [](const float* ptr, double dflt) {
    if (ptr == nullptr) return vdouble8{} + dflt;
#if defined(__AVX512F__)
    // One vcvtps2pd (g++ splits __builtin_convertvector into 256-bit halves).
    return (vdouble8)_mm512_maskz_cvtps_pd(0xff, _mm256_loadu_ps(ptr));
#else
    vfloat8 v;
    std::memcpy(&v, ptr, sizeof v);
    return __builtin_convertvector(v, vdouble8);
#endif
  };
  const float* sc = p.scale ? p.scale + n * p.C : nullptr;
  const float* sh = p.shift ? p.shift + n * p.C : nullptr;
  int64_t j = 0;
  for (; j + 8 <= nc; j += 8) {
    const int64_t c = c0 + j;
    const vdouble8 w = load8(p.weight ? p.weight + c : nullptr, 1.0);
    const vdouble8 b = load8(p.bias ? p.bias + c : nullptr, 0.0);
    const vdouble8 s = sc ? 1.0 + load8(sc + c, 0.0) : vdouble8{} + 1.0;
    const vdouble8 t = load8(sh ? sh + c : nullptr, 0.0);
    const vdouble8 a = static_cast<double>(rstd) * w;
    const vfloat8 va = __builtin_convertvector(a * s, vfloat8);
    const vfloat8 vb = __builtin_convertvector(b * s + t, vfloat8);
    std::memcpy(A + j, &va, sizeof va);
    std::memcpy(B + j, &vb, sizeof vb);
  }
  for (; j < nc; ++j) {
    const int64_t c = c0 + j;
    const double w = p.weight ? p.weight[c] : 1.0f;
    const double b = p.bias ? p.bias[c] : 0.0f;
    const double s = sc ? 1.0 + static_cast<double>(sc[c]) : 1.0;
    const double t = sh ? sh[c] : 0.0f;
    const double a = static_cast<double>(rstd) * w;
    A[j] = static_cast<float>(a * s);
    B[j] = static_cast<float>(b * s + t);
  }
}

// Chan et al.'s merge of two sets of statistics (mean, m2 over counts na, nb), in double.
inline ChunkStat merge_stats(const ChunkStat& a, const ChunkStat& b) {
  if (a.count == 0) return b;
  if (b.count == 0) return a;
  const double na = static_cast<double>(a.count), nb = static_cast<double>(b.count), n = na + nb;
  const double d = b.mean - a.mean;
  return ChunkStat{a.count + b.count, a.mean + d * (nb / n), a.m2 + b.m2 + d * d * (na * nb / n)};
}

// Two-pass statistics of n (any, small) contiguous elements, both passes reading x (from L1).
// Values are shifted by K = x[0] so that the sums are of the size of the spread, not of |mean|:
// an fp32 sum of a 119-element 1e4 + N(0, 1) block cost ~3x the tolerance rule's bound.
template <typename T>
ChunkStat two_pass_stats(const T* x, int64_t n) {
  if (n == 0) return ChunkStat{0, 0.0, 0.0};
  const float K = to_float(x[0]);
  const vfloat vk = vset1(K);
  vfloat acc = vset1(0.f);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) acc += vload(x + i) - vk;
  float tail = 0.f;
  for (int64_t j = i; j < n; ++j) tail += to_float(x[j]) - K;
  const float mean_k = (hsum(acc) + tail) / static_cast<float>(n);  // mean - K
  const vfloat vm = vset1(mean_k);
  acc = vset1(0.f);
  for (i = 0; i + kVec <= n; i += kVec) {
    const vfloat d = (vload(x + i) - vk) - vm;
    acc = vfma(d, d, acc);
  }
  tail = 0.f;
  for (int64_t j = i; j < n; ++j) {
    const float d = (to_float(x[j]) - K) - mean_k;
    tail += d * d;
  }
  return ChunkStat{n, static_cast<double>(K) + mean_k, static_cast<double>(hsum(acc)) + tail};
}

// Statistics of n <= kChunk contiguous elements in one pass over x (each element is loaded
// and, for 16-bit types, converted once: 2 or 4 bytes read, nothing written). Values are
// first shifted by K, the mean of the first 128, so that means and merge deltas are of the
// size of the spread, not of |mean|: without it a group of 1e4 + N(0, 1) loses 4x in rstd to
// the fp32 rounding of the running means, and with K = x[0] the mean of a zero-mean group is
// 5x less exact (its error ~ |mean - K| 2^-24).
// Per lane, a block of kStatVecs vectors (128 elements) is held in registers, its exact mean
// and sum of squared deviations taken there (the two-pass formula on 8 values: a sum, then 8
// FMAs of deviations), and merged into the lane's running (mean, m2) with Chan's formula; all
// lanes hold the same count, so the merge weights are scalars. The 16 lanes and the tail of
// < 128 elements (two-pass) are merged at the end, in double. No E[x^2] - E[x]^2 anywhere
// (DESIGN.md). Per vector: 2 subtracts, 1 add, 1 FMA (+ 5 ops per block of 8 vectors),
// against two passes and an fp32 staging copy of 16-bit data before.
constexpr int kStatVecs = 8;

// Merges one block of kStatVecs shifted vectors into per-lane running (mean, m2) that have
// seen nb blocks: the block's exact mean and squared deviations in registers, then Chan with
// counts 8 nb (running) and 8 (block): mean += d / (nb + 1), m2 += q + d^2 8 nb / (nb + 1).
// (A running sum instead of the mean measured 6% slower and no more exact after the shift.)
inline void merge_block(const vfloat (&v)[kStatVecs], int64_t nb, vfloat& mean, vfloat& m2) {
  const vfloat bmean = (((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]))) *
                       (1.0f / kStatVecs);
  vfloat q0 = vset1(0.f), q1 = vset1(0.f);  // two chains: FMA latency
  for (int u = 0; u < kStatVecs; u += 2) {
    const vfloat d0 = v[u] - bmean, d1 = v[u + 1] - bmean;
    q0 = vfma(d0, d0, q0);
    q1 = vfma(d1, d1, q1);
  }
  const float w = 1.0f / static_cast<float>(nb + 1);
  const vfloat d = bmean - mean;
  mean = vfma(d, vset1(w), mean);
  m2 = vfma(d * vset1(static_cast<float>(kStatVecs * nb) * w), d, m2 + (q0 + q1));
}

template <typename T>
ChunkStat contiguous_stats(const T* x, int64_t n) {
  constexpr int64_t kBlock = kStatVecs * kVec;
  float shift = 0.f;
  if (n >= kBlock) {
    vfloat acc = vset1(0.f);
    for (int u = 0; u < kStatVecs; ++u) acc += vload(x + u * kVec);
    shift = hsum(acc) * (1.0f / kBlock);
  }
  const vfloat vshift = vset1(shift);
  vfloat mean = vset1(0.f), m2 = vset1(0.f);  // per lane, of the shifted values
  int64_t nb = 0;  // blocks merged so far: each lane has seen nb * kStatVecs values
  for (; (nb + 1) * kBlock <= n; ++nb) {
    const T* xb = x + nb * kBlock;
    vfloat v[kStatVecs];
    for (int u = 0; u < kStatVecs; ++u) v[u] = vload(xb + u * kVec) - vshift;
    merge_block(v, nb, mean, m2);
  }
  ChunkStat st{0, 0.0, 0.0};
  if (nb > 0) {  // merge the lanes: equal counts, so the mean is the lane average
    const float lanes_mean = hsum(mean) * (1.0f / kVec);
    const vfloat dm = mean - vset1(lanes_mean);
    const float lane_count = static_cast<float>(nb * kStatVecs);
    st = ChunkStat{nb * kBlock, static_cast<double>(lanes_mean) + shift,
                   hsum(vfma(dm * vset1(lane_count), dm, m2))};
  }
  return merge_stats(st, two_pass_stats(x + nb * kBlock, n - nb * kBlock));
}

// store(k, act(pre(k))) for the vectors k = 0 .. nv - 1, pre called once per vector in
// order. kActBatch vectors at a time go through the activation in lock-step
// (vactivation_batch, cpu_vec.h), so their long SiLU dependency chains overlap. Measured on
// Zen 5 (one core, [1, 320, 64, 64], L2-resident normalize + SiLU, cycles per 16 elements):
// fp32 10.5 with the former two-deep software pipeline, 6.2 at 4 vectors, 5.5 at 8; bf16
// 8.4 / 7.3 / 6.7. 8 vectors of state (3 registers each) still fit the 32 zmm registers.
constexpr int kActBatch = 8;
template <Activation ACT, bool kFast, typename Pre, typename Store>
inline void batched_act(int64_t nv, Pre&& pre, Store&& store) {
  int64_t k = 0;
  for (; k + kActBatch <= nv; k += kActBatch) {
    vfloat v[kActBatch];
#pragma GCC unroll 8
    for (int j = 0; j < kActBatch; ++j) v[j] = pre(k + j);
    vactivation_batch<ACT, kFast>(v);
#pragma GCC unroll 8
    for (int j = 0; j < kActBatch; ++j) store(k + j, v[j]);
  }
  for (; k < nv; ++k) {
    vfloat v[1] = {pre(k)};
    vactivation_batch<ACT, kFast>(v);
    store(k, v[0]);
  }
}

// Coefficients of the normalize loops below: one channel's (a, b) for a run of that channel,
// or per-element arrays A[i], B[i] for runs that cross channels (small spatial sizes).
struct ScalarCoefs {
  vfloat a, b;
  ScalarCoefs(float a_, float b_) : a(vset1(a_)), b(vset1(b_)) {}
  vfloat A(int64_t) const { return a; }
  vfloat B(int64_t) const { return b; }
  vfloat A_partial(int64_t, int64_t) const { return a; }
  vfloat B_partial(int64_t, int64_t) const { return b; }
};
struct ArrayCoefs {
  const float* a;
  const float* b;
  vfloat A(int64_t i) const { return vloadu(a + i); }
  vfloat B(int64_t i) const { return vloadu(b + i); }
  vfloat A_partial(int64_t i, int64_t r) const { return vload_partial(a + i, r); }
  vfloat B_partial(int64_t i, int64_t r) const { return vload_partial(b + i, r); }
};

// y[i] = act((x[i] - mean) * A[i] + B[i]) for n contiguous elements. kExact = false:
// branch-free stores that may flush subnormal bf16 results (see vstore_flagged); returns
// whether one did. Per element: read x once (L2, just pulled in by the statistics), write y once.
// next_x, next_y (null or both set): the same range of the block the caller normalizes next.
// Its x is prefetched into L2 here so that its statistics pass reads L2, not L3, the fetch
// overlapping this loop's arithmetic instead of stalling the memory-bound statistics
// (statistics alone: 3.0 cycles per vector from L3, 2.1 from L2; the whole fp32 SiLU call on
// one core: 0.177 -> 0.166 ms). For fp32 its y is prefetched for writing too: the 21 MB of x
// and y at SD sizes do not stay in a shared L3, and the stores' read-for-ownership misses then
// stall the normalize loop ([2, 320, 64, 64], 2 threads, interleaved A/B: 0.21 -> 0.18 ms).
// 16-bit data, half the bytes and bound by SiLU's arithmetic, measured 1% slower with it.
template <typename T, Activation ACT, bool kExact, typename Coefs>
bool affine_act_loop(const T* x, T* y, int64_t n, float mean, const Coefs& cf, const T* next_x,
                     T* next_y) {
  constexpr bool kPrefetchY = std::is_same<T, float>::value;
  constexpr bool kFast = !std::is_same<T, float>::value;  // 16-bit output: see cpu_vec.h
  const vfloat vm = vset1(mean);
  uint32_t flushed = 0;
  const int64_t nv = n / kVec;
  batched_act<ACT, kFast>(
      nv,
      [&](int64_t k) {
        if (next_x != nullptr && (k * kVec * sizeof(T)) % 64 == 0) {  // one prefetch per line
          __builtin_prefetch(next_x + k * kVec, 0, 2);  // prefetcht1: into L2
          if constexpr (kPrefetchY) __builtin_prefetch(next_y + k * kVec, 1, 2);  // prefetchw
        }
        return vfma(vload(x + k * kVec) - vm, cf.A(k * kVec), cf.B(k * kVec));
      },
      [&](int64_t k, vfloat v) {
        if constexpr (kExact) vstore(y + k * kVec, v); else vstore_flagged(y + k * kVec, v, flushed);
      });
  const int64_t i = nv * kVec;
  if (i < n) {
    const int64_t r = n - i;
    const vfloat v = vfma(vload_partial(x + i, r) - vm, cf.A_partial(i, r), cf.B_partial(i, r));
    vstore_partial(y + i, vactivation<ACT, kFast>(v), r);
  }
  return flushed != 0;
}

template <typename T, Activation ACT, typename Coefs>
void affine_act_run(const T* x, T* y, int64_t n, float mean, const Coefs& cf,
                    const T* next_x = nullptr, T* next_y = nullptr) {
  if constexpr (kStoreMayFlush<T>) {
    if (disjoint(x, y, n) && !affine_act_loop<T, ACT, false>(x, y, n, mean, cf, next_x, next_y))
      return;
  }
  affine_act_loop<T, ACT, true>(x, y, n, mean, cf, nullptr, nullptr);  // exact (or a rare redo)
}

// Threads for a call of `total` elements. Below kParallelMin it runs on the calling thread,
// with no OpenMP region at all. On an idle 2-core machine two threads win from ~8K elements
// (a fork costs ~1 us), but when the other core is oversubscribed the worker waits for a
// scheduler time slice (8 ms measured, at any size), a risk only a call that gains enough
// should take: at 64K elements (twice torch's 32K grain) 2 threads save ~5 of ~14 us (fp32
// SiLU), at 16K ~1 us.
int thread_count(int64_t total) {
  return total >= kParallelMin ? std::max(1, omp_get_max_threads()) : 1;
}

// Both layouts split their work the same way: `count` independent units (NCHW (n, g) blocks,
// channels_last samples). Enough units to balance: each thread takes a static range of whole
// units. Too few (batch 1, few groups): every thread enters every unit and splits it inside.
inline bool splits_inside_units(int nt, int64_t count) {
  return nt > 1 && count % nt != 0 && count < 4 * nt;
}

// whole(u0, u1) runs units [u0, u1) on one thread; shared(tid, nth) runs on every thread of
// one parallel region (it may use `#pragma omp barrier`: the region is the enclosing one).
template <typename Whole, typename Shared>
void run_units(int nt, int64_t count, const Whole& whole, const Shared& shared) {
  if (nt == 1) {
    whole(0, count);  // on the calling thread: no fork (see thread_count)
  } else if (!splits_inside_units(nt, count)) {
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
      whole(count * tid / nth, count * (tid + 1) / nth);
    }
  } else {
#pragma omp parallel num_threads(nt)
    shared(omp_get_thread_num(), omp_get_num_threads());
  }
}

// ------------------------------------------------------------------ NCHW: x [N, C, S]
// An (n, g) block is contiguous: Cg * S elements, channel c of the block at [c * S, (c+1) * S).
// Short channel runs (adaLN's LayerNorm is [N, C, 1]) are normalized in runs that cross
// channels, with A, B expanded per element (kPiece at a time), instead of one run per channel:
// each run costs a partial (memcpy) load and store at its end, which made a [3200, 64, 1] call
// 3-5x slower than torch. Measured ([256, 64, S], SiLU): expanded is faster for S < 32 and for
// S < 128 not a multiple of 16 (S = 65: 30% faster); per channel for S = 64, 96 and S >= 128
// (the expansion's extra loads cost ~10%).
inline bool expand_coefs(int64_t S) { return S < 32 || (S < 128 && S % kVec != 0); }
constexpr int64_t kPiece = 1024;

// Blocks smaller than a chunk are processed up to kMaxBatch at a time (at most kChunk elements,
// in L1): statistics of all, then mean/rstd of all, then normalize all. A block of 64 elements
// alone is one dependent chain (sums, reductions, divide, sqrt, coefficients, ~150 cycles of
// latency) that the core cannot overlap with the next block's; in phases, the independent
// chains of a batch overlap.
constexpr int64_t kMaxBatch = 64;

struct NchwScratch {
  std::vector<ChunkStat> st;            // per chunk of the blocks in flight
  std::vector<float> mean, rstd;        // per block in flight
  std::vector<float> A, B, Arep, Brep;  // per channel of a block; per element of a piece
  NchwScratch(int64_t nst, int64_t nblk, int64_t Cg, int64_t S)
      : st(nst), mean(nblk), rstd(nblk), A(Cg), B(Cg),
        Arep(S > 1 && expand_coefs(S) ? kPiece + kVec : 0), Brep(Arep.size()) {}
};

template <typename T, Activation ACT>
void group_norm_nchw(const GroupNormParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int64_t G = p.G, S = p.S, Cg = p.C / p.G;
  const int64_t L = Cg * S, nblocks = p.N * G;
  const int64_t nchunks = (L + kChunk - 1) / kChunk;
  const int nt = thread_count(p.N * p.C * S);

  auto block_stats = [&](int64_t blk, int64_t k0, int64_t k1, ChunkStat* st) {
    const T* xb = x + blk * L;
    for (int64_t k = k0; k < k1; ++k)
      st[k] = contiguous_stats(xb + k * kChunk, std::min(kChunk, L - k * kChunk));
  };
  // Elements [lo, hi) of block blk; prefetch_next: warm the cache with block blk + 1.
  auto block_normalize = [&](int64_t blk, int64_t lo, int64_t hi, float mean, NchwScratch& w,
                             bool prefetch_next) {
    const T* xb = x + blk * L;
    T* yb = y + blk * L;
    const T* nx = prefetch_next ? xb + L : nullptr;  // block blk + 1
    T* ny = prefetch_next ? yb + L : nullptr;
    const float* A = w.A.data();
    const float* B = w.B.data();
    if (S == 1) {  // element i is channel i
      affine_act_run<T, ACT>(xb + lo, yb + lo, hi - lo, mean, ArrayCoefs{A + lo, B + lo},
                             nx ? nx + lo : nullptr, ny ? ny + lo : nullptr);
    } else if (expand_coefs(S)) {
      float* Ar = w.Arep.data();
      float* Br = w.Brep.data();
      while (lo < hi) {
        const int64_t end = std::min(hi, lo + kPiece);
        // Whole-vector stores; a channel's last one spills into the next channel's range,
        // which that channel then overwrites (kVec floats of slack at the end).
        for (int64_t i = lo; i < end;) {
          const int64_t c = i / S, e = std::min(end, (c + 1) * S);
          const vfloat a = vset1(A[c]), b = vset1(B[c]);
          for (int64_t j = i - lo; j < e - lo; j += kVec) {
            vstoreu(Ar + j, a);
            vstoreu(Br + j, b);
          }
          i = e;
        }
        affine_act_run<T, ACT>(xb + lo, yb + lo, end - lo, mean, ArrayCoefs{Ar, Br},
                               nx ? nx + lo : nullptr, ny ? ny + lo : nullptr);
        lo = end;
      }
    } else {
      while (lo < hi) {
        const int64_t c = lo / S, end = std::min(hi, (c + 1) * S);
        affine_act_run<T, ACT>(xb + lo, yb + lo, end - lo, mean, ScalarCoefs(A[c], B[c]),
                               nx ? nx + lo : nullptr, ny ? ny + lo : nullptr);
        lo = end;
      }
    }
  };
  // Mean and rstd of block blk from its chunk statistics (written out if `write`).
  auto block_finish = [&](int64_t blk, const ChunkStat* st, bool write, float* mean, float* rstd) {
    combine_stats(st, nchunks, 1, p.eps, mean, rstd);
    if (write && p.mean_out) p.mean_out[blk] = *mean;
    if (write && p.rstd_out) p.rstd_out[blk] = *rstd;
  };
  auto block_coefs = [&](int64_t blk, float rstd, NchwScratch& w) {
    channel_coefs(p, blk / G, (blk % G) * Cg, Cg, rstd, w.A.data(), w.B.data());
  };
  // Whole blocks [b0, b1) on this thread, `batch` at a time (see kMaxBatch): a block (~160 KB
  // fp32 for SD's [2, 320, 64, 64]) or a batch stays in the core's cache between the
  // statistics and normalize passes.
  const int64_t batch = std::clamp<int64_t>(kChunk / L, 1, kMaxBatch);
  auto whole_blocks = [&](int64_t b0, int64_t b1) {
    NchwScratch w(batch * nchunks, batch, Cg, S);
    for (int64_t blk0 = b0; blk0 < b1; blk0 += batch) {
      const int64_t nb = std::min(batch, b1 - blk0);
      for (int64_t j = 0; j < nb; ++j) block_stats(blk0 + j, 0, nchunks, &w.st[j * nchunks]);
      for (int64_t j = 0; j < nb; ++j)
        block_finish(blk0 + j, &w.st[j * nchunks], true, &w.mean[j], &w.rstd[j]);
      for (int64_t j = 0; j < nb; ++j) {
        block_coefs(blk0 + j, w.rstd[j], w);
        block_normalize(blk0 + j, 0, L, w.mean[j], w, batch == 1 && blk0 + j + 1 < b1);
      }
    }
  };

  // Few blocks (batch 1, few groups): all threads share each block, each taking a contiguous
  // range of its chunks for both passes, with one barrier between statistics and normalize.
  std::vector<ChunkStat> st(splits_inside_units(nt, nblocks) ? nblocks * nchunks : 0);
  auto shared_blocks = [&](int tid, int nth) {
    const int64_t k0 = nchunks * tid / nth, k1 = nchunks * (tid + 1) / nth;
    NchwScratch w(0, 0, Cg, S);
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      ChunkStat* sb = st.data() + blk * nchunks;
      block_stats(blk, k0, k1, sb);
#pragma omp barrier
      float mean, rstd;
      block_finish(blk, sb, tid == 0, &mean, &rstd);
      block_coefs(blk, rstd, w);
      block_normalize(blk, std::min(L, k0 * kChunk), std::min(L, k1 * kChunk), mean, w,
                      blk + 1 < nblocks);
    }
  };
  run_units(nt, nblocks, whole_blocks, shared_blocks);
}

// ------------------------------------------------------------------ channels_last: x [N, S, C]
// A sample is a row-major [S, C] matrix. Channel-dependent vectors (accumulators, A, B) are
// expanded to P = lcm(C, 16) entries, so every 16-lane vector of a row range that starts at a
// multiple of P / C rows lines up with them: rows of any width C (6, 30, 1280) run as one flat
// vector loop with no per-row tail.
// Statistics chunks are whole multiples of 8 periods (the blocks of cl_chunk_stats) of about
// kClChunk elements: their per-chunk work (P lanes into C channels into G groups) is O(P + C)
// scalar operations, so they are 16x the NCHW chunk ([2, 1280, 16, 16] spent half its time
// there with 4096).
constexpr int64_t kClChunk = 65536;

struct ClGeometry {
  int64_t C, G, Cg, S, P, R, nchunks;  // R: rows per chunk (multiple of 8 P / C)
  explicit ClGeometry(const GroupNormParams& p) : C(p.C), G(p.G), Cg(p.C / p.G), S(p.S) {
    P = C / std::gcd(C, static_cast<int64_t>(kVec)) * kVec;
    R = (P / C) * kStatVecs * std::max<int64_t>(1, kClChunk / (kStatVecs * P));
    nchunks = (S + R - 1) / R;
  }
};

struct ClScratch {
  std::vector<vfloat> shift, mean, m2;  // per vector slot of a period: P / 16 each
  std::vector<double> cmean, cm2;       // per channel
  std::vector<float> nrep, arep, brep, A, B;  // *rep: P-periodic
  explicit ClScratch(const ClGeometry& g)
      : shift(g.P / kVec), mean(g.P / kVec), m2(g.P / kVec), cmean(g.C), cm2(g.C),
        nrep(g.P), arep(g.P), brep(g.P), A(g.C), B(g.C) {}
};

// Statistics of chunk k (rows [k R, k R + nr)) of one sample, per group: out[0..G), in one
// pass over x. The chunk is a run of periods (P elements, P / C rows); vector slot j of every
// period holds the same 16 channels, so each slot-lane sees one channel. Per slot, blocks of
// up to 8 periods are reduced like contiguous_stats' blocks (merge_block: values shifted by the
// slot's first-block mean; block mean and squared deviations in registers; Chan merge into the
// slot's running lanes, all lanes with the same counts so the weights are scalars), reading an
// 8P-element window that stays in L1/L2. Lanes then merge into channels and channels into
// groups in double; every lane of a chunk has the same count, and so has every channel, so
// those merges are means of means plus squared deviations (no E[x^2] - E[x]^2). A last partial
// period (P > C and rows not a multiple of P / C) is added per channel by two passes.
// (This replaced two passes through P-periodic accumulators in memory plus a staging copy of
// 16-bit data: 9-22 cycles per 16 elements of x, one core of Zen 5.)
template <typename T>
void cl_chunk_stats(const ClGeometry& g, const T* xs, int64_t k, ClScratch& w, ChunkStat* out) {
  const int64_t nr = std::min(g.R, g.S - k * g.R), P = g.P, nslots = P / kVec;
  const T* xc = xs + k * g.R * g.C;
  const int64_t nper = nr * g.C / P;  // whole periods
  const int64_t lanes_per_channel = P / g.C;
  double* cmean = w.cmean.data();
  double* cm2 = w.cm2.data();
  std::fill(w.cmean.begin(), w.cmean.end(), 0.0);
  std::fill(w.cm2.begin(), w.cm2.end(), 0.0);
  if (nper > 0) {
    const int64_t first = std::min<int64_t>(kStatVecs, nper);
    for (int64_t j = 0; j < nslots; ++j) {
      vfloat acc = vset1(0.f);
      for (int64_t u = 0; u < first; ++u) acc += vload(xc + u * P + j * kVec);
      w.shift[j] = acc * (1.0f / static_cast<float>(first));
      w.mean[j] = vset1(0.f);
      w.m2[j] = vset1(0.f);
    }
    for (int64_t p0 = 0; p0 < nper; p0 += kStatVecs) {
      const T* xb = xc + p0 * P;
      if (p0 + kStatVecs <= nper) {
        for (int64_t j = 0; j < nslots; ++j) {
          vfloat v[kStatVecs];
          for (int u = 0; u < kStatVecs; ++u) v[u] = vload(xb + u * P + j * kVec) - w.shift[j];
          merge_block(v, p0 / kStatVecs, w.mean[j], w.m2[j]);
        }
      } else {  // the last t < 8 periods: the same with t values per lane
        const int64_t t = nper - p0;
        const float wt = static_cast<float>(t) / static_cast<float>(p0 + t);
        const vfloat vwt = vset1(wt), vwd = vset1(static_cast<float>(p0) * wt);
        for (int64_t j = 0; j < nslots; ++j) {
          vfloat v[kStatVecs], sum = vset1(0.f), q = vset1(0.f);
          for (int64_t u = 0; u < t; ++u) sum += (v[u] = vload(xb + u * P + j * kVec) - w.shift[j]);
          const vfloat bmean = sum * (1.0f / static_cast<float>(t));
          for (int64_t u = 0; u < t; ++u) {
            const vfloat dv = v[u] - bmean;
            q = vfma(dv, dv, q);
          }
          const vfloat d = bmean - w.mean[j];
          w.mean[j] = vfma(d, vwt, w.mean[j]);
          w.m2[j] = vfma(d * vwd, d, w.m2[j] + q);
        }
      }
    }
    // lanes -> channels: equal counts (nper each), so a mean of means, then deviations
    const float* shift = reinterpret_cast<const float*>(w.shift.data());  // lane i of the period
    const float* lmean = reinterpret_cast<const float*>(w.mean.data());
    const float* lm2 = reinterpret_cast<const float*>(w.m2.data());
    const double inv_lanes = 1.0 / static_cast<double>(lanes_per_channel);
    for (int64_t i = 0, c = 0; i < P; ++i, c = (c + 1 == g.C) ? 0 : c + 1)
      cmean[c] += (static_cast<double>(shift[i]) + lmean[i]) * inv_lanes;
    for (int64_t i = 0, c = 0; i < P; ++i, c = (c + 1 == g.C) ? 0 : c + 1) {
      const double d = static_cast<double>(shift[i]) + lmean[i] - cmean[c];
      cm2[c] += lm2[i] + static_cast<double>(nper) * d * d;
    }
  }
  // A last partial period (fewer than P / C rows): per channel two-pass, then Chan.
  const int64_t rows0 = nper * P / g.C, nrest = nr - rows0;
  if (nrest > 0) {
    const double na = static_cast<double>(rows0), nb = static_cast<double>(nrest), n = na + nb;
    for (int64_t c = 0; c < g.C; ++c) {
      double sum = 0.0;
      for (int64_t r = rows0; r < nr; ++r) sum += to_float(xc[r * g.C + c]);
      const double mean = sum / nb;
      double m2 = 0.0;
      for (int64_t r = rows0; r < nr; ++r) {
        const double d = to_float(xc[r * g.C + c]) - mean;
        m2 += d * d;
      }
      const double d = mean - cmean[c];
      cmean[c] += d * (nb / n);
      cm2[c] += m2 + d * d * (na * nb / n);
    }
  }
  // channels -> groups: equal counts (nr rows each) again
  const double inv_cg = 1.0 / static_cast<double>(g.Cg);
  for (int64_t grp = 0; grp < g.G; ++grp) {
    const int64_t c0 = grp * g.Cg, c1 = c0 + g.Cg;
    double mean = 0.0, m2 = 0.0;
    for (int64_t c = c0; c < c1; ++c) mean += cmean[c];
    mean *= inv_cg;
    for (int64_t c = c0; c < c1; ++c) {
      const double d = cmean[c] - mean;
      m2 += cm2[c] + static_cast<double>(nr) * d * d;
    }
    out[grp] = ChunkStat{nr * g.Cg, mean, m2};
  }
}

// Mean, A, B of sample n from its per-group (mean, rstd), expanded to the P-periodic pattern.
void cl_coefs(const GroupNormParams& p, const ClGeometry& g, int64_t n, const float* mean,
              const float* rstd, ClScratch& w) {
  for (int64_t grp = 0; grp < g.G; ++grp)
    channel_coefs(p, n, grp * g.Cg, g.Cg, rstd[grp], w.A.data() + grp * g.Cg,
                  w.B.data() + grp * g.Cg);
  for (int64_t j = 0; j < g.P; j += g.C) {
    for (int64_t c = 0; c < g.C; ++c) {
      w.nrep[j + c] = mean[c / g.Cg];
      w.arep[j + c] = w.A[c];
      w.brep[j + c] = w.B[c];
    }
  }
}

// Rows [r0, r1) of one sample; r0 is a multiple of P / C. kExact: as in affine_act_loop.
template <typename T, Activation ACT, bool kExact>
bool cl_normalize_loop(const ClGeometry& g, const T* xc, T* yc, int64_t m, const ClScratch& w) {
  constexpr bool kFast = !std::is_same<T, float>::value;  // 16-bit output: see cpu_vec.h
  const float* nrep = w.nrep.data();
  const float* arep = w.arep.data();
  const float* brep = w.brep.data();
  uint32_t flushed = 0;
  const int64_t nv = m / kVec;
  int64_t off = 0;  // (k * kVec) % P for the vector k that pre is called for (in order)
  batched_act<ACT, kFast>(
      nv,
      [&](int64_t k) {
        const vfloat d = vload(xc + k * kVec) - vloadu(nrep + off);
        const vfloat v = vfma(d, vloadu(arep + off), vloadu(brep + off));
        off += kVec;
        if (off == g.P) off = 0;
        return v;
      },
      [&](int64_t k, vfloat v) {
        if constexpr (kExact) vstore(yc + k * kVec, v); else vstore_flagged(yc + k * kVec, v, flushed);
      });
  const int64_t i = nv * kVec;
  if (i < m) {
    const vfloat d = vload_partial(xc + i, m - i) - vloadu(nrep + off);
    const vfloat v = vfma(d, vloadu(arep + off), vloadu(brep + off));
    vstore_partial(yc + i, vactivation<ACT, kFast>(v), m - i);
  }
  return flushed != 0;
}

template <typename T, Activation ACT>
void cl_normalize(const ClGeometry& g, const T* xs, T* ys, int64_t r0, int64_t r1,
                  const ClScratch& w) {
  if (r1 <= r0) return;
  const int64_t m = (r1 - r0) * g.C;
  const T* xc = xs + r0 * g.C;
  T* yc = ys + r0 * g.C;
  if constexpr (kStoreMayFlush<T>) {
    if (disjoint(xc, yc, m) && !cl_normalize_loop<T, ACT, false>(g, xc, yc, m, w)) return;
  }
  cl_normalize_loop<T, ACT, true>(g, xc, yc, m, w);
}

template <typename T, Activation ACT>
void group_norm_channels_last(const GroupNormParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const ClGeometry g(p);
  const int64_t N = p.N, G = g.G, nchunks = g.nchunks, sample = g.S * g.C;
  const int nt = thread_count(N * sample);
  std::vector<ChunkStat> st(N * nchunks * G);
  std::vector<float> mean(N * G), rstd(N * G);

  auto finish_groups = [&](int64_t n, int64_t g0, int64_t g1) {
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t i = n * G + grp;
      combine_stats(st.data() + n * nchunks * G + grp, nchunks, G, p.eps, &mean[i], &rstd[i]);
      if (p.mean_out) p.mean_out[i] = mean[i];
      if (p.rstd_out) p.rstd_out[i] = rstd[i];
    }
  };

  // Whole samples [n0, n1) on this thread.
  auto whole_samples = [&](int64_t n0, int64_t n1) {
    ClScratch w(g);
    for (int64_t n = n0; n < n1; ++n) {
      const T* xs = x + n * sample;
      for (int64_t k = 0; k < nchunks; ++k)
        cl_chunk_stats(g, xs, k, w, st.data() + (n * nchunks + k) * G);
      finish_groups(n, 0, G);
      cl_coefs(p, g, n, mean.data() + n * G, rstd.data() + n * G, w);
      cl_normalize<T, ACT>(g, xs, y + n * sample, 0, g.S, w);
    }
  };

  // Few samples: threads split each sample's chunks (rows) for both passes.
  auto shared_samples = [&](int tid, int nth) {
    const int64_t k0 = nchunks * tid / nth, k1 = nchunks * (tid + 1) / nth;
    ClScratch w(g);
    for (int64_t n = 0; n < N; ++n) {
      const T* xs = x + n * sample;
      for (int64_t k = k0; k < k1; ++k)
        cl_chunk_stats(g, xs, k, w, st.data() + (n * nchunks + k) * G);
#pragma omp barrier
      finish_groups(n, G * tid / nth, G * (tid + 1) / nth);
#pragma omp barrier
      cl_coefs(p, g, n, mean.data() + n * G, rstd.data() + n * G, w);
      cl_normalize<T, ACT>(g, xs, y + n * sample, k0 * g.R, std::min(g.S, k1 * g.R), w);
    }
  };
  run_units(nt, N, whole_samples, shared_samples);
}

void validate(const GroupNormParams& p) {
  auto fail = [](const std::string& msg) {
    throw std::invalid_argument("flashdiff._cpu.group_norm_fwd: " + msg);
  };
  const int dt = static_cast<int>(p.dtype), act = static_cast<int>(p.activation);
  if (dt < 0 || dt > 2)
    fail("dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dt));
  if (act < 0 || act > 2)
    fail("activation code must be 0 (none), 1 (silu) or 2 (gelu), got " + std::to_string(act));
  if (p.N < 0 || p.C < 0 || p.S < 0)
    fail("sizes must be non-negative, got N=" + std::to_string(p.N) + ", C=" +
         std::to_string(p.C) + ", S=" + std::to_string(p.S));
  if (p.G <= 0) fail("num_groups G must be positive, got " + std::to_string(p.G));
  if (p.C % p.G != 0)
    fail("num_groups G=" + std::to_string(p.G) + " must divide the channel count C=" +
         std::to_string(p.C));
  if (!(p.eps >= 0.f) || std::isinf(p.eps))
    fail("eps must be a finite non-negative number, got " + std::to_string(p.eps));
  const int64_t kMax = std::numeric_limits<int64_t>::max();
  if (p.N > 0 && p.C > 0 && p.S > 0 && (p.C > kMax / p.N || p.S > kMax / (p.N * p.C)))
    fail("N * C * S overflows int64");
  if (p.N * p.C * p.S != 0 && (p.x == nullptr || p.y == nullptr))
    fail("x and y must be non-null data pointers");
}

}  // namespace

void group_norm_fwd(const GroupNormParams& params) {
  validate(params);
  if (params.N * params.C * params.S == 0) return;
  FD_DTYPE_SWITCH(params.dtype, T, [&] {
    FD_ACTIVATION_SWITCH(params.activation, kAct, [&] {
      if (params.channels_last) group_norm_channels_last<T, kAct>(params);
      else group_norm_nchw<T, kAct>(params);
    });
  });
}

}  // namespace FD_CPU_ISA
}  // namespace cpu
}  // namespace flashdiff
