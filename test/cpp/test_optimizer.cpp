// ppo::cpu optimizer kernels (csrc/cpu/optimizer.h): AdamW against a float64 reference
// of PyTorch's torch.optim.AdamW update run side by side over several steps (with a
// rounding-error bound tracked along), the step-1 bias correction and the weight decay
// by hand, sum_of_squares against a long double sum, scale_in_place bit for bit,
// thread-count independence, argument errors.
//
// Determinism across thread counts: run with PPO_MAX_THREADS=1 and =3; the "checksum"
// line must be the same. Each parallel call is also compared in-process with the same
// call made from inside a pool thread, where parallel_for runs on one thread.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "cpu/optimizer.h"
#include "test_framework.h"
#include "test_util.h"

namespace {

using ppo::cpu::adamw_update;
using ppo::cpu::scale_in_place;
using ppo::cpu::sum_of_squares;

constexpr double kU = 1.0 / 16777216.0;  // float unit roundoff 2^-24

// Runs fn on one thread (from inside a pool thread parallel_for runs inline).
void run_single_threaded(const std::function<void()>& fn) {
  ppo::parallel_for(
      2, [&](int64_t begin, int64_t) { if (begin == 0) fn(); }, 1);
}

struct AdamCfg {
  float lr, beta1, beta2, eps, wd;
};

// Float64 AdamW, PyTorch's order, carried from the same float starting state, plus an
// upper bound on how far the float kernel can have drifted from it (first-order rounding
// analysis, u = 2^-24 per float operation, doubled for safety at the check):
//   m: each step rounds beta1 m, (1 - beta1) g (and 1 - beta1 itself) and their sum:
//      E_m <- beta1 E_m + 3u (beta1 |m| + (1 - beta1) |g|);
//   v: likewise, plus the rounding of g^2: E_v <- beta2 E_v + 4u (beta2 v + (1 - beta2) g^2);
//   update U = s m / D, D = sqrt(v) c2 + eps, s = lr / bc1, c2 = 1 / sqrt(bc2):
//      E_U <= s (E_m / D + |m| E_D / D^2) + 5u |U|,
//      E_D <= c2 (sqrt(v + E_v) - sqrt(v)) + 3u D;
//   p <- p (1 - lr wd) - U:  E_p <- E_p + 3u |p| + E_U + u |U|.
struct AdamRef {
  std::vector<double> p, m, v, ep, em, ev;

  void step(const AdamCfg& c, const std::vector<float>& g, int64_t t) {
    const double b1 = c.beta1, b2 = c.beta2;
    const double bc1 = 1.0 - std::pow(b1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(b2, static_cast<double>(t));
    const double s = static_cast<double>(c.lr) / bc1, c2 = 1.0 / std::sqrt(bc2);
    for (size_t i = 0; i < p.size(); ++i) {
      const double gi = g[i];
      em[i] = b1 * em[i] + 3 * kU * (b1 * std::fabs(m[i]) + (1 - b1) * std::fabs(gi));
      ev[i] = b2 * ev[i] + 4 * kU * (b2 * v[i] + (1 - b2) * gi * gi);
      m[i] = b1 * m[i] + (1 - b1) * gi;
      v[i] = b2 * v[i] + (1 - b2) * gi * gi;
      p[i] -= static_cast<double>(c.lr) * c.wd * p[i];  // decoupled decay first (PyTorch)
      const double mh = m[i] / bc1, vh = v[i] / bc2;
      const double U = static_cast<double>(c.lr) * mh / (std::sqrt(vh) + c.eps);
      p[i] -= U;
      const double D = std::sqrt(v[i]) * c2 + c.eps;
      const double ed = c2 * (std::sqrt(v[i] + ev[i]) - std::sqrt(v[i])) + 3 * kU * D;
      const double eu = s * (em[i] / D + std::fabs(m[i]) * ed / (D * D)) + 5 * kU * std::fabs(U);
      ep[i] += 3 * kU * std::fabs(p[i]) + eu + kU * std::fabs(U);
    }
  }
};

// Gradients with a spread of scales: normal, tiny (1e-6), large (1e3) and exact zeros.
std::vector<float> make_grad(tu::Rng& rng, int64_t n) {
  std::vector<float> g = tu::normal(rng, n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t kind = i % 7;
    if (kind == 3) g[i] *= 1e-6f;
    if (kind == 5) g[i] *= 1e3f;
    if (kind == 6 && tu::rand_int(rng, 0, 2) == 0) g[i] = 0.0f;
  }
  return g;
}

uint64_t fnv1a(uint64_t h, const void* data, size_t bytes) {
  const unsigned char* b = static_cast<const unsigned char*>(data);
  for (size_t k = 0; k < bytes; ++k) {
    h ^= b[k];
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace

TEST(adamw_matches_float64_pytorch_formula_over_steps) {
  // Configs: GPT-2 defaults with and without weight decay, other betas/eps, beta1 = 0,
  // and a large lr * wd (decay 0.95) where applying the decay after the update instead
  // of before (p (1 - lr wd) - U vs (p - U)(1 - lr wd)) would differ by ~5e-3.
  const AdamCfg cfgs[] = {{1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f}, {1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f},
                          {3e-4f, 0.8f, 0.95f, 1e-6f, 0.1f},   {1e-2f, 0.0f, 0.99f, 1e-5f, 0.0f},
                          {0.1f, 0.9f, 0.999f, 1e-8f, 0.5f}};
  tu::Rng rng(11);
  const int64_t n = 1001, steps = 12;
  int cfg_index = 0;
  for (const AdamCfg& c : cfgs) {
    std::vector<float> p = tu::normal(rng, n), m(n, 0.0f), v(n, 0.0f);
    AdamRef ref{tu::to_double(p), std::vector<double>(n, 0.0), std::vector<double>(n, 0.0),
                std::vector<double>(n, 0.0), std::vector<double>(n, 0.0),
                std::vector<double>(n, 0.0)};
    for (int64_t t = 1; t <= steps; ++t) {
      const std::vector<float> g = make_grad(rng, n);
      adamw_update(n, p.data(), g.data(), m.data(), v.data(), c.lr, c.beta1, c.beta2, c.eps,
                   c.wd, t);
      ref.step(c, g, t);
      for (int64_t i = 0; i < n; ++i) {
        const std::string ctx = "cfg " + std::to_string(cfg_index) + " step " +
                                std::to_string(t) + " i " + std::to_string(i);
        CHECK_NEAR_CTX(m[i], ref.m[i], 2 * ref.em[i], 0.0, "m " + ctx);
        CHECK_NEAR_CTX(v[i], ref.v[i], 2 * ref.ev[i], 0.0, "v " + ctx);
        CHECK_NEAR_CTX(p[i], ref.p[i], 2 * ref.ep[i], 0.0, "param " + ctx);
      }
    }
    ++cfg_index;
  }
}

TEST(adamw_resumes_from_a_late_step) {
  // Random moments (v > 0) continued at steps 5000..5002: bias corrections ~1 (beta1^5000
  // underflows), so this is the un-corrected update; same reference and bounds.
  tu::Rng rng(12);
  const AdamCfg c{6e-4f, 0.9f, 0.95f, 1e-8f, 0.1f};
  const int64_t n = 500;
  std::vector<float> p = tu::normal(rng, n), m = tu::normal(rng, n, 0.0, 0.1),
                     v = tu::uniform(rng, n, 1e-6, 1e-2);
  AdamRef ref{tu::to_double(p), tu::to_double(m), tu::to_double(v), std::vector<double>(n, 0.0),
              std::vector<double>(n, 0.0), std::vector<double>(n, 0.0)};
  for (int64_t t = 5000; t <= 5002; ++t) {
    const std::vector<float> g = make_grad(rng, n);
    adamw_update(n, p.data(), g.data(), m.data(), v.data(), c.lr, c.beta1, c.beta2, c.eps,
                 c.wd, t);
    ref.step(c, g, t);
  }
  for (int64_t i = 0; i < n; ++i) {
    CHECK_NEAR(m[i], ref.m[i], 2 * ref.em[i], 0.0);
    CHECK_NEAR(v[i], ref.v[i], 2 * ref.ev[i], 0.0);
    CHECK_NEAR(p[i], ref.p[i], 2 * ref.ep[i], 0.0);
  }
}

TEST(adamw_step_one_and_weight_decay_by_hand) {
  // Step 1 from m = v = 0 with betas whose complements are powers of 2 (b1 = 1 - 2^-3,
  // b2 = 1 - 2^-10, so the float betas are exact): m = g / 8, v = g^2 / 1024, the
  // bias-corrected m_hat = g, v_hat = g^2, and p1 = p0 (1 - lr wd) - lr g / (|g| + eps):
  // a move of almost exactly lr against the gradient's sign, whatever |g| (without the
  // bias correction it would be lr (1 - b1) / sqrt(1 - b2) = 4 lr). Within 4u |p|; m and
  // v within 2u (one rounding of g^2).
  const float lr = 1e-2f, wd = 0.1f, eps = 1e-8f;
  float p[4] = {1.0f, -2.0f, 0.5f, 3.0f};
  const float g[4] = {2.0f, -0.001f, 1000.0f, -7.0f};
  float m[4] = {0, 0, 0, 0}, v[4] = {0, 0, 0, 0};
  const float p0[4] = {p[0], p[1], p[2], p[3]};
  adamw_update(4, p, g, m, v, lr, 0.875f, 0.9990234375f, eps, wd, 1);
  for (int i = 0; i < 4; ++i) {
    const double want = static_cast<double>(p0[i]) * (1.0 - 1e-3) -
                        0.01 * g[i] / (std::fabs(static_cast<double>(g[i])) + 1e-8);
    CHECK_NEAR_CTX(p[i], want, 4 * kU * std::fabs(p0[i]), 0.0, "step 1, i " + std::to_string(i));
    const double gi = g[i];
    CHECK_NEAR(m[i], gi / 8, 2 * kU * std::fabs(gi / 8), 0.0);
    CHECK_NEAR(v[i], gi * gi / 1024, 2 * kU * gi * gi / 1024, 0.0);
  }
  // Zero gradient and zero moments: the update is 0 / (0 + eps) = 0, so the step is the
  // decay alone, p * fl(1 - lr wd) bit for bit; with wd = 0 the parameters keep their bits.
  tu::Rng rng(13);
  const int64_t n = 100;
  const std::vector<float> q0 = tu::normal(rng, n), zero(n, 0.0f);
  std::vector<float> q = q0, mm(n, 0.0f), vv(n, 0.0f);
  adamw_update(n, q.data(), zero.data(), mm.data(), vv.data(), 0.5f, 0.9f, 0.999f, 1e-8f, 0.2f, 3);
  const float decay = static_cast<float>(1.0 - 0.5 * static_cast<double>(0.2f));
  std::vector<float> want(n);
  for (int64_t i = 0; i < n; ++i) want[i] = q0[i] * decay;
  CHECK_BITWISE_EQUAL(q.data(), want.data(), n, "decay only");
  q = q0;
  adamw_update(n, q.data(), zero.data(), mm.data(), vv.data(), 0.5f, 0.9f, 0.999f, 1e-8f, 0.0f, 3);
  CHECK_BITWISE_EQUAL(q.data(), q0.data(), n, "no decay, no gradient");
  for (int64_t i = 0; i < n; ++i) CHECK(mm[i] == 0.0f && vv[i] == 0.0f);
  // lr = 0: nothing moves (but the moments still update).
  q = q0;
  const std::vector<float> gg = tu::normal(rng, n);
  adamw_update(n, q.data(), gg.data(), mm.data(), vv.data(), 0.0f, 0.9f, 0.999f, 1e-8f, 0.1f, 1);
  CHECK_BITWISE_EQUAL(q.data(), q0.data(), n, "lr 0");
  CHECK(mm[0] != 0.0f);
  // eps = 0 is allowed; with m = v = 0 the update is 0/0 = NaN, as in PyTorch.
  float pz = 1.0f, gz = 0.0f, mz = 0.0f, vz = 0.0f;
  adamw_update(1, &pz, &gz, &mz, &vz, 1e-3f, 0.9f, 0.999f, 0.0f, 0.0f, 1);
  CHECK(std::isnan(pz));
}

TEST(adamw_is_elementwise_across_threads) {
  // n spreads over several threads: the result must equal the single-threaded run and
  // the run in two separate calls (an element's bits never depend on the split).
  tu::Rng rng(14);
  const int64_t n = 300001;
  const std::vector<float> p0 = tu::normal(rng, n), g = make_grad(rng, n),
                           m0 = tu::normal(rng, n, 0.0, 0.1), v0 = tu::uniform(rng, n, 0.0, 0.1);
  std::vector<float> p = p0, m = m0, v = v0;
  adamw_update(n, p.data(), g.data(), m.data(), v.data(), 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, 7);
  std::vector<float> ps = p0, ms = m0, vs = v0;
  run_single_threaded([&] {
    adamw_update(n, ps.data(), g.data(), ms.data(), vs.data(), 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, 7);
  });
  CHECK_BITWISE_EQUAL(ps.data(), p.data(), n, "param single-threaded");
  CHECK_BITWISE_EQUAL(ms.data(), m.data(), n, "m single-threaded");
  CHECK_BITWISE_EQUAL(vs.data(), v.data(), n, "v single-threaded");
  // Two calls split at a multiple of 64 elements (the kernel's block: within a block the
  // compiler's vector body and remainder loop may round multiply-adds differently, so
  // only block-aligned splits are promised to agree).
  std::vector<float> p2 = p0, m2 = m0, v2 = v0;
  const int64_t h = 12288;
  adamw_update(h, p2.data(), g.data(), m2.data(), v2.data(), 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, 7);
  adamw_update(n - h, p2.data() + h, g.data() + h, m2.data() + h, v2.data() + h, 1e-3f, 0.9f,
               0.999f, 1e-8f, 0.01f, 7);
  CHECK_BITWISE_EQUAL(p2.data(), p.data(), n, "param in two calls");
}

TEST(sum_of_squares_matches_long_double_sum) {
  // All terms are positive, so the kernel's double sum (per-chunk lanes of ~65536/16
  // terms, then 16 lanes, then the chunks) is within (n/16 + 16 + chunks + 2) * 2^-53 of
  // the sum, relatively; the reference is a long double (64-bit mantissa) sum.
  tu::Rng rng(15);
  for (int64_t n : {0, 1, 15, 16, 17, 1000, 65535, 65536, 65537, 1000003}) {
    std::vector<float> x = tu::normal(rng, n, 0.0, 2.0);
    for (int64_t i = 0; i < n; i += 97) x[i] *= 1e4f;  // a spread of magnitudes
    long double want = 0.0L;
    for (float xi : x) want += static_cast<long double>(xi) * xi;
    const double got = sum_of_squares(n, x.data());
    const double chunks = static_cast<double>((n + 65535) / 65536);
    CHECK_NEAR_CTX(got, static_cast<double>(want), 0.0,
                   (static_cast<double>(n) / 16 + 18 + chunks) * 1.12e-16,
                   "n=" + std::to_string(n));
    double single = -1.0;
    run_single_threaded([&] { single = sum_of_squares(n, x.data()); });
    CHECK(tf::same_bits(single, got));
  }
  // No float overflow: squares of float-max-sized values are formed in double.
  const float big[3] = {3e38f, -3e38f, 1.0f};
  const double b = big[0];
  CHECK_NEAR(sum_of_squares(3, big), 2.0 * b * b, 0.0, 1e-15);
  CHECK(sum_of_squares(0, nullptr) == 0.0);
}

TEST(scale_in_place_matches_reference) {
  tu::Rng rng(16);
  for (int64_t n : {1, 33, 300001}) {
    const std::vector<float> x0 = tu::normal(rng, n, 0.0, 5.0);
    for (float f : {0.37f, 1.0f, 0.0f, -2.5f}) {
      std::vector<float> x = x0, want(n);
      for (int64_t i = 0; i < n; ++i) want[i] = static_cast<float>(static_cast<double>(x0[i]) * f);
      scale_in_place(n, x.data(), f);
      CHECK_BITWISE_EQUAL(x.data(), want.data(), n, "scaled");
    }
  }
}

TEST(optimizer_checksum) {
  // Compare the printed line across PPO_MAX_THREADS settings.
  tu::Rng rng(17);
  const int64_t n = 1000003;
  std::vector<float> p = tu::normal(rng, n), g = make_grad(rng, n), m(n, 0.0f), v(n, 0.0f);
  for (int64_t t = 1; t <= 3; ++t)
    adamw_update(n, p.data(), g.data(), m.data(), v.data(), 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, t);
  const double ss = sum_of_squares(n, g.data());
  scale_in_place(n, g.data(), static_cast<float>(1.0 / std::sqrt(ss)));
  uint64_t h = 1469598103934665603ull;
  h = fnv1a(h, p.data(), n * sizeof(float));
  h = fnv1a(h, m.data(), n * sizeof(float));
  h = fnv1a(h, v.data(), n * sizeof(float));
  h = fnv1a(h, g.data(), n * sizeof(float));
  h = fnv1a(h, &ss, sizeof ss);
  std::printf("    checksum %016llx (must not depend on PPO_MAX_THREADS)\n",
              static_cast<unsigned long long>(h));
  CHECK(std::isfinite(ss) && ss > 0.0);
}

TEST(optimizer_argument_errors) {
  using ppo::ErrorCode;
  float p[4] = {1, 2, 3, 4}, g[4] = {1, 1, 1, 1}, m[4] = {0}, v[4] = {0};
  auto adam = [&](int64_t n, float* pp, const float* gg, float* mm, float* vv, float lr,
                  float b1, float b2, float eps, float wd, int64_t step) {
    adamw_update(n, pp, gg, mm, vv, lr, b1, b2, eps, wd, step);
  };
  CHECK_THROWS_CODE(adam(-1, p, g, m, v, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, 1), ErrorCode::InvalidArgument, "n");
  CHECK_THROWS_CODE(adam(4, nullptr, g, m, v, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, 1), ErrorCode::InvalidArgument, "param");
  CHECK_THROWS_CODE(adam(4, p, nullptr, m, v, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, 1), ErrorCode::InvalidArgument, "grad");
  CHECK_THROWS_CODE(adam(4, p, g, nullptr, v, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, 1), ErrorCode::InvalidArgument, "m");
  CHECK_THROWS_CODE(adam(4, p, g, m, nullptr, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, 1), ErrorCode::InvalidArgument, "v");
  CHECK_THROWS_CODE(adam(4, p, g, m, v, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, 0), ErrorCode::InvalidArgument, "step");
  CHECK_THROWS_CODE(adam(4, p, g, m, v, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, -3), ErrorCode::InvalidArgument, "step");
  CHECK_THROWS_CODE(adam(4, p, g, m, v, -1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, 1), ErrorCode::InvalidArgument, "lr");
  CHECK_THROWS_CODE(adam(4, p, g, m, v, tu::kNaN, 0.9f, 0.999f, 1e-8f, 0.0f, 1), ErrorCode::InvalidArgument, "lr");
  CHECK_THROWS_CODE(adam(4, p, g, m, v, tu::kInf, 0.9f, 0.999f, 1e-8f, 0.0f, 1), ErrorCode::InvalidArgument, "lr");
  CHECK_THROWS_CODE(adam(4, p, g, m, v, 1e-3f, 1.0f, 0.999f, 1e-8f, 0.0f, 1), ErrorCode::InvalidArgument, "beta1");
  CHECK_THROWS_CODE(adam(4, p, g, m, v, 1e-3f, -0.1f, 0.999f, 1e-8f, 0.0f, 1), ErrorCode::InvalidArgument, "beta1");
  CHECK_THROWS_CODE(adam(4, p, g, m, v, 1e-3f, tu::kNaN, 0.999f, 1e-8f, 0.0f, 1), ErrorCode::InvalidArgument, "beta1");
  CHECK_THROWS_CODE(adam(4, p, g, m, v, 1e-3f, 0.9f, 1.0f, 1e-8f, 0.0f, 1), ErrorCode::InvalidArgument, "beta2");
  CHECK_THROWS_CODE(adam(4, p, g, m, v, 1e-3f, 0.9f, -0.5f, 1e-8f, 0.0f, 1), ErrorCode::InvalidArgument, "beta2");
  CHECK_THROWS_CODE(adam(4, p, g, m, v, 1e-3f, 0.9f, 0.999f, -1e-8f, 0.0f, 1), ErrorCode::InvalidArgument, "eps");
  CHECK_THROWS_CODE(adam(4, p, g, m, v, 1e-3f, 0.9f, 0.999f, tu::kInf, 0.0f, 1), ErrorCode::InvalidArgument, "eps");
  CHECK_THROWS_CODE(adam(4, p, g, m, v, 1e-3f, 0.9f, 0.999f, 1e-8f, -0.01f, 1), ErrorCode::InvalidArgument, "weight_decay");
  CHECK_THROWS_CODE(adam(4, p, g, m, v, 1e-3f, 0.9f, 0.999f, 1e-8f, tu::kNaN, 1), ErrorCode::InvalidArgument, "weight_decay");
  // A rejected call changes nothing.
  CHECK(p[0] == 1.0f && m[0] == 0.0f && v[0] == 0.0f);
  CHECK_NO_THROW(adam(0, nullptr, nullptr, nullptr, nullptr, 1e-3f, 0.0f, 0.0f, 0.0f, 0.0f, 1));
  CHECK_THROWS_CODE(sum_of_squares(-1, g), ErrorCode::InvalidArgument, "n");
  CHECK_THROWS_CODE(sum_of_squares(4, nullptr), ErrorCode::InvalidArgument, "x");
  CHECK_THROWS_CODE(scale_in_place(-1, p, 2.0f), ErrorCode::InvalidArgument, "n");
  CHECK_THROWS_CODE(scale_in_place(4, nullptr, 2.0f), ErrorCode::InvalidArgument, "x");
  CHECK_THROWS_CODE(scale_in_place(4, p, tu::kNaN), ErrorCode::InvalidArgument, "factor");
  CHECK_THROWS_CODE(scale_in_place(4, p, -tu::kInf), ErrorCode::InvalidArgument, "factor");
  CHECK_NO_THROW(scale_in_place(0, nullptr, 2.0f));
}

PPO_TEST_MAIN()
