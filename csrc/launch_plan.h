// How one DCNv3/DCNv4 CUDA kernel call maps onto threads: a pure host function (no CUDA runtime
// call, the SM count is an argument), so the CPU tests can check it at every model's shapes and
// the emulated build (csrc/emulation) runs the same plan as a device.
//
// A "slot" is one (output pixel, group). Its group_channels are split into vectors of `vec`
// channels (16 bytes when group_channels and pointer alignment allow, else one channel), and
// 2^lanes_log2 consecutive threads share the slot (a power of two <= 32, so a slot never
// straddles a warp). See csrc/cuda/dcn_kernel.cu.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>

#include "dcnv3_math.h"

namespace internimage {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kMaxBlocksPerSm = 32;  // grid-stride loops cover the rest
constexpr int kVectorBytes = 16;

struct LaunchPlan {
  int vec;
  int lanes_log2;
  int64_t total;         // threads with work: slots * lanes
  int64_t total_padded;  // rounded up to whole warps
  unsigned blocks;
  bool use_int32;  // every index the kernel forms fits in int32
};

// `element_bytes`: sizeof(scalar_t); `vector_ptrs`: the pointers read or written as vectors
// (a 16-byte vector needs 16-byte aligned addresses); `largest_numel`: the largest tensor the
// kernel indexes; `sm_count`: the device's multiprocessor count.
inline LaunchPlan plan_launch(const Dcnv3Geometry& g, int element_bytes,
                              std::initializer_list<const void*> vector_ptrs,
                              int64_t largest_numel, int sm_count) {
  const int wide = kVectorBytes / element_bytes;
  bool aligned = g.group_channels % wide == 0;
  for (const void* p : vector_ptrs) {
    aligned = aligned && reinterpret_cast<std::uintptr_t>(p) % kVectorBytes == 0;
  }
  LaunchPlan plan;
  plan.vec = aligned ? wide : 1;
  const int vectors = g.group_channels / plan.vec;
  plan.lanes_log2 = 0;
  while ((1 << plan.lanes_log2) < std::min(vectors, kWarp)) ++plan.lanes_log2;
  const int64_t slots = g.batch * g.height_out * g.width_out * g.group;
  plan.total = slots << plan.lanes_log2;
  plan.total_padded = (plan.total + kWarp - 1) / kWarp * kWarp;
  const int64_t max_blocks = static_cast<int64_t>(std::max(sm_count, 1)) * kMaxBlocksPerSm;
  plan.blocks = static_cast<unsigned>(
      std::clamp<int64_t>((plan.total_padded + kThreads - 1) / kThreads, 1, max_blocks));
  // Headroom for the last grid-stride increment past the end.
  const int64_t grid_threads = static_cast<int64_t>(plan.blocks) * kThreads;
  plan.use_int32 = std::max(largest_numel, plan.total_padded + grid_threads) <=
                   std::numeric_limits<int32_t>::max();
  return plan;
}

}  // namespace internimage
