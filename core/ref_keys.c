/*
 * CPU reference: key encoding and decoding (numerics contract sections 2-3,
 * method note section 2). Plain loops, one token at a time, no threads: these
 * functions define the key code bits every backend must reproduce.
 *
 * Index names used throughout:
 *   h  KV head (0..Hkv-1)          r  key stage (0..R-1)
 *   a  sub-code (0..63)            p  RoPE pair of a head (0..P-1, P = d/2)
 *   A, B  the two halves of a code k = 64*A + B
 * A head vector holds pair p at indices (re, im) = cvq__pair_index(layout, d, p).
 * Sub-codes are stored w[a][p][2] = (x, y) for w = x + i*y.
 */
#include "reference.h"

#include <math.h>
#include <string.h>

/* Sum of squares in ascending index order, starting from +0.0f. */
static float sum_squares(const float *x, uint32_t n) {
    float ss = 0.0f;
    for (uint32_t i = 0; i < n; i++) {
        ss = ss + x[i] * x[i];
    }
    return ss;
}

bool cvq_ref_key_scales(const cvq_layer_view *lv, const float *k, float *scales) {
    const cvq_geometry *g = lv->g;
    const uint32_t d = g->head_dim;
    if (g->key_scale == CVQ_KEY_SCALE_TOKEN) {
        /* one span: all Hkv*d dims of the token, index h*d + i ascending */
        float ss = sum_squares(k, g->n_kv_heads * d);
        if (ss == INFINITY) {
            return false;
        }
        scales[0] = sqrtf(ss);
    } else {
        /* one span per KV head h: dims h*d .. h*d+d-1 */
        for (uint32_t h = 0; h < g->n_kv_heads; h++) {
            float ss = sum_squares(k + (size_t)h * d, d);
            if (ss == INFINITY) {
                return false;
            }
            scales[h] = sqrtf(ss);
        }
    }
    return true;
}

uint16_t cvq_ref_key_stage(const float *w, const float *n, const float *G,
                           uint32_t d, cvq_pair_layout layout, float *z) {
    const uint32_t P = d / 2;
    float f[CVQ_SUBCODES]; /* f[a] = n_a - 2*Re<w_a, z> */
    float gg[CVQ_SUBCODES]; /* g[a] = n_a - 2*Im<w_a, z> */

    /* zp[2p], zp[2p+1] = (re, im) of pair p of z, gathered once
     * (head_dim <= 256, so P <= 128) */
    float zp[256];
    for (uint32_t p = 0; p < P; p++) {
        uint32_t ire, iim;
        cvq__pair_index(layout, d, p, &ire, &iim);
        zp[2 * p] = z[ire];
        zp[2 * p + 1] = z[iim];
    }

    /* One complex dot product <w_a, z> = sum_p conj(w_a,p) * z_p per
     * sub-code gives both f and g (method note 2.4). */
    for (uint32_t a = 0; a < CVQ_SUBCODES; a++) {
        const float *wa = w + (size_t)a * P * 2; /* wa[2p], wa[2p+1] = (x, y) */
        float dr = 0.0f, di = 0.0f;
        for (uint32_t p = 0; p < P; p++) {
            const float wx = wa[2 * p], wy = wa[2 * p + 1];
            const float zr = zp[2 * p], zi = zp[2 * p + 1];
            dr = dr + (wx * zr + wy * zi); /* Re(conj(w) z) */
            di = di + (wx * zi - wy * zr); /* Im(conj(w) z) */
        }
        f[a] = n[a] - 2.0f * dr;
        gg[a] = n[a] - 2.0f * di;
    }

    /* ||z - c(A,B)||^2 - ||z||^2 = (f[A] + g[B]) + G[A][B]; scan codes
     * k = 64*A + B in ascending order, replace only on strict <, so the
     * lowest index wins a tie and a NaN distance never wins. */
    float best = INFINITY;
    uint32_t A_best = 0, B_best = 0;
    for (uint32_t A = 0; A < CVQ_SUBCODES; A++) {
        const float *GA = G + (size_t)A * CVQ_SUBCODES; /* row G[A][.] */
        for (uint32_t B = 0; B < CVQ_SUBCODES; B++) {
            const float dist = (f[A] + gg[B]) + GA[B];
            if (dist < best) {
                best = dist;
                A_best = A;
                B_best = B;
            }
        }
    }

    /* Residual: z_p <- z_p - c_p(A,B), c_p = w_A,p + i*w_B,p, i.e. in real
     * components (x_A - y_B, y_A + x_B), each component rounded before the
     * subtraction. */
    const float *wA = w + (size_t)A_best * P * 2;
    const float *wB = w + (size_t)B_best * P * 2;
    for (uint32_t p = 0; p < P; p++) {
        uint32_t ire, iim;
        cvq__pair_index(layout, d, p, &ire, &iim);
        const float cre = wA[2 * p] - wB[2 * p + 1];
        const float cim = wA[2 * p + 1] + wB[2 * p];
        z[ire] = z[ire] - cre;
        z[iim] = z[iim] - cim;
    }
    return (uint16_t)(A_best * CVQ_SUBCODES + B_best);
}

/* The tables of (KV head h, stage r) within the layer view. */
static void stage_tables(const cvq_layer_view *lv, uint32_t h, uint32_t r,
                         const float **w, const float **n, const float **G) {
    const uint32_t R = lv->g->key_stages;
    const size_t hr = (size_t)h * R + r;
    *w = lv->key_w + hr * CVQ_SUBCODES * lv->P * 2;
    *n = lv->key_n + hr * CVQ_SUBCODES;
    *G = lv->key_G + hr * CVQ_SUBCODES * CVQ_SUBCODES;
}

void cvq_ref_encode_key_token(const cvq_layer_view *lv, const float *k,
                              uint16_t *codes, float *scales) {
    const cvq_geometry *g = lv->g;
    const uint32_t d = g->head_dim, R = g->key_stages;
    const bool per_head = g->key_scale == CVQ_KEY_SCALE_HEAD;
    float z[256]; /* residual of one head, head layout; d <= 256 */

    (void)cvq_ref_key_scales(lv, k, scales); /* the core checked overflow */

    for (uint32_t h = 0; h < g->n_kv_heads; h++) {
        const float s = per_head ? scales[h] : scales[0];
        uint16_t *ch = codes + (size_t)h * R; /* codes[h][r] */
        if (s == 0.0f) {
            /* zero span (or every square underflowed): codes 0 */
            for (uint32_t r = 0; r < R; r++) {
                ch[r] = 0;
            }
            continue;
        }
        /* x = k * (1/s): the reciprocal correctly rounded, then a multiply */
        const float inv = 1.0f / s;
        const float *kh = k + (size_t)h * d;
        for (uint32_t i = 0; i < d; i++) {
            z[i] = kh[i] * inv;
        }
        for (uint32_t r = 0; r < R; r++) {
            const float *w, *n, *G;
            stage_tables(lv, h, r, &w, &n, &G);
            ch[r] = cvq_ref_key_stage(w, n, G, d, g->pair_layout, z);
        }
    }
}

void cvq_ref_decode_key_token(const cvq_layer_view *lv, const uint16_t *codes,
                              const float *scales, float *k) {
    const cvq_geometry *g = lv->g;
    const uint32_t d = g->head_dim, R = g->key_stages, P = lv->P;
    const bool per_head = g->key_scale == CVQ_KEY_SCALE_HEAD;

    for (uint32_t h = 0; h < g->n_kv_heads; h++) {
        const float s = per_head ? scales[h] : scales[0];
        float *kh = k + (size_t)h * d;
        for (uint32_t p = 0; p < P; p++) {
            /* sum over stages (ascending) of c_p(A_r, B_r), then one scale */
            float re = 0.0f, im = 0.0f;
            for (uint32_t r = 0; r < R; r++) {
                const float *w, *n, *G;
                stage_tables(lv, h, r, &w, &n, &G);
                /* codes are < 4096 (the core rejects others); the mask
                 * only keeps a bad code from reading past the tables */
                const uint32_t code = codes[(size_t)h * R + r] & 0xFFFu;
                const float *wA = w + (size_t)(code / CVQ_SUBCODES) * P * 2;
                const float *wB = w + (size_t)(code % CVQ_SUBCODES) * P * 2;
                re = re + (wA[2 * p] - wB[2 * p + 1]);
                im = im + (wA[2 * p + 1] + wB[2 * p]);
            }
            uint32_t ire, iim;
            cvq__pair_index(g->pair_layout, d, p, &ire, &iim);
            kh[ire] = s * re;
            kh[iim] = s * im;
        }
    }
}
