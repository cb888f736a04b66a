// Shared pieces of the CUDA engine's row kernels (cuda/layers.cu, cuda/llama_layers.cu):
// per-thread grow-only scratch, launch shapes of row and warp-per-row kernels, warp sums,
// and the deterministic two-stage column sums (parameter gradients summed over rows in
// fixed chunks, no atomics) that bias, LayerNorm, RMSNorm and value-head backward use.
// Everything here has internal linkage (an anonymous namespace per including file), except
// thread_scratch(), one per host thread for the whole library.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cpu/row_chunks.h"
#include "cuda/cuda_check.h"
#include "cuda/device_common.cuh"

namespace ppo::cuda {

// ---- scratch -----------------------------------------------------------------------------
// Grow-only device scratch, one per host thread, kept for the thread's lifetime: the
// backward ops run many times per step, and a cudaMalloc/cudaFree pair per call would
// synchronize the device each time. A thread's ops are queued in order on its default
// stream, so an op reusing the area runs after the kernels of the previous op that used
// it; growing frees the old area with cudaFree, which first waits for the device.
class ThreadScratch {
 public:
  ThreadScratch() = default;
  ThreadScratch(const ThreadScratch&) = delete;
  ThreadScratch& operator=(const ThreadScratch&) = delete;
  ~ThreadScratch() {
    if (ptr_ != nullptr) (void)cudaFree(ptr_);  // a destructor must not throw
  }

  void* get(size_t bytes) {
    if (bytes > bytes_) {
      if (ptr_ != nullptr) {
        void* old = ptr_;
        ptr_ = nullptr;
        bytes_ = 0;
        PPO_CUDA_CHECK(cudaFree(old));
      }
      ptr_ = PPO_CUDA_MALLOC(bytes);
      bytes_ = bytes;
    }
    return ptr_;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

inline ThreadScratch& thread_scratch() {
  thread_local ThreadScratch scratch;
  return scratch;
}

namespace {

constexpr int kWarpsPerBlock = kThreads / kWarpSize;
constexpr int64_t kMaxGridY = 65535;

// Sub-buffers carved out of one scratch area, each aligned to 256 bytes.
constexpr size_t kScratchAlign = 256;
inline size_t align_up(size_t bytes) {
  return (bytes + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
}

// ---- launch shapes -----------------------------------------------------------------------
// Grid of a row op over [rows, cols] (rows, cols > 0): x covers the columns in tiles of
// kThreads, y covers the rows (the kernels grid-stride over rows beyond it).
inline dim3 row_tile_grid(int64_t rows, int64_t cols) {
  const int64_t tiles = ceil_div(cols, kThreads);
  const int64_t y =
      std::min({rows, kMaxGridY, std::max<int64_t>(1, kMaxElementwiseBlocks / tiles)});
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(y));
}

// Grid of a warp-per-row kernel over rows > 0 rows.
inline unsigned warp_row_blocks(int64_t rows) {
  return static_cast<unsigned>(std::min(ceil_div(rows, kWarpsPerBlock), kMaxElementwiseBlocks));
}

__device__ __forceinline__ int64_t row_tile_column() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// Global warp index and warp count of a warp-per-row kernel.
__device__ __forceinline__ int64_t global_warp_index() {
  return static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
}
__device__ __forceinline__ int64_t grid_warp_count() {
  return static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
}

// Sum over the warp in a butterfly: every lane gets the same bits.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullWarp, v, offset);
  }
  return v;
}

// ---- deterministic column sums -----------------------------------------------------------
// The rows' chunking is the CPU's (cpu/row_chunks.h), so both devices sum in chunks alike.
using cpu::RowChunks;
using cpu::row_chunks;

// Column-sum kernels run blocks of (32 channels) x (kSlots slots): slot s takes the rows
// (or chunks) s, s + kSlots, ... of its range in order, and the slots are then added in
// slot order. A warp reads 32 consecutive floats of a row (128 bytes).
constexpr int kSlots = kThreads / kWarpSize;

// Adds v over the block's slots in slot order; the totals are valid in slot 0
// (threadIdx.y == 0). Every thread of the block must call it, once per kernel.
template <typename Acc, int K>
__device__ __forceinline__ void sum_slots(Acc (&v)[K]) {
  __shared__ Acc totals[K][kSlots][kWarpSize];
#pragma unroll
  for (int k = 0; k < K; ++k) totals[k][threadIdx.y][threadIdx.x] = v[k];
  __syncthreads();
  if (threadIdx.y == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      Acc s = totals[k][0][threadIdx.x];
      for (int slot = 1; slot < kSlots; ++slot) s += totals[k][slot][threadIdx.x];
      v[k] = s;
    }
  }
}

// Stage 1. grid (ceil(C / 32), chunks), block (32, kSlots):
//   partials[k][chunk][c] = sum over the chunk's rows r of term k of (r, c).
// Term::operator()(r, c, acc) adds row r's K terms of channel c into acc.
template <typename Acc, int K, typename Term>
__global__ void __launch_bounds__(kThreads)
    column_partials_kernel(Term term, int64_t rows, int64_t C, int64_t rows_per_chunk,
                           Acc* __restrict__ partials) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t r0 = chunk * rows_per_chunk;
  const int64_t r1 = min(rows, r0 + rows_per_chunk);
  Acc acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = Acc(0);
  if (c < C) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kSlots) term(r, c, acc);
  }
  sum_slots<Acc, K>(acc);
  if (threadIdx.y == 0 && c < C) {
    const int64_t chunks = gridDim.y;
#pragma unroll
    for (int k = 0; k < K; ++k) partials[(k * chunks + chunk) * C + c] = acc[k];
  }
}

template <int K>
struct Outputs {
  float* p[K];
};

// Stage 2. grid (ceil(C / 32), K), block (32, kSlots): out.p[k][c] += sum over chunks
// of partials[k][chunk][c] (slot s sums chunks s, s + kSlots, ...; then slot order), the
// total added in Acc and rounded once.
template <typename Acc, int K>
__global__ void __launch_bounds__(kThreads)
    column_partials_sum_kernel(const Acc* __restrict__ partials, int64_t chunks, int64_t C,
                               Outputs<K> out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  const int k = blockIdx.y;
  Acc acc[1] = {Acc(0)};
  if (c < C) {
    const Acc* p = partials + k * chunks * C;
    for (int64_t chunk = threadIdx.y; chunk < chunks; chunk += kSlots) acc[0] += p[chunk * C + c];
  }
  sum_slots<Acc, 1>(acc);
  if (threadIdx.y == 0 && c < C) {
    float* o = out.p[k] + c;
    *o = static_cast<float>(static_cast<Acc>(*o) + acc[0]);
  }
}

// Runs both stages: out.p[k][c] += sum_r term_k(r, c) for rows, C > 0. `partials` holds
// K * chunks.count * C Accs.
template <typename Acc, int K, typename Term>
void launch_column_sums(const Term& term, int64_t rows, int64_t C, RowChunks chunks,
                        Acc* partials, Outputs<K> out) {
  const dim3 block(kWarpSize, kSlots);
  const unsigned channel_tiles = static_cast<unsigned>(ceil_div(C, kWarpSize));
  column_partials_kernel<Acc, K, Term>
      <<<dim3(channel_tiles, static_cast<unsigned>(chunks.count)), block>>>(
          term, rows, C, chunks.rows_per_chunk, partials);
  PPO_CUDA_CHECK_LAUNCH("column_partials_kernel");
  column_partials_sum_kernel<Acc, K>
      <<<dim3(channel_tiles, K), block>>>(partials, chunks.count, C, out);
  PPO_CUDA_CHECK_LAUNCH("column_partials_sum_kernel");
}

}  // namespace
}  // namespace ppo::cuda
