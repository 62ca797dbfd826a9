// A whole decoder block in one native call (bitnet_block_forward): the fused CPU path of
// bitnet/models/fused_block.py without Python between the steps. Built from the other C ABI
// functions: bitnet_bitlinear_multi (norm + quantise once + several matrices; bitnet_tq1_bitlinear_multi for
// a set of TQ1 weights), bitnet_attention_step
// (rotary, KV cache, attention) and bitnet_prefetch_async (next weights into cache meanwhile).
#include <cmath>
#include <cstring>
#include <vector>

#include "bitnet_native.h"
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

// act(g) in float32 in the operation order of torch's CPU kernels (F.silu: x / (1 + exp(-x));
// F.gelu: x * 0.5 * (1 + erf(x / sqrt 2)); relu2: relu(x)^2). exp and erf come from libm here and
// from torch's vectorised approximations there: they differ in the last bit for some inputs.
inline float activate(int kind, float v) {
  switch (kind) {
    case kSilu: return v / (1.0f + std::exp(-v));
    case kGelu: return v * 0.5f * (1.0f + std::erf(v * 0.70710678118654752f));
    default: { const float r = v > 0.0f ? v : 0.0f; return r * r; }
  }
}

struct Scratch {
  std::vector<float> qkv, attn, gu, h, y;
};

}  // namespace

extern "C" const char* bitnet_block_activation(int code) {
  return code >= 0 && code < kActivationCount ? kActivationNames[code] : nullptr;
}

extern "C" int bitnet_block_forward(const bitnet_block* blk, float* x, int64_t B, int64_t T, void* k_cache,
                                    void* v_cache, int kv_dtype, int64_t max_len, const int64_t* pos, int isa) {
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
  s.gu.resize((size_t)(M * F * (b.gated ? 2 : 1)));
  s.h.resize((size_t)(M * F));
  s.y.resize((size_t)(M * D));
  int rc;
  // attention: x += o(sub_norm(attn(rotary(qkv(attn_norm(x))))))
  if ((rc = run_set(b.qkv, x, M, b.bits, b.act_eps, b.attn_norm, b.attn_norm_eps, s.qkv.data(), isa))) return rc;
  prefetch(b.o);
  if ((rc = bitnet_attention_step(s.qkv.data(), B, T, b.heads, b.kv_heads, b.head_dim, b.cos_table, b.sin_table,
                                  b.table_len, k_cache, v_cache, kv_dtype, max_len, pos, s.attn.data())))
    return rc;
  if ((rc = run_set(b.o, s.attn.data(), M, b.bits, b.act_eps, b.sub_norm, b.sub_norm_eps, s.y.data(), isa))) return rc;
  for (int64_t i = 0; i < M * D; ++i) x[i] += s.y[(size_t)i];
  // feed-forward: x += down(post_norm(act(gate(h)) * up(h))), h = ffn_norm(x)
  if ((rc = run_set(b.gate_up, x, M, b.bits, b.act_eps, b.ffn_norm, b.ffn_norm_eps, s.gu.data(), isa))) return rc;
  prefetch(b.down);
  const int64_t ldgu = F * (b.gated ? 2 : 1);
  for (int64_t m = 0; m < M; ++m) {
    const float* g = s.gu.data() + m * ldgu;
    float* h = s.h.data() + m * F;
    if (b.gated)
      for (int64_t j = 0; j < F; ++j) h[j] = activate(b.activation, g[j]) * g[F + j];
    else
      for (int64_t j = 0; j < F; ++j) h[j] = activate(b.activation, g[j]);
  }
  if ((rc = run_set(b.down, s.h.data(), M, b.bits, b.act_eps, b.post_norm, b.post_norm_eps, s.y.data(), isa)))
    return rc;
  for (int64_t i = 0; i < M * D; ++i) x[i] += s.y[(size_t)i];
  return BITNET_OK;
}
