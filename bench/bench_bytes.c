/*
 * bench_bytes: bytes stored per token for one LLaMA-3.1-8B layer (Hkv=8,
 * d=128: 1024 key and 1024 value dims per token) in each setting: dense
 * FP32, FP16 and the CommVQ records (docs/format.md: 12-bit key codes, key
 * scale(s), value bits, value sigma per group; positions are not counted)
 * for 1 bit (R=11, Nc=1024) and 2 bits (R=21, Nc=2048), in token and head
 * key-scale modes. Computed from cvq_record_layout_of, then checked against
 * a cache holding a few compressed tokens (cvq_cache_stats_get).
 *
 *   bench_bytes
 *
 * Not a test: nothing is asserted.
 */
#define _POSIX_C_SOURCE 200809L
#include "bench_util.h"
#include "commvq.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(x)                                                                         \
    do {                                                                                 \
        cvq_status st_ = (x);                                                            \
        if (st_) {                                                                       \
            fprintf(stderr, "bench: %s: %s\n", cvq_status_name(st_), cvq_last_error()); \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

int main(void) {
    const uint32_t Hq = 32, Hkv = 8, d = 128, kvd = Hkv * d;
    const double fp16 = 2.0 * kvd * 2.0;
    printf("bench_bytes: bytes per token of one LLaMA-3.1-8B layer (Hkv=8 d=128)\n");
    printf("%-30s %10s %10s %12s %14s\n", "setting", "bytes", "bits/elem", "x fewer vs", "cache measured");
    printf("%-30s %10s %10s %12s %14s\n", "", "", "", "FP16", "");
    printf("%-30s %10.0f %10.2f %11.2fx %14s\n", "dense FP32 K+V", 2.0 * kvd * 4.0, 32.0, 0.5, "-");
    printf("%-30s %10.0f %10.2f %11.2fx %14s\n", "dense FP16 K+V", fp16, 16.0, 1.0, "-");
    double theta[64];
    CHECK(cvq_rope_freqs_default(d, 500000.0, theta));
    const struct { const char *name; uint32_t R, Nc; cvq_key_scale_mode sc; } set[] = {
        {"CommVQ-1 (R=11 Nc=1024 token)", 11, 1024, CVQ_KEY_SCALE_TOKEN},
        {"CommVQ-1 (R=11 Nc=1024 head)", 11, 1024, CVQ_KEY_SCALE_HEAD},
        {"CommVQ-2 (R=21 Nc=2048 token)", 21, 2048, CVQ_KEY_SCALE_TOKEN},
        {"CommVQ-2 (R=21 Nc=2048 head)", 21, 2048, CVQ_KEY_SCALE_HEAD}};
    const size_t n = 64;
    float *kv = malloc(n * kvd * sizeof(float));
    int32_t pos[64];
    uint64_t rs = 3;
    for (size_t i = 0; i < n * kvd; i++) kv[i] = bench_rnd(&rs);
    for (size_t i = 0; i < n; i++) pos[i] = (int32_t)i;
    cvq_context_params pp = cvq_context_default_params();
    pp.backend = CVQ_BACKEND_CPU;
    cvq_context *ctx;
    CHECK(cvq_context_create(&pp, &ctx));
    for (size_t s = 0; s < sizeof set / sizeof set[0]; s++) {
        cvq_geometry g;
        memset(&g, 0, sizeof g);
        g.n_layers = 1; g.n_q_heads = Hq; g.n_kv_heads = Hkv; g.head_dim = d;
        g.key_stages = set[s].R; g.value_bits = set[s].Nc; g.key_scale = set[s].sc;
        CHECK(cvq_geometry_resolve(&g));
        cvq_record_layout rl;
        CHECK(cvq_record_layout_of(&g, &rl));
        /* a cache with window 0 compresses every token: bytes_compressed / n */
        cvq_codebook *cb;
        CHECK(cvq_codebook_random(&g, theta, 1, NULL, &cb));
        cvq_cache_params cp = cvq_cache_default_params();
        cp.window = 0;
        cvq_cache *c;
        CHECK(cvq_cache_create(ctx, cb, &cp, &c));
        CHECK(cvq_cache_append(c, kv, kv, CVQ_F32, pos, n));
        cvq_cache_stats st;
        CHECK(cvq_cache_stats_get(c, &st));
        char meas[32];
        snprintf(meas, sizeof meas, "%.1f", (double)st.bytes_compressed / (double)st.n_compressed);
        printf("%-30s %10u %10.3f %11.2fx %14s\n", set[s].name, rl.bytes_per_token, rl.bits_per_element,
               fp16 / rl.bytes_per_token, meas);
        cvq_cache_free(c);
        cvq_codebook_free(cb);
    }
    cvq_context_free(ctx);
    free(kv);
    return 0;
}
