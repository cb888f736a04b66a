// The CPU backend's op implementations (one file per op family, same names as cuda/).
#pragma once

#include "core/op_args.h"

#include <cstddef>

namespace ppo::cpu {

// backend.cpp: host memory for both CPU tables (the RLHF kernels' and the engine's).
// host_alloc throws ppo::Error(OutOfMemory); host_copy allows overlap (memmove).
void* host_alloc(size_t bytes);
void host_free(void* ptr) noexcept;
void host_copy(void* dst, const void* src, size_t bytes);

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
