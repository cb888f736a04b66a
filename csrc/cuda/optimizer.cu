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

using cpu::AdamWScalars;
using cpu::check_adamw;

// One AdamW step on n elements, PyTorch's order (torch.optim.AdamW, single-tensor path):
//   m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2;
//   p = p (1 - lr wd) - step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps).
// grad does not overlap param, m or v (the CPU contract); param, m, v are distinct.
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(int64_t n, float* __restrict__ param, const float* __restrict__ grad,
                 float* __restrict__ m, float* __restrict__ v, AdamWScalars s) {
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
  bool has_work = false;
  const AdamWScalars s = check_adamw(n, param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, &has_work);
  if (!has_work) return;
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
