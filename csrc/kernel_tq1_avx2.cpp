// TQ1 GEMV, AVX2 (compiled with -mavx2 -mfma; chosen at run time on CPUs without AVX-512 VNNI).
//
// _mm256_maddubs_epi16 saturates at int16, so the byte trick of the VNNI kernel (products up to
// 255 * 128) cannot be used here: the digits are extracted. Per 32-byte half of a block, t_0 = the
// packed bytes, t_{i+1} = 3 t_i mod 256 (byte adds), c_i = floor(3 t_i / 256) = [t_i >= 86] + [t_i >= 171]
// (unsigned compares via max_epu8 == t). maddubs(c_i, x_i) -> int16 pairs (|.| <= 2*2*128 = 512); five
// digits x two halves of a block sum to <= 5120, so 6 blocks are accumulated in int16 (<= 30720) before
// one _mm256_madd_epi16(., 1) widens them to int32.
#include <immintrin.h>

#include "hsum_x86.h"
#include "tq1.h"

namespace bitnet {
namespace {

constexpr int64_t kI16Blocks = 6;

template <int RT>
inline void tile(const Tq1Args& a, int64_t m, int64_t n) {
  const __m256i c86 = _mm256_set1_epi8((char)86), c171 = _mm256_set1_epi8((char)171);
  const __m256i zero = _mm256_setzero_si256(), ones = _mm256_set1_epi16(1);
  const int8_t* xr = a.x + m * a.ldx;
  const uint8_t* wr[RT];
  for (int r = 0; r < RT; ++r) wr[r] = a.w + (n + r) * a.ldw;
  __m256i acc[RT];
  for (int r = 0; r < RT; ++r) acc[r] = zero;
  for (int64_t bb = 0; bb < a.nblk; bb += kI16Blocks) {
    const int64_t be = bb + kI16Blocks < a.nblk ? bb + kI16Blocks : a.nblk;
    __m256i a16[RT];
    for (int r = 0; r < RT; ++r) a16[r] = zero;
    for (int64_t b = bb; b < be; ++b) {
      for (int h = 0; h < 2; ++h) {
        const int8_t* xb = xr + 320 * b + 32 * h;
        for (int r = 0; r < RT; ++r) {
          if (h == 0) _mm_prefetch((const char*)(wr[r] + RT * a.ldw + 64 * b), _MM_HINT_T0);
          __m256i t = _mm256_loadu_si256((const __m256i*)(wr[r] + 64 * b + 32 * h));
          __m256i s = zero;
          for (int i = 0; i < 5; ++i) {
            const __m256i ge1 = _mm256_cmpeq_epi8(_mm256_max_epu8(t, c86), t);    // 0xFF where t >= 86
            const __m256i ge2 = _mm256_cmpeq_epi8(_mm256_max_epu8(t, c171), t);   // 0xFF where t >= 171
            const __m256i c = _mm256_sub_epi8(_mm256_sub_epi8(zero, ge1), ge2);    // c_i in {0, 1, 2}
            const __m256i xi = _mm256_loadu_si256((const __m256i*)(xb + 64 * i));
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c, xi));
            t = _mm256_add_epi8(t, _mm256_add_epi8(t, t));                          // t_{i+1}
          }
          a16[r] = _mm256_add_epi16(a16[r], s);
        }
      }
    }
    for (int r = 0; r < RT; ++r) acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(a16[r], ones));
  }
  int32_t* o = a.out + m * a.ldo + n;
  for (int r = 0; r < RT; ++r) o[r] = hsum(acc[r]) - a.xsum[m];
}

}  // namespace

void tq1_gemm_avx2(const Tq1Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) tile<2>(a, m, n);
    for (; n < n1; ++n) tile<1>(a, m, n);
  }
}

}  // namespace bitnet
