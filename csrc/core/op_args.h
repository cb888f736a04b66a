// Argument structs of the RLHF kernels: the contract every backend implements.
//
// Layout: a batch of variable-length sequences is stored as [batch, steps] row-major
// (index b * steps + t). `mask` is [batch, steps] of 0.0f / 1.0f (1 = a real token,
// 0 = padding); nullptr means every position is valid. Outputs at masked positions
// are written as 0 unless stated otherwise, so no output element is left unwritten.
//
// All pointers live in the memory of the backend that runs the op (host memory for
// the CPU backend, device memory for CUDA). Contents have already been validated by
// core/ops.cpp: backends may assume finite inputs, tokens in range and a 0/1 mask.
// Reductions across positions (moments, whitening, losses) accumulate in double in a
// fixed order, so results do not depend on the thread count. Sums over the vocabulary
// use float partials (blocks of 256 on the CPU, a fixed tree on CUDA) combined in a
// fixed order: deterministic, ~1e-6 relative. Token ids at masked positions are never read.
#pragma once

#include <cstdint>

namespace ppo {

// ---- log-probs and entropy --------------------------------------------------------
// logprobs[b,t] = log_softmax(logits[b,t,:] / temperature)[tokens[b,t]]
// entropy[b,t]  = -sum_v p_v log p_v with p = softmax(logits[b,t,:] / temperature)
// logits may hold -inf (banned tokens); never NaN or +inf.
struct LogprobsArgs {
  int64_t batch = 0, steps = 0, vocab = 0;
  const float* logits = nullptr;    // [batch, steps, vocab]
  const int32_t* tokens = nullptr;  // [batch, steps], in [0, vocab) where mask is 1
  const float* mask = nullptr;      // [batch, steps] or nullptr
  float temperature = 1.0f;         // > 0
  float* logprobs = nullptr;        // out [batch, steps]
  float* entropy = nullptr;         // out [batch, steps], or nullptr to skip
};

// grad_logits[b,t,v] = d(sum grad_logprobs * logprobs + sum grad_entropy * entropy)
//                      / d logits[b,t,v]
//   = (grad_logprobs[b,t] * ([v == token] - p_v)
//      - grad_entropy[b,t] * p_v * (log p_v + H)) / temperature
// and 0 on masked rows. Either gradient may be nullptr (treated as zeros).
struct LogprobsBackwardArgs {
  int64_t batch = 0, steps = 0, vocab = 0;
  const float* logits = nullptr;         // [batch, steps, vocab]
  const int32_t* tokens = nullptr;       // [batch, steps]
  const float* mask = nullptr;           // [batch, steps] or nullptr
  float temperature = 1.0f;
  const float* grad_logprobs = nullptr;  // [batch, steps] or nullptr
  const float* grad_entropy = nullptr;   // [batch, steps] or nullptr
  float* grad_logits = nullptr;          // out [batch, steps, vocab]
};

// ---- token-level KL-penalized reward (ppo-max.md step 5) ---------------------------
// d = logprobs - ref_logprobs;  k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d
// kl[b,t]      = k(d)                                   (0 where masked)
// rewards[b,t] = -kl_coef * kl[b,t] + [t == last valid t of row b] * scores[b]
// A row with no valid position gets all zeros (its score is dropped).
enum class KlEstimator { K1 = 1, K2 = 2, K3 = 3 };

struct KlRewardsArgs {
  int64_t batch = 0, steps = 0;
  const float* logprobs = nullptr;      // [batch, steps]
  const float* ref_logprobs = nullptr;  // [batch, steps]
  const float* scores = nullptr;        // [batch]
  const float* mask = nullptr;          // [batch, steps] or nullptr
  float kl_coef = 0.0f;
  KlEstimator estimator = KlEstimator::K1;
  float* rewards = nullptr;             // out [batch, steps]
  float* kl = nullptr;                  // out [batch, steps], or nullptr to skip
};

// ---- moments of a vector (for RunningMoments) --------------------------------------
// count = n, mean = sum x / n, m2 = sum (x - mean)^2 (two-pass, in double).
struct MomentsArgs {
  int64_t count = 0;
  const float* values = nullptr;  // [count]
};
struct Moments {
  double count = 0.0, mean = 0.0, m2 = 0.0;
};

// out[i] = clip((values[i] - (subtract_mean ? mean : 0)) / (std + eps), -clip, clip)
// with clip == 0 meaning no clipping (negative clip is rejected).
struct NormalizeScoresArgs {
  int64_t count = 0;
  const float* values = nullptr;  // [count]
  double mean = 0.0, std = 1.0;
  bool subtract_mean = true;
  float eps = 1e-8f;
  float clip = 0.0f;
  float* out = nullptr;           // [count]
};

// ---- generalized advantage estimation (ppo-max.md step 6) -------------------------
// Over the valid positions of each row, in order (t1 < t2 < ... < tn):
//   delta_i = r_i + gamma * V_{i+1} - V_i   with V_{n+1} = 0 (the state after the
//                                           last valid token is terminal)
//   A_i = delta_i + gamma * lambda * A_{i+1}, A_{n+1} = 0;  returns_i = A_i + V_i
// Masked positions get 0 in both outputs. Recursion in double.
struct GaeArgs {
  int64_t batch = 0, steps = 0;
  const float* rewards = nullptr;  // [batch, steps]
  const float* values = nullptr;   // [batch, steps]
  const float* mask = nullptr;     // [batch, steps] or nullptr
  float gamma = 1.0f, lambda = 0.95f;  // both in [0, 1]
  float* advantages = nullptr;     // out [batch, steps]
  float* returns = nullptr;        // out [batch, steps]
};

// ---- masked whitening and clipping (ppo-max.md step 7) -----------------------------
// Over all valid positions of the batch: n valid, mean = sum x / n,
// var = sum (x - mean)^2 / (n - 1) (Bessel; 0 when n < 2).
// out = (x - mean) / sqrt(var + eps) (+ mean when !shift_mean), then clipped to
// [-clip, clip] when clip > 0 (0: no clipping; negative is rejected). Masked positions (and every position when n == 0) get 0.
struct WhitenArgs {
  int64_t batch = 0, steps = 0;
  const float* values = nullptr;  // [batch, steps]
  const float* mask = nullptr;    // [batch, steps] or nullptr
  bool shift_mean = true;
  float eps = 1e-8f;
  float clip = 0.0f;
  float* out = nullptr;           // out [batch, steps]
};

// out = clip(values, -clip, clip) at valid positions, 0 at masked ones. clip > 0.
struct ClipArgs {
  int64_t batch = 0, steps = 0;
  const float* values = nullptr;
  const float* mask = nullptr;
  float clip = 0.0f;
  float* out = nullptr;
};

// ---- clipped surrogate policy loss (ppo-max.md step 7) -----------------------------
// With N valid tokens, ratio = exp(logprobs - old_logprobs):
//   loss         = (1/N) sum max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))
//   grad[b,t]    = d loss / d logprobs[b,t] = -A ratio / N where the unclipped term
//                  is the max (-A ratio >= -A clip(ratio)), else 0; 0 where masked
//   clip_fraction = (1/N) #{ -A clip(ratio) > -A ratio }
//   approx_kl     = (1/N) sum (ratio - 1) - log ratio
// N == 0 gives all zeros.
struct PolicyLossArgs {
  int64_t batch = 0, steps = 0;
  const float* logprobs = nullptr;      // [batch, steps] (new policy)
  const float* old_logprobs = nullptr;  // [batch, steps] (rollout policy)
  const float* advantages = nullptr;    // [batch, steps]
  const float* mask = nullptr;          // [batch, steps] or nullptr
  float clip_eps = 0.2f;                // > 0
  float* grad_logprobs = nullptr;       // out [batch, steps], or nullptr to skip
};
struct PolicyLossResult {
  double loss = 0.0, clip_fraction = 0.0, approx_kl = 0.0;
  int64_t tokens = 0;
};

// ---- clipped value loss (ppo-max.md step 7) ----------------------------------------
// With N valid tokens, vc = clip(values, old_values - eps, old_values + eps):
//   loss          = (1/N) sum 0.5 * max((V - R)^2, (vc - R)^2)   (no clip: (V - R)^2)
//   grad[b,t]     = (V - R) / N where (V - R)^2 >= (vc - R)^2, else 0; 0 where masked
//   clip_fraction = (1/N) #{ (vc - R)^2 > (V - R)^2 }   (0 without clipping)
struct ValueLossArgs {
  int64_t batch = 0, steps = 0;
  const float* values = nullptr;      // [batch, steps] (new critic)
  const float* old_values = nullptr;  // [batch, steps] (at rollout)
  const float* returns = nullptr;     // [batch, steps]
  const float* mask = nullptr;        // [batch, steps] or nullptr
  bool use_clip = true;
  float clip_eps = 0.2f;              // > 0 when use_clip
  float* grad_values = nullptr;       // out [batch, steps], or nullptr to skip
};
struct ValueLossResult {
  double loss = 0.0, clip_fraction = 0.0;
  int64_t tokens = 0;
};

}  // namespace ppo
