// JS entry points of the trainers (trainer/trainer.h), used by lib/trainers.ts, which
// validates options and queues calls; these functions convert arguments, lease the
// models a call touches (ERR_BUSY when one is in use), run the work on a libuv thread
// and map results and errors. A PPO trainer is a tagged External holding the native
// PpoTrainer and the handles of its four models.
#include "addon/trainer_bindings.h"

#include <memory>
#include <string>
#include <vector>

#include "addon/model_handle.h"
#include "model/checkpoint.h"
#include "trainer/trainer.h"

namespace ppo::addon {
namespace {

using trainer::Experience;
using trainer::OptimizerOptions;
using trainer::PpoOptions;
using trainer::PpoTrainer;
using trainer::Stats;

constexpr napi_type_tag kTrainerTag = {0x70706f2d6d617831ULL, 0x70706f747261696eULL};

struct TrainerState {
  std::shared_ptr<PpoTrainer> trainer;
  // policy, reference, critic, reward (may be null)
  std::vector<std::shared_ptr<ModelState>> models;
};
using TrainerHolder = std::shared_ptr<TrainerState>;

std::shared_ptr<TrainerState> unwrap_trainer(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsExternal() ||
      !info[0].As<Napi::External<TrainerHolder>>().CheckTypeTag(&kTrainerTag)) {
    throw_invalid("expected a PPO trainer handle (from ppoTrainerCreate)", "trainer");
  }
  return *info[0].As<Napi::External<TrainerHolder>>().Data();
}

// Leases every model of the trainer (ERR_BUSY / ERR_DISPOSED when one cannot be had).
std::vector<Lease> lease_all(const TrainerState& t) {
  std::vector<Lease> leases;
  for (const auto& m : t.models)
    if (m) leases.emplace_back(m);
  return leases;
}

Napi::Value arg(const Napi::CallbackInfo& info, size_t i) {
  return info.Length() > i ? info[i] : info.Env().Undefined();
}

Napi::Function optional_function(const Napi::Value& v, const char* name) {
  if (absent(v)) return Napi::Function();
  if (!v.IsFunction()) throw_invalid(std::string(name) + " must be a function", name);
  return v.As<Napi::Function>();
}

// ---- conversions ----------------------------------------------------------------------------
Napi::Object stats_to_js(Napi::Env env, const Stats& s) {
  Napi::Object o = Napi::Object::New(env);
  for (const auto& [k, v] : s) o.Set(k, Napi::Number::New(env, v));
  return o;
}

OptimizerOptions optimizer_from_js(const Napi::Value& v, const char* what) {
  Args a(v, what);
  OptimizerOptions o;
  o.lr = a.number("lr");
  o.beta1 = a.number_or("beta1", o.beta1);
  o.beta2 = a.number_or("beta2", o.beta2);
  o.eps = a.number_or("eps", o.eps);
  o.weight_decay = a.number_or("weightDecay", o.weight_decay);
  const int64_t schedule = a.integer_or("schedule", 0, 2, 0);
  o.schedule = static_cast<trainer::Schedule>(schedule);
  o.warmup_steps = a.integer_or("warmupSteps", 0, kMaxInt32, 0);
  o.total_steps = a.integer_or("totalSteps", 0, kMaxInt32, 0);
  o.max_grad_norm = a.number_or("maxGradNorm", 0.0);
  trainer::check_optimizer(o, what);
  return o;
}

PpoOptions ppo_options_from_js(const Napi::Value& v) {
  Args a(v, "options");
  PpoOptions o;
  o.max_new_tokens = a.integer("maxNewTokens", 1, kMaxInt32);
  o.temperature = a.number("temperature");
  o.top_p = a.number("topP");
  o.top_k = a.integer("topK", 0, kMaxInt32);
  o.repetition_penalty = a.number("repetitionPenalty");
  KeepAlive keep;
  size_t n_stop = 0;
  const int32_t* stop = a.array<int32_t, napi_int32_array>("stopTokens", -1, true, "Int32Array", keep, &n_stop);
  if (stop) o.stop_tokens.assign(stop, stop + n_stop);
  o.kl_coef = a.number("klCoef");
  o.kl_estimator = static_cast<KlEstimator>(a.integer("klEstimator", 1, 3));
  o.kl_target = a.number_or("klTarget", 0.0);
  o.kl_horizon = a.number_or("klHorizon", 10000.0);
  o.reward_norm = a.flag("rewardNorm", false);
  o.reward_scaling = a.flag("rewardScaling", false);
  o.reward_clip = a.number("rewardClip");
  o.gamma = a.number("gamma");
  o.lambda = a.number("lam");
  o.advantage_norm = a.flag("advantageNorm", false);
  o.advantage_clip = a.number("advantageClip");
  o.policy_clip = a.number("policyClip");
  o.value_clip = a.number("valueClip");
  o.value_loss_coef = a.number("valueLossCoef");
  o.entropy_coef = a.number("entropyCoef");
  o.ptx_coef = a.number("ptxCoef");
  o.ptx_batch_ratio = a.number("ptxBatchRatio");
  o.mini_batch_size = a.integer("miniBatchSize", 1, kMaxInt32);
  o.ppo_epochs = a.integer("ppoEpochs", 1, kMaxInt32);
  o.forward_batch_size = a.integer_or("forwardBatchSize", 0, kMaxInt32, 0);
  o.policy_optimizer = optimizer_from_js(a.get("policyOptimizer"), "policyOptimizer");
  o.critic_optimizer = optimizer_from_js(a.get("criticOptimizer"), "criticOptimizer");
  o.seed = a.seed("seed");
  trainer::check_ppo_options(o);
  return o;
}

template <typename T, typename Array>
Napi::Value typed_copy(Napi::Env env, const std::vector<T>& v) {
  Array arr = Array::New(env, v.size());
  if (!v.empty()) std::memcpy(arr.Data(), v.data(), v.size() * sizeof(T));
  return arr;
}

Napi::Object experience_to_js(Napi::Env env, const Experience& e) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("batch", Napi::Number::New(env, static_cast<double>(e.batch)));
  o.Set("steps", Napi::Number::New(env, static_cast<double>(e.steps)));
  auto i32 = [&](const char* k, const std::vector<int32_t>& v) { o.Set(k, typed_copy<int32_t, Napi::Int32Array>(env, v)); };
  auto f32 = [&](const char* k, const std::vector<float>& v) { o.Set(k, typed_copy<float, Napi::Float32Array>(env, v)); };
  i32("tokens", e.tokens);
  i32("lengths", e.lengths);
  i32("promptLengths", e.prompt_lengths);
  i32("responseLengths", e.response_lengths);
  o.Set("truncated", typed_copy<uint8_t, Napi::Uint8Array>(env, e.truncated));
  f32("mask", e.mask);
  f32("logprobs", e.logprobs);
  f32("refLogprobs", e.ref_logprobs);
  f32("entropy", e.entropy);
  f32("values", e.values);
  if (e.scored) f32("scores", e.scores);
  if (e.shaped) {
    f32("normalizedScores", e.normalized_scores);
    f32("rewards", e.rewards);
    f32("kl", e.kl);
    f32("advantages", e.advantages);
    f32("returns", e.returns);
  }
  return o;
}

Experience experience_from_js(const Napi::Value& v) {
  Args a(v, "experience");
  Experience e;
  e.batch = a.integer("batch", 1, kMaxInt32);
  e.steps = a.integer("steps", 1, kMaxInt32);
  const int64_t B = e.batch, BT = e.batch * e.steps;
  KeepAlive keep;
  auto i32 = [&](const char* k, int64_t n, std::vector<int32_t>& out) {
    const int32_t* p = a.i32(k, n, false, keep);
    out.assign(p, p + n);
  };
  auto f32 = [&](const char* k, int64_t n, std::vector<float>& out, bool optional) {
    const float* p = a.f32(k, n, optional, keep);
    if (p) out.assign(p, p + n);
    return p != nullptr;
  };
  i32("tokens", BT, e.tokens);
  i32("lengths", B, e.lengths);
  i32("promptLengths", B, e.prompt_lengths);
  i32("responseLengths", B, e.response_lengths);
  const uint8_t* tr = a.array<uint8_t, napi_uint8_array>("truncated", B, true, "Uint8Array", keep);
  if (tr) e.truncated.assign(tr, tr + B);
  f32("mask", BT, e.mask, false);
  f32("logprobs", BT, e.logprobs, false);
  f32("refLogprobs", BT, e.ref_logprobs, false);
  f32("entropy", BT, e.entropy, true);
  f32("values", BT, e.values, false);
  e.scored = f32("scores", B, e.scores, true);
  const bool n = f32("normalizedScores", B, e.normalized_scores, true);
  const bool r = f32("rewards", BT, e.rewards, true);
  const bool k = f32("kl", BT, e.kl, true);
  const bool ad = f32("advantages", BT, e.advantages, true);
  const bool re = f32("returns", BT, e.returns, true);
  e.shaped = e.scored && n && r && k && ad && re;
  return e;
}

struct TokensCopy {
  int64_t batch = 0, steps = 0;
  std::vector<int32_t> tokens, lengths;
  std::vector<float> mask;  // optional target mask
  model::TokenBatch view() const { return {batch, steps, tokens.data(), lengths.empty() ? nullptr : lengths.data()}; }
  const float* target_mask() const { return mask.empty() ? nullptr : mask.data(); }
};

// {batch, steps, tokens, lengths?, targetMask?} copied (the work may outlive the arrays' users).
TokensCopy tokens_from_js(const Napi::Value& v, const char* what) {
  Args a(v, what);
  TokensCopy t;
  t.batch = a.integer("batch", 1, kMaxInt32);
  t.steps = a.integer("steps", 1, kMaxInt32);
  KeepAlive keep;
  const int32_t* tok = a.i32("tokens", t.batch * t.steps, false, keep);
  t.tokens.assign(tok, tok + t.batch * t.steps);
  if (const int32_t* len = a.i32("lengths", t.batch, true, keep)) t.lengths.assign(len, len + t.batch);
  if (const float* m = a.f32("targetMask", t.batch * t.steps, true, keep)) t.mask.assign(m, m + t.batch * t.steps);
  return t;
}

// The optional [batch] "scores" of a call's options, copied (empty when absent).
std::shared_ptr<std::vector<float>> optional_scores(const Args& a, int64_t batch) {
  KeepAlive keep;
  auto scores = std::make_shared<std::vector<float>>();
  if (const float* s = a.f32("scores", batch, true, keep)) scores->assign(s, s + batch);
  return scores;
}

trainer::Progress progress_of(const ModelWorker::Report& report) {
  return [&report](const char* stage, int64_t done, int64_t total) { report(done, total, stage); };
}

// ---- PPO -----------------------------------------------------------------------------------
// ppoTrainerCreate({policy, reference, critic, reward?, options}) -> trainer handle (sync)
Napi::Value PpoTrainerCreate(const Napi::CallbackInfo& info) {
  Args a(arg(info, 0));
  auto state = std::make_shared<TrainerState>();
  const char* names[] = {"policy", "reference", "critic", "reward"};
  for (int i = 0; i < 4; ++i) {
    if (i == 3 && !a.has("reward")) {
      state->models.push_back(nullptr);
      continue;
    }
    state->models.push_back(unwrap_value(a.get(names[i]), names[i]));
  }
  const PpoOptions options = ppo_options_from_js(a.get("options"));
  {
    std::vector<Lease> leases = lease_all(*state);  // none may be busy or disposed
    state->trainer = std::make_shared<PpoTrainer>(leases[0].state()->model, leases[1].state()->model,
                                                  leases[2].state()->model,
                                                  state->models[3] ? leases[3].state()->model : nullptr, options);
  }
  auto* holder = new TrainerHolder(state);
  auto external = Napi::External<TrainerHolder>::New(info.Env(), holder, [](Napi::Env, TrainerHolder* h) { delete h; });
  external.TypeTag(&kTrainerTag);
  return external;
}

// ppoTrainerSetOptions(trainer, options) (sync; refused while a call runs)
Napi::Value PpoTrainerSetOptions(const Napi::CallbackInfo& info) {
  auto t = unwrap_trainer(info);
  const PpoOptions options = ppo_options_from_js(arg(info, 1));
  std::vector<Lease> leases = lease_all(*t);
  t->trainer->set_options(options);
  return info.Env().Undefined();
}

// ppoTrainerGetState(trainer) -> {count, mean, m2, klCoef, rollouts, updates, criticPretrainSteps}
Napi::Value PpoTrainerGetState(const Napi::CallbackInfo& info) {
  auto t = unwrap_trainer(info);
  std::vector<Lease> leases = lease_all(*t);
  const trainer::PpoState& s = t->trainer->state();
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("count", s.moments.count);
  o.Set("mean", s.moments.mean);
  o.Set("m2", s.moments.m2);
  o.Set("klCoef", s.kl_coef);
  o.Set("rollouts", static_cast<double>(s.rollouts));
  o.Set("updates", static_cast<double>(s.updates));
  o.Set("criticPretrainSteps", static_cast<double>(s.critic_pretrain_steps));
  return o;
}

Napi::Value PpoTrainerSetState(const Napi::CallbackInfo& info) {
  auto t = unwrap_trainer(info);
  Args a(arg(info, 1), "state");
  trainer::PpoState s;
  s.moments.count = a.number("count");
  s.moments.mean = a.number("mean");
  s.moments.m2 = a.number("m2");
  s.kl_coef = a.number("klCoef");
  s.rollouts = a.integer("rollouts", 0, INT64_C(1) << 52);
  s.updates = a.integer("updates", 0, INT64_C(1) << 52);
  s.critic_pretrain_steps = a.integer("criticPretrainSteps", 0, INT64_C(1) << 52);
  std::vector<Lease> leases = lease_all(*t);
  t->trainer->set_state(s);
  return info.Env().Undefined();
}

// ppoTrainerSetPtx(trainer, {batch, steps, tokens, lengths?, targetMask?}) (sync, copied)
Napi::Value PpoTrainerSetPtx(const Napi::CallbackInfo& info) {
  auto t = unwrap_trainer(info);
  const TokensCopy data = tokens_from_js(arg(info, 1), "ptx");
  std::vector<Lease> leases = lease_all(*t);
  t->trainer->set_ptx_data(data.view(), data.target_mask());
  return info.Env().Undefined();
}

// A trainer call on a worker: every model leased; result = {stats?, experience?}.
struct TrainerResult {
  Stats stats;
  bool has_stats = false;
  Experience experience;
  bool has_experience = false;
};

Napi::Value start_trainer(const Napi::CallbackInfo& info, const std::shared_ptr<TrainerState>& t,
                          std::function<void(PpoTrainer&, TrainerResult&, const ModelWorker::Report&)> work,
                          Napi::Function on_progress) {
  std::vector<Lease> leases = lease_all(*t);
  auto result = std::make_shared<TrainerResult>();
  auto trainer = t->trainer;
  for (auto& m : t->models)
    if (m) m->retained.valid = false;  // the trainer's forwards replace any retained one
  return start_leases(
      info.Env(), std::move(leases), KeepAlive(),
      [trainer, result, work](const ModelWorker::Report& report) { work(*trainer, *result, report); },
      [result](Napi::Env env) -> Napi::Value {
        Napi::Object o = Napi::Object::New(env);
        if (result->has_stats) o.Set("stats", stats_to_js(env, result->stats));
        if (result->has_experience) o.Set("experience", experience_to_js(env, result->experience));
        return o;
      },
      on_progress);
}

// ppoTrainerRollout(trainer, prompts, onProgress?) -> Promise<{experience, stats}>
Napi::Value PpoTrainerRollout(const Napi::CallbackInfo& info) {
  auto t = unwrap_trainer(info);
  auto prompts = std::make_shared<TokensCopy>(tokens_from_js(arg(info, 1), "prompts"));
  return start_trainer(
      info, t,
      [prompts](PpoTrainer& tr, TrainerResult& r, const ModelWorker::Report& report) {
        r.experience = tr.rollout(prompts->view(), progress_of(report));
        r.has_experience = true;
        r.stats = tr.experience_stats(r.experience);
        r.has_stats = true;
      },
      optional_function(arg(info, 2), "onProgress"));
}

// ppoTrainerScore(trainer, experience) -> Promise<{experience}> (scored by the reward model)
Napi::Value PpoTrainerScore(const Napi::CallbackInfo& info) {
  auto t = unwrap_trainer(info);
  auto e = std::make_shared<Experience>(experience_from_js(arg(info, 1)));
  return start_trainer(
      info, t,
      [e](PpoTrainer& tr, TrainerResult& r, const ModelWorker::Report&) {
        tr.score(*e);
        r.experience = std::move(*e);
        r.has_experience = true;
      },
      Napi::Function());
}

// ppoTrainerShape(trainer, experience, {scores?, updateMoments}) -> Promise<{experience, stats}>
Napi::Value PpoTrainerShape(const Napi::CallbackInfo& info) {
  auto t = unwrap_trainer(info);
  auto e = std::make_shared<Experience>(experience_from_js(arg(info, 1)));
  Args a(arg(info, 2), "options");
  auto scores = optional_scores(a, e->batch);
  const bool update_moments = a.flag("updateMoments", true);
  return start_trainer(
      info, t,
      [e, scores, update_moments](PpoTrainer& tr, TrainerResult& r, const ModelWorker::Report&) {
        if (!scores->empty()) tr.set_scores(*e, scores->data());
        r.stats = tr.shape(*e, update_moments);
        r.has_stats = true;
        r.experience = std::move(*e);
        r.has_experience = true;
      },
      Napi::Function());
}

// ppoTrainerUpdate(trainer, experience, onProgress?) -> Promise<{stats}>
Napi::Value PpoTrainerUpdate(const Napi::CallbackInfo& info) {
  auto t = unwrap_trainer(info);
  auto e = std::make_shared<Experience>(experience_from_js(arg(info, 1)));
  return start_trainer(
      info, t,
      [e](PpoTrainer& tr, TrainerResult& r, const ModelWorker::Report& report) {
        r.stats = tr.update(*e, progress_of(report));
        r.has_stats = true;
      },
      optional_function(arg(info, 2), "onProgress"));
}

// ppoTrainerStep(trainer, prompts, onProgress?) -> Promise<{stats, experience}> (reward model)
Napi::Value PpoTrainerStep(const Napi::CallbackInfo& info) {
  auto t = unwrap_trainer(info);
  auto prompts = std::make_shared<TokensCopy>(tokens_from_js(arg(info, 1), "prompts"));
  return start_trainer(
      info, t,
      [prompts](PpoTrainer& tr, TrainerResult& r, const ModelWorker::Report& report) {
        r.stats = tr.step(prompts->view(), progress_of(report), &r.experience);
        r.has_stats = r.has_experience = true;
      },
      optional_function(arg(info, 2), "onProgress"));
}

// ppoTrainerStepWithScores(trainer, experience, scores, onProgress?) -> Promise<{stats, experience}>
Napi::Value PpoTrainerStepWithScores(const Napi::CallbackInfo& info) {
  auto t = unwrap_trainer(info);
  auto e = std::make_shared<Experience>(experience_from_js(arg(info, 1)));
  Args a(arg(info, 2), "options");
  auto scores = optional_scores(a, e->batch);
  return start_trainer(
      info, t,
      [e, scores](PpoTrainer& tr, TrainerResult& r, const ModelWorker::Report& report) {
        r.stats = tr.step_with_scores(*e, scores->empty() ? nullptr : scores->data(), progress_of(report));
        r.experience = std::move(*e);
        r.has_stats = r.has_experience = true;
      },
      optional_function(arg(info, 3), "onProgress"));
}

// ppoTrainerPretrainCritic(trainer, experience, passes, onProgress?) -> Promise<{stats, experience}>
Napi::Value PpoTrainerPretrainCritic(const Napi::CallbackInfo& info) {
  auto t = unwrap_trainer(info);
  auto e = std::make_shared<Experience>(experience_from_js(arg(info, 1)));
  if (!arg(info, 2).IsNumber()) throw_invalid("passes must be a number", "passes");
  const double p = arg(info, 2).As<Napi::Number>().DoubleValue();
  if (!(p >= 1 && p <= 1e6 && p == std::floor(p))) throw_invalid("passes must be an integer >= 1", "passes");
  const int64_t passes = static_cast<int64_t>(p);
  return start_trainer(
      info, t,
      [e, passes](PpoTrainer& tr, TrainerResult& r, const ModelWorker::Report& report) {
        r.stats = tr.pretrain_critic(*e, passes, progress_of(report));
        r.experience = std::move(*e);
        r.has_stats = r.has_experience = true;
      },
      optional_function(arg(info, 3), "onProgress"));
}

// ---- SFT and the reward model ----------------------------------------------------------------
Napi::Value start_model_stats(const Napi::CallbackInfo& info, Lease lease,
                              std::function<Stats(Model&)> work) {
  Model* m = lease.model();
  if (ModelState* s = lease.state()) s->retained.valid = false;
  auto result = std::make_shared<Stats>();
  return start(
      info.Env(), std::move(lease), KeepAlive(),
      [m, result, work](const ModelWorker::Report&) { *result = work(*m); },
      [result](Napi::Env env) -> Napi::Value { return stats_to_js(env, *result); });
}

// sftStep(model, batch {.., targetMask?}, {microBatch, optimizer}) -> Promise<stats>
Napi::Value SftStep(const Napi::CallbackInfo& info) {
  Lease lease(unwrap(info));
  auto batch = std::make_shared<TokensCopy>(tokens_from_js(arg(info, 1), "batch"));
  Args a(arg(info, 2), "options");
  const int64_t micro = a.integer_or("microBatch", 0, kMaxInt32, 0);
  const OptimizerOptions o = optimizer_from_js(a.get("optimizer"), "optimizer");
  return start_model_stats(info, std::move(lease), [batch, micro, o](Model& m) {
    return trainer::sft_step(m, batch->view(), batch->target_mask(), micro, o);
  });
}

// lmEval(model, batch, {microBatch}) -> Promise<stats>
Napi::Value LmEval(const Napi::CallbackInfo& info) {
  Lease lease(unwrap(info));
  auto batch = std::make_shared<TokensCopy>(tokens_from_js(arg(info, 1), "batch"));
  Args a(arg(info, 2), "options");
  const int64_t micro = a.integer_or("microBatch", 0, kMaxInt32, 0);
  return start_model_stats(info, std::move(lease), [batch, micro](Model& m) {
    return trainer::lm_eval(m, batch->view(), batch->target_mask(), micro);
  });
}

struct PairsCopy {
  TokensCopy chosen, rejected;
};

std::shared_ptr<PairsCopy> pairs_from_js(const Napi::Value& v) {
  Args a(v, "pairs");
  auto p = std::make_shared<PairsCopy>();
  p->chosen = tokens_from_js(a.get("chosen"), "chosen");
  p->rejected = tokens_from_js(a.get("rejected"), "rejected");
  return p;
}

trainer::PairBatch pair_view(const PairsCopy& p) {
  return {p.chosen.view(), p.rejected.view(), p.chosen.target_mask()};
}

// rewardModelStep(model, {chosen, rejected}, {lmCoef, microBatch, optimizer}) -> Promise<stats>
Napi::Value RewardModelStep(const Napi::CallbackInfo& info) {
  Lease lease(unwrap(info));
  auto pairs = pairs_from_js(arg(info, 1));
  Args a(arg(info, 2), "options");
  const double lm_coef = a.number_or("lmCoef", 0.0);
  const int64_t micro = a.integer_or("microBatch", 0, kMaxInt32, 0);
  const OptimizerOptions o = optimizer_from_js(a.get("optimizer"), "optimizer");
  return start_model_stats(info, std::move(lease), [pairs, lm_coef, micro, o](Model& m) {
    return trainer::reward_model_step(m, pair_view(*pairs), lm_coef, micro, o);
  });
}

// rewardModelEval(model, {chosen, rejected}, {microBatch}) -> Promise<{stats, chosenScores, rejectedScores}>
Napi::Value RewardModelEval(const Napi::CallbackInfo& info) {
  Lease lease(unwrap(info));
  auto pairs = pairs_from_js(arg(info, 1));
  Args a(arg(info, 2), "options");
  const int64_t micro = a.integer_or("microBatch", 0, kMaxInt32, 0);
  Model* m = lease.model();
  if (ModelState* s = lease.state()) s->retained.valid = false;
  struct Out {
    Stats stats;
    std::vector<float> chosen, rejected;
  };
  auto out = std::make_shared<Out>();
  return start(
      info.Env(), std::move(lease), KeepAlive(),
      [m, pairs, micro, out](const ModelWorker::Report&) {
        out->stats = trainer::reward_model_eval(*m, pair_view(*pairs), micro, &out->chosen, &out->rejected);
      },
      [out](Napi::Env env) -> Napi::Value {
        Napi::Object o = Napi::Object::New(env);
        o.Set("stats", stats_to_js(env, out->stats));
        o.Set("chosenScores", typed_copy<float, Napi::Float32Array>(env, out->chosen));
        o.Set("rejectedScores", typed_copy<float, Napi::Float32Array>(env, out->rejected));
        return o;
      });
}

// scoreSequences(model, batch, {microBatch}) -> Promise<Float32Array>
Napi::Value ScoreSequences(const Napi::CallbackInfo& info) {
  Lease lease(unwrap(info));
  auto batch = std::make_shared<TokensCopy>(tokens_from_js(arg(info, 1), "batch"));
  Args a(arg(info, 2), "options");
  const int64_t micro = a.integer_or("microBatch", 0, kMaxInt32, 0);
  Model* m = lease.model();
  if (ModelState* s = lease.state()) s->retained.valid = false;
  auto out = std::make_shared<std::vector<float>>();
  return start(
      info.Env(), std::move(lease), KeepAlive(),
      [m, batch, micro, out](const ModelWorker::Report&) { *out = trainer::score_sequences(*m, batch->view(), micro); },
      [out](Napi::Env env) -> Napi::Value { return typed_copy<float, Napi::Float32Array>(env, *out); });
}

// ---- optimizer state files (resume) ---------------------------------------------------------------
// modelSaveOptimizer(model, {path}) -> Promise<{steps}>: "exp_avg" and "exp_avg_sq" [P] (atomic)
Napi::Value ModelSaveOptimizer(const Napi::CallbackInfo& info) {
  Lease lease(unwrap(info));
  Args a(arg(info, 1), "options");
  const std::string path = a.string("path");
  Model* m = lease.model();
  auto steps = std::make_shared<int64_t>(0);
  return start(
      info.Env(), std::move(lease), KeepAlive(),
      [m, path, steps](const ModelWorker::Report&) {
        const int64_t P = m->parameter_count();
        std::vector<float> zeros;
        const float* mm = m->optimizer_m();
        const float* vv = m->optimizer_v();
        if (!mm) {
          zeros.assign(static_cast<size_t>(P), 0.0f);
          mm = vv = zeros.data();
        }
        model::write_safetensors(path, {{"exp_avg", {P}, mm}, {"exp_avg_sq", {P}, vv}});
        *steps = m->optimizer_steps();
      },
      [steps](Napi::Env env) -> Napi::Value {
        Napi::Object o = Napi::Object::New(env);
        o.Set("steps", static_cast<double>(*steps));
        return o;
      });
}

// modelLoadOptimizer(model, {path, steps}) -> Promise<undefined>
Napi::Value ModelLoadOptimizer(const Napi::CallbackInfo& info) {
  Lease lease(unwrap(info));
  Args a(arg(info, 1), "options");
  const std::string path = a.string("path");
  const int64_t steps = a.integer("steps", 0, INT64_C(1) << 52);
  Model* m = lease.model();
  return start(info.Env(), std::move(lease), KeepAlive(), [m, path, steps](const ModelWorker::Report&) {
    const int64_t P = m->parameter_count();
    const std::vector<float> mm = model::read_safetensors_f32(path, "exp_avg", {P});
    const std::vector<float> vv = model::read_safetensors_f32(path, "exp_avg_sq", {P});
    if (steps == 0) m->set_optimizer_state(nullptr, nullptr, 0);
    else m->set_optimizer_state(mm.data(), vv.data(), steps);
  }, nullptr);
}

// estimateModelMemory({config, trainable, batch, steps, generateBatch, generateSteps, device?})
// -> bytes by kind
Napi::Value EstimateModelMemory(const Napi::CallbackInfo& info) {
  Args a(arg(info, 0));
  const model::ModelConfig config = config_from_js(a.get("config"));
  const bool trainable = a.flag("trainable", true);
  const int64_t batch = a.integer_or("batch", 0, kMaxInt32, 0), steps = a.integer_or("steps", 0, kMaxInt32, 0);
  const int64_t gb = a.integer_or("generateBatch", 0, kMaxInt32, 0), gs = a.integer_or("generateSteps", 0, kMaxInt32, 0);
  const Device device = a.has("device") && a.string("device") == "cuda" ? Device::Cuda : Device::Cpu;
  return memory_to_js(info.Env(), Model::estimate_memory(config, trainable, batch, steps, gb, gs, device));
}

}  // namespace

void register_trainers(Napi::Env env, Napi::Object exports) {
  exports.Set("ppoTrainerCreate", Napi::Function::New(env, guarded<PpoTrainerCreate>));
  exports.Set("ppoTrainerSetOptions", Napi::Function::New(env, guarded<PpoTrainerSetOptions>));
  exports.Set("ppoTrainerGetState", Napi::Function::New(env, guarded<PpoTrainerGetState>));
  exports.Set("ppoTrainerSetState", Napi::Function::New(env, guarded<PpoTrainerSetState>));
  exports.Set("ppoTrainerSetPtx", Napi::Function::New(env, guarded<PpoTrainerSetPtx>));
  exports.Set("ppoTrainerRollout", Napi::Function::New(env, guarded<PpoTrainerRollout>));
  exports.Set("ppoTrainerScore", Napi::Function::New(env, guarded<PpoTrainerScore>));
  exports.Set("ppoTrainerShape", Napi::Function::New(env, guarded<PpoTrainerShape>));
  exports.Set("ppoTrainerUpdate", Napi::Function::New(env, guarded<PpoTrainerUpdate>));
  exports.Set("ppoTrainerStep", Napi::Function::New(env, guarded<PpoTrainerStep>));
  exports.Set("ppoTrainerStepWithScores", Napi::Function::New(env, guarded<PpoTrainerStepWithScores>));
  exports.Set("ppoTrainerPretrainCritic", Napi::Function::New(env, guarded<PpoTrainerPretrainCritic>));
  exports.Set("sftStep", Napi::Function::New(env, guarded<SftStep>));
  exports.Set("lmEval", Napi::Function::New(env, guarded<LmEval>));
  exports.Set("rewardModelStep", Napi::Function::New(env, guarded<RewardModelStep>));
  exports.Set("rewardModelEval", Napi::Function::New(env, guarded<RewardModelEval>));
  exports.Set("scoreSequences", Napi::Function::New(env, guarded<ScoreSequences>));
  exports.Set("modelSaveOptimizer", Napi::Function::New(env, guarded<ModelSaveOptimizer>));
  exports.Set("modelLoadOptimizer", Napi::Function::New(env, guarded<ModelLoadOptimizer>));
  exports.Set("estimateModelMemory", Napi::Function::New(env, guarded<EstimateModelMemory>));
}

}  // namespace ppo::addon
