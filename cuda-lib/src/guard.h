/* SIGBUS-safe CPU reads of mapped files (guard.c): a read of a page whose file was truncated
 * under its mapping raises SIGBUS, which would kill the process. Code that reads such memory
 * runs its read through ckpt__guarded, which turns a fault inside the range it names into a
 * CKPT_EFAULT return. */
#ifndef CKPT_GUARD_H
#define CKPT_GUARD_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Installs the library's SIGBUS handler, once per process (later calls only report how the
 * first one went). CKPT_ESYS naming sigaction if it could not be installed. */
int ckpt__guard_install(ckpt_ctx *ctx);

/* Runs fn(arg) on this thread with the guard on: a SIGBUS raised by an access to an address in
 * [lo, lo + len) abandons fn where it faulted and returns CKPT_EFAULT with the address in
 * *fault; any other SIGBUS goes to the handler that was installed before the library's. fn
 * must hold no lock and own no resource that the jump out of it would leak (plain reads and
 * copies only). Records nothing on a context: the caller names what it was reading. */
int ckpt__guarded(void (*fn)(void *), void *arg, const void *lo, size_t len, uintptr_t *fault);
/* ckpt__guarded over two ranges at once (a read of one and a compare with the other). */
int ckpt__guarded2(void (*fn)(void *), void *arg, const void *lo, size_t len, const void *lo2, size_t len2,
                   uintptr_t *fault);

#ifdef __cplusplus
}
#endif
#endif
