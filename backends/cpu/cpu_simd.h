/*
 * A small float-vector layer for the CPU fast path, one definition per
 * instruction set, chosen by the including file:
 *   CVQ_SIMD_AVX512   16 lanes, __m512 (file compiled with -mavx512f ...)
 *   CVQ_SIMD_AVX2      8 lanes, __m256 (file compiled with -mavx2)
 *   otherwise          4 lanes, a struct of four floats (plain C)
 *
 * Every operation is lane-wise and one IEEE binary32 operation per lane,
 * rounded to nearest: add, sub, mul, div and sqrt are correctly rounded in
 * all three sets, so a kernel that keeps each lane's sequence of
 * operations equal to the reference's gets the reference's bits. There is
 * deliberately no fused multiply-add here (docs/numerics.md).
 *
 * vf_hsum (a horizontal sum) reassociates: attention only (tolerance).
 */
#ifndef CVQ_CPU_SIMD_H
#define CVQ_CPU_SIMD_H

#include <math.h>
#include <stdint.h>

#if defined(CVQ_SIMD_AVX512)
#include <immintrin.h>
#define VW 16
typedef __m512 vf;
static inline vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void vf_store(float *p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vf_set1(float x) { return _mm512_set1_ps(x); }
static inline vf vf_zero(void) { return _mm512_setzero_ps(); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vf_sqrt(vf a) { return _mm512_sqrt_ps(a); }
static inline vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
/* a < b ? a : b per lane: b when either is NaN (so a NaN a never wins) */
static inline vf vf_min(vf a, vf b) { return _mm512_min_ps(a, b); }
/* (x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...): swaps each (re, im) pair */
static inline vf vf_swap_pairs(vf a) { return _mm512_permute_ps(a, 0xB1); }
static inline float vf_hsum(vf a) { return _mm512_reduce_add_ps(a); }

/* round to the nearest integer (ties to even), as a float */
static inline vf vf_round(vf a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

/* bit i set where !(a[i] > b[i]): a <= b, or either is NaN */
static inline uint32_t vf_ngt_bits(vf a, vf b) {
    return (uint32_t)_mm512_cmp_ps_mask(a, b, _CMP_NGT_UQ);
}
/* smallest lane (callers pass no NaN) */
static inline float vf_hmin(vf a) { return _mm512_reduce_min_ps(a); }
/* Lane-wise: where d < best (ordered: false for NaN), best = d, idx = k. */
static inline void vf_keep_less(vf *best, vf *idx, vf d, vf k) {
    const __mmask16 m = _mm512_cmp_ps_mask(d, *best, _CMP_LT_OQ);
    *best = _mm512_mask_mov_ps(*best, m, d);
    *idx = _mm512_mask_mov_ps(*idx, m, k);
}
/* exp(x) for softmax weights (attention only: a tolerance, not bits):
 * Cody-Waite reduction, degree-7 Taylor polynomial (relative error about
 * 1e-7); 0 for x < -87 (and for -Inf or NaN: masked tokens). */
static inline vf vf_exp_attn(vf x) {
    const __mmask16 ok = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
    const vf n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
    vf q = _mm512_set1_ps(1.0f / 5040.0f);
    q = _mm512_add_ps(_mm512_mul_ps(q, r), _mm512_set1_ps(1.0f / 720.0f));
    q = _mm512_add_ps(_mm512_mul_ps(q, r), _mm512_set1_ps(1.0f / 120.0f));
    q = _mm512_add_ps(_mm512_mul_ps(q, r), _mm512_set1_ps(1.0f / 24.0f));
    q = _mm512_add_ps(_mm512_mul_ps(q, r), _mm512_set1_ps(1.0f / 6.0f));
    q = _mm512_add_ps(_mm512_mul_ps(q, r), _mm512_set1_ps(0.5f));
    q = _mm512_add_ps(_mm512_mul_ps(q, r), _mm512_set1_ps(1.0f));
    q = _mm512_add_ps(_mm512_mul_ps(q, r), _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(ok, _mm512_scalef_ps(q, n));
}
#define CVQ_SIMD_NAME(x) x##_avx512

#elif defined(CVQ_SIMD_AVX2)
#include <immintrin.h>
#define VW 8
typedef __m256 vf;
static inline vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void vf_store(float *p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf vf_set1(float x) { return _mm256_set1_ps(x); }
static inline vf vf_zero(void) { return _mm256_setzero_ps(); }
static inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vf_sqrt(vf a) { return _mm256_sqrt_ps(a); }
static inline vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vf_min(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vf_swap_pairs(vf a) { return _mm256_permute_ps(a, 0xB1); }

static inline vf vf_round(vf a) {
    return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

static inline float vf_hsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
static inline uint32_t vf_ngt_bits(vf a, vf b) {
    return (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_NGT_UQ));
}
static inline float vf_hmin(vf a) {
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}
static inline void vf_keep_less(vf *best, vf *idx, vf d, vf k) {
    const vf m = _mm256_cmp_ps(d, *best, _CMP_LT_OQ);
    *best = _mm256_blendv_ps(*best, d, m);
    *idx = _mm256_blendv_ps(*idx, k, m);
}
static inline vf vf_exp_attn(vf x) {
    const vf ok = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
    const vf n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
    vf q = _mm256_set1_ps(1.0f / 5040.0f);
    q = _mm256_add_ps(_mm256_mul_ps(q, r), _mm256_set1_ps(1.0f / 720.0f));
    q = _mm256_add_ps(_mm256_mul_ps(q, r), _mm256_set1_ps(1.0f / 120.0f));
    q = _mm256_add_ps(_mm256_mul_ps(q, r), _mm256_set1_ps(1.0f / 24.0f));
    q = _mm256_add_ps(_mm256_mul_ps(q, r), _mm256_set1_ps(1.0f / 6.0f));
    q = _mm256_add_ps(_mm256_mul_ps(q, r), _mm256_set1_ps(0.5f));
    q = _mm256_add_ps(_mm256_mul_ps(q, r), _mm256_set1_ps(1.0f));
    q = _mm256_add_ps(_mm256_mul_ps(q, r), _mm256_set1_ps(1.0f));
    /* 2^n from the exponent field: n is in [-126, 127] after the clamps */
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(ok, _mm256_mul_ps(q, _mm256_castsi256_ps(e)));
}
#define CVQ_SIMD_NAME(x) x##_avx2

#else
/* Portable: four lanes in a struct; plain C operations, one per lane. */
#define VW 4
typedef struct vf {
    float v[4];
} vf;
static inline vf vf_load(const float *p) {
    vf r;
    for (int i = 0; i < 4; i++) r.v[i] = p[i];
    return r;
}
static inline void vf_store(float *p, vf a) {
    for (int i = 0; i < 4; i++) p[i] = a.v[i];
}
static inline vf vf_set1(float x) {
    vf r;
    for (int i = 0; i < 4; i++) r.v[i] = x;
    return r;
}
static inline vf vf_zero(void) { return vf_set1(0.0f); }
#define CVQ_PORT_OP(name, expr)                        \
    static inline vf name(vf a, vf b) {                \
        vf r;                                          \
        for (int i = 0; i < 4; i++) r.v[i] = (expr);   \
        return r;                                      \
    }
CVQ_PORT_OP(vf_add, a.v[i] + b.v[i])
CVQ_PORT_OP(vf_sub, a.v[i] - b.v[i])
CVQ_PORT_OP(vf_mul, a.v[i] * b.v[i])
CVQ_PORT_OP(vf_div, a.v[i] / b.v[i])
CVQ_PORT_OP(vf_max, a.v[i] > b.v[i] ? a.v[i] : b.v[i])
CVQ_PORT_OP(vf_min, a.v[i] < b.v[i] ? a.v[i] : b.v[i])
#undef CVQ_PORT_OP
static inline vf vf_sqrt(vf a) {
    vf r;
    for (int i = 0; i < 4; i++) r.v[i] = sqrtf(a.v[i]);
    return r;
}
static inline vf vf_swap_pairs(vf a) {
    vf r;
    r.v[0] = a.v[1]; r.v[1] = a.v[0]; r.v[2] = a.v[3]; r.v[3] = a.v[2];
    return r;
}
static inline float vf_hsum(vf a) { return (a.v[0] + a.v[1]) + (a.v[2] + a.v[3]); }
static inline vf vf_round(vf a) {
    vf r;
    for (int i = 0; i < 4; i++) r.v[i] = rintf(a.v[i]);
    return r;
}

static inline float vf_hmin(vf a) {
    const float x = a.v[0] < a.v[1] ? a.v[0] : a.v[1], y = a.v[2] < a.v[3] ? a.v[2] : a.v[3];
    return x < y ? x : y;
}
static inline uint32_t vf_ngt_bits(vf a, vf b) {
    uint32_t m = 0;
    for (int i = 0; i < 4; i++) m |= (uint32_t)!(a.v[i] > b.v[i]) << i;
    return m;
}
static inline void vf_keep_less(vf *best, vf *idx, vf d, vf k) {
    for (int i = 0; i < 4; i++)
        if (d.v[i] < best->v[i]) {
            best->v[i] = d.v[i];
            idx->v[i] = k.v[i];
        }
}
static inline vf vf_exp_attn(vf x) {
    vf r;
    for (int i = 0; i < 4; i++) r.v[i] = x.v[i] >= -87.0f ? expf(x.v[i]) : 0.0f;
    return r;
}
#define CVQ_SIMD_NAME(x) x##_portable
#endif

#endif
