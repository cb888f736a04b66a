// AdamW and the pieces of global gradient-norm clipping on the CPU (contracts in
// optimizer.h). adamw_update and scale_in_place are elementwise (any split over threads
// gives the same bits: AdamW splits on 64-element blocks, see there); sum_of_squares reduces in double over fixed chunks of the input
// (a function of n only) that are added in chunk order.
#include "cpu/optimizer.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <new>
#include <string>

#include "core/error.h"
#include "cpu/arg_checks.h"
#include "core/thread_pool.h"
#include "cpu/vec_math.h"

namespace ppo::cpu {
namespace {


// Elements [begin, end) of one AdamW step, in PyTorch's order (torch.optim.AdamW,
// single-tensor path):
//   p *= 1 - lr * wd;  m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2;
//   p -= step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps),
// step_size = lr / (1 - beta1^t), inv_sqrt_bc2 = 1 / sqrt(1 - beta2^t) (per-call scalars
// computed in double, then rounded to float). All in float: vectorizes (sqrt and divide
// are vector instructions).
PPO_CPU_MULTIVERSION
void adamw_range(int64_t begin, int64_t end, float* __restrict param,
                 const float* __restrict grad, float* __restrict m, float* __restrict v,
                 float decay, float beta1, float one_minus_beta1, float beta2,
                 float one_minus_beta2, float step_size, float inv_sqrt_bc2, float eps) {
  for (int64_t i = begin; i < end; ++i) {
    const float g = grad[i];
    const float mi = beta1 * m[i] + one_minus_beta1 * g;
    const float vi = beta2 * v[i] + one_minus_beta2 * (g * g);
    m[i] = mi;
    v[i] = vi;
    const float denom = std::sqrt(vi) * inv_sqrt_bc2 + eps;
    param[i] = param[i] * decay - step_size * (mi / denom);
  }
}

// sum x[i]^2 over [begin, end) in double, kLanes independent accumulators (so the loop
// vectorizes without reassociating any one sum), the lanes then added in order.
PPO_CPU_MULTIVERSION
double sum_of_squares_range(int64_t begin, int64_t end, const float* __restrict x) {
  double lanes[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const double xi = static_cast<double>(x[i + j]);
      lanes[j] += xi * xi;
    }
  double sum = 0.0;
  for (int j = 0; j < kLanes; ++j) sum += lanes[j];
  for (; i < end; ++i) {
    const double xi = static_cast<double>(x[i]);
    sum += xi * xi;
  }
  return sum;
}

PPO_CPU_MULTIVERSION
void scale_range(int64_t begin, int64_t end, float* __restrict x, float factor) {
  for (int64_t i = begin; i < end; ++i) x[i] *= factor;
}

// sum_of_squares' chunks: 65536 elements each (enough work per chunk to be worth a
// thread; a 124M-parameter model gives ~1900 partials, 15 KB).
constexpr int64_t kSumChunk = 65536;

}  // namespace

void adamw_update(int64_t n, float* param, const float* grad, float* m, float* v, float lr,
                  float beta1, float beta2, float eps, float weight_decay, int64_t step) {
  bool has_work = false;
  const AdamWScalars k = check_adamw(n, param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, &has_work);
  if (!has_work) return;
  // Threads get whole blocks of kAdamBlock elements: the compiler's vector body and its
  // scalar remainder loop may contract multiply-adds into FMAs differently, so an element
  // must take the same path whatever the split. With block-aligned chunk starts only the
  // array's last partial block ever runs in a remainder loop, for every thread count.
  constexpr int64_t kAdamBlock = 64;
  const int64_t blocks = (n + kAdamBlock - 1) / kAdamBlock;
  parallel_for(
      blocks,
      [&](int64_t first, int64_t last) {
        adamw_range(first * kAdamBlock, std::min(n, last * kAdamBlock), param, grad, m, v, k.decay,
                    k.beta1, k.one_minus_beta1, k.beta2, k.one_minus_beta2, k.step_size, k.inv_sqrt_bc2,
                    k.eps);
      },
      grain_for(12 * kAdamBlock));
}

double sum_of_squares(int64_t n, const float* x) {
  require_size(n, "n");
  if (n == 0) return 0.0;
  require_data(x, "x");
  const int64_t chunks = (n + kSumChunk - 1) / kSumChunk;
  if (chunks == 1) return sum_of_squares_range(0, n, x);
  std::unique_ptr<double[]> partials(new (std::nothrow) double[chunks]);
  require(partials != nullptr, ErrorCode::OutOfMemory,
          "sum_of_squares: cannot allocate the chunk partials");
  double* p = partials.get();
  parallel_for(
      chunks,
      [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k)
          p[k] = sum_of_squares_range(k * kSumChunk, std::min(n, (k + 1) * kSumChunk), x);
      },
      1);
  double sum = 0.0;
  for (int64_t k = 0; k < chunks; ++k) sum += p[k];
  return sum;
}

void scale_in_place(int64_t n, float* x, float factor) {
  require_size(n, "n");
  require(std::isfinite(factor), ErrorCode::InvalidArgument,
          "factor must be finite, got " + std::to_string(factor), "factor");
  if (n == 0) return;
  require_data(x, "x");
  parallel_for(
      n, [&](int64_t begin, int64_t end) { scale_range(begin, end, x, factor); },
      grain_for(1));
}

}  // namespace ppo::cpu
