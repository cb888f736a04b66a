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
  // Hugging Face's name without the "transformer." prefix: "wte.weight", "wpe.weight",
  // "h.{l}.ln_1.weight", "h.{l}.ln_1.bias", "h.{l}.attn.c_attn.weight", ..., "ln_f.bias",
  // and "score.weight" for the value head (stored at the top level, no prefix).
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

// Offsets of one block's tensors (indices into the flat buffer, in floats).
struct BlockOffsets {
  int64_t ln_1_weight, ln_1_bias;
  int64_t attn_weight, attn_bias;        // c_attn: [3C, C], [3C]  (q | k | v)
  int64_t attn_proj_weight, attn_proj_bias;  // attn.c_proj: [C, C], [C]
  int64_t ln_2_weight, ln_2_bias;
  int64_t fc_weight, fc_bias;            // mlp.c_fc: [4C, C], [4C]
  int64_t fc_proj_weight, fc_proj_bias;  // mlp.c_proj: [C, 4C], [C]
};

struct ParameterLayout {
  std::vector<ParamTensor> tensors;  // in buffer order
  int64_t total = 0;                 // floats in the flat buffer
  int64_t wte = 0, wpe = 0;          // [V, C], [n_positions, C]
  std::vector<BlockOffsets> blocks;  // [n_layer]
  int64_t ln_f_weight = 0, ln_f_bias = 0;
  int64_t value_head = -1;           // [1, C] ("score.weight"), or -1 without a value head

  // The tensor called `name` (our name, no prefix), or nullptr.
  const ParamTensor* find(const std::string& name) const;
};

// The layout for `config` (which must be valid). The order is: wte, wpe, then each
// block's tensors, then ln_f, then the value head.
ParameterLayout parameter_layout(const ModelConfig& config);

}  // namespace ppo::model
