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
#include "addon/model_handle.h"
#include "core/error.h"
#include "model/checkpoint.h"
#include "model/config.h"
#include "model/gpt.h"
#include "model/params.h"

namespace ppo::addon {
namespace {

// ---- config -------------------------------------------------------------------------------


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
  o.Set("modelType", c.model_type);
  if (c.is_llama()) {  // the Llama-only fields
    o.Set("nKvHead", static_cast<double>(c.kv_heads()));
    o.Set("intermediateSize", static_cast<double>(c.intermediate_size));
    o.Set("rmsNormEps", c.rms_norm_eps);
    o.Set("ropeTheta", c.rope_theta);
    o.Set("ropeScaling", c.rope_scaling);
    o.Set("tieWordEmbeddings", c.tie_word_embeddings);
  }
  return o;
}

model::ModelOptions model_options(const Args& a) {
  model::ModelOptions o;
  const std::string device = a.has("device") ? a.string("device") : "cpu";
  // lib/model.ts resolves 'auto'; a 'cuda' that cannot run is refused by the Model
  // constructor (ERR_CUDA_UNAVAILABLE, with the reason).
  if (device != "cpu" && device != "cuda")
    throw_invalid("device must be 'cpu' or 'cuda' for the model engine, got '" + device + "'", "device");
  o.device = device == "cuda" ? Device::Cuda : Device::Cpu;
  o.trainable = a.flag("trainable", true);
  return o;
}

// {handle, config, parameterCount} for a new model (create and load).
Napi::Value describe_new_model(Napi::Env env, const std::shared_ptr<ModelState>& state) {
  Napi::Object out = Napi::Object::New(env);
  out.Set("config", config_to_js(env, state->model->config()));
  out.Set("parameterCount", static_cast<double>(state->model->parameter_count()));
  out.Set("device", device_name(state->model->device()));
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

// modelClone(handle, {trainable, valueHead?}) -> Promise<{handle, config, parameterCount}>:
// a new model with a copy of the parameters (no gradients, no optimizer state).
// valueHead true on a model without one appends a zero-initialized head (score.weight,
// the last tensor of the layout: every score 0 until it is trained); false drops it.
Napi::Value ModelClone(const Napi::CallbackInfo& info) {
  Lease lease(unwrap(info));
  Args a(info.Length() > 1 ? info[1] : info.Env().Undefined());
  model::ModelOptions options;
  options.trainable = a.flag("trainable", true);
  Model* source = lease.model();
  options.device = source->device();  // a clone lives where its source does
  const bool value_head = a.flag("valueHead", source->config().value_head);
  auto state = std::make_shared<ModelState>();
  return start(
      info.Env(), std::move(lease), KeepAlive(),
      [state, source, options, value_head](const ModelWorker::Report&) {
        model::ModelConfig config = source->config();
        std::vector<float> params(source->params(), source->params() + source->parameter_count());
        if (value_head && !config.value_head) params.resize(params.size() + config.n_embd, 0.0f);
        if (!value_head && config.value_head) params.resize(params.size() - config.n_embd);
        config.value_head = value_head;
        state->model = std::make_shared<Model>(config, std::move(params), options);
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
        options.progress = [&report](int64_t done, int64_t total) { report(done, total, nullptr); };
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
  return memory_to_js(info.Env(), memory_of(*state));
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
  if (a.has("modelType")) c.model_type = a.string("modelType");
  if (c.is_llama()) {
    c.n_kv_head = a.integer_or("nKvHead", 1, kMaxInt32, c.n_head);
    c.intermediate_size = a.integer_or("intermediateSize", 1, kMaxInt32, 4 * c.n_embd);
    c.rms_norm_eps = a.number_or("rmsNormEps", 1e-6);
    c.rope_theta = a.number_or("ropeTheta", 10000.0);
    c.rope_scaling = a.number_or("ropeScaling", 1.0);
    c.tie_word_embeddings = a.flag("tieWordEmbeddings", false);
  }
  c.validate();
  return c;
}

void register_model(Napi::Env env, Napi::Object exports) {
  exports.Set("modelParameterCount", Napi::Function::New(env, guarded<ModelParameterCount>));
  exports.Set("modelCreate", Napi::Function::New(env, guarded<ModelCreate>));
  exports.Set("modelLoad", Napi::Function::New(env, guarded<ModelLoad>));
  exports.Set("modelSave", Napi::Function::New(env, guarded<ModelSave>));
  exports.Set("modelClone", Napi::Function::New(env, guarded<ModelClone>));
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
