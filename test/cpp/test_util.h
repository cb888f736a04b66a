// Shared helpers of the C++ tests: seeded random inputs, masks, NaN poisoning, widening
// to double for the float64 reference.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace tu {

using Rng = std::mt19937;

inline const float kNaN = std::numeric_limits<float>::quiet_NaN();
inline const float kInf = std::numeric_limits<float>::infinity();

inline int64_t rand_int(Rng& rng, int64_t lo, int64_t hi) {  // inclusive
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}
inline double rand_uniform(Rng& rng, double lo, double hi) {
  return std::uniform_real_distribution<double>(lo, hi)(rng);
}

inline std::vector<float> normal(Rng& rng, int64_t n, double mean = 0.0, double std = 1.0) {
  std::normal_distribution<double> d(mean, std);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<float>(d(rng));
  return v;
}

inline std::vector<float> uniform(Rng& rng, int64_t n, double lo, double hi) {
  std::uniform_real_distribution<double> d(lo, hi);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<float>(d(rng));
  return v;
}

inline std::vector<int32_t> tokens(Rng& rng, int64_t n, int64_t vocab) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<int32_t>(rand_int(rng, 0, vocab - 1));
  return v;
}

// Mask kinds a test can ask for.
enum class MaskKind {
  Ones,        // every position valid
  Suffix,      // right padding: each row valid on [0, len), len in [0, steps]
  Prefix,      // left padding: each row valid on [steps - len, steps)
  Random,      // independent 0/1 per position (holes in the middle)
  Mixed,       // a row-wise mix of the above, with some all-masked rows
};

inline std::vector<float> make_mask(Rng& rng, int64_t batch, int64_t steps, MaskKind kind) {
  std::vector<float> m(static_cast<size_t>(batch * steps), 1.0f);
  for (int64_t b = 0; b < batch; ++b) {
    MaskKind k = kind;
    if (kind == MaskKind::Mixed) {
      int64_t r = rand_int(rng, 0, 4);
      k = r == 0 ? MaskKind::Ones : r == 1 ? MaskKind::Suffix : r == 2 ? MaskKind::Prefix
                                                                      : MaskKind::Random;
      if (r == 4) {  // an all-masked row
        for (int64_t t = 0; t < steps; ++t) m[b * steps + t] = 0.0f;
        continue;
      }
    }
    const int64_t len = rand_int(rng, 0, steps);
    for (int64_t t = 0; t < steps; ++t) {
      float v = 1.0f;
      switch (k) {
        case MaskKind::Ones: v = 1.0f; break;
        case MaskKind::Suffix: v = t < len ? 1.0f : 0.0f; break;
        case MaskKind::Prefix: v = t >= steps - len ? 1.0f : 0.0f; break;
        case MaskKind::Random: v = rand_int(rng, 0, 2) > 0 ? 1.0f : 0.0f; break;
        case MaskKind::Mixed: break;
      }
      m[b * steps + t] = v;
    }
  }
  return m;
}

inline const char* mask_kind_name(MaskKind k) {
  switch (k) {
    case MaskKind::Ones: return "ones";
    case MaskKind::Suffix: return "suffix";
    case MaskKind::Prefix: return "prefix";
    case MaskKind::Random: return "random";
    case MaskKind::Mixed: return "mixed";
  }
  return "?";
}

inline std::vector<double> to_double(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}
// nullptr-preserving widening: returns an empty vector for a null mask.
inline std::vector<double> mask_to_double(const float* mask, int64_t n) {
  if (!mask) return {};
  return std::vector<double>(mask, mask + n);
}
inline const double* ptr_or_null(const std::vector<double>& v) {
  return v.empty() ? nullptr : v.data();
}

// Output buffers are filled with NaN before every call, so an element the op leaves
// unwritten shows up as a NaN mismatch.
inline std::vector<float> poisoned(int64_t n) {
  return std::vector<float>(static_cast<size_t>(n), kNaN);
}

// Changes the data at masked positions (index i where mask[i] == 0) to other finite
// values, for the "padding never changes the results" checks.
inline void scramble_masked(std::vector<float>& data, const std::vector<float>& mask,
                            Rng& rng, int64_t inner = 1, double scale = 1e3) {
  for (size_t i = 0; i < mask.size(); ++i)
    if (mask[i] == 0.0f)
      for (int64_t k = 0; k < inner; ++k)
        data[i * inner + k] = static_cast<float>(rand_uniform(rng, -scale, scale));
}

// Puts NaN, +inf and -inf (cyclically) at masked positions: validation only checks
// valid positions ("masked-out entries may hold anything"), so kernels must select,
// never multiply by the mask (NaN * 0 is NaN).
inline void nonfinite_masked(std::vector<float>& data, const std::vector<float>& mask,
                             int64_t inner = 1) {
  const float vals[] = {kNaN, kInf, -kInf};
  int64_t k = 0;
  for (size_t i = 0; i < mask.size(); ++i)
    if (mask[i] == 0.0f)
      for (int64_t j = 0; j < inner; ++j) data[i * inner + j] = vals[k++ % 3];
}

inline double max_abs(const std::vector<float>& v) {
  double m = 0.0;
  for (float x : v)
    if (std::isfinite(x)) m = std::max(m, std::fabs(static_cast<double>(x)));
  return m;
}

inline std::string shape_str(int64_t b, int64_t t, int64_t v = -1) {
  std::string s = "[" + std::to_string(b) + "," + std::to_string(t);
  if (v >= 0) s += "," + std::to_string(v);
  return s + "]";
}

}  // namespace tu
