// A CPU emulation of the part of the CUDA execution model that csrc/cuda/dcn_kernel.cu uses,
// so that the host compiler runs that same file (see csrc/emulation/dcn_kernel_sm*.cpp):
//
// * a launch runs every thread of the grid with its blockIdx / threadIdx / blockDim / gridDim;
// * the 32 lanes of a warp run as cooperative fibers that switch only at __shfl_xor_sync, where
//   every lane of the mask must arrive with the same arguments (a lane that exits or waits at a
//   different shuffle is a divergent shuffle: the launch fails naming kernel, block and lane);
// * every global access (ld_global / st_global / atomicAdd) is checked against the tensors the
//   host registered for the launch (DeviceBuffers) and against its natural alignment; stores
//   and atomics must land in a tensor passed to the kernel through a non-const pointer;
// * atomics are plain adds, exact because the fibers run one at a time (the order in which a
//   GPU's atomics land is the one thing this cannot show);
// * __CUDA_ARCH__ is INTERNIMAGE_EMULATE_CUDA (800 or 900); the float4 atomicAdd exists only
//   from 900, as on a device.
// A failed check ends the launch; the launch then throws a c10::Error (RuntimeError in Python)
// naming the kernel, the thread and the address. Test-only knobs, read at each launch:
//   INTERNIMAGE_EMULATION_SMS=n        the device's SM count (default 132, an H100)
//   INTERNIMAGE_EMULATION_FORCE_INT64=1  the int64 index path whatever the sizes
//   INTERNIMAGE_EMULATION_SHRINK=name:bytes  registers tensor `name` that many bytes short
//   INTERNIMAGE_EMULATION_UNPAD=1      the backward loops to `total`, not whole warps (a planted
//                                      divergent shuffle)
#pragma once

#if defined(__CUDACC__)
#error "cuda_emulation.h is for the host compiler; nvcc compiles the real thing"
#endif

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <tuple>
#include <type_traits>

#include "../launch_plan.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define INTERNIMAGE_UNROLL  // the kernels' `#pragma unroll`

namespace internimage {
namespace emulation {

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

// What the running thread sees; the scheduler sets threadIdx at every switch between lanes.
extern thread_local uint3 threadIdx, blockIdx;
extern thread_local dim3 blockDim, gridDim;

enum class Access { kLoad, kStore, kAtomic };

// Checks one global access of `bytes` bytes at `p`; on failure ends the launch (never returns).
void check_access(const void* p, std::size_t bytes, std::size_t alignment, Access kind);
// Exchanges `value` (the low `bytes` bytes) with lane (lane ^ lane_mask) of the warp.
std::uint64_t shuffle_xor(unsigned mask, std::uint64_t value, int bytes, int lane_mask,
                          int width);

// One launch: validates the configuration, registers the kernel's pointer arguments, runs
// every thread of the grid through `body`, and throws the first failure.
class Launch {
 public:
  Launch(const char* kernel, unsigned blocks, unsigned threads);
  void pointer_argument(int index, const void* p, bool writable);
  void run(void (*body)(void*), void* context);

 private:
  const char* kernel_;
  unsigned blocks_, threads_;
};

int sm_count();
void apply_test_overrides(LaunchPlan& plan);

struct NamedTensor {
  const char* name;
  const at::Tensor& tensor;
};
// Registers the tensors of one host call for the launches it makes (until destroyed).
class DeviceBuffers {
 public:
  explicit DeviceBuffers(std::initializer_list<NamedTensor> tensors);
  ~DeviceBuffers();
  DeviceBuffers(const DeviceBuffers&) = delete;
  DeviceBuffers& operator=(const DeviceBuffers&) = delete;

 private:
  std::size_t previous_size_;
};

template <typename T>
inline T ld_global(const T* p) {
  check_access(p, sizeof(T), alignof(T), Access::kLoad);
  return *p;
}
template <typename T>
inline void st_global(T* p, const T& v) {
  check_access(p, sizeof(T), alignof(T), Access::kStore);
  *p = v;
}

inline float atomicAdd(float* p, float v) {
  check_access(p, sizeof(float), alignof(float), Access::kAtomic);
  const float old = *p;
  *p = old + v;
  return old;
}
inline double atomicAdd(double* p, double v) {
  check_access(p, sizeof(double), alignof(double), Access::kAtomic);
  const double old = *p;
  *p = old + v;
  return old;
}
#if defined(INTERNIMAGE_EMULATE_CUDA) && INTERNIMAGE_EMULATE_CUDA >= 900
// Each component is atomic, not the vector as a whole; 16-byte alignment required.
inline float4 atomicAdd(float4* p, float4 v) {
  check_access(p, sizeof(float4), alignof(float4), Access::kAtomic);
  const float4 old = *p;
  *p = float4{old.x + v.x, old.y + v.y, old.z + v.z, old.w + v.w};
  return old;
}
#endif
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of up to 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shuffle_xor(mask, bits, sizeof(T), lane_mask, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace emulation

namespace cuda_compat {

struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
inline int sm_count(int /*device*/) { return emulation::sm_count(); }
using emulation::apply_test_overrides;
using emulation::DeviceBuffers;
using emulation::ld_global;
using emulation::st_global;

template <typename T>
struct Identity {
  using type = T;
};

template <typename T>
void register_argument(emulation::Launch& launch, int index, const T& value) {
  if constexpr (std::is_pointer_v<T>) {
    launch.pointer_argument(index, value, !std::is_const_v<std::remove_pointer_t<T>>);
  }
}

// Runs kernel(args...) on every thread of a blocks x threads grid (see the file comment).
template <typename... Params>
void launch_kernel(const char* name, void (*kernel)(Params...), unsigned blocks,
                   unsigned threads, typename Identity<Params>::type... args) {
  emulation::Launch launch(name, blocks, threads);
  int index = 0;
  (register_argument(launch, index++, args), ...);
  std::tuple<Params...> packed(args...);
  auto body = [&] { std::apply(kernel, packed); };
  launch.run([](void* c) { (*static_cast<decltype(body)*>(c))(); }, &body);
}

}  // namespace cuda_compat
}  // namespace internimage

using internimage::emulation::__shfl_xor_sync;
using internimage::emulation::atomicAdd;
using internimage::emulation::blockDim;
using internimage::emulation::blockIdx;
using internimage::emulation::float4;
using internimage::emulation::gridDim;
using internimage::emulation::make_float4;
using internimage::emulation::threadIdx;

#if defined(INTERNIMAGE_EMULATE_CUDA)  // not in csrc/emulation/cuda_emulation.cpp
#define __CUDA_ARCH__ INTERNIMAGE_EMULATE_CUDA
#endif
