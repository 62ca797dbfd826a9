// The C ABI of the native backend (see bitnet_native.h): thin entry points over the ISA resolver (isa.cpp),
// the driver (driver.cpp) and the quantiser (quantize.cpp); the struct layout table the loader checks.
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <memory>
#include <vector>

#include "bitnet_native.h"
#include "driver.h"
#include "isa.h"
#include "quantize.h"

using namespace bitnet;

extern "C" {

int bitnet_abi_version(void) { return BITNET_ABI_VERSION; }

// Layout of the structs of this ABI, for the loader's check of its own declarations (bitnet/ops/cpu.py).
#define BITNET_FIELD(T, f) {#f, (int64_t)offsetof(T, f)}
namespace {
struct FieldInfo { const char* name; int64_t offset; };
struct StructInfo { const char* name; int64_t size; const FieldInfo* fields; int nfields; };
const FieldInfo kLinearSetFields[] = {
    BITNET_FIELD(bitnet_linear_set, n), BITNET_FIELD(bitnet_linear_set, format),
    BITNET_FIELD(bitnet_linear_set, in_features), BITNET_FIELD(bitnet_linear_set, ldw),
    BITNET_FIELD(bitnet_linear_set, w), BITNET_FIELD(bitnet_linear_set, rows),
    BITNET_FIELD(bitnet_linear_set, scale), BITNET_FIELD(bitnet_linear_set, bias)};
const FieldInfo kBlockFields[] = {
    BITNET_FIELD(bitnet_block, dim), BITNET_FIELD(bitnet_block, hidden), BITNET_FIELD(bitnet_block, heads),
    BITNET_FIELD(bitnet_block, kv_heads), BITNET_FIELD(bitnet_block, head_dim), BITNET_FIELD(bitnet_block, bits),
    BITNET_FIELD(bitnet_block, activation), BITNET_FIELD(bitnet_block, gated), BITNET_FIELD(bitnet_block, act_eps),
    BITNET_FIELD(bitnet_block, attn_norm), BITNET_FIELD(bitnet_block, attn_norm_eps),
    BITNET_FIELD(bitnet_block, sub_norm), BITNET_FIELD(bitnet_block, sub_norm_eps),
    BITNET_FIELD(bitnet_block, ffn_norm), BITNET_FIELD(bitnet_block, ffn_norm_eps),
    BITNET_FIELD(bitnet_block, post_norm), BITNET_FIELD(bitnet_block, post_norm_eps),
    BITNET_FIELD(bitnet_block, qkv), BITNET_FIELD(bitnet_block, o), BITNET_FIELD(bitnet_block, gate_up),
    BITNET_FIELD(bitnet_block, down), BITNET_FIELD(bitnet_block, cos_table), BITNET_FIELD(bitnet_block, sin_table),
    BITNET_FIELD(bitnet_block, table_len)};
const StructInfo kStructs[] = {
    {"bitnet_linear_set", (int64_t)sizeof(bitnet_linear_set), kLinearSetFields,
     (int)(sizeof(kLinearSetFields) / sizeof(FieldInfo))},
    {"bitnet_block", (int64_t)sizeof(bitnet_block), kBlockFields, (int)(sizeof(kBlockFields) / sizeof(FieldInfo))}};
}  // namespace
#undef BITNET_FIELD

const char* bitnet_struct_name(int s) {
  return s >= 0 && s < (int)(sizeof(kStructs) / sizeof(StructInfo)) ? kStructs[s].name : nullptr;
}

int64_t bitnet_struct_size(int s) { return bitnet_struct_name(s) ? kStructs[s].size : -1; }

const char* bitnet_struct_field(int s, int field, int64_t* offset) {
  if (!bitnet_struct_name(s) || field < 0 || field >= kStructs[s].nfields) return nullptr;
  *offset = kStructs[s].fields[field].offset;
  return kStructs[s].fields[field].name;
}

const char* bitnet_isa_name(int isa) {
  static const char* names[] = {"scalar", "neon", "avx2", "avxvnni", "avx512vnni", "amx"};
  return isa >= 0 && isa < BITNET_ISA_COUNT ? names[isa] : "";
}

int bitnet_isa_compiled(int isa) { return compiled(isa) ? 1 : 0; }
int bitnet_isa_supported(int isa) { return supported(isa) ? 1 : 0; }
int bitnet_best_isa(void) { return best_isa(); }

int bitnet_get_default_isa(void) { return default_isa(); }
int bitnet_set_default_isa(int isa) { return set_default_isa(isa); }
const char* bitnet_cpu_name(void) { return cpu_brand().c_str(); }

void bitnet_set_num_threads(int n) { set_num_threads(n); }
int bitnet_get_num_threads(void) { return get_num_threads(); }

double bitnet_isa_peak_gmacs(int isa) {
  Kernel k;
  if (resolve_isa(isa, &k) || !k.peak) return 0.0;
  k.peak(1000);  // warm up (AMX: first use of the tile state)
  // the best of 5 windows of >= 10 ms: on a shared machine a single window is often cut by other work
  double best = 0.0;
  for (int window = 0; window < 5; ++window) {
    int64_t macs = 0, iters = 1000;
    const auto t0 = std::chrono::steady_clock::now();
    double s = 0.0;
    while (s < 0.01) {
      macs += k.peak(iters);
      iters *= 2;
      s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    best = std::max(best, (double)macs / s / 1e9);
  }
  return best;
}

int bitnet_matmul_int(const int8_t* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* w, int64_t N, int64_t ldw,
                      int32_t* out, int64_t ldo, int isa) {
  return matmul_common(x, M, K, ldx, w, N, ldw, out, ldo, Epilogue{}, isa);
}

int bitnet_linear(const int8_t* x, const float* x_scale, int64_t M, int64_t K, int64_t ldx, const uint8_t* w,
                  int64_t N, int64_t ldw, float w_scale, const float* bias, float* out, int64_t ldo, int isa) {
  Epilogue e;
  e.to_float = true; e.x_scale = x_scale; e.w_scale = w_scale; e.bias = bias;
  return matmul_common(x, M, K, ldx, w, N, ldw, reinterpret_cast<int32_t*>(out), ldo, e, isa);
}

int bitnet_quantize_act(const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps, int8_t* xq,
                        int64_t ldq, float* scale, int isa) {
  if (M < 0 || K < 0 || ldx < K || ldq < K || bits < 2 || bits > 8) return BITNET_EINVAL;
  Kernel k;
  int rc = resolve_isa(isa, &k);
  if (rc) return rc;
  quantize_act(k, x, M, K, ldx, bits, eps, xq, ldq, scale);
  return BITNET_OK;
}

int bitnet_bitlinear(const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps, const uint8_t* w,
                     int64_t N, int64_t ldw, float w_scale, const float* bias, float* out, int64_t ldo, int isa) {
  const float* scales[1] = {&w_scale};
  return bitnet_bitlinear_multi(x, M, K, ldx, bits, eps, nullptr, 0.0f, 1, &w, &N, ldw, scales, &bias, out, ldo, isa);
}

int bitnet_bitlinear_multi(const float* x, int64_t M, int64_t K, int64_t ldx, int bits, float eps,
                           const float* norm_weight, float norm_eps, int nmat, const uint8_t* const* w,
                           const int64_t* n, int64_t ldw, const float* const* w_scale, const float* const* bias,
                           float* out, int64_t ldo, int isa) {
  int64_t total = 0;
  if (check_multi(nmat, bits, norm_eps, n, &total)) return BITNET_EINVAL;
  int rc = check_dims(M, K, ldx, total, ldw, ldo);
  if (rc) return rc;
  Kernel k;
  if ((rc = resolve_isa(isa, &k))) return rc;
  if (M == 0 || total == 0) return BITNET_OK;
  XBuf& xb = scratch();
  std::vector<float> xs((size_t)M);
  quantize_rows(k, x, M, K, ldx, bits, eps, norm_weight, norm_eps, xb, xs.data());
  const int64_t nblk = round_up(K, 128) / 128;
  std::vector<GemmArgs> args;
  std::vector<Epilogue> epis;
  int64_t off = 0;
  for (int j = 0; j < nmat; ++j) {
    args.push_back(GemmArgs{xb.x.data(), xb.ldx, xb.sum.data(), w[j], ldw, nblk,
                            reinterpret_cast<int32_t*>(out) + off, ldo});
    Epilogue e;
    e.to_float = true; e.x_scale = xs.data(); e.w_scale = *w_scale[j]; e.bias = bias[j];
    epis.push_back(e);
    off += n[j];
  }
  if (M > 3 || pool()->size() == 1 || M * total * nblk < 4096) {
    for (int j = 0; j < nmat; ++j) run_gemm(k, args[(size_t)j], M, n[j], epis[(size_t)j], xb);
    return BITNET_OK;
  }
  run_decode(k, args.data(), epis.data(), n, nmat, M);   // one wake-up of the pool for all matrices
  return BITNET_OK;
}

void bitnet_prefetch_wait(void) {
  pool()->stop_background();
}

int bitnet_prefetch_async(int n, const void* const* ptrs, const int64_t* lens) {
  if (n < 0) return BITNET_EINVAL;
  struct Range { const uint8_t* p; int64_t len; };
  std::vector<Range> ranges;
  int64_t total = 0;
  for (int i = 0; i < n; ++i) {
    if (lens[i] < 0) return BITNET_EINVAL;
    if (lens[i] == 0) continue;
    ranges.push_back(Range{static_cast<const uint8_t*>(ptrs[i]), lens[i]});
    total += lens[i];
  }
  std::shared_ptr<ThreadPool> p = pool();
  const int64_t workers = p->size() - 1;
  if (total == 0 || workers < 1) return BITNET_OK;
  ThreadPool* raw = p.get();  // the pool cancels and joins this job before it is destroyed
  const int64_t slice = (total + workers - 1) / workers;
  p->post_background(workers, [ranges, raw, slice](int64_t t) {
    // Read one byte of every cache line of bytes [t * slice, (t + 1) * slice) of the ranges, in order:
    // the lines land in this core's L2 and, as they are evicted, in the shared L3.
    int64_t skip = t * slice, left = slice;
    uint32_t sink = 0;
    for (const Range& r : ranges) {
      if (left <= 0) break;
      if (skip >= r.len) { skip -= r.len; continue; }
      const int64_t end = std::min(r.len, skip + left);
      for (int64_t i = skip; i < end; i += 64) {
        sink += *reinterpret_cast<const volatile uint8_t*>(r.p + i);
        if ((i & 4095) == 0 && raw->cancelled()) return;
      }
      left -= end - skip;
      skip = 0;
    }
    (void)sink;
  });
  return BITNET_OK;
}

}  // extern "C"

namespace bitnet {
int gated_bitlinear(const float* x, int64_t M, int64_t K, int bits, float eps, const float* norm_weight,
                    float norm_eps, const uint8_t* gate, const uint8_t* up, int64_t F, int64_t ldw, float gate_scale,
                    float up_scale, const float* gate_bias, const float* up_bias, const GateFn& act, float* h,
                    int isa) {
  const int64_t rows[2] = {F, F};
  int64_t total = 0;
  if (check_multi(2, bits, norm_eps, rows, &total) || M <= 3) return BITNET_EINVAL;
  int rc = check_dims(M, K, K, F, ldw, F);
  if (rc) return rc;
  Kernel k;
  if ((rc = resolve_isa(isa, &k))) return rc;
  if (F == 0) return BITNET_OK;
  XBuf& xb = scratch();
  std::vector<float> xs((size_t)M);
  quantize_rows(k, x, M, K, K, bits, eps, norm_weight, norm_eps, xb, xs.data());
  const int64_t nblk = round_up(K, 128) / 128;
  const GemmArgs ga{xb.x.data(), xb.ldx, xb.sum.data(), gate, ldw, nblk, nullptr, 0};
  const GemmArgs ua{xb.x.data(), xb.ldx, xb.sum.data(), up, ldw, nblk, nullptr, 0};
  Epilogue ge, ue;
  ge.to_float = ue.to_float = true;
  ge.x_scale = ue.x_scale = xs.data();
  ge.w_scale = gate_scale; ge.bias = gate_bias;
  ue.w_scale = up_scale; ue.bias = up_bias;
  run_gated_gemm(k, ga, ge, ua, ue, M, F, xb, act, h, F);
  return BITNET_OK;
}
}  // namespace bitnet
