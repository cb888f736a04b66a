// ppo::cpu::matmul (row-major sgemm) against a naive float64 reference: every transpose
// combination, alpha/beta, odd and tile-edge shapes, strided leading dimensions,
// determinism (bit-identical across runs and across splits of C), argument errors.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu/matmul.h"
#include "test_framework.h"
#include "test_util.h"

namespace {

// One sgemm problem with its stored operands (A stored [m,k] or [k,m] when transposed,
// B stored [k,n] or [n,k]), each row padded to its leading dimension with NaN so that a
// kernel reading past a row end shows up as a NaN result.
struct Case {
  bool ta = false, tb = false;
  int64_t m = 1, n = 1, k = 1;
  int64_t lda = 0, ldb = 0, ldc = 0;
  float alpha = 1.0f, beta = 0.0f;
  std::vector<float> a, b, c;  // c: the initial C (before the call)

  // op(A)(i, p) and op(B)(p, j) as stored.
  double op_a(int64_t i, int64_t p) const { return ta ? a[p * lda + i] : a[i * lda + p]; }
  double op_b(int64_t p, int64_t j) const { return tb ? b[j * ldb + p] : b[p * ldb + j]; }
  std::string name() const {
    return std::string(ta ? "T" : "N") + (tb ? "T" : "N") + " m=" + std::to_string(m) +
           " n=" + std::to_string(n) + " k=" + std::to_string(k) + " lda=" + std::to_string(lda) +
           " ldb=" + std::to_string(ldb) + " ldc=" + std::to_string(ldc) +
           " alpha=" + std::to_string(alpha) + " beta=" + std::to_string(beta);
  }
};

// Fills a [rows, ld] stored matrix: row-length `cols` of N(0,1) values, NaN padding.
std::vector<float> stored_matrix(tu::Rng& rng, int64_t rows, int64_t cols, int64_t ld) {
  std::vector<float> v(static_cast<size_t>(std::max<int64_t>(rows * ld, 1)), tu::kNaN);
  std::vector<float> values = tu::normal(rng, rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) v[r * ld + c] = values[r * cols + c];
  return v;
}

// `pad` extra elements per row in every leading dimension when `strided`.
Case make_case(tu::Rng& rng, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
               float beta, int64_t pad = 0) {
  Case t;
  t.ta = ta, t.tb = tb, t.m = m, t.n = n, t.k = k, t.alpha = alpha, t.beta = beta;
  const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k;
  const int64_t b_rows = tb ? n : k, b_cols = tb ? k : n;
  t.lda = std::max<int64_t>(1, a_cols) + pad;
  t.ldb = std::max<int64_t>(1, b_cols) + pad;
  t.ldc = std::max<int64_t>(1, n) + pad;
  t.a = stored_matrix(rng, a_rows, a_cols, t.lda);
  t.b = stored_matrix(rng, b_rows, b_cols, t.ldb);
  t.c = stored_matrix(rng, m, n, t.ldc);
  if (beta == 0.0f)  // beta == 0 must not read C: poison it
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) t.c[i * t.ldc + j] = tu::kNaN;
  return t;
}

std::vector<float> run(const Case& t) {
  std::vector<float> c = t.c;
  ppo::cpu::matmul(t.ta, t.tb, t.m, t.n, t.k, t.alpha, t.a.data(), t.lda, t.b.data(), t.ldb,
                   t.beta, c.data(), t.ldc);
  return c;
}

// Compares against the float64 reference. Tolerance: the float32 kernel rounds each of
// its k fma steps (plus the block combine and the alpha/beta step) to 2^-24 relative of
// a partial sum; a partial sum is bounded by sum_p |a||b|, and for random-sign data the
// rounding errors largely cancel (they grow ~ sqrt(k) u, ~3e-6 at k = 3072 in the worst
// sign pattern this data produces), so
//   |err| <= 1e-5 * (|alpha| * sum_p |a_ip||b_pj| + |beta| |c_ij|) + 1e-6
// is loose enough for every shape here yet far below the size of any one missing or
// doubled term (~|a||b| ~ 0.6 on average). Padding (NaN) around C must stay untouched.
void check_case(const Case& t) {
  const std::vector<float> got = run(t);
  const std::string what = t.name();
  for (int64_t i = 0; i < t.m; ++i) {
    for (int64_t j = 0; j < t.n; ++j) {
      double sum = 0.0, magnitude = 0.0;
      for (int64_t p = 0; p < t.k; ++p) {
        const double prod = t.op_a(i, p) * t.op_b(p, j);
        sum += prod;
        magnitude += std::fabs(prod);
      }
      double want = t.alpha * sum;
      double scale = std::fabs(t.alpha) * magnitude;
      if (t.beta != 0.0f) {
        want += static_cast<double>(t.beta) * t.c[i * t.ldc + j];
        scale += std::fabs(t.beta) * std::fabs(t.c[i * t.ldc + j]);
      }
      const double g = got[i * t.ldc + j];
      const double tol = 1e-5 * scale + 1e-6;
      ++tf::state().checks;
      if (!(std::fabs(g - want) <= tol))  // also false for NaN
        tf::report_failure(__FILE__, __LINE__,
                           what + ": C(" + std::to_string(i) + "," + std::to_string(j) + ") = " +
                               tf::fmt_double(g) + ", expected " + tf::fmt_double(want) +
                               " (tol " + tf::fmt_double(tol) + ")");
    }
    for (int64_t j = t.n; j < t.ldc; ++j)  // row padding of C is never written
      CHECK(std::isnan(got[i * t.ldc + j]) || got[i * t.ldc + j] == t.c[i * t.ldc + j]);
  }
}

const bool kTransposes[2] = {false, true};

}  // namespace

TEST(matmul_small_and_odd_shapes_all_transposes) {
  tu::Rng rng(1);
  const int64_t shapes[][3] = {{1, 1, 1},  {1, 1, 7},  {7, 1, 1},   {1, 9, 1},   {2, 3, 4},
                               {7, 13, 5}, {5, 7, 13}, {16, 16, 16}, {8, 48, 1},  {9, 49, 3},
                               {7, 47, 2}, {6, 16, 9}, {13, 17, 31}, {33, 65, 17}, {1, 100, 300},
                               {100, 1, 300}, {3, 200, 2}};
  for (const auto& s : shapes)
    for (bool ta : kTransposes)
      for (bool tb : kTransposes) check_case(make_case(rng, ta, tb, s[0], s[1], s[2], 1.0f, 0.0f));
}

TEST(matmul_tile_and_block_edges) {
  // Sizes around the tile widths (8/48, 6/16, 4/16) and the k/row/column block limits
  // (256 deep, 256 rows, 2304 columns), so every edge case of the blocking is crossed.
  tu::Rng rng(2);
  const int64_t shapes[][3] = {{8, 48, 256},  {9, 49, 257},  {15, 95, 255},  {24, 96, 513},
                               {257, 33, 40}, {6, 2305, 3},  {31, 17, 600},  {47, 63, 129},
                               {65, 150, 70}, {12, 32, 1000}};
  for (const auto& s : shapes)
    for (bool ta : kTransposes)
      for (bool tb : kTransposes) check_case(make_case(rng, ta, tb, s[0], s[1], s[2], 1.0f, 0.0f));
}

TEST(matmul_transformer_sized) {
  // The GPT-2 layer shapes at a reduced row count (forward, dX = dY W^T, dW = X^T dY).
  tu::Rng rng(3);
  check_case(make_case(rng, false, false, 128, 768, 768, 1.0f, 0.0f));
  check_case(make_case(rng, false, true, 64, 768, 1000, 1.0f, 0.0f));
  check_case(make_case(rng, true, false, 200, 96, 128, 1.0f, 1.0f));
  check_case(make_case(rng, true, true, 96, 130, 384, 1.0f, 0.0f));
}

TEST(matmul_alpha_beta) {
  tu::Rng rng(4);
  const float alphas[] = {1.0f, -0.5f, 2.0f};
  const float betas[] = {0.0f, 1.0f, 0.5f, -2.0f};
  for (float alpha : alphas)
    for (float beta : betas)
      for (bool ta : kTransposes)
        for (bool tb : kTransposes) {
          check_case(make_case(rng, ta, tb, 19, 53, 11, alpha, beta));
          check_case(make_case(rng, ta, tb, 40, 100, 300, alpha, beta));  // 2 k blocks
        }
}

TEST(matmul_strided_leading_dimensions) {
  tu::Rng rng(5);
  const int64_t shapes[][3] = {{1, 1, 1}, {7, 13, 5}, {33, 65, 17}, {50, 97, 260}};
  const int64_t pads[] = {1, 5, 64};
  for (const auto& s : shapes)
    for (int64_t pad : pads)
      for (bool ta : kTransposes)
        for (bool tb : kTransposes) {
          check_case(make_case(rng, ta, tb, s[0], s[1], s[2], 1.0f, 0.0f, pad));
          check_case(make_case(rng, ta, tb, s[0], s[1], s[2], 0.75f, 1.0f, pad));
        }
}

TEST(matmul_beta_zero_ignores_nan_in_c) {
  tu::Rng rng(6);
  for (bool ta : kTransposes)
    for (bool tb : kTransposes) {
      Case t = make_case(rng, ta, tb, 37, 70, 45, 1.5f, 0.0f);  // C is NaN-poisoned
      std::vector<float> got = run(t);
      bool all_finite = true;
      for (int64_t i = 0; i < t.m; ++i)
        for (int64_t j = 0; j < t.n; ++j) all_finite = all_finite && std::isfinite(got[i * t.ldc + j]);
      CHECK(all_finite);
      check_case(t);
    }
}

TEST(matmul_beta_one_accumulates) {
  // Two calls with beta = 1 add up: C = A1 B1 + A2 B2, as a split-k caller would do.
  tu::Rng rng(7);
  const int64_t m = 21, n = 50, k = 33;
  Case first = make_case(rng, false, false, m, n, k, 1.0f, 0.0f);
  Case second = make_case(rng, false, true, m, n, k, 1.0f, 1.0f);
  std::vector<float> c = run(first);
  second.c = c;
  check_case(second);
}

TEST(matmul_k_zero_and_alpha_zero_scale_c) {
  tu::Rng rng(8);
  std::vector<float> c = tu::normal(rng, 6 * 5), original = c;
  const float dummy = 0.0f;
  // k == 0: C = beta * C, A and B never read (null is allowed).
  ppo::cpu::matmul(false, false, 6, 5, 0, 1.0f, nullptr, 1, nullptr, 5, 2.0f, c.data(), 5);
  for (size_t i = 0; i < c.size(); ++i) CHECK(c[i] == 2.0f * original[i]);
  std::vector<float> poisoned = tu::poisoned(6 * 5);
  ppo::cpu::matmul(true, true, 6, 5, 0, 1.0f, &dummy, 6, &dummy, 1, 0.0f, poisoned.data(), 5);
  for (float v : poisoned) CHECK(v == 0.0f);
  // alpha == 0: C = beta * C without reading A or B (NaN there does not propagate).
  std::vector<float> nan_a = tu::poisoned(6 * 4), nan_b = tu::poisoned(4 * 5);
  c = original;
  ppo::cpu::matmul(false, false, 6, 5, 4, 0.0f, nan_a.data(), 4, nan_b.data(), 5, 1.0f, c.data(), 5);
  CHECK_BITWISE_EQUAL(c.data(), original.data(), 30, "alpha=0 beta=1");
  // Empty outputs are no-ops.
  CHECK_NO_THROW(ppo::cpu::matmul(false, false, 0, 5, 3, 1.0f, nullptr, 3, nullptr, 5, 0.0f, nullptr, 5));
  CHECK_NO_THROW(ppo::cpu::matmul(false, false, 4, 0, 3, 1.0f, nullptr, 3, nullptr, 1, 0.0f, nullptr, 1));
}

TEST(matmul_nan_and_inf_in_inputs_propagate) {
  tu::Rng rng(9);
  Case t = make_case(rng, false, false, 10, 60, 20, 1.0f, 0.0f);
  t.a[3 * t.lda + 7] = tu::kNaN;   // row 3 of C becomes NaN
  t.b[5 * t.ldb + 50] = tu::kInf;  // column 50 of C becomes +-inf (or NaN in row 3)
  std::vector<float> got = run(t);
  for (int64_t j = 0; j < t.n; ++j) CHECK(std::isnan(got[3 * t.ldc + j]));
  for (int64_t i = 0; i < t.m; ++i)
    if (i != 3) CHECK(std::isinf(got[i * t.ldc + 50]) || t.a[i * t.lda + 5] == 0.0f);
  CHECK(std::isfinite(got[0 * t.ldc + 49]));
}

TEST(matmul_bit_identical_across_runs_and_splits) {
  // Same call twice: identical bits. And computing C in column slices and row slices
  // (separate calls, hence different tile grids and thread splits) gives the same bits
  // as the whole: each element's k-sum order does not depend on how C is divided.
  tu::Rng rng(10);
  for (bool ta : kTransposes)
    for (bool tb : kTransposes) {
      const int64_t m = 70, n = 333, k = 600;
      Case t = make_case(rng, ta, tb, m, n, k, 0.5f, 0.25f);
      std::vector<float> first = run(t), second = run(t);
      CHECK_BITWISE_EQUAL(first.data(), second.data(), static_cast<int64_t>(first.size()), "rerun");

      std::vector<float> by_columns = t.c;
      const int64_t col_cuts[] = {0, 1, 50, 51, 200, n};
      for (int ci = 0; ci + 1 < 6; ++ci) {
        const int64_t j0 = col_cuts[ci], j1 = col_cuts[ci + 1];
        const float* b_slice = tb ? &t.b[j0 * t.ldb] : &t.b[j0];
        ppo::cpu::matmul(ta, tb, m, j1 - j0, k, t.alpha, t.a.data(), t.lda, b_slice, t.ldb, t.beta,
                         &by_columns[j0], t.ldc);
      }
      CHECK_BITWISE_EQUAL(by_columns.data(), first.data(), static_cast<int64_t>(first.size()),
                          "column slices");

      std::vector<float> by_rows = t.c;
      const int64_t row_cuts[] = {0, 3, 4, 37, m};
      for (int ri = 0; ri + 1 < 5; ++ri) {
        const int64_t i0 = row_cuts[ri], i1 = row_cuts[ri + 1];
        const float* a_slice = ta ? &t.a[i0] : &t.a[i0 * t.lda];
        ppo::cpu::matmul(ta, tb, i1 - i0, n, k, t.alpha, a_slice, t.lda, t.b.data(), t.ldb, t.beta,
                         &by_rows[i0 * t.ldc], t.ldc);
      }
      CHECK_BITWISE_EQUAL(by_rows.data(), first.data(), static_cast<int64_t>(first.size()),
                          "row slices");
    }
}

// ---- The small-m path (m <= 8, or <= 16 with B transposed: the decode step) ----------

TEST(matmul_small_m_against_reference) {
  // m on both sides of the path's limits (8, and 16 for B transposed), n and k across the
  // kernels' strip widths (8, 16, 32, 48, 64 columns) and k steps per transpose (8, 16),
  // n = 1, and k over one block (256) with a tail in each block (257 = 129 + 128).
  tu::Rng rng(11);
  const int64_t nk[][2] = {{1, 1},   {1, 37},  {5, 16},   {17, 15},  {16, 17},
                           {33, 31}, {49, 64}, {65, 100}, {47, 257}, {130, 300}};
  for (int64_t m = 1; m <= 17; ++m)
    for (const auto& s : nk)
      for (bool ta : kTransposes)
        for (bool tb : kTransposes) check_case(make_case(rng, ta, tb, m, s[0], s[1], 1.0f, 0.0f));
}

TEST(matmul_small_m_alpha_beta_and_strides) {
  // beta = 0 with NaN-poisoned C (make_case), beta = 1 accumulation, other alpha/beta,
  // every leading dimension padded (NaN in the padding of A and B, checked untouched in C).
  tu::Rng rng(12);
  const int64_t ms[] = {1, 3, 8, 9, 16};
  const float alphas[] = {1.0f, -0.5f, 2.0f};
  const float betas[] = {0.0f, 1.0f, -2.0f};
  const int64_t pads[] = {0, 1, 7};
  for (int64_t m : ms)
    for (float alpha : alphas)
      for (float beta : betas)
        for (int64_t pad : pads)
          for (bool ta : kTransposes)
            for (bool tb : kTransposes) check_case(make_case(rng, ta, tb, m, 37, 45, alpha, beta, pad));
}

TEST(matmul_small_m_beta_one_accumulates) {
  // C = A1 B1^T + A2 B2 in two calls (beta = 1 the second time), four rows.
  tu::Rng rng(13);
  Case first = make_case(rng, false, true, 4, 70, 300, 1.0f, 0.0f);
  Case second = make_case(rng, false, false, 4, 70, 33, 1.0f, 1.0f);
  second.c = run(first);
  check_case(second);
}

TEST(matmul_small_m_bit_identical_to_many_rows) {
  // The rows of a product computed alone or in small groups (the unpacked path) have the
  // same bits as within one call of many rows (the packed path): both run the same
  // arithmetic, so a row's result does not depend on the batch it comes with.
  tu::Rng rng(14);
  for (bool ta : kTransposes)
    for (bool tb : kTransposes) {
      const int64_t m = 45, n = 83, k = 600;  // k: 3 blocks of 200, 12 steps of 16 + 8
      Case t = make_case(rng, ta, tb, m, n, k, 0.75f, -0.5f);
      const std::vector<float> whole = run(t);
      std::vector<float> by_groups = t.c;
      const int64_t cuts[] = {0, 1, 3, 11, 20, 36, m};  // groups of 1, 2, 8, 9, 16, 9 rows
      for (int g = 0; g + 1 < 7; ++g) {
        const int64_t i0 = cuts[g], i1 = cuts[g + 1];
        const float* a_slice = ta ? &t.a[i0] : &t.a[i0 * t.lda];
        ppo::cpu::matmul(ta, tb, i1 - i0, n, k, t.alpha, a_slice, t.lda, t.b.data(), t.ldb, t.beta,
                         &by_groups[i0 * t.ldc], t.ldc);
      }
      CHECK_BITWISE_EQUAL(by_groups.data(), whole.data(), static_cast<int64_t>(whole.size()),
                          (std::string(ta ? "T" : "N") + (tb ? "T" : "N") + " row groups").c_str());
    }
}

TEST(matmul_small_m_bit_identical_across_threads_and_column_splits) {
  // B large enough (4 MB > the 1 MB a thread must get) that the pool splits the columns
  // whenever PPO_MAX_THREADS > 1, against the same product in column slices small enough
  // to run on one thread, cut at widths that are no multiple of any strip: every element
  // has the same bits however the columns are divided, hence whatever the thread count
  // (run this file with PPO_MAX_THREADS=1 and 3).
  tu::Rng rng(15);
  for (bool tb : kTransposes)
    for (int64_t m : {int64_t{1}, int64_t{4}, int64_t{8}, int64_t{13}}) {
      if (m > 8 && !tb) continue;  // B not transposed: the unpacked path stops at 8 rows
      const int64_t n = 2051, k = 520;
      Case t = make_case(rng, false, tb, m, n, k, 1.0f, 0.0f);
      const std::vector<float> whole = run(t);
      std::vector<float> sliced = t.c;
      for (int64_t j0 = 0; j0 < n;) {
        const int64_t j1 = std::min(n, j0 + (j0 == 0 ? 1 : 99));
        const float* b_slice = tb ? &t.b[j0 * t.ldb] : &t.b[j0];
        ppo::cpu::matmul(false, tb, m, j1 - j0, k, t.alpha, t.a.data(), t.lda, b_slice, t.ldb,
                         t.beta, &sliced[j0], t.ldc);
        j0 = j1;
      }
      CHECK_BITWISE_EQUAL(sliced.data(), whole.data(), static_cast<int64_t>(whole.size()),
                          ("m=" + std::to_string(m) + (tb ? " NT" : " NN") + " column slices").c_str());
      check_case(t);  // and the whole product is right
    }
}

TEST(matmul_small_m_nan_and_inf_propagate) {
  tu::Rng rng(16);
  for (bool tb : kTransposes) {
    Case t = make_case(rng, false, tb, 3, 40, 20, 1.0f, 0.0f);
    t.a[1 * t.lda + 7] = tu::kNaN;                         // row 1 of C becomes NaN
    (tb ? t.b[33 * t.ldb + 5] : t.b[5 * t.ldb + 33]) = tu::kInf;  // column 33: +-inf
    std::vector<float> got = run(t);
    for (int64_t j = 0; j < t.n; ++j) CHECK(std::isnan(got[1 * t.ldc + j]));
    for (int64_t i : {int64_t{0}, int64_t{2}}) {
      CHECK(std::isinf(got[i * t.ldc + 33]));
      CHECK(std::isfinite(got[i * t.ldc + 32]));
    }
  }
}

TEST(matmul_argument_errors) {
  using ppo::ErrorCode;
  std::vector<float> a(64, 1.0f), b(64, 1.0f), c(64, 0.0f);
  auto mm = [&](bool ta, bool tb, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                int64_t ldc) {
    ppo::cpu::matmul(ta, tb, m, n, k, 1.0f, a.data(), lda, b.data(), ldb, 0.0f, c.data(), ldc);
  };
  CHECK_THROWS_CODE(mm(false, false, -1, 2, 2, 2, 2, 2), ErrorCode::InvalidArgument, "m");
  CHECK_THROWS_CODE(mm(false, false, 2, -1, 2, 2, 2, 2), ErrorCode::InvalidArgument, "n");
  CHECK_THROWS_CODE(mm(false, false, 2, 2, -3, 2, 2, 2), ErrorCode::InvalidArgument, "k");
  // A stored [m,k] needs lda >= k; transposed [k,m] needs lda >= m.
  CHECK_THROWS_CODE(mm(false, false, 2, 3, 4, 3, 3, 3), ErrorCode::InvalidArgument, "lda");
  CHECK_THROWS_CODE(mm(true, false, 5, 3, 4, 4, 3, 3), ErrorCode::InvalidArgument, "lda");
  CHECK_NO_THROW(mm(true, false, 5, 3, 4, 5, 3, 3));
  // B stored [k,n] needs ldb >= n; transposed [n,k] needs ldb >= k.
  CHECK_THROWS_CODE(mm(false, false, 2, 3, 4, 4, 2, 3), ErrorCode::InvalidArgument, "ldb");
  CHECK_THROWS_CODE(mm(false, true, 2, 3, 4, 4, 3, 3), ErrorCode::InvalidArgument, "ldb");
  CHECK_NO_THROW(mm(false, true, 2, 3, 4, 4, 4, 3));
  CHECK_THROWS_CODE(mm(false, false, 2, 3, 4, 4, 3, 2), ErrorCode::InvalidArgument, "ldc");
  CHECK_THROWS_CODE(mm(false, false, 2, 3, 4, 4, 3, 0), ErrorCode::InvalidArgument, "ldc");
  CHECK_THROWS_CODE(ppo::cpu::matmul(false, false, 2, 2, 2, 1.0f, nullptr, 2, b.data(), 2, 0.0f,
                                     c.data(), 2),
                    ErrorCode::InvalidArgument, "a");
  CHECK_THROWS_CODE(ppo::cpu::matmul(false, false, 2, 2, 2, 1.0f, a.data(), 2, nullptr, 2, 0.0f,
                                     c.data(), 2),
                    ErrorCode::InvalidArgument, "b");
  CHECK_THROWS_CODE(ppo::cpu::matmul(false, false, 2, 2, 2, 1.0f, a.data(), 2, b.data(), 2, 0.0f,
                                     nullptr, 2),
                    ErrorCode::InvalidArgument, "c");
}

int main(int argc, char** argv) {
  std::printf("matmul kernel: %s\n", ppo::cpu::matmul_isa());
  return tf::run_all(argc, argv);
}
