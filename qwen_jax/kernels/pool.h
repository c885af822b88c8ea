// The persistent worker pool shared by the library's kernels (grouped_matmul.cc, delta_rule.cc): one pool per
// process (Pool::get(), a function-local static of an inline function in a named namespace, so both sources get
// the same one). A kernel cuts a call into items, each computed whole by one thread with fixed loops: which thread
// takes an item changes none of its bits.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace qwen_kernels {

constexpr int64_t kMaxThreads = 8;  // the calling thread and up to 7 workers
constexpr int64_t kMaxItems = 0xFFFF;  // items per call (16 bits of the pool's state word)

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// Workers that take items of the current call while it lasts. The job's state is one word: a generation (which
// call), the number of items and the next unclaimed one; an item is claimed by a compare-and-swap on that word, so
// a worker that wakes late (the machine busy) finds the call over, or items gone, and claims nothing: the calling
// thread never waits for a worker that has not started an item, only for items already started. A worker spins a
// while after its last item (the next call is usually soon), then sleeps. One call at a time uses the pool; a
// call that finds it in use runs on its own thread.
class Pool {
 public:
  using Run = void (*)(const void* job, int64_t item);

  static Pool* get() {
    static Pool* pool = new Pool;  // never destroyed: its workers live as long as the process
    return pool;
  }
  int64_t workers() const { return int64_t(threads_.size()); }

  // Runs run(job, i) for every i < count, on this thread and the workers; false if the pool is in use.
  bool run(Run run, const void* job, int64_t count) {
    std::unique_lock<std::mutex> caller(caller_, std::try_to_lock);
    if (!caller.owns_lock()) return false;
    run_ = run;
    job_ = job;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (state_.load(std::memory_order_relaxed) >> 32) + 1;
    state_.store(gen << 32 | uint64_t(count) << 16, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_);
      wake_.notify_all();
    }
    work(gen);
    for (int64_t spins = 0; done_.load(std::memory_order_acquire) < count; ++spins)
      spins < kSpin ? relax() : std::this_thread::yield();
    return true;
  }

 private:
  static constexpr int64_t kSpin = 2000;  // pause instructions (about 20 us here) before a worker sleeps

  Pool() {
    const int64_t hardware = std::max<int64_t>(1, std::thread::hardware_concurrency());
    for (int64_t t = 1; t < std::min(hardware, kMaxThreads); ++t) {
      threads_.emplace_back([this] { serve(); });
      threads_.back().detach();
    }
  }

  // Claims and runs items of call ``gen`` until none is left (or the call is over).
  void work(uint64_t gen) {
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      if (s >> 32 != gen || (s & 0xFFFF) >= ((s >> 16) & 0xFFFF)) return;
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
      run_(job_, int64_t(s & 0xFFFF));
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void serve() {
    uint64_t seen = 0;
    for (;;) {
      int64_t spins = 0;
      while (state_.load(std::memory_order_acquire) >> 32 == seen && spins++ < kSpin) relax();
      if (state_.load(std::memory_order_acquire) >> 32 == seen) {
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        std::unique_lock<std::mutex> lock(sleep_);
        wake_.wait(lock, [&] { return state_.load(std::memory_order_seq_cst) >> 32 != seen; });
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
      }
      seen = state_.load(std::memory_order_acquire) >> 32;
      work(seen);
    }
  }

  std::vector<std::thread> threads_;
  std::mutex caller_, sleep_;
  std::condition_variable wake_;
  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> done_{0}, sleepers_{0};
  Run run_ = nullptr;
  const void* job_ = nullptr;
};

}  // namespace qwen_kernels
