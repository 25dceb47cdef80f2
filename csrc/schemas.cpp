// Every schema of the `internimage` operator library, in one place.
//
// Kernels register per backend (csrc/cpu/*.cpp, csrc/cuda/*.cu), the autocast policy in
// csrc/autocast.cpp, fake (meta) and autograd implementations in internimage/ops.py.
// Ops whose names start with an underscore are internal: called by the library itself
// (backward passes, the fused float32 CPU inference kernels), not part of its API.
#include <torch/library.h>

#include <vector>

TORCH_LIBRARY(internimage, m) {
  // needs_fixed_stride_order: under torch.compile the kernels get the strides eager mode gives
  // them (contiguous), not a layout Inductor picked for a producer (which they would copy).
  const std::vector<at::Tag> fixed_strides = {at::Tag::needs_fixed_stride_order};
  // DCNv3 core (internimage/ops.py documents layouts and semantics).
  m.def(
      "dcnv3(Tensor input, Tensor offset, Tensor mask, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int group, int group_channels, float offset_scale, "
      "bool remove_center) -> Tensor",
      fixed_strides);
  m.def(
      "_dcnv3_backward(Tensor grad_output, Tensor input, Tensor offset, Tensor mask, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int group, "
      "int group_channels, float offset_scale, bool remove_center) -> (Tensor, Tensor, Tensor)");
  // DCNv4 core: DCNv3's sampling with one packed offset_mask per pixel, each group's 2P
  // offsets then P (raw) mask values, padded to any width >= 3 * group * P.
  m.def(
      "dcnv4(Tensor input, Tensor offset_mask, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int group, int group_channels, float offset_scale, "
      "bool remove_center=False) -> Tensor",
      fixed_strides);
  m.def(
      "_dcnv4_backward(Tensor grad_output, Tensor input, Tensor offset_mask, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int group, "
      "int group_channels, float offset_scale, bool remove_center) -> (Tensor, Tensor)");
  // The four ops above as csrc/cuda/dcn_kernel.cu computes them, run on CPU tensors under the
  // CPU emulation of the CUDA execution model (csrc/emulation), for the tests; and that file's
  // launch plan (csrc/launch_plan.h): [vec, lanes_log2, total, total_padded, blocks, use_int32].
  m.def(
      "_emulated_cuda_dcnv3(Tensor input, Tensor offset, Tensor mask, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int group, int group_channels, "
      "float offset_scale, bool remove_center) -> Tensor");
  m.def(
      "_emulated_cuda_dcnv3_backward(Tensor grad_output, Tensor input, Tensor offset, "
      "Tensor mask, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "int group, int group_channels, float offset_scale, bool remove_center) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "_emulated_cuda_dcnv4(Tensor input, Tensor offset_mask, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int group, int group_channels, "
      "float offset_scale, bool remove_center=False) -> Tensor");
  m.def(
      "_emulated_cuda_dcnv4_backward(Tensor grad_output, Tensor input, Tensor offset_mask, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int group, "
      "int group_channels, float offset_scale, bool remove_center) -> (Tensor, Tensor)");
  m.def(
      "_cuda_launch_plan(int batch, int height_out, int width_out, int group, "
      "int group_channels, int element_bytes, int pointer_address, int largest_numel, "
      "int sm_count) -> int[]");
  // dcnv3 with `mask` replaced by its logits: the softmax over each group's points is applied
  // inside the kernel (float32, CPU; its autograd formula in ops.py recomputes the softmax).
  m.def(
      "_dcnv3_mask_logits(Tensor input, Tensor offset, Tensor mask_logits, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int group, int group_channels, "
      "float offset_scale, bool remove_center) -> Tensor");
  // The DCNv3 module's offset branch fused for float32 CPU inference (forward only):
  // GELU(LayerNorm over C(depthwise k x k conv, stride 1, padding k // 2)) of (N, H, W, C).
  m.def(
      "_dwconv_layernorm_gelu(Tensor input, Tensor conv_weight, Tensor? conv_bias, "
      "Tensor norm_weight, Tensor norm_bias, float eps) -> Tensor");
}
