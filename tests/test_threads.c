/*
 * Concurrency rules of docs/threading.md, checked:
 *  - contexts are independent: N threads, each with its own context and
 *    cache, encode, append and attend at the same time over ONE shared
 *    (committed) codebook and get exactly the bytes of a serial run;
 *  - the last-error message is per thread: a thread's own failure message
 *    is not overwritten by other threads' failures.
 * Built normally this checks results; built with -fsanitize=thread
 * (scripts/sanitize.sh thread) it also checks for data races.
 * COMMVQ_TEST_THREADS_BACKEND=vulkan runs the workers on Vulkan contexts.
 */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commvq.h"

enum { N_WORKERS = 4, T = 40, NQ = 2 };

typedef struct worker {
    const cvq_codebook *cb;
    cvq_geometry g;
    uint64_t seed;
    int index;
    /* results */
    cvq_status st;
    char where[160];
    uint16_t *codes;
    float *scales;
    uint8_t *bits;
    float *sigma;
    float *out;
    int error_message_ok;
    pthread_barrier_t *barrier; /* NULL in the serial run */
} worker;

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static void fill(float *x, size_t n, uint64_t seed) {
    uint64_t s = seed;
    for (size_t i = 0; i < n; i++) x[i] = (float)((double)(splitmix(&s) >> 11) * 0x1p-53 * 2.0 - 1.0);
}

static cvq_geometry geometry(void) {
    cvq_geometry g;
    memset(&g, 0, sizeof g);
    g.n_layers = 2;
    g.n_q_heads = 4;
    g.n_kv_heads = 2;
    g.head_dim = 64;
    g.key_stages = 3;
    g.value_group_width = 64;
    g.value_bits = 32;
    g.value_hidden = 32;
    return g;
}

static cvq_backend_kind worker_backend(void) {
    const char *b = getenv("COMMVQ_TEST_THREADS_BACKEND");
    cvq_backend_kind k = CVQ_BACKEND_CPU;
    if (b && b[0] && cvq_backend_from_name(b, &k) != CVQ_OK) k = CVQ_BACKEND_CPU;
    return k;
}

#define STEP(call)                                                         \
    do {                                                                   \
        w->st = (call);                                                    \
        if (w->st != CVQ_OK) {                                             \
            snprintf(w->where, sizeof w->where, "%s: %s", #call, cvq_last_error()); \
            goto done;                                                     \
        }                                                                  \
    } while (0)

/* One worker's whole session: its own context and cache, the shared
 * codebook read-only. */
static void *run_worker(void *arg) {
    worker *w = arg;
    const cvq_geometry *g = &w->g;
    const size_t kvd = (size_t)g->n_kv_heads * g->head_dim;
    const size_t qd = (size_t)g->n_q_heads * g->head_dim;
    cvq_record_layout rl;
    cvq_context *ctx = NULL;
    cvq_cache *cache = NULL;
    float *k = malloc(T * kvd * sizeof(float));
    float *v = malloc(T * kvd * sizeof(float));
    float *q = malloc(NQ * qd * sizeof(float));
    int32_t pos[T], qp[NQ] = {T - 1, T + 3};
    int waited = 0; /* a failing worker still meets the others at the barrier */
    w->st = CVQ_ERR_OUT_OF_MEMORY;
    if (!k || !v || !q) goto done;
    fill(k, T * kvd, w->seed);
    fill(v, T * kvd, w->seed + 1);
    fill(q, NQ * qd, w->seed + 2);
    for (int i = 0; i < T; i++) pos[i] = 2 * i;

    cvq_context_params cp = cvq_context_default_params();
    cp.backend = worker_backend();
    cp.device = -1;
    cp.n_threads = 1;
    STEP(cvq_context_create(&cp, &ctx));
    STEP(cvq_record_layout_of(g, &rl));
    uint32_t layer = (uint32_t)(w->index % 2);
    STEP(cvq_encode_keys(ctx, w->cb, layer, k, CVQ_F32, T, w->codes, w->scales));
    STEP(cvq_encode_values(ctx, w->cb, layer, v, CVQ_F32, T, w->bits, w->sigma));
    cvq_cache_params pp = cvq_cache_default_params();
    pp.layer = layer;
    pp.window = 8;
    pp.sinks = 2;
    STEP(cvq_cache_create(ctx, w->cb, &pp, &cache));
    STEP(cvq_cache_append(cache, k, v, CVQ_F32, pos, T / 2));
    STEP(cvq_cache_append(cache, k + (T / 2) * kvd, v + (T / 2) * kvd, CVQ_F32, pos + T / 2, T - T / 2));
    STEP(cvq_cache_attend(cache, q, qp, NQ, 0, w->out));

    /* Per-thread messages: provoke an error naming this worker's own bad
     * layer, let the others do the same, then read it back. */
    {
        uint32_t bad = 100u + (uint32_t)w->index;
        cvq_status e = cvq_encode_keys(ctx, w->cb, bad, k, CVQ_F32, 1, w->codes, w->scales);
        char want[32];
        snprintf(want, sizeof want, "layer %u", bad);
        /* every worker has failed (with its own message) before any reads */
        if (w->barrier) pthread_barrier_wait(w->barrier);
        waited = 1;
        w->error_message_ok = (e == CVQ_ERR_LAYER_RANGE) && strstr(cvq_last_error(), want) != NULL;
    }
    w->st = CVQ_OK;
done:
    if (w->barrier && !waited) pthread_barrier_wait(w->barrier);
    cvq_cache_free(cache);
    cvq_context_free(ctx);
    free(k);
    free(v);
    free(q);
    return NULL;
}

static int alloc_worker(worker *w, const cvq_codebook *cb, const cvq_geometry *g, int i) {
    cvq_record_layout rl;
    if (cvq_record_layout_of(g, &rl) != CVQ_OK) return 0;
    memset(w, 0, sizeof *w);
    w->cb = cb;
    w->g = *g;
    w->index = i;
    w->seed = 1000u + 17u * (uint64_t)i;
    w->codes = calloc((size_t)T * g->n_kv_heads * g->key_stages, sizeof(uint16_t));
    w->scales = calloc((size_t)T * g->n_kv_heads, sizeof(float));
    w->bits = calloc((size_t)T * rl.value_bit_bytes, 1);
    w->sigma = calloc((size_t)T * rl.value_groups, sizeof(float));
    w->out = calloc((size_t)NQ * g->n_q_heads * g->head_dim, sizeof(float));
    return w->codes && w->scales && w->bits && w->sigma && w->out;
}

static void free_worker(worker *w) {
    free(w->codes);
    free(w->scales);
    free(w->bits);
    free(w->sigma);
    free(w->out);
}

static void test_independent_contexts(void **state) {
    (void)state;
    cvq_geometry g = geometry();
    double theta[64];
    assert_int_equal(cvq_rope_freqs_default(g.head_dim, 10000.0, theta), CVQ_OK);
    cvq_codebook *cb = NULL;
    assert_int_equal(cvq_codebook_random(&g, theta, 77, NULL, &cb), CVQ_OK);
    assert_int_equal(cvq_codebook_commit(cb), CVQ_OK); /* shared read-only from here */
    assert_int_equal(cvq_geometry_resolve(&g), CVQ_OK);
    cvq_record_layout rl;
    assert_int_equal(cvq_record_layout_of(&g, &rl), CVQ_OK);

    worker serial[N_WORKERS], par[N_WORKERS];
    for (int i = 0; i < N_WORKERS; i++) {
        assert_true(alloc_worker(&serial[i], cb, &g, i));
        assert_true(alloc_worker(&par[i], cb, &g, i));
    }
    for (int i = 0; i < N_WORKERS; i++) {
        run_worker(&serial[i]);
        if (serial[i].st == CVQ_ERR_BACKEND_UNAVAILABLE || serial[i].st == CVQ_ERR_NO_DEVICE) {
            print_message("[threads] skip: backend %s: %s\n", cvq_backend_name(worker_backend()),
                          serial[i].where);
            for (int j = 0; j < N_WORKERS; j++) {
                free_worker(&serial[j]);
                free_worker(&par[j]);
            }
            cvq_codebook_free(cb);
            skip();
        }
        if (serial[i].st != CVQ_OK) fail_msg("serial worker %d: %s", i, serial[i].where);
    }
    pthread_t th[N_WORKERS];
    pthread_barrier_t barrier;
    assert_int_equal(pthread_barrier_init(&barrier, NULL, N_WORKERS), 0);
    for (int i = 0; i < N_WORKERS; i++) par[i].barrier = &barrier;
    for (int i = 0; i < N_WORKERS; i++) assert_int_equal(pthread_create(&th[i], NULL, run_worker, &par[i]), 0);
    for (int i = 0; i < N_WORKERS; i++) assert_int_equal(pthread_join(th[i], NULL), 0);
    pthread_barrier_destroy(&barrier);

    const size_t n_codes = (size_t)T * g.n_kv_heads * g.key_stages;
    const size_t n_scales = (size_t)T * rl.key_scale_count;
    for (int i = 0; i < N_WORKERS; i++) {
        if (par[i].st != CVQ_OK) fail_msg("worker %d (seed %llu): %s", i, (unsigned long long)par[i].seed, par[i].where);
        if (memcmp(serial[i].codes, par[i].codes, n_codes * sizeof(uint16_t)) ||
            memcmp(serial[i].scales, par[i].scales, n_scales * sizeof(float)) ||
            memcmp(serial[i].bits, par[i].bits, (size_t)T * rl.value_bit_bytes) ||
            memcmp(serial[i].sigma, par[i].sigma, (size_t)T * rl.value_groups * sizeof(float)))
            fail_msg("worker %d (seed %llu): codes differ from the serial run", i,
                     (unsigned long long)par[i].seed);
        if (memcmp(serial[i].out, par[i].out, (size_t)NQ * g.n_q_heads * g.head_dim * sizeof(float)))
            fail_msg("worker %d (seed %llu): attention differs from the serial run", i,
                     (unsigned long long)par[i].seed);
        if (!par[i].error_message_ok) fail_msg("worker %d: its last-error message was not its own", i);
        /* the workers really differ from one another (else equality proves little) */
        if (i > 0) assert_memory_not_equal(par[i].codes, par[0].codes, n_codes * sizeof(uint16_t));
    }
    print_message("[threads] %d concurrent %s contexts over one codebook: results identical to the "
                  "serial run\n", N_WORKERS, cvq_backend_name(worker_backend()));
    for (int i = 0; i < N_WORKERS; i++) {
        free_worker(&serial[i]);
        free_worker(&par[i]);
    }
    cvq_codebook_free(cb);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_independent_contexts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
