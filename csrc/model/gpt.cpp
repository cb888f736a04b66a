// The GPT-2 engine (see gpt.h): forward, backward, AdamW, generation, on the CPU or on
// CUDA. Every pass runs through the device's op table (core/engine_ops.h); the model's
// memory (parameters, gradients, AdamW moments, activations, KV cache, scratch) lives on
// that device in DeviceArrays, allocated once per shape and freed with the model. The
// host holds what the caller hands in or asks for (tokens, small index arrays, the
// requested outputs) and the control flow; on CUDA nothing else crosses the bus.
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

#include "core/engine_ops.h"
#include "core/error.h"
#include "core/op_args.h"
#include "model/sampling.h"

namespace ppo::model {
namespace {

// Rows of LM-head logits computed at once when they are not retained: bounds the
// scratch to kHeadChunk * V floats (51 MB for GPT-2's vocabulary).
constexpr int64_t kHeadChunk = 256;

// y [rows, out] = x [rows, in] W^T + b, W stored [out, in] (b may be nullptr).
void linear_forward(const EngineOps& ops, int64_t rows, int64_t in, int64_t out, const float* x,
                    const float* w, const float* b, float* y) {
  ops.matmul(false, true, rows, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
  if (b) ops.add_bias(rows, out, b, y);
}

// Given dy [rows, out]: dx (= or +=, by accumulate_dx) dy W; dW += dy^T x; db += colsum(dy).
// dx may be nullptr (not needed).
void linear_backward(const EngineOps& ops, int64_t rows, int64_t in, int64_t out, const float* dy,
                     const float* x, const float* w, float* dx, bool accumulate_dx, float* dw,
                     float* db) {
  if (dx) ops.matmul(false, false, rows, in, out, 1.0f, dy, out, w, in, accumulate_dx ? 1.0f : 0.0f, dx, in);
  ops.matmul(true, false, out, in, rows, 1.0f, dy, out, x, in, 1.0f, dw, in);
  if (db) ops.bias_backward(rows, out, dy, db);
}

// A buffer of T on the model's device, grown to the largest size asked for and never
// shrunk (a training loop allocates once per shape), freed with the model. Growing
// discards the contents.
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  ~DeviceArray() { release(); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  void bind(const EngineOps* ops) { ops_ = ops; }
  // At least n elements.
  T* reserve(int64_t n) {
    if (n > capacity_) {
      release();
      ptr_ = static_cast<T*>(ops_->alloc(sizeof(T) * static_cast<size_t>(n)));
      capacity_ = n;
    }
    return ptr_;
  }
  // At least n elements, all zero.
  T* reserve_zeroed(int64_t n) {
    reserve(n);
    ops_->zero(ptr_, sizeof(T) * static_cast<size_t>(n));
    return ptr_;
  }
  // The n host values, copied to the device.
  T* upload(const T* host, int64_t n) {
    reserve(n);
    ops_->copy_to_device(ptr_, host, sizeof(T) * static_cast<size_t>(n));
    return ptr_;
  }
  T* get() const { return ptr_; }
  int64_t capacity() const { return capacity_; }
  int64_t bytes() const { return capacity_ * static_cast<int64_t>(sizeof(T)); }
  void release() {
    if (ptr_ != nullptr) ops_->free(ptr_);
    ptr_ = nullptr;
    capacity_ = 0;
  }

 private:
  const EngineOps* ops_ = nullptr;
  T* ptr_ = nullptr;
  int64_t capacity_ = 0;
};

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
// att: what attention saves for backward (the probabilities on the CPU, a log-sum-exp per
// query row on CUDA), nullptr in an unretained forward.
struct BlockActs {
  float *ln1, *mean1, *rstd1, *qkv, *att, *atty, *x2, *ln2, *mean2, *rstd2, *fch, *fchg, *x3;
};

struct Model::Impl {
  ModelConfig cfg;
  ParameterLayout layout;
  ModelOptions options;
  const EngineOps* ops = nullptr;  // the device's op table
  bool on_host = true;             // CPU: device pointers are host pointers

  // ---- parameters, gradients, AdamW moments [layout.total] each, on the device ----------
  DeviceArray<float> params, grads, adam_m, adam_v;
  int64_t adam_steps = 0;
  // CUDA only: host copies for params()/grads()/optimizer_*() and mutable_params().
  // params_host is current when params_host_valid; params_host_newer says the caller wrote
  // to it through mutable_params() and the next pass must upload it first.
  mutable std::vector<float> params_host, grads_host, adam_m_host, adam_v_host;
  mutable bool params_host_valid = false;
  bool params_host_newer = false;

  // ---- the activation arena -------------------------------------------------------------
  DeviceArray<float> arena;
  float* x0 = nullptr;  // the embeddings [N, C]
  std::vector<BlockActs> blocks;
  float *lnf = nullptr, *lnf_mean = nullptr, *lnf_rstd = nullptr;

  // ---- the batch's index arrays on the device (a retained forward's stay for backward:
  // any later forward or generate discards the retained one) ---------------------------------
  DeviceArray<int32_t> d_tokens, d_positions, d_lengths;  // [N], [N], [B]
  DeviceArray<int64_t> d_head_rows;      // [K]: the lnf row predicting each target (b*T + t - 1)
  DeviceArray<int32_t> d_target_tokens;  // [K]

  // ---- what a retained forward keeps for backward() ------------------------------------
  bool has_retained = false;
  int64_t r_B = 0, r_T = 0;
  std::vector<int32_t> r_positions;  // (its tokens and lengths stay in d_tokens, d_lengths)
  // The K target positions: flat index b*T + t of the predicted token (its id stays in
  // d_target_tokens), and the logits [K, V] of the rows b*T + t - 1 that predict them.
  std::vector<int64_t> r_targets;
  DeviceArray<float> r_head_logits;
  bool r_logprobs = false, r_entropy = false, r_values = false, r_lm = false;

  // ---- scratch kept between calls (grown to the largest batch yet, never shrunk, so a
  // training loop allocates its memory once) ------------------------------------------------
  DeviceArray<float> bw_dres, bw_dlnf, bw_dfchg, bw_dfch, bw_dqkv, bw_dsmall;  // [N, *]
  DeviceArray<float> head_scratch;        // [kHeadChunk, V]: logits or d logits of a chunk
  DeviceArray<float> head_hs, head_dhs;   // [chunk, C]: gathered hidden states, their grads
  DeviceArray<float> head_lp, head_ent;   // [K]: the targets' log-probs and entropies
  DeviceArray<float> row_grads, row_grads2;  // [N] or [K]: upstream gradients uploaded
  DeviceArray<float> out_staging;         // CUDA: a requested output before its copy to the host

  // ---- generation: the KV cache of the last generate() and the decoding step's buffers --------
  DeviceArray<float> kv_cache;
  DeviceArray<float> gen_hidden, gen_logits, gen_scratch, gen_step;
  DeviceArray<int64_t> gen_rows;
  DeviceArray<int32_t> gen_penalized, gen_penalized_count, gen_active, gen_next, gen_positions,
      gen_tokens_out, gen_status;
  DeviceArray<double> gen_uniforms;
  DeviceArray<float> gen_logprobs_out;

  // ---- the undo point of snapshot_state() ---------------------------------------------------
  DeviceArray<float> snap_params, snap_m, snap_v;
  bool has_snapshot = false, snap_has_moments = false;
  int64_t snap_steps = 0;

  void bind_memory() {
    for (DeviceArray<float>* a : {&params, &grads, &adam_m, &adam_v, &arena, &r_head_logits, &bw_dres,
                                  &bw_dlnf, &bw_dfchg, &bw_dfch, &bw_dqkv, &bw_dsmall, &head_scratch,
                                  &head_hs, &head_dhs, &head_lp, &head_ent, &row_grads, &row_grads2,
                                  &out_staging, &kv_cache, &gen_hidden, &gen_logits, &gen_scratch,
                                  &gen_step, &gen_logprobs_out})
      a->bind(ops);
    for (DeviceArray<int32_t>* a : {&d_tokens, &d_positions, &d_lengths, &d_target_tokens, &gen_penalized,
                                    &gen_penalized_count, &gen_active, &gen_next, &gen_positions,
                                    &gen_tokens_out, &gen_status})
      a->bind(ops);
    for (DeviceArray<float>* a : {&snap_params, &snap_m, &snap_v}) a->bind(ops);
    d_head_rows.bind(ops);
    gen_rows.bind(ops);
    gen_uniforms.bind(ops);
  }

  // Picks the device and makes the parameter buffer from host values.
  void init(const ModelConfig& config, const ModelOptions& opts, const std::vector<float>& host_params) {
    cfg = config;
    layout = parameter_layout(config);
    options = opts;
    ops = &engine_ops_for(opts.device);
    on_host = ops->device == Device::Cpu;
    bind_memory();
    require(static_cast<int64_t>(host_params.size()) == layout.total, ErrorCode::ShapeMismatch,
            "the parameter buffer holds " + std::to_string(host_params.size()) + " floats; the config needs " +
                std::to_string(layout.total),
            "params");
    params.upload(host_params.data(), layout.total);
  }

  // ---- host views (CUDA: copies, made when asked for) ---------------------------------------
  const float* params_view() const {
    if (on_host) return params.get();
    if (!params_host_valid) {
      params_host.resize(static_cast<size_t>(layout.total));
      ops->copy_to_host(params_host.data(), params.get(), sizeof(float) * layout.total);
      params_host_valid = true;
    }
    return params_host.data();
  }
  float* mutable_params_view() {
    if (on_host) return params.get();
    params_view();
    params_host_newer = true;
    return params_host.data();
  }
  // Before a pass: parameters written through mutable_params() go to the device.
  void upload_params_written_on_host() {
    if (!params_host_newer) return;
    params.upload(params_host.data(), layout.total);
    params_host_newer = false;
  }
  const float* host_view(const DeviceArray<float>& a, std::vector<float>& host) const {
    if (a.capacity() == 0) return nullptr;
    if (on_host) return a.get();
    host.resize(static_cast<size_t>(layout.total));
    ops->copy_to_host(host.data(), a.get(), sizeof(float) * layout.total);
    return host.data();
  }

  // A requested output of n floats: written on the device at the returned pointer, then
  // delivered to `host` by deliver() (the same pointer on the CPU: no copy).
  float* output_buffer(float* host, int64_t n) { return on_host ? host : out_staging.reserve(n); }
  void deliver(float* host, const float* device, int64_t n) const {
    if (!on_host) ops->copy_to_host(host, device, sizeof(float) * n);
  }

  int64_t C() const { return cfg.n_embd; }
  int64_t V() const { return cfg.vocab_size; }
  bool llama() const { return cfg.is_llama(); }
  int64_t H() const { return cfg.n_head; }
  int64_t KVH() const { return cfg.kv_heads(); }
  int64_t hs() const { return cfg.head_size(); }
  // Widths of a block's activations: qkv [(H + 2 KVH) hs] (3C for GPT-2), the MLP's
  // input projection [4C | 2I (gate | up)] and its activation [4C | I].
  int64_t qkv_width() const { return (H() + 2 * KVH()) * hs(); }
  int64_t fc_width() const { return llama() ? 2 * cfg.intermediate_size : 4 * C(); }
  int64_t act_width() const { return llama() ? cfg.intermediate_size : 4 * C(); }
  // The KV cache of one layer and sequence position: k or v of the KVH heads.
  int64_t kv_width() const { return KVH() * hs(); }
  // A parameter by offset, or nullptr for a tensor the architecture lacks (-1).
  const float* param(int64_t offset) const { return offset < 0 ? nullptr : params.get() + offset; }
  float* grad(int64_t offset) const { return offset < 0 ? nullptr : grads.get() + offset; }
  // The LM head's weight [V, C]: lm_head.weight when untied, else the token embedding.
  int64_t head_offset() const { return layout.lm_head >= 0 ? layout.lm_head : layout.wte; }

  // Floats one block needs at (B, T), with or without what attention saves for backward.
  int64_t block_floats(int64_t B, int64_t T, bool with_att) const {
    const int64_t N = B * T, c = C();
    return N * (c + qkv_width() + c + c + c + fc_width() + act_width() + c) + 4 * N +
           (with_att ? ops->attention_saved_floats(B, T, cfg.n_head) : 0);
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
    a.qkv = take(N * qkv_width());
    a.att = with_att ? take(ops->attention_saved_floats(B, T, cfg.n_head)) : nullptr;
    a.atty = take(N * c);
    a.x2 = take(N * c);
    a.ln2 = take(N * c);
    a.mean2 = take(N);
    a.rstd2 = take(N);
    a.fch = take(N * fc_width());
    a.fchg = take(N * act_width());
    a.x3 = take(N * c);
    return a;
  }

  // Points the arena at (B, T), growing it when needed. retain: every block gets its own
  // activations (and what attention saves); otherwise blocks share one set.
  void prepare_arena(int64_t B, int64_t T, bool retain) {
    const int64_t N = B * T, c = C(), L = cfg.n_layer;
    const int64_t per_block = block_floats(B, T, retain);
    const int64_t total = N * c + (retain ? L : 1) * per_block + N * c + 2 * N;
    float* p = arena.reserve(total);
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
  void block_forward(int64_t l, int64_t rows, const float* x, const int32_t* positions, const BlockActs& a,
                     Attend attend) {
    const BlockOffsets& o = layout.blocks[l];
    const int64_t c = C();
    if (llama()) {
      // h = RMSNorm(x); qkv = h Wqkv^T; rotary positions on q and k (adjacent heads);
      // x2 = x + attention Wo^T; h2 = RMSNorm(x2); x3 = x2 + SwiGLU(h2 Wgu^T) Wdown^T.
      const float eps = static_cast<float>(cfg.rms_norm_eps);
      ops->rmsnorm_forward(rows, c, x, param(o.ln_1_weight), eps, a.ln1, a.rstd1);
      linear_forward(*ops, rows, c, qkv_width(), a.ln1, param(o.attn_weight), nullptr, a.qkv);
      ops->rope_forward(rows, qkv_width(), 0, H() + KVH(), hs(), positions, static_cast<float>(cfg.rope_theta),
                        static_cast<float>(cfg.rope_scaling), a.qkv);
      attend(a.qkv, a.atty);
      linear_forward(*ops, rows, c, c, a.atty, param(o.attn_proj_weight), nullptr, a.x2);
      ops->add(rows * c, a.x2, x, a.x2);
      ops->rmsnorm_forward(rows, c, a.x2, param(o.ln_2_weight), eps, a.ln2, a.rstd2);
      linear_forward(*ops, rows, c, fc_width(), a.ln2, param(o.fc_weight), nullptr, a.fch);
      ops->swiglu_forward(rows, act_width(), a.fch, a.fchg);
      linear_forward(*ops, rows, act_width(), c, a.fchg, param(o.fc_proj_weight), nullptr, a.x3);
      ops->add(rows * c, a.x3, a.x2, a.x3);
      return;
    }
    const float* P = params.get();
    const float eps = static_cast<float>(cfg.layer_norm_epsilon);
    ops->layernorm_forward(rows, c, x, P + o.ln_1_weight, P + o.ln_1_bias, eps, a.ln1, a.mean1, a.rstd1);
    linear_forward(*ops, rows, c, 3 * c, a.ln1, P + o.attn_weight, P + o.attn_bias, a.qkv);
    attend(a.qkv, a.atty);
    linear_forward(*ops, rows, c, c, a.atty, P + o.attn_proj_weight, P + o.attn_proj_bias, a.x2);
    ops->add(rows * c, a.x2, x, a.x2);
    ops->layernorm_forward(rows, c, a.x2, P + o.ln_2_weight, P + o.ln_2_bias, eps, a.ln2, a.mean2, a.rstd2);
    linear_forward(*ops, rows, c, 4 * c, a.ln2, P + o.fc_weight, P + o.fc_bias, a.fch);
    ops->gelu_forward(rows * 4 * c, a.fch, a.fchg);
    linear_forward(*ops, rows, 4 * c, c, a.fchg, P + o.fc_proj_weight, P + o.fc_proj_bias, a.x3);
    ops->add(rows * c, a.x3, a.x2, a.x3);
  }

  // The final LayerNorm of `rows` rows of the residual stream.
  void final_layernorm(int64_t rows, const float* x, float* out, float* mean, float* rstd) const {
    if (llama()) {
      ops->rmsnorm_forward(rows, C(), x, param(layout.ln_f_weight), static_cast<float>(cfg.rms_norm_eps), out, rstd);
      return;
    }
    ops->layernorm_forward(rows, C(), x, params.get() + layout.ln_f_weight, params.get() + layout.ln_f_bias,
                           static_cast<float>(cfg.layer_norm_epsilon), out, mean, rstd);
  }

  // Runs the blocks over x0 (already embedded) for (B, T) with the given lengths (device),
  // leaving the final hidden states in lnf. kv (may be nullptr): per-layer caches to prefill.
  void run_blocks(int64_t B, int64_t T, const int32_t* positions, const int32_t* lengths, float* kv,
                  int64_t cache_T) {
    const int64_t N = B * T, H = cfg.n_head;
    const float* x = x0;
    for (int64_t l = 0; l < cfg.n_layer; ++l) {
      const BlockActs& a = blocks[l];
      block_forward(l, N, x, positions, a, [&](const float* qkv, float* atty) {
        if (kv) {
          const int64_t layer_cache = B * cache_T * kv_width();
          float* k_cache = kv + 2 * l * layer_cache;
          ops->kv_cache_store(B, T, H, KVH(), hs(), lengths, qkv, cache_T, k_cache, k_cache + layer_cache);
        }
        ops->attention_forward(B, T, H, KVH(), hs(), lengths, qkv, a.att, atty);
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

  // Log-probs (and entropy) of `tokens` [K] under the rows of logits [K, V] (device arrays).
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
    ops->logprobs_forward(args);
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
    upload_params_written_on_host();
    prepare_arena(B, T, req.retain);
    const int32_t* tokens_d = d_tokens.upload(batch.tokens, N);
    const int32_t* positions_d = d_positions.upload(positions.data(), N);
    const int32_t* lengths_d = d_lengths.upload(lengths.data(), B);
    const float* P = params.get();
    ops->embedding_forward(N, c, tokens_d, positions_d, P + layout.wte, param(layout.wpe), x0);
    run_blocks(B, T, positions_d, lengths_d, nullptr, 0);

    ForwardResult result;
    result.lm_tokens = K;
    if (req.logits) {
      float* logits = output_buffer(req.logits, N * Vv);
      linear_forward(*ops, N, c, Vv, lnf, P + head_offset(), nullptr, logits);
      ops->zero_padded_rows(N, Vv, positions_d, logits);
      deliver(req.logits, logits, N * Vv);
    }
    if (req.values) {
      float* values = output_buffer(req.values, N);
      ops->value_head_forward(N, c, lnf, P + layout.value_head, positions_d, values);
      deliver(req.values, values, N);
    }
    if (req.logprobs) std::fill(req.logprobs, req.logprobs + N, 0.0f);
    if (req.entropy) std::fill(req.entropy, req.entropy + N, 0.0f);

    if (want_targets && K > 0) {
      // Rows that predict the targets, gathered: hs [chunk, C] -> logits [chunk, V]. A
      // retained forward keeps all K rows of logits (in r_head_logits, whose memory is
      // reused from step to step); otherwise one chunk of scratch at a time.
      std::vector<int64_t> head_rows(static_cast<size_t>(K));
      for (int64_t i = 0; i < K; ++i) head_rows[i] = targets[i] - 1;
      const int64_t* rows_d = d_head_rows.upload(head_rows.data(), K);
      const int32_t* target_tokens_d = d_target_tokens.upload(target_tokens.data(), K);
      float* lp_d = head_lp.reserve(K);
      float* ent_d = req.entropy ? head_ent.reserve(K) : nullptr;
      const int64_t chunk = req.retain ? K : std::min<int64_t>(K, kHeadChunk);
      float* logits_base = req.retain ? r_head_logits.reserve(K * Vv) : head_scratch.reserve(chunk * Vv);
      float* hs = head_hs.reserve(chunk * c);
      for (int64_t k0 = 0; k0 < K; k0 += chunk) {
        const int64_t kn = std::min(chunk, K - k0);
        ops->gather_rows(kn, c, rows_d + k0, lnf, hs);
        float* logits = req.retain ? logits_base + k0 * Vv : logits_base;
        linear_forward(*ops, kn, c, Vv, hs, P + head_offset(), nullptr, logits);
        head_logprobs(kn, logits, target_tokens_d + k0, lp_d + k0, ent_d ? ent_d + k0 : nullptr);
      }
      std::vector<float> lp(static_cast<size_t>(K)), ent(req.entropy ? static_cast<size_t>(K) : 0);
      ops->copy_to_host(lp.data(), lp_d, sizeof(float) * K);
      if (ent_d) ops->copy_to_host(ent.data(), ent_d, sizeof(float) * K);
      double nll = 0.0;
      for (int64_t i = 0; i < K; ++i) {
        if (req.logprobs) req.logprobs[targets[i]] = lp[i];
        if (req.entropy) req.entropy[targets[i]] = ent[i];
        nll -= lp[i];
      }
      if (req.lm_loss) result.lm_loss = nll / static_cast<double>(K);
    }
    ops->synchronize();  // a kernel's failure is this call's error, not the next one's

    if (req.retain) {
      r_B = B;
      r_T = T;
      r_positions = std::move(positions);
      r_targets = std::move(targets);
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
    if (grads.capacity() == 0) grads.reserve_zeroed(layout.total);
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
    upload_params_written_on_host();
    const float* P = params.get();
    float* G = grads.get();
    float* dres = bw_dres.reserve_zeroed(N * c);  // d x of the current block (the residual stream)
    float* dlnf = bw_dlnf.reserve_zeroed(N * c);  // d lnf

    // Value head: values[r] = lnf[r] . w  ->  dlnf[r] += g[r] w;  dw += sum_r g[r] lnf[r].
    if (req.grad_values) {
      std::vector<float> g(static_cast<size_t>(N), 0.0f);
      for (int64_t r = 0; r < N; ++r)
        if (r_positions[r] >= 0) g[r] = req.grad_values[r];
      ops->value_head_backward(N, c, row_grads.upload(g.data(), N), lnf, P + layout.value_head, dlnf,
                               G + layout.value_head);
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
      const float* glp_d = row_grads.upload(glp.data(), K);
      const float* gent_d = gent.empty() ? nullptr : row_grads2.upload(gent.data(), K);
      const int64_t* rows_d = d_head_rows.get();
      const int64_t chunk = std::min<int64_t>(K, kHeadChunk);
      float* dlogits = head_scratch.reserve(chunk * Vv);
      float* hs = head_hs.reserve(chunk * c);
      float* dhs = head_dhs.reserve(chunk * c);
      for (int64_t k0 = 0; k0 < K; k0 += chunk) {
        const int64_t kn = std::min(chunk, K - k0);
        LogprobsBackwardArgs a;
        a.batch = 1;
        a.steps = kn;
        a.vocab = Vv;
        a.logits = r_head_logits.get() + k0 * Vv;
        a.tokens = d_target_tokens.get() + k0;
        a.grad_logprobs = glp_d + k0;
        a.grad_entropy = gent_d ? gent_d + k0 : nullptr;
        a.grad_logits = dlogits;
        ops->logprobs_backward(a);
        ops->gather_rows(kn, c, rows_d + k0, lnf, hs);
        linear_backward(*ops, kn, c, Vv, dlogits, hs, P + head_offset(), dhs, false, G + head_offset(), nullptr);
        ops->scatter_add_rows(kn, c, rows_d + k0, dhs, dlnf);
      }
    }

    // Final norm: dres = d x_L.
    const float* xL = cfg.n_layer > 0 ? blocks[cfg.n_layer - 1].x3 : x0;
    if (llama())
      ops->rmsnorm_backward(N, c, dlnf, xL, P + layout.ln_f_weight, lnf_rstd, dres, G + layout.ln_f_weight);
    else
      ops->layernorm_backward(N, c, dlnf, xL, P + layout.ln_f_weight, lnf_mean, lnf_rstd, dres,
                              G + layout.ln_f_weight, G + layout.ln_f_bias);

    // Blocks in reverse. dres holds d x3 (the block's output) on entry and d x on exit.
    const int64_t qkv_w = qkv_width(), fc_w = fc_width(), act_w = act_width();
    float* dfchg = bw_dfchg.reserve(N * act_w);  // d of the MLP's activation (GELU or SwiGLU output)
    float* dfch = bw_dfch.reserve(N * fc_w);     // d of its input
    float* dqkv = bw_dqkv.reserve(N * qkv_w);
    float* dsmall = bw_dsmall.reserve(N * c);    // d ln1, d ln2, d atty in turn
    const int32_t* lengths_d = d_lengths.get();
    const int32_t* positions_d = d_positions.get();
    const float theta = static_cast<float>(cfg.rope_theta), scaling = static_cast<float>(cfg.rope_scaling);
    for (int64_t l = cfg.n_layer - 1; l >= 0; --l) {
      const BlockOffsets& o = layout.blocks[l];
      const BlockActs& a = blocks[l];
      const float* x = l > 0 ? blocks[l - 1].x3 : x0;
      // x3 = x2 + act Wp^T + bp
      linear_backward(*ops, N, act_w, c, dres, a.fchg, P + o.fc_proj_weight, dfchg, false, G + o.fc_proj_weight,
                      grad(o.fc_proj_bias));
      ops->zero(dfch, sizeof(float) * N * fc_w);
      if (llama()) ops->swiglu_backward(N, act_w, a.fch, dfchg, dfch);
      else ops->gelu_backward(N * fc_w, a.fch, dfchg, dfch);
      linear_backward(*ops, N, c, fc_w, dfch, a.ln2, P + o.fc_weight, dsmall, false, G + o.fc_weight, grad(o.fc_bias));
      // dres += norm_2 backward (dres already holds the residual path's d x2)
      if (llama())
        ops->rmsnorm_backward(N, c, dsmall, a.x2, P + o.ln_2_weight, a.rstd2, dres, G + o.ln_2_weight);
      else
        ops->layernorm_backward(N, c, dsmall, a.x2, P + o.ln_2_weight, a.mean2, a.rstd2, dres, G + o.ln_2_weight,
                                G + o.ln_2_bias);
      // x2 = x + atty Wproj^T + bproj
      linear_backward(*ops, N, c, c, dres, a.atty, P + o.attn_proj_weight, dsmall, false, G + o.attn_proj_weight,
                      grad(o.attn_proj_bias));
      ops->zero(dqkv, sizeof(float) * N * qkv_w);
      ops->attention_backward(B, T, H, KVH(), hs(), lengths_d, dsmall, a.qkv, a.atty, a.att, dqkv);
      // The rotation of q and k is orthogonal: its backward rotates their gradients back.
      if (llama()) ops->rope_backward(N, qkv_w, 0, H + KVH(), hs(), positions_d, theta, scaling, dqkv);
      linear_backward(*ops, N, c, qkv_w, dqkv, a.ln1, P + o.attn_weight, dsmall, false, G + o.attn_weight,
                      grad(o.attn_bias));
      if (llama())
        ops->rmsnorm_backward(N, c, dsmall, x, P + o.ln_1_weight, a.rstd1, dres, G + o.ln_1_weight);
      else
        ops->layernorm_backward(N, c, dsmall, x, P + o.ln_1_weight, a.mean1, a.rstd1, dres, G + o.ln_1_weight,
                                G + o.ln_1_bias);
    }
    ops->embedding_backward(N, c, dres, d_tokens.get(), d_positions.get(), G + layout.wte, grad(layout.wpe));
    ops->synchronize();
  }

  // ---- optimizer --------------------------------------------------------------------------------
  double grad_norm() const {
    if (grads.capacity() == 0) return 0.0;
    return std::sqrt(ops->sum_of_squares(layout.total, grads.get()));
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
      ops->scale_in_place(layout.total, grads.get(), static_cast<float>(o.max_grad_norm / (result.grad_norm + 1e-6)));
      result.clipped = true;
    }
    if (adam_m.capacity() == 0) {
      adam_m.reserve_zeroed(layout.total);
      adam_v.reserve_zeroed(layout.total);
    }
    upload_params_written_on_host();
    ++adam_steps;
    for (const ParamTensor& t : layout.tensors) {
      bool decay = t.kind == ParamKind::Matrix || t.kind == ParamKind::Head;
      if (t.kind == ParamKind::Embedding) decay = o.decay_embeddings;
      if (t.kind == ParamKind::Bias || t.kind == ParamKind::Norm) decay = o.decay_biases_and_norms;
      ops->adamw_update(t.numel, params.get() + t.offset, grads.get() + t.offset, adam_m.get() + t.offset,
                        adam_v.get() + t.offset, static_cast<float>(o.lr), static_cast<float>(o.beta1),
                        static_cast<float>(o.beta2), static_cast<float>(o.eps),
                        decay ? static_cast<float>(o.weight_decay) : 0.0f, adam_steps);
    }
    ops->synchronize();
    params_host_valid = false;
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
    upload_params_written_on_host();
    const int64_t cache_T = longest + o.max_new_tokens;
    const int64_t L = cfg.n_layer;
    const int64_t layer_cache = B * cache_T * kv_width();
    float* kv = kv_cache.reserve_zeroed(2 * L * layer_cache);

    // Prefill: the prompts through the blocks, k and v into the cache.
    std::vector<int32_t> positions, lengths;
    row_positions(prompts, positions, lengths);
    prepare_arena(B, T, false);
    const float* P = params.get();
    const int32_t* prompt_positions = d_positions.upload(positions.data(), B * T);
    ops->embedding_forward(B * T, c, d_tokens.upload(prompts.tokens, B * T), prompt_positions, P + layout.wte,
                           param(layout.wpe), x0);
    run_blocks(B, T, prompt_positions, d_lengths.upload(lengths.data(), B), kv, cache_T);

    GenerateResult out;
    out.batch = B;
    out.max_new_tokens = o.max_new_tokens;
    out.tokens.assign(static_cast<size_t>(B * o.max_new_tokens), -1);
    out.logprobs.assign(static_cast<size_t>(B * o.max_new_tokens), 0.0f);
    out.lengths.assign(static_cast<size_t>(B), 0);
    out.stopped.assign(static_cast<size_t>(B), 0);

    // The hidden state that predicts each row's next token: [B, C], gathered from the last
    // prompt position of each row.
    std::vector<int64_t> last_rows(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) last_rows[b] = b * T + lengths[b] - 1;
    float* hidden = gen_hidden.reserve(B * c);
    ops->gather_rows(B, c, gen_rows.upload(last_rows.data(), B), lnf, hidden);

    // Sampling state on the host (each row's Rng stream, its penalized ids, whether it is
    // still going); the draws, ids and counts go to the device each step, and the chosen
    // tokens, their log-probs and a status per row come back: 3 numbers a row.
    std::vector<Rng> rngs;
    for (int64_t b = 0; b < B; ++b) rngs.emplace_back(o.seed, static_cast<uint64_t>(b));
    const bool penalize = o.repetition_penalty != 1.0;
    const int64_t stride = cache_T;  // a row never holds more ids than its final length
    std::vector<int32_t> penalized(static_cast<size_t>(B * stride), 0), penalized_count(static_cast<size_t>(B), 0);
    if (o.penalize_prompt)
      for (int64_t b = 0; b < B; ++b) {
        std::copy(prompts.tokens + b * T, prompts.tokens + b * T + lengths[b], penalized.begin() + b * stride);
        penalized_count[b] = lengths[b];
      }
    std::vector<int32_t> active(static_cast<size_t>(B), 1), next(static_cast<size_t>(B), 0),
        cur_pos(static_cast<size_t>(B)), chosen(static_cast<size_t>(B)), status(static_cast<size_t>(B));
    std::vector<double> uniforms(static_cast<size_t>(B), 0.0);
    std::vector<float> chosen_logprobs(static_cast<size_t>(B));
    std::vector<int32_t> no_penalty(static_cast<size_t>(B), 0);

    float* logits = gen_logits.reserve(B * Vv);
    SampleTokensArgs sa;
    sa.rows = B;
    sa.vocab = Vv;
    sa.logits = logits;
    sa.scratch = gen_scratch.reserve(B * Vv);
    sa.penalized_stride = stride;
    sa.greedy = o.greedy;
    sa.temperature = static_cast<float>(o.temperature);
    sa.top_k = o.top_k;
    sa.top_p = static_cast<float>(o.top_p);
    sa.repetition_penalty = static_cast<float>(o.repetition_penalty);
    sa.tokens = gen_tokens_out.reserve(B);
    sa.logprobs = gen_logprobs_out.reserve(B);
    sa.status = gen_status.reserve(B);
    if (!penalize) {  // ids are never read: no uploads per step
      sa.penalized = gen_penalized.upload(penalized.data(), B);
      sa.penalized_count = gen_penalized_count.upload(no_penalty.data(), B);
      sa.penalized_stride = 0;
    }

    // A decoding step's activations: one block's worth for B rows, shared by the blocks
    // (as in an unretained forward), then the final LayerNorm's statistics.
    float* step_x = gen_step.reserve(B * c + block_floats(B, 1, false) + 2 * B);
    float* carve_from = step_x + B * c;
    const BlockActs step = carve_block(carve_from, B, 1, false);
    float* step_mean = carve_from;
    float* step_rstd = carve_from + B;

    for (int64_t s = 0; s < o.max_new_tokens; ++s) {
      // Logits of every row, then sample the active ones.
      linear_forward(*ops, B, c, Vv, hidden, P + head_offset(), nullptr, logits);
      if (!o.greedy)
        for (int64_t b = 0; b < B; ++b)
          if (active[b]) uniforms[b] = rngs[b].uniform();
      if (penalize) {
        sa.penalized = gen_penalized.upload(penalized.data(), B * stride);
        sa.penalized_count = gen_penalized_count.upload(penalized_count.data(), B);
      }
      sa.active = gen_active.upload(active.data(), B);
      sa.uniforms = gen_uniforms.upload(uniforms.data(), B);
      ops->sample_tokens(sa);
      ops->copy_to_host(status.data(), sa.status, sizeof(int32_t) * B);
      ops->copy_to_host(chosen.data(), sa.tokens, sizeof(int32_t) * B);
      ops->copy_to_host(chosen_logprobs.data(), sa.logprobs, sizeof(float) * B);
      bool any = false;
      for (int64_t b = 0; b < B; ++b) {
        if (!active[b]) continue;
        if (status[b] == 1)  // NaN, +inf or all -inf in the row: the model's own output
          throw Error(ErrorCode::NonFinite,
                      "the model produced non-finite logits while generating (row " + std::to_string(b) +
                          "): NaN or +inf, or every logit -inf after the repetition penalty",
                      "params");
        if (status[b] == 2)
          throw Error(ErrorCode::NonFinite,
                      "a logit of row " + std::to_string(b) + " / repetition_penalty overflows to +inf",
                      "repetition_penalty");
        const int32_t tok = chosen[b];
        out.tokens[b * o.max_new_tokens + s] = tok;
        out.logprobs[b * o.max_new_tokens + s] = chosen_logprobs[b];
        out.lengths[b] = static_cast<int32_t>(s + 1);
        if (penalize) penalized[b * stride + penalized_count[b]++] = tok;
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
      const int32_t* pos_d = gen_positions.upload(cur_pos.data(), B);
      ops->embedding_forward(B, c, gen_next.upload(next.data(), B), pos_d, P + layout.wte, param(layout.wpe), step_x);
      const float* x = step_x;
      for (int64_t l = 0; l < L; ++l) {
        float* k_cache = kv + 2 * l * layer_cache;
        block_forward(l, B, x, pos_d, step, [&](const float* qkv, float* atty) {
          ops->attention_decode(B, H, KVH(), hs(), pos_d, qkv, cache_T, k_cache, k_cache + layer_cache, atty);
        });
        x = step.x3;
      }
      final_layernorm(B, x, hidden, step_mean, step_rstd);
    }
    return out;
  }
};

// ---- Model ----------------------------------------------------------------------------------

Model::Model(const ModelConfig& config, uint64_t seed, const ModelOptions& options) : impl_(new Impl) {
  // Initialized on the host (the same numbers on every device), then uploaded.
  const ParameterLayout layout = parameter_layout(config);
  std::vector<float> p(static_cast<size_t>(layout.total), 0.0f);
  const double residual_std = 0.02 / std::sqrt(2.0 * static_cast<double>(config.n_layer));
  uint64_t stream = 0;
  for (const ParamTensor& t : layout.tensors) {
    // One random stream per tensor: a tensor's values do not depend on the others.
    Rng rng(seed, stream++);
    float* w = p.data() + t.offset;
    if (t.kind == ParamKind::Bias) continue;  // zeros
    if (t.kind == ParamKind::Norm) {
      const bool is_weight = t.name.size() >= 6 && t.name.compare(t.name.size() - 6, 6, "weight") == 0;
      std::fill(w, w + t.numel, is_weight ? 1.0f : 0.0f);
      continue;
    }
    // The projections back into the residual stream: GPT-2's c_proj, Llama's o_proj and down_proj.
    const bool residual_proj = t.name.find("c_proj.weight") != std::string::npos ||
                               t.name.find("o_proj.weight") != std::string::npos ||
                               t.name.find("down_proj.weight") != std::string::npos;
    const double sigma = residual_proj ? residual_std : 0.02;
    fill_normal(rng, w, t.numel, sigma);
  }
  impl_->init(config, options, p);
}

Model::Model(const ModelConfig& config, std::vector<float> params, const ModelOptions& options)
    : impl_(new Impl) {
  impl_->init(config, options, params);
}

Model::~Model() = default;

const ModelConfig& Model::config() const { return impl_->cfg; }
const ParameterLayout& Model::layout() const { return impl_->layout; }
int64_t Model::parameter_count() const { return impl_->layout.total; }
bool Model::trainable() const { return impl_->options.trainable; }
Device Model::device() const { return impl_->ops->device; }
const float* Model::params() const { return impl_->params_view(); }
float* Model::mutable_params() { return impl_->mutable_params_view(); }
const float* Model::grads() const { return impl_->host_view(impl_->grads, impl_->grads_host); }

ForwardResult Model::forward(const TokenBatch& batch, const ForwardRequest& request) {
  return impl_->forward(batch, request);
}
void Model::backward(const BackwardRequest& request) { impl_->backward(request); }
void Model::zero_grad() {
  if (impl_->grads.capacity() > 0) impl_->grads.reserve_zeroed(impl_->layout.total);
}
double Model::grad_norm() const { return impl_->grad_norm(); }
StepResult Model::step(const AdamWOptions& options) { return impl_->step(options); }
int64_t Model::optimizer_steps() const { return impl_->adam_steps; }
const float* Model::optimizer_m() const { return impl_->host_view(impl_->adam_m, impl_->adam_m_host); }
const float* Model::optimizer_v() const { return impl_->host_view(impl_->adam_v, impl_->adam_v_host); }

void Model::set_optimizer_state(const float* m, const float* v, int64_t steps) {
  require(impl_->options.trainable, ErrorCode::InvalidArgument,
          "set_optimizer_state: this model is frozen (trainable: false)", "model");
  require(steps >= 0, ErrorCode::InvalidArgument, "optimizer steps must be >= 0", "steps");
  require((m == nullptr) == (v == nullptr), ErrorCode::InvalidArgument,
          "set_optimizer_state: give both moments or neither", "optimizer");
  const int64_t n = impl_->layout.total;
  if (m == nullptr) {
    impl_->adam_m.release();
    impl_->adam_v.release();
  } else {
    for (int64_t i = 0; i < n; ++i) {
      require(std::isfinite(m[i]) && std::isfinite(v[i]) && v[i] >= 0.0f, ErrorCode::NonFinite,
              "optimizer state: moment " + std::to_string(i) + " is not finite (or v < 0)", "optimizer");
    }
    impl_->adam_m.upload(m, n);
    impl_->adam_v.upload(v, n);
  }
  impl_->adam_steps = steps;
}

Model::Memory Model::estimate_memory(const ModelConfig& config, bool trainable, int64_t batch, int64_t steps,
                                     int64_t generate_batch, int64_t generate_steps, Device device) {
  const int64_t f = sizeof(float);
  const int64_t P = parameter_layout(config).total;
  const int64_t c = config.n_embd, L = config.n_layer, Vv = config.vocab_size, H = config.n_head;
  const int64_t qkv_w = (H + 2 * config.kv_heads()) * config.head_size();
  const int64_t fc_w = config.is_llama() ? 2 * config.intermediate_size : 4 * c;
  const int64_t act_w = config.is_llama() ? config.intermediate_size : 4 * c;
  const int64_t kv_w = config.kv_heads() * config.head_size();
  auto block = [&](int64_t B, int64_t T, bool att) {
    const int64_t N = B * T;
    // What attention saves for backward: the probabilities on the CPU, a log-sum-exp per
    // query row on CUDA (engine_ops.h's attention_saved_floats).
    const int64_t saved = device == Device::Cuda ? B * H * T : B * H * T * T;
    return N * (c + qkv_w + c + c + c + fc_w + act_w + c) + 4 * N + (att ? saved : 0);
  };
  auto arena = [&](int64_t B, int64_t T, bool retain) {
    const int64_t N = B * T;
    return N * c + (retain ? L : 1) * block(B, T, retain) + N * c + 2 * N;
  };
  int64_t acts = std::max(arena(batch, steps, trainable), arena(generate_batch, generate_steps, false));
  const int64_t N = batch * steps;
  const int64_t chunk = std::min<int64_t>(kHeadChunk, std::max<int64_t>(N, 1));
  acts += chunk * Vv + 2 * chunk * c;  // the LM head's chunk scratch
  if (trainable) acts += N * Vv + N * (c + c + act_w + fc_w + qkv_w + c);  // retained head logits, backward scratch
  return {P * f, trainable ? P * f : 0, trainable ? 2 * P * f : 0, acts * f,
          2 * L * generate_batch * generate_steps * kv_w * f};
}
GenerateResult Model::generate(const TokenBatch& prompts, const GenerateOptions& options) {
  return impl_->generate(prompts, options);
}

void Model::snapshot_state() {
  Impl& m = *impl_;
  m.upload_params_written_on_host();
  const size_t bytes = sizeof(float) * static_cast<size_t>(m.layout.total);
  m.ops->copy_within(m.snap_params.reserve(m.layout.total), m.params.get(), bytes);
  m.snap_has_moments = m.adam_m.capacity() > 0;
  if (m.snap_has_moments) {
    m.ops->copy_within(m.snap_m.reserve(m.layout.total), m.adam_m.get(), bytes);
    m.ops->copy_within(m.snap_v.reserve(m.layout.total), m.adam_v.get(), bytes);
  }
  m.snap_steps = m.adam_steps;
  m.ops->synchronize();
  m.has_snapshot = true;
}

void Model::restore_state() {
  Impl& m = *impl_;
  require(m.has_snapshot, ErrorCode::InvalidArgument, "restore_state: no snapshot_state() was taken", "snapshot");
  const size_t bytes = sizeof(float) * static_cast<size_t>(m.layout.total);
  m.ops->copy_within(m.params.get(), m.snap_params.get(), bytes);
  if (m.snap_has_moments) {
    m.ops->copy_within(m.adam_m.reserve(m.layout.total), m.snap_m.get(), bytes);
    m.ops->copy_within(m.adam_v.reserve(m.layout.total), m.snap_v.get(), bytes);
  } else {
    m.adam_m.release();
    m.adam_v.release();
  }
  m.adam_steps = m.snap_steps;
  m.ops->synchronize();
  m.params_host_valid = false;
  m.params_host_newer = false;
}

Model::Memory Model::memory() const {
  const Impl& m = *impl_;
  int64_t activations = 0;
  for (const DeviceArray<float>* a :
       {&m.arena, &m.r_head_logits, &m.bw_dres, &m.bw_dlnf, &m.bw_dfchg, &m.bw_dfch, &m.bw_dqkv, &m.bw_dsmall,
        &m.head_scratch, &m.head_hs, &m.head_dhs, &m.head_lp, &m.head_ent, &m.row_grads, &m.row_grads2,
        &m.out_staging, &m.gen_hidden, &m.gen_logits, &m.gen_scratch, &m.gen_step, &m.gen_logprobs_out})
    activations += a->bytes();
  for (const DeviceArray<int32_t>* a :
       {&m.d_tokens, &m.d_positions, &m.d_lengths, &m.d_target_tokens, &m.gen_penalized, &m.gen_penalized_count,
        &m.gen_active, &m.gen_next, &m.gen_positions, &m.gen_tokens_out, &m.gen_status})
    activations += a->bytes();
  activations += m.d_head_rows.bytes() + m.gen_rows.bytes() + m.gen_uniforms.bytes();
  return {m.params.bytes(), m.grads.bytes(),
          m.adam_m.bytes() + m.adam_v.bytes() + m.snap_params.bytes() + m.snap_m.bytes() + m.snap_v.bytes(),
          activations, m.kv_cache.bytes()};
}

}  // namespace ppo::model
