// JS entry points of the GPT-2 engine (model/gpt.h). lib/model.ts is the only caller:
// it validates and copies every input, queues the calls of one model in call order,
// and maps these functions' results to its typed API.
//
// A model is a tagged Napi::External holding a std::shared_ptr<ModelState>. Every call
// that touches the engine takes a Lease on the state: an atomic busy flag (a second
// concurrent call is refused with ERR_BUSY, a safety net under the TS queue) and a
// copy of the std::shared_ptr<Model>, so the engine outlives a dropped JS handle while
// work is in flight. The work runs on a libuv worker thread; the promise settles on
// the main thread after the lease is released. Every C++ exception becomes a rejected
// promise (or a thrown JS error for bad arguments) with a stable code: nothing escapes.
#include "addon/model_bindings.h"

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
#include "model/checkpoint.h"
#include "model/config.h"
#include "model/gpt.h"
#include "model/params.h"

namespace ppo::addon {
namespace {

using model::Model;
using KeepAlive = std::vector<Napi::Reference<Napi::Value>>;

// Marks our Externals, so that no other External can be mistaken for a model.
constexpr napi_type_tag kModelTag = {0x70706f2d6d617831ULL, 0x677074326d6f646cULL};

constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();
constexpr double kMaxSafeInteger = 9007199254740991.0;  // 2^53 - 1

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

int64_t total_bytes(const Model::Memory& m) {
  return m.params + m.grads + m.optimizer + m.activations + m.kv_cache;
}

void snapshot_memory(ModelState& state, const Model* model) {
  const Model::Memory memory = model ? model->memory() : Model::Memory{0, 0, 0, 0, 0};
  std::lock_guard<std::mutex> lock(state.memory_mutex);
  state.memory = memory;
}

Model::Memory memory_of(const ModelState& state) {
  std::lock_guard<std::mutex> lock(state.memory_mutex);
  return state.memory;
}

void report_external(Napi::Env env, ModelState& state) {
  if (state.finalized) return;
  const int64_t now = total_bytes(memory_of(state));
  if (now != state.external_bytes) {
    Napi::MemoryManagement::AdjustExternalMemory(env, now - state.external_bytes);
    state.external_bytes = now;
  }
}

using Holder = std::shared_ptr<ModelState>;

Napi::Value wrap_state(Napi::Env env, const std::shared_ptr<ModelState>& state) {
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

std::shared_ptr<ModelState> unwrap(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsExternal() ||
      !info[0].As<Napi::External<Holder>>().CheckTypeTag(&kModelTag)) {
    throw_invalid("expected a model handle (from modelCreate or modelLoad)", "model");
  }
  return *info[0].As<Napi::External<Holder>>().Data();
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

bool absent(const Napi::Value& v) { return v.IsUndefined() || v.IsNull(); }

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

TokenInput read_tokens(const Args& a, KeepAlive& keep) {
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
};

// Runs one call on a libuv worker thread and settles its promise on the main thread.
// Progress events (generation) travel through the worker's thread-safe queue and are
// all delivered, in order, before the promise settles. When the JS progress callback
// throws, the work is stopped at its next progress report and the promise rejects
// with what the callback threw.
class ModelWorker : public Napi::AsyncProgressQueueWorker<ProgressEvent> {
 public:
  using Report = std::function<void(int64_t, int64_t)>;
  using Work = std::function<void(const Report&)>;
  using Finish = std::function<Napi::Value(Napi::Env)>;

  ModelWorker(Napi::Env env, Lease lease, KeepAlive keep, Work work, Finish finish,
              Napi::Function on_progress = Napi::Function())
      : Napi::AsyncProgressQueueWorker<ProgressEvent>(env, "ppo-max:model"),
        lease_(std::move(lease)),
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
    const Report report = [this, &progress](int64_t done, int64_t total) {
      if (cancelled_.load(std::memory_order_acquire)) {
        throw Error(ErrorCode::Internal, "stopped: the onProgress callback threw", "onProgress");
      }
      if (has_progress_) {
        const ProgressEvent event{done, total};
        progress.Send(&event, 1);
      }
    };
    caught_ = run_guarded([&] { work_(report); });
    if (ModelState* state = lease_.state()) {
      run_guarded([&] { snapshot_memory(*state, lease_.model()); });
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
        on_progress_.Call({Napi::Number::New(env, static_cast<double>(events[i].done)),
                           Napi::Number::New(env, static_cast<double>(events[i].total))});
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
    lease_.release();
    if (ModelState* state = lease_.state()) report_external(env, *state);
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
    lease_.release();
    deferred_.Reject(e.Value());
  }

 private:
  Lease lease_;
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

Napi::Value start(Napi::Env env, Lease lease, KeepAlive keep, ModelWorker::Work work,
                  ModelWorker::Finish finish, Napi::Function on_progress = Napi::Function()) {
  auto* worker = new ModelWorker(env, std::move(lease), std::move(keep), std::move(work),
                                 std::move(finish), on_progress);
  return worker->start();
}

// ---- config -------------------------------------------------------------------------------

model::ModelConfig config_from_js(const Napi::Value& value) {
  Args a(value, "config");
  model::ModelConfig c;
  c.vocab_size = a.integer("vocabSize", 1, kMaxInt32);
  c.n_positions = a.integer("nPositions", 1, kMaxInt32);
  c.n_embd = a.integer("nEmbd", 1, kMaxInt32);
  c.n_layer = a.integer("nLayer", 1, kMaxInt32);
  c.n_head = a.integer("nHead", 1, kMaxInt32);
  c.layer_norm_epsilon = a.number_or("layerNormEpsilon", 1e-5);
  c.value_head = a.flag("valueHead", false);
  c.bos_token_id = a.integer_or("bosTokenId", 0, kMaxInt32, c.vocab_size - 1);
  c.eos_token_id = a.integer_or("eosTokenId", 0, kMaxInt32, c.vocab_size - 1);
  c.validate();
  return c;
}

Napi::Object config_to_js(Napi::Env env, const model::ModelConfig& c) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("vocabSize", static_cast<double>(c.vocab_size));
  o.Set("nPositions", static_cast<double>(c.n_positions));
  o.Set("nEmbd", static_cast<double>(c.n_embd));
  o.Set("nLayer", static_cast<double>(c.n_layer));
  o.Set("nHead", static_cast<double>(c.n_head));
  o.Set("layerNormEpsilon", c.layer_norm_epsilon);
  o.Set("valueHead", c.value_head);
  o.Set("bosTokenId", static_cast<double>(c.bos_token_id));
  o.Set("eosTokenId", static_cast<double>(c.eos_token_id));
  return o;
}

model::ModelOptions model_options(const Args& a) {
  model::ModelOptions o;
  const std::string device = a.has("device") ? a.string("device") : "cpu";
  if (device != "cpu") {
    // lib/model.ts resolves 'auto' and refuses 'cuda' (one place, with the reason).
    throw_invalid("device must be 'cpu' for the model engine, got '" + device + "'", "device");
  }
  o.device = Device::Cpu;
  o.trainable = a.flag("trainable", true);
  return o;
}

// {handle, config, parameterCount} for a new model (create and load).
Napi::Value describe_new_model(Napi::Env env, const std::shared_ptr<ModelState>& state) {
  Napi::Object out = Napi::Object::New(env);
  out.Set("config", config_to_js(env, state->model->config()));
  out.Set("parameterCount", static_cast<double>(state->model->parameter_count()));
  out.Set("handle", wrap_state(env, state));
  return out;
}

// ---- bindings -----------------------------------------------------------------------------

// modelParameterCount(config): the parameters of a model of this config, without one.
Napi::Value ModelParameterCount(const Napi::CallbackInfo& info) {
  if (info.Length() < 1) throw_invalid("expected a config object", "config");
  const model::ModelConfig config = config_from_js(info[0]);
  return Napi::Number::New(info.Env(), static_cast<double>(model::parameter_layout(config).total));
}

// modelCreate({config, seed, device, trainable}) -> Promise<{handle, config, parameterCount}>
Napi::Value ModelCreate(const Napi::CallbackInfo& info) {
  Args a(info.Length() > 0 ? info[0] : info.Env().Undefined());
  const model::ModelConfig config = config_from_js(a.get("config"));
  const uint64_t seed = a.seed("seed");
  const model::ModelOptions options = model_options(a);
  auto state = std::make_shared<ModelState>();
  return start(
      info.Env(), Lease(), KeepAlive(),
      [state, config, seed, options](const ModelWorker::Report&) {
        state->model = std::make_shared<Model>(config, seed, options);
        snapshot_memory(*state, state->model.get());
      },
      [state](Napi::Env env) { return describe_new_model(env, state); });
}

// modelLoad({dir, device, trainable}) -> Promise<{handle, config, parameterCount}>
Napi::Value ModelLoad(const Napi::CallbackInfo& info) {
  Args a(info.Length() > 0 ? info[0] : info.Env().Undefined());
  const std::string dir = a.string("dir");
  const model::ModelOptions options = model_options(a);
  auto state = std::make_shared<ModelState>();
  return start(
      info.Env(), Lease(), KeepAlive(),
      [state, dir, options](const ModelWorker::Report&) {
        model::LoadedCheckpoint checkpoint = model::load_checkpoint(dir);
        state->model =
            std::make_shared<Model>(checkpoint.config, std::move(checkpoint.params), options);
        snapshot_memory(*state, state->model.get());
      },
      [state](Napi::Env env) { return describe_new_model(env, state); });
}

// modelSave(handle, {dir}) -> Promise<undefined>
Napi::Value ModelSave(const Napi::CallbackInfo& info) {
  Lease lease(unwrap(info));
  Args a(info.Length() > 1 ? info[1] : info.Env().Undefined());
  const std::string dir = a.string("dir");
  Model* m = lease.model();
  return start(info.Env(), std::move(lease), KeepAlive(),
               [m, dir](const ModelWorker::Report&) {
                 model::save_checkpoint(dir, m->config(), m->params());
               },
               nullptr);
}

// modelForward(handle, {batch, steps, tokens, lengths?, targetMask?, logits?, logprobs?,
//   entropy?, values?, lmLoss?, retain?, backward?: {gradLogprobs?, gradEntropy?,
//   gradValues?, lmLossScale?}}) -> Promise<{logits?, logprobs?, entropy?, values?,
//   lmLoss?, lmTokens?}>. With `backward`, the forward retains and backward() follows
// in the same call (gradients accumulate).
Napi::Value ModelForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Lease lease(unwrap(info));
  Args a(info.Length() > 1 ? info[1] : env.Undefined());
  KeepAlive keep;
  const model::ModelConfig& config = lease.model()->config();
  const TokenInput in = read_tokens(a, keep);
  const int64_t rows = in.rows();
  const float* target_mask = a.f32("targetMask", rows, true, keep);

  const bool want_logits = a.flag("logits", false), want_logprobs = a.flag("logprobs", false),
             want_entropy = a.flag("entropy", false), want_values = a.flag("values", false),
             want_lm_loss = a.flag("lmLoss", false);
  require(want_values == false || config.value_head, ErrorCode::InvalidArgument,
          "values need the value head, and this model has none (create it with valueHead: true)",
          "values");

  bool has_backward = false;
  model::BackwardRequest backward;
  if (a.has("backward")) {
    Args b(a.get("backward"), "backward");
    has_backward = true;
    backward.grad_logprobs = b.f32("gradLogprobs", rows, true, keep);
    backward.grad_entropy = b.f32("gradEntropy", rows, true, keep);
    backward.grad_values = b.f32("gradValues", rows, true, keep);
    backward.lm_loss_scale = b.number_or("lmLossScale", 0.0);
  }
  const bool retain = has_backward || a.flag("retain", false);

  auto outputs = std::make_shared<Outputs>();
  model::ForwardRequest request;
  request.target_mask = target_mask;
  request.lm_loss = want_lm_loss;
  request.retain = retain;
  if (want_logits) {
    require(rows <= std::numeric_limits<int64_t>::max() / config.vocab_size, ErrorCode::OutOfMemory,
            "the logits output is too large", "logits");
    request.logits = outputs->f32(env, "logits", rows * config.vocab_size);
  }
  if (want_logprobs) request.logprobs = outputs->f32(env, "logprobs", rows);
  if (want_entropy) request.entropy = outputs->f32(env, "entropy", rows);
  if (want_values) request.values = outputs->f32(env, "values", rows);

  ModelState* state = lease.state();
  Model* m = lease.model();
  return start(
      env, std::move(lease), std::move(keep),
      [state, m, in, request, has_backward, backward, outputs](const ModelWorker::Report&) {
        RetainedForward& retained = state->retained;
        retained.valid = false;  // the engine drops what it retained, even if this pass fails
        const model::ForwardResult r = m->forward(in.view(), request);
        if (request.retain) {
          retained.batch = in.batch;
          retained.steps = in.steps;
          retained.logprobs = request.logprobs != nullptr;
          retained.entropy = request.entropy != nullptr;
          retained.values = request.values != nullptr;
          retained.lm_loss = request.lm_loss;
          retained.valid = true;
        }
        if (has_backward) m->backward(backward);
        if (request.lm_loss) {
          outputs->scalars = {{"lmLoss", r.lm_loss}, {"lmTokens", static_cast<double>(r.lm_tokens)}};
        }
      },
      [outputs](Napi::Env env) { return outputs->build(env); });
}

// modelBackward(handle, {batch, steps, gradLogprobs?, gradEntropy?, gradValues?,
//   lmLossScale?}) -> Promise<undefined>: backward() through the retained forward, whose
// shape must be [batch, steps].
Napi::Value ModelBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Lease lease(unwrap(info));
  Args a(info.Length() > 1 ? info[1] : env.Undefined());
  KeepAlive keep;
  const int64_t batch = a.integer("batch", 1, kMaxInt32), steps = a.integer("steps", 1, kMaxInt32);
  const int64_t rows = batch * steps;
  model::BackwardRequest request;
  request.grad_logprobs = a.f32("gradLogprobs", rows, true, keep);
  request.grad_entropy = a.f32("gradEntropy", rows, true, keep);
  request.grad_values = a.f32("gradValues", rows, true, keep);
  request.lm_loss_scale = a.number_or("lmLossScale", 0.0);

  ModelState* state = lease.state();
  Model* m = lease.model();
  return start(
      env, std::move(lease), std::move(keep),
      [state, m, batch, steps, request](const ModelWorker::Report&) {
        const RetainedForward& r = state->retained;
        require(r.valid, ErrorCode::InvalidArgument,
                "backward() needs the model's previous call to be a forward with retain: true",
                "backward");
        if (r.batch != batch || r.steps != steps) {
          throw Error(ErrorCode::ShapeMismatch,
                      "the gradients are for [batch=" + std::to_string(batch) + ", steps=" +
                          std::to_string(steps) + "] but the retained forward was [batch=" +
                          std::to_string(r.batch) + ", steps=" + std::to_string(r.steps) + "]",
                      "backward");
        }
        require(!request.grad_logprobs || r.logprobs, ErrorCode::InvalidArgument,
                "gradLogprobs needs logprobs in the retained forward", "gradLogprobs");
        require(!request.grad_entropy || r.entropy, ErrorCode::InvalidArgument,
                "gradEntropy needs entropy in the retained forward", "gradEntropy");
        require(!request.grad_values || r.values, ErrorCode::InvalidArgument,
                "gradValues needs values in the retained forward", "gradValues");
        require(request.lm_loss_scale == 0.0 || r.lm_loss, ErrorCode::InvalidArgument,
                "lmLossScale needs lmLoss in the retained forward", "lmLossScale");
        m->backward(request);
      },
      nullptr);
}

// modelZeroGrad(handle) -> Promise<undefined>
Napi::Value ModelZeroGrad(const Napi::CallbackInfo& info) {
  Lease lease(unwrap(info));
  Model* m = lease.model();
  return start(info.Env(), std::move(lease), KeepAlive(),
               [m](const ModelWorker::Report&) { m->zero_grad(); }, nullptr);
}

// modelGradNorm(handle) -> Promise<number>
Napi::Value ModelGradNorm(const Napi::CallbackInfo& info) {
  Lease lease(unwrap(info));
  Model* m = lease.model();
  auto norm = std::make_shared<double>(0.0);
  return start(
      info.Env(), std::move(lease), KeepAlive(),
      [m, norm](const ModelWorker::Report&) { *norm = m->grad_norm(); },
      [norm](Napi::Env env) { return Napi::Number::New(env, *norm); });
}

// modelStep(handle, {lr, beta1, beta2, eps, weightDecay, decayEmbeddings,
//   decayBiasesAndNorms, maxGradNorm}) -> Promise<{gradNorm, clipped, step}>
Napi::Value ModelStep(const Napi::CallbackInfo& info) {
  Lease lease(unwrap(info));
  Args a(info.Length() > 1 ? info[1] : info.Env().Undefined());
  model::AdamWOptions o;
  o.lr = a.number("lr");
  o.beta1 = a.number_or("beta1", o.beta1);
  o.beta2 = a.number_or("beta2", o.beta2);
  o.eps = a.number_or("eps", o.eps);
  o.weight_decay = a.number_or("weightDecay", o.weight_decay);
  o.decay_embeddings = a.flag("decayEmbeddings", o.decay_embeddings);
  o.decay_biases_and_norms = a.flag("decayBiasesAndNorms", o.decay_biases_and_norms);
  o.max_grad_norm = a.number_or("maxGradNorm", o.max_grad_norm);
  Model* m = lease.model();
  auto result = std::make_shared<model::StepResult>();
  return start(
      info.Env(), std::move(lease), KeepAlive(),
      [m, o, result](const ModelWorker::Report&) { *result = m->step(o); },
      [result](Napi::Env env) {
        Napi::Object out = Napi::Object::New(env);
        out.Set("gradNorm", result->grad_norm);
        out.Set("clipped", result->clipped);
        out.Set("step", static_cast<double>(result->step));
        return out;
      });
}

// modelGenerate(handle, {batch, steps, tokens, lengths?, maxNewTokens, greedy?,
//   temperature?, topK?, topP?, repetitionPenalty?, penalizePrompt?, stopTokens?, seed?},
//   onProgress?) -> Promise<{batch, maxNewTokens, tokens: Int32Array, logprobs:
//   Float32Array (both [batch, maxNewTokens]), lengths: Int32Array, stopped: Uint8Array}>
Napi::Value ModelGenerate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Lease lease(unwrap(info));
  Args a(info.Length() > 1 ? info[1] : env.Undefined());
  KeepAlive keep;
  const TokenInput in = read_tokens(a, keep);
  model::GenerateOptions o;
  o.max_new_tokens = a.integer("maxNewTokens", 1, kMaxInt32);
  o.greedy = a.flag("greedy", o.greedy);
  o.temperature = a.number_or("temperature", o.temperature);
  o.top_k = a.integer_or("topK", 0, kMaxInt32, o.top_k);
  o.top_p = a.number_or("topP", o.top_p);
  o.repetition_penalty = a.number_or("repetitionPenalty", o.repetition_penalty);
  o.penalize_prompt = a.flag("penalizePrompt", o.penalize_prompt);
  size_t n_stop = 0;
  const int32_t* stop = a.array<int32_t, napi_int32_array>("stopTokens", -1, true, "Int32Array",
                                                           keep, &n_stop);
  if (stop) o.stop_tokens.assign(stop, stop + n_stop);
  o.seed = a.seed("seed");
  Napi::Function on_progress;
  if (info.Length() > 2 && !absent(info[2])) {
    if (!info[2].IsFunction()) throw_invalid("onProgress must be a function", "onProgress");
    on_progress = info[2].As<Napi::Function>();
  }

  ModelState* state = lease.state();
  Model* m = lease.model();
  auto result = std::make_shared<model::GenerateResult>();
  return start(
      env, std::move(lease), std::move(keep),
      [state, m, in, o, result](const ModelWorker::Report& report) {
        state->retained.valid = false;  // generation reuses the activation memory
        model::GenerateOptions options = o;
        options.progress = report;
        *result = m->generate(in.view(), options);
      },
      [result](Napi::Env env) {
        const model::GenerateResult& r = *result;
        const int64_t cells = r.batch * r.max_new_tokens;
        require(static_cast<int64_t>(r.tokens.size()) == cells &&
                    static_cast<int64_t>(r.logprobs.size()) == cells &&
                    static_cast<int64_t>(r.lengths.size()) == r.batch &&
                    static_cast<int64_t>(r.stopped.size()) == r.batch,
                ErrorCode::Internal, "generate returned arrays of the wrong sizes");
        auto tokens = Napi::Int32Array::New(env, static_cast<size_t>(cells));
        auto logprobs = Napi::Float32Array::New(env, static_cast<size_t>(cells));
        auto lengths = Napi::Int32Array::New(env, static_cast<size_t>(r.batch));
        auto stopped = Napi::Uint8Array::New(env, static_cast<size_t>(r.batch));
        if (cells > 0) {
          std::memcpy(tokens.Data(), r.tokens.data(), sizeof(int32_t) * cells);
          std::memcpy(logprobs.Data(), r.logprobs.data(), sizeof(float) * cells);
        }
        std::memcpy(lengths.Data(), r.lengths.data(), sizeof(int32_t) * r.batch);
        std::memcpy(stopped.Data(), r.stopped.data(), r.batch);
        Napi::Object out = Napi::Object::New(env);
        out.Set("batch", static_cast<double>(r.batch));
        out.Set("maxNewTokens", static_cast<double>(r.max_new_tokens));
        out.Set("tokens", tokens);
        out.Set("logprobs", logprobs);
        out.Set("lengths", lengths);
        out.Set("stopped", stopped);
        return out;
      },
      on_progress);
}

// modelMemory(handle) -> {params, grads, optimizer, activations, kvCache}: bytes held
// after the last completed call (all 0 once disposed). Synchronous: never waits.
Napi::Value ModelMemory(const Napi::CallbackInfo& info) {
  const std::shared_ptr<ModelState> state = unwrap(info);
  const Model::Memory m = memory_of(*state);
  Napi::Env env = info.Env();
  Napi::Object out = Napi::Object::New(env);
  out.Set("params", static_cast<double>(m.params));
  out.Set("grads", static_cast<double>(m.grads));
  out.Set("optimizer", static_cast<double>(m.optimizer));
  out.Set("activations", static_cast<double>(m.activations));
  out.Set("kvCache", static_cast<double>(m.kv_cache));
  return out;
}

// modelDispose(handle) -> Promise<undefined>: frees the engine on a worker thread. Later
// calls get ERR_DISPOSED; disposing twice is a no-op.
Napi::Value ModelDispose(const Napi::CallbackInfo& info) {
  const std::shared_ptr<ModelState> state = unwrap(info);
  Napi::Env env = info.Env();
  if (!state->model) {
    auto deferred = Napi::Promise::Deferred::New(env);
    deferred.Resolve(env.Undefined());
    return deferred.Promise();
  }
  Lease lease(state);
  std::shared_ptr<Model> doomed = lease.take_model();
  state->model.reset();  // from now on, calls are refused with ERR_DISPOSED
  return start(env, std::move(lease), KeepAlive(),
               [state, doomed](const ModelWorker::Report&) mutable {
                 state->retained = RetainedForward();
                 doomed.reset();  // the last reference: the engine's memory is freed here
               },
               nullptr);
}

}  // namespace

void register_model(Napi::Env env, Napi::Object exports) {
  exports.Set("modelParameterCount", Napi::Function::New(env, guarded<ModelParameterCount>));
  exports.Set("modelCreate", Napi::Function::New(env, guarded<ModelCreate>));
  exports.Set("modelLoad", Napi::Function::New(env, guarded<ModelLoad>));
  exports.Set("modelSave", Napi::Function::New(env, guarded<ModelSave>));
  exports.Set("modelForward", Napi::Function::New(env, guarded<ModelForward>));
  exports.Set("modelBackward", Napi::Function::New(env, guarded<ModelBackward>));
  exports.Set("modelZeroGrad", Napi::Function::New(env, guarded<ModelZeroGrad>));
  exports.Set("modelGradNorm", Napi::Function::New(env, guarded<ModelGradNorm>));
  exports.Set("modelStep", Napi::Function::New(env, guarded<ModelStep>));
  exports.Set("modelGenerate", Napi::Function::New(env, guarded<ModelGenerate>));
  exports.Set("modelMemory", Napi::Function::New(env, guarded<ModelMemory>));
  exports.Set("modelDispose", Napi::Function::New(env, guarded<ModelDispose>));
}

}  // namespace ppo::addon
