// The runtime of the CUDA emulation (cuda_emulation.h): launches, warps as fibers, shuffles,
// memory checks, test knobs, and the internimage::_emulated_cuda_* ops that run
// csrc/cuda/dcn_kernel.cu's host entries as compiled for sm_80 or sm_90.
#include "cuda_emulation.h"

#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <torch/library.h>
#include <ucontext.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "dcn_entries.h"

namespace internimage {
namespace emulation {

thread_local uint3 threadIdx, blockIdx;
thread_local dim3 blockDim, gridDim;

namespace {

constexpr int kWarpSize = 32;
constexpr std::size_t kStackBytes = 256 << 10;

// Fibers: a saved execution context and the switch between two. On x86-64 Linux a dozen
// instructions that keep the callee-saved registers (swapcontext also saves the signal mask, a
// system call per switch, which made the backward's shuffles ten times slower); elsewhere
// ucontext.
#if defined(__x86_64__) && defined(__linux__)
struct Fiber {
  void* sp;
};

}  // namespace
}  // namespace emulation
}  // namespace internimage

// switch_fiber(void** save_sp, void* load_sp): pushes the callee-saved registers, saves the
// stack pointer, loads the other fiber's and pops its registers; `ret` resumes it.
extern "C" void internimage_emulation_switch_fiber(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .type internimage_emulation_switch_fiber, @function
internimage_emulation_switch_fiber:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size internimage_emulation_switch_fiber, .-internimage_emulation_switch_fiber
)");

namespace internimage {
namespace emulation {
namespace {

// A fiber that enters `entry` (which never returns) on the stack [stack, stack + bytes).
void start_fiber(Fiber& f, char* stack, std::size_t bytes, void (*entry)()) {
  auto* top = reinterpret_cast<void**>(
      (reinterpret_cast<std::uintptr_t>(stack) + bytes) & ~std::uintptr_t{15});
  top[-1] = nullptr;                            // entry's return address (it never returns)
  top[-2] = reinterpret_cast<void*>(entry);     // popped by the switch's `ret`
  for (int r = 3; r <= 8; ++r) top[-r] = nullptr;  // the six callee-saved registers
  f.sp = top - 8;
}

void switch_fiber(Fiber& from, Fiber& to) { internimage_emulation_switch_fiber(&from.sp, to.sp); }
#else
struct Fiber {
  ucontext_t context;
};

void start_fiber(Fiber& f, char* stack, std::size_t bytes, void (*entry)()) {
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = stack;
  f.context.uc_stack.ss_size = bytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, entry, 0);
}

void switch_fiber(Fiber& from, Fiber& to) { swapcontext(&from.context, &to.context); }
#endif

struct Buffer {
  std::string name;
  std::uintptr_t begin, end;
  bool writable;  // passed to the running kernel through a non-const pointer
};

enum class LaneState { kReady, kAtShuffle, kExited, kFailed };

// One lane of the running warp: a fiber with its own stack.
struct Lane {
  Fiber fiber;
  LaneState state;
  // The shuffle it waits at.
  unsigned mask;
  int lane_mask, width, bytes;
  std::uint64_t value, result;
};

// kWarpSize fiber stacks, each above a guard page, so an overflow faults instead of
// corrupting a neighbour.
class Stacks {
 public:
  Stacks() : page_(static_cast<std::size_t>(sysconf(_SC_PAGESIZE))) {
    const std::size_t bytes = kWarpSize * (page_ + kStackBytes);
    void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "emulated CUDA: cannot map ", bytes, " bytes of stacks");
    base_ = static_cast<char*>(base);
    for (int lane = 0; lane < kWarpSize; ++lane) {
      mprotect(base_ + lane * (page_ + kStackBytes), page_, PROT_NONE);
    }
  }
  ~Stacks() { munmap(base_, kWarpSize * (page_ + kStackBytes)); }
  Stacks(const Stacks&) = delete;
  Stacks& operator=(const Stacks&) = delete;
  char* stack(int lane) const { return base_ + lane * (page_ + kStackBytes) + page_; }

 private:
  std::size_t page_;
  char* base_;
};

// Everything about the emulated device on one host thread (launches run one at a time).
struct ThreadState {
  std::vector<Buffer> buffers;
  const char* kernel = nullptr;
  std::string error;  // the first failure of the running launch
  void (*body)(void*) = nullptr;
  void* context = nullptr;
  Fiber scheduler;
  Lane lanes[kWarpSize];
  int lane_count = 0;
  int warp = 0;
  int current = -1;  // running lane, -1 outside a launch
  std::unique_ptr<Stacks> stacks;
};

thread_local ThreadState t_state;

std::string hex(std::uint64_t v) {
  char text[24];
  std::snprintf(text, sizeof(text), "0x%" PRIx64, v);
  return text;
}

std::string where(const ThreadState& s, int lane) {
  return std::string(s.kernel) + ", block (" + std::to_string(blockIdx.x) + ",0,0), thread (" +
         std::to_string(s.warp * kWarpSize + lane) + ",0,0) (warp " + std::to_string(s.warp) +
         ", lane " + std::to_string(lane) + ")";
}

void record(ThreadState& s, const std::string& message) {
  if (s.error.empty()) s.error = "emulated CUDA: " + message;
}

// Ends the running lane for good: back to the scheduler, which ends the launch.
[[noreturn]] void abandon_lane() {
  ThreadState& s = t_state;
  const int me = s.current;
  s.lanes[me].state = LaneState::kFailed;
  switch_fiber(s.lanes[me].fiber, s.scheduler);
  std::abort();  // never resumed
}

void lane_entry() {
  ThreadState& s = t_state;
  s.body(s.context);
  const int me = s.current;
  s.lanes[me].state = LaneState::kExited;
  switch_fiber(s.lanes[me].fiber, s.scheduler);
  std::abort();  // never resumed
}

void resume(ThreadState& s, int lane) {
  s.current = lane;
  threadIdx = uint3{static_cast<unsigned>(s.warp * kWarpSize + lane), 0, 0};
  switch_fiber(s.scheduler, s.lanes[lane].fiber);
}

std::string shuffle_text(const Lane& l) {
  return "__shfl_xor_sync(mask " + hex(l.mask) + ", laneMask " + std::to_string(l.lane_mask) +
         ", width " + std::to_string(l.width) + ", " + std::to_string(l.bytes) + "-byte value)";
}

// Completes the shuffle that lane `first` waits at, or records why it cannot complete.
void resolve_shuffle(ThreadState& s, int first) {
  const Lane& f = s.lanes[first];
  if (!((f.mask >> first) & 1u)) {
    record(s, where(s, first) + ": " + shuffle_text(f) + " with a mask that omits the lane");
    return;
  }
  for (int l = 0; l < kWarpSize; ++l) {
    if (!((f.mask >> l) & 1u)) continue;
    const auto waiting = [&] {
      return "lane " + std::to_string(first) + " waits at " + shuffle_text(f);
    };
    if (l >= s.lane_count) {
      record(s, where(s, first) + ": divergent shuffle: " + waiting() +
                    ", whose mask names lane " + std::to_string(l) +
                    ", which the block does not have");
      return;
    }
    const Lane& o = s.lanes[l];
    if (o.state == LaneState::kExited) {
      record(s, where(s, l) + ": divergent shuffle: the lane exited while " + waiting());
      return;
    }
    if (o.mask != f.mask || o.lane_mask != f.lane_mask || o.width != f.width ||
        o.bytes != f.bytes) {
      record(s, where(s, l) + ": divergent shuffle: the lane waits at " + shuffle_text(o) +
                    " while " + waiting());
      return;
    }
  }
  for (int l = 0; l < kWarpSize; ++l) {
    if (!((f.mask >> l) & 1u)) continue;
    int source = l ^ f.lane_mask;
    // A lane may read earlier width-segments, not later ones (it then keeps its own value).
    if (source / f.width > l / f.width) source = l;
    if (source >= s.lane_count || !((f.mask >> source) & 1u)) {
      record(s, where(s, l) + ": " + shuffle_text(f) + " reads lane " + std::to_string(source) +
                    ", which is not in the mask (an undefined value on a device)");
      return;
    }
    s.lanes[l].result = s.lanes[source].value;
  }
  for (int l = 0; l < kWarpSize; ++l) {
    if ((f.mask >> l) & 1u) s.lanes[l].state = LaneState::kReady;
  }
}

// Runs the lanes of warp `warp` of the current block to their end.
void run_warp(ThreadState& s, int warp, int lane_count) {
  s.warp = warp;
  s.lane_count = lane_count;
  for (int l = 0; l < lane_count; ++l) {
    Lane& lane = s.lanes[l];
    start_fiber(lane.fiber, s.stacks->stack(l), kStackBytes, lane_entry);
    lane.state = LaneState::kReady;
  }
  while (true) {
    for (int l = 0; l < lane_count; ++l) {
      if (s.lanes[l].state != LaneState::kReady) continue;
      resume(s, l);
      if (!s.error.empty()) return;
    }
    int first = -1;
    for (int l = 0; l < lane_count && first < 0; ++l) {
      if (s.lanes[l].state == LaneState::kAtShuffle) first = l;
    }
    if (first < 0) return;  // every lane exited
    resolve_shuffle(s, first);
    if (!s.error.empty()) return;
  }
}

const char* kind_name(Access kind) {
  switch (kind) {
    case Access::kLoad:
      return "load";
    case Access::kStore:
      return "store";
    case Access::kAtomic:
      return "atomicAdd";
  }
  return "access";
}

// Why the access is refused, relative to the registered buffer nearest to it.
std::string describe_bad_access(const ThreadState& s, std::uintptr_t a, std::size_t bytes,
                                Access kind) {
  std::string text = std::string("out-of-bounds ") + kind_name(kind) + " of " +
                     std::to_string(bytes) + " bytes at " + hex(a);
  const Buffer* nearest = nullptr;
  std::uintptr_t distance = std::numeric_limits<std::uintptr_t>::max();
  for (const Buffer& b : s.buffers) {
    const std::uintptr_t d = a < b.begin ? b.begin - a : (a < b.end ? 0 : a - b.end + 1);
    if (d < distance) {
      distance = d;
      nearest = &b;
    }
  }
  if (nearest == nullptr) return text + ": the launch has no registered tensors";
  const auto offset = static_cast<std::intptr_t>(a - nearest->begin);
  text += " (byte " + std::to_string(offset) + ", index " +
          std::to_string(offset / static_cast<std::intptr_t>(bytes)) + " of '" + nearest->name +
          "', " + std::to_string(nearest->end - nearest->begin) + " bytes";
  if (kind != Access::kLoad && !nearest->writable && a >= nearest->begin &&
      a + bytes <= nearest->end) {
    text += ", which the kernel received as a const pointer";
  }
  return text + ")";
}

}  // namespace

void check_access(const void* p, std::size_t bytes, std::size_t alignment, Access kind) {
  ThreadState& s = t_state;
  TORCH_CHECK(s.current >= 0, "emulated CUDA: global memory access outside a kernel launch");
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  if (a % alignment != 0) {
    record(s, where(s, s.current) + ": misaligned " + kind_name(kind) + " of " +
                  std::to_string(bytes) + " bytes at " + hex(a) + " (needs " +
                  std::to_string(alignment) + "-byte alignment)");
    abandon_lane();
  }
  for (const Buffer& b : s.buffers) {
    if (a >= b.begin && a + bytes <= b.end && (kind == Access::kLoad || b.writable)) return;
  }
  record(s, where(s, s.current) + ": " + describe_bad_access(s, a, bytes, kind));
  abandon_lane();
}

std::uint64_t shuffle_xor(unsigned mask, std::uint64_t value, int bytes, int lane_mask,
                          int width) {
  ThreadState& s = t_state;
  TORCH_CHECK(s.current >= 0, "emulated CUDA: __shfl_xor_sync outside a kernel launch");
  const int me = s.current;
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
    record(s, where(s, me) + ": __shfl_xor_sync width " + std::to_string(width) +
                  " is not a power of two <= 32");
    abandon_lane();
  }
  Lane& lane = s.lanes[me];
  lane.state = LaneState::kAtShuffle;
  lane.mask = mask;
  lane.lane_mask = lane_mask;
  lane.width = width;
  lane.bytes = bytes;
  lane.value = value;
  switch_fiber(lane.fiber, s.scheduler);
  return s.lanes[me].result;
}

Launch::Launch(const char* kernel, unsigned blocks, unsigned threads)
    : kernel_(kernel), blocks_(blocks), threads_(threads) {
  // The limits of sm_80 and sm_90 (a device fails the launch the same way).
  TORCH_CHECK(blocks >= 1 && blocks <= static_cast<unsigned>(std::numeric_limits<int>::max()) &&
                  threads >= 1 && threads <= 1024,
              "emulated CUDA: ", kernel, ": invalid configuration argument: grid (", blocks,
              ",1,1), block (", threads, ",1,1) (needs 1 <= grid.x <= 2^31 - 1 and 1 <= "
              "threads per block <= 1024)");
  for (Buffer& b : t_state.buffers) b.writable = false;
}

void Launch::pointer_argument(int index, const void* p, bool writable) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  for (Buffer& b : t_state.buffers) {
    if (a >= b.begin && a <= b.end) {
      b.writable = b.writable || writable;
      return;
    }
  }
  TORCH_CHECK(false, "emulated CUDA: ", kernel_, ": pointer argument ", index, " (", hex(a),
              ") lies in no tensor registered for the launch (DeviceBuffers)");
}

void Launch::run(void (*body)(void*), void* context) {
  ThreadState& s = t_state;
  TORCH_CHECK(s.current < 0, "emulated CUDA: a kernel launch inside a kernel");
  if (!s.stacks) s.stacks = std::make_unique<Stacks>();
  s.kernel = kernel_;
  s.error.clear();
  s.body = body;
  s.context = context;
  gridDim = dim3{blocks_, 1, 1};
  blockDim = dim3{threads_, 1, 1};
  const unsigned warps = (threads_ + kWarpSize - 1) / kWarpSize;
  for (unsigned b = 0; b < blocks_ && s.error.empty(); ++b) {
    blockIdx = uint3{b, 0, 0};
    for (unsigned w = 0; w < warps && s.error.empty(); ++w) {
      run_warp(s, static_cast<int>(w),
               static_cast<int>(std::min<unsigned>(kWarpSize, threads_ - w * kWarpSize)));
    }
  }
  s.current = -1;
  for (Buffer& b : s.buffers) b.writable = false;
  TORCH_CHECK(s.error.empty(), s.error);
}

namespace {

// A test knob: the integer in environment variable `name`, or `fallback` when unset.
int64_t knob(const char* name, int64_t fallback) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return fallback;
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  TORCH_CHECK(*end == '\0', "emulated CUDA: ", name, " must be an integer, got '", text, "'");
  return value;
}

}  // namespace

int sm_count() {
  const int64_t sms = knob("INTERNIMAGE_EMULATION_SMS", 132);  // an H100 SXM
  TORCH_CHECK(sms >= 1 && sms <= 4096, "emulated CUDA: INTERNIMAGE_EMULATION_SMS must be in "
              "[1, 4096], got ", sms);
  return static_cast<int>(sms);
}

void apply_test_overrides(LaunchPlan& plan) {
  if (knob("INTERNIMAGE_EMULATION_FORCE_INT64", 0) != 0) plan.use_int32 = false;
  if (knob("INTERNIMAGE_EMULATION_UNPAD", 0) != 0) plan.total_padded = plan.total;
}

DeviceBuffers::DeviceBuffers(std::initializer_list<NamedTensor> tensors)
    : previous_size_(t_state.buffers.size()) {
  std::string shrink_name;
  int64_t shrink_bytes = 0;
  if (const char* shrink = std::getenv("INTERNIMAGE_EMULATION_SHRINK")) {
    const std::string text = shrink;
    const auto colon = text.find(':');
    TORCH_CHECK(colon != std::string::npos, "emulated CUDA: INTERNIMAGE_EMULATION_SHRINK must "
                "read name:bytes, got '", text, "'");
    shrink_name = text.substr(0, colon);
    shrink_bytes = std::stoll(text.substr(colon + 1));
  }
  for (const NamedTensor& t : tensors) {
    TORCH_CHECK(t.tensor.is_contiguous(), "emulated CUDA: ", t.name, " must be contiguous");
    const auto begin = reinterpret_cast<std::uintptr_t>(t.tensor.const_data_ptr());
    std::uintptr_t end = begin + t.tensor.numel() * t.tensor.element_size();
    if (t.name == shrink_name) end -= std::min<std::uintptr_t>(end - begin, shrink_bytes);
    t_state.buffers.push_back(Buffer{t.name, begin, end, false});
  }
}

DeviceBuffers::~DeviceBuffers() { t_state.buffers.resize(previous_size_); }

namespace {

// Which build the _emulated_cuda_* ops run: INTERNIMAGE_EMULATION_ARCH=800 or 900 (default).
DcnEntries entries() {
  const int64_t arch = knob("INTERNIMAGE_EMULATION_ARCH", 900);
  TORCH_CHECK(arch == 800 || arch == 900, "emulated CUDA: INTERNIMAGE_EMULATION_ARCH must be 800 "
              "or 900, got ", arch);
  return arch == 800 ? dcn_entries_sm80() : dcn_entries_sm90();
}

at::Tensor dcnv3(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                 at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                 at::IntArrayRef dilation, int64_t group, int64_t group_channels,
                 double offset_scale, bool remove_center) {
  return entries().dcnv3(input, offset, mask, kernel_size, stride, padding, dilation, group,
                         group_channels, offset_scale, remove_center);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t group, int64_t group_channels,
    double offset_scale, bool remove_center) {
  return entries().dcnv3_backward(grad_output, input, offset, mask, kernel_size, stride,
                                  padding, dilation, group, group_channels, offset_scale,
                                  remove_center);
}

at::Tensor dcnv4(const at::Tensor& input, const at::Tensor& offset_mask,
                 at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                 at::IntArrayRef dilation, int64_t group, int64_t group_channels,
                 double offset_scale, bool remove_center) {
  return entries().dcnv4(input, offset_mask, kernel_size, stride, padding, dilation, group,
                         group_channels, offset_scale, remove_center);
}

std::tuple<at::Tensor, at::Tensor> dcnv4_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset_mask,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t group, int64_t group_channels, double offset_scale,
    bool remove_center) {
  return entries().dcnv4_backward(grad_output, input, offset_mask, kernel_size, stride, padding,
                                  dilation, group, group_channels, offset_scale, remove_center);
}

}  // namespace

}  // namespace emulation
}  // namespace internimage

TORCH_LIBRARY_IMPL(internimage, CPU, m) {
  m.impl("_emulated_cuda_dcnv3", &internimage::emulation::dcnv3);
  m.impl("_emulated_cuda_dcnv3_backward", &internimage::emulation::dcnv3_backward);
  m.impl("_emulated_cuda_dcnv4", &internimage::emulation::dcnv4);
  m.impl("_emulated_cuda_dcnv4_backward", &internimage::emulation::dcnv4_backward);
}
