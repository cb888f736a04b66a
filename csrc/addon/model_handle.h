// What every binding that runs engine work shares (model_bindings.cpp, trainer_bindings.cpp):
// the model handle (a tagged External holding a shared ModelState), the Lease that marks a
// model busy while a call runs, argument readers, output arrays, and the worker that runs
// a call on a libuv thread and settles its promise. Node-facing: included only in addon/.
#pragma once

#include <napi.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "addon/convert.h"
#include "core/error.h"
#include "model/gpt.h"

namespace ppo::addon {

using model::Model;
using KeepAlive = std::vector<Napi::Reference<Napi::Value>>;

// Marks our Externals, so that no other External can be mistaken for a model.
inline constexpr napi_type_tag kModelTag = {0x70706f2d6d617831ULL, 0x677074326d6f646cULL};

inline constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();
inline constexpr double kMaxSafeInteger = 9007199254740991.0;  // 2^53 - 1

// The shape and outputs of the forward the engine retained for backward(), so that the
// gradients' lengths can be checked against it when backward() runs (the engine's
// BackwardRequest carries no shape: the arrays must be [batch, steps] of that forward).
struct RetainedForward {
  bool valid = false;
  int64_t batch = 0, steps = 0;
  bool logprobs = false, entropy = false, values = false, lm_loss = false;
};

struct ModelState {
  // Null once disposed. Written only on the main thread (creation, dispose).
  std::shared_ptr<Model> model;
  std::atomic<bool> busy{false};
  // Touched only by the call holding `busy`.
  RetainedForward retained;
  // The bytes held after the last call, written by the worker holding `busy` and read
  // by memory() on the main thread at any time, hence the mutex.
  mutable std::mutex memory_mutex;
  Model::Memory memory{0, 0, 0, 0, 0};
  // Main thread only: what V8 was told this model holds (napi_adjust_external_memory),
  // so that dropped models are collected under memory pressure.
  int64_t external_bytes = 0;
  bool finalized = false;
};

inline int64_t total_bytes(const Model::Memory& m) {
  return m.params + m.grads + m.optimizer + m.activations + m.kv_cache;
}

inline void snapshot_memory(ModelState& state, const Model* model) {
  const Model::Memory memory = model ? model->memory() : Model::Memory{0, 0, 0, 0, 0};
  std::lock_guard<std::mutex> lock(state.memory_mutex);
  state.memory = memory;
}

inline Model::Memory memory_of(const ModelState& state) {
  std::lock_guard<std::mutex> lock(state.memory_mutex);
  return state.memory;
}

inline void report_external(Napi::Env env, ModelState& state) {
  if (state.finalized) return;
  const int64_t now = total_bytes(memory_of(state));
  if (now != state.external_bytes) {
    Napi::MemoryManagement::AdjustExternalMemory(env, now - state.external_bytes);
    state.external_bytes = now;
  }
}

using Holder = std::shared_ptr<ModelState>;

inline Napi::Value wrap_state(Napi::Env env, const std::shared_ptr<ModelState>& state) {
  auto* holder = new Holder(state);
  auto external = Napi::External<Holder>::New(env, holder, [](Napi::Env env, Holder* h) {
    ModelState& s = **h;
    if (s.external_bytes != 0) Napi::MemoryManagement::AdjustExternalMemory(env, -s.external_bytes);
    s.external_bytes = 0;
    s.finalized = true;
    delete h;
  });
  external.TypeTag(&kModelTag);
  report_external(env, *state);
  return external;
}

// The model behind a handle; `what` names the argument in the error.
inline std::shared_ptr<ModelState> unwrap_value(const Napi::Value& v, const char* what = "model") {
  if (!v.IsExternal() || !v.As<Napi::External<Holder>>().CheckTypeTag(&kModelTag)) {
    throw_invalid(std::string("expected a model handle (from modelCreate or modelLoad) for ") + what, what);
  }
  return *v.As<Napi::External<Holder>>().Data();
}

inline std::shared_ptr<ModelState> unwrap(const Napi::CallbackInfo& info) {
  if (info.Length() < 1) throw_invalid("expected a model handle (from modelCreate or modelLoad)", "model");
  return unwrap_value(info[0]);
}

// The right to run one call on a model: the busy flag, held until released (when the
// call settles, or when the binding throws before queueing it).
class Lease {
 public:
  Lease() = default;
  explicit Lease(std::shared_ptr<ModelState> state) : state_(std::move(state)) {
    require(state_->model != nullptr, ErrorCode::Disposed,
            "this model was disposed: create or load another one", "model");
    bool expected = false;
    if (!state_->busy.compare_exchange_strong(expected, true, std::memory_order_acq_rel)) {
      throw Error(ErrorCode::Busy,
                  "another call on this model is still running (Model queues its calls in "
                  "order; the native functions refuse overlapping calls)",
                  "model");
    }
    held_ = true;
    model_ = state_->model;
  }
  Lease(Lease&& other) noexcept { *this = std::move(other); }
  Lease& operator=(Lease&& other) noexcept {
    if (this != &other) {
      release();
      state_ = std::move(other.state_);
      model_ = std::move(other.model_);
      held_ = other.held_;
      other.held_ = false;
    }
    return *this;
  }
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  ~Lease() { release(); }

  void release() {
    if (held_) state_->busy.store(false, std::memory_order_release);
    held_ = false;
  }
  ModelState* state() const { return state_.get(); }
  Model* model() const { return model_.get(); }
  // Hands over this lease's reference to the model (dispose frees it on the worker).
  std::shared_ptr<Model> take_model() { return std::move(model_); }

 private:
  std::shared_ptr<ModelState> state_;
  std::shared_ptr<Model> model_;
  bool held_ = false;
};

// ---- reading arguments -------------------------------------------------------------------

inline bool absent(const Napi::Value& v) { return v.IsUndefined() || v.IsNull(); }

class Args {
 public:
  explicit Args(const Napi::Value& value, const char* what = "args") {
    if (!value.IsObject()) throw_invalid(std::string("expected an object for ") + what, what);
    object_ = value.As<Napi::Object>();
  }

  Napi::Value get(const char* name) const { return object_.Get(name); }
  bool has(const char* name) const { return !absent(get(name)); }

  double number(const char* name) const {
    Napi::Value v = get(name);
    if (!v.IsNumber()) throw_invalid(std::string(name) + " must be a number", name);
    const double d = v.As<Napi::Number>().DoubleValue();
    require(std::isfinite(d), ErrorCode::NonFinite, std::string(name) + " must be finite", name);
    return d;
  }
  double number_or(const char* name, double fallback) const {
    return has(name) ? number(name) : fallback;
  }
  int64_t integer(const char* name, int64_t min, int64_t max) const {
    const double d = number(name);
    if (d != std::floor(d) || d < static_cast<double>(min) || d > static_cast<double>(max)) {
      throw Error(ErrorCode::OutOfRange,
                  std::string(name) + " must be an integer in [" + std::to_string(min) + ", " +
                      std::to_string(max) + "], got " + std::to_string(d),
                  name);
    }
    return static_cast<int64_t>(d);
  }
  int64_t integer_or(const char* name, int64_t min, int64_t max, int64_t fallback) const {
    return has(name) ? integer(name, min, max) : fallback;
  }
  uint64_t seed(const char* name) const {
    if (!has(name)) return 0;
    const double d = number(name);
    if (d != std::floor(d) || d < 0 || d > kMaxSafeInteger) {
      throw Error(ErrorCode::OutOfRange,
                  std::string(name) + " must be an integer in [0, 2^53), got " + std::to_string(d),
                  name);
    }
    return static_cast<uint64_t>(d);
  }
  bool flag(const char* name, bool fallback) const {
    Napi::Value v = get(name);
    if (absent(v)) return fallback;
    if (!v.IsBoolean()) throw_invalid(std::string(name) + " must be a boolean", name);
    return v.As<Napi::Boolean>().Value();
  }
  std::string string(const char* name) const {
    Napi::Value v = get(name);
    if (!v.IsString()) throw_invalid(std::string(name) + " must be a string", name);
    return v.As<Napi::String>().Utf8Value();
  }

  // A typed array of exactly `length` elements (any length when length < 0), kept
  // alive by `keep` until the call settles (see typed_array in convert.h).
  template <typename T, napi_typedarray_type kType>
  const T* array(const char* name, int64_t length, bool optional, const char* type_name,
                 KeepAlive& keep, size_t* actual_length = nullptr) const {
    return typed_array<T, kType>(object_, name, length, optional, type_name, keep, actual_length);
  }
  const float* f32(const char* name, int64_t length, bool optional, KeepAlive& keep) const {
    return array<float, napi_float32_array>(name, length, optional, "Float32Array", keep);
  }
  const int32_t* i32(const char* name, int64_t length, bool optional, KeepAlive& keep) const {
    return array<int32_t, napi_int32_array>(name, length, optional, "Int32Array", keep);
  }

 private:
  Napi::Object object_;
};

// A [batch, steps] token batch; the arrays are kept alive by the call.
struct TokenInput {
  int64_t batch = 0, steps = 0;
  const int32_t* tokens = nullptr;
  const int32_t* lengths = nullptr;
  int64_t rows() const { return batch * steps; }
  model::TokenBatch view() const { return {batch, steps, tokens, lengths}; }
};

inline TokenInput read_tokens(const Args& a, KeepAlive& keep) {
  TokenInput in;
  in.batch = a.integer("batch", 1, kMaxInt32);
  in.steps = a.integer("steps", 1, kMaxInt32);
  in.tokens = a.i32("tokens", in.rows(), false, keep);
  in.lengths = a.i32("lengths", in.batch, true, keep);
  return in;
}

// Output arrays created on the main thread before the work and handed to JS after it.
struct Outputs {
  std::vector<std::pair<std::string, Napi::Reference<Napi::Value>>> arrays;
  std::vector<std::pair<std::string, double>> scalars;

  float* f32(Napi::Env env, const char* key, int64_t length) {
    Napi::Float32Array arr;
    try {
      arr = Napi::Float32Array::New(env, static_cast<size_t>(length));
    } catch (const Napi::Error& e) {
      throw Error(ErrorCode::OutOfMemory,
                  std::string("could not allocate the ") + key + " output (" +
                      std::to_string(length) + " floats): " + e.Message(),
                  key);
    }
    arrays.emplace_back(key, Napi::Persistent(Napi::Value(arr)));
    return arr.Data();
  }

  Napi::Object build(Napi::Env env) const {
    Napi::Object result = Napi::Object::New(env);
    for (const auto& [key, ref] : arrays) result.Set(key, ref.Value());
    for (const auto& [key, value] : scalars) result.Set(key, Napi::Number::New(env, value));
    return result;
  }
};

// ---- the worker ---------------------------------------------------------------------------

struct ProgressEvent {
  int64_t done = 0, total = 0;
  const char* stage = nullptr;  // a string literal naming the stage (trainers), or null
};

// Runs one call on a libuv worker thread and settles its promise on the main thread.
// Progress events (generation) travel through the worker's thread-safe queue and are
// all delivered, in order, before the promise settles. When the JS progress callback
// throws, the work is stopped at its next progress report and the promise rejects
// with what the callback threw.
class ModelWorker : public Napi::AsyncProgressQueueWorker<ProgressEvent> {
 public:
  // (done, total, stage): stage is a string literal or nullptr.
  using Report = std::function<void(int64_t, int64_t, const char*)>;
  using Work = std::function<void(const Report&)>;
  using Finish = std::function<Napi::Value(Napi::Env)>;

  ModelWorker(Napi::Env env, Lease lease, KeepAlive keep, Work work, Finish finish,
              Napi::Function on_progress = Napi::Function())
      : ModelWorker(env, one_lease(std::move(lease)), std::move(keep), std::move(work), std::move(finish),
                    on_progress) {}
  // A call over several models (a trainer step): every lease is held until it settles.
  ModelWorker(Napi::Env env, std::vector<Lease> leases, KeepAlive keep, Work work, Finish finish,
              Napi::Function on_progress = Napi::Function())
      : Napi::AsyncProgressQueueWorker<ProgressEvent>(env, "ppo-max:model"),
        leases_(std::move(leases)),
        keep_(std::move(keep)),
        work_(std::move(work)),
        finish_(std::move(finish)),
        has_progress_(!on_progress.IsEmpty()),
        deferred_(Napi::Promise::Deferred::New(env)) {
    if (has_progress_) on_progress_ = Napi::Persistent(on_progress);
  }

  // Queues the work and returns its promise.
  Napi::Promise start() {
    Napi::Promise promise = deferred_.Promise();
    Queue();
    return promise;
  }

 protected:
  void Execute(const ExecutionProgress& progress) override {
    const Report report = [this, &progress](int64_t done, int64_t total, const char* stage) {
      if (cancelled_.load(std::memory_order_acquire)) {
        throw Error(ErrorCode::Internal, "stopped: the onProgress callback threw", "onProgress");
      }
      if (has_progress_) {
        const ProgressEvent event{done, total, stage};
        progress.Send(&event, 1);
      }
    };
    caught_ = run_guarded([&] { work_(report); });
    for (Lease& lease : leases_) {
      if (ModelState* state = lease.state()) run_guarded([&] { snapshot_memory(*state, lease.model()); });
    }
  }

  void OnProgress(const ProgressEvent* events, size_t count) override {
    if (!has_progress_ || events == nullptr) return;
    Napi::Env env = Env();
    for (size_t i = 0; i < count && !cancelled_.load(std::memory_order_acquire); ++i) {
      // What the callback threw may be any value: boxed, since only objects can be
      // referenced before Node-API 10.
      Napi::Object box = Napi::Object::New(env);
      try {
        std::vector<napi_value> args{Napi::Number::New(env, static_cast<double>(events[i].done)),
                                     Napi::Number::New(env, static_cast<double>(events[i].total))};
        if (events[i].stage) args.push_back(Napi::String::New(env, events[i].stage));
        on_progress_.Call(args);
        continue;
      } catch (const Napi::Error& e) {
        box.Set("error", Napi::Value(e.Value()));
      } catch (...) {
        box.Set("error",
                make_error(env, "ERR_INTERNAL", "the onProgress callback failed", "onProgress").Value());
      }
      progress_error_ = Napi::Persistent(box);
      cancelled_.store(true, std::memory_order_release);
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    // Free the model for the next call before anyone hears that this one is done.
    for (Lease& lease : leases_) {
      lease.release();
      if (ModelState* state = lease.state()) report_external(env, *state);
    }
    if (!progress_error_.IsEmpty()) {
      deferred_.Reject(progress_error_.Value().Get("error"));
      return;
    }
    if (caught_.failed) {
      deferred_.Reject(make_error(env, caught_.code, caught_.message, caught_.argument).Value());
      return;
    }
    try {
      Napi::Value result;
      CaughtError settled = run_guarded([&] { result = finish_ ? finish_(env) : env.Undefined(); });
      if (settled.failed) {
        deferred_.Reject(make_error(env, settled.code, settled.message, settled.argument).Value());
      } else {
        deferred_.Resolve(result);
      }
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    }
  }

  void OnError(const Napi::Error& e) override {
    for (Lease& lease : leases_) lease.release();
    deferred_.Reject(e.Value());
  }

 private:
  static std::vector<Lease> one_lease(Lease lease) {
    std::vector<Lease> v;
    v.push_back(std::move(lease));
    return v;
  }

  std::vector<Lease> leases_;
  KeepAlive keep_;
  Work work_;
  Finish finish_;
  bool has_progress_;
  Napi::FunctionReference on_progress_;
  Napi::ObjectReference progress_error_;
  std::atomic<bool> cancelled_{false};
  Napi::Promise::Deferred deferred_;
  CaughtError caught_;
};

inline Napi::Value start(Napi::Env env, Lease lease, KeepAlive keep, ModelWorker::Work work,
                  ModelWorker::Finish finish, Napi::Function on_progress = Napi::Function()) {
  auto* worker = new ModelWorker(env, std::move(lease), std::move(keep), std::move(work),
                                 std::move(finish), on_progress);
  return worker->start();
}

inline Napi::Value start_leases(Napi::Env env, std::vector<Lease> leases, KeepAlive keep, ModelWorker::Work work,
                                ModelWorker::Finish finish, Napi::Function on_progress = Napi::Function()) {
  auto* worker = new ModelWorker(env, std::move(leases), std::move(keep), std::move(work), std::move(finish),
                                 on_progress);
  return worker->start();
}

// {params, grads, optimizer, activations, kvCache} in bytes (lib/native.ts NativeModelMemory).
inline Napi::Object memory_to_js(Napi::Env env, const Model::Memory& m) {
  Napi::Object out = Napi::Object::New(env);
  out.Set("params", static_cast<double>(m.params));
  out.Set("grads", static_cast<double>(m.grads));
  out.Set("optimizer", static_cast<double>(m.optimizer));
  out.Set("activations", static_cast<double>(m.activations));
  out.Set("kvCache", static_cast<double>(m.kv_cache));
  return out;
}

// A GPT2Config object of lib/model.ts (camelCase) as the engine's config (model_bindings.cpp).
model::ModelConfig config_from_js(const Napi::Value& value);

}  // namespace ppo::addon
