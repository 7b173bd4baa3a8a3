// SIGBUS guard for reads of memory-mapped files. A thread reading guarded memory publishes a
// jump buffer; the handler jumps back to it, so a file truncated under a mapping costs an
// exception, not the process. Faults outside a guarded read go to whatever handler was
// installed before ours (Python's faulthandler, say) or to the default action.
#pragma once

#include <csetjmp>
#include <atomic>

namespace lcsc {

// The jump buffer of the guarded read running on this thread, or null. Volatile, with signal
// fences where it is set: the compiler must not drop or move the store around code it believes
// cannot fault (a memcpy, say).
extern thread_local sigjmp_buf* volatile t_fault_jump;

// Installs the process-wide SIGBUS handler once; call before the first guarded().
void install_sigbus_guard();

// Runs body() with the guard armed; false when a SIGBUS interrupted it. body must hold no
// resources (a jump out of it skips destructors): the tile code and memcpy hold none.
template <class Body>
bool guarded(Body&& body) {
  sigjmp_buf jump;
  if (sigsetjmp(jump, 0) != 0) {
    std::atomic_signal_fence(std::memory_order_seq_cst);
    t_fault_jump = nullptr;
    return false;
  }
  t_fault_jump = &jump;
  std::atomic_signal_fence(std::memory_order_seq_cst);
  body();
  std::atomic_signal_fence(std::memory_order_seq_cst);
  t_fault_jump = nullptr;
  return true;
}

}  // namespace lcsc
