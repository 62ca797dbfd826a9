// Services of driver.cpp (thread pool, float epilogue) for the other drivers (int8.cpp, attention.cpp);
// the ISA resolver is isa.h.
#pragma once
#include <cstdint>
#include <functional>

#include "kernels.h"

namespace bitnet {

int native_threads();
// Rows per task of a decode (GEMV) over `rows` weight rows: ~4 tasks per pool thread, a multiple of 8, at
// least 16, so that no thread waits long on a slow one. Used by the I2 and TQ1 decode drivers.
int64_t decode_row_chunk(int64_t rows);
// y[i] = (x[i] * r) * w[i], r = 1 / sqrt(mean_k x[k]^2 + eps) (sum of squares in float64): the RMSNorm of
// one row as every native driver (I2 and TQ1) computes it, bit for bit.
void native_rms_norm_row(const float* x, int64_t K, float eps, const float* w, float* y);
void native_parallel_for(int64_t ntasks, const std::function<void(int64_t)>& fn);

// h[j] = act(g[j], u[j]) for j < n: the gate activation of a gated feed-forward (block.cpp).
using GateFn = std::function<void(const float* g, const float* u, int64_t n, float* h)>;
// The gated feed-forward input of a block, for M > 3 tokens: x (M, K) RMS-normalised by norm_weight and
// quantised once (as bitnet_bitlinear_multi), the I2 matrices gate and up (F rows each, ldw bytes per
// row, scales, biases or null), then h (M, F) = act(gate, up), fused per tile (driver.h: run_gated_gemm).
// Bit for bit bitnet_bitlinear_multi of the two matrices followed by act; BITNET_EINVAL on bad arguments.
int gated_bitlinear(const float* x, int64_t M, int64_t K, int bits, float eps, const float* norm_weight,
                    float norm_eps, const uint8_t* gate, const uint8_t* up, int64_t F, int64_t ldw, float gate_scale,
                    float up_scale, const float* gate_bias, const float* up_bias, const GateFn& act, float* h,
                    int isa);

// The float epilogue of every linear, in place over out[m0:m1, n0:n1] (int32 accumulators in, float32 out):
//   y = acc * w / x_scale[m] (+ bias[n]),  w = w_scale_n[n] (per output row) or w_scale when w_scale_n is null
// evaluated in this order in float32, as the torch reference does.
// The checks shared by the multi-matrix calls (bitnet_bitlinear_multi, bitnet_tq1_bitlinear_multi):
// at least one matrix, activation bits 2..8, norm_eps >= 0, row counts >= 0; *total = their sum.
inline int check_multi(int nmat, int bits, float norm_eps, const int64_t* n, int64_t* total) {
  if (nmat < 1 || bits < 2 || bits > 8 || !(norm_eps >= 0.0f)) return 1;
  *total = 0;
  for (int j = 0; j < nmat; ++j) {
    if (n[j] < 0) return 1;
    *total += n[j];
  }
  return 0;
}

void float_epilogue(int32_t* out, int64_t ldo, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                    const float* x_scale, float w_scale, const float* w_scale_n, const float* bias);

}  // namespace bitnet
