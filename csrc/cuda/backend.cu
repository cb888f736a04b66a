// The CUDA backend table and the device probe (core/backend.h).
//
// The addon links the static CUDA runtime, so it loads on machines without an NVIDIA
// driver: there, cudaGetDeviceCount fails and device_usable() reports why instead of
// throwing. The probe runs once per process and its result is cached.
#include <cuda_runtime.h>

#include <cstdlib>
#include <string>

#include "core/backend.h"
#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/kernels.h"

// The architectures this file was compiled for, e.g. "800,900" (nvcc defines
// __CUDA_ARCH_LIST__ in every compilation pass).
#define PPO_STRINGIFY_ARGS(...) #__VA_ARGS__
#define PPO_STRINGIFY(...) PPO_STRINGIFY_ARGS(__VA_ARGS__)
#ifdef __CUDA_ARCH_LIST__
#define PPO_CUDA_ARCH_LIST PPO_STRINGIFY(__CUDA_ARCH_LIST__)
#else
#define PPO_CUDA_ARCH_LIST "unknown"
#endif

namespace ppo::cuda {

// ---- memory (cuda/kernels.h): plain device allocations, synchronous copies -----------------
void* device_alloc(size_t bytes) { return PPO_CUDA_MALLOC(bytes); }

void device_free(void* ptr) noexcept {
  if (ptr != nullptr) (void)cudaFree(ptr);
}

void copy_host_to_device(void* device_dst, const void* host_src, size_t bytes) {
  if (bytes == 0) return;
  PPO_CUDA_CHECK(cudaMemcpy(device_dst, host_src, bytes, cudaMemcpyHostToDevice));
}

void copy_device_to_host(void* host_dst, const void* device_src, size_t bytes) {
  if (bytes == 0) return;
  // cudaMemcpy on the legacy default stream waits for the kernels queued before it; an
  // error they raised is reported here.
  PPO_CUDA_CHECK(cudaMemcpy(host_dst, device_src, bytes, cudaMemcpyDeviceToHost));
}

namespace {

// An empty kernel: asking for its attributes tells whether this binary holds code
// the GPU can run (sm_80 code runs on 8.x GPUs, sm_90 on 9.0, and so on).
__global__ void probe_kernel() {}

// "800,900" -> "sm_80, sm_90"
std::string compiled_architectures() {
  const std::string list = PPO_CUDA_ARCH_LIST;
  if (list.find_first_not_of("0123456789,") != std::string::npos) return list;
  std::string out;
  size_t begin = 0;
  while (begin < list.size()) {
    size_t end = list.find(',', begin);
    if (end == std::string::npos) end = list.size();
    const std::string arch = list.substr(begin, end - begin);
    if (!out.empty()) out += ", ";
    out += arch.size() > 1 ? "sm_" + arch.substr(0, arch.size() - 1) : arch;
    begin = end + 1;
  }
  return out;
}

std::string version_string(int version) {  // 12040 -> "12.4"
  return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}

struct Probe {
  bool usable = false;
  std::string reason;  // why not, when !usable
};

Probe probe_device() {
  Probe probe;
  int runtime_version = 0;
  int driver_version = 0;
  (void)cudaRuntimeGetVersion(&runtime_version);
  (void)cudaDriverGetVersion(&driver_version);  // 0 when no driver is installed

  int device_count = 0;
  const cudaError_t status = cudaGetDeviceCount(&device_count);
  (void)cudaGetLastError();  // a failed probe must not leak into later checks
  if (status != cudaSuccess || device_count == 0) {
    if (driver_version == 0) {
      probe.reason = "no NVIDIA driver was found (libcuda could not be loaded)";
    } else if (status == cudaErrorInsufficientDriver) {
      probe.reason = "the NVIDIA driver supports CUDA " + version_string(driver_version) +
                     " but this build needs CUDA " + version_string(runtime_version) +
                     " or newer; update the driver";
    } else if (status == cudaErrorNoDevice || status == cudaSuccess) {
      const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
      probe.reason = "no CUDA-capable GPU was found";
      if (visible != nullptr) {
        probe.reason += std::string(" (CUDA_VISIBLE_DEVICES=\"") + visible + "\")";
      }
    } else {
      probe.reason = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(status);
    }
    return probe;
  }

  int device = 0;
  (void)cudaGetDevice(&device);
  cudaFuncAttributes attributes;
  const cudaError_t image_status = cudaFuncGetAttributes(&attributes, probe_kernel);
  (void)cudaGetLastError();
  if (image_status != cudaSuccess) {
    cudaDeviceProp props;
    std::string gpu = "GPU " + std::to_string(device);
    if (cudaGetDeviceProperties(&props, device) == cudaSuccess) {
      gpu += " (" + std::string(props.name) + ", compute capability " +
             std::to_string(props.major) + "." + std::to_string(props.minor) + ")";
    }
    (void)cudaGetLastError();
    if (image_status == cudaErrorNoKernelImageForDevice ||
        image_status == cudaErrorInvalidDeviceFunction) {
      probe.reason = gpu + " is not supported by this build of ppo-max (compiled for " +
                     compiled_architectures() + ")";
    } else {
      probe.reason = gpu + " cannot be used: " + cudaGetErrorString(image_status);
    }
    return probe;
  }
  probe.usable = true;
  return probe;
}

const Probe& cached_probe() {
  static const Probe probe = [] {
    try {
      return probe_device();
    } catch (const std::exception& e) {  // std::string allocation, in theory
      return Probe{false, e.what()};
    }
  }();
  return probe;
}

Backend make_backend() {
  Backend b{};
  b.device = Device::Cuda;
  b.name = "cuda";
  b.alloc = device_alloc;
  b.free = device_free;
  b.copy_to_device = copy_host_to_device;
  b.copy_to_host = copy_device_to_host;
  b.host_memory = false;
  b.checks_logits_inline = false;  // the host checks them before the copy to the GPU
  b.logprobs_forward = logprobs_forward;
  b.logprobs_backward = logprobs_backward;
  b.kl_penalized_rewards = kl_penalized_rewards;
  b.moments = moments;
  b.normalize_scores = normalize_scores;
  b.gae = gae;
  b.whiten = whiten;
  b.clip_masked = clip_masked;
  b.policy_loss = policy_loss;
  b.value_loss = value_loss;
  return b;
}

}  // namespace

bool compiled() { return true; }

bool device_usable(std::string* reason) {
  const Probe& probe = cached_probe();
  if (reason != nullptr) *reason = probe.reason;
  return probe.usable;
}

const Backend& backend() {
  static const Backend table = make_backend();
  return table;
}

}  // namespace ppo::cuda
