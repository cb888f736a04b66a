// The CPU backend table: host memory, and the kernels of cpu/*.cpp.
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/backend.h"
#include "core/error.h"
#include "cpu/kernels.h"

namespace ppo {

namespace cpu {

void* host_alloc(size_t bytes) {
  void* p = std::malloc(bytes == 0 ? 1 : bytes);
  if (!p) {
    throw Error(ErrorCode::OutOfMemory,
                "could not allocate " + std::to_string(bytes) + " bytes of host memory");
  }
  return p;
}
void host_free(void* p) noexcept { std::free(p); }
void host_copy(void* dst, const void* src, size_t bytes) {
  if (bytes > 0) std::memmove(dst, src, bytes);
}

}  // namespace cpu

const Backend& cpu_backend() {
  static const Backend table = {
      Device::Cpu,
      "cpu",
      cpu::host_alloc,
      cpu::host_free,
      cpu::host_copy,
      cpu::host_copy,
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
