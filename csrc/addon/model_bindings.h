// JS entry points of the GPT-2 engine (model/gpt.h), used by lib/model.ts.
#pragma once
#include <napi.h>

namespace ppo::addon {
// Adds the model functions (modelCreate, modelLoad, modelForward, ...) to the exports.
void register_model(Napi::Env env, Napi::Object exports);
}  // namespace ppo::addon
