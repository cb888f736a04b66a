// Error checking for the CUDA runtime: every runtime call and every kernel launch of
// the CUDA backend goes through these, so a failure becomes a ppo::Error
// (ErrorCode::CudaError, or ErrorCode::OutOfMemory for a failed allocation) whose
// message names the call and the source line. Nothing here aborts.
//
//   PPO_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
//   my_kernel<<<grid, block>>>(...);
//   PPO_CUDA_CHECK_LAUNCH("my_kernel");
//   void* p = PPO_CUDA_MALLOC(bytes);   // throws OutOfMemory with the byte count
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstring>
#include <string>

#include "core/error.h"

namespace ppo::cuda {

// "/home/me/ppo-max/csrc/cuda/logprobs.cu" -> "cuda/logprobs.cu": short and stable
// across build directories.
inline const char* short_source_path(const char* file) {
  const char* csrc = std::strstr(file, "csrc/");
  return csrc != nullptr ? csrc + 5 : file;
}

// Throws the ppo::Error for `status` (!= cudaSuccess) returned by `what`.
[[noreturn]] inline void throw_cuda_error(cudaError_t status, const std::string& what,
                                          const char* file, int line) {
  // The runtime remembers the last error; clear it so the next launch check does not
  // report this failure a second time (a no-op for sticky errors, which persist).
  (void)cudaGetLastError();
  const std::string where =
      " (" + std::string(short_source_path(file)) + ":" + std::to_string(line) + ")";
  const ErrorCode code =
      status == cudaErrorMemoryAllocation ? ErrorCode::OutOfMemory : ErrorCode::CudaError;
  throw Error(code, what + " failed: " + cudaGetErrorString(status) + where);
}

inline void check_cuda(cudaError_t status, const char* what, const char* file, int line) {
  if (status != cudaSuccess) throw_cuda_error(status, what, file, line);
}

// cudaMalloc that throws; 0 bytes gives nullptr (cudaFree(nullptr) is a no-op).
// Plain device memory, never managed memory.
inline void* device_malloc(size_t bytes, const char* file, int line) {
  if (bytes == 0) return nullptr;
  void* ptr = nullptr;
  const cudaError_t status = cudaMalloc(&ptr, bytes);
  if (status != cudaSuccess) {
    throw_cuda_error(status, "cudaMalloc of " + std::to_string(bytes) + " bytes", file, line);
  }
  return ptr;
}

// A device allocation of `count` T's owned for the duration of a scope, so scratch
// buffers are freed when an op throws half-way.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer(size_t count, const char* file, int line)
      : ptr_(static_cast<T*>(device_malloc(count * sizeof(T), file, line))) {}
  ~DeviceBuffer() {
    // cudaFree waits for the kernels using the buffer; its error (if any) was or will
    // be reported by the op's own checks, and a destructor must not throw.
    if (ptr_ != nullptr) (void)cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get() const { return ptr_; }

 private:
  T* ptr_;
};

}  // namespace ppo::cuda

// Checks a CUDA runtime call: PPO_CUDA_CHECK(cudaMemcpy(...)).
#define PPO_CUDA_CHECK(call) ::ppo::cuda::check_cuda((call), #call, __FILE__, __LINE__)

// Checks the launch that just happened (bad configuration, missing kernel image, ...).
// Errors raised while the kernel runs surface at the op's final synchronization.
#define PPO_CUDA_CHECK_LAUNCH(kernel_name) \
  ::ppo::cuda::check_cuda(cudaGetLastError(), "launch of " kernel_name, __FILE__, __LINE__)

// Waits for the work queued by the op on the default stream, so an error raised by
// a kernel is reported by the op that launched it.
#define PPO_CUDA_SYNC(op_name)                                                           \
  ::ppo::cuda::check_cuda(cudaStreamSynchronize(0), op_name " (kernel execution)", __FILE__, \
                          __LINE__)

#define PPO_CUDA_MALLOC(bytes) ::ppo::cuda::device_malloc((bytes), __FILE__, __LINE__)

// A scoped scratch buffer: PPO_DEVICE_BUFFER(Sums<2>, partials, blocks);
#define PPO_DEVICE_BUFFER(T, name, count) \
  ::ppo::cuda::DeviceBuffer<T> name((count), __FILE__, __LINE__)
