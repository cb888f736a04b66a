#include "addon/convert.h"

#include <new>

namespace ppo::addon {

[[noreturn]] void throw_invalid(const std::string& message, const std::string& argument) {
  throw ppo::Error(ErrorCode::InvalidArgument, message, argument);
}

namespace {

Napi::Value get(const Napi::Object& args, const char* name) { return args.Get(name); }

bool absent(const Napi::Value& v) { return is_absent(v); }

}  // namespace

const float* OpCall::f32(const char* name, int64_t length, bool optional) {
  return typed_array<float, napi_float32_array>(args_, name, length, optional,
                                                "Float32Array", keep_alive_);
}

const int32_t* OpCall::i32(const char* name, int64_t length) {
  return typed_array<int32_t, napi_int32_array>(args_, name, length, false, "Int32Array",
                                                keep_alive_);
}

float* OpCall::output(const char* key, int64_t length) {
  auto arr = Napi::Float32Array::New(args_.Env(), static_cast<size_t>(length));
  outputs_.emplace_back(key, Napi::Persistent(Napi::Value(arr)));
  return arr.Data();
}

int64_t OpCall::size(const char* name) {
  Napi::Value v = get(args_, name);
  if (!v.IsNumber()) throw_invalid(std::string(name) + " must be a number", name);
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 1 && d <= 9007199254740991.0) || d != static_cast<double>(static_cast<int64_t>(d))) {
    throw_invalid(std::string(name) + " must be a positive integer, got " + std::to_string(d), name);
  }
  return static_cast<int64_t>(d);
}

double OpCall::number(const char* name) {
  Napi::Value v = get(args_, name);
  if (!v.IsNumber()) throw_invalid(std::string(name) + " must be a number", name);
  return v.As<Napi::Number>().DoubleValue();
}

std::optional<double> OpCall::optional_number(const char* name) {
  if (absent(get(args_, name))) return std::nullopt;
  return number(name);
}

bool OpCall::flag(const char* name, bool fallback) {
  Napi::Value v = get(args_, name);
  if (absent(v)) return fallback;
  if (!v.IsBoolean()) throw_invalid(std::string(name) + " must be a boolean", name);
  return v.As<Napi::Boolean>().Value();
}

std::string OpCall::string(const char* name, const std::string& fallback) {
  Napi::Value v = get(args_, name);
  if (absent(v)) return fallback;
  if (!v.IsString()) throw_invalid(std::string(name) + " must be a string", name);
  return v.As<Napi::String>().Utf8Value();
}

Device OpCall::device() {
  std::string d = string("device", "cpu");
  if (d == "cpu") return Device::Cpu;
  if (d == "cuda") return Device::Cuda;
  throw_invalid("device must be 'cpu' or 'cuda' (resolve 'auto' before the native call), got '" +
                    d + "'",
                "device");
}

Napi::Value OpCall::build_result(Napi::Env env) {
  Napi::Object result = Napi::Object::New(env);
  for (auto& [key, ref] : outputs_) result.Set(key, ref.Value());
  for (auto& [key, value] : scalars_) result.Set(key, Napi::Number::New(env, value));
  return result;
}

Napi::Error make_error(Napi::Env env, const std::string& code, const std::string& message,
                       const std::string& argument) {
  Napi::Error error = Napi::Error::New(env, message);
  error.Value().Set("code", Napi::String::New(env, code));
  if (!argument.empty()) error.Value().Set("argument", Napi::String::New(env, argument));
  return error;
}

CaughtError run_guarded(const std::function<void()>& fn) {
  CaughtError caught;
  try {
    fn();
    return caught;
  } catch (const Napi::Error&) {
    throw;  // already a JS exception (e.g. from a JS getter): let node-addon-api rethrow it
  } catch (const ppo::Error& e) {
    caught = {true, error_code_name(e.code()), e.what(), e.argument()};
  } catch (const std::bad_alloc&) {
    caught = {true, error_code_name(ErrorCode::OutOfMemory), "out of host memory", ""};
  } catch (const std::exception& e) {
    caught = {true, error_code_name(ErrorCode::Internal),
              std::string("internal error in ppo-max: ") + e.what(), ""};
  } catch (...) {
    caught = {true, error_code_name(ErrorCode::Internal), "internal error in ppo-max", ""};
  }
  return caught;
}

// Runs the work on a libuv thread; settles the promise on the main thread. The
// OpCall (and with it the references keeping inputs and outputs alive) lives as
// long as the worker, which is destroyed on the main thread after settling.
class OpWorker : public Napi::AsyncWorker {
 public:
  OpWorker(Napi::Env env, OpCall call, OpCall::Work work)
      : Napi::AsyncWorker(env, "ppo-max:op"),
        call_(std::move(call)),
        work_(std::move(work)),
        deferred_(Napi::Promise::Deferred::New(env)) {}

  Napi::Promise promise() { return deferred_.Promise(); }

  void Execute() override {
    caught_ = run_guarded([this] { work_(call_.scalars_); });
  }

  void OnOK() override {
    Napi::Env env = Env();
    if (caught_.failed) {
      deferred_.Reject(make_error(env, caught_.code, caught_.message, caught_.argument).Value());
      return;
    }
    auto settled = run_guarded([&] { deferred_.Resolve(call_.build_result(env)); });
    if (settled.failed) {
      deferred_.Reject(make_error(env, settled.code, settled.message, settled.argument).Value());
    }
  }

  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  OpCall call_;
  OpCall::Work work_;
  Napi::Promise::Deferred deferred_;
  CaughtError caught_;
};

Napi::Value OpCall::finish(Work work, bool async) {
  Napi::Env env = args_.Env();
  if (async) {
    auto* worker = new OpWorker(env, std::move(*this), std::move(work));
    Napi::Promise promise = worker->promise();
    worker->Queue();
    return promise;
  }
  CaughtError caught = run_guarded([&] { work(scalars_); });
  if (caught.failed) throw make_error(env, caught.code, caught.message, caught.argument);
  return build_result(env);
}

}  // namespace ppo::addon
