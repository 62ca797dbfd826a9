// Internal interface between the driver (driver.cpp, isa.cpp) and the per-ISA kernels (kernel_*.cpp).
// Each kernel file is compiled with its own target flags; isa.cpp picks one at run time.
#pragma once
#include <cstddef>
#include <cstdint>

namespace bitnet {

// Activations as the kernels read them: one row per token, Kx bytes, zero padded past K.
// Layout "natural": x[k]. Layout "pair interleaved" (512-bit kernels): for block pair p,
// quarter q (0..3), half h (0..1), lane j (0..31):  xi[256p + 64q + 32h + j] = x[128(2p+h) + 32q + j],
// so that one 64-byte weight load (blocks 2p, 2p+1) lines up with 64 contiguous activations.
struct GemmArgs {
  const int8_t* x;      // (M, ldx) int8
  int64_t ldx;
  const int32_t* xsum;  // (M,) sum_k x[m, k]
  const uint8_t* w;     // (N, ldw) I2 rows
  int64_t ldw;
  int64_t nblk;         // 128-weight blocks per row (Kp / 128)
  int32_t* out;         // (M, ldo)
  int64_t ldo;
};

// out[m*ldo + n] = sum_k x[m,k] * c[n,k] - xsum[m]   for m in [m0, m1), n in [n0, n1)
typedef void (*gemm_fn)(const GemmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

// xq[k] = clamp(round_half_even(x[k] * s), lo, hi) for k < K (float32 arithmetic, as torch).
// Returns max_k |x[k]| when called with s < 0 (first pass), see quantize_row.
typedef float (*absmax_fn)(const float* x, int64_t K);
typedef void (*quant_fn)(const float* x, int64_t K, float s, float lo, float hi, int8_t* xq);

// Prefill-sized GEMM on a matrix unit (AMX): the driver builds, once per call, the activations in the
// "VNNI" layout: for each group of 16 tokens (m / 16), for each 4-byte k group g of the kernel layout,
// 64 bytes = 16 tokens x 4 values:  xv[(m / 16) * 16 * ldx + 64 g + 4 (m % 16) + i] = x[m * ldx + 4 g + i]
// (zero for the padding tokens up to a multiple of 16).
struct PanelEpilogue {
  const float* x_scale;  // (M,): float output y = acc * w_scale / x_scale[m] (+ bias[n]); null: int32
  float w_scale;
  const float* bias;     // (N,) or null
};
// out[m, n] for m in [m0, m1), n in [n0, n1); m0 a multiple of 16, m1 - m0 <= kPanelMaxM.
typedef void (*panel_fn)(const GemmArgs& a, const int8_t* xv, const PanelEpilogue& e, int64_t m0, int64_t m1,
                         int64_t n0, int64_t n1);

// Writes token group g (tokens 16g .. 16g + 15 of x (M, ldx), ldx a multiple of 64) of xv.
typedef void (*panel_pack_fn)(const int8_t* x, int64_t ldx, int64_t M, int64_t g, int8_t* xv);

// Peak probe: `iters` rounds of the ISA's int8 multiply-accumulate on registers only (independent
// accumulators, no memory traffic); returns the number of multiply-adds done (bench: % of peak).
typedef int64_t (*peak_fn)(int64_t iters);

struct Kernel {
  gemm_fn gemm;
  absmax_fn absmax;
  quant_fn quant;
  int pair_interleave;                // 1: activations in the pair-interleaved layout above
  panel_fn panel = nullptr;           // set: GEMMs of M >= kPanelMinM tokens go through it (epilogue fused)
  panel_pack_fn panel_pack = nullptr; // the activation layout `panel` reads
  peak_fn peak = nullptr;
};

// Below this many tokens the vector kernel is faster than the matrix unit (A/B on a Sapphire Rapids
// class Xeon, 2B4T shapes: AMX 0.6-0.95x of AVX-512 VNNI at 4 tokens, 0.9-1.7x at 8, 1.4-2.5x at 12).
constexpr int64_t kPanelMinM = 8;
constexpr int64_t kPanelMaxM = 128;   // tokens per panel call: the driver splits M into such chunks

// Portable helpers shared by all kernels (defined in kernel_scalar.cpp).
float absmax_scalar(const float* x, int64_t K);
void quant_scalar(const float* x, int64_t K, float s, float lo, float hi, int8_t* xq);

Kernel kernel_scalar();
#if defined(BITNET_HAVE_AVX2)
Kernel kernel_avx2();
#endif
#if defined(BITNET_HAVE_AVXVNNI)
Kernel kernel_avxvnni();
#endif
#if defined(BITNET_HAVE_AVX512VNNI)
Kernel kernel_avx512vnni();
#endif
#if defined(BITNET_HAVE_AMX)
Kernel kernel_amx();
#endif
#if defined(BITNET_HAVE_NEON)
Kernel kernel_neon();
#endif

}  // namespace bitnet
