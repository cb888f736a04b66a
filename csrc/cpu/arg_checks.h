// Argument checks shared by the engine kernels' entry points on both devices (cpu/ and
// cuda/: layers, attention, optimizer), so the CPU and CUDA functions refuse the same
// inputs with the same messages: each throws ppo::Error(InvalidArgument) naming the
// argument. Only host values are checked (sizes, scalars, null pointers), never the data.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "core/error.h"

namespace ppo::cpu {

// A size (rows, channels, n, ...) must be >= 0.
inline void require_size(int64_t value, const char* name) {
  require(value >= 0, ErrorCode::InvalidArgument,
          std::string(name) + " must be >= 0, got " + std::to_string(value), name);
}

// A pointer to a non-empty array must not be null.
inline void require_data(const void* p, const char* name) {
  require(p != nullptr, ErrorCode::InvalidArgument, std::string(name) + " must not be null", name);
}

// The arguments of the dense layers' small ops (cpu/layers.h): sizes >= 0, then (when
// there is work) non-null arrays. Each returns false when there is nothing to do.
inline bool check_add_bias(int64_t rows, int64_t channels, const void* bias, const void* out) {
  require_size(rows, "rows");
  require_size(channels, "channels");
  if (rows == 0 || channels == 0) return false;
  require_data(bias, "bias");
  require_data(out, "out");
  return true;
}

inline bool check_bias_backward(int64_t rows, int64_t channels, const void* grad_out, const void* grad_bias) {
  require_size(rows, "rows");
  require_size(channels, "channels");
  if (rows == 0 || channels == 0) return false;
  require_data(grad_out, "grad_out");
  require_data(grad_bias, "grad_bias");
  return true;
}

inline bool check_gelu_forward(int64_t n, const void* in, const void* out) {
  require_size(n, "n");
  if (n == 0) return false;
  require_data(in, "in");
  require_data(out, "out");
  return true;
}

inline bool check_gelu_backward(int64_t n, const void* in, const void* grad_out, const void* grad_in) {
  require_size(n, "n");
  if (n == 0) return false;
  require_data(in, "in");
  require_data(grad_out, "grad_out");
  require_data(grad_in, "grad_in");
  return true;
}

inline bool check_add(int64_t n, const void* a, const void* b, const void* out) {
  require_size(n, "n");
  if (n == 0) return false;
  require_data(a, "a");
  require_data(b, "b");
  require_data(out, "out");
  return true;
}

inline bool check_accumulate(int64_t n, const void* x, const void* y) {
  require_size(n, "n");
  if (n == 0) return false;
  require_data(x, "x");
  require_data(y, "y");
  return true;
}

inline bool check_embedding_forward(int64_t rows, int64_t channels, const void* tokens, const void* positions, const void* wte, const void* out) {
  require_size(rows, "rows");
  require_size(channels, "channels");
  if (rows == 0 || channels == 0) return false;
  require_data(tokens, "tokens");
  require_data(positions, "positions");
  require_data(wte, "wte");
  require_data(out, "out");
  return true;
}

inline bool check_embedding_backward(int64_t rows, int64_t channels, const void* grad_out, const void* tokens, const void* positions, const void* grad_wte) {
  require_size(rows, "rows");
  require_size(channels, "channels");
  if (rows == 0 || channels == 0) return false;
  require_data(grad_out, "grad_out");
  require_data(tokens, "tokens");
  require_data(positions, "positions");
  require_data(grad_wte, "grad_wte");
  return true;
}

// The grouped-query attention layout (cpu/attention.h, cuda/attention.cu): heads (H),
// kv_heads (KVH) and head_size (hs) >= 0, and >= 1 when the call has work; H a multiple
// of KVH.
inline void require_heads(int64_t H, int64_t KVH, int64_t hs, bool has_work) {
  require_size(H, "heads");
  require_size(KVH, "kv_heads");
  require_size(hs, "head_size");
  if (has_work) {
    require(H >= 1, ErrorCode::InvalidArgument, "heads must be >= 1, got " + std::to_string(H), "heads");
    require(KVH >= 1, ErrorCode::InvalidArgument, "kv_heads must be >= 1, got " + std::to_string(KVH), "kv_heads");
    require(hs >= 1, ErrorCode::InvalidArgument, "head_size must be >= 1, got " + std::to_string(hs), "head_size");
  }
  require(KVH == 0 || H % KVH == 0, ErrorCode::InvalidArgument,
          "heads (" + std::to_string(H) + ") must be a multiple of kv_heads (" + std::to_string(KVH) + ")",
          "kv_heads");
}

// layernorm_forward's arguments (cpu/layers.h); false when there are no rows (nothing to do).
inline bool check_layernorm_forward(int64_t rows, int64_t channels, const float* in, const float* weight,
                                    const float* bias, float eps, const float* out, const float* mean,
                                    const float* rstd) {
  require_size(rows, "rows");
  require_size(channels, "channels");
  require(channels > 0 || rows == 0, ErrorCode::InvalidArgument,
          "channels must be >= 1 when rows > 0 (the mean of an empty row is undefined)", "channels");
  require(std::isfinite(eps) && eps >= 0.0f, ErrorCode::InvalidArgument, "eps must be finite and >= 0", "eps");
  if (rows == 0) return false;
  require_data(in, "in");
  require_data(weight, "weight");
  require_data(bias, "bias");
  require_data(out, "out");
  require_data(mean, "mean");
  require_data(rstd, "rstd");
  return true;
}

// layernorm_backward's arguments; false when the input is empty.
inline bool check_layernorm_backward(int64_t rows, int64_t channels, const float* grad_out, const float* in,
                                     const float* weight, const float* mean, const float* rstd,
                                     const float* grad_in, const float* grad_weight, const float* grad_bias) {
  require_size(rows, "rows");
  require_size(channels, "channels");
  if (rows == 0 || channels == 0) return false;
  require_data(grad_out, "grad_out");
  require_data(in, "in");
  require_data(weight, "weight");
  require_data(mean, "mean");
  require_data(rstd, "rstd");
  require_data(grad_in, "grad_in");
  require_data(grad_weight, "grad_weight");
  require_data(grad_bias, "grad_bias");
  return true;
}

// The per-call scalars of one AdamW step (cpu/optimizer.h), in PyTorch's order:
//   p *= decay;  m = beta1 m + one_minus_beta1 g;  v = beta2 v + one_minus_beta2 g^2;
//   p -= step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps).
struct AdamWScalars {
  float decay;         // 1 - lr * weight_decay
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float step_size;     // lr / (1 - beta1^t)
  float inv_sqrt_bc2;  // 1 / sqrt(1 - beta2^t)
  float eps;
};

// Checks adamw_update's arguments and computes its scalars. Bias corrections in double:
// 1 - beta^t loses nothing for small t (beta2 = 0.999, t = 1 gives 1e-3 exactly to double
// precision) and tends to 1 for large t; each scalar is rounded once to float.
// *has_work is false when n == 0 (then the pointers are not checked).
inline AdamWScalars check_adamw(int64_t n, const float* param, const float* grad, const float* m,
                                const float* v, float lr, float beta1, float beta2, float eps,
                                float weight_decay, int64_t step, bool* has_work) {
  auto require_beta = [](float beta, const char* name) {  // false for NaN
    require(beta >= 0.0f && beta < 1.0f, ErrorCode::InvalidArgument,
            std::string(name) + " must be in [0, 1), got " + std::to_string(beta), name);
  };
  require_size(n, "n");
  require(step >= 1, ErrorCode::InvalidArgument,
          "step must be >= 1 (the 1-based index of this step), got " + std::to_string(step), "step");
  require(std::isfinite(lr) && lr >= 0.0f, ErrorCode::InvalidArgument,
          "lr must be finite and >= 0, got " + std::to_string(lr), "lr");
  require_beta(beta1, "beta1");
  require_beta(beta2, "beta2");
  require(std::isfinite(eps) && eps >= 0.0f, ErrorCode::InvalidArgument,
          "eps must be finite and >= 0, got " + std::to_string(eps), "eps");
  require(std::isfinite(weight_decay) && weight_decay >= 0.0f, ErrorCode::InvalidArgument,
          "weight_decay must be finite and >= 0, got " + std::to_string(weight_decay), "weight_decay");
  *has_work = n > 0;
  if (n > 0) {
    require_data(param, "param");
    require_data(grad, "grad");
    require_data(m, "m");
    require_data(v, "v");
  }
  const double t = static_cast<double>(step);
  const double bc1 = 1.0 - std::pow(static_cast<double>(beta1), t);
  const double bc2 = 1.0 - std::pow(static_cast<double>(beta2), t);
  AdamWScalars s;
  s.decay = static_cast<float>(1.0 - static_cast<double>(lr) * weight_decay);
  s.beta1 = beta1;
  s.one_minus_beta1 = static_cast<float>(1.0 - static_cast<double>(beta1));
  s.beta2 = beta2;
  s.one_minus_beta2 = static_cast<float>(1.0 - static_cast<double>(beta2));
  s.step_size = static_cast<float>(static_cast<double>(lr) / bc1);
  s.inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  s.eps = eps;
  return s;
}

}  // namespace ppo::cpu
