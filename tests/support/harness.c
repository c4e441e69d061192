/*
 * Conformance harness: cases, data, guard bands, comparisons and the
 * independent double-precision oracles (see harness.h). The oracles are
 * written from the method note (commvq-method.md), not from docs/numerics.md,
 * in double with libm, and call no library kernel.
 */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TH_PI 3.14159265358979323846

/* ---- cases ------------------------------------------------------------------ */

uint64_t th_fnv1a64(const char *s) {
    uint64_t h = 0xcbf29ce484222325ull; /* FNV offset basis */
    for (; *s; s++) {
        h ^= (uint8_t)*s;
        h *= 0x100000001b3ull; /* FNV prime */
    }
    return h;
}

const char *th_case_finish(th_case *c) {
    char extra[64] = "";
    size_t used = 0;
    if (c->I) {
        used += (size_t)snprintf(extra + used, sizeof extra - used, ",I=%u", c->I);
    }
    if (c->pos_stride > 1) {
        used += (size_t)snprintf(extra + used, sizeof extra - used, ",stride=%u", c->pos_stride);
    }
    if (c->q_rotated) {
        (void)snprintf(extra + used, sizeof extra - used, ",qrot=1");
    }
    snprintf(c->name, sizeof c->name,
             "%s(d=%u,hq=%u,hkv=%u,R=%u,Nc=%u,F=%u,layout=%s,scale=%s,nq=%u,W=%u,S=%u,"
             "off=%d,T=%u%s)",
             c->op ? c->op : "case", c->d, c->hq, c->hkv, c->R, c->Nc,
             c->F ? c->F : c->hkv * c->d,
             c->layout == CVQ_PAIRS_INTERLEAVED ? "inter" : "rot",
             c->scale == CVQ_KEY_SCALE_HEAD ? "head" : "token", c->n_q, c->window,
             c->sinks, (int)c->offset, c->T, extra);
    c->seed = th_fnv1a64(c->name);
    return c->name;
}

cvq_status th_case_geometry(const th_case *c, cvq_geometry *g) {
    memset(g, 0, sizeof *g);
    g->n_layers = 1;
    g->n_q_heads = c->hq;
    g->n_kv_heads = c->hkv;
    g->head_dim = c->d;
    g->key_stages = c->R;
    g->key_scale = c->scale;
    g->pair_layout = c->layout;
    g->value_group_width = c->F;
    g->value_bits = c->Nc;
    g->value_hidden = c->I;
    g->logit_scale = 0.0f;
    return cvq_geometry_resolve(g);
}

/* ---- random data -------------------------------------------------------------- */

void th_rng_seed(th_rng *r, uint64_t seed) {
    r->state = seed;
    r->has_spare = 0;
    r->spare = 0.0;
}

/* splitmix64 (Steele, Lea, Flood 2014): integer only, same on every platform. */
uint64_t th_rng_u64(th_rng *r) {
    uint64_t z = (r->state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

double th_rng_uniform(th_rng *r) {
    return (double)(th_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0); /* 2^-53 */
}

/* Box-Muller; the pair's second normal is kept for the next call. libm's
 * log/cos/sin may differ in the last ulp between platforms; after rounding
 * to float the data is the same in practice, and no test depends on exact
 * data values. */
double th_rng_normal(th_rng *r) {
    if (r->has_spare) {
        r->has_spare = 0;
        return r->spare;
    }
    const double u1 = 1.0 - th_rng_uniform(r); /* (0, 1] */
    const double u2 = th_rng_uniform(r);
    const double rad = sqrt(-2.0 * log(u1));
    r->spare = rad * sin(2.0 * TH_PI * u2);
    r->has_spare = 1;
    return rad * cos(2.0 * TH_PI * u2);
}

void th_fill_normal(th_rng *r, float *x, size_t n, double stdev) {
    for (size_t i = 0; i < n; i++) {
        x[i] = (float)(stdev * th_rng_normal(r));
    }
}

/* ---- guard bands ---------------------------------------------------------------- */

/* Layout: [size_t bytes | pad to 64][guard 64][data bytes][guard 64]. */
#define TH_HDR 64

void *th_guard_alloc(size_t bytes) {
    unsigned char *raw = malloc(TH_HDR + 2 * TH_GUARD_BYTES + bytes);
    if (!raw) {
        return NULL;
    }
    memcpy(raw, &bytes, sizeof bytes);
    memset(raw + TH_HDR, TH_GUARD_BYTE, TH_GUARD_BYTES);
    memset(raw + TH_HDR + TH_GUARD_BYTES, TH_FILL_BYTE, bytes);
    memset(raw + TH_HDR + TH_GUARD_BYTES + bytes, TH_GUARD_BYTE, TH_GUARD_BYTES);
    return raw + TH_HDR + TH_GUARD_BYTES;
}

static unsigned char *guard_raw(const void *p, size_t *bytes) {
    unsigned char *raw = (unsigned char *)p - TH_HDR - TH_GUARD_BYTES;
    memcpy(bytes, raw, sizeof *bytes);
    return raw;
}

bool th_guard_ok(const void *p) {
    size_t bytes;
    const unsigned char *raw = guard_raw(p, &bytes);
    for (size_t i = 0; i < TH_GUARD_BYTES; i++) {
        if (raw[TH_HDR + i] != TH_GUARD_BYTE ||
            raw[TH_HDR + TH_GUARD_BYTES + bytes + i] != TH_GUARD_BYTE) {
            return false;
        }
    }
    return true;
}

bool th_guard_untouched(const void *p) {
    size_t bytes;
    (void)guard_raw(p, &bytes);
    const unsigned char *d = p;
    for (size_t i = 0; i < bytes; i++) {
        if (d[i] != TH_FILL_BYTE) {
            return false;
        }
    }
    return true;
}

void th_guard_free(void *p) {
    if (p) {
        size_t bytes;
        free(guard_raw(p, &bytes));
    }
}

/* ---- comparisons -------------------------------------------------------------------- */

size_t th_cmp_u16(const uint16_t *a, const uint16_t *b, size_t n, size_t *first) {
    size_t diff = 0;
    for (size_t i = 0; i < n; i++) {
        if (a[i] != b[i]) {
            if (diff == 0 && first) {
                *first = i;
            }
            diff++;
        }
    }
    return diff;
}

size_t th_cmp_bytes(const uint8_t *a, const uint8_t *b, size_t n, size_t *first) {
    size_t diff = 0;
    for (size_t i = 0; i < n; i++) {
        if (a[i] != b[i]) {
            if (diff == 0 && first) {
                *first = i;
            }
            diff++;
        }
    }
    return diff;
}

th_err th_cmp_f32_f64(const float *got, const double *want, size_t n) {
    th_err e = {0.0, 0.0, 0.0, 0, 0};
    for (size_t i = 0; i < n; i++) {
        if (isnan(got[i]) || isnan(want[i])) {
            e.n_nan++;
            continue;
        }
        const double err = fabs((double)got[i] - want[i]);
        if (!(err <= e.max_abs_err)) { /* also catches Inf - Inf = NaN */
            e.max_abs_err = err;
            e.worst = i;
        }
        if (fabs(want[i]) > e.max_abs_ref) {
            e.max_abs_ref = fabs(want[i]);
        }
    }
    if (e.n_nan || isnan(e.max_abs_err) || isinf(e.max_abs_err)) {
        e.norm_err = INFINITY;
    } else if (e.max_abs_err == 0.0) {
        e.norm_err = 0.0;
    } else {
        e.norm_err = e.max_abs_ref > 0.0 ? e.max_abs_err / e.max_abs_ref : INFINITY;
    }
    return e;
}

/* ---- cache policy ------------------------------------------------------------------------ */

void th_cache_split(uint32_t T, uint32_t S, uint32_t W, size_t *n_sink, size_t *n_comp,
                    size_t *n_win) {
    const uint32_t sink = T < S ? T : S;
    const uint32_t rest = T - sink;
    uint32_t win = 0;
    if (W > 0 && rest > 0) {
        win = (rest - 1) % W + 1; /* the window holds 1..W once it has a token */
    }
    *n_sink = sink;
    *n_win = win;
    *n_comp = rest - win;
}

void th_pack_codes12(const uint16_t *codes, size_t n, uint8_t *out) {
    memset(out, 0, (12 * n + 7) / 8);
    for (size_t i = 0; i < n; i++) {
        for (unsigned b = 0; b < 12; b++) {
            const size_t bit = 12 * i + b; /* absolute bit index */
            if ((codes[i] >> b) & 1u) {
                out[bit / 8] = (uint8_t)(out[bit / 8] | (1u << (bit % 8)));
            }
        }
    }
}

/* ---- oracles ------------------------------------------------------------------------------ */

void th_pair(cvq_pair_layout layout, uint32_t d, uint32_t p, uint32_t *re, uint32_t *im) {
    if (layout == CVQ_PAIRS_INTERLEAVED) { /* GPT-J: (x[2p], x[2p+1]) */
        *re = 2 * p;
        *im = 2 * p + 1;
    } else { /* HF rotate_half: (x[p], x[p + d/2]) */
        *re = p;
        *im = p + d / 2;
    }
}

/* Real components of the centre of code (A, B) at pair p under `conv`,
 * from sub-codes wA = (xA, yA), wB = (xB, yB). */
static void centre(th_centre conv, double xA, double yA, double xB, double yB,
                   double *cre, double *cim) {
    switch (conv) {
    case TH_CENTRE_MINUS_I: /* w_A - i w_B */
        *cre = xA + yB;
        *cim = yA - xB;
        break;
    case TH_CENTRE_SWAPPED: /* w_B + i w_A */
        *cre = xB - yA;
        *cim = yB + xA;
        break;
    case TH_CENTRE_CONJ: /* conj(w_A) + i conj(w_B) = (xA - i yA) + (yB + i xB) */
        *cre = xA + yB;
        *cim = xB - yA;
        break;
    case TH_CENTRE_OK: /* w_A + i w_B = (xA + i yA) + (-yB + i xB) */
    default:
        *cre = xA - yB;
        *cim = yA + xB;
        break;
    }
}

uint32_t th_bf_key_stage(const float *w, uint32_t d, cvq_pair_layout layout, const float *z,
                         th_centre conv, double *dist, double *best, double *second) {
    const uint32_t P = d / 2;
    double zr[128], zi[128]; /* pairs of z in double */
    for (uint32_t p = 0; p < P; p++) {
        uint32_t ire, iim;
        th_pair(layout, d, p, &ire, &iim);
        zr[p] = z[ire];
        zi[p] = z[iim];
    }
    double b1 = INFINITY, b2 = INFINITY;
    uint32_t kbest = 0;
    for (uint32_t A = 0; A < 64; A++) {
        const float *wA = w + (size_t)A * P * 2;
        for (uint32_t B = 0; B < 64; B++) {
            const float *wB = w + (size_t)B * P * 2;
            double s = 0.0; /* ||z - c(A,B)||^2 */
            for (uint32_t p = 0; p < P; p++) {
                double cre, cim;
                centre(conv, wA[2 * p], wA[2 * p + 1], wB[2 * p], wB[2 * p + 1], &cre, &cim);
                const double er = zr[p] - cre, ei = zi[p] - cim;
                s += er * er + ei * ei;
            }
            const uint32_t k = A * 64 + B;
            if (dist) {
                dist[k] = s;
            }
            if (s < b1) {
                b2 = b1;
                b1 = s;
                kbest = k;
            } else if (s < b2) {
                b2 = s;
            }
        }
    }
    if (best) {
        *best = b1;
    }
    if (second) {
        *second = b2;
    }
    return kbest;
}

void th_rope_hf(const double *x, uint32_t d, const double *theta, int64_t pos, int sign,
                double *out) {
    const uint32_t P = d / 2;
    for (uint32_t j = 0; j < d; j++) {
        const double ang = theta[j % P] * (double)pos;     /* emb = cat(freqs, freqs) */
        const double rh = j < P ? -x[j + P] : x[j - P];     /* rotate_half(x)[j] */
        out[j] = x[j] * cos(ang) + rh * ((double)sign * sin(ang));
    }
}

void th_rope_gptj(const double *x, uint32_t d, const double *theta, int64_t pos, int sign,
                  double *out) {
    for (uint32_t j = 0; j < d; j++) {
        const double ang = theta[j / 2] * (double)pos;      /* repeat_interleave(freqs, 2) */
        const double re2 = (j % 2 == 0) ? -x[j + 1] : x[j - 1]; /* rotate_every_two(x)[j] */
        out[j] = x[j] * cos(ang) + re2 * ((double)sign * sin(ang));
    }
}

void th_rope(cvq_pair_layout layout, const double *x, uint32_t d, const double *theta,
             int64_t pos, double *out) {
    if (layout == CVQ_PAIRS_INTERLEAVED) {
        th_rope_gptj(x, d, theta, pos, 1, out);
    } else {
        th_rope_hf(x, d, theta, pos, 1, out);
    }
}

void th_decode_key_double(const cvq_geometry *g, const float *key_w, const uint16_t *codes,
                          const float *scales, double *k) {
    const uint32_t d = g->head_dim, P = d / 2, R = g->key_stages;
    for (uint32_t h = 0; h < g->n_kv_heads; h++) {
        const double s = g->key_scale == CVQ_KEY_SCALE_HEAD ? scales[h] : scales[0];
        for (uint32_t p = 0; p < P; p++) {
            double re = 0.0, im = 0.0;
            for (uint32_t r = 0; r < R; r++) {
                const float *w = key_w + ((size_t)h * R + r) * 64 * P * 2; /* [64][P][2] */
                const uint32_t code = codes[(size_t)h * R + r];
                const float *wA = w + (size_t)(code / 64) * P * 2;
                const float *wB = w + (size_t)(code % 64) * P * 2;
                double cre, cim;
                centre(TH_CENTRE_OK, wA[2 * p], wA[2 * p + 1], wB[2 * p], wB[2 * p + 1], &cre,
                       &cim);
                re += cre;
                im += cim;
            }
            uint32_t ire, iim;
            th_pair(g->pair_layout, d, p, &ire, &iim);
            k[(size_t)h * d + ire] = s * re;
            k[(size_t)h * d + iim] = s * im;
        }
    }
}

static void u_double(const th_value_group *vg, const uint8_t *bits, double *u) {
    for (uint32_t f = 0; f < vg->F; f++) {
        u[f] = 0.0;
    }
    for (uint32_t b = 0; b < vg->Nc; b++) {
        if ((bits[b / 8] >> (b % 8)) & 1u) {
            for (uint32_t f = 0; f < vg->F; f++) {
                u[f] += vg->E[(size_t)b * vg->F + f];
            }
        }
    }
}

void th_decode_value_double(const th_value_group *vg, const uint8_t *bits, float sigma,
                            double *v) {
    u_double(vg, bits, v);
    for (uint32_t f = 0; f < vg->F; f++) {
        v[f] = (double)sigma * v[f] * ((double)vg->ls[f] + 1e-6);
    }
}

/* x = v / (ls + eps); returns pre = ||x|| and leaves x in place. */
static double value_prescale(const th_value_group *vg, const float *v, double *x) {
    double ss = 0.0;
    for (uint32_t j = 0; j < vg->F; j++) {
        x[j] = (double)v[j] / ((double)vg->ls[j] + 1e-6);
        ss += x[j] * x[j];
    }
    return sqrt(ss);
}

double th_value_sigma_double(const th_value_group *vg, const float *v, const uint8_t *bits) {
    double *x = malloc(sizeof(double) * vg->F);
    if (!x) {
        return NAN;
    }
    const double pre = value_prescale(vg, v, x);
    u_double(vg, bits, x);
    double nu = 0.0;
    for (uint32_t f = 0; f < vg->F; f++) {
        nu += x[f] * x[f];
    }
    free(x);
    return (pre + 1e-6) / (sqrt(nu) + 1e-6);
}

bool th_encode_value_double(const th_value_group *vg, const float *v, uint8_t *bits,
                            double *sigma, double *pre_out, double *logits, double *abs_sum) {
    const uint32_t F = vg->F, I = vg->I, Nc = vg->Nc;
    double *x = malloc(sizeof(double) * F);
    double *hid = malloc(sizeof(double) * I);
    if (!x || !hid) {
        free(x);
        free(hid);
        return false;
    }
    const double pre = value_prescale(vg, v, x);
    for (uint32_t j = 0; j < F; j++) {
        x[j] /= (pre + 1e-6);
    }
    /* LayerNorm over F, biased variance, eps 1e-5, affine */
    double mean = 0.0, var = 0.0;
    for (uint32_t j = 0; j < F; j++) {
        mean += x[j];
    }
    mean /= F;
    for (uint32_t j = 0; j < F; j++) {
        var += (x[j] - mean) * (x[j] - mean);
    }
    var /= F;
    for (uint32_t j = 0; j < F; j++) {
        x[j] = (x[j] - mean) / sqrt(var + 1e-5) * vg->ln_w[j] + vg->ln_b[j];
    }
    /* Linear(F -> I), weights [out][in], then GELU (erf form) */
    for (uint32_t o = 0; o < I; o++) {
        double acc = vg->b1[o];
        for (uint32_t i = 0; i < F; i++) {
            acc += (double)vg->w1[(size_t)o * F + i] * x[i];
        }
        hid[o] = 0.5 * acc * (1.0 + erf(acc / sqrt(2.0)));
    }
    /* Linear(I -> 2*Nc) */
    for (uint32_t o = 0; o < 2 * Nc; o++) {
        double acc = vg->b2[o], as = fabs((double)vg->b2[o]);
        for (uint32_t i = 0; i < I; i++) {
            const double t = (double)vg->w2[(size_t)o * I + i] * hid[i];
            acc += t;
            as += fabs(t);
        }
        logits[o] = acc;
        if (abs_sum) {
            abs_sum[o] = as;
        }
    }
    /* group t: argmax j of logits 4t..4t+3 (first maximum), bits (2t, 2t+1):
     * j=0 -> (1,0), 1 -> (0,1), 2 -> (1,1), 3 -> (0,0) */
    memset(bits, 0, Nc / 8);
    for (uint32_t t = 0; t < Nc / 2; t++) {
        uint32_t j = 0;
        for (uint32_t c = 1; c < 4; c++) {
            if (logits[4 * t + c] > logits[4 * t + j]) {
                j = c;
            }
        }
        const int lo = (j == 0 || j == 2), hi = (j == 1 || j == 2);
        if (lo) {
            bits[(2 * t) / 8] = (uint8_t)(bits[(2 * t) / 8] | (1u << ((2 * t) % 8)));
        }
        if (hi) {
            bits[(2 * t + 1) / 8] = (uint8_t)(bits[(2 * t + 1) / 8] | (1u << ((2 * t + 1) % 8)));
        }
    }
    /* sigma = (pre + eps) / (||u|| + eps) */
    u_double(vg, bits, x);
    double nu = 0.0;
    for (uint32_t f = 0; f < F; f++) {
        nu += x[f] * x[f];
    }
    *sigma = (pre + 1e-6) / (sqrt(nu) + 1e-6);
    if (pre_out) {
        *pre_out = pre;
    }
    free(x);
    free(hid);
    return true;
}

bool th_attend_double(const cvq_geometry *g, const double *theta, size_t n_q, const float *q,
                      const int32_t *q_pos, int q_rotated, size_t n_tok, const double *k,
                      const double *v, const int32_t *pos, double *out) {
    const uint32_t d = g->head_dim, Hq = g->n_q_heads, Hkv = g->n_kv_heads;
    const size_t kvd = (size_t)Hkv * d;
    double *kr = malloc(sizeof(double) * (n_tok * kvd + 1)); /* RoPE(k) at its position */
    double *w = malloc(sizeof(double) * (n_tok + 1));
    double *qd = malloc(sizeof(double) * d);
    double *qr = malloc(sizeof(double) * d);
    if (!kr || !w || !qd || !qr) {
        free(kr);
        free(w);
        free(qd);
        free(qr);
        return false;
    }
    for (size_t t = 0; t < n_tok; t++) {
        for (uint32_t h = 0; h < Hkv; h++) {
            th_rope(g->pair_layout, k + t * kvd + (size_t)h * d, d, theta, pos[t],
                    kr + t * kvd + (size_t)h * d);
        }
    }
    for (size_t i = 0; i < n_q; i++) {
        for (uint32_t h = 0; h < Hq; h++) {
            const uint32_t kv = (uint32_t)(((uint64_t)h * Hkv) / Hq); /* floor(h*Hkv/Hq) */
            double *o = out + (i * Hq + h) * d;
            for (uint32_t j = 0; j < d; j++) {
                qd[j] = q[(i * Hq + h) * d + j];
                o[j] = 0.0;
            }
            if (q_rotated) {
                memcpy(qr, qd, sizeof(double) * d);
            } else {
                th_rope(g->pair_layout, qd, d, theta, q_pos[i], qr);
            }
            double mx = -INFINITY;
            for (size_t t = 0; t < n_tok; t++) {
                if (pos[t] > q_pos[i]) {
                    continue;
                }
                const double *kt = kr + t * kvd + (size_t)kv * d;
                double dot = 0.0;
                for (uint32_t j = 0; j < d; j++) {
                    dot += qr[j] * kt[j];
                }
                w[t] = (double)g->logit_scale * dot;
                if (w[t] > mx) {
                    mx = w[t];
                }
            }
            if (mx == -INFINITY) {
                continue; /* sees nothing: zeros */
            }
            double den = 0.0;
            for (size_t t = 0; t < n_tok; t++) {
                if (pos[t] <= q_pos[i]) {
                    w[t] = exp(w[t] - mx);
                    den += w[t];
                }
            }
            for (size_t t = 0; t < n_tok; t++) {
                if (pos[t] <= q_pos[i]) {
                    const double *vt = v + t * kvd + (size_t)kv * d;
                    for (uint32_t j = 0; j < d; j++) {
                        o[j] += w[t] / den * vt[j];
                    }
                }
            }
        }
    }
    free(kr);
    free(w);
    free(qd);
    free(qr);
    return true;
}

/* ---- backends under test ------------------------------------------------------------------ */

#define TH_MAX_TOKENS 16

/* COMMVQ_TEST_BACKENDS split at commas, blanks trimmed, lower case. */
typedef struct th_filter {
    char tok[TH_MAX_TOKENS][32];
    int used[TH_MAX_TOKENS];  /* selected something, or named a backend we looked at */
    size_t n;
} th_filter;

static int ascii_lower(int c) {
    return (c >= 'A' && c <= 'Z') ? c - 'A' + 'a' : c;
}

/* A token is a context name or a GPU backend name: cpu-ref, cpu, cuda,
 * vulkan, cuda:N, vulkan:N (N decimal). */
static bool token_valid(const char *t) {
    if (!strcmp(t, "cpu-ref") || !strcmp(t, "cpu") || !strcmp(t, "cuda") || !strcmp(t, "vulkan")) {
        return true;
    }
    const char *digits = NULL;
    if (!strncmp(t, "cuda:", 5)) {
        digits = t + 5;
    } else if (!strncmp(t, "vulkan:", 7)) {
        digits = t + 7;
    }
    if (!digits || !*digits || strlen(digits) > 6) {
        return false;
    }
    for (; *digits; digits++) {
        if (*digits < '0' || *digits > '9') {
            return false;
        }
    }
    return true;
}

static bool filter_parse(const char *env, th_filter *f) {
    memset(f, 0, sizeof *f);
    const char *p = env;
    while (*p) {
        while (*p == ' ' || *p == '\t' || *p == ',') {
            p++;
        }
        if (!*p) {
            break;
        }
        const char *end = p;
        while (*end && *end != ',') {
            end++;
        }
        size_t len = (size_t)(end - p);
        while (len && (p[len - 1] == ' ' || p[len - 1] == '\t')) {
            len--;
        }
        if (f->n == TH_MAX_TOKENS || len >= sizeof f->tok[0]) {
            printf("[conformance] COMMVQ_TEST_BACKENDS='%s': too many or too long names\n", env);
            return false;
        }
        for (size_t i = 0; i < len; i++) {
            f->tok[f->n][i] = (char)ascii_lower((unsigned char)p[i]);
        }
        f->tok[f->n][len] = '\0';
        if (!token_valid(f->tok[f->n])) {
            printf("[conformance] COMMVQ_TEST_BACKENDS='%s': '%s' is not one of cpu-ref, cpu, "
                   "cuda, vulkan, cuda:N, vulkan:N\n",
                   env, f->tok[f->n]);
            return false;
        }
        f->n++;
        p = end;
    }
    return true;
}

/* Whether context `name` (of GPU backend `kind_name`, or NULL for the CPU
 * contexts) is selected: no filter, its own name, or its backend's name. */
static bool filter_selects(th_filter *f, const char *name, const char *kind_name) {
    if (f->n == 0) {
        return true;
    }
    bool hit = false;
    for (size_t i = 0; i < f->n; i++) {
        if (!strcmp(f->tok[i], name) || (kind_name && !strcmp(f->tok[i], kind_name))) {
            f->used[i] = 1;
            hit = true;
        }
    }
    return hit;
}

/* Whether any token names GPU backend `kind_name` or one of its devices.
 * mark: 1 marks the token naming the backend itself as looked at, 2 also
 * its device tokens (the backend is absent: its skip line covers them). */
static bool filter_mentions(th_filter *f, const char *kind_name, int mark) {
    if (f->n == 0) {
        return true;
    }
    const size_t kl = strlen(kind_name);
    bool hit = false;
    for (size_t i = 0; i < f->n; i++) {
        if (!strncmp(f->tok[i], kind_name, kl) && (f->tok[i][kl] == '\0' || f->tok[i][kl] == ':')) {
            hit = true;
            if (mark == 2 || (mark == 1 && f->tok[i][kl] == '\0')) {
                f->used[i] = 1;
            }
        }
    }
    return hit;
}

static const char *device_type_name(cvq_device_type t) {
    switch (t) {
    case CVQ_DEVICE_CPU: return "cpu";
    case CVQ_DEVICE_DISCRETE_GPU: return "discrete GPU";
    case CVQ_DEVICE_INTEGRATED_GPU: return "integrated GPU";
    case CVQ_DEVICE_VIRTUAL_GPU: return "virtual GPU";
    case CVQ_DEVICE_SOFTWARE: return "software";
    case CVQ_DEVICE_OTHER:
    default: return "other";
    }
}

/* "STATUS: message", without repeating the status when the library's
 * message already starts with its name. */
static const char *status_msg(cvq_status st, const char *msg, char *buf, size_t size) {
    const char *name = cvq_status_name(st);
    if (!msg) {
        msg = "";
    }
    if (!strncmp(msg, name, strlen(name))) {
        snprintf(buf, size, "%s", msg);
    } else {
        snprintf(buf, size, "%s: %s", name, msg);
    }
    return buf;
}

/* CPU context on device 0, named explicitly so that a COMMVQ_DEVICE meant
 * for a GPU does not reach it. */
static cvq_context *cpu_context(int reference) {
    cvq_context_params cp = cvq_context_default_params();
    cp.backend = CVQ_BACKEND_CPU;
    cp.device = 0;
    cp.cpu_reference = reference;
    cvq_context *ctx = NULL;
    const cvq_status st = cvq_context_create(&cp, &ctx);
    if (st != CVQ_OK) {
        char why[600];
        printf("[conformance] cannot create the CPU%s context: %s\n", reference ? " reference" : "",
               status_msg(st, cvq_last_error(), why, sizeof why));
        return NULL;
    }
    return ctx;
}

static th_backend *add_backend(th_backends *bs, const char *name, cvq_backend_kind kind, int index,
                               cvq_context *ctx, const char *device) {
    th_backend *b = &bs->b[bs->n++];
    memset(b, 0, sizeof *b);
    snprintf(b->name, sizeof b->name, "%s", name);
    snprintf(b->device, sizeof b->device, "%s", device);
    b->kind = kind;
    b->device_index = index;
    b->ctx = ctx;
    return b;
}

/* Every device of GPU backend `kind` that can be opened joins the list. */
static void add_gpu_backend(th_backends *bs, th_filter *f, cvq_backend_kind kind) {
    const char *kname = cvq_backend_name(kind);
    if (!filter_mentions(f, kname, 1)) {
        printf("[conformance] skip %s: not selected by COMMVQ_TEST_BACKENDS=%s\n", kname, bs->filter);
        return;
    }
    cvq_status st = cvq_backend_available(kind);
    if (st != CVQ_OK) {
        char why[600];
        printf("[conformance] skip %s: %s\n", kname, status_msg(st, cvq_last_error(), why, sizeof why));
        (void)filter_mentions(f, kname, 2);
        return;
    }
    size_t count = 0;
    st = cvq_list_devices(NULL, 0, &count);
    cvq_device_info *devs = count ? calloc(count, sizeof *devs) : NULL;
    if (st == CVQ_OK && count) {
        st = devs ? cvq_list_devices(devs, count, &count) : CVQ_ERR_OUT_OF_MEMORY;
    }
    if (st != CVQ_OK) {
        char why[600];
        printf("[conformance] skip %s: cvq_list_devices: %s\n", kname,
               status_msg(st, cvq_last_error(), why, sizeof why));
        free(devs);
        return;
    }
    size_t seen = 0;
    for (size_t i = 0; i < count; i++) {
        const cvq_device_info *di = &devs[i];
        if (di->backend != kind) {
            continue;
        }
        seen++;
        char name[24], desc[200];
        snprintf(name, sizeof name, "%s:%u", kname, di->index);
        snprintf(desc, sizeof desc, "%s, %s%s%s", di->name, device_type_name(di->type),
                 di->usable ? "" : ", listed as not usable: ", di->usable ? "" : di->note);
        if (!filter_selects(f, name, kname)) {
            printf("[conformance] skip %s (%s): not selected by COMMVQ_TEST_BACKENDS=%s\n", name,
                   desc, bs->filter);
            continue;
        }
        if (bs->n == TH_MAX_BACKENDS) {
            printf("[conformance] skip %s (%s): more than %d contexts\n", name, desc,
                   TH_MAX_BACKENDS);
            continue;
        }
        cvq_context_params cp = cvq_context_default_params();
        cp.backend = kind;
        cp.device = (int)di->index;
        cvq_context *ctx = NULL;
        st = cvq_context_create(&cp, &ctx);
        if (st != CVQ_OK) {
            char why[600];
            printf("[conformance] skip %s (%s): cvq_context_create: %s\n", name, desc,
                   status_msg(st, cvq_last_error(), why, sizeof why));
            continue;
        }
        add_backend(bs, name, kind, (int)di->index, ctx, desc);
    }
    if (seen == 0) {
        printf("[conformance] skip %s: available, but cvq_list_devices lists none of its devices\n",
               kname);
    }
    free(devs);
}

bool th_backends_open(th_backends *bs) {
    memset(bs, 0, sizeof *bs);
    const char *env = getenv("COMMVQ_TEST_BACKENDS");
    th_filter f;
    if (env && strlen(env) >= sizeof bs->filter) {
        printf("[conformance] COMMVQ_TEST_BACKENDS is longer than %zu characters\n",
               sizeof bs->filter - 1);
        return false;
    }
    snprintf(bs->filter, sizeof bs->filter, "%s", env ? env : "");
    if (!filter_parse(bs->filter, &f)) {
        return false;
    }
    bs->ref = cpu_context(1);
    bs->cpu = bs->ref ? cpu_context(0) : NULL;
    if (!bs->cpu) {
        th_backends_close(bs);
        return false;
    }
    cvq_device_info di;
    char cpu_desc[200] = "cpu";
    if (cvq_context_device(bs->cpu, &di) == CVQ_OK) {
        snprintf(cpu_desc, sizeof cpu_desc, "%s", di.name);
    }
    char desc[200];
    if (filter_selects(&f, "cpu-ref", NULL)) {
        snprintf(desc, sizeof desc, "%s, reference kernels", cpu_desc);
        add_backend(bs, "cpu-ref", CVQ_BACKEND_CPU, -1, bs->ref, desc);
    } else {
        printf("[conformance] skip cpu-ref: not selected by COMMVQ_TEST_BACKENDS=%s\n", bs->filter);
    }
    if (filter_selects(&f, "cpu", NULL)) {
        snprintf(desc, sizeof desc, "%s, default kernels", cpu_desc);
        add_backend(bs, "cpu", CVQ_BACKEND_CPU, -1, bs->cpu, desc);
    } else {
        printf("[conformance] skip cpu: not selected by COMMVQ_TEST_BACKENDS=%s\n", bs->filter);
    }
    add_gpu_backend(bs, &f, CVQ_BACKEND_CUDA);
    add_gpu_backend(bs, &f, CVQ_BACKEND_VULKAN);
    for (size_t i = 0; i < f.n; i++) {
        if (!f.used[i]) {
            printf("[conformance] skip %s: no such device\n", f.tok[i]);
        }
    }
    if (bs->n == 0) {
        printf("[conformance] no backend under test (COMMVQ_TEST_BACKENDS=%s): only the "
               "reference kernels are checked against the oracles\n",
               bs->filter);
    } else {
        printf("[conformance] backends under test:");
        for (size_t i = 0; i < bs->n; i++) {
            printf("%s %s (%s)", i ? "," : "", bs->b[i].name, bs->b[i].device);
        }
        printf("\n");
    }
    return true;
}

void th_backends_close(th_backends *bs) {
    for (size_t i = 0; i < bs->n; i++) {
        if (bs->b[i].ctx != bs->ref && bs->b[i].ctx != bs->cpu) {
            cvq_context_free(bs->b[i].ctx);
        }
    }
    cvq_context_free(bs->ref);
    cvq_context_free(bs->cpu);
    memset(bs, 0, sizeof *bs);
}

void th_tally_reset(th_backends *bs) {
    for (size_t i = 0; i < bs->n; i++) {
        bs->b[i].n_run = 0;
        bs->b[i].n_skip = 0;
        bs->b[i].worst = 0.0;
        bs->b[i].first_skip[0] = '\0';
    }
}

void th_tally_run(th_backend *b) {
    b->n_run++;
}

void th_tally_skip(th_backend *b, const char *case_name, const char *call, cvq_status st,
                   const char *message) {
    if (b->n_skip++ == 0) {
        const int w = snprintf(b->first_skip, sizeof b->first_skip, "%s: %s -> ", case_name, call);
        if (w >= 0 && (size_t)w < sizeof b->first_skip) {
            status_msg(st, message, b->first_skip + w, sizeof b->first_skip - (size_t)w);
        }
    }
}

bool th_unsupported(th_backend *b, const char *case_name, const char *call, cvq_status st) {
    if (st != CVQ_ERR_UNSUPPORTED) {
        return false;
    }
    th_tally_skip(b, case_name, call, st, cvq_last_error());
    return true;
}

const char *th_tally_str(const th_backends *bs, int show_worst, char *buf, size_t size) {
    size_t used = 0;
    buf[0] = '\0';
    if (bs->n == 0) {
        snprintf(buf, size, "none");
        return buf;
    }
    for (size_t i = 0; i < bs->n && used < size; i++) {
        const th_backend *b = &bs->b[i];
        int w;
        if (show_worst) {
            w = snprintf(buf + used, size - used, "%s%s %zu/%zu [%.3f]", i ? ", " : "", b->name,
                         b->n_run, b->n_skip, b->worst);
        } else {
            w = snprintf(buf + used, size - used, "%s%s %zu/%zu", i ? ", " : "", b->name,
                         b->n_run, b->n_skip);
        }
        if (w < 0) {
            break;
        }
        used += (size_t)w;
    }
    return buf;
}

void th_tally_print_skips(const th_backends *bs, const char *section) {
    for (size_t i = 0; i < bs->n; i++) {
        const th_backend *b = &bs->b[i];
        if (b->n_skip) {
            printf("%s skipped on %s: %zu (unsupported; first: %s)\n", section, b->name, b->n_skip,
                   b->first_skip);
        }
    }
}
