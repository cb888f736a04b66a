// The addon's plumbing: reading arguments off a JS object, keeping typed arrays alive
// while native code uses them, running an op synchronously or on a libuv worker
// thread behind a promise, and turning every C++ exception into a JS Error that
// carries a stable `code` (and `argument` when one is to blame).
#pragma once

#include <napi.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/error.h"

namespace ppo::addon {

// One native call in the making: the arrays it reads and writes (kept alive until
// it completes), the work, and how to build its JS result on the main thread.
class OpCall {
 public:
  explicit OpCall(const Napi::Object& args) : args_(args) {}

  // Required or optional (null/undefined -> nullptr) typed arrays of an exact length.
  const float* f32(const char* name, int64_t length, bool optional = false);
  const int32_t* i32(const char* name, int64_t length);
  // A new Float32Array output of `length`, set as `key` on the result object.
  float* output(const char* key, int64_t length);

  int64_t size(const char* name);
  double number(const char* name);
  std::optional<double> optional_number(const char* name);  // null/undefined -> nullopt
  bool flag(const char* name, bool fallback);
  std::string string(const char* name, const std::string& fallback);
  Device device();

  // Scalar fields of the result object, which `work` fills (off the main thread).
  using Scalars = std::vector<std::pair<std::string, double>>;
  using Work = std::function<void(Scalars& scalars)>;

  // Runs `work` now (sync) or on a worker thread (async: returns a Promise).
  // `work` must capture only plain values and pointers, never this OpCall.
  Napi::Value finish(Work work, bool async);

 private:
  friend class OpWorker;
  Napi::Value build_result(Napi::Env env);
  Napi::Object args_;
  std::vector<Napi::Reference<Napi::Value>> keep_alive_;
  std::vector<std::pair<std::string, Napi::Reference<Napi::Value>>> outputs_;
  Scalars scalars_;
};

// undefined or null: an argument that was not given.
inline bool is_absent(const Napi::Value& v) { return v.IsUndefined() || v.IsNull(); }

// The typed array args[name] of element type kType ("Float32Array", ... as type_name in
// messages), of exactly `length` elements (any length when length < 0; the length found is
// stored in *actual_length when given). It is kept alive by a reference added to `keep`
// until the call settles. Absent and optional: nullptr. Throws ppo::Error naming `name`:
// InvalidArgument for a missing or wrongly typed value, ShapeMismatch for a wrong length.
template <typename T, napi_typedarray_type kType>
const T* typed_array(const Napi::Object& args, const char* name, int64_t length, bool optional,
                     const char* type_name, std::vector<Napi::Reference<Napi::Value>>& keep,
                     size_t* actual_length = nullptr) {
  Napi::Value v = args.Get(name);
  if (is_absent(v)) {
    if (optional) return nullptr;
    throw ppo::Error(ErrorCode::InvalidArgument, std::string(name) + " is required (a " + type_name + ")", name);
  }
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != kType)
    throw ppo::Error(ErrorCode::InvalidArgument, std::string(name) + " must be a " + type_name, name);
  auto arr = v.As<Napi::TypedArrayOf<T>>();
  if (length >= 0 && static_cast<int64_t>(arr.ElementLength()) != length) {
    throw ppo::Error(ErrorCode::ShapeMismatch,
                     std::string(name) + " has " + std::to_string(arr.ElementLength()) +
                         " elements, expected " + std::to_string(length),
                     name);
  }
  if (actual_length) *actual_length = arr.ElementLength();
  keep.push_back(Napi::Persistent(v));
  return arr.Data();
}

// A JS Error with `code` (and `argument`) from a ppo::Error.
Napi::Error make_error(Napi::Env env, const std::string& code, const std::string& message,
                       const std::string& argument);
// Throws a JS TypeError-like ppo error for bad arguments found in the addon itself.
[[noreturn]] void throw_invalid(const std::string& message, const std::string& argument);

// Runs `fn` and converts any C++ exception to a ppo::Error-shaped record.
struct CaughtError {
  bool failed = false;
  std::string code, message, argument;
};
CaughtError run_guarded(const std::function<void()>& fn);

// Wraps a binding so that no C++ exception escapes into node-addon-api (which only
// converts Napi::Error): everything else becomes a JS Error with a code.
template <Napi::Value (*Binding)(const Napi::CallbackInfo&)>
Napi::Value guarded(const Napi::CallbackInfo& info) {
  Napi::Value result;
  CaughtError caught;
  try {
    caught = run_guarded([&] { result = Binding(info); });
  } catch (const Napi::Error&) {
    throw;
  }
  if (caught.failed) throw make_error(info.Env(), caught.code, caught.message, caught.argument);
  return result;
}

}  // namespace ppo::addon
