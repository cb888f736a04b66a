// The backend table: one entry per op, filled by cpu/ (always) and cuda/ (when the
// CUDA toolkit was found at build time). core/ops.cpp picks a table by Device and
// calls through it; nothing above the core knows which implementation runs.
#pragma once

#include <cstddef>
#include <string>

#include "core/op_args.h"

namespace ppo {

enum class Device { Cpu, Cuda };

const char* device_name(Device device);

struct Backend {
  Device device;
  const char* name;

  // Memory of this backend. For the CPU these are malloc/free/memcpy; for CUDA,
  // cudaMalloc/cudaFree/cudaMemcpy. alloc throws ppo::Error(OutOfMemory) on failure.
  void* (*alloc)(size_t bytes);
  void (*free)(void* ptr) noexcept;
  void (*copy_to_device)(void* device_dst, const void* host_src, size_t bytes);
  void (*copy_to_host)(void* host_dst, const void* device_src, size_t bytes);
  bool host_memory;  // true when backend pointers are host pointers (no staging)
  // True when the logprobs kernels check each logits row (NaN, +inf, all -inf, taken
  // token -inf) as they read it, throwing the same errors as validate::logits_rows:
  // one pass over memory instead of two for the largest input of all.
  bool checks_logits_inline;

  // Ops (see core/op_args.h for the exact math). Each throws ppo::Error on failure.
  void (*logprobs_forward)(const LogprobsArgs& args);
  void (*logprobs_backward)(const LogprobsBackwardArgs& args);
  void (*kl_penalized_rewards)(const KlRewardsArgs& args);
  Moments (*moments)(const MomentsArgs& args);
  void (*normalize_scores)(const NormalizeScoresArgs& args);
  void (*gae)(const GaeArgs& args);
  void (*whiten)(const WhitenArgs& args);
  void (*clip_masked)(const ClipArgs& args);
  PolicyLossResult (*policy_loss)(const PolicyLossArgs& args);
  ValueLossResult (*value_loss)(const ValueLossArgs& args);
};

// The CPU table, always present.
const Backend& cpu_backend();

// True when this build contains the CUDA backend.
bool cuda_compiled();
// True when CUDA is compiled in and a device can actually be used (driver present,
// at least one GPU). Never throws.
bool cuda_available();
// A one-line reason why CUDA is not available ("" when it is), for error messages.
std::string cuda_unavailable_reason();

// The table for `device`. Throws ppo::Error(CudaUnavailable) with the reason when
// CUDA is asked for and cannot be used.
const Backend& backend_for(Device device);

// Implemented in cuda/backend.cu in CUDA builds and in core/cuda_absent.cpp otherwise.
namespace cuda {
bool compiled();
bool device_usable(std::string* reason);
const Backend& backend();  // only called when device_usable()
}  // namespace cuda

}  // namespace ppo
