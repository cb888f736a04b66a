// The Node-API module: device queries, the op bindings and the model bindings. This
// directory is the only place in csrc/ that includes napi.h.
#include <napi.h>

#include "addon/convert.h"
#include "addon/model_bindings.h"
#include "addon/trainer_bindings.h"
#include "addon/ops_bindings.h"
#include "core/backend.h"
#include "core/thread_pool.h"

namespace ppo::addon {
namespace {

Napi::Value CudaCompiled(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), cuda_compiled());
}
Napi::Value CudaAvailable(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), cuda_available());
}
Napi::Value CudaUnavailableReason(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), cuda_unavailable_reason());
}
Napi::Value CpuThreads(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), cpu_thread_count());
}

}  // namespace

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("cudaCompiled", Napi::Function::New(env, guarded<CudaCompiled>));
  exports.Set("cudaAvailable", Napi::Function::New(env, guarded<CudaAvailable>));
  exports.Set("cudaUnavailableReason", Napi::Function::New(env, guarded<CudaUnavailableReason>));
  exports.Set("cpuThreads", Napi::Function::New(env, guarded<CpuThreads>));
  exports.Set("napiVersion", Napi::Number::New(env, NAPI_VERSION));
  register_ops(env, exports);
  register_model(env, exports);
  register_trainers(env, exports);
  return exports;
}

}  // namespace ppo::addon

static Napi::Object InitPpoMax(Napi::Env env, Napi::Object exports) {
  return ppo::addon::Init(env, exports);
}

NODE_API_MODULE(ppo_max, InitPpoMax)
