#pragma once
#include <napi.h>

namespace ppo::addon {
// Adds the RLHF kernel functions to the module's exports.
void register_ops(Napi::Env env, Napi::Object exports);
}  // namespace ppo::addon
