// JS entry points of the RLHF kernels. Each takes one object of arguments (already
// shaped by lib/ops.ts) and a flag: async (returns a Promise, runs on a worker
// thread) or sync. The math is in core/op_args.h; validation in core/ops.cpp.
#include "addon/ops_bindings.h"

#include <optional>

#include "addon/convert.h"
#include "core/ops.h"

namespace ppo::addon {

namespace {

bool is_async(const Napi::CallbackInfo& info) { return info.Length() > 1 && info[1].ToBoolean(); }

Napi::Object args_object(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsObject()) throw_invalid("expected an arguments object", "args");
  return info[0].As<Napi::Object>();
}

KlEstimator parse_estimator(const std::string& name) {
  if (name == "k1") return KlEstimator::K1;
  if (name == "k2") return KlEstimator::K2;
  if (name == "k3") return KlEstimator::K3;
  throw_invalid("estimator must be 'k1', 'k2' or 'k3', got '" + name + "'", "estimator");
}

// The [batch, steps] layout every sequence op starts with.
struct SequenceShape {
  int64_t batch, steps, rows;
};
SequenceShape read_shape(OpCall& call) {
  const int64_t batch = call.size("batch"), steps = call.size("steps");
  return {batch, steps, batch * steps};
}

// Finishes an op whose only results are its output arrays.
template <typename Args>
Napi::Value run_op(OpCall& call, const Napi::CallbackInfo& info, const Args& args,
                   void (*op)(Device, const Args&)) {
  const Device device = call.device();
  return call.finish([args, device, op](OpCall::Scalars&) { op(device, args); }, is_async(info));
}

Napi::Value LogprobsFromLogits(const Napi::CallbackInfo& info) {
  OpCall call(args_object(info));
  LogprobsArgs a;
  a.batch = call.size("batch");
  a.steps = call.size("steps");
  a.vocab = call.size("vocab");
  const int64_t rows = a.batch * a.steps;
  a.logits = call.f32("logits", rows * a.vocab);
  a.tokens = call.i32("tokens", rows);
  a.mask = call.f32("mask", rows, true);
  a.temperature = static_cast<float>(call.number("temperature"));
  a.logprobs = call.output("logprobs", rows);
  if (call.flag("entropy", false)) a.entropy = call.output("entropy", rows);
  return run_op(call, info, a, logprobs_from_logits);
}

Napi::Value LogprobsBackward(const Napi::CallbackInfo& info) {
  OpCall call(args_object(info));
  LogprobsBackwardArgs a;
  a.batch = call.size("batch");
  a.steps = call.size("steps");
  a.vocab = call.size("vocab");
  const int64_t rows = a.batch * a.steps;
  a.logits = call.f32("logits", rows * a.vocab);
  a.tokens = call.i32("tokens", rows);
  a.mask = call.f32("mask", rows, true);
  a.temperature = static_cast<float>(call.number("temperature"));
  a.grad_logprobs = call.f32("gradLogprobs", rows, true);
  a.grad_entropy = call.f32("gradEntropy", rows, true);
  a.grad_logits = call.output("gradLogits", rows * a.vocab);
  return run_op(call, info, a, logprobs_backward);
}

Napi::Value KlPenalizedRewards(const Napi::CallbackInfo& info) {
  OpCall call(args_object(info));
  KlRewardsArgs a;
  const SequenceShape shape = read_shape(call);
  a.batch = shape.batch;
  a.steps = shape.steps;
  const int64_t rows = shape.rows;
  a.logprobs = call.f32("logprobs", rows);
  a.ref_logprobs = call.f32("refLogprobs", rows);
  a.scores = call.f32("scores", a.batch);
  a.mask = call.f32("mask", rows, true);
  a.kl_coef = static_cast<float>(call.number("klCoef"));
  a.estimator = parse_estimator(call.string("estimator", "k1"));
  a.rewards = call.output("rewards", rows);
  a.kl = call.output("kl", rows);
  return run_op(call, info, a, kl_penalized_rewards);
}

Napi::Value BatchMoments(const Napi::CallbackInfo& info) {
  OpCall call(args_object(info));
  MomentsArgs a;
  a.count = call.size("count");
  a.values = call.f32("values", a.count);
  Device device = call.device();
  return call.finish(
      [a, device](OpCall::Scalars& out) {
        Moments m = batch_moments(device, a);
        out = {{"count", m.count}, {"mean", m.mean}, {"m2", m.m2}};
      },
      is_async(info));
}

Napi::Value NormalizeScores(const Napi::CallbackInfo& info) {
  OpCall call(args_object(info));
  NormalizeScoresArgs a;
  a.count = call.size("count");
  a.values = call.f32("values", a.count);
  a.mean = call.number("mean");
  a.std = call.number("std");
  a.subtract_mean = call.flag("subtractMean", true);
  a.eps = static_cast<float>(call.number("eps"));
  a.clip = static_cast<float>(call.number("clip"));
  a.out = call.output("scores", a.count);
  return run_op(call, info, a, normalize_scores);
}

Napi::Value Gae(const Napi::CallbackInfo& info) {
  OpCall call(args_object(info));
  GaeArgs a;
  const SequenceShape shape = read_shape(call);
  a.batch = shape.batch;
  a.steps = shape.steps;
  const int64_t rows = shape.rows;
  a.rewards = call.f32("rewards", rows);
  a.values = call.f32("values", rows);
  a.mask = call.f32("mask", rows, true);
  a.gamma = static_cast<float>(call.number("gamma"));
  a.lambda = static_cast<float>(call.number("lambda"));
  a.advantages = call.output("advantages", rows);
  a.returns = call.output("returns", rows);
  return run_op(call, info, a, gae);
}

Napi::Value Whiten(const Napi::CallbackInfo& info) {
  OpCall call(args_object(info));
  WhitenArgs a;
  const SequenceShape shape = read_shape(call);
  a.batch = shape.batch;
  a.steps = shape.steps;
  const int64_t rows = shape.rows;
  a.values = call.f32("values", rows);
  a.mask = call.f32("mask", rows, true);
  a.shift_mean = call.flag("shiftMean", true);
  a.eps = static_cast<float>(call.number("eps"));
  a.clip = static_cast<float>(call.number("clip"));
  a.out = call.output("values", rows);
  return run_op(call, info, a, whiten);
}

Napi::Value ClipMasked(const Napi::CallbackInfo& info) {
  OpCall call(args_object(info));
  ClipArgs a;
  const SequenceShape shape = read_shape(call);
  a.batch = shape.batch;
  a.steps = shape.steps;
  const int64_t rows = shape.rows;
  a.values = call.f32("values", rows);
  a.mask = call.f32("mask", rows, true);
  a.clip = static_cast<float>(call.number("clip"));
  a.out = call.output("values", rows);
  return run_op(call, info, a, clip_masked);
}

Napi::Value PolicyLoss(const Napi::CallbackInfo& info) {
  OpCall call(args_object(info));
  PolicyLossArgs a;
  const SequenceShape shape = read_shape(call);
  a.batch = shape.batch;
  a.steps = shape.steps;
  const int64_t rows = shape.rows;
  a.logprobs = call.f32("logprobs", rows);
  a.old_logprobs = call.f32("oldLogprobs", rows);
  a.advantages = call.f32("advantages", rows);
  a.mask = call.f32("mask", rows, true);
  a.clip_eps = static_cast<float>(call.number("clip"));
  a.grad_logprobs = call.output("gradLogprobs", rows);
  Device device = call.device();
  return call.finish(
      [a, device](OpCall::Scalars& out) {
        PolicyLossResult r = policy_loss(device, a);
        out = {{"loss", r.loss},
               {"clipFraction", r.clip_fraction},
               {"approxKl", r.approx_kl},
               {"tokens", static_cast<double>(r.tokens)}};
      },
      is_async(info));
}

Napi::Value ValueLoss(const Napi::CallbackInfo& info) {
  OpCall call(args_object(info));
  ValueLossArgs a;
  const SequenceShape shape = read_shape(call);
  a.batch = shape.batch;
  a.steps = shape.steps;
  const int64_t rows = shape.rows;
  a.values = call.f32("values", rows);
  a.old_values = call.f32("oldValues", rows);
  a.returns = call.f32("returns", rows);
  a.mask = call.f32("mask", rows, true);
  std::optional<double> clip = call.optional_number("clip");  // null: no value clipping
  a.use_clip = clip.has_value();
  a.clip_eps = static_cast<float>(clip.value_or(0.0));
  a.grad_values = call.output("gradValues", rows);
  Device device = call.device();
  return call.finish(
      [a, device](OpCall::Scalars& out) {
        ValueLossResult r = value_loss(device, a);
        out = {{"loss", r.loss},
               {"clipFraction", r.clip_fraction},
               {"tokens", static_cast<double>(r.tokens)}};
      },
      is_async(info));
}

Napi::Value MergeMoments(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto read = [&](size_t i) {
    if (info.Length() <= i || !info[i].IsObject()) throw_invalid("expected moments objects", "moments");
    Napi::Object o = info[i].As<Napi::Object>();
    Moments m;
    m.count = o.Get("count").ToNumber().DoubleValue();
    m.mean = o.Get("mean").ToNumber().DoubleValue();
    m.m2 = o.Get("m2").ToNumber().DoubleValue();
    return m;
  };
  Moments m = merge_moments(read(0), read(1));
  Napi::Object out = Napi::Object::New(env);
  out.Set("count", m.count);
  out.Set("mean", m.mean);
  out.Set("m2", m.m2);
  out.Set("std", moments_std(m));
  return out;
}

}  // namespace

void register_ops(Napi::Env env, Napi::Object exports) {
  exports.Set("logprobsFromLogits", Napi::Function::New(env, guarded<LogprobsFromLogits>));
  exports.Set("logprobsBackward", Napi::Function::New(env, guarded<LogprobsBackward>));
  exports.Set("klPenalizedRewards", Napi::Function::New(env, guarded<KlPenalizedRewards>));
  exports.Set("batchMoments", Napi::Function::New(env, guarded<BatchMoments>));
  exports.Set("mergeMoments", Napi::Function::New(env, guarded<MergeMoments>));
  exports.Set("normalizeScores", Napi::Function::New(env, guarded<NormalizeScores>));
  exports.Set("gae", Napi::Function::New(env, guarded<Gae>));
  exports.Set("whiten", Napi::Function::New(env, guarded<Whiten>));
  exports.Set("clipMasked", Napi::Function::New(env, guarded<ClipMasked>));
  exports.Set("policyLoss", Napi::Function::New(env, guarded<PolicyLoss>));
  exports.Set("valueLoss", Napi::Function::New(env, guarded<ValueLoss>));
}

}  // namespace ppo::addon
