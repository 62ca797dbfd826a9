// Scalar emulation of the x86 intrinsics the AVX-VNNI and AVX-512 VNNI kernels use, so that their
// logic (layouts, tails, reductions) can be tested on CPUs without those instructions:
//   g++ -Icsrc/emu -Icsrc -DBITNET_EMULATE ... (see csrc/emu/build_emu_selftest.sh). Test-only.
#pragma once
#include <cstdint>
#include <cstring>

struct __m128i { int8_t b[16]; };
struct __m256i { int8_t b[32]; };
struct __m512i { int8_t b[64]; };
typedef uint64_t __mmask64;

template <class V> inline V emu_zero() { V v; std::memset(&v, 0, sizeof v); return v; }
template <class V> inline V emu_set1_epi8(char c) { V v; std::memset(&v, c, sizeof v); return v; }
template <class V> inline V emu_load(const void* p) { V v; std::memcpy(&v, p, sizeof v); return v; }
template <class V> inline V emu_and(V a, V b) { for (size_t i = 0; i < sizeof a; ++i) a.b[i] &= b.b[i]; return a; }
template <class V> inline V emu_srli16(V a, int n) {
  uint16_t w[sizeof a / 2]; std::memcpy(w, &a, sizeof a);
  for (auto& x : w) x = (uint16_t)(x >> n);
  std::memcpy(&a, w, sizeof a); return a;
}
template <class V> inline V emu_add32(V a, V b) {
  int32_t x[sizeof a / 4], y[sizeof a / 4]; std::memcpy(x, &a, sizeof a); std::memcpy(y, &b, sizeof b);
  for (size_t i = 0; i < sizeof a / 4; ++i) x[i] = (int32_t)((uint32_t)x[i] + (uint32_t)y[i]);
  std::memcpy(&a, x, sizeof a); return a;
}
template <class V> inline V emu_dpbusd(V acc, V u, V s) {  // u: unsigned bytes, s: signed bytes
  int32_t x[sizeof acc / 4]; std::memcpy(x, &acc, sizeof acc);
  for (size_t i = 0; i < sizeof acc / 4; ++i)
    for (int j = 0; j < 4; ++j) x[i] += (int32_t)(uint8_t)u.b[4 * i + j] * (int32_t)s.b[4 * i + j];
  std::memcpy(&acc, x, sizeof acc); return acc;
}

inline __m512i _mm512_setzero_si512() { return emu_zero<__m512i>(); }
inline __m512i _mm512_set1_epi8(char c) { return emu_set1_epi8<__m512i>(c); }
inline __m512i _mm512_loadu_si512(const void* p) { return emu_load<__m512i>(p); }
inline __m512i _mm512_maskz_loadu_epi8(__mmask64 k, const void* p) {
  __m512i v = emu_zero<__m512i>();
  for (int i = 0; i < 64; ++i) if ((k >> i) & 1) v.b[i] = ((const int8_t*)p)[i];  // masked-off bytes not read
  return v;
}
inline __m512i _mm512_and_si512(__m512i a, __m512i b) { return emu_and(a, b); }
inline __m512i _mm512_srli_epi16(__m512i a, unsigned n) { return emu_srli16(a, (int)n); }
inline __m512i _mm512_dpbusd_epi32(__m512i acc, __m512i u, __m512i s) { return emu_dpbusd(acc, u, s); }
inline __m256i _mm512_castsi512_si256(__m512i a) { __m256i r; std::memcpy(&r, &a, 32); return r; }
inline __m256i _mm512_extracti64x4_epi64(__m512i a, int i) { __m256i r; std::memcpy(&r, a.b + 32 * i, 32); return r; }

inline __m256i _mm256_setzero_si256() { return emu_zero<__m256i>(); }
inline __m256i _mm256_set1_epi8(char c) { return emu_set1_epi8<__m256i>(c); }
inline __m256i _mm256_loadu_si256(const __m256i* p) { return emu_load<__m256i>(p); }
inline __m256i _mm256_and_si256(__m256i a, __m256i b) { return emu_and(a, b); }
inline __m256i _mm256_srli_epi16(__m256i a, int n) { return emu_srli16(a, n); }
inline __m256i _mm256_add_epi32(__m256i a, __m256i b) { return emu_add32(a, b); }
inline __m256i _mm256_dpbusd_avx_epi32(__m256i acc, __m256i u, __m256i s) { return emu_dpbusd(acc, u, s); }
inline __m128i _mm256_castsi256_si128(__m256i a) { __m128i r; std::memcpy(&r, &a, 16); return r; }
inline __m128i _mm256_extracti128_si256(__m256i a, int i) { __m128i r; std::memcpy(&r, a.b + 16 * i, 16); return r; }

inline __m128i _mm_add_epi32(__m128i a, __m128i b) { return emu_add32(a, b); }
inline __m128i _mm_shuffle_epi32(__m128i a, int imm) {
  int32_t x[4], r[4]; std::memcpy(x, &a, 16);
  for (int i = 0; i < 4; ++i) r[i] = x[(imm >> (2 * i)) & 3];
  std::memcpy(&a, r, 16); return a;
}
// unpack{lo,hi}: per 128-bit lane, interleave the low (high) halves of a and b in units of E bytes
template <class V, int E> inline V emu_unpack(V a, V b, bool hi) {
  V r;
  for (size_t lane = 0; lane < sizeof a; lane += 16)
    for (int i = 0; i < 8 / E; ++i) {
      const size_t from = lane + (hi ? 8 : 0) + E * i;
      std::memcpy(r.b + lane + 2 * E * i, a.b + from, E);
      std::memcpy(r.b + lane + 2 * E * i + E, b.b + from, E);
    }
  return r;
}
inline __m512i _mm512_add_epi32(__m512i a, __m512i b) { return emu_add32(a, b); }
inline __m512i _mm512_unpacklo_epi32(__m512i a, __m512i b) { return emu_unpack<__m512i, 4>(a, b, false); }
inline __m512i _mm512_unpackhi_epi32(__m512i a, __m512i b) { return emu_unpack<__m512i, 4>(a, b, true); }
inline __m512i _mm512_unpacklo_epi64(__m512i a, __m512i b) { return emu_unpack<__m512i, 8>(a, b, false); }
inline __m512i _mm512_unpackhi_epi64(__m512i a, __m512i b) { return emu_unpack<__m512i, 8>(a, b, true); }
inline __m256i _mm256_unpacklo_epi32(__m256i a, __m256i b) { return emu_unpack<__m256i, 4>(a, b, false); }
inline __m256i _mm256_unpackhi_epi32(__m256i a, __m256i b) { return emu_unpack<__m256i, 4>(a, b, true); }
inline __m256i _mm256_unpacklo_epi64(__m256i a, __m256i b) { return emu_unpack<__m256i, 8>(a, b, false); }
inline __m256i _mm256_unpackhi_epi64(__m256i a, __m256i b) { return emu_unpack<__m256i, 8>(a, b, true); }
inline __m128i _mm_set1_epi32(int v) { __m128i r; for (int i = 0; i < 4; ++i) std::memcpy(r.b + 4 * i, &v, 4); return r; }
inline __m128i _mm_sub_epi32(__m128i a, __m128i b) {
  int32_t x[4], y[4]; std::memcpy(x, &a, 16); std::memcpy(y, &b, 16);
  for (int i = 0; i < 4; ++i) x[i] = (int32_t)((uint32_t)x[i] - (uint32_t)y[i]);
  std::memcpy(&a, x, 16); return a;
}
inline void _mm_storeu_si128(__m128i* p, __m128i a) { std::memcpy(p, &a, 16); }
inline int _mm_cvtsi128_si32(__m128i a) { int32_t x; std::memcpy(&x, &a, 4); return x; }
inline void _mm_pause() {}
#define _MM_HINT_T0 3
#define _MM_HINT_T1 2
inline void _mm_prefetch(const char*, int) {}
