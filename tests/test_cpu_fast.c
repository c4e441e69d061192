/*
 * The CPU fast path (backends/cpu/cpu_fast.h) against the CPU reference:
 *
 *  (a) every instruction set this CPU runs (portable, AVX2, AVX-512; forced
 *      through cvq_cpu_isa_force) encodes keys and values bit for bit like
 *      cpu_reference = 1, over geometries that reach every kernel edge:
 *      d = 64/80/96/128/256, both pair layouts and key-scale modes, token
 *      counts that are not a multiple of any lane width, Linear layers whose
 *      output count is not a multiple of 8, Nc = 8, zero tokens and heads;
 *  (b) exact ties built into the codebook (three identical sub-codes, so
 *      nine codes at exactly the same distance, spread over different
 *      argmin chains): code 64*3+3 must win, as numerics.md section 8 says;
 *      plus near ties (1e-7 noise) and subnormal / all-underflow inputs,
 *      against the reference;
 *  (c) thread-count invariance of the codes (1, 2, 3, 5 threads);
 *  (d) attention of the fast path (every instruction set, 1..4 threads,
 *      contexts long enough to be split across threads, sinks and window,
 *      causal cuts, uneven GQA groups, several value groups) against a
 *      double-precision attention over the keys and values decoded in
 *      double (tests/support oracles), within the contract's tolerance;
 *  (e) the key argmin and its exact row pruning on tables built to defeat
 *      an unsafe prune (ties across rows with equal bounds, a planted trap,
 *      NaN/Inf, signed zeros) against the ascending scan of numerics.md 8.
 *
 * Seeds are fixed per case and printed on failure.
 */
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
#include "cpu/cpu_fast.h"
#include "cvq_internal.h"
#include "harness.h"
#include "reference.h"

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    assert_non_null(p);
    return p;
}

static cvq_context *make_ctx(int reference, int threads) {
    cvq_context_params p = cvq_context_default_params();
    p.backend = CVQ_BACKEND_CPU;
    p.cpu_reference = reference;
    p.n_threads = threads;
    cvq_context *c = NULL;
    assert_int_equal(cvq_context_create(&p, &c), CVQ_OK);
    return c;
}

typedef struct geo {
    uint32_t d, hq, hkv, R, Nc, F, I;
    cvq_pair_layout layout;
    cvq_key_scale_mode scale;
} geo;

static cvq_codebook *make_cb(const geo *e, uint64_t seed, cvq_geometry *g) {
    memset(g, 0, sizeof *g);
    g->n_layers = 1;
    g->n_q_heads = e->hq;
    g->n_kv_heads = e->hkv;
    g->head_dim = e->d;
    g->key_stages = e->R;
    g->value_bits = e->Nc;
    g->value_group_width = e->F;
    g->value_hidden = e->I;
    g->pair_layout = e->layout;
    g->key_scale = e->scale;
    assert_int_equal(cvq_geometry_resolve(g), CVQ_OK);
    double theta[128];
    assert_int_equal(cvq_rope_freqs_default(e->d, 10000.0, theta), CVQ_OK);
    cvq_codebook *cb = NULL;
    assert_int_equal(cvq_codebook_random(g, theta, seed, NULL, &cb), CVQ_OK);
    return cb;
}

static void geo_name(const geo *e, char *buf, size_t n) {
    snprintf(buf, n, "d=%u hq=%u hkv=%u R=%u Nc=%u F=%u I=%u layout=%s scale=%s", e->d, e->hq,
             e->hkv, e->R, e->Nc, e->F, e->I, e->layout ? "inter" : "rot",
             e->scale ? "head" : "token");
}

/* Encodes n tokens with ctx; outputs into the given arrays. */
static void encode(cvq_context *ctx, const cvq_codebook *cb, const float *k, const float *v,
                   size_t n, uint16_t *codes, float *ks, uint8_t *bits, float *sig) {
    assert_int_equal(cvq_encode_keys(ctx, cb, 0, k, CVQ_F32, n, codes, ks), CVQ_OK);
    assert_int_equal(cvq_encode_values(ctx, cb, 0, v, CVQ_F32, n, bits, sig), CVQ_OK);
}

typedef struct enc_out {
    uint16_t *codes;
    float *ks, *sig;
    uint8_t *bits;
    size_t nc, nks, nb, ns;
} enc_out;

static void enc_alloc(enc_out *o, const cvq_geometry *g, size_t n) {
    cvq_record_layout rl;
    assert_int_equal(cvq_record_layout_of(g, &rl), CVQ_OK);
    o->nc = n * g->n_kv_heads * g->key_stages;
    o->nks = n * rl.key_scale_count;
    o->nb = n * rl.value_bit_bytes;
    o->ns = n * rl.value_groups;
    o->codes = xmalloc(o->nc * sizeof(uint16_t));
    o->ks = xmalloc(o->nks * sizeof(float));
    o->bits = xmalloc(o->nb);
    o->sig = xmalloc(o->ns * sizeof(float));
}

static void enc_free(enc_out *o) {
    free(o->codes);
    free(o->ks);
    free(o->bits);
    free(o->sig);
}

/* Bit-for-bit comparison of two encodings; prints the first difference. */
static int enc_differs(const enc_out *a, const enc_out *b, const char *what) {
    size_t first = 0;
    if (th_cmp_u16(a->codes, b->codes, a->nc, &first)) {
        printf("[cpu_fast] %s: key code %zu differs (%u vs %u)\n", what, first, a->codes[first],
               b->codes[first]);
        return 1;
    }
    if (memcmp(a->ks, b->ks, a->nks * sizeof(float))) {
        printf("[cpu_fast] %s: key scales differ\n", what);
        return 1;
    }
    if (th_cmp_bytes(a->bits, b->bits, a->nb, &first)) {
        printf("[cpu_fast] %s: value bits byte %zu differs\n", what, first);
        return 1;
    }
    if (memcmp(a->sig, b->sig, a->ns * sizeof(float))) {
        printf("[cpu_fast] %s: value sigma differs\n", what);
        return 1;
    }
    return 0;
}

/* Inputs: normal keys and values, with special tokens mixed in: token 1 all
 * zero, token 2 tiny (subnormal squares), token 3 with head 0 zero, token
 * 4 subnormal everywhere (every square underflows). */
static void make_inputs(th_rng *r, const cvq_geometry *g, size_t n, float *k, float *v) {
    const size_t kvd = cvq__kv_dims(g);
    th_fill_normal(r, k, n * kvd, 1.0);
    th_fill_normal(r, v, n * kvd, 1.0);
    if (n > 4) {
        memset(k + kvd, 0, kvd * sizeof(float));
        memset(v + kvd, 0, kvd * sizeof(float));
        for (size_t i = 0; i < kvd; i++) {
            k[2 * kvd + i] *= 1e-21f;
            v[2 * kvd + i] *= 1e-36f;
            k[4 * kvd + i] = (i % 3 ? 1 : -1) * 1e-44f;
            v[4 * kvd + i] = (i % 5 ? 1 : -1) * 3e-42f;
        }
        memset(k + 3 * kvd, 0, g->head_dim * sizeof(float));
    }
}

static const geo geos[] = {
    {64, 4, 2, 3, 64, 0, 0, CVQ_PAIRS_ROTATE_HALF, CVQ_KEY_SCALE_TOKEN},
    {80, 8, 1, 2, 24, 80, 12, CVQ_PAIRS_INTERLEAVED, CVQ_KEY_SCALE_HEAD},
    {96, 6, 3, 1, 8, 288, 7, CVQ_PAIRS_INTERLEAVED, CVQ_KEY_SCALE_TOKEN},
    {128, 32, 8, 11, 1024, 1024, 0, CVQ_PAIRS_ROTATE_HALF, CVQ_KEY_SCALE_TOKEN},
    {256, 2, 2, 4, 16, 256, 20, CVQ_PAIRS_ROTATE_HALF, CVQ_KEY_SCALE_HEAD},
};

/* (a) every available instruction set vs the reference, bit for bit */
static void test_isa_vs_reference(void **state) {
    (void)state;
    cvq_context *ref = make_ctx(1, 1), *fast = make_ctx(0, 0);
    size_t isas_run = 0;
    for (int isa = 0; isa < CVQ_CPU_ISA_COUNT; isa++)
        if (!cvq_cpu_isa_available((cvq_cpu_isa)isa))
            printf("[cpu_fast] skip %s: not available on this CPU/build\n",
                   cvq_cpu_isa_name((cvq_cpu_isa)isa));
    for (size_t gi = 0; gi < sizeof geos / sizeof geos[0]; gi++) {
        char name[160];
        geo_name(&geos[gi], name, sizeof name);
        const uint64_t seed = th_fnv1a64(name);
        cvq_geometry g;
        cvq_codebook *cb = make_cb(&geos[gi], seed, &g);
        const size_t n = gi == 3 ? 21 : 37, kvd = cvq__kv_dims(&g);
        float *k = xmalloc(n * kvd * sizeof(float)), *v = xmalloc(n * kvd * sizeof(float));
        th_rng r;
        th_rng_seed(&r, seed);
        make_inputs(&r, &g, n, k, v);
        enc_out want, got;
        enc_alloc(&want, &g, n);
        enc_alloc(&got, &g, n);
        encode(ref, cb, k, v, n, want.codes, want.ks, want.bits, want.sig);
        for (int isa = 0; isa < CVQ_CPU_ISA_COUNT; isa++) {
            if (!cvq_cpu_isa_force((cvq_cpu_isa)isa)) continue;
            encode(fast, cb, k, v, n, got.codes, got.ks, got.bits, got.sig);
            char what[256];
            snprintf(what, sizeof what, "%s isa=%s seed=%llu", name,
                     cvq_cpu_isa_name((cvq_cpu_isa)isa), (unsigned long long)seed);
            assert_int_equal(enc_differs(&got, &want, what), 0);
            isas_run++;
        }
        cvq_cpu_isa_force(CVQ_CPU_ISA_COUNT);
        enc_free(&want);
        enc_free(&got);
        free(k);
        free(v);
        cvq_codebook_free(cb);
    }
    printf("[cpu_fast a] %zu (geometry, instruction set) runs bit-identical to the reference "
           "(keys, scales, value bits, sigma)\n", isas_run);
    assert_true(isas_run >= sizeof geos / sizeof geos[0]);
    cvq_context_free(ref);
    cvq_context_free(fast);
}

/* (b) exact ties from duplicated sub-codes, near ties, subnormals */
static void test_ties_and_subnormals(void **state) {
    (void)state;
    const geo e = {64, 2, 1, 3, 16, 0, 0, CVQ_PAIRS_ROTATE_HALF, CVQ_KEY_SCALE_TOKEN};
    cvq_geometry g;
    cvq_codebook *cb = make_cb(&e, 77, &g);
    const uint32_t d = 64, P = 32;
    float *w = NULL;
    assert_int_equal(cvq_codebook_tensor_data(cb, CVQ_T_KEY_W, 0, 0, &w), CVQ_OK);
    /* stage 0: rows 3, 7 and 10 equal, scaled so that c(3,3) has norm 1:
     * c(a,a) = (x - y, y + x) per pair, |c|^2 = 2 sum (x^2 + y^2) */
    double n3 = 0.0;
    for (uint32_t i = 0; i < 2 * P; i++) n3 += (double)w[3 * 2 * P + i] * w[3 * 2 * P + i];
    const float sc = (float)(1.0 / sqrt(2.0 * n3));
    for (uint32_t i = 0; i < 2 * P; i++) w[3 * 2 * P + i] *= sc;
    memcpy(w + 7 * 2 * P, w + 3 * 2 * P, 2 * P * sizeof(float));
    memcpy(w + 10 * 2 * P, w + 3 * 2 * P, 2 * P * sizeof(float));
    assert_int_equal(cvq_codebook_commit(cb), CVQ_OK);

    const size_t n = 40;
    float *k = xmalloc(n * d * sizeof(float)), *v = xmalloc(n * d * sizeof(float));
    th_rng r;
    th_rng_seed(&r, 78);
    th_fill_normal(&r, v, n * d, 1.0);
    const float *w3 = w + 3 * 2 * P;
    for (size_t t = 0; t < n; t++) {
        /* key = c(3,3) (head layout, rotate_half), times a scale; tokens
         * >= 8 get relative noise 1e-7 (near ties), >= 24 are subnormal */
        for (uint32_t p = 0; p < P; p++) {
            float re = w3[2 * p] - w3[2 * p + 1], im = w3[2 * p + 1] + w3[2 * p];
            if (t >= 8) {
                re *= 1.0f + 1e-7f * (float)th_rng_normal(&r);
                im *= 1.0f + 1e-7f * (float)th_rng_normal(&r);
            }
            const float s = t >= 24 ? 1e-39f : (float)(t + 1) * 0.5f;
            k[t * d + p] = re * s;
            k[t * d + p + P] = im * s;
        }
        if (t >= 32)
            for (uint32_t i = 0; i < d; i++) v[t * d + i] *= 1e-40f;
    }
    cvq_context *ref = make_ctx(1, 1), *fast = make_ctx(0, 0);
    enc_out want, got;
    enc_alloc(&want, &g, n);
    enc_alloc(&got, &g, n);
    encode(ref, cb, k, v, n, want.codes, want.ks, want.bits, want.sig);
    /* the construction's answer, independent of any kernel: nine codes at
     * one distance, the lowest index 64*3 + 3 wins */
    size_t exact195 = 0;
    for (size_t t = 0; t < 8; t++) exact195 += want.codes[t * 3] == 195;
    printf("[cpu_fast b] exact ties: reference picks 195 in %zu/8 tokens\n", exact195);
    assert_int_equal(exact195, 8);
    size_t runs = 0;
    for (int isa = 0; isa < CVQ_CPU_ISA_COUNT; isa++) {
        if (!cvq_cpu_isa_force((cvq_cpu_isa)isa)) continue;
        encode(fast, cb, k, v, n, got.codes, got.ks, got.bits, got.sig);
        char what[64];
        snprintf(what, sizeof what, "ties isa=%s seed=77", cvq_cpu_isa_name((cvq_cpu_isa)isa));
        assert_int_equal(enc_differs(&got, &want, what), 0);
        for (size_t t = 0; t < 8; t++) assert_int_equal(got.codes[t * 3], 195);
        runs++;
    }
    cvq_cpu_isa_force(CVQ_CPU_ISA_COUNT);
    printf("[cpu_fast b] exact ties, 1e-7 near ties, subnormal keys and values: %zu instruction "
           "sets bit-identical to the reference\n", runs);
    enc_free(&want);
    enc_free(&got);
    free(k);
    free(v);
    cvq_context_free(ref);
    cvq_context_free(fast);
    cvq_codebook_free(cb);
}

/* (c) codes do not depend on the number of threads */
static void test_thread_invariance(void **state) {
    (void)state;
    const geo e = {128, 8, 4, 5, 64, 256, 40, CVQ_PAIRS_INTERLEAVED, CVQ_KEY_SCALE_HEAD};
    cvq_geometry g;
    cvq_codebook *cb = make_cb(&e, 91, &g);
    const size_t n = 150, kvd = cvq__kv_dims(&g);
    float *k = xmalloc(n * kvd * sizeof(float)), *v = xmalloc(n * kvd * sizeof(float));
    th_rng r;
    th_rng_seed(&r, 92);
    make_inputs(&r, &g, n, k, v);
    cvq_context *ref = make_ctx(1, 1);
    enc_out want, got;
    enc_alloc(&want, &g, n);
    enc_alloc(&got, &g, n);
    encode(ref, cb, k, v, n, want.codes, want.ks, want.bits, want.sig);
    const int threads[] = {1, 2, 3, 5};
    for (size_t i = 0; i < 4; i++) {
        cvq_context *c = make_ctx(0, threads[i]);
        encode(c, cb, k, v, n, got.codes, got.ks, got.bits, got.sig);
        char what[64];
        snprintf(what, sizeof what, "threads=%d seed=91", threads[i]);
        assert_int_equal(enc_differs(&got, &want, what), 0);
        cvq_context_free(c);
    }
    /* short calls (1..5 tokens: the value encoder's per-token branch and
     * key batches with one live lane) give the same codes as the long one */
    cvq_context *c2 = make_ctx(0, 2);
    for (size_t nn = 1; nn <= 5; nn++) {
        encode(c2, cb, k, v, nn, got.codes, got.ks, got.bits, got.sig);
        const size_t R = g.key_stages, Hkv = g.n_kv_heads, ng = cvq__value_groups(&g);
        assert_memory_equal(got.codes, want.codes, nn * Hkv * R * sizeof(uint16_t));
        assert_memory_equal(got.ks, want.ks, nn * Hkv * sizeof(float));
        assert_memory_equal(got.bits, want.bits, nn * ng * (g.value_bits / 8));
        assert_memory_equal(got.sig, want.sig, nn * ng * sizeof(float));
    }
    cvq_context_free(c2);
    printf("[cpu_fast c] 1, 2, 3, 5 threads, and calls of 1..5 tokens: codes identical to the "
           "reference\n");
    enc_free(&want);
    enc_free(&got);
    free(k);
    free(v);
    cvq_context_free(ref);
    cvq_codebook_free(cb);
}

/* (d) attention vs the double oracle */
static double attn_tol(const cvq_geometry *g, size_t T) {
    const double L = (double)g->key_stages * (g->head_dim / 2) + g->head_dim + g->value_bits + (double)T;
    return 16.0 * ldexp(1.0, -24) * sqrt(L);
}

typedef struct attn_case {
    geo e;
    size_t n_sink, n_comp, n_win;
} attn_case;

static void test_attention_long(void **state) {
    (void)state;
    const attn_case cases[] = {
        /* uneven GQA groups (3 KV heads serve 2, 1, 2 ... query heads), two value groups */
        {{64, 6, 4, 2, 32, 128, 16, CVQ_PAIRS_ROTATE_HALF, CVQ_KEY_SCALE_TOKEN}, 3, 4600, 16},
        {{128, 8, 2, 3, 64, 0, 0, CVQ_PAIRS_INTERLEAVED, CVQ_KEY_SCALE_HEAD}, 0, 2500, 0},
        {{80, 32, 2, 1, 16, 80, 8, CVQ_PAIRS_ROTATE_HALF, CVQ_KEY_SCALE_TOKEN}, 2, 1100, 5},
    };
    double worst = 0.0;
    size_t runs = 0;
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const attn_case *ac = &cases[ci];
        char name[200];
        geo_name(&ac->e, name, sizeof name);
        const uint64_t seed = th_fnv1a64(name);
        cvq_geometry g;
        cvq_codebook *cb = make_cb(&ac->e, seed, &g);
        const uint32_t d = g.head_dim, Hq = g.n_q_heads, Hkv = g.n_kv_heads;
        const size_t kvd = cvq__kv_dims(&g), T = ac->n_sink + ac->n_comp + ac->n_win;
        cvq_record_layout rl;
        assert_int_equal(cvq_record_layout_of(&g, &rl), CVQ_OK);
        float *k = xmalloc(T * kvd * sizeof(float)), *v = xmalloc(T * kvd * sizeof(float));
        int32_t *pos = xmalloc(T * sizeof(int32_t));
        th_rng r;
        th_rng_seed(&r, seed);
        th_fill_normal(&r, k, T * kvd, 1.0);
        th_fill_normal(&r, v, T * kvd, 1.0);
        for (size_t t = 0; t < T; t++) pos[t] = (int32_t)(5 + 2 * t);
        /* compressed segment: tokens n_sink .. n_sink + n_comp - 1 */
        const size_t nc = ac->n_comp;
        cvq_context *ctx = make_ctx(0, 0);
        enc_out enc;
        enc_alloc(&enc, &g, nc);
        encode(ctx, cb, k + ac->n_sink * kvd, v + ac->n_sink * kvd, nc, enc.codes, enc.ks, enc.bits,
               enc.sig);
        uint8_t *packed = xmalloc(nc * rl.key_code_bytes);
        for (size_t t = 0; t < nc; t++)
            th_pack_codes12(enc.codes + t * Hkv * g.key_stages, (size_t)Hkv * g.key_stages,
                            packed + t * rl.key_code_bytes);
        /* oracle inputs: full-precision tokens as given, compressed ones
         * decoded in double */
        double *kd = xmalloc(T * kvd * sizeof(double)), *vd = xmalloc(T * kvd * sizeof(double));
        for (size_t i = 0; i < T * kvd; i++) {
            kd[i] = k[i];
            vd[i] = v[i];
        }
        const float *key_w;
        assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_KEY_W, 0, 0, &key_w), CVQ_OK);
        for (size_t t = 0; t < nc; t++) {
            const size_t u = ac->n_sink + t;
            th_decode_key_double(&g, key_w, enc.codes + t * Hkv * g.key_stages,
                                 enc.ks + t * rl.key_scale_count, kd + u * kvd);
            for (uint32_t gi = 0; gi < rl.value_groups; gi++) {
                th_value_group vg;
                vg.F = g.value_group_width;
                vg.I = g.value_hidden;
                vg.Nc = g.value_bits;
                const float *tens[8];
                const cvq_tensor_id ids[8] = {CVQ_T_VAL_LS, CVQ_T_VAL_LN_W, CVQ_T_VAL_LN_B, CVQ_T_VAL_W1,
                                              CVQ_T_VAL_B1, CVQ_T_VAL_W2, CVQ_T_VAL_B2, CVQ_T_VAL_E};
                for (int j = 0; j < 8; j++)
                    assert_int_equal(cvq_codebook_tensor_cdata(cb, ids[j], 0, gi, &tens[j]), CVQ_OK);
                vg.ls = tens[0]; vg.ln_w = tens[1]; vg.ln_b = tens[2]; vg.w1 = tens[3];
                vg.b1 = tens[4]; vg.w2 = tens[5]; vg.b2 = tens[6]; vg.E = tens[7];
                th_decode_value_double(&vg, enc.bits + t * rl.value_bit_bytes + gi * (g.value_bits / 8),
                                       enc.sig[t * rl.value_groups + gi],
                                       vd + u * kvd + (size_t)gi * g.value_group_width);
            }
        }
        /* queries: before every token (sees nothing), inside the
         * compressed segment (causal cut), after the last token */
        const size_t n_q = 3;
        float *q = xmalloc(n_q * Hq * d * sizeof(float));
        th_fill_normal(&r, q, n_q * Hq * d, 1.0);
        const int32_t q_pos[3] = {2, pos[ac->n_sink + nc / 2] + 1, pos[T - 1] + 7};
        double theta[128];
        assert_int_equal(cvq_codebook_rope_theta(cb, theta), CVQ_OK);
        double *want = xmalloc(n_q * Hq * d * sizeof(double));
        assert_true(th_attend_double(&g, theta, n_q, q, q_pos, 0, T, kd, vd, pos, want));
        float *out = xmalloc(n_q * Hq * d * sizeof(float));
        cvq_layer_view lv;
        assert_int_equal(cvq__layer_view(ctx, cb, 0, &lv), CVQ_OK);
        cvq_attend_host h;
        memset(&h, 0, sizeof h);
        h.n_q = n_q;
        h.q = q;
        h.q_pos = q_pos;
        h.n_sink = ac->n_sink;
        h.sink_k = k;
        h.sink_v = v;
        h.sink_pos = pos;
        h.n_comp = nc;
        h.comp_codes = packed;
        h.comp_kscale = enc.ks;
        h.comp_vbits = enc.bits;
        h.comp_vsigma = enc.sig;
        h.comp_pos = pos + ac->n_sink;
        h.n_win = ac->n_win;
        h.win_k = k + (ac->n_sink + nc) * kvd;
        h.win_v = v + (ac->n_sink + nc) * kvd;
        h.win_pos = pos + ac->n_sink + nc;
        h.out = out;
        const double tol = attn_tol(&g, T);
        for (int isa = 0; isa < CVQ_CPU_ISA_COUNT; isa++) {
            if (!cvq_cpu_isa_force((cvq_cpu_isa)isa)) continue;
            for (int nt = 1; nt <= 4; nt++) {
                memset(out, 0xCD, n_q * Hq * d * sizeof(float));
                assert_int_equal(cvq_cpu_fast_attend(ctx, &lv, &h, nt), CVQ_OK);
                th_err e = th_cmp_f32_f64(out, want, n_q * Hq * d);
                for (size_t i = 0; i < Hq * d; i++) assert_true(out[i] == 0.0f); /* sees nothing */
                if (!(e.norm_err <= tol))
                    printf("[cpu_fast d] %s isa=%s threads=%d seed=%llu: norm error %.3g > tol %.3g "
                           "(worst index %zu, NaN %zu)\n", name, cvq_cpu_isa_name((cvq_cpu_isa)isa),
                           nt, (unsigned long long)seed, e.norm_err, tol, e.worst, e.n_nan);
                assert_true(e.norm_err <= tol);
                if (e.norm_err / tol > worst) worst = e.norm_err / tol;
                runs++;
            }
        }
        cvq_cpu_isa_force(CVQ_CPU_ISA_COUNT);
        free(k); free(v); free(pos); free(packed); free(kd); free(vd); free(q); free(want); free(out);
        enc_free(&enc);
        cvq_context_free(ctx);
        cvq_codebook_free(cb);
    }
    printf("[cpu_fast d] attention, contexts up to 4619 tokens split over 1..4 threads, every "
           "instruction set: %zu runs within tolerance (worst %.3f of it)\n", runs, worst);
}

/* (e) The key argmin with its exact row pruning (cpu_kernels_impl.h,
 * key_argmin), fed tables built here, against the scan of numerics.md
 * section 8 written in this test: k = 64*A + B ascending, dist = (f[A] +
 * g[B]) + G[A][B], replace on strict <, +Inf start (a NaN or +Inf distance
 * never wins; nothing below +Inf gives code 0). Kinds of tables:
 *   0: small integers: exact ties everywhere, many rows with equal bounds;
 *   1: a planted trap for an unsafe prune: a high row H whose bound is the
 *      smallest holds the minimum distance -15 at (H, B0), and a lower row
 *      L holds the same distance at (L, B0) with a bound EQUAL to -15 (so a
 *      prune on bound >= best, or a visit order that keeps the first
 *      minimum found, returns 64*H + B0 instead of 64*L + B0);
 *   2: normal floats (rounding in every sum);
 *   3: kind 2 with NaN, +Inf and -Inf entries in f, g and G, and lanes
 *      whose every distance is NaN or +Inf;
 *   4: entries in {-0, +0, 1}: ties between zeros of both signs;
 *   5: a NaN G[A][b] (b < 16) in the same vector lane as the winner
 *      G[A][b + 16] = -50 (any lane width 4, 8, 16), in a row whose f is
 *      +5: a row minimum that let the NaN hide its lane's entries would
 *      overstate the row's bound and prune the winner's row. */
static uint32_t scan_argmin(const float *fT, const float *gT, const float *G, uint32_t vw,
                            uint32_t l) {
    float best = INFINITY;
    uint32_t kb = 0;
    for (uint32_t A = 0; A < 64; A++)
        for (uint32_t B = 0; B < 64; B++) {
            const float dist = (fT[A * vw + l] + gT[B * vw + l]) + G[A * 64 + B];
            if (dist < best) {
                best = dist;
                kb = A * 64 + B;
            }
        }
    return kb;
}

static float small_int(th_rng *r, int lo, int hi) {
    return (float)(lo + (int)(th_rng_u64(r) % (uint64_t)(hi - lo + 1)));
}

static void make_argmin_tables(th_rng *r, int kind, uint32_t vw, float *fT, float *gT, float *G,
                               uint32_t *planted) {
    for (uint32_t i = 0; i < 64 * vw; i++) {
        switch (kind) {
        case 0: fT[i] = small_int(r, -3, 3); gT[i] = small_int(r, -3, 3); break;
        case 4: fT[i] = (float)(th_rng_u64(r) % 3) - 1.0f; gT[i] = 0.0f * small_int(r, -1, 1); break;
        default: fT[i] = (float)th_rng_normal(r); gT[i] = (float)th_rng_normal(r); break;
        }
    }
    for (uint32_t i = 0; i < 64 * 64; i++) {
        switch (kind) {
        case 0: G[i] = small_int(r, -3, 3); break;
        case 4: G[i] = th_rng_u64(r) % 2 ? -0.0f : 0.0f; break;
        default: G[i] = (float)th_rng_normal(r); break;
        }
    }
    if (kind == 4) /* f in {-1, 0, +0}: -1 rows hold the minimum, all zeros */
        for (uint32_t i = 0; i < 64 * vw; i++) fT[i] = fT[i] > 0.0f ? -0.0f : fT[i];
    if (kind == 1) {
        const uint32_t L = (uint32_t)(th_rng_u64(r) % 40);
        const uint32_t H = L + 1 + (uint32_t)(th_rng_u64(r) % (63 - L));
        const uint32_t B0 = (uint32_t)(th_rng_u64(r) % 64);
        const uint32_t B7 = (B0 + 1 + (uint32_t)(th_rng_u64(r) % 63)) % 64;
        for (uint32_t i = 0; i < 64 * vw; i++) fT[i] = 0.0f;
        for (uint32_t l = 0; l < vw; l++) {
            const float c = small_int(r, -2, 2); /* per-lane shift of every row */
            for (uint32_t A = 0; A < 64; A++) fT[A * vw + l] = c;
            for (uint32_t B = 0; B < 64; B++) gT[B * vw + l] = B == B0 ? -5.0f : 0.0f;
        }
        for (uint32_t i = 0; i < 64 * 64; i++) G[i] = 0.0f;
        G[H * 64 + B0] = -10.0f; /* dist c - 15 */
        G[H * 64 + B7] = -12.0f; /* dist c - 12; bound of row H: c - 17 */
        G[L * 64 + B0] = -10.0f; /* dist c - 15; bound of row L: c - 15 */
        *planted = L * 64 + B0;
    }
    if (kind == 5) {
        const uint32_t A = (uint32_t)(th_rng_u64(r) % 64), b = (uint32_t)(th_rng_u64(r) % 16);
        G[A * 64 + b] = NAN;
        G[A * 64 + b + 16] = -50.0f;
        for (uint32_t l = 0; l < vw; l++) fT[A * vw + l] = 5.0f;
        *planted = A * 64 + b + 16;
    }
    if (kind == 3) {
        const float sp[3] = {NAN, INFINITY, -INFINITY};
        for (int j = 0; j < 24; j++) {
            const float x = sp[th_rng_u64(r) % 3];
            const uint64_t where = th_rng_u64(r) % 3;
            if (where == 0) fT[th_rng_u64(r) % (64 * vw)] = x;
            else if (where == 1) gT[th_rng_u64(r) % (64 * vw)] = x;
            else G[th_rng_u64(r) % (64 * 64)] = x;
        }
        /* lane 0: every distance NaN; lane 1: every distance +Inf or NaN */
        for (uint32_t A = 0; A < 64; A++) {
            fT[A * vw + 0] = NAN;
            fT[A * vw + 1] = INFINITY;
        }
    }
}

static void test_argmin_pruning(void **state) {
    (void)state;
    enum { SEEDS = 60 };
    float fT[64 * 16], gT[64 * 16], G[64 * 64];
    uint32_t kb[16];
    size_t runs = 0, lanes = 0, planted_hits = 0;
    for (int isa = 0; isa < CVQ_CPU_ISA_COUNT; isa++) {
        if (!cvq_cpu_isa_force((cvq_cpu_isa)isa)) continue;
        const cvq_cpu_kernels *K = cvq_cpu_kernels_get();
        const uint32_t vw = K->argmin_lanes;
        assert_true(vw >= 1 && vw <= 16);
        for (int kind = 0; kind < 6; kind++)
            for (uint64_t seed = 1; seed <= SEEDS; seed++) {
                th_rng r;
                th_rng_seed(&r, 9000 + 100 * (uint64_t)kind + seed);
                uint32_t planted = 0;
                make_argmin_tables(&r, kind, vw, fT, gT, G, &planted);
                K->key_argmin(fT, gT, G, kb);
                for (uint32_t l = 0; l < vw; l++) {
                    const uint32_t want = scan_argmin(fT, gT, G, vw, l);
                    if (kb[l] != want)
                        printf("[cpu_fast e] isa=%s kind=%d seed=%llu lane %u: code %u, the scan "
                               "gives %u\n", cvq_cpu_isa_name((cvq_cpu_isa)isa), kind,
                               (unsigned long long)(9000 + 100 * (uint64_t)kind + seed), l, kb[l],
                               want);
                    assert_int_equal(kb[l], want);
                    if (kind == 1 || kind == 5) { /* the construction's own answer */
                        assert_int_equal(want, planted);
                        planted_hits++;
                    }
                    if (kind == 3 && l < 2) assert_int_equal(want, 0);
                    lanes++;
                }
                runs++;
            }
    }
    cvq_cpu_isa_force(CVQ_CPU_ISA_COUNT);
    printf("[cpu_fast e] key argmin with row pruning: %zu tables (%zu lanes, %zu planted traps) "
           "equal to the ascending scan\n", runs, lanes, planted_hits);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_isa_vs_reference),
        cmocka_unit_test(test_ties_and_subnormals),
        cmocka_unit_test(test_thread_invariance),
        cmocka_unit_test(test_attention_long),
        cmocka_unit_test(test_argmin_pruning),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
