// AVX2 kernel (x86-64 Haswell / Zen and later). Compiled with -mavx2 -mfma; chosen at run time.
//
// One 32-byte load of an I2 block, shifted by 0/2/4/6 and masked with 3, gives four vectors of
// 32 unsigned codes c in {0,1,2} that line up with 32 contiguous int8 activations each.
// _mm256_maddubs_epi16(c, x) -> int16 pairs (|.| <= 2*2*128 = 512); the four quarters of a block
// sum to |.| <= 2048, so up to 8 blocks are accumulated in int16 (<= 16384) before one
// _mm256_madd_epi16(., 1) widens them to int32. The -1 offset of the codes is removed at the
// end by subtracting sum_k x[k].
#include <immintrin.h>

#include "hsum_x86.h"
#include "kernels.h"

namespace bitnet {
namespace {

constexpr int kI16Blocks = 8;
#ifndef BITNET_PREFETCH
#define BITNET_PREFETCH 1
#endif
constexpr bool kPrefetch = BITNET_PREFETCH;  // blocks accumulated in int16 before widening (8 * 2048 < 32767)

// Register tile: RT weight rows x MT tokens. pf: prefetch distance in bytes from the data being read.
template <int RT, int MT>
inline void tile(const GemmArgs& a, int64_t m, int64_t n, int64_t pf) {
  const __m256i m3 = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* wr[RT];
  const int8_t* xr[MT];
  for (int r = 0; r < RT; ++r) wr[r] = a.w + (n + r) * a.ldw;
  for (int t = 0; t < MT; ++t) xr[t] = a.x + (m + t) * a.ldx;
  __m256i acc[RT][MT];
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < MT; ++t) acc[r][t] = _mm256_setzero_si256();

  for (int64_t b0 = 0; b0 < a.nblk; b0 += kI16Blocks) {
    const int64_t b1 = b0 + kI16Blocks < a.nblk ? b0 + kI16Blocks : a.nblk;
    __m256i a16[RT][MT];
    for (int r = 0; r < RT; ++r)
      for (int t = 0; t < MT; ++t) a16[r][t] = _mm256_setzero_si256();
    for (int64_t b = b0; b < b1; ++b) {
      for (int r = 0; r < RT; ++r) {
        // Weights are streamed once (decode): fetch them ahead of time, so that the loads are not
        // limited by memory latency when the weights are not in cache.
        if (kPrefetch && (b & 1) == 0) _mm_prefetch((const char*)(wr[r] + pf + 32 * b), _MM_HINT_T0);
        const __m256i wv = _mm256_loadu_si256((const __m256i*)(wr[r] + 32 * b));
        const __m256i c0 = _mm256_and_si256(wv, m3);
        const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(wv, 2), m3);
        const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m3);
        const __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(wv, 6), m3);
        for (int t = 0; t < MT; ++t) {
          const int8_t* xb = xr[t] + 128 * b;
          const __m256i p0 = _mm256_maddubs_epi16(c0, _mm256_loadu_si256((const __m256i*)(xb)));
          const __m256i p1 = _mm256_maddubs_epi16(c1, _mm256_loadu_si256((const __m256i*)(xb + 32)));
          const __m256i p2 = _mm256_maddubs_epi16(c2, _mm256_loadu_si256((const __m256i*)(xb + 64)));
          const __m256i p3 = _mm256_maddubs_epi16(c3, _mm256_loadu_si256((const __m256i*)(xb + 96)));
          a16[r][t] = _mm256_add_epi16(a16[r][t], _mm256_add_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3)));
        }
      }
    }
    for (int r = 0; r < RT; ++r)
      for (int t = 0; t < MT; ++t) acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(a16[r][t], ones));
  }
  for (int t = 0; t < MT; ++t) store_row_sums(acc, t, a.xsum[m + t], a.out + (m + t) * a.ldo + n);
}

// All rows n0..n1 for the MT tokens starting at m; prefetch the same columns of the next RT rows.
template <int RT, int MT>
inline void rows(const GemmArgs& a, int64_t m, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + RT <= n1; n += RT) tile<RT, MT>(a, m, n, RT * a.ldw);
  for (; n < n1; ++n) tile<1, MT>(a, m, n, a.ldw);
}

// Decode GEMV: one row at a time, so the weights are read as one sequential stream per thread,
// prefetched 4 KB ahead (crossing into the next rows). Measured on Zen 3 with weights streamed from
// DRAM: ~1.5x the throughput of 4 interleaved row streams, close to a plain read loop.
constexpr int64_t kGemvPrefetch = 4096;

inline void gemv_rows(const GemmArgs& a, int64_t m, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) tile<1, 1>(a, m, n, kGemvPrefetch);
}

void gemm_avx2(const GemmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) rows<1, 4>(a, m, n0, n1);   // prefill: each unpacked block serves 4 tokens
  switch (m1 - m) {
    case 3: rows<1, 3>(a, m, n0, n1); break;
    case 2: rows<2, 2>(a, m, n0, n1); break;
    case 1: gemv_rows(a, m, n0, n1); break;             // decode GEMV: one token
    default: break;
  }
}

float absmax_avx2(const float* x, int64_t K) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  float r = _mm_cvtss_f32(h);
  float t = absmax_scalar(x + k, K - k);
  return t > r ? t : r;
}

void quant_avx2(const float* x, int64_t K, float s, float lo, float hi, int8_t* xq) {
  const __m256 vs = _mm256_set1_ps(s), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + k), vs);        // float32 product, as torch
    v = _mm256_min_ps(_mm256_max_ps(v, vlo), vhi);
    v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // half to even
    __m256i i = _mm256_cvtps_epi32(v);
    __m128i p = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    p = _mm_packs_epi16(p, p);
    _mm_storel_epi64((__m128i*)(xq + k), p);
  }
  quant_scalar(x + k, K - k, s, lo, hi, xq + k);
}

// 6 independent chains of vpmaddubsw + vpaddw (int16 sums, as the GEMM accumulates before it widens):
// 32 multiply-adds per chain and round. Named variables, not arrays, so that they live in registers.
int64_t peak_avx2(int64_t iters) {
  const __m256i s = _mm256_set1_epi8(-1);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
  __m256i u0 = _mm256_set1_epi8(1), u1 = _mm256_set1_epi8(2), u2 = _mm256_set1_epi8(3);
  __m256i u3 = _mm256_set1_epi8(4), u4 = _mm256_set1_epi8(5), u5 = _mm256_set1_epi8(6);
  for (int64_t i = 0; i < iters; ++i) {
    // opaque to the compiler: the products are not hoisted out of the loop
    __asm__("" : "+x"(u0), "+x"(u1), "+x"(u2), "+x"(u3), "+x"(u4), "+x"(u5));
    a0 = _mm256_add_epi16(a0, _mm256_maddubs_epi16(u0, s));
    a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(u1, s));
    a2 = _mm256_add_epi16(a2, _mm256_maddubs_epi16(u2, s));
    a3 = _mm256_add_epi16(a3, _mm256_maddubs_epi16(u3, s));
    a4 = _mm256_add_epi16(a4, _mm256_maddubs_epi16(u4, s));
    a5 = _mm256_add_epi16(a5, _mm256_maddubs_epi16(u5, s));
  }
  const __m256i t = _mm256_add_epi16(_mm256_add_epi16(_mm256_add_epi16(a0, a1), _mm256_add_epi16(a2, a3)),
                                     _mm256_add_epi16(a4, a5));
  volatile int32_t sink = _mm256_extract_epi32(t, 0);
  (void)sink;
  return iters * 6 * 32;
}

}  // namespace

float absmax_avx2_shared(const float* x, int64_t K) { return absmax_avx2(x, K); }
void quant_avx2_shared(const float* x, int64_t K, float s, float lo, float hi, int8_t* xq) {
  quant_avx2(x, K, s, lo, hi, xq);
}

Kernel kernel_avx2() {
  Kernel k{gemm_avx2, absmax_avx2, quant_avx2, 0};
  k.peak = peak_avx2;
  return k;
}

}  // namespace bitnet
