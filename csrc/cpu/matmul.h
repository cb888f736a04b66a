// Single-precision matrix multiply (sgemm) for the CPU backend: the dense layers of the
// transformer engine spend nearly all their time here.
#pragma once

#include <cstdint>

namespace ppo::cpu {

// Row-major sgemm:  C[m, n] = alpha * op(A)[m, k] · op(B)[k, n] + beta * C[m, n]
// where op(X) is X, or X^T when transpose_x is set. The leading dimensions are the row
// strides of the matrices as stored in memory:
//   A is stored [m, k] (lda >= k), or [k, m] when transpose_a (lda >= m);
//   B is stored [k, n] (ldb >= n), or [n, k] when transpose_b (ldb >= k);
//   C is stored [m, n] (ldc >= n).
// beta == 0 never reads C (it may hold NaN); alpha == 0 or k == 0 gives C = beta * C
// without reading A or B. C must not overlap A or B.
//
// Deterministic: every C element's k-sum is accumulated in the same order whatever the
// thread count (threads split C into blocks of rows/columns, never the k dimension), so
// results are bit-identical across runs and PPO_MAX_THREADS settings on one machine.
// Nor does a row of C depend on the other rows computed with it: few rows (m <= 16, the
// decode step's products) take an unpacked path with the same arithmetic, so C[i, :]
// has the same bits whether row i comes alone or with many.
// (Different instruction sets - AVX-512, AVX2, portable - may differ in the last bits.)
//
// Throws ppo::Error(InvalidArgument) naming the argument ("m", "n", "k", "lda", "ldb",
// "ldc", "a", "b", "c") for negative sizes, too-small leading dimensions, or null pointers
// to non-empty matrices.
void matmul(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
            const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
            int64_t ldc);

// The instruction set the matmul kernel dispatches to on this machine:
// "avx512f", "avx2+fma" or "portable" (for benchmark and test reports). The environment
// variable PPO_MATMUL_ISA=avx2 or =portable, read once, caps the choice (to test and
// time the fallbacks on a newer CPU).
const char* matmul_isa();

}  // namespace ppo::cpu
