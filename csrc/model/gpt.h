// The GPT-2 engine, on the CPU or on CUDA (ModelOptions::device): forward and backward
// passes, AdamW, gradient-norm clipping, KV-cache generation and the scalar value head
// (the critic and the reward model), for batches of right-padded variable-length
// sequences. The API is the same on both devices: tokens in and requested outputs out
// are host arrays; everything else stays on the model's device.
//
// Memory (llm.c style): parameters in one flat buffer located by ParameterLayout;
// gradients and the AdamW moments in the same layout, allocated only when first needed
// (a frozen reference model never pays for them); activations in an arena sized from
// (batch, steps), grown when a larger batch comes and reused otherwise. A forward pass
// that will not be followed by backward() keeps only one block's activations.
//
// Sequences: tokens [batch, steps] row-major, each row valid on [0, lengths[b]) (right
// padding; lengths == nullptr means every row is full). Causal attention means a valid
// position never sees a padded one, so whatever sits at padded positions (any int32,
// even out of the vocabulary) never changes any result. Position ids are 0, 1, 2, ...
// from the start of each row.
//
// Alignment of the outputs, for a row of length n:
//   logits[b, t, :]  for 0 <= t < n: the prediction of the NEXT token (t + 1);
//   logprobs[b, t]   for 1 <= t < n: log p(tokens[b, t] | tokens[b, <t]) =
//                    log_softmax(logits[b, t - 1])[tokens[b, t]]; 0 at t = 0 and padding;
//   entropy[b, t]    the entropy of that same distribution (the one token t was drawn from);
//   values[b, t]     for 0 <= t < n: the value head on the final hidden state of position t.
// Every output is 0 where it is not defined (padding, t = 0 for logprobs and entropy).
//
// Thread safety: a Model is not safe to call from two threads at once; the addon queues
// calls per model. Every method throws ppo::Error (with a code and the argument's name)
// on bad input, and leaves the model unchanged when it does.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "model/config.h"
#include "model/params.h"

namespace ppo::model {

struct TokenBatch {
  int64_t batch = 0, steps = 0;
  const int32_t* tokens = nullptr;   // [batch, steps]; in [0, vocab) at valid positions
  const int32_t* lengths = nullptr;  // [batch], each in [1, steps]; nullptr: all == steps
};

// What a forward pass computes. Every output pointer may be nullptr (not computed).
struct ForwardRequest {
  float* logits = nullptr;    // out [batch, steps, vocab]
  float* logprobs = nullptr;  // out [batch, steps]
  float* entropy = nullptr;   // out [batch, steps]
  float* values = nullptr;    // out [batch, steps]; needs the value head
  // Which positions the token-level outputs (logprobs, entropy, the LM loss) are computed
  // at: [batch, steps] of 0/1, read only at 1 <= t < n; nullptr selects every such
  // position. Only these positions go through the LM head (a [positions, vocab] matrix,
  // never more), so asking for the response tokens alone costs only them. logprobs and
  // entropy are 0 at every position that is not a target.
  const float* target_mask = nullptr;
  // The masked LM cross-entropy, mean over the target positions of
  // -log p(tokens[b, t] | tokens[b, <t]) (SFT and the ptx loss).
  bool lm_loss = false;
  // Keep the activations (and the target positions' logits) for backward().
  bool retain = false;
};

struct ForwardResult {
  double lm_loss = 0.0;    // when requested; 0 when there are no target positions
  int64_t lm_tokens = 0;   // the number of target positions
};

// The upstream gradients of backward(): d loss / d (each output of the retained
// forward), each [batch, steps] of THAT forward's batch (forward copies the tokens,
// lengths and target positions that backward needs; the caller's arrays may change in
// between). Any may be nullptr (zero); only valid positions are read. Gradients
// accumulate (+=) into the model's gradient buffer, so micro-batches add up until
// zero_grad().
struct BackwardRequest {
  const float* grad_logprobs = nullptr;  // [batch, steps]; needs logprobs in the forward
  const float* grad_entropy = nullptr;   // [batch, steps]; needs entropy in the forward
  const float* grad_values = nullptr;    // [batch, steps]; needs values in the forward
  double lm_loss_scale = 0.0;            // d loss / d lm_loss; needs lm_loss in the forward
};

struct AdamWOptions {
  double lr = 1e-4;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.0;      // decoupled: p -= lr * wd * p, on Matrix and Head tensors
  bool decay_embeddings = false;  // also decay wte and wpe
  bool decay_biases_and_norms = false;
  double max_grad_norm = 0.0;     // > 0: clip the global gradient norm to this first
};

struct StepResult {
  double grad_norm = 0.0;  // the global L2 norm of the gradients before clipping
  bool clipped = false;
  int64_t step = 0;        // AdamW steps taken so far, this one included
};

struct GenerateOptions {
  int64_t max_new_tokens = 32;
  bool greedy = false;             // argmax; temperature, top-k and top-p are ignored
  double temperature = 1.0;        // > 0
  int64_t top_k = 0;               // 0: off
  double top_p = 1.0;              // in (0, 1]; 1: off
  double repetition_penalty = 1.0; // > 0; 1: off (a positive logit / p, a negative one * p)
  bool penalize_prompt = false;    // false: only tokens generated so far are penalized
  std::vector<int32_t> stop_tokens;  // generation of a row ends after one of these
  uint64_t seed = 0;
  // Called after each decoding step with (steps done, max_new_tokens); may be empty.
  std::function<void(int64_t, int64_t)> progress;
};

struct GenerateResult {
  int64_t batch = 0, max_new_tokens = 0;
  // [batch, max_new_tokens]: the new tokens of each row, then padding (-1 in tokens,
  // 0 in logprobs) after its length.
  std::vector<int32_t> tokens;
  // log p(token | prefix) under the model's own distribution (temperature 1, no
  // penalty or truncation): what forward() gives for the same tokens.
  std::vector<float> logprobs;
  std::vector<int32_t> lengths;  // [batch] new tokens per row (a stop token counts)
  std::vector<uint8_t> stopped;  // [batch] 1 when the row ended with a stop token
};

struct ModelOptions {
  Device device = Device::Cpu;
  // false: a frozen model (the reference, the reward model): backward() and step()
  // are refused and no gradient or optimizer memory is ever allocated.
  bool trainable = true;
};

class Model {
 public:
  // A new model with GPT-2's initialization: weights N(0, 0.02), the residual
  // projections (attn.c_proj, mlp.c_proj) N(0, 0.02 / sqrt(2 n_layer)), biases 0,
  // LayerNorm weights 1, the value head N(0, 0.02). Same seed, same weights.
  Model(const ModelConfig& config, uint64_t seed, const ModelOptions& options = {});
  // A model whose parameters are read from a checkpoint by the caller (checkpoint.h).
  Model(const ModelConfig& config, std::vector<float> params, const ModelOptions& options = {});
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const;
  const ParameterLayout& layout() const;
  int64_t parameter_count() const;
  bool trainable() const;

  Device device() const;

  // Host views of the model's state. On the CPU they are the buffers themselves; on CUDA
  // each call copies the device's values to a host buffer the model owns (valid until
  // the next call of the same method), so ask only when needed. Parameters written
  // through mutable_params() are uploaded before the next pass (forward, backward,
  // step, generate) on either device.
  const float* params() const;
  float* mutable_params();
  // The gradient buffer (nullptr until the first backward()).
  const float* grads() const;

  ForwardResult forward(const TokenBatch& batch, const ForwardRequest& request);
  // Backpropagates through the last forward(..., retain = true); throws InvalidArgument
  // when there is none, or when a gradient asks for an output that forward did not compute.
  // A later forward (retained or not) or generate() that passes validation discards the
  // retained one; one that is refused leaves it in place.
  // The retained activations stay valid: backward() may be called again (gradients add).
  void backward(const BackwardRequest& request);

  void zero_grad();
  // The global L2 norm of the gradient buffer (0 before any backward).
  double grad_norm() const;
  // Optionally clips the gradients to max_grad_norm, then one AdamW step.
  StepResult step(const AdamWOptions& options);
  int64_t optimizer_steps() const;
  // The AdamW moments ([parameter_count] each; nullptr before the first step).
  const float* optimizer_m() const;
  const float* optimizer_v() const;
  // Replaces the optimizer state (resuming a run): m and v of [parameter_count] floats
  // (both nullptr: no moments, as before a first step) and the steps taken so far.
  void set_optimizer_state(const float* m, const float* v, int64_t steps);

  GenerateResult generate(const TokenBatch& prompts, const GenerateOptions& options);

  // An undo point kept on the model's device: snapshot_state() copies the parameters and
  // the AdamW state (moments and step count) aside without a trip through the host (on
  // CUDA a device-to-device copy); restore_state() puts them back (InvalidArgument when no
  // snapshot was taken). The PPO trainer takes one per update to undo a non-finite one.
  // Its bytes count under Memory::optimizer.
  void snapshot_state();
  void restore_state();

  // Bytes held: parameters, gradients, optimizer moments, activations, KV cache.
  struct Memory { int64_t params, grads, optimizer, activations, kv_cache; };
  Memory memory() const;
  // What a model of `config` will hold when it trains on batches of up to
  // [batch, steps] (retained forward and backward when trainable) and generates
  // [generate_batch] rows of up to generate_steps positions: before allocating anything.
  // On `device` (what attention keeps for backward differs).
  static Memory estimate_memory(const ModelConfig& config, bool trainable, int64_t batch, int64_t steps,
                                int64_t generate_batch, int64_t generate_steps,
                                Device device = Device::Cpu);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ppo::model
