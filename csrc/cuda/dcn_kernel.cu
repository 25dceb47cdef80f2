// CUDA kernels of the DCNv3 and DCNv4 operators: forward and backward, float32 / float64 /
// float16 / bfloat16 (reduced types accumulate in float32), with the CPU kernels' semantics.
// The two ops share every kernel: they differ only in where a sample's offsets and mask live
// (OffsetMaskLayout in dcnv3_math.h), which is also where the per-sample math comes from.
//
// Thread mapping: a "slot" is one (output pixel, group). Its group_channels are split into
// vectors of VEC channels (16 bytes when group_channels and pointer alignment allow, else one
// channel), and `lanes` consecutive threads share the slot: lane l owns vectors l, l + lanes, ...
// lanes is a power of two <= 32, so a slot never straddles a warp, and consecutive threads touch
// consecutive pieces of a corner's channel run, so gathers and stores coalesce.
//
// Backward: grad_input is scattered with atomicAdd into an accumulation buffer (float32 for the
// reduced types; float4 atomics on sm_90+). The four corner dot products behind each point's
// offset and mask gradients are summed over the slot's lanes with xor shuffles, in a fixed
// order, so those two gradients are deterministic; grad_input is not (atomic ordering).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <tuple>

#include "../checks.h"
#include "../launch_plan.h"
// Last: under the CPU emulation (csrc/emulation) it defines the CUDA language and __CUDA_ARCH__.
#include "cuda_compat.h"

namespace internimage {
namespace {

// Global memory is read and written through ld_global / st_global (plain accesses on a device,
// checked ones under the emulation), kernels are launched through launch_kernel.
using namespace cuda_compat;

// Caps the forward at 64 registers (four 256-thread blocks per SM) without spilling its hot
// instances; the backward needs up to 80 and spills under that cap, so it is left alone.
constexpr int kForwardMinBlocksPerSm = 4;

// VEC consecutive channels, moved as one VEC * sizeof(T)-byte access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Channels [c0, c0 + VEC) of one bilinear corner, converted to acc_t. A corner outside the image
// reads as zero rather than being skipped, exactly as on the CPU, so inf/NaN masks propagate alike.
template <typename acc_t, int VEC, typename scalar_t, typename index_t>
__device__ __forceinline__ void load_corner(const scalar_t* __restrict__ group_input,
                                            int64_t pixel, index_t channels, index_t c0,
                                            acc_t (&out)[VEC]) {
  if (pixel < 0) {
INTERNIMAGE_UNROLL
    for (int c = 0; c < VEC; ++c) out[c] = acc_t(0);
    return;
  }
  const Pack<scalar_t, VEC> p = ld_global(reinterpret_cast<const Pack<scalar_t, VEC>*>(
      group_input + static_cast<index_t>(pixel) * channels + c0));
INTERNIMAGE_UNROLL
  for (int c = 0; c < VEC; ++c) out[c] = static_cast<acc_t>(p.v[c]);
}

template <int VEC>
__device__ __forceinline__ void atomic_add_channels(float* dst, const float (&v)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kFloat4 = VEC % 4 == 0;  // 16-byte aligned: the buffer is ours, c0 % VEC == 0
#else
  constexpr bool kFloat4 = false;
#endif
  if constexpr (kFloat4) {
INTERNIMAGE_UNROLL
    for (int c = 0; c < VEC; c += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + c),
                make_float4(v[c], v[c + 1], v[c + 2], v[c + 3]));
    }
  } else {
INTERNIMAGE_UNROLL
    for (int c = 0; c < VEC; ++c) atomicAdd(dst + c, v[c]);
  }
}

template <int VEC>
__device__ __forceinline__ void atomic_add_channels(double* dst, const double (&v)[VEC]) {
INTERNIMAGE_UNROLL
  for (int c = 0; c < VEC; ++c) atomicAdd(dst + c, v[c]);
}

// Where a slot sits: flat output pixel, batch index, output row and column, group.
template <typename index_t>
struct SlotPosition {
  index_t pixel, n, h_out, w_out;
  int group;
};

template <typename index_t>
__device__ __forceinline__ SlotPosition<index_t> slot_position(const Dcnv3Geometry& g,
                                                               index_t slot) {
  const index_t pixel = slot / g.group;
  const index_t width_out = static_cast<index_t>(g.width_out);
  const index_t pixels_out = static_cast<index_t>(g.height_out) * width_out;
  SlotPosition<index_t> s;
  s.pixel = pixel;
  s.group = static_cast<int>(slot - pixel * g.group);
  s.n = pixel / pixels_out;
  const index_t rest = pixel - s.n * pixels_out;
  s.h_out = rest / width_out;
  s.w_out = rest - s.h_out * width_out;
  return s;
}

template <typename scalar_t, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads, kForwardMinBlocksPerSm)
    dcn_forward_kernel(const Dcnv3Geometry g, const OffsetMaskLayout layout,
                       const scalar_t* __restrict__ input, const scalar_t* __restrict__ offset,
                       const scalar_t* __restrict__ mask, scalar_t* __restrict__ output,
                       const index_t total, const int lanes_log2) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lanes = 1 << lanes_log2;
  const index_t vectors = g.group_channels / VEC;
  const index_t channels = static_cast<index_t>(g.channels());
  const index_t pixels_in = static_cast<index_t>(g.height_in * g.width_in);
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t t = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += step) {
    const index_t slot = t >> lanes_log2;
    const index_t lane = t & (lanes - 1);
    const SlotPosition<index_t> pos = slot_position(g, slot);
    const scalar_t* group_input = input + pos.n * pixels_in * channels +
                                  static_cast<index_t>(pos.group) * g.group_channels;
    const scalar_t* slot_offset = offset + layout.offset_index(pos.pixel, pos.group);
    const scalar_t* slot_mask = mask + layout.mask_index(pos.pixel, pos.group);

    for (index_t v = lane; v < vectors; v += lanes) {
      const index_t c0 = v * VEC;
      acc_t acc[VEC] = {};
      int p = 0;
      for (int i = 0; i < g.kernel_w; ++i) {
        for (int j = 0; j < g.kernel_h; ++j) {
          if (is_removed_centre(g, i, j)) continue;
          const int point = p++;
          acc_t loc_x, loc_y;
          sampling_location(g, pos.h_out, pos.w_out, i, j,
                            static_cast<acc_t>(ld_global(slot_offset + 2 * point)),
                            static_cast<acc_t>(ld_global(slot_offset + 2 * point + 1)), loc_x,
                            loc_y);
          BilinearSample<acc_t> s;
          if (!bilinear_sample(loc_y, loc_x, g.height_in, g.width_in, s)) continue;
          const acc_t m = static_cast<acc_t>(ld_global(slot_mask + point));
          acc_t x0[VEC], x1[VEC], x2[VEC], x3[VEC];
          load_corner(group_input, s.pixel[0], channels, c0, x0);
          load_corner(group_input, s.pixel[1], channels, c0, x1);
          load_corner(group_input, s.pixel[2], channels, c0, x2);
          load_corner(group_input, s.pixel[3], channels, c0, x3);
          const CornerValues<acc_t> w = masked_corner_weights(s.corners, m, s.frac_y, s.frac_x);
          const acc_t w0 = w.v[0], w1 = w.v[1], w2 = w.v[2], w3 = w.v[3];
INTERNIMAGE_UNROLL
          for (int c = 0; c < VEC; ++c) {
            acc[c] += w0 * x0[c] + w1 * x1[c] + w2 * x2[c] + w3 * x3[c];
          }
        }
      }
      Pack<scalar_t, VEC> out;
INTERNIMAGE_UNROLL
      for (int c = 0; c < VEC; ++c) out.v[c] = static_cast<scalar_t>(acc[c]);
      st_global(reinterpret_cast<Pack<scalar_t, VEC>*>(output + slot * g.group_channels + c0),
                out);
    }
  }
}

// `total` threads do work; the loop runs to `total_padded` (a multiple of the warp size, as is
// the grid) so that whole warps stay in step for the shuffles.
template <typename scalar_t, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads)
    dcn_backward_kernel(const Dcnv3Geometry g, const OffsetMaskLayout layout,
                        const scalar_t* __restrict__ grad_output,
                          const scalar_t* __restrict__ input, const scalar_t* __restrict__ offset,
                          const scalar_t* __restrict__ mask,
                          at::opmath_type<scalar_t>* __restrict__ grad_input,
                          scalar_t* __restrict__ grad_offset, scalar_t* __restrict__ grad_mask,
                          const index_t total, const index_t total_padded, const int lanes_log2) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lanes = 1 << lanes_log2;
  const index_t vectors = g.group_channels / VEC;
  const index_t channels = static_cast<index_t>(g.channels());
  const index_t pixels_in = static_cast<index_t>(g.height_in * g.width_in);
  const acc_t offset_scale = static_cast<acc_t>(g.offset_scale);
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t t = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       t < total_padded; t += step) {
    const bool active = t < total;
    const index_t slot = active ? t >> lanes_log2 : 0;
    const index_t lane = t & (lanes - 1);
    const SlotPosition<index_t> pos = slot_position(g, slot);
    const index_t group_start =
        pos.n * pixels_in * channels + static_cast<index_t>(pos.group) * g.group_channels;
    const scalar_t* group_input = input + group_start;
    acc_t* group_grad_input = grad_input + group_start;
    const scalar_t* slot_grad_output = grad_output + slot * g.group_channels;
    const index_t slot_offset = layout.offset_index(pos.pixel, pos.group);
    const index_t slot_mask = layout.mask_index(pos.pixel, pos.group);

    // The lane's first channel vector of grad_output stays in registers for every point.
    acc_t go_first[VEC] = {};
    if (active && lane < vectors) {
      const auto p =
          ld_global(reinterpret_cast<const Pack<scalar_t, VEC>*>(slot_grad_output + lane * VEC));
INTERNIMAGE_UNROLL
      for (int c = 0; c < VEC; ++c) go_first[c] = static_cast<acc_t>(p.v[c]);
    }

    int p = 0;
    for (int i = 0; i < g.kernel_w; ++i) {
      for (int j = 0; j < g.kernel_h; ++j) {
        if (is_removed_centre(g, i, j)) continue;
        const int point_in_slot = p++;
        const index_t point_offset = slot_offset + 2 * point_in_slot;
        const index_t point_mask = slot_mask + point_in_slot;
        acc_t corner_dot[4] = {};
        BilinearSample<acc_t> s{};  // no corners when inactive
        bool inside = false;
        acc_t m = 0;
        if (active) {
          acc_t loc_x, loc_y;
          sampling_location(g, pos.h_out, pos.w_out, i, j,
                            static_cast<acc_t>(ld_global(offset + point_offset)),
                            static_cast<acc_t>(ld_global(offset + point_offset + 1)), loc_x,
                            loc_y);
          inside = bilinear_sample(loc_y, loc_x, g.height_in, g.width_in, s);
          m = static_cast<acc_t>(ld_global(mask + point_mask));
        }
        const CornerValues<acc_t> weight = masked_corner_weights(s.corners, m, s.frac_y, s.frac_x);
        if (inside) {
          for (index_t v = lane; v < vectors; v += lanes) {
            const index_t c0 = v * VEC;
            acc_t go[VEC];
            if (v == lane) {
INTERNIMAGE_UNROLL
              for (int c = 0; c < VEC; ++c) go[c] = go_first[c];
            } else {
              const auto pk =
                  ld_global(reinterpret_cast<const Pack<scalar_t, VEC>*>(slot_grad_output + c0));
INTERNIMAGE_UNROLL
              for (int c = 0; c < VEC; ++c) go[c] = static_cast<acc_t>(pk.v[c]);
            }
INTERNIMAGE_UNROLL
            for (int k = 0; k < 4; ++k) {
              if (s.pixel[k] < 0) continue;
              acc_t x[VEC];
              load_corner(group_input, s.pixel[k], channels, c0, x);
              const acc_t w = weight.v[k];
              acc_t dot = 0, add[VEC];
INTERNIMAGE_UNROLL
              for (int c = 0; c < VEC; ++c) {
                dot += go[c] * x[c];
                add[c] = w * go[c];
              }
              corner_dot[k] += dot;
              atomic_add_channels<VEC>(
                  group_grad_input + static_cast<index_t>(s.pixel[k]) * channels + c0, add);
            }
          }
        }
        // Every thread of the warp takes part; xor partners below `lanes` share the slot.
        for (int o = lanes >> 1; o > 0; o >>= 1) {
INTERNIMAGE_UNROLL
          for (int k = 0; k < 4; ++k) {
            corner_dot[k] += __shfl_xor_sync(0xffffffffu, corner_dot[k], o);
          }
        }
        // The lanes take turns writing, which spreads the scattered stores.
        if (active && lane == (point_in_slot & (lanes - 1))) {
          acc_t d_mask = 0, d_x = 0, d_y = 0;
          if (inside) {
            const SampleGradients<acc_t> r =
                sample_gradients(s.frac_y, s.frac_x, corner_dot, m, offset_scale);
            d_mask = r.mask;
            d_x = r.offset_x;
            d_y = r.offset_y;
          }
          st_global(grad_mask + point_mask, static_cast<scalar_t>(d_mask));
          st_global(grad_offset + point_offset, static_cast<scalar_t>(d_x));
          st_global(grad_offset + point_offset + 1, static_cast<scalar_t>(d_y));
        }
      }
    }
  }
}

// The launch plan (csrc/launch_plan.h) for this device's SM count.
template <typename scalar_t>
LaunchPlan plan_for(const Dcnv3Geometry& g, std::initializer_list<const void*> vector_ptrs,
                    int64_t largest_numel, int device) {
  LaunchPlan plan =
      plan_launch(g, sizeof(scalar_t), vector_ptrs, largest_numel, sm_count(device));
  apply_test_overrides(plan);
  return plan;
}

template <typename scalar_t, int VEC, typename index_t>
void launch_forward(const Dcnv3Geometry& g, const OffsetMaskLayout& layout,
                    const LaunchPlan& plan, const scalar_t* input, const scalar_t* offset,
                    const scalar_t* mask, scalar_t* output) {
  launch_kernel("dcn_forward_kernel", dcn_forward_kernel<scalar_t, VEC, index_t>, plan.blocks,
                kThreads, g, layout, input, offset, mask, output,
                static_cast<index_t>(plan.total), plan.lanes_log2);
}

// Picks the kernel instance for the plan's vector width and index type.
template <typename scalar_t>
void forward(const Dcnv3Geometry& g, const OffsetMaskLayout& layout, const LaunchPlan& plan,
             const scalar_t* input, const scalar_t* offset, const scalar_t* mask,
             scalar_t* output) {
  constexpr int wide = kVectorBytes / sizeof(scalar_t);
  if (plan.vec == wide) {
    if (plan.use_int32) {
      launch_forward<scalar_t, wide, int32_t>(g, layout, plan, input, offset, mask, output);
    } else {
      launch_forward<scalar_t, wide, int64_t>(g, layout, plan, input, offset, mask, output);
    }
  } else if (plan.use_int32) {
    launch_forward<scalar_t, 1, int32_t>(g, layout, plan, input, offset, mask, output);
  } else {
    launch_forward<scalar_t, 1, int64_t>(g, layout, plan, input, offset, mask, output);
  }
}

// Pointers of one backward call.
template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* grad_output;
  const scalar_t* input;
  const scalar_t* offset;
  const scalar_t* mask;
  at::opmath_type<scalar_t>* grad_input;
  scalar_t* grad_offset;
  scalar_t* grad_mask;
};

template <typename scalar_t, int VEC, typename index_t>
void launch_backward(const Dcnv3Geometry& g, const OffsetMaskLayout& layout,
                     const LaunchPlan& plan, const BackwardArgs<scalar_t>& a) {
  launch_kernel("dcn_backward_kernel", dcn_backward_kernel<scalar_t, VEC, index_t>, plan.blocks,
                kThreads, g, layout, a.grad_output, a.input, a.offset, a.mask, a.grad_input,
                a.grad_offset, a.grad_mask, static_cast<index_t>(plan.total),
                static_cast<index_t>(plan.total_padded), plan.lanes_log2);
}

template <typename scalar_t>
void backward(const Dcnv3Geometry& g, const OffsetMaskLayout& layout, const LaunchPlan& plan,
              const BackwardArgs<scalar_t>& a) {
  constexpr int wide = kVectorBytes / sizeof(scalar_t);
  if (plan.vec == wide) {
    if (plan.use_int32) {
      launch_backward<scalar_t, wide, int32_t>(g, layout, plan, a);
    } else {
      launch_backward<scalar_t, wide, int64_t>(g, layout, plan, a);
    }
  } else if (plan.use_int32) {
    launch_backward<scalar_t, 1, int32_t>(g, layout, plan, a);
  } else {
    launch_backward<scalar_t, 1, int64_t>(g, layout, plan, a);
  }
}

// The forward of either op: the mask starts `mask_offset` elements into `mask` (the mask
// tensor itself for DCNv3, element 2P of the packed tensor for DCNv4).
at::Tensor forward_cuda(const Dcnv3Geometry& g, const OffsetMaskLayout& layout,
                        const at::Tensor& input_, const at::Tensor& offset_,
                        const at::Tensor& mask_, int64_t mask_offset) {
  const DeviceGuard device_guard(input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.is_same(offset_) ? offset : mask_.contiguous();
  at::Tensor output =
      at::empty({g.batch, g.height_out, g.width_out, g.channels()}, input.options());
  if (output.numel() == 0) return output;
  const DeviceBuffers buffers(
      {{"input", input}, {"offset", offset}, {"mask", mask}, {"output", output}});
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "dcn_forward_cuda", [&] {
        const scalar_t* in = input.const_data_ptr<scalar_t>();
        const scalar_t* off = offset.const_data_ptr<scalar_t>();
        const scalar_t* msk = mask.const_data_ptr<scalar_t>() + mask_offset;
        scalar_t* out = output.mutable_data_ptr<scalar_t>();
        const LaunchPlan plan = plan_for<scalar_t>(
            g, {in, out},
            std::max({input.numel(), offset.numel(), mask.numel(), output.numel()}),
            input.get_device());
        forward<scalar_t>(g, layout, plan, in, off, msk, out);
      });
  return output;
}

// The backward of either op; grad_offset and grad_mask are allocated by the caller (the same
// tensor for DCNv4) and fully written here, except DCNv4's padding channels.
at::Tensor backward_cuda(const Dcnv3Geometry& g, const OffsetMaskLayout& layout,
                         const at::Tensor& grad_output_, const at::Tensor& input_,
                         const at::Tensor& offset, const at::Tensor& mask,
                         int64_t mask_offset, at::Tensor& grad_offset, at::Tensor& grad_mask,
                         const char* op) {
  // grad_input is accumulated with atomics in no fixed order.
  at::globalContext().alertNotDeterministic(op);
  const DeviceGuard device_guard(input_.device());
  const at::Tensor grad_output = grad_output_.contiguous();
  const at::Tensor input = input_.contiguous();
  const auto dtype = input.scalar_type();
  const auto acc_dtype = at::toOpMathType(dtype);
  at::Tensor grad_input = at::zeros(input.sizes(), input.options().dtype(acc_dtype));
  if (grad_output.numel() > 0) {
    const DeviceBuffers buffers({{"grad_output", grad_output},
                                 {"input", input},
                                 {"offset", offset},
                                 {"mask", mask},
                                 {"grad_input", grad_input},
                                 {"grad_offset", grad_offset},
                                 {"grad_mask", grad_mask}});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "dcn_backward_cuda", [&] {
      const BackwardArgs<scalar_t> a{grad_output.const_data_ptr<scalar_t>(),
                                     input.const_data_ptr<scalar_t>(),
                                     offset.const_data_ptr<scalar_t>(),
                                     mask.const_data_ptr<scalar_t>() + mask_offset,
                                     grad_input.mutable_data_ptr<at::opmath_type<scalar_t>>(),
                                     grad_offset.mutable_data_ptr<scalar_t>(),
                                     grad_mask.mutable_data_ptr<scalar_t>() + mask_offset};
      const LaunchPlan plan = plan_for<scalar_t>(
          g, {a.grad_output, a.input, a.grad_input},
          std::max({input.numel(), offset.numel(), mask.numel(), grad_output.numel()}),
          input.get_device());
      backward<scalar_t>(g, layout, plan, a);
    });
  }
  if (acc_dtype != dtype) grad_input = grad_input.to(dtype);
  return grad_input;
}

at::Tensor dcnv3_forward_cuda(const at::Tensor& input, const at::Tensor& offset,
                              const at::Tensor& mask, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t group, int64_t group_channels,
                              double offset_scale, bool remove_center) {
  const Dcnv3Geometry g = check_dcnv3_args(input, offset, mask, kernel_size, stride, padding,
                                           dilation, group, group_channels, offset_scale,
                                           remove_center);
  return forward_cuda(g, OffsetMaskLayout::separate(g.group, g.points), input, offset, mask,
                      0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset_,
    const at::Tensor& mask_, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t group, int64_t group_channels,
    double offset_scale, bool remove_center) {
  const Dcnv3Geometry g = check_dcnv3_args(input, offset_, mask_, kernel_size, stride, padding,
                                           dilation, group, group_channels, offset_scale,
                                           remove_center);
  check_grad_output(grad_output, input, g);
  const DeviceGuard device_guard(input.device());
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  at::Tensor grad_offset = at::empty(offset.sizes(), offset.options());
  at::Tensor grad_mask = at::empty(mask.sizes(), mask.options());
  at::Tensor grad_input =
      backward_cuda(g, OffsetMaskLayout::separate(g.group, g.points), grad_output, input,
                    offset, mask, 0, grad_offset, grad_mask, "dcnv3_backward_cuda");
  return {grad_input, grad_offset, grad_mask};
}

at::Tensor dcnv4_forward_cuda(const at::Tensor& input, const at::Tensor& offset_mask,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t group,
                              int64_t group_channels, double offset_scale, bool remove_center) {
  const Dcnv3Geometry g = check_dcnv4_args(input, offset_mask, kernel_size, stride, padding,
                                           dilation, group, group_channels, offset_scale,
                                           remove_center);
  return forward_cuda(g, OffsetMaskLayout::packed(g.points, offset_mask.size(3)), input,
                      offset_mask, offset_mask, 2 * g.points);
}

std::tuple<at::Tensor, at::Tensor> dcnv4_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset_mask_,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t group, int64_t group_channels, double offset_scale,
    bool remove_center) {
  const Dcnv3Geometry g = check_dcnv4_args(input, offset_mask_, kernel_size, stride, padding,
                                           dilation, group, group_channels, offset_scale,
                                           remove_center);
  check_grad_output(grad_output, input, g, "dcnv4");
  const DeviceGuard device_guard(input.device());
  const at::Tensor offset_mask = offset_mask_.contiguous();
  at::Tensor grad = at::empty(offset_mask.sizes(), offset_mask.options());
  const int64_t used = 3 * static_cast<int64_t>(g.group) * g.points;
  if (offset_mask.size(3) > used) grad.narrow(3, used, offset_mask.size(3) - used).zero_();
  at::Tensor grad_input =
      backward_cuda(g, OffsetMaskLayout::packed(g.points, offset_mask.size(3)), grad_output,
                    input, offset_mask, offset_mask, 2 * g.points, grad, grad,
                    "dcnv4_backward_cuda");
  return {grad_input, grad};
}

}  // namespace

#if !defined(INTERNIMAGE_EMULATE_CUDA)  // the emulated build registers its own ops
TORCH_LIBRARY_IMPL(internimage, CUDA, m) {
  m.impl("dcnv3", &dcnv3_forward_cuda);
  m.impl("_dcnv3_backward", &dcnv3_backward_cuda);
  m.impl("dcnv4", &dcnv4_forward_cuda);
  m.impl("_dcnv4_backward", &dcnv4_backward_cuda);
}
#endif

}  // namespace internimage
