// The CPU backend table: host memory, and the kernels of cpu/*.cpp.
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/backend.h"
#include "core/error.h"
#include "cpu/kernels.h"

namespace ppo {

namespace {

void* host_alloc(size_t bytes) {
  void* p = std::malloc(bytes == 0 ? 1 : bytes);
  if (!p) {
    throw Error(ErrorCode::OutOfMemory,
                "could not allocate " + std::to_string(bytes) + " bytes of host memory");
  }
  return p;
}
void host_free(void* p) noexcept { std::free(p); }
void host_copy(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }

}  // namespace

const Backend& cpu_backend() {
  static const Backend table = {
      Device::Cpu,
      "cpu",
      host_alloc,
      host_free,
      host_copy,
      host_copy,
      /*host_memory=*/true,
      /*checks_logits_inline=*/true,
      cpu::logprobs_forward,
      cpu::logprobs_backward,
      cpu::kl_penalized_rewards,
      cpu::moments,
      cpu::normalize_scores,
      cpu::gae,
      cpu::whiten,
      cpu::clip_masked,
      cpu::policy_loss,
      cpu::value_loss,
  };
  return table;
}

}  // namespace ppo
