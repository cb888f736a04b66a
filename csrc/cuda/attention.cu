// Causal self-attention on the GPU with grouped-query heads: a fused forward
// (flash-attention style, no T x T matrix in memory), its backward (FlashAttention-2
// style, recomputing the probabilities), and the KV-cache path of generation. The math
// and the contracts are core/engine_ops.h's attention section (and cpu/attention.h's).
//
// Layout: H query heads and KVH key/value heads of hs columns each (H % KVH == 0; the G =
// H / KVH query heads h = g*G .. g*G+G-1 share kv head g = h / G; KVH == H is GPT-2's
// multi-head attention). qkv [B, T, W] row-major with W = (H + 2 KVH) hs, row (b, t) =
// [q (H hs) | k (KVH hs) | v (KVH hs)]: query head h owns columns h*hs .. of the q part,
// kv head g columns g*hs .. of the k and of the v part. out [B, T, H hs]. Scores are
// scaled by 1/sqrt(hs); query t attends to keys s <= t. lengths [B] (device, nullptr =
// all T) marks rows t >= lengths[b] as padding. Lengths live on the device, so they
// cannot be checked on the host: every kernel clamps them to [0, T].
//
// ---- forward (tiled path, hs <= 128) ------------------------------------------------------
// One block of 128 threads per (b, h, tile of 64 query rows). The block keeps its query
// tile in shared memory and streams the keys and values of its kv head h / G in tiles of kTileY
// rows (64, or 32 for head sizes above 64 to bound shared memory and registers), only
// up to the last key its last valid row reads. Per key tile:
//   S = Q K^T * scale        [64, kTileY]   registers, a 4 x (kTileY/8) block per thread
//   online softmax per row   m = running max, l = running sum of exp(S - m); the
//                            accumulators are rescaled by exp(m_old - m_new)
//   O += P V                 [64, hs]       registers, a 4 x (D/8) block per thread
// and at the end out = O / l and the log-sum-exp lse = m + log(l) (natural log) goes to
// `saved` [B, H, T]. The first tile of every row contains key 0 <= t, so m is finite
// after it and l > 0 for every valid row; masked scores are -inf and exp(-inf) = 0.
//
// The head size is padded to a bucket D in {32, 64, 128} (a template parameter: register
// arrays need sizes known at compile time); the shared tiles are zero-filled past hs and
// past the valid rows, so the padding contributes exact zeros and never a NaN.
//
// Thread layout of the tiles: thread = (row group rg = tid / 8, column lane cg = tid % 8).
// A thread owns rows rg*4 .. rg*4+3 of the 64-row side, key columns cg + 8k of S, and head
// dims cg*4 + 32m + e of O. The 8 threads of a row group are 8 lanes of one warp, so the
// row max and row sum are xor-shuffle butterflies within a warp. Shared tiles have a row
// stride of D + 4 (and 64 + 4 for the transposed probabilities): with the interleaved
// column assignment every float4 load of a quarter-warp hits 8 distinct 4-bank groups or
// is a broadcast, i.e. conflict-free.
//
// Shared memory (dynamic, opted in above the 48 KB default), for D = 32 / 64 / 128:
// forward 44 / 68 / 74.5 KB, kv backward 70.5 / 102.5 / 116.3 KB, q backward 53 / 85 /
// 107.5 KB: within the 163 KB a block may use on sm_80 (227 KB on sm_90). The 32-row key
// tiles of D = 128 keep it there and bound the registers (dK and dV blocks of 4 x 16 each).
//
// ---- backward -----------------------------------------------------------------------------
// With P = exp(S - lse) recomputed from the saved lse:
//   Dsum[t] = sum_i dO[t, i] O[t, i]          (attention_dsum_kernel, into a scratch [B,H,T])
//   dP = dO V^T,  dS = P * (dP - Dsum),  dV = P^T dO,  dK = scale dS^T Q,  dQ = scale dS K.
// Two kernels, each owning its outputs (no atomics):
//   kv kernel: one block per (b, kv head g, tile of 64 keys) loops over the G query heads
//              of its group in order (h = g*G .. g*G+G-1) and, for each, over the query
//              tiles from its first key on, accumulating dK and dV of its keys (summed
//              over the group's heads) in registers;
//   q kernel:  one block per (b, h, tile of 64 queries) loops over the key tiles of kv
//              head h / G up to its last valid row, accumulating dQ in registers.
// Both add their results into grad_qkv (k and v parts; q part) for valid rows only, each
// element once.
//
// ---- generic path (hs > 128) and decode ------------------------------------------------------
// One block per (b, h, query row) (forward, and the dQ part of the backward) or per
// (b, kv head g, key row) (dK, dV, over the group's query heads in order): the block's
// threads take one key (or query) each in chunks of 128, the dot products run serially
// over hs, and the weighted sums over the chunk run with one thread per head dim, the row
// vectors and accumulators in shared memory (any hs). The decode step is two kernels: the
// first writes the k and v of each live sequence's new row p into the caches (one thread
// per cache element, each written once), the second runs the same row routine per (b, h)
// over the cache rows 0..p of kv head h / G.
//
// Determinism: every output element is written by exactly one thread (blocks own disjoint
// (b, head, row-tile) slices; grad_qkv's q part is the q kernel's, the k and v parts the
// kv kernel's, whose block of kv head g sums its G query heads in a fixed order), every
// sum runs in an order fixed by the shapes (dot products over d ascending, weighted sums
// over heads then keys ascending, shuffle and shared-memory reductions in fixed trees),
// and nothing uses atomics, so the results are bit-identical from run to run. The decode
// kernel uses the row routine, so its output agrees with the tiled forward's at row p
// within float rounding, not bit for bit.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
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

// ---- tiles ------------------------------------------------------------------------------

constexpr int kAttnThreads = 128;  // 4 warps per block, every attention kernel
constexpr int kAttnWarps = kAttnThreads / kWarpSize;
constexpr int kGroupLanes = 8;     // threads sharing a row group (cg = 0..7)
constexpr int kRowsPerThread = 4;  // rows of the 64-row side per thread
constexpr int kTileX = (kAttnThreads / kGroupLanes) * kRowsPerThread;  // 64
constexpr int kLdW = kTileX + 4;   // row stride of a transposed weight tile [kTileY][kLdW]
constexpr int kMaxTiledHead = 128;
static_assert(kTileX == 64, "the tile shapes below assume 64-row tiles");

// Per head-size bucket D (hs <= D): the key/query tile of the loops and register blocks.
template <int D>
struct Tiles {
  static_assert(D % 32 == 0, "a bucket is whole float4 columns for 8 lanes");
  static constexpr int kLd = D + 4;                  // row stride of a [rows][D] tile
  static constexpr int kTileY = D <= 64 ? 64 : 32;   // streamed rows per step
  static constexpr int kNY = kTileY / kGroupLanes;   // S columns per thread
  static constexpr int kNI = D / kGroupLanes;        // head dims per thread
  // forward: Q [64][kLd], K, V [kTileY][kLd], P^T [kTileY][kLdW]
  static constexpr size_t kForwardFloats =
      size_t{kTileX + 2 * kTileY} * kLd + size_t{kTileY} * kLdW;
  // kv backward: K, V [64][kLd], Q, dO [kTileY][kLd], P, dS [kTileY][kLdW], lse, Dsum
  static constexpr size_t kBackwardKvFloats =
      size_t{2 * kTileX + 2 * kTileY} * kLd + size_t{2 * kTileY} * kLdW + 2 * kTileY;
  // q backward: Q, dO [64][kLd], K, V [kTileY][kLd], dS^T [kTileY][kLdW]
  static constexpr size_t kBackwardQFloats =
      size_t{2 * kTileX + 2 * kTileY} * kLd + size_t{kTileY} * kLdW;
};

// Every tiled kernel fits the smallest opt-in maximum of the targets (sm_80: 163 KB).
constexpr size_t kMaxSmemBytes = 163 * 1024;
template <int D>
constexpr bool fits_smem() {
  return Tiles<D>::kForwardFloats * sizeof(float) <= kMaxSmemBytes &&
         Tiles<D>::kBackwardKvFloats * sizeof(float) <= kMaxSmemBytes &&
         Tiles<D>::kBackwardQFloats * sizeof(float) <= kMaxSmemBytes;
}
static_assert(fits_smem<32>() && fits_smem<64>() && fits_smem<128>(),
              "a tiled kernel needs more shared memory than an sm_80 block has");

// The kernels' dynamic shared memory, 16-byte aligned for the float4 tile accesses.
// (Every sub-tile below starts at a multiple of 4 floats.)
__device__ __forceinline__ float* dynamic_smem() {
  extern __shared__ float4 attention_smem[];
  return reinterpret_cast<float*>(attention_smem);
}

// The head layout of one call (the host checks that the row width fits in int, so every
// head count and column offset does). Offsets are in floats within a row.
struct Heads {
  int H, KVH, hs;  // query heads, key/value heads (H % KVH == 0), head size
  __host__ __device__ int group() const { return H / KVH; }           // G
  __host__ __device__ int kv_head(int h) const { return h / group(); }  // g of query head h
  __host__ __device__ int64_t width() const { return int64_t{H + 2 * KVH} * hs; }  // qkv row
  __host__ __device__ int64_t q_width() const { return int64_t{H} * hs; }          // out row
  __host__ __device__ int64_t kv_width() const { return int64_t{KVH} * hs; }       // cache row
  __host__ __device__ int64_t q_col(int h) const { return int64_t{h} * hs; }
  __host__ __device__ int64_t k_col(int g) const { return int64_t{H + g} * hs; }
  __host__ __device__ int64_t v_col(int g) const { return int64_t{H + KVH + g} * hs; }
};

// lengths[b] clamped to [0, T] (nullptr: T).
__device__ __forceinline__ int valid_length(const int32_t* lengths, int b, int T) {
  if (lengths == nullptr) return T;
  return min(max(static_cast<int>(lengths[b]), 0), T);
}

// tile[r][i] = src[r * stride + i] for r < valid_rows and i < hs, 0 elsewhere (rows past
// the valid ones, dims hs..D-1): masked rows and padded dims are finite zeros. `src` is
// row 0 of the tile in this head's columns. Consecutive threads read consecutive dims.
template <int D, int kRows>
__device__ __forceinline__ void load_rows(float* tile, const float* src, int64_t stride,
                                          int valid_rows, int hs) {
  for (int idx = threadIdx.x; idx < kRows * D; idx += kAttnThreads) {
    const int r = idx / D, i = idx % D;
    float v = 0.0f;
    if (r < valid_rows && i < hs) v = src[r * stride + i];
    tile[r * Tiles<D>::kLd + i] = v;
  }
}

// Dot products of a tile pair, reduction over the head dims:
//   acc[a][k] = sum_{d < D} X[rg*4 + a][d] * Y[cg + 8k][d]      (d ascending)
// X [64][D+4] and Y [8*NY][D+4] in shared memory. Per 4 dims a thread loads 4 + NY
// float4s for 16 * NY fused multiply-adds; X loads are broadcasts within a row group,
// Y loads of the 8 lanes cover 32 distinct banks (row stride = 4 banks mod 32).
template <int D, int NY>
__device__ __forceinline__ void tile_dots(const float* X, const float* Y, int rg, int cg,
                                          float (&acc)[kRowsPerThread][NY]) {
  constexpr int kLd = Tiles<D>::kLd;
#pragma unroll
  for (int a = 0; a < kRowsPerThread; ++a)
#pragma unroll
    for (int k = 0; k < NY; ++k) acc[a][k] = 0.0f;
#pragma unroll 4
  for (int d = 0; d < D; d += 4) {
    float4 x[kRowsPerThread], y[NY];
#pragma unroll
    for (int a = 0; a < kRowsPerThread; ++a)
      x[a] = *reinterpret_cast<const float4*>(X + (rg * kRowsPerThread + a) * kLd + d);
#pragma unroll
    for (int k = 0; k < NY; ++k)
      y[k] = *reinterpret_cast<const float4*>(Y + (cg + kGroupLanes * k) * kLd + d);
#pragma unroll
    for (int a = 0; a < kRowsPerThread; ++a)
#pragma unroll
      for (int k = 0; k < NY; ++k) {
        float s = acc[a][k];
        s = fmaf(x[a].x, y[k].x, s);
        s = fmaf(x[a].y, y[k].y, s);
        s = fmaf(x[a].z, y[k].z, s);
        s = fmaf(x[a].w, y[k].w, s);
        acc[a][k] = s;
      }
  }
}

// Stores a thread's block of weights transposed: W[cg + 8k][rg*4 + a] = w[a][k], one
// float4 per k (the 8 lanes of a row group hit distinct 4-bank groups: stride 68).
template <int NY>
__device__ __forceinline__ void store_transposed(float* W, int rg, int cg,
                                                 const float (&w)[kRowsPerThread][NY]) {
#pragma unroll
  for (int k = 0; k < NY; ++k)
    *reinterpret_cast<float4*>(W + (cg + kGroupLanes * k) * kLdW + rg * kRowsPerThread) =
        make_float4(w[0][k], w[1][k], w[2][k], w[3][k]);
}

// Weighted sums of a streamed tile, reduction over its rows j:
//   acc[a][4m + e] += sum_{j < J} W[j][rg*4 + a] * M[j][cg*4 + 32m + e]   (j ascending)
// W [>= J][kLdW] (transposed weights), M [>= J][D+4]. Per row j: one broadcast float4 of
// weights and D/32 float4s of M (the 8 lanes read 32 consecutive floats).
template <int D>
__device__ __forceinline__ void tile_weighted_sum(const float* W, const float* M, int J, int rg,
                                                  int cg,
                                                  float (&acc)[kRowsPerThread][Tiles<D>::kNI]) {
  constexpr int kLd = Tiles<D>::kLd;
#pragma unroll 4
  for (int j = 0; j < J; ++j) {
    const float4 w = *reinterpret_cast<const float4*>(W + j * kLdW + rg * kRowsPerThread);
#pragma unroll
    for (int m = 0; m < D / 32; ++m) {
      const float4 v = *reinterpret_cast<const float4*>(M + j * kLd + cg * 4 + 32 * m);
      const float wa[kRowsPerThread] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int a = 0; a < kRowsPerThread; ++a) {
        acc[a][4 * m + 0] = fmaf(wa[a], v.x, acc[a][4 * m + 0]);
        acc[a][4 * m + 1] = fmaf(wa[a], v.y, acc[a][4 * m + 1]);
        acc[a][4 * m + 2] = fmaf(wa[a], v.z, acc[a][4 * m + 2]);
        acc[a][4 * m + 3] = fmaf(wa[a], v.w, acc[a][4 * m + 3]);
      }
    }
  }
}

// The head dim of a thread's accumulator n = 4m + e.
__device__ __forceinline__ int owned_dim(int cg, int n) { return cg * 4 + 32 * (n / 4) + n % 4; }

// Max / sum over the 8 lanes of a row group by a fixed xor butterfly: every lane ends
// with the same bits (a + b and b + a round alike).
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int offset = 1; offset < kGroupLanes; offset *= 2)
    v = fmaxf(v, __shfl_xor_sync(kFullWarp, v, offset));
  return v;
}
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int offset = 1; offset < kGroupLanes; offset *= 2)
    v += __shfl_xor_sync(kFullWarp, v, offset);
  return v;
}

// ---- forward, tiled ---------------------------------------------------------------------

// Grid: B * H * q_tiles blocks of kAttnThreads; the tiles with the most keys go first.
template <int D>
__global__ void __launch_bounds__(kAttnThreads)
    attention_forward_kernel(int B, int T, Heads hd, const int32_t* lengths,
                             const float* __restrict__ qkv, float* __restrict__ saved,
                             float* __restrict__ out, float scale, int q_tiles) {
  using Tl = Tiles<D>;
  constexpr int kTileY = Tl::kTileY, kNY = Tl::kNY, kNI = Tl::kNI, kLd = Tl::kLd;
  float* q_s = dynamic_smem();          // [64][kLd]      this block's queries
  float* k_s = q_s + kTileX * kLd;      // [kTileY][kLd]  the current keys
  float* v_s = k_s + kTileY * kLd;      // [kTileY][kLd]  the current values
  float* p_s = v_s + kTileY * kLd;      // [kTileY][kLdW] probabilities, transposed

  const int bh_count = B * hd.H;
  const int bh = static_cast<int>(blockIdx.x % bh_count);
  const int tile = q_tiles - 1 - static_cast<int>(blockIdx.x / bh_count);
  const int b = bh / hd.H, h = bh % hd.H, g = hd.kv_head(h), hs = hd.hs;
  const int len = valid_length(lengths, b, T);
  const int t0 = tile * kTileX;
  const int tid = threadIdx.x, rg = tid / kGroupLanes, cg = tid % kGroupLanes;
  const int64_t W = hd.width(), Cq = hd.q_width();
  const float* row0 = qkv + int64_t{b} * T * W;  // row (b, 0)
  const float* q_head = row0 + hd.q_col(h);      // q of head h
  const float* k_head = row0 + hd.k_col(g);      // k and v of its kv head
  const float* v_head = row0 + hd.v_col(g);
  float* out_head = out + int64_t{b} * T * Cq + hd.q_col(h);
  float* lse = saved != nullptr ? saved + int64_t{bh} * T : nullptr;  // saved [B, H, T]

  if (t0 >= len) {  // a tile of padding rows only (uniform over the block): zeros
    const int rows = min(kTileX, T - t0);
    for (int idx = tid; idx < rows * hs; idx += kAttnThreads)
      out_head[int64_t{t0 + idx / hs} * Cq + idx % hs] = 0.0f;
    if (lse != nullptr)
      for (int r = tid; r < rows; r += kAttnThreads) lse[t0 + r] = 0.0f;
    return;
  }

  load_rows<D, kTileX>(q_s, q_head + t0 * W, W, len - t0, hs);
  float o[kRowsPerThread][kNI];
  float m[kRowsPerThread], l[kRowsPerThread];
#pragma unroll
  for (int a = 0; a < kRowsPerThread; ++a) {
    m[a] = -INFINITY;
    l[a] = 0.0f;
#pragma unroll
    for (int n = 0; n < kNI; ++n) o[a][n] = 0.0f;
  }

  // Keys 0 .. kv_end-1: the last valid row of the tile reads up to key kv_end - 1.
  const int kv_end = min(len, t0 + kTileX);
  for (int s0 = 0; s0 < kv_end; s0 += kTileY) {
    __syncthreads();  // the previous step's readers of k_s, v_s, p_s are done
    load_rows<D, kTileY>(k_s, k_head + s0 * W, W, kv_end - s0, hs);
    load_rows<D, kTileY>(v_s, v_head + s0 * W, W, kv_end - s0, hs);
    __syncthreads();

    float s[kRowsPerThread][kNY];
    tile_dots<D, kNY>(q_s, k_s, rg, cg, s);
#pragma unroll
    for (int a = 0; a < kRowsPerThread; ++a) {
      const int t = t0 + rg * kRowsPerThread + a;
      float tile_max = -INFINITY;
#pragma unroll
      for (int k = 0; k < kNY; ++k) {
        // Keys past kv_end are > t for every valid row t, so s <= t is the whole mask.
        const int key = s0 + cg + kGroupLanes * k;
        s[a][k] = key <= t ? s[a][k] * scale : -INFINITY;
        tile_max = fmaxf(tile_max, s[a][k]);
      }
      const float m_new = fmaxf(m[a], group_max(tile_max));
      // m_new is finite for every valid row (key 0 is in the first tile); the guard keeps
      // a fully masked row at exp(-inf - 0) = 0 rather than NaN.
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = expf(m[a] - m_use);  // 0 on the first tile (m = -inf)
      float row_sum = 0.0f;
#pragma unroll
      for (int k = 0; k < kNY; ++k) {
        s[a][k] = expf(s[a][k] - m_use);  // masked: exp(-inf) = 0
        row_sum += s[a][k];
      }
      l[a] = l[a] * alpha + group_sum(row_sum);
      m[a] = m_new;
#pragma unroll
      for (int n = 0; n < kNI; ++n) o[a][n] *= alpha;
    }
    store_transposed<kNY>(p_s, rg, cg, s);
    __syncthreads();
    tile_weighted_sum<D>(p_s, v_s, min(kTileY, kv_end - s0), rg, cg, o);
  }

#pragma unroll
  for (int a = 0; a < kRowsPerThread; ++a) {
    const int t = t0 + rg * kRowsPerThread + a;
    if (t >= T) continue;
    float* row = out_head + int64_t{t} * Cq;
    const bool valid = t < len;
    const float inv_l = valid ? 1.0f / l[a] : 0.0f;
#pragma unroll
    for (int n = 0; n < kNI; ++n) {
      const int i = owned_dim(cg, n);
      if (i < hs) row[i] = valid ? o[a][n] * inv_l : 0.0f;  // padding rows: 0
    }
    if (lse != nullptr && cg == 0) lse[t] = valid ? m[a] + logf(l[a]) : 0.0f;
  }
}

// ---- backward, tiled ----------------------------------------------------------------------

// Dsum[b, h, t] = sum_i grad_out[b, t, h*hs + i] * out[b, t, h*hs + i] (0 for padding
// rows; rows of H hs floats). One warp per (b, h, t), grid-striding; lanes take dims
// i = lane + 32j and the warp reduces in a fixed butterfly.
__global__ void __launch_bounds__(kThreads)
    attention_dsum_kernel(int B, int T, Heads hd, const int32_t* lengths,
                          const float* __restrict__ grad_out, const float* __restrict__ out,
                          float* __restrict__ dsum) {
  const int H = hd.H, hs = hd.hs;
  const int64_t Cq = hd.q_width();
  const int lane = threadIdx.x % kWarpSize;
  const int64_t items = int64_t{B} * H * T;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / kWarpSize);
  for (int64_t item = global_thread_index() / kWarpSize; item < items; item += warps) {
    const int t = static_cast<int>(item % T);
    const int bh = static_cast<int>(item / T);
    const int b = bh / H, h = bh % H;
    float sum = 0.0f;
    if (t < valid_length(lengths, b, T)) {  // uniform over the warp
      const int64_t offset = (int64_t{b} * T + t) * Cq + hd.q_col(h);
      for (int i = lane; i < hs; i += kWarpSize) sum = fmaf(grad_out[offset + i], out[offset + i], sum);
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
      sum += __shfl_xor_sync(kFullWarp, sum, offset);
    if (lane == 0) dsum[item] = sum;
  }
}

// dK and dV of a tile of 64 keys of kv head g, summed over the G query heads of its group
// (h = g*G .. g*G+G-1 in order, each over its query tiles in order). Grid: B * KVH *
// k_tiles blocks; the first key tiles (the most query rows) go first. Adds into
// grad_qkv's k and v parts of kv head g, rows s < length.
template <int D>
__global__ void __launch_bounds__(kAttnThreads)
    attention_backward_kv_kernel(int B, int T, Heads hd, const int32_t* lengths,
                                 const float* __restrict__ grad_out,
                                 const float* __restrict__ qkv, const float* __restrict__ lse,
                                 const float* __restrict__ dsum, float* __restrict__ grad_qkv,
                                 float scale) {
  using Tl = Tiles<D>;
  constexpr int kTileY = Tl::kTileY, kNY = Tl::kNY, kNI = Tl::kNI, kLd = Tl::kLd;
  float* k_s = dynamic_smem();          // [64][kLd]      this block's keys
  float* v_s = k_s + kTileX * kLd;      // [64][kLd]      and values
  float* q_s = v_s + kTileX * kLd;      // [kTileY][kLd]  the current queries
  float* do_s = q_s + kTileY * kLd;     // [kTileY][kLd]  and their grad_out rows
  float* p_s = do_s + kTileY * kLd;     // [kTileY][kLdW] P^T of the tile, [query][key]
  float* ds_s = p_s + kTileY * kLdW;    // [kTileY][kLdW] dS^T, [query][key]
  float* lse_s = ds_s + kTileY * kLdW;  // [kTileY]
  float* dsum_s = lse_s + kTileY;       // [kTileY]

  const int bg_count = B * hd.KVH;
  const int bg = static_cast<int>(blockIdx.x % bg_count);
  const int s0 = static_cast<int>(blockIdx.x / bg_count) * kTileX;
  const int b = bg / hd.KVH, g = bg % hd.KVH, hs = hd.hs, group = hd.group();
  const int len = valid_length(lengths, b, T);
  if (s0 >= len) return;  // padding keys: no valid query reads them
  const int tid = threadIdx.x, rg = tid / kGroupLanes, cg = tid % kGroupLanes;
  const int64_t W = hd.width(), Cq = hd.q_width();
  const float* row0 = qkv + int64_t{b} * T * W;  // row (b, 0)

  load_rows<D, kTileX>(k_s, row0 + hd.k_col(g) + s0 * W, W, len - s0, hs);
  load_rows<D, kTileX>(v_s, row0 + hd.v_col(g) + s0 * W, W, len - s0, hs);
  float dk[kRowsPerThread][kNI], dv[kRowsPerThread][kNI];
#pragma unroll
  for (int a = 0; a < kRowsPerThread; ++a)
#pragma unroll
    for (int n = 0; n < kNI; ++n) dk[a][n] = dv[a][n] = 0.0f;

  for (int h = g * group; h < (g + 1) * group; ++h) {  // the group's query heads, in order
    const float* q_head = row0 + hd.q_col(h);
    const float* go_head = grad_out + int64_t{b} * T * Cq + hd.q_col(h);
    const float* lse_bh = lse + (int64_t{b} * hd.H + h) * T;
    const float* dsum_bh = dsum + (int64_t{b} * hd.H + h) * T;
    // Query rows t in [s0, len): the earlier ones read none of these keys. kTileY divides
    // 64, so the query tiles stay aligned to multiples of kTileY.
    for (int q0 = s0; q0 < len; q0 += kTileY) {
      __syncthreads();  // the previous step's readers of q_s, do_s, p_s, ds_s are done
      load_rows<D, kTileY>(q_s, q_head + q0 * W, W, len - q0, hs);
      load_rows<D, kTileY>(do_s, go_head + int64_t{q0} * Cq, Cq, len - q0, hs);
      for (int r = tid; r < kTileY; r += kAttnThreads) {  // never read past the valid rows
        const bool valid = q0 + r < len;
        lse_s[r] = valid ? lse_bh[q0 + r] : 0.0f;
        dsum_s[r] = valid ? dsum_bh[q0 + r] : 0.0f;
      }
      __syncthreads();

      // Transposed scores: x = key s (rows of K, V), y = query t (rows of Q, dO). The dot
      // products are the forward's (the same products, d ascending), bit for bit.
      float p[kRowsPerThread][kNY], ds[kRowsPerThread][kNY];
      tile_dots<D, kNY>(k_s, q_s, rg, cg, p);
      tile_dots<D, kNY>(v_s, do_s, rg, cg, ds);  // dP^T = V dO^T
#pragma unroll
      for (int a = 0; a < kRowsPerThread; ++a) {
        const int s = s0 + rg * kRowsPerThread + a;
#pragma unroll
        for (int k = 0; k < kNY; ++k) {
          const int r = cg + kGroupLanes * k;
          const int t = q0 + r;
          const float prob = s <= t && t < len ? expf(p[a][k] * scale - lse_s[r]) : 0.0f;
          p[a][k] = prob;
          ds[a][k] = prob * (ds[a][k] - dsum_s[r]);
        }
      }
      store_transposed<kNY>(p_s, rg, cg, p);
      store_transposed<kNY>(ds_s, rg, cg, ds);
      __syncthreads();
      const int rows = min(kTileY, len - q0);
      tile_weighted_sum<D>(p_s, do_s, rows, rg, cg, dv);   // dV += P^T dO
      tile_weighted_sum<D>(ds_s, q_s, rows, rg, cg, dk);   // dK += dS^T Q (scaled below)
    }
  }

  float* g_row0 = grad_qkv + int64_t{b} * T * W;
#pragma unroll
  for (int a = 0; a < kRowsPerThread; ++a) {
    const int s = s0 + rg * kRowsPerThread + a;
    if (s >= len) continue;
    float* gk = g_row0 + int64_t{s} * W + hd.k_col(g);
    float* gv = g_row0 + int64_t{s} * W + hd.v_col(g);
#pragma unroll
    for (int n = 0; n < kNI; ++n) {
      const int i = owned_dim(cg, n);
      if (i < hs) {
        gk[i] += dk[a][n] * scale;
        gv[i] += dv[a][n];
      }
    }
  }
}

// dQ of a tile of 64 queries of head h (keys and values of its kv head). Grid: B * H *
// q_tiles blocks, the tiles with the most keys first. Adds into grad_qkv's q part of
// head h, rows t < length.
template <int D>
__global__ void __launch_bounds__(kAttnThreads)
    attention_backward_q_kernel(int B, int T, Heads hd, const int32_t* lengths,
                                const float* __restrict__ grad_out,
                                const float* __restrict__ qkv, const float* __restrict__ lse,
                                const float* __restrict__ dsum, float* __restrict__ grad_qkv,
                                float scale, int q_tiles) {
  using Tl = Tiles<D>;
  constexpr int kTileY = Tl::kTileY, kNY = Tl::kNY, kNI = Tl::kNI, kLd = Tl::kLd;
  float* q_s = dynamic_smem();          // [64][kLd]      this block's queries
  float* do_s = q_s + kTileX * kLd;     // [64][kLd]      and their grad_out rows
  float* k_s = do_s + kTileX * kLd;     // [kTileY][kLd]  the current keys
  float* v_s = k_s + kTileY * kLd;      // [kTileY][kLd]  and values
  float* ds_s = v_s + kTileY * kLd;     // [kTileY][kLdW] dS, transposed: [key][query]

  const int bh_count = B * hd.H;
  const int bh = static_cast<int>(blockIdx.x % bh_count);
  const int t0 = (q_tiles - 1 - static_cast<int>(blockIdx.x / bh_count)) * kTileX;
  const int b = bh / hd.H, h = bh % hd.H, g = hd.kv_head(h), hs = hd.hs;
  const int len = valid_length(lengths, b, T);
  if (t0 >= len) return;  // padding rows: grad_qkv untouched
  const int tid = threadIdx.x, rg = tid / kGroupLanes, cg = tid % kGroupLanes;
  const int64_t W = hd.width(), Cq = hd.q_width();
  const float* row0 = qkv + int64_t{b} * T * W;  // row (b, 0)
  const float* k_head = row0 + hd.k_col(g);
  const float* v_head = row0 + hd.v_col(g);
  const float* go_head = grad_out + int64_t{b} * T * Cq + hd.q_col(h);

  load_rows<D, kTileX>(q_s, row0 + hd.q_col(h) + t0 * W, W, len - t0, hs);
  load_rows<D, kTileX>(do_s, go_head + int64_t{t0} * Cq, Cq, len - t0, hs);
  float row_lse[kRowsPerThread], row_dsum[kRowsPerThread];
  float dq[kRowsPerThread][kNI];
#pragma unroll
  for (int a = 0; a < kRowsPerThread; ++a) {
    const int t = t0 + rg * kRowsPerThread + a;
    const bool valid = t < len;  // never read past the valid rows
    row_lse[a] = valid ? lse[int64_t{bh} * T + t] : 0.0f;
    row_dsum[a] = valid ? dsum[int64_t{bh} * T + t] : 0.0f;
#pragma unroll
    for (int n = 0; n < kNI; ++n) dq[a][n] = 0.0f;
  }

  const int kv_end = min(len, t0 + kTileX);
  for (int s0 = 0; s0 < kv_end; s0 += kTileY) {
    __syncthreads();  // the previous step's readers of k_s, v_s, ds_s are done
    load_rows<D, kTileY>(k_s, k_head + s0 * W, W, kv_end - s0, hs);
    load_rows<D, kTileY>(v_s, v_head + s0 * W, W, kv_end - s0, hs);
    __syncthreads();

    float sc[kRowsPerThread][kNY], ds[kRowsPerThread][kNY];
    tile_dots<D, kNY>(q_s, k_s, rg, cg, sc);
    tile_dots<D, kNY>(do_s, v_s, rg, cg, ds);  // dP = dO V^T
#pragma unroll
    for (int a = 0; a < kRowsPerThread; ++a) {
      const int t = t0 + rg * kRowsPerThread + a;
#pragma unroll
      for (int k = 0; k < kNY; ++k) {
        const int s = s0 + cg + kGroupLanes * k;
        const float prob = s <= t && t < len ? expf(sc[a][k] * scale - row_lse[a]) : 0.0f;
        ds[a][k] = prob * (ds[a][k] - row_dsum[a]);
      }
    }
    store_transposed<kNY>(ds_s, rg, cg, ds);
    __syncthreads();
    tile_weighted_sum<D>(ds_s, k_s, min(kTileY, kv_end - s0), rg, cg, dq);  // dQ += dS K
  }

  float* g_head = grad_qkv + int64_t{b} * T * W + hd.q_col(h);
#pragma unroll
  for (int a = 0; a < kRowsPerThread; ++a) {
    const int t = t0 + rg * kRowsPerThread + a;
    if (t >= len) continue;
    float* gq = g_head + int64_t{t} * W;
#pragma unroll
    for (int n = 0; n < kNI; ++n) {
      const int i = owned_dim(cg, n);
      if (i < hs) gq[i] += dq[a][n] * scale;
    }
  }
}

// ---- the row routines (any head size; decode) ----------------------------------------------

// Max / sum of one value per thread over the block (kAttnThreads): a warp butterfly, then
// the warps' results combined in warp order. Every thread gets the result. `red` holds
// kAttnWarps floats; the caller syncs before reusing it.
__device__ __forceinline__ float block_max(float v, float* red) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v = fmaxf(v, __shfl_xor_sync(kFullWarp, v, offset));
  if (threadIdx.x % kWarpSize == 0) red[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  float r = red[0];
#pragma unroll
  for (int w = 1; w < kAttnWarps; ++w) r = fmaxf(r, red[w]);
  return r;
}
__device__ __forceinline__ float block_sum_float(float v, float* red) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(kFullWarp, v, offset);
  if (threadIdx.x % kWarpSize == 0) red[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  float r = red[0];
#pragma unroll
  for (int w = 1; w < kAttnWarps; ++w) r += red[w];
  return r;
}

// Shared floats attend_row needs for head size hs.
inline size_t row_smem_floats(int64_t hs) {
  return static_cast<size_t>(2 * hs + kAttnThreads + 2 * kAttnWarps);
}

// One query against keys 0..n-1 (n >= 1), the whole block:
//   out[i] = sum_s softmax_s(q . k_s * scale) v_s[i],  *lse_out = log-sum-exp of the scores
// q: hs floats; key s at k + s * stride, value s at v + s * stride (plain loads). Keys go
// in chunks of kAttnThreads, one per thread (dot product over i ascending), with the
// online softmax; then one thread per head dim adds the chunk's weighted values (keys
// ascending).
// Shared: smem [row_smem_floats(hs)].
__device__ void attend_row(int hs, float scale, const float* q, const float* k, const float* v,
                           int64_t stride, int n, float* smem, float* out, float* lse_out) {
  float* q_s = smem;                    // [hs]
  float* acc_s = q_s + hs;              // [hs] thread tid owns dims tid, tid + 128, ...
  float* p_s = acc_s + hs;              // [kAttnThreads] the chunk's probabilities
  float* red = p_s + kAttnThreads;      // [2][kAttnWarps]
  const int tid = threadIdx.x;
  for (int i = tid; i < hs; i += kAttnThreads) {
    q_s[i] = q[i];
    acc_s[i] = 0.0f;
  }
  __syncthreads();
  float m = -INFINITY, l = 0.0f;  // the same in every thread
  for (int c0 = 0; c0 < n; c0 += kAttnThreads) {
    const int s = c0 + tid;
    float score = -INFINITY;
    if (s < n) {
      const float* key = k + s * stride;
      float dot = 0.0f;
      for (int i = 0; i < hs; ++i) dot = fmaf(q_s[i], key[i], dot);
      score = dot * scale;
    }
    const float m_new = fmaxf(m, block_max(score, red));  // finite: key c0 < n is valid
    const float p = s < n ? expf(score - m_new) : 0.0f;
    p_s[tid] = p;
    // (block_sum_float's __syncthreads also publishes p_s.)
    const float chunk_sum = block_sum_float(p, red + kAttnWarps);
    const float alpha = expf(m - m_new);  // 0 on the first chunk
    l = l * alpha + chunk_sum;
    m = m_new;
    const int count = min(kAttnThreads, n - c0);
    for (int i = tid; i < hs; i += kAttnThreads) {
      float a = acc_s[i] * alpha;
      const float* value = v + c0 * stride + i;
      for (int j = 0; j < count; ++j) a = fmaf(p_s[j], value[j * stride], a);
      acc_s[i] = a;
    }
    __syncthreads();  // p_s and red are rewritten by the next chunk
  }
  const float inv_l = 1.0f / l;
  for (int i = tid; i < hs; i += kAttnThreads) out[i] = acc_s[i] * inv_l;
  if (lse_out != nullptr && tid == 0) *lse_out = m + logf(l);
}


// Forward for head sizes above the tiled buckets: one block per (b, h, t), the rows with
// the most keys first. Grid: B * H * T blocks.
__global__ void __launch_bounds__(kAttnThreads)
    attention_forward_rows_kernel(int B, int T, Heads hd, const int32_t* lengths,
                                  const float* qkv, float* saved, float* out, float scale) {
  const int bh_count = B * hd.H;
  const int bh = static_cast<int>(blockIdx.x % bh_count);
  const int t = T - 1 - static_cast<int>(blockIdx.x / bh_count);
  const int b = bh / hd.H, h = bh % hd.H, g = hd.kv_head(h), hs = hd.hs;
  const int64_t W = hd.width();
  float* o = out + (int64_t{b} * T + t) * hd.q_width() + hd.q_col(h);
  float* lse = saved != nullptr ? saved + int64_t{bh} * T + t : nullptr;
  if (t >= valid_length(lengths, b, T)) {  // padding row
    for (int i = threadIdx.x; i < hs; i += kAttnThreads) o[i] = 0.0f;
    if (lse != nullptr && threadIdx.x == 0) *lse = 0.0f;
    return;
  }
  const float* row0 = qkv + int64_t{b} * T * W;  // row (b, 0)
  attend_row(hs, scale, row0 + t * W + hd.q_col(h), row0 + hd.k_col(g), row0 + hd.v_col(g), W,
             t + 1, dynamic_smem(), o, lse);
}

// dQ for the large head sizes: one block per (b, h, t) with t < length; keys of kv head
// h / G in chunks of kAttnThreads (one per thread: score, dP, dS), then one thread per dim
// adds dS k_s. Shared: q_t, dO_t, dQ accumulators [hs] each, dS [kAttnThreads].
__global__ void __launch_bounds__(kAttnThreads)
    attention_backward_q_rows_kernel(int B, int T, Heads hd, const int32_t* lengths,
                                     const float* __restrict__ grad_out,
                                     const float* __restrict__ qkv,
                                     const float* __restrict__ lse,
                                     const float* __restrict__ dsum,
                                     float* __restrict__ grad_qkv, float scale) {
  const int bh_count = B * hd.H;
  const int bh = static_cast<int>(blockIdx.x % bh_count);
  const int t = T - 1 - static_cast<int>(blockIdx.x / bh_count);
  const int b = bh / hd.H, h = bh % hd.H, g = hd.kv_head(h), hs = hd.hs;
  if (t >= valid_length(lengths, b, T)) return;
  const int tid = threadIdx.x;
  const int64_t W = hd.width();
  const float* row0 = qkv + int64_t{b} * T * W;  // row (b, 0)
  const float* q = row0 + t * W + hd.q_col(h);
  const float* k_head = row0 + hd.k_col(g);
  const float* v_head = row0 + hd.v_col(g);
  const float* go = grad_out + (int64_t{b} * T + t) * hd.q_width() + hd.q_col(h);
  float* q_s = dynamic_smem();
  float* do_s = q_s + hs;
  float* acc_s = do_s + hs;
  float* w_s = acc_s + hs;
  for (int i = tid; i < hs; i += kAttnThreads) {
    q_s[i] = q[i];
    do_s[i] = go[i];
    acc_s[i] = 0.0f;
  }
  const float row_lse = lse[int64_t{bh} * T + t], row_dsum = dsum[int64_t{bh} * T + t];
  __syncthreads();
  for (int c0 = 0; c0 <= t; c0 += kAttnThreads) {
    const int s = c0 + tid;
    float w = 0.0f;
    if (s <= t) {
      const float* key = k_head + s * W;
      const float* value = v_head + s * W;
      float dot = 0.0f, dp = 0.0f;
      for (int i = 0; i < hs; ++i) {
        dot = fmaf(q_s[i], key[i], dot);
        dp = fmaf(do_s[i], value[i], dp);
      }
      w = expf(dot * scale - row_lse) * (dp - row_dsum);
    }
    w_s[tid] = w;
    __syncthreads();
    const int count = min(kAttnThreads, t + 1 - c0);
    for (int i = tid; i < hs; i += kAttnThreads) {
      float a = acc_s[i];
      const float* key = k_head + c0 * W + i;
      for (int j = 0; j < count; ++j) a = fmaf(w_s[j], key[j * W], a);
      acc_s[i] = a;
    }
    __syncthreads();  // w_s is rewritten by the next chunk
  }
  float* gq = grad_qkv + (int64_t{b} * T + t) * W + hd.q_col(h);
  for (int i = tid; i < hs; i += kAttnThreads) gq[i] += acc_s[i] * scale;
}

// dK and dV for the large head sizes: one block per (b, kv head g, s) with s < length;
// for each query head h of the group in order, its queries t in [s, length) in chunks
// (one per thread: P, dS), then one thread per dim adds P dO_t and dS q_t. Shared: k_s,
// v_s, dK, dV [hs] each, P and dS [kAttnThreads] each. Grid: B * KVH * T blocks.
__global__ void __launch_bounds__(kAttnThreads)
    attention_backward_kv_rows_kernel(int B, int T, Heads hd, const int32_t* lengths,
                                      const float* __restrict__ grad_out,
                                      const float* __restrict__ qkv,
                                      const float* __restrict__ lse,
                                      const float* __restrict__ dsum,
                                      float* __restrict__ grad_qkv, float scale) {
  const int bg_count = B * hd.KVH;
  const int bg = static_cast<int>(blockIdx.x % bg_count);
  const int s = static_cast<int>(blockIdx.x / bg_count);  // the most queries first
  const int b = bg / hd.KVH, g = bg % hd.KVH, hs = hd.hs, group = hd.group();
  const int len = valid_length(lengths, b, T);
  if (s >= len) return;
  const int tid = threadIdx.x;
  const int64_t W = hd.width(), Cq = hd.q_width();
  const float* row0 = qkv + int64_t{b} * T * W;  // row (b, 0)
  float* k_s = dynamic_smem();
  float* v_s = k_s + hs;
  float* dk_s = v_s + hs;
  float* dv_s = dk_s + hs;
  float* p_s = dv_s + hs;
  float* ds_s = p_s + kAttnThreads;
  for (int i = tid; i < hs; i += kAttnThreads) {
    k_s[i] = row0[s * W + hd.k_col(g) + i];
    v_s[i] = row0[s * W + hd.v_col(g) + i];
    dk_s[i] = 0.0f;
    dv_s[i] = 0.0f;
  }
  __syncthreads();
  for (int h = g * group; h < (g + 1) * group; ++h) {  // the group's query heads, in order
    const float* q_head = row0 + hd.q_col(h);
    const float* go_head = grad_out + int64_t{b} * T * Cq + hd.q_col(h);
    const float* lse_bh = lse + (int64_t{b} * hd.H + h) * T;
    const float* dsum_bh = dsum + (int64_t{b} * hd.H + h) * T;
    for (int c0 = s; c0 < len; c0 += kAttnThreads) {
      const int t = c0 + tid;
      float p = 0.0f, ds = 0.0f;
      if (t < len) {
        const float* query = q_head + t * W;
        const float* go = go_head + t * Cq;
        float dot = 0.0f, dp = 0.0f;
        for (int i = 0; i < hs; ++i) {
          dot = fmaf(query[i], k_s[i], dot);
          dp = fmaf(go[i], v_s[i], dp);
        }
        p = expf(dot * scale - lse_bh[t]);
        ds = p * (dp - dsum_bh[t]);
      }
      p_s[tid] = p;
      ds_s[tid] = ds;
      __syncthreads();
      const int count = min(kAttnThreads, len - c0);
      for (int i = tid; i < hs; i += kAttnThreads) {
        float a_k = dk_s[i], a_v = dv_s[i];
        const float* query = q_head + c0 * W + i;
        const float* go = go_head + c0 * Cq + i;
        for (int j = 0; j < count; ++j) {
          a_v = fmaf(p_s[j], go[j * Cq], a_v);
          a_k = fmaf(ds_s[j], query[j * W], a_k);
        }
        dk_s[i] = a_k;
        dv_s[i] = a_v;
      }
      __syncthreads();  // p_s, ds_s are rewritten by the next chunk
    }
  }
  float* g_row = grad_qkv + (int64_t{b} * T + s) * W;
  for (int i = tid; i < hs; i += kAttnThreads) {
    g_row[hd.k_col(g) + i] += dk_s[i] * scale;
    g_row[hd.v_col(g) + i] += dv_s[i];
  }
}

// ---- the KV cache ---------------------------------------------------------------------------

// k_cache / v_cache [B, cache_T, KVH hs] rows t < length of sequence b = the k / v parts
// of qkv [B, T, W]. One thread per (b, t, c), grid-striding.
__global__ void __launch_bounds__(kThreads)
    kv_cache_store_kernel(int64_t B, int64_t T, Heads hd, const int32_t* lengths,
                          const float* __restrict__ qkv, int64_t cache_T,
                          float* __restrict__ k_cache, float* __restrict__ v_cache) {
  const int64_t KC = hd.kv_width(), W = hd.width();
  const int64_t n = B * T * KC;
  for (int64_t idx = global_thread_index(); idx < n; idx += grid_thread_count()) {
    const int64_t c = idx % KC, row = idx / KC;
    const int64_t t = row % T, b = row / T;
    if (t >= valid_length(lengths, static_cast<int>(b), static_cast<int>(T))) continue;
    const float* src = qkv + row * W + c;
    const int64_t dst = (b * cache_T + t) * KC + c;
    k_cache[dst] = src[hd.k_col(0)];
    v_cache[dst] = src[hd.v_col(0)];
  }
}

// The first kernel of a decoding step: the k and v parts of qkv [B, W] row b go to row
// p = positions[b] of the caches [B, cache_T, KVH hs] when 0 <= p < cache_T (other rows:
// caches untouched). One thread per (b, c), grid-striding, so every element is written
// exactly once, whatever the number of query heads reading it; the attention kernel,
// launched after this one on the same stream, reads it.
__global__ void __launch_bounds__(kThreads)
    kv_cache_append_kernel(int64_t B, Heads hd, const int32_t* __restrict__ positions,
                           const float* __restrict__ qkv, int64_t cache_T,
                           float* __restrict__ k_cache, float* __restrict__ v_cache) {
  const int64_t KC = hd.kv_width(), W = hd.width();
  const int64_t n = B * KC;
  for (int64_t idx = global_thread_index(); idx < n; idx += grid_thread_count()) {
    const int64_t c = idx % KC, b = idx / KC;
    const int64_t p = positions[b];
    if (p < 0 || p >= cache_T) continue;
    const float* src = qkv + b * W + c;
    const int64_t dst = (b * cache_T + p) * KC + c;
    k_cache[dst] = src[hd.k_col(0)];
    v_cache[dst] = src[hd.v_col(0)];
  }
}

// The second kernel of a decoding step, one block per (b, h): attends with the q of
// head h over the cache rows 0..p of kv head h / G (row p written by
// kv_cache_append_kernel). positions[b] < 0 (finished) or >= cache_T (out of range; the
// host cannot check device values): out row 0.
__global__ void __launch_bounds__(kAttnThreads)
    attention_decode_kernel(Heads hd, const int32_t* positions, const float* qkv,
                            int64_t cache_T, const float* k_cache, const float* v_cache,
                            float* out, float scale) {
  const int b = static_cast<int>(blockIdx.x) / hd.H, h = static_cast<int>(blockIdx.x) % hd.H;
  const int g = hd.kv_head(h), hs = hd.hs;
  float* o = out + int64_t{b} * hd.q_width() + hd.q_col(h);
  const int p = positions[b];
  if (p < 0 || p >= cache_T) {  // uniform over the block
    for (int i = threadIdx.x; i < hs; i += kAttnThreads) o[i] = 0.0f;
    return;
  }
  const int64_t KC = hd.kv_width();
  const float* q = qkv + int64_t{b} * hd.width() + hd.q_col(h);
  // Kv head g's columns of sequence b's cache rows, at stride KC.
  const float* kc = k_cache + int64_t{b} * cache_T * KC + int64_t{g} * hs;
  const float* vc = v_cache + int64_t{b} * cache_T * KC + int64_t{g} * hs;
  attend_row(hs, scale, q, kc, vc, KC, p + 1, dynamic_smem(), o, nullptr);
}

// ---- host side ------------------------------------------------------------------------------

using cpu::require_data;
using cpu::require_heads;
using cpu::require_size;

// The kernels index rows, columns and blocks with int: the values below must fit (far
// beyond any real model).
void require_int_range(int64_t value, const char* what, const char* name) {
  require(value <= INT_MAX, ErrorCode::InvalidArgument,
          std::string(what) + " = " + std::to_string(value) +
              " is too large for the CUDA attention kernels (max " + std::to_string(INT_MAX) +
              ")",
          name);
}

// The layout of a call with work that passed require_heads (so 1 <= KVH <= H, hs >= 1):
// the qkv row width (H + 2 KVH) hs must fit in int (then every head count, column offset
// and out or cache row width does). Checked without overflowing.
Heads checked_heads(int64_t H, int64_t KVH, int64_t hs) {
  require(H <= INT_MAX / 3 && hs <= INT_MAX / (H + 2 * KVH), ErrorCode::InvalidArgument,
          "the qkv row width (heads + 2 kv_heads) * head_size with heads = " +
              std::to_string(H) + ", kv_heads = " + std::to_string(KVH) + ", head_size = " +
              std::to_string(hs) + " is too large for the CUDA attention kernels (max " +
              std::to_string(INT_MAX) + ")",
          "head_size");
  return Heads{static_cast<int>(H), static_cast<int>(KVH), static_cast<int>(hs)};
}

// B, T and B * H * T (the largest grid, and the (b, h, t) index of saved) fit in int.
void require_grid(int64_t B, int64_t H, int64_t T) {
  require_int_range(B, "B", "B");
  require_int_range(T, "T", "T");
  // B, H <= INT_MAX, so B * H does not overflow.
  require(T == 0 || B * H <= INT_MAX / T, ErrorCode::InvalidArgument,
          "B * heads * T with B = " + std::to_string(B) + ", heads = " + std::to_string(H) +
              ", T = " + std::to_string(T) + " is too large for the CUDA attention kernels (max " +
              std::to_string(INT_MAX) + ")",
          "T");
}

float head_scale(int64_t hs) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(hs)));
}

// Allows `bytes` of dynamic shared memory for `kernel` (above the 48 KB default; the
// runtime refuses more than the device has, reported as a CudaError).
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  PPO_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

template <int D>
void forward_tiled(int B, int T, Heads hd, const int32_t* lengths, const float* qkv,
                   float* saved, float* out, float scale) {
  const int q_tiles = static_cast<int>(ceil_div(T, kTileX));
  const int64_t blocks = int64_t{B} * hd.H * q_tiles;
  const size_t smem = Tiles<D>::kForwardFloats * sizeof(float);
  allow_smem(attention_forward_kernel<D>, smem);
  attention_forward_kernel<D><<<static_cast<unsigned>(blocks), kAttnThreads, smem>>>(
      B, T, hd, lengths, qkv, saved, out, scale, q_tiles);
  PPO_CUDA_CHECK_LAUNCH("attention_forward_kernel");
}

template <int D>
void backward_tiled(int B, int T, Heads hd, const int32_t* lengths, const float* grad_out,
                    const float* qkv, const float* lse, const float* dsum, float* grad_qkv,
                    float scale) {
  const int tiles = static_cast<int>(ceil_div(T, kTileX));
  const int64_t kv_blocks = int64_t{B} * hd.KVH * tiles;
  const size_t kv_smem = Tiles<D>::kBackwardKvFloats * sizeof(float);
  allow_smem(attention_backward_kv_kernel<D>, kv_smem);
  attention_backward_kv_kernel<D><<<static_cast<unsigned>(kv_blocks), kAttnThreads, kv_smem>>>(
      B, T, hd, lengths, grad_out, qkv, lse, dsum, grad_qkv, scale);
  PPO_CUDA_CHECK_LAUNCH("attention_backward_kv_kernel");
  const int64_t q_blocks = int64_t{B} * hd.H * tiles;
  const size_t q_smem = Tiles<D>::kBackwardQFloats * sizeof(float);
  allow_smem(attention_backward_q_kernel<D>, q_smem);
  attention_backward_q_kernel<D><<<static_cast<unsigned>(q_blocks), kAttnThreads, q_smem>>>(
      B, T, hd, lengths, grad_out, qkv, lse, dsum, grad_qkv, scale, tiles);
  PPO_CUDA_CHECK_LAUNCH("attention_backward_q_kernel");
}

}  // namespace

int64_t attention_saved_floats(int64_t B, int64_t T, int64_t H) {
  require_size(B, "B");
  require_size(T, "T");
  require_size(H, "heads");
  return B * H * T;  // the log-sum-exp of each (b, h, query row)
}

void attention_forward(int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t hs,
                       const int32_t* lengths, const float* qkv, float* saved, float* out) {
  require_size(B, "B");
  require_size(T, "T");
  require_heads(H, KVH, hs, B > 0 && T > 0);
  if (B == 0 || T == 0) return;
  require_data(qkv, "qkv");
  require_data(out, "out");
  const Heads hd = checked_heads(H, KVH, hs);
  require_grid(B, H, T);  // hence every grid and index fits
  const float scale = head_scale(hs);
  const int b = static_cast<int>(B), t = static_cast<int>(T);
  if (hs <= 32) {
    forward_tiled<32>(b, t, hd, lengths, qkv, saved, out, scale);
  } else if (hs <= 64) {
    forward_tiled<64>(b, t, hd, lengths, qkv, saved, out, scale);
  } else if (hs <= kMaxTiledHead) {
    forward_tiled<128>(b, t, hd, lengths, qkv, saved, out, scale);
  } else {
    const int64_t blocks = B * H * T;
    const size_t smem = row_smem_floats(hs) * sizeof(float);
    allow_smem(attention_forward_rows_kernel, smem);
    attention_forward_rows_kernel<<<static_cast<unsigned>(blocks), kAttnThreads, smem>>>(
        b, t, hd, lengths, qkv, saved, out, scale);
    PPO_CUDA_CHECK_LAUNCH("attention_forward_rows_kernel");
  }
}

void attention_backward(int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t hs,
                        const int32_t* lengths, const float* grad_out, const float* qkv,
                        const float* out, const float* saved, float* grad_qkv) {
  require_size(B, "B");
  require_size(T, "T");
  require_heads(H, KVH, hs, B > 0 && T > 0);
  if (B == 0 || T == 0) return;
  require_data(grad_out, "grad_out");
  require_data(qkv, "qkv");
  require_data(out, "out");
  require_data(saved, "saved");
  require_data(grad_qkv, "grad_qkv");
  const Heads hd = checked_heads(H, KVH, hs);
  require_grid(B, H, T);  // hence every grid and index fits
  const float scale = head_scale(hs);
  const int b = static_cast<int>(B), t = static_cast<int>(T);

  // Dsum [B, H, T] in a scratch buffer (its cudaFree at scope exit waits for the kernels).
  PPO_DEVICE_BUFFER(float, dsum, static_cast<size_t>(B * H * T));
  const int64_t warps = B * H * T;
  attention_dsum_kernel<<<elementwise_blocks(warps * kWarpSize), kThreads>>>(
      b, t, hd, lengths, grad_out, out, dsum.get());
  PPO_CUDA_CHECK_LAUNCH("attention_dsum_kernel");

  if (hs <= 32) {
    backward_tiled<32>(b, t, hd, lengths, grad_out, qkv, saved, dsum.get(), grad_qkv, scale);
  } else if (hs <= 64) {
    backward_tiled<64>(b, t, hd, lengths, grad_out, qkv, saved, dsum.get(), grad_qkv, scale);
  } else if (hs <= kMaxTiledHead) {
    backward_tiled<128>(b, t, hd, lengths, grad_out, qkv, saved, dsum.get(), grad_qkv, scale);
  } else {
    const int64_t q_blocks = B * H * T;
    const size_t q_smem = static_cast<size_t>(3 * hs + kAttnThreads) * sizeof(float);
    allow_smem(attention_backward_q_rows_kernel, q_smem);
    attention_backward_q_rows_kernel<<<static_cast<unsigned>(q_blocks), kAttnThreads,
                                       q_smem>>>(b, t, hd, lengths, grad_out, qkv, saved,
                                                 dsum.get(), grad_qkv, scale);
    PPO_CUDA_CHECK_LAUNCH("attention_backward_q_rows_kernel");
    const int64_t kv_blocks = B * KVH * T;
    const size_t kv_smem = static_cast<size_t>(4 * hs + 2 * kAttnThreads) * sizeof(float);
    allow_smem(attention_backward_kv_rows_kernel, kv_smem);
    attention_backward_kv_rows_kernel<<<static_cast<unsigned>(kv_blocks), kAttnThreads,
                                        kv_smem>>>(b, t, hd, lengths, grad_out, qkv, saved,
                                                   dsum.get(), grad_qkv, scale);
    PPO_CUDA_CHECK_LAUNCH("attention_backward_kv_rows_kernel");
  }
}

void kv_cache_store(int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t hs,
                    const int32_t* lengths, const float* qkv, int64_t cache_T, float* k_cache,
                    float* v_cache) {
  require_size(B, "B");
  require_size(T, "T");
  require_heads(H, KVH, hs, B > 0 && T > 0);
  require(cache_T >= T, ErrorCode::InvalidArgument,
          "cache_T (" + std::to_string(cache_T) + ") must be >= T (" + std::to_string(T) + ")",
          "cache_T");
  if (B == 0 || T == 0) return;
  require_data(qkv, "qkv");
  require_data(k_cache, "k_cache");
  require_data(v_cache, "v_cache");
  const Heads hd = checked_heads(H, KVH, hs);
  require_int_range(T, "T", "T");
  require_int_range(B, "B", "B");
  kv_cache_store_kernel<<<elementwise_blocks(B * T * hd.kv_width()), kThreads>>>(
      B, T, hd, lengths, qkv, cache_T, k_cache, v_cache);
  PPO_CUDA_CHECK_LAUNCH("kv_cache_store_kernel");
}

void attention_decode(int64_t B, int64_t H, int64_t KVH, int64_t hs, const int32_t* positions,
                      const float* qkv, int64_t cache_T, float* k_cache, float* v_cache,
                      float* out) {
  require_size(B, "B");
  require_heads(H, KVH, hs, B > 0);
  require_size(cache_T, "cache_T");
  if (B == 0) return;
  require_data(positions, "positions");
  require_data(qkv, "qkv");
  require_data(out, "out");
  // Positions are device values: with cache_T > 0 any row may be live, so the caches
  // must exist (with cache_T == 0 every row is out of range and reads no cache).
  if (cache_T > 0) {
    require_data(k_cache, "k_cache");
    require_data(v_cache, "v_cache");
  }
  const Heads hd = checked_heads(H, KVH, hs);
  require_int_range(cache_T, "cache_T", "cache_T");
  require_int_range(B, "B", "B");
  const int64_t blocks = B * H;  // B, H <= INT_MAX: no overflow
  require_int_range(blocks, "B * heads", "B");
  // First the new cache rows (each element once), then the attention of every query head.
  if (cache_T > 0) {
    kv_cache_append_kernel<<<elementwise_blocks(B * hd.kv_width()), kThreads>>>(
        B, hd, positions, qkv, cache_T, k_cache, v_cache);
    PPO_CUDA_CHECK_LAUNCH("kv_cache_append_kernel");
  }
  const size_t smem = row_smem_floats(hs) * sizeof(float);
  allow_smem(attention_decode_kernel, smem);
  attention_decode_kernel<<<static_cast<unsigned>(blocks), kAttnThreads, smem>>>(
      hd, positions, qkv, cache_T, k_cache, v_cache, out, head_scale(hs));
  PPO_CUDA_CHECK_LAUNCH("attention_decode_kernel");
}

}  // namespace ppo::cuda
