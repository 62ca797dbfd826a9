// Rotary position embedding + KV-cache append + causal softmax attention of one layer (float32): the
// attention step of the fused CPU path (bitnet/models/fused_block.py), one native call instead of
// ~40 small torch ops per layer. See bitnet_attention_step in bitnet_native.h.
#include <algorithm>
#include <cmath>
#include <cstring>
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

// ---- prefill: blocks of up to kQB queries of one head, vectorised across the queries ----
constexpr int kQB = 16;  // queries per block: one 16-float vector per key and per head dimension

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define BITNET_BLOCK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BITNET_BLOCK_CLONES
#endif

// e^x for x <= 0 (scores minus their row maximum): x = n ln2 + r, |r| <= ln2 / 2 (two-constant
// Cody-Waite), e^r by its degree-6 Taylor polynomial (relative error ~1e-7), 2^n from the exponent
// bits. Branch free so that the loops over 16 queries vectorise; x < -87 gives ~1e-38, never inf/NaN.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float magic = 12582912.0f;                 // 1.5 * 2^23: t - magic = round(x / ln2)
  const float t = x * 1.44269504f + magic;
  const float n = t - magic;
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t ti;
  std::memcpy(&ti, &t, 4);
  const int32_t bits = (ti - 0x4B400000 + 127) << 23;   // (n + 127) in the exponent field
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

struct BlockScratch {
  std::vector<float> qt, st, ot;  // (hd, kQB) queries, (n, kQB) scores / weights, (hd, kQB) outputs
};

// Queries q[i] (i < nq <= kQB, hd floats each) of one head against cached keys/values (rows of hd):
// query i sees keys 0 .. last[i]. out[i] = softmax(q k^T * scale) v. Every vector has one lane per
// query, so that no horizontal sums are needed: S^T (n, 16) = K Q^T, then O^T (hd, 16) = V^T P^T.
BITNET_BLOCK_CLONES void attend_block(const float* const* q, int nq, const int64_t* last, const float* kc,
                                      const float* vc, int64_t hd, float scale, float* const* out,
                                      BlockScratch& sc) {
  int64_t n = 0;
  for (int i = 0; i < nq; ++i) n = std::max(n, last[i] + 1);
  sc.qt.assign((size_t)(hd * kQB), 0.0f);
  if ((int64_t)sc.st.size() < n * kQB) sc.st.resize((size_t)(n * kQB));
  if ((int64_t)sc.ot.size() < hd * kQB) sc.ot.resize((size_t)(hd * kQB));
  float* qt = sc.qt.data();
  float* st = sc.st.data();
  float* ot = sc.ot.data();
  float lim[kQB];
  for (int i = 0; i < kQB; ++i) lim[i] = i < nq ? (float)last[i] : -1.0f;
  for (int i = 0; i < nq; ++i)
    for (int64_t d = 0; d < hd; ++d) qt[d * kQB + i] = q[i][d];
  // scores S^T[j][i] = (q_i . k_j) * scale, 4 keys at a time (4 independent chains)
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    float a0[kQB] = {}, a1[kQB] = {}, a2[kQB] = {}, a3[kQB] = {};
    const float *k0 = kc + j * hd, *k1 = k0 + hd, *k2 = k1 + hd, *k3 = k2 + hd;
    for (int64_t d = 0; d < hd; ++d) {
      const float* qd = qt + d * kQB;
      for (int i = 0; i < kQB; ++i) {
        a0[i] = __builtin_fmaf(qd[i], k0[d], a0[i]);
        a1[i] = __builtin_fmaf(qd[i], k1[d], a1[i]);
        a2[i] = __builtin_fmaf(qd[i], k2[d], a2[i]);
        a3[i] = __builtin_fmaf(qd[i], k3[d], a3[i]);
      }
    }
    for (int i = 0; i < kQB; ++i) {
      st[j * kQB + i] = a0[i] * scale;
      st[(j + 1) * kQB + i] = a1[i] * scale;
      st[(j + 2) * kQB + i] = a2[i] * scale;
      st[(j + 3) * kQB + i] = a3[i] * scale;
    }
  }
  for (; j < n; ++j) {
    float a0[kQB] = {};
    const float* k0 = kc + j * hd;
    for (int64_t d = 0; d < hd; ++d)
      for (int i = 0; i < kQB; ++i) a0[i] = __builtin_fmaf(qt[d * kQB + i], k0[d], a0[i]);
    for (int i = 0; i < kQB; ++i) st[j * kQB + i] = a0[i] * scale;
  }
  // softmax over the keys each query sees (the others get weight 0)
  float mx[kQB], sum[kQB];
  for (int i = 0; i < kQB; ++i) mx[i] = -INFINITY, sum[i] = 0.0f;
  for (j = 0; j < n; ++j)
    for (int i = 0; i < kQB; ++i) {
      const float v = st[j * kQB + i];
      mx[i] = ((float)j <= lim[i] && v > mx[i]) ? v : mx[i];
    }
  for (j = 0; j < n; ++j)
    for (int i = 0; i < kQB; ++i) {
      const float e = exp_nonpositive(st[j * kQB + i] - mx[i]);
      const float w = (float)j <= lim[i] ? e : 0.0f;
      st[j * kQB + i] = w;
      sum[i] += w;
    }
  // O^T[d][i] = sum_j w[j][i] v_j[d], 4 dimensions at a time
  int64_t d = 0;
  for (; d + 4 <= hd; d += 4) {
    float a0[kQB] = {}, a1[kQB] = {}, a2[kQB] = {}, a3[kQB] = {};
    for (j = 0; j < n; ++j) {
      const float* w = st + j * kQB;
      const float* v = vc + j * hd + d;
      for (int i = 0; i < kQB; ++i) {
        a0[i] = __builtin_fmaf(w[i], v[0], a0[i]);
        a1[i] = __builtin_fmaf(w[i], v[1], a1[i]);
        a2[i] = __builtin_fmaf(w[i], v[2], a2[i]);
        a3[i] = __builtin_fmaf(w[i], v[3], a3[i]);
      }
    }
    for (int i = 0; i < kQB; ++i) {
      ot[d * kQB + i] = a0[i];
      ot[(d + 1) * kQB + i] = a1[i];
      ot[(d + 2) * kQB + i] = a2[i];
      ot[(d + 3) * kQB + i] = a3[i];
    }
  }
  for (; d < hd; ++d) {
    float a0[kQB] = {};
    for (j = 0; j < n; ++j)
      for (int i = 0; i < kQB; ++i) a0[i] = __builtin_fmaf(st[j * kQB + i], vc[j * hd + d], a0[i]);
    for (int i = 0; i < kQB; ++i) ot[d * kQB + i] = a0[i];
  }
  for (int i = 0; i < nq; ++i) {
    const float inv = 1.0f / sum[i];
    for (d = 0; d < hd; ++d) out[i][d] = ot[d * kQB + i] * inv;
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
  if (T >= 8) {  // prefill: blocks of kQB queries of one head (b, h, t-block), vectorised across queries
    const int64_t tblocks = (T + kQB - 1) / kQB, nblocks = B * Hq * tblocks;
    native_parallel_for(nblocks, [&](int64_t task) {
      thread_local BlockScratch sc;
      const int64_t tb = task % tblocks, h = (task / tblocks) % Hq, b = task / (tblocks * Hq);
      const int64_t t0 = tb * kQB, nq = std::min<int64_t>(kQB, T - t0), g = h / group;
      const float* qs[kQB];
      float* os[kQB];
      int64_t last[kQB];
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t bt = b * T + t0 + i;
        qs[i] = qkv + bt * ld + h * hd;
        os[i] = out + bt * Hq * hd + h * hd;
        last[i] = pos[b] + t0 + i;
      }
      const int64_t at = (b * Hkv + g) * max_len * hd;
      attend_block(qs, (int)nq, last, k_cache + at, v_cache + at, hd, scale, os, sc);
    });
    return BITNET_OK;
  }
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
