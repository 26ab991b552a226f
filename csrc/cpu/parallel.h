// The CPU launchers' thread team: tasks [0, total) taken in runs from a shared counter, not split evenly up
// front, so that a slowed thread (a busy or virtual core, a small core of a hybrid CPU) takes fewer and
// the launch does not wait on its share. Below `min_work` (or with one thread) everything runs here: a
// team costs more than a few hundred KiB of work.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#if defined(FASTDIFF_WITH_OPENMP)
#include <omp.h>
#endif

namespace fastdiff {
namespace cpu {

// run(t0, t1) -> int64_t over runs covering [0, total); returns the sum of what the runs return.
template <typename Run>
int64_t parallel_runs(int64_t total, int64_t work, int64_t min_work, Run&& run) {
  if (total == 0) return 0;
#if defined(FASTDIFF_WITH_OPENMP)
  const int threads = int(std::min<int64_t>(omp_get_max_threads(), total));
  if (threads > 1 && work >= min_work) {
    const int64_t grain = std::max<int64_t>(1, total / (8 * threads));
    std::atomic<int64_t> next{0};
    int64_t sum = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sum)
    {
      for (int64_t t; (t = next.fetch_add(grain, std::memory_order_relaxed)) < total;)
        sum += run(t, std::min(total, t + grain));
    }
    return sum;
  }
#endif
  return run(int64_t(0), total);
}

}  // namespace cpu
}  // namespace fastdiff
