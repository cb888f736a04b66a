// Cache-blocked, multithreaded sgemm (see matmul.h for the contract).
//
// The classic Goto/BLIS scheme:
//   for each column block of C (nc wide)            - the threads split C here, by m/n
//     for each k block (kc deep)                    - always the same split of k
//       pack op(B)[kc, nc] into NR-wide panels      - [kc][NR] each, contiguous
//       for each row block of C (mc tall)
//         pack op(A)[mc, kc] into MR-tall panels    - [kc][MR] each, contiguous
//         for each MR panel: for each NR panel: micro-kernel
// The micro-kernel keeps an MR x NR tile of C in registers, walks the kc panels with one
// broadcast of A and NR/lanes loads of B per k step, and adds alpha * tile (+ beta * C on
// the first k block, + C on later ones) to C. Packing makes every kernel load contiguous
// and aligned whatever the transposes and strides, and pads the edges with zeros so one
// kernel serves every tile; edge tiles just store fewer rows/columns.
//
// Determinism: each C element is the same fma chain over k in order inside its k block,
// and the k blocks are combined in order; the k blocking depends only on k, and the tile
// grid only on m and n, so neither the thread count nor the split changes any result.
//
// Instruction sets: AVX-512 (8x48 tile) and AVX2+FMA (6x16) kernels are compiled with
// target attributes and chosen at run time with __builtin_cpu_supports; a portable
// kernel (4x16, plain C++ the compiler vectorizes) covers other CPUs and non-x86.
//
// Few rows (m <= 8, or <= 16 with B transposed: generation's decode step) skip the
// packing and read B in place, with the same arithmetic, hence the same bits (see
// "Small-m path" below).
#include "cpu/matmul.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>

#include "core/error.h"
#include "core/thread_pool.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define PPO_MATMUL_X86 1
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_ps()
// (GCC bug 105593); the warning's location is inside the header, so silence it there.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#define PPO_MATMUL_X86 0
#endif

namespace ppo::cpu {
namespace {

// ---- Operands --------------------------------------------------------------------------

// A stored matrix seen through an optional transpose: element (row, col) of op(X).
struct Operand {
  const float* data;
  int64_t ld;
  bool transposed;
};

// ---- Packing ---------------------------------------------------------------------------
// Both packers produce [kc][W] panels: for each k step, W consecutive values (W rows of
// op(A), or W columns of op(B)), zero-filled past the valid count. Two memory layouts
// reach them:
//   "k-contiguous": each of the W lines runs along k in memory (A not transposed, or B
//                   transposed): a W x kc transpose.
//   "line-contiguous": for each k, the W values are adjacent in memory (A transposed, or
//                   B not transposed): a copy of kc short rows.

// dst[p * W + w] = src[w * ld + p] for w < valid, 0 for w in [valid, W); p < kc.
template <int W>
void pack_transposing(const float* src, int64_t ld, int valid, int64_t kc, float* dst) {
  if (valid < W) {
    for (int64_t p = 0; p < kc; ++p)
      for (int w = valid; w < W; ++w) dst[p * W + w] = 0.0f;
  }
  // Four lines at a time: four read streams, and each written cache line gets four
  // values before moving on.
  int w = 0;
  for (; w + 4 <= valid; w += 4) {
    const float* s0 = src + (w + 0) * ld;
    const float* s1 = src + (w + 1) * ld;
    const float* s2 = src + (w + 2) * ld;
    const float* s3 = src + (w + 3) * ld;
    float* d = dst + w;
    for (int64_t p = 0; p < kc; ++p) {
      d[p * W + 0] = s0[p];
      d[p * W + 1] = s1[p];
      d[p * W + 2] = s2[p];
      d[p * W + 3] = s3[p];
    }
  }
  for (; w < valid; ++w) {
    const float* s = src + w * ld;
    for (int64_t p = 0; p < kc; ++p) dst[p * W + w] = s[p];
  }
}

#if PPO_MATMUL_X86
// The same for W a multiple of 16 and full panels, with AVX-512 16x16 transposes
// (the B^T operand of the LM head is 50257 x 768: packing it must not be scalar).
// In-register 16 x 16 transpose: t[i][j] = r[j][i] (r is clobbered).
__attribute__((target("avx512f"))) inline void transpose16x16(__m512 r[16], __m512 t[16]) {
  // Interleave pairs of rows (32-bit), then pairs of pairs (64-bit), then 128-bit lanes.
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  // r[4q + s] now holds, in each 128-bit lane L, column (4L + s) of rows 4q..4q+3.
  for (int s = 0; s < 4; ++s) {
    // Gather lane L of r[s], r[4+s], r[8+s], r[12+s] into output row (4L + s).
    __m512 a = _mm512_shuffle_f32x4(r[s], r[4 + s], 0x88);       // lanes 0,2 of each
    __m512 b = _mm512_shuffle_f32x4(r[s], r[4 + s], 0xDD);       // lanes 1,3
    __m512 c = _mm512_shuffle_f32x4(r[8 + s], r[12 + s], 0x88);
    __m512 d = _mm512_shuffle_f32x4(r[8 + s], r[12 + s], 0xDD);
    t[0 + s] = _mm512_shuffle_f32x4(a, c, 0x88);   // lane 0 of rows 0-3,4-7,8-11,12-15
    t[8 + s] = _mm512_shuffle_f32x4(a, c, 0xDD);   // lane 2
    t[4 + s] = _mm512_shuffle_f32x4(b, d, 0x88);   // lane 1
    t[12 + s] = _mm512_shuffle_f32x4(b, d, 0xDD);  // lane 3
  }
}

template <int W>
__attribute__((target("avx512f"))) void pack_transposing_avx512(const float* src, int64_t ld,
                                                                int valid, int64_t kc, float* dst) {
  static_assert(W % 16 == 0, "panel width must be whole vectors");
  if (valid < W) {
    pack_transposing<W>(src, ld, valid, kc, dst);
    return;
  }
  int64_t p = 0;
  __m512 r[16], t[16];
  for (; p + 16 <= kc; p += 16)
    for (int w = 0; w < W; w += 16) {
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + (w + i) * ld + p);
      transpose16x16(r, t);
      for (int i = 0; i < 16; ++i) _mm512_store_ps(dst + (p + i) * W + w, t[i]);
    }
  for (; p < kc; ++p)
    for (int w = 0; w < W; ++w) dst[p * W + w] = src[w * ld + p];
}

// W = 8 (the A panels of the 8 x 48 kernel): a 16 x 16 transpose of the 8 rows padded
// with 8 zero rows (half the shuffles are wasted, still several times faster than
// scalar), keeping the low halves.
__attribute__((target("avx512f"))) void pack_transposing_avx512_8(const float* src, int64_t ld,
                                                                 int valid, int64_t kc, float* dst) {
  constexpr int W = 8;
  if (valid < W) {
    pack_transposing<W>(src, ld, valid, kc, dst);
    return;
  }
  int64_t p = 0;
  __m512 r[16], t[16];
  for (; p + 16 <= kc; p += 16) {
    for (int w = 0; w < W; ++w) {
      r[w] = _mm512_loadu_ps(src + w * ld + p);
      r[w + 8] = _mm512_setzero_ps();
    }
    transpose16x16(r, t);
    for (int i = 0; i < 16; ++i) _mm256_store_ps(dst + (p + i) * W, _mm512_castps512_ps256(t[i]));
  }
  for (; p < kc; ++p)
    for (int w = 0; w < W; ++w) dst[p * W + w] = src[w * ld + p];
}
#endif

// dst[p * W + w] = src[p * ld + w] for w < valid, 0 for w in [valid, W); p < kc.
template <int W>
void pack_copying(const float* src, int64_t ld, int valid, int64_t kc, float* dst) {
  if (valid == W) {  // fixed-width copies the compiler turns into a few vector moves
    for (int64_t p = 0; p < kc; ++p)
      for (int w = 0; w < W; ++w) dst[p * W + w] = src[p * ld + w];
    return;
  }
  for (int64_t p = 0; p < kc; ++p) {
    for (int w = 0; w < valid; ++w) dst[p * W + w] = src[p * ld + w];
    for (int w = valid; w < W; ++w) dst[p * W + w] = 0.0f;
  }
}

using PackFn = void (*)(const float* src, int64_t ld, int valid, int64_t kc, float* dst);

// ---- Micro-kernels ---------------------------------------------------------------------
// c[i * ldc + j] (i < rows, j < cols) = alpha * sum_p ap[p * MR + i] * bp[p * NR + j]
//                                      + beta * c[i * ldc + j]        (C unread if beta == 0)
// ap: [kc][MR] panel, bp: [kc][NR] panel (64-byte aligned), rows <= MR, cols <= NR.
using MicroKernel = void (*)(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc,
                             float alpha, float beta, int rows, int cols);

#if PPO_MATMUL_X86
// AVX-512: MR rows x (16 * VECS) columns; 8 x 48 uses 24 accumulators, and each k step
// is 3 loads of B + 8 broadcasts (folded into the FMAs) for 24 FMAs.
template <int MR, int VECS>
__attribute__((target("avx512f"))) void kernel_avx512(int64_t kc, const float* __restrict ap,
                                                      const float* __restrict bp, float* c,
                                                      int64_t ldc, float alpha, float beta,
                                                      int rows, int cols) {
  constexpr int NR = 16 * VECS;
  __m512 acc[MR][VECS];
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < VECS; ++v) acc[i][v] = _mm512_setzero_ps();

  for (int64_t p = 0; p < kc; ++p) {
    // A runs 16 k steps ahead (only the first sweep over B misses on it).
    _mm_prefetch(reinterpret_cast<const char*>(ap + 16 * MR), _MM_HINT_T0);
    __m512 b[VECS];
#pragma GCC unroll 4
    for (int v = 0; v < VECS; ++v) b[v] = _mm512_load_ps(bp + 16 * v);
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(ap[i]);
#pragma GCC unroll 4
      for (int v = 0; v < VECS; ++v) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
    }
    ap += MR;
    bp += NR;
  }

  const __m512 alpha_v = _mm512_set1_ps(alpha), beta_v = _mm512_set1_ps(beta);
  __mmask16 mask[VECS];
  for (int v = 0; v < VECS; ++v) {
    const int n = cols - 16 * v;
    mask[v] = n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
  }
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) {
    if (i >= rows) break;
    float* row = c + i * ldc;
#pragma GCC unroll 4
    for (int v = 0; v < VECS; ++v) {
      __m512 r = _mm512_mul_ps(alpha_v, acc[i][v]);
      if (beta != 0.0f) r = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(mask[v], row + 16 * v), r);
      _mm512_mask_storeu_ps(row + 16 * v, mask[v], r);
    }
  }
}

// AVX2 + FMA: 6 x 16 (12 accumulators + 2 B vectors + 1 broadcast of 16 registers).
__attribute__((target("avx2,fma"))) void kernel_avx2_6x16(int64_t kc, const float* __restrict ap,
                                                         const float* __restrict bp, float* c,
                                                         int64_t ldc, float alpha, float beta,
                                                         int rows, int cols) {
  constexpr int MR = 6, NR = 16;
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t p = 0; p < kc; ++p) {
    const __m256 b0 = _mm256_load_ps(bp), b1 = _mm256_load_ps(bp + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(ap + i);
      acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
    }
    ap += MR;
    bp += NR;
  }
  const __m256 alpha_v = _mm256_set1_ps(alpha), beta_v = _mm256_set1_ps(beta);
  if (rows == MR && cols == NR) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      float* row = c + i * ldc;
      for (int v = 0; v < 2; ++v) {
        __m256 r = _mm256_mul_ps(alpha_v, acc[i][v]);
        if (beta != 0.0f) r = _mm256_fmadd_ps(beta_v, _mm256_loadu_ps(row + 8 * v), r);
        _mm256_storeu_ps(row + 8 * v, r);
      }
    }
    return;
  }
  // Edge tile: stage alpha * tile, then combine only the valid part (same fma as above).
  alignas(32) float tile[MR * NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(tile + i * NR, _mm256_mul_ps(alpha_v, acc[i][0]));
    _mm256_store_ps(tile + i * NR + 8, _mm256_mul_ps(alpha_v, acc[i][1]));
  }
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) {
      float& out = c[i * ldc + j];
      out = beta != 0.0f ? std::fma(beta, out, tile[i * NR + j]) : tile[i * NR + j];
    }
}
#endif

// Portable: 4 x 16 with plain loops (vectorized by the compiler for the baseline ISA).
void kernel_portable_4x16(int64_t kc, const float* __restrict ap, const float* __restrict bp,
                          float* c, int64_t ldc, float alpha, float beta, int rows, int cols) {
  constexpr int MR = 4, NR = 16;
  float acc[MR][NR] = {};
  for (int64_t p = 0; p < kc; ++p) {
    for (int i = 0; i < MR; ++i) {
      const float a = ap[i];
      for (int j = 0; j < NR; ++j) acc[i][j] += a * bp[j];
    }
    ap += MR;
    bp += NR;
  }
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) {
      float& out = c[i * ldc + j];
      const float scaled = alpha * acc[i][j];
      out = beta != 0.0f ? beta * out + scaled : scaled;
    }
}

// ---- Per-thread packing buffers --------------------------------------------------------

struct AlignedBuffer {
  float* data = nullptr;
  size_t capacity = 0;  // floats
  ~AlignedBuffer() { std::free(data); }
  float* reserve(size_t floats) {
    if (floats > capacity) {
      std::free(data);
      data = nullptr;
      capacity = 0;
      const size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
      data = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (!data) throw Error(ErrorCode::OutOfMemory, "matmul: cannot allocate packing buffer");
      capacity = floats;
    }
    return data;
  }
};

struct PackBuffers {
  AlignedBuffer a, b;
};

PackBuffers& thread_pack_buffers() {
  thread_local PackBuffers buffers;
  return buffers;
}

// ---- Small-m path (generation's decode step) -------------------------------------------
// With a few rows (the decode step multiplies the batch's new rows, m = 1..16, by whole
// weight matrices) the product is bound by reading B once, and packing B would read and
// write it a second time for a single use (~2/3 of the time at m = 4). These kernels read
// B where it lies and keep the rows of a strip of C's columns in registers:
//   B transposed (stored [n, k]: the engine's linear_forward and LM head): a strip of
//     16 rows of B (8 for AVX2) is loaded 16 (8) k steps at a time and transposed in
//     registers, giving for each k step the vector of B values of the strip's columns;
//     the portable kernel transposes the strip's k block into a small tile instead;
//   B not transposed (stored [k, n]): each k step loads the strip's part of a row of B.
// Either way each k step does one broadcast of A per row and one fma (portable: a
// multiply-add) per accumulator, which is exactly the packed micro-kernel's arithmetic:
// every C element is the same chain over each k block (the same kc), combined into C the
// same way (alpha * acc, + beta * C on the first block, + C on later ones). So the result
// is bit-identical to the packed path of the same instruction set - a row of C does not
// depend on how many rows come with it, and the path taken is no visible choice - and,
// each element being computed by one thread, independent of the thread count.
// op(A) is first copied to [k][rows] (m * k floats, small next to B's n * k), so that
// both transposes of A reach the kernels as one contiguous stream of broadcasts.

constexpr int64_t kSmallM = 8;  // rows per kernel call (the driver makes groups)

struct SmallArgs {
  const float* ap;  // op(A) as [k][M]: ap[p * M + i] = op(A)(i, p)
  const float* b;   // B as stored ([n, k] or [k, n])
  int64_t ldb;
  int64_t k, kc;  // kc: the packed path's k block (the same function of k)
  float alpha, beta;
  float* c;
  int64_t ldc;
};

// Computes columns [j0, j1) of C (all M rows of args); j0 is a multiple of the kernel's
// width, j1 - j0 anything.
using SmallKernel = void (*)(const SmallArgs& s, int64_t j0, int64_t j1);

struct SmallKernelEntry {
  SmallKernel fn;
  int width;  // columns of C per strip (the unit the threads split n into)
};

struct SmallKernels {
  SmallKernelEntry nt[kSmallM + 1], nn[kSmallM + 1];  // indexed by M (entry 0 unused)
};

#if PPO_MATMUL_X86
// B stored [n, k]: strips of 16 columns, 16 k steps per in-register transpose.
template <int M>
__attribute__((target("avx512f"))) void small_nt_avx512(const SmallArgs& s, int64_t j0, int64_t j1) {
  const int64_t ldb = s.ldb;
  const __m512 alpha_v = _mm512_set1_ps(s.alpha);
  for (int64_t j = j0; j < j1; j += 16) {
    const int cols = static_cast<int>(std::min<int64_t>(16, j1 - j));
    const __mmask16 cmask = cols == 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
    const float* bj = s.b + j * ldb;  // row j of B = column j of op(B)
    float* cj = s.c + j;
    for (int64_t pc = 0; pc < s.k; pc += s.kc) {
      const int64_t kc = std::min(s.kc, s.k - pc);
      const float* ap = s.ap + pc * M;
      const float* bp = bj + pc;
      __m512 acc[M];
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
      int64_t p = 0;
      if (cols == 16) {
        for (; p + 16 <= kc; p += 16) {
          __m512 r[16], t[16];
          // Each of the 16 rows runs 256 bytes ahead: measured ~20% faster on the LM
          // head (154 MB of B from memory) than the hardware prefetchers alone.
#pragma GCC unroll 16
          for (int w = 0; w < 16; ++w)
            _mm_prefetch(reinterpret_cast<const char*>(bp + w * ldb + p + 64), _MM_HINT_T0);
#pragma GCC unroll 16
          for (int w = 0; w < 16; ++w) r[w] = _mm512_loadu_ps(bp + w * ldb + p);
          transpose16x16(r, t);  // t[q] = B[j .. j+15, pc + p + q]
          const float* a = ap + p * M;
#pragma GCC unroll 16
          for (int q = 0; q < 16; ++q)
#pragma GCC unroll 8
            for (int i = 0; i < M; ++i)
              acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(a[q * M + i]), t[q], acc[i]);
        }
      }
      // Edges: fewer than 16 columns (missing rows of B read as zeros, never loaded)
      // and/or fewer than 16 k steps left in the block (masked loads).
      for (; p < kc; p += 16) {
        const int depth = static_cast<int>(std::min<int64_t>(16, kc - p));
        const __mmask16 kmask = depth == 16 ? __mmask16(0xFFFF) : __mmask16((1u << depth) - 1);
        __m512 r[16], t[16];
        for (int w = 0; w < 16; ++w)
          r[w] = w < cols ? _mm512_maskz_loadu_ps(kmask, bp + w * ldb + p) : _mm512_setzero_ps();
        transpose16x16(r, t);
        const float* a = ap + p * M;
        for (int q = 0; q < depth; ++q)
#pragma GCC unroll 8
          for (int i = 0; i < M; ++i)
            acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(a[q * M + i]), t[q], acc[i]);
      }
      // As kernel_avx512: alpha * acc (+ beta * C; later k blocks add onto C).
      const float beta = pc == 0 ? s.beta : 1.0f;
      const __m512 beta_v = _mm512_set1_ps(beta);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        float* row = cj + i * s.ldc;
        __m512 v = _mm512_mul_ps(alpha_v, acc[i]);
        if (beta != 0.0f) v = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(cmask, row), v);
        _mm512_mask_storeu_ps(row, cmask, v);
      }
    }
  }
}

// B stored [k, n]: strips of 16 * V columns; each k step loads V vectors of a B row.
template <int M, int V>
__attribute__((target("avx512f"))) void small_nn_avx512(const SmallArgs& s, int64_t j0, int64_t j1) {
  constexpr int W = 16 * V;
  const int64_t ldb = s.ldb;
  const __m512 alpha_v = _mm512_set1_ps(s.alpha);
  for (int64_t j = j0; j < j1; j += W) {
    const int cols = static_cast<int>(std::min<int64_t>(W, j1 - j));
    __mmask16 mask[V];
    for (int v = 0; v < V; ++v) {
      const int left = cols - 16 * v;
      mask[v] = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
    }
    float* cj = s.c + j;
    for (int64_t pc = 0; pc < s.k; pc += s.kc) {
      const int64_t kc = std::min(s.kc, s.k - pc);
      const float* ap = s.ap + pc * M;
      const float* bp = s.b + pc * ldb + j;
      __m512 acc[M][V];
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) acc[i][v] = _mm512_setzero_ps();
      if (cols == W) {
        for (int64_t p = 0; p < kc; ++p) {
          __m512 b[V];
          // 8 rows ahead: the strip reads only W values of each row, a stride the
          // hardware prefetchers follow poorly for long rows (measured ~10-35% faster).
#pragma GCC unroll 4
          for (int v = 0; v < V; ++v)
            _mm_prefetch(reinterpret_cast<const char*>(bp + (p + 8) * ldb + 16 * v), _MM_HINT_T0);
#pragma GCC unroll 4
          for (int v = 0; v < V; ++v) b[v] = _mm512_loadu_ps(bp + p * ldb + 16 * v);
#pragma GCC unroll 8
          for (int i = 0; i < M; ++i) {
            const __m512 a = _mm512_set1_ps(ap[p * M + i]);
#pragma GCC unroll 4
            for (int v = 0; v < V; ++v) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
          }
        }
      } else {
        for (int64_t p = 0; p < kc; ++p) {
          __m512 b[V];
#pragma GCC unroll 4
          for (int v = 0; v < V; ++v) b[v] = _mm512_maskz_loadu_ps(mask[v], bp + p * ldb + 16 * v);
#pragma GCC unroll 8
          for (int i = 0; i < M; ++i) {
            const __m512 a = _mm512_set1_ps(ap[p * M + i]);
#pragma GCC unroll 4
            for (int v = 0; v < V; ++v) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
          }
        }
      }
      const float beta = pc == 0 ? s.beta : 1.0f;
      const __m512 beta_v = _mm512_set1_ps(beta);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        float* row = cj + i * s.ldc;
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) {
          __m512 r = _mm512_mul_ps(alpha_v, acc[i][v]);
          if (beta != 0.0f) r = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(mask[v], row + 16 * v), r);
          _mm512_mask_storeu_ps(row + 16 * v, mask[v], r);
        }
      }
    }
  }
}

// In-register 8 x 8 transpose: t[i][j] = r[j][i].
__attribute__((target("avx2,fma"))) inline void transpose8x8(const __m256 r[8], __m256 t[8]) {
  __m256 u[8], v[8];
  for (int i = 0; i < 8; i += 2) {
    u[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // r_i0 r_j0 r_i1 r_j1 | r_i4 r_j4 r_i5 r_j5
    u[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // r_i2 r_j2 r_i3 r_j3 | r_i6 ...
  }
  for (int i = 0; i < 8; i += 4) {
    v[i + 0] = _mm256_shuffle_ps(u[i], u[i + 2], 0x44);      // column 0 | 4 of rows i..i+3
    v[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], 0xEE);      // column 1 | 5
    v[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0x44);  // column 2 | 6
    v[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0xEE);  // column 3 | 7
  }
  for (int q = 0; q < 4; ++q) {
    t[q] = _mm256_permute2f128_ps(v[q], v[q + 4], 0x20);
    t[q + 4] = _mm256_permute2f128_ps(v[q], v[q + 4], 0x31);
  }
}

// The first `n` of 8 lanes: a mask for _mm256_maskload_ps/_mm256_maskstore_ps (which do
// not touch the memory of masked-out lanes).
__attribute__((target("avx2,fma"))) inline __m256i lane_mask8(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// B stored [n, k], AVX2: strips of 8 columns, 8 k steps per transpose.
template <int M>
__attribute__((target("avx2,fma"))) void small_nt_avx2(const SmallArgs& s, int64_t j0, int64_t j1) {
  const int64_t ldb = s.ldb;
  const __m256 alpha_v = _mm256_set1_ps(s.alpha);
  for (int64_t j = j0; j < j1; j += 8) {
    const int cols = static_cast<int>(std::min<int64_t>(8, j1 - j));
    const __m256i cmask = lane_mask8(cols);
    const float* bj = s.b + j * ldb;
    float* cj = s.c + j;
    for (int64_t pc = 0; pc < s.k; pc += s.kc) {
      const int64_t kc = std::min(s.kc, s.k - pc);
      const float* ap = s.ap + pc * M;
      const float* bp = bj + pc;
      __m256 acc[M];
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
      int64_t p = 0;
      if (cols == 8) {
        for (; p + 8 <= kc; p += 8) {
          __m256 r[8], t[8];
#pragma GCC unroll 8
          for (int w = 0; w < 8; ++w)
            _mm_prefetch(reinterpret_cast<const char*>(bp + w * ldb + p + 64), _MM_HINT_T0);
#pragma GCC unroll 8
          for (int w = 0; w < 8; ++w) r[w] = _mm256_loadu_ps(bp + w * ldb + p);
          transpose8x8(r, t);
          const float* a = ap + p * M;
#pragma GCC unroll 8
          for (int q = 0; q < 8; ++q)
#pragma GCC unroll 8
            for (int i = 0; i < M; ++i)
              acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(a + q * M + i), t[q], acc[i]);
        }
      }
      for (; p < kc; p += 8) {
        const int depth = static_cast<int>(std::min<int64_t>(8, kc - p));
        const __m256i kmask = lane_mask8(depth);
        __m256 r[8], t[8];
        for (int w = 0; w < 8; ++w)
          r[w] = w < cols ? _mm256_maskload_ps(bp + w * ldb + p, kmask) : _mm256_setzero_ps();
        transpose8x8(r, t);
        const float* a = ap + p * M;
        for (int q = 0; q < depth; ++q)
#pragma GCC unroll 8
          for (int i = 0; i < M; ++i)
            acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(a + q * M + i), t[q], acc[i]);
      }
      // As kernel_avx2_6x16: alpha * acc, then fma(beta, C, .) (the edge tiles there use
      // std::fma, the same correctly rounded operation).
      const float beta = pc == 0 ? s.beta : 1.0f;
      const __m256 beta_v = _mm256_set1_ps(beta);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        float* row = cj + i * s.ldc;
        __m256 v = _mm256_mul_ps(alpha_v, acc[i]);
        if (cols == 8) {
          if (beta != 0.0f) v = _mm256_fmadd_ps(beta_v, _mm256_loadu_ps(row), v);
          _mm256_storeu_ps(row, v);
        } else {
          if (beta != 0.0f) v = _mm256_fmadd_ps(beta_v, _mm256_maskload_ps(row, cmask), v);
          _mm256_maskstore_ps(row, cmask, v);
        }
      }
    }
  }
}

// B stored [k, n], AVX2: strips of 32 columns. The rows go in pairs (2 x 4 accumulators,
// 4 B vectors and a broadcast fill 13 of the 16 ymm registers), each pair sweeping the
// strip's k block - 32 KB at kc = 256, from L1 after the first pair. (Measured: one
// register block of all M rows, at 8-16 columns, reads too little of each B row and
// lost to the packed path from M = 3.)
template <int G, bool kFull>
__attribute__((target("avx2,fma"))) inline void nn_avx2_rows(const float* ap, int64_t a_stride,
                                                            const float* bp, int64_t ldb, int64_t kc,
                                                            const __m256i mask[4], __m256 alpha_v,
                                                            float beta, float* c, int64_t ldc) {
  constexpr int V = 4;
  __m256 acc[G][V];
#pragma GCC unroll 2
  for (int i = 0; i < G; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t p = 0; p < kc; ++p) {
    const float* brow = bp + p * ldb;
    __m256 b[V];
    if (kFull) {
      // One prefetch per 64-byte line, 8 rows ahead (as in small_nn_avx512).
      _mm_prefetch(reinterpret_cast<const char*>(brow + 8 * ldb), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(brow + 8 * ldb + 16), _MM_HINT_T0);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) b[v] = _mm256_loadu_ps(brow + 8 * v);
    } else {
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) b[v] = _mm256_maskload_ps(brow + 8 * v, mask[v]);
    }
#pragma GCC unroll 2
    for (int i = 0; i < G; ++i) {
      const __m256 a = _mm256_broadcast_ss(ap + p * a_stride + i);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[i][v] = _mm256_fmadd_ps(a, b[v], acc[i][v]);
    }
  }
  const __m256 beta_v = _mm256_set1_ps(beta);
#pragma GCC unroll 2
  for (int i = 0; i < G; ++i) {
    float* row = c + i * ldc;
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      __m256 r = _mm256_mul_ps(alpha_v, acc[i][v]);
      if (kFull) {
        if (beta != 0.0f) r = _mm256_fmadd_ps(beta_v, _mm256_loadu_ps(row + 8 * v), r);
        _mm256_storeu_ps(row + 8 * v, r);
      } else {
        if (beta != 0.0f) r = _mm256_fmadd_ps(beta_v, _mm256_maskload_ps(row + 8 * v, mask[v]), r);
        _mm256_maskstore_ps(row + 8 * v, mask[v], r);
      }
    }
  }
}

template <int M>
__attribute__((target("avx2,fma"))) void small_nn_avx2(const SmallArgs& s, int64_t j0, int64_t j1) {
  constexpr int W = 32;
  const int64_t ldb = s.ldb;
  const __m256 alpha_v = _mm256_set1_ps(s.alpha);
  for (int64_t j = j0; j < j1; j += W) {
    const int cols = static_cast<int>(std::min<int64_t>(W, j1 - j));
    __m256i mask[4];
    for (int v = 0; v < 4; ++v) mask[v] = lane_mask8(cols - 8 * v);
    for (int64_t pc = 0; pc < s.k; pc += s.kc) {
      const int64_t kc = std::min(s.kc, s.k - pc);
      const float* ap = s.ap + pc * M;
      const float* bp = s.b + pc * ldb + j;
      const float beta = pc == 0 ? s.beta : 1.0f;
      float* c = s.c + j;
      if (cols == W) {
        for (int i = 0; i + 2 <= M; i += 2)
          nn_avx2_rows<2, true>(ap + i, M, bp, ldb, kc, mask, alpha_v, beta, c + i * s.ldc, s.ldc);
        if (M % 2)
          nn_avx2_rows<1, true>(ap + M - 1, M, bp, ldb, kc, mask, alpha_v, beta, c + (M - 1) * s.ldc, s.ldc);
      } else {
        for (int i = 0; i + 2 <= M; i += 2)
          nn_avx2_rows<2, false>(ap + i, M, bp, ldb, kc, mask, alpha_v, beta, c + i * s.ldc, s.ldc);
        if (M % 2)
          nn_avx2_rows<1, false>(ap + M - 1, M, bp, ldb, kc, mask, alpha_v, beta, c + (M - 1) * s.ldc, s.ldc);
      }
    }
  }
}
#endif

// Portable: strips of 16 columns with the arithmetic of kernel_portable_4x16, written
// the same way (acc += a * b; beta * out + alpha * acc) so that a compiler contracting
// one into fmas contracts the other alike. The rows go in pairs: 2 x 16 accumulators
// stay in registers even with 16 SSE registers (measured on x86-64 baseline: one block
// of 4 rows spilled and lost to the packed path). B is read as [kc][16] rows: in place
// when B is not transposed (full strips), else from a tile of the strip's k block
// (16 KB at kc = 256, in the thread's B packing buffer, which this path does not use
// otherwise) that all pairs then read from L1.

// Rows i and i + 1 of C over one k block of a strip: a = ap + i, so row i's A value of
// k step p is a[p * M] and row i + 1's a[p * M + second]; bt[p * bs + w] = op(B)(pc + p,
// j + w). An odd last row runs as a pair with itself (second = 0) and its copy is not
// stored. The accumulators are GCC/Clang vector-extension values (4 lanes: SSE2, NEON),
// as in attention.cpp: with float arrays GCC chose, depending on M, to vectorize across
// k steps instead, with shuffles, up to 3x slower (measured on x86-64 baseline). The
// arithmetic per lane is still acc += a * b, as in kernel_portable_4x16.
typedef float PortableVec __attribute__((vector_size(4 * sizeof(float))));

template <int M>
void portable_pair(const float* a, int second, const float* bt, int64_t bs, int64_t kc, int cols,
                   float alpha, float beta, float* c, int64_t ldc) {
  constexpr int L = 16, V = L / 4;
  PortableVec acc0[V], acc1[V];
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) acc0[v] = acc1[v] = PortableVec{0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t p = 0; p < kc; ++p) {
    const float* brow = bt + p * bs;
    const float x0 = a[p * M], x1 = a[p * M + second];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      PortableVec b;
      std::memcpy(&b, brow + 4 * v, sizeof b);
      acc0[v] += x0 * b;
      acc1[v] += x1 * b;
    }
  }
  float acc[2][L];
  std::memcpy(acc[0], acc0, sizeof acc0);
  std::memcpy(acc[1], acc1, sizeof acc1);
  for (int i = 0; i <= second; ++i)
    for (int w = 0; w < cols; ++w) {
      float& out = c[i * ldc + w];
      const float scaled = alpha * acc[i][w];
      out = beta != 0.0f ? beta * out + scaled : scaled;
    }
}

template <int M>
void portable_all_rows(const float* ap, const float* bt, int64_t bs, int64_t kc, int cols,
                       float alpha, float beta, float* c, int64_t ldc) {
  for (int i = 0; i < M; i += 2)
    portable_pair<M>(ap + i, i + 1 < M ? 1 : 0, bt, bs, kc, cols, alpha, beta, c + i * ldc, ldc);
}

template <int M>
void small_nt_portable(const SmallArgs& s, int64_t j0, int64_t j1) {
  constexpr int L = 16;
  const int64_t ldb = s.ldb;
  float* tile = thread_pack_buffers().b.reserve(static_cast<size_t>(s.kc * L));
  for (int64_t j = j0; j < j1; j += L) {
    const int cols = static_cast<int>(std::min<int64_t>(L, j1 - j));
    for (int64_t pc = 0; pc < s.k; pc += s.kc) {
      const int64_t kc = std::min(s.kc, s.k - pc);
      // tile[p][w] = B[j + w, pc + p] (the strip's rows of B, transposed), 0 past cols.
      pack_transposing<L>(s.b + j * ldb + pc, ldb, cols, kc, tile);
      const float beta = pc == 0 ? s.beta : 1.0f;
      portable_all_rows<M>(s.ap + pc * M, tile, L, kc, cols, s.alpha, beta, s.c + j, s.ldc);
    }
  }
}

template <int M>
void small_nn_portable(const SmallArgs& s, int64_t j0, int64_t j1) {
  constexpr int L = 16;
  const int64_t ldb = s.ldb;
  float* tile = thread_pack_buffers().b.reserve(static_cast<size_t>(s.kc * L));
  for (int64_t j = j0; j < j1; j += L) {
    const int cols = static_cast<int>(std::min<int64_t>(L, j1 - j));
    for (int64_t pc = 0; pc < s.k; pc += s.kc) {
      const int64_t kc = std::min(s.kc, s.k - pc);
      const float* bt = s.b + pc * ldb + j;
      int64_t bs = ldb;
      if (cols < L) {  // edge strip: copy it zero-padded (never read past column n)
        pack_copying<L>(bt, ldb, cols, kc, tile);
        bt = tile;
        bs = L;
      }
      const float beta = pc == 0 ? s.beta : 1.0f;
      portable_all_rows<M>(s.ap + pc * M, bt, bs, kc, cols, s.alpha, beta, s.c + j, s.ldc);
    }
  }
}

// The kernel tables, indexed by M, with their strip widths. AVX-512, B not transposed:
// M x V accumulators, V chosen so that they, V B vectors and a broadcast fit the 32 zmm
// registers.
#if PPO_MATMUL_X86
const SmallKernels kSmallAvx512 = {
    {{nullptr, 0}, {&small_nt_avx512<1>, 16}, {&small_nt_avx512<2>, 16}, {&small_nt_avx512<3>, 16},
     {&small_nt_avx512<4>, 16}, {&small_nt_avx512<5>, 16}, {&small_nt_avx512<6>, 16},
     {&small_nt_avx512<7>, 16}, {&small_nt_avx512<8>, 16}},
    {{nullptr, 0}, {&small_nn_avx512<1, 4>, 64}, {&small_nn_avx512<2, 4>, 64},
     {&small_nn_avx512<3, 4>, 64}, {&small_nn_avx512<4, 4>, 64}, {&small_nn_avx512<5, 4>, 64},
     {&small_nn_avx512<6, 4>, 64}, {&small_nn_avx512<7, 3>, 48}, {&small_nn_avx512<8, 3>, 48}}};
const SmallKernels kSmallAvx2 = {
    {{nullptr, 0}, {&small_nt_avx2<1>, 8}, {&small_nt_avx2<2>, 8}, {&small_nt_avx2<3>, 8},
     {&small_nt_avx2<4>, 8}, {&small_nt_avx2<5>, 8}, {&small_nt_avx2<6>, 8}, {&small_nt_avx2<7>, 8},
     {&small_nt_avx2<8>, 8}},
    {{nullptr, 0}, {&small_nn_avx2<1>, 32}, {&small_nn_avx2<2>, 32}, {&small_nn_avx2<3>, 32},
     {&small_nn_avx2<4>, 32}, {&small_nn_avx2<5>, 32}, {&small_nn_avx2<6>, 32}, {&small_nn_avx2<7>, 32},
     {&small_nn_avx2<8>, 32}}};
#endif
const SmallKernels kSmallPortable = {
    {{nullptr, 0}, {&small_nt_portable<1>, 16}, {&small_nt_portable<2>, 16},
     {&small_nt_portable<3>, 16}, {&small_nt_portable<4>, 16}, {&small_nt_portable<5>, 16},
     {&small_nt_portable<6>, 16}, {&small_nt_portable<7>, 16}, {&small_nt_portable<8>, 16}},
    {{nullptr, 0}, {&small_nn_portable<1>, 16}, {&small_nn_portable<2>, 16},
     {&small_nn_portable<3>, 16}, {&small_nn_portable<4>, 16}, {&small_nn_portable<5>, 16},
     {&small_nn_portable<6>, 16}, {&small_nn_portable<7>, 16}, {&small_nn_portable<8>, 16}}};

// ---- Kernel selection ------------------------------------------------------------------

struct KernelSpec {
  const char* isa;
  int mr, nr;
  int64_t kc_max;  // k block: a [kc][MR] A panel stays in L1 while the kernel sweeps B
  int64_t mc_max;  // row block: the packed [mc][kc] A block (L2/L3)
  int64_t nc_max;  // column block: the packed [kc][nc] B block stays in L2
  MicroKernel kernel;
  PackFn pack_a_k_contiguous, pack_a_line_contiguous;  // MR-wide
  PackFn pack_b_k_contiguous, pack_b_line_contiguous;  // NR-wide
  const SmallKernels* small;  // the m <= kSmallM kernels of the same instruction set
};

const KernelSpec& select_kernel() {
  static const KernelSpec spec = [] {
    // PPO_MATMUL_ISA=avx2|portable forces a lower kernel (for tests and benchmarks of
    // the fallbacks on an AVX-512 machine); it never selects one the CPU lacks.
    const char* forced = std::getenv("PPO_MATMUL_ISA");
    const std::string cap = forced ? forced : "";
#if PPO_MATMUL_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && cap != "avx2" && cap != "portable")
      return KernelSpec{"avx512f", 8, 48, 256, 256, 1024, &kernel_avx512<8, 3>,
                        &pack_transposing_avx512_8, &pack_copying<8>,
                        &pack_transposing_avx512<48>, &pack_copying<48>, &kSmallAvx512};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cap != "portable")
      return KernelSpec{"avx2+fma", 6, 16, 256, 192, 512, &kernel_avx2_6x16,
                        &pack_transposing<6>, &pack_copying<6>,
                        &pack_transposing<16>, &pack_copying<16>, &kSmallAvx2};
#endif
    return KernelSpec{"portable", 4, 16, 256, 128, 512, &kernel_portable_4x16,
                      &pack_transposing<4>, &pack_copying<4>,
                      &pack_transposing<16>, &pack_copying<16>, &kSmallPortable};
  }();
  return spec;
}

// ---- Driver ----------------------------------------------------------------------------

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

// Splits `total` into the fewest blocks of at most `max_block`, of equal size rounded up
// to a multiple of `unit` (so e.g. k = 300 gives 2 blocks of 150, not 256 + 44).
int64_t balanced_block(int64_t total, int64_t max_block, int64_t unit) {
  const int64_t blocks = ceil_div(total, max_block);
  return ceil_div(ceil_div(total, blocks), unit) * unit;
}

struct Problem {
  Operand a, b;
  int64_t m, n, k;
  float alpha, beta;
  float* c;
  int64_t ldc;
  int64_t kc;  // the k block, a function of k only (determinism)
};

// Computes rows [m0, m1) x columns [n0, n1) of C (block edges on the MR/NR tile grid).
void compute_block(const KernelSpec& ks, const Problem& pr, int64_t m0, int64_t m1, int64_t n0,
                   int64_t n1) {
  const int mr = ks.mr, nr = ks.nr;
  const int64_t nc_block = balanced_block(n1 - n0, ks.nc_max, nr);
  const int64_t mc_block = balanced_block(m1 - m0, ks.mc_max, mr);
  PackBuffers& buffers = thread_pack_buffers();
  float* packed_b = buffers.b.reserve(static_cast<size_t>(pr.kc * nc_block));
  float* packed_a = buffers.a.reserve(static_cast<size_t>(pr.kc * mc_block));

  for (int64_t jc = n0; jc < n1; jc += nc_block) {
    const int64_t nc = std::min(nc_block, n1 - jc);
    for (int64_t pc = 0; pc < pr.k; pc += pr.kc) {
      const int64_t kc = std::min(pr.kc, pr.k - pc);
      // Later k blocks add onto the partial sums already in C.
      const float beta = pc == 0 ? pr.beta : 1.0f;

      // op(B)[pc:pc+kc, jc:jc+nc] -> NR-wide panels, panel q at packed_b + q * kc * NR.
      for (int64_t jr = 0; jr < nc; jr += nr) {
        const int valid = static_cast<int>(std::min<int64_t>(nr, nc - jr));
        float* dst = packed_b + jr * kc;
        const int64_t col = jc + jr;
        if (pr.b.transposed)  // stored [n, k]: column `col` of op(B) is row `col` in memory
          ks.pack_b_k_contiguous(pr.b.data + col * pr.b.ld + pc, pr.b.ld, valid, kc, dst);
        else
          ks.pack_b_line_contiguous(pr.b.data + pc * pr.b.ld + col, pr.b.ld, valid, kc, dst);
      }

      for (int64_t ic = m0; ic < m1; ic += mc_block) {
        const int64_t mc = std::min(mc_block, m1 - ic);
        // op(A)[ic:ic+mc, pc:pc+kc] -> MR-tall panels, panel q at packed_a + q * kc * MR.
        for (int64_t ir = 0; ir < mc; ir += mr) {
          const int valid = static_cast<int>(std::min<int64_t>(mr, mc - ir));
          float* dst = packed_a + ir * kc;
          const int64_t row = ic + ir;
          if (pr.a.transposed)  // stored [k, m]
            ks.pack_a_line_contiguous(pr.a.data + pc * pr.a.ld + row, pr.a.ld, valid, kc, dst);
          else
            ks.pack_a_k_contiguous(pr.a.data + row * pr.a.ld + pc, pr.a.ld, valid, kc, dst);
        }

        // One MR panel of A (8 KB at 8 x 256) stays in L1 while the kernel sweeps the
        // B block (<= 1 MB at 256 x 1024) from L2; measured ~5% faster here than the
        // BLIS order (B panel in L1), whose 48 x 256 B panel fills the whole 48 KB L1.
        for (int64_t ir = 0; ir < mc; ir += mr) {
          const int rows = static_cast<int>(std::min<int64_t>(mr, mc - ir));
          const float* a_panel = packed_a + ir * kc;
          float* c_row = pr.c + (ic + ir) * pr.ldc + jc;
          for (int64_t jr = 0; jr < nc; jr += nr) {
            const int cols = static_cast<int>(std::min<int64_t>(nr, nc - jr));
            ks.kernel(kc, a_panel, packed_b + jr * kc, c_row + jr, pr.ldc, pr.alpha, beta, rows,
                      cols);
          }
        }
      }
    }
  }
}

// The small-m path (see "Small-m path" above): m <= kSmallM rows, or up to
// kSmallMaxRows when B is transposed, with B read in place. Rows go to the kernels in
// groups of at most kSmallM (8 + the rest); for each unit of columns every group runs
// before the next unit, so the second group re-reads that part of B from cache, not
// memory. Measured with B transposed (GPT-2 and small-config shapes): 9-12 rows take
// 10-45% less time than the packed path, 16 rows 20-30% less on one thread and about
// the same on two; a third group (24 rows) would at best break even, hence 16. With B
// not transposed the units are 48-64 columns of all k rows of B, which at k = 3072 no
// longer fit L2, and two groups lost to the packed path (by ~35% at 9 x 768 x 3072):
// there the small path stops at kSmallM.
// Threads split C's columns into runs of whole units; a thread gets at least
// kSmallMinBytes of B to read. Waking a pool thread took 50-70 us on the 2-vCPU VM this
// was tuned on (a 384 x 384 product: 12 us on one thread, 80 us on two), about the
// time one thread reads 1-2 MB; in the engine's generation benchmark 1 MB beat 256 KB,
// 2 MB and 4 MB. Each C element is computed by one thread, so the split changes no result.
constexpr int64_t kSmallMaxRows = 2 * kSmallM;
constexpr int64_t kSmallMinBytes = 1 << 20;

void small_matmul(const KernelSpec& ks, const Problem& pr) {
  const int64_t m = pr.m, n = pr.n, k = pr.k;
  const int groups = m > kSmallM ? 2 : 1;
  const int64_t group_rows[2] = {std::min(m, kSmallM), m - std::min(m, kSmallM)};
  // op(A) -> one [k][rows] block per group, in the calling thread's A packing buffer
  // (the workers only read it).
  float* ap = thread_pack_buffers().a.reserve(static_cast<size_t>(m * k));
  SmallArgs args[2];
  SmallKernelEntry kernels[2];
  int64_t unit = 1;  // columns per unit: a multiple of every group kernel's width
  for (int g = 0, row0 = 0; g < groups; row0 += static_cast<int>(group_rows[g]), ++g) {
    const int64_t rows = group_rows[g];
    float* dst = ap + row0 * k;
    if (pr.a.transposed) {  // stored [k, m]: each stored row holds the k step of all rows
      for (int64_t p = 0; p < k; ++p) {
        const float* src = pr.a.data + p * pr.a.ld + row0;
        std::copy(src, src + rows, dst + p * rows);
      }
    } else {
      for (int64_t i = 0; i < rows; ++i) {
        const float* src = pr.a.data + (row0 + i) * pr.a.ld;
        for (int64_t p = 0; p < k; ++p) dst[p * rows + i] = src[p];
      }
    }
    args[g] = SmallArgs{dst, pr.b.data, pr.b.ld, k, pr.kc, pr.alpha, pr.beta, pr.c + row0 * pr.ldc, pr.ldc};
    kernels[g] = pr.b.transposed ? ks.small->nt[rows] : ks.small->nn[rows];
    unit = std::lcm(unit, static_cast<int64_t>(kernels[g].width));
  }
  const int64_t units = ceil_div(n, unit);
  const int64_t unit_bytes = unit * k * static_cast<int64_t>(sizeof(float));
  const int64_t grain = std::max<int64_t>(1, kSmallMinBytes / unit_bytes);
  parallel_for(
      units,
      [&](int64_t begin, int64_t end) {
        for (int64_t u = begin; u < end; ++u) {
          const int64_t j0 = u * unit, j1 = std::min(n, j0 + unit);
          for (int g = 0; g < groups; ++g) kernels[g].fn(args[g], j0, j1);
        }
      },
      grain);
}

// C = beta * C (C unread when beta == 0), for k == 0 or alpha == 0.
void scale_c(int64_t m, int64_t n, float beta, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    float* row = c + i * ldc;
    if (beta == 0.0f)
      std::fill(row, row + n, 0.0f);
    else if (beta != 1.0f)
      for (int64_t j = 0; j < n; ++j) row[j] *= beta;
  }
}

void require_arg(bool ok, const std::string& message, const char* argument) {
  if (!ok) throw Error(ErrorCode::InvalidArgument, "matmul: " + message, argument);
}

}  // namespace

const char* matmul_isa() { return select_kernel().isa; }

void matmul(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
            const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
            int64_t ldc) {
  require_arg(m >= 0, "m must be >= 0, got " + std::to_string(m), "m");
  require_arg(n >= 0, "n must be >= 0, got " + std::to_string(n), "n");
  require_arg(k >= 0, "k must be >= 0, got " + std::to_string(k), "k");
  // Row lengths of the stored matrices (at least 1 so that empty matrices need ld >= 1).
  const int64_t a_row = std::max<int64_t>(1, transpose_a ? m : k);
  const int64_t b_row = std::max<int64_t>(1, transpose_b ? k : n);
  const int64_t c_row = std::max<int64_t>(1, n);
  require_arg(lda >= a_row, "lda (" + std::to_string(lda) + ") must be >= the row length of the stored A (" +
                                std::to_string(a_row) + ")", "lda");
  require_arg(ldb >= b_row, "ldb (" + std::to_string(ldb) + ") must be >= the row length of the stored B (" +
                                std::to_string(b_row) + ")", "ldb");
  require_arg(ldc >= c_row, "ldc (" + std::to_string(ldc) + ") must be >= n (" + std::to_string(c_row) + ")",
              "ldc");
  if (m == 0 || n == 0) return;
  require_arg(c != nullptr, "c is null", "c");
  if (k == 0 || alpha == 0.0f) {
    scale_c(m, n, beta, c, ldc);
    return;
  }
  require_arg(a != nullptr, "a is null", "a");
  require_arg(b != nullptr, "b is null", "b");

  const KernelSpec& ks = select_kernel();
  Problem pr{{a, lda, transpose_a}, {b, ldb, transpose_b}, m, n, k, alpha, beta, c, ldc,
             balanced_block(k, ks.kc_max, 1)};
  if (m <= kSmallM || (m <= kSmallMaxRows && transpose_b)) {
    small_matmul(ks, pr);
    return;
  }

  // Split C into a grid of m_parts x n_parts blocks on the tile grid, one per thread.
  // Small products stay on one thread: waking the pool costs ~10 us.
  const int64_t m_panels = ceil_div(m, ks.mr), n_panels = ceil_div(n, ks.nr);
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  int64_t threads = std::min<int64_t>(cpu_thread_count(), static_cast<int64_t>(flops / 4.0e6) + 1);
  threads = std::max<int64_t>(1, std::min(threads, m_panels * n_panels));
  // Choose the factorization threads = m_parts * n_parts with the least work on the
  // busiest thread; on ties split the larger of m and n (each n part packs all of A and
  // each m part all of B, so the smaller operand is the one duplicated).
  int64_t best_m_parts = 1, best_n_parts = 1, best_cost = -1;
  for (int64_t n_parts = 1; n_parts <= threads; ++n_parts) {
    if (threads % n_parts) continue;
    const int64_t m_parts = threads / n_parts;
    if (n_parts > n_panels || m_parts > m_panels) continue;
    const int64_t cost = ceil_div(m_panels, m_parts) * ceil_div(n_panels, n_parts);
    const bool prefer = n >= m ? n_parts > best_n_parts : m_parts > best_m_parts;
    if (best_cost < 0 || cost < best_cost || (cost == best_cost && prefer)) {
      best_cost = cost;
      best_m_parts = m_parts;
      best_n_parts = n_parts;
    }
  }
  const int64_t tasks = best_m_parts * best_n_parts;
  auto run_task = [&](int64_t task) {
    const int64_t mi = task / best_n_parts, ni = task % best_n_parts;
    const int64_t m0 = std::min(m, m_panels * mi / best_m_parts * ks.mr);
    const int64_t m1 = std::min(m, m_panels * (mi + 1) / best_m_parts * ks.mr);
    const int64_t n0 = std::min(n, n_panels * ni / best_n_parts * ks.nr);
    const int64_t n1 = std::min(n, n_panels * (ni + 1) / best_n_parts * ks.nr);
    if (m0 < m1 && n0 < n1) compute_block(ks, pr, m0, m1, n0, n1);
  };
  if (tasks == 1) {
    run_task(0);
    return;
  }
  parallel_for(tasks, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) run_task(t);
  });
}

}  // namespace ppo::cpu
