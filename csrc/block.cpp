// A whole decoder block in one native call (bitnet_block_forward): the fused CPU path of
// bitnet/models/fused_block.py without Python between the steps. Built from the other C ABI
// functions: bitnet_bitlinear_multi (norm + quantise once + several matrices; bitnet_tq1_bitlinear_multi for
// a set of TQ1 weights), bitnet_attention_step
// (rotary, KV cache, attention) and bitnet_prefetch_async (next weights into cache meanwhile).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bitnet_native.h"
#include "exp_reduce.h"
#include "float_clones.h"
#include "native_services.h"
#include "tq1_native.h"

namespace {

// out (M, sum rows) = set(norm(x)) for x (M, K), by the set's weight layout (I2 or TQ1)
int run_set(const bitnet_linear_set& s, const float* x, int64_t M, int bits, float act_eps, const float* norm,
            float norm_eps, float* out, int isa) {
  int64_t total = 0;
  for (int i = 0; i < s.n; ++i) total += s.rows[i];
  if (s.format == BITNET_WEIGHTS_TQ1)
    return bitnet_tq1_bitlinear_multi(x, M, s.in_features, s.in_features, bits, act_eps, norm, norm_eps, s.n, s.w,
                                      s.rows, s.ldw, s.scale, s.bias, out, total, isa);
  return bitnet_bitlinear_multi(x, M, s.in_features, s.in_features, bits, act_eps, norm, norm_eps, s.n, s.w,
                                s.rows, s.ldw, s.scale, s.bias, out, total, isa);
}

bool known_format(const bitnet_linear_set& s) {
  return s.format == BITNET_WEIGHTS_I2 || s.format == BITNET_WEIGHTS_TQ1;
}

void prefetch(const bitnet_linear_set& s) {
  const void* p[3];
  int64_t len[3];
  for (int i = 0; i < s.n; ++i) { p[i] = s.w[i]; len[i] = s.rows[i] * s.ldw; }
  bitnet_prefetch_async(s.n, p, len);
}

// The gate activations, by code: the one table of them. Python reads the names back at load
// (bitnet_block_activation), so bitnet.ops.cpu.BLOCK_ACTIVATIONS is this table, not a copy of it.
enum Activation { kSilu = 0, kGelu = 1, kRelu2 = 2, kActivationCount };
const char* const kActivationNames[kActivationCount] = {"silu", "gelu", "relu2"};

// e^x for any float x, branch free so that the activation loops vectorise: x = n ln2 + r with
// n = round(x / ln2) and |r| <= ln2 / 2 (two-constant Cody-Waite), e^r by a degree-7 Taylor polynomial
// (relative error ~2e-7, a few ulp), 2^n from the exponent bits. x > 88.7 gives inf, x < -87.3 gives
// 0 (no denormals), NaN stays NaN: the limits of expf where SiLU uses them.
inline float exp_any(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const bitnet::ExpReduced e = bitnet::exp_reduce(xc);
  const float r = e.r;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n as two factors 2^(n - n/2) * 2^(n/2) (each exponent in range for n in [-126, 128])
  const int32_t nh = e.n / 2;
  float y = (p * bitnet::exp2_int(e.n - nh)) * bitnet::exp2_int(nh);
  y = x > 88.7f ? INFINITY : y;
  y = x < -87.3f ? 0.0f : y;
  return x != x ? x : y;
}

// act(g) in float32 in the operation order of torch's CPU kernels (F.silu: x / (1 + exp(-x));
// F.gelu: x * 0.5 * (1 + erf(x / sqrt 2)); relu2: relu(x)^2). exp is exp_any here (erf: libm) and
// torch's vectorised approximation there: they differ in the last bits for some inputs.
inline float silu(float v) { return v / (1.0f + exp_any(-v)); }
inline float gelu(float v) { return v * 0.5f * (1.0f + std::erf(v * 0.70710678118654752f)); }
inline float relu2(float v) { const float r = v > 0.0f ? v : 0.0f; return r * r; }

// h[j] = act(g[j]) (* up[j] when up is set), j < F: one loop per activation so that each vectorises.
BITNET_FLOAT_CLONES void activate_row(int kind, const float* g, const float* up, int64_t F, float* h) {
  switch (kind) {
    case kSilu:
      if (up) for (int64_t j = 0; j < F; ++j) h[j] = silu(g[j]) * up[j];
      else for (int64_t j = 0; j < F; ++j) h[j] = silu(g[j]);
      break;
    case kGelu:
      if (up) for (int64_t j = 0; j < F; ++j) h[j] = gelu(g[j]) * up[j];
      else for (int64_t j = 0; j < F; ++j) h[j] = gelu(g[j]);
      break;
    default:
      if (up) for (int64_t j = 0; j < F; ++j) h[j] = relu2(g[j]) * up[j];
      else for (int64_t j = 0; j < F; ++j) h[j] = relu2(g[j]);
  }
}

// From this many tokens on, the activation rows are spread over the thread pool.
constexpr int64_t kParallelActivationRows = 16;

// x[i] += y[i], i < n (the residual adds)
BITNET_FLOAT_CLONES void add_into(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

// bitnet_set_fused_gate: whether gated I2 blocks of more than 3 tokens run gate, up and the activation
// fused per tile (bitnet::gated_bitlinear) or as one gate|up GEMM and then the activation (same bits).
std::atomic<int> g_fused_gate{1};

// The residual add x (M, D) += y (M, D); from kParallelActivationRows rows on, over the thread pool.
void add_residual(float* x, const float* y, int64_t M, int64_t D) {
  if (M < kParallelActivationRows) return add_into(x, y, M * D);
  const int64_t rows = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  bitnet::native_parallel_for((M + rows - 1) / rows, [&](int64_t t) {
    const int64_t m0 = t * rows, m1 = std::min(M, m0 + rows);
    add_into(x + m0 * D, y + m0 * D, (m1 - m0) * D);
  });
}

struct Scratch {
  std::vector<float> qkv, attn, gu, h, y;
};

}  // namespace

extern "C" int bitnet_set_fused_gate(int on) { return g_fused_gate.exchange(on ? 1 : 0); }

extern "C" const char* bitnet_block_activation(int code) {
  return code >= 0 && code < kActivationCount ? kActivationNames[code] : nullptr;
}

extern "C" int bitnet_block_forward(const bitnet_block* blk, float* x, int64_t B, int64_t T, void* k_cache,
                                    void* v_cache, float* k_scale, float* v_scale, int kv_dtype, int64_t max_len,
                                    const int64_t* pos, int isa) {
  const bitnet_block& b = *blk;
  if (B < 0 || T < 0 || !b.attn_norm || !b.ffn_norm || b.qkv.n != 3 || b.o.n != 1 || b.down.n != 1 ||
      b.gate_up.n != (b.gated ? 2 : 1) || b.activation < 0 || b.activation >= kActivationCount ||
      !known_format(b.qkv) || !known_format(b.o) || !known_format(b.gate_up) || !known_format(b.down))
    return BITNET_EINVAL;
  const int64_t M = B * T, D = b.dim, F = b.hidden;
  const int64_t kvd = b.kv_heads * b.head_dim;
  if (M == 0) return BITNET_OK;
  // The prefetches below run on the pool's workers until the next call that uses the pool, which a small
  // matmul (run inline) is not: stop them before returning, or a worker could still be reading these
  // weights after the caller freed them (a segfault in a native thread, 3 in 10 test runs).
  struct StopPrefetchOnReturn {
    ~StopPrefetchOnReturn() { bitnet_prefetch_wait(); }
  } stop_prefetch;
  thread_local Scratch s;
  s.qkv.resize((size_t)(M * (D + 2 * kvd)));
  s.attn.resize((size_t)(M * D));
  s.h.resize((size_t)(M * F));
  s.y.resize((size_t)(M * D));
  int rc;
  // attention: x += o(sub_norm(attn(rotary(qkv(attn_norm(x))))))
  if ((rc = run_set(b.qkv, x, M, b.bits, b.act_eps, b.attn_norm, b.attn_norm_eps, s.qkv.data(), isa))) return rc;
  prefetch(b.o);
  if ((rc = bitnet_attention_step(s.qkv.data(), B, T, b.heads, b.kv_heads, b.head_dim, b.cos_table, b.sin_table,
                                  b.table_len, k_cache, v_cache, k_scale, v_scale, kv_dtype, max_len, pos,
                                  s.attn.data())))
    return rc;
  if ((rc = run_set(b.o, s.attn.data(), M, b.bits, b.act_eps, b.sub_norm, b.sub_norm_eps, s.y.data(), isa))) return rc;
  add_residual(x, s.y.data(), M, D);
  // feed-forward: x += down(post_norm(act(gate(h)) * up(h))), h = ffn_norm(x)
  const bitnet_linear_set& gu_set = b.gate_up;
  if (b.gated && gu_set.format == BITNET_WEIGHTS_I2 && M > 3 && g_fused_gate.load(std::memory_order_relaxed)) {
    // prefill / batched steps: gate, up and the activation per tile (no (M, 2F) gate|up buffer)
    const int kind = b.activation;
    rc = bitnet::gated_bitlinear(x, M, D, b.bits, b.act_eps, b.ffn_norm, b.ffn_norm_eps, gu_set.w[0], gu_set.w[1], F,
                                 gu_set.ldw, *gu_set.scale[0], *gu_set.scale[1], gu_set.bias[0], gu_set.bias[1],
                                 [kind](const float* g, const float* u, int64_t n, float* h) {
                                   activate_row(kind, g, u, n, h);
                                 },
                                 s.h.data(), isa);
    if (rc) return rc;
  } else {
    s.gu.resize((size_t)(M * F * (b.gated ? 2 : 1)));
    if ((rc = run_set(b.gate_up, x, M, b.bits, b.act_eps, b.ffn_norm, b.ffn_norm_eps, s.gu.data(), isa))) return rc;
    prefetch(b.down);
    const int64_t ldgu = F * (b.gated ? 2 : 1);
    // Prefill-sized M: rows over the pool (which cancels the prefetch of `down`: the tiled GEMM that
    // follows is compute bound). Decode: on this thread, while the prefetch streams `down` into cache.
    const int64_t rows_per_task =
        M >= kParallelActivationRows ? std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)) : M;
    const float* gu = s.gu.data();  // s is thread_local: the pool's workers must not name it
    float* h = s.h.data();
    bitnet::native_parallel_for((M + rows_per_task - 1) / rows_per_task, [&](int64_t t) {
      for (int64_t m = t * rows_per_task; m < std::min(M, (t + 1) * rows_per_task); ++m) {
        const float* g = gu + m * ldgu;
        activate_row(b.activation, g, b.gated ? g + F : nullptr, F, h + m * F);
      }
    });
  }
  if ((rc = run_set(b.down, s.h.data(), M, b.bits, b.act_eps, b.post_norm, b.post_norm_eps, s.y.data(), isa)))
    return rc;
  add_residual(x, s.y.data(), M, D);
  return BITNET_OK;
}
