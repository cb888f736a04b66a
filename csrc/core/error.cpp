#include "core/error.h"

namespace ppo {

const char* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::InvalidArgument: return "ERR_INVALID_ARGUMENT";
    case ErrorCode::ShapeMismatch: return "ERR_SHAPE_MISMATCH";
    case ErrorCode::NonFinite: return "ERR_NON_FINITE";
    case ErrorCode::OutOfRange: return "ERR_OUT_OF_RANGE";
    case ErrorCode::CudaUnavailable: return "ERR_CUDA_UNAVAILABLE";
    case ErrorCode::CudaError: return "ERR_CUDA";
    case ErrorCode::OutOfMemory: return "ERR_OUT_OF_MEMORY";
    case ErrorCode::NotFound: return "ERR_NOT_FOUND";
    case ErrorCode::CorruptFile: return "ERR_CORRUPT_FILE";
    case ErrorCode::IoError: return "ERR_IO";
    case ErrorCode::Disposed: return "ERR_DISPOSED";
    case ErrorCode::Busy: return "ERR_BUSY";
    case ErrorCode::Internal: return "ERR_INTERNAL";
  }
  return "ERR_INTERNAL";
}

}  // namespace ppo
