/*
 * The numerics contract's shared primitives (docs/numerics.md). Every
 * backend computes these exactly as written here; GPU backends port them
 * operation for operation. This file must be compiled with
 * -ffp-contract=off (the build does so for the whole library).
 */
#ifndef CVQ_NUMERICS_H
#define CVQ_NUMERICS_H

#include <stdint.h>

/* erf(x) in binary32 from the library's own piecewise polynomials (no libm),
 * max abs error <= 2e-7 against double erf. Coefficients: numerics.md. */
float cvq_erf_f32(float x);
/* GELU, erf form: (0.5f*x) * (1.0f + cvq_erf_f32(x * 0.70710677f)). */
float cvq_gelu_f32(float x);

/* Integer RoPE phase step: t_p = round(frac(theta_p / (2*pi)) * 2^64) mod
 * 2^64, computed on the host once per codebook. */
uint64_t cvq_rope_phase_step(double theta);
/* Top 32 bits of the phase of position `pos` (>= 0):
 * (uint32)(((uint64)pos * t) >> 32) -- the product wraps modulo 2^64. */
static inline uint32_t cvq_rope_phase_hi(uint64_t t, int32_t pos) {
    return (uint32_t)(((uint64_t)(uint32_t)pos * t) >> 32);
}
/* cos and sin of 2*pi*turn/2^32 from the library's polynomial. */
void cvq_sincos_turn(uint32_t turn, float *c, float *s);
/* Both at once: cos/sin of theta_p * pos. */
static inline void cvq_rope_cos_sin(uint64_t t, int32_t pos, float *c, float *s) {
    cvq_sincos_turn(cvq_rope_phase_hi(t, pos), c, s);
}

/* Applies RoPE at `pos` to one head vector x[d] in place, pair layout as
 * given: (re, im) <- (re*c - im*s, re*s + im*c), each product rounded. */
void cvq_rope_apply(float *x, uint32_t d, int layout, const uint64_t *t,
                    int32_t pos);

/* Nonzero when the FPU flushes subnormals to zero (FTZ or DAZ set), which
 * would break the contract; the CPU encoder refuses to run then. */
int cvq_fpu_flushes_subnormals(void);

#endif
