// CPU features (cpuid / xgetbv, AMX permission) and the ISA resolver shared by the ternary and the int8
// paths. See isa.h.
#include <atomic>
#include <cstring>
#include <string>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

#include "bitnet_native.h"
#include "isa.h"

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

// The int8 GEMM of an ISA (AMX-INT8 on amx, AVX-512 VNNI on avx512vnni; the AVX2 one serves AVX2 and
// AVX-VNNI; scalar elsewhere).
int8_gemm_fn int8_kernel_for(int isa) {
#if defined(BITNET_HAVE_AMX)
  if (isa == BITNET_ISA_AMX) return int8_gemm_amx;
#endif
#if defined(BITNET_HAVE_INT8_AVX512VNNI)
  if (isa == BITNET_ISA_AVX512VNNI) return int8_gemm_avx512vnni;
#endif
#if defined(BITNET_HAVE_AVX2)
  if (isa == BITNET_ISA_AVX2 || isa == BITNET_ISA_AVXVNNI || isa == BITNET_ISA_AVX512VNNI || isa == BITNET_ISA_AMX)
    return int8_gemm_avx2;
#endif
  (void)isa;
  return int8_gemm_scalar;
}

std::atomic<int> g_default_isa{-1};

}  // namespace

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

int best_isa() {
  static const int order[] = {BITNET_ISA_AMX, BITNET_ISA_AVX512VNNI, BITNET_ISA_AVXVNNI, BITNET_ISA_AVX2, BITNET_ISA_NEON};
  for (int isa : order)
    if (supported(isa)) return isa;
  return BITNET_ISA_SCALAR;
}

int default_isa() {
  const int i = g_default_isa.load(std::memory_order_relaxed);
  return i < 0 ? best_isa() : i;
}

int set_default_isa(int isa) {
  if (isa < 0) { g_default_isa.store(-1); return BITNET_OK; }
  if (!supported(isa)) return BITNET_EISA;
  g_default_isa.store(isa);
  return BITNET_OK;
}

const std::string& cpu_brand() { return features().brand; }

int resolve_isa(int isa, IsaKernels* out) {
  if (isa < 0) isa = default_isa();
  if (!supported(isa)) return BITNET_EISA;
  out->isa = isa;
  out->ternary = kernel_for(isa);
  out->int8 = int8_kernel_for(isa);
  return BITNET_OK;
}

int resolve_isa(int isa, Kernel* k) {
  IsaKernels r;
  const int rc = resolve_isa(isa, &r);
  if (rc == BITNET_OK) *k = r.ternary;
  return rc;
}

}  // namespace bitnet
