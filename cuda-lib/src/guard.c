/* SIGBUS-safe CPU reads of mapped files. A per-thread guard names the range being read and a
 * jump buffer; the library's SIGBUS handler jumps back to the guard when the fault is inside
 * that range, and passes every other SIGBUS to the handler installed before it. */
#define _GNU_SOURCE
#include "guard.h"

#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>

typedef struct guard {
  sigjmp_buf jump;
  uintptr_t lo, hi;          /* the guarded ranges [lo, hi) and [lo2, hi2) */
  uintptr_t lo2, hi2;
  volatile uintptr_t fault;  /* set by the handler before it jumps */
} guard;

/* The default (dynamic) TLS model: initial-exec does not fit in a library that is dlopen'ed
 * beside the static CUDA runtime ("cannot allocate memory in static TLS block" on the H200).
 * A guarded read sets it before it reads, so on the threads whose faults are ours the
 * variable exists before the handler looks; elsewhere the process is dying of the fault. */
static __thread guard *volatile current;

static struct sigaction previous;  /* written once, before the handler is installed */
static pthread_once_t once = PTHREAD_ONCE_INIT;
static int install_errno;

/* A SIGBUS that is not ours: what the previous disposition would have done. */
static void chain(int sig, siginfo_t *si, void *uc) {
  if (previous.sa_flags & SA_SIGINFO) {
    previous.sa_sigaction(sig, si, uc);
    return;
  }
  if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
    previous.sa_handler(sig);
    return;
  }
  /* Default (a fault cannot be ignored): the faulting access runs again when this returns and
   * kills the process as if no handler were installed; a SIGBUS sent by kill(2) is raised
   * again, to be delivered once this handler has returned. */
  struct sigaction dfl = {.sa_handler = SIG_DFL};
  sigemptyset(&dfl.sa_mask);
  sigaction(SIGBUS, &dfl, NULL);
  if (si == NULL || si->si_code <= 0) raise(sig);
}

static void on_sigbus(int sig, siginfo_t *si, void *uc) {
  guard *g = current;
  uintptr_t addr = si != NULL ? (uintptr_t)si->si_addr : 0;
  int inside = g != NULL && ((addr >= g->lo && addr < g->hi) || (addr >= g->lo2 && addr < g->hi2));
  if (inside && si != NULL && si->si_code > 0) {
    g->fault = addr;
    current = NULL;
    siglongjmp(g->jump, 1);  /* restores the mask saved by sigsetjmp: SIGBUS unblocked */
  }
  chain(sig, si, uc);
}

static void install(void) {
  struct sigaction sa = {.sa_sigaction = on_sigbus, .sa_flags = SA_SIGINFO | SA_ONSTACK};
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGBUS, NULL, &previous) != 0 || sigaction(SIGBUS, &sa, NULL) != 0)
    install_errno = errno;
}

int ckpt__guard_install(ckpt_ctx *ctx) {
  pthread_once(&once, install);
  if (install_errno != 0)
    return FAIL(ctx, CKPT_ESYS, "sigaction(SIGBUS) for the mapped-file guard: %s",
                strerror(install_errno));
  return CKPT_OK;
}

int ckpt__guarded(void (*fn)(void *), void *arg, const void *lo, size_t len, uintptr_t *fault) {
  return ckpt__guarded2(fn, arg, lo, len, NULL, 0, fault);
}

int ckpt__guarded2(void (*fn)(void *), void *arg, const void *lo, size_t len, const void *lo2, size_t len2,
                   uintptr_t *fault) {
  guard g = {.lo = (uintptr_t)lo, .hi = (uintptr_t)lo + len, .lo2 = (uintptr_t)lo2, .hi2 = (uintptr_t)lo2 + len2};
  guard *volatile outer = current; /* a guarded read inside another gives the outer one back */
  if (sigsetjmp(g.jump, 1) != 0) {
    current = outer;
    *fault = g.fault;
    return CKPT_EFAULT;
  }
  current = &g;
  atomic_signal_fence(memory_order_seq_cst); /* the guard is in place before the first read */
  fn(arg);
  atomic_signal_fence(memory_order_seq_cst);
  current = outer;
  return CKPT_OK;
}
