// CPU kernel of the fused DCNv3 offset branch for float32 inference:
// GELU(LayerNorm_C(depthwise_conv_kxk(x))) on an (N, H, W, C) tensor in one pass.
//
// Unfused, the branch is three full passes over the activations plus oneDNN's per-call setup
// of a depthwise convolution (~0.2 ms even for a 7x7x512 map). Here each output pixel's C
// convolution sums stay in an L1-resident buffer while LayerNorm and GELU are applied, and
// the loops over C vectorise. Forward only: training runs the unfused modules.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu_dispatch.h"
#include "vector_math.h"

namespace internimage {
namespace {

// Exact-form GELU, y * Phi(y) = 0.5 y (1 + erf(y / sqrt 2)), with erfc(|y| / sqrt 2) from
// Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7): |result - gelu(y)| < 1e-7 * |y|.
// For y < 0 the erfc form is used directly, so there is no cancellation in 1 + erf.
DCNV3_ALWAYS_INLINE float gelu_erf(float y) {
  const float a = std::fabs(y) * 0.707106781f;
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  const float poly =
      t * (0.254829592f +
           t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float erfc_a = poly * exp_nonpositive(-a * a);
  const float one_plus_erf = y >= 0.0f ? 2.0f - erfc_a : erfc_a;
  return 0.5f * y * one_plus_erf;
}

struct BranchShape {
  int64_t height, width, channels, kernel;
  double eps;
};

// Convolution sums of channels [c0, c0 + BLOCK) of one output pixel, accumulated in
// registers over the taps (tap_begin/tap_end clip the window at the image border).
template <int BLOCK>
DCNV3_ALWAYS_INLINE void conv_block(const float* image, const float* taps,
                                   const float* conv_bias, int64_t C, int64_t W, int64_t K,
                                   int64_t y0, int64_t x0, int64_t ky_begin, int64_t ky_end,
                                   int64_t kx_begin, int64_t kx_end, int64_t c0, float* acc) {
  float sums[BLOCK];
#pragma omp simd
  for (int j = 0; j < BLOCK; ++j) sums[j] = conv_bias ? conv_bias[c0 + j] : 0.0f;
  for (int64_t ky = ky_begin; ky < ky_end; ++ky) {
    for (int64_t kx = kx_begin; kx < kx_end; ++kx) {
      const float* __restrict__ src = image + ((y0 + ky) * W + x0 + kx) * C + c0;
      const float* __restrict__ tap = taps + (ky * K + kx) * C + c0;
#pragma omp simd
      for (int j = 0; j < BLOCK; ++j) sums[j] += src[j] * tap[j];
    }
  }
#pragma omp simd
  for (int j = 0; j < BLOCK; ++j) acc[c0 + j] = sums[j];
}

// Rows [begin, end) of the flattened (N, H) output. taps: (kernel * kernel, C) weights.
DCNV3_ALWAYS_INLINE void offset_branch_rows_any(const BranchShape& s, const float* input,
                                                const float* taps, const float* conv_bias,
                                                const float* gamma, const float* beta,
                                                float* output, int64_t begin, int64_t end) {
  constexpr int kBlock = 64;  // four AVX-512 registers of sums
  const int64_t C = s.channels, H = s.height, W = s.width, K = s.kernel, half = K / 2;
  std::vector<float> buffer(static_cast<size_t>(C));
  float* __restrict__ acc = buffer.data();
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / H, h = row % H;
    const float* image = input + n * H * W * C;
    const int64_t y0 = h - half;
    const int64_t ky_begin = std::max<int64_t>(0, -y0), ky_end = std::min<int64_t>(K, H - y0);
    for (int64_t w = 0; w < W; ++w) {
      const int64_t x0 = w - half;
      const int64_t kx_begin = std::max<int64_t>(0, -x0);
      const int64_t kx_end = std::min<int64_t>(K, W - x0);
      int64_t c0 = 0;
      for (; c0 + kBlock <= C; c0 += kBlock) {
        conv_block<kBlock>(image, taps, conv_bias, C, W, K, y0, x0, ky_begin, ky_end, kx_begin,
                           kx_end, c0, acc);
      }
      for (; c0 < C; ++c0) {
        conv_block<1>(image, taps, conv_bias, C, W, K, y0, x0, ky_begin, ky_end, kx_begin,
                      kx_end, c0, acc);
      }
      float mean, rstd;
      row_moments(acc, C, static_cast<float>(s.eps), mean, rstd);
      float* __restrict__ out = output + (row * W + w) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        out[c] = gelu_erf((acc[c] - mean) * rstd * gamma[c] + beta[c]);
      }
    }
  }
}

#define OFFSET_BRANCH_ENTRY_POINT(target, suffix)                                              \
  target void offset_branch_rows_##suffix(const BranchShape& s, const float* input,           \
                                          const float* taps, const float* conv_bias,          \
                                          const float* gamma, const float* beta,              \
                                          float* output, int64_t begin, int64_t end) {        \
    offset_branch_rows_any(s, input, taps, conv_bias, gamma, beta, output, begin, end);       \
  }

OFFSET_BRANCH_ENTRY_POINT(, baseline)
#ifdef DCNV3_X86_DISPATCH
OFFSET_BRANCH_ENTRY_POINT(DCNV3_TARGET_AVX2, avx2)
OFFSET_BRANCH_ENTRY_POINT(DCNV3_TARGET_AVX512, avx512)
#endif

void offset_branch_rows(const BranchShape& s, const float* input, const float* taps,
                        const float* conv_bias, const float* gamma, const float* beta,
                        float* output, int64_t begin, int64_t end) {
  DCNV3_RETURN_DISPATCHED(offset_branch_rows, s, input, taps, conv_bias, gamma, beta, output,
                          begin, end);
}

void check_vector(const at::Tensor& t, const char* name, int64_t channels) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, "dwconv_layernorm_gelu: ", name,
              " must have shape (", channels, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), "dwconv_layernorm_gelu: ",
              name, " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

at::Tensor dwconv_layernorm_gelu_cpu(const at::Tensor& input_, const at::Tensor& conv_weight,
                                     const std::optional<at::Tensor>& conv_bias,
                                     const at::Tensor& norm_weight,
                                     const at::Tensor& norm_bias, double eps) {
  TORCH_CHECK(input_.dim() == 4, "dwconv_layernorm_gelu: input must be 4-D (N, H, W, C), got ",
              input_.dim(), "-D with shape ", input_.sizes());
  TORCH_CHECK(input_.scalar_type() == at::kFloat,
              "dwconv_layernorm_gelu: input must be float32, got ", input_.scalar_type());
  const int64_t channels = input_.size(3);
  TORCH_CHECK(conv_weight.dim() == 4 && conv_weight.size(0) == channels &&
                  conv_weight.size(1) == 1 && conv_weight.size(2) == conv_weight.size(3) &&
                  conv_weight.size(2) % 2 == 1,
              "dwconv_layernorm_gelu: conv_weight must have shape (", channels,
              ", 1, k, k) with odd k, got ", conv_weight.sizes());
  TORCH_CHECK(conv_weight.scalar_type() == at::kFloat,
              "dwconv_layernorm_gelu: conv_weight must be float32, got ",
              conv_weight.scalar_type());
  if (conv_bias.has_value()) check_vector(*conv_bias, "conv_bias", channels);
  check_vector(norm_weight, "norm_weight", channels);
  check_vector(norm_bias, "norm_bias", channels);
  TORCH_CHECK(eps >= 0.0, "dwconv_layernorm_gelu: eps must be >= 0, got ", eps);

  const BranchShape s{input_.size(1), input_.size(2), channels, conv_weight.size(2), eps};
  const at::Tensor input = input_.contiguous();
  at::Tensor output = at::empty(input.sizes(), input.options());
  const int64_t rows = input.size(0) * s.height;
  if (rows == 0 || s.width == 0 || channels == 0) return output;
  // (C, 1, k, k) -> (k * k, C): one contiguous weight row per tap. A plain loop, not
  // reshape().t().contiguous(): three operator calls cost more than the copy.
  const at::Tensor weight = conv_weight.contiguous();
  const int64_t taps_per_channel = s.kernel * s.kernel;
  std::vector<float> taps(static_cast<size_t>(taps_per_channel * channels));
  const float* w = weight.const_data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t t = 0; t < taps_per_channel; ++t) {
      taps[t * channels + c] = w[c * taps_per_channel + t];
    }
  }
  const at::Tensor bias = conv_bias.has_value() ? conv_bias->contiguous() : at::Tensor();
  const at::Tensor gamma = norm_weight.contiguous();
  const at::Tensor beta = norm_bias.contiguous();
  const float* in = input.const_data_ptr<float>();
  const float* tap = taps.data();
  const float* b = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  const float* g = gamma.const_data_ptr<float>();
  const float* be = beta.const_data_ptr<float>();
  float* out = output.mutable_data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    offset_branch_rows(s, in, tap, b, g, be, out, begin, end);
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(internimage, CPU, m) {
  m.impl("_dwconv_layernorm_gelu", &dwconv_layernorm_gelu_cpu);
}

}  // namespace internimage
