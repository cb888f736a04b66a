// Linked into builds without the CUDA toolkit (node-gyp, or CMake without nvcc):
// the CUDA entry points exist and fail with a clear, stable error.
#include "core/backend.h"
#include "core/engine_ops.h"
#include "core/error.h"

namespace ppo::cuda {

bool compiled() { return false; }

bool device_usable(std::string* reason) {
  if (reason) {
    *reason =
        "this build of ppo-max has no CUDA backend (it was built without the CUDA "
        "toolkit; rebuild with `npx ppo-max build` on a machine where nvcc is found)";
  }
  return false;
}

const Backend& backend() {
  throw Error(ErrorCode::CudaUnavailable, "this build of ppo-max has no CUDA backend", "device");
}

const EngineOps& engine_ops() {
  throw Error(ErrorCode::CudaUnavailable, "this build of ppo-max has no CUDA backend", "device");
}

}  // namespace ppo::cuda
