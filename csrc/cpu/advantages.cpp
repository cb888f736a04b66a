// GAE, masked whitening and advantage clipping.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/thread_pool.h"
#include "cpu/kernels.h"

namespace ppo::cpu {

namespace {
inline bool valid(const float* mask, int64_t i) { return !mask || mask[i] != 0.0f; }
}  // namespace

void gae(const GaeArgs& a) {
  const double gamma = a.gamma, gamma_lambda = double(a.gamma) * double(a.lambda);
  parallel_for(a.batch, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = b * a.steps;
      // Walk backwards over valid positions; next_value / next_advantage belong to
      // the next valid position (0 after the last one: terminal state).
      double next_value = 0.0, next_advantage = 0.0;
      for (int64_t t = a.steps - 1; t >= 0; --t) {
        const int64_t i = row + t;
        if (!valid(a.mask, i)) {
          a.advantages[i] = 0.0f;
          a.returns[i] = 0.0f;
          continue;
        }
        const double value = a.values[i];
        const double delta = double(a.rewards[i]) + gamma * next_value - value;
        const double advantage = delta + gamma_lambda * next_advantage;
        a.advantages[i] = static_cast<float>(advantage);
        a.returns[i] = static_cast<float>(advantage + value);
        next_value = value;
        next_advantage = advantage;
      }
    }
  }, grain_for(a.steps));
}

void whiten(const WhitenArgs& a) {
  // Per-row partial sums (in double), combined in row order: the result does not
  // depend on how rows were split across threads.
  std::vector<double> row_sum(a.batch), row_count(a.batch), row_sq(a.batch);
  parallel_for(a.batch, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double s = 0.0, n = 0.0;
      for (int64_t t = 0; t < a.steps; ++t) {
        const int64_t i = b * a.steps + t;
        if (valid(a.mask, i)) {
          s += a.values[i];
          n += 1.0;
        }
      }
      row_sum[b] = s;
      row_count[b] = n;
    }
  }, grain_for(a.steps));
  double sum = 0.0, count = 0.0;
  for (int64_t b = 0; b < a.batch; ++b) {
    sum += row_sum[b];
    count += row_count[b];
  }
  if (count == 0.0) {
    std::fill(a.out, a.out + a.batch * a.steps, 0.0f);
    return;
  }
  const double mean = sum / count;
  parallel_for(a.batch, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double sq = 0.0;
      for (int64_t t = 0; t < a.steps; ++t) {
        const int64_t i = b * a.steps + t;
        if (valid(a.mask, i)) {
          const double d = a.values[i] - mean;
          sq += d * d;
        }
      }
      row_sq[b] = sq;
    }
  }, grain_for(a.steps));
  double m2 = 0.0;
  for (int64_t b = 0; b < a.batch; ++b) m2 += row_sq[b];
  const double var = count >= 2.0 ? m2 / (count - 1.0) : 0.0;
  const double inv_std = 1.0 / std::sqrt(var + double(a.eps));
  const double shift_back = a.shift_mean ? 0.0 : mean;
  const double clip = a.clip;
  parallel_for(a.batch * a.steps, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (!valid(a.mask, i)) {
        a.out[i] = 0.0f;
        continue;
      }
      double x = (a.values[i] - mean) * inv_std + shift_back;
      if (clip > 0.0) x = std::clamp(x, -clip, clip);
      a.out[i] = static_cast<float>(x);
    }
  }, grain_for(1));
}

void clip_masked(const ClipArgs& a) {
  const float c = a.clip;
  parallel_for(a.batch * a.steps, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      a.out[i] = valid(a.mask, i) ? std::clamp(a.values[i], -c, c) : 0.0f;
  }, grain_for(1));
}

}  // namespace ppo::cpu
