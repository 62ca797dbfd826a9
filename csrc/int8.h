// Int8 x int8 GEMM/GEMV (the int8 LM head): internal interface between int8.cpp, int8_avx2.cpp and the
// ISA resolver (isa.cpp).
//
//   acc[m, n] = sum_k x[m, k] * w[n, k]          (exact int32; |x|, |w| <= 128, K <= 131072)
//   y[m, n]   = acc[m, n] * w_scale[n] / x_scale[m] (+ bias[n])   (float32, this order)
#pragma once
#include <cstdint>
#include <functional>

#include "kernels.h"
#include "native_services.h"

namespace bitnet {

struct Int8Args {
  const int8_t* x;    // (M, ldx)
  int64_t ldx;
  const int8_t* w;    // (N, ldw)
  int64_t ldw;
  int64_t K;
  int32_t* out;       // (M, ldo)
  int64_t ldo;
};

// Computes out[m0:m1, n0:n1].
typedef void (*int8_gemm_fn)(const Int8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

void int8_gemm_scalar(const Int8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
#if defined(BITNET_HAVE_AVX2)
void int8_gemm_avx2(const Int8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
#endif

}  // namespace bitnet
