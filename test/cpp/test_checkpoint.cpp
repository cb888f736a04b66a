// Checkpoints (csrc/model/checkpoint.h), the config.json mapping (csrc/model/config.h) and
// the JSON module under them (csrc/core/json.h).
//
// Independence: Hugging Face-layout files are built here by hand (the header JSON by
// string concatenation, the F16/BF16 encodings by their own bit routines, Conv1D
// weights stored [in, out]) and what the engine's buffer must hold is computed here
// (the transposes written out); saved files are read back with this file's own raw
// reader. Conversions are chosen exact (values k/256 with |k| < 256 are exact in F16
// and BF16), so every comparison is bit-exact.
//
// Determinism across thread counts: run with PPO_MAX_THREADS=1 and =3 (conversion and
// transposition are elementwise, so the loaded bits cannot depend on the split).
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "core/json.h"
#include "model/checkpoint.h"
#include "model/config.h"
#include "model/params.h"
#include "test_framework.h"
#include "test_util.h"

namespace {

namespace fs = std::filesystem;
using ppo::ErrorCode;
using ppo::model::ModelConfig;
namespace json = ppo::json;

// ================================ helpers ================================================

// A fresh directory under /tmp, removed (recursively) at scope exit.
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/ppo_ckpt_test_XXXXXX";
    const char* p = ::mkdtemp(tmpl);
    path = p ? p : "";
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string sub(const std::string& name) const { return path + "/" + name; }
};

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

// Names of the files in `dir` that look like leftovers of an atomic write.
std::vector<std::string> temp_files(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.path().filename().string().find(".tmp") != std::string::npos)
      out.push_back(e.path().filename().string());
  return out;
}

// Messages must carry the reasons the contracts promise.
bool message_has(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
  } catch (const ppo::Error& e) {
    if (std::string(e.what()).find(needle) != std::string::npos) return true;
    std::printf("    (message was: %s)\n", e.what());
    return false;
  }
  return false;
}

// ---- independent float encodings -------------------------------------------------------

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float -> IEEE binary16, round to nearest even (normal, subnormal, overflow to inf).
uint16_t to_f16(float f) {
  const uint32_t x = bits_of(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  if (std::isnan(f)) return sign | 0x7E00u;
  const double a = std::fabs(static_cast<double>(f));
  if (a >= 65520.0) return sign | 0x7C00u;  // rounds to infinity
  if (a == 0.0) return sign;
  // Scale to an integer count of the spacing at this magnitude, round half even.
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  int exp16 = e - 1 + 15;                  // biased exponent if normal
  const int shift = exp16 >= 1 ? (e - 1) - 10 : -24;  // spacing 2^shift
  double q = std::nearbyint(std::ldexp(a, -shift));   // default mode: half to even
  if (exp16 < 1) {  // subnormal (q in [0, 1024]; 1024 rounds up into the first normal)
    return sign | static_cast<uint16_t>(q);
  }
  if (q >= 2048.0) {  // rounding carried into the next binade
    q /= 2.0;
    ++exp16;
    if (exp16 >= 31) return sign | 0x7C00u;
  }
  return sign | static_cast<uint16_t>(exp16 << 10) | static_cast<uint16_t>(static_cast<int>(q) - 1024);
}

// float -> bfloat16, round to nearest even.
uint16_t to_bf16(float f) {
  uint32_t x = bits_of(f);
  if (std::isnan(f)) return static_cast<uint16_t>((x >> 16) | 0x40u);
  x += 0x7FFFu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

std::string encode(const std::vector<double>& v, const std::string& dtype) {
  std::string out;
  for (double d : v) {
    char b[8];
    size_t n = 0;
    if (dtype == "F32") {
      const float f = static_cast<float>(d);
      std::memcpy(b, &f, 4), n = 4;
    } else if (dtype == "F16") {
      const uint16_t h = to_f16(static_cast<float>(d));
      std::memcpy(b, &h, 2), n = 2;
    } else if (dtype == "BF16") {
      const uint16_t h = to_bf16(static_cast<float>(d));
      std::memcpy(b, &h, 2), n = 2;
    } else if (dtype == "F64") {
      std::memcpy(b, &d, 8), n = 8;
    } else if (dtype == "I8") {
      b[0] = static_cast<char>(static_cast<int>(d)), n = 1;
    }
    out.append(b, n);
  }
  return out;
}

std::string encode_u16(const std::vector<uint16_t>& v) {
  std::string out(v.size() * 2, '\0');
  std::memcpy(out.data(), v.data(), out.size());
  return out;
}

// ---- a hand-made safetensors writer ---------------------------------------------------------

struct RawTensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

std::string shape_json(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? "," : "") + std::to_string(s[i]);
  return out + "]";
}

std::string u64_le(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return s;
}

// A safetensors file: the header written by hand (tensors laid out in the given order).
std::string safetensors_bytes(const std::vector<RawTensor>& ts) {
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  std::string data;
  for (const RawTensor& t : ts) {
    const size_t b = data.size();
    data += t.bytes;
    header += ",\"" + t.name + "\":{\"dtype\":\"" + t.dtype + "\",\"shape\":" + shape_json(t.shape) +
              ",\"data_offsets\":[" + std::to_string(b) + "," + std::to_string(data.size()) + "]}";
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  return u64_le(header.size()) + header + data;
}

// A raw header (any JSON text) plus data.
std::string raw_file(const std::string& header, const std::string& data) {
  return u64_le(header.size()) + header + data;
}

// Reads a safetensors file with this file's own parser-free logic: returns the data
// section and the header text.
void split_file(const std::string& bytes, std::string& header, std::string& data) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  header = bytes.substr(8, n);
  data = bytes.substr(8 + n);
}

// ---- tiny GPT-2 configs and checkpoints ---------------------------------------------------

ModelConfig tiny_config(bool value_head = false) {
  ModelConfig c;
  c.vocab_size = 11;
  c.n_positions = 7;
  c.n_embd = 8;
  c.n_layer = 2;
  c.n_head = 2;
  c.layer_norm_epsilon = 1e-5;
  c.bos_token_id = 10;
  c.eos_token_id = 10;
  c.value_head = value_head;
  return c;
}

// A Hugging Face-style config.json, written by hand.
std::string hf_config_text(const ModelConfig& c, const std::string& extra = "") {
  std::ostringstream os;
  os << "{\n  \"activation_function\": \"gelu_new\",\n  \"architectures\": [\"GPT2LMHeadModel\"],\n"
     << "  \"attn_pdrop\": 0.1,\n  \"bos_token_id\": " << c.bos_token_id << ",\n"
     << "  \"eos_token_id\": " << c.eos_token_id << ",\n  \"layer_norm_epsilon\": 1e-05,\n"
     << "  \"model_type\": \"gpt2\",\n  \"n_ctx\": " << c.n_positions << ",\n"
     << "  \"n_embd\": " << c.n_embd << ",\n  \"n_head\": " << c.n_head << ",\n"
     << "  \"n_inner\": null,\n  \"n_layer\": " << c.n_layer << ",\n"
     << "  \"n_positions\": " << c.n_positions << ",\n"
     << "  \"task_specific_params\": {\"text-generation\": {\"do_sample\": true, \"max_length\": 50}},\n"
     << extra << "  \"vocab_size\": " << c.vocab_size << "\n}\n";
  return os.str();
}

struct HfOptions {
  // dtype of tensor number i (in layout order)
  std::function<std::string(size_t)> dtype = [](size_t) { return std::string("F32"); };
  // whether tensor number i gets the "transformer." prefix (score.weight never does)
  std::function<bool(size_t)> prefix = [](size_t) { return true; };
  bool buffers = false;   // the old h.N.attn.bias / attn.masked_bias buffers
  bool lm_head = false;   // lm_head.weight (= wte)
  bool shuffle = false;   // lay the tensors out in a random order in the file
};

struct HfModel {
  ModelConfig config;
  std::vector<RawTensor> tensors;  // what goes into the file, HF names and layout
  std::vector<float> expected;     // what the engine's buffer must hold
};

// The checkpoint of a random model in Hugging Face's layout, and the buffer it must load
// into. Disk values: k / 256 with |k| <= 255 (exact in F32/F16/BF16), or random doubles
// for F64 (the buffer then holds their float rounding).
HfModel make_hf_model(const ModelConfig& cfg, const HfOptions& opt, tu::Rng& rng) {
  HfModel m;
  m.config = cfg;
  const ppo::model::ParameterLayout layout = ppo::model::parameter_layout(cfg);
  m.expected.assign(static_cast<size_t>(layout.total), tu::kNaN);
  std::vector<double> wte_disk;
  std::string wte_dtype;
  for (size_t k = 0; k < layout.tensors.size(); ++k) {
    const ppo::model::ParamTensor& p = layout.tensors[k];
    const std::string dtype = opt.dtype(k);
    // HF's shape: Conv1D weights are [in, out]; ours [out, in].
    std::vector<int64_t> disk_shape = p.shape;
    if (p.hf_transposed) disk_shape = {p.shape[1], p.shape[0]};
    std::vector<double> disk(static_cast<size_t>(p.numel));
    for (double& d : disk)
      d = dtype == "F64" ? tu::rand_uniform(rng, -3.0, 3.0)
                         : static_cast<double>(tu::rand_int(rng, -255, 255)) / 256.0;
    if (p.hf_transposed) {
      const int64_t in = disk_shape[0], out = disk_shape[1];
      for (int64_t i = 0; i < in; ++i)
        for (int64_t o = 0; o < out; ++o)
          m.expected[p.offset + o * in + i] = static_cast<float>(disk[i * out + o]);
    } else {
      for (int64_t i = 0; i < p.numel; ++i) m.expected[p.offset + i] = static_cast<float>(disk[i]);
    }
    const bool top_level = p.name == "score.weight";
    RawTensor t;
    t.name = (!top_level && opt.prefix(k) ? "transformer." : "") + p.name;
    t.dtype = dtype;
    t.shape = disk_shape;
    t.bytes = encode(disk, dtype);
    m.tensors.push_back(t);
    if (p.name == "wte.weight") wte_disk = disk, wte_dtype = dtype;
    // The old attention-mask buffers, after each block's last tensor.
    if (opt.buffers && p.layer >= 0 && p.name.find("mlp.c_proj.bias") != std::string::npos) {
      const int64_t P = cfg.n_positions;
      std::vector<double> mask(static_cast<size_t>(P * P));
      for (int64_t i = 0; i < P; ++i)
        for (int64_t j = 0; j < P; ++j) mask[i * P + j] = j <= i ? 1.0 : 0.0;
      const std::string h = "transformer.h." + std::to_string(p.layer);
      m.tensors.push_back({h + ".attn.bias", "F32", {1, 1, P, P}, encode(mask, "F32")});
      m.tensors.push_back({h + ".attn.masked_bias", "F32", {}, encode({-1e4}, "F32")});
    }
  }
  if (opt.lm_head)
    m.tensors.push_back({"lm_head.weight", wte_dtype, {cfg.vocab_size, cfg.n_embd},
                         encode(wte_disk, wte_dtype)});
  if (opt.shuffle) std::shuffle(m.tensors.begin(), m.tensors.end(), rng);
  return m;
}

RawTensor* find_raw(std::vector<RawTensor>& ts, const std::string& name) {
  for (RawTensor& t : ts)
    if (t.name == name) return &t;
  return nullptr;
}

void write_checkpoint_dir(const std::string& dir, const std::string& config_text,
                          const std::vector<RawTensor>& tensors) {
  fs::create_directories(dir);
  write_file(dir + "/config.json", config_text);
  write_file(dir + "/model.safetensors", safetensors_bytes(tensors));
}

bool same_config(const ModelConfig& a, const ModelConfig& b) {
  return a.model_type == b.model_type && a.vocab_size == b.vocab_size &&
         a.n_positions == b.n_positions && a.n_embd == b.n_embd && a.n_layer == b.n_layer &&
         a.n_head == b.n_head && tf::same_bits(a.layer_norm_epsilon, b.layer_norm_epsilon) &&
         a.value_head == b.value_head && a.bos_token_id == b.bos_token_id &&
         a.eos_token_id == b.eos_token_id;
}

// ================================ JSON ===================================================

TEST(json_parse_values) {
  const json::Value v = json::parse(
      " {\"a\": [1, -2, 3.5, -0.25e2, 1E+2, 0, -0, true, false, null],\n"
      "  \"b\": {\"c\": \"x\", \"d\": {}},  \"e\": [], \"f\": \"\"}\t\r\n");
  CHECK(v.is_object());
  CHECK(v.size() == 4);
  CHECK(v.keys().size() == 4 && v.keys()[0] == "a" && v.keys()[3] == "f");
  const json::Value& a = v.at("a");
  CHECK(a.is_array() && a.size() == 10);
  CHECK(a[0].is_integer() && a[0].as_int64() == 1);
  CHECK(a[1].is_integer() && a[1].as_int64() == -2);
  CHECK(a[2].is_number() && !a[2].is_integer() && a[2].as_double() == 3.5);
  CHECK(a[3].as_double() == -25.0 && !a[3].is_integer());
  CHECK(a[4].as_double() == 100.0 && !a[4].is_integer());
  CHECK(a[5].is_integer() && a[5].as_int64() == 0);
  CHECK(a[6].is_integer() && a[6].as_int64() == 0);
  CHECK(a[7].is_bool() && a[7].as_bool());
  CHECK(a[8].is_bool() && !a[8].as_bool());
  CHECK(a[9].is_null());
  CHECK(v.at("b").at("c").as_string() == "x");
  CHECK(v.at("b").at("d").is_object() && v.at("b").at("d").size() == 0);
  CHECK(v.at("e").is_array() && v.at("e").size() == 0);
  CHECK(v.at("f").as_string().empty());
  CHECK(v.find("zz") == nullptr);
  CHECK(a.find("a") == nullptr);  // not an object
  CHECK_THROWS_CODE(v.at("zz"), ErrorCode::InvalidArgument, "zz");
  CHECK_THROWS_CODE(a[10], ErrorCode::InvalidArgument, "");
  CHECK_THROWS_CODE(v.at("f").as_int64(), ErrorCode::InvalidArgument, "");
  CHECK_THROWS_CODE(a[2].as_int64(), ErrorCode::InvalidArgument, "");
  CHECK_THROWS_CODE(a[0].as_string(), ErrorCode::InvalidArgument, "");
  CHECK_THROWS_CODE(a[9].as_bool(), ErrorCode::InvalidArgument, "");
  // Scalars at the top level are documents too.
  CHECK(json::parse("42").as_int64() == 42);
  CHECK(json::parse("\"s\"").as_string() == "s");
  CHECK(json::parse("null").is_null());
}

TEST(json_string_escapes_and_utf8) {
  const json::Value v = json::parse(
      "\"q\\\" b\\\\ s\\/ \\b\\f\\n\\r\\t e\\u00e9 eur\\u20AC smile\\ud83d\\ude00 nul\\u0000 raw\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\"");
  const std::string want = std::string("q\" b\\ s/ \b\f\n\r\t e\xc3\xa9 eur\xe2\x82\xac smile\xf0\x9f\x98\x80 nul") +
                           std::string(1, '\0') + " raw\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80";
  CHECK(v.as_string() == want);
  // The writer escapes what must be escaped and round-trips.
  const std::string d = json::dump(json::Value::string(want));
  CHECK(json::parse(d).as_string() == want);
  CHECK(json::dump(json::Value::string("a\"b\\c\n\x01")) == "\"a\\\"b\\\\c\\n\\u0001\"");
  CHECK(json::dump(json::Value::string("\xc3\xa9")) == "\"\xc3\xa9\"");
  // Invalid UTF-8 cannot be written.
  CHECK_THROWS_CODE(json::dump(json::Value::string("\xff")), ErrorCode::InvalidArgument, "");
}

TEST(json_numbers_big_ints) {
  const json::Value a = json::parse(
      "[9223372036854775807, -9223372036854775808, 9223372036854775808, "
      "12345678901234567890, 9007199254740993, 1e-400, -1e-400, 2.5e-320, 1.7976931348623157e308]");
  CHECK(a[0].is_integer() && a[0].as_int64() == std::numeric_limits<int64_t>::max());
  CHECK(a[1].is_integer() && a[1].as_int64() == std::numeric_limits<int64_t>::min());
  CHECK(!a[2].is_integer() && a[2].as_double() == 9223372036854775808.0);
  CHECK(!a[3].is_integer() && a[3].as_double() == 12345678901234567890.0);
  // 2^53 + 1 is not a double: only the int64 keeps it.
  CHECK(a[4].is_integer() && a[4].as_int64() == 9007199254740993LL);
  CHECK(a[5].as_double() == 0.0 && !std::signbit(a[5].as_double()));
  CHECK(a[6].as_double() == 0.0 && std::signbit(a[6].as_double()));
  CHECK(a[7].as_double() > 0.0 && a[7].as_double() < 1e-300);  // subnormal kept
  CHECK(a[8].as_double() == std::numeric_limits<double>::max());
  CHECK_THROWS_CODE(json::parse("1e400"), ErrorCode::InvalidArgument, "json");
  CHECK_THROWS_CODE(json::parse("[-1.8e308]"), ErrorCode::InvalidArgument, "json");
  // Ints dump exactly.
  CHECK(json::dump(json::Value::integer(std::numeric_limits<int64_t>::min())) == "-9223372036854775808");
  CHECK(json::dump(a[4]) == "9007199254740993");
}

TEST(json_double_round_trip) {
  CHECK(json::dump(json::Value::number(0.1)) == "0.1");
  CHECK(json::dump(json::Value::number(1e-5)) == "1e-05");
  CHECK(json::dump(json::Value::number(1.0)) == "1.0");
  CHECK(json::dump(json::Value::number(-0.0)) == "-0.0");
  CHECK(json::dump(json::Value::number(0.02)) == "0.02");
  CHECK(!json::parse(json::dump(json::Value::number(3.0))).is_integer());
  CHECK_THROWS_CODE(json::dump(json::Value::number(std::nan(""))), ErrorCode::InvalidArgument, "");
  CHECK_THROWS_CODE(json::dump(json::Value::number(HUGE_VAL)), ErrorCode::InvalidArgument, "");
  // Random bit patterns: every finite double reads back bit-identical.
  tu::Rng rng(7);
  std::uniform_int_distribution<uint64_t> bits;
  int tested = 0;
  while (tested < 2000) {
    const uint64_t u = bits(rng);
    double d;
    std::memcpy(&d, &u, 8);
    if (!std::isfinite(d)) continue;
    ++tested;
    const double back = json::parse(json::dump(json::Value::number(d))).as_double();
    if (!tf::same_bits(back, d)) {
      CHECK(tf::same_bits(back, d));
      std::printf("    %.17g -> %s\n", d, json::dump(json::Value::number(d)).c_str());
      break;
    }
  }
  CHECK(tested == 2000);
}

TEST(json_dump_structure_round_trip) {
  json::Value root = json::Value::object();
  json::Value arr = json::Value::array();
  arr.push_back(json::Value::integer(1));
  arr.push_back(json::Value::number(2.5));
  arr.push_back(json::Value::null());
  arr.push_back(json::Value::boolean(true));
  arr.push_back(json::Value::array());
  arr.push_back(json::Value::object());
  root.set("z", std::move(arr));
  root.set("a", json::Value::string("x"));
  root.set("z2", json::Value::boolean(false));
  root.set("a", json::Value::string("y"));  // replaces, keeps the position
  CHECK(root.size() == 3 && root.keys()[1] == "a" && root.at("a").as_string() == "y");
  const std::string compact = json::dump(root);
  CHECK(compact == "{\"z\":[1,2.5,null,true,[],{}],\"a\":\"y\",\"z2\":false}");
  const std::string pretty = json::dump(root, 2);
  CHECK(pretty.find("\n  \"a\": \"y\"") != std::string::npos);
  CHECK(json::dump(json::parse(pretty)) == compact);
  CHECK(json::dump(json::parse(compact), 4) == json::dump(root, 4));
  json::Value scalar = json::Value::integer(1);
  CHECK_THROWS_CODE(scalar.push_back(json::Value()), ErrorCode::InvalidArgument, "");
  CHECK_THROWS_CODE(scalar.set("k", json::Value()), ErrorCode::InvalidArgument, "");
}

TEST(json_parse_errors) {
  const char* bad[] = {
      "", "   ", "{", "[1,2", "{\"a\":}", "{\"a\" 1}", "{\"a\":1,}", "[1,]", "[,1]", "{,}",
      "{1:2}", "01", "-01", "1.", ".5", "-", "+1", "1e", "1e+", "0x10", "\"abc",
      "\"\\x\"", "\"\\u12\"", "\"\\u12G4\"", "\"\\ud800\"", "\"\\udc00\"", "\"\\ud800\\u0041\"",
      "\"\\ud800x\"", "\"a\tb\"", "\"a\nb\"", "tru", "nul", "fals", "True", "NaN", "Infinity",
      "-Infinity", "[1] x", "{} {}", "{\"a\":1,\"a\":2}", "{\"a\":1,\"b\":{},\"a\":[]}",
      "\"\xff\"", "\"\xc0\xaf\"", "\"\xed\xa0\x80\"", "\"\xf4\x90\x80\x80\"", "\"\xe2\x82\"",
      "// c\n1", "'a'", "\xef\xbb\xbf{}", "[1 2]", "{\"a\":1 \"b\":2}", "\"\\", "[\"a\",",
  };
  int count = 0;
  for (const char* text : bad) {
    ++count;
    bool threw = false;
    try {
      json::parse(text, "doc.json");
    } catch (const ppo::Error& e) {
      threw = e.code() == ErrorCode::InvalidArgument && e.argument() == "doc.json" &&
              std::string(e.what()).find("at byte ") != std::string::npos;
      if (!threw) std::printf("    wrong error for <%s>: %s\n", text, e.what());
    } catch (...) {
      std::printf("    non-ppo exception for <%s>\n", text);
    }
    if (!threw) std::printf("    accepted or misreported: <%s>\n", text);
    CHECK(threw);
  }
  CHECK(count == static_cast<int>(sizeof bad / sizeof bad[0]));
  // A NUL inside the text (not just at its end) is an error too.
  CHECK_THROWS_CODE(json::parse(std::string("[1]\0", 4)), ErrorCode::InvalidArgument, "json");
  // The offset points at the problem.
  CHECK(message_has([] { json::parse("[1,]"); }, "at byte 3"));
  CHECK(message_has([] { json::parse("{\"a\":1} x"); }, "at byte 8"));
  CHECK(message_has([] { json::parse("{\"k\":1,\"k\":2}"); }, "duplicate key"));
}

TEST(json_depth_limit) {
  auto nested = [](int depth, char open, const std::string& inner, char close) {
    std::string s;
    for (int i = 0; i < depth; ++i) s += open == '{' ? "{\"k\":" : "[";
    s += inner;
    for (int i = 0; i < depth; ++i) s += close;
    return s;
  };
  CHECK_NO_THROW(json::parse(nested(json::kMaxDepth, '[', "1", ']')));
  CHECK_NO_THROW(json::parse(nested(json::kMaxDepth, '{', "1", '}')));
  CHECK_THROWS_CODE(json::parse(nested(json::kMaxDepth + 1, '[', "1", ']')),
                    ErrorCode::InvalidArgument, "json");
  CHECK_THROWS_CODE(json::parse(nested(json::kMaxDepth + 1, '{', "1", '}')),
                    ErrorCode::InvalidArgument, "json");
  // Hostile: a million open brackets must be refused, not overflow the stack.
  CHECK_THROWS_CODE(json::parse(std::string(1000000, '[')), ErrorCode::InvalidArgument, "json");
  CHECK(message_has([] { json::parse(std::string(1000, '[')); }, "nesting"));
}

// ================================ config.json ============================================

TEST(config_defaults_and_hf_gpt2) {
  const ModelConfig d = ppo::model::config_from_json("{}");
  CHECK(same_config(d, ModelConfig{}));
  CHECK(d.vocab_size == 50257 && d.n_positions == 1024 && d.n_embd == 768 && d.n_layer == 12 &&
        d.n_head == 12 && d.layer_norm_epsilon == 1e-5 && !d.value_head &&
        d.bos_token_id == 50256 && d.eos_token_id == 50256 && d.model_type == "gpt2");
  // Hugging Face's gpt2 config.json (as published), unknown fields included.
  const std::string gpt2 = R"({
  "activation_function": "gelu_new",
  "architectures": ["GPT2LMHeadModel"],
  "attn_pdrop": 0.1,
  "bos_token_id": 50256,
  "embd_pdrop": 0.1,
  "eos_token_id": 50256,
  "initializer_range": 0.02,
  "layer_norm_epsilon": 1e-05,
  "model_type": "gpt2",
  "n_ctx": 1024,
  "n_embd": 768,
  "n_head": 12,
  "n_layer": 12,
  "n_positions": 1024,
  "resid_pdrop": 0.1,
  "summary_activation": null,
  "summary_first_dropout": 0.1,
  "summary_proj_to_labels": true,
  "summary_type": "cls_index",
  "summary_use_proj": true,
  "task_specific_params": {"text-generation": {"do_sample": true, "max_length": 50}},
  "vocab_size": 50257
})";
  CHECK(same_config(ppo::model::config_from_json(gpt2), ModelConfig{}));
  // distilgpt2-like, and a small custom one.
  const ModelConfig s = ppo::model::config_from_json(
      "{\"n_layer\": 6, \"n_embd\": 64, \"n_head\": 4, \"vocab_size\": 100, \"n_positions\": 32,"
      " \"bos_token_id\": 0, \"eos_token_id\": 99, \"layer_norm_epsilon\": 1e-6,"
      " \"n_inner\": 256, \"ppo_max_value_head\": true, \"gradient_checkpointing\": false}");
  CHECK(s.n_layer == 6 && s.n_embd == 64 && s.n_head == 4 && s.vocab_size == 100 &&
        s.n_positions == 32 && s.bos_token_id == 0 && s.eos_token_id == 99 &&
        s.layer_norm_epsilon == 1e-6 && s.value_head && s.head_size() == 16);
  // gelu_pytorch_tanh is the same function as gelu_new.
  CHECK_NO_THROW(ppo::model::config_from_json("{\"activation_function\": \"gelu_pytorch_tanh\"}"));
  // An integer epsilon is still a number.
  CHECK(ppo::model::config_from_json("{\"layer_norm_epsilon\": 1}").layer_norm_epsilon == 1.0);
}

TEST(config_special_token_defaults_fit_a_small_vocabulary) {
  // Absent bos/eos ids: GPT-2's 50256 when the vocabulary holds it, else its last id.
  const ModelConfig small = ppo::model::config_from_json(
      "{\"vocab_size\": 100, \"n_embd\": 8, \"n_head\": 2, \"n_layer\": 1, \"n_positions\": 16}");
  CHECK(small.bos_token_id == 99);
  CHECK(small.eos_token_id == 99);
  const ModelConfig big = ppo::model::config_from_json("{\"vocab_size\": 60000}");
  CHECK(big.bos_token_id == 50256);
  CHECK(big.eos_token_id == 50256);
  // Given ids must fit.
  CHECK_THROWS_CODE(ppo::model::config_from_json("{\"vocab_size\": 100, \"eos_token_id\": 100}"),
                    ErrorCode::InvalidArgument, "eos_token_id");
}

TEST(config_n_ctx) {
  CHECK(ppo::model::config_from_json("{\"n_ctx\": 512}").n_positions == 512);
  CHECK(ppo::model::config_from_json("{\"n_ctx\": 512, \"n_positions\": 256}").n_positions == 256);
  CHECK(ppo::model::config_from_json("{\"n_positions\": 256}").n_positions == 256);
  CHECK_THROWS_CODE(ppo::model::config_from_json("{\"n_ctx\": \"512\"}"),
                    ErrorCode::InvalidArgument, "n_ctx");
}

TEST(config_errors_name_the_field) {
  using ppo::model::config_from_json;
  struct Case {
    const char* json;
    const char* field;
  };
  const Case cases[] = {
      {"{\"n_head\": \"12\"}", "n_head"},
      {"{\"n_embd\": 768.0}", "n_embd"},
      {"{\"n_embd\": 1e3}", "n_embd"},
      {"{\"n_layer\": null}", "n_layer"},
      {"{\"vocab_size\": [50257]}", "vocab_size"},
      {"{\"vocab_size\": 0}", "vocab_size"},
      {"{\"vocab_size\": 2147483648}", "vocab_size"},
      {"{\"vocab_size\": 99999999999999999999}", "vocab_size"},
      {"{\"n_positions\": 0}", "n_positions"},
      {"{\"n_embd\": -768}", "n_embd"},
      {"{\"n_layer\": 0}", "n_layer"},
      {"{\"n_head\": 0}", "n_head"},
      {"{\"n_embd\": 100, \"n_head\": 12}", "n_head"},
      {"{\"layer_norm_epsilon\": 0}", "layer_norm_epsilon"},
      {"{\"layer_norm_epsilon\": -1e-5}", "layer_norm_epsilon"},
      {"{\"layer_norm_epsilon\": 1e-50}", "layer_norm_epsilon"},
      {"{\"layer_norm_epsilon\": \"1e-5\"}", "layer_norm_epsilon"},
      {"{\"model_type\": \"mistral\"}", "model_type"},
      {"{\"model_type\": \"llama\", \"num_key_value_heads\": 5}", "n_kv_head"},
      {"{\"model_type\": \"llama\", \"hidden_act\": \"gelu\"}", "hidden_act"},
      {"{\"model_type\": \"llama\", \"attention_bias\": true}", "attention_bias"},
      {"{\"model_type\": \"llama\", \"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4}}", "rope_scaling"},
      {"{\"model_type\": \"llama\", \"head_dim\": 64}", "head_dim"},
      {"{\"model_type\": \"gpt_neox\"}", "model_type"},
      {"{\"model_type\": 2}", "model_type"},
      {"{\"activation_function\": \"relu\"}", "activation_function"},
      {"{\"activation_function\": \"gelu\"}", "activation_function"},
      {"{\"activation_function\": null}", "activation_function"},
      {"{\"n_inner\": 1000}", "n_inner"},
      {"{\"n_inner\": \"3072\"}", "n_inner"},
      {"{\"ppo_max_value_head\": \"yes\"}", "ppo_max_value_head"},
      {"{\"ppo_max_value_head\": 1}", "ppo_max_value_head"},
      {"{\"bos_token_id\": 50257}", "bos_token_id"},
      {"{\"eos_token_id\": -1}", "eos_token_id"},
      {"{\"eos_token_id\": null}", "eos_token_id"},
      {"{\"tie_word_embeddings\": false}", "tie_word_embeddings"},
      {"{\"scale_attn_weights\": false}", "scale_attn_weights"},
      {"{\"scale_attn_by_inverse_layer_idx\": true}", "scale_attn_by_inverse_layer_idx"},
      {"{\"add_cross_attention\": true}", "add_cross_attention"},
      {"{\"n_layer\": 1000000, \"n_embd\": 1000000, \"n_head\": 1}", "n_embd"},
  };
  for (const Case& c : cases) CHECK_THROWS_CODE(config_from_json(c.json), ErrorCode::InvalidArgument, c.field);
  CHECK(message_has([] { config_from_json("{\"model_type\": \"mistral\"}"); }, "the GPT-2 family (\"gpt2\") and the Llama family (\"llama\") are"));
  CHECK(message_has([] { config_from_json("{\"n_embd\": 100, \"n_head\": 12}"); }, "divisible"));
  // Not JSON / not an object: named by the source.
  CHECK_THROWS_CODE(config_from_json("{\"n_embd\": 768,}"), ErrorCode::InvalidArgument, "config.json");
  CHECK_THROWS_CODE(config_from_json("[1]", "my/config.json"), ErrorCode::InvalidArgument, "my/config.json");
  CHECK(message_has([] { config_from_json("{}x", "my/config.json"); }, "my/config.json"));
  // validate() on its own.
  ModelConfig c;
  c.n_head = 7;
  CHECK_THROWS_CODE(c.validate(), ErrorCode::InvalidArgument, "n_head");
  c = ModelConfig{};
  c.layer_norm_epsilon = std::numeric_limits<double>::infinity();
  CHECK_THROWS_CODE(c.validate(), ErrorCode::InvalidArgument, "layer_norm_epsilon");
  c = ModelConfig{};
  c.layer_norm_epsilon = std::nan("");
  CHECK_THROWS_CODE(c.validate(), ErrorCode::InvalidArgument, "layer_norm_epsilon");
  c = ModelConfig{};
  c.model_type = "opt";
  CHECK_THROWS_CODE(c.validate(), ErrorCode::InvalidArgument, "model_type");
  CHECK_NO_THROW(ModelConfig{}.validate());
}

TEST(config_to_json_round_trip) {
  ModelConfig a = tiny_config(true);
  a.layer_norm_epsilon = 3.14159e-7;
  ModelConfig b = ModelConfig{};
  ModelConfig c = tiny_config(false);
  c.bos_token_id = 0;
  for (const ModelConfig& cfg : {a, b, c}) {
    const std::string text = ppo::model::config_to_json(cfg);
    CHECK(same_config(ppo::model::config_from_json(text), cfg));
    // What GPT2LMHeadModel needs, checked on the parsed document.
    const json::Value v = json::parse(text);
    CHECK(v.at("architectures").size() == 1 &&
          v.at("architectures")[0].as_string() == "GPT2LMHeadModel");
    CHECK(v.at("model_type").as_string() == "gpt2");
    CHECK(v.at("activation_function").as_string() == "gelu_new");
    CHECK(v.at("n_inner").is_null());
    CHECK(v.at("tie_word_embeddings").as_bool() && v.at("scale_attn_weights").as_bool() &&
          v.at("use_cache").as_bool());
    CHECK(v.at("resid_pdrop").as_double() == 0.1 && v.at("embd_pdrop").as_double() == 0.1 &&
          v.at("attn_pdrop").as_double() == 0.1 && v.at("initializer_range").as_double() == 0.02);
    CHECK(v.at("torch_dtype").as_string() == "float32");
    CHECK(v.at("n_positions").as_int64() == cfg.n_positions && v.at("n_embd").as_int64() == cfg.n_embd &&
          v.at("n_layer").as_int64() == cfg.n_layer && v.at("n_head").as_int64() == cfg.n_head &&
          v.at("vocab_size").as_int64() == cfg.vocab_size);
    CHECK((v.find("ppo_max_value_head") != nullptr) == cfg.value_head);
    // Keys sorted, as transformers writes them.
    CHECK(std::is_sorted(v.keys().begin(), v.keys().end()));
  }
  ModelConfig bad = ModelConfig{};
  bad.n_embd = 770;
  CHECK_THROWS_CODE(ppo::model::config_to_json(bad), ErrorCode::InvalidArgument, "n_head");
}

// ================================ safetensors ============================================

TEST(safetensors_round_trip) {
  TempDir tmp;
  tu::Rng rng(1);
  const std::vector<std::vector<int64_t>> shapes = {{3, 5}, {7}, {}, {0, 4}, {2, 3, 4}, {1, 1}};
  std::vector<std::vector<float>> data;
  std::vector<ppo::model::TensorToWrite> ts;
  for (size_t k = 0; k < shapes.size(); ++k) {
    int64_t n = 1;
    for (int64_t d : shapes[k]) n *= d;
    data.push_back(tu::normal(rng, n));
  }
  // Special values travel bit-exactly too.
  data[1][0] = -0.0f;
  data[1][1] = std::numeric_limits<float>::denorm_min();
  data[1][2] = std::numeric_limits<float>::max();
  for (size_t k = 0; k < shapes.size(); ++k)
    ts.push_back({"t" + std::to_string(k) + ".w\xc3\xa9", shapes[k], data[k].data()});
  const std::string path = tmp.sub("x.safetensors");
  ppo::model::write_safetensors(path, ts);
  CHECK(temp_files(tmp.path).empty());

  const std::vector<ppo::model::SafetensorsTensor> h = ppo::model::read_safetensors_header(path);
  CHECK(h.size() == shapes.size());
  const std::string bytes = read_file(path);
  std::string header, section;
  split_file(bytes, header, section);
  CHECK((8 + header.size()) % 8 == 0);  // data section 8-byte aligned
  CHECK(header.find("\"__metadata__\":{\"format\":\"pt\"}") != std::string::npos);
  for (size_t k = 0; k < h.size() && k < shapes.size(); ++k) {
    CHECK(h[k].name == ts[k].name);
    CHECK(h[k].dtype == "F32");
    CHECK(h[k].shape == shapes[k]);
    CHECK(h[k].end - h[k].begin == data[k].size() * 4);
    CHECK(h[k].end <= section.size());
    if (h[k].end <= section.size() && h[k].end - h[k].begin == data[k].size() * 4 && !data[k].empty()) {
      std::vector<float> back(data[k].size());
      std::memcpy(back.data(), section.data() + h[k].begin, back.size() * 4);
      CHECK_BITWISE_EQUAL(back.data(), data[k].data(), static_cast<int64_t>(back.size()), "tensor");
    }
  }
  // Overwriting replaces the file.
  const std::vector<float> one = {42.0f};
  ppo::model::write_safetensors(path, {{"only", {1}, one.data()}});
  const auto h2 = ppo::model::read_safetensors_header(path);
  CHECK(h2.size() == 1 && h2[0].name == "only");
  CHECK(temp_files(tmp.path).empty());
  // An empty file (no tensors) is valid.
  ppo::model::write_safetensors(tmp.sub("empty.safetensors"), {});
  CHECK(ppo::model::read_safetensors_header(tmp.sub("empty.safetensors")).empty());
}

TEST(safetensors_write_errors) {
  TempDir tmp;
  const std::vector<float> v(4, 1.0f);
  const std::string path = tmp.sub("bad.safetensors");
  CHECK_THROWS_CODE(ppo::model::write_safetensors(path, {{"a", {4}, v.data()}, {"a", {2}, v.data()}}),
                    ErrorCode::InvalidArgument, "a");
  CHECK_THROWS_CODE(ppo::model::write_safetensors(path, {{"a", {4}, nullptr}}),
                    ErrorCode::InvalidArgument, "a");
  CHECK_THROWS_CODE(ppo::model::write_safetensors(path, {{"a", {-1}, v.data()}}),
                    ErrorCode::InvalidArgument, "a");
  CHECK_THROWS_CODE(ppo::model::write_safetensors(path, {{"__metadata__", {4}, v.data()}}),
                    ErrorCode::InvalidArgument, "tensors");
  CHECK_THROWS_CODE(ppo::model::write_safetensors(path, {{"bad\xff", {4}, v.data()}}),
                    ErrorCode::InvalidArgument, "bad\xff");
  // Nothing was created by the refused writes.
  CHECK(!fs::exists(path));
  CHECK(temp_files(tmp.path).empty());
  // A failure at the final rename (the target is a non-empty directory) removes the
  // temporary file and leaves the target alone.
  const std::string dir_target = tmp.sub("target");
  fs::create_directories(dir_target + "/inside");
  CHECK_THROWS_CODE(ppo::model::write_safetensors(dir_target, {{"a", {4}, v.data()}}),
                    ErrorCode::IoError, dir_target);
  CHECK(fs::is_directory(dir_target + "/inside"));
  CHECK(temp_files(tmp.path).empty());
  // A directory that does not exist.
  CHECK_THROWS_CODE(ppo::model::write_safetensors(tmp.sub("no/such/dir.safetensors"), {{"a", {4}, v.data()}}),
                    ErrorCode::IoError, tmp.sub("no/such/dir.safetensors"));
}

TEST(safetensors_corrupt_headers) {
  TempDir tmp;
  const std::string p = tmp.sub("c.safetensors");
  const std::string f8(8, '\0'), f16(16, '\0'), f24(24, '\0');
  auto header_of = [&](const std::string& bytes) {
    write_file(p, bytes);
    return ppo::model::read_safetensors_header(p);
  };
  auto entry = [](const std::string& name, const std::string& dtype, const std::string& shape,
                  uint64_t b, uint64_t e) {
    return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
           ",\"data_offsets\":[" + std::to_string(b) + "," + std::to_string(e) + "]}";
  };
  // Fewer than 8 bytes; length beyond the file; absurd length; empty header.
  CHECK_THROWS_CODE(header_of("abc"), ErrorCode::CorruptFile, p);
  CHECK_THROWS_CODE(header_of(u64_le(1000) + "{}"), ErrorCode::CorruptFile, p);
  CHECK(message_has([&] { header_of(u64_le(1000) + "{}"); }, "corrupt"));
  CHECK_THROWS_CODE(header_of(u64_le(~uint64_t(0)) + "{}"), ErrorCode::CorruptFile, p);
  CHECK_THROWS_CODE(header_of(u64_le(0)), ErrorCode::CorruptFile, p);
  // Not JSON, not an object, malformed entries.
  CHECK_THROWS_CODE(header_of(raw_file("{\"a\":", "")), ErrorCode::CorruptFile, p);
  CHECK_THROWS_CODE(header_of(raw_file("[1, 2]", "")), ErrorCode::CorruptFile, p);
  CHECK_THROWS_CODE(header_of(raw_file("{\"a\": 5}", "")), ErrorCode::CorruptFile, p);
  CHECK_THROWS_CODE(header_of(raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", f8)),
                    ErrorCode::CorruptFile, p);
  CHECK_THROWS_CODE(header_of(raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", f8)),
                    ErrorCode::CorruptFile, p);
  CHECK_THROWS_CODE(header_of(raw_file("{" + entry("a", "F32", "[-2]", 0, 8) + "}", f8)),
                    ErrorCode::CorruptFile, p);
  CHECK_THROWS_CODE(header_of(raw_file("{" + entry("a", "F32", "[2.5]", 0, 8) + "}", f8)),
                    ErrorCode::CorruptFile, p);
  CHECK_THROWS_CODE(header_of(raw_file("{\"__metadata__\":{\"format\":1}}", "")),
                    ErrorCode::CorruptFile, p);
  // Unknown dtype.
  CHECK_THROWS_CODE(header_of(raw_file("{" + entry("w", "Q4", "[2]", 0, 8) + "}", f8)),
                    ErrorCode::InvalidArgument, "w");
  // Byte size != numel * dtype size.
  CHECK_THROWS_CODE(header_of(raw_file("{" + entry("w", "F32", "[2,2]", 0, 12) + "}", f16)),
                    ErrorCode::CorruptFile, p);
  CHECK_THROWS_CODE(header_of(raw_file("{" + entry("w", "F16", "[2,2]", 0, 16) + "}", f16)),
                    ErrorCode::CorruptFile, p);
  // A shape whose byte size overflows 64 bits.
  CHECK_THROWS_CODE(header_of(raw_file("{" + entry("w", "F32", "[4294967296,4294967296]", 0, 8) + "}", f8)),
                    ErrorCode::CorruptFile, p);
  // end < begin.
  CHECK_THROWS_CODE(header_of(raw_file("{" + entry("w", "F32", "[0]", 8, 0) + "}", f8)),
                    ErrorCode::CorruptFile, p);
  // Overlap, gap, out of bounds, trailing bytes.
  CHECK_THROWS_CODE(header_of(raw_file("{" + entry("a", "F32", "[4]", 0, 16) + "," +
                                       entry("b", "F32", "[4]", 8, 24) + "}", f24)),
                    ErrorCode::CorruptFile, p);
  CHECK(message_has([&] {
    header_of(raw_file("{" + entry("a", "F32", "[4]", 0, 16) + "," + entry("b", "F32", "[4]", 8, 24) + "}", f24));
  }, "overlap"));
  CHECK_THROWS_CODE(header_of(raw_file("{" + entry("a", "F32", "[2]", 0, 8) + "," +
                                       entry("b", "F32", "[2]", 16, 24) + "}", f24)),
                    ErrorCode::CorruptFile, p);
  CHECK_THROWS_CODE(header_of(raw_file("{" + entry("a", "F32", "[4]", 0, 16) + "}", f8)),
                    ErrorCode::CorruptFile, p);
  CHECK_THROWS_CODE(header_of(raw_file("{" + entry("a", "F32", "[2]", 0, 8) + "}", f16)),
                    ErrorCode::CorruptFile, p);
  CHECK_THROWS_CODE(header_of(raw_file("{" + entry("a", "F32", "[2]", 0, 8) + "," +
                                       entry("b", "F32", "[2]", 8, 16) + "}", f8)),
                    ErrorCode::CorruptFile, p);
  // Valid: unordered entries, zero-size tensors, other dtypes, trailing header spaces.
  const auto ok = header_of(raw_file("{" + entry("b", "I64", "[1]", 8, 16) + "," +
                                     entry("e", "F32", "[0,3]", 16, 16) + "," +
                                     entry("a", "BF16", "[2,2]", 0, 8) + "}    ", f16));
  CHECK(ok.size() == 3 && ok[0].name == "b" && ok[2].name == "a" && ok[2].shape == std::vector<int64_t>({2, 2}));
  // Missing / not a file.
  CHECK_THROWS_CODE(ppo::model::read_safetensors_header(tmp.sub("nope")), ErrorCode::NotFound,
                    tmp.sub("nope"));
  CHECK_THROWS_CODE(ppo::model::read_safetensors_header(tmp.path), ErrorCode::NotFound, tmp.path);
}

// ================================ checkpoints ============================================

// Loads `dir` and checks the buffer against the expected one, bit for bit.
void check_loads_as(const std::string& dir, const HfModel& m, const char* what) {
  ppo::model::LoadedCheckpoint ck;
  CHECK_NO_THROW(ck = ppo::model::load_checkpoint(dir));
  CHECK(same_config(ck.config, m.config));
  CHECK(ck.params.size() == m.expected.size());
  if (ck.params.size() == m.expected.size())
    CHECK_BITWISE_EQUAL(ck.params.data(), m.expected.data(), static_cast<int64_t>(ck.params.size()), what);
}

TEST(load_hf_layout_all_dtypes) {
  TempDir tmp;
  tu::Rng rng(3);
  const ModelConfig cfg = tiny_config();
  int variant = 0;
  for (const char* dtype : {"F32", "F16", "BF16", "F64"}) {
    HfOptions opt;
    const std::string dt = dtype;
    opt.dtype = [dt](size_t) { return dt; };
    opt.buffers = true;
    opt.lm_head = true;
    opt.shuffle = variant % 2 == 1;
    const HfModel m = make_hf_model(cfg, opt, rng);
    const std::string dir = tmp.sub(std::string("ck_") + dtype);
    write_checkpoint_dir(dir, hf_config_text(cfg), m.tensors);
    check_loads_as(dir, m, dtype);
    ++variant;
  }
  // Mixed: dtypes and prefixes vary per tensor, no buffers, no lm_head.
  HfOptions mixed;
  mixed.dtype = [](size_t i) { return std::string(i % 3 == 0 ? "F16" : i % 3 == 1 ? "BF16" : "F32"); };
  mixed.prefix = [](size_t i) { return i % 2 == 0; };
  mixed.shuffle = true;
  const HfModel m = make_hf_model(cfg, mixed, rng);
  write_checkpoint_dir(tmp.sub("mixed"), hf_config_text(cfg), m.tensors);
  check_loads_as(tmp.sub("mixed"), m, "mixed");
  // The directory may be given with a trailing slash.
  check_loads_as(tmp.sub("mixed") + "/", m, "mixed/");
}

TEST(load_value_head_no_prefix) {
  TempDir tmp;
  tu::Rng rng(4);
  const ModelConfig cfg = tiny_config(true);
  HfOptions opt;
  opt.prefix = [](size_t) { return false; };
  HfModel m = make_hf_model(cfg, opt, rng);
  CHECK(find_raw(m.tensors, "score.weight") != nullptr);
  CHECK(find_raw(m.tensors, "wte.weight") != nullptr);
  // The value head is detected from the tensor; the config need not say so.
  write_checkpoint_dir(tmp.sub("a"), hf_config_text(cfg), m.tensors);
  check_loads_as(tmp.sub("a"), m, "value head");
  write_checkpoint_dir(tmp.sub("b"), hf_config_text(cfg, "  \"ppo_max_value_head\": true,\n"), m.tensors);
  check_loads_as(tmp.sub("b"), m, "value head (config says so)");
}

TEST(load_f16_bf16_special_values) {
  TempDir tmp;
  tu::Rng rng(5);
  const ModelConfig cfg = tiny_config();  // C = 8: ln_1.weight has 8 entries
  HfModel m = make_hf_model(cfg, HfOptions{}, rng);
  const ppo::model::ParameterLayout layout = ppo::model::parameter_layout(cfg);
  const int64_t ln1 = layout.blocks[0].ln_1_weight, ln2 = layout.blocks[1].ln_2_weight;
  // binary16: 1, -2, 2^-24 (smallest subnormal), 1023 * 2^-24 (largest subnormal),
  // 2^-14 (smallest normal), 65504 (largest), -0, 0x3555 = 0.333251953125.
  const std::vector<uint16_t> h = {0x3C00, 0xC000, 0x0001, 0x03FF, 0x0400, 0x7BFF, 0x8000, 0x3555};
  const float hv[] = {1.0f, -2.0f, std::ldexp(1.0f, -24), 1023.0f * std::ldexp(1.0f, -24),
                      std::ldexp(1.0f, -14), 65504.0f, -0.0f, 0.333251953125f};
  // bfloat16: 1, -3.140625, the smallest subnormal (float bits 0x00010000), the largest
  // finite (0x7F7F0000), -0, 2^-126, 0.0078125, 256.
  const std::vector<uint16_t> b = {0x3F80, 0xC049, 0x0001, 0x7F7F, 0x8000, 0x0080, 0x3C00, 0x4380};
  const float bv[] = {1.0f, -3.140625f, float_of(0x00010000u), float_of(0x7F7F0000u), -0.0f,
                      std::ldexp(1.0f, -126), 0.0078125f, 256.0f};
  RawTensor* t1 = find_raw(m.tensors, "transformer.h.0.ln_1.weight");
  RawTensor* t2 = find_raw(m.tensors, "transformer.h.1.ln_2.weight");
  CHECK(t1 && t2);
  if (!t1 || !t2) return;
  t1->dtype = "F16", t1->bytes = encode_u16(h);
  t2->dtype = "BF16", t2->bytes = encode_u16(b);
  for (int i = 0; i < 8; ++i) m.expected[ln1 + i] = hv[i], m.expected[ln2 + i] = bv[i];
  // float64: rounding to nearest, including just below the overflow threshold (FLT_MAX
  // plus a quarter ulp rounds down to FLT_MAX), underflow to 0 and subnormals.
  const double flt_max = std::numeric_limits<float>::max();
  const std::vector<double> dv = {flt_max + std::ldexp(1.0, 102), -(flt_max + std::ldexp(1.0, 102)),
                                  1e-50, 0.1, -1.0 / 3.0, std::ldexp(1.0, -149), 1.0 + std::ldexp(1.0, -30), 7.0};
  const float dvf[] = {std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(), 0.0f,
                       0.1f, -1.0f / 3.0f, std::numeric_limits<float>::denorm_min(), 1.0f, 7.0f};
  RawTensor* t3 = find_raw(m.tensors, "transformer.ln_f.weight");
  t3->dtype = "F64", t3->bytes = encode(dv, "F64");
  for (int i = 0; i < 8; ++i) m.expected[layout.ln_f_weight + i] = dvf[i];
  write_checkpoint_dir(tmp.path, hf_config_text(cfg), m.tensors);
  check_loads_as(tmp.path, m, "special values");
  // The test's own encoders agree with these bit patterns (so the exact-value checks of
  // the other tests rest on a correct encoding).
  for (int i = 0; i < 8; ++i) {
    CHECK(to_f16(hv[i]) == h[i]);
    CHECK(to_bf16(bv[i]) == b[i]);
  }
  CHECK(to_f16(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);  // half-way: to even
  CHECK(to_f16(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3C02);
  CHECK(to_f16(65520.0f) == 0x7C00);
}

TEST(save_load_round_trip) {
  TempDir tmp;
  tu::Rng rng(6);
  for (bool vh : {false, true}) {
    ModelConfig cfg = tiny_config(vh);
    cfg.layer_norm_epsilon = 1e-6;
    const ppo::model::ParameterLayout layout = ppo::model::parameter_layout(cfg);
    const std::vector<float> params = tu::normal(rng, layout.total);
    const std::string dir = tmp.sub(vh ? "nested/dir/vh" : "plain");  // parents created
    ppo::model::save_checkpoint(dir, cfg, params.data());
    CHECK(temp_files(dir).empty());
    const ppo::model::LoadedCheckpoint ck = ppo::model::load_checkpoint(dir);
    CHECK(same_config(ck.config, cfg));
    CHECK(ck.params.size() == params.size());
    if (ck.params.size() == params.size())
      CHECK_BITWISE_EQUAL(ck.params.data(), params.data(), layout.total, "round trip");

    // The file itself is in Hugging Face's layout: names, Conv1D [in, out], F32.
    const auto header = ppo::model::read_safetensors_header(dir + "/model.safetensors");
    CHECK(header.size() == layout.tensors.size());
    std::string htext, data;
    split_file(read_file(dir + "/model.safetensors"), htext, data);
    CHECK((8 + htext.size()) % 8 == 0);
    CHECK(htext.find("\"__metadata__\":{\"format\":\"pt\"}") != std::string::npos);
    for (const ppo::model::SafetensorsTensor& t : header) {
      CHECK(t.dtype == "F32");
      const bool top = t.name == "score.weight";
      CHECK(top || t.name.rfind("transformer.", 0) == 0);
      const ppo::model::ParamTensor* p = layout.find(top ? t.name : t.name.substr(12));
      CHECK(p != nullptr);
      if (!p) continue;
      std::vector<int64_t> want = p->shape;
      if (p->hf_transposed) want = {p->shape[1], p->shape[0]};
      CHECK(t.shape == want);
      if (t.shape != want || t.end > data.size()) continue;
      std::vector<float> disk(static_cast<size_t>(p->numel));
      std::memcpy(disk.data(), data.data() + t.begin, disk.size() * 4);
      std::vector<float> mine(static_cast<size_t>(p->numel));
      if (p->hf_transposed) {
        const int64_t out = p->shape[0], in = p->shape[1];
        for (int64_t o = 0; o < out; ++o)
          for (int64_t i = 0; i < in; ++i) mine[i * out + o] = params[p->offset + o * in + i];
      } else {
        std::copy(params.begin() + p->offset, params.begin() + p->offset + p->numel, mine.begin());
      }
      CHECK_BITWISE_EQUAL(disk.data(), mine.data(), p->numel, "saved tensor");
    }
    CHECK(header.front().name == "transformer.wte.weight");
    if (vh) CHECK(header.back().name == "score.weight");
    // config.json is what GPT2LMHeadModel reads.
    const json::Value cj = json::parse(read_file(dir + "/config.json"));
    CHECK(cj.at("architectures")[0].as_string() == "GPT2LMHeadModel");
    CHECK((cj.find("ppo_max_value_head") != nullptr) == vh);
  }
}

TEST(save_overwrite_and_failure_keep_a_valid_checkpoint) {
  TempDir tmp;
  tu::Rng rng(8);
  const ModelConfig cfg = tiny_config();
  const int64_t total = ppo::model::parameter_layout(cfg).total;
  const std::vector<float> a = tu::normal(rng, total), b = tu::normal(rng, total);
  const std::string dir = tmp.sub("ck");
  ppo::model::save_checkpoint(dir, cfg, a.data());
  ppo::model::save_checkpoint(dir, cfg, b.data());  // overwrite
  CHECK(temp_files(dir).empty());
  {
    const auto ck = ppo::model::load_checkpoint(dir);
    CHECK_BITWISE_EQUAL(ck.params.data(), b.data(), total, "overwritten");
  }
  // A save that fails midway (the write hits the file-size limit, EFBIG) throws, removes
  // its temporary file, and leaves the previous checkpoint loadable and unchanged.
  const std::vector<float> c = tu::normal(rng, total);
  struct rlimit old_limit;
  CHECK(::getrlimit(RLIMIT_FSIZE, &old_limit) == 0);
  void (*old_handler)(int) = ::signal(SIGXFSZ, SIG_IGN);
  struct rlimit small = old_limit;
  small.rlim_cur = 4096;  // the model file is ~9 KB
  CHECK(::setrlimit(RLIMIT_FSIZE, &small) == 0);
  bool threw = false;
  try {
    ppo::model::save_checkpoint(dir, cfg, c.data());
  } catch (const ppo::Error& e) {
    threw = e.code() == ErrorCode::IoError && e.argument() == dir + "/model.safetensors";
    if (!threw) std::printf("    unexpected error: %s (argument %s)\n", e.what(), e.argument().c_str());
  }
  CHECK(::setrlimit(RLIMIT_FSIZE, &old_limit) == 0);
  ::signal(SIGXFSZ, old_handler);
  CHECK(threw);
  CHECK(temp_files(dir).empty());
  {
    const auto ck = ppo::model::load_checkpoint(dir);
    CHECK_BITWISE_EQUAL(ck.params.data(), b.data(), total, "after the failed save");
  }
  // A failure at the second file (config.json cannot be replaced: it is a non-empty
  // directory here) also leaves no temporary files.
  const std::string dir2 = tmp.sub("ck2");
  fs::create_directories(dir2 + "/config.json/x");
  CHECK_THROWS_CODE(ppo::model::save_checkpoint(dir2, cfg, a.data()), ErrorCode::IoError,
                    dir2 + "/config.json");
  CHECK(temp_files(dir2).empty());
  // Refused before anything is written: NaN parameters, a bad config, a file in the way.
  std::vector<float> bad = a;
  const ppo::model::ParameterLayout layout = ppo::model::parameter_layout(cfg);
  bad[layout.blocks[1].fc_bias + 3] = tu::kNaN;
  CHECK_THROWS_CODE(ppo::model::save_checkpoint(dir, cfg, bad.data()), ErrorCode::NonFinite,
                    "h.1.mlp.c_fc.bias");
  CHECK_THROWS_CODE(ppo::model::save_checkpoint(dir, cfg, nullptr), ErrorCode::InvalidArgument, "params");
  ModelConfig badcfg = cfg;
  badcfg.n_head = 3;
  CHECK_THROWS_CODE(ppo::model::save_checkpoint(dir, badcfg, a.data()), ErrorCode::InvalidArgument, "n_head");
  write_file(tmp.sub("afile"), "x");
  CHECK_THROWS_CODE(ppo::model::save_checkpoint(tmp.sub("afile/sub"), cfg, a.data()),
                    ErrorCode::IoError, tmp.sub("afile/sub"));
  {
    const auto ck = ppo::model::load_checkpoint(dir);
    CHECK_BITWISE_EQUAL(ck.params.data(), b.data(), total, "after the refused saves");
  }
}

TEST(load_sharded) {
  TempDir tmp;
  tu::Rng rng(9);
  const ModelConfig cfg = tiny_config(true);
  HfOptions opt;
  opt.buffers = true;
  opt.dtype = [](size_t i) { return std::string(i < 10 ? "F32" : "BF16"); };
  const HfModel m = make_hf_model(cfg, opt, rng);
  const size_t half = m.tensors.size() / 2;
  const std::vector<RawTensor> s1(m.tensors.begin(), m.tensors.begin() + half);
  const std::vector<RawTensor> s2(m.tensors.begin() + half, m.tensors.end());
  const char* n1 = "model-00001-of-00002.safetensors";
  const char* n2 = "model-00002-of-00002.safetensors";
  auto index_text = [&](const std::string& override_name, const std::string& override_file) {
    std::string s = "{\"metadata\": {\"total_size\": 12345}, \"weight_map\": {";
    bool first = true;
    for (size_t k = 0; k < m.tensors.size(); ++k) {
      std::string file = k < half ? n1 : n2;
      if (m.tensors[k].name == override_name) file = override_file;
      s += (first ? "" : ", ") + std::string("\"") + m.tensors[k].name + "\": \"" + file + "\"";
      first = false;
    }
    return s + "}}";
  };
  const std::string dir = tmp.sub("sharded");
  fs::create_directories(dir);
  write_file(dir + "/config.json", hf_config_text(cfg));
  write_file(dir + "/" + n1, safetensors_bytes(s1));
  write_file(dir + "/" + n2, safetensors_bytes(s2));
  write_file(dir + "/model.safetensors.index.json", index_text("", ""));
  check_loads_as(dir, m, "sharded");

  // The index names a tensor in the wrong shard.
  const std::string moved = m.tensors[0].name;
  write_file(dir + "/model.safetensors.index.json", index_text(moved, n2));
  CHECK_THROWS_CODE(ppo::model::load_checkpoint(dir), ErrorCode::InvalidArgument, moved);
  // A shard that does not exist.
  write_file(dir + "/model.safetensors.index.json", index_text(moved, "model-00003-of-00003.safetensors"));
  CHECK_THROWS_CODE(ppo::model::load_checkpoint(dir), ErrorCode::NotFound,
                    dir + "/model-00003-of-00003.safetensors");
  // A shard path that leaves the directory.
  write_file(dir + "/model.safetensors.index.json", index_text(moved, "../evil.safetensors"));
  CHECK_THROWS_CODE(ppo::model::load_checkpoint(dir), ErrorCode::CorruptFile,
                    dir + "/model.safetensors.index.json");
  // A broken index.
  write_file(dir + "/model.safetensors.index.json", "{\"weight_map\": [1]}");
  CHECK_THROWS_CODE(ppo::model::load_checkpoint(dir), ErrorCode::CorruptFile,
                    dir + "/model.safetensors.index.json");
  write_file(dir + "/model.safetensors.index.json", "{\"weight_map\": {");
  CHECK_THROWS_CODE(ppo::model::load_checkpoint(dir), ErrorCode::CorruptFile,
                    dir + "/model.safetensors.index.json");
  // A tensor in both shards.
  std::vector<RawTensor> s2dup = s2;
  s2dup.push_back(s1[0]);
  write_file(dir + "/" + n2, safetensors_bytes(s2dup));
  write_file(dir + "/model.safetensors.index.json", index_text("", ""));
  CHECK_THROWS_CODE(ppo::model::load_checkpoint(dir), ErrorCode::InvalidArgument, s1[0].name);
  // model.safetensors, when present, wins over the index (as in transformers).
  ppo::model::save_checkpoint(dir, cfg, m.expected.data());
  check_loads_as(dir, m, "single file over the index");
}

// One corruption of a valid checkpoint directory and the error it must produce.
struct Corruption {
  const char* what;
  std::function<void(HfModel&, std::string& config_text)> edit;
  ErrorCode code;
  std::string argument;
};

TEST(load_corrupt_checkpoints) {
  TempDir tmp;
  tu::Rng rng(10);
  const ModelConfig cfg = tiny_config();
  HfOptions opt;
  opt.buffers = true;
  opt.lm_head = true;
  const HfModel base = make_hf_model(cfg, opt, rng);
  auto set_config = [](ModelConfig c) {
    return [c](HfModel&, std::string& text) { text = hf_config_text(c); };
  };
  ModelConfig wide = cfg;
  wide.n_embd = 16;
  ModelConfig bigger_vocab = cfg;
  bigger_vocab.vocab_size = 12;
  ModelConfig longer = cfg;
  longer.n_positions = 8;
  ModelConfig deeper = cfg;
  deeper.n_layer = 3;
  ModelConfig shallower = cfg;
  shallower.n_layer = 1;
  const std::vector<Corruption> cases = {
      {"wrong dtype for a weight",
       [](HfModel& m, std::string&) {
         RawTensor* t = find_raw(m.tensors, "transformer.h.0.attn.c_proj.weight");
         t->dtype = "I8";
         t->bytes = std::string(t->bytes.size() / 4, '\1');
       },
       ErrorCode::InvalidArgument, "transformer.h.0.attn.c_proj.weight"},
      {"wrong shape (c_attn not in Conv1D layout)",
       [](HfModel& m, std::string&) {
         RawTensor* t = find_raw(m.tensors, "transformer.h.1.attn.c_attn.weight");
         t->shape = {t->shape[1], t->shape[0]};
       },
       ErrorCode::ShapeMismatch, "transformer.h.1.attn.c_attn.weight"},
      {"wrong shape (a bias)",
       [](HfModel& m, std::string&) {
         RawTensor* t = find_raw(m.tensors, "transformer.h.0.mlp.c_fc.bias");
         t->shape = {4, 8};
       },
       ErrorCode::ShapeMismatch, "transformer.h.0.mlp.c_fc.bias"},
      {"missing tensor",
       [](HfModel& m, std::string&) {
         m.tensors.erase(std::find_if(m.tensors.begin(), m.tensors.end(), [](const RawTensor& t) {
           return t.name == "transformer.h.1.mlp.c_fc.bias";
         }));
       },
       ErrorCode::InvalidArgument, "h.1.mlp.c_fc.bias"},
      {"missing ln_f",
       [](HfModel& m, std::string&) {
         m.tensors.erase(std::find_if(m.tensors.begin(), m.tensors.end(), [](const RawTensor& t) {
           return t.name == "transformer.ln_f.weight";
         }));
       },
       ErrorCode::InvalidArgument, "ln_f.weight"},
      {"NaN in an F32 tensor",
       [](HfModel& m, std::string&) {
         RawTensor* t = find_raw(m.tensors, "transformer.h.0.ln_2.weight");
         const float nan = tu::kNaN;
         std::memcpy(&t->bytes[12], &nan, 4);
       },
       ErrorCode::NonFinite, "transformer.h.0.ln_2.weight"},
      {"inf in an F16 tensor",
       [](HfModel& m, std::string&) {
         RawTensor* t = find_raw(m.tensors, "transformer.wpe.weight");
         std::vector<double> v(t->bytes.size() / 4, 0.5);
         t->dtype = "F16";
         t->bytes = encode(v, "F16");
         t->bytes[5] = static_cast<char>(0x7C), t->bytes[4] = 0;  // element 2 = +inf
       },
       ErrorCode::NonFinite, "transformer.wpe.weight"},
      {"F64 at the float overflow threshold",
       [](HfModel& m, std::string&) {
         RawTensor* t = find_raw(m.tensors, "transformer.ln_f.bias");
         std::vector<double> v(t->bytes.size() / 4, 0.5);
         v[2] = -(static_cast<double>(std::numeric_limits<float>::max()) + std::ldexp(1.0, 103));
         t->dtype = "F64";
         t->bytes = encode(v, "F64");
       },
       ErrorCode::NonFinite, "transformer.ln_f.bias"},
      {"F64 beyond the float range",
       [](HfModel& m, std::string&) {
         RawTensor* t = find_raw(m.tensors, "transformer.ln_f.bias");
         std::vector<double> v(t->bytes.size() / 4, 0.5);
         v[7] = 1e300;
         t->dtype = "F64";
         t->bytes = encode(v, "F64");
       },
       ErrorCode::NonFinite, "transformer.ln_f.bias"},
      {"config n_embd disagrees", set_config(wide), ErrorCode::ShapeMismatch, "n_embd"},
      {"config vocab_size disagrees", set_config(bigger_vocab), ErrorCode::ShapeMismatch, "vocab_size"},
      {"config n_positions disagrees", set_config(longer), ErrorCode::ShapeMismatch, "n_positions"},
      {"config n_layer too large", set_config(deeper), ErrorCode::ShapeMismatch, "n_layer"},
      {"config n_layer too small", set_config(shallower), ErrorCode::ShapeMismatch, "n_layer"},
      {"config says value head, no score.weight",
       [](HfModel&, std::string& text) { text = hf_config_text(tiny_config(), "  \"ppo_max_value_head\": true,\n"); },
       ErrorCode::InvalidArgument, "score.weight"},
      {"value head with two outputs",
       [](HfModel& m, std::string&) {
         m.tensors.push_back({"score.weight", "F32", {2, 8}, encode(std::vector<double>(16, 0.25), "F32")});
       },
       ErrorCode::ShapeMismatch, "score.weight"},
      {"value head under the prefix",
       [](HfModel& m, std::string&) {
         m.tensors.push_back({"transformer.score.weight", "F32", {1, 8}, encode(std::vector<double>(8, 0.25), "F32")});
       },
       ErrorCode::InvalidArgument, "transformer.score.weight"},
      {"untied lm_head",
       [](HfModel& m, std::string&) {
         RawTensor* t = find_raw(m.tensors, "lm_head.weight");
         t->bytes[40] ^= 1;  // one bit of one element
       },
       ErrorCode::InvalidArgument, "lm_head.weight"},
      {"lm_head of the wrong shape",
       [](HfModel& m, std::string&) {
         RawTensor* t = find_raw(m.tensors, "lm_head.weight");
         t->shape = {8, 11};
       },
       ErrorCode::ShapeMismatch, "lm_head.weight"},
      {"another architecture's tensor",
       [](HfModel& m, std::string&) {
         m.tensors.push_back({"model.embed_tokens.weight", "F32", {2}, encode({1.0, 2.0}, "F32")});
       },
       ErrorCode::InvalidArgument, "model.embed_tokens.weight"},
      {"an unknown tensor inside a block",
       [](HfModel& m, std::string&) {
         m.tensors.push_back({"transformer.h.0.attn.q_proj.weight", "F32", {2}, encode({1.0, 2.0}, "F32")});
       },
       ErrorCode::InvalidArgument, "transformer.h.0.attn.q_proj.weight"},
      {"a tensor twice (with and without the prefix)",
       [](HfModel& m, std::string&) {
         RawTensor t = *find_raw(m.tensors, "transformer.ln_f.bias");
         t.name = "ln_f.bias";
         m.tensors.push_back(t);
       },
       ErrorCode::InvalidArgument, "ln_f.bias"},
      {"unsupported model_type",
       [](HfModel&, std::string& text) { text = "{\"model_type\": \"mistral\"}"; },
       ErrorCode::InvalidArgument, "model_type"},
      {"config.json not JSON",
       [](HfModel&, std::string& text) { text = "{\"n_embd\": 8"; },
       ErrorCode::CorruptFile, "@/config.json"},
      {"config.json not an object",
       [](HfModel&, std::string& text) { text = "[8]"; },
       ErrorCode::CorruptFile, "@/config.json"},
      {"config.json empty",
       [](HfModel&, std::string& text) { text = ""; },
       ErrorCode::CorruptFile, "@/config.json"},
      {"config.json with a field of the wrong type",
       [](HfModel&, std::string& text) { text = "{\"n_embd\": \"8\"}"; },
       ErrorCode::InvalidArgument, "n_embd"},
  };
  int k = 0;
  for (const Corruption& c : cases) {
    HfModel m = base;
    std::string text = hf_config_text(cfg);
    c.edit(m, text);
    const std::string dir = tmp.sub("c" + std::to_string(k++));
    write_checkpoint_dir(dir, text, m.tensors);
    const std::string arg = c.argument.rfind("@/", 0) == 0 ? dir + c.argument.substr(1) : c.argument;
    const size_t before = tf::state().failures;
    CHECK_THROWS_CODE(ppo::model::load_checkpoint(dir), c.code, arg);
    if (static_cast<size_t>(tf::state().failures) != before) std::printf("    case: %s\n", c.what);
  }
  // Sanity: the base itself loads (so every error above comes from its corruption).
  write_checkpoint_dir(tmp.sub("base"), hf_config_text(cfg), base.tensors);
  check_loads_as(tmp.sub("base"), base, "base");
}

TEST(load_corrupt_files_and_missing_paths) {
  TempDir tmp;
  tu::Rng rng(11);
  const ModelConfig cfg = tiny_config();
  const HfModel m = make_hf_model(cfg, HfOptions{}, rng);
  const std::string good = safetensors_bytes(m.tensors);
  const std::string dir = tmp.sub("ck");
  write_checkpoint_dir(dir, hf_config_text(cfg), m.tensors);
  const std::string wpath = dir + "/model.safetensors";
  // The tensor that ends the data section (the one a truncation cuts).
  std::string last;
  uint64_t last_end = 0;
  for (const auto& t : ppo::model::read_safetensors_header(wpath))
    if (t.end >= last_end) last_end = t.end, last = t.name;
  CHECK(last == m.tensors.back().name);

  // Truncated data.
  write_file(wpath, good.substr(0, good.size() - 10));
  CHECK_THROWS_CODE(ppo::model::load_checkpoint(dir), ErrorCode::CorruptFile, wpath);
  CHECK(message_has([&] { ppo::model::load_checkpoint(dir); }, "truncated"));
  CHECK(message_has([&] { ppo::model::load_checkpoint(dir); }, "'" + last + "'"));
  // Truncated inside the header / before the length.
  write_file(wpath, good.substr(0, 100));
  CHECK_THROWS_CODE(ppo::model::load_checkpoint(dir), ErrorCode::CorruptFile, wpath);
  write_file(wpath, good.substr(0, 5));
  CHECK_THROWS_CODE(ppo::model::load_checkpoint(dir), ErrorCode::CorruptFile, wpath);
  // Header length larger than the file.
  std::string big = good;
  big.replace(0, 8, u64_le(good.size()));
  write_file(wpath, big);
  CHECK_THROWS_CODE(ppo::model::load_checkpoint(dir), ErrorCode::CorruptFile, wpath);
  // Garbage header.
  std::string garbage = good;
  garbage[8] = '[';
  write_file(wpath, garbage);
  CHECK_THROWS_CODE(ppo::model::load_checkpoint(dir), ErrorCode::CorruptFile, wpath);
  CHECK(message_has([&] { ppo::model::load_checkpoint(dir); }, "corrupt"));
  // Extra bytes after the last tensor.
  write_file(wpath, good + "xxxx");
  CHECK_THROWS_CODE(ppo::model::load_checkpoint(dir), ErrorCode::CorruptFile, wpath);
  // Restored: loads.
  write_file(wpath, good);
  check_loads_as(dir, m, "restored");

  // Missing pieces.
  CHECK_THROWS_CODE(ppo::model::load_checkpoint(tmp.sub("nope")), ErrorCode::NotFound, tmp.sub("nope"));
  CHECK_THROWS_CODE(ppo::model::load_checkpoint(wpath), ErrorCode::NotFound, wpath);  // a file
  CHECK_THROWS_CODE(ppo::model::load_checkpoint(""), ErrorCode::InvalidArgument, "dir");
  fs::remove(dir + "/config.json");
  CHECK_THROWS_CODE(ppo::model::load_checkpoint(dir), ErrorCode::NotFound, dir + "/config.json");
  write_file(dir + "/config.json", hf_config_text(cfg));
  fs::remove(wpath);
  CHECK_THROWS_CODE(ppo::model::load_checkpoint(dir), ErrorCode::NotFound, wpath);
  write_file(dir + "/pytorch_model.bin", "x");
  CHECK(message_has([&] { ppo::model::load_checkpoint(dir); }, "pytorch_model.bin"));
}

TEST(load_is_deterministic_across_calls) {
  // Same file, same bits, every time (and, run with PPO_MAX_THREADS=1 and 3, whatever
  // the thread count: the checksum line must match between the runs).
  TempDir tmp;
  tu::Rng rng(12);
  ModelConfig cfg = tiny_config();
  cfg.n_embd = 64, cfg.n_head = 4, cfg.vocab_size = 300, cfg.n_positions = 64, cfg.bos_token_id = 1,
  cfg.eos_token_id = 2;
  HfOptions opt;
  opt.dtype = [](size_t i) { return std::string(i % 2 ? "BF16" : "F16"); };
  const HfModel m = make_hf_model(cfg, opt, rng);
  write_checkpoint_dir(tmp.path, hf_config_text(cfg), m.tensors);
  const auto a = ppo::model::load_checkpoint(tmp.path);
  const auto b = ppo::model::load_checkpoint(tmp.path);
  CHECK_BITWISE_EQUAL(a.params.data(), m.expected.data(), static_cast<int64_t>(m.expected.size()), "load");
  CHECK_BITWISE_EQUAL(a.params.data(), b.params.data(), static_cast<int64_t>(a.params.size()), "reload");
  uint64_t h = 1469598103934665603ULL;
  for (float f : a.params) h = (h ^ bits_of(f)) * 1099511628211ULL;
  std::printf("    checksum %016llx\n", static_cast<unsigned long long>(h));
}

}  // namespace

PPO_TEST_MAIN()
