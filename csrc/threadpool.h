// A small persistent thread pool: the caller is thread 0, n-1 workers wait for work.
// Workers spin briefly (decode calls come every few microseconds) and then sleep on a condition
// variable, so an idle pool costs nothing. Tasks are claimed with a compare-and-swap on one atomic
// word holding (generation | task count | next task), so a claim can never pair one generation's
// index with another's count or function; the caller waits for the tasks to be *done*, not for
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
  static constexpr int64_t kMaxTasks = (1 << 18) - 1;  // more: the caller runs them itself
  // Starts fn(task) for task in [0, ntasks) on the workers only and returns at once (false, running
  // nothing, if the pool is in use or has no workers). fn must return soon once *cancel() is true: the
  // next try_run / post_background sets it, finishes the unclaimed tasks (which then return at once)
  // and waits for the running ones. Used to pull the next weights into cache while Python runs.
  bool post_background(int64_t ntasks, std::function<void(int64_t)> fn);
  void stop_background();  // cancels the background job (if any) and waits for it
  bool cancelled() const { return bg_cancel_.load(std::memory_order_relaxed); }

 private:
  void worker_loop();
  void drain(uint32_t gen);
  void publish(int64_t ntasks, const std::function<void(int64_t)>* fn, uint32_t* gen);
  void finish_background();  // caller holds busy_

  int n_;
  int spin_us_;
  std::vector<std::thread> threads_;
  std::mutex busy_;                       // one parallel region at a time
  std::mutex mu_;
  std::condition_variable cv_;
  // generation (28 bits) << 36 | task count (18 bits) << 18 | index of the next task to claim (18 bits)
  std::atomic<uint64_t> work_{0};
  std::atomic<int64_t> done_{0};          // tasks finished in the current generation
  std::atomic<const std::function<void(int64_t)>*> fn_{nullptr};
  std::function<void(int64_t)> bg_fn_;    // the background job (guarded by busy_)
  bool bg_active_ = false;                // guarded by busy_
  uint32_t bg_gen_ = 0;
  int64_t bg_ntasks_ = 0;
  std::atomic<bool> bg_cancel_{false};
  int sleepers_ = 0;                      // guarded by mu_
  bool stop_ = false;                     // guarded by mu_
};

}  // namespace bitnet
