// Small helpers shared by the x86 kernels (each kernel file is compiled with its own ISA flags: the
// anonymous namespace gives every file its own copy). Also compiles against csrc/emu (BITNET_EMULATE).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace bitnet {
namespace {

// An empty asm that claims to change v: the compiler must keep v in a register (so that one load serves
// several multiply-adds instead of being folded into each as a memory operand), and cannot merge chains
// it would otherwise see as identical (the peak probes). A no-op under the intrinsic emulation, whose
// vectors are plain structs.
inline void in_register(__m256i& v) {
#if defined(BITNET_EMULATE)
  (void)v;
#else
  asm("" : "+x"(v));
#endif
}
#if defined(__AVX512F__) || defined(BITNET_EMULATE)
inline void in_register(__m512i& v) {
#if defined(BITNET_EMULATE)
  (void)v;
#else
  asm("" : "+v"(v));
#endif
}
#endif

// Weight prefetch at two distances, for a register tile reading rows wr[0..RT) (ldw bytes apart) at byte
// `offset`: the same column of the next tile's RT rows into L1 (needed next), and of the tile kFarTiles
// ahead into L2, so that rows streamed from DRAM arrive before the near prefetch asks for them. The far
// one: decode (GEMV, 1-2 tokens) 1.55-1.59x tok/s at the 2.46B shape on a Zen 4 EPYC (2 threads, one
// process alternating builds, same tokens); 1.05-1.2x for kernels of 8-16 tokens with the weights evicted
// from cache there (the AVX-512 VNNI shared-code tile no longer takes it: see kFar below); 2, 3, 5 and 8
// tiles ahead measured, 3-8 alike.
constexpr int kFarTiles = 3;

// kFar = false: the near prefetch only. The AVX-512 VNNI shared-code tile (4 tokens x 4 rows, batched
// decode and prefill) takes it: on a Zen 5 EPYC the far prefetch made it 0.73-0.88x as fast in a 1-thread
// loop over a model's GEMMs (weights streamed from DRAM; dim 1024 at 16 and 64 tokens, 2B4T at 8), and
// 0.97-0.99x with 2 threads through bitlinear (2B4T layers, 16 and 128 tokens; one process, toggled per
// round); the batched decode step itself was alike (0.99-1.02x). The GEMV tile of decode keeps it (there
// 1.04-1.1x at 1-2 tokens, 1 thread).
template <int RT, class T, bool kFar = true>
inline void prefetch_weights(const T* const* wr, int64_t ldw, int64_t offset) {
  for (int r = 0; r < RT; ++r) {
    _mm_prefetch((const char*)(wr[r] + RT * ldw + offset), _MM_HINT_T0);
    if (kFar) _mm_prefetch((const char*)(wr[r] + kFarTiles * RT * ldw + offset), _MM_HINT_T1);
  }
}

}  // namespace
}  // namespace bitnet
