// ppo::model sampling (csrc/model/sampling.h): the Rng against an independent
// transcription of splitmix64 / xoshiro256** (itself checked on the published reference
// outputs) and statistical checks of its streams; sample_token against a float64
// reference of the processed distribution (penalty, greedy, temperature, top-k, top-p,
// inverse CDF in the header's order):
//   - same-u checks: the uniform a call draws is read from a copy of the rng, and the
//     token the kernel returns must be the one the reference's inverse CDF gives for that
//     u, up to the float error of the kernel's weights (a mismatch is only allowed when u
//     is within the error bound of a boundary of the kernel's token's reference interval);
//   - frequencies over 200k draws against the reference probabilities (chi-square bound);
//   - greedy, top-k = 1, -inf tokens, the repetition penalty, argument errors.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "model/sampling.h"
#include "test_framework.h"
#include "test_util.h"

namespace {

using ppo::model::Rng;
using ppo::model::sample_token;
using ppo::model::SamplingParams;

const float kNegInf = -std::numeric_limits<float>::infinity();

// ---- independent transcriptions of the generators (Vigna's reference C code) ---------

uint64_t ref_splitmix64(uint64_t& x) {
  x += 0x9e3779b97f4a7c15ull;
  uint64_t z = x;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t ref_fmix64(uint64_t k) {  // MurmurHash3
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdull;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ull;
  k ^= k >> 33;
  return k;
}

struct RefXoshiro {
  uint64_t s[4];
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t next() {
    const uint64_t result = rotl(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
  }
};

// The header's seeding: x = seed ^ fmix64(stream), state = 4 successive splitmix64(x).
RefXoshiro ref_seeded(uint64_t seed, uint64_t stream) {
  RefXoshiro r;
  uint64_t x = seed ^ ref_fmix64(stream);
  for (uint64_t& w : r.s) w = ref_splitmix64(x);
  return r;
}

// ---- float64 reference of sample_token's distribution -------------------------------
//
// Error bounds. The kernel's weight of token i, exp((l_i - max) / T) in float, carries a
// relative error eps_i <= (2 |z_i| + 3) u, z_i = (l_i - max) / T, u = 2^-24 (the roundings
// of l - max and of the division are each relative to z and pass through exp as |z| u;
// fast_exp's own error ~2 ulp; the top token's weight is exactly 1). A cumulative
// probability F_j = sum_{i<=j} w_i / sum_i w_i then moves by at most
//   (1 - F_j) sum_{i<=j} p_i eps_i + F_j sum_{i>j} p_i eps_i
// (first order); the checks allow twice that plus 1e-11 (the double sums over up to 5e4
// terms). Near F = 0 or 1 the bound is tiny, so cuts in the far tail are checked exactly.

constexpr double kU = 1.0 / 16777216.0;

struct RefDist {
  std::vector<float> penalized_logits;  // after step 1 (float: the contract's arithmetic)
  int32_t greedy = -1;
  std::vector<int32_t> order;           // the inverse-CDF order of the sampled tokens
  std::vector<double> lo, hi;           // each one's interval [lo, hi) in [0, 1)
  std::vector<double> lo_err, hi_err;   // bounds on the kernel's error at lo and hi
  std::vector<double> prob_of;          // [vocab] probability of each id (0: never)
  bool top_p_ambiguous = false;         // a cumulative value within its error of top_p
};

// F_j and its error bound for the tokens `ids` in this order (weights w, errors eps).
void cumulative_with_error(const std::vector<int32_t>& ids, const std::vector<double>& w,
                           const std::vector<double>& eps, std::vector<double>& F,
                           std::vector<double>& err) {
  double s = 0.0, pe_total = 0.0;
  for (int32_t id : ids) s += w[id];
  for (int32_t id : ids) pe_total += w[id] / s * eps[id];
  F.clear(), err.clear();
  double cum = 0.0, pe = 0.0;
  for (int32_t id : ids) {
    cum += w[id] / s;
    pe += w[id] / s * eps[id];
    F.push_back(cum);
    err.push_back(2.0 * ((1.0 - cum) * pe + cum * (pe_total - pe)) + 1e-11);
  }
}

RefDist reference(const std::vector<float>& logits, const SamplingParams& sp,
                  const std::vector<int32_t>& penalized) {
  const int64_t V = static_cast<int64_t>(logits.size());
  RefDist r;
  std::vector<float> l = logits;
  if (sp.repetition_penalty != 1.0f) {
    const std::set<int32_t> distinct(penalized.begin(), penalized.end());
    for (int32_t id : distinct)
      l[id] = l[id] < 0.0f ? l[id] * sp.repetition_penalty : l[id] / sp.repetition_penalty;
  }
  r.penalized_logits = l;
  r.greedy = static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());  // first max

  std::vector<int32_t> ranking(V);
  for (int64_t i = 0; i < V; ++i) ranking[i] = static_cast<int32_t>(i);
  std::stable_sort(ranking.begin(), ranking.end(),
                   [&](int32_t a, int32_t b) { return l[a] > l[b]; });  // ties: lower id first
  const double m = l[ranking[0]], T = sp.temperature;
  std::vector<double> w(V), eps(V);
  for (int64_t i = 0; i < V; ++i) {
    const double z = (static_cast<double>(l[i]) - m) / T;
    w[i] = std::exp(z);  // 0 for -inf
    eps[i] = w[i] > 0.0 ? (2.0 * std::fabs(z) + 3.0) * kU : 0.0;
  }
  const bool use_k = sp.top_k > 0 && sp.top_k < V, use_p = sp.top_p < 1.0f;
  std::vector<int32_t> kept = ranking;
  if (use_k) kept.resize(sp.top_k);
  std::vector<double> F, err;
  if (use_p) {
    cumulative_with_error(kept, w, eps, F, err);
    for (size_t j = 0; j < kept.size(); ++j) {
      if (std::fabs(F[j] - sp.top_p) <= err[j]) r.top_p_ambiguous = true;
      if (F[j] >= sp.top_p) {
        kept.resize(j + 1);
        break;
      }
    }
  }
  if (use_k || use_p) {
    r.order = kept;
  } else {
    r.order.resize(V);
    for (int64_t i = 0; i < V; ++i) r.order[i] = static_cast<int32_t>(i);
  }
  cumulative_with_error(r.order, w, eps, F, err);
  r.prob_of.assign(V, 0.0);
  for (size_t j = 0; j < r.order.size(); ++j) {
    r.lo.push_back(j == 0 ? 0.0 : F[j - 1]);
    r.hi.push_back(F[j]);
    r.lo_err.push_back(j == 0 ? 0.0 : err[j - 1]);
    r.hi_err.push_back(err[j]);
    r.prob_of[r.order[j]] = r.hi[j] - r.lo[j];
  }
  return r;
}

// The reference token for a uniform u: the first in order whose interval holds u.
int32_t reference_pick(const RefDist& r, double u) {
  for (size_t j = 0; j < r.order.size(); ++j)
    if (u < r.hi[j] && r.hi[j] > r.lo[j]) return r.order[j];
  for (size_t j = r.order.size(); j-- > 0;)
    if (r.hi[j] > r.lo[j]) return r.order[j];
  return -1;
}

// Whether u lies in the reference interval of `tok` widened by the error bounds of its
// two ends (false if tok has no interval).
bool u_fits_token(const RefDist& r, int32_t tok, double u) {
  for (size_t j = 0; j < r.order.size(); ++j)
    if (r.order[j] == tok)
      return r.hi[j] > r.lo[j] && u >= r.lo[j] - r.lo_err[j] && u < r.hi[j] + r.hi_err[j];
  return false;
}

// Random logits: normal(0, scale), about 5% -inf (never all), about 10% exact ties.
std::vector<float> make_logits(tu::Rng& rng, int64_t V, double scale) {
  std::vector<float> l = tu::normal(rng, V, 0.0, scale);
  for (int64_t i = 0; i < V; ++i) {
    const int64_t r = tu::rand_int(rng, 0, 99);
    if (r < 5 && V > 1) l[i] = kNegInf;
    else if (r < 15 && i > 0) l[i] = l[tu::rand_int(rng, 0, i - 1)];
  }
  if (std::all_of(l.begin(), l.end(), [](float x) { return x == kNegInf; })) l[0] = 0.5f;
  return l;
}

struct Combo {
  float temperature;
  int64_t top_k;  // >= 0; -1: vocab - 1, -2: vocab, -3: vocab + 3
  float top_p, penalty;
};

struct Totals {
  int64_t draws = 0, mismatches = 0, configs = 0, skipped = 0;
};

// Runs `draws` same-u checks of one configuration (see the file comment and the error
// bounds above the reference).
void same_u_checks(const std::vector<float>& logits, const SamplingParams& sp,
                   const std::vector<int32_t>& pen, uint64_t seed, int64_t draws, Totals& tot,
                   const std::string& what) {
  const int64_t V = static_cast<int64_t>(logits.size());
  const RefDist ref = reference(logits, sp, pen);
  ++tot.configs;
  // The nucleus cut compares cumulative probabilities with top_p: only checkable when no
  // cumulative value up to the cut lies within its error bound of top_p.
  if (ref.top_p_ambiguous) {
    ++tot.skipped;
    return;
  }
  std::vector<float> row(V), scratch(2 * V);
  Rng rng(seed, 7);
  for (int64_t d = 0; d < draws; ++d) {
    row = logits;
    Rng probe = rng;
    const double u = probe.uniform();
    const int32_t tok =
        sample_token(row.data(), V, sp, pen.data(), static_cast<int64_t>(pen.size()), rng,
                     scratch.data());
    ++tot.draws;
    const std::string ctx = what + " draw " + std::to_string(d) + " u=" + tf::fmt_double(u) +
                            " tok=" + std::to_string(tok);
    CHECK_NEAR_CTX(probe.next_u64(), rng.next_u64(), 0.0, 0.0, "one draw per call " + ctx);
    if (!tf::check(tok >= 0 && tok < V, __FILE__, __LINE__, ("token id in range " + ctx).c_str()))
      continue;
    tf::check(ref.prob_of[tok] > 0.0 && row[tok] != kNegInf, __FILE__, __LINE__,
              ("token has reference probability > 0 " + ctx).c_str());
    tf::check(u_fits_token(ref, tok, u), __FILE__, __LINE__, ("u within the token's interval " + ctx).c_str());
    if (tok != reference_pick(ref, u)) ++tot.mismatches;
    if (d == 0)
      CHECK_BITWISE_EQUAL(row.data(), ref.penalized_logits.data(), V, "logits after the call");
  }
}

}  // namespace

// ---- Rng -----------------------------------------------------------------------------

TEST(rng_reference_generators_match_published_outputs) {
  // xoshiro256** from the state {1, 2, 3, 4} (Vigna's reference; also the rand_xoshiro
  // test vector) and splitmix64 from 0 and from 1234567.
  RefXoshiro x{{1, 2, 3, 4}};
  const uint64_t want_x[] = {11520ull,
                             0ull,
                             1509978240ull,
                             1215971899390074240ull,
                             1216172134540287360ull,
                             607988272756665600ull,
                             16172922978634559625ull,
                             8476171486693032832ull,
                             10595114339597558777ull,
                             2904607092377533576ull};
  for (uint64_t w : want_x) CHECK(x.next() == w);
  uint64_t s0 = 0;
  CHECK(ref_splitmix64(s0) == 0xE220A8397B1DCDAFull);
  CHECK(ref_splitmix64(s0) == 0x6E789E6AA1B965F4ull);
  CHECK(ref_splitmix64(s0) == 0x06C45D188009454Full);
  uint64_t s1 = 1234567;
  const uint64_t want_s[] = {6457827717110365317ull, 3203168211198807973ull,
                             9817491932198370423ull, 4593380528125082431ull,
                             16408922859458223821ull};
  for (uint64_t w : want_s) CHECK(ref_splitmix64(s1) == w);
  CHECK(ref_fmix64(0) == 0);
}

TEST(rng_is_xoshiro256starstar_seeded_as_documented) {
  const uint64_t seeds[] = {0, 1, 42, 0xDEADBEEFCAFEBABEull, ~0ull};
  const uint64_t streams[] = {0, 1, 2, 1000, ~0ull};
  for (uint64_t seed : seeds)
    for (uint64_t stream : streams) {
      Rng rng(seed, stream);
      RefXoshiro ref = ref_seeded(seed, stream);
      for (int k = 0; k < 20; ++k) CHECK(rng.next_u64() == ref.next());
      // uniform() is the top 53 bits of the next output, scaled by 2^-53.
      const double u = rng.uniform();
      CHECK(u == static_cast<double>(ref.next() >> 11) * 0x1.0p-53);
    }
}

TEST(rng_streams_are_deterministic_and_independent) {
  // Same (seed, stream): the same sequence. Different streams or seeds: different
  // sequences; no two of 64 x 64 (seed, stream) pairs share a first output.
  Rng a(123, 5), b(123, 5), c(123, 6), d(124, 5);
  int same_c = 0, same_d = 0;
  for (int k = 0; k < 1000; ++k) {
    const uint64_t x = a.next_u64();
    CHECK(x == b.next_u64());
    same_c += x == c.next_u64();
    same_d += x == d.next_u64();
  }
  CHECK(same_c == 0);
  CHECK(same_d == 0);
  std::set<uint64_t> firsts;
  for (uint64_t seed = 0; seed < 64; ++seed)
    for (uint64_t stream = 0; stream < 64; ++stream) firsts.insert(Rng(seed, stream).next_u64());
  CHECK(firsts.size() == 64u * 64u);

  // Statistics over N = 1e6 uniforms of one stream: mean within 5 sigma (sigma =
  // sqrt(1/12/N)); 32-bin histogram chi-square < 31 + 5 sqrt(62) + 10 (~ p 1e-6); each
  // of the 64 output bits set within 5 sigma of N/2; every u in [0, 1) and a multiple
  // of 2^-53. Adjacent streams: |Pearson r| of their uniforms < 5 / sqrt(N2), N2 = 2e5.
  const int64_t N = 1000000;
  Rng r(2024, 0);
  double sum = 0.0;
  std::vector<int64_t> bins(32, 0), ones(64, 0);
  bool in_range = true, on_grid = true;
  for (int64_t i = 0; i < N; ++i) {
    Rng peek = r;
    const uint64_t bits = peek.next_u64();
    for (int k = 0; k < 64; ++k) ones[k] += (bits >> k) & 1u;
    const double u = r.uniform();
    in_range = in_range && u >= 0.0 && u < 1.0;
    on_grid = on_grid && std::ldexp(u, 53) == std::floor(std::ldexp(u, 53));
    sum += u;
    ++bins[static_cast<int>(u * 32)];
  }
  CHECK(in_range);
  CHECK(on_grid);
  CHECK_NEAR(sum / N, 0.5, 5.0 * std::sqrt(1.0 / 12.0 / N), 0.0);
  double chi2 = 0.0;
  for (int64_t c : bins) chi2 += (c - N / 32.0) * (c - N / 32.0) / (N / 32.0);
  CHECK(chi2 < 31.0 + 5.0 * std::sqrt(62.0) + 10.0);
  for (int k = 0; k < 64; ++k)
    CHECK_NEAR_CTX(static_cast<double>(ones[k]), N / 2.0, 5.0 * std::sqrt(N / 4.0), 0.0,
                   "bit " + std::to_string(k));
  const int64_t N2 = 200000;
  Rng s0(99, 0), s1(99, 1);
  double sx = 0, sy = 0, sxx = 0, syy = 0, sxy = 0;
  for (int64_t i = 0; i < N2; ++i) {
    const double x = s0.uniform(), y = s1.uniform();
    sx += x, sy += y, sxx += x * x, syy += y * y, sxy += x * y;
  }
  const double cov = sxy / N2 - (sx / N2) * (sy / N2);
  const double corr = cov / std::sqrt((sxx / N2 - sx * sx / N2 / N2) * (syy / N2 - sy * sy / N2 / N2));
  CHECK_NEAR(corr, 0.0, 5.0 / std::sqrt(static_cast<double>(N2)), 0.0);
}

// ---- sample_token: exact checks against the reference ---------------------------------

TEST(sample_token_matches_reference_inverse_cdf) {
  // Every processor and their combinations, on vocabularies from 1 to GPT-2's, logits
  // with -inf entries and exact ties, penalized lists with repeated ids.
  const Combo combos[] = {
      {1.0f, 0, 1.0f, 1.0f},     {0.7f, 0, 1.0f, 1.3f},    {1.5f, 5, 1.0f, 1.0f},
      {1.0f, 1, 1.0f, 1.0f},     {1.0f, -1, 1.0f, 1.0f},   {1.0f, -2, 1.0f, 1.0f},
      {1.0f, -3, 1.0f, 0.8f},    {0.8f, 0, 0.9f, 1.0f},    {2.5f, 0, 0.5f, 0.8f},
      {1.0f, 0, 1e-6f, 1.0f},    {1.0f, 40, 0.95f, 1.2f},  {0.3f, 0, 0.999f, 1.0f},
      {1e-3f, 0, 1.0f, 1.0f},    {1e3f, 0, 0.5f, 1.0f},    {1.0f, 3, 0.6f, 2.0f},
      {0.9f, -1, 0.8f, 1.1f}};
  const int64_t vocabs[] = {1, 2, 7, 100, 1000, 50257};
  tu::Rng rng(301);
  Totals tot;
  uint64_t seed = 1;
  for (int64_t V : vocabs) {
    for (const Combo& c : combos) {
      const std::vector<float> logits = make_logits(rng, V, V > 1000 ? 3.0 : 2.0);
      SamplingParams sp;
      sp.temperature = c.temperature;
      sp.top_k = c.top_k >= 0 ? c.top_k : c.top_k == -1 ? std::max<int64_t>(V - 1, 1)
                                      : c.top_k == -2 ? V : V + 3;
      sp.top_p = c.top_p;
      sp.repetition_penalty = c.penalty;
      std::vector<int32_t> pen;
      const int64_t n_pen = std::min<int64_t>(200, V / 10 + 3);
      for (int64_t k = 0; k < n_pen; ++k) pen.push_back(static_cast<int32_t>(tu::rand_int(rng, 0, V - 1)));
      if (V > 1) pen.push_back(pen[0]);  // a repeat for sure
      const std::string what = "V=" + std::to_string(V) + " T=" + tf::fmt_double(c.temperature) +
                               " k=" + std::to_string(sp.top_k) + " p=" + tf::fmt_double(c.top_p) +
                               " pen=" + tf::fmt_double(c.penalty);
      same_u_checks(logits, sp, pen, seed++, V > 1000 ? 20 : 200, tot, what);
    }
  }
  std::printf("    %lld draws over %lld configurations (%lld skipped: ambiguous nucleus cut), "
              "%lld picks differ from the reference (each within the error of a boundary)\n",
              static_cast<long long>(tot.draws), static_cast<long long>(tot.configs),
              static_cast<long long>(tot.skipped), static_cast<long long>(tot.mismatches));
  CHECK(tot.skipped * 10 < tot.configs);
  CHECK(tot.mismatches * 200 <= tot.draws);  // boundary cases stay rare (< 0.5%)
}

TEST(sample_token_top_p_cut_depths) {
  // Top-p alone finds the nucleus with a mass histogram over quarter-temperature bins of
  // the logit, then sorts the tokens of the bins up to the cut. Rows of 50257 tokens: one
  // at 0 (id 777), `count` tied ones at -gap (the kept ones among them are the lowest
  // ids), the rest -inf, so that the cut falls at different depths, among ties, with the
  // cut well clear of every cumulative value (checked: nothing skipped).
  struct Tier {
    float gap;
    int64_t count;
    float top_p, temperature;
  };
  const Tier tiers[] = {
      {1.0f, 20, 0.9f, 1.0f},          // z = 1: all 21 tokens, cut among the ties
      {5.0f, 1000, 0.5f, 1.0f},        // z = 5: top token holds 0.13
      {10.0f, 5000, 0.9f, 1.0f},       // z = 10: top token holds 0.815
      {17.0f, 10, 0.99999994f, 1.0f},  // z = 17: top holds 1 - 4.1e-7 < top_p = 1 - 6e-8
      {36.0f, 20, 0.99999994f, 2.0f},  // z = 18 at T = 2
      {3.0f, 50256, 0.3f, 1.0f}};      // a whole vocabulary of ties (sorts 50257 ids)
  const int64_t V = 50257;
  Totals tot;
  uint64_t seed = 100;
  for (const Tier& t : tiers) {
    std::vector<float> logits(V, kNegInf);
    int64_t placed = 0;
    for (int64_t i = 0; i < V && placed < t.count; ++i)
      if (i != 777) logits[i] = -t.gap, ++placed;
    logits[777] = 0.0f;
    SamplingParams sp;
    sp.top_p = t.top_p;
    sp.temperature = t.temperature;
    same_u_checks(logits, sp, {}, seed++, t.count > 10000 ? 20 : 200, tot, "gap " + tf::fmt_double(t.gap));
  }
  CHECK(tot.skipped == 0);
  CHECK(tot.mismatches * 100 <= tot.draws);
}

// ---- sample_token: frequencies ---------------------------------------------------------

TEST(sample_token_frequencies_match_reference) {
  // 200k draws per configuration on a 12-token row with ties and -inf. Chi-square over
  // the tokens with reference probability > 0 (df = K - 1 <= 11) must stay below
  // df + 6 sqrt(2 df) + 10 (p < 1e-5 for every df here); tokens with probability 0 must
  // never be drawn.
  const std::vector<float> logits = {1.0f, 2.0f, 2.0f, kNegInf, 0.5f, -1.0f,
                                     3.0f, 0.0f, 2.0f, -0.5f,   kNegInf, 1.5f};
  const int64_t V = static_cast<int64_t>(logits.size());
  const std::vector<int32_t> pen = {6, 6, 1, 9};
  const Combo combos[] = {{1.0f, 0, 1.0f, 1.0f}, {0.5f, 4, 1.0f, 1.0f}, {1.0f, 0, 0.7f, 1.0f},
                          {1.3f, 6, 0.8f, 1.5f}, {2.0f, 0, 1.0f, 0.7f}};
  const int64_t N = 200000;
  uint64_t stream = 0;
  for (const Combo& c : combos) {
    SamplingParams sp;
    sp.temperature = c.temperature, sp.top_k = c.top_k, sp.top_p = c.top_p;
    sp.repetition_penalty = c.penalty;
    const RefDist ref = reference(logits, sp, pen);
    std::vector<int64_t> counts(V, 0);
    std::vector<float> row(V), scratch(2 * V);
    Rng rng(77, stream++);
    for (int64_t d = 0; d < N; ++d) {
      row = logits;
      ++counts[sample_token(row.data(), V, sp, pen.data(), 4, rng, scratch.data())];
    }
    double chi2 = 0.0;
    int64_t K = 0;
    for (int64_t i = 0; i < V; ++i) {
      const double e = N * ref.prob_of[i];
      if (ref.prob_of[i] > 0.0) {
        ++K;
        chi2 += (counts[i] - e) * (counts[i] - e) / e;
      } else {
        CHECK_NEAR_CTX(static_cast<double>(counts[i]), 0.0, 0.0, 0.0,
                       "token " + std::to_string(i) + " outside the kept set");
      }
    }
    const double df = static_cast<double>(K - 1);
    const std::string what = "T=" + tf::fmt_double(c.temperature) + " k=" + std::to_string(c.top_k) +
                             " p=" + tf::fmt_double(c.top_p) + " chi2=" + tf::fmt_double(chi2) +
                             " df=" + tf::fmt_double(df);
    tf::check(chi2 < df + 6.0 * std::sqrt(2.0 * df) + 10.0, __FILE__, __LINE__, what.c_str());
  }
}

// ---- sample_token: greedy, top-k = 1, -inf, penalty -------------------------------------

TEST(greedy_and_top_k_one) {
  tu::Rng rng(302);
  std::vector<float> scratch(2 * 1000);
  for (int rep = 0; rep < 50; ++rep) {
    const int64_t V = tu::rand_int(rng, 1, 1000);
    std::vector<float> logits = make_logits(rng, V, 2.0);
    // An exact tie at the max, at a random higher id.
    const int64_t top = std::max_element(logits.begin(), logits.end()) - logits.begin();
    if (V > 1) logits[tu::rand_int(rng, top, V - 1)] = logits[top];
    SamplingParams g;
    g.greedy = true;
    g.temperature = 0.5f;
    Rng r(5, rep), before = r;
    std::vector<float> row = logits;
    CHECK(sample_token(row.data(), V, g, nullptr, 0, r, scratch.data()) == top);
    CHECK(r.next_u64() == before.next_u64());  // greedy draws nothing
    // top_k = 1 at any temperature (and top_p tiny) picks the same token.
    for (float T : {0.1f, 1.0f, 10.0f}) {
      SamplingParams k1;
      k1.top_k = 1, k1.temperature = T;
      row = logits;
      CHECK(sample_token(row.data(), V, k1, nullptr, 0, r, scratch.data()) == top);
      SamplingParams p0;
      p0.top_p = 1e-7f, p0.temperature = T;
      row = logits;
      CHECK(sample_token(row.data(), V, p0, nullptr, 0, r, scratch.data()) == top);
    }
  }
  // Greedy on penalized logits: the top token, penalized, loses to the runner-up.
  const float l[4] = {1.0f, 3.0f, 2.5f, -1.0f};
  std::vector<float> row(l, l + 4);
  SamplingParams g;
  g.greedy = true;
  g.repetition_penalty = 1.5f;
  const int32_t pen[2] = {1, 1};
  Rng r(1, 1);
  CHECK(sample_token(row.data(), 4, g, pen, 2, r, scratch.data()) == 2);
  CHECK(row[1] == 3.0f / 1.5f);
}

TEST(top_p_cut_is_inclusive) {
  // "Reaches top_p" is >=: with four tied top tokens (weights exactly 1) and top_p = 0.5,
  // the cumulative mass after two of them is exactly half, so the nucleus is ids {0, 1}
  // (lower ids first among ties), with top-p alone and after top-k; both ids occur.
  const std::vector<float> l = {2.0f, 2.0f, 2.0f, 2.0f, kNegInf, kNegInf};
  std::vector<float> row, scratch(12);
  Rng rng(4, 4);
  for (int64_t k : {0, 4, 5}) {
    SamplingParams sp;
    sp.top_p = 0.5f, sp.top_k = k;
    int64_t seen[6] = {0, 0, 0, 0, 0, 0};
    for (int d = 0; d < 2000; ++d) {
      row = l;
      ++seen[sample_token(row.data(), 6, sp, nullptr, 0, rng, scratch.data())];
    }
    CHECK(seen[0] > 0 && seen[1] > 0);
    CHECK(seen[0] + seen[1] == 2000);
  }
}

TEST(neg_inf_and_underflowing_tokens_are_never_chosen) {
  // Mostly -inf rows, top_k larger than the number of finite logits, and finite logits
  // whose probability underflows (-1e30 next to 0): 20k draws each, every path.
  const int64_t V = 300;
  std::vector<float> logits(V, kNegInf);
  logits[17] = 0.25f, logits[200] = -0.5f, logits[299] = 1.0f, logits[3] = -1e30f;
  std::vector<float> scratch(2 * V), row(V);
  const Combo combos[] = {{1.0f, 0, 1.0f, 1.0f}, {1.0f, 10, 1.0f, 1.0f}, {1.0f, 0, 0.999f, 1.0f},
                          {5.0f, 250, 0.9999f, 1.0f}, {100.0f, 0, 1.0f, 2.0f}};
  const int32_t pen[3] = {3, 5, 299};
  Rng rng(9, 9);
  for (const Combo& c : combos) {
    SamplingParams sp;
    sp.temperature = c.temperature, sp.top_k = c.top_k, sp.top_p = c.top_p;
    sp.repetition_penalty = c.penalty;
    int64_t bad = 0;
    std::vector<int64_t> seen(V, 0);
    for (int d = 0; d < 20000; ++d) {
      std::copy(logits.begin(), logits.end(), row.begin());
      const int32_t t = sample_token(row.data(), V, sp, pen, 3, rng, scratch.data());
      bad += (t != 17 && t != 200 && t != 299);
      ++seen[t];
    }
    CHECK(bad == 0);
    CHECK(seen[17] > 0 && seen[200] > 0 && seen[299] > 0);  // all three finite ones occur
  }
  // A single finite logit: always it, with and without truncation.
  std::vector<float> one(V, kNegInf);
  one[123] = -50.0f;
  for (int64_t k : {0, 1, 5}) {
    SamplingParams sp;
    sp.top_k = k;
    sp.top_p = k == 5 ? 0.5f : 1.0f;
    std::copy(one.begin(), one.end(), row.begin());
    CHECK(sample_token(row.data(), V, sp, nullptr, 0, rng, scratch.data()) == 123);
  }
}

TEST(repetition_penalty_on_positive_and_negative_logits) {
  // Each distinct id once: positive / penalty, negative * penalty, 0 and -inf unchanged;
  // ids not listed keep their bits; the penalized logits are left in the row.
  const float l[6] = {2.0f, -2.0f, 0.0f, 3.0f, kNegInf, -0.7f};
  const int32_t pen[8] = {0, 1, 1, 1, 2, 0, 4, 5};
  std::vector<float> scratch(12);
  for (float p : {2.0f, 0.5f, 1.3f}) {
    std::vector<float> row(l, l + 6);
    SamplingParams sp;
    sp.repetition_penalty = p;
    Rng rng(3, 3);
    sample_token(row.data(), 6, sp, pen, 8, rng, scratch.data());
    const float want[6] = {2.0f / p, -2.0f * p, 0.0f, 3.0f, kNegInf, -0.7f * p};
    CHECK_BITWISE_EQUAL(row.data(), want, 6, "penalized row");
  }
  // penalty 1 is off: the row keeps its bits.
  std::vector<float> row(l, l + 6);
  SamplingParams sp;
  Rng rng(3, 3);
  sample_token(row.data(), 6, sp, pen, 8, rng, scratch.data());
  CHECK_BITWISE_EQUAL(row.data(), l, 6, "penalty 1");
}

TEST(sampling_argument_errors) {
  using ppo::ErrorCode;
  std::vector<float> row = {0.5f, 1.0f, -1.0f}, scratch(6);
  const int32_t pen[2] = {0, 2};
  Rng rng(1, 2);
  auto call_with = [&](const SamplingParams& sp, int64_t vocab, const int32_t* p, int64_t np) {
    row = {0.5f, 1.0f, -1.0f};
    return sample_token(row.data(), vocab, sp, p, np, rng, scratch.data());
  };
  auto call = [&](const SamplingParams& sp) { return call_with(sp, 3, pen, 2); };
  SamplingParams ok;
  CHECK_NO_THROW(call(ok));
  auto with = [&](auto set) {
    SamplingParams sp;
    set(sp);
    return sp;
  };
  const float nan = tu::kNaN, inf = tu::kInf;
  CHECK_THROWS_CODE(call_with(ok, 0, pen, 2), ErrorCode::InvalidArgument, "vocab");
  CHECK_THROWS_CODE(call_with(ok, -5, pen, 2), ErrorCode::InvalidArgument, "vocab");
  CHECK_THROWS_CODE(sample_token(nullptr, 3, ok, pen, 2, rng, scratch.data()), ErrorCode::InvalidArgument, "logits");
  CHECK_THROWS_CODE(sample_token(row.data(), 3, ok, pen, 2, rng, nullptr), ErrorCode::InvalidArgument, "scratch");
  CHECK_THROWS_CODE(call_with(ok, 3, pen, -1), ErrorCode::InvalidArgument, "n_penalized");
  CHECK_THROWS_CODE(call_with(ok, 3, nullptr, 2), ErrorCode::InvalidArgument, "penalized");
  CHECK_NO_THROW(call_with(ok, 3, nullptr, 0));
  for (float T : {0.0f, -1.0f, nan, inf})
    CHECK_THROWS_CODE(call(with([&](SamplingParams& s) { s.temperature = T; })), ErrorCode::InvalidArgument, "temperature");
  CHECK_THROWS_CODE(call(with([&](SamplingParams& s) { s.temperature = 0.0f, s.greedy = true; })),
                    ErrorCode::InvalidArgument, "temperature");
  CHECK_THROWS_CODE(call(with([&](SamplingParams& s) { s.top_k = -1; })), ErrorCode::InvalidArgument, "top_k");
  for (float p : {0.0f, -0.1f, 1.0001f, nan, inf})
    CHECK_THROWS_CODE(call(with([&](SamplingParams& s) { s.top_p = p; })), ErrorCode::InvalidArgument, "top_p");
  for (float p : {0.0f, -1.0f, nan, inf})
    CHECK_THROWS_CODE(call(with([&](SamplingParams& s) { s.repetition_penalty = p; })),
                      ErrorCode::InvalidArgument, "repetition_penalty");
  const int32_t bad_ids[2] = {1, 3};
  CHECK_THROWS_CODE(call_with(ok, 3, bad_ids, 2), ErrorCode::OutOfRange, "penalized");
  const int32_t neg_ids[1] = {-1};
  CHECK_THROWS_CODE(call_with(ok, 3, neg_ids, 1), ErrorCode::OutOfRange, "penalized");
  // Non-finite rows: NaN and +inf anywhere; all -inf (also after the penalty). The rng
  // does not advance on a throw.
  for (float v : {nan, inf}) {
    std::vector<float> r = {0.5f, v, -1.0f};
    Rng before = rng;
    CHECK_THROWS_CODE(sample_token(r.data(), 3, ok, pen, 2, rng, scratch.data()), ErrorCode::NonFinite, "logits");
    CHECK(before.next_u64() == rng.next_u64());
  }
  std::vector<float> all_ninf = {kNegInf, kNegInf, kNegInf};
  CHECK_THROWS_CODE(sample_token(all_ninf.data(), 3, ok, pen, 2, rng, scratch.data()), ErrorCode::NonFinite, "logits");
  std::vector<float> big_neg = {kNegInf, -3e38f, kNegInf};
  const int32_t one_id[1] = {1};
  CHECK_THROWS_CODE(sample_token(big_neg.data(), 3, with([](SamplingParams& s) { s.repetition_penalty = 2.0f; }),
                                 one_id, 1, rng, scratch.data()),
                    ErrorCode::NonFinite, "logits");
  // Dividing by a penalty < 1 that overflows: the row is left unchanged.
  std::vector<float> big_pos = {3e38f, 0.0f, 1.0f};
  CHECK_THROWS_CODE(sample_token(big_pos.data(), 3, with([](SamplingParams& s) { s.repetition_penalty = 0.5f; }),
                                 pen, 1, rng, scratch.data()),
                    ErrorCode::NonFinite, "repetition_penalty");
  CHECK(big_pos[0] == 3e38f);
}

PPO_TEST_MAIN()
