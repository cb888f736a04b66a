// CUDA engine parity: every op of the transformer engine's CUDA table (core/engine_ops.h,
// ppo::cuda::engine_ops()) runs on random inputs next to the CPU table
// (ppo::cpu_engine_ops()) and the two are compared; then the whole GPT-2 model
// (model/gpt.h) runs on CUDA and on the CPU from the same parameters: forward, backward,
// AdamW steps and generation.
//
//   - Inputs are random, of several shapes, odd and non-multiple-of-tile sizes included.
//   - Outputs are POISONED before each run (device buffers filled from a NaN host vector,
//     or a sentinel for integers), so an element an op leaves unwritten fails.
//   - Accumulating ops (backward passes, accumulate, scatter_add_rows, beta != 0) get a
//     random nonzero initial buffer, identical on both sides.
//   - Every op runs twice on the GPU and must give bit-identical outputs (memcmp): the
//     engine's kernels use no floating-point atomics.
//   - Each tolerance is stated where it is used, with the reason. Exact ops (copies, one
//     float add or multiply per element) must match the CPU bit for bit.
//
// Exits 77 (ctest: skipped) when ppo::cuda_available() is false. For checking this file
// itself on a machine without a GPU, PPO_PARITY_SELF_TEST=1 runs everything with the CPU
// table standing in for CUDA (and both models on the CPU); the matmul path checks
// (ppo::cuda::matmul_on_path) are skipped there.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/engine_ops.h"
#include "core/error.h"
#include "core/op_args.h"
#include "model/config.h"
#include "model/gpt.h"
#include "model/params.h"
#ifdef PPO_WITH_CUDA
#include "cuda/engine_kernels.h"
#endif
#include "test_framework.h"
#include "test_util.h"
#include "engine_test_util.h"

using ppo::Device;
using ppo::EngineOps;
using ppo::ErrorCode;

namespace {

using et::Buf;
using et::check_bits;
using et::check_close;

bool g_self_test = false;                 // PPO_PARITY_SELF_TEST=1
const EngineOps* g_gpu = nullptr;         // the CUDA table (the CPU's under self-test)
Device g_model_device = Device::Cuda;     // Device::Cpu under self-test
std::string g_default_path = "tf32";      // the path ops.matmul takes on CUDA

const EngineOps& cpu() { return ppo::cpu_engine_ops(); }
const EngineOps& gpu() { return *g_gpu; }

// ---- device buffers ------------------------------------------------------------------------


constexpr int32_t kIntPoison = -777777;  // integer outputs start as this

// ---- comparisons ---------------------------------------------------------------------------



// Named outputs of one op run; the runs on the CPU table and twice on the GPU table.
using Outs = std::map<std::string, std::vector<float>>;
struct Runs {
  Outs cpu, gpu, gpu2;
};

// Runs `f(table)` on the CPU and twice on the GPU; the GPU runs must be bit-identical.
template <typename F>
Runs run3(const std::string& what, F f) {
  Runs r;
  r.cpu = f(cpu());
  r.gpu = f(gpu());
  r.gpu2 = f(gpu());
  for (const auto& kv : r.gpu) check_bits(kv.second, r.gpu2.at(kv.first), what + " " + kv.first + " (GPU run twice)");
  return r;
}

double max_abs_d(const std::vector<float>& v) { return tu::max_abs(v); }

std::vector<float> scaled(std::vector<float> v, float s) {
  for (float& x : v) x *= s;
  return v;
}

// Random lengths in [1, T] for B rows.
std::vector<int32_t> random_lengths(tu::Rng& rng, int64_t B, int64_t T) {
  std::vector<int32_t> l(static_cast<size_t>(B));
  for (auto& x : l) x = static_cast<int32_t>(tu::rand_int(rng, 1, T));
  return l;
}

// Positions [rows]: mostly in [0, n_pos), about 1 in 5 padding (-1).
std::vector<int32_t> random_positions(tu::Rng& rng, int64_t rows, int64_t n_pos) {
  std::vector<int32_t> p(static_cast<size_t>(rows));
  for (auto& x : p) x = tu::rand_int(rng, 0, 4) == 0 ? -1 : static_cast<int32_t>(tu::rand_int(rng, 0, n_pos - 1));
  return p;
}

}  // namespace

// =============================================================================================
// memory
// =============================================================================================

TEST(engine_memory_round_trips) {
  tu::Rng rng(11);
  for (const EngineOps* ops : {&cpu(), &gpu()}) {
    const size_t sizes[] = {1, 3, 4, 64, 1000, 4099, (1u << 20) + 13};
    for (size_t bytes : sizes) {
      const std::string what = std::string(ops == &cpu() ? "cpu" : "gpu") + " " + std::to_string(bytes) + " bytes";
      std::vector<uint8_t> src(bytes), fill(bytes, 0xAB), got(bytes);
      for (auto& x : src) x = static_cast<uint8_t>(tu::rand_int(rng, 0, 255));
      void* a = ops->alloc(bytes);
      void* b = ops->alloc(bytes);
      CHECK(a != nullptr && b != nullptr);
      // host -> device -> host
      ops->copy_to_device(a, src.data(), bytes);
      ops->copy_to_host(got.data(), a, bytes);
      CHECK(std::memcmp(got.data(), src.data(), bytes) == 0);
      // device -> device, a middle range at the same offset, then a range shifted by a few
      // bytes (unaligned source and destination)
      ops->copy_to_device(b, fill.data(), bytes);
      const size_t off = bytes / 3, len = bytes - off - bytes / 5;
      ops->copy_within(static_cast<char*>(b) + off, static_cast<const char*>(a) + off, len);
      std::vector<uint8_t> want = fill;
      std::memcpy(want.data() + off, src.data() + off, len);
      ops->copy_to_host(got.data(), b, bytes);
      if (std::memcmp(got.data(), want.data(), bytes) != 0)
        tf::report_failure(__FILE__, __LINE__, what + ": copy_within (same offsets) is wrong");
      if (bytes >= 16) {
        const size_t so = 3, dof = 5, n = bytes - 8;
        ops->copy_within(static_cast<char*>(b) + dof, static_cast<const char*>(a) + so, n);
        std::memcpy(want.data() + dof, src.data() + so, n);
        ops->copy_to_host(got.data(), b, bytes);
        if (std::memcmp(got.data(), want.data(), bytes) != 0)
          tf::report_failure(__FILE__, __LINE__, what + ": copy_within (shifted) is wrong");
      }
      // zero a sub-range only
      const size_t zoff = bytes / 4, zlen = bytes / 2;
      ops->zero(static_cast<char*>(a) + zoff, zlen);
      want = src;
      std::memset(want.data() + zoff, 0, zlen);
      ops->copy_to_host(got.data(), a, bytes);
      if (std::memcmp(got.data(), want.data(), bytes) != 0)
        tf::report_failure(__FILE__, __LINE__, what + ": zero of a sub-range is wrong");
      // zero-byte calls are no-ops
      ops->copy_to_device(a, src.data(), 0);
      ops->copy_within(a, b, 0);
      ops->zero(a, 0);
      ops->copy_to_host(got.data(), a, 0);
      ops->copy_to_host(got.data(), a, bytes);
      CHECK(std::memcmp(got.data(), want.data(), bytes) == 0);
      CHECK_NO_THROW(ops->synchronize());
      ops->free(a);
      ops->free(b);
    }
    // alloc(0) may give nullptr; freeing it (or nullptr) is fine.
    void* z = ops->alloc(0);
    ops->free(z);
    ops->free(nullptr);
  }
}

// =============================================================================================
// matmul
// =============================================================================================

namespace {

constexpr float kSentinel = 4242.5f;  // C's columns past n (ldc > n) must keep it

// C = alpha op(A) op(B) + beta C with leading dimensions, possibly offset pointers.
struct MmCase {
  bool ta = false, tb = false;
  int64_t m = 0, n = 0, k = 0, lda = 1, ldb = 1, ldc = 1, off_a = 0, off_b = 0;
  float alpha = 1.0f, beta = 0.0f;
  std::vector<float> a, b, c0;  // as stored; NaN in the leading-dimension padding
};

// pad: extra floats per stored row; offset: the matrices start `offset` floats into their
// buffers (misaligned for the vector loads).
MmCase mm_case(tu::Rng& rng, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
               float beta, int64_t pad, int64_t offset) {
  MmCase c;
  c.ta = ta, c.tb = tb, c.m = m, c.n = n, c.k = k, c.alpha = alpha, c.beta = beta;
  const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k;
  const int64_t b_rows = tb ? n : k, b_cols = tb ? k : n;
  c.lda = std::max<int64_t>(1, a_cols + pad);
  c.ldb = std::max<int64_t>(1, b_cols + pad);
  c.ldc = std::max<int64_t>(1, n + pad);
  c.off_a = a_rows > 0 ? offset : 0;
  c.off_b = b_rows > 0 ? offset : 0;
  auto fill = [&](std::vector<float>& v, int64_t rows, int64_t cols, int64_t ld, int64_t off) {
    if (rows == 0 || cols == 0) return;
    v.assign(static_cast<size_t>(off + rows * ld), tu::kNaN);
    std::normal_distribution<double> d(0.0, 1.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) v[off + r * ld + j] = static_cast<float>(d(rng));
  };
  fill(c.a, a_rows, a_cols, c.lda, c.off_a);
  fill(c.b, b_rows, b_cols, c.ldb, c.off_b);
  c.c0.assign(static_cast<size_t>(std::max<int64_t>(1, m * c.ldc)), kSentinel);
  std::normal_distribution<double> d(0.0, 1.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)
      c.c0[i * c.ldc + j] = beta == 0.0f ? tu::kNaN : static_cast<float>(d(rng));
  return c;
}

// Runs the case on `ops` (path == nullptr: ops.matmul; else cuda::matmul_on_path(path)).
std::vector<float> mm_run(const EngineOps& ops, const MmCase& c, const char* path = nullptr) {
  Buf<float> a(ops, c.a), b(ops, c.b), cc(ops, c.c0);
  const float* pa = c.a.empty() ? nullptr : a.p() + c.off_a;
  const float* pb = c.b.empty() ? nullptr : b.p() + c.off_b;
  if (path == nullptr) {
    ops.matmul(c.ta, c.tb, c.m, c.n, c.k, c.alpha, pa, c.lda, pb, c.ldb, c.beta, cc.p(), c.ldc);
  } else {
#ifdef PPO_WITH_CUDA
    ppo::cuda::matmul_on_path(path, c.ta, c.tb, c.m, c.n, c.k, c.alpha, pa, c.lda, pb, c.ldb, c.beta,
                              cc.p(), c.ldc);
#endif
  }
  return cc.get();
}

// The exact product in float64 and the magnitude |alpha| sum_k |a_ik| |b_kj| of each C
// element, [m * n].
struct MmRef {
  std::vector<double> val, mag;
};
MmRef mm_ref(const MmCase& c) {
  const int64_t m = c.m, n = c.n, k = c.k;
  std::vector<double> A(static_cast<size_t>(m * k)), Bm(static_cast<size_t>(k * n)), Babs(Bm.size());
  for (int64_t i = 0; i < m; ++i)
    for (int64_t kk = 0; kk < k; ++kk)
      A[i * k + kk] = c.ta ? c.a[c.off_a + kk * c.lda + i] : c.a[c.off_a + i * c.lda + kk];
  for (int64_t kk = 0; kk < k; ++kk)
    for (int64_t j = 0; j < n; ++j) {
      Bm[kk * n + j] = c.tb ? c.b[c.off_b + j * c.ldb + kk] : c.b[c.off_b + kk * c.ldb + j];
      Babs[kk * n + j] = std::fabs(Bm[kk * n + j]);
    }
  MmRef r;
  r.val.assign(static_cast<size_t>(m * n), 0.0);
  r.mag.assign(static_cast<size_t>(m * n), 0.0);
  for (int64_t i = 0; i < m; ++i) {
    double* val = &r.val[i * n];
    double* mag = &r.mag[i * n];
    for (int64_t kk = 0; kk < k; ++kk) {
      const double aik = A[i * k + kk], aabs = std::fabs(aik);
      const double* brow = &Bm[kk * n];
      const double* babs = &Babs[kk * n];
      for (int64_t j = 0; j < n; ++j) {
        val[j] += aik * brow[j];
        mag[j] += aabs * babs[j];
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      val[j] *= c.alpha;
      mag[j] *= std::fabs(c.alpha);
      if (c.beta != 0.0f) val[j] += static_cast<double>(c.beta) * c.c0[i * c.ldc + j];
    }
  }
  return r;
}

// Relative error per unit of |alpha| sum |a||b| that each path may make:
//   tf32: tensor cores on inputs rounded to TF32 (11 significant bits, unit roundoff
//         2^-11 = 4.9e-4): each product a*b is off by at most 2 * 2^-11 = 9.8e-4 of
//         |a||b|; float accumulation adds ~2^-24 per term, so 1.25e-3 (cuBLAS's TF32
//         tensor-op math is bounded the same way);
//   bf16: inputs rounded to bfloat16 (8 significant bits, 2^-8 = 3.9e-3): 7.8e-3 per
//         product, so 8.5e-3;
//   fp32: no input rounding, only float accumulation in another order; realistic
//         accumulation errors are ~sqrt(k) 2^-24 of the magnitude: 1e-5.
// The CPU (float32, fma) is within the fp32 bound of the exact product.
double path_coeff(const std::string& path) {
  if (path == "bf16") return 8.5e-3;
  if (path == "fp32") return 1e-5;
  return 1.25e-3;  // tf32, cublas
}

// Compares one run against the exact product (coeff) and the CPU (coeff + 1e-5); the
// columns past n must still hold the sentinel, bit for bit.
void mm_check(const MmCase& c, const MmRef& r, const std::vector<float>& got,
              const std::vector<float>& cpu_out, double coeff, const std::string& what) {
  const int64_t m = c.m, n = c.n;
  std::vector<float> g(static_cast<size_t>(m * n)), cp(g.size()), pads, pads_want;
  std::vector<double> betac(g.size());
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      g[i * n + j] = got[i * c.ldc + j];
      cp[i * n + j] = cpu_out[i * c.ldc + j];
      betac[i * n + j] =
          c.beta == 0.0f ? 0.0 : std::fabs(static_cast<double>(c.beta) * c.c0[i * c.ldc + j]);
    }
    for (int64_t j = n; j < c.ldc; ++j) {
      pads.push_back(got[i * c.ldc + j]);
      pads_want.push_back(c.c0[i * c.ldc + j]);
    }
  }
  std::vector<float> ref(r.val.begin(), r.val.end());
  // (the float copy of the reference rounds it by 2^-24 relative: inside every bound)
  check_close(g, ref, [&](size_t i) { return coeff * r.mag[i] + 2.4e-7 * (betac[i] + std::fabs(r.val[i])) + 1e-30; },
              what + " vs float64");
  check_close(g, cp, [&](size_t i) { return (coeff + 1e-5) * r.mag[i] + 2.4e-7 * betac[i] + 1e-30; },
              what + " vs cpu");
  check_bits(pads, pads_want, what + " columns past n");
}

std::string mm_name(const MmCase& c) {
  return std::string(c.ta ? "T" : "N") + (c.tb ? "T" : "N") + " m" + std::to_string(c.m) + " n" +
         std::to_string(c.n) + " k" + std::to_string(c.k) + " lda" + std::to_string(c.lda) + " ldb" +
         std::to_string(c.ldb) + " ldc" + std::to_string(c.ldc) + " off" + std::to_string(c.off_a) +
         " a" + tf::fmt_double(c.alpha) + " b" + tf::fmt_double(c.beta);
}

// One case on the default path: GPU vs float64 and CPU, GPU twice bit-identical, and the
// CPU itself within the fp32 bound of float64 (a check of the check).
void mm_default(const MmCase& c) {
  const std::string what = "matmul " + mm_name(c);
  const MmRef r = mm_ref(c);
  const std::vector<float> cp = mm_run(cpu(), c);
  const std::vector<float> g = mm_run(gpu(), c);
  const std::vector<float> g2 = mm_run(gpu(), c);
  mm_check(c, r, g, cp, path_coeff(g_default_path), what + " [" + g_default_path + "]");
  check_bits(g, g2, what + " (GPU run twice)");
  std::vector<float> cpn(static_cast<size_t>(c.m * c.n));
  for (int64_t i = 0; i < c.m; ++i)
    for (int64_t j = 0; j < c.n; ++j) cpn[i * c.n + j] = cp[i * c.ldc + j];
  std::vector<float> ref(r.val.begin(), r.val.end());
  check_close(cpn, ref, [&](size_t i) { return 1e-5 * r.mag[i] + 2.4e-7 * std::fabs(r.val[i]) + 1e-30; },
              what + " cpu vs float64");
}

const int64_t kMmSizes[] = {1, 7, 33, 100, 257};
const float kAlphaBeta[][2] = {{1.0f, 0.0f}, {0.5f, 1.0f}, {-1.25f, 0.75f}, {1.0f, 1.0f}, {2.0f, 0.0f}};

}  // namespace

TEST(engine_matmul_shapes_transposes_alpha_beta) {
  tu::Rng rng(21);
  int rep = 0;
  for (int t = 0; t < 4; ++t)
    for (int64_t m : kMmSizes)
      for (int64_t n : kMmSizes)
        for (int64_t k : kMmSizes) {
          const float* ab = kAlphaBeta[rep % 5];
          const int64_t pad = rep % 3 == 0 ? 0 : tu::rand_int(rng, 1, 9);
          const int64_t offset = rep % 4 == 3 ? 1 : 0;
          mm_default(mm_case(rng, t & 1, t & 2, m, n, k, ab[0], ab[1], pad, offset));
          ++rep;
        }
}

TEST(engine_matmul_gpt2_shapes) {
  tu::Rng rng(22);
  // GPT-2 small's c_attn at B*T = 512 rows: forward (x W^T), the input gradient (dY W),
  // the weight gradient (dY^T X, accumulated into the gradient buffer: beta 1).
  mm_default(mm_case(rng, false, true, 512, 2304, 768, 1.0f, 0.0f, 0, 0));
  mm_default(mm_case(rng, false, false, 512, 768, 2304, 1.0f, 0.0f, 0, 0));
  mm_default(mm_case(rng, true, false, 2304, 768, 512, 1.0f, 1.0f, 0, 0));
}

TEST(engine_matmul_edge_cases) {
  tu::Rng rng(23);
  // k = 0 (A and B may be null): C = beta C; beta 0 turns a NaN C into exact zeros.
  for (float beta : {0.0f, 1.0f, 0.5f, 0.3f}) {
    for (int t = 0; t < 4; ++t) {
      MmCase c = mm_case(rng, t & 1, t & 2, 33, 7, 0, 1.0f, beta, 2, 0);
      const std::vector<float> cp = mm_run(cpu(), c), g = mm_run(gpu(), c);
      // One float multiply per element (or none): bit-identical to the CPU.
      check_bits(g, cp, "matmul k=0 beta=" + tf::fmt_double(beta));
      for (int64_t i = 0; i < c.m; ++i)
        for (int64_t j = 0; j < c.n; ++j)
          if (beta == 0.0f) CHECK(g[i * c.ldc + j] == 0.0f);
    }
  }
  // alpha = 0: A and B are not read (NaN there changes nothing): C = beta C.
  for (float beta : {0.0f, 0.75f}) {
    MmCase c = mm_case(rng, false, true, 9, 17, 5, 0.0f, beta, 1, 0);
    std::fill(c.a.begin(), c.a.end(), tu::kNaN);
    std::fill(c.b.begin(), c.b.end(), tu::kNaN);
    const std::vector<float> cp = mm_run(cpu(), c), g = mm_run(gpu(), c);
    check_bits(g, cp, "matmul alpha=0 beta=" + tf::fmt_double(beta));
  }
  // m = 0 or n = 0: nothing to do, C untouched.
  for (int which = 0; which < 2; ++which) {
    MmCase c = mm_case(rng, false, false, which ? 5 : 0, which ? 0 : 5, 4, 1.0f, 0.0f, 0, 0);
    const std::vector<float> g = mm_run(gpu(), c);
    check_bits(g, c.c0, "matmul m or n = 0 leaves C untouched");
  }
  // beta 0 over a NaN C with large leading dimensions and misaligned pointers, every
  // transpose combination, ld far beyond the width.
  for (int t = 0; t < 4; ++t) mm_default(mm_case(rng, t & 1, t & 2, 65, 31, 130, 1.0f, 0.0f, 37, 1));
  // Bad sizes are refused with InvalidArgument naming the argument, on both tables.
  std::vector<float> x(64, 1.0f);
  Buf<float> dx(gpu(), x);
  CHECK_THROWS_CODE(gpu().matmul(false, false, -1, 4, 4, 1.0f, dx.p(), 4, dx.p(), 4, 0.0f, dx.p(), 4),
                    ErrorCode::InvalidArgument, "m");
  CHECK_THROWS_CODE(gpu().matmul(false, false, 4, 4, 4, 1.0f, dx.p(), 3, dx.p(), 4, 0.0f, dx.p(), 4),
                    ErrorCode::InvalidArgument, "lda");
}

TEST(engine_matmul_paths) {
#ifdef PPO_WITH_CUDA
  if (g_self_test) {
    std::printf("    (self-test: the CUDA matmul paths are not checked)\n");
    return;
  }
  std::printf("    default matmul path: %s\n", ppo::cuda::matmul_path());
  tu::Rng rng(24);
  const int64_t sizes[] = {1, 33, 257};
  for (const char* path : {"tf32", "bf16", "fp32", "cublas"}) {
    if (std::string(path) == "cublas") {
      // Only in builds with cuBLAS: elsewhere it is refused with CudaUnavailable.
      MmCase probe = mm_case(rng, false, false, 2, 2, 2, 1.0f, 0.0f, 0, 0);
      try {
        mm_run(gpu(), probe, path);
      } catch (const ppo::Error& e) {
        CHECK(e.code() == ErrorCode::CudaUnavailable);
        std::printf("    (no cuBLAS in this build: path cublas not checked)\n");
        continue;
      }
    }
    const double coeff = path_coeff(path);
    int rep = 0;
    auto one = [&](const MmCase& c) {
      const std::string what = std::string("matmul_on_path ") + path + " " + mm_name(c);
      const MmRef r = mm_ref(c);
      const std::vector<float> cp = mm_run(cpu(), c);
      const std::vector<float> g = mm_run(gpu(), c, path), g2 = mm_run(gpu(), c, path);
      mm_check(c, r, g, cp, coeff, what);
      check_bits(g, g2, what + " (GPU run twice)");
    };
    for (int t = 0; t < 4; ++t)
      for (int64_t m : sizes)
        for (int64_t n : sizes)
          for (int64_t k : sizes) {
            const float* ab = kAlphaBeta[rep % 5];
            one(mm_case(rng, t & 1, t & 2, m, n, k, ab[0], ab[1], rep % 2 ? 3 : 0, rep % 3 == 2 ? 1 : 0));
            ++rep;
          }
    one(mm_case(rng, false, true, 512, 2304, 768, 1.0f, 0.0f, 0, 0));
  }
  // An unknown path is refused.
  std::vector<float> x(4, 1.0f);
  Buf<float> dx(gpu(), x);
  CHECK_THROWS_CODE(ppo::cuda::matmul_on_path("fp64", false, false, 2, 2, 1, 1.0f, dx.p(), 1, dx.p(), 2,
                                              0.0f, dx.p(), 2),
                    ErrorCode::InvalidArgument, "path");
#else
  std::printf("    (no CUDA in this build: the matmul paths are not checked)\n");
#endif
}

// =============================================================================================
// LayerNorm, GELU, residual, bias
// =============================================================================================

TEST(engine_layernorm_forward_backward) {
  tu::Rng rng(31);
  const int64_t rows_list[] = {1, 7, 33, 257};
  const int64_t ch_list[] = {1, 7, 33, 64, 100, 257, 768};
  const float eps = 1e-5f;
  int rep = 0;
  for (int64_t R : rows_list)
    for (int64_t C : ch_list) {
      // Rows with mean 0, 3 (spread 0.5) or 100 (spread 2): the mean is subtracted in float.
      const double offset = rep % 3 == 0 ? 0.0 : rep % 3 == 1 ? 3.0 : 100.0;
      const double sd = rep % 3 == 0 ? 1.0 : rep % 3 == 1 ? 0.5 : 2.0;
      ++rep;
      const std::vector<float> x = tu::normal(rng, R * C, offset, sd);
      const std::vector<float> w = tu::normal(rng, C, 1.0, 0.3), b = tu::normal(rng, C, 0.0, 0.3);
      const std::vector<float> gout = tu::normal(rng, R * C);
      const std::vector<float> gin0 = tu::normal(rng, R * C), gw0 = tu::normal(rng, C), gb0 = tu::normal(rng, C);
      const std::string what = "layernorm [" + std::to_string(R) + "," + std::to_string(C) + "]";

      // Forward on each table; the backward gets the CPU forward's mean and rstd on both
      // sides (identical inputs).
      Runs f = run3(what + " forward", [&](const EngineOps& ops) {
        Buf<float> dx(ops, x), dw(ops, w), db(ops, b);
        Buf<float> out(ops, tu::poisoned(R * C)), mean(ops, tu::poisoned(R)), rstd(ops, tu::poisoned(R));
        ops.layernorm_forward(R, C, dx.p(), dw.p(), db.p(), eps, out.p(), mean.p(), rstd.p());
        return Outs{{"out", out.get()}, {"mean", mean.get()}, {"rstd", rstd.get()}};
      });
      const std::vector<float>& mean = f.cpu["mean"];
      const std::vector<float>& rstd = f.cpu["rstd"];
      Runs bw = run3(what + " backward", [&](const EngineOps& ops) {
        Buf<float> dg(ops, gout), dx(ops, x), dw(ops, w), dm(ops, mean), dr(ops, rstd);
        Buf<float> gin(ops, gin0), gw(ops, gw0), gb(ops, gb0);
        ops.layernorm_backward(R, C, dg.p(), dx.p(), dw.p(), dm.p(), dr.p(), gin.p(), gw.p(), gb.p());
        return Outs{{"grad_in", gin.get()}, {"grad_weight", gw.get()}, {"grad_bias", gb.get()}};
      });

      // Per row: kappa = 1 + |mean| rstd, how much the float subtraction x - mean (a few
      // ulps of |mean|) costs relative to the spread; xhat in double from the CPU's stats.
      std::vector<double> kappa(R), xhat(R * C), gw_mean(R), gwx_mean(R);
      for (int64_t r = 0; r < R; ++r) {
        kappa[r] = 1.0 + std::fabs(mean[r]) * rstd[r];
        double s1 = 0, s2 = 0;
        for (int64_t c = 0; c < C; ++c) {
          xhat[r * C + c] = (static_cast<double>(x[r * C + c]) - mean[r]) * rstd[r];
          s1 += std::fabs(static_cast<double>(w[c]) * gout[r * C + c]);
          s2 += std::fabs(static_cast<double>(w[c]) * gout[r * C + c] * xhat[r * C + c]);
        }
        gw_mean[r] = s1 / C;
        gwx_mean[r] = s2 / C;
      }
      // Forward: float math on O(1) values, ~1e-6 of |w| (|xhat| + kappa) + |b|; 1e-5 of it.
      check_close(f.gpu["out"], f.cpu["out"], [&](size_t i) {
        const int64_t r = static_cast<int64_t>(i) / C, c = static_cast<int64_t>(i) % C;
        return 1e-5 * (std::fabs(w[c]) * (std::fabs(xhat[i]) + kappa[r]) + std::fabs(b[c]));
      }, what + " out");
      // mean: a float or double sum of C terms in another order: 1e-5 of max |x| of the row.
      std::vector<double> rowmax(R, 0.0);
      for (int64_t i = 0; i < R * C; ++i) rowmax[i / C] = std::max(rowmax[i / C], std::fabs(double(x[i])));
      check_close(f.gpu["mean"], mean, [&](size_t r) { return 1e-5 * rowmax[r]; }, what + " mean");
      // rstd: the variance inherits the mean's error: 1e-5 kappa relative.
      check_close(f.gpu["rstd"], rstd, [&](size_t r) { return 1e-5 * kappa[r] * rstd[r]; }, what + " rstd");
      // grad_in = rstd (w g - mean(w g) - xhat mean(w g xhat)) added to the initial value:
      // 1e-5 of the terms' magnitudes (kappa for xhat's error) plus the initial value.
      check_close(bw.gpu["grad_in"], bw.cpu["grad_in"], [&](size_t i) {
        const int64_t r = static_cast<int64_t>(i) / C, c = static_cast<int64_t>(i) % C;
        const double terms = std::fabs(static_cast<double>(w[c]) * gout[i]) + gw_mean[r] +
                             std::fabs(xhat[i]) * gwx_mean[r];
        return 1e-5 * (std::fabs(gin0[i]) + rstd[r] * kappa[r] * terms);
      }, what + " grad_in");
      // Parameter gradients: sums over the rows in another order (float partials): 2e-5 of
      // the sum of |terms| (a sequential float sum of 257 terms is off by at most 1.5e-5).
      std::vector<double> sw(C, 0.0), sb(C, 0.0);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < C; ++c) {
          sw[c] += std::fabs(gout[r * C + c]) * (std::fabs(xhat[r * C + c]) + kappa[r] - 1.0);
          sb[c] += std::fabs(gout[r * C + c]);
        }
      check_close(bw.gpu["grad_weight"], bw.cpu["grad_weight"],
                  [&](size_t c) { return 2e-5 * (std::fabs(gw0[c]) + sw[c]); }, what + " grad_weight");
      check_close(bw.gpu["grad_bias"], bw.cpu["grad_bias"],
                  [&](size_t c) { return 2e-5 * (std::fabs(gb0[c]) + sb[c]); }, what + " grad_bias");
    }
}

TEST(engine_gelu_forward_backward) {
  tu::Rng rng(32);
  const int64_t sizes[] = {1, 7, 33, 1000, 4097, 100003};
  const float specials[] = {0.0f, -0.0f, 1e-3f, -1e-3f, 0.5f, -0.5f, 3.0f, -3.0f, 5.0f, -5.0f,
                            8.0f, -8.0f, 10.0f, -10.0f, 20.0f, -20.0f, 50.0f, -50.0f};
  for (int64_t n : sizes) {
    std::vector<float> x = tu::normal(rng, n, 0.0, 2.0);
    for (int64_t i = 0; i < n && i < 18; ++i) x[i] = specials[i];
    const std::vector<float> g = tu::normal(rng, n), gin0 = tu::normal(rng, n);
    const std::string what = "gelu n=" + std::to_string(n);
    Runs r = run3(what, [&](const EngineOps& ops) {
      Buf<float> dx(ops, x), out(ops, tu::poisoned(n)), dg(ops, g), gin(ops, gin0);
      ops.gelu_forward(n, dx.p(), out.p());
      ops.gelu_backward(n, dx.p(), dg.p(), gin.p());
      // in place (out == in) gives the same values
      Buf<float> inplace(ops, x);
      ops.gelu_forward(n, inplace.p(), inplace.p());
      return Outs{{"out", out.get()}, {"grad_in", gin.get()}, {"in_place", inplace.get()}};
    });
    // Forward: tanh-based formula, a few ulps (1e-5 relative), plus ~1e-6 |x| absolute
    // where 1 + tanh cancels (x << 0, the result near 0).
    check_close(r.gpu["out"], r.cpu["out"],
                [&](size_t i) { return 1e-5 * std::fabs(r.cpu["out"][i]) + 1e-6 * std::fabs(x[i]) + 1e-30; },
                what + " out");
    check_bits(r.gpu["in_place"], r.gpu["out"], what + " in place vs out of place");
    // Backward: gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 0.044715 x^2);
    // 1 - t^2 carries ~1e-7 absolute error, times |x| (1 + 0.134 x^2) (x capped at 8: beyond,
    // tanh is +-1 in float and both give exactly 0 or 1).
    check_close(r.gpu["grad_in"], r.cpu["grad_in"], [&](size_t i) {
      const double xc = std::min(8.0, std::fabs(static_cast<double>(x[i])));
      return 1e-5 * std::fabs(r.cpu["grad_in"][i]) +
             1e-6 * (std::fabs(gin0[i]) + std::fabs(g[i]) * (1.0 + xc) * (1.0 + 0.134 * xc * xc));
    }, what + " grad_in");
  }
}

TEST(engine_add_accumulate_bias_scale) {
  tu::Rng rng(33);
  const int64_t sizes[] = {1, 7, 33, 1000, 4097, 100003};
  for (int64_t n : sizes) {
    const std::vector<float> a = tu::normal(rng, n), b = tu::normal(rng, n, 0.0, 10.0);
    const std::string what = "n=" + std::to_string(n);
    // One IEEE float add or multiply per element: bit-identical to the CPU.
    Runs r = run3(what, [&](const EngineOps& ops) {
      Buf<float> da(ops, a), db(ops, b), out(ops, tu::poisoned(n));
      ops.add(n, da.p(), db.p(), out.p());
      Buf<float> ia(ops, a), ib(ops, b);
      ops.add(n, ia.p(), db.p(), ia.p());  // out == a
      ops.add(n, da.p(), ib.p(), ib.p());  // out == b
      Buf<float> y(ops, b);
      ops.accumulate(n, da.p(), y.p());
      Outs o{{"add", out.get()}, {"add_in_a", ia.get()}, {"add_in_b", ib.get()}, {"accumulate", y.get()}};
      for (float f : {0.37f, -2.0f, 0.0f}) {
        Buf<float> s(ops, a);
        ops.scale_in_place(n, s.p(), f);
        o["scale " + tf::fmt_double(f)] = s.get();
      }
      return o;
    });
    for (const auto& kv : r.gpu) check_bits(kv.second, r.cpu[kv.first], what + " " + kv.first + " vs cpu");
    check_bits(r.gpu["add_in_a"], r.gpu["add"], what + " add with out == a");
    check_bits(r.gpu["add_in_b"], r.gpu["add"], what + " add with out == b");
  }
  // add_bias (one add: exact) and bias_backward (a sum over rows: 2e-5 of the sum of |terms|).
  const int64_t shapes[][2] = {{1, 1}, {7, 7}, {33, 64}, {257, 100}, {1024, 33}, {512, 2304}, {3, 3072}};
  for (auto& s : shapes) {
    const int64_t R = s[0], C = s[1];
    const std::vector<float> x = tu::normal(rng, R * C), bias = tu::normal(rng, C);
    const std::vector<float> g = tu::normal(rng, R * C), gb0 = tu::normal(rng, C);
    const std::string what = "bias [" + std::to_string(R) + "," + std::to_string(C) + "]";
    Runs r = run3(what, [&](const EngineOps& ops) {
      Buf<float> out(ops, x), db(ops, bias), dg(ops, g), gb(ops, gb0);
      ops.add_bias(R, C, db.p(), out.p());
      ops.bias_backward(R, C, dg.p(), gb.p());
      return Outs{{"add_bias", out.get()}, {"bias_backward", gb.get()}};
    });
    check_bits(r.gpu["add_bias"], r.cpu["add_bias"], what + " add_bias vs cpu");
    std::vector<double> sabs(C, 0.0);
    for (int64_t i = 0; i < R * C; ++i) sabs[i % C] += std::fabs(g[i]);
    check_close(r.gpu["bias_backward"], r.cpu["bias_backward"],
                [&](size_t c) { return 2e-5 * (std::fabs(gb0[c]) + sabs[c]); }, what + " bias_backward");
  }
}

// =============================================================================================
// embeddings and the row ops of the heads
// =============================================================================================

TEST(engine_embedding_forward_backward) {
  tu::Rng rng(41);
  const int64_t shapes[][3] = {// rows, channels, vocab (5: many repeated ids)
                               {1, 1, 97}, {7, 7, 97}, {33, 64, 5}, {257, 100, 97}, {257, 768, 5}, {64, 33, 1}};
  const int64_t n_pos = 64;
  int rep = 0;
  for (auto& s : shapes) {
    const int64_t R = s[0], C = s[1], V = s[2];
    std::vector<int32_t> tokens = tu::tokens(rng, R, V);
    std::vector<int32_t> positions = random_positions(rng, R, n_pos);
    if (R > 1) positions[0] = -1;
    // Padding rows hold ids far outside the vocabulary: they must never be read.
    for (int64_t r = 0; r < R; ++r)
      if (positions[r] < 0) tokens[r] = r % 2 ? -7 : 1 << 30;
    const std::vector<float> wte = tu::normal(rng, V * C), wpe = tu::normal(rng, n_pos * C);
    std::vector<float> g = tu::normal(rng, R * C);
    // The gradient of padding rows is never read (NaN there changes nothing).
    for (int64_t r = 0; r < R; ++r)
      if (positions[r] < 0)
        for (int64_t c = 0; c < C; ++c) g[r * C + c] = tu::kNaN;
    const std::vector<float> gwte0 = tu::normal(rng, V * C), gwpe0 = tu::normal(rng, n_pos * C);
    const bool with_wpe = rep++ % 3 != 2;  // grad_wpe may be nullptr
    const std::string what = "embedding [" + std::to_string(R) + "," + std::to_string(C) + "] V=" + std::to_string(V);
    Runs r = run3(what, [&](const EngineOps& ops) {
      Buf<int32_t> dt(ops, tokens), dp(ops, positions);
      Buf<float> dwte(ops, wte), dwpe(ops, wpe), out(ops, tu::poisoned(R * C));
      ops.embedding_forward(R, C, dt.p(), dp.p(), dwte.p(), dwpe.p(), out.p());
      Buf<float> dg(ops, g), gwte(ops, gwte0), gwpe(ops, gwpe0);
      ops.embedding_backward(R, C, dg.p(), dt.p(), dp.p(), gwte.p(), with_wpe ? gwpe.p() : nullptr);
      return Outs{{"out", out.get()}, {"grad_wte", gwte.get()}, {"grad_wpe", gwpe.get()}};
    });
    // Forward: one float add per element (0 at padding): bit-identical.
    check_bits(r.gpu["out"], r.cpu["out"], what + " out vs cpu");
    for (int64_t i = 0; i < R * C; ++i)
      if (positions[i / C] < 0) CHECK(r.gpu["out"][i] == 0.0f);
    // Backward: repeated ids sum in another order: 2e-5 of the sum of |terms| (+ initial).
    std::vector<double> ste(V * C, 0.0), spe(n_pos * C, 0.0);
    for (int64_t row = 0; row < R; ++row) {
      if (positions[row] < 0) continue;
      for (int64_t c = 0; c < C; ++c) {
        ste[tokens[row] * C + c] += std::fabs(g[row * C + c]);
        spe[positions[row] * C + c] += std::fabs(g[row * C + c]);
      }
    }
    check_close(r.gpu["grad_wte"], r.cpu["grad_wte"],
                [&](size_t i) { return 2e-5 * (std::fabs(gwte0[i]) + ste[i]); }, what + " grad_wte");
    check_close(r.gpu["grad_wpe"], r.cpu["grad_wpe"],
                [&](size_t i) { return 2e-5 * (std::fabs(gwpe0[i]) + spe[i]); }, what + " grad_wpe");
    if (!with_wpe) check_bits(r.gpu["grad_wpe"], gwpe0, what + " grad_wpe untouched when nullptr");
  }
}

TEST(engine_gather_scatter_zero_padded_rows) {
  tu::Rng rng(42);
  const int64_t shapes[][2] = {{1, 1}, {7, 7}, {33, 64}, {257, 100}, {100, 768}};
  for (auto& s : shapes) {
    const int64_t R = s[0], C = s[1], src_rows = 50, dst_rows = 300;
    const std::string what = "rows [" + std::to_string(R) + "," + std::to_string(C) + "]";
    // gather: any indices (repeats allowed); scatter_add: distinct indices.
    std::vector<int64_t> gidx(R), perm(dst_rows), sidx(R);
    for (auto& v : gidx) v = tu::rand_int(rng, 0, src_rows - 1);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::copy(perm.begin(), perm.begin() + R, sidx.begin());
    const std::vector<float> src = tu::normal(rng, src_rows * C), rows = tu::normal(rng, R * C);
    const std::vector<float> dst0 = tu::normal(rng, dst_rows * C);
    std::vector<int32_t> positions = random_positions(rng, R, 64);
    std::vector<float> data = tu::normal(rng, R * C);
    for (int64_t r = 0; r < R; ++r)
      if (positions[r] < 0)
        for (int64_t c = 0; c < C; ++c) data[r * C + c] = tu::kNaN;
    Runs r = run3(what, [&](const EngineOps& ops) {
      Buf<int64_t> dg(ops, gidx), ds(ops, sidx);
      Buf<int32_t> dp(ops, positions);
      Buf<float> dsrc(ops, src), out(ops, tu::poisoned(R * C)), drows(ops, rows), dst(ops, dst0), dd(ops, data);
      ops.gather_rows(R, C, dg.p(), dsrc.p(), out.p());
      ops.scatter_add_rows(R, C, ds.p(), drows.p(), dst.p());
      ops.zero_padded_rows(R, C, dp.p(), dd.p());
      return Outs{{"gather", out.get()}, {"scatter_add", dst.get()}, {"zero_padded", dd.get()}};
    });
    // Copies and one add per element: bit-identical to the CPU.
    for (const auto& kv : r.gpu) check_bits(kv.second, r.cpu[kv.first], what + " " + kv.first + " vs cpu");
    std::vector<float> want = data;
    for (int64_t i = 0; i < R * C; ++i)
      if (positions[i / C] < 0) want[i] = 0.0f;
    check_bits(r.gpu["zero_padded"], want, what + " zero_padded_rows: padding 0, the rest untouched");
  }
}

TEST(engine_value_head_forward_backward) {
  tu::Rng rng(43);
  const int64_t shapes[][2] = {{1, 1}, {7, 7}, {33, 64}, {257, 100}, {100, 768}};
  for (auto& s : shapes) {
    const int64_t R = s[0], C = s[1];
    const std::string what = "value head [" + std::to_string(R) + "," + std::to_string(C) + "]";
    std::vector<int32_t> positions = random_positions(rng, R, 64);
    std::vector<float> x = tu::normal(rng, R * C);
    std::vector<float> xnan = x;  // forward: padding rows of x are never read
    for (int64_t r = 0; r < R; ++r)
      if (positions[r] < 0)
        for (int64_t c = 0; c < C; ++c) xnan[r * C + c] = tu::kNaN;
    const std::vector<float> w = tu::normal(rng, C);
    std::vector<float> g = tu::normal(rng, R);
    for (int64_t r = 0; r < R; ++r)
      if (positions[r] < 0) g[r] = 0.0f;  // the backward's contract: 0 at padding
    const std::vector<float> gx0 = tu::normal(rng, R * C), gw0 = tu::normal(rng, C);
    Runs r = run3(what, [&](const EngineOps& ops) {
      Buf<float> dx(ops, xnan), dx2(ops, x), dw(ops, w), dg(ops, g), out(ops, tu::poisoned(R));
      Buf<int32_t> dp(ops, positions);
      ops.value_head_forward(R, C, dx.p(), dw.p(), dp.p(), out.p());
      Buf<float> gx(ops, gx0), gw(ops, gw0);
      ops.value_head_backward(R, C, dg.p(), dx2.p(), dw.p(), gx.p(), gw.p());
      return Outs{{"out", out.get()}, {"grad_x", gx.get()}, {"grad_w", gw.get()}};
    });
    std::vector<double> sabs(R, 0.0), swabs(C, 0.0);
    for (int64_t i = 0; i < R * C; ++i) {
      sabs[i / C] += std::fabs(static_cast<double>(x[i]) * w[i % C]);
      swabs[i % C] += std::fabs(static_cast<double>(g[i / C]) * x[i]);
    }
    // Forward: the contract accumulates in double, so both are the same double sum (up to
    // ~1e-16 of sum |x w|) rounded once to float: at most 1 ulp (2^-23) apart.
    check_close(r.gpu["out"], r.cpu["out"],
                [&](size_t i) { return 2.4e-7 * std::fabs(r.cpu["out"][i]) + 1e-12 * sabs[i] + 1e-30; },
                what + " out");
    for (int64_t i = 0; i < R; ++i)
      if (positions[i] < 0) CHECK(r.gpu["out"][i] == 0.0f);
    // grad_x += g w: one multiply-add (fused or not): 2 ulps of the operands.
    check_close(r.gpu["grad_x"], r.cpu["grad_x"], [&](size_t i) {
      return 2.4e-7 * (std::fabs(gx0[i]) + std::fabs(static_cast<double>(g[i / C]) * w[i % C])) + 1e-30;
    }, what + " grad_x");
    // grad_w += sum over rows: 2e-5 of the sum of |terms|.
    check_close(r.gpu["grad_w"], r.cpu["grad_w"],
                [&](size_t c) { return 2e-5 * (std::fabs(gw0[c]) + swabs[c]); }, what + " grad_w");
  }
}

// =============================================================================================
// log-probs, sampling
// =============================================================================================

TEST(engine_logprobs_forward_backward) {
  tu::Rng rng(51);
  struct Shape { int64_t B, T, V; float temp; };
  const Shape shapes[] = {{1, 1, 1, 1.0f}, {2, 3, 97, 1.0f}, {3, 17, 1000, 0.7f}, {1, 4, 50257, 1.0f},
                          {4, 7, 2049, 1.3f}, {2, 5, 33, 0.7f}};
  int rep = 0;
  for (const Shape& s : shapes) {
    for (int variant = 0; variant < 2; ++variant, ++rep) {
      const int64_t B = s.B, T = s.T, V = s.V, N = B * T;
      const std::vector<float> logits = tu::normal(rng, N * V, 0.0, 2.0);
      std::vector<int32_t> tokens = tu::tokens(rng, N, V);
      std::vector<float> mask;
      if (variant == 1) {
        mask = tu::make_mask(rng, B, T, tu::MaskKind::Random);
        for (int64_t i = 0; i < N; ++i)
          if (mask[i] == 0.0f) tokens[i] = -3;  // never read
      }
      const std::vector<float> glp = tu::normal(rng, N), gh = tu::normal(rng, N);
      const bool use_glp = rep % 3 != 1, use_gh = rep % 3 != 2;
      const std::string what = "logprobs " + tu::shape_str(B, T, V) + (mask.empty() ? "" : " masked");
      Runs r = run3(what, [&](const EngineOps& ops) {
        Buf<float> dl(ops, logits), dm(ops, mask), lp(ops, tu::poisoned(N)), ent(ops, tu::poisoned(N));
        Buf<float> lp2(ops, tu::poisoned(N)), dglp(ops, glp), dgh(ops, gh), grad(ops, tu::poisoned(N * V));
        Buf<int32_t> dt(ops, tokens);
        ppo::LogprobsArgs a;
        a.batch = B, a.steps = T, a.vocab = V, a.logits = dl.p(), a.tokens = dt.p();
        a.mask = mask.empty() ? nullptr : dm.p();
        a.temperature = s.temp, a.logprobs = lp.p(), a.entropy = ent.p();
        ops.logprobs_forward(a);
        a.logprobs = lp2.p(), a.entropy = nullptr;
        ops.logprobs_forward(a);
        ppo::LogprobsBackwardArgs bw;
        bw.batch = B, bw.steps = T, bw.vocab = V, bw.logits = dl.p(), bw.tokens = dt.p();
        bw.mask = a.mask, bw.temperature = s.temp;
        bw.grad_logprobs = use_glp ? dglp.p() : nullptr;
        bw.grad_entropy = use_gh ? dgh.p() : nullptr;
        bw.grad_logits = grad.p();
        ops.logprobs_backward(bw);
        return Outs{{"logprobs", lp.get()}, {"entropy", ent.get()}, {"logprobs_no_entropy", lp2.get()},
                    {"grad_logits", grad.get()}};
      });
      // As in test_cuda_parity.cpp: each backend is within ftol = 1e-5 + 4e-7 max|z| (plus
      // 1e-5 relative) of the exact value, so within twice that of each other; the backward
      // within 1e-7 + 2 ftol (|g| + |gh|) / T (plus 1e-4 relative), doubled.
      const double zmax = tu::max_abs(logits) / s.temp;
      const double ftol = 1e-5 + 4e-7 * zmax;
      const double btol = 1e-7 + 2 * ftol * ((use_glp ? tu::max_abs(glp) : 0) + (use_gh ? tu::max_abs(gh) : 0)) / s.temp;
      for (const char* k : {"logprobs", "entropy"})
        check_close(r.gpu[k], r.cpu[k], [&](size_t i) { return 2 * ftol + 2e-5 * std::fabs(r.cpu[k][i]); },
                    what + " " + k);
      check_close(r.gpu["grad_logits"], r.cpu["grad_logits"],
                  [&](size_t i) { return 2 * btol + 2e-4 * std::fabs(r.cpu["grad_logits"][i]); },
                  what + " grad_logits");
      check_bits(r.gpu["logprobs_no_entropy"], r.gpu["logprobs"], what + " logprobs with entropy = nullptr");
      for (int64_t i = 0; i < N; ++i) {
        if (mask.empty() || mask[i] != 0.0f) continue;
        CHECK(r.gpu["logprobs"][i] == 0.0f && r.gpu["entropy"][i] == 0.0f);
        for (int64_t v = 0; v < V; ++v) CHECK(r.gpu["grad_logits"][i * V + v] == 0.0f);
      }
    }
  }
}

namespace {

struct SampleCase {
  int64_t rows = 0, vocab = 0, stride = 8;
  std::vector<float> logits;
  std::vector<int32_t> penalized, counts, active;
  std::vector<double> uniforms;
  bool greedy = false;
  float temperature = 1.0f, top_p = 1.0f, penalty = 1.0f;
  int64_t top_k = 0;
};

struct SampleOut {
  std::vector<int32_t> tokens, status;
  std::vector<float> logprobs;
};

SampleOut sample_run(const EngineOps& ops, const SampleCase& c) {
  Buf<float> dl(ops, c.logits), scratch(ops, tu::poisoned(c.rows * c.vocab)), lp(ops, tu::poisoned(c.rows));
  Buf<int32_t> dp(ops, c.penalized), dc(ops, c.counts), da(ops, c.active);
  Buf<int32_t> tok(ops, std::vector<int32_t>(c.rows, kIntPoison)), st(ops, std::vector<int32_t>(c.rows, kIntPoison));
  Buf<double> du(ops, c.uniforms);
  ppo::SampleTokensArgs a;
  a.rows = c.rows, a.vocab = c.vocab, a.logits = dl.p(), a.scratch = scratch.p();
  a.penalized = dp.p(), a.penalized_count = dc.p(), a.penalized_stride = c.stride;
  a.active = da.p(), a.uniforms = du.p(), a.greedy = c.greedy;
  a.temperature = c.temperature, a.top_p = c.top_p, a.repetition_penalty = c.penalty, a.top_k = c.top_k;
  a.tokens = tok.p(), a.logprobs = lp.p(), a.status = st.p();
  ops.sample_tokens(a);
  return {tok.get(), st.get(), lp.get()};
}

SampleCase sample_case(tu::Rng& rng, int64_t rows, int64_t vocab) {
  SampleCase c;
  c.rows = rows, c.vocab = vocab;
  c.logits = tu::normal(rng, rows * vocab, 0.0, 3.0);
  // Some rows ban part of the vocabulary (-inf), never all of it.
  for (int64_t r = 0; r < rows; r += 5)
    for (int64_t v = 1; v < vocab; ++v)
      if (tu::rand_int(rng, 0, 9) < 3) c.logits[r * vocab + v] = -tu::kInf;
  c.penalized.assign(static_cast<size_t>(rows * c.stride), 0);
  c.counts.assign(static_cast<size_t>(rows), 0);
  for (int64_t r = 0; r < rows; ++r) {
    c.counts[r] = static_cast<int32_t>(tu::rand_int(rng, 0, c.stride));
    for (int64_t j = 0; j < c.counts[r]; ++j)
      c.penalized[r * c.stride + j] =
          j > 0 && tu::rand_int(rng, 0, 3) == 0 ? c.penalized[r * c.stride + j - 1]  // a repeat
                                                : static_cast<int32_t>(tu::rand_int(rng, 0, vocab - 1));
  }
  c.active.assign(static_cast<size_t>(rows), 1);
  for (int64_t r = 3; r < rows; r += 11) c.active[r] = 0;
  c.uniforms.resize(static_cast<size_t>(rows));
  for (auto& u : c.uniforms) u = std::min(tu::rand_uniform(rng, 0.0, 1.0), 0.9999999);
  return c;
}

// log_softmax(raw row)[token] in double.
double row_logprob(const float* row, int64_t vocab, int32_t token) {
  double m = -INFINITY;
  for (int64_t v = 0; v < vocab; ++v) m = std::max(m, static_cast<double>(row[v]));
  double s = 0;
  for (int64_t v = 0; v < vocab; ++v) s += std::exp(static_cast<double>(row[v]) - m);
  return row[token] - m - std::log(s);
}

}  // namespace

TEST(engine_sample_tokens) {
  tu::Rng rng(52);
  struct Config { bool greedy; float temp; int64_t top_k; float top_p, penalty; };
  const Config configs[] = {{true, 1.0f, 0, 1.0f, 1.0f},   {true, 1.0f, 0, 1.0f, 1.3f},
                            {false, 0.7f, 40, 0.9f, 1.3f}, {false, 1.0f, 0, 1.0f, 1.0f},
                            {false, 1.2f, 0, 0.8f, 1.0f},  {false, 0.5f, 5, 1.0f, 1.1f}};
  const int64_t shapes[][2] = {{64, 1000}, {64, 97}, {8, 50257}};
  for (auto& s : shapes) {
    for (const Config& cf : configs) {
      SampleCase c = sample_case(rng, s[0], s[1]);
      c.greedy = cf.greedy, c.temperature = cf.temp, c.top_k = cf.top_k, c.top_p = cf.top_p, c.penalty = cf.penalty;
      const std::string what = "sample_tokens rows=" + std::to_string(c.rows) + " V=" + std::to_string(c.vocab) +
                               (c.greedy ? " greedy" : " T=" + tf::fmt_double(c.temperature)) + " k=" +
                               std::to_string(c.top_k) + " p=" + tf::fmt_double(c.top_p) + " pen=" +
                               tf::fmt_double(c.penalty);
      const SampleOut co = sample_run(cpu(), c), go = sample_run(gpu(), c), go2 = sample_run(gpu(), c);
      check_bits(go.tokens, go2.tokens, what + " tokens (GPU run twice)");
      check_bits(go.logprobs, go2.logprobs, what + " logprobs (GPU run twice)");
      check_bits(go.status, go2.status, what + " status (GPU run twice)");
      check_bits(go.status, co.status, what + " status vs cpu");
      // The greedy choice is exact. A draw picks the first kept token whose cumulative
      // probability exceeds u: the device's float sums differ from the CPU's by ~1e-6, so
      // a u within that of a boundary may pick the neighbour: at most 1 row in 64 (none
      // under the self-test).
      int64_t mismatches = 0;
      const double ftol = 1e-5 + 4e-7 * tu::max_abs(c.logits);
      for (int64_t r = 0; r < c.rows; ++r) {
        if (c.active[r] == 0) {  // untouched
          CHECK(go.tokens[r] == kIntPoison && go.status[r] == kIntPoison && std::isnan(go.logprobs[r]));
          continue;
        }
        CHECK(go.status[r] == 0);
        CHECK(go.tokens[r] >= 0 && go.tokens[r] < c.vocab);
        if (go.tokens[r] < 0 || go.tokens[r] >= c.vocab) continue;
        CHECK(c.logits[r * c.vocab + go.tokens[r]] != -tu::kInf);  // a banned id is never chosen
        // Its log-prob: log_softmax of the raw row (temperature 1, no penalty), as the
        // logprobs op computes it: within ftol of the float64 value.
        CHECK_NEAR_CTX(go.logprobs[r], row_logprob(&c.logits[r * c.vocab], c.vocab, go.tokens[r]), ftol, 1e-5,
                       what + " row " + std::to_string(r) + " logprob vs float64");
        if (go.tokens[r] != co.tokens[r]) {
          ++mismatches;
          continue;
        }
        CHECK_NEAR_CTX(go.logprobs[r], co.logprobs[r], 2 * ftol, 2e-5, what + " row " + std::to_string(r) + " logprob vs cpu");
      }
      const int64_t allowed = c.greedy || g_self_test ? 0 : std::max<int64_t>(1, c.rows / 64);
      CHECK_NEAR_CTX(mismatches, 0, allowed, 0, what + ": rows whose token differs from the CPU's");
    }
  }
  // Status codes: a NaN or +inf in the raw row, or every logit -inf, is 1; a penalty < 1
  // that overflows a (penalized, huge) logit to +inf is 2; the other rows are 0.
  for (bool greedy : {true, false}) {
    SampleCase c = sample_case(rng, 6, 50);
    std::fill(c.active.begin(), c.active.end(), 1);
    std::fill(c.counts.begin(), c.counts.end(), 0);
    for (int64_t v = 0; v < 50; ++v) {
      c.logits[0 * 50 + v] = static_cast<float>(tu::rand_uniform(rng, 0.5, 3.0));  // finite, not banned
      c.logits[3 * 50 + v] = -tu::kInf;
      c.logits[5 * 50 + v] = static_cast<float>(v % 7) - 3.0f;
    }
    c.logits[1 * 50 + 17] = tu::kNaN;
    c.logits[2 * 50 + 3] = tu::kInf;
    for (int64_t v = 0; v < 50; ++v) c.logits[4 * 50 + v] = 1.0f;
    c.logits[4 * 50 + 9] = 3e38f;
    c.penalized[4 * c.stride] = 9;
    c.counts[4] = 1;
    c.greedy = greedy, c.penalty = 0.5f;
    const SampleOut co = sample_run(cpu(), c), go = sample_run(gpu(), c);
    const std::vector<int32_t> want = {0, 1, 1, 1, 2, 0};
    check_bits(co.status, want, std::string("status codes on the cpu") + (greedy ? " greedy" : ""));
    check_bits(go.status, want, std::string("status codes") + (greedy ? " greedy" : ""));
    for (int64_t r : {0, 5}) CHECK(go.tokens[r] == co.tokens[r]);
  }
}

// =============================================================================================
// attention
// =============================================================================================

namespace {

// H query heads, KVH key/value heads (grouped-query attention when KVH < H), head size hs.
struct AttShape {
  int64_t B, T, H, KVH, hs;
};
const AttShape kAttShapes[] = {
    // multi-head (GPT-2: KVH == H, hs = C / H)
    {1, 1, 4, 4, 3}, {2, 17, 3, 3, 4}, {3, 64, 1, 1, 64}, {2, 130, 2, 2, 64}, {2, 200, 12, 12, 64},
    // grouped-query (Llama): groups of 4, multi-query (one kv head), groups of 3
    {2, 70, 8, 2, 16}, {2, 130, 4, 1, 64}, {2, 200, 12, 4, 64}};

}  // namespace

TEST(engine_attention_forward_backward) {
  tu::Rng rng(61);
  for (const AttShape& s : kAttShapes) {
    for (int with_lengths = 0; with_lengths < 2; ++with_lengths) {
      const int64_t B = s.B, T = s.T, H = s.H, KVH = s.KVH, hs = s.hs;
      const int64_t W = (H + 2 * KVH) * hs, C = H * hs;  // qkv and out row widths
      std::vector<int32_t> lengths;
      if (with_lengths) lengths = random_lengths(rng, B, T);
      auto len = [&](int64_t b) { return lengths.empty() ? T : lengths[b]; };
      // Valid rows N(0, 1); padded rows of qkv and grad_out hold large garbage (+-1e3),
      // which causality and the padding contract keep out of every valid result.
      std::vector<float> qkv = tu::normal(rng, B * T * W), gout = tu::normal(rng, B * T * C);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = len(b); t < T; ++t) {
          for (int64_t j = 0; j < W; ++j) qkv[(b * T + t) * W + j] = static_cast<float>(tu::rand_uniform(rng, -1e3, 1e3));
          for (int64_t j = 0; j < C; ++j) gout[(b * T + t) * C + j] = static_cast<float>(tu::rand_uniform(rng, -1e3, 1e3));
        }
      const std::vector<float> gq0 = tu::normal(rng, B * T * W);
      const std::string what = "attention (B,T,H,KVH,hs)=(" + std::to_string(B) + "," + std::to_string(T) + "," +
                               std::to_string(H) + "," + std::to_string(KVH) + "," + std::to_string(hs) + ")" +
                               (with_lengths ? " lengths" : "");
      Runs r = run3(what, [&](const EngineOps& ops) {
        Buf<int32_t> dl(ops, lengths);
        const int32_t* lp = lengths.empty() ? nullptr : dl.p();
        Buf<float> dq(ops, qkv), out(ops, tu::poisoned(B * T * C)), out_nosave(ops, tu::poisoned(B * T * C));
        // The saved buffer's size is the table's own (probabilities on the CPU, one
        // log-sum-exp per query row on CUDA).
        Buf<float> saved(ops, tu::poisoned(ops.attention_saved_floats(B, T, H)));
        ops.attention_forward(B, T, H, KVH, hs, lp, dq.p(), saved.p(), out.p());
        ops.attention_forward(B, T, H, KVH, hs, lp, dq.p(), nullptr, out_nosave.p());
        Buf<float> dg(ops, gout), gq(ops, gq0);
        ops.attention_backward(B, T, H, KVH, hs, lp, dg.p(), dq.p(), out.p(), saved.p(), gq.p());
        return Outs{{"out", out.get()}, {"out_nosave", out_nosave.get()}, {"saved", saved.get()},
                    {"grad_qkv", gq.get()}};
      });
      // Tolerance: scores are 64-term dot products and the outputs convex combinations of
      // O(1) values, in float with another summation order and exp: ~1e-6; 1e-5 absolute
      // plus 1e-4 relative.
      const std::vector<float>& co = r.cpu["out"];
      check_close(r.gpu["out"], co, [&](size_t i) { return 1e-5 + 1e-4 * std::fabs(co[i]); }, what + " out");
      check_close(r.gpu["out_nosave"], co, [&](size_t i) { return 1e-5 + 1e-4 * std::fabs(co[i]); },
                  what + " out (saved = nullptr)");
      // The gradient sums up to T such terms per element (G T in the k and v parts, for
      // groups of G = H / KVH query heads): 1e-5 of the largest contribution (at least 1)
      // plus 1e-4 relative.
      const std::vector<float>& cg = r.cpu["grad_qkv"];
      double contrib = 1.0;
      for (size_t i = 0; i < cg.size(); ++i) contrib = std::max(contrib, std::fabs(double(cg[i]) - gq0[i]));
      check_close(r.gpu["grad_qkv"], cg, [&](size_t i) { return 1e-5 * contrib + 1e-4 * std::fabs(cg[i]); },
                  what + " grad_qkv");
      // Padded rows: out exactly 0 (with or without saved), grad_qkv untouched.
      std::vector<float> pad_out, pad_out2, pad_g, pad_g0;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = len(b); t < T; ++t) {
          for (int64_t j = 0; j < C; ++j) {
            pad_out.push_back(r.gpu["out"][(b * T + t) * C + j]);
            pad_out2.push_back(r.gpu["out_nosave"][(b * T + t) * C + j]);
          }
          for (int64_t j = 0; j < W; ++j) {
            pad_g.push_back(r.gpu["grad_qkv"][(b * T + t) * W + j]);
            pad_g0.push_back(gq0[(b * T + t) * W + j]);
          }
        }
      check_bits(pad_out, std::vector<float>(pad_out.size(), 0.0f), what + " padded rows of out");
      check_bits(pad_out2, std::vector<float>(pad_out2.size(), 0.0f), what + " padded rows of out (no saved)");
      check_bits(pad_g, pad_g0, what + " padded rows of grad_qkv untouched");
    }
  }
}

TEST(engine_kv_cache_and_decode) {
  tu::Rng rng(62);
  // H query heads, KVH key/value heads of hs columns; the caches hold KVH hs per row.
  struct Shape { int64_t B, H, KVH, hs, cache_T, T_pre; };
  const Shape shapes[] = {
      // multi-head (GPT-2)
      {1, 4, 4, 3, 8, 5}, {3, 2, 2, 32, 40, 33}, {4, 12, 12, 64, 130, 100}, {5, 2, 2, 64, 70, 64},
      // grouped-query: groups of 4, multi-query, groups of 3
      {3, 8, 2, 16, 40, 33}, {4, 4, 1, 64, 70, 64}, {3, 12, 4, 64, 210, 200}};
  for (const Shape& s : shapes) {
    const int64_t B = s.B, H = s.H, KVH = s.KVH, hs = s.hs, cT = s.cache_T, Tp = s.T_pre, Tf = Tp + 2;
    const int64_t W = (H + 2 * KVH) * hs, C = H * hs, KC = KVH * hs;  // qkv, out, cache rows
    // The full sequences [B, Tf, W]; the prompts are their first L_b rows, then two
    // decoding steps feed rows L_b and L_b + 1. The last sequence (when B > 1) is finished:
    // position -1 in both steps.
    const std::vector<float> full = tu::normal(rng, B * Tf * W);
    const std::vector<int32_t> L = random_lengths(rng, B, Tp);
    std::vector<float> pre(static_cast<size_t>(B * Tp * W));
    for (int64_t b = 0; b < B; ++b)
      std::copy(full.begin() + b * Tf * W, full.begin() + (b * Tf + Tp) * W, pre.begin() + b * Tp * W);
    std::vector<std::vector<int32_t>> pos(2, std::vector<int32_t>(B));
    std::vector<std::vector<float>> step_qkv(2, std::vector<float>(B * W));
    for (int st = 0; st < 2; ++st)
      for (int64_t b = 0; b < B; ++b) {
        const bool finished = B > 1 && b == B - 1;
        pos[st][b] = finished ? -1 : L[b] + st;
        const int64_t row = std::min<int64_t>(L[b] + st, Tf - 1);
        std::copy(full.begin() + (b * Tf + row) * W, full.begin() + (b * Tf + row + 1) * W,
                  step_qkv[st].begin() + b * W);
      }
    const std::string what = "decode B=" + std::to_string(B) + " H=" + std::to_string(H) +
                             " KVH=" + std::to_string(KVH) + " hs=" + std::to_string(hs);
    Runs r = run3(what, [&](const EngineOps& ops) {
      Buf<float> dpre(ops, pre), kc(ops, tu::poisoned(B * cT * KC)), vc(ops, tu::poisoned(B * cT * KC));
      Buf<int32_t> dl(ops, L);
      ops.kv_cache_store(B, Tp, H, KVH, hs, dl.p(), dpre.p(), cT, kc.p(), vc.p());
      Outs o{{"k_prefill", kc.get()}, {"v_prefill", vc.get()}};
      for (int st = 0; st < 2; ++st) {
        Buf<int32_t> dp(ops, pos[st]);
        Buf<float> dq(ops, step_qkv[st]), out(ops, tu::poisoned(B * C));
        ops.attention_decode(B, H, KVH, hs, dp.p(), dq.p(), cT, kc.p(), vc.p(), out.p());
        o["out" + std::to_string(st)] = out.get();
      }
      o["k_cache"] = kc.get();
      o["v_cache"] = vc.get();
      // The same rows through the full forward (no padding), for the consistency check.
      Buf<float> dfull(ops, full), fout(ops, tu::poisoned(B * Tf * C));
      ops.attention_forward(B, Tf, H, KVH, hs, nullptr, dfull.p(), nullptr, fout.p());
      o["forward"] = fout.get();
      return o;
    });
    // The cache is copied, never computed: bit-identical to the CPU's, the untouched rows
    // (past each length, and the finished sequence's) still NaN.
    for (const char* k : {"k_prefill", "v_prefill", "k_cache", "v_cache"})
      check_bits(r.gpu[k], r.cpu[k], what + " " + k + " vs cpu");
    for (int64_t b = 0; b < B; ++b) {
      const int64_t written = pos[0][b] < 0 ? L[b] : L[b] + 2;
      for (int64_t t = 0; t < cT; ++t)
        for (const char* k : {"k_cache", "v_cache"}) {
          bool wrong = false;  // every column of every kv head: written iff t < written
          for (int64_t j = 0; j < KC; ++j)
            wrong = wrong || std::isnan(r.gpu[k][(b * cT + t) * KC + j]) != (t >= written);
          if (wrong)
            tf::report_failure(__FILE__, __LINE__, what + ": " + k + " row " + std::to_string(t) +
                                                       " of sequence " + std::to_string(b) + " written wrongly");
        }
    }
    // Outputs: as attention_forward (1e-5 + 1e-4 relative), 0 for finished rows; and each
    // within that of the GPU's own full forward at the same position.
    for (int st = 0; st < 2; ++st) {
      const std::string k = "out" + std::to_string(st);
      const std::vector<float>& co = r.cpu[k];
      check_close(r.gpu[k], co, [&](size_t i) { return 1e-5 + 1e-4 * std::fabs(co[i]); }, what + " " + k);
      std::vector<float> fwd(static_cast<size_t>(B * C)), got(fwd.size());
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t j = 0; j < C; ++j) {
          got[b * C + j] = r.gpu[k][b * C + j];
          fwd[b * C + j] = pos[st][b] < 0 ? 0.0f : r.gpu["forward"][(b * Tf + pos[st][b]) * C + j];
        }
        if (pos[st][b] < 0)
          for (int64_t j = 0; j < C; ++j) CHECK(r.gpu[k][b * C + j] == 0.0f);
      }
      check_close(got, fwd, [&](size_t i) { return 1e-5 + 1e-4 * std::fabs(fwd[i]); }, what + " " + k + " vs forward");
    }
  }
}

// =============================================================================================
// the optimizer
// =============================================================================================

TEST(engine_adamw_sum_of_squares) {
  tu::Rng rng(71);
  const int64_t sizes[] = {1, 7, 63, 64, 65, 1000, 100003};
  const float lr = 1e-3f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.1f;
  const int steps = 5;
  for (int64_t n : sizes) {
    for (int resumed = 0; resumed < 2; ++resumed) {
      // From zero moments at step 1, or from mid-training moments at step 11.
      const std::vector<float> p0 = tu::normal(rng, n);
      std::vector<float> m0(n, 0.0f), v0(n, 0.0f);
      if (resumed) {
        m0 = tu::normal(rng, n, 0.0, 0.1);
        for (auto& x : v0) x = static_cast<float>(std::fabs(tu::rand_uniform(rng, 1e-4, 1e-1)));
      }
      const int64_t first = resumed ? 11 : 1;
      std::vector<std::vector<float>> grads;
      for (int s = 0; s < steps; ++s) grads.push_back(tu::normal(rng, n, 0.0, s == 2 ? 1e-3 : 1.0));
      const std::string what = "adamw n=" + std::to_string(n) + (resumed ? " resumed" : "");
      Runs r = run3(what, [&](const EngineOps& ops) {
        Buf<float> p(ops, p0), m(ops, m0), v(ops, v0), g(ops, n);
        for (int s = 0; s < steps; ++s) {
          g.set(grads[s]);
          ops.adamw_update(n, p.p(), g.p(), m.p(), v.p(), lr, b1, b2, eps, wd, first + s);
        }
        return Outs{{"param", p.get()}, {"m", m.get()}, {"v", v.get()}};
      });
      // Elementwise float math (fused multiply-adds or not, correctly rounded sqrt and
      // division): a few ulps per step, adding up over the steps. m and v: 1e-6 of their
      // terms' magnitudes; the parameters: 2.4e-7 |p| per step plus 1e-5 of each step's
      // update (lr * O(1)).
      std::vector<double> gmax(n, 0.0);
      for (const auto& g : grads)
        for (int64_t i = 0; i < n; ++i) gmax[i] = std::max(gmax[i], std::fabs(double(g[i])));
      check_close(r.gpu["m"], r.cpu["m"], [&](size_t i) {
        return 1e-6 * (std::fabs(r.cpu["m"][i]) + std::fabs(m0[i]) + gmax[i]) + 1e-30;
      }, what + " m");
      check_close(r.gpu["v"], r.cpu["v"], [&](size_t i) {
        return 1e-6 * (std::fabs(r.cpu["v"][i]) + v0[i] + gmax[i] * gmax[i]) + 1e-30;
      }, what + " v");
      check_close(r.gpu["param"], r.cpu["param"], [&](size_t i) {
        return steps * (2.4e-7 * std::fabs(p0[i]) + 1e-5 * lr);
      }, what + " param");
    }
  }
  // sum_of_squares: the CPU sums in double; any order of positive terms (no cancellation)
  // with at least float partials stays within 1e-5 relative. Deterministic.
  const int64_t counts[] = {0, 1, 7, 1000, 65536, 65537, 1000003};
  int rep = 0;
  for (int64_t n : counts) {
    const double scale = rep % 3 == 0 ? 1e-3 : rep % 3 == 1 ? 1.0 : 1e3;
    ++rep;
    const std::vector<float> x = tu::normal(rng, n, 0.0, scale);
    auto run = [&](const EngineOps& ops) {
      Buf<float> d(ops, x);
      return ops.sum_of_squares(n, d.p());
    };
    const double c = run(cpu()), g = run(gpu()), g2 = run(gpu());
    double want = 0;
    for (float v : x) want += static_cast<double>(v) * v;
    CHECK_NEAR_CTX(c, want, 1e-300, 1e-10, "sum_of_squares cpu vs float64 n=" + std::to_string(n));
    CHECK_NEAR_CTX(g, c, 1e-300, 1e-5, "sum_of_squares n=" + std::to_string(n));
    CHECK(tf::same_bits(g, g2));
    if (n == 0) CHECK(g == 0.0);
  }
}

// =============================================================================================
// the whole model
// =============================================================================================

namespace {

using ppo::model::AdamWOptions;
using ppo::model::BackwardRequest;
using ppo::model::ForwardRequest;
using ppo::model::ForwardResult;
using ppo::model::GenerateOptions;
using ppo::model::GenerateResult;
using ppo::model::Model;
using ppo::model::ModelConfig;
using ppo::model::ModelOptions;
using ppo::model::ParamKind;
using ppo::model::ParamTensor;
using ppo::model::StepResult;
using ppo::model::TokenBatch;

ModelConfig engine_config() {
  ModelConfig c;
  c.vocab_size = 97;
  c.n_positions = 64;
  c.n_embd = 64;
  c.n_layer = 2;
  c.n_head = 4;
  c.layer_norm_epsilon = 1e-5;
  c.value_head = true;
  c.bos_token_id = c.eos_token_id = 96;
  return c;
}

// GPT-2's initialization from `seed`, then LayerNorm parameters and biases moved off 1 and
// 0 and the weights made O(0.1), so every parameter has a gradient worth comparing and the
// logits are spread out (distinct greedy choices).
std::vector<float> engine_params(const ModelConfig& cfg, uint64_t seed) {
  Model m(cfg, seed, ModelOptions{Device::Cpu, false});
  std::vector<float> p(m.params(), m.params() + m.parameter_count());
  tu::Rng rng(static_cast<unsigned>(seed) + 1000);
  for (const ParamTensor& t : m.layout().tensors)
    for (int64_t i = 0; i < t.numel; ++i) {
      float& x = p[t.offset + i];
      if (t.kind == ParamKind::Norm) x += static_cast<float>(tu::rand_uniform(rng, -0.3, 0.3));
      else if (t.kind == ParamKind::Bias) x = static_cast<float>(tu::rand_uniform(rng, -0.1, 0.1));
      else x = static_cast<float>(tu::rand_uniform(rng, -0.15, 0.15));
    }
  return p;
}

// A right-padded batch; padded positions hold ids outside the vocabulary.
struct Batch {
  int64_t B = 4, T = 24;
  std::vector<int32_t> tokens, lengths{24, 17, 5, 1};
  TokenBatch view() const { return {B, T, tokens.data(), lengths.data()}; }
};
Batch make_batch(tu::Rng& rng, int64_t vocab) {
  Batch b;
  b.tokens = tu::tokens(rng, b.B * b.T, vocab);
  for (int64_t i = 0; i < b.B; ++i)
    for (int64_t t = b.lengths[i]; t < b.T; ++t) b.tokens[i * b.T + t] = t % 2 ? -5 : 12345;
  return b;
}

struct Fwd {
  std::vector<float> logits, logprobs, entropy, values;
  double lm_loss = 0;
  int64_t lm_tokens = 0;
};

Fwd model_forward(Model& m, const Batch& b, bool retain, const std::vector<float>* target_mask) {
  const int64_t N = b.B * b.T, V = m.config().vocab_size;
  Fwd f{tu::poisoned(N * V), tu::poisoned(N), tu::poisoned(N), tu::poisoned(N)};
  ForwardRequest req;
  req.logits = f.logits.data();
  req.logprobs = f.logprobs.data();
  req.entropy = f.entropy.data();
  req.values = f.values.data();
  req.target_mask = target_mask ? target_mask->data() : nullptr;
  req.lm_loss = true;
  req.retain = retain;
  const ForwardResult r = m.forward(b.view(), req);
  f.lm_loss = r.lm_loss;
  f.lm_tokens = r.lm_tokens;
  return f;
}

std::vector<float> host_copy(const float* p, int64_t n) {
  return p ? std::vector<float>(p, p + n) : std::vector<float>();
}

// |gpu - cpu| <= rel * max |cpu| over the array: TF32 matmuls err relative to the
// magnitudes that flow through them, so a tensor's error scales with its largest entries.
void check_scaled(const std::vector<float>& g, const std::vector<float>& c, double rel, const std::string& what) {
  const double tol = rel * max_abs_d(c) + 1e-30;
  check_close(g, c, [&](size_t) { return tol; }, what);
}

// Model-level tolerances (TF32 matmuls on CUDA; under the self-test both sides are the
// CPU and agree exactly):
//   TF32 rounds every matmul input to 11 significant bits (2^-11 = 4.9e-4 relative), so
//   each product is off by up to ~1e-3 of its operands' magnitudes; through two blocks,
//   attention's softmax and the LM head, the outputs carry ~5e-4 relative errors: 2e-3 of
//   each output's largest magnitude for the forward, 5e-3 for the gradients (the
//   backward multiplies through both the activations' and the weights' errors).
constexpr double kFwdRel = 2e-3;
constexpr double kGradRel = 5e-3;

void compare_forward(const Fwd& g, const Fwd& c, const Batch& b, const std::vector<float>* target_mask,
                     int64_t V, const std::string& what) {
  check_scaled(g.logits, c.logits, kFwdRel, what + " logits");
  check_scaled(g.logprobs, c.logprobs, kFwdRel, what + " logprobs");
  check_scaled(g.entropy, c.entropy, kFwdRel, what + " entropy");
  check_scaled(g.values, c.values, kFwdRel, what + " values");
  CHECK_NEAR_CTX(g.lm_loss, c.lm_loss, 0, kFwdRel, what + " lm_loss");
  CHECK(g.lm_tokens == c.lm_tokens);
  // 0 wherever an output is not defined: padding, t = 0 (logprobs, entropy), non-targets.
  for (int64_t i = 0; i < b.B; ++i)
    for (int64_t t = 0; t < b.T; ++t) {
      const int64_t k = i * b.T + t;
      const bool valid = t < b.lengths[i];
      const bool target = valid && t >= 1 && (!target_mask || (*target_mask)[k] != 0.0f);
      if (!valid) {
        CHECK(g.values[k] == 0.0f);
        bool zero = true;
        for (int64_t v = 0; v < V; ++v) zero = zero && g.logits[k * V + v] == 0.0f;
        CHECK(zero);
      }
      if (!target) CHECK(g.logprobs[k] == 0.0f && g.entropy[k] == 0.0f);
    }
}

// Per tensor of the layout: |gpu - cpu| <= rel * max |cpu| over the tensor.
void compare_by_tensor(const Model& m, const std::vector<float>& g, const std::vector<float>& c, double rel,
                       const std::string& what) {
  CHECK(g.size() == c.size() && static_cast<int64_t>(c.size()) == m.parameter_count());
  if (g.size() != c.size()) return;
  for (const ParamTensor& t : m.layout().tensors) {
    std::vector<float> gt(g.begin() + t.offset, g.begin() + t.offset + t.numel);
    std::vector<float> ct(c.begin() + t.offset, c.begin() + t.offset + t.numel);
    check_scaled(gt, ct, rel, what + " " + t.name);
  }
}

// Upstream gradients of one backward: logprobs, entropy and values, and the LM loss.
struct Upstream {
  std::vector<float> gl, ge, gv;
  double lm_scale = 0.7;
};
Upstream make_upstream(tu::Rng& rng, int64_t n) {
  return {tu::normal(rng, n), scaled(tu::normal(rng, n), 0.3f), tu::normal(rng, n), 0.7};
}
void model_backward(Model& m, const Upstream& u) {
  BackwardRequest req;
  req.grad_logprobs = u.gl.data();
  req.grad_entropy = u.ge.data();
  req.grad_values = u.gv.data();
  req.lm_loss_scale = u.lm_scale;
  m.backward(req);
}

ModelOptions gpu_model() { return ModelOptions{g_model_device, true}; }
ModelOptions cpu_model() { return ModelOptions{Device::Cpu, true}; }

}  // namespace

TEST(engine_model_same_seed_same_parameters) {
  // Initialization happens on the host from the seed: the same bits on every device.
  const ModelConfig cfg = engine_config();
  Model c(cfg, 7, cpu_model());
  Model g(cfg, 7, gpu_model());
  CHECK(c.parameter_count() == g.parameter_count());
  check_bits(host_copy(g.params(), g.parameter_count()), host_copy(c.params(), c.parameter_count()),
             "params from seed 7");
  CHECK(g.grads() == nullptr);
  CHECK(g.optimizer_m() == nullptr);
  // And GPT-2's init gives the same forward within the model tolerance.
  tu::Rng rng(81);
  const Batch b = make_batch(rng, cfg.vocab_size);
  const Fwd fg = model_forward(g, b, false, nullptr), fc = model_forward(c, b, false, nullptr);
  compare_forward(fg, fc, b, nullptr, cfg.vocab_size, "seed-7 forward");
}

TEST(engine_model_forward_backward) {
  const ModelConfig cfg = engine_config();
  const std::vector<float> params = engine_params(cfg, 3);
  Model c(cfg, params, cpu_model());
  Model g(cfg, params, gpu_model());
  tu::Rng rng(82);
  const Batch b = make_batch(rng, cfg.vocab_size);
  const int64_t N = b.B * b.T;
  // Every target, then a target mask with holes (the LM head on a subset of rows); each
  // unretained (the head streamed in chunks) and retained.
  std::vector<float> tmask(N, 1.0f);
  for (int64_t i = 0; i < N; ++i)
    if (tu::rand_int(rng, 0, 2) == 0) tmask[i] = 0.0f;
  const std::vector<float>* masks[] = {nullptr, &tmask};
  for (const std::vector<float>* tm : masks)
    for (bool retain : {false, true}) {
      const std::string what = std::string("forward") + (tm ? " target_mask" : "") + (retain ? " retained" : "");
      const Fwd fg = model_forward(g, b, retain, tm), fc = model_forward(c, b, retain, tm);
      compare_forward(fg, fc, b, tm, cfg.vocab_size, what);
      const Fwd fg2 = model_forward(g, b, retain, tm);
      check_bits(fg2.logits, fg.logits, what + " logits (GPU run twice)");
      check_bits(fg2.values, fg.values, what + " values (GPU run twice)");
    }
  // Backward of the last (retained, masked) forward; gradients accumulate into a zeroed
  // buffer: every parameter tensor within 5e-3 of its largest gradient.
  const Upstream u = make_upstream(rng, N);
  model_backward(g, u);
  model_backward(c, u);
  const std::vector<float> gg = host_copy(g.grads(), g.parameter_count());
  const std::vector<float> cg = host_copy(c.grads(), c.parameter_count());
  compare_by_tensor(c, gg, cg, kGradRel, "grads");
  CHECK_NEAR_CTX(g.grad_norm(), c.grad_norm(), 0, 1e-3, "grad_norm");
  // A second backward of the same retained forward adds the same gradient again.
  model_backward(g, u);
  model_backward(c, u);
  compare_by_tensor(c, host_copy(g.grads(), g.parameter_count()), host_copy(c.grads(), c.parameter_count()),
                    kGradRel, "grads after a second backward");
  g.zero_grad();
  const std::vector<float> zeros = host_copy(g.grads(), g.parameter_count());
  CHECK(std::all_of(zeros.begin(), zeros.end(), [](float x) { return x == 0.0f; }));
}

namespace {

// Three AdamW steps (lr 1e-3, gradient norm clipped to 1) of the same loss on `m`;
// returns the gradients seen before each step and the step results.
struct Trained {
  std::vector<std::vector<float>> grads;
  std::vector<StepResult> steps;
};
Trained train3(Model& m, const Batch& b, const std::vector<Upstream>& ups, const AdamWOptions& opt) {
  Trained t;
  for (const Upstream& u : ups) {
    m.zero_grad();
    model_forward(m, b, true, nullptr);
    model_backward(m, u);
    t.grads.push_back(host_copy(m.grads(), m.parameter_count()));
    t.steps.push_back(m.step(opt));
  }
  return t;
}

AdamWOptions train_options() {
  AdamWOptions o;
  o.lr = 1e-3;
  o.max_grad_norm = 1.0;
  o.weight_decay = 0.01;
  return o;
}

}  // namespace

TEST(engine_model_adamw_steps) {
  const ModelConfig cfg = engine_config();
  const std::vector<float> params = engine_params(cfg, 4);
  Model c(cfg, params, cpu_model());
  Model g(cfg, params, gpu_model());
  tu::Rng rng(83);
  const Batch b = make_batch(rng, cfg.vocab_size);
  std::vector<Upstream> ups;
  for (int s = 0; s < 3; ++s) ups.push_back(make_upstream(rng, b.B * b.T));
  const AdamWOptions opt = train_options();
  const Trained tg = train3(g, b, ups, opt), tc = train3(c, b, ups, opt);
  for (size_t s = 0; s < tc.steps.size(); ++s) {
    const std::string what = "step " + std::to_string(s + 1);
    compare_by_tensor(c, tg.grads[s], tc.grads[s], kGradRel, what + " grads");
    // The global norm sums every squared gradient: the TF32 errors average out: 1e-3.
    CHECK_NEAR_CTX(tg.steps[s].grad_norm, tc.steps[s].grad_norm, 0, 1e-3, what + " grad_norm");
    CHECK(tg.steps[s].step == tc.steps[s].step);
    if (std::fabs(tc.steps[s].grad_norm - opt.max_grad_norm) > 1e-2) CHECK(tg.steps[s].clipped == tc.steps[s].clipped);
  }
  CHECK(g.optimizer_steps() == 3);
  compare_by_tensor(c, host_copy(g.optimizer_m(), g.parameter_count()),
                    host_copy(c.optimizer_m(), c.parameter_count()), kGradRel, "adam m");
  // Parameters. Adam divides each gradient by its own running magnitude, so an element
  // whose gradient is as small as its TF32 error (its sign uncertain) may move by up to
  // ~2 lr per step differently on the two devices; a well-determined one by ~1e-4 at most.
  // Per element: 1e-4 + lr * sum over steps s of min(3, 4 sum_{t <= s} |dg_t| / |g_t|)
  // (the first-order sensitivity of m_hat / sqrt(v_hat) to the observed gradient
  // differences, capped by Adam's bounded step), and at least 99% within 1e-4.
  const std::vector<float> pg = host_copy(g.params(), g.parameter_count());
  const std::vector<float> pc = host_copy(c.params(), c.parameter_count());
  const int64_t P = c.parameter_count();
  std::vector<double> tol(P, 1e-4);
  for (int64_t i = 0; i < P; ++i) {
    double acc = 0.0, slack = 0.0;
    for (size_t t = 0; t < tc.grads.size(); ++t) {
      const double gc = tc.grads[t][i], d = std::fabs(double(tg.grads[t][i]) - gc);
      acc += gc != 0.0 ? 4.0 * d / std::fabs(gc) : (d == 0.0 ? 0.0 : 3.0);
      slack += std::min(3.0, acc);
    }
    tol[i] += opt.lr * slack;
  }
  check_close(pg, pc, [&](size_t i) { return tol[i]; }, "params after 3 steps");
  int64_t within = 0;
  for (int64_t i = 0; i < P; ++i) within += std::fabs(double(pg[i]) - pc[i]) <= 1e-4;
  CHECK_NEAR_CTX(static_cast<double>(within) / P, 1.0, 0.01, 0, "fraction of params within 1e-4");
}

TEST(engine_model_generate) {
  const ModelConfig cfg = engine_config();
  const std::vector<float> params = engine_params(cfg, 5);
  Model c(cfg, params, ModelOptions{Device::Cpu, false});
  Model g(cfg, params, ModelOptions{g_model_device, false});
  tu::Rng rng(84);
  const int64_t B = 6, T = 20, new_tokens = 16;
  const std::vector<int32_t> lengths = {1, 3, 8, 12, 5, 20};
  std::vector<int32_t> prompts = tu::tokens(rng, B * T, cfg.vocab_size - 1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = lengths[b]; t < T; ++t) prompts[b * T + t] = -1;
  const TokenBatch pb{B, T, prompts.data(), lengths.data()};
  for (int sampled = 0; sampled < 2; ++sampled) {
    GenerateOptions o;
    o.max_new_tokens = new_tokens;
    o.greedy = !sampled;
    if (sampled) o.temperature = 0.8, o.top_k = 20, o.top_p = 0.95, o.repetition_penalty = 1.2;
    o.stop_tokens = {7};  // some rows stop early
    o.seed = 99;
    const GenerateResult rg = g.generate(pb, o), rc = c.generate(pb, o), rg2 = g.generate(pb, o);
    const std::string what = sampled ? "generate sampled" : "generate greedy";
    // The GPU is deterministic.
    check_bits(rg.tokens, rg2.tokens, what + " tokens (GPU run twice)");
    check_bits(rg.logprobs, rg2.logprobs, what + " logprobs (GPU run twice)");
    // TF32 can flip a near-tie (greedy) or move a CDF boundary past a draw (sampled), and
    // the row differs from there on: at least 90% (greedy) / 80% (sampled) of the tokens
    // identical; all of them under the self-test. Where a row still agrees, its logprobs
    // agree within the forward tolerance (2e-3 of the largest |logprob|, at least 1).
    int64_t same = 0, total = 0;
    double lpmax = 1.0;
    for (float x : rc.logprobs) lpmax = std::max(lpmax, std::fabs(double(x)));
    for (int64_t b = 0; b < B; ++b) {
      bool row_same = true;
      for (int64_t t = 0; t < new_tokens; ++t) {
        const int64_t k = b * new_tokens + t;
        ++total;
        if (rg.tokens[k] == rc.tokens[k]) ++same;
        if (!row_same || rg.tokens[k] != rc.tokens[k]) {
          row_same = false;
          continue;
        }
        CHECK_NEAR_CTX(rg.logprobs[k], rc.logprobs[k], kFwdRel * lpmax, 0,
                       what + " logprob row " + std::to_string(b) + " t " + std::to_string(t));
      }
      if (row_same) CHECK(rg.lengths[b] == rc.lengths[b] && rg.stopped[b] == rc.stopped[b]);
    }
    const double frac = static_cast<double>(same) / total;
    const double need = g_self_test ? 1.0 : sampled ? 0.8 : 0.9;
    if (frac < need)
      tf::report_failure(__FILE__, __LINE__, what + ": only " + tf::fmt_double(frac) + " of the tokens equal the CPU's");
    ++tf::state().checks;
  }
}

TEST(engine_model_determinism) {
  // Two GPU models from the same parameters, the same steps: bit-identical everywhere.
  const ModelConfig cfg = engine_config();
  const std::vector<float> params = engine_params(cfg, 6);
  Model a(cfg, params, gpu_model());
  Model b(cfg, params, gpu_model());
  tu::Rng rng(85);
  const Batch batch = make_batch(rng, cfg.vocab_size);
  std::vector<Upstream> ups;
  for (int s = 0; s < 3; ++s) ups.push_back(make_upstream(rng, batch.B * batch.T));
  const Trained ta = train3(a, batch, ups, train_options()), tb = train3(b, batch, ups, train_options());
  for (size_t s = 0; s < ta.steps.size(); ++s) {
    check_bits(ta.grads[s], tb.grads[s], "grads step " + std::to_string(s + 1));
    CHECK(tf::same_bits(ta.steps[s].grad_norm, tb.steps[s].grad_norm));
  }
  check_bits(host_copy(a.params(), a.parameter_count()), host_copy(b.params(), b.parameter_count()),
             "params after 3 steps");
  check_bits(host_copy(a.optimizer_v(), a.parameter_count()), host_copy(b.optimizer_v(), b.parameter_count()),
             "adam v after 3 steps");
  const Fwd fa = model_forward(a, batch, false, nullptr), fb = model_forward(b, batch, false, nullptr);
  check_bits(fa.logits, fb.logits, "logits after training");
  check_bits(fa.entropy, fb.entropy, "entropy after training");
}

// =============================================================================================
// errors
// =============================================================================================

TEST(engine_errors_out_of_memory_and_recovery) {
  // An impossible allocation throws OutOfMemory; the process survives and the next ops
  // work (no stale error reported by a later launch check).
  bool threw = false;
  try {
    void* p = gpu().alloc(size_t(1) << 50);
    gpu().free(p);
  } catch (const ppo::Error& e) {
    threw = true;
    CHECK(e.code() == ErrorCode::OutOfMemory);
  }
  CHECK(threw);
  tu::Rng rng(91);
  const std::vector<float> a = tu::normal(rng, 1000), b = tu::normal(rng, 1000);
  Buf<float> da(gpu(), a), db(gpu(), b), out(gpu(), tu::poisoned(1000));
  CHECK_NO_THROW(gpu().add(1000, da.p(), db.p(), out.p()));
  CHECK_NO_THROW(gpu().synchronize());
  std::vector<float> want(1000);
  for (int i = 0; i < 1000; ++i) want[i] = a[i] + b[i];
  check_bits(out.get(), want, "add after an out-of-memory error");
  // A bad-argument error leaves the table usable too.
  CHECK_THROWS_CODE(gpu().matmul(false, false, 2, 2, -3, 1.0f, da.p(), 2, db.p(), 2, 0.0f, out.p(), 2),
                    ErrorCode::InvalidArgument, "k");
  mm_default(mm_case(rng, false, true, 17, 9, 33, 1.0f, 0.0f, 0, 0));
  // A model on the device survives it as well.
  const ModelConfig cfg = engine_config();
  Model m(cfg, 1, ModelOptions{g_model_device, false});
  const Batch batch = make_batch(rng, cfg.vocab_size);
  CHECK_NO_THROW(model_forward(m, batch, false, nullptr));
}

int main(int argc, char** argv) {
  const char* self = std::getenv("PPO_PARITY_SELF_TEST");
  if (self && std::string(self) == "1") {
    std::printf("PPO_PARITY_SELF_TEST=1: the CPU table stands in for CUDA\n");
    g_self_test = true;
    g_gpu = &ppo::cpu_engine_ops();
    g_model_device = Device::Cpu;
    return tf::run_all(argc, argv);
  }
  if (!ppo::cuda_available())
    return tf::skip_file("CUDA is not available: " + ppo::cuda_unavailable_reason());
  g_gpu = &ppo::engine_ops_for(Device::Cuda);
  g_model_device = Device::Cuda;
#ifdef PPO_WITH_CUDA
  g_default_path = ppo::cuda::matmul_path();
#endif
  return tf::run_all(argc, argv);
}
