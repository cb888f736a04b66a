// Causal multi-head self-attention on the CPU (GPT-2 / llm.c layout), forward and
// backward side by side in attention.cpp, plus the KV-cache path of generation.
//
// Layout: qkv [B, T, 3C] row-major; row (b, t) is [q (C) | k (C) | v (C)] and head h
// owns columns [h*hs, (h+1)*hs) of each third, hs = C / H. Scores are scaled by
// 1/sqrt(hs). Query t attends to keys s <= t (causal).
//
// lengths [B] (nullptr: all T) marks each row valid on [0, lengths[b]): rows t >= length
// are padding. They are skipped: their out and att rows are written as 0 and their
// grad_qkv is left untouched. Causality means no valid row ever reads a padded one.
//
// Conventions (as layers.h): backward ACCUMULATES (+=) into grad_qkv; deterministic
// (work split over (b, h) only, each sum in a fixed order); throws
// ppo::Error(InvalidArgument) naming the argument for bad sizes (C % H != 0, negative),
// null pointers, lengths outside [0, T].
#pragma once

#include <cstdint>

namespace ppo::cpu {

// out [B, T, C]: out[b, t, h*hs + i] = sum_{s <= t} att[b, h, t, s] * v[b, s, h*hs + i]
// att [B, H, T, T]: the softmax probabilities, written for s <= t and 0 for s > t; may
// be nullptr when no backward follows (then no T x T buffer is used at all: the scratch
// is O(T * hs) per thread, the head's keys gathered and a few rows of scores).
void attention_forward(int64_t B, int64_t T, int64_t C, int64_t H, const int32_t* lengths,
                       const float* qkv, float* att, float* out);

// grad_qkv [B, T, 3C] += d(sum grad_out * out) / d qkv, given the forward's qkv and att.
void attention_backward(int64_t B, int64_t T, int64_t C, int64_t H, const int32_t* lengths,
                        const float* grad_out, const float* qkv, const float* att,
                        float* grad_qkv);

// ---- the KV cache -----------------------------------------------------------------------
// One layer's cache: k_cache, v_cache [B, cache_T, C] (row (b, s) holds position s of
// sequence b, all heads side by side).

// Copies k and v of rows t < lengths[b] (all T when nullptr) of qkv [B, T, 3C] into
// positions [0, length) of the cache (prefill). cache_T >= T.
void kv_cache_store(int64_t B, int64_t T, int64_t C, const int32_t* lengths, const float* qkv,
                    int64_t cache_T, float* k_cache, float* v_cache);

// One decoding step: for each sequence b with positions[b] >= 0, writes the k and v of
// qkv [B, 3C] row b at position p = positions[b] of the cache, then
//   out[b, h*hs + i] = sum_{s <= p} softmax_s(q . k_s / sqrt(hs)) v_s[h*hs + i]
// over the cache rows 0..p. Rows with positions[b] < 0 (finished sequences) are skipped:
// out row written as 0, cache untouched. positions[b] < cache_T. Given the same k and v
// rows in the cache, out has the same bits as attention_forward's out at row p (the same
// kernels run in the same order).
void attention_decode(int64_t B, int64_t C, int64_t H, const int32_t* positions,
                      const float* qkv, int64_t cache_T, float* k_cache, float* v_cache,
                      float* out);

// The instruction set the kernels above dispatch to on this machine: "avx512f",
// "avx2+fma" or "portable" (for benchmark and test reports). PPO_ATTENTION_ISA=avx2 or
// =portable, read once, caps the choice (to test and time the fallbacks on a newer CPU).
// Results are bit-identical across runs and thread counts for one choice; different
// choices may differ in the last bits (fused multiply-add or not).
const char* attention_isa();

}  // namespace ppo::cpu
