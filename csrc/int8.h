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
  const int8_t* xv = nullptr;  // AMX only: x in the VNNI B-tile layout (int8_amx_layout_x), or null
  const int32_t* xsum = nullptr;  // AVX-512 VNNI only: (M,) sum_k x[m, k]
};

// Computes out[m0:m1, n0:n1].
typedef void (*int8_gemm_fn)(const Int8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

void int8_gemm_scalar(const Int8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
#if defined(BITNET_HAVE_AVX2)
void int8_gemm_avx2(const Int8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
#endif
#if defined(BITNET_HAVE_INT8_AVX512VNNI)
// AVX-512 VNNI (int8_avx512vnni.cpp). Needs a.xsum.
void int8_gemm_avx512vnni(const Int8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
#endif
#if defined(BITNET_HAVE_AMX)
// AMX-INT8 (int8_amx.cpp). Uses a.xv when set and m0 % 16 == 0, else lays out x[m0:m1] itself.
void int8_gemm_amx(const Int8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
// Bytes of the VNNI layout of x (M, K): ceil(M / 16) * ceil(K / 64) KB; fills it (zero padded).
int64_t int8_amx_xv_bytes(int64_t M, int64_t K);
void int8_amx_layout_x(const int8_t* x, int64_t ldx, int64_t M, int64_t K, int8_t* xv);
#endif

}  // namespace bitnet
