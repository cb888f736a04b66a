// Shared by the engine's device-parity tests (test_cuda_engine.cpp, test_cuda_llama.cpp):
// a buffer in the memory of one op table (host memory for the CPU table, device memory for
// CUDA's) and the comparisons the tests make of their outputs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/engine_ops.h"
#include "test_framework.h"

namespace et {

// n elements of T in the memory of one table (host memory for the CPU table).
template <typename T>
class Buf {
 public:
  Buf(const ppo::EngineOps& ops, int64_t n) : ops_(&ops), n_(n) {
    if (n_ > 0) p_ = static_cast<T*>(ops.alloc(bytes()));
  }
  Buf(const ppo::EngineOps& ops, const std::vector<T>& host)
      : Buf(ops, static_cast<int64_t>(host.size())) {
    set(host);
  }
  ~Buf() {
    if (p_ != nullptr) ops_->free(p_);
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;

  T* p() const { return p_; }
  int64_t size() const { return n_; }
  size_t bytes() const { return sizeof(T) * static_cast<size_t>(n_); }
  void set(const std::vector<T>& host) {
    CHECK(static_cast<int64_t>(host.size()) == n_);
    if (n_ > 0) ops_->copy_to_device(p_, host.data(), bytes());
  }
  std::vector<T> get() const {
    std::vector<T> host(static_cast<size_t>(n_));
    if (n_ > 0) ops_->copy_to_host(host.data(), p_, bytes());
    return host;
  }

 private:
  const ppo::EngineOps* ops_;
  int64_t n_ = 0;
  T* p_ = nullptr;
};

// |got[i] - want[i]| <= tol(i) for every i; NaN never passes, infinities must be equal.
// Reports the first few bad elements and a count.
template <typename Tol>
void check_close(const std::vector<float>& got, const std::vector<float>& want, Tol tol,
                 const std::string& what) {
  ++tf::state().checks;
  if (got.size() != want.size()) {
    tf::report_failure(__FILE__, __LINE__,
                       what + ": size " + std::to_string(got.size()) + " vs " +
                           std::to_string(want.size()));
    return;
  }
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], w = want[i], t = tol(i);
    bool ok;
    if (std::isnan(g) || std::isnan(w)) ok = false;
    else if (std::isinf(g) || std::isinf(w)) ok = g == w;
    else ok = std::fabs(g - w) <= t;
    if (!ok) {
      if (bad < 3) {
        tf::report_failure(__FILE__, __LINE__,
                           what + "[" + std::to_string(i) + "] = " + tf::fmt_double(g) +
                               ", expected " + tf::fmt_double(w) + " (|diff| " +
                               tf::fmt_double(std::fabs(g - w)) + " > tol " +
                               tf::fmt_double(t) + ")");
      }
      ++bad;
    }
  }
  if (bad > 3)
    tf::report_failure(__FILE__, __LINE__,
                       what + ": " + std::to_string(bad) + " of " + std::to_string(got.size()) +
                           " elements outside the tolerance");
}

// Bit-identical arrays (NaN payloads included), optionally only where keep(i) is true.
template <typename T, typename Keep>
void check_bits_where(const std::vector<T>& a, const std::vector<T>& b, Keep keep,
                      const std::string& what) {
  ++tf::state().checks;
  if (a.size() != b.size()) {
    tf::report_failure(__FILE__, __LINE__,
                       what + ": size " + std::to_string(a.size()) + " vs " +
                           std::to_string(b.size()));
    return;
  }
  int64_t bad = 0, first = -1, n = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!keep(i)) continue;
    ++n;
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++bad;
    }
  }
  if (bad > 0)
    tf::report_failure(__FILE__, __LINE__,
                       what + ": " + std::to_string(bad) + " of " + std::to_string(n) +
                           " elements not bit-identical, first [" + std::to_string(first) +
                           "]: " + tf::fmt_double(static_cast<double>(a[first])) + " vs " +
                           tf::fmt_double(static_cast<double>(b[first])));
}

template <typename T>
void check_bits(const std::vector<T>& a, const std::vector<T>& b, const std::string& what) {
  check_bits_where(a, b, [](size_t) { return true; }, what);
}

}  // namespace et
