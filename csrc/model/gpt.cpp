// The GPT-2 engine on the CPU (see gpt.h): forward, backward, AdamW, generation.
//
// Shapes: B sequences of T steps, N = B*T rows, width C, H heads, vocab V, L blocks.
// Block l maps the residual stream x [N, C] to
//   ln1  = LayerNorm_1(x)                      [N, C]   (mean1, rstd1 [N])
//   qkv  = ln1 W_attn^T + b_attn               [N, 3C]
//   atty = CausalAttention(qkv)                [N, C]   (att [B, H, T, T] probabilities)
//   x2   = x + atty W_proj^T + b_proj          [N, C]
//   ln2  = LayerNorm_2(x2)                     [N, C]   (mean2, rstd2 [N])
//   fch  = ln2 W_fc^T + b_fc                   [N, 4C]
//   fchg = GELU(fch)                           [N, 4C]
//   x3   = x2 + fchg W_fcproj^T + b_fcproj     [N, C]   (the next block's x)
// then lnf = LayerNorm_f(x_L), logits = lnf wte^T (tied head), values = lnf score^T.
//
// The LM head runs only on the rows that predict a target token (see ForwardRequest):
// K target positions (b, t) gather lnf rows (b, t - 1) into [K, C], so their logits are
// [K, V]. A retained forward keeps those logits for backward; an unretained one streams
// them in chunks of kHeadChunk rows.
#include "model/gpt.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "core/op_args.h"
#include "cpu/attention.h"
#include "cpu/kernels.h"
#include "cpu/layers.h"
#include "cpu/matmul.h"
#include "cpu/optimizer.h"
#include "model/sampling.h"

namespace ppo::model {
namespace {

// Rows of LM-head logits computed at once when they are not retained: bounds the
// scratch to kHeadChunk * V floats (51 MB for GPT-2's vocabulary).
constexpr int64_t kHeadChunk = 256;

// y [rows, out] = x [rows, in] W^T + b, W stored [out, in] (b may be nullptr).
void linear_forward(int64_t rows, int64_t in, int64_t out, const float* x, const float* w,
                    const float* b, float* y) {
  cpu::matmul(false, true, rows, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
  if (b) cpu::add_bias(rows, out, b, y);
}

// Given dy [rows, out]: dx (= or +=, by accumulate_dx) dy W; dW += dy^T x; db += colsum(dy).
// dx may be nullptr (not needed).
void linear_backward(int64_t rows, int64_t in, int64_t out, const float* dy, const float* x,
                     const float* w, float* dx, bool accumulate_dx, float* dw, float* db) {
  if (dx) cpu::matmul(false, false, rows, in, out, 1.0f, dy, out, w, in, accumulate_dx ? 1.0f : 0.0f, dx, in);
  cpu::matmul(true, false, out, in, rows, 1.0f, dy, out, x, in, 1.0f, dw, in);
  if (db) cpu::bias_backward(rows, out, dy, db);
}

// n values N(0, sigma^2) from uniforms by Box-Muller, both outputs of each pair used: the
// same numbers on every platform, unlike std::normal_distribution.
void fill_normal(Rng& rng, float* out, int64_t n, double sigma) {
  for (int64_t i = 0; i < n; i += 2) {
    const double u1 = 1.0 - rng.uniform();  // (0, 1]
    const double u2 = rng.uniform();
    const double r = sigma * std::sqrt(-2.0 * std::log(u1));
    out[i] = static_cast<float>(r * std::cos(6.283185307179586 * u2));
    if (i + 1 < n) out[i + 1] = static_cast<float>(r * std::sin(6.283185307179586 * u2));
  }
}

bool is_01(float v) { return v == 0.0f || v == 1.0f; }

}  // namespace

// One block's activations, [N, *] each. In an unretained forward every block shares one
// set (only the current block's values are alive).
struct BlockActs {
  float *ln1, *mean1, *rstd1, *qkv, *att, *atty, *x2, *ln2, *mean2, *rstd2, *fch, *fchg, *x3;
};

struct Model::Impl {
  ModelConfig cfg;
  ParameterLayout layout;
  ModelOptions options;
  std::vector<float> params, grads, adam_m, adam_v;
  int64_t adam_steps = 0;

  // ---- the activation arena -------------------------------------------------------------
  std::vector<float> arena;
  int64_t arena_B = 0, arena_T = 0;
  bool arena_retained = false;
  float* x0 = nullptr;  // the embeddings [N, C]
  std::vector<BlockActs> blocks;
  float *lnf = nullptr, *lnf_mean = nullptr, *lnf_rstd = nullptr;

  // ---- what a retained forward keeps for backward() ------------------------------------
  bool has_retained = false;
  int64_t r_B = 0, r_T = 0;
  std::vector<int32_t> r_tokens, r_lengths, r_positions;
  // The K target positions: flat index b*T + t of the predicted token, its id, and
  // the logits [K, V] of the rows b*T + t - 1 that predict them.
  std::vector<int64_t> r_targets;
  std::vector<int32_t> r_target_tokens;
  std::vector<float> r_head_logits;
  bool r_logprobs = false, r_entropy = false, r_values = false, r_lm = false;

  // ---- scratch kept between calls (grown to the largest batch yet, never shrunk, so a
  // training loop allocates and page-faults its memory once) ------------------------------
  std::vector<float> bw_dres, bw_dlnf, bw_dfchg, bw_dfch, bw_dqkv, bw_dsmall;  // [N, *]
  std::vector<float> head_scratch;        // [kHeadChunk, V]: logits or d logits of a chunk
  std::vector<float> head_hs, head_dhs;   // [chunk, C]: gathered hidden states, their grads

  static float* grow(std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
    return v.data();
  }

  // ---- the KV cache of the last generate() -----------------------------------------------
  std::vector<float> kv_cache;

  int64_t C() const { return cfg.n_embd; }
  int64_t V() const { return cfg.vocab_size; }

  // Floats one block needs at (B, T), with or without the attention probabilities.
  int64_t block_floats(int64_t B, int64_t T, bool with_att) const {
    const int64_t N = B * T, c = C();
    return N * (c + 3 * c + c + c + c + 4 * c + 4 * c + c) + 4 * N +
           (with_att ? B * cfg.n_head * T * T : 0);
  }

  // One block's activations for (B, T), laid out from p (advanced past them): the
  // block_floats(B, T, with_att) floats that follow p.
  BlockActs carve_block(float*& p, int64_t B, int64_t T, bool with_att) const {
    const int64_t N = B * T, c = C();
    auto take = [&p](int64_t n) {
      float* q = p;
      p += n;
      return q;
    };
    BlockActs a;
    a.ln1 = take(N * c);
    a.mean1 = take(N);
    a.rstd1 = take(N);
    a.qkv = take(N * 3 * c);
    a.att = with_att ? take(B * cfg.n_head * T * T) : nullptr;
    a.atty = take(N * c);
    a.x2 = take(N * c);
    a.ln2 = take(N * c);
    a.mean2 = take(N);
    a.rstd2 = take(N);
    a.fch = take(N * 4 * c);
    a.fchg = take(N * 4 * c);
    a.x3 = take(N * c);
    return a;
  }

  // Points the arena at (B, T), growing it when needed. retain: every block gets its own
  // activations (and the attention probabilities); otherwise blocks share one set.
  void prepare_arena(int64_t B, int64_t T, bool retain) {
    const int64_t N = B * T, c = C(), L = cfg.n_layer;
    const int64_t per_block = block_floats(B, T, retain);
    const int64_t total = N * c + (retain ? L : 1) * per_block + N * c + 2 * N;
    if (static_cast<int64_t>(arena.size()) < total) {
      arena.clear();
      arena.shrink_to_fit();
      arena.resize(static_cast<size_t>(total));
    }
    float* p = arena.data();
    auto take = [&p](int64_t n) {
      float* q = p;
      p += n;
      return q;
    };
    x0 = take(N * c);
    blocks.assign(static_cast<size_t>(L), BlockActs{});
    for (int64_t l = 0; l < L; ++l) {
      if (l > 0 && !retain) {
        blocks[l] = blocks[0];
        continue;
      }
      blocks[l] = carve_block(p, B, T, retain);
    }
    lnf = take(N * c);
    lnf_mean = take(N);
    lnf_rstd = take(N);
    arena_B = B;
    arena_T = T;
    arena_retained = retain;
  }

  // ---- validation -----------------------------------------------------------------------
  void validate_batch(const TokenBatch& b, const char* what) const {
    require(b.batch >= 1, ErrorCode::InvalidArgument,
            std::string(what) + ": batch must be >= 1, got " + std::to_string(b.batch), "batch");
    require(b.steps >= 1, ErrorCode::InvalidArgument,
            std::string(what) + ": steps must be >= 1, got " + std::to_string(b.steps), "steps");
    require(b.steps <= cfg.n_positions, ErrorCode::OutOfRange,
            std::string(what) + ": steps " + std::to_string(b.steps) +
                " exceeds the model's context (n_positions " + std::to_string(cfg.n_positions) + ")",
            "steps");
    require(b.tokens != nullptr, ErrorCode::InvalidArgument, "tokens must not be null", "tokens");
    for (int64_t i = 0; i < b.batch; ++i) {
      const int64_t n = b.lengths ? b.lengths[i] : b.steps;
      if (n < 1 || n > b.steps)
        throw Error(ErrorCode::OutOfRange,
                    "lengths[" + std::to_string(i) + "] = " + std::to_string(n) +
                        " is outside [1, steps = " + std::to_string(b.steps) + "]",
                    "lengths");
      for (int64_t t = 0; t < n; ++t) {
        const int32_t id = b.tokens[i * b.steps + t];
        if (id < 0 || id >= V())
          throw Error(ErrorCode::OutOfRange,
                      "tokens[" + std::to_string(i) + ", " + std::to_string(t) + "] = " +
                          std::to_string(id) + " is outside the vocabulary [0, " +
                          std::to_string(V()) + ")",
                      "tokens");
      }
    }
  }

  int64_t length_of(const TokenBatch& b, int64_t i) const { return b.lengths ? b.lengths[i] : b.steps; }

  // ---- the blocks ---------------------------------------------------------------------------
  // Block l over `rows` rows: x [rows, C] -> a.x3 through the activations a. The attention
  // is the caller's: attend(qkv [rows, 3C], atty [rows, C]), over the whole causal batch
  // in a forward pass, or one cached position per sequence in a decoding step. a.x3 may
  // be x itself (blocks that share one set of activations): x is last read before it.
  template <typename Attend>
  void block_forward(int64_t l, int64_t rows, const float* x, const BlockActs& a, Attend attend) {
    const BlockOffsets& o = layout.blocks[l];
    const float* P = params.data();
    const int64_t c = C();
    const float eps = static_cast<float>(cfg.layer_norm_epsilon);
    cpu::layernorm_forward(rows, c, x, P + o.ln_1_weight, P + o.ln_1_bias, eps, a.ln1, a.mean1, a.rstd1);
    linear_forward(rows, c, 3 * c, a.ln1, P + o.attn_weight, P + o.attn_bias, a.qkv);
    attend(a.qkv, a.atty);
    linear_forward(rows, c, c, a.atty, P + o.attn_proj_weight, P + o.attn_proj_bias, a.x2);
    cpu::add(rows * c, a.x2, x, a.x2);
    cpu::layernorm_forward(rows, c, a.x2, P + o.ln_2_weight, P + o.ln_2_bias, eps, a.ln2, a.mean2, a.rstd2);
    linear_forward(rows, c, 4 * c, a.ln2, P + o.fc_weight, P + o.fc_bias, a.fch);
    cpu::gelu_forward(rows * 4 * c, a.fch, a.fchg);
    linear_forward(rows, 4 * c, c, a.fchg, P + o.fc_proj_weight, P + o.fc_proj_bias, a.x3);
    cpu::add(rows * c, a.x3, a.x2, a.x3);
  }

  // The final LayerNorm of `rows` rows of the residual stream.
  void final_layernorm(int64_t rows, const float* x, float* out, float* mean, float* rstd) const {
    cpu::layernorm_forward(rows, C(), x, params.data() + layout.ln_f_weight, params.data() + layout.ln_f_bias,
                           static_cast<float>(cfg.layer_norm_epsilon), out, mean, rstd);
  }

  // Runs the blocks over x0 (already embedded) for (B, T) with the given lengths, leaving
  // the final hidden states in lnf. kv (may be nullptr): per-layer caches to prefill.
  void run_blocks(int64_t B, int64_t T, const int32_t* lengths, float* kv, int64_t cache_T) {
    const int64_t N = B * T, c = C(), H = cfg.n_head;
    const float* x = x0;
    for (int64_t l = 0; l < cfg.n_layer; ++l) {
      const BlockActs& a = blocks[l];
      block_forward(l, N, x, a, [&](const float* qkv, float* atty) {
        if (kv) {
          float* k_cache = kv + 2 * l * B * cache_T * c;
          cpu::kv_cache_store(B, T, c, lengths, qkv, cache_T, k_cache, k_cache + B * cache_T * c);
        }
        cpu::attention_forward(B, T, c, H, lengths, qkv, a.att, atty);
      });
      x = a.x3;
    }
    final_layernorm(N, x, lnf, lnf_mean, lnf_rstd);
  }

  // Position ids of a batch: t for the valid steps of each row, -1 for padding (embedded as
  // zeros); and each row's length.
  void row_positions(const TokenBatch& batch, std::vector<int32_t>& positions,
                     std::vector<int32_t>& lengths) const {
    const int64_t B = batch.batch, T = batch.steps;
    positions.resize(static_cast<size_t>(B * T));
    lengths.resize(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      lengths[b] = static_cast<int32_t>(length_of(batch, b));
      for (int64_t t = 0; t < T; ++t) positions[b * T + t] = t < lengths[b] ? static_cast<int32_t>(t) : -1;
    }
  }

  // Log-probs (and entropy) of `tokens` [K] under the rows of logits [K, V].
  void head_logprobs(int64_t K, const float* logits, const int32_t* tokens, float* logprobs,
                     float* entropy) const {
    LogprobsArgs args;
    args.batch = 1;
    args.steps = K;
    args.vocab = V();
    args.logits = logits;
    args.tokens = tokens;
    args.logprobs = logprobs;
    args.entropy = entropy;
    cpu::logprobs_forward(args);
  }

  // ---- forward --------------------------------------------------------------------------------
  ForwardResult forward(const TokenBatch& batch, const ForwardRequest& req) {
    validate_batch(batch, "forward");
    const int64_t B = batch.batch, T = batch.steps, N = B * T, c = C(), Vv = V();
    require(!req.values || cfg.value_head, ErrorCode::InvalidArgument,
            "values were requested but the model has no value head (create it with value_head)",
            "values");
    if (req.retain) require_trainable("forward with retain");
    const bool want_targets = req.logprobs || req.entropy || req.lm_loss;

    // Target positions: 1 <= t < n where target_mask (if any) is 1.
    std::vector<int64_t> targets;
    std::vector<int32_t> target_tokens;
    if (want_targets) {
      for (int64_t b = 0; b < B; ++b) {
        const int64_t n = length_of(batch, b);
        for (int64_t t = 1; t < n; ++t) {
          if (req.target_mask) {
            const float m = req.target_mask[b * T + t];
            if (!is_01(m))
              throw Error(ErrorCode::OutOfRange,
                          "target_mask[" + std::to_string(b) + ", " + std::to_string(t) +
                              "] must be 0 or 1",
                          "target_mask");
            if (m == 0.0f) continue;
          }
          targets.push_back(b * T + t);
          target_tokens.push_back(batch.tokens[b * T + t]);
        }
      }
    }
    const int64_t K = static_cast<int64_t>(targets.size());

    std::vector<int32_t> positions, lengths;
    row_positions(batch, positions, lengths);

    has_retained = false;  // validation passed: the arena is about to be reused
    prepare_arena(B, T, req.retain);
    const float* P = params.data();
    cpu::embedding_forward(N, c, batch.tokens, positions.data(), P + layout.wte, P + layout.wpe, x0);
    run_blocks(B, T, lengths.data(), nullptr, 0);

    ForwardResult result;
    result.lm_tokens = K;
    if (req.logits) {
      linear_forward(N, c, Vv, lnf, P + layout.wte, nullptr, req.logits);
      for (int64_t r = 0; r < N; ++r)
        if (positions[r] < 0) std::fill(req.logits + r * Vv, req.logits + (r + 1) * Vv, 0.0f);
    }
    if (req.values) {
      const float* w = P + layout.value_head;
      for (int64_t r = 0; r < N; ++r) {
        if (positions[r] < 0) {
          req.values[r] = 0.0f;
          continue;
        }
        double s = 0.0;
        for (int64_t j = 0; j < c; ++j) s += static_cast<double>(lnf[r * c + j]) * w[j];
        req.values[r] = static_cast<float>(s);
      }
    }
    if (req.logprobs) std::fill(req.logprobs, req.logprobs + N, 0.0f);
    if (req.entropy) std::fill(req.entropy, req.entropy + N, 0.0f);

    if (want_targets && K > 0) {
      // Rows that predict the targets, gathered: hs [chunk, C] -> logits [chunk, V]. A
      // retained forward keeps all K rows of logits (in r_head_logits, whose memory is
      // reused from step to step); otherwise one chunk of scratch at a time.
      std::vector<float> lp(static_cast<size_t>(K)), ent(req.entropy ? static_cast<size_t>(K) : 0);
      const int64_t chunk = req.retain ? K : std::min<int64_t>(K, kHeadChunk);
      float* logits_base = req.retain ? grow(r_head_logits, K * Vv) : grow(head_scratch, chunk * Vv);
      float* hs = grow(head_hs, chunk * c);
      for (int64_t k0 = 0; k0 < K; k0 += chunk) {
        const int64_t kn = std::min(chunk, K - k0);
        for (int64_t i = 0; i < kn; ++i)
          std::memcpy(hs + i * c, lnf + (targets[k0 + i] - 1) * c, sizeof(float) * c);
        float* logits = req.retain ? logits_base + k0 * Vv : logits_base;
        linear_forward(kn, c, Vv, hs, P + layout.wte, nullptr, logits);
        head_logprobs(kn, logits, target_tokens.data() + k0, lp.data() + k0,
                      req.entropy ? ent.data() + k0 : nullptr);
      }
      double nll = 0.0;
      for (int64_t i = 0; i < K; ++i) {
        if (req.logprobs) req.logprobs[targets[i]] = lp[i];
        if (req.entropy) req.entropy[targets[i]] = ent[i];
        nll -= lp[i];
      }
      if (req.lm_loss) result.lm_loss = nll / static_cast<double>(K);
    }

    if (req.retain) {
      r_B = B;
      r_T = T;
      r_tokens.assign(batch.tokens, batch.tokens + N);
      r_lengths = std::move(lengths);
      r_positions = std::move(positions);
      r_targets = std::move(targets);
      r_target_tokens = std::move(target_tokens);
      r_logprobs = req.logprobs != nullptr;
      r_entropy = req.entropy != nullptr;
      r_values = req.values != nullptr;
      r_lm = req.lm_loss;
      has_retained = true;
    }
    return result;
  }

  void require_trainable(const std::string& what) const {
    require(options.trainable, ErrorCode::InvalidArgument,
            what + " needs a trainable model; this one was created frozen (trainable: false)",
            "trainable");
  }

  void ensure_grads() {
    if (grads.empty()) grads.assign(static_cast<size_t>(layout.total), 0.0f);
  }

  // ---- backward -------------------------------------------------------------------------------
  void backward(const BackwardRequest& req) {
    require_trainable("backward");
    require(has_retained, ErrorCode::InvalidArgument,
            "backward needs a forward pass with retain: true on the same model first "
            "(another forward without retain, or generate, discards it)",
            "retain");
    require(!req.grad_logprobs || r_logprobs, ErrorCode::InvalidArgument,
            "grad_logprobs was given but the retained forward did not compute logprobs", "grad_logprobs");
    require(!req.grad_entropy || r_entropy, ErrorCode::InvalidArgument,
            "grad_entropy was given but the retained forward did not compute entropy", "grad_entropy");
    require(!req.grad_values || r_values, ErrorCode::InvalidArgument,
            "grad_values was given but the retained forward did not compute values", "grad_values");
    require(req.lm_loss_scale == 0.0 || r_lm, ErrorCode::InvalidArgument,
            "lm_loss_scale was given but the retained forward did not compute the LM loss",
            "lm_loss_scale");
    require(std::isfinite(req.lm_loss_scale), ErrorCode::NonFinite, "lm_loss_scale must be finite",
            "lm_loss_scale");
    const int64_t B = r_B, T = r_T, N = B * T, c = C(), Vv = V(), H = cfg.n_head;
    const int64_t K = static_cast<int64_t>(r_targets.size());
    // Upstream gradients at valid positions must be finite (padding is never read).
    auto check = [&](const float* g, const char* name, bool targets_only) {
      if (!g) return;
      for (int64_t r = 0; r < N; ++r) {
        if (r_positions[r] < 0 || (targets_only && r_positions[r] == 0)) continue;
        if (!std::isfinite(g[r]))
          throw Error(ErrorCode::NonFinite,
                      std::string(name) + "[" + std::to_string(r / T) + ", " + std::to_string(r % T) +
                          "] is not finite",
                      name);
      }
    };
    check(req.grad_logprobs, "grad_logprobs", true);
    check(req.grad_entropy, "grad_entropy", true);
    check(req.grad_values, "grad_values", false);

    ensure_grads();
    const float* P = params.data();
    float* G = grads.data();
    float* dres = grow(bw_dres, N * c);  // d x of the current block (the residual stream)
    float* dlnf = grow(bw_dlnf, N * c);  // d lnf
    std::fill(dres, dres + N * c, 0.0f);
    std::fill(dlnf, dlnf + N * c, 0.0f);

    // Value head: values[r] = lnf[r] . w  ->  dlnf[r] += g[r] w;  dw += sum_r g[r] lnf[r].
    if (req.grad_values) {
      std::vector<float> g(static_cast<size_t>(N), 0.0f);
      for (int64_t r = 0; r < N; ++r)
        if (r_positions[r] >= 0) g[r] = req.grad_values[r];
      const float* w = P + layout.value_head;
      for (int64_t r = 0; r < N; ++r)
        for (int64_t j = 0; j < c; ++j) dlnf[r * c + j] += g[r] * w[j];
      cpu::matmul(false, false, 1, c, N, 1.0f, g.data(), N, lnf, c, 1.0f, G + layout.value_head, c);
    }

    // LM head over the K target rows, in chunks: dlogits = d(loss)/d(logits) from the
    // log-prob, entropy and LM-loss gradients; then d hs = dlogits wte, dwte += dlogits^T hs.
    const bool head_grad = req.grad_logprobs || req.grad_entropy || req.lm_loss_scale != 0.0;
    if (head_grad && K > 0) {
      std::vector<float> glp(static_cast<size_t>(K), 0.0f), gent;
      const float lm = static_cast<float>(-req.lm_loss_scale / static_cast<double>(K));
      for (int64_t i = 0; i < K; ++i)
        glp[i] = (req.grad_logprobs ? req.grad_logprobs[r_targets[i]] : 0.0f) + lm;
      if (req.grad_entropy) {
        gent.resize(static_cast<size_t>(K));
        for (int64_t i = 0; i < K; ++i) gent[i] = req.grad_entropy[r_targets[i]];
      }
      const int64_t chunk = std::min<int64_t>(K, kHeadChunk);
      float* dlogits = grow(head_scratch, chunk * Vv);
      float* hs = grow(head_hs, chunk * c);
      float* dhs = grow(head_dhs, chunk * c);
      for (int64_t k0 = 0; k0 < K; k0 += chunk) {
        const int64_t kn = std::min(chunk, K - k0);
        LogprobsBackwardArgs a;
        a.batch = 1;
        a.steps = kn;
        a.vocab = Vv;
        a.logits = r_head_logits.data() + k0 * Vv;
        a.tokens = r_target_tokens.data() + k0;
        a.grad_logprobs = glp.data() + k0;
        a.grad_entropy = gent.empty() ? nullptr : gent.data() + k0;
        a.grad_logits = dlogits;
        cpu::logprobs_backward(a);
        for (int64_t i = 0; i < kn; ++i)
          std::memcpy(hs + i * c, lnf + (r_targets[k0 + i] - 1) * c, sizeof(float) * c);
        linear_backward(kn, c, Vv, dlogits, hs, P + layout.wte, dhs, false, G + layout.wte, nullptr);
        for (int64_t i = 0; i < kn; ++i)
          cpu::accumulate(c, dhs + i * c, dlnf + (r_targets[k0 + i] - 1) * c);
      }
    }

    // Final LayerNorm: dres = d x_L.
    const float* xL = cfg.n_layer > 0 ? blocks[cfg.n_layer - 1].x3 : x0;
    cpu::layernorm_backward(N, c, dlnf, xL, P + layout.ln_f_weight, lnf_mean, lnf_rstd, dres,
                            G + layout.ln_f_weight, G + layout.ln_f_bias);

    // Blocks in reverse. dres holds d x3 (the block's output) on entry and d x on exit.
    float* dfchg = grow(bw_dfchg, N * 4 * c);  // d GELU output
    float* dfch = grow(bw_dfch, N * 4 * c);    // d GELU input
    float* dqkv = grow(bw_dqkv, N * 3 * c);
    float* dsmall = grow(bw_dsmall, N * c);    // d ln1, d ln2, d atty in turn
    for (int64_t l = cfg.n_layer - 1; l >= 0; --l) {
      const BlockOffsets& o = layout.blocks[l];
      const BlockActs& a = blocks[l];
      const float* x = l > 0 ? blocks[l - 1].x3 : x0;
      // x3 = x2 + fchg Wp^T + bp
      linear_backward(N, 4 * c, c, dres, a.fchg, P + o.fc_proj_weight, dfchg, false,
                      G + o.fc_proj_weight, G + o.fc_proj_bias);
      std::fill(dfch, dfch + N * 4 * c, 0.0f);
      cpu::gelu_backward(N * 4 * c, a.fch, dfchg, dfch);
      linear_backward(N, c, 4 * c, dfch, a.ln2, P + o.fc_weight, dsmall, false, G + o.fc_weight,
                      G + o.fc_bias);
      // dres += LayerNorm_2 backward (dres already holds the residual path's d x2)
      cpu::layernorm_backward(N, c, dsmall, a.x2, P + o.ln_2_weight, a.mean2, a.rstd2, dres,
                              G + o.ln_2_weight, G + o.ln_2_bias);
      // x2 = x + atty Wproj^T + bproj
      linear_backward(N, c, c, dres, a.atty, P + o.attn_proj_weight, dsmall, false,
                      G + o.attn_proj_weight, G + o.attn_proj_bias);
      std::fill(dqkv, dqkv + N * 3 * c, 0.0f);
      cpu::attention_backward(B, T, c, H, r_lengths.data(), dsmall, a.qkv, a.att, dqkv);
      linear_backward(N, c, 3 * c, dqkv, a.ln1, P + o.attn_weight, dsmall, false,
                      G + o.attn_weight, G + o.attn_bias);
      cpu::layernorm_backward(N, c, dsmall, x, P + o.ln_1_weight, a.mean1, a.rstd1, dres,
                              G + o.ln_1_weight, G + o.ln_1_bias);
    }
    cpu::embedding_backward(N, c, dres, r_tokens.data(), r_positions.data(), G + layout.wte,
                            G + layout.wpe);
  }

  // ---- optimizer --------------------------------------------------------------------------------
  double grad_norm() const {
    if (grads.empty()) return 0.0;
    return std::sqrt(cpu::sum_of_squares(layout.total, grads.data()));
  }

  StepResult step(const AdamWOptions& o) {
    require_trainable("step");
    auto finite_in = [](double v, double lo, double hi, bool hi_open, const char* name) {
      const bool ok = std::isfinite(v) && v >= lo && (hi_open ? v < hi : v <= hi);
      require(ok, ErrorCode::InvalidArgument,
              std::string(name) + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                  (hi_open ? ")" : "]") + ", got " + std::to_string(v),
              name);
    };
    finite_in(o.lr, 0.0, 1e9, false, "lr");
    finite_in(o.beta1, 0.0, 1.0, true, "beta1");
    finite_in(o.beta2, 0.0, 1.0, true, "beta2");
    require(std::isfinite(o.eps) && o.eps > 0.0, ErrorCode::InvalidArgument,
            "eps must be > 0, got " + std::to_string(o.eps), "eps");
    finite_in(o.weight_decay, 0.0, 1e9, false, "weight_decay");
    finite_in(o.max_grad_norm, 0.0, 1e300, false, "max_grad_norm");
    ensure_grads();
    StepResult result;
    result.grad_norm = grad_norm();
    require(std::isfinite(result.grad_norm), ErrorCode::NonFinite,
            "the gradients hold NaN or infinity; the step was not taken (zero_grad() to discard them)",
            "grads");
    if (o.max_grad_norm > 0.0 && result.grad_norm > o.max_grad_norm) {
      cpu::scale_in_place(layout.total, grads.data(), static_cast<float>(o.max_grad_norm / (result.grad_norm + 1e-6)));
      result.clipped = true;
    }
    if (adam_m.empty()) {
      adam_m.assign(static_cast<size_t>(layout.total), 0.0f);
      adam_v.assign(static_cast<size_t>(layout.total), 0.0f);
    }
    ++adam_steps;
    for (const ParamTensor& t : layout.tensors) {
      bool decay = t.kind == ParamKind::Matrix || t.kind == ParamKind::Head;
      if (t.kind == ParamKind::Embedding) decay = o.decay_embeddings;
      if (t.kind == ParamKind::Bias || t.kind == ParamKind::Norm) decay = o.decay_biases_and_norms;
      cpu::adamw_update(t.numel, params.data() + t.offset, grads.data() + t.offset, adam_m.data() + t.offset,
                        adam_v.data() + t.offset, static_cast<float>(o.lr), static_cast<float>(o.beta1),
                        static_cast<float>(o.beta2), static_cast<float>(o.eps),
                        decay ? static_cast<float>(o.weight_decay) : 0.0f, adam_steps);
    }
    result.step = adam_steps;
    return result;
  }

  // ---- generation ------------------------------------------------------------------------------
  GenerateResult generate(const TokenBatch& prompts, const GenerateOptions& o) {
    validate_batch(prompts, "generate");
    require(o.max_new_tokens >= 1, ErrorCode::InvalidArgument,
            "max_new_tokens must be >= 1, got " + std::to_string(o.max_new_tokens), "max_new_tokens");
    const int64_t B = prompts.batch, T = prompts.steps, c = C(), Vv = V(), H = cfg.n_head;
    int64_t longest = 0;
    for (int64_t b = 0; b < B; ++b) longest = std::max(longest, length_of(prompts, b));
    require(longest + o.max_new_tokens <= cfg.n_positions, ErrorCode::OutOfRange,
            "the longest prompt (" + std::to_string(longest) + " tokens) plus max_new_tokens (" +
                std::to_string(o.max_new_tokens) + ") exceeds the model's context (n_positions " +
                std::to_string(cfg.n_positions) + ")",
            "max_new_tokens");
    SamplingParams sp;
    sp.greedy = o.greedy;
    sp.temperature = static_cast<float>(o.temperature);
    sp.top_k = o.top_k;
    sp.top_p = static_cast<float>(o.top_p);
    sp.repetition_penalty = static_cast<float>(o.repetition_penalty);
    require(std::isfinite(o.temperature) && o.temperature > 0.0, ErrorCode::InvalidArgument,
            "temperature must be > 0, got " + std::to_string(o.temperature), "temperature");
    require(o.top_k >= 0, ErrorCode::InvalidArgument, "top_k must be >= 0", "top_k");
    require(std::isfinite(o.top_p) && o.top_p > 0.0 && o.top_p <= 1.0, ErrorCode::InvalidArgument,
            "top_p must be in (0, 1], got " + std::to_string(o.top_p), "top_p");
    require(std::isfinite(o.repetition_penalty) && o.repetition_penalty > 0.0, ErrorCode::InvalidArgument,
            "repetition_penalty must be > 0, got " + std::to_string(o.repetition_penalty),
            "repetition_penalty");
    for (int32_t s : o.stop_tokens)
      require(s >= 0 && s < Vv, ErrorCode::OutOfRange,
              "stop token " + std::to_string(s) + " is outside the vocabulary", "stop_tokens");

    has_retained = false;
    const int64_t cache_T = longest + o.max_new_tokens;
    const int64_t L = cfg.n_layer;
    kv_cache.assign(static_cast<size_t>(2 * L * B * cache_T * c), 0.0f);

    // Prefill: the prompts through the blocks, k and v into the cache.
    std::vector<int32_t> positions, lengths;
    row_positions(prompts, positions, lengths);
    prepare_arena(B, T, false);
    const float* P = params.data();
    cpu::embedding_forward(B * T, c, prompts.tokens, positions.data(), P + layout.wte, P + layout.wpe, x0);
    run_blocks(B, T, lengths.data(), kv_cache.data(), cache_T);

    GenerateResult out;
    out.batch = B;
    out.max_new_tokens = o.max_new_tokens;
    out.tokens.assign(static_cast<size_t>(B * o.max_new_tokens), -1);
    out.logprobs.assign(static_cast<size_t>(B * o.max_new_tokens), 0.0f);
    out.lengths.assign(static_cast<size_t>(B), 0);
    out.stopped.assign(static_cast<size_t>(B), 0);

    // The hidden state that predicts each row's next token: [B, C].
    std::vector<float> hidden(static_cast<size_t>(B * c));
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(hidden.data() + b * c, lnf + (b * T + lengths[b] - 1) * c, sizeof(float) * c);

    std::vector<Rng> rngs;
    for (int64_t b = 0; b < B; ++b) rngs.emplace_back(o.seed, static_cast<uint64_t>(b));
    std::vector<std::vector<int32_t>> penalized(static_cast<size_t>(B));
    if (o.penalize_prompt)
      for (int64_t b = 0; b < B; ++b)
        penalized[b].assign(prompts.tokens + b * T, prompts.tokens + b * T + lengths[b]);
    std::vector<float> logits(static_cast<size_t>(B * Vv));
    std::vector<float> work(static_cast<size_t>(Vv)), scratch(static_cast<size_t>(2 * Vv));
    std::vector<int32_t> next(static_cast<size_t>(B)), cur_pos(static_cast<size_t>(B));
    std::vector<uint8_t> active(static_cast<size_t>(B), 1);

    // A decoding step's activations: one block's worth for B rows, shared by the blocks
    // (as in an unretained forward), then the final LayerNorm's statistics.
    std::vector<float> step_buffer(static_cast<size_t>(B * c + block_floats(B, 1, false) + 2 * B));
    float* step_x = step_buffer.data();
    float* carve_from = step_x + B * c;
    const BlockActs step = carve_block(carve_from, B, 1, false);
    float* step_mean = carve_from;
    float* step_rstd = carve_from + B;

    for (int64_t s = 0; s < o.max_new_tokens; ++s) {
      // Logits of every active row, then sample.
      linear_forward(B, c, Vv, hidden.data(), P + layout.wte, nullptr, logits.data());
      bool any = false;
      for (int64_t b = 0; b < B; ++b) {
        if (!active[b]) continue;
        const float* row = logits.data() + b * Vv;
        std::memcpy(work.data(), row, sizeof(float) * Vv);
        int32_t tok = 0;
        try {
          tok = sample_token(work.data(), Vv, sp, penalized[b].data(), static_cast<int64_t>(penalized[b].size()),
                             rngs[b], scratch.data());
        } catch (const Error& e) {
          // NaN, +inf or all -inf in the row: the model's own output, so its parameters.
          if (e.code() != ErrorCode::NonFinite || e.argument() != "logits") throw;
          throw Error(ErrorCode::NonFinite,
                      "the model produced non-finite logits while generating (row " + std::to_string(b) +
                          "): " + e.what(),
                      "params");
        }
        // Its log-prob under the model's own distribution (the raw row, temperature 1).
        float logprob = 0.0f;
        head_logprobs(1, row, &tok, &logprob, nullptr);
        out.tokens[b * o.max_new_tokens + s] = tok;
        out.logprobs[b * o.max_new_tokens + s] = logprob;
        out.lengths[b] = static_cast<int32_t>(s + 1);
        penalized[b].push_back(tok);
        if (std::find(o.stop_tokens.begin(), o.stop_tokens.end(), tok) != o.stop_tokens.end()) {
          out.stopped[b] = 1;
          active[b] = 0;
        }
        next[b] = tok;
        any = any || active[b];
      }
      if (o.progress) o.progress(s + 1, o.max_new_tokens);
      if (!any || s + 1 == o.max_new_tokens) break;

      // One decoding step: each active row's new token at position length + s.
      for (int64_t b = 0; b < B; ++b) cur_pos[b] = active[b] ? static_cast<int32_t>(lengths[b] + s) : -1;
      cpu::embedding_forward(B, c, next.data(), cur_pos.data(), P + layout.wte, P + layout.wpe, step_x);
      const float* x = step_x;
      for (int64_t l = 0; l < L; ++l) {
        float* k_cache = kv_cache.data() + 2 * l * B * cache_T * c;
        block_forward(l, B, x, step, [&](const float* qkv, float* atty) {
          cpu::attention_decode(B, c, H, cur_pos.data(), qkv, cache_T, k_cache, k_cache + B * cache_T * c, atty);
        });
        x = step.x3;
      }
      final_layernorm(B, x, hidden.data(), step_mean, step_rstd);
    }
    return out;
  }
};

// ---- Model ----------------------------------------------------------------------------------

namespace {
void require_cpu(const ModelOptions& options) {
  require(options.device == Device::Cpu, ErrorCode::CudaUnavailable,
          "the transformer engine runs on the CPU in this release (its CUDA backend comes later; the "
          "RLHF kernels do run on CUDA): use device 'cpu'",
          "device");
}
}  // namespace

Model::Model(const ModelConfig& config, uint64_t seed, const ModelOptions& options) : impl_(new Impl) {
  require_cpu(options);
  impl_->cfg = config;
  impl_->layout = parameter_layout(config);
  impl_->options = options;
  std::vector<float>& p = impl_->params;
  p.assign(static_cast<size_t>(impl_->layout.total), 0.0f);
  const double residual_std = 0.02 / std::sqrt(2.0 * static_cast<double>(config.n_layer));
  uint64_t stream = 0;
  for (const ParamTensor& t : impl_->layout.tensors) {
    // One random stream per tensor: a tensor's values do not depend on the others.
    Rng rng(seed, stream++);
    float* w = p.data() + t.offset;
    if (t.kind == ParamKind::Bias) continue;  // zeros
    if (t.kind == ParamKind::Norm) {
      const bool is_weight = t.name.size() >= 6 && t.name.compare(t.name.size() - 6, 6, "weight") == 0;
      std::fill(w, w + t.numel, is_weight ? 1.0f : 0.0f);
      continue;
    }
    const bool residual_proj = t.name.find("c_proj.weight") != std::string::npos;
    const double sigma = residual_proj ? residual_std : 0.02;
    fill_normal(rng, w, t.numel, sigma);
  }
}

Model::Model(const ModelConfig& config, std::vector<float> params, const ModelOptions& options)
    : impl_(new Impl) {
  require_cpu(options);
  impl_->cfg = config;
  impl_->layout = parameter_layout(config);
  impl_->options = options;
  require(static_cast<int64_t>(params.size()) == impl_->layout.total, ErrorCode::ShapeMismatch,
          "the parameter buffer holds " + std::to_string(params.size()) + " floats; the config needs " +
              std::to_string(impl_->layout.total),
          "params");
  impl_->params = std::move(params);
}

Model::~Model() = default;

const ModelConfig& Model::config() const { return impl_->cfg; }
const ParameterLayout& Model::layout() const { return impl_->layout; }
int64_t Model::parameter_count() const { return impl_->layout.total; }
bool Model::trainable() const { return impl_->options.trainable; }
const float* Model::params() const { return impl_->params.data(); }
float* Model::mutable_params() { return impl_->params.data(); }
const float* Model::grads() const { return impl_->grads.empty() ? nullptr : impl_->grads.data(); }

ForwardResult Model::forward(const TokenBatch& batch, const ForwardRequest& request) {
  return impl_->forward(batch, request);
}
void Model::backward(const BackwardRequest& request) { impl_->backward(request); }
void Model::zero_grad() {
  if (!impl_->grads.empty()) std::fill(impl_->grads.begin(), impl_->grads.end(), 0.0f);
}
double Model::grad_norm() const { return impl_->grad_norm(); }
StepResult Model::step(const AdamWOptions& options) { return impl_->step(options); }
int64_t Model::optimizer_steps() const { return impl_->adam_steps; }
const float* Model::optimizer_m() const { return impl_->adam_m.empty() ? nullptr : impl_->adam_m.data(); }
const float* Model::optimizer_v() const { return impl_->adam_v.empty() ? nullptr : impl_->adam_v.data(); }

void Model::set_optimizer_state(const float* m, const float* v, int64_t steps) {
  require(impl_->options.trainable, ErrorCode::InvalidArgument,
          "set_optimizer_state: this model is frozen (trainable: false)", "model");
  require(steps >= 0, ErrorCode::InvalidArgument, "optimizer steps must be >= 0", "steps");
  require((m == nullptr) == (v == nullptr), ErrorCode::InvalidArgument,
          "set_optimizer_state: give both moments or neither", "optimizer");
  const int64_t n = impl_->layout.total;
  if (m == nullptr) {
    impl_->adam_m.clear();
    impl_->adam_v.clear();
  } else {
    for (int64_t i = 0; i < n; ++i) {
      require(std::isfinite(m[i]) && std::isfinite(v[i]) && v[i] >= 0.0f, ErrorCode::NonFinite,
              "optimizer state: moment " + std::to_string(i) + " is not finite (or v < 0)", "optimizer");
    }
    impl_->adam_m.assign(m, m + n);
    impl_->adam_v.assign(v, v + n);
  }
  impl_->adam_steps = steps;
}

Model::Memory Model::estimate_memory(const ModelConfig& config, bool trainable, int64_t batch, int64_t steps,
                                     int64_t generate_batch, int64_t generate_steps) {
  const int64_t f = sizeof(float);
  const int64_t P = parameter_layout(config).total;
  const int64_t c = config.n_embd, L = config.n_layer, Vv = config.vocab_size, H = config.n_head;
  auto block = [&](int64_t B, int64_t T, bool att) {
    const int64_t N = B * T;
    return N * (c + 3 * c + c + c + c + 4 * c + 4 * c + c) + 4 * N + (att ? B * H * T * T : 0);
  };
  auto arena = [&](int64_t B, int64_t T, bool retain) {
    const int64_t N = B * T;
    return N * c + (retain ? L : 1) * block(B, T, retain) + N * c + 2 * N;
  };
  int64_t acts = std::max(arena(batch, steps, trainable), arena(generate_batch, generate_steps, false));
  const int64_t N = batch * steps;
  const int64_t chunk = std::min<int64_t>(kHeadChunk, std::max<int64_t>(N, 1));
  acts += chunk * Vv + 2 * chunk * c;  // the LM head's chunk scratch
  if (trainable) acts += N * Vv + N * c * (1 + 1 + 4 + 4 + 3 + 1);  // retained head logits, backward scratch
  return {P * f, trainable ? P * f : 0, trainable ? 2 * P * f : 0, acts * f,
          2 * L * generate_batch * generate_steps * c * f};
}
GenerateResult Model::generate(const TokenBatch& prompts, const GenerateOptions& options) {
  return impl_->generate(prompts, options);
}

Model::Memory Model::memory() const {
  const int64_t f = sizeof(float);
  return {static_cast<int64_t>(impl_->params.size()) * f, static_cast<int64_t>(impl_->grads.size()) * f,
          static_cast<int64_t>(impl_->adam_m.size() + impl_->adam_v.size()) * f,
          static_cast<int64_t>(impl_->arena.size() + impl_->r_head_logits.size() + impl_->bw_dres.size() +
                               impl_->bw_dlnf.size() + impl_->bw_dfchg.size() + impl_->bw_dfch.size() +
                               impl_->bw_dqkv.size() + impl_->bw_dsmall.size() + impl_->head_scratch.size() +
                               impl_->head_hs.size() + impl_->head_dhs.size()) * f,
          static_cast<int64_t>(impl_->kv_cache.size()) * f};
}

}  // namespace ppo::model
