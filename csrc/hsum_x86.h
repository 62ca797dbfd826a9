// Horizontal sums of the int32 lanes of a 256-bit (and 512-bit) vector, shared by the x86 kernels. Each kernel file
// is compiled with its own ISA flags: the anonymous namespace gives every file its own copy.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace bitnet {
namespace {

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

#if defined(__AVX512F__) || defined(BITNET_EMULATE)
// The 16 int32 lanes of a 512-bit vector (files compiled with AVX-512, or against csrc/emu).
inline int32_t hsum(__m512i v) {
  return hsum(_mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1)));
}
#endif

// The lane sums of four vectors as one vector (sum a, sum b, sum c, sum d): a 4-way transpose-reduce, 11
// instructions (256-bit) or 13 (512-bit) instead of 4 separate hsum (4 x 7 or 4 x 9), which weighed on the
// epilogue of short-K tiles (K = 1024: 4 block pairs per tile).
inline __m128i hsum4(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i ab = _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));  // a b a b per 128
  const __m256i cd = _mm256_add_epi32(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
  const __m256i abcd = _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));  // a b c d
  return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

#if defined(__AVX512F__) || defined(BITNET_EMULATE)
inline __m128i hsum4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}
#endif

// o[r] = (sum of the lanes of acc[r][t]) - sub for r < RT (wrapping int32 arithmetic): the epilogue of a
// register tile acc[RT][MT] for its token t, four rows at a time.
template <int RT, int MT, class V>
inline void store_row_sums(const V (&acc)[RT][MT], int t, int32_t sub, int32_t* o) {
  int r = 0;
  for (; r + 4 <= RT; r += 4) {
    const __m128i s = hsum4(acc[r][t], acc[r + 1][t], acc[r + 2][t], acc[r + 3][t]);
    _mm_storeu_si128((__m128i*)(o + r), _mm_sub_epi32(s, _mm_set1_epi32(sub)));
  }
  for (; r < RT; ++r) o[r] = (int32_t)((uint32_t)hsum(acc[r][t]) - (uint32_t)sub);
}

}  // namespace
}  // namespace bitnet
