// The GPT-2 engine (model/gpt.h) against an independent float64 PyTorch implementation:
// test/fixtures/make_gpt2_fixture.py wrote a tiny random GPT-2 checkpoint in Hugging
// Face's format (test/fixtures/gpt2-tiny/config.json + model.safetensors, with a value
// head "score.weight") and expected.json, that model's outputs and gradients on a fixed
// right-padded batch (tokens [2, 7], lengths [7, 5]). Here the checkpoint goes through
// load_checkpoint (names, Conv1D transposes) into a Model, and we compare:
//   * forward: logits, logprobs, entropy, values at every position (0 where undefined),
//     the LM loss and its token count;
//   * backward of the LM loss (lm_loss_scale = 1), of sum(values * w) (grad_values = w),
//     and of sum(logprobs * wl) + sum(entropy * we) (grad_logprobs, grad_entropy), each
//     from the same retained forward, on named tensors whose expected gradients are in
//     Hugging Face's layout (transposed here for the hf_transposed ones);
//   * the LM loss over a target_mask subset, and its gradients;
//   * padding independence (out-of-vocabulary junk in the padding changes no bit);
//   * greedy generation: the first new token is the argmax of the reference logits at
//     each prompt's last position, and its log-prob the reference's.
//
// Tolerances (a float32 engine against a float64 reference; width 24, 2 layers, so the
// float32 error is a few ulps of O(1) quantities, ~1e-6):
//   logits, logprobs, entropy, values, losses: |got - want| <= 1e-5 + 1e-5 |want|
//   gradients: |got - want| <= 1e-4 |want| + 1e-5 max|want over that tensor| (the
//     second term covers near-zero entries of a tensor, whose relative error is
//     meaningless).
//
// Where the fixture is: $PPO_FIXTURE_DIR if set; else PPO_SOURCE_DIR (a compile
// definition: CMake passes ${CMAKE_SOURCE_DIR}) + "/test/fixtures/gpt2-tiny"; else the
// directory of this source file (__FILE__) + "/../fixtures/gpt2-tiny" (works when the
// compiler was given an absolute path, or a relative one and the binary runs from the
// repository root). A missing fixture is a failure, not a skip.
//
// Prints a "checksum" line: run with PPO_MAX_THREADS=1 and =3, it must be the same.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/json.h"
#include "core/thread_pool.h"
#include "model/checkpoint.h"
#include "model/gpt.h"
#include "fixture_util.h"
#include "test_framework.h"

namespace {

namespace json = ppo::json;
using ppo::model::BackwardRequest;
using ppo::model::ForwardRequest;
using ppo::model::ForwardResult;
using ppo::model::Model;
using ppo::model::ParamTensor;
using ppo::model::TokenBatch;

constexpr double kOutAbs = 5e-6, kOutRel = 5e-6;        // forward outputs and losses
constexpr double kGradRel = 5e-5, kGradAbsOfMax = 5e-6;  // gradients (see the header)

using fixture::doubles;
using fixture::floats;
using fixture::ints;


// Everything the tests share: the expected values, the loaded model, the batch.
struct Fixture {
  json::Value expected;
  ppo::model::LoadedCheckpoint checkpoint;
  int64_t batch = 0, steps = 0, vocab = 0;
  std::vector<int32_t> tokens, lengths;

  TokenBatch token_batch() const {
    TokenBatch tb;
    tb.batch = batch, tb.steps = steps, tb.tokens = tokens.data(), tb.lengths = lengths.data();
    return tb;
  }
  // A fresh model from the loaded parameters (the test's own copy).
  Model model() const { return Model(checkpoint.config, checkpoint.params); }
};

const Fixture& fixture() {
  static const Fixture f = [] {
    Fixture x;
    const std::string dir = fixture::dir("gpt2-tiny", "PPO_FIXTURE_DIR");
    x.expected = json::parse(fixture::read_text(dir + "/expected.json", "/usr/bin/python3 test/fixtures/make_gpt2_fixture.py"),
                             dir + "/expected.json");
    x.checkpoint = ppo::model::load_checkpoint(dir);
    x.batch = x.expected.at("batch").as_int64();
    x.steps = x.expected.at("steps").as_int64();
    x.vocab = x.expected.at("vocab").as_int64();
    x.tokens = ints(x.expected.at("tokens"));
    x.lengths = ints(x.expected.at("lengths"));
    return x;
  }();
  return f;
}

// Our name of a Hugging Face tensor name ("transformer." dropped).
std::string our_name(const std::string& hf) {
  const std::string prefix = "transformer.";
  return hf.compare(0, prefix.size(), prefix) == 0 ? hf.substr(prefix.size()) : hf;
}

// The expected gradient of one tensor in OUR layout: Hugging Face's Conv1D weights are
// [in, out] and ours [out, in].
std::vector<double> expected_in_our_layout(const ParamTensor& t, const json::Value& entry) {
  const std::vector<double> hf = doubles(entry.at("data"));
  std::vector<int64_t> hf_shape;
  for (const json::Value& d : entry.at("shape").values()) hf_shape.push_back(d.as_int64());
  if (!t.hf_transposed) {
    CHECK(hf_shape == t.shape);
    return hf;
  }
  CHECK(hf_shape.size() == 2 && t.shape.size() == 2);
  if (hf_shape.size() != 2 || t.shape.size() != 2) return hf;
  const int64_t in = hf_shape[0], out = hf_shape[1];
  CHECK(t.shape[0] == out && t.shape[1] == in);
  std::vector<double> ours(hf.size());
  for (int64_t i = 0; i < in; ++i)
    for (int64_t o = 0; o < out; ++o) ours[o * in + i] = hf[i * out + o];
  return ours;
}

// Compares the model's gradient buffer with every tensor of `grads` ({hf_name: {shape,
// data}}), times `scale` (for accumulation checks). Returns the number of tensors.
int check_grads(const Model& m, const json::Value& grads, const std::string& what,
                double scale = 1.0) {
  CHECK(m.grads() != nullptr);
  if (m.grads() == nullptr) return 0;
  int n = 0;
  for (size_t i = 0; i < grads.keys().size(); ++i) {
    const std::string& hf = grads.keys()[i];
    const ParamTensor* t = m.layout().find(our_name(hf));
    CHECK(t != nullptr);
    if (t == nullptr) continue;
    std::vector<double> want = expected_in_our_layout(*t, grads.values()[i]);
    CHECK(static_cast<int64_t>(want.size()) == t->numel);
    if (static_cast<int64_t>(want.size()) != t->numel) continue;
    double max_abs = 0.0;
    for (double& w : want) {
      w *= scale;
      max_abs = std::max(max_abs, std::fabs(w));
    }
    CHECK(max_abs > 0.0);  // the fixture is built so that every listed gradient is non-zero
    const std::string label = what + " d/d " + hf;
    CHECK_ALL_NEAR(m.grads() + t->offset, want.data(), t->numel, kGradAbsOfMax * max_abs,
                   kGradRel, label.c_str());
    ++n;
  }
  return n;
}

// True when every float of the tensor `name` in the gradient buffer is exactly 0.
bool grad_all_zero(const Model& m, const std::string& name) {
  const ParamTensor* t = m.layout().find(name);
  if (t == nullptr || m.grads() == nullptr) return false;
  for (int64_t i = 0; i < t->numel; ++i)
    if (m.grads()[t->offset + i] != 0.0f) return false;
  return true;
}

// Outputs of one forward pass, NaN-poisoned first so that an unwritten element fails.
struct Outputs {
  std::vector<float> logits, logprobs, entropy, values;
  ForwardResult result;
};

Outputs run_forward(Model& m, const TokenBatch& tb, bool retain, const float* target_mask = nullptr) {
  Outputs o;
  const float nan = std::nanf("");
  o.logits.assign(static_cast<size_t>(tb.batch * tb.steps * m.config().vocab_size), nan);
  o.logprobs.assign(static_cast<size_t>(tb.batch * tb.steps), nan);
  o.entropy.assign(o.logprobs.size(), nan);
  o.values.assign(o.logprobs.size(), nan);
  ForwardRequest req;
  req.logits = o.logits.data();
  req.logprobs = o.logprobs.data();
  req.entropy = o.entropy.data();
  req.values = o.values.data();
  req.target_mask = target_mask;
  req.lm_loss = true;
  req.retain = retain;
  o.result = m.forward(tb, req);
  return o;
}

uint64_t fnv1a(const void* data, size_t bytes, uint64_t h = 1469598103934665603ull) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

// ---- tests ------------------------------------------------------------------------------

TEST(checkpoint_loads_as_the_fixture_config) {
  const Fixture& f = fixture();
  const ppo::model::ModelConfig& c = f.checkpoint.config;
  CHECK(c.vocab_size == 61);
  CHECK(c.n_positions == 16);
  CHECK(c.n_embd == 24);
  CHECK(c.n_layer == 2);
  CHECK(c.n_head == 3);
  CHECK(c.value_head);
  CHECK_NEAR(c.layer_norm_epsilon, 1e-5, 0.0, 1e-12);
  CHECK(static_cast<int64_t>(f.checkpoint.params.size()) ==
        ppo::model::parameter_layout(c).total);
  CHECK(f.vocab == c.vocab_size);
  CHECK(f.batch == 2 && f.steps == 7);
  CHECK(static_cast<int64_t>(f.tokens.size()) == f.batch * f.steps);
}

TEST(forward_matches_reference) {
  const Fixture& f = fixture();
  Model m = f.model();
  const Outputs o = run_forward(m, f.token_batch(), false);
  const json::Value& e = f.expected;
  const std::vector<double> logits = doubles(e.at("logits"));
  CHECK(logits.size() == o.logits.size());
  if (logits.size() != o.logits.size()) return;
  CHECK_ALL_NEAR(o.logits.data(), logits.data(), static_cast<int64_t>(logits.size()), kOutAbs,
                 kOutRel, "logits");
  const std::vector<double> lp = doubles(e.at("logprobs")), ent = doubles(e.at("entropy")),
                            val = doubles(e.at("values"));
  const int64_t n = f.batch * f.steps;
  CHECK_ALL_NEAR(o.logprobs.data(), lp.data(), n, kOutAbs, kOutRel, "logprobs");
  CHECK_ALL_NEAR(o.entropy.data(), ent.data(), n, kOutAbs, kOutRel, "entropy");
  CHECK_ALL_NEAR(o.values.data(), val.data(), n, kOutAbs, kOutRel, "values");
  CHECK_NEAR(o.result.lm_loss, e.at("lm_loss").as_double(), kOutAbs, kOutRel);
  CHECK(o.result.lm_tokens == e.at("lm_tokens").as_int64());
}

TEST(lm_loss_gradients_match_reference) {
  const Fixture& f = fixture();
  Model m = f.model();
  run_forward(m, f.token_batch(), true);
  BackwardRequest br;
  br.lm_loss_scale = 1.0;
  m.backward(br);
  CHECK(check_grads(m, f.expected.at("lm_grads"), "lm_loss") ==
        static_cast<int>(f.expected.at("lm_grads").size()));
  // The LM loss never reaches the value head.
  CHECK(grad_all_zero(m, "score.weight"));
  // A second backward from the same retained forward adds the same gradients again.
  m.backward(br);
  check_grads(m, f.expected.at("lm_grads"), "lm_loss x2", 2.0);
  // lm_loss_scale scales them.
  m.zero_grad();
  br.lm_loss_scale = -0.5;
  m.backward(br);
  check_grads(m, f.expected.at("lm_grads"), "lm_loss x-0.5", -0.5);
}

TEST(value_gradients_match_reference) {
  const Fixture& f = fixture();
  Model m = f.model();
  run_forward(m, f.token_batch(), true);
  const std::vector<float> w = floats(f.expected.at("value_weights"));
  CHECK(static_cast<int64_t>(w.size()) == f.batch * f.steps);
  BackwardRequest br;
  br.grad_values = w.data();
  m.backward(br);
  CHECK(check_grads(m, f.expected.at("value_grads"), "sum(values*w)") ==
        static_cast<int>(f.expected.at("value_grads").size()));
}

TEST(policy_gradients_match_reference) {
  // d [sum(logprobs * wl) + sum(entropy * we)]: the PPO policy loss and entropy bonus
  // reach the model through these two upstream gradients.
  const Fixture& f = fixture();
  Model m = f.model();
  run_forward(m, f.token_batch(), true);
  const std::vector<float> wl = floats(f.expected.at("policy_logprob_weights"));
  const std::vector<float> we = floats(f.expected.at("policy_entropy_weights"));
  BackwardRequest br;
  br.grad_logprobs = wl.data();
  br.grad_entropy = we.data();
  m.backward(br);
  CHECK(check_grads(m, f.expected.at("policy_grads"), "policy") ==
        static_cast<int>(f.expected.at("policy_grads").size()));
  CHECK(grad_all_zero(m, "score.weight"));
}

TEST(masked_lm_loss_matches_reference) {
  const Fixture& f = fixture();
  const json::Value& e = f.expected.at("masked");
  const std::vector<float> mask = floats(e.at("target_mask"));
  Model m = f.model();
  const Outputs o = run_forward(m, f.token_batch(), true, mask.data());
  CHECK_NEAR(o.result.lm_loss, e.at("lm_loss").as_double(), kOutAbs, kOutRel);
  CHECK(o.result.lm_tokens == e.at("lm_tokens").as_int64());
  // logprobs and entropy at the target positions (elsewhere the header leaves them to
  // the engine: not compared).
  const std::vector<double> lp = doubles(e.at("logprobs")), ent = doubles(e.at("entropy"));
  for (size_t i = 0; i < mask.size(); ++i) {
    if (mask[i] == 0.0f) continue;
    CHECK_NEAR_CTX(o.logprobs[i], lp[i], kOutAbs, kOutRel, "masked logprobs[" + std::to_string(i) + "]");
    CHECK_NEAR_CTX(o.entropy[i], ent[i], kOutAbs, kOutRel, "masked entropy[" + std::to_string(i) + "]");
  }
  // Values do not depend on the target mask.
  const std::vector<double> val = doubles(f.expected.at("values"));
  CHECK_ALL_NEAR(o.values.data(), val.data(), f.batch * f.steps, kOutAbs, kOutRel, "masked values");
  BackwardRequest br;
  br.lm_loss_scale = 1.0;
  m.backward(br);
  CHECK(check_grads(m, e.at("grads"), "masked lm_loss") == static_cast<int>(e.at("grads").size()));
}

TEST(padding_content_changes_nothing) {
  const Fixture& f = fixture();
  Model m = f.model();
  const Outputs ref = run_forward(m, f.token_batch(), false);
  // Junk (out of the vocabulary, negative) in the padded positions of row 1.
  std::vector<int32_t> junk = f.tokens;
  int64_t padded = 0;
  for (int64_t b = 0; b < f.batch; ++b)
    for (int64_t t = f.lengths[b]; t < f.steps; ++t, ++padded)
      junk[b * f.steps + t] = (t % 2 == 0) ? 1000000 : -7;
  CHECK(padded > 0);
  TokenBatch tb = f.token_batch();
  tb.tokens = junk.data();
  const Outputs o = run_forward(m, tb, false);
  CHECK_BITWISE_EQUAL(o.logits.data(), ref.logits.data(), static_cast<int64_t>(ref.logits.size()),
                      "logits with junk padding");
  CHECK_BITWISE_EQUAL(o.logprobs.data(), ref.logprobs.data(), f.batch * f.steps, "logprobs");
  CHECK_BITWISE_EQUAL(o.entropy.data(), ref.entropy.data(), f.batch * f.steps, "entropy");
  CHECK_BITWISE_EQUAL(o.values.data(), ref.values.data(), f.batch * f.steps, "values");
  CHECK(tf::same_bits(o.result.lm_loss, ref.result.lm_loss));
}

TEST(greedy_generation_starts_with_the_reference_argmax) {
  // Prompts = the fixture's rows (lengths 7 and 5). The first greedy token of each row is
  // the argmax of the reference logits at the prompt's last position, and the returned
  // log-prob is the reference log_softmax there. Later tokens: their log-probs must equal
  // what forward() gives on the extended sequences (generate's own contract).
  const Fixture& f = fixture();
  const std::vector<double> logits = doubles(f.expected.at("logits"));
  const int64_t V = f.vocab, new_tokens = 4;
  Model m = f.model();
  ppo::model::GenerateOptions opt;
  opt.max_new_tokens = new_tokens;
  opt.greedy = true;
  const ppo::model::GenerateResult g = m.generate(f.token_batch(), opt);
  CHECK(g.batch == f.batch && g.max_new_tokens == new_tokens);
  CHECK(static_cast<int64_t>(g.tokens.size()) == f.batch * new_tokens);
  CHECK(static_cast<int64_t>(g.logprobs.size()) == f.batch * new_tokens);
  CHECK(static_cast<int64_t>(g.lengths.size()) == f.batch);
  if (static_cast<int64_t>(g.tokens.size()) != f.batch * new_tokens ||
      static_cast<int64_t>(g.logprobs.size()) != f.batch * new_tokens ||
      static_cast<int64_t>(g.lengths.size()) != f.batch)
    return;
  for (int64_t b = 0; b < f.batch; ++b) {
    CHECK(g.lengths[b] == new_tokens);  // no stop tokens were given
    const double* row = &logits[(b * f.steps + f.lengths[b] - 1) * V];
    int64_t best = 0;
    for (int64_t v = 1; v < V; ++v)
      if (row[v] > row[best]) best = v;
    double second = -1e300, mx = row[best], z = 0.0;
    for (int64_t v = 0; v < V; ++v) {
      if (v != best) second = std::max(second, row[v]);
      z += std::exp(row[v] - mx);
    }
    CHECK(row[best] - second > 1e-3);  // an unambiguous argmax (else the check means little)
    CHECK(g.tokens[b * new_tokens] == best);
    CHECK_NEAR_CTX(g.logprobs[b * new_tokens], -std::log(z), kOutAbs, kOutRel,
                   "first generated logprob, row " + std::to_string(b));
  }
  // The whole generated continuation against forward() on prompt + new tokens.
  const int64_t steps = f.steps + new_tokens;
  std::vector<int32_t> ext(static_cast<size_t>(f.batch * steps), 0), len(f.batch);
  for (int64_t b = 0; b < f.batch; ++b) {
    for (int64_t t = 0; t < f.lengths[b]; ++t) ext[b * steps + t] = f.tokens[b * f.steps + t];
    for (int64_t k = 0; k < new_tokens; ++k)
      ext[b * steps + f.lengths[b] + k] = g.tokens[b * new_tokens + k];
    len[b] = f.lengths[b] + static_cast<int32_t>(new_tokens);
  }
  TokenBatch tb;
  tb.batch = f.batch, tb.steps = steps, tb.tokens = ext.data(), tb.lengths = len.data();
  const Outputs o = run_forward(m, tb, false);
  for (int64_t b = 0; b < f.batch; ++b)
    for (int64_t k = 0; k < new_tokens; ++k) {
      const int64_t t = f.lengths[b] + k;
      CHECK_NEAR_CTX(g.logprobs[b * new_tokens + k], o.logprobs[b * steps + t], kOutAbs, kOutRel,
                     "generated logprob vs forward, row " + std::to_string(b) + " k " + std::to_string(k));
      // Greedy: each generated token is the argmax of forward's logits before it.
      const float* row = &o.logits[(b * steps + t - 1) * V];
      CHECK(g.tokens[b * new_tokens + k] ==
            static_cast<int32_t>(std::max_element(row, row + V) - row));
    }
}

TEST(checksum_across_thread_counts) {
  // Same bits whatever PPO_MAX_THREADS: compare this line between runs.
  const Fixture& f = fixture();
  Model m = f.model();
  const Outputs o = run_forward(m, f.token_batch(), true);
  BackwardRequest br;
  br.lm_loss_scale = 1.0;
  const std::vector<float> w = floats(f.expected.at("value_weights"));
  br.grad_values = w.data();
  m.backward(br);
  uint64_t h = fnv1a(o.logits.data(), o.logits.size() * sizeof(float));
  h = fnv1a(o.values.data(), o.values.size() * sizeof(float), h);
  h = fnv1a(m.grads(), static_cast<size_t>(m.layout().total) * sizeof(float), h);
  std::printf("  checksum %016llx (threads %d)\n", static_cast<unsigned long long>(h),
              ppo::cpu_thread_count());
  CHECK(m.grads() != nullptr);
}

}  // namespace

PPO_TEST_MAIN()
