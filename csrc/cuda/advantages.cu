// Generalized advantage estimation, masked whitening and masked clipping
// (core/op_args.h).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/device_common.cuh"
#include "cuda/kernels.h"

namespace ppo::cuda {
namespace {

// ---- gae -----------------------------------------------------------------------------
// The recursion runs backwards along a row and is inherently serial, so one block
// handles one row: the row is staged through shared memory in chunks of kGaeChunk
// steps (coalesced loads and stores by the whole block, last chunk first), and
// thread 0 runs the recursion over each chunk in double, carrying the state of the
// next valid position from chunk to chunk.
constexpr int kGaeThreads = 128;
constexpr int kGaeChunk = 1024;

__global__ void __launch_bounds__(kGaeThreads) gae_kernel(GaeArgs a) {
  __shared__ float rewards[kGaeChunk];
  __shared__ float values[kGaeChunk];
  __shared__ float valid[kGaeChunk];  // 1 / 0
  __shared__ float advantages[kGaeChunk];
  __shared__ float returns[kGaeChunk];

  const double gamma = a.gamma;
  const double gamma_lambda = gamma * static_cast<double>(a.lambda);

  for (int64_t row = blockIdx.x; row < a.batch; row += gridDim.x) {
    const int64_t base = row * a.steps;
    // State after the current position: V and A of the next valid position, both 0
    // past the last valid one (terminal). Only thread 0 uses them.
    double next_value = 0.0;
    double next_advantage = 0.0;

    for (int64_t chunk_end = a.steps; chunk_end > 0; chunk_end -= kGaeChunk) {
      const int64_t chunk_begin = chunk_end > kGaeChunk ? chunk_end - kGaeChunk : 0;
      const int length = static_cast<int>(chunk_end - chunk_begin);
      const int64_t offset = base + chunk_begin;

      for (int j = threadIdx.x; j < length; j += blockDim.x) {
        rewards[j] = a.rewards[offset + j];
        values[j] = a.values[offset + j];
        valid[j] = is_valid(a.mask, offset + j) ? 1.0f : 0.0f;
      }
      __syncthreads();

      if (threadIdx.x == 0) {
        for (int j = length - 1; j >= 0; --j) {
          if (valid[j] == 0.0f) {
            advantages[j] = 0.0f;
            returns[j] = 0.0f;
            continue;
          }
          const double value = values[j];
          const double delta = static_cast<double>(rewards[j]) + gamma * next_value - value;
          const double advantage = delta + gamma_lambda * next_advantage;
          advantages[j] = static_cast<float>(advantage);
          returns[j] = static_cast<float>(advantage + value);
          next_value = value;
          next_advantage = advantage;
        }
      }
      __syncthreads();

      for (int j = threadIdx.x; j < length; j += blockDim.x) {
        a.advantages[offset + j] = advantages[j];
        a.returns[offset + j] = returns[j];
      }
      __syncthreads();  // the next chunk overwrites the shared buffers
    }
  }
}

// ---- whiten ----------------------------------------------------------------------------
// Three kernels plus two single-block sums (device_common.cuh), all on the device:
//   pass 1: (sum x, n) over valid positions      -> stats[0]
//   pass 2: sum (x - mean)^2 over valid positions -> stats[1]
//   apply:  out = clip((x - mean) / sqrt(var + eps) (+ mean)), 0 where masked.
struct WhitenStats {
  Sums<2> first;   // {sum x, n}
  Sums<2> second;  // {sum (x - mean)^2, unused}
};

__global__ void __launch_bounds__(kThreads)
    masked_sum_count_kernel(const float* __restrict__ values, const float* __restrict__ mask,
                            int64_t n, Sums<2>* partials) {
  Sums<2> s{};
  for (int64_t i = global_thread_index(); i < n; i += grid_thread_count()) {
    if (!is_valid(mask, i)) continue;
    s.v[0] += values[i];
    s.v[1] += 1.0;  // exact in double up to 2^53
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

__global__ void __launch_bounds__(kThreads)
    masked_squared_deviation_kernel(const float* __restrict__ values,
                                    const float* __restrict__ mask, int64_t n,
                                    const WhitenStats* __restrict__ stats, Sums<2>* partials) {
  const double valid_count = stats->first.v[1];
  const double mean = valid_count > 0.0 ? stats->first.v[0] / valid_count : 0.0;
  Sums<2> s{};
  for (int64_t i = global_thread_index(); i < n; i += grid_thread_count()) {
    if (!is_valid(mask, i)) continue;
    const double deviation = static_cast<double>(values[i]) - mean;
    s.v[0] += deviation * deviation;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

__global__ void __launch_bounds__(kThreads)
    whiten_apply_kernel(WhitenArgs a, const WhitenStats* __restrict__ stats) {
  const int64_t n = a.batch * a.steps;
  const double valid_count = stats->first.v[1];
  const double mean = valid_count > 0.0 ? stats->first.v[0] / valid_count : 0.0;
  const double variance = valid_count >= 2.0 ? stats->second.v[0] / (valid_count - 1.0) : 0.0;
  // A double reciprocal: within an ulp of dividing, invisible after rounding to float,
  // and it keeps the slow-path division call (and a register spill) out of the loop.
  const double inv_std = 1.0 / sqrt(variance + static_cast<double>(a.eps));
  const double clip = a.clip;
  for (int64_t i = global_thread_index(); i < n; i += grid_thread_count()) {
    float out = 0.0f;
    if (valid_count > 0.0 && is_valid(a.mask, i)) {
      double x = (static_cast<double>(a.values[i]) - mean) * inv_std;
      if (!a.shift_mean) x += mean;
      if (clip > 0.0) x = fmin(fmax(x, -clip), clip);
      out = static_cast<float>(x);
    }
    a.out[i] = out;
  }
}

// ---- clip_masked -------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) clip_masked_kernel(ClipArgs a) {
  const int64_t n = a.batch * a.steps;
  for (int64_t i = global_thread_index(); i < n; i += grid_thread_count()) {
    a.out[i] = is_valid(a.mask, i) ? fminf(fmaxf(a.values[i], -a.clip), a.clip) : 0.0f;
  }
}

}  // namespace

void gae(const GaeArgs& args) {
  if (args.batch == 0 || args.steps == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min(args.batch, kMaxElementwiseBlocks));
  gae_kernel<<<blocks, kGaeThreads>>>(args);
  PPO_CUDA_CHECK_LAUNCH("gae_kernel");
  PPO_CUDA_SYNC("gae");
}

void whiten(const WhitenArgs& args) {
  const int64_t n = args.batch * args.steps;
  if (n == 0) return;

  const unsigned blocks = reduction_blocks(n);
  PPO_DEVICE_BUFFER(Sums<2>, partials, blocks);
  PPO_DEVICE_BUFFER(WhitenStats, stats, 1);

  masked_sum_count_kernel<<<blocks, kThreads>>>(args.values, args.mask, n, partials.get());
  PPO_CUDA_CHECK_LAUNCH("masked_sum_count_kernel");
  launch_sum_partials(partials.get(), blocks, &stats.get()->first);

  masked_squared_deviation_kernel<<<blocks, kThreads>>>(args.values, args.mask, n, stats.get(),
                                                        partials.get());
  PPO_CUDA_CHECK_LAUNCH("masked_squared_deviation_kernel");
  launch_sum_partials(partials.get(), blocks, &stats.get()->second);

  whiten_apply_kernel<<<elementwise_blocks(n), kThreads>>>(args, stats.get());
  PPO_CUDA_CHECK_LAUNCH("whiten_apply_kernel");
  PPO_CUDA_SYNC("whiten");
}

void clip_masked(const ClipArgs& args) {
  const int64_t n = args.batch * args.steps;
  if (n == 0) return;
  clip_masked_kernel<<<elementwise_blocks(n), kThreads>>>(args);
  PPO_CUDA_CHECK_LAUNCH("clip_masked_kernel");
  PPO_CUDA_SYNC("clip_masked");
}

}  // namespace ppo::cuda
