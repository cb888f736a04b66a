// The PPO trainer (csrc/trainer/trainer.h: PpoOptions, Experience, PpoTrainer) against
// independent float64 re-implementations written here from the recipe
// (../shared/ppo-max.md) on top of the float64 GPT-2 of gpt_reference.h:
//   - rollout: the experience arrays against the reference forward of the assembled
//     rows (log-probs, reference log-probs, entropy, the critic's values shifted by one),
//     lengths / mask / truncation against the tokens, determinism per seed and rollout;
//   - shape: moments (Chan's merge), normalization / scaling / clipping of the scores,
//     the KL estimators k1/k2/k3, the penalized rewards and GAE;
//   - update: one mini-batch, one epoch, every loss term on (clipped surrogate that
//     clips, entropy bonus, ptx, clipped value loss, gradient-norm clipping that clips),
//     against the float64 losses and the gradient of EVERY parameter of policy and
//     critic by central finite differences of those losses, pushed through clipping and
//     AdamW in double; with and without advantage whitening and clipping;
//   - several mini-batches and epochs: equivalences and bit-reproducibility;
//   - non-finite steps restore both models and their optimizers bit for bit;
//   - the adaptive KL controller, option validation.
//
// Determinism across thread counts: run with PPO_MAX_THREADS=1 and =3; the "checksum"
// line printed by update_is_bit_reproducible must be the same.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "gpt_reference.h"
#include "model/gpt.h"
#include "test_framework.h"
#include "test_util.h"
#include "trainer/trainer.h"

using ppo::Device;
using ppo::ErrorCode;
using ppo::KlEstimator;
using namespace ppo::model;
using namespace ppo::trainer;
using gpt_ref::Ref;
using gpt_ref::params_double;
using gpt_ref::perturb;
using gpt_ref::tiny_config;
using gpt_ref::RefOutputs;
using gpt_ref::ref_forward;

namespace {

// The error code of an option outside its range. core/error.h documents "a bad option
// or argument value (e.g. gamma outside [0, 1])" as InvalidArgument, and the kernels'
// validation (core/validate.cpp scalar_in_range) throws InvalidArgument for gamma.
constexpr ErrorCode kBadOption = ErrorCode::InvalidArgument;

constexpr int32_t kEos = 22;  // gpt_ref::tiny_config's bos/eos
constexpr int64_t kPositions = 16;

std::shared_ptr<Model> make_model(bool value_head, uint64_t seed, bool trainable = true) {
  ModelOptions mo;
  mo.trainable = trainable;
  auto m = std::make_shared<Model>(tiny_config(value_head, kPositions), seed, mo);
  perturb(*m, seed + 1000);
  return m;
}

// A copy with the same parameters and optimizer state.
std::shared_ptr<Model> clone(const Model& m) {
  ModelOptions mo;
  mo.trainable = m.trainable();
  auto c = std::make_shared<Model>(m.config(), std::vector<float>(m.params(), m.params() + m.parameter_count()), mo);
  if (m.trainable()) c->set_optimizer_state(m.optimizer_m(), m.optimizer_v(), m.optimizer_steps());
  return c;
}

// The value of statistic `name`; a missing key fails the calling test.
double stat(const Stats& s, const std::string& name) {
  ++tf::state().checks;
  for (const auto& kv : s)
    if (kv.first == name) return kv.second;
  tf::report_failure(__FILE__, __LINE__, "stats have no key '" + name + "'");
  return std::numeric_limits<double>::quiet_NaN();
}

struct Prompts {
  int64_t B = 0, T = 0;
  std::vector<int32_t> tokens, lengths;
  TokenBatch view() const { return {B, T, tokens.data(), lengths.data()}; }
};
// Prompts of the given lengths, tokens uniform in [lo, hi], padding -5 (never read).
Prompts make_prompts(tu::Rng& rng, const std::vector<int32_t>& lengths, int32_t lo, int32_t hi) {
  Prompts p;
  p.B = static_cast<int64_t>(lengths.size());
  p.T = *std::max_element(lengths.begin(), lengths.end());
  p.lengths = lengths;
  p.tokens.assign(p.B * p.T, -5);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t t = 0; t < lengths[b]; ++t) p.tokens[b * p.T + t] = static_cast<int32_t>(tu::rand_int(rng, lo, hi));
  return p;
}

// Snapshot of a model's trainable state, for bit-identity checks.
struct Saved {
  std::vector<float> p, m, v;
  bool has_moments = false;
  int64_t steps = 0;
};
Saved save(const Model& m) {
  Saved s;
  s.p.assign(m.params(), m.params() + m.parameter_count());
  s.has_moments = m.optimizer_m() != nullptr;
  if (s.has_moments) {
    s.m.assign(m.optimizer_m(), m.optimizer_m() + m.parameter_count());
    s.v.assign(m.optimizer_v(), m.optimizer_v() + m.parameter_count());
  }
  s.steps = m.optimizer_steps();
  return s;
}
// The model's state is bit-identical to s (a model without moments may also hold zeros
// with the same step count: both mean "no moments").
void check_same_state(const Model& m, const Saved& s, const char* what) {
  const int64_t n = m.parameter_count();
  CHECK_BITWISE_EQUAL(m.params(), s.p.data(), n, what);
  CHECK(m.optimizer_steps() == s.steps);
  if (s.has_moments) {
    CHECK(m.optimizer_m() != nullptr && m.optimizer_v() != nullptr);
    if (m.optimizer_m() && m.optimizer_v()) {
      CHECK_BITWISE_EQUAL(m.optimizer_m(), s.m.data(), n, what);
      CHECK_BITWISE_EQUAL(m.optimizer_v(), s.v.data(), n, what);
    }
  } else if (m.optimizer_m() != nullptr) {
    bool zeros = true;
    for (int64_t i = 0; i < n; ++i) zeros = zeros && m.optimizer_m()[i] == 0.0f && m.optimizer_v()[i] == 0.0f;
    CHECK(zeros);
  }
}

// Non-trivial AdamW state: m ~ N(0, m_std), v uniform in [v_lo, v_hi], `steps` steps.
void set_adam_state(Model& m, uint32_t seed, double m_std, double v_lo, double v_hi, int64_t steps) {
  tu::Rng rng(seed);
  const int64_t n = m.parameter_count();
  const std::vector<float> mm = tu::normal(rng, n, 0.0, m_std), vv = tu::uniform(rng, n, v_lo, v_hi);
  m.set_optimizer_state(mm.data(), vv.data(), steps);
}

uint64_t fnv1a(const float* x, int64_t n, uint64_t h = 1469598103934665603ULL) {
  const unsigned char* b = reinterpret_cast<const unsigned char*>(x);
  for (int64_t i = 0; i < n * static_cast<int64_t>(sizeof(float)); ++i) h = (h ^ b[i]) * 1099511628211ULL;
  return h;
}

bool in_set(int32_t tok, const std::vector<int32_t>& set) {
  return std::find(set.begin(), set.end(), tok) != set.end();
}

// The structure of a rollout's experience against its prompts: shapes, the prompt
// copied, the mask exactly at the response, stop tokens only at a row's end, truncation.
// Returns {rows that stopped, rows truncated}.
std::pair<int, int> check_rollout_structure(const Experience& e, const Prompts& pr, int64_t max_new,
                                            const std::vector<int32_t>& stops) {
  const int64_t B = e.batch, T = e.steps;
  CHECK(B == pr.B);
  CHECK(e.tokens.size() == static_cast<size_t>(B * T));
  for (const auto* v : {&e.mask, &e.logprobs, &e.ref_logprobs, &e.entropy, &e.values})
    CHECK(v->size() == static_cast<size_t>(B * T));
  CHECK(e.lengths.size() == static_cast<size_t>(B) && e.prompt_lengths.size() == static_cast<size_t>(B) &&
        e.response_lengths.size() == static_cast<size_t>(B) && e.truncated.size() == static_cast<size_t>(B));
  CHECK(!e.scored && !e.shaped);
  int stopped = 0, truncated = 0;
  int64_t longest = 0;
  for (int64_t b = 0; b < B && b < static_cast<int64_t>(e.lengths.size()); ++b) {
    const int64_t P = e.prompt_lengths[b], R = e.response_lengths[b];
    longest = std::max<int64_t>(longest, e.lengths[b]);
    CHECK(P == pr.lengths[b]);
    CHECK(R >= 1 && R <= max_new);
    CHECK(e.lengths[b] == P + R);
    for (int64_t t = 0; t < P; ++t) CHECK(e.tokens[b * T + t] == pr.tokens[b * pr.T + t]);
    for (int64_t t = 0; t < T; ++t) CHECK(e.mask[b * T + t] == ((t >= P && t < P + R) ? 1.0f : 0.0f));
    for (int64_t t = P; t < P + R; ++t) {
      const int32_t tok = e.tokens[b * T + t];
      CHECK(tok >= 0 && tok < 23);
      if (t < P + R - 1) CHECK(!in_set(tok, stops));  // a stop token ends the row
    }
    const bool ends_with_stop = in_set(e.tokens[b * T + P + R - 1], stops);
    CHECK(e.truncated[b] == (ends_with_stop ? 0 : 1));
    if (e.truncated[b]) CHECK(R == max_new);
    if (R < max_new) CHECK(ends_with_stop);
    (e.truncated[b] ? truncated : stopped) += 1;
  }
  CHECK(T == longest);
  return {stopped, truncated};
}

// The rollout's float arrays against the float64 reference forward of its rows:
// policy log-probs and entropy at the response tokens, the reference's log-probs, the
// critic's value at position t - 1; zero elsewhere.
void check_rollout_values(const Experience& e, const Model& policy, const Model& reference, const Model& critic) {
  const int64_t B = e.batch, T = e.steps, N = B * T;
  const ModelConfig pc = policy.config(), rc = reference.config(), cc = critic.config();
  const std::vector<double> pp = params_double(policy), rp = params_double(reference), cp = params_double(critic);
  const RefOutputs po = ref_forward(Ref{pc, policy.layout(), pp}, B, T, e.tokens, e.lengths, &e.mask);
  const RefOutputs ro = ref_forward(Ref{rc, reference.layout(), rp}, B, T, e.tokens, e.lengths, &e.mask);
  const RefOutputs co = ref_forward(Ref{cc, critic.layout(), cp}, B, T, e.tokens, e.lengths, nullptr);
  std::vector<double> vshift(N, 0.0);
  for (int64_t i = 0; i < N; ++i)
    if (e.mask[i] != 0.0f) vshift[i] = co.values[i - 1];  // t >= P >= 1
  // float32 engine vs float64 reference (as test_gpt.cpp): 2e-5 abs + 1e-4 rel.
  CHECK_ALL_NEAR(e.logprobs.data(), po.logprobs.data(), N, 2e-5, 1e-4, "logprobs");
  CHECK_ALL_NEAR(e.entropy.data(), po.entropy.data(), N, 2e-5, 1e-4, "entropy");
  CHECK_ALL_NEAR(e.ref_logprobs.data(), ro.logprobs.data(), N, 2e-5, 1e-4, "ref_logprobs");
  CHECK_ALL_NEAR(e.values.data(), vshift.data(), N, 2e-5, 1e-4, "values (critic at t - 1)");
}

// Every array of two experiences bit-identical.
bool same_experience(const Experience& a, const Experience& b) {
  auto same_f = [](const std::vector<float>& x, const std::vector<float>& y) {
    return x.size() == y.size() && (x.empty() || std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0);
  };
  if (a.batch != b.batch || a.steps != b.steps) return false;
  if (a.lengths != b.lengths || a.prompt_lengths != b.prompt_lengths || a.response_lengths != b.response_lengths ||
      a.truncated != b.truncated)
    return false;
  for (int64_t i = 0; i < a.batch * a.steps; ++i)
    if (a.mask[i] != 0.0f || (i % a.steps) < a.prompt_lengths[i / a.steps])
      if (a.tokens[i] != b.tokens[i]) return false;
  return same_f(a.mask, b.mask) && same_f(a.logprobs, b.logprobs) && same_f(a.ref_logprobs, b.ref_logprobs) &&
         same_f(a.entropy, b.entropy) && same_f(a.values, b.values);
}

// ---- float64 shaping ---------------------------------------------------------------------------
struct RefMoments {
  double count = 0, mean = 0, m2 = 0;
};
RefMoments two_pass(const std::vector<double>& x) {
  RefMoments m;
  m.count = static_cast<double>(x.size());
  for (double v : x) m.mean += v;
  m.mean /= m.count;
  for (double v : x) m.m2 += (v - m.mean) * (v - m.mean);
  return m;
}
RefMoments chan_merge(const RefMoments& a, const RefMoments& b) {
  if (a.count == 0) return b;
  if (b.count == 0) return a;
  RefMoments m;
  m.count = a.count + b.count;
  const double d = b.mean - a.mean;
  m.mean = a.mean + d * b.count / m.count;
  m.m2 = a.m2 + b.m2 + d * d * a.count * b.count / m.count;
  return m;
}

struct RefShaped {
  RefMoments moments;
  std::vector<double> normalized, kl, rewards, advantages, returns;
};

// Steps 3, 5 and 6 of the recipe, in double, from the experience's float inputs.
RefShaped ref_shape(const Experience& e, const PpoOptions& o, const RefMoments& start, double kl_coef,
                    bool update_moments) {
  const int64_t B = e.batch, T = e.steps;
  RefShaped r;
  r.moments = start;
  const std::vector<double> s(e.scores.begin(), e.scores.end());
  if (update_moments && (o.reward_norm || o.reward_scaling)) r.moments = chan_merge(start, two_pass(s));
  const bool on = (o.reward_norm || o.reward_scaling) && r.moments.count >= 2;
  const double sd = on ? std::sqrt(r.moments.m2 / (r.moments.count - 1)) : 1.0;
  r.normalized.resize(B);
  for (int64_t b = 0; b < B; ++b) {
    double x = s[b];
    if (on) x = o.reward_norm ? (x - r.moments.mean) / (sd + 1e-8) : x / (sd + 1e-8);
    if (o.reward_clip > 0) x = std::min(std::max(x, -o.reward_clip), o.reward_clip);
    r.normalized[b] = x;
  }
  r.kl.assign(B * T, 0.0);
  r.rewards.assign(B * T, 0.0);
  r.advantages.assign(B * T, 0.0);
  r.returns.assign(B * T, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t first = e.prompt_lengths[b], last = e.lengths[b] - 1;
    for (int64_t t = first; t <= last; ++t) {
      const int64_t i = b * T + t;
      const double d = static_cast<double>(e.logprobs[i]) - e.ref_logprobs[i];
      const double k = o.kl_estimator == KlEstimator::K1   ? d
                       : o.kl_estimator == KlEstimator::K2 ? 0.5 * d * d
                                                           : std::exp(-d) - 1.0 + d;
      r.kl[i] = k;
      r.rewards[i] = -kl_coef * k + (t == last ? r.normalized[b] : 0.0);
    }
    double next_v = 0.0, next_a = 0.0;  // the state after the last token is terminal
    for (int64_t t = last; t >= first; --t) {
      const int64_t i = b * T + t;
      const double v = e.values[i];
      const double delta = r.rewards[i] + o.gamma * next_v - v;
      const double a = delta + o.gamma * o.lambda * next_a;
      r.advantages[i] = a;
      r.returns[i] = a + v;
      next_v = v;
      next_a = a;
    }
  }
  return r;
}

// ---- float64 update pieces ------------------------------------------------------------------------
double ref_scheduled_lr(const OptimizerOptions& o, int64_t s) {
  const double W = static_cast<double>(o.warmup_steps), S = static_cast<double>(s);
  switch (o.schedule) {
    case Schedule::Constant: return o.lr;
    case Schedule::WarmupInverseSqrt:
      if (W <= 0) return o.lr / std::sqrt(S);
      return S <= W ? o.lr * S / W : o.lr * std::sqrt(W / S);
    case Schedule::WarmupLinearDecay:
      if (W > 0 && S <= W) return o.lr * S / W;
      return o.lr * std::max(0.0, static_cast<double>(o.total_steps) - S) / (o.total_steps - W);
  }
  return 0.0;
}

// Clipping to max_grad_norm (scale max / (norm + 1e-6) when norm > max), then one AdamW step
// in double from the model's current state. Outputs the expected params, m, v and, per
// parameter, d(update)/d(gradient) (to turn a gradient tolerance into a parameter one).
struct RefStep {
  std::vector<double> p, m, v, dudg, g;  // g: the clipped gradient
  double lr = 0;
};
RefStep ref_adamw(const Model& model, const std::vector<double>& grad, const OptimizerOptions& o) {
  const int64_t n = model.parameter_count();
  double norm = 0;
  for (double x : grad) norm += x * x;
  norm = std::sqrt(norm);
  const double scale = (o.max_grad_norm > 0 && norm > o.max_grad_norm) ? o.max_grad_norm / (norm + 1e-6) : 1.0;
  const int64_t s = model.optimizer_steps() + 1;
  RefStep r;
  r.lr = ref_scheduled_lr(o, s);
  r.p.resize(n), r.m.resize(n), r.v.resize(n), r.dudg.resize(n), r.g.resize(n);
  const double bc1 = 1.0 - std::pow(o.beta1, static_cast<double>(s));
  const double bc2 = 1.0 - std::pow(o.beta2, static_cast<double>(s));
  for (const ParamTensor& t : model.layout().tensors) {
    const bool decay = t.kind == ParamKind::Matrix || t.kind == ParamKind::Head;
    for (int64_t i = t.offset; i < t.offset + t.numel; ++i) {
      const double g = grad[i] * scale;
      const double m0 = model.optimizer_m() ? model.optimizer_m()[i] : 0.0;
      const double v0 = model.optimizer_v() ? model.optimizer_v()[i] : 0.0;
      const double m = o.beta1 * m0 + (1 - o.beta1) * g, v = o.beta2 * v0 + (1 - o.beta2) * g * g;
      const double mh = m / bc1, sq = std::sqrt(v / bc2), den = sq + o.eps;
      double p = model.params()[i];
      if (decay) p -= r.lr * o.weight_decay * p;
      p -= r.lr * mh / den;
      r.p[i] = p, r.m[i] = m, r.v[i] = v, r.g[i] = g;
      // d/dg of lr * mh / den (chain through m and v); the clip scale is treated as fixed.
      const double dsq = sq > 0 ? (1 - o.beta2) * g / (bc2 * sq) : 0.0;
      r.dudg[i] = r.lr * ((1 - o.beta1) / bc1 / den - mh * dsq / (den * den));
    }
  }
  return r;
}

// The engine's step against the reference: p_new - p_old vs the expected update, with
// the tolerance of a gradient error (g_abs + g_rel |g|) times |d update / d g| plus four
// float32 roundings of the parameter; m and v likewise.
void check_step(const Model& after, const std::vector<float>& before, const RefStep& r, double g_abs, double g_rel,
                const OptimizerOptions& o, const char* what) {
  const int64_t n = after.parameter_count();
  int64_t bad = 0;
  double worst = 0;  // the largest error in units of its tolerance
  for (const ParamTensor& t : after.layout().tensors)
    for (int64_t i = t.offset; i < t.offset + t.numel; ++i) {
      const double gtol = g_abs + g_rel * std::fabs(r.g[i]);
      const double ulp = std::ldexp(1.0, std::ilogb(std::max({std::fabs(r.p[i]), std::fabs(double(before[i])), 1e-30})) - 23);
      const double tol = std::fabs(r.dudg[i]) * gtol + 4 * ulp;
      const double got = static_cast<double>(after.params()[i]) - before[i];
      const double want = r.p[i] - before[i];
      const double err = std::fabs(got - want);
      worst = std::max(worst, err / tol);
      if (err > tol && bad++ < 6)
        CHECK_NEAR_CTX(got, want, tol, 0.0, std::string(what) + " update of " + t.name + "[" +
                                                std::to_string(i - t.offset) + "] (g " + tf::fmt_double(r.g[i]) + ")");
      const double mt = (1 - o.beta1) * gtol + 2e-7 * std::fabs(r.m[i]) + 1e-30;
      const double vt = (1 - o.beta2) * (2 * std::fabs(r.g[i]) * gtol + gtol * gtol) + 2e-7 * std::fabs(r.v[i]) + 1e-30;
      if (after.optimizer_m() && after.optimizer_v()) {
        if (std::fabs(after.optimizer_m()[i] - r.m[i]) > mt && bad++ < 6)
          CHECK_NEAR_CTX(after.optimizer_m()[i], r.m[i], mt, 0.0, std::string(what) + " adam m of " + t.name);
        if (std::fabs(after.optimizer_v()[i] - r.v[i]) > vt && bad++ < 6)
          CHECK_NEAR_CTX(after.optimizer_v()[i], r.v[i], vt, 0.0, std::string(what) + " adam v of " + t.name);
      }
    }
  CHECK(bad == 0);
  CHECK(after.optimizer_m() != nullptr);
  CHECK(n > 0);
  std::printf("    %s: the largest parameter-update error is %.3f of its tolerance\n", what, worst);
}

// Central finite differences of f at every coordinate of p.
template <typename F>
std::vector<double> fd_gradient(std::vector<double> p, const F& f, double h) {
  std::vector<double> g(p.size());
  for (size_t k = 0; k < p.size(); ++k) {
    const double keep = p[k];
    p[k] = keep + h;
    const double up = f(p);
    p[k] = keep - h;
    const double down = f(p);
    p[k] = keep;
    g[k] = (up - down) / (2 * h);
  }
  return g;
}

// ---- an experience to update on -----------------------------------------------------------------
struct World {
  std::shared_ptr<Model> policy, reference, critic;
  PpoOptions o;
  std::unique_ptr<PpoTrainer> trainer;
  Prompts prompts;
  Experience e;
};

// Rollout of B prompts, scores, then old log-probs moved by up to +-lp_shift and old values
// by up to +-v_shift (so that ratios leave [1 - eps, 1 + eps] and values their clip range),
// then shape. The policy has no value head, the critic has one.
World make_world(const std::vector<int32_t>& prompt_lengths, uint32_t seed, double lp_shift, double v_shift,
                 int64_t max_new = 5) {
  World w;
  w.policy = make_model(false, seed);
  w.reference = make_model(false, seed + 1, false);
  w.critic = make_model(true, seed + 2);
  tu::Rng rng(seed + 3);
  w.prompts = make_prompts(rng, prompt_lengths, 8, 21);
  w.o.max_new_tokens = max_new;
  w.o.stop_tokens = {3, 7};
  w.o.temperature = 1.0;
  w.o.top_p = 1.0;
  w.o.seed = seed;
  w.o.kl_coef = 0.1;
  w.o.reward_norm = true;
  w.o.reward_clip = 0.0;
  w.trainer = std::make_unique<PpoTrainer>(w.policy, w.reference, w.critic, nullptr, w.o);
  w.e = w.trainer->rollout(w.prompts.view());
  const int64_t B = w.e.batch;
  std::vector<float> scores = tu::uniform(rng, B, -2.0, 2.0);
  w.trainer->set_scores(w.e, scores.data());
  for (int64_t i = 0; i < B * w.e.steps; ++i)
    if (w.e.mask[i] != 0.0f) {
      w.e.logprobs[i] += static_cast<float>(tu::rand_uniform(rng, -lp_shift, lp_shift));
      w.e.values[i] += static_cast<float>(tu::rand_uniform(rng, -v_shift, v_shift));
    }
  w.trainer->shape(w.e);
  return w;
}

// One ptx row of 9 tokens in a [1, 10] buffer, a hole in its target mask at t = 4.
struct Ptx {
  std::vector<int32_t> tokens{5, 9, 14, 2, 20, 11, 0, 17, 6, -1};
  std::vector<int32_t> lengths{9};
  std::vector<float> mask{0, 1, 1, 1, 0, 1, 1, 1, 1, 0};
  TokenBatch view() const { return {1, 10, tokens.data(), lengths.data()}; }
};

// The float64 losses of one mini-batch holding every row of e.
struct PolicyTerms {
  double total = 0, pg = 0, entropy = 0, ptx = 0, clip_fraction = 0, approx_kl = 0;
  double kink_margin = 1e300;  // min distance of log ratio to log(1 +- eps)
  int64_t tokens = 0;
};
struct CriticTerms {
  double total = 0, loss = 0, clip_fraction = 0;
  double kink_margin = 1e300;  // min distance to a switch of the clip or of the max
};

// The advantages the update uses: optionally whitened over the mini-batch's response
// tokens (Bessel variance, eps 1e-8), then optionally clipped.
std::vector<double> ref_advantages(const Experience& e, const PpoOptions& o) {
  const int64_t N = e.batch * e.steps;
  std::vector<double> a(N, 0.0);
  double n = 0, mean = 0, var = 0;
  for (int64_t i = 0; i < N; ++i)
    if (e.mask[i] != 0.0f) a[i] = e.advantages[i], mean += a[i], ++n;
  mean /= n;
  for (int64_t i = 0; i < N; ++i)
    if (e.mask[i] != 0.0f) var += (a[i] - mean) * (a[i] - mean);
  var = n > 1 ? var / (n - 1) : 0.0;
  for (int64_t i = 0; i < N; ++i) {
    if (e.mask[i] == 0.0f) continue;
    if (o.advantage_norm) a[i] = (a[i] - mean) / std::sqrt(var + 1e-8);
    if (o.advantage_clip > 0) a[i] = std::min(std::max(a[i], -o.advantage_clip), o.advantage_clip);
  }
  return a;
}

PolicyTerms policy_terms(const std::vector<double>& p, const Model& policy, const Experience& e,
                         const std::vector<double>& adv, const PpoOptions& o, const Ptx* ptx) {
  const int64_t B = e.batch, T = e.steps;
  const ModelConfig cfg = policy.config();
  const Ref ref{cfg, policy.layout(), p};
  const RefOutputs out = ref_forward(ref, B, T, e.tokens, e.lengths, &e.mask);
  PolicyTerms r;
  const double lo = std::log(1 - o.policy_clip), hi = std::log(1 + o.policy_clip);
  for (int64_t i = 0; i < B * T; ++i) {
    if (e.mask[i] == 0.0f) continue;
    ++r.tokens;
    const double x = out.logprobs[i] - e.logprobs[i], rho = std::exp(x), A = adv[i];
    const double rc = std::min(std::max(rho, 1 - o.policy_clip), 1 + o.policy_clip);
    r.pg += std::max(-A * rho, -A * rc);
    if (-A * rc > -A * rho) r.clip_fraction += 1;
    r.approx_kl += (rho - 1) - x;
    r.entropy += out.entropy[i];
    r.kink_margin = std::min({r.kink_margin, std::fabs(x - lo), std::fabs(x - hi)});
  }
  const double N = static_cast<double>(r.tokens);
  r.pg /= N, r.entropy /= N, r.clip_fraction /= N, r.approx_kl /= N;
  r.total = r.pg - o.entropy_coef * r.entropy;
  if (ptx) {
    const RefOutputs po = ref_forward(ref, 1, 10, ptx->tokens, ptx->lengths, &ptx->mask);
    r.ptx = po.lm_loss;
    r.total += o.ptx_coef * r.ptx;
  }
  return r;
}

CriticTerms critic_terms(const std::vector<double>& p, const Model& critic, const Experience& e, const PpoOptions& o) {
  const int64_t B = e.batch, T = e.steps;
  const ModelConfig cfg = critic.config();
  const RefOutputs out = ref_forward(Ref{cfg, critic.layout(), p}, B, T, e.tokens, e.lengths, &e.mask);
  CriticTerms r;
  double n = 0;
  for (int64_t i = 0; i < B * T; ++i) {
    if (e.mask[i] == 0.0f) continue;
    ++n;
    const double V = out.values[i - 1], Vo = e.values[i], R = e.returns[i];
    if (o.value_clip > 0) {
      const double Vc = std::min(std::max(V, Vo - o.value_clip), Vo + o.value_clip);
      const double a = (V - R) * (V - R), b = (Vc - R) * (Vc - R);
      r.loss += 0.5 * std::max(a, b);
      if (b > a) r.clip_fraction += 1;
      r.kink_margin = std::min(r.kink_margin, std::fabs(std::fabs(V - Vo) - o.value_clip));
      if (std::fabs(V - Vo) > o.value_clip)
        r.kink_margin = std::min(r.kink_margin, std::fabs(std::fabs(V - R) - std::fabs(Vc - R)));
    } else {
      r.loss += 0.5 * (V - R) * (V - R);
    }
  }
  r.loss /= n, r.clip_fraction /= n;
  r.total = o.value_loss_coef * r.loss;
  return r;
}

double l2(const std::vector<double>& g) {
  double s = 0;
  for (double x : g) s += x * x;
  return std::sqrt(s);
}

// The main check: one update (one mini-batch of all rows, one epoch) against the float64
// losses, finite-difference gradients of every parameter, clipping and AdamW.
void run_update_against_reference(bool advantage_norm, double advantage_clip, double value_clip,
                                  Schedule policy_schedule, Schedule critic_schedule) {
  World w = make_world({3, 2, 4}, 41, 0.5, 0.4);
  Experience& e = w.e;
  const int64_t B = e.batch;
  PpoOptions o = w.o;
  o.mini_batch_size = B;
  o.ppo_epochs = 1;
  o.entropy_coef = 0.05;
  o.ptx_coef = 0.3;
  o.ptx_batch_ratio = 0.5;  // max(1, round(1.5)) = 2 draws of the single ptx row
  o.policy_clip = 0.2;
  o.value_clip = value_clip;
  o.value_loss_coef = 0.7;
  o.advantage_norm = advantage_norm;
  o.advantage_clip = advantage_clip;
  o.policy_optimizer.lr = 1e-2;
  o.policy_optimizer.beta1 = 0.9;
  o.policy_optimizer.beta2 = 0.95;
  o.policy_optimizer.eps = 1e-6;
  o.policy_optimizer.weight_decay = 0.1;
  o.policy_optimizer.schedule = policy_schedule;
  o.policy_optimizer.warmup_steps = 10;
  o.policy_optimizer.total_steps = 30;
  o.critic_optimizer.lr = 5e-3;
  o.critic_optimizer.beta1 = 0.8;
  o.critic_optimizer.beta2 = 0.99;
  o.critic_optimizer.eps = 1e-8;
  o.critic_optimizer.weight_decay = 0.05;
  o.critic_optimizer.schedule = critic_schedule;
  o.critic_optimizer.warmup_steps = 2;
  o.critic_optimizer.total_steps = 20;
  const Ptx ptx;

  // float64 losses at the current parameters, and the distance of every token from a
  // kink of max/clip: finite differences (h = 1e-5, |d lp / d param| of O(1)) move the
  // log ratio and the values by ~1e-5, so a margin above 1e-3 keeps them on one side.
  const std::vector<double> adv = ref_advantages(e, o);
  std::vector<double> pp = params_double(*w.policy), cp = params_double(*w.critic);
  const PolicyTerms pt = policy_terms(pp, *w.policy, e, adv, o, &ptx);
  const CriticTerms ct = critic_terms(cp, *w.critic, e, o);
  CHECK(pt.kink_margin > 1e-3);
  CHECK(ct.kink_margin > 1e-3);
  // The case exercises what it claims: some ratios clipped, some values clipped, some
  // whitened advantages clipped.
  CHECK(pt.clip_fraction > 0 && pt.clip_fraction < 1);
  if (value_clip > 0) CHECK(ct.clip_fraction > 0 && ct.clip_fraction < 1);
  if (advantage_clip > 0) {
    int64_t clipped = 0;
    for (int64_t i = 0; i < B * e.steps; ++i) clipped += e.mask[i] != 0.0f && std::fabs(adv[i]) == advantage_clip;
    CHECK(clipped > 0);
  }

  // Gradients of the float64 total losses by central differences (truncation error
  // ~h^2 f''' ~ 1e-10, rounding ~1e-16 / h ~ 1e-11).
  const double h = 1e-5;
  const std::vector<double> gp = fd_gradient(
      pp, [&](const std::vector<double>& p) { return policy_terms(p, *w.policy, e, adv, o, &ptx).total; }, h);
  const std::vector<double> gc =
      fd_gradient(cp, [&](const std::vector<double>& p) { return critic_terms(p, *w.critic, e, o).total; }, h);
  const double pnorm = l2(gp), cnorm = l2(gc);
  o.policy_optimizer.max_grad_norm = 0.5 * pnorm;  // clipping that clips
  o.critic_optimizer.max_grad_norm = 0.4 * cnorm;

  // Non-trivial AdamW state so the update depends on the gradient's magnitude (a first
  // step from zero moments is lr * sign(g)): v0 comparable to the clipped g^2.
  const double gp_rms = 0.5 * pnorm / std::sqrt(static_cast<double>(gp.size()));
  const double gc_rms = 0.4 * cnorm / std::sqrt(static_cast<double>(gc.size()));
  set_adam_state(*w.policy, 51, gp_rms, 0.2 * gp_rms * gp_rms, 2.0 * gp_rms * gp_rms, 4);
  set_adam_state(*w.critic, 52, gc_rms, 0.2 * gc_rms * gc_rms, 2.0 * gc_rms * gc_rms, 7);
  const RefStep rp = ref_adamw(*w.policy, gp, o.policy_optimizer);
  const RefStep rc = ref_adamw(*w.critic, gc, o.critic_optimizer);
  const std::vector<float> p_before(w.policy->params(), w.policy->params() + w.policy->parameter_count());
  const std::vector<float> c_before(w.critic->params(), w.critic->params() + w.critic->parameter_count());
  const Saved ref_before = save(*w.reference);

  w.trainer->set_options(o);
  w.trainer->set_ptx_data(ptx.view(), ptx.mask.data());
  const PpoState st_before = w.trainer->state();
  const Stats s = w.trainer->update(e);

  // Statistics: float32 forward vs float64 (1e-5 relative, 1e-6 absolute for values near 0).
  CHECK(stat(s, "skipped") == 0.0);
  CHECK_NEAR(stat(s, "policy_loss"), pt.pg, 1e-6, 1e-5);
  CHECK_NEAR(stat(s, "entropy"), pt.entropy, 1e-6, 1e-5);
  CHECK_NEAR(stat(s, "approx_kl"), pt.approx_kl, 1e-6, 1e-5);
  CHECK_NEAR(stat(s, "clip_fraction"), pt.clip_fraction, 1e-12, 0.0);
  CHECK_NEAR(stat(s, "ptx_loss"), pt.ptx, 1e-6, 1e-5);
  CHECK_NEAR(stat(s, "value_loss"), ct.loss, 1e-6, 1e-5);
  CHECK_NEAR(stat(s, "value_clip_fraction"), ct.clip_fraction, 1e-12, 0.0);
  CHECK_NEAR(stat(s, "policy_grad_norm"), pnorm, 1e-7, 1e-5);
  CHECK_NEAR(stat(s, "critic_grad_norm"), cnorm, 1e-7, 1e-5);
  CHECK_NEAR(stat(s, "policy_lr"), rp.lr, 0.0, 1e-12);
  CHECK_NEAR(stat(s, "critic_lr"), rc.lr, 0.0, 1e-12);
  CHECK(stat(s, "kl_coef") == st_before.kl_coef);  // kl_target 0: fixed
  CHECK(w.trainer->state().kl_coef == st_before.kl_coef);
  CHECK(w.trainer->state().updates == st_before.updates + 1);
  CHECK(w.policy->optimizer_steps() == 5);
  CHECK(w.critic->optimizer_steps() == 8);
  // Parameters: the engine's float32 gradient may differ from the float64 differences by
  // 2e-5 of the largest gradient plus 2e-4 relative (a tenth of test_gpt.cpp's budget for
  // one backward; the worst seen is ~0.2 of it); check_step turns that into a tolerance on
  // each parameter's update through d update / d g.
  double gp_max = 0, gc_max = 0;
  for (double x : rp.g) gp_max = std::max(gp_max, std::fabs(x));
  for (double x : rc.g) gc_max = std::max(gc_max, std::fabs(x));
  check_step(*w.policy, p_before, rp, 2e-5 * gp_max, 2e-4, o.policy_optimizer, "policy");
  check_step(*w.critic, c_before, rc, 2e-5 * gc_max, 2e-4, o.critic_optimizer, "critic");
  check_same_state(*w.reference, ref_before, "reference untouched");
  std::printf("    N %lld tokens, clip_fraction %.3f, value_clip_fraction %.3f, |g_policy| %.4g, |g_critic| %.4g\n",
              static_cast<long long>(pt.tokens), pt.clip_fraction, ct.clip_fraction, pnorm, cnorm);
}

}  // namespace

// ---- 1. rollout ---------------------------------------------------------------------------------
TEST(rollout_matches_float64_reference) {
  for (int64_t fbs : {0, 2}) {  // all rows at once, and chunks of 2 rows (the last of 2)
    auto policy = make_model(false, 1), reference = make_model(false, 3, false), critic = make_model(true, 5);
    tu::Rng rng(7);
    const Prompts pr = make_prompts(rng, {4, 2, 3, 1, 4, 2}, 8, 21);
    PpoOptions o;
    o.max_new_tokens = 6;
    o.stop_tokens = {8};
    o.temperature = 0.7;  // sampling settings; the experience's log-probs stay at temperature 1
    o.top_p = 0.95;
    o.repetition_penalty = 1.1;
    o.seed = 11;
    o.forward_batch_size = fbs;
    PpoTrainer tr(policy, reference, critic, nullptr, o);
    CHECK(tr.state().rollouts == 0);
    const Experience e = tr.rollout(pr.view());
    const auto counts = check_rollout_structure(e, pr, o.max_new_tokens, o.stop_tokens);
    // This seed gives both kinds of rows (else the checks above would be vacuous).
    CHECK(counts.first >= 1 && counts.second >= 1);
    std::printf("    forward_batch_size %lld: %d rows stopped, %d truncated\n", static_cast<long long>(fbs), counts.first, counts.second);
    check_rollout_values(e, *policy, *reference, *critic);
    CHECK(tr.state().rollouts == 1);
  }
}

TEST(rollout_default_stop_token_is_the_policy_eos) {
  auto policy = make_model(false, 21), reference = make_model(false, 23, false), critic = make_model(true, 25);
  tu::Rng rng(27);
  const Prompts pr = make_prompts(rng, {2, 3, 1, 2, 3, 1, 2, 2}, 0, 21);
  PpoOptions o;
  o.max_new_tokens = 8;
  o.temperature = 1.0;
  o.top_p = 1.0;
  o.seed = 3;
  PpoTrainer tr(policy, reference, critic, nullptr, o);
  const Experience e = tr.rollout(pr.view());
  const auto counts = check_rollout_structure(e, pr, o.max_new_tokens, {kEos});
  CHECK(counts.first >= 1 && counts.second >= 1);
  // Tokens 3 and 7 are no stop tokens here: some response holds one before its end.
  bool other = false;
  for (int64_t b = 0; b < e.batch; ++b)
    for (int64_t t = e.prompt_lengths[b]; t < e.lengths[b] - 1; ++t) other = other || in_set(e.tokens[b * e.steps + t], {3, 7});
  CHECK(other);
}

TEST(rollout_is_deterministic_per_seed_and_rollout_count) {
  auto policy = make_model(false, 31), reference = make_model(false, 33, false), critic = make_model(true, 35);
  tu::Rng rng(37);
  const Prompts pr = make_prompts(rng, {3, 1, 4, 2, 2}, 8, 21);
  PpoOptions o;
  o.max_new_tokens = 6;
  o.stop_tokens = {3, 7};
  o.seed = 5;
  PpoTrainer tr1(policy, reference, critic, nullptr, o);
  PpoTrainer tr2(clone(*policy), clone(*reference), clone(*critic), nullptr, o);
  const Experience a = tr1.rollout(pr.view());
  const Experience b = tr2.rollout(pr.view());
  CHECK(same_experience(a, b));  // same models, options and state: same bits
  const Experience c = tr1.rollout(pr.view());
  CHECK(tr1.state().rollouts == 2);
  CHECK(!same_experience(a, c));  // the rollout count seeds generation
  PpoState st = tr1.state();
  st.rollouts = 0;
  tr1.set_state(st);
  const Experience d = tr1.rollout(pr.view());
  CHECK(same_experience(a, d));
  o.seed = 6;
  PpoTrainer tr3(clone(*policy), clone(*reference), clone(*critic), nullptr, o);
  CHECK(!same_experience(a, tr3.rollout(pr.view())));
}

// ---- 2. shape -----------------------------------------------------------------------------------
TEST(shape_matches_float64_reference) {
  World w = make_world({3, 2, 4, 1, 2}, 61, 0.3, 0.3);
  const Experience base = w.e;
  const std::vector<float> scores{1.7f, -0.9f, 0.3f, 2.5f, -2.2f};
  struct Case {
    KlEstimator est;
    bool norm, scaling;
    double clip, kl_coef, gamma, lambda;
    RefMoments start;
    bool update;
  };
  const Case cases[] = {
      {KlEstimator::K1, true, false, 0.8, 0.07, 1.0, 0.9, {0, 0, 0}, true},
      {KlEstimator::K2, false, true, 0.0, 0.2, 0.95, 0.8, {4, 0.5, 3.0}, true},
      {KlEstimator::K3, false, false, 0.6, 0.3, 1.0, 0.95, {4, 0.5, 3.0}, true},   // no moments kept
      {KlEstimator::K1, true, false, 0.0, 0.05, 0.9, 1.0, {1, 0.2, 0.0}, false},   // count < 2: raw
      {KlEstimator::K3, true, false, 1.0, 0.1, 1.0, 0.9, {6, -0.3, 4.0}, false},   // stored moments
      {KlEstimator::K2, false, true, 0.9, 0.0, 1.0, 0.0, {2, 1.0, 0.5}, false},
  };
  int idx = 0;
  for (const Case& c : cases) {
    const std::string ctx = "case " + std::to_string(idx++);
    PpoOptions o = w.o;
    o.kl_estimator = c.est;
    o.reward_norm = c.norm;
    o.reward_scaling = c.scaling;
    o.reward_clip = c.clip;
    o.gamma = c.gamma;
    o.lambda = c.lambda;
    w.trainer->set_options(o);
    PpoState st = w.trainer->state();
    st.moments = {c.start.count, c.start.mean, c.start.m2};
    st.kl_coef = c.kl_coef;
    w.trainer->set_state(st);
    Experience e = base;
    w.trainer->set_scores(e, scores.data());
    w.trainer->shape(e, c.update);
    const RefShaped r = ref_shape(e, o, c.start, c.kl_coef, c.update);
    const int64_t N = e.batch * e.steps;
    CHECK(e.shaped);
    const ScoreMoments m = w.trainer->state().moments;
    CHECK_NEAR_CTX(m.count, r.moments.count, 0.0, 0.0, ctx);
    CHECK_NEAR_CTX(m.mean, r.moments.mean, 1e-12, 1e-12, ctx);
    CHECK_NEAR_CTX(m.m2, r.moments.m2, 1e-12, 1e-10, ctx);
    if (!c.update || !(c.norm || c.scaling)) {  // moments untouched, bit for bit
      CHECK(tf::same_bits(m.count, c.start.count) && tf::same_bits(m.mean, c.start.mean) &&
            tf::same_bits(m.m2, c.start.m2));
    }
    // Scores are O(1) floats: 1e-6. kl of float log-probs: their difference rounds at
    // ~2e-7 (|lp| up to ~4). Rewards, advantages and returns: sums of up to 6 such terms.
    CHECK_ALL_NEAR(e.normalized_scores.data(), r.normalized.data(), e.batch, 1e-6, 1e-6, ("normalized " + ctx).c_str());
    CHECK_ALL_NEAR(e.kl.data(), r.kl.data(), N, 1e-6, 1e-5, ("kl " + ctx).c_str());
    CHECK_ALL_NEAR(e.rewards.data(), r.rewards.data(), N, 2e-6, 1e-5, ("rewards " + ctx).c_str());
    CHECK_ALL_NEAR(e.advantages.data(), r.advantages.data(), N, 1e-5, 1e-5, ("advantages " + ctx).c_str());
    CHECK_ALL_NEAR(e.returns.data(), r.returns.data(), N, 1e-5, 1e-5, ("returns " + ctx).c_str());
    // The case does what it says: a clip that clips, a normalization that normalizes.
    if (c.clip > 0) {
      int clipped = 0;
      for (double x : r.normalized) clipped += std::fabs(x) == c.clip;
      CHECK(clipped >= 1);
    }
  }
}

TEST(shape_merges_running_moments_across_calls) {
  World w = make_world({3, 2, 4, 1, 2}, 71, 0.3, 0.3);
  PpoOptions o = w.o;
  o.reward_norm = true;
  o.reward_clip = 0.0;
  w.trainer->set_options(o);
  PpoState st = w.trainer->state();
  st.moments = {};
  w.trainer->set_state(st);
  const std::vector<float> s1{0.5f, -1.0f, 2.0f, 0.25f, -0.75f}, s2{3.0f, 2.5f, -4.0f, 1.0f, 0.0f};
  Experience e1 = w.e, e2 = w.e, e3 = w.e;
  w.trainer->set_scores(e1, s1.data());
  w.trainer->shape(e1);
  w.trainer->set_scores(e2, s2.data());
  w.trainer->shape(e2);
  std::vector<double> all(s1.begin(), s1.end());
  all.insert(all.end(), s2.begin(), s2.end());
  const RefMoments want = two_pass(all);
  const ScoreMoments got = w.trainer->state().moments;
  CHECK(got.count == 10);
  CHECK_NEAR(got.mean, want.mean, 1e-14, 1e-12);
  CHECK_NEAR(got.m2, want.m2, 1e-14, 1e-12);
  // e2 was normalized with the moments of both batches.
  const double sd = std::sqrt(want.m2 / 9);
  for (int64_t b = 0; b < 5; ++b) CHECK_NEAR(e2.normalized_scores[b], (s2[b] - want.mean) / (sd + 1e-8), 1e-6, 1e-6);
  // update_moments = false: the moments stay, bit for bit, and are used.
  w.trainer->set_scores(e3, s1.data());
  w.trainer->shape(e3, false);
  const ScoreMoments after = w.trainer->state().moments;
  CHECK(tf::same_bits(after.count, got.count) && tf::same_bits(after.mean, got.mean) &&
        tf::same_bits(after.m2, got.m2));
  for (int64_t b = 0; b < 5; ++b) CHECK_NEAR(e3.normalized_scores[b], (s1[b] - want.mean) / (sd + 1e-8), 1e-6, 1e-6);
}

// ---- 3. update ----------------------------------------------------------------------------------
TEST(update_matches_float64_losses_and_finite_differences) {
  run_update_against_reference(false, 0.0, 0.2, Schedule::Constant, Schedule::Constant);
}

TEST(update_with_advantage_whitening_and_clipping_matches_reference) {
  // Also: value clipping off (the plain 0.5 (V - R)^2) and the two warm-up schedules
  // (policy at step 5 of 10 warm-up steps, critic at step 8 of a linear decay).
  run_update_against_reference(true, 1.0, 0.0, Schedule::WarmupInverseSqrt, Schedule::WarmupLinearDecay);
}

// ---- 4. several mini-batches and epochs -----------------------------------------------------------
// ppo_epochs = 2 over one mini-batch of every row is two full-batch steps on the same
// experience (old log-probs and advantages kept): the same as two updates of one epoch,
// up to the order of the rows inside the mini-batch (float summation order).
TEST(two_epochs_equal_two_single_epoch_updates) {
  World w = make_world({3, 2, 4, 2}, 81, 0.3, 0.3);
  PpoOptions o = w.o;
  o.mini_batch_size = w.e.batch;
  o.entropy_coef = 0.02;
  o.ptx_coef = 0.2;
  o.policy_optimizer.lr = 1e-3;
  o.critic_optimizer.lr = 1e-3;
  set_adam_state(*w.policy, 82, 1e-3, 1e-4, 2e-4, 2);
  set_adam_state(*w.critic, 83, 1e-3, 1e-4, 2e-4, 2);
  const Ptx ptx;
  auto p2 = clone(*w.policy), c2 = clone(*w.critic);
  const std::vector<float> p0(w.policy->params(), w.policy->params() + w.policy->parameter_count());

  o.ppo_epochs = 2;
  PpoTrainer two(w.policy, w.reference, w.critic, nullptr, o);
  two.set_ptx_data(ptx.view(), ptx.mask.data());
  const Stats s2 = two.update(w.e);
  o.ppo_epochs = 1;
  PpoTrainer one(p2, w.reference, c2, nullptr, o);
  one.set_ptx_data(ptx.view(), ptx.mask.data());
  const Stats a = one.update(w.e);
  const Stats b = one.update(w.e);
  CHECK(stat(s2, "skipped") == 0 && stat(a, "skipped") == 0 && stat(b, "skipped") == 0);
  CHECK(w.policy->optimizer_steps() == 4 && p2->optimizer_steps() == 4);
  CHECK(w.critic->optimizer_steps() == 4 && c2->optimizer_steps() == 4);
  // Steps of ~lr = 1e-3 per parameter; summation-order differences of the gradients are
  // ~1e-6 relative: 1e-7 absolute on the parameters is far above those, far below a step.
  CHECK_ALL_NEAR(w.policy->params(), p2->params(), w.policy->parameter_count(), 1e-7, 0.0, "policy");
  CHECK_ALL_NEAR(w.critic->params(), c2->params(), w.critic->parameter_count(), 1e-7, 0.0, "critic");
  int64_t moved = 0;
  for (int64_t i = 0; i < w.policy->parameter_count(); ++i) moved += w.policy->params()[i] != p0[i];
  CHECK(moved > w.policy->parameter_count() / 2);
  // The stats of the two-epoch update are the means over its two mini-batches.
  for (const char* k : {"policy_loss", "value_loss", "entropy", "approx_kl", "ptx_loss", "clip_fraction"})
    CHECK_NEAR_CTX(stat(s2, k), 0.5 * (stat(a, k) + stat(b, k)), 1e-6, 1e-5, k);
}

TEST(update_is_bit_reproducible) {
  // 5 rows in mini-batches of 2 (2 + 2 + 1), 2 epochs: 6 optimizer steps per model.
  auto run = [](Stats* stats) {
    World w = make_world({3, 2, 4, 2, 1}, 91, 0.3, 0.3);
    PpoOptions o = w.o;
    o.mini_batch_size = 2;
    o.ppo_epochs = 2;
    o.entropy_coef = 0.01;
    o.ptx_coef = 0.1;
    o.advantage_norm = true;
    o.policy_optimizer.lr = 1e-3;
    o.policy_optimizer.max_grad_norm = 0.5;
    o.critic_optimizer.max_grad_norm = 0.5;
    w.trainer->set_options(o);
    Ptx ptx;
    w.trainer->set_ptx_data(ptx.view(), ptx.mask.data());
    const std::vector<float> p0(w.policy->params(), w.policy->params() + w.policy->parameter_count());
    const std::vector<float> c0(w.critic->params(), w.critic->params() + w.critic->parameter_count());
    *stats = w.trainer->update(w.e);
    CHECK(w.policy->optimizer_steps() == 6);
    CHECK(w.critic->optimizer_steps() == 6);
    CHECK(w.trainer->state().updates == 1);
    CHECK(std::memcmp(p0.data(), w.policy->params(), p0.size() * sizeof(float)) != 0);
    CHECK(std::memcmp(c0.data(), w.critic->params(), c0.size() * sizeof(float)) != 0);
    return std::make_pair(save(*w.policy), save(*w.critic));
  };
  Stats s1, s2;
  const auto a = run(&s1), b = run(&s2);
  CHECK(stat(s1, "skipped") == 0.0);
  for (const auto& kv : s1) CHECK(std::isfinite(kv.second));
  CHECK(s1.size() == s2.size());
  for (size_t i = 0; i < std::min(s1.size(), s2.size()); ++i)
    CHECK(s1[i].first == s2[i].first && tf::same_bits(s1[i].second, s2[i].second));
  const int64_t np = static_cast<int64_t>(a.first.p.size()), nc = static_cast<int64_t>(a.second.p.size());
  CHECK_BITWISE_EQUAL(a.first.p.data(), b.first.p.data(), np, "policy params");
  CHECK_BITWISE_EQUAL(a.first.m.data(), b.first.m.data(), np, "policy m");
  CHECK_BITWISE_EQUAL(a.first.v.data(), b.first.v.data(), np, "policy v");
  CHECK_BITWISE_EQUAL(a.second.p.data(), b.second.p.data(), nc, "critic params");
  CHECK_BITWISE_EQUAL(a.second.m.data(), b.second.m.data(), nc, "critic m");
  CHECK_BITWISE_EQUAL(a.second.v.data(), b.second.v.data(), nc, "critic v");
  uint64_t h = fnv1a(a.first.p.data(), np);
  h = fnv1a(a.second.p.data(), nc, h);
  std::printf("    checksum %016llx (must match across PPO_MAX_THREADS)\n", static_cast<unsigned long long>(h));
}

// ---- 5. non-finite steps ----------------------------------------------------------------------------
// A NaN planted in the position embedding of the longest row's second-to-last position
// (of the critic or of the policy) turns only the mini-batch holding that row
// non-finite. Mini-batches of one row: mini-batches before it take their steps first,
// and the update must still restore both models and optimizers bit for bit.
TEST(non_finite_update_restores_both_models) {
  int halfway = 0;  // runs where a step was taken before the NaN row came
  for (int which = 0; which < 2; ++which) {     // 0: NaN in the critic, 1: in the policy
    for (uint64_t seed = 0; seed < 4; ++seed) {
      // Row 0's prompt is 8 tokens, the others at most 2: with 4 new tokens at most,
      // row 0 is the only one reaching position 7.
      World w = make_world({8, 2, 1, 2}, 101, 0.3, 0.3, 4);
      PpoOptions o = w.o;
      o.mini_batch_size = 1;
      o.seed = seed;
      o.ptx_coef = 0.1;
      w.trainer->set_options(o);
      Ptx ptx;
      w.trainer->set_ptx_data(ptx.view(), ptx.mask.data());
      if (seed % 2 == 1) {
        set_adam_state(*w.policy, 102, 1e-3, 1e-4, 2e-4, 3);
        set_adam_state(*w.critic, 103, 1e-3, 1e-4, 2e-4, 5);
      }
      CHECK(w.e.lengths[0] >= 9);
      for (int64_t b = 1; b < w.e.batch; ++b) CHECK(w.e.lengths[b] <= 6);
      Model& target = which == 0 ? *w.critic : *w.policy;
      target.mutable_params()[target.layout().wpe + (w.e.lengths[0] - 2) * 12 + 5] = tu::kNaN;
      const Saved p = save(*w.policy), c = save(*w.critic);
      int calls = 0;
      // Expected: no exception, skipped = 1. An exception is reported, and the models
      // must be restored all the same.
      try {
        const Stats s = w.trainer->update(w.e, [&](const char*, int64_t, int64_t) { ++calls; });
        CHECK(stat(s, "skipped") == 1.0);
      } catch (const ppo::Error& err) {
        tf::report_failure(__FILE__, __LINE__,
                           std::string("update threw instead of skipping (NaN in the ") +
                               (which == 0 ? "critic" : "policy") + ", seed " + std::to_string(seed) + ", after " +
                               std::to_string(calls) + " mini-batches): " + ppo::error_code_name(err.code()) +
                               " naming '" + err.argument() + "': " + err.what());
      }
      check_same_state(*w.policy, p, "policy restored");
      check_same_state(*w.critic, c, "critic restored");
      halfway += calls >= 2;
    }
  }
  CHECK(halfway >= 1);  // some run really had to undo steps (progress reports each mini-batch)
}

TEST(non_finite_advantage_skips_the_update) {
  World w = make_world({3, 2, 4}, 111, 0.3, 0.3);
  set_adam_state(*w.policy, 112, 1e-3, 1e-4, 2e-4, 3);
  set_adam_state(*w.critic, 113, 1e-3, 1e-4, 2e-4, 3);
  const Saved p = save(*w.policy), c = save(*w.critic);
  for (int kind = 0; kind < 2; ++kind) {
    Experience e = w.e;
    for (int64_t i = 0; i < e.batch * e.steps; ++i)
      if (e.mask[i] != 0.0f) {
        (kind == 0 ? e.advantages : e.returns)[i] = kind == 0 ? tu::kNaN : tu::kInf;
        break;
      }
    const Stats s = w.trainer->update(e);
    CHECK(stat(s, "skipped") == 1.0);
    check_same_state(*w.policy, p, "policy untouched");
    check_same_state(*w.critic, c, "critic untouched");
  }
}

// ---- 6. the adaptive KL controller, options ---------------------------------------------------
TEST(adaptive_kl_controller) {
  World w = make_world({3, 2, 4}, 121, 0.3, 0.3);
  PpoOptions o = w.o;
  o.kl_estimator = KlEstimator::K3;  // >= 0 per token, so klbar > 0
  w.trainer->set_options(o);
  w.trainer->shape(w.e, false);
  const int64_t B = w.e.batch;
  double klbar = 0;
  for (int64_t i = 0; i < B * w.e.steps; ++i) klbar += w.e.kl[i];
  klbar /= B;
  CHECK(klbar > 0);
  o.kl_horizon = 50;
  o.policy_optimizer.lr = 1e-5;
  o.critic_optimizer.lr = 1e-5;
  double coef = o.kl_coef;
  // err inside the clip (+0.1), clipped below (-0.75 -> -0.2), clipped above (+1.5 -> +0.2)
  const double targets[] = {klbar / 1.1, klbar * 4.0, klbar / 2.5};
  const double errs[] = {0.1, -0.2, 0.2};
  o.kl_target = targets[0];
  w.trainer->set_options(o);  // kl_target changed: the coefficient restarts at kl_coef
  CHECK(w.trainer->state().kl_coef == o.kl_coef);
  for (int k = 0; k < 3; ++k) {
    if (k > 0) {
      o.kl_target = targets[k];
      w.trainer->set_options(o);
      PpoState st = w.trainer->state();
      st.kl_coef = coef;  // keep the running coefficient
      w.trainer->set_state(st);
    }
    const int64_t updates = w.trainer->state().updates;
    const Stats s = w.trainer->update(w.e);
    coef *= 1.0 + errs[k] * static_cast<double>(B) / o.kl_horizon;
    CHECK(stat(s, "skipped") == 0.0);
    CHECK_NEAR_CTX(w.trainer->state().kl_coef, coef, 0.0, 1e-9, "step " + std::to_string(k));
    CHECK(stat(s, "kl_coef") == w.trainer->state().kl_coef);
    CHECK(w.trainer->state().updates == updates + 1);
  }
  // The next shape uses the adapted coefficient.
  Experience e = w.e;
  w.trainer->shape(e, false);
  for (int64_t i = 0; i < B * e.steps; ++i)
    if (e.mask[i] != 0.0f && (i + 1) % e.steps != 0 && e.mask[i + 1] != 0.0f)  // not the last token
      CHECK_NEAR(e.rewards[i], -coef * e.kl[i], 1e-7, 1e-5);
  // kl_target 0: fixed.
  o.kl_target = 0;
  w.trainer->set_options(o);
  const double fixed = w.trainer->state().kl_coef;
  w.trainer->update(w.e);
  CHECK(w.trainer->state().kl_coef == fixed);
}

TEST(option_validation) {
  const PpoOptions good;
  CHECK_NO_THROW(check_ppo_options(good));
  auto bad = [](auto edit) {
    PpoOptions o;
    edit(o);
    return o;
  };
  CHECK_THROWS_CODE(check_ppo_options(bad([](PpoOptions& o) { o.mini_batch_size = 0; })), kBadOption, "miniBatchSize");
  CHECK_THROWS_CODE(check_ppo_options(bad([](PpoOptions& o) { o.ppo_epochs = 0; })), kBadOption, "ppoEpochs");
  CHECK_THROWS_CODE(check_ppo_options(bad([](PpoOptions& o) { o.policy_clip = 0; })), kBadOption, "policyClip");
  CHECK_THROWS_CODE(check_ppo_options(bad([](PpoOptions& o) { o.policy_clip = -0.1; })), kBadOption, "policyClip");
  CHECK_THROWS_CODE(check_ppo_options(bad([](PpoOptions& o) { o.gamma = 1.5; })), kBadOption, "gamma");
  CHECK_THROWS_CODE(check_ppo_options(bad([](PpoOptions& o) { o.gamma = std::nan(""); })), kBadOption, "gamma");
  CHECK_THROWS_CODE(check_ppo_options(bad([](PpoOptions& o) { o.lambda = -0.1; })), kBadOption, "lam");
  CHECK_THROWS_CODE(check_ppo_options(bad([](PpoOptions& o) { o.kl_coef = -0.01; })), kBadOption, "klCoef");
  CHECK_THROWS_CODE(check_ppo_options(bad([](PpoOptions& o) { o.top_p = 0; })), kBadOption, "topP");
  CHECK_THROWS_CODE(check_ppo_options(bad([](PpoOptions& o) { o.temperature = 0; })), kBadOption, "temperature");
  CHECK_THROWS_CODE(check_ppo_options(bad([](PpoOptions& o) { o.max_new_tokens = 0; })), kBadOption, "maxNewTokens");
  CHECK_THROWS_CODE(check_ppo_options(bad([](PpoOptions& o) { o.value_clip = -1; })), kBadOption, "valueClip");
  CHECK_THROWS_CODE(check_ppo_options(bad([](PpoOptions& o) { o.reward_clip = -1; })), kBadOption, "rewardClip");
  CHECK_THROWS_CODE(check_ppo_options(bad([](PpoOptions& o) { o.ptx_batch_ratio = 0; })), kBadOption,
                    "ptxBatchRatio");
  CHECK_THROWS_CODE(check_ppo_options(bad([](PpoOptions& o) { o.kl_horizon = 0; })), kBadOption, "klHorizon");
  CHECK_THROWS_CODE(check_ppo_options(bad([](PpoOptions& o) { o.policy_optimizer.lr = -1; })),
                    ErrorCode::InvalidArgument, "policyOptimizer.lr");
  CHECK_THROWS_CODE(check_ppo_options(bad([](PpoOptions& o) { o.critic_optimizer.beta2 = 1.0; })),
                    ErrorCode::InvalidArgument, "criticOptimizer.beta2");

  // The trainer: a critic without a value head, set_options refusing (and keeping the
  // old options), update before shape, non-finite scores.
  auto policy = make_model(false, 131), reference = make_model(false, 133, false), critic = make_model(true, 135);
  CHECK_THROWS_CODE(PpoTrainer(policy, reference, make_model(false, 137), nullptr, good), ErrorCode::InvalidArgument,
                    "critic");
  PpoOptions o;
  o.max_new_tokens = 3;
  PpoTrainer tr(policy, reference, critic, nullptr, o);
  PpoOptions broken = o;
  broken.mini_batch_size = 0;
  CHECK_THROWS_CODE(tr.set_options(broken), kBadOption, "miniBatchSize");
  CHECK(tr.options().mini_batch_size == o.mini_batch_size);
  tu::Rng rng(139);
  const Prompts pr = make_prompts(rng, {2, 3}, 8, 21);
  Experience e = tr.rollout(pr.view());
  CHECK_THROWS_CODE(tr.update(e), ErrorCode::InvalidArgument, "experience");
  const float nan_scores[] = {0.5f, tu::kNaN};
  CHECK_THROWS_CODE(tr.set_scores(e, nan_scores), ErrorCode::NonFinite, "scores");
}

PPO_TEST_MAIN()
