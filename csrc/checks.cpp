// Argument checks shared by every backend: each failure is a TORCH_CHECK that names the op,
// the argument, the expected and the actual value.
#include "checks.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace internimage {
namespace {

void check_pair(const char* op, at::IntArrayRef values, const char* name, int64_t minimum) {
  TORCH_CHECK(values.size() == 2, op, ": ", name, " must have 2 values (h, w), got ",
              values.size());
  TORCH_CHECK(values[0] >= minimum && values[1] >= minimum, op, ": ", name, " must be >= ",
              minimum, ", got (", values[0], ", ", values[1], ")");
}

void check_tensor(const char* op, const at::Tensor& t, const char* name,
                  const at::Tensor& input) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, H, W, C), got ", t.dim(),
              "-D with shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name,
              " must have the input's dtype ", input.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " must be on the input's device ",
              input.device(), ", got ", t.device());
}

void check_shape(const char* op, const at::Tensor& t, const char* name, int64_t n, int64_t h,
                 int64_t w, int64_t c) {
  TORCH_CHECK(t.size(0) == n && t.size(1) == h && t.size(2) == w && t.size(3) == c, op, ": ",
              name, " must have shape (", n, ", ", h, ", ", w, ", ", c, "), got ", t.sizes());
}

// Checks what both ops share (input, geometry) and returns the geometry.
Dcnv3Geometry check_geometry(const char* op, const at::Tensor& input,
                             at::IntArrayRef kernel_size, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t group,
                             int64_t group_channels, double offset_scale, bool remove_center) {
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D (N, H, W, C), got ", input.dim(),
              "-D with shape ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op,
              ": input must be a floating-point tensor, got ", input.scalar_type());
  check_pair(op, kernel_size, "kernel_size", 1);
  check_pair(op, stride, "stride", 1);
  check_pair(op, padding, "padding", 0);
  check_pair(op, dilation, "dilation", 1);
  TORCH_CHECK(group >= 1, op, ": group must be >= 1, got ", group);
  TORCH_CHECK(group_channels >= 1, op, ": group_channels must be >= 1, got ", group_channels);
  TORCH_CHECK(input.size(3) == group * group_channels, op,
              ": input channels must equal group * group_channels = ", group, " * ",
              group_channels, " = ", group * group_channels, ", got ", input.size(3));
  TORCH_CHECK(std::isfinite(offset_scale), op, ": offset_scale must be finite, got ",
              offset_scale);

  Dcnv3Geometry g;
  g.batch = input.size(0);
  g.height_in = input.size(1);
  g.width_in = input.size(2);
  g.kernel_h = static_cast<int>(kernel_size[0]);
  g.kernel_w = static_cast<int>(kernel_size[1]);
  g.stride_h = static_cast<int>(stride[0]);
  g.stride_w = static_cast<int>(stride[1]);
  g.pad_h = static_cast<int>(padding[0]);
  g.pad_w = static_cast<int>(padding[1]);
  g.dilation_h = static_cast<int>(dilation[0]);
  g.dilation_w = static_cast<int>(dilation[1]);
  g.group = static_cast<int>(group);
  g.group_channels = static_cast<int>(group_channels);
  g.remove_center = remove_center;
  g.offset_scale = offset_scale;
  TORCH_CHECK(g.height_in >= 1 && g.width_in >= 1, op,
              ": input height and width must be >= 1, got (", g.height_in, ", ", g.width_in,
              ")");
  // Sampling coordinates are floored through int32 (see floor_to_int).
  constexpr int64_t max_side = (int64_t{1} << 30);
  TORCH_CHECK(g.height_in <= max_side && g.width_in <= max_side, op,
              ": input height and width must be <= 2^30, got (", g.height_in, ", ", g.width_in,
              ")");
  TORCH_CHECK(!remove_center || kernel_size[0] * kernel_size[1] > 1, op,
              ": remove_center needs a kernel with more than one tap, got kernel_size (",
              kernel_size[0], ", ", kernel_size[1], ")");
  g.points = g.kernel_h * g.kernel_w - (remove_center ? 1 : 0);
  g.height_out = dcnv3_output_size(g.height_in, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h);
  g.width_out = dcnv3_output_size(g.width_in, g.kernel_w, g.stride_w, g.pad_w, g.dilation_w);
  TORCH_CHECK(g.height_out >= 1 && g.width_out >= 1, op, ": output size must be >= 1, got (",
              g.height_out, ", ", g.width_out, ") from input (", g.height_in, ", ", g.width_in,
              "), kernel_size ", kernel_size, ", stride ", stride, ", padding ", padding,
              ", dilation ", dilation);
  return g;
}

}  // namespace

Dcnv3Geometry check_dcnv3_args(const at::Tensor& input, const at::Tensor& offset,
                               const at::Tensor& mask, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t group, int64_t group_channels,
                               double offset_scale, bool remove_center,
                               const char* mask_name) {
  constexpr const char* op = "dcnv3";
  const Dcnv3Geometry g = check_geometry(op, input, kernel_size, stride, padding, dilation,
                                         group, group_channels, offset_scale, remove_center);
  check_tensor(op, offset, "offset", input);
  check_tensor(op, mask, mask_name, input);
  check_shape(op, offset, "offset", g.batch, g.height_out, g.width_out,
              static_cast<int64_t>(g.group) * g.points * 2);
  check_shape(op, mask, mask_name, g.batch, g.height_out, g.width_out,
              static_cast<int64_t>(g.group) * g.points);
  return g;
}

Dcnv3Geometry check_dcnv4_args(const at::Tensor& input, const at::Tensor& offset_mask,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t group,
                               int64_t group_channels, double offset_scale,
                               bool remove_center) {
  constexpr const char* op = "dcnv4";
  const Dcnv3Geometry g = check_geometry(op, input, kernel_size, stride, padding, dilation,
                                         group, group_channels, offset_scale, remove_center);
  check_tensor(op, offset_mask, "offset_mask", input);
  const int64_t used = 3 * static_cast<int64_t>(g.group) * g.points;
  TORCH_CHECK(offset_mask.size(0) == g.batch && offset_mask.size(1) == g.height_out &&
                  offset_mask.size(2) == g.width_out && offset_mask.size(3) >= used,
              op, ": offset_mask must have shape (", g.batch, ", ", g.height_out, ", ",
              g.width_out, ", C) with C >= 3 * group * points = 3 * ", g.group, " * ",
              g.points, " = ", used, ", got ", offset_mask.sizes());
  return g;
}

void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input,
                       const Dcnv3Geometry& g, const char* op) {
  check_tensor(op, grad_output, "grad_output", input);
  check_shape(op, grad_output, "grad_output", g.batch, g.height_out, g.width_out, g.channels());
}

}  // namespace internimage
