// Per-sample math of the DCNv3 operator, shared by the CPU and CUDA kernels.
//
// Layouts (all channels-last):
//   input  (N, H_in, W_in, G * gc)
//   offset (N, H_out, W_out, G * P * 2), ordered [group][point][x, y]
//   mask   (N, H_out, W_out, G * P),     ordered [group][point]
//   output (N, H_out, W_out, G * gc)
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

// Sampling location of tap (i, j) for output pixel (h_out, w_out), given the learned
// offset pair (off_x, off_y). offset_scale scales the learned offset and the regular
// kernel grid, not the centre.
template <typename T>
DCNV3_HOST_DEVICE void sampling_location(const Dcnv3Geometry& g, int64_t h_out, int64_t w_out,
                                         int i, int j, T off_x, T off_y, T& loc_x, T& loc_y) {
  T dx, dy;
  kernel_tap_displacement(g, i, j, dx, dy);
  const T scale = static_cast<T>(g.offset_scale);
  const T centre_x = static_cast<T>(w_out * g.stride_w - g.pad_w + g.half_w());
  const T centre_y = static_cast<T>(h_out * g.stride_h - g.pad_h + g.half_h());
  loc_x = centre_x + (dx + off_x) * scale;
  loc_y = centre_y + (dy + off_y) * scale;
}

// Corners of one sample, branch-free (so a loop over samples vectorises): returns a bit set
// with bit k set when corner k lies inside the image, and 0 when the whole sample is skipped.
// Corner k: 0 = (y0, x0), 1 = (y0, x0 + 1), 2 = (y0 + 1, x0), 3 = (y0 + 1, x0 + 1).
// y0/x0 are the top-left corner, frac_y/frac_x = loc - floor(loc).
template <typename T>
DCNV3_HOST_DEVICE unsigned sample_corners(T loc_y, T loc_x, int64_t height, int64_t width,
                                          int64_t& y0, int64_t& x0, T& frac_y, T& frac_x) {
  // Written so that NaN fails the test; bitwise & keeps the function free of branches.
  const bool inside = (loc_y > static_cast<T>(-1)) & (loc_x > static_cast<T>(-1)) &
                      (loc_y < static_cast<T>(height)) & (loc_x < static_cast<T>(width));
  // Clamp (NaN goes to -2) so the integer conversions below stay defined for skipped samples.
  loc_y = loc_y > static_cast<T>(-2) ? loc_y : static_cast<T>(-2);
  loc_x = loc_x > static_cast<T>(-2) ? loc_x : static_cast<T>(-2);
  loc_y = loc_y < static_cast<T>(height) ? loc_y : static_cast<T>(height);
  loc_x = loc_x < static_cast<T>(width) ? loc_x : static_cast<T>(width);
  const int32_t y_floor = floor_to_int(loc_y);
  const int32_t x_floor = floor_to_int(loc_x);
  y0 = y_floor;
  x0 = x_floor;
  frac_y = loc_y - static_cast<T>(y_floor);
  frac_x = loc_x - static_cast<T>(x_floor);
  const unsigned y0_in = y0 >= 0, y1_in = y0 + 1 < height;
  const unsigned x0_in = x0 >= 0, x1_in = x0 + 1 < width;
  const unsigned bits =
      (y0_in & x0_in) | (y0_in & x1_in) << 1 | (y1_in & x0_in) << 2 | (y1_in & x1_in) << 3;
  return bits & (0u - static_cast<unsigned>(inside));
}

// Bilinear weights of the four corners (same order as sample_corners).
template <typename T>
DCNV3_HOST_DEVICE void bilinear_weights(T frac_y, T frac_x, T weight[4]) {
  const T hy = static_cast<T>(1) - frac_y, hx = static_cast<T>(1) - frac_x;
  weight[0] = hy * hx;
  weight[1] = hy * frac_x;
  weight[2] = frac_y * hx;
  weight[3] = frac_y * frac_x;
}

// Derivatives of the four bilinear weights with respect to the sample's x and y location,
// so that d(bilinear)/dx = sum_k d_dx[k] * value_k (same corner order as sample_corners).
template <typename T>
DCNV3_HOST_DEVICE void bilinear_weight_gradients(T frac_y, T frac_x, T d_dx[4], T d_dy[4]) {
  const T hy = static_cast<T>(1) - frac_y, hx = static_cast<T>(1) - frac_x;
  d_dx[0] = -hy;
  d_dx[1] = hy;
  d_dx[2] = -frac_y;
  d_dx[3] = frac_y;
  d_dy[0] = -hx;
  d_dy[1] = -frac_x;
  d_dy[2] = hx;
  d_dy[3] = frac_x;
}

// The four bilinear corners of one sample and their weights.
// pixel[k] is the flat pixel index y * W_in + x of corner k, or -1 for a corner outside the
// image (which reads as zero and receives no gradient).
template <typename T>
struct BilinearSample {
  int64_t pixel[4];
  T weight[4];
  T frac_y, frac_x;  // loc - floor(loc)
};

// Fills `s` and returns true when the sample at (loc_y, loc_x) contributes at all.
template <typename T>
DCNV3_HOST_DEVICE bool bilinear_sample(T loc_y, T loc_x, int64_t height, int64_t width,
                                       BilinearSample<T>& s) {
  int64_t y0, x0;
  const unsigned corners = sample_corners(loc_y, loc_x, height, width, y0, x0, s.frac_y,
                                          s.frac_x);
  if (corners == 0u) return false;
  bilinear_weights(s.frac_y, s.frac_x, s.weight);
  const int64_t base = y0 * width + x0;
  s.pixel[0] = (corners & 1u) ? base : -1;
  s.pixel[1] = (corners & 2u) ? base + 1 : -1;
  s.pixel[2] = (corners & 4u) ? base + width : -1;
  s.pixel[3] = (corners & 8u) ? base + width + 1 : -1;
  return true;
}

// Gradients of one sample, given the four corner dot products
// corner_dot[k] = sum_c grad_out[c] * value_k[c] (zero for corners outside):
//   d(loss)/d(mask)  = sum_c grad_out[c] * bilinear[c]
//   d(loss)/d(loc_x) = mask * sum_c grad_out[c] * d bilinear[c] / dx, same for y.
// The offset gradients are the location gradients times offset_scale.
template <typename T>
struct SampleGradients {
  T mask;
  T offset_x, offset_y;
};

template <typename T>
DCNV3_HOST_DEVICE SampleGradients<T> sample_gradients(const BilinearSample<T>& s,
                                                      const T corner_dot[4], T mask,
                                                      T offset_scale) {
  const T ly = s.frac_y, lx = s.frac_x;
  const T hy = static_cast<T>(1) - ly, hx = static_cast<T>(1) - lx;
  SampleGradients<T> r;
  r.mask = s.weight[0] * corner_dot[0] + s.weight[1] * corner_dot[1] +
           s.weight[2] * corner_dot[2] + s.weight[3] * corner_dot[3];
  const T d_dx = hy * (corner_dot[1] - corner_dot[0]) + ly * (corner_dot[3] - corner_dot[2]);
  const T d_dy = hx * (corner_dot[2] - corner_dot[0]) + lx * (corner_dot[3] - corner_dot[1]);
  r.offset_x = offset_scale * mask * d_dx;
  r.offset_y = offset_scale * mask * d_dy;
  return r;
}

}  // namespace internimage
