// AVX-512 VNNI kernel (Ice Lake / Sapphire Rapids / Zen 4 ...): _mm512_dpbusd_epi32.
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni; chosen at run time.
//
// One 64-byte load covers two I2 blocks (2p, 2p+1). Shifted by 0/2/4/6 and masked with 3 it gives
// four vectors whose lanes 32h + j hold the code of block 2p+h at k = 32q + j; the activations are
// stored "pair interleaved" (see kernels.h) so that they line up with one contiguous 64-byte load.
// An odd last block is loaded with a 32-byte mask: the upper half reads as code 0 (adds nothing).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12 false positive inside _mm512_extracti64x4_epi64
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
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
float absmax_avx2_shared(const float* x, int64_t K);
void quant_avx2_shared(const float* x, int64_t K, float s, float lo, float hi, int8_t* xq);

namespace {

template <int RT, int MT>
inline void tile(const GemmArgs& a, int64_t m, int64_t n) {
  const __m512i m3 = _mm512_set1_epi8(3);
  const uint8_t* wr[RT];
  const int8_t* xr[MT];
  for (int r = 0; r < RT; ++r) wr[r] = a.w + (n + r) * a.ldw;
  for (int t = 0; t < MT; ++t) xr[t] = a.x + (m + t) * a.ldx;
  __m512i acc[RT][MT];
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < MT; ++t) acc[r][t] = _mm512_setzero_si512();
  const int64_t npair = a.nblk / 2;
  const bool odd = (a.nblk & 1) != 0;
  for (int64_t p = 0; p < npair + (odd ? 1 : 0); ++p) {
    prefetch_weights<RT>(wr, a.ldw, 64 * p);
    for (int r = 0; r < RT; ++r) {
      const __m512i wv = p < npair ? _mm512_loadu_si512((const void*)(wr[r] + 64 * p))
                                   : _mm512_maskz_loadu_epi8((__mmask64)0xFFFFFFFFull, wr[r] + 64 * p);
      const __m512i c0 = _mm512_and_si512(wv, m3);
      const __m512i c1 = _mm512_and_si512(_mm512_srli_epi16(wv, 2), m3);
      const __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m3);
      const __m512i c3 = _mm512_and_si512(_mm512_srli_epi16(wv, 6), m3);
      for (int t = 0; t < MT; ++t) {
        const int8_t* xb = xr[t] + 256 * p;
        __m512i s = acc[r][t];
        s = _mm512_dpbusd_epi32(s, c0, _mm512_loadu_si512((const void*)(xb)));
        s = _mm512_dpbusd_epi32(s, c1, _mm512_loadu_si512((const void*)(xb + 64)));
        s = _mm512_dpbusd_epi32(s, c2, _mm512_loadu_si512((const void*)(xb + 128)));
        s = _mm512_dpbusd_epi32(s, c3, _mm512_loadu_si512((const void*)(xb + 192)));
        acc[r][t] = s;
      }
    }
  }
  for (int t = 0; t < MT; ++t) store_row_sums(acc, t, a.xsum[m + t], a.out + (m + t) * a.ldo + n);
}

// Prefill tile: RT weight rows x MT tokens. Per pair of blocks and quarter q, the RT code vectors are
// unpacked once for all MT tokens and each activation vector is loaded once (into a register) for all RT
// rows. RT = MT = 4: 16 independent vpdpbusd chains (the GEMV tile's 8 leave the unit waiting on their
// latency) and one 64-byte load per 4 of them; the 4 activation rows (4 x K bytes) stay in L1.
// Measured against the 2 x 4 GEMV tile (same process, calls alternated): 0.98-1.28x, median ~1.1x, on
// the 2B4T shapes at M = 8..512; a 2 x 8 tile was slower (8 activation rows of K = 6912 leave L1).
template <int RT, int MT>
inline void tile_shared(const GemmArgs& a, int64_t m, int64_t n) {
  const __m512i m3 = _mm512_set1_epi8(3);
  const uint8_t* wr[RT];
  const int8_t* xr[MT];
  for (int r = 0; r < RT; ++r) wr[r] = a.w + (n + r) * a.ldw;
  for (int t = 0; t < MT; ++t) xr[t] = a.x + (m + t) * a.ldx;
  __m512i acc[RT][MT];
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < MT; ++t) acc[r][t] = _mm512_setzero_si512();
  // one pair of blocks p; the last one of an odd count is loaded with a 32-byte mask (a separate call
  // after the loop, so that the loop body has no branch and the accumulators stay in registers)
  auto pair = [&](int64_t p, bool half) __attribute__((always_inline)) {
    __m512i wv[RT];
    prefetch_weights<RT, uint8_t, false>(wr, a.ldw, 64 * p);   // near only (x86_util.h)
    for (int r = 0; r < RT; ++r) {
      wv[r] = half ? _mm512_maskz_loadu_epi8((__mmask64)0xFFFFFFFFull, wr[r] + 64 * p)
                   : _mm512_loadu_si512((const void*)(wr[r] + 64 * p));
    }
    for (int q = 0; q < 4; ++q) {                       // quarter q: codes (w >> 2q) & 3 of both blocks
      __m512i c[RT];
      for (int r = 0; r < RT; ++r) c[r] = _mm512_and_si512(q ? _mm512_srli_epi16(wv[r], 2 * q) : wv[r], m3);
      for (int t = 0; t < MT; ++t) {
        __m512i xv = _mm512_loadu_si512((const void*)(xr[t] + 256 * p + 64 * q));
        // one load into a register for the RT vpdpbusd (GCC would otherwise fold it into each of them
        // as a memory operand: RT loads, and loads, not the multiply-adds, bound this loop)
        in_register(xv);
        for (int r = 0; r < RT; ++r) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], c[r], xv);
      }
    }
  };
  const int64_t npair = a.nblk / 2;
  for (int64_t p = 0; p < npair; ++p) pair(p, false);
  if (a.nblk & 1) pair(npair, true);
  for (int t = 0; t < MT; ++t) store_row_sums(acc, t, a.xsum[m + t], a.out + (m + t) * a.ldo + n);
}

template <int RT, int MT, bool kShared>
inline void rows(const GemmArgs& a, int64_t m, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if constexpr (kShared) {
    for (; n + RT <= n1; n += RT) tile_shared<RT, MT>(a, m, n);
    for (; n < n1; ++n) tile_shared<1, MT>(a, m, n);
  } else {
    for (; n + RT <= n1; n += RT) tile<RT, MT>(a, m, n);
    for (; n < n1; ++n) tile<1, MT>(a, m, n);
  }
}

// Tokens in groups of 4 (shared-code tile); 1-3 tokens (decode: the GEMV of run_decode, and the tail)
// keep the GEMV tile, which streams 2-4 weight rows per pass.
void gemm_avx512vnni(const GemmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) rows<4, 4, true>(a, m, n0, n1);
  switch (m1 - m) {
    case 3: rows<2, 3, false>(a, m, n0, n1); break;
    case 2: rows<4, 2, false>(a, m, n0, n1); break;
    case 1: rows<4, 1, false>(a, m, n0, n1); break;
    default: break;
  }
}

// 12 independent vpdpbusd (zmm) chains: 64 multiply-adds per instruction; 12 cover latency x
// throughput on every core measured (Zen 4: 4 cycles x 1 per cycle; Intel server cores: 5 x 2). The
// empty asm of in_register makes the accumulators opaque each round: without it GCC sees 12 identical chains (same
// inputs, same start) and keeps one, and the probe measured the latency, not the throughput.
int64_t peak_avx512vnni(int64_t iters) {
  const __m512i u = _mm512_set1_epi8(1), s = _mm512_set1_epi8(-1);
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
  __m512i a6 = a0, a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0;
  for (int64_t i = 0; i < iters; ++i) {
    in_register(a0); in_register(a1); in_register(a2); in_register(a3); in_register(a4); in_register(a5);
    in_register(a6); in_register(a7); in_register(a8); in_register(a9); in_register(a10); in_register(a11);
    a0 = _mm512_dpbusd_epi32(a0, u, s); a1 = _mm512_dpbusd_epi32(a1, u, s); a2 = _mm512_dpbusd_epi32(a2, u, s);
    a3 = _mm512_dpbusd_epi32(a3, u, s); a4 = _mm512_dpbusd_epi32(a4, u, s); a5 = _mm512_dpbusd_epi32(a5, u, s);
    a6 = _mm512_dpbusd_epi32(a6, u, s); a7 = _mm512_dpbusd_epi32(a7, u, s); a8 = _mm512_dpbusd_epi32(a8, u, s);
    a9 = _mm512_dpbusd_epi32(a9, u, s); a10 = _mm512_dpbusd_epi32(a10, u, s); a11 = _mm512_dpbusd_epi32(a11, u, s);
  }
  volatile int32_t sink = hsum(a0) + hsum(a1) + hsum(a2) + hsum(a3) + hsum(a4) + hsum(a5) + hsum(a6) + hsum(a7) +
                          hsum(a8) + hsum(a9) + hsum(a10) + hsum(a11);
  (void)sink;
  return iters * 12 * 64;
}

}  // namespace

Kernel kernel_avx512vnni() {
  Kernel k{gemm_avx512vnni, BITNET_QUANT_FNS, 1};
  k.peak = peak_avx512vnni;
  return k;
}

}  // namespace bitnet
