/*
 * Public API behaviour: statuses, backend selection (no silent fallback),
 * the allocator hook (failure injection on every allocation of a whole
 * session), *_free(NULL), and the cache's policy (sinks, window flushes,
 * all-or-nothing appends) checked against a token-by-token simulation of
 * the method note's rule written here independently.
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

/* ---- small helpers -------------------------------------------------------- */

static uint64_t rng_state;
static double rnd_normal(void) {
    /* splitmix64 + Box-Muller: platform independent */
    double u[2];
    for (int i = 0; i < 2; i++) {
        uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        u[i] = ((double)(z >> 11) + 0.5) / 9007199254740992.0;
    }
    return sqrt(-2.0 * log(u[0])) * cos(6.283185307179586 * u[1]);
}
static void fill_normal(float *x, size_t n, uint64_t seed) {
    rng_state = seed;
    for (size_t i = 0; i < n; i++) x[i] = (float)rnd_normal();
}

static cvq_geometry small_geometry(void) {
    cvq_geometry g;
    memset(&g, 0, sizeof g);
    g.n_layers = 2;
    g.n_q_heads = 4;
    g.n_kv_heads = 2;
    g.head_dim = 64;
    g.key_stages = 3;
    g.value_bits = 64;
    g.value_group_width = 64; /* per-head value groups */
    return g;
}

static cvq_context *cpu_ctx(const cvq_allocator *a) {
    cvq_context_params p = cvq_context_default_params();
    p.backend = CVQ_BACKEND_CPU;
    p.allocator = a;
    cvq_context *ctx = NULL;
    assert_int_equal(cvq_context_create(&p, &ctx), CVQ_OK);
    return ctx;
}

static cvq_codebook *random_cb(const cvq_geometry *g0, const cvq_allocator *a) {
    cvq_geometry g = *g0;
    assert_int_equal(cvq_geometry_resolve(&g), CVQ_OK);
    double theta[128];
    assert_int_equal(cvq_rope_freqs_default(g.head_dim, 10000.0, theta), CVQ_OK);
    cvq_codebook *cb = NULL;
    assert_int_equal(cvq_codebook_random(&g, theta, 7, a, &cb), CVQ_OK);
    return cb;
}

/* ---- statuses and NULL handling --------------------------------------------- */

static void test_status_names(void **state) {
    (void)state;
    const cvq_status all[] = {
        CVQ_OK, CVQ_ERR_INVALID_ARGUMENT, CVQ_ERR_NULL_POINTER, CVQ_ERR_SHAPE,
        CVQ_ERR_NONFINITE_INPUT, CVQ_ERR_INPUT_RANGE, CVQ_ERR_POSITION, CVQ_ERR_LAYER_RANGE,
        CVQ_ERR_SIZE_OVERFLOW, CVQ_ERR_GEOMETRY, CVQ_ERR_MISMATCH, CVQ_ERR_UNSUPPORTED,
        CVQ_ERR_BACKEND_UNAVAILABLE, CVQ_ERR_NO_DEVICE, CVQ_ERR_OUT_OF_MEMORY,
        CVQ_ERR_DEVICE_OUT_OF_MEMORY, CVQ_ERR_DEVICE, CVQ_ERR_DEVICE_LOST, CVQ_ERR_IO,
        CVQ_ERR_FORMAT, CVQ_ERR_FORMAT_VERSION, CVQ_ERR_FORMAT_TRUNCATED,
        CVQ_ERR_FORMAT_CHECKSUM, CVQ_ERR_FORMAT_NONFINITE, CVQ_ERR_CANCELLED, CVQ_ERR_INTERNAL};
    const size_t n = sizeof all / sizeof all[0];
    for (size_t i = 0; i < n; i++) {
        assert_string_not_equal(cvq_status_name(all[i]), "CVQ_ERR_UNKNOWN");
        assert_true(strlen(cvq_status_string(all[i])) > 3);
        for (size_t j = 0; j < i; j++) assert_string_not_equal(cvq_status_name(all[i]), cvq_status_name(all[j]));
    }
    assert_string_equal(cvq_status_name((cvq_status)12345), "CVQ_ERR_UNKNOWN");
    assert_non_null(cvq_status_string((cvq_status)12345));
}

static void test_free_null(void **state) {
    (void)state;
    cvq_context_free(NULL);
    cvq_codebook_free(NULL);
    cvq_cache_free(NULL);
    assert_int_equal(cvq_context_create(NULL, NULL), CVQ_ERR_NULL_POINTER);
    assert_true(strstr(cvq_last_error(), "CVQ_ERR_NULL_POINTER") != NULL);
}

/* ---- backend selection -------------------------------------------------------- */

static void test_backend_selection(void **state) {
    (void)state;
    unsetenv("COMMVQ_BACKEND");
    cvq_backend_kind k;
    assert_int_equal(cvq_backend_from_name("CPU", &k), CVQ_OK);
    assert_int_equal(k, CVQ_BACKEND_CPU);
    assert_int_equal(cvq_backend_from_name("vulkan", &k), CVQ_OK);
    assert_int_equal(k, CVQ_BACKEND_VULKAN);
    assert_int_equal(cvq_backend_from_name("opencl", &k), CVQ_ERR_INVALID_ARGUMENT);

    cvq_context *ctx = cpu_ctx(NULL);
    assert_int_equal(cvq_context_backend(ctx), CVQ_BACKEND_CPU);
    cvq_device_info di;
    assert_int_equal(cvq_context_device(ctx, &di), CVQ_OK);
    assert_int_equal(di.type, CVQ_DEVICE_CPU);
    assert_int_equal(di.exactness, CVQ_EXACT_GUARANTEED);
    assert_true(di.usable);
    cvq_context_free(ctx);

    /* Devices: the CPU first; AUTO picks a GPU only if one is usable and is
     * not a software device, otherwise the CPU. */
    cvq_device_info devs[32];
    size_t n = 0;
    assert_int_equal(cvq_list_devices(devs, 32, &n), CVQ_OK);
    assert_true(n >= 1);
    assert_int_equal(devs[0].backend, CVQ_BACKEND_CPU);
    int gpu_usable = 0;
    for (size_t i = 1; i < n && i < 32; i++)
        if (devs[i].usable && devs[i].type != CVQ_DEVICE_SOFTWARE && devs[i].type != CVQ_DEVICE_CPU)
            gpu_usable = 1;
    assert_int_equal(cvq_context_create(NULL, &ctx), CVQ_OK);
    if (!gpu_usable) assert_int_equal(cvq_context_backend(ctx), CVQ_BACKEND_CPU);
    cvq_device_info got;
    assert_int_equal(cvq_context_device(ctx, &got), CVQ_OK);
    assert_true(got.type != CVQ_DEVICE_SOFTWARE);
    cvq_context_free(ctx);

    /* An absent backend is an error with a message, never a fallback. */
    cvq_backend_kind gpus[] = {CVQ_BACKEND_CUDA, CVQ_BACKEND_VULKAN};
    for (int i = 0; i < 2; i++) {
        cvq_status avail = cvq_backend_available(gpus[i]);
        cvq_context_params p = cvq_context_default_params();
        p.backend = gpus[i];
        ctx = NULL;
        cvq_status st = cvq_context_create(&p, &ctx);
        if (avail != CVQ_OK) {
            assert_true(st == CVQ_ERR_BACKEND_UNAVAILABLE || st == CVQ_ERR_NO_DEVICE);
            assert_null(ctx);
            assert_non_null(strstr(cvq_last_error(), cvq_backend_name(gpus[i])));
        } else {
            assert_int_equal(st, CVQ_OK);
            assert_int_equal(cvq_context_backend(ctx), gpus[i]);
            cvq_context_free(ctx);
        }
    }

    /* The environment variable drives AUTO, and is checked. */
    setenv("COMMVQ_BACKEND", "cpu", 1);
    assert_int_equal(cvq_context_create(NULL, &ctx), CVQ_OK);
    assert_int_equal(cvq_context_backend(ctx), CVQ_BACKEND_CPU);
    cvq_context_free(ctx);
    setenv("COMMVQ_BACKEND", "bogus", 1);
    ctx = NULL;
    assert_int_equal(cvq_context_create(NULL, &ctx), CVQ_ERR_INVALID_ARGUMENT);
    assert_null(ctx);
    assert_non_null(strstr(cvq_last_error(), "COMMVQ_BACKEND"));
    if (cvq_backend_available(CVQ_BACKEND_CUDA) != CVQ_OK) {
        setenv("COMMVQ_BACKEND", "cuda", 1);
        assert_int_not_equal(cvq_context_create(NULL, &ctx), CVQ_OK);
        assert_null(ctx);
    }
    unsetenv("COMMVQ_BACKEND");
    /* A device the CPU backend does not have. */
    cvq_context_params p = cvq_context_default_params();
    p.backend = CVQ_BACKEND_CPU;
    p.device = 3;
    assert_int_equal(cvq_context_create(&p, &ctx), CVQ_ERR_NO_DEVICE);
}

/* ---- the cache's policy ------------------------------------------------------ */

/* Token-by-token rule of the method note (section 5), independent of the
 * library's batched arithmetic. */
typedef struct { size_t sink, comp, win; } sim_state;
static void sim_token(sim_state *s, size_t S, size_t W) {
    if (s->sink < S) { s->sink++; return; }
    if (W == 0) { s->comp++; return; }
    if (s->win == W) { s->comp += W; s->win = 0; }
    s->win++;
}

static void attend_all(cvq_cache *c, const cvq_geometry *g, size_t T, float *out) {
    const size_t nq = 3;
    float *q = malloc(nq * g->n_q_heads * g->head_dim * sizeof(float));
    fill_normal(q, nq * g->n_q_heads * g->head_dim, 99);
    int32_t qp[3] = {(int32_t)T, (int32_t)T + 1, (int32_t)T / 2};
    assert_int_equal(cvq_cache_attend(c, q, qp, nq, 0, out), CVQ_OK);
    free(q);
}

static void test_cache_policy(void **state) {
    (void)state;
    cvq_geometry g = small_geometry();
    cvq_codebook *cb = random_cb(&g, NULL);
    cvq_geometry rg;
    cvq_codebook_geometry(cb, &rg);
    cvq_context *ctx = cpu_ctx(NULL);
    const size_t kvd = (size_t)g.n_kv_heads * g.head_dim, T = 29;
    float *k = malloc(T * kvd * sizeof(float)), *v = malloc(T * kvd * sizeof(float));
    fill_normal(k, T * kvd, 1);
    fill_normal(v, T * kvd, 2);
    int32_t pos[29];
    for (size_t i = 0; i < T; i++) pos[i] = (int32_t)(3 * i + 1); /* gaps are allowed */
    const size_t outn = 3 * (size_t)g.n_q_heads * g.head_dim;
    float *ref = malloc(outn * sizeof(float)), *got = malloc(outn * sizeof(float));
    const uint32_t Ss[] = {0, 3}, Ws[] = {0, 1, 5, 64};
    const size_t chunks[] = {1, 7, 29};
    for (int si = 0; si < 2; si++)
        for (int wi = 0; wi < 4; wi++) {
            int have_ref = 0;
            for (int ci = 0; ci < 3; ci++) {
                cvq_cache_params cp = cvq_cache_default_params();
                cp.layer = 1;
                cp.sinks = Ss[si];
                cp.window = Ws[wi];
                cvq_cache *c = NULL;
                assert_int_equal(cvq_cache_create(ctx, cb, &cp, &c), CVQ_OK);
                sim_state s = {0, 0, 0};
                for (size_t at = 0; at < T; at += chunks[ci]) {
                    size_t n = T - at < chunks[ci] ? T - at : chunks[ci];
                    assert_int_equal(cvq_cache_append(c, k + at * kvd, v + at * kvd, CVQ_F32, pos + at, n), CVQ_OK);
                    for (size_t i = 0; i < n; i++) sim_token(&s, Ss[si], Ws[wi]);
                    cvq_cache_stats st;
                    assert_int_equal(cvq_cache_stats_get(c, &st), CVQ_OK);
                    if (st.n_sink != s.sink || st.n_compressed != s.comp || st.n_window != s.win)
                        fail_msg("S=%u W=%u chunk=%zu after %zu tokens: got sink/comp/win %llu/%llu/%llu, "
                                 "rule says %zu/%zu/%zu", Ss[si], Ws[wi], chunks[ci], at + n,
                                 (unsigned long long)st.n_sink, (unsigned long long)st.n_compressed,
                                 (unsigned long long)st.n_window, s.sink, s.comp, s.win);
                    assert_int_equal(st.n_tokens, at + n);
                }
                /* Chunking must not change anything: attention bit-identical. */
                attend_all(c, &rg, (size_t)pos[T - 1], have_ref ? got : ref);
                if (have_ref) assert_memory_equal(ref, got, outn * sizeof(float));
                have_ref = 1;
                cvq_cache_stats st;
                cvq_cache_stats_get(c, &st);
                cvq_record_layout rl;
                assert_int_equal(cvq_record_layout_of(&rg, &rl), CVQ_OK);
                assert_int_equal(st.bytes_compressed, st.n_compressed * rl.bytes_per_token);
                assert_int_equal(st.bytes_full, (st.n_sink + st.n_window) * 2 * kvd * sizeof(float));
                assert_true(st.bytes_allocated >= st.bytes_compressed + st.bytes_full);
                cvq_cache_free(c);
            }
        }
    free(ref);
    free(got);
    free(k);
    free(v);
    cvq_context_free(ctx);
    cvq_codebook_free(cb);
}

/* A failing append leaves the cache exactly as it was. */
static void test_cache_all_or_nothing(void **state) {
    (void)state;
    cvq_geometry g = small_geometry();
    cvq_codebook *cb = random_cb(&g, NULL);
    cvq_geometry rg;
    cvq_codebook_geometry(cb, &rg);
    cvq_context *ctx = cpu_ctx(NULL);
    const size_t kvd = (size_t)g.n_kv_heads * g.head_dim, T = 12;
    float *k = malloc(2 * T * kvd * sizeof(float)), *v = malloc(2 * T * kvd * sizeof(float));
    fill_normal(k, 2 * T * kvd, 3);
    fill_normal(v, 2 * T * kvd, 4);
    int32_t pos[24];
    for (int i = 0; i < 24; i++) pos[i] = i;
    cvq_cache_params cp = cvq_cache_default_params();
    cp.window = 4;
    cp.sinks = 2;
    cvq_cache *c = NULL;
    assert_int_equal(cvq_cache_create(ctx, cb, &cp, &c), CVQ_OK);
    assert_int_equal(cvq_cache_append(c, k, v, CVQ_F32, pos, T), CVQ_OK);
    const size_t outn = 3 * (size_t)rg.n_q_heads * rg.head_dim;
    float *before = malloc(outn * sizeof(float)), *after = malloc(outn * sizeof(float));
    attend_all(c, &rg, 30, before);
    cvq_cache_stats s0, s1;
    cvq_cache_stats_get(c, &s0);

    /* NaN in the last key of a batch that would flush the window. */
    float saved = k[(2 * T - 1) * kvd + 5];
    k[(2 * T - 1) * kvd + 5] = NAN;
    assert_int_equal(cvq_cache_append(c, k + T * kvd, v + T * kvd, CVQ_F32, pos + T, T), CVQ_ERR_NONFINITE_INPUT);
    k[(2 * T - 1) * kvd + 5] = saved;
    /* Inf in a value. */
    v[T * kvd] = INFINITY;
    assert_int_equal(cvq_cache_append(c, k + T * kvd, v + T * kvd, CVQ_F32, pos + T, T), CVQ_ERR_NONFINITE_INPUT);
    v[T * kvd] = 0.5f;
    /* A key whose sum of squares overflows binary32. */
    saved = k[T * kvd];
    k[T * kvd] = 3e30f;
    assert_int_equal(cvq_cache_append(c, k + T * kvd, v + T * kvd, CVQ_F32, pos + T, T), CVQ_ERR_INPUT_RANGE);
    k[T * kvd] = saved;
    /* Positions repeated, decreasing, negative. */
    assert_int_equal(cvq_cache_append(c, k + T * kvd, v + T * kvd, CVQ_F32, pos + T - 1, T), CVQ_ERR_POSITION);
    int32_t bad[12];
    for (int i = 0; i < 12; i++) bad[i] = 100 - i;
    assert_int_equal(cvq_cache_append(c, k + T * kvd, v + T * kvd, CVQ_F32, bad, T), CVQ_ERR_POSITION);
    assert_int_equal(cvq_cache_append(c, k, v, (cvq_dtype)7, pos + T, 1), CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_cache_append(c, NULL, v, CVQ_F32, pos + T, 1), CVQ_ERR_NULL_POINTER);

    cvq_cache_stats_get(c, &s1);
    assert_memory_equal(&s0, &s1, sizeof s0);
    attend_all(c, &rg, 30, after);
    assert_memory_equal(before, after, outn * sizeof(float));

    /* Queries: non-finite and negative positions are refused, out untouched. */
    float *q = calloc(outn, sizeof(float));
    q[7] = NAN;
    int32_t qp[3] = {1, 2, 3};
    memset(after, 0x5a, outn * sizeof(float));
    assert_int_equal(cvq_cache_attend(c, q, qp, 3, 0, after), CVQ_ERR_NONFINITE_INPUT);
    q[7] = 0.0f;
    qp[1] = -1;
    assert_int_equal(cvq_cache_attend(c, q, qp, 3, 0, after), CVQ_ERR_POSITION);
    assert_int_equal(cvq_cache_attend(c, q, qp, 3, 0x80, after), CVQ_ERR_INVALID_ARGUMENT);
    for (size_t i = 0; i < outn * sizeof(float); i++) assert_int_equal(((unsigned char *)after)[i], 0x5a);
    free(q);

    /* clear: empty again; a query that sees nothing gets zeros. */
    assert_int_equal(cvq_cache_clear(c), CVQ_OK);
    cvq_cache_stats_get(c, &s1);
    assert_int_equal(s1.n_tokens, 0);
    attend_all(c, &rg, 30, after);
    for (size_t i = 0; i < outn; i++) assert_true(after[i] == 0.0f);

    cvq_cache_free(c);
    free(before);
    free(after);
    free(k);
    free(v);
    cvq_context_free(ctx);
    cvq_codebook_free(cb);
}

/* ---- allocation failure injection ----------------------------------------------- */

typedef struct {
    long n_alloc, n_free, fail_at; /* fail the fail_at-th allocation (1-based), 0 = never */
} counting;

static void *cnt_alloc(void *user, size_t size, size_t align) {
    counting *c = user;
    c->n_alloc++;
    if (c->fail_at && c->n_alloc == c->fail_at) {
        c->n_alloc--; /* not handed out */
        c->fail_at = -1;
        return NULL;
    }
    void *p = NULL;
    if (posix_memalign(&p, align < sizeof(void *) ? sizeof(void *) : align, size)) return NULL;
    return p;
}
static void cnt_free(void *user, void *p) {
    counting *c = user;
    c->n_free++;
    free(p);
}

/* A whole session: context, codebook, cache, appends that compress, attend,
 * encode and decode. Returns the first failing status. */
static cvq_status session(const cvq_allocator *a) {
    cvq_geometry g = small_geometry();
    cvq_status st = cvq_geometry_resolve(&g);
    double theta[32];
    if (!st) st = cvq_rope_freqs_default(g.head_dim, 10000.0, theta);
    cvq_context *ctx = NULL;
    cvq_codebook *cb = NULL;
    cvq_cache *c = NULL;
    cvq_context_params p = cvq_context_default_params();
    p.backend = CVQ_BACKEND_CPU;
    p.allocator = a;
    enum { T = 20 };
    const size_t kvd = (size_t)g.n_kv_heads * g.head_dim;
    static float k[T * 128], v[T * 128], q[2 * 4 * 64], out[2 * 4 * 64], dec[T * 128];
    static uint16_t codes[T * 2 * 3];
    static float scales[T], sig[T * 2];
    static uint8_t bits[T * 2 * 8];
    fill_normal(k, T * kvd, 5);
    fill_normal(v, T * kvd, 6);
    fill_normal(q, sizeof q / sizeof q[0], 8);
    int32_t pos[T], qp[2] = {T, T + 1};
    for (int i = 0; i < T; i++) pos[i] = i;
    if (!st) st = cvq_context_create(&p, &ctx);
    if (!st) st = cvq_codebook_random(&g, theta, 3, a, &cb);
    cvq_cache_params cp = cvq_cache_default_params();
    cp.window = 4;
    cp.sinks = 1;
    if (!st) st = cvq_cache_create(ctx, cb, &cp, &c);
    if (!st) st = cvq_cache_append(c, k, v, CVQ_F32, pos, 9);
    if (!st) st = cvq_cache_append(c, k + 9 * kvd, v + 9 * kvd, CVQ_F32, pos + 9, T - 9);
    if (!st) st = cvq_cache_attend(c, q, qp, 2, 0, out);
    if (!st) st = cvq_encode_keys(ctx, cb, 0, k, CVQ_F32, T, codes, scales);
    if (!st) st = cvq_encode_values(ctx, cb, 0, v, CVQ_F32, T, bits, sig);
    if (!st) st = cvq_decode_keys(ctx, cb, 0, codes, scales, T, dec);
    if (!st) st = cvq_decode_values(ctx, cb, 0, bits, sig, T, dec);
    cvq_cache_free(c);
    cvq_codebook_free(cb);
    cvq_context_free(ctx);
    return st;
}

static void test_alloc_failures(void **state) {
    (void)state;
    counting cnt = {0, 0, 0};
    cvq_allocator a = {cnt_alloc, cnt_free, &cnt};
    assert_int_equal(session(&a), CVQ_OK);
    const long total = cnt.n_alloc;
    assert_true(total > 5);
    assert_int_equal(cnt.n_alloc, cnt.n_free);
    long failures = 0;
    for (long n = 1; n <= total; n++) {
        cnt.n_alloc = cnt.n_free = 0;
        cnt.fail_at = n;
        cvq_status st = session(&a);
        if (st != CVQ_OK) {
            failures++;
            if (st != CVQ_ERR_OUT_OF_MEMORY)
                fail_msg("failing allocation %ld gave %s (%s)", n, cvq_status_name(st), cvq_last_error());
        }
        if (cnt.n_alloc != cnt.n_free)
            fail_msg("failing allocation %ld: %ld allocations, %ld frees (leak)", n, cnt.n_alloc, cnt.n_free);
    }
    print_message("allocation failure injection: %ld allocations in a session, %ld injected failures "
                  "all reported as CVQ_ERR_OUT_OF_MEMORY without leaks\n", total, failures);
    assert_true(failures > 0);
}

/* ---- argument checks of the stateless entry points -------------------------------- */

static void test_encode_arguments(void **state) {
    (void)state;
    cvq_geometry g = small_geometry();
    cvq_codebook *cb = random_cb(&g, NULL);
    cvq_context *ctx = cpu_ctx(NULL);
    float k[2 * 128];
    fill_normal(k, 256, 11);
    uint16_t codes[2 * 2 * 3];
    float sc[2];
    assert_int_equal(cvq_encode_keys(ctx, cb, 2, k, CVQ_F32, 2, codes, sc), CVQ_ERR_LAYER_RANGE);
    assert_non_null(strstr(cvq_context_last_error(ctx), "layer 2"));
    assert_int_equal(cvq_encode_keys(NULL, cb, 0, k, CVQ_F32, 2, codes, sc), CVQ_ERR_NULL_POINTER);
    assert_int_equal(cvq_encode_keys(ctx, NULL, 0, k, CVQ_F32, 2, codes, sc), CVQ_ERR_NULL_POINTER);
    assert_int_equal(cvq_encode_keys(ctx, cb, 0, k, CVQ_F32, 2, NULL, sc), CVQ_ERR_NULL_POINTER);
    assert_int_equal(cvq_encode_keys(ctx, cb, 0, k, CVQ_F32, SIZE_MAX / 8, codes, sc), CVQ_ERR_SIZE_OVERFLOW);
    /* NaN: nothing written. */
    memset(codes, 0xAB, sizeof codes);
    memset(sc, 0xAB, sizeof sc);
    k[200] = NAN;
    assert_int_equal(cvq_encode_keys(ctx, cb, 0, k, CVQ_F32, 2, codes, sc), CVQ_ERR_NONFINITE_INPUT);
    for (size_t i = 0; i < sizeof codes; i++) assert_int_equal(((unsigned char *)codes)[i], 0xAB);
    for (size_t i = 0; i < sizeof sc; i++) assert_int_equal(((unsigned char *)sc)[i], 0xAB);
    assert_non_null(strstr(cvq_last_error(), "token 1"));
    /* Zero key: scale 0, codes 0. */
    memset(k, 0, sizeof k);
    assert_int_equal(cvq_encode_keys(ctx, cb, 0, k, CVQ_F32, 2, codes, sc), CVQ_OK);
    for (size_t i = 0; i < 12; i++) assert_int_equal(codes[i], 0);
    assert_true(sc[0] == 0.0f && sc[1] == 0.0f);
    /* f16 and bf16 inputs equal their exact f32 conversions. */
    uint16_t h[256];
    float hf[256];
    fill_normal(k, 256, 12);
    for (int i = 0; i < 256; i++) {
        h[i] = cvq_f32_to_f16(k[i]);
        hf[i] = cvq_f16_to_f32(h[i]);
    }
    uint16_t c16[12], c32[12];
    float s16[2], s32[2];
    assert_int_equal(cvq_encode_keys(ctx, cb, 0, h, CVQ_F16, 2, c16, s16), CVQ_OK);
    assert_int_equal(cvq_encode_keys(ctx, cb, 0, hf, CVQ_F32, 2, c32, s32), CVQ_OK);
    assert_memory_equal(c16, c32, sizeof c16);
    assert_memory_equal(s16, s32, sizeof s16);
    for (int i = 0; i < 256; i++) {
        uint32_t u;
        memcpy(&u, &k[i], 4);
        h[i] = (uint16_t)(u >> 16); /* truncation is a valid bf16 */
        hf[i] = cvq_bf16_to_f32(h[i]);
        uint32_t w = (uint32_t)h[i] << 16;
        float exact;
        memcpy(&exact, &w, 4);
        assert_true(hf[i] == exact);
    }
    assert_int_equal(cvq_encode_keys(ctx, cb, 0, h, CVQ_BF16, 2, c16, s16), CVQ_OK);
    assert_int_equal(cvq_encode_keys(ctx, cb, 0, hf, CVQ_F32, 2, c32, s32), CVQ_OK);
    assert_memory_equal(c16, c32, sizeof c16);
    /* Decoding refuses codes >= 4096. */
    float dec[256];
    c32[3] = 4096;
    assert_int_equal(cvq_decode_keys(ctx, cb, 0, c32, s32, 2, dec), CVQ_ERR_INVALID_ARGUMENT);
    cvq_context_free(ctx);
    cvq_codebook_free(cb);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_status_names),
        cmocka_unit_test(test_free_null),
        cmocka_unit_test(test_backend_selection),
        cmocka_unit_test(test_cache_policy),
        cmocka_unit_test(test_cache_all_or_nothing),
        cmocka_unit_test(test_encode_arguments),
        cmocka_unit_test(test_alloc_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
