#include "fault_guard.h"

#include <csignal>
#include <mutex>

namespace lcsc {

thread_local sigjmp_buf* volatile t_fault_jump = nullptr;

namespace {

struct sigaction g_previous_sigbus;

void on_sigbus(int sig, siginfo_t* info, void* context) {
  if (t_fault_jump != nullptr) siglongjmp(*t_fault_jump, 1);
  if (g_previous_sigbus.sa_flags & SA_SIGINFO) {
    g_previous_sigbus.sa_sigaction(sig, info, context);
  } else if (g_previous_sigbus.sa_handler != SIG_IGN && g_previous_sigbus.sa_handler != SIG_DFL) {
    g_previous_sigbus.sa_handler(sig);
  } else {
    // Restore the previous disposition; returning re-runs the faulting access under it.
    sigaction(SIGBUS, &g_previous_sigbus, nullptr);
  }
}

}  // namespace

void install_sigbus_guard() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action {};
    action.sa_sigaction = on_sigbus;
    // SA_NODEFER: leaving the handler by siglongjmp must not leave SIGBUS blocked.
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, &g_previous_sigbus);
  });
}

}  // namespace lcsc
