// Pieces shared by the trainers (trainer.h): the learning-rate schedules, the validation
// of OptimizerOptions, model snapshots (parameters + AdamW state) and the repeated n-gram
// share of a response.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "trainer/trainer.h"

namespace ppo::trainer {

// s is the 1-based index of the optimizer step about to be taken.
double scheduled_lr(const OptimizerOptions& o, int64_t s) {
  require(s >= 1, ErrorCode::OutOfRange, "scheduled_lr: the step is 1-based, got " + std::to_string(s), "step");
  const double lr = o.lr, W = static_cast<double>(o.warmup_steps), S = static_cast<double>(s);
  switch (o.schedule) {
    case Schedule::Constant:
      return lr;
    case Schedule::WarmupInverseSqrt:
      if (o.warmup_steps <= 0) return lr / std::sqrt(S);
      if (s <= o.warmup_steps) return lr * S / W;
      return lr * std::sqrt(W / S);
    case Schedule::WarmupLinearDecay: {
      if (o.warmup_steps > 0 && s <= o.warmup_steps) return lr * S / W;
      const double span = static_cast<double>(o.total_steps - o.warmup_steps);
      require(span > 0, ErrorCode::InvalidArgument,
              "WarmupLinearDecay needs total_steps > warmup_steps", "total_steps");
      return lr * std::max(0.0, static_cast<double>(o.total_steps) - S) / span;
    }
  }
  throw Error(ErrorCode::InvalidArgument, "unknown learning-rate schedule", "schedule");
}

void check_optimizer(const OptimizerOptions& o, const std::string& what) {
  const std::string p = what.empty() ? std::string() : what + ".";
  auto fail_unless = [&](bool ok, const char* field, const std::string& rule, double got) {
    require(ok, ErrorCode::InvalidArgument,
            p + field + " must be " + rule + ", got " + std::to_string(got), p + field);
  };
  fail_unless(std::isfinite(o.lr) && o.lr >= 0.0, "lr", "finite and >= 0", o.lr);
  fail_unless(std::isfinite(o.beta1) && o.beta1 >= 0.0 && o.beta1 < 1.0, "beta1", "in [0, 1)", o.beta1);
  fail_unless(std::isfinite(o.beta2) && o.beta2 >= 0.0 && o.beta2 < 1.0, "beta2", "in [0, 1)", o.beta2);
  fail_unless(std::isfinite(o.eps) && o.eps > 0.0, "eps", "finite and > 0", o.eps);
  fail_unless(std::isfinite(o.weight_decay) && o.weight_decay >= 0.0, "weightDecay", "finite and >= 0",
              o.weight_decay);
  fail_unless(std::isfinite(o.max_grad_norm) && o.max_grad_norm >= 0.0, "maxGradNorm", "finite and >= 0",
              o.max_grad_norm);
  const bool known = o.schedule == Schedule::Constant || o.schedule == Schedule::WarmupInverseSqrt ||
                     o.schedule == Schedule::WarmupLinearDecay;
  require(known, ErrorCode::InvalidArgument, p + "schedule is not a known schedule", p + "schedule");
  fail_unless(o.warmup_steps >= 0, "warmupSteps", ">= 0", static_cast<double>(o.warmup_steps));
  if (o.schedule == Schedule::WarmupLinearDecay)
    fail_unless(o.total_steps > o.warmup_steps, "totalSteps", "> warmupSteps (" + std::to_string(o.warmup_steps) + ")",
                static_cast<double>(o.total_steps));
}

ModelSnapshot take_snapshot(const Model& m) {
  ModelSnapshot s;
  const int64_t n = m.parameter_count();
  s.params.assign(m.params(), m.params() + n);
  if (m.optimizer_m() != nullptr) {  // m and v exist together (after a first step)
    s.adam_m.assign(m.optimizer_m(), m.optimizer_m() + n);
    s.adam_v.assign(m.optimizer_v(), m.optimizer_v() + n);
  }
  s.adam_steps = m.optimizer_steps();
  return s;
}

// Validates everything first, then sets the optimizer state (which checks the moments'
// finiteness itself and changes nothing when it throws), then the parameters: a refused
// snapshot leaves the model as it was.
void restore_snapshot(Model& m, const ModelSnapshot& s) {
  const size_t n = static_cast<size_t>(m.parameter_count());
  require(s.params.size() == n, ErrorCode::ShapeMismatch,
          "restore_snapshot: the snapshot holds " + std::to_string(s.params.size()) +
              " parameters, the model " + std::to_string(n),
          "snapshot.params");
  require(s.adam_m.size() == s.adam_v.size() && (s.adam_m.empty() || s.adam_m.size() == n),
          ErrorCode::ShapeMismatch, "restore_snapshot: the AdamW moments must both be empty or hold " +
                                        std::to_string(n) + " values each",
          "snapshot.adam_m");
  require(s.adam_steps >= 0, ErrorCode::InvalidArgument, "restore_snapshot: adam_steps must be >= 0",
          "snapshot.adam_steps");
  if (m.trainable()) {
    if (s.adam_m.empty()) m.set_optimizer_state(nullptr, nullptr, s.adam_steps);
    else m.set_optimizer_state(s.adam_m.data(), s.adam_v.data(), s.adam_steps);
  } else {
    // A frozen model has no optimizer state to restore (and cannot hold one).
    require(s.adam_m.empty() && s.adam_steps == 0, ErrorCode::InvalidArgument,
            "restore_snapshot: a frozen model cannot take optimizer state", "snapshot.adam_m");
  }
  std::memcpy(m.mutable_params(), s.params.data(), n * sizeof(float));
}

// 1 - distinct / total over the n - ngram + 1 windows of `ngram` tokens.
double repeated_ngram_fraction(const int32_t* tokens, int64_t n, int64_t ngram) {
  require(ngram >= 1, ErrorCode::InvalidArgument, "ngram must be >= 1, got " + std::to_string(ngram), "ngram");
  require(n >= 0, ErrorCode::InvalidArgument, "n must be >= 0, got " + std::to_string(n), "n");
  if (n < ngram) return 0.0;
  require(tokens != nullptr, ErrorCode::InvalidArgument, "tokens is null", "tokens");
  const int64_t windows = n - ngram + 1;
  std::vector<int64_t> start(static_cast<size_t>(windows));
  for (int64_t i = 0; i < windows; ++i) start[i] = i;
  auto less = [&](int64_t a, int64_t b) {
    return std::lexicographical_compare(tokens + a, tokens + a + ngram, tokens + b, tokens + b + ngram);
  };
  std::sort(start.begin(), start.end(), less);
  int64_t distinct = 1;
  for (int64_t i = 1; i < windows; ++i)
    if (less(start[i - 1], start[i])) ++distinct;
  return 1.0 - static_cast<double>(distinct) / static_cast<double>(windows);
}

}  // namespace ppo::trainer
