// The host entries of csrc/cuda/dcn_kernel.cu, as compiled under the CUDA emulation for one
// architecture (dcn_kernel_sm80.cpp, dcn_kernel_sm90.cpp); cuda_emulation.cpp registers them as
// the internimage::_emulated_cuda_* CPU ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace internimage {
namespace emulation {

struct DcnEntries {
  at::Tensor (*dcnv3)(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                      at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, int64_t,
                      double, bool);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*dcnv3_backward)(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, int64_t,
      double, bool);
  at::Tensor (*dcnv4)(const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                      at::IntArrayRef, at::IntArrayRef, int64_t, int64_t, double, bool);
  std::tuple<at::Tensor, at::Tensor> (*dcnv4_backward)(const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, at::IntArrayRef,
                                                       at::IntArrayRef, at::IntArrayRef,
                                                       at::IntArrayRef, int64_t, int64_t,
                                                       double, bool);
};

DcnEntries dcn_entries_sm80();
DcnEntries dcn_entries_sm90();

}  // namespace emulation
}  // namespace internimage

// In an architecture's TU, after csrc/cuda/dcn_kernel.cu: that build's entries.
#define INTERNIMAGE_DEFINE_DCN_ENTRIES(function)                                        \
  internimage::emulation::DcnEntries internimage::emulation::function() {             \
    return {&internimage::dcnv3_forward_cuda, &internimage::dcnv3_backward_cuda,      \
            &internimage::dcnv4_forward_cuda, &internimage::dcnv4_backward_cuda};     \
  }
