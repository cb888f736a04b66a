// The elementwise and per-row layers of the GPT-2 engine on CUDA (engine_kernels.h):
// bias, LayerNorm, GELU, residual adds, token/position embeddings and the row ops of the
// heads. The math of each op is its CPU twin's (cpu/layers.h, cpu/attention.h for the
// embedding/bias/residual ops, core/engine_ops.h for the head ops), argument checks
// included (the same messages and argument names).
//
// Launch shapes:
//   - elementwise ops (GELU, add, accumulate): 1-D grid-stride loops;
//   - row ops on [rows, C] (add_bias, embedding_forward, gather/scatter, ...): a 2-D grid,
//     x = tiles of kThreads channels, y = rows (grid-striding), so a warp reads or
//     writes 32 consecutive floats of one row;
//   - per-row reductions (LayerNorm, value head): one warp per row; its lanes take the
//     row's channels lane-strided, then combine in a butterfly (every lane ends with the
//     same bits, IEEE addition being commutative).
//
// Determinism (no floating-point atomics; every split of work is a function of shapes):
//   - column sums over rows (bias_backward, LayerNorm's weight/bias gradient, the value
//     head's weight gradient) are two-stage: stage 1 sums fixed chunks of rows into
//     partials [K][chunks][C] (the CPU's chunking: cpu/layers.cpp), stage 2 sums the
//     partials of each channel in a fixed order and adds the total into the gradient;
//   - embedding_backward stable-sorts the rows by token id (and by position), so the
//     rows that hit the same table row form one contiguous segment in row order; one
//     thread per (segment, channel) adds them into the table row in that order, the
//     CPU's exact sequence of float additions (bit-identical to cpu::embedding_backward).
//
// Index arrays (tokens, positions, index) live on the device, so their values are not
// validated here: the caller validates ids (< vocab) and positions (< n_positions).
// Negative ids/indices are harmless (such rows are skipped or written as 0), but an id
// past the end of its table is read or written out of bounds.
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/error.h"
#include "cpu/arg_checks.h"
#include "cuda/cuda_check.h"
#include "cuda/device_common.cuh"
#include "cuda/engine_kernels.h"
#include "cuda/row_ops.cuh"

namespace ppo::cuda {
namespace {

using cpu::check_accumulate;
using cpu::check_add;
using cpu::check_add_bias;
using cpu::check_bias_backward;
using cpu::check_embedding_backward;
using cpu::check_embedding_forward;
using cpu::check_gelu_backward;
using cpu::check_gelu_forward;
using cpu::check_layernorm_backward;
using cpu::check_layernorm_forward;
using cpu::require_data;
using cpu::require_size;

// ---- bias --------------------------------------------------------------------------------
// out [rows, C] += bias [C] broadcast over rows.
__global__ void __launch_bounds__(kThreads)
    add_bias_kernel(int64_t rows, int64_t C, const float* __restrict__ bias,
                    float* __restrict__ out) {
  const int64_t c = row_tile_column();
  if (c >= C) return;
  const float b = bias[c];
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) out[r * C + c] += b;
}

// bias_backward's term: grad_out[r, c].
struct BiasTerm {
  const float* __restrict__ grad_out;
  int64_t C;
  __device__ __forceinline__ void operator()(int64_t r, int64_t c, float (&acc)[1]) const {
    acc[0] += grad_out[r * C + c];
  }
};

// ---- LayerNorm ---------------------------------------------------------------------------
// Forward, one warp per row of C channels (cpu::layernorm_forward's math):
//   pass 1: mean in double; pass 2: biased variance sum (x - mean)^2 / C in double
//   (two-pass: no cancellation for large-mean rows); rstd = 1 / sqrt(var + eps) in double;
//   pass 3: out = ((x - m_hi) - m_lo) * rstd * w + b in float, m_hi + m_lo the double
//   mean split into two floats (x - m_hi exact for large-mean rows). The row's second
//   and third reads mostly hit the caches.
__global__ void __launch_bounds__(kThreads)
    layernorm_forward_kernel(int64_t rows, int64_t C, const float* __restrict__ in,
                             const float* __restrict__ weight, const float* __restrict__ bias,
                             float eps, float* __restrict__ out, float* __restrict__ mean,
                             float* __restrict__ rstd) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t row = global_warp_index(); row < rows; row += grid_warp_count()) {
    const float* x = in + row * C;
    float* y = out + row * C;

    double sum = 0.0;
    for (int64_t c = lane; c < C; c += kWarpSize) sum += static_cast<double>(x[c]);
    const double m = warp_sum(sum) / static_cast<double>(C);

    double ss = 0.0;
    for (int64_t c = lane; c < C; c += kWarpSize) {
      const double d = static_cast<double>(x[c]) - m;
      ss += d * d;
    }
    const double var = warp_sum(ss) / static_cast<double>(C);
    const double rs = 1.0 / sqrt(var + static_cast<double>(eps));

    const float m_hi = static_cast<float>(m);
    const float m_lo = static_cast<float>(m - static_cast<double>(m_hi));
    const float rsf = static_cast<float>(rs);
    for (int64_t c = lane; c < C; c += kWarpSize) {
      y[c] = (((x[c] - m_hi) - m_lo) * rsf) * weight[c] + bias[c];
    }
    if (lane == 0) {
      mean[row] = m_hi;
      rstd[row] = rsf;
    }
  }
}

// Backward, part 1: grad_in, one warp per row (cpu::layernorm_backward's math, in float).
// With dn = w * dout and xhat = ((x - m_hi) - m_lo) * rstd:
//   din = rstd * (dn - mean_c(dn) - xhat * mean_c(dn * xhat)),
// m_lo = mean_c(x - m_hi) recovering the part of the mean the saved float dropped, and
// sum_c dn * xhat = rstd * (sum_c dn (x - m_hi) - m_lo sum_c dn). Each lane sums its
// C / 32 channels in float, then the butterfly. m_lo [rows] is saved for part 2.
__global__ void __launch_bounds__(kThreads)
    layernorm_backward_rows_kernel(int64_t rows, int64_t C, float inv_c,
                                   const float* __restrict__ grad_out,
                                   const float* __restrict__ in, const float* __restrict__ weight,
                                   const float* __restrict__ mean, const float* __restrict__ rstd,
                                   float* __restrict__ grad_in, float* __restrict__ mean_lo) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t row = global_warp_index(); row < rows; row += grid_warp_count()) {
    const float* g = grad_out + row * C;
    const float* x = in + row * C;
    float* gi = grad_in + row * C;
    const float m_hi = mean[row];
    const float rs = rstd[row];

    float sum_dn = 0.0f, sum_dnd = 0.0f, sum_d = 0.0f;
    for (int64_t c = lane; c < C; c += kWarpSize) {
      const float dn = weight[c] * g[c];
      const float d = x[c] - m_hi;
      sum_dn += dn;
      sum_dnd += dn * d;
      sum_d += d;
    }
    sum_dn = warp_sum(sum_dn);
    sum_dnd = warp_sum(sum_dnd);
    sum_d = warp_sum(sum_d);
    const float m_lo = sum_d * inv_c;
    const float dn_mean = sum_dn * inv_c;
    const float dnx_mean = rs * (sum_dnd - m_lo * sum_dn) * inv_c;

    for (int64_t c = lane; c < C; c += kWarpSize) {
      const float xhat = ((x[c] - m_hi) - m_lo) * rs;
      const float dn = weight[c] * g[c];
      gi[c] += ((dn - dn_mean) - xhat * dnx_mean) * rs;
    }
    if (lane == 0) mean_lo[row] = m_lo;
  }
}

// Backward, part 2's terms: xhat[r, c] * grad_out[r, c] (weight) and grad_out[r, c]
// (bias), xhat computed exactly as in part 1.
struct LayerNormParamTerm {
  const float* __restrict__ grad_out;
  const float* __restrict__ in;
  const float* __restrict__ mean;
  const float* __restrict__ mean_lo;
  const float* __restrict__ rstd;
  int64_t C;
  __device__ __forceinline__ void operator()(int64_t r, int64_t c, float (&acc)[2]) const {
    const float g = grad_out[r * C + c];
    const float xhat = ((in[r * C + c] - mean[r]) - mean_lo[r]) * rstd[r];
    acc[0] += xhat * g;
    acc[1] += g;
  }
};

// ---- GELU --------------------------------------------------------------------------------
// cpu/layers.cpp's formulation: gelu(x) = x / (1 + e^(-2u)), u = sqrt(2/pi)(x + 0.044715 x^3)
// (0.5 (1 + tanh u) = sigmoid(2u); no cancellation in either tail), with gelu and gelu'
// set to exactly 0 where -2u > 80 and gelu' to 1 where -2u < -80. expf is accurate to
// 2 ulp; it overflows to inf for -2u > 88.7, a case the selects replace.
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluCubic = 0.044715f;
constexpr float kGeluTailCut = 80.0f;

// No __restrict__: out may equal in (each element is read before it is written).
__global__ void __launch_bounds__(kThreads)
    gelu_forward_kernel(int64_t n, const float* in, float* out) {
  for (int64_t i = global_thread_index(); i < n; i += grid_thread_count()) {
    const float x = in[i];
    const float t = -2.0f * kGeluScale * (x + kGeluCubic * x * x * x);  // -2u
    const float y = x / (1.0f + expf(t));
    out[i] = t > kGeluTailCut ? 0.0f : y;
  }
}

// gelu'(x) = s + 2 x s (1 - s) du/dx, s = sigmoid(2u), 1 - s = e^(-2u) s,
// du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
__global__ void __launch_bounds__(kThreads)
    gelu_backward_kernel(int64_t n, const float* __restrict__ in,
                         const float* __restrict__ grad_out, float* __restrict__ grad_in) {
  for (int64_t i = global_thread_index(); i < n; i += grid_thread_count()) {
    const float x = in[i];
    const float x2 = x * x;
    const float t = -2.0f * kGeluScale * (x + kGeluCubic * x2 * x);  // -2u
    const float du = kGeluScale * (1.0f + 3.0f * kGeluCubic * x2);
    const float e = expf(t);
    const float s = 1.0f / (1.0f + e);
    const float s_one_minus_s = (e * s) * s;
    float d = s + 2.0f * x * du * s_one_minus_s;
    d = t > kGeluTailCut ? 0.0f : d;
    d = t < -kGeluTailCut ? 1.0f : d;  // also replaces the NaN of inf * 0 for huge x
    grad_in[i] += d * grad_out[i];
  }
}

// ---- residual ----------------------------------------------------------------------------
// No __restrict__: out may equal a or b.
__global__ void __launch_bounds__(kThreads)
    add_kernel(int64_t n, const float* a, const float* b, float* out) {
  for (int64_t i = global_thread_index(); i < n; i += grid_thread_count()) out[i] = a[i] + b[i];
}

__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(int64_t n, const float* __restrict__ x, float* __restrict__ y) {
  for (int64_t i = global_thread_index(); i < n; i += grid_thread_count()) y[i] += x[i];
}

// ---- embeddings --------------------------------------------------------------------------
// out [rows, C]: wte[tokens[r], :] + wpe[positions[r], :], or 0 for padding
// (positions[r] < 0; tokens[r] is then not read) and for a negative (garbage) token.
__global__ void __launch_bounds__(kThreads)
    embedding_forward_kernel(int64_t rows, int64_t C, const int32_t* __restrict__ tokens,
                             const int32_t* __restrict__ positions, const float* __restrict__ wte,
                             const float* __restrict__ wpe, float* __restrict__ out) {
  const int64_t c = row_tile_column();
  if (c >= C) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int32_t pos = positions[r];
    const int32_t tok = pos < 0 ? -1 : tokens[r];
    // wpe == nullptr: no learned positions (Llama: rotary positions come later).
    out[r * C + c] = tok < 0 ? 0.0f
                             : wte[static_cast<int64_t>(tok) * C + c] +
                                   (wpe != nullptr ? wpe[static_cast<int64_t>(pos) * C + c] : 0.0f);
  }
}

// The sort keys of embedding_backward: token_keys[r] = tokens[r] and position_keys[r] =
// positions[r] for the non-padding rows, -1 for padding (tokens[r] not read), and
// row_ids[r] = r (the values the sort carries along). position_keys may be nullptr.
__global__ void __launch_bounds__(kThreads)
    embedding_sort_keys_kernel(int64_t rows, const int32_t* __restrict__ tokens,
                               const int32_t* __restrict__ positions,
                               int32_t* __restrict__ token_keys,
                               int32_t* __restrict__ position_keys, int32_t* __restrict__ row_ids) {
  for (int64_t r = global_thread_index(); r < rows; r += grid_thread_count()) {
    const int32_t pos = positions[r];
    token_keys[r] = pos < 0 ? -1 : tokens[r];
    if (position_keys != nullptr) position_keys[r] = pos < 0 ? -1 : pos;
    row_ids[r] = static_cast<int32_t>(r);
  }
}

// End of the segment starting at i in keys sorted ascending (keys[i] == key): the first
// j > i with keys[j] != key, or rows. Galloping then bisection, so a segment of length L
// costs O(log L) loads (most segments are a single row).
__device__ __forceinline__ int64_t segment_end(const int32_t* __restrict__ keys, int64_t rows,
                                               int64_t i, int32_t key) {
  int64_t lo = i;  // keys[lo] == key
  int64_t hi = i + 1;
  int64_t step = 1;
  while (hi < rows && keys[hi] == key) {
    lo = hi;
    step *= 2;
    hi = i + step;
  }
  hi = min(hi, rows);  // hi == rows or keys[hi] != key
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] == key) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return hi;
}

// table [*, C] += the rows of grad_out [rows, C] grouped by key: keys [rows] sorted
// ascending (stable), order [rows] the original row of each sorted entry (ascending
// within a key). Grid (channel tiles, sorted entries): the block at the first entry i
// of a segment with key >= 0 adds its rows into table[key, :] in row order, one thread
// per channel (the CPU's sequence of additions); the other entries return at once. One
// thread owns each (key, channel): no two threads write the same element.
__global__ void __launch_bounds__(kThreads)
    embedding_segment_kernel(int64_t rows, int64_t C, const float* __restrict__ grad_out,
                             const int32_t* __restrict__ keys, const int32_t* __restrict__ order,
                             float* __restrict__ table) {
  const int64_t c = row_tile_column();
  if (c >= C) return;
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const int32_t key = keys[i];
    if (key < 0 || (i > 0 && keys[i - 1] == key)) continue;
    const int64_t end = segment_end(keys, rows, i, key);
    float* t = table + static_cast<int64_t>(key) * C + c;
    float acc = *t;
    int64_t j = i;
    for (; j + 4 <= end; j += 4) {  // four independent loads in flight, added in order
      const float g0 = grad_out[static_cast<int64_t>(order[j]) * C + c];
      const float g1 = grad_out[static_cast<int64_t>(order[j + 1]) * C + c];
      const float g2 = grad_out[static_cast<int64_t>(order[j + 2]) * C + c];
      const float g3 = grad_out[static_cast<int64_t>(order[j + 3]) * C + c];
      acc += g0;
      acc += g1;
      acc += g2;
      acc += g3;
    }
    for (; j < end; ++j) acc += grad_out[static_cast<int64_t>(order[j]) * C + c];
    *t = acc;
  }
}

// ---- row ops of the heads ----------------------------------------------------------------
// dst [rows, C]: dst[i, :] = src[index[i], :]; a negative (garbage) index gives a row of 0.
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(int64_t rows, int64_t C, const int64_t* __restrict__ index,
                       const float* __restrict__ src, float* __restrict__ dst) {
  const int64_t c = row_tile_column();
  if (c >= C) return;
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const int64_t s = index[i];
    dst[i * C + c] = s < 0 ? 0.0f : src[s * C + c];
  }
}

// dst[index[i], :] += src[i, :] (indices distinct: each dst element has one writer);
// a negative index is skipped.
__global__ void __launch_bounds__(kThreads)
    scatter_add_rows_kernel(int64_t rows, int64_t C, const int64_t* __restrict__ index,
                            const float* __restrict__ src, float* __restrict__ dst) {
  const int64_t c = row_tile_column();
  if (c >= C) return;
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const int64_t d = index[i];
    if (d >= 0) dst[d * C + c] += src[i * C + c];
  }
}

// data [rows, width]: rows with positions[r] < 0 set to 0, the others untouched.
__global__ void __launch_bounds__(kThreads)
    zero_padded_rows_kernel(int64_t rows, int64_t width, const int32_t* __restrict__ positions,
                            float* __restrict__ data) {
  const int64_t c = row_tile_column();
  if (c >= width) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    if (positions[r] < 0) data[r * width + c] = 0.0f;
  }
}

// out[r] = sum_c x[r, c] w[c] in double (one warp per row), 0 where positions[r] < 0.
__global__ void __launch_bounds__(kThreads)
    value_head_forward_kernel(int64_t rows, int64_t C, const float* __restrict__ x,
                              const float* __restrict__ w, const int32_t* __restrict__ positions,
                              float* __restrict__ out) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t row = global_warp_index(); row < rows; row += grid_warp_count()) {
    if (positions[row] < 0) {  // warp-uniform
      if (lane == 0) out[row] = 0.0f;
      continue;
    }
    const float* xr = x + row * C;
    double s = 0.0;
    for (int64_t c = lane; c < C; c += kWarpSize) {
      s += static_cast<double>(xr[c]) * static_cast<double>(w[c]);
    }
    s = warp_sum(s);
    if (lane == 0) out[row] = static_cast<float>(s);
  }
}

// grad_x [rows, C] += grad[r] * w[c].
__global__ void __launch_bounds__(kThreads)
    value_head_grad_x_kernel(int64_t rows, int64_t C, const float* __restrict__ grad,
                             const float* __restrict__ w, float* __restrict__ grad_x) {
  const int64_t c = row_tile_column();
  if (c >= C) return;
  const float wc = w[c];
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) grad_x[r * C + c] += grad[r] * wc;
}

// The value head's weight-gradient term, in double: grad[r] * x[r, c].
struct ValueHeadTerm {
  const float* __restrict__ grad;
  const float* __restrict__ x;
  int64_t C;
  __device__ __forceinline__ void operator()(int64_t r, int64_t c, double (&acc)[1]) const {
    acc[0] += static_cast<double>(grad[r]) * static_cast<double>(x[r * C + c]);
  }
};

}  // namespace

// ==============================================================================================

void add_bias(int64_t rows, int64_t channels, const float* bias, float* out) {
  if (!check_add_bias(rows, channels, bias, out)) return;
  add_bias_kernel<<<row_tile_grid(rows, channels), kThreads>>>(rows, channels, bias, out);
  PPO_CUDA_CHECK_LAUNCH("add_bias_kernel");
}

void bias_backward(int64_t rows, int64_t channels, const float* grad_out, float* grad_bias) {
  if (!check_bias_backward(rows, channels, grad_out, grad_bias)) return;
  const RowChunks chunks = row_chunks(rows);
  float* partials = static_cast<float*>(
      thread_scratch().get(static_cast<size_t>(chunks.count * channels) * sizeof(float)));
  launch_column_sums<float, 1>(BiasTerm{grad_out, channels}, rows, channels, chunks, partials,
                               Outputs<1>{{grad_bias}});
}

void layernorm_forward(int64_t rows, int64_t channels, const float* in, const float* weight,
                       const float* bias, float eps, float* out, float* mean, float* rstd) {
  if (!check_layernorm_forward(rows, channels, in, weight, bias, eps, out, mean, rstd)) return;
  layernorm_forward_kernel<<<warp_row_blocks(rows), kThreads>>>(rows, channels, in, weight, bias,
                                                                eps, out, mean, rstd);
  PPO_CUDA_CHECK_LAUNCH("layernorm_forward_kernel");
}

void layernorm_backward(int64_t rows, int64_t channels, const float* grad_out, const float* in,
                        const float* weight, const float* mean, const float* rstd, float* grad_in,
                        float* grad_weight, float* grad_bias) {
  if (!check_layernorm_backward(rows, channels, grad_out, in, weight, mean, rstd, grad_in, grad_weight,
                                grad_bias))
    return;

  // Scratch: m_lo [rows], then the partials [2][chunks][C] (weight, bias).
  const RowChunks chunks = row_chunks(rows);
  const size_t mean_lo_bytes = align_up(static_cast<size_t>(rows) * sizeof(float));
  const size_t partial_bytes = static_cast<size_t>(2 * chunks.count * channels) * sizeof(float);
  char* scratch = static_cast<char*>(thread_scratch().get(mean_lo_bytes + partial_bytes));
  float* mean_lo = reinterpret_cast<float*>(scratch);
  float* partials = reinterpret_cast<float*>(scratch + mean_lo_bytes);

  const float inv_c = static_cast<float>(1.0 / static_cast<double>(channels));
  layernorm_backward_rows_kernel<<<warp_row_blocks(rows), kThreads>>>(
      rows, channels, inv_c, grad_out, in, weight, mean, rstd, grad_in, mean_lo);
  PPO_CUDA_CHECK_LAUNCH("layernorm_backward_rows_kernel");
  launch_column_sums<float, 2>(LayerNormParamTerm{grad_out, in, mean, mean_lo, rstd, channels},
                               rows, channels, chunks, partials,
                               Outputs<2>{{grad_weight, grad_bias}});
}

void gelu_forward(int64_t n, const float* in, float* out) {
  if (!check_gelu_forward(n, in, out)) return;
  gelu_forward_kernel<<<elementwise_blocks(n), kThreads>>>(n, in, out);
  PPO_CUDA_CHECK_LAUNCH("gelu_forward_kernel");
}

void gelu_backward(int64_t n, const float* in, const float* grad_out, float* grad_in) {
  if (!check_gelu_backward(n, in, grad_out, grad_in)) return;
  gelu_backward_kernel<<<elementwise_blocks(n), kThreads>>>(n, in, grad_out, grad_in);
  PPO_CUDA_CHECK_LAUNCH("gelu_backward_kernel");
}

void add(int64_t n, const float* a, const float* b, float* out) {
  if (!check_add(n, a, b, out)) return;
  add_kernel<<<elementwise_blocks(n), kThreads>>>(n, a, b, out);
  PPO_CUDA_CHECK_LAUNCH("add_kernel");
}

void accumulate(int64_t n, const float* x, float* y) {
  if (!check_accumulate(n, x, y)) return;
  accumulate_kernel<<<elementwise_blocks(n), kThreads>>>(n, x, y);
  PPO_CUDA_CHECK_LAUNCH("accumulate_kernel");
}

void embedding_forward(int64_t rows, int64_t channels, const int32_t* tokens,
                       const int32_t* positions, const float* wte, const float* wpe, float* out) {
  if (!check_embedding_forward(rows, channels, tokens, positions, wte, out)) return;
  embedding_forward_kernel<<<row_tile_grid(rows, channels), kThreads>>>(rows, channels, tokens,
                                                                         positions, wte, wpe, out);
  PPO_CUDA_CHECK_LAUNCH("embedding_forward_kernel");
}

void embedding_backward(int64_t rows, int64_t channels, const float* grad_out,
                        const int32_t* tokens, const int32_t* positions, float* grad_wte,
                        float* grad_wpe) {
  if (!check_embedding_backward(rows, channels, grad_out, tokens, positions, grad_wte)) return;
  require(rows <= INT_MAX, ErrorCode::InvalidArgument,
          "rows must be <= " + std::to_string(INT_MAX) + " (row ids are sorted as int32), got " +
              std::to_string(rows),
          "rows");
  const int n = static_cast<int>(rows);
  const bool with_wpe = grad_wpe != nullptr;

  // Temporary storage of the (stable, LSD) radix sort; the same for both sorts.
  size_t sort_bytes = 0;
  PPO_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, sort_bytes, static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), n, 0, 32,
      cudaStream_t{0}));

  // Scratch: [token keys, position keys, row ids, sorted keys, sorted row ids] of int32
  // [rows] each (position keys unused without grad_wpe), then the sort's storage.
  const size_t array_bytes = align_up(static_cast<size_t>(rows) * sizeof(int32_t));
  char* scratch = static_cast<char*>(thread_scratch().get(5 * array_bytes + sort_bytes));
  int32_t* token_keys = reinterpret_cast<int32_t*>(scratch);
  int32_t* position_keys = reinterpret_cast<int32_t*>(scratch + array_bytes);
  int32_t* row_ids = reinterpret_cast<int32_t*>(scratch + 2 * array_bytes);
  int32_t* sorted_keys = reinterpret_cast<int32_t*>(scratch + 3 * array_bytes);
  int32_t* sorted_rows = reinterpret_cast<int32_t*>(scratch + 4 * array_bytes);
  void* sort_storage = scratch + 5 * array_bytes;

  embedding_sort_keys_kernel<<<elementwise_blocks(rows), kThreads>>>(
      rows, tokens, positions, token_keys, with_wpe ? position_keys : nullptr, row_ids);
  PPO_CUDA_CHECK_LAUNCH("embedding_sort_keys_kernel");

  const dim3 grid = row_tile_grid(rows, channels);
  // Sorts (keys, row_ids) by key, stably, then adds each key's rows into table.
  auto sort_and_add = [&](const int32_t* keys, float* table) {
    size_t bytes = sort_bytes;
    PPO_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(sort_storage, bytes, keys, sorted_keys,
                                                   static_cast<const int32_t*>(row_ids),
                                                   sorted_rows, n, 0, 32, cudaStream_t{0}));
    embedding_segment_kernel<<<grid, kThreads>>>(rows, channels, grad_out, sorted_keys,
                                                  sorted_rows, table);
    PPO_CUDA_CHECK_LAUNCH("embedding_segment_kernel");
  };
  sort_and_add(token_keys, grad_wte);
  if (with_wpe) sort_and_add(position_keys, grad_wpe);
}

void gather_rows(int64_t rows, int64_t channels, const int64_t* index, const float* src,
                 float* dst) {
  require_size(rows, "rows");
  require_size(channels, "channels");
  if (rows == 0 || channels == 0) return;
  require_data(index, "index");
  require_data(src, "src");
  require_data(dst, "dst");
  gather_rows_kernel<<<row_tile_grid(rows, channels), kThreads>>>(rows, channels, index, src, dst);
  PPO_CUDA_CHECK_LAUNCH("gather_rows_kernel");
}

void scatter_add_rows(int64_t rows, int64_t channels, const int64_t* index, const float* src,
                      float* dst) {
  require_size(rows, "rows");
  require_size(channels, "channels");
  if (rows == 0 || channels == 0) return;
  require_data(index, "index");
  require_data(src, "src");
  require_data(dst, "dst");
  scatter_add_rows_kernel<<<row_tile_grid(rows, channels), kThreads>>>(rows, channels, index, src,
                                                                        dst);
  PPO_CUDA_CHECK_LAUNCH("scatter_add_rows_kernel");
}

void zero_padded_rows(int64_t rows, int64_t width, const int32_t* positions, float* data) {
  require_size(rows, "rows");
  require_size(width, "width");
  if (rows == 0 || width == 0) return;
  require_data(positions, "positions");
  require_data(data, "data");
  zero_padded_rows_kernel<<<row_tile_grid(rows, width), kThreads>>>(rows, width, positions, data);
  PPO_CUDA_CHECK_LAUNCH("zero_padded_rows_kernel");
}

void value_head_forward(int64_t rows, int64_t channels, const float* x, const float* w,
                        const int32_t* positions, float* out) {
  require_size(rows, "rows");
  require_size(channels, "channels");
  if (rows == 0) return;  // channels == 0 still writes out (empty sums: 0)
  require_data(positions, "positions");
  require_data(out, "out");
  if (channels > 0) {
    require_data(x, "x");
    require_data(w, "w");
  }
  value_head_forward_kernel<<<warp_row_blocks(rows), kThreads>>>(rows, channels, x, w, positions,
                                                                 out);
  PPO_CUDA_CHECK_LAUNCH("value_head_forward_kernel");
}

void value_head_backward(int64_t rows, int64_t channels, const float* grad, const float* x,
                         const float* w, float* grad_x, float* grad_w) {
  require_size(rows, "rows");
  require_size(channels, "channels");
  if (rows == 0 || channels == 0) return;
  require_data(grad, "grad");
  require_data(x, "x");
  require_data(w, "w");
  require_data(grad_x, "grad_x");
  require_data(grad_w, "grad_w");
  value_head_grad_x_kernel<<<row_tile_grid(rows, channels), kThreads>>>(rows, channels, grad, w,
                                                                         grad_x);
  PPO_CUDA_CHECK_LAUNCH("value_head_grad_x_kernel");
  // grad_w[c] += sum_r grad[r] x[r, c]: double partials over the row chunks, summed in
  // double and rounded once into grad_w.
  const RowChunks chunks = row_chunks(rows);
  double* partials = static_cast<double*>(
      thread_scratch().get(static_cast<size_t>(chunks.count * channels) * sizeof(double)));
  launch_column_sums<double, 1>(ValueHeadTerm{grad, x, channels}, rows, channels, chunks,
                                partials, Outputs<1>{{grad_w}});
}

}  // namespace ppo::cuda
