/*
 * bench_backends: the same LLaMA-3.1-8B layer (Hq=32, Hkv=8, d=128; 1 bit:
 * R=11, Nc=1024) on every backend and device this build can open --
 * including software Vulkan devices such as lavapipe, which `auto` never
 * picks -- with the CPU reference (one thread) as the baseline measured in
 * the same run. Prints one table:
 *   encode keys / values: ms per token over --tokens tokens;
 *   attend: ms per decode step (one query, all heads) over a cache of
 *   --context tokens (window 128), built on that backend.
 *
 *   bench_backends [--tokens N] [--context T] [--seed S]
 *
 * Random codebooks, synthetic inputs; not a test (nothing is asserted).
 */
#define _POSIX_C_SOURCE 200809L
#include "bench_util.h"
#include "commvq.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t rs;

typedef struct {
    const char *label;
    cvq_context_params p;
} target;

/* Runs the three measurements on one context; returns 0 on success. */
static int measure(cvq_context *ctx, const cvq_codebook *cb, const float *k, const float *v,
                   const int32_t *pos, const float *q, size_t n_tok, size_t ctx_len, double r[3]) {
    const size_t H = 8, R = 11, Nc = 1024;
    uint16_t *codes = malloc(n_tok * H * R * sizeof(uint16_t));
    float *sc = malloc(n_tok * H * sizeof(float)), *out = malloc(32 * 128 * sizeof(float));
    uint8_t *bits = malloc(n_tok * Nc / 8);
    cvq_cache *c = NULL;
    cvq_status st;
    /* warm-up: pipelines and uploaded tables are built on first use */
    st = cvq_encode_keys(ctx, cb, 0, k, CVQ_F32, 1, codes, sc);
    if (!st) st = cvq_encode_values(ctx, cb, 0, v, CVQ_F32, 1, bits, sc);
    double t0 = bench_now();
    if (!st) st = cvq_encode_keys(ctx, cb, 0, k, CVQ_F32, n_tok, codes, sc);
    r[0] = (bench_now() - t0) * 1e3 / (double)n_tok;
    if (!st) {
        t0 = bench_now();
        st = cvq_encode_values(ctx, cb, 0, v, CVQ_F32, n_tok, bits, sc);
        r[1] = (bench_now() - t0) * 1e3 / (double)n_tok;
    }
    if (!st) st = cvq_cache_create(ctx, cb, NULL, &c);
    if (!st) st = cvq_cache_append(c, k, v, CVQ_F32, pos, ctx_len);
    int32_t qp = (int32_t)ctx_len;
    if (!st) st = cvq_cache_attend(c, q, &qp, 1, 0, out); /* warm-up: pipelines, tables */
    if (!st) {
        const int reps = 3;
        t0 = bench_now();
        for (int i = 0; i < reps && !st; i++) st = cvq_cache_attend(c, q, &qp, 1, 0, out);
        r[2] = (bench_now() - t0) * 1e3 / reps;
    }
    if (st) fprintf(stderr, "bench: %s: %s\n", cvq_status_name(st), cvq_last_error());
    cvq_cache_free(c);
    free(codes); free(sc); free(out); free(bits);
    return st != CVQ_OK;
}

int main(int argc, char **argv) {
    size_t n_tok = 64, ctx_len = 1024;
    uint64_t seed = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--tokens")) n_tok = (size_t)atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--context")) ctx_len = (size_t)atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--seed")) seed = (uint64_t)atoll(argv[i + 1]);
        else { fprintf(stderr, "usage: bench_backends [--tokens N] [--context T] [--seed S]\n"); return 2; }
    }
    if (n_tok == 0 || ctx_len == 0) { fprintf(stderr, "bench_backends: sizes must be > 0\n"); return 2; }
    const size_t kvd = 8 * 128, nmax = n_tok > ctx_len ? n_tok : ctx_len;
    float *k = malloc(nmax * kvd * sizeof(float)), *v = malloc(nmax * kvd * sizeof(float));
    float *q = malloc(32 * 128 * sizeof(float));
    int32_t *pos = malloc(nmax * sizeof(int32_t));
    rs = seed;
    for (size_t i = 0; i < nmax * kvd; i++) { k[i] = bench_rnd(&rs); v[i] = bench_rnd(&rs); }
    for (size_t i = 0; i < 32 * 128; i++) q[i] = bench_rnd(&rs);
    for (size_t i = 0; i < nmax; i++) pos[i] = (int32_t)i;

    cvq_geometry g;
    memset(&g, 0, sizeof g);
    g.n_layers = 1; g.n_q_heads = 32; g.n_kv_heads = 8; g.head_dim = 128;
    g.key_stages = 11; g.value_bits = 1024;
    double theta[64];
    cvq_codebook *cb = NULL;
    if (cvq_geometry_resolve(&g) || cvq_rope_freqs_default(128, 500000.0, theta) ||
        cvq_codebook_random(&g, theta, seed, NULL, &cb)) {
        fprintf(stderr, "bench_backends: %s\n", cvq_last_error());
        return 1;
    }

    /* Targets: the CPU reference (baseline), the CPU backend, then every
     * device of every other backend. */
    target t[34];
    size_t nt = 0;
    char labels[34][96];
    t[nt].p = cvq_context_default_params();
    t[nt].p.backend = CVQ_BACKEND_CPU;
    t[nt].p.cpu_reference = 1;
    t[nt++].label = "cpu reference, 1 thread";
    t[nt].p = cvq_context_default_params();
    t[nt].p.backend = CVQ_BACKEND_CPU;
    t[nt++].label = "cpu backend";
    cvq_device_info devs[32];
    size_t nd = 0;
    if (cvq_list_devices(devs, 32, &nd) == CVQ_OK)
        for (size_t i = 0; i < nd && i < 32 && nt < 34; i++) {
            if (devs[i].backend == CVQ_BACKEND_CPU || !devs[i].usable) continue;
            t[nt].p = cvq_context_default_params();
            t[nt].p.backend = devs[i].backend;
            t[nt].p.device = (int)devs[i].index;
            snprintf(labels[nt], sizeof labels[nt], "%s:%u %.60s", cvq_backend_name(devs[i].backend),
                     devs[i].index, devs[i].name);
            t[nt].label = labels[nt];
            nt++;
        }

    printf("bench_backends: LLaMA-3.1-8B layer, 1 bit (R=11, Nc=1024), %zu tokens encoded, attend over %zu "
           "(window 128), seed %llu\n", n_tok, ctx_len, (unsigned long long)seed);
    printf("%-40s %12s %12s %14s   %s\n", "target", "keys ms/tok", "values ms/tok", "attend ms/step",
           "speed-up vs the reference (keys, values, attend)");
    double base[3] = {0, 0, 0};
    for (size_t i = 0; i < nt; i++) {
        cvq_context *ctx = NULL;
        double r[3] = {0, 0, 0};
        if (cvq_context_create(&t[i].p, &ctx) || measure(ctx, cb, k, v, pos, q, n_tok, ctx_len, r)) {
            printf("%-40s (failed: %s)\n", t[i].label, cvq_last_error());
            cvq_context_free(ctx);
            continue;
        }
        if (i == 0) memcpy(base, r, sizeof base);
        printf("%-40s %12.3f %12.3f %14.2f   %.2fx %.2fx %.2fx\n", t[i].label, r[0], r[1], r[2],
               base[0] / r[0], base[1] / r[1], base[2] / r[2]);
        cvq_context_free(ctx);
    }
    cvq_codebook_free(cb);
    free(k); free(v); free(q); free(pos);
    return 0;
}
