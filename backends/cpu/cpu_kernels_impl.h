/*
 * The fast CPU kernels, written once over the vector layer of cpu_simd.h
 * and compiled once per instruction set (cpu_isa_*.c include this file
 * after choosing the set). Not a header of declarations: a template.
 *
 * Exactness of the encoders (docs/numerics.md section 9.4): one vector lane
 * is one token (keys: also values), and each lane performs the reference's
 * operations in the reference's order:
 *   - key dot products: lane = token, four sub-codes a at a time, each sum
 *     over p ascending, (wx*zr + wy*zi) added as one rounded term;
 *   - key argmin: per token, vectorised across B within a row A (each
 *     lane one distance with the reference's operations), the lexicographic
 *     minimum of (dist, k) with NaN and +Inf as "no candidate" (numerics.md
 *     section 8) - the same code as the ascending scan with strict <; rows
 *     are skipped only when a monotone lower bound proves they cannot hold
 *     it (see key_argmin);
 *   - value encoder: lane = token; every Linear output o is its own sum over
 *     inputs ascending, bias last; GELU, argmax and the bit expansion per
 *     token with the reference's scalar code.
 * Attention (a tolerance, numerics.md section 6) reassociates freely.
 *
 * Index names as in core/ref_*.c: h KV head (keys) / query head
 * (attention), r stage, a sub-code, p pair, A B code halves, l lane, t
 * token, gi value group, j feature / nibble, o Linear output.
 */
#include "cpu_fast.h"
#include "numerics.h"
#include "reference.h"

#include <math.h>
#include <string.h>

#define KFN(x) CVQ_SIMD_NAME(x)

/* ---- keys ------------------------------------------------------------------ */

/* Sub-codes per pass of key_dots: 8 (16 accumulators) where there are 32
 * vector registers, else 4. */
#if VW >= 16
#define KEY_AS 8
#else
#define KEY_AS 4
#endif

/* Dot products of one stage for all lanes: fT[a][l] = n[a] - 2*Re<w_a, z_l>,
 * gT[a][l] = n[a] - 2*Im<w_a, z_l>, each sum over p ascending with the
 * term (wx*zr + wy*zi) rounded before it is added. zT is [d][VW] in head
 * layout. */
static void KFN(key_dots)(const float *w, const float *n, const float *zT, uint32_t d,
                          cvq_pair_layout layout, float *fT, float *gT) {
    const uint32_t P = d / 2;
    const vf two = vf_set1(2.0f);
    for (uint32_t a = 0; a < CVQ_SUBCODES; a += KEY_AS) {
        const float *w0 = w + (size_t)a * P * 2;
        vf dr[KEY_AS], di[KEY_AS];
        for (int j = 0; j < KEY_AS; j++) dr[j] = di[j] = vf_zero();
        for (uint32_t p = 0; p < P; p++) {
            uint32_t ire, iim;
            cvq__pair_index(layout, d, p, &ire, &iim);
            const vf zr = vf_load(zT + (size_t)ire * VW), zi = vf_load(zT + (size_t)iim * VW);
            for (int j = 0; j < KEY_AS; j++) {
                const float *wj = w0 + (size_t)j * 2 * P;
                const vf bx = vf_set1(wj[2 * p]), by = vf_set1(wj[2 * p + 1]);
                dr[j] = vf_add(dr[j], vf_add(vf_mul(bx, zr), vf_mul(by, zi)));
                di[j] = vf_add(di[j], vf_sub(vf_mul(bx, zi), vf_mul(by, zr)));
            }
        }
        for (int j = 0; j < KEY_AS; j++) {
            const vf nj = vf_set1(n[a + (uint32_t)j]);
            vf_store(fT + (size_t)(a + (uint32_t)j) * VW, vf_sub(nj, vf_mul(two, dr[j])));
            vf_store(gT + (size_t)(a + (uint32_t)j) * VW, vf_sub(nj, vf_mul(two, di[j])));
        }
    }
}

/* Gmin[A] = min over B of G[A][B] for one stage (min rounds nothing), or
 * NaN. Vector lane i takes B = i mod VW; vf_min(x, m) keeps m when either is
 * NaN, so a lane whose first entry is NaN stays NaN, and a later NaN entry
 * is passed over (its code has a NaN distance: it never wins). Across lanes
 * a NaN lane makes Gmin[A] NaN (then the row is never skipped, see
 * key_argmin): dropping that lane would drop its other entries from the
 * minimum and overstate the bound. So Gmin[A] is NaN or the minimum of the
 * row's non-NaN entries: a valid bound for every code that can win. */
static void KFN(key_row_mins)(const float *G, float *Gmin) {
    for (uint32_t A = 0; A < CVQ_SUBCODES; A++) {
        const float *GA = G + (size_t)A * CVQ_SUBCODES;
        vf m = vf_load(GA);
        for (uint32_t B = VW; B < CVQ_SUBCODES; B += VW) m = vf_min(vf_load(GA + B), m);
        float t[VW];
        vf_store(t, m);
        float x = t[0];
        for (uint32_t l = 1; l < VW; l++)
            if (t[l] < x || t[l] != t[l]) x = t[l]; /* a NaN sticks: x < y false */
        Gmin[A] = x;
    }
}

/* Bit A of the result set where !(x[A] > b), A = 0 .. 63 (NaN sets it). */
static uint64_t KFN(key_ngt_mask)(const float *x, float b) {
    const vf bv = vf_set1(b);
    uint64_t m = 0;
    for (uint32_t i = 0; i < CVQ_SUBCODES; i += VW)
        m |= (uint64_t)vf_ngt_bits(vf_load(x + i), bv) << i;
    return m;
}

/* Index of the lowest set bit of m != 0. */
static uint32_t KFN(key_ctz)(uint64_t m) {
#if defined(__GNUC__) || defined(__clang__)
    return (uint32_t)__builtin_ctzll(m);
#else
    uint32_t i = 0;
    while (!(m & 1u)) { m >>= 1; i++; }
    return i;
#endif
}

/* Argmin over k = 64*A + B of dist = (f[A] + g[B]) + G[A][B] per lane ->
 * kbest[l]: the reference's ascending scan with strict < (numerics.md
 * section 8), whose result is the lexicographic minimum of (dist, k) over
 * the codes with a non-NaN dist below +Inf, or 0 when there is none. Each
 * lane (token) is done on its own, vectorised across B (each vector lane one
 * distance, computed with the reference's operations in its order, so with
 * its value), keeping (best, kb) = the lexicographic minimum of the codes
 * visited so far - a rule that does not depend on the order rows are visited.
 *
 * Exact pruning. Rounded addition (to nearest) is monotone non-decreasing in
 * each operand; with gmin = min_B g[B] (of this lane) and Gmin[A] =
 * min_B G[A][B], both values of g and G, for every B
 *     (f[A] + g[B]) + G[A][B] >= LB[A] = (f[A] + gmin) + Gmin[A]
 * (each side rounded as written). A row is skipped only when LB[A] > best
 * STRICTLY, best being a distance some visited code attains: then every code
 * of the row has dist > best >= the final minimum, so none of them is the
 * lexicographic minimum, nor ties with it (a row whose bound equals best is
 * visited: its codes may tie with lower code indices at stake). A NaN bound
 * (NaN or opposite infinities in the inputs) never skips its row; +Inf best
 * (nothing visited yet, or only +Inf/NaN distances) skips nothing. The first
 * row visited is one with the smallest bound, to get a small best early;
 * then rows ascending whose bound is not above the current best. In short:
 * the loop ends only when every row not visited has LB > the final best, so
 * all its distances exceed the final best; the minimum distance is attained
 * only in visited rows, and the lexicographic minimum over them is the one
 * over all 4096 codes. (gmin, like Gmin, is NaN - no row is skipped - or the
 * minimum of the non-NaN values; a code with a NaN g or G cannot win.) */
static void KFN(key_argmin)(const float *fT, const float *gT, const float *G, const float *Gmin,
                            uint32_t *kbest) {
    const vf inf = vf_set1(INFINITY);
    /* fl[l][A], gl[l][B]: lane l's tables, contiguous (fT, gT are [a][VW]) */
    float fl[VW][CVQ_SUBCODES], gl[VW][CVQ_SUBCODES], gm[VW];
    for (uint32_t a = 0; a < CVQ_SUBCODES; a++)
        for (uint32_t l = 0; l < VW; l++) {
            fl[l][a] = fT[(size_t)a * VW + l];
            gl[l][a] = gT[(size_t)a * VW + l];
        }
    vf gminv = vf_load(gT);
    for (uint32_t B = 1; B < CVQ_SUBCODES; B++)
        gminv = vf_min(vf_load(gT + (size_t)B * VW), gminv);
    vf_store(gm, gminv);
    for (uint32_t l = 0; l < VW; l++) {
        const float *f = fl[l], *g = gl[l];
        float lb[CVQ_SUBCODES], db[CVQ_SUBCODES];
        const vf gmv = vf_set1(gm[l]);
        vf lmin = inf;
        for (uint32_t A = 0; A < CVQ_SUBCODES; A += VW) {
            const vf v = vf_add(vf_add(vf_load(f + A), gmv), vf_load(Gmin + A));
            vf_store(lb + A, v);
            lmin = vf_min(v, lmin); /* a NaN bound is left out */
        }
        /* seed: the first row whose bound is the smallest (or NaN) */
        uint64_t todo = KFN(key_ngt_mask)(lb, vf_hmin(lmin));
        uint64_t left = ~(uint64_t)0; /* rows not visited yet */
        float best = INFINITY;
        uint32_t kb = 0;
        while (todo) {
            const uint32_t A = KFN(key_ctz)(todo);
            left &= ~((uint64_t)1 << A);
            const vf fA = vf_set1(f[A]);
            const float *GA = G + (size_t)A * CVQ_SUBCODES;
            vf rm = inf;
            for (uint32_t B = 0; B < CVQ_SUBCODES; B += VW) {
                const vf dv = vf_add(vf_add(fA, vf_load(g + B)), vf_load(GA + B));
                vf_store(db + B, dv);
                rm = vf_min(dv, rm); /* NaN distances never win */
            }
            const float r = vf_hmin(rm);
            /* r < +Inf is the value of some db[B] (min returns an operand) */
            if (r < best || (r == best && r < INFINITY)) {
                uint32_t B = 0;
                while (!(db[B] == r)) B++; /* lowest B of the row holding r */
                const uint32_t k = A * CVQ_SUBCODES + B;
                if (r < best || k < kb) {
                    best = r;
                    kb = k;
                }
            }
            todo = left & KFN(key_ngt_mask)(lb, best);
        }
        kbest[l] = kb;
    }
}

/* key_argmin with its row minima: the kernel table's key_argmin (tests). */
static void KFN(key_argmin_stage)(const float *fT, const float *gT, const float *G,
                                  uint32_t *kbest) {
    float Gmin[CVQ_SUBCODES];
    KFN(key_row_mins)(G, Gmin);
    KFN(key_argmin)(fT, gT, G, Gmin, kbest);
}

/* Vectors of tokens per key work item: each stage's tables (48 KB) are
 * read from memory once for KEY_SUB vectors; with R = 21 a head's tables
 * (1 MB) do not stay in L2 from one item to the next. */
#define KEY_SUB 4

static void KFN(key_head_batch)(const cvq_layer_view *lv, uint32_t h, const float *keys,
                                const float *scales, size_t t0, uint32_t nb, uint16_t *codes) {
    const cvq_geometry *g = lv->g;
    const uint32_t d = g->head_dim, P = lv->P, R = g->key_stages, Hkv = g->n_kv_heads;
    const size_t kvd = (size_t)Hkv * d, ns = cvq__key_scale_count(g);
    const cvq_pair_layout layout = g->pair_layout;
    const uint32_t nsub = (nb + VW - 1) / VW;
    /* zT[sb][i][l]: residual of lane l of token vector sb, head layout (d <= 256) */
    float zT[KEY_SUB][256 * VW];
    float fT[CVQ_SUBCODES * VW], gT[CVQ_SUBCODES * VW];
    float Gmin[CVQ_SUBCODES]; /* row minima of this stage's G */
    uint32_t kbest[VW];
    bool live[KEY_SUB * VW];

    for (uint32_t sb = 0; sb < nsub; sb++)
        for (uint32_t l = 0; l < VW; l++) {
            const uint32_t tl = sb * VW + l; /* token t0 + tl */
            float *z = zT[sb];
            live[tl] = false;
            if (tl < nb) {
                const float s = scales[(t0 + tl) * ns + (ns == 1 ? 0 : h)];
                if (s != 0.0f) {
                    live[tl] = true;
                    /* x = k * (1/s): reciprocal correctly rounded, then multiply */
                    const float inv = 1.0f / s;
                    const float *kh = keys + (t0 + tl) * kvd + (size_t)h * d;
                    for (uint32_t i = 0; i < d; i++) z[(size_t)i * VW + l] = kh[i] * inv;
                }
            }
            if (!live[tl])
                for (uint32_t i = 0; i < d; i++) z[(size_t)i * VW + l] = 0.0f;
        }
    for (uint32_t r = 0; r < R; r++) {
        const size_t hr = (size_t)h * R + r;
        const float *w = lv->key_w + hr * CVQ_SUBCODES * P * 2;
        const float *n = lv->key_n + hr * CVQ_SUBCODES;
        const float *G = lv->key_G + hr * CVQ_SUBCODES * CVQ_SUBCODES;
        KFN(key_row_mins)(G, Gmin);
        for (uint32_t sb = 0; sb < nsub; sb++) {
            float *z = zT[sb];
            KFN(key_dots)(w, n, z, d, layout, fT, gT);
            KFN(key_argmin)(fT, gT, G, Gmin, kbest);
            for (uint32_t l = 0; l < VW && sb * VW + l < nb; l++) {
                const uint32_t tl = sb * VW + l;
                const uint32_t k = live[tl] ? kbest[l] : 0u;
                codes[(t0 + tl) * Hkv * R + hr] = (uint16_t)k;
                if (!live[tl]) continue;
                /* residual z <- z - c(A,B), components rounded first */
                const float *wA = w + (size_t)(k / CVQ_SUBCODES) * P * 2;
                const float *wB = w + (size_t)(k % CVQ_SUBCODES) * P * 2;
                for (uint32_t p = 0; p < P; p++) {
                    uint32_t ire, iim;
                    cvq__pair_index(layout, d, p, &ire, &iim);
                    const float cre = wA[2 * p] - wB[2 * p + 1];
                    const float cim = wA[2 * p + 1] + wB[2 * p];
                    z[(size_t)ire * VW + l] = z[(size_t)ire * VW + l] - cre;
                    z[(size_t)iim * VW + l] = z[(size_t)iim * VW + l] - cim;
                }
            }
        }
    }
}

/* ---- values ---------------------------------------------------------------- */

/* Value batches hold VL = 2*VW tokens: every weight W[o][i] read from
 * memory (the layer's Linear weights, 24 MB at 1 bit, do not stay in cache)
 * serves two vectors of tokens. Rows of the transposed arrays are VL
 * floats: lane l of token vector hv is at [row * VL + hv * VW + l]. */
#define VL (2 * VW)
#if VW >= 16
#define LIN_OUTS 8 /* 16 accumulators: AVX-512 has 32 registers */
#else
#define LIN_OUTS 4
#endif

/* outT[o][l] = (sum_i W[o][i] * xT[i][l], i ascending, from +0) + b[o]:
 * LIN_OUTS outputs times two token vectors at a time, every (output, lane)
 * its own sum in the reference's order. */
static void KFN(linear_T)(const float *W, const float *b, const float *xT, uint32_t n_in,
                          uint32_t n_out, float *outT) {
    uint32_t o = 0;
    for (; o + LIN_OUTS <= n_out; o += LIN_OUTS) {
        const float *W0 = W + (size_t)o * n_in;
        vf a[LIN_OUTS][2];
        for (int j = 0; j < LIN_OUTS; j++) a[j][0] = a[j][1] = vf_zero();
        for (uint32_t i = 0; i < n_in; i++) {
            const vf x0 = vf_load(xT + (size_t)i * VL), x1 = vf_load(xT + (size_t)i * VL + VW);
            for (int j = 0; j < LIN_OUTS; j++) {
                const vf w = vf_set1(W0[(size_t)j * n_in + i]);
                a[j][0] = vf_add(a[j][0], vf_mul(w, x0));
                a[j][1] = vf_add(a[j][1], vf_mul(w, x1));
            }
        }
        for (int j = 0; j < LIN_OUTS; j++) {
            const vf bj = vf_set1(b[o + (uint32_t)j]);
            vf_store(outT + (size_t)(o + (uint32_t)j) * VL, vf_add(a[j][0], bj));
            vf_store(outT + (size_t)(o + (uint32_t)j) * VL + VW, vf_add(a[j][1], bj));
        }
    }
    for (; o < n_out; o++) {
        const float *Wo = W + (size_t)o * n_in;
        vf a0 = vf_zero(), a1 = vf_zero();
        for (uint32_t i = 0; i < n_in; i++) {
            const vf w = vf_set1(Wo[i]);
            a0 = vf_add(a0, vf_mul(w, vf_load(xT + (size_t)i * VL)));
            a1 = vf_add(a1, vf_mul(w, vf_load(xT + (size_t)i * VL + VW)));
        }
        vf_store(outT + (size_t)o * VL, vf_add(a0, vf_set1(b[o])));
        vf_store(outT + (size_t)o * VL + VW, vf_add(a1, vf_set1(b[o])));
    }
}

static void KFN(value_batch)(const cvq_layer_view *lv, const float *values, size_t t0,
                             uint32_t nb, uint8_t *bits, float *sigma, float *scratch) {
    const cvq_geometry *g = lv->g;
    const uint32_t F = g->value_group_width, I = g->value_hidden, Nc = g->value_bits;
    const size_t kvd = cvq__kv_dims(g), groups = lv->n_groups, gbytes = Nc / 8;
    float *xT = scratch;                  /* [F][VL]   features, then y */
    float *hT = xT + (size_t)F * VL;      /* [I][VL]   hidden */
    float *lT = hT + (size_t)I * VL;      /* [2Nc][VL] logits */
    float *u = lT + (size_t)2 * Nc * VL;  /* [F]       code vector of one token */
    uint32_t *setb = (uint32_t *)(u + F); /* [Nc]      set bits of one token */
    float pre[VL];
    static const uint8_t bit_lo[4] = {1, 0, 1, 0};
    static const uint8_t bit_hi[4] = {0, 1, 1, 0};

    for (size_t gi = 0; gi < groups; gi++) {
        const float *inv_ls = lv->val_inv_ls + gi * lv->s_vec;
        const float *ln_w = lv->ln_w + gi * lv->s_vec, *ln_b = lv->ln_b + gi * lv->s_vec;
        const float *w1 = lv->w1 + gi * lv->s_w1, *b1 = lv->b1 + gi * lv->s_b1;
        const float *w2 = lv->w2 + gi * lv->s_w2, *b2 = lv->b2 + gi * lv->s_b2;
        const float *E = lv->E + gi * lv->s_E;

        /* 1. x = v * (1/(ls+eps)); lanes past nb hold zeros (finite, ignored) */
        for (uint32_t l = 0; l < VL; l++) {
            if (l < nb) {
                const float *vg = values + (t0 + l) * kvd + gi * F;
                for (uint32_t j = 0; j < F; j++) xT[(size_t)j * VL + l] = vg[j] * inv_ls[j];
            } else {
                for (uint32_t j = 0; j < F; j++) xT[(size_t)j * VL + l] = 0.0f;
            }
        }
        for (uint32_t hv = 0; hv < VL; hv += VW) {
            float *x0 = xT + hv; /* this token vector's column */
            /* 2. pre-normalisation */
            vf ss = vf_zero();
            for (uint32_t j = 0; j < F; j++) {
                const vf x = vf_load(x0 + (size_t)j * VL);
                ss = vf_add(ss, vf_mul(x, x));
            }
            const vf pv = vf_sqrt(ss);
            vf_store(pre + hv, pv);
            const vf rp = vf_div(vf_set1(1.0f), vf_add(pv, vf_set1(CVQ_VAL_EPS)));
            /* 3. LayerNorm, two passes; x - mean rounded once, reused */
            vf sum = vf_zero();
            for (uint32_t j = 0; j < F; j++) {
                const vf x = vf_mul(vf_load(x0 + (size_t)j * VL), rp);
                vf_store(x0 + (size_t)j * VL, x);
                sum = vf_add(sum, x);
            }
            const vf mean = vf_mul(sum, vf_set1(lv->inv_F));
            vf acc = vf_zero();
            for (uint32_t j = 0; j < F; j++) {
                const vf dj = vf_sub(vf_load(x0 + (size_t)j * VL), mean);
                acc = vf_add(acc, vf_mul(dj, dj));
            }
            const vf var = vf_mul(acc, vf_set1(lv->inv_F));
            const vf rstd = vf_div(vf_set1(1.0f), vf_sqrt(vf_add(var, vf_set1(CVQ_LN_EPS))));
            for (uint32_t j = 0; j < F; j++) {
                const vf dj = vf_sub(vf_load(x0 + (size_t)j * VL), mean);
                vf_store(x0 + (size_t)j * VL,
                         vf_add(vf_mul(vf_mul(dj, rstd), vf_set1(ln_w[j])), vf_set1(ln_b[j])));
            }
        }
        /* 4. hid = gelu(W1 y + b1); logits = W2 hid + b2 */
        KFN(linear_T)(w1, b1, xT, F, I, hT);
        for (size_t i = 0; i < (size_t)I * VL; i++) hT[i] = cvq_gelu_f32(hT[i]);
        KFN(linear_T)(w2, b2, hT, I, 2u * Nc, lT);

        for (uint32_t l = 0; l < nb; l++) {
            /* 5. four-way argmax (strict >, lowest index wins) -> bits */
            uint8_t *bg = bits + (t0 + l) * groups * gbytes + gi * gbytes;
            memset(bg, 0, gbytes);
            for (uint32_t t = 0; t < Nc / 2; t++) {
                const float *o4 = lT + (size_t)4 * t * VL + l; /* stride VL */
                uint32_t jb = 0;
                float best = o4[0];
                for (uint32_t c = 1; c < 4; c++)
                    if (o4[(size_t)c * VL] > best) {
                        best = o4[(size_t)c * VL];
                        jb = c;
                    }
                const uint32_t b0 = 2 * t, b1i = 2 * t + 1;
                bg[b0 / 8] = (uint8_t)(bg[b0 / 8] | (bit_lo[jb] << (b0 % 8)));
                bg[b1i / 8] = (uint8_t)(bg[b1i / 8] | (bit_hi[jb] << (b1i % 8)));
            }
            /* 6. u[f] = sum over set bits b ascending of E[b][f]: vectors
             * across f (independent sums), bits in ascending order */
            uint32_t nset = 0;
            for (uint32_t b = 0; b < Nc; b++)
                if ((bg[b / 8] >> (b % 8)) & 1u) setb[nset++] = b;
            uint32_t f = 0;
            for (; f + 4 * VW <= F; f += 4 * VW) {
                vf u0 = vf_zero(), u1 = u0, u2 = u0, u3 = u0;
                for (uint32_t s = 0; s < nset; s++) {
                    const float *Eb = E + (size_t)setb[s] * F + f;
                    u0 = vf_add(u0, vf_load(Eb));
                    u1 = vf_add(u1, vf_load(Eb + VW));
                    u2 = vf_add(u2, vf_load(Eb + 2 * VW));
                    u3 = vf_add(u3, vf_load(Eb + 3 * VW));
                }
                vf_store(u + f, u0);
                vf_store(u + f + VW, u1);
                vf_store(u + f + 2 * VW, u2);
                vf_store(u + f + 3 * VW, u3);
            }
            for (; f < F; f++) {
                float uf = 0.0f;
                for (uint32_t s = 0; s < nset; s++) uf = uf + E[(size_t)setb[s] * F + f];
                u[f] = uf;
            }
            float nu2 = 0.0f;
            for (f = 0; f < F; f++) nu2 = nu2 + u[f] * u[f];
            const float nu = sqrtf(nu2);
            sigma[(t0 + l) * groups + gi] = (pre[l] + CVQ_VAL_EPS) / (nu + CVQ_VAL_EPS);
        }
    }
}

/* ---- attention ------------------------------------------------------------- */

/* Code j of a record's packed key codes (docs/format.md): 12 bits at 12j. */
static inline uint32_t KFN(code12)(const uint8_t *packed, uint32_t j) {
    const size_t bit = (size_t)12 * j;
    const uint32_t two = (uint32_t)packed[bit >> 3] | ((uint32_t)packed[(bit >> 3) + 1] << 8);
    return (two >> (bit & 7u)) & 0xFFFu;
}

/* Logits of one token for the query heads [hb, he) of KV head kv, d = NV*VW.
 * SA, SB: sum over stages of the A and B sub-code rows (interleaved (x, y)),
 * then S = SA + i*SB, rotated once by RoPE at the token's position and
 * dotted with each query of the group. csn: (cos, sin) of each pair. */
static inline void KFN(attn_token_kv)(const cvq_attn_job *job, const float *wkv,
                                      const uint8_t *packed, uint32_t kv, uint32_t R,
                                      const float *csn, float scale, uint32_t hb, uint32_t he,
                                      float *lt, const uint32_t NV) {
    const uint32_t d = NV * VW;
    vf SA[256 / VW], SB[256 / VW];
    for (uint32_t v = 0; v < NV; v++) SA[v] = SB[v] = vf_zero();
    for (uint32_t r = 0; r < R; r++) {
        const uint32_t code = KFN(code12)(packed, kv * R + r);
        const float *wA = wkv + ((size_t)r * CVQ_SUBCODES + code / CVQ_SUBCODES) * d;
        const float *wB = wkv + ((size_t)r * CVQ_SUBCODES + code % CVQ_SUBCODES) * d;
        for (uint32_t v = 0; v < NV; v++) {
            SA[v] = vf_add(SA[v], vf_load(wA + v * VW));
            SB[v] = vf_add(SB[v], vf_load(wB + v * VW));
        }
    }
    /* lane pattern (-1, +1): i*(x + iy) = (-y, x) */
    float sg[VW];
    for (uint32_t l = 0; l < VW; l++) sg[l] = (l & 1u) ? 1.0f : -1.0f;
    const vf sgn = vf_load(sg);
    vf K[256 / VW];
    for (uint32_t v = 0; v < NV; v++) {
        const vf S = vf_add(SA[v], vf_mul(vf_swap_pairs(SB[v]), sgn));
        /* (re, im) * (c + i s) = (re c - im s, im c + re s) */
        K[v] = vf_add(vf_mul(S, vf_load(csn + v * VW)),
                      vf_mul(vf_mul(vf_swap_pairs(S), vf_load(csn + d + v * VW)), sgn));
    }
    for (uint32_t h = hb; h < he; h++) {
        const float *qh = job->qpair + (size_t)h * d;
        vf acc = vf_mul(K[0], vf_load(qh));
        for (uint32_t v = 1; v < NV; v++) acc = vf_add(acc, vf_mul(K[v], vf_load(qh + v * VW)));
        lt[h] = scale * vf_hsum(acc);
    }
}

/* cos and sin of the RoPE angle of every pair at position n, for attention
 * (a tolerance, not bits): the exact integer phase of numerics.md 5.1 as a
 * signed fraction of a turn x in [-1/2, 1/2) (rounded to binary32: at most
 * 1e-7 rad off), the quadrant q = round(4x), sin/cos polynomials on
 * a = 2*pi*(x - q/4) in [-pi/4, pi/4], then the rotation by q quarter
 * turns: cos(q*pi/2) = 1 - |q|, sin(q*pi/2) = q*(2 - |q|) for |q| <= 2.
 * out: cos_p at [2p] and [2p+1], sin_p at [d + 2p] and [d + 2p + 1]. */
static void KFN(attn_cos_sin)(const uint64_t *rope_t, uint32_t P, int32_t n, float *out) {
    const uint32_t d = 2 * P;
    float *x = out + d; /* the turns, duplicated, then overwritten by sin */
    for (uint32_t p = 0; p < P; p++) {
        const int32_t turn = (int32_t)cvq_rope_phase_hi(rope_t[p], n);
        x[2 * p] = x[2 * p + 1] = (float)turn * 0x1p-32f;
    }
    for (uint32_t v = 0; v < d / VW; v++) {
        const vf xv = vf_load(x + v * VW);
        const vf q = vf_round(vf_mul(xv, vf_set1(4.0f)));
        const vf a = vf_mul(vf_sub(xv, vf_mul(q, vf_set1(0.25f))), vf_set1(6.28318531f));
        const vf a2 = vf_mul(a, a);
        /* sin a = a (1 - a2/6 (1 - a2/20 (1 - a2/42 (1 - a2/72)))) and
         * cos a = 1 - a2/2 (1 - a2/12 (1 - a2/30 (1 - a2/56))): Taylor,
         * error < 4e-9 on [-pi/4, pi/4] */
        vf sp = vf_sub(vf_set1(1.0f), vf_mul(a2, vf_set1(1.0f / 72.0f)));
        sp = vf_sub(vf_set1(1.0f), vf_mul(vf_mul(a2, vf_set1(1.0f / 42.0f)), sp));
        sp = vf_sub(vf_set1(1.0f), vf_mul(vf_mul(a2, vf_set1(1.0f / 20.0f)), sp));
        sp = vf_sub(vf_set1(1.0f), vf_mul(vf_mul(a2, vf_set1(1.0f / 6.0f)), sp));
        const vf sa = vf_mul(a, sp);
        vf cp = vf_sub(vf_set1(1.0f), vf_mul(a2, vf_set1(1.0f / 56.0f)));
        cp = vf_sub(vf_set1(1.0f), vf_mul(vf_mul(a2, vf_set1(1.0f / 30.0f)), cp));
        cp = vf_sub(vf_set1(1.0f), vf_mul(vf_mul(a2, vf_set1(1.0f / 12.0f)), cp));
        const vf ca = vf_sub(vf_set1(1.0f), vf_mul(vf_mul(a2, vf_set1(0.5f)), cp));
        const vf aq = vf_max(q, vf_sub(vf_zero(), q)); /* |q| */
        const vf cq = vf_sub(vf_set1(1.0f), aq), sq = vf_mul(q, vf_sub(vf_set1(2.0f), aq));
        vf_store(out + v * VW, vf_sub(vf_mul(cq, ca), vf_mul(sq, sa)));
        vf_store(out + d + v * VW, vf_add(vf_mul(sq, ca), vf_mul(cq, sa)));
    }
}

/* Tokens per block of attn_logits: the block's (cos, sin) table (TB * d
 * floats, 128 KB at d = 128) and one KV head's sub-code table (R*64*d
 * floats, 360 KB at R = 11) stay in L2 while that head's table is swept
 * over the block. */
static void KFN(attn_logits)(const cvq_attn_job *job, size_t t0, size_t t1, float *lg,
                             float *csn) {
    const cvq_layer_view *lv = job->lv;
    const cvq_geometry *g = lv->g;
    const uint32_t d = g->head_dim, P = lv->P, R = g->key_stages;
    const uint32_t Hq = g->n_q_heads, Hkv = g->n_kv_heads, ns = cvq__key_scale_count(g);
    const size_t lgs = (size_t)Hq + 16; /* row stride of lg (padding for vector reads) */
    const float lambda = lv->logit_scale;
    /* csn [TB][2][d]: cos and sin of each pair, each twice (cos_p at 2p and
     * 2p+1), at each token of the block */
    bool vis[CVQ_ATTN_TB];
    for (size_t tb = t0; tb < t1; tb += CVQ_ATTN_TB) {
        const size_t te = t1 - tb < CVQ_ATTN_TB ? t1 : tb + CVQ_ATTN_TB;
        for (size_t t = tb; t < te; t++) {
            float *lt = lg + (t - t0) * lgs;
            const int32_t n = job->pos[t];
            float *c_t = csn + (t - tb) * 2 * d;
            for (uint32_t h = Hq; h < Hq + 16; h++) lt[h] = -INFINITY; /* padding */
            vis[t - tb] = n <= job->qpos;
            if (!vis[t - tb]) {
                for (uint32_t h = 0; h < Hq; h++) lt[h] = -INFINITY;
                continue;
            }
            KFN(attn_cos_sin)(lv->rope_t, P, n, c_t);
        }
        uint32_t hc = 0;
        for (uint32_t kv = 0; kv < Hkv; kv++) {
            const uint32_t hb = hc;
            while (hc < Hq && cvq__kv_of(g, hc) == kv) hc++;
            if (hb == hc) continue;
            const float *wkv = lv->key_w + (size_t)kv * R * CVQ_SUBCODES * d;
            for (size_t t = tb; t < te; t++) {
                if (!vis[t - tb]) continue;
                const float s = job->kscale[t * ns + (ns == 1 ? 0 : kv)];
                const uint8_t *packed = job->codes + t * job->code_bytes;
                float *lt = lg + (t - t0) * lgs;
                const float *c_t = csn + (t - tb) * 2 * d;
                if (d == 128)
                    KFN(attn_token_kv)(job, wkv, packed, kv, R, c_t, s * lambda, hb, hc, lt, 128 / VW);
                else
                    KFN(attn_token_kv)(job, wkv, packed, kv, R, c_t, s * lambda, hb, hc, lt, d / VW);
            }
        }
    }
}

/* Softmax weights and code-space value sums of tokens [t0, t1) for value
 * group gi (query heads [hb, hb + nh)): p = exp(l - mx), den += p, and for
 * each nibble j of the group's bits with value x, acc[j][x][:] += p*sigma.
 * mxg [nhp]: the heads' maxima, +Inf in padding lanes (p = 0 there). */
static void KFN(attn_values_group)(const cvq_attn_job *job, size_t t0, size_t t1,
                                   const float *lg, size_t gi, uint32_t hb, const float *mxg,
                                   float *accg, float *deng) {
    const cvq_layer_view *lv = job->lv;
    const uint32_t Hq = lv->g->n_q_heads, Nc = lv->g->value_bits, nhp = job->nhp;
    const size_t lgs = (size_t)Hq + 16, groups = lv->n_groups;
    const uint32_t nv = nhp / VW;
    vf den[CVQ_ATTN_MAX_NHP / VW];
    for (uint32_t v = 0; v < nv; v++) den[v] = vf_zero();
    vf wv[CVQ_ATTN_MAX_NHP / VW];
    for (size_t t = t0; t < t1; t++) {
        if (job->pos[t] > job->qpos) continue;
        const float *lt = lg + (t - t0) * lgs + hb;
        const vf sig = vf_set1(job->vsigma[t * groups + gi]);
        for (uint32_t v = 0; v < nv; v++) {
            const vf p = vf_exp_attn(vf_sub(vf_load(lt + v * VW), vf_load(mxg + v * VW)));
            den[v] = vf_add(den[v], p);
            wv[v] = vf_mul(p, sig);
        }
        const uint8_t *by = job->vbits + t * job->vbytes + gi * (Nc / 8);
        for (uint32_t j = 0; j < Nc / 8; j++) {
            float *a0 = accg + ((size_t)(2 * j) * 16 + (by[j] & 15u)) * nhp;
            float *a1 = accg + ((size_t)(2 * j + 1) * 16 + (by[j] >> 4)) * nhp;
            for (uint32_t v = 0; v < nv; v++) {
                vf_store(a0 + v * VW, vf_add(vf_load(a0 + v * VW), wv[v]));
                vf_store(a1 + v * VW, vf_add(vf_load(a1 + v * VW), wv[v]));
            }
        }
    }
    for (uint32_t v = 0; v < nv; v++) vf_store(deng + v * VW, vf_add(vf_load(deng + v * VW), den[v]));
}

/* Phase 4 of attention for value group accg ([Nc/4][16][nhp] nibble
 * sums): per-bit sums bitsum[b][hh] = sum of the nibble values x with bit
 * b%4 set, then res[hh - hh0][f] = sum_b bitsum[b][hh] * E[b][c0 + f] for
 * the heads hh0 .. hh1-1 of the group (two at a time, E rows read once per
 * pair). bitsum: [Nc][nhp] scratch, already filled when have_bitsum. */
static void KFN(attn_expand)(const float *accg, uint32_t Nc, uint32_t nhp, const float *E, size_t F,
                             size_t c0, uint32_t d, uint32_t hh0, uint32_t hh1, int have_bitsum,
                             float *bitsum, float *res) {
    const uint32_t nv = nhp / VW;
    for (uint32_t j = 0; j < (have_bitsum ? 0 : Nc / 4); j++)
        for (uint32_t k = 0; k < 4; k++)
            for (uint32_t v = 0; v < nv; v++) {
                vf s = vf_zero();
                for (uint32_t x = 1; x < 16; x++)
                    if (x & (1u << k)) s = vf_add(s, vf_load(accg + ((size_t)j * 16 + x) * nhp + v * VW));
                vf_store(bitsum + (size_t)(4 * j + k) * nhp + v * VW, s);
            }
    /* E rows in blocks of 64 (32 KB at d = 128: they stay in L1 while
     * every head pair of the range uses them, so E is read from memory once
     * per call); res holds the partial sums between blocks */
    for (uint32_t b0 = 0; b0 < Nc; b0 += 64) {
        const uint32_t b1 = Nc - b0 < 64 ? Nc : b0 + 64;
        for (uint32_t hh = hh0; hh < hh1; hh += 2) {
            const bool two = hh + 1 < hh1;
            float *r0 = res + (size_t)(hh - hh0) * d, *r1 = two ? r0 + d : r0;
            for (uint32_t f0 = 0; f0 < d; f0 += 8 * VW) {
                const uint32_t nf = (d - f0) / VW < 8 ? (d - f0) / VW : 8;
                vf a0[8], a1[8];
                for (uint32_t v = 0; v < nf; v++) {
                    a0[v] = b0 ? vf_load(r0 + f0 + v * VW) : vf_zero();
                    a1[v] = b0 && two ? vf_load(r1 + f0 + v * VW) : vf_zero();
                }
                for (uint32_t b = b0; b < b1; b++) {
                    const float *Eb = E + (size_t)b * F + c0 + f0;
                    const vf w0 = vf_set1(bitsum[(size_t)b * nhp + hh]);
                    const vf w1 = vf_set1(two ? bitsum[(size_t)b * nhp + hh + 1] : 0.0f);
                    for (uint32_t v = 0; v < nf; v++) {
                        const vf e = vf_load(Eb + v * VW);
                        a0[v] = vf_add(a0[v], vf_mul(w0, e));
                        a1[v] = vf_add(a1[v], vf_mul(w1, e));
                    }
                }
                for (uint32_t v = 0; v < nf; v++) {
                    vf_store(r0 + f0 + v * VW, a0[v]);
                    if (two) vf_store(r1 + f0 + v * VW, a1[v]);
                }
            }
        }
    }
}

/* The kernel table of this instruction set. */
static const cvq_cpu_kernels KFN(table) = {
    CVQ_SIMD_ISA, CVQ_SIMD_ISA_NAME, KEY_SUB * VW, VL,
    KFN(key_head_batch), KFN(value_batch), KFN(attn_logits), KFN(attn_values_group),
    KFN(attn_expand), VW, KFN(key_argmin_stage),
};
