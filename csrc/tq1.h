// TQ1 GEMV/GEMM (experimental 1.6-bit weights): internal interface between tq1_api.cpp and the
// per-ISA kernel_tq1_*.cpp files. Layout: bitnet.quant.tq1 / tq1_native.h.
#pragma once
#include <cstdint>

namespace bitnet {

struct Tq1Args {
  const int8_t* x;      // (M, ldx) int8, zero padded up to nblk * 320
  int64_t ldx;
  const int32_t* xsum;  // (M,) sum_k x[m, k]
  const uint8_t* w;     // (N, ldw) TQ1 rows
  int64_t ldw;
  int64_t nblk;         // 320-weight blocks per row (64 bytes each)
  int32_t* out;         // (M, ldo)
  int64_t ldo;
};

// out[m*ldo + n] = sum_k x[m,k] * c[n,k] - xsum[m]   for m in [m0, m1), n in [n0, n1)
typedef void (*tq1_gemm_fn)(const Tq1Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

void tq1_gemm_scalar(const Tq1Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
#if defined(BITNET_HAVE_AVX2)
void tq1_gemm_avx2(const Tq1Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
#endif
#if defined(BITNET_HAVE_AVX512VNNI)
void tq1_gemm_avx512vnni(const Tq1Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
#endif

}  // namespace bitnet
