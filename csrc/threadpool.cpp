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
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::drain() {
  for (;;) {
    const int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
    if (t >= ntasks_) break;
    (*fn_)(t);
  }
}

void ThreadPool::worker_loop() {
  // Generation 0 is the state at construction; reading gen_ here instead would race with a first
  // try_run() that starts before this thread does (and then wait for a generation that never comes).
  uint64_t seen = 0;
  for (;;) {
    // Spin a little: the next call usually comes right away during decoding.
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_);
    int iter = 0;
    while (gen_.load(std::memory_order_acquire) == seen) {
      BITNET_PAUSE();
      if ((++iter & 255) == 0 && std::chrono::steady_clock::now() > until) break;
    }
    if (gen_.load(std::memory_order_acquire) == seen) {
      std::unique_lock<std::mutex> lk(mu_);
      ++sleepers_;
      cv_.wait(lk, [&] { return stop_ || gen_.load(std::memory_order_acquire) != seen; });
      --sleepers_;
      if (stop_) return;
    }
    seen = gen_.load(std::memory_order_acquire);
    drain();
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

bool ThreadPool::try_run(int64_t ntasks, const std::function<void(int64_t)>& fn) {
  std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
  if (!busy.owns_lock()) return false;
  if (n_ == 1 || ntasks <= 1) {
    for (int64_t t = 0; t < ntasks; ++t) fn(t);
    return true;
  }
  fn_ = &fn;
  ntasks_ = ntasks;
  next_.store(0, std::memory_order_relaxed);
  pending_.store(n_ - 1, std::memory_order_relaxed);
  int sleepers;
  {
    std::lock_guard<std::mutex> lk(mu_);
    gen_.fetch_add(1, std::memory_order_release);
    sleepers = sleepers_;
  }
  if (sleepers > 0) cv_.notify_all();
  drain();
  while (pending_.load(std::memory_order_acquire) != 0) BITNET_PAUSE();
  fn_ = nullptr;
  return true;
}

}  // namespace bitnet
