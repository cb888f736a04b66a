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
  require(model_type == "gpt2" || model_type == "llama", ErrorCode::InvalidArgument,
          "config: model_type \"" + model_type +
              "\" is not supported: the GPT-2 family (\"gpt2\") and the Llama family (\"llama\") are",
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
  auto positive_float = [](double v, const char* field) {
    require(std::isfinite(v) && v > 0.0 && static_cast<float>(v) > 0.0f, ErrorCode::InvalidArgument,
            std::string("config: ") + field + " must be finite and > 0 (and representable as a float32)", field);
  };
  if (is_llama()) {
    require_range(kv_heads(), 1, n_head, "n_kv_head");
    require(n_head % kv_heads() == 0, ErrorCode::InvalidArgument,
            "config: num_attention_heads (" + std::to_string(n_head) + ") must be a multiple of num_key_value_heads (" +
                std::to_string(kv_heads()) + ")",
            "n_kv_head");
    require(head_size() % 2 == 0, ErrorCode::InvalidArgument,
            "config: the head size (hidden_size / num_attention_heads = " + std::to_string(head_size()) +
                ") must be even for rotary positions",
            "n_head");
    require_range(intermediate_size, 1, kInt32Max, "intermediate_size");
    positive_float(rms_norm_eps, "rms_norm_eps");
    positive_float(rope_theta, "rope_theta");
    positive_float(rope_scaling, "rope_scaling");
  } else {
    positive_float(layer_norm_epsilon, "layer_norm_epsilon");
  }
  require_range(bos_token_id, 0, vocab_size - 1, "bos_token_id");
  require_range(eos_token_id, 0, vocab_size - 1, "eos_token_id");
  // The flat buffer holds every parameter; offsets are int64 and sizes go through
  // double in places: keep the count far below 2^53 (no real model comes close).
  const double C = static_cast<double>(n_embd), I = static_cast<double>(mlp_width());
  const double total = (2.0 * static_cast<double>(vocab_size) + static_cast<double>(n_positions)) * C +
                       static_cast<double>(n_layer) * (4.0 * C * C + 3.0 * C * I + 13.0 * C) + 3.0 * C;
  require(total < 9007199254740992.0 /* 2^53 */, ErrorCode::InvalidArgument,
          "config: the model would have about " + std::to_string(total) +
              " parameters, more than the 2^53 supported (check n_embd / n_layer / vocab_size)",
          "n_embd");
}

namespace {

double read_number(const json::Value& root, const std::string& source, const std::string& field, double fallback) {
  const json::Value* v = root.find(field);
  if (!v || v->is_null()) return fallback;
  if (!v->is_number()) bad_field(source, field, std::string("must be a number, got ") + json::type_name(v->type()));
  return v->as_double();
}

// A Llama config.json (transformers' LlamaConfig: missing fields take its defaults).
ModelConfig llama_from_json(const json::Value& root, const std::string& source) {
  ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 32000;
  c.n_embd = 4096;
  c.intermediate_size = 11008;
  c.n_layer = 32;
  c.n_head = 32;
  c.n_positions = 2048;
  c.bos_token_id = 1;
  c.eos_token_id = 2;
  read_int(root, source, "vocab_size", c.vocab_size);
  read_int(root, source, "hidden_size", c.n_embd);
  read_int(root, source, "intermediate_size", c.intermediate_size);
  read_int(root, source, "num_hidden_layers", c.n_layer);
  read_int(root, source, "num_attention_heads", c.n_head);
  c.n_kv_head = c.n_head;
  if (const json::Value* v = root.find("num_key_value_heads"); v && !v->is_null())
    read_int(root, source, "num_key_value_heads", c.n_kv_head);
  read_int(root, source, "max_position_embeddings", c.n_positions);
  c.rms_norm_eps = read_number(root, source, "rms_norm_eps", 1e-6);
  c.rope_theta = read_number(root, source, "rope_theta", 10000.0);
  read_bool(root, source, "tie_word_embeddings", c.tie_word_embeddings);
  read_bool(root, source, "ppo_max_value_head", c.value_head);
  // Special ids: null (some checkpoints) or absent keep LlamaConfig's 1 and 2, clamped into
  // a small vocabulary.
  if (const json::Value* v = root.find("bos_token_id"); v && !v->is_null()) read_int(root, source, "bos_token_id", c.bos_token_id);
  if (const json::Value* v = root.find("eos_token_id"); v && !v->is_null()) {
    if (v->is_array()) {  // several stop ids (Llama 3): the first is the end of text
      if (v->size() == 0 || !(*v)[0].is_integer()) bad_field(source, "eos_token_id", "must be an integer or a non-empty list of integers");
      c.eos_token_id = (*v)[0].as_int64();
    } else {
      read_int(root, source, "eos_token_id", c.eos_token_id);
    }
  }
  c.bos_token_id = std::min(c.bos_token_id, c.vocab_size - 1);
  c.eos_token_id = std::min(c.eos_token_id, c.vocab_size - 1);
  if (const json::Value* v = root.find("head_dim"); v && !v->is_null()) {
    int64_t head_dim = 0;
    read_int(root, source, "head_dim", head_dim);
    if (c.n_head > 0 && head_dim * c.n_head != c.n_embd)
      bad_field(source, "head_dim", "= " + std::to_string(head_dim) + " is not supported: it must equal hidden_size / num_attention_heads");
  }
  // rope_scaling: absent/null, or the plain linear kind (positions divided by factor).
  if (const json::Value* v = root.find("rope_scaling"); v && !v->is_null()) {
    if (!v->is_object()) bad_field(source, "rope_scaling", "must be null or an object");
    std::string kind;
    for (const char* key : {"rope_type", "type"})
      if (const json::Value* t = v->find(key); t && t->is_string()) { kind = t->as_string(); break; }
    if (kind != "linear" && kind != "default")
      bad_field(source, "rope_scaling", "of type \"" + kind + "\" is not supported: only \"linear\" rope scaling (or none) is");
    if (kind == "linear") c.rope_scaling = read_number(*v, source, "factor", 1.0);
  }
  if (const json::Value* v = root.find("hidden_act"); v && !v->is_null()) {
    if (!v->is_string() || v->as_string() != "silu")
      bad_field(source, "hidden_act", "is not supported: only \"silu\" (SwiGLU) is");
  }
  require_bool_value(root, source, "attention_bias", false, "the attention projections have no biases here");
  require_bool_value(root, source, "mlp_bias", false, "the MLP projections have no biases here");
  return c;
}

}  // namespace

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
    require(c.model_type == "gpt2" || c.model_type == "llama", ErrorCode::InvalidArgument,
            source + ": model_type \"" + c.model_type +
                "\" is not supported: the GPT-2 family (\"gpt2\") and the Llama family (\"llama\") are",
            "model_type");
    if (c.model_type == "llama") {
      c = llama_from_json(root, source);
      try {
        c.validate();
      } catch (const Error& e) {
        throw Error(e.code(), source + ": " + e.what(), e.argument());
      }
      return c;
    }
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

namespace {

// LlamaForCausalLM's config.json.
std::string llama_to_json(const ModelConfig& config) {
  using json::Value;
  Value root = Value::object();
  Value arch = Value::array();
  arch.push_back(Value::string("LlamaForCausalLM"));
  root.set("architectures", std::move(arch));
  root.set("attention_bias", Value::boolean(false));
  root.set("attention_dropout", Value::number(0.0));
  root.set("bos_token_id", Value::integer(config.bos_token_id));
  root.set("eos_token_id", Value::integer(config.eos_token_id));
  root.set("head_dim", Value::integer(config.head_size()));
  root.set("hidden_act", Value::string("silu"));
  root.set("hidden_size", Value::integer(config.n_embd));
  root.set("initializer_range", Value::number(0.02));
  root.set("intermediate_size", Value::integer(config.intermediate_size));
  root.set("max_position_embeddings", Value::integer(config.n_positions));
  root.set("mlp_bias", Value::boolean(false));
  root.set("model_type", Value::string("llama"));
  root.set("num_attention_heads", Value::integer(config.n_head));
  root.set("num_hidden_layers", Value::integer(config.n_layer));
  root.set("num_key_value_heads", Value::integer(config.kv_heads()));
  if (config.value_head) root.set("ppo_max_value_head", Value::boolean(true));
  root.set("rms_norm_eps", Value::number(config.rms_norm_eps));
  if (config.rope_scaling != 1.0) {
    Value scaling = Value::object();
    scaling.set("factor", Value::number(config.rope_scaling));
    scaling.set("rope_type", Value::string("linear"));
    scaling.set("type", Value::string("linear"));
    root.set("rope_scaling", std::move(scaling));
  } else {
    root.set("rope_scaling", Value::null());
  }
  root.set("rope_theta", Value::number(config.rope_theta));
  root.set("tie_word_embeddings", Value::boolean(config.tie_word_embeddings));
  root.set("torch_dtype", Value::string("float32"));
  root.set("use_cache", Value::boolean(true));
  root.set("vocab_size", Value::integer(config.vocab_size));
  return json::dump(root, 2) + "\n";
}

}  // namespace

std::string config_to_json(const ModelConfig& config) {
  config.validate();
  if (config.is_llama()) return llama_to_json(config);
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
