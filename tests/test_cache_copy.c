/*
 * cvq_cache_copy: forking a cache.
 *
 * The independent check throughout is a third cache that received the whole
 * token sequence directly: a fork of a cache after n0 tokens that then gets
 * the remaining tokens must attend bit-identically to it (codes are bit-exact
 * per token whatever the block, so the direct cache holds the same bytes).
 * A copy must also be independent of its source in both directions, keep the
 * order state (a position not after the source's last is refused), and fail
 * cleanly at every allocation. Run on every backend present: CPU reference,
 * CPU fast, and Vulkan both with mapped buffers and in staging mode
 * (COMMVQ_VK_STAGING=1: device-local buffers, so the copy goes through the
 * host bounce); Vulkan cases skip visibly when no Vulkan device is usable.
 */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "commvq.h"

/* ---- data ---------------------------------------------------------------------------------- */

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

#define CHECK_OK(call)                                                                              \
    do {                                                                                            \
        cvq_status st_ = (call);                                                                    \
        if (st_ != CVQ_OK) fail_msg("%s -> %s: %s", #call, cvq_status_name(st_), cvq_last_error()); \
    } while (0)

/* Geometry: Hq 4, Hkv 2, d 64, R 3, 64 value bits per head group. */
static cvq_geometry small_geometry(void) {
    cvq_geometry g;
    memset(&g, 0, sizeof g);
    g.n_layers = 2;
    g.n_q_heads = 4;
    g.n_kv_heads = 2;
    g.head_dim = 64;
    g.key_stages = 3;
    g.value_bits = 64;
    g.value_group_width = 64;
    CHECK_OK(cvq_geometry_resolve(&g));
    return g;
}

static const uint64_t CB_SEED = 11;

static cvq_codebook *random_cb(const cvq_geometry *g, const cvq_allocator *a) {
    double theta[64];
    CHECK_OK(cvq_rope_freqs_default(g->head_dim, 10000.0, theta));
    cvq_codebook *cb = NULL;
    CHECK_OK(cvq_codebook_random(g, theta, CB_SEED, a, &cb));
    return cb;
}

/* One token sequence: keys/values [T][Hkv][d], positions with gaps (3t+1),
 * and NQ queries at positions that see all, part, or none of it. */
enum { T = 100, NQ = 5 };
typedef struct {
    cvq_geometry g;
    size_t kvd, per_q;
    uint64_t seed;
    float *k, *v, *k2, *v2; /* k2/v2: a second, different continuation */
    float *q;
    int32_t pos[T], qpos[NQ];
} seq;

static void seq_make(seq *s, uint64_t seed) {
    s->g = small_geometry();
    s->kvd = (size_t)s->g.n_kv_heads * s->g.head_dim;
    s->per_q = (size_t)s->g.n_q_heads * s->g.head_dim;
    s->seed = seed;
    s->k = malloc(T * s->kvd * sizeof(float));
    s->v = malloc(T * s->kvd * sizeof(float));
    s->k2 = malloc(T * s->kvd * sizeof(float));
    s->v2 = malloc(T * s->kvd * sizeof(float));
    s->q = malloc(NQ * s->per_q * sizeof(float));
    assert_non_null(s->k);
    assert_non_null(s->v);
    assert_non_null(s->k2);
    assert_non_null(s->v2);
    assert_non_null(s->q);
    fill_normal(s->k, T * s->kvd, seed);
    fill_normal(s->v, T * s->kvd, seed + 1);
    fill_normal(s->k2, T * s->kvd, seed + 2);
    fill_normal(s->v2, T * s->kvd, seed + 3);
    fill_normal(s->q, NQ * s->per_q, seed + 4);
    for (int t = 0; t < T; t++) s->pos[t] = 3 * t + 1;
    const int32_t last = s->pos[T - 1];
    const int32_t qp[NQ] = {last + 5, last, s->pos[T / 2], s->pos[3], 0};
    memcpy(s->qpos, qp, sizeof qp);
}

static void seq_free(seq *s) {
    free(s->k);
    free(s->v);
    free(s->k2);
    free(s->v2);
    free(s->q);
}

/* Appends tokens [from, to) of the sequence (alt: the second continuation's
 * keys and values) in chunks of `chunk`. */
static void feed(cvq_cache *c, const seq *s, size_t from, size_t to, size_t chunk, bool alt) {
    const float *k = alt ? s->k2 : s->k, *v = alt ? s->v2 : s->v;
    for (size_t at = from; at < to; at += chunk) {
        size_t n = to - at < chunk ? to - at : chunk;
        CHECK_OK(cvq_cache_append(c, k + at * s->kvd, v + at * s->kvd, CVQ_F32, s->pos + at, n));
    }
}

static void attend(cvq_cache *c, const seq *s, float *out) {
    CHECK_OK(cvq_cache_attend(c, s->q, s->qpos, NQ, 0, out));
}

static cvq_cache_stats stats_of(const cvq_cache *c) {
    cvq_cache_stats st;
    CHECK_OK(cvq_cache_stats_get(c, &st));
    return st;
}

/* ---- backends ------------------------------------------------------------------------------ */

typedef struct {
    const char *name;
    cvq_backend_kind kind;
    int cpu_reference;
    bool staging; /* Vulkan with COMMVQ_VK_STAGING=1 */
} backend_case;

static backend_case k_cases[] = {
    {"cpu-reference", CVQ_BACKEND_CPU, 1, false},
    {"cpu-fast", CVQ_BACKEND_CPU, 0, false},
    {"vulkan-mapped", CVQ_BACKEND_VULKAN, 0, false},
    {"vulkan-staging", CVQ_BACKEND_VULKAN, 0, true},
};

static bool g_vulkan_ok;
static char g_vulkan_why[512];

/* NULL (after a visible skip) when the case's backend is not usable here. */
static cvq_context *case_ctx(const backend_case *bc, const cvq_allocator *a) {
    if (bc->kind == CVQ_BACKEND_VULKAN && !g_vulkan_ok) {
        printf("skip %s: %s\n", bc->name, g_vulkan_why);
        return NULL;
    }
    cvq_context_params p = cvq_context_default_params();
    p.backend = bc->kind;
    p.cpu_reference = bc->cpu_reference;
    p.allocator = a;
    if (bc->staging) setenv("COMMVQ_VK_STAGING", "1", 1);
    cvq_context *ctx = NULL;
    cvq_status st = cvq_context_create(&p, &ctx);
    if (bc->staging) unsetenv("COMMVQ_VK_STAGING");
    if (st) fail_msg("%s: context: %s: %s", bc->name, cvq_status_name(st), cvq_last_error());
    if (bc->staging) {
        /* Make sure the mode is what the case says: device buffers with no
         * host pointer, so the copy takes the bounce path. */
        cvq_buffer b;
        CHECK_OK(cvq__buffer_alloc(ctx, 16, &b));
        if (b.host) fail_msg("%s: buffers are host-visible, the bounce path is not exercised", bc->name);
        cvq__buffer_free(ctx, &b);
    }
    return ctx;
}

static cvq_cache *make_cache(cvq_context *ctx, const cvq_codebook *cb, uint32_t sinks, uint32_t window) {
    cvq_cache_params cp = cvq_cache_default_params();
    cp.layer = 1;
    cp.sinks = sinks;
    cp.window = window;
    cvq_cache *c = NULL;
    CHECK_OK(cvq_cache_create(ctx, cb, &cp, &c));
    return c;
}

/* Bit-identical outputs, or a failure naming where and with which seed. */
static void same_out(const float *a, const float *b, size_t n, const char *what, const backend_case *bc,
                     const seq *s, uint32_t S, uint32_t W, size_t n0) {
    for (size_t i = 0; i < n; i++) {
        uint32_t ua, ub;
        memcpy(&ua, &a[i], 4);
        memcpy(&ub, &b[i], 4);
        if (ua != ub)
            fail_msg("%s: %s (S=%u W=%u prefix %zu, seed %llu): element %zu (query %zu) %.9g vs %.9g",
                     bc->name, what, S, W, n0, (unsigned long long)s->seed, i, i / s->per_q,
                     (double)a[i], (double)b[i]);
    }
}

static void same_counts(const cvq_cache_stats *a, const cvq_cache_stats *b, const char *what,
                        const backend_case *bc, uint32_t S, uint32_t W, size_t n0) {
    if (a->n_tokens != b->n_tokens || a->n_sink != b->n_sink || a->n_compressed != b->n_compressed ||
        a->n_window != b->n_window || a->bytes_compressed != b->bytes_compressed ||
        a->bytes_full != b->bytes_full || a->bits_per_element != b->bits_per_element)
        fail_msg("%s: %s (S=%u W=%u prefix %zu): tokens/sink/comp/win %llu/%llu/%llu/%llu vs "
                 "%llu/%llu/%llu/%llu", bc->name, what, S, W, n0, (unsigned long long)a->n_tokens,
                 (unsigned long long)a->n_sink, (unsigned long long)a->n_compressed,
                 (unsigned long long)a->n_window, (unsigned long long)b->n_tokens,
                 (unsigned long long)b->n_sink, (unsigned long long)b->n_compressed,
                 (unsigned long long)b->n_window);
}

/* ---- tests --------------------------------------------------------------------------------- */

/* A fork after n0 tokens, then the same further tokens to source and fork:
 * both attend bit-identically to a cache fed the whole sequence directly.
 * The prefixes cover the empty cache, sinks only, window only (no
 * compressed record yet), and records + window; W = 0 compresses every
 * token. The suffix is long enough to grow the compressed arrays past their
 * first capacity (64 tokens) after the fork. */
static void test_fork_matches_direct(void **state) {
    const backend_case *bc = *state;
    cvq_context *ctx = case_ctx(bc, NULL);
    if (!ctx) skip();
    seq s;
    seq_make(&s, 101);
    cvq_codebook *cb = random_cb(&s.g, NULL);
    const size_t outn = NQ * s.per_q;
    float *oa = malloc(outn * sizeof(float)), *ob = malloc(outn * sizeof(float));
    float *od = malloc(outn * sizeof(float));
    assert_true(oa && ob && od);
    const uint32_t cfg[][2] = {{2, 8}, {0, 8}, {0, 0}, {3, 1}}; /* {S, W} */
    const size_t prefixes[] = {0, 2, 7, 21, 77};
    size_t with_records = 0;
    for (size_t ci = 0; ci < sizeof cfg / sizeof cfg[0]; ci++) {
        const uint32_t S = cfg[ci][0], W = cfg[ci][1];
        /* The independent reference: the whole sequence at once. */
        cvq_cache *d = make_cache(ctx, cb, S, W);
        feed(d, &s, 0, T, T, false);
        attend(d, &s, od);
        const cvq_cache_stats sd = stats_of(d);
        for (size_t pi = 0; pi < sizeof prefixes / sizeof prefixes[0]; pi++) {
            const size_t n0 = prefixes[pi];
            cvq_cache *a = make_cache(ctx, cb, S, W);
            feed(a, &s, 0, n0, 5, false);
            cvq_cache *b = (cvq_cache *)0x1; /* must be overwritten */
            CHECK_OK(cvq_cache_copy(a, &b));
            assert_non_null(b);
            assert_ptr_not_equal(a, b);
            /* Right after the fork: the same state, statistics included
             * (same capacity), and the same attention. */
            const cvq_cache_stats s0a = stats_of(a), s0b = stats_of(b);
            if (memcmp(&s0a, &s0b, sizeof s0a) != 0) fail_msg("%s: stats differ after the copy", bc->name);
            assert_int_equal(s0b.n_tokens, n0);
            assert_true(s0b.bytes_allocated >= s0b.bytes_compressed + s0b.bytes_full);
            if (s0b.n_compressed) with_records++;
            attend(a, &s, oa);
            attend(b, &s, ob);
            same_out(oa, ob, outn, "source vs copy right after the fork", bc, &s, S, W, n0);
            /* The order state travels: a position not after the last one is refused. */
            if (n0) {
                assert_int_equal(cvq_cache_append(b, s.k, s.v, CVQ_F32, s.pos + n0 - 1, 1), CVQ_ERR_POSITION);
            }
            /* The same continuation to both, in different chunkings. */
            feed(a, &s, n0, T, 13, false);
            feed(b, &s, n0, T, 6, false);
            attend(a, &s, oa);
            attend(b, &s, ob);
            same_out(ob, od, outn, "fork vs the whole sequence fed directly", bc, &s, S, W, n0);
            same_out(oa, od, outn, "source vs the whole sequence fed directly", bc, &s, S, W, n0);
            const cvq_cache_stats sa = stats_of(a), sb = stats_of(b);
            if (memcmp(&sa, &sb, sizeof sa) != 0) fail_msg("%s: stats of source and fork differ", bc->name);
            same_counts(&sb, &sd, "fork vs direct", bc, S, W, n0);
            cvq_cache_free(a);
            cvq_cache_free(b);
        }
        cvq_cache_free(d);
    }
    assert_true(with_records > 0); /* some forks did copy compressed records */
    free(oa);
    free(ob);
    free(od);
    cvq_codebook_free(cb);
    cvq_context_free(ctx);
    seq_free(&s);
}

/* After a fork, appending to either side leaves the other as it was: the
 * fork attends like a cache fed only the prefix while the source grows
 * (past its capacity, so its arrays are reallocated), and then the fork
 * takes a different continuation without touching the source. The source
 * is freed before the fork's last use. */
static void test_independence(void **state) {
    const backend_case *bc = *state;
    cvq_context *ctx = case_ctx(bc, NULL);
    if (!ctx) skip();
    seq s;
    seq_make(&s, 202);
    cvq_codebook *cb = random_cb(&s.g, NULL);
    const uint32_t S = 2, W = 8;
    const size_t n0 = 30, outn = NQ * s.per_q;
    float *o1 = malloc(outn * sizeof(float)), *o2 = malloc(outn * sizeof(float));
    assert_true(o1 && o2);

    cvq_cache *a = make_cache(ctx, cb, S, W);
    feed(a, &s, 0, n0, 7, false);
    cvq_cache *b = NULL;
    CHECK_OK(cvq_cache_copy(a, &b));
    cvq_cache *p = make_cache(ctx, cb, S, W); /* only the prefix */
    feed(p, &s, 0, n0, n0, false);

    feed(a, &s, n0, T, 9, false); /* source continues: 100 tokens, > 64 records */
    assert_true(stats_of(a).n_compressed > 64);
    attend(b, &s, o1);
    attend(p, &s, o2);
    same_out(o1, o2, outn, "fork after the source grew vs prefix only", bc, &s, S, W, n0);
    {
        const cvq_cache_stats sb = stats_of(b), sp = stats_of(p);
        same_counts(&sb, &sp, "fork vs prefix only", bc, S, W, n0);
    }

    /* The fork takes another continuation (k2/v2 at the same positions). */
    feed(b, &s, n0, T, 11, true);
    cvq_cache *da = make_cache(ctx, cb, S, W); /* prefix + first continuation */
    feed(da, &s, 0, T, T, false);
    cvq_cache *db = make_cache(ctx, cb, S, W); /* prefix + second continuation */
    feed(db, &s, 0, n0, n0, false);
    feed(db, &s, n0, T, T, true);
    attend(a, &s, o1);
    attend(da, &s, o2);
    same_out(o1, o2, outn, "source after the fork's own appends vs direct", bc, &s, S, W, n0);
    attend(db, &s, o2);
    cvq_cache_free(a); /* the fork must not depend on the source's storage */
    attend(b, &s, o1);
    same_out(o1, o2, outn, "fork with its own continuation vs direct", bc, &s, S, W, n0);
    /* A guard that the two continuations do differ. */
    attend(da, &s, o1);
    assert_true(memcmp(o1, o2, outn * sizeof(float)) != 0);

    cvq_cache_free(b);
    cvq_cache_free(p);
    cvq_cache_free(da);
    cvq_cache_free(db);
    free(o1);
    free(o2);
    cvq_codebook_free(cb);
    cvq_context_free(ctx);
    seq_free(&s);
}

/* A copy of a copy, the intermediate and the original freed first; and
 * copies of an empty cache and of a window-only cache that are then used. */
static void test_copy_chain_and_small(void **state) {
    const backend_case *bc = *state;
    cvq_context *ctx = case_ctx(bc, NULL);
    if (!ctx) skip();
    seq s;
    seq_make(&s, 303);
    cvq_codebook *cb = random_cb(&s.g, NULL);
    const uint32_t S = 2, W = 8;
    const size_t outn = NQ * s.per_q;
    float *o1 = malloc(outn * sizeof(float)), *o2 = malloc(outn * sizeof(float));
    assert_true(o1 && o2);
    cvq_cache *d = make_cache(ctx, cb, S, W);
    feed(d, &s, 0, T, T, false);
    attend(d, &s, o2);

    /* Chain: a (40 tokens) -> b -> c; c gets the rest. */
    cvq_cache *a = make_cache(ctx, cb, S, W), *b = NULL, *c = NULL;
    feed(a, &s, 0, 40, 40, false);
    CHECK_OK(cvq_cache_copy(a, &b));
    cvq_cache_free(a);
    CHECK_OK(cvq_cache_copy(b, &c));
    cvq_cache_free(b);
    feed(c, &s, 40, T, 17, false);
    attend(c, &s, o1);
    same_out(o1, o2, outn, "copy of a copy vs direct", bc, &s, S, W, 40);
    cvq_cache_free(c);

    /* Empty: the copy is empty (zeros for every query), then usable. */
    cvq_cache *e = make_cache(ctx, cb, S, W), *ec = NULL;
    CHECK_OK(cvq_cache_copy(e, &ec));
    const cvq_cache_stats se = stats_of(ec);
    assert_int_equal(se.n_tokens, 0);
    assert_int_equal(se.n_sink + se.n_compressed + se.n_window, 0);
    attend(ec, &s, o1);
    for (size_t i = 0; i < outn; i++) assert_true(o1[i] == 0.0f);
    cvq_cache_free(e);
    feed(ec, &s, 0, T, 50, false);
    attend(ec, &s, o1);
    same_out(o1, o2, outn, "copy of an empty cache then fed vs direct", bc, &s, S, W, 0);
    cvq_cache_free(ec);

    /* Window only (no sinks, fewer than W tokens): no compressed record. */
    cvq_cache *wd = make_cache(ctx, cb, 0, W), *w = make_cache(ctx, cb, 0, W), *wc = NULL;
    feed(wd, &s, 0, T, T, false);
    feed(w, &s, 0, 6, 6, false);
    CHECK_OK(cvq_cache_copy(w, &wc));
    const cvq_cache_stats sw = stats_of(wc);
    assert_int_equal(sw.n_window, 6);
    assert_int_equal(sw.n_compressed, 0);
    assert_int_equal(sw.n_sink, 0);
    cvq_cache_free(w);
    feed(wc, &s, 6, T, 8, false);
    attend(wc, &s, o1);
    attend(wd, &s, o2);
    same_out(o1, o2, outn, "copy of a window-only cache then fed vs direct", bc, &s, 0, W, 6);
    cvq_cache_free(wc);
    cvq_cache_free(wd);

    cvq_cache_free(d);
    free(o1);
    free(o2);
    cvq_codebook_free(cb);
    cvq_context_free(ctx);
    seq_free(&s);
}

/* A window larger than the host bounce's piece (1 MiB in core/cache.c):
 * 2600 fp32 tokens of 2*64 floats are 1.3 MB per array, so in staging mode
 * the copy goes through the bounce in more than one piece. */
static void test_large_window(void **state) {
    const backend_case *bc = *state;
    cvq_context *ctx = case_ctx(bc, NULL);
    if (!ctx) skip();
    const cvq_geometry g = small_geometry();
    cvq_codebook *cb = random_cb(&g, NULL);
    const size_t kvd = (size_t)g.n_kv_heads * g.head_dim, per_q = (size_t)g.n_q_heads * g.head_dim;
    enum { N = 2600, N0 = 2100, W = 4096 };
    const uint64_t seed = 505;
    float *k = malloc(N * kvd * sizeof(float)), *v = malloc(N * kvd * sizeof(float));
    float *q = malloc(NQ * per_q * sizeof(float));
    float *o1 = malloc(NQ * per_q * sizeof(float)), *o2 = malloc(NQ * per_q * sizeof(float));
    int32_t *pos = malloc(N * sizeof(int32_t));
    assert_true(k && v && q && o1 && o2 && pos);
    fill_normal(k, N * kvd, seed);
    fill_normal(v, N * kvd, seed + 1);
    fill_normal(q, NQ * per_q, seed + 2);
    for (int t = 0; t < N; t++) pos[t] = t;
    /* queries that see all, the first 2100 + part, and only the start */
    const int32_t qp[NQ] = {N, N - 1, N0 + 7, N0 - 1, 3};

    cvq_cache *a = make_cache(ctx, cb, 1, W), *b = NULL, *d = make_cache(ctx, cb, 1, W);
    CHECK_OK(cvq_cache_append(a, k, v, CVQ_F32, pos, N0));
    CHECK_OK(cvq_cache_copy(a, &b));
    cvq_cache_free(a);
    CHECK_OK(cvq_cache_append(b, k + N0 * kvd, v + N0 * kvd, CVQ_F32, pos + N0, N - N0));
    CHECK_OK(cvq_cache_append(d, k, v, CVQ_F32, pos, N));
    assert_int_equal(stats_of(b).n_window, N - 1);
    CHECK_OK(cvq_cache_attend(b, q, qp, NQ, 0, o1));
    CHECK_OK(cvq_cache_attend(d, q, qp, NQ, 0, o2));
    for (size_t i = 0; i < NQ * per_q; i++)
        if (memcmp(&o1[i], &o2[i], sizeof(float)) != 0)
            fail_msg("%s: large window copy vs direct (seed %llu): element %zu (query %zu) %.9g vs %.9g",
                     bc->name, (unsigned long long)seed, i, i / per_q, (double)o1[i], (double)o2[i]);
    cvq_cache_free(b);
    cvq_cache_free(d);
    free(k);
    free(v);
    free(q);
    free(o1);
    free(o2);
    free(pos);
    cvq_codebook_free(cb);
    cvq_context_free(ctx);
}

/* ---- allocation failures ------------------------------------------------------------------- */

typedef struct {
    long n_alloc, n_free, fail_at; /* fail the fail_at-th allocation (1-based), 0 = never, -1 = done */
} counting;

static void *cnt_alloc(void *user, size_t size, size_t align) {
    counting *c = user;
    c->n_alloc++;
    if (c->fail_at > 0 && c->n_alloc == c->fail_at) {
        c->n_alloc--; /* not handed out */
        c->fail_at = -1;
        return NULL;
    }
    void *p = NULL;
    if (posix_memalign(&p, align < sizeof(void *) ? sizeof(void *) : align, size ? size : 1)) return NULL;
    return p;
}
static void cnt_free(void *user, void *p) {
    counting *c = user;
    if (p) c->n_free++;
    free(p);
}

/* Every allocation of a copy fails in turn: CVQ_ERR_OUT_OF_MEMORY, *out
 * NULL, as many frees as allocations, and the source unchanged. */
static void test_alloc_failures(void **state) {
    const backend_case *bc = *state;
    counting cnt = {0, 0, 0};
    cvq_allocator al = {cnt_alloc, cnt_free, &cnt};
    cvq_context *ctx = case_ctx(bc, &al);
    if (!ctx) skip();
    seq s;
    seq_make(&s, 404);
    cvq_codebook *cb = random_cb(&s.g, &al);
    const size_t outn = NQ * s.per_q;
    float *ref = malloc(outn * sizeof(float)), *got = malloc(outn * sizeof(float));
    assert_true(ref && got);
    cvq_cache *a = make_cache(ctx, cb, 2, 8);
    feed(a, &s, 0, 45, 45, false); /* 2 sinks, 40 records, 3 in the window */
    attend(a, &s, ref);
    const cvq_cache_stats s0 = stats_of(a);
    assert_true(s0.n_compressed > 0 && s0.n_sink > 0 && s0.n_window > 0);

    /* Warm up (a backend may set up staging once), then count one copy. */
    cvq_cache *b = NULL;
    CHECK_OK(cvq_cache_copy(a, &b));
    cvq_cache_free(b);
    long base_alloc = cnt.n_alloc, base_free = cnt.n_free;
    CHECK_OK(cvq_cache_copy(a, &b));
    cvq_cache_free(b);
    const long total = cnt.n_alloc - base_alloc;
    assert_true(total >= 2); /* at least the cache and one buffer */
    assert_int_equal(cnt.n_free - base_free, total);

    for (long n = 1; n <= total; n++) {
        base_alloc = cnt.n_alloc;
        base_free = cnt.n_free;
        cnt.fail_at = base_alloc + n;
        b = (cvq_cache *)0x1;
        cvq_status st = cvq_cache_copy(a, &b);
        if (cnt.fail_at != -1) fail_msg("%s: allocation %ld of %ld was never reached", bc->name, n, total);
        cnt.fail_at = 0;
        if (st != CVQ_ERR_OUT_OF_MEMORY)
            fail_msg("%s: failing allocation %ld of %ld gave %s (%s)", bc->name, n, total,
                     cvq_status_name(st), st ? cvq_last_error() : "");
        if (b != NULL) fail_msg("%s: failing allocation %ld: *out not NULL", bc->name, n);
        if (cnt.n_alloc - base_alloc != cnt.n_free - base_free)
            fail_msg("%s: failing allocation %ld: %ld allocations, %ld frees (leak)", bc->name, n,
                     cnt.n_alloc - base_alloc, cnt.n_free - base_free);
    }
    /* The source is untouched and still works. */
    const cvq_cache_stats s1 = stats_of(a);
    assert_memory_equal(&s0, &s1, sizeof s0);
    attend(a, &s, got);
    same_out(got, ref, outn, "source after failed copies", bc, &s, 2, 8, 45);
    feed(a, &s, 45, 60, 15, false);
    print_message("%s: %ld allocations in a copy, each failure reported as CVQ_ERR_OUT_OF_MEMORY "
                  "without leaks\n", bc->name, total);

    cvq_cache_free(a);
    free(ref);
    free(got);
    cvq_codebook_free(cb);
    cvq_context_free(ctx);
    seq_free(&s);
    /* Everything the context, codebook and caches allocated is back. */
    if (cnt.n_alloc != cnt.n_free)
        fail_msg("%s: %ld allocations, %ld frees", bc->name, cnt.n_alloc, cnt.n_free);
}

static void test_null_arguments(void **state) {
    (void)state;
    cvq_cache *out = (cvq_cache *)0x1;
    assert_int_equal(cvq_cache_copy(NULL, &out), CVQ_ERR_NULL_POINTER);
    assert_null(out);
    assert_int_equal(cvq_cache_copy(NULL, NULL), CVQ_ERR_NULL_POINTER);

    cvq_context *ctx = case_ctx(&k_cases[0], NULL);
    cvq_geometry g = small_geometry();
    cvq_codebook *cb = random_cb(&g, NULL);
    cvq_cache *c = make_cache(ctx, cb, 0, 4);
    assert_int_equal(cvq_cache_copy(c, NULL), CVQ_ERR_NULL_POINTER);
    cvq_cache_free(c);
    cvq_codebook_free(cb);
    cvq_context_free(ctx);
}

int main(void) {
    /* Read when the process's Vulkan instance is created: before any context. */
    setenv("COMMVQ_VK_VALIDATION", "1", 0);
    cvq_status st = cvq_backend_available(CVQ_BACKEND_VULKAN);
    g_vulkan_ok = st == CVQ_OK;
    if (!g_vulkan_ok) {
        snprintf(g_vulkan_why, sizeof g_vulkan_why, "no usable Vulkan backend: %s (%s)",
                 cvq_status_name(st), cvq_last_error());
        printf("skip (Vulkan cases): %s\n", g_vulkan_why);
    }
#define PER_CASE(fn)                                                                              \
    cmocka_unit_test_prestate(fn, &k_cases[0]),                                           \
        cmocka_unit_test_prestate(fn, &k_cases[1]),                                       \
        cmocka_unit_test_prestate(fn, &k_cases[2]),                                       \
        cmocka_unit_test_prestate(fn, &k_cases[3])
    const struct CMUnitTest tests[] = {
        PER_CASE(test_fork_matches_direct),
        PER_CASE(test_independence),
        PER_CASE(test_copy_chain_and_small),
        PER_CASE(test_large_window),
        PER_CASE(test_alloc_failures),
        cmocka_unit_test(test_null_arguments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
