/*
 * Types shared by the CUDA kernels, the host glue and the tests (no CUDA
 * headers needed): the geometry as the kernels see it and one layer's
 * device tables; and the host builds of the kernels' numerics
 * (cuda_numerics_host.cu) that tests/test_cuda.c compares with the C
 * library. In a build without CUDA, cuda_absent.c provides the hooks and
 * cvq_cuda_host_numerics_built() returns 0.
 */
#ifndef CVQ_CUDA_TYPES_H
#define CVQ_CUDA_TYPES_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Device copies of one layer's tables (numerics.md section 3), packed. */
typedef struct cvq_cu_tables {
    const float *key_w;      /* [Hkv][R][64][P][2] */
    const float *key_n;      /* [Hkv][R][64] */
    const float *key_G;      /* [Hkv][R][64][64] */
    const uint64_t *rope_t;  /* [P] */
    const float *inv_ls;     /* [groups][F] */
    const float *ls_eps;     /* [groups][F] */
    const float *ln_w, *ln_b;/* [groups][F] */
    const float *w1, *b1;    /* [groups][I][F], [groups][I] */
    const float *w2, *b2;    /* [groups][2Nc][I], [groups][2Nc] */
    const float *E;          /* [groups][Nc][F] */
} cvq_cu_tables;

/* Geometry as the kernels see it. */
typedef struct cvq_cu_geom {
    uint32_t Hq, Hkv, d, P, R;
    uint32_t layout;     /* 0 rotate_half, 1 interleaved */
    uint32_t scale_mode; /* 0 token, 1 head */
    uint32_t F, Nc, I, groups;
    float inv_F;
    float logit_scale;
    uint32_t key_code_bytes, value_bit_bytes; /* per record (docs/format.md) */
} cvq_cu_geom;

/* 1 when the library was built with the CUDA backend (these hooks are the
 * nvcc-compiled steps), 0 in a build without it (stubs). */
int cvq_cuda_host_numerics_built(void);
/* Host builds of the device numerics (cuda_numerics_host.cu), for
 * tests/test_cuda.c: the same __host__ __device__ steps the kernels use. */
void cvq_cuda_host_sincos_turn(uint32_t turn, float *c, float *s);
uint32_t cvq_cuda_host_phase_hi(uint64_t t, int32_t pos);
float cvq_cuda_host_erf(float x);
float cvq_cuda_host_gelu(float x);
/* One key token, emulating the kernel's thread split (block of `threads`
 * threads: sub-code per thread, strided argmin scans merged by key then
 * index). Tables as cvq_cu_tables (one layer, host memory). */
void cvq_cuda_host_encode_key_token(const cvq_cu_geom *g, const float *key_w, const float *key_n,
                                    const float *key_G, const float *k, uint32_t threads,
                                    uint16_t *codes, float *scales);
/* One value token (all groups), emulating the kernel's steps. scratch:
 * F + I floats; bits [groups][Nc/8]. */
void cvq_cuda_host_encode_value_token(const cvq_cu_geom *g, const cvq_cu_tables *host_tables,
                                      const float *v, float *scratch, uint8_t *bits, float *sigma);

/* The single steps of cuda_numerics.cuh (host builds), for tests that
 * compare each one with the contract's text (docs/numerics.md). */
void cvq_cuda_host_subcode_fg(const float *w, const float *z, uint32_t P, uint32_t layout, float na, float *f,
                              float *g);
float cvq_cuda_host_dist(const float *f, const float *g, const float *G, uint32_t k);
void cvq_cuda_host_residual(const float *wA, const float *wB, float *z, uint32_t P, uint32_t layout);
float cvq_cuda_host_sum_squares(const float *x, uint32_t n);
float cvq_cuda_host_value_ss(const float *v, const float *inv_ls, uint32_t F);
void cvq_cuda_host_ln_stats(const float *x, uint32_t F, float inv_F, float *mean, float *rstd);
float cvq_cuda_host_ln_apply(float x, float mean, float rstd, float w, float b);
float cvq_cuda_host_linear(const float *wrow, const float *x, uint32_t n, float bias);
uint32_t cvq_cuda_host_argmax4_bits(float o0, float o1, float o2, float o3);
float cvq_cuda_host_code_vector(const uint8_t *bits, const float *Ecol, uint32_t Nc, uint32_t F);
float cvq_cuda_host_sigma(const float *u, uint32_t F, float pre);
void cvq_cuda_host_rotate(float *re, float *im, float c, float s);

#ifdef __cplusplus
}
#endif
#endif
