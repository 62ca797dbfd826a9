// C ABI of the native backend: ISA detection and dispatch, activation preparation / quantisation,
// work splitting over the thread pool, float epilogue. See bitnet_native.h.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

#include "bitnet_native.h"
#include "int8.h"
#include "native_services.h"
#include "kernels.h"
#include "threadpool.h"

namespace bitnet {
namespace {

// ------------------------------------------------------------------------------------------------
// CPU features
struct Features {
  bool isa[BITNET_ISA_COUNT] = {};
  std::string brand;
};

#if defined(__x86_64__) || defined(_M_X64)
uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((uint64_t)hi << 32) | lo;
}

// AMX tile data is an XSAVE feature the Linux kernel enables per process on request (arch_prctl
// ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); asked once, at detection. Other OSes: not used.
bool request_amx_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
  return false;
#endif
}
#endif

Features detect() {
  Features f;
  f.isa[BITNET_ISA_SCALAR] = true;
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a, b, c, d;
  if (__get_cpuid_max(0, nullptr) >= 7) {
    __cpuid(1, a, b, c, d);
    const bool osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1;
    const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
    const bool os_avx = (xcr0 & 0x6) == 0x6;            // XMM and YMM state
    const bool os_avx512 = (xcr0 & 0xE6) == 0xE6;       // + opmask, ZMM_Hi256, Hi16_ZMM
    __cpuid_count(7, 0, a, b, c, d);
    const bool avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1, avx512vl = (b >> 31) & 1;
    const bool avx512vnni = (c >> 11) & 1;
    const bool amx_tile = (d >> 24) & 1, amx_int8 = (d >> 25) & 1;
    const bool os_amx = (xcr0 & 0x60000) == 0x60000;   // XTILECFG and XTILEDATA
    __cpuid_count(7, 1, a, b, c, d);
    const bool avxvnni = (a >> 4) & 1;
    f.isa[BITNET_ISA_AVX2] = os_avx && avx && avx2 && fma;
    f.isa[BITNET_ISA_AVXVNNI] = f.isa[BITNET_ISA_AVX2] && avxvnni;
    f.isa[BITNET_ISA_AVX512VNNI] = f.isa[BITNET_ISA_AVX2] && os_avx512 && avx512f && avx512bw && avx512vl && avx512vnni;
    f.isa[BITNET_ISA_AMX] = f.isa[BITNET_ISA_AVX512VNNI] && amx_tile && amx_int8 && os_amx && request_amx_permission();
  }
  if (__get_cpuid_max(0x80000000, nullptr) >= 0x80000004) {
    char s[49] = {};
    for (unsigned i = 0; i < 3; ++i) {
      __cpuid(0x80000002 + i, a, b, c, d);
      std::memcpy(s + 16 * i, &a, 4); std::memcpy(s + 16 * i + 4, &b, 4);
      std::memcpy(s + 16 * i + 8, &c, 4); std::memcpy(s + 16 * i + 12, &d, 4);
    }
    f.brand = s;
    const size_t p = f.brand.find_first_not_of(' ');
    f.brand = p == std::string::npos ? "" : f.brand.substr(p);
  }
#elif defined(__aarch64__)
  f.isa[BITNET_ISA_NEON] = true;
#endif
#if defined(BITNET_EMULATE)  // kernels built against the scalar intrinsic emulation (csrc/emu): test only
  f.isa[BITNET_ISA_AVXVNNI] = f.isa[BITNET_ISA_AVX512VNNI] = f.isa[BITNET_ISA_NEON] = true;  // Advanced SIMD is mandatory on AArch64
#endif
  return f;
}

const Features& features() {
  static const Features f = detect();
  return f;
}

bool compiled(int isa) {
  switch (isa) {
    case BITNET_ISA_SCALAR: return true;
#if defined(BITNET_HAVE_NEON)
    case BITNET_ISA_NEON: return true;
#endif
#if defined(BITNET_HAVE_AVX2)
    case BITNET_ISA_AVX2: return true;
#endif
#if defined(BITNET_HAVE_AVXVNNI)
    case BITNET_ISA_AVXVNNI: return true;
#endif
#if defined(BITNET_HAVE_AVX512VNNI)
    case BITNET_ISA_AVX512VNNI: return true;
#endif
#if defined(BITNET_HAVE_AMX)
    case BITNET_ISA_AMX: return true;
#endif
    default: return false;
  }
}

bool supported(int isa) { return isa >= 0 && isa < BITNET_ISA_COUNT && compiled(isa) && features().isa[isa]; }

Kernel kernel_for(int isa) {
  switch (isa) {
#if defined(BITNET_HAVE_NEON)
    case BITNET_ISA_NEON: return kernel_neon();
#endif
#if defined(BITNET_HAVE_AVX2)
    case BITNET_ISA_AVX2: return kernel_avx2();
#endif
#if defined(BITNET_HAVE_AVXVNNI)
    case BITNET_ISA_AVXVNNI: return kernel_avxvnni();
#endif
#if defined(BITNET_HAVE_AVX512VNNI)
    case BITNET_ISA_AVX512VNNI: return kernel_avx512vnni();
#endif
#if defined(BITNET_HAVE_AMX)
    case BITNET_ISA_AMX: return kernel_amx();
#endif
    default: return kernel_scalar();
  }
}

int best_isa() {
  static const int order[] = {BITNET_ISA_AMX, BITNET_ISA_AVX512VNNI, BITNET_ISA_AVXVNNI, BITNET_ISA_AVX2, BITNET_ISA_NEON};
  for (int isa : order)
    if (supported(isa)) return isa;
  return BITNET_ISA_SCALAR;
}

std::atomic<int> g_default_isa{-1};

int resolve_isa(int isa, Kernel* k) {
  if (isa < 0) {
    isa = g_default_isa.load(std::memory_order_relaxed);
    if (isa < 0) isa = best_isa();
  }
  if (!supported(isa)) return BITNET_EISA;
  *k = kernel_for(isa);
  return BITNET_OK;
}

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

// ------------------------------------------------------------------------------------------------
// Activations in the kernel layout
struct XBuf {
  std::vector<int8_t> x;    // (M, ldx)
  std::vector<int32_t> sum; // (M,)
  std::vector<int8_t> tmp;  // scratch rows for quantisation into the interleaved layout
  std::vector<int8_t> xv;   // x in the panel kernels' VNNI layout (kernels.h), built on first use
  bool xv_ready = false;
  int64_t ldx = 0;
};

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Copies one int8 row (K values) into the kernel layout (row of ldx bytes, zero padded).
int32_t place_row(const int8_t* src, int64_t K, int8_t* dst, int64_t ldx, bool interleave) {
  std::memset(dst, 0, (size_t)ldx);
  if (!interleave) {
    std::memcpy(dst, src, (size_t)K);
  } else {
    for (int64_t s = 0; s < K; s += 32) {     // 32-value chunks: block b, quarter q
      const int64_t b = s >> 7, q = (s >> 5) & 3;
      const int64_t d = 256 * (b >> 1) + 64 * q + 32 * (b & 1);
      std::memcpy(dst + d, src + s, (size_t)std::min<int64_t>(32, K - s));
    }
  }
  int32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += src[k];
  return sum;
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

// Token chunks for parallel preparation: only worth it for prefill-sized M.
template <class F>
void for_tokens(int64_t M, int64_t K, F&& f) {
  const int64_t chunk = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  const int64_t ntasks = (M + chunk - 1) / chunk;
  if (ntasks <= 1) { f(0, M); return; }
  parallel_for(ntasks, [&](int64_t t) { f(t * chunk, std::min(M, (t + 1) * chunk)); });
}

// ------------------------------------------------------------------------------------------------
// Matmul driver: splits (M, N) over threads, applies the epilogue per tile.
struct Epilogue {
  bool to_float = false;
  const float* x_scale = nullptr;  // (M,)
  float w_scale = 1.0f;
  const float* bias = nullptr;     // (N,) or null
};

void apply_epilogue(const Epilogue& e, int32_t* out, int64_t ldo, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (e.to_float) float_epilogue(out, ldo, m0, m1, n0, n1, e.x_scale, e.w_scale, nullptr, e.bias);
}

// Decode (GEMV, M <= 3) of nmat matrices reading the same activations, in one parallel region over row
// chunks of all of them: ~4 chunks per thread so that a slow core does not hold the others up.
void run_decode(const Kernel& k, const GemmArgs* args, const Epilogue* epis, const int64_t* n, int nmat, int64_t M) {
  const int64_t nthreads = pool()->size();
  int64_t total = 0;
  for (int j = 0; j < nmat; ++j) total += n[j];
  const int64_t chunk = std::max<int64_t>(16, round_up((total + nthreads * 4 - 1) / (nthreads * 4), 8));
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
  const int64_t nthreads = pool()->size();
  const int64_t MC = kPanelMaxM;
  const int64_t mt = (M + MC - 1) / MC;
  int64_t NB = 128;
  while (NB > 32 && mt * ((N + NB - 1) / NB) < nthreads * 4) NB /= 2;
  const int64_t nt = (N + NB - 1) / NB;
  parallel_for(mt * nt, [&](int64_t t) {
    const int64_t mi = t / nt, ni = t % nt;
    k.panel(a, xb.xv.data(), pe, mi * MC, std::min(M, (mi + 1) * MC), ni * NB, std::min(N, (ni + 1) * NB));
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
  const int64_t MB = 64;
  int64_t NB = 64;
  const int64_t mt = (M + MB - 1) / MB;
  while (NB > 8 && mt * ((N + NB - 1) / NB) < nthreads * 4) NB /= 2;
  const int64_t nt = (N + NB - 1) / NB;
  parallel_for(mt * nt, [&](int64_t t) {
    const int64_t mi = t / nt, ni = t % nt;
    const int64_t m0 = mi * MB, m1 = std::min(M, m0 + MB), n0 = ni * NB, n1 = std::min(N, n0 + NB);
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

// s = (1 / max(amax, eps)) * Qp in float32, exactly as torch evaluates `qp / amax.clamp(min=eps)`
// (Tensor.__rtruediv__ is reciprocal() * other).
float act_scale(float amax, float eps, int qp) {
  const float a = amax < eps ? eps : amax;
  const float r = 1.0f / a;
  return r * (float)qp;
}

// sum_k x[k]^2 in float64 (each square is exact), in 8 interleaved partial sums added pairwise: a fixed
// order (the same result on every ISA and thread count) without one long chain of dependent adds.
double sum_squares(const float* x, int64_t K) {
  double acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= K; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += (double)x[i + l] * (double)x[i + l];
  for (int l = 0; i < K; ++i, ++l) acc[l] += (double)x[i] * (double)x[i];
  return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

// Whether row x[0..K) holds a NaN or an infinity (all exponent bits set). The kernels' absmax skips NaN,
// so this is the check that keeps a non-finite row from being quantised as if it were finite: an
// integer OR-reduction over a row the absmax has just read (in L1), vectorised by the compiler.
bool row_nonfinite(const float* x, int64_t K) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < K; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    bad |= (u & 0x7f800000u) == 0x7f800000u;
  }
  return bad != 0;
}

// Scale of a non-finite row, as bitnet.quant.activation_quant_int8 computes it: Qp / max|x| is NaN
// when the row holds a NaN, else 0 (max|x| = inf). Its codes are all 0 (torch turns NaN into int8 0),
// so every output of the row is NaN (0 / 0 or 0 / NaN in the float epilogue), as in the reference.
float nonfinite_scale(const float* x, int64_t K) {
  for (int64_t i = 0; i < K; ++i)
    if (x[i] != x[i]) return std::numeric_limits<float>::quiet_NaN();
  return 0.0f;
}

// Per-token absmax quantisation of x (M, K) float32 into the kernel layout of xb; xs[m] = scale.
// With norm_weight, each row is first RMS-normalised as bitnet.nn.RMSNorm does in float32:
//   y = (x * rsqrt(mean(x^2) + norm_eps)) * norm_weight
void quantize_rows(const Kernel& k, const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps,
                   const float* norm_weight, float norm_eps, XBuf& xb, float* xs) {
  prepare(xb, M, K, k);
  const int qp = (1 << (bits - 1)) - 1;
  const bool inter = k.pair_interleave != 0;
  if (inter && (int64_t)xb.tmp.size() < M * K) xb.tmp.resize((size_t)(M * K));
  int8_t* tmp_all = xb.tmp.data();
  for_tokens(M, K, [&](int64_t m0, int64_t m1) {
    std::vector<float> normed(norm_weight ? (size_t)K : 0);
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = x + m * ldx;
      if (norm_weight) {
        const float r = 1.0f / std::sqrt((float)(sum_squares(xr, K) / (double)K) + norm_eps);
        for (int64_t i = 0; i < K; ++i) normed[(size_t)i] = (xr[i] * r) * norm_weight[i];
        xr = normed.data();
      }
      int8_t* dst = xb.x.data() + m * xb.ldx;
      if (row_nonfinite(xr, K)) {            // NaN / inf row: codes 0, scale NaN or 0 (see nonfinite_scale)
        xs[m] = nonfinite_scale(xr, K);
        std::memset(dst, 0, (size_t)xb.ldx);
        xb.sum[m] = 0;
        continue;
      }
      const float s = act_scale(k.absmax(xr, K), eps, qp);
      xs[m] = s;
      if (!inter) {
        k.quant(xr, K, s, (float)(-qp - 1), (float)qp, dst);
        std::memset(dst + K, 0, (size_t)(xb.ldx - K));
        int32_t sum = 0;
        for (int64_t i = 0; i < K; ++i) sum += dst[i];
        xb.sum[m] = sum;
      } else {
        int8_t* t = tmp_all + m * K;
        k.quant(xr, K, s, (float)(-qp - 1), (float)qp, t);
        xb.sum[m] = place_row(t, K, dst, xb.ldx, true);
      }
    }
  });
}

}  // namespace
}  // namespace bitnet

// ------------------------------------------------------------------------------------------------
// Services for the int8 kernels (int8.cpp): ISA dispatch and the thread pool.
namespace bitnet {
int native_resolve(int isa, Kernel* k, int* resolved) {
  if (isa < 0) {
    isa = g_default_isa.load(std::memory_order_relaxed);
    if (isa < 0) isa = best_isa();
  }
  *resolved = isa;
  return resolve_isa(isa, k);
}
int native_threads() { return pool()->size(); }
// RMSNorm factor of a row as quantize_rows computes it (the TQ1 driver normalises with it, bit for bit)
float native_rms_factor(const float* x, int64_t K, float eps) {
  return 1.0f / std::sqrt((float)(sum_squares(x, K) / (double)K) + eps);
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

using namespace bitnet;

extern "C" {

int bitnet_abi_version(void) { return BITNET_ABI_VERSION; }

const char* bitnet_isa_name(int isa) {
  static const char* names[] = {"scalar", "neon", "avx2", "avxvnni", "avx512vnni", "amx"};
  return isa >= 0 && isa < BITNET_ISA_COUNT ? names[isa] : "";
}

int bitnet_isa_compiled(int isa) { return compiled(isa) ? 1 : 0; }
int bitnet_isa_supported(int isa) { return supported(isa) ? 1 : 0; }
int bitnet_best_isa(void) { return best_isa(); }

int bitnet_get_default_isa(void) {
  const int i = g_default_isa.load();
  return i < 0 ? best_isa() : i;
}

int bitnet_set_default_isa(int isa) {
  if (isa < 0) { g_default_isa.store(-1); return BITNET_OK; }
  if (!supported(isa)) return BITNET_EISA;
  g_default_isa.store(isa);
  return BITNET_OK;
}

const char* bitnet_cpu_name(void) { return features().brand.c_str(); }

void bitnet_set_num_threads(int n) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  g_nthreads = n > 0 ? n : cpu_count();
}

int bitnet_get_num_threads(void) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  return g_nthreads > 0 ? g_nthreads : cpu_count();
}

double bitnet_isa_peak_gmacs(int isa) {
  Kernel k;
  if (resolve_isa(isa, &k) || !k.peak) return 0.0;
  k.peak(1000);  // warm up (AMX: first use of the tile state)
  int64_t macs = 0, iters = 1000;
  const auto t0 = std::chrono::steady_clock::now();
  double s = 0.0;
  while (s < 0.02) {
    macs += k.peak(iters);
    iters *= 2;
    s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  return (double)macs / s / 1e9;
}

int bitnet_matmul_int(const int8_t* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* w, int64_t N, int64_t ldw,
                      int32_t* out, int64_t ldo, int isa) {
  return matmul_common(x, M, K, ldx, w, N, ldw, out, ldo, Epilogue{}, isa);
}

int bitnet_linear(const int8_t* x, const float* x_scale, int64_t M, int64_t K, int64_t ldx, const uint8_t* w,
                  int64_t N, int64_t ldw, float w_scale, const float* bias, float* out, int64_t ldo, int isa) {
  Epilogue e;
  e.to_float = true; e.x_scale = x_scale; e.w_scale = w_scale; e.bias = bias;
  return matmul_common(x, M, K, ldx, w, N, ldw, reinterpret_cast<int32_t*>(out), ldo, e, isa);
}

int bitnet_quantize_act(const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps, int8_t* xq,
                        int64_t ldq, float* scale, int isa) {
  if (M < 0 || K < 0 || ldx < K || ldq < K || bits < 2 || bits > 8) return BITNET_EINVAL;
  Kernel k;
  int rc = resolve_isa(isa, &k);
  if (rc) return rc;
  const int qp = (1 << (bits - 1)) - 1;
  for_tokens(M, K, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (row_nonfinite(x + m * ldx, K)) {   // NaN / inf row: codes 0, scale NaN or 0 (see nonfinite_scale)
        scale[m] = nonfinite_scale(x + m * ldx, K);
        std::memset(xq + m * ldq, 0, (size_t)K);
        continue;
      }
      const float s = act_scale(k.absmax(x + m * ldx, K), eps, qp);
      scale[m] = s;
      k.quant(x + m * ldx, K, s, (float)(-qp - 1), (float)qp, xq + m * ldq);
    }
  });
  return BITNET_OK;
}

int bitnet_bitlinear(const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps, const uint8_t* w,
                     int64_t N, int64_t ldw, float w_scale, const float* bias, float* out, int64_t ldo, int isa) {
  const float* scales[1] = {&w_scale};
  return bitnet_bitlinear_multi(x, M, K, ldx, bits, eps, nullptr, 0.0f, 1, &w, &N, ldw, scales, &bias, out, ldo, isa);
}

int bitnet_bitlinear_multi(const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps,
                           const float* norm_weight, float norm_eps, int nmat, const uint8_t* const* w,
                           const int64_t* n, int64_t ldw, const float* const* w_scale, const float* const* bias,
                           float* out, int64_t ldo, int isa) {
  if (nmat < 1 || bits < 2 || bits > 8 || !(norm_eps >= 0.0f)) return BITNET_EINVAL;
  int64_t total = 0;
  for (int j = 0; j < nmat; ++j) {
    if (n[j] < 0) return BITNET_EINVAL;
    total += n[j];
  }
  int rc = check_dims(M, K, ldx, total, ldw, ldo);
  if (rc) return rc;
  Kernel k;
  if ((rc = resolve_isa(isa, &k))) return rc;
  if (M == 0 || total == 0) return BITNET_OK;
  XBuf& xb = scratch();
  std::vector<float> xs((size_t)M);
  quantize_rows(k, x, M, K, ldx, bits, eps, norm_weight, norm_eps, xb, xs.data());
  const int64_t nblk = round_up(K, 128) / 128;
  std::vector<GemmArgs> args;
  std::vector<Epilogue> epis;
  int64_t off = 0;
  for (int j = 0; j < nmat; ++j) {
    args.push_back(GemmArgs{xb.x.data(), xb.ldx, xb.sum.data(), w[j], ldw, nblk,
                            reinterpret_cast<int32_t*>(out) + off, ldo});
    Epilogue e;
    e.to_float = true; e.x_scale = xs.data(); e.w_scale = *w_scale[j]; e.bias = bias[j];
    epis.push_back(e);
    off += n[j];
  }
  if (M > 3 || pool()->size() == 1 || M * total * nblk < 4096) {
    for (int j = 0; j < nmat; ++j) run_gemm(k, args[(size_t)j], M, n[j], epis[(size_t)j], xb);
    return BITNET_OK;
  }
  run_decode(k, args.data(), epis.data(), n, nmat, M);   // one wake-up of the pool for all matrices
  return BITNET_OK;
}

void bitnet_prefetch_wait(void) {
  pool()->stop_background();
}

int bitnet_prefetch_async(int n, const void* const* ptrs, const int64_t* lens) {
  if (n < 0) return BITNET_EINVAL;
  struct Range { const uint8_t* p; int64_t len; };
  std::vector<Range> ranges;
  int64_t total = 0;
  for (int i = 0; i < n; ++i) {
    if (lens[i] < 0) return BITNET_EINVAL;
    if (lens[i] == 0) continue;
    ranges.push_back(Range{static_cast<const uint8_t*>(ptrs[i]), lens[i]});
    total += lens[i];
  }
  std::shared_ptr<ThreadPool> p = pool();
  const int64_t workers = p->size() - 1;
  if (total == 0 || workers < 1) return BITNET_OK;
  ThreadPool* raw = p.get();  // the pool cancels and joins this job before it is destroyed
  const int64_t slice = (total + workers - 1) / workers;
  p->post_background(workers, [ranges, raw, slice](int64_t t) {
    // Read one byte of every cache line of bytes [t * slice, (t + 1) * slice) of the ranges, in order:
    // the lines land in this core's L2 and, as they are evicted, in the shared L3.
    int64_t skip = t * slice, left = slice;
    uint32_t sink = 0;
    for (const Range& r : ranges) {
      if (left <= 0) break;
      if (skip >= r.len) { skip -= r.len; continue; }
      const int64_t end = std::min(r.len, skip + left);
      for (int64_t i = skip; i < end; i += 64) {
        sink += *reinterpret_cast<const volatile uint8_t*>(r.p + i);
        if ((i & 4095) == 0 && raw->cancelled()) return;
      }
      left -= end - skip;
      skip = 0;
    }
    (void)sink;
  });
  return BITNET_OK;
}

}  // extern "C"
