// JS entry points of the trainers (trainer/trainer.h), used by lib/trainers.ts.
#pragma once
#include <napi.h>

namespace ppo::addon {
// Adds ppoTrainer*, sftStep, lmEval, rewardModelStep/Eval, scoreSequences,
// modelSave/LoadOptimizer and estimateModelMemory to the exports.
void register_trainers(Napi::Env env, Napi::Object exports);
}  // namespace ppo::addon
