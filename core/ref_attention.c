/*
 * CPU reference: code-domain attention (method note sections 3-4, numerics
 * contract section 6). Plain loops, one (query, query head) at a time, no
 * threads; the result is checked against a double-precision attention over
 * explicitly decoded keys and values (tests/test_conformance.c), within a
 * tolerance: attention is not bit-exact across backends.
 *
 * Index names:
 *   i   query (0..n_q-1)           h   query head (0..Hq-1)
 *   kv  KV head read by h: cvq__kv_of(g, h) = floor(h*Hkv/Hq)
 *   t   cached token of a segment  r   key stage, a sub-code, p RoPE pair
 *   gi  value group holding KV head kv; c0 its first column in the group
 *   b   value code bit (0..Nc-1)    f   output feature of the head (0..d-1)
 * Tokens are scanned as one sequence [sinks | compressed | window]; u
 * (0..n_tok-1) indexes that concatenation.
 *
 * Precision: logits, exponentials and value sums in float; the softmax
 * denominator is accumulated in double (cheap, and it keeps the reference's
 * own error well below the tolerance the conformance test states).
 */
#include "reference.h"
#include "numerics.h"

#include <math.h>
#include <string.h>

/* Code j of a record's packed key codes: bits [12j, 12j+12), little endian
 * (docs/format.md). Two bytes always hold the 12 bits. */
static uint32_t code12_at(const uint8_t *packed, uint32_t j) {
    const size_t bit = (size_t)12 * j;
    const size_t byte = bit >> 3;
    const uint32_t two = (uint32_t)packed[byte] | ((uint32_t)packed[byte + 1] << 8);
    return (two >> (bit & 7u)) & 0xFFFu;
}

/* q' . k' for full-precision pre-RoPE key k (one head), rotated at pos into
 * scratch kr. The dot runs over pairs p ascending: Re(conj(q'_p) * k'_p). */
static float dot_full(const float *qr, const float *k, int32_t pos, uint32_t d,
                      cvq_pair_layout layout, const uint64_t *rope_t, float *kr) {
    memcpy(kr, k, (size_t)d * sizeof(float));
    cvq_rope_apply(kr, d, (int)layout, rope_t, pos);
    float acc = 0.0f;
    for (uint32_t p = 0; p < d / 2; p++) {
        uint32_t ire, iim;
        cvq__pair_index(layout, d, p, &ire, &iim);
        acc = acc + (qr[ire] * kr[ire] + qr[iim] * kr[iim]);
    }
    return acc;
}

/* The arithmetic loops below are out of line (CVQ__NOINLINE) so that the fuzz
 * build can leave them out of coverage (fuzz/coverage-ignore.txt): they have
 * no branch but their counters, and instrumenting them cost most of an API
 * fuzzing execution. */

/* Qt[r][a][p] = conj(q'_p) * w[r][a][p] for one KV head's stages
 * (w = [R][64][P][2]): (qx - i qy)(wx + i wy) = (qx wx + qy wy) + i (qx wy - qy wx). */
static CVQ__NOINLINE void query_tables(const float *wkv, uint32_t R, uint32_t d,
                                       cvq_pair_layout layout, const float *qr, float *qpair,
                                       float *Qt) {
    const uint32_t P = d / 2;
    /* qpair[2p], qpair[2p+1] = (qx, qy) of pair p, gathered once (scratch
     * of d floats) instead of once per sub-code */
    for (uint32_t p = 0; p < P; p++) {
        uint32_t ire, iim;
        cvq__pair_index(layout, d, p, &ire, &iim);
        qpair[2 * p] = qr[ire];
        qpair[2 * p + 1] = qr[iim];
    }
    for (size_t ra = 0; ra < (size_t)R * CVQ_SUBCODES; ra++) {
        const float *w = wkv + ra * P * 2;
        float *qt = Qt + ra * P * 2;
        for (uint32_t p = 0; p < P; p++) {
            const float qx = qpair[2 * p], qy = qpair[2 * p + 1];
            qt[2 * p] = qx * w[2 * p] + qy * w[2 * p + 1];
            qt[2 * p + 1] = qx * w[2 * p + 1] - qy * w[2 * p];
        }
    }
}

/* q' . k'_n of a compressed token (before its key scale), from KV head kv's
 * codes (A_r, B_r), r = 0..R-1, in the packed record:
 * sum_p Re(e^{i theta_p n} * S_p), S_p = sum_r (Qt[r][A_r][p] + i * Qt[r][B_r][p]). */
static CVQ__NOINLINE float code_dot(const float *Qt, const uint8_t *packed, uint32_t kv,
                                    uint32_t R, uint32_t P, const uint64_t *rope_t,
                                    int32_t n) {
    uint32_t cA[32], cB[32];
    for (uint32_t r = 0; r < R; r++) {
        const uint32_t code = code12_at(packed, kv * R + r);
        cA[r] = code / CVQ_SUBCODES;
        cB[r] = code % CVQ_SUBCODES;
    }
    float dot = 0.0f;
    for (uint32_t p = 0; p < P; p++) {
        float sre = 0.0f, sim = 0.0f;
        for (uint32_t r = 0; r < R; r++) {
            const float *qA = Qt + ((size_t)r * CVQ_SUBCODES + cA[r]) * P * 2;
            const float *qB = Qt + ((size_t)r * CVQ_SUBCODES + cB[r]) * P * 2;
            /* i * (x + i y) = -y + i x */
            sre = sre + (qA[2 * p] - qB[2 * p + 1]);
            sim = sim + (qA[2 * p + 1] + qB[2 * p]);
        }
        float c, sn;
        cvq_rope_cos_sin(rope_t[p], n, &c, &sn);
        dot = dot + (c * sre - sn * sim);
    }
    return dot;
}

/* out[f] += (ls+eps)[c0+f] * sum_b acc[b] * E[b][c0+f], f = 0..d-1: the one
 * codebook product of the compressed values (E = [Nc][F] of the group). */
static CVQ__NOINLINE void code_values_out(const float *acc, const float *E,
                                          const float *ls_eps, uint32_t Nc, uint32_t F,
                                          uint32_t c0, uint32_t d, float *out) {
    for (uint32_t f = 0; f < d; f++) {
        float sum = 0.0f;
        for (uint32_t b = 0; b < Nc; b++) {
            sum = sum + acc[b] * E[(size_t)b * F + c0 + f];
        }
        out[f] = out[f] + ls_eps[c0 + f] * sum;
    }
}

cvq_status cvq_ref_attend(cvq_context *ctx, const cvq_layer_view *lv,
                          const cvq_attend_host *a) {
    const cvq_geometry *g = lv->g;
    const uint32_t d = g->head_dim, P = lv->P, R = g->key_stages;
    const uint32_t Hq = g->n_q_heads, Hkv = g->n_kv_heads;
    const uint32_t F = g->value_group_width, Nc = g->value_bits;
    const uint32_t ns = cvq__key_scale_count(g);
    const cvq_pair_layout layout = g->pair_layout;
    const size_t kvd = (size_t)Hkv * d;              /* floats per full token */
    const size_t code_bytes = ((size_t)12 * Hkv * R + 7) / 8;
    const size_t vbytes = (size_t)lv->n_groups * (Nc / 8);
    const float lambda = lv->logit_scale;

    cvq_allocator dflt;
    const cvq_allocator *al = ctx ? &ctx->alloc : NULL;
    if (!al) {
        cvq__allocator_init(&dflt, NULL);
        al = &dflt;
    }

    /* Scratch: q' [d], rotated key [d], Qt [R][64][P][2] (none without
     * compressed tokens), logits/weights [n_tok], code-space value
     * accumulator [Nc], mask flags [n_tok]. */
    size_t n_tok = 0, qt_n = 0, n_floats = 0;
    bool ok = cvq__add_size(a->n_sink, a->n_comp, &n_tok) &&
              cvq__add_size(n_tok, a->n_win, &n_tok) &&
              cvq__mul_size(a->n_comp ? (size_t)R * CVQ_SUBCODES : 0, (size_t)P * 2, &qt_n) &&
              cvq__add_size(qt_n, 2u * (size_t)d + Nc, &n_floats) &&
              cvq__add_size(n_floats, n_tok, &n_floats) &&
              cvq__mul_size(n_floats, sizeof(float), &n_floats);
    if (!ok) {
        return CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "attend: scratch size overflows");
    }
    float *scratch = cvq__alloc(al, n_floats);
    uint8_t *seen = cvq__alloc(al, n_tok ? n_tok : 1);
    if (!scratch || !seen) {
        cvq__free(al, scratch);
        cvq__free(al, seen);
        return CVQ_FAIL(ctx, CVQ_ERR_OUT_OF_MEMORY, "attend: no memory for %zu bytes of scratch",
                        n_floats);
    }
    float *qr = scratch;           /* [d]  q' = RoPE(q, q_pos[i]) */
    float *kr = qr + d;            /* [d]  a rotated full-precision key */
    float *Qt = kr + d;            /* [R][64][P][2]  conj(q'_p) * w[r][a][p] */
    float *acc = Qt + qt_n;        /* [Nc] sum_t a_t * sigma_t * bit_b */
    float *lw = acc + Nc;          /* [n_tok] logits, then exp, then weights */

    for (size_t i = 0; i < a->n_q; i++) {
        const int32_t qpos = a->q_pos[i];
        for (uint32_t h = 0; h < Hq; h++) {
            const uint32_t kv = cvq__kv_of(g, h);
            float *out = a->out + (i * Hq + h) * d; /* out[i][h][:] */
            memset(out, 0, (size_t)d * sizeof(float));

            /* q' for (i, h) */
            memcpy(qr, a->q + (i * Hq + h) * d, (size_t)d * sizeof(float));
            if (!a->q_rotated) {
                cvq_rope_apply(qr, d, (int)layout, lv->rope_t, qpos);
            }

            /* Qt[r][a][p] = conj(q'_p) * w[kv][r][a][p], needed only when
             * there are compressed tokens */
            if (a->n_comp > 0)
                query_tables(lv->key_w + (size_t)kv * R * CVQ_SUBCODES * P * 2, R, d, layout,
                             qr, kr /* free until the logits */, Qt);

            /* Logits of every visible token; seen[u] marks causality. */
            size_t u = 0;
            float lmax = -INFINITY;
            bool any = false;
            for (size_t t = 0; t < a->n_sink; t++, u++) {
                seen[u] = a->sink_pos[t] <= qpos;
                if (seen[u]) {
                    lw[u] = lambda * dot_full(qr, a->sink_k + t * kvd + (size_t)kv * d,
                                              a->sink_pos[t], d, layout, lv->rope_t, kr);
                }
            }
            for (size_t t = 0; t < a->n_comp; t++, u++) {
                const int32_t n = a->comp_pos[t];
                seen[u] = n <= qpos;
                if (!seen[u]) {
                    continue;
                }
                const float s = a->comp_kscale[t * ns + (ns == 1 ? 0 : kv)];
                lw[u] = (s * lambda) * code_dot(Qt, a->comp_codes + t * code_bytes, kv, R, P,
                                                lv->rope_t, n);
            }
            for (size_t t = 0; t < a->n_win; t++, u++) {
                seen[u] = a->win_pos[t] <= qpos;
                if (seen[u]) {
                    lw[u] = lambda * dot_full(qr, a->win_k + t * kvd + (size_t)kv * d,
                                              a->win_pos[t], d, layout, lv->rope_t, kr);
                }
            }
            for (u = 0; u < n_tok; u++) {
                if (seen[u]) {
                    any = true;
                    if (lw[u] > lmax) {
                        lmax = lw[u];
                    }
                }
            }
            if (!any) {
                continue; /* a query that sees no token outputs zeros */
            }

            /* One softmax over all visible tokens, max subtracted. */
            double denom = 0.0;
            for (u = 0; u < n_tok; u++) {
                if (seen[u]) {
                    lw[u] = expf(lw[u] - lmax);
                    denom += (double)lw[u];
                }
            }
            const float inv_denom = (float)(1.0 / denom);
            for (u = 0; u < n_tok; u++) {
                lw[u] = seen[u] ? lw[u] * inv_denom : 0.0f;
            }

            /* Values, full-precision segments: out += a_t * v_t[kv]. */
            u = 0;
            for (size_t t = 0; t < a->n_sink; t++, u++) {
                if (seen[u]) {
                    const float *v = a->sink_v + t * kvd + (size_t)kv * d;
                    for (uint32_t f = 0; f < d; f++) {
                        out[f] = out[f] + lw[u] * v[f];
                    }
                }
            }
            /* Compressed segment in code space: acc[b] = sum_t a_t sigma_t
             * bit_b over the group gi holding KV head kv, then
             * out[f] += (ls+eps)[c0+f] * sum_b acc[b] * E[b][c0+f]. */
            const uint32_t gi = (uint32_t)(((size_t)kv * d) / F);
            const uint32_t c0 = (uint32_t)((size_t)kv * d - (size_t)gi * F);
            const size_t u_comp = a->n_sink;
            bool any_comp = false;
            memset(acc, 0, (size_t)Nc * sizeof(float));
            for (size_t t = 0; t < a->n_comp; t++) {
                if (!seen[u_comp + t]) {
                    continue;
                }
                any_comp = true;
                const float wt = lw[u_comp + t] * a->comp_vsigma[t * lv->n_groups + gi];
                const uint8_t *bits = a->comp_vbits + t * vbytes + (size_t)gi * (Nc / 8);
                for (uint32_t b = 0; b < Nc; b++) {
                    if ((bits[b / 8] >> (b % 8)) & 1u) {
                        acc[b] = acc[b] + wt;
                    }
                }
            }
            if (any_comp) {
                code_values_out(acc, lv->E + gi * lv->s_E, lv->val_ls_eps + gi * lv->s_vec,
                                Nc, F, c0, d, out);
            }
            u = u_comp + a->n_comp;
            for (size_t t = 0; t < a->n_win; t++, u++) {
                if (seen[u]) {
                    const float *v = a->win_v + t * kvd + (size_t)kv * d;
                    for (uint32_t f = 0; f < d; f++) {
                        out[f] = out[f] + lw[u] * v[f];
                    }
                }
            }
        }
    }
    cvq__free(al, scratch);
    cvq__free(al, seen);
    return CVQ_OK;
}
