// TQ1 GEMV, AVX-512 VNNI (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni; chosen at run time).
//
// No digit is ever extracted. One 64-byte load is t_0 (the packed bytes of one 320-weight block); three
// byte adds give t_{i+1} = 3 t_i mod 256 (wrapping is the "mod 256"). Since 256 c_i = 3 t_i - t_{i+1}
// (bitnet.quant.tq1, (1)), with x_i = x[320 b + 64 i : +64]:
//     sum_k x c = (3 A - B) / 256,   A = sum_i <t_i, x_i>,   B = sum_i <t_{i+1}, x_i>
// and every <., .> is a _mm512_dpbusd_epi32 (unsigned bytes t x signed int8 x): 10 per 64 bytes of
// weights, plus 10 byte adds. The int32 sums wrap (modular, as the instruction does); 3A - B is taken
// mod 2^32 and equals 256 * sum_k x c exactly, because |256 sum| < 2^31 for K <= BITNET_TQ1_MAX_K.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12 false positive inside _mm512_extracti64x4_epi64
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include "hsum_x86.h"
#include "tq1.h"
#include "x86_util.h"

namespace bitnet {
namespace {

inline __m512i times3(__m512i t) { return _mm512_add_epi8(t, _mm512_add_epi8(t, t)); }  // 3 t mod 256 per byte

// RT weight rows x one token. Two accumulators for each of A and B (even / odd digits): shorter
// dependency chains of vpdpbusd.
template <int RT>
inline void tile(const Tq1Args& a, int64_t m, int64_t n) {
  const int8_t* xr = a.x + m * a.ldx;
  const uint8_t* wr[RT];
  for (int r = 0; r < RT; ++r) wr[r] = a.w + (n + r) * a.ldw;
  __m512i a0[RT], a1[RT], b0[RT], b1[RT];
  for (int r = 0; r < RT; ++r) a0[r] = a1[r] = b0[r] = b1[r] = _mm512_setzero_si512();
  for (int64_t b = 0; b < a.nblk; ++b) {
    const int8_t* xb = xr + 320 * b;
    const __m512i x0 = _mm512_loadu_si512((const void*)(xb));
    const __m512i x1 = _mm512_loadu_si512((const void*)(xb + 64));
    const __m512i x2 = _mm512_loadu_si512((const void*)(xb + 128));
    const __m512i x3 = _mm512_loadu_si512((const void*)(xb + 192));
    const __m512i x4 = _mm512_loadu_si512((const void*)(xb + 256));
    prefetch_weights<RT>(wr, a.ldw, 64 * b);   // as the I2 kernel (x86_util.h)
    for (int r = 0; r < RT; ++r) {
      const __m512i t0 = _mm512_loadu_si512((const void*)(wr[r] + 64 * b));
      const __m512i t1 = times3(t0);
      const __m512i t2 = times3(t1);
      const __m512i t3 = times3(t2);
      const __m512i t4 = times3(t3);
      const __m512i t5 = times3(t4);
      a0[r] = _mm512_dpbusd_epi32(a0[r], t0, x0);
      b0[r] = _mm512_dpbusd_epi32(b0[r], t1, x0);
      a1[r] = _mm512_dpbusd_epi32(a1[r], t1, x1);
      b1[r] = _mm512_dpbusd_epi32(b1[r], t2, x1);
      a0[r] = _mm512_dpbusd_epi32(a0[r], t2, x2);
      b0[r] = _mm512_dpbusd_epi32(b0[r], t3, x2);
      a1[r] = _mm512_dpbusd_epi32(a1[r], t3, x3);
      b1[r] = _mm512_dpbusd_epi32(b1[r], t4, x3);
      a0[r] = _mm512_dpbusd_epi32(a0[r], t4, x4);
      b0[r] = _mm512_dpbusd_epi32(b0[r], t5, x4);
    }
  }
  int32_t* o = a.out + m * a.ldo + n;
  for (int r = 0; r < RT; ++r) {
    const uint32_t A = (uint32_t)hsum(_mm512_add_epi32(a0[r], a1[r]));
    const uint32_t B = (uint32_t)hsum(_mm512_add_epi32(b0[r], b1[r]));
    const int32_t s256 = (int32_t)(3u * A - B);   // = 256 * sum_k x c, exact (see the top)
    o[r] = s256 / 256 - a.xsum[m];
  }
}

}  // namespace

void tq1_gemm_avx512vnni(const Tq1Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) tile<4>(a, m, n);
    for (; n < n1; ++n) tile<1>(a, m, n);
  }
}

}  // namespace bitnet
