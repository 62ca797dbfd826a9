/* bitnet native CPU backend: plain C ABI (loaded from Python with ctypes; no PyTorch headers).
 *
 * Weights are in the I2 layout of bitnet.quant.packing (the one place it is defined):
 * uint8 (N, Kp/4), codes c = W + 1 in {0,1,2}, Kp = ceil(K/128)*128, each 128-block is 32 bytes,
 * byte j of a block holds k = j, j+32, j+64, j+96 at bits 1:0, 3:2, 5:4, 7:6.
 *
 * Integer product:  acc[m, n] = sum_k xq[m, k] * c[n, k] - sum_k xq[m, k]   (exact, int32).
 * Float epilogue:   y[m, n]   = acc[m, n] * w_scale / x_scale[m] (+ bias[n]).
 *
 * All functions return 0 on success or a negative BITNET_E* code. isa = -1 means "the default"
 * (best supported ISA, or the one forced with bitnet_set_default_isa).
 */
#ifndef BITNET_NATIVE_H
#define BITNET_NATIVE_H

#include <stdint.h>

#if defined(_WIN32)
#define BITNET_API __declspec(dllexport)
#else
#define BITNET_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define BITNET_ABI_VERSION 8

enum {
  BITNET_ISA_SCALAR = 0,
  BITNET_ISA_NEON = 1,
  BITNET_ISA_AVX2 = 2,
  BITNET_ISA_AVXVNNI = 3,
  BITNET_ISA_AVX512VNNI = 4,
  BITNET_ISA_AMX = 5,          /* AMX-INT8 tiles for prefill-sized GEMMs, AVX-512 VNNI otherwise */
  BITNET_ISA_COUNT = 6
};

enum {
  BITNET_OK = 0,
  BITNET_EINVAL = -1,  /* bad shape / stride / argument */
  BITNET_EISA = -2,    /* ISA not compiled in or not supported by this CPU */
  BITNET_ENOMEM = -3
};

BITNET_API int bitnet_abi_version(void);
BITNET_API const char* bitnet_isa_name(int isa);        /* "scalar", "neon", "avx2", "avxvnni", "avx512vnni", "amx" */
BITNET_API int bitnet_isa_compiled(int isa);           /* 1 if this build has a kernel for it */
BITNET_API int bitnet_isa_supported(int isa);          /* compiled AND the running CPU/OS supports it */
BITNET_API int bitnet_best_isa(void);
BITNET_API int bitnet_get_default_isa(void);
BITNET_API int bitnet_set_default_isa(int isa);        /* BITNET_EISA if unsupported */
BITNET_API const char* bitnet_cpu_name(void);          /* CPU brand string (x86 cpuid) or "" */
/* Int8 multiply-add peak of one core with this ISA's instruction (registers only), GMAC/s; 0 if none. */
BITNET_API double bitnet_isa_peak_gmacs(int isa);

BITNET_API void bitnet_set_num_threads(int n);         /* n <= 0: number of cores */
BITNET_API int bitnet_get_num_threads(void);

/* out int32 (M, ldo) = x int8 (M, K; row stride ldx) @ W^T. */
BITNET_API int bitnet_matmul_int(const int8_t* x, int64_t M, int64_t K, int64_t ldx,
                                 const uint8_t* w, int64_t N, int64_t ldw,
                                 int32_t* out, int64_t ldo, int isa);

/* out float (M, ldo) = acc * w_scale / x_scale[m] (+ bias[n]); x_scale (M,), bias (N,) or NULL. */
BITNET_API int bitnet_linear(const int8_t* x, const float* x_scale, int64_t M, int64_t K, int64_t ldx,
                             const uint8_t* w, int64_t N, int64_t ldw, float w_scale, const float* bias,
                             float* out, int64_t ldo, int isa);

/* Per-token absmax quantisation (as bitnet.quant.activation_quant_int8, bit for bit):
 *   s = (1 / max(max_k |x[m,k]|, eps)) * Qp,  xq = clamp(round_half_even(x * s), -Qp-1, Qp),
 * all in float32, Qp = 2^(bits-1) - 1. xq (M, ldq) int8, scale (M,) float. */
BITNET_API int bitnet_quantize_act(const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps,
                                   int8_t* xq, int64_t ldq, float* scale, int isa);

/* Fused: quantise x (M, K) float32 per token, then bitnet_linear. */
BITNET_API int bitnet_bitlinear(const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps,
                                const uint8_t* w, int64_t N, int64_t ldw, float w_scale, const float* bias,
                                float* out, int64_t ldo, int isa);

/* Several ternary matrices that read the same input (q/k/v, gate/up) in one call: x is quantised once
 * (after an RMSNorm with weight norm_weight (K,) and norm_eps when norm_weight is not NULL:
 * y = (x * rsqrt(mean_k x^2 + norm_eps)) * norm_weight, float32), then matrix j (n[j] rows, row stride
 * ldw, scale *w_scale[j], bias[j] or NULL) writes columns [sum_{i<j} n[i], ... + n[j]) of out (M, ldo). */
BITNET_API int bitnet_bitlinear_multi(const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps,
                                      const float* norm_weight, float norm_eps, int nmat,
                                      const uint8_t* const* w, const int64_t* n, int64_t ldw,
                                      const float* const* w_scale, const float* const* bias,
                                      float* out, int64_t ldo, int isa);
/* Element types of a KV cache: float32, IEEE binary16 (written with round-to-nearest-even, as torch's
 * Tensor.half(), and widened exactly when read), or int8 with one float32 scale per (row, head, position):
 * d = max|x| / 127, q = clamp(round_half_even(x / d), -127, 127) (0 where d = 0), read back as q * d.
 * The attention math is float32 in every case. */
enum { BITNET_KV_F32 = 0, BITNET_KV_F16 = 1, BITNET_KV_I8 = 2 };
/* Name of KV-cache element type `code` ("float32", "float16", "int8"), NULL past the last one: read back
 * by the Python side at load (bitnet.ops.cpu.KV_DTYPES). */
BITNET_API const char* bitnet_kv_dtype_name(int code);
/* One layer's attention step (float32 math), for B rows of T new tokens each:
 *   qkv (B*T, (Hq + 2*Hkv) * hd): per token the q heads, k heads, v heads (rotated in place);
 *   rotary: rotate-half with cos/sin tables (table_len, hd) at position pos[b] + t;
 *   k/v appended to k_cache/v_cache (B, Hkv, max_len, hd) (contiguous, elements of kv_dtype, a
 *   BITNET_KV_* code) at pos[b] + t; for BITNET_KV_I8 their scales to k_scale/v_scale (B, Hkv, max_len)
 *   float32 (both NULL for the other types);
 *   out (B*T, Hq*hd) = softmax(q k^T / sqrt(hd)) v over keys 0..pos[b]+t of K/V head h / (Hq/Hkv).
 * A query's result depends only on its own q, keys and values (not on B, T or the other rows), and is the
 * same on every ISA. BITNET_EINVAL if pos[b] + T exceeds max_len or table_len, the head counts do not
 * divide, or kv_dtype is unknown. */
BITNET_API int bitnet_attention_step(float* qkv, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd,
                                     const float* cos_table, const float* sin_table, int64_t table_len,
                                     void* k_cache, void* v_cache, float* k_scale, float* v_scale, int kv_dtype,
                                     int64_t max_len, const int64_t* pos, float* out);
/* Weight layouts of bitnet_linear_set.format: I2 (above) or the experimental TQ1 of tq1_native.h. */
enum { BITNET_WEIGHTS_I2 = 0, BITNET_WEIGHTS_TQ1 = 1 };

/* Up to 3 packed ternary matrices that read the same input (see bitnet_bitlinear_multi; with TQ1
 * weights bitnet_tq1_bitlinear_multi). */
typedef struct {
  int32_t n;                      /* number of matrices */
  int32_t format;                 /* weight layout of every matrix: BITNET_WEIGHTS_I2 (0) or _TQ1 (1) */
  int64_t in_features;            /* K */
  int64_t ldw;                    /* row stride of every matrix (bytes) */
  const uint8_t* w[3];            /* rows (rows[i], ldw) in that layout */
  int64_t rows[3];
  const float* scale[3];          /* 0-dim w_scale of each */
  const float* bias[3];           /* (rows[i],) or NULL */
} bitnet_linear_set;

/* One pre-norm decoder block with packed projections (bitnet.models.BitNetTransformer's layout):
 *   x += o(sub_norm(attention(rotary(q|k|v(attn_norm(x))))))
 *   x += down(post_norm(act(gate(h)) * up(h))),  h = ffn_norm(x)     (act(up(h)) when not gated)
 * A norm weight of NULL means no norm there (attn_norm / ffn_norm must be given). */
typedef struct {
  int64_t dim, hidden, heads, kv_heads, head_dim;
  int32_t bits;                   /* activation bits of every projection */
  int32_t activation;             /* a code of bitnet_block_activation (0 silu, 1 gelu (erf), 2 relu^2) */
  int32_t gated;                  /* 1: gate_up holds gate then up */
  float act_eps;                  /* activation-scale clamp of the quantiser */
  const float* attn_norm; float attn_norm_eps;
  const float* sub_norm; float sub_norm_eps;
  const float* ffn_norm; float ffn_norm_eps;
  const float* post_norm; float post_norm_eps;
  bitnet_linear_set qkv, o, gate_up, down;
  const float* cos_table; const float* sin_table; int64_t table_len;
} bitnet_block;

/* Name of gate activation `code` of bitnet_block ("silu", "gelu", "relu2"), NULL past the last one:
 * the table of codes, read back by the Python side at load. */
BITNET_API const char* bitnet_block_activation(int code);
/* Runs `blk` on x (B*T, dim) float32 in place: B rows of T tokens, token t of row b at position
 * pos[b] + t, appending to k_cache/v_cache (B, kv_heads, max_len, head_dim) of element type kv_dtype
 * (a BITNET_KV_* code, with k_scale/v_scale for int8; see bitnet_attention_step). */
BITNET_API int bitnet_block_forward(const bitnet_block* blk, float* x, int64_t B, int64_t T, void* k_cache,
                                    void* v_cache, float* k_scale, float* v_scale, int kv_dtype, int64_t max_len,
                                    const int64_t* pos, int isa);
/* Whether bitnet_block_forward runs a gated feed-forward of more than 3 tokens fused (gate and up GEMMs
 * and the activation tile by tile, 1: the default) or unfused (one gate|up GEMM, then the activation, 0).
 * Both give the same bits; returns the previous setting. For tests and benchmarks. */
BITNET_API int bitnet_set_fused_gate(int on);
/* Starts reading the n byte ranges (ptrs[i], lens[i]) into cache on the thread pool's workers and
 * returns at once; the next native call stops it. Meant for the weights of the next call, while the
 * caller does other work (attention, norms in Python). The ranges must stay valid until that call. */
BITNET_API int bitnet_prefetch_async(int n, const void* const* ptrs, const int64_t* lens);
/* Stops a running prefetch and waits for it (before the ranges it reads are freed). */
BITNET_API void bitnet_prefetch_wait(void);
/* Layout of the structs of this ABI (bitnet_linear_set, bitnet_block), so that a loader can check its own
 * declarations at load: struct s (0, 1, ...) is named bitnet_struct_name(s) (NULL past the last one) and
 * is bitnet_struct_size(s) bytes (-1 past the last one); its field i (in declaration order) is named
 * bitnet_struct_field(s, i, &offset) (NULL past the last field) and starts at byte `offset`. */
BITNET_API const char* bitnet_struct_name(int s);
BITNET_API int64_t bitnet_struct_size(int s);
BITNET_API const char* bitnet_struct_field(int s, int field, int64_t* offset);
/* Int8 weights (the int8 LM head of bitnet.nn.Int8Linear), w int8 (N, ldw):
 *   acc[m, n] = sum_k x[m, k] * w[n, k] (exact int32; K <= 131072), out int32 (M, ldo). */
BITNET_API int bitnet_int8_matmul_int(const int8_t* x, int64_t M, int64_t K, int64_t ldx,
                                      const int8_t* w, int64_t N, int64_t ldw,
                                      int32_t* out, int64_t ldo, int isa);

/* Fused: quantise x (M, K) float32 per token (as bitnet_quantize_act), then
 *   out[m, n] = acc[m, n] * w_scale[n] / x_scale[m] (+ bias[n]); w_scale (N,), bias (N,) or NULL. */
BITNET_API int bitnet_int8_linear(const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps,
                                  const int8_t* w, int64_t N, int64_t ldw, const float* w_scale,
                                  const float* bias, float* out, int64_t ldo, int isa);

#ifdef __cplusplus
}
#endif
#endif
