// ppo::cpu LayerNorm and GELU (csrc/cpu/layers.h) against plain float64 references:
// forward outputs and saved statistics, backward against the analytic float64 gradient
// (written as an explicit Jacobian-vector product, not the kernel's closed form) and
// against central finite differences of the float64 forward, accumulation (+=)
// semantics, large-mean rows, channels == 1, bit-identical reruns, argument errors.
//
// Determinism across thread counts: run this binary with PPO_MAX_THREADS=1 and =3; the
// "checksum" line printed by layers_bit_identical_reruns must be the same.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/layers.h"
#include "test_framework.h"
#include "test_util.h"

namespace {

using ppo::cpu::gelu_backward;
using ppo::cpu::gelu_forward;
using ppo::cpu::layernorm_backward;
using ppo::cpu::layernorm_forward;

// ---- float64 references ------------------------------------------------------------

struct LnRef {
  std::vector<double> out, mean, rstd, xhat;
};

// LayerNorm of double inputs, textbook form: mean, biased variance (two-pass), xhat.
LnRef ln_ref(int64_t rows, int64_t C, const std::vector<double>& x, const std::vector<double>& w,
             const std::vector<double>& b, double eps) {
  LnRef r;
  r.out.resize(rows * C), r.xhat.resize(rows * C), r.mean.resize(rows), r.rstd.resize(rows);
  for (int64_t i = 0; i < rows; ++i) {
    double m = 0.0;
    for (int64_t c = 0; c < C; ++c) m += x[i * C + c];
    m /= static_cast<double>(C);
    double v = 0.0;
    for (int64_t c = 0; c < C; ++c) v += (x[i * C + c] - m) * (x[i * C + c] - m);
    v /= static_cast<double>(C);
    const double rs = 1.0 / std::sqrt(v + eps);
    r.mean[i] = m, r.rstd[i] = rs;
    for (int64_t c = 0; c < C; ++c) {
      r.xhat[i * C + c] = (x[i * C + c] - m) * rs;
      r.out[i * C + c] = r.xhat[i * C + c] * w[c] + b[c];
    }
  }
  return r;
}

// Analytic gradients by the chain rule through the explicit Jacobian
//   d out[j] / d x[k] = w[j] * rstd * (delta_jk - 1/C - xhat_j xhat_k / C)
// (O(C^2) per row on purpose: a different route from the kernel's closed form).
void ln_grad_ref(int64_t rows, int64_t C, const std::vector<double>& dout, const LnRef& f,
                 const std::vector<double>& w, std::vector<double>& dx, std::vector<double>& dw,
                 std::vector<double>& db) {
  dx.assign(rows * C, 0.0), dw.assign(C, 0.0), db.assign(C, 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    const double rs = f.rstd[i];
    for (int64_t k = 0; k < C; ++k) {
      double s = 0.0;
      for (int64_t j = 0; j < C; ++j) {
        const double jac = w[j] * rs *
                           ((j == k ? 1.0 : 0.0) - 1.0 / static_cast<double>(C) -
                            f.xhat[i * C + j] * f.xhat[i * C + k] / static_cast<double>(C));
        s += dout[i * C + j] * jac;
      }
      dx[i * C + k] = s;
    }
    for (int64_t c = 0; c < C; ++c) {
      dw[c] += dout[i * C + c] * f.xhat[i * C + c];
      db[c] += dout[i * C + c];
    }
  }
}

double gelu_ref(double x) {
  const double k = std::sqrt(2.0 / M_PI);
  return 0.5 * x * (1.0 + std::tanh(k * (x + 0.044715 * x * x * x)));
}
double gelu_grad_ref(double x) {
  const double k = std::sqrt(2.0 / M_PI);
  const double t = std::tanh(k * (x + 0.044715 * x * x * x));
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x);
}

std::vector<double> widen(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// One LayerNorm problem with float inputs.
struct LnCase {
  int64_t rows = 0, C = 0;
  float eps = 1e-5f;
  std::vector<float> x, w, b, dout;
};

LnCase make_ln(tu::Rng& rng, int64_t rows, int64_t C, double x_mean = 0.0, double x_std = 1.0) {
  LnCase t;
  t.rows = rows, t.C = C;
  t.x = tu::normal(rng, rows * C, x_mean, x_std);
  t.w = tu::uniform(rng, C, 0.5, 1.5);
  t.b = tu::normal(rng, C, 0.0, 0.5);
  t.dout = tu::normal(rng, rows * C);
  return t;
}

struct LnOut {
  std::vector<float> out, mean, rstd, dx, dw, db;
};

LnOut run_ln(const LnCase& t, int calls = 1) {
  LnOut o;
  o.out.assign(t.rows * t.C, tu::kNaN), o.mean.assign(t.rows, tu::kNaN),
      o.rstd.assign(t.rows, tu::kNaN);
  layernorm_forward(t.rows, t.C, t.x.data(), t.w.data(), t.b.data(), t.eps, o.out.data(),
                    o.mean.data(), o.rstd.data());
  o.dx.assign(t.rows * t.C, 0.0f), o.dw.assign(t.C, 0.0f), o.db.assign(t.C, 0.0f);
  for (int k = 0; k < calls; ++k)
    layernorm_backward(t.rows, t.C, t.dout.data(), t.x.data(), t.w.data(), o.mean.data(),
                       o.rstd.data(), o.dx.data(), o.dw.data(), o.db.data());
  return o;
}

// Compares a kernel run with the float64 reference of the same (float) inputs.
// Tolerances, u = 2^-24 ~ 6e-8:
//  - mean: the double mean rounded once to float: 0.5 u relative; allow 1e-7 * |mean|
//    plus 1e-7 * std (the rounding of a large mean is relative to the mean itself).
//  - rstd: double computation rounded to float: allow 2e-7 relative.
//  - out = xhat * w + b: xhat carries a few u relative (rstd rounding, the products), so
//    |err| <= ~4u (|xhat w| + |b|); allow 1e-6 * (|xhat w| + |b|) + 1e-7.
//  - grad_in = rstd (dn - mean(dn) - xhat mean(dn xhat)), dn = w dout; each of the three
//    terms is bounded by rstd * max|dn| * (2 + |xhat|) (mean|xhat| <= 1), and the float
//    row sums (C/16 additions per lane, then 16 lanes) add ~C/16 u relative worst case;
//    allow 1e-5 * rstd * max|dn| * (2 + |xhat|), far below any real error (a wrong
//    mean term or a missing 1/C is O(rstd * max|dn|)).
//  - grad_weight / grad_bias: float sums over rows of xhat dout / dout; allow
//    1e-5 * sum_rows |term| + 1e-7.
void check_ln(const LnCase& t, const LnOut& o, double out_scale = 1.0) {
  const int64_t rows = t.rows, C = t.C;
  const LnRef f = ln_ref(rows, C, widen(t.x), widen(t.w), widen(t.b), t.eps);
  std::vector<double> dx, dw, db;
  ln_grad_ref(rows, C, widen(t.dout), f, widen(t.w), dx, dw, db);
  const std::string shape = "rows=" + std::to_string(rows) + " C=" + std::to_string(C);
  for (int64_t i = 0; i < rows; ++i) {
    const double sd = 1.0 / f.rstd[i];
    CHECK_NEAR_CTX(o.mean[i], f.mean[i], 1e-7 * sd, 1e-7, shape + " mean row " + std::to_string(i));
    CHECK_NEAR_CTX(o.rstd[i], f.rstd[i], 0.0, 2e-7, shape + " rstd row " + std::to_string(i));
    double max_dn = 0.0;
    for (int64_t c = 0; c < C; ++c)
      max_dn = std::max(max_dn, std::fabs(static_cast<double>(t.w[c]) * t.dout[i * C + c]));
    for (int64_t c = 0; c < C; ++c) {
      const int64_t k = i * C + c;
      const double xh = f.xhat[k];
      const std::string where = shape + " [" + std::to_string(i) + "," + std::to_string(c) + "]";
      CHECK_NEAR_CTX(o.out[k], f.out[k],
                     out_scale * (1e-6 * (std::fabs(xh * t.w[c]) + std::fabs(t.b[c])) + 1e-7), 0.0,
                     "out " + where);
      CHECK_NEAR_CTX(o.dx[k], dx[k], 1e-5 * f.rstd[i] * max_dn * (2.0 + std::fabs(xh)), 0.0,
                     "grad_in " + where);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    double mag_w = 0.0, mag_b = 0.0;
    for (int64_t i = 0; i < rows; ++i) {
      mag_w += std::fabs(f.xhat[i * C + c] * t.dout[i * C + c]);
      mag_b += std::fabs(static_cast<double>(t.dout[i * C + c]));
    }
    CHECK_NEAR_CTX(o.dw[c], dw[c], 1e-5 * mag_w + 1e-7, 0.0, shape + " grad_weight " + std::to_string(c));
    CHECK_NEAR_CTX(o.db[c], db[c], 1e-5 * mag_b + 1e-7, 0.0, shape + " grad_bias " + std::to_string(c));
  }
}

uint64_t fnv1a(uint64_t h, const std::vector<float>& v) {
  for (float f : v) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    for (int k = 0; k < 4; ++k) {
      h ^= (bits >> (8 * k)) & 0xffu;
      h *= 1099511628211ull;
    }
  }
  return h;
}

}  // namespace

// ---- LayerNorm ---------------------------------------------------------------------

TEST(layernorm_matches_float64_reference) {
  tu::Rng rng(1);
  // Tiny, odd (lane tails), exactly one/two lane blocks, GPT-2 width, many rows (several
  // gradient chunks, uneven last chunk).
  const int64_t shapes[][2] = {{3, 5},  {3, 7},   {1, 1},   {4, 16},  {5, 32},
                               {2, 33}, {7, 100}, {9, 768}, {130, 48}, {517, 20}};
  for (const auto& s : shapes) {
    LnCase t = make_ln(rng, s[0], s[1]);
    check_ln(t, run_ln(t));
  }
  // Scaled and shifted inputs: small spread (rstd ~ 100), large spread.
  LnCase small = make_ln(rng, 6, 50, 0.3, 0.01);
  check_ln(small, run_ln(small));
  LnCase large = make_ln(rng, 6, 50, -20.0, 40.0);
  check_ln(large, run_ln(large));
}

TEST(layernorm_analytic_gradient_matches_finite_differences) {
  // The float64 analytic reference against central differences of the float64 forward,
  // L = sum dout * out, step h = 1e-6: truncation error ~h^2 |L'''| ~ 1e-12, rounding
  // ~1e-16 |L| / h ~ 1e-10, so 1e-7 absolute (+ 1e-7 relative) leaves a wide margin yet
  // catches any wrong term (O(1)). The kernel is then checked against the same
  // differences at float tolerance (1e-5 relative to the row's gradient scale).
  tu::Rng rng(2);
  const int64_t shapes[][2] = {{3, 5}, {3, 7}, {2, 1}, {2, 2}};
  for (const auto& s : shapes) {
    const int64_t rows = s[0], C = s[1];
    LnCase t = make_ln(rng, rows, C);
    const std::vector<double> x = widen(t.x), w = widen(t.w), b = widen(t.b), dout = widen(t.dout);
    const LnRef f = ln_ref(rows, C, x, w, b, t.eps);
    std::vector<double> dx, dw, db;
    ln_grad_ref(rows, C, dout, f, w, dx, dw, db);
    auto loss = [&](const std::vector<double>& xx, const std::vector<double>& ww,
                    const std::vector<double>& bb) {
      const LnRef g = ln_ref(rows, C, xx, ww, bb, t.eps);
      double l = 0.0;
      for (int64_t k = 0; k < rows * C; ++k) l += dout[k] * g.out[k];
      return l;
    };
    const double h = 1e-6;
    const LnOut o = run_ln(t);
    const std::string shape = "rows=" + std::to_string(rows) + " C=" + std::to_string(C);
    double scale = 0.0;  // the parameter gradients' magnitude, for the float tolerance
    for (double v : dw) scale = std::max(scale, std::fabs(v));
    for (double v : db) scale = std::max(scale, std::fabs(v));
    for (int64_t k = 0; k < rows * C; ++k) {
      std::vector<double> xp = x, xm = x;
      xp[k] += h, xm[k] -= h;
      const double fd = (loss(xp, w, b) - loss(xm, w, b)) / (2 * h);
      CHECK_NEAR_CTX(dx[k], fd, 1e-7, 1e-7, shape + " ref d/dx " + std::to_string(k));
      // grad_in's float error is relative to its terms' size rstd * max|w dout| (see
      // check_ln), not to grad_in itself: with C = 1 the true gradient is 0 but the
      // kernel's dn - mean(dn) may keep the rounding residue of w * dout when the
      // compiler fuses it into an fma, times rstd = 1/sqrt(eps) ~ 316.
      const int64_t i = k / C;
      double max_dn = 0.0;
      for (int64_t c = 0; c < C; ++c) max_dn = std::max(max_dn, std::fabs(w[c] * dout[i * C + c]));
      CHECK_NEAR_CTX(o.dx[k], fd, 1e-5 * f.rstd[i] * max_dn * (2.0 + std::fabs(f.xhat[k])), 0.0,
                     shape + " kernel d/dx " + std::to_string(k));
    }
    for (int64_t c = 0; c < C; ++c) {
      std::vector<double> wp = w, wm = w, bp = b, bm = b;
      wp[c] += h, wm[c] -= h, bp[c] += h, bm[c] -= h;
      const double fdw = (loss(x, wp, b) - loss(x, wm, b)) / (2 * h);
      const double fdb = (loss(x, w, bp) - loss(x, w, bm)) / (2 * h);
      CHECK_NEAR_CTX(dw[c], fdw, 1e-7, 1e-7, shape + " ref d/dw " + std::to_string(c));
      CHECK_NEAR_CTX(db[c], fdb, 1e-7, 1e-7, shape + " ref d/db " + std::to_string(c));
      CHECK_NEAR_CTX(o.dw[c], fdw, 1e-5 * scale + 1e-6, 0.0, shape + " kernel d/dw " + std::to_string(c));
      CHECK_NEAR_CTX(o.db[c], fdb, 1e-5 * scale + 1e-6, 0.0, shape + " kernel d/db " + std::to_string(c));
    }
  }
}

TEST(layernorm_backward_accumulates) {
  tu::Rng rng(3);
  LnCase t = make_ln(rng, 37, 21);
  const LnOut once = run_ln(t, 1), twice = run_ln(t, 2);
  // grad_in: each element gets the same increment d twice, starting from 0, so the
  // result is exactly 2x: d + d is exact, and if the compiler fuses the last product
  // into an fma, round(p + d) with p the exact product (|p - d| <= ulp(d) / 2) is 2d.
  std::vector<float> doubled(once.dx.size());
  for (size_t k = 0; k < doubled.size(); ++k) doubled[k] = 2.0f * once.dx[k];
  CHECK_BITWISE_EQUAL(twice.dx.data(), doubled.data(), static_cast<int64_t>(doubled.size()), "2x grad_in");
  // grad_weight/bias add the chunk partials one by one onto the running value, so the
  // second call rounds differently: 2x to a few u of the summed magnitude.
  for (int64_t c = 0; c < t.C; ++c) {
    CHECK_NEAR(twice.dw[c], 2.0 * once.dw[c], 1e-5 * (std::fabs(once.dw[c]) + 1.0), 0.0);
    CHECK_NEAR(twice.db[c], 2.0 * once.db[c], 1e-5 * (std::fabs(once.db[c]) + 1.0), 0.0);
  }
  // Onto nonzero gradients: result = initial + the gradient (one float add per element
  // for grad_in, possibly fused with the last product: within ~1 u of the operands).
  std::vector<float> gi = tu::normal(rng, t.rows * t.C), gw = tu::normal(rng, t.C),
                     gb = tu::normal(rng, t.C);
  const std::vector<float> gi0 = gi, gw0 = gw, gb0 = gb;
  layernorm_backward(t.rows, t.C, t.dout.data(), t.x.data(), t.w.data(), once.mean.data(),
                     once.rstd.data(), gi.data(), gw.data(), gb.data());
  for (size_t k = 0; k < gi.size(); ++k)
    CHECK_NEAR(gi[k], static_cast<double>(gi0[k]) + once.dx[k],
               1.2e-7 * (std::fabs(gi0[k]) + std::fabs(once.dx[k])), 0.0);
  for (int64_t c = 0; c < t.C; ++c) {
    CHECK_NEAR(gw[c], static_cast<double>(gw0[c]) + once.dw[c], 1e-5 * (std::fabs(once.dw[c]) + 1.0), 0.0);
    CHECK_NEAR(gb[c], static_cast<double>(gb0[c]) + once.db[c], 1e-5 * (std::fabs(once.db[c]) + 1.0), 0.0);
  }
}

TEST(layernorm_large_mean_rows_stay_accurate) {
  // Rows of 1e4 + N(0,1): a float mean is off by up to ulp(1e4)/2 ~ 5e-4, which a naive
  // float kernel would pass on as ~5e-4 error in xhat; one-pass E[x^2] - E[x]^2 in float
  // would lose the variance entirely. The kernel must match the float64 reference at the
  // usual tolerances (the inputs themselves are the same floats for both).
  tu::Rng rng(4);
  const int64_t shapes[][2] = {{4, 768}, {3, 7}, {5, 100}};
  for (const auto& s : shapes) {
    LnCase t = make_ln(rng, s[0], s[1], 1e4, 1.0);
    check_ln(t, run_ln(t));
    LnCase neg = make_ln(rng, s[0], s[1], -3e5, 2.0);
    check_ln(neg, run_ln(neg));
  }
}

TEST(layernorm_single_channel_and_constant_rows) {
  // Variance 0: rstd = 1/sqrt(eps), xhat = 0 exactly, so out = bias exactly and
  // grad_weight = 0 exactly; grad_bias = sum of dout; grad_in = rstd (dn - mean(dn)),
  // which is 0 for C = 1 up to the rounding residue of dn = w dout (when fused into an
  // fma), times rstd: allow 1e-6 * rstd * |dn|. C = 19 is checked by check_ln.
  tu::Rng rng(5);
  for (int64_t C : {1, 19}) {
    LnCase t = make_ln(rng, 6, C);
    for (int64_t i = 0; i < t.rows; ++i)
      for (int64_t c = 0; c < C; ++c) t.x[i * C + c] = static_cast<float>(i) * 3.5f - 7.0f;
    const LnOut o = run_ln(t);
    for (int64_t i = 0; i < t.rows; ++i) {
      CHECK(o.mean[i] == static_cast<float>(i) * 3.5f - 7.0f);
      CHECK_NEAR(o.rstd[i], 1.0 / std::sqrt(static_cast<double>(t.eps)), 0.0, 2e-7);
      for (int64_t c = 0; c < C; ++c) {
        CHECK(o.out[i * C + c] == t.b[c]);
        if (C == 1)
          CHECK_NEAR(o.dx[i], 0.0, 1e-6 * o.rstd[i] * std::fabs(t.w[0] * t.dout[i]), 0.0);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      double sum = 0.0;
      for (int64_t i = 0; i < t.rows; ++i) sum += t.dout[i * C + c];
      CHECK(o.dw[c] == 0.0f);
      CHECK_NEAR(o.db[c], sum, 1e-6, 1e-6);
    }
    check_ln(t, o);
  }
}

// ---- GELU --------------------------------------------------------------------------

TEST(gelu_matches_float64_reference) {
  // Tolerances: the kernel evaluates x * sigmoid(2u) with fast_exp (~2 u) and a division;
  // u itself is rounded (a few u relative), which e^(-2u) turns into ~2|u| * few u
  // relative in the negative tail. Hence |err| <= 1e-6 |gelu| + 1e-7 (the absolute part
  // covers the tail, where |gelu| * |u| stays below ~0.1). The derivative sums two terms
  // of opposite sign for x < 0 (cancelling near x ~ -0.75), so it gets an absolute
  // 5e-7 * (1 + |x du/dx|) - the size of those terms - plus 1e-6 relative.
  tu::Rng rng(6);
  std::vector<float> x = tu::normal(rng, 5000, 0.0, 3.0);
  // Edges: zero, tiny, the tail cut (x ~ -9.6), large of both signs, x^3 overflow.
  const float edges[] = {0.0f, -0.0f, 1e-30f, -1e-30f, 1e-4f, -1e-4f, 0.5f, -0.75f, 3.0f, -3.0f,
                         -9.0f, -9.5f, -9.7f, -10.0f, -30.0f, 10.0f, 100.0f, 1e20f, -1e20f, 1e38f, -1e38f};
  x.insert(x.end(), std::begin(edges), std::end(edges));
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<float> y(n, tu::kNaN), gout = tu::normal(rng, n), gin(n, 0.0f);
  gelu_forward(n, x.data(), y.data());
  gelu_backward(n, x.data(), gout.data(), gin.data());
  for (int64_t i = 0; i < n; ++i) {
    const double xi = x[i];
    const std::string where = "x=" + tf::fmt_double(xi);
    const double want = std::fabs(xi) > 1e15 ? (xi > 0 ? xi : 0.0) : gelu_ref(xi);
    CHECK_NEAR_CTX(y[i], want, 1e-7, 1e-6, "gelu " + where);
    const double dudx = std::sqrt(2.0 / M_PI) * (1.0 + 3.0 * 0.044715 * xi * xi);
    const double dwant = std::fabs(xi) > 1e15 ? (xi > 0 ? 1.0 : 0.0) : gelu_grad_ref(xi);
    const double gscale = std::fabs(xi) > 1e15 ? 1.0 : 1.0 + std::fabs(xi * dudx);
    CHECK_NEAR_CTX(gin[i], dwant * gout[i], 5e-7 * gscale * std::fabs(gout[i]), 1e-6,
                   "gelu' " + where);
  }
  // In place.
  std::vector<float> inplace = x;
  gelu_forward(n, inplace.data(), inplace.data());
  CHECK_BITWISE_EQUAL(inplace.data(), y.data(), n, "in-place gelu");
  // NaN propagates; +inf maps to +inf, -inf to 0.
  const float special[] = {tu::kNaN, tu::kInf, -tu::kInf};
  float sy[3], sg[3] = {0, 0, 0};
  const float ones[3] = {1, 1, 1};
  gelu_forward(3, special, sy);
  gelu_backward(3, special, ones, sg);
  CHECK(std::isnan(sy[0]));
  CHECK(sy[1] == tu::kInf);
  CHECK(sy[2] == 0.0f);
  CHECK(std::isnan(sg[0]));
  CHECK(sg[1] == 1.0f);
  CHECK(sg[2] == 0.0f);
}

TEST(gelu_gradient_matches_finite_differences) {
  // The float64 derivative reference against central differences of the float64 gelu
  // (h = 1e-6: error ~h^2 |gelu'''| + 1e-16 |gelu| / h, < 1e-9 for |x| <= 6).
  for (double xi = -6.0; xi <= 6.0; xi += 0.0625) {
    const double h = 1e-6;
    const double fd = (gelu_ref(xi + h) - gelu_ref(xi - h)) / (2 * h);
    CHECK_NEAR_CTX(gelu_grad_ref(xi), fd, 1e-8, 1e-8, "x=" + tf::fmt_double(xi));
    float xf = static_cast<float>(xi), g = 0.0f, one = 1.0f;
    gelu_backward(1, &xf, &one, &g);
    CHECK_NEAR_CTX(g, fd, 5e-7 * (1.0 + std::fabs(xi) * std::sqrt(2.0 / M_PI) *
                                            (1.0 + 3.0 * 0.044715 * xi * xi)),
                   1e-6, "kernel x=" + tf::fmt_double(xi));
  }
}

TEST(gelu_backward_accumulates) {
  tu::Rng rng(7);
  const int64_t n = 1000;
  std::vector<float> x = tu::normal(rng, n), gout = tu::normal(rng, n), once(n, 0.0f), twice(n, 0.0f);
  gelu_backward(n, x.data(), gout.data(), once.data());
  gelu_backward(n, x.data(), gout.data(), twice.data());
  gelu_backward(n, x.data(), gout.data(), twice.data());
  std::vector<float> doubled(n);  // exactly 2x, as in layernorm_backward_accumulates
  for (int64_t i = 0; i < n; ++i) doubled[i] = 2.0f * once[i];
  CHECK_BITWISE_EQUAL(twice.data(), doubled.data(), n, "2x gelu grad");
  std::vector<float> g = tu::normal(rng, n);
  const std::vector<float> g0 = g;
  gelu_backward(n, x.data(), gout.data(), g.data());
  // One add per element (possibly fused with the product into an fma): ~1 u.
  for (int64_t i = 0; i < n; ++i)
    CHECK_NEAR(g[i], static_cast<double>(g0[i]) + once[i],
               1.2e-7 * (std::fabs(g0[i]) + std::fabs(once[i])), 0.0);
}

// ---- Determinism and errors ----------------------------------------------------------

TEST(layers_bit_identical_reruns) {
  // Sizes that spread over several threads and several gradient chunks (uneven last
  // chunk). Reruns must be bit-identical; the checksum must not change with
  // PPO_MAX_THREADS (compare the printed line across runs).
  tu::Rng rng(8);
  LnCase t = make_ln(rng, 389, 768);
  const LnOut a = run_ln(t, 2), b = run_ln(t, 2);
  CHECK_BITWISE_EQUAL(a.out.data(), b.out.data(), static_cast<int64_t>(a.out.size()), "out");
  CHECK_BITWISE_EQUAL(a.mean.data(), b.mean.data(), t.rows, "mean");
  CHECK_BITWISE_EQUAL(a.rstd.data(), b.rstd.data(), t.rows, "rstd");
  CHECK_BITWISE_EQUAL(a.dx.data(), b.dx.data(), static_cast<int64_t>(a.dx.size()), "grad_in");
  CHECK_BITWISE_EQUAL(a.dw.data(), b.dw.data(), t.C, "grad_weight");
  CHECK_BITWISE_EQUAL(a.db.data(), b.db.data(), t.C, "grad_bias");
  // grad_in of a row does not depend on which rows are in the call: rows one at a time
  // give the same bits (the weight/bias sums may differ: their chunking follows rows).
  std::vector<float> by_row(t.rows * t.C, 0.0f), gw(t.C, 0.0f), gb(t.C, 0.0f);
  for (int rep = 0; rep < 2; ++rep)
    for (int64_t i = 0; i < t.rows; ++i)
      layernorm_backward(1, t.C, &t.dout[i * t.C], &t.x[i * t.C], t.w.data(), &a.mean[i],
                         &a.rstd[i], &by_row[i * t.C], gw.data(), gb.data());
  CHECK_BITWISE_EQUAL(by_row.data(), a.dx.data(), static_cast<int64_t>(by_row.size()),
                      "grad_in row by row");

  const int64_t n = 300000;
  std::vector<float> x = tu::normal(rng, n, 0.0, 2.0), gout = tu::normal(rng, n);
  std::vector<float> y1(n), y2(n), g1(n, 0.0f), g2(n, 0.0f);
  gelu_forward(n, x.data(), y1.data());
  gelu_forward(n, x.data(), y2.data());
  gelu_backward(n, x.data(), gout.data(), g1.data());
  gelu_backward(n, x.data(), gout.data(), g2.data());
  CHECK_BITWISE_EQUAL(y1.data(), y2.data(), n, "gelu");
  CHECK_BITWISE_EQUAL(g1.data(), g2.data(), n, "gelu grad");

  uint64_t h = 1469598103934665603ull;
  const std::vector<float>* parts[] = {&a.out, &a.mean, &a.rstd, &a.dx, &a.dw, &a.db, &y1, &g1};
  for (const std::vector<float>* v : parts) h = fnv1a(h, *v);
  std::printf("    checksum %016llx (must not depend on PPO_MAX_THREADS)\n",
              static_cast<unsigned long long>(h));
}

TEST(layers_argument_errors) {
  using ppo::ErrorCode;
  float v[8] = {1, 2, 3, 4, 5, 6, 7, 8}, m[2], r[2], o[8], gw[4], gb[4], gi[8];
  CHECK_THROWS_CODE(layernorm_forward(-1, 4, v, v, v, 1e-5f, o, m, r), ErrorCode::InvalidArgument, "rows");
  CHECK_THROWS_CODE(layernorm_forward(2, -4, v, v, v, 1e-5f, o, m, r), ErrorCode::InvalidArgument, "channels");
  CHECK_THROWS_CODE(layernorm_forward(2, 0, v, v, v, 1e-5f, o, m, r), ErrorCode::InvalidArgument, "channels");
  CHECK_THROWS_CODE(layernorm_forward(2, 4, v, v, v, -1.0f, o, m, r), ErrorCode::InvalidArgument, "eps");
  CHECK_THROWS_CODE(layernorm_forward(2, 4, v, v, v, tu::kNaN, o, m, r), ErrorCode::InvalidArgument, "eps");
  CHECK_THROWS_CODE(layernorm_forward(2, 4, nullptr, v, v, 1e-5f, o, m, r), ErrorCode::InvalidArgument, "in");
  CHECK_THROWS_CODE(layernorm_forward(2, 4, v, v, v, 1e-5f, o, nullptr, r), ErrorCode::InvalidArgument, "mean");
  CHECK_NO_THROW(layernorm_forward(0, 4, nullptr, nullptr, nullptr, 1e-5f, nullptr, nullptr, nullptr));
  CHECK_THROWS_CODE(layernorm_backward(-2, 4, v, v, v, m, r, gi, gw, gb), ErrorCode::InvalidArgument, "rows");
  CHECK_THROWS_CODE(layernorm_backward(2, 4, v, v, v, m, r, gi, nullptr, gb), ErrorCode::InvalidArgument, "grad_weight");
  CHECK_NO_THROW(layernorm_backward(0, 4, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr));
  CHECK_NO_THROW(layernorm_backward(2, 0, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr));
  CHECK_THROWS_CODE(gelu_forward(-1, v, o), ErrorCode::InvalidArgument, "n");
  CHECK_THROWS_CODE(gelu_forward(3, v, nullptr), ErrorCode::InvalidArgument, "out");
  CHECK_THROWS_CODE(gelu_backward(3, v, nullptr, gi), ErrorCode::InvalidArgument, "grad_out");
  CHECK_NO_THROW(gelu_forward(0, nullptr, nullptr));
  CHECK_NO_THROW(gelu_backward(0, nullptr, nullptr, nullptr));
}

// ===== Embeddings, bias, residual (embedding_forward/backward, add_bias, bias_backward,
// add, accumulate) ========================================================================
// Float64 references; the forward ops and the elementwise ops are one float rounding of
// the exact result, so they are checked bit for bit against that rounding. The backward
// sums are checked (a) bit for bit against a sequential float simulation of the order the
// contract fixes (embedding: row order; bias: fixed row chunks, chunk order), (b) against
// the float64 sum with a stated tolerance, (c) the float64 gradient against central
// finite differences of the float64 forward. Thread-count independence: each parallel
// call is compared with the same call made from inside a pool thread (where parallel_for
// runs inline, i.e. on one thread), and a checksum line is printed to compare across
// PPO_MAX_THREADS settings.
#include "core/thread_pool.h"

namespace {

using ppo::cpu::accumulate;
using ppo::cpu::add;
using ppo::cpu::add_bias;
using ppo::cpu::bias_backward;
using ppo::cpu::embedding_backward;
using ppo::cpu::embedding_forward;

// Runs fn on one thread: from inside a pool thread, where parallel_for runs inline. With a
// pool of one thread, parallel_for(2, ...) runs inline too: fn is serial either way.
void run_single_threaded(const std::function<void()>& fn) {
  ppo::parallel_for(
      2, [&](int64_t begin, int64_t) { if (begin == 0) fn(); }, 1);
}

// A batch of `rows` token rows: tokens in [0, vocab), positions in [0, n_pos), and about a
// quarter padding rows (position -1 or -7) whose token ids are garbage far outside the
// vocabulary (reading them would fault or trip ASan).
struct EmbCase {
  int64_t rows = 0, C = 0, vocab = 0, n_pos = 0;
  std::vector<int32_t> tokens, positions;
  std::vector<float> wte, wpe, dout;
};

EmbCase make_emb(tu::Rng& rng, int64_t rows, int64_t C, int64_t vocab, int64_t n_pos) {
  EmbCase e;
  e.rows = rows, e.C = C, e.vocab = vocab, e.n_pos = n_pos;
  const int32_t garbage[] = {-2147483647 - 1, 2147483647, 1 << 30, -5};
  for (int64_t r = 0; r < rows; ++r) {
    if (tu::rand_int(rng, 0, 3) == 0) {
      e.positions.push_back(r % 2 ? -1 : -7);
      e.tokens.push_back(garbage[r % 4]);
    } else {
      e.positions.push_back(static_cast<int32_t>(tu::rand_int(rng, 0, n_pos - 1)));
      e.tokens.push_back(static_cast<int32_t>(tu::rand_int(rng, 0, vocab - 1)));
    }
  }
  e.wte = tu::normal(rng, vocab * C, 0.0, 0.5);
  e.wpe = tu::normal(rng, n_pos * C, 0.0, 0.1);
  e.dout = tu::normal(rng, rows * C);
  return e;
}

// Float64 forward: out[r, c] = wte[tok, c] + wpe[pos, c], 0 for padding rows.
std::vector<double> emb_ref(const EmbCase& e, const std::vector<double>& wte,
                            const std::vector<double>& wpe) {
  std::vector<double> out(e.rows * e.C, 0.0);
  for (int64_t r = 0; r < e.rows; ++r) {
    if (e.positions[r] < 0) continue;
    for (int64_t c = 0; c < e.C; ++c)
      out[r * e.C + c] = wte[e.tokens[r] * e.C + c] + wpe[e.positions[r] * e.C + c];
  }
  return out;
}

}  // namespace

TEST(embedding_forward_matches_reference) {
  // Each output is one float add of two floats: exactly the rounding of the float64 sum.
  tu::Rng rng(101);
  const int64_t shapes[][4] = {{9, 1, 3, 4},   {13, 5, 4, 6},    {20, 16, 50, 40},
                               {21, 33, 7, 9}, {300, 768, 100, 64}};
  for (const auto& s : shapes) {
    const EmbCase e = make_emb(rng, s[0], s[1], s[2], s[3]);
    std::vector<float> out = tu::poisoned(e.rows * e.C);
    embedding_forward(e.rows, e.C, e.tokens.data(), e.positions.data(), e.wte.data(),
                      e.wpe.data(), out.data());
    const std::vector<double> ref = emb_ref(e, widen(e.wte), widen(e.wpe));
    std::vector<float> want(ref.begin(), ref.end());
    CHECK_BITWISE_EQUAL(out.data(), want.data(), e.rows * e.C, "embedding out");
    for (int64_t r = 0; r < e.rows; ++r)  // padding rows: +0.0 exactly
      if (e.positions[r] < 0) CHECK(out[r * e.C] == 0.0f && !std::signbit(out[r * e.C]));
  }
}

TEST(embedding_backward_matches_reference_and_row_order) {
  // Few distinct ids (vocab 7, 5 positions) so every wte/wpe row is hit many times.
  // (a) bit for bit: the contract fixes the order (row order per element), so a
  //     sequential float simulation gives the exact bits;
  // (b) float64: a float sum of m terms onto g0 is within m * u * (|g0| + sum|terms|),
  //     u = 2^-24; we allow (m + 1) * 6e-8 * (|g0| + sum|terms|);
  // (c) the rows of wte/wpe hit by no row keep their bits; grad_wpe == nullptr updates
  //     wte identically.
  tu::Rng rng(102);
  const int64_t shapes[][4] = {{61, 5, 7, 5}, {40, 1, 3, 2}, {97, 37, 7, 5}, {256, 768, 100, 64}};
  for (const auto& s : shapes) {
    const EmbCase e = make_emb(rng, s[0], s[1], s[2], s[3]);
    const int64_t C = e.C;
    std::vector<float> gte = tu::normal(rng, e.vocab * C), gpe = tu::normal(rng, e.n_pos * C);
    const std::vector<float> gte0 = gte, gpe0 = gpe;
    // One unused wte row and wpe row must stay untouched: make sure they are unused.
    std::vector<bool> used_t(e.vocab, false), used_p(e.n_pos, false);
    for (int64_t r = 0; r < e.rows; ++r)
      if (e.positions[r] >= 0) used_t[e.tokens[r]] = true, used_p[e.positions[r]] = true;

    embedding_backward(e.rows, C, e.dout.data(), e.tokens.data(), e.positions.data(),
                       gte.data(), gpe.data());

    std::vector<float> sim_t = gte0, sim_p = gpe0;
    std::vector<double> ref_t = widen(gte0), ref_p = widen(gpe0), mag_t(gte0.size()),
                        mag_p(gpe0.size());
    std::vector<int64_t> cnt_t(e.vocab, 0), cnt_p(e.n_pos, 0);
    for (size_t k = 0; k < gte0.size(); ++k) mag_t[k] = std::fabs(gte0[k]);
    for (size_t k = 0; k < gpe0.size(); ++k) mag_p[k] = std::fabs(gpe0[k]);
    for (int64_t r = 0; r < e.rows; ++r) {
      if (e.positions[r] < 0) continue;
      const int64_t t = e.tokens[r], p = e.positions[r];
      ++cnt_t[t], ++cnt_p[p];
      for (int64_t c = 0; c < C; ++c) {
        const float g = e.dout[r * C + c];
        sim_t[t * C + c] += g, sim_p[p * C + c] += g;
        ref_t[t * C + c] += g, ref_p[p * C + c] += g;
        mag_t[t * C + c] += std::fabs(g), mag_p[p * C + c] += std::fabs(g);
      }
    }
    CHECK_BITWISE_EQUAL(gte.data(), sim_t.data(), e.vocab * C, "grad_wte vs row-order sum");
    CHECK_BITWISE_EQUAL(gpe.data(), sim_p.data(), e.n_pos * C, "grad_wpe vs row-order sum");
    for (int64_t k = 0; k < e.vocab * C; ++k)
      CHECK_NEAR(gte[k], ref_t[k], (cnt_t[k / C] + 1) * 6e-8 * mag_t[k], 0.0);
    for (int64_t k = 0; k < e.n_pos * C; ++k)
      CHECK_NEAR(gpe[k], ref_p[k], (cnt_p[k / C] + 1) * 6e-8 * mag_p[k], 0.0);
    for (int64_t v = 0; v < e.vocab; ++v)
      if (!used_t[v]) CHECK_BITWISE_EQUAL(&gte[v * C], &gte0[v * C], C, "unused wte row");

    std::vector<float> gte_only = gte0;
    embedding_backward(e.rows, C, e.dout.data(), e.tokens.data(), e.positions.data(),
                       gte_only.data(), nullptr);
    CHECK_BITWISE_EQUAL(gte_only.data(), gte.data(), e.vocab * C, "grad_wte without wpe");

    // The same call on one thread gives the same bits.
    std::vector<float> st = gte0, sp = gpe0;
    run_single_threaded([&] {
      embedding_backward(e.rows, C, e.dout.data(), e.tokens.data(), e.positions.data(),
                         st.data(), sp.data());
    });
    CHECK_BITWISE_EQUAL(st.data(), gte.data(), e.vocab * C, "grad_wte single-threaded");
    CHECK_BITWISE_EQUAL(sp.data(), gpe.data(), e.n_pos * C, "grad_wpe single-threaded");
  }
}

TEST(embedding_gradient_matches_finite_differences) {
  // L = sum dout * out(wte, wpe) is linear, so central differences of the float64 forward
  // (h = 1e-3) are exact up to rounding ~1e-16 |L| / h: 1e-9 absolute. The kernel's
  // gradient (from zero) is then within the float tolerance of the embedding test.
  tu::Rng rng(103);
  const EmbCase e = make_emb(rng, 23, 3, 4, 5);
  const std::vector<double> wte = widen(e.wte), wpe = widen(e.wpe), dout = widen(e.dout);
  auto loss = [&](const std::vector<double>& t, const std::vector<double>& p) {
    const std::vector<double> out = emb_ref(e, t, p);
    double l = 0.0;
    for (size_t k = 0; k < out.size(); ++k) l += dout[k] * out[k];
    return l;
  };
  std::vector<float> gte(e.vocab * e.C, 0.0f), gpe(e.n_pos * e.C, 0.0f);
  embedding_backward(e.rows, e.C, e.dout.data(), e.tokens.data(), e.positions.data(),
                     gte.data(), gpe.data());
  double mag = 0.0;
  for (float g : e.dout) mag += std::fabs(g);
  const double h = 1e-3;
  for (size_t k = 0; k < wte.size(); ++k) {
    std::vector<double> tp = wte, tm = wte;
    tp[k] += h, tm[k] -= h;
    const double fd = (loss(tp, wpe) - loss(tm, wpe)) / (2 * h);
    CHECK_NEAR_CTX(gte[k], fd, 1e-9 + 3e-6 * mag, 0.0, "d/dwte " + std::to_string(k));
  }
  for (size_t k = 0; k < wpe.size(); ++k) {
    std::vector<double> pp = wpe, pm = wpe;
    pp[k] += h, pm[k] -= h;
    const double fd = (loss(wte, pp) - loss(wte, pm)) / (2 * h);
    CHECK_NEAR_CTX(gpe[k], fd, 1e-9 + 3e-6 * mag, 0.0, "d/dwpe " + std::to_string(k));
  }
}

TEST(add_bias_and_bias_backward_match_reference) {
  // add_bias: one float add per element, so bit-equal to the rounded float64 sum.
  // bias_backward: bit for bit against a float simulation of the contract's order (rows
  // in fixed chunks, chunk order: the chunking of layernorm_backward, min(64, ceil(rows /
  // 8)) chunks of ceil(rows / chunks) rows), and within rows * 6e-8 * (|g0| + sum|terms|)
  // of the float64 sum (float rounding of at most rows + chunks additions).
  tu::Rng rng(104);
  const int64_t shapes[][2] = {{1, 1}, {3, 5}, {8, 7}, {9, 16}, {77, 33}, {600, 768}, {1000, 3}};
  for (const auto& s : shapes) {
    const int64_t rows = s[0], C = s[1];
    const std::vector<float> bias = tu::normal(rng, C), x = tu::normal(rng, rows * C, 0.0, 3.0);
    std::vector<float> out = x;
    add_bias(rows, C, bias.data(), out.data());
    std::vector<float> want(rows * C);
    for (int64_t k = 0; k < rows * C; ++k)
      want[k] = static_cast<float>(static_cast<double>(x[k]) + bias[k % C]);
    CHECK_BITWISE_EQUAL(out.data(), want.data(), rows * C, "add_bias");

    const std::vector<float> g = tu::normal(rng, rows * C), gb0 = tu::normal(rng, C);
    std::vector<float> gb = gb0;
    bias_backward(rows, C, g.data(), gb.data());
    int64_t chunks = std::min<int64_t>(64, (rows + 7) / 8);
    const int64_t per = (rows + chunks - 1) / chunks;
    chunks = (rows + per - 1) / per;
    std::vector<float> sim = gb0;
    for (int64_t k = 0; k < chunks; ++k)
      for (int64_t c = 0; c < C; ++c) {
        float part = 0.0f;
        for (int64_t r = k * per; r < std::min(rows, (k + 1) * per); ++r) part += g[r * C + c];
        sim[c] += part;
      }
    CHECK_BITWISE_EQUAL(gb.data(), sim.data(), C, "bias_backward vs chunked sum");
    for (int64_t c = 0; c < C; ++c) {
      double sum = gb0[c], mag = std::fabs(gb0[c]);
      for (int64_t r = 0; r < rows; ++r) sum += g[r * C + c], mag += std::fabs(g[r * C + c]);
      CHECK_NEAR(gb[c], sum, (rows + 1) * 6e-8 * mag, 0.0);
    }
    std::vector<float> single = gb0;
    run_single_threaded([&] { bias_backward(rows, C, g.data(), single.data()); });
    CHECK_BITWISE_EQUAL(single.data(), gb.data(), C, "bias_backward single-threaded");
  }
}

TEST(bias_gradient_matches_finite_differences) {
  // L = sum dout * (x + bias) is linear in bias: central differences (h = 1e-3) of the
  // float64 forward are exact to ~1e-12; the kernel within 1e-6 * sum|dout|.
  tu::Rng rng(105);
  const int64_t rows = 11, C = 6;
  const std::vector<float> x = tu::normal(rng, rows * C), bias = tu::normal(rng, C),
                           dout = tu::normal(rng, rows * C);
  auto loss = [&](const std::vector<double>& b) {
    double l = 0.0;
    for (int64_t k = 0; k < rows * C; ++k) l += dout[k] * (static_cast<double>(x[k]) + b[k % C]);
    return l;
  };
  std::vector<float> gb(C, 0.0f);
  bias_backward(rows, C, dout.data(), gb.data());
  double mag = 0.0;
  for (float v : dout) mag += std::fabs(v);
  for (int64_t c = 0; c < C; ++c) {
    std::vector<double> bp = widen(bias), bm = widen(bias);
    bp[c] += 1e-3, bm[c] -= 1e-3;
    const double fd = (loss(bp) - loss(bm)) / 2e-3;
    CHECK_NEAR_CTX(gb[c], fd, 1e-6 * mag, 0.0, "d/dbias " + std::to_string(c));
  }
}

TEST(add_and_accumulate_match_reference) {
  // One float add per element: bit-equal to the rounded float64 sum, also in place
  // (out == a, out == b) and across the thread split (n = 300001, odd).
  tu::Rng rng(106);
  for (int64_t n : {1, 17, 300001}) {
    const std::vector<float> a = tu::normal(rng, n, 0.0, 10.0), b = tu::normal(rng, n);
    std::vector<float> want(n);
    for (int64_t i = 0; i < n; ++i) want[i] = static_cast<float>(static_cast<double>(a[i]) + b[i]);
    std::vector<float> out = tu::poisoned(n);
    add(n, a.data(), b.data(), out.data());
    CHECK_BITWISE_EQUAL(out.data(), want.data(), n, "add");
    std::vector<float> in_a = a;
    add(n, in_a.data(), b.data(), in_a.data());
    CHECK_BITWISE_EQUAL(in_a.data(), want.data(), n, "add out == a");
    std::vector<float> in_b = b;
    add(n, a.data(), in_b.data(), in_b.data());
    CHECK_BITWISE_EQUAL(in_b.data(), want.data(), n, "add out == b");
    std::vector<float> y = a;
    accumulate(n, b.data(), y.data());
    CHECK_BITWISE_EQUAL(y.data(), want.data(), n, "accumulate");
  }
}

TEST(small_kernels_checksum_and_errors) {
  using ppo::ErrorCode;
  // Checksum of the reductions on sizes that spread over threads (compare across
  // PPO_MAX_THREADS runs).
  tu::Rng rng(107);
  const EmbCase e = make_emb(rng, 300, 768, 50, 64);
  std::vector<float> gte(e.vocab * e.C, 0.0f), gpe(e.n_pos * e.C, 0.0f), gb(e.C, 0.0f);
  embedding_backward(e.rows, e.C, e.dout.data(), e.tokens.data(), e.positions.data(),
                     gte.data(), gpe.data());
  bias_backward(e.rows, e.C, e.dout.data(), gb.data());
  uint64_t h = 1469598103934665603ull;
  for (const std::vector<float>* v : {&gte, &gpe, &gb}) h = fnv1a(h, *v);
  std::printf("    checksum %016llx (must not depend on PPO_MAX_THREADS)\n",
              static_cast<unsigned long long>(h));

  float f[8] = {0}, o[8];
  int32_t t[2] = {0, 0}, p[2] = {0, 1};
  CHECK_THROWS_CODE(embedding_forward(-1, 4, t, p, f, f, o), ErrorCode::InvalidArgument, "rows");
  CHECK_THROWS_CODE(embedding_forward(2, -4, t, p, f, f, o), ErrorCode::InvalidArgument, "channels");
  CHECK_THROWS_CODE(embedding_forward(2, 4, nullptr, p, f, f, o), ErrorCode::InvalidArgument, "tokens");
  CHECK_THROWS_CODE(embedding_forward(2, 4, t, nullptr, f, f, o), ErrorCode::InvalidArgument, "positions");
  CHECK_THROWS_CODE(embedding_forward(2, 4, t, p, nullptr, f, o), ErrorCode::InvalidArgument, "wte");
  // wpe == nullptr: no learned positions (Llama), out = the token's embedding row.
  CHECK_NO_THROW(embedding_forward(2, 4, t, p, f, nullptr, o));
  {
    const float wte2[6] = {1, 2, 3, 4, 5, 6};  // vocab 3, C 2
    const int32_t tok2[3] = {2, 0, 1}, pos2[3] = {0, -1, 5};
    float out2[6];
    embedding_forward(3, 2, tok2, pos2, wte2, nullptr, out2);
    CHECK(out2[0] == 5 && out2[1] == 6 && out2[2] == 0 && out2[3] == 0 && out2[4] == 3 && out2[5] == 4);
  }
  CHECK_THROWS_CODE(embedding_forward(2, 4, t, p, f, f, nullptr), ErrorCode::InvalidArgument, "out");
  CHECK_NO_THROW(embedding_forward(0, 4, nullptr, nullptr, nullptr, nullptr, nullptr));
  CHECK_THROWS_CODE(embedding_backward(-1, 4, f, t, p, o, o), ErrorCode::InvalidArgument, "rows");
  CHECK_THROWS_CODE(embedding_backward(2, -1, f, t, p, o, o), ErrorCode::InvalidArgument, "channels");
  CHECK_THROWS_CODE(embedding_backward(2, 4, nullptr, t, p, o, o), ErrorCode::InvalidArgument, "grad_out");
  CHECK_THROWS_CODE(embedding_backward(2, 4, f, nullptr, p, o, o), ErrorCode::InvalidArgument, "tokens");
  CHECK_THROWS_CODE(embedding_backward(2, 4, f, t, nullptr, o, o), ErrorCode::InvalidArgument, "positions");
  CHECK_THROWS_CODE(embedding_backward(2, 4, f, t, p, nullptr, o), ErrorCode::InvalidArgument, "grad_wte");
  CHECK_NO_THROW(embedding_backward(2, 0, nullptr, nullptr, nullptr, nullptr, nullptr));
  CHECK_THROWS_CODE(add_bias(-1, 4, f, o), ErrorCode::InvalidArgument, "rows");
  CHECK_THROWS_CODE(add_bias(2, 4, nullptr, o), ErrorCode::InvalidArgument, "bias");
  CHECK_THROWS_CODE(add_bias(2, 4, f, nullptr), ErrorCode::InvalidArgument, "out");
  CHECK_NO_THROW(add_bias(0, 4, nullptr, nullptr));
  CHECK_THROWS_CODE(bias_backward(2, -4, f, o), ErrorCode::InvalidArgument, "channels");
  CHECK_THROWS_CODE(bias_backward(2, 4, nullptr, o), ErrorCode::InvalidArgument, "grad_out");
  CHECK_THROWS_CODE(bias_backward(2, 4, f, nullptr), ErrorCode::InvalidArgument, "grad_bias");
  CHECK_NO_THROW(bias_backward(0, 4, nullptr, nullptr));
  CHECK_THROWS_CODE(add(-1, f, f, o), ErrorCode::InvalidArgument, "n");
  CHECK_THROWS_CODE(add(3, nullptr, f, o), ErrorCode::InvalidArgument, "a");
  CHECK_THROWS_CODE(add(3, f, nullptr, o), ErrorCode::InvalidArgument, "b");
  CHECK_THROWS_CODE(add(3, f, f, nullptr), ErrorCode::InvalidArgument, "out");
  CHECK_NO_THROW(add(0, nullptr, nullptr, nullptr));
  CHECK_THROWS_CODE(accumulate(-1, f, o), ErrorCode::InvalidArgument, "n");
  CHECK_THROWS_CODE(accumulate(3, nullptr, o), ErrorCode::InvalidArgument, "x");
  CHECK_THROWS_CODE(accumulate(3, f, nullptr), ErrorCode::InvalidArgument, "y");
  CHECK_NO_THROW(accumulate(0, nullptr, nullptr));
}

PPO_TEST_MAIN()
