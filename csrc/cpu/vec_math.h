// Branch-free float math that GCC and Clang vectorize, plus the attribute that
// compiles a hot loop for AVX-512, AVX2 and baseline x86-64 and picks one at load
// time (so one binary runs fast everywhere without -march=native).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define PPO_CPU_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PPO_CPU_MULTIVERSION
#endif

namespace ppo::cpu {

// exp(x) for float within ~2 ulp over the normal range; exactly 0 for
// x < -87.3 (including -inf) and +inf-free by clamping above 88.7.
// Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6
// polynomial for e^r (Cephes' coefficients) and 2^n assembled in the exponent bits.
inline float fast_exp(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const bool underflow = x < -87.33654f;  // also true for -inf
  // Clamp with selects that send NaN to the lower bound (its comparison is false), so
  // the float-to-int conversion below is always defined; NaN is passed through at the end.
  float xc = x > -87.33654f ? x : -87.33654f;
  xc = xc < 88.72283f ? xc : 88.72283f;
  // Round to nearest by adding and subtracting 1.5 * 2^23 (vectorizes on plain SSE2).
  const float kRound = 12582912.0f;
  const float n = (xc * kLog2e + kRound) - kRound;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float result = underflow ? 0.0f : p * scale;
  return x != x ? x : result;
}

// Reductions over float lanes: GCC vectorizes a loop only when each lane has its own
// accumulator (it may not reorder a single float sum without -ffast-math). Loops
// process kLanes elements at a time into kLanes independent accumulators.
constexpr int kLanes = 16;

}  // namespace ppo::cpu
