// Token-level KL-penalized rewards, moments of a score batch, score normalization.
#include <algorithm>
#include <cmath>

#include "core/thread_pool.h"
#include "cpu/kernels.h"

namespace ppo::cpu {

namespace {

inline bool valid(const float* mask, int64_t i) { return !mask || mask[i] != 0.0f; }

template <KlEstimator kEstimator>
inline double kl_estimate(double logprob, double ref_logprob) {
  const double d = logprob - ref_logprob;
  if constexpr (kEstimator == KlEstimator::K1) return d;
  if constexpr (kEstimator == KlEstimator::K2) return 0.5 * d * d;
  return std::expm1(-d) + d;  // k3 = exp(-d) - 1 + d, accurate near 0
}

// One row: the KL term at every valid position (branch-free, so it vectorizes), then
// the score added at the last valid position.
template <KlEstimator kEstimator>
void kl_rewards_row(const KlRewardsArgs& a, int64_t b) {
  const int64_t row = b * a.steps;
  const double coef = a.kl_coef;
  for (int64_t t = 0; t < a.steps; ++t) {
    const int64_t i = row + t;
    const bool ok = valid(a.mask, i);
    const double kl = kl_estimate<kEstimator>(a.logprobs[i], a.ref_logprobs[i]);
    a.rewards[i] = ok ? static_cast<float>(-coef * kl) : 0.0f;
    if (a.kl) a.kl[i] = ok ? static_cast<float>(kl) : 0.0f;
  }
  for (int64_t t = a.steps - 1; t >= 0; --t) {
    const int64_t i = row + t;
    if (!valid(a.mask, i)) continue;
    const double kl = kl_estimate<kEstimator>(a.logprobs[i], a.ref_logprobs[i]);
    a.rewards[i] = static_cast<float>(-coef * kl + double(a.scores[b]));
    break;
  }
}

template <KlEstimator kEstimator>
void kl_rewards_rows(const KlRewardsArgs& a) {
  parallel_for(a.batch, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) kl_rewards_row<kEstimator>(a, b);
  }, grain_for(a.steps));
}

}  // namespace

void kl_penalized_rewards(const KlRewardsArgs& a) {
  switch (a.estimator) {
    case KlEstimator::K1: return kl_rewards_rows<KlEstimator::K1>(a);
    case KlEstimator::K2: return kl_rewards_rows<KlEstimator::K2>(a);
    case KlEstimator::K3: return kl_rewards_rows<KlEstimator::K3>(a);
  }
}

Moments moments(const MomentsArgs& a) {
  // Two passes in double: the mean, then squared deviations from it.
  double sum = 0.0;
  for (int64_t i = 0; i < a.count; ++i) sum += a.values[i];
  Moments m;
  m.count = static_cast<double>(a.count);
  m.mean = sum / m.count;
  double m2 = 0.0;
  for (int64_t i = 0; i < a.count; ++i) {
    const double d = a.values[i] - m.mean;
    m2 += d * d;
  }
  m.m2 = m2;
  return m;
}

void normalize_scores(const NormalizeScoresArgs& a) {
  const double shift = a.subtract_mean ? a.mean : 0.0;
  const double scale = a.std + double(a.eps);
  for (int64_t i = 0; i < a.count; ++i) {
    double x = (double(a.values[i]) - shift) / scale;
    if (a.clip > 0.0f) x = std::clamp(x, -double(a.clip), double(a.clip));
    a.out[i] = static_cast<float>(x);
  }
}

}  // namespace ppo::cpu
