// AMX-INT8 int8 x int8 kernel (the int8 LM head) for Sapphire Rapids and later Xeons.
// Compiled with -mamx-tile -mamx-int8 and the AVX-512 flags; chosen at run time for isa "amx".
//
//   C(16 n x 16 m, int32) += W[n0:n0+16, k:k+64] (A tile, signed) . xv (B tile, signed)   (TDPBSSD)
//
// The weights W (N, ldw) row-major are already the A-tile layout (16 rows x 64 bytes, stride ldw):
// loaded straight from the model, no repacking. The activations of a block of 16 tokens are laid out
// once per call in the VNNI layout of a B tile (int8_amx_layout_x: per 64 k, 16 k-groups x 16 tokens
// x 4 bytes; missing tokens and k >= K are 0). One A tile load serves up to 4 blocks of 16 tokens
// (4 C tiles), so the weights are read from memory once for up to 64 tokens. Each C tile is
// transposed in AVX-512 registers to out[m, n]; the integer sums are exact, so the results equal the
// other int8 kernels' bit for bit (the float epilogue is the driver's, shared).
//
// K tail (K % 64): the last partial 64 bytes of each weight row are copied with masked loads (no read
// past K) into a zero-padded 1 KB A tile. N tail ((n1 - n0) % 16 rows): the AVX2 kernel.
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

// Software prefetch distance: bytes ahead along each of the 16 weight rows of an A tile. (Measured at
// N=128256, K=2560, benchmarks/bench_int8_head.py: one 16-row block at a time, 16 row streams, reads
// the weights faster than 4 blocks sharing each B tile, 64 interleaved streams.)
constexpr int kPrefetch = 1024;

// Up to this many 16-token blocks share each weight A tile (C tiles 0-3; A tile 4; B tiles 5, 6).
constexpr int kMaxTokenBlocks = 4;

inline void prefetch_rows(const int8_t* w, int64_t ldw) {
  for (int r = 0; r < 16; ++r) _mm_prefetch((const char*)(w + r * ldw + kPrefetch), _MM_HINT_T0);
}

// c: a stored C tile (16 weight rows x 16 tokens, row-major) -> out[t, 0:16] for t < mt, transposed in
// registers. (The tile intrinsics take literal tile numbers, so the callers store the tile.)
inline void write_c(const int32_t* c, int32_t* out, int64_t ldo, int mt) {
  if (mt < 8) {  // a few tokens (decode): strided copies beat a full transpose
    for (int t = 0; t < mt; ++t)
      for (int i = 0; i < 16; ++i) out[t * ldo + i] = c[16 * i + t];
    return;
  }
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512((const void*)(c + 16 * i));
  transpose16(r);
  for (int t = 0; t < mt; ++t) _mm512_storeu_si512((void*)(out + t * ldo), r[t]);
}

// Weight rows [n, n + 16) x NB (1..4) blocks of 16 tokens from token m, whose VNNI activations are
// at xb + j * xstride (block j, nkc KB each); the last block has mlast tokens. tail: the zero-padded
// K-tail A tile (1 KB) or null. One A tile load serves the NB blocks (the weights are read once).
template <int NB>
void row_block(const Int8Args& a, const int8_t* xb, int64_t xstride, const int8_t* tail, int64_t m, int mlast,
               int64_t n) {
  const int64_t ldw = a.ldw, kfull = a.K / 64;
  const int8_t* w = a.w + n * ldw;
  _tile_zero(0);
  if constexpr (NB > 1) _tile_zero(1);
  if constexpr (NB > 2) _tile_zero(2);
  if constexpr (NB > 3) _tile_zero(3);
  auto step = [&](const int8_t* wt, int64_t wstride, int64_t kc) {
    _tile_loadd(5, xb + 1024 * kc, 64);
    _tile_loadd(4, wt, wstride);
    _tile_dpbssd(0, 4, 5);
    if constexpr (NB > 1) {
      _tile_loadd(6, xb + xstride + 1024 * kc, 64);
      _tile_dpbssd(1, 4, 6);
    }
    if constexpr (NB > 2) {
      _tile_loadd(5, xb + 2 * xstride + 1024 * kc, 64);
      _tile_dpbssd(2, 4, 5);
    }
    if constexpr (NB > 3) {
      _tile_loadd(6, xb + 3 * xstride + 1024 * kc, 64);
      _tile_dpbssd(3, 4, 6);
    }
  };
  for (int64_t kc = 0; kc < kfull; ++kc) {
    prefetch_rows(w + 64 * kc, ldw);
    step(w + 64 * kc, ldw, kc);
  }
  if (tail) step(tail, 64, kfull);
  int32_t* o = a.out + m * a.ldo + n;
  const int64_t o16 = 16 * a.ldo;
  alignas(64) int32_t c[4][16 * 16];
  _tile_stored(0, c[0], 64);
  if constexpr (NB > 1) _tile_stored(1, c[1], 64);
  if constexpr (NB > 2) _tile_stored(2, c[2], 64);
  if constexpr (NB > 3) _tile_stored(3, c[3], 64);
  for (int j = 0; j < NB; ++j) write_c(c[j], o + j * o16, a.ldo, j == NB - 1 ? mlast : 16);
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
    alignas(64) int8_t tail[1024];
    const __mmask64 tmask = ktail ? (~(__mmask64)0 >> (64 - ktail)) : 0;
    const int8_t* tp = ktail ? tail : nullptr;
    const int64_t xstride = nkc * 1024;
    for (int64_t n = n0; n < nend; n += 16) {
      if (ktail)  // the last K % 64 bytes of the 16 rows, masked: nothing read past a row's K
        for (int r = 0; r < 16; ++r)
          _mm512_store_si512((void*)(tail + 64 * r),
                             _mm512_maskz_loadu_epi8(tmask, a.w + (n + r) * a.ldw + 64 * kfull));
      for (int64_t m = m0; m < m1; m += 16 * kMaxTokenBlocks) {
        const int64_t left = std::min<int64_t>(m1 - m, 16 * kMaxTokenBlocks);
        const int nb = (int)((left + 15) / 16), mlast = (int)(left - 16 * (nb - 1));
        const int8_t* xb = xv + ((m - mbase) / 16) * xstride;
        switch (nb) {
          case 4: row_block<4>(a, xb, xstride, tp, m, mlast, n); break;
          case 3: row_block<3>(a, xb, xstride, tp, m, mlast, n); break;
          case 2: row_block<2>(a, xb, xstride, tp, m, mlast, n); break;
          default: row_block<1>(a, xb, xstride, tp, m, mlast, n); break;
        }
      }
    }
  }
  if (nend < n1) int8_gemm_avx2(a, m0, m1, nend, n1);
}

}  // namespace bitnet
