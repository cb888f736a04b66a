// The fixed row chunking of the parameter-gradient column sums (the weight and bias
// gradients of LayerNorm, RMSNorm and a dense layer's bias, on the CPU and on CUDA, see
// cuda/row_ops.cuh): rows are cut into chunks, each chunk's rows are summed into a
// [C] partial, and the partials are added in chunk order. The chunking is a function of
// `rows` only (never of the thread count), so the summation order, and hence the bits,
// are fixed. At most 64 chunks (enough to keep 64 threads busy; LayerNorm's partial
// buffers are 2 * 64 * C floats, 393 KB at C = 768) of at least 8 rows (so the partials
// stay small next to the row work), and no empty trailing chunk.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <new>
#include <string>

#include "core/error.h"

namespace ppo::cpu {

constexpr int64_t kMaxGradChunks = 64;
constexpr int64_t kMinRowsPerChunk = 8;

struct RowChunks {
  int64_t count;
  int64_t rows_per_chunk;
};

// rows > 0.
inline RowChunks row_chunks(int64_t rows) {
  int64_t chunks = std::min(kMaxGradChunks, (rows + kMinRowsPerChunk - 1) / kMinRowsPerChunk);
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;  // no empty trailing chunk
  return {chunks, rows_per_chunk};
}

// `count` floats for the partials (each chunk zeroes its own), or
// ppo::Error(OutOfMemory) naming `what`.
inline std::unique_ptr<float[]> chunk_partials(int64_t count, const char* what) {
  std::unique_ptr<float[]> p(new (std::nothrow) float[static_cast<size_t>(count)]);
  require(p != nullptr, ErrorCode::OutOfMemory, std::string(what) + ": cannot allocate the gradient partials");
  return p;
}

// grad[c] += partials[k * C + c] for the chunks k = 0, 1, ... in order, c in [begin, end)
// (layers.cpp).
void add_chunk_partials(int64_t begin, int64_t end, int64_t C, int64_t chunks, const float* partials,
                        float* grad);

}  // namespace ppo::cpu
