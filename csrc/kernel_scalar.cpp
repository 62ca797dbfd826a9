// Portable C++ kernel (any CPU). Also the fallback quantiser used by every ISA for tails.
#include <cmath>

#include "kernels.h"

namespace bitnet {

float absmax_scalar(const float* x, int64_t K) {
  float m = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    float a = std::fabs(x[k]);
    m = a > m ? a : m;
  }
  return m;
}

// Round half to even of |v| < 2^22 by the 1.5*2^23 trick (exact in the default rounding mode).
// Built with -ffp-contract=off and without -ffast-math so the compiler keeps both additions.
static inline float rint_small(float v) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  volatile float t = v + magic;     // volatile: never folded, never fused
  return t - magic;
}

void quant_scalar(const float* x, int64_t K, float s, float lo, float hi, int8_t* xq) {
  for (int64_t k = 0; k < K; ++k) {
    float v = x[k] * s;                    // float32 product, as torch: xf * s
    v = v > lo ? v : lo;                   // clamp before rounding == after (bounds are integers);
    v = v < hi ? v : hi;                   // NaN ends at lo
    xq[k] = (int8_t)(int)rint_small(v);    // torch.round: half to even
  }
}

static void gemm_scalar(const GemmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* xr = a.x + m * a.ldx;
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wr = a.w + n * a.ldw;
      int32_t acc = 0;
      for (int64_t b = 0; b < a.nblk; ++b) {
        const uint8_t* wb = wr + 32 * b;
        const int8_t* xb = xr + 128 * b;
        int32_t s = 0;
        for (int j = 0; j < 32; ++j) {
          const int v = wb[j];
          s += (v & 3) * xb[j] + ((v >> 2) & 3) * xb[32 + j] + ((v >> 4) & 3) * xb[64 + j] + (v >> 6) * xb[96 + j];
        }
        acc += s;
      }
      a.out[m * a.ldo + n] = acc - a.xsum[m];
    }
  }
}

Kernel kernel_scalar() { return Kernel{gemm_scalar, absmax_scalar, quant_scalar, 0}; }

}  // namespace bitnet
