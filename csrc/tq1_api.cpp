// Experimental TQ1 weights (1.6 bits per weight, bitnet.quant.tq1): driver (activation layout, work
// split over the thread pool), the portable scalar kernel and the C ABI of tq1_native.h.
#include <algorithm>
#include <cstring>
#include <vector>

#include "isa.h"
#include "native_services.h"
#include "tq1.h"
#include "tq1_native.h"

namespace bitnet {

// Scalar kernel: digits read with t_{i+1} = 3 t_i mod 256, c_i = floor(3 t_i / 256) (the layout's (1)).
void tq1_gemm_scalar(const Tq1Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* xr = a.x + m * a.ldx;
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wr = a.w + n * a.ldw;
      int32_t acc = 0;
      for (int64_t b = 0; b < a.nblk; ++b) {
        const int8_t* xb = xr + 320 * b;
        for (int j = 0; j < 64; ++j) {
          uint32_t t = wr[64 * b + j];
          for (int i = 0; i < 5; ++i) {
            const uint32_t t3 = 3 * t;
            acc += (int32_t)(t3 >> 8) * xb[64 * i + j];   // c_i * x[320 b + 64 i + j]
            t = t3 & 255;
          }
        }
      }
      a.out[m * a.ldo + n] = acc - a.xsum[m];
    }
  }
}

namespace {

struct Choice {
  tq1_gemm_fn fn;
  const char* name;
};

Choice tq1_kernel_for(int isa) {
#if defined(BITNET_HAVE_AVX512VNNI)
  if (isa == BITNET_ISA_AVX512VNNI || isa == BITNET_ISA_AMX) return {tq1_gemm_avx512vnni, "avx512vnni"};
#endif
#if defined(BITNET_HAVE_AVX2)
  if (isa == BITNET_ISA_AVX2 || isa == BITNET_ISA_AVXVNNI || isa == BITNET_ISA_AVX512VNNI || isa == BITNET_ISA_AMX)
    return {tq1_gemm_avx2, "avx2"};
#endif
  (void)isa;
  return {tq1_gemm_scalar, "scalar"};
}

// Activations in the kernel layout: rows of nblk * 320 bytes, zero padded past K, and their sums.
struct Tq1XBuf {
  std::vector<int8_t> x;
  std::vector<int32_t> sum;
};

// Splits the rows over the thread pool; epi(n0, n1) runs after the kernel on each chunk (still in cache).
template <class Epi>
void run(tq1_gemm_fn g, const Tq1Args& a, int64_t M, int64_t N, Epi&& epi) {
  const int64_t nthreads = native_threads();
  if (nthreads == 1 || M * N * a.nblk < 256) {
    g(a, 0, M, 0, N);
    epi(0, N);
    return;
  }
  const int64_t chunk = decode_row_chunk(N);   // the I2 decode driver's row chunks
  const int64_t ntasks = (N + chunk - 1) / chunk;
  native_parallel_for(ntasks, [&](int64_t t) {
    const int64_t n0 = t * chunk, n1 = std::min(N, (t + 1) * chunk);
    g(a, 0, M, n0, n1);
    epi(n0, n1);
  });
}

// Pads the rows of xb.x (M, ldp; the first K values of each written) with zeros and sums them.
void finish_rows(Tq1XBuf& xb, int64_t M, int64_t K, int64_t ldp) {
  for (int64_t m = 0; m < M; ++m) {
    int8_t* row = xb.x.data() + m * ldp;
    std::memset(row + K, 0, (size_t)(ldp - K));
    int32_t s = 0;
    for (int64_t i = 0; i < K; ++i) s += row[i];
    xb.sum[(size_t)m] = s;
  }
}

Tq1XBuf& scratch(int64_t M, int64_t ldp) {
  thread_local Tq1XBuf xb;
  if ((int64_t)xb.x.size() < M * ldp) xb.x.resize((size_t)(M * ldp));
  if ((int64_t)xb.sum.size() < M) xb.sum.resize((size_t)M);
  return xb;
}

int check(int64_t M, int64_t K, int64_t ldx, int64_t N, int64_t ldw, int64_t ldo) {
  const int64_t nblk = (K + 319) / 320;
  if (M < 0 || K < 0 || N < 0 || ldx < K || ldw < 64 * nblk || ldo < N || K > BITNET_TQ1_MAX_K) return BITNET_EINVAL;
  return BITNET_OK;
}

}  // namespace
}  // namespace bitnet

using namespace bitnet;

extern "C" {

int bitnet_tq1_matmul_int(const int8_t* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* w, int64_t N,
                          int64_t ldw, int32_t* out, int64_t ldo, int isa) {
  int rc = check(M, K, ldx, N, ldw, ldo);
  if (rc) return rc;
  IsaKernels ks;
  if ((rc = resolve_isa(isa, &ks))) return rc;
  const int resolved = ks.isa;
  if (M == 0 || N == 0) return BITNET_OK;
  const int64_t nblk = (K + 319) / 320, ldp = std::max<int64_t>(320 * nblk, 64);
  Tq1XBuf& xb = scratch(M, ldp);
  for (int64_t m = 0; m < M; ++m) std::memcpy(xb.x.data() + m * ldp, x + m * ldx, (size_t)K);
  finish_rows(xb, M, K, ldp);
  const Tq1Args a{xb.x.data(), ldp, xb.sum.data(), w, ldw, nblk, out, ldo};
  run(tq1_kernel_for(resolved).fn, a, M, N, [](int64_t, int64_t) {});
  return BITNET_OK;
}

int bitnet_tq1_bitlinear(const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps, const uint8_t* w,
                         int64_t N, int64_t ldw, float w_scale, const float* bias, float* out, int64_t ldo, int isa) {
  const float* scales[1] = {&w_scale};
  return bitnet_tq1_bitlinear_multi(x, M, K, ldx, bits, eps, nullptr, 0.0f, 1, &w, &N, ldw, scales, &bias, out, ldo,
                                    isa);
}

int bitnet_tq1_bitlinear_multi(const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps,
                               const float* norm_weight, float norm_eps, int nmat, const uint8_t* const* w,
                               const int64_t* n, int64_t ldw, const float* const* w_scale, const float* const* bias,
                               float* out, int64_t ldo, int isa) {
  int64_t total = 0;
  if (check_multi(nmat, bits, norm_eps, n, &total)) return BITNET_EINVAL;
  int rc = check(M, K, ldx, total, ldw, ldo);
  if (rc) return rc;
  IsaKernels ks;
  if ((rc = resolve_isa(isa, &ks))) return rc;
  const int resolved = ks.isa;
  if (M == 0 || total == 0) return BITNET_OK;
  // RMSNorm (x * r) * norm_weight by the I2 drivers' own row function: the same float32 rows, bit for bit
  const float* src = x;
  int64_t lds = ldx;
  if (norm_weight) {
    thread_local std::vector<float> normed;
    if ((int64_t)normed.size() < M * K) normed.resize((size_t)(M * K));
    for (int64_t m = 0; m < M; ++m) native_rms_norm_row(x + m * ldx, K, norm_eps, norm_weight, normed.data() + m * K);
    src = normed.data();
    lds = K;
  }
  const int64_t nblk = (K + 319) / 320, ldp = std::max<int64_t>(320 * nblk, 64);
  Tq1XBuf& xb = scratch(M, ldp);
  thread_local std::vector<float> xs;
  if ((int64_t)xs.size() < M) xs.resize((size_t)M);
  // the I2 path's quantiser, bit for bit (per-token absmax, bitnet.quant.activation_quant_int8)
  if ((rc = bitnet_quantize_act(src, M, K, lds, bits, eps, xb.x.data(), ldp, xs.data(), resolved))) return rc;
  finish_rows(xb, M, K, ldp);
  const tq1_gemm_fn g = tq1_kernel_for(resolved).fn;
  const float* scales = xs.data();
  int64_t off = 0;
  for (int j = 0; j < nmat; ++j) {      // matrix j -> columns [off, off + n[j]) of out
    int32_t* acc = reinterpret_cast<int32_t*>(out) + off;
    const Tq1Args a{xb.x.data(), ldp, xb.sum.data(), w[j], ldw, nblk, acc, ldo};
    const float ws = *w_scale[j];
    const float* bj = bias[j];
    run(g, a, M, n[j], [&](int64_t n0, int64_t n1) {
      float_epilogue(acc, ldo, 0, M, n0, n1, scales, ws, nullptr, bj);   // y = acc * w_scale / s (+ bias)
    });
    off += n[j];
  }
  return BITNET_OK;
}

const char* bitnet_tq1_kernel_name(int isa) {
  IsaKernels ks;
  if (resolve_isa(isa, &ks)) return nullptr;
  return tq1_kernel_for(ks.isa).name;
}

}  // extern "C"
