// Hugging Face-compatible checkpoints: a directory with config.json and
// model.safetensors (or model.safetensors.index.json naming shards), GPT-2 tensor names
// and layout, so a GPT-2 saved by transformers loads unchanged and ours loads there.
#pragma once

#include <string>
#include <vector>

#include "model/config.h"
#include "model/params.h"

namespace ppo::model {

struct LoadedCheckpoint {
  ModelConfig config;
  std::vector<float> params;  // [layout.total] in parameter_layout(config)'s order
};

// Reads dir/config.json and the weights (model.safetensors, or the shards listed by
// model.safetensors.index.json). Accepted: names with or without the "transformer."
// prefix; F32, F16, BF16 and F64 tensors (converted to float32); Conv1D weights in
// Hugging Face's [in, out] layout (transposed into ours); "lm_head.weight" if present
// must equal wte (tied) and is otherwise ignored; the attention-mask buffers of old
// checkpoints ("h.N.attn.bias" of shape [1, 1, P, P], "h.N.attn.masked_bias") are
// ignored. The value head ("score.weight", [1, C]) is loaded when present
// (config.value_head is then set). Errors are ppo::Error naming the file and tensor:
//   a missing directory or file                       -> NotFound (names the path)
//   an unreadable file (read error)                   -> IoError
//   a truncated file or a corrupt header/JSON         -> CorruptFile (names the file)
//   a missing tensor                                  -> InvalidArgument (names it)
//   a tensor of the wrong shape                       -> ShapeMismatch (names it, both shapes)
//   an unsupported dtype                              -> InvalidArgument (names it)
//   NaN or infinity in a tensor                       -> NonFinite (names it)
//   config fields that disagree with the tensors      -> ShapeMismatch (names the field)
LoadedCheckpoint load_checkpoint(const std::string& dir);

// Writes dir/config.json and dir/model.safetensors (creating dir if needed) with
// Hugging Face's names ("transformer." prefix, Conv1D weights transposed to [in, out],
// F32, the value head as "score.weight", metadata {"format": "pt"}). Each file is
// written to a temporary file in dir, flushed, then renamed over the old one, so an
// interrupted save never leaves a broken checkpoint. A failed write -> IoError.
void save_checkpoint(const std::string& dir, const ModelConfig& config, const float* params);

// ---- safetensors, usable on their own --------------------------------------------------
struct SafetensorsTensor {
  std::string name;
  std::string dtype;           // "F32", "F16", "BF16", "F64", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range within the data section
};

// Parses and validates the header of a .safetensors file (8-byte little-endian length,
// JSON, offsets that tile the data section within the file size). Throws as above.
std::vector<SafetensorsTensor> read_safetensors_header(const std::string& path);

// Reads the F32 tensor `name` of a .safetensors file, which must have exactly `shape`
// (other dtypes, shapes, a missing name, NaN -> errors as above).
std::vector<float> read_safetensors_f32(const std::string& path, const std::string& name,
                                        const std::vector<int64_t>& shape);

// Writes named float32 tensors atomically (temporary file + rename).
struct TensorToWrite {
  std::string name;
  std::vector<int64_t> shape;
  const float* data;
};
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors);

}  // namespace ppo::model
