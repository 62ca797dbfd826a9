// Thread pool and matmul driver of the native backend: work splitting over the pool, tiling, activations
// in the kernel layout, float epilogue. See driver.h.
#include "driver.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

#if defined(__linux__)
#include <sched.h>
#include <unistd.h>
#endif

#include "bitnet_native.h"
#include "isa.h"

namespace bitnet {
namespace {

// ------------------------------------------------------------------------------------------------
// Threads
int cpu_count() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n ? (int)n : 1;
}

int spin_us() {
  const char* s = std::getenv("BITNET_SPIN_US");
  return s ? std::max(0, std::atoi(s)) : 200;
}

std::mutex g_pool_mu;
std::shared_ptr<ThreadPool> g_pool;  // callers hold a reference while they use it: resizing is safe
int g_pool_pid = 0;
int g_nthreads = 0;                   // 0: not set yet -> cpu_count()

}  // namespace

std::shared_ptr<ThreadPool> pool() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
#if defined(__linux__)
  const int pid = (int)getpid();
#else
  const int pid = 0;
#endif
  if (g_nthreads <= 0) g_nthreads = cpu_count();
  if (g_pool && g_pool_pid != pid) {
    // Forked child: the parent's worker threads do not exist here; never join them, leak the object.
    new std::shared_ptr<ThreadPool>(std::move(g_pool));
    g_pool.reset();
  }
  if (!g_pool || g_pool->size() != g_nthreads) {
    g_pool = std::make_shared<ThreadPool>(g_nthreads, spin_us());  // old one ends with its last user
    g_pool_pid = pid;
  }
  return g_pool;
}

void parallel_for(int64_t ntasks, const std::function<void(int64_t)>& fn) {
  if (ntasks <= 0) return;
  if (ntasks == 1 || !pool()->try_run(ntasks, fn)) {
    for (int64_t t = 0; t < ntasks; ++t) fn(t);  // single task, or pool busy (another caller)
  }
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  g_nthreads = n > 0 ? n : cpu_count();
}

int get_num_threads() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  return g_nthreads > 0 ? g_nthreads : cpu_count();
}

namespace {

// Where the 32 values k .. k + 31 (k % 32 == 0: block b = k / 128, quarter q) of a row go in the
// "pair interleaved" layout (kernels.h).
inline int64_t interleaved_offset(int64_t k) {
  const int64_t b = k >> 7, q = (k >> 5) & 3;
  return 256 * (b >> 1) + 64 * q + 32 * (b & 1);
}

}  // namespace

int32_t sum_int8(const int8_t* p, int64_t n) {
  int32_t sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += p[i];
  return sum;
}

// Copies one int8 row (K values) into the kernel layout (row of ldx bytes, zero padded).
int32_t place_row(const int8_t* src, int64_t K, int8_t* dst, int64_t ldx, bool interleave) {
  std::memset(dst, 0, (size_t)ldx);
  if (!interleave) {
    std::memcpy(dst, src, (size_t)K);
  } else {
    for (int64_t s = 0; s < K; s += 32)
      std::memcpy(dst + interleaved_offset(s), src + s, (size_t)std::min<int64_t>(32, K - s));
  }
  return sum_int8(src, K);
}

int32_t quantize_interleaved(const Kernel& k, const float* x, int64_t K, float s, float lo, float hi, int8_t* dst,
                             int64_t ldx) {
  std::memset(dst, 0, (size_t)ldx);
  for (int64_t c = 0; c < K; c += 32) k.quant(x + c, std::min<int64_t>(32, K - c), s, lo, hi, dst + interleaved_offset(c));
  return sum_int8(dst, ldx);  // the padding is zero
}

XBuf& scratch() {
  thread_local XBuf buf;
  return buf;
}

void prepare(XBuf& xb, int64_t M, int64_t K, const Kernel& k) {
  const int64_t kp = round_up(K, 128);
  xb.ldx = k.pair_interleave ? round_up(kp, 256) : kp;
  xb.xv_ready = false;
  if ((int64_t)xb.x.size() < M * xb.ldx) xb.x.resize((size_t)(M * xb.ldx));
  if ((int64_t)xb.sum.size() < M) xb.sum.resize((size_t)M);
}

// ------------------------------------------------------------------------------------------------
// Matmul driver: splits (M, N) over threads, applies the epilogue per tile.
namespace {

void apply_epilogue(const Epilogue& e, int32_t* out, int64_t ldo, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (e.to_float) float_epilogue(out, ldo, m0, m1, n0, n1, e.x_scale, e.w_scale, nullptr, e.bias);
}

// x (M, ldx) of xb in the panel kernel's VNNI layout (kernels.h), once per quantised input.
void build_xv(const Kernel& k, XBuf& xb, int64_t M) {
  if (xb.xv_ready) return;
  const int64_t groups = (M + 15) / 16;
  if ((int64_t)xb.xv.size() < groups * 16 * xb.ldx) xb.xv.resize((size_t)(groups * 16 * xb.ldx));
  parallel_for(groups, [&](int64_t g) { k.panel_pack(xb.x.data(), xb.ldx, M, g, xb.xv.data()); });
  xb.xv_ready = true;
}

// Prefill on a matrix unit: tasks of up to 128 tokens x a range of weight rows (the kernel unpacks
// 32 rows at a time and reuses them for all the task's tokens).
void run_panel_gemm(const Kernel& k, const GemmArgs& a, int64_t M, int64_t N, const Epilogue& e, XBuf& xb) {
  build_xv(k, xb, M);
  const PanelEpilogue pe{e.to_float ? e.x_scale : nullptr, e.w_scale, e.bias};
  parallel_tiles(M, N, kPanelMaxM, 128, 32, 4, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    k.panel(a, xb.xv.data(), pe, m0, m1, n0, n1);
  });
}

// The GEMM of tokens [m0, ..) x weight rows [n0, ..) of a as a GEMM of its own (tokens and rows from 0),
// writing to out (ldo).
GemmArgs sub_gemm(const GemmArgs& a, int64_t m0, int64_t n0, int32_t* out, int64_t ldo) {
  return GemmArgs{a.x + m0 * a.ldx, a.ldx, a.xsum + m0, a.w + n0 * a.ldw, a.ldw, a.nblk, out, ldo};
}

}  // namespace

void run_gated_gemm(const Kernel& k, const GemmArgs& gate, const Epilogue& gate_e, const GemmArgs& up,
                    const Epilogue& up_e, int64_t M, int64_t F, XBuf& xb, const GateFn& act, float* h, int64_t ldh) {
  if (M == 0 || F == 0) return;
  const bool panel = k.panel && M >= kPanelMinM;
  if (panel) build_xv(k, xb, M);
  parallel_tiles(M, F, panel ? kPanelMaxM : 64, 128, panel ? 32 : 8, 4, [&](int64_t m0, int64_t m1, int64_t n0,
                                                                             int64_t n1) {
    const int64_t mt = m1 - m0, nt = n1 - n0;
    thread_local std::vector<float> g, u;  // (mt, nt) each: this tile's gate and up outputs (L2)
    if ((int64_t)g.size() < mt * nt) { g.resize((size_t)(mt * nt)); u.resize((size_t)(mt * nt)); }
    const GemmArgs* args[2] = {&gate, &up};
    const Epilogue* epis[2] = {&gate_e, &up_e};
    float* outs[2] = {g.data(), u.data()};
    for (int i = 0; i < 2; ++i) {
      const GemmArgs a = sub_gemm(*args[i], m0, n0, reinterpret_cast<int32_t*>(outs[i]), nt);
      const float* xs = epis[i]->x_scale + m0;
      const float* bias = epis[i]->bias ? epis[i]->bias + n0 : nullptr;
      if (panel) {
        k.panel(a, xb.xv.data() + m0 * xb.ldx, PanelEpilogue{xs, epis[i]->w_scale, bias}, 0, mt, 0, nt);
      } else {
        k.gemm(a, 0, mt, 0, nt);
        float_epilogue(a.out, nt, 0, mt, 0, nt, xs, epis[i]->w_scale, nullptr, bias);
      }
    }
    for (int64_t m = 0; m < mt; ++m) act(g.data() + m * nt, u.data() + m * nt, nt, h + (m0 + m) * ldh + n0);
  });
}

// Decode (GEMV, M <= 3) of nmat matrices reading the same activations, in one parallel region over row
// chunks of all of them: ~4 chunks per thread so that a slow core does not hold the others up.
void run_decode(const Kernel& k, const GemmArgs* args, const Epilogue* epis, const int64_t* n, int nmat, int64_t M) {
  int64_t total = 0;
  for (int j = 0; j < nmat; ++j) total += n[j];
  const int64_t chunk = decode_row_chunk(total);
  struct Task { int j; int64_t n0, n1; };
  std::vector<Task> tasks;
  for (int j = 0; j < nmat; ++j)
    for (int64_t r = 0; r < n[j]; r += chunk) tasks.push_back(Task{j, r, std::min(n[j], r + chunk)});
  parallel_for((int64_t)tasks.size(), [&](int64_t t) {
    const Task& tk = tasks[(size_t)t];
    const GemmArgs& a = args[tk.j];
    k.gemm(a, 0, M, tk.n0, tk.n1);
    apply_epilogue(epis[tk.j], a.out, a.ldo, 0, M, tk.n0, tk.n1);
  });
}

void run_gemm(const Kernel& k, const GemmArgs& a, int64_t M, int64_t N, const Epilogue& e, XBuf& xb) {
  if (M == 0 || N == 0) return;
  if (k.panel && M >= kPanelMinM) {
    run_panel_gemm(k, a, M, N, e, xb);
    return;
  }
  const int64_t nthreads = pool()->size();
  const int64_t work = M * N * std::max<int64_t>(a.nblk, 1);  // block-products
  if (nthreads == 1 || work < 4096) {
    k.gemm(a, 0, M, 0, N);
    apply_epilogue(e, a.out, a.ldo, 0, M, 0, N);
    return;
  }
  if (M <= 3) {
    run_decode(k, &a, &e, &N, 1, M);
    return;
  }
  // Prefill (GEMM): tiles of MB tokens x NB rows; a tile's weights (NB rows) stay in L1/L2 and every
  // unpacked block serves several tokens inside the kernel's register tile.
  parallel_tiles(M, N, 64, 64, 8, 4, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    k.gemm(a, m0, m1, n0, n1);
    apply_epilogue(e, a.out, a.ldo, m0, m1, n0, n1);
  });
}

int check_dims(int64_t M, int64_t K, int64_t ldx, int64_t N, int64_t ldw, int64_t ldo) {
  if (M < 0 || K < 0 || N < 0 || ldx < K || ldo < N) return BITNET_EINVAL;
  if (ldw < round_up(K, 128) / 4) return BITNET_EINVAL;
  return BITNET_OK;
}

int matmul_common(const int8_t* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* w, int64_t N, int64_t ldw,
                  int32_t* out, int64_t ldo, const Epilogue& e, int isa) {
  int rc = check_dims(M, K, ldx, N, ldw, ldo);
  if (rc) return rc;
  Kernel k;
  if ((rc = resolve_isa(isa, &k))) return rc;
  if (M == 0 || N == 0) return BITNET_OK;
  XBuf& xb = scratch();
  prepare(xb, M, K, k);
  for_tokens(M, K, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      xb.sum[m] = place_row(x + m * ldx, K, xb.x.data() + m * xb.ldx, xb.ldx, k.pair_interleave != 0);
  });
  const GemmArgs a{xb.x.data(), xb.ldx, xb.sum.data(), w, ldw, round_up(K, 128) / 128, out, ldo};
  run_gemm(k, a, M, N, e, xb);
  return BITNET_OK;
}

// ------------------------------------------------------------------------------------------------
// Services for the other drivers (int8.cpp, attention.cpp).
int native_threads() { return pool()->size(); }
int64_t decode_row_chunk(int64_t rows) {
  const int64_t nthreads = pool()->size();
  return std::max<int64_t>(16, round_up((rows + nthreads * 4 - 1) / (nthreads * 4), 8));
}

void float_epilogue(int32_t* out, int64_t ldo, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                    const float* x_scale, float w_scale, const float* w_scale_n, const float* bias) {
  for (int64_t m = m0; m < m1; ++m) {
    int32_t* row = out + m * ldo;
    const float xs = x_scale[m];
    for (int64_t n = n0; n < n1; ++n) {
      int32_t acc;
      std::memcpy(&acc, row + n, 4);
      float y = (float)acc * (w_scale_n ? w_scale_n[n] : w_scale) / xs;   // acc * w_scale / x_scale
      if (bias) y += bias[n];
      std::memcpy(row + n, &y, 4);
    }
  }
}
void native_parallel_for(int64_t ntasks, const std::function<void(int64_t)>& fn) { parallel_for(ntasks, fn); }
}  // namespace bitnet
