// The CUDA table of the transformer engine's ops (core/engine_ops.h): plain device
// memory (cudaMalloc, never managed memory) and the kernels of cuda/engine_kernels.h.
//
// Every op queues its kernels on the default stream and returns; copy_to_host and
// synchronize wait for them and report an error raised while they ran (as a ppo::Error
// naming the call; the process survives). Host-to-device copies come from pageable host
// memory, which the runtime stages synchronously: the caller may reuse its array at once.
#include <cuda_runtime.h>

#include "core/engine_ops.h"
#include "cuda/cuda_check.h"
#include "cuda/engine_kernels.h"
#include "cuda/kernels.h"
#include "cuda/llama_kernels.h"

namespace ppo::cuda {
namespace {

void copy_device_to_device(void* dst, const void* src, size_t bytes) {
  if (bytes == 0 || dst == src) return;
  PPO_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, 0));
}

void device_zero(void* ptr, size_t bytes) {
  if (bytes == 0) return;
  PPO_CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, 0));
}

void device_synchronize() { PPO_CUDA_SYNC("the engine's queued kernels"); }

EngineOps make_engine_ops() {
  EngineOps t{};
  t.device = Device::Cuda;
  t.alloc = device_alloc;
  t.free = device_free;
  t.copy_to_device = copy_host_to_device;
  t.copy_to_host = copy_device_to_host;
  t.copy_within = copy_device_to_device;
  t.zero = device_zero;
  t.synchronize = device_synchronize;
  t.matmul = matmul;
  t.add_bias = add_bias;
  t.bias_backward = bias_backward;
  t.layernorm_forward = layernorm_forward;
  t.layernorm_backward = layernorm_backward;
  t.gelu_forward = gelu_forward;
  t.gelu_backward = gelu_backward;
  t.add = add;
  t.accumulate = accumulate;
  t.embedding_forward = embedding_forward;
  t.embedding_backward = embedding_backward;
  t.rmsnorm_forward = rmsnorm_forward;
  t.rmsnorm_backward = rmsnorm_backward;
  t.rope_forward = rope_forward;
  t.rope_backward = rope_backward;
  t.swiglu_forward = swiglu_forward;
  t.swiglu_backward = swiglu_backward;
  t.attention_saved_floats = attention_saved_floats;
  t.attention_forward = attention_forward;
  t.attention_backward = attention_backward;
  t.kv_cache_store = kv_cache_store;
  t.attention_decode = attention_decode;
  t.gather_rows = gather_rows;
  t.scatter_add_rows = scatter_add_rows;
  t.zero_padded_rows = zero_padded_rows;
  t.value_head_forward = value_head_forward;
  t.value_head_backward = value_head_backward;
  t.logprobs_forward = logprobs_forward;
  t.logprobs_backward = logprobs_backward;
  t.sample_tokens = sample_tokens;
  t.adamw_update = adamw_update;
  t.sum_of_squares = sum_of_squares;
  t.scale_in_place = scale_in_place;
  return t;
}

}  // namespace

const EngineOps& engine_ops() {
  static const EngineOps table = make_engine_ops();
  return table;
}

}  // namespace ppo::cuda
