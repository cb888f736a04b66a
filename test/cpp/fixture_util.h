// Shared by the known-answer tests (test_gpt_known_answer.cpp, test_llama_known_answer.cpp):
// where a committed fixture is, reading it, and JSON arrays as vectors.
//
// Where a fixture is: $<env_var> if set; else PPO_SOURCE_DIR (a compile definition: CMake
// passes ${CMAKE_SOURCE_DIR}) + "/test/fixtures/<name>"; else the directory of this header
// (__FILE__) + "/../fixtures/<name>" (works when the compiler was given an absolute path,
// or a relative one and the binary runs from the repository root).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/json.h"

namespace fixture {

inline std::string dir(const char* name, const char* env_var) {
  if (const char* env = std::getenv(env_var)) return env;
#ifdef PPO_SOURCE_DIR
  return std::string(PPO_SOURCE_DIR) + "/test/fixtures/" + name;
#else
  std::string here = __FILE__;
  const size_t slash = here.find_last_of('/');
  here = slash == std::string::npos ? std::string(".") : here.substr(0, slash);
  return here + "/../fixtures/" + name;
#endif
}

// The file's text; a missing file is NotFound naming how to make it (`maker`).
inline std::string read_text(const std::string& path, const std::string& maker) {
  std::ifstream in(path, std::ios::binary);
  ppo::require(static_cast<bool>(in), ppo::ErrorCode::NotFound, "cannot open " + path + " (run " + maker + ")",
               "fixture");
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

inline std::vector<double> doubles(const ppo::json::Value& v) {
  std::vector<double> out;
  out.reserve(v.size());
  for (const ppo::json::Value& x : v.values()) out.push_back(x.as_double());
  return out;
}

inline std::vector<float> floats(const ppo::json::Value& v) {
  std::vector<float> out;
  out.reserve(v.size());
  for (const ppo::json::Value& x : v.values()) out.push_back(static_cast<float>(x.as_double()));
  return out;
}

inline std::vector<int32_t> ints(const ppo::json::Value& v) {
  std::vector<int32_t> out;
  out.reserve(v.size());
  for (const ppo::json::Value& x : v.values()) out.push_back(static_cast<int32_t>(x.as_int64()));
  return out;
}

}  // namespace fixture
