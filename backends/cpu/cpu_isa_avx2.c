/*
 * The fast CPU kernels for the avx2 instruction set: cpu_kernels_impl.h
 * compiled with this file's own flags (CMakeLists.txt sets them per file;
 * the rest of the library is built for the baseline CPU). Run only after
 * cvq_cpu_isa_available() said yes (cpu_dispatch.c).
 */
#include "cpu_fast.h"

#if defined(__AVX2__)
#define CVQ_SIMD_AVX2 1
#define CVQ_SIMD_ISA CVQ_CPU_ISA_AVX2
#define CVQ_SIMD_ISA_NAME "avx2"
#include "cpu_simd.h"
#include "cpu_kernels_impl.h"

const cvq_cpu_kernels *cvq_cpu_kernels_avx2(void) { return &KFN(table); }
#else
/* Not compiled for this set (another compiler or architecture). */
const cvq_cpu_kernels *cvq_cpu_kernels_avx2(void) { return NULL; }
#endif
