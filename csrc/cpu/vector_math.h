// Branch-free float32 math for the CPU kernels' vectorised loops (libm's would not vectorise).
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>

#include "cpu_dispatch.h"

namespace internimage {

// exp(x) for x <= 0 (inputs below -87 give exp(-87) ~ 1.6e-38; NaN stays NaN): Cody-Waite
// reduction x = n ln2 + r with |r| <= ln2/2, a degree-7 Taylor polynomial for exp(r)
// (truncation < 1e-8 relative, so the result is within about 2 ulp), and 2^n assembled in
// the exponent bits.
DCNV3_ALWAYS_INLINE float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;  // not std::max, which would turn NaN into -87
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504f + shifter) - shifter;
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln2 in two parts
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return p * scale;
}

}  // namespace internimage
