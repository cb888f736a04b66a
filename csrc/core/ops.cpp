#include "core/ops.h"

#include <cmath>
#include <vector>

#include "core/error.h"
#include "core/thread_pool.h"
#include "core/validate.h"

namespace ppo {

namespace {

// Moves host arrays into a backend's memory for one op and the outputs back.
// On the CPU every call returns the host pointer itself; on CUDA it allocates,
// copies inputs in, and copies registered outputs out in finish(). Device buffers
// are freed by the destructor, also when the op throws.
class Staging {
 public:
  explicit Staging(const Backend& backend) : backend_(backend) {}
  ~Staging() {
    for (void* p : buffers_) backend_.free(p);
  }
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;

  template <typename T>
  const T* in(const T* host, int64_t count) {
    if (!host || backend_.host_memory) return host;
    void* dev = allocate(sizeof(T) * count);
    backend_.copy_to_device(dev, host, sizeof(T) * count);
    return static_cast<const T*>(dev);
  }
  template <typename T>
  T* out(T* host, int64_t count) {
    if (!host || backend_.host_memory) return host;
    void* dev = allocate(sizeof(T) * count);
    outputs_.push_back({host, dev, sizeof(T) * count});
    return static_cast<T*>(dev);
  }
  void finish() {
    for (auto& o : outputs_) backend_.copy_to_host(o.host, o.device, o.bytes);
  }

 private:
  void* allocate(size_t bytes) {
    buffers_.reserve(buffers_.size() + 1);  // so push_back below cannot throw and leak
    void* p = backend_.alloc(bytes);
    buffers_.push_back(p);
    return p;
  }
  struct Output {
    void* host;
    void* device;
    size_t bytes;
  };
  const Backend& backend_;
  std::vector<void*> buffers_;
  std::vector<Output> outputs_;
};

void check_sequence_shape(int64_t batch, int64_t steps) {
  validate::positive_size(batch, "batch");
  validate::positive_size(steps, "steps");
}

void check_sequence_input(const float* values, const float* mask, int64_t batch, int64_t steps,
                          const char* name) {
  validate::present(values, name);
  validate::finite_where_valid(values, mask, batch * steps, name);
}

void check_output(const void* ptr, const char* name) { validate::present(ptr, name); }

void check_logprobs_inputs(const Backend& backend, int64_t batch, int64_t steps, int64_t vocab,
                           const float* logits, const int32_t* tokens, const float* mask,
                           float temperature) {
  check_sequence_shape(batch, steps);
  validate::positive_size(vocab, "vocab");
  validate::present(logits, "logits");
  validate::present(tokens, "tokens");
  validate::scalar_in_range(temperature, 0.0, 1e30, true, "temperature");
  const int64_t rows = batch * steps;
  validate::mask_values(mask, rows);
  validate::tokens_in_range(tokens, mask, rows, vocab);
  if (backend.checks_logits_inline) return;
  // parallel_for rethrows the lowest chunk's error: the first bad row is the one named.
  parallel_for(rows, [&](int64_t lo, int64_t hi) {
    validate::logits_rows(logits, tokens, mask, lo, hi, vocab);
  }, grain_for(vocab));
}

}  // namespace

void logprobs_from_logits(Device device, const LogprobsArgs& a) {
  const Backend& be = backend_for(device);
  check_logprobs_inputs(be, a.batch, a.steps, a.vocab, a.logits, a.tokens, a.mask, a.temperature);
  check_output(a.logprobs, "logprobs");
  const int64_t rows = a.batch * a.steps;
  Staging st(be);
  LogprobsArgs d = a;
  d.logits = st.in(a.logits, rows * a.vocab);
  d.tokens = st.in(a.tokens, rows);
  d.mask = st.in(a.mask, rows);
  d.logprobs = st.out(a.logprobs, rows);
  d.entropy = st.out(a.entropy, rows);
  be.logprobs_forward(d);
  st.finish();
}

void logprobs_backward(Device device, const LogprobsBackwardArgs& a) {
  const Backend& be = backend_for(device);
  check_logprobs_inputs(be, a.batch, a.steps, a.vocab, a.logits, a.tokens, a.mask, a.temperature);
  check_output(a.grad_logits, "grad_logits");
  const int64_t rows = a.batch * a.steps;
  if (a.grad_logprobs) check_sequence_input(a.grad_logprobs, a.mask, a.batch, a.steps, "grad_logprobs");
  if (a.grad_entropy) check_sequence_input(a.grad_entropy, a.mask, a.batch, a.steps, "grad_entropy");
  Staging st(be);
  LogprobsBackwardArgs d = a;
  d.logits = st.in(a.logits, rows * a.vocab);
  d.tokens = st.in(a.tokens, rows);
  d.mask = st.in(a.mask, rows);
  d.grad_logprobs = st.in(a.grad_logprobs, rows);
  d.grad_entropy = st.in(a.grad_entropy, rows);
  d.grad_logits = st.out(a.grad_logits, rows * a.vocab);
  be.logprobs_backward(d);
  st.finish();
}

void kl_penalized_rewards(Device device, const KlRewardsArgs& a) {
  check_sequence_shape(a.batch, a.steps);
  const int64_t rows = a.batch * a.steps;
  validate::mask_values(a.mask, rows);
  check_sequence_input(a.logprobs, a.mask, a.batch, a.steps, "logprobs");
  check_sequence_input(a.ref_logprobs, a.mask, a.batch, a.steps, "ref_logprobs");
  validate::present(a.scores, "scores");
  validate::finite(a.scores, a.batch, "scores");
  validate::scalar_in_range(a.kl_coef, 0.0, 1e30, false, "kl_coef");
  int est = static_cast<int>(a.estimator);
  require(est >= 1 && est <= 3, ErrorCode::InvalidArgument,
          "estimator must be k1, k2 or k3, got " + std::to_string(est), "estimator");
  check_output(a.rewards, "rewards");
  const Backend& be = backend_for(device);
  Staging st(be);
  KlRewardsArgs d = a;
  d.logprobs = st.in(a.logprobs, rows);
  d.ref_logprobs = st.in(a.ref_logprobs, rows);
  d.scores = st.in(a.scores, a.batch);
  d.mask = st.in(a.mask, rows);
  d.rewards = st.out(a.rewards, rows);
  d.kl = st.out(a.kl, rows);
  be.kl_penalized_rewards(d);
  st.finish();
}

Moments batch_moments(Device device, const MomentsArgs& a) {
  validate::positive_size(a.count, "count");
  validate::present(a.values, "values");
  validate::finite(a.values, a.count, "values");
  const Backend& be = backend_for(device);
  Staging st(be);
  MomentsArgs d = a;
  d.values = st.in(a.values, a.count);
  return be.moments(d);
}

void normalize_scores(Device device, const NormalizeScoresArgs& a) {
  validate::positive_size(a.count, "count");
  validate::present(a.values, "values");
  validate::finite(a.values, a.count, "values");
  validate::scalar_in_range(a.mean, -1e300, 1e300, false, "mean");
  validate::scalar_in_range(a.std, 0.0, 1e300, false, "std");
  validate::scalar_in_range(a.eps, 0.0, 1.0, false, "eps");
  validate::scalar_in_range(a.clip, 0.0, 1e30, false, "clip");
  require(a.std + a.eps > 0, ErrorCode::InvalidArgument,
          "std + eps must be positive to divide by it", "eps");
  check_output(a.out, "out");
  const Backend& be = backend_for(device);
  Staging st(be);
  NormalizeScoresArgs d = a;
  d.values = st.in(a.values, a.count);
  d.out = st.out(a.out, a.count);
  be.normalize_scores(d);
  st.finish();
}

void gae(Device device, const GaeArgs& a) {
  check_sequence_shape(a.batch, a.steps);
  const int64_t rows = a.batch * a.steps;
  validate::mask_values(a.mask, rows);
  check_sequence_input(a.rewards, a.mask, a.batch, a.steps, "rewards");
  check_sequence_input(a.values, a.mask, a.batch, a.steps, "values");
  validate::scalar_in_range(a.gamma, 0.0, 1.0, false, "gamma");
  validate::scalar_in_range(a.lambda, 0.0, 1.0, false, "lambda");
  check_output(a.advantages, "advantages");
  check_output(a.returns, "returns");
  const Backend& be = backend_for(device);
  Staging st(be);
  GaeArgs d = a;
  d.rewards = st.in(a.rewards, rows);
  d.values = st.in(a.values, rows);
  d.mask = st.in(a.mask, rows);
  d.advantages = st.out(a.advantages, rows);
  d.returns = st.out(a.returns, rows);
  be.gae(d);
  st.finish();
}

void whiten(Device device, const WhitenArgs& a) {
  check_sequence_shape(a.batch, a.steps);
  const int64_t rows = a.batch * a.steps;
  validate::mask_values(a.mask, rows);
  check_sequence_input(a.values, a.mask, a.batch, a.steps, "values");
  validate::scalar_in_range(a.eps, 0.0, 1.0, false, "eps");
  validate::scalar_in_range(a.clip, 0.0, 1e30, false, "clip");
  check_output(a.out, "out");
  const Backend& be = backend_for(device);
  Staging st(be);
  WhitenArgs d = a;
  d.values = st.in(a.values, rows);
  d.mask = st.in(a.mask, rows);
  d.out = st.out(a.out, rows);
  be.whiten(d);
  st.finish();
}

void clip_masked(Device device, const ClipArgs& a) {
  check_sequence_shape(a.batch, a.steps);
  const int64_t rows = a.batch * a.steps;
  validate::mask_values(a.mask, rows);
  check_sequence_input(a.values, a.mask, a.batch, a.steps, "values");
  validate::scalar_in_range(a.clip, 0.0, 1e30, true, "clip");
  check_output(a.out, "out");
  const Backend& be = backend_for(device);
  Staging st(be);
  ClipArgs d = a;
  d.values = st.in(a.values, rows);
  d.mask = st.in(a.mask, rows);
  d.out = st.out(a.out, rows);
  be.clip_masked(d);
  st.finish();
}

PolicyLossResult policy_loss(Device device, const PolicyLossArgs& a) {
  check_sequence_shape(a.batch, a.steps);
  const int64_t rows = a.batch * a.steps;
  validate::mask_values(a.mask, rows);
  check_sequence_input(a.logprobs, a.mask, a.batch, a.steps, "logprobs");
  check_sequence_input(a.old_logprobs, a.mask, a.batch, a.steps, "old_logprobs");
  check_sequence_input(a.advantages, a.mask, a.batch, a.steps, "advantages");
  validate::scalar_in_range(a.clip_eps, 0.0, 1e30, true, "clip_eps");
  const Backend& be = backend_for(device);
  Staging st(be);
  PolicyLossArgs d = a;
  d.logprobs = st.in(a.logprobs, rows);
  d.old_logprobs = st.in(a.old_logprobs, rows);
  d.advantages = st.in(a.advantages, rows);
  d.mask = st.in(a.mask, rows);
  d.grad_logprobs = st.out(a.grad_logprobs, rows);
  PolicyLossResult r = be.policy_loss(d);
  st.finish();
  return r;
}

ValueLossResult value_loss(Device device, const ValueLossArgs& a) {
  check_sequence_shape(a.batch, a.steps);
  const int64_t rows = a.batch * a.steps;
  validate::mask_values(a.mask, rows);
  check_sequence_input(a.values, a.mask, a.batch, a.steps, "values");
  check_sequence_input(a.old_values, a.mask, a.batch, a.steps, "old_values");
  check_sequence_input(a.returns, a.mask, a.batch, a.steps, "returns");
  if (a.use_clip) validate::scalar_in_range(a.clip_eps, 0.0, 1e30, true, "clip_eps");
  const Backend& be = backend_for(device);
  Staging st(be);
  ValueLossArgs d = a;
  d.values = st.in(a.values, rows);
  d.old_values = st.in(a.old_values, rows);
  d.returns = st.in(a.returns, rows);
  d.mask = st.in(a.mask, rows);
  d.grad_values = st.out(a.grad_values, rows);
  ValueLossResult r = be.value_loss(d);
  st.finish();
  return r;
}

// ---- running moments -----------------------------------------------------------------

Moments merge_moments(const Moments& a, const Moments& b) {
  if (a.count <= 0) return b;
  if (b.count <= 0) return a;
  Moments m;
  m.count = a.count + b.count;
  const double delta = b.mean - a.mean;
  m.mean = a.mean + delta * (b.count / m.count);
  m.m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / m.count);
  return m;
}

double moments_std(const Moments& m) {
  if (m.count < 2) return 0.0;
  return std::sqrt(m.m2 / (m.count - 1.0));
}

}  // namespace ppo
