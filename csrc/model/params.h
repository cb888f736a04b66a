// The parameter layout: every tensor of the model in ONE flat float32 buffer, located by
// an offset table (llm.c style). Gradients and the AdamW moments use the same layout,
// so an optimizer or a norm is one loop over the buffer (or over each tensor's range).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"

namespace ppo::model {

// How a tensor is treated by weight decay and initialization.
enum class ParamKind {
  Embedding,  // wte, wpe: no weight decay unless asked
  Matrix,     // the dense layers' weights: weight decay applies
  Bias,       // no weight decay unless asked
  Norm,       // LayerNorm weight and bias: no weight decay unless asked
  Head,       // the value head's weight: treated like a Matrix
};

struct ParamTensor {
  // GPT-2: Hugging Face's name without the "transformer." prefix: "wte.weight",
  // "wpe.weight", "h.{l}.ln_1.weight", "h.{l}.ln_1.bias", "h.{l}.attn.c_attn.weight", ...,
  // "ln_f.bias". Llama: Hugging Face's full name ("model.embed_tokens.weight",
  // "model.layers.{l}.self_attn.q_proj.weight", ..., "model.norm.weight", "lm_head.weight").
  // Both: "score.weight" for the value head (stored at the top level).
  std::string name;
  // The shape as stored in OUR buffer. Dense weights are [out, in] (the nn.Linear
  // convention: y = x W^T + b). Hugging Face's GPT-2 stores them through Conv1D as
  // [in, out]: `hf_transposed` says the checkpoint code must transpose them.
  std::vector<int64_t> shape;
  bool hf_transposed = false;
  int64_t offset = 0;  // in floats, from the start of the flat buffer
  int64_t numel = 0;
  ParamKind kind = ParamKind::Matrix;
  int64_t layer = -1;  // the block index, or -1 for tensors outside the blocks
};

// Offsets of one block's tensors (indices into the flat buffer, in floats); -1 for a
// tensor the architecture does not have (Llama has no biases).
//   GPT-2: ln_1 (weight, bias), c_attn [3C, C] + [3C] (q | k | v), attn.c_proj [C, C] + [C],
//          ln_2, mlp.c_fc [4C, C] + [4C], mlp.c_proj [C, 4C] + [C].
//   Llama: input_layernorm [C]; q_proj [H hs, C], k_proj [KVH hs, C], v_proj [KVH hs, C]
//          stored one after the other, so attn_weight is one fused [(H + 2 KVH) hs, C]
//          matrix; o_proj [C, H hs]; post_attention_layernorm [C]; gate_proj [I, C] then
//          up_proj [I, C] (fc_weight: one fused [2I, C], gate | up); down_proj [C, I].
struct BlockOffsets {
  int64_t ln_1_weight, ln_1_bias;
  int64_t attn_weight, attn_bias;
  int64_t attn_proj_weight, attn_proj_bias;
  int64_t ln_2_weight, ln_2_bias;
  int64_t fc_weight, fc_bias;
  int64_t fc_proj_weight, fc_proj_bias;
};

struct ParameterLayout {
  std::vector<ParamTensor> tensors;  // in buffer order
  int64_t total = 0;                 // floats in the flat buffer
  int64_t wte = 0, wpe = 0;          // [V, C], [n_positions, C] (Llama: no wpe, -1)
  std::vector<BlockOffsets> blocks;  // [n_layer]
  int64_t ln_f_weight = 0, ln_f_bias = 0;  // Llama: model.norm.weight, no bias (-1)
  int64_t lm_head = -1;              // [V, C] "lm_head.weight" of an untied head, or -1 (tied to wte)
  int64_t value_head = -1;           // [1, C] ("score.weight"), or -1 without a value head

  // The tensor called `name` (our name, no prefix), or nullptr.
  const ParamTensor* find(const std::string& name) const;
};

// The layout for `config` (which must be valid). The order is: wte, wpe, then each
// block's tensors, then ln_f, then the value head.
ParameterLayout parameter_layout(const ModelConfig& config);

}  // namespace ppo::model
