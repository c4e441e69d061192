/*
 * The interface between the C host glue (cuda_backend.c, cuda_ops.c,
 * cuda_interop.c) and the kernels (cuda_kernels_*.cu): plain structs of
 * device pointers and sizes, and launch functions that enqueue kernels on a
 * stream and return the first CUDA error (cudaSuccess = 0). Launchers never
 * synchronize.
 *
 * Status words (device memory, uint32 [2]): word 0 belongs to the call being
 * enqueued (the launcher clears it first with cudaMemsetAsync), word 1
 * accumulates every call's word 0 until the host collects it. A check kernel
 * runs first over the whole input and sets bits in word 0; the kernels that
 * write outputs return at once when word 0 is nonzero, so a call with bad
 * input writes nothing at all.
 */
#ifndef CVQ_CUDA_LAUNCH_H
#define CVQ_CUDA_LAUNCH_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "cuda_types.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Bits of the status words. */
#define CVQ_CU_ST_NONFINITE 1u  /* NaN/Inf in an input (keys, values, queries) */
#define CVQ_CU_ST_RANGE 2u      /* a sum of squares overflowed to +Inf */

typedef struct cvq_cu_encode_keys {
    const float *keys;   /* [n][Hkv][d] */
    uint16_t *codes;     /* [n][Hkv][R] */
    float *scales;       /* [n][ns] */
    size_t n;
} cvq_cu_encode_keys;

typedef struct cvq_cu_encode_values {
    const float *values; /* [n][Hkv*d] */
    uint8_t *bits;       /* [n][groups][Nc/8] */
    float *sigma;        /* [n][groups] */
    size_t n;
    float *scratch;      /* cvq_cu_values_scratch_bytes(), or NULL when it is 0 */
} cvq_cu_encode_values;

/* status[1] |= status[0] on the stream (after a call's check kernel). */
int cvq_cu_launch_fold(uint32_t *status, cudaStream_t s);

/* Work split of the encoders: blocks in x (tokens are grid-strided). */
#define CVQ_CU_ENC_MAX_BLOCKS 4096u

/* Dynamic shared memory and global scratch the value encoder needs for a
 * geometry, given the largest dynamic shared memory per block. */
void cvq_cu_values_plan(const cvq_cu_geom *g, size_t smem_max, size_t *smem, size_t *scratch_bytes);

int cvq_cu_launch_encode_keys(const cvq_cu_geom *g, const cvq_cu_tables *t, const cvq_cu_encode_keys *a,
                              uint32_t *status, cudaStream_t s);
int cvq_cu_launch_encode_values(const cvq_cu_geom *g, const cvq_cu_tables *t, const cvq_cu_encode_values *a,
                                size_t smem_max, uint32_t *status, cudaStream_t s);

/* Attention over [sinks | compressed | window] (cvq_attend_args / the
 * record layout of docs/format.md). */
typedef struct cvq_cu_attend {
    size_t n_q;
    const float *q;          /* [n_q][Hq][d] */
    const int32_t *q_pos;    /* [n_q] */
    int q_rotated;
    float *out;              /* [n_q][Hq][d] */
    size_t n_sink, n_comp, n_win;
    const float *sink_k, *sink_v;   /* [n][Hkv][d] */
    const int32_t *sink_pos;
    const uint8_t *comp_codes;      /* [n][key_code_bytes] */
    const float *comp_kscale;       /* [n][ns] */
    const uint8_t *comp_vbits;      /* [n][value_bit_bytes] */
    const float *comp_vsigma;       /* [n][groups] */
    const int32_t *comp_pos;
    const float *win_k, *win_v;
    const int32_t *win_pos;
    float *scratch;                 /* plan.scratch_bytes */
} cvq_cu_attend;

/* The attention plan: tokens per tile, query heads per block, splits. */
typedef struct cvq_cu_attend_plan {
    uint32_t tile;        /* tokens per tile (TT) */
    uint32_t qg;          /* query heads per block (<= CVQ_CU_QG_MAX) */
    uint32_t n_hchunk;    /* head chunks per KV head */
    uint32_t n_split;     /* token ranges (split-K) */
    uint32_t split_len;   /* tokens per range */
    size_t smem;          /* dynamic shared memory of the split kernel */
    size_t smem_reduce;   /* of the reduction kernel */
    size_t scratch_bytes; /* partial results */
} cvq_cu_attend_plan;
#define CVQ_CU_QG_MAX 8u

/* Returns 0 and fills *p, or nonzero when no plan fits smem_max (then *why
 * names the limit). n_sm: multiprocessors, for the split count; tile: the
 * preferred tokens per tile (0: 64 at d <= 128, else 32; a power of two
 * 16..256), lowered until the shared memory fits. */
int cvq_cu_attend_plan_make(const cvq_cu_geom *g, size_t n_q, size_t n_tok, size_t smem_max, uint32_t n_sm,
                            uint32_t tile, cvq_cu_attend_plan *p, const char **why);
int cvq_cu_launch_attend(const cvq_cu_geom *g, const cvq_cu_tables *t, const cvq_cu_attend *a,
                         const cvq_cu_attend_plan *p, uint32_t *status, cudaStream_t s);

#ifdef __cplusplus
}
#endif
#endif
