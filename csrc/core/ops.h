// The host-level API of the RLHF kernels: what the addon, the C++ tests and C++
// users call. Every pointer here is a HOST pointer. Each function
//   1. validates shapes, options and contents (finite values, token range, 0/1 mask),
//      throwing ppo::Error that names the offending argument;
//   2. stages the data on the device's memory (a no-op on the CPU);
//   3. runs the backend's kernel and copies the outputs back.
// The math of each op is in core/op_args.h.
// When a check fails, no output has been written, with one exception: the CPU
// logprobs kernels check each logits row as they read it (saving a whole pass over
// the largest input), so bad logits may leave their outputs partly written.
#pragma once

#include "core/backend.h"
#include "core/op_args.h"

namespace ppo {

void logprobs_from_logits(Device device, const LogprobsArgs& args);
void logprobs_backward(Device device, const LogprobsBackwardArgs& args);
void kl_penalized_rewards(Device device, const KlRewardsArgs& args);
Moments batch_moments(Device device, const MomentsArgs& args);
void normalize_scores(Device device, const NormalizeScoresArgs& args);
void gae(Device device, const GaeArgs& args);
void whiten(Device device, const WhitenArgs& args);
void clip_masked(Device device, const ClipArgs& args);
PolicyLossResult policy_loss(Device device, const PolicyLossArgs& args);
ValueLossResult value_loss(Device device, const ValueLossArgs& args);

// ---- running moments (ppo-max.md step 3), pure host math ----------------------------
// Merges the moments of two disjoint sets (Chan et al.'s parallel algorithm):
// exact for any split, stable for large counts.
Moments merge_moments(const Moments& a, const Moments& b);
// Bessel-corrected standard deviation; 0 when count < 2.
double moments_std(const Moments& m);

}  // namespace ppo
