// The optimizer kernels on CUDA (engine_kernels.h; contracts in cpu/optimizer.h): AdamW
// over the flat parameter buffer, and the pieces of global gradient-norm clipping.
//
// adamw_update and scale_in_place are elementwise grid-stride loops; the argument checks
// and AdamW's per-call scalars (bias corrections in double on the host, rounded once to
// float) are cpu::adamw_update's, so the elementwise float math sees the same scalars.
// The elementwise math rounds sqrt and divide correctly (__fsqrt_rn / __fdiv_rn, whatever
// the compiler's fast-math flags); the compiler may contract a multiply and add into an
// FMA where the CPU does not, so the two may differ in the last bit.
// sum_of_squares is the deterministic two-stage reduction of device_common.cuh, in
// double, and the only op here that synchronizes (its result is a host value).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "core/error.h"
#include "cpu/arg_checks.h"
#include "cuda/cuda_check.h"
#include "cuda/device_common.cuh"
#include "cuda/engine_kernels.h"

namespace ppo::cuda {
namespace {

using cpu::require_data;
using cpu::require_size;

// beta in [0, 1) (false for NaN); cpu/optimizer.cpp's check and message.
void require_beta(float beta, const char* name) {
  require(beta >= 0.0f && beta < 1.0f, ErrorCode::InvalidArgument,
          std::string(name) + " must be in [0, 1), got " + std::to_string(beta), name);
}

// AdamW's per-call scalars, computed on the host (see adamw_update).
struct AdamScalars {
  float decay;            // 1 - lr * weight_decay
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float step_size;        // lr / (1 - beta1^t)
  float inv_sqrt_bc2;     // 1 / sqrt(1 - beta2^t)
  float eps;
};

// One AdamW step on n elements, PyTorch's order (torch.optim.AdamW, single-tensor path):
//   m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2;
//   p = p (1 - lr wd) - step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps).
// grad does not overlap param, m or v (the CPU contract); param, m, v are distinct.
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(int64_t n, float* __restrict__ param, const float* __restrict__ grad,
                 float* __restrict__ m, float* __restrict__ v, AdamScalars s) {
  for (int64_t i = global_thread_index(); i < n; i += grid_thread_count()) {
    const float g = grad[i];
    const float mi = s.beta1 * m[i] + s.one_minus_beta1 * g;
    const float vi = s.beta2 * v[i] + s.one_minus_beta2 * (g * g);
    m[i] = mi;
    v[i] = vi;
    const float denom = __fsqrt_rn(vi) * s.inv_sqrt_bc2 + s.eps;
    param[i] = param[i] * s.decay - s.step_size * __fdiv_rn(mi, denom);
  }
}

// Stage 1 of sum_of_squares: each thread sums x[i]^2 in double over its grid-stride
// elements (in order), each block reduces its threads in block_sum's fixed tree. The
// grid is reduction_blocks(n): a function of n only.
__global__ void __launch_bounds__(kThreads)
    sum_of_squares_kernel(int64_t n, const float* __restrict__ x, Sums<1>* __restrict__ partials) {
  Sums<1> s{};
  for (int64_t i = global_thread_index(); i < n; i += grid_thread_count()) {
    const double xi = static_cast<double>(x[i]);
    s.v[0] += xi * xi;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

__global__ void __launch_bounds__(kThreads)
    scale_kernel(int64_t n, float* __restrict__ x, float factor) {
  for (int64_t i = global_thread_index(); i < n; i += grid_thread_count()) x[i] *= factor;
}

}  // namespace

void adamw_update(int64_t n, float* param, const float* grad, float* m, float* v, float lr,
                  float beta1, float beta2, float eps, float weight_decay, int64_t step) {
  require_size(n, "n");
  require(step >= 1, ErrorCode::InvalidArgument,
          "step must be >= 1 (the 1-based index of this step), got " + std::to_string(step),
          "step");
  require(std::isfinite(lr) && lr >= 0.0f, ErrorCode::InvalidArgument,
          "lr must be finite and >= 0, got " + std::to_string(lr), "lr");
  require_beta(beta1, "beta1");
  require_beta(beta2, "beta2");
  require(std::isfinite(eps) && eps >= 0.0f, ErrorCode::InvalidArgument,
          "eps must be finite and >= 0, got " + std::to_string(eps), "eps");
  require(std::isfinite(weight_decay) && weight_decay >= 0.0f, ErrorCode::InvalidArgument,
          "weight_decay must be finite and >= 0, got " + std::to_string(weight_decay),
          "weight_decay");
  if (n == 0) return;
  require_data(param, "param");
  require_data(grad, "grad");
  require_data(m, "m");
  require_data(v, "v");

  // cpu::adamw_update's scalars, computed the same way: bias corrections in double
  // (1 - beta^t loses nothing for small t), each rounded once to float.
  const double t = static_cast<double>(step);
  const double bc1 = 1.0 - std::pow(static_cast<double>(beta1), t);
  const double bc2 = 1.0 - std::pow(static_cast<double>(beta2), t);
  AdamScalars s;
  s.decay = static_cast<float>(1.0 - static_cast<double>(lr) * weight_decay);
  s.beta1 = beta1;
  s.one_minus_beta1 = static_cast<float>(1.0 - static_cast<double>(beta1));
  s.beta2 = beta2;
  s.one_minus_beta2 = static_cast<float>(1.0 - static_cast<double>(beta2));
  s.step_size = static_cast<float>(static_cast<double>(lr) / bc1);
  s.inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  s.eps = eps;

  adamw_kernel<<<elementwise_blocks(n), kThreads>>>(n, param, grad, m, v, s);
  PPO_CUDA_CHECK_LAUNCH("adamw_kernel");
}

double sum_of_squares(int64_t n, const float* x) {
  require_size(n, "n");
  if (n == 0) return 0.0;
  require_data(x, "x");

  const unsigned blocks = reduction_blocks(n);
  PPO_DEVICE_BUFFER(Sums<1>, partials, blocks);
  PPO_DEVICE_BUFFER(Sums<1>, total, 1);
  sum_of_squares_kernel<<<blocks, kThreads>>>(n, x, partials.get());
  PPO_CUDA_CHECK_LAUNCH("sum_of_squares_kernel");
  launch_sum_partials(partials.get(), blocks, total.get());
  PPO_CUDA_SYNC("sum_of_squares");
  return copy_total_to_host(total.get()).v[0];
}

void scale_in_place(int64_t n, float* x, float factor) {
  require_size(n, "n");
  require(std::isfinite(factor), ErrorCode::InvalidArgument,
          "factor must be finite, got " + std::to_string(factor), "factor");
  if (n == 0) return;
  require_data(x, "x");
  scale_kernel<<<elementwise_blocks(n), kThreads>>>(n, x, factor);
  PPO_CUDA_CHECK_LAUNCH("scale_kernel");
}

}  // namespace ppo::cuda
