// Validation in the host API (core/ops.h): every op rejects bad sizes, bad options,
// non-finite inputs, out-of-range tokens and non-0/1 masks with a ppo::Error that has
// the right code and names the offending argument; padding is never validated; an
// error leaves the outputs untouched; Device::Cuda without a usable GPU throws
// ErrorCode::CudaUnavailable.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "core/ops.h"
#include "test_framework.h"
#include "test_util.h"

using ppo::Device;
using ppo::ErrorCode;

namespace {

const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();
const float kBadFloats[] = {kNaN, kInf, -kInf};

constexpr int64_t B = 3, T = 5, V = 7;

// Positions where a bad value is planted: first, a middle one and the last element,
// so a validator that skips a chunk tail (or the head) is caught.
std::vector<int64_t> probe_positions(int64_t n) { return {0, n / 2, n - 1}; }

// ---- logprobs ---------------------------------------------------------------------------

struct LogprobsFixture {
  std::vector<float> logits, mask, lp, ent, g_lp, g_h, grad;
  std::vector<int32_t> tokens;
  ppo::LogprobsArgs fwd;
  ppo::LogprobsBackwardArgs bwd;
  explicit LogprobsFixture(int64_t b = B, int64_t t = T, int64_t v = V) {
    tu::Rng rng(1);
    logits = tu::normal(rng, b * t * v);
    tokens = tu::tokens(rng, b * t, v);
    mask.assign(b * t, 1.0f);
    lp.assign(b * t, 0.0f);
    ent.assign(b * t, 0.0f);
    g_lp = tu::normal(rng, b * t);
    g_h = tu::normal(rng, b * t);
    grad.assign(b * t * v, 0.0f);
    fwd.batch = b, fwd.steps = t, fwd.vocab = v;
    fwd.logits = logits.data(), fwd.tokens = tokens.data(), fwd.mask = mask.data();
    fwd.temperature = 1.0f, fwd.logprobs = lp.data(), fwd.entropy = ent.data();
    bwd.batch = b, bwd.steps = t, bwd.vocab = v;
    bwd.logits = logits.data(), bwd.tokens = tokens.data(), bwd.mask = mask.data();
    bwd.temperature = 1.0f, bwd.grad_logprobs = g_lp.data(), bwd.grad_entropy = g_h.data();
    bwd.grad_logits = grad.data();
  }
  LogprobsFixture(const LogprobsFixture&) = delete;
  void forward() { ppo::logprobs_from_logits(Device::Cpu, fwd); }
  void backward() { ppo::logprobs_backward(Device::Cpu, bwd); }
};

}  // namespace

TEST(error_code_names_are_stable) {
  CHECK(std::string(ppo::error_code_name(ErrorCode::InvalidArgument)) == "ERR_INVALID_ARGUMENT");
  CHECK(std::string(ppo::error_code_name(ErrorCode::ShapeMismatch)) == "ERR_SHAPE_MISMATCH");
  CHECK(std::string(ppo::error_code_name(ErrorCode::NonFinite)) == "ERR_NON_FINITE");
  CHECK(std::string(ppo::error_code_name(ErrorCode::OutOfRange)) == "ERR_OUT_OF_RANGE");
  CHECK(std::string(ppo::error_code_name(ErrorCode::CudaUnavailable)) == "ERR_CUDA_UNAVAILABLE");
  CHECK(std::string(ppo::error_code_name(ErrorCode::CudaError)) == "ERR_CUDA");
  CHECK(std::string(ppo::error_code_name(ErrorCode::OutOfMemory)) == "ERR_OUT_OF_MEMORY");
  CHECK(std::string(ppo::error_code_name(ErrorCode::Internal)) == "ERR_INTERNAL");
}

TEST(logprobs_valid_baseline_passes) {
  LogprobsFixture f;
  CHECK_NO_THROW(f.forward());
  CHECK_NO_THROW(f.backward());
  f.fwd.mask = nullptr, f.bwd.mask = nullptr;
  f.fwd.entropy = nullptr;
  f.bwd.grad_entropy = nullptr;
  CHECK_NO_THROW(f.forward());
  CHECK_NO_THROW(f.backward());
  f.bwd.grad_logprobs = nullptr;
  CHECK_NO_THROW(f.backward());
}

TEST(logprobs_rejects_bad_sizes) {
  for (int64_t bad : {int64_t(0), int64_t(-1), int64_t(-1000)}) {
    {
      LogprobsFixture f;
      f.fwd.batch = bad, f.bwd.batch = bad;
      CHECK_THROWS_CODE(f.forward(), ErrorCode::InvalidArgument, "batch");
      CHECK_THROWS_CODE(f.backward(), ErrorCode::InvalidArgument, "batch");
    }
    {
      LogprobsFixture f;
      f.fwd.steps = bad, f.bwd.steps = bad;
      CHECK_THROWS_CODE(f.forward(), ErrorCode::InvalidArgument, "steps");
      CHECK_THROWS_CODE(f.backward(), ErrorCode::InvalidArgument, "steps");
    }
    {
      LogprobsFixture f;
      f.fwd.vocab = bad, f.bwd.vocab = bad;
      CHECK_THROWS_CODE(f.forward(), ErrorCode::InvalidArgument, "vocab");
      CHECK_THROWS_CODE(f.backward(), ErrorCode::InvalidArgument, "vocab");
    }
  }
}

TEST(logprobs_rejects_bad_temperature) {
  for (float bad : {0.0f, -0.0f, -1.0f, kNaN, kInf, -kInf}) {
    LogprobsFixture f;
    f.fwd.temperature = bad, f.bwd.temperature = bad;
    CHECK_THROWS_CODE(f.forward(), ErrorCode::InvalidArgument, "temperature");
    CHECK_THROWS_CODE(f.backward(), ErrorCode::InvalidArgument, "temperature");
  }
}

TEST(logprobs_rejects_nan_and_pos_inf_logits) {
  for (float bad : {kNaN, kInf}) {
    for (int64_t pos : probe_positions(B * T * V)) {
      LogprobsFixture f;
      f.logits[pos] = bad;
      CHECK_THROWS_CODE(f.forward(), ErrorCode::NonFinite, "logits");
      CHECK_THROWS_CODE(f.backward(), ErrorCode::NonFinite, "logits");
    }
  }
  // Many rows (the row check runs in parallel chunks): a NaN in the very last logit.
  LogprobsFixture g(64, 33, 5);
  g.logits.back() = kNaN;
  CHECK_THROWS_CODE(g.forward(), ErrorCode::NonFinite, "logits");
  LogprobsFixture h(64, 33, 5);
  h.logits[0] = kInf;
  CHECK_THROWS_CODE(h.backward(), ErrorCode::NonFinite, "logits");
}

// Rows are checked in parallel inside the kernel; with several bad rows the error must
// name the first one, whatever the thread timing (run it many times to catch a race).
TEST(logprobs_reports_the_first_bad_row) {
  const int64_t b = 16, t = 16, v = 4096;  // 256 rows x 4096: split across threads
  for (int rep = 0; rep < 20; ++rep) {
    LogprobsFixture f(b, t, v);
    const int64_t first = 7 * v + 5, later = 250 * v + 1;
    f.logits[first] = kNaN;
    f.logits[later] = kNaN;
    bool threw = false;
    try {
      f.forward();
    } catch (const ppo::Error& e) {
      threw = true;
      CHECK(std::string(e.what()).find("logits[" + std::to_string(first) + "]") != std::string::npos);
    }
    CHECK(threw);
  }
}

TEST(logprobs_neg_inf_logits_allowed_for_non_taken_tokens_only) {
  LogprobsFixture f;
  for (int64_t i = 0; i < B * T; ++i)
    for (int64_t v = 0; v < V; ++v)
      if (v != f.tokens[i] && v % 2 == 0) f.logits[i * V + v] = -kInf;
  CHECK_NO_THROW(f.forward());
  CHECK_NO_THROW(f.backward());
  // The taken token at -inf has no log-prob.
  LogprobsFixture g;
  g.logits[4 * V + g.tokens[4]] = -kInf;
  CHECK_THROWS_CODE(g.forward(), ErrorCode::NonFinite, "logits");
  CHECK_THROWS_CODE(g.backward(), ErrorCode::NonFinite, "logits");
}

TEST(logprobs_rejects_tokens_out_of_range) {
  for (int32_t bad : {-1, static_cast<int32_t>(V), static_cast<int32_t>(V + 100),
                      std::numeric_limits<int32_t>::min()}) {
    for (int64_t pos : probe_positions(B * T)) {
      LogprobsFixture f;
      f.tokens[pos] = bad;
      CHECK_THROWS_CODE(f.forward(), ErrorCode::OutOfRange, "tokens");
      CHECK_THROWS_CODE(f.backward(), ErrorCode::OutOfRange, "tokens");
      // Without a mask every position is valid: still rejected.
      f.fwd.mask = nullptr, f.bwd.mask = nullptr;
      CHECK_THROWS_CODE(f.forward(), ErrorCode::OutOfRange, "tokens");
      CHECK_THROWS_CODE(f.backward(), ErrorCode::OutOfRange, "tokens");
    }
  }
}

TEST(logprobs_padding_is_not_validated) {
  // Masked positions may hold anything: bad tokens, NaN / +inf logits and gradients.
  LogprobsFixture f;
  for (int64_t i : {int64_t(0), int64_t(7), B * T - 1}) {
    f.mask[i] = 0.0f;
    f.tokens[i] = i % 2 ? -5 : static_cast<int32_t>(V);
    f.logits[i * V] = kNaN;
    f.logits[i * V + 1] = kInf;
    f.g_lp[i] = kNaN;
    f.g_h[i] = kInf;
  }
  CHECK_NO_THROW(f.forward());
  CHECK_NO_THROW(f.backward());
}

TEST(logprobs_rejects_bad_mask_values) {
  for (float bad : {0.5f, 2.0f, -1.0f, -0.0001f, kNaN, kInf}) {
    for (int64_t pos : probe_positions(B * T)) {
      LogprobsFixture f;
      f.mask[pos] = bad;
      CHECK_THROWS_CODE(f.forward(), ErrorCode::OutOfRange, "mask");
      CHECK_THROWS_CODE(f.backward(), ErrorCode::OutOfRange, "mask");
    }
  }
}

TEST(logprobs_backward_rejects_nonfinite_gradients) {
  for (float bad : kBadFloats) {
    for (int64_t pos : probe_positions(B * T)) {
      LogprobsFixture f;
      f.g_lp[pos] = bad;
      CHECK_THROWS_CODE(f.backward(), ErrorCode::NonFinite, "grad_logprobs");
      LogprobsFixture g;
      g.g_h[pos] = bad;
      CHECK_THROWS_CODE(g.backward(), ErrorCode::NonFinite, "grad_entropy");
    }
  }
}

TEST(logprobs_rejects_missing_pointers) {
  {
    LogprobsFixture f;
    f.fwd.logits = nullptr, f.bwd.logits = nullptr;
    CHECK_THROWS_CODE(f.forward(), ErrorCode::InvalidArgument, "logits");
    CHECK_THROWS_CODE(f.backward(), ErrorCode::InvalidArgument, "logits");
  }
  {
    LogprobsFixture f;
    f.fwd.tokens = nullptr, f.bwd.tokens = nullptr;
    CHECK_THROWS_CODE(f.forward(), ErrorCode::InvalidArgument, "tokens");
    CHECK_THROWS_CODE(f.backward(), ErrorCode::InvalidArgument, "tokens");
  }
  {
    LogprobsFixture f;
    f.fwd.logprobs = nullptr;
    CHECK_THROWS_CODE(f.forward(), ErrorCode::InvalidArgument, "logprobs");
    f.bwd.grad_logits = nullptr;
    CHECK_THROWS_CODE(f.backward(), ErrorCode::InvalidArgument, "grad_logits");
  }
}

// The CPU logprobs kernels check each logits row as they read it (ops.h), so their
// outputs may be partly written when the logits are bad; every other input of every
// op is checked before any output is touched.
TEST(errors_leave_outputs_untouched) {
  LogprobsFixture f;
  std::fill(f.lp.begin(), f.lp.end(), 123.0f);
  std::fill(f.ent.begin(), f.ent.end(), 123.0f);
  std::fill(f.grad.begin(), f.grad.end(), 123.0f);
  f.tokens.back() = static_cast<int32_t>(V);  // out of range: checked before the kernel
  CHECK_THROWS_CODE(f.forward(), ErrorCode::OutOfRange, "tokens");
  CHECK_THROWS_CODE(f.backward(), ErrorCode::OutOfRange, "tokens");
  for (float x : f.lp) CHECK(x == 123.0f);
  for (float x : f.ent) CHECK(x == 123.0f);
  for (float x : f.grad) CHECK(x == 123.0f);

  std::vector<float> r(B * T, 1.0f), v(B * T, 1.0f), adv(B * T, 123.0f), ret(B * T, 123.0f);
  r.back() = kInf;
  ppo::GaeArgs a;
  a.batch = B, a.steps = T, a.rewards = r.data(), a.values = v.data();
  a.advantages = adv.data(), a.returns = ret.data();
  CHECK_THROWS_CODE(ppo::gae(Device::Cpu, a), ErrorCode::NonFinite, "rewards");
  for (float x : adv) CHECK(x == 123.0f);
  for (float x : ret) CHECK(x == 123.0f);
}

// ---- KL rewards -----------------------------------------------------------------------------

namespace {

struct KlFixture {
  std::vector<float> lp, ref, scores, mask, rewards, kl;
  ppo::KlRewardsArgs a;
  KlFixture() {
    tu::Rng rng(2);
    lp = tu::uniform(rng, B * T, -5, 0);
    ref = tu::uniform(rng, B * T, -5, 0);
    scores = tu::normal(rng, B);
    mask.assign(B * T, 1.0f);
    rewards.assign(B * T, 0.0f);
    kl.assign(B * T, 0.0f);
    a.batch = B, a.steps = T;
    a.logprobs = lp.data(), a.ref_logprobs = ref.data(), a.scores = scores.data();
    a.mask = mask.data(), a.kl_coef = 0.1f, a.estimator = ppo::KlEstimator::K3;
    a.rewards = rewards.data(), a.kl = kl.data();
  }
  KlFixture(const KlFixture&) = delete;
  void run() { ppo::kl_penalized_rewards(Device::Cpu, a); }
};

}  // namespace

TEST(kl_rewards_validation) {
  {
    KlFixture f;
    CHECK_NO_THROW(f.run());
    f.a.mask = nullptr, f.a.kl = nullptr, f.a.kl_coef = 0.0f;
    CHECK_NO_THROW(f.run());
  }
  for (int64_t bad : {int64_t(0), int64_t(-2)}) {
    KlFixture f;
    f.a.batch = bad;
    CHECK_THROWS_CODE(f.run(), ErrorCode::InvalidArgument, "batch");
    KlFixture g;
    g.a.steps = bad;
    CHECK_THROWS_CODE(g.run(), ErrorCode::InvalidArgument, "steps");
  }
  for (float bad : kBadFloats) {
    for (int64_t pos : probe_positions(B * T)) {
      KlFixture f;
      f.lp[pos] = bad;
      CHECK_THROWS_CODE(f.run(), ErrorCode::NonFinite, "logprobs");
      KlFixture g;
      g.ref[pos] = bad;
      CHECK_THROWS_CODE(g.run(), ErrorCode::NonFinite, "ref_logprobs");
    }
    for (int64_t pos : probe_positions(B)) {
      KlFixture f;
      f.scores[pos] = bad;
      CHECK_THROWS_CODE(f.run(), ErrorCode::NonFinite, "scores");
    }
  }
  for (float bad : {-0.1f, kNaN, kInf}) {
    KlFixture f;
    f.a.kl_coef = bad;
    CHECK_THROWS_CODE(f.run(), ErrorCode::InvalidArgument, "kl_coef");
  }
  for (int bad : {0, 4, -1}) {
    KlFixture f;
    f.a.estimator = static_cast<ppo::KlEstimator>(bad);
    CHECK_THROWS_CODE(f.run(), ErrorCode::InvalidArgument, "estimator");
  }
  for (float bad : {0.5f, 3.0f, kNaN}) {
    KlFixture f;
    f.mask[B * T - 1] = bad;
    CHECK_THROWS_CODE(f.run(), ErrorCode::OutOfRange, "mask");
  }
  {
    KlFixture f;
    f.a.rewards = nullptr;
    CHECK_THROWS_CODE(f.run(), ErrorCode::InvalidArgument, "rewards");
    KlFixture g;
    g.a.scores = nullptr;
    CHECK_THROWS_CODE(g.run(), ErrorCode::InvalidArgument, "scores");
    KlFixture h;
    h.a.ref_logprobs = nullptr;
    CHECK_THROWS_CODE(h.run(), ErrorCode::InvalidArgument, "ref_logprobs");
  }
  {  // padding may hold anything
    KlFixture f;
    f.mask[3] = 0.0f;
    f.lp[3] = kNaN;
    f.ref[3] = kInf;
    CHECK_NO_THROW(f.run());
  }
}

// ---- moments / normalize ------------------------------------------------------------------

TEST(moments_validation) {
  std::vector<float> v = {1.0f, 2.0f, 3.0f};
  ppo::MomentsArgs a;
  a.count = 3, a.values = v.data();
  CHECK_NO_THROW(ppo::batch_moments(Device::Cpu, a));
  for (int64_t bad : {int64_t(0), int64_t(-1)}) {
    ppo::MomentsArgs b = a;
    b.count = bad;
    CHECK_THROWS_CODE(ppo::batch_moments(Device::Cpu, b), ErrorCode::InvalidArgument, "count");
  }
  for (float bad : kBadFloats) {
    for (int64_t pos : probe_positions(3)) {
      std::vector<float> w = v;
      w[pos] = bad;
      ppo::MomentsArgs b = a;
      b.values = w.data();
      CHECK_THROWS_CODE(ppo::batch_moments(Device::Cpu, b), ErrorCode::NonFinite, "values");
    }
  }
  ppo::MomentsArgs c = a;
  c.values = nullptr;
  CHECK_THROWS_CODE(ppo::batch_moments(Device::Cpu, c), ErrorCode::InvalidArgument, "values");
}

TEST(normalize_validation) {
  std::vector<float> v = {1.0f, 2.0f, 3.0f}, out(3, 0.0f);
  ppo::NormalizeScoresArgs a;
  a.count = 3, a.values = v.data(), a.mean = 2.0, a.std = 1.0, a.out = out.data();
  CHECK_NO_THROW(ppo::normalize_scores(Device::Cpu, a));
  {  // std = 0 is fine while eps > 0; clip = 0 means no clipping
    ppo::NormalizeScoresArgs b = a;
    b.std = 0.0, b.clip = 0.0f;
    CHECK_NO_THROW(ppo::normalize_scores(Device::Cpu, b));
  }
  for (int64_t bad : {int64_t(0), int64_t(-3)}) {
    ppo::NormalizeScoresArgs b = a;
    b.count = bad;
    CHECK_THROWS_CODE(ppo::normalize_scores(Device::Cpu, b), ErrorCode::InvalidArgument, "count");
  }
  for (float bad : kBadFloats) {
    std::vector<float> w = v;
    w[2] = bad;
    ppo::NormalizeScoresArgs b = a;
    b.values = w.data();
    CHECK_THROWS_CODE(ppo::normalize_scores(Device::Cpu, b), ErrorCode::NonFinite, "values");
  }
  for (double bad : {double(kNaN), double(kInf)}) {
    ppo::NormalizeScoresArgs b = a;
    b.mean = bad;
    CHECK_THROWS_CODE(ppo::normalize_scores(Device::Cpu, b), ErrorCode::InvalidArgument, "mean");
  }
  for (double bad : {-1.0, double(kNaN), double(kInf)}) {
    ppo::NormalizeScoresArgs b = a;
    b.std = bad;
    CHECK_THROWS_CODE(ppo::normalize_scores(Device::Cpu, b), ErrorCode::InvalidArgument, "std");
  }
  for (float bad : {-1e-8f, kNaN, kInf}) {
    ppo::NormalizeScoresArgs b = a;
    b.eps = bad;
    CHECK_THROWS_CODE(ppo::normalize_scores(Device::Cpu, b), ErrorCode::InvalidArgument, "eps");
  }
  {  // std + eps == 0: nothing to divide by
    ppo::NormalizeScoresArgs b = a;
    b.std = 0.0, b.eps = 0.0f;
    CHECK_THROWS_CODE(ppo::normalize_scores(Device::Cpu, b), ErrorCode::InvalidArgument, "eps");
  }
  for (float bad : {kNaN, kInf}) {
    ppo::NormalizeScoresArgs b = a;
    b.clip = bad;
    CHECK_THROWS_CODE(ppo::normalize_scores(Device::Cpu, b), ErrorCode::InvalidArgument, "clip");
  }
  ppo::NormalizeScoresArgs c = a;
  c.out = nullptr;
  CHECK_THROWS_CODE(ppo::normalize_scores(Device::Cpu, c), ErrorCode::InvalidArgument, "out");
}

// ---- GAE / whiten / clip --------------------------------------------------------------------

namespace {

struct GaeFixture {
  std::vector<float> r, v, mask, adv, ret;
  ppo::GaeArgs a;
  GaeFixture() {
    tu::Rng rng(3);
    r = tu::normal(rng, B * T);
    v = tu::normal(rng, B * T);
    mask.assign(B * T, 1.0f);
    adv.assign(B * T, 0.0f);
    ret.assign(B * T, 0.0f);
    a.batch = B, a.steps = T, a.rewards = r.data(), a.values = v.data(), a.mask = mask.data();
    a.gamma = 0.99f, a.lambda = 0.95f, a.advantages = adv.data(), a.returns = ret.data();
  }
  GaeFixture(const GaeFixture&) = delete;
  void run() { ppo::gae(Device::Cpu, a); }
};

}  // namespace

TEST(gae_validation) {
  {
    GaeFixture f;
    CHECK_NO_THROW(f.run());
    for (float g : {0.0f, 1.0f})
      for (float l : {0.0f, 1.0f}) {
        f.a.gamma = g, f.a.lambda = l;
        CHECK_NO_THROW(f.run());
      }
  }
  for (int64_t bad : {int64_t(0), int64_t(-1)}) {
    GaeFixture f;
    f.a.batch = bad;
    CHECK_THROWS_CODE(f.run(), ErrorCode::InvalidArgument, "batch");
    GaeFixture g;
    g.a.steps = bad;
    CHECK_THROWS_CODE(g.run(), ErrorCode::InvalidArgument, "steps");
  }
  for (float bad : {-0.01f, 1.01f, 2.0f, kNaN, kInf}) {
    GaeFixture f;
    f.a.gamma = bad;
    CHECK_THROWS_CODE(f.run(), ErrorCode::InvalidArgument, "gamma");
    GaeFixture g;
    g.a.lambda = bad;
    CHECK_THROWS_CODE(g.run(), ErrorCode::InvalidArgument, "lambda");
  }
  for (float bad : kBadFloats) {
    for (int64_t pos : probe_positions(B * T)) {
      GaeFixture f;
      f.r[pos] = bad;
      CHECK_THROWS_CODE(f.run(), ErrorCode::NonFinite, "rewards");
      GaeFixture g;
      g.v[pos] = bad;
      CHECK_THROWS_CODE(g.run(), ErrorCode::NonFinite, "values");
    }
  }
  for (float bad : {0.5f, -1.0f, kNaN}) {
    GaeFixture f;
    f.mask[0] = bad;
    CHECK_THROWS_CODE(f.run(), ErrorCode::OutOfRange, "mask");
  }
  {
    GaeFixture f;
    f.a.advantages = nullptr;
    CHECK_THROWS_CODE(f.run(), ErrorCode::InvalidArgument, "advantages");
    GaeFixture g;
    g.a.returns = nullptr;
    CHECK_THROWS_CODE(g.run(), ErrorCode::InvalidArgument, "returns");
    GaeFixture h;
    h.a.values = nullptr;
    CHECK_THROWS_CODE(h.run(), ErrorCode::InvalidArgument, "values");
  }
  {
    GaeFixture f;
    f.mask[6] = 0.0f;
    f.r[6] = kNaN;
    f.v[6] = -kInf;
    CHECK_NO_THROW(f.run());
  }
}

TEST(whiten_validation) {
  std::vector<float> v(B * T, 1.5f), mask(B * T, 1.0f), out(B * T, 0.0f);
  v[3] = 2.0f;
  ppo::WhitenArgs a;
  a.batch = B, a.steps = T, a.values = v.data(), a.mask = mask.data(), a.out = out.data();
  CHECK_NO_THROW(ppo::whiten(Device::Cpu, a));
  {
    ppo::WhitenArgs b = a;
    b.eps = 0.0f, b.clip = 0.0f, b.shift_mean = false;
    CHECK_NO_THROW(ppo::whiten(Device::Cpu, b));
  }
  for (int64_t bad : {int64_t(0), int64_t(-1)}) {
    ppo::WhitenArgs b = a;
    b.batch = bad;
    CHECK_THROWS_CODE(ppo::whiten(Device::Cpu, b), ErrorCode::InvalidArgument, "batch");
    ppo::WhitenArgs c = a;
    c.steps = bad;
    CHECK_THROWS_CODE(ppo::whiten(Device::Cpu, c), ErrorCode::InvalidArgument, "steps");
  }
  for (float bad : kBadFloats) {
    for (int64_t pos : probe_positions(B * T)) {
      std::vector<float> w = v;
      w[pos] = bad;
      ppo::WhitenArgs b = a;
      b.values = w.data();
      CHECK_THROWS_CODE(ppo::whiten(Device::Cpu, b), ErrorCode::NonFinite, "values");
    }
  }
  for (float bad : {-1e-3f, kNaN, kInf}) {
    ppo::WhitenArgs b = a;
    b.eps = bad;
    CHECK_THROWS_CODE(ppo::whiten(Device::Cpu, b), ErrorCode::InvalidArgument, "eps");
  }
  for (float bad : {kNaN, kInf}) {
    ppo::WhitenArgs b = a;
    b.clip = bad;
    CHECK_THROWS_CODE(ppo::whiten(Device::Cpu, b), ErrorCode::InvalidArgument, "clip");
  }
  {
    std::vector<float> m = mask;
    m[B * T - 1] = 0.25f;
    ppo::WhitenArgs b = a;
    b.mask = m.data();
    CHECK_THROWS_CODE(ppo::whiten(Device::Cpu, b), ErrorCode::OutOfRange, "mask");
  }
  ppo::WhitenArgs c = a;
  c.out = nullptr;
  CHECK_THROWS_CODE(ppo::whiten(Device::Cpu, c), ErrorCode::InvalidArgument, "out");
}

TEST(clip_validation) {
  std::vector<float> v(B * T, 0.5f), mask(B * T, 1.0f), out(B * T, 0.0f);
  ppo::ClipArgs a;
  a.batch = B, a.steps = T, a.values = v.data(), a.mask = mask.data(), a.clip = 1.0f;
  a.out = out.data();
  CHECK_NO_THROW(ppo::clip_masked(Device::Cpu, a));
  for (float bad : {0.0f, -1.0f, kNaN, kInf}) {
    ppo::ClipArgs b = a;
    b.clip = bad;
    CHECK_THROWS_CODE(ppo::clip_masked(Device::Cpu, b), ErrorCode::InvalidArgument, "clip");
  }
  for (int64_t bad : {int64_t(0), int64_t(-1)}) {
    ppo::ClipArgs b = a;
    b.batch = bad;
    CHECK_THROWS_CODE(ppo::clip_masked(Device::Cpu, b), ErrorCode::InvalidArgument, "batch");
    ppo::ClipArgs c = a;
    c.steps = bad;
    CHECK_THROWS_CODE(ppo::clip_masked(Device::Cpu, c), ErrorCode::InvalidArgument, "steps");
  }
  for (float bad : kBadFloats) {
    std::vector<float> w = v;
    w[B * T - 1] = bad;
    ppo::ClipArgs b = a;
    b.values = w.data();
    CHECK_THROWS_CODE(ppo::clip_masked(Device::Cpu, b), ErrorCode::NonFinite, "values");
  }
  {
    std::vector<float> m = mask;
    m[0] = 2.0f;
    ppo::ClipArgs b = a;
    b.mask = m.data();
    CHECK_THROWS_CODE(ppo::clip_masked(Device::Cpu, b), ErrorCode::OutOfRange, "mask");
  }
  ppo::ClipArgs c = a;
  c.out = nullptr;
  CHECK_THROWS_CODE(ppo::clip_masked(Device::Cpu, c), ErrorCode::InvalidArgument, "out");
}

// ---- losses --------------------------------------------------------------------------------

namespace {

struct PolicyFixture {
  std::vector<float> lp, old, adv, mask, grad;
  ppo::PolicyLossArgs a;
  PolicyFixture() {
    tu::Rng rng(4);
    lp = tu::uniform(rng, B * T, -3, 0);
    old = tu::uniform(rng, B * T, -3, 0);
    adv = tu::normal(rng, B * T);
    mask.assign(B * T, 1.0f);
    grad.assign(B * T, 0.0f);
    a.batch = B, a.steps = T, a.logprobs = lp.data(), a.old_logprobs = old.data();
    a.advantages = adv.data(), a.mask = mask.data(), a.clip_eps = 0.2f;
    a.grad_logprobs = grad.data();
  }
  PolicyFixture(const PolicyFixture&) = delete;
  void run() { ppo::policy_loss(Device::Cpu, a); }
};

struct ValueFixture {
  std::vector<float> v, old, ret, mask, grad;
  ppo::ValueLossArgs a;
  ValueFixture() {
    tu::Rng rng(5);
    v = tu::normal(rng, B * T);
    old = tu::normal(rng, B * T);
    ret = tu::normal(rng, B * T);
    mask.assign(B * T, 1.0f);
    grad.assign(B * T, 0.0f);
    a.batch = B, a.steps = T, a.values = v.data(), a.old_values = old.data();
    a.returns = ret.data(), a.mask = mask.data(), a.use_clip = true, a.clip_eps = 0.2f;
    a.grad_values = grad.data();
  }
  ValueFixture(const ValueFixture&) = delete;
  void run() { ppo::value_loss(Device::Cpu, a); }
};

}  // namespace

TEST(policy_loss_validation) {
  {
    PolicyFixture f;
    CHECK_NO_THROW(f.run());
    f.a.grad_logprobs = nullptr, f.a.mask = nullptr;
    CHECK_NO_THROW(f.run());
  }
  for (int64_t bad : {int64_t(0), int64_t(-1)}) {
    PolicyFixture f;
    f.a.batch = bad;
    CHECK_THROWS_CODE(f.run(), ErrorCode::InvalidArgument, "batch");
    PolicyFixture g;
    g.a.steps = bad;
    CHECK_THROWS_CODE(g.run(), ErrorCode::InvalidArgument, "steps");
  }
  for (float bad : {0.0f, -0.2f, kNaN, kInf}) {
    PolicyFixture f;
    f.a.clip_eps = bad;
    CHECK_THROWS_CODE(f.run(), ErrorCode::InvalidArgument, "clip_eps");
  }
  for (float bad : kBadFloats) {
    for (int64_t pos : probe_positions(B * T)) {
      PolicyFixture f;
      f.lp[pos] = bad;
      CHECK_THROWS_CODE(f.run(), ErrorCode::NonFinite, "logprobs");
      PolicyFixture g;
      g.old[pos] = bad;
      CHECK_THROWS_CODE(g.run(), ErrorCode::NonFinite, "old_logprobs");
      PolicyFixture h;
      h.adv[pos] = bad;
      CHECK_THROWS_CODE(h.run(), ErrorCode::NonFinite, "advantages");
    }
  }
  for (float bad : {0.5f, -1.0f, kNaN}) {
    PolicyFixture f;
    f.mask[B * T / 2] = bad;
    CHECK_THROWS_CODE(f.run(), ErrorCode::OutOfRange, "mask");
  }
  {
    PolicyFixture f;
    f.a.advantages = nullptr;
    CHECK_THROWS_CODE(f.run(), ErrorCode::InvalidArgument, "advantages");
  }
  {
    PolicyFixture f;
    f.mask[2] = 0.0f;
    f.lp[2] = kNaN, f.old[2] = kInf, f.adv[2] = -kInf;
    CHECK_NO_THROW(f.run());
  }
}

TEST(value_loss_validation) {
  {
    ValueFixture f;
    CHECK_NO_THROW(f.run());
    f.a.grad_values = nullptr, f.a.mask = nullptr;
    CHECK_NO_THROW(f.run());
    // Without clipping, clip_eps is not used and not checked.
    f.a.use_clip = false, f.a.clip_eps = 0.0f;
    CHECK_NO_THROW(f.run());
  }
  for (int64_t bad : {int64_t(0), int64_t(-1)}) {
    ValueFixture f;
    f.a.batch = bad;
    CHECK_THROWS_CODE(f.run(), ErrorCode::InvalidArgument, "batch");
    ValueFixture g;
    g.a.steps = bad;
    CHECK_THROWS_CODE(g.run(), ErrorCode::InvalidArgument, "steps");
  }
  for (float bad : {0.0f, -0.2f, kNaN, kInf}) {
    ValueFixture f;
    f.a.clip_eps = bad;
    CHECK_THROWS_CODE(f.run(), ErrorCode::InvalidArgument, "clip_eps");
  }
  for (float bad : kBadFloats) {
    for (int64_t pos : probe_positions(B * T)) {
      ValueFixture f;
      f.v[pos] = bad;
      CHECK_THROWS_CODE(f.run(), ErrorCode::NonFinite, "values");
      ValueFixture g;
      g.old[pos] = bad;
      CHECK_THROWS_CODE(g.run(), ErrorCode::NonFinite, "old_values");
      ValueFixture h;
      h.ret[pos] = bad;
      CHECK_THROWS_CODE(h.run(), ErrorCode::NonFinite, "returns");
    }
  }
  for (float bad : {0.5f, 7.0f, kNaN}) {
    ValueFixture f;
    f.mask[0] = bad;
    CHECK_THROWS_CODE(f.run(), ErrorCode::OutOfRange, "mask");
  }
  {
    ValueFixture f;
    f.a.returns = nullptr;
    CHECK_THROWS_CODE(f.run(), ErrorCode::InvalidArgument, "returns");
  }
  {
    ValueFixture f;
    f.mask[9] = 0.0f;
    f.v[9] = kNaN, f.old[9] = kInf, f.ret[9] = -kInf;
    CHECK_NO_THROW(f.run());
  }
}

// ---- CUDA requested without a usable GPU ---------------------------------------------------

TEST(cuda_unavailable_is_reported) {
  if (ppo::cuda_available()) {
    // This machine has a usable GPU: the parity test covers Device::Cuda.
    CHECK(ppo::cuda_unavailable_reason().empty());
    return;
  }
  CHECK(!ppo::cuda_unavailable_reason().empty());
  CHECK_THROWS_CODE(ppo::backend_for(Device::Cuda), ErrorCode::CudaUnavailable, "device");
  CHECK_NO_THROW(ppo::backend_for(Device::Cpu));

  LogprobsFixture lf;
  CHECK_THROWS_CODE(ppo::logprobs_from_logits(Device::Cuda, lf.fwd), ErrorCode::CudaUnavailable,
                    "device");
  CHECK_THROWS_CODE(ppo::logprobs_backward(Device::Cuda, lf.bwd), ErrorCode::CudaUnavailable,
                    "device");
  KlFixture kf;
  CHECK_THROWS_CODE(ppo::kl_penalized_rewards(Device::Cuda, kf.a), ErrorCode::CudaUnavailable,
                    "device");
  std::vector<float> v = {1.0f, 2.0f, 3.0f}, out(3);
  ppo::MomentsArgs ma;
  ma.count = 3, ma.values = v.data();
  CHECK_THROWS_CODE(ppo::batch_moments(Device::Cuda, ma), ErrorCode::CudaUnavailable, "device");
  ppo::NormalizeScoresArgs na;
  na.count = 3, na.values = v.data(), na.out = out.data();
  CHECK_THROWS_CODE(ppo::normalize_scores(Device::Cuda, na), ErrorCode::CudaUnavailable,
                    "device");
  GaeFixture gf;
  CHECK_THROWS_CODE(ppo::gae(Device::Cuda, gf.a), ErrorCode::CudaUnavailable, "device");
  std::vector<float> w(B * T, 0.5f), o(B * T);
  ppo::WhitenArgs wa;
  wa.batch = B, wa.steps = T, wa.values = w.data(), wa.out = o.data();
  CHECK_THROWS_CODE(ppo::whiten(Device::Cuda, wa), ErrorCode::CudaUnavailable, "device");
  ppo::ClipArgs ca;
  ca.batch = B, ca.steps = T, ca.values = w.data(), ca.clip = 1.0f, ca.out = o.data();
  CHECK_THROWS_CODE(ppo::clip_masked(Device::Cuda, ca), ErrorCode::CudaUnavailable, "device");
  PolicyFixture pf;
  CHECK_THROWS_CODE(ppo::policy_loss(Device::Cuda, pf.a), ErrorCode::CudaUnavailable, "device");
  ValueFixture vf;
  CHECK_THROWS_CODE(ppo::value_loss(Device::Cuda, vf.a), ErrorCode::CudaUnavailable, "device");
}

PPO_TEST_MAIN()
