// A small persistent thread pool: the caller is thread 0, n-1 workers wait for work.
// Workers spin briefly (decode calls come every few microseconds) and then sleep on a condition
// variable, so an idle pool costs nothing. Tasks are handed out with an atomic counter.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace bitnet {

class ThreadPool {
 public:
  explicit ThreadPool(int nthreads, int spin_us);
  ~ThreadPool();
  int size() const { return n_; }
  // Runs fn(task) for task in [0, ntasks) on all threads; returns when all are done.
  // Not reentrant: a caller that finds the pool busy must run its tasks itself (see try_run).
  bool try_run(int64_t ntasks, const std::function<void(int64_t)>& fn);

 private:
  void worker_loop();
  void drain();

  int n_;
  int spin_us_;
  std::vector<std::thread> threads_;
  std::mutex busy_;                 // one parallel region at a time
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int64_t> next_{0};
  std::atomic<int> pending_{0};     // workers that have not finished the current generation
  int64_t ntasks_ = 0;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int sleepers_ = 0;                // guarded by mu_
  bool stop_ = false;               // guarded by mu_
};

}  // namespace bitnet
