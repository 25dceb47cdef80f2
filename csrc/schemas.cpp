// Every schema of the `internimage` operator library, in one place.
//
// Kernels register per backend (csrc/cpu/*.cpp, csrc/cuda/*.cu), the autocast policy in
// csrc/autocast.cpp, fake (meta) and autograd implementations in internimage/ops.py.
// Ops whose names start with an underscore are internal: called by the library itself
// (backward passes, the fused float32 CPU inference kernels), not part of its API.
#include <torch/library.h>

TORCH_LIBRARY(internimage, m) {
  // DCNv3 core (internimage/ops.py documents layouts and semantics).
  m.def(
      "dcnv3(Tensor input, Tensor offset, Tensor mask, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int group, int group_channels, float offset_scale, "
      "bool remove_center) -> Tensor");
  m.def(
      "_dcnv3_backward(Tensor grad_output, Tensor input, Tensor offset, Tensor mask, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int group, "
      "int group_channels, float offset_scale, bool remove_center) -> (Tensor, Tensor, Tensor)");
  // DCNv4 core: DCNv3's sampling with one packed offset_mask per pixel, each group's 2P
  // offsets then P (raw) mask values, padded to any width >= 3 * group * P.
  m.def(
      "dcnv4(Tensor input, Tensor offset_mask, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int group, int group_channels, float offset_scale, "
      "bool remove_center=False) -> Tensor");
  m.def(
      "_dcnv4_backward(Tensor grad_output, Tensor input, Tensor offset_mask, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int group, "
      "int group_channels, float offset_scale, bool remove_center) -> (Tensor, Tensor)");
  // dcnv3 with `mask` replaced by its logits: the softmax over each group's points is applied
  // inside the kernel (float32 CPU inference, forward only).
  m.def(
      "_dcnv3_mask_logits(Tensor input, Tensor offset, Tensor mask_logits, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int group, int group_channels, "
      "float offset_scale, bool remove_center) -> Tensor");
  // The DCNv3 module's offset branch fused for float32 CPU inference (forward only):
  // GELU(LayerNorm over C(depthwise k x k conv, stride 1, padding k // 2)) of (N, H, W, C).
  m.def(
      "_dwconv_layernorm_gelu(Tensor input, Tensor conv_weight, Tensor? conv_bias, "
      "Tensor norm_weight, Tensor norm_bias, float eps) -> Tensor");
  // One InternImage block for float32 CPU inference (forward only; csrc/cpu/block_inference.cpp).
  // norms: LayerNorm weight/bias pairs applied before and after the mixer, then before and
  // after the MLP (None where the block has none), with norm_eps one per pair.
  // gamma1/gamma2: layer scales or None. dcn: the DCNv3 module's weight/bias pairs: input
  // projection, depthwise conv, its LayerNorm (eps branch_eps), offset, mask, output
  // projection, centre-feature-scale gate (None, None without one). geometry: kernel_size,
  // stride, pad, dilation, group, group_channels, remove_center. mlp: fc1 (GELU) and fc2.
  m.def(
      "_block_cpu_inference(Tensor x, Tensor?[] norms, float[] norm_eps, Tensor? gamma1, "
      "Tensor? gamma2, Tensor?[] dcn, float branch_eps, int[] geometry, float offset_scale, "
      "Tensor?[] mlp) -> Tensor");
}
