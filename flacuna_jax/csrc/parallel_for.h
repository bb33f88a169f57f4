// Work shared between the calling thread and XLA's intra-op thread pool, for the CPU kernels of csrc/.
//
// Why helpers linger: a decode step calls these kernels ~8 times per layer, with a few of XLA's
// single-threaded ops (norms, rotary, the cache write; 10-50 us) between them. By then a pool thread
// has gone to sleep, and waking it took ~50 us on the 2-core machine: the kernel's first 50 us ran on
// one thread (SmolLM2, 16 rows x 256 slots: 6 ms of helper start-up in a 56 ms step). So a helper,
// once its job is done, spins for kLingerUs on the board where every parallel_for publishes its job,
// and joins the next one at once. All kernels are one library (`native.py`), so they share the board.
#ifndef FLACUNA_JAX_CSRC_PARALLEL_FOR_H_
#define FLACUNA_JAX_CSRC_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace flacuna_jax {

constexpr int64_t kLingerUs = 100;  // longer than the gaps within a layer, short against a step
constexpr int64_t kLongJobUs = 1000;  // a job this long gains little from a helper there at once

// fn(0..total-1), each index claimed once from a shared counter by whoever gets to it first.
struct Job {
  std::atomic<int64_t> next{0}, done{0};
  int64_t total = 0;
  std::function<void(int64_t)> fn;

  void drain() {
    for (int64_t i; (i = next.fetch_add(1)) < total;) {
      fn(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// The latest job, for lingering helpers. A job published while another runs replaces it on the
// board; the first is then finished by its own caller (and the helpers it already has).
struct Board {
  std::mutex mu;
  std::shared_ptr<Job> job;  // shared: a helper arriving after its caller returned touches only this
  std::atomic<uint64_t> generation{0};
  std::atomic<int64_t> lingering{0};

  uint64_t publish(std::shared_ptr<Job> j) {  // the job's generation
    std::lock_guard<std::mutex> lock(mu);
    job = std::move(j);
    return generation.fetch_add(1, std::memory_order_release) + 1;
  }
  std::shared_ptr<Job> current() {
    std::lock_guard<std::mutex> lock(mu);
    return job;
  }
};

inline Board& board() {
  static Board* the_board = new Board;  // never destroyed: pool threads may outlive static destruction
  return *the_board;
}

// Drains `job`: true if that took long enough that lingering after it would not pay.
inline bool drained_long(Job& job) {
  const auto start = std::chrono::steady_clock::now();
  job.drain();
  return std::chrono::steady_clock::now() - start > std::chrono::microseconds(kLongJobUs);
}

// A pool task: `job`, then every job published within kLingerUs of the last one it saw, as long as
// they are short (a prefill's: not; while a helper spins, XLA cannot run its own work on that thread).
inline void help(std::shared_ptr<Job> job, uint64_t seen) {
  Board& b = board();
  const bool long_job = drained_long(*job);
  job.reset();
  if (long_job) return;
  b.lingering.fetch_add(1);
  const auto linger = std::chrono::microseconds(kLingerUs);
  auto deadline = std::chrono::steady_clock::now() + linger;
  for (int64_t spins = 1;; ++spins) {
    const uint64_t g = b.generation.load(std::memory_order_acquire);
    if (g != seen) {
      seen = g;
      if (auto next = b.current(); next && drained_long(*next)) break;
      deadline = std::chrono::steady_clock::now() + linger;
    } else if (spins % 32 == 0 && std::chrono::steady_clock::now() > deadline) {
      break;
    } else {
      cpu_relax();
    }
  }
  b.lingering.fetch_sub(1);
  if (b.generation.load() != seen)  // published while leaving: its caller may have counted on this helper
    if (auto next = b.current()) next->drain();
}

// Runs fn(0..total-1) on the calling thread, the lingering helpers and, for the rest of the pool's
// threads, new pool tasks. The caller waits only for indices that were claimed: a task that starts
// late (or never, the pool being busy) costs nothing.
inline void parallel_for(xla::ffi::ThreadPool& pool, int64_t total, std::function<void(int64_t)> fn) {
  Board& b = board();
  auto job = std::make_shared<Job>();
  job->total = total;
  job->fn = std::move(fn);
  const uint64_t seen = b.publish(job);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  for (int64_t i = b.lingering.load(); i < helpers; ++i) pool.Schedule([job, seen] { help(job, seen); });
  job->drain();
  for (int64_t spins = 1; job->done.load(std::memory_order_acquire) != total; ++spins)
    spins % 1024 == 0 ? std::this_thread::yield() : cpu_relax();
}

}  // namespace flacuna_jax

#endif  // FLACUNA_JAX_CSRC_PARALLEL_FOR_H_
