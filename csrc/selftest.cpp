// Self-test of the native kernels without Python: every supported ISA against the scalar kernel
// (exact int32), and a small timing of the decode GEMV. Build with -DBITNET_SELFTEST=ON.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <ctime>
#include <vector>

#include "bitnet_native.h"

static int check(std::mt19937& rng, int M, int K, int N) {
  const int Kp = (K + 127) / 128 * 128;
  std::vector<int8_t> x((size_t)M * K);
  std::vector<uint8_t> w((size_t)N * Kp / 4);
  std::uniform_int_distribution<int> dx(-128, 127), dc(0, 2);
  for (auto& v : x) v = (int8_t)dx(rng);
  // random codes, padding codes = 1 as the packer writes
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < Kp; ++k) {
      const int c = k < K ? dc(rng) : 1;
      const int b = k / 128, q = (k % 128) / 32, j = k % 32;
      w[(size_t)n * Kp / 4 + 32 * b + j] |= (uint8_t)(c << (2 * q));
    }
  std::vector<int32_t> ref((size_t)M * N), out((size_t)M * N);
  if (bitnet_matmul_int(x.data(), M, K, K, w.data(), N, Kp / 4, ref.data(), N, BITNET_ISA_SCALAR)) return 1;
  // naive check of the scalar kernel itself
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      int32_t acc = 0;
      for (int k = 0; k < K; ++k) {
        const int b = k / 128, q = (k % 128) / 32, j = k % 32;
        const int c = (w[(size_t)n * Kp / 4 + 32 * b + j] >> (2 * q)) & 3;
        acc += x[(size_t)m * K + k] * (c - 1);
      }
      if (acc != ref[(size_t)m * N + n]) { std::printf("scalar mismatch M=%d K=%d N=%d\n", M, K, N); return 1; }
    }
  // fused quantise + matmul: every ISA gives the scalar result bit for bit
  std::vector<float> xf((size_t)M * K), yref((size_t)M * N), y((size_t)M * N), bias(N);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  for (auto& v : xf) v = nd(rng);
  for (auto& v : bias) v = nd(rng);
  if (bitnet_bitlinear(xf.data(), M, K, K, 8, 1e-5f, w.data(), N, Kp / 4, 0.3f, bias.data(), yref.data(), N,
                       BITNET_ISA_SCALAR)) return 1;
  for (int isa = 0; isa < BITNET_ISA_COUNT; ++isa) {
    if (!bitnet_isa_supported(isa)) continue;
    if (bitnet_bitlinear(xf.data(), M, K, K, 8, 1e-5f, w.data(), N, Kp / 4, 0.3f, bias.data(), y.data(), N, isa))
      return 1;
    if (std::memcmp(y.data(), yref.data(), y.size() * 4)) {
      std::printf("%s bitlinear mismatch M=%d K=%d N=%d\n", bitnet_isa_name(isa), M, K, N);
      return 1;
    }
  }
  for (int isa = 0; isa < BITNET_ISA_COUNT; ++isa) {
    if (!bitnet_isa_supported(isa)) continue;
    std::fill(out.begin(), out.end(), 0x7f7f7f7f);
    if (bitnet_matmul_int(x.data(), M, K, K, w.data(), N, Kp / 4, out.data(), N, isa)) return 1;
    if (std::memcmp(out.data(), ref.data(), out.size() * 4)) {
      std::printf("%s mismatch M=%d K=%d N=%d\n", bitnet_isa_name(isa), M, K, N);
      return 1;
    }
  }
  return 0;
}

int main(int argc, char** argv) {
  std::mt19937 rng(1234);
  std::printf("cpu: %s\nisas:", bitnet_cpu_name());
  for (int isa = 0; isa < BITNET_ISA_COUNT; ++isa)
    if (bitnet_isa_supported(isa)) std::printf(" %s", bitnet_isa_name(isa));
  std::printf("\n");
  int fails = 0;
  const int Ms[] = {1, 2, 3, 4, 5, 7, 17, 70};
  const int Ks[] = {1, 31, 128, 129, 255, 256, 384, 700, 2560};
  const int Ns[] = {1, 3, 4, 5, 17, 64, 130};
  for (int M : Ms)
    for (int K : Ks)
      for (int N : Ns) fails += check(rng, M, K, N);
  std::printf("%s\n", fails ? "FAILED" : "all ISAs match the scalar kernel");
  if (argc > 4) bitnet_set_num_threads(std::atoi(argv[4]));
  if (argc > 1) {  // timing: selftest N K iters threads M cold
    const int N = std::atoi(argv[1]), K = argc > 2 ? std::atoi(argv[2]) : 2560, it = argc > 3 ? std::atoi(argv[3]) : 200;
    const int M = argc > 5 ? std::atoi(argv[5]) : 1;
    const bool cold = argc > 6 && std::atoi(argv[6]) != 0;  // rotate over copies of W (> 256 MB): weights from DRAM
    const int64_t ldw = (K + 127) / 128 * 32;
    const size_t wbytes = (size_t)N * ldw;
    const int copies = cold ? (int)std::max<size_t>(2, (256u << 20) / wbytes) : 1;
    std::vector<int8_t> x((size_t)M * K, 3);
    std::vector<uint8_t> w(wbytes * copies, 0x99);
    std::vector<int32_t> out((size_t)M * N);
    {  // read bandwidth of the same buffer, for reference
      double best = 1e30;
      for (int r = 0; r < 3; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        uint64_t acc = 0;
        const uint64_t* p = (const uint64_t*)w.data();
        for (size_t i = 0; i < w.size() / 8; i += 8) acc += p[i];   // one load per cache line
        volatile uint64_t sink = acc; (void)sink;
        best = std::min(best, std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
      }
      std::printf("1-thread read of %zu MB: %.1f GB/s\n", w.size() >> 20, w.size() / best / 1e3);
    }
    for (int isa = 0; isa < BITNET_ISA_COUNT; ++isa) {
      if (!bitnet_isa_supported(isa)) continue;
      for (int i = 0; i < 2; ++i) bitnet_matmul_int(x.data(), M, K, K, w.data(), N, ldw, out.data(), N, isa);
      double us = 1e30, sum = 0;  // best and mean of `it` calls (the machine may be shared)
      for (int i = 0; i < it; ++i) {
        const uint8_t* wi = w.data() + wbytes * (i % copies);
        auto t0 = std::chrono::steady_clock::now();
        bitnet_matmul_int(x.data(), M, K, K, wi, N, ldw, out.data(), N, isa);
        double d = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
        if (std::getenv("BITNET_SELFTEST_CPUTIME")) {  // 1 thread on a busy machine: CPU time of the call
          static timespec last{};
          timespec now; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
          if (i > 0) d = (now.tv_sec - last.tv_sec) * 1e6 + (now.tv_nsec - last.tv_nsec) / 1e3;
          last = now;
        }
        us = std::min(us, d); sum += d;
      }
      std::printf("%-10s M=%d %dx%d%s: best %9.1f us (mean %9.1f)  %6.1f GB/s of weights  %6.1f Gop/s (threads %d)\n",
                  bitnet_isa_name(isa), M, N, K, cold ? " cold" : "", us, sum / it, wbytes / us / 1e3,
                  2.0 * M * N * K / us / 1e3, bitnet_get_num_threads());
    }
  }
  return fails ? 1 : 0;
}
