// Rotary position embedding + KV-cache append + causal softmax attention of one layer (float32): the
// attention step of the fused CPU path (bitnet/models/fused_block.py), one native call instead of
// ~40 small torch ops per layer. See bitnet_attention_step in bitnet_native.h.
#include <algorithm>
#include <cmath>
#include <vector>

#include "bitnet_native.h"
#include "native_services.h"

// The two loops that carry the work get an AVX2 clone besides the baseline one (GCC, x86-64 Linux).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define BITNET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define BITNET_CLONES
#endif

namespace bitnet {
namespace {

// Rotate-half (NEOX) rotary embedding of one head at one position, in place, in the operation order
// of bitnet.nn.RotaryEmbedding.rotate (x * cos + rotate_half(x) * sin), so results match bit for bit:
//   x[i]     <- x[i] * cos[i] + (-x[i+h]) * sin[i],    x[i+h] <- x[i+h] * cos[i+h] + x[i] * sin[i+h]
void rope(float* x, int64_t hd, const float* c, const float* s) {
  const int64_t h = hd / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * c[i] + (-b) * s[i];
    x[i + h] = b * c[i + h] + a * s[i + h];
  }
}

// One query head against n cached keys/values (n, hd):  out = softmax(q k^T * scale) v.
// w: scratch of n floats.
BITNET_CLONES void attend_one(const float* q, const float* kc, const float* vc, int64_t n, int64_t hd,
                              float scale, float* w, float* out) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const float* k = kc + j * hd;
    float acc[16] = {};                       // 16 independent partial sums: vectorises
    int64_t i = 0;
    for (; i + 16 <= hd; i += 16)
      for (int l = 0; l < 16; ++l) acc[l] += q[i + l] * k[i + l];
    for (int l = 0; i < hd; ++i, ++l) acc[l] += q[i] * k[i];
    // pairwise, in a fixed order: 16 dependent scalar adds per key were most of the prefill time here
    for (int w = 8; w >= 1; w /= 2)
      for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
    float s = acc[0] * scale;
    w[j] = s;
    mx = s > mx ? s : mx;
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    w[j] = std::exp(w[j] - mx);
    sum += w[j];
  }
  const float inv = 1.0f / sum;
  for (int64_t d = 0; d < hd; ++d) out[d] = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const float a = w[j] * inv;
    const float* v = vc + j * hd;
    for (int64_t d = 0; d < hd; ++d) out[d] += a * v[d];
  }
}

}  // namespace
}  // namespace bitnet

using namespace bitnet;

extern "C" int bitnet_attention_step(float* qkv, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd,
                                     const float* cos_table, const float* sin_table, int64_t table_len,
                                     float* k_cache, float* v_cache, int64_t max_len, const int64_t* pos,
                                     float* out) {
  if (B < 0 || T < 0 || Hq < 1 || Hkv < 1 || Hq % Hkv || hd < 2 || hd % 2) return BITNET_EINVAL;
  for (int64_t b = 0; b < B; ++b)
    if (pos[b] < 0 || pos[b] + T > max_len || pos[b] + T > table_len) return BITNET_EINVAL;
  const int64_t ld = (Hq + 2 * Hkv) * hd;      // qkv row: q heads | k heads | v heads
  const int64_t group = Hq / Hkv;
  // 1. rotary on q and k; k and v appended to the caches (B, Hkv, max_len, hd) at pos[b] + t
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      float* row = qkv + (b * T + t) * ld;
      const int64_t p = pos[b] + t;
      const float* c = cos_table + p * hd;
      const float* s = sin_table + p * hd;
      for (int64_t h = 0; h < Hq + Hkv; ++h) rope(row + h * hd, hd, c, s);
      for (int64_t g = 0; g < Hkv; ++g) {
        const int64_t at = ((b * Hkv + g) * max_len + p) * hd;
        std::copy(row + (Hq + g) * hd, row + (Hq + g + 1) * hd, k_cache + at);
        std::copy(row + (Hq + Hkv + g) * hd, row + (Hq + Hkv + g + 1) * hd, v_cache + at);
      }
    }
  // 2. query (b, t, h) reads keys 0..pos[b]+t of K/V head h / group
  const float scale = 1.0f / std::sqrt((float)hd);
  const int64_t nq = B * T * Hq;
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += T * Hq * (pos[b] + T) * hd;
  const int64_t nthreads = native_threads();
  const int64_t ntasks = (nthreads > 1 && work > (1 << 16)) ? std::min<int64_t>(nq, nthreads * 4) : 1;
  native_parallel_for(ntasks, [&](int64_t task) {
    thread_local std::vector<float> w;
    for (int64_t i = task * nq / ntasks; i < (task + 1) * nq / ntasks; ++i) {
      const int64_t h = i % Hq, bt = i / Hq, b = bt / T, t = bt % T;
      const int64_t n = pos[b] + t + 1, g = h / group;
      if ((int64_t)w.size() < n) w.resize((size_t)n);
      const int64_t at = (b * Hkv + g) * max_len * hd;
      attend_one(qkv + bt * ld + h * hd, k_cache + at, v_cache + at, n, hd, scale, w.data(),
                 out + bt * Hq * hd + h * hd);
    }
  });
  return BITNET_OK;
}
