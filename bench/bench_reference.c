/*
 * bench_reference: throughput of the CPU backend's default path (the fast
 * kernels of backends/cpu, all threads) on one LLaMA-3.1-8B layer (Hq=32, Hkv=8,
 * d=128) at 1 bit (R=11, Nc=1024) and 2 bits (R=21, Nc=2048), with random
 * codebooks. Prints one table; every ratio is measured in this run against
 * the single-thread reference (cpu_reference = 1).
 *
 *   bench_reference [--tokens N] [--context T] [--seed S]
 *
 * Not a test: nothing is asserted. The full suite (per instruction set,
 * brute force, dense FP16 baselines, long contexts, bytes per token) is
 * bench_encode, bench_attention and bench_bytes.
 */
#define _POSIX_C_SOURCE 200809L
#include "bench_util.h"
#include "commvq.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t rs;

#define CHECK(x)                                                                         \
    do {                                                                                 \
        cvq_status st_ = (x);                                                            \
        if (st_) {                                                                       \
            fprintf(stderr, "bench: %s: %s\n", cvq_status_name(st_), cvq_last_error()); \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

int main(int argc, char **argv) {
    size_t n_tok = 256, ctx_len = 4096;
    uint64_t seed = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--tokens")) n_tok = (size_t)atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--context")) ctx_len = (size_t)atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--seed")) seed = (uint64_t)atoll(argv[i + 1]);
        else { fprintf(stderr, "usage: bench_reference [--tokens N] [--context T] [--seed S]\n"); return 2; }
    }
    const uint32_t Hq = 32, Hkv = 8, d = 128, kvd = Hkv * d;
    const size_t nmax = n_tok > ctx_len ? n_tok : ctx_len;
    float *k = malloc(nmax * kvd * sizeof(float)), *v = malloc(nmax * kvd * sizeof(float));
    float *q = malloc((size_t)Hq * d * sizeof(float)), *out = malloc((size_t)Hq * d * sizeof(float));
    int32_t *pos = malloc(nmax * sizeof(int32_t));
    rs = seed;
    for (size_t i = 0; i < nmax * kvd; i++) { k[i] = bench_rnd(&rs); v[i] = bench_rnd(&rs); }
    for (size_t i = 0; i < (size_t)Hq * d; i++) q[i] = bench_rnd(&rs);
    for (size_t i = 0; i < nmax; i++) pos[i] = (int32_t)i;
    double theta[64];
    CHECK(cvq_rope_freqs_default(d, 500000.0, theta));

    printf("bench_reference: one LLaMA-3.1-8B layer (Hq=32 Hkv=8 d=128), random codebooks, seed %llu\n",
           (unsigned long long)seed);
    printf("%-8s %-22s %14s %14s %10s\n", "setting", "measure", "ref 1 thread", "cpu backend", "ratio");
    const struct { const char *name; uint32_t R, Nc; } set[] = {{"1-bit", 11, 1024}, {"2-bit", 21, 2048}};
    for (int s = 0; s < 2; s++) {
        cvq_geometry g;
        memset(&g, 0, sizeof g);
        g.n_layers = 1; g.n_q_heads = Hq; g.n_kv_heads = Hkv; g.head_dim = d;
        g.key_stages = set[s].R; g.value_bits = set[s].Nc;
        CHECK(cvq_geometry_resolve(&g));
        cvq_codebook *cb;
        CHECK(cvq_codebook_random(&g, theta, seed, NULL, &cb));
        double r_key[2], r_val[2];
        for (int mode = 0; mode < 2; mode++) {
            cvq_context_params p = cvq_context_default_params();
            p.backend = CVQ_BACKEND_CPU;
            p.cpu_reference = mode == 0;
            cvq_context *ctx;
            CHECK(cvq_context_create(&p, &ctx));
            uint16_t *codes = malloc(n_tok * Hkv * set[s].R * sizeof(uint16_t));
            float *sc = malloc(n_tok * Hkv * sizeof(float));
            uint8_t *bits = malloc(n_tok * set[s].Nc);
            double t0 = bench_now();
            CHECK(cvq_encode_keys(ctx, cb, 0, k, CVQ_F32, n_tok, codes, sc));
            r_key[mode] = (double)n_tok / (bench_now() - t0);
            t0 = bench_now();
            CHECK(cvq_encode_values(ctx, cb, 0, v, CVQ_F32, n_tok, bits, sc));
            r_val[mode] = (double)n_tok / (bench_now() - t0);
            free(codes);
            free(sc);
            free(bits);
            cvq_context_free(ctx);
        }
        printf("%-8s %-22s %14.1f %14.1f %9.2fx\n", set[s].name, "key encode tok/s", r_key[0], r_key[1], r_key[1] / r_key[0]);
        printf("%-8s %-22s %14.1f %14.1f %9.2fx\n", set[s].name, "value encode tok/s", r_val[0], r_val[1], r_val[1] / r_val[0]);
        /* attention over a cache of ctx_len tokens (window 128) against a
         * plain dense fp32 attention over the same K/V (keys pre-rotated),
         * both single-threaded loops, as a ratio measured here. */
        cvq_context_params pf = cvq_context_default_params();
        pf.backend = CVQ_BACKEND_CPU;
        cvq_context *fast;
        CHECK(cvq_context_create(&pf, &fast));
        cvq_cache *c;
        CHECK(cvq_cache_create(fast, cb, NULL, &c));
        CHECK(cvq_cache_append(c, k, v, CVQ_F32, pos, ctx_len));
        int32_t qp = (int32_t)ctx_len;
        const int reps = 3;
        double t0 = bench_now();
        for (int r = 0; r < reps; r++) CHECK(cvq_cache_attend(c, q, &qp, 1, 0, out));
        const double ms_cvq = (bench_now() - t0) / reps * 1e3;
        float *logit = malloc(ctx_len * sizeof(float));
        t0 = bench_now();
        for (int r = 0; r < reps; r++)
            for (uint32_t h = 0; h < Hq; h++) {
                const uint32_t kv = h * Hkv / Hq;
                float mx = -INFINITY, sum = 0.0f;
                for (size_t t = 0; t < ctx_len; t++) {
                    const float *kt = k + t * kvd + (size_t)kv * d;
                    float acc = 0.0f;
                    for (uint32_t i = 0; i < d; i++) acc += q[h * d + i] * kt[i];
                    logit[t] = acc * 0.08838835f;
                    if (logit[t] > mx) mx = logit[t];
                }
                for (size_t t = 0; t < ctx_len; t++) { logit[t] = expf(logit[t] - mx); sum += logit[t]; }
                float *o = out + (size_t)h * d;
                memset(o, 0, d * sizeof(float));
                for (size_t t = 0; t < ctx_len; t++) {
                    const float *vt = v + t * kvd + (size_t)kv * d;
                    const float a = logit[t] / sum;
                    for (uint32_t i = 0; i < d; i++) o[i] += a * vt[i];
                }
            }
        const double ms_dense = (bench_now() - t0) / reps * 1e3;
        free(logit);
        cvq_cache_free(c);
        cvq_context_free(fast);
        printf("%-8s attend ms/step T=%-6zu %14.2f %14.2f %9.2fx  (columns: dense fp32 loop, commvq cpu backend; ratio = commvq/dense)\n",
               set[s].name, ctx_len, ms_dense, ms_cvq, ms_cvq / ms_dense);
        cvq_codebook_free(cb);
    }
    free(k); free(v); free(q); free(out); free(pos);
    return 0;
}
