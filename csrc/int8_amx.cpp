// AMX-INT8 int8 x int8 kernel (the int8 LM head) for Sapphire Rapids and later Xeons.
// Compiled with -mamx-tile -mamx-int8 and the AVX-512 flags; chosen at run time for isa "amx".
//
//   C(16 n x 16 m, int32) += W[n0:n0+16, k:k+64] (A tile, signed) . xv (B tile, signed)   (TDPBSSD)
//
// The weights W (N, ldw) row-major are already the A-tile layout (16 rows x 64 bytes, stride ldw):
// loaded straight from the model, no repacking. The activations of a block of 16 tokens are laid out
// once per call in the VNNI layout of a B tile (int8_amx_layout_x: per 64 k, 16 k-groups x 16 tokens
// x 4 bytes; missing tokens and k >= K are 0). Up to 4 C tiles over consecutive 16-row blocks share
// one B tile load (kBlocksPerGroup). Each C tile is written transposed to out[m, n]; the integer sums are exact, so the
// results equal the other int8 kernels' bit for bit (the float epilogue is the driver's, shared).
//
// K tail (K % 64): the last partial 64 bytes of each weight row are copied with masked loads (no read
// past K) into a zero-padded 1 KB buffer. N tail ((n1 - n0) % 16 rows): the AVX2 kernel.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12 false positives inside the AVX-512 headers
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "amx_tiles.h"
#include "int8.h"

namespace bitnet {

int64_t int8_amx_xv_bytes(int64_t M, int64_t K) { return ((M + 15) / 16) * ((K + 63) / 64) * 1024; }

// xv[(mb * nkc + kc) * 1024 + 64 g + 4 t + j] = x[16 mb + t, 64 kc + 4 g + j]  (0 outside M x K)
void int8_amx_layout_x(const int8_t* x, int64_t ldx, int64_t M, int64_t K, int8_t* xv) {
  const int64_t nkc = (K + 63) / 64;
  std::memset(xv, 0, (size_t)int8_amx_xv_bytes(M, K));
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* s = x + m * ldx;
    int8_t* d = xv + (m / 16) * nkc * 1024 + 4 * (m % 16);
    for (int64_t k = 0; k < K; ++k) d[(k >> 6) * 1024 + ((k & 63) >> 2) * 64 + (k & 3)] = s[k];
  }
}

namespace {

// Software prefetch distance (bytes ahead along each of the 16 weight rows of an A tile), and the
// number of consecutive 16-row blocks (C tiles, 1..4) sharing one B tile load. Measured at N=128256,
// K=2560 (benchmarks/bench_int8_head.py): 1 block (16 row streams) reads the weights faster than 4
// (64 interleaved streams), at M = 1 and 16 alike; the B tile reload is an L1 hit.
constexpr int kPrefetch = 1024;
constexpr int kBlocksPerGroup = 1;

inline void prefetch_rows(const int8_t* w, int64_t ldw) {
  for (int r = 0; r < 16; ++r) _mm_prefetch((const char*)(w + r * ldw + kPrefetch), _MM_HINT_T0);
}

// out[m + t, n + 16 i + r] = C_i[r, t] for t < mt (C_i stored row-major 16 x 16 in c).
inline void store_transposed(const int32_t* c, int32_t* out, int64_t ldo, int mt) {
  for (int t = 0; t < mt; ++t)
    for (int r = 0; r < 16; ++r) out[t * ldo + r] = c[r * 16 + t];
}

// NT (1..4) consecutive 16-row weight blocks starting at row n, one block of mt <= 16 tokens whose
// VNNI activations are xb (nkc KB); tail: the zero-padded K-tail A tiles (NT KB) or null.
template <int NT>
void group(const Int8Args& a, const int8_t* xb, const int8_t* tail, int64_t m, int mt, int64_t n) {
  const int64_t ldw = a.ldw, kfull = a.K / 64;
  const int8_t* w0 = a.w + n * ldw;
  const int8_t* w1 = w0 + 16 * ldw;
  const int8_t* w2 = w1 + 16 * ldw;
  const int8_t* w3 = w2 + 16 * ldw;
  _tile_zero(0);
  if constexpr (NT > 1) _tile_zero(1);
  if constexpr (NT > 2) _tile_zero(2);
  if constexpr (NT > 3) _tile_zero(3);
  for (int64_t kc = 0; kc < kfull; ++kc) {
    const int64_t off = 64 * kc;
    _tile_loadd(4, xb + 1024 * kc, 64);
    prefetch_rows(w0 + off, ldw);
    _tile_loadd(5, w0 + off, ldw);
    _tile_dpbssd(0, 5, 4);
    if constexpr (NT > 1) {
      prefetch_rows(w1 + off, ldw);
      _tile_loadd(6, w1 + off, ldw);
      _tile_dpbssd(1, 6, 4);
    }
    if constexpr (NT > 2) {
      prefetch_rows(w2 + off, ldw);
      _tile_loadd(5, w2 + off, ldw);
      _tile_dpbssd(2, 5, 4);
    }
    if constexpr (NT > 3) {
      prefetch_rows(w3 + off, ldw);
      _tile_loadd(6, w3 + off, ldw);
      _tile_dpbssd(3, 6, 4);
    }
  }
  if (tail) {
    _tile_loadd(4, xb + 1024 * kfull, 64);
    _tile_loadd(5, tail, 64);
    _tile_dpbssd(0, 5, 4);
    if constexpr (NT > 1) {
      _tile_loadd(6, tail + 1024, 64);
      _tile_dpbssd(1, 6, 4);
    }
    if constexpr (NT > 2) {
      _tile_loadd(5, tail + 2048, 64);
      _tile_dpbssd(2, 5, 4);
    }
    if constexpr (NT > 3) {
      _tile_loadd(6, tail + 3072, 64);
      _tile_dpbssd(3, 6, 4);
    }
  }
  alignas(64) int32_t c[16 * 16];
  int32_t* o = a.out + m * a.ldo + n;
  _tile_stored(0, c, 64);
  store_transposed(c, o, a.ldo, mt);
  if constexpr (NT > 1) {
    _tile_stored(1, c, 64);
    store_transposed(c, o + 16, a.ldo, mt);
  }
  if constexpr (NT > 2) {
    _tile_stored(2, c, 64);
    store_transposed(c, o + 32, a.ldo, mt);
  }
  if constexpr (NT > 3) {
    _tile_stored(3, c, 64);
    store_transposed(c, o + 48, a.ldo, mt);
  }
}

}  // namespace

void int8_gemm_amx(const Int8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (m1 <= m0 || n1 <= n0) return;
  const int64_t K = a.K, nkc = (K + 63) / 64, kfull = K / 64;
  const int ktail = (int)(K % 64);
  // VNNI activations: the driver's (whole x, blocks of 16 from token 0) or our own for [m0, m1).
  std::vector<int8_t> own;
  const int8_t* xv = a.xv;
  int64_t mbase = 0;  // token of xv's block 0
  if (!xv || m0 % 16) {
    own.resize((size_t)int8_amx_xv_bytes(m1 - m0, K));
    int8_amx_layout_x(a.x + m0 * a.ldx, a.ldx, m1 - m0, K, own.data());
    xv = own.data();
    mbase = m0;
  }
  const int64_t nend = n0 + (n1 - n0) / 16 * 16;  // rows [n0, nend) on tiles, the rest on AVX2
  if (nend > n0) {
    TileScope scope;
    alignas(64) int8_t tail[4 * 1024];
    const __mmask64 tmask = ktail ? (~(__mmask64)0 >> (64 - ktail)) : 0;
    for (int64_t n = n0; n < nend; n += 16 * kBlocksPerGroup) {
      const int nt = (int)std::min<int64_t>(kBlocksPerGroup, (nend - n) / 16);
      if (ktail)
        for (int r = 0; r < 16 * nt; ++r)
          _mm512_store_si512((void*)(tail + 64 * r),
                             _mm512_maskz_loadu_epi8(tmask, a.w + (n + r) * a.ldw + 64 * kfull));
      const int8_t* tp = ktail ? tail : nullptr;
      for (int64_t m = m0; m < m1; m += 16) {
        const int mt = (int)std::min<int64_t>(16, m1 - m);
        const int8_t* xb = xv + ((m - mbase) / 16) * nkc * 1024;
        switch (nt) {
          case 4: group<4>(a, xb, tp, m, mt, n); break;
          case 3: group<3>(a, xb, tp, m, mt, n); break;
          case 2: group<2>(a, xb, tp, m, mt, n); break;
          default: group<1>(a, xb, tp, m, mt, n); break;
        }
      }
    }
  }
  if (nend < n1) int8_gemm_avx2(a, m0, m1, nend, n1);
}

}  // namespace bitnet
