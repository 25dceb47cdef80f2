// Argument checks shared by every backend (csrc/checks.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include "dcnv3_math.h"

namespace internimage {

// Checks ranks, sizes, dtypes and devices of one dcnv3 call and returns its geometry.
// Every failure is a TORCH_CHECK that names the argument, the expected and the actual value
// (`mask_name`: what the caller's schema calls the mask).
Dcnv3Geometry check_dcnv3_args(const at::Tensor& input, const at::Tensor& offset,
                               const at::Tensor& mask, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t group, int64_t group_channels,
                               double offset_scale, bool remove_center,
                               const char* mask_name = "mask");

// The same for dcnv4, whose offset_mask (N, H_out, W_out, C) needs C >= 3 * group * points.
Dcnv3Geometry check_dcnv4_args(const at::Tensor& input, const at::Tensor& offset_mask,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t group,
                               int64_t group_channels, double offset_scale, bool remove_center);

// Checks that grad_output has the forward output's shape, dtype and device.
void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input,
                       const Dcnv3Geometry& geometry, const char* op = "dcnv3");

}  // namespace internimage
