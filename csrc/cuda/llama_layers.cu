// The Llama-family layers on CUDA (llama_kernels.h): RMSNorm, RoPE (rotate_half) and
// SwiGLU. The math of each op is its CPU twin's (cpu/llama_layers.h), argument checks
// included (the check_* functions of cpu/llama_layers.h, shared by both devices).
//
// Launch shapes:
//   - RMSNorm (per-row reductions): one warp per row; its lanes take the row's channels
//     lane-strided and combine in a butterfly (every lane ends with the same bits);
//   - RoPE: a 1-D grid-stride loop over (row, frequency index i) pairs; a thread computes
//     the angle, cosf and sinf once and rotates pair i of every head of its row;
//   - SwiGLU: a 2-D grid, x = tiles of kThreads hidden units, y = rows (grid-striding);
//     the silu/sigmoid formulation and its tail cuts are the CPU's.
//
// Determinism (no floating-point atomics; every split of work is a function of shapes):
// rmsnorm_backward's weight gradient is a two-stage column sum: stage 1 sums fixed chunks
// of rows (cpu/layers.cpp's chunking: at most 64 chunks of >= 8 rows) into double
// partials [chunks][C], stage 2 sums each channel's partials in a fixed order and adds
// the total into grad_weight, rounded once.
//
// positions live on the device, so their values are not validated here: a row with
// positions[r] < 0 is padding and left untouched by RoPE; any other value is a position.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/error.h"
#include "cpu/arg_checks.h"
#include "cpu/llama_layers.h"
#include "cuda/cuda_check.h"
#include "cuda/device_common.cuh"
#include "cuda/llama_kernels.h"
#include "cuda/row_ops.cuh"

namespace ppo::cuda {
namespace {

using cpu::check_rmsnorm_backward;
using cpu::check_rmsnorm_forward;
using cpu::check_rope;
using cpu::check_swiglu_backward;
using cpu::check_swiglu_forward;

// ---- RMSNorm -----------------------------------------------------------------------------
// Forward, one warp per row of C channels: sum of squares in double, rstd = 1 / sqrt(ss / C
// + eps) in double rounded once to float, then out = (x * rstd) * w in float.
__global__ void __launch_bounds__(kThreads)
    rmsnorm_forward_kernel(int64_t rows, int64_t C, const float* __restrict__ in,
                           const float* __restrict__ weight, float eps, float* __restrict__ out,
                           float* __restrict__ rstd) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t row = global_warp_index(); row < rows; row += grid_warp_count()) {
    const float* x = in + row * C;
    float* y = out + row * C;
    double ss = 0.0;
    for (int64_t c = lane; c < C; c += kWarpSize) {
      const double v = static_cast<double>(x[c]);
      ss += v * v;
    }
    const double ms = warp_sum(ss) / static_cast<double>(C);
    const float rs = static_cast<float>(1.0 / sqrt(ms + static_cast<double>(eps)));
    for (int64_t c = lane; c < C; c += kWarpSize) y[c] = __fmul_rn(__fmul_rn(x[c], rs), weight[c]);
    if (lane == 0) rstd[row] = rs;
  }
}

// Backward, part 1: grad_in, one warp per row. With y = x * rs * w, rs = (mean x^2 + eps)^-1/2:
//   din_j = rs * (w_j g_j - x_j * coef),  coef = rs^2 * (1/C) sum_c w_c g_c x_c,
// (cpu::rmsnorm_backward's form) the row's dot product and coef in double, coef rounded
// once to float, the rest in float.
__global__ void __launch_bounds__(kThreads)
    rmsnorm_backward_rows_kernel(int64_t rows, int64_t C, const float* __restrict__ grad_out,
                                 const float* __restrict__ in, const float* __restrict__ weight,
                                 const float* __restrict__ rstd, float* __restrict__ grad_in) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t row = global_warp_index(); row < rows; row += grid_warp_count()) {
    const float* g = grad_out + row * C;
    const float* x = in + row * C;
    float* gi = grad_in + row * C;
    const float rs = rstd[row];
    double dot = 0.0;
    for (int64_t c = lane; c < C; c += kWarpSize) {
      dot += static_cast<double>(weight[c]) * static_cast<double>(g[c]) * static_cast<double>(x[c]);
    }
    dot = warp_sum(dot);
    const double rsd = static_cast<double>(rs);
    const float coef = static_cast<float>(rsd * rsd * dot / static_cast<double>(C));
    for (int64_t c = lane; c < C; c += kWarpSize) gi[c] += rs * (weight[c] * g[c] - x[c] * coef);
  }
}

// Backward, part 2's term: grad_out[r, c] * in[r, c] * rstd[r], in double.
struct RmsNormWeightTerm {
  const float* __restrict__ grad_out;
  const float* __restrict__ in;
  const float* __restrict__ rstd;
  int64_t C;
  __device__ __forceinline__ void operator()(int64_t r, int64_t c, double (&acc)[1]) const {
    acc[0] += static_cast<double>(grad_out[r * C + c]) * static_cast<double>(in[r * C + c]) *
              static_cast<double>(rstd[r]);
  }
};

// ---- RoPE --------------------------------------------------------------------------------
// The inverse frequencies inv_freq_i = (float)(1.0 / pow((double)theta, 2.0 * i / head_size))
// are computed on the host by cpu::rope_inv_freq (the CPU's own function: the same floats)
// and passed by value as a __grid_constant__ kernel parameter: no device allocation, no
// copy, no synchronization. Each block stages the table in shared memory. Head sizes past
// the table (never in practice: head_size > 2 * kRopeTableSize) evaluate the same
// expression in-kernel in double (CUDA's pow is within 2 double ulps of the host's, so the
// float may differ only when the double lies within that of a float rounding boundary).
constexpr int kRopeTableSize = 512;  // head_size <= 1024; 2 KiB of kernel parameters

struct RopeTable {
  float inv_freq[kRopeTableSize];
};

__device__ __forceinline__ float rope_inv_freq_device(float theta, int64_t i, int64_t head_size) {
  return static_cast<float>(
      1.0 / pow(static_cast<double>(theta), 2.0 * static_cast<double>(i) / static_cast<double>(head_size)));
}

// In place on x: one thread per (row, i) pair (grid-stride over rows * half), rotating pair
// i of each of the row's heads. The angle is ((float)pos / scaling) * inv_freq with explicit
// round-to-nearest operations, and the rotation uses unfused multiplies and adds
// (__fmul_rn / __fadd_rn / __fsub_rn), so with the same cosf/sinf values the result is the
// CPU's to the bit. Backward applies the transpose rotation.
template <bool kBackward>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(int64_t rows, int64_t row_stride, int64_t col_offset, int64_t heads,
                int64_t head_size, const int32_t* __restrict__ positions, float theta,
                float scaling, const __grid_constant__ RopeTable table, float* __restrict__ x) {
  __shared__ float inv_freq[kRopeTableSize];
  const int64_t half = head_size / 2;
  const bool use_table = half <= kRopeTableSize;
  if (use_table) {
    for (int64_t i = threadIdx.x; i < half; i += blockDim.x) inv_freq[i] = table.inv_freq[i];
  }
  __syncthreads();
  const int64_t n = rows * half;
  for (int64_t idx = global_thread_index(); idx < n; idx += grid_thread_count()) {
    const int64_t r = idx / half;
    const int64_t i = idx - r * half;
    const int32_t pos = positions[r];
    if (pos < 0) continue;  // padding: untouched
    const float f = use_table ? inv_freq[i] : rope_inv_freq_device(theta, i, head_size);
    const float angle = __fmul_rn(__fdiv_rn(static_cast<float>(pos), scaling), f);
    const float c = cosf(angle);
    const float s = sinf(angle);
    float* p = x + r * row_stride + col_offset + i;
    for (int64_t h = 0; h < heads; ++h, p += head_size) {
      const float a = p[0];
      const float b = p[half];
      if (kBackward) {
        p[0] = __fadd_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        p[half] = __fsub_rn(__fmul_rn(b, c), __fmul_rn(a, s));
      } else {
        p[0] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        p[half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
      }
    }
  }
}

template <bool kBackward>
void launch_rope(int64_t rows, int64_t row_stride, int64_t col_offset, int64_t heads,
                 int64_t head_size, const int32_t* positions, float theta, float scaling,
                 float* x) {
  const int64_t half = head_size / 2;
  if (rows == 0 || half == 0) return;
  RopeTable table{};
  if (half <= kRopeTableSize) {
    for (int64_t i = 0; i < half; ++i) {
      table.inv_freq[i] = cpu::rope_inv_freq(theta, i, head_size);
    }
  }
  rope_kernel<kBackward><<<elementwise_blocks(rows * half), kThreads>>>(
      rows, row_stride, col_offset, heads, head_size, positions, theta, scaling, table, x);
  PPO_CUDA_CHECK_LAUNCH("rope_kernel");
}

// ---- SwiGLU ------------------------------------------------------------------------------
// cpu/llama_layers.cpp's formulation: sigmoid(x) from e = exp(-|x|) in [0, 1] only (no
// overflow for any x): s = 1 / (1 + e); sigmoid(x) = s (x >= 0) or e s (x < 0), and
// sigmoid (1 - sigmoid) = e s^2. silu(x) = x sigmoid(x), silu'(x) = sigmoid + x e s^2.
// Below x = -88 silu and silu' are set to 0 (-inf gives 0, not -inf * 0 = NaN); above
// x = 88 silu' is set to 1 (+inf gives 1, not inf * 0). expf is accurate to 2 ulp (the
// CPU's fast_exp to ~2 ulp; it flushes to 0 below -87.3 where expf returns subnormals:
// a difference below 1e-36 in silu).
constexpr float kSiluTailCut = 88.0f;

struct Silu {
  float silu;   // silu(x)
  float dsilu;  // silu'(x)
};

__device__ __forceinline__ Silu silu_and_grad(float x) {
  const float e = expf(-fabsf(x));
  const float s = 1.0f / (1.0f + e);
  const float sig = x >= 0.0f ? s : e * s;
  float silu = x * sig;
  float ds = sig + x * ((e * s) * s);
  silu = x < -kSiluTailCut ? 0.0f : silu;
  ds = x < -kSiluTailCut ? 0.0f : ds;
  ds = x > kSiluTailCut ? 1.0f : ds;
  return {silu, ds};
}

__device__ __forceinline__ float silu_only(float x) {
  const float e = expf(-fabsf(x));
  const float s = 1.0f / (1.0f + e);
  const float sig = x >= 0.0f ? s : e * s;
  const float silu = x * sig;
  return x < -kSiluTailCut ? 0.0f : silu;
}

// out [rows, H] = silu(gate) * up, gate_up [rows, 2H].
__global__ void __launch_bounds__(kThreads)
    swiglu_forward_kernel(int64_t rows, int64_t H, const float* __restrict__ gate_up,
                          float* __restrict__ out) {
  const int64_t j = row_tile_column();
  if (j >= H) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const float* gu = gate_up + r * 2 * H;
    out[r * H + j] = silu_only(gu[j]) * gu[H + j];
  }
}

// grad_gate_up [rows, 2H] += (dout * up * silu'(gate) | dout * silu(gate)).
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_kernel(int64_t rows, int64_t H, const float* __restrict__ gate_up,
                           const float* __restrict__ grad_out, float* __restrict__ grad_gate_up) {
  const int64_t j = row_tile_column();
  if (j >= H) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const float* gu = gate_up + r * 2 * H;
    float* dgu = grad_gate_up + r * 2 * H;
    const float u = gu[H + j];
    const float dout = grad_out[r * H + j];
    const Silu sl = silu_and_grad(gu[j]);
    dgu[j] += (dout * u) * sl.dsilu;
    dgu[H + j] += dout * sl.silu;
  }
}

}  // namespace

// ==============================================================================================

void rmsnorm_forward(int64_t rows, int64_t channels, const float* in, const float* weight,
                     float eps, float* out, float* rstd) {
  if (!check_rmsnorm_forward(rows, channels, in, weight, eps, out, rstd)) return;
  rmsnorm_forward_kernel<<<warp_row_blocks(rows), kThreads>>>(rows, channels, in, weight, eps,
                                                              out, rstd);
  PPO_CUDA_CHECK_LAUNCH("rmsnorm_forward_kernel");
}

void rmsnorm_backward(int64_t rows, int64_t channels, const float* grad_out, const float* in,
                      const float* weight, const float* rstd, float* grad_in, float* grad_weight) {
  if (!check_rmsnorm_backward(rows, channels, grad_out, in, weight, rstd, grad_in, grad_weight))
    return;
  const RowChunks chunks = row_chunks(rows);
  double* partials = static_cast<double*>(
      thread_scratch().get(static_cast<size_t>(chunks.count * channels) * sizeof(double)));
  rmsnorm_backward_rows_kernel<<<warp_row_blocks(rows), kThreads>>>(rows, channels, grad_out, in,
                                                                    weight, rstd, grad_in);
  PPO_CUDA_CHECK_LAUNCH("rmsnorm_backward_rows_kernel");
  launch_column_sums<double, 1>(RmsNormWeightTerm{grad_out, in, rstd, channels}, rows, channels, chunks,
                                partials, Outputs<1>{{grad_weight}});
}

void rope_forward(int64_t rows, int64_t row_stride, int64_t col_offset, int64_t heads,
                  int64_t head_size, const int32_t* positions, float theta, float scaling,
                  float* x) {
  if (!check_rope(rows, row_stride, col_offset, heads, head_size, positions, theta, scaling, x, "x"))
    return;
  launch_rope<false>(rows, row_stride, col_offset, heads, head_size, positions, theta, scaling, x);
}

void rope_backward(int64_t rows, int64_t row_stride, int64_t col_offset, int64_t heads,
                   int64_t head_size, const int32_t* positions, float theta, float scaling,
                   float* grad) {
  if (!check_rope(rows, row_stride, col_offset, heads, head_size, positions, theta, scaling, grad,
                  "grad"))
    return;
  launch_rope<true>(rows, row_stride, col_offset, heads, head_size, positions, theta, scaling,
                    grad);
}

void swiglu_forward(int64_t rows, int64_t hidden, const float* gate_up, float* out) {
  if (!check_swiglu_forward(rows, hidden, gate_up, out)) return;
  swiglu_forward_kernel<<<row_tile_grid(rows, hidden), kThreads>>>(rows, hidden, gate_up, out);
  PPO_CUDA_CHECK_LAUNCH("swiglu_forward_kernel");
}

void swiglu_backward(int64_t rows, int64_t hidden, const float* gate_up, const float* grad_out,
                     float* grad_gate_up) {
  if (!check_swiglu_backward(rows, hidden, gate_up, grad_out, grad_gate_up)) return;
  swiglu_backward_kernel<<<row_tile_grid(rows, hidden), kThreads>>>(rows, hidden, gate_up,
                                                                    grad_out, grad_gate_up);
  PPO_CUDA_CHECK_LAUNCH("swiglu_backward_kernel");
}

}  // namespace ppo::cuda
