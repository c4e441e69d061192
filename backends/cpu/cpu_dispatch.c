/*
 * Run-time choice of the fast kernels' instruction set (cpu_fast.h):
 * compiled in (cpu_isa_*.c built with their own flags) and supported by
 * this CPU and OS (__builtin_cpu_supports checks both: CPUID and the
 * registers the OS saves). COMMVQ_CPU_ISA = avx512 | avx2 | portable caps
 * the choice (valgrind 3.19 cannot run AVX-512: the memcheck tests set
 * avx2); a set that is not available falls back to the best one below it.
 */
#include "cpu_fast.h"

#include <stdlib.h>
#include <string.h>

static const char *const isa_names[CVQ_CPU_ISA_COUNT] = {"portable", "avx2", "avx512"};

const char *cvq_cpu_isa_name(cvq_cpu_isa isa) {
    return (unsigned)isa < (unsigned)CVQ_CPU_ISA_COUNT ? isa_names[isa] : "?";
}

static const cvq_cpu_kernels *kernels_of(cvq_cpu_isa isa) {
    switch (isa) {
    case CVQ_CPU_ISA_AVX512: return cvq_cpu_kernels_avx512();
    case CVQ_CPU_ISA_AVX2: return cvq_cpu_kernels_avx2();
    case CVQ_CPU_ISA_PORTABLE: return cvq_cpu_kernels_portable();
    default: return NULL;
    }
}

/* The highest set COMMVQ_CPU_ISA allows (all when unset or unknown). */
static int isa_cap(void) {
    int cap = CVQ_CPU_ISA_COUNT - 1;
    const char *env = getenv("COMMVQ_CPU_ISA");
    if (env && *env)
        for (int i = 0; i < CVQ_CPU_ISA_COUNT; i++)
            if (!strcmp(env, isa_names[i])) cap = i;
    return cap;
}

bool cvq_cpu_isa_available(cvq_cpu_isa isa) {
    if (!kernels_of(isa) || (int)isa > isa_cap()) return false;
    switch (isa) {
    case CVQ_CPU_ISA_PORTABLE: return true;
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    case CVQ_CPU_ISA_AVX2: return __builtin_cpu_supports("avx2") != 0;
    case CVQ_CPU_ISA_AVX512: return __builtin_cpu_supports("avx512f") != 0;
#endif
    default: return false;
    }
}

/* Set by cvq_cpu_isa_force (tests); CVQ_CPU_ISA_COUNT = automatic. */
static cvq_cpu_isa forced = CVQ_CPU_ISA_COUNT;

bool cvq_cpu_isa_force(cvq_cpu_isa isa) {
    if (isa == CVQ_CPU_ISA_COUNT) {
        forced = isa;
        return true;
    }
    if (!cvq_cpu_isa_available(isa)) return false;
    forced = isa;
    return true;
}

const cvq_cpu_kernels *cvq_cpu_kernels_get(void) {
    if (forced != CVQ_CPU_ISA_COUNT) return kernels_of(forced);
    for (int i = CVQ_CPU_ISA_COUNT - 1; i > 0; i--)
        if (cvq_cpu_isa_available((cvq_cpu_isa)i)) return kernels_of((cvq_cpu_isa)i);
    return cvq_cpu_kernels_portable();
}

size_t cvq_cpu_value_scratch(const cvq_layer_view *lv) {
    const cvq_geometry *g = lv->g;
    /* xT [F][32], hT [I][32], lT [2Nc][32] (32: the widest value batch),
     * u [F], set bits [Nc] (uint32) */
    return ((size_t)g->value_group_width + g->value_hidden + 2u * (size_t)g->value_bits) * 32u +
           g->value_group_width + g->value_bits;
}
