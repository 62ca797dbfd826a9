// AMX helpers shared by the AMX kernels: the tile configuration (palette 1, all 8 tiles 16 rows x
// 64 bytes) and a 16x16 int32 transpose for writing C tiles out as (token, row).
// Include only from files compiled with -mamx-tile -mavx512f.
// Used by kernel_amx.cpp (ternary GEMM) and int8_amx.cpp (int8 head).
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace bitnet {

// The 64-byte operand of ldtilecfg / sttilecfg.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Our tile configuration (8 tiles of 16 x 64 bytes) for the duration of one kernel call, and the
// thread's previous one back at the end. Other AMX users on the same thread (oneDNN, under torch's
// bf16 matmuls) configure the tiles once and keep running with that configuration: releasing the
// tiles, or leaving ours loaded, under them corrupts memory (their tile stores of other shapes; seen as segfaults in the test suite).
class TileScope {
 public:
  TileScope() {
    _tile_storeconfig(&saved_);
    TileConfig cfg;
    std::memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
      cfg.rows[t] = 16;
      cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
  }
  ~TileScope() {
    if (saved_.palette_id != 0) _tile_loadconfig(&saved_);  // theirs back (tile data is not kept)
    else _tile_release();                                    // none before: back to the initial state
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  TileConfig saved_;
};

// 16x16 int32 transpose: r[i] holds row i on entry, column i on exit.
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // u[g + e], lane l: rows g..g+3 of column 4l + e
    u[g + 0] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int e = 0; e < 4; ++e) {  // gather lane l of u[e], u[4+e], u[8+e], u[12+e] into column 4l + e
    const __m512i v0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xEE);
    r[e] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + e] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[8 + e] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

}  // namespace bitnet
