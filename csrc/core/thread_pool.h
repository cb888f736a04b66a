// A persistent pool of worker threads for the CPU backend. parallel_for splits
// [0, n) into contiguous chunks, one per thread, so the split (and thus any
// per-chunk partial result) depends only on n and the thread count. Kernels that
// reduce keep per-item partials and combine them in index order, so their results
// do not depend on the thread count at all.
#pragma once

#include <cstdint>
#include <functional>

namespace ppo {

// Number of threads the CPU backend uses (PPO_MAX_THREADS, else hardware threads).
int cpu_thread_count();

// Calls fn(begin, end) on disjoint chunks covering [0, n), in parallel, and waits.
// Runs inline when n is small or when called from inside a pool thread.
// An exception thrown by fn is rethrown in the caller; when several chunks throw,
// the lowest chunk's (the first offending item's) is the one rethrown.
void parallel_for(int64_t n, const std::function<void(int64_t begin, int64_t end)>& fn,
                  int64_t min_chunk = 1);

// The min_chunk for items of `cost_per_item` elementary operations each, so that a
// thread gets at least ~64k operations: below that, waking a thread costs more than it saves.
inline int64_t grain_for(int64_t cost_per_item) {
  constexpr int64_t kMinWorkPerThread = 65536;
  return cost_per_item >= kMinWorkPerThread ? 1 : kMinWorkPerThread / (cost_per_item > 0 ? cost_per_item : 1);
}

}  // namespace ppo
