// Token-level KL-penalized rewards, moments of a score batch, score normalization.
#include <algorithm>
#include <cmath>

#include "core/thread_pool.h"
#include "cpu/kernels.h"

namespace ppo::cpu {

namespace {

inline bool valid(const float* mask, int64_t i) { return !mask || mask[i] != 0.0f; }

inline double kl_estimate(double logprob, double ref_logprob, KlEstimator estimator) {
  const double d = logprob - ref_logprob;
  switch (estimator) {
    case KlEstimator::K1: return d;
    case KlEstimator::K2: return 0.5 * d * d;
    case KlEstimator::K3: return std::expm1(-d) + d;  // exp(-d) - 1 + d, accurate near 0
  }
  return d;
}

}  // namespace

void kl_penalized_rewards(const KlRewardsArgs& a) {
  parallel_for(a.batch, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = b * a.steps;
      int64_t last = -1;
      for (int64_t t = 0; t < a.steps; ++t) {
        const int64_t i = row + t;
        if (!valid(a.mask, i)) {
          a.rewards[i] = 0.0f;
          if (a.kl) a.kl[i] = 0.0f;
          continue;
        }
        const double kl = kl_estimate(a.logprobs[i], a.ref_logprobs[i], a.estimator);
        a.rewards[i] = static_cast<float>(-double(a.kl_coef) * kl);
        if (a.kl) a.kl[i] = static_cast<float>(kl);
        last = i;
      }
      if (last >= 0) {
        const double kl = kl_estimate(a.logprobs[last], a.ref_logprobs[last], a.estimator);
        a.rewards[last] = static_cast<float>(-double(a.kl_coef) * kl + double(a.scores[b]));
      }
    }
  }, grain_for(a.steps));
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
