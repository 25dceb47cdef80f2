// CPU kernels of the DCNv3 operator: forward and backward, float32 / float64 / bfloat16 /
// float16 (reduced types accumulate in float32).
//
// Parallelism: the forward splits output pixels across threads. The backward gives each
// thread whole (batch, group) slices, so every element of grad_input is accumulated by one
// thread in a fixed order: gradients are bit-identical run to run and for any thread count.
// The channel loops of a group are written for the compiler to vectorise.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "cpu_dispatch.h"
#include "vector_math.h"

namespace internimage {
namespace {

// Channel buffer of one group: a fixed-size array when group_channels is known at compile
// time (GC > 0, the common 16 and 32, kept in registers), else a heap buffer.
template <typename T, int GC>
struct ChannelBuffer {
  T data[GC];
  explicit ChannelBuffer(int) {}
  T* get() { return data; }
};

template <typename T>
struct ChannelBuffer<T, 0> {
  std::vector<T> data;
  explicit ChannelBuffer(int n) : data(n) {}
  T* get() { return data.data(); }
};

constexpr unsigned kAllCorners = 0xFu;

// Where the samples of a run of output pixels land. `locate` fills it in one branch-free pass
// over all the run's samples that the compiler vectorises (one long loop rather than one
// short one per pixel, whose remainders cost as much as its full vectors); the channel loops
// then only read it.
template <typename acc_t>
struct SamplePlan {
  std::vector<acc_t> tap_x, tap_y;  // kernel-grid displacement of each point, unscaled
  std::vector<acc_t> centre_x, centre_y;  // kernel centre of each sample's output pixel
  std::vector<acc_t> frac_x, frac_y;
  std::vector<int64_t> top_left;  // element offset of the top-left corner in the input image
  std::vector<unsigned> corners;   // bit k: corner k inside (kAllCorners: all four); 0: skipped

  // Plans runs of up to `count` points that start at a group boundary.
  SamplePlan(const Dcnv3Geometry& g, int64_t count)
      : tap_x(count), tap_y(count), centre_x(count), centre_y(count), frac_x(count),
        frac_y(count), top_left(count), corners(count) {
    int64_t q = 0;
    while (q < count) {
      for (int i = 0; i < g.kernel_w; ++i) {
        for (int j = 0; j < g.kernel_h; ++j) {
          if (is_removed_centre(g, i, j) || q >= count) continue;
          kernel_tap_displacement(g, i, j, tap_x[q], tap_y[q]);
          ++q;
        }
      }
    }
  }

  // Plans `per_pixel` samples (whole groups) of each of the `pixels` output pixels from flat
  // index `first_pixel` of (N, H_out, W_out) on; `offset` points at the first one's offsets.
  template <typename scalar_t>
  DCNV3_ALWAYS_INLINE void locate(const Dcnv3Geometry& g, const scalar_t* __restrict__ offset,
                                  int64_t per_pixel, int64_t first_pixel, int64_t pixels) {
    for (int64_t p = 0; p < pixels; ++p) {
      const int64_t w_out = (first_pixel + p) % g.width_out;
      const int64_t h_out = ((first_pixel + p) / g.width_out) % g.height_out;
      const acc_t cx = static_cast<acc_t>(w_out * g.stride_w - g.pad_w + g.half_w());
      const acc_t cy = static_cast<acc_t>(h_out * g.stride_h - g.pad_h + g.half_h());
      std::fill_n(centre_x.data() + p * per_pixel, per_pixel, cx);
      std::fill_n(centre_y.data() + p * per_pixel, per_pixel, cy);
    }
    const int64_t count = per_pixel * pixels;
    const acc_t scale = static_cast<acc_t>(g.offset_scale);
    const int64_t height = g.height_in, width = g.width_in, channels = g.channels();
    const acc_t* __restrict__ tx = tap_x.data();
    const acc_t* __restrict__ ty = tap_y.data();
    const acc_t* __restrict__ cxs = centre_x.data();
    const acc_t* __restrict__ cys = centre_y.data();
    acc_t* __restrict__ fx = frac_x.data();
    acc_t* __restrict__ fy = frac_y.data();
    int64_t* __restrict__ tl = top_left.data();
    unsigned* __restrict__ cs = corners.data();
#pragma omp simd
    for (int64_t q = 0; q < count; ++q) {
      const acc_t loc_x = cxs[q] + (tx[q] + static_cast<acc_t>(offset[2 * q])) * scale;
      const acc_t loc_y = cys[q] + (ty[q] + static_cast<acc_t>(offset[2 * q + 1])) * scale;
      int64_t y0, x0;
      cs[q] = sample_corners(loc_y, loc_x, height, width, y0, x0, fy[q], fx[q]);
      tl[q] = (y0 * width + x0) * channels;
    }
  }

  // Corner weights of samples [0, count) as four runs of `count`, corner k at
  // weights[k * count + q]: mask x bilinear weight, 0 for corners outside the image.
  DCNV3_ALWAYS_INLINE void corner_weights(const acc_t* __restrict__ mask, int64_t count,
                                          acc_t* __restrict__ weights) const {
    const acc_t* __restrict__ fx = frac_x.data();
    const acc_t* __restrict__ fy = frac_y.data();
    const unsigned* __restrict__ cs = corners.data();
#pragma omp simd
    for (int64_t q = 0; q < count; ++q) {
      const acc_t hy = acc_t(1) - fy[q], hx = acc_t(1) - fx[q], m = mask[q];
      const unsigned bits = cs[q];
      weights[q] = bits & 1u ? m * (hy * hx) : acc_t(0);
      weights[count + q] = bits & 2u ? m * (hy * fx[q]) : acc_t(0);
      weights[2 * count + q] = bits & 4u ? m * (fy[q] * hx) : acc_t(0);
      weights[3 * count + q] = bits & 8u ? m * (fy[q] * fx[q]) : acc_t(0);
    }
  }

  // Pointers to the four corners of sample q in a group's channels (corners outside the
  // image point at a row of zeros, so the channel loops need no branch).
  template <typename scalar_t>
  DCNV3_ALWAYS_INLINE void corner_rows(int64_t q, const scalar_t* group_input, int64_t width,
                                       int64_t channels, const scalar_t* zeros,
                                       const scalar_t* rows[4]) const {
    const unsigned bits = corners[q];
    const int64_t step[4] = {0, channels, width * channels, (width + 1) * channels};
    // Selected with masks rather than `?:`, which compilers turn into hard-to-predict
    // branches here (corners leave the image at data-dependent points).
    const auto inside_row = reinterpret_cast<std::uintptr_t>(group_input + top_left[q]);
    const auto zero_row = reinterpret_cast<std::uintptr_t>(zeros);
    for (int k = 0; k < 4; ++k) {
      const std::uintptr_t keep = 0u - static_cast<std::uintptr_t>((bits >> k) & 1u);
      const std::uintptr_t row = inside_row + static_cast<std::uintptr_t>(step[k]) *
                                                  sizeof(scalar_t);
      rows[k] = reinterpret_cast<const scalar_t*>((row & keep) | (zero_row & ~keep));
    }
  }
};

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
DCNV3_ALWAYS_INLINE void group_softmax(const float* logits, int group, float* mask) {
  const int64_t samples = static_cast<int64_t>(group) * P;
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
DCNV3_ALWAYS_INLINE void group_softmax_any(const float* logits, int group, int points,
                                           float* mask) {
  const int64_t samples = static_cast<int64_t>(group) * points;
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

// Sums the `points` samples [first, first + points) of one group into `out` (gc channels):
// out = sum over samples and corners of weight * corner row. Corners outside the image have
// weight 0 and read a row of zeros, so there is no branch.
template <typename scalar_t, int GC, typename acc_t>
DCNV3_ALWAYS_INLINE void sample_group(const SamplePlan<acc_t>& plan, const acc_t* weights,
                                      int64_t samples, int64_t first, int points,
                                      const scalar_t* input_g, int64_t width, int64_t channels,
                                      const scalar_t* zeros, int gc, acc_t* acc,
                                      scalar_t* out) {
  const acc_t* w0 = weights;
  const acc_t* w1 = weights + samples;
  const acc_t* w2 = weights + 2 * samples;
  const acc_t* w3 = weights + 3 * samples;
  if constexpr (std::is_same_v<scalar_t, float> && GC > 0 && GC % 16 == 0) {
    constexpr int kBlocks = GC / 16;
    Floatx16 sums[kBlocks] = {};
    const int64_t below = width * channels;
    for (int64_t q = first; q < first + points; ++q) {
      const float* rows[4];
      if (plan.corners[q] == kAllCorners) {  // the common case away from the border
        rows[0] = input_g + plan.top_left[q];
        rows[1] = rows[0] + channels;
        rows[2] = rows[0] + below;
        rows[3] = rows[2] + channels;
      } else {
        plan.corner_rows(q, input_g, width, channels, zeros, rows);
      }
      for (int b = 0; b < kBlocks; ++b) {
        sums[b] += w0[q] * DCNV3_LOAD16(rows[0] + 16 * b) +
                   w1[q] * DCNV3_LOAD16(rows[1] + 16 * b) +
                   w2[q] * DCNV3_LOAD16(rows[2] + 16 * b) +
                   w3[q] * DCNV3_LOAD16(rows[3] + 16 * b);
      }
    }
    std::memcpy(out, sums, sizeof sums);
  } else {
    for (int c = 0; c < gc; ++c) acc[c] = acc_t(0);
    for (int64_t q = first; q < first + points; ++q) {
      const scalar_t* rows[4];
      plan.corner_rows(q, input_g, width, channels, zeros, rows);
      const acc_t a = w0[q], b = w1[q], c2 = w2[q], d = w3[q];
      const scalar_t* __restrict__ v0 = rows[0];
      const scalar_t* __restrict__ v1 = rows[1];
      const scalar_t* __restrict__ v2 = rows[2];
      const scalar_t* __restrict__ v3 = rows[3];
#pragma omp simd
      for (int c = 0; c < gc; ++c) {
        acc[c] += a * static_cast<acc_t>(v0[c]) + b * static_cast<acc_t>(v1[c]) +
                  c2 * static_cast<acc_t>(v2[c]) + d * static_cast<acc_t>(v3[c]);
      }
    }
    for (int c = 0; c < gc; ++c) out[c] = static_cast<scalar_t>(acc[c]);
  }
}

// Output pixels [begin, end) of the flattened (N, H_out, W_out). With kMaskLogits, `mask`
// holds logits and the softmax over each group's points is applied here (float32 only).
template <typename scalar_t, int GC, bool kMaskLogits>
DCNV3_ALWAYS_INLINE void forward_pixels_impl(const Dcnv3Geometry& g, const scalar_t* input,
                                             const scalar_t* offset, const scalar_t* mask,
                                             scalar_t* output, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(!kMaskLogits || std::is_same_v<scalar_t, float>);
  const int64_t channels = g.channels();
  const int gc = GC > 0 ? GC : g.group_channels;
  const int64_t pixels_out = g.height_out * g.width_out;
  const int64_t pixels_in = g.height_in * g.width_in;
  const int64_t samples = static_cast<int64_t>(g.group) * g.points;
  // Pixels planned together: about 512 samples, at least one pixel.
  const int64_t run = std::max<int64_t>(1, 512 / std::max<int64_t>(1, samples));
  ChannelBuffer<acc_t, GC> acc_buffer(gc);
  const std::vector<scalar_t> zeros(gc, scalar_t(0));
  SamplePlan<acc_t> plan(g, run * samples);
  std::vector<acc_t> mask_values(run * samples);
  std::vector<acc_t> weights(4 * run * samples);

  for (int64_t first = begin; first < end; first += run) {
    const int64_t pixels = std::min(run, end - first);
    const int64_t count = pixels * samples;
    const scalar_t* mask_run = mask + first * samples;
    if constexpr (kMaskLogits) {
      const int groups = static_cast<int>(pixels * g.group);
      if (g.points == 9) {
        group_softmax<9>(mask_run, groups, mask_values.data());
      } else if (g.points == 8) {
        group_softmax<8>(mask_run, groups, mask_values.data());
      } else {
        group_softmax_any(mask_run, groups, g.points, mask_values.data());
      }
    } else {
      for (int64_t q = 0; q < count; ++q) mask_values[q] = static_cast<acc_t>(mask_run[q]);
    }
    plan.locate(g, offset + first * samples * 2, samples, first, pixels);
    plan.corner_weights(mask_values.data(), count, weights.data());
    for (int64_t p = 0; p < pixels; ++p) {
      const int64_t pix = first + p;
      const scalar_t* input_n = input + (pix / pixels_out) * pixels_in * channels;
      for (int grp = 0; grp < g.group; ++grp) {
        sample_group<scalar_t, GC>(plan, weights.data(), count,
                                   p * samples + static_cast<int64_t>(grp) * g.points, g.points,
                                   input_n + static_cast<int64_t>(grp) * gc, g.width_in,
                                   channels, zeros.data(), gc, acc_buffer.get(),
                                   output + pix * channels + static_cast<int64_t>(grp) * gc);
      }
    }
  }
}

// One (batch, group) slice of the backward. grad_input is accumulated in acc_t.
// Per sample, one pass over the channels yields the three sums the gradients need
// (value, d value/dx, d value/dy against grad_output) and scatters into grad_input; corners
// outside the image read a row of zeros and scatter into a scratch row that is never read.
template <typename scalar_t, int GC>
DCNV3_ALWAYS_INLINE void backward_slice_impl(const Dcnv3Geometry& g,
                                             const scalar_t* grad_output,
                                             const scalar_t* input, const scalar_t* offset,
                                             const scalar_t* mask,
                                             at::opmath_type<scalar_t>* grad_input,
                                             scalar_t* grad_offset, scalar_t* grad_mask,
                                             int64_t n, int grp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = g.channels();
  const int gc = GC > 0 ? GC : g.group_channels;
  const int64_t pixels_in = g.height_in * g.width_in;
  const int64_t group_start = static_cast<int64_t>(grp) * gc;
  const scalar_t* input_g = input + n * pixels_in * channels + group_start;
  acc_t* grad_input_g = grad_input + n * pixels_in * channels + group_start;
  const acc_t offset_scale = static_cast<acc_t>(g.offset_scale);
  ChannelBuffer<acc_t, GC> gout_buffer(gc);
  acc_t* __restrict__ go = gout_buffer.get();
  const std::vector<scalar_t> zeros(gc, scalar_t(0));
  std::vector<acc_t> sink(gc);
  SamplePlan<acc_t> plan(g, g.points);

  for (int64_t h_out = 0; h_out < g.height_out; ++h_out) {
    for (int64_t w_out = 0; w_out < g.width_out; ++w_out) {
      const int64_t pix = (n * g.height_out + h_out) * g.width_out + w_out;
      const scalar_t* grad_out_pix = grad_output + pix * channels + group_start;
      for (int c = 0; c < gc; ++c) go[c] = static_cast<acc_t>(grad_out_pix[c]);
      const int64_t first = (pix * g.group + grp) * g.points;
      plan.locate(g, offset + first * 2, g.points, pix, 1);
      for (int64_t q = 0; q < g.points; ++q) {
        const int64_t point = first + q;
        const unsigned bits = plan.corners[q];
        if (bits == 0u) {
          grad_mask[point] = scalar_t(0);
          grad_offset[2 * point] = scalar_t(0);
          grad_offset[2 * point + 1] = scalar_t(0);
          continue;
        }
        acc_t w[4], d_dx[4], d_dy[4];
        bilinear_weights(plan.frac_y[q], plan.frac_x[q], w);
        bilinear_weight_gradients(plan.frac_y[q], plan.frac_x[q], d_dx, d_dy);
        const acc_t m = static_cast<acc_t>(mask[point]);
        const scalar_t* rows[4];
        plan.corner_rows(q, input_g, g.width_in, channels, zeros.data(), rows);
        acc_t* grad_rows[4];
        for (int k = 0; k < 4; ++k) {
          grad_rows[k] = (bits >> k) & 1u ? grad_input_g + (rows[k] - input_g) : sink.data();
        }
        const scalar_t* __restrict__ v0 = rows[0];
        const scalar_t* __restrict__ v1 = rows[1];
        const scalar_t* __restrict__ v2 = rows[2];
        const scalar_t* __restrict__ v3 = rows[3];
        acc_t* __restrict__ gi0 = grad_rows[0];
        acc_t* __restrict__ gi1 = grad_rows[1];
        acc_t* __restrict__ gi2 = grad_rows[2];
        acc_t* __restrict__ gi3 = grad_rows[3];
        const acc_t mw0 = m * w[0], mw1 = m * w[1], mw2 = m * w[2], mw3 = m * w[3];
        acc_t sum_value = 0, sum_dx = 0, sum_dy = 0;
#pragma omp simd reduction(+ : sum_value, sum_dx, sum_dy)
        for (int c = 0; c < gc; ++c) {
          const acc_t a0 = static_cast<acc_t>(v0[c]), a1 = static_cast<acc_t>(v1[c]);
          const acc_t a2 = static_cast<acc_t>(v2[c]), a3 = static_cast<acc_t>(v3[c]);
          const acc_t gc_ = go[c];
          sum_value += gc_ * (w[0] * a0 + w[1] * a1 + w[2] * a2 + w[3] * a3);
          sum_dx += gc_ * (d_dx[0] * a0 + d_dx[1] * a1 + d_dx[2] * a2 + d_dx[3] * a3);
          sum_dy += gc_ * (d_dy[0] * a0 + d_dy[1] * a1 + d_dy[2] * a2 + d_dy[3] * a3);
          gi0[c] += mw0 * gc_;
          gi1[c] += mw1 * gc_;
          gi2[c] += mw2 * gc_;
          gi3[c] += mw3 * gc_;
        }
        grad_mask[point] = static_cast<scalar_t>(sum_value);
        grad_offset[2 * point] = static_cast<scalar_t>(offset_scale * m * sum_dx);
        grad_offset[2 * point + 1] = static_cast<scalar_t>(offset_scale * m * sum_dy);
      }
    }
  }
}

// group_channels 16 and 32 (every released InternImage) get loops of fixed length.
template <typename scalar_t, bool kMaskLogits = false>
DCNV3_ALWAYS_INLINE void forward_pixels_any(const Dcnv3Geometry& g, const scalar_t* input,
                                            const scalar_t* offset, const scalar_t* mask,
                                            scalar_t* output, int64_t begin, int64_t end) {
  switch (g.group_channels) {
    case 16:
      return forward_pixels_impl<scalar_t, 16, kMaskLogits>(g, input, offset, mask, output,
                                                            begin, end);
    case 32:
      return forward_pixels_impl<scalar_t, 32, kMaskLogits>(g, input, offset, mask, output,
                                                            begin, end);
    default:
      return forward_pixels_impl<scalar_t, 0, kMaskLogits>(g, input, offset, mask, output,
                                                           begin, end);
  }
}

template <typename scalar_t>
DCNV3_ALWAYS_INLINE void backward_slices_any(const Dcnv3Geometry& g,
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
        backward_slice_impl<scalar_t, 16>(g, grad_output, input, offset, mask, grad_input,
                                          grad_offset, grad_mask, n, grp);
        break;
      case 32:
        backward_slice_impl<scalar_t, 32>(g, grad_output, input, offset, mask, grad_input,
                                          grad_offset, grad_mask, n, grp);
        break;
      default:
        backward_slice_impl<scalar_t, 0>(g, grad_output, input, offset, mask, grad_input,
                                         grad_offset, grad_mask, n, grp);
    }
  }
}

#define DCNV3_DEFINE_CPU_ENTRY_POINTS(scalar_t, target, suffix)                              \
  target void forward_pixels_##suffix(const Dcnv3Geometry& g, const scalar_t* input,         \
                                      const scalar_t* offset, const scalar_t* mask,          \
                                      scalar_t* output, int64_t begin, int64_t end) {        \
    forward_pixels_any<scalar_t>(g, input, offset, mask, output, begin, end);                \
  }                                                                                          \
  target void backward_slices_##suffix(                                                      \
      const Dcnv3Geometry& g, const scalar_t* grad_output, const scalar_t* input,            \
      const scalar_t* offset, const scalar_t* mask, at::opmath_type<scalar_t>* grad_input,   \
      scalar_t* grad_offset, scalar_t* grad_mask, int64_t begin, int64_t end) {              \
    backward_slices_any<scalar_t>(g, grad_output, input, offset, mask, grad_input,           \
                                  grad_offset, grad_mask, begin, end);                       \
  }

#ifdef DCNV3_X86_DISPATCH
#define DCNV3_DEFINE_ALL_ENTRY_POINTS(scalar_t)                      \
  DCNV3_DEFINE_CPU_ENTRY_POINTS(scalar_t, , baseline)                \
  DCNV3_DEFINE_CPU_ENTRY_POINTS(scalar_t, DCNV3_TARGET_AVX2, avx2)   \
  DCNV3_DEFINE_CPU_ENTRY_POINTS(scalar_t, DCNV3_TARGET_AVX512, avx512)
#else
#define DCNV3_DEFINE_ALL_ENTRY_POINTS(scalar_t) DCNV3_DEFINE_CPU_ENTRY_POINTS(scalar_t, , baseline)
#endif

DCNV3_DEFINE_ALL_ENTRY_POINTS(float)
DCNV3_DEFINE_ALL_ENTRY_POINTS(double)
DCNV3_DEFINE_ALL_ENTRY_POINTS(c10::BFloat16)
DCNV3_DEFINE_ALL_ENTRY_POINTS(c10::Half)

#define DCNV3_DEFINE_MASK_LOGITS_ENTRY_POINT(target, suffix)                                  \
  target void forward_pixels_mask_logits_##suffix(const Dcnv3Geometry& g, const float* input, \
                                                  const float* offset, const float* logits,  \
                                                  float* output, int64_t begin,              \
                                                  int64_t end) {                             \
    forward_pixels_any<float, true>(g, input, offset, logits, output, begin, end);          \
  }

DCNV3_DEFINE_MASK_LOGITS_ENTRY_POINT(, baseline)
#ifdef DCNV3_X86_DISPATCH
DCNV3_DEFINE_MASK_LOGITS_ENTRY_POINT(DCNV3_TARGET_AVX2, avx2)
DCNV3_DEFINE_MASK_LOGITS_ENTRY_POINT(DCNV3_TARGET_AVX512, avx512)
#endif

void forward_pixels_mask_logits(const Dcnv3Geometry& g, const float* input,
                                const float* offset, const float* logits, float* output,
                                int64_t begin, int64_t end) {
  DCNV3_RETURN_DISPATCHED(forward_pixels_mask_logits, g, input, offset, logits, output, begin,
                          end);
}

template <typename scalar_t>
void forward_pixels(const Dcnv3Geometry& g, const scalar_t* input, const scalar_t* offset,
                    const scalar_t* mask, scalar_t* output, int64_t begin, int64_t end) {
  DCNV3_RETURN_DISPATCHED(forward_pixels, g, input, offset, mask, output, begin, end);
}

template <typename scalar_t>
void backward_slices(const Dcnv3Geometry& g, const scalar_t* grad_output, const scalar_t* input,
                     const scalar_t* offset, const scalar_t* mask,
                     at::opmath_type<scalar_t>* grad_input, scalar_t* grad_offset,
                     scalar_t* grad_mask, int64_t begin, int64_t end) {
  DCNV3_RETURN_DISPATCHED(backward_slices, g, grad_output, input, offset, mask, grad_input,
                          grad_offset, grad_mask, begin, end);
}


// Enough work per parallel task to amortise the fork: about 4k channel-samples.
int64_t forward_grain(const Dcnv3Geometry& g) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.channels() * g.points));
}

at::Tensor dcnv3_forward_cpu(const at::Tensor& input_, const at::Tensor& offset_,
                             const at::Tensor& mask_, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t group, int64_t group_channels,
                             double offset_scale, bool remove_center) {
  const Dcnv3Geometry g = check_dcnv3_args(input_, offset_, mask_, kernel_size, stride, padding,
                                           dilation, group, group_channels, offset_scale,
                                           remove_center);
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  at::Tensor output =
      at::empty({g.batch, g.height_out, g.width_out, g.channels()}, input.options());
  const int64_t pixels = g.batch * g.height_out * g.width_out;
  if (pixels == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "dcnv3_forward_cpu", [&] {
        const scalar_t* in = input.const_data_ptr<scalar_t>();
        const scalar_t* off = offset.const_data_ptr<scalar_t>();
        const scalar_t* msk = mask.const_data_ptr<scalar_t>();
        scalar_t* out = output.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, pixels, forward_grain(g), [&](int64_t begin, int64_t end) {
          forward_pixels(g, in, off, msk, out, begin, end);
        });
      });
  return output;
}

// dcnv3 with the mask given as logits: the softmax over each group's points runs inside the
// kernel, saving the separate softmax pass (forward only, float32, for inference).
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
  const float* in = input.const_data_ptr<float>();
  const float* off = offset.const_data_ptr<float>();
  const float* lg = logits.const_data_ptr<float>();
  float* out = output.mutable_data_ptr<float>();
  at::parallel_for(0, pixels, forward_grain(g), [&](int64_t begin, int64_t end) {
    forward_pixels_mask_logits(g, in, off, lg, out, begin, end);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& offset_,
    const at::Tensor& mask_, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t group, int64_t group_channels,
    double offset_scale, bool remove_center) {
  const Dcnv3Geometry g = check_dcnv3_args(input_, offset_, mask_, kernel_size, stride, padding,
                                           dilation, group, group_channels, offset_scale,
                                           remove_center);
  check_grad_output(grad_output_, input_, g);
  const at::Tensor grad_output = grad_output_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  const auto dtype = input.scalar_type();
  const auto acc_dtype = at::toOpMathType(dtype);
  at::Tensor grad_input = at::zeros(input.sizes(), input.options().dtype(acc_dtype));
  at::Tensor grad_offset = at::empty(offset.sizes(), offset.options());
  at::Tensor grad_mask = at::empty(mask.sizes(), mask.options());
  const int64_t slices = g.batch * g.group;
  if (slices > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "dcnv3_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gout = grad_output.const_data_ptr<scalar_t>();
      const scalar_t* in = input.const_data_ptr<scalar_t>();
      const scalar_t* off = offset.const_data_ptr<scalar_t>();
      const scalar_t* msk = mask.const_data_ptr<scalar_t>();
      acc_t* gin = grad_input.mutable_data_ptr<acc_t>();
      scalar_t* goff = grad_offset.mutable_data_ptr<scalar_t>();
      scalar_t* gmsk = grad_mask.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
        backward_slices(g, gout, in, off, msk, gin, goff, gmsk, begin, end);
      });
    });
  }
  if (acc_dtype != dtype) grad_input = grad_input.to(dtype);
  return {grad_input, grad_offset, grad_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(internimage, CPU, m) {
  m.impl("dcnv3", &dcnv3_forward_cpu);
  m.impl("_dcnv3_mask_logits", &dcnv3_mask_logits_cpu);
  m.impl("_dcnv3_backward", &dcnv3_backward_cpu);
}

}  // namespace internimage
