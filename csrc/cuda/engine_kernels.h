// The CUDA kernels of the transformer engine: one function per entry of ppo::EngineOps
// (core/engine_ops.h, where each contract is written), grouped by file. Every pointer is
// a device pointer. Each function launches on the default stream and checks the launch
// (PPO_CUDA_CHECK_LAUNCH); those that return a host value synchronize. Deterministic:
// the same inputs give bit-identical outputs from run to run (no floating-point atomics;
// every reduction splits its work by the shapes only).
#pragma once

#include <cstdint>

#include "core/engine_ops.h"

namespace ppo::cuda {

// matmul.cu: C = alpha op(A) op(B) + beta C (cpu::matmul's contract) on the tensor cores.
void matmul(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
            const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
            int64_t ldc);
// The path matmul takes: "tf32" (default), "bf16", "fp32" (CUDA cores, no tensor cores)
// or "cublas" (only in builds where CMake found cuBLAS), chosen by PPO_CUDA_MATMUL, read
// once. For reports.
const char* matmul_path();
// The same product on an explicitly chosen path (benchmarks and tests compare them).
// Throws InvalidArgument for an unknown path, CudaUnavailable for "cublas" without it.
void matmul_on_path(const char* path, bool transpose_a, bool transpose_b, int64_t m, int64_t n,
                    int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                    int64_t ldb, float beta, float* c, int64_t ldc);

// layers.cu
void add_bias(int64_t rows, int64_t channels, const float* bias, float* out);
void bias_backward(int64_t rows, int64_t channels, const float* grad_out, float* grad_bias);
void layernorm_forward(int64_t rows, int64_t channels, const float* in, const float* weight,
                       const float* bias, float eps, float* out, float* mean, float* rstd);
void layernorm_backward(int64_t rows, int64_t channels, const float* grad_out, const float* in,
                        const float* weight, const float* mean, const float* rstd, float* grad_in,
                        float* grad_weight, float* grad_bias);
void gelu_forward(int64_t n, const float* in, float* out);
void gelu_backward(int64_t n, const float* in, const float* grad_out, float* grad_in);
void add(int64_t n, const float* a, const float* b, float* out);
void accumulate(int64_t n, const float* x, float* y);
void embedding_forward(int64_t rows, int64_t channels, const int32_t* tokens,
                       const int32_t* positions, const float* wte, const float* wpe, float* out);
void embedding_backward(int64_t rows, int64_t channels, const float* grad_out,
                        const int32_t* tokens, const int32_t* positions, float* grad_wte,
                        float* grad_wpe);
void gather_rows(int64_t rows, int64_t channels, const int64_t* index, const float* src, float* dst);
void scatter_add_rows(int64_t rows, int64_t channels, const int64_t* index, const float* src,
                      float* dst);
void zero_padded_rows(int64_t rows, int64_t width, const int32_t* positions, float* data);
void value_head_forward(int64_t rows, int64_t channels, const float* x, const float* w,
                        const int32_t* positions, float* out);
void value_head_backward(int64_t rows, int64_t channels, const float* grad, const float* x,
                         const float* w, float* grad_x, float* grad_w);

// attention.cu: fused causal attention with H query heads and KVH key/value heads of hs
// columns each (grouped-query; KVH == H is multi-head), no T x T matrix in memory, its
// backward, and the KV-cache path (caches [B, cache_T, KVH hs]).
int64_t attention_saved_floats(int64_t B, int64_t T, int64_t H);
void attention_forward(int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t hs,
                       const int32_t* lengths, const float* qkv, float* saved, float* out);
void attention_backward(int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t hs,
                        const int32_t* lengths, const float* grad_out, const float* qkv,
                        const float* out, const float* saved, float* grad_qkv);
void kv_cache_store(int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t hs,
                    const int32_t* lengths, const float* qkv, int64_t cache_T, float* k_cache,
                    float* v_cache);
void attention_decode(int64_t B, int64_t H, int64_t KVH, int64_t hs, const int32_t* positions,
                      const float* qkv, int64_t cache_T, float* k_cache, float* v_cache,
                      float* out);

// optimizer.cu
void adamw_update(int64_t n, float* param, const float* grad, float* m, float* v, float lr,
                  float beta1, float beta2, float eps, float weight_decay, int64_t step);
double sum_of_squares(int64_t n, const float* x);
void scale_in_place(int64_t n, float* x, float factor);

// sampling.cu
void sample_tokens(const SampleTokensArgs& args);

}  // namespace ppo::cuda
