// Device selection: which backend table serves a Device, and whether CUDA can be used.
#include "core/backend.h"
#include "core/engine_ops.h"

#include "core/error.h"

namespace ppo {

const char* device_name(Device device) { return device == Device::Cuda ? "cuda" : "cpu"; }

bool cuda_compiled() { return cuda::compiled(); }

bool cuda_available() {
  try {
    return cuda::device_usable(nullptr);
  } catch (...) {
    return false;
  }
}

std::string cuda_unavailable_reason() {
  std::string reason;
  try {
    if (cuda::device_usable(&reason)) return "";
  } catch (const std::exception& e) {
    return e.what();
  }
  return reason;
}

const Backend& backend_for(Device device) {
  if (device == Device::Cpu) return cpu_backend();
  std::string reason;
  if (!cuda::device_usable(&reason)) {
    throw Error(ErrorCode::CudaUnavailable,
                "device 'cuda' was requested but CUDA cannot be used: " + reason, "device");
  }
  return cuda::backend();
}

const EngineOps& engine_ops_for(Device device) {
  if (device == Device::Cpu) return cpu_engine_ops();
  backend_for(device);  // throws CudaUnavailable with the reason
  return cuda::engine_ops();
}

}  // namespace ppo
