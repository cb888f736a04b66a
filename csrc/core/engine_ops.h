// The transformer engine's op table: one per device, like core/backend.h's table of the
// RLHF kernels. model/gpt.cpp runs every pass through it, so the same engine code drives
// the CPU (cpu/engine_ops.cpp: thin wrappers of cpu/layers.h, attention.h, matmul.h,
// optimizer.h) and CUDA (cuda/engine_ops.cu over cuda/engine_kernels.h).
//
// Every pointer below is a pointer of the table's device (host memory for the CPU, device
// memory for CUDA), integer index arrays included. Sizes are host integers. The math of
// each op is the CPU function of the same name (its header is named on each entry);
// where an entry is new here, its contract is written here. Every op throws ppo::Error
// on failure (InvalidArgument for bad sizes, CudaError / OutOfMemory from the runtime)
// and never aborts. Ops may run asynchronously on their device's stream; the memory
// copies to the host (copy_to_host) wait for them, so a result read on the host is
// always complete.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/backend.h"

namespace ppo {

// Next-token sampling for a batch of rows on the device (model/sampling.h's sample_token,
// row by row, with the uniform draw made by the caller's host Rng).
struct SampleTokensArgs {
  int64_t rows = 0, vocab = 0;
  // [rows, vocab]: the raw logits of each row (the LM head's output). Not modified.
  const float* logits = nullptr;
  // [rows, vocab] scratch the op may clobber (the processed logits of each row).
  float* scratch = nullptr;
  // Repetition penalty: row r penalizes the distinct ids among
  // penalized[r * penalized_stride + 0 .. penalized_count[r]) (each id once).
  const int32_t* penalized = nullptr;
  const int32_t* penalized_count = nullptr;  // [rows]
  int64_t penalized_stride = 0;
  // [rows]: 1 = sample this row, 0 = skip it (tokens/logprobs/status untouched).
  const int32_t* active = nullptr;
  // [rows]: row r's draw u in [0, 1) (ignored when greedy).
  const double* uniforms = nullptr;
  bool greedy = false;
  float temperature = 1.0f, top_p = 1.0f, repetition_penalty = 1.0f;
  int64_t top_k = 0;
  // Outputs, [rows] each, for the active rows:
  int32_t* tokens = nullptr;    // the chosen id (as sample_token would choose with draw u)
  float* logprobs = nullptr;    // log_softmax(raw logits row)[token] (temperature 1, no penalty)
  // 0: ok; 1: the raw row holds NaN or +inf, or every logit is -inf after the penalty
  // (sample_token's NonFinite "logits"); 2: the penalty overflowed a logit to +inf
  // (NonFinite "repetition_penalty"). tokens/logprobs are unspecified when nonzero.
  int32_t* status = nullptr;
};

struct EngineOps {
  Device device;

  // ---- memory (bytes) ------------------------------------------------------------------
  void* (*alloc)(size_t bytes);  // throws OutOfMemory; 0 bytes may give nullptr
  void (*free)(void* ptr) noexcept;
  void (*copy_to_device)(void* dst, const void* host_src, size_t bytes);
  void (*copy_to_host)(void* host_dst, const void* src, size_t bytes);  // waits for the ops before it
  void (*copy_within)(void* dst, const void* src, size_t bytes);       // device to device
  void (*zero)(void* ptr, size_t bytes);
  // Waits for every op queued so far and reports a failure raised while they ran.
  void (*synchronize)();

  // ---- dense layers (cpu/matmul.h, cpu/layers.h) ------------------------------------------
  // C[m, n] = alpha op(A) op(B) + beta C, row-major with leading dimensions (cpu::matmul).
  // CUDA: a tensor-core kernel (TF32 by default; PPO_CUDA_MATMUL=bf16|fp32|cublas picks
  // another path), float32 accumulation, no split of k (deterministic).
  void (*matmul)(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                 int64_t ldc);
  void (*add_bias)(int64_t rows, int64_t channels, const float* bias, float* out);
  void (*bias_backward)(int64_t rows, int64_t channels, const float* grad_out, float* grad_bias);
  void (*layernorm_forward)(int64_t rows, int64_t channels, const float* in, const float* weight,
                            const float* bias, float eps, float* out, float* mean, float* rstd);
  void (*layernorm_backward)(int64_t rows, int64_t channels, const float* grad_out, const float* in,
                             const float* weight, const float* mean, const float* rstd,
                             float* grad_in, float* grad_weight, float* grad_bias);
  void (*gelu_forward)(int64_t n, const float* in, float* out);
  void (*gelu_backward)(int64_t n, const float* in, const float* grad_out, float* grad_in);
  void (*add)(int64_t n, const float* a, const float* b, float* out);
  void (*accumulate)(int64_t n, const float* x, float* y);
  void (*embedding_forward)(int64_t rows, int64_t channels, const int32_t* tokens,
                            const int32_t* positions, const float* wte, const float* wpe, float* out);
  void (*embedding_backward)(int64_t rows, int64_t channels, const float* grad_out,
                             const int32_t* tokens, const int32_t* positions, float* grad_wte,
                             float* grad_wpe);

  // ---- the Llama family's layers (cpu/llama_layers.h) ----------------------------------------
  void (*rmsnorm_forward)(int64_t rows, int64_t channels, const float* in, const float* weight, float eps,
                          float* out, float* rstd);
  void (*rmsnorm_backward)(int64_t rows, int64_t channels, const float* grad_out, const float* in,
                           const float* weight, const float* rstd, float* grad_in, float* grad_weight);
  // Rotary positions in place on `heads` heads from column col_offset of rows of row_stride.
  void (*rope_forward)(int64_t rows, int64_t row_stride, int64_t col_offset, int64_t heads,
                       int64_t head_size, const int32_t* positions, float theta, float scaling, float* x);
  void (*rope_backward)(int64_t rows, int64_t row_stride, int64_t col_offset, int64_t heads,
                        int64_t head_size, const int32_t* positions, float theta, float scaling,
                        float* grad);
  void (*swiglu_forward)(int64_t rows, int64_t hidden, const float* gate_up, float* out);
  void (*swiglu_backward)(int64_t rows, int64_t hidden, const float* gate_up, const float* grad_out,
                          float* grad_gate_up);

  // ---- attention (cpu/attention.h) ----------------------------------------------------------
  // Causal attention with H query heads and KVH key/value heads of hs columns each
  // (grouped-query attention: query head h reads kv head h / (H / KVH); KVH == H is
  // GPT-2's multi-head attention). qkv [B, T, (H + 2 KVH) hs]: row (b, t) is
  // [q (H hs) | k (KVH hs) | v (KVH hs)]; out [B, T, H hs]; scores scaled by 1/sqrt(hs).
  // What a retained forward saves per (B, T, H) for the backward pass, in floats: the CPU
  // keeps the probabilities (B*H*T*T); CUDA's fused kernel keeps each query row's
  // log-sum-exp of scores (B*H*T) and recomputes the probabilities in backward.
  int64_t (*attention_saved_floats)(int64_t B, int64_t T, int64_t H);
  // saved: nullptr (no backward follows) or attention_saved_floats(B, T, H) floats.
  // Padded rows (t >= lengths[b]) of out are 0.
  void (*attention_forward)(int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t hs,
                            const int32_t* lengths, const float* qkv, float* saved, float* out);
  // grad_qkv [B, T, (H + 2 KVH) hs] += d(sum grad_out * out)/d qkv, given the forward's
  // qkv, out and saved. Padded rows of grad_qkv are left untouched.
  void (*attention_backward)(int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t hs,
                             const int32_t* lengths, const float* grad_out, const float* qkv,
                             const float* out, const float* saved, float* grad_qkv);
  // The KV cache of one layer: k_cache, v_cache [B, cache_T, KVH hs].
  void (*kv_cache_store)(int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t hs,
                         const int32_t* lengths, const float* qkv, int64_t cache_T, float* k_cache,
                         float* v_cache);
  // One decoding step: qkv [B, (H + 2 KVH) hs], out [B, H hs].
  void (*attention_decode)(int64_t B, int64_t H, int64_t KVH, int64_t hs, const int32_t* positions,
                           const float* qkv, int64_t cache_T, float* k_cache, float* v_cache,
                           float* out);

  // ---- the heads ------------------------------------------------------------------------------
  // dst[i, :] = src[index[i], :] for i < rows (rows of `channels` floats).
  void (*gather_rows)(int64_t rows, int64_t channels, const int64_t* index, const float* src,
                      float* dst);
  // dst[index[i], :] += src[i, :] for i < rows; the indices are distinct.
  void (*scatter_add_rows)(int64_t rows, int64_t channels, const int64_t* index, const float* src,
                           float* dst);
  // data[r, :] = 0 for the rows with positions[r] < 0 (padding).
  void (*zero_padded_rows)(int64_t rows, int64_t width, const int32_t* positions, float* data);
  // The value head: out[r] = sum_c x[r, c] w[c] (accumulated in double) where
  // positions[r] >= 0, and 0 at padding.
  void (*value_head_forward)(int64_t rows, int64_t channels, const float* x, const float* w,
                             const int32_t* positions, float* out);
  // Its backward for grad [rows] (0 at padding): grad_x[r, :] += grad[r] w;
  // grad_w += sum_r grad[r] x[r, :].
  void (*value_head_backward)(int64_t rows, int64_t channels, const float* grad, const float* x,
                              const float* w, float* grad_x, float* grad_w);
  // Log-probs and entropy of rows of logits (core/op_args.h; device pointers).
  void (*logprobs_forward)(const LogprobsArgs& args);
  void (*logprobs_backward)(const LogprobsBackwardArgs& args);
  void (*sample_tokens)(const SampleTokensArgs& args);

  // ---- the optimizer (cpu/optimizer.h) --------------------------------------------------------
  void (*adamw_update)(int64_t n, float* param, const float* grad, float* m, float* v, float lr,
                       float beta1, float beta2, float eps, float weight_decay, int64_t step);
  double (*sum_of_squares)(int64_t n, const float* x);  // deterministic
  void (*scale_in_place)(int64_t n, float* x, float factor);
};

// The CPU table, always present.
const EngineOps& cpu_engine_ops();
// The table for `device`; throws ppo::Error(CudaUnavailable) with the reason when CUDA is
// asked for and cannot be used.
const EngineOps& engine_ops_for(Device device);

namespace cuda {
const EngineOps& engine_ops();  // only called when device_usable()
}  // namespace cuda

}  // namespace ppo
