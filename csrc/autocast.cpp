// The operators' one autocast policy, registered with the dispatcher so that eager code,
// torch.compile and torch.export all see it: inside an autocast region every floating-point
// tensor argument except float64 is cast to the autocast dtype (float32 and float16 under
// bfloat16 autocast alike), and the kernels accumulate in float32. float64 is left alone.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace internimage {
namespace {

template <c10::DispatchKey AutocastKey, c10::DeviceType Device>
at::Tensor dcnv3_autocast(const at::Tensor& input, const at::Tensor& offset,
                          const at::Tensor& mask, at::IntArrayRef kernel_size,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t group, int64_t group_channels,
                          double offset_scale, bool remove_center) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(AutocastKey);
  const auto dtype = at::autocast::get_autocast_dtype(Device);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("internimage::dcnv3", "")
                       .typed<decltype(dcnv3_autocast<AutocastKey, Device>)>();
  return op.call(at::autocast::cached_cast(dtype, input, Device),
                 at::autocast::cached_cast(dtype, offset, Device),
                 at::autocast::cached_cast(dtype, mask, Device), kernel_size, stride, padding,
                 dilation, group, group_channels, offset_scale, remove_center);
}

template <c10::DispatchKey AutocastKey, c10::DeviceType Device>
at::Tensor dcnv4_autocast(const at::Tensor& input, const at::Tensor& offset_mask,
                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t group,
                          int64_t group_channels, double offset_scale, bool remove_center) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(AutocastKey);
  const auto dtype = at::autocast::get_autocast_dtype(Device);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("internimage::dcnv4", "")
                       .typed<decltype(dcnv4_autocast<AutocastKey, Device>)>();
  return op.call(at::autocast::cached_cast(dtype, input, Device),
                 at::autocast::cached_cast(dtype, offset_mask, Device), kernel_size, stride,
                 padding, dilation, group, group_channels, offset_scale, remove_center);
}

}  // namespace

TORCH_LIBRARY_IMPL(internimage, AutocastCPU, m) {
  m.impl("dcnv3", &dcnv3_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
  m.impl("dcnv4", &dcnv4_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(internimage, AutocastCUDA, m) {
  m.impl("dcnv3", &dcnv3_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
  m.impl("dcnv4", &dcnv4_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}

}  // namespace internimage
