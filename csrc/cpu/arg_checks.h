// Argument checks shared by the CPU kernels' entry points (layers, attention, optimizer):
// each throws ppo::Error(InvalidArgument) naming the argument.
#pragma once

#include <cstdint>
#include <string>

#include "core/error.h"

namespace ppo::cpu {

// A size (rows, channels, n, ...) must be >= 0.
inline void require_size(int64_t value, const char* name) {
  require(value >= 0, ErrorCode::InvalidArgument,
          std::string(name) + " must be >= 0, got " + std::to_string(value), name);
}

// A pointer to a non-empty array must not be null.
inline void require_data(const void* p, const char* name) {
  require(p != nullptr, ErrorCode::InvalidArgument, std::string(name) + " must not be null", name);
}

}  // namespace ppo::cpu
