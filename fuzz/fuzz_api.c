/*
 * Fuzz harness: a sequence of public API calls driven by the fuzzer's bytes.
 *
 * Byte layout (everything optional; missing bytes read as 0):
 *   [0] geometry from a small table (head dims, GQA ratios, stages, scale
 *       modes, pair layouts, value groups), [1..2] codebook seed (mod 8),
 *   [3] context: bit 0 = CPU reference kernels, bit 1 = two threads,
 *   [4] cache window (0..8), [5] sinks (0..3),
 *   then operations until the bytes run out:
 *     append (n 0..5 tokens, dtype, positions from deltas that may be 0 or
 *     negative, inputs with NaN/Inf/subnormal/huge/-0 sprinkled in),
 *     attend (1..3 queries, positions, rotated flag), direct encodes,
 *     clear, stats, copy (cvq_cache_copy; the run goes on with the copy).
 * Invariants checked after every call: the status is a documented one (no
 * 9xx); a refused append leaves the cache's stats unchanged; an accepted one
 * adds exactly n tokens; attention output is finite; a copy has the
 * original's stats and gives bit-identical attention; nothing crashes or
 * trips a sanitizer (the original is freed after a copy, so a copy that
 * kept pointers into it is a use-after-free).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"

typedef struct geo_case {
    uint32_t hq, hkv, d, r;
    cvq_key_scale_mode ks;
    cvq_pair_layout pl;
    uint32_t f_heads, nc, hidden;
} geo_case;

static const geo_case k_geos[] = {
    {1, 1, 64, 1, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_ROTATE_HALF, 1, 8, 8},
    {4, 2, 64, 2, CVQ_KEY_SCALE_HEAD, CVQ_PAIRS_INTERLEAVED, 1, 16, 16},
    {3, 1, 80, 3, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_INTERLEAVED, 1, 8, 16},
    {6, 3, 64, 2, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_ROTATE_HALF, 3, 16, 8},
    {2, 2, 96, 1, CVQ_KEY_SCALE_HEAD, CVQ_PAIRS_ROTATE_HALF, 2, 8, 8},
    {4, 1, 128, 4, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_ROTATE_HALF, 1, 24, 12},
};
#define N_GEOS (sizeof k_geos / sizeof k_geos[0])
#define MAX_N 5
#define MAX_Q 3
#define N_SEEDS 8

static float special(fuzz_bytes *b) {
    unsigned c = fuzz_u8(b);
    switch (c % 32) {
    case 0: return NAN;
    case 1: return INFINITY;
    case 2: return -1e-40f;          /* subnormal */
    case 3: return 3e38f;            /* squares overflow */
    case 4: return -0.0f;
    case 5: return 1e-30f;           /* squares underflow */
    default: return ((float)c - 128.0f) / 32.0f;
    }
}

/* n tokens of [Hkv][d] in dtype; the first few elements come from the
 * bytes, the rest from a cheap deterministic pattern (so a short input still
 * gives full tensors). */
static __attribute__((noinline)) void fill(fuzz_bytes *b, cvq_dtype dt, size_t count,
                                           void *out) {
    for (size_t i = 0; i < count; i++) {
        float v = (i < 8) ? special(b) : (float)((i * 40503u) % 2001u) / 1000.0f - 1.0f;
        if (dt == CVQ_F32)
            ((float *)out)[i] = v;
        else if (dt == CVQ_F16)
            ((uint16_t *)out)[i] = (i < 2) ? (uint16_t)fuzz_u16(b) : cvq_f32_to_f16(v);
        else {
            uint32_t u;
            memcpy(&u, &v, 4);
            ((uint16_t *)out)[i] = (i < 2) ? (uint16_t)fuzz_u16(b) : (uint16_t)(u >> 16);
        }
    }
}

/* 1 if x[0..n) are all finite. fill() and this are out of line and out of
 * coverage (fuzz/coverage-ignore.txt): their per-element loops were most of
 * an execution's instrumented comparisons. */
static __attribute__((noinline)) int all_finite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

static void stats(cvq_cache *c, cvq_cache_stats *s) {
    FUZZ_CHECK(cvq_cache_stats_get(c, s) == CVQ_OK, "stats of a live cache");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_bytes b = {data, size};
    const geo_case *gc = &k_geos[fuzz_u8(&b) % N_GEOS];
    cvq_geometry g;
    memset(&g, 0, sizeof g);
    g.n_layers = 1;
    g.n_q_heads = gc->hq;
    g.n_kv_heads = gc->hkv;
    g.head_dim = gc->d;
    g.key_stages = gc->r;
    g.key_scale = gc->ks;
    g.pair_layout = gc->pl;
    g.value_group_width = gc->f_heads * gc->d;
    g.value_bits = gc->nc;
    g.value_hidden = gc->hidden;
    double theta[128];
    FUZZ_CHECK(cvq_rope_freqs_default(g.head_dim, 10000.0, theta) == CVQ_OK, "rope table");
    /* The codebook comes from a small process-wide set (geometry x 8 seeds),
     * built on first use and never freed: building one (commit's 256 x 256
     * G tables per stage) cost most of an execution, and the inputs are
     * about the calls, not the codebook's numbers. Sharing one read-only
     * codebook across inputs is allowed (docs/threading.md) and also checks
     * that no call changes it: a call that did would make later inputs see
     * a different codebook and a crash would not replay alone. */
    unsigned seed = fuzz_u16(&b) % N_SEEDS;
    static cvq_codebook *k_cbs[N_GEOS][N_SEEDS];
    cvq_codebook **slot = &k_cbs[gc - k_geos][seed];
    if (!*slot)
        FUZZ_CHECK(cvq_codebook_random(&g, theta, seed, NULL, slot) == CVQ_OK, "random codebook");
    cvq_codebook *cb = *slot;
    FUZZ_CHECK(cvq_geometry_resolve(&g) == CVQ_OK, "geometry");

    unsigned cflags = fuzz_u8(&b);
    cvq_context_params cp = cvq_context_default_params();
    cp.backend = CVQ_BACKEND_CPU;
    cp.cpu_reference = (int)(cflags & 1u);
    cp.n_threads = (cflags & 2u) ? 2 : 1;
    cvq_context *ctx = NULL;
    FUZZ_CHECK(cvq_context_create(&cp, &ctx) == CVQ_OK, "CPU context");

    cvq_cache_params pp = cvq_cache_default_params();
    pp.window = fuzz_u8(&b) % 9;
    pp.sinks = fuzz_u8(&b) % 4;
    cvq_cache *cache = NULL;
    FUZZ_CHECK(cvq_cache_create(ctx, cb, &pp, &cache) == CVQ_OK, "cache");

    cvq_record_layout rl;
    FUZZ_CHECK(cvq_record_layout_of(&g, &rl) == CVQ_OK, "record layout");
    size_t tok = (size_t)g.n_kv_heads * g.head_dim;
    size_t qsz = (size_t)g.n_q_heads * g.head_dim;
    float *kbuf = malloc(MAX_N * tok * sizeof(float));
    float *vbuf = malloc(MAX_N * tok * sizeof(float));
    float *q = malloc(MAX_Q * qsz * sizeof(float));
    float *out = malloc(MAX_Q * qsz * sizeof(float));
    uint16_t *codes = malloc(MAX_N * (size_t)g.n_kv_heads * g.key_stages * sizeof(uint16_t));
    float *scales = malloc(MAX_N * (size_t)g.n_kv_heads * sizeof(float));
    uint8_t *bits = malloc(MAX_N * (size_t)rl.value_bit_bytes);
    float *sigma = malloc(MAX_N * (size_t)rl.value_groups * sizeof(float));
    FUZZ_CHECK(kbuf && vbuf && q && out && codes && scales && bits && sigma, "harness memory");

    int32_t next_pos = 0, committed = 0; /* next position to use; after the last accepted */
    for (int steps = 0; b.n > 0 && steps < 64; steps++) {
        unsigned op = fuzz_u8(&b) % 7;
        if (op == 0 || op == 1) { /* append (op 1: with a position glitch) */
            size_t n = fuzz_u8(&b) % (MAX_N + 1);
            cvq_dtype dt = (cvq_dtype)(fuzz_u8(&b) % 3);
            int32_t pos[MAX_N];
            for (size_t i = 0; i < n; i++) {
                int32_t delta = 1 + (int32_t)(fuzz_u8(&b) % 4);
                if (op == 1 && i == n / 2) delta = -(int32_t)(fuzz_u8(&b) % 3); /* 0 or backwards */
                pos[i] = next_pos + delta - 1;
                next_pos = pos[i] + 1;
            }
            fill(&b, dt, n * tok, kbuf);
            fill(&b, dt, n * tok, vbuf);
            cvq_cache_stats before, after;
            stats(cache, &before);
            cvq_status st = cvq_cache_append(cache, kbuf, vbuf, dt, pos, n);
            FUZZ_CHECK(fuzz_status_is_valid(st), "append status");
            stats(cache, &after);
            if (st == CVQ_OK) {
                FUZZ_CHECK(after.n_tokens == before.n_tokens + n, "append adds n tokens");
                committed = next_pos;
            } else {
                FUZZ_CHECK(after.n_tokens == before.n_tokens &&
                               after.n_compressed == before.n_compressed &&
                               after.n_window == before.n_window,
                           "refused append changes nothing");
                next_pos = committed;
            }
        } else if (op == 2) { /* attend */
            size_t nq = 1 + fuzz_u8(&b) % MAX_Q;
            int32_t qp[MAX_Q];
            for (size_t i = 0; i < nq; i++) qp[i] = (int32_t)fuzz_u16(&b) - 16;
            for (size_t i = 0; i < nq * qsz; i++)
                q[i] = (i < 4) ? special(&b) : (float)((i * 7919u) % 201u) / 100.0f - 1.0f;
            uint32_t flags = (fuzz_u8(&b) & 1u) ? CVQ_ATTEND_QUERIES_ROTATED : 0u;
            cvq_status st = cvq_cache_attend(cache, q, qp, nq, flags, out);
            FUZZ_CHECK(fuzz_status_is_valid(st), "attend status");
            if (st == CVQ_OK)
                FUZZ_CHECK(all_finite(out, nq * qsz), "finite attention");
        } else if (op == 3) { /* direct key encode + decode */
            size_t n = fuzz_u8(&b) % (MAX_N + 1);
            cvq_dtype dt = (cvq_dtype)(fuzz_u8(&b) % 3);
            fill(&b, dt, n * tok, kbuf);
            cvq_status st = cvq_encode_keys(ctx, cb, 0, kbuf, dt, n, codes, scales);
            FUZZ_CHECK(fuzz_status_is_valid(st), "encode keys status");
            if (st == CVQ_OK && n > 0) {
                FUZZ_CHECK(cvq_decode_keys(ctx, cb, 0, codes, scales, n, kbuf) == CVQ_OK, "decode keys");
                FUZZ_CHECK(all_finite(kbuf, n * tok), "finite decoded keys");
            }
        } else if (op == 4) { /* direct value encode + decode */
            size_t n = fuzz_u8(&b) % (MAX_N + 1);
            cvq_dtype dt = (cvq_dtype)(fuzz_u8(&b) % 3);
            fill(&b, dt, n * tok, vbuf);
            cvq_status st = cvq_encode_values(ctx, cb, 0, vbuf, dt, n, bits, sigma);
            FUZZ_CHECK(fuzz_status_is_valid(st), "encode values status");
            if (st == CVQ_OK && n > 0) {
                FUZZ_CHECK(cvq_decode_values(ctx, cb, 0, bits, sigma, n, vbuf) == CVQ_OK, "decode values");
                FUZZ_CHECK(all_finite(vbuf, n * tok), "finite decoded values");
            }
        } else if (op == 6) { /* copy, compare, continue with the copy */
            cvq_cache *c2 = NULL;
            FUZZ_CHECK(cvq_cache_copy(cache, &c2) == CVQ_OK && c2, "copy of a live cache");
            cvq_cache_stats s1, s2;
            stats(cache, &s1);
            stats(c2, &s2);
            FUZZ_CHECK(s1.n_tokens == s2.n_tokens && s1.n_compressed == s2.n_compressed &&
                           s1.n_window == s2.n_window,
                       "a copy has the original's stats");
            int32_t qp = (int32_t)fuzz_u16(&b);
            for (size_t i = 0; i < qsz; i++) q[i] = (float)((i * 7919u) % 201u) / 100.0f - 1.0f;
            cvq_status st1 = cvq_cache_attend(cache, q, &qp, 1, 0, out);
            cvq_status st2 = cvq_cache_attend(c2, q, &qp, 1, 0, out + qsz);
            FUZZ_CHECK(st1 == st2, "a copy attends with the original's status");
            if (st1 == CVQ_OK)
                FUZZ_CHECK(memcmp(out, out + qsz, qsz * sizeof(float)) == 0,
                           "a copy gives bit-identical attention");
            cvq_cache_free(cache);
            cache = c2;
        } else { /* clear */
            FUZZ_CHECK(cvq_cache_clear(cache) == CVQ_OK, "clear");
            cvq_cache_stats s;
            stats(cache, &s);
            FUZZ_CHECK(s.n_tokens == 0, "clear forgets every token");
            next_pos = committed = 0;
        }
    }
    free(kbuf); free(vbuf); free(q); free(out);
    free(codes); free(scales); free(bits); free(sigma);
    cvq_cache_free(cache);
    cvq_context_free(ctx);
    return 0;
}
