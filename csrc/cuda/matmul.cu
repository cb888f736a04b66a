// General float32 GEMM of the CUDA backend (engine_kernels.h; cpu/matmul.h has the
// contract):  C[m, n] = alpha * op(A)[m, k] · op(B)[k, n] + beta * C[m, n], row-major with
// leading dimensions, every pointer a device pointer. Four paths, chosen by
// PPO_CUDA_MATMUL (read once) or explicitly with matmul_on_path:
//
//   "tf32" (default)  tensor cores: mma.sync m16n8k8 on TF32-rounded inputs, float sums;
//   "bf16"            the same kernel on bfloat16-rounded inputs (mma.sync m16n8k16);
//   "fp32"            CUDA cores only: the exact float32 reference (one fma chain over k,
//                     in order, for every element);
//   "cublas"          cublasSgemm with TF32 tensor-op math, in builds with cuBLAS only.
//
// Tensor-core kernel (one template for TF32 and BF16 and each transpose combination):
//   Block tile BM x BN, k in slices of 32: 128 x 128 with 8 warps of 64 x 32 (4 x 4 mma
//   tiles of 16 x 8 per warp, 64 accumulators per thread), or 64 x 64 with 4 warps of
//   32 x 32 when the 128-tiles would not give every SM a block (decode steps, small
//   layers: four times the blocks).
//   Shared memory holds each operand's 32-deep slice laid out as it lies in global memory,
//   so that global reads are coalesced whatever the transposes:
//     A stored [m, k] -> [BM][32 + pad]      A stored [k, m] (transpose_a) -> [32][BM + pad]
//     B stored [k, n] -> [32][BN + pad]      B stored [n, k] (transpose_b) -> [BN][32 + pad]
//   and the warps build their mma fragments from it with plain shared loads in the PTX
//   fragment layouts (the transposes are only a change of index there). The pads (4 or 8
//   elements) put the 8 x 4 lanes of each fragment load on distinct banks, and keep rows
//   16-byte aligned. Values are rounded to TF32 (wmma::__float_to_tf32) or BF16 once, when
//   stored into shared memory, and kept there as raw bits.
//   Pipeline: each thread reads its share of the next slice (16 values of A, 16 of B) from
//   global memory into registers while the warps multiply the current slice out of shared
//   memory, then stores it into the other of two shared buffers: one __syncthreads per
//   slice. Global reads are float4 when the operand's pointer is 16-byte aligned and its
//   leading dimension a multiple of 4 (checked at run time: the engine passes slices of
//   packed matrices, and rows of odd length such as the vocabulary), scalar otherwise;
//   either way a warp reads whole 128-byte runs of a row. Elements outside the matrices
//   read as zeros, so edge tiles go through the same products; only their loads and the
//   epilogue check bounds.
//   Epilogue straight from the accumulators, bounds-checked:
//   C = alpha * acc (+ beta * C, read only when beta != 0).
//   Blocks are numbered in groups of 8 tile-rows (down the 8 tile-rows of a tile-column,
//   then the next column), so the blocks running together share A and B slices in L2.
//
// Determinism: each C element's k-sum is accumulated by one thread of one block, slice by
// slice in increasing k: no split of k, no atomics. The tile size is a function of the
// shapes and the GPU's SM count only, so a product gives the same bits on every run.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>

#ifdef PPO_WITH_CUBLAS
#include <cublas_v2.h>
#endif

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/device_common.cuh"
#include "cuda/engine_kernels.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "cuda/matmul.cu needs sm_80 or newer (TF32 and BF16 tensor cores)"
#endif

namespace ppo::cuda {
namespace {

namespace wmma = nvcuda::wmma;

// ---- Arguments -------------------------------------------------------------------------

struct GemmArgs {
  int64_t m, n, k;
  float alpha, beta;
  const float* a;
  int64_t lda;
  const float* b;
  int64_t ldb;
  float* c;
  int64_t ldc;
  bool vec_a, vec_b;  // float4 reads allowed (16-byte aligned pointer, ld % 4 == 0)
};

// Blocks numbered in groups of kGroupRows tile-rows: within a group, block ids run down
// the tile-rows of one tile-column, then to the next column (L2 reuse of A and B).
constexpr int64_t kGroupRows = 8;

__device__ __forceinline__ int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }

struct TileCoord {
  int64_t row, col;
};

__device__ __forceinline__ TileCoord grouped_tile(int64_t block, int64_t tiles_m, int64_t tiles_n) {
  const int64_t per_group = kGroupRows * tiles_n;
  const int64_t group = block / per_group;
  const int64_t first_row = group * kGroupRows;
  const int64_t rows_in_group = min64(tiles_m - first_row, kGroupRows);
  const int64_t in_group = block % per_group;
  return {first_row + in_group % rows_in_group, in_group / rows_in_group};
}

// ---- Tensor-core precisions ------------------------------------------------------------
// Shared memory holds the operands already rounded, as raw bits: TF32 in 32-bit words,
// BF16 in 16-bit halves. A fragment register is one TF32 value, or two BF16 values with the
// lower k index in the low half (the PTX mma fragment layouts).

constexpr int kTileK = 32;  // k depth of a shared-memory slice

struct Tf32 {
  using Smem = uint32_t;
  static constexpr int kStep = 8;  // mma.m16n8k8
  // Row pads (elements) that put the 8 fragment rows a warp reads at once on distinct
  // banks: rows read along k need ld = 4 (mod 32) words, rows read across lines 8 (mod 32).
  static constexpr int kPadKContiguous = 4;
  static constexpr int kPadLineContiguous = 8;
  __device__ static __forceinline__ uint32_t convert(float x) {
    return __float_as_uint(wmma::__float_to_tf32(x));
  }
  // p is 16-byte aligned.
  __device__ static __forceinline__ void store4(uint32_t* p, float x0, float x1, float x2,
                                                float x3) {
    *reinterpret_cast<uint4*>(p) = make_uint4(convert(x0), convert(x1), convert(x2), convert(x3));
  }
};

struct Bf16 {
  using Smem = uint16_t;
  static constexpr int kStep = 16;  // mma.m16n8k16
  // Pairs read along k are 32-bit loads: ld = 8 (mod 64) halves; single halves read
  // across lines from rows 2t, 2t + 1: ld = 8 (mod 64) halves as well.
  static constexpr int kPadKContiguous = 8;
  static constexpr int kPadLineContiguous = 8;
  __device__ static __forceinline__ uint16_t convert(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
  __device__ static __forceinline__ uint32_t pack(uint16_t lo, uint16_t hi) {
    return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  // p is 8-byte aligned.
  __device__ static __forceinline__ void store4(uint16_t* p, float x0, float x1, float x2,
                                                float x3) {
    *reinterpret_cast<uint2*>(p) =
        make_uint2(pack(convert(x0), convert(x1)), pack(convert(x2), convert(x3)));
  }
};

// D += A B on one 16 x 8 tile: a[4], b[2] are fragment registers, d[4] the accumulator
// (d0, d1: row g, columns 2t, 2t + 1; d2, d3: row g + 8; g = lane / 4, t = lane % 4).
__device__ __forceinline__ void mma(Tf32, float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma(Bf16, float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Fragment of op(A) rows [row, row + 16) x k [kk, kk + kStep) from the shared slice `s`
// (ld elements): stored [m, k] -> s[m][k]; stored [k, m] (transposed) -> s[k][m].
//   TF32 m16n8k8:  a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4).
//   BF16 m16n8k16: a0 (g, 2t..2t+1), a1 (g + 8, 2t..), a2 (g, 2t+8..2t+9), a3 (g + 8, 2t+8..).
template <bool kTransposed>
__device__ __forceinline__ void load_a(Tf32, uint32_t* a, const uint32_t* s, int ld, int row,
                                       int kk, int g, int t) {
  auto at = [&](int r, int k) { return kTransposed ? s[k * ld + r] : s[r * ld + k]; };
  a[0] = at(row + g, kk + t);
  a[1] = at(row + g + 8, kk + t);
  a[2] = at(row + g, kk + t + 4);
  a[3] = at(row + g + 8, kk + t + 4);
}
template <bool kTransposed>
__device__ __forceinline__ void load_a(Bf16, uint32_t* a, const uint16_t* s, int ld, int row,
                                       int kk, int g, int t) {
  // Two consecutive k of row r: one 32-bit load when k is contiguous, two halves otherwise.
  auto pair = [&](int r, int k) -> uint32_t {
    if (kTransposed) return Bf16::pack(s[k * ld + r], s[(k + 1) * ld + r]);
    return *reinterpret_cast<const uint32_t*>(s + r * ld + k);
  };
  a[0] = pair(row + g, kk + 2 * t);
  a[1] = pair(row + g + 8, kk + 2 * t);
  a[2] = pair(row + g, kk + 2 * t + 8);
  a[3] = pair(row + g + 8, kk + 2 * t + 8);
}

// Fragment of op(B) k [kk, kk + kStep) x columns [col, col + 8) from the shared slice `s`:
// stored [k, n] -> s[k][n]; stored [n, k] (transposed) -> s[n][k].
//   TF32: b0 (k t, n g), b1 (k t + 4, n g).  BF16: b0 (k 2t..2t+1, n g), b1 (k 2t+8..2t+9, n g).
template <bool kTransposed>
__device__ __forceinline__ void load_b(Tf32, uint32_t* b, const uint32_t* s, int ld, int col,
                                       int kk, int g, int t) {
  auto at = [&](int k, int c) { return kTransposed ? s[c * ld + k] : s[k * ld + c]; };
  b[0] = at(kk + t, col + g);
  b[1] = at(kk + t + 4, col + g);
}
template <bool kTransposed>
__device__ __forceinline__ void load_b(Bf16, uint32_t* b, const uint16_t* s, int ld, int col,
                                       int kk, int g, int t) {
  auto pair = [&](int k, int c) -> uint32_t {
    if (kTransposed) return *reinterpret_cast<const uint32_t*>(s + c * ld + k);
    return Bf16::pack(s[k * ld + c], s[(k + 1) * ld + c]);
  };
  b[0] = pair(kk + 2 * t, col + g);
  b[1] = pair(kk + 2 * t + 8, col + g);
}

constexpr size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

// Shared-memory layout of the tensor-core kernel (see the header comment). An operand's
// slice is "k-contiguous" when its stored rows run along k (A [m, k], B [n, k]).
template <class P, int BM, int BN, bool TA, bool TB>
struct TcLayout {
  using Smem = typename P::Smem;
  // A slice: TA ? [32][BM + pad] : [BM][32 + pad]; B slice: TB ? [BN][32 + pad] : [32][BN + pad].
  static constexpr int kARows = TA ? kTileK : BM;
  static constexpr int kACols = TA ? BM : kTileK;
  static constexpr int kALd = kACols + (TA ? P::kPadLineContiguous : P::kPadKContiguous);
  static constexpr int kBRows = TB ? BN : kTileK;
  static constexpr int kBCols = TB ? kTileK : BN;
  static constexpr int kBLd = kBCols + (TB ? P::kPadKContiguous : P::kPadLineContiguous);
  static constexpr size_t kABytes = round_up(size_t{kARows} * kALd * sizeof(Smem), 128);
  static constexpr size_t kBBytes = round_up(size_t{kBRows} * kBLd * sizeof(Smem), 128);
  static constexpr size_t kStageBytes = kABytes + kBBytes;
  static constexpr size_t kBytes = 2 * kStageBytes;  // double buffered
  // Rows must keep 16-byte (TF32 uint4) / 8-byte (BF16 uint2) stores aligned.
  static_assert(kALd * sizeof(Smem) % 16 == 0 && kBLd * sizeof(Smem) % 16 == 0, "row alignment");
};

// One thread's share of a slice of R x C floats read from global memory (row stride ld),
// held in registers between the global read and the shared-memory store.
//   float4 mode: the thread takes columns c0..c0+3, c0 = 4 (tid % (C / 4)), of rows
//                tid / (C / 4) + i * (4 T / C);
//   scalar mode: column tid % C of rows tid / C + i * (T / C).
// Either way a warp reads whole 128-byte runs of a row. Elements outside the valid rows /
// columns read as 0.
template <int R, int C, int T>
struct SliceRegs {
  static constexpr int kCount = R * C / T;
  static_assert(T % C == 0 && kCount % 4 == 0 && C % 4 == 0, "whole rows per pass, float4 groups");
  float v[kCount];

  __device__ __forceinline__ void load(const float* __restrict__ base, int64_t ld, int valid_rows,
                                       int valid_cols, bool vec, int tid) {
    const bool full = valid_rows == R && valid_cols == C;
    if (vec) {
      constexpr int kGroups = C / 4, kRowStep = T / kGroups, kN = kCount / 4;
      const int r0 = tid / kGroups;
      const int c0 = (tid % kGroups) * 4;
      const float* p = base + static_cast<int64_t>(r0) * ld + c0;
      const int64_t step = kRowStep * ld;
      if (full) {
#pragma unroll
        for (int i = 0; i < kN; ++i) {
          const float4 x = __ldg(reinterpret_cast<const float4*>(p + i * step));
          v[4 * i] = x.x;
          v[4 * i + 1] = x.y;
          v[4 * i + 2] = x.z;
          v[4 * i + 3] = x.w;
        }
      } else {
#pragma unroll
        for (int i = 0; i < kN; ++i) {
          const int r = r0 + i * kRowStep;
          const float* q = p + i * step;
          if (r < valid_rows && c0 + 4 <= valid_cols) {
            const float4 x = __ldg(reinterpret_cast<const float4*>(q));
            v[4 * i] = x.x;
            v[4 * i + 1] = x.y;
            v[4 * i + 2] = x.z;
            v[4 * i + 3] = x.w;
          } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              v[4 * i + e] = (r < valid_rows && c0 + e < valid_cols) ? __ldg(q + e) : 0.0f;
            }
          }
        }
      }
    } else {
      constexpr int kRowStep = T / C;
      const int r0 = tid / C;
      const int c0 = tid % C;
      const float* p = base + static_cast<int64_t>(r0) * ld + c0;
      const int64_t step = kRowStep * ld;
      if (full) {
#pragma unroll
        for (int i = 0; i < kCount; ++i) v[i] = __ldg(p + i * step);
      } else {
        const bool col_ok = c0 < valid_cols;
#pragma unroll
        for (int i = 0; i < kCount; ++i) {
          v[i] = (col_ok && r0 + i * kRowStep < valid_rows) ? __ldg(p + i * step) : 0.0f;
        }
      }
    }
  }

  // Stores the values, rounded to P's precision, into the shared slice s[R][lds] with
  // the same element mapping as load().
  template <class P>
  __device__ __forceinline__ void store(typename P::Smem* s, int lds, bool vec, int tid) const {
    if (vec) {
      constexpr int kGroups = C / 4, kRowStep = T / kGroups, kN = kCount / 4;
      const int r0 = tid / kGroups;
      const int c0 = (tid % kGroups) * 4;
#pragma unroll
      for (int i = 0; i < kN; ++i) {
        P::store4(s + (r0 + i * kRowStep) * lds + c0, v[4 * i], v[4 * i + 1], v[4 * i + 2],
                  v[4 * i + 3]);
      }
    } else {
      constexpr int kRowStep = T / C;
      const int r0 = tid / C;
      const int c0 = tid % C;
#pragma unroll
      for (int i = 0; i < kCount; ++i) s[(r0 + i * kRowStep) * lds + c0] = P::convert(v[i]);
    }
  }
};

// Blocks of the kernel resident per SM that ptxas must allow for (caps the registers).
template <int kThreadCount>
constexpr int tc_min_blocks() {
  return kThreadCount >= 256 ? 1 : 2;
}

// The tensor-core GEMM: one block per BM x BN tile of C, warps of WM x WN, each warp a
// grid of (WM / 16) x (WN / 8) mma tiles.
template <class P, int BM, int BN, int WM, int WN, bool TA, bool TB>
__global__ void __launch_bounds__((BM / WM) * (BN / WN) * kWarpSize,
                                  tc_min_blocks<(BM / WM) * (BN / WN) * kWarpSize>())
    tc_gemm_kernel(GemmArgs g) {
  using L = TcLayout<P, BM, BN, TA, TB>;
  using Smem = typename P::Smem;
  constexpr int kThreadCount = (BM / WM) * (BN / WN) * kWarpSize;
  constexpr int kWarpsN = BN / WN;
  constexpr int kTilesM = WM / 16;  // mma tiles per warp
  constexpr int kTilesN = WN / 8;
  constexpr int kStep = P::kStep;
  static_assert(WM % 16 == 0 && WN % 8 == 0 && kTileK % kStep == 0, "tile shapes");

  extern __shared__ __align__(128) unsigned char smem[];
  auto a_stage = [&](int s) { return reinterpret_cast<Smem*>(smem + s * L::kStageBytes); };
  auto b_stage = [&](int s) {
    return reinterpret_cast<Smem*>(smem + s * L::kStageBytes + L::kABytes);
  };

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int lane_g = lane / 4;  // fragment row group
  const int lane_t = lane % 4;  // thread in group
  const int warp_row = (warp / kWarpsN) * WM;
  const int warp_col = (warp % kWarpsN) * WN;

  const int64_t tiles_m = (g.m + BM - 1) / BM;
  const int64_t tiles_n = (g.n + BN - 1) / BN;
  const TileCoord tile = grouped_tile(blockIdx.x, tiles_m, tiles_n);
  const int64_t m0 = tile.row * BM;
  const int64_t n0 = tile.col * BN;
  const int rows_m = static_cast<int>(min64(BM, g.m - m0));
  const int cols_n = static_cast<int>(min64(BN, g.n - n0));

  SliceRegs<L::kARows, L::kACols, kThreadCount> a_regs;
  SliceRegs<L::kBRows, L::kBCols, kThreadCount> b_regs;
  // Reads the k slice [k0, k0 + 32) of both operands into registers.
  auto load_slice = [&](int64_t k0) {
    const int depth = static_cast<int>(min64(kTileK, g.k - k0));
    if (TA) {  // stored [k, m]
      a_regs.load(g.a + k0 * g.lda + m0, g.lda, depth, rows_m, g.vec_a, tid);
    } else {   // stored [m, k]
      a_regs.load(g.a + m0 * g.lda + k0, g.lda, rows_m, depth, g.vec_a, tid);
    }
    if (TB) {  // stored [n, k]
      b_regs.load(g.b + n0 * g.ldb + k0, g.ldb, cols_n, depth, g.vec_b, tid);
    } else {   // stored [k, n]
      b_regs.load(g.b + k0 * g.ldb + n0, g.ldb, depth, cols_n, g.vec_b, tid);
    }
  };
  auto store_slice = [&](int s) {
    a_regs.template store<P>(a_stage(s), L::kALd, g.vec_a, tid);
    b_regs.template store<P>(b_stage(s), L::kBLd, g.vec_b, tid);
  };

  float acc[kTilesM][kTilesN][4];
#pragma unroll
  for (int i = 0; i < kTilesM; ++i)
#pragma unroll
    for (int j = 0; j < kTilesN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  const int64_t slices = (g.k + kTileK - 1) / kTileK;
  load_slice(0);
  store_slice(0);
  __syncthreads();
  for (int64_t t = 0; t < slices; ++t) {
    const bool more = t + 1 < slices;
    if (more) load_slice((t + 1) * kTileK);  // in flight during the products below

    const Smem* as = a_stage(static_cast<int>(t & 1));
    const Smem* bs = b_stage(static_cast<int>(t & 1));
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += kStep) {
      uint32_t fa[kTilesM][4];
      uint32_t fb[kTilesN][2];
#pragma unroll
      for (int i = 0; i < kTilesM; ++i) {
        load_a<TA>(P{}, fa[i], as, L::kALd, warp_row + 16 * i, kk, lane_g, lane_t);
      }
#pragma unroll
      for (int j = 0; j < kTilesN; ++j) {
        load_b<TB>(P{}, fb[j], bs, L::kBLd, warp_col + 8 * j, kk, lane_g, lane_t);
      }
#pragma unroll
      for (int i = 0; i < kTilesM; ++i)
#pragma unroll
        for (int j = 0; j < kTilesN; ++j) mma(P{}, acc[i][j], fa[i], fb[j]);
    }

    // The other buffer was last read in iteration t - 1, which every thread finished
    // before the barrier that ended it.
    if (more) store_slice(static_cast<int>((t + 1) & 1));
    __syncthreads();
  }

  // Epilogue straight from the accumulators: thread (g, t) of a warp holds columns
  // 2t, 2t + 1 of rows g and g + 8 of each 16 x 8 tile.
#pragma unroll
  for (int i = 0; i < kTilesM; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = warp_row + 16 * i + lane_g + 8 * half;
      if (r >= rows_m) continue;
      float* row = g.c + (m0 + r) * g.ldc + n0;
#pragma unroll
      for (int j = 0; j < kTilesN; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = warp_col + 8 * j + 2 * lane_t + e;
          if (col >= cols_n) continue;
          const float scaled = g.alpha * acc[i][j][2 * half + e];
          row[col] = g.beta != 0.0f ? fmaf(g.beta, row[col], scaled) : scaled;
        }
      }
    }
  }
}

// ---- CUDA-core (SIMT) float32 GEMM -----------------------------------------------------
// Block tile 128 x 128 x 8, 256 threads as 16 x 16; each thread keeps 8 x 8 of C in
// registers: rows 4 ty + {0..3} and 64 + 4 ty + {0..3}, columns 4 tx + {0..3} and
// 64 + 4 tx + {0..3} (two float4 runs each, so a warp's shared reads are broadcasts or
// contiguous). Shared slices are k-major, As[8][128 + 4] and Bs[8][128 + 4] (the pad
// spreads the transposing stores of the k-contiguous operands over all banks), double
// buffered with register staging like the tensor-core kernel. Each C element is one fma
// chain over k in order: the exact float32 reference path.
constexpr int kSimtTile = 128;
constexpr int kSimtK = 8;
constexpr int kSimtThreads = 256;
constexpr int kSimtLd = kSimtTile + 4;
constexpr int kSimtLoads = kSimtTile * kSimtK / kSimtThreads;  // 4 per operand per slice

template <bool TA, bool TB>
__global__ void __launch_bounds__(kSimtThreads) simt_gemm_kernel(GemmArgs g) {
  __shared__ __align__(16) float as[2][kSimtK][kSimtLd];
  __shared__ __align__(16) float bs[2][kSimtK][kSimtLd];

  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  const int64_t tiles_m = (g.m + kSimtTile - 1) / kSimtTile;
  const int64_t tiles_n = (g.n + kSimtTile - 1) / kSimtTile;
  const TileCoord tile = grouped_tile(blockIdx.x, tiles_m, tiles_n);
  const int64_t m0 = tile.row * kSimtTile;
  const int64_t n0 = tile.col * kSimtTile;
  const int rows_m = static_cast<int>(min64(kSimtTile, g.m - m0));
  const int cols_n = static_cast<int>(min64(kSimtTile, g.n - n0));

  // Element i of this thread's share of a slice: (kk, line) with line < 128, kk < 8.
  //   k-contiguous operand (A [m, k], B [n, k]): kk = e % 8, line = e / 8;
  //   line-contiguous operand (A [k, m], B [k, n]): line = e % 128, kk = e / 128.
  float a_regs[kSimtLoads], b_regs[kSimtLoads];
  auto slice_index = [&](bool k_contiguous, int i, int& kk, int& line) {
    const int e = tid + kSimtThreads * i;
    kk = k_contiguous ? e % kSimtK : e / kSimtTile;
    line = k_contiguous ? e / kSimtK : e % kSimtTile;
  };
  auto load_slice = [&](int64_t k0) {
    const int depth = static_cast<int>(min64(kSimtK, g.k - k0));
#pragma unroll
    for (int i = 0; i < kSimtLoads; ++i) {
      int kk, line;
      slice_index(!TA, i, kk, line);
      const int64_t offset = TA ? (k0 + kk) * g.lda + (m0 + line) : (m0 + line) * g.lda + (k0 + kk);
      a_regs[i] = (kk < depth && line < rows_m) ? __ldg(g.a + offset) : 0.0f;
      slice_index(TB, i, kk, line);
      const int64_t offset_b = TB ? (n0 + line) * g.ldb + (k0 + kk) : (k0 + kk) * g.ldb + (n0 + line);
      b_regs[i] = (kk < depth && line < cols_n) ? __ldg(g.b + offset_b) : 0.0f;
    }
  };
  auto store_slice = [&](int s) {
#pragma unroll
    for (int i = 0; i < kSimtLoads; ++i) {
      int kk, line;
      slice_index(!TA, i, kk, line);
      as[s][kk][line] = a_regs[i];
      slice_index(TB, i, kk, line);
      bs[s][kk][line] = b_regs[i];
    }
  };

  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

  const int64_t slices = (g.k + kSimtK - 1) / kSimtK;
  load_slice(0);
  store_slice(0);
  __syncthreads();
  for (int64_t t = 0; t < slices; ++t) {
    const bool more = t + 1 < slices;
    if (more) load_slice((t + 1) * kSimtK);
    const int s = static_cast<int>(t & 1);
#pragma unroll
    for (int kk = 0; kk < kSimtK; ++kk) {
      const float4 a0 = *reinterpret_cast<const float4*>(&as[s][kk][4 * ty]);
      const float4 a1 = *reinterpret_cast<const float4*>(&as[s][kk][64 + 4 * ty]);
      const float4 b0 = *reinterpret_cast<const float4*>(&bs[s][kk][4 * tx]);
      const float4 b1 = *reinterpret_cast<const float4*>(&bs[s][kk][64 + 4 * tx]);
      const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    if (more) store_slice(s ^ 1);
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int r = (i < 4 ? 0 : 64) + 4 * ty + i % 4;
    if (r >= rows_m) continue;
    float* row = g.c + (m0 + r) * g.ldc + n0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int col = (j < 4 ? 0 : 64) + 4 * tx + j % 4;
      if (col >= cols_n) continue;
      const float scaled = g.alpha * acc[i][j];
      row[col] = g.beta != 0.0f ? fmaf(g.beta, row[col], scaled) : scaled;
    }
  }
}

// C = beta * C over m x n (C unread when beta == 0): alpha == 0 or k == 0.
__global__ void __launch_bounds__(kThreads)
    scale_c_kernel(int64_t m, int64_t n, float beta, float* c, int64_t ldc) {
  const int64_t count = m * n;
  for (int64_t i = global_thread_index(); i < count; i += grid_thread_count()) {
    float* p = c + (i / n) * ldc + i % n;
    *p = beta == 0.0f ? 0.0f : beta * *p;
  }
}

// ---- Launchers -------------------------------------------------------------------------

// Number of blocks of a grouped 1-D grid over tiles_m x tiles_n tiles.
unsigned grid_blocks(int64_t m, int64_t n, int64_t tile_m, int64_t tile_n) {
  const int64_t blocks = ceil_div(m, tile_m) * ceil_div(n, tile_n);
  require(blocks <= INT_MAX, ErrorCode::InvalidArgument,
          "matmul: C has too many tiles (" + std::to_string(m) + " x " + std::to_string(n) + ")",
          "c");
  return static_cast<unsigned>(blocks);
}

int current_device() {
  int device = 0;
  PPO_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

// Streaming multiprocessors of the current device (cached per device).
int sm_count() {
  static std::atomic<int> counts[64] = {};
  const int device = current_device();
  if (device < 0 || device >= 64) {
    int count = 0;
    PPO_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  }
  int count = counts[device].load(std::memory_order_relaxed);
  if (count == 0) {
    PPO_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    counts[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

template <class P, int BM, int BN, int WM, int WN, bool TA, bool TB>
void launch_tc(const GemmArgs& g) {
  using L = TcLayout<P, BM, BN, TA, TB>;
  constexpr int kThreadCount = (BM / WM) * (BN / WN) * kWarpSize;
  auto kernel = tc_gemm_kernel<P, BM, BN, WM, WN, TA, TB>;
  // Over 48 KB of dynamic shared memory must be allowed per kernel (and per device).
  if constexpr (L::kBytes > 48 * 1024) {
    static std::atomic<uint64_t> configured{0};  // bit d: done on device d
    const int device = current_device();
    const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
    if (bit == 0 || (configured.load(std::memory_order_relaxed) & bit) == 0) {
      PPO_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(L::kBytes)));
      configured.fetch_or(bit, std::memory_order_relaxed);
    }
  }
  kernel<<<grid_blocks(g.m, g.n, BM, BN), kThreadCount, L::kBytes>>>(g);
  PPO_CUDA_CHECK_LAUNCH("tc_gemm_kernel");
}

template <class P, bool TA, bool TB>
void launch_tc_tiles(const GemmArgs& g) {
  // 128 x 128 tiles unless they leave SMs idle; 64 x 64 gives four times the blocks.
  if (ceil_div(g.m, 128) * ceil_div(g.n, 128) >= sm_count()) {
    launch_tc<P, 128, 128, 64, 32, TA, TB>(g);
  } else {
    launch_tc<P, 64, 64, 32, 32, TA, TB>(g);
  }
}

template <class P>
void launch_tensor_cores(bool transpose_a, bool transpose_b, const GemmArgs& g) {
  if (transpose_a) {
    if (transpose_b) launch_tc_tiles<P, true, true>(g);
    else launch_tc_tiles<P, true, false>(g);
  } else {
    if (transpose_b) launch_tc_tiles<P, false, true>(g);
    else launch_tc_tiles<P, false, false>(g);
  }
}

void launch_simt(bool transpose_a, bool transpose_b, const GemmArgs& g) {
  const unsigned blocks = grid_blocks(g.m, g.n, kSimtTile, kSimtTile);
  if (transpose_a) {
    if (transpose_b) simt_gemm_kernel<true, true><<<blocks, kSimtThreads>>>(g);
    else simt_gemm_kernel<true, false><<<blocks, kSimtThreads>>>(g);
  } else {
    if (transpose_b) simt_gemm_kernel<false, true><<<blocks, kSimtThreads>>>(g);
    else simt_gemm_kernel<false, false><<<blocks, kSimtThreads>>>(g);
  }
  PPO_CUDA_CHECK_LAUNCH("simt_gemm_kernel");
}

// ---- cuBLAS ----------------------------------------------------------------------------

#ifdef PPO_WITH_CUBLAS
void check_cublas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw Error(ErrorCode::CudaError, std::string("matmul: ") + what + " failed: " +
                                          cublasGetStatusString(status) + " (" +
                                          std::to_string(static_cast<int>(status)) + ")");
  }
}

// One handle for the process, created on first use (on the device current then), on the
// default stream, with TF32 tensor-op math allowed.
cublasHandle_t cublas_handle() {
  static const cublasHandle_t handle = [] {
    cublasHandle_t h = nullptr;
    check_cublas(cublasCreate(&h), "cublasCreate");
    const cublasStatus_t math = cublasSetMathMode(h, CUBLAS_TF32_TENSOR_OP_MATH);
    if (math != CUBLAS_STATUS_SUCCESS) {
      (void)cublasDestroy(h);
      check_cublas(math, "cublasSetMathMode");
    }
    return h;
  }();
  return handle;
}

void launch_cublas(bool transpose_a, bool transpose_b, const GemmArgs& g) {
  auto fits_int = [](int64_t value, const char* name) {
    require(value <= INT_MAX, ErrorCode::InvalidArgument,
            std::string("matmul: ") + name + " (" + std::to_string(value) +
                ") is too large for the cuBLAS path",
            name);
  };
  fits_int(g.m, "m");
  fits_int(g.n, "n");
  fits_int(g.k, "k");
  fits_int(g.lda, "lda");
  fits_int(g.ldb, "ldb");
  fits_int(g.ldc, "ldc");
  // cuBLAS is column-major: the row-major C[m, n] is its C^T[n, m] (ld ldc), and
  // C^T = op(B)^T op(A)^T. Row-major B[k, n] is column-major B^T[n, k], which is
  // op(B)^T as it stands (no transpose); stored [n, k] it needs a transpose. Same for A.
  check_cublas(cublasSgemm(cublas_handle(), transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                           transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(g.n),
                           static_cast<int>(g.m), static_cast<int>(g.k), &g.alpha, g.b,
                           static_cast<int>(g.ldb), g.a, static_cast<int>(g.lda), &g.beta, g.c,
                           static_cast<int>(g.ldc)),
               "cublasSgemm");
  PPO_CUDA_CHECK_LAUNCH("cublasSgemm");
}
#endif

// ---- Paths -----------------------------------------------------------------------------

enum class Path { Tf32, Bf16, Fp32, Cublas };

const char* path_name(Path path) {
  switch (path) {
    case Path::Tf32: return "tf32";
    case Path::Bf16: return "bf16";
    case Path::Fp32: return "fp32";
    case Path::Cublas: return "cublas";
  }
  return "tf32";
}

// `argument` names where the value came from (for the error).
Path parse_path(const char* value, const char* argument) {
  const std::string v = value != nullptr ? value : "";
  if (v == "tf32") return Path::Tf32;
  if (v == "bf16") return Path::Bf16;
  if (v == "fp32") return Path::Fp32;
  if (v == "cublas") {
#ifdef PPO_WITH_CUBLAS
    return Path::Cublas;
#else
    throw Error(ErrorCode::CudaUnavailable,
                "matmul path \"cublas\" asked for, but this build has no cuBLAS (CMake did not "
                "find it); use tf32, bf16 or fp32",
                "PPO_CUDA_MATMUL");
#endif
  }
  throw Error(ErrorCode::InvalidArgument,
              std::string(argument) + ": unknown matmul path \"" + v +
                  "\" (expected tf32, bf16, fp32 or cublas)",
              argument);
}

// PPO_CUDA_MATMUL, read on first use (a bad value throws on every use).
Path env_path() {
  static const Path path = [] {
    const char* value = std::getenv("PPO_CUDA_MATMUL");
    if (value == nullptr || value[0] == '\0') return Path::Tf32;
    return parse_path(value, "PPO_CUDA_MATMUL");
  }();
  return path;
}

void matmul_with(Path path, bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k,
                 float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                 float beta, float* c, int64_t ldc) {
  auto check = [](bool ok, const std::string& message, const char* argument) {
    require(ok, ErrorCode::InvalidArgument, "matmul: " + message, argument);
  };
  check(m >= 0, "m must be >= 0, got " + std::to_string(m), "m");
  check(n >= 0, "n must be >= 0, got " + std::to_string(n), "n");
  check(k >= 0, "k must be >= 0, got " + std::to_string(k), "k");
  // Row lengths of the stored matrices (at least 1 so that empty matrices need ld >= 1).
  const int64_t a_row = std::max<int64_t>(1, transpose_a ? m : k);
  const int64_t b_row = std::max<int64_t>(1, transpose_b ? k : n);
  const int64_t c_row = std::max<int64_t>(1, n);
  check(lda >= a_row,
        "lda (" + std::to_string(lda) + ") must be >= the row length of the stored A (" +
            std::to_string(a_row) + ")",
        "lda");
  check(ldb >= b_row,
        "ldb (" + std::to_string(ldb) + ") must be >= the row length of the stored B (" +
            std::to_string(b_row) + ")",
        "ldb");
  check(ldc >= c_row, "ldc (" + std::to_string(ldc) + ") must be >= n (" + std::to_string(c_row) + ")",
        "ldc");
  if (m == 0 || n == 0) return;
  check(c != nullptr, "c is null", "c");
  if (k == 0 || alpha == 0.0f) {
    if (beta == 1.0f) return;  // C = C
    scale_c_kernel<<<elementwise_blocks(m * n), kThreads>>>(m, n, beta, c, ldc);
    PPO_CUDA_CHECK_LAUNCH("scale_c_kernel");
    return;
  }
  check(a != nullptr, "a is null", "a");
  check(b != nullptr, "b is null", "b");

  auto vec_ok = [](const float* p, int64_t ld) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % 4 == 0;
  };
  const GemmArgs g{m, n, k, alpha, beta, a, lda, b, ldb, c, ldc, vec_ok(a, lda), vec_ok(b, ldb)};
  switch (path) {
    case Path::Tf32: launch_tensor_cores<Tf32>(transpose_a, transpose_b, g); return;
    case Path::Bf16: launch_tensor_cores<Bf16>(transpose_a, transpose_b, g); return;
    case Path::Fp32: launch_simt(transpose_a, transpose_b, g); return;
    case Path::Cublas:
#ifdef PPO_WITH_CUBLAS
      launch_cublas(transpose_a, transpose_b, g);
      return;
#else
      break;  // parse_path never returns it
#endif
  }
  throw Error(ErrorCode::Internal, "matmul: unexpected path");
}

}  // namespace

const char* matmul_path() { return path_name(env_path()); }

void matmul(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
            const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
            int64_t ldc) {
  matmul_with(env_path(), transpose_a, transpose_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void matmul_on_path(const char* path, bool transpose_a, bool transpose_b, int64_t m, int64_t n,
                    int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                    int64_t ldb, float beta, float* c, int64_t ldc) {
  matmul_with(parse_path(path, "path"), transpose_a, transpose_b, m, n, k, alpha, a, lda, b, ldb,
              beta, c, ldc);
}

}  // namespace ppo::cuda
