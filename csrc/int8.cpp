// Int8 weights x int8 activations (the int8 LM head of bitnet.nn.Int8Linear): scalar kernel, the int8
// GEMM on the shared tiler (driver.h) and ISA resolver (isa.h), and the C ABI functions bitnet_int8_matmul_int / bitnet_int8_linear (see bitnet_native.h).
#include <algorithm>
#include <cstring>
#include <vector>

#include "bitnet_native.h"
#include "driver.h"
#include "int8.h"
#include "isa.h"

namespace bitnet {

void int8_gemm_scalar(const Int8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* xr = a.x + m * a.ldx;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wr = a.w + n * a.ldw;
      int32_t acc = 0;
      for (int64_t k = 0; k < a.K; ++k) acc += (int32_t)xr[k] * (int32_t)wr[k];
      a.out[m * a.ldo + n] = acc;
    }
  }
}

namespace {

struct Epi {
  const float* x_scale = nullptr;  // (M,) or null: int32 output
  const float* w_scale = nullptr;  // (N,)
  const float* bias = nullptr;     // (N,) or null
};

void epilogue(const Epi& e, int32_t* out, int64_t ldo, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (e.x_scale) float_epilogue(out, ldo, m0, m1, n0, n1, e.x_scale, 0.0f, e.w_scale, e.bias);
}

void run(int8_gemm_fn g, const Int8Args& a0, int64_t M, int64_t N, const Epi& e) {
  if (M == 0 || N == 0) return;
  Int8Args a = a0;
#if defined(BITNET_HAVE_AMX)
  thread_local std::vector<int8_t> xv;  // AMX: x in the B-tile layout, once per call for all tasks
  if (g == int8_gemm_amx) {
    xv.resize((size_t)int8_amx_xv_bytes(M, a.K));
    int8_amx_layout_x(a.x, a.ldx, M, a.K, xv.data());
    a.xv = xv.data();
  }
#endif
#if defined(BITNET_HAVE_INT8_AVX512VNNI)
  thread_local std::vector<int32_t> xsum;  // AVX-512 VNNI: sum_k x[m, k], the unsigned-operand correction
  if (g == int8_gemm_avx512vnni) {
    xsum.resize((size_t)M);
    for (int64_t m = 0; m < M; ++m) xsum[(size_t)m] = sum_int8(a.x + m * a.ldx, a.K);
    a.xsum = xsum.data();
  }
#endif
  const int64_t nthreads = native_threads();
  if (nthreads == 1 || M * N * a.K < (1 << 18)) {
    g(a, 0, M, 0, N);
    epilogue(e, a.out, a.ldo, 0, M, 0, N);
    return;
  }
  // Tiles of MB tokens x NB rows; decode (small M): many row chunks so no thread waits on a slow one.
  int64_t MB = 32;
#if defined(BITNET_HAVE_AMX)
  if (g == int8_gemm_amx) MB = 64;  // one weight A tile serves up to 4 blocks of 16 tokens
#endif
  parallel_tiles(M, N, MB, M <= 4 ? 256 : 64, 16, 8, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    g(a, m0, m1, n0, n1);
    epilogue(e, a.out, a.ldo, m0, m1, n0, n1);
  });
}

int check(int64_t M, int64_t K, int64_t ldx, int64_t N, int64_t ldw, int64_t ldo) {
  if (M < 0 || K < 0 || N < 0 || ldx < K || ldw < K || ldo < N || K > 131072) return BITNET_EINVAL;
  return BITNET_OK;
}

}  // namespace
}  // namespace bitnet

using namespace bitnet;

extern "C" {

int bitnet_int8_matmul_int(const int8_t* x, int64_t M, int64_t K, int64_t ldx, const int8_t* w, int64_t N,
                           int64_t ldw, int32_t* out, int64_t ldo, int isa) {
  int rc = check(M, K, ldx, N, ldw, ldo);
  if (rc) return rc;
  IsaKernels ks;
  if ((rc = resolve_isa(isa, &ks))) return rc;
  const Int8Args a{x, ldx, w, ldw, K, out, ldo};
  run(ks.int8, a, M, N, Epi{});
  return BITNET_OK;
}

int bitnet_int8_linear(const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps, const int8_t* w,
                       int64_t N, int64_t ldw, const float* w_scale, const float* bias, float* out, int64_t ldo,
                       int isa) {
  int rc = check(M, K, ldx, N, ldw, ldo);
  if (rc) return rc;
  if (bits < 2 || bits > 8) return BITNET_EINVAL;
  IsaKernels ks;
  if ((rc = resolve_isa(isa, &ks))) return rc;
  if (M == 0 || N == 0) return BITNET_OK;
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xs;
  const int64_t ldq = std::max<int64_t>(K, 1);
  if ((int64_t)xq.size() < M * ldq) xq.resize((size_t)(M * ldq));
  if ((int64_t)xs.size() < M) xs.resize((size_t)M);
  if ((rc = bitnet_quantize_act(x, M, K, ldx, bits, eps, xq.data(), ldq, xs.data(), ks.isa))) return rc;
  Epi e;
  e.x_scale = xs.data(); e.w_scale = w_scale; e.bias = bias;
  const Int8Args a{xq.data(), ldq, w, ldw, K, reinterpret_cast<int32_t*>(out), ldo};
  run(ks.int8, a, M, N, e);
  return BITNET_OK;
}

}  // extern "C"
