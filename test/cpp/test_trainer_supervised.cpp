// The supervised trainers (csrc/trainer/trainer.h: sft_step, lm_eval, reward_model_step,
// reward_model_eval, score_sequences) and the shared pieces (scheduled_lr, check_optimizer,
// snapshots, repeated_ngram_fraction) against the independent float64 GPT-2 of
// gpt_reference.h:
//   - losses and scores equal the reference's;
//   - the parameters after a step equal a float64 reference step: the gradient of the
//     float64 loss by central finite differences over EVERY parameter, global-norm
//     clipping as the engine does it, then PyTorch's AdamW (bias correction, decoupled
//     weight decay on Matrix/Head tensors only) at the scheduled learning rate; two steps
//     (moments carried);
//   - micro-batching gives the full batch's step;
//   - a non-finite loss skips the step and leaves the model bit for bit as it was;
//   - errors carry a code and the argument's name.
//
// Tolerances (derivation):
//   The float64 finite differences (h = 1e-5, loss O(3)) are accurate to ~1e-10; the error
//   that matters is the engine's float32 gradient, measured against them on these models
//   at <= 1e-7 absolute per element (SFT) and <= 1.8e-7 (reward model) (printed by the
//   tests; <= 2.2e-7 on other tiny batches tried). We take dG = 5e-7 as its bound. The AdamW update u = lr * mhat / (sqrt(vhat) + eps) moves by
//   at most lr * dG / eps per gradient that feeds it (|d u / d g| <= lr / eps for step 1;
//   <= 2 lr / eps summed over the two gradients of step 2). These tests use eps = 1e-3 so
//   that this bound is uniform (with eps = 1e-8 an element whose true gradient is 0, e.g.
//   the attention key biases, which softmax's shift invariance makes exactly 0, gets an
//   update of up to lr * noise / (noise + eps) ~ lr: no tolerance below lr would hold):
//     step 1:  lr1 = 5e-4 (warmup):  lr1 * dG / eps = 2.5e-7;
//     step 2:  lr2 = 1e-3:            2 * lr2 * dG / eps = 1e-6, plus step 1's 2.5e-7;
//   plus ~2 float ulps of |p| <= 2 (4.8e-7) of rounding. Hence 1e-6 after step 1 and 2e-6
//   after step 2. The first moment after step 1 is m = (1 - beta1) * clip_scale * g: a
//   direct check of the trainer's gradient at 0.1 * dG = 5e-8.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "model/gpt.h"
#include "test_framework.h"
#include "test_util.h"
#include "gpt_reference.h"
#include "trainer/trainer.h"

using ppo::ErrorCode;
using namespace ppo::model;
using namespace ppo::trainer;
using gpt_ref::Ref;
using gpt_ref::params_double;
using gpt_ref::perturb;
using gpt_ref::tiny_config;
using gpt_ref::RefOutputs;
using gpt_ref::ref_forward;

namespace {

constexpr double kFdStep = 1e-5;

std::unique_ptr<Model> make_model(uint64_t seed, bool value_head = true) {
  auto m = std::make_unique<Model>(tiny_config(value_head), seed);
  perturb(*m, seed + 1000);
  return m;
}

std::vector<float> params_of(const Model& m) {
  return std::vector<float>(m.params(), m.params() + m.parameter_count());
}

// A right-padded batch: garbage at padded positions (never read), and a response mask that
// is 1 from position `prompt` on (plus 1s and garbage in the padding, which must be ignored).
struct Batch {
  int64_t B = 0, T = 0;
  std::vector<int32_t> tokens, lengths;
  std::vector<float> mask;
  TokenBatch view() const { return {B, T, tokens.data(), lengths.data()}; }
};
Batch make_batch(tu::Rng& rng, int64_t T, std::vector<int32_t> lengths, int64_t prompt) {
  Batch b;
  b.B = static_cast<int64_t>(lengths.size());
  b.T = T;
  b.lengths = std::move(lengths);
  b.tokens = tu::tokens(rng, b.B * T, 23);
  b.mask.assign(b.B * T, 0.0f);
  for (int64_t i = 0; i < b.B; ++i)
    for (int64_t t = 0; t < T; ++t) {
      if (t >= b.lengths[i]) {
        b.tokens[i * T + t] = (t % 2) ? -7 : 1 << 20;  // garbage: must never be read
        b.mask[i * T + t] = (t % 2) ? 1.0f : 0.25f;    // likewise
      } else {
        b.mask[i * T + t] = t >= prompt ? 1.0f : 0.0f;
      }
    }
  return b;
}

double stat(const Stats& s, const std::string& key) {
  for (const auto& kv : s)
    if (kv.first == key) return kv.second;
  tf::report_failure(__FILE__, __LINE__, "missing stat '" + key + "'");
  return std::numeric_limits<double>::quiet_NaN();
}
std::vector<std::string> keys(const Stats& s) {
  std::vector<std::string> k;
  for (const auto& kv : s) k.push_back(kv.first);
  return k;
}

// Central finite differences of a float64 loss over every parameter; `loss` returns
// several components at once (one pass of the reference serves them all).
std::vector<std::vector<double>> fd_gradients(std::vector<double> p, size_t components,
                                              const std::function<std::vector<double>(const std::vector<double>&)>& loss) {
  std::vector<std::vector<double>> g(components, std::vector<double>(p.size()));
  for (size_t k = 0; k < p.size(); ++k) {
    const double keep = p[k];
    p[k] = keep + kFdStep;
    const std::vector<double> up = loss(p);
    p[k] = keep - kFdStep;
    const std::vector<double> down = loss(p);
    p[k] = keep;
    for (size_t c = 0; c < components; ++c) g[c][k] = (up[c] - down[c]) / (2 * kFdStep);
  }
  return g;
}

// The float64 optimizer step the trainers must take: the engine's clipping (scale =
// max / (norm + 1e-6) when norm > max), then PyTorch's AdamW with bias correction and
// decoupled weight decay on Matrix and Head tensors.
struct RefAdam {
  std::vector<double> m, v;
  int64_t t = 0;
  double norm = 0, scale = 1;
  bool clipped = false;

  void step(const ParameterLayout& lay, std::vector<double>& p, const std::vector<double>& grad, double lr,
            const OptimizerOptions& o) {
    if (m.empty()) m.assign(p.size(), 0.0), v.assign(p.size(), 0.0);
    double ss = 0;
    for (double g : grad) ss += g * g;
    norm = std::sqrt(ss);
    clipped = o.max_grad_norm > 0 && norm > o.max_grad_norm;
    scale = clipped ? o.max_grad_norm / (norm + 1e-6) : 1.0;
    ++t;
    const double bc1 = 1 - std::pow(o.beta1, static_cast<double>(t)), bc2 = 1 - std::pow(o.beta2, static_cast<double>(t));
    for (const ParamTensor& tensor : lay.tensors) {
      const bool decay = tensor.kind == ParamKind::Matrix || tensor.kind == ParamKind::Head;
      for (int64_t i = tensor.offset; i < tensor.offset + tensor.numel; ++i) {
        const double g = grad[i] * scale;
        m[i] = o.beta1 * m[i] + (1 - o.beta1) * g;
        v[i] = o.beta2 * v[i] + (1 - o.beta2) * g * g;
        if (decay) p[i] -= lr * o.weight_decay * p[i];
        p[i] -= lr * (m[i] / bc1) / (std::sqrt(v[i] / bc2) + o.eps);
      }
    }
  }
};

// The options of the reference comparisons: warmup (step 1 at lr/2, step 2 at lr), decay,
// betas (0.9, 0.95), eps = 1e-3 (see the tolerances at the top), clipping that bites.
OptimizerOptions test_optimizer() {
  OptimizerOptions o;
  o.lr = 1e-3;
  o.beta1 = 0.9;
  o.beta2 = 0.95;
  o.eps = 1e-3;
  o.weight_decay = 0.1;
  o.schedule = Schedule::WarmupInverseSqrt;
  o.warmup_steps = 2;
  o.max_grad_norm = 1.0;
  return o;
}

double max_abs_diff(const float* a, const std::vector<double>& b) {
  double d = 0;
  for (size_t i = 0; i < b.size(); ++i) d = std::max(d, std::fabs(static_cast<double>(a[i]) - b[i]));
  return d;
}

// ---- the SFT data ---------------------------------------------------------------------------
Batch sft_batch() {
  tu::Rng rng(101);
  return make_batch(rng, 7, {7, 5, 4}, 2);  // targets: t = 2..n-1 (5 + 3 + 2 tokens)
}
double ref_sft_loss(const ModelConfig& cfg, const ParameterLayout& lay, const std::vector<double>& p,
                    const Batch& b) {
  const Ref ref{cfg, lay, p};
  return ref_forward(ref, b.B, b.T, b.tokens, b.lengths, &b.mask).lm_loss;
}

// ---- the reward-model data ------------------------------------------------------------------
struct Pairs {
  Batch chosen, rejected;
  PairBatch view(bool with_mask = true) const {
    return {chosen.view(), rejected.view(), with_mask ? chosen.mask.data() : nullptr};
  }
};
Pairs rm_pairs() {
  tu::Rng rng(202);
  Pairs p;
  p.chosen = make_batch(rng, 7, {7, 4, 6, 3}, 2);
  p.rejected = make_batch(rng, 6, {5, 6, 2, 4}, 2);
  return p;
}
struct RmRef {
  std::vector<double> rc, rr;
  double ranking = 0, lm = 0;
  int64_t correct = 0;
};
double last_value(const RefOutputs& o, const Batch& b, int64_t i) { return o.values[i * b.T + b.lengths[i] - 1]; }
RmRef ref_rm(const ModelConfig& cfg, const ParameterLayout& lay, const std::vector<double>& p, const Pairs& pairs) {
  const Ref ref{cfg, lay, p};
  const RefOutputs c = ref_forward(ref, pairs.chosen.B, pairs.chosen.T, pairs.chosen.tokens, pairs.chosen.lengths,
                                   &pairs.chosen.mask);
  const RefOutputs r = ref_forward(ref, pairs.rejected.B, pairs.rejected.T, pairs.rejected.tokens,
                                   pairs.rejected.lengths, nullptr);
  RmRef out;
  const int64_t N = pairs.chosen.B;
  for (int64_t i = 0; i < N; ++i) {
    out.rc.push_back(last_value(c, pairs.chosen, i));
    out.rr.push_back(last_value(r, pairs.rejected, i));
    const double d = out.rc.back() - out.rr.back();
    out.ranking += std::log1p(std::exp(-d)) / N;  // -log sigmoid(d); |d| is O(1) here
    out.correct += d > 0 ? 1 : 0;
  }
  out.lm = c.lm_loss;
  return out;
}

}  // namespace

// ---- SFT ------------------------------------------------------------------------------------

TEST(sft_two_steps_match_float64_finite_difference_adamw) {
  auto model = make_model(1);
  const ModelConfig cfg = tiny_config();
  const ParameterLayout& lay = model->layout();
  const Batch b = sft_batch();
  const OptimizerOptions o = test_optimizer();
  RefAdam adam;
  const char* want_keys[] = {"loss", "tokens", "grad_norm", "clipped", "lr", "step", "skipped"};

  for (int step = 1; step <= 2; ++step) {
    const std::vector<double> at = params_double(*model);  // the engine's parameters now
    const double want_loss = ref_sft_loss(cfg, lay, at, b);
    const std::vector<double> g =
        fd_gradients(at, 1, [&](const std::vector<double>& q) { return std::vector<double>{ref_sft_loss(cfg, lay, q, b)}; })[0];
    const double lr = step == 1 ? 5e-4 : 1e-3;  // warmup 2: lr * s / 2
    std::vector<double> want = at;
    adam.step(lay, want, g, lr, o);
    CHECK(adam.clipped);  // max_grad_norm 1 bites (norms ~4)

    const Stats s = sft_step(*model, b.view(), b.mask.data(), 0, o);
    CHECK(keys(s) == std::vector<std::string>(std::begin(want_keys), std::end(want_keys)));
    CHECK_NEAR(stat(s, "loss"), want_loss, 0, 1e-5);
    CHECK(stat(s, "tokens") == 10);
    CHECK_NEAR(stat(s, "grad_norm"), adam.norm, 0, 1e-5);
    CHECK(stat(s, "clipped") == 1);
    CHECK_NEAR(stat(s, "lr"), lr, 0, 1e-15);
    CHECK(stat(s, "step") == step);
    CHECK(stat(s, "skipped") == 0);
    CHECK(model->optimizer_steps() == step);
    CHECK(model->grad_norm() == 0.0);  // gradients cleared after the step
    if (step == 1) {
      // m = (1 - beta1) * clipped gradient: the trainer's gradient, element by element.
      CHECK_ALL_NEAR(model->optimizer_m(), adam.m.data(), model->parameter_count(), 5e-8, 0, "adam m");
    }
    const double tol = step == 1 ? 1e-6 : 2e-6;
    std::printf("    step %d: max |param - reference| = %.3g (tolerance %.0e), max |m - reference| = %.3g\n", step,
                max_abs_diff(model->params(), want), tol, max_abs_diff(model->optimizer_m(), adam.m));
    if (step == 1)
      std::printf("    step 1: max |engine gradient - finite differences| = %.3g (dG = 5e-7)\n",
                  max_abs_diff(model->optimizer_m(), adam.m) / ((1 - o.beta1) * adam.scale));
    CHECK_ALL_NEAR(model->params(), want.data(), model->parameter_count(), tol, 0, "params");
  }
}

TEST(sft_micro_batches_take_the_full_batch_step) {
  const Batch b = sft_batch();
  const OptimizerOptions o = test_optimizer();
  std::vector<std::vector<float>> after;
  std::vector<std::vector<float>> moments;
  std::vector<double> losses;
  for (int64_t micro : {0, 1, 2, 3, 10}) {
    auto model = make_model(1);
    for (int step = 0; step < 2; ++step) {
      const Stats s = sft_step(*model, b.view(), b.mask.data(), micro, o);
      if (step == 0) losses.push_back(stat(s, "loss"));
    }
    after.push_back(params_of(*model));
    moments.emplace_back(model->optimizer_m(), model->optimizer_m() + model->parameter_count());
  }
  for (size_t i = 1; i < after.size(); ++i) {
    CHECK_NEAR(losses[i], losses[0], 0, 1e-6);
    CHECK_ALL_NEAR(after[i].data(), after[0].data(), static_cast<int64_t>(after[0].size()), 1e-6, 0, "params");
    // m after two steps: 0.09 g1 + 0.1 g2 (clipped): the accumulated gradients agree.
    CHECK_ALL_NEAR(moments[i].data(), moments[0].data(), static_cast<int64_t>(moments[0].size()), 2e-8, 0, "adam m");
  }
  // Compare this line between PPO_MAX_THREADS=1 and 3: the same bits whatever the pool size.
  uint64_t h = 1469598103934665603ull;
  for (float v : after[0]) {
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    h = (h ^ bits) * 1099511628211ull;
  }
  std::printf("    checksum of the parameters after two SFT steps: %016llx\n", static_cast<unsigned long long>(h));
  // Deterministic: the same call twice gives the same bits.
  auto again = make_model(1);
  sft_step(*again, b.view(), b.mask.data(), 2, o);
  sft_step(*again, b.view(), b.mask.data(), 2, o);
  CHECK_BITWISE_EQUAL(again->params(), after[2].data(), again->parameter_count(), "params (repeat)");
}

TEST(lm_eval_matches_reference_and_has_no_side_effects) {
  auto model = make_model(3);
  const Batch b = sft_batch();
  const std::vector<float> before = params_of(*model);
  const double want = ref_sft_loss(tiny_config(), model->layout(), params_double(*model), b);
  for (int64_t micro : {0, 1, 2}) {
    const Stats s = lm_eval(*model, b.view(), b.mask.data(), micro);
    CHECK(keys(s) == (std::vector<std::string>{"loss", "tokens", "perplexity"}));
    CHECK_NEAR(stat(s, "loss"), want, 0, 1e-5);
    CHECK(stat(s, "tokens") == 10);
    CHECK_NEAR(stat(s, "perplexity"), std::exp(want), 0, 1e-5);
  }
  // No mask: every position 1 <= t < n (6 + 4 + 3 tokens).
  const Ref ref{tiny_config(), model->layout(), params_double(*model)};
  const double want_all = ref_forward(ref, b.B, b.T, b.tokens, b.lengths, nullptr).lm_loss;
  const Stats all = lm_eval(*model, b.view(), nullptr, 0);
  CHECK_NEAR(stat(all, "loss"), want_all, 0, 1e-5);
  CHECK(stat(all, "tokens") == 13);
  CHECK_BITWISE_EQUAL(model->params(), before.data(), model->parameter_count(), "params");
  CHECK(model->grads() == nullptr);
  CHECK(model->optimizer_steps() == 0);
}

// ---- reward model ---------------------------------------------------------------------------

TEST(reward_model_step_matches_float64_finite_difference_adamw) {
  const ModelConfig cfg = tiny_config();
  const Pairs pairs = rm_pairs();
  const OptimizerOptions o = test_optimizer();
  auto probe = make_model(5);
  const ParameterLayout& lay = probe->layout();
  const std::vector<double> p0 = params_double(*probe);
  const RmRef r0 = ref_rm(cfg, lay, p0, pairs);
  std::printf("    reference: %lld of 4 pairs ranked right\n", static_cast<long long>(r0.correct));
  CHECK(r0.correct > 0 && r0.correct < 4);  // a mix of right and wrong pairs
  // One pass of finite differences gives both terms' gradients.
  const std::vector<std::vector<double>> g = fd_gradients(p0, 2, [&](const std::vector<double>& q) {
    const RmRef r = ref_rm(cfg, lay, q, pairs);
    return std::vector<double>{r.ranking, r.lm};
  });
  const char* want_keys[] = {"loss",     "ranking_loss", "lm_loss", "accuracy", "margin", "chosen_score",
                             "rejected_score", "grad_norm", "clipped", "lr", "step", "skipped"};
  for (double lm_coef : {1.0, 0.0, 0.5}) {
    auto model = make_model(5);
    std::vector<double> total(p0.size());
    for (size_t k = 0; k < total.size(); ++k) total[k] = g[0][k] + lm_coef * g[1][k];
    std::vector<double> want = p0;
    RefAdam adam;
    adam.step(lay, want, total, 5e-4, o);
    const Stats s = reward_model_step(*model, pairs.view(), lm_coef, 0, o);
    const std::string ctx = "lm_coef " + std::to_string(lm_coef);
    CHECK(keys(s) == std::vector<std::string>(std::begin(want_keys), std::end(want_keys)));
    CHECK_NEAR_CTX(stat(s, "loss"), r0.ranking + lm_coef * r0.lm, 0, 1e-5, ctx);
    CHECK_NEAR_CTX(stat(s, "ranking_loss"), r0.ranking, 0, 1e-5, ctx);
    if (lm_coef > 0) CHECK_NEAR_CTX(stat(s, "lm_loss"), r0.lm, 0, 1e-5, ctx);
    else CHECK(stat(s, "lm_loss") == 0.0);  // not computed without the LM term
    CHECK(stat(s, "accuracy") == static_cast<double>(r0.correct) / 4);
    double margin = 0, chosen = 0, rejected = 0;
    for (size_t i = 0; i < r0.rc.size(); ++i) margin += (r0.rc[i] - r0.rr[i]) / 4, chosen += r0.rc[i] / 4, rejected += r0.rr[i] / 4;
    CHECK_NEAR_CTX(stat(s, "margin"), margin, 1e-6, 1e-5, ctx);
    CHECK_NEAR_CTX(stat(s, "chosen_score"), chosen, 1e-6, 1e-5, ctx);
    CHECK_NEAR_CTX(stat(s, "rejected_score"), rejected, 1e-6, 1e-5, ctx);
    CHECK_NEAR_CTX(stat(s, "grad_norm"), adam.norm, 0, 1e-5, ctx);
    CHECK(stat(s, "clipped") == (adam.clipped ? 1 : 0));
    CHECK(stat(s, "lr") == 5e-4);
    CHECK(stat(s, "step") == 1);
    CHECK(stat(s, "skipped") == 0);
    CHECK(model->grad_norm() == 0.0);
    if (lm_coef == 1.0) CHECK(adam.clipped);
    CHECK_ALL_NEAR(model->optimizer_m(), adam.m.data(), model->parameter_count(), 5e-8, 0, "adam m");
    std::printf("    lm_coef %.1f: max |param - reference| = %.3g, max |engine gradient - finite differences| = %.3g\n",
                lm_coef, max_abs_diff(model->params(), want),
                max_abs_diff(model->optimizer_m(), adam.m) / ((1 - o.beta1) * adam.scale));
    CHECK_ALL_NEAR(model->params(), want.data(), model->parameter_count(), 1e-6, 0, "params");
  }
}

TEST(reward_model_micro_batches_take_the_full_batch_step) {
  const Pairs pairs = rm_pairs();
  const OptimizerOptions o = test_optimizer();
  std::vector<std::vector<float>> after;
  for (int64_t micro : {0, 1, 3}) {
    auto model = make_model(5);
    reward_model_step(*model, pairs.view(), 1.0, micro, o);
    reward_model_step(*model, pairs.view(), 1.0, micro, o);
    after.push_back(params_of(*model));
  }
  for (size_t i = 1; i < after.size(); ++i)
    CHECK_ALL_NEAR(after[i].data(), after[0].data(), static_cast<int64_t>(after[0].size()), 1e-6, 0, "params");
  // Without a chosen target mask the LM term covers every position of the chosen rows.
  auto model = make_model(5);
  const Ref ref{tiny_config(), model->layout(), params_double(*model)};
  const Batch& c = pairs.chosen;
  const double lm_all = ref_forward(ref, c.B, c.T, c.tokens, c.lengths, nullptr).lm_loss;
  const Stats s = reward_model_step(*model, pairs.view(false), 1.0, 2, o);
  CHECK_NEAR(stat(s, "lm_loss"), lm_all, 0, 1e-5);
}

TEST(reward_model_eval_and_score_sequences_equal_the_reference_last_token_values) {
  auto model = make_model(7);
  const Pairs pairs = rm_pairs();
  const RmRef want = ref_rm(tiny_config(), model->layout(), params_double(*model), pairs);
  const std::vector<float> before = params_of(*model);
  for (int64_t micro : {0, 1, 3}) {
    std::vector<float> rc, rr;
    const Stats s = reward_model_eval(*model, pairs.view(), micro, &rc, &rr);
    CHECK(keys(s) ==
          (std::vector<std::string>{"ranking_loss", "accuracy", "margin", "chosen_score", "rejected_score", "pairs"}));
    CHECK(rc.size() == 4 && rr.size() == 4);
    CHECK_ALL_NEAR(rc.data(), want.rc.data(), 4, 2e-5, 1e-4, "chosen scores");
    CHECK_ALL_NEAR(rr.data(), want.rr.data(), 4, 2e-5, 1e-4, "rejected scores");
    CHECK_NEAR(stat(s, "ranking_loss"), want.ranking, 0, 1e-5);
    CHECK(stat(s, "accuracy") == static_cast<double>(want.correct) / 4);
    CHECK(stat(s, "pairs") == 4);
    const std::vector<float> sc = score_sequences(*model, pairs.chosen.view(), micro);
    const std::vector<float> sr = score_sequences(*model, pairs.rejected.view(), micro);
    CHECK_ALL_NEAR(sc.data(), want.rc.data(), 4, 2e-5, 1e-4, "score_sequences chosen");
    CHECK_ALL_NEAR(sr.data(), want.rr.data(), 4, 2e-5, 1e-4, "score_sequences rejected");
  }
  // A tie (the same sequence chosen and rejected) is not a correct ranking: r_c > r_r strictly.
  Pairs tie = pairs;
  tie.rejected = tie.chosen;
  for (int64_t micro : {0, 1}) {
    std::vector<float> rc, rr;
    const Stats s = reward_model_eval(*model, tie.view(), micro, &rc, &rr);
    CHECK(rc == rr);
    CHECK(stat(s, "accuracy") == 0.0);
    CHECK(stat(s, "margin") == 0.0);
    CHECK_NEAR(stat(s, "ranking_loss"), std::log(2.0), 0, 1e-15);
  }
  // A batch without lengths: the last position of every row.
  const Batch& c = pairs.chosen;
  std::vector<int32_t> full(c.tokens);
  for (auto& t : full) t = std::max(0, std::min(22, t));
  const std::vector<float> s = score_sequences(*model, {c.B, c.T, full.data(), nullptr}, 0);
  const Ref ref{tiny_config(), model->layout(), params_double(*model)};
  const RefOutputs o = ref_forward(ref, c.B, c.T, full, std::vector<int32_t>(c.B, static_cast<int32_t>(c.T)), nullptr);
  for (int64_t i = 0; i < c.B; ++i) CHECK_NEAR(s[i], o.values[i * c.T + c.T - 1], 2e-5, 1e-4);
  CHECK_BITWISE_EQUAL(model->params(), before.data(), model->parameter_count(), "params");
}

// ---- non-finite steps -----------------------------------------------------------------------

TEST(a_non_finite_loss_skips_the_step_and_leaves_the_model_bit_identical) {
  const OptimizerOptions o = test_optimizer();
  // SFT: rows of lengths 4, 5, 7; only the last row reaches position 5, whose position
  // embedding gets a NaN: with micro_batch 1 the first two micro-batches are finite and
  // already backpropagated when the third turns NaN.
  tu::Rng rng(303);
  const Batch b = make_batch(rng, 7, {4, 5, 7}, 1);
  for (int64_t micro : {0, 1}) {
    auto model = make_model(9);
    sft_step(*model, b.view(), b.mask.data(), micro, o);  // a first, finite step: moments exist
    model->mutable_params()[model->layout().wpe + 5 * 12 + 3] = tu::kNaN;
    const ModelSnapshot before = take_snapshot(*model);
    const Stats s = sft_step(*model, b.view(), b.mask.data(), micro, o);
    CHECK(stat(s, "skipped") == 1);
    CHECK(std::isnan(stat(s, "loss")));
    CHECK(stat(s, "step") == 1);
    CHECK(model->optimizer_steps() == 1);
    CHECK(model->grad_norm() == 0.0);  // the partial gradients were discarded
    CHECK(std::isnan(stat(lm_eval(*model, b.view(), b.mask.data(), micro), "loss")));
    CHECK_BITWISE_EQUAL(model->params(), before.params.data(), model->parameter_count(), "params");
    CHECK_BITWISE_EQUAL(model->optimizer_m(), before.adam_m.data(), model->parameter_count(), "adam m");
    CHECK_BITWISE_EQUAL(model->optimizer_v(), before.adam_v.data(), model->parameter_count(), "adam v");
    // The rows that do not reach position 5 still train.
    const TokenBatch first_two{2, 7, b.tokens.data(), b.lengths.data()};
    const Stats ok = sft_step(*model, first_two, b.mask.data(), micro, o);
    CHECK(stat(ok, "skipped") == 0);
    CHECK(model->optimizer_steps() == 2);
  }
  // Reward model: a NaN weight in the first block poisons every score.
  const Pairs pairs = rm_pairs();
  for (double lm_coef : {0.0, 1.0}) {
    auto model = make_model(11);
    reward_model_step(*model, pairs.view(), lm_coef, 0, o);
    model->mutable_params()[model->layout().blocks[0].fc_weight + 17] = tu::kNaN;
    const ModelSnapshot before = take_snapshot(*model);
    const Stats s = reward_model_step(*model, pairs.view(), lm_coef, 2, o);
    CHECK(stat(s, "skipped") == 1);
    CHECK(model->optimizer_steps() == 1);
    CHECK(model->grad_norm() == 0.0);
    CHECK_BITWISE_EQUAL(model->params(), before.params.data(), model->parameter_count(), "params");
    CHECK_BITWISE_EQUAL(model->optimizer_m(), before.adam_m.data(), model->parameter_count(), "adam m");
    CHECK_BITWISE_EQUAL(model->optimizer_v(), before.adam_v.data(), model->parameter_count(), "adam v");
  }
  // An SFT batch without any target token is an error, not a skip.
  auto model = make_model(13);
  const std::vector<float> before = params_of(*model);
  std::vector<float> none(b.mask.size(), 0.0f);
  CHECK_THROWS_CODE(sft_step(*model, b.view(), none.data(), 0, o), ErrorCode::InvalidArgument, "target_mask");
  std::vector<int32_t> ones(3, 1);
  CHECK_THROWS_CODE(sft_step(*model, {3, 7, b.tokens.data(), ones.data()}, nullptr, 0, o), ErrorCode::InvalidArgument,
                    "target_mask");
  CHECK_THROWS_CODE(lm_eval(*model, b.view(), none.data(), 0), ErrorCode::InvalidArgument, "target_mask");
  CHECK_BITWISE_EQUAL(model->params(), before.data(), model->parameter_count(), "params");
  CHECK(model->optimizer_steps() == 0);
}

// ---- argument errors ------------------------------------------------------------------------

TEST(bad_arguments_throw_with_a_code_and_the_argument) {
  auto model = make_model(15);
  auto no_head = make_model(15, false);
  const Batch b = sft_batch();
  const Pairs pairs = rm_pairs();
  const OptimizerOptions o = test_optimizer();
  const std::vector<float> before = params_of(*model);

  CHECK_THROWS_CODE(sft_step(*model, b.view(), b.mask.data(), -1, o), ErrorCode::InvalidArgument, "micro_batch");
  OptimizerOptions bad = o;
  bad.lr = -1;
  CHECK_THROWS_CODE(sft_step(*model, b.view(), b.mask.data(), 0, bad), ErrorCode::InvalidArgument, "optimizer.lr");
  std::vector<float> half = b.mask;
  half[0 * 7 + 3] = 0.5f;
  CHECK_THROWS_CODE(sft_step(*model, b.view(), half.data(), 0, o), ErrorCode::OutOfRange, "target_mask");
  Batch oov = b;
  oov.tokens[1 * 7 + 2] = 23;
  CHECK_THROWS_CODE(sft_step(*model, oov.view(), b.mask.data(), 0, o), ErrorCode::OutOfRange, "tokens");
  Batch badlen = b;
  badlen.lengths[2] = 8;
  CHECK_THROWS_CODE(sft_step(*model, badlen.view(), b.mask.data(), 0, o), ErrorCode::OutOfRange, "lengths");
  CHECK_THROWS_CODE(sft_step(*model, {0, 7, b.tokens.data(), nullptr}, nullptr, 0, o), ErrorCode::InvalidArgument,
                    "batch");
  std::vector<int32_t> long_tokens(13, 1);
  CHECK_THROWS_CODE(lm_eval(*model, {1, 13, long_tokens.data(), nullptr}, nullptr, 0), ErrorCode::OutOfRange, "steps");

  // Reward model.
  PairBatch three = pairs.view();
  three.rejected.batch = 3;
  CHECK_THROWS_CODE(reward_model_step(*model, three, 1.0, 0, o), ErrorCode::ShapeMismatch, "pairs");
  CHECK_THROWS_CODE(reward_model_eval(*model, three, 0), ErrorCode::ShapeMismatch, "pairs");
  CHECK_THROWS_CODE(reward_model_step(*no_head, pairs.view(), 1.0, 0, o), ErrorCode::InvalidArgument, "model");
  CHECK_THROWS_CODE(reward_model_eval(*no_head, pairs.view(), 0), ErrorCode::InvalidArgument, "model");
  CHECK_THROWS_CODE(score_sequences(*no_head, b.view(), 0), ErrorCode::InvalidArgument, "model");
  CHECK_THROWS_CODE(reward_model_step(*model, pairs.view(), -1.0, 0, o), ErrorCode::InvalidArgument, "lm_coef");
  CHECK_THROWS_CODE(reward_model_step(*model, pairs.view(), tu::kNaN, 0, o), ErrorCode::InvalidArgument, "lm_coef");
  CHECK_THROWS_CODE(reward_model_step(*model, pairs.view(), 1.0, -2, o), ErrorCode::InvalidArgument,
                    "micro_batch_pairs");
  Pairs oovp = pairs;
  oovp.rejected.tokens[0] = -1;
  CHECK_THROWS_CODE(reward_model_step(*model, oovp.view(), 1.0, 0, o), ErrorCode::OutOfRange, "rejected.tokens");
  Pairs badmask = pairs;
  badmask.chosen.mask[2] = 2.0f;
  CHECK_THROWS_CODE(reward_model_step(*model, badmask.view(), 1.0, 0, o), ErrorCode::OutOfRange, "chosen_target_mask");
  Pairs nolm = pairs;
  std::fill(nolm.chosen.mask.begin(), nolm.chosen.mask.end(), 0.0f);
  CHECK_THROWS_CODE(reward_model_step(*model, nolm.view(), 1.0, 0, o), ErrorCode::InvalidArgument,
                    "chosen_target_mask");
  CHECK_NO_THROW(reward_model_eval(*model, nolm.view(), 0));  // no LM term there
  bad = o;
  bad.beta2 = 1.0;
  CHECK_THROWS_CODE(reward_model_step(*model, pairs.view(), 1.0, 0, bad), ErrorCode::InvalidArgument,
                    "optimizer.beta2");
  CHECK_BITWISE_EQUAL(model->params(), before.data(), model->parameter_count(), "params after refused calls");
  CHECK(model->optimizer_steps() == 0);

  // A frozen model cannot take a step (the engine's error), but can be evaluated.
  ModelOptions frozen_opt;
  frozen_opt.trainable = false;
  Model frozen(tiny_config(), 17, frozen_opt);
  CHECK_THROWS_CODE(sft_step(frozen, b.view(), b.mask.data(), 0, o), ErrorCode::InvalidArgument, "trainable");
  CHECK_THROWS_CODE(reward_model_step(frozen, pairs.view(), 1.0, 0, o), ErrorCode::InvalidArgument, "trainable");
  CHECK_NO_THROW(reward_model_eval(frozen, pairs.view(), 0));
  CHECK_NO_THROW(lm_eval(frozen, b.view(), b.mask.data(), 0));
}

// ---- schedules, options, snapshots, n-grams -------------------------------------------------

TEST(scheduled_lr_tables) {
  OptimizerOptions o;
  o.lr = 0.1;
  for (int64_t s : {1, 2, 100}) CHECK(scheduled_lr(o, s) == 0.1);
  o.schedule = Schedule::WarmupInverseSqrt;
  o.warmup_steps = 4;
  const double inv[][2] = {{1, 0.025}, {2, 0.05}, {3, 0.075}, {4, 0.1}, {9, 0.1 * std::sqrt(4.0 / 9)},
                           {16, 0.05}, {400, 0.01}};
  for (const auto& r : inv) CHECK_NEAR_CTX(scheduled_lr(o, static_cast<int64_t>(r[0])), r[1], 0, 1e-15, std::to_string(r[0]));
  o.warmup_steps = 0;
  const double nowarm[][2] = {{1, 0.1}, {4, 0.05}, {100, 0.01}};
  for (const auto& r : nowarm) CHECK_NEAR_CTX(scheduled_lr(o, static_cast<int64_t>(r[0])), r[1], 0, 1e-15, std::to_string(r[0]));
  o.schedule = Schedule::WarmupLinearDecay;
  o.warmup_steps = 2;
  o.total_steps = 10;
  const double lin[][2] = {{1, 0.05}, {2, 0.1}, {3, 0.0875}, {6, 0.05}, {9, 0.0125}, {10, 0.0}, {15, 0.0}};
  for (const auto& r : lin) CHECK_NEAR_CTX(scheduled_lr(o, static_cast<int64_t>(r[0])), r[1], 0, 1e-15, std::to_string(r[0]));
  o.warmup_steps = 0;
  CHECK_NEAR(scheduled_lr(o, 1), 0.09, 0, 1e-15);
  CHECK_NEAR(scheduled_lr(o, 5), 0.05, 0, 1e-15);
  CHECK_THROWS_CODE(scheduled_lr(o, 0), ErrorCode::OutOfRange, "step");
}

TEST(check_optimizer_rejections) {
  OptimizerOptions ok;
  CHECK_NO_THROW(check_optimizer(ok, "opt"));
  struct Case {
    void (*edit)(OptimizerOptions&);
    const char* arg;
  };
  const Case cases[] = {
      {[](OptimizerOptions& o) { o.lr = -1e-3; }, "opt.lr"},
      {[](OptimizerOptions& o) { o.lr = std::numeric_limits<double>::infinity(); }, "opt.lr"},
      {[](OptimizerOptions& o) { o.lr = std::nan(""); }, "opt.lr"},
      {[](OptimizerOptions& o) { o.beta1 = 1.0; }, "opt.beta1"},
      {[](OptimizerOptions& o) { o.beta1 = -0.1; }, "opt.beta1"},
      {[](OptimizerOptions& o) { o.beta2 = 1.0; }, "opt.beta2"},
      {[](OptimizerOptions& o) { o.eps = 0.0; }, "opt.eps"},
      {[](OptimizerOptions& o) { o.weight_decay = -0.1; }, "opt.weightDecay"},
      {[](OptimizerOptions& o) { o.max_grad_norm = -1; }, "opt.maxGradNorm"},
      {[](OptimizerOptions& o) { o.max_grad_norm = std::nan(""); }, "opt.maxGradNorm"},
      {[](OptimizerOptions& o) { o.warmup_steps = -1; }, "opt.warmupSteps"},
      {[](OptimizerOptions& o) { o.schedule = static_cast<Schedule>(7); }, "opt.schedule"},
      {[](OptimizerOptions& o) {
         o.schedule = Schedule::WarmupLinearDecay;
         o.warmup_steps = 10;
         o.total_steps = 10;
       },
       "opt.totalSteps"},
  };
  for (const Case& c : cases) {
    OptimizerOptions o;
    c.edit(o);
    CHECK_THROWS_CODE(check_optimizer(o, "opt"), ErrorCode::InvalidArgument, c.arg);
  }
  OptimizerOptions edge;
  edge.lr = 0;
  edge.beta1 = 0;
  edge.beta2 = 0;
  edge.schedule = Schedule::WarmupLinearDecay;
  edge.warmup_steps = 10;
  edge.total_steps = 11;
  CHECK_NO_THROW(check_optimizer(edge, "opt"));
}

TEST(snapshot_restore_round_trip_is_bit_identical) {
  const Batch b = sft_batch();
  OptimizerOptions o = test_optimizer();
  o.eps = 1e-8;
  auto model = make_model(19);
  const ModelSnapshot s0 = take_snapshot(*model);  // before any step: no moments
  CHECK(s0.adam_m.empty() && s0.adam_v.empty() && s0.adam_steps == 0);
  sft_step(*model, b.view(), b.mask.data(), 0, o);
  sft_step(*model, b.view(), b.mask.data(), 0, o);
  const ModelSnapshot s2 = take_snapshot(*model);
  CHECK(s2.adam_steps == 2 && s2.adam_m.size() == static_cast<size_t>(model->parameter_count()));
  CHECK(std::memcmp(s0.params.data(), s2.params.data(), s0.params.size() * sizeof(float)) != 0);

  restore_snapshot(*model, s0);  // the model has moments now, the snapshot none
  CHECK_BITWISE_EQUAL(model->params(), s0.params.data(), model->parameter_count(), "params (s0)");
  CHECK(model->optimizer_m() == nullptr && model->optimizer_v() == nullptr);
  CHECK(model->optimizer_steps() == 0);
  // Training again from the restored state retraces the same bits.
  sft_step(*model, b.view(), b.mask.data(), 0, o);
  sft_step(*model, b.view(), b.mask.data(), 0, o);
  CHECK_BITWISE_EQUAL(model->params(), s2.params.data(), model->parameter_count(), "params (retrace)");
  CHECK_BITWISE_EQUAL(model->optimizer_m(), s2.adam_m.data(), model->parameter_count(), "m (retrace)");
  sft_step(*model, b.view(), b.mask.data(), 0, o);
  restore_snapshot(*model, s2);
  CHECK_BITWISE_EQUAL(model->params(), s2.params.data(), model->parameter_count(), "params (s2)");
  CHECK_BITWISE_EQUAL(model->optimizer_m(), s2.adam_m.data(), model->parameter_count(), "m (s2)");
  CHECK_BITWISE_EQUAL(model->optimizer_v(), s2.adam_v.data(), model->parameter_count(), "v (s2)");
  CHECK(model->optimizer_steps() == 2);

  // Refused snapshots change nothing.
  ModelSnapshot wrong = s0;
  wrong.params.pop_back();
  CHECK_THROWS_CODE(restore_snapshot(*model, wrong), ErrorCode::ShapeMismatch, "snapshot.params");
  wrong = s2;
  wrong.adam_v.clear();
  CHECK_THROWS_CODE(restore_snapshot(*model, wrong), ErrorCode::ShapeMismatch, "snapshot.adam_m");
  wrong = s0;
  wrong.adam_m = s2.adam_m;
  wrong.adam_v = s2.adam_v;
  wrong.adam_v[5] = tu::kNaN;
  CHECK_THROWS_CODE(restore_snapshot(*model, wrong), ErrorCode::NonFinite, "optimizer");
  CHECK_BITWISE_EQUAL(model->params(), s2.params.data(), model->parameter_count(), "params (after refusals)");
  CHECK(model->optimizer_steps() == 2);
}

TEST(repeated_ngram_fraction_counts_repeats) {
  const int32_t a[] = {1, 2, 3, 1, 2, 3};
  CHECK_NEAR(repeated_ngram_fraction(a, 6), 0.25, 0, 1e-15);  // 123 231 312 123
  CHECK(repeated_ngram_fraction(a, 3) == 0.0);
  CHECK(repeated_ngram_fraction(a, 2) == 0.0);  // below 3 tokens
  CHECK(repeated_ngram_fraction(nullptr, 0) == 0.0);
  const int32_t same[] = {5, 5, 5, 5, 5};
  CHECK_NEAR(repeated_ngram_fraction(same, 5), 2.0 / 3, 0, 1e-15);
  CHECK_NEAR(repeated_ngram_fraction(same, 5, 1), 0.8, 0, 1e-15);
  const int32_t distinct[] = {1, 2, 3, 4, 5, 6, 7};
  CHECK(repeated_ngram_fraction(distinct, 7) == 0.0);
  CHECK_NEAR(repeated_ngram_fraction(a, 6, 2), 0.4, 0, 1e-15);  // 12 23 31 12 23
  CHECK_THROWS_CODE(repeated_ngram_fraction(a, 6, 0), ErrorCode::InvalidArgument, "ngram");
  CHECK_THROWS_CODE(repeated_ngram_fraction(a, -1), ErrorCode::InvalidArgument, "n");
}

PPO_TEST_MAIN()
