#include "core/validate.h"

#include <cmath>
#include <sstream>

#include "core/error.h"

namespace ppo::validate {

namespace {
// Beyond this an int64 element count of float32 data cannot be real memory anyway.
constexpr int64_t kMaxElements = int64_t(1) << 40;
}

void positive_size(int64_t value, const char* name) {
  if (value <= 0 || value > kMaxElements) {
    std::ostringstream s;
    s << name << " must be a positive size, got " << value;
    throw Error(ErrorCode::InvalidArgument, s.str(), name);
  }
}

void present(const void* ptr, const char* name) {
  require(ptr != nullptr, ErrorCode::InvalidArgument, std::string(name) + " is required", name);
}

// Each check first counts offending entries with a branch-free loop (vectorized,
// memory-speed); only when one exists does a second, plain loop find and report
// the first. The fast path is all that valid input ever pays.
namespace {
inline bool is_finite_fast(float x) { return (x - x) == 0.0f; }  // false for NaN, +-inf
inline bool is_valid(const float* mask, int64_t i) { return !mask || mask[i] != 0.0f; }
}  // namespace

void finite(const float* values, int64_t count, const char* name) {
  finite_where_valid(values, nullptr, count, name);
}

void finite_where_valid(const float* values, const float* mask, int64_t count, const char* name) {
  int64_t bad = 0;
  if (!mask) {
    for (int64_t i = 0; i < count; ++i) bad += !is_finite_fast(values[i]);
  } else {
    for (int64_t i = 0; i < count; ++i) bad += (mask[i] != 0.0f) & !is_finite_fast(values[i]);
  }
  if (bad == 0) return;
  for (int64_t i = 0; i < count; ++i) {
    if (is_valid(mask, i) && !std::isfinite(values[i])) {
      std::ostringstream s;
      s << name << "[" << i << "] is " << values[i]
        << (mask ? " at a valid (unmasked) position" : "") << ": expected a finite number";
      throw Error(ErrorCode::NonFinite, s.str(), name);
    }
  }
}

void mask_values(const float* mask, int64_t count) {
  if (!mask) return;
  int64_t bad = 0;
  for (int64_t i = 0; i < count; ++i) bad += (mask[i] != 0.0f) & (mask[i] != 1.0f);
  if (bad == 0) return;
  for (int64_t i = 0; i < count; ++i) {
    if (mask[i] != 0.0f && mask[i] != 1.0f) {
      std::ostringstream s;
      s << "mask[" << i << "] is " << mask[i] << ": a mask holds only 0 (padding) and 1 (valid)";
      throw Error(ErrorCode::OutOfRange, s.str(), "mask");
    }
  }
}

void tokens_in_range(const int32_t* tokens, const float* mask, int64_t count, int64_t vocab) {
  int64_t bad = 0;
  for (int64_t i = 0; i < count; ++i)
    bad += (!mask || mask[i] != 0.0f) & ((tokens[i] < 0) | (tokens[i] >= vocab));
  if (bad == 0) return;
  for (int64_t i = 0; i < count; ++i) {
    if (!is_valid(mask, i)) continue;
    if (tokens[i] < 0 || tokens[i] >= vocab) {
      std::ostringstream s;
      s << "tokens[" << i << "] is " << tokens[i] << ": token ids must lie in [0, " << vocab
        << ")";
      throw Error(ErrorCode::OutOfRange, s.str(), "tokens");
    }
  }
}

namespace {
// Counts NaN/+inf entries and finite entries of a row without branches, so the
// common all-good case vectorizes; the slow search below runs only on a bad row.
void count_row(const float* row, int64_t vocab, int64_t* bad, int64_t* finite) {
  int32_t b = 0, f = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    const float x = row[v];
    b += (x != x) | (x == INFINITY);
    f += (x - x) == 0.0f;  // 0 for NaN and +-inf
  }
  *bad = b;
  *finite = f;
}
}  // namespace

void logits_rows(const float* logits, const int32_t* tokens, const float* mask, int64_t row_begin,
                 int64_t row_end, int64_t vocab) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    if (mask && mask[r] == 0.0f) continue;
    const float* row = logits + r * vocab;
    int64_t bad = 0, finite_count = 0;
    count_row(row, vocab, &bad, &finite_count);
    if (bad > 0) {
      for (int64_t v = 0; v < vocab; ++v) {
        const float x = row[v];
        if (std::isnan(x) || x == INFINITY) {
          std::ostringstream s;
          s << "logits[" << r * vocab + v << "] is " << x
            << ": logits may be -Infinity (a banned token) but never NaN or +Infinity";
          throw Error(ErrorCode::NonFinite, s.str(), "logits");
        }
      }
    }
    if (finite_count == 0) {
      std::ostringstream s;
      s << "logits row " << r << " is -Infinity everywhere: no token has any probability";
      throw Error(ErrorCode::NonFinite, s.str(), "logits");
    }
    if (tokens && !std::isfinite(row[tokens[r]])) {
      std::ostringstream s;
      s << "logits[" << r * vocab + tokens[r] << "] of the taken token " << tokens[r]
        << " at row " << r << " is -Infinity: that token has probability zero";
      throw Error(ErrorCode::NonFinite, s.str(), "logits");
    }
  }
}

void scalar_in_range(double value, double lo, double hi, bool lo_open, const char* name) {
  bool ok = std::isfinite(value) && (lo_open ? value > lo : value >= lo) && value <= hi;
  if (!ok) {
    std::ostringstream s;
    s << name << " must be " << (std::isfinite(value) ? "" : "finite and ") << "in "
      << (lo_open ? "(" : "[") << lo << ", " << hi << "], got " << value;
    throw Error(ErrorCode::InvalidArgument, s.str(), name);
  }
}

}  // namespace ppo::validate
