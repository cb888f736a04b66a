// Benchmark of the GPT-2 engine (model/gpt.h) on the CPU (default) or, with --device cuda,
// on the GPU; the same measurements as the PyTorch yardstick bench/model_torch.py:
//   * one training step: forward (LM loss over every position that has a next token,
//     activations retained), backward (lm_loss_scale 1), AdamW step (lr 1e-4, no weight
//     decay), zero_grad;
//   * greedy generation with Model::generate: a 16-token prompt, 64 new tokens;
//   * ppo::cpu::matmul alone on the products the engine makes (forward, dX, dW of each
//     dense layer and of the tied LM head, in the engine's layouts, plus the decoding
//     step's forward products), listed with op/m/n/k so that bench/engine_compare.py
//     can time OpenBLAS on exactly the same calls.
// Configs: small (6 layers, width 384, 6 heads, vocab 8192, context 256; train 8 x 128,
// generation batch 8) and gpt2 (124M: 12/768/12, vocab 50257, context 1024; train 4 x 64,
// generation batch 4). Medians of --runs runs after one warm-up (plus the best run: on a
// shared machine the steadier figure).
// The Llama family: llama-100m (12 x 768, 12 query heads over 4 key/value heads, SwiGLU
// width 2048, vocab 32000, tied head: 100.1M parameters; train 4 x 64 like gpt2) and
// llama-100m-512 (train 8 x 512), run by name (--config llama-100m), not by `all`.
// Two more configs, GPT-2 124M at realistic GPU batches: gpt2-512 (train 8 x 512,
// generation batch 8) and gpt2-1024 (train 8 x 1024, generation batch 64). --config all
// runs small and gpt2 on the CPU (as before), and all four on CUDA; the big two can be named
// on the CPU too. --gen-batch N overrides every selected config's generation batch.
//
// --device cuda: the models are built with ModelOptions{Device::Cuda} (everything runs on
// the GPU; host arrays in and out); exits 77 with a message where CUDA cannot be used. The
// matmul section (ppo::cpu::matmul) is CPU only: bench_cuda times the CUDA kernels alone.
// GPU timing stays exact with host clocks: generate() returns host arrays, and a CUDA
// training iteration is timed as backward, step, zero_grad, then the next forward with its
// LM loss read on the host (one of each per iteration, after a priming forward): the host
// read waits for every kernel queued before it, so no work is left running when the clock
// stops. (The CPU keeps its forward, backward, step, zero_grad order.)
//
// FLOPs: forward = 2*B*T*(12*L*C^2 + C*V) + 4*L*B*T^2*C (dense layers + LM head, plus the
// two attention products counted as full T x T, not causal halves); a training step is
// 3 x forward. Matmuls: 2 m n k.
//
//   ./bench_model [--device cpu|cuda] [--config small|gpt2|gpt2-512|gpt2-1024|llama-100m|llama-100m-512|all] [--runs N]
//                 [--gen-batch N] [--json] [--skip-train] [--skip-generate] [--skip-matmul]
// Threads: the ppo pool's (PPO_MAX_THREADS, else every hardware thread). On CUDA the matmul
// path is PPO_CUDA_MATMUL's (tf32 by default; printed in the header).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/error.h"
#include "core/json.h"
#include "core/thread_pool.h"
#include "cpu/matmul.h"
#include "model/config.h"
#include "model/gpt.h"
#if defined(PPO_WITH_CUDA)
#include "cuda/engine_kernels.h"  // matmul_path(), for the header line
#endif

namespace {

namespace json = ppo::json;
using ppo::model::Model;
using ppo::model::ModelConfig;

constexpr int64_t kPromptTokens = 16, kNewTokens = 64;

struct BenchConfig {
  std::string name;  // "small", "gpt2", "gpt2-512", "gpt2-1024"
  int64_t n_layer, n_embd, n_head, vocab, n_positions;
  int64_t train_batch, train_steps, gen_batch;
  bool in_cpu_all;  // part of --config all on the CPU (the big two are GPU-sized)
  // The Llama family (RMSNorm, rotary positions, SwiGLU, grouped-query attention): the
  // key/value heads and the MLP width; the LM head is tied to the embedding.
  bool llama = false;
  int64_t n_kv_head = 0, intermediate = 0;
};

const BenchConfig kConfigs[] = {
    {"small", 6, 384, 6, 8192, 256, 8, 128, 8, true},
    {"gpt2", 12, 768, 12, 50257, 1024, 4, 64, 4, true},
    {"gpt2-512", 12, 768, 12, 50257, 1024, 8, 512, 8, false},
    {"gpt2-1024", 12, 768, 12, 50257, 1024, 8, 1024, 64, false},
    // About 100M parameters (SmolLM-like proportions): 12 x 768, 12 query heads over 4
    // key/value heads, SwiGLU width 2048, a 32k vocabulary, tied head: 100.1M.
    {"llama-100m", 12, 768, 12, 32000, 1024, 4, 64, 4, false, true, 4, 2048},
    {"llama-100m-512", 12, 768, 12, 32000, 1024, 8, 512, 8, false, true, 4, 2048},
};

ModelConfig model_config(const BenchConfig& b) {
  ModelConfig c;
  c.vocab_size = b.vocab;
  c.n_positions = b.n_positions;
  c.n_embd = b.n_embd;
  c.n_layer = b.n_layer;
  c.n_head = b.n_head;
  c.bos_token_id = c.eos_token_id = b.vocab - 1;  // GPT-2's 50256 is out of the small vocab
  if (b.llama) {
    c.model_type = "llama";
    c.n_kv_head = b.n_kv_head;
    c.intermediate_size = b.intermediate;
    c.tie_word_embeddings = true;
  }
  c.validate();
  return c;
}

struct Timing {
  double median_ms = 0.0, best_ms = 0.0;
};

Timing time_runs(const std::function<void()>& fn, int runs) {
  fn();  // warm-up: allocations (activation arena, gradients, moments, KV cache)
  std::vector<double> ms;
  for (int r = 0; r < runs; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  // The median (the mean of the two middle runs for an even count, as Python's statistics.median).
  const size_t n = ms.size();
  Timing t;
  t.median_ms = n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
  t.best_ms = ms[0];
  return t;
}

double forward_flops(const BenchConfig& b, int64_t B, int64_t T) {
  const double L = static_cast<double>(b.n_layer), C = static_cast<double>(b.n_embd),
               V = static_cast<double>(b.vocab);
  // Per layer: qkv C x (H + 2 KVH) hs, the output projection C x C, the MLP (GPT-2: 8 C^2;
  // Llama: 3 C I); 12 L C^2 in all for GPT-2.
  const double per_layer =
      b.llama ? C * (C + 2.0 * C * b.n_kv_head / b.n_head) + C * C + 3.0 * C * b.intermediate : 12.0 * C * C;
  return 2.0 * B * T * (L * per_layer + C * V) + 4.0 * L * B * static_cast<double>(T) * T * C;
}

std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> d(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (int32_t& x : v) x = d(rng);
  return v;
}

// ---- the model: training step and generation ---------------------------------------------

json::Value bench_model(const BenchConfig& b, int runs, bool train, bool generate,
                        ppo::Device device) {
  const ModelConfig config = model_config(b);
  ppo::model::ModelOptions options;
  options.device = device;
  Model model(config, /*seed=*/0, options);
  json::Value r = json::Value::object();
  r.set("n_layer", json::Value::integer(b.n_layer));
  r.set("n_embd", json::Value::integer(b.n_embd));
  r.set("n_head", json::Value::integer(b.n_head));
  r.set("vocab_size", json::Value::integer(b.vocab));
  r.set("n_positions", json::Value::integer(b.n_positions));
  r.set("params", json::Value::integer(model.parameter_count()));
  r.set("runs", json::Value::integer(runs));
  if (train) {
    const int64_t B = b.train_batch, T = b.train_steps;
    const std::vector<int32_t> tokens = random_tokens(B * T, b.vocab, 1);
    ppo::model::TokenBatch tb;
    tb.batch = B, tb.steps = T, tb.tokens = tokens.data();
    ppo::model::ForwardRequest fwd;
    fwd.lm_loss = true;
    fwd.retain = true;
    ppo::model::BackwardRequest bwd;
    bwd.lm_loss_scale = 1.0;
    ppo::model::AdamWOptions adam;
    adam.lr = 1e-4;
    double loss = 0.0;
    Timing t;
    if (device == ppo::Device::Cpu) {
      t = time_runs([&] {
        loss = model.forward(tb, fwd).lm_loss;
        model.backward(bwd);
        model.step(adam);
        model.zero_grad();
      }, runs);
    } else {
      // One of each per iteration, ending with the host read of the next loss: nothing
      // is left queued on the GPU when the clock stops (see the header).
      loss = model.forward(tb, fwd).lm_loss;
      t = time_runs([&] {
        model.backward(bwd);
        model.step(adam);
        model.zero_grad();
        loss = model.forward(tb, fwd).lm_loss;
      }, runs);
    }
    const double flops = 3.0 * forward_flops(b, B, T);
    r.set("train_batch", json::Value::integer(B));
    r.set("train_steps", json::Value::integer(T));
    r.set("train_step_ms", json::Value::number(t.median_ms));
    r.set("train_step_best_ms", json::Value::number(t.best_ms));
    r.set("train_tokens_per_s", json::Value::number(B * T / (t.median_ms * 1e-3)));
    r.set("train_gflop", json::Value::number(flops / 1e9));
    r.set("train_gflops_per_s", json::Value::number(flops / (t.median_ms * 1e6)));
    r.set("train_last_loss", json::Value::number(loss));
  }
  if (generate) {
    const int64_t B = b.gen_batch;
    const std::vector<int32_t> prompt = random_tokens(B * kPromptTokens, b.vocab, 2);
    ppo::model::TokenBatch tb;
    tb.batch = B, tb.steps = kPromptTokens, tb.tokens = prompt.data();
    ppo::model::GenerateOptions opt;
    opt.max_new_tokens = kNewTokens;
    opt.greedy = true;
    int64_t produced = 0;
    const Timing t = time_runs([&] {
      const ppo::model::GenerateResult g = model.generate(tb, opt);
      produced = 0;
      for (int32_t n : g.lengths) produced += n;
    }, runs);
    ppo::require(produced == B * kNewTokens, ppo::ErrorCode::Internal,
                 "generate returned fewer tokens than asked (no stop tokens were given)", "lengths");
    r.set("gen_batch", json::Value::integer(B));
    r.set("gen_prompt", json::Value::integer(kPromptTokens));
    r.set("gen_new_tokens", json::Value::integer(kNewTokens));
    r.set("gen_ms", json::Value::number(t.median_ms));
    r.set("gen_best_ms", json::Value::number(t.best_ms));
    r.set("gen_tokens_per_s", json::Value::number(B * kNewTokens / (t.median_ms * 1e-3)));
  }
  const Model::Memory mem = model.memory();
  json::Value m = json::Value::object();
  m.set("params", json::Value::integer(mem.params));
  m.set("grads", json::Value::integer(mem.grads));
  m.set("optimizer", json::Value::integer(mem.optimizer));
  m.set("activations", json::Value::integer(mem.activations));
  m.set("kv_cache", json::Value::integer(mem.kv_cache));
  r.set("memory_bytes", std::move(m));
  return r;
}

// ---- matmul alone on the model's shapes ------------------------------------------------------

struct Shape {
  std::string name;
  bool ta, tb;  // C[m,n] = op(A)[m,k] op(B)[k,n]; A stored [k,m] if ta, B stored [n,k] if tb
  int64_t m, n, k;
};

// The products the engine's forward and backward make (csrc/model/gpt.cpp), with its
// layouts: dense weights W stored [out, in], so for x [rows, in], dy [rows, out]:
//   fwd  y  = x W^T      NT  m = rows, n = out, k = in
//   dX   dx = dy W       NN  m = rows, n = in,  k = out
//   dW   dW += dy^T x    TN  m = out,  n = in,  k = rows
// for c_attn (in C, out 3C), attn.c_proj (C, C), mlp.c_fc (C, 4C), mlp.c_proj (4C, C), and
// the tied LM head (W = wte [V, C]) on the B * (T - 1) positions that have a next token.
// Then the decoding step of generate() (rows = the generation batch, forward only).
std::vector<Shape> engine_shapes(const BenchConfig& b) {
  std::vector<Shape> s;
  struct Layer {
    const char* name;
    int64_t in, out;
  };
  const int64_t C = b.n_embd;
  const int64_t qkv = b.llama ? C + 2 * C * b.n_kv_head / b.n_head : 3 * C;
  const int64_t fc = b.llama ? 2 * b.intermediate : 4 * C, act = b.llama ? b.intermediate : 4 * C;
  const Layer layers[] = {{"qkv", C, qkv}, {"attn_proj", C, C}, {"mlp_fc", C, fc},
                          {"mlp_proj", act, C}, {"lm_head", C, b.vocab}};
  const int64_t rows = b.train_batch * b.train_steps;
  const int64_t head_rows = b.train_batch * (b.train_steps - 1);
  for (const Layer& l : layers) {
    const int64_t r = std::strcmp(l.name, "lm_head") == 0 ? head_rows : rows;
    s.push_back({b.name + " " + l.name + " fwd", false, true, r, l.out, l.in});
    s.push_back({b.name + " " + l.name + " dX", false, false, r, l.in, l.out});
    s.push_back({b.name + " " + l.name + " dW", true, false, l.out, l.in, r});
  }
  for (const Layer& l : layers)
    s.push_back({b.name + " decode " + l.name + " fwd", false, true, b.gen_batch, l.out, l.in});
  return s;
}

json::Value bench_matmuls(const BenchConfig& b, int runs) {
  json::Value out = json::Value::array();
  std::mt19937 rng(123);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const Shape& s : engine_shapes(b)) {
    const int64_t lda = s.ta ? s.m : s.k, ldb = s.tb ? s.k : s.n;
    std::vector<float> a(static_cast<size_t>(s.m * s.k)), bm(static_cast<size_t>(s.k * s.n)),
        c(static_cast<size_t>(s.m * s.n), 0.0f);
    for (float& x : a) x = normal(rng);
    for (float& x : bm) x = normal(rng);
    const Timing t = time_runs([&] {
      ppo::cpu::matmul(s.ta, s.tb, s.m, s.n, s.k, 1.0f, a.data(), lda, bm.data(), ldb, 0.0f,
                       c.data(), s.n);
    }, runs);
    const double flop = 2.0 * s.m * s.n * s.k;
    json::Value e = json::Value::object();
    e.set("name", json::Value::string(s.name));
    e.set("op", json::Value::string(std::string(s.ta ? "T" : "N") + (s.tb ? "T" : "N")));
    e.set("m", json::Value::integer(s.m));
    e.set("n", json::Value::integer(s.n));
    e.set("k", json::Value::integer(s.k));
    e.set("ms", json::Value::number(t.median_ms));
    e.set("gflops_per_s", json::Value::number(flop / (t.median_ms * 1e6)));
    e.set("best_gflops_per_s", json::Value::number(flop / (t.best_ms * 1e6)));
    out.push_back(std::move(e));
  }
  return out;
}

double num(const json::Value& v, const char* key) { return v.at(key).as_double(); }

}  // namespace

int main(int argc, char** argv) {
  std::string which = "all", device_name = "cpu";
  int runs = 5;
  int64_t gen_batch = 0;  // 0: each config's own
  bool as_json = false, train = true, generate = true, matmuls = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--config" && i + 1 < argc) {
      which = argv[++i];
    } else if (a == "--device" && i + 1 < argc) {
      device_name = argv[++i];
    } else if (a == "--gen-batch" && i + 1 < argc) {
      gen_batch = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--runs" && i + 1 < argc) {
      runs = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--json") {
      as_json = true;
    } else if (a == "--skip-train") {
      train = false;
    } else if (a == "--skip-generate") {
      generate = false;
    } else if (a == "--skip-matmul") {
      matmuls = false;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--device cpu|cuda] [--config small|gpt2|gpt2-512|gpt2-1024|llama-100m|llama-100m-512|all] "
                   "[--runs N] [--gen-batch N] [--json] [--skip-train] [--skip-generate] "
                   "[--skip-matmul]\n",
                   argv[0]);
      return 2;
    }
  }
  bool known = which == "all";
  for (const BenchConfig& b : kConfigs) known = known || which == b.name;
  if (!known) {
    std::fprintf(stderr, "--config must be small, gpt2, gpt2-512, gpt2-1024, llama-100m, llama-100m-512 or all (got '%s')\n",
                 which.c_str());
    return 2;
  }
  if (device_name != "cpu" && device_name != "cuda") {
    std::fprintf(stderr, "--device must be cpu or cuda (got '%s')\n", device_name.c_str());
    return 2;
  }
  const bool cuda = device_name == "cuda";
  const ppo::Device device = cuda ? ppo::Device::Cuda : ppo::Device::Cpu;
  if (cuda && !ppo::cuda_available()) {
    std::fprintf(stderr, "bench_model: --device cuda, but CUDA cannot be used here (%s): skipped\n",
                 ppo::cuda_unavailable_reason().c_str());
    return 77;
  }
  if (cuda) matmuls = false;  // ppo::cpu::matmul only; bench_cuda times the CUDA kernels
  std::string cuda_matmul_path = "?";
#if defined(PPO_WITH_CUDA)
  if (cuda) cuda_matmul_path = ppo::cuda::matmul_path();
#endif
  try {
    if (cuda) {
      std::printf("ppo engine float32 CUDA  matmul path=%s  runs=%d (median)\n",
                  cuda_matmul_path.c_str(), runs);
    } else {
      std::printf("ppo engine float32 CPU  threads=%d  matmul kernel=%s  runs=%d (median)\n",
                  ppo::cpu_thread_count(), ppo::cpu::matmul_isa(), runs);
    }
    std::printf("FLOPs: forward = 2*B*T*(12*L*C^2 + C*V) + 4*L*B*T^2*C (attention products "
                "counted as full TxT, not causal halves); train step = 3 x forward\n");
    json::Value configs = json::Value::object();
    json::Value mm = json::Value::array();
    for (BenchConfig b : kConfigs) {
      if (which == "all" ? !(cuda || b.in_cpu_all) : which != b.name) continue;
      if (gen_batch > 0) b.gen_batch = gen_batch;
      if (train || generate) configs.set(b.name, bench_model(b, runs, train, generate, device));
      if (matmuls) {
        const json::Value rows = bench_matmuls(b, runs);
        for (const json::Value& e : rows.values()) mm.push_back(e);
      }
    }
    // The config column: 7 wide as always, 9 when gpt2-512 / gpt2-1024 are listed.
    int w = 7;
    for (const std::string& k : configs.keys()) w = std::max(w, static_cast<int>(k.size()));
    std::printf("%-*s %11s %11s %10s %9s %8s %6s %10s %10s\n", w, "config", "params", "train B x T",
                "step ms", "tok/s", "GFLOP/s", "gen B", "gen ms", "gen tok/s");
    for (size_t i = 0; i < configs.keys().size(); ++i) {
      const json::Value& r = configs.values()[i];
      std::printf("%-*s %11lld", w, configs.keys()[i].c_str(),
                  static_cast<long long>(r.at("params").as_int64()));
      if (r.find("train_step_ms")) {
        const std::string bt = std::to_string(r.at("train_batch").as_int64()) + " x " +
                               std::to_string(r.at("train_steps").as_int64());
        std::printf(" %11s %10.1f %9.1f %8.1f", bt.c_str(), num(r, "train_step_ms"),
                    num(r, "train_tokens_per_s"), num(r, "train_gflops_per_s"));
      } else {
        std::printf(" %11s %10s %9s %8s", "-", "-", "-", "-");
      }
      if (r.find("gen_ms")) {
        std::printf(" %6lld %10.1f %10.1f\n", static_cast<long long>(r.at("gen_batch").as_int64()),
                    num(r, "gen_ms"), num(r, "gen_tokens_per_s"));
      } else {
        std::printf(" %6s %10s %10s\n", "-", "-", "-");
      }
    }
    if (mm.size() > 0) {
      std::printf("\nppo::cpu::matmul on the model's shapes\n%-26s %-3s %6s %6s %6s %10s %9s %9s\n",
                  "shape", "op", "m", "n", "k", "ms", "GFLOP/s", "best");
      for (const json::Value& e : mm.values())
        std::printf("%-26s %-3s %6lld %6lld %6lld %10.3f %9.1f %9.1f\n", e.at("name").as_string().c_str(),
                    e.at("op").as_string().c_str(), static_cast<long long>(e.at("m").as_int64()),
                    static_cast<long long>(e.at("n").as_int64()),
                    static_cast<long long>(e.at("k").as_int64()), num(e, "ms"),
                    num(e, "gflops_per_s"), num(e, "best_gflops_per_s"));
      // Totals per group ("small": the training step's products, "small decode": one
      // decoding step's): the sum of FLOPs over the sum of median times.
      std::vector<std::string> groups;
      std::vector<double> group_ms, group_flop;
      for (const json::Value& e : mm.values()) {
        const std::string& name = e.at("name").as_string();
        std::string g = name.substr(0, name.find(' '));
        if (name.find(" decode ") != std::string::npos) g += " decode";
        size_t i = std::find(groups.begin(), groups.end(), g) - groups.begin();
        if (i == groups.size()) groups.push_back(g), group_ms.push_back(0.0), group_flop.push_back(0.0);
        group_ms[i] += num(e, "ms");
        group_flop[i] += 2.0 * num(e, "m") * num(e, "n") * num(e, "k");
      }
      for (size_t i = 0; i < groups.size(); ++i)
        std::printf("%-26s %-3s %6s %6s %6s %10.3f %9.1f\n", (groups[i] + " all").c_str(), "", "",
                    "", "", group_ms[i], group_flop[i] / (group_ms[i] * 1e6));
    }
    if (as_json) {
      json::Value out = json::Value::object();
      out.set("impl", json::Value::string("ppo"));
      if (cuda) {
        out.set("device", json::Value::string("cuda"));
        out.set("cuda_matmul_path", json::Value::string(cuda_matmul_path));
      }
      out.set("threads", json::Value::integer(ppo::cpu_thread_count()));
      out.set("matmul_isa", json::Value::string(ppo::cpu::matmul_isa()));
      out.set("configs", std::move(configs));
      out.set("matmul", std::move(mm));
      std::printf("%s\n", json::dump(out).c_str());
    }
  } catch (const ppo::Error& e) {
    std::fprintf(stderr, "bench_model: %s (%s, argument '%s')\n", e.what(),
                 ppo::error_code_name(e.code()), e.argument().c_str());
    return 1;
  }
  return 0;
}
