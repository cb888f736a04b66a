// The GPT-2 engine as a whole (csrc/model/gpt.h) against an independent float64
// reference written here from the architecture: forward outputs, the gradient of every
// parameter by central finite differences of the reference (through the LM head, the
// value head, entropy and the padding), the KV cache against the full forward,
// determinism, accumulation, a loss driven to zero, and the errors.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "model/gpt.h"
#include "test_framework.h"
#include "test_util.h"
#include "gpt_reference.h"

using ppo::ErrorCode;
using namespace ppo::model;
using gpt_ref::Ref;
using gpt_ref::params_double;
using gpt_ref::perturb;
using gpt_ref::tiny_config;
using gpt_ref::RefOutputs;
using gpt_ref::ref_forward;

namespace {

// A fixed batch with right padding; padded positions hold `pad` (garbage on purpose).
struct Batch {
  int64_t B = 3, T = 7;
  std::vector<int32_t> tokens, lengths{7, 4, 1};
  TokenBatch view() const { return {B, T, tokens.data(), lengths.data()}; }
};
Batch make_batch(tu::Rng& rng, int64_t vocab, int32_t pad) {
  Batch b;
  b.tokens = tu::tokens(rng, b.B * b.T, vocab);
  for (int64_t i = 0; i < b.B; ++i)
    for (int64_t t = b.lengths[i]; t < b.T; ++t) b.tokens[i * b.T + t] = pad;
  return b;
}

// One retained forward of the LM loss and its backward (scale 1): the SFT gradient.
ForwardResult lm_loss_backward(Model& m, const Batch& batch) {
  ForwardRequest req;
  req.lm_loss = true;
  req.retain = true;
  const ForwardResult r = m.forward(batch.view(), req);
  BackwardRequest back;
  back.lm_loss_scale = 1.0;
  m.backward(back);
  return r;
}

}  // namespace

TEST(forward_matches_float64_reference) {
  Model model(tiny_config(), 1);
  perturb(model, 2);
  tu::Rng rng(3);
  const Batch batch = make_batch(rng, 23, 0);
  const int64_t N = batch.B * batch.T, V = 23;
  std::vector<float> logits = tu::poisoned(N * V), lp = tu::poisoned(N), ent = tu::poisoned(N),
                     val = tu::poisoned(N);
  ForwardRequest req;
  req.logits = logits.data();
  req.logprobs = lp.data();
  req.entropy = ent.data();
  req.values = val.data();
  req.lm_loss = true;
  const ForwardResult r = model.forward(batch.view(), req);

  const std::vector<double> p = params_double(model);
  const ModelConfig cfg = tiny_config();
  const Ref ref{cfg, model.layout(), p};
  const RefOutputs want = ref_forward(ref, batch.B, batch.T, batch.tokens, batch.lengths, nullptr);
  // float32 engine vs float64 reference: sums of ~50 products of O(1) values.
  CHECK_ALL_NEAR(logits.data(), want.logits.data(), N * V, 2e-5, 1e-4, "logits");
  CHECK_ALL_NEAR(lp.data(), want.logprobs.data(), N, 2e-5, 1e-4, "logprobs");
  CHECK_ALL_NEAR(ent.data(), want.entropy.data(), N, 2e-5, 1e-4, "entropy");
  CHECK_ALL_NEAR(val.data(), want.values.data(), N, 2e-5, 1e-4, "values");
  CHECK_NEAR(r.lm_loss, want.lm_loss, 2e-5, 1e-5);
  CHECK(r.lm_tokens == want.lm_tokens);
  CHECK(r.lm_tokens == 6 + 3 + 0);
}

// The whole model's gradient, every parameter, against central differences of the
// float64 reference of   loss = a * lm_loss + sum gl*logprobs + sum ge*entropy + sum gv*values
// over a padded batch with a target mask.
TEST(gradient_of_every_parameter_matches_finite_differences) {
  Model model(tiny_config(), 4);
  perturb(model, 5);
  tu::Rng rng(6);
  const Batch batch = make_batch(rng, 23, 0);
  const int64_t N = batch.B * batch.T;
  std::vector<float> mask(N, 1.0f);
  mask[0 * 7 + 3] = 0.0f;  // a hole in the targets of row 0
  const std::vector<float> gl = tu::normal(rng, N), ge = tu::normal(rng, N), gv = tu::normal(rng, N);
  const double a = 0.7;

  std::vector<float> lp(N), ent(N), val(N);
  ForwardRequest req;
  req.logprobs = lp.data();
  req.entropy = ent.data();
  req.values = val.data();
  req.lm_loss = true;
  req.target_mask = mask.data();
  req.retain = true;
  model.forward(batch.view(), req);
  BackwardRequest back;
  back.grad_logprobs = gl.data();
  back.grad_entropy = ge.data();
  back.grad_values = gv.data();
  back.lm_loss_scale = a;
  model.backward(back);

  std::vector<double> p = params_double(model);
  const ModelConfig cfg = tiny_config();
  auto loss = [&](const std::vector<double>& params) {
    const Ref ref{cfg, model.layout(), params};
    const RefOutputs o = ref_forward(ref, batch.B, batch.T, batch.tokens, batch.lengths, &mask);
    double s = a * o.lm_loss;
    for (int64_t i = 0; i < N; ++i) s += gl[i] * o.logprobs[i] + ge[i] * o.entropy[i] + gv[i] * o.values[i];
    return s;
  };
  const float* g = model.grads();
  CHECK(g != nullptr);
  const double h = 1e-5;
  int64_t checked = 0;
  for (const ParamTensor& t : model.layout().tensors) {
    for (int64_t i = 0; i < t.numel; ++i) {
      const int64_t k = t.offset + i;
      const double keep = p[k];
      p[k] = keep + h;
      const double up = loss(p);
      p[k] = keep - h;
      const double down = loss(p);
      p[k] = keep;
      const double fd = (up - down) / (2 * h);
      // float32 backward vs float64 differences (truncation ~1e-10): the float32 error of
      // gradients built from sums of O(100) terms.
      CHECK_NEAR_CTX(g[k], fd, 2e-4, 2e-3, t.name + "[" + std::to_string(i) + "]");
      ++checked;
    }
  }
  CHECK(checked == model.parameter_count());
}

TEST(padding_never_changes_any_result) {
  ModelConfig cfg = tiny_config();
  tu::Rng rng(7);
  Batch clean = make_batch(rng, 23, 0);
  Batch dirty = clean;
  for (int64_t i = 0; i < dirty.B; ++i)
    for (int64_t t = dirty.lengths[i]; t < dirty.T; ++t) dirty.tokens[i * dirty.T + t] = (t % 2) ? -77 : 1 << 30;
  const int64_t N = clean.B * clean.T;
  std::vector<std::vector<float>> outs;
  std::vector<std::vector<float>> grads;
  for (const Batch* b : {&clean, &dirty}) {
    Model m(cfg, 8);
    perturb(m, 9);
    std::vector<float> logits(N * 23), lp(N), val(N);
    ForwardRequest req;
    req.logits = logits.data();
    req.logprobs = lp.data();
    req.values = val.data();
    req.lm_loss = true;
    req.retain = true;
    m.forward(b->view(), req);
    std::vector<float> gv(N, 0.5f);  // nonzero even at padding: must be ignored there
    BackwardRequest back;
    back.grad_values = gv.data();
    back.grad_logprobs = gv.data();
    back.lm_loss_scale = 1.0;
    m.backward(back);
    logits.insert(logits.end(), lp.begin(), lp.end());
    logits.insert(logits.end(), val.begin(), val.end());
    outs.push_back(logits);
    grads.emplace_back(m.grads(), m.grads() + m.parameter_count());
  }
  CHECK_BITWISE_EQUAL(outs[0].data(), outs[1].data(), static_cast<int64_t>(outs[0].size()), "outputs");
  CHECK_BITWISE_EQUAL(grads[0].data(), grads[1].data(), static_cast<int64_t>(grads[0].size()), "grads");
}

TEST(target_mask_selects_positions_and_matches_full_run) {
  Model model(tiny_config(), 10);
  tu::Rng rng(11);
  const Batch batch = make_batch(rng, 23, 0);
  const int64_t N = batch.B * batch.T;
  std::vector<float> all(N), some = tu::poisoned(N), mask(N, 0.0f);
  for (int64_t t = 4; t < 7; ++t) mask[t] = 1.0f;  // row 0, positions 4..6
  ForwardRequest req;
  req.logprobs = all.data();
  model.forward(batch.view(), req);
  req.logprobs = some.data();
  req.target_mask = mask.data();
  req.lm_loss = true;
  const ForwardResult r = model.forward(batch.view(), req);
  CHECK(r.lm_tokens == 3);
  for (int64_t i = 0; i < N; ++i) {
    if (mask[i] == 1.0f) CHECK(some[i] == all[i]);
    else CHECK(some[i] == 0.0f);
  }
  CHECK_NEAR(r.lm_loss, -(all[4] + all[5] + all[6]) / 3.0, 1e-6, 1e-6);
}

TEST(kv_cache_generation_equals_full_forward) {
  ModelConfig cfg = tiny_config(false);
  cfg.n_positions = 16;
  Model model(cfg, 12);
  perturb(model, 13);
  const int64_t B = 3, T = 5, new_tokens = 8;
  std::vector<int32_t> prompts = {1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 9, 9, 9, 9, 0};
  std::vector<int32_t> lengths = {5, 2, 4};
  GenerateOptions opt;
  opt.max_new_tokens = new_tokens;
  opt.temperature = 1.3;
  opt.seed = 99;
  const GenerateResult g = model.generate({B, T, prompts.data(), lengths.data()}, opt);
  CHECK(g.batch == B);
  for (int64_t b = 0; b < B; ++b) {
    CHECK(g.lengths[b] == new_tokens);
    CHECK(g.stopped[b] == 0);
    // The full sequence through a plain forward pass gives the same log-probs.
    const int64_t n = lengths[b] + new_tokens;
    std::vector<int32_t> seq(prompts.begin() + b * T, prompts.begin() + b * T + lengths[b]);
    for (int64_t s = 0; s < new_tokens; ++s) seq.push_back(g.tokens[b * new_tokens + s]);
    std::vector<float> lp(n), logits(n * cfg.vocab_size);
    ForwardRequest req;
    req.logprobs = lp.data();
    req.logits = logits.data();
    model.forward({1, n, seq.data(), nullptr}, req);
    for (int64_t s = 0; s < new_tokens; ++s)
      CHECK_NEAR_CTX(g.logprobs[b * new_tokens + s], lp[lengths[b] + s], 2e-5, 1e-5,
                     "row " + std::to_string(b) + " step " + std::to_string(s));
  }
  // Greedy decoding picks the full forward's argmax at every step.
  opt.greedy = true;
  const GenerateResult gg = model.generate({B, T, prompts.data(), lengths.data()}, opt);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int32_t> seq(prompts.begin() + b * T, prompts.begin() + b * T + lengths[b]);
    for (int64_t s = 0; s < new_tokens; ++s) {
      const int64_t n = static_cast<int64_t>(seq.size());
      std::vector<float> logits(n * cfg.vocab_size);
      ForwardRequest req;
      req.logits = logits.data();
      model.forward({1, n, seq.data(), nullptr}, req);
      const float* row = logits.data() + (n - 1) * cfg.vocab_size;
      int32_t best = 0;
      for (int32_t v = 1; v < cfg.vocab_size; ++v)
        if (row[v] > row[best]) best = v;
      CHECK(gg.tokens[b * new_tokens + s] == best);
      seq.push_back(gg.tokens[b * new_tokens + s]);
    }
  }
}

TEST(generation_stops_and_is_deterministic_with_a_seed) {
  ModelConfig cfg = tiny_config(false);
  cfg.n_positions = 40;
  Model model(cfg, 14);
  perturb(model, 15);
  std::vector<int32_t> prompts = {3, 4, 5, 6};
  std::vector<int32_t> lengths = {2, 2};
  GenerateOptions opt;
  opt.max_new_tokens = 30;
  opt.seed = 5;
  opt.top_k = 10;
  opt.top_p = 0.9;
  opt.repetition_penalty = 1.2;
  int64_t progress_calls = 0;
  opt.progress = [&](int64_t, int64_t total) {
    ++progress_calls;
    CHECK(total == 30);
  };
  const GenerateResult a = model.generate({2, 2, prompts.data(), lengths.data()}, opt);
  CHECK(progress_calls >= 1);
  opt.progress = nullptr;
  const GenerateResult b = model.generate({2, 2, prompts.data(), lengths.data()}, opt);
  CHECK(a.tokens == b.tokens);
  CHECK(a.logprobs == b.logprobs);
  opt.seed = 6;
  const GenerateResult c = model.generate({2, 2, prompts.data(), lengths.data()}, opt);
  CHECK(a.tokens != c.tokens);
  // Stop at the first token that row 0 produced: row 0 stops after one token.
  opt.seed = 5;
  opt.stop_tokens = {a.tokens[0]};
  const GenerateResult d = model.generate({2, 2, prompts.data(), lengths.data()}, opt);
  CHECK(d.lengths[0] == 1);
  CHECK(d.stopped[0] == 1);
  CHECK(d.tokens[0] == a.tokens[0]);
  for (int64_t s = 1; s < 30; ++s) CHECK(d.tokens[s] == -1);
  CHECK(d.lengths[1] >= 1);
}

TEST(same_seed_same_model_and_training_is_bit_reproducible) {
  std::vector<std::vector<float>> runs;
  for (int rep = 0; rep < 2; ++rep) {
    Model m(tiny_config(), 21);
    tu::Rng rng(22);
    const Batch batch = make_batch(rng, 23, 0);
    for (int s = 0; s < 3; ++s) {
      lm_loss_backward(m, batch);
      AdamWOptions o;
      o.lr = 1e-2;
      o.weight_decay = 0.1;
      o.max_grad_norm = 0.5;
      m.step(o);
      m.zero_grad();
    }
    runs.emplace_back(m.params(), m.params() + m.parameter_count());
  }
  CHECK_BITWISE_EQUAL(runs[0].data(), runs[1].data(), static_cast<int64_t>(runs[0].size()), "params");
  Model other(tiny_config(), 23);
  Model same(tiny_config(), 21);
  CHECK(std::memcmp(other.params(), same.params(), sizeof(float) * 10) != 0);
}

// snapshot_state/restore_state: an undo point of parameters, AdamW moments and step count.
TEST(snapshot_state_restores_parameters_and_optimizer_exactly) {
  Model m(tiny_config(), 25);
  CHECK_THROWS_CODE(m.restore_state(), ppo::ErrorCode::InvalidArgument, "snapshot");
  tu::Rng rng(26);
  const Batch batch = make_batch(rng, 23, 0);
  AdamWOptions o;
  o.lr = 1e-2;
  const int64_t n = m.parameter_count();
  // Before any step (no moments yet): restoring drops the moments a later step made.
  m.snapshot_state();
  const std::vector<float> p0(m.params(), m.params() + n);
  lm_loss_backward(m, batch);
  m.step(o);
  m.zero_grad();
  m.restore_state();
  CHECK_BITWISE_EQUAL(m.params(), p0.data(), n, "params after restore (no moments)");
  CHECK(m.optimizer_m() == nullptr && m.optimizer_steps() == 0);
  // After a step: parameters, both moments and the step count come back.
  lm_loss_backward(m, batch);
  m.step(o);
  m.zero_grad();
  m.snapshot_state();
  const std::vector<float> p1(m.params(), m.params() + n), m1(m.optimizer_m(), m.optimizer_m() + n),
      v1(m.optimizer_v(), m.optimizer_v() + n);
  for (int s = 0; s < 2; ++s) {
    lm_loss_backward(m, batch);
    m.step(o);
    m.zero_grad();
  }
  CHECK(m.optimizer_steps() == 3);
  m.restore_state();
  CHECK(m.optimizer_steps() == 1);
  CHECK_BITWISE_EQUAL(m.params(), p1.data(), n, "params after restore");
  CHECK_BITWISE_EQUAL(m.optimizer_m(), m1.data(), n, "adam m after restore");
  CHECK_BITWISE_EQUAL(m.optimizer_v(), v1.data(), n, "adam v after restore");
  // Parameters written on the host before the snapshot are part of it.
  m.mutable_params()[3] = 0.5f;
  m.snapshot_state();
  m.mutable_params()[3] = -0.5f;
  m.restore_state();
  CHECK(m.params()[3] == 0.5f);
}

TEST(gradients_accumulate_across_backward_calls) {
  Model m(tiny_config(), 31);
  tu::Rng rng(32);
  const Batch batch = make_batch(rng, 23, 0);
  lm_loss_backward(m, batch);
  std::vector<float> once(m.grads(), m.grads() + m.parameter_count());
  BackwardRequest back;
  back.lm_loss_scale = 1.0;
  m.backward(back);
  for (int64_t i = 0; i < m.parameter_count(); ++i) CHECK_NEAR(m.grads()[i], 2.0 * once[i], 1e-7, 1e-6);
  CHECK_NEAR(m.grad_norm(), 2.0 * std::sqrt([&] {
               double s = 0;
               for (float v : once) s += static_cast<double>(v) * v;
               return s;
             }()), 1e-9, 1e-5);
  m.zero_grad();
  CHECK(m.grad_norm() == 0.0);
}

TEST(a_tiny_model_drives_the_loss_of_a_fixed_batch_towards_zero) {
  ModelConfig cfg = tiny_config(false);
  cfg.n_embd = 24;
  Model m(cfg, 41);
  tu::Rng rng(42);
  const Batch batch = make_batch(rng, 23, 0);
  double first = 0, last = 0;
  for (int s = 0; s < 150; ++s) {
    const ForwardResult r = lm_loss_backward(m, batch);
    if (s == 0) first = r.lm_loss;
    last = r.lm_loss;
    AdamWOptions o;
    o.lr = 1e-2;
    m.step(o);
    m.zero_grad();
  }
  std::printf("    lm loss %.4f -> %.4f in 150 AdamW steps\n", first, last);
  CHECK(first > 2.5);  // ~log(23) at init
  CHECK(last < 0.05);
}

TEST(adamw_step_matches_reference_and_clips) {
  Model m(tiny_config(), 51);
  tu::Rng rng(52);
  const Batch batch = make_batch(rng, 23, 0);
  lm_loss_backward(m, batch);
  const std::vector<double> p0 = params_double(m);
  const std::vector<double> g0(m.grads(), m.grads() + m.parameter_count());
  double norm = 0;
  for (double v : g0) norm += v * v;
  norm = std::sqrt(norm);
  AdamWOptions o;
  o.lr = 0.01;
  o.beta1 = 0.8;
  o.beta2 = 0.9;
  o.eps = 1e-6;
  o.weight_decay = 0.5;
  o.max_grad_norm = norm / 2;
  const StepResult r = m.step(o);
  CHECK(r.clipped);
  CHECK(r.step == 1);
  CHECK_NEAR(r.grad_norm, norm, 1e-9, 1e-6);
  // Step 1 of AdamW: m_hat = g, v_hat = g^2, so p1 = p0 (1 - lr wd) - lr g / (|g| + eps).
  const double scale = (norm / 2) / (norm + 1e-6);
  for (const ParamTensor& t : m.layout().tensors) {
    const double wd = (t.kind == ParamKind::Matrix || t.kind == ParamKind::Head) ? 0.5 : 0.0;
    for (int64_t i = 0; i < t.numel; ++i) {
      const int64_t k = t.offset + i;
      const double g = g0[k] * scale;
      const double want = p0[k] * (1 - 0.01 * wd) - 0.01 * g / (std::fabs(g) + 1e-6);
      CHECK_NEAR_CTX(m.params()[k], want, 1e-6, 1e-5, t.name);
    }
  }
}

TEST(a_frozen_model_never_allocates_gradients_and_refuses_training) {
  ModelOptions frozen;
  frozen.trainable = false;
  Model m(tiny_config(), 61, frozen);
  tu::Rng rng(62);
  const Batch batch = make_batch(rng, 23, 0);
  std::vector<float> lp(batch.B * batch.T);
  ForwardRequest req;
  req.logprobs = lp.data();
  m.forward(batch.view(), req);
  CHECK(m.memory().grads == 0);
  CHECK(m.memory().optimizer == 0);
  req.retain = true;
  CHECK_THROWS_CODE(m.forward(batch.view(), req), ErrorCode::InvalidArgument, "trainable");
  CHECK_THROWS_CODE(m.backward({}), ErrorCode::InvalidArgument, "trainable");
  CHECK_THROWS_CODE(m.step({}), ErrorCode::InvalidArgument, "trainable");
  CHECK(m.grads() == nullptr);
}

TEST(bad_input_is_refused_with_a_code_and_the_argument) {
  Model m(tiny_config(false), 71);
  std::vector<int32_t> tokens = {1, 2, 3, 4};
  std::vector<int32_t> lengths = {2, 0};
  std::vector<float> out(4);
  ForwardRequest req;
  req.logprobs = out.data();
  CHECK_THROWS_CODE(m.forward({2, 2, tokens.data(), lengths.data()}, req), ErrorCode::OutOfRange, "lengths");
  lengths = {2, 3};
  CHECK_THROWS_CODE(m.forward({2, 2, tokens.data(), lengths.data()}, req), ErrorCode::OutOfRange, "lengths");
  tokens[3] = 23;
  CHECK_THROWS_CODE(m.forward({2, 2, tokens.data(), nullptr}, req), ErrorCode::OutOfRange, "tokens");
  tokens[3] = -1;
  CHECK_THROWS_CODE(m.forward({2, 2, tokens.data(), nullptr}, req), ErrorCode::OutOfRange, "tokens");
  tokens[3] = 4;
  std::vector<int32_t> long_tokens(13, 1);
  std::vector<float> long_out(13);
  req.logprobs = long_out.data();
  CHECK_THROWS_CODE(m.forward({1, 13, long_tokens.data(), nullptr}, req), ErrorCode::OutOfRange, "steps");
  req.logprobs = out.data();
  CHECK_THROWS_CODE(m.forward({0, 2, tokens.data(), nullptr}, req), ErrorCode::InvalidArgument, "batch");
  CHECK_THROWS_CODE(m.forward({2, 2, nullptr, nullptr}, req), ErrorCode::InvalidArgument, "tokens");
  req.values = out.data();
  CHECK_THROWS_CODE(m.forward({2, 2, tokens.data(), nullptr}, req), ErrorCode::InvalidArgument, "values");
  req.values = nullptr;
  std::vector<float> mask = {1, 1, 1, 0.5f};
  req.target_mask = mask.data();
  CHECK_THROWS_CODE(m.forward({2, 2, tokens.data(), nullptr}, req), ErrorCode::OutOfRange, "target_mask");
  req.target_mask = nullptr;
  // backward without a retained forward, or for an output the forward did not compute
  CHECK_THROWS_CODE(m.backward({}), ErrorCode::InvalidArgument, "retain");
  req.retain = true;
  m.forward({2, 2, tokens.data(), nullptr}, req);
  BackwardRequest back;
  back.grad_values = out.data();
  CHECK_THROWS_CODE(m.backward(back), ErrorCode::InvalidArgument, "grad_values");
  std::vector<float> nan_grad = {0, tu::kNaN, 0, 0};
  back = {};
  back.grad_logprobs = nan_grad.data();
  CHECK_THROWS_CODE(m.backward(back), ErrorCode::NonFinite, "grad_logprobs");
  // the step's options
  AdamWOptions o;
  o.lr = -1;
  CHECK_THROWS_CODE(m.step(o), ErrorCode::InvalidArgument, "lr");
  o.lr = 1e-3;
  o.beta2 = 1.0;
  CHECK_THROWS_CODE(m.step(o), ErrorCode::InvalidArgument, "beta2");
  // generation limits
  GenerateOptions g;
  g.max_new_tokens = 11;
  CHECK_THROWS_CODE(m.generate({2, 2, tokens.data(), nullptr}, g), ErrorCode::OutOfRange, "max_new_tokens");
  g.max_new_tokens = 2;
  g.top_p = 0;
  CHECK_THROWS_CODE(m.generate({2, 2, tokens.data(), nullptr}, g), ErrorCode::InvalidArgument, "top_p");
  g.top_p = 1;
  g.stop_tokens = {99};
  CHECK_THROWS_CODE(m.generate({2, 2, tokens.data(), nullptr}, g), ErrorCode::OutOfRange, "stop_tokens");
  // an invalid config
  ModelConfig bad = tiny_config();
  bad.n_head = 5;
  CHECK_THROWS_CODE(Model(bad, 1), ErrorCode::InvalidArgument, "n_head");
  ModelOptions cuda;
  cuda.device = ppo::Device::Cuda;
  CHECK_THROWS_CODE(Model(tiny_config(), 1, cuda), ErrorCode::CudaUnavailable, "device");
}

PPO_TEST_MAIN()
