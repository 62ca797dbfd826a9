// Activation quantiser of the native backend: per-token absmax int8 codes and scales, non-finite rows,
// the RMSNorm folded into the quantisation of bitnet_bitlinear_multi. See quantize.h.
#include "quantize.h"

#include "float_clones.h"
#include "native_services.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace bitnet {
namespace {

// s = (1 / max(amax, eps)) * Qp in float32, exactly as torch evaluates `qp / amax.clamp(min=eps)`
// (Tensor.__rtruediv__ is reciprocal() * other).
float act_scale(float amax, float eps, int qp) {
  const float a = amax < eps ? eps : amax;
  const float r = 1.0f / a;
  return r * (float)qp;
}

// sum_k x[k]^2 in float64 (each square is exact), in 32 interleaved partial sums (acc[l] takes k = l mod 32)
// added pairwise (l + 16, then + 8, 4, 2, 1): a fixed order (the same result on every ISA and thread
// count) with 4 independent chains of 8-double vectors, not one long chain of dependent adds.
BITNET_FLOAT_CLONES double sum_squares(const float* x, int64_t K) {
  constexpr int kParts = 32;
  double acc[kParts] = {};
  int64_t i = 0;
  for (; i + kParts <= K; i += kParts)
    for (int l = 0; l < kParts; ++l) acc[l] += (double)x[i + l] * (double)x[i + l];
  for (int l = 0; i < K; ++i, ++l) acc[l] += (double)x[i] * (double)x[i];
  for (int w = kParts / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// r = 1 / sqrt(mean_k x[k]^2 + eps): the RMSNorm factor of one row (sum of squares in float64)
float rms_factor(const float* x, int64_t K, float eps) {
  return 1.0f / std::sqrt((float)(sum_squares(x, K) / (double)K) + eps);
}

// y[i] = (x[i] * r) * w[i]: RMSNorm's scaling of one row by its factor r and the norm weight
BITNET_FLOAT_CLONES void scale_row(const float* x, float r, const float* w, int64_t K, float* y) {
  for (int64_t i = 0; i < K; ++i) y[i] = (x[i] * r) * w[i];
}

// The bit pattern of |v| (sign bit cleared) as uint32.
inline uint32_t abs_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u & 0x7fffffffu;
}

// The largest abs_bits of v[0..K). Non-negative floats order as their bit patterns do, so for a finite
// row this is max |v[i]| bit for bit (what every kernel's absmax returns), and it is >= kNonFiniteBits
// (all exponent bits set) exactly when some v[i] is infinite or NaN: the non-finite check and the absmax
// in one integer max reduction, which the compiler vectorises. (The kernels' absmax skips NaN, so this
// is the check that keeps a non-finite row from being quantised as if it were finite.)
constexpr uint32_t kNonFiniteBits = 0x7f800000u;
BITNET_FLOAT_CLONES uint32_t abs_bits_max(const float* v, int64_t K) {
  uint32_t m = 0;
  for (int64_t i = 0; i < K; ++i) m = std::max(m, abs_bits(v[i]));
  return m;
}

// scale_row (y[i] = (x[i] * r) * w[i]) and abs_bits_max of y in one pass.
BITNET_FLOAT_CLONES uint32_t scale_row_abs_bits_max(const float* x, float r, const float* w, int64_t K, float* y) {
  uint32_t m = 0;
  for (int64_t i = 0; i < K; ++i) {
    y[i] = (x[i] * r) * w[i];
    m = std::max(m, abs_bits(y[i]));
  }
  return m;
}

// max |x| of a finite row from its abs_bits_max
inline float abs_max_of(uint32_t bits) {
  float a;
  std::memcpy(&a, &bits, 4);
  return a;
}

// Scale of a non-finite row, as bitnet.quant.activation_quant_int8 computes it: Qp / max|x| is NaN
// when the row holds a NaN, else 0 (max|x| = inf). Its codes are all 0 (torch turns NaN into int8 0),
// so every output of the row is NaN (0 / 0 or 0 / NaN in the float epilogue), as in the reference.
float nonfinite_scale(const float* x, int64_t K) {
  for (int64_t i = 0; i < K; ++i)
    if (x[i] != x[i]) return std::numeric_limits<float>::quiet_NaN();
  return 0.0f;
}

}  // namespace

// Per-token absmax quantisation of x (M, K) float32 into the kernel layout of xb; xs[m] = scale.
// With norm_weight, each row is first RMS-normalised as bitnet.nn.RMSNorm does in float32:
//   y = (x * rsqrt(mean(x^2) + norm_eps)) * norm_weight
void quantize_rows(const Kernel& k, const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps,
                   const float* norm_weight, float norm_eps, XBuf& xb, float* xs) {
  prepare(xb, M, K, k);
  const int qp = (1 << (bits - 1)) - 1;
  const bool inter = k.pair_interleave != 0;
  for_tokens(M, K, [&](int64_t m0, int64_t m1) {
    std::vector<float> normed(norm_weight ? (size_t)K : 0);
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = x + m * ldx;
      uint32_t amax_bits;  // |x| max and non-finite check in one pass (abs_bits_max)
      if (norm_weight) {   // native_rms_norm_row, fused with that pass
        amax_bits = scale_row_abs_bits_max(xr, rms_factor(xr, K, norm_eps), norm_weight, K, normed.data());
        xr = normed.data();
      } else {
        amax_bits = abs_bits_max(xr, K);
      }
      int8_t* dst = xb.x.data() + m * xb.ldx;
      if (amax_bits >= kNonFiniteBits) {     // NaN / inf row: codes 0, scale NaN or 0 (see nonfinite_scale)
        xs[m] = nonfinite_scale(xr, K);
        std::memset(dst, 0, (size_t)xb.ldx);
        xb.sum[m] = 0;
        continue;
      }
      const float s = act_scale(abs_max_of(amax_bits), eps, qp);
      xs[m] = s;
      if (!inter) {
        k.quant(xr, K, s, (float)(-qp - 1), (float)qp, dst);
        std::memset(dst + K, 0, (size_t)(xb.ldx - K));
        int32_t sum = 0;
        for (int64_t i = 0; i < K; ++i) sum += dst[i];
        xb.sum[m] = sum;
      } else {
        xb.sum[m] = quantize_interleaved(k, xr, K, s, (float)(-qp - 1), (float)qp, dst, xb.ldx);
      }
    }
  });
}

void quantize_act(const Kernel& k, const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps,
                  int8_t* xq, int64_t ldq, float* scale) {
  const int qp = (1 << (bits - 1)) - 1;
  for_tokens(M, K, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const uint32_t amax_bits = abs_bits_max(x + m * ldx, K);
      if (amax_bits >= kNonFiniteBits) {     // NaN / inf row: codes 0, scale NaN or 0 (see nonfinite_scale)
        scale[m] = nonfinite_scale(x + m * ldx, K);
        std::memset(xq + m * ldq, 0, (size_t)K);
        continue;
      }
      const float s = act_scale(abs_max_of(amax_bits), eps, qp);
      scale[m] = s;
      k.quant(x + m * ldx, K, s, (float)(-qp - 1), (float)qp, xq + m * ldq);
    }
  });
}

// The RMSNorm of one row (native_services.h): r = 1 / sqrt(mean_k x[k]^2 + eps), y = (x * r) * w.
void native_rms_norm_row(const float* x, int64_t K, float eps, const float* w, float* y) {
  scale_row(x, rms_factor(x, K, eps), w, K, y);
}

}  // namespace bitnet
