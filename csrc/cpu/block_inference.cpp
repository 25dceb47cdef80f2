// One InternImage block (DCNv3 mixer and MLP, each with its residual) as a single call, for
// eval-mode float32 CPU inference: internimage::_block_cpu_inference.
//
// The mixer and MLP run the same operators as the modules' fused per-layer path: oneDNN
// linear(+GELU) (mkldnn::_linear_pointwise), the fused offset branch, DCNv3 with the mask
// softmax inside. The LayerNorms, layer scales and residual adds around them run as one
// vectorised pass per residual step (residual_rows) instead of three to four ATen calls.
// Doing the block from C++ saves the Python interpreter and argument conversion around its
// ~15 operator calls: 2.6 % of InternImage-T's latency at 224x224 batch 1, 14 % at 64x64,
// where the matrices are small and the calls short.
// The residual mode arrives as which norms and scales are present (see the schema in
// schemas.cpp), so this file holds no copy of the mode table.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/rsub.h>
#include <ATen/ops/sigmoid.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "cpu_dispatch.h"
#include "vector_math.h"

namespace internimage {
namespace {

// A LayerNorm over the last dimension; weight == nullptr: no norm at this place.
struct RowNorm {
  const float* weight = nullptr;
  const float* bias = nullptr;  // may be nullptr (no bias)
  float eps = 0.0f;
};

// out = LayerNorm(v) over one row of C values.
DCNV3_ALWAYS_INLINE void normalize_row(const float* __restrict__ v, const RowNorm& norm,
                                       int64_t C, float* __restrict__ out) {
  float mean, rstd;
  row_moments(v, C, norm.eps, mean, rstd);
  const float* __restrict__ w = norm.weight;
  const float* __restrict__ b = norm.bias;
  if (C % 16 == 0 && b != nullptr) {
    for (int64_t c = 0; c < C; c += 16) {
      DCNV3_STORE16(out + c, (DCNV3_LOAD16(v + c) - mean) * rstd * DCNV3_LOAD16(w + c) +
                                 DCNV3_LOAD16(b + c));
    }
  } else if (b != nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] = (v[c] - mean) * rstd * w[c] + b[c];
  } else {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] = (v[c] - mean) * rstd * w[c];
  }
}

// Rows [begin, end) of one residual step on (rows, C) tensors, in one pass per row:
//   sum = x + gamma * after(branch)    (after: a LayerNorm or none; gamma: a scale or none)
//   next_input = next(sum)             (when `next` is a LayerNorm)
// and, with x == nullptr, just next_input = next(branch) (a plain LayerNorm).
DCNV3_ALWAYS_INLINE void residual_rows_any(const float* x, const float* branch,
                                           const RowNorm& after, const float* gamma,
                                           const RowNorm& next, int64_t C, float* sum,
                                           float* next_input, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const float* b = branch + row * C;
    if (x == nullptr) {
      normalize_row(b, next, C, next_input + row * C);
      continue;
    }
    const float* __restrict__ xr = x + row * C;
    float* s = sum + row * C;
    if (after.weight != nullptr) normalize_row(b, after, C, s);  // s = after(branch) for now
    const float* t = after.weight != nullptr ? s : b;  // s[c] is read before it is written
    if (gamma != nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) s[c] = xr[c] + gamma[c] * t[c];
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) s[c] = xr[c] + t[c];
    }
    if (next.weight != nullptr) normalize_row(s, next, C, next_input + row * C);
  }
}

#define RESIDUAL_ROWS_ENTRY_POINT(target, suffix)                                          \
  target void residual_rows_##suffix(const float* x, const float* branch,                 \
                                     const RowNorm& after, const float* gamma,            \
                                     const RowNorm& next, int64_t C, float* sum,          \
                                     float* next_input, int64_t begin, int64_t end) {     \
    residual_rows_any(x, branch, after, gamma, next, C, sum, next_input, begin, end);     \
  }

RESIDUAL_ROWS_ENTRY_POINT(, baseline)
#ifdef DCNV3_X86_DISPATCH
RESIDUAL_ROWS_ENTRY_POINT(DCNV3_TARGET_AVX2, avx2)
RESIDUAL_ROWS_ENTRY_POINT(DCNV3_TARGET_AVX512, avx512)
#endif

void residual_rows(const float* x, const float* branch, const RowNorm& after,
                   const float* gamma, const RowNorm& next, int64_t C, float* sum,
                   float* next_input, int64_t begin, int64_t end) {
  DCNV3_RETURN_DISPATCHED(residual_rows, x, branch, after, gamma, next, C, sum, next_input,
                          begin, end);
}

using OptionalTensor = std::optional<at::Tensor>;
using TensorList = c10::List<OptionalTensor>;

at::Tensor required(const TensorList& list, size_t index, const char* list_name) {
  OptionalTensor slot = list.get(index);
  TORCH_CHECK(slot.has_value(), "block_cpu_inference: ", list_name, "[", index,
              "] must be a tensor, got None");
  return *std::move(slot);
}

OptionalTensor optional_at(const TensorList& list, size_t index) { return list.get(index); }

// x @ weight.T + bias, then exact (erf) GELU when `gelu`, through oneDNN as the Python path.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias,
                  bool gelu) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                            std::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<std::string_view>)>();
  return op.call(x, weight, bias, gelu ? "gelu" : "none", c10::List<std::optional<at::Scalar>>(),
                 std::optional<std::string_view>(gelu ? "none" : ""));
}

// Checks that `t` holds one float32 value per channel, contiguous on the CPU (the row kernels
// read it through a raw pointer), and returns that pointer. The error names `name`, or
// `name[index]` for index >= 0 (TORCH_CHECK builds the message only on failure).
const float* channel_values(const at::Tensor& t, int64_t C, const char* name,
                           int64_t index = -1) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C && t.scalar_type() == at::kFloat &&
                  t.is_contiguous() && t.device().is_cpu(),
              "block_cpu_inference: ", name,
              index >= 0 ? "[" + std::to_string(index) + "]" : std::string(),
              " must be a contiguous float32 tensor of shape (", C, ") on the CPU, got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
  return t.const_data_ptr<float>();
}

// The LayerNorm at norms[index] / norms[index + 1] (weight, bias) with norm_eps[index / 2],
// or an absent RowNorm when that slot is None.
RowNorm row_norm(const TensorList& norms, c10::ArrayRef<double> eps, size_t index, int64_t C) {
  const OptionalTensor weight = optional_at(norms, index);
  if (!weight.has_value()) return {};
  const OptionalTensor bias = optional_at(norms, index + 1);
  const auto slot = static_cast<int64_t>(index);
  return {channel_values(*weight, C, "norms", slot),
          bias.has_value() ? channel_values(*bias, C, "norms", slot + 1) : nullptr,
          static_cast<float>(eps[index / 2])};
}

// One residual step on NHWC tensors (see residual_rows): returns {x + gamma * after(branch),
// next(that sum)}, the second undefined without `next`. With x undefined: {undefined,
// next(branch)}.
std::pair<at::Tensor, at::Tensor> residual_step(const at::Tensor& x, const at::Tensor& branch_,
                                                const RowNorm& after, const float* gamma,
                                                const RowNorm& next) {
  const at::Tensor branch = branch_.contiguous();
  const int64_t C = branch.size(-1), rows = branch.numel() / std::max<int64_t>(C, 1);
  at::Tensor sum = x.defined() ? at::empty(branch.sizes(), branch.options()) : at::Tensor();
  at::Tensor next_input =
      next.weight != nullptr ? at::empty(branch.sizes(), branch.options()) : at::Tensor();
  if (rows == 0 || C == 0) return {sum, next_input};
  const float* x_data = x.defined() ? x.const_data_ptr<float>() : nullptr;
  const float* b_data = branch.const_data_ptr<float>();
  float* s_data = sum.defined() ? sum.mutable_data_ptr<float>() : nullptr;
  float* n_data = next_input.defined() ? next_input.mutable_data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
    residual_rows(x_data, b_data, after, gamma, next, C, s_data, n_data, begin, end);
  });
  return {sum, next_input};
}

const float* scale_data(const OptionalTensor& gamma, int64_t C, const char* name) {
  return gamma.has_value() ? channel_values(*gamma, C, name) : nullptr;
}

// The DCNv3 module: input projection, fused offset branch, offset and mask projections, the
// core with the mask softmax inside, optional centre-feature scale, output projection.
at::Tensor dcnv3_module(const at::Tensor& x, const TensorList& p, double branch_eps,
                        c10::ArrayRef<int64_t> geometry, double offset_scale) {
  static const auto branch_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("internimage::_dwconv_layernorm_gelu", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                            const at::Tensor&, const at::Tensor&, double)>();
  static const auto core_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("internimage::_dcnv3_mask_logits", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                            int64_t, int64_t, double, bool)>();
  const int64_t k = geometry[0], s = geometry[1], pad = geometry[2], d = geometry[3];
  const int64_t group = geometry[4], group_channels = geometry[5];
  const at::Tensor value = linear(x, required(p, 0, "dcn"), optional_at(p, 1), false);
  const at::Tensor x1 = branch_op.call(x, required(p, 2, "dcn"), optional_at(p, 3),
                                       required(p, 4, "dcn"), required(p, 5, "dcn"), branch_eps);
  const at::Tensor offset = linear(x1, required(p, 6, "dcn"), optional_at(p, 7), false);
  const at::Tensor logits = linear(x1, required(p, 8, "dcn"), optional_at(p, 9), false);
  at::Tensor y = core_op.call(value, offset, logits, {k, k}, {s, s}, {pad, pad}, {d, d}, group,
                              group_channels, offset_scale, geometry[6] != 0);
  const OptionalTensor centre_weight = optional_at(p, 12);
  if (centre_weight.has_value()) {
    // One sigmoid gate per group blends the core's output with the projected input.
    const at::Tensor scale =
        at::sigmoid(at::linear(x1, *centre_weight, optional_at(p, 13))).unsqueeze(-1);
    const std::vector<int64_t> groups = {group, group_channels};
    y = at::add(at::mul(y.unflatten(-1, groups), at::rsub(scale, 1)),
                at::mul(value.unflatten(-1, groups), scale))
            .flatten(-2);
  }
  return linear(y, required(p, 10, "dcn"), optional_at(p, 11), false);
}

at::Tensor mlp(const at::Tensor& x, const TensorList& p) {
  const at::Tensor hidden = linear(x, required(p, 0, "mlp"), optional_at(p, 1), true);
  return linear(hidden, required(p, 2, "mlp"), optional_at(p, 3), false);
}

at::Tensor block_cpu_inference(const at::Tensor& x, const TensorList& norms,
                               c10::ArrayRef<double> norm_eps, const OptionalTensor& gamma1,
                               const OptionalTensor& gamma2, const TensorList& dcn,
                               double branch_eps, c10::ArrayRef<int64_t> geometry,
                               double offset_scale, const TensorList& mlp_params) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "block_cpu_inference: x must be a 4-D (N, H, W, C) float32 CPU tensor, got ",
              x.dim(), "-D ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(norms.size() == 8, "block_cpu_inference: norms must have 8 entries, got ",
              norms.size());
  TORCH_CHECK(norm_eps.size() == 4, "block_cpu_inference: norm_eps must have 4 entries, got ",
              norm_eps.size());
  TORCH_CHECK(dcn.size() == 14, "block_cpu_inference: dcn must have 14 entries, got ",
              dcn.size());
  TORCH_CHECK(geometry.size() == 7, "block_cpu_inference: geometry must have 7 entries, got ",
              geometry.size());
  TORCH_CHECK(mlp_params.size() == 4, "block_cpu_inference: mlp must have 4 entries, got ",
              mlp_params.size());
  const at::Tensor input = x.contiguous();
  const int64_t C = input.size(3);
  const RowNorm before_mixer = row_norm(norms, norm_eps, 0, C);
  const RowNorm after_mixer = row_norm(norms, norm_eps, 2, C);
  const RowNorm before_mlp = row_norm(norms, norm_eps, 4, C);
  const RowNorm after_mlp = row_norm(norms, norm_eps, 6, C);
  const float* scale1 = scale_data(gamma1, C, "gamma1");
  const float* scale2 = scale_data(gamma2, C, "gamma2");

  const at::Tensor mixer_input =
      before_mixer.weight != nullptr
          ? residual_step(at::Tensor(), input, {}, nullptr, before_mixer).second
          : input;
  const at::Tensor mixed = dcnv3_module(mixer_input, dcn, branch_eps, geometry, offset_scale);
  const auto [x1, mlp_input] = residual_step(input, mixed, after_mixer, scale1, before_mlp);
  const at::Tensor out = mlp(mlp_input.defined() ? mlp_input : x1, mlp_params);
  return residual_step(x1, out, after_mlp, scale2, {}).first;
}

}  // namespace

TORCH_LIBRARY_IMPL(internimage, CPU, m) {
  m.impl("_block_cpu_inference", &block_cpu_inference);
}

}  // namespace internimage
