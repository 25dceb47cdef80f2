// CPU kernels of the DCNv3 operator: forward and backward, float32 / float64 / bfloat16 /
// float16 (reduced types accumulate in float32).
//
// Parallelism: the forward splits output pixels across threads. The backward gives each
// thread whole (batch, group) slices, so every element of grad_input is accumulated by one
// thread in a fixed order: gradients are bit-identical run to run and for any thread count.
// The channel loops of a group are written for the compiler to vectorise.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../dcnv3.h"

namespace internimage {
namespace {

// Corner pointers and mask-folded weights of one sample for one group; corners outside
// the image point at a row of zeros so the channel loops need no branch.
template <typename scalar_t, typename acc_t>
struct GroupCorners {
  const scalar_t* value[4];
  acc_t weight[4];
};

template <typename scalar_t, typename acc_t>
inline void set_corners(GroupCorners<scalar_t, acc_t>& corners, const BilinearSample<acc_t>& s,
                        acc_t mask, const scalar_t* group_input, int64_t channels,
                        const scalar_t* zeros) {
  for (int k = 0; k < 4; ++k) {
    corners.value[k] = s.pixel[k] >= 0 ? group_input + s.pixel[k] * channels : zeros;
    corners.weight[k] = mask * s.weight[k];
  }
}

// acc[c] += sum_k weight[k] * value[k][c]
template <typename scalar_t, typename acc_t>
inline void accumulate_sample(acc_t* __restrict__ acc, const GroupCorners<scalar_t, acc_t>& k,
                              int group_channels) {
  const scalar_t* __restrict__ v0 = k.value[0];
  const scalar_t* __restrict__ v1 = k.value[1];
  const scalar_t* __restrict__ v2 = k.value[2];
  const scalar_t* __restrict__ v3 = k.value[3];
  const acc_t w0 = k.weight[0], w1 = k.weight[1], w2 = k.weight[2], w3 = k.weight[3];
#pragma omp simd
  for (int c = 0; c < group_channels; ++c) {
    acc[c] += w0 * static_cast<acc_t>(v0[c]) + w1 * static_cast<acc_t>(v1[c]) +
              w2 * static_cast<acc_t>(v2[c]) + w3 * static_cast<acc_t>(v3[c]);
  }
}

template <typename scalar_t>
void forward_pixels(const Dcnv3Geometry& g, const scalar_t* input, const scalar_t* offset,
                    const scalar_t* mask, scalar_t* output, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = g.channels();
  const int gc = g.group_channels;
  const int64_t pixels_out = g.height_out * g.width_out;
  const int64_t pixels_in = g.height_in * g.width_in;
  std::vector<acc_t> acc(gc);
  const std::vector<scalar_t> zeros(gc, scalar_t(0));

  for (int64_t pix = begin; pix < end; ++pix) {
    const int64_t n = pix / pixels_out;
    const int64_t h_out = (pix % pixels_out) / g.width_out;
    const int64_t w_out = pix % g.width_out;
    const scalar_t* input_n = input + n * pixels_in * channels;
    const scalar_t* offset_pix = offset + pix * g.group * g.points * 2;
    const scalar_t* mask_pix = mask + pix * g.group * g.points;
    for (int grp = 0; grp < g.group; ++grp) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      int p = 0;
      for (int i = 0; i < g.kernel_w; ++i) {
        for (int j = 0; j < g.kernel_h; ++j) {
          if (is_removed_centre(g, i, j)) continue;
          const int64_t point = static_cast<int64_t>(grp) * g.points + p++;
          acc_t loc_x, loc_y;
          sampling_location(g, h_out, w_out, i, j, static_cast<acc_t>(offset_pix[2 * point]),
                            static_cast<acc_t>(offset_pix[2 * point + 1]), loc_x, loc_y);
          BilinearSample<acc_t> s;
          if (!bilinear_sample(loc_y, loc_x, g.height_in, g.width_in, s)) continue;
          GroupCorners<scalar_t, acc_t> corners;
          set_corners(corners, s, static_cast<acc_t>(mask_pix[point]),
                      input_n + static_cast<int64_t>(grp) * gc, channels, zeros.data());
          accumulate_sample(acc.data(), corners, gc);
        }
      }
      scalar_t* out = output + pix * channels + static_cast<int64_t>(grp) * gc;
      for (int c = 0; c < gc; ++c) out[c] = static_cast<scalar_t>(acc[c]);
    }
  }
}

// One (batch, group) slice of the backward. grad_input is accumulated in acc_t.
template <typename scalar_t>
void backward_slice(const Dcnv3Geometry& g, const scalar_t* grad_output, const scalar_t* input,
                    const scalar_t* offset, const scalar_t* mask,
                    at::opmath_type<scalar_t>* grad_input, scalar_t* grad_offset,
                    scalar_t* grad_mask, int64_t n, int grp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = g.channels();
  const int gc = g.group_channels;
  const int64_t pixels_in = g.height_in * g.width_in;
  const int64_t group_start = static_cast<int64_t>(grp) * gc;
  const scalar_t* input_g = input + n * pixels_in * channels + group_start;
  acc_t* grad_input_g = grad_input + n * pixels_in * channels + group_start;
  const acc_t offset_scale = static_cast<acc_t>(g.offset_scale);
  std::vector<acc_t> gout(gc);

  for (int64_t h_out = 0; h_out < g.height_out; ++h_out) {
    for (int64_t w_out = 0; w_out < g.width_out; ++w_out) {
      const int64_t pix = (n * g.height_out + h_out) * g.width_out + w_out;
      const scalar_t* grad_out_pix = grad_output + pix * channels + group_start;
      for (int c = 0; c < gc; ++c) gout[c] = static_cast<acc_t>(grad_out_pix[c]);
      const acc_t* __restrict__ go = gout.data();
      int p = 0;
      for (int i = 0; i < g.kernel_w; ++i) {
        for (int j = 0; j < g.kernel_h; ++j) {
          if (is_removed_centre(g, i, j)) continue;
          const int64_t point = (pix * g.group + grp) * g.points + p++;
          acc_t loc_x, loc_y;
          sampling_location(g, h_out, w_out, i, j, static_cast<acc_t>(offset[2 * point]),
                            static_cast<acc_t>(offset[2 * point + 1]), loc_x, loc_y);
          BilinearSample<acc_t> s;
          if (!bilinear_sample(loc_y, loc_x, g.height_in, g.width_in, s)) {
            grad_mask[point] = scalar_t(0);
            grad_offset[2 * point] = scalar_t(0);
            grad_offset[2 * point + 1] = scalar_t(0);
            continue;
          }
          const acc_t m = static_cast<acc_t>(mask[point]);
          acc_t corner_dot[4];
          for (int k = 0; k < 4; ++k) {
            acc_t dot = 0;
            if (s.pixel[k] >= 0) {
              const scalar_t* __restrict__ v = input_g + s.pixel[k] * channels;
              acc_t* __restrict__ gi = grad_input_g + s.pixel[k] * channels;
              const acc_t w = m * s.weight[k];
#pragma omp simd reduction(+ : dot)
              for (int c = 0; c < gc; ++c) {
                dot += go[c] * static_cast<acc_t>(v[c]);
                gi[c] += w * go[c];
              }
            }
            corner_dot[k] = dot;
          }
          const SampleGradients<acc_t> r = sample_gradients(s, corner_dot, m, offset_scale);
          grad_mask[point] = static_cast<scalar_t>(r.mask);
          grad_offset[2 * point] = static_cast<scalar_t>(r.offset_x);
          grad_offset[2 * point + 1] = static_cast<scalar_t>(r.offset_y);
        }
      }
    }
  }
}

at::Tensor dcnv3_forward_cpu(const at::Tensor& input_, const at::Tensor& offset_,
                             const at::Tensor& mask_, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t group, int64_t group_channels,
                             double offset_scale, bool remove_center) {
  const Dcnv3Geometry g = check_dcnv3_args(input_, offset_, mask_, kernel_size, stride, padding,
                                           dilation, group, group_channels, offset_scale,
                                           remove_center);
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  at::Tensor output =
      at::empty({g.batch, g.height_out, g.width_out, g.channels()}, input.options());
  const int64_t pixels = g.batch * g.height_out * g.width_out;
  if (pixels == 0) return output;
  // Enough work per task to amortise the fork: about 4k channel-samples.
  const int64_t grain =
      std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.channels() * g.points));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "dcnv3_forward_cpu", [&] {
        const scalar_t* in = input.const_data_ptr<scalar_t>();
        const scalar_t* off = offset.const_data_ptr<scalar_t>();
        const scalar_t* msk = mask.const_data_ptr<scalar_t>();
        scalar_t* out = output.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
          forward_pixels<scalar_t>(g, in, off, msk, out, begin, end);
        });
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& offset_,
    const at::Tensor& mask_, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t group, int64_t group_channels,
    double offset_scale, bool remove_center) {
  const Dcnv3Geometry g = check_dcnv3_args(input_, offset_, mask_, kernel_size, stride, padding,
                                           dilation, group, group_channels, offset_scale,
                                           remove_center);
  check_grad_output(grad_output_, input_, g);
  const at::Tensor grad_output = grad_output_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  const auto dtype = input.scalar_type();
  const auto acc_dtype = at::toOpMathType(dtype);
  at::Tensor grad_input = at::zeros(input.sizes(), input.options().dtype(acc_dtype));
  at::Tensor grad_offset = at::empty(offset.sizes(), offset.options());
  at::Tensor grad_mask = at::empty(mask.sizes(), mask.options());
  const int64_t slices = g.batch * g.group;
  if (slices > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "dcnv3_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gout = grad_output.const_data_ptr<scalar_t>();
      const scalar_t* in = input.const_data_ptr<scalar_t>();
      const scalar_t* off = offset.const_data_ptr<scalar_t>();
      const scalar_t* msk = mask.const_data_ptr<scalar_t>();
      acc_t* gin = grad_input.mutable_data_ptr<acc_t>();
      scalar_t* goff = grad_offset.mutable_data_ptr<scalar_t>();
      scalar_t* gmsk = grad_mask.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
        for (int64_t slice = begin; slice < end; ++slice) {
          backward_slice<scalar_t>(g, gout, in, off, msk, gin, goff, gmsk, slice / g.group,
                                   static_cast<int>(slice % g.group));
        }
      });
    });
  }
  if (acc_dtype != dtype) grad_input = grad_input.to(dtype);
  return {grad_input, grad_offset, grad_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(internimage, CPU, m) {
  m.impl("dcnv3", &dcnv3_forward_cpu);
  m.impl("dcnv3_backward", &dcnv3_backward_cpu);
}

}  // namespace internimage
