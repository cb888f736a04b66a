// Elementwise and per-row layers of the GPT-2 engine on the CPU: LayerNorm and GELU,
// each op's forward and backward side by side (layers.cpp), llm.c-style.
//
// Conventions shared by every function here:
//   - Row-major float32, [rows, channels] for activations, [channels] for parameters.
//   - Backward functions ACCUMULATE (+=) into every gradient they produce, as in llm.c:
//     a residual stream sums the gradients of its branches, and parameter gradients
//     sum over micro-batches. Zero the buffers before the first call.
//   - Deterministic: results are bit-identical across runs and across PPO_MAX_THREADS
//     settings on one machine (the split of work into partial sums depends only on the
//     shapes). Different instruction sets (AVX-512 / AVX2 / baseline clones) may differ
//     in the last bits.
//   - Inputs and outputs must not overlap, except where a function says otherwise.
//   - Throws ppo::Error(InvalidArgument) naming the argument for negative sizes, a
//     negative or non-finite eps, or a null pointer to a non-empty array.
#pragma once

#include <cstdint>

namespace ppo::cpu {

// ---- LayerNorm -------------------------------------------------------------------------
// out[r, c] = (in[r, c] - mean[r]) * rstd[r] * weight[c] + bias[c]
// mean[r] = (1/C) sum_c in[r, c];  rstd[r] = 1 / sqrt(var[r] + eps), var the biased
// (1/C) variance. mean and rstd [rows] are written for the backward pass. The mean and
// variance are accumulated in double (two passes), and the output subtracts the mean as
// float hi + lo parts, so rows whose mean is large next to their spread (e.g. 1e4 +
// noise) normalize to float accuracy. A row whose variance is 0 (e.g. channels == 1)
// has rstd = 1/sqrt(eps) and out = bias.
void layernorm_forward(int64_t rows, int64_t channels, const float* in, const float* weight,
                       const float* bias, float eps, float* out, float* mean, float* rstd);

// Given grad_out [rows, channels] and the forward's in, weight, mean, rstd:
//   grad_in     [rows, channels] += dL/din
//   grad_weight [channels]       += sum_r grad_out[r, c] * xhat[r, c]
//   grad_bias   [channels]       += sum_r grad_out[r, c]
// with xhat = (in - mean) * rstd. The parameter gradients are summed over rows in
// fixed chunks of rows (a function of rows only), combined in chunk order.
void layernorm_backward(int64_t rows, int64_t channels, const float* grad_out, const float* in,
                        const float* weight, const float* mean, const float* rstd,
                        float* grad_in, float* grad_weight, float* grad_bias);

// ---- GELU (GPT-2's tanh approximation) -------------------------------------------------
// out[i] = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), x = in[i]; n elements.
// Accurate to a few float ulps (~5e-7 relative). out may equal in (in place).
void gelu_forward(int64_t n, const float* in, float* out);

// grad_in[i] += gelu'(in[i]) * grad_out[i].
void gelu_backward(int64_t n, const float* in, const float* grad_out, float* grad_in);

}  // namespace ppo::cpu

namespace ppo::cpu {

// ---- token and position embeddings ------------------------------------------------------
// out[r, :] = wte[tokens[r], :] + wpe[positions[r], :] for rows with positions[r] >= 0;
// rows with positions[r] < 0 are padding and written as 0 (tokens[r] is not read).
// wte [vocab, C], wpe [n_positions, C] or nullptr (no learned positions: out = wte rows);
// the caller has validated ids and positions.
void embedding_forward(int64_t rows, int64_t channels, const int32_t* tokens,
                       const int32_t* positions, const float* wte, const float* wpe,
                       float* out);

// grad_wte[tokens[r], :] += grad_out[r, :] and grad_wpe[positions[r], :] += grad_out[r, :]
// over the rows with positions[r] >= 0, in row order for every channel (threads split
// the channels), so repeated ids sum deterministically. grad_wpe may be nullptr.
void embedding_backward(int64_t rows, int64_t channels, const float* grad_out,
                        const int32_t* tokens, const int32_t* positions, float* grad_wte,
                        float* grad_wpe);

// ---- bias of a dense layer ---------------------------------------------------------------
// out[r, c] += bias[c]
void add_bias(int64_t rows, int64_t channels, const float* bias, float* out);
// grad_bias[c] += sum_r grad_out[r, c], summed over fixed chunks of rows combined in order.
void bias_backward(int64_t rows, int64_t channels, const float* grad_out, float* grad_bias);

// ---- residual ----------------------------------------------------------------------------
// out[i] = a[i] + b[i] (out may equal a or b).
void add(int64_t n, const float* a, const float* b, float* out);
// y[i] += x[i]
void accumulate(int64_t n, const float* x, float* y);

}  // namespace ppo::cpu
