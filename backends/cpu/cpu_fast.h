/*
 * The CPU fast path (internal to backends/cpu): SIMD kernels that keep the
 * reference's code bits, one copy per instruction set, chosen at run time.
 *
 * Exactness: every kernel vectorises ACROSS independent sums (tokens,
 * sub-codes a, Linear outputs o, features f) and never inside one, so each
 * lane performs exactly the reference's sequence of binary32 operations
 * (docs/numerics.md section 9.4). The key argmin takes the lexicographic
 * minimum of (distance, code) of numerics.md section 8 per token, skipping
 * only rows that a monotone lower bound proves cannot hold it.
 *
 * Instruction sets: AVX-512 (F), AVX2, and a portable C fallback. The
 * choice is the best one the CPU supports, unless the environment variable
 * COMMVQ_CPU_ISA (avx512 | avx2 | portable) caps it (used by the memcheck
 * tests: valgrind 3.19 cannot run AVX-512), or a test forces one with
 * cvq_cpu_isa_force() (within that cap).
 */
#ifndef CVQ_CPU_FAST_H
#define CVQ_CPU_FAST_H

#include "cvq_internal.h"

typedef enum cvq_cpu_isa {
    CVQ_CPU_ISA_PORTABLE = 0,
    CVQ_CPU_ISA_AVX2 = 1,
    CVQ_CPU_ISA_AVX512 = 2,
    CVQ_CPU_ISA_COUNT
} cvq_cpu_isa;

/* Largest padded number of query heads per value group the fast attention
 * handles (more: the reference kernel runs). */
#define CVQ_ATTN_MAX_NHP 256u
/* Tokens per block of attn_logits (see cpu_kernels_impl.h). */
#define CVQ_ATTN_TB 256

/* Precomputed state of one attention query (see cpu_attend.c): the query
 * heads in pair form, positions and tables. Index names as in
 * core/ref_attention.c. */
typedef struct cvq_attn_job {
    const cvq_layer_view *lv;
    const float *qpair;        /* [Hq][d]: (q'x_p, q'y_p) interleaved, p asc */
    int32_t qpos;
    const uint8_t *codes;      /* [n_comp][code_bytes] */
    const float *kscale;       /* [n_comp][ns] */
    const int32_t *pos;        /* [n_comp] */
    const uint8_t *vbits;      /* [n_comp][groups][Nc/8] */
    const float *vsigma;       /* [n_comp][groups] */
    size_t code_bytes, vbytes;
    uint32_t nhp;              /* query heads per value group, padded to 16,
                                  at most CVQ_ATTN_MAX_NHP */
} cvq_attn_job;

/* One instruction set's kernels. */
typedef struct cvq_cpu_kernels {
    cvq_cpu_isa isa;
    const char *name;
    uint32_t lanes;            /* tokens per key work item (KEY_SUB vectors) */
    uint32_t vlanes;           /* tokens per value batch (two vectors) */
    /* Keys of tokens t0 .. t0+nb-1 (nb <= lanes), KV head h: the residual
     * stages of numerics.md 2.2 -> codes [n][Hkv][R]. Scales [n][ns] are
     * already computed (cvq_ref_key_scales). */
    void (*key_head_batch)(const cvq_layer_view *lv, uint32_t h, const float *keys,
                           const float *scales, size_t t0, uint32_t nb, uint16_t *codes);
    /* Values of tokens t0 .. t0+nb-1 (nb <= vlanes), every group -> bits, sigma.
     * scratch: cvq_cpu_value_scratch(lv) floats. */
    void (*value_batch)(const cvq_layer_view *lv, const float *values, size_t t0,
                        uint32_t nb, uint8_t *bits, float *sigma, float *scratch);
    /* Attention, compressed segment: logits lg[t - t0][h] (row stride
     * Hq + 16), scaled by s*lambda; tokens after the query get -INFINITY.
     * csn: scratch of CVQ_ATTN_TB * 2 * d floats (the block's cos/sin). */
    void (*attn_logits)(const cvq_attn_job *job, size_t t0, size_t t1, float *lg, float *csn);
    /* Softmax weights and code-space value sums of tokens [t0, t1) for value
     * group gi, whose query heads are [hb, hb + nh): p = exp(lg - mxg)
     * (mxg [nhp]: the heads' maxima, +Inf in padding lanes), deng[:] += p,
     * accg[j][x][:] += p * sigma[t][gi] for each nibble j of the group's
     * bits holding value x (accg [Nc/4][16][nhp]). */
    void (*attn_values)(const cvq_attn_job *job, size_t t0, size_t t1, const float *lg,
                        size_t gi, uint32_t hb, const float *mxg, float *accg, float *deng);
    /* Attention, once per step: per-bit sums of group accg's nibble sums
     * (bitsum [Nc][nhp] scratch; kept when have_bitsum), then res[hh -
     * hh0][f] = sum_b bitsum[b][hh] * E[b][c0 + f] for the group's heads
     * hh0 .. hh1-1 (d features). */
    void (*attn_expand)(const float *accg, uint32_t Nc, uint32_t nhp, const float *E, size_t F,
                        size_t c0, uint32_t d, uint32_t hh0, uint32_t hh1, int have_bitsum,
                        float *bitsum, float *res);
    /* The key argmin of one stage for one vector of argmin_lanes tokens
     * (exposed for tests): kbest[l] = the reference's code for lane l, i.e.
     * the ascending scan over k = 64*A + B of (fT[A][l] + gT[B][l]) + G[A][B]
     * with strict <. fT, gT: [64][argmin_lanes]; G: [64][64]. */
    uint32_t argmin_lanes;
    void (*key_argmin)(const float *fT, const float *gT, const float *G, uint32_t *kbest);
} cvq_cpu_kernels;

/* Each returns NULL when that set was not compiled in (other compiler or
 * architecture). */
const cvq_cpu_kernels *cvq_cpu_kernels_avx512(void);
const cvq_cpu_kernels *cvq_cpu_kernels_avx2(void);
const cvq_cpu_kernels *cvq_cpu_kernels_portable(void);

/* True when the set is compiled in, this CPU (and OS) can run it and
 * COMMVQ_CPU_ISA does not cap it. */
bool cvq_cpu_isa_available(cvq_cpu_isa isa);
/* The kernels in use: the forced set, else COMMVQ_CPU_ISA, else the best. */
const cvq_cpu_kernels *cvq_cpu_kernels_get(void);
/* Tests: force a set (returns false, changing nothing, if it is not
 * available); CVQ_CPU_ISA_COUNT goes back to the automatic choice. Not
 * meant to be called while another thread encodes. */
bool cvq_cpu_isa_force(cvq_cpu_isa isa);
const char *cvq_cpu_isa_name(cvq_cpu_isa isa);

/* Floats of value scratch per thread for value_batch (any set). */
size_t cvq_cpu_value_scratch(const cvq_layer_view *lv);

/* The fast kernels' drivers (threads, batching): cpu_fast.c. */
cvq_status cvq_cpu_fast_encode_keys(cvq_context *ctx, const cvq_layer_view *lv, size_t n,
                                    const float *keys, uint16_t *codes, float *scales,
                                    int n_threads);
cvq_status cvq_cpu_fast_encode_values(cvq_context *ctx, const cvq_layer_view *lv, size_t n,
                                      const float *values, uint8_t *bits, float *sigma,
                                      int n_threads);

/* Host arrays of one attention call: cvq_attend_host (core/reference.h). */
struct cvq_attend_host;
cvq_status cvq_cpu_fast_attend(cvq_context *ctx, const cvq_layer_view *lv,
                               const struct cvq_attend_host *a, int n_threads);

#endif
