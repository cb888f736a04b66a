// The strict JSON parser and writer (see json.h for the contract).
//
// The parser is a recursive descent over the bytes of the text; the recursion depth is
// the nesting depth of arrays/objects, bounded by kMaxDepth. Numbers are converted with
// std::from_chars (integers) and a classic-locale stream (doubles), so neither the
// process locale (a "," decimal separator) nor the platform changes the result.
#include "core/json.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <iomanip>
#include <locale>
#include <new>
#include <sstream>

#include "core/error.h"

namespace ppo::json {

const char* type_name(Type type) {
  switch (type) {
    case Type::Null: return "null";
    case Type::Bool: return "bool";
    case Type::Number: return "number";
    case Type::String: return "string";
    case Type::Array: return "array";
    case Type::Object: return "object";
  }
  return "unknown";
}

// ================================ Value ==================================================

Value Value::boolean(bool b) {
  Value v;
  v.type_ = Type::Bool;
  v.bool_ = b;
  return v;
}

Value Value::number(double d) {
  Value v;
  v.type_ = Type::Number;
  v.number_ = d;
  return v;
}

Value Value::integer(int64_t i) {
  Value v;
  v.type_ = Type::Number;
  v.has_int_ = true;
  v.int_ = i;
  v.number_ = static_cast<double>(i);
  return v;
}

Value Value::string(std::string s) {
  Value v;
  v.type_ = Type::String;
  v.string_ = std::move(s);
  return v;
}

Value Value::array() {
  Value v;
  v.type_ = Type::Array;
  return v;
}

Value Value::object() {
  Value v;
  v.type_ = Type::Object;
  return v;
}

void Value::require_type(Type t) const {
  if (type_ != t)
    throw Error(ErrorCode::InvalidArgument,
                std::string("JSON value: expected ") + type_name(t) + ", got " +
                    type_name(type_));
}

bool Value::as_bool() const {
  require_type(Type::Bool);
  return bool_;
}

double Value::as_double() const {
  require_type(Type::Number);
  return number_;
}

int64_t Value::as_int64() const {
  require_type(Type::Number);
  if (!has_int_)
    throw Error(ErrorCode::InvalidArgument,
                "JSON value: expected an integer (in the int64 range), got a non-integer number");
  return int_;
}

const std::string& Value::as_string() const {
  require_type(Type::String);
  return string_;
}

size_t Value::size() const {
  return (type_ == Type::Array || type_ == Type::Object) ? items_.size() : 0;
}

const Value& Value::operator[](size_t i) const {
  require_type(Type::Array);
  if (i >= items_.size())
    throw Error(ErrorCode::InvalidArgument, "JSON array index " + std::to_string(i) +
                                                " out of range (size " +
                                                std::to_string(items_.size()) + ")");
  return items_[i];
}

const Value* Value::find(const std::string& key) const {
  if (type_ != Type::Object) return nullptr;
  for (size_t i = 0; i < keys_.size(); ++i)
    if (keys_[i] == key) return &items_[i];
  return nullptr;
}

const Value& Value::at(const std::string& key) const {
  if (type_ != Type::Object)
    throw Error(ErrorCode::InvalidArgument,
                "JSON value: expected an object with member '" + key + "', got " +
                    type_name(type_),
                key);
  const Value* v = find(key);
  if (!v) throw Error(ErrorCode::InvalidArgument, "JSON object has no member '" + key + "'", key);
  return *v;
}

void Value::push_back(Value v) {
  require_type(Type::Array);
  items_.push_back(std::move(v));
}

void Value::set(const std::string& key, Value v) {
  require_type(Type::Object);
  for (size_t i = 0; i < keys_.size(); ++i) {
    if (keys_[i] == key) {
      items_[i] = std::move(v);
      return;
    }
  }
  keys_.push_back(key);
  items_.push_back(std::move(v));
}

// ================================ UTF-8 ==================================================
namespace {

// The length of the valid UTF-8 sequence starting at s[i] (1..4), or 0 when the bytes
// there are not well-formed UTF-8 (RFC 3629: no overlongs, no surrogates, <= U+10FFFF).
// `n` is the length of s.
size_t utf8_sequence_length(const unsigned char* s, size_t i, size_t n) {
  const unsigned char c = s[i];
  if (c < 0x80) return 1;
  auto cont = [&](size_t k, unsigned char lo = 0x80, unsigned char hi = 0xBF) {
    return i + k < n && s[i + k] >= lo && s[i + k] <= hi;
  };
  if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
  if (c == 0xE0) return cont(1, 0xA0, 0xBF) && cont(2) ? 3 : 0;
  if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) return cont(1) && cont(2) ? 3 : 0;
  if (c == 0xED) return cont(1, 0x80, 0x9F) && cont(2) ? 3 : 0;  // no UTF-16 surrogates
  if (c == 0xF0) return cont(1, 0x90, 0xBF) && cont(2) && cont(3) ? 4 : 0;
  if (c >= 0xF1 && c <= 0xF3) return cont(1) && cont(2) && cont(3) ? 4 : 0;
  if (c == 0xF4) return cont(1, 0x80, 0x8F) && cont(2) && cont(3) ? 4 : 0;
  return 0;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Parses a decimal floating-point literal (already checked against the JSON grammar)
// independently of the process locale. Returns false when it is beyond the double range.
bool parse_double(const char* begin, const char* end, double& out) {
  std::istringstream is(std::string(begin, end));
  is.imbue(std::locale::classic());
  double d = 0.0;
  is >> d;
  if (!is.fail() && std::isfinite(d)) {
    out = d;
    return true;
  }
  // The stream fails on ERANGE. Tell underflow (the value rounds to zero: accept, as
  // every JSON reader does) from overflow by the decimal magnitude of the literal:
  // (position of the first non-zero digit relative to the point) + exponent.
  const char* p = begin;
  const bool negative = *p == '-';
  if (negative) ++p;
  int64_t magnitude = 0;
  bool seen_nonzero = false, after_point = false;
  int64_t int_digits = 0, leading_frac_zeros = 0;
  for (; p < end && *p != 'e' && *p != 'E'; ++p) {
    if (*p == '.') {
      after_point = true;
      continue;
    }
    if (!seen_nonzero) {
      if (*p != '0') {
        seen_nonzero = true;
        if (!after_point) ++int_digits;
      } else if (after_point) {
        ++leading_frac_zeros;
      }
    } else if (!after_point) {
      ++int_digits;
    }
  }
  if (!seen_nonzero) {  // all digits zero: the stream cannot have failed on it
    out = negative ? -0.0 : 0.0;
    return true;
  }
  int64_t exponent = 0;
  if (p < end) {  // at 'e' / 'E'
    ++p;
    bool exp_negative = false;
    if (*p == '+' || *p == '-') exp_negative = *p++ == '-';
    for (; p < end; ++p) {
      exponent = std::min<int64_t>(exponent * 10 + (*p - '0'), int64_t(1) << 40);
    }
    if (exp_negative) exponent = -exponent;
  }
  magnitude = (int_digits > 0 ? int_digits : -leading_frac_zeros) + exponent;
  if (magnitude < 0) {
    out = negative ? -0.0 : 0.0;
    return true;
  }
  return false;
}

}  // namespace

// ================================ Parser =================================================

namespace detail {

class Parser {
 public:
  Parser(const std::string& text, const std::string& source)
      : s_(reinterpret_cast<const unsigned char*>(text.data())), n_(text.size()),
        source_(source) {}

  Value parse_document() {
    skip_ws();
    Value v = parse_value(0);
    skip_ws();
    if (i_ != n_) fail("unexpected data after the JSON value");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& reason) const { fail_at(i_, reason); }
  [[noreturn]] void fail_at(size_t offset, const std::string& reason) const {
    throw Error(ErrorCode::InvalidArgument,
                source_ + ": invalid JSON at byte " + std::to_string(offset) + ": " + reason,
                source_);
  }

  void skip_ws() {
    while (i_ < n_ && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r'))
      ++i_;
  }

  void expect_literal(const char* lit) {
    const size_t len = std::strlen(lit);
    if (n_ - i_ < len || std::memcmp(s_ + i_, lit, len) != 0)
      fail(std::string("invalid literal (expected '") + lit + "')");
    i_ += len;
  }

  Value parse_value(int depth) {
    if (i_ >= n_) fail("unexpected end of input (expected a value)");
    switch (s_[i_]) {
      case '{': return parse_object(depth + 1);
      case '[': return parse_array(depth + 1);
      case '"': return Value::string(parse_string());
      case 't': expect_literal("true"); return Value::boolean(true);
      case 'f': expect_literal("false"); return Value::boolean(false);
      case 'n': expect_literal("null"); return Value::null();
      default:
        if (s_[i_] == '-' || (s_[i_] >= '0' && s_[i_] <= '9')) return parse_number();
        fail("unexpected character (expected a value)");
    }
  }

  Value parse_object(int depth) {
    if (depth > kMaxDepth)
      fail("nesting deeper than " + std::to_string(kMaxDepth) + " levels");
    const size_t start = i_;
    ++i_;  // '{'
    Value obj = Value::object();
    std::vector<std::string> keys;
    std::vector<Value> values;
    skip_ws();
    if (i_ < n_ && s_[i_] == '}') {
      ++i_;
      return obj;
    }
    for (;;) {
      skip_ws();
      if (i_ >= n_) fail("unexpected end of input (expected a key)");
      if (s_[i_] != '"') fail("expected a string key");
      keys.push_back(parse_string());
      skip_ws();
      if (i_ >= n_) fail("unexpected end of input (expected ':')");
      if (s_[i_] != ':') fail("expected ':' after the key");
      ++i_;
      skip_ws();
      values.push_back(parse_value(depth));
      skip_ws();
      if (i_ >= n_) fail("unexpected end of input (expected ',' or '}')");
      if (s_[i_] == ',') {
        ++i_;
        continue;
      }
      if (s_[i_] == '}') {
        ++i_;
        break;
      }
      fail("expected ',' or '}'");
    }
    // Duplicate keys: sort the indices by key (O(k log k), not O(k^2) on hostile input).
    if (keys.size() > 1) {
      std::vector<size_t> order(keys.size());
      for (size_t k = 0; k < order.size(); ++k) order[k] = k;
      std::sort(order.begin(), order.end(),
                [&](size_t a, size_t b) { return keys[a] < keys[b]; });
      for (size_t k = 1; k < order.size(); ++k)
        if (keys[order[k]] == keys[order[k - 1]])
          fail_at(start, "duplicate key \"" + keys[order[k]] + "\" in the object starting here");
    }
    obj.keys_ = std::move(keys);
    obj.items_ = std::move(values);
    return obj;
  }

  Value parse_array(int depth) {
    if (depth > kMaxDepth)
      fail("nesting deeper than " + std::to_string(kMaxDepth) + " levels");
    ++i_;  // '['
    Value arr = Value::array();
    skip_ws();
    if (i_ < n_ && s_[i_] == ']') {
      ++i_;
      return arr;
    }
    for (;;) {
      skip_ws();
      arr.push_back(parse_value(depth));
      skip_ws();
      if (i_ >= n_) fail("unexpected end of input (expected ',' or ']')");
      if (s_[i_] == ',') {
        ++i_;
        continue;
      }
      if (s_[i_] == ']') {
        ++i_;
        break;
      }
      fail("expected ',' or ']'");
    }
    return arr;
  }

  // Four hex digits at s_[i_..i_+4) -> their value; advances i_.
  uint32_t parse_hex4() {
    if (n_ - i_ < 4) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      const unsigned char c = s_[i_];
      uint32_t d;
      if (c >= '0' && c <= '9') d = c - '0';
      else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
      else fail("invalid hex digit in \\u escape");
      v = v * 16 + d;
      ++i_;
    }
    return v;
  }

  std::string parse_string() {
    ++i_;  // opening quote
    std::string out;
    for (;;) {
      if (i_ >= n_) fail("unterminated string");
      const unsigned char c = s_[i_];
      if (c == '"') {
        ++i_;
        return out;
      }
      if (c < 0x20) fail("unescaped control character in a string");
      if (c == '\\') {
        const size_t esc = i_;
        ++i_;
        if (i_ >= n_) fail("unterminated escape");
        const unsigned char e = s_[i_++];
        switch (e) {
          case '"': out += '"'; break;
          case '\\': out += '\\'; break;
          case '/': out += '/'; break;
          case 'b': out += '\b'; break;
          case 'f': out += '\f'; break;
          case 'n': out += '\n'; break;
          case 'r': out += '\r'; break;
          case 't': out += '\t'; break;
          case 'u': {
            uint32_t cp = parse_hex4();
            if (cp >= 0xDC00 && cp <= 0xDFFF) fail_at(esc, "unpaired low surrogate in \\u escape");
            if (cp >= 0xD800 && cp <= 0xDBFF) {
              if (n_ - i_ < 2 || s_[i_] != '\\' || s_[i_ + 1] != 'u')
                fail_at(esc, "high surrogate not followed by a \\u low surrogate");
              i_ += 2;
              const uint32_t lo = parse_hex4();
              if (lo < 0xDC00 || lo > 0xDFFF)
                fail_at(esc, "high surrogate not followed by a low surrogate");
              cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            append_utf8(out, cp);
            break;
          }
          default: fail_at(esc, "invalid escape sequence");
        }
        continue;
      }
      if (c < 0x80) {
        out += static_cast<char>(c);
        ++i_;
        continue;
      }
      const size_t len = utf8_sequence_length(s_, i_, n_);
      if (len == 0) fail("invalid UTF-8 in a string");
      out.append(reinterpret_cast<const char*>(s_ + i_), len);
      i_ += len;
    }
  }

  Value parse_number() {
    const size_t start = i_;
    auto digit = [&](size_t k) { return k < n_ && s_[k] >= '0' && s_[k] <= '9'; };
    if (s_[i_] == '-') ++i_;
    if (!digit(i_)) fail("expected a digit");
    if (s_[i_] == '0') {
      ++i_;
      if (digit(i_)) fail_at(start, "leading zero in a number");
    } else {
      while (digit(i_)) ++i_;
    }
    bool integral = true;
    if (i_ < n_ && s_[i_] == '.') {
      integral = false;
      ++i_;
      if (!digit(i_)) fail("expected a digit after the decimal point");
      while (digit(i_)) ++i_;
    }
    if (i_ < n_ && (s_[i_] == 'e' || s_[i_] == 'E')) {
      integral = false;
      ++i_;
      if (i_ < n_ && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
      if (!digit(i_)) fail("expected a digit in the exponent");
      while (digit(i_)) ++i_;
    }
    const char* b = reinterpret_cast<const char*>(s_ + start);
    const char* e = reinterpret_cast<const char*>(s_ + i_);
    if (integral) {
      int64_t iv = 0;
      const auto r = std::from_chars(b, e, iv);
      if (r.ec == std::errc() && r.ptr == e) return Value::integer(iv);
      // Beyond int64: only the double value is kept.
    }
    double d = 0.0;
    if (!parse_double(b, e, d)) fail_at(start, "number out of the double range");
    return Value::number(d);
  }

  const unsigned char* s_;
  size_t n_;
  size_t i_ = 0;
  const std::string& source_;
};

}  // namespace detail

namespace {

// ================================ Writer =================================================

std::string format_double(double d) {
  if (!std::isfinite(d))
    throw Error(ErrorCode::InvalidArgument, "JSON cannot represent a non-finite number");
  // The shortest %g-style form that reads back to the same double (17 digits always do).
  std::string s;
  for (int prec = 1; prec <= 17; ++prec) {
    std::ostringstream os;
    os.imbue(std::locale::classic());
    os << std::setprecision(prec) << d;
    s = os.str();
    std::istringstream is(s);
    is.imbue(std::locale::classic());
    double back = 0.0;
    is >> back;
    if (!is.fail() && back == d && std::signbit(back) == std::signbit(d)) break;
  }
  // Keep it a non-integer number when read back ("1" would parse as an integer).
  if (s.find_first_of(".eE") == std::string::npos) s += ".0";
  return s;
}

void dump_string(const std::string& s, std::string& out) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  out += '"';
  for (size_t i = 0; i < n;) {
    const unsigned char c = p[i];
    if (c >= 0x80) {
      const size_t len = utf8_sequence_length(p, i, n);
      if (len == 0)
        throw Error(ErrorCode::InvalidArgument, "JSON dump: a string is not valid UTF-8");
      out.append(s, i, len);
      i += len;
      continue;
    }
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          static const char hex[] = "0123456789abcdef";
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 15];
        } else {
          out += static_cast<char>(c);
        }
    }
    ++i;
  }
  out += '"';
}

void newline(std::string& out, int indent, int level) {
  if (indent < 0) return;
  out += '\n';
  out.append(static_cast<size_t>(indent) * static_cast<size_t>(level), ' ');
}

void dump_value(const Value& v, int indent, int level, std::string& out) {
  switch (v.type()) {
    case Type::Null: out += "null"; return;
    case Type::Bool: out += v.as_bool() ? "true" : "false"; return;
    case Type::Number:
      out += v.is_integer() ? std::to_string(v.as_int64()) : format_double(v.as_double());
      return;
    case Type::String: dump_string(v.as_string(), out); return;
    case Type::Array: {
      if (v.size() == 0) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t i = 0; i < v.size(); ++i) {
        if (i) out += ',';
        newline(out, indent, level + 1);
        dump_value(v.values()[i], indent, level + 1, out);
      }
      newline(out, indent, level);
      out += ']';
      return;
    }
    case Type::Object: {
      if (v.size() == 0) {
        out += "{}";
        return;
      }
      out += '{';
      for (size_t i = 0; i < v.size(); ++i) {
        if (i) out += ',';
        newline(out, indent, level + 1);
        dump_string(v.keys()[i], out);
        out += indent < 0 ? ":" : ": ";
        dump_value(v.values()[i], indent, level + 1, out);
      }
      newline(out, indent, level);
      out += '}';
      return;
    }
  }
}

}  // namespace

Value parse(const std::string& text, const std::string& source) {
  try {
    return detail::Parser(text, source).parse_document();
  } catch (const std::bad_alloc&) {
    throw Error(ErrorCode::OutOfMemory, source + ": out of memory while parsing JSON", source);
  }
}

std::string dump(const Value& value, int indent) {
  try {
    std::string out;
    dump_value(value, indent, 0, out);
    return out;
  } catch (const std::bad_alloc&) {
    throw Error(ErrorCode::OutOfMemory, "out of memory while writing JSON");
  }
}

}  // namespace ppo::json
