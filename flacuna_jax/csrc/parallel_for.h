// Work shared between the calling thread and XLA's intra-op thread pool, for the CPU kernels of csrc/.
#ifndef FLACUNA_JAX_CSRC_PARALLEL_FOR_H_
#define FLACUNA_JAX_CSRC_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace flacuna_jax {

// Runs fn(0..total-1) on the calling thread and XLA's intra-op pool. Work is claimed from a shared
// counter, so a pool task that starts late (or never, the pool being busy) costs nothing: the caller
// waits only for tasks that have started, and a task starting after the work is done touches no buffer.
inline void parallel_for(xla::ffi::ThreadPool& pool, int64_t total, std::function<void(int64_t)> fn) {
  struct Shared {
    std::atomic<int64_t> next{0}, active{0};
    int64_t total;
    std::function<void(int64_t)> fn;
  };
  auto shared = std::make_shared<Shared>();
  shared->total = total;
  shared->fn = std::move(fn);
  auto drain = [](Shared& s) {
    for (int64_t i; (i = s.next.fetch_add(1)) < s.total;) s.fn(i);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([shared, drain] {
      shared->active.fetch_add(1);
      drain(*shared);
      shared->active.fetch_sub(1);
    });
  }
  drain(*shared);
  while (shared->active.load() != 0) std::this_thread::yield();
}

}  // namespace flacuna_jax

#endif  // FLACUNA_JAX_CSRC_PARALLEL_FOR_H_
