/* The C tests' tiny harness: checks that count failures and go on, and REQUIRE for the
 * preconditions a test cannot do without. One test program is one translation unit, so
 * the failure counter lives here. */
#ifndef STATECORE_TEST_HARNESS_H
#define STATECORE_TEST_HARNESS_H

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>

static long g_failures;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            g_failures++;                                                            \
        }                                                                            \
    } while (0)

/* A call's status against the wanted one, both named by `name_of` (a strerror). */
#define CHECK_STATUS(expr, want, name_of)                                            \
    do {                                                                             \
        int got_ = (int)(expr), want_ = (int)(want);                                 \
        if (got_ != want_) {                                                         \
            fprintf(stderr, "%s:%d: %s returned %d (%s), want %d (%s)\n", __FILE__,  \
                    __LINE__, #expr, got_, name_of(got_), want_, name_of(want_));    \
            g_failures++;                                                            \
        }                                                                            \
    } while (0)

#define CHECK_EQ_U64(a, b)                                                           \
    do {                                                                             \
        uint64_t a_ = (a), b_ = (b);                                                 \
        if (a_ != b_) {                                                              \
            fprintf(stderr, "%s:%d: CHECK failed: %s == %s (%" PRIu64 " != %" PRIu64 \
                    ")\n", __FILE__, __LINE__, #a, #b, a_, b_);                      \
            g_failures++;                                                            \
        }                                                                            \
    } while (0)

#define REQUIRE(cond)                                                                \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: REQUIRE failed: %s\n", __FILE__, __LINE__, #cond); \
            g_failures++;                                                            \
            return;                                                                  \
        }                                                                            \
    } while (0)

#endif
