// The flat parameter layout of the engine, GPT-2 or Llama (see params.h).
#include "model/params.h"

namespace ppo::model {

const ParamTensor* ParameterLayout::find(const std::string& name) const {
  for (const ParamTensor& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

ParameterLayout parameter_layout(const ModelConfig& config) {
  config.validate();
  const int64_t V = config.vocab_size, P = config.n_positions, C = config.n_embd;
  ParameterLayout layout;
  // Appends a tensor at the end of the buffer and returns its offset.
  auto add = [&](std::string name, std::vector<int64_t> shape, ParamKind kind, int64_t layer,
                 bool hf_transposed = false) {
    ParamTensor t;
    t.name = std::move(name);
    t.numel = 1;
    for (int64_t d : shape) t.numel *= d;
    t.shape = std::move(shape);
    t.hf_transposed = hf_transposed;
    t.offset = layout.total;
    t.kind = kind;
    t.layer = layer;
    layout.total += t.numel;
    layout.tensors.push_back(std::move(t));
    return layout.tensors.back().offset;
  };
  if (config.is_llama()) {
    const int64_t H = config.n_head, KVH = config.kv_heads(), hs = config.head_size(), I = config.intermediate_size;
    layout.wte = add("model.embed_tokens.weight", {V, C}, ParamKind::Embedding, -1);
    layout.wpe = -1;
    for (int64_t l = 0; l < config.n_layer; ++l) {
      const std::string h = "model.layers." + std::to_string(l) + ".";
      BlockOffsets b{};
      b.ln_1_weight = add(h + "input_layernorm.weight", {C}, ParamKind::Norm, l);
      b.attn_weight = add(h + "self_attn.q_proj.weight", {H * hs, C}, ParamKind::Matrix, l);
      add(h + "self_attn.k_proj.weight", {KVH * hs, C}, ParamKind::Matrix, l);
      add(h + "self_attn.v_proj.weight", {KVH * hs, C}, ParamKind::Matrix, l);
      b.attn_proj_weight = add(h + "self_attn.o_proj.weight", {C, H * hs}, ParamKind::Matrix, l);
      b.ln_2_weight = add(h + "post_attention_layernorm.weight", {C}, ParamKind::Norm, l);
      b.fc_weight = add(h + "mlp.gate_proj.weight", {I, C}, ParamKind::Matrix, l);
      add(h + "mlp.up_proj.weight", {I, C}, ParamKind::Matrix, l);
      b.fc_proj_weight = add(h + "mlp.down_proj.weight", {C, I}, ParamKind::Matrix, l);
      b.ln_1_bias = b.attn_bias = b.attn_proj_bias = b.ln_2_bias = b.fc_bias = b.fc_proj_bias = -1;
      layout.blocks.push_back(b);
    }
    layout.ln_f_weight = add("model.norm.weight", {C}, ParamKind::Norm, -1);
    layout.ln_f_bias = -1;
    if (config.untied_head()) layout.lm_head = add("lm_head.weight", {V, C}, ParamKind::Matrix, -1);
    if (config.value_head) layout.value_head = add("score.weight", {1, C}, ParamKind::Head, -1);
    return layout;
  }
  layout.wte = add("wte.weight", {V, C}, ParamKind::Embedding, -1);
  layout.wpe = add("wpe.weight", {P, C}, ParamKind::Embedding, -1);
  for (int64_t l = 0; l < config.n_layer; ++l) {
    const std::string h = "h." + std::to_string(l) + ".";
    BlockOffsets b;
    b.ln_1_weight = add(h + "ln_1.weight", {C}, ParamKind::Norm, l);
    b.ln_1_bias = add(h + "ln_1.bias", {C}, ParamKind::Norm, l);
    b.attn_weight = add(h + "attn.c_attn.weight", {3 * C, C}, ParamKind::Matrix, l, true);
    b.attn_bias = add(h + "attn.c_attn.bias", {3 * C}, ParamKind::Bias, l);
    b.attn_proj_weight = add(h + "attn.c_proj.weight", {C, C}, ParamKind::Matrix, l, true);
    b.attn_proj_bias = add(h + "attn.c_proj.bias", {C}, ParamKind::Bias, l);
    b.ln_2_weight = add(h + "ln_2.weight", {C}, ParamKind::Norm, l);
    b.ln_2_bias = add(h + "ln_2.bias", {C}, ParamKind::Norm, l);
    b.fc_weight = add(h + "mlp.c_fc.weight", {4 * C, C}, ParamKind::Matrix, l, true);
    b.fc_bias = add(h + "mlp.c_fc.bias", {4 * C}, ParamKind::Bias, l);
    b.fc_proj_weight = add(h + "mlp.c_proj.weight", {C, 4 * C}, ParamKind::Matrix, l, true);
    b.fc_proj_bias = add(h + "mlp.c_proj.bias", {C}, ParamKind::Bias, l);
    layout.blocks.push_back(b);
  }
  layout.ln_f_weight = add("ln_f.weight", {C}, ParamKind::Norm, -1);
  layout.ln_f_bias = add("ln_f.bias", {C}, ParamKind::Norm, -1);
  if (config.value_head) layout.value_head = add("score.weight", {1, C}, ParamKind::Head, -1);
  return layout;
}

}  // namespace ppo::model
