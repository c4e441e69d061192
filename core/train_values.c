/*
 * The value trainer (method note section 6, "Values"; docs/training.md):
 * ls = mean |v| per channel from the data (then frozen), then every value
 * group's LayerNorm, both Linear layers and E trained jointly with AdamW on
 * MSE(v_hat, v) + attn_weight * MSE(attention output), straight-through
 * Gumbel-softmax over each 4-way group. The network math is in
 * core/train_values_nn.c and core/train_values_attn.c; this file holds the
 * data preparation, batching, optimiser, reporting and provenance.
 *
 * Batches: each sequence is cut into windows of batch_tokens consecutive
 * tokens (the last one of a sequence shorter); a step draws windows (seeded,
 * per step) until batch_tokens tokens are filled, and attention runs causally
 * within each window (its queries over its keys), so the attention loss sees
 * real context. Subsampling (max_tokens) keeps a seeded subset of windows.
 *
 * Reproducibility: every random draw is a pure function of (seed, stream,
 * step, index) and every sum runs in a fixed order (train_values_nn.h), so
 * the trained weights depend on the seed and the data only.
 */
#include "train_internal.h"
#include "train_values_nn.h"

#include <math.h>
#include <string.h>

#define WHO "train-values"

/* Random streams (cvq__rng_init ids) */
#define STREAM_WINDOWS 0x57494E00u   /* window subsample */
#define STREAM_INIT 0x494E4900u      /* + tensor index * 65536 + group */
#define STREAM_BATCH 0x42415400000ull /* + step */

cvq_value_train_params cvq_value_train_default_params(void) {
    cvq_value_train_params p;
    memset(&p, 0, sizeof p);
    p.seed = 0;
    p.max_tokens = 0;
    p.steps = 2000;
    p.batch_tokens = 256;
    p.lr = 1e-3;
    p.weight_decay = 0.1;
    p.beta1 = 0.9;
    p.beta2 = 0.95;
    p.clip = 1.0;
    p.warmup_steps = 100;
    p.gumbel_tau = 1.0;
    p.attn_weight = 1.0;
    p.keep_ls = 0;
    p.resume = 0;
    p.lr_end_factor = 0.1;
    p.n_threads = 0;
    p.progress = NULL;
    p.progress_user = NULL;
    p.allocator = NULL;
    return p;
}

static cvq_status check_params(const cvq_value_train_params *p) {
    if (p->batch_tokens < 1)
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT, WHO ": batch_tokens must be >= 1");
    if (!(p->lr > 0.0) || !isfinite(p->lr))
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT, WHO ": lr = %g must be > 0", p->lr);
    if (!(p->weight_decay >= 0.0) || !isfinite(p->weight_decay))
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT, WHO ": weight_decay = %g must be >= 0",
                        p->weight_decay);
    if (!(p->beta1 >= 0.0 && p->beta1 < 1.0) || !(p->beta2 >= 0.0 && p->beta2 < 1.0))
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                        WHO ": beta1 = %g, beta2 = %g must be in [0, 1)", p->beta1, p->beta2);
    if (!(p->clip >= 0.0))
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT, WHO ": clip = %g must be >= 0 (0: off)",
                        p->clip);
    if (!(p->gumbel_tau > 0.0) || !isfinite(p->gumbel_tau))
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT, WHO ": gumbel_tau = %g must be > 0",
                        p->gumbel_tau);
    if (!(p->attn_weight >= 0.0) || !isfinite(p->attn_weight))
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT, WHO ": attn_weight = %g must be >= 0",
                        p->attn_weight);
    if (!(p->lr_end_factor >= 0.0 && p->lr_end_factor <= 1.0))
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                        WHO ": lr_end_factor = %g must be in [0, 1]", p->lr_end_factor);
    return CVQ_OK;
}

/* A run of consecutive tokens of one sequence. */
typedef struct tv_window {
    size_t start, len;
} tv_window;

/* Everything the run allocates (freed by state_free). */
typedef struct tv_state {
    cvq_allocator al;    /* the allocator (defaults filled in) */
    const cvq_allocator *a; /* = &al */
    cvq_geometry g;
    uint32_t layer, groups, kvd;
    int use_attn;
    int nt;
    /* data, after subsampling: U tokens */
    size_t U;
    float *val;          /* [U][kvd] */
    float *key;          /* [U][Hkv][d] (attention) */
    float *qry;          /* [U][Hq][d] (attention) */
    int32_t *pos;        /* [U] */
    tv_window *win;      /* windows over the U tokens */
    size_t n_win;
    double *theta;       /* [d/2] */
    uint32_t *kv_of;     /* [Hq] */
    double *lse;         /* [kvd] */
    /* optimiser */
    cvq__tv_net net;
    cvq__tv_layout lay;
    size_t n_par;        /* groups * lay.n */
    double *par, *grad, *m1, *m2;
    unsigned char *decay; /* [lay.n] 1: weight decay applies */
    cvq__tv_work *work;
    /* batch */
    double *bv;          /* [Bt][kvd] */
    double *gum;         /* [groups][Bt][2Nc] */
    double *bq, *bk;     /* [Bt][Hq][d], [Bt][Hkv][d] */
    int32_t *bpos;
    uint32_t *bseg;
    double *attn;        /* [Hq][Bt][Bt] */
    double *ascr;        /* attention scratch */
} tv_state;

static void state_free(tv_state *s) {
    void *ptrs[] = {s->val, s->key, s->qry, s->pos, s->win, s->theta, s->kv_of, s->lse,
                    s->par, s->grad, s->m1, s->m2, s->decay, s->bv, s->gum, s->bq,
                    s->bk, s->bpos, s->bseg, s->attn, s->ascr};
    for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++)
        if (ptrs[i]) cvq__free(s->a, ptrs[i]);
    cvq__tv_work_free(s->work);
}

/* n1*n2 elements of `size` bytes, zeroed; NULL (and *st set) on failure. */
static void *alloc_n(tv_state *s, size_t n1, size_t n2, size_t size, cvq_status *st) {
    size_t n;
    if (*st != CVQ_OK) return NULL;
    if (!cvq__mul_size(n1, n2, &n) || !cvq__mul_size(n, size, &n)) {
        *st = CVQ_FAIL(NULL, CVQ_ERR_SIZE_OVERFLOW, WHO ": buffer of %zu x %zu too large", n1, n2);
        return NULL;
    }
    void *p = cvq__calloc(s->a, n ? n : 1, 1);
    if (!p) *st = CVQ_FAIL(NULL, CVQ_ERR_OUT_OF_MEMORY, WHO ": cannot allocate %zu bytes", n);
    return p;
}

/* Windows of at most Bt tokens over every sequence, then (max_tokens) a
 * seeded subset of them, in data order; gathers the chosen tokens. */
static cvq_status prepare_data(tv_state *s, const cvq_train_data *data,
                               const cvq_value_train_params *p) {
    const size_t T = data->n_tokens, Bt = p->batch_tokens;
    cvq_status st = CVQ_OK;
    uint32_t *seq = alloc_n(s, T, 1, sizeof(uint32_t), &st);
    int32_t *pos = alloc_n(s, T, 1, sizeof(int32_t), &st);
    size_t *idx = alloc_n(s, T, 1, sizeof(size_t), &st);
    size_t n_win = 0;
    tv_window *win = NULL;
    if (st == CVQ_OK) {
        cvq__train_seq_pos(data, seq, pos);
        for (size_t t = 0, run = 0; t < T; t++) { /* count windows */
            run = (t > 0 && seq[t] == seq[t - 1] && run < Bt) ? run + 1 : 1;
            if (run == 1) n_win++;
        }
        win = alloc_n(s, n_win, 1, sizeof(tv_window), &st);
    }
    if (st == CVQ_OK) {
        size_t k = 0;
        for (size_t t = 0, run = 0; t < T; t++) {
            run = (t > 0 && seq[t] == seq[t - 1] && run < Bt) ? run + 1 : 1;
            if (run == 1) win[k++] = (tv_window){t, 0};
            win[k - 1].len++;
        }
        if (p->max_tokens > 0 && p->max_tokens < T) {
            /* partial Fisher-Yates over the windows, until max_tokens are
             * covered; the last one is cut to fit; then back to data order */
            cvq__rng r;
            cvq__rng_init(&r, p->seed, STREAM_WINDOWS);
            size_t taken = 0, chosen = 0;
            while (taken < p->max_tokens && chosen < n_win) {
                const size_t j = chosen + (size_t)cvq__rng_below(&r, n_win - chosen);
                const tv_window tmp = win[chosen];
                win[chosen] = win[j];
                win[j] = tmp;
                if (taken + win[chosen].len > p->max_tokens)
                    win[chosen].len = (size_t)p->max_tokens - taken;
                taken += win[chosen].len;
                chosen++;
            }
            n_win = chosen;
            for (size_t i = 1; i < n_win; i++) /* insertion sort by start */
                for (size_t j = i; j > 0 && win[j - 1].start > win[j].start; j--) {
                    const tv_window tmp = win[j];
                    win[j] = win[j - 1];
                    win[j - 1] = tmp;
                }
        }
        /* gather: window w's tokens become rows U0.. of the used set */
        size_t U = 0;
        for (size_t w = 0; w < n_win; w++) {
            for (size_t i = 0; i < win[w].len; i++) idx[U + i] = win[w].start + i;
            win[w].start = U;
            U += win[w].len;
        }
        s->U = U;
        s->win = win;
        s->n_win = n_win;
        win = NULL;
        const uint32_t d = s->g.head_dim;
        s->val = alloc_n(s, U, s->kvd, sizeof(float), &st);
        s->pos = alloc_n(s, U, 1, sizeof(int32_t), &st);
        if (s->use_attn) {
            s->key = alloc_n(s, U, s->kvd, sizeof(float), &st);
            s->qry = alloc_n(s, U, (size_t)s->g.n_q_heads * d, sizeof(float), &st);
        }
        if (st == CVQ_OK) {
            cvq__train_gather_f32(data->values, data->dtype, s->kvd, idx, U, s->val);
            for (size_t i = 0; i < U; i++) s->pos[i] = pos[idx[i]];
            if (s->use_attn) {
                cvq__train_gather_f32(data->keys, data->dtype, s->kvd, idx, U, s->key);
                cvq__train_gather_f32(data->queries, data->dtype,
                                      (size_t)s->g.n_q_heads * d, idx, U, s->qry);
            }
        }
    }
    if (win) cvq__free(s->a, win);
    if (seq) cvq__free(s->a, seq);
    if (pos) cvq__free(s->a, pos);
    if (idx) cvq__free(s->a, idx);
    return st;
}

/* ls[j] = mean over the used tokens of |v[j]| (double sum in token order),
 * written to the codebook unless keep_ls; lse = ls + 1e-6 from the stored
 * float ls (what the encoder will use). */
static cvq_status set_scales(tv_state *s, cvq_codebook *cb, int keep_ls) {
    const size_t F = s->g.value_group_width;
    for (uint32_t gi = 0; gi < s->groups; gi++) {
        float *ls;
        cvq_status st = cvq_codebook_tensor_data(cb, CVQ_T_VAL_LS, s->layer, gi, &ls);
        if (st != CVQ_OK) return st;
        if (!keep_ls)
            for (size_t f = 0; f < F; f++) {
                const size_t j = (size_t)gi * F + f;
                double acc = 0.0;
                for (size_t t = 0; t < s->U; t++) acc += fabs((double)s->val[t * s->kvd + j]);
                ls[f] = (float)(acc / (double)s->U);
            }
        for (size_t f = 0; f < F; f++) {
            if (!(ls[f] >= 0.0f) || !isfinite(ls[f]))
                return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                                WHO ": ls[%zu] of layer %u group %u is %g (must be finite, >= 0)",
                                f, s->layer, gi, (double)ls[f]);
            s->lse[(size_t)gi * F + f] = (double)ls[f] + 1e-6;
        }
    }
    return CVQ_OK;
}

/* Seeded initialisation: LayerNorm identity, zero biases, W1 ~ N(0, 1/F),
 * W2 ~ N(0, 1/I), E ~ N(0, 1/Nc) (the scale of E cancels in decoding). Or,
 * when resuming, the codebook's weights. */
static cvq_status init_params(tv_state *s, cvq_codebook *cb, const cvq_value_train_params *p) {
    const cvq__tv_layout *L = &s->lay;
    const double sd[7] = {0.0, 0.0, 1.0 / sqrt((double)s->net.F), 0.0,
                          1.0 / sqrt((double)s->net.I), 0.0, 1.0 / sqrt((double)s->net.Nc)};
    for (uint32_t gi = 0; gi < s->groups; gi++) {
        double *P = s->par + (size_t)gi * L->n;
        for (int t = 0; t < 7; t++) {
            double *x = P + L->off[t];
            if (p->resume) {
                const float *src;
                cvq_status st = cvq_codebook_tensor_cdata(cb, (cvq_tensor_id)(CVQ_T_VAL_LN_W + t),
                                                          s->layer, gi, &src);
                if (st != CVQ_OK) return st;
                for (size_t i = 0; i < L->len[t]; i++) x[i] = (double)src[i];
            } else if (sd[t] > 0.0) {
                cvq__rng r;
                cvq__rng_init(&r, p->seed, STREAM_INIT + (uint64_t)t * 65536u + gi);
                for (size_t i = 0; i < L->len[t]; i++) x[i] = sd[t] * cvq__rng_normal(&r);
            } else {
                const double c = t == 0 ? 1.0 : 0.0; /* ln_w = 1, others 0 */
                for (size_t i = 0; i < L->len[t]; i++) x[i] = c;
            }
        }
    }
    /* decoupled weight decay on the matrices W1, W2, E only: LayerNorm
     * parameters and biases set offsets and scales, decaying them toward 0
     * only biases the model */
    for (int t = 0; t < 7; t++) {
        const int dec = t == 2 || t == 4 || t == 6;
        memset(s->decay + L->off[t], dec, L->len[t]);
    }
    return CVQ_OK;
}

static cvq_status write_params(tv_state *s, cvq_codebook *cb) {
    const cvq__tv_layout *L = &s->lay;
    for (uint32_t gi = 0; gi < s->groups; gi++) {
        const double *P = s->par + (size_t)gi * L->n;
        for (int t = 0; t < 7; t++) {
            float *dst;
            cvq_status st = cvq_codebook_tensor_data(cb, (cvq_tensor_id)(CVQ_T_VAL_LN_W + t),
                                                     s->layer, gi, &dst);
            if (st != CVQ_OK) return st;
            for (size_t i = 0; i < L->len[t]; i++) dst[i] = (float)P[L->off[t] + i];
        }
    }
    return cvq_codebook_commit(cb);
}

/* Rotated queries/keys (double) of rows [r0, r0+n) of the used set into
 * q [n][Hq][d], k [n][Hkv][d]. */
static void rotate_rows(const tv_state *s, size_t r0, size_t n, double *q, double *k) {
    const uint32_t d = s->g.head_dim, Hq = s->g.n_q_heads, Hkv = s->g.n_kv_heads;
    for (size_t i = 0; i < n; i++) {
        const float *qs = s->qry + (r0 + i) * Hq * d, *ks = s->key + (r0 + i) * Hkv * d;
        double *qd = q + i * Hq * d, *kd = k + i * Hkv * d;
        for (size_t c = 0; c < (size_t)Hq * d; c++) qd[c] = (double)qs[c];
        for (size_t c = 0; c < (size_t)Hkv * d; c++) kd[c] = (double)ks[c];
        cvq__tv_rope(qd, Hq, d, s->g.pair_layout, s->theta, s->pos[r0 + i]);
        cvq__tv_rope(kd, Hkv, d, s->g.pair_layout, s->theta, s->pos[r0 + i]);
    }
}

/* Fills the batch of step `step`: windows drawn uniformly (seeded by step)
 * until Bt tokens are filled (the last one cut; at most 1024 draws).
 * Returns the number of rows. */
static size_t fill_batch(tv_state *s, const cvq_value_train_params *p, uint64_t step) {
    const size_t Bt = p->batch_tokens, kvd = s->kvd;
    const uint32_t d = s->g.head_dim, Hq = s->g.n_q_heads, Hkv = s->g.n_kv_heads;
    cvq__rng r;
    cvq__rng_init(&r, p->seed, STREAM_BATCH + step);
    size_t B = 0;
    for (uint32_t draw = 0; B < Bt && draw < 1024; draw++) {
        const tv_window *w = &s->win[cvq__rng_below(&r, s->n_win)];
        const size_t n = w->len < Bt - B ? w->len : Bt - B;
        for (size_t i = 0; i < n; i++) {
            const float *src = s->val + (w->start + i) * kvd;
            for (size_t c = 0; c < kvd; c++) s->bv[(B + i) * kvd + c] = (double)src[c];
            s->bpos[B + i] = s->pos[w->start + i];
            s->bseg[B + i] = draw;
        }
        if (s->use_attn)
            rotate_rows(s, w->start, n, s->bq + B * Hq * d, s->bk + B * Hkv * d);
        B += n;
    }
    if (s->use_attn)
        cvq__tv_attn_weights(B, Hq, Hkv, d, s->kv_of, s->bq, s->bk, s->bpos, s->bseg,
                             (double)s->g.logit_scale, s->nt, s->ascr, s->attn);
    return B;
}

/* One AdamW update with clipped gradients; lr_t this step's rate. */
static void adamw_step(tv_state *s, const cvq_value_train_params *p, uint64_t step,
                       double lr_t) {
    double nrm2 = 0.0;
    for (size_t i = 0; i < s->n_par; i++) nrm2 += s->grad[i] * s->grad[i];
    const double nrm = sqrt(nrm2);
    const double gs = (p->clip > 0.0 && nrm > p->clip) ? p->clip / nrm : 1.0;
    const double b1 = p->beta1, b2 = p->beta2;
    const double c1 = 1.0 - pow(b1, (double)(step + 1)), c2 = 1.0 - pow(b2, (double)(step + 1));
    const double wd = lr_t * p->weight_decay;
    const size_t n1 = s->lay.n;
    const long long n = (long long)s->n_par;
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(s->nt) if(s->n_par >= CVQ__TV_PAR_MIN)
#endif
    for (long long ii = 0; ii < n; ii++) {
        const size_t i = (size_t)ii;
        const double gr = s->grad[i] * gs;
        s->m1[i] = b1 * s->m1[i] + (1.0 - b1) * gr;
        s->m2[i] = b2 * s->m2[i] + (1.0 - b2) * gr * gr;
        double x = s->par[i];
        if (s->decay[i % n1]) x -= wd * x;
        x -= lr_t * (s->m1[i] / c1) / (sqrt(s->m2[i] / c2) + 1e-8);
        s->par[i] = x;
    }
}

/* Warm-up from lr/warmup to lr, then cosine from lr to lr*lr_end_factor. */
static double lr_at(const cvq_value_train_params *p, uint32_t step) {
    if (step < p->warmup_steps) return p->lr * (double)(step + 1) / (double)p->warmup_steps;
    const double span = (double)p->steps - (double)p->warmup_steps;
    const double x = span > 1.0 ? (double)(step - p->warmup_steps) / (span - 1.0) : 1.0;
    const double lo = p->lr * p->lr_end_factor;
    return lo + (p->lr - lo) * 0.5 * (1.0 + cos(3.14159265358979323846 * x));
}

/* rel_error (and attn_rel_error) of the library's own encoder/decoder on
 * the used tokens: CPU context, argmax codes, no noise. */
static cvq_status measure(tv_state *s, cvq_codebook *cb, const cvq_value_train_params *p,
                          cvq_train_report *rep) {
    cvq_context_params cp = cvq_context_default_params();
    cp.backend = CVQ_BACKEND_CPU;
    cp.n_threads = s->nt;
    cp.allocator = p->allocator;
    cvq_context *ctx = NULL;
    cvq_status st = cvq_context_create(&cp, &ctx);
    if (st != CVQ_OK) return st;
    const size_t U = s->U, kvd = s->kvd, G = s->groups, Nc = s->g.value_bits;
    uint8_t *bits = alloc_n(s, U, G * (Nc / 8), 1, &st);
    float *sig = alloc_n(s, U, G, sizeof(float), &st);
    float *dec = alloc_n(s, U, kvd, sizeof(float), &st);
    if (st == CVQ_OK) st = cvq_encode_values(ctx, cb, s->layer, s->val, CVQ_F32, U, bits, sig);
    if (st == CVQ_OK) st = cvq_decode_values(ctx, cb, s->layer, bits, sig, U, dec);
    if (st == CVQ_OK) {
        double num = 0.0, den = 0.0;
        for (size_t i = 0; i < U * kvd; i++) {
            const double e = (double)dec[i] - (double)s->val[i];
            num += e * e;
            den += (double)s->val[i] * (double)s->val[i];
        }
        rep->rel_error = den > 0.0 ? num / den : 0.0;
    }
    rep->attn_rel_error = -1.0;
    if (st == CVQ_OK && s->use_attn) {
        /* per window: attention of its queries over its tokens, with the
         * decoded and with the true values */
        const uint32_t d = s->g.head_dim, Hq = s->g.n_q_heads, Hkv = s->g.n_kv_heads;
        double num = 0.0, den = 0.0;
        double *xd = alloc_n(s, p->batch_tokens, kvd, sizeof(double), &st);
        double *xt = alloc_n(s, p->batch_tokens, kvd, sizeof(double), &st);
        double *od = alloc_n(s, p->batch_tokens, (size_t)Hq * d, sizeof(double), &st);
        double *ot = alloc_n(s, p->batch_tokens, (size_t)Hq * d, sizeof(double), &st);
        for (size_t w = 0; st == CVQ_OK && w < s->n_win; w++) {
            const size_t r0 = s->win[w].start, n = s->win[w].len;
            for (size_t i = 0; i < n * kvd; i++) {
                xd[i] = (double)dec[r0 * kvd + i];
                xt[i] = (double)s->val[r0 * kvd + i];
            }
            for (size_t i = 0; i < n; i++) {
                s->bpos[i] = s->pos[r0 + i];
                s->bseg[i] = 0;
            }
            rotate_rows(s, r0, n, s->bq, s->bk);
            cvq__tv_attn_weights(n, Hq, Hkv, d, s->kv_of, s->bq, s->bk, s->bpos, s->bseg,
                                 (double)s->g.logit_scale, s->nt, s->ascr, s->attn);
            cvq__tv_attn_apply(n, Hq, Hkv, d, s->kv_of, s->attn, xd, s->nt, s->ascr, od);
            cvq__tv_attn_apply(n, Hq, Hkv, d, s->kv_of, s->attn, xt, s->nt, s->ascr, ot);
            for (size_t i = 0; i < n * Hq * d; i++) {
                num += (od[i] - ot[i]) * (od[i] - ot[i]);
                den += ot[i] * ot[i];
            }
        }
        if (st == CVQ_OK) rep->attn_rel_error = den > 0.0 ? num / den : 0.0;
        if (xd) cvq__free(s->a, xd);
        if (xt) cvq__free(s->a, xt);
        if (od) cvq__free(s->a, od);
        if (ot) cvq__free(s->a, ot);
    }
    if (bits) cvq__free(s->a, bits);
    if (sig) cvq__free(s->a, sig);
    if (dec) cvq__free(s->a, dec);
    cvq_context_free(ctx);
    return st;
}

static cvq_status run(tv_state *s, cvq_codebook *cb, const cvq_train_data *data,
                      const cvq_value_train_params *p, cvq_train_report *rep) {
    const double t0 = cvq__train_now();
    cvq_status st = prepare_data(s, data, p);
    if (st != CVQ_OK) return st;
    const uint32_t d = s->g.head_dim, Hq = s->g.n_q_heads, Hkv = s->g.n_kv_heads;
    const size_t Bt = p->batch_tokens;
    s->nt = cvq__train_threads(p->n_threads, (size_t)-1);
    s->net = (cvq__tv_net){s->g.value_group_width, s->g.value_hidden, s->g.value_bits,
                           s->groups, Hq, Hkv, d, s->nt};
    cvq__tv_layout_of(&s->net, &s->lay);
    s->n_par = (size_t)s->groups * s->lay.n;
    s->theta = alloc_n(s, d / 2, 1, sizeof(double), &st);
    s->kv_of = alloc_n(s, Hq, 1, sizeof(uint32_t), &st);
    s->lse = alloc_n(s, s->kvd, 1, sizeof(double), &st);
    s->par = alloc_n(s, s->n_par, 1, sizeof(double), &st);
    s->grad = alloc_n(s, s->n_par, 1, sizeof(double), &st);
    s->m1 = alloc_n(s, s->n_par, 1, sizeof(double), &st);
    s->m2 = alloc_n(s, s->n_par, 1, sizeof(double), &st);
    s->decay = alloc_n(s, s->lay.n, 1, 1, &st);
    s->bv = alloc_n(s, Bt, s->kvd, sizeof(double), &st);
    s->gum = alloc_n(s, (size_t)s->groups * Bt, 2 * (size_t)s->g.value_bits, sizeof(double), &st);
    s->bpos = alloc_n(s, Bt, 1, sizeof(int32_t), &st);
    s->bseg = alloc_n(s, Bt, 1, sizeof(uint32_t), &st);
    if (s->use_attn) {
        s->bq = alloc_n(s, Bt, (size_t)Hq * d, sizeof(double), &st);
        s->bk = alloc_n(s, Bt, (size_t)Hkv * d, sizeof(double), &st);
        s->attn = alloc_n(s, (size_t)Hq * Bt, Bt, sizeof(double), &st);
        s->ascr = alloc_n(s, cvq__tv_attn_scratch_len(Bt, d), 1, sizeof(double), &st);
    }
    if (st == CVQ_OK) st = cvq__tv_work_create(&s->net, Bt, s->a, &s->work);
    if (st != CVQ_OK) return st;
    st = cvq_codebook_rope_theta(cb, s->theta);
    if (st != CVQ_OK) return st;
    for (uint32_t h = 0; h < Hq; h++) s->kv_of[h] = cvq__kv_of(&s->g, h);
    st = set_scales(s, cb, p->keep_ls || p->resume);
    if (st == CVQ_OK) st = init_params(s, cb, p);
    if (st != CVQ_OK) return st;

    cvq__tv_batch bt = {0, s->bv, s->lse, s->gum, p->gumbel_tau, CVQ__TV_HARD_ST,
                        s->use_attn ? s->attn : NULL, s->kv_of, p->attn_weight};
    cvq__train_meter meter;
    cvq__train_meter_start(&meter, p->steps);
    cvq_train_progress prog;
    memset(&prog, 0, sizeof prog);
    prog.phase = "values";
    prog.layer = s->layer;
    prog.n_parts = s->groups;
    prog.n_stages = 1;
    prog.n_steps = p->steps;
    int cancelled = 0;
    uint32_t step = 0;
    for (; step < p->steps; step++) {
        bt.B = fill_batch(s, p, step);
        cvq__tv_gumbel_fill(&s->net, p->seed, step, bt.B, s->gum);
        const double loss = cvq__tv_loss_grad(&s->net, s->par, s->work, &bt, s->grad);
        if (!isfinite(loss))
            return CVQ_FAIL(NULL, CVQ_ERR_INTERNAL,
                            WHO ": layer %u: non-finite loss at step %u (lr too high?)",
                            s->layer, step);
        adamw_step(s, p, step, lr_at(p, step));
        prog.step = step + 1;
        prog.loss = loss;
        if (cvq__train_meter_tick(&meter, 1, (double)bt.B, p->progress, p->progress_user,
                                  &prog)) {
            cancelled = 1;
            step++;
            break;
        }
    }
    st = write_params(s, cb);
    if (st != CVQ_OK) return st;
    rep->steps_run = step;
    rep->tokens_used = s->U;
    if (cancelled) {
        rep->seconds = cvq__train_now() - t0;
        cvq__train_append_note(cb, "train-values layer %u: cancelled after %u of %u steps "
                               "(seed %llu)", s->layer, step, p->steps,
                               (unsigned long long)p->seed);
        return CVQ_FAIL(NULL, CVQ_ERR_CANCELLED,
                        WHO ": layer %u: cancelled by the progress callback after %u steps",
                        s->layer, step);
    }
    st = measure(s, cb, p, rep);
    if (st != CVQ_OK) return st;
    rep->seconds = cvq__train_now() - t0;
    return cvq__train_append_note(
        cb,
        "train-values layer %u: tokens %zu of %zu (%zu seq, %s), queries %s, seed %llu, "
        "steps %u, batch %u, lr %g (warm-up %u, cosine to x%g), wd %g, betas %g/%g, clip %g, "
        "tau %g, attn_weight %g, ls %s, %s; rel_error %.6g, attn_rel_error %.6g",
        s->layer, s->U, data->n_tokens, cvq__train_n_seq(data), cvq__train_dtype_name(data->dtype),
        s->use_attn ? "yes" : "no", (unsigned long long)p->seed, p->steps, p->batch_tokens, p->lr,
        p->warmup_steps, p->lr_end_factor, p->weight_decay, p->beta1, p->beta2, p->clip,
        p->gumbel_tau, p->attn_weight, (p->keep_ls || p->resume) ? "kept" : "mean|v|",
        p->resume ? "resumed" : "fresh init", rep->rel_error, rep->attn_rel_error);
}

cvq_status cvq_train_values(cvq_codebook *cb, uint32_t layer, const cvq_train_data *data,
                            const cvq_value_train_params *params, cvq_train_report *report) {
    if (!cb) return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, WHO ": codebook is NULL");
    if (!data) return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, WHO ": data is NULL");
    const cvq_value_train_params p = params ? *params : cvq_value_train_default_params();
    cvq_status st = check_params(&p);
    if (st != CVQ_OK) return st;
    tv_state s;
    memset(&s, 0, sizeof s);
    st = cvq_codebook_geometry(cb, &s.g);
    if (st != CVQ_OK) return st;
    if (layer >= s.g.n_layers)
        return CVQ_FAIL(NULL, CVQ_ERR_LAYER_RANGE, WHO ": layer %u >= n_layers %u", layer,
                        s.g.n_layers);
    s.use_attn = data->queries != NULL && p.attn_weight > 0.0;
    const unsigned need = CVQ__TRAIN_NEED_VALUES |
                          (s.use_attn ? CVQ__TRAIN_NEED_KEYS | CVQ__TRAIN_NEED_QUERIES : 0u);
    st = cvq__train_validate(&s.g, data, need, WHO);
    if (st != CVQ_OK) return st;
    cvq__allocator_init(&s.al, p.allocator);
    s.a = &s.al;
    s.layer = layer;
    s.groups = cvq__value_groups(&s.g);
    s.kvd = cvq__kv_dims(&s.g);
    cvq_train_report rep;
    memset(&rep, 0, sizeof rep);
    rep.attn_rel_error = -1.0;
    st = run(&s, cb, data, &p, &rep);
    state_free(&s);
    if (report) *report = rep;
    return st;
}
