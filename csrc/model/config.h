// The model's hyperparameters. Two architectures share them (model_type):
//   "gpt2":  GPT-2 (LayerNorm with biases, learned positions, GELU MLP, tied LM head);
//   "llama": the Llama family (RMSNorm, rotary positions, SwiGLU MLP, grouped-query
//            attention, no biases, tied or untied LM head): Llama, TinyLlama, SmolLM and
//            other checkpoints of Hugging Face's LlamaForCausalLM.
// Field names follow GPT-2's config.json; Llama's are mapped onto them (hidden_size ->
// n_embd, num_hidden_layers -> n_layer, num_attention_heads -> n_head,
// max_position_embeddings -> n_positions) plus the Llama-only fields below.
// config_from_json reads a config.json of either family; config_to_json writes one that
// Hugging Face's GPT2LMHeadModel or LlamaForCausalLM loads unchanged.
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

  // ---- Llama only (ignored for GPT-2) ----
  int64_t n_kv_head = 0;          // num_key_value_heads (0: n_head); n_head % n_kv_head == 0
  int64_t intermediate_size = 0;  // the SwiGLU MLP's width
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  double rope_scaling = 1.0;      // rope_scaling {"rope_type": "linear", "factor"}; 1: none
  bool tie_word_embeddings = false;  // the LM head is embed_tokens (else lm_head.weight)

  bool is_llama() const { return model_type == "llama"; }
  int64_t head_size() const { return n_embd / n_head; }
  int64_t kv_heads() const { return is_llama() && n_kv_head > 0 ? n_kv_head : n_head; }
  // The MLP's width: 4C for GPT-2, intermediate_size for Llama.
  int64_t mlp_width() const { return is_llama() ? intermediate_size : 4 * n_embd; }
  // An LM head of its own (Llama with tie_word_embeddings false).
  bool untied_head() const { return is_llama() && !tie_word_embeddings; }
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
