// AMX tile configuration shared by the AMX kernels: palette 1, all 8 tiles 16 rows x 64 bytes.
// Include only from files compiled with -mamx-tile.
// (csrc/kernel_amx.cpp still has its own copy of these two classes; to be folded into this header.)
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
// tiles, or leaving ours loaded, under them corrupts memory (their tile stores of other shapes).
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

}  // namespace bitnet
