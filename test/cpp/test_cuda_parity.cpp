// CUDA backend parity: every op on random inputs runs on the CPU and on CUDA (through
// the host API of core/ops.h, so staging is exercised too) and both are compared with
// the float64 reference and with each other. Outputs are filled with NaN before each
// run, so an element a kernel leaves unwritten fails. Each op is also run twice on CUDA
// and must give bit-identical results (no floating-point atomics).
//
// Exits 77 (ctest: skipped) when ppo::cuda_available() is false. For checking this file
// itself on a machine without a GPU, PPO_PARITY_SELF_TEST=1 runs everything with the
// CPU standing in for CUDA.
//
// Tolerances: each backend must match the exact float64 reference within the same
// bounds the CPU tests use (reasons there and repeated below); two results that each lie
// within tol of the exact value lie within 2 tol of each other, which is the CPU-CUDA
// bound. Where a quantity is exact (clip, counts, clip fractions away from kinks) both
// bounds are 0.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/ops.h"
#include "reference.h"
#include "test_framework.h"
#include "test_util.h"

using ppo::Device;
using tu::MaskKind;

namespace {

Device g_gpu = Device::Cuda;  // Device::Cpu under PPO_PARITY_SELF_TEST

const MaskKind kKinds[] = {MaskKind::Ones, MaskKind::Suffix, MaskKind::Prefix,
                           MaskKind::Random, MaskKind::Mixed};

std::vector<float> maybe_mask(tu::Rng& rng, int64_t B, int64_t T, int kind_index) {
  const MaskKind k = kKinds[kind_index % 5];
  if (k == MaskKind::Ones && tu::rand_int(rng, 0, 1)) return {};  // nullptr
  return tu::make_mask(rng, B, T, k);
}
const float* ptr(const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); }

// gpu vs exact reference within tol; gpu vs cpu within 2 tol; masked outputs exactly 0.
template <typename R>
void compare3(const std::vector<float>& gpu, const std::vector<float>& cpu, const R& ref,
              double abs_tol, double rel_tol, const std::string& what) {
  const int64_t n = static_cast<int64_t>(gpu.size());
  CHECK(cpu.size() == gpu.size());
  CHECK(static_cast<int64_t>(ref.size()) == n);
  CHECK_ALL_NEAR(gpu.data(), ref.data(), n, abs_tol, rel_tol, (what + " gpu vs ref").c_str());
  CHECK_ALL_NEAR(gpu.data(), cpu.data(), n, 2 * abs_tol, 2 * rel_tol,
                 (what + " gpu vs cpu").c_str());
}

void check_masked_zero(const std::vector<float>& out, const std::vector<float>& mask,
                       int64_t inner, const std::string& what) {
  if (mask.empty()) return;
  int64_t bad = 0;
  for (size_t i = 0; i < mask.size(); ++i)
    if (mask[i] == 0.0f)
      for (int64_t k = 0; k < inner; ++k) bad += out[i * inner + k] != 0.0f;
  if (bad) CHECK_NEAR_CTX(bad, 0, 0, 0, what + ": nonzero outputs at masked positions");
}

// ---- logprobs -----------------------------------------------------------------------------

struct LpCase {
  int64_t B, T, V;
  std::vector<float> logits, mask;
  std::vector<int32_t> tokens;
  float temp;
  int64_t n() const { return B * T; }
};

struct LpOut {
  std::vector<float> lp, ent, grad;
};

LpOut lp_run(const LpCase& c, Device dev, const std::vector<float>& g_lp,
             const std::vector<float>& g_h, bool with_entropy = true) {
  LpOut o;
  o.lp = tu::poisoned(c.n());
  if (with_entropy) o.ent = tu::poisoned(c.n());
  o.grad = tu::poisoned(c.n() * c.V);
  ppo::LogprobsArgs a;
  a.batch = c.B, a.steps = c.T, a.vocab = c.V;
  a.logits = c.logits.data(), a.tokens = c.tokens.data(), a.mask = ptr(c.mask);
  a.temperature = c.temp, a.logprobs = o.lp.data();
  a.entropy = with_entropy ? o.ent.data() : nullptr;
  ppo::logprobs_from_logits(dev, a);
  ppo::LogprobsBackwardArgs b;
  b.batch = c.B, b.steps = c.T, b.vocab = c.V;
  b.logits = c.logits.data(), b.tokens = c.tokens.data(), b.mask = ptr(c.mask);
  b.temperature = c.temp, b.grad_logprobs = ptr(g_lp), b.grad_entropy = ptr(g_h);
  b.grad_logits = o.grad.data();
  ppo::logprobs_backward(dev, b);
  return o;
}

void lp_check(const LpCase& c, const std::vector<float>& g_lp, const std::vector<float>& g_h,
              const std::string& what) {
  LpOut cpu = lp_run(c, Device::Cpu, g_lp, g_h);
  LpOut gpu = lp_run(c, g_gpu, g_lp, g_h);
  auto x = tu::to_double(c.logits);
  auto m = tu::mask_to_double(ptr(c.mask), c.n());
  std::vector<double> rlp(c.n()), rent(c.n()), rgrad(c.n() * c.V);
  ref::logprobs(c.B, c.T, c.V, x.data(), c.tokens.data(), tu::ptr_or_null(m), c.temp,
                rlp.data(), rent.data());
  auto glp = tu::to_double(g_lp), gh = tu::to_double(g_h);
  ref::logprobs_backward(c.B, c.T, c.V, x.data(), c.tokens.data(), tu::ptr_or_null(m), c.temp,
                         tu::ptr_or_null(glp), tu::ptr_or_null(gh), rgrad.data());
  // Forward: a few roundings of the largest |logit / T| (4e-7 max|z|) plus exp/log/sum
  // rounding at O(1) scale (1e-5); float tree reductions over 1e5 terms stay far below.
  const double zmax = tu::max_abs(c.logits) / c.temp;
  const double ftol = 1e-5 + 4e-7 * zmax;
  compare3(gpu.lp, cpu.lp, rlp, ftol, 1e-5, what + " logprobs");
  compare3(gpu.ent, cpu.ent, rent, ftol, 1e-5, what + " entropy");
  // Backward: forward error times (|g| + |gh|) / T.
  const double btol = 1e-7 + 2 * ftol * (tu::max_abs(g_lp) + tu::max_abs(g_h)) / c.temp;
  compare3(gpu.grad, cpu.grad, rgrad, btol, 1e-4, what + " grad_logits");
  check_masked_zero(gpu.lp, c.mask, 1, what + " logprobs");
  check_masked_zero(gpu.ent, c.mask, 1, what + " entropy");
  check_masked_zero(gpu.grad, c.mask, c.V, what + " grad_logits");
  LpOut gpu_noent = lp_run(c, g_gpu, g_lp, g_h, /*with_entropy=*/false);
  CHECK_BITWISE_EQUAL(gpu.lp.data(), gpu_noent.lp.data(), c.n(),
                      (what + " logprobs with entropy=nullptr").c_str());
}

LpCase lp_case(tu::Rng& rng, int64_t B, int64_t T, int64_t V, float temp, int kind,
               double std = 2.0) {
  LpCase c{B, T, V, tu::normal(rng, B * T * V, 0.0, std), maybe_mask(rng, B, T, kind),
           tu::tokens(rng, B * T, V), temp};
  return c;
}

}  // namespace

TEST(parity_logprobs_vocab_sweep) {
  tu::Rng rng(101);
  // Vocabulary sizes around warp / block / vector-width boundaries and real ones.
  const int64_t vocabs[] = {1,   2,    3,    31,   32,   33,    63,    64,    65,   127,
                            128, 129,  255,  256,  257,  1000,  1023,  1024,  1025, 4095,
                            4096, 4097, 32000, 50257, 128256};
  const float temps[] = {1.0f, 0.7f, 1.3f};
  int rep = 0;
  for (int64_t V : vocabs) {
    const int64_t rows_budget = std::max<int64_t>(2, 600000 / V);
    const int64_t B = tu::rand_int(rng, 1, std::min<int64_t>(5, rows_budget));
    const int64_t T = tu::rand_int(rng, 1, std::max<int64_t>(1, std::min<int64_t>(20, rows_budget / B)));
    LpCase c = lp_case(rng, B, T, V, temps[rep % 3], rep);
    std::vector<float> g_lp = tu::normal(rng, c.n()), g_h = tu::normal(rng, c.n());
    if (rep % 4 == 1) g_h.clear();
    if (rep % 4 == 2) g_lp.clear();
    lp_check(c, g_lp, g_h, "V=" + std::to_string(V) + " " + tu::shape_str(B, T));
    ++rep;
  }
}

TEST(parity_logprobs_many_rows_and_extremes) {
  tu::Rng rng(102);
  {
    LpCase c = lp_case(rng, 64, 200, 37, 0.9f, 4);
    lp_check(c, tu::normal(rng, c.n()), tu::normal(rng, c.n()), "64x200x37");
  }
  for (float temp : {1.0f, 0.6f}) {
    LpCase big = lp_case(rng, 3, 4, 3000, temp, 0);
    big.logits = tu::uniform(rng, big.n() * big.V, -1e4, 1e4);
    lp_check(big, tu::normal(rng, big.n()), tu::normal(rng, big.n()), "uniform +-1e4");
    LpCase off = lp_case(rng, 3, 4, 3000, temp, 0);
    for (auto& x : off.logits) x += 1e4f;
    lp_check(off, tu::normal(rng, off.n()), tu::normal(rng, off.n()), "1e4 + N(0,2)");
    LpCase tiny = lp_case(rng, 3, 4, 3000, temp, 0);
    for (auto& x : tiny.logits) x *= 1e-30f;
    lp_check(tiny, tu::normal(rng, tiny.n()), tu::normal(rng, tiny.n()), "1e-30 scale");
    // Banned tokens (-inf), never the taken one.
    LpCase ban = lp_case(rng, 4, 6, 777, temp, 2);
    for (int64_t i = 0; i < ban.n(); ++i)
      for (int64_t v = 0; v < ban.V; ++v)
        if (v != ban.tokens[i] && tu::rand_int(rng, 0, 2) == 0)
          ban.logits[i * ban.V + v] = -tu::kInf;
    lp_check(ban, tu::normal(rng, ban.n()), tu::normal(rng, ban.n()), "-inf logits");
  }
}

TEST(parity_logprobs_padding_null_mask_determinism) {
  tu::Rng rng(103);
  LpCase c = lp_case(rng, 6, 30, 2049, 0.8f, 4);
  if (c.mask.empty()) c.mask = tu::make_mask(rng, c.B, c.T, MaskKind::Random);
  std::vector<float> g_lp = tu::normal(rng, c.n()), g_h = tu::normal(rng, c.n());
  LpOut a = lp_run(c, g_gpu, g_lp, g_h);
  LpOut a2 = lp_run(c, g_gpu, g_lp, g_h);
  CHECK_BITWISE_EQUAL(a.lp.data(), a2.lp.data(), c.n(), "logprobs repeat");
  CHECK_BITWISE_EQUAL(a.ent.data(), a2.ent.data(), c.n(), "entropy repeat");
  CHECK_BITWISE_EQUAL(a.grad.data(), a2.grad.data(), c.n() * c.V, "grad repeat");
  // NaN / inf / garbage tokens in masked rows change nothing.
  LpCase d = c;
  tu::nonfinite_masked(d.logits, d.mask, d.V);
  std::vector<float> g_lp2 = g_lp, g_h2 = g_h;
  tu::nonfinite_masked(g_lp2, d.mask);
  tu::nonfinite_masked(g_h2, d.mask);
  for (int64_t i = 0; i < d.n(); ++i)
    if (d.mask[i] == 0.0f) d.tokens[i] = -3;
  LpOut b = lp_run(d, g_gpu, g_lp2, g_h2);
  CHECK_BITWISE_EQUAL(a.lp.data(), b.lp.data(), c.n(), "logprobs, NaN padding");
  CHECK_BITWISE_EQUAL(a.ent.data(), b.ent.data(), c.n(), "entropy, NaN padding");
  CHECK_BITWISE_EQUAL(a.grad.data(), b.grad.data(), c.n() * c.V, "grad, NaN padding");
  // nullptr mask == all-ones mask
  LpCase e = lp_case(rng, 3, 7, 5000, 1.0f, 0);
  e.mask.clear();
  std::vector<float> g = tu::normal(rng, e.n());
  LpOut p = lp_run(e, g_gpu, g, g);
  e.mask.assign(e.n(), 1.0f);
  LpOut q = lp_run(e, g_gpu, g, g);
  CHECK_BITWISE_EQUAL(p.lp.data(), q.lp.data(), e.n(), "logprobs null vs ones");
  CHECK_BITWISE_EQUAL(p.ent.data(), q.ent.data(), e.n(), "entropy null vs ones");
  CHECK_BITWISE_EQUAL(p.grad.data(), q.grad.data(), e.n() * e.V, "grad null vs ones");
}

// ---- KL rewards ---------------------------------------------------------------------------

namespace {

struct KlOut {
  std::vector<float> rewards, kl;
};

KlOut kl_run(Device dev, int64_t B, int64_t T, const std::vector<float>& lp,
             const std::vector<float>& rl, const std::vector<float>& scores,
             const std::vector<float>& mask, float coef, ppo::KlEstimator est) {
  KlOut o{tu::poisoned(B * T), tu::poisoned(B * T)};
  ppo::KlRewardsArgs a;
  a.batch = B, a.steps = T, a.logprobs = lp.data(), a.ref_logprobs = rl.data();
  a.scores = scores.data(), a.mask = ptr(mask), a.kl_coef = coef, a.estimator = est;
  a.rewards = o.rewards.data(), a.kl = o.kl.data();
  ppo::kl_penalized_rewards(dev, a);
  return o;
}

}  // namespace

TEST(parity_kl_rewards) {
  tu::Rng rng(201);
  const int64_t shapes[][2] = {{1, 1}, {1, 1000}, {7, 33}, {64, 512}, {513, 3}, {16, 4097}};
  int rep = 0;
  for (auto& s : shapes) {
    for (int e = 1; e <= 3; ++e) {
      const int64_t B = s[0], T = s[1];
      std::vector<float> lp = tu::uniform(rng, B * T, -12, 0), rl(B * T);
      for (int64_t i = 0; i < B * T; ++i)
        rl[i] = lp[i] + static_cast<float>(tu::rand_uniform(rng, -1, 1) * (rep % 2 ? 3 : 0.1));
      std::vector<float> scores = tu::normal(rng, B, 0.0, rep % 3 == 2 ? 1e6 : 2.0);
      std::vector<float> mask = maybe_mask(rng, B, T, rep);
      const float coef = rep % 4 == 0 ? 0.0f : 0.05f * static_cast<float>(rep % 4);
      const auto est = static_cast<ppo::KlEstimator>(e);
      KlOut cpu = kl_run(Device::Cpu, B, T, lp, rl, scores, mask, coef, est);
      KlOut gpu = kl_run(g_gpu, B, T, lp, rl, scores, mask, coef, est);
      std::vector<double> rr(B * T), rk(B * T);
      auto lpd = tu::to_double(lp), rld = tu::to_double(rl), sd = tu::to_double(scores);
      auto md = tu::mask_to_double(ptr(mask), B * T);
      ref::kl_rewards(B, T, lpd.data(), rld.data(), sd.data(), tu::ptr_or_null(md), coef, e,
                      rr.data(), rk.data());
      const std::string what = tu::shape_str(B, T) + " k" + std::to_string(e);
      // As in test_rewards.cpp: kl 1e-6 abs + 1e-5 rel; rewards add the coef-scaled kl
      // error and a final rounding at the score's scale.
      compare3(gpu.kl, cpu.kl, rk, 1e-6, 1e-5, what + " kl");
      compare3(gpu.rewards, cpu.rewards, rr, 1e-6 * (1 + coef), 1e-5, what + " rewards");
      check_masked_zero(gpu.rewards, mask, 1, what + " rewards");
      check_masked_zero(gpu.kl, mask, 1, what + " kl");
      KlOut again = kl_run(g_gpu, B, T, lp, rl, scores, mask, coef, est);
      CHECK_BITWISE_EQUAL(gpu.rewards.data(), again.rewards.data(), B * T, "rewards repeat");
      CHECK_BITWISE_EQUAL(gpu.kl.data(), again.kl.data(), B * T, "kl repeat");
      if (!mask.empty()) {
        std::vector<float> lp2 = lp, rl2 = rl;
        tu::nonfinite_masked(lp2, mask);
        tu::nonfinite_masked(rl2, mask);
        KlOut z = kl_run(g_gpu, B, T, lp2, rl2, scores, mask, coef, est);
        CHECK_BITWISE_EQUAL(gpu.rewards.data(), z.rewards.data(), B * T, "rewards NaN padding");
        CHECK_BITWISE_EQUAL(gpu.kl.data(), z.kl.data(), B * T, "kl NaN padding");
      }
      ++rep;
    }
  }
}

// ---- moments / normalize -------------------------------------------------------------------

TEST(parity_moments) {
  tu::Rng rng(301);
  const int64_t counts[] = {1, 2, 3, 31, 32, 33, 255, 256, 257, 1023, 1024, 1025,
                            65537, 1000003, 4000037};
  int rep = 0;
  for (int64_t n : counts) {
    const double offset = rep % 3 == 0 ? 0.0 : rep % 3 == 1 ? -7.0 : 1e6;
    std::vector<float> v = tu::normal(rng, n, offset, rep % 2 ? 1.0 : 1e-2);
    ppo::MomentsArgs a;
    a.count = n, a.values = v.data();
    const ppo::Moments c = ppo::batch_moments(Device::Cpu, a);
    const ppo::Moments g = ppo::batch_moments(g_gpu, a);
    const ppo::Moments g2 = ppo::batch_moments(g_gpu, a);
    auto d = tu::to_double(v);
    const ref::Moments r = ref::moments(n, d.data());
    const double scale = std::fabs(offset) + 1;
    const std::string what = "n=" + std::to_string(n);
    // Both accumulate in double: only summation order differs (1e-10 relative; a float
    // accumulator would be off by >= 1e-7).
    CHECK_NEAR_CTX(g.count, r.count, 0, 0, what);
    CHECK_NEAR_CTX(g.mean, r.mean, 1e-12 * scale, 1e-10, what + " mean vs ref");
    CHECK_NEAR_CTX(g.m2, r.m2, 1e-12 * scale * scale, 1e-9, what + " m2 vs ref");
    CHECK_NEAR_CTX(g.mean, c.mean, 2e-12 * scale, 2e-10, what + " mean vs cpu");
    CHECK_NEAR_CTX(g.m2, c.m2, 2e-12 * scale * scale, 2e-9, what + " m2 vs cpu");
    CHECK(tf::same_bits(g.mean, g2.mean));
    CHECK(tf::same_bits(g.m2, g2.m2));
    CHECK(tf::same_bits(g.count, g2.count));
    ++rep;
  }
}

TEST(parity_normalize) {
  tu::Rng rng(302);
  const int64_t counts[] = {1, 7, 256, 1025, 100003};
  int rep = 0;
  for (int64_t n : counts) {
    for (int variant = 0; variant < 3; ++variant, ++rep) {
      const double offset = variant == 2 ? 1e6 : 1.5, sd = variant == 2 ? 10.0 : 2.0;
      std::vector<float> v = tu::normal(rng, n, offset, sd);
      ppo::NormalizeScoresArgs a;
      a.count = n, a.values = v.data(), a.mean = offset + 0.1, a.std = sd * 1.1;
      a.subtract_mean = variant != 1;
      a.eps = variant == 1 ? 0.5f : 1e-8f;
      a.clip = variant == 0 ? 0.0f : 2.5f;
      std::vector<float> cpu = tu::poisoned(n), gpu = tu::poisoned(n), gpu2 = tu::poisoned(n);
      a.out = cpu.data();
      ppo::normalize_scores(Device::Cpu, a);
      a.out = gpu.data();
      ppo::normalize_scores(g_gpu, a);
      a.out = gpu2.data();
      ppo::normalize_scores(g_gpu, a);
      auto d = tu::to_double(v);
      std::vector<double> r(n);
      ref::normalize(n, d.data(), a.mean, a.std, a.subtract_mean, a.eps, a.clip, r.data());
      // Float x - mean: a few ulps of max(|x|, |mean|) relative to std + eps.
      const double tol = 4e-7 * (tu::max_abs(v) + std::fabs(a.mean)) / (a.std + a.eps) + 1e-7;
      compare3(gpu, cpu, r, tol, 1e-6, "normalize n=" + std::to_string(n));
      CHECK_BITWISE_EQUAL(gpu.data(), gpu2.data(), n, "normalize repeat");
    }
  }
}

// ---- GAE / whiten / clip ---------------------------------------------------------------------

TEST(parity_gae) {
  tu::Rng rng(401);
  const int64_t shapes[][2] = {{1, 1}, {1, 5000}, {3, 17}, {256, 128}, {1025, 9}, {8, 4096}};
  const float gl[][2] = {{1.0f, 0.95f}, {0.99f, 1.0f}, {0.0f, 0.5f}, {0.9f, 0.0f},
                         {1.0f, 1.0f}, {0.0f, 0.0f}};
  int rep = 0;
  for (auto& s : shapes) {
    for (auto& g : gl) {
      const int64_t B = s[0], T = s[1];
      const double scale = rep % 7 == 3 ? 1e6 : 1.0;
      std::vector<float> r = tu::normal(rng, B * T, 0, scale), v = tu::normal(rng, B * T, 0, scale);
      std::vector<float> mask = maybe_mask(rng, B, T, rep);
      auto run = [&](Device dev, const std::vector<float>& rr, const std::vector<float>& vv) {
        std::vector<float> adv = tu::poisoned(B * T), ret = tu::poisoned(B * T);
        ppo::GaeArgs a;
        a.batch = B, a.steps = T, a.rewards = rr.data(), a.values = vv.data();
        a.mask = ptr(mask), a.gamma = g[0], a.lambda = g[1];
        a.advantages = adv.data(), a.returns = ret.data();
        ppo::gae(dev, a);
        return std::make_pair(adv, ret);
      };
      auto cpu = run(Device::Cpu, r, v);
      auto gpu = run(g_gpu, r, v);
      auto gpu2 = run(g_gpu, r, v);
      std::vector<double> ra(B * T), rr(B * T);
      auto rd = tu::to_double(r), vd = tu::to_double(v);
      auto md = tu::mask_to_double(ptr(mask), B * T);
      ref::gae(B, T, rd.data(), vd.data(), tu::ptr_or_null(md), g[0], g[1], ra.data(), rr.data());
      // As in test_advantages.cpp: float deltas (2.4e-7 scale each) summed over <= T terms.
      const double tol = 2.4e-7 * (tu::max_abs(r) + tu::max_abs(v)) * static_cast<double>(T);
      const std::string what = tu::shape_str(B, T) + " g=" + std::to_string(g[0]) +
                               " l=" + std::to_string(g[1]);
      compare3(gpu.first, cpu.first, ra, tol, 1e-6, what + " advantages");
      compare3(gpu.second, cpu.second, rr, tol, 1e-6, what + " returns");
      check_masked_zero(gpu.first, mask, 1, what + " advantages");
      check_masked_zero(gpu.second, mask, 1, what + " returns");
      CHECK_BITWISE_EQUAL(gpu.first.data(), gpu2.first.data(), B * T, "advantages repeat");
      CHECK_BITWISE_EQUAL(gpu.second.data(), gpu2.second.data(), B * T, "returns repeat");
      if (!mask.empty()) {
        std::vector<float> r2 = r, v2 = v;
        tu::nonfinite_masked(r2, mask);
        tu::nonfinite_masked(v2, mask);
        auto z = run(g_gpu, r2, v2);
        CHECK_BITWISE_EQUAL(gpu.first.data(), z.first.data(), B * T, "advantages NaN padding");
        CHECK_BITWISE_EQUAL(gpu.second.data(), z.second.data(), B * T, "returns NaN padding");
      }
      ++rep;
    }
  }
}

TEST(parity_whiten) {
  tu::Rng rng(402);
  const int64_t shapes[][2] = {{1, 1}, {1, 2}, {5, 13}, {64, 1024}, {1000, 1000}, {3, 100003}};
  int rep = 0;
  for (auto& s : shapes) {
    for (int variant = 0; variant < 4; ++variant, ++rep) {
      const int64_t B = s[0], T = s[1];
      const double offset = variant == 3 ? 1e4 : 0.5, sd = variant == 2 ? 1e-3 : 3.0;
      std::vector<float> x = tu::normal(rng, B * T, offset, sd);
      std::vector<float> mask = maybe_mask(rng, B, T, rep);
      ppo::WhitenArgs a;
      a.batch = B, a.steps = T, a.values = x.data(), a.mask = ptr(mask);
      a.shift_mean = variant % 2 == 0;
      a.eps = variant == 1 ? 0.1f : 1e-8f;
      a.clip = variant == 0 ? 0.0f : 3.0f;
      auto run = [&](Device dev, const std::vector<float>& xx) {
        std::vector<float> out = tu::poisoned(B * T);
        ppo::WhitenArgs b = a;
        b.values = xx.data(), b.out = out.data();
        ppo::whiten(dev, b);
        return out;
      };
      std::vector<float> cpu = run(Device::Cpu, x), gpu = run(g_gpu, x), gpu2 = run(g_gpu, x);
      auto xd = tu::to_double(x);
      auto md = tu::mask_to_double(ptr(mask), B * T);
      std::vector<double> r(B * T);
      ref::whiten(B, T, xd.data(), tu::ptr_or_null(md), a.shift_mean, a.eps, a.clip, r.data());
      // As in test_advantages.cpp: float x - mean costs a few ulps of max(|x|, |mean|)
      // over the whitening std; the reference std is recomputed for the bound.
      double s1 = 0, cnt = 0;
      for (int64_t i = 0; i < B * T; ++i)
        if (md.empty() || md[i] != 0) s1 += xd[i], cnt += 1;
      const double mean = cnt > 0 ? s1 / cnt : 0.0;
      double q = 0;
      for (int64_t i = 0; i < B * T; ++i)
        if (md.empty() || md[i] != 0) q += (xd[i] - mean) * (xd[i] - mean);
      const double wsd = std::sqrt((cnt > 1 ? q / (cnt - 1) : 0.0) + a.eps);
      const double tol =
          4e-7 * (tu::max_abs(x) + std::fabs(mean)) / wsd + 4e-7 * std::fabs(mean);
      const std::string what = "whiten " + tu::shape_str(B, T) + " v" + std::to_string(variant);
      compare3(gpu, cpu, r, tol, 1e-6, what);
      check_masked_zero(gpu, mask, 1, what);
      CHECK_BITWISE_EQUAL(gpu.data(), gpu2.data(), B * T, (what + " repeat").c_str());
      if (!mask.empty()) {
        std::vector<float> x2 = x;
        tu::nonfinite_masked(x2, mask);
        std::vector<float> z = run(g_gpu, x2);
        CHECK_BITWISE_EQUAL(gpu.data(), z.data(), B * T, (what + " NaN padding").c_str());
      }
    }
  }
}

TEST(parity_clip) {
  tu::Rng rng(403);
  const int64_t shapes[][2] = {{1, 1}, {7, 31}, {512, 1025}};
  int rep = 0;
  for (auto& s : shapes) {
    for (float c : {1.0f, 0.25f, 1e-30f}) {
      const int64_t B = s[0], T = s[1];
      std::vector<float> x = tu::normal(rng, B * T, 0.0, 2.0);
      std::vector<float> mask = maybe_mask(rng, B, T, rep++);
      auto run = [&](Device dev, const std::vector<float>& xx) {
        std::vector<float> out = tu::poisoned(B * T);
        ppo::ClipArgs a;
        a.batch = B, a.steps = T, a.values = xx.data(), a.mask = ptr(mask), a.clip = c;
        a.out = out.data();
        ppo::clip_masked(dev, a);
        return out;
      };
      std::vector<float> cpu = run(Device::Cpu, x), gpu = run(g_gpu, x);
      // Clipping is exact: bit-identical to the CPU.
      CHECK_BITWISE_EQUAL(gpu.data(), cpu.data(), B * T, "clip gpu vs cpu");
      check_masked_zero(gpu, mask, 1, "clip");
      if (!mask.empty()) {
        std::vector<float> x2 = x;
        tu::nonfinite_masked(x2, mask);
        std::vector<float> z = run(g_gpu, x2);
        CHECK_BITWISE_EQUAL(gpu.data(), z.data(), B * T, "clip NaN padding");
      }
    }
  }
}

// ---- losses ------------------------------------------------------------------------------------

TEST(parity_policy_loss) {
  tu::Rng rng(501);
  const int64_t shapes[][2] = {{1, 1}, {1, 3000}, {9, 41}, {256, 512}, {2049, 3}, {64, 4096}};
  int rep = 0;
  for (auto& s : shapes) {
    for (int variant = 0; variant < 3; ++variant, ++rep) {
      const int64_t B = s[0], T = s[1];
      const float eps = variant == 1 ? 0.1f : 0.2f;
      std::vector<float> old = tu::uniform(rng, B * T, -10, 0), lp(B * T);
      std::vector<float> adv = tu::normal(rng, B * T, 0.0, variant == 2 ? 1e4 : 1.0);
      // Log-ratios kept >= 1e-3 (relative) from the clip boundaries so both backends take
      // the same branch everywhere: clip_fraction is then exact.
      for (int64_t i = 0; i < B * T; ++i) {
        for (;;) {
          lp[i] = old[i] + static_cast<float>(tu::rand_uniform(rng, -0.5, 0.5));
          const double ratio = std::exp(static_cast<double>(lp[i]) - old[i]);
          if (std::fabs(ratio - (1 - eps)) > 1.2e-3 && std::fabs(ratio - (1 + eps)) > 1.2e-3)
            break;
        }
      }
      std::vector<float> mask = maybe_mask(rng, B, T, rep);
      auto run = [&](Device dev, const std::vector<float>& l, const std::vector<float>& o,
                     const std::vector<float>& ad) {
        std::vector<float> grad = tu::poisoned(B * T);
        ppo::PolicyLossArgs a;
        a.batch = B, a.steps = T, a.logprobs = l.data(), a.old_logprobs = o.data();
        a.advantages = ad.data(), a.mask = ptr(mask), a.clip_eps = eps;
        a.grad_logprobs = grad.data();
        ppo::PolicyLossResult r = ppo::policy_loss(dev, a);
        return std::make_pair(r, grad);
      };
      auto cpu = run(Device::Cpu, lp, old, adv);
      auto gpu = run(g_gpu, lp, old, adv);
      auto gpu2 = run(g_gpu, lp, old, adv);
      auto lpd = tu::to_double(lp), od = tu::to_double(old), ad = tu::to_double(adv);
      auto md = tu::mask_to_double(ptr(mask), B * T);
      std::vector<double> rg(B * T);
      ref::PolicyLoss r = ref::policy_loss(B, T, lpd.data(), od.data(), ad.data(),
                                           tu::ptr_or_null(md), eps, rg.data());
      // As in test_losses.cpp: float ratio carries ~(2e-7 |lp|max + 1e-6) relative error.
      const double rel_in = 2e-7 * 10.5 + 1e-6;
      double term_max = 0, ratio_max = 1;
      for (int64_t i = 0; i < B * T; ++i) {
        const double ratio = std::exp(lpd[i] - od[i]);
        term_max = std::max(term_max, std::fabs(ad[i]) * ratio);
        ratio_max = std::max(ratio_max, ratio);
      }
      const std::string what = "policy " + tu::shape_str(B, T) + " v" + std::to_string(variant);
      const ppo::PolicyLossResult& g = gpu.first;
      const ppo::PolicyLossResult& c = cpu.first;
      CHECK(g.tokens == r.tokens);
      CHECK(g.tokens == c.tokens);
      CHECK_NEAR_CTX(g.loss, r.loss, rel_in * term_max, 1e-6, what + " loss vs ref");
      CHECK_NEAR_CTX(g.loss, c.loss, 2 * rel_in * term_max, 2e-6, what + " loss vs cpu");
      CHECK_NEAR_CTX(g.approx_kl, r.approx_kl, rel_in * ratio_max, 1e-6, what + " kl vs ref");
      CHECK_NEAR_CTX(g.approx_kl, c.approx_kl, 2 * rel_in * ratio_max, 2e-6, what + " kl vs cpu");
      CHECK_NEAR_CTX(g.clip_fraction, r.clip_fraction, 1e-12, 0, what + " clip_fraction");
      CHECK_NEAR_CTX(g.clip_fraction, c.clip_fraction, 1e-12, 0, what + " clip_fraction cpu");
      const double n = std::max<double>(1.0, static_cast<double>(r.tokens));
      compare3(gpu.second, cpu.second, rg, 1e-12 / n, rel_in, what + " grad");
      check_masked_zero(gpu.second, mask, 1, what + " grad");
      CHECK(tf::same_bits(g.loss, gpu2.first.loss));
      CHECK(tf::same_bits(g.approx_kl, gpu2.first.approx_kl));
      CHECK(tf::same_bits(g.clip_fraction, gpu2.first.clip_fraction));
      CHECK_BITWISE_EQUAL(gpu.second.data(), gpu2.second.data(), B * T, "grad repeat");
      if (!mask.empty()) {
        std::vector<float> l2 = lp, o2 = old, a2 = adv;
        tu::nonfinite_masked(l2, mask);
        tu::nonfinite_masked(o2, mask);
        tu::nonfinite_masked(a2, mask);
        auto z = run(g_gpu, l2, o2, a2);
        CHECK(tf::same_bits(g.loss, z.first.loss));
        CHECK(tf::same_bits(g.approx_kl, z.first.approx_kl));
        CHECK(tf::same_bits(g.clip_fraction, z.first.clip_fraction));
        CHECK_BITWISE_EQUAL(gpu.second.data(), z.second.data(), B * T, "grad NaN padding");
      }
    }
  }
}

TEST(parity_value_loss) {
  tu::Rng rng(502);
  const int64_t shapes[][2] = {{1, 1}, {1, 3000}, {9, 41}, {256, 512}, {2049, 3}, {64, 4096}};
  int rep = 0;
  for (auto& s : shapes) {
    for (int variant = 0; variant < 3; ++variant, ++rep) {
      const int64_t B = s[0], T = s[1];
      const bool use_clip = variant != 1;
      const double scale = variant == 2 ? 1e3 : 1.0;
      const float eps = static_cast<float>(0.2 * scale);
      const double margin = 1e-3 * scale;
      std::vector<float> old = tu::normal(rng, B * T, 0.0, scale), v(B * T), ret(B * T);
      // Away from the kinks: | |V - old| - eps | and |R - (V + vc) / 2| > 1e-3 scale.
      for (int64_t i = 0; i < B * T; ++i) {
        for (;;) {
          v[i] = old[i] + static_cast<float>(tu::rand_uniform(rng, -0.6, 0.6) * scale);
          if (std::fabs(std::fabs(static_cast<double>(v[i]) - old[i]) - eps) > margin) break;
        }
        const double vc = std::min(std::max(static_cast<double>(v[i]), double(old[i]) - eps),
                                   double(old[i]) + eps);
        for (;;) {
          ret[i] = v[i] + static_cast<float>(tu::rand_uniform(rng, -1, 1) * scale);
          if (vc == v[i] || std::fabs(ret[i] - 0.5 * (v[i] + vc)) > margin) break;
        }
      }
      std::vector<float> mask = maybe_mask(rng, B, T, rep);
      auto run = [&](Device dev, const std::vector<float>& vv, const std::vector<float>& oo,
                     const std::vector<float>& rr) {
        std::vector<float> grad = tu::poisoned(B * T);
        ppo::ValueLossArgs a;
        a.batch = B, a.steps = T, a.values = vv.data(), a.old_values = oo.data();
        a.returns = rr.data(), a.mask = ptr(mask), a.use_clip = use_clip, a.clip_eps = eps;
        a.grad_values = grad.data();
        ppo::ValueLossResult r = ppo::value_loss(dev, a);
        return std::make_pair(r, grad);
      };
      auto cpu = run(Device::Cpu, v, old, ret);
      auto gpu = run(g_gpu, v, old, ret);
      auto gpu2 = run(g_gpu, v, old, ret);
      auto vd = tu::to_double(v), od = tu::to_double(old), rd = tu::to_double(ret);
      auto md = tu::mask_to_double(ptr(mask), B * T);
      std::vector<double> rg(B * T);
      ref::ValueLoss r = ref::value_loss(B, T, vd.data(), od.data(), rd.data(),
                                         tu::ptr_or_null(md), use_clip, eps, rg.data());
      // As in test_losses.cpp: float differences cost a few ulps of the operands.
      const double sc = std::max({tu::max_abs(v), tu::max_abs(old), tu::max_abs(ret)});
      double dmax = 0;
      for (int64_t i = 0; i < B * T; ++i) dmax = std::max(dmax, std::fabs(vd[i] - rd[i]) + eps);
      const double n = std::max<double>(1.0, static_cast<double>(r.tokens));
      const std::string what = "value " + tu::shape_str(B, T) + " v" + std::to_string(variant);
      const ppo::ValueLossResult& g = gpu.first;
      const ppo::ValueLossResult& c = cpu.first;
      CHECK(g.tokens == r.tokens);
      CHECK(g.tokens == c.tokens);
      CHECK_NEAR_CTX(g.loss, r.loss, 1e-6 * sc * dmax, 1e-6, what + " loss vs ref");
      CHECK_NEAR_CTX(g.loss, c.loss, 2e-6 * sc * dmax, 2e-6, what + " loss vs cpu");
      CHECK_NEAR_CTX(g.clip_fraction, r.clip_fraction, 1e-12, 0, what + " clip_fraction");
      CHECK_NEAR_CTX(g.clip_fraction, c.clip_fraction, 1e-12, 0, what + " clip_fraction cpu");
      compare3(gpu.second, cpu.second, rg, 4e-7 * sc / n, 1e-6, what + " grad");
      check_masked_zero(gpu.second, mask, 1, what + " grad");
      CHECK(tf::same_bits(g.loss, gpu2.first.loss));
      CHECK(tf::same_bits(g.clip_fraction, gpu2.first.clip_fraction));
      CHECK_BITWISE_EQUAL(gpu.second.data(), gpu2.second.data(), B * T, "grad repeat");
      if (!mask.empty()) {
        std::vector<float> v2 = v, o2 = old, r2 = ret;
        tu::nonfinite_masked(v2, mask);
        tu::nonfinite_masked(o2, mask);
        tu::nonfinite_masked(r2, mask);
        auto z = run(g_gpu, v2, o2, r2);
        CHECK(tf::same_bits(g.loss, z.first.loss));
        CHECK(tf::same_bits(g.clip_fraction, z.first.clip_fraction));
        CHECK_BITWISE_EQUAL(gpu.second.data(), z.second.data(), B * T, "grad NaN padding");
      }
    }
  }
}

// ---- all-masked inputs on the GPU ---------------------------------------------------------------

TEST(parity_all_masked_batch) {
  const int64_t B = 4, T = 9, V = 300;
  tu::Rng rng(601);
  std::vector<float> zero(B * T, 0.0f);
  std::vector<float> x = tu::normal(rng, B * T), y = tu::normal(rng, B * T);
  std::vector<float> z = tu::normal(rng, B * T);
  {
    LpCase c{B, T, V, tu::normal(rng, B * T * V), zero, tu::tokens(rng, B * T, V), 1.0f};
    LpOut o = lp_run(c, g_gpu, x, y);
    for (float a : o.lp) CHECK(a == 0.0f);
    for (float a : o.ent) CHECK(a == 0.0f);
    for (float a : o.grad) CHECK(a == 0.0f);
  }
  {
    std::vector<float> s = tu::normal(rng, B);
    KlOut o = kl_run(g_gpu, B, T, x, y, s, zero, 0.1f, ppo::KlEstimator::K3);
    for (float a : o.rewards) CHECK(a == 0.0f);
    for (float a : o.kl) CHECK(a == 0.0f);
  }
  {
    std::vector<float> adv = tu::poisoned(B * T), ret = tu::poisoned(B * T);
    ppo::GaeArgs a;
    a.batch = B, a.steps = T, a.rewards = x.data(), a.values = y.data(), a.mask = zero.data();
    a.advantages = adv.data(), a.returns = ret.data();
    ppo::gae(g_gpu, a);
    for (float v : adv) CHECK(v == 0.0f);
    for (float v : ret) CHECK(v == 0.0f);
  }
  for (bool shift : {true, false}) {
    std::vector<float> out = tu::poisoned(B * T);
    ppo::WhitenArgs a;
    a.batch = B, a.steps = T, a.values = x.data(), a.mask = zero.data(), a.shift_mean = shift;
    a.out = out.data();
    ppo::whiten(g_gpu, a);
    for (float v : out) CHECK(v == 0.0f);
  }
  {
    std::vector<float> grad = tu::poisoned(B * T);
    ppo::PolicyLossArgs a;
    a.batch = B, a.steps = T, a.logprobs = x.data(), a.old_logprobs = y.data();
    a.advantages = z.data(), a.mask = zero.data(), a.grad_logprobs = grad.data();
    ppo::PolicyLossResult r = ppo::policy_loss(g_gpu, a);
    CHECK(r.loss == 0.0 && r.clip_fraction == 0.0 && r.approx_kl == 0.0 && r.tokens == 0);
    for (float v : grad) CHECK(v == 0.0f);
  }
  {
    std::vector<float> grad = tu::poisoned(B * T);
    ppo::ValueLossArgs a;
    a.batch = B, a.steps = T, a.values = x.data(), a.old_values = y.data();
    a.returns = z.data(), a.mask = zero.data(), a.grad_values = grad.data();
    ppo::ValueLossResult r = ppo::value_loss(g_gpu, a);
    CHECK(r.loss == 0.0 && r.clip_fraction == 0.0 && r.tokens == 0);
    for (float v : grad) CHECK(v == 0.0f);
  }
}

int main(int argc, char** argv) {
  const char* self = std::getenv("PPO_PARITY_SELF_TEST");
  if (self && std::string(self) == "1") {
    std::printf("PPO_PARITY_SELF_TEST=1: the CPU stands in for CUDA\n");
    g_gpu = Device::Cpu;
    return tf::run_all(argc, argv);
  }
  if (!ppo::cuda_available())
    return tf::skip_file("CUDA is not available: " + ppo::cuda_unavailable_reason());
  return tf::run_all(argc, argv);
}
