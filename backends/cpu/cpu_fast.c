/*
 * Drivers of the CPU fast path (cpu_fast.h): threads and batching around
 * the per-instruction-set kernels.
 *
 * Encoders: every token is independent, so the split over threads changes
 * no bit. Keys run one work item per (batch of `lanes` tokens, KV head);
 * values one item per batch of `vlanes` tokens (below 4 tokens, the
 * reference's per-token code, which is faster there). The key scales are
 * computed first with the reference's own function (cvq_ref_key_scales).
 *
 * Attention (a tolerance, numerics.md section 6): per query, the compressed
 * tokens are split into one contiguous range per thread. Phase 1: logits of
 * the range (kernel attn_logits). Phase 2: the heads' maxima over every
 * range and the full-precision segments. Phase 3: softmax weights and the
 * code-space value sums per value group (kernel attn_values: per nibble of
 * the packed bits and nibble value, the weighted sigma). Phase 4: the
 * threads' sums are added, expanded to one sum per bit, multiplied by E
 * once per head and step, and divided by the softmax denominator.
 * Full-precision sinks and window tokens are handled by plain loops (few).
 */
#include "cpu_fast.h"
#include "numerics.h"
#include "reference.h"

#include <math.h>
#include <string.h>
#ifdef COMMVQ_HAVE_OPENMP
#include <omp.h>
#endif

/* ---- encoders ----------------------------------------------------------------- */

cvq_status cvq_cpu_fast_encode_keys(cvq_context *ctx, const cvq_layer_view *lv, size_t n,
                                    const float *keys, uint16_t *codes, float *scales,
                                    int n_threads) {
    (void)ctx;
    const cvq_cpu_kernels *K = cvq_cpu_kernels_get();
    const size_t kvd = cvq__kv_dims(lv->g), ns = cvq__key_scale_count(lv->g);
    const size_t Hkv = lv->g->n_kv_heads, lanes = K->lanes;
    const long long nn = (long long)n;
    const size_t n_batch = (n + lanes - 1) / lanes;
    const long long items = (long long)(n_batch * Hkv);
    (void)n_threads;
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel num_threads(n_threads)
#endif
    {
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp for schedule(static)
#endif
        for (long long t = 0; t < nn; t++)
            (void)cvq_ref_key_scales(lv, keys + (size_t)t * kvd, scales + (size_t)t * ns);
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (long long it = 0; it < items; it++) {
            const size_t b = (size_t)it / Hkv, h = (size_t)it % Hkv;
            const size_t t0 = b * lanes, nb = n - t0 < lanes ? n - t0 : lanes;
            K->key_head_batch(lv, (uint32_t)h, keys, scales, t0, (uint32_t)nb, codes);
        }
    }
    return CVQ_OK;
}

cvq_status cvq_cpu_fast_encode_values(cvq_context *ctx, const cvq_layer_view *lv, size_t n,
                                      const float *values, uint8_t *bits, float *sigma,
                                      int n_threads) {
    const cvq_cpu_kernels *K = cvq_cpu_kernels_get();
    /* A batch costs the same whatever number of its lanes holds a token:
     * below 4 tokens the reference's per-token code (the same bits) is
     * faster, one token per thread. */
    const bool per_token = n < 4;
    const size_t lanes = per_token ? 1 : K->vlanes, n_batch = (n + lanes - 1) / lanes;
    const size_t scratch_n = per_token ? cvq_ref_value_scratch(lv) : cvq_cpu_value_scratch(lv);
    size_t bytes;
    if (!cvq__mul_size(scratch_n, sizeof(float) * (size_t)n_threads, &bytes))
        return CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "value encoder scratch too large");
    float *scratch = cvq__alloc(&ctx->alloc, bytes);
    if (!scratch)
        return CVQ_FAIL(ctx, CVQ_ERR_OUT_OF_MEMORY, "value encoder scratch (%zu bytes)", bytes);
    const long long nbl = (long long)n_batch;
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel num_threads(n_threads)
#endif
    {
#ifdef COMMVQ_HAVE_OPENMP
        float *my = scratch + (size_t)omp_get_thread_num() * scratch_n;
#pragma omp for schedule(dynamic, 1)
#else
        float *my = scratch;
#endif
        for (long long b = 0; b < nbl; b++) {
            const size_t t0 = (size_t)b * lanes, nb = n - t0 < lanes ? n - t0 : lanes;
            if (per_token)
                cvq_ref_encode_value_token(lv, values + t0 * cvq__kv_dims(lv->g),
                                           bits + t0 * lv->n_groups * (lv->g->value_bits / 8),
                                           sigma + t0 * lv->n_groups, my);
            else
                K->value_batch(lv, values, t0, (uint32_t)nb, bits, sigma, my);
        }
    }
    cvq__free(&ctx->alloc, scratch);
    return CVQ_OK;
}

/* ---- attention ----------------------------------------------------------------- */

/* Scratch of one attention call, all from one allocation. */
typedef struct attn_mem {
    float *qr;      /* [Hq][d]   q' in head layout */
    float *qpair;   /* [Hq][d]   q' in pair form */
    float *lf;      /* [n_full][Hq]  logits of sinks|window */
    float *kr;      /* [d]       one rotated full-precision key */
    float *lg;      /* [n_comp][Hq+16] */
    float *mxp;     /* [nt][Hq]  per-thread maxima */
    float *mx;      /* [Hq] */
    float *mxg;     /* [groups][nhp] */
    float *acc;     /* [nt][groups][Nc/4][16][nhp] */
    float *den;     /* [nt][groups][nhp] */
    float *csn;     /* [nt][TB][2][d] */
    float *bitsum;  /* [nt][Nc][nhp] */
    float *res;     /* [nt][nhp][d] */
} attn_mem;
#define ATTN_REGIONS 13

/* Value group of query head h, and the group's first query head. */
static size_t group_of(const cvq_geometry *g, uint32_t h) {
    return ((size_t)cvq__kv_of(g, h) * g->head_dim) / g->value_group_width;
}

cvq_status cvq_cpu_fast_attend(cvq_context *ctx, const cvq_layer_view *lv,
                               const cvq_attend_host *a, int n_threads) {
    const cvq_geometry *g = lv->g;
    const uint32_t Hq = g->n_q_heads, d = g->head_dim, P = lv->P;
    const uint32_t F = g->value_group_width, Nc = g->value_bits;
    const size_t groups = lv->n_groups, kvd = cvq__kv_dims(g);
    const cvq_cpu_kernels *K = cvq_cpu_kernels_get();

    /* query heads of value group gi: [ghb[gi], ghb[gi] + gnh[gi]), contiguous
     * because kv_of(h) grows with h; nhp: the largest count padded to 16 */
    uint32_t nh_max = 0;
    for (size_t gi = 0, h = 0; gi < groups; gi++) {
        uint32_t nh = 0;
        while (h < Hq && group_of(g, (uint32_t)h) == gi) {
            h++;
            nh++;
        }
        if (nh > nh_max) nh_max = nh;
    }
    const uint32_t nhp = (nh_max + 15u) / 16u * 16u;
    if (nhp > CVQ_ATTN_MAX_NHP || d > 256) return cvq_ref_attend(ctx, lv, a);

    const size_t n_full = a->n_sink + a->n_win, n_comp = a->n_comp;
    const size_t lgs = (size_t)Hq + 16;
    const size_t min_chunk = 512; /* compressed tokens per thread at least */
    int nt = n_threads;
    if ((size_t)nt > (n_comp + min_chunk - 1) / min_chunk) nt = (int)((n_comp + min_chunk - 1) / min_chunk);
    if (nt < 1) nt = 1;
    const size_t accsz = (size_t)(Nc / 4) * 16 * nhp; /* floats per group */

    /* sizes in floats; each region rounded up to 16 floats (64 bytes) */
    size_t sz[ATTN_REGIONS], total = 0;
    sz[0] = (size_t)Hq * d;
    sz[1] = (size_t)Hq * d;
    sz[2] = n_full * Hq;
    sz[3] = d;
    sz[4] = n_comp * lgs;
    sz[5] = (size_t)nt * Hq;
    sz[6] = Hq;
    sz[7] = groups * nhp;
    sz[8] = (size_t)nt * groups * accsz;
    sz[9] = (size_t)nt * groups * nhp;
    sz[10] = (size_t)nt * CVQ_ATTN_TB * 2 * d;
    sz[11] = (size_t)nt * Nc * nhp;
    sz[12] = (size_t)nt * nhp * d;
    for (int i = 0; i < ATTN_REGIONS; i++) {
        if (!cvq__add_size(sz[i], 16, &sz[i])) total = SIZE_MAX;
        sz[i] &= ~(size_t)15;
        if (total != SIZE_MAX && !cvq__add_size(total, sz[i], &total)) total = SIZE_MAX;
    }
    size_t bytes;
    if (total == SIZE_MAX || !cvq__mul_size(total, sizeof(float), &bytes))
        return CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "attend: scratch size overflows");
    float *mem = cvq__alloc(&ctx->alloc, bytes);
    if (!mem)
        return CVQ_FAIL(ctx, CVQ_ERR_OUT_OF_MEMORY, "attend: no memory for %zu bytes of scratch",
                        bytes);
    attn_mem m;
    float **slot[ATTN_REGIONS] = {&m.qr, &m.qpair, &m.lf, &m.kr, &m.lg, &m.mxp, &m.mx,
                                  &m.mxg, &m.acc, &m.den, &m.csn, &m.bitsum, &m.res};
    for (size_t i = 0, off = 0; i < ATTN_REGIONS; i++) {
        *slot[i] = mem + off;
        off += sz[i];
    }

    cvq_attn_job job;
    job.lv = lv;
    job.qpair = m.qpair;
    job.codes = a->comp_codes;
    job.kscale = a->comp_kscale;
    job.pos = a->comp_pos;
    job.vbits = a->comp_vbits;
    job.vsigma = a->comp_vsigma;
    job.code_bytes = ((size_t)12 * g->n_kv_heads * g->key_stages + 7) / 8;
    job.vbytes = groups * (Nc / 8);
    job.nhp = nhp;

    for (size_t i = 0; i < a->n_q; i++) {
        const int32_t qpos = a->q_pos[i];
        job.qpos = qpos;
        float *out = a->out + i * Hq * d;
        /* q' per head, and its pair form (q'x_p, q'y_p) */
        for (uint32_t h = 0; h < Hq; h++) {
            float *qr = m.qr + (size_t)h * d;
            memcpy(qr, a->q + (i * Hq + h) * d, (size_t)d * sizeof(float));
            if (!a->q_rotated) cvq_rope_apply(qr, d, (int)g->pair_layout, lv->rope_t, qpos);
            for (uint32_t p = 0; p < P; p++) {
                uint32_t ire, iim;
                cvq__pair_index(g->pair_layout, d, p, &ire, &iim);
                m.qpair[(size_t)h * d + 2 * p] = qr[ire];
                m.qpair[(size_t)h * d + 2 * p + 1] = qr[iim];
            }
        }
        /* full-precision logits (sinks, then window): each key rotated once
         * per KV head, then dotted with that head's queries */
        for (size_t u = 0; u < n_full; u++) {
            const bool sink = u < a->n_sink;
            const size_t t = sink ? u : u - a->n_sink;
            const int32_t pos = sink ? a->sink_pos[t] : a->win_pos[t];
            const float *kt = (sink ? a->sink_k : a->win_k) + t * kvd;
            uint32_t kv_done = UINT32_MAX;
            for (uint32_t h = 0; h < Hq; h++) {
                if (pos > qpos) {
                    m.lf[u * Hq + h] = -INFINITY;
                    continue;
                }
                const uint32_t kv = cvq__kv_of(g, h);
                if (kv != kv_done) {
                    memcpy(m.kr, kt + (size_t)kv * d, (size_t)d * sizeof(float));
                    cvq_rope_apply(m.kr, d, (int)g->pair_layout, lv->rope_t, pos);
                    kv_done = kv;
                }
                const float *qr = m.qr + (size_t)h * d;
                float acc = 0.0f;
                for (uint32_t f = 0; f < d; f++) acc = acc + qr[f] * m.kr[f];
                m.lf[u * Hq + h] = lv->logit_scale * acc;
            }
        }

#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel num_threads(nt)
#endif
        {
#ifdef COMMVQ_HAVE_OPENMP
            const int tid = omp_get_thread_num();
#else
            const int tid = 0;
#endif
            const size_t c0 = n_comp * (size_t)tid / (size_t)nt;
            const size_t c1 = n_comp * ((size_t)tid + 1) / (size_t)nt;
            float *lg = m.lg + c0 * lgs;
            /* phase 1: logits of this thread's range, and their maxima */
            if (c1 > c0) K->attn_logits(&job, c0, c1, lg, m.csn + (size_t)tid * CVQ_ATTN_TB * 2 * d);
            float *mxp = m.mxp + (size_t)tid * Hq;
            for (uint32_t h = 0; h < Hq; h++) mxp[h] = -INFINITY;
            for (size_t t = c0; t < c1; t++) {
                const float *lt = m.lg + t * lgs;
                for (uint32_t h = 0; h < Hq; h++) mxp[h] = lt[h] > mxp[h] ? lt[h] : mxp[h];
            }
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp barrier
#pragma omp single
#endif
            {
                /* phase 2: maxima over threads and full-precision tokens;
                 * per group, padded (+Inf: weight 0 in padding lanes) */
                for (uint32_t h = 0; h < Hq; h++) {
                    float mxh = -INFINITY;
                    for (int k = 0; k < nt; k++)
                        if (m.mxp[(size_t)k * Hq + h] > mxh) mxh = m.mxp[(size_t)k * Hq + h];
                    for (size_t u = 0; u < n_full; u++)
                        if (m.lf[u * Hq + h] > mxh) mxh = m.lf[u * Hq + h];
                    m.mx[h] = mxh;
                }
                for (size_t gi = 0, h = 0; gi < groups; gi++)
                    for (uint32_t hh = 0; hh < nhp; hh++) {
                        const bool in = h < Hq && group_of(g, (uint32_t)h) == gi;
                        m.mxg[gi * nhp + hh] = in ? m.mx[h++] : INFINITY;
                    }
            }
            /* phase 3: weights and code-space sums of this thread's range */
            float *acc = m.acc + (size_t)tid * groups * accsz;
            float *den = m.den + (size_t)tid * groups * nhp;
            memset(acc, 0, groups * accsz * sizeof(float));
            memset(den, 0, groups * nhp * sizeof(float));
            for (size_t gi = 0, hb = 0; gi < groups; gi++) {
                uint32_t nh = 0;
                while (hb + nh < Hq && group_of(g, (uint32_t)(hb + nh)) == gi) nh++;
                if (c1 > c0 && nh)
                    K->attn_values(&job, c0, c1, lg, gi, (uint32_t)hb, m.mxg + gi * nhp,
                                   acc + gi * accsz, den + gi * nhp);
                hb += nh;
            }
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp barrier
#endif
            /* phase 4a: add the other threads' sums into thread 0's, each
             * thread a slice */
            const size_t all = groups * accsz;
            const size_t s0 = all * (size_t)tid / (size_t)nt, s1 = all * ((size_t)tid + 1) / (size_t)nt;
            for (int k = 1; k < nt; k++) {
                const float *src = m.acc + (size_t)k * all;
                for (size_t e = s0; e < s1; e++) m.acc[e] += src[e];
            }
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp barrier
#endif
            /* phase 4b: each thread a slice of every group's heads: bits
             * -> E once per head, full-precision tokens, 1/denominator */
            float *bitsum = m.bitsum + (size_t)tid * Nc * nhp;
            float *res = m.res + (size_t)tid * nhp * d;
            for (size_t gi = 0, hb = 0; gi < groups; gi++) {
                uint32_t nh = 0;
                while (hb + nh < Hq && group_of(g, (uint32_t)(hb + nh)) == gi) nh++;
                /* this thread's heads of the group, an even count */
                const uint32_t pairs = (nh + 1) / 2;
                const uint32_t hh0 = 2 * (uint32_t)(pairs * (size_t)tid / (size_t)nt);
                uint32_t hh1 = 2 * (uint32_t)(pairs * ((size_t)tid + 1) / (size_t)nt);
                if (hh1 > nh) hh1 = nh;
                /* the heads of one KV head read the same E columns: one
                 * expand call per KV head run; bit sums computed once */
                for (uint32_t a0 = hh0; a0 < hh1;) {
                    const uint32_t kv = cvq__kv_of(g, (uint32_t)(hb + a0));
                    uint32_t a1 = a0;
                    while (a1 < hh1 && cvq__kv_of(g, (uint32_t)(hb + a1)) == kv) a1++;
                    K->attn_expand(m.acc + gi * accsz, Nc, nhp, lv->E + gi * lv->s_E, F,
                                   (size_t)kv * d - gi * F, d, a0, a1, a0 != hh0, bitsum,
                                   res + (size_t)(a0 - hh0) * d);
                    a0 = a1;
                }
                for (uint32_t hh = hh0; hh < hh1; hh++) {
                    const uint32_t h = (uint32_t)hb + hh, kv = cvq__kv_of(g, h);
                    float *o = out + (size_t)h * d;
                    const float mxh = m.mx[h];
                    if (mxh == -INFINITY) { /* sees no token: zeros */
                        memset(o, 0, (size_t)d * sizeof(float));
                        continue;
                    }
                    const size_t c0f = (size_t)kv * d - gi * F;
                    double denom = 0.0;
                    for (int k = 0; k < nt; k++) denom += (double)m.den[((size_t)k * groups + gi) * nhp + hh];
                    const float *ls_eps = lv->val_ls_eps + gi * lv->s_vec + c0f;
                    const float *rh = res + (size_t)(hh - hh0) * d;
                    for (uint32_t f = 0; f < d; f++) o[f] = ls_eps[f] * rh[f];
                    for (size_t u = 0; u < n_full; u++) {
                        const float l = m.lf[u * Hq + h];
                        if (l == -INFINITY) continue;
                        const float p = expf(l - mxh);
                        denom += (double)p;
                        const bool sink = u < a->n_sink;
                        const size_t t = sink ? u : u - a->n_sink;
                        const float *v = (sink ? a->sink_v : a->win_v) + t * kvd + (size_t)kv * d;
                        for (uint32_t f = 0; f < d; f++) o[f] += p * v[f];
                    }
                    const float inv = (float)(1.0 / denom);
                    for (uint32_t f = 0; f < d; f++) o[f] *= inv;
                }
                hb += nh;
            }
        }
    }
    cvq__free(&ctx->alloc, mem);
    return CVQ_OK;
}
