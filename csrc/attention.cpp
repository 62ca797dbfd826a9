// Rotary position embedding + KV-cache append + causal softmax attention of one layer: the attention
// step of the fused CPU path (bitnet/models/fused_block.py), one native call instead of ~40 small torch
// ops per layer. See bitnet_attention_step in bitnet_native.h. The math is float32; the KV cache holds
// float32 or IEEE binary16 (BITNET_KV_F16: half the bytes to stream per decode step), written with
// round-to-nearest-even (as torch's Tensor.half()) and widened exactly when read, or int8 (BITNET_KV_I8: a
// quarter of the float32 bytes) with one float32 scale d per (row, head, position), read as q * d (one
// float32 multiply). Every element type shares one templated code path and one fixed order of float
// operations: an int8 cache gives the bits of a float32 cache holding q * d.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bitnet_native.h"
#include "exp_reduce.h"
#include "float_clones.h"
#include "native_services.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#define BITNET_ATTN_AVX512 1   // decode loops and float16 conversions in AVX-512, chosen at run time
#endif

namespace bitnet {
namespace {

// Rotate-half (NEOX) rotary embedding of one head at one position, in place, in the operation order
// of bitnet.nn.RotaryEmbedding.rotate (x * cos + rotate_half(x) * sin), so results match bit for bit:
//   x[i]     <- x[i] * cos[i] + (-x[i+h]) * sin[i],    x[i+h] <- x[i+h] * cos[i+h] + x[i] * sin[i+h]
BITNET_FLOAT_CLONES void rope(float* x, int64_t hd, const float* c, const float* s) {
  const int64_t h = hd / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * c[i] + (-b) * s[i];
    x[i + h] = b * c[i + h] + a * s[i + h];
  }
}

// e^x for x <= 0 (scores minus their row maximum): x = n ln2 + r, |r| <= ln2 / 2 (two-constant
// Cody-Waite), e^r by its degree-6 Taylor polynomial (relative error ~1e-7), 2^n from the exponent
// bits. Branch free so that the loops over 16 queries vectorise; x < -87 gives ~1e-38, never inf/NaN.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const ExpReduced e = exp_reduce(x);
  const float r = e.r;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * exp2_int(e.n);
}

// Float32 keys ahead of the one being read that the decode loops ask the cache for (software prefetch;
// 0: none); the same bytes ahead, twice the keys, for float16. The hardware prefetcher restarts at every
// 4 KiB page and each (row, head) block of the cache is its own run of pages, so a few keys of look-ahead
// keep the loads fed. Changes no result.
#ifndef BITNET_ATTN_PREFETCH
#define BITNET_ATTN_PREFETCH 8
#endif
template <typename E>
constexpr int64_t prefetch_keys() { return BITNET_ATTN_PREFETCH * 4 / (int64_t)sizeof(E); }

// ---- the float16 KV cache: IEEE binary16 bits, round to nearest even when written ----
using half_t = uint16_t;
enum KvDtype { kKvF32 = 0, kKvF16 = 1, kKvI8 = 2, kKvDtypeCount };
const char* const kKvDtypeNames[kKvDtypeCount] = {"float32", "float16", "int8"};

inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// binary16 -> float32, exact (every binary16 value is a float32 value); the bits of F16C's vcvtph2ps (a
// signalling NaN comes back quiet). Checked against F16C on all 65536 inputs, and float_to_half on all 2^32.
inline float half_to_float(half_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, mag = h & 0x7fffu, shifted = mag << 13;
  uint32_t u;
  if (mag > 0x7c00u) u = (shifted + 0x70000000u) | 0x00400000u;         // NaN: exponent 31 -> 255, made quiet
  else if (mag == 0x7c00u) u = 0x7f800000u;                             // inf
  else if (mag >= 0x0400u) u = shifted + 0x38000000u;                   // normal: exponent + (127 - 15)
  else u = float_bits((float)mag * 5.9604644775390625e-8f);             // subnormal: mag * 2^-24, exact
  return bits_float(sign | u);
}

// float32 -> binary16, round to nearest even (overflow to inf; NaN stays a quiet NaN with its payload's
// top bits): the bits of F16C's vcvtps2ph with _MM_FROUND_TO_NEAREST_INT and of torch's Tensor.half().
inline half_t float_to_half(float f) {
  const uint32_t x = float_bits(f), sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return (half_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));       // NaN
  if (a >= 0x477ff000u) return (half_t)(sign | 0x7c00u);                             // >= 65520: inf
  if (a >= 0x38800000u) {                                                            // >= 2^-14: normal
    const uint32_t r = a + 0x0fffu + ((a >> 13) & 1u);                               // half to even at bit 13
    return (half_t)(sign | ((r - 0x38000000u) >> 13));
  }
  const uint32_t e = a >> 23;                  // subnormal or zero: a * 2^24 rounded to an integer
  if (e < 102) return (half_t)sign;            // a < 2^-25: 0
  const uint32_t m = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;   // shift in [14, 24]
  const uint32_t rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
  uint32_t q = m >> shift;
  q += (rem > halfway || (rem == halfway && (q & 1u))) ? 1u : 0u;
  return (half_t)(sign | q);
}

// The element of a cache as float32 (portable loops); d: the key's / value's int8 scale (unused otherwise).
inline float load(const float* p, float) { return *p; }
inline float load(const half_t* p, float) { return half_to_float(*p); }
inline float load(const int8_t* p, float d) { return (float)*p * d; }

// The int8 scale of key/value j (scales: its (row, head)'s, null for the float caches: then 0, unused).
template <typename E>
inline float scale_at(const float* scales, int64_t j) {
  if constexpr (std::is_same<E, int8_t>::value) return scales[j];
  else return ((void)scales, (void)j, 0.0f);
}

#if defined(BITNET_ATTN_AVX512)
// GCC 12's intrinsic headers start some conversions from an "undefined" register: false alarms here.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define BITNET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))

// BITNET_ATTN_PORTABLE=1 (read once) forces the portable loops: tests compare the two bit for bit.
bool have_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          !(std::getenv("BITNET_ATTN_PORTABLE") && std::getenv("BITNET_ATTN_PORTABLE")[0] == '1');
  return yes;
}

// 16 elements from p as floats (all, or the lanes of m, the others 0)
BITNET_AVX512 inline __m512 load16(const float* p, float) { return _mm512_loadu_ps(p); }
BITNET_AVX512 inline __m512 load16(const half_t* p, float) {
  return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
}
BITNET_AVX512 inline __m512 load16(const int8_t* p, float d) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))), _mm512_set1_ps(d));
}
BITNET_AVX512 inline __m512 load16(const float* p, float, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
BITNET_AVX512 inline __m512 load16(const int8_t* p, float d, __mmask16 m) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p))), _mm512_set1_ps(d));
}
BITNET_AVX512 inline __m512 load16(const half_t* p, float, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

BITNET_AVX512 void store_half_avx512(const float* src, int64_t n, half_t* dst) {
  const int rne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i*)(dst + i), _mm512_cvtps_ph(_mm512_loadu_ps(src + i), rne));
  if (i < n) {
    const __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
    _mm256_mask_storeu_epi16(dst + i, m, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, src + i), rne));
  }
}
#endif

// dst[0..n) = src[0..n) in the cache's element type
inline void store_row(const float* src, int64_t n, float* dst) { std::copy(src, src + n, dst); }
inline void store_row(const float* src, int64_t n, half_t* dst) {
#if defined(BITNET_ATTN_AVX512)
  if (have_avx512()) return store_half_avx512(src, n, dst);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_half(src[i]);
}

// ---- the int8 KV cache: per (row, head, position) absmax scale, as bitnet.nn.attention.quantize_kv ----
//   d = max_i |x_i| / 127,   q_i = clamp(round_half_even(x_i / d), -127, 127)   (d = 0: q = 0)
// and the entry read back is q_i * d (one float32 multiply). Keys and values must be finite. The AVX-512
// loop does the same IEEE operations (the max is exact in any order, the division correctly rounded, the
// rounding to nearest even); the portable one (a scalar division and a libm nearbyint per entry) had a
// tenth of the samples of a 16-row attention step in a profile.
#if defined(BITNET_ATTN_AVX512)
// 16 codes clamp(round_half_even(x / d), -127, 127) (d > 0)
BITNET_AVX512 inline __m512i int8_codes(__m512 x, __m512 d) {
  const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(x, d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_set1_ps(127.0f), _mm512_max_ps(_mm512_set1_ps(-127.0f), r)));
}

BITNET_AVX512 void store_i8_avx512(const float* src, int64_t n, int8_t* dst, float* scale) {
  __m512 m = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(src + i)));
  const __mmask16 tail = (__mmask16)((1u << (n - i)) - 1u);
  if (i < n) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, src + i)));
  const float d = _mm512_reduce_max_ps(m) / 127.0f;
  *scale = d;
  if (!(d > 0.0f)) {
    std::memset(dst, 0, (size_t)n);
    return;
  }
  const __m512 dv = _mm512_set1_ps(d);
  for (i = 0; i + 16 <= n; i += 16)
    _mm_storeu_si128((__m128i*)(dst + i), _mm512_cvtepi32_epi8(int8_codes(_mm512_loadu_ps(src + i), dv)));
  if (i < n) _mm512_mask_cvtepi32_storeu_epi8(dst + i, tail, int8_codes(_mm512_maskz_loadu_ps(tail, src + i), dv));
}
#endif

inline void store_row(const float* src, int64_t n, int8_t* dst, float* scale) {
#if defined(BITNET_ATTN_AVX512)
  if (have_avx512()) return store_i8_avx512(src, n, dst, scale);
#endif
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(src[i]));
  const float d = amax / 127.0f;
  *scale = d;
  for (int64_t i = 0; i < n; ++i) {
    const float r = d > 0.0f ? std::nearbyint(src[i] / d) : 0.0f;   // default rounding mode: half to even
    dst[i] = (int8_t)std::min(127.0f, std::max(-127.0f, r));
  }
}
// The float caches have no scales (scale is null).
inline void store_row(const float* src, int64_t n, float* dst, float*) { store_row(src, n, dst); }
inline void store_row(const float* src, int64_t n, half_t* dst, float*) { store_row(src, n, dst); }

// Prefetch the `bytes` bytes at p (one hint per 64-byte line).
inline void prefetch_bytes(const void* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch((const char*)p + o, 0, 3);
}

// ---- decode: one query of one head against its n cached keys / values ----
constexpr int kLanes = 16;  // partial sums per dot product: one 16-float vector (two 8-float ones)

// The fixed reduction of 16 partial sums: pairwise, a[l] + a[l + w] for w = 8, 4, 2, 1.
inline float reduce_lanes(const float* a) {
  float s8[8], s4[4], s2[2];
  for (int l = 0; l < 8; ++l) s8[l] = a[l] + a[l + 8];
  for (int l = 0; l < 4; ++l) s4[l] = s8[l] + s8[l + 4];
  for (int l = 0; l < 2; ++l) s2[l] = s4[l] + s4[l + 2];
  return s2[0] + s2[1];
}

// s[r] = reduce_lanes(a_r) * scale for R keys k_r = k + r hd, where a_r[l] = fma(q[d], k_r[d], a_r[l]) for
// d = l, l + 16, ... < hd, in order of d (R independent chains of 16-float vectors). ks: the R keys' int8
// scales (null for the float caches).
template <int R, typename E>
inline void scores(const float* q, const E* k, const float* ks, int64_t hd, float scale, float* s) {
  float a[R][kLanes] = {}, d[R];
  for (int r = 0; r < R; ++r) d[r] = scale_at<E>(ks, r);
  int64_t i = 0;
  for (; i + kLanes <= hd; i += kLanes)
    for (int r = 0; r < R; ++r)
      for (int l = 0; l < kLanes; ++l) a[r][l] = __builtin_fmaf(q[i + l], load(k + r * hd + i + l, d[r]), a[r][l]);
  const int64_t tail = hd - i;
  for (int r = 0; r < R; ++r)
    for (int64_t l = 0; l < tail; ++l) a[r][l] = __builtin_fmaf(q[i + l], load(k + r * hd + i + l, d[r]), a[r][l]);
  for (int r = 0; r < R; ++r) s[r] = reduce_lanes(a[r]) * scale;
}

#if defined(BITNET_ATTN_AVX512)
// scores<R> in AVX-512, the same operations in the same order (one zmm per key: lane l holds a_r[l];
// the tail of hd is a masked load, whose zero lanes add fma(0, 0, a) = a).
BITNET_AVX512 inline float reduce_lanes_avx512(__m512 a) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

// reduce_lanes of 4 accumulators at once, the same additions in the same order (each step adds lane l and
// lane l + w of one key's partial sums), with the 4 keys packed side by side in the vectors:
//   w = 8: [lo8(a0) lo8(a1)] + [hi8(a0) hi8(a1)], likewise a2, a3;  w = 4: 128-bit lane r holds key r;
//   w = 2, 1: within each 128-bit lane. s[r] = sum_r * scale.
BITNET_AVX512 inline void reduce4_lanes_avx512(const __m512* a, float scale, float* s) {
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(a[0], a[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(a[2], a[3], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 s4 = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 s2 = _mm512_add_ps(s4, _mm512_permute_ps(s4, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 s1 = _mm512_add_ps(s2, _mm512_permute_ps(s2, _MM_SHUFFLE(1, 1, 1, 1)));
  const __m512 r = _mm512_mul_ps(s1, _mm512_set1_ps(scale));
  const __m512 at = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), r);
  _mm_storeu_ps(s, _mm512_castps512_ps128(at));
}

template <int R, typename E>
BITNET_AVX512 inline void scores_avx512(const float* q, const E* k, const float* ks, int64_t hd, float scale,
                                        float* s) {
  __m512 a[R];
  float d[R];
  for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps(), d[r] = scale_at<E>(ks, r);
  int64_t i = 0;
  for (; i + kLanes <= hd; i += kLanes) {
    const __m512 qv = _mm512_loadu_ps(q + i);
    for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(qv, load16(k + r * hd + i, d[r]), a[r]);
  }
  if (i < hd) {
    const __mmask16 m = (__mmask16)((1u << (hd - i)) - 1u);
    const __m512 qv = _mm512_maskz_loadu_ps(m, q + i);
    for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(qv, load16(k + r * hd + i, d[r], m), a[r]);
  }
  if (R == 4) return reduce4_lanes_avx512(a, scale, s);
  for (int r = 0; r < R; ++r) s[r] = reduce_lanes_avx512(a[r]) * scale;
}

template <typename E>
BITNET_AVX512 void all_scores_avx512(const float* q, const E* kc, const float* ks, int64_t n, int64_t hd, float scale,
                                     float* w) {
  const int64_t row = hd * (int64_t)sizeof(E);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    if (prefetch_keys<E>() && j + prefetch_keys<E>() + 4 <= n) prefetch_bytes(kc + (j + prefetch_keys<E>()) * hd, 4 * row);
    scores_avx512<4>(q, kc + j * hd, ks ? ks + j : nullptr, hd, scale, w + j);
  }
  for (; j < n; ++j) scores_avx512<1>(q, kc + j * hd, ks ? ks + j : nullptr, hd, scale, w + j);
}

// out[d0 + 16 c + l] = (sum_j w[j] v_j[d0 + 16 c + l]) * inv for c < C (fma in order of j: the portable
// weighted_values' operations; lanes past `tail` (last vector, 1..16 lanes) are neither read nor written).
template <int C, typename E>
BITNET_AVX512 inline void values_avx512(const float* w, const E* vc, const float* vs, int64_t n, int64_t hd, int64_t d0,
                                        float inv, float* out, int tail = kLanes) {
  const __mmask16 m = (__mmask16)((1u << tail) - 1u);
  const int64_t row = hd * (int64_t)sizeof(E);
  __m512 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    if (prefetch_keys<E>() && (j & 3) == 0 && j + prefetch_keys<E>() + 4 <= n)
      prefetch_bytes(vc + (j + prefetch_keys<E>()) * hd, 4 * row);
    const __m512 a = _mm512_set1_ps(w[j]);
    const E* v = vc + j * hd + d0;
    const float d = scale_at<E>(vs, j);
    for (int c = 0; c < C - 1; ++c) acc[c] = _mm512_fmadd_ps(a, load16(v + c * kLanes, d), acc[c]);
    acc[C - 1] = _mm512_fmadd_ps(
        a, tail == kLanes ? load16(v + (C - 1) * kLanes, d) : load16(v + (C - 1) * kLanes, d, m), acc[C - 1]);
  }
  const __m512 s = _mm512_set1_ps(inv);
  for (int c = 0; c < C - 1; ++c) _mm512_storeu_ps(out + d0 + c * kLanes, _mm512_mul_ps(acc[c], s));
  _mm512_mask_storeu_ps(out + d0 + (C - 1) * kLanes, m, _mm512_mul_ps(acc[C - 1], s));
}

template <typename E>
BITNET_AVX512 void all_values_avx512(const float* w, const E* vc, const float* vs, int64_t n, int64_t hd, float inv,
                                     float* out) {
  int64_t d = 0;
  for (; d + 128 <= hd; d += 128) values_avx512<8>(w, vc, vs, n, hd, d, inv, out);
  for (; d + 64 <= hd; d += 64) values_avx512<4>(w, vc, vs, n, hd, d, inv, out);
  for (; d + 16 <= hd; d += 16) values_avx512<1>(w, vc, vs, n, hd, d, inv, out);
  if (d < hd) values_avx512<1>(w, vc, vs, n, hd, d, inv, out, (int)(hd - d));
}
#endif

// acc[i] = sum_j w[j] v_j[d0 + i] (fma, in order of j) for i < W; out[d0 + i] = acc[i] * inv.
template <int W, typename E>
inline void weighted_values(const float* w, const E* vc, const float* vs, int64_t n, int64_t hd, int64_t d0, float inv,
                            float* out) {
  float acc[W] = {};
  for (int64_t j = 0; j < n; ++j) {
    const float a = w[j], d = scale_at<E>(vs, j);
    const E* v = vc + j * hd + d0;
    for (int i = 0; i < W; ++i) acc[i] = __builtin_fmaf(a, load(v + i, d), acc[i]);
  }
  for (int i = 0; i < W; ++i) out[d0 + i] = acc[i] * inv;
}

// out = softmax(q k^T * scale) v for one query head q (hd) against n cached keys / values (n, hd);
// w: scratch of n floats. Every float operation is written out here in a fixed order (explicit fma,
// fixed lane reductions), so each clone (AVX-512, AVX2, baseline) gives the same bits, and a query's
// result depends on nothing but its own q, keys and values (batch invariance):
//   s_j = reduce_lanes(q . k_j, 16 lanes) * scale      4 keys per pass: 4 independent fma chains
//   e_j = exp_nonpositive(s_j - max s), sum = reduce_lanes(e, 16 lanes)
//   out = (sum_j e_j v_j) / sum                          one fma chain per dimension, in order of j
// Float16 keys / values are widened exactly, int8 ones read as q * d (ks, vs: their scales; null for the
// float caches), so they enter the same operations.
template <typename E>
__attribute__((always_inline)) inline void attend_one_body(const float* q, const E* kc, const E* vc, const float* ks,
                                                           const float* vs, int64_t n, int64_t hd, float scale,
                                                           float* w, float* out) {
  int64_t j = 0;
#if defined(BITNET_ATTN_AVX512)
  const bool simd = have_avx512();
  if (simd) {
    all_scores_avx512(q, kc, ks, n, hd, scale, w);
    j = n;
  }
#endif
  for (; j + 4 <= n; j += 4) {
    if (prefetch_keys<E>() && j + prefetch_keys<E>() + 4 <= n)
      prefetch_bytes(kc + (j + prefetch_keys<E>()) * hd, 4 * hd * (int64_t)sizeof(E));
    scores<4>(q, kc + j * hd, ks ? ks + j : nullptr, hd, scale, w + j);
  }
  for (; j < n; ++j) scores<1>(q, kc + j * hd, ks ? ks + j : nullptr, hd, scale, w + j);
  if (prefetch_keys<E>()) prefetch_bytes(vc, std::min<int64_t>(n, prefetch_keys<E>()) * hd * (int64_t)sizeof(E));
  float mx = -INFINITY;
  for (j = 0; j < n; ++j) mx = w[j] > mx ? w[j] : mx;
  float sums[kLanes] = {};
  for (j = 0; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float e = exp_nonpositive(w[j + l] - mx);
      w[j + l] = e;
      sums[l] += e;
    }
  for (int l = 0; j + l < n; ++l) {
    const float e = exp_nonpositive(w[j + l] - mx);
    w[j + l] = e;
    sums[l] += e;
  }
  const float inv = 1.0f / reduce_lanes(sums);
#if defined(BITNET_ATTN_AVX512)
  if (simd) return all_values_avx512(w, vc, vs, n, hd, inv, out);
#endif
  int64_t d = 0;
  for (; d + 64 <= hd; d += 64) weighted_values<64>(w, vc, vs, n, hd, d, inv, out);
  for (; d + 16 <= hd; d += 16) weighted_values<16>(w, vc, vs, n, hd, d, inv, out);
  for (; d < hd; ++d) weighted_values<1>(w, vc, vs, n, hd, d, inv, out);
}

BITNET_FLOAT_CLONES void attend_one_f32(const float* q, const float* kc, const float* vc, int64_t n, int64_t hd,
                                        float scale, float* w, float* out) {
  attend_one_body(q, kc, vc, nullptr, nullptr, n, hd, scale, w, out);
}
BITNET_FLOAT_CLONES void attend_one_f16(const float* q, const half_t* kc, const half_t* vc, int64_t n, int64_t hd,
                                        float scale, float* w, float* out) {
  attend_one_body(q, kc, vc, nullptr, nullptr, n, hd, scale, w, out);
}
BITNET_FLOAT_CLONES void attend_one_i8(const float* q, const int8_t* kc, const int8_t* vc, const float* ks,
                                       const float* vs, int64_t n, int64_t hd, float scale, float* w, float* out) {
  attend_one_body(q, kc, vc, ks, vs, n, hd, scale, w, out);
}
inline void attend_one(const float* q, const float* kc, const float* vc, const float*, const float*, int64_t n,
                       int64_t hd, float scale, float* w, float* out) {
  attend_one_f32(q, kc, vc, n, hd, scale, w, out);
}
inline void attend_one(const float* q, const half_t* kc, const half_t* vc, const float*, const float*, int64_t n,
                       int64_t hd, float scale, float* w, float* out) {
  attend_one_f16(q, kc, vc, n, hd, scale, w, out);
}
inline void attend_one(const float* q, const int8_t* kc, const int8_t* vc, const float* ks, const float* vs, int64_t n,
                       int64_t hd, float scale, float* w, float* out) {
  attend_one_i8(q, kc, vc, ks, vs, n, hd, scale, w, out);
}

// ---- prefill: blocks of up to kQB queries of one head, vectorised across the queries ----
constexpr int kQB = 16;  // queries per block: one 16-float vector per key and per head dimension

struct BlockScratch {
  std::vector<float> qt, st;  // (hd, kQB) queries, (n, kQB) scores / weights
};

// Queries q[i] (i < nq <= kQB, hd floats each) of one head against cached keys/values (rows of hd):
// query i sees keys 0 .. last[i]. out[i] = softmax(q k^T * scale) v. Every vector has one lane per
// query, so that no horizontal sums are needed: S^T (n, 16) = K Q^T; then O = P V, vectorised across d.
template <typename E>
__attribute__((always_inline)) inline void attend_block_body(const float* const* q, int nq, const int64_t* last,
                                                             const E* kc, const E* vc, const float* ks,
                                                             const float* vs, int64_t hd, float scale,
                                                             float* const* out, BlockScratch& sc) {
  int64_t n = 0;
  for (int i = 0; i < nq; ++i) n = std::max(n, last[i] + 1);
  sc.qt.assign((size_t)(hd * kQB), 0.0f);
  if ((int64_t)sc.st.size() < n * kQB) sc.st.resize((size_t)(n * kQB));
  float* qt = sc.qt.data();
  float* st = sc.st.data();
  float lim[kQB];
  for (int i = 0; i < kQB; ++i) lim[i] = i < nq ? (float)last[i] : -1.0f;
  for (int i = 0; i < nq; ++i)
    for (int64_t d = 0; d < hd; ++d) qt[d * kQB + i] = q[i][d];
  // scores S^T[j][i] = (q_i . k_j) * scale, 4 keys at a time (4 independent chains)
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    float a0[kQB] = {}, a1[kQB] = {}, a2[kQB] = {}, a3[kQB] = {};
    const E *k0 = kc + j * hd, *k1 = k0 + hd, *k2 = k1 + hd, *k3 = k2 + hd;
    const float d0 = scale_at<E>(ks, j), d1 = scale_at<E>(ks, j + 1), d2 = scale_at<E>(ks, j + 2),
                d3 = scale_at<E>(ks, j + 3);
    for (int64_t d = 0; d < hd; ++d) {
      const float* qd = qt + d * kQB;
      const float c0 = load(k0 + d, d0), c1 = load(k1 + d, d1), c2 = load(k2 + d, d2), c3 = load(k3 + d, d3);
      for (int i = 0; i < kQB; ++i) {
        a0[i] = __builtin_fmaf(qd[i], c0, a0[i]);
        a1[i] = __builtin_fmaf(qd[i], c1, a1[i]);
        a2[i] = __builtin_fmaf(qd[i], c2, a2[i]);
        a3[i] = __builtin_fmaf(qd[i], c3, a3[i]);
      }
    }
    for (int i = 0; i < kQB; ++i) {
      st[j * kQB + i] = a0[i] * scale;
      st[(j + 1) * kQB + i] = a1[i] * scale;
      st[(j + 2) * kQB + i] = a2[i] * scale;
      st[(j + 3) * kQB + i] = a3[i] * scale;
    }
  }
  for (; j < n; ++j) {
    float a0[kQB] = {};
    const E* k0 = kc + j * hd;
    const float d0 = scale_at<E>(ks, j);
    for (int64_t d = 0; d < hd; ++d) {
      const float c0 = load(k0 + d, d0);
      for (int i = 0; i < kQB; ++i) a0[i] = __builtin_fmaf(qt[d * kQB + i], c0, a0[i]);
    }
    for (int i = 0; i < kQB; ++i) st[j * kQB + i] = a0[i] * scale;
  }
  // softmax over the keys each query sees (the others get weight 0)
  float mx[kQB], sum[kQB];
  for (int i = 0; i < kQB; ++i) mx[i] = -INFINITY, sum[i] = 0.0f;
  for (j = 0; j < n; ++j)
    for (int i = 0; i < kQB; ++i) {
      const float v = st[j * kQB + i];
      mx[i] = ((float)j <= lim[i] && v > mx[i]) ? v : mx[i];
    }
  for (j = 0; j < n; ++j)
    for (int i = 0; i < kQB; ++i) {
      const float e = exp_nonpositive(st[j * kQB + i] - mx[i]);
      const float w = (float)j <= lim[i] ? e : 0.0f;
      st[j * kQB + i] = w;
      sum[i] += w;
    }
  // O[i][d] = sum_j w[j][i] v_j[d] (one fma chain per output, over j in order), then * (1 / sum[i]):
  // vectorised across d, kOutQ queries x kOutD dimensions at a time, so each key's values are read as
  // one contiguous row and every vector accumulator has its own chain.
  constexpr int kOutQ = 4, kOutD = 64;
  for (int i0 = 0; i0 < nq; i0 += kOutQ) {
    const int ni = std::min(kOutQ, nq - i0);
    for (int64_t d0 = 0; d0 < hd; d0 += kOutD) {
      const int64_t nd = std::min<int64_t>(kOutD, hd - d0);
      float a[kOutQ][kOutD] = {};
      if (nd == kOutD) {
        for (int64_t jj = 0; jj < n; ++jj) {
          const float* w = st + jj * kQB + i0;
          const E* v = vc + jj * hd + d0;
          const float dv = scale_at<E>(vs, jj);
#pragma GCC unroll 4
          for (int r = 0; r < kOutQ; ++r)
            for (int dd = 0; dd < kOutD; ++dd) a[r][dd] = __builtin_fmaf(w[r], load(v + dd, dv), a[r][dd]);
        }
      } else {
        for (int64_t jj = 0; jj < n; ++jj)
          for (int r = 0; r < kOutQ; ++r)
            for (int64_t dd = 0; dd < nd; ++dd)
              a[r][dd] = __builtin_fmaf(st[jj * kQB + i0 + r], load(vc + jj * hd + d0 + dd, scale_at<E>(vs, jj)),
                                        a[r][dd]);
      }
      for (int r = 0; r < ni; ++r) {
        const float inv = 1.0f / sum[i0 + r];
        for (int64_t dd = 0; dd < nd; ++dd) out[i0 + r][d0 + dd] = a[r][dd] * inv;
      }
    }
  }
}

BITNET_FLOAT_CLONES void attend_block_f32(const float* const* q, int nq, const int64_t* last, const float* kc,
                                          const float* vc, int64_t hd, float scale, float* const* out,
                                          BlockScratch& sc) {
  attend_block_body(q, nq, last, kc, vc, nullptr, nullptr, hd, scale, out, sc);
}
BITNET_FLOAT_CLONES void attend_block_f16(const float* const* q, int nq, const int64_t* last, const half_t* kc,
                                          const half_t* vc, int64_t hd, float scale, float* const* out,
                                          BlockScratch& sc) {
  attend_block_body(q, nq, last, kc, vc, nullptr, nullptr, hd, scale, out, sc);
}
BITNET_FLOAT_CLONES void attend_block_i8(const float* const* q, int nq, const int64_t* last, const int8_t* kc,
                                         const int8_t* vc, const float* ks, const float* vs, int64_t hd, float scale,
                                         float* const* out, BlockScratch& sc) {
  attend_block_body(q, nq, last, kc, vc, ks, vs, hd, scale, out, sc);
}
inline void attend_block(const float* const* q, int nq, const int64_t* last, const float* kc, const float* vc,
                         const float*, const float*, int64_t hd, float scale, float* const* out, BlockScratch& sc) {
  attend_block_f32(q, nq, last, kc, vc, hd, scale, out, sc);
}
inline void attend_block(const float* const* q, int nq, const int64_t* last, const half_t* kc, const half_t* vc,
                         const float*, const float*, int64_t hd, float scale, float* const* out, BlockScratch& sc) {
  attend_block_f16(q, nq, last, kc, vc, hd, scale, out, sc);
}
inline void attend_block(const float* const* q, int nq, const int64_t* last, const int8_t* kc, const int8_t* vc,
                         const float* ks, const float* vs, int64_t hd, float scale, float* const* out,
                         BlockScratch& sc) {
  attend_block_i8(q, nq, last, kc, vc, ks, vs, hd, scale, out, sc);
}

// One layer's attention step with a cache of element type E (see bitnet_attention_step).
// k_scale / v_scale (B, Hkv, max_len): the int8 cache's scales (null for float32 / float16).
template <typename E>
void attention_step(float* qkv, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* cos_table,
                    const float* sin_table, E* k_cache, E* v_cache, float* k_scale, float* v_scale, int64_t max_len,
                    const int64_t* pos, float* out) {
  const int64_t ld = (Hq + 2 * Hkv) * hd;      // qkv row: q heads | k heads | v heads
  const int64_t group = Hq / Hkv;
  const int64_t nthreads = native_threads();
  // 1. rotary on q and k; k and v appended to the caches (B, Hkv, max_len, hd) at pos[b] + t, one token
  //    per task (the appends miss the cache: spread over the threads)
  const int64_t ntok = B * T;
  const int64_t ttasks = (nthreads > 1 && ntok > 1) ? std::min<int64_t>(ntok, nthreads) : 1;
  native_parallel_for(ttasks, [&](int64_t task) {
    for (int64_t bt = task * ntok / ttasks; bt < (task + 1) * ntok / ttasks; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      float* row = qkv + bt * ld;
      const int64_t p = pos[b] + t;
      const float* c = cos_table + p * hd;
      const float* s = sin_table + p * hd;
      for (int64_t h = 0; h < Hq + Hkv; ++h) rope(row + h * hd, hd, c, s);
      for (int64_t g = 0; g < Hkv; ++g) {
        const int64_t slot = (b * Hkv + g) * max_len + p, at = slot * hd;
        store_row(row + (Hq + g) * hd, hd, k_cache + at, k_scale ? k_scale + slot : nullptr);
        store_row(row + (Hq + Hkv + g) * hd, hd, v_cache + at, v_scale ? v_scale + slot : nullptr);
      }
    }
  });
  // 2. query (b, t, h) reads keys 0..pos[b]+t of K/V head h / group
  const float scale = 1.0f / std::sqrt((float)hd);
  if (T >= 8) {  // prefill: blocks of kQB queries of one head (b, h, t-block), vectorised across queries
    const int64_t tblocks = (T + kQB - 1) / kQB, nblocks = B * Hq * tblocks;
    native_parallel_for(nblocks, [&](int64_t task) {
      thread_local BlockScratch sc;
      const int64_t tb = task % tblocks, h = (task / tblocks) % Hq, b = task / (tblocks * Hq);
      const int64_t t0 = tb * kQB, nq = std::min<int64_t>(kQB, T - t0), g = h / group;
      const float* qs[kQB];
      float* os[kQB];
      int64_t last[kQB];
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t bt = b * T + t0 + i;
        qs[i] = qkv + bt * ld + h * hd;
        os[i] = out + bt * Hq * hd + h * hd;
        last[i] = pos[b] + t0 + i;
      }
      const int64_t slot = (b * Hkv + g) * max_len, at = slot * hd;
      attend_block(qs, (int)nq, last, k_cache + at, v_cache + at, k_scale ? k_scale + slot : nullptr,
                   v_scale ? v_scale + slot : nullptr, hd, scale, os, sc);
    });
    return;
  }
  const int64_t nq = B * T * Hq;
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += T * Hq * (pos[b] + T) * hd;
  const int64_t ntasks = (nthreads > 1 && work > (1 << 16)) ? std::min<int64_t>(nq, nthreads * 4) : 1;
  native_parallel_for(ntasks, [&](int64_t task) {
    thread_local std::vector<float> w;
    for (int64_t i = task * nq / ntasks; i < (task + 1) * nq / ntasks; ++i) {
      const int64_t h = i % Hq, bt = i / Hq, b = bt / T, t = bt % T;
      const int64_t n = pos[b] + t + 1, g = h / group;
      if ((int64_t)w.size() < n) w.resize((size_t)n);
      const int64_t slot = (b * Hkv + g) * max_len, at = slot * hd;
      attend_one(qkv + bt * ld + h * hd, k_cache + at, v_cache + at, k_scale ? k_scale + slot : nullptr,
                 v_scale ? v_scale + slot : nullptr, n, hd, scale, w.data(), out + bt * Hq * hd + h * hd);
    }
  });
}

}  // namespace
}  // namespace bitnet

using namespace bitnet;

extern "C" const char* bitnet_kv_dtype_name(int code) {
  return code >= 0 && code < kKvDtypeCount ? kKvDtypeNames[code] : nullptr;
}

extern "C" int bitnet_attention_step(float* qkv, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd,
                                     const float* cos_table, const float* sin_table, int64_t table_len,
                                     void* k_cache, void* v_cache, float* k_scale, float* v_scale, int kv_dtype,
                                     int64_t max_len, const int64_t* pos, float* out) {
  if (B < 0 || T < 0 || Hq < 1 || Hkv < 1 || Hq % Hkv || hd < 2 || hd % 2) return BITNET_EINVAL;
  if (kv_dtype < 0 || kv_dtype >= kKvDtypeCount) return BITNET_EINVAL;
  if ((kv_dtype == kKvI8) != (k_scale && v_scale) || (kv_dtype != kKvI8 && (k_scale || v_scale))) return BITNET_EINVAL;
  for (int64_t b = 0; b < B; ++b)
    if (pos[b] < 0 || pos[b] + T > max_len || pos[b] + T > table_len) return BITNET_EINVAL;
  if (kv_dtype == kKvI8)
    attention_step(qkv, B, T, Hq, Hkv, hd, cos_table, sin_table, (int8_t*)k_cache, (int8_t*)v_cache, k_scale, v_scale,
                   max_len, pos, out);
  else if (kv_dtype == kKvF16)
    attention_step(qkv, B, T, Hq, Hkv, hd, cos_table, sin_table, (half_t*)k_cache, (half_t*)v_cache, nullptr, nullptr,
                   max_len, pos, out);
  else
    attention_step(qkv, B, T, Hq, Hkv, hd, cos_table, sin_table, (float*)k_cache, (float*)v_cache, nullptr, nullptr,
                   max_len, pos, out);
  return BITNET_OK;
}
