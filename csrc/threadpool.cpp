#include "threadpool.h"

#include <chrono>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#define BITNET_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define BITNET_PAUSE() __asm__ __volatile__("yield")
#else
#define BITNET_PAUSE() ((void)0)
#endif

namespace bitnet {

ThreadPool::ThreadPool(int nthreads, int spin_us) : n_(nthreads < 1 ? 1 : nthreads), spin_us_(spin_us) {
  threads_.reserve(n_ - 1);
  for (int i = 1; i < n_; ++i) threads_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  bg_cancel_.store(true);  // a background job's tasks return at once
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

namespace {
constexpr uint64_t kField = (1u << 18) - 1;
inline uint32_t gen_of(uint64_t w) { return (uint32_t)(w >> 36); }
inline int64_t count_of(uint64_t w) { return (int64_t)((w >> 18) & kField); }
inline int64_t next_of(uint64_t w) { return (int64_t)(w & kField); }
}  // namespace

// Claims and runs tasks of generation `gen` until none is left (or a newer generation started).
void ThreadPool::drain(uint32_t gen) {
  uint64_t cur = work_.load(std::memory_order_acquire);
  for (;;) {
    if (gen_of(cur) != gen) return;
    const int64_t idx = next_of(cur);
    if (idx >= count_of(cur)) return;
    if (!work_.compare_exchange_weak(cur, cur + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
    // The caller cannot return (and change fn_) before this claimed task is counted as done.
    (*fn_.load(std::memory_order_acquire))(idx);
    done_.fetch_add(1, std::memory_order_acq_rel);
    cur = work_.load(std::memory_order_acquire);
  }
}

void ThreadPool::worker_loop() {
  uint32_t seen = 0;  // generation 0: the state at construction
  auto gen_now = [this] { return gen_of(work_.load(std::memory_order_acquire)); };
  for (;;) {
    // Spin a little: during decoding the next call comes right away. Yield now and then so that a
    // busy machine's other threads (or the caller itself, on one core) are not starved.
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_);
    int iter = 0;
    while (gen_now() == seen) {
      BITNET_PAUSE();
      if ((++iter & 255) == 0) {
        if (std::chrono::steady_clock::now() > until) break;
        std::this_thread::yield();
      }
    }
    if (gen_now() == seen) {
      std::unique_lock<std::mutex> lk(mu_);
      ++sleepers_;
      cv_.wait(lk, [&] { return stop_ || gen_now() != seen; });
      --sleepers_;
      if (stop_) return;
    }
    seen = gen_now();
    drain(seen);
  }
}

// Publishes a generation of ntasks tasks of fn to the workers (wakes sleepers). Caller holds busy_.
void ThreadPool::publish(int64_t ntasks, const std::function<void(int64_t)>* fn, uint32_t* gen) {
  // All tasks of the previous generation are done (the callers wait for that), so nobody runs fn_.
  fn_.store(fn, std::memory_order_release);
  done_.store(0, std::memory_order_release);
  int sleepers;
  {
    std::lock_guard<std::mutex> lk(mu_);
    *gen = (gen_of(work_.load(std::memory_order_relaxed)) + 1) & 0xfffffffu;
    work_.store(((uint64_t)*gen << 36) | ((uint64_t)ntasks << 18), std::memory_order_release);  // publishes fn_, done_
    sleepers = sleepers_;
  }
  if (sleepers > 0) cv_.notify_all();
}

void ThreadPool::finish_background() {
  if (!bg_active_) return;
  bg_cancel_.store(true, std::memory_order_relaxed);
  drain(bg_gen_);                              // unclaimed tasks: each returns at once
  const int64_t n = bg_ntasks_;
  while (done_.load(std::memory_order_acquire) < n) BITNET_PAUSE();
  bg_active_ = false;
}

void ThreadPool::stop_background() {
  std::lock_guard<std::mutex> busy(busy_);
  finish_background();
}

bool ThreadPool::post_background(int64_t ntasks, std::function<void(int64_t)> fn) {
  std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
  if (!busy.owns_lock() || n_ == 1 || ntasks < 1 || ntasks > kMaxTasks) return false;
  finish_background();
  bg_fn_ = std::move(fn);
  bg_cancel_.store(false, std::memory_order_relaxed);
  bg_ntasks_ = ntasks;
  publish(ntasks, &bg_fn_, &bg_gen_);
  bg_active_ = true;
  return true;
}

bool ThreadPool::try_run(int64_t ntasks, const std::function<void(int64_t)>& fn) {
  std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
  if (!busy.owns_lock()) return false;
  finish_background();
  if (ntasks > kMaxTasks) return false;
  if (n_ == 1 || ntasks <= 1) {
    for (int64_t t = 0; t < ntasks; ++t) fn(t);
    return true;
  }
  uint32_t gen;
  publish(ntasks, &fn, &gen);
  drain(gen);
  int iter = 0;
  while (done_.load(std::memory_order_acquire) < ntasks) {
    BITNET_PAUSE();
    if ((++iter & 63) == 0) std::this_thread::yield();  // a worker holding a task may need this core
  }
  return true;
}

}  // namespace bitnet
