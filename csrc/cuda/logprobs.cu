// Log-probs, entropy and their gradient over the vocabulary (core/op_args.h).
//
// One block of kRowThreads threads per (b, t) row of logits [batch, steps, vocab]
// (grid-striding over rows when there are more than kMaxRowBlocks). A row is read
// once, with float4 loads, into per-thread online-softmax statistics (running max,
// sum of exp, and the entropy accumulator) in float with max subtraction; the block
// then merges them in a fixed shuffle tree. The backward pass recomputes the softmax
// from the logits (a second read of the row) and writes grad_logits in the same way.
// Rows with mask 0 are not read: their outputs are written as zeros (and so are the
// gradient rows whose incoming grad_logprobs and grad_entropy are both 0).
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/device_common.cuh"
#include "cuda/kernels.h"

namespace ppo::cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int64_t kMaxRowBlocks = int64_t{1} << 20;
// float4 loads each thread issues before doing any math on them (memory parallelism).
constexpr int kUnroll = 4;

// Online softmax statistics of the scaled logits z = logit / temperature seen so far:
//   max      = max z                         (-inf when none seen, or all were -inf)
//   sum      = sum exp(z - max)              (>= 1 once a finite z was seen)
//   weighted = sum exp(z - max) * (z - max)  (<= 0)
// so that log p_v = z_v - max - log(sum) and entropy = log(sum) - weighted / sum.
// z = -inf has probability 0 and is skipped, which is the 0 * log 0 = 0 rule.
struct SoftmaxStats {
  float max;
  float sum;
  float weighted;
};

__device__ __forceinline__ SoftmaxStats empty_stats() { return {-INFINITY, 0.0f, 0.0f}; }

// Adds one scaled logit with a single exp: when z is the new max the old sums are
// rescaled by exp(old_max - z) and z itself contributes exp(0) = 1 (and 0 * 0).
__device__ __forceinline__ void add_logit(SoftmaxStats& s, float z) {
  if (z == -INFINITY) return;
  if (z > s.max) {
    if (s.sum > 0.0f) {  // otherwise nothing was seen yet and max is -inf
      const float shift = s.max - z;  // < 0
      const float scale = expf(shift);
      // exp(z_j - z) (z_j - z) = scale * exp(z_j - max) * ((z_j - max) + shift)
      s.weighted = scale * (s.weighted + shift * s.sum);
      s.sum *= scale;
    }
    s.sum += 1.0f;
    s.max = z;
  } else {
    const float shifted = z - s.max;
    const float e = expf(shifted);
    s.sum += e;
    s.weighted += e * shifted;
  }
}

// Statistics of the union of two disjoint sets of logits.
__device__ __forceinline__ SoftmaxStats merge(const SoftmaxStats& a, const SoftmaxStats& b) {
  if (b.sum == 0.0f) return a;
  if (a.sum == 0.0f) return b;
  const float max = fmaxf(a.max, b.max);
  const float shift_a = a.max - max;  // <= 0, one of the two shifts is 0
  const float shift_b = b.max - max;
  const float scale_a = expf(shift_a);
  const float scale_b = expf(shift_b);
  SoftmaxStats out;
  out.max = max;
  out.sum = a.sum * scale_a + b.sum * scale_b;
  out.weighted =
      scale_a * (a.weighted + shift_a * a.sum) + scale_b * (b.weighted + shift_b * b.sum);
  return out;
}

// Merges the statistics of all threads of the block in a fixed order; every thread
// gets the result. Safe to call once per row in a loop over rows.
__device__ SoftmaxStats block_merge(SoftmaxStats s) {
  __shared__ SoftmaxStats warp_stats[kRowThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    SoftmaxStats other;
    other.max = __shfl_down_sync(kFullWarp, s.max, offset);
    other.sum = __shfl_down_sync(kFullWarp, s.sum, offset);
    other.weighted = __shfl_down_sync(kFullWarp, s.weighted, offset);
    s = merge(s, other);
  }
  if (lane == 0) warp_stats[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kRowThreads / kWarpSize ? warp_stats[lane] : empty_stats();
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      SoftmaxStats other;
      other.max = __shfl_down_sync(kFullWarp, s.max, offset);
      other.sum = __shfl_down_sync(kFullWarp, s.sum, offset);
      other.weighted = __shfl_down_sync(kFullWarp, s.weighted, offset);
      s = merge(s, other);
    }
    if (lane == 0) warp_stats[0] = s;
  }
  __syncthreads();
  const SoftmaxStats result = warp_stats[0];
  __syncthreads();  // warp_stats is reused by the next row
  return result;
}

// A row of n floats split for 16-byte access: `head` scalars up to the first 16-byte
// boundary (rows start unaligned when vocab % 4 != 0), `vecs` float4s, then a tail.
struct RowSplit {
  int head;
  int vecs;
};

__device__ __forceinline__ RowSplit split_row(const float* row, int n) {
  const int misaligned_floats =
      static_cast<int>((reinterpret_cast<uintptr_t>(row) / sizeof(float)) % 4);
  const int head = min(n, (4 - misaligned_floats) % 4);
  return {head, (n - head) / 4};
}

// Calls visit(column, value) once for every element of the row, spread over the
// block; each thread visits the same columns in the same order on every run.
template <typename Visit>
__device__ __forceinline__ void visit_row(const float* __restrict__ row, int n, Visit visit) {
  const RowSplit split = split_row(row, n);
  const int stride = blockDim.x;
  if (static_cast<int>(threadIdx.x) < split.head) visit(threadIdx.x, __ldg(row + threadIdx.x));

  const float4* body = reinterpret_cast<const float4*>(row + split.head);
  int k = threadIdx.x;
  for (; k + (kUnroll - 1) * stride < split.vecs; k += kUnroll * stride) {
    float4 chunk[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) chunk[u] = __ldg(body + k + u * stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int column = split.head + 4 * (k + u * stride);
      visit(column, chunk[u].x);
      visit(column + 1, chunk[u].y);
      visit(column + 2, chunk[u].z);
      visit(column + 3, chunk[u].w);
    }
  }
  for (; k < split.vecs; k += stride) {
    const float4 v = __ldg(body + k);
    const int column = split.head + 4 * k;
    visit(column, v.x);
    visit(column + 1, v.y);
    visit(column + 2, v.z);
    visit(column + 3, v.w);
  }
  for (int column = split.head + 4 * split.vecs + threadIdx.x; column < n; column += stride) {
    visit(column, __ldg(row + column));
  }
}

// out[c] = map(c, in[c]) for every column of the row. kVectorized requires `in` and
// `out` to have the same offset modulo 16 bytes (checked on the host).
template <bool kVectorized, typename Map>
__device__ __forceinline__ void map_row(const float* __restrict__ in, float* __restrict__ out,
                                        int n, Map map) {
  const int stride = blockDim.x;
  if constexpr (!kVectorized) {
    for (int column = threadIdx.x; column < n; column += stride) {
      out[column] = map(column, __ldg(in + column));
    }
  } else {
    const RowSplit split = split_row(in, n);
    if (static_cast<int>(threadIdx.x) < split.head) {
      out[threadIdx.x] = map(threadIdx.x, __ldg(in + threadIdx.x));
    }
    const float4* in_body = reinterpret_cast<const float4*>(in + split.head);
    float4* out_body = reinterpret_cast<float4*>(out + split.head);
    for (int k = threadIdx.x; k < split.vecs; k += stride) {
      const float4 v = __ldg(in_body + k);
      const int column = split.head + 4 * k;
      float4 r;
      r.x = map(column, v.x);
      r.y = map(column + 1, v.y);
      r.z = map(column + 2, v.z);
      r.w = map(column + 3, v.w);
      out_body[k] = r;
    }
    for (int column = split.head + 4 * split.vecs + threadIdx.x; column < n; column += stride) {
      out[column] = map(column, __ldg(in + column));
    }
  }
}

// Writes zeros over a row (float4 stores after an unaligned head).
__device__ __forceinline__ void zero_row(float* out, int n) {
  const RowSplit split = split_row(out, n);
  const int stride = blockDim.x;
  if (static_cast<int>(threadIdx.x) < split.head) out[threadIdx.x] = 0.0f;
  float4* body = reinterpret_cast<float4*>(out + split.head);
  for (int k = threadIdx.x; k < split.vecs; k += stride) {
    body[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  for (int column = split.head + 4 * split.vecs + threadIdx.x; column < n; column += stride) {
    out[column] = 0.0f;
  }
}

// Softmax statistics of one row of logits, identical in every thread of the block.
__device__ __forceinline__ SoftmaxStats row_stats(const float* __restrict__ logits, int vocab,
                                                  float inv_temperature) {
  SoftmaxStats s = empty_stats();
  visit_row(logits, vocab, [&](int, float logit) { add_logit(s, logit * inv_temperature); });
  return block_merge(s);
}

// H = -sum p log p = log(sum) - weighted / sum; clamped at 0 against rounding.
__device__ __forceinline__ float entropy_of(const SoftmaxStats& s, float log_sum) {
  return fmaxf(log_sum - s.weighted / s.sum, 0.0f);
}

// logprobs[row], entropy[row] for row in [0, batch * steps).
__global__ void __launch_bounds__(kRowThreads)
    logprobs_forward_kernel(LogprobsArgs a, int vocab, float inv_temperature) {
  const int64_t rows = a.batch * a.steps;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    if (!is_valid(a.mask, row)) {  // padding: uniform across the block
      if (threadIdx.x == 0) {
        a.logprobs[row] = 0.0f;
        if (a.entropy != nullptr) a.entropy[row] = 0.0f;
      }
      continue;
    }
    const float* logits = a.logits + row * vocab;
    const SoftmaxStats s = row_stats(logits, vocab, inv_temperature);
    if (threadIdx.x == 0) {
      const float log_sum = logf(s.sum);
      const float z_token = logits[a.tokens[row]] * inv_temperature;
      a.logprobs[row] = (z_token - s.max) - log_sum;
      if (a.entropy != nullptr) a.entropy[row] = entropy_of(s, log_sum);
    }
  }
}

// grad_logits[row, :] for row in [0, batch * steps):
//   (g_lp * ([v == token] - p_v) - g_ent * p_v * (log p_v + H)) / temperature.
template <bool kVectorized>
__global__ void __launch_bounds__(kRowThreads)
    logprobs_backward_kernel(LogprobsBackwardArgs a, int vocab, float inv_temperature) {
  const int64_t rows = a.batch * a.steps;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    float* grad = a.grad_logits + row * vocab;
    const float grad_logprob = a.grad_logprobs != nullptr ? a.grad_logprobs[row] : 0.0f;
    const float grad_entropy = a.grad_entropy != nullptr ? a.grad_entropy[row] : 0.0f;
    // Padding, or no gradient flowing into this row: zeros without reading the logits.
    // (Both conditions are the same for every thread of the block.)
    if (!is_valid(a.mask, row) || (grad_logprob == 0.0f && grad_entropy == 0.0f)) {
      zero_row(grad, vocab);
      continue;
    }
    const float* logits = a.logits + row * vocab;
    const SoftmaxStats s = row_stats(logits, vocab, inv_temperature);
    const float log_sum = logf(s.sum);
    const float entropy = entropy_of(s, log_sum);
    const int token = a.tokens[row];

    map_row<kVectorized>(logits, grad, vocab, [&](int column, float logit) {
      const float indicator = column == token ? 1.0f : 0.0f;
      const float z = logit * inv_temperature;
      if (z == -INFINITY) return grad_logprob * indicator * inv_temperature;  // p = 0
      const float log_p = (z - s.max) - log_sum;
      const float p = expf(log_p);
      return (grad_logprob * (indicator - p) - grad_entropy * p * (log_p + entropy)) *
             inv_temperature;
    });
  }
}

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>(std::min(rows, kMaxRowBlocks)); }

// Columns are indexed with int inside a row.
int checked_vocab(int64_t vocab) {
  require(vocab >= 1 && vocab <= INT_MAX, ErrorCode::InvalidArgument,
          "the CUDA backend needs 1 <= vocab <= " + std::to_string(INT_MAX) + ", got " +
              std::to_string(vocab),
          "vocab");
  return static_cast<int>(vocab);
}

}  // namespace

void logprobs_forward(const LogprobsArgs& args) {
  const int64_t rows = args.batch * args.steps;
  if (rows == 0) return;
  const int vocab = checked_vocab(args.vocab);
  logprobs_forward_kernel<<<row_blocks(rows), kRowThreads>>>(args, vocab, 1.0f / args.temperature);
  PPO_CUDA_CHECK_LAUNCH("logprobs_forward_kernel");
  PPO_CUDA_SYNC("logprobs_forward");
}

void logprobs_backward(const LogprobsBackwardArgs& args) {
  const int64_t rows = args.batch * args.steps;
  if (rows == 0) return;
  const int vocab = checked_vocab(args.vocab);
  const float inv_temperature = 1.0f / args.temperature;
  // float4 loads and stores line up only when both buffers sit at the same offset
  // modulo 16 bytes (always true for cudaMalloc'd buffers).
  const bool same_alignment =
      ((reinterpret_cast<uintptr_t>(args.logits) ^ reinterpret_cast<uintptr_t>(args.grad_logits)) %
       16) == 0;
  const unsigned blocks = row_blocks(rows);
  if (same_alignment) {
    logprobs_backward_kernel<true><<<blocks, kRowThreads>>>(args, vocab, inv_temperature);
  } else {
    logprobs_backward_kernel<false><<<blocks, kRowThreads>>>(args, vocab, inv_temperature);
  }
  PPO_CUDA_CHECK_LAUNCH("logprobs_backward_kernel");
  PPO_CUDA_SYNC("logprobs_backward");
}

}  // namespace ppo::cuda
