// What csrc/cuda/dcn_kernel.cu needs from CUDA beyond the language, in one place, so that the
// same file also compiles with the host compiler under the CPU emulation of the CUDA execution
// model (INTERNIMAGE_EMULATE_CUDA=800 or 900, see csrc/emulation/cuda_emulation.h):
//   DeviceGuard, sm_count(device), DeviceBuffers (the tensors a launch may touch),
//   ld_global / st_global (every global-memory load and store of the kernels),
//   launch_kernel (instead of <<<>>>, followed by the launch check),
//   apply_test_overrides (no-op on a device), INTERNIMAGE_UNROLL (#pragma unroll).
// Include it after every other header: under emulation it defines __CUDA_ARCH__.
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>

#include "../launch_plan.h"

#if defined(INTERNIMAGE_EMULATE_CUDA)
#include "../emulation/cuda_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define INTERNIMAGE_UNROLL _Pragma("unroll")

namespace internimage {
namespace cuda_compat {

using DeviceGuard = c10::cuda::CUDAGuard;

inline int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// The tensors one launch may touch, by name: checked under emulation, nothing on a device
// (compute-sanitizer's memcheck does it there).
struct NamedTensor {
  const char* name;
  const at::Tensor& tensor;
};
struct DeviceBuffers {
  explicit DeviceBuffers(std::initializer_list<NamedTensor>) {}
};

template <typename T>
__device__ __forceinline__ T ld_global(const T* p) {
  return *p;
}
template <typename T>
__device__ __forceinline__ void st_global(T* p, const T& v) {
  *p = v;
}

template <typename T>
struct Identity {
  using type = T;
};

// kernel<<<blocks, threads, 0, current stream>>>(args...), then the launch check. `name`
// is for the emulation's error messages.
template <typename... Params>
void launch_kernel(const char* /*name*/, void (*kernel)(Params...), unsigned blocks,
                   unsigned threads, typename Identity<Params>::type... args) {
  kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline void apply_test_overrides(LaunchPlan& /*plan*/) {}

}  // namespace cuda_compat
}  // namespace internimage
#endif
