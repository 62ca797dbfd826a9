// Scalar emulation of the NEON intrinsics kernel_neon.cpp uses, to test its logic on x86 build
// machines (see build_emu_selftest.sh). Test-only; semantics per the Arm intrinsics reference.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

template <class T, int N> struct emu_vec { T v[N]; };
typedef emu_vec<uint8_t, 16> uint8x16_t;
typedef emu_vec<int8_t, 16> int8x16_t;
typedef emu_vec<int8_t, 8> int8x8_t;
typedef emu_vec<int16_t, 8> int16x8_t;
typedef emu_vec<int16_t, 4> int16x4_t;
typedef emu_vec<int32_t, 4> int32x4_t;
typedef emu_vec<float, 4> float32x4_t;

template <class V, class T> inline V emu_dup(T x) { V r; for (auto& e : r.v) e = x; return r; }
inline uint8x16_t vdupq_n_u8(uint8_t x) { return emu_dup<uint8x16_t>(x); }
inline int16x8_t vdupq_n_s16(int16_t x) { return emu_dup<int16x8_t>(x); }
inline int32x4_t vdupq_n_s32(int32_t x) { return emu_dup<int32x4_t>(x); }
inline float32x4_t vdupq_n_f32(float x) { return emu_dup<float32x4_t>(x); }
inline uint8x16_t vld1q_u8(const uint8_t* p) { uint8x16_t r; std::memcpy(r.v, p, 16); return r; }
inline int8x16_t vld1q_s8(const int8_t* p) { int8x16_t r; std::memcpy(r.v, p, 16); return r; }
inline float32x4_t vld1q_f32(const float* p) { float32x4_t r; std::memcpy(r.v, p, 16); return r; }
inline void vst1_s8(int8_t* p, int8x8_t a) { std::memcpy(p, a.v, 8); }
inline uint8x16_t vandq_u8(uint8x16_t a, uint8x16_t b) { for (int i = 0; i < 16; ++i) a.v[i] &= b.v[i]; return a; }
inline uint8x16_t vshrq_n_u8(uint8x16_t a, int n) { for (auto& e : a.v) e = (uint8_t)(e >> n); return a; }
inline int8x16_t vreinterpretq_s8_u8(uint8x16_t a) { int8x16_t r; std::memcpy(r.v, a.v, 16); return r; }
inline int8x8_t vget_low_s8(int8x16_t a) { int8x8_t r; std::memcpy(r.v, a.v, 8); return r; }
inline int32x4_t vdotq_s32(int32x4_t acc, int8x16_t a, int8x16_t b) {
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) acc.v[i] += (int32_t)a.v[4 * i + j] * b.v[4 * i + j];
  return acc;
}
inline int16x8_t vmlal_s8(int16x8_t acc, int8x8_t a, int8x8_t b) {
  for (int i = 0; i < 8; ++i) acc.v[i] = (int16_t)(acc.v[i] + a.v[i] * b.v[i]);
  return acc;
}
inline int16x8_t vmlal_high_s8(int16x8_t acc, int8x16_t a, int8x16_t b) {
  for (int i = 0; i < 8; ++i) acc.v[i] = (int16_t)(acc.v[i] + a.v[8 + i] * b.v[8 + i]);
  return acc;
}
inline int32x4_t vpadalq_s16(int32x4_t acc, int16x8_t a) {
  for (int i = 0; i < 4; ++i) acc.v[i] += (int32_t)a.v[2 * i] + a.v[2 * i + 1];
  return acc;
}
inline int32_t vaddvq_s32(int32x4_t a) { return a.v[0] + a.v[1] + a.v[2] + a.v[3]; }
inline float32x4_t vabsq_f32(float32x4_t a) { for (auto& e : a.v) e = std::fabs(e); return a; }
inline float32x4_t vmaxq_f32(float32x4_t a, float32x4_t b) {
  for (int i = 0; i < 4; ++i) a.v[i] = (std::isnan(a.v[i]) || std::isnan(b.v[i])) ? NAN : (a.v[i] > b.v[i] ? a.v[i] : b.v[i]);
  return a;
}
inline float32x4_t vminq_f32(float32x4_t a, float32x4_t b) {
  for (int i = 0; i < 4; ++i) a.v[i] = (std::isnan(a.v[i]) || std::isnan(b.v[i])) ? NAN : (a.v[i] < b.v[i] ? a.v[i] : b.v[i]);
  return a;
}
inline float vmaxvq_f32(float32x4_t a) { float m = a.v[0]; for (float e : a.v) m = e > m ? e : m; return m; }
inline float32x4_t vmulq_f32(float32x4_t a, float32x4_t b) { for (int i = 0; i < 4; ++i) a.v[i] *= b.v[i]; return a; }
inline int32x4_t vcvtnq_s32_f32(float32x4_t a) {
  int32x4_t r; for (int i = 0; i < 4; ++i) r.v[i] = std::isnan(a.v[i]) ? 0 : (int32_t)std::nearbyint(a.v[i]); return r;
}
inline int16x4_t vmovn_s32(int32x4_t a) { int16x4_t r; for (int i = 0; i < 4; ++i) r.v[i] = (int16_t)a.v[i]; return r; }
inline int16x8_t vcombine_s16(int16x4_t a, int16x4_t b) {
  int16x8_t r; std::memcpy(r.v, a.v, 8); std::memcpy(r.v + 4, b.v, 8); return r;
}
inline int8x8_t vmovn_s16(int16x8_t a) { int8x8_t r; for (int i = 0; i < 8; ++i) r.v[i] = (int8_t)a.v[i]; return r; }
