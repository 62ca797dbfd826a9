// The thread pool and the matmul driver (work splitting and tiling, activations in the kernel layout,
// float epilogue) of the native backend: internal interface of driver.cpp, used by api.cpp (C ABI),
// quantize.cpp and int8.cpp. One tiler (parallel_tiles) serves the ternary and the int8 GEMMs.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "kernels.h"
#include "native_services.h"
#include "threadpool.h"

namespace bitnet {

// ------------------------------------------------------------------------------------------------
// Threads
std::shared_ptr<ThreadPool> pool();   // the process's pool, (re)built at the requested size
void parallel_for(int64_t ntasks, const std::function<void(int64_t)>& fn);
void set_num_threads(int n);          // n <= 0: number of cores
int get_num_threads();

// The tiling of every GEMM driver (ternary prefill and panel GEMMs, int8 GEMM): out (M, N) in tiles of
// MB tokens x NB rows, NB halved (not below nb_min) until there are per_thread tiles per pool thread;
// fn(m0, m1, n0, n1) computes one tile, the tiles run over the pool.
template <class F>
void parallel_tiles(int64_t M, int64_t N, int64_t MB, int64_t NB, int64_t nb_min, int64_t per_thread, F&& fn) {
  const int64_t nthreads = pool()->size();
  const int64_t mt = (M + MB - 1) / MB;
  while (NB > nb_min && mt * ((N + NB - 1) / NB) < nthreads * per_thread) NB /= 2;
  const int64_t nt = (N + NB - 1) / NB;
  parallel_for(mt * nt, [&](int64_t t) {
    const int64_t mi = t / nt, ni = t % nt;
    const int64_t m0 = mi * MB, m1 = std::min(M, m0 + MB), n0 = ni * NB, n1 = std::min(N, n0 + NB);
    fn(m0, m1, n0, n1);
  });
}

// ------------------------------------------------------------------------------------------------
// Activations in the kernel layout
struct XBuf {
  std::vector<int8_t> x;    // (M, ldx)
  std::vector<int32_t> sum; // (M,)
  std::vector<int8_t> xv;   // x in the panel kernels' VNNI layout (kernels.h), built on first use
  bool xv_ready = false;
  int64_t ldx = 0;
};

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Copies one int8 row (K values) into the kernel layout (row of ldx bytes, zero padded); returns its sum.
int32_t place_row(const int8_t* src, int64_t K, int8_t* dst, int64_t ldx, bool interleave);
// The sum of the n int8 values at p (vectorised by the compiler).
int32_t sum_int8(const int8_t* p, int64_t n);
// k.quant of the K floats x (scale s, clamp [lo, hi]) written straight into the pair-interleaved layout
// (ldx bytes, zero padded), as k.quant + place_row(..., true) would; returns the sum of the codes.
int32_t quantize_interleaved(const Kernel& k, const float* x, int64_t K, float s, float lo, float hi, int8_t* dst,
                             int64_t ldx);
XBuf& scratch();   // this thread's buffer
void prepare(XBuf& xb, int64_t M, int64_t K, const Kernel& k);

// Token chunks for parallel preparation: only worth it for prefill-sized M.
template <class F>
void for_tokens(int64_t M, int64_t K, F&& f) {
  const int64_t chunk = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  const int64_t ntasks = (M + chunk - 1) / chunk;
  if (ntasks <= 1) { f(0, M); return; }
  parallel_for(ntasks, [&](int64_t t) { f(t * chunk, std::min(M, (t + 1) * chunk)); });
}

// ------------------------------------------------------------------------------------------------
// Matmul driver
struct Epilogue {
  bool to_float = false;
  const float* x_scale = nullptr;  // (M,)
  float w_scale = 1.0f;
  const float* bias = nullptr;     // (N,) or null
};

// Decode (GEMV, M <= 3) of nmat matrices reading the same activations, in one parallel region.
void run_decode(const Kernel& k, const GemmArgs* args, const Epilogue* epis, const int64_t* n, int nmat, int64_t M);
// One GEMM out (M, N) of prepared activations xb: decode, tiled prefill or panel (matrix unit) path.
void run_gemm(const Kernel& k, const GemmArgs& a, int64_t M, int64_t N, const Epilogue& e, XBuf& xb);
// Two GEMMs of the same prepared activations xb, gate and up (F rows each, M > 3 tokens), and the gate
// activation, per tile: h (M, ldh)[m, j] = act(gate[m, j], up[m, j]). Each tile of tokens x features
// computes both GEMMs into this thread's scratch (in L2) and applies act at once, so the (M, 2F) gate|up
// output never goes through L3 / DRAM. h is bit for bit run_gemm of each matrix, then act.
void run_gated_gemm(const Kernel& k, const GemmArgs& gate, const Epilogue& gate_e, const GemmArgs& up,
                    const Epilogue& up_e, int64_t M, int64_t F, XBuf& xb, const GateFn& act, float* h, int64_t ldh);
int check_dims(int64_t M, int64_t K, int64_t ldx, int64_t N, int64_t ldw, int64_t ldo);
// bitnet_matmul_int / bitnet_linear: int8 activations x (M, K) placed in the kernel layout, then run_gemm.
int matmul_common(const int8_t* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* w, int64_t N, int64_t ldw,
                  int32_t* out, int64_t ldo, const Epilogue& e, int isa);

}  // namespace bitnet
