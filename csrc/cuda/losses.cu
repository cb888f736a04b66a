// Clipped surrogate policy loss and clipped value loss (core/op_args.h).
//
// Each loss is a deterministic two-stage reduction (device_common.cuh) of per-token
// terms computed in double, followed, when a gradient is asked for, by an elementwise
// kernel that recomputes the terms and divides by the token count N read from the
// reduction's total on the device. The scalars are copied back to the host.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/device_common.cuh"
#include "cuda/kernels.h"

namespace ppo::cuda {
namespace {

// ---- policy loss -----------------------------------------------------------------------
// Sums of the policy loss, in this order.
enum PolicySum { kPolicyLoss, kPolicyClipped, kPolicyApproxKl, kPolicyTokens, kPolicySums };

struct PolicyTerm {
  double loss;            // max(-A ratio, -A clip(ratio))
  double unclipped;       // -A ratio
  bool uses_unclipped;    // -A ratio >= -A clip(ratio): the gradient flows
  bool clipped;           // -A clip(ratio) > -A ratio: counted in clip_fraction
  double approx_kl;       // (ratio - 1) - log ratio
};

__device__ __forceinline__ PolicyTerm policy_term(const PolicyLossArgs& a, int64_t i) {
  const double log_ratio =
      static_cast<double>(a.logprobs[i]) - static_cast<double>(a.old_logprobs[i]);
  const double ratio = exp(log_ratio);
  const double advantage = a.advantages[i];
  const double eps = a.clip_eps;
  const double clipped_ratio = fmin(fmax(ratio, 1.0 - eps), 1.0 + eps);
  PolicyTerm term;
  term.unclipped = -advantage * ratio;
  const double clipped = -advantage * clipped_ratio;
  term.uses_unclipped = term.unclipped >= clipped;
  term.clipped = clipped > term.unclipped;
  term.loss = term.uses_unclipped ? term.unclipped : clipped;
  term.approx_kl = (ratio - 1.0) - log_ratio;
  return term;
}

__global__ void __launch_bounds__(kThreads)
    policy_loss_partials_kernel(PolicyLossArgs a, Sums<kPolicySums>* partials) {
  const int64_t n = a.batch * a.steps;
  Sums<kPolicySums> s{};
  for (int64_t i = global_thread_index(); i < n; i += grid_thread_count()) {
    if (!is_valid(a.mask, i)) continue;
    const PolicyTerm term = policy_term(a, i);
    s.v[kPolicyLoss] += term.loss;
    s.v[kPolicyClipped] += term.clipped ? 1.0 : 0.0;
    s.v[kPolicyApproxKl] += term.approx_kl;
    s.v[kPolicyTokens] += 1.0;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// grad[i] = -A ratio / N where the unclipped term is the max, else 0; 0 where masked.
__global__ void __launch_bounds__(kThreads)
    policy_loss_grad_kernel(PolicyLossArgs a, const Sums<kPolicySums>* __restrict__ total) {
  const int64_t n = a.batch * a.steps;
  const double tokens = total->v[kPolicyTokens];
  for (int64_t i = global_thread_index(); i < n; i += grid_thread_count()) {
    float grad = 0.0f;
    if (is_valid(a.mask, i)) {  // implies tokens >= 1
      const PolicyTerm term = policy_term(a, i);
      if (term.uses_unclipped) grad = static_cast<float>(term.unclipped / tokens);
    }
    a.grad_logprobs[i] = grad;
  }
}

// ---- value loss ------------------------------------------------------------------------
enum ValueSum { kValueLoss, kValueClipped, kValueTokens, kValueSums };

struct ValueTerm {
  double loss;          // 0.5 * max((V - R)^2, (vc - R)^2), or 0.5 * (V - R)^2 unclipped
  double error;         // V - R
  bool uses_unclipped;  // (V - R)^2 >= (vc - R)^2: the gradient flows
  bool clipped;         // (vc - R)^2 > (V - R)^2
};

__device__ __forceinline__ ValueTerm value_term(const ValueLossArgs& a, int64_t i) {
  const double value = a.values[i];
  const double target = a.returns[i];
  ValueTerm term;
  term.error = value - target;
  const double unclipped_sq = term.error * term.error;
  if (!a.use_clip) {
    term.loss = 0.5 * unclipped_sq;
    term.uses_unclipped = true;
    term.clipped = false;
    return term;
  }
  const double old_value = a.old_values[i];
  const double eps = a.clip_eps;
  const double clipped_value = fmin(fmax(value, old_value - eps), old_value + eps);
  const double clipped_error = clipped_value - target;
  const double clipped_sq = clipped_error * clipped_error;
  term.uses_unclipped = unclipped_sq >= clipped_sq;
  term.clipped = clipped_sq > unclipped_sq;
  term.loss = 0.5 * (term.uses_unclipped ? unclipped_sq : clipped_sq);
  return term;
}

__global__ void __launch_bounds__(kThreads)
    value_loss_partials_kernel(ValueLossArgs a, Sums<kValueSums>* partials) {
  const int64_t n = a.batch * a.steps;
  Sums<kValueSums> s{};
  for (int64_t i = global_thread_index(); i < n; i += grid_thread_count()) {
    if (!is_valid(a.mask, i)) continue;
    const ValueTerm term = value_term(a, i);
    s.v[kValueLoss] += term.loss;
    s.v[kValueClipped] += term.clipped ? 1.0 : 0.0;
    s.v[kValueTokens] += 1.0;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// grad[i] = (V - R) / N where the unclipped term is the max, else 0; 0 where masked.
__global__ void __launch_bounds__(kThreads)
    value_loss_grad_kernel(ValueLossArgs a, const Sums<kValueSums>* __restrict__ total) {
  const int64_t n = a.batch * a.steps;
  const double tokens = total->v[kValueTokens];
  for (int64_t i = global_thread_index(); i < n; i += grid_thread_count()) {
    float grad = 0.0f;
    if (is_valid(a.mask, i)) {
      const ValueTerm term = value_term(a, i);
      if (term.uses_unclipped) grad = static_cast<float>(term.error / tokens);
    }
    a.grad_values[i] = grad;
  }
}

}  // namespace

PolicyLossResult policy_loss(const PolicyLossArgs& args) {
  PolicyLossResult result;
  const int64_t n = args.batch * args.steps;
  if (n == 0) return result;

  const unsigned blocks = reduction_blocks(n);
  PPO_DEVICE_BUFFER(Sums<kPolicySums>, partials, blocks);
  PPO_DEVICE_BUFFER(Sums<kPolicySums>, total, 1);

  policy_loss_partials_kernel<<<blocks, kThreads>>>(args, partials.get());
  PPO_CUDA_CHECK_LAUNCH("policy_loss_partials_kernel");
  launch_sum_partials(partials.get(), blocks, total.get());
  if (args.grad_logprobs != nullptr) {
    policy_loss_grad_kernel<<<elementwise_blocks(n), kThreads>>>(args, total.get());
    PPO_CUDA_CHECK_LAUNCH("policy_loss_grad_kernel");
  }
  PPO_CUDA_SYNC("policy_loss");

  const Sums<kPolicySums> sums = copy_total_to_host(total.get());
  const double tokens = sums.v[kPolicyTokens];
  if (tokens == 0.0) return result;  // N == 0: all zeros (the gradient too)
  result.loss = sums.v[kPolicyLoss] / tokens;
  result.clip_fraction = sums.v[kPolicyClipped] / tokens;
  result.approx_kl = sums.v[kPolicyApproxKl] / tokens;
  result.tokens = static_cast<int64_t>(tokens);
  return result;
}

ValueLossResult value_loss(const ValueLossArgs& args) {
  ValueLossResult result;
  const int64_t n = args.batch * args.steps;
  if (n == 0) return result;

  const unsigned blocks = reduction_blocks(n);
  PPO_DEVICE_BUFFER(Sums<kValueSums>, partials, blocks);
  PPO_DEVICE_BUFFER(Sums<kValueSums>, total, 1);

  value_loss_partials_kernel<<<blocks, kThreads>>>(args, partials.get());
  PPO_CUDA_CHECK_LAUNCH("value_loss_partials_kernel");
  launch_sum_partials(partials.get(), blocks, total.get());
  if (args.grad_values != nullptr) {
    value_loss_grad_kernel<<<elementwise_blocks(n), kThreads>>>(args, total.get());
    PPO_CUDA_CHECK_LAUNCH("value_loss_grad_kernel");
  }
  PPO_CUDA_SYNC("value_loss");

  const Sums<kValueSums> sums = copy_total_to_host(total.get());
  const double tokens = sums.v[kValueTokens];
  if (tokens == 0.0) return result;
  result.loss = sums.v[kValueLoss] / tokens;
  result.clip_fraction = sums.v[kValueClipped] / tokens;
  result.tokens = static_cast<int64_t>(tokens);
  return result;
}

}  // namespace ppo::cuda
