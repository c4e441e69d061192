/*
 * Shared by the fuzz harnesses: a check that stops the run with a message
 * (the harness, not the library, may abort: that is how a fuzzer records a
 * finding), and the set of statuses an input may legitimately produce.
 */
#ifndef COMMVQ_FUZZ_COMMON_H
#define COMMVQ_FUZZ_COMMON_H

#include <stdio.h>
#include <stdlib.h>

#include "commvq.h"

#define FUZZ_CHECK(cond, what)                                                      \
    do {                                                                            \
        if (!(cond)) {                                                              \
            fprintf(stderr, "fuzz finding at %s:%d: %s (last error: %s)\n", __FILE__, \
                    __LINE__, what, cvq_last_error());                              \
            abort();                                                                \
        }                                                                           \
    } while (0)

/* A malformed file is refused with a format, argument or resource status;
 * never with an internal error or a device status. */
static inline int fuzz_status_is_load_error(cvq_status s) {
    int r = (int)s / 100;
    return s != CVQ_OK && (r == 1 || r == 3 || r == 5);
}

/* Any status an API call may return on bad input: everything but internal
 * errors (a 9xx is always a bug). */
static inline int fuzz_status_is_valid(cvq_status s) {
    return s == CVQ_OK || ((int)s >= 100 && (int)s < 900);
}

/* Little reader over the fuzzer's bytes: returns 0 once they run out. */
typedef struct fuzz_bytes {
    const unsigned char *p;
    size_t n;
} fuzz_bytes;

static inline unsigned fuzz_u8(fuzz_bytes *b) {
    if (b->n == 0) return 0;
    b->n--;
    return *b->p++;
}
static inline unsigned fuzz_u16(fuzz_bytes *b) {
    unsigned lo = fuzz_u8(b);
    return lo | (fuzz_u8(b) << 8);
}

#endif
