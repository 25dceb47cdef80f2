// CPU kernels of the DCNv3 and DCNv4 operators: forward and backward, float32 / float64 /
// bfloat16 / float16 (reduced types accumulate in float32). The two ops share every kernel:
// they differ only in where a sample's offsets and mask live (OffsetMaskLayout in
// dcnv3_math.h), and the per-sample math comes from dcnv3_math.h, as on CUDA.
//
// Samples are handled in runs of a few hundred. A planning pass over a whole run, branch-free
// so that the compiler vectorises it, computes each sample's location, corners, corner
// weights (mask x bilinear weight, 0 outside the image) and the addresses of its four corner
// rows, which for a corner outside the image is a row of zeros. The channel loops that follow
// then need neither branches nor masks: four loads and four multiply-adds per sample.
//
// Parallelism: the forward splits output pixels across threads. The backward gives each
// thread whole (batch, group) slices, so every element of grad_input is accumulated by one
// thread in a fixed order: gradients are bit-identical run to run and for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <tuple>
#include <type_traits>

#include "../checks.h"
#include "cpu_dispatch.h"
#include "vector_math.h"

namespace internimage {
namespace {

// About this many samples are planned at once: the plan (about 90 bytes a sample) then stays
// in L1 next to the corner rows the channel loops read.
constexpr int64_t kRunSamples = 256;

// A per-thread buffer, reused from call to call (allocations would cost as much as the work
// on the smallest maps), from which one chunk of work carves its arrays.
class Scratch {
 public:
  // `bytes` for the calling thread; valid until its next call.
  static unsigned char* get(size_t bytes) {
    thread_local Buffer buffer;
    if (buffer.size < bytes) {
      std::free(buffer.data);
      const size_t size = (bytes + kAlign - 1) / kAlign * kAlign;
      buffer.data = static_cast<unsigned char*>(std::aligned_alloc(kAlign, size));
      if (buffer.data == nullptr) throw std::bad_alloc();
      buffer.size = size;
    }
    return buffer.data;
  }

  // Carves arrays out of one block: run once without a block to size it (`bytes()`), then
  // again on the block.
  explicit Scratch(unsigned char* base = nullptr) : base_(base) {}
  template <typename T>
  T* take(int64_t count) {
    T* out = reinterpret_cast<T*>(base_ + used_);
    used_ += (static_cast<size_t>(count) * sizeof(T) + kAlign - 1) / kAlign * kAlign;
    return out;
  }
  size_t bytes() const { return used_; }

 private:
  static constexpr size_t kAlign = 64;
  struct Buffer {
    unsigned char* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  unsigned char* base_;
  size_t used_ = 0;
};

// Where the samples of a run of output pixels land: see the file comment. A run holds whole
// pixels; `per_pixel` samples each (all groups of a pixel in the forward, the one group of a
// slice in the backward), in [pixel][group][point] order. Corner addresses are those of the
// pixel's first channel; the forward adds each group's channel offset as it reads them.
template <typename acc_t, bool kBackward>
struct SamplePlan {
  int64_t capacity;  // samples
  int64_t per_pixel;
  // Per-sample pattern, the same for every run: kernel-grid displacement of the sample's tap
  // (unscaled).
  acc_t* tap_x;
  acc_t* tap_y;
  acc_t* centre_x;  // kernel centre of each sample's output pixel
  acc_t* centre_y;
  // Corner k of sample q at [k * capacity + q]: its weight (0 outside the image) and the
  // address of its pixel's first channel (a row of zeros outside the image).
  acc_t* weight;
  std::uintptr_t* row;
  // The top-left corner's pixel and the corner bits (0: skipped sample).
  int32_t* top;
  int32_t* left;
  unsigned* corners;
  // Backward only: where corner k's gradient goes (a scratch row outside the image) and the
  // fractional position.
  std::uintptr_t* grad_row = nullptr;
  acc_t* frac_x = nullptr;
  acc_t* frac_y = nullptr;

  SamplePlan(Scratch& s, int64_t capacity_, int64_t per_pixel_)
      : capacity(capacity_), per_pixel(per_pixel_) {
    tap_x = s.take<acc_t>(capacity);
    tap_y = s.take<acc_t>(capacity);
    centre_x = s.take<acc_t>(capacity);
    centre_y = s.take<acc_t>(capacity);
    weight = s.take<acc_t>(4 * capacity);
    row = s.take<std::uintptr_t>(4 * capacity);
    top = s.take<int32_t>(capacity);
    left = s.take<int32_t>(capacity);
    corners = s.take<unsigned>(capacity);
    if constexpr (kBackward) {
      grad_row = s.take<std::uintptr_t>(4 * capacity);
      frac_x = s.take<acc_t>(capacity);
      frac_y = s.take<acc_t>(capacity);
    }
  }

  // Fills the per-sample pattern (once per chunk of work).
  void init_pattern(const Dcnv3Geometry& g) {
    for (int64_t q = 0; q < capacity;) {
      for (int i = 0; i < g.kernel_w && q < capacity; ++i) {
        for (int j = 0; j < g.kernel_h && q < capacity; ++j) {
          if (is_removed_centre(g, i, j)) continue;
          kernel_tap_displacement(g, i, j, tap_x[q], tap_y[q]);
          ++q;
        }
      }
    }
  }

  // Plans the samples of the `pixels` output pixels from flat index `first_pixel` of
  // (N, H_out, W_out) on, all in one image at `image` (its gradient at `grad_image`).
  // `offset` holds the run's (x, y) pairs back to back, `mask` its mask values; `zeros` and
  // `sink` are rows of at least C values that corners outside the image read and write.
  template <typename scalar_t, typename offset_t>
  DCNV3_ALWAYS_INLINE void locate(const Dcnv3Geometry& g, int64_t first_pixel, int64_t pixels,
                                  const offset_t* __restrict__ offset,
                                  const acc_t* __restrict__ mask, const scalar_t* image,
                                  const scalar_t* zeros, acc_t* grad_image = nullptr,
                                  acc_t* sink = nullptr) {
    for (int64_t p = 0; p < pixels; ++p) {
      const int64_t pixel = first_pixel + p;
      const int64_t w_out = pixel % g.width_out;
      const int64_t h_out = (pixel / g.width_out) % g.height_out;
      acc_t cx, cy;
      kernel_centre(g, h_out, w_out, cx, cy);
      std::fill_n(centre_x + p * per_pixel, per_pixel, cx);
      std::fill_n(centre_y + p * per_pixel, per_pixel, cy);
    }
    const int64_t count = per_pixel * pixels;
    // Element offsets from 32-bit products when a row of the image has fewer than 2^31
    // elements (always, in practice): vectorised, 64-bit multiplies cost several instructions
    // each on AVX2.
    const int64_t row_elements = g.width_in * g.channels();
    if (row_elements <= std::numeric_limits<int32_t>::max()) {
      locate_impl<true>(g, count, offset, mask, image, zeros, grad_image, sink);
    } else {
      locate_impl<false>(g, count, offset, mask, image, zeros, grad_image, sink);
    }
  }

  // Two passes, so that neither runs out of vector registers (AVX2 has 16): the first in
  // float lanes (locations, corners, weights), the second in 64-bit lanes (addresses).
  template <bool kNarrow, typename scalar_t, typename offset_t>
  DCNV3_ALWAYS_INLINE void locate_impl(const Dcnv3Geometry& g, int64_t count,
                                       const offset_t* __restrict__ offset,
                                       const acc_t* __restrict__ mask, const scalar_t* image,
                                       const scalar_t* zeros, acc_t* grad_image, acc_t* sink) {
    const int64_t cap = capacity;
    const acc_t scale = static_cast<acc_t>(g.offset_scale);
    const int64_t height = g.height_in, width = g.width_in;
    const acc_t* __restrict__ tx = tap_x;
    const acc_t* __restrict__ ty = tap_y;
    const acc_t* __restrict__ cxs = centre_x;
    const acc_t* __restrict__ cys = centre_y;
    acc_t* __restrict__ w = weight;
    int32_t* __restrict__ ys = top;
    int32_t* __restrict__ xs = left;
    unsigned* __restrict__ bits_out = corners;
    acc_t* __restrict__ fxs = frac_x;
    acc_t* __restrict__ fys = frac_y;
#pragma omp simd
    for (int64_t q = 0; q < count; ++q) {
      const acc_t loc_x =
          sample_coordinate(cxs[q], tx[q], static_cast<acc_t>(offset[2 * q]), scale);
      const acc_t loc_y =
          sample_coordinate(cys[q], ty[q], static_cast<acc_t>(offset[2 * q + 1]), scale);
      int32_t y0, x0;
      acc_t fy, fx;
      const unsigned bits = sample_corners(loc_y, loc_x, height, width, y0, x0, fy, fx);
      const CornerValues<acc_t> wk = masked_corner_weights(bits, mask[q], fy, fx);
      w[q] = wk.v[0];
      w[cap + q] = wk.v[1];
      w[2 * cap + q] = wk.v[2];
      w[3 * cap + q] = wk.v[3];
      ys[q] = y0;
      xs[q] = x0;
      bits_out[q] = bits;
      if constexpr (kBackward) {
        fxs[q] = fx;
        fys[q] = fy;
      }
    }

    const int64_t channels = g.channels();
    const int64_t below = width * channels;
    const int32_t below32 = static_cast<int32_t>(kNarrow ? below : 0);
    const int32_t channels32 = static_cast<int32_t>(kNarrow ? channels : 0);
    const std::uintptr_t image_address = reinterpret_cast<std::uintptr_t>(image);
    const std::uintptr_t zero_address = reinterpret_cast<std::uintptr_t>(zeros);
    const std::uintptr_t grad_address = reinterpret_cast<std::uintptr_t>(grad_image);
    const std::uintptr_t sink_address = reinterpret_cast<std::uintptr_t>(sink);
    const std::uintptr_t right = static_cast<std::uintptr_t>(channels);
    const std::uintptr_t down = static_cast<std::uintptr_t>(below);
    std::uintptr_t* __restrict__ rows = row;
    std::uintptr_t* __restrict__ grad_rows = grad_row;
#pragma omp simd
    for (int64_t q = 0; q < count; ++q) {
      const unsigned bits = bits_out[q];
      // Element offset of the top-left corner; corner k's row is that plus a step (written
      // out: see masked_corner_weights).
      const int64_t first =
          kNarrow ? static_cast<int64_t>(ys[q]) * below32 + static_cast<int64_t>(xs[q]) * channels32
                  : (static_cast<int64_t>(ys[q]) * width + xs[q]) * channels;
      const std::uintptr_t element = static_cast<std::uintptr_t>(first);
      const std::uintptr_t at = image_address + element * sizeof(scalar_t);
      rows[q] = (bits & 1u) ? at : zero_address;
      rows[cap + q] = (bits & 2u) ? at + right * sizeof(scalar_t) : zero_address;
      rows[2 * cap + q] = (bits & 4u) ? at + down * sizeof(scalar_t) : zero_address;
      rows[3 * cap + q] = (bits & 8u) ? at + (down + right) * sizeof(scalar_t) : zero_address;
      if constexpr (kBackward) {
        const std::uintptr_t grad_at = grad_address + element * sizeof(acc_t);
        grad_rows[q] = (bits & 1u) ? grad_at : sink_address;
        grad_rows[cap + q] = (bits & 2u) ? grad_at + right * sizeof(acc_t) : sink_address;
        grad_rows[2 * cap + q] = (bits & 4u) ? grad_at + down * sizeof(acc_t) : sink_address;
        grad_rows[3 * cap + q] =
            (bits & 8u) ? grad_at + (down + right) * sizeof(acc_t) : sink_address;
      }
    }
  }
};

template <typename T>
DCNV3_ALWAYS_INLINE const T* address(std::uintptr_t a) {
  return reinterpret_cast<const T*>(a);
}

// Sums samples [first, first + points) of one group into `out` (gc channels):
// out = sum over samples and corners of weight * corner row. kLanes: float32 lanes of one
// vector register of the instruction set the caller is compiled for.
template <typename scalar_t, int GC, int kLanes, typename acc_t, bool kBackward>
DCNV3_ALWAYS_INLINE void sample_group(const SamplePlan<acc_t, kBackward>& plan, int64_t first,
                                      int points, int64_t channel_start, int gc, acc_t* acc,
                                      scalar_t* out) {
  const int64_t cap = plan.capacity;
  const acc_t* w0 = plan.weight;
  const acc_t* w1 = plan.weight + cap;
  const acc_t* w2 = plan.weight + 2 * cap;
  const acc_t* w3 = plan.weight + 3 * cap;
  const std::uintptr_t* r0 = plan.row;
  const std::uintptr_t* r1 = plan.row + cap;
  const std::uintptr_t* r2 = plan.row + 2 * cap;
  const std::uintptr_t* r3 = plan.row + 3 * cap;
  if constexpr (std::is_same_v<scalar_t, float> && GC > 0 && GC % kLanes == 0) {
    constexpr int kBlocks = GC / kLanes;
    typename FloatVector<kLanes>::type sums[kBlocks] = {};
    for (int64_t q = first; q < first + points; ++q) {
      const float* v0 = address<float>(r0[q]) + channel_start;
      const float* v1 = address<float>(r1[q]) + channel_start;
      const float* v2 = address<float>(r2[q]) + channel_start;
      const float* v3 = address<float>(r3[q]) + channel_start;
      for (int b = 0; b < kBlocks; ++b) {
        const int c = kLanes * b;
        sums[b] += w0[q] * load_floats<kLanes>(v0 + c) + w1[q] * load_floats<kLanes>(v1 + c) +
                   w2[q] * load_floats<kLanes>(v2 + c) + w3[q] * load_floats<kLanes>(v3 + c);
      }
    }
    for (int b = 0; b < kBlocks; ++b) store_floats<kLanes>(out + kLanes * b, sums[b]);
  } else {
    for (int c = 0; c < gc; ++c) acc[c] = acc_t(0);
    for (int64_t q = first; q < first + points; ++q) {
      const acc_t a = w0[q], b = w1[q], c2 = w2[q], d = w3[q];
      const scalar_t* __restrict__ v0 = address<scalar_t>(r0[q]) + channel_start;
      const scalar_t* __restrict__ v1 = address<scalar_t>(r1[q]) + channel_start;
      const scalar_t* __restrict__ v2 = address<scalar_t>(r2[q]) + channel_start;
      const scalar_t* __restrict__ v3 = address<scalar_t>(r3[q]) + channel_start;
#pragma omp simd
      for (int c = 0; c < gc; ++c) {
        acc[c] += a * static_cast<acc_t>(v0[c]) + b * static_cast<acc_t>(v1[c]) +
                  c2 * static_cast<acc_t>(v2[c]) + d * static_cast<acc_t>(v3[c]);
      }
    }
    for (int c = 0; c < gc; ++c) out[c] = static_cast<scalar_t>(acc[c]);
  }
}

// Max of N values as a pairwise tree (tree_sum, in vector_math.h, for the sum): short
// dependency chains, so the groups of a pixel overlap in the pipeline (a running max over 9
// values is a 9-step chain). A NaN logit needs no care here: its exp makes the group's sum,
// and so the group, NaN.
template <int N>
DCNV3_ALWAYS_INLINE float tree_max(const float* v) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    const float a = tree_max<N / 2>(v), b = tree_max<N - N / 2>(v + N / 2);
    return a > b ? a : b;
  }
}

// Softmax over each group's P mask logits of one pixel (P = points: 9, or 8 without the
// centre), exp(x - max) / sum as torch.softmax computes it, written to `mask`.
template <int P>
DCNV3_ALWAYS_INLINE void group_softmax(const float* logits, int64_t groups, float* mask) {
  const int64_t samples = groups * P;
  for (int64_t first = 0; first < samples; first += P) {
    const float peak = tree_max<P>(logits + first);
    for (int p = 0; p < P; ++p) mask[first + p] = logits[first + p] - peak;
  }
#pragma omp simd
  for (int64_t q = 0; q < samples; ++q) mask[q] = exp_nonpositive(mask[q]);
  for (int64_t first = 0; first < samples; first += P) {
    const float inverse = 1.0f / tree_sum<P>(mask + first);
    for (int p = 0; p < P; ++p) mask[first + p] *= inverse;
  }
}

// Any other point count: the same arithmetic with running max and sum.
DCNV3_ALWAYS_INLINE void group_softmax_any(const float* logits, int64_t groups, int points,
                                           float* mask) {
  const int64_t samples = groups * points;
  for (int64_t first = 0; first < samples; first += points) {
    float peak = logits[first];
    for (int p = 1; p < points; ++p) peak = logits[first + p] > peak ? logits[first + p] : peak;
    for (int p = 0; p < points; ++p) mask[first + p] = logits[first + p] - peak;
  }
#pragma omp simd
  for (int64_t q = 0; q < samples; ++q) mask[q] = exp_nonpositive(mask[q]);
  for (int64_t first = 0; first < samples; first += points) {
    float sum = 0.0f;
    for (int p = 0; p < points; ++p) sum += mask[first + p];
    const float inverse = 1.0f / sum;
    for (int p = 0; p < points; ++p) mask[first + p] *= inverse;
  }
}

// The offsets ((x, y) pairs) and mask values of groups [group_first, group_first + groups)
// of `pixels` output pixels from `first_pixel` on, copied back to back ([pixel][group][point])
// into `offsets` and `mask` (converted to acc_t). kPoints > 0: the point count, known at
// compile time (the copies are then a few vector moves each).
template <int kPoints, typename scalar_t, typename acc_t>
DCNV3_ALWAYS_INLINE void gather_run_impl(const Dcnv3Geometry& g, const OffsetMaskLayout& layout,
                                         const scalar_t* offset, const scalar_t* mask,
                                         int64_t first_pixel, int64_t pixels,
                                         int64_t group_first, int64_t groups,
                                         scalar_t* __restrict__ offsets,
                                         acc_t* __restrict__ mask_values) {
  const int points = kPoints > 0 ? kPoints : g.points;
  for (int64_t p = 0; p < pixels; ++p) {
    for (int64_t grp = group_first; grp < group_first + groups; ++grp) {
      const scalar_t* __restrict__ off = offset + layout.offset_index(first_pixel + p, grp);
      const scalar_t* __restrict__ msk = mask + layout.mask_index(first_pixel + p, grp);
      for (int k = 0; k < 2 * points; ++k) offsets[k] = off[k];
      for (int k = 0; k < points; ++k) mask_values[k] = static_cast<acc_t>(msk[k]);
      offsets += 2 * points;
      mask_values += points;
    }
  }
}

template <typename scalar_t, typename acc_t>
DCNV3_ALWAYS_INLINE void gather_run(const Dcnv3Geometry& g, const OffsetMaskLayout& layout,
                                    const scalar_t* offset, const scalar_t* mask,
                                    int64_t first_pixel, int64_t pixels, int64_t group_first,
                                    int64_t groups, scalar_t* offsets, acc_t* mask_values) {
  switch (g.points) {
    case 9:  // 3 x 3
      return gather_run_impl<9>(g, layout, offset, mask, first_pixel, pixels, group_first,
                                groups, offsets, mask_values);
    case 8:  // 3 x 3 without its centre
      return gather_run_impl<8>(g, layout, offset, mask, first_pixel, pixels, group_first,
                                groups, offsets, mask_values);
    default:
      return gather_run_impl<0>(g, layout, offset, mask, first_pixel, pixels, group_first,
                                groups, offsets, mask_values);
  }
}

// Output pixels [begin, end) of the flattened (N, H_out, W_out). With kMaskLogits, `mask`
// holds logits and the softmax over each group's points is applied here (float32, DCNv3's
// layout only).
template <typename scalar_t, int GC, int kLanes, bool kMaskLogits>
DCNV3_ALWAYS_INLINE void forward_pixels_impl(const Dcnv3Geometry& g,
                                             const OffsetMaskLayout& layout,
                                             const scalar_t* input, const scalar_t* offset,
                                             const scalar_t* mask, scalar_t* output,
                                             int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(!kMaskLogits || std::is_same_v<scalar_t, float>);
  const int64_t channels = g.channels();
  const int gc = GC > 0 ? GC : g.group_channels;
  const int64_t pixels_out = g.height_out * g.width_out;
  const int64_t pixels_in = g.height_in * g.width_in;
  const int64_t samples = static_cast<int64_t>(g.group) * g.points;  // per pixel
  const int64_t run = std::max<int64_t>(1, kRunSamples / samples);      // pixels
  const bool dense = layout.dense(g.group, g.points);

  auto carve = [&](Scratch& s) {
    struct {
      SamplePlan<acc_t, false> plan;
      acc_t* acc;
      scalar_t* zeros;
      scalar_t* offsets;
      acc_t* mask_values;
    } w{SamplePlan<acc_t, false>(s, run * samples, samples), s.take<acc_t>(gc),
        s.take<scalar_t>(channels), s.take<scalar_t>(dense ? 0 : 2 * run * samples),
        s.take<acc_t>(run * samples)};
    return w;
  };
  Scratch sizing;
  carve(sizing);
  Scratch scratch(Scratch::get(sizing.bytes()));
  auto w = carve(scratch);
  w.plan.init_pattern(g);
  std::fill_n(w.zeros, channels, scalar_t(0));

  for (int64_t first = begin; first < end;) {
    // A run stays within one image.
    const int64_t n = first / pixels_out;
    const int64_t pixels = std::min({run, end - first, (n + 1) * pixels_out - first});
    const int64_t count = pixels * samples;
    const scalar_t* run_offsets = offset + layout.offset_index(first, 0);
    const acc_t* run_mask = nullptr;
    if constexpr (kMaskLogits) {
      const float* logits = mask + layout.mask_index(first, 0);
      const int64_t groups = pixels * g.group;
      if (g.points == 9) {
        group_softmax<9>(logits, groups, w.mask_values);
      } else if (g.points == 8) {
        group_softmax<8>(logits, groups, w.mask_values);
      } else {
        group_softmax_any(logits, groups, g.points, w.mask_values);
      }
      run_mask = w.mask_values;
    } else if (dense) {
      const scalar_t* m = mask + layout.mask_index(first, 0);
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        run_mask = m;
      } else {
        for (int64_t q = 0; q < count; ++q) w.mask_values[q] = static_cast<acc_t>(m[q]);
        run_mask = w.mask_values;
      }
    } else {
      gather_run(g, layout, offset, mask, first, pixels, 0, g.group, w.offsets, w.mask_values);
      run_offsets = w.offsets;
      run_mask = w.mask_values;
    }
    w.plan.locate(g, first, pixels, run_offsets, run_mask, input + n * pixels_in * channels,
                  w.zeros);
    for (int64_t p = 0; p < pixels; ++p) {
      scalar_t* out = output + (first + p) * channels;
      for (int grp = 0; grp < g.group; ++grp) {
        const int64_t channel_start = static_cast<int64_t>(grp) * gc;
        sample_group<scalar_t, GC, kLanes>(w.plan, p * samples + grp * g.points, g.points,
                                           channel_start, gc, w.acc, out + channel_start);
      }
    }
    first += pixels;
  }
}

// Four dot products of N lanes each, reduced together: a few shuffles instead of four
// separate horizontal sums.
template <int N>
DCNV3_ALWAYS_INLINE void sum4(typename FloatVector<N>::type a, typename FloatVector<N>::type b,
                              typename FloatVector<N>::type c, typename FloatVector<N>::type d,
                              float out[4]) {
  using V4 = typename FloatVector<4>::type;
  using V8 = typename FloatVector<8>::type;
  V4 sums;
  if constexpr (N == 16) {
    using V16 = typename FloatVector<16>::type;
    // eight partial sums of a and of b, then of c and d
    const V16 ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21,
                                           22, 23) +
                   __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27,
                                           28, 29, 30, 31);
    const V16 cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21,
                                           22, 23) +
                   __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27,
                                           28, 29, 30, 31);
    // four of each
    const V16 abcd = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19,
                                             24, 25, 26, 27) +
                     __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23,
                                             28, 29, 30, 31);
    const V8 pairs = __builtin_shufflevector(abcd, abcd, 0, 1, 4, 5, 8, 9, 12, 13) +
                     __builtin_shufflevector(abcd, abcd, 2, 3, 6, 7, 10, 11, 14, 15);
    sums = __builtin_shufflevector(pairs, pairs, 0, 2, 4, 6) +
           __builtin_shufflevector(pairs, pairs, 1, 3, 5, 7);
  } else if constexpr (N == 8) {
    const V8 ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
                  __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
    const V8 cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 8, 9, 10, 11) +
                  __builtin_shufflevector(c, d, 4, 5, 6, 7, 12, 13, 14, 15);
    const V8 pairs = __builtin_shufflevector(ab, cd, 0, 1, 4, 5, 8, 9, 12, 13) +
                     __builtin_shufflevector(ab, cd, 2, 3, 6, 7, 10, 11, 14, 15);
    sums = __builtin_shufflevector(pairs, pairs, 0, 2, 4, 6) +
           __builtin_shufflevector(pairs, pairs, 1, 3, 5, 7);
  } else {
    static_assert(N == 4);
    const V4 ab = __builtin_shufflevector(a, b, 0, 1, 4, 5) +
                  __builtin_shufflevector(a, b, 2, 3, 6, 7);
    const V4 cd = __builtin_shufflevector(c, d, 0, 1, 4, 5) +
                  __builtin_shufflevector(c, d, 2, 3, 6, 7);
    sums = __builtin_shufflevector(ab, cd, 0, 2, 4, 6) +
           __builtin_shufflevector(ab, cd, 1, 3, 5, 7);
  }
  std::memcpy(out, &sums, sizeof sums);
}

// One sample's backward channel loop: the four corner dot products with grad_output
// (corner_dot) and the scatter of weight_k * grad_output into the corners' grad_input rows.
template <typename scalar_t, int GC, int kLanes, typename acc_t>
DCNV3_ALWAYS_INLINE void backward_sample(const SamplePlan<acc_t, true>& plan, int64_t q,
                                         const acc_t* __restrict__ go, int gc,
                                         acc_t corner_dot[4]) {
  const int64_t cap = plan.capacity;
  const acc_t w0 = plan.weight[q], w1 = plan.weight[cap + q];
  const acc_t w2 = plan.weight[2 * cap + q], w3 = plan.weight[3 * cap + q];
  const scalar_t* __restrict__ v0 = address<scalar_t>(plan.row[q]);
  const scalar_t* __restrict__ v1 = address<scalar_t>(plan.row[cap + q]);
  const scalar_t* __restrict__ v2 = address<scalar_t>(plan.row[2 * cap + q]);
  const scalar_t* __restrict__ v3 = address<scalar_t>(plan.row[3 * cap + q]);
  // Several outside corners share the scratch row: their (ignored) sums may collide.
  acc_t* __restrict__ g0 = const_cast<acc_t*>(address<acc_t>(plan.grad_row[q]));
  acc_t* __restrict__ g1 = const_cast<acc_t*>(address<acc_t>(plan.grad_row[cap + q]));
  acc_t* __restrict__ g2 = const_cast<acc_t*>(address<acc_t>(plan.grad_row[2 * cap + q]));
  acc_t* __restrict__ g3 = const_cast<acc_t*>(address<acc_t>(plan.grad_row[3 * cap + q]));
  if constexpr (std::is_same_v<scalar_t, float> && GC > 0 && GC % kLanes == 0) {
    using V = typename FloatVector<kLanes>::type;
    V d0 = {}, d1 = {}, d2 = {}, d3 = {};
    for (int c = 0; c < GC; c += kLanes) {
      const V gv = load_floats<kLanes>(go + c);
      d0 += gv * load_floats<kLanes>(v0 + c);
      d1 += gv * load_floats<kLanes>(v1 + c);
      d2 += gv * load_floats<kLanes>(v2 + c);
      d3 += gv * load_floats<kLanes>(v3 + c);
      store_floats<kLanes>(g0 + c, load_floats<kLanes>(g0 + c) + w0 * gv);
      store_floats<kLanes>(g1 + c, load_floats<kLanes>(g1 + c) + w1 * gv);
      store_floats<kLanes>(g2 + c, load_floats<kLanes>(g2 + c) + w2 * gv);
      store_floats<kLanes>(g3 + c, load_floats<kLanes>(g3 + c) + w3 * gv);
    }
    sum4<kLanes>(d0, d1, d2, d3, corner_dot);
  } else {
    acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
    for (int c = 0; c < gc; ++c) {
      const acc_t gv = go[c];
      d0 += gv * static_cast<acc_t>(v0[c]);
      d1 += gv * static_cast<acc_t>(v1[c]);
      d2 += gv * static_cast<acc_t>(v2[c]);
      d3 += gv * static_cast<acc_t>(v3[c]);
      g0[c] += w0 * gv;
      g1[c] += w1 * gv;
      g2[c] += w2 * gv;
      g3[c] += w3 * gv;
    }
    corner_dot[0] = d0;
    corner_dot[1] = d1;
    corner_dot[2] = d2;
    corner_dot[3] = d3;
  }
}

// One (batch, group) slice of the backward, in runs of output pixels. grad_input is
// accumulated in acc_t.
template <typename scalar_t, int GC, int kLanes>
DCNV3_ALWAYS_INLINE void backward_slice_impl(const Dcnv3Geometry& g,
                                             const OffsetMaskLayout& layout,
                                             const scalar_t* grad_output,
                                             const scalar_t* input, const scalar_t* offset,
                                             const scalar_t* mask,
                                             at::opmath_type<scalar_t>* grad_input,
                                             scalar_t* grad_offset, scalar_t* grad_mask,
                                             int64_t n, int grp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = g.channels();
  const int gc = GC > 0 ? GC : g.group_channels;
  const int points = g.points;
  const int64_t pixels_out = g.height_out * g.width_out;
  const int64_t group_start = n * g.height_in * g.width_in * channels +
                              static_cast<int64_t>(grp) * gc;
  const int64_t run = std::max<int64_t>(1, kRunSamples / points);
  const acc_t offset_scale = static_cast<acc_t>(g.offset_scale);

  auto carve = [&](Scratch& s) {
    struct {
      SamplePlan<acc_t, true> plan;
      acc_t* go;
      scalar_t* zeros;
      acc_t* sink;
      scalar_t* offsets;
      acc_t* mask_values;
    } w{SamplePlan<acc_t, true>(s, run * points, points), s.take<acc_t>(gc),
        s.take<scalar_t>(gc), s.take<acc_t>(gc), s.take<scalar_t>(2 * run * points),
        s.take<acc_t>(run * points)};
    return w;
  };
  Scratch sizing;
  carve(sizing);
  Scratch scratch(Scratch::get(sizing.bytes()));
  auto w = carve(scratch);
  w.plan.init_pattern(g);
  std::fill_n(w.zeros, gc, scalar_t(0));

  for (int64_t first = n * pixels_out; first < (n + 1) * pixels_out; first += run) {
    const int64_t pixels = std::min(run, (n + 1) * pixels_out - first);
    gather_run(g, layout, offset, mask, first, pixels, grp, 1, w.offsets, w.mask_values);
    w.plan.locate(g, first, pixels, w.offsets, w.mask_values, input + group_start, w.zeros,
                  grad_input + group_start, w.sink);
    for (int64_t p = 0; p < pixels; ++p) {
      const int64_t pixel = first + p;
      const scalar_t* grad_out = grad_output + pixel * channels + static_cast<int64_t>(grp) * gc;
      const acc_t* go;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        go = grad_out;
      } else {
        for (int c = 0; c < gc; ++c) w.go[c] = static_cast<acc_t>(grad_out[c]);
        go = w.go;
      }
      scalar_t* goff = grad_offset + layout.offset_index(pixel, grp);
      scalar_t* gmsk = grad_mask + layout.mask_index(pixel, grp);
      for (int k = 0; k < points; ++k) {
        const int64_t q = p * points + k;
        acc_t corner_dot[4];
        backward_sample<scalar_t, GC, kLanes>(w.plan, q, go, gc, corner_dot);
        const SampleGradients<acc_t> r = sample_gradients(
            w.plan.frac_y[q], w.plan.frac_x[q], corner_dot, w.mask_values[q], offset_scale);
        const bool used = w.plan.corners[q] != 0u;  // a skipped sample gets zero gradients
        gmsk[k] = static_cast<scalar_t>(used ? r.mask : acc_t(0));
        goff[2 * k] = static_cast<scalar_t>(used ? r.offset_x : acc_t(0));
        goff[2 * k + 1] = static_cast<scalar_t>(used ? r.offset_y : acc_t(0));
      }
    }
  }
}

// group_channels 16 and 32 (every released InternImage and FlashInternImage) get loops of
// fixed length.
template <typename scalar_t, int kLanes, bool kMaskLogits = false>
DCNV3_ALWAYS_INLINE void forward_pixels_any(const Dcnv3Geometry& g,
                                            const OffsetMaskLayout& layout,
                                            const scalar_t* input, const scalar_t* offset,
                                            const scalar_t* mask, scalar_t* output,
                                            int64_t begin, int64_t end) {
  switch (g.group_channels) {
    case 16:
      return forward_pixels_impl<scalar_t, 16, kLanes, kMaskLogits>(g, layout, input, offset, mask,
                                                            output, begin, end);
    case 32:
      return forward_pixels_impl<scalar_t, 32, kLanes, kMaskLogits>(g, layout, input, offset, mask,
                                                            output, begin, end);
    default:
      return forward_pixels_impl<scalar_t, 0, kLanes, kMaskLogits>(g, layout, input, offset, mask,
                                                           output, begin, end);
  }
}

template <typename scalar_t, int kLanes>
DCNV3_ALWAYS_INLINE void backward_slices_any(const Dcnv3Geometry& g,
                                             const OffsetMaskLayout& layout,
                                             const scalar_t* grad_output,
                                             const scalar_t* input, const scalar_t* offset,
                                             const scalar_t* mask,
                                             at::opmath_type<scalar_t>* grad_input,
                                             scalar_t* grad_offset, scalar_t* grad_mask,
                                             int64_t begin, int64_t end) {
  for (int64_t slice = begin; slice < end; ++slice) {
    const int64_t n = slice / g.group;
    const int grp = static_cast<int>(slice % g.group);
    switch (g.group_channels) {
      case 16:
        backward_slice_impl<scalar_t, 16, kLanes>(g, layout, grad_output, input, offset, mask,
                                          grad_input, grad_offset, grad_mask, n, grp);
        break;
      case 32:
        backward_slice_impl<scalar_t, 32, kLanes>(g, layout, grad_output, input, offset, mask,
                                          grad_input, grad_offset, grad_mask, n, grp);
        break;
      default:
        backward_slice_impl<scalar_t, 0, kLanes>(g, layout, grad_output, input, offset, mask,
                                         grad_input, grad_offset, grad_mask, n, grp);
    }
  }
}

// kLanes: float32 lanes of a vector register for the instruction set of the entry point.
#define DCNV3_DEFINE_CPU_ENTRY_POINTS(scalar_t, target, suffix, kLanes)                      \
  target void forward_pixels_##suffix(const Dcnv3Geometry& g, const OffsetMaskLayout& layout, \
                                      const scalar_t* input, const scalar_t* offset,         \
                                      const scalar_t* mask, scalar_t* output, int64_t begin, \
                                      int64_t end) {                                         \
    forward_pixels_any<scalar_t, kLanes>(g, layout, input, offset, mask, output, begin, end); \
  }                                                                                          \
  target void backward_slices_##suffix(                                                      \
      const Dcnv3Geometry& g, const OffsetMaskLayout& layout, const scalar_t* grad_output,   \
      const scalar_t* input, const scalar_t* offset, const scalar_t* mask,                   \
      at::opmath_type<scalar_t>* grad_input, scalar_t* grad_offset, scalar_t* grad_mask,     \
      int64_t begin, int64_t end) {                                                          \
    backward_slices_any<scalar_t, kLanes>(g, layout, grad_output, input, offset, mask,      \
                                          grad_input,                                        \
                                  grad_offset, grad_mask, begin, end);                       \
  }

#ifdef DCNV3_X86_DISPATCH
#define DCNV3_DEFINE_ALL_ENTRY_POINTS(scalar_t)                         \
  DCNV3_DEFINE_CPU_ENTRY_POINTS(scalar_t, , baseline, 4)                \
  DCNV3_DEFINE_CPU_ENTRY_POINTS(scalar_t, DCNV3_TARGET_AVX2, avx2, 8)   \
  DCNV3_DEFINE_CPU_ENTRY_POINTS(scalar_t, DCNV3_TARGET_AVX512, avx512, 16)
#else
#define DCNV3_DEFINE_ALL_ENTRY_POINTS(scalar_t) \
  DCNV3_DEFINE_CPU_ENTRY_POINTS(scalar_t, , baseline, 4)
#endif

DCNV3_DEFINE_ALL_ENTRY_POINTS(float)
DCNV3_DEFINE_ALL_ENTRY_POINTS(double)
DCNV3_DEFINE_ALL_ENTRY_POINTS(c10::BFloat16)
DCNV3_DEFINE_ALL_ENTRY_POINTS(c10::Half)

#define DCNV3_DEFINE_MASK_LOGITS_ENTRY_POINT(target, suffix, kLanes)                          \
  target void forward_pixels_mask_logits_##suffix(const Dcnv3Geometry& g,                    \
                                                  const OffsetMaskLayout& layout,            \
                                                  const float* input, const float* offset,   \
                                                  const float* logits, float* output,        \
                                                  int64_t begin, int64_t end) {              \
    forward_pixels_any<float, kLanes, true>(g, layout, input, offset, logits, output, begin,  \
                                            end);                                            \
  }

DCNV3_DEFINE_MASK_LOGITS_ENTRY_POINT(, baseline, 4)
#ifdef DCNV3_X86_DISPATCH
DCNV3_DEFINE_MASK_LOGITS_ENTRY_POINT(DCNV3_TARGET_AVX2, avx2, 8)
DCNV3_DEFINE_MASK_LOGITS_ENTRY_POINT(DCNV3_TARGET_AVX512, avx512, 16)
#endif

void forward_pixels_mask_logits(const Dcnv3Geometry& g, const OffsetMaskLayout& layout,
                                const float* input, const float* offset, const float* logits,
                                float* output, int64_t begin, int64_t end) {
  DCNV3_RETURN_DISPATCHED(forward_pixels_mask_logits, g, layout, input, offset, logits,
                          output, begin, end);
}

template <typename scalar_t>
void forward_pixels(const Dcnv3Geometry& g, const OffsetMaskLayout& layout,
                    const scalar_t* input, const scalar_t* offset, const scalar_t* mask,
                    scalar_t* output, int64_t begin, int64_t end) {
  DCNV3_RETURN_DISPATCHED(forward_pixels, g, layout, input, offset, mask, output, begin, end);
}

template <typename scalar_t>
void backward_slices(const Dcnv3Geometry& g, const OffsetMaskLayout& layout,
                     const scalar_t* grad_output, const scalar_t* input, const scalar_t* offset,
                     const scalar_t* mask, at::opmath_type<scalar_t>* grad_input,
                     scalar_t* grad_offset, scalar_t* grad_mask, int64_t begin, int64_t end) {
  DCNV3_RETURN_DISPATCHED(backward_slices, g, layout, grad_output, input, offset, mask,
                          grad_input, grad_offset, grad_mask, begin, end);
}

// Enough work per parallel task to amortise the fork and join (a few microseconds, far
// more when another process holds a core): about 16k channel-samples, some 10 us.
constexpr int64_t kTaskChannelSamples = 16384;

int64_t forward_grain(const Dcnv3Geometry& g) {
  const int64_t per_pixel = g.channels() * g.points;
  return std::max<int64_t>(1, kTaskChannelSamples / std::max<int64_t>(1, per_pixel));
}

// The backward's tasks are whole (batch, group) slices.
int64_t backward_grain(const Dcnv3Geometry& g) {
  const int64_t slice = g.height_out * g.width_out * g.points * g.group_channels;
  return std::max<int64_t>(1, kTaskChannelSamples / std::max<int64_t>(1, slice));
}

// The forward of either op: `mask_offset` is where the mask starts in `offset_mask` (the
// mask tensor itself for DCNv3, element 2P of the packed tensor for DCNv4).
at::Tensor forward_cpu(const Dcnv3Geometry& g, const OffsetMaskLayout& layout,
                       const at::Tensor& input_, const at::Tensor& offset_,
                       const at::Tensor& mask_, int64_t mask_offset) {
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.is_same(offset_) ? offset : mask_.contiguous();
  at::Tensor output =
      at::empty({g.batch, g.height_out, g.width_out, g.channels()}, input.options());
  const int64_t pixels = g.batch * g.height_out * g.width_out;
  if (pixels == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "dcn_forward_cpu", [&] {
        const scalar_t* in = input.const_data_ptr<scalar_t>();
        const scalar_t* off = offset.const_data_ptr<scalar_t>();
        const scalar_t* msk = mask.const_data_ptr<scalar_t>() + mask_offset;
        scalar_t* out = output.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, pixels, forward_grain(g), [&](int64_t begin, int64_t end) {
          forward_pixels(g, layout, in, off, msk, out, begin, end);
        });
      });
  return output;
}

// The backward of either op; grad_offset and grad_mask are allocated by the caller (the same
// tensor for DCNv4) and fully written here, except DCNv4's padding channels.
at::Tensor backward_cpu(const Dcnv3Geometry& g, const OffsetMaskLayout& layout,
                        const at::Tensor& grad_output_, const at::Tensor& input_,
                        const at::Tensor& offset, const at::Tensor& mask, int64_t mask_offset,
                        at::Tensor& grad_offset, at::Tensor& grad_mask) {
  const at::Tensor grad_output = grad_output_.contiguous();
  const at::Tensor input = input_.contiguous();
  const auto dtype = input.scalar_type();
  const auto acc_dtype = at::toOpMathType(dtype);
  at::Tensor grad_input = at::zeros(input.sizes(), input.options().dtype(acc_dtype));
  const int64_t slices = g.batch * g.group;
  if (slices > 0 && g.height_out * g.width_out > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "dcn_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gout = grad_output.const_data_ptr<scalar_t>();
      const scalar_t* in = input.const_data_ptr<scalar_t>();
      const scalar_t* off = offset.const_data_ptr<scalar_t>();
      const scalar_t* msk = mask.const_data_ptr<scalar_t>() + mask_offset;
      acc_t* gin = grad_input.mutable_data_ptr<acc_t>();
      scalar_t* goff = grad_offset.mutable_data_ptr<scalar_t>();
      scalar_t* gmsk = grad_mask.mutable_data_ptr<scalar_t>() + mask_offset;
      at::parallel_for(0, slices, backward_grain(g), [&](int64_t begin, int64_t end) {
        backward_slices(g, layout, gout, in, off, msk, gin, goff, gmsk, begin, end);
      });
    });
  }
  if (acc_dtype != dtype) grad_input = grad_input.to(dtype);
  return grad_input;
}

at::Tensor dcnv3_forward_cpu(const at::Tensor& input, const at::Tensor& offset,
                             const at::Tensor& mask, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t group, int64_t group_channels,
                             double offset_scale, bool remove_center) {
  const Dcnv3Geometry g = check_dcnv3_args(input, offset, mask, kernel_size, stride, padding,
                                           dilation, group, group_channels, offset_scale,
                                           remove_center);
  return forward_cpu(g, OffsetMaskLayout::separate(g.group, g.points), input, offset, mask, 0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset_,
    const at::Tensor& mask_, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t group, int64_t group_channels,
    double offset_scale, bool remove_center) {
  const Dcnv3Geometry g = check_dcnv3_args(input, offset_, mask_, kernel_size, stride, padding,
                                           dilation, group, group_channels, offset_scale,
                                           remove_center);
  check_grad_output(grad_output, input, g);
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  at::Tensor grad_offset = at::empty(offset.sizes(), offset.options());
  at::Tensor grad_mask = at::empty(mask.sizes(), mask.options());
  at::Tensor grad_input =
      backward_cpu(g, OffsetMaskLayout::separate(g.group, g.points), grad_output, input, offset,
                   mask, 0, grad_offset, grad_mask);
  return {grad_input, grad_offset, grad_mask};
}

at::Tensor dcnv4_forward_cpu(const at::Tensor& input, const at::Tensor& offset_mask,
                             at::IntArrayRef kernel_size, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t group,
                             int64_t group_channels, double offset_scale, bool remove_center) {
  const Dcnv3Geometry g = check_dcnv4_args(input, offset_mask, kernel_size, stride, padding,
                                           dilation, group, group_channels, offset_scale,
                                           remove_center);
  return forward_cpu(g, OffsetMaskLayout::packed(g.points, offset_mask.size(3)), input,
                     offset_mask, offset_mask, 2 * g.points);
}

std::tuple<at::Tensor, at::Tensor> dcnv4_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset_mask_,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t group, int64_t group_channels, double offset_scale,
    bool remove_center) {
  const Dcnv3Geometry g = check_dcnv4_args(input, offset_mask_, kernel_size, stride, padding,
                                           dilation, group, group_channels, offset_scale,
                                           remove_center);
  check_grad_output(grad_output, input, g, "dcnv4");
  const at::Tensor offset_mask = offset_mask_.contiguous();
  at::Tensor grad = at::empty(offset_mask.sizes(), offset_mask.options());
  const int64_t used = 3 * static_cast<int64_t>(g.group) * g.points;
  if (offset_mask.size(3) > used) grad.narrow(3, used, offset_mask.size(3) - used).zero_();
  at::Tensor grad_input =
      backward_cpu(g, OffsetMaskLayout::packed(g.points, offset_mask.size(3)), grad_output,
                   input, offset_mask, offset_mask, 2 * g.points, grad, grad);
  return {grad_input, grad};
}

// dcnv3 with the mask given as logits: the softmax over each group's points runs inside the
// kernel, saving the separate softmax pass (float32; the backward is dcnv3_backward_cpu plus the
// softmax's, in ops.py).
at::Tensor dcnv3_mask_logits_cpu(const at::Tensor& input_, const at::Tensor& offset_,
                                 const at::Tensor& mask_logits_, at::IntArrayRef kernel_size,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t group,
                                 int64_t group_channels, double offset_scale,
                                 bool remove_center) {
  TORCH_CHECK(input_.scalar_type() == at::kFloat,
              "dcnv3_mask_logits: input must be float32, got ", input_.scalar_type());
  const Dcnv3Geometry g = check_dcnv3_args(input_, offset_, mask_logits_, kernel_size, stride,
                                           padding, dilation, group, group_channels,
                                           offset_scale, remove_center, "mask_logits");
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor logits = mask_logits_.contiguous();
  at::Tensor output =
      at::empty({g.batch, g.height_out, g.width_out, g.channels()}, input.options());
  const int64_t pixels = g.batch * g.height_out * g.width_out;
  if (pixels == 0) return output;
  const OffsetMaskLayout layout = OffsetMaskLayout::separate(g.group, g.points);
  const float* in = input.const_data_ptr<float>();
  const float* off = offset.const_data_ptr<float>();
  const float* lg = logits.const_data_ptr<float>();
  float* out = output.mutable_data_ptr<float>();
  at::parallel_for(0, pixels, forward_grain(g), [&](int64_t begin, int64_t end) {
    forward_pixels_mask_logits(g, layout, in, off, lg, out, begin, end);
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(internimage, CPU, m) {
  m.impl("dcnv3", &dcnv3_forward_cpu);
  m.impl("_dcnv3_backward", &dcnv3_backward_cpu);
  m.impl("dcnv4", &dcnv4_forward_cpu);
  m.impl("_dcnv4_backward", &dcnv4_backward_cpu);
  m.impl("_dcnv3_mask_logits", &dcnv3_mask_logits_cpu);
}

}  // namespace internimage
