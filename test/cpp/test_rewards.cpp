// kl_penalized_rewards, batch_moments + merge_moments + moments_std, normalize_scores on
// the CPU backend against the float64 reference.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "core/ops.h"
#include "reference.h"
#include "test_framework.h"
#include "test_util.h"

using ppo::Device;
using tu::MaskKind;

namespace {

// ---- KL rewards -------------------------------------------------------------------------

struct KlCase {
  int64_t B = 1, T = 1;
  std::vector<float> lp, ref_lp, scores, mask;
  float kl_coef = 0.1f;
  ppo::KlEstimator est = ppo::KlEstimator::K1;
  int64_t n() const { return B * T; }
  const float* mask_ptr() const { return mask.empty() ? nullptr : mask.data(); }
};

KlCase random_kl(tu::Rng& rng, int64_t B, int64_t T, MaskKind mk, ppo::KlEstimator est,
                 float coef, double score_scale = 3.0, double d_std = 0.3) {
  KlCase c;
  c.B = B, c.T = T, c.est = est, c.kl_coef = coef;
  c.lp = tu::uniform(rng, B * T, -12.0, 0.0);
  c.ref_lp.resize(B * T);
  std::normal_distribution<double> nd(0.0, d_std);
  for (int64_t i = 0; i < B * T; ++i) c.ref_lp[i] = static_cast<float>(c.lp[i] + nd(rng));
  c.scores = tu::normal(rng, B, 0.0, score_scale);
  if (mk != MaskKind::Ones || tu::rand_int(rng, 0, 1)) c.mask = tu::make_mask(rng, B, T, mk);
  return c;
}

struct KlOut {
  std::vector<float> rewards, kl;
};

KlOut run_kl(const KlCase& c, bool with_kl = true) {
  KlOut o;
  o.rewards = tu::poisoned(c.n());
  if (with_kl) o.kl = tu::poisoned(c.n());
  ppo::KlRewardsArgs a;
  a.batch = c.B, a.steps = c.T;
  a.logprobs = c.lp.data();
  a.ref_logprobs = c.ref_lp.data();
  a.scores = c.scores.data();
  a.mask = c.mask_ptr();
  a.kl_coef = c.kl_coef;
  a.estimator = c.est;
  a.rewards = o.rewards.data();
  a.kl = with_kl ? o.kl.data() : nullptr;
  ppo::kl_penalized_rewards(Device::Cpu, a);
  return o;
}

struct KlRef {
  std::vector<double> rewards, kl;
};

KlRef ref_kl(const KlCase& c) {
  KlRef r;
  r.rewards.resize(c.n());
  r.kl.resize(c.n());
  auto lp = tu::to_double(c.lp), rl = tu::to_double(c.ref_lp), s = tu::to_double(c.scores);
  auto m = tu::mask_to_double(c.mask_ptr(), c.n());
  ref::kl_rewards(c.B, c.T, lp.data(), rl.data(), s.data(), tu::ptr_or_null(m), c.kl_coef,
                  static_cast<int>(c.est), r.rewards.data(), r.kl.data());
  return r;
}

// kl: d = lp - ref is one correctly rounded float subtraction (relative 6e-8); the
// estimators add a few roundings of O(max(1, exp(-d), |d|)) (k3 computed naively as
// exp(-d) - 1 + d loses up to ~1e-7 absolute to cancellation near d = 0). So 1e-6
// absolute (~16 ulps at O(1)) plus 1e-5 relative for large |d|.
// rewards = -coef * kl + score: the kl error times |coef|, plus the final rounding,
// relative 1e-5 of the result (scores up to 1e6 have an ulp of 0.06 = 6e-8 relative).
void check_kl_against_ref(const KlCase& c, const std::string& what) {
  KlOut k = run_kl(c);
  KlRef r = ref_kl(c);
  CHECK_ALL_NEAR(k.kl.data(), r.kl.data(), c.n(), 1e-6, 1e-5, (what + " kl").c_str());
  CHECK_ALL_NEAR(k.rewards.data(), r.rewards.data(), c.n(), 1e-6 * (1.0 + std::fabs(c.kl_coef)),
                 1e-5, (what + " rewards").c_str());
  KlOut k2 = run_kl(c, /*with_kl=*/false);
  CHECK_BITWISE_EQUAL(k.rewards.data(), k2.rewards.data(), c.n(),
                      (what + " rewards with kl=nullptr").c_str());
}

const ppo::KlEstimator kEstimators[] = {ppo::KlEstimator::K1, ppo::KlEstimator::K2,
                                        ppo::KlEstimator::K3};

}  // namespace

TEST(kl_rewards_match_reference_random_shapes) {
  tu::Rng rng(2001);
  const MaskKind kinds[] = {MaskKind::Ones, MaskKind::Suffix, MaskKind::Prefix,
                            MaskKind::Random, MaskKind::Mixed};
  const float coefs[] = {0.0f, 0.05f, 0.2f, 1.0f};
  for (int rep = 0; rep < 60; ++rep) {
    const int64_t B = tu::rand_int(rng, 1, 9), T = tu::rand_int(rng, 1, 50);
    KlCase c = random_kl(rng, B, T, kinds[rep % 5], kEstimators[rep % 3], coefs[rep % 4]);
    check_kl_against_ref(c, "case " + std::to_string(rep) + " k" +
                                std::to_string(static_cast<int>(c.est)) + " " +
                                tu::shape_str(B, T));
  }
}

TEST(kl_rewards_estimator_formulas) {
  // Spot values, independent of the reference: d = 0.5.
  for (ppo::KlEstimator e : kEstimators) {
    KlCase c;
    c.B = 1, c.T = 2, c.est = e, c.kl_coef = 2.0f;
    c.lp = {-1.0f, -2.0f};
    c.ref_lp = {-1.5f, -2.5f};
    c.scores = {10.0f};
    KlOut k = run_kl(c);
    const double d = 0.5;
    const double want = e == ppo::KlEstimator::K1   ? d
                        : e == ppo::KlEstimator::K2 ? d * d / 2
                                                    : std::exp(-d) - 1 + d;
    CHECK_NEAR(k.kl[0], want, 1e-7, 1e-6);
    CHECK_NEAR(k.kl[1], want, 1e-7, 1e-6);
    CHECK_NEAR(k.rewards[0], -2.0 * want, 1e-6, 1e-6);
    CHECK_NEAR(k.rewards[1], -2.0 * want + 10.0, 1e-6, 1e-6);
  }
}

TEST(kl_rewards_score_at_last_valid_position) {
  tu::Rng rng(2002);
  // Holes in the middle: the score goes to the last valid position, not the last one.
  KlCase c = random_kl(rng, 4, 8, MaskKind::Ones, ppo::KlEstimator::K1, 0.0f);
  c.mask = {1, 1, 0, 1, 0, 0, 0, 0,   // last valid t = 3
            0, 0, 0, 0, 0, 0, 0, 1,   // last valid t = 7
            0, 0, 0, 0, 0, 0, 0, 0,   // no valid position: the score is dropped
            1, 0, 1, 0, 1, 0, 0, 0};  // last valid t = 4
  c.scores = {1.5f, -2.0f, 99.0f, 7.0f};
  KlOut k = run_kl(c);
  const int64_t last[] = {3, 7, -1, 4};
  for (int64_t b = 0; b < 4; ++b)
    for (int64_t t = 0; t < 8; ++t) {
      const float want = t == last[b] ? c.scores[b] : 0.0f;
      CHECK(k.rewards[b * 8 + t] == want);  // kl_coef = 0: only the score remains
      if (c.mask[b * 8 + t] == 0.0f) CHECK(k.kl[b * 8 + t] == 0.0f);
    }
  check_kl_against_ref(c, "holes");
}

TEST(kl_rewards_edge_cases) {
  tu::Rng rng(2003);
  for (ppo::KlEstimator e : kEstimators) {
    // batch of one, row of length one
    KlCase a = random_kl(rng, 1, 1, MaskKind::Ones, e, 0.1f);
    check_kl_against_ref(a, "1x1");
    // all-masked batch: everything 0
    KlCase b = random_kl(rng, 3, 5, MaskKind::Ones, e, 0.1f);
    b.mask.assign(b.n(), 0.0f);
    KlOut kb = run_kl(b);
    for (int64_t i = 0; i < b.n(); ++i) {
      CHECK(kb.rewards[i] == 0.0f);
      CHECK(kb.kl[i] == 0.0f);
    }
    // huge scores and large log-prob differences
    KlCase c = random_kl(rng, 4, 12, MaskKind::Mixed, e, 0.3f, 1e6, 5.0);
    check_kl_against_ref(c, "scores 1e6, |d| up to ~20");
    // tiny differences (k3 near its cancellation point)
    KlCase d = random_kl(rng, 4, 12, MaskKind::Mixed, e, 0.3f, 1.0, 1e-4);
    check_kl_against_ref(d, "tiny d");
  }
}

TEST(kl_rewards_null_mask_equals_all_ones_and_padding_is_inert) {
  tu::Rng rng(2004);
  for (ppo::KlEstimator e : kEstimators) {
    KlCase c = random_kl(rng, 5, 9, MaskKind::Ones, e, 0.1f);
    c.mask.clear();
    KlOut a = run_kl(c);
    c.mask.assign(c.n(), 1.0f);
    KlOut b = run_kl(c);
    CHECK_BITWISE_EQUAL(a.rewards.data(), b.rewards.data(), c.n(), "rewards");
    CHECK_BITWISE_EQUAL(a.kl.data(), b.kl.data(), c.n(), "kl");

    KlCase m = random_kl(rng, 6, 11, MaskKind::Mixed, e, 0.1f);
    if (m.mask.empty()) m.mask = tu::make_mask(rng, m.B, m.T, MaskKind::Random);
    KlOut x = run_kl(m);
    for (int64_t i = 0; i < m.n(); ++i)
      if (m.mask[i] == 0.0f) {
        CHECK(x.rewards[i] == 0.0f);
        CHECK(x.kl[i] == 0.0f);
      }
    tu::scramble_masked(m.lp, m.mask, rng, 1, 50.0);
    tu::scramble_masked(m.ref_lp, m.mask, rng, 1, 50.0);
    // Scores of all-masked rows are dropped, so changing them changes nothing.
    for (int64_t bb = 0; bb < m.B; ++bb) {
      bool any = false;
      for (int64_t t = 0; t < m.T; ++t) any = any || m.mask[bb * m.T + t] != 0.0f;
      if (!any) m.scores[bb] = 12345.0f;
    }
    KlOut y = run_kl(m);
    CHECK_BITWISE_EQUAL(x.rewards.data(), y.rewards.data(), m.n(), "rewards after scramble");
    CHECK_BITWISE_EQUAL(x.kl.data(), y.kl.data(), m.n(), "kl after scramble");
    tu::nonfinite_masked(m.lp, m.mask);
    tu::nonfinite_masked(m.ref_lp, m.mask);
    KlOut z = run_kl(m);
    CHECK_BITWISE_EQUAL(x.rewards.data(), z.rewards.data(), m.n(), "rewards, NaN/inf padding");
    CHECK_BITWISE_EQUAL(x.kl.data(), z.kl.data(), m.n(), "kl, NaN/inf padding");
  }
}

TEST(kl_rewards_determinism) {
  tu::Rng rng(2005);
  KlCase c = random_kl(rng, 64, 300, MaskKind::Mixed, ppo::KlEstimator::K3, 0.1f);
  KlOut a = run_kl(c), b = run_kl(c);
  CHECK_BITWISE_EQUAL(a.rewards.data(), b.rewards.data(), c.n(), "rewards");
  CHECK_BITWISE_EQUAL(a.kl.data(), b.kl.data(), c.n(), "kl");
}

// ---- moments ---------------------------------------------------------------------------

namespace {

ppo::Moments run_moments(const float* v, int64_t n) {
  ppo::MomentsArgs a;
  a.count = n;
  a.values = v;
  return ppo::batch_moments(Device::Cpu, a);
}

// Both sides accumulate in double from the same float inputs; they differ only in
// summation order (threads/chunks), worth ~n * 2^-53 relative in the worst case:
// 1e-10 relative. A float accumulator would be off by ~1e-7 or (with an offset) far more.
void check_moments(const ppo::Moments& got, const ref::Moments& want, double scale,
                   const std::string& what) {
  CHECK_NEAR_CTX(got.count, want.count, 0.0, 0.0, what);
  CHECK_NEAR_CTX(got.mean, want.mean, 1e-12 * scale, 1e-10, what);
  CHECK_NEAR_CTX(got.m2, want.m2, 1e-12 * scale * scale, 1e-9, what);
}

}  // namespace

TEST(moments_match_reference) {
  tu::Rng rng(3001);
  for (int rep = 0; rep < 30; ++rep) {
    const int64_t n = rep < 3 ? rep + 1 : tu::rand_int(rng, 1, rep % 5 == 0 ? 300000 : 5000);
    const double offset = rep % 3 == 0 ? 0.0 : rep % 3 == 1 ? 5.0 : 1e6;
    std::vector<float> v = tu::normal(rng, n, offset, rep % 2 ? 1.0 : 1e-3);
    auto d = tu::to_double(v);
    check_moments(run_moments(v.data(), n), ref::moments(n, d.data()), std::fabs(offset) + 1,
                  "n=" + std::to_string(n) + " offset=" + std::to_string(offset));
  }
}

TEST(moments_exact_small_cases) {
  std::vector<float> v = {1.0f, 2.0f, 3.0f, 4.0f};
  ppo::Moments m = run_moments(v.data(), 4);
  CHECK(m.count == 4.0);
  CHECK_NEAR(m.mean, 2.5, 0.0, 1e-15);
  CHECK_NEAR(m.m2, 5.0, 0.0, 1e-15);
  CHECK_NEAR(ppo::moments_std(m), std::sqrt(5.0 / 3.0), 0.0, 1e-15);
  std::vector<float> one = {42.0f};
  ppo::Moments m1 = run_moments(one.data(), 1);
  CHECK(m1.count == 1.0);
  CHECK(m1.mean == 42.0);
  CHECK(m1.m2 == 0.0);
  CHECK(ppo::moments_std(m1) == 0.0);
  CHECK(ppo::moments_std(ppo::Moments{}) == 0.0);
  // Large offset: a one-pass sum-of-squares would lose everything here.
  std::vector<float> big = {1e6f - 1.0f, 1e6f, 1e6f + 1.0f};
  ppo::Moments mb = run_moments(big.data(), 3);
  CHECK_NEAR(mb.mean, 1e6, 0.0, 1e-15);
  CHECK_NEAR(mb.m2, 2.0, 0.0, 1e-12);
}

TEST(merge_moments_of_random_splits_equals_one_shot) {
  tu::Rng rng(3002);
  for (int rep = 0; rep < 25; ++rep) {
    const int64_t n = tu::rand_int(rng, 2, 20000);
    const double offset = rep % 2 ? 0.0 : 1e5 * (rep % 4 ? 1 : -1);
    std::vector<float> v = tu::normal(rng, n, offset, tu::rand_uniform(rng, 1e-2, 10.0));
    const ppo::Moments whole = run_moments(v.data(), n);
    const double scale = std::fabs(offset) + 10;

    // Random cut points (between 1 and ~60 pieces, all non-empty).
    const int64_t pieces = std::min<int64_t>(n, tu::rand_int(rng, 1, 60));
    std::vector<int64_t> cuts;
    for (int64_t i = 1; i < n; ++i) cuts.push_back(i);
    std::shuffle(cuts.begin(), cuts.end(), rng);
    cuts.resize(pieces - 1);
    cuts.push_back(0);
    cuts.push_back(n);
    std::sort(cuts.begin(), cuts.end());
    std::vector<ppo::Moments> parts;
    for (size_t k = 0; k + 1 < cuts.size(); ++k)
      parts.push_back(run_moments(v.data() + cuts[k], cuts[k + 1] - cuts[k]));

    // Sequential left-to-right merge, with empty moments sprinkled in (identity).
    ppo::Moments seq;
    for (const auto& p : parts) {
      seq = ppo::merge_moments(seq, p);
      seq = ppo::merge_moments(seq, ppo::Moments{});
    }
    // Random-order pairwise (tree-like) merge.
    std::vector<ppo::Moments> pool = parts;
    while (pool.size() > 1) {
      std::shuffle(pool.begin(), pool.end(), rng);
      ppo::Moments a = pool.back();
      pool.pop_back();
      ppo::Moments b = pool.back();
      pool.pop_back();
      pool.push_back(ppo::merge_moments(a, b));
    }
    // Merging is exact math, so only double rounding separates the results: Chan's
    // update loses ~2^-53 per merge relative to the combined quantities.
    const std::string what = "n=" + std::to_string(n) + " pieces=" + std::to_string(pieces);
    auto d = tu::to_double(v);
    const ref::Moments r = ref::moments(n, d.data());
    for (const ppo::Moments* m : {&seq, &pool[0]}) {
      CHECK_NEAR_CTX(m->count, whole.count, 0.0, 0.0, what);
      CHECK_NEAR_CTX(m->mean, whole.mean, 1e-12 * scale, 1e-10, what);
      CHECK_NEAR_CTX(m->m2, whole.m2, 1e-12 * scale * scale, 1e-9, what);
      check_moments(*m, r, scale, what + " vs ref");
      CHECK_NEAR_CTX(ppo::moments_std(*m), ref::moments_std(r), 0.0, 1e-9, what);
    }
  }
}

TEST(merge_moments_identities) {
  ppo::Moments a;
  a.count = 10, a.mean = 3.0, a.m2 = 7.5;
  ppo::Moments e;
  ppo::Moments x = ppo::merge_moments(a, e), y = ppo::merge_moments(e, a);
  for (const ppo::Moments* m : {&x, &y}) {
    CHECK(m->count == 10.0);
    CHECK_NEAR(m->mean, 3.0, 0.0, 1e-15);
    CHECK_NEAR(m->m2, 7.5, 0.0, 1e-15);
  }
  ppo::Moments z = ppo::merge_moments(e, e);
  CHECK(z.count == 0.0);
  CHECK(std::isfinite(z.mean));
  CHECK(std::isfinite(z.m2));
  // Two singletons {1} and {3}: mean 2, m2 = 2.
  ppo::Moments p, q;
  p.count = 1, p.mean = 1.0;
  q.count = 1, q.mean = 3.0;
  ppo::Moments r = ppo::merge_moments(p, q);
  CHECK(r.count == 2.0);
  CHECK_NEAR(r.mean, 2.0, 0.0, 1e-15);
  CHECK_NEAR(r.m2, 2.0, 0.0, 1e-15);
  CHECK_NEAR(ppo::moments_std(r), std::sqrt(2.0), 0.0, 1e-15);
  // Huge counts stay finite and exact-ish (running moments over a long run).
  ppo::Moments h1, h2;
  h1.count = 1e12, h1.mean = 1.0, h1.m2 = 1e12;
  h2.count = 3e12, h2.mean = 2.0, h2.m2 = 3e12;
  ppo::Moments h = ppo::merge_moments(h1, h2);
  CHECK(h.count == 4e12);
  CHECK_NEAR(h.mean, 1.75, 0.0, 1e-14);
  CHECK_NEAR(h.m2, 4e12 + 1.0 * 1e12 * 3e12 / 4e12, 0.0, 1e-14);
}

TEST(moments_determinism) {
  tu::Rng rng(3003);
  std::vector<float> v = tu::normal(rng, 1000003, 3.0, 2.0);
  ppo::Moments a = run_moments(v.data(), static_cast<int64_t>(v.size()));
  ppo::Moments b = run_moments(v.data(), static_cast<int64_t>(v.size()));
  CHECK(tf::same_bits(a.count, b.count));
  CHECK(tf::same_bits(a.mean, b.mean));
  CHECK(tf::same_bits(a.m2, b.m2));
}

// ---- normalize -------------------------------------------------------------------------

namespace {

struct NormCase {
  std::vector<float> v;
  double mean = 0.0, std = 1.0;
  bool subtract_mean = true;
  float eps = 1e-8f, clip = 0.0f;
};

std::vector<float> run_norm(const NormCase& c) {
  std::vector<float> out = tu::poisoned(static_cast<int64_t>(c.v.size()));
  ppo::NormalizeScoresArgs a;
  a.count = static_cast<int64_t>(c.v.size());
  a.values = c.v.data();
  a.mean = c.mean, a.std = c.std, a.subtract_mean = c.subtract_mean;
  a.eps = c.eps, a.clip = c.clip;
  a.out = out.data();
  ppo::normalize_scores(Device::Cpu, a);
  return out;
}

// A float kernel rounds the mean and the difference x - mean (a few ulps of
// max(|x|, |mean|)) before dividing by std + eps: abs 4e-7 (|x|max + |mean|) / (std + eps),
// plus 1e-6 relative for the division and final rounding.
void check_norm(const NormCase& c, const std::string& what) {
  std::vector<float> k = run_norm(c);
  auto d = tu::to_double(c.v);
  std::vector<double> r(c.v.size());
  ref::normalize(static_cast<int64_t>(c.v.size()), d.data(), c.mean, c.std, c.subtract_mean,
                 c.eps, c.clip, r.data());
  const double tol = 4e-7 * (tu::max_abs(c.v) + std::fabs(c.mean)) / (c.std + c.eps) + 1e-7;
  CHECK_ALL_NEAR(k.data(), r.data(), static_cast<int64_t>(c.v.size()), tol, 1e-6,
                 what.c_str());
  if (c.clip > 0)
    for (float x : k) CHECK(x >= -c.clip && x <= c.clip);
}

}  // namespace

TEST(normalize_matches_reference) {
  tu::Rng rng(4001);
  for (int rep = 0; rep < 48; ++rep) {
    NormCase c;
    const int64_t n = rep < 2 ? 1 : tu::rand_int(rng, 1, 5000);
    const double offset = rep % 4 == 3 ? 1e6 : tu::rand_uniform(rng, -3, 3);
    const double sd = rep % 4 == 3 ? 10.0 : tu::rand_uniform(rng, 1e-3, 5);
    c.v = tu::normal(rng, n, offset, sd);
    c.mean = offset + tu::rand_uniform(rng, -0.1, 0.1) * sd;
    c.std = sd * tu::rand_uniform(rng, 0.8, 1.2);
    c.subtract_mean = rep % 2 == 0;
    c.eps = rep % 3 == 0 ? 1e-8f : rep % 3 == 1 ? 0.5f : 0.0f;
    c.clip = rep % 5 == 0 ? 0.0f : rep % 5 == 1 ? 0.75f : static_cast<float>(rep % 5);
    check_norm(c, "case " + std::to_string(rep) + " n=" + std::to_string(n));
  }
}

TEST(normalize_spot_values) {
  NormCase c;
  c.v = {1.0f, 3.0f, 5.0f, 100.0f};
  c.mean = 3.0, c.std = 2.0, c.eps = 0.0f, c.clip = 5.0f;
  std::vector<float> k = run_norm(c);
  CHECK(k[0] == -1.0f);
  CHECK(k[1] == 0.0f);
  CHECK(k[2] == 1.0f);
  CHECK(k[3] == 5.0f);  // 48.5 clipped
  c.subtract_mean = false, c.clip = 0.0f;
  k = run_norm(c);
  CHECK(k[0] == 0.5f);
  CHECK(k[3] == 50.0f);
}

TEST(normalize_determinism) {
  tu::Rng rng(4002);
  NormCase c;
  c.v = tu::normal(rng, 200000, 1.0, 3.0);
  c.mean = 1.0, c.std = 3.0, c.clip = 2.0f;
  std::vector<float> a = run_norm(c), b = run_norm(c);
  CHECK_BITWISE_EQUAL(a.data(), b.data(), static_cast<int64_t>(a.size()), "out");
}

PPO_TEST_MAIN()
