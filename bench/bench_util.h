/* Helpers shared by the bench_*.c programs: a monotonic clock and a seeded
 * splitmix64 generator of uniform floats in [-1, 1). */
#ifndef CVQ_BENCH_UTIL_H
#define CVQ_BENCH_UTIL_H

#include <stdint.h>
#include <time.h>

static inline double bench_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline float bench_rnd(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)((double)(z >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

#endif
