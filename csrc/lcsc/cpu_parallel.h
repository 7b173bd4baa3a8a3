// The parallel loop over tiles that the CPU ops share: OpenMP threads, the caller's
// floating-point control bits in every worker, the SIGBUS guard, and the fence that orders
// non-temporal stores before the threads join.
#pragma once

#include <atomic>
#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(LCSC_X86_DISPATCH)
#include <xmmintrin.h>
#endif

#include "fault_guard.h"

namespace lcsc {

enum class Schedule { kStatic, kDynamic };

// Runs job(g, worker) for every tile g in [0, tiles) on `threads` threads; worker in
// [0, threads) indexes per-thread scratch. Workers keep their own floating-point control state
// but take the caller's flush-to-zero and denormals-are-zero bits (torch.set_flush_denormal)
// for the run, so the thread count cannot change a result. guard_faults: each job runs under
// the SIGBUS guard, and after a fault the remaining jobs are skipped. stream: the jobs made
// non-temporal stores. Returns false when a SIGBUS interrupted a job.
template <class Job>
bool run_tiles(int64_t tiles, int threads, Schedule schedule, bool guard_faults, bool stream,
               Job&& job) {
  if (guard_faults) install_sigbus_guard();
  std::atomic<bool> faulted{false};
  const auto one = [&](int64_t g, int worker) {
    const auto tile_job = [&] { job(g, worker); };
    if (!guard_faults) {
      tile_job();
    } else if (faulted.load(std::memory_order_relaxed) || !guarded(tile_job)) {
      faulted.store(true);
    }
  };
#if defined(LCSC_X86_DISPATCH)
  const unsigned caller_csr = _mm_getcsr();
#endif
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
  {
#if defined(LCSC_X86_DISPATCH)
    const unsigned own_csr = _mm_getcsr();
    _mm_setcsr(caller_csr);
#endif
#if defined(_OPENMP)
    const int worker = omp_get_thread_num();
    if (schedule == Schedule::kDynamic) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t g = 0; g < tiles; ++g) one(g, worker);
    } else {
#pragma omp for schedule(static)
      for (int64_t g = 0; g < tiles; ++g) one(g, worker);
    }
#else
    (void)threads;
    (void)schedule;
    for (int64_t g = 0; g < tiles; ++g) one(g, 0);
#endif
#if defined(LCSC_X86_DISPATCH)
    if (stream) _mm_sfence();
    _mm_setcsr(own_csr);
#else
    (void)stream;
#endif
  }
  return !faulted.load();
}

}  // namespace lcsc
