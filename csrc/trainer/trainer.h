// The trainers: SFT, the reward model and PPO-max (../shared/ppo-max.md), each step one
// native call over engine models (model/gpt.h). No Node headers here: the addon
// (addon/trainer_bindings.cpp), the C++ tests and C++ users call these directly.
//
// Conventions shared by all trainers:
//   - sequences are [batch, steps] right-padded TokenBatches (model/gpt.h);
//   - a "target mask" [batch, steps] of 0/1 selects the positions t (1 <= t < length)
//     whose token is predicted by a loss (the response tokens);
//   - a step that meets a NaN or an infinity (loss, score, gradient norm) is skipped:
//     the gradients are discarded, the models and optimizers are left untouched, and
//     the result says `skipped` with the reason. Bad arguments throw ppo::Error.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/op_args.h"
#include "model/gpt.h"

namespace ppo::trainer {

using model::Model;
using model::TokenBatch;

// ---- optimizer and learning-rate schedule ---------------------------------------------------
enum class Schedule {
  Constant,            // lr at every step
  WarmupInverseSqrt,   // the recipe's: lr * s / W for s <= W, then lr * sqrt(W / s)
  WarmupLinearDecay,   // lr * s / W for s <= W, then linearly to 0 at total_steps
};

struct OptimizerOptions {
  double lr = 1e-4;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.0;
  Schedule schedule = Schedule::Constant;
  int64_t warmup_steps = 0;  // W; 0 = no warmup (WarmupInverseSqrt then decays as lr / sqrt(s))
  int64_t total_steps = 0;   // for WarmupLinearDecay (> W)
  double max_grad_norm = 0;  // > 0: global gradient-norm clipping of this model
};

// The learning rate of optimizer step s (1-based: the step about to be taken).
double scheduled_lr(const OptimizerOptions& o, int64_t s);
// Validates o (throws InvalidArgument naming `what`.field).
void check_optimizer(const OptimizerOptions& o, const std::string& what);

// A copy of a model's trainable state (parameters, AdamW moments and step count), for
// skipping a step that turned non-finite halfway and for checkpoints.
struct ModelSnapshot {
  std::vector<float> params, adam_m, adam_v;  // m/v empty when no step was ever taken
  int64_t adam_steps = 0;
};
ModelSnapshot take_snapshot(const Model& m);
void restore_snapshot(Model& m, const ModelSnapshot& s);

// Named statistics in a fixed order (they become a JS object).
using Stats = std::vector<std::pair<std::string, double>>;

// Called with (stage, done, total) during long calls; may be empty.
using Progress = std::function<void(const char* stage, int64_t done, int64_t total)>;

// ---- SFT ------------------------------------------------------------------------------------
// One optimizer step of the masked LM loss over `batch` (mean over all target positions
// of the whole batch), run in micro-batches of `micro_batch` rows (0: all at once)
// whose gradients add up to the full batch's.
// Stats: loss, tokens, grad_norm, clipped, lr, step, skipped.
Stats sft_step(Model& model, const TokenBatch& batch, const float* target_mask, int64_t micro_batch,
               const OptimizerOptions& optimizer);
// The masked LM loss and perplexity with no gradient (evaluation). Stats: loss, tokens, perplexity.
Stats lm_eval(Model& model, const TokenBatch& batch, const float* target_mask, int64_t micro_batch);

// ---- reward model ---------------------------------------------------------------------------
// Pairs (prompt + chosen, prompt + rejected): the score of a sequence is the value head at
// its last token. Loss = -mean log sigmoid(r_chosen - r_rejected) + lm_coef * (the LM
// cross-entropy of the chosen sequences at chosen_target_mask).
struct PairBatch {
  TokenBatch chosen, rejected;               // the same batch size
  const float* chosen_target_mask = nullptr; // [chosen.batch, chosen.steps] or nullptr (all)
};
// Stats: loss, ranking_loss, lm_loss, accuracy, margin (mean r_c - r_r), chosen_score,
// rejected_score, grad_norm, clipped, lr, step, skipped.
Stats reward_model_step(Model& model, const PairBatch& pairs, double lm_coef, int64_t micro_batch_pairs,
                        const OptimizerOptions& optimizer);
// No gradient. Stats: ranking_loss, accuracy, margin, chosen_score, rejected_score, pairs.
// chosen_scores/rejected_scores (optional) receive the per-pair scores.
Stats reward_model_eval(Model& model, const PairBatch& pairs, int64_t micro_batch_pairs,
                        std::vector<float>* chosen_scores = nullptr,
                        std::vector<float>* rejected_scores = nullptr);
// The value head at the last token of each row: out[b] = values[b, length_b - 1].
std::vector<float> score_sequences(Model& model, const TokenBatch& batch, int64_t micro_batch);

// ---- PPO ------------------------------------------------------------------------------------
struct PpoOptions {
  // rollout (ppo-max.md step 1)
  int64_t max_new_tokens = 32;
  double temperature = 0.8, top_p = 0.9, repetition_penalty = 1.1;
  int64_t top_k = 0;
  std::vector<int32_t> stop_tokens;  // empty: the policy's eos token
  // reward (steps 3 and 5)
  double kl_coef = 0.05;
  KlEstimator kl_estimator = KlEstimator::K1;
  double kl_target = 0.0;     // > 0: the adaptive controller (Ziegler et al.), starting at kl_coef
  double kl_horizon = 10000;  // samples
  bool reward_norm = true, reward_scaling = false;
  double reward_clip = 0.8;   // 0: off
  // GAE (step 6)
  double gamma = 1.0, lambda = 0.9;
  // update (step 7)
  bool advantage_norm = false;
  double advantage_clip = 0.0;  // 0: off
  double policy_clip = 0.2;
  double value_clip = 0.2;      // 0: off
  double value_loss_coef = 1.0, entropy_coef = 0.0;
  double ptx_coef = 0.0, ptx_batch_ratio = 1.0;
  int64_t mini_batch_size = 32, ppo_epochs = 1;
  int64_t forward_batch_size = 0;  // rows per generation/evaluation chunk (0: all at once)
  OptimizerOptions policy_optimizer, critic_optimizer;
  uint64_t seed = 0;
};
void check_ppo_options(const PpoOptions& o);

// One buffer of experience. [B, T] arrays are aligned with the sequence tokens: at a
// response token t (mask 1), logprobs[b, t] = log pi(tokens[b, t] | tokens[b, < t]) and
// values[b, t] = V(s_t), the critic's value of the state BEFORE token t (the critic's
// output at position t - 1). Everything is 0 where mask is 0.
struct Experience {
  int64_t batch = 0, steps = 0;
  std::vector<int32_t> tokens;            // [B, T] prompt then response, right-padded (-1... any)
  std::vector<int32_t> lengths;           // [B] prompt + response
  std::vector<int32_t> prompt_lengths;    // [B]
  std::vector<int32_t> response_lengths;  // [B] >= 1
  std::vector<uint8_t> truncated;         // [B] 1: hit max_new_tokens without a stop token
  std::vector<float> mask;                // [B, T] 1 at response tokens
  std::vector<float> logprobs, ref_logprobs, entropy, values;  // [B, T] (rollout time)
  std::vector<float> scores;              // [B] raw reward (the reward model or the caller's)
  std::vector<float> normalized_scores;   // [B] after norm / scaling / clip
  std::vector<float> rewards, kl, advantages, returns;  // [B, T]
  bool scored = false, shaped = false;
};
// Checks the internal consistency of an experience (sizes, masks, ranges): for buffers
// that come back from JS.
void check_experience(const Experience& e, int64_t vocab, int64_t n_positions);

// Running moments of the raw scores (equal weight, Chan's merge, Bessel std).
struct ScoreMoments {
  double count = 0, mean = 0, m2 = 0;
};

struct PpoState {
  ScoreMoments moments;
  double kl_coef = 0.0;      // the current coefficient (adaptive or fixed)
  int64_t rollouts = 0;      // rollout calls so far (seeds generation)
  int64_t updates = 0;       // update calls so far (seeds shuffling and ptx sampling)
  int64_t critic_pretrain_steps = 0;
};

class PpoTrainer {
 public:
  // policy and critic trainable; reference frozen or not (never stepped); reward may be
  // null (scores then come from the caller). All models must share the policy's
  // vocabulary; the critic (and reward model) need a value head.
  PpoTrainer(std::shared_ptr<Model> policy, std::shared_ptr<Model> reference, std::shared_ptr<Model> critic,
             std::shared_ptr<Model> reward, const PpoOptions& options);

  const PpoOptions& options() const;
  // Validated. Changing kl_coef or kl_target restarts the controller at the new kl_coef.
  void set_options(const PpoOptions& options);
  const PpoState& state() const;
  void set_state(const PpoState& state);
  // Pretraining / SFT sequences for the ptx loss ([rows, steps] + target mask), copied.
  void set_ptx_data(const TokenBatch& data, const float* target_mask);

  // Step 1 and 4: samples one response per prompt with the policy (a seed derived from
  // options.seed, state.rollouts and the chunk's first row, so the samples also depend on
  // forward_batch_size), then computes the rollout log-probs and entropy of
  // the policy, the reference log-probs and the critic's values. Increments state.rollouts.
  Experience rollout(const TokenBatch& prompts, const Progress& progress = {});
  // Step 2: the reward model's score at the last token (throws without a reward model).
  void score(Experience& e);
  // Sets externally computed scores ([B]); a non-finite score throws NonFinite naming its row.
  void set_scores(Experience& e, const float* scores);
  // Steps 3, 5 and 6: merges the scores into the running moments (when update_moments),
  // normalizes/scales/clips them, the KL-penalized rewards, GAE. Stats: see stats().
  Stats shape(Experience& e, bool update_moments = true);
  // Step 7: ppo_epochs passes over e in shuffled mini-batches; policy and critic steps.
  // Stats are means over the mini-batches: policy_loss is the clipped surrogate alone and
  // value_loss the clipped value loss before value_loss_coef.
  // When a loss or gradient turns non-finite, both models are restored as they were
  // before this call and the stats say skipped = 1. Then the adaptive KL controller.
  Stats update(const Experience& e, const Progress& progress = {});
  // rollout + score (or `scores`, when non-null, one per prompt) + shape + update; the
  // stats of all stages, with seconds per stage and tokens per second.
  // `experience`, when given, receives the step's experience (scored and shaped).
  Stats step(const TokenBatch& prompts, const Progress& progress = {}, Experience* experience = nullptr);
  Stats step_with_scores(Experience& e, const float* scores, const Progress& progress = {});

  // Step 8 on cached rollouts: `passes` passes of critic-only updates over e (values
  // re-evaluated and GAE recomputed with the current critic before each pass, value loss
  // with options.value_clip, the critic's optimizer). Stats: value_loss (of the last pass),
  // value_loss_first, explained_variance, steps, skipped.
  Stats pretrain_critic(Experience& e, int64_t passes, const Progress& progress = {});

  // Statistics of an experience alone (rewards, KL, lengths, perplexity, repetition, ...).
  Stats experience_stats(const Experience& e) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;

 public:
  ~PpoTrainer();
};

// The share of repeated 3-grams in a response (1 - distinct / total), 0 below 3 tokens.
double repeated_ngram_fraction(const int32_t* tokens, int64_t n, int64_t ngram = 3);

}  // namespace ppo::trainer
