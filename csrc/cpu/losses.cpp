// The clipped surrogate policy loss and the clipped value loss, with their gradients.
// Sums are per-row partials in double, combined in row order (thread-count independent).
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/thread_pool.h"
#include "cpu/kernels.h"

namespace ppo::cpu {

namespace {
inline bool valid(const float* mask, int64_t i) { return !mask || mask[i] != 0.0f; }

int64_t count_valid(const float* mask, int64_t n) {
  if (!mask) return n;
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += mask[i] != 0.0f;
  return c;
}
}  // namespace

PolicyLossResult policy_loss(const PolicyLossArgs& a) {
  const int64_t n_total = a.batch * a.steps;
  const int64_t tokens = count_valid(a.mask, n_total);
  PolicyLossResult result;
  result.tokens = tokens;
  if (tokens == 0) {
    if (a.grad_logprobs) std::fill(a.grad_logprobs, a.grad_logprobs + n_total, 0.0f);
    return result;
  }
  const double inv_n = 1.0 / double(tokens);
  const double lo = 1.0 - double(a.clip_eps), hi = 1.0 + double(a.clip_eps);
  std::vector<double> loss(a.batch), clipped(a.batch), kl(a.batch);
  parallel_for(a.batch, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double row_loss = 0.0, row_clipped = 0.0, row_kl = 0.0;
      for (int64_t t = 0; t < a.steps; ++t) {
        const int64_t i = b * a.steps + t;
        if (!valid(a.mask, i)) {
          if (a.grad_logprobs) a.grad_logprobs[i] = 0.0f;
          continue;
        }
        const double log_ratio = double(a.logprobs[i]) - double(a.old_logprobs[i]);
        const double ratio = std::exp(log_ratio);
        const double adv = a.advantages[i];
        const double unclipped = -adv * ratio;
        const double clipped_term = -adv * std::clamp(ratio, lo, hi);
        const bool take_unclipped = unclipped >= clipped_term;
        row_loss += take_unclipped ? unclipped : clipped_term;
        row_clipped += take_unclipped ? 0.0 : 1.0;
        row_kl += (ratio - 1.0) - log_ratio;
        if (a.grad_logprobs)
          a.grad_logprobs[i] = static_cast<float>(take_unclipped ? -adv * ratio * inv_n : 0.0);
      }
      loss[b] = row_loss;
      clipped[b] = row_clipped;
      kl[b] = row_kl;
    }
  }, grain_for(a.steps));
  for (int64_t b = 0; b < a.batch; ++b) {
    result.loss += loss[b];
    result.clip_fraction += clipped[b];
    result.approx_kl += kl[b];
  }
  result.loss *= inv_n;
  result.clip_fraction *= inv_n;
  result.approx_kl *= inv_n;
  return result;
}

ValueLossResult value_loss(const ValueLossArgs& a) {
  const int64_t n_total = a.batch * a.steps;
  const int64_t tokens = count_valid(a.mask, n_total);
  ValueLossResult result;
  result.tokens = tokens;
  if (tokens == 0) {
    if (a.grad_values) std::fill(a.grad_values, a.grad_values + n_total, 0.0f);
    return result;
  }
  const double inv_n = 1.0 / double(tokens);
  const double eps = a.clip_eps;
  std::vector<double> loss(a.batch), clipped(a.batch);
  parallel_for(a.batch, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double row_loss = 0.0, row_clipped = 0.0;
      for (int64_t t = 0; t < a.steps; ++t) {
        const int64_t i = b * a.steps + t;
        if (!valid(a.mask, i)) {
          if (a.grad_values) a.grad_values[i] = 0.0f;
          continue;
        }
        const double v = a.values[i], ret = a.returns[i];
        const double err = v - ret;
        const double sq = err * err;
        bool take_unclipped = true;
        double worst = sq;
        if (a.use_clip) {
          const double old = a.old_values[i];
          const double vc = std::clamp(v, old - eps, old + eps);
          const double sq_clipped = (vc - ret) * (vc - ret);
          take_unclipped = sq >= sq_clipped;
          worst = take_unclipped ? sq : sq_clipped;
        }
        row_loss += 0.5 * worst;
        row_clipped += take_unclipped ? 0.0 : 1.0;
        if (a.grad_values) a.grad_values[i] = static_cast<float>(take_unclipped ? err * inv_n : 0.0);
      }
      loss[b] = row_loss;
      clipped[b] = row_clipped;
    }
  }, grain_for(a.steps));
  for (int64_t b = 0; b < a.batch; ++b) {
    result.loss += loss[b];
    result.clip_fraction += clipped[b];
  }
  result.loss *= inv_n;
  result.clip_fraction *= inv_n;
  return result;
}

}  // namespace ppo::cpu
