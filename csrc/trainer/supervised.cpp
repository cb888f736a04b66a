// The supervised trainers (trainer.h): SFT (masked LM loss) and the pairwise reward model,
// their evaluations, and sequence scoring with a value head.
//
// Every call validates all of its arguments before touching the model, so a refused call
// changes nothing. A training step then:
//   1. model.zero_grad();
//   2. per micro-batch: one retained forward, then one backward whose upstream gradients are
//      those of the WHOLE batch's loss (the mean over all target tokens / all pairs), so
//      the micro-batches' gradients add up to the full batch's;
//   3. if the loss (or a score) or the gradient norm is NaN or infinite: zero_grad() and
//      stats with skipped = 1 (parameters and optimizer untouched); otherwise one AdamW
//      step at scheduled_lr(optimizer, steps taken + 1), then zero_grad().
// The first micro-batch that meets a non-finite value (a NaN loss or score, or the engine's
// NonFinite refusal of NaN logits) ends the pass: the step is lost, so the rest is not run,
// and the loss statistics are NaN.
// Micro-batches are copied out of the caller's arrays and trimmed to their longest row
// (padding costs nothing). All sums over tokens and pairs run in double, in row order: the
// stats do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "core/error.h"
#include "trainer/trainer.h"

namespace ppo::trainer {
namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();

int64_t length_of(const TokenBatch& b, int64_t i) { return b.lengths ? b.lengths[i] : b.steps; }

// The engine's own checks of a TokenBatch (model/gpt.h), made up front so that nothing is
// half done when they fail. `prefix` names the batch in the argument ("chosen." or "").
void validate_batch(const Model& model, const TokenBatch& b, const std::string& prefix) {
  const model::ModelConfig& cfg = model.config();
  require(b.batch >= 1, ErrorCode::InvalidArgument,
          prefix + "batch must be >= 1, got " + std::to_string(b.batch), prefix + "batch");
  require(b.steps >= 1, ErrorCode::InvalidArgument,
          prefix + "steps must be >= 1, got " + std::to_string(b.steps), prefix + "steps");
  require(b.steps <= cfg.n_positions, ErrorCode::OutOfRange,
          prefix + "steps " + std::to_string(b.steps) + " exceeds the model's n_positions " +
              std::to_string(cfg.n_positions),
          prefix + "steps");
  require(b.tokens != nullptr, ErrorCode::InvalidArgument, prefix + "tokens is null", prefix + "tokens");
  for (int64_t i = 0; i < b.batch; ++i) {
    const int64_t n = length_of(b, i);
    require(n >= 1 && n <= b.steps, ErrorCode::OutOfRange,
            prefix + "lengths[" + std::to_string(i) + "] = " + std::to_string(n) + " is outside [1, steps = " +
                std::to_string(b.steps) + "]",
            prefix + "lengths");
    for (int64_t t = 0; t < n; ++t) {
      const int32_t id = b.tokens[i * b.steps + t];
      require(id >= 0 && id < cfg.vocab_size, ErrorCode::OutOfRange,
              prefix + "tokens[" + std::to_string(i) + ", " + std::to_string(t) + "] = " + std::to_string(id) +
                  " is outside the vocabulary [0, " + std::to_string(cfg.vocab_size) + ")",
              prefix + "tokens");
    }
  }
}

// A target mask [batch, steps] must be 0 or 1 where it is read (1 <= t < length).
void validate_mask(const TokenBatch& b, const float* mask, const std::string& name) {
  if (!mask) return;
  for (int64_t i = 0; i < b.batch; ++i)
    for (int64_t t = 1; t < length_of(b, i); ++t) {
      const float v = mask[i * b.steps + t];
      require(v == 0.0f || v == 1.0f, ErrorCode::OutOfRange,
              name + "[" + std::to_string(i) + ", " + std::to_string(t) + "] must be 0 or 1, got " +
                  std::to_string(v),
              name);
    }
}

// Target positions of rows [r0, r1): mask 1 (every position when mask is null) at 1 <= t < n.
int64_t count_targets(const TokenBatch& b, const float* mask, int64_t r0, int64_t r1) {
  int64_t count = 0;
  for (int64_t i = r0; i < r1; ++i)
    for (int64_t t = 1; t < length_of(b, i); ++t) count += (!mask || mask[i * b.steps + t] != 0.0f) ? 1 : 0;
  return count;
}

void require_value_head(const Model& model, const char* who) {
  require(model.config().value_head, ErrorCode::InvalidArgument,
          std::string(who) + " needs a model with a value head (config.value_head)", "model");
}

void require_micro(int64_t micro, const char* name) {
  require(micro >= 0, ErrorCode::InvalidArgument,
          std::string(name) + " must be >= 0 (0: all at once), got " + std::to_string(micro), name);
}

void validate_pairs(const Model& model, const PairBatch& pairs, const char* who) {
  require_value_head(model, who);
  require(pairs.chosen.batch == pairs.rejected.batch, ErrorCode::ShapeMismatch,
          std::string(who) + ": chosen has " + std::to_string(pairs.chosen.batch) + " rows but rejected " +
              std::to_string(pairs.rejected.batch),
          "pairs");
  validate_batch(model, pairs.chosen, "chosen.");
  validate_batch(model, pairs.rejected, "rejected.");
  validate_mask(pairs.chosen, pairs.chosen_target_mask, "chosen_target_mask");
}

// Rows of one source batch that go into a packed micro-batch, and how its target mask is
// filled: copied from `mask`, all positions 1 <= t < n (mask null), or none.
enum class Targets { FromMask, All, None };
struct Rows {
  const TokenBatch* batch;
  const float* mask;
  Targets targets;
  int64_t r0, r1;
};

// A micro-batch copied out of one or more sources (their rows stacked in order), right
// padded to its longest row: tokens, lengths [batch] and target mask [batch, steps].
struct Packed {
  int64_t batch = 0, steps = 0, targets = 0;
  std::vector<int32_t> tokens, lengths;
  std::vector<float> mask;
  TokenBatch view() const { return {batch, steps, tokens.data(), lengths.data()}; }
};

Packed pack(std::initializer_list<Rows> sources) {
  Packed p;
  for (const Rows& s : sources) {
    p.batch += s.r1 - s.r0;
    for (int64_t i = s.r0; i < s.r1; ++i) p.steps = std::max(p.steps, length_of(*s.batch, i));
  }
  p.tokens.assign(static_cast<size_t>(p.batch * p.steps), 0);  // padding: any id, never read
  p.mask.assign(static_cast<size_t>(p.batch * p.steps), 0.0f);
  p.lengths.reserve(static_cast<size_t>(p.batch));
  int64_t row = 0;
  for (const Rows& s : sources) {
    const TokenBatch& b = *s.batch;
    for (int64_t i = s.r0; i < s.r1; ++i, ++row) {
      const int64_t n = length_of(b, i);
      p.lengths.push_back(static_cast<int32_t>(n));
      std::copy(b.tokens + i * b.steps, b.tokens + i * b.steps + n, p.tokens.begin() + row * p.steps);
      if (s.targets == Targets::None) continue;
      for (int64_t t = 1; t < n; ++t) {
        const float v = (s.targets == Targets::All || !s.mask) ? 1.0f : s.mask[i * b.steps + t];
        p.mask[row * p.steps + t] = v;
        p.targets += v != 0.0f ? 1 : 0;
      }
    }
  }
  return p;
}

// -log sigmoid(x) = log(1 + exp(-x)), without overflow for any finite x.
double neg_log_sigmoid(double x) { return x >= 0 ? std::log1p(std::exp(-x)) : -x + std::log1p(std::exp(x)); }
// sigmoid(x), without overflow.
double sigmoid(double x) {
  if (x >= 0) return 1.0 / (1.0 + std::exp(-x));
  const double e = std::exp(x);
  return e / (1.0 + e);
}

// Step 3 of every training step (see the top of the file): the optimizer step, or the skip.
// Appends grad_norm, clipped, lr, step and skipped to `stats`.
Stats finish_step(Model& model, const OptimizerOptions& o, bool finite, Stats stats) {
  const double norm = model.grad_norm();
  const double lr = scheduled_lr(o, model.optimizer_steps() + 1);
  if (!finite || !std::isfinite(norm)) {
    model.zero_grad();
    // The norm of partial gradients means nothing when the loss already was not finite.
    stats.insert(stats.end(), {{"grad_norm", finite ? norm : kNaN},
                               {"clipped", 0.0},
                               {"lr", lr},
                               {"step", static_cast<double>(model.optimizer_steps())},
                               {"skipped", 1.0}});
    return stats;
  }
  model::AdamWOptions a;
  a.lr = lr;
  a.beta1 = o.beta1;
  a.beta2 = o.beta2;
  a.eps = o.eps;
  a.weight_decay = o.weight_decay;
  a.max_grad_norm = o.max_grad_norm;
  model::StepResult r;
  try {
    r = model.step(a);
  } catch (...) {
    model.zero_grad();
    throw;
  }
  model.zero_grad();
  stats.insert(stats.end(), {{"grad_norm", r.grad_norm},
                             {"clipped", r.clipped ? 1.0 : 0.0},
                             {"lr", lr},
                             {"step", static_cast<double>(r.step)},
                             {"skipped", 0.0}});
  return stats;
}

// Runs one micro-batch's engine calls; false when they met a NaN or an infinity: `body`
// returned false (a non-finite loss or score it saw), or the engine refused a non-finite
// internal value (e.g. NaN logits from NaN parameters). Every argument of those calls was
// validated up front, so a NonFinite error here comes from the model's state, not from the
// caller: the step is skipped rather than failed. Other errors propagate.
template <typename Body>
bool engine_finite(Body&& body) {
  try {
    return body();
  } catch (const Error& e) {
    if (e.code() != ErrorCode::NonFinite) throw;
    return false;
  }
}

int64_t chunk_of(int64_t micro, int64_t total) { return micro == 0 ? total : std::min(micro, total); }

// The per-micro-batch pieces of the reward model's pairwise loss, summed in pair order.
struct PairSums {
  double ranking = 0, margin = 0, chosen = 0, rejected = 0;
  int64_t correct = 0;
  bool finite = true;
  // Adds pair (r_c, r_r); returns d ranking / d (r_c - r_r) for that pair (unscaled).
  double add(double rc, double rr) {
    const double d = rc - rr;
    ranking += neg_log_sigmoid(d);
    margin += d;
    chosen += rc;
    rejected += rr;
    correct += rc > rr ? 1 : 0;
    finite = finite && std::isfinite(rc) && std::isfinite(rr);
    return -sigmoid(-d);  // d/dd of -log sigmoid(d) = -(1 - sigmoid(d))
  }
  // The step met a non-finite value before every pair was seen: no statistic is meaningful.
  void poison() { ranking = margin = chosen = rejected = kNaN; correct = 0; finite = false; }
};

}  // namespace

// ---- SFT ------------------------------------------------------------------------------------
Stats sft_step(Model& model, const TokenBatch& batch, const float* target_mask, int64_t micro_batch,
               const OptimizerOptions& optimizer) {
  check_optimizer(optimizer, "optimizer");
  validate_batch(model, batch, "");
  validate_mask(batch, target_mask, "target_mask");
  require_micro(micro_batch, "micro_batch");
  const int64_t total = count_targets(batch, target_mask, 0, batch.batch);
  require(total > 0, ErrorCode::InvalidArgument, "sft_step: the batch has no target token", "target_mask");
  const int64_t chunk = chunk_of(micro_batch, batch.batch);

  model.zero_grad();
  double nll = 0.0;  // sum over target tokens of -log p
  bool finite = true;
  try {
    for (int64_t r0 = 0; r0 < batch.batch && finite; r0 += chunk) {
      const int64_t r1 = std::min(batch.batch, r0 + chunk);
      const Packed p = pack({{&batch, target_mask, Targets::FromMask, r0, r1}});
      if (p.targets == 0) continue;  // no loss term, no gradient
      finite = engine_finite([&] {
        model::ForwardRequest req;
        req.target_mask = p.mask.data();
        req.lm_loss = true;
        req.retain = true;
        const model::ForwardResult r = model.forward(p.view(), req);
        nll += r.lm_loss * static_cast<double>(r.lm_tokens);
        if (!std::isfinite(r.lm_loss)) return false;
        model::BackwardRequest back;
        // d (sum over all tokens / total) / d (this micro-batch's mean) = its tokens / total.
        back.lm_loss_scale = static_cast<double>(r.lm_tokens) / static_cast<double>(total);
        model.backward(back);
        return true;
      });
    }
  } catch (...) {
    model.zero_grad();
    throw;
  }
  if (!finite) nll = kNaN;
  const double loss = nll / static_cast<double>(total);
  return finish_step(model, optimizer, finite && std::isfinite(loss),
                     {{"loss", loss}, {"tokens", static_cast<double>(total)}});
}

Stats lm_eval(Model& model, const TokenBatch& batch, const float* target_mask, int64_t micro_batch) {
  validate_batch(model, batch, "");
  validate_mask(batch, target_mask, "target_mask");
  require_micro(micro_batch, "micro_batch");
  const int64_t total = count_targets(batch, target_mask, 0, batch.batch);
  require(total > 0, ErrorCode::InvalidArgument, "lm_eval: the batch has no target token", "target_mask");
  const int64_t chunk = chunk_of(micro_batch, batch.batch);
  double nll = 0.0;
  for (int64_t r0 = 0; r0 < batch.batch; r0 += chunk) {
    const int64_t r1 = std::min(batch.batch, r0 + chunk);
    const Packed p = pack({{&batch, target_mask, Targets::FromMask, r0, r1}});
    if (p.targets == 0) continue;
    const bool finite = engine_finite([&] {
      model::ForwardRequest req;
      req.target_mask = p.mask.data();
      req.lm_loss = true;
      const model::ForwardResult r = model.forward(p.view(), req);
      nll += r.lm_loss * static_cast<double>(r.lm_tokens);
      return true;
    });
    if (!finite) {  // the model's own NaN (not an argument): the loss is NaN
      nll = kNaN;
      break;
    }
  }
  const double loss = nll / static_cast<double>(total);
  return {{"loss", loss}, {"tokens", static_cast<double>(total)}, {"perplexity", std::exp(loss)}};
}

// ---- reward model ---------------------------------------------------------------------------
// Each micro-batch of n pairs is ONE forward over [2n, S] rows: the chosen rows, then the
// rejected rows. The target mask selects the chosen rows' LM targets only (when lm_coef > 0).
Stats reward_model_step(Model& model, const PairBatch& pairs, double lm_coef, int64_t micro_batch_pairs,
                        const OptimizerOptions& optimizer) {
  check_optimizer(optimizer, "optimizer");
  validate_pairs(model, pairs, "reward_model_step");
  require(std::isfinite(lm_coef) && lm_coef >= 0.0, ErrorCode::InvalidArgument,
          "lm_coef must be finite and >= 0, got " + std::to_string(lm_coef), "lm_coef");
  require_micro(micro_batch_pairs, "micro_batch_pairs");
  const int64_t N = pairs.chosen.batch;
  const bool with_lm = lm_coef > 0.0;
  const int64_t lm_total = with_lm ? count_targets(pairs.chosen, pairs.chosen_target_mask, 0, N) : 0;
  require(!with_lm || lm_total > 0, ErrorCode::InvalidArgument,
          "reward_model_step: lm_coef > 0 but the chosen sequences have no target token", "chosen_target_mask");
  const int64_t chunk = chunk_of(micro_batch_pairs, N);
  const Targets chosen_targets = with_lm ? Targets::FromMask : Targets::None;

  model.zero_grad();
  PairSums sums;
  double nll = 0.0;
  bool finite = true;
  try {
    for (int64_t p0 = 0; p0 < N && finite; p0 += chunk) {
      const int64_t p1 = std::min(N, p0 + chunk), n = p1 - p0;
      const Packed p = pack({{&pairs.chosen, pairs.chosen_target_mask, chosen_targets, p0, p1},
                             {&pairs.rejected, nullptr, Targets::None, p0, p1}});
      finite = engine_finite([&] {
        const int64_t S = p.steps;
        std::vector<float> values(static_cast<size_t>(p.batch * S));
        model::ForwardRequest req;
        req.values = values.data();
        if (with_lm) {
          req.target_mask = p.mask.data();
          req.lm_loss = true;
        }
        req.retain = true;
        const model::ForwardResult r = model.forward(p.view(), req);
        // d loss / d values: nonzero only at each row's last token.
        std::vector<float> grad_values(values.size(), 0.0f);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t at_c = i * S + p.lengths[i] - 1, at_r = (n + i) * S + p.lengths[n + i] - 1;
          const double g = sums.add(values[at_c], values[at_r]) / static_cast<double>(N);
          grad_values[at_c] = static_cast<float>(g);
          grad_values[at_r] = static_cast<float>(-g);
        }
        if (with_lm) nll += r.lm_loss * static_cast<double>(r.lm_tokens);
        if (!sums.finite || !std::isfinite(r.lm_loss)) return false;
        model::BackwardRequest back;
        back.grad_values = grad_values.data();
        if (with_lm) back.lm_loss_scale = lm_coef * static_cast<double>(r.lm_tokens) / static_cast<double>(lm_total);
        model.backward(back);
        return true;
      });
    }
  } catch (...) {
    model.zero_grad();
    throw;
  }
  if (!finite) sums.poison(), nll = kNaN;
  const double ranking = sums.ranking / N, lm = with_lm ? nll / static_cast<double>(lm_total) : 0.0;
  const double loss = ranking + (with_lm ? lm_coef * lm : 0.0);
  return finish_step(model, optimizer, finite && std::isfinite(loss),
                     {{"loss", loss},
                      {"ranking_loss", ranking},
                      {"lm_loss", lm},
                      {"accuracy", sums.finite ? static_cast<double>(sums.correct) / N : kNaN},
                      {"margin", sums.margin / N},
                      {"chosen_score", sums.chosen / N},
                      {"rejected_score", sums.rejected / N}});
}

Stats reward_model_eval(Model& model, const PairBatch& pairs, int64_t micro_batch_pairs,
                        std::vector<float>* chosen_scores, std::vector<float>* rejected_scores) {
  validate_pairs(model, pairs, "reward_model_eval");
  require_micro(micro_batch_pairs, "micro_batch_pairs");
  const int64_t N = pairs.chosen.batch, chunk = chunk_of(micro_batch_pairs, N);
  std::vector<float> rc(static_cast<size_t>(N)), rr(static_cast<size_t>(N));
  PairSums sums;
  for (int64_t p0 = 0; p0 < N; p0 += chunk) {
    const int64_t p1 = std::min(N, p0 + chunk), n = p1 - p0;
    const Packed p = pack({{&pairs.chosen, nullptr, Targets::None, p0, p1},
                           {&pairs.rejected, nullptr, Targets::None, p0, p1}});
    std::vector<float> values(static_cast<size_t>(p.batch * p.steps));
    model::ForwardRequest req;
    req.values = values.data();
    model.forward(p.view(), req);
    for (int64_t i = 0; i < n; ++i) {
      rc[p0 + i] = values[i * p.steps + p.lengths[i] - 1];
      rr[p0 + i] = values[(n + i) * p.steps + p.lengths[n + i] - 1];
      sums.add(rc[p0 + i], rr[p0 + i]);
    }
  }
  if (chosen_scores) *chosen_scores = rc;
  if (rejected_scores) *rejected_scores = rr;
  return {{"ranking_loss", sums.ranking / N},
          {"accuracy", static_cast<double>(sums.correct) / N},
          {"margin", sums.margin / N},
          {"chosen_score", sums.chosen / N},
          {"rejected_score", sums.rejected / N},
          {"pairs", static_cast<double>(N)}};
}

std::vector<float> score_sequences(Model& model, const TokenBatch& batch, int64_t micro_batch) {
  require_value_head(model, "score_sequences");
  validate_batch(model, batch, "");
  require_micro(micro_batch, "micro_batch");
  const int64_t chunk = chunk_of(micro_batch, batch.batch);
  std::vector<float> out(static_cast<size_t>(batch.batch));
  for (int64_t r0 = 0; r0 < batch.batch; r0 += chunk) {
    const int64_t r1 = std::min(batch.batch, r0 + chunk);
    const Packed p = pack({{&batch, nullptr, Targets::None, r0, r1}});
    std::vector<float> values(static_cast<size_t>(p.batch * p.steps));
    model::ForwardRequest req;
    req.values = values.data();
    model.forward(p.view(), req);
    for (int64_t i = 0; i < p.batch; ++i) out[r0 + i] = values[i * p.steps + p.lengths[i] - 1];
  }
  return out;
}

}  // namespace ppo::trainer
