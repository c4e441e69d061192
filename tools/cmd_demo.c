/*
 * commvq demo: the README's main job. A synthetic LLaMA-3.1-8B-like layer
 * (Hq = 32, Hkv = 8, d = 128, llama3 RoPE) with random 1-bit and 2-bit
 * codebooks, on every available backend:
 *   - bytes per token of the compressed record against FP16 K/V;
 *   - the code-domain attention output against attention computed here in
 *     double precision over the explicitly decoded cache (cvq_decode_keys/
 *     values, RoPE and softmax in double): this shows that attending in the
 *     code domain is exactly attention over the compressed cache;
 *   - the same output against FP16 attention over the original keys and
 *     values (large here: a random codebook does not preserve K/V);
 *   - time per decode step.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"

#define DEMO_HQ 32u
#define DEMO_HKV 8u
#define DEMO_D 128u
#define DEMO_P (DEMO_D / 2u)
#define DEMO_WINDOW 128u
#define DEMO_NQ 4u          /* queries checked for accuracy */
/* Default cache length. The demo encodes the compressed tokens twice (in
 * the cache, and through the stateless calls for the decoded reference);
 * with the plain reference CPU kernels 512 tokens keep the whole run well
 * under a minute on 2 cores (the 2-bit value encoder, a 4096x4096 Linear
 * per token, dominates). --tokens 2048 takes a few minutes there. */
#define DEMO_DEFAULT_TOKENS 512u
/* err-dec above this is not float rounding (~1e-6 here) but a bug: the
 * demo then says so and exits with status 1. */
#define DEMO_MAX_ERR_DECODED 1e-4
/* Attend calls timed for the step time: at least DEMO_STEP_MIN_REPS, then
 * until DEMO_STEP_SECONDS have passed or DEMO_STEP_REPS calls were made. */
#define DEMO_STEP_REPS 20
#define DEMO_STEP_MIN_REPS 3
#define DEMO_STEP_SECONDS 0.5

typedef struct demo_config {
    const char *name;
    uint32_t stages;     /* R */
    uint32_t value_bits; /* Nc, one value group of all 8 heads */
} demo_config;

static const demo_config demo_configs[] = {
    {"1-bit", 11, 1024},
    {"2-bit", 21, 2048},
};
#define DEMO_N_CONFIGS (sizeof demo_configs / sizeof demo_configs[0])

/* ---- synthetic data ------------------------------------------------------- */

/* splitmix64: a small seeded generator, the same on every platform. */
static uint64_t demo_next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Standard normal by Box-Muller from two uniforms in (0, 1]. */
static double demo_gauss(uint64_t *s) {
    double u1 = ((double)(demo_next(s) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
    double u2 = (double)(demo_next(s) >> 11) * (1.0 / 9007199254740992.0);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* x[n][heads][d]: N(0,1) per element; in each head a few outlier channels
 * (as real keys have) get scale `outlier` and a mean offset `offset`. The
 * outliers sit on both halves of two RoPE pairs (rotate_half layout). */
static void demo_fill(float *x, size_t n, uint32_t heads, uint64_t seed, double outlier,
                      double offset) {
    static const uint32_t outlier_ch[4] = {10, 10 + DEMO_P, 45, 45 + DEMO_P};
    uint64_t s = seed;
    size_t t;
    uint32_t h, c, k;
    for (t = 0; t < n; t++) {
        for (h = 0; h < heads; h++) {
            float *v = x + (t * heads + h) * DEMO_D;
            for (c = 0; c < DEMO_D; c++) v[c] = (float)demo_gauss(&s);
            for (k = 0; k < 4; k++) {
                c = outlier_ch[k];
                v[c] = (float)(v[c] * outlier + offset);
            }
        }
    }
}

/* ---- double-precision reference attention --------------------------------- */

/* cos/sin of theta_p * n in double, n = 0..n_pos-1: tables [n][P]. */
static int demo_rope_tables(const double *theta, uint32_t n_pos, double **cs, double **sn) {
    size_t n, p;
    *cs = (double *)malloc((size_t)n_pos * DEMO_P * sizeof(double));
    *sn = (double *)malloc((size_t)n_pos * DEMO_P * sizeof(double));
    if (*cs == NULL || *sn == NULL) return -1;
    for (n = 0; n < n_pos; n++) {
        for (p = 0; p < DEMO_P; p++) {
            double a = theta[p] * (double)n;
            (*cs)[n * DEMO_P + p] = cos(a);
            (*sn)[n * DEMO_P + p] = sin(a);
        }
    }
    return 0;
}

/* Rotates one head vector (rotate_half: pair p = (x[p], x[p+P])) at
 * position n into out (double). */
static void demo_rope(const float *x, const double *cs, const double *sn, uint32_t n,
                      double *out) {
    uint32_t p;
    for (p = 0; p < DEMO_P; p++) {
        double c = cs[(size_t)n * DEMO_P + p], s = sn[(size_t)n * DEMO_P + p];
        double re = x[p], im = x[p + DEMO_P];
        out[p] = re * c - im * s;
        out[p + DEMO_P] = re * s + im * c;
    }
}

/* out[q][h][d] (double) = softmax_t(lambda * RoPE_qp(q) . RoPE_t(k_t)) v_t
 * over tokens t <= qpos[q] of keys/values [T][Hkv][d], query head h reading
 * KV head h*Hkv/Hq. rk: scratch [T][Hkv][d] for the rotated keys. */
static int demo_ref_attention(const float *keys, const float *values, uint32_t T,
                              const float *queries, const int32_t *qpos, uint32_t n_q,
                              double lambda, const double *cs, const double *sn,
                              double *out) {
    double *rk = (double *)malloc((size_t)T * DEMO_HKV * DEMO_D * sizeof(double));
    double *logit = (double *)malloc((size_t)T * sizeof(double));
    double qr[DEMO_D];
    uint32_t t, h, q, j;
    if (rk == NULL || logit == NULL) {
        free(rk);
        free(logit);
        return -1;
    }
    for (t = 0; t < T; t++)
        for (h = 0; h < DEMO_HKV; h++)
            demo_rope(keys + ((size_t)t * DEMO_HKV + h) * DEMO_D, cs, sn, t,
                      rk + ((size_t)t * DEMO_HKV + h) * DEMO_D);
    for (q = 0; q < n_q; q++) {
        uint32_t seen = (uint32_t)qpos[q] + 1 < T ? (uint32_t)qpos[q] + 1 : T;
        for (h = 0; h < DEMO_HQ; h++) {
            uint32_t kv = h * DEMO_HKV / DEMO_HQ;
            double mx = -INFINITY, sum = 0.0;
            double *o = out + ((size_t)q * DEMO_HQ + h) * DEMO_D;
            demo_rope(queries + ((size_t)q * DEMO_HQ + h) * DEMO_D, cs, sn,
                      (uint32_t)qpos[q], qr);
            for (t = 0; t < seen; t++) {
                const double *k = rk + ((size_t)t * DEMO_HKV + kv) * DEMO_D;
                double dot = 0.0;
                for (j = 0; j < DEMO_D; j++) dot += qr[j] * k[j];
                logit[t] = lambda * dot;
                if (logit[t] > mx) mx = logit[t];
            }
            for (j = 0; j < DEMO_D; j++) o[j] = 0.0;
            for (t = 0; t < seen; t++) {
                const float *v = values + ((size_t)t * DEMO_HKV + kv) * DEMO_D;
                double a = exp(logit[t] - mx);
                sum += a;
                for (j = 0; j < DEMO_D; j++) o[j] += a * v[j];
            }
            for (j = 0; j < DEMO_D && seen > 0; j++) o[j] /= sum;
        }
    }
    free(rk);
    free(logit);
    return 0;
}

/* ||a - ref|| / ||ref|| over n elements. */
static double demo_rel_err(const float *a, const double *ref, size_t n) {
    double num = 0.0, den = 0.0;
    size_t i;
    for (i = 0; i < n; i++) {
        double e = (double)a[i] - ref[i];
        num += e * e;
        den += ref[i] * ref[i];
    }
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

static double demo_now(void) {
    struct timespec ts;
    if (timespec_get(&ts, TIME_UTC) != TIME_UTC) return 0.0;
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- one backend, one codebook ------------------------------------------ */

typedef struct demo_inputs {
    uint32_t T;
    const float *keys, *values;     /* [T][Hkv][d] */
    const float *queries;           /* [DEMO_NQ][Hq][d] */
    const int32_t *qpos;            /* [DEMO_NQ] */
    uint32_t n_q;
    const double *cs, *sn;          /* RoPE tables in double, [T][P] */
    const double *ref16;            /* FP16 attention [n_q][Hq][d] */
} demo_inputs;

typedef struct demo_result {
    double err_decoded, err_fp16;
    double attend_ms, encode_ms_per_token;
    uint64_t n_compressed, n_window;
    uint64_t cache_bytes;
} demo_result;

static int demo_run(cvq_context *ctx, const cvq_codebook *cb, const demo_inputs *in,
                    double lambda, demo_result *res) {
    const size_t kv_elems = (size_t)in->T * DEMO_HKV * DEMO_D;
    const size_t out_elems = (size_t)in->n_q * DEMO_HQ * DEMO_D;
    cvq_cache_params cp = cvq_cache_default_params();
    cvq_cache *cache = NULL;
    cvq_cache_stats cs;
    cvq_geometry g;
    cvq_record_layout rl;
    cvq_status st;
    int32_t *pos = NULL;
    float *out = NULL, *khat = NULL, *vhat = NULL, *kscale = NULL, *sigma = NULL;
    uint16_t *codes = NULL;
    uint8_t *bits = NULL;
    double *ref = NULL, t0, t1;
    size_t C, t;
    int rep, rc = CLI_FAIL;

    memset(res, 0, sizeof *res);
    st = cvq_codebook_geometry(cb, &g);
    if (st == CVQ_OK) st = cvq_record_layout_of(&g, &rl);
    if (st != CVQ_OK) return cli_lib_fail(st);
    pos = (int32_t *)malloc((size_t)in->T * sizeof *pos);
    out = (float *)malloc(out_elems * sizeof *out);
    khat = (float *)malloc(kv_elems * sizeof *khat);
    vhat = (float *)malloc(kv_elems * sizeof *vhat);
    ref = (double *)malloc(out_elems * sizeof *ref);
    if (!pos || !out || !khat || !vhat || !ref) {
        rc = cli_fail("out of memory");
        goto done;
    }
    for (t = 0; t < in->T; t++) pos[t] = (int32_t)t;

    /* The cache: every token appended (as after a prefill), then timed. */
    cp.window = DEMO_WINDOW;
    cp.sinks = 0;
    st = cvq_cache_create(ctx, cb, &cp, &cache);
    if (st != CVQ_OK) goto lib_fail;
    t0 = demo_now();
    st = cvq_cache_append(cache, in->keys, in->values, CVQ_F32, pos, in->T);
    t1 = demo_now();
    if (st == CVQ_OK) st = cvq_cache_stats_get(cache, &cs);
    if (st != CVQ_OK) goto lib_fail;
    res->n_compressed = cs.n_compressed;
    res->n_window = cs.n_window;
    res->cache_bytes = cs.bytes_compressed + cs.bytes_full;
    res->encode_ms_per_token = cs.n_compressed ? (t1 - t0) * 1e3 / (double)cs.n_compressed : 0.0;

    st = cvq_cache_attend(cache, in->queries, in->qpos, in->n_q, 0, out);
    if (st != CVQ_OK) goto lib_fail;

    /* Decode step: one query at the last position; one warm-up call. */
    {
        float *o1 = (float *)malloc((size_t)DEMO_HQ * DEMO_D * sizeof(float));
        const float *q1 = in->queries + (size_t)(in->n_q - 1) * DEMO_HQ * DEMO_D;
        const int32_t *p1 = &in->qpos[in->n_q - 1];
        if (o1 == NULL) {
            rc = cli_fail("out of memory");
            goto done;
        }
        st = cvq_cache_attend(cache, q1, p1, 1, 0, o1);
        t0 = demo_now();
        t1 = t0;
        rep = 0;
        while (st == CVQ_OK && rep < DEMO_STEP_REPS &&
               (rep < DEMO_STEP_MIN_REPS || t1 - t0 < DEMO_STEP_SECONDS)) {
            st = cvq_cache_attend(cache, q1, p1, 1, 0, o1);
            t1 = demo_now();
            rep++;
        }
        free(o1);
        if (st != CVQ_OK) goto lib_fail;
        res->attend_ms = (t1 - t0) * 1e3 / rep;
    }

    /* The decoded cache: the compressed tokens (0..C-1, no sinks) through
     * the stateless encode and decode calls, the window as given. */
    C = (size_t)cs.n_compressed;
    memcpy(khat, in->keys, kv_elems * sizeof(float));
    memcpy(vhat, in->values, kv_elems * sizeof(float));
    if (C > 0) {
        codes = (uint16_t *)malloc(C * DEMO_HKV * g.key_stages * sizeof *codes);
        kscale = (float *)malloc(C * rl.key_scale_count * sizeof *kscale);
        bits = (uint8_t *)malloc(C * rl.value_bit_bytes);
        sigma = (float *)malloc(C * rl.value_groups * sizeof *sigma);
        if (!codes || !kscale || !bits || !sigma) {
            rc = cli_fail("out of memory");
            goto done;
        }
        st = cvq_encode_keys(ctx, cb, 0, in->keys, CVQ_F32, C, codes, kscale);
        if (st == CVQ_OK) st = cvq_encode_values(ctx, cb, 0, in->values, CVQ_F32, C, bits, sigma);
        if (st == CVQ_OK) st = cvq_decode_keys(ctx, cb, 0, codes, kscale, C, khat);
        if (st == CVQ_OK) st = cvq_decode_values(ctx, cb, 0, bits, sigma, C, vhat);
        if (st != CVQ_OK) goto lib_fail;
    }
    if (demo_ref_attention(khat, vhat, in->T, in->queries, in->qpos, in->n_q, lambda, in->cs,
                           in->sn, ref) != 0) {
        rc = cli_fail("out of memory");
        goto done;
    }
    res->err_decoded = demo_rel_err(out, ref, out_elems);
    res->err_fp16 = demo_rel_err(out, in->ref16, out_elems);
    rc = CLI_OK;
    goto done;
lib_fail:
    rc = cli_lib_fail(st);
done:
    cvq_cache_free(cache);
    free(pos);
    free(out);
    free(khat);
    free(vhat);
    free(ref);
    free(codes);
    free(kscale);
    free(bits);
    free(sigma);
    return rc;
}

/* ---- the command ------------------------------------------------------------ */

enum { DM_BACKEND, DM_SEED, DM_TOKENS, DM_COUNT };

int cmd_demo(const cli_cmd *cmd, int argc, char **argv) {
    static const cvq_backend_kind kinds[] = {CVQ_BACKEND_CPU, CVQ_BACKEND_CUDA,
                                             CVQ_BACKEND_VULKAN};
    cli_opt o[DM_COUNT] = {{"--backend", 1, NULL}, {"--seed", 1, NULL}, {"--tokens", 1, NULL}};
    const char *pos[1];
    size_t n_pos, i, kv_elems;
    uint64_t seed = 1;
    uint32_t T = DEMO_DEFAULT_TOKENS, k, c;
    cvq_backend_kind only = CVQ_BACKEND_AUTO;
    cvq_codebook *cbs[DEMO_N_CONFIGS] = {NULL};
    cvq_record_layout rls[DEMO_N_CONFIGS];
    cvq_geometry g;
    double theta[DEMO_P], lambda;
    float *keys = NULL, *values = NULL, *k16 = NULL, *v16 = NULL, *queries = NULL;
    double *cs = NULL, *sn = NULL, *ref16 = NULL;
    int32_t qpos[DEMO_NQ];
    demo_inputs in;
    cvq_status st;
    int rc, ran = 0, bad = 0;
    double t_start = demo_now();
    const uint32_t fp16_bytes = 2u * DEMO_HKV * DEMO_D * 2u;

    rc = cli_parse(cmd, argc, argv, o, DM_COUNT, pos, 0, &n_pos);
    if (rc != CLI_OK) return rc;
    if ((rc = cli_u64(cmd, "--seed", o[DM_SEED].value, &seed)) ||
        (rc = cli_u32(cmd, "--tokens", o[DM_TOKENS].value, 1, 1u << 20, &T)))
        return rc;
    if (o[DM_BACKEND].value != NULL) {
        if (cvq_backend_from_name(o[DM_BACKEND].value, &only) != CVQ_OK)
            return cli_usage_error(cmd, "--backend: unknown backend '%s'", o[DM_BACKEND].value);
        if (only != CVQ_BACKEND_AUTO) {
            /* asked for one backend: fail at once if it is not there */
            st = cvq_backend_available(only);
            if (st != CVQ_OK) return cli_lib_fail(st);
        }
    }

    /* LLaMA-3.1-8B: RoPE base 500000 with llama3 scaling (factor 8, low 1,
     * high 4, original context 8192). */
    st = cvq_rope_freqs_llama3(DEMO_D, 500000.0, 8.0, 1.0, 4.0, 8192.0, theta);
    if (st != CVQ_OK) return cli_lib_fail(st);
    for (c = 0; c < DEMO_N_CONFIGS; c++) {
        memset(&g, 0, sizeof g);
        g.n_layers = 1;
        g.n_q_heads = DEMO_HQ;
        g.n_kv_heads = DEMO_HKV;
        g.head_dim = DEMO_D;
        g.key_stages = demo_configs[c].stages;
        g.key_scale = CVQ_KEY_SCALE_TOKEN;
        g.pair_layout = CVQ_PAIRS_ROTATE_HALF;
        g.value_bits = demo_configs[c].value_bits;
        st = cvq_geometry_resolve(&g);
        if (st == CVQ_OK) st = cvq_record_layout_of(&g, &rls[c]);
        if (st == CVQ_OK) st = cvq_codebook_random(&g, theta, seed + 100 + c, NULL, &cbs[c]);
        if (st != CVQ_OK) {
            rc = cli_lib_fail(st);
            goto done;
        }
    }
    lambda = 1.0 / sqrt((double)DEMO_D);

    /* Inputs: keys with outlier channels, values with milder ones, queries
     * at the last DEMO_NQ positions (the first of them does not see the
     * last tokens: causality is part of the check). */
    kv_elems = (size_t)T * DEMO_HKV * DEMO_D;
    keys = (float *)malloc(kv_elems * sizeof *keys);
    values = (float *)malloc(kv_elems * sizeof *values);
    k16 = (float *)malloc(kv_elems * sizeof *k16);
    v16 = (float *)malloc(kv_elems * sizeof *v16);
    queries = (float *)malloc((size_t)DEMO_NQ * DEMO_HQ * DEMO_D * sizeof *queries);
    ref16 = (double *)malloc((size_t)DEMO_NQ * DEMO_HQ * DEMO_D * sizeof *ref16);
    if (!keys || !values || !k16 || !v16 || !queries || !ref16 ||
        demo_rope_tables(theta, T, &cs, &sn) != 0) {
        rc = cli_fail("out of memory");
        goto done;
    }
    demo_fill(keys, T, DEMO_HKV, seed * 3 + 1, 6.0, 2.0);
    demo_fill(values, T, DEMO_HKV, seed * 3 + 2, 3.0, 0.0);
    demo_fill(queries, DEMO_NQ, DEMO_HQ, seed * 3 + 3, 1.0, 0.0);
    for (i = 0; i < kv_elems; i++) {
        k16[i] = cvq_f16_to_f32(cvq_f32_to_f16(keys[i]));
        v16[i] = cvq_f16_to_f32(cvq_f32_to_f16(values[i]));
    }
    memset(&in, 0, sizeof in);
    in.n_q = T < DEMO_NQ ? T : DEMO_NQ;
    for (k = 0; k < in.n_q; k++) qpos[k] = (int32_t)(T - in.n_q + k);
    in.T = T;
    in.keys = keys;
    in.values = values;
    in.queries = queries;
    in.qpos = qpos;
    in.cs = cs;
    in.sn = sn;
    in.ref16 = ref16;
    if (demo_ref_attention(k16, v16, T, queries, qpos, in.n_q, lambda, cs, sn, ref16) != 0) {
        rc = cli_fail("out of memory");
        goto done;
    }

    printf("commvq %s demo: one synthetic LLaMA-3.1-8B-like layer (Hq=%u, Hkv=%u, d=%u, "
           "llama3 RoPE)\n",
           cvq_version_string(), DEMO_HQ, DEMO_HKV, DEMO_D);
    printf("%u tokens appended at positions 0..%u (window %u, no sinks), %u queries at "
           "positions %d..%d; seed %llu\n\n",
           (unsigned)T, (unsigned)T - 1, DEMO_WINDOW, (unsigned)in.n_q, (int)qpos[0],
           (int)qpos[in.n_q - 1], (unsigned long long)seed);
    printf("%-7s %-6s %9s %6s %9s %7s %9s %9s %9s %9s %9s\n", "backend", "codes", "bytes/tok",
           "ratio", "bits/elem", "cache", "err-dec", "err-fp16", "attend", "encode",
           "step");
    printf("%-7s %-6s %9s %6s %9s %7s %9s %9s %9s %9s %9s\n", "", "", "(fp16 4096)",
           "", "", "MiB", "", "", "ms", "ms/tok", "ms");

    for (k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
        cvq_context *ctx = NULL;
        cvq_context_params cp = cvq_context_default_params();
        if (only != CVQ_BACKEND_AUTO && only != kinds[k]) continue;
        st = cvq_backend_available(kinds[k]);
        if (st != CVQ_OK) {
            if (only != CVQ_BACKEND_AUTO) {
                rc = cli_lib_fail(st);
                goto done;
            }
            printf("%-7s (not available: %s)\n", cvq_backend_name(kinds[k]),
                   cli_lib_message(st));
            continue;
        }
        cp.backend = kinds[k];
        st = cvq_context_create(&cp, &ctx);
        if (st != CVQ_OK) {
            rc = cli_lib_fail(st);
            goto done;
        }
        for (c = 0; c < DEMO_N_CONFIGS; c++) {
            demo_result r;
            rc = demo_run(ctx, cbs[c], &in, lambda, &r);
            if (rc != CLI_OK) {
                cvq_context_free(ctx);
                goto done;
            }
            printf("%-7s %-6s %9u %5.1fx %9.3f %7.2f %9.2e %9.2e %9.3f %9.3f %9.3f%s\n",
                   cvq_backend_name(kinds[k]), demo_configs[c].name,
                   (unsigned)rls[c].bytes_per_token,
                   (double)fp16_bytes / (double)rls[c].bytes_per_token,
                   rls[c].bits_per_element, (double)r.cache_bytes / 1048576.0, r.err_decoded,
                   r.err_fp16, r.attend_ms, r.encode_ms_per_token,
                   r.attend_ms + r.encode_ms_per_token,
                   r.err_decoded > DEMO_MAX_ERR_DECODED ? "  <- TOO LARGE" : "");
            fflush(stdout);
            if (!(r.err_decoded <= DEMO_MAX_ERR_DECODED)) bad++;
            ran++;
        }
        {
            cvq_device_info di;
            if (cvq_context_device(ctx, &di) == CVQ_OK)
                printf("        (%s device %u: %s)\n", cvq_backend_name(kinds[k]),
                       (unsigned)di.index, di.name);
        }
        cvq_context_free(ctx);
    }
    if (ran == 0) {
        rc = cli_fail("no backend available");
        goto done;
    }

    printf("\nbytes/tok: compressed record of one token of this layer (key codes at 12 bits, "
           "value bits,\n"
           "  fp32 scales) against FP16 K/V = 2*Hkv*d*2 = %u bytes; bits/elem = record bits / "
           "(2*Hkv*d).\n"
           "cache: memory the cache uses for all %u tokens (compressed records + the fp32 "
           "window); FP16\n"
           "  K/V would need %.2f MiB.\n",
           fp16_bytes, (unsigned)T, (double)T * fp16_bytes / 1048576.0);
    printf("err-dec: relative L2 error of the code-domain attention output against attention "
           "computed\n"
           "  in double precision over the explicitly decoded cache (cvq_decode_keys/values, "
           "RoPE,\n"
           "  softmax). At float rounding level (~1e-6) it shows that attending in the code "
           "domain\n"
           "  computes exactly the attention of the compressed cache, without decoding it "
           "(above %g\n"
           "  the row is marked and the demo exits with status 1).\n",
           DEMO_MAX_ERR_DECODED);
    printf("err-fp16: relative L2 error against attention over the original keys and values "
           "in FP16.\n"
           "  THESE ARE RANDOM CODEBOOKS: a random codebook does not preserve keys and values, "
           "so this\n"
           "  error is large and says nothing about the method's quality. Quality needs a "
           "codebook\n"
           "  trained on the model's keys and values.\n");
    printf("attend: one decode-step query (all %u heads) over the cache; encode: cache append "
           "time per\n"
           "  compressed token (keys and values); step = attend + encode.\n",
           DEMO_HQ);
    printf("\ndemo took %.1f s\n", demo_now() - t_start);
    rc = CLI_OK;
    if (bad > 0)
        rc = cli_fail("%d result(s) differ from attention over the decoded cache by more "
                      "than %g: the code-domain path is wrong there",
                      bad, DEMO_MAX_ERR_DECODED);
done:
    for (c = 0; c < DEMO_N_CONFIGS; c++) cvq_codebook_free(cbs[c]);
    free(keys);
    free(values);
    free(k16);
    free(v16);
    free(queries);
    free(ref16);
    free(cs);
    free(sn);
    return rc;
}
