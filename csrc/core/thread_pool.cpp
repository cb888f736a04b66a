#include "core/thread_pool.h"

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace ppo {

namespace {

thread_local bool t_inside_pool = false;

// Workers sleep on a condition variable; each job is a generation number plus a
// function over chunk indices. The calling thread runs chunk 0 itself.
class ThreadPool {
 public:
  explicit ThreadPool(int threads) : thread_count_(std::max(1, threads)) {
    for (int i = 1; i < thread_count_; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int thread_count() const { return thread_count_; }

  // Runs job(i) for i in [0, chunks), chunks <= thread_count(); waits for all.
  void run(int chunks, const std::function<void(int)>& job) {
    std::lock_guard<std::mutex> serial(run_mutex_);  // one parallel region at a time
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      chunks_ = chunks;
      pending_ = chunks - 1;
      error_ = nullptr;
      error_chunk_ = 0;
      ++generation_;
    }
    wake_.notify_all();
    run_chunk(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
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
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
        if (index >= chunks_) continue;
      }
      run_chunk(index);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (--pending_ == 0) done_.notify_one();
      }
    }
  }

  int thread_count_;
  std::vector<std::thread> workers_;
  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* job_ = nullptr;
  int chunks_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  bool stopping_ = false;
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
