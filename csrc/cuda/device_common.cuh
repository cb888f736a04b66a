// Shared pieces of the CUDA kernels: launch sizes, the mask test, and the
// deterministic two-stage reduction used by every op that sums over the batch.
//
// Determinism: no floating-point atomics anywhere. A reduction is
//   1. a "partials" kernel with a grid size that depends only on the element count;
//      each thread accumulates its grid-stride elements in a fixed order, each block
//      reduces its threads in a fixed shuffle tree and writes one partial;
//   2. sum_partials_kernel: one block sums the partials in a fixed order.
// All in double, so the result is bit-identical from run to run.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/cuda_check.h"

namespace ppo::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;

// Block size of the elementwise and reduction kernels (a multiple of the warp size).
constexpr int kThreads = 256;
// Upper bound on the number of blocks (and thus partials) of a reduction.
constexpr int64_t kMaxReductionBlocks = 1024;
// Upper bound on the grid of elementwise kernels; they grid-stride beyond it.
constexpr int64_t kMaxElementwiseBlocks = int64_t{1} << 20;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid of an elementwise kernel over n > 0 elements.
inline unsigned elementwise_blocks(int64_t n) {
  return static_cast<unsigned>(std::min(ceil_div(n, kThreads), kMaxElementwiseBlocks));
}

// Grid of a reduction over n > 0 elements: a function of n only (determinism).
inline unsigned reduction_blocks(int64_t n) {
  return static_cast<unsigned>(std::min(ceil_div(n, kThreads), kMaxReductionBlocks));
}

// mask == nullptr means every position is valid; otherwise 1.0f = valid, 0.0f = padding.
__device__ __forceinline__ bool is_valid(const float* mask, int64_t i) {
  return mask == nullptr || mask[i] != 0.0f;
}

// Global index and stride of a 1-D grid-stride loop, in 64 bits.
__device__ __forceinline__ int64_t global_thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_thread_count() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// K running sums in double (loss, counts, ...), reduced together.
template <int K>
struct Sums {
  double v[K];
};

// Sums `s` over the block in a fixed shuffle tree; the total is valid in thread 0 only.
// Requires blockDim.x to be a multiple of 32 and at most 1024; call once per kernel.
template <int K>
__device__ Sums<K> block_sum(Sums<K> s) {
  __shared__ double warp_totals[1024 / kWarpSize][K];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warp_count = blockDim.x / kWarpSize;

  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int k = 0; k < K; ++k) s.v[k] += __shfl_down_sync(kFullWarp, s.v[k], offset);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) warp_totals[warp][k] = s.v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) s.v[k] = lane < warp_count ? warp_totals[lane][k] : 0.0;
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int k = 0; k < K; ++k) s.v[k] += __shfl_down_sync(kFullWarp, s.v[k], offset);
    }
  }
  return s;
}

// Stage 2 of a reduction: *total = sum of partials[0 .. count). One block of kThreads.
template <int K>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const Sums<K>* __restrict__ partials, int count, Sums<K>* total) {
  Sums<K> s{};
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
#pragma unroll
    for (int k = 0; k < K; ++k) s.v[k] += partials[i].v[k];
  }
  s = block_sum(s);
  if (threadIdx.x == 0) *total = s;
}

// Launches stage 2 of a reduction whose stage 1 wrote `count` partials.
template <int K>
void launch_sum_partials(const Sums<K>* partials, unsigned count, Sums<K>* total) {
  sum_partials_kernel<K><<<1, kThreads>>>(partials, static_cast<int>(count), total);
  PPO_CUDA_CHECK_LAUNCH("sum_partials_kernel");
}

// Copies a reduction's total back to the host (waits for the kernels before it).
template <int K>
Sums<K> copy_total_to_host(const Sums<K>* total) {
  Sums<K> host{};
  PPO_CUDA_CHECK(cudaMemcpy(&host, total, sizeof(Sums<K>), cudaMemcpyDeviceToHost));
  return host;
}

}  // namespace ppo::cuda
