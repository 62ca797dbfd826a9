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

}  // namespace
}  // namespace bitnet
