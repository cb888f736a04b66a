// logprobs_from_logits / logprobs_backward on the CPU backend against the float64
// reference (test/cpp/reference.h), and the gradients against central finite
// differences of the float64 forward.
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

struct Case {
  int64_t B = 1, T = 1, V = 1;
  std::vector<float> logits;
  std::vector<int32_t> tokens;
  std::vector<float> mask;  // empty: nullptr
  float temperature = 1.0f;

  const float* mask_ptr() const { return mask.empty() ? nullptr : mask.data(); }
  int64_t n() const { return B * T; }
  // Largest |logit / T| among finite logits: sets the scale of float rounding error.
  double zmax() const { return tu::max_abs(logits) / temperature; }
};

Case random_case(tu::Rng& rng, int64_t B, int64_t T, int64_t V, MaskKind mk, float temp,
                 double logit_std = 2.0) {
  Case c;
  c.B = B, c.T = T, c.V = V, c.temperature = temp;
  c.logits = tu::normal(rng, B * T * V, 0.0, logit_std);
  c.tokens = tu::tokens(rng, B * T, V);
  if (mk != MaskKind::Ones || tu::rand_int(rng, 0, 1)) c.mask = tu::make_mask(rng, B, T, mk);
  return c;
}

struct Fwd {
  std::vector<float> logprobs, entropy;
};

Fwd run_forward(const Case& c, bool with_entropy = true, Device dev = Device::Cpu) {
  Fwd out;
  out.logprobs = tu::poisoned(c.n());
  if (with_entropy) out.entropy = tu::poisoned(c.n());
  ppo::LogprobsArgs a;
  a.batch = c.B, a.steps = c.T, a.vocab = c.V;
  a.logits = c.logits.data();
  a.tokens = c.tokens.data();
  a.mask = c.mask_ptr();
  a.temperature = c.temperature;
  a.logprobs = out.logprobs.data();
  a.entropy = with_entropy ? out.entropy.data() : nullptr;
  ppo::logprobs_from_logits(dev, a);
  return out;
}

std::vector<float> run_backward(const Case& c, const std::vector<float>& g_lp,
                                const std::vector<float>& g_h, Device dev = Device::Cpu) {
  std::vector<float> grad = tu::poisoned(c.n() * c.V);
  ppo::LogprobsBackwardArgs a;
  a.batch = c.B, a.steps = c.T, a.vocab = c.V;
  a.logits = c.logits.data();
  a.tokens = c.tokens.data();
  a.mask = c.mask_ptr();
  a.temperature = c.temperature;
  a.grad_logprobs = g_lp.empty() ? nullptr : g_lp.data();
  a.grad_entropy = g_h.empty() ? nullptr : g_h.data();
  a.grad_logits = grad.data();
  ppo::logprobs_backward(dev, a);
  return grad;
}

struct RefFwd {
  std::vector<double> logprobs, entropy;
};

RefFwd ref_forward(const Case& c) {
  RefFwd r;
  r.logprobs.resize(c.n());
  r.entropy.resize(c.n());
  auto x = tu::to_double(c.logits);
  auto m = tu::mask_to_double(c.mask_ptr(), c.n());
  ref::logprobs(c.B, c.T, c.V, x.data(), c.tokens.data(), tu::ptr_or_null(m), c.temperature,
                r.logprobs.data(), r.entropy.data());
  return r;
}

std::vector<double> ref_backward(const Case& c, const std::vector<float>& g_lp,
                                 const std::vector<float>& g_h) {
  std::vector<double> g(c.n() * c.V);
  auto x = tu::to_double(c.logits);
  auto m = tu::mask_to_double(c.mask_ptr(), c.n());
  auto glp = tu::to_double(g_lp), gh = tu::to_double(g_h);
  ref::logprobs_backward(c.B, c.T, c.V, x.data(), c.tokens.data(), tu::ptr_or_null(m),
                         c.temperature, tu::ptr_or_null(glp), tu::ptr_or_null(gh), g.data());
  return g;
}

// Central finite differences of f = sum_i g_lp[i] logp[i] + g_h[i] H[i] (float64
// reference forward) w.r.t. every logit. Only row i depends on the logits of row i, so
// each difference re-evaluates one row. Masked rows contribute nothing (gradient 0).
std::vector<double> fd_backward(const Case& c, const std::vector<float>& g_lp,
                                const std::vector<float>& g_h, double h = 1e-6) {
  std::vector<double> g(c.n() * c.V, 0.0);
  std::vector<double> row(c.V);
  for (int64_t i = 0; i < c.n(); ++i) {
    if (!c.mask.empty() && c.mask[i] == 0.0f) continue;
    const double a = g_lp.empty() ? 0.0 : g_lp[i];
    const double b = g_h.empty() ? 0.0 : g_h[i];
    for (int64_t v = 0; v < c.V; ++v) row[v] = c.logits[i * c.V + v];
    for (int64_t v = 0; v < c.V; ++v) {
      const double x0 = row[v];
      if (std::isinf(x0)) continue;  // a banned token: its probability is identically 0
      row[v] = x0 + h;
      const double fp =
          ref::logprobs_row_objective(c.V, row.data(), c.tokens[i], c.temperature, a, b);
      row[v] = x0 - h;
      const double fm =
          ref::logprobs_row_objective(c.V, row.data(), c.tokens[i], c.temperature, a, b);
      row[v] = x0;
      g[i * c.V + v] = (fp - fm) / (2 * h);
    }
  }
  return g;
}

// Forward tolerance. The reference is exact (float64 on the same float inputs); a float
// kernel rounds z = logit / T (relative 2^-24 per element, i.e. ~6e-8 |z|) and
// accumulates exp-sums whose relative error is a few ulps. logp = z_tok - lse and H both
// inherit a few roundings of the largest |z|, hence 4e-7 * max|z| (~7 ulps of the
// largest scaled logit) plus 1e-5 for the exp/log/sum rounding at O(1) scale.
double fwd_abs_tol(const Case& c) { return 1e-5 + 4e-7 * c.zmax(); }
constexpr double kFwdRel = 1e-5;

// Gradient tolerance: each grad element is (g (onehot - p) - gh p (logp + H)) / T with p
// in [0, 1]; the float error of p, logp and H (fwd_abs_tol above) is multiplied by at
// most |g| + |gh| and divided by T.
double bwd_abs_tol(const Case& c, const std::vector<float>& g_lp,
                   const std::vector<float>& g_h) {
  const double gs = tu::max_abs(g_lp) + tu::max_abs(g_h);
  return 1e-7 + 2.0 * fwd_abs_tol(c) * gs / c.temperature;
}
constexpr double kBwdRel = 1e-4;

void check_forward_against_ref(const Case& c, const std::string& what) {
  Fwd k = run_forward(c);
  RefFwd r = ref_forward(c);
  const double tol = fwd_abs_tol(c);
  CHECK_ALL_NEAR(k.logprobs.data(), r.logprobs.data(), c.n(), tol, kFwdRel,
                 (what + " logprobs").c_str());
  CHECK_ALL_NEAR(k.entropy.data(), r.entropy.data(), c.n(), tol, kFwdRel,
                 (what + " entropy").c_str());
  // Skipping the entropy must not change the log-probs.
  Fwd k2 = run_forward(c, /*with_entropy=*/false);
  CHECK_BITWISE_EQUAL(k.logprobs.data(), k2.logprobs.data(), c.n(),
                      (what + " logprobs with entropy=nullptr").c_str());
}

}  // namespace

TEST(forward_matches_reference_random_shapes) {
  tu::Rng rng(1234);
  const float temps[] = {1.0f, 0.7f, 1.5f, 0.05f};
  const MaskKind kinds[] = {MaskKind::Ones, MaskKind::Suffix, MaskKind::Prefix,
                            MaskKind::Random, MaskKind::Mixed};
  for (int rep = 0; rep < 40; ++rep) {
    const int64_t B = tu::rand_int(rng, 1, 6), T = tu::rand_int(rng, 1, 24);
    const int64_t V = rep % 5 == 0 ? tu::rand_int(rng, 1, 4) : tu::rand_int(rng, 2, 700);
    Case c = random_case(rng, B, T, V, kinds[rep % 5], temps[rep % 4]);
    check_forward_against_ref(c, "case " + std::to_string(rep) + " " + tu::shape_str(B, T, V));
  }
}

TEST(forward_large_vocab) {
  tu::Rng rng(77);
  Case c = random_case(rng, 2, 3, 50000, MaskKind::Suffix, 1.0f, 3.0);
  check_forward_against_ref(c, "vocab 50000");
}

TEST(forward_edge_shapes) {
  tu::Rng rng(5);
  // batch of one, row of length one, vocab of one (logp = 0 and H = 0 exactly).
  for (int64_t V : {1, 2, 17}) {
    Case c = random_case(rng, 1, 1, V, MaskKind::Ones, 1.0f);
    check_forward_against_ref(c, "1x1x" + std::to_string(V));
  }
  // vocab 1: p = 1, so logp = 0 and H = 0 up to the rounding of z = logit / T when a
  // kernel forms z - max twice (e.g. once FMA-contracted): 1e-6 absolute.
  Case c1 = random_case(rng, 3, 5, 1, MaskKind::Ones, 0.9f);
  Fwd k = run_forward(c1);
  for (int64_t i = 0; i < c1.n(); ++i) {
    CHECK_NEAR(k.logprobs[i], 0.0, 1e-6, 0.0);
    CHECK_NEAR(k.entropy[i], 0.0, 1e-6, 0.0);
  }
}

TEST(forward_all_masked_batch_writes_zeros) {
  tu::Rng rng(6);
  Case c = random_case(rng, 3, 4, 11, MaskKind::Ones, 1.0f);
  c.mask.assign(c.n(), 0.0f);
  // Tokens at masked positions may be anything, even out of [0, vocab).
  for (auto& t : c.tokens) t = -7;
  Fwd k = run_forward(c);
  for (int64_t i = 0; i < c.n(); ++i) {
    CHECK(k.logprobs[i] == 0.0f);
    CHECK(k.entropy[i] == 0.0f);
  }
  std::vector<float> g_lp = tu::normal(rng, c.n()), g_h = tu::normal(rng, c.n());
  std::vector<float> grad = run_backward(c, g_lp, g_h);
  for (float g : grad) CHECK(g == 0.0f);
}

TEST(forward_null_mask_equals_all_ones_mask) {
  tu::Rng rng(7);
  for (int rep = 0; rep < 5; ++rep) {
    Case c = random_case(rng, tu::rand_int(rng, 1, 4), tu::rand_int(rng, 1, 9),
                         tu::rand_int(rng, 2, 300), MaskKind::Ones, rep % 2 ? 1.0f : 0.8f);
    c.mask.clear();
    Fwd a = run_forward(c);
    std::vector<float> g_lp = tu::normal(rng, c.n()), g_h = tu::normal(rng, c.n());
    std::vector<float> ga = run_backward(c, g_lp, g_h);
    c.mask.assign(c.n(), 1.0f);
    Fwd b = run_forward(c);
    std::vector<float> gb = run_backward(c, g_lp, g_h);
    CHECK_BITWISE_EQUAL(a.logprobs.data(), b.logprobs.data(), c.n(), "logprobs");
    CHECK_BITWISE_EQUAL(a.entropy.data(), b.entropy.data(), c.n(), "entropy");
    CHECK_BITWISE_EQUAL(ga.data(), gb.data(), c.n() * c.V, "grad_logits");
  }
}

TEST(padding_never_changes_results) {
  tu::Rng rng(8);
  for (int rep = 0; rep < 6; ++rep) {
    Case c = random_case(rng, tu::rand_int(rng, 2, 5), tu::rand_int(rng, 2, 12),
                         tu::rand_int(rng, 2, 100), MaskKind::Mixed, 1.3f);
    if (c.mask.empty()) c.mask = tu::make_mask(rng, c.B, c.T, MaskKind::Mixed);
    std::vector<float> g_lp = tu::normal(rng, c.n()), g_h = tu::normal(rng, c.n());
    Fwd a = run_forward(c);
    std::vector<float> ga = run_backward(c, g_lp, g_h);
    // Masked positions: written as 0.
    for (int64_t i = 0; i < c.n(); ++i)
      if (c.mask[i] == 0.0f) {
        CHECK(a.logprobs[i] == 0.0f);
        CHECK(a.entropy[i] == 0.0f);
        for (int64_t v = 0; v < c.V; ++v) CHECK(ga[i * c.V + v] == 0.0f);
      }
    // Change everything at masked positions: logits, tokens (even out of range) and the
    // incoming gradients.
    tu::scramble_masked(c.logits, c.mask, rng, c.V, 1e4);
    for (int64_t i = 0; i < c.n(); ++i)
      if (c.mask[i] == 0.0f) {
        c.tokens[i] = (i % 2) ? -1 : static_cast<int32_t>(c.V + 3);
        g_lp[i] = 1e6f;
        g_h[i] = -1e6f;
      }
    Fwd b = run_forward(c);
    std::vector<float> gb = run_backward(c, g_lp, g_h);
    CHECK_BITWISE_EQUAL(a.logprobs.data(), b.logprobs.data(), c.n(), "logprobs");
    CHECK_BITWISE_EQUAL(a.entropy.data(), b.entropy.data(), c.n(), "entropy");
    CHECK_BITWISE_EQUAL(ga.data(), gb.data(), c.n() * c.V, "grad_logits");
    // NaN / +-inf anywhere in masked rows (validation only looks at valid rows).
    tu::nonfinite_masked(c.logits, c.mask, c.V);
    tu::nonfinite_masked(g_lp, c.mask);
    tu::nonfinite_masked(g_h, c.mask);
    Fwd z = run_forward(c);
    std::vector<float> gz = run_backward(c, g_lp, g_h);
    CHECK_BITWISE_EQUAL(a.logprobs.data(), z.logprobs.data(), c.n(), "logprobs, NaN padding");
    CHECK_BITWISE_EQUAL(a.entropy.data(), z.entropy.data(), c.n(), "entropy, NaN padding");
    CHECK_BITWISE_EQUAL(ga.data(), gz.data(), c.n() * c.V, "grad_logits, NaN padding");
  }
}

TEST(forward_extreme_magnitudes) {
  tu::Rng rng(9);
  // Logits around +-1e4 (uniform), around +1e4 with O(1) spread (near-ties at a large
  // offset), and at 1e-30 scale (a uniform distribution: logp = -log V, H = log V).
  for (float temp : {1.0f, 0.7f}) {
    Case c = random_case(rng, 2, 5, 64, MaskKind::Ones, temp);
    c.logits = tu::uniform(rng, c.n() * c.V, -1e4, 1e4);
    check_forward_against_ref(c, "uniform +-1e4, T=" + std::to_string(temp));

    Case d = random_case(rng, 2, 5, 64, MaskKind::Ones, temp);
    for (auto& x : d.logits) x = 1e4f + x;
    check_forward_against_ref(d, "1e4 + N(0,2), T=" + std::to_string(temp));

    Case e = random_case(rng, 2, 5, 64, MaskKind::Ones, temp);
    for (auto& x : e.logits) x *= 1e-30f;
    check_forward_against_ref(e, "1e-30 scale, T=" + std::to_string(temp));
    Fwd k = run_forward(e);
    for (int64_t i = 0; i < e.n(); ++i) {
      CHECK_NEAR(k.logprobs[i], -std::log(64.0), 1e-6, 1e-6);
      CHECK_NEAR(k.entropy[i], std::log(64.0), 1e-6, 1e-6);
    }
  }
  // Every result stays finite.
  Case f = random_case(rng, 3, 4, 200, MaskKind::Ones, 1.0f);
  f.logits = tu::uniform(rng, f.n() * f.V, -1e4, 1e4);
  Fwd k = run_forward(f);
  for (int64_t i = 0; i < f.n(); ++i) {
    CHECK(std::isfinite(k.logprobs[i]));
    CHECK(std::isfinite(k.entropy[i]));
  }
}

TEST(neg_inf_logits_for_non_taken_tokens) {
  tu::Rng rng(10);
  for (float temp : {1.0f, 0.6f}) {
    Case c = random_case(rng, 3, 6, 40, MaskKind::Suffix, temp);
    // Ban ~half of the tokens of every row, never the taken one.
    for (int64_t i = 0; i < c.n(); ++i)
      for (int64_t v = 0; v < c.V; ++v)
        if (v != c.tokens[i] && tu::rand_int(rng, 0, 1))
          c.logits[i * c.V + v] = -std::numeric_limits<float>::infinity();
    check_forward_against_ref(c, "-inf logits");
    Fwd k = run_forward(c);
    for (int64_t i = 0; i < c.n(); ++i) {
      CHECK(std::isfinite(k.logprobs[i]));
      CHECK(std::isfinite(k.entropy[i]));
    }
    // Gradient: exactly 0 at banned tokens, finite elsewhere, equal to the reference.
    std::vector<float> g_lp = tu::normal(rng, c.n()), g_h = tu::normal(rng, c.n());
    std::vector<float> g = run_backward(c, g_lp, g_h);
    std::vector<double> r = ref_backward(c, g_lp, g_h);
    std::vector<double> fd = fd_backward(c, g_lp, g_h);
    for (int64_t j = 0; j < c.n() * c.V; ++j) {
      if (std::isinf(c.logits[j])) CHECK(g[j] == 0.0f);
      CHECK(std::isfinite(g[j]));
    }
    CHECK_ALL_NEAR(r.data(), fd.data(), c.n() * c.V, 1e-7, 1e-6, "reference grad vs FD");
    CHECK_ALL_NEAR(g.data(), fd.data(), c.n() * c.V, bwd_abs_tol(c, g_lp, g_h), kBwdRel,
                   "grad_logits vs FD");
  }
  // A row where every token but the taken one is banned: p = onehot, logp = 0, H = 0.
  Case d = random_case(rng, 1, 2, 5, MaskKind::Ones, 1.0f);
  for (int64_t i = 0; i < d.n(); ++i)
    for (int64_t v = 0; v < d.V; ++v)
      if (v != d.tokens[i]) d.logits[i * d.V + v] = -std::numeric_limits<float>::infinity();
  Fwd k = run_forward(d);
  for (int64_t i = 0; i < d.n(); ++i) {
    CHECK_NEAR(k.logprobs[i], 0.0, 1e-6, 0.0);
    CHECK_NEAR(k.entropy[i], 0.0, 1e-6, 0.0);
  }
}

TEST(reference_gradient_matches_finite_differences) {
  // Validates the analytic float64 reference gradient itself: central differences with
  // h = 1e-6 on a smooth function have truncation error O(h^2 f''') ~ 1e-12 and
  // cancellation error ~ eps_64 |f| / h ~ 1e-9 for |f| ~ 10, so 1e-7 is ample.
  tu::Rng rng(11);
  for (int rep = 0; rep < 8; ++rep) {
    const float temp = rep % 2 ? 1.0f : 0.6f + 0.3f * rep;
    Case c = random_case(rng, tu::rand_int(rng, 1, 3), tu::rand_int(rng, 1, 5),
                         tu::rand_int(rng, 1, 40), MaskKind::Mixed, temp);
    std::vector<float> g_lp = tu::normal(rng, c.n()), g_h = tu::normal(rng, c.n());
    std::vector<double> r = ref_backward(c, g_lp, g_h);
    std::vector<double> fd = fd_backward(c, g_lp, g_h);
    CHECK_ALL_NEAR(r.data(), fd.data(), c.n() * c.V, 1e-7, 1e-6, "ref grad vs FD");
  }
}

TEST(backward_matches_finite_differences) {
  tu::Rng rng(12);
  const float temps[] = {1.0f, 0.5f, 2.0f, 0.8f};
  for (int rep = 0; rep < 24; ++rep) {
    const float temp = temps[rep % 4];
    Case c = random_case(rng, tu::rand_int(rng, 1, 4), tu::rand_int(rng, 1, 8),
                         tu::rand_int(rng, 1, 120), rep % 3 ? MaskKind::Mixed : MaskKind::Ones,
                         temp);
    std::vector<float> g_lp = tu::normal(rng, c.n()), g_h = tu::normal(rng, c.n());
    // Cover: both gradients, logprobs-only, entropy-only (the other nullptr).
    if (rep % 6 == 1) g_h.clear();
    if (rep % 6 == 2) g_lp.clear();
    std::vector<float> g = run_backward(c, g_lp, g_h);
    std::vector<double> fd = fd_backward(c, g_lp, g_h);
    std::vector<double> r = ref_backward(c, g_lp, g_h);
    const std::string what = "case " + std::to_string(rep) + " T=" + std::to_string(temp) +
                             " " + tu::shape_str(c.B, c.T, c.V);
    const double tol = bwd_abs_tol(c, g_lp, g_h);
    CHECK_ALL_NEAR(g.data(), fd.data(), c.n() * c.V, tol, kBwdRel, (what + " vs FD").c_str());
    CHECK_ALL_NEAR(g.data(), r.data(), c.n() * c.V, tol, kBwdRel, (what + " vs ref").c_str());
  }
}

TEST(backward_null_gradients_are_zeros) {
  tu::Rng rng(13);
  Case c = random_case(rng, 2, 3, 30, MaskKind::Ones, 1.1f);
  std::vector<float> g_lp = tu::normal(rng, c.n()), g_h = tu::normal(rng, c.n());
  std::vector<float> zeros(c.n(), 0.0f);
  CHECK_BITWISE_EQUAL(run_backward(c, g_lp, {}).data(), run_backward(c, g_lp, zeros).data(),
                      c.n() * c.V, "grad_entropy=nullptr vs zeros");
  CHECK_BITWISE_EQUAL(run_backward(c, {}, g_h).data(), run_backward(c, zeros, g_h).data(),
                      c.n() * c.V, "grad_logprobs=nullptr vs zeros");
  std::vector<float> none = run_backward(c, {}, {});
  for (float x : none) CHECK(x == 0.0f);
}

TEST(backward_extreme_magnitudes) {
  tu::Rng rng(14);
  for (float temp : {1.0f, 0.7f}) {
    Case c = random_case(rng, 2, 4, 64, MaskKind::Ones, temp);
    c.logits = tu::uniform(rng, c.n() * c.V, -1e4, 1e4);
    Case d = random_case(rng, 2, 4, 64, MaskKind::Ones, temp);
    for (auto& x : d.logits) x = 1e4f + x;
    Case e = random_case(rng, 2, 4, 64, MaskKind::Ones, temp);
    for (auto& x : e.logits) x *= 1e-30f;
    for (const Case* k : {&c, &d, &e}) {
      std::vector<float> g_lp = tu::normal(rng, k->n()), g_h = tu::normal(rng, k->n());
      std::vector<float> g = run_backward(*k, g_lp, g_h);
      std::vector<double> r = ref_backward(*k, g_lp, g_h);
      CHECK_ALL_NEAR(g.data(), r.data(), k->n() * k->V, bwd_abs_tol(*k, g_lp, g_h), kBwdRel,
                     "extreme grad vs ref");
    }
    // At 1e-30 scale FD is still well conditioned (the function is smooth at 0).
    std::vector<float> g_lp = tu::normal(rng, e.n()), g_h = tu::normal(rng, e.n());
    std::vector<double> fd = fd_backward(e, g_lp, g_h);
    std::vector<float> g = run_backward(e, g_lp, g_h);
    CHECK_ALL_NEAR(g.data(), fd.data(), e.n() * e.V, bwd_abs_tol(e, g_lp, g_h), kBwdRel,
                   "1e-30 grad vs FD");
  }
}

TEST(determinism_bit_identical_repeats) {
  tu::Rng rng(15);
  Case c = random_case(rng, 5, 17, 3000, MaskKind::Mixed, 0.9f);
  std::vector<float> g_lp = tu::normal(rng, c.n()), g_h = tu::normal(rng, c.n());
  Fwd a = run_forward(c), b = run_forward(c);
  CHECK_BITWISE_EQUAL(a.logprobs.data(), b.logprobs.data(), c.n(), "logprobs");
  CHECK_BITWISE_EQUAL(a.entropy.data(), b.entropy.data(), c.n(), "entropy");
  std::vector<float> ga = run_backward(c, g_lp, g_h), gb = run_backward(c, g_lp, g_h);
  CHECK_BITWISE_EQUAL(ga.data(), gb.data(), c.n() * c.V, "grad_logits");
}

PPO_TEST_MAIN()
