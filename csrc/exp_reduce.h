// The argument reduction shared by the library's branch-free exp approximations (the attention's
// exp_nonpositive, the gate's exp_any): x = n ln2 + r with |r| <= ln2 / 2, two-constant Cody-Waite.
// Each caller evaluates its own polynomial in r and builds 2^n from the returned exponent n.
#pragma once
#include <cstdint>
#include <cstring>

namespace bitnet {

struct ExpReduced {
  float r;      // x - n ln2
  int32_t n;    // round(x / ln2)
};

// x must lie in [-126 ln2, 128 ln2] (callers clamp first): t = x / ln2 + 1.5 * 2^23 rounds to the
// integer n in its low mantissa bits, so n = t - 1.5 * 2^23 exactly.
inline ExpReduced exp_reduce(float x) {
  const float magic = 12582912.0f;                 // 1.5 * 2^23
  const float t = x * 1.44269504f + magic;
  const float n = t - magic;
  int32_t ti;
  std::memcpy(&ti, &t, 4);
  return ExpReduced{(x - n * 0.693145752f) - n * 1.42860677e-6f, ti - 0x4B400000};
}

// 2^e as a float for e in [-126, 127] (the exponent field e + 127).
inline float exp2_int(int32_t e) {
  const int32_t bits = (e + 127) << 23;
  float s;
  std::memcpy(&s, &bits, 4);
  return s;
}

}  // namespace bitnet
