// CPU-only SIMD helpers for the flashdiff._cpu kernels (g++; never included by CUDA code).
//
// One fp32 vector type (`vfloat`, a GCC vector extension) of kVec lanes carries all
// arithmetic: one register of the target, 16 lanes (zmm) with AVX-512, 8 (ymm) with AVX, 4
// (xmm) otherwise. With AVX-512 the helpers below use AVX-512 intrinsics directly; with AVX2
// (x86-64-v3) FMA and F16C intrinsics; elsewhere portable code. So the kernels are written
// once, in units of kVec, and vectorize by construction (no reliance on the auto-vectorizer).
// Why the width follows the target: a 64-byte vector on an AVX2 or SSE target is lowered by
// g++ through the stack, piece by piece, and ran the kernels 15-40x slower than here.
//
// One build carries every ISA level (docs/internals.md, "Decision: one portable CPU binary"):
// setup.py compiles each csrc/cpu/*.cpp once per level with that level's -m flags and
// -DFD_CPU_ISA=<name>, and everything below except the storage types lives in the namespace
// flashdiff::cpu::FD_CPU_ISA. Why a namespace per level: the helpers are inline functions with
// external linkage; under one name the linker would keep one copy of each (say the AVX-512
// one) for every level, and the generic kernels would die with SIGILL on an older CPU.
//
// Element types of the big tensors: float, Half (IEEE fp16 bits) and BFloat16 (bf16 bits).
// Conversions to fp32 are exact; conversions from fp32 round to nearest even (fp16 via F16C
// vcvtps2ph, bf16 with integer arithmetic), keep NaN a NaN, and handle inf and subnormals.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "flashdiff/params.h"

#if defined(__AVX512F__) || defined(__F16C__) || defined(__FMA__) || defined(__SSE2__)
#include <immintrin.h>
#endif
// AVX-512 intrinsics are used in their zero-masked form with a full mask (_mm512_maskz_*(0xffff,
// ...)): the same instruction, but g++ 12 -Wall warns (falsely) about the _mm512_undefined_*()
// source inside many unmasked intrinsics.

// The ISA level this translation unit is compiled for (setup.py sets it; a stand-alone
// compile gets "native").
#ifndef FD_CPU_ISA
#define FD_CPU_ISA native
#endif
#define FD_CPU_STR2_(x) #x
#define FD_CPU_STR_(x) FD_CPU_STR2_(x)
#define FD_CPU_ISA_NAME FD_CPU_STR_(FD_CPU_ISA)

namespace flashdiff {
namespace cpu {

// Storage types only (no code): shared by every level and by csrc/cpu/dtype_switch.h.
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };
static_assert(sizeof(Half) == 2 && sizeof(BFloat16) == 2, "16-bit storage types");

namespace FD_CPU_ISA {

// fp32 lanes per vfloat: one register of the target (see the top of the file)
#if defined(__AVX512F__)
constexpr int kVec = 16;
#elif defined(__AVX__)
constexpr int kVec = 8;
#else
constexpr int kVec = 4;
#endif
typedef float vfloat __attribute__((vector_size(kVec * 4)));
typedef int32_t vint __attribute__((vector_size(kVec * 4)));
typedef uint32_t vuint __attribute__((vector_size(kVec * 4)));
typedef uint16_t vu16 __attribute__((vector_size(kVec * 2)));

// ------------------------------------------------------------------ scalar bit conversions
inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if (f != f) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round to nearest even with subnormals, overflow to inf, NaN kept (M. Maratyszcza's FP16 library).
inline uint16_t float_to_half(float f) {
  const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = float_to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xff000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007c00u) + (bits & 0x00000fffu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
}

inline float to_float(float v) { return v; }
inline float to_float(Half v) { return half_to_float(v.bits); }
inline float to_float(BFloat16 v) { return bf16_to_float(v.bits); }

template <typename T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline Half from_float<Half>(float v) { return Half{float_to_half(v)}; }
template <> inline BFloat16 from_float<BFloat16>(float v) { return BFloat16{float_to_bf16(v)}; }

// ------------------------------------------------------------------ vector basics
inline vfloat vset1(float s) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_set1_ps(s);
#else
  vfloat v;
  for (int i = 0; i < kVec; ++i) v[i] = s;
  return v;
#endif
}
inline vfloat vloadu(const float* p) { vfloat v; std::memcpy(&v, p, sizeof v); return v; }
inline void vstoreu(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

// a * b + c with one rounding where the target has FMA (-std=c++17 disables contraction).
inline vfloat vfma(vfloat a, vfloat b, vfloat c) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)  // implies AVX: kVec = 8
  return (vfloat)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

// Lane-wise select: mask lanes are all-ones (true) or zero, as vector comparisons produce.
inline vfloat vselect(vint mask, vfloat a, vfloat b) { return mask ? a : b; }

// Whether no lane is inf or NaN.
inline bool all_finite(vfloat v) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  return _mm512_fpclass_ps_mask((__m512)v, 0x99) == 0;  // QNaN | +inf | -inf | SNaN
#elif defined(__AVX__)  // one compare and a movemask, not a branch per lane
  const __m256 z = (__m256)(v * 0.0f);  // 0 for finite lanes, NaN for inf and NaN
  return _mm256_movemask_ps(_mm256_cmp_ps(z, z, _CMP_UNORD_Q)) == 0;
#elif defined(__SSE2__)
  const __m128 z = (__m128)(v * 0.0f);
  return _mm_movemask_ps(_mm_cmpunord_ps(z, z)) == 0;
#else
  const vfloat z = v * 0.0f;
  for (int i = 0; i < kVec; ++i)
    if (z[i] != 0.0f) return false;
  return true;
#endif
}

// Horizontal sum (pairwise tree; called once per chunk, not in inner loops).
inline float vsum(vfloat v) {
  float s[kVec];
  std::memcpy(s, &v, sizeof s);
  for (int w = kVec / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) s[i] += s[i + w];
  return s[0];
}

// ------------------------------------------------------------------ typed loads and stores
inline vfloat vload(const float* p) { return vloadu(p); }
inline void vstore(float* p, vfloat v) { vstoreu(p, v); }

inline vfloat vload(const BFloat16* p) {
#if defined(__AVX512F__)
  const __m512i u =
      _mm512_maskz_cvtepu16_epi32(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (vfloat)((vuint)u << 16);
#else
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  return (vfloat)(__builtin_convertvector(h, vuint) << 16);
#endif
}
// Round to nearest even, NaN kept a quiet NaN, subnormals kept (as torch's conversion does).
// With AVX512_BF16: one vcvtneps2bf16, whose only difference is that it flushes fp32
// subnormals (|v| < 1.2e-38) to zero; a vector holding one (rare) takes the integer path.
inline void vstore(BFloat16* p, vfloat v) {
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512DQ__)
  if (__builtin_expect(_mm512_fpclass_ps_mask((__m512)v, 0x20) == 0, 1)) {  // 0x20: subnormal
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh((__m512)v));
    return;
  }
#endif
  const vuint u = (vuint)v;
  const vuint rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vuint quiet_nan = (u >> 16) | 0x40u;
  const vuint r = (v != v) ? quiet_nan : rounded;
  const vu16 h = __builtin_convertvector(r, vu16);
  std::memcpy(p, &h, sizeof h);
}

inline vfloat vload(const Half* p) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)  // implies AVX: kVec = 8
  return (vfloat)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vfloat v;
  for (int i = 0; i < kVec; ++i) v[i] = half_to_float(p[i].bits);
  return v;
#endif
}
inline void vstore(Half* p, vfloat v) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_maskz_cvtps_ph(0xffff, (__m512)v,
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < kVec; ++i) p[i].bits = float_to_half(v[i]);
#endif
}

// A bf16 store without the per-vector subnormal test of vstore: with AVX512_BF16 it may flush
// fp32 subnormals to zero, and ORs a nonzero mask into `seen` when a lane was subnormal, so a
// loop can run branch-free (~15% faster for bf16 SiLU) and redo its range exactly in the rare
// case. Exact (plain vstore) for the other types and targets (kStoreMayFlush<T> false).
template <typename T>
constexpr bool kStoreMayFlush =
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512DQ__)
    std::is_same<T, BFloat16>::value;
#else
    false;
#endif

template <typename T>
inline void vstore_flagged(T* p, vfloat v, uint32_t& seen) {
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512DQ__)
  if constexpr (std::is_same<T, BFloat16>::value) {
    seen |= _mm512_fpclass_ps_mask((__m512)v, 0x20);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh((__m512)v));
    return;
  }
#endif
  (void)seen;
  vstore(p, v);
}

// Whether [a, a + n) and [b, b + n) share no byte (a range is redone only if its input survived).
template <typename T>
inline bool disjoint(const T* a, const T* b, int64_t n) {
  const uintptr_t x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  const uintptr_t bytes = static_cast<uintptr_t>(n) * sizeof(T);
  return x + bytes <= y || y + bytes <= x;
}

// The first n (< kVec) elements; the other lanes are zero.
template <typename T>
inline vfloat vload_partial(const T* p, int64_t n) {
  T tmp[kVec];
  std::memset(static_cast<void*>(tmp), 0, sizeof tmp);
  std::memcpy(static_cast<void*>(tmp), p, static_cast<size_t>(n) * sizeof(T));
  return vload(tmp);
}
template <typename T>
inline void vstore_partial(T* p, vfloat v, int64_t n) {
  T tmp[kVec];
  vstore(tmp, v);
  std::memcpy(static_cast<void*>(p), tmp, static_cast<size_t>(n) * sizeof(T));
}

// ------------------------------------------------------------------ transcendental functions
// Precision switch of the functions below: kFast = false gives fp32 accuracy (~1-3 ulp);
// kFast = true, used when the result is stored as fp16/bf16, allows a relative error below
// 1e-4 (a quarter of an fp16 ulp, 1/40 of a bf16 ulp) and saves a few polynomial terms.
// Reciprocals are true divisions (1.0f / d): see the activations below.

// min(max(x, lo), hi) with NaN passed through (AVX-512 vmaxps/vminps return their second
// operand when either is NaN; the portable selects compare false on NaN).
inline vfloat vclamp(vfloat x, float lo, float hi) {
#if defined(__AVX512F__)
  const __m512 t = _mm512_maskz_max_ps(0xffff, _mm512_set1_ps(lo), (__m512)x);
  return (vfloat)_mm512_maskz_min_ps(0xffff, _mm512_set1_ps(hi), t);
#else
  x = vselect(x < lo, vset1(lo), x);
  return vselect(x > hi, vset1(hi), x);
#endif
}

constexpr float kExpLo = -87.0f, kExpHi = 88.0f;  // exp stays a normal float in between

// exp(x) for x in [kExpLo, kExpHi] or NaN (callers clamp), for targets without AVX-512DQ
// (vexp2_batch below is the AVX-512 form). Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2
// (ln2 split in a 9-bit head and a tail, so n * head is exact), exp(r) ~ 1 + r + r^2 q(r)
// with q a degree-4 minimax fit for relative error (3e-9 in exact arithmetic), then scaled by
// 2^n. Measured max error 1 ulp against double exp. kFast: one-step reduction and q of
// degree 2, relative error 5.3e-6.
template <bool kFast = false>
inline vfloat vexp_in_range(vfloat x) {
#if defined(__AVX512F__)
  const vfloat n = (vfloat)_mm512_maskz_roundscale_ps(
      0xffff, (__m512)(x * 1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const vfloat magic = vset1(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vfloat t = vfma(x, vset1(1.44269504088896341f), magic);
  const vfloat n = t - magic;
#endif
  vfloat r, q;
  if constexpr (kFast) {
    r = vfma(n, vset1(-0.693147180559945309f), x);
    q = vset1(4.1277747601270676e-2f);
    q = vfma(q, r, vset1(1.6753514111042023e-1f));
    q = vfma(q, r, vset1(5.000511407852173e-1f));
  } else {
    r = vfma(n, vset1(-0.693359375f), x);
    r = vfma(n, vset1(2.12194440e-4f), r);
    q = vset1(1.381461275741458e-3f);
    q = vfma(q, r, vset1(8.368710055947304e-3f));
    q = vfma(q, r, vset1(4.166838899254799e-2f));
    q = vfma(q, r, vset1(1.666652113199234e-1f));
    q = vfma(q, r, vset1(4.999999403953552e-1f));
  }
  const vfloat p = vfma(q, r * r, r) + 1.0f;
#if defined(__AVX512F__)
  return (vfloat)_mm512_maskz_scalef_ps(0xffff, (__m512)p, (__m512)n);
#else
  const vint pow2n = (((vint)t - (vint)magic) + 127) << 23;  // t's low mantissa bits hold n
  return p * (vfloat)pow2n;
#endif
}

// ------------------------------------------------------------------ activations, K at a time
// The activations take K independent vectors in lock-step: each stage is issued for all K
// before the next, so the K dependency chains (~15-25 ops, 60+ cycles deep) overlap instead of
// stalling the out-of-order scheduler one chain at a time (GCC keeps source order on x86).
// Measured on a Zen 5 core (fp32 SiLU alone, L1-resident, cycles per vector): 9.9 one at a
// time with the former vrcp14ps + Newton quotient, 6.9 with K = 4 and that quotient, 5.5 with
// K = 4 and a true divide, 5.2 with K = 8. The divide wins because Zen 5's divider is its own
// unit (one 16-lane vdivps per ~2.5 cycles) beside the FMA pipes that bound these functions,
// where vrcp14ps + a Newton step took 3 FMA-pipe slots; it is also exactly rounded.

// out = 2^t for K vectors (t and out must not alias: t is read again at the end). AVX-512: base 2 needs no Cody-Waite range reduction: f = t - floor(t) in
// [0, 1) is one exact vreduceps, 2^f a relative-minimax polynomial (degree 5: 1.5e-7; kFast,
// degree 3: 7.5e-5), and vscalefps multiplies by 2^floor(t) itself, saturating to 0 or inf
// (t = -inf -> 0, +inf -> inf, NaN -> NaN), so no integer exponent and no clamp.
template <bool kFast, int K>
inline void vexp2_batch(const vfloat (&t)[K], vfloat (&out)[K]) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  vfloat f[K];
#pragma GCC unroll 8
  for (int j = 0; j < K; ++j)
    f[j] = (vfloat)_mm512_maskz_reduce_ps(0xffff, (__m512)t[j], _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  constexpr int kDeg = kFast ? 3 : 5;  // Horner, one coefficient at a time across the K vectors
  static constexpr float kCoef[2][6] = {
      {1.877575996e-3f, 8.989342488e-3f, 5.582631379e-2f, 2.401536256e-1f, 6.931530833e-1f, 9.999999404e-1f},
      {7.802446187e-2f, 2.260672748e-1f, 6.958335042e-1f, 9.999251962e-1f, 0.f, 0.f}};
  const float* c = kCoef[kFast ? 1 : 0];
#pragma GCC unroll 8
  for (int j = 0; j < K; ++j) out[j] = vfma(vset1(c[0]), f[j], vset1(c[1]));
#pragma GCC unroll 6
  for (int d = 2; d <= kDeg; ++d) {
#pragma GCC unroll 8
    for (int j = 0; j < K; ++j) out[j] = vfma(out[j], f[j], vset1(c[d]));
  }
#pragma GCC unroll 8
  for (int j = 0; j < K; ++j) out[j] = (vfloat)_mm512_maskz_scalef_ps(0xffff, (__m512)out[j], (__m512)t[j]);
#else
  // Portable: exp(t ln 2) on the clamped argument, then saturated as vscalefps does (0 below
  // the range, inf above; NaN propagates), so silu(-inf) = NaN and silu(-1e38) = -0 here too.
  for (int j = 0; j < K; ++j) {
    const vfloat arg = t[j] * 0.693147180559945309f;
    const vfloat e = vexp_in_range<kFast>(vclamp(arg, kExpLo, kExpHi));
    out[j] = vselect(arg > kExpHi, vset1(INFINITY), vselect(arg < kExpLo, vset1(0.0f), e));
  }
#endif
}

// silu(v) = v / (1 + 2^(-v log2 e)), in place. Error: fp32 (rounding of the exponent, ~|v|
// 2^-24, included) |silu - exact| <= 1.3e-6 on [-100, 100], ~1-2 ulp of the result where it
// is not tiny; kFast (16-bit outputs) <= 1.7e-5, a sixtieth of a bf16 ulp. Special values as
// torch: NaN -> NaN, inf -> inf, -inf -> NaN (-inf / inf), silu(v < -88) = -0 (exact:
// ~-1e-36 |v|).
template <bool kFast, int K>
inline void vsilu_batch(vfloat (&v)[K]) {
  vfloat t[K], e[K];
#pragma GCC unroll 8
  for (int j = 0; j < K; ++j) t[j] = v[j] * vset1(-1.44269504088896341f);
  vexp2_batch<kFast>(t, e);
#pragma GCC unroll 8
  for (int j = 0; j < K; ++j) v[j] = v[j] / (e[j] + 1.0f);
}

// Exact GELU, 0.5 v (1 + erf(v / sqrt 2)), in place, with erf from Abramowitz & Stegun 7.1.26
// (|error| <= 1.5e-7, the same formula as torch's vectorized CPU erf). 1 + erf(z) is formed
// as erfc(|z|) for z < 0 and 2 - erfc(z) otherwise, so negative inputs suffer no
// cancellation. Max |error| of the result ~ 2e-7 * max(1, |v|) (measured ~4e-7 on [-10, 10];
// kFast: ~2e-5 * max(1, |v|)).
template <bool kFast, int K>
inline void vgelu_batch(vfloat (&v)[K]) {
  vfloat a[K], r[K], p[K], t[K], e[K];
#pragma GCC unroll 8
  for (int j = 0; j < K; ++j)  // |z|; NaN stays NaN. |z| = inf gives r = 0 and exp(-a^2) = 0, so
    a[j] = (vfloat)((vuint)(v[j] * 0.70710678118654752f) & 0x7fffffffu);  // gelu(-inf) = NaN, as torch
#pragma GCC unroll 8
  for (int j = 0; j < K; ++j) r[j] = 1.0f / vfma(a[j], vset1(0.3275911f), vset1(1.0f));
#pragma GCC unroll 8
  for (int j = 0; j < K; ++j) t[j] = a[j] * a[j] * vset1(-1.44269504088896341f);
  vexp2_batch<kFast>(t, e);  // exp(-a^2)
  static constexpr float kErfc[5] = {1.061405429f, -1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f};
#pragma GCC unroll 8
  for (int j = 0; j < K; ++j) p[j] = vfma(vset1(kErfc[0]), r[j], vset1(kErfc[1]));
#pragma GCC unroll 4
  for (int d = 2; d < 5; ++d) {
#pragma GCC unroll 8
    for (int j = 0; j < K; ++j) p[j] = vfma(p[j], r[j], vset1(kErfc[d]));
  }
#pragma GCC unroll 8
  for (int j = 0; j < K; ++j) {
    const vfloat erfc_a = p[j] * r[j] * e[j];
    v[j] = 0.5f * v[j] * vselect(v[j] < 0.0f, erfc_a, 2.0f - erfc_a);
  }
}

template <bool kFast = false>
inline vfloat vsilu(vfloat v) {
  vfloat b[1] = {v};
  vsilu_batch<kFast>(b);
  return b[0];
}

template <bool kFast = false>
inline vfloat vgelu(vfloat v) {
  vfloat b[1] = {v};
  vgelu_batch<kFast>(b);
  return b[0];
}

template <Activation ACT, bool kFast = false>
inline vfloat vactivation(vfloat v) {
  if constexpr (ACT == Activation::kSilu) return vsilu<kFast>(v);
  else if constexpr (ACT == Activation::kGelu) return vgelu<kFast>(v);
  else return v;
}

// The activation of K independent vectors, in place, in lock-step (see above).
template <Activation ACT, bool kFast, int K>
inline void vactivation_batch(vfloat (&v)[K]) {
  if constexpr (ACT == Activation::kSilu) vsilu_batch<kFast>(v);
  else if constexpr (ACT == Activation::kGelu) vgelu_batch<kFast>(v);
}

}  // namespace FD_CPU_ISA
}  // namespace cpu
}  // namespace flashdiff
