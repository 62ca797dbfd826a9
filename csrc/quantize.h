// The activation quantiser of the native backend (per-token absmax int8, optionally after an RMSNorm):
// internal interface of quantize.cpp. Bit for bit as bitnet.quant.activation_quant_int8.
#pragma once
#include <cstdint>

#include "driver.h"
#include "kernels.h"

namespace bitnet {

// Per-token absmax quantisation of x (M, K) float32 into the kernel layout of xb; xs[m] = scale.
// With norm_weight, each row is first RMS-normalised as bitnet.nn.RMSNorm does in float32.
void quantize_rows(const Kernel& k, const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps,
                   const float* norm_weight, float norm_eps, XBuf& xb, float* xs);

// bitnet_quantize_act: x (M, K) -> xq (M, ldq) int8 (plain rows), scale (M,).
void quantize_act(const Kernel& k, const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps,
                  int8_t* xq, int64_t ldq, float* scale);

}  // namespace bitnet
