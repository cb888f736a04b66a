// Causal self-attention on the CPU, forward and backward side by side in attention.cpp,
// plus the KV-cache path of generation. Grouped-query attention (GQA): H query heads and
// KVH key/value heads of hs columns each, H % KVH == 0; query head h reads kv head
// g = h / (H / KVH). KVH == H is GPT-2's multi-head attention (llm.c layout, hs = C / H),
// KVH == 1 multi-query attention.
//
// Layout: qkv [B, T, (H + 2 KVH) hs] row-major; row (b, t) is
// [q (H hs) | k (KVH hs) | v (KVH hs)]: query head h owns columns [h*hs, (h+1)*hs) of the
// q part, kv head g columns [g*hs, (g+1)*hs) of the k and v parts. out [B, T, H hs].
// Scores are scaled by 1/sqrt(hs). Query t attends to keys s <= t (causal).
//
// lengths [B] (nullptr: all T) marks each row valid on [0, lengths[b]): rows t >= length
// are padding. They are skipped: their out and att rows are written as 0 and their
// grad_qkv is left untouched. Causality means no valid row ever reads a padded one.
//
// Conventions (as layers.h): backward ACCUMULATES (+=) into grad_qkv; deterministic
// (work split over (b, h) - over (b, kv head) in the backward - each sum in a fixed
// order; results do not depend on the thread count); throws ppo::Error(InvalidArgument)
// naming the argument for bad sizes (negative; "heads", "kv_heads", "head_size" < 1 when
// there is work; heads % kv_heads != 0, named "kv_heads"), null pointers, lengths outside
// [0, T]. For KVH == H every result has the bits of the former multi-head kernels.
#pragma once

#include <cstdint>

namespace ppo::cpu {

// out[b, t, h*hs + i] = sum_{s <= t} att[b, h, t, s] * v[b, s, g*hs + i]  (g = h / (H/KVH))
// att [B, H, T, T]: the softmax probabilities, written for s <= t and 0 for s > t; may
// be nullptr when no backward follows (then no T x T buffer is used at all: the scratch
// is O(T * hs) per thread, the head's keys gathered and a few rows of scores).
void attention_forward(int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t hs,
                       const int32_t* lengths, const float* qkv, float* att, float* out);

// grad_qkv [B, T, (H + 2 KVH) hs] += d(sum grad_out * out) / d qkv, given the forward's
// qkv and att. The d_k and d_v rows of kv head g add the terms of the query heads of its
// group in ascending order (one thread per (b, g): no races, a fixed order).
void attention_backward(int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t hs,
                        const int32_t* lengths, const float* grad_out, const float* qkv,
                        const float* att, float* grad_qkv);

// ---- the KV cache -----------------------------------------------------------------------
// One layer's cache: k_cache, v_cache [B, cache_T, KVH hs] (row (b, s) holds position s
// of sequence b, all kv heads side by side).

// Copies k and v of rows t < lengths[b] (all T when nullptr) of qkv [B, T, (H + 2 KVH) hs]
// into positions [0, length) of the cache (prefill). cache_T >= T.
void kv_cache_store(int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t hs,
                    const int32_t* lengths, const float* qkv, int64_t cache_T, float* k_cache,
                    float* v_cache);

// One decoding step: for each sequence b with positions[b] >= 0, writes the k and v of
// qkv [B, (H + 2 KVH) hs] row b at position p = positions[b] of the cache, then
//   out[b, h*hs + i] = sum_{s <= p} softmax_s(q_h . k_{s,g} / sqrt(hs)) v_{s,g}[i]
// over the cache rows 0..p (out [B, H hs]). Rows with positions[b] < 0 (finished
// sequences) are skipped: out row written as 0, cache untouched. positions[b] < cache_T.
// Given the same k and v rows in the cache, out has the same bits as attention_forward's
// out at row p (the same kernels run in the same order).
void attention_decode(int64_t B, int64_t H, int64_t KVH, int64_t hs, const int32_t* positions,
                      const float* qkv, int64_t cache_T, float* k_cache, float* v_cache,
                      float* out);

// The instruction set the kernels above dispatch to on this machine: "avx512f",
// "avx2+fma" or "portable" (for benchmark and test reports). PPO_ATTENTION_ISA=avx2 or
// =portable, read once, caps the choice (to test and time the fallbacks on a newer CPU).
// Results are bit-identical across runs and thread counts for one choice; different
// choices may differ in the last bits (fused multiply-add or not).
const char* attention_isa();

}  // namespace ppo::cpu
