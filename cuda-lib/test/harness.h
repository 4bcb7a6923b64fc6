/* The small test harness shared by the host C tests (test_host.c, test_files.c, test_comm.c):
 * a failure message buffer, EXPECT-style macros that fail the current test by returning 0,
 * helpers that more than one test file uses, and the runner of a test table. A test is a
 * `int fn(void)` that returns 1 when it passes. */
#ifndef CKPT_TEST_HARNESS_H
#define CKPT_TEST_HARNESS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "ckpt.h"

/* Why the current test failed; cleared before each test, printed after a failing one. */
static char g_msg[1024];

/* `cond` holds; otherwise the test fails naming the condition. */
#define EXPECT(cond)                                                                  \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      snprintf(g_msg, sizeof g_msg, "%s:%d: expected %s", __FILE__, __LINE__, #cond); \
      return 0;                                                                       \
    }                                                                                 \
  } while (0)

/* A call's status; on mismatch names both statuses and the context's last error. */
#define EXPECT_ST(ctx, call, want)                                                         \
  do {                                                                                     \
    int got_ = (call);                                                                     \
    if (got_ != (want)) {                                                                  \
      char detail_[512] = "";                                                              \
      if ((ctx) != NULL) ckpt_last_error((ctx), detail_, sizeof detail_);                  \
      snprintf(g_msg, sizeof g_msg, "%s:%d: %s gave %s, expected %s (last error: %s)",     \
               __FILE__, __LINE__, #call, ckpt_err_name(got_), ckpt_err_name(want), detail_); \
      return 0;                                                                            \
    }                                                                                      \
  } while (0)

/* A call gives CKPT_OK (EXPECT_ST with CKPT_OK). */
#define EXPECT_OK(ctx, call) EXPECT_ST(ctx, call, CKPT_OK)

/* The context's last error contains `needle`. */
#define EXPECT_DETAIL(ctx, needle)                                                        \
  do {                                                                                    \
    char d_[512];                                                                         \
    ckpt_last_error((ctx), d_, sizeof d_);                                                \
    if (strstr(d_, (needle)) == NULL) {                                                   \
      snprintf(g_msg, sizeof g_msg, "%s:%d: last error '%s' lacks '%s'", __FILE__,        \
               __LINE__, d_, (needle));                                                   \
      return 0;                                                                           \
    }                                                                                     \
  } while (0)

/* A context with `devices` host devices, or NULL when it cannot be made. */
static inline ckpt_ctx *new_ctx(int32_t devices) {
  ckpt_ctx_options o = {.size = sizeof o, .abi_version = CKPT_ABI_VERSION, .host_devices = devices};
  ckpt_ctx *ctx = NULL;
  return ckpt_ctx_create(&o, &ctx) == CKPT_OK ? ctx : NULL;
}

/* Records an event on the stream and waits for it with no limit. */
static inline int sync_stream(ckpt_ctx *ctx, ckpt_stream *s) {
  ckpt_event *ev;
  int st = ckpt_event_create(ctx, 0, &ev);
  if (st != CKPT_OK) return st;
  st = ckpt_event_record(ev, s);
  if (st == CKPT_OK) st = ckpt_event_wait(ev, -1);
  int st2 = ckpt_event_destroy(ev);
  return st != CKPT_OK ? st : st2;
}

/* ---- runner ------------------------------------------------------------------------- */

/* One entry of a test table: the name printed and the test. */
typedef struct {
  const char *name;
  int (*fn)(void);
} harness_test;

/* A test table entry named after its function. */
#define TEST(fn) {#fn, fn}

/* Runs the tests in order, printing `ok   name` or `FAIL name: why` for each and then
 * `N passed, N failed`; returns main's exit status (1 when any failed). */
static inline int harness_run(const harness_test *tests, size_t n) {
  int passed = 0, failed = 0;
  for (size_t i = 0; i < n; i++) {
    g_msg[0] = '\0';
    if (tests[i].fn()) {
      passed++;
      printf("ok   %s\n", tests[i].name);
    } else {
      failed++;
      printf("FAIL %s: %s\n", tests[i].name, g_msg);
    }
    fflush(stdout);
  }
  printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}

/* Runs a test table defined as an array (not a pointer) from main. */
#define RUN_TESTS(tests) harness_run((tests), sizeof(tests) / sizeof((tests)[0]))

#endif /* CKPT_TEST_HARNESS_H */
