// ppo::cpu RMSNorm, RoPE and SwiGLU (csrc/cpu/llama_layers.h) against plain float64
// references: forward outputs and saved statistics; backward against the analytic float64
// gradient (RMSNorm's as an explicit Jacobian-vector product, RoPE's as the explicit
// transposed 2x2 rotation, not the kernels' closed forms) and against central finite
// differences of the float64 forward; accumulation (+=) onto nonzero gradients; RoPE's
// layout (strided rows, column offsets, GQA-style fused q|k|v rows), padding rows and
// untouched columns bit for bit, the round trip, position 0, linear scaling; bit-identical
// reruns and thread-count independence; argument errors.
//
// Tolerances are written as multiples of u = 2^-24 (the float unit roundoff) with the
// reason next to each. Thread-count independence: each multithreaded call is compared
// with the same call run on one thread (from inside a pool thread, where parallel_for runs
// inline), and the "checksum" line printed by llama_layers_bit_identical_and_thread_count
// must be the same for PPO_MAX_THREADS=1 and the default.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "cpu/llama_layers.h"
#include "test_framework.h"
#include "test_util.h"

namespace {

using ppo::cpu::rmsnorm_backward;
using ppo::cpu::rmsnorm_forward;
using ppo::cpu::rope_backward;
using ppo::cpu::rope_forward;
using ppo::cpu::swiglu_backward;
using ppo::cpu::swiglu_forward;

constexpr double kU = 5.9604644775390625e-08;  // 2^-24, the float unit roundoff

std::vector<double> widen(const std::vector<float>& v) { return {v.begin(), v.end()}; }

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

// Runs fn on one thread: from inside a pool thread, where parallel_for runs inline (with a
// pool of one thread, parallel_for(2, ...) runs inline too).
void run_single_threaded(const std::function<void()>& fn) {
  ppo::parallel_for(
      2, [&](int64_t begin, int64_t) { if (begin == 0) fn(); }, 1);
}

// =============================== RMSNorm: references =====================================

struct RmsRef {
  std::vector<double> out, rstd, xhat;
};

// Textbook RMSNorm of double inputs: rstd = 1 / sqrt(mean x^2 + eps), out = x rstd w.
RmsRef rms_ref(int64_t rows, int64_t C, const std::vector<double>& x,
               const std::vector<double>& w, double eps) {
  RmsRef r;
  r.out.resize(rows * C), r.xhat.resize(rows * C), r.rstd.resize(rows);
  for (int64_t i = 0; i < rows; ++i) {
    double ms = 0.0;
    for (int64_t c = 0; c < C; ++c) ms += x[i * C + c] * x[i * C + c];
    ms /= static_cast<double>(C);
    const double rs = 1.0 / std::sqrt(ms + eps);
    r.rstd[i] = rs;
    for (int64_t c = 0; c < C; ++c) {
      r.xhat[i * C + c] = x[i * C + c] * rs;
      r.out[i * C + c] = r.xhat[i * C + c] * w[c];
    }
  }
  return r;
}

// Analytic gradients through the explicit Jacobian
//   d out[j] / d x[k] = w[j] * rstd * (delta_jk - xhat_j xhat_k / C)
// (O(C^2) per row on purpose: a different route from the kernel's closed form).
void rms_grad_ref(int64_t rows, int64_t C, const std::vector<double>& dout, const RmsRef& f,
                  const std::vector<double>& w, std::vector<double>& dx,
                  std::vector<double>& dw) {
  dx.assign(rows * C, 0.0), dw.assign(C, 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    const double rs = f.rstd[i];
    for (int64_t k = 0; k < C; ++k) {
      double s = 0.0;
      for (int64_t j = 0; j < C; ++j) {
        const double jac = w[j] * rs *
                           ((j == k ? 1.0 : 0.0) -
                            f.xhat[i * C + j] * f.xhat[i * C + k] / static_cast<double>(C));
        s += dout[i * C + j] * jac;
      }
      dx[i * C + k] = s;
    }
    for (int64_t c = 0; c < C; ++c) dw[c] += dout[i * C + c] * f.xhat[i * C + c];
  }
}

struct RmsCase {
  int64_t rows = 0, C = 0;
  float eps = 1e-5f;
  std::vector<float> x, w, dout;
};

RmsCase make_rms(tu::Rng& rng, int64_t rows, int64_t C, double x_std = 1.0,
                 float eps = 1e-5f) {
  RmsCase t;
  t.rows = rows, t.C = C, t.eps = eps;
  t.x = tu::normal(rng, rows * C, 0.0, x_std);
  t.w = tu::normal(rng, C, 1.0, 0.5);  // around 1 like trained Llama norms; some negative
  t.dout = tu::normal(rng, rows * C);
  return t;
}

struct RmsOut {
  std::vector<float> out, rstd, dx, dw;
};

RmsOut run_rms(const RmsCase& t, int calls = 1) {
  RmsOut o;
  o.out = tu::poisoned(t.rows * t.C), o.rstd = tu::poisoned(t.rows);
  rmsnorm_forward(t.rows, t.C, t.x.data(), t.w.data(), t.eps, o.out.data(), o.rstd.data());
  o.dx.assign(t.rows * t.C, 0.0f), o.dw.assign(t.C, 0.0f);
  for (int k = 0; k < calls; ++k)
    rmsnorm_backward(t.rows, t.C, t.dout.data(), t.x.data(), t.w.data(), o.rstd.data(),
                     o.dx.data(), o.dw.data());
  return o;
}

// Tolerance of the kernel's grad_in[i, k] (u = 2^-24). The kernel computes
//   dx_k = rstd * (w_k g_k - x_k * coef),  coef = rstd^2 * dot / C,  dot = sum_c w_c g_c x_c
// with dot summed in float (16 lanes of C/16 terms, then the lanes): error <= (C/16 + 16) u
// sum_c |w g x|; rstd itself is a float (0.5 u, entering dx up to 3 times through rstd^3);
// the products and the subtraction add a few u. In xhat units that is
//   |err| <= rstd * (3.5 u |w_k g_k| + |xhat_k| (C/16 + 22) u S / C),  S = sum_c |w g xhat|;
// allowed: twice that.
double rms_dx_tol(int64_t C, double rstd, double wg_k, double xhat_k, double S) {
  return 2.0 * kU * rstd *
         (4.0 * std::fabs(wg_k) +
          std::fabs(xhat_k) * (static_cast<double>(C) / 16.0 + 24.0) * S / static_cast<double>(C));
}

// Compares a kernel run with the float64 reference of the same (float) inputs.
//  - rstd: the double value rounded once to float (0.5 u; the double sum of squares is
//    exact to ~C * 1e-16): allow 2 u relative.
//  - out = (x * rstd) * w: rstd's rounding plus two float products, <= 1.5 u relative:
//    allow 3 u relative.
//  - grad_in: rms_dx_tol.
//  - grad_weight: a float sum over rows (fixed chunks, then the chunks in order, onto the
//    initial 0) of terms each within 1.5 u (x * rstd, then * g) and rstd's 0.5 u: at most
//    rows + 1 additions, so |err| <= (rows + 3) u sum_r |term|: allow (rows + 4) u sum|term|.
void check_rms(const RmsCase& t, const RmsOut& o) {
  const int64_t rows = t.rows, C = t.C;
  const RmsRef f = rms_ref(rows, C, widen(t.x), widen(t.w), t.eps);
  std::vector<double> dx, dw;
  rms_grad_ref(rows, C, widen(t.dout), f, widen(t.w), dx, dw);
  const std::string shape = "rows=" + std::to_string(rows) + " C=" + std::to_string(C);
  for (int64_t i = 0; i < rows; ++i) {
    CHECK_NEAR_CTX(o.rstd[i], f.rstd[i], 0.0, 2 * kU, shape + " rstd row " + std::to_string(i));
    double S = 0.0;
    for (int64_t c = 0; c < C; ++c)
      S += std::fabs(static_cast<double>(t.w[c]) * t.dout[i * C + c] * f.xhat[i * C + c]);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t k = i * C + c;
      const std::string where = shape + " [" + std::to_string(i) + "," + std::to_string(c) + "]";
      CHECK_NEAR_CTX(o.out[k], f.out[k], 0.0, 3 * kU, "out " + where);
      CHECK_NEAR_CTX(o.dx[k], dx[k],
                     rms_dx_tol(C, f.rstd[i], static_cast<double>(t.w[c]) * t.dout[k], f.xhat[k], S),
                     0.0, "grad_in " + where);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    double mag = 0.0;
    for (int64_t i = 0; i < rows; ++i) mag += std::fabs(f.xhat[i * C + c] * t.dout[i * C + c]);
    CHECK_NEAR_CTX(o.dw[c], dw[c], (rows + 4) * kU * mag, 0.0,
                   shape + " grad_weight " + std::to_string(c));
  }
}

}  // namespace

// ================================= RMSNorm tests ==========================================

TEST(rmsnorm_matches_float64_reference) {
  tu::Rng rng(1);
  // One element, one row, odd widths (lane tails), exactly one/two lane blocks, Llama-ish
  // widths, many rows (several weight-gradient chunks, uneven last chunk).
  const int64_t shapes[][2] = {{1, 1},  {1, 7},   {3, 5},    {4, 16},   {5, 32},  {2, 33},
                               {7, 100}, {3, 1024}, {130, 48}, {517, 20}, {1, 4096}};
  for (const auto& s : shapes) {
    RmsCase t = make_rms(rng, s[0], s[1]);
    check_rms(t, run_rms(t));
  }
  // Scales where eps matters (x ~ 1e-3: mean square 1e-6 next to eps 1e-5) and where it
  // does not (x ~ 1e3), other eps values, eps = 0.
  for (double sd : {1e-3, 1e3}) {
    RmsCase t = make_rms(rng, 6, 50, sd);
    check_rms(t, run_rms(t));
  }
  for (float eps : {1e-6f, 0.0f, 0.5f}) {
    RmsCase t = make_rms(rng, 5, 37, 1.0, eps);
    check_rms(t, run_rms(t));
  }
  // An all-zero row (eps > 0): rstd = 1/sqrt(eps), out = 0, grad_in = rstd * w * dout.
  RmsCase z = make_rms(rng, 3, 9);
  for (int64_t c = 0; c < z.C; ++c) z.x[z.C + c] = 0.0f;
  const RmsOut zo = run_rms(z);
  for (int64_t c = 0; c < z.C; ++c) CHECK(zo.out[z.C + c] == 0.0f);
  check_rms(z, zo);
}

TEST(rmsnorm_analytic_gradient_matches_finite_differences) {
  // The float64 analytic reference against central differences of the float64 forward,
  // L = sum dout * out, h = 1e-6: truncation ~h^2 |L'''| / 6 ~ 1e-12 for unit inputs,
  // rounding ~1e-16 |L| / h ~ 1e-10: 1e-7 absolute + 1e-7 relative leaves a wide margin
  // yet catches any wrong term (O(1)). The kernel is then checked against the same
  // differences at its float tolerance (rms_dx_tol; (rows + 4) u for the weight) + 1e-7.
  tu::Rng rng(2);
  const int64_t shapes[][2] = {{3, 5}, {3, 7}, {2, 1}, {2, 2}, {1, 16}};
  for (const auto& s : shapes) {
    const int64_t rows = s[0], C = s[1];
    RmsCase t = make_rms(rng, rows, C);
    const std::vector<double> x = widen(t.x), w = widen(t.w), dout = widen(t.dout);
    const RmsRef f = rms_ref(rows, C, x, w, t.eps);
    std::vector<double> dx, dw;
    rms_grad_ref(rows, C, dout, f, w, dx, dw);
    auto loss = [&](const std::vector<double>& xx, const std::vector<double>& ww) {
      const RmsRef g = rms_ref(rows, C, xx, ww, t.eps);
      double l = 0.0;
      for (int64_t k = 0; k < rows * C; ++k) l += dout[k] * g.out[k];
      return l;
    };
    const double h = 1e-6;
    const RmsOut o = run_rms(t);
    const std::string shape = "rows=" + std::to_string(rows) + " C=" + std::to_string(C);
    for (int64_t k = 0; k < rows * C; ++k) {
      std::vector<double> xp = x, xm = x;
      xp[k] += h, xm[k] -= h;
      const double fd = (loss(xp, w) - loss(xm, w)) / (2 * h);
      CHECK_NEAR_CTX(dx[k], fd, 1e-7, 1e-7, shape + " ref d/dx " + std::to_string(k));
      const int64_t i = k / C;
      double S = 0.0;
      for (int64_t c = 0; c < C; ++c) S += std::fabs(w[c] * dout[i * C + c] * f.xhat[i * C + c]);
      CHECK_NEAR_CTX(o.dx[k], fd, rms_dx_tol(C, f.rstd[i], w[k % C] * dout[k], f.xhat[k], S) + 1e-7,
                     0.0, shape + " kernel d/dx " + std::to_string(k));
    }
    for (int64_t c = 0; c < C; ++c) {
      std::vector<double> wp = w, wm = w;
      wp[c] += h, wm[c] -= h;
      const double fd = (loss(x, wp) - loss(x, wm)) / (2 * h);
      double mag = 0.0;
      for (int64_t i = 0; i < rows; ++i) mag += std::fabs(f.xhat[i * C + c] * dout[i * C + c]);
      CHECK_NEAR_CTX(dw[c], fd, 1e-7, 1e-7, shape + " ref d/dw " + std::to_string(c));
      CHECK_NEAR_CTX(o.dw[c], fd, (rows + 4) * kU * mag + 1e-7, 0.0,
                     shape + " kernel d/dw " + std::to_string(c));
    }
  }
}

TEST(rmsnorm_backward_accumulates) {
  tu::Rng rng(3);
  RmsCase t = make_rms(rng, 37, 21);
  const RmsOut once = run_rms(t, 1), twice = run_rms(t, 2);
  // grad_in: the same increment d added twice onto 0 is exactly 2d (d + d is exact; if the
  // compiler fuses the last product into an fma, round(p + d) with |p - d| <= ulp(d) / 2 is
  // still 2d).
  std::vector<float> doubled(once.dx.size());
  for (size_t k = 0; k < doubled.size(); ++k) doubled[k] = 2.0f * once.dx[k];
  CHECK_BITWISE_EQUAL(twice.dx.data(), doubled.data(), static_cast<int64_t>(doubled.size()),
                      "2x grad_in");
  // grad_weight adds the chunk partials one by one onto the running value, so the second
  // call rounds differently: 2x to a few u (per chunk, 5 chunks here) of the magnitude.
  for (int64_t c = 0; c < t.C; ++c)
    CHECK_NEAR(twice.dw[c], 2.0 * once.dw[c], 1e-5 * (std::fabs(once.dw[c]) + 1.0), 0.0);
  // Onto nonzero gradients: result = initial + the gradient, one float add per element
  // for grad_in (possibly fused with the last product): within ~1 u of the operands.
  std::vector<float> gi = tu::normal(rng, t.rows * t.C), gw = tu::normal(rng, t.C);
  const std::vector<float> gi0 = gi, gw0 = gw;
  rmsnorm_backward(t.rows, t.C, t.dout.data(), t.x.data(), t.w.data(), once.rstd.data(),
                   gi.data(), gw.data());
  for (size_t k = 0; k < gi.size(); ++k)
    CHECK_NEAR(gi[k], static_cast<double>(gi0[k]) + once.dx[k],
               2 * kU * (std::fabs(gi0[k]) + std::fabs(once.dx[k])), 0.0);
  for (int64_t c = 0; c < t.C; ++c)
    CHECK_NEAR(gw[c], static_cast<double>(gw0[c]) + once.dw[c],
               1e-5 * (std::fabs(once.dw[c]) + std::fabs(gw0[c]) + 1.0), 0.0);
}

// ================================== RoPE: references ======================================

namespace {

// Where the rotated heads lie: rows of row_stride floats; `heads` heads of head_size
// columns starting at column col_offset.
struct RopeLayout {
  int64_t rows, stride, offset, heads, hs;
};

std::string layout_str(const RopeLayout& L) {
  return "rows=" + std::to_string(L.rows) + " stride=" + std::to_string(L.stride) +
         " off=" + std::to_string(L.offset) + " heads=" + std::to_string(L.heads) +
         " hs=" + std::to_string(L.hs);
}

// The angle exactly as the contract computes it (float arithmetic, written out here from
// the contract, not taken from the library).
float contract_angle(int32_t pos, float theta, float scaling, int64_t i, int64_t hs) {
  const float inv_freq = static_cast<float>(
      1.0 / std::pow(static_cast<double>(theta), 2.0 * static_cast<double>(i) / static_cast<double>(hs)));
  return (static_cast<float>(pos) / scaling) * inv_freq;
}

// The exact angle of the math: pos / scaling * theta^(-2i / hs), in double.
double exact_angle(int32_t pos, float theta, float scaling, int64_t i, int64_t hs) {
  return static_cast<double>(pos) / static_cast<double>(scaling) *
         std::pow(static_cast<double>(theta), -2.0 * static_cast<double>(i) / static_cast<double>(hs));
}

// Float64 rotation of the rows of x (double, in place). exact: the exact angle, else the
// contract's float angle (cos/sin in double either way). transpose: the backward rotation
// J^T g with J = [[c, -s], [s, c]] written as an explicit 2x2 product.
void rope_ref(const RopeLayout& L, const std::vector<int32_t>& pos, float theta, float scaling,
              bool exact, bool transpose, std::vector<double>& x) {
  const int64_t half = L.hs / 2;
  for (int64_t r = 0; r < L.rows; ++r) {
    if (pos[r] < 0) continue;
    for (int64_t h = 0; h < L.heads; ++h)
      for (int64_t i = 0; i < half; ++i) {
        const double a = exact ? exact_angle(pos[r], theta, scaling, i, L.hs)
                               : static_cast<double>(contract_angle(pos[r], theta, scaling, i, L.hs));
        const double c = std::cos(a), s = std::sin(a);
        double J[2][2] = {{c, -s}, {s, c}};
        if (transpose) std::swap(J[0][1], J[1][0]);
        const int64_t j1 = r * L.stride + L.offset + h * L.hs + i, j2 = j1 + half;
        const double x1 = x[j1], x2 = x[j2];
        x[j1] = J[0][0] * x1 + J[0][1] * x2;
        x[j2] = J[1][0] * x1 + J[1][1] * x2;
      }
  }
}

// True for the elements rope may change: non-padding rows, inside the heads.
bool rotated(const RopeLayout& L, const std::vector<int32_t>& pos, int64_t k) {
  const int64_t r = k / L.stride, c = k % L.stride;
  return pos[r] >= 0 && c >= L.offset && c < L.offset + L.heads * L.hs;
}

// Random rows; the elements rope must not touch (padding rows, columns outside the heads)
// hold NaN / +-inf, so that reading or rewriting them shows as a bit difference (and any
// arithmetic on them would spread NaN).
std::vector<float> make_rope_data(tu::Rng& rng, const RopeLayout& L, const std::vector<int32_t>& pos) {
  std::vector<float> x = tu::normal(rng, L.rows * L.stride);
  const float junk[] = {tu::kNaN, tu::kInf, -tu::kInf, -0.0f};
  for (int64_t k = 0; k < L.rows * L.stride; ++k)
    if (!rotated(L, pos, k)) x[k] = junk[k % 4];
  return x;
}

// Positions in [0, max_pos], about a quarter padding (-1 or -7), position 0 included.
std::vector<int32_t> make_positions(tu::Rng& rng, int64_t rows, int64_t max_pos) {
  std::vector<int32_t> p(rows);
  for (int64_t r = 0; r < rows; ++r)
    p[r] = tu::rand_int(rng, 0, 3) == 0 ? (r % 2 ? -1 : -7)
                                        : static_cast<int32_t>(tu::rand_int(rng, 0, max_pos));
  if (rows > 1) p[rows / 2] = 0;
  return p;
}

// Pair partner of an element in a rotated head: (first, second) half values (x1, x2).
void pair_of(const RopeLayout& L, const std::vector<float>& x, int64_t k, double* x1, double* x2) {
  const int64_t r = k / L.stride, c = k % L.stride - L.offset;
  const int64_t h = c / L.hs, i = c % L.hs, half = L.hs / 2;
  const int64_t j1 = r * L.stride + L.offset + h * L.hs + (i < half ? i : i - half);
  *x1 = x[j1], *x2 = x[j1 + half];
}

// Compares a kernel rotation (got, from input x0) with the float64 references.
//  - against the contract's float angle: glibc's cosf/sinf are within 1 ulp (<= u for
//    values of magnitude <= 1), which moves the result by <= u (|x1| + |x2|); the two
//    products and the sum add <= 1.5 u (|x1| + |x2|): <= 2.5 u (|x1| + |x2|), allowed 5 u.
//  - against the exact angle: in addition the float angle is off by <= 1.5 u |angle|
//    (inv_freq rounded, pos / scaling rounded, the product rounded), which rotates the
//    pair by that much: allowed (5 u + 2 u |angle|) (|x1| + |x2|).
//  - every other element: bit for bit unchanged.
void check_rope(const RopeLayout& L, const std::vector<int32_t>& pos, float theta, float scaling,
                bool transpose, const std::vector<float>& x0, const std::vector<float>& got,
                const std::string& what) {
  std::vector<double> ref_c = widen(x0), ref_e = widen(x0);
  rope_ref(L, pos, theta, scaling, false, transpose, ref_c);
  rope_ref(L, pos, theta, scaling, true, transpose, ref_e);
  const std::string ctx = what + " " + layout_str(L);
  int64_t untouched_bad = 0;
  for (int64_t k = 0; k < L.rows * L.stride; ++k) {
    if (!rotated(L, pos, k)) {
      if (std::memcmp(&got[k], &x0[k], sizeof(float)) != 0) ++untouched_bad;
      continue;
    }
    double x1, x2;
    pair_of(L, x0, k, &x1, &x2);
    const double mag = std::fabs(x1) + std::fabs(x2);
    const int64_t r = k / L.stride, i = ((k % L.stride) - L.offset) % L.hs % (L.hs / 2);
    const double angle = std::fabs(exact_angle(pos[r], theta, scaling, i, L.hs));
    const std::string where = ctx + " elem " + std::to_string(k) + " pos " + std::to_string(pos[r]);
    CHECK_NEAR_CTX(got[k], ref_c[k], 5 * kU * mag, 0.0, "contract angle " + where);
    CHECK_NEAR_CTX(got[k], ref_e[k], (5 * kU + 2 * kU * angle) * mag, 0.0, "exact angle " + where);
  }
  CHECK_NEAR_CTX(untouched_bad, 0, 0, 0, ctx + ": untouched elements changed");
}

}  // namespace

// =================================== RoPE tests ==========================================

TEST(rope_matches_float64_reference) {
  tu::Rng rng(11);
  struct Case {
    RopeLayout L;
    float theta, scaling;
    int32_t max_pos;
  };
  const Case cases[] = {
      {{1, 2, 0, 1, 2}, 10000.0f, 1.0f, 50},          // one row, one head of 2
      {{7, 64, 0, 1, 64}, 10000.0f, 1.0f, 2047},      // one head of 64, rows = stride
      {{5, 37, 3, 2, 16}, 10000.0f, 1.0f, 300},       // odd offset and stride, spare columns
      {{4, 11, 1, 5, 2}, 10000.0f, 2.0f, 100},        // head_size 2, many heads, scaling 2
      {{9, 768, 0, 8, 64}, 10000.0f, 1.0f, 4095},     // GQA q: 8 heads of 64 in a (8+2+2)*64 row
      {{9, 768, 512, 2, 64}, 10000.0f, 1.0f, 4095},   // GQA k: the 2 heads after q
      {{6, 1536, 0, 10, 128}, 500000.0f, 8.0f, 8191}, // Llama 3 theta, linear scaling 8, hs 128
      {{64, 12 * 16, 0, 10, 16}, 10000.0f, 1.0f, 20}, // many rows, few positions (table path)
      {{3, 6, 0, 0, 2}, 10000.0f, 1.0f, 5},           // no heads: nothing changes
  };
  for (const Case& cs : cases) {
    const RopeLayout& L = cs.L;
    const std::vector<int32_t> pos = make_positions(rng, L.rows, cs.max_pos);
    const std::vector<float> x0 = make_rope_data(rng, L, pos);
    std::vector<float> x = x0;
    rope_forward(L.rows, L.stride, L.offset, L.heads, L.hs, pos.data(), cs.theta, cs.scaling, x.data());
    check_rope(L, pos, cs.theta, cs.scaling, false, x0, x, "forward");
    std::vector<float> g = x0;
    rope_backward(L.rows, L.stride, L.offset, L.heads, L.hs, pos.data(), cs.theta, cs.scaling, g.data());
    check_rope(L, pos, cs.theta, cs.scaling, true, x0, g, "backward");
  }
}

TEST(rope_gqa_fused_row_q_then_k) {
  // A fused [q (8 heads) | k (2 heads) | v (2 heads)] row of head size hs: rotating q and
  // k in two calls equals one call over their 10 contiguous heads bit for bit, and v is
  // untouched (it holds NaN/inf junk: see make_rope_data via the q+k layout).
  tu::Rng rng(12);
  for (int64_t hs : {2, 16, 64}) {
    const int64_t rows = 13, stride = (8 + 2 + 2) * hs;
    const RopeLayout qk{rows, stride, 0, 10, hs};
    const std::vector<int32_t> pos = make_positions(rng, rows, 1000);
    const std::vector<float> x0 = make_rope_data(rng, qk, pos);
    std::vector<float> two = x0, one = x0;
    rope_forward(rows, stride, 0, 8, hs, pos.data(), 10000.0f, 1.0f, two.data());
    rope_forward(rows, stride, 8 * hs, 2, hs, pos.data(), 10000.0f, 1.0f, two.data());
    rope_forward(rows, stride, 0, 10, hs, pos.data(), 10000.0f, 1.0f, one.data());
    CHECK_BITWISE_EQUAL(two.data(), one.data(), rows * stride, "q then k vs q|k");
    check_rope(qk, pos, 10000.0f, 1.0f, false, x0, one, "gqa hs=" + std::to_string(hs));
  }
}

TEST(rope_backward_matches_finite_differences) {
  // L(x) = sum dout * rope(x) is linear in x, so central differences of the float64
  // forward (contract angle, h = 1e-3) are exact up to rounding, ~1e-16 * sum|dout x| / h
  // ~ 1e-11 here: allow 1e-9. The float64 transposed rotation (explicit J^T dout) must
  // match them to 1e-9, and the kernel's rope_backward(dout) to its float tolerance
  // (5 u (|g1| + |g2|), as in check_rope) + 1e-9.
  tu::Rng rng(13);
  const RopeLayout layouts[] = {{4, 19, 1, 2, 8}, {3, 2, 0, 1, 2}, {5, 12, 0, 3, 4}};
  for (const RopeLayout& L : layouts) {
    const float theta = 10000.0f, scaling = 2.0f;
    const std::vector<int32_t> pos = make_positions(rng, L.rows, 40);
    const int64_t n = L.rows * L.stride;
    const std::vector<float> xf = tu::normal(rng, n), dout = tu::normal(rng, n);
    const std::vector<double> x = widen(xf), dd = widen(dout);
    auto loss = [&](const std::vector<double>& xx) {
      std::vector<double> y = xx;
      rope_ref(L, pos, theta, scaling, false, false, y);
      double l = 0.0;
      for (int64_t k = 0; k < n; ++k) l += dd[k] * y[k];
      return l;
    };
    std::vector<double> analytic = dd;
    rope_ref(L, pos, theta, scaling, false, true, analytic);
    std::vector<float> kernel = dout;
    rope_backward(L.rows, L.stride, L.offset, L.heads, L.hs, pos.data(), theta, scaling, kernel.data());
    const double h = 1e-3;
    for (int64_t k = 0; k < n; ++k) {
      std::vector<double> xp = x, xm = x;
      xp[k] += h, xm[k] -= h;
      const double fd = (loss(xp) - loss(xm)) / (2 * h);
      const std::string where = layout_str(L) + " d/dx " + std::to_string(k);
      CHECK_NEAR_CTX(analytic[k], fd, 1e-9, 0.0, "ref " + where);
      double mag = std::fabs(dd[k]);
      if (rotated(L, pos, k)) {
        double g1, g2;
        pair_of(L, dout, k, &g1, &g2);
        mag = std::fabs(g1) + std::fabs(g2);
      }
      CHECK_NEAR_CTX(kernel[k], fd, 5 * kU * mag + 1e-9, 0.0, "kernel " + where);
    }
  }
}

TEST(rope_roundtrip_identity_scaling_and_padding) {
  tu::Rng rng(14);
  const RopeLayout L{40, 12 * 32, 0, 10, 32};
  const float theta = 10000.0f;
  std::vector<int32_t> pos = make_positions(rng, L.rows, 4000);
  const std::vector<float> x0 = make_rope_data(rng, L, pos);  // padding rows hold NaN/inf

  // rope_backward(rope_forward(x)) = x: each pass is within 2.5 u (|x1| + |x2|) of an exact
  // rotation (see check_rope) and c^2 + s^2 = 1 to ~2 u: allow 16 u (|x1| + |x2|).
  // Padding rows and the columns outside the heads stay bit-identical through both.
  std::vector<float> x = x0;
  rope_forward(L.rows, L.stride, L.offset, L.heads, L.hs, pos.data(), theta, 1.0f, x.data());
  rope_backward(L.rows, L.stride, L.offset, L.heads, L.hs, pos.data(), theta, 1.0f, x.data());
  for (int64_t k = 0; k < L.rows * L.stride; ++k) {
    if (!rotated(L, pos, k)) {
      CHECK_BITWISE_EQUAL(&x[k], &x0[k], 1, "untouched after round trip");
      continue;
    }
    double x1, x2;
    pair_of(L, x0, k, &x1, &x2);
    CHECK_NEAR_CTX(x[k], x0[k], 16 * kU * (std::fabs(x1) + std::fabs(x2)), 0.0,
                   "round trip elem " + std::to_string(k));
  }

  // Position 0: angle 0, cos 1, sin 0, so x1 * 1 - x2 * 0 = x1 exactly (inputs nonzero):
  // the identity bit for bit, both directions, any theta and scaling.
  std::vector<int32_t> zeros(L.rows, 0);
  const std::vector<float> xz = tu::normal(rng, L.rows * L.stride);
  for (float sc : {1.0f, 3.0f}) {
    std::vector<float> f = xz, b = xz;
    rope_forward(L.rows, L.stride, L.offset, L.heads, L.hs, zeros.data(), theta, sc, f.data());
    rope_backward(L.rows, L.stride, L.offset, L.heads, L.hs, zeros.data(), theta, sc, b.data());
    CHECK_BITWISE_EQUAL(f.data(), xz.data(), L.rows * L.stride, "position 0 forward");
    CHECK_BITWISE_EQUAL(b.data(), xz.data(), L.rows * L.stride, "position 0 backward");
  }

  // Linear scaling s at position s*p is scaling 1 at position p: (float)(s p) / s == p
  // exactly (s a power of 2, s p < 2^24), so the angles and hence the results are the same
  // bits. Both directions.
  std::vector<int32_t> p1(L.rows), p2(L.rows), p8(L.rows);
  for (int64_t r = 0; r < L.rows; ++r) {
    p1[r] = pos[r] < 0 ? pos[r] : pos[r] / 2;
    p2[r] = pos[r] < 0 ? pos[r] : 2 * p1[r];
    p8[r] = pos[r] < 0 ? pos[r] : 8 * p1[r];
  }
  for (int dir = 0; dir < 2; ++dir) {
    auto rope = dir == 0 ? rope_forward : rope_backward;
    std::vector<float> a = x0, b = x0, c = x0;
    rope(L.rows, L.stride, L.offset, L.heads, L.hs, p1.data(), theta, 1.0f, a.data());
    rope(L.rows, L.stride, L.offset, L.heads, L.hs, p2.data(), theta, 2.0f, b.data());
    rope(L.rows, L.stride, L.offset, L.heads, L.hs, p8.data(), theta, 8.0f, c.data());
    CHECK_BITWISE_EQUAL(b.data(), a.data(), L.rows * L.stride, dir == 0 ? "scaling 2 fwd" : "scaling 2 bwd");
    CHECK_BITWISE_EQUAL(c.data(), a.data(), L.rows * L.stride, dir == 0 ? "scaling 8 fwd" : "scaling 8 bwd");
  }

  // All rows padding: nothing changes (NaN/inf everywhere stays bit for bit).
  std::vector<int32_t> pad(L.rows, -1);
  std::vector<float> junk(L.rows * L.stride, tu::kNaN), junk0 = junk;
  rope_forward(L.rows, L.stride, L.offset, L.heads, L.hs, pad.data(), theta, 1.0f, junk.data());
  rope_backward(L.rows, L.stride, L.offset, L.heads, L.hs, pad.data(), theta, 1.0f, junk.data());
  CHECK_BITWISE_EQUAL(junk.data(), junk0.data(), L.rows * L.stride, "all padding");
}

TEST(rope_batch_equals_row_by_row) {
  // A row's result does not depend on the other rows of the call: a batch whose positions
  // repeat (the kernel may then build a per-position cos/sin table) and the same rows one
  // call each (one cos/sin per row) give the same bits, both directions.
  tu::Rng rng(15);
  for (int32_t max_pos : {7, 100000}) {
    const RopeLayout L{96, 6 * 64, 64, 4, 64};
    const std::vector<int32_t> pos = make_positions(rng, L.rows, max_pos);
    const std::vector<float> x0 = make_rope_data(rng, L, pos);
    for (int dir = 0; dir < 2; ++dir) {
      auto rope = dir == 0 ? rope_forward : rope_backward;
      std::vector<float> batch = x0, rowwise = x0;
      rope(L.rows, L.stride, L.offset, L.heads, L.hs, pos.data(), 10000.0f, 1.0f, batch.data());
      for (int64_t r = 0; r < L.rows; ++r)
        rope(1, L.stride, L.offset, L.heads, L.hs, &pos[r], 10000.0f, 1.0f, &rowwise[r * L.stride]);
      CHECK_BITWISE_EQUAL(batch.data(), rowwise.data(), L.rows * L.stride, "batch vs row by row");
    }
  }
}

// ================================= SwiGLU: references =====================================

namespace {

double silu_ref(double x) { return x / (1.0 + std::exp(-x)); }  // -> -0 for x << 0 (exp = inf)
double dsilu_ref(double x) {
  const double s = 1.0 / (1.0 + std::exp(-x));
  return s + x * s * (1.0 - s);
}

// gate: N(0, 3) plus edges (zero, tiny, silu' = 0 near -1.2785, the fast_exp underflow and
// tail cut near -87.3 / -88, large; 1e37 keeps silu * up (|up| < 3) in float range).
std::vector<float> gate_values(tu::Rng& rng, int64_t n) {
  std::vector<float> g = tu::normal(rng, n, 0.0, 3.0);
  const float edges[] = {0.0f,  -0.0f,  1e-30f, -1e-30f, 1e-4f,  -1e-4f, 0.5f,   -1.2785f,
                         5.0f,  -5.0f,  17.0f,  -17.0f,  20.0f,  -20.0f, 30.0f,  -30.0f,
                         80.0f, -80.0f, 87.0f,  -87.0f,  87.5f,  -87.5f, 88.0f,  -88.0f,
                         89.0f, -89.0f, 100.0f, -100.0f, 1e20f,  -1e20f, 1e37f,  -1e37f};
  for (size_t k = 0; k < std::size(edges) && k < g.size(); ++k) g[(k * 7919) % g.size()] = edges[k];
  return g;
}

struct SwiCase {
  int64_t rows = 0, H = 0;
  std::vector<float> gate_up, dout;
};

SwiCase make_swi(tu::Rng& rng, int64_t rows, int64_t H) {
  SwiCase t;
  t.rows = rows, t.H = H;
  const std::vector<float> g = gate_values(rng, rows * H), u = tu::normal(rng, rows * H);
  t.gate_up.resize(rows * 2 * H);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < H; ++k) {
      t.gate_up[r * 2 * H + k] = g[r * H + k];
      t.gate_up[r * 2 * H + H + k] = u[r * H + k];
    }
  t.dout = tu::normal(rng, rows * H);
  return t;
}

// Tolerances (u = 2^-24):
//  - silu = x * sigmoid(x) from e = fast_exp(-|x|) (<= ~2 ulp), 1 + e, 1 / (.), e * s,
//    x * sig, then * up: <= ~8 u relative; allowed 1e-6 (~17 u) relative. Below
//    x ~ -87.3 the kernel gives 0 where |silu| <= 88 e^-87.3 < 1e-36: 1e-35 absolute
//    (times the factor multiplying silu).
//  - silu' = sig + x sig (1 - sig): two terms of opposite signs for x < 0 (cancelling
//    near -1.28), each within ~8 u: allowed 1e-6 (sig + |x| sig (1 - sig)) absolute
//    (times |dout * up|), plus the same 1e-35 for the tail.
void check_swi(const SwiCase& t, const std::vector<float>& out, const std::vector<float>& grad,
               const std::vector<float>& grad0) {
  const int64_t H = t.H;
  const std::string shape = "rows=" + std::to_string(t.rows) + " H=" + std::to_string(H);
  for (int64_t r = 0; r < t.rows; ++r)
    for (int64_t k = 0; k < H; ++k) {
      const double x = t.gate_up[r * 2 * H + k], u = t.gate_up[r * 2 * H + H + k];
      const double go = t.dout[r * H + k];
      const std::string where = shape + " gate=" + tf::fmt_double(x);
      const double silu = silu_ref(x);
      CHECK_NEAR_CTX(out[r * H + k], silu * u, 1e-35 * std::fabs(u), 1e-6, "out " + where);
      const double sig = 1.0 / (1.0 + std::exp(-x));
      const double dscale = sig + std::fabs(x) * sig * (1.0 - sig);
      const int64_t jg = r * 2 * H + k, ju = jg + H;
      CHECK_NEAR_CTX(grad[jg], grad0[jg] + go * u * dsilu_ref(x),
                     (1e-6 * dscale + 1e-35) * std::fabs(go * u) + 2 * kU * std::fabs(grad0[jg]), 0.0,
                     "d gate " + where);
      CHECK_NEAR_CTX(grad[ju], grad0[ju] + go * silu,
                     1e-35 * std::fabs(go) + 1e-6 * std::fabs(go * silu) + 2 * kU * std::fabs(grad0[ju]),
                     0.0, "d up " + where);
    }
}

}  // namespace

// ================================== SwiGLU tests ==========================================

TEST(swiglu_matches_float64_reference) {
  tu::Rng rng(21);
  const int64_t shapes[][2] = {{1, 1}, {3, 5}, {2, 16}, {7, 33}, {64, 1000}, {1, 11008}};
  for (const auto& s : shapes) {
    const SwiCase t = make_swi(rng, s[0], s[1]);
    std::vector<float> out = tu::poisoned(t.rows * t.H);
    swiglu_forward(t.rows, t.H, t.gate_up.data(), out.data());
    // Backward onto nonzero initial gradients (checks +=; the final add is one more
    // rounding: 2 u of the initial value, in check_swi).
    const std::vector<float> grad0 = tu::normal(rng, t.rows * 2 * t.H);
    std::vector<float> grad = grad0;
    swiglu_backward(t.rows, t.H, t.gate_up.data(), t.dout.data(), grad.data());
    check_swi(t, out, grad, grad0);
  }
  // Infinities and NaN: silu(+inf) = +inf, silu(-inf) = 0, silu'(+inf) = 1, silu'(-inf)
  // = 0; NaN propagates.
  const float gu[] = {tu::kInf, -tu::kInf, tu::kNaN, 2.0f, 2.0f, 2.0f};  // [gate | up]
  const float go[] = {1.0f, 1.0f, 1.0f};
  float y[3], g[6] = {0, 0, 0, 0, 0, 0};
  swiglu_forward(1, 3, gu, y);
  swiglu_backward(1, 3, gu, go, g);
  CHECK(y[0] == tu::kInf);
  CHECK(y[1] == 0.0f);
  CHECK(std::isnan(y[2]));
  CHECK(g[0] == 2.0f);  // d gate = go * up * 1
  CHECK(g[1] == 0.0f);
  CHECK(std::isnan(g[2]));
  CHECK(g[3] == tu::kInf);  // d up = go * silu
  CHECK(g[4] == 0.0f);
  CHECK(std::isnan(g[5]));
}

TEST(swiglu_gradient_matches_finite_differences) {
  // silu' (float64) against central differences of the float64 silu on a grid (h = 1e-6:
  // truncation ~h^2 |silu'''| / 6 < 1e-12, rounding ~1e-16 |silu| / h < 3e-9 for |x| <= 20).
  for (double x = -20.0; x <= 20.0; x += 0.0625) {
    const double h = 1e-6;
    const double fd = (silu_ref(x + h) - silu_ref(x - h)) / (2 * h);
    CHECK_NEAR_CTX(dsilu_ref(x), fd, 1e-8, 1e-8, "silu' x=" + tf::fmt_double(x));
  }
  // The whole op: L = sum dout * swiglu(gate_up); central differences of the float64
  // forward for every gate and up element (h = 1e-6: < 1e-9 for these inputs) vs the
  // analytic float64 gradient (1e-7) and the kernel (its tolerance of check_swi + 1e-7).
  tu::Rng rng(22);
  const int64_t rows = 3, H = 5;
  const std::vector<float> guf = tu::normal(rng, rows * 2 * H, 0.0, 2.0), dout = tu::normal(rng, rows * H);
  const std::vector<double> gu = widen(guf);
  auto loss = [&](const std::vector<double>& v) {
    double l = 0.0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < H; ++k)
        l += dout[r * H + k] * silu_ref(v[r * 2 * H + k]) * v[r * 2 * H + H + k];
    return l;
  };
  std::vector<float> grad(rows * 2 * H, 0.0f);
  swiglu_backward(rows, H, guf.data(), dout.data(), grad.data());
  for (int64_t j = 0; j < rows * 2 * H; ++j) {
    const int64_t r = j / (2 * H), k = j % (2 * H) % H;
    const bool is_gate = j % (2 * H) < H;
    const double x = gu[r * 2 * H + k], u = gu[r * 2 * H + H + k], go = dout[r * H + k];
    const double analytic = is_gate ? go * u * dsilu_ref(x) : go * silu_ref(x);
    std::vector<double> p = gu, m = gu;
    const double h = 1e-6;
    p[j] += h, m[j] -= h;
    const double fd = (loss(p) - loss(m)) / (2 * h);
    const std::string where = "gate_up " + std::to_string(j);
    CHECK_NEAR_CTX(analytic, fd, 1e-7, 1e-7, "ref " + where);
    const double sig = 1.0 / (1.0 + std::exp(-x));
    const double tol = is_gate ? 1e-6 * (sig + std::fabs(x) * sig * (1.0 - sig)) * std::fabs(go * u)
                               : 1e-6 * std::fabs(go * silu_ref(x));
    CHECK_NEAR_CTX(grad[j], fd, tol + 1e-7, 0.0, "kernel " + where);
  }
}

TEST(swiglu_backward_accumulates) {
  tu::Rng rng(23);
  const SwiCase t = make_swi(rng, 9, 100);
  const int64_t n = t.rows * 2 * t.H;
  std::vector<float> once(n, 0.0f), twice(n, 0.0f);
  swiglu_backward(t.rows, t.H, t.gate_up.data(), t.dout.data(), once.data());
  swiglu_backward(t.rows, t.H, t.gate_up.data(), t.dout.data(), twice.data());
  swiglu_backward(t.rows, t.H, t.gate_up.data(), t.dout.data(), twice.data());
  std::vector<float> doubled(n);  // exactly 2x, as in rmsnorm_backward_accumulates
  for (int64_t i = 0; i < n; ++i) doubled[i] = 2.0f * once[i];
  CHECK_BITWISE_EQUAL(twice.data(), doubled.data(), n, "2x swiglu grad");
  std::vector<float> g = tu::normal(rng, n);
  const std::vector<float> g0 = g;
  swiglu_backward(t.rows, t.H, t.gate_up.data(), t.dout.data(), g.data());
  // One add per element (possibly fused with the product): ~1 u of the operands.
  for (int64_t i = 0; i < n; ++i)
    CHECK_NEAR(g[i], static_cast<double>(g0[i]) + once[i], 2 * kU * (std::fabs(g0[i]) + std::fabs(once[i])), 0.0);
}

// ============================ Determinism and errors =======================================

TEST(llama_layers_bit_identical_and_thread_count) {
  // Sizes that spread over several threads and several weight-gradient chunks (uneven last
  // chunk). Reruns and single-threaded runs must give the same bits; the printed checksum
  // must not change with PPO_MAX_THREADS.
  tu::Rng rng(31);
  const RmsCase t = make_rms(rng, 389, 1024);
  const RmsOut a = run_rms(t, 2), b = run_rms(t, 2);
  RmsOut s;
  run_single_threaded([&] { s = run_rms(t, 2); });
  const RmsOut* others[] = {&b, &s};
  for (const RmsOut* o : others) {
    const char* which = o == &b ? " (rerun)" : " (one thread)";
    CHECK_BITWISE_EQUAL(o->out.data(), a.out.data(), t.rows * t.C, (std::string("rms out") + which).c_str());
    CHECK_BITWISE_EQUAL(o->rstd.data(), a.rstd.data(), t.rows, (std::string("rms rstd") + which).c_str());
    CHECK_BITWISE_EQUAL(o->dx.data(), a.dx.data(), t.rows * t.C, (std::string("rms grad_in") + which).c_str());
    CHECK_BITWISE_EQUAL(o->dw.data(), a.dw.data(), t.C, (std::string("rms grad_weight") + which).c_str());
  }
  // grad_in of a row does not depend on the other rows of the call.
  std::vector<float> by_row(t.rows * t.C, 0.0f), gw(t.C, 0.0f);
  for (int rep = 0; rep < 2; ++rep)
    for (int64_t i = 0; i < t.rows; ++i)
      rmsnorm_backward(1, t.C, &t.dout[i * t.C], &t.x[i * t.C], t.w.data(), &a.rstd[i],
                       &by_row[i * t.C], gw.data());
  CHECK_BITWISE_EQUAL(by_row.data(), a.dx.data(), t.rows * t.C, "rms grad_in row by row");

  // RoPE: a GQA q|k layout, positions repeating (table) and not.
  const RopeLayout L{300, 12 * 64, 0, 10, 64};
  std::vector<float> rope_sum;
  for (int32_t max_pos : {50, 1 << 20}) {
    const std::vector<int32_t> pos = make_positions(rng, L.rows, max_pos);
    const std::vector<float> x0 = tu::normal(rng, L.rows * L.stride);
    std::vector<float> f1 = x0, f2 = x0, fs = x0;
    rope_forward(L.rows, L.stride, L.offset, L.heads, L.hs, pos.data(), 10000.0f, 1.0f, f1.data());
    rope_forward(L.rows, L.stride, L.offset, L.heads, L.hs, pos.data(), 10000.0f, 1.0f, f2.data());
    run_single_threaded([&] {
      rope_forward(L.rows, L.stride, L.offset, L.heads, L.hs, pos.data(), 10000.0f, 1.0f, fs.data());
    });
    CHECK_BITWISE_EQUAL(f2.data(), f1.data(), L.rows * L.stride, "rope rerun");
    CHECK_BITWISE_EQUAL(fs.data(), f1.data(), L.rows * L.stride, "rope one thread");
    std::vector<float> b1 = x0, bs = x0;
    rope_backward(L.rows, L.stride, L.offset, L.heads, L.hs, pos.data(), 10000.0f, 1.0f, b1.data());
    run_single_threaded([&] {
      rope_backward(L.rows, L.stride, L.offset, L.heads, L.hs, pos.data(), 10000.0f, 1.0f, bs.data());
    });
    CHECK_BITWISE_EQUAL(bs.data(), b1.data(), L.rows * L.stride, "rope backward one thread");
    rope_sum.insert(rope_sum.end(), f1.begin(), f1.end());
    rope_sum.insert(rope_sum.end(), b1.begin(), b1.end());
  }

  // SwiGLU.
  const SwiCase w = make_swi(rng, 64, 1376);
  std::vector<float> y1(w.rows * w.H), ys(w.rows * w.H), g1(w.rows * 2 * w.H, 0.0f), gs = g1;
  swiglu_forward(w.rows, w.H, w.gate_up.data(), y1.data());
  swiglu_backward(w.rows, w.H, w.gate_up.data(), w.dout.data(), g1.data());
  run_single_threaded([&] {
    swiglu_forward(w.rows, w.H, w.gate_up.data(), ys.data());
    swiglu_backward(w.rows, w.H, w.gate_up.data(), w.dout.data(), gs.data());
  });
  CHECK_BITWISE_EQUAL(ys.data(), y1.data(), w.rows * w.H, "swiglu one thread");
  CHECK_BITWISE_EQUAL(gs.data(), g1.data(), w.rows * 2 * w.H, "swiglu grad one thread");

  uint64_t h = 1469598103934665603ull;
  const std::vector<float>* parts[] = {&a.out, &a.rstd, &a.dx, &a.dw, &rope_sum, &y1, &g1};
  for (const std::vector<float>* v : parts) h = fnv1a(h, *v);
  std::printf("    checksum %016llx (must not depend on PPO_MAX_THREADS; %d threads now)\n",
              static_cast<unsigned long long>(h), ppo::cpu_thread_count());
}

TEST(llama_layers_argument_errors) {
  using ppo::ErrorCode;
  float v[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}, o[16], r[4], gi[16], gw[8];
  int32_t p[2] = {0, 1};
  // RMSNorm.
  CHECK_THROWS_CODE(rmsnorm_forward(-1, 4, v, v, 1e-5f, o, r), ErrorCode::InvalidArgument, "rows");
  CHECK_THROWS_CODE(rmsnorm_forward(2, -4, v, v, 1e-5f, o, r), ErrorCode::InvalidArgument, "channels");
  CHECK_THROWS_CODE(rmsnorm_forward(2, 0, v, v, 1e-5f, o, r), ErrorCode::InvalidArgument, "channels");
  CHECK_THROWS_CODE(rmsnorm_forward(2, 4, v, v, -1e-5f, o, r), ErrorCode::InvalidArgument, "eps");
  CHECK_THROWS_CODE(rmsnorm_forward(2, 4, v, v, tu::kNaN, o, r), ErrorCode::InvalidArgument, "eps");
  CHECK_THROWS_CODE(rmsnorm_forward(2, 4, v, v, tu::kInf, o, r), ErrorCode::InvalidArgument, "eps");
  CHECK_THROWS_CODE(rmsnorm_forward(2, 4, nullptr, v, 1e-5f, o, r), ErrorCode::InvalidArgument, "in");
  CHECK_THROWS_CODE(rmsnorm_forward(2, 4, v, nullptr, 1e-5f, o, r), ErrorCode::InvalidArgument, "weight");
  CHECK_THROWS_CODE(rmsnorm_forward(2, 4, v, v, 1e-5f, nullptr, r), ErrorCode::InvalidArgument, "out");
  CHECK_THROWS_CODE(rmsnorm_forward(2, 4, v, v, 1e-5f, o, nullptr), ErrorCode::InvalidArgument, "rstd");
  CHECK_NO_THROW(rmsnorm_forward(0, 4, nullptr, nullptr, 1e-5f, nullptr, nullptr));
  CHECK_NO_THROW(rmsnorm_forward(0, 0, nullptr, nullptr, 1e-5f, nullptr, nullptr));
  CHECK_THROWS_CODE(rmsnorm_backward(-2, 4, v, v, v, r, gi, gw), ErrorCode::InvalidArgument, "rows");
  CHECK_THROWS_CODE(rmsnorm_backward(2, -4, v, v, v, r, gi, gw), ErrorCode::InvalidArgument, "channels");
  CHECK_THROWS_CODE(rmsnorm_backward(2, 4, nullptr, v, v, r, gi, gw), ErrorCode::InvalidArgument, "grad_out");
  CHECK_THROWS_CODE(rmsnorm_backward(2, 4, v, nullptr, v, r, gi, gw), ErrorCode::InvalidArgument, "in");
  CHECK_THROWS_CODE(rmsnorm_backward(2, 4, v, v, nullptr, r, gi, gw), ErrorCode::InvalidArgument, "weight");
  CHECK_THROWS_CODE(rmsnorm_backward(2, 4, v, v, v, nullptr, gi, gw), ErrorCode::InvalidArgument, "rstd");
  CHECK_THROWS_CODE(rmsnorm_backward(2, 4, v, v, v, r, nullptr, gw), ErrorCode::InvalidArgument, "grad_in");
  CHECK_THROWS_CODE(rmsnorm_backward(2, 4, v, v, v, r, gi, nullptr), ErrorCode::InvalidArgument, "grad_weight");
  CHECK_NO_THROW(rmsnorm_backward(0, 4, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr));
  CHECK_NO_THROW(rmsnorm_backward(2, 0, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr));

  // RoPE (both directions; the data argument is "x" forward, "grad" backward).
  for (int dir = 0; dir < 2; ++dir) {
    auto rope = dir == 0 ? rope_forward : rope_backward;
    const char* data = dir == 0 ? "x" : "grad";
    CHECK_THROWS_CODE(rope(-1, 8, 0, 2, 4, p, 1e4f, 1.0f, v), ErrorCode::InvalidArgument, "rows");
    CHECK_THROWS_CODE(rope(2, -8, 0, 0, 4, p, 1e4f, 1.0f, v), ErrorCode::InvalidArgument, "row_stride");
    CHECK_THROWS_CODE(rope(2, 8, -1, 1, 4, p, 1e4f, 1.0f, v), ErrorCode::InvalidArgument, "col_offset");
    CHECK_THROWS_CODE(rope(2, 8, 0, -1, 4, p, 1e4f, 1.0f, v), ErrorCode::InvalidArgument, "heads");
    CHECK_THROWS_CODE(rope(2, 8, 0, 2, 3, p, 1e4f, 1.0f, v), ErrorCode::InvalidArgument, "head_size");
    CHECK_THROWS_CODE(rope(2, 8, 0, 2, 0, p, 1e4f, 1.0f, v), ErrorCode::InvalidArgument, "head_size");
    CHECK_THROWS_CODE(rope(2, 8, 0, 2, -2, p, 1e4f, 1.0f, v), ErrorCode::InvalidArgument, "head_size");
    CHECK_THROWS_CODE(rope(2, 8, 0, 8, 1, p, 1e4f, 1.0f, v), ErrorCode::InvalidArgument, "head_size");
    CHECK_THROWS_CODE(rope(2, 8, 1, 2, 4, p, 1e4f, 1.0f, v), ErrorCode::InvalidArgument, "row_stride");
    CHECK_THROWS_CODE(rope(2, 8, 0, 3, 4, p, 1e4f, 1.0f, v), ErrorCode::InvalidArgument, "row_stride");
    CHECK_THROWS_CODE(rope(2, 8, 9, 0, 4, p, 1e4f, 1.0f, v), ErrorCode::InvalidArgument, "row_stride");
    CHECK_THROWS_CODE(rope(2, 8, 0, int64_t{1} << 62, 4, p, 1e4f, 1.0f, v), ErrorCode::InvalidArgument,
                      "row_stride");  // heads * head_size overflows int64
    CHECK_THROWS_CODE(rope(2, 8, 0, 2, 4, p, 0.0f, 1.0f, v), ErrorCode::InvalidArgument, "theta");
    CHECK_THROWS_CODE(rope(2, 8, 0, 2, 4, p, -1e4f, 1.0f, v), ErrorCode::InvalidArgument, "theta");
    CHECK_THROWS_CODE(rope(2, 8, 0, 2, 4, p, tu::kInf, 1.0f, v), ErrorCode::InvalidArgument, "theta");
    CHECK_THROWS_CODE(rope(2, 8, 0, 2, 4, p, tu::kNaN, 1.0f, v), ErrorCode::InvalidArgument, "theta");
    CHECK_THROWS_CODE(rope(2, 8, 0, 2, 4, p, 1e4f, 0.0f, v), ErrorCode::InvalidArgument, "scaling");
    CHECK_THROWS_CODE(rope(2, 8, 0, 2, 4, p, 1e4f, -2.0f, v), ErrorCode::InvalidArgument, "scaling");
    CHECK_THROWS_CODE(rope(2, 8, 0, 2, 4, p, 1e4f, tu::kInf, v), ErrorCode::InvalidArgument, "scaling");
    CHECK_THROWS_CODE(rope(2, 8, 0, 2, 4, p, 1e4f, tu::kNaN, v), ErrorCode::InvalidArgument, "scaling");
    CHECK_THROWS_CODE(rope(2, 8, 0, 2, 4, nullptr, 1e4f, 1.0f, v), ErrorCode::InvalidArgument, "positions");
    CHECK_THROWS_CODE(rope(2, 8, 0, 2, 4, p, 1e4f, 1.0f, nullptr), ErrorCode::InvalidArgument, data);
    // Scalars are checked even with nothing to do; pointers are not.
    CHECK_THROWS_CODE(rope(0, 8, 0, 2, 3, nullptr, 1e4f, 1.0f, nullptr), ErrorCode::InvalidArgument, "head_size");
    CHECK_THROWS_CODE(rope(0, 8, 0, 2, 4, nullptr, 1e4f, 0.0f, nullptr), ErrorCode::InvalidArgument, "scaling");
    CHECK_NO_THROW(rope(0, 8, 0, 2, 4, nullptr, 1e4f, 1.0f, nullptr));
    CHECK_NO_THROW(rope(2, 8, 0, 0, 4, nullptr, 1e4f, 1.0f, nullptr));
    CHECK_NO_THROW(rope(2, 8, 0, 2, 4, p, 1e4f, 1.0f, v));  // exactly fills the row
  }

  // SwiGLU.
  CHECK_THROWS_CODE(swiglu_forward(-1, 4, v, o), ErrorCode::InvalidArgument, "rows");
  CHECK_THROWS_CODE(swiglu_forward(2, -4, v, o), ErrorCode::InvalidArgument, "hidden");
  CHECK_THROWS_CODE(swiglu_forward(2, 4, nullptr, o), ErrorCode::InvalidArgument, "gate_up");
  CHECK_THROWS_CODE(swiglu_forward(2, 4, v, nullptr), ErrorCode::InvalidArgument, "out");
  CHECK_NO_THROW(swiglu_forward(0, 4, nullptr, nullptr));
  CHECK_NO_THROW(swiglu_forward(2, 0, nullptr, nullptr));
  CHECK_THROWS_CODE(swiglu_backward(-1, 4, v, v, gi), ErrorCode::InvalidArgument, "rows");
  CHECK_THROWS_CODE(swiglu_backward(2, -4, v, v, gi), ErrorCode::InvalidArgument, "hidden");
  CHECK_THROWS_CODE(swiglu_backward(2, 4, nullptr, v, gi), ErrorCode::InvalidArgument, "gate_up");
  CHECK_THROWS_CODE(swiglu_backward(2, 4, v, nullptr, gi), ErrorCode::InvalidArgument, "grad_out");
  CHECK_THROWS_CODE(swiglu_backward(2, 4, v, v, nullptr), ErrorCode::InvalidArgument, "grad_gate_up");
  CHECK_NO_THROW(swiglu_backward(0, 4, nullptr, nullptr, nullptr));
  CHECK_NO_THROW(swiglu_backward(2, 0, nullptr, nullptr, nullptr));
}

PPO_TEST_MAIN()
