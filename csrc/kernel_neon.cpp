// NEON kernel (AArch64: Apple M-series, Graviton, Raspberry Pi 4/5 ...). Advanced SIMD is part of
// the AArch64 baseline, so no run-time check is needed. With the dot-product extension enabled by the
// compiler's target (__ARM_FEATURE_DOTPROD: default on Apple arm64, or -march=armv8.2-a+dotprod)
// vdotq_s32 does 4 products per lane; otherwise vmlal_s8 into int16 and vpadalq_s16 into int32.
//
// A 32-byte I2 block is read as two 16-byte halves h: codes c_q = (w >> 2q) & 3 of half h line up
// with activations x[32q + 16h .. 32q + 16h + 15]. Codes 0..2 are valid signed bytes.
#include <arm_neon.h>

#include "kernels.h"

namespace bitnet {
namespace {

template <int RT, int MT>
inline void tile(const GemmArgs& a, int64_t m, int64_t n) {
  const uint8x16_t m3 = vdupq_n_u8(3);
  const uint8_t* wr[RT];
  const int8_t* xr[MT];
  for (int r = 0; r < RT; ++r) wr[r] = a.w + (n + r) * a.ldw;
  for (int t = 0; t < MT; ++t) xr[t] = a.x + (m + t) * a.ldx;
  int32x4_t acc[RT][MT];
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < MT; ++t) acc[r][t] = vdupq_n_s32(0);
  for (int64_t b = 0; b < a.nblk; ++b) {
    for (int r = 0; r < RT; ++r) {
#if !defined(__ARM_FEATURE_DOTPROD)
      int16x8_t a16[MT];
      for (int t = 0; t < MT; ++t) a16[t] = vdupq_n_s16(0);   // <= 8 products of |.| <= 256 per lane
#endif
      for (int h = 0; h < 2; ++h) {
        const uint8x16_t wv = vld1q_u8(wr[r] + 32 * b + 16 * h);
        int8x16_t c[4];
        c[0] = vreinterpretq_s8_u8(vandq_u8(wv, m3));
        c[1] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(wv, 2), m3));
        c[2] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(wv, 4), m3));
        c[3] = vreinterpretq_s8_u8(vshrq_n_u8(wv, 6));
        for (int t = 0; t < MT; ++t) {
          const int8_t* xb = xr[t] + 128 * b + 16 * h;
          for (int q = 0; q < 4; ++q) {
            const int8x16_t xv = vld1q_s8(xb + 32 * q);
#if defined(__ARM_FEATURE_DOTPROD)
            acc[r][t] = vdotq_s32(acc[r][t], c[q], xv);
#else
            a16[t] = vmlal_s8(a16[t], vget_low_s8(c[q]), vget_low_s8(xv));
            a16[t] = vmlal_high_s8(a16[t], c[q], xv);
#endif
          }
        }
      }
#if !defined(__ARM_FEATURE_DOTPROD)
      for (int t = 0; t < MT; ++t) acc[r][t] = vpadalq_s16(acc[r][t], a16[t]);
#endif
    }
  }
  for (int t = 0; t < MT; ++t) {
    int32_t* o = a.out + (m + t) * a.ldo + n;
    const int32_t xs = a.xsum[m + t];
    for (int r = 0; r < RT; ++r) o[r] = vaddvq_s32(acc[r][t]) - xs;
  }
}

template <int RT, int MT>
inline void rows(const GemmArgs& a, int64_t m, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + RT <= n1; n += RT) tile<RT, MT>(a, m, n);
  for (; n < n1; ++n) tile<1, MT>(a, m, n);
}

void gemm_neon(const GemmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) rows<1, 4>(a, m, n0, n1);
  switch (m1 - m) {
    case 3: rows<1, 3>(a, m, n0, n1); break;
    case 2: rows<2, 2>(a, m, n0, n1); break;
    case 1: rows<4, 1>(a, m, n0, n1); break;
    default: break;
  }
}

float absmax_neon(const float* x, int64_t K) {
  float32x4_t mx = vdupq_n_f32(0.0f);
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) mx = vmaxq_f32(mx, vabsq_f32(vld1q_f32(x + k)));
  float r = vmaxvq_f32(mx);
  const float t = absmax_scalar(x + k, K - k);
  return t > r ? t : r;
}

void quant_neon(const float* x, int64_t K, float s, float lo, float hi, int8_t* xq) {
  const float32x4_t vs = vdupq_n_f32(s), vlo = vdupq_n_f32(lo), vhi = vdupq_n_f32(hi);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    int32x4_t i[2];
    for (int j = 0; j < 2; ++j) {
      float32x4_t v = vmulq_f32(vld1q_f32(x + k + 4 * j), vs);   // float32 product, as torch
      v = vminq_f32(vmaxq_f32(v, vlo), vhi);
      i[j] = vcvtnq_s32_f32(v);                                  // round to nearest, ties to even
    }
    const int16x8_t h = vcombine_s16(vmovn_s32(i[0]), vmovn_s32(i[1]));
    vst1_s8(xq + k, vmovn_s16(h));
  }
  quant_scalar(x + k, K - k, s, lo, hi, xq + k);
}

}  // namespace

Kernel kernel_neon() { return Kernel{gemm_neon, absmax_neon, quant_neon, 0}; }

}  // namespace bitnet
