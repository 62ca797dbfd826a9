// Rotary position embedding + KV-cache append + causal softmax attention of one layer (float32): the
// attention step of the fused CPU path (bitnet/models/fused_block.py), one native call instead of
// ~40 small torch ops per layer. See bitnet_attention_step in bitnet_native.h.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "bitnet_native.h"
#include "native_services.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#define BITNET_ATTN_AVX512 1   // decode scores in AVX-512 intrinsics, chosen at run time
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

// The loops that carry the work get AVX-512 and AVX2 clones besides the baseline one (GCC, x86-64 Linux).
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

// ---- decode: one query of one head against its n cached keys / values ----
constexpr int kLanes = 16;  // partial sums per dot product: one 16-float vector (two 8-float ones)

// The fixed reduction of 16 partial sums: pairwise, a[l] + a[l + w] for w = 8, 4, 2, 1.
inline float reduce_lanes(const float* a) {
  float s8[8], s4[4], s2[2];
  for (int l = 0; l < 8; ++l) s8[l] = a[l] + a[l + 8];
  for (int l = 0; l < 4; ++l) s4[l] = s8[l] + s8[l + 4];
  for (int l = 0; l < 2; ++l) s2[l] = s4[l] + s4[l + 2];
  return s2[0] + s2[1];
}

// s[r] = reduce_lanes(a_r) * scale for R keys k_r = k + r hd, where a_r[l] = fma(q[d], k_r[d], a_r[l]) for
// d = l, l + 16, ... < hd, in order of d (R independent chains of 16-float vectors).
template <int R>
inline void scores(const float* q, const float* k, int64_t hd, float scale, float* s) {
  float a[R][kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= hd; i += kLanes)
    for (int r = 0; r < R; ++r)
      for (int l = 0; l < kLanes; ++l) a[r][l] = __builtin_fmaf(q[i + l], k[r * hd + i + l], a[r][l]);
  const int64_t tail = hd - i;
  for (int r = 0; r < R; ++r)
    for (int64_t l = 0; l < tail; ++l) a[r][l] = __builtin_fmaf(q[i + l], k[r * hd + i + l], a[r][l]);
  for (int r = 0; r < R; ++r) s[r] = reduce_lanes(a[r]) * scale;
}

#if defined(BITNET_ATTN_AVX512)
// scores<R> in AVX-512, the same operations in the same order (one zmm per key: lane l holds a_r[l];
// the tail of hd is a masked load, whose zero lanes add fma(0, 0, a) = a).
__attribute__((target("avx512f,avx512dq,fma"))) inline float reduce_lanes_avx512(__m512 a) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

template <int R>
__attribute__((target("avx512f,avx512dq,fma"))) void scores_avx512(const float* q, const float* k, int64_t hd,
                                                                    float scale, float* s) {
  __m512 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + kLanes <= hd; i += kLanes) {
    const __m512 qv = _mm512_loadu_ps(q + i);
    for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + r * hd + i), a[r]);
  }
  if (i < hd) {
    const __mmask16 m = (__mmask16)((1u << (hd - i)) - 1u);
    const __m512 qv = _mm512_maskz_loadu_ps(m, q + i);
    for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k + r * hd + i), a[r]);
  }
  for (int r = 0; r < R; ++r) s[r] = reduce_lanes_avx512(a[r]) * scale;
}

__attribute__((target("avx512f,avx512dq,fma"))) void all_scores_avx512(const float* q, const float* kc, int64_t n,
                                                                        int64_t hd, float scale, float* w) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) scores_avx512<4>(q, kc + j * hd, hd, scale, w + j);
  for (; j < n; ++j) scores_avx512<1>(q, kc + j * hd, hd, scale, w + j);
}

// BITNET_ATTN_PORTABLE=1 (read once) forces the portable loops: tests compare the two bit for bit.
bool have_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          !(std::getenv("BITNET_ATTN_PORTABLE") && std::getenv("BITNET_ATTN_PORTABLE")[0] == '1');
  return yes;
}
#endif

// acc[i] = sum_j w[j] v_j[d0 + i] (fma, in order of j) for i < W; out[d0 + i] = acc[i] * inv.
template <int W>
inline void weighted_values(const float* w, const float* vc, int64_t n, int64_t hd, int64_t d0, float inv,
                            float* out) {
  float acc[W] = {};
  for (int64_t j = 0; j < n; ++j) {
    const float a = w[j];
    const float* v = vc + j * hd + d0;
    for (int i = 0; i < W; ++i) acc[i] = __builtin_fmaf(a, v[i], acc[i]);
  }
  for (int i = 0; i < W; ++i) out[d0 + i] = acc[i] * inv;
}

// out = softmax(q k^T * scale) v for one query head q (hd) against n cached keys / values (n, hd);
// w: scratch of n floats. Every float operation is written out here in a fixed order (explicit fma,
// fixed lane reductions), so each clone (AVX-512, AVX2, baseline) gives the same bits, and a query's
// result depends on nothing but its own q, keys and values (batch invariance):
//   s_j = reduce_lanes(q . k_j, 16 lanes) * scale      4 keys per pass: 4 independent fma chains
//   e_j = exp_nonpositive(s_j - max s), sum = reduce_lanes(e, 16 lanes)
//   out = (sum_j e_j v_j) / sum                          64 (then 16, then 1) dimensions per pass
BITNET_BLOCK_CLONES void attend_one(const float* q, const float* kc, const float* vc, int64_t n, int64_t hd,
                                    float scale, float* w, float* out) {
  int64_t j = 0;
#if defined(BITNET_ATTN_AVX512)
  if (have_avx512()) {
    all_scores_avx512(q, kc, n, hd, scale, w);
    j = n;
  }
#endif
  for (; j + 4 <= n; j += 4) scores<4>(q, kc + j * hd, hd, scale, w + j);
  for (; j < n; ++j) scores<1>(q, kc + j * hd, hd, scale, w + j);
  float mx = -INFINITY;
  for (j = 0; j < n; ++j) mx = w[j] > mx ? w[j] : mx;
  float sums[kLanes] = {};
  for (j = 0; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float e = exp_nonpositive(w[j + l] - mx);
      w[j + l] = e;
      sums[l] += e;
    }
  for (int l = 0; j + l < n; ++l) {
    const float e = exp_nonpositive(w[j + l] - mx);
    w[j + l] = e;
    sums[l] += e;
  }
  const float inv = 1.0f / reduce_lanes(sums);
  int64_t d = 0;
  for (; d + 64 <= hd; d += 64) weighted_values<64>(w, vc, n, hd, d, inv, out);
  for (; d + 16 <= hd; d += 16) weighted_values<16>(w, vc, n, hd, d, inv, out);
  for (; d < hd; ++d) weighted_values<1>(w, vc, n, hd, d, inv, out);
}

// ---- prefill: blocks of up to kQB queries of one head, vectorised across the queries ----
constexpr int kQB = 16;  // queries per block: one 16-float vector per key and per head dimension

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
