// KL-penalized token rewards, moments of a vector, and score normalization
// (core/op_args.h). Per-element math is done in double and rounded once to float.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/device_common.cuh"
#include "cuda/kernels.h"

namespace ppo::cuda {
namespace {

// ---- kl_penalized_rewards --------------------------------------------------------
// One warp per row of [batch, steps]; kWarpsPerBlock rows per block. The warp first
// finds the row's last valid t (a max over lanes), then writes kl and rewards with
// coalesced accesses, adding the score at that t. No read-modify-write.
constexpr int kWarpsPerBlock = kThreads / kWarpSize;

__device__ __forceinline__ double kl_estimate(double d, KlEstimator estimator) {
  switch (estimator) {
    case KlEstimator::K2:
      return 0.5 * d * d;
    case KlEstimator::K3:
      return expm1(-d) + d;  // exp(-d) - 1 + d without cancellation for small d
    case KlEstimator::K1:
    default:
      return d;
  }
}

__global__ void __launch_bounds__(kThreads) kl_rewards_kernel(KlRewardsArgs a) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t first_row =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = first_row; row < a.batch; row += row_stride) {
    const int64_t base = row * a.steps;

    // Last valid t of the row, -1 when the row has none.
    int64_t last_valid = -1;
    if (a.mask == nullptr) {
      last_valid = a.steps - 1;
    } else {
      for (int64_t t = lane; t < a.steps; t += kWarpSize) {
        if (a.mask[base + t] != 0.0f) last_valid = t;  // ascending t: the lane's max
      }
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        const int64_t other = __shfl_xor_sync(kFullWarp, last_valid, offset);
        last_valid = other > last_valid ? other : last_valid;
      }
    }
    const double score = last_valid >= 0 ? static_cast<double>(a.scores[row]) : 0.0;

    for (int64_t t = lane; t < a.steps; t += kWarpSize) {
      const int64_t i = base + t;
      float kl = 0.0f, reward = 0.0f;
      if (is_valid(a.mask, i)) {
        const double d =
            static_cast<double>(a.logprobs[i]) - static_cast<double>(a.ref_logprobs[i]);
        const double k = kl_estimate(d, a.estimator);
        const double r = -static_cast<double>(a.kl_coef) * k + (t == last_valid ? score : 0.0);
        kl = static_cast<float>(k);
        reward = static_cast<float>(r);
      }
      a.rewards[i] = reward;
      if (a.kl != nullptr) a.kl[i] = kl;
    }
  }
}

// ---- moments -----------------------------------------------------------------------
// Two passes, each a deterministic two-stage reduction (device_common.cuh):
//   pass 1: sum x            -> mean = sum / n
//   pass 2: sum (x - mean)^2 -> m2
__global__ void __launch_bounds__(kThreads)
    sum_kernel(const float* __restrict__ values, int64_t n, Sums<1>* partials) {
  Sums<1> s{};
  for (int64_t i = global_thread_index(); i < n; i += grid_thread_count()) s.v[0] += values[i];
  s = block_sum(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// `sum_total` is pass 1's result; the mean is derived on the device so the passes run
// back to back without a host round trip.
__global__ void __launch_bounds__(kThreads)
    squared_deviation_kernel(const float* __restrict__ values, int64_t n,
                             const Sums<1>* __restrict__ sum_total, Sums<1>* partials) {
  const double mean = sum_total->v[0] / static_cast<double>(n);
  Sums<1> s{};
  for (int64_t i = global_thread_index(); i < n; i += grid_thread_count()) {
    const double deviation = static_cast<double>(values[i]) - mean;
    s.v[0] += deviation * deviation;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// ---- normalize_scores ----------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) normalize_scores_kernel(NormalizeScoresArgs a) {
  const double center = a.subtract_mean ? a.mean : 0.0;
  const double scale = a.std + static_cast<double>(a.eps);
  const double clip = a.clip;
  for (int64_t i = global_thread_index(); i < a.count; i += grid_thread_count()) {
    double x = (static_cast<double>(a.values[i]) - center) / scale;
    if (clip > 0.0) x = fmin(fmax(x, -clip), clip);
    a.out[i] = static_cast<float>(x);
  }
}

}  // namespace

void kl_penalized_rewards(const KlRewardsArgs& args) {
  if (args.batch == 0 || args.steps == 0) return;
  const unsigned blocks = static_cast<unsigned>(
      std::min(ceil_div(args.batch, kWarpsPerBlock), kMaxElementwiseBlocks));
  kl_rewards_kernel<<<blocks, kThreads>>>(args);
  PPO_CUDA_CHECK_LAUNCH("kl_rewards_kernel");
  PPO_CUDA_SYNC("kl_penalized_rewards");
}

Moments moments(const MomentsArgs& args) {
  Moments result;
  const int64_t n = args.count;
  if (n == 0) return result;  // count = mean = m2 = 0

  const unsigned blocks = reduction_blocks(n);
  PPO_DEVICE_BUFFER(Sums<1>, partials, blocks);
  PPO_DEVICE_BUFFER(Sums<1>, totals, 2);  // [0] = sum x, [1] = sum (x - mean)^2
  Sums<1>* sum_total = totals.get();
  Sums<1>* m2_total = totals.get() + 1;

  sum_kernel<<<blocks, kThreads>>>(args.values, n, partials.get());
  PPO_CUDA_CHECK_LAUNCH("sum_kernel");
  launch_sum_partials(partials.get(), blocks, sum_total);
  squared_deviation_kernel<<<blocks, kThreads>>>(args.values, n, sum_total, partials.get());
  PPO_CUDA_CHECK_LAUNCH("squared_deviation_kernel");
  launch_sum_partials(partials.get(), blocks, m2_total);
  PPO_CUDA_SYNC("moments");

  const Sums<1> sum = copy_total_to_host(sum_total);
  const Sums<1> m2 = copy_total_to_host(m2_total);
  result.count = static_cast<double>(n);
  result.mean = sum.v[0] / result.count;  // the same division the device did
  result.m2 = m2.v[0];
  return result;
}

void normalize_scores(const NormalizeScoresArgs& args) {
  if (args.count == 0) return;
  normalize_scores_kernel<<<elementwise_blocks(args.count), kThreads>>>(args);
  PPO_CUDA_CHECK_LAUNCH("normalize_scores_kernel");
  PPO_CUDA_SYNC("normalize_scores");
}

}  // namespace ppo::cuda
