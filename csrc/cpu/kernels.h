// The CPU backend's op implementations (one file per op family, same names as cuda/).
#pragma once

#include "core/op_args.h"

namespace ppo::cpu {

// logprobs.cpp
void logprobs_forward(const LogprobsArgs& args);
void logprobs_backward(const LogprobsBackwardArgs& args);
// rewards.cpp
void kl_penalized_rewards(const KlRewardsArgs& args);
Moments moments(const MomentsArgs& args);
void normalize_scores(const NormalizeScoresArgs& args);
// advantages.cpp
void gae(const GaeArgs& args);
void whiten(const WhitenArgs& args);
void clip_masked(const ClipArgs& args);
// losses.cpp
PolicyLossResult policy_loss(const PolicyLossArgs& args);
ValueLossResult value_loss(const ValueLossArgs& args);

}  // namespace ppo::cpu
