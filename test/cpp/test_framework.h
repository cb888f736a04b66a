// A tiny, self-contained test framework for the ppo-max C++ tests (no gtest, nothing
// to download).
//
//   TEST(name) { CHECK(x == 1); CHECK_NEAR(got, want, 1e-6, 1e-5); }
//   CHECK_THROWS_CODE(ppo::gae(...), ppo::ErrorCode::InvalidArgument, "gamma");
//   PPO_TEST_MAIN()                      // defines main(): runs every TEST
//
// A test file that cannot run in this environment (e.g. the CUDA parity test without a
// GPU) writes its own main() and returns tf::skip_file("reason"), which prints the
// reason and returns 77, the code ctest treats as "skipped" (SKIP_RETURN_CODE 77).
//
// main() prints each test's name with PASS / FAIL, then a summary line, and returns 0
// when every test passed, 1 otherwise. A failing check does not stop its test: every
// failure is counted, and the first few of each test are printed with file:line.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"

namespace tf {

struct TestCase {
  const char* name;
  void (*fn)();
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

struct Registrar {
  Registrar(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

// Failure bookkeeping of the test that is running.
struct State {
  int64_t failures = 0;
  int64_t checks = 0;
  static constexpr int64_t kMaxPrinted = 8;
};
inline State& state() {
  static State s;
  return s;
}

inline void report_failure(const char* file, int line, const std::string& what) {
  State& s = state();
  if (s.failures < State::kMaxPrinted) {
    std::fprintf(stdout, "    %s:%d: %s\n", file, line, what.c_str());
  } else if (s.failures == State::kMaxPrinted) {
    std::fprintf(stdout, "    ... (further failures of this test not printed)\n");
  }
  ++s.failures;
}

inline std::string fmt_double(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

// True when `got` is within abs_tol + rel_tol * |want| of `want`. NaN never matches
// (unless both are NaN: never expected here, so still a failure); equal infinities match.
inline bool near(double got, double want, double abs_tol, double rel_tol) {
  if (std::isnan(got) || std::isnan(want)) return false;
  if (std::isinf(got) || std::isinf(want)) return got == want;
  return std::fabs(got - want) <= abs_tol + rel_tol * std::fabs(want);
}

inline bool check(bool ok, const char* file, int line, const char* expr) {
  ++state().checks;
  if (!ok) report_failure(file, line, std::string("CHECK failed: ") + expr);
  return ok;
}

inline bool check_near(double got, double want, double abs_tol, double rel_tol,
                       const char* file, int line, const char* got_expr,
                       const char* want_expr, const std::string& context = "") {
  ++state().checks;
  if (near(got, want, abs_tol, rel_tol)) return true;
  std::ostringstream os;
  os << "CHECK_NEAR failed: " << got_expr << " = " << fmt_double(got) << " vs "
     << want_expr << " = " << fmt_double(want) << " (|diff| = "
     << fmt_double(std::fabs(got - want)) << ", abs_tol " << abs_tol << ", rel_tol "
     << rel_tol << ")";
  if (!context.empty()) os << " [" << context << "]";
  report_failure(file, line, os.str());
  return false;
}

// Element-wise comparison of two arrays; one failure line per mismatching element (the
// first few printed), each naming the index. Returns true when all match.
template <typename A, typename B>
bool check_all_near(const A* got, const B* want, int64_t n, double abs_tol, double rel_tol,
                    const char* file, int line, const char* what) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    ++state().checks;
    double g = static_cast<double>(got[i]);
    double w = static_cast<double>(want[i]);
    if (!near(g, w, abs_tol, rel_tol)) {
      std::ostringstream os;
      os << what << "[" << i << "] = " << fmt_double(g) << ", expected " << fmt_double(w)
         << " (|diff| = " << fmt_double(std::fabs(g - w)) << ", abs_tol " << abs_tol
         << ", rel_tol " << rel_tol << ")";
      report_failure(file, line, os.str());
      ok = false;
    }
  }
  return ok;
}

// Bit-identical comparison of two float arrays (NaN payloads included).
inline bool check_bitwise_equal(const float* a, const float* b, int64_t n, const char* file,
                                int line, const char* what) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    ++state().checks;
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) {
      std::ostringstream os;
      os << what << "[" << i << "]: " << fmt_double(a[i]) << " and " << fmt_double(b[i])
         << " are not bit-identical";
      report_failure(file, line, os.str());
      ok = false;
    }
  }
  return ok;
}

inline bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

inline int skip_file(const std::string& reason) {
  std::fprintf(stdout, "SKIPPED: %s\n", reason.c_str());
  std::fflush(stdout);
  return 77;
}

// Runs every registered test (or only those whose name contains argv[1]).
inline int run_all(int argc = 0, char** argv = nullptr) {
  const char* filter = argc > 1 ? argv[1] : nullptr;
  int64_t passed = 0, failed = 0;
  std::vector<std::string> failed_names;
  auto t0 = std::chrono::steady_clock::now();
  for (const TestCase& tc : registry()) {
    if (filter && std::strstr(tc.name, filter) == nullptr) continue;
    state() = State{};
    std::fflush(stdout);
    try {
      tc.fn();
    } catch (const ppo::Error& e) {
      std::ostringstream os;
      os << "unexpected ppo::Error (" << ppo::error_code_name(e.code()) << ", argument '"
         << e.argument() << "'): " << e.what();
      report_failure(__FILE__, __LINE__, os.str());
    } catch (const std::exception& e) {
      report_failure(__FILE__, __LINE__, std::string("unexpected exception: ") + e.what());
    } catch (...) {
      report_failure(__FILE__, __LINE__, "unexpected non-std exception");
    }
    if (state().failures == 0) {
      ++passed;
      std::fprintf(stdout, "PASS %s (%lld checks)\n", tc.name,
                   static_cast<long long>(state().checks));
    } else {
      ++failed;
      failed_names.push_back(tc.name);
      std::fprintf(stdout, "FAIL %s (%lld of %lld checks failed)\n", tc.name,
                   static_cast<long long>(state().failures),
                   static_cast<long long>(state().checks));
    }
    std::fflush(stdout);
  }
  double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stdout, "\n%lld passed, %lld failed, %lld total (%.2f s)\n",
               static_cast<long long>(passed), static_cast<long long>(failed),
               static_cast<long long>(passed + failed), secs);
  for (const std::string& n : failed_names) std::fprintf(stdout, "  failed: %s\n", n.c_str());
  std::fflush(stdout);
  return failed == 0 ? 0 : 1;
}

}  // namespace tf

#define TF_CONCAT_INNER(a, b) a##b
#define TF_CONCAT(a, b) TF_CONCAT_INNER(a, b)

#define TEST(name)                                                          \
  static void TF_CONCAT(tf_test_, name)();                                  \
  static ::tf::Registrar TF_CONCAT(tf_registrar_, name)(#name,              \
                                                        &TF_CONCAT(tf_test_, name)); \
  static void TF_CONCAT(tf_test_, name)()

#define CHECK(cond) ::tf::check(static_cast<bool>(cond), __FILE__, __LINE__, #cond)

// |a - b| <= abs_tol + rel_tol * |b|  (b is the expected value).
#define CHECK_NEAR(a, b, abs_tol, rel_tol)                                               \
  ::tf::check_near(static_cast<double>(a), static_cast<double>(b), (abs_tol), (rel_tol), \
                   __FILE__, __LINE__, #a, #b)

// Same, with a context string (e.g. the index or case) printed on failure.
#define CHECK_NEAR_CTX(a, b, abs_tol, rel_tol, ctx)                                      \
  ::tf::check_near(static_cast<double>(a), static_cast<double>(b), (abs_tol), (rel_tol), \
                   __FILE__, __LINE__, #a, #b, (ctx))

#define CHECK_ALL_NEAR(got, want, n, abs_tol, rel_tol, what) \
  ::tf::check_all_near((got), (want), (n), (abs_tol), (rel_tol), __FILE__, __LINE__, (what))

#define CHECK_BITWISE_EQUAL(a, b, n, what) \
  ::tf::check_bitwise_equal((a), (b), (n), __FILE__, __LINE__, (what))

// `expr` must throw ppo::Error with the given code and argument name.
#define CHECK_THROWS_CODE(expr, error_code, arg_name)                                     \
  do {                                                                                    \
    ++::tf::state().checks;                                                               \
    bool tf_threw_ = false;                                                               \
    try {                                                                                 \
      (void)(expr);                                                                       \
    } catch (const ::ppo::Error& tf_e_) {                                                 \
      tf_threw_ = true;                                                                   \
      if (tf_e_.code() != (error_code) || tf_e_.argument() != std::string(arg_name)) {    \
        ::tf::report_failure(                                                             \
            __FILE__, __LINE__,                                                           \
            std::string("CHECK_THROWS_CODE(" #expr "): expected ") +                      \
                ::ppo::error_code_name(error_code) + " naming '" + (arg_name) +           \
                "', got " + ::ppo::error_code_name(tf_e_.code()) + " naming '" +          \
                tf_e_.argument() + "': " + tf_e_.what());                                 \
      }                                                                                   \
    } catch (const std::exception& tf_e_) {                                               \
      tf_threw_ = true;                                                                   \
      ::tf::report_failure(__FILE__, __LINE__,                                            \
                           std::string("CHECK_THROWS_CODE(" #expr                         \
                                       "): threw a non-ppo exception: ") +                \
                               tf_e_.what());                                             \
    }                                                                                     \
    if (!tf_threw_) {                                                                     \
      ::tf::report_failure(__FILE__, __LINE__,                                            \
                           std::string("CHECK_THROWS_CODE(" #expr "): did not throw (expected ") + \
                               ::ppo::error_code_name(error_code) + " naming '" +         \
                               (arg_name) + "')");                                        \
    }                                                                                     \
  } while (0)

// `expr` must not throw.
#define CHECK_NO_THROW(expr)                                                              \
  do {                                                                                    \
    ++::tf::state().checks;                                                               \
    try {                                                                                 \
      (void)(expr);                                                                       \
    } catch (const ::ppo::Error& tf_e_) {                                                 \
      ::tf::report_failure(__FILE__, __LINE__,                                            \
                           std::string("CHECK_NO_THROW(" #expr "): threw ") +             \
                               ::ppo::error_code_name(tf_e_.code()) + " naming '" +       \
                               tf_e_.argument() + "': " + tf_e_.what());                  \
    } catch (const std::exception& tf_e_) {                                               \
      ::tf::report_failure(__FILE__, __LINE__,                                            \
                           std::string("CHECK_NO_THROW(" #expr "): threw ") + tf_e_.what()); \
    }                                                                                     \
  } while (0)

#define PPO_TEST_MAIN() \
  int main(int argc, char** argv) { return ::tf::run_all(argc, argv); }
