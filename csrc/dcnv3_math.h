// Per-sample math of the DCNv3 and DCNv4 operators, shared by the CPU and CUDA kernels.
//
// Layouts (all channels-last):
//   input  (N, H_in, W_in, G * gc)
//   output (N, H_out, W_out, G * gc)
//   DCNv3: offset (N, H_out, W_out, G * P * 2), ordered [group][point][x, y]
//          mask   (N, H_out, W_out, G * P),     ordered [group][point]
//   DCNv4: offset_mask (N, H_out, W_out, >= 3 * G * P): group g owns [3Pg, 3Pg + 3P), its
//          2P offsets ([point][x, y]) then its P mask values; later channels are padding.
// OffsetMaskLayout turns both into one addressing scheme, so every kernel is written once.
// Points are enumerated kernel-width index outer, kernel-height index inner
// (p = i * kernel_h + j); with remove_center the centre tap is skipped and
// later points move down by one.
//
// Coordinates are pixel indices (pixel centres at integers). A sample counts
// only when -1 < y < H_in and -1 < x < W_in; inside that band a bilinear corner
// outside the image reads as zero. NaN or infinite locations fail the test and
// are skipped, so they contribute zero to the output and to every gradient.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DCNV3_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
// Forced so that the helpers inline into the CPU kernels' AVX2/AVX-512 versions too.
#define DCNV3_HOST_DEVICE inline __attribute__((always_inline))
#else
#define DCNV3_HOST_DEVICE inline
#endif

namespace internimage {

// floor() for |v| < 2^31 (callers clamp first): truncate, then step down for negative
// non-integers. Unlike std::floor it vectorises without -ffast-math.
template <typename T>
DCNV3_HOST_DEVICE int32_t floor_to_int(T v) {
  const int32_t truncated = static_cast<int32_t>(v);
  return truncated - static_cast<int32_t>(static_cast<T>(truncated) > v);
}

// Geometry of one DCNv3 call; every kernel derives its indexing from this.
struct Dcnv3Geometry {
  int64_t batch;
  int64_t height_in, width_in;
  int64_t height_out, width_out;
  int kernel_h, kernel_w;
  int stride_h, stride_w;
  int pad_h, pad_w;
  int dilation_h, dilation_w;
  int group, group_channels;
  int points;  // kernel_h * kernel_w - remove_center
  bool remove_center;
  double offset_scale;

  DCNV3_HOST_DEVICE int64_t channels() const {
    return static_cast<int64_t>(group) * group_channels;
  }
  // Half extent of the dilated kernel (floor), as in the original.
  DCNV3_HOST_DEVICE int half_h() const { return (dilation_h * (kernel_h - 1)) / 2; }
  DCNV3_HOST_DEVICE int half_w() const { return (dilation_w * (kernel_w - 1)) / 2; }
};

// Output size along one axis; non-positive means the arguments admit no output.
DCNV3_HOST_DEVICE int64_t dcnv3_output_size(int64_t in, int kernel, int stride, int pad,
                                             int dilation) {
  const int64_t span = static_cast<int64_t>(dilation) * (kernel - 1) + 1;
  const int64_t padded = in + 2 * static_cast<int64_t>(pad) - span;
  // Floor division that stays correct for negative numerators.
  const int64_t q = padded >= 0 ? padded / stride : -((-padded + stride - 1) / stride);
  return q + 1;
}

// The index type follows the pixel argument alone.
template <typename T>
struct NonDeduced {
  using type = T;
};

// Where the offsets and mask values of (output pixel, group) live, as element indices from the
// offset and mask base pointers (flat output pixel = (n * H_out + h_out) * W_out + w_out).
// Within a group the 2P offsets ((x, y) per point) and the P mask values are contiguous in
// both layouts; gradient tensors share their input's layout.
struct OffsetMaskLayout {
  int64_t offset_pixel_stride, offset_group_stride;
  int64_t mask_pixel_stride, mask_group_stride;

  // DCNv3: separate offset (.., G * P * 2) and mask (.., G * P) tensors.
  static OffsetMaskLayout separate(int group, int points) {
    const int64_t p = points;
    return {group * 2 * p, 2 * p, group * p, p};
  }
  // DCNv4: one (.., channels) tensor, the mask pointer at its element 2P.
  static OffsetMaskLayout packed(int points, int64_t channels) {
    const int64_t block = 3 * static_cast<int64_t>(points);
    return {channels, block, channels, block};
  }
  // In the caller's index type (CUDA kernels index in int32 when everything fits).
  template <typename I>
  DCNV3_HOST_DEVICE I offset_index(I pixel, typename NonDeduced<I>::type group) const {
    return pixel * static_cast<I>(offset_pixel_stride) +
           group * static_cast<I>(offset_group_stride);
  }
  template <typename I>
  DCNV3_HOST_DEVICE I mask_index(I pixel, typename NonDeduced<I>::type group) const {
    return pixel * static_cast<I>(mask_pixel_stride) +
           group * static_cast<I>(mask_group_stride);
  }
  // Whether the samples of consecutive (pixel, group) pairs follow each other with no gap
  // (DCNv3), so that a run of them can be read in place.
  bool dense(int group, int points) const {
    return offset_group_stride == 2 * points && mask_group_stride == points &&
           offset_pixel_stride == group * offset_group_stride &&
           mask_pixel_stride == group * mask_group_stride;
  }
};

// Displacement (in unscaled pixels) of kernel tap (i along width, j along height)
// from the kernel centre.
template <typename T>
DCNV3_HOST_DEVICE void kernel_tap_displacement(const Dcnv3Geometry& g, int i, int j, T& dx,
                                               T& dy) {
  dx = static_cast<T>(i * g.dilation_w - g.half_w());
  dy = static_cast<T>(j * g.dilation_h - g.half_h());
}

// Whether tap (i, j) is the removed centre tap.
DCNV3_HOST_DEVICE bool is_removed_centre(const Dcnv3Geometry& g, int i, int j) {
  return g.remove_center && i == g.kernel_w / 2 && j == g.kernel_h / 2;
}

// Centre of the kernel window of output pixel (h_out, w_out), in input pixel coordinates.
template <typename T>
DCNV3_HOST_DEVICE void kernel_centre(const Dcnv3Geometry& g, int64_t h_out, int64_t w_out,
                                     T& centre_x, T& centre_y) {
  centre_x = static_cast<T>(w_out * g.stride_w - g.pad_w + g.half_w());
  centre_y = static_cast<T>(h_out * g.stride_h - g.pad_h + g.half_h());
}

// One coordinate of a sampling location: offset_scale scales the learned offset and the
// regular kernel grid (the tap's displacement), not the centre.
template <typename T>
DCNV3_HOST_DEVICE T sample_coordinate(T centre, T tap, T offset, T offset_scale) {
  return centre + (tap + offset) * offset_scale;
}

// Sampling location of tap (i, j) for output pixel (h_out, w_out), given the learned
// offset pair (off_x, off_y).
template <typename T>
DCNV3_HOST_DEVICE void sampling_location(const Dcnv3Geometry& g, int64_t h_out, int64_t w_out,
                                         int i, int j, T off_x, T off_y, T& loc_x, T& loc_y) {
  T dx, dy, centre_x, centre_y;
  kernel_tap_displacement(g, i, j, dx, dy);
  kernel_centre(g, h_out, w_out, centre_x, centre_y);
  const T scale = static_cast<T>(g.offset_scale);
  loc_x = sample_coordinate(centre_x, dx, off_x, scale);
  loc_y = sample_coordinate(centre_y, dy, off_y, scale);
}

// Corners of one sample, branch-free (so a loop over samples vectorises): returns a bit set
// with bit k set when corner k lies inside the image, and 0 when the whole sample is skipped.
// Corner k: 0 = (y0, x0), 1 = (y0, x0 + 1), 2 = (y0 + 1, x0), 3 = (y0 + 1, x0 + 1).
// y0/x0 are the top-left corner, frac_y/frac_x = loc - floor(loc).
template <typename T>
DCNV3_HOST_DEVICE unsigned sample_corners(T loc_y, T loc_x, int64_t height, int64_t width,
                                          int32_t& y0, int32_t& x0, T& frac_y, T& frac_x) {
  // Written so that NaN fails the test; bitwise & keeps the function free of branches.
  const bool inside = (loc_y > static_cast<T>(-1)) & (loc_x > static_cast<T>(-1)) &
                      (loc_y < static_cast<T>(height)) & (loc_x < static_cast<T>(width));
  // Clamp (NaN goes to -2) so the integer conversions below stay defined for skipped samples.
  loc_y = loc_y > static_cast<T>(-2) ? loc_y : static_cast<T>(-2);
  loc_x = loc_x > static_cast<T>(-2) ? loc_x : static_cast<T>(-2);
  loc_y = loc_y < static_cast<T>(height) ? loc_y : static_cast<T>(height);
  loc_x = loc_x < static_cast<T>(width) ? loc_x : static_cast<T>(width);
  y0 = floor_to_int(loc_y);
  x0 = floor_to_int(loc_x);
  frac_y = loc_y - static_cast<T>(y0);
  frac_x = loc_x - static_cast<T>(x0);
  // In 32 bits (sides are at most 2^30, see checks.cpp): vectorised, the lanes then match
  // float32's.
  const int32_t last_y = static_cast<int32_t>(height) - 1;
  const int32_t last_x = static_cast<int32_t>(width) - 1;
  const unsigned y0_in = y0 >= 0, y1_in = y0 < last_y;
  const unsigned x0_in = x0 >= 0, x1_in = x0 < last_x;
  const unsigned bits =
      (y0_in & x0_in) | (y0_in & x1_in) << 1 | (y1_in & x0_in) << 2 | (y1_in & x1_in) << 3;
  return bits & (0u - static_cast<unsigned>(inside));
}

// One value per bilinear corner, in sample_corners' order. Returned by value: compilers keep
// it in registers, and vectorise callers' loops over samples (an array written through a
// pointer would stay in memory and stop them).
template <typename T>
struct CornerValues {
  T v[4];
};

// Bilinear weights of the four corners.
template <typename T>
DCNV3_HOST_DEVICE CornerValues<T> bilinear_weights(T frac_y, T frac_x) {
  const T hy = static_cast<T>(1) - frac_y, hx = static_cast<T>(1) - frac_x;
  return {{hy * hx, hy * frac_x, frac_y * hx, frac_y * frac_x}};
}

// The weights of a sample's four corners in the output: mask x bilinear weight for a corner
// inside the image (bit k of `corners`, from sample_corners), exactly 0 for one outside, so a
// corner that reads as zero adds nothing even when the mask is infinite. Branch-free.
template <typename T>
DCNV3_HOST_DEVICE CornerValues<T> masked_corner_weights(unsigned corners, T mask, T frac_y,
                                                        T frac_x) {
  const CornerValues<T> w = bilinear_weights(frac_y, frac_x);
  const T zero = static_cast<T>(0);
  return {{(corners & 1u) ? mask * w.v[0] : zero, (corners & 2u) ? mask * w.v[1] : zero,
           (corners & 4u) ? mask * w.v[2] : zero, (corners & 8u) ? mask * w.v[3] : zero}};
}

// Where the four bilinear corners of one sample are, for kernels that handle one sample at
// a time (CUDA): pixel[k] is the flat pixel index y * W_in + x of corner k, or -1 for a corner
// outside the image (which reads as zero and receives no gradient).
template <typename T>
struct BilinearSample {
  int64_t pixel[4];
  unsigned corners;  // as returned by sample_corners
  T frac_y, frac_x;  // loc - floor(loc)
};

// Fills `s` and returns true when the sample at (loc_y, loc_x) contributes at all.
template <typename T>
DCNV3_HOST_DEVICE bool bilinear_sample(T loc_y, T loc_x, int64_t height, int64_t width,
                                       BilinearSample<T>& s) {
  int32_t y0, x0;
  s.corners = sample_corners(loc_y, loc_x, height, width, y0, x0, s.frac_y, s.frac_x);
  const int64_t base = static_cast<int64_t>(y0) * width + x0;
  s.pixel[0] = (s.corners & 1u) ? base : -1;
  s.pixel[1] = (s.corners & 2u) ? base + 1 : -1;
  s.pixel[2] = (s.corners & 4u) ? base + width : -1;
  s.pixel[3] = (s.corners & 8u) ? base + width + 1 : -1;
  return s.corners != 0u;
}

// Gradients of one sample at fractional position (frac_y, frac_x), given the four corner dot
// products corner_dot[k] = sum_c grad_out[c] * value_k[c] (zero for corners outside):
//   d(loss)/d(mask)  = sum_c grad_out[c] * bilinear[c]
//   d(loss)/d(loc_x) = mask * sum_c grad_out[c] * d bilinear[c] / dx, same for y.
// The offset gradients are the location gradients times offset_scale. Callers give a skipped
// sample (sample_corners == 0) zero gradients instead.
template <typename T>
struct SampleGradients {
  T mask;
  T offset_x, offset_y;
};

template <typename T>
DCNV3_HOST_DEVICE SampleGradients<T> sample_gradients(T frac_y, T frac_x, const T corner_dot[4],
                                                      T mask, T offset_scale) {
  const T ly = frac_y, lx = frac_x;
  const T hy = static_cast<T>(1) - ly, hx = static_cast<T>(1) - lx;
  const CornerValues<T> w = bilinear_weights(frac_y, frac_x);
  SampleGradients<T> r;
  r.mask = w.v[0] * corner_dot[0] + w.v[1] * corner_dot[1] + w.v[2] * corner_dot[2] +
           w.v[3] * corner_dot[3];
  const T d_dx = hy * (corner_dot[1] - corner_dot[0]) + ly * (corner_dot[3] - corner_dot[2]);
  const T d_dy = hx * (corner_dot[2] - corner_dot[0]) + lx * (corner_dot[3] - corner_dot[1]);
  r.offset_x = offset_scale * mask * d_dx;
  r.offset_y = offset_scale * mask * d_dy;
  return r;
}

}  // namespace internimage
