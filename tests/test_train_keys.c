/*
 * Key codebook training (core/train_keys.c, method note section 6):
 *   - recovery: data drawn from a planted random commutative codebook plus
 *     noise; R = 1 training reaches a data MSE <= 1.1x the planted
 *     codebook's, both measured here by brute force in double over the 4096
 *     explicit centres (independent of the trainer's decomposition);
 *   - the M-step solve against a brute-force weighted least-squares
 *     solution (real normal equations, Gaussian elimination, double);
 *   - hard EM (Lloyd): the hard MSE of successive iterates never increases;
 *     soft EM: the kept codebook's MSE is the lowest reported;
 *   - reproducibility: bit-identical key_w with 1 and 2 threads and for the
 *     same seed; greedy stages: the first R1 stages of an R2 training equal
 *     an R1 training; resuming at first_stage equals one run;
 *     extract_stages copies exact bytes;
 *   - errors: non-finite data, bad parameters, cancel via the progress
 *     callback (complete stages kept), round trip through a .cvq file.
 * Seeds are printed on failure.
 */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commvq.h"
#include "commvq_train.h"
#include "train_keys_internal.h"

/* ---- random numbers (independent of the library's) ------------------------ */

static uint64_t g_rng;
static uint64_t rnd_u64(void) {
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double rnd_uniform(void) { return ((double)(rnd_u64() >> 11) + 0.5) / 9007199254740992.0; }
static double rnd_normal(void) {
    const double u1 = rnd_uniform(), u2 = rnd_uniform();
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* ---- geometry and planted data --------------------------------------------- */

static cvq_geometry geom(uint32_t hkv, uint32_t d, uint32_t R, cvq_key_scale_mode mode) {
    cvq_geometry g;
    memset(&g, 0, sizeof g);
    g.n_layers = 2;
    g.n_q_heads = hkv;
    g.n_kv_heads = hkv;
    g.head_dim = d;
    g.key_stages = R;
    g.key_scale = mode;
    g.pair_layout = CVQ_PAIRS_ROTATE_HALF;
    g.value_bits = 8;
    g.value_group_width = d;
    g.value_hidden = 8;
    return g;
}

static cvq_codebook *make_cb(const cvq_geometry *g) {
    double theta[128];
    assert_int_equal(cvq_rope_freqs_default(g->head_dim, 10000.0, theta), CVQ_OK);
    cvq_codebook *cb = NULL;
    assert_int_equal(cvq_codebook_create(g, theta, NULL, &cb), CVQ_OK);
    return cb;
}

/* Planted sub-codes w[h][r][a][p][2], stage r with sd sd0 * q^r. */
static double *plant(const cvq_geometry *g, double sd0, double q, uint64_t seed) {
    const size_t P = g->head_dim / 2, R = g->key_stages, H = g->n_kv_heads;
    double *w = malloc(H * R * 64 * P * 2 * sizeof(double));
    g_rng = seed;
    for (size_t h = 0; h < H; h++) {
        double sd = sd0;
        for (size_t r = 0; r < R; r++) {
            double *ws = w + (h * R + r) * 64 * P * 2;
            for (size_t i = 0; i < 64 * P * 2; i++) ws[i] = sd * rnd_normal();
            sd *= q;
        }
    }
    return w;
}

/* Keys [T][H][d] float: k = s_t * (sum_r c(A_r, B_r) + noise), codes
 * uniform, s_t uniform in [0.5, 2]. Rotate-half layout. */
static float *gen_keys(const cvq_geometry *g, const double *w, size_t T, double noise,
                       uint64_t seed) {
    const size_t P = g->head_dim / 2, R = g->key_stages, H = g->n_kv_heads, d = g->head_dim;
    float *k = malloc(T * H * d * sizeof(float));
    g_rng = seed;
    for (size_t t = 0; t < T; t++) {
        const double s = 0.5 + 1.5 * rnd_uniform();
        for (size_t h = 0; h < H; h++) {
            double x[256];
            for (size_t i = 0; i < d; i++) x[i] = noise * rnd_normal();
            for (size_t r = 0; r < R; r++) {
                const size_t A = rnd_u64() % 64, B = rnd_u64() % 64;
                const double *ws = w + (h * R + r) * 64 * P * 2;
                for (size_t p = 0; p < P; p++) {
                    /* c_p = w_A,p + i*w_B,p = (x_A - y_B, y_A + x_B) */
                    x[p] += ws[(A * P + p) * 2] - ws[(B * P + p) * 2 + 1];
                    x[p + P] += ws[(A * P + p) * 2 + 1] + ws[(B * P + p) * 2];
                }
            }
            for (size_t i = 0; i < d; i++) k[(t * H + h) * d + i] = (float)(s * x[i]);
        }
    }
    return k;
}

/* Brute-force greedy MSE in double: keys normalised per token (token mode)
 * or per head, then per stage the nearest of the 4096 explicit centres
 * c(A,B) = w_A + i*w_B (rotate-half layout); returns sum ||z_R||^2 / (n*d)
 * over the stages r < R_use of the sub-codes w (double or float, w_f). */
static double brute_mse(const cvq_geometry *g, const double *w, const float *w_f,
                        uint32_t R_use, const float *k, size_t T) {
    const size_t P = g->head_dim / 2, R = g->key_stages, H = g->n_kv_heads, d = g->head_dim;
    double *cent = malloc(4096 * 256 * sizeof(double));
    double *z = malloc(T * H * d * sizeof(double));
    for (size_t t = 0; t < T; t++) {
        double ss = 0.0;
        for (size_t h = 0; h < H; h++) {
            double sh = 0.0;
            for (size_t i = 0; i < d; i++) {
                const double v = k[(t * H + h) * d + i];
                sh += v * v;
            }
            if (g->key_scale == CVQ_KEY_SCALE_HEAD) {
                for (size_t i = 0; i < d; i++)
                    z[(t * H + h) * d + i] = sh > 0 ? k[(t * H + h) * d + i] / sqrt(sh) : 0.0;
            }
            ss += sh;
        }
        if (g->key_scale == CVQ_KEY_SCALE_TOKEN)
            for (size_t i = 0; i < H * d; i++)
                z[t * H * d + i] = ss > 0 ? k[t * H * d + i] / sqrt(ss) : 0.0;
    }
    double err = 0.0;
    for (size_t h = 0; h < H; h++) {
        for (size_t r = 0; r < R_use; r++) {
            const size_t off = (h * R + r) * 64 * P * 2;
#define WV(i) (w ? w[off + (i)] : (double)w_f[off + (i)])
            for (size_t A = 0; A < 64; A++)
                for (size_t B = 0; B < 64; B++)
                    for (size_t p = 0; p < P; p++) {
                        /* c_p(A,B) = (x_A - y_B, y_A + x_B) */
                        cent[(A * 64 + B) * d + p] =
                            WV((A * P + p) * 2) - WV((B * P + p) * 2 + 1);
                        cent[(A * 64 + B) * d + p + P] =
                            WV((A * P + p) * 2 + 1) + WV((B * P + p) * 2);
                    }
#undef WV
            for (size_t t = 0; t < T; t++) {
                double *zt = z + (t * H + h) * d;
                double best = INFINITY;
                size_t kb = 0;
                for (size_t c = 0; c < 4096; c++) {
                    const double *cc = cent + c * d;
                    double e = 0.0;
                    for (size_t i = 0; i < d; i++) e += (zt[i] - cc[i]) * (zt[i] - cc[i]);
                    if (e < best) {
                        best = e;
                        kb = c;
                    }
                }
                for (size_t i = 0; i < d; i++) zt[i] -= cent[kb * d + i];
            }
        }
        for (size_t t = 0; t < T; t++)
            for (size_t i = 0; i < d; i++) err += z[(t * H + h) * d + i] * z[(t * H + h) * d + i];
    }
    free(cent);
    free(z);
    return err / ((double)T * H * d);
}

static const float *key_w(const cvq_codebook *cb, uint32_t layer) {
    const float *p = NULL;
    assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_KEY_W, layer, 0, &p), CVQ_OK);
    return p;
}
static size_t key_w_count(const cvq_codebook *cb) {
    cvq_tensor_info ti;
    assert_int_equal(cvq_codebook_tensor_info(cb, CVQ_T_KEY_W, &ti), CVQ_OK);
    return (size_t)ti.n_elements;
}

static cvq_train_data data_of(const float *k, size_t T) {
    cvq_train_data dd;
    memset(&dd, 0, sizeof dd);
    dd.n_tokens = T;
    dd.dtype = CVQ_F32;
    dd.keys = k;
    return dd;
}

/* ---- progress recording ---------------------------------------------------- */

typedef struct prog_log {
    size_t n;
    double loss[4096];
    uint32_t stage[4096], part[4096], step[4096];
    int cancel_at; /* cancel when n reaches this (0: never) */
} prog_log;

static int record(void *user, const cvq_train_progress *p) {
    prog_log *l = user;
    if (l->n < 4096) {
        l->loss[l->n] = p->loss;
        l->stage[l->n] = p->stage;
        l->part[l->n] = p->part;
        l->step[l->n] = p->step;
    }
    l->n++;
    return l->cancel_at > 0 && (int)l->n >= l->cancel_at;
}

/* ---- tests -------------------------------------------------------------------- */

/* Common small setup: Hkv = 2 (token scale), d = 64, R stages, T tokens of
 * planted data with stage sd 0.06 * 0.5^r and noise 0.005. */
typedef struct small_set {
    cvq_geometry g;
    double *w;
    float *k;
    size_t T;
} small_set;

static small_set small_data(uint32_t R, size_t T, uint64_t seed) {
    small_set s;
    s.g = geom(2, 64, R, CVQ_KEY_SCALE_TOKEN);
    s.w = plant(&s.g, 0.06, 0.5, seed);
    s.k = gen_keys(&s.g, s.w, T, 0.005, seed + 1);
    s.T = T;
    return s;
}
static void small_free(small_set *s) {
    free(s->w);
    free(s->k);
}

static cvq_key_train_params fast_params(uint64_t seed) {
    cvq_key_train_params kp = cvq_key_train_default_params();
    kp.seed = seed;
    kp.steps = 8;
    return kp;
}

/* Trains layer 1 of a fresh codebook; returns it. */
static cvq_codebook *train_fresh(const cvq_geometry *g, const float *k, size_t T,
                                 const cvq_key_train_params *kp, cvq_train_report *rep) {
    cvq_codebook *cb = make_cb(g);
    cvq_train_data dd = data_of(k, T);
    cvq_status st = cvq_train_keys(cb, 1, &dd, kp, rep);
    if (st != CVQ_OK) print_message("  train: %s\n", cvq_last_error());
    assert_int_equal(st, CVQ_OK);
    return cb;
}

static void test_recovery_r1(void **state) {
    (void)state;
    const uint64_t seed = 11;
    cvq_geometry g = geom(1, 64, 1, CVQ_KEY_SCALE_HEAD);
    double *w = plant(&g, 0.088, 1.0, seed);
    const size_t T = 6000;
    float *k = gen_keys(&g, w, T, 0.01, seed + 1);
    const double planted = brute_mse(&g, w, NULL, 1, k, T);

    cvq_key_train_params kp = cvq_key_train_default_params();
    kp.seed = seed;
    kp.steps = 40;
    cvq_train_report rep;
    cvq_codebook *cb = train_fresh(&g, k, T, &kp, &rep);
    const double trained = brute_mse(&g, NULL, key_w(cb, 1), 1, k, T);
    print_message("  recovery R=1: planted MSE %.6g, trained %.6g (ratio %.3f), rel_error %.4g, "
                  "%llu steps, %.2f s (seed %llu)\n",
                  planted, trained, trained / planted, rep.rel_error,
                  (unsigned long long)rep.steps_run, rep.seconds, (unsigned long long)seed);
    assert_true(trained <= 1.1 * planted);
    /* the report's relative error is the data's, measured independently:
     * with head scale and one head, sum||k - k_hat||^2 / sum||k||^2 is
     * close to the mean of ||z - c||^2 = d * MSE (scales vary, so loosely) */
    assert_true(rep.rel_error > 0.0 && rep.rel_error < 3.0 * 64.0 * trained);
    assert_int_equal(rep.tokens_used, T);
    cvq_codebook_free(cb);
    free(k);
    free(w);
}

/* Brute-force weighted least squares for one pair: unknowns
 * theta = (x_0, y_0, ..., x_63, y_63); each weighted term contributes two
 * real residuals z_re - (x_A - y_B) and z_im - (y_A + x_B). Normal
 * equations solved by Gaussian elimination with partial pivoting. */
static void brute_ls(size_t n, const uint16_t *codes, const double *wts, uint32_t per,
                     const double *zre, const double *zim, double *theta) {
    static double M[128][129];
    memset(M, 0, sizeof M);
    for (size_t t = 0; t < n; t++)
        for (uint32_t j = 0; j < per; j++) {
            const uint32_t A = codes[t * per + j] / 64, B = codes[t * per + j] % 64;
            const double wt = wts[t * per + j];
            /* row 1: x_A - y_B = zre; row 2: y_A + x_B = zim */
            int idx1[2] = {(int)(2 * A), (int)(2 * B + 1)};
            double c1[2] = {1.0, -1.0};
            int idx2[2] = {(int)(2 * A + 1), (int)(2 * B)};
            double c2[2] = {1.0, 1.0};
            for (int u = 0; u < 2; u++) {
                for (int v = 0; v < 2; v++) {
                    M[idx1[u]][idx1[v]] += wt * c1[u] * c1[v];
                    M[idx2[u]][idx2[v]] += wt * c2[u] * c2[v];
                }
                M[idx1[u]][128] += wt * c1[u] * zre[t];
                M[idx2[u]][128] += wt * c2[u] * zim[t];
            }
        }
    for (int c = 0; c < 128; c++) {
        int piv = c;
        for (int r = c + 1; r < 128; r++)
            if (fabs(M[r][c]) > fabs(M[piv][c])) piv = r;
        if (piv != c)
            for (int j = 0; j < 129; j++) {
                const double x = M[c][j]; M[c][j] = M[piv][j]; M[piv][j] = x;
            }
        for (int r = 0; r < 128; r++) {
            if (r == c) continue;
            const double f = M[r][c] / M[c][c];
            for (int j = c; j < 129; j++) M[r][j] -= f * M[c][j];
        }
    }
    for (int c = 0; c < 128; c++) theta[c] = M[c][128] / M[c][c];
}

static void test_mstep_vs_bruteforce(void **state) {
    (void)state;
    const uint64_t seed = 21;
    const uint32_t P = 2, per = 3;
    const size_t n = 3000;
    g_rng = seed;
    uint16_t *codes = malloc(n * per * sizeof(uint16_t));
    double *wts = malloc(n * per * sizeof(double));
    double *zr = malloc(n * P * sizeof(double)), *zi = malloc(n * P * sizeof(double));
    double N[64 * 64], SR[64 * 2 * 2], SC[64 * 2 * 2], wprev[64 * 2 * 2], wout[64 * 2 * 2];
    memset(N, 0, sizeof N);
    memset(SR, 0, sizeof SR);
    memset(SC, 0, sizeof SC);
    for (size_t i = 0; i < 64 * P * 2; i++) wprev[i] = rnd_normal();
    for (size_t t = 0; t < n; t++) {
        double sum = 0.0;
        for (uint32_t j = 0; j < per; j++) {
            codes[t * per + j] = (uint16_t)(rnd_u64() % 4096);
            wts[t * per + j] = 0.05 + rnd_uniform();
            sum += wts[t * per + j];
        }
        for (uint32_t j = 0; j < per; j++) wts[t * per + j] /= sum; /* soft weights */
        for (uint32_t p = 0; p < P; p++) {
            zr[t * P + p] = rnd_normal();
            zi[t * P + p] = rnd_normal();
        }
        for (uint32_t j = 0; j < per; j++) {
            const uint32_t A = codes[t * per + j] / 64, B = codes[t * per + j] % 64;
            const double wt = wts[t * per + j];
            N[A * 64 + B] += wt;
            for (uint32_t p = 0; p < P; p++) {
                SR[(A * P + p) * 2] += wt * zr[t * P + p];
                SR[(A * P + p) * 2 + 1] += wt * zi[t * P + p];
                SC[(B * P + p) * 2] += wt * zr[t * P + p];
                SC[(B * P + p) * 2 + 1] += wt * zi[t * P + p];
            }
        }
    }
    /* every sub-code must carry weight >= 1 so that no pull toward w_prev
     * applies (ridge 0): the solution is then the plain least squares */
    for (uint32_t a = 0; a < 64; a++) {
        double c = 0.0;
        for (uint32_t b = 0; b < 64; b++) c += N[a * 64 + b] + N[b * 64 + a];
        assert_true(c >= 1.0);
    }
    assert_int_equal(cvq__key_mstep(P, N, SR, SC, wprev, 0.0, wout), 0);
    double maxd = 0.0, maxv = 0.0;
    for (uint32_t p = 0; p < P; p++) {
        double zre[3000], zim[3000], theta[128];
        for (size_t t = 0; t < n; t++) {
            zre[t] = zr[t * P + p];
            zim[t] = zi[t * P + p];
        }
        brute_ls(n, codes, wts, per, zre, zim, theta);
        for (uint32_t a = 0; a < 64; a++)
            for (int c = 0; c < 2; c++) {
                const double x = wout[(a * P + p) * 2 + c], y = theta[2 * a + c];
                if (fabs(x - y) > maxd) maxd = fabs(x - y);
                if (fabs(y) > maxv) maxv = fabs(y);
            }
    }
    print_message("  M-step vs brute force: max |diff| %.3g (max |w| %.3g, seed %llu)\n", maxd,
                  maxv, (unsigned long long)seed);
    assert_true(maxd <= 1e-9 * (maxv > 1.0 ? maxv : 1.0));

    /* a dead sub-code (no weight at all) stays exactly at w_prev */
    for (uint32_t b = 0; b < 64; b++) N[5 * 64 + b] = N[b * 64 + 5] = 0.0;
    for (uint32_t p = 0; p < P; p++)
        for (int c = 0; c < 2; c++) SR[(5 * P + p) * 2 + c] = SC[(5 * P + p) * 2 + c] = 0.0;
    assert_int_equal(cvq__key_mstep(P, N, SR, SC, wprev, CVQ__KEY_RIDGE, wout), 0);
    for (uint32_t i = 0; i < P * 2; i++)
        assert_true(fabs(wout[5 * P * 2 + i] - wprev[5 * P * 2 + i]) < 1e-12);
    free(codes);
    free(wts);
    free(zr);
    free(zi);
}

static void test_hard_em_monotone(void **state) {
    (void)state;
    const uint64_t seed = 31;
    small_set s = small_data(1, 3000, seed);
    cvq_key_train_params kp = fast_params(seed);
    kp.hard = 1;
    kp.max_splits = 0; /* plain Lloyd iterations */
    kp.patience = 0;
    kp.steps = 12;
    prog_log *lg = calloc(1, sizeof *lg);
    kp.progress = record;
    kp.progress_user = lg;
    cvq_codebook *cb = train_fresh(&s.g, s.k, s.T, &kp, NULL);
    size_t checked = 0;
    for (size_t i = 1; i < lg->n; i++) {
        if (lg->part[i] != lg->part[i - 1] || lg->step[i] == 0) continue;
        if (!(lg->loss[i] <= lg->loss[i - 1] * (1.0 + 1e-9))) {
            print_message("  head %u step %u: hard MSE %.12g after %.12g (seed %llu)\n",
                          lg->part[i], lg->step[i], lg->loss[i], lg->loss[i - 1],
                          (unsigned long long)seed);
            fail();
        }
        checked++;
    }
    assert_int_equal(checked, 2 * 12); /* 2 heads, 13 evaluations each */
    /* the first iterate improved on something */
    assert_true(lg->loss[12] < lg->loss[0]);
    free(lg);
    cvq_codebook_free(cb);

    /* soft EM with splits: the kept codebook is the best one reported */
    small_set s1 = small_data(1, 3000, seed + 7);
    cvq_geometry g1 = geom(1, 64, 1, CVQ_KEY_SCALE_HEAD);
    kp = fast_params(seed);
    kp.steps = 20;
    lg = calloc(1, sizeof *lg);
    kp.progress = record;
    kp.progress_user = lg;
    /* one head of the small set, head-scaled: keep head 0 of each token */
    float *k1 = malloc(s1.T * 64 * sizeof(float));
    for (size_t t = 0; t < s1.T; t++) memcpy(k1 + t * 64, s1.k + t * 128, 64 * sizeof(float));
    cb = train_fresh(&g1, k1, s1.T, &kp, NULL);
    double lo = INFINITY;
    for (size_t i = 0; i < lg->n; i++) lo = lo < lg->loss[i] ? lo : lg->loss[i];
    const double kept = brute_mse(&g1, NULL, key_w(cb, 1), 1, k1, s1.T);
    print_message("  soft EM: best reported %.8g, kept codebook (brute force) %.8g\n", lo, kept);
    assert_true(fabs(kept - lo) <= 1e-3 * lo);
    free(lg);
    free(k1);
    cvq_codebook_free(cb);
    small_free(&s1);
    small_free(&s);
}

static void test_threads_and_seed(void **state) {
    (void)state;
    const uint64_t seed = 41;
    small_set s = small_data(1, 3000, seed); /* 12 chunks of 256 */
    cvq_key_train_params kp = fast_params(seed);
    /* warm soft weights: many inexact terms, so that any change in the
     * order of the sums would show in the bits */
    kp.tau_start = 0.05;
    kp.tau_end = 0.02;
    kp.steps = 3;
    kp.progress = record; /* the losses are double sums over all chunks */
    prog_log *la = calloc(1, sizeof *la), *lb = calloc(1, sizeof *lb);
    prog_log *lc = calloc(1, sizeof *lc);
    kp.n_threads = 1;
    kp.progress_user = la;
    cvq_codebook *a = train_fresh(&s.g, s.k, s.T, &kp, NULL);
    kp.n_threads = 2;
    kp.progress_user = lb;
    cvq_codebook *b = train_fresh(&s.g, s.k, s.T, &kp, NULL);
    kp.n_threads = 5; /* more threads than cores: chunks finish out of order */
    kp.progress_user = lc;
    cvq_codebook *c = train_fresh(&s.g, s.k, s.T, &kp, NULL);
    const size_t nw = key_w_count(a);
    assert_true(la->n > 0 && la->n == lb->n && la->n == lc->n);
    if (memcmp(key_w(a, 1), key_w(b, 1), nw * sizeof(float)) != 0 ||
        memcmp(key_w(a, 1), key_w(c, 1), nw * sizeof(float)) != 0 ||
        memcmp(la->loss, lb->loss, la->n * sizeof(double)) != 0 ||
        memcmp(la->loss, lc->loss, la->n * sizeof(double)) != 0) {
        print_message("  key_w or the losses differ between 1, 2 and 5 threads (seed %llu)\n",
                      (unsigned long long)seed);
        fail();
    }
    /* default schedule: same seed again identical, another seed different */
    small_set s2 = small_data(2, 1000, seed);
    kp = fast_params(seed);
    cvq_codebook *d = train_fresh(&s2.g, s2.k, s2.T, &kp, NULL);
    cvq_codebook *d2 = train_fresh(&s2.g, s2.k, s2.T, &kp, NULL);
    const size_t nw2 = key_w_count(d);
    assert_memory_equal(key_w(d, 1), key_w(d2, 1), nw2 * sizeof(float));
    kp.seed = seed + 1;
    cvq_codebook *e = train_fresh(&s2.g, s2.k, s2.T, &kp, NULL);
    assert_true(memcmp(key_w(d, 1), key_w(e, 1), nw2 * sizeof(float)) != 0);
    /* layer 0 untouched (zero) */
    const float *l0 = key_w(d, 0);
    for (size_t i = 0; i < nw2; i++) assert_true(l0[i] == 0.0f);
    /* the note records the run */
    assert_non_null(strstr(cvq_codebook_note(d), "train-keys layer 1"));
    assert_non_null(strstr(cvq_codebook_note(d), "seed 41"));
    free(la);
    free(lb);
    free(lc);
    cvq_codebook_free(a);
    cvq_codebook_free(b);
    cvq_codebook_free(c);
    cvq_codebook_free(d);
    cvq_codebook_free(d2);
    cvq_codebook_free(e);
    small_free(&s2);
    small_free(&s);
}

static void test_greedy_extract_resume(void **state) {
    (void)state;
    const uint64_t seed = 51;
    small_set s3 = small_data(3, 1200, seed);
    cvq_key_train_params kp = fast_params(seed);
    cvq_train_report rep3, rep2;
    cvq_codebook *c3 = train_fresh(&s3.g, s3.k, s3.T, &kp, &rep3);
    cvq_geometry g2 = s3.g;
    g2.key_stages = 2;
    cvq_codebook *c2 = train_fresh(&g2, s3.k, s3.T, &kp, &rep2);
    print_message("  rel_error R=2 %.5g, R=3 %.5g\n", rep2.rel_error, rep3.rel_error);
    assert_true(rep3.rel_error < rep2.rel_error);
    const size_t stage_f = 64 * 32 * 2;
    /* [h][r][...]: head h's first 2 stages of c3 equal c2's */
    for (uint32_t h = 0; h < 2; h++)
        assert_memory_equal(key_w(c3, 1) + (size_t)h * 3 * stage_f,
                            key_w(c2, 1) + (size_t)h * 2 * stage_f, 2 * stage_f * sizeof(float));

    /* extract_stages: same bytes as the R = 2 training, values copied */
    float *val_e = NULL;
    assert_int_equal(cvq_codebook_tensor_data(c3, CVQ_T_VAL_E, 0, 1, &val_e), CVQ_OK);
    for (size_t i = 0; i < 8 * 64; i++) val_e[i] = (float)i * 0.25f;
    assert_int_equal(cvq_codebook_commit(c3), CVQ_OK);
    cvq_codebook *x = NULL;
    assert_int_equal(cvq_codebook_extract_stages(c3, 2, &x), CVQ_OK);
    cvq_geometry gx;
    assert_int_equal(cvq_codebook_geometry(x, &gx), CVQ_OK);
    assert_int_equal(gx.key_stages, 2);
    assert_int_equal(key_w_count(x), key_w_count(c2));
    for (uint32_t l = 0; l < 2; l++)
        assert_memory_equal(key_w(x, l), key_w(c2, l), key_w_count(x) * sizeof(float));
    const float *xe = NULL;
    assert_int_equal(cvq_codebook_tensor_cdata(x, CVQ_T_VAL_E, 0, 1, &xe), CVQ_OK);
    assert_memory_equal(xe, val_e, 8 * 64 * sizeof(float));
    assert_non_null(strstr(cvq_codebook_note(x), "train-keys layer 1"));
    assert_non_null(strstr(cvq_codebook_note(x), "first 2 of 3"));
    cvq_codebook_free(x);
    assert_int_equal(cvq_codebook_extract_stages(c3, 0, &x), CVQ_ERR_INVALID_ARGUMENT);
    assert_null(x);
    assert_int_equal(cvq_codebook_extract_stages(c3, 4, &x), CVQ_ERR_INVALID_ARGUMENT);

    /* resume: stage 0 alone, then from first_stage 1 (in memory, and after a
     * round trip through an fp32 .cvq file) equals one run */
    cvq_codebook *r = make_cb(&s3.g);
    cvq_train_data dd = data_of(s3.k, s3.T);
    kp.n_stages = 1;
    assert_int_equal(cvq_train_keys(r, 1, &dd, &kp, NULL), CVQ_OK);
    char path[1024];
    const char *tmp = getenv("COMMVQ_TEST_TMP");
    snprintf(path, sizeof path, "%s/test_train_keys_resume.cvq", tmp ? tmp : "/tmp");
    assert_int_equal(cvq_codebook_save(r, path, 0), CVQ_OK);
    cvq_codebook *r2 = NULL;
    assert_int_equal(cvq_codebook_load(path, NULL, &r2), CVQ_OK);
    kp.first_stage = 1;
    kp.n_stages = 0;
    assert_int_equal(cvq_train_keys(r, 1, &dd, &kp, NULL), CVQ_OK);
    assert_int_equal(cvq_train_keys(r2, 1, &dd, &kp, NULL), CVQ_OK);
    assert_memory_equal(key_w(r, 1), key_w(c3, 1), key_w_count(c3) * sizeof(float));
    assert_memory_equal(key_w(r2, 1), key_w(c3, 1), key_w_count(c3) * sizeof(float));
    assert_non_null(strstr(cvq_codebook_note(r2), "(resumed)"));

    /* round trip: the trained codebook encodes identically after reload */
    assert_int_equal(cvq_codebook_save(c3, path, 0), CVQ_OK);
    cvq_codebook *c3b = NULL;
    assert_int_equal(cvq_codebook_load(path, NULL, &c3b), CVQ_OK);
    cvq_context *ctx = NULL;
    cvq_context_params cp = cvq_context_default_params();
    cp.backend = CVQ_BACKEND_CPU;
    assert_int_equal(cvq_context_create(&cp, &ctx), CVQ_OK);
    uint16_t *ca = malloc(s3.T * 2 * 3 * sizeof(uint16_t));
    uint16_t *cb2 = malloc(s3.T * 2 * 3 * sizeof(uint16_t));
    float *sa = malloc(s3.T * sizeof(float)), *sb = malloc(s3.T * sizeof(float));
    assert_int_equal(cvq_encode_keys(ctx, c3, 1, s3.k, CVQ_F32, s3.T, ca, sa), CVQ_OK);
    assert_int_equal(cvq_encode_keys(ctx, c3b, 1, s3.k, CVQ_F32, s3.T, cb2, sb), CVQ_OK);
    assert_memory_equal(ca, cb2, s3.T * 2 * 3 * sizeof(uint16_t));
    remove(path);
    free(ca);
    free(cb2);
    free(sa);
    free(sb);
    cvq_context_free(ctx);
    cvq_codebook_free(c3b);
    cvq_codebook_free(r);
    cvq_codebook_free(r2);
    cvq_codebook_free(c2);
    cvq_codebook_free(c3);
    small_free(&s3);
}

static void test_dtypes_and_subsample(void **state) {
    (void)state;
    const uint64_t seed = 61;
    small_set s = small_data(1, 800, seed);
    const size_t n = s.T * 2 * 64;
    /* f16 data, and the same values as f32: identical training */
    uint16_t *h = malloc(n * sizeof(uint16_t));
    float *hf = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        h[i] = cvq_f32_to_f16(s.k[i]);
        hf[i] = cvq_f16_to_f32(h[i]);
    }
    cvq_key_train_params kp = fast_params(seed);
    cvq_codebook *a = make_cb(&s.g), *b = make_cb(&s.g);
    cvq_train_data dd = data_of(hf, s.T);
    assert_int_equal(cvq_train_keys(a, 1, &dd, &kp, NULL), CVQ_OK);
    dd.keys = h;
    dd.dtype = CVQ_F16;
    assert_int_equal(cvq_train_keys(b, 1, &dd, &kp, NULL), CVQ_OK);
    assert_memory_equal(key_w(a, 1), key_w(b, 1), key_w_count(a) * sizeof(float));
    /* bf16 bits: the top half of an f32 is exact */
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &s.k[i], 4);
        h[i] = (uint16_t)(u >> 16);
        hf[i] = cvq_bf16_to_f32(h[i]);
    }
    cvq_codebook_free(a);
    cvq_codebook_free(b);
    a = make_cb(&s.g);
    b = make_cb(&s.g);
    dd = data_of(hf, s.T);
    assert_int_equal(cvq_train_keys(a, 1, &dd, &kp, NULL), CVQ_OK);
    dd.keys = h;
    dd.dtype = CVQ_BF16;
    assert_int_equal(cvq_train_keys(b, 1, &dd, &kp, NULL), CVQ_OK);
    assert_memory_equal(key_w(a, 1), key_w(b, 1), key_w_count(a) * sizeof(float));
    cvq_codebook_free(a);
    cvq_codebook_free(b);

    /* subsample: tokens_used, reproducible; an all-zero token is harmless */
    memset(s.k, 0, 2 * 64 * sizeof(float));
    kp.max_tokens = 300;
    cvq_train_report r1, r2;
    a = train_fresh(&s.g, s.k, s.T, &kp, &r1);
    b = train_fresh(&s.g, s.k, s.T, &kp, &r2);
    assert_int_equal(r1.tokens_used, 300);
    assert_memory_equal(key_w(a, 1), key_w(b, 1), key_w_count(a) * sizeof(float));
    assert_true(r1.rel_error == r2.rel_error && r1.rel_error > 0.0 && r1.rel_error < 1.0);
    cvq_codebook_free(a);
    cvq_codebook_free(b);
    free(h);
    free(hf);
    small_free(&s);
}

static void test_errors(void **state) {
    (void)state;
    const uint64_t seed = 71;
    small_set s = small_data(2, 300, seed);
    cvq_codebook *cb = make_cb(&s.g);
    cvq_key_train_params kp = fast_params(seed);
    cvq_train_data dd = data_of(s.k, s.T);
    const size_t nw = key_w_count(cb);
    float *zero = calloc(nw, sizeof(float));

    /* non-finite data: refused, nothing written */
    s.k[(123 * 2 + 1) * 64 + 7] = NAN;
    assert_int_equal(cvq_train_keys(cb, 1, &dd, &kp, NULL), CVQ_ERR_NONFINITE_INPUT);
    assert_non_null(strstr(cvq_last_error(), "token 123"));
    s.k[(123 * 2 + 1) * 64 + 7] = INFINITY;
    assert_int_equal(cvq_train_keys(cb, 1, &dd, &kp, NULL), CVQ_ERR_NONFINITE_INPUT);
    s.k[(123 * 2 + 1) * 64 + 7] = 0.5f;
    assert_memory_equal(key_w(cb, 1), zero, nw * sizeof(float));

    /* bad arguments */
    assert_int_equal(cvq_train_keys(NULL, 1, &dd, &kp, NULL), CVQ_ERR_NULL_POINTER);
    assert_int_equal(cvq_train_keys(cb, 1, NULL, &kp, NULL), CVQ_ERR_NULL_POINTER);
    assert_int_equal(cvq_train_keys(cb, 2, &dd, &kp, NULL), CVQ_ERR_LAYER_RANGE);
    cvq_key_train_params bad = kp;
    bad.steps = 0;
    assert_int_equal(cvq_train_keys(cb, 1, &dd, &bad, NULL), CVQ_ERR_INVALID_ARGUMENT);
    bad = kp;
    bad.first_stage = 2;
    assert_int_equal(cvq_train_keys(cb, 1, &dd, &bad, NULL), CVQ_ERR_INVALID_ARGUMENT);
    bad = kp;
    bad.first_stage = 1;
    bad.n_stages = 2;
    assert_int_equal(cvq_train_keys(cb, 1, &dd, &bad, NULL), CVQ_ERR_INVALID_ARGUMENT);
    bad = kp;
    bad.tau_end = 0.0;
    assert_int_equal(cvq_train_keys(cb, 1, &dd, &bad, NULL), CVQ_ERR_INVALID_ARGUMENT);
    cvq_train_data bd = dd;
    bd.n_tokens = 0;
    assert_int_equal(cvq_train_keys(cb, 1, &bd, &kp, NULL), CVQ_ERR_SHAPE);
    bd = dd;
    bd.keys = NULL;
    assert_int_equal(cvq_train_keys(cb, 1, &bd, &kp, NULL), CVQ_ERR_NULL_POINTER);
    int32_t starts[3] = {0, 100, 100};
    bd = dd;
    bd.seq_start = starts;
    bd.n_seq = 3;
    assert_int_equal(cvq_train_keys(cb, 1, &bd, &kp, NULL), CVQ_ERR_INVALID_ARGUMENT);
    starts[0] = 1;
    bd.n_seq = 1;
    assert_int_equal(cvq_train_keys(cb, 1, &bd, &kp, NULL), CVQ_ERR_INVALID_ARGUMENT);
    int32_t *pos = malloc(s.T * sizeof(int32_t));
    for (size_t t = 0; t < s.T; t++) pos[t] = (int32_t)(t % 100); /* restarts at 100 */
    bd = dd;
    bd.positions = pos;
    assert_int_equal(cvq_train_keys(cb, 1, &bd, &kp, NULL), CVQ_ERR_POSITION);
    starts[0] = 0;
    starts[1] = 100;
    starts[2] = 200;
    bd.seq_start = starts;
    bd.n_seq = 3;
    /* positions restarting with each sequence are fine */
    kp.steps = 1;
    assert_int_equal(cvq_train_keys(cb, 1, &bd, &kp, NULL), CVQ_OK);
    pos[5] = -1;
    assert_int_equal(cvq_train_keys(cb, 1, &bd, &kp, NULL), CVQ_ERR_POSITION);
    assert_memory_equal(key_w(cb, 0), zero, nw * sizeof(float));
    free(pos);
    free(zero);
    cvq_codebook_free(cb);
    small_free(&s);
}

static void test_cancel(void **state) {
    (void)state;
    const uint64_t seed = 81;
    small_set s = small_data(3, 600, seed);
    cvq_codebook *cb = make_cb(&s.g);
    cvq_key_train_params kp = fast_params(seed);
    kp.patience = 0; /* 9 reports per stage */
    prog_log *lg = calloc(1, sizeof *lg);
    lg->cancel_at = 9 + 4; /* inside stage 1 of head 0 */
    kp.progress = record;
    kp.progress_user = lg;
    cvq_train_data dd = data_of(s.k, s.T);
    assert_int_equal(cvq_train_keys(cb, 1, &dd, &kp, NULL), CVQ_ERR_CANCELLED);
    assert_int_equal(lg->n, 13);
    assert_int_equal(lg->stage[12], 1);
    const float *w = key_w(cb, 1);
    const size_t stage_f = 64 * 32 * 2;
    int any0 = 0, any1 = 0;
    for (size_t i = 0; i < stage_f; i++) {
        any0 |= w[i] != 0.0f;
        any1 |= w[stage_f + i] != 0.0f;
    }
    assert_true(any0);  /* stage 0 complete and kept */
    assert_false(any1); /* stage 1 was cut short: not written */
    assert_non_null(strstr(cvq_codebook_note(cb), "cancelled"));
    /* the progress numbers are sane */
    free(lg);
    cvq_codebook_free(cb);
    small_free(&s);
}

/* An allocator that fails the n-th allocation and counts live blocks. */
typedef struct fail_alloc {
    int calls, fail_at, live;
} fail_alloc;
static void *fa_alloc(void *user, size_t size, size_t align) {
    fail_alloc *f = user;
    if (f->calls++ == f->fail_at) return NULL;
    size = (size + align - 1) / align * align;
    void *p = aligned_alloc(align, size ? size : align);
    if (p) f->live++;
    return p;
}
static void fa_free(void *user, void *ptr) {
    fail_alloc *f = user;
    f->live--;
    free(ptr);
}

static void test_alloc_failures(void **state) {
    (void)state;
    const uint64_t seed = 91;
    small_set s = small_data(2, 600, seed);
    cvq_codebook *cb = make_cb(&s.g);
    cvq_train_data dd = data_of(s.k, s.T);
    cvq_key_train_params kp = fast_params(seed);
    kp.steps = 1;
    fail_alloc fa = {0, -1, 0};
    cvq_allocator al = {fa_alloc, fa_free, &fa};
    kp.allocator = &al;
    assert_int_equal(cvq_train_keys(cb, 1, &dd, &kp, NULL), CVQ_OK);
    const int total = fa.calls;
    assert_true(total > 3);
    assert_int_equal(fa.live, 0);
    for (int n = 0; n < total; n++) {
        fa.calls = 0;
        fa.fail_at = n;
        const cvq_status st = cvq_train_keys(cb, 1, &dd, &kp, NULL);
        if (st != CVQ_ERR_OUT_OF_MEMORY)
            print_message("  allocation %d of %d failed: got %s\n", n, total, cvq_status_name(st));
        assert_int_equal(st, CVQ_ERR_OUT_OF_MEMORY);
        assert_int_equal(fa.live, 0);
    }
    cvq_codebook_free(cb);
    small_free(&s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mstep_vs_bruteforce),
        cmocka_unit_test(test_recovery_r1),
        cmocka_unit_test(test_hard_em_monotone),
        cmocka_unit_test(test_threads_and_seed),
        cmocka_unit_test(test_greedy_extract_resume),
        cmocka_unit_test(test_dtypes_and_subsample),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_alloc_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
