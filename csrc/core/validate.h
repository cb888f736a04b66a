// Checks on host arrays shared by core/ops.cpp. Each throws ppo::Error naming the
// argument, with the first offending index spelled out so users can find it.
#pragma once

#include <cstdint>
#include <string>

namespace ppo::validate {

// size > 0 (and not absurd): "batch", "steps", "vocab", "count".
void positive_size(int64_t value, const char* name);
// A required input pointer is not null.
void present(const void* ptr, const char* name);
// Every value finite.
void finite(const float* values, int64_t count, const char* name);
// Every value finite where mask is 1 (mask may be nullptr: everywhere); masked-out
// entries may hold anything (padding never matters).
void finite_where_valid(const float* values, const float* mask, int64_t count, const char* name);
// Mask values are exactly 0 or 1.
void mask_values(const float* mask, int64_t count);
// Tokens in [0, vocab) where valid.
void tokens_in_range(const int32_t* tokens, const float* mask, int64_t count, int64_t vocab);
// Logits of each valid row: no NaN or +inf (-inf allowed), at least one finite value,
// and the taken token's logit finite (a token of probability zero has no log-prob).
// Checks rows [row_begin, row_end) of the full arrays (so messages give global indices).
void logits_rows(const float* logits, const int32_t* tokens, const float* mask, int64_t row_begin,
                 int64_t row_end, int64_t vocab);
// A finite scalar option within [lo, hi] (inclusive), or > lo when lo_open.
void scalar_in_range(double value, double lo, double hi, bool lo_open, const char* name);

}  // namespace ppo::validate
