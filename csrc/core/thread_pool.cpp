#include "core/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace ppo {

namespace {

thread_local bool t_inside_pool = false;

// How long a thread spins (checking an atomic) before it sleeps on a condition variable:
// waking a sleeping thread costs 50-70 us on some VMs, longer than many of the engine's
// parallel regions (a decode step's matmuls, a LayerNorm), while back-to-back regions
// follow each other within microseconds. Spinning this long costs at most this much CPU
// time per region when no new work comes.
constexpr auto kSpin = std::chrono::microseconds(100);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins until pred() holds or kSpin has passed; returns pred(). With more pool threads
// than hardware threads (PPO_MAX_THREADS above the core count) a busy spinner would keep
// a thread that has work from running, so there it yields the core between checks.
template <typename Pred>
bool spin_until(Pred pred, bool yield) {
  const auto deadline = std::chrono::steady_clock::now() + kSpin;
  for (int i = 1;; ++i) {
    if (pred()) return true;
    if (yield) {
      std::this_thread::yield();
    } else {
      cpu_relax();
    }
    if ((i & 15) == 0 && std::chrono::steady_clock::now() >= deadline) return pred();
  }
}

// Each job is published as one atomic word, (sequence number << 16) | chunks, so a worker
// reads the job's chunk count consistently with its sequence number; the job function
// itself cannot change until every participating worker has finished. The calling thread
// runs chunk 0 itself. Workers and the caller spin briefly (kSpin) before sleeping on the
// condition variables, which they then wait on under the mutex: no wake-up is lost.
class ThreadPool {
 public:
  explicit ThreadPool(int threads)
      : thread_count_(std::max(1, threads)),
        oversubscribed_(static_cast<unsigned>(thread_count_) > std::max(1u, std::thread::hardware_concurrency())) {
    for (int i = 1; i < thread_count_; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_.store(true);
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int thread_count() const { return thread_count_; }

  // Runs job(i) for i in [0, chunks), chunks <= thread_count(); waits for all.
  void run(int chunks, const std::function<void(int)>& job) {
    std::lock_guard<std::mutex> serial(run_mutex_);  // one parallel region at a time
    job_ = &job;
    error_ = nullptr;
    error_chunk_ = 0;
    pending_.store(chunks - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      sequence_ += 1;
      state_.store((sequence_ << 16) | static_cast<uint64_t>(chunks), std::memory_order_release);
    }
    wake_.notify_all();
    run_chunk(0);
    auto all_done = [this] { return pending_.load(std::memory_order_acquire) == 0; };
    if (!spin_until(all_done, oversubscribed_)) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, all_done);
    }
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void run_chunk(int index) {
    t_inside_pool = true;
    try {
      (*job_)(index);
    } catch (...) {
      // Keep the error of the lowest chunk, i.e. of the first offending item: which
      // error a caller sees must not depend on thread timing.
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_ || index < error_chunk_) {
        error_ = std::current_exception();
        error_chunk_ = index;
      }
    }
    t_inside_pool = false;
  }

  void worker_loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t state = 0;
      auto new_job = [&] {
        state = state_.load(std::memory_order_acquire);
        return state != seen || stopping_.load(std::memory_order_relaxed);
      };
      if (!spin_until(new_job, oversubscribed_)) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, new_job);
      }
      if (stopping_.load()) return;
      seen = state;
      if (index >= static_cast<int>(state & 0xffff)) continue;  // not needed for this job
      run_chunk(index);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mutex_);  // the caller may be about to wait
        done_.notify_one();
      }
    }
  }

  int thread_count_;
  bool oversubscribed_;  // more pool threads than hardware threads: spinners yield
  std::vector<std::thread> workers_;
  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t sequence_ = 0;               // guarded by mutex_
  std::atomic<uint64_t> state_{0};      // (sequence << 16) | chunks of the current job
  std::atomic<int> pending_{0};         // chunks of the current job still running
  std::atomic<bool> stopping_{false};
  std::exception_ptr error_;
  int error_chunk_ = 0;
};

int configured_threads() {
  if (const char* env = std::getenv("PPO_MAX_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return std::min(n, 256);
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

ThreadPool& pool() {
  // Leaked on purpose: joining threads from a static destructor at process exit
  // can deadlock when the process exits from inside a worker.
  static ThreadPool* instance = new ThreadPool(configured_threads());
  return *instance;
}

}  // namespace

int cpu_thread_count() { return pool().thread_count(); }

void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t min_chunk) {
  if (n <= 0) return;
  min_chunk = std::max<int64_t>(1, min_chunk);
  int64_t max_chunks = std::max<int64_t>(1, n / min_chunk);
  int chunks = static_cast<int>(std::min<int64_t>(cpu_thread_count(), max_chunks));
  if (chunks <= 1 || t_inside_pool) {
    fn(0, n);
    return;
  }
  pool().run(chunks, [&](int i) {
    int64_t begin = n * i / chunks, end = n * (i + 1) / chunks;
    if (begin < end) fn(begin, end);
  });
}

}  // namespace ppo
