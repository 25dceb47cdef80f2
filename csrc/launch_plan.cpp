// internimage::_cuda_launch_plan: csrc/launch_plan.h's plan for one call, so that the CPU tests
// can check the CUDA kernels' launch configuration at every model's shapes without a GPU.
#include "launch_plan.h"

#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace internimage {
namespace {

// [vec, lanes_log2, total, total_padded, blocks, use_int32] for a call whose vector pointers
// sit at `pointer_address` (its value modulo 16 is what matters).
std::vector<int64_t> cuda_launch_plan(int64_t batch, int64_t height_out, int64_t width_out,
                                      int64_t group, int64_t group_channels,
                                      int64_t element_bytes, int64_t pointer_address,
                                      int64_t largest_numel, int64_t sm_count) {
  TORCH_CHECK(element_bytes == 2 || element_bytes == 4 || element_bytes == 8,
              "_cuda_launch_plan: element_bytes must be 2, 4 or 8, got ", element_bytes);
  Dcnv3Geometry g{};
  g.batch = batch;
  g.height_out = height_out;
  g.width_out = width_out;
  g.group = static_cast<int>(group);
  g.group_channels = static_cast<int>(group_channels);
  const auto* p = reinterpret_cast<const void*>(static_cast<std::uintptr_t>(pointer_address));
  const LaunchPlan plan = plan_launch(g, static_cast<int>(element_bytes), {p}, largest_numel,
                                      static_cast<int>(sm_count));
  return {plan.vec, plan.lanes_log2, plan.total, plan.total_padded, plan.blocks, plan.use_int32};
}

}  // namespace
}  // namespace internimage

TORCH_LIBRARY_IMPL(internimage, CompositeExplicitAutograd, m) {
  m.impl("_cuda_launch_plan", &internimage::cuda_launch_plan);
}
