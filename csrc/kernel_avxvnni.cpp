// AVX-VNNI kernel (Alder Lake / Sapphire Rapids / Zen 5 ...): 256-bit _mm256_dpbusd_avx_epi32.
// Compiled with -mavx2 -mfma -mavxvnni; chosen at run time. Codes (unsigned 0..2) x int8
// activations, four products summed straight into int32 lanes; -sum(x) applied at the end.
#include <immintrin.h>

#include "hsum_x86.h"
#include "kernels.h"
#include "x86_util.h"

#if defined(BITNET_EMULATE)  // test build against csrc/emu/immintrin.h: portable quantiser
#define BITNET_QUANT_FNS absmax_scalar, quant_scalar
#else                        // AVX-512 / AVX-VNNI CPUs all have AVX2: reuse its quantiser
#define BITNET_QUANT_FNS absmax_avx2_shared, quant_avx2_shared
#endif

namespace bitnet {
namespace {

template <int RT, int MT>
inline void tile(const GemmArgs& a, int64_t m, int64_t n) {
  const __m256i m3 = _mm256_set1_epi8(3);
  const uint8_t* wr[RT];
  const int8_t* xr[MT];
  for (int r = 0; r < RT; ++r) wr[r] = a.w + (n + r) * a.ldw;
  for (int t = 0; t < MT; ++t) xr[t] = a.x + (m + t) * a.ldx;
  __m256i acc[RT][MT];
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < MT; ++t) acc[r][t] = _mm256_setzero_si256();
  for (int64_t b = 0; b < a.nblk; ++b) {
    for (int r = 0; r < RT; ++r) {
      // prefetch the same column of the next RT rows: streamed weights are not latency bound
      if ((b & 1) == 0) _mm_prefetch((const char*)(wr[r] + RT * a.ldw + 32 * b), _MM_HINT_T0);
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(wr[r] + 32 * b));
      const __m256i c0 = _mm256_and_si256(wv, m3);
      const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(wv, 2), m3);
      const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m3);
      const __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(wv, 6), m3);
      for (int t = 0; t < MT; ++t) {
        const int8_t* xb = xr[t] + 128 * b;
        __m256i s = acc[r][t];
        s = _mm256_dpbusd_avx_epi32(s, c0, _mm256_loadu_si256((const __m256i*)(xb)));
        s = _mm256_dpbusd_avx_epi32(s, c1, _mm256_loadu_si256((const __m256i*)(xb + 32)));
        s = _mm256_dpbusd_avx_epi32(s, c2, _mm256_loadu_si256((const __m256i*)(xb + 64)));
        s = _mm256_dpbusd_avx_epi32(s, c3, _mm256_loadu_si256((const __m256i*)(xb + 96)));
        acc[r][t] = s;
      }
    }
  }
  for (int t = 0; t < MT; ++t) store_row_sums(acc, t, a.xsum[m + t], a.out + (m + t) * a.ldo + n);
}

template <int RT, int MT>
inline void rows(const GemmArgs& a, int64_t m, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + RT <= n1; n += RT) tile<RT, MT>(a, m, n);
  for (; n < n1; ++n) tile<1, MT>(a, m, n);
}

void gemm_avxvnni(const GemmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) rows<2, 4>(a, m, n0, n1);
  switch (m1 - m) {
    case 3: rows<2, 3>(a, m, n0, n1); break;
    case 2: rows<2, 2>(a, m, n0, n1); break;
    case 1: rows<4, 1>(a, m, n0, n1); break;
    default: break;
  }
}

// 10 independent vpdpbusd (ymm) chains: 32 multiply-adds per instruction; 10 cover latency x throughput
// (Intel: 5 cycles x 2 per cycle; Zen 5: 2 per cycle). Opaque each round so that the compiler cannot
// merge the identical chains into one (see peak_avx512vnni). Not 12 as there: with 16 ymm registers GCC
// then kept the chains' values on the stack inside the loop and the probe read half the rate on a Zen 5
// (129 vs 230 GMAC/s of a hand-written loop).
int64_t peak_avxvnni(int64_t iters) {
  const __m256i u = _mm256_set1_epi8(1), s = _mm256_set1_epi8(-1);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0;
  for (int64_t i = 0; i < iters; ++i) {
    in_register(a0); in_register(a1); in_register(a2); in_register(a3); in_register(a4);
    in_register(a5); in_register(a6); in_register(a7); in_register(a8); in_register(a9);
    a0 = _mm256_dpbusd_avx_epi32(a0, u, s); a1 = _mm256_dpbusd_avx_epi32(a1, u, s); a2 = _mm256_dpbusd_avx_epi32(a2, u, s);
    a3 = _mm256_dpbusd_avx_epi32(a3, u, s); a4 = _mm256_dpbusd_avx_epi32(a4, u, s); a5 = _mm256_dpbusd_avx_epi32(a5, u, s);
    a6 = _mm256_dpbusd_avx_epi32(a6, u, s); a7 = _mm256_dpbusd_avx_epi32(a7, u, s); a8 = _mm256_dpbusd_avx_epi32(a8, u, s);
    a9 = _mm256_dpbusd_avx_epi32(a9, u, s);
  }
  volatile int32_t sink = hsum(a0) + hsum(a1) + hsum(a2) + hsum(a3) + hsum(a4) + hsum(a5) + hsum(a6) + hsum(a7) +
                          hsum(a8) + hsum(a9);
  (void)sink;
  return iters * 10 * 32;
}

}  // namespace

// The activation quantiser of AVX2 is reused (same instructions are available).
float absmax_avx2_shared(const float* x, int64_t K);
void quant_avx2_shared(const float* x, int64_t K, float s, float lo, float hi, int8_t* xq);

Kernel kernel_avxvnni() {
  Kernel k{gemm_avxvnni, BITNET_QUANT_FNS, 0};
  k.peak = peak_avxvnni;
  return k;
}

}  // namespace bitnet
