// The CPU table of the transformer engine's ops (core/engine_ops.h): host memory and the
// kernels of cpu/layers.h, attention.h, matmul.h, optimizer.h and logprobs, plus the
// small row ops of the heads, which are written here. Everything runs synchronously.
#include <cstring>
#include <string>
#include <vector>

#include "core/engine_ops.h"
#include "core/error.h"
#include "cpu/attention.h"
#include "cpu/kernels.h"
#include "cpu/layers.h"
#include "cpu/llama_layers.h"
#include "cpu/matmul.h"
#include "cpu/optimizer.h"
#include "model/sampling.h"

namespace ppo {
namespace {

void host_zero(void* p, size_t bytes) {
  if (bytes > 0) std::memset(p, 0, bytes);
}
void host_synchronize() {}

// The CPU keeps the attention probabilities [B, H, T, T] for backward.
int64_t attention_saved_floats(int64_t B, int64_t T, int64_t H) { return B * H * T * T; }

void attention_backward(int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t hs,
                        const int32_t* lengths, const float* grad_out, const float* qkv,
                        const float* /*out*/, const float* saved, float* grad_qkv) {
  cpu::attention_backward(B, T, H, KVH, hs, lengths, grad_out, qkv, saved, grad_qkv);
}

void gather_rows(int64_t rows, int64_t channels, const int64_t* index, const float* src, float* dst) {
  for (int64_t i = 0; i < rows; ++i)
    std::memcpy(dst + i * channels, src + index[i] * channels, sizeof(float) * channels);
}

void scatter_add_rows(int64_t rows, int64_t channels, const int64_t* index, const float* src,
                      float* dst) {
  for (int64_t i = 0; i < rows; ++i) cpu::accumulate(channels, src + i * channels, dst + index[i] * channels);
}

void zero_padded_rows(int64_t rows, int64_t width, const int32_t* positions, float* data) {
  for (int64_t r = 0; r < rows; ++r)
    if (positions[r] < 0) std::memset(data + r * width, 0, sizeof(float) * width);
}

void value_head_forward(int64_t rows, int64_t channels, const float* x, const float* w,
                        const int32_t* positions, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    if (positions[r] < 0) {
      out[r] = 0.0f;
      continue;
    }
    double s = 0.0;
    for (int64_t j = 0; j < channels; ++j) s += static_cast<double>(x[r * channels + j]) * w[j];
    out[r] = static_cast<float>(s);
  }
}

void value_head_backward(int64_t rows, int64_t channels, const float* grad, const float* x,
                         const float* w, float* grad_x, float* grad_w) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < channels; ++j) grad_x[r * channels + j] += grad[r] * w[j];
  // grad_w [1, C] += grad [1, rows] x [rows, C]
  cpu::matmul(false, false, 1, channels, rows, 1.0f, grad, rows, x, channels, 1.0f, grad_w, channels);
}

// model::sample_token_with_draw row by row; errors of the row become its status.
void sample_tokens(const SampleTokensArgs& a) {
  require(a.rows >= 0, ErrorCode::InvalidArgument, "rows must be >= 0", "rows");
  if (a.rows == 0) return;
  model::SamplingParams sp;
  sp.greedy = a.greedy;
  sp.temperature = a.temperature;
  sp.top_k = a.top_k;
  sp.top_p = a.top_p;
  sp.repetition_penalty = a.repetition_penalty;
  // sample_token's 2 * vocab floats of scratch, kept per thread: this runs once per
  // generated token, and generate() used to allocate it once per call.
  thread_local std::vector<float> work;
  if (work.size() < static_cast<size_t>(2 * a.vocab)) work.resize(static_cast<size_t>(2 * a.vocab));
  for (int64_t r = 0; r < a.rows; ++r) {
    if (a.active != nullptr && a.active[r] == 0) continue;
    const float* raw = a.logits + r * a.vocab;
    float* row = a.scratch + r * a.vocab;
    std::memcpy(row, raw, sizeof(float) * a.vocab);
    int32_t token = 0;
    try {
      token = model::sample_token_with_draw(row, a.vocab, sp, a.penalized + r * a.penalized_stride,
                                            a.penalized_count[r], a.greedy ? 0.0 : a.uniforms[r],
                                            work.data());
    } catch (const Error& e) {
      if (e.code() != ErrorCode::NonFinite) throw;
      a.status[r] = e.argument() == "repetition_penalty" ? 2 : 1;
      continue;
    }
    // Its log-prob under the model's own distribution: the raw row at temperature 1.
    LogprobsArgs lp;
    lp.batch = 1;
    lp.steps = 1;
    lp.vocab = a.vocab;
    lp.logits = raw;
    lp.tokens = &token;
    lp.logprobs = a.logprobs + r;
    cpu::logprobs_forward(lp);
    a.tokens[r] = token;
    a.status[r] = 0;
  }
}

}  // namespace

const EngineOps& cpu_engine_ops() {
  static const EngineOps table = [] {
    EngineOps t{};
    t.device = Device::Cpu;
    t.alloc = cpu::host_alloc;
    t.free = cpu::host_free;
    t.copy_to_device = cpu::host_copy;
    t.copy_to_host = cpu::host_copy;
    t.copy_within = cpu::host_copy;
    t.zero = host_zero;
    t.synchronize = host_synchronize;
    t.matmul = cpu::matmul;
    t.add_bias = cpu::add_bias;
    t.bias_backward = cpu::bias_backward;
    t.layernorm_forward = cpu::layernorm_forward;
    t.layernorm_backward = cpu::layernorm_backward;
    t.gelu_forward = cpu::gelu_forward;
    t.gelu_backward = cpu::gelu_backward;
    t.add = cpu::add;
    t.accumulate = cpu::accumulate;
    t.embedding_forward = cpu::embedding_forward;
    t.embedding_backward = cpu::embedding_backward;
    t.rmsnorm_forward = cpu::rmsnorm_forward;
    t.rmsnorm_backward = cpu::rmsnorm_backward;
    t.rope_forward = cpu::rope_forward;
    t.rope_backward = cpu::rope_backward;
    t.swiglu_forward = cpu::swiglu_forward;
    t.swiglu_backward = cpu::swiglu_backward;
    t.attention_saved_floats = attention_saved_floats;
    t.attention_forward = cpu::attention_forward;
    t.attention_backward = attention_backward;
    t.kv_cache_store = cpu::kv_cache_store;
    t.attention_decode = cpu::attention_decode;
    t.gather_rows = gather_rows;
    t.scatter_add_rows = scatter_add_rows;
    t.zero_padded_rows = zero_padded_rows;
    t.value_head_forward = value_head_forward;
    t.value_head_backward = value_head_backward;
    t.logprobs_forward = cpu::logprobs_forward;
    t.logprobs_backward = cpu::logprobs_backward;
    t.sample_tokens = sample_tokens;
    t.adamw_update = cpu::adamw_update;
    t.sum_of_squares = cpu::sum_of_squares;
    t.scale_in_place = cpu::scale_in_place;
    return t;
  }();
  return table;
}

}  // namespace ppo
