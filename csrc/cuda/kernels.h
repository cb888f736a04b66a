// The ops of the CUDA backend, one per entry of ppo::Backend (core/backend.h); the
// math of each is in core/op_args.h. Every pointer in the args is a device pointer.
// Each function launches on the default stream, synchronizes before returning and
// throws ppo::Error on failure. Results are deterministic: the same inputs give
// bit-identical outputs from run to run (no floating-point atomics).
#pragma once

#include "core/op_args.h"

#include <cstddef>

namespace ppo::cuda {

// backend.cu: device memory for both CUDA tables (the RLHF kernels' and the engine's).
// device_alloc throws ppo::Error(OutOfMemory) with the byte count; copies are synchronous.
void* device_alloc(size_t bytes);
void device_free(void* ptr) noexcept;
void copy_host_to_device(void* device_dst, const void* host_src, size_t bytes);
void copy_device_to_host(void* host_dst, const void* device_src, size_t bytes);

// logprobs.cu
void logprobs_forward(const LogprobsArgs& args);
void logprobs_backward(const LogprobsBackwardArgs& args);

// rewards.cu
void kl_penalized_rewards(const KlRewardsArgs& args);
Moments moments(const MomentsArgs& args);
void normalize_scores(const NormalizeScoresArgs& args);

// advantages.cu
void gae(const GaeArgs& args);
void whiten(const WhitenArgs& args);
void clip_masked(const ClipArgs& args);

// losses.cu
PolicyLossResult policy_loss(const PolicyLossArgs& args);
ValueLossResult value_loss(const ValueLossArgs& args);

}  // namespace ppo::cuda
