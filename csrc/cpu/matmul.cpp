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
#include "cpu/matmul.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
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
                        &pack_transposing_avx512<48>, &pack_copying<48>};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cap != "portable")
      return KernelSpec{"avx2+fma", 6, 16, 256, 192, 512, &kernel_avx2_6x16,
                        &pack_transposing<6>, &pack_copying<6>,
                        &pack_transposing<16>, &pack_copying<16>};
#endif
    return KernelSpec{"portable", 4, 16, 256, 128, 512, &kernel_portable_4x16,
                      &pack_transposing<4>, &pack_copying<4>,
                      &pack_transposing<16>, &pack_copying<16>};
  }();
  return spec;
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
