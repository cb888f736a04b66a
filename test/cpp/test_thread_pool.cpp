// The CPU thread pool (core/thread_pool.h): every item of every parallel region runs
// exactly once, in chunks that depend only on n and the thread count, across thousands of
// back-to-back regions (workers spinning) and regions after idle gaps (workers asleep);
// the lowest chunk's error is the one rethrown; nested regions run inline.
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/thread_pool.h"
#include "test_framework.h"

TEST(every_item_runs_exactly_once_in_back_to_back_and_idle_regions) {
  std::vector<int64_t> hits(64, 0);
  int64_t regions = 0;
  for (int rep = 0; rep < 20000; ++rep) {
    const int64_t n = 1 + rep % 64;
    ppo::parallel_for(n, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) hits[i] += 1;  // disjoint chunks: no race
    });
    ++regions;
    // Now and then an idle gap longer than the workers' spin, so they go to sleep and
    // the next region must wake them.
    if (rep % 2000 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  // Item i is in every region with n > i: 20000 regions cycle n through 1..64.
  for (int64_t i = 0; i < 64; ++i) {
    int64_t want = 0;
    for (int rep = 0; rep < 20000; ++rep) want += (1 + rep % 64) > i;
    CHECK(hits[i] == want);
  }
  CHECK(regions == 20000);
}

TEST(chunks_are_contiguous_and_cover_the_range) {
  const int threads = ppo::cpu_thread_count();
  for (int64_t n : {2, 3, 7, 64, 1000}) {
    std::vector<std::atomic<int>> owner(static_cast<size_t>(n));
    for (auto& o : owner) o = -1;
    std::atomic<int> calls{0};
    ppo::parallel_for(n, [&](int64_t begin, int64_t end) {
      const int id = calls.fetch_add(1);
      for (int64_t i = begin; i < end; ++i) owner[i] = id;
    });
    CHECK(calls.load() == std::min<int64_t>(threads, n));
    for (int64_t i = 0; i < n; ++i) CHECK(owner[i] >= 0);
  }
}

TEST(the_lowest_chunks_error_is_rethrown_whatever_the_timing) {
  for (int rep = 0; rep < 500; ++rep) {
    std::string what;
    try {
      ppo::parallel_for(64, [&](int64_t begin, int64_t) {
        // Later chunks fail first, so a timing-dependent choice would show.
        std::this_thread::sleep_for(std::chrono::microseconds(begin == 0 ? 50 : 0));
        throw std::runtime_error(std::to_string(begin));
      });
    } catch (const std::runtime_error& e) {
      what = e.what();
    }
    CHECK(what == "0");
  }
  // The pool still works after errors.
  std::atomic<int64_t> sum{0};
  ppo::parallel_for(100, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) sum += i;
  });
  CHECK(sum.load() == 4950);
}

TEST(nested_regions_run_inline) {
  std::atomic<int64_t> inner_calls{0}, sum{0};
  ppo::parallel_for(8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      ppo::parallel_for(10, [&](int64_t ib, int64_t ie) {
        inner_calls += 1;
        for (int64_t j = ib; j < ie; ++j) sum += j;
      });
  });
  CHECK(inner_calls.load() == 8);  // one inline call per outer item
  CHECK(sum.load() == 8 * 45);
}

PPO_TEST_MAIN()
