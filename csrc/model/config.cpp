// Hugging Face GPT-2 config.json <-> ModelConfig (see config.h).
//
// Reading follows transformers' GPT2Config: missing fields take its defaults, unknown
// fields are ignored. Fields that would change the model's math away from what this
// engine computes (another model_type or activation, an n_inner other than 4 * n_embd,
// untied embeddings, attention-scaling variants, cross-attention) are refused rather
// than silently ignored, since the loaded model would then compute something else.
#include "model/config.h"

#include <algorithm>

#include <cmath>
#include <limits>

#include "core/error.h"
#include "core/json.h"

namespace ppo::model {
namespace {

[[noreturn]] void bad_field(const std::string& source, const std::string& field,
                            const std::string& what) {
  throw Error(ErrorCode::InvalidArgument, source + ": " + field + " " + what, field);
}

// An integer field, when present (returns false when absent).
bool read_int(const json::Value& root, const std::string& source, const std::string& field,
              int64_t& out) {
  const json::Value* v = root.find(field);
  if (!v) return false;
  if (!v->is_integer())
    bad_field(source, field,
              std::string("must be an integer, got ") +
                  (v->is_number() ? "a non-integer number" : json::type_name(v->type())));
  out = v->as_int64();
  return true;
}

bool read_bool(const json::Value& root, const std::string& source, const std::string& field,
               bool& out) {
  const json::Value* v = root.find(field);
  if (!v) return false;
  if (!v->is_bool())
    bad_field(source, field, std::string("must be true or false, got ") + json::type_name(v->type()));
  out = v->as_bool();
  return true;
}

// A boolean field that must have the value `required` (the only one this engine computes).
void require_bool_value(const json::Value& root, const std::string& source,
                        const std::string& field, bool required, const std::string& why) {
  bool value = required;
  if (read_bool(root, source, field, value) && value != required)
    bad_field(source, field, std::string("must be ") + (required ? "true" : "false") + ": " + why);
}

void require_range(int64_t value, int64_t lo, int64_t hi, const char* field) {
  require(value >= lo && value <= hi, ErrorCode::InvalidArgument,
          std::string("config: ") + field + " must be in [" + std::to_string(lo) + ", " +
              std::to_string(hi) + "], got " + std::to_string(value),
          field);
}

}  // namespace

void ModelConfig::validate() const {
  require(model_type == "gpt2", ErrorCode::InvalidArgument,
          "config: model_type \"" + model_type +
              "\" is not supported: only the GPT-2 family (model_type \"gpt2\") is supported "
              "in this release",
          "model_type");
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();  // token ids are int32
  require_range(vocab_size, 1, kInt32Max, "vocab_size");
  require_range(n_positions, 1, kInt32Max, "n_positions");
  require_range(n_embd, 1, kInt32Max, "n_embd");
  require_range(n_layer, 1, kInt32Max, "n_layer");
  require_range(n_head, 1, n_embd, "n_head");
  require(n_embd % n_head == 0, ErrorCode::InvalidArgument,
          "config: n_embd (" + std::to_string(n_embd) + ") must be divisible by n_head (" +
              std::to_string(n_head) + ")",
          "n_head");
  require(std::isfinite(layer_norm_epsilon) && layer_norm_epsilon > 0.0, ErrorCode::InvalidArgument,
          "config: layer_norm_epsilon must be finite and > 0", "layer_norm_epsilon");
  // Stored as float in the kernels: a positive double below the float range would be 0.
  require(static_cast<float>(layer_norm_epsilon) > 0.0f, ErrorCode::InvalidArgument,
          "config: layer_norm_epsilon is too small to be represented as a float32 (> 0)",
          "layer_norm_epsilon");
  require_range(bos_token_id, 0, vocab_size - 1, "bos_token_id");
  require_range(eos_token_id, 0, vocab_size - 1, "eos_token_id");
  // The flat buffer holds every parameter; offsets are int64 and sizes go through
  // double in places: keep the count far below 2^53 (no real model comes close).
  const double C = static_cast<double>(n_embd);
  const double total = (static_cast<double>(vocab_size) + static_cast<double>(n_positions)) * C +
                       static_cast<double>(n_layer) * (12.0 * C * C + 13.0 * C) + 3.0 * C;
  require(total < 9007199254740992.0 /* 2^53 */, ErrorCode::InvalidArgument,
          "config: the model would have about " + std::to_string(total) +
              " parameters, more than the 2^53 supported (check n_embd / n_layer / vocab_size)",
          "n_embd");
}

ModelConfig config_from_json(const std::string& text, const std::string& source) {
  const json::Value root = json::parse(text, source);
  require(root.is_object(), ErrorCode::InvalidArgument,
          source + ": a config must be a JSON object, got " + json::type_name(root.type()),
          source);
  ModelConfig c;

  if (const json::Value* v = root.find("model_type")) {
    if (!v->is_string())
      bad_field(source, "model_type",
                std::string("must be a string, got ") + json::type_name(v->type()));
    c.model_type = v->as_string();
    require(c.model_type == "gpt2", ErrorCode::InvalidArgument,
            source + ": model_type \"" + c.model_type +
                "\" is not supported: only the GPT-2 family (model_type \"gpt2\") is "
                "supported in this release",
            "model_type");
  }

  read_int(root, source, "vocab_size", c.vocab_size);
  // Old configs (the original OpenAI conversions) also carry n_ctx; transformers reads
  // n_positions, so n_ctx only stands in when n_positions is absent.
  if (!read_int(root, source, "n_positions", c.n_positions))
    read_int(root, source, "n_ctx", c.n_positions);
  read_int(root, source, "n_embd", c.n_embd);
  read_int(root, source, "n_layer", c.n_layer);
  read_int(root, source, "n_head", c.n_head);
  if (const json::Value* v = root.find("layer_norm_epsilon")) {
    if (!v->is_number())
      bad_field(source, "layer_norm_epsilon",
                std::string("must be a number, got ") + json::type_name(v->type()));
    c.layer_norm_epsilon = v->as_double();
  }
  // Absent ids take GPT-2's 50256 (transformers' default) when the vocabulary holds it,
  // else the last id (GPT-2's convention: <|endoftext|> is the last token), so a config of
  // a small vocabulary that leaves them out still loads. Ids that ARE given must fit.
  const int64_t default_special = std::min<int64_t>(50256, c.vocab_size - 1);
  if (!read_int(root, source, "bos_token_id", c.bos_token_id)) c.bos_token_id = default_special;
  if (!read_int(root, source, "eos_token_id", c.eos_token_id)) c.eos_token_id = default_special;
  read_bool(root, source, "ppo_max_value_head", c.value_head);

  // GELU: this engine computes the tanh approximation, which transformers calls
  // "gelu_new" (GPT-2's) or, identically, "gelu_pytorch_tanh".
  if (const json::Value* v = root.find("activation_function")) {
    if (!v->is_string())
      bad_field(source, "activation_function",
                std::string("must be a string, got ") + json::type_name(v->type()));
    const std::string& act = v->as_string();
    if (act != "gelu_new" && act != "gelu_pytorch_tanh")
      bad_field(source, "activation_function",
                "\"" + act + "\" is not supported: only \"gelu_new\" (GPT-2's tanh GELU) is");
  }

  // n_inner: the MLP width; null means 4 * n_embd, the only width this engine has.
  if (const json::Value* v = root.find("n_inner")) {
    if (!v->is_null()) {
      if (!v->is_integer())
        bad_field(source, "n_inner",
                  std::string("must be null or an integer, got ") +
                      (v->is_number() ? "a non-integer number" : json::type_name(v->type())));
      if (v->as_int64() != 4 * c.n_embd)
        bad_field(source, "n_inner",
                  "= " + std::to_string(v->as_int64()) +
                      " is not supported: the MLP width must be 4 * n_embd (" +
                      std::to_string(4 * c.n_embd) + ") or null");
    }
  }

  require_bool_value(root, source, "tie_word_embeddings", true,
                     "the LM head is always tied to wte (untied heads are not supported)");
  require_bool_value(root, source, "scale_attn_weights", true,
                     "attention scores are always scaled by 1/sqrt(head size)");
  require_bool_value(root, source, "scale_attn_by_inverse_layer_idx", false,
                     "per-layer attention scaling is not supported");
  require_bool_value(root, source, "add_cross_attention", false,
                     "cross-attention (encoder-decoder use) is not supported");

  try {
    c.validate();
  } catch (const Error& e) {
    throw Error(e.code(), source + ": " + e.what(), e.argument());
  }
  return c;
}

std::string config_to_json(const ModelConfig& config) {
  config.validate();
  using json::Value;
  Value root = Value::object();
  // The keys in sorted order, as transformers writes them (sort_keys=True).
  Value arch = Value::array();
  arch.push_back(Value::string("GPT2LMHeadModel"));
  root.set("activation_function", Value::string("gelu_new"));
  root.set("architectures", std::move(arch));
  root.set("attn_pdrop", Value::number(0.1));
  root.set("bos_token_id", Value::integer(config.bos_token_id));
  root.set("embd_pdrop", Value::number(0.1));
  root.set("eos_token_id", Value::integer(config.eos_token_id));
  root.set("initializer_range", Value::number(0.02));
  root.set("layer_norm_epsilon", Value::number(config.layer_norm_epsilon));
  root.set("model_type", Value::string("gpt2"));
  // n_ctx: read by old tools (and written in the original GPT-2 configs); equal to
  // n_positions, which is what transformers uses.
  root.set("n_ctx", Value::integer(config.n_positions));
  root.set("n_embd", Value::integer(config.n_embd));
  root.set("n_head", Value::integer(config.n_head));
  root.set("n_inner", Value::null());
  root.set("n_layer", Value::integer(config.n_layer));
  root.set("n_positions", Value::integer(config.n_positions));
  if (config.value_head) root.set("ppo_max_value_head", Value::boolean(true));
  root.set("resid_pdrop", Value::number(0.1));
  root.set("scale_attn_weights", Value::boolean(true));
  root.set("tie_word_embeddings", Value::boolean(true));
  root.set("torch_dtype", Value::string("float32"));
  root.set("use_cache", Value::boolean(true));
  root.set("vocab_size", Value::integer(config.vocab_size));
  return json::dump(root, 2) + "\n";
}

}  // namespace ppo::model
