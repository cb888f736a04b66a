// Per-row layers of the Llama family on the CPU: RMSNorm, rotary position embedding
// (RoPE) and SwiGLU, each op's forward and backward side by side (llama_layers.cpp).
// cuda/llama_layers.cu implements the same functions, with the same signatures, in
// namespace ppo::cuda, and calls the same argument checks (the section at the end).
//
// Conventions (those of cpu/layers.h):
//   - Row-major float32, [rows, channels] for activations, [channels] for parameters.
//   - Backward functions ACCUMULATE (+=) into every gradient they produce (zero the
//     buffers before the first call). rope_backward is the exception: it transforms the
//     gradient in place (it is a rotation of the gradient, not a sum into another buffer).
//   - Deterministic: bit-identical across runs and across PPO_MAX_THREADS settings on one
//     machine (the split of every cross-row reduction depends only on the shapes).
//   - Inputs and outputs must not overlap, except where a function says otherwise.
//   - Throws ppo::Error(InvalidArgument) naming the argument for a negative size, a null
//     pointer to a non-empty array, or a bad scalar (see each function).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "core/error.h"
#include "cpu/arg_checks.h"

namespace ppo::cpu {

// ---- RMSNorm ---------------------------------------------------------------------------
// rstd[r] = 1 / sqrt(mean_c in[r, c]^2 + eps), the mean of squares accumulated in double
// and rstd rounded once to float; out[r, c] = (in[r, c] * rstd[r]) * weight[c].
// rstd [rows] is written for the backward pass. eps must be finite and >= 0 (with
// eps == 0, an all-zero row gives rstd = inf and out = NaN, as in PyTorch).
void rmsnorm_forward(int64_t rows, int64_t channels, const float* in, const float* weight,
                     float eps, float* out, float* rstd);

// Given grad_out [rows, channels] and the forward's in, weight, rstd:
//   grad_in     [rows, channels] += dL/din
//              = rstd * (weight * grad_out - in * rstd^2 * mean_c(weight * grad_out * in))
//   grad_weight [channels]       += sum_r grad_out[r, c] * in[r, c] * rstd[r]
// The weight gradient is summed over fixed chunks of rows (a function of rows only),
// combined in chunk order.
void rmsnorm_backward(int64_t rows, int64_t channels, const float* grad_out, const float* in,
                      const float* weight, const float* rstd, float* grad_in,
                      float* grad_weight);

// ---- Rotary position embedding (Hugging Face Llama's rotate_half convention) ----------
// IN PLACE on `heads` heads of head_size (even, >= 2) columns each, starting at column
// col_offset of each row of x (row r starts at x + r * row_stride), so that q and k heads
// packed in one fused [q | k | v] row are rotated where they lie. For each row r with
// positions[r] >= 0, each head h, each i < head_size / 2, with j = col_offset + h*head_size:
//   inv_freq_i = (float)(1.0 / pow((double)theta, 2.0 * i / head_size))   (rope_inv_freq)
//   angle      = ((float)positions[r] / scaling) * inv_freq_i              (float arithmetic)
//   c = cosf(angle), s = sinf(angle), x1 = x[r, j + i], x2 = x[r, j + i + head_size / 2]:
//   x[r, j + i] = x1 * c - x2 * s;   x[r, j + i + head_size / 2] = x2 * c + x1 * s
// Rows with positions[r] < 0 (padding) are not touched, nor is any column outside the
// rotated heads. scaling is the "linear" rope_scaling factor (1 = none). theta and
// scaling must be finite and > 0; col_offset + heads * head_size <= row_stride.
void rope_forward(int64_t rows, int64_t row_stride, int64_t col_offset, int64_t heads,
                  int64_t head_size, const int32_t* positions, float theta, float scaling,
                  float* x);

// The backward of rope_forward: the transposed rotation (angle -> -angle), IN PLACE on the
// gradient `grad` (same layout and arguments):
//   g1' = g1 * c + g2 * s;   g2' = g2 * c - g1 * s
void rope_backward(int64_t rows, int64_t row_stride, int64_t col_offset, int64_t heads,
                   int64_t head_size, const int32_t* positions, float theta, float scaling,
                   float* grad);

// ---- SwiGLU ------------------------------------------------------------------------------
// gate_up [rows, 2 * hidden] holds [gate | up] per row; out [rows, hidden]:
//   out[r, k] = silu(gate[r, k]) * up[r, k],   silu(x) = x / (1 + exp(-x))
// evaluated as x * sigmoid(x) with exp(-|x|) only (no overflow for any |x|): +inf -> +inf,
// -inf -> 0, NaN -> NaN; silu(x) for x < -88 (|silu| < 6e-37) is 0.
void swiglu_forward(int64_t rows, int64_t hidden, const float* gate_up, float* out);

// grad_gate_up [rows, 2 * hidden] += (d gate | d up):
//   d gate = grad_out * up * silu'(gate),  silu'(x) = s + x s (1 - s),  s = sigmoid(x)
//   d up   = grad_out * silu(gate)
void swiglu_backward(int64_t rows, int64_t hidden, const float* gate_up, const float* grad_out,
                     float* grad_gate_up);

// =============================================================================================
// ---- checks shared with cuda/llama_layers.cu ----------------------------------------------
// Host-side argument checks of the functions above, called by both the CPU and the CUDA
// entry points so that both refuse the same inputs with the same messages: each throws
// ppo::Error(InvalidArgument) naming the argument. Each returns false when there is
// nothing to do (then the pointers are not checked). Only host values are checked (sizes,
// scalars, null pointers), never the data.
// =============================================================================================

// rmsnorm_forward's arguments; false when there are no rows.
inline bool check_rmsnorm_forward(int64_t rows, int64_t channels, const float* in,
                                  const float* weight, float eps, const float* out,
                                  const float* rstd) {
  require_size(rows, "rows");
  require_size(channels, "channels");
  require(channels > 0 || rows == 0, ErrorCode::InvalidArgument,
          "channels must be >= 1 when rows > 0 (the mean square of an empty row is undefined)",
          "channels");
  require(std::isfinite(eps) && eps >= 0.0f, ErrorCode::InvalidArgument,
          "eps must be finite and >= 0, got " + std::to_string(eps), "eps");
  if (rows == 0) return false;
  require_data(in, "in");
  require_data(weight, "weight");
  require_data(out, "out");
  require_data(rstd, "rstd");
  return true;
}

// rmsnorm_backward's arguments; false when the input is empty.
inline bool check_rmsnorm_backward(int64_t rows, int64_t channels, const float* grad_out,
                                   const float* in, const float* weight, const float* rstd,
                                   const float* grad_in, const float* grad_weight) {
  require_size(rows, "rows");
  require_size(channels, "channels");
  if (rows == 0 || channels == 0) return false;
  require_data(grad_out, "grad_out");
  require_data(in, "in");
  require_data(weight, "weight");
  require_data(rstd, "rstd");
  require_data(grad_in, "grad_in");
  require_data(grad_weight, "grad_weight");
  return true;
}

// rope_forward's / rope_backward's arguments (data_name: "x" or "grad"); false when there
// are no rows or no heads. head_size, theta and scaling are checked even then.
inline bool check_rope(int64_t rows, int64_t row_stride, int64_t col_offset, int64_t heads,
                       int64_t head_size, const int32_t* positions, float theta, float scaling,
                       const float* data, const char* data_name) {
  require_size(rows, "rows");
  require_size(row_stride, "row_stride");
  require_size(col_offset, "col_offset");
  require_size(heads, "heads");
  require(head_size >= 2 && head_size % 2 == 0, ErrorCode::InvalidArgument,
          "head_size must be even and >= 2, got " + std::to_string(head_size), "head_size");
  // col_offset + heads * head_size <= row_stride, without overflow.
  require(col_offset <= row_stride && heads <= (row_stride - col_offset) / head_size,
          ErrorCode::InvalidArgument,
          "col_offset + heads * head_size (" + std::to_string(col_offset) + " + " +
              std::to_string(heads) + " * " + std::to_string(head_size) +
              ") must be <= row_stride (" + std::to_string(row_stride) + ")",
          "row_stride");
  require(std::isfinite(theta) && theta > 0.0f, ErrorCode::InvalidArgument,
          "theta must be finite and > 0, got " + std::to_string(theta), "theta");
  require(std::isfinite(scaling) && scaling > 0.0f, ErrorCode::InvalidArgument,
          "scaling must be finite and > 0, got " + std::to_string(scaling), "scaling");
  if (rows == 0 || heads == 0) return false;
  require_data(positions, "positions");
  require_data(data, data_name);
  return true;
}

// The inverse frequency of rotary pair i (0 <= i < head_size / 2), as the contract fixes
// it: computed in double, rounded once to float.
inline float rope_inv_freq(float theta, int64_t i, int64_t head_size) {
  return static_cast<float>(
      1.0 / std::pow(static_cast<double>(theta),
                     2.0 * static_cast<double>(i) / static_cast<double>(head_size)));
}

// swiglu_forward's arguments; false when the input is empty.
inline bool check_swiglu_forward(int64_t rows, int64_t hidden, const float* gate_up,
                                 const float* out) {
  require_size(rows, "rows");
  require_size(hidden, "hidden");
  if (rows == 0 || hidden == 0) return false;
  require_data(gate_up, "gate_up");
  require_data(out, "out");
  return true;
}

// swiglu_backward's arguments; false when the input is empty.
inline bool check_swiglu_backward(int64_t rows, int64_t hidden, const float* gate_up,
                                  const float* grad_out, const float* grad_gate_up) {
  require_size(rows, "rows");
  require_size(hidden, "hidden");
  if (rows == 0 || hidden == 0) return false;
  require_data(gate_up, "gate_up");
  require_data(grad_out, "grad_out");
  require_data(grad_gate_up, "grad_gate_up");
  return true;
}

}  // namespace ppo::cpu
