// Next-token sampling (contracts in sampling.h): the Rng (splitmix64 seeding xoshiro256**)
// and sample_token's logits processors.
//
// sample_token, for a row of V logits (l after the repetition penalty, m = max l):
//   weights w_i = exp((l_i - m) / T) in float (fast_exp, vectorized), sums in double;
//   ranking by the penalized logit l (descending, ties lower id first), which is the
//   order of the probabilities of the exact softmax (division by T > 0 and exp are
//   monotone) without the float merging of near-ties that ranking the rounded w would do.
// Paths, chosen by the parameters (not by the data):
//   no truncation (top_k off, top_p == 1): O(V): one pass for the weights and their sum,
//     then an inverse-CDF scan over the ids in ascending order;
//   top-k: one scan keeps the k best ids in a heap (O(V) when few ids displace the
//     current k-th, as in real rows; O(V log k) at worst), then sorts them (k log k);
//     top-p, if on, then takes a prefix of them;
//   top-p alone: the nucleus is a prefix of the ranking; a histogram of the mass over
//     quarter-temperature bins of l finds the bin where it reaches top_p of the total,
//     and only the tokens up to that bin are sorted: O(V + K log K), K the nucleus plus
//     the rest of its last bin (small for peaked rows; most of the vocabulary for flat
//     rows, where the descending order needs the sort anyway).
// One rng.uniform() draw per non-greedy call, taken after every check has passed.
// Messages of errors are built only on failure (this runs once per generated token).
//
// scratch layout: floats [0, V) (weights; the original logits of penalized ids), and
// int32 ids [V, 2V) (same size as float: an int32 array is created in that storage with
// placement new).
#include "model/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <new>
#include <string>

#include "core/error.h"
#include "cpu/vec_math.h"

namespace ppo::model {
namespace {

// splitmix64 (Steele, Lea, Flood; Vigna's reference): advances the state by the golden
// gamma and returns its mix.
uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// MurmurHash3's 64-bit finalizer: a bijection that scatters nearby stream numbers.
uint64_t fmix64(uint64_t z) {
  z ^= z >> 33;
  z *= 0xFF51AFD7ED558CCDull;
  z ^= z >> 33;
  z *= 0xC4CEB9FE1A85EC53ull;
  z ^= z >> 33;
  return z;
}

inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

using cpu::kLanes;

// Number of entries that are NaN or +inf (-inf is allowed: a banned token).
PPO_CPU_MULTIVERSION
int64_t count_nan_or_posinf(int64_t n, const float* __restrict x) {
  const float inf = std::numeric_limits<float>::infinity();
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += (x[i] < inf) ? 0 : 1;  // false for NaN and +inf
  return bad;
}

// max x[i] over a row without NaN (kLanes running maxima so the loop vectorizes).
PPO_CPU_MULTIVERSION
float row_max(int64_t n, const float* __restrict x) {
  const float ninf = -std::numeric_limits<float>::infinity();
  float lanes[kLanes];
  for (int j = 0; j < kLanes; ++j) lanes[j] = ninf;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] = x[i + j] > lanes[j] ? x[i + j] : lanes[j];
  float m = ninf;
  for (int j = 0; j < kLanes; ++j) m = lanes[j] > m ? lanes[j] : m;
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// w[i] = exp((x[i] - m) / T) for all i (0 for x = -inf, 1 at the max); returns sum w in
// double (kLanes accumulators, then the lanes in order, then the tail).
PPO_CPU_MULTIVERSION
double softmax_weights(int64_t n, const float* __restrict x, float m, float T,
                       float* __restrict w) {
  for (int64_t i = 0; i < n; ++i) w[i] = cpu::fast_exp((x[i] - m) / T);
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += static_cast<double>(w[i + j]);
  double s = 0.0;
  for (int j = 0; j < kLanes; ++j) s += lanes[j];
  for (; i < n; ++i) s += static_cast<double>(w[i]);
  return s;
}

// Top-p's mass histogram: bin b holds the tokens whose logit lies between b and b + 1
// quarter-temperatures below the top one, d = (m - l) * 4 / T in [b, b + 1); the last bin
// also holds everything further down (and -inf). Four interleaved histograms [4][kBins]
// (zeroed by the caller) so that runs of tokens in one bin do not serialize on one
// memory location; they are added in order by the caller. Bins are a function of l
// alone, monotone in l, so {bin <= B} is always a prefix of the ranking.
constexpr int kBins = 128;

inline float bin_coordinate(float x, float m, float scale) {
  const float d = (m - x) * scale;  // >= 0; +inf for x = -inf
  return d < static_cast<float>(kBins - 1) ? d : static_cast<float>(kBins - 1);
}

void mass_histogram(int64_t n, const float* x, const float* w, float m, float scale,
                    double* hist) {
  for (int64_t i = 0; i < n; ++i)
    hist[(i & 3) * kBins + static_cast<int>(bin_coordinate(x[i], m, scale))] +=
        static_cast<double>(w[i]);
}

// Inverse CDF over weights w[0..n) in the given order with one uniform u in [0, 1):
// the first j whose running sum exceeds u * total (total = the sequential sum of w[0..n)).
// A zero weight never raises the running sum, so it is never chosen. If rounding leaves
// the running sum at or below the target at the end, the last positive weight is chosen.
// Requires at least one positive weight.
int64_t inverse_cdf(int64_t n, const float* w, double total, double u) {
  const double target = u * total;
  double cum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    cum += static_cast<double>(w[j]);
    if (cum > target) return j;
  }
  int64_t j = n - 1;
  while (j > 0 && !(w[j] > 0.0f)) --j;
  return j;
}

double sequential_sum(int64_t n, const float* w) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += static_cast<double>(w[j]);
  return s;
}

// The ranking: higher logit first, lower id first among equal logits. A strict weak order
// (the row holds no NaN).
struct ByLogitDesc {
  const float* l;
  bool operator()(int32_t a, int32_t b) const {
    return l[a] > l[b] || (l[a] == l[b] && a < b);
  }
};

// Sampling over ids[0..K) sorted by the ranking, their weights in w[0..K): applies top-p
// (when on) as the smallest prefix whose mass reaches top_p of the mass of all K, then
// draws by inverse CDF over that prefix.
int32_t sample_ranked(int64_t K, const int32_t* ids, const float* w, double mass_all,
                      bool use_p, float top_p, double u) {
  int64_t keep = K;
  double kept_mass = sequential_sum(K, w);
  if (use_p) {
    const double goal = static_cast<double>(top_p) * mass_all;
    double cum = 0.0;
    for (int64_t j = 0; j < K; ++j) {
      cum += static_cast<double>(w[j]);
      if (cum >= goal) {
        keep = j + 1;
        kept_mass = cum;
        break;
      }
    }
  }
  return ids[inverse_cdf(keep, w, kept_mass, u)];
}

// Throws; the messages are only built on failure (sample_token runs once per token).
[[noreturn]] void fail(ErrorCode code, const std::string& message, const char* name) {
  throw Error(code, message, name);
}

}  // namespace

Rng::Rng(uint64_t seed, uint64_t stream) {
  // The stream is hashed into the seed, then four splitmix64 outputs fill the state
  // (never all zero: splitmix64's mix is a bijection of consecutive distinct states).
  uint64_t x = seed ^ fmix64(stream);
  for (uint64_t& s : s_) s = splitmix64(x);
}

uint64_t Rng::next_u64() {
  // xoshiro256** (Blackman and Vigna).
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double Rng::uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

namespace {
// sample_token and sample_token_with_draw: the draw comes from *rng when it is given
// (after every check has passed), else it is `draw`.
int32_t sample_token_impl(float* logits, int64_t vocab, const SamplingParams& params,
                          const int32_t* penalized, int64_t n_penalized, Rng* rng, double draw,
                          float* scratch) {
  // ---- arguments ----
  const ErrorCode kBad = ErrorCode::InvalidArgument;
  if (vocab < 1 || vocab > std::numeric_limits<int32_t>::max())
    fail(kBad, "vocab must be in [1, 2^31 - 1], got " + std::to_string(vocab), "vocab");
  if (logits == nullptr) fail(kBad, "logits must not be null", "logits");
  if (scratch == nullptr) fail(kBad, "scratch must not be null", "scratch");
  if (n_penalized < 0)
    fail(kBad, "n_penalized must be >= 0, got " + std::to_string(n_penalized), "n_penalized");
  if (n_penalized > 0 && penalized == nullptr)
    fail(kBad, "penalized must not be null when n_penalized > 0", "penalized");
  const float T = params.temperature, top_p = params.top_p, penalty = params.repetition_penalty;
  if (!(std::isfinite(T) && T > 0.0f))
    fail(kBad, "temperature must be finite and > 0, got " + std::to_string(T), "temperature");
  if (params.top_k < 0)
    fail(kBad, "top_k must be >= 0 (0: off), got " + std::to_string(params.top_k), "top_k");
  if (!(top_p > 0.0f && top_p <= 1.0f))
    fail(kBad, "top_p must be in (0, 1] (1: off), got " + std::to_string(top_p), "top_p");
  if (!(std::isfinite(penalty) && penalty > 0.0f))
    fail(kBad, "repetition_penalty must be finite and > 0 (1: off), got " + std::to_string(penalty),
         "repetition_penalty");
  for (int64_t k = 0; k < n_penalized; ++k)
    if (penalized[k] < 0 || penalized[k] >= vocab)
      fail(ErrorCode::OutOfRange,
           "penalized[" + std::to_string(k) + "] = " + std::to_string(penalized[k]) +
               " is not a token id in [0, " + std::to_string(vocab) + ")",
           "penalized");
  if (count_nan_or_posinf(vocab, logits) > 0) {
    int64_t i = 0;
    while (logits[i] < std::numeric_limits<float>::infinity()) ++i;
    fail(ErrorCode::NonFinite,
         "logits[" + std::to_string(i) + "] is " + (std::isnan(logits[i]) ? "NaN" : "+inf") +
             " (only -inf, a banned token, is allowed)",
         "logits");
  }

  // ---- 1. repetition penalty, each distinct id once ----
  // Pass 1 saves the original logit of every listed id in scratch[id] (repeats write the
  // same value) and checks that the penalized value is finite; pass 2 writes the penalized
  // value computed from the saved original, so a repeated id is penalized once.
  if (penalty != 1.0f && n_penalized > 0) {
    for (int64_t k = 0; k < n_penalized; ++k) {
      const int32_t id = penalized[k];
      const float x = logits[id];
      const float y = x < 0.0f ? x * penalty : x / penalty;
      if (!(y < std::numeric_limits<float>::infinity()))
        fail(ErrorCode::NonFinite,
             "logits[" + std::to_string(id) + "] / repetition_penalty overflows to +inf",
             "repetition_penalty");
      scratch[id] = x;
    }
    for (int64_t k = 0; k < n_penalized; ++k) {
      const int32_t id = penalized[k];
      const float x = scratch[id];
      logits[id] = x < 0.0f ? x * penalty : x / penalty;
    }
  }

  const float m = row_max(vocab, logits);
  if (!(m > -std::numeric_limits<float>::infinity()))
    fail(ErrorCode::NonFinite, "every logit is -inf: no token can be sampled", "logits");

  // ---- 2. greedy: the first id holding the max ----
  if (params.greedy) {
    int64_t i = 0;
    while (logits[i] != m) ++i;
    return static_cast<int32_t>(i);
  }

  const double u = rng != nullptr ? rng->uniform() : draw;
  const bool use_k = params.top_k > 0 && params.top_k < vocab;
  const bool use_p = top_p < 1.0f;
  float* w = scratch;
  int32_t* ids = ::new (static_cast<void*>(scratch + vocab)) int32_t[static_cast<size_t>(vocab)];

  // ---- 3 + 6: temperature, no truncation: inverse CDF over ids in ascending order ----
  if (!use_k && !use_p) {
    const double total = softmax_weights(vocab, logits, m, T, w);
    return static_cast<int32_t>(inverse_cdf(vocab, w, total, u));
  }

  // ---- 4. top-k (then 5. top-p within it) ----
  if (use_k) {
    // A heap of the k best ids so far (by the ranking; its top is the worst of them),
    // scanning ids in ascending order: a later id with the same logit as the worst never
    // displaces it (ties: lower id first). Typical rows displace rarely: O(V + k log k
    // log(V / k)); at worst (logits rising with the id) O(V log k).
    const int64_t k = params.top_k;
    const ByLogitDesc rank{logits};
    for (int64_t i = 0; i < k; ++i) ids[i] = static_cast<int32_t>(i);
    std::make_heap(ids, ids + k, rank);
    float worst = logits[ids[0]];
    for (int64_t i = k; i < vocab; ++i) {
      if (!(logits[i] > worst)) continue;
      std::pop_heap(ids, ids + k, rank);
      ids[k - 1] = static_cast<int32_t>(i);
      std::push_heap(ids, ids + k, rank);
      worst = logits[ids[0]];
    }
    std::sort(ids, ids + k, rank);
    for (int64_t j = 0; j < k; ++j) w[j] = cpu::fast_exp((logits[ids[j]] - m) / T);
    return sample_ranked(k, ids, w, sequential_sum(k, w), use_p, top_p, u);
  }

  // ---- 5. top-p alone ----
  // The nucleus is a prefix of the ranking: a mass histogram over quarter-temperature bins
  // of the logit finds the first bin B by which the mass reaches top_p of the total; only
  // the tokens of bins 0..B (the nucleus and the rest of its last bin) are sorted.
  const double total = softmax_weights(vocab, logits, m, T, w);
  const double goal = static_cast<double>(top_p) * total;
  float scale = 4.0f / T;
  if (!(scale <= std::numeric_limits<float>::max())) scale = std::numeric_limits<float>::max();
  double hist[4 * kBins] = {};
  mass_histogram(vocab, logits, w, m, scale, hist);
  int last_bin = kBins - 1;
  double cum = 0.0;
  for (int b = 0; b < kBins; ++b) {
    cum += hist[b] + hist[kBins + b] + hist[2 * kBins + b] + hist[3 * kBins + b];
    if (cum >= goal) {
      last_bin = b;
      break;
    }
  }
  const float ninf = -std::numeric_limits<float>::infinity();
  int64_t n = 0;
  for (int64_t i = 0; i < vocab; ++i)
    if (logits[i] > ninf && static_cast<int>(bin_coordinate(logits[i], m, scale)) <= last_bin)
      ids[n++] = static_cast<int32_t>(i);
  std::sort(ids, ids + n, ByLogitDesc{logits});
  // The candidates' weights, in ranked order, to the front of scratch: recomputed from the
  // logits (gathering w[ids[j]] in place would overwrite weights not yet gathered).
  for (int64_t j = 0; j < n; ++j) w[j] = cpu::fast_exp((logits[ids[j]] - m) / T);
  return sample_ranked(n, ids, w, total, true, top_p, u);
}

}  // namespace

int32_t sample_token(float* logits, int64_t vocab, const SamplingParams& params,
                     const int32_t* penalized, int64_t n_penalized, Rng& rng, float* scratch) {
  return sample_token_impl(logits, vocab, params, penalized, n_penalized, &rng, 0.0, scratch);
}

int32_t sample_token_with_draw(float* logits, int64_t vocab, const SamplingParams& params,
                               const int32_t* penalized, int64_t n_penalized, double u,
                               float* scratch) {
  require(u >= 0.0 && u < 1.0, ErrorCode::InvalidArgument,
          "the draw u must be in [0, 1), got " + std::to_string(u), "u");
  return sample_token_impl(logits, vocab, params, penalized, n_penalized, nullptr, u, scratch);
}

}  // namespace ppo::model
