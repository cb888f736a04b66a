// The model's hyperparameters, as Hugging Face's GPT-2 config.json names them.
// config_from_json reads a config.json (GPT-2 family: model_type "gpt2"); config_to_json
// writes one that Hugging Face's GPT2LMHeadModel loads unchanged.
#pragma once

#include <cstdint>
#include <string>

namespace ppo::model {

struct ModelConfig {
  std::string model_type = "gpt2";
  int64_t vocab_size = 50257;   // V
  int64_t n_positions = 1024;   // the context length (learned position embeddings)
  int64_t n_embd = 768;         // C, the width
  int64_t n_layer = 12;         // L
  int64_t n_head = 12;          // H (C % H == 0; head size C / H)
  double layer_norm_epsilon = 1e-5;
  // A scalar value head (hidden state -> one number per position, no bias), stored as
  // "score.weight" [1, C] like Hugging Face's GPT2ForSequenceClassification.
  bool value_head = false;
  int64_t bos_token_id = 50256;
  int64_t eos_token_id = 50256;

  int64_t head_size() const { return n_embd / n_head; }
  // Throws ppo::Error(InvalidArgument) naming the field (e.g. "n_head") when a value is
  // out of range or fields disagree (n_embd not divisible by n_head).
  void validate() const;
};

// Parses a Hugging Face config.json. Unknown fields are ignored; missing GPT-2 fields
// take GPT-2's defaults (as transformers does); a field of the wrong type, an
// unsupported model_type or activation, or values that fail validate() throw
// ppo::Error(InvalidArgument) naming the field. `source` names the file in messages.
ModelConfig config_from_json(const std::string& text, const std::string& source = "config.json");

// A config.json for GPT2LMHeadModel (plus "ppo_max_value_head" when value_head is set).
std::string config_to_json(const ModelConfig& config);

}  // namespace ppo::model
