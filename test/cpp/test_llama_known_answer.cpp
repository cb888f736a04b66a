// The Llama path of the engine (model/gpt.h with model_type "llama") against an
// independent float64 implementation of Hugging Face's LlamaForCausalLM:
// test/fixtures/make_llama_fixture.py wrote a tiny random Llama checkpoint
// (test/fixtures/llama-tiny/: config.json with grouped-query attention (4 query heads,
// 2 key/value heads), linear rope scaling 2 and an untied LM head; the weights sharded in
// two safetensors files behind model.safetensors.index.json, layer 1 stored in BF16 and
// lm_head in F16) and expected.json, that model's outputs, gradients and greedy
// continuations on a fixed right-padded batch (tokens [3, 9], lengths [9, 5, 7]). Here the
// checkpoint goes through load_checkpoint (names, shards, dtype conversion) into a Model:
//   * the config read from config.json;
//   * forward: logits, logprobs, entropy at every position (0 where undefined), the LM
//     loss and its token count;
//   * backward of the LM loss on the listed tensors (Hugging Face's names and layout are
//     ours for Llama: no transposes);
//   * greedy generation with the KV cache (rotary positions applied in the cache path,
//     ragged prompts in one batch): the reference's tokens and log-probs, and the same
//     log-probs as forward() on prompt + continuation;
//   * save and load back: the same parameters, bit for bit.
//
// Tolerances (a float32 engine against a float64 reference on exactly the stored
// weights; width 32, 2 layers: float32 error of O(1) quantities is a few 1e-7):
//   outputs and losses: |got - want| <= 5e-6 + 5e-6 |want|;
//   gradients: |got - want| <= 5e-5 |want| + 5e-6 max|want over the tensor|;
//   generation: the reference continuation has a top-2 margin >= 1e-3 at every step
//   (made so by the fixture), so the tokens must be equal.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/json.h"
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

constexpr double kOutAbs = 5e-6, kOutRel = 5e-6;
constexpr double kGradRel = 5e-5, kGradAbsOfMax = 5e-6;

using fixture::doubles;
using fixture::ints;


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
  Model model() const { return Model(checkpoint.config, checkpoint.params); }
};

const Fixture& fixture() {
  static const Fixture f = [] {
    Fixture x;
    const std::string dir = fixture::dir("llama-tiny", "PPO_LLAMA_FIXTURE_DIR");
    x.expected = json::parse(fixture::read_text(dir + "/expected.json", "python3 test/fixtures/make_llama_fixture.py"),
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

struct Outputs {
  std::vector<float> logits, logprobs, entropy;
  ForwardResult result;
};

Outputs run_forward(Model& m, const TokenBatch& tb, bool retain) {
  Outputs o;
  const int64_t n = tb.batch * tb.steps;
  o.logits.assign(static_cast<size_t>(n * m.config().vocab_size), NAN);
  o.logprobs.assign(static_cast<size_t>(n), NAN);
  o.entropy.assign(static_cast<size_t>(n), NAN);
  ForwardRequest r;
  r.logits = o.logits.data();
  r.logprobs = o.logprobs.data();
  r.entropy = o.entropy.data();
  r.lm_loss = true;
  r.retain = retain;
  o.result = m.forward(tb, r);
  return o;
}

TEST(checkpoint_loads_sharded_bf16_f16_as_the_fixture_config) {
  const Fixture& f = fixture();
  const ppo::model::ModelConfig& c = f.checkpoint.config;
  CHECK(c.is_llama());
  CHECK(c.vocab_size == 61 && c.n_embd == 32 && c.n_layer == 2 && c.n_head == 4);
  CHECK(c.kv_heads() == 2 && c.intermediate_size == 48 && c.head_size() == 8);
  CHECK(c.rope_scaling == 2.0 && c.rope_theta == 10000.0 && c.rms_norm_eps == 1e-5);
  CHECK(!c.tie_word_embeddings && c.untied_head());
  Model m = f.model();
  CHECK(m.layout().lm_head >= 0 && m.layout().wpe < 0);
  // The fused projections: q, k, v (and gate, up) one after another in the buffer.
  const ParamTensor* q = m.layout().find("model.layers.1.self_attn.q_proj.weight");
  const ParamTensor* k = m.layout().find("model.layers.1.self_attn.k_proj.weight");
  const ParamTensor* v = m.layout().find("model.layers.1.self_attn.v_proj.weight");
  CHECK(q && k && v);
  if (q && k && v) {
    CHECK(k->offset == q->offset + q->numel && v->offset == k->offset + k->numel);
    CHECK(q->shape == (std::vector<int64_t>{32, 32}) && k->shape == (std::vector<int64_t>{16, 32}));
  }
}

TEST(forward_matches_reference) {
  const Fixture& f = fixture();
  Model m = f.model();
  const Outputs o = run_forward(m, f.token_batch(), false);
  const std::vector<double> logits = doubles(f.expected.at("logits"));
  CHECK(logits.size() == o.logits.size());
  if (logits.size() != o.logits.size()) return;
  CHECK_ALL_NEAR(o.logits.data(), logits.data(), static_cast<int64_t>(logits.size()), kOutAbs, kOutRel, "logits");
  const std::vector<double> lp = doubles(f.expected.at("logprobs")), ent = doubles(f.expected.at("entropy"));
  CHECK_ALL_NEAR(o.logprobs.data(), lp.data(), f.batch * f.steps, kOutAbs, kOutRel, "logprobs");
  CHECK_ALL_NEAR(o.entropy.data(), ent.data(), f.batch * f.steps, kOutAbs, kOutRel, "entropy");
  CHECK_NEAR(o.result.lm_loss, f.expected.at("lm_loss").as_double(), kOutAbs, kOutRel);
  CHECK(o.result.lm_tokens == f.expected.at("lm_tokens").as_int64());
}

TEST(lm_loss_gradients_match_reference) {
  const Fixture& f = fixture();
  Model m = f.model();
  run_forward(m, f.token_batch(), true);
  BackwardRequest br;
  br.lm_loss_scale = 1.0;
  m.backward(br);
  const json::Value& grads = f.expected.at("lm_grads");
  CHECK(m.grads() != nullptr);
  if (m.grads() == nullptr) return;
  int checked = 0;
  for (size_t i = 0; i < grads.keys().size(); ++i) {
    const std::string& name = grads.keys()[i];
    const ParamTensor* t = m.layout().find(name);
    CHECK(t != nullptr);
    if (t == nullptr) continue;
    const std::vector<double> want = doubles(grads.values()[i].at("data"));
    CHECK(static_cast<int64_t>(want.size()) == t->numel);
    if (static_cast<int64_t>(want.size()) != t->numel) continue;
    double max_abs = 0.0;
    for (double w : want) max_abs = std::max(max_abs, std::fabs(w));
    CHECK(max_abs > 0.0);
    CHECK_ALL_NEAR(m.grads() + t->offset, want.data(), t->numel, kGradAbsOfMax * max_abs, kGradRel,
                   ("d lm_loss / d " + name).c_str());
    ++checked;
  }
  CHECK(checked == static_cast<int>(grads.size()));
}

TEST(kv_cache_generation_matches_reference_and_forward) {
  // Ragged prompts in one batch: the rotary positions of each row start at 0 and the
  // cache path must rotate each new key at its own row's position.
  const Fixture& f = fixture();
  const json::Value& g = f.expected.at("generation");
  const int64_t new_tokens = g.at("max_new_tokens").as_int64();
  const std::vector<int32_t> plen = ints(g.at("prompt_lengths"));
  const int64_t B = static_cast<int64_t>(plen.size());
  const int64_t T = *std::max_element(plen.begin(), plen.end());
  std::vector<int32_t> prompts(static_cast<size_t>(B * T), 0);
  for (int64_t b = 0; b < B; ++b) {
    const std::vector<int32_t> row = ints(g.at("prompts")[static_cast<size_t>(b)]);
    CHECK(static_cast<int64_t>(row.size()) == plen[b]);
    std::copy(row.begin(), row.end(), prompts.begin() + b * T);
  }
  Model m = f.model();
  ppo::model::GenerateOptions opt;
  opt.max_new_tokens = new_tokens;
  opt.greedy = true;
  TokenBatch tb;
  tb.batch = B, tb.steps = T, tb.tokens = prompts.data(), tb.lengths = plen.data();
  const ppo::model::GenerateResult out = m.generate(tb, opt);
  for (int64_t b = 0; b < B; ++b) {
    const std::vector<int32_t> want = ints(g.at("new_tokens")[static_cast<size_t>(b)]);
    const std::vector<double> want_lp = doubles(g.at("logprobs")[static_cast<size_t>(b)]);
    for (int64_t k = 0; k < new_tokens; ++k) {
      CHECK(out.tokens[b * new_tokens + k] == want[k]);
      CHECK_NEAR_CTX(out.logprobs[b * new_tokens + k], want_lp[k], kOutAbs, kOutRel,
                     "generated logprob, row " + std::to_string(b) + " k " + std::to_string(k));
    }
  }
  // The cache path equals the full forward on prompt + continuation.
  const int64_t steps = T + new_tokens;
  std::vector<int32_t> ext(static_cast<size_t>(B * steps), 0), len(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    std::copy(prompts.begin() + b * T, prompts.begin() + b * T + plen[b], ext.begin() + b * steps);
    for (int64_t k = 0; k < new_tokens; ++k) ext[b * steps + plen[b] + k] = out.tokens[b * new_tokens + k];
    len[b] = plen[b] + static_cast<int32_t>(new_tokens);
  }
  TokenBatch full;
  full.batch = B, full.steps = steps, full.tokens = ext.data(), full.lengths = len.data();
  const Outputs o = run_forward(m, full, false);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < new_tokens; ++k)
      CHECK_NEAR_CTX(out.logprobs[b * new_tokens + k], o.logprobs[b * steps + plen[b] + k], 2e-6, 2e-6,
                     "cache vs full forward, row " + std::to_string(b) + " k " + std::to_string(k));
}

TEST(save_and_load_round_trip) {
  const Fixture& f = fixture();
  Model m = f.model();
  const std::string dir = "/tmp/ppo_llama_round_trip_" + std::to_string(std::rand());
  ppo::model::save_checkpoint(dir, m.config(), m.params());
  const ppo::model::LoadedCheckpoint back = ppo::model::load_checkpoint(dir);
  CHECK(back.config.is_llama() && back.config.kv_heads() == 2 && back.config.rope_scaling == 2.0);
  CHECK(back.params.size() == f.checkpoint.params.size());
  if (back.params.size() == f.checkpoint.params.size())
    CHECK_BITWISE_EQUAL(back.params.data(), f.checkpoint.params.data(),
                        static_cast<int64_t>(back.params.size()), "params after save + load");
  std::system(("rm -rf '" + dir + "'").c_str());
}

}  // namespace

PPO_TEST_MAIN()
