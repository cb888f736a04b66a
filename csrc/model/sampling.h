// Sampling the next token from a row of logits: the logits processors of generation
// (repetition penalty, temperature, top-k, top-p) and a seeded random generator whose
// streams make results independent of threads and batch composition.
#pragma once

#include <cstdint>

namespace ppo::model {

// A small, fast, seedable generator (splitmix64 seeding a xoshiro256** state). Each
// sequence of a batch gets its own stream: Rng(seed, stream = row index).
// Seeding: x = seed ^ fmix64(stream) (MurmurHash3's 64-bit finalizer, a bijection that
// scatters nearby stream numbers; fmix64(0) = 0), then the state is four successive
// splitmix64(x) outputs. So streams of one seed start from unrelated states, and the
// same (seed, stream) gives the same sequence on every platform.
class Rng {
 public:
  Rng(uint64_t seed, uint64_t stream);
  uint64_t next_u64();  // xoshiro256**
  double uniform();  // in [0, 1), 53 random bits: (next_u64() >> 11) * 2^-53
 private:
  uint64_t s_[4];
};

struct SamplingParams {
  bool greedy = false;              // argmax of the (penalized) logits
  float temperature = 1.0f;         // > 0
  int64_t top_k = 0;                // keep the k largest (0: off)
  float top_p = 1.0f;               // keep the smallest set of top tokens whose probability
                                    // reaches top_p; the top token always (1: off)
  float repetition_penalty = 1.0f;  // 1: off
};

// Processes one row of logits [vocab] IN PLACE, in this order (the recipe's):
//   1. repetition penalty over the distinct ids in penalized[0..n_penalized): a positive
//      logit is divided by the penalty, a negative one multiplied (each id once, however
//      often it occurs);
//   2. greedy: return the argmax (lowest id on ties);
//   3. temperature; 4. top-k (the k largest logits, ties: lower id first); 5. top-p
//      (nucleus, on the temperature-scaled softmax of what top-k kept: the smallest set
//      of top tokens whose probability reaches top_p, always at least the top token);
//   6. sample from what remains with one rng.uniform() draw u, by inverse CDF (the first
//      token whose cumulative probability exceeds u) over the kept tokens in
//      descending-probability order (ties: lower id first) - or, when neither top-k nor
//      top-p is on (top_k == 0 or >= vocab, and top_p == 1), over the ids in ascending
//      order (the same distribution, without a sort of the vocabulary).
// Tokens are ranked by their (penalized) logits. -inf logits are never chosen (nor are
// finite logits whose probability underflows float, below ~1e-38 of the top one).
// A non-greedy call takes exactly one rng.uniform() draw, a greedy call none.
// On return logits holds the penalized logits (step 1); scratch must hold 2 * vocab
// floats and is clobbered. Cost: O(vocab) without truncation; top-k adds O(k log k) for
// rows where few ids displace the running k-th best (O(vocab log k) at worst); top-p
// alone adds a sort of the nucleus plus the rest of its quarter-temperature bin.
// Returns the chosen token id. Throws ppo::Error:
//   InvalidArgument naming "vocab" (< 1 or >= 2^31), "logits", "scratch" (null),
//     "n_penalized" (< 0), "penalized" (null with n_penalized > 0), "temperature" (not
//     finite and > 0, checked even when greedy), "top_k" (< 0), "top_p" (outside (0, 1]),
//     "repetition_penalty" (not finite and > 0);
//   OutOfRange naming "penalized" for an id outside [0, vocab);
//   NonFinite naming "logits" if the row holds NaN or +inf, or when every logit is -inf
//     (after the penalty), or naming "repetition_penalty" when dividing a logit by it
//     overflows to +inf (a penalty < 1). The rng is not advanced when it throws.
int32_t sample_token(float* logits, int64_t vocab, const SamplingParams& params,
                     const int32_t* penalized, int64_t n_penalized, Rng& rng, float* scratch);

// The same with the draw u in [0, 1) given (ignored when greedy): what a device kernel
// reproduces from a draw made on the host, and what generate() runs on the CPU, so the
// CPU and CUDA paths take their draws the same way. Throws as sample_token, plus
// InvalidArgument naming "u" outside [0, 1).
int32_t sample_token_with_draw(float* logits, int64_t vocab, const SamplingParams& params,
                               const int32_t* penalized, int64_t n_penalized, double u,
                               float* scratch);

}  // namespace ppo::model
