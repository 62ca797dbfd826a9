// AMX-INT8 kernel (Sapphire Rapids and later Xeons): prefill-sized GEMMs on the tile unit.
// Compiled with -mamx-tile -mamx-int8 and the AVX-512 VNNI flags; chosen at run time.
//
// Small M (decode) stays on the AVX-512 VNNI kernel (memory bound: tiles would not help). For
// M >= kPanelMinM the driver hands this kernel tasks of up to kPanelMaxM tokens x a range of weight
// rows, taken 32 rows (a panel) at a time and, along K, 2 pairs of I2 blocks (512 k) at a time:
//
//   1. the chunk's I2 codes are unpacked into an L1 buffer of codes {0,1,2}, tile-major, in the same
//      "pair interleaved" k order as the activations (kernels.h): one 64-byte load + shift/mask gives
//      64 codes in that order, no shuffles;
//   2. C'(n, m) += sum_k codes[n, k] * x[m, k] with TDPBUSD (A = codes, unsigned; B = activations,
//      signed), 2x2 tiles of 16 rows x 16 tokens, for every 32-token block of the task (the
//      accumulators of each block are kept in memory between chunks, or in the tile registers when
//      the task has one block). The activations come in the "VNNI" layout the driver builds once
//      per call (kernels.h: xv);
//   3. each 16x16 int32 tile is transposed in AVX-512 registers to out[m, n] rows, minus xsum[m]
//      (codes are W + 1), and the float epilogue y = acc * w_scale / x_scale[m] (+ bias) is applied
//      there with the same float32 operations, in the same order, as float_epilogue (bit for bit).
//
// Weights act as the tile "A" operand so that unpacking needs no transpose; the one transpose per
// output tile costs ~64 shuffles against K/64 tile products of 16 cycles each.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12 false positives inside the AVX-512 headers
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "amx_tiles.h"
#include "kernels.h"

namespace bitnet {
namespace {

// Tile palette 1: tiles 0-3 accumulators C'(16 weight rows x 16 tokens, int32), 4-5 weight codes A
// (16 rows x 64 bytes), 6-7 activations B (16 k-groups x 16 tokens x 4 bytes).
// (TileConfig, TileScope: our tile configuration for one call, the thread's previous one back after;
// transpose16: see amx_tiles.h.)

// Pairs of I2 blocks per chunk: the chunk's codes (32 rows x 4 steps x 64 per pair = 8 KB per pair)
// are unpacked into L1 and used at once by every 32-token block of the task. Unpacking a whole panel
// first kept the codes in L2, where the stores alone run at ~10 B/cycle (a third of the time); 2 pairs
// (16 KB, + 16 KB of accumulators) measured 1.2-1.3x faster than 1 or 3, 4 pairs overflow L1.
constexpr int64_t kPairsPerChunk = 2;

// k steps (of 64) ahead that tile_steps prefetches the activation tiles into L1.
constexpr int64_t kPrefetchSteps = 2;

// Unpacks pairs of I2 blocks [p0, p1) of weight rows [n0, n0 + rows) (rows <= 32) into tile-major
// codes: for local k step s (64 values of the pair-interleaved k order; pair p gives steps
// 4 (p - p0) .. + 3 by shifts 0, 2, 4, 6) and tile i (rows 16i .. 16i + 15), the 16 x 64 codes are the
// 1 KB at codes + 1024 (2s + i), so that every tile load reads one contiguous KB. Rows past `rows`
// are zero (their outputs are discarded). next_panel: the first I2 row of the panel this thread unpacks
// after this one (32 rows on), or nullptr when there is none.
void unpack_pairs(const GemmArgs& a, int64_t n0, int rows, int64_t p0, int64_t p1, bool to_l1, uint8_t* codes,
                  const uint8_t* next_panel) {
  const __m512i m3 = _mm512_set1_epi8(3);
  const int64_t npair = a.nblk / 2;  // full pairs; an odd last block is pair npair
  const int nrows = rows > 16 ? 32 : 16;
  for (int64_t p = p0; p < p1; ++p) {
    uint8_t* d0 = codes + 2048 * 4 * (p - p0);
    for (int r = 0; r < nrows; ++r) {
      uint8_t* d = d0 + 1024 * (r / 16) + 64 * (r % 16);
      if (r >= rows) {
        for (int q = 0; q < 4; ++q) _mm512_storeu_si512((void*)(d + 2048 * q), _mm512_setzero_si512());
        continue;
      }
      const uint8_t* src = a.w + (n0 + r) * a.ldw + 64 * p;
      // 32 interleaved row streams defeat the hardware prefetcher: ask for this row's line of the next
      // chunk (kPairsPerChunk pairs of 64 bytes on), needed one chunk of tile products from now; past
      // the row's end, the same row of the next panel (its first chunk; the next row's line, as before,
      // had been read already). (The line of the next panel, 32 rows on, for every chunk came a whole
      // panel early and was often evicted again: prefill A/B 1.0-1.4x, never slower.)
      const int64_t ahead = 64 * (p + kPairsPerChunk);
      const uint8_t* pf = ahead < a.ldw                        ? a.w + (n0 + r) * a.ldw + ahead
                          : next_panel && ahead < 2 * a.ldw ? next_panel + r * a.ldw + (ahead - a.ldw)
                                                            : nullptr;
      if (pf && to_l1) _mm_prefetch((const char*)pf, _MM_HINT_T0);
      else if (pf) _mm_prefetch((const char*)pf, _MM_HINT_T1);
      // An odd last block reads 32 bytes: the upper half is code 0 against zero activations.
      const __m512i wv = p < npair ? _mm512_loadu_si512((const void*)src)
                                   : _mm512_maskz_loadu_epi8((__mmask64)0xFFFFFFFFull, src);
      _mm512_storeu_si512((void*)(d), _mm512_and_si512(wv, m3));
      _mm512_storeu_si512((void*)(d + 2048), _mm512_and_si512(_mm512_srli_epi16(wv, 2), m3));
      _mm512_storeu_si512((void*)(d + 4096), _mm512_and_si512(_mm512_srli_epi16(wv, 4), m3));
      _mm512_storeu_si512((void*)(d + 6144), _mm512_and_si512(_mm512_srli_epi16(wv, 6), m3));
    }
  }
}

// Writes the 16x16 int32 tile c (row i = weight row n0 + i, column j = token m0 + j) to out[m, n]
// for m < m0 + mrows, n < n0 + nrows, minus xsum, through the float epilogue when e.x_scale is set.
void store_tile(const GemmArgs& a, const PanelEpilogue& e, const int32_t* c, int64_t m0, int mrows,
                int64_t n0, int nrows) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512((const void*)(c + 16 * i));
  transpose16(r);  // r[j]: token m0 + j, weight rows n0 .. n0 + 15
  const __mmask16 mask = (__mmask16)((1u << nrows) - 1u);
  const __m512 ws = _mm512_set1_ps(e.w_scale);
  const __m512 bias = e.bias ? _mm512_maskz_loadu_ps(mask, e.bias + n0) : _mm512_setzero_ps();
  for (int j = 0; j < mrows; ++j) {
    const int64_t m = m0 + j;
    const __m512i acc = _mm512_sub_epi32(r[j], _mm512_set1_epi32(a.xsum[m]));
    int32_t* o = a.out + m * a.ldo + n0;
    if (!e.x_scale) {
      _mm512_mask_storeu_epi32(o, mask, acc);
      continue;
    }
    // float_epilogue: y = (float)acc * w_scale / x_scale[m] (+ bias[n]), float32, same order
    __m512 y = _mm512_div_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), ws), _mm512_set1_ps(e.x_scale[m]));
    if (e.bias) y = _mm512_add_ps(y, bias);
    _mm512_mask_storeu_ps(reinterpret_cast<float*>(o), mask, y);
  }
}

// The output lines a block of tokens writes after its last chunk (rows: tokens [m, m + mrows) of out,
// `lines` 64-byte lines from column n0 each), fetched for writing during that chunk's tile products so
// that the stores of store_tile do not wait for the lines' read-for-ownership. Empty: base == nullptr.
struct OutLines {
  const int32_t* base = nullptr;
  int64_t ldo = 0;
  int mrows = 0, lines = 0;
};

// Adds to the C' tiles of NA x 16 weight rows and NB x 16 tokens the products over `steps` k steps
// (codes: one chunk, see unpack_pairs; xv_k: the activations of the chunk's first step for the first
// token group of 16; the next group follows at 16 * ldx). The accumulators start from zero (zero),
// from c (otherwise); they are written back to c (A-tile i, B-tile j at 256 (2i + j) int32) when
// `store`, else they stay in the tile registers for the next chunk.
template <int NA, int NB>
void tile_steps(const uint8_t* codes, int64_t ldx, const int8_t* xv_k, const int8_t* xv_next, bool prefetch,
                int64_t steps, bool zero, bool load, bool store, int32_t* c, const OutLines& out) {
  if (zero) {
    _tile_zero(0);
    if (NB > 1) _tile_zero(1);
    if (NA > 1) _tile_zero(2);
    if (NA > 1 && NB > 1) _tile_zero(3);
  } else if (load) {
    _tile_loadd(0, c, 64);
    if (NB > 1) _tile_loadd(1, c + 256, 64);
    if (NA > 1) _tile_loadd(2, c + 512, 64);
    if (NA > 1 && NB > 1) _tile_loadd(3, c + 768, 64);
  }
  const int64_t group = 16 * ldx;
  for (int64_t s = 0; s < steps; ++s) {
    // The B tiles come from L2 (the whole xv of the call does not fit in L1) and their latency stalls the
    // tile loads: fetch the lines of the step kPrefetchSteps ahead into L1 (past this block's last step:
    // the first steps of the block that comes next, xv_next, when there is one).
    const int64_t t = s + kPrefetchSteps;
    const int8_t* pf = !prefetch ? nullptr : t < steps ? xv_k + 1024 * t : xv_next ? xv_next + 1024 * (t - steps) : nullptr;
    if (pf)
      for (int l = 0; l < 16; ++l) {
        _mm_prefetch((const char*)(pf + 64 * l), _MM_HINT_T0);
        _mm_prefetch((const char*)(pf + group + 64 * l), _MM_HINT_T0);
      }
    _tile_loadd(4, codes + 2048 * s, 64);
    if (NA > 1) _tile_loadd(5, codes + 2048 * s + 1024, 64);
    _tile_loadd(6, xv_k + 1024 * s, 64);
    if (NB > 1) _tile_loadd(7, xv_k + group + 1024 * s, 64);
    _tile_dpbusd(0, 4, 6);
    if (NB > 1) _tile_dpbusd(1, 4, 7);
    if (NA > 1) _tile_dpbusd(2, 5, 6);
    if (NA > 1 && NB > 1) _tile_dpbusd(3, 5, 7);
    if (out.base) {  // this step's share of the output lines (written inline: GCC drops a call that only prefetches)
      const int per = (int)((out.mrows + steps - 1) / steps);
      for (int j = (int)s * per; j < std::min<int>(out.mrows, ((int)s + 1) * per); ++j)
        for (int l = 0; l < out.lines; ++l) _mm_prefetch((const char*)(out.base + j * out.ldo + 16 * l), _MM_HINT_ET0);
    }
  }
  if (store) {
    _tile_stored(0, c, 64);
    if (NB > 1) _tile_stored(1, c + 256, 64);
    if (NA > 1) _tile_stored(2, c + 512, 64);
    if (NA > 1 && NB > 1) _tile_stored(3, c + 768, 64);
  }
}

// Tokens [m0, m1) (<= kPanelMaxM) x one panel of <= 32 weight rows [n0, n1); c: kPanelMaxM / 32
// blocks of 1024 int32 accumulators (one block: they stay in the tile registers between chunks).
template <int NA>
void panel_rows(const GemmArgs& a, const PanelEpilogue& e, const int8_t* xv, int64_t m0, int64_t m1,
                int64_t n0, int64_t n1, uint8_t* codes, int32_t* c, const uint8_t* next_panel) {
  const int64_t npairs = a.ldx / 256;  // ldx = 256 (full pairs + an odd last block)
  const bool one = m1 - m0 <= 32;
  for (int64_t p0 = 0; p0 < npairs; p0 += kPairsPerChunk) {
    const int64_t p1 = std::min(npairs, p0 + kPairsPerChunk);
    unpack_pairs(a, n0, (int)(n1 - n0), p0, p1, one, codes, next_panel);
    const bool first = p0 == 0, last = p1 == npairs;
    for (int64_t m = m0; m < m1; m += 32) {
      const int8_t* xv_k = xv + (m / 16) * 16 * a.ldx + 1024 * 4 * p0;
      // the block after this one: the next 32 tokens of this chunk, else the first of the next chunk
      const int8_t* xv_next = m + 32 < m1 ? xv_k + 32 * a.ldx
                              : !last     ? xv + (m0 / 16) * 16 * a.ldx + 1024 * 4 * p1
                                          : nullptr;
      int32_t* cm = c + 1024 * ((m - m0) / 32);
      const bool load = !first && !one, store = last || !one;
      OutLines out;
      if (last) out = OutLines{a.out + m * a.ldo + n0, a.ldo, (int)std::min<int64_t>(32, m1 - m), (int)((n1 - n0 + 15) / 16)};
      if (m + 16 < m1) tile_steps<NA, 2>(codes, a.ldx, xv_k, xv_next, !one, 4 * (p1 - p0), first, load, store, cm, out);
      else tile_steps<NA, 1>(codes, a.ldx, xv_k, xv_next, !one, 4 * (p1 - p0), first, load, store, cm, out);
    }
  }
  for (int64_t m = m0; m < m1; m += 32) {
    const int32_t* cm = c + 1024 * ((m - m0) / 32);
    for (int i = 0; i < NA; ++i) {
      const int64_t n = n0 + 16 * i;
      const int nrows = (int)std::min<int64_t>(16, n1 - n);
      for (int j = 0; j < 2 && m + 16 * j < m1; ++j) {
        const int64_t mt = m + 16 * j;
        store_tile(a, e, cm + 512 * i + 256 * j, mt, (int)std::min<int64_t>(16, m1 - mt), n, nrows);
      }
    }
  }
}

// Token group g (tokens 16g .. 16g + 15 of x (M, ldx)) in the VNNI layout of kernels.h: 16 x 16 dword
// transposes (rows = tokens, columns = 4-byte k groups); tokens past M are zero.
void pack_group_amx(const int8_t* x, int64_t ldx, int64_t M, int64_t g, int8_t* xv) {
  int8_t* dst = xv + g * 16 * ldx;
  for (int64_t c = 0; c < ldx / 64; ++c) {
    __m512i r[16];
    for (int j = 0; j < 16; ++j) {
      const int64_t m = 16 * g + j;
      r[j] = m < M ? _mm512_loadu_si512((const void*)(x + m * ldx + 64 * c)) : _mm512_setzero_si512();
    }
    transpose16(r);  // r[q]: k group 16c + q of the 16 tokens
    for (int q = 0; q < 16; ++q) _mm512_storeu_si512((void*)(dst + 64 * (16 * c + q)), r[q]);
  }
}

void panel_amx(const GemmArgs& a, const int8_t* xv, const PanelEpilogue& e, int64_t m0, int64_t m1,
               int64_t n0, int64_t n1) {
  alignas(64) uint8_t codes[2048 * 4 * kPairsPerChunk];
  alignas(64) int32_t c[1024 * (kPanelMaxM / 32)];
  TileScope tiles;
  for (int64_t n = n0; n < n1; n += 32) {
    const int64_t n_end = std::min(n1, n + 32);
    // the next panel, for unpack_pairs' prefetch: only when it is whole and in this task (rows past n1
    // are another task's)
    const uint8_t* next = n + 64 <= n1 ? a.w + (n + 32) * a.ldw : nullptr;
    if (n_end - n > 16) panel_rows<2>(a, e, xv, m0, m1, n, n_end, codes, c, next);
    else panel_rows<1>(a, e, xv, m0, m1, n, n_end, codes, c, next);
  }
}

// TDPBUSD into 4 independent accumulator tiles from 2 + 2 operand tiles that stay loaded:
// 16 x 16 x 64 multiply-adds per instruction.
int64_t peak_amx(int64_t iters) {
  alignas(64) static const uint8_t ones[1024] = {};
  alignas(64) int32_t c[256];
  {
    TileScope tiles;
    _tile_loadd(4, ones, 64);
    _tile_loadd(5, ones, 64);
    _tile_loadd(6, ones, 64);
    _tile_loadd(7, ones, 64);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t i = 0; i < iters; ++i) {
      _tile_dpbusd(0, 4, 6);
      _tile_dpbusd(1, 4, 7);
      _tile_dpbusd(2, 5, 6);
      _tile_dpbusd(3, 5, 7);
    }
    _tile_stored(0, c, 64);
  }
  volatile int32_t sink = c[0];
  (void)sink;
  return iters * 4 * 16 * 16 * 64;
}

}  // namespace

Kernel kernel_amx() {
  Kernel k = kernel_avx512vnni();  // decode and small M; same activation layout
  k.panel = panel_amx;
  k.panel_pack = pack_group_amx;
  k.peak = peak_amx;
  return k;
}

}  // namespace bitnet
