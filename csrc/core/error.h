// ppo::Error: the one error type of the core. Every failure the core can detect
// (bad shape, bad value, missing device, CUDA failure, out of memory) is thrown as
// a ppo::Error carrying a stable code and, when an argument is to blame, its name.
// The addon turns it into a JS Error with `code` and `argument` properties; C++
// users catch it directly. Nothing in the core aborts or exits.
#pragma once

#include <stdexcept>
#include <string>

namespace ppo {

enum class ErrorCode {
  InvalidArgument,   // a bad option or argument value (e.g. gamma outside [0, 1])
  ShapeMismatch,     // lengths or dimensions that disagree
  NonFinite,         // NaN or infinity where it makes no sense
  OutOfRange,        // a value outside its allowed range (token id >= vocab, mask not 0/1)
  CudaUnavailable,   // CUDA asked for, but not compiled in or no usable device
  CudaError,         // a CUDA runtime call or kernel launch failed
  OutOfMemory,       // host or device allocation failed
  NotFound,          // a file or directory that does not exist (a checkpoint path)
  CorruptFile,       // a file that exists but cannot be parsed (truncated, bad header)
  IoError,           // reading or writing a file failed (disk full, permissions)
  Disposed,          // a call on a model (or other handle) after dispose()
  Busy,              // a call on a model while another call on it is running
  Internal,          // a bug in ppo-max: please report it
};

// Stable string code, e.g. "ERR_SHAPE_MISMATCH". Part of the public API: never rename.
const char* error_code_name(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message, std::string argument = "")
      : std::runtime_error(message), code_(code), argument_(std::move(argument)) {}
  ErrorCode code() const { return code_; }
  // Name of the offending argument ("logits", "options.gamma", ...), or "" if none.
  const std::string& argument() const { return argument_; }

 private:
  ErrorCode code_;
  std::string argument_;
};

// Throws ppo::Error(code, message, argument) when `condition` is false.
inline void require(bool condition, ErrorCode code, const std::string& message,
                    const std::string& argument = "") {
  if (!condition) throw Error(code, message, argument);
}

}  // namespace ppo
