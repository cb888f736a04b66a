// The CUDA kernels of the Llama-family layers (llama_layers.cu): RMSNorm, rotary position
// embeddings (RoPE, Hugging Face Llama's rotate_half layout) and SwiGLU, each the twin of
// the CPU function of the same name in cpu/llama_layers.h, whose contract it follows
// (same math, same argument checks and messages).
//
// Every pointer is a device pointer. Each function launches on the default stream (0),
// checks each launch (PPO_CUDA_CHECK_LAUNCH) and does not synchronize. Deterministic: the
// same inputs give bit-identical outputs from run to run (no floating-point atomics; the
// column sum of rmsnorm_backward splits its rows into chunks that depend on the shape only).
// Backward functions ACCUMULATE (+=) into their gradients, as on the CPU.
#pragma once

#include <cstdint>

namespace ppo::cuda {

// ---- RMSNorm -----------------------------------------------------------------------------
// rstd[r] = 1 / sqrt(mean_c in[r, c]^2 + eps) (the sum of squares in double);
// out[r, c] = in[r, c] * rstd[r] * weight[c]. rstd [rows] is saved for the backward pass.
void rmsnorm_forward(int64_t rows, int64_t channels, const float* in, const float* weight,
                     float eps, float* out, float* rstd);

// grad_in [rows, channels] += dL/din;
// grad_weight [channels]   += sum_r grad_out[r, c] * in[r, c] * rstd[r]
// (the column sum is two-stage over fixed chunks of rows: deterministic).
void rmsnorm_backward(int64_t rows, int64_t channels, const float* grad_out, const float* in,
                      const float* weight, const float* rstd, float* grad_in, float* grad_weight);

// ---- RoPE --------------------------------------------------------------------------------
// In place on x [rows, row_stride]: for every row r with positions[r] >= 0, every head
// h < heads and i < head_size / 2, with j = col_offset + h * head_size:
//   inv_freq_i = (float)(1.0 / pow((double)theta, 2.0 * i / head_size))
//   angle      = ((float)positions[r] / scaling) * inv_freq_i        (float)
//   c = cosf(angle), s = sinf(angle)
//   x[r, j + i]                 = x1 * c - x2 * s
//   x[r, j + i + head_size / 2] = x2 * c + x1 * s
// with x1, x2 the old values. Rows with positions[r] < 0 (padding) are left untouched.
void rope_forward(int64_t rows, int64_t row_stride, int64_t col_offset, int64_t heads,
                  int64_t head_size, const int32_t* positions, float theta, float scaling,
                  float* x);

// The transpose rotation, in place on grad (same layout and arguments):
//   g1' = g1 * c + g2 * s,  g2' = g2 * c - g1 * s.
void rope_backward(int64_t rows, int64_t row_stride, int64_t col_offset, int64_t heads,
                   int64_t head_size, const int32_t* positions, float theta, float scaling,
                   float* grad);

// ---- SwiGLU ------------------------------------------------------------------------------
// gate_up [rows, 2 * hidden] = [gate | up]; out [rows, hidden] = silu(gate) * up,
// silu(x) = x / (1 + exp(-x)) evaluated without overflow.
void swiglu_forward(int64_t rows, int64_t hidden, const float* gate_up, float* out);

// grad_gate_up [rows, 2 * hidden] += (d gate | d up) for out's gradient grad_out [rows, hidden].
void swiglu_backward(int64_t rows, int64_t hidden, const float* gate_up, const float* grad_out,
                     float* grad_gate_up);

}  // namespace ppo::cuda
