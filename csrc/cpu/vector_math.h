// Branch-free float32 math for the CPU kernels' vectorised loops (libm's would not vectorise).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

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

// Blocks of 16 float32 values as GCC/Clang vector values: one AVX-512 register, two AVX2
// ones. Spelling accumulators as vectors keeps them in registers, which the compiler does not
// manage for a plain array under `omp simd`, and avoids the peeled, scalar-tailed loops it
// makes for short runtime-length reductions. The unaligned, aliasing twin reads 16 values
// straight from a float row.
typedef float Floatx16 __attribute__((vector_size(64)));
typedef float UnalignedFloatx16 __attribute__((vector_size(64), aligned(4), may_alias));

#define DCNV3_LOAD16(p) (*reinterpret_cast<const UnalignedFloatx16*>(p))
#define DCNV3_STORE16(p, v) (*reinterpret_cast<UnalignedFloatx16*>(p) = (v))

// Float vectors of N lanes (4, 8, 16: one SSE, AVX2 or AVX-512 register) and their unaligned,
// aliasing twins, for kernels compiled once per instruction set with the register width as a
// template parameter: accumulators wider than a register are not kept in registers by GCC
// (it spills them to the stack on every update).
template <int N>
struct FloatVector {
  typedef float type __attribute__((vector_size(4 * N)));
  typedef float unaligned __attribute__((vector_size(4 * N), aligned(4), may_alias));
};

template <int N>
DCNV3_ALWAYS_INLINE typename FloatVector<N>::type load_floats(const float* p) {
  return *reinterpret_cast<const typename FloatVector<N>::unaligned*>(p);
}

template <int N>
DCNV3_ALWAYS_INLINE void store_floats(float* p, typename FloatVector<N>::type v) {
  *reinterpret_cast<typename FloatVector<N>::unaligned*>(p) = v;
}

// Sum of N values as a pairwise tree: a dependency chain of log2(N) additions instead of N.
template <int N>
DCNV3_ALWAYS_INLINE float tree_sum(const float* v) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    return tree_sum<N / 2>(v) + tree_sum<N - N / 2>(v + N / 2);
  }
}

DCNV3_ALWAYS_INLINE float horizontal_sum(Floatx16 v) {
  float lanes[16];
  std::memcpy(lanes, &v, sizeof lanes);
  return tree_sum<16>(lanes);
}

// Mean and 1 / sqrt(variance + eps) of the `count` values at `v`, for a LayerNorm: two passes
// (the mean, then the squared deviations from it), as exact as the sums' float rounding.
DCNV3_ALWAYS_INLINE void row_moments(const float* __restrict__ v, int64_t count, float eps,
                                     float& mean, float& rstd) {
  float sum = 0.0f, squares = 0.0f;
  if (count % 16 == 0) {  // every InternImage width
    Floatx16 sums = {};
    for (int64_t c = 0; c < count; c += 16) sums += DCNV3_LOAD16(v + c);
    mean = horizontal_sum(sums) / static_cast<float>(count);
    Floatx16 deviations = {};
    for (int64_t c = 0; c < count; c += 16) {
      const Floatx16 d = DCNV3_LOAD16(v + c) - mean;
      deviations += d * d;
    }
    squares = horizontal_sum(deviations);
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < count; ++c) sum += v[c];
    mean = sum / static_cast<float>(count);
#pragma omp simd reduction(+ : squares)
    for (int64_t c = 0; c < count; ++c) squares += (v[c] - mean) * (v[c] - mean);
  }
  rstd = 1.0f / std::sqrt(squares / static_cast<float>(count) + eps);
}

}  // namespace internimage
