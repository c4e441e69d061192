/*
 * The CPU reference kernels: plain loops that follow docs/numerics.md and
 * the method note line by line. They define the code bits; every backend
 * is checked against them. They live in the core (not in backends/cpu) so
 * that tests, benchmarks and other backends can call them.
 *
 * Inputs here are already validated by the core (finite, no overflow,
 * shapes right); these functions cannot fail except where they return a
 * status.
 */
#ifndef CVQ_REFERENCE_H
#define CVQ_REFERENCE_H

#include "cvq_internal.h"

/* ---- keys ---------------------------------------------------------------- */

/* Prescale of one token: sum of squares in ascending index order over the
 * scale's span (all Hkv*d dims, or one head), s = sqrt(ss). Writes scales
 * [ns]. Returns false if a sum of squares overflows to +Inf. */
bool cvq_ref_key_scales(const cvq_layer_view *lv, const float *k, float *scales);

/* One greedy stage on one head: z (d floats, head layout) is the residual,
 * w/n/G the stage's tables ([64][P][2], [64], [64][64]). Returns the code
 * 64*A+B and updates z <- z - c(A,B) in place. */
uint16_t cvq_ref_key_stage(const float *w, const float *n, const float *G,
                           uint32_t d, cvq_pair_layout layout, float *z);

/* Encode one token k [Hkv][d] -> codes [Hkv][R], scales [ns].
 * Precondition: cvq_ref_key_scales succeeded (the core checked). */
void cvq_ref_encode_key_token(const cvq_layer_view *lv, const float *k,
                              uint16_t *codes, float *scales);
/* Decode one token -> k [Hkv][d] (before RoPE). */
void cvq_ref_decode_key_token(const cvq_layer_view *lv, const uint16_t *codes,
                              const float *scales, float *k);

/* ---- values -------------------------------------------------------------- */

/* Scratch floats needed by the value encoder: F + I + 2*Nc. */
size_t cvq_ref_value_scratch(const cvq_layer_view *lv);
/* Returns false if the pre-norm sum of squares of some group overflows
 * (the core checks this before any state changes). */
bool cvq_ref_value_check(const cvq_layer_view *lv, const float *v);
/* Encode one token v [Hkv*d] -> bits [groups][Nc/8], sigma [groups]. */
void cvq_ref_encode_value_token(const cvq_layer_view *lv, const float *v,
                                uint8_t *bits, float *sigma, float *scratch);
/* Decode one token -> v [Hkv*d]. scratch: F floats. */
void cvq_ref_decode_value_token(const cvq_layer_view *lv, const uint8_t *bits,
                                const float *sigma, float *v, float *scratch);

/* ---- attention ------------------------------------------------------------ */

/* Host arrays of one attention call (the core fills it from the cache).
 * Full-precision segments hold keys before RoPE. */
typedef struct cvq_attend_host {
    size_t n_q;
    const float *q;          /* [n_q][Hq][d] */
    const int32_t *q_pos;    /* [n_q] */
    int q_rotated;           /* q already has RoPE at q_pos */
    /* sinks */
    size_t n_sink;
    const float *sink_k, *sink_v;     /* [n_sink][Hkv][d] */
    const int32_t *sink_pos;
    /* compressed records */
    size_t n_comp;
    const uint8_t *comp_codes;        /* [n_comp][key_code_bytes] packed */
    const float *comp_kscale;         /* [n_comp][ns] */
    const uint8_t *comp_vbits;        /* [n_comp][groups][Nc/8] */
    const float *comp_vsigma;         /* [n_comp][groups] */
    const int32_t *comp_pos;
    /* window */
    size_t n_win;
    const float *win_k, *win_v;
    const int32_t *win_pos;
    float *out;                        /* [n_q][Hq][d] */
} cvq_attend_host;

/* Code-domain attention, literal form of the method note (section 3/4):
 * per query head the table Qt[r][a][p] = conj(q'_p) * w[r][a][p], logits
 * from the codes, one softmax over [sinks | compressed | window], values
 * summed in code space then one product with E. */
cvq_status cvq_ref_attend(cvq_context *ctx, const cvq_layer_view *lv,
                          const cvq_attend_host *a);

#endif
