/*
 * CPU reference: value encoding and decoding (numerics contract section 4,
 * method note section 4). Plain loops, one token at a time, no threads.
 *
 * Index names:
 *   gi  value group (0..groups-1): dims gi*F .. gi*F+F-1 of the token's
 *       Hkv*d values; every group has its own encoder and codebook E
 *   j, f  feature within a group (0..F-1)
 *   o   output of a Linear layer, i  its input
 *   t   4-way logit group (0..Nc/2-1) giving bits (2t, 2t+1)
 *   b   value code bit (0..Nc-1)
 * Tensors of group gi are at base + gi * (group stride) in the layer view.
 */
#include "reference.h"
#include "numerics.h"

#include <math.h>
#include <string.h>

size_t cvq_ref_value_scratch(const cvq_layer_view *lv) {
    const cvq_geometry *g = lv->g;
    /* x/y/u: F, hidden: I, logits: 2*Nc */
    return (size_t)g->value_group_width + g->value_hidden + 2u * (size_t)g->value_bits;
}

bool cvq_ref_value_check(const cvq_layer_view *lv, const float *v) {
    const uint32_t F = lv->g->value_group_width;
    for (uint32_t gi = 0; gi < lv->n_groups; gi++) {
        const float *vg = v + (size_t)gi * F;
        const float *inv_ls = lv->val_inv_ls + gi * lv->s_vec;
        float ss = 0.0f;
        for (uint32_t j = 0; j < F; j++) {
            const float x = vg[j] * inv_ls[j]; /* same product as the encoder */
            ss = ss + x * x;
        }
        if (ss == INFINITY) {
            return false;
        }
    }
    return true;
}

/* out[o] = (sum_i W[o][i] * x[i], ascending i, from +0) + b[o]. */
static void linear(const float *W, const float *b, const float *x, uint32_t n_in,
                   uint32_t n_out, float *out) {
    for (uint32_t o = 0; o < n_out; o++) {
        const float *Wo = W + (size_t)o * n_in;
        float acc = 0.0f;
        for (uint32_t i = 0; i < n_in; i++) {
            acc = acc + Wo[i] * x[i];
        }
        out[o] = acc + b[o];
    }
}

/* u[f] = sum over set bits b (ascending) of E[b][f]; E is [Nc][F]. The loop
 * runs b outside, f inside: each u[f] still sees its terms in ascending b. */
static void bits_times_E(const uint8_t *bits, const float *E, uint32_t Nc,
                         uint32_t F, float *u) {
    for (uint32_t f = 0; f < F; f++) {
        u[f] = 0.0f;
    }
    for (uint32_t b = 0; b < Nc; b++) {
        if ((bits[b / 8] >> (b % 8)) & 1u) {
            const float *Eb = E + (size_t)b * F;
            for (uint32_t f = 0; f < F; f++) {
                u[f] = u[f] + Eb[f];
            }
        }
    }
}

void cvq_ref_encode_value_token(const cvq_layer_view *lv, const float *v,
                                uint8_t *bits, float *sigma, float *scratch) {
    const cvq_geometry *g = lv->g;
    const uint32_t F = g->value_group_width, I = g->value_hidden, Nc = g->value_bits;
    float *x = scratch;          /* [F]: features, then LayerNorm output, then u */
    float *hid = x + F;          /* [I]: gelu(Linear1(y)) */
    float *logit = hid + I;      /* [2*Nc]: Linear2 output */

    for (uint32_t gi = 0; gi < lv->n_groups; gi++) {
        const float *vg = v + (size_t)gi * F;
        const float *inv_ls = lv->val_inv_ls + gi * lv->s_vec;
        const float *ln_w = lv->ln_w + gi * lv->s_vec;
        const float *ln_b = lv->ln_b + gi * lv->s_vec;
        const float *w1 = lv->w1 + gi * lv->s_w1, *b1 = lv->b1 + gi * lv->s_b1;
        const float *w2 = lv->w2 + gi * lv->s_w2, *b2 = lv->b2 + gi * lv->s_b2;
        const float *E = lv->E + gi * lv->s_E;
        uint8_t *bg = bits + (size_t)gi * (Nc / 8);

        /* 1. x = v / (ls + eps), as a multiply by the host's reciprocal */
        for (uint32_t j = 0; j < F; j++) {
            x[j] = vg[j] * inv_ls[j];
        }
        /* 2. pre = ||x||; x = x * (1 / (pre + eps)) */
        float ss = 0.0f;
        for (uint32_t j = 0; j < F; j++) {
            ss = ss + x[j] * x[j];
        }
        const float pre = sqrtf(ss);
        const float rp = 1.0f / (pre + CVQ_VAL_EPS);
        for (uint32_t j = 0; j < F; j++) {
            x[j] = x[j] * rp;
        }
        /* 3. LayerNorm, two passes, biased variance; x[j] - mean is rounded
         * once and used for both the variance and the output. */
        float sum = 0.0f;
        for (uint32_t j = 0; j < F; j++) {
            sum = sum + x[j];
        }
        const float mean = sum * lv->inv_F;
        float acc = 0.0f;
        for (uint32_t j = 0; j < F; j++) {
            const float dj = x[j] - mean;
            acc = acc + dj * dj;
        }
        const float var = acc * lv->inv_F;
        const float rstd = 1.0f / sqrtf(var + CVQ_LN_EPS);
        for (uint32_t j = 0; j < F; j++) {
            x[j] = ((x[j] - mean) * rstd) * ln_w[j] + ln_b[j];
        }
        /* 4. hid = gelu(W1 y + b1); logit = W2 hid + b2 */
        linear(w1, b1, x, F, I, hid);
        for (uint32_t o = 0; o < I; o++) {
            hid[o] = cvq_gelu_f32(hid[o]);
        }
        linear(w2, b2, hid, I, 2u * Nc, logit);
        /* 5. argmax of each 4-way group (strict >: lowest index wins ties),
         * j -> bits (b_2t, b_2t+1): 0 -> (1,0), 1 -> (0,1), 2 -> (1,1),
         * 3 -> (0,0). Bit b lives in byte b/8 at position b%8. */
        static const uint8_t bit_lo[4] = {1, 0, 1, 0};
        static const uint8_t bit_hi[4] = {0, 1, 1, 0};
        memset(bg, 0, Nc / 8);
        for (uint32_t t = 0; t < Nc / 2; t++) {
            const float *o4 = logit + 4 * (size_t)t;
            uint32_t jbest = 0;
            float best = o4[0];
            for (uint32_t c = 1; c < 4; c++) {
                if (o4[c] > best) {
                    best = o4[c];
                    jbest = c;
                }
            }
            const uint32_t b0 = 2 * t, b1i = 2 * t + 1;
            bg[b0 / 8] = (uint8_t)(bg[b0 / 8] | (bit_lo[jbest] << (b0 % 8)));
            bg[b1i / 8] = (uint8_t)(bg[b1i / 8] | (bit_hi[jbest] << (b1i % 8)));
        }
        /* 6. u = bits @ E; sigma = (pre + eps) / (||u|| + eps) */
        float *u = x;
        bits_times_E(bg, E, Nc, F, u);
        float nu2 = 0.0f;
        for (uint32_t f = 0; f < F; f++) {
            nu2 = nu2 + u[f] * u[f];
        }
        const float nu = sqrtf(nu2);
        sigma[gi] = (pre + CVQ_VAL_EPS) / (nu + CVQ_VAL_EPS);
    }
}

void cvq_ref_decode_value_token(const cvq_layer_view *lv, const uint8_t *bits,
                                const float *sigma, float *v, float *scratch) {
    const cvq_geometry *g = lv->g;
    const uint32_t F = g->value_group_width, Nc = g->value_bits;
    float *u = scratch; /* [F] */
    for (uint32_t gi = 0; gi < lv->n_groups; gi++) {
        const float *E = lv->E + gi * lv->s_E;
        const float *ls_eps = lv->val_ls_eps + gi * lv->s_vec;
        float *vg = v + (size_t)gi * F;
        bits_times_E(bits + (size_t)gi * (Nc / 8), E, Nc, F, u);
        for (uint32_t f = 0; f < F; f++) {
            vg[f] = (sigma[gi] * u[f]) * ls_eps[f];
        }
    }
}
