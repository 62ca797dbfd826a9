// AVX-512 VNNI int8 x int8 kernel (the int8 LM head on CPUs with AVX-512 VNNI and no AMX: Zen 4, Ice
// Lake ...). Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni; chosen at run time.
//
// vpdpbusd multiplies unsigned by signed bytes. The weights are made unsigned on the fly, u = w ^ 0x80
// = w + 128 (one XOR per 64 weights, shared by the tile's tokens), so that
//   sum_k x[k] w[k] = sum_k x[k] u[k] - 128 sum_k x[k]          (Args::xsum = sum_k x[k], per token)
// in wrapping int32 arithmetic: exact wherever the result fits in int32, as for every other kernel.
// The K tail is read with a byte mask: masked weights give u = 128 against masked x = 0, adding nothing.
// Register tile: RT weight rows x MT tokens, one 64-byte step of K at a time; each activation vector is
// loaded once for the RT rows and each unsigned weight vector serves the MT tokens.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12 false positive inside _mm512_extracti64x4_epi64
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include "hsum_x86.h"
#include "int8.h"
#include "x86_util.h"

namespace bitnet {
namespace {

// Weights prefetched like the ternary kernel (prefetch_weights, x86_util.h).
template <int RT, int MT>
inline void tile(const Int8Args& a, int64_t m, int64_t n) {
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  const int8_t* wr[RT];
  const int8_t* xr[MT];
  for (int r = 0; r < RT; ++r) wr[r] = a.w + (n + r) * a.ldw;
  for (int t = 0; t < MT; ++t) xr[t] = a.x + (m + t) * a.ldx;
  __m512i acc[RT][MT];
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < MT; ++t) acc[r][t] = _mm512_setzero_si512();
  auto step = [&](int64_t k, __mmask64 mask, bool tail) __attribute__((always_inline)) {
    __m512i xv[MT];
    for (int t = 0; t < MT; ++t) {
      xv[t] = tail ? _mm512_maskz_loadu_epi8(mask, xr[t] + k) : _mm512_loadu_si512((const void*)(xr[t] + k));
      in_register(xv[t]);
    }
    prefetch_weights<RT>(wr, a.ldw, k);
    for (int r = 0; r < RT; ++r) {
      const __m512i wv = tail ? _mm512_maskz_loadu_epi8(mask, wr[r] + k) : _mm512_loadu_si512((const void*)(wr[r] + k));
      const __m512i u = _mm512_xor_si512(wv, flip);
      for (int t = 0; t < MT; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], u, xv[t]);
    }
  };
  const int64_t K64 = a.K & ~(int64_t)63;
  for (int64_t k = 0; k < K64; k += 64) step(k, ~(__mmask64)0, false);
  if (a.K > K64) step(K64, (~(__mmask64)0) >> (64 - (a.K - K64)), true);
  // bias: the +128 of the flipped weights, 128 * sum_k x (wrapping, as the int32 sums themselves)
  for (int t = 0; t < MT; ++t)
    store_row_sums(acc, t, (int32_t)(128u * (uint32_t)a.xsum[m + t]), a.out + (m + t) * a.ldo + n);
}

template <int RT, int MT>
inline void rows(const Int8Args& a, int64_t m, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + RT <= n1; n += RT) tile<RT, MT>(a, m, n);
  for (; n < n1; ++n) tile<1, MT>(a, m, n);
}

}  // namespace

void int8_gemm_avx512vnni(const Int8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) rows<4, 4>(a, m, n0, n1);   // 16 accumulators
  switch (m1 - m) {
    case 3: rows<4, 3>(a, m, n0, n1); break;
    case 2: rows<4, 2>(a, m, n0, n1); break;
    case 1: int8_gemm_avx2(a, m, m1, n0, n1); break;    // decode GEMV: the AVX2 one streams as fast or faster
    default: break;
  }
}

}  // namespace bitnet
