// policy_loss and value_loss on the CPU backend against the float64 reference; their
// gradients against central finite differences of the float64 reference loss.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/ops.h"
#include "reference.h"
#include "test_framework.h"
#include "test_util.h"

using ppo::Device;
using tu::MaskKind;

namespace {

const MaskKind kKinds[] = {MaskKind::Ones, MaskKind::Suffix, MaskKind::Prefix,
                           MaskKind::Random, MaskKind::Mixed};

// Inputs are built so that no element sits within kKinkMargin of a kink of the loss (the
// clip boundaries, the switch between the two terms of the max): the FD step (1e-6) and
// float rounding in the kernel (~1e-6 relative at most) then never cross a kink, so the
// derivative is unambiguous and clip counts are exact.
constexpr double kKinkMargin = 1e-3;
constexpr double kFdStep = 1e-6;

// ---- policy loss -------------------------------------------------------------------------

struct PolicyCase {
  int64_t B = 1, T = 1;
  std::vector<float> lp, old_lp, adv, mask;
  float clip_eps = 0.2f;
  int64_t n() const { return B * T; }
  const float* mask_ptr() const { return mask.empty() ? nullptr : mask.data(); }
};

// log-ratio d ~ N(0, d_std); resampled while exp(d) is within the margin of 1 +- eps.
PolicyCase random_policy(tu::Rng& rng, int64_t B, int64_t T, MaskKind mk, float eps,
                         double d_std = 0.3, double adv_scale = 1.0, double lp_offset = 0.0) {
  PolicyCase c;
  c.B = B, c.T = T, c.clip_eps = eps;
  c.old_lp = tu::uniform(rng, B * T, lp_offset - 10.0, lp_offset);
  c.lp.resize(B * T);
  c.adv = tu::normal(rng, B * T, 0.0, adv_scale);
  std::normal_distribution<double> nd(0.0, d_std);
  const double lo = 1.0 - static_cast<double>(eps), hi = 1.0 + static_cast<double>(eps);
  for (int64_t i = 0; i < B * T; ++i) {
    for (;;) {
      c.lp[i] = static_cast<float>(c.old_lp[i] + nd(rng));
      const double ratio = std::exp(static_cast<double>(c.lp[i]) - c.old_lp[i]);
      if (std::fabs(ratio - lo) > kKinkMargin * hi && std::fabs(ratio - hi) > kKinkMargin * hi)
        break;
    }
  }
  if (mk != MaskKind::Ones || tu::rand_int(rng, 0, 1)) c.mask = tu::make_mask(rng, B, T, mk);
  return c;
}

struct PolicyOut {
  ppo::PolicyLossResult res;
  std::vector<float> grad;
};

PolicyOut run_policy(const PolicyCase& c, bool with_grad = true) {
  PolicyOut o;
  if (with_grad) o.grad = tu::poisoned(c.n());
  ppo::PolicyLossArgs a;
  a.batch = c.B, a.steps = c.T;
  a.logprobs = c.lp.data();
  a.old_logprobs = c.old_lp.data();
  a.advantages = c.adv.data();
  a.mask = c.mask_ptr();
  a.clip_eps = c.clip_eps;
  a.grad_logprobs = with_grad ? o.grad.data() : nullptr;
  o.res = ppo::policy_loss(Device::Cpu, a);
  return o;
}

ref::PolicyLoss ref_policy(const PolicyCase& c, const std::vector<double>& lp,
                           double* grad = nullptr) {
  auto old = tu::to_double(c.old_lp), adv = tu::to_double(c.adv);
  auto m = tu::mask_to_double(c.mask_ptr(), c.n());
  return ref::policy_loss(c.B, c.T, lp.data(), old.data(), adv.data(), tu::ptr_or_null(m),
                          c.clip_eps, grad);
}

// Central differences of the float64 reference loss w.r.t. every log-prob.
std::vector<double> fd_policy(const PolicyCase& c) {
  std::vector<double> lp = tu::to_double(c.lp), g(c.n());
  for (int64_t i = 0; i < c.n(); ++i) {
    const double x0 = lp[i];
    lp[i] = x0 + kFdStep;
    const double fp = ref_policy(c, lp).loss;
    lp[i] = x0 - kFdStep;
    const double fm = ref_policy(c, lp).loss;
    lp[i] = x0;
    g[i] = (fp - fm) / (2 * kFdStep);
  }
  return g;
}

bool near_policy_kink(const PolicyCase& c, int64_t i) {
  const double r = std::exp(static_cast<double>(c.lp[i]) - c.old_lp[i]);
  const double lo = 1.0 - c.clip_eps, hi = 1.0 + c.clip_eps;
  return std::fabs(r - lo) <= kKinkMargin * 0.5 || std::fabs(r - hi) <= kKinkMargin * 0.5;
}

// Tolerances. The reference is exact; a kernel may form d = lp - old and ratio = exp(d)
// in float (d correctly rounded: ~6e-8 * |lp| absolute, so ratio is off by ~1e-7 * |lp|
// relative, plus an ulp or two from expf) and accumulates in double.
//  - loss: each term -A ratio is off by ~(1e-7 |lp|max + 3e-7) relative: abs tol
//    (2e-7 |lp|max + 1e-6) * max|A ratio|, plus 1e-6 relative.
//  - approx_kl: (ratio - 1) - d loses ~2 ulps of max(ratio, 1) to cancellation near
//    d = 0: abs tol (2e-7 |lp|max + 1e-6) * max(ratio, 1).
//  - grad: -A ratio / N per element, same relative error: 1e-6 * (1 + 0.2 |lp|max)
//    relative, no absolute slack needed beyond 1e-12 / N.
//  - clip_fraction and tokens are exact: no element is near a kink.
void check_policy(const PolicyCase& c, const std::string& what) {
  PolicyOut k = run_policy(c);
  std::vector<double> lp = tu::to_double(c.lp), rg(c.n());
  ref::PolicyLoss r = ref_policy(c, lp, rg.data());
  double lpmax = std::max(tu::max_abs(c.lp), tu::max_abs(c.old_lp));
  double term_max = 0.0, ratio_max = 1.0;
  for (int64_t i = 0; i < c.n(); ++i) {
    const double ratio = std::exp(lp[i] - c.old_lp[i]);
    term_max = std::max(term_max, std::fabs(c.adv[i]) * ratio);
    ratio_max = std::max(ratio_max, ratio);
  }
  const double rel_in = 2e-7 * lpmax + 1e-6;
  CHECK(k.res.tokens == r.tokens);
  CHECK_NEAR_CTX(k.res.loss, r.loss, rel_in * term_max, 1e-6, what + " loss");
  CHECK_NEAR_CTX(k.res.approx_kl, r.approx_kl, rel_in * ratio_max, 1e-6, what + " approx_kl");
  CHECK_NEAR_CTX(k.res.clip_fraction, r.clip_fraction, 1e-12, 0.0, what + " clip_fraction");
  const double n = std::max<double>(1.0, static_cast<double>(r.tokens));
  CHECK_ALL_NEAR(k.grad.data(), rg.data(), c.n(), 1e-12 / n, rel_in,
                 (what + " grad vs ref").c_str());
  // Skipping the gradient must not change the scalars.
  PolicyOut k2 = run_policy(c, /*with_grad=*/false);
  CHECK(tf::same_bits(k.res.loss, k2.res.loss));
  CHECK(tf::same_bits(k.res.approx_kl, k2.res.approx_kl));
  CHECK(tf::same_bits(k.res.clip_fraction, k2.res.clip_fraction));
  CHECK(k.res.tokens == k2.res.tokens);
}

}  // namespace

TEST(policy_loss_matches_reference_random_shapes) {
  tu::Rng rng(8001);
  const float epss[] = {0.2f, 0.1f, 0.3f, 0.05f};
  for (int rep = 0; rep < 60; ++rep) {
    const int64_t B = tu::rand_int(rng, 1, 10), T = tu::rand_int(rng, 1, 70);
    PolicyCase c = random_policy(rng, B, T, kKinds[rep % 5], epss[rep % 4],
                                 rep % 3 == 0 ? 0.05 : 0.4);
    check_policy(c, "case " + std::to_string(rep) + " " + tu::shape_str(B, T));
  }
}

TEST(policy_loss_reference_grad_matches_finite_differences) {
  // FD with h = 1e-6 on a piecewise-smooth loss, no kink within 1e-3: truncation is
  // exactly 0 for the linear pieces up to the exp curvature (~h^2), cancellation error
  // ~ eps_64 |loss| / h ~ 1e-10; compare with 1e-8 absolute.
  tu::Rng rng(8002);
  for (int rep = 0; rep < 20; ++rep) {
    PolicyCase c = random_policy(rng, tu::rand_int(rng, 1, 4), tu::rand_int(rng, 1, 30),
                                 kKinds[rep % 5], rep % 2 ? 0.2f : 0.1f);
    std::vector<double> lp = tu::to_double(c.lp), rg(c.n());
    ref_policy(c, lp, rg.data());
    std::vector<double> fd = fd_policy(c);
    CHECK_ALL_NEAR(rg.data(), fd.data(), c.n(), 1e-8, 1e-6, "ref grad vs FD");
  }
}

TEST(policy_loss_grad_matches_finite_differences) {
  tu::Rng rng(8003);
  for (int rep = 0; rep < 30; ++rep) {
    PolicyCase c = random_policy(rng, tu::rand_int(rng, 1, 5), tu::rand_int(rng, 1, 40),
                                 kKinds[rep % 5], rep % 2 ? 0.2f : 0.15f, 0.4,
                                 rep % 3 == 0 ? 10.0 : 1.0);
    for (int64_t i = 0; i < c.n(); ++i) CHECK(!near_policy_kink(c, i));
    PolicyOut k = run_policy(c);
    std::vector<double> fd = fd_policy(c);
    // Kernel grad (float, ~1e-6 relative, see check_policy) vs FD (~1e-10 absolute).
    CHECK_ALL_NEAR(k.grad.data(), fd.data(), c.n(), 1e-9, 1e-5,
                   ("case " + std::to_string(rep) + " grad vs FD").c_str());
  }
}

TEST(policy_loss_spot_values) {
  // Three tokens: ratio 1 with A = 2 (inside the clip range), ratio 1.5 with A = 1
  // (clipped to 1.2: the clipped term wins, no gradient), ratio 1.5 with A = -1 (the
  // unclipped term wins). N = 3.
  PolicyCase c;
  c.B = 1, c.T = 3, c.clip_eps = 0.2f;
  const float l15 = static_cast<float>(std::log(1.5));
  c.old_lp = {-1.0f, -2.0f, -2.0f};
  c.lp = {-1.0f, -2.0f + l15, -2.0f + l15};
  c.adv = {2.0f, 1.0f, -1.0f};
  PolicyOut k = run_policy(c);
  const double r = std::exp(static_cast<double>(c.lp[1]) - c.old_lp[1]);  // ~1.5
  const double want_loss = (-2.0 + -1.2 + r) / 3.0;
  CHECK_NEAR(k.res.loss, want_loss, 1e-6, 1e-6);
  CHECK_NEAR(k.res.clip_fraction, 1.0 / 3.0, 1e-12, 0.0);
  const double d = static_cast<double>(c.lp[1]) - c.old_lp[1];
  CHECK_NEAR(k.res.approx_kl, 2.0 * ((r - 1.0) - d) / 3.0, 1e-6, 1e-6);
  CHECK(k.res.tokens == 3);
  CHECK_NEAR(k.grad[0], -2.0 / 3.0, 1e-7, 1e-6);
  CHECK(k.grad[1] == 0.0f);
  CHECK_NEAR(k.grad[2], r / 3.0, 1e-7, 1e-6);
}

TEST(policy_loss_edge_cases) {
  tu::Rng rng(8004);
  // batch of one, length one
  check_policy(random_policy(rng, 1, 1, MaskKind::Ones, 0.2f), "1x1");
  check_policy(random_policy(rng, 6, 1, MaskKind::Random, 0.2f), "steps 1");
  // all-masked batch: all zeros, N = 0
  PolicyCase c = random_policy(rng, 3, 7, MaskKind::Ones, 0.2f);
  c.mask.assign(c.n(), 0.0f);
  PolicyOut k = run_policy(c);
  CHECK(k.res.loss == 0.0);
  CHECK(k.res.clip_fraction == 0.0);
  CHECK(k.res.approx_kl == 0.0);
  CHECK(k.res.tokens == 0);
  for (float g : k.grad) CHECK(g == 0.0f);
  // large advantages, large log-prob magnitudes, large and tiny ratios
  check_policy(random_policy(rng, 4, 20, MaskKind::Mixed, 0.2f, 0.3, 1e6), "A ~ 1e6");
  check_policy(random_policy(rng, 4, 20, MaskKind::Mixed, 0.2f, 0.3, 1e-30), "A ~ 1e-30");
  check_policy(random_policy(rng, 4, 20, MaskKind::Mixed, 0.2f, 0.3, 1.0, -1e3),
               "logprobs ~ -1e3");
  check_policy(random_policy(rng, 4, 20, MaskKind::Mixed, 0.2f, 3.0), "|log ratio| ~ 3");
}

TEST(policy_loss_null_mask_padding_determinism) {
  tu::Rng rng(8005);
  for (int rep = 0; rep < 4; ++rep) {
    PolicyCase c = random_policy(rng, 5, 23, MaskKind::Ones, 0.2f);
    c.mask.clear();
    PolicyOut a = run_policy(c);
    c.mask.assign(c.n(), 1.0f);
    PolicyOut b = run_policy(c);
    CHECK(tf::same_bits(a.res.loss, b.res.loss));
    CHECK(tf::same_bits(a.res.clip_fraction, b.res.clip_fraction));
    CHECK(tf::same_bits(a.res.approx_kl, b.res.approx_kl));
    CHECK(a.res.tokens == b.res.tokens);
    CHECK_BITWISE_EQUAL(a.grad.data(), b.grad.data(), c.n(), "grad null vs ones");

    PolicyCase m = random_policy(rng, 6, 30, MaskKind::Mixed, 0.2f);
    if (m.mask.empty()) m.mask = tu::make_mask(rng, m.B, m.T, MaskKind::Random);
    PolicyOut x = run_policy(m);
    for (int64_t i = 0; i < m.n(); ++i)
      if (m.mask[i] == 0.0f) CHECK(x.grad[i] == 0.0f);
    tu::scramble_masked(m.lp, m.mask, rng, 1, 30.0);
    tu::scramble_masked(m.old_lp, m.mask, rng, 1, 30.0);
    tu::scramble_masked(m.adv, m.mask, rng, 1, 1e6);
    PolicyOut y = run_policy(m);
    CHECK(tf::same_bits(x.res.loss, y.res.loss));
    CHECK(tf::same_bits(x.res.clip_fraction, y.res.clip_fraction));
    CHECK(tf::same_bits(x.res.approx_kl, y.res.approx_kl));
    CHECK(x.res.tokens == y.res.tokens);
    CHECK_BITWISE_EQUAL(x.grad.data(), y.grad.data(), m.n(), "grad after scramble");
    tu::nonfinite_masked(m.lp, m.mask);
    tu::nonfinite_masked(m.old_lp, m.mask);
    tu::nonfinite_masked(m.adv, m.mask);
    PolicyOut z = run_policy(m);
    CHECK(tf::same_bits(x.res.loss, z.res.loss));
    CHECK(tf::same_bits(x.res.clip_fraction, z.res.clip_fraction));
    CHECK(tf::same_bits(x.res.approx_kl, z.res.approx_kl));
    CHECK_BITWISE_EQUAL(x.grad.data(), z.grad.data(), m.n(), "grad, NaN/inf padding");
  }
  PolicyCase big = random_policy(rng, 256, 600, MaskKind::Mixed, 0.2f);
  PolicyOut p = run_policy(big), q = run_policy(big);
  CHECK(tf::same_bits(p.res.loss, q.res.loss));
  CHECK(tf::same_bits(p.res.clip_fraction, q.res.clip_fraction));
  CHECK(tf::same_bits(p.res.approx_kl, q.res.approx_kl));
  CHECK_BITWISE_EQUAL(p.grad.data(), q.grad.data(), big.n(), "grad repeat");
}

// ---- value loss --------------------------------------------------------------------------

namespace {

struct ValueCase {
  int64_t B = 1, T = 1;
  std::vector<float> v, old_v, ret, mask;
  bool use_clip = true;
  float clip_eps = 0.2f;
  int64_t n() const { return B * T; }
  const float* mask_ptr() const { return mask.empty() ? nullptr : mask.data(); }
};

// V - old ~ N(0, dv) resampled while | |V - old| - eps | < margin; R resampled while it
// sits within the margin of the midpoint (V + vc) / 2 where the two squares tie (only
// a kink when vc != V).
ValueCase random_value(tu::Rng& rng, int64_t B, int64_t T, MaskKind mk, bool use_clip,
                       float eps, double scale = 1.0, double dv = 0.3) {
  ValueCase c;
  c.B = B, c.T = T, c.use_clip = use_clip, c.clip_eps = eps;
  c.old_v = tu::normal(rng, B * T, 0.0, scale);
  c.v.resize(B * T);
  c.ret.resize(B * T);
  std::normal_distribution<double> nd(0.0, dv * scale), nr(0.0, scale);
  const double margin = kKinkMargin * scale;
  for (int64_t i = 0; i < B * T; ++i) {
    for (;;) {
      c.v[i] = static_cast<float>(c.old_v[i] + nd(rng));
      const double dist = std::fabs(static_cast<double>(c.v[i]) - c.old_v[i]);
      if (std::fabs(dist - eps) > margin) break;
    }
    const double lo = static_cast<double>(c.old_v[i]) - eps,
                 hi = static_cast<double>(c.old_v[i]) + eps;
    const double vc = std::min(std::max(static_cast<double>(c.v[i]), lo), hi);
    for (;;) {
      c.ret[i] = static_cast<float>(c.v[i] + nr(rng));
      if (vc == c.v[i] || std::fabs(c.ret[i] - 0.5 * (c.v[i] + vc)) > margin) break;
    }
  }
  if (mk != MaskKind::Ones || tu::rand_int(rng, 0, 1)) c.mask = tu::make_mask(rng, B, T, mk);
  return c;
}

struct ValueOut {
  ppo::ValueLossResult res;
  std::vector<float> grad;
};

ValueOut run_value(const ValueCase& c, bool with_grad = true) {
  ValueOut o;
  if (with_grad) o.grad = tu::poisoned(c.n());
  ppo::ValueLossArgs a;
  a.batch = c.B, a.steps = c.T;
  a.values = c.v.data();
  a.old_values = c.old_v.data();
  a.returns = c.ret.data();
  a.mask = c.mask_ptr();
  a.use_clip = c.use_clip;
  a.clip_eps = c.clip_eps;
  a.grad_values = with_grad ? o.grad.data() : nullptr;
  o.res = ppo::value_loss(Device::Cpu, a);
  return o;
}

ref::ValueLoss ref_value(const ValueCase& c, const std::vector<double>& v,
                         double* grad = nullptr) {
  auto old = tu::to_double(c.old_v), ret = tu::to_double(c.ret);
  auto m = tu::mask_to_double(c.mask_ptr(), c.n());
  return ref::value_loss(c.B, c.T, v.data(), old.data(), ret.data(), tu::ptr_or_null(m),
                         c.use_clip, c.clip_eps, grad);
}

std::vector<double> fd_value(const ValueCase& c) {
  std::vector<double> v = tu::to_double(c.v), g(c.n());
  for (int64_t i = 0; i < c.n(); ++i) {
    const double x0 = v[i];
    const double h = kFdStep * std::max(1.0, std::fabs(x0));
    v[i] = x0 + h;
    const double fp = ref_value(c, v).loss;
    v[i] = x0 - h;
    const double fm = ref_value(c, v).loss;
    v[i] = x0;
    g[i] = (fp - fm) / (2 * h);
  }
  return g;
}

// A kernel may form V - R, V - old and the clip bounds in float: each is off by a few
// ulps of the operands (~2.4e-7 * scale), so a squared term (V - R)^2 is off by
// ~5e-7 * scale * |V - R|. loss: abs tol 1e-6 * scale * max|V - R| + 1e-6 relative.
// grad = (V - R) / N: abs tol 4e-7 * scale / N + 1e-6 relative. clip_fraction exact.
void check_value(const ValueCase& c, const std::string& what) {
  ValueOut k = run_value(c);
  std::vector<double> v = tu::to_double(c.v), rg(c.n());
  ref::ValueLoss r = ref_value(c, v, rg.data());
  const double scale =
      std::max({tu::max_abs(c.v), tu::max_abs(c.old_v), tu::max_abs(c.ret), 1e-300});
  double dmax = 0.0;
  for (int64_t i = 0; i < c.n(); ++i)
    dmax = std::max(dmax, std::fabs(static_cast<double>(c.v[i]) - c.ret[i]) + c.clip_eps);
  const double n = std::max<double>(1.0, static_cast<double>(r.tokens));
  CHECK(k.res.tokens == r.tokens);
  CHECK_NEAR_CTX(k.res.loss, r.loss, 1e-6 * scale * dmax, 1e-6, what + " loss");
  CHECK_NEAR_CTX(k.res.clip_fraction, r.clip_fraction, 1e-12, 0.0, what + " clip_fraction");
  CHECK_ALL_NEAR(k.grad.data(), rg.data(), c.n(), 4e-7 * scale / n, 1e-6,
                 (what + " grad vs ref").c_str());
  ValueOut k2 = run_value(c, /*with_grad=*/false);
  CHECK(tf::same_bits(k.res.loss, k2.res.loss));
  CHECK(tf::same_bits(k.res.clip_fraction, k2.res.clip_fraction));
  CHECK(k.res.tokens == k2.res.tokens);
}

}  // namespace

TEST(value_loss_matches_reference_random_shapes) {
  tu::Rng rng(9001);
  const float epss[] = {0.2f, 0.5f, 0.05f, 1.0f};
  for (int rep = 0; rep < 60; ++rep) {
    const int64_t B = tu::rand_int(rng, 1, 10), T = tu::rand_int(rng, 1, 70);
    ValueCase c = random_value(rng, B, T, kKinds[rep % 5], rep % 4 != 3, epss[rep % 4]);
    check_value(c, "case " + std::to_string(rep) + (c.use_clip ? " clip " : " noclip ") +
                       tu::shape_str(B, T));
  }
}

TEST(value_loss_reference_grad_matches_finite_differences) {
  tu::Rng rng(9002);
  for (int rep = 0; rep < 20; ++rep) {
    ValueCase c = random_value(rng, tu::rand_int(rng, 1, 4), tu::rand_int(rng, 1, 30),
                               kKinds[rep % 5], rep % 3 != 0, 0.2f);
    std::vector<double> v = tu::to_double(c.v), rg(c.n());
    ref_value(c, v, rg.data());
    std::vector<double> fd = fd_value(c);
    // Quadratic pieces: central differences are exact up to rounding (~1e-10).
    CHECK_ALL_NEAR(rg.data(), fd.data(), c.n(), 1e-8, 1e-6, "ref grad vs FD");
  }
}

TEST(value_loss_grad_matches_finite_differences) {
  tu::Rng rng(9003);
  for (int rep = 0; rep < 30; ++rep) {
    const double scale = rep % 5 == 4 ? 100.0 : 1.0;
    const float eps = (rep % 2 ? 0.2f : 0.4f) * static_cast<float>(scale);
    ValueCase c = random_value(rng, tu::rand_int(rng, 1, 5), tu::rand_int(rng, 1, 40),
                               kKinds[rep % 5], rep % 4 != 0, eps, scale);
    ValueOut k = run_value(c);
    std::vector<double> fd = fd_value(c);
    const double n = std::max<double>(1.0, static_cast<double>(k.res.tokens));
    CHECK_ALL_NEAR(k.grad.data(), fd.data(), c.n(), 4e-7 * scale / n + 1e-9, 1e-5,
                   ("case " + std::to_string(rep) + " grad vs FD").c_str());
  }
}

TEST(value_loss_spot_values) {
  // Token 0: V = 1, old = 0, R = 3: vc = 0.2; (vc-R)^2 = 7.84 > (V-R)^2 = 4: the
  //   clipped term wins, grad 0, loss 0.5 * 7.84.
  // Token 1: V = 0.1, old = 0, R = 1: inside the range, vc = V: loss 0.5 * 0.81,
  //   grad (V - R) / N = -0.9 / 3.
  // Token 2: V = 1, old = 0, R = -3: vc = 0.2; (V-R)^2 = 16 > (vc-R)^2 = 10.24:
  //   unclipped wins, grad (1 + 3) / 3.
  ValueCase c;
  c.B = 1, c.T = 3, c.clip_eps = 0.2f;
  c.v = {1.0f, 0.1f, 1.0f};
  c.old_v = {0.0f, 0.0f, 0.0f};
  c.ret = {3.0f, 1.0f, -3.0f};
  ValueOut k = run_value(c);
  const double vc = 0.2f, v1 = 0.1f;
  const double want =
      0.5 * ((vc - 3.0) * (vc - 3.0) + (v1 - 1.0) * (v1 - 1.0) + 16.0) / 3.0;
  CHECK_NEAR(k.res.loss, want, 1e-6, 1e-6);
  CHECK_NEAR(k.res.clip_fraction, 1.0 / 3.0, 1e-12, 0.0);
  CHECK(k.res.tokens == 3);
  CHECK(k.grad[0] == 0.0f);
  CHECK_NEAR(k.grad[1], (v1 - 1.0) / 3.0, 1e-7, 1e-6);
  CHECK_NEAR(k.grad[2], 4.0 / 3.0, 1e-7, 1e-6);
  // Without clipping: 0.5 * mean (V - R)^2, grad (V - R) / N, clip_fraction 0.
  c.use_clip = false;
  k = run_value(c);
  CHECK_NEAR(k.res.loss, 0.5 * (4.0 + (v1 - 1.0) * (v1 - 1.0) + 16.0) / 3.0, 1e-6, 1e-6);
  CHECK(k.res.clip_fraction == 0.0);
  CHECK_NEAR(k.grad[0], -2.0 / 3.0, 1e-7, 1e-6);
  CHECK_NEAR(k.grad[2], 4.0 / 3.0, 1e-7, 1e-6);
}

TEST(value_loss_edge_cases) {
  tu::Rng rng(9004);
  for (bool clip : {true, false}) {
    check_value(random_value(rng, 1, 1, MaskKind::Ones, clip, 0.2f), "1x1");
    check_value(random_value(rng, 5, 1, MaskKind::Random, clip, 0.2f), "steps 1");
    ValueCase c = random_value(rng, 3, 7, MaskKind::Ones, clip, 0.2f);
    c.mask.assign(c.n(), 0.0f);
    ValueOut k = run_value(c);
    CHECK(k.res.loss == 0.0);
    CHECK(k.res.clip_fraction == 0.0);
    CHECK(k.res.tokens == 0);
    for (float g : k.grad) CHECK(g == 0.0f);
    ValueCase big = random_value(rng, 4, 20, MaskKind::Mixed, clip, 2e5f, 1e6);
    check_value(big, "values ~ 1e6");
    // 1e-15, not 1e-30: the squares must stay representable in float (1e-30 squared
    // underflows, which is float arithmetic, not a kernel bug).
    ValueCase tiny = random_value(rng, 4, 20, MaskKind::Mixed, clip, 2e-16f, 1e-15);
    check_value(tiny, "values ~ 1e-15");
  }
}

TEST(value_loss_null_mask_padding_determinism) {
  tu::Rng rng(9005);
  for (int rep = 0; rep < 4; ++rep) {
    ValueCase c = random_value(rng, 5, 23, MaskKind::Ones, rep % 2 == 0, 0.2f);
    c.mask.clear();
    ValueOut a = run_value(c);
    c.mask.assign(c.n(), 1.0f);
    ValueOut b = run_value(c);
    CHECK(tf::same_bits(a.res.loss, b.res.loss));
    CHECK(tf::same_bits(a.res.clip_fraction, b.res.clip_fraction));
    CHECK(a.res.tokens == b.res.tokens);
    CHECK_BITWISE_EQUAL(a.grad.data(), b.grad.data(), c.n(), "grad null vs ones");

    ValueCase m = random_value(rng, 6, 30, MaskKind::Mixed, rep % 2 == 0, 0.2f);
    if (m.mask.empty()) m.mask = tu::make_mask(rng, m.B, m.T, MaskKind::Random);
    ValueOut x = run_value(m);
    for (int64_t i = 0; i < m.n(); ++i)
      if (m.mask[i] == 0.0f) CHECK(x.grad[i] == 0.0f);
    tu::scramble_masked(m.v, m.mask, rng, 1, 1e4);
    tu::scramble_masked(m.old_v, m.mask, rng, 1, 1e4);
    tu::scramble_masked(m.ret, m.mask, rng, 1, 1e4);
    ValueOut y = run_value(m);
    CHECK(tf::same_bits(x.res.loss, y.res.loss));
    CHECK(tf::same_bits(x.res.clip_fraction, y.res.clip_fraction));
    CHECK(x.res.tokens == y.res.tokens);
    CHECK_BITWISE_EQUAL(x.grad.data(), y.grad.data(), m.n(), "grad after scramble");
    tu::nonfinite_masked(m.v, m.mask);
    tu::nonfinite_masked(m.old_v, m.mask);
    tu::nonfinite_masked(m.ret, m.mask);
    ValueOut z = run_value(m);
    CHECK(tf::same_bits(x.res.loss, z.res.loss));
    CHECK(tf::same_bits(x.res.clip_fraction, z.res.clip_fraction));
    CHECK_BITWISE_EQUAL(x.grad.data(), z.grad.data(), m.n(), "grad, NaN/inf padding");
  }
  ValueCase big = random_value(rng, 256, 600, MaskKind::Mixed, true, 0.2f);
  ValueOut p = run_value(big), q = run_value(big);
  CHECK(tf::same_bits(p.res.loss, q.res.loss));
  CHECK(tf::same_bits(p.res.clip_fraction, q.res.clip_fraction));
  CHECK_BITWISE_EQUAL(p.grad.data(), q.grad.data(), big.n(), "grad repeat");
}

PPO_TEST_MAIN()
