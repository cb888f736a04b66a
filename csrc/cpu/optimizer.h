// The optimizer kernels on the CPU: AdamW on a range of the flat parameter buffer,
// and the pieces of global gradient-norm clipping.
#pragma once

#include <cstdint>

namespace ppo::cpu {

// One AdamW step (Loshchilov & Hutter, decoupled weight decay, PyTorch's torch.optim.AdamW
// order) on n parameters, `step` >= 1 being this step's 1-based index for bias correction:
//   m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
//   p -= lr * weight_decay * p
//   p -= lr * (m / (1 - beta1^step)) / (sqrt(v / (1 - beta2^step)) + eps)
// Elementwise, in blocks of 64 elements from the start of `param`: the same bits whatever
// the thread count (and for two calls over ranges split at a multiple of 64). The per-call scalars
// (1 - lr * weight_decay, lr / (1 - beta1^step), 1 / sqrt(1 - beta2^step)) are computed in
// double; the elementwise math is float. eps == 0 is allowed (then m = v = 0 gives NaN,
// as in PyTorch). grad must not overlap param, m or v.
// Throws ppo::Error(InvalidArgument) naming the argument: n < 0; step < 1; lr negative or
// non-finite; beta1 or beta2 outside [0, 1); eps or weight_decay negative or non-finite;
// a null param, grad, m or v when n > 0.
void adamw_update(int64_t n, float* param, const float* grad, float* m, float* v, float lr,
                  float beta1, float beta2, float eps, float weight_decay, int64_t step);

// sum x[i]^2 accumulated in double over fixed chunks combined in chunk order: the same
// result whatever the thread count. (Chunks of 65536 elements; within a chunk, 16 lane
// accumulators.) Throws InvalidArgument naming "n" (< 0) or "x" (null when n > 0).
double sum_of_squares(int64_t n, const float* x);

// x[i] *= factor. Throws InvalidArgument naming "n" (< 0), "factor" (non-finite: it
// would turn every parameter gradient into NaN/inf) or "x" (null when n > 0).
void scale_in_place(int64_t n, float* x, float factor);

}  // namespace ppo::cpu
