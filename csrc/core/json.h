// A small, strict JSON (RFC 8259) parser and writer, for config.json and safetensors
// headers. Nothing but ppo::Error escapes from it.
//
// Parsing is strict: one value, surrounded only by whitespace; no comments, trailing
// commas, NaN/Infinity, leading zeros, control characters in strings, invalid UTF-8,
// unpaired surrogates or duplicate object keys (which the other readers of a file
// could resolve differently). "\uXXXX" escapes, surrogate pairs included, become UTF-8.
// Nesting deeper than kMaxDepth is refused, so hostile input cannot exhaust the stack.
// Every parse error is ppo::Error(InvalidArgument) naming `source`, with the byte
// offset and a short reason in the message (running out of memory: OutOfMemory).
//
// Numbers: every number has a double value (correctly rounded; a literal beyond the
// double range is an error). A literal written as an integer (no fraction, no exponent)
// that fits in int64 also keeps its exact int64 value (is_integer()), so offsets and
// sizes above 2^53 stay exact.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"

namespace ppo::json {

constexpr int kMaxDepth = 256;

namespace detail {
class Parser;
}

enum class Type { Null, Bool, Number, String, Array, Object };

// "null", "bool", "number", "string", "array", "object".
const char* type_name(Type type);

class Value {
 public:
  Value() = default;  // null
  static Value null() { return Value(); }
  static Value boolean(bool b);
  static Value number(double d);   // must be finite to be dumped
  static Value integer(int64_t i);
  static Value string(std::string s);
  static Value array();
  static Value object();

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }
  // A number written as an integer literal (or built by integer()) that fits in int64.
  bool is_integer() const { return type_ == Type::Number && has_int_; }

  // Typed accessors: each throws ppo::Error(InvalidArgument) when the type differs
  // (the message names the expected and the actual type).
  bool as_bool() const;
  double as_double() const;   // any number
  int64_t as_int64() const;   // is_integer() numbers only
  const std::string& as_string() const;

  // Arrays and objects: the number of elements / members (0 for other types).
  size_t size() const;
  // Array element i; throws ppo::Error(InvalidArgument) when this is not an array or
  // i >= size().
  const Value& operator[](size_t i) const;
  // Object member `key`, or nullptr (also when this is not an object).
  const Value* find(const std::string& key) const;
  // Object member `key`; throws ppo::Error(InvalidArgument, argument = key) when absent
  // or when this is not an object.
  const Value& at(const std::string& key) const;
  // Object members in document order: keys()[i] names values()[i]. Arrays: values()
  // are the elements (keys() is empty).
  const std::vector<std::string>& keys() const { return keys_; }
  const std::vector<Value>& values() const { return items_; }

  // Building. push_back needs an array; set needs an object and replaces an existing
  // member of the same key (keeping its position), else appends.
  void push_back(Value v);
  void set(const std::string& key, Value v);

 private:
  friend class detail::Parser;
  void require_type(Type t) const;

  Type type_ = Type::Null;
  bool bool_ = false;
  bool has_int_ = false;
  double number_ = 0.0;
  int64_t int_ = 0;
  std::string string_;
  std::vector<std::string> keys_;  // objects only
  std::vector<Value> items_;       // array elements or object values
};

// Parses one JSON document. `source` names the input in error messages and is the
// error's argument.
Value parse(const std::string& text, const std::string& source = "json");

// Serializes `value`: compact when indent < 0, else pretty-printed with `indent`
// spaces per level. Strings are written as UTF-8 with '"', '\\' and control characters
// escaped; integers exactly; other numbers in the shortest form that reads back to the
// same double. A non-finite number throws ppo::Error(InvalidArgument).
std::string dump(const Value& value, int indent = -1);

}  // namespace ppo::json
