// ppo::cpu causal attention (csrc/cpu/attention.h), multi-head (KVH == H, GPT-2) and
// grouped-query (H query heads sharing KVH kv heads, multi-query KVH == 1 included),
// against a naive float64 reference written here: forward outputs and probabilities, the
// backward against an analytic float64 backward that is itself checked against central
// finite differences of the float64 forward (and the kernel against those differences
// directly), accumulation (+=), right padding (padded rows skipped, garbage there changes
// nothing), the KV-cache prefill + decode path against the full forward, grouped-query
// attention against multi-head attention on repeated kv heads, bit-identical results
// whatever the batch split, argument errors, and a timing print of the model shapes.
//
// Determinism across thread counts: parallel_for splits the (b, h) items by the pool
// size, which is fixed per process, so run this binary with PPO_MAX_THREADS=1 and =3; the
// "checksum" line printed by attention_bit_identical_whatever_the_split must be the same.
// (Inside one process the test checks that each sequence's results do not depend on
// which other sequences share the call, i.e. on how items fall into chunks.)
// Instruction sets: the kernels dispatch to AVX-512, AVX2+FMA or portable code; run with
// PPO_ATTENTION_ISA=avx2 and =portable as well to test the fallbacks on a newer CPU (the
// checksum differs between instruction sets, not between thread counts).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "cpu/attention.h"
#include "test_framework.h"
#include "test_util.h"

namespace {

using ppo::cpu::attention_backward;
using ppo::cpu::attention_decode;
using ppo::cpu::attention_forward;
using ppo::cpu::kv_cache_store;

constexpr double kU = 5.9604644775390625e-08;  // 2^-24, the float unit roundoff
// Probabilities below FLT_MIN (exp arguments below -87.3) are flushed to 0 by fast_exp:
// an absolute allowance of FLT_MIN for them (and for outputs: sum_s p_s |v_s| terms).
constexpr double kTiny = 1.1754943508222875e-38;

// H query heads, KVH kv heads (H % KVH == 0), hs columns per head. A qkv row is
// [q (H hs) | k (KVH hs) | v (KVH hs)]; query head h reads kv head h / (H / KVH).
struct Shape {
  int64_t B, T, H, KVH, hs;
  int64_t ld() const { return (H + 2 * KVH) * hs; }  // a qkv row
  int64_t od() const { return H * hs; }              // an out row
  int64_t kvd() const { return KVH * hs; }           // a cache row
  int64_t group(int64_t h) const { return h / (H / KVH); }
  int64_t qcol(int64_t h) const { return h * hs; }  // columns of head h in a qkv row
  int64_t kcol(int64_t h) const { return (H + group(h)) * hs; }
  int64_t vcol(int64_t h) const { return (H + KVH + group(h)) * hs; }
  int64_t qkv_size() const { return B * T * ld(); }
  int64_t out_size() const { return B * T * od(); }
  int64_t att_size() const { return B * H * T * T; }
  std::string str() const {
    return "B=" + std::to_string(B) + " T=" + std::to_string(T) + " H=" + std::to_string(H) +
           " KVH=" + std::to_string(KVH) + " hs=" + std::to_string(hs);
  }
};

int64_t len_of(const std::vector<int32_t>& lengths, int64_t b, int64_t T) {
  return lengths.empty() ? T : lengths[b];
}
const int32_t* ptr(const std::vector<int32_t>& v) { return v.empty() ? nullptr : v.data(); }

// ---- float64 reference -----------------------------------------------------------------

struct RefForward {
  std::vector<double> att, out;
  // Per (b, t) row: a bound on the relative error of the kernel's float probabilities,
  // (2 hs + 4) u S + (n + 8) u, where S = max_s scale * sum_i |q_i k_s,i| bounds the
  // scores and their float rounding (hs-term dot product: <= hs u S; the scaling and the
  // max subtraction: u each) enters p_s = e^(z_s - m) / sum twice (z_s and the sum's
  // terms); fast_exp (~2 ulp), the n-term float sum and the normalization add the rest.
  std::vector<double> rel_p;
};

RefForward ref_forward(const Shape& s, const std::vector<int32_t>& lengths,
                       const std::vector<double>& qkv) {
  const int64_t B = s.B, T = s.T, H = s.H, hs = s.hs, ld = s.ld(), od = s.od();
  const double scale = 1.0 / std::sqrt(static_cast<double>(hs));
  RefForward r;
  r.att.assign(s.att_size(), 0.0);
  r.out.assign(s.out_size(), 0.0);
  r.rel_p.assign(B * T, 0.0);
  std::vector<double> z(T);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = len_of(lengths, b, T);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < len; ++t) {
        const double* q = &qkv[(b * T + t) * ld + s.qcol(h)];
        double m = -INFINITY, S = 0.0;
        for (int64_t u = 0; u <= t; ++u) {
          const double* k = &qkv[(b * T + u) * ld + s.kcol(h)];
          double dot = 0.0, mag = 0.0;
          for (int64_t i = 0; i < hs; ++i) dot += q[i] * k[i], mag += std::fabs(q[i] * k[i]);
          z[u] = dot * scale;
          m = std::max(m, z[u]);
          S = std::max(S, mag * scale);
        }
        double sum = 0.0;
        for (int64_t u = 0; u <= t; ++u) sum += std::exp(z[u] - m);
        double* a = &r.att[((b * H + h) * T + t) * T];
        for (int64_t u = 0; u <= t; ++u) a[u] = std::exp(z[u] - m) / sum;
        double* o = &r.out[(b * T + t) * od + h * hs];
        for (int64_t u = 0; u <= t; ++u) {
          const double* v = &qkv[(b * T + u) * ld + s.vcol(h)];
          for (int64_t i = 0; i < hs; ++i) o[i] += a[u] * v[i];
        }
        const double rel = (2.0 * hs + 4.0) * kU * S + (t + 9.0) * kU;
        r.rel_p[b * T + t] = std::max(r.rel_p[b * T + t], rel);
      }
  }
  return r;
}

// The float64 gradient of sum(dout * out) w.r.t. qkv (valid rows; 0 at padded rows),
// written as llm.c's loops (the k and v gradients of a kv head summing its query heads'
// terms), and `mag`: the same sums with every term replaced by its absolute value, the
// scale of the float rounding of each gradient element.
void ref_backward(const Shape& s, const std::vector<int32_t>& lengths,
                  const std::vector<double>& qkv, const std::vector<double>& att,
                  const std::vector<double>& dout, std::vector<double>& grad,
                  std::vector<double>& mag) {
  const int64_t B = s.B, T = s.T, H = s.H, hs = s.hs, ld = s.ld(), od = s.od();
  const double scale = 1.0 / std::sqrt(static_cast<double>(hs));
  grad.assign(s.qkv_size(), 0.0);
  mag.assign(s.qkv_size(), 0.0);
  std::vector<double> da(T), dam(T);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = len_of(lengths, b, T);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < len; ++t) {
        const double* p = &att[((b * H + h) * T + t) * T];
        const double* g = &dout[(b * T + t) * od + h * hs];
        double dot = 0.0, dotm = 0.0;
        for (int64_t u = 0; u <= t; ++u) {
          const double* v = &qkv[(b * T + u) * ld + s.vcol(h)];
          da[u] = 0.0, dam[u] = 0.0;
          for (int64_t i = 0; i < hs; ++i) da[u] += g[i] * v[i], dam[u] += std::fabs(g[i] * v[i]);
          dot += p[u] * da[u], dotm += p[u] * dam[u];
        }
        for (int64_t u = 0; u <= t; ++u) {
          const double dpre = p[u] * (da[u] - dot), dprem = p[u] * (dam[u] + dotm);
          const int64_t qi = (b * T + t) * ld + s.qcol(h), ki = (b * T + u) * ld + s.kcol(h),
                        vi = (b * T + u) * ld + s.vcol(h);
          for (int64_t i = 0; i < hs; ++i) {
            grad[qi + i] += scale * dpre * qkv[ki + i];
            mag[qi + i] += scale * dprem * std::fabs(qkv[ki + i]);
            grad[ki + i] += scale * dpre * qkv[qi + i];
            mag[ki + i] += scale * dprem * std::fabs(qkv[qi + i]);
            grad[vi + i] += p[u] * g[i];
            mag[vi + i] += p[u] * std::fabs(g[i]);
          }
        }
      }
  }
}

double max_of(const std::vector<double>& v) {
  double m = 0.0;
  for (double x : v) m = std::max(m, x);
  return m;
}

// ---- problems ----------------------------------------------------------------------------

struct Problem {
  Shape s;
  std::vector<int32_t> lengths;  // empty: all T
  std::vector<float> qkv, dout;
};

// qkv ~ N(0, sigma), dout ~ N(0, 1); padded rows of qkv and dout hold NaN / inf garbage
// (nothing may read them).
Problem make_problem(tu::Rng& rng, Shape s, std::vector<int32_t> lengths, double sigma = 1.0) {
  Problem p;
  p.s = s;
  p.lengths = std::move(lengths);
  p.qkv = tu::normal(rng, s.qkv_size(), 0.0, sigma);
  p.dout = tu::normal(rng, s.out_size());
  const float garbage[] = {tu::kNaN, tu::kInf, -tu::kInf};
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t t = len_of(p.lengths, b, s.T); t < s.T; ++t) {
      for (int64_t c = 0; c < s.ld(); ++c) p.qkv[(b * s.T + t) * s.ld() + c] = garbage[c % 3];
      for (int64_t c = 0; c < s.od(); ++c) p.dout[(b * s.T + t) * s.od() + c] = garbage[(c + 1) % 3];
    }
  return p;
}

std::vector<double> widen(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// The kernel's forward into NaN-poisoned buffers.
void run_forward(const Problem& p, std::vector<float>& att, std::vector<float>& out) {
  att = tu::poisoned(p.s.att_size());
  out = tu::poisoned(p.s.out_size());
  attention_forward(p.s.B, p.s.T, p.s.H, p.s.KVH, p.s.hs, ptr(p.lengths), p.qkv.data(),
                    att.data(), out.data());
}

// Checks the kernel's forward of p against the float64 reference (see RefForward for the
// probability bound; out_t = sum_s p_s v_s adds the n-term float sum: its error is within
// 2 (rel_p + (n + 1) u) sum_s p_s |v_s|, the 2 a margin for the rounding of the products).
void check_forward(const Problem& p, const std::vector<float>& att,
                   const std::vector<float>& out) {
  const Shape& s = p.s;
  const int64_t T = s.T, H = s.H, hs = s.hs, ld = s.ld(), od = s.od();
  std::vector<double> qkv = widen(p.qkv);
  for (double& x : qkv)
    if (!std::isfinite(x)) x = 0.0;  // padded garbage: never read by the reference either
  const RefForward r = ref_forward(s, p.lengths, qkv);
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t len = len_of(p.lengths, b, T);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const std::string where = s.str() + " b=" + std::to_string(b) + " h=" +
                                  std::to_string(h) + " t=" + std::to_string(t);
        const int64_t a0 = ((b * H + h) * T + t) * T;
        const int64_t o0 = (b * T + t) * od + h * hs;
        if (t >= len) {  // padding: written as exact zeros
          for (int64_t u = 0; u < T; ++u) CHECK_NEAR_CTX(att[a0 + u], 0.0, 0.0, 0.0, "att pad " + where);
          for (int64_t i = 0; i < hs; ++i) CHECK_NEAR_CTX(out[o0 + i], 0.0, 0.0, 0.0, "out pad " + where);
          continue;
        }
        // Each row sums to 1 within the rounding of the normalization alone: whatever
        // the scores' rounding, p_s = e_s * (1 / sum_u e_u) in float, so the sum is off
        // by at most the float sum of the e_u plus two roundings: (t + 1 + 8) u. (A
        // tighter check than the elementwise one below for short rows.)
        double row_sum = 0.0;
        for (int64_t u = 0; u <= t; ++u) row_sum += att[a0 + u];
        CHECK_NEAR_CTX(row_sum, 1.0, (t + 9.0) * kU, 0.0, "att row sum " + where);
        const double rel = r.rel_p[b * T + t];
        for (int64_t u = 0; u < T; ++u) {
          const double want = r.att[a0 + u];
          CHECK_NEAR_CTX(att[a0 + u], want, u <= t ? 2.0 * rel * want + kTiny : 0.0, 0.0,
                         "att " + where + " s=" + std::to_string(u));
        }
        for (int64_t i = 0; i < hs; ++i) {
          double mag = 0.0;
          for (int64_t u = 0; u <= t; ++u)
            mag += r.att[a0 + u] * std::fabs(qkv[(b * T + u) * ld + s.vcol(h) + i]);
          CHECK_NEAR_CTX(out[o0 + i], r.out[o0 + i], 2.0 * (rel + (t + 2.0) * kU) * mag + kTiny,
                         0.0, "out " + where + " i=" + std::to_string(i));
        }
      }
  }
}

// Tolerance of a backward gradient element against the float64 gradient: the kernel's
// float sums (of hs terms for d_att, t + 1 for the softmax backward and the value sums,
// and the G = H / KVH query heads' terms added to a kv head's d_k and d_v) round to within
// ~(hs + T + 7 + G) u of `mag` (the same sums of absolute values), and the float
// probabilities it is given carry rel_p each: allow (4 max rel_p + 4 (hs + T + 7 + G) u) mag.
double grad_tol(const Shape& s, double rel_p_max, double mag) {
  const double G = static_cast<double>(s.H / s.KVH);
  return (4.0 * rel_p_max + 4.0 * (s.hs + s.T + 7.0 + G) * kU) * mag + 1e-30;
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

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace


// ---- forward -------------------------------------------------------------------------------

TEST(attention_forward_matches_float64_reference) {
  tu::Rng rng(11);
  struct Case {
    Shape s;
    std::vector<int32_t> lengths;
  };
  const Case cases[] = {
      // multi-head (KVH == H)
      {{1, 1, 1, 1, 16}, {}},              // T = 1
      {{2, 7, 3, 3, 4}, {}},               // odd T, hs = 4
      {{1, 9, 5, 5, 1}, {}},               // hs = 1
      {{2, 11, 1, 1, 20}, {}},             // H = 1, hs = 20 (a 16-column tile + 4 narrow)
      {{3, 13, 2, 2, 20}, {0, 13, 6}},     // lengths 0, T and odd; rows not a multiple of 16
      {{2, 21, 2, 2, 32}, {21, 18}},       // hs = 32: 4-row tiles, leftovers
      {{1, 70, 2, 2, 64}, {}},             // hs = 64, > 64 keys (one-row 64-column tiles)
      {{2, 33, 2, 2, 48}, {17, 33}},       // hs = 48
      // grouped-query
      {{2, 19, 8, 2, 16}, {19, 11}},       // 4 query heads per kv head
      {{2, 23, 4, 1, 32}, {23, 9}},        // multi-query
      {{1, 70, 4, 1, 64}, {}},             // multi-query, > 64 keys
      {{3, 13, 6, 3, 5}, {13, 0, 7}},      // hs = 5 (narrow tiles only), a length-0 row
      {{2, 9, 4, 1, 7}, {}},               // multi-query, hs = 7
  };
  for (const Case& c : cases) {
    Problem p = make_problem(rng, c.s, c.lengths);
    std::vector<float> att, out;
    run_forward(p, att, out);
    check_forward(p, att, out);
    // Without att: the same out, bit for bit.
    std::vector<float> out2 = tu::poisoned(c.s.out_size());
    attention_forward(c.s.B, c.s.T, c.s.H, c.s.KVH, c.s.hs, ptr(p.lengths), p.qkv.data(),
                      nullptr, out2.data());
    CHECK_BITWISE_EQUAL(out2.data(), out.data(), c.s.out_size(), "out without att");
  }
}

TEST(attention_forward_peaked_and_flat_scores) {
  // Large scores (sigma = 4: |z| up to ~100, probabilities from ~1 down to underflow) and
  // tiny ones (sigma = 0.01: nearly uniform rows): max subtraction keeps both finite.
  tu::Rng rng(12);
  for (const Shape& s : {Shape{2, 19, 2, 2, 16}, Shape{2, 19, 8, 2, 16}})
    for (double sigma : {4.0, 0.01}) {
      Problem p = make_problem(rng, s, {19, 10}, sigma);
      std::vector<float> att, out;
      run_forward(p, att, out);
      check_forward(p, att, out);
      for (float x : out) CHECK(std::isfinite(x));
    }
}

// ---- backward ------------------------------------------------------------------------------

TEST(attention_backward_reference_matches_finite_differences) {
  // The float64 analytic backward against central differences of the float64 forward,
  // L = sum dout * out, step 1e-5: truncation ~1e-10 |L'''|, rounding ~1e-16 |L| / 1e-5,
  // both < 1e-8 here; allow 1e-7 + 1e-7 |fd| (any wrong term is O(1e-2) or more). The
  // kernel (given its own forward's att) is held to the same differences at its float
  // tolerance (grad_tol) + 1e-7. Padded rows: the differences are exactly 0 (the forward
  // never reads them) and the kernel must leave grad_qkv there untouched.
  tu::Rng rng(21);
  struct Case {
    Shape s;
    std::vector<int32_t> lengths;
  };
  const Case cases[] = {
      {{2, 5, 2, 2, 4}, {}},
      {{1, 7, 1, 1, 3}, {}},             // hs = 3
      {{3, 6, 4, 4, 1}, {0, 6, 3}},      // hs = 1, lengths 0 / T / 3
      {{1, 9, 2, 2, 16}, {}},            // hs = 16: 4-row tiles in every sum
      {{2, 6, 2, 2, 20}, {6, 5}},        // hs = 20
      {{1, 6, 8, 2, 16}, {}},            // grouped-query: 4 query heads per kv head
      {{2, 5, 4, 1, 3}, {5, 3}},         // multi-query, hs = 3
      {{2, 6, 6, 3, 5}, {6, 0}},         // 2 query heads per kv head, hs = 5
  };
  for (const Case& c : cases) {
    const Shape& s = c.s;
    Problem p = make_problem(rng, s, c.lengths);
    for (int64_t b = 0; b < s.B; ++b)  // finite garbage here: the differences are taken everywhere
      for (int64_t t = len_of(p.lengths, b, s.T); t < s.T; ++t)
        for (int64_t k = 0; k < s.ld(); ++k)
          p.qkv[(b * s.T + t) * s.ld() + k] = static_cast<float>(tu::rand_uniform(rng, -3, 3));
    for (float& x : p.dout)
      if (!std::isfinite(x)) x = 0.0f;
    std::vector<double> x = widen(p.qkv);
    const std::vector<double> w = widen(p.dout);
    const RefForward r = ref_forward(s, p.lengths, x);
    std::vector<double> grad, mag;
    ref_backward(s, p.lengths, x, r.att, w, grad, mag);

    std::vector<float> att, out;
    run_forward(p, att, out);
    std::vector<float> g = tu::normal(rng, s.qkv_size());  // pre-filled: += is checked too
    const std::vector<float> g0 = g;
    attention_backward(s.B, s.T, s.H, s.KVH, s.hs, ptr(p.lengths), p.dout.data(),
                       p.qkv.data(), att.data(), g.data());

    auto loss = [&](const std::vector<double>& xx) {
      const RefForward f = ref_forward(s, p.lengths, xx);
      double l = 0.0;
      for (int64_t k = 0; k < s.out_size(); ++k) l += w[k] * f.out[k];
      return l;
    };
    const double rel_p = max_of(r.rel_p);
    const double step = 1e-5;
    for (int64_t k = 0; k < s.qkv_size(); ++k) {
      std::vector<double> xp = x, xm = x;
      xp[k] += step, xm[k] -= step;
      const double fd = (loss(xp) - loss(xm)) / (2 * step);
      const int64_t b = k / (s.T * s.ld()), t = (k / s.ld()) % s.T, col = k % s.ld();
      const std::string where = s.str() + " qkv[" + std::to_string(k) + "] (" +
                                (col < s.od() ? "q" : col < s.od() + s.kvd() ? "k" : "v") + ")";
      CHECK_NEAR_CTX(grad[k], fd, 1e-7, 1e-7, "ref " + where);
      if (t >= len_of(p.lengths, b, s.T)) {
        CHECK(fd == 0.0);
        CHECK(std::memcmp(&g[k], &g0[k], sizeof(float)) == 0);
        continue;
      }
      const double got = static_cast<double>(g[k]) - static_cast<double>(g0[k]);
      CHECK_NEAR_CTX(got, fd, grad_tol(s, rel_p, mag[k]) + 1e-7 + 2 * kU * std::fabs(g0[k]), 0.0,
                     "kernel " + where);
    }
  }
}

TEST(attention_backward_matches_float64_reference) {
  // Larger shapes against the analytic float64 backward (validated above), grad_qkv
  // pre-filled with N(0,1): result = prefill + gradient, within grad_tol plus one
  // rounding of the sum (u |result|).
  tu::Rng rng(22);
  struct Case {
    Shape s;
    std::vector<int32_t> lengths;
  };
  const Case cases[] = {
      {{2, 37, 2, 2, 64}, {37, 22}},        // hs = 64
      {{3, 70, 1, 1, 64}, {70, 0, 66}},     // hs = 64, > 64 keys, a length-0 row
      {{2, 29, 3, 3, 20}, {}},              // hs = 20
      {{4, 16, 6, 6, 4}, {16, 1, 15, 9}},   // hs = 4
      {{2, 37, 8, 2, 16}, {37, 22}},        // grouped-query
      {{3, 70, 4, 1, 64}, {70, 0, 66}},     // multi-query, > 64 keys, a length-0 row
      {{2, 29, 6, 3, 5}, {}},               // hs = 5
      {{2, 40, 12, 4, 32}, {40, 25}},       // 3 query heads per kv head
  };
  for (const Case& c : cases) {
    const Shape& s = c.s;
    Problem p = make_problem(rng, s, c.lengths);
    std::vector<double> x = widen(p.qkv);
    for (double& v : x)
      if (!std::isfinite(v)) v = 0.0;
    std::vector<double> w = widen(p.dout);
    for (double& v : w)
      if (!std::isfinite(v)) v = 0.0;
    const RefForward r = ref_forward(s, p.lengths, x);
    std::vector<double> grad, mag;
    ref_backward(s, p.lengths, x, r.att, w, grad, mag);

    std::vector<float> att, out;
    run_forward(p, att, out);
    std::vector<float> g = tu::normal(rng, s.qkv_size());
    const std::vector<float> g0 = g;
    attention_backward(s.B, s.T, s.H, s.KVH, s.hs, ptr(p.lengths), p.dout.data(),
                       p.qkv.data(), att.data(), g.data());
    const double rel_p = max_of(r.rel_p);
    for (int64_t k = 0; k < s.qkv_size(); ++k) {
      const int64_t b = k / (s.T * s.ld()), t = (k / s.ld()) % s.T;
      if (t >= len_of(p.lengths, b, s.T)) {
        CHECK(std::memcmp(&g[k], &g0[k], sizeof(float)) == 0);  // padded rows untouched
        continue;
      }
      const double want = static_cast<double>(g0[k]) + grad[k];
      CHECK_NEAR_CTX(g[k], want, grad_tol(s, rel_p, mag[k]) + kU * std::fabs(want), 0.0,
                     s.str() + " grad_qkv[" + std::to_string(k) + "]");
    }
  }
}

TEST(attention_backward_accumulates) {
  // Multi-head: two calls onto zeros give exactly twice one call: each element receives
  // the same increment twice (d + d is exact; a fused alpha * acc + d rounds to 2d as
  // well). (With KVH < H a kv head's d_k and d_v receive one increment per query head of
  // its group, so there this holds for the q columns only.)
  tu::Rng rng(23);
  for (const Shape& shape : {Shape{2, 23, 3, 3, 32}, Shape{2, 23, 8, 2, 16}}) {
    Problem p = make_problem(rng, shape, {23, 17});
    std::vector<float> att, out;
    run_forward(p, att, out);
    const Shape& s = p.s;
    std::vector<float> once(s.qkv_size(), 0.0f), twice(s.qkv_size(), 0.0f);
    attention_backward(s.B, s.T, s.H, s.KVH, s.hs, ptr(p.lengths), p.dout.data(), p.qkv.data(), att.data(), once.data());
    for (int rep = 0; rep < 2; ++rep)
      attention_backward(s.B, s.T, s.H, s.KVH, s.hs, ptr(p.lengths), p.dout.data(), p.qkv.data(), att.data(), twice.data());
    std::vector<float> doubled(once.size());
    for (size_t k = 0; k < once.size(); ++k) doubled[k] = 2.0f * once[k];
    if (s.KVH == s.H) {
      CHECK_BITWISE_EQUAL(twice.data(), doubled.data(), s.qkv_size(), "2x grad_qkv");
    } else {
      for (int64_t r = 0; r < s.B * s.T; ++r)
        CHECK_BITWISE_EQUAL(&twice[r * s.ld()], &doubled[r * s.ld()], s.od(), "2x grad_q");
    }
  }
}

TEST(attention_padding_garbage_changes_nothing) {
  // The same valid data with finite padding vs NaN/inf padding (in qkv and dout): every
  // valid output, probability and gradient is bit-identical, padded outputs are 0, and
  // padded rows get no gradient.
  tu::Rng rng(24);
  const std::vector<int32_t> lengths = {9, 26, 0};
  for (const Shape& s : {Shape{3, 26, 2, 2, 32}, Shape{3, 26, 8, 2, 16}, Shape{3, 26, 4, 1, 8},
                         Shape{3, 26, 6, 3, 5}}) {
    Problem dirty = make_problem(rng, s, lengths);  // NaN / inf in the padded rows
    Problem clean = dirty;
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t t = lengths[b]; t < s.T; ++t) {
        for (int64_t c = 0; c < s.ld(); ++c) clean.qkv[(b * s.T + t) * s.ld() + c] = 0.5f;
        for (int64_t c = 0; c < s.od(); ++c) clean.dout[(b * s.T + t) * s.od() + c] = -2.0f;
      }
    std::vector<float> att_d, out_d, att_c, out_c;
    run_forward(dirty, att_d, out_d);
    run_forward(clean, att_c, out_c);
    CHECK_BITWISE_EQUAL(out_d.data(), out_c.data(), s.out_size(), ("out " + s.str()).c_str());
    CHECK_BITWISE_EQUAL(att_d.data(), att_c.data(), s.att_size(), ("att " + s.str()).c_str());
    std::vector<float> g_d(s.qkv_size(), 0.0f), g_c(s.qkv_size(), 0.0f);
    attention_backward(s.B, s.T, s.H, s.KVH, s.hs, lengths.data(), dirty.dout.data(), dirty.qkv.data(), att_d.data(), g_d.data());
    attention_backward(s.B, s.T, s.H, s.KVH, s.hs, lengths.data(), clean.dout.data(), clean.qkv.data(), att_c.data(), g_c.data());
    CHECK_BITWISE_EQUAL(g_d.data(), g_c.data(), s.qkv_size(), ("grad_qkv " + s.str()).c_str());
    // The backward reads att only at s <= t < length: NaN elsewhere changes nothing.
    std::vector<float> att_nan = att_d, g_n(s.qkv_size(), 0.0f);
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t h = 0; h < s.H; ++h)
        for (int64_t t = 0; t < s.T; ++t)
          for (int64_t u = 0; u < s.T; ++u)
            if (u > t || t >= lengths[b]) att_nan[((b * s.H + h) * s.T + t) * s.T + u] = tu::kNaN;
    attention_backward(s.B, s.T, s.H, s.KVH, s.hs, lengths.data(), dirty.dout.data(), dirty.qkv.data(), att_nan.data(), g_n.data());
    CHECK_BITWISE_EQUAL(g_n.data(), g_d.data(), s.qkv_size(),
                        ("grad_qkv, att NaN outside s <= t < length " + s.str()).c_str());
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t t = lengths[b]; t < s.T; ++t)
        for (int64_t c = 0; c < s.ld(); ++c) CHECK(g_d[(b * s.T + t) * s.ld() + c] == 0.0f);
    check_forward(dirty, att_d, out_d);
  }
}

// ---- grouped-query = multi-head on repeated kv heads ------------------------------------

TEST(attention_grouped_query_equals_multi_head_on_repeated_kv_heads) {
  // Grouped-query attention is multi-head attention whose head h is given kv head
  // h / (H / KVH): the same kernels on the same operands, so the outputs, probabilities,
  // decode outputs and d_q are bit-identical; a kv head's d_k / d_v is the sum of its
  // group's multi-head d_k / d_v (a different rounding order: within G u of the sum of
  // magnitudes).
  tu::Rng rng(61);
  for (const Shape& s : {Shape{2, 37, 8, 2, 16}, Shape{3, 21, 4, 1, 64}, Shape{2, 19, 6, 3, 5}}) {
    const int32_t T32 = static_cast<int32_t>(s.T);
    const std::vector<int32_t> lengths = s.B == 3 ? std::vector<int32_t>{21, 0, 13}
                                                  : std::vector<int32_t>{T32, T32 - 7};
    Problem p = make_problem(rng, s, lengths);
    const Shape m{s.B, s.T, s.H, s.H, s.hs};  // the multi-head shape
    Problem q = p;
    q.s = m;
    q.qkv.assign(m.qkv_size(), 0.0f);
    for (int64_t r = 0; r < s.B * s.T; ++r)
      for (int64_t h = 0; h < s.H; ++h)
        for (int64_t i = 0; i < s.hs; ++i) {
          q.qkv[r * m.ld() + m.qcol(h) + i] = p.qkv[r * s.ld() + s.qcol(h) + i];
          q.qkv[r * m.ld() + m.kcol(h) + i] = p.qkv[r * s.ld() + s.kcol(h) + i];
          q.qkv[r * m.ld() + m.vcol(h) + i] = p.qkv[r * s.ld() + s.vcol(h) + i];
        }
    std::vector<float> att_g, out_g, att_m, out_m;
    run_forward(p, att_g, out_g);
    run_forward(q, att_m, out_m);
    CHECK_BITWISE_EQUAL(out_g.data(), out_m.data(), s.out_size(), ("out " + s.str()).c_str());
    CHECK_BITWISE_EQUAL(att_g.data(), att_m.data(), s.att_size(), ("att " + s.str()).c_str());

    std::vector<float> g_g(s.qkv_size(), 0.0f), g_m(m.qkv_size(), 0.0f);
    attention_backward(s.B, s.T, s.H, s.KVH, s.hs, lengths.data(), p.dout.data(), p.qkv.data(), att_g.data(), g_g.data());
    attention_backward(m.B, m.T, m.H, m.KVH, m.hs, lengths.data(), q.dout.data(), q.qkv.data(), att_m.data(), g_m.data());
    const int64_t G = s.H / s.KVH;
    for (int64_t r = 0; r < s.B * s.T; ++r) {
      CHECK_BITWISE_EQUAL(&g_g[r * s.ld()], &g_m[r * m.ld()], s.od(), ("d_q " + s.str()).c_str());
      for (int64_t kv = 0; kv < 2; ++kv)  // d_k, then d_v
        for (int64_t g = 0; g < s.KVH; ++g)
          for (int64_t i = 0; i < s.hs; ++i) {
            double sum = 0.0, mag = 0.0;
            for (int64_t j = 0; j < G; ++j) {
              const int64_t h = g * G + j;
              const float e = g_m[r * m.ld() + (kv ? m.vcol(h) : m.kcol(h)) + i];
              sum += e, mag += std::fabs(e);
            }
            const float got = g_g[r * s.ld() + (kv ? s.vcol(g * G) : s.kcol(g * G)) + i];
            CHECK_NEAR_CTX(got, sum, 2.0 * G * kU * mag, 0.0,
                           s.str() + (kv ? " d_v" : " d_k") + " row " + std::to_string(r));
          }
    }

    // Decode at the last valid position of each sequence from caches holding the rows
    // before it: the same bits as the multi-head decode and as the forward's row.
    std::vector<float> kc(s.B * s.T * s.kvd(), tu::kNaN), vc = kc;
    std::vector<float> kcm(m.B * m.T * m.kvd(), tu::kNaN), vcm = kcm;
    kv_cache_store(s.B, s.T, s.H, s.KVH, s.hs, lengths.data(), p.qkv.data(), s.T, kc.data(), vc.data());
    kv_cache_store(m.B, m.T, m.H, m.KVH, m.hs, lengths.data(), q.qkv.data(), m.T, kcm.data(), vcm.data());
    std::vector<int32_t> pos(s.B);
    std::vector<float> row(s.B * s.ld()), rowm(m.B * m.ld());
    for (int64_t b = 0; b < s.B; ++b) {
      pos[b] = lengths[b] - 1;  // -1: a finished (empty) sequence
      const int64_t t = std::max<int64_t>(pos[b], 0);
      std::copy_n(&p.qkv[(b * s.T + t) * s.ld()], s.ld(), &row[b * s.ld()]);
      std::copy_n(&q.qkv[(b * m.T + t) * m.ld()], m.ld(), &rowm[b * m.ld()]);
    }
    std::vector<float> dec(s.B * s.od(), tu::kNaN), decm(s.B * s.od(), tu::kNaN);
    attention_decode(s.B, s.H, s.KVH, s.hs, pos.data(), row.data(), s.T, kc.data(), vc.data(), dec.data());
    attention_decode(m.B, m.H, m.KVH, m.hs, pos.data(), rowm.data(), m.T, kcm.data(), vcm.data(), decm.data());
    CHECK_BITWISE_EQUAL(dec.data(), decm.data(), s.B * s.od(), ("decode " + s.str()).c_str());
    for (int64_t b = 0; b < s.B; ++b)
      if (pos[b] >= 0)
        CHECK_BITWISE_EQUAL(&dec[b * s.od()], &out_g[(b * s.T + pos[b]) * s.od()], s.od(),
                            ("decode vs forward " + s.str()).c_str());
  }
}

// ---- KV cache ------------------------------------------------------------------------------

TEST(attention_decode_matches_full_forward) {
  // Prompts of different lengths go into the cache with kv_cache_store; then decode steps
  // feed the following rows of the same sequences one at a time. Each decode output must
  // equal the full forward's output at that position: bit for bit (the decode step runs
  // the forward's row kernels on the same operands, in the same order), and within the
  // forward's float64 tolerance. Sequence 1 finishes early (position -1): its out row is
  // 0, its qkv row (NaN) is never read, its cache rows stay as they were.
  tu::Rng rng(31);
  struct Case {
    int64_t H, KVH, hs;
    std::vector<int32_t> prompt;
    int64_t steps, cache_T;
  };
  const Case cases[] = {
      {2, 2, 64, {5, 1, 17}, 6, 30},   // multi-head, hs = 64
      {3, 3, 20, {4, 9, 2}, 5, 16},    // hs = 20
      {2, 2, 64, {70, 3, 64}, 3, 80},  // > 64 positions
      {8, 2, 16, {5, 1, 17}, 6, 30},   // grouped-query
      {4, 1, 64, {70, 3, 64}, 3, 80},  // multi-query, > 64 positions
      {6, 3, 5, {4, 9, 2}, 5, 16},     // hs = 5
  };
  for (const Case& c : cases) {
    const int64_t B = static_cast<int64_t>(c.prompt.size());
    const int64_t Tp = *std::max_element(c.prompt.begin(), c.prompt.end());
    const int64_t T = Tp + c.steps;
    const Shape s{B, T, c.H, c.KVH, c.hs};
    const int64_t ld = s.ld(), od = s.od(), kvd = s.kvd(), k0 = s.od(), v0 = s.od() + kvd;
    std::vector<int32_t> total(B);
    for (int64_t b = 0; b < B; ++b) total[b] = c.prompt[b] + static_cast<int32_t>(c.steps);
    Problem full = make_problem(rng, s, total);
    std::vector<float> att, out_full;
    run_forward(full, att, out_full);
    check_forward(full, att, out_full);

    // Prefill: the prompts, and past each prompt's length a finite marker that must not
    // be stored (the cache there stays NaN).
    std::vector<float> prompt(B * Tp * ld, 1234.5f);
    for (int64_t b = 0; b < B; ++b)
      std::copy_n(&full.qkv[b * T * ld], c.prompt[b] * ld, &prompt[b * Tp * ld]);
    std::vector<float> kc = tu::poisoned(B * c.cache_T * kvd), vc = tu::poisoned(B * c.cache_T * kvd);
    kv_cache_store(B, Tp, c.H, c.KVH, c.hs, c.prompt.data(), prompt.data(), c.cache_T, kc.data(), vc.data());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < c.cache_T; ++t)
        for (int64_t i = 0; i < kvd; ++i) {
          const float kk = kc[(b * c.cache_T + t) * kvd + i], vv = vc[(b * c.cache_T + t) * kvd + i];
          if (t < c.prompt[b]) {
            CHECK(kk == full.qkv[(b * T + t) * ld + k0 + i]);
            CHECK(vv == full.qkv[(b * T + t) * ld + v0 + i]);
          } else {
            CHECK(std::isnan(kk) && std::isnan(vv));
          }
        }

    std::vector<float> step_qkv(B * ld), out(B * od);
    for (int64_t k = 0; k < c.steps; ++k) {
      std::vector<int32_t> pos(B);
      for (int64_t b = 0; b < B; ++b) {
        pos[b] = (b == 1 && k >= 2) ? -1 : c.prompt[b] + static_cast<int32_t>(k);
        for (int64_t j = 0; j < ld; ++j)
          step_qkv[b * ld + j] = pos[b] < 0 ? tu::kNaN : full.qkv[(b * T + pos[b]) * ld + j];
      }
      const std::vector<float> kc_before = kc, vc_before = vc;
      out.assign(B * od, tu::kNaN);
      attention_decode(B, c.H, c.KVH, c.hs, pos.data(), step_qkv.data(), c.cache_T, kc.data(), vc.data(), out.data());
      for (int64_t b = 0; b < B; ++b) {
        const std::string where = s.str() + " step " + std::to_string(k) + " b=" + std::to_string(b);
        if (pos[b] < 0) {
          for (int64_t i = 0; i < od; ++i) CHECK_NEAR_CTX(out[b * od + i], 0.0, 0.0, 0.0, "finished " + where);
          const int64_t n = c.cache_T * kvd;
          CHECK(std::memcmp(&kc[b * n], &kc_before[b * n], n * sizeof(float)) == 0);
          CHECK(std::memcmp(&vc[b * n], &vc_before[b * n], n * sizeof(float)) == 0);
          continue;
        }
        CHECK_BITWISE_EQUAL(&out[b * od], &out_full[(b * T + pos[b]) * od], od, ("decode vs forward " + where).c_str());
        for (int64_t i = 0; i < kvd; ++i) {
          CHECK(kc[(b * c.cache_T + pos[b]) * kvd + i] == full.qkv[(b * T + pos[b]) * ld + k0 + i]);
          CHECK(vc[(b * c.cache_T + pos[b]) * kvd + i] == full.qkv[(b * T + pos[b]) * ld + v0 + i]);
        }
      }
    }
  }
}

// ---- determinism ---------------------------------------------------------------------------

TEST(attention_bit_identical_whatever_the_split) {
  // Every (b, h) (in the backward every (b, kv head), its group's query heads in order) is
  // computed by one thread from its own data in a fixed order, so a sequence's results do
  // not depend on which other sequences share the call (that is, on how the items fall
  // into the pool's chunks): the whole batch at once and each sequence alone give the
  // same bits, and reruns too. The checksum must not change with PPO_MAX_THREADS (compare
  // the printed line across runs).
  tu::Rng rng(41);
  uint64_t hash = 1469598103934665603ull;
  for (const Shape& s : {Shape{5, 45, 3, 3, 32}, Shape{5, 45, 8, 2, 16}, Shape{5, 45, 4, 1, 24},
                         Shape{5, 45, 6, 3, 5}}) {
    const std::vector<int32_t> lengths = {45, 12, 0, 44, 31};
    Problem p = make_problem(rng, s, lengths);
    std::vector<float> att, out, att2, out2;
    run_forward(p, att, out);
    run_forward(p, att2, out2);
    CHECK(same_bits(att, att2));
    CHECK(same_bits(out, out2));
    std::vector<float> g(s.qkv_size(), 0.0f), g2(s.qkv_size(), 0.0f);
    attention_backward(s.B, s.T, s.H, s.KVH, s.hs, lengths.data(), p.dout.data(), p.qkv.data(), att.data(), g.data());
    attention_backward(s.B, s.T, s.H, s.KVH, s.hs, lengths.data(), p.dout.data(), p.qkv.data(), att.data(), g2.data());
    CHECK(same_bits(g, g2));

    const int64_t ld = s.ld(), od = s.od(), TT = s.T * s.T;
    for (int64_t b = 0; b < s.B; ++b) {
      std::vector<float> a1(s.H * TT, tu::kNaN), o1(s.T * od, tu::kNaN), g1(s.T * ld, 0.0f);
      attention_forward(1, s.T, s.H, s.KVH, s.hs, &lengths[b], &p.qkv[b * s.T * ld], a1.data(), o1.data());
      attention_backward(1, s.T, s.H, s.KVH, s.hs, &lengths[b], &p.dout[b * s.T * od], &p.qkv[b * s.T * ld], a1.data(), g1.data());
      CHECK_BITWISE_EQUAL(a1.data(), &att[b * s.H * TT], s.H * TT, ("att, sequence alone " + s.str()).c_str());
      CHECK_BITWISE_EQUAL(o1.data(), &out[b * s.T * od], s.T * od, ("out, sequence alone " + s.str()).c_str());
      CHECK_BITWISE_EQUAL(g1.data(), &g[b * s.T * ld], s.T * ld, ("grad_qkv, sequence alone " + s.str()).c_str());
    }
    for (const std::vector<float>* v : {&att, &out, &g}) hash = fnv1a(hash, *v);
  }
  std::printf("    checksum %016llx (must not depend on PPO_MAX_THREADS)\n",
              static_cast<unsigned long long>(hash));
}

// ---- errors --------------------------------------------------------------------------------

TEST(attention_argument_errors) {
  using ppo::ErrorCode;
  const int64_t B = 2, T = 3, H = 4, KVH = 2, hs = 2;
  const Shape s{B, T, H, KVH, hs};
  std::vector<float> qkv(s.qkv_size(), 0.5f), att(s.att_size()), out(s.out_size()), g(qkv.size());
  std::vector<float> kc(B * 5 * s.kvd()), vc(B * 5 * s.kvd()), dec_out(B * s.od());
  const int32_t ok_len[2] = {3, 1}, neg_len[2] = {3, -1}, long_len[2] = {4, 1};
  float* q = qkv.data();
  float* a = att.data();
  float* o = out.data();

  CHECK_THROWS_CODE(attention_forward(-1, T, H, KVH, hs, nullptr, q, a, o), ErrorCode::InvalidArgument, "B");
  CHECK_THROWS_CODE(attention_forward(B, -1, H, KVH, hs, nullptr, q, a, o), ErrorCode::InvalidArgument, "T");
  CHECK_THROWS_CODE(attention_forward(B, T, 0, KVH, hs, nullptr, q, a, o), ErrorCode::InvalidArgument, "heads");
  CHECK_THROWS_CODE(attention_forward(B, T, -2, KVH, hs, nullptr, q, a, o), ErrorCode::InvalidArgument, "heads");
  CHECK_THROWS_CODE(attention_forward(B, T, H, 0, hs, nullptr, q, a, o), ErrorCode::InvalidArgument, "kv_heads");
  CHECK_THROWS_CODE(attention_forward(B, T, H, -1, hs, nullptr, q, a, o), ErrorCode::InvalidArgument, "kv_heads");
  CHECK_THROWS_CODE(attention_forward(B, T, H, 3, hs, nullptr, q, a, o), ErrorCode::InvalidArgument, "kv_heads");
  CHECK_THROWS_CODE(attention_forward(B, T, 6, 4, hs, nullptr, q, a, o), ErrorCode::InvalidArgument, "kv_heads");
  CHECK_THROWS_CODE(attention_forward(B, T, 2, 4, hs, nullptr, q, a, o), ErrorCode::InvalidArgument, "kv_heads");
  CHECK_THROWS_CODE(attention_forward(B, T, H, KVH, 0, nullptr, q, a, o), ErrorCode::InvalidArgument, "head_size");
  CHECK_THROWS_CODE(attention_forward(B, T, H, KVH, -4, nullptr, q, a, o), ErrorCode::InvalidArgument, "head_size");
  CHECK_THROWS_CODE(attention_forward(B, T, H, KVH, hs, nullptr, nullptr, a, o), ErrorCode::InvalidArgument, "qkv");
  CHECK_THROWS_CODE(attention_forward(B, T, H, KVH, hs, nullptr, q, a, nullptr), ErrorCode::InvalidArgument, "out");
  std::fill(out.begin(), out.end(), tu::kNaN);
  CHECK_THROWS_CODE(attention_forward(B, T, H, KVH, hs, neg_len, q, a, o), ErrorCode::InvalidArgument, "lengths");
  CHECK_THROWS_CODE(attention_forward(B, T, H, KVH, hs, long_len, q, a, o), ErrorCode::InvalidArgument, "lengths");
  CHECK_THROWS_CODE(attention_forward(B, T, H, 3, hs, ok_len, q, a, o), ErrorCode::InvalidArgument, "kv_heads");
  bool untouched = true;  // validation happens before anything is written
  for (float x : out) untouched = untouched && std::isnan(x);
  CHECK(untouched);
  CHECK_NO_THROW(attention_forward(B, T, H, KVH, hs, ok_len, q, nullptr, o));
  CHECK_NO_THROW(attention_forward(B, T, 2, 1, hs, ok_len, q, nullptr, o));  // multi-query
  CHECK_NO_THROW(attention_forward(0, T, H, KVH, hs, nullptr, nullptr, nullptr, nullptr));
  CHECK_NO_THROW(attention_forward(B, 0, H, KVH, hs, nullptr, nullptr, nullptr, nullptr));
  CHECK_NO_THROW(attention_forward(0, T, 0, 0, 0, nullptr, nullptr, nullptr, nullptr));  // no work

  const float* d = out.data();
  std::fill(out.begin(), out.end(), 0.25f);
  CHECK_THROWS_CODE(attention_backward(-1, T, H, KVH, hs, nullptr, d, q, a, g.data()), ErrorCode::InvalidArgument, "B");
  CHECK_THROWS_CODE(attention_backward(B, -1, H, KVH, hs, nullptr, d, q, a, g.data()), ErrorCode::InvalidArgument, "T");
  CHECK_THROWS_CODE(attention_backward(B, T, 0, KVH, hs, nullptr, d, q, a, g.data()), ErrorCode::InvalidArgument, "heads");
  CHECK_THROWS_CODE(attention_backward(B, T, H, 0, hs, nullptr, d, q, a, g.data()), ErrorCode::InvalidArgument, "kv_heads");
  CHECK_THROWS_CODE(attention_backward(B, T, H, 3, hs, nullptr, d, q, a, g.data()), ErrorCode::InvalidArgument, "kv_heads");
  CHECK_THROWS_CODE(attention_backward(B, T, H, KVH, 0, nullptr, d, q, a, g.data()), ErrorCode::InvalidArgument, "head_size");
  CHECK_THROWS_CODE(attention_backward(B, T, H, KVH, hs, nullptr, nullptr, q, a, g.data()), ErrorCode::InvalidArgument, "grad_out");
  CHECK_THROWS_CODE(attention_backward(B, T, H, KVH, hs, nullptr, d, nullptr, a, g.data()), ErrorCode::InvalidArgument, "qkv");
  CHECK_THROWS_CODE(attention_backward(B, T, H, KVH, hs, nullptr, d, q, nullptr, g.data()), ErrorCode::InvalidArgument, "att");
  CHECK_THROWS_CODE(attention_backward(B, T, H, KVH, hs, nullptr, d, q, a, nullptr), ErrorCode::InvalidArgument, "grad_qkv");
  CHECK_THROWS_CODE(attention_backward(B, T, H, KVH, hs, long_len, d, q, a, g.data()), ErrorCode::InvalidArgument, "lengths");
  CHECK_NO_THROW(attention_backward(0, T, H, KVH, hs, nullptr, nullptr, nullptr, nullptr, nullptr));

  CHECK_THROWS_CODE(kv_cache_store(-1, T, H, KVH, hs, nullptr, q, 5, kc.data(), vc.data()), ErrorCode::InvalidArgument, "B");
  CHECK_THROWS_CODE(kv_cache_store(B, -1, H, KVH, hs, nullptr, q, 5, kc.data(), vc.data()), ErrorCode::InvalidArgument, "T");
  CHECK_THROWS_CODE(kv_cache_store(B, T, -1, KVH, hs, nullptr, q, 5, kc.data(), vc.data()), ErrorCode::InvalidArgument, "heads");
  CHECK_THROWS_CODE(kv_cache_store(B, T, H, 0, hs, nullptr, q, 5, kc.data(), vc.data()), ErrorCode::InvalidArgument, "kv_heads");
  CHECK_THROWS_CODE(kv_cache_store(B, T, H, 3, hs, nullptr, q, 5, kc.data(), vc.data()), ErrorCode::InvalidArgument, "kv_heads");
  CHECK_THROWS_CODE(kv_cache_store(B, T, H, KVH, -1, nullptr, q, 5, kc.data(), vc.data()), ErrorCode::InvalidArgument, "head_size");
  CHECK_THROWS_CODE(kv_cache_store(B, T, H, KVH, hs, nullptr, q, 2, kc.data(), vc.data()), ErrorCode::InvalidArgument, "cache_T");
  CHECK_THROWS_CODE(kv_cache_store(B, T, H, KVH, hs, neg_len, q, 5, kc.data(), vc.data()), ErrorCode::InvalidArgument, "lengths");
  CHECK_THROWS_CODE(kv_cache_store(B, T, H, KVH, hs, nullptr, nullptr, 5, kc.data(), vc.data()), ErrorCode::InvalidArgument, "qkv");
  CHECK_THROWS_CODE(kv_cache_store(B, T, H, KVH, hs, nullptr, q, 5, nullptr, vc.data()), ErrorCode::InvalidArgument, "k_cache");
  CHECK_THROWS_CODE(kv_cache_store(B, T, H, KVH, hs, nullptr, q, 5, kc.data(), nullptr), ErrorCode::InvalidArgument, "v_cache");
  CHECK_NO_THROW(kv_cache_store(B, T, H, KVH, hs, ok_len, q, 5, kc.data(), vc.data()));
  CHECK_NO_THROW(kv_cache_store(0, T, H, KVH, hs, nullptr, nullptr, 5, nullptr, nullptr));

  const int32_t pos_ok[2] = {4, -1}, pos_far[2] = {5, 0}, pos_done[2] = {-1, -3};
  float* dq = dec_out.data();
  CHECK_THROWS_CODE(attention_decode(-1, H, KVH, hs, pos_ok, q, 5, kc.data(), vc.data(), dq), ErrorCode::InvalidArgument, "B");
  CHECK_THROWS_CODE(attention_decode(B, 0, KVH, hs, pos_ok, q, 5, kc.data(), vc.data(), dq), ErrorCode::InvalidArgument, "heads");
  CHECK_THROWS_CODE(attention_decode(B, H, 0, hs, pos_ok, q, 5, kc.data(), vc.data(), dq), ErrorCode::InvalidArgument, "kv_heads");
  CHECK_THROWS_CODE(attention_decode(B, 6, 4, hs, pos_ok, q, 5, kc.data(), vc.data(), dq), ErrorCode::InvalidArgument, "kv_heads");
  CHECK_THROWS_CODE(attention_decode(B, H, KVH, 0, pos_ok, q, 5, kc.data(), vc.data(), dq), ErrorCode::InvalidArgument, "head_size");
  CHECK_THROWS_CODE(attention_decode(B, H, KVH, hs, nullptr, q, 5, kc.data(), vc.data(), dq), ErrorCode::InvalidArgument, "positions");
  CHECK_THROWS_CODE(attention_decode(B, H, KVH, hs, pos_far, q, 5, kc.data(), vc.data(), dq), ErrorCode::InvalidArgument, "positions");
  CHECK_THROWS_CODE(attention_decode(B, H, KVH, hs, pos_ok, q, -1, kc.data(), vc.data(), dq), ErrorCode::InvalidArgument, "cache_T");
  CHECK_THROWS_CODE(attention_decode(B, H, KVH, hs, pos_ok, nullptr, 5, kc.data(), vc.data(), dq), ErrorCode::InvalidArgument, "qkv");
  CHECK_THROWS_CODE(attention_decode(B, H, KVH, hs, pos_ok, q, 5, nullptr, vc.data(), dq), ErrorCode::InvalidArgument, "k_cache");
  CHECK_THROWS_CODE(attention_decode(B, H, KVH, hs, pos_ok, q, 5, kc.data(), nullptr, dq), ErrorCode::InvalidArgument, "v_cache");
  CHECK_THROWS_CODE(attention_decode(B, H, KVH, hs, pos_ok, q, 5, kc.data(), vc.data(), nullptr), ErrorCode::InvalidArgument, "out");
  // Every sequence finished: the cache is not touched, so it may be absent.
  std::fill(dec_out.begin(), dec_out.end(), tu::kNaN);
  CHECK_NO_THROW(attention_decode(B, H, KVH, hs, pos_done, q, 5, nullptr, nullptr, dq));
  for (float x : dec_out) CHECK(x == 0.0f);
  CHECK_NO_THROW(attention_decode(0, H, KVH, hs, nullptr, nullptr, 5, nullptr, nullptr, nullptr));
}

// ---- timing (printed, not asserted) --------------------------------------------------------

TEST(attention_timing_model_shapes) {
  // The attention of one layer in the training step of the 6-layer width-384 model
  // (B=8, T=128, 6 heads of 64), of GPT-2 124M (B=4, T=64, 12 heads of 64) and of a
  // grouped-query layer (B=4, T=128, 8 query heads sharing 2 kv heads of 64): best of a
  // few calls.
  tu::Rng rng(51);
  const Shape shapes[] = {{8, 128, 6, 6, 64}, {4, 64, 12, 12, 64}, {4, 128, 8, 2, 64}};
  for (const Shape& s : shapes) {
    std::vector<float> qkv = tu::normal(rng, s.qkv_size()), dout = tu::normal(rng, s.out_size());
    std::vector<float> att(s.att_size()), out(s.out_size()), g(s.qkv_size(), 0.0f);
    auto best_ms = [](auto&& fn) {
      double best = 1e30;
      for (int rep = 0; rep < 5; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        fn();
        best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      return best;
    };
    const double fwd = best_ms([&] { attention_forward(s.B, s.T, s.H, s.KVH, s.hs, nullptr, qkv.data(), att.data(), out.data()); });
    const double fwd_no_att = best_ms([&] { attention_forward(s.B, s.T, s.H, s.KVH, s.hs, nullptr, qkv.data(), nullptr, out.data()); });
    const double bwd = best_ms([&] { attention_backward(s.B, s.T, s.H, s.KVH, s.hs, nullptr, dout.data(), qkv.data(), att.data(), g.data()); });
    CHECK(std::isfinite(out[0]) && std::isfinite(g[0]));
    std::printf("    %s [%s, %d threads]: forward %.3f ms (without att %.3f ms), backward %.3f ms\n",
                s.str().c_str(), ppo::cpu::attention_isa(), ppo::cpu_thread_count(), fwd, fwd_no_att, bwd);
  }
}

PPO_TEST_MAIN()
