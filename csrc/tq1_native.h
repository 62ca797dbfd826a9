/* bitnet native CPU backend, experimental TQ1 weights (1.6 bits per weight): plain C ABI.
 *
 * Weights are in the TQ1 layout of bitnet.quant.tq1 (the one place it is defined):
 * uint8 (N, Kp/5), Kp = ceil(K/320)*320, codes c = W + 1 in {0,1,2}; a 320-weight block is 64 bytes,
 * byte j of block b holds k = 320b + 64i + j (i = 0..4) as the base-3 fraction
 * q = ceil(256 * sum_i c_i 3^(4-i) / 243), read back with t_0 = q, t_{i+1} = 3 t_i mod 256,
 * c_i = floor(3 t_i / 256).
 *
 * Integer product:  acc[m, n] = sum_k xq[m, k] * c[n, k] - sum_k xq[m, k]   (exact, int32).
 * Returns 0 or a negative BITNET_E* code (bitnet_native.h); isa = -1 means the default ISA.
 */
#ifndef BITNET_TQ1_NATIVE_H
#define BITNET_TQ1_NATIVE_H

#include "bitnet_native.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest K the kernels accept (their int32 accumulators are exact up to it). */
#define BITNET_TQ1_MAX_K 32767

/* out int32 (M, ldo) = x int8 (M, K; row stride ldx) @ W^T, W TQ1 (N, ldw >= ceil(K/320)*64). */
BITNET_API int bitnet_tq1_matmul_int(const int8_t* x, int64_t M, int64_t K, int64_t ldx,
                                     const uint8_t* w, int64_t N, int64_t ldw,
                                     int32_t* out, int64_t ldo, int isa);

/* Fused, as bitnet_bitlinear: quantise x (M, K) float32 per token (bitnet_quantize_act), then
 *   out float (M, ldo) = acc * w_scale / x_scale[m] (+ bias[n]);  bias (N,) or NULL. */
BITNET_API int bitnet_tq1_bitlinear(const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps,
                                    const uint8_t* w, int64_t N, int64_t ldw, float w_scale, const float* bias,
                                    float* out, int64_t ldo, int isa);

/* Several TQ1 matrices that read the same input, as bitnet_bitlinear_multi (the same RMSNorm, quantiser
 * and epilogue, bit for bit): x (M, K) optionally RMS-normalised with norm_weight (K,), quantised once,
 * then matrix j (n[j] rows, row stride ldw, *w_scale[j], bias[j] or NULL) writes columns
 * [sum_{i<j} n[i], ... + n[j]) of out (M, ldo). The fused block (bitnet_block_forward) runs a
 * bitnet_linear_set with format BITNET_WEIGHTS_TQ1 through it. */
BITNET_API int bitnet_tq1_bitlinear_multi(const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps,
                                          const float* norm_weight, float norm_eps, int nmat,
                                          const uint8_t* const* w, const int64_t* n, int64_t ldw,
                                          const float* const* w_scale, const float* const* bias,
                                          float* out, int64_t ldo, int isa);

/* Name of the TQ1 kernel `isa` resolves to ("avx512vnni", "avx2", "scalar"), NULL if unsupported. */
BITNET_API const char* bitnet_tq1_kernel_name(int isa);

#ifdef __cplusplus
}
#endif
#endif
