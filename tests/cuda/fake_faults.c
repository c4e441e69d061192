/*
 * cuda_faults_emulated: the CUDA backend's error paths on the emulated device
 * (tests/cuda/fake_device.cpp), where a GPU cannot be made to fail on
 * demand. One workload -- a CUDA context, key and value encoding through
 * the host API, a cache with sinks, compressed tokens and a window filled in
 * two appends, attention -- is run again and again with one fault injected
 * at a different place each time:
 *   malloc  the k-th cudaMalloc fails (cudaErrorMemoryAllocation);
 *   launch  the k-th kernel launch fails (cudaErrorLaunchOutOfResources);
 *   lost    from the k-th launch on the device is gone (every call returns
 *           the sticky cudaErrorIllegalAddress, as after a kernel fault);
 * for k = 1, 2, ... until the workload completes without reaching the fault.
 * Each failing call must (docs/cuda.md, "Errors"):
 *   - return a device status (CVQ_ERR_DEVICE_OUT_OF_MEMORY, CVQ_ERR_DEVICE,
 *     CVQ_ERR_DEVICE_LOST) whose message names the CUDA error;
 *   - leave its outputs untouched (sentinel bytes);
 *   - for an append: leave the cache as it was -- the same statistics and,
 *     once the fault is cleared (malloc, launch), attention bit-identical to
 *     the cache's attention before the append;
 * and at the end of every run no device memory or stream may be left (but
 * after a lost device, where CUDA frees nothing any more).
 * The results that did come out are compared with a run without faults, bit
 * for bit. Plain C; exit status 0 when everything held.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commvq.h"

long cvq_fake_cuda_inject(int kind, long at);   /* fake_device.cpp */
size_t cvq_fake_cuda_live_allocations(void);
void cvq_fake_cuda_reset(void);

static int g_fail, g_runs;

#define CHECK(cond, ...)                                  \
    do {                                                  \
        if (!(cond)) {                                    \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);   \
            printf(__VA_ARGS__);                          \
            printf("\n");                                 \
            g_fail++;                                     \
        }                                                 \
    } while (0)

static uint64_t rng_state = 0xFA17;
static float rnd(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)((double)(z >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

enum { N1 = 40, N2 = 24, N = N1 + N2, NQ = 2 };
static cvq_geometry g_geom;
static cvq_codebook *g_cb;
static float g_k[N * 2 * 64], g_v[N * 2 * 64], g_q[NQ * 4 * 64];
static int32_t g_pos[N], g_qpos[NQ];

/* What a run produced; `have_*` says how far it got. */
typedef struct {
    int have_keys, have_values, have_o1, have_o2;
    uint16_t codes[N * 2 * 2];
    float scales[N];
    uint8_t bits[N * 64 / 8];
    float sigma[N];
    float o1[NQ * 4 * 64], o2[NQ * 4 * 64];
} results;

static int is_device_status(cvq_status st) {
    return st == CVQ_ERR_DEVICE || st == CVQ_ERR_DEVICE_LOST || st == CVQ_ERR_DEVICE_OUT_OF_MEMORY;
}

/* A failed call: device status, the CUDA error named, outputs untouched. */
static void check_failure(const char *what, cvq_status st, const void *out, size_t bytes, unsigned char sentinel,
                          const char *run) {
    CHECK(is_device_status(st), "%s: %s: status %s (%s)", run, what, cvq_status_name(st), cvq_last_error());
    CHECK(strstr(cvq_last_error(), "cuda") != NULL, "%s: %s: message does not name the CUDA error: %s", run, what,
          cvq_last_error());
    const unsigned char *b = out;
    size_t changed = 0;
    for (size_t i = 0; i < bytes; i++) changed += b[i] != sentinel;
    CHECK(changed == 0, "%s: %s failed but wrote %zu of %zu output bytes", run, what, changed, bytes);
}

static int same_stats(const cvq_cache_stats *a, const cvq_cache_stats *b) {
    return a->n_tokens == b->n_tokens && a->n_sink == b->n_sink && a->n_compressed == b->n_compressed &&
           a->n_window == b->n_window && a->bytes_compressed == b->bytes_compressed && a->bytes_full == b->bytes_full;
}

/* The workload. kind < 0: no fault. Returns 1 when the run reached its end
 * without any call failing. */
static int workload(int kind, long at, results *r, const char *run) {
    memset(r, 0, sizeof *r);
    cvq_context *ctx = NULL;
    cvq_cache *cache = NULL;
    int clean = 0;
    const int lost_device = kind == 2;
    cvq_fake_cuda_inject(kind < 0 ? 0 : kind, kind < 0 ? 0 : at);
    cvq_context_params p = cvq_context_default_params();
    p.backend = CVQ_BACKEND_CUDA;
    cvq_status st = cvq_context_create(&p, &ctx);
    if (st) {
        CHECK(is_device_status(st), "%s: context: %s (%s)", run, cvq_status_name(st), cvq_last_error());
        CHECK(ctx == NULL, "%s: a failed cvq_context_create returned a context", run);
        goto done;
    }
    /* keys */
    memset(r->codes, 0x5A, sizeof r->codes);
    memset(r->scales, 0x5A, sizeof r->scales);
    st = cvq_encode_keys(ctx, g_cb, 0, g_k, CVQ_F32, N, r->codes, r->scales);
    if (st) {
        check_failure("cvq_encode_keys codes", st, r->codes, sizeof r->codes, 0x5A, run);
        check_failure("cvq_encode_keys scales", st, r->scales, sizeof r->scales, 0x5A, run);
        goto done;
    }
    r->have_keys = 1;
    /* values */
    memset(r->bits, 0x5A, sizeof r->bits);
    memset(r->sigma, 0x5A, sizeof r->sigma);
    st = cvq_encode_values(ctx, g_cb, 0, g_v, CVQ_F32, N, r->bits, r->sigma);
    if (st) {
        check_failure("cvq_encode_values bits", st, r->bits, sizeof r->bits, 0x5A, run);
        check_failure("cvq_encode_values sigma", st, r->sigma, sizeof r->sigma, 0x5A, run);
        goto done;
    }
    r->have_values = 1;
    /* a cache: first append, attention */
    cvq_cache_params cp = cvq_cache_default_params();
    cp.sinks = 2;
    cp.window = 8;
    st = cvq_cache_create(ctx, g_cb, &cp, &cache);
    if (st) {
        CHECK(is_device_status(st), "%s: cache: %s (%s)", run, cvq_status_name(st), cvq_last_error());
        goto done;
    }
    cvq_cache_stats s0, s1, s2;
    cvq_cache_stats_get(cache, &s0);
    st = cvq_cache_append(cache, g_k, g_v, CVQ_F32, g_pos, N1);
    if (st) {
        check_failure("first cvq_cache_append", st, NULL, 0, 0, run);
        cvq_cache_stats_get(cache, &s1);
        CHECK(same_stats(&s0, &s1), "%s: a failed first append changed the cache (%llu tokens)", run,
              (unsigned long long)s1.n_tokens);
        goto done;
    }
    cvq_cache_stats_get(cache, &s1);
    memset(r->o1, 0x5A, sizeof r->o1);
    st = cvq_cache_attend(cache, g_q, g_qpos, NQ, 0, r->o1);
    if (st) {
        check_failure("first cvq_cache_attend", st, r->o1, sizeof r->o1, 0x5A, run);
        goto done;
    }
    r->have_o1 = 1;
    /* second append: the window's oldest tokens are compressed now */
    st = cvq_cache_append(cache, g_k + (size_t)N1 * 2 * 64, g_v + (size_t)N1 * 2 * 64, CVQ_F32, g_pos + N1, N2);
    if (st) {
        check_failure("second cvq_cache_append", st, NULL, 0, 0, run);
        cvq_cache_stats_get(cache, &s2);
        CHECK(same_stats(&s1, &s2), "%s: a failed second append changed the cache statistics", run);
        if (!lost_device) {
            /* the fault cleared, the cache must answer as before the append */
            cvq_fake_cuda_inject(0, 0);
            float o[NQ * 4 * 64];
            st = cvq_cache_attend(cache, g_q, g_qpos, NQ, 0, o);
            CHECK(st == CVQ_OK, "%s: attention after a failed append: %s (%s)", run, cvq_status_name(st),
                  cvq_last_error());
            if (st == CVQ_OK)
                CHECK(memcmp(o, r->o1, sizeof o) == 0, "%s: attention after a failed append differs from before it",
                      run);
        } else {
            /* a lost device stays lost: every later call fails the same way */
            float o[NQ * 4 * 64];
            st = cvq_cache_attend(cache, g_q, g_qpos, NQ, 0, o);
            CHECK(st == CVQ_ERR_DEVICE_LOST, "%s: attention on a lost device: %s", run, cvq_status_name(st));
        }
        goto done;
    }
    memset(r->o2, 0x5A, sizeof r->o2);
    st = cvq_cache_attend(cache, g_q, g_qpos, NQ, 0, r->o2);
    if (st) {
        check_failure("second cvq_cache_attend", st, r->o2, sizeof r->o2, 0x5A, run);
        goto done;
    }
    r->have_o2 = 1;
    clean = 1;
done:
    cvq_cache_free(cache);
    cvq_context_free(ctx);
    cvq_fake_cuda_inject(0, 0);
    if (lost_device) {
        /* No runtime call frees memory on a context that faulted (CUDA: only
         * cudaDeviceReset, which a library must not call: it would destroy
         * the application's own allocations). What is left is the
         * application's to reset; the host side is checked by ASan/LSan. */
        cvq_fake_cuda_reset();
    } else {
        CHECK(cvq_fake_cuda_live_allocations() == 0,
              "%s: %zu device allocations or streams left after freeing everything", run,
              cvq_fake_cuda_live_allocations());
    }
    g_runs++;
    return clean;
}

int main(void) {
    cvq_status st;
    g_geom = (cvq_geometry){1, 4, 2, 64, 2, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_ROTATE_HALF, 0, 64, 0, 0.0f};
    double theta[32];
    if ((st = cvq_geometry_resolve(&g_geom)) || (st = cvq_rope_freqs_default(64, 10000.0, theta)) ||
        (st = cvq_codebook_random(&g_geom, theta, 0xFA17, NULL, &g_cb))) {
        printf("cuda_faults_emulated: setup: %s (%s)\n", cvq_status_name(st), cvq_last_error());
        return 1;
    }
    for (size_t i = 0; i < sizeof g_k / sizeof g_k[0]; i++) {
        g_k[i] = rnd();
        g_v[i] = rnd();
    }
    for (size_t i = 0; i < sizeof g_q / sizeof g_q[0]; i++) g_q[i] = rnd();
    for (int t = 0; t < N; t++) g_pos[t] = 2 * t;
    g_qpos[0] = 2 * N;
    g_qpos[1] = 30;

    static results ref, r;
    if (!workload(-1, 0, &ref, "no fault")) {
        printf("FAIL the workload does not complete without a fault\n");
        return 1;
    }
    const char *kinds[3] = {"malloc", "launch", "lost"};
    for (int kind = 0; kind < 3; kind++) {
        long at = 1;
        int failed_runs = 0;
        for (;; at++) {
            char run[64];
            snprintf(run, sizeof run, "%s fault at %ld", kinds[kind], at);
            const int fails_before = g_fail;
            const int clean = workload(kind, at, &r, run);
            /* whatever came out before the fault equals the run without one */
            if (r.have_keys)
                CHECK(!memcmp(r.codes, ref.codes, sizeof r.codes) && !memcmp(r.scales, ref.scales, sizeof r.scales),
                      "%s: keys differ from the run without a fault", run);
            if (r.have_values)
                CHECK(!memcmp(r.bits, ref.bits, sizeof r.bits) && !memcmp(r.sigma, ref.sigma, sizeof r.sigma),
                      "%s: values differ from the run without a fault", run);
            if (r.have_o1) CHECK(!memcmp(r.o1, ref.o1, sizeof r.o1), "%s: first attention differs", run);
            if (r.have_o2) CHECK(!memcmp(r.o2, ref.o2, sizeof r.o2), "%s: second attention differs", run);
            if (g_fail > fails_before) printf("  (%s)\n", run);
            if (clean) break; /* the fault lies beyond the workload's last call */
            failed_runs++;
            if (at > 500) {
                printf("FAIL %s: the workload never completes\n", kinds[kind]);
                g_fail++;
                break;
            }
        }
        printf("%s: faults injected at 1..%ld (%d runs stopped by them, then one that completed)\n", kinds[kind],
               at - 1, failed_runs);
    }
    cvq_codebook_free(g_cb);
    printf("cuda_faults_emulated: %d runs, %d failed checks\n", g_runs, g_fail);
    return g_fail ? 1 : 0;
}
