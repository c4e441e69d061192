/*
 * The value trainer (cvq_train_values, core/train_values*.c):
 *  - the hand-written backward of every parameter tensor against central
 *    finite differences in double, on the soft relaxation with fixed Gumbel
 *    noise and with the attention loss on;
 *  - the straight-through backward equal to the soft backward taken at the
 *    hard forward point (finite differences of the linear surrogate
 *    <dL/dbits, soft bits(theta)>), and E's gradient against finite
 *    differences of the hard loss;
 *  - the trainer's attention (RoPE, causal mask, GQA, logit scale) against
 *    the library's own full-precision cache attention;
 *  - training on structured data: ls = mean|v| (computed here), the loss
 *    decreases, and the library encoder's error ends well below both the
 *    random initialisation's and a mean-vector baseline computed here;
 *  - bit-identical weights with 1 and 2 threads, same seed -> same weights,
 *    other seed -> other weights; cancel; non-finite data; bad arguments;
 *  - the attention-loss path; a trained codebook round-trips through a file.
 * Seeds are fixed and printed on failure.
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
#include "train_values_nn.h"

/* ---- helpers ---------------------------------------------------------------- */

static uint64_t rng_state;
static double rnd_uniform(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return ((double)(z >> 11) + 0.5) / 9007199254740992.0;
}
static double rnd_normal(void) {
    const double a = rnd_uniform(), b = rnd_uniform();
    return sqrt(-2.0 * log(a)) * cos(6.283185307179586 * b);
}

static cvq_geometry geom(uint32_t Hq, uint32_t Hkv, uint32_t Nc, uint32_t I) {
    cvq_geometry g;
    memset(&g, 0, sizeof g);
    g.n_layers = 2;
    g.n_q_heads = Hq;
    g.n_kv_heads = Hkv;
    g.head_dim = 64;
    g.key_stages = 1;
    g.value_group_width = 64;
    g.value_bits = Nc;
    g.value_hidden = I;
    return g;
}

static cvq_codebook *new_codebook(const cvq_geometry *g, uint64_t seed) {
    double theta[128];
    assert_int_equal(cvq_rope_freqs_default(g->head_dim, 10000.0, theta), CVQ_OK);
    cvq_codebook *cb = NULL;
    assert_int_equal(cvq_codebook_random(g, theta, seed, NULL, &cb), CVQ_OK);
    return cb;
}

/* Structured calibration set: values of rank 4 per KV head with channel
 * scales spread over 0.25..4 and a little noise; random queries and keys
 * with a shared direction so that attention is peaked; n_seq sequences. */
typedef struct dataset {
    size_t T;
    uint32_t Hq, Hkv, d;
    float *v, *k, *q;
    int32_t *pos, *seq_start;
    size_t n_seq;
} dataset;

static void make_data(dataset *ds, size_t T, uint32_t Hq, uint32_t Hkv, size_t n_seq,
                      uint64_t seed) {
    const uint32_t d = 64;
    const size_t kvd = (size_t)Hkv * d;
    ds->T = T;
    ds->Hq = Hq;
    ds->Hkv = Hkv;
    ds->d = d;
    ds->n_seq = n_seq;
    ds->v = malloc(T * kvd * sizeof(float));
    ds->k = malloc(T * kvd * sizeof(float));
    ds->q = malloc(T * (size_t)Hq * d * sizeof(float));
    ds->pos = malloc(T * sizeof(int32_t));
    ds->seq_start = malloc(n_seq * sizeof(int32_t));
    assert_non_null(ds->v);
    assert_non_null(ds->q);
    rng_state = seed;
    double M[4][512], scale[512];
    for (size_t j = 0; j < kvd; j++) scale[j] = 0.25 * pow(16.0, (double)j / (double)kvd);
    for (int r = 0; r < 4; r++)
        for (size_t j = 0; j < kvd; j++) M[r][j] = rnd_normal();
    for (size_t t = 0; t < T; t++) {
        double z[4];
        for (int r = 0; r < 4; r++) z[r] = rnd_normal();
        for (size_t j = 0; j < kvd; j++) {
            double x = 0.05 * rnd_normal();
            for (int r = 0; r < 4; r++) x += z[r] * M[r][j];
            ds->v[t * kvd + j] = (float)(x * scale[j]);
            ds->k[t * kvd + j] = (float)(rnd_normal() + (j % d < 8 ? 2.0 : 0.0));
        }
        for (size_t j = 0; j < (size_t)Hq * d; j++)
            ds->q[t * Hq * d + j] = (float)(rnd_normal() + (j % d < 8 ? 1.0 : 0.0));
    }
    for (size_t s = 0; s < n_seq; s++) ds->seq_start[s] = (int32_t)(s * T / n_seq);
    for (size_t s = 0; s < n_seq; s++) {
        const size_t a = (size_t)ds->seq_start[s], b = s + 1 < n_seq ? (size_t)ds->seq_start[s + 1] : T;
        for (size_t t = a; t < b; t++) ds->pos[t] = (int32_t)(3 * (t - a) + 1);
    }
}

static void free_data(dataset *ds) {
    free(ds->v);
    free(ds->k);
    free(ds->q);
    free(ds->pos);
    free(ds->seq_start);
}

static cvq_train_data train_data(const dataset *ds, int with_queries) {
    cvq_train_data td;
    memset(&td, 0, sizeof td);
    td.n_tokens = ds->T;
    td.dtype = CVQ_F32;
    td.keys = ds->k;
    td.values = ds->v;
    td.queries = with_queries ? ds->q : NULL;
    td.positions = ds->pos;
    td.seq_start = ds->seq_start;
    td.n_seq = ds->n_seq;
    return td;
}

/* rel error of the library's encoder/decoder on the data, computed here */
static double library_rel_error(cvq_codebook *cb, uint32_t layer, const dataset *ds) {
    cvq_geometry g;
    assert_int_equal(cvq_codebook_geometry(cb, &g), CVQ_OK);
    cvq_context_params cp = cvq_context_default_params();
    cp.backend = CVQ_BACKEND_CPU;
    cvq_context *ctx = NULL;
    assert_int_equal(cvq_context_create(&cp, &ctx), CVQ_OK);
    const size_t kvd = (size_t)ds->Hkv * ds->d, G = kvd / g.value_group_width;
    uint8_t *bits = malloc(ds->T * G * g.value_bits / 8);
    float *sig = malloc(ds->T * G * sizeof(float));
    float *dec = malloc(ds->T * kvd * sizeof(float));
    assert_int_equal(cvq_encode_values(ctx, cb, layer, ds->v, CVQ_F32, ds->T, bits, sig), CVQ_OK);
    assert_int_equal(cvq_decode_values(ctx, cb, layer, bits, sig, ds->T, dec), CVQ_OK);
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < ds->T * kvd; i++) {
        num += ((double)dec[i] - ds->v[i]) * ((double)dec[i] - ds->v[i]);
        den += (double)ds->v[i] * ds->v[i];
    }
    free(bits);
    free(sig);
    free(dec);
    cvq_context_free(ctx);
    return num / den;
}

/* ---- gradient checks on the network ------------------------------------------- */

typedef struct tiny {
    cvq__tv_net net;
    cvq__tv_layout lay;
    size_t B, np;
    double *par, *grad, *v, *lse, *gum, *attn;
    uint32_t kv_of[4];
    cvq__tv_work *w;
    cvq__tv_batch bt;
} tiny;

static void tiny_make(tiny *t, cvq__tv_mode mode, uint64_t seed) {
    memset(t, 0, sizeof *t);
    t->net = (cvq__tv_net){64, 16, 8, 2, 4, 2, 64, 1};
    cvq__tv_layout_of(&t->net, &t->lay);
    t->B = 5;
    t->np = t->lay.n * t->net.groups;
    const size_t kvd = 128, L2 = 16, B = t->B;
    t->par = malloc(t->np * sizeof(double));
    t->grad = malloc(t->np * sizeof(double));
    t->v = malloc(B * kvd * sizeof(double));
    t->lse = malloc(kvd * sizeof(double));
    t->gum = malloc(2 * B * L2 * sizeof(double));
    t->attn = malloc(4 * B * B * sizeof(double));
    rng_state = seed;
    for (uint32_t g = 0; g < 2; g++) {
        double *P = t->par + g * t->lay.n;
        const double sd[7] = {0.3, 0.3, 0.4, 0.3, 0.5, 0.3, 0.5};
        for (int k = 0; k < 7; k++)
            for (size_t i = 0; i < t->lay.len[k]; i++)
                P[t->lay.off[k] + i] = (k == 0 ? 1.0 : 0.0) + sd[k] * rnd_normal();
    }
    for (size_t i = 0; i < B * kvd; i++) t->v[i] = rnd_normal();
    for (size_t i = 0; i < kvd; i++) t->lse[i] = 0.5 + rnd_uniform();
    for (size_t i = 0; i < 2 * B * L2; i++) t->gum[i] = -log(-log(rnd_uniform()));
    /* attention weights from random rotated q, k over 2 segments */
    double q[5 * 4 * 64], k[5 * 2 * 64];
    for (size_t i = 0; i < sizeof q / sizeof q[0]; i++) q[i] = rnd_normal();
    for (size_t i = 0; i < sizeof k / sizeof k[0]; i++) k[i] = rnd_normal();
    const int32_t pos[5] = {0, 1, 2, 0, 5};
    const uint32_t seg[5] = {0, 0, 0, 1, 1};
    for (uint32_t h = 0; h < 4; h++) t->kv_of[h] = h / 2;
    double scr[3 * 5 * 64];
    cvq__tv_attn_weights(B, 4, 2, 64, t->kv_of, q, k, pos, seg, 0.125, 1, scr, t->attn);
    assert_int_equal(cvq__tv_work_create(&t->net, B, NULL, &t->w), CVQ_OK);
    t->bt = (cvq__tv_batch){B, t->v, t->lse, t->gum, 0.7, mode, t->attn, t->kv_of, 0.5};
}

static void tiny_free(tiny *t) {
    cvq__tv_work_free(t->w);
    free(t->par);
    free(t->grad);
    free(t->v);
    free(t->lse);
    free(t->gum);
    free(t->attn);
}

static const char *tensor_name[7] = {"ln_w", "ln_b", "w1", "b1", "w2", "b2", "E"};

/* Every parameter of every tensor and group: analytic vs central difference. */
static void test_gradcheck_soft(void **state) {
    (void)state;
    tiny t;
    tiny_make(&t, CVQ__TV_SOFT, 0x5EEDu);
    const double L0 = cvq__tv_loss_grad(&t.net, t.par, t.w, &t.bt, t.grad);
    assert_true(isfinite(L0));
    assert_true(t.w->mse_attn > 0.0);
    double worst = 0.0;
    int fails = 0;
    for (size_t i = 0; i < t.np; i++) {
        const double x = t.par[i], h = 1e-5 * (1.0 + fabs(x));
        t.par[i] = x + h;
        const double lp = cvq__tv_loss_grad(&t.net, t.par, t.w, &t.bt, NULL);
        t.par[i] = x - h;
        const double lm = cvq__tv_loss_grad(&t.net, t.par, t.w, &t.bt, NULL);
        t.par[i] = x;
        const double fd = (lp - lm) / (2.0 * h);
        const double err = fabs(fd - t.grad[i]) / (1e-6 + fabs(fd));
        if (err > worst) worst = err;
        if (fabs(fd - t.grad[i]) > 1e-8 + 1e-5 * fabs(fd)) {
            size_t o = i % t.lay.n;
            int k = 6;
            while (k > 0 && o < t.lay.off[k]) k--;
            if (fails++ < 10)
                print_error("seed 0x5EED: %s[%zu] of group %zu: analytic %.10g, "
                            "finite difference %.10g\n",
                            tensor_name[k], o - t.lay.off[k], i / t.lay.n, t.grad[i], fd);
        }
    }
    print_message("soft gradient check: %zu parameters, worst relative error %.3g\n", t.np,
                  worst);
    assert_int_equal(fails, 0);
    tiny_free(&t);
}

/* Straight-through: the gradient of every tensor before the bits equals the
 * gradient of <dL/dbits (at the hard point), soft bits(theta)>; E's equals
 * the finite difference of the hard loss (bits do not depend on E). */
static void test_straight_through(void **state) {
    (void)state;
    tiny t;
    tiny_make(&t, CVQ__TV_HARD_ST, 0xA11CEu);
    const size_t nbits = 2 * t.B * t.net.Nc;
    cvq__tv_loss_grad(&t.net, t.par, t.w, &t.bt, t.grad);
    double *dbits = malloc(nbits * sizeof(double));
    memcpy(dbits, t.w->dbits, nbits * sizeof(double));
    /* the forward bits are exactly 0/1 */
    for (size_t i = 0; i < nbits; i++)
        assert_true(t.w->bits[i] == 0.0 || t.w->bits[i] == 1.0);
    int fails = 0;
    for (size_t i = 0; i < t.np; i++) {
        const size_t o = i % t.lay.n;
        const int isE = o >= t.lay.off[6];
        const double x = t.par[i], h = 1e-5 * (1.0 + fabs(x));
        double f[2];
        for (int sgn = 0; sgn < 2; sgn++) {
            t.par[i] = sgn ? x - h : x + h;
            if (isE) {
                t.bt.mode = CVQ__TV_HARD_ST;
                f[sgn] = cvq__tv_loss_grad(&t.net, t.par, t.w, &t.bt, NULL);
            } else {
                t.bt.mode = CVQ__TV_SOFT;
                cvq__tv_loss_grad(&t.net, t.par, t.w, &t.bt, NULL);
                double s = 0.0;
                for (size_t b = 0; b < nbits; b++) s += dbits[b] * t.w->bits[b];
                f[sgn] = s;
            }
        }
        t.par[i] = x;
        const double fd = (f[0] - f[1]) / (2.0 * h);
        if (fabs(fd - t.grad[i]) > 1e-8 + 1e-5 * fabs(fd)) {
            if (fails++ < 10)
                print_error("seed 0xA11CE: parameter %zu (%s): straight-through %.10g, "
                            "reference %.10g\n", i, isE ? "E" : "encoder", t.grad[i], fd);
        }
    }
    assert_int_equal(fails, 0);
    free(dbits);
    tiny_free(&t);
}

/* The trainer's attention output (cvq__tv_rope, cvq__tv_attn_weights,
 * cvq__tv_attn_apply) equals the library's cache attention over full
 * precision tokens (window larger than the sequence: nothing compressed). */
static void test_attention_matches_library(void **state) {
    (void)state;
    const cvq_geometry g = geom(4, 2, 32, 32);
    cvq_codebook *cb = new_codebook(&g, 3);
    dataset ds;
    make_data(&ds, 24, 4, 2, 1, 0xA77u);
    const size_t T = ds.T, kvd = 128, qd = 4 * 64;
    cvq_context_params cp = cvq_context_default_params();
    cp.backend = CVQ_BACKEND_CPU;
    cvq_context *ctx = NULL;
    assert_int_equal(cvq_context_create(&cp, &ctx), CVQ_OK);
    cvq_cache_params pp = cvq_cache_default_params();
    pp.window = 1024;
    cvq_cache *cache = NULL;
    assert_int_equal(cvq_cache_create(ctx, cb, &pp, &cache), CVQ_OK);
    assert_int_equal(cvq_cache_append(cache, ds.k, ds.v, CVQ_F32, ds.pos, T), CVQ_OK);
    float *lib = malloc(T * qd * sizeof(float));
    assert_int_equal(cvq_cache_attend(cache, ds.q, ds.pos, T, 0, lib), CVQ_OK);

    double theta[32], *q = malloc(T * qd * sizeof(double)), *k = malloc(T * kvd * sizeof(double));
    double *x = malloc(T * kvd * sizeof(double)), *out = malloc(T * qd * sizeof(double));
    double *attn = malloc(4 * T * T * sizeof(double));
    uint32_t kv_of[4], *seg = calloc(T, sizeof(uint32_t));
    assert_int_equal(cvq_codebook_rope_theta(cb, theta), CVQ_OK);
    for (size_t i = 0; i < T * qd; i++) q[i] = ds.q[i];
    for (size_t i = 0; i < T * kvd; i++) {
        k[i] = ds.k[i];
        x[i] = ds.v[i];
    }
    for (size_t t = 0; t < T; t++) {
        cvq__tv_rope(q + t * qd, 4, 64, g.pair_layout, theta, ds.pos[t]);
        cvq__tv_rope(k + t * kvd, 2, 64, g.pair_layout, theta, ds.pos[t]);
    }
    for (uint32_t h = 0; h < 4; h++) kv_of[h] = h / 2;
    double *scr = malloc(cvq__tv_attn_scratch_len(T, 64) * sizeof(double));
    cvq__tv_attn_weights(T, 4, 2, 64, kv_of, q, k, ds.pos, seg, 1.0 / 8.0, 2, scr, attn);
    cvq__tv_attn_apply(T, 4, 2, 64, kv_of, attn, x, 2, scr, out);
    free(scr);
    double worst = 0.0;
    for (size_t i = 0; i < T * qd; i++) {
        const double e = fabs(out[i] - (double)lib[i]) / (1.0 + fabs(out[i]));
        if (e > worst) worst = e;
    }
    print_message("trainer attention vs library attention: worst error %.3g\n", worst);
    assert_true(worst < 1e-4);
    free(lib);
    free(q);
    free(k);
    free(x);
    free(out);
    free(attn);
    free(seg);
    cvq_cache_free(cache);
    cvq_context_free(ctx);
    cvq_codebook_free(cb);
    free_data(&ds);
}

/* ---- the trainer ------------------------------------------------------------- */

typedef struct progress_log {
    double loss[4096];
    uint32_t n;
    uint32_t stop_at; /* 0: never */
} progress_log;

static int log_progress(void *user, const cvq_train_progress *p) {
    progress_log *lg = user;
    if (lg->n < 4096) lg->loss[lg->n++] = p->loss;
    assert_string_equal(p->phase, "values");
    assert_int_equal(p->step, lg->n);
    return lg->stop_at != 0 && p->step >= lg->stop_at;
}

static cvq_value_train_params small_params(uint32_t steps, int threads) {
    cvq_value_train_params p = cvq_value_train_default_params();
    p.seed = 42;
    p.steps = steps;
    p.batch_tokens = 64;
    p.warmup_steps = 10;
    p.lr = 3e-3;
    p.n_threads = threads;
    return p;
}

static void test_training_reduces_error(void **state) {
    (void)state;
    const cvq_geometry g = geom(2, 1, 32, 32);
    dataset ds;
    make_data(&ds, 1024, 2, 1, 4, 0xDA7Au);
    const cvq_train_data td = train_data(&ds, 0);
    /* the random initialisation, measured by the trainer with 0 steps */
    cvq_codebook *cb0 = new_codebook(&g, 7);
    cvq_value_train_params p = small_params(0, 1);
    cvq_train_report r0;
    assert_int_equal(cvq_train_values(cb0, 1, &td, &p, &r0), CVQ_OK);
    /* ls = mean |v| per channel, computed here */
    const float *ls;
    assert_int_equal(cvq_codebook_tensor_cdata(cb0, CVQ_T_VAL_LS, 1, 0, &ls), CVQ_OK);
    for (size_t j = 0; j < 64; j++) {
        double acc = 0.0;
        for (size_t t = 0; t < ds.T; t++) acc += fabs((double)ds.v[t * 64 + j]);
        acc /= (double)ds.T;
        assert_true(fabs((double)ls[j] - acc) <= 1e-6 * acc);
    }
    /* layer 0 untouched: still the random codebook's ls = 1 */
    assert_int_equal(cvq_codebook_tensor_cdata(cb0, CVQ_T_VAL_LS, 0, 0, &ls), CVQ_OK);
    assert_true(ls[5] == 1.0f);

    cvq_codebook *cb = new_codebook(&g, 7);
    p = small_params(300, 1);
    progress_log lg;
    memset(&lg, 0, sizeof lg);
    p.progress = log_progress;
    p.progress_user = &lg;
    cvq_train_report r;
    assert_int_equal(cvq_train_values(cb, 1, &td, &p, &r), CVQ_OK);
    assert_int_equal(lg.n, 300);
    assert_int_equal(r.steps_run, 300);
    assert_int_equal(r.tokens_used, ds.T);
    assert_true(r.attn_rel_error == -1.0);
    double first = 0.0, last = 0.0;
    for (int i = 0; i < 20; i++) {
        first += lg.loss[i];
        last += lg.loss[lg.n - 1 - (uint32_t)i];
    }
    /* mean-vector baseline, computed here */
    double mean[64] = {0}, num = 0.0, den = 0.0;
    for (size_t t = 0; t < ds.T; t++)
        for (size_t j = 0; j < 64; j++) mean[j] += ds.v[t * 64 + j] / (double)ds.T;
    for (size_t t = 0; t < ds.T; t++)
        for (size_t j = 0; j < 64; j++) {
            num += (ds.v[t * 64 + j] - mean[j]) * (ds.v[t * 64 + j] - mean[j]);
            den += (double)ds.v[t * 64 + j] * ds.v[t * 64 + j];
        }
    const double lib = library_rel_error(cb, 1, &ds);
    print_message("loss first 20 %.4g last 20 %.4g; rel_error init %.4f trained %.4f "
                  "(library here %.4f), mean baseline %.4f\n",
                  first / 20, last / 20, r0.rel_error, r.rel_error, lib, num / den);
    assert_true(last < 0.7 * first);
    assert_true(fabs(lib - r.rel_error) <= 1e-9 + 1e-6 * lib);
    assert_true(r.rel_error < 0.5 * r0.rel_error);
    assert_true(r.rel_error < 0.5 * (num / den));
    /* provenance */
    assert_non_null(strstr(cvq_codebook_note(cb), "train-values layer 1"));
    /* round trip through a file: same codes after reload */
    const char *dir = getenv("COMMVQ_TEST_TMP");
    char path[512];
    snprintf(path, sizeof path, "%s/test_train_values.cvq", dir ? dir : ".");
    assert_int_equal(cvq_codebook_save(cb, path, 0), CVQ_OK);
    cvq_codebook *cb2 = NULL;
    assert_int_equal(cvq_codebook_load(path, NULL, &cb2), CVQ_OK);
    assert_true(library_rel_error(cb2, 1, &ds) == lib);
    remove(path);
    cvq_codebook_free(cb2);
    cvq_codebook_free(cb);
    cvq_codebook_free(cb0);
    free_data(&ds);
}

/* Compares every value tensor of `layer` of two codebooks bit for bit. */
static int same_values(const cvq_codebook *a, const cvq_codebook *b, uint32_t layer,
                       uint32_t groups) {
    for (int id = CVQ_T_VAL_LS; id <= CVQ_T_VAL_E; id++)
        for (uint32_t gi = 0; gi < groups; gi++) {
            cvq_tensor_info info;
            const float *x, *y;
            assert_int_equal(cvq_codebook_tensor_info(a, (cvq_tensor_id)id, &info), CVQ_OK);
            assert_int_equal(cvq_codebook_tensor_cdata(a, (cvq_tensor_id)id, layer, gi, &x), CVQ_OK);
            assert_int_equal(cvq_codebook_tensor_cdata(b, (cvq_tensor_id)id, layer, gi, &y), CVQ_OK);
            if (memcmp(x, y, info.n_elements * sizeof(float)) != 0) return 0;
        }
    return 1;
}

static void test_threads_and_seeds(void **state) {
    (void)state;
    const cvq_geometry g = geom(4, 2, 16, 32);
    dataset ds;
    make_data(&ds, 300, 4, 2, 3, 0x7E5Du);
    const cvq_train_data td = train_data(&ds, 1);
    cvq_codebook *cb[4];
    cvq_train_report r[4];
    const int threads[4] = {1, 2, 2, 1};
    for (int i = 0; i < 4; i++) {
        cb[i] = new_codebook(&g, 11);
        cvq_value_train_params p = small_params(15, threads[i]);
        p.max_tokens = 200; /* subsampled windows */
        if (i == 3) p.seed = 43;
        assert_int_equal(cvq_train_values(cb[i], 0, &td, &p, &r[i]), CVQ_OK);
    }
    assert_int_equal(r[0].tokens_used, 200);
    assert_true(same_values(cb[0], cb[1], 0, 2)); /* 1 vs 2 threads */
    assert_true(same_values(cb[1], cb[2], 0, 2)); /* same seed again */
    assert_true(r[0].rel_error == r[1].rel_error);
    assert_true(r[0].attn_rel_error == r[1].attn_rel_error);
    assert_false(same_values(cb[0], cb[3], 0, 2)); /* another seed */
    for (int i = 0; i < 4; i++) cvq_codebook_free(cb[i]);
    free_data(&ds);
}

static void test_attention_loss_path(void **state) {
    (void)state;
    const cvq_geometry g = geom(4, 2, 32, 32);
    dataset ds;
    make_data(&ds, 512, 4, 2, 2, 0xA7Eu);
    cvq_train_report r0, r1, rn;
    progress_log la, ln;
    memset(&la, 0, sizeof la);
    memset(&ln, 0, sizeof ln);
    /* init error (0 steps) with queries */
    cvq_codebook *cb0 = new_codebook(&g, 5), *cb1 = new_codebook(&g, 5), *cbn = new_codebook(&g, 5);
    cvq_train_data td = train_data(&ds, 1);
    cvq_value_train_params p = small_params(0, 1);
    assert_int_equal(cvq_train_values(cb0, 0, &td, &p, &r0), CVQ_OK);
    assert_true(r0.attn_rel_error > 0.0);
    p = small_params(150, 1);
    p.progress = log_progress;
    p.progress_user = &la;
    assert_int_equal(cvq_train_values(cb1, 0, &td, &p, &r1), CVQ_OK);
    /* the same run without queries: the first step's loss lacks the
     * attention term */
    td = train_data(&ds, 0);
    p.progress_user = &ln;
    assert_int_equal(cvq_train_values(cbn, 0, &td, &p, &rn), CVQ_OK);
    print_message("attention: first loss %.5g (with) vs %.5g (without); attn_rel_error "
                  "init %.4f trained %.4f; rel_error %.4f\n",
                  la.loss[0], ln.loss[0], r0.attn_rel_error, r1.attn_rel_error, r1.rel_error);
    assert_true(la.loss[0] > ln.loss[0]);
    assert_true(rn.attn_rel_error == -1.0);
    assert_true(r1.attn_rel_error < 0.5 * r0.attn_rel_error);
    assert_false(same_values(cb1, cbn, 0, 2));
    cvq_codebook_free(cb0);
    cvq_codebook_free(cb1);
    cvq_codebook_free(cbn);
    free_data(&ds);
}

static void test_cancel(void **state) {
    (void)state;
    const cvq_geometry g = geom(2, 1, 16, 32);
    dataset ds;
    make_data(&ds, 200, 2, 1, 1, 0xCA1u);
    const cvq_train_data td = train_data(&ds, 0);
    cvq_codebook *cb = new_codebook(&g, 9);
    const float *e0;
    assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_E, 0, 0, &e0), CVQ_OK);
    const float before = e0[3];
    cvq_value_train_params p = small_params(50, 1);
    progress_log lg;
    memset(&lg, 0, sizeof lg);
    lg.stop_at = 3;
    p.progress = log_progress;
    p.progress_user = &lg;
    cvq_train_report r;
    assert_int_equal(cvq_train_values(cb, 0, &td, &p, &r), CVQ_ERR_CANCELLED);
    assert_int_equal(r.steps_run, 3);
    assert_int_equal(lg.n, 3);
    assert_true(e0[3] != before); /* the weights of step 3 were written */
    cvq_codebook_free(cb);
    free_data(&ds);
}

static void test_bad_input(void **state) {
    (void)state;
    const cvq_geometry g = geom(2, 1, 16, 32);
    dataset ds;
    make_data(&ds, 64, 2, 1, 1, 0xBADu);
    cvq_codebook *cb = new_codebook(&g, 9);
    cvq_train_data td = train_data(&ds, 1);
    cvq_value_train_params p = small_params(3, 1);
    ds.v[5 * 64 + 7] = NAN;
    assert_int_equal(cvq_train_values(cb, 0, &td, &p, NULL), CVQ_ERR_NONFINITE_INPUT);
    ds.v[5 * 64 + 7] = 1.0f;
    ds.q[9] = INFINITY;
    assert_int_equal(cvq_train_values(cb, 0, &td, &p, NULL), CVQ_ERR_NONFINITE_INPUT);
    td.queries = NULL; /* queries unused: no check, trains */
    assert_int_equal(cvq_train_values(cb, 0, &td, &p, NULL), CVQ_OK);
    assert_int_equal(cvq_train_values(cb, 2, &td, &p, NULL), CVQ_ERR_LAYER_RANGE);
    assert_int_equal(cvq_train_values(NULL, 0, &td, &p, NULL), CVQ_ERR_NULL_POINTER);
    assert_int_equal(cvq_train_values(cb, 0, NULL, &p, NULL), CVQ_ERR_NULL_POINTER);
    p.batch_tokens = 0;
    assert_int_equal(cvq_train_values(cb, 0, &td, &p, NULL), CVQ_ERR_INVALID_ARGUMENT);
    p = small_params(3, 1);
    p.gumbel_tau = 0.0;
    assert_int_equal(cvq_train_values(cb, 0, &td, &p, NULL), CVQ_ERR_INVALID_ARGUMENT);
    p = small_params(3, 1);
    td.n_tokens = 0;
    assert_int_equal(cvq_train_values(cb, 0, &td, &p, NULL), CVQ_ERR_SHAPE);
    /* defaults */
    const cvq_value_train_params d = cvq_value_train_default_params();
    assert_int_equal(d.steps, 2000);
    assert_int_equal(d.batch_tokens, 256);
    assert_true(d.lr == 1e-3 && d.weight_decay == 0.1 && d.beta2 == 0.95 && d.clip == 1.0);
    cvq_codebook_free(cb);
    free_data(&ds);
}

/* resume = 1 starts from the codebook's weights and ls: 0 steps change
 * nothing (same weights, same error); more steps continue from there. */
static void test_resume(void **state) {
    (void)state;
    const cvq_geometry g = geom(2, 1, 16, 32);
    dataset ds;
    make_data(&ds, 256, 2, 1, 2, 0x2E5u);
    const cvq_train_data td = train_data(&ds, 1);
    cvq_codebook *cb = new_codebook(&g, 9), *ref = new_codebook(&g, 9);
    cvq_value_train_params p = small_params(20, 1);
    cvq_train_report r1, r2, r3;
    assert_int_equal(cvq_train_values(cb, 0, &td, &p, &r1), CVQ_OK);
    assert_int_equal(cvq_train_values(ref, 0, &td, &p, &r1), CVQ_OK);
    p.resume = 1;
    p.steps = 0;
    assert_int_equal(cvq_train_values(cb, 0, &td, &p, &r2), CVQ_OK);
    assert_true(same_values(cb, ref, 0, 1));
    assert_true(r2.rel_error == r1.rel_error);
    p.steps = 40;
    assert_int_equal(cvq_train_values(cb, 0, &td, &p, &r3), CVQ_OK);
    assert_false(same_values(cb, ref, 0, 1));
    const float *ls, *ls_ref;
    assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_LS, 0, 0, &ls), CVQ_OK);
    assert_int_equal(cvq_codebook_tensor_cdata(ref, CVQ_T_VAL_LS, 0, 0, &ls_ref), CVQ_OK);
    assert_memory_equal(ls, ls_ref, 64 * sizeof(float));
    print_message("resume: rel_error after 20 steps %.4f, after 20 + 40 %.4f\n", r1.rel_error,
                  r3.rel_error);
    assert_true(r3.rel_error < r1.rel_error);
    cvq_codebook_free(cb);
    cvq_codebook_free(ref);
    free_data(&ds);
}

/* Allocation failure injection: failing the n-th allocation of a run gives
 * CVQ_ERR_OUT_OF_MEMORY (or success once n is past the run's needs), and
 * every allocation is freed either way. */
typedef struct counting {
    long n_alloc, n_free, fail_at;
} counting;
static void *c_alloc(void *user, size_t size, size_t align) {
    counting *c = user;
    if (c->fail_at >= 0 && c->n_alloc >= c->fail_at) return NULL;
    void *p = NULL;
    if (posix_memalign(&p, align < sizeof(void *) ? sizeof(void *) : align, size) != 0) return NULL;
    c->n_alloc++;
    return p;
}
static void c_free(void *user, void *ptr) {
    counting *c = user;
    c->n_free++;
    free(ptr);
}

static void test_allocation_failures(void **state) {
    (void)state;
    const cvq_geometry g = geom(2, 1, 16, 32);
    dataset ds;
    make_data(&ds, 100, 2, 1, 2, 0xA110Cu);
    const cvq_train_data td = train_data(&ds, 1);
    int succeeded = 0;
    for (long n = 0; n < 200 && !succeeded; n++) {
        cvq_codebook *cb = new_codebook(&g, 9);
        counting c = {0, 0, n};
        const cvq_allocator al = {c_alloc, c_free, &c};
        cvq_value_train_params p = small_params(2, 1);
        p.allocator = &al;
        const cvq_status s = cvq_train_values(cb, 0, &td, &p, NULL);
        if (s != CVQ_OK && s != CVQ_ERR_OUT_OF_MEMORY)
            fail_msg("allocation %ld failed: status %s (%s)", n, cvq_status_name(s),
                     cvq_last_error());
        assert_int_equal(c.n_alloc, c.n_free);
        succeeded = s == CVQ_OK;
        cvq_codebook_free(cb);
    }
    assert_true(succeeded);
    free_data(&ds);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gradcheck_soft),
        cmocka_unit_test(test_straight_through),
        cmocka_unit_test(test_attention_matches_library),
        cmocka_unit_test(test_training_reduces_error),
        cmocka_unit_test(test_threads_and_seeds),
        cmocka_unit_test(test_attention_loss_path),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_resume),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_allocation_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
