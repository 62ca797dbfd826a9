// AVX2 int8 x int8 kernel (int8 LM head). Compiled with -mavx2 -mfma; chosen at run time.
//
// 16 int8 values of a weight row and of an activation row are sign-extended to int16
// (_mm256_cvtepi8_epi16) and multiplied with _mm256_madd_epi16 -> 8 int32 pair sums
// (|.| <= 2 * 128 * 128 = 32768: exact for every int8 value, -128 included), accumulated in int32.
// Register tile: RT weight rows x MT tokens (each widened weight vector serves MT tokens).
#include <immintrin.h>

#include "hsum_x86.h"
#include "int8.h"

namespace bitnet {
namespace {

inline __m256i widen(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)); }

// pf: prefetch distance (bytes) along each weight row.
template <int RT, int MT>
inline void tile(const Int8Args& a, int64_t m, int64_t n, int64_t pf) {
  const int8_t* wr[RT];
  const int8_t* xr[MT];
  for (int r = 0; r < RT; ++r) wr[r] = a.w + (n + r) * a.ldw;
  for (int t = 0; t < MT; ++t) xr[t] = a.x + (m + t) * a.ldx;
  __m256i acc[RT][MT];
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < MT; ++t) acc[r][t] = _mm256_setzero_si256();
  const int64_t K16 = a.K & ~(int64_t)15;
  int64_t k = 0;
  for (; k < K16; k += 16) {
    __m256i xv[MT];
    for (int t = 0; t < MT; ++t) xv[t] = widen(xr[t] + k);
    for (int r = 0; r < RT; ++r) {
      if ((k & 63) == 0) _mm_prefetch((const char*)(wr[r] + k + pf), _MM_HINT_T0);
      const __m256i wv = widen(wr[r] + k);
      for (int t = 0; t < MT; ++t) acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(wv, xv[t]));
    }
  }
  for (int t = 0; t < MT; ++t) {
    int32_t* o = a.out + (m + t) * a.ldo + n;
    for (int r = 0; r < RT; ++r) {
      int32_t s = hsum(acc[r][t]);
      for (int64_t j = k; j < a.K; ++j) s += (int32_t)xr[t][j] * (int32_t)wr[r][j];
      o[r] = s;
    }
  }
}

template <int RT, int MT>
inline void rows(const Int8Args& a, int64_t m, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + RT <= n1; n += RT) tile<RT, MT>(a, m, n, 512);
  for (; n < n1; ++n) tile<1, MT>(a, m, n, 512);
}

// Decode GEMV: one row at a time = one sequential stream per thread, prefetched 4 KB ahead (into the
// next rows); streams weights from DRAM faster than several interleaved rows (see kernel_avx2.cpp).
inline void gemv_rows(const Int8Args& a, int64_t m, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) tile<1, 1>(a, m, n, 4096);
}

}  // namespace

void int8_gemm_avx2(const Int8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) rows<3, 4>(a, m, n0, n1);   // prefill: 3 rows x 4 tokens (12 accumulators)
  switch (m1 - m) {
    case 3: rows<3, 3>(a, m, n0, n1); break;
    case 2: rows<4, 2>(a, m, n0, n1); break;
    case 1: gemv_rows(a, m, n0, n1); break;             // decode GEMV: one token
    default: break;
  }
}

}  // namespace bitnet
