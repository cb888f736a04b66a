// gae, whiten and clip_masked on the CPU backend against the float64 reference.
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

// ---- GAE -------------------------------------------------------------------------------

struct GaeCase {
  int64_t B = 1, T = 1;
  std::vector<float> r, v, mask;
  float gamma = 1.0f, lambda = 0.95f;
  int64_t n() const { return B * T; }
  const float* mask_ptr() const { return mask.empty() ? nullptr : mask.data(); }
};

GaeCase random_gae(tu::Rng& rng, int64_t B, int64_t T, MaskKind mk, float gamma, float lambda,
                   double scale = 1.0) {
  GaeCase c;
  c.B = B, c.T = T, c.gamma = gamma, c.lambda = lambda;
  c.r = tu::normal(rng, B * T, 0.0, scale);
  c.v = tu::normal(rng, B * T, 0.5 * scale, scale);
  if (mk != MaskKind::Ones || tu::rand_int(rng, 0, 1)) c.mask = tu::make_mask(rng, B, T, mk);
  return c;
}

struct GaeOut {
  std::vector<float> adv, ret;
};

GaeOut run_gae(const GaeCase& c) {
  GaeOut o{tu::poisoned(c.n()), tu::poisoned(c.n())};
  ppo::GaeArgs a;
  a.batch = c.B, a.steps = c.T;
  a.rewards = c.r.data();
  a.values = c.v.data();
  a.mask = c.mask_ptr();
  a.gamma = c.gamma, a.lambda = c.lambda;
  a.advantages = o.adv.data();
  a.returns = o.ret.data();
  ppo::gae(Device::Cpu, a);
  return o;
}

struct GaeRef {
  std::vector<double> adv, ret;
};

GaeRef ref_gae(const GaeCase& c) {
  GaeRef o;
  o.adv.resize(c.n());
  o.ret.resize(c.n());
  auto r = tu::to_double(c.r), v = tu::to_double(c.v);
  auto m = tu::mask_to_double(c.mask_ptr(), c.n());
  ref::gae(c.B, c.T, r.data(), v.data(), tu::ptr_or_null(m), c.gamma, c.lambda, o.adv.data(),
           o.ret.data());
  return o;
}

// The recursion runs in double, so a kernel's error is at most: float rounding of each
// delta if it forms r + gamma V' - V in float (~2 ulps of max(|r|, |V|) = 2.4e-7 scale),
// summed over at most T terms with weights (gamma lambda)^k <= 1, plus the final rounding
// to float (1e-6 relative covers it with margin).
void check_gae(const GaeCase& c, const std::string& what) {
  GaeOut k = run_gae(c);
  GaeRef r = ref_gae(c);
  const double scale = tu::max_abs(c.r) + tu::max_abs(c.v);
  const double tol = 2.4e-7 * scale * static_cast<double>(c.T) + 1e-30;
  CHECK_ALL_NEAR(k.adv.data(), r.adv.data(), c.n(), tol, 1e-6, (what + " advantages").c_str());
  CHECK_ALL_NEAR(k.ret.data(), r.ret.data(), c.n(), tol, 1e-6, (what + " returns").c_str());
}

}  // namespace

TEST(gae_matches_reference_random_shapes) {
  tu::Rng rng(5001);
  const float gammas[] = {1.0f, 0.99f, 0.0f, 0.5f, 1.0f, 0.9f};
  const float lambdas[] = {0.95f, 1.0f, 0.3f, 0.0f, 1.0f, 0.0f};
  for (int rep = 0; rep < 72; ++rep) {
    const int64_t B = tu::rand_int(rng, 1, 8), T = tu::rand_int(rng, 1, 80);
    GaeCase c = random_gae(rng, B, T, kKinds[rep % 5], gammas[rep % 6], lambdas[rep % 6]);
    check_gae(c, "case " + std::to_string(rep) + " g=" + std::to_string(c.gamma) +
                     " l=" + std::to_string(c.lambda) + " " + tu::shape_str(B, T));
  }
}

TEST(gae_hand_example_with_holes) {
  // Row: valid at t = 0, 2, 3 (t = 1 and t = 4 are padding); the state after t = 3 is
  // terminal. gamma = 0.5, lambda = 0.5 (all exact in binary).
  GaeCase c;
  c.B = 1, c.T = 5, c.gamma = 0.5f, c.lambda = 0.5f;
  c.r = {1.0f, 100.0f, 2.0f, 4.0f, 100.0f};
  c.v = {1.0f, 100.0f, 2.0f, 2.0f, 100.0f};
  c.mask = {1, 0, 1, 1, 0};
  // t=3: delta = 4 + 0.5*0 - 2 = 2;            A = 2
  // t=2: delta = 2 + 0.5*2 - 2 = 1;            A = 1 + 0.25*2 = 1.5
  // t=0: delta = 1 + 0.5*2 - 1 = 1;            A = 1 + 0.25*1.5 = 1.375
  GaeOut k = run_gae(c);
  const float adv[] = {1.375f, 0.0f, 1.5f, 2.0f, 0.0f};
  const float ret[] = {2.375f, 0.0f, 3.5f, 4.0f, 0.0f};
  for (int t = 0; t < 5; ++t) {
    CHECK_NEAR_CTX(k.adv[t], adv[t], 1e-7, 0.0, "t=" + std::to_string(t));
    CHECK_NEAR_CTX(k.ret[t], ret[t], 1e-7, 0.0, "t=" + std::to_string(t));
  }
  check_gae(c, "hand example");
}

TEST(gae_gamma_lambda_extremes_closed_forms) {
  tu::Rng rng(5002);
  for (int rep = 0; rep < 6; ++rep) {
    const int64_t B = tu::rand_int(rng, 1, 5), T = tu::rand_int(rng, 1, 30);
    // gamma = 0: A = r - V, returns = r.
    GaeCase a = random_gae(rng, B, T, MaskKind::Mixed, 0.0f, rep % 2 ? 1.0f : 0.7f);
    GaeOut ka = run_gae(a);
    for (int64_t i = 0; i < a.n(); ++i) {
      if (!a.mask.empty() && a.mask[i] == 0.0f) continue;
      CHECK_NEAR(ka.adv[i], static_cast<double>(a.r[i]) - a.v[i], 1e-6, 1e-6);
      CHECK_NEAR(ka.ret[i], a.r[i], 1e-6, 1e-6);
    }
    // lambda = 0: A = delta (one-step TD), over the valid positions in order.
    // gamma = lambda = 1: returns = sum of the remaining valid rewards (Monte Carlo).
    GaeCase b = random_gae(rng, B, T, MaskKind::Random, 0.8f, 0.0f);
    GaeCase m = random_gae(rng, B, T, MaskKind::Random, 1.0f, 1.0f);
    GaeOut kb = run_gae(b), km = run_gae(m);
    for (int64_t bb = 0; bb < B; ++bb) {
      std::vector<int64_t> idx;
      for (int64_t t = 0; t < T; ++t)
        if (b.mask.empty() || b.mask[bb * T + t] != 0.0f) idx.push_back(bb * T + t);
      for (size_t k = 0; k < idx.size(); ++k) {
        const double next_v = k + 1 < idx.size() ? b.v[idx[k + 1]] : 0.0;
        const double delta = b.r[idx[k]] + 0.8f * next_v - b.v[idx[k]];
        CHECK_NEAR(kb.adv[idx[k]], delta, 1e-5, 1e-6);
      }
      std::vector<int64_t> jdx;
      for (int64_t t = 0; t < T; ++t)
        if (m.mask.empty() || m.mask[bb * T + t] != 0.0f) jdx.push_back(bb * T + t);
      double tail = 0.0;
      for (size_t k = jdx.size(); k-- > 0;) {
        tail += m.r[jdx[k]];
        CHECK_NEAR(km.ret[jdx[k]], tail, 1e-5, 1e-6);
        CHECK_NEAR(km.adv[jdx[k]], tail - m.v[jdx[k]], 1e-5, 1e-6);
      }
    }
    check_gae(a, "gamma 0");
    check_gae(b, "lambda 0");
    check_gae(m, "gamma = lambda = 1");
  }
}

TEST(gae_edge_cases) {
  tu::Rng rng(5003);
  // batch of one, length-one rows: A = r - V, returns = r (terminal after the only token).
  GaeCase a = random_gae(rng, 1, 1, MaskKind::Ones, 0.99f, 0.95f);
  GaeOut ka = run_gae(a);
  CHECK_NEAR(ka.adv[0], static_cast<double>(a.r[0]) - a.v[0], 1e-6, 1e-6);
  CHECK_NEAR(ka.ret[0], a.r[0], 1e-6, 1e-6);
  GaeCase b = random_gae(rng, 7, 1, MaskKind::Random, 1.0f, 1.0f);
  check_gae(b, "steps 1");
  // all-masked batch
  GaeCase c = random_gae(rng, 4, 9, MaskKind::Ones, 0.99f, 0.95f);
  c.mask.assign(c.n(), 0.0f);
  GaeOut kc = run_gae(c);
  for (int64_t i = 0; i < c.n(); ++i) {
    CHECK(kc.adv[i] == 0.0f);
    CHECK(kc.ret[i] == 0.0f);
  }
  // rewards of 1e6, long rows
  GaeCase d = random_gae(rng, 3, 200, MaskKind::Mixed, 1.0f, 1.0f, 1e6);
  check_gae(d, "rewards 1e6");
  GaeCase e = random_gae(rng, 3, 200, MaskKind::Mixed, 0.99f, 0.95f, 1e-30);
  check_gae(e, "rewards 1e-30");
}

TEST(gae_null_mask_padding_determinism) {
  tu::Rng rng(5004);
  for (int rep = 0; rep < 4; ++rep) {
    GaeCase c = random_gae(rng, 5, 33, MaskKind::Ones, 0.99f, 0.95f);
    c.mask.clear();
    GaeOut a = run_gae(c);
    c.mask.assign(c.n(), 1.0f);
    GaeOut b = run_gae(c);
    CHECK_BITWISE_EQUAL(a.adv.data(), b.adv.data(), c.n(), "advantages null vs ones");
    CHECK_BITWISE_EQUAL(a.ret.data(), b.ret.data(), c.n(), "returns null vs ones");

    GaeCase m = random_gae(rng, 6, 40, MaskKind::Mixed, 0.9f, 0.8f);
    if (m.mask.empty()) m.mask = tu::make_mask(rng, m.B, m.T, MaskKind::Random);
    GaeOut x = run_gae(m);
    for (int64_t i = 0; i < m.n(); ++i)
      if (m.mask[i] == 0.0f) {
        CHECK(x.adv[i] == 0.0f);
        CHECK(x.ret[i] == 0.0f);
      }
    tu::scramble_masked(m.r, m.mask, rng, 1, 1e5);
    tu::scramble_masked(m.v, m.mask, rng, 1, 1e5);
    GaeOut y = run_gae(m);
    CHECK_BITWISE_EQUAL(x.adv.data(), y.adv.data(), m.n(), "advantages after scramble");
    CHECK_BITWISE_EQUAL(x.ret.data(), y.ret.data(), m.n(), "returns after scramble");
    tu::nonfinite_masked(m.r, m.mask);
    tu::nonfinite_masked(m.v, m.mask);
    GaeOut z = run_gae(m);
    CHECK_BITWISE_EQUAL(x.adv.data(), z.adv.data(), m.n(), "advantages, NaN/inf padding");
    CHECK_BITWISE_EQUAL(x.ret.data(), z.ret.data(), m.n(), "returns, NaN/inf padding");
  }
  GaeCase big = random_gae(rng, 128, 512, MaskKind::Mixed, 0.99f, 0.95f);
  GaeOut p = run_gae(big), q = run_gae(big);
  CHECK_BITWISE_EQUAL(p.adv.data(), q.adv.data(), big.n(), "advantages repeat");
  CHECK_BITWISE_EQUAL(p.ret.data(), q.ret.data(), big.n(), "returns repeat");
}

// ---- whiten ----------------------------------------------------------------------------

namespace {

struct WhitenCase {
  int64_t B = 1, T = 1;
  std::vector<float> x, mask;
  bool shift_mean = true;
  float eps = 1e-8f, clip = 0.0f;
  int64_t n() const { return B * T; }
  const float* mask_ptr() const { return mask.empty() ? nullptr : mask.data(); }
};

std::vector<float> run_whiten(const WhitenCase& c) {
  std::vector<float> out = tu::poisoned(c.n());
  ppo::WhitenArgs a;
  a.batch = c.B, a.steps = c.T;
  a.values = c.x.data();
  a.mask = c.mask_ptr();
  a.shift_mean = c.shift_mean;
  a.eps = c.eps, a.clip = c.clip;
  a.out = out.data();
  ppo::whiten(Device::Cpu, a);
  return out;
}

// Mean and variance accumulate in double. The element-wise step may be float: rounding
// the mean to float and x - mean costs a few ulps of max(|x|, |mean|), divided by the
// whitening std, hence 4e-7 (max|x| + |mean|) / sqrt(var + eps); the final rounding and
// the re-added mean (shift_mean = false) are covered by 1e-6 relative + 4e-7 |mean|.
void check_whiten(const WhitenCase& c, const std::string& what) {
  std::vector<float> k = run_whiten(c);
  auto x = tu::to_double(c.x);
  auto m = tu::mask_to_double(c.mask_ptr(), c.n());
  std::vector<double> r(c.n());
  ref::whiten(c.B, c.T, x.data(), tu::ptr_or_null(m), c.shift_mean, c.eps, c.clip, r.data());
  // Recompute the reference statistics for the tolerance.
  double s = 0, cnt = 0;
  for (int64_t i = 0; i < c.n(); ++i)
    if (m.empty() || m[i] != 0) s += x[i], cnt += 1;
  const double mean = cnt > 0 ? s / cnt : 0.0;
  double q = 0;
  for (int64_t i = 0; i < c.n(); ++i)
    if (m.empty() || m[i] != 0) q += (x[i] - mean) * (x[i] - mean);
  const double sd = std::sqrt((cnt > 1 ? q / (cnt - 1) : 0.0) + c.eps);
  const double tol = 4e-7 * (tu::max_abs(c.x) + std::fabs(mean)) / sd + 4e-7 * std::fabs(mean);
  CHECK_ALL_NEAR(k.data(), r.data(), c.n(), tol, 1e-6, what.c_str());
  if (c.clip > 0)
    for (float y : k) CHECK(y >= -c.clip && y <= c.clip);
}

WhitenCase random_whiten(tu::Rng& rng, int64_t B, int64_t T, MaskKind mk, double offset,
                         double sd) {
  WhitenCase c;
  c.B = B, c.T = T;
  c.x = tu::normal(rng, B * T, offset, sd);
  if (mk != MaskKind::Ones || tu::rand_int(rng, 0, 1)) c.mask = tu::make_mask(rng, B, T, mk);
  return c;
}

}  // namespace

TEST(whiten_matches_reference_random_shapes) {
  tu::Rng rng(6001);
  for (int rep = 0; rep < 60; ++rep) {
    const int64_t B = tu::rand_int(rng, 1, 12), T = tu::rand_int(rng, 1, 100);
    const double offset = rep % 6 == 5 ? 1e6 : tu::rand_uniform(rng, -5, 5);
    const double sd = rep % 7 == 6 ? 1e-3 : tu::rand_uniform(rng, 0.1, 20);
    WhitenCase c = random_whiten(rng, B, T, kKinds[rep % 5], offset, sd);
    c.shift_mean = rep % 2 == 0;
    c.eps = rep % 3 == 0 ? 1e-8f : rep % 3 == 1 ? 1e-5f : 0.25f;
    c.clip = rep % 4 == 0 ? 0.0f : rep % 4 == 1 ? 0.5f : 1.5f;
    check_whiten(c, "case " + std::to_string(rep) + " " + tu::shape_str(B, T));
  }
}

TEST(whiten_edge_cases) {
  tu::Rng rng(6002);
  // One valid element: var = 0, out = 0 (or the mean itself when !shift_mean).
  WhitenCase a = random_whiten(rng, 3, 4, MaskKind::Ones, 2.0, 1.0);
  a.mask.assign(a.n(), 0.0f);
  a.mask[5] = 1.0f;
  std::vector<float> ka = run_whiten(a);
  for (int64_t i = 0; i < a.n(); ++i) CHECK(ka[i] == 0.0f);
  a.shift_mean = false;
  ka = run_whiten(a);
  CHECK_NEAR(ka[5], a.x[5], 0.0, 1e-6);
  for (int64_t i = 0; i < a.n(); ++i)
    if (i != 5) CHECK(ka[i] == 0.0f);
  // batch of one with a single step
  WhitenCase s = random_whiten(rng, 1, 1, MaskKind::Ones, 2.0, 1.0);
  check_whiten(s, "1x1");
  // All masked: every output 0, in both modes.
  WhitenCase b = random_whiten(rng, 3, 4, MaskKind::Ones, 2.0, 1.0);
  b.mask.assign(b.n(), 0.0f);
  for (bool shift : {true, false}) {
    b.shift_mean = shift;
    std::vector<float> kb = run_whiten(b);
    for (float y : kb) CHECK(y == 0.0f);
  }
  // Constant values: x - mean = 0 exactly, so 0 everywhere.
  WhitenCase c;
  c.B = 2, c.T = 3;
  c.x.assign(6, 3.25f);
  std::vector<float> kc = run_whiten(c);
  for (float y : kc) CHECK(y == 0.0f);
  // Spot values: {1, 2, 3, 4}: mean 2.5, var 5/3 (Bessel).
  WhitenCase d;
  d.B = 1, d.T = 4, d.eps = 0.0f;
  d.x = {1, 2, 3, 4};
  std::vector<float> kd = run_whiten(d);
  const double sd = std::sqrt(5.0 / 3.0);
  for (int i = 0; i < 4; ++i) CHECK_NEAR(kd[i], (i + 1 - 2.5) / sd, 1e-7, 1e-6);
  // huge and tiny magnitudes
  check_whiten(random_whiten(rng, 4, 50, MaskKind::Mixed, 0.0, 1e6), "sd 1e6");
  check_whiten(random_whiten(rng, 4, 50, MaskKind::Mixed, 0.0, 1e-30), "sd 1e-30");
}

TEST(whiten_null_mask_padding_determinism) {
  tu::Rng rng(6003);
  for (bool shift : {true, false}) {
    WhitenCase c = random_whiten(rng, 7, 31, MaskKind::Ones, 1.0, 2.0);
    c.shift_mean = shift;
    c.clip = 2.0f;
    c.mask.clear();
    std::vector<float> a = run_whiten(c);
    c.mask.assign(c.n(), 1.0f);
    std::vector<float> b = run_whiten(c);
    CHECK_BITWISE_EQUAL(a.data(), b.data(), c.n(), "null vs ones");

    WhitenCase m = random_whiten(rng, 9, 45, MaskKind::Mixed, 1.0, 2.0);
    m.shift_mean = shift;
    if (m.mask.empty()) m.mask = tu::make_mask(rng, m.B, m.T, MaskKind::Random);
    std::vector<float> x = run_whiten(m);
    for (int64_t i = 0; i < m.n(); ++i)
      if (m.mask[i] == 0.0f) CHECK(x[i] == 0.0f);
    tu::scramble_masked(m.x, m.mask, rng, 1, 1e5);
    std::vector<float> y = run_whiten(m);
    CHECK_BITWISE_EQUAL(x.data(), y.data(), m.n(), "after scramble");
    tu::nonfinite_masked(m.x, m.mask);
    std::vector<float> z = run_whiten(m);
    CHECK_BITWISE_EQUAL(x.data(), z.data(), m.n(), "NaN/inf padding");
  }
  WhitenCase big = random_whiten(rng, 256, 777, MaskKind::Mixed, 0.3, 1.7);
  std::vector<float> p = run_whiten(big), q = run_whiten(big);
  CHECK_BITWISE_EQUAL(p.data(), q.data(), big.n(), "repeat");
}

// ---- clip --------------------------------------------------------------------------------

namespace {

std::vector<float> run_clip(int64_t B, int64_t T, const std::vector<float>& x,
                            const float* mask, float c) {
  std::vector<float> out = tu::poisoned(B * T);
  ppo::ClipArgs a;
  a.batch = B, a.steps = T;
  a.values = x.data();
  a.mask = mask;
  a.clip = c;
  a.out = out.data();
  ppo::clip_masked(Device::Cpu, a);
  return out;
}

}  // namespace

TEST(clip_matches_reference_exactly) {
  // Clipping a float to float bounds is exact: tolerance 0.
  tu::Rng rng(7001);
  for (int rep = 0; rep < 40; ++rep) {
    const int64_t B = tu::rand_int(rng, 1, 10), T = tu::rand_int(rng, 1, 60);
    std::vector<float> x = tu::normal(rng, B * T, 0.0, rep % 4 == 3 ? 1e6 : 3.0);
    std::vector<float> mask;
    if (rep % 5) mask = tu::make_mask(rng, B, T, kKinds[rep % 5]);
    const float c = rep % 3 == 0 ? 1.0f : rep % 3 == 1 ? 0.5f : 1e-30f;
    std::vector<float> k = run_clip(B, T, x, mask.empty() ? nullptr : mask.data(), c);
    auto xd = tu::to_double(x);
    auto md = tu::mask_to_double(mask.empty() ? nullptr : mask.data(), B * T);
    std::vector<double> r(B * T);
    ref::clip(B, T, xd.data(), tu::ptr_or_null(md), c, r.data());
    CHECK_ALL_NEAR(k.data(), r.data(), B * T, 0.0, 0.0, "clip");
  }
}

TEST(clip_edge_null_mask_padding_determinism) {
  tu::Rng rng(7002);
  std::vector<float> x = tu::normal(rng, 6 * 13, 0.0, 2.0);
  std::vector<float> ones(6 * 13, 1.0f);
  std::vector<float> a = run_clip(6, 13, x, nullptr, 1.0f);
  std::vector<float> b = run_clip(6, 13, x, ones.data(), 1.0f);
  CHECK_BITWISE_EQUAL(a.data(), b.data(), 6 * 13, "null vs ones");
  std::vector<float> mask = tu::make_mask(rng, 6, 13, MaskKind::Mixed);
  std::vector<float> p = run_clip(6, 13, x, mask.data(), 1.0f);
  for (size_t i = 0; i < mask.size(); ++i)
    if (mask[i] == 0.0f) CHECK(p[i] == 0.0f);
  tu::scramble_masked(x, mask, rng);
  std::vector<float> q = run_clip(6, 13, x, mask.data(), 1.0f);
  CHECK_BITWISE_EQUAL(p.data(), q.data(), 6 * 13, "after scramble");
  tu::nonfinite_masked(x, mask);
  std::vector<float> pz = run_clip(6, 13, x, mask.data(), 1.0f);
  CHECK_BITWISE_EQUAL(p.data(), pz.data(), 6 * 13, "NaN/inf padding");
  std::vector<float> zero(6 * 13, 0.0f);
  std::vector<float> z = run_clip(6, 13, x, zero.data(), 1.0f);
  for (float y : z) CHECK(y == 0.0f);
  std::vector<float> one = {-5.0f};
  CHECK(run_clip(1, 1, one, nullptr, 2.0f)[0] == -2.0f);
  std::vector<float> big = tu::normal(rng, 300 * 400, 0.0, 2.0);
  std::vector<float> r1 = run_clip(300, 400, big, nullptr, 1.0f);
  std::vector<float> r2 = run_clip(300, 400, big, nullptr, 1.0f);
  CHECK_BITWISE_EQUAL(r1.data(), r2.data(), 300 * 400, "repeat");
}

PPO_TEST_MAIN()
