// A small persistent thread pool: the caller is thread 0, n-1 workers wait for work.
// Workers spin briefly (decode calls come every few microseconds) and then sleep on a condition
// variable, so an idle pool costs nothing. Tasks are claimed with a compare-and-swap on one atomic
// word holding (generation << 32 | next task); the caller waits for the tasks to be *done*, not for
// every worker to show up, so a worker the OS has descheduled (busy or oversubscribed machine) never
// holds up a call it took no part in.
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
  // Runs fn(task) for task in [0, ntasks) on all threads; returns when all are done. Returns false
  // (and runs nothing) if another caller is using the pool: that caller then runs its tasks itself.
  bool try_run(int64_t ntasks, const std::function<void(int64_t)>& fn);

 private:
  void worker_loop();
  void drain(uint32_t gen);

  int n_;
  int spin_us_;
  std::vector<std::thread> threads_;
  std::mutex busy_;                       // one parallel region at a time
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> work_{0};         // (generation << 32) | index of the next task to claim
  std::atomic<int64_t> done_{0};          // tasks finished in the current generation
  std::atomic<int64_t> ntasks_{0};
  std::atomic<const std::function<void(int64_t)>*> fn_{nullptr};
  int sleepers_ = 0;                      // guarded by mu_
  bool stop_ = false;                     // guarded by mu_
};

}  // namespace bitnet
