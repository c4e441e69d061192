/*
 * The CUDA backend where there may be no GPU (CI, this machine):
 *
 *  - absence: a library built with CUDA reports CVQ_ERR_NO_DEVICE with
 *    "no CUDA device (<CUDA error name>...)" when there is no driver or
 *    device, an explicit cuda context fails cleanly (out stays NULL), and
 *    `auto` picks another backend; on a machine with a GPU these tests skip
 *    (the conformance harness and cuda_check cover that case);
 *  - interop (include/commvq_cuda.h): NULL and non-CUDA contexts and bad
 *    arguments are refused with statuses; in a build without CUDA every
 *    entry point answers CVQ_ERR_BACKEND_UNAVAILABLE;
 *  - the kernels' numerics: the __host__ __device__ steps of
 *    backends/cuda/cuda_numerics.cuh, compiled by nvcc for the host and
 *    composed as the kernels compose them (cuda_numerics_host.cu), must give
 *    the C library's bits: RoPE phase, sin/cos of a turn, erf, GELU over
 *    many inputs, and whole key and value tokens (codes, scales, bits,
 *    sigma) against the CPU reference encoders over several geometries and
 *    kinds of input (ties, subnormals, huge, tiny, zero); and each step
 *    alone against the contract's text (docs/numerics.md) written out here
 *    in C, with inputs of random exponents so that any change of
 *    association or order shows up in the bits. This checks the
 *    order of every operation of the device code; the device's own
 *    arithmetic is checked by cuda_check on a GPU (docs/cuda.md).
 *
 * Seeds are fixed and printed on failure.
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
#include "commvq_cuda.h"
#include "cuda/cuda_types.h"
#include "numerics.h"
#include "reference.h"

#define CHECK_OK(call)                                                                            \
    do {                                                                                          \
        cvq_status st_ = (call);                                                                  \
        if (st_ != CVQ_OK) fail_msg("%s -> %s: %s", #call, cvq_status_name(st_), cvq_last_error()); \
    } while (0)

static uint64_t rng_state;
static uint64_t rnd_u64(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double rnd_unit(void) { return ((double)(rnd_u64() >> 11) + 0.5) / 9007199254740992.0; }
static double rnd_normal(void) {
    double u0 = rnd_unit(), u1 = rnd_unit();
    return sqrt(-2.0 * log(u0)) * cos(6.283185307179586 * u1);
}
static uint32_t fbits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}
static float ffrom(uint32_t u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}

static bool cuda_compiled(void) { return cvq_cuda_host_numerics_built() != 0; }

#define SKIP_UNLESS_COMPILED()                                                                    \
    do {                                                                                          \
        if (!cuda_compiled()) {                                                                   \
            printf("skip: the CUDA backend is not compiled into this build\n");                   \
            skip();                                                                               \
        }                                                                                         \
    } while (0)

/* ---- absence ------------------------------------------------------------------------------ */

/* true (and a skip line) when this machine has a usable CUDA device. */
static bool has_gpu(void) {
    if (cvq_backend_available(CVQ_BACKEND_CUDA) == CVQ_OK) {
        printf("skip: this machine has a CUDA device (cuda_check and the conformance harness test it)\n");
        return true;
    }
    return false;
}

static void test_no_device_status(void **state) {
    (void)state;
    SKIP_UNLESS_COMPILED();
    if (getenv("COMMVQ_DISABLE_CUDA") && getenv("COMMVQ_DISABLE_CUDA")[0]) {
        printf("skip: COMMVQ_DISABLE_CUDA is set\n");
        skip();
    }
    if (has_gpu()) skip();
    const cvq_status st = cvq_backend_available(CVQ_BACKEND_CUDA);
    assert_int_equal(st, CVQ_ERR_NO_DEVICE);
    const char *msg = cvq_last_error();
    printf("cuda: %s\n", msg);
    if (!strstr(msg, "no CUDA device (")) fail_msg("message lacks 'no CUDA device (': %s", msg);
    if (!strstr(msg, "cudaError")) fail_msg("message lacks the CUDA error name: %s", msg);
    /* the listing works and has no CUDA device */
    cvq_device_info devs[8];
    size_t n = 0;
    CHECK_OK(cvq_list_devices(devs, 8, &n));
    for (size_t i = 0; i < n && i < 8; i++) assert_int_not_equal(devs[i].backend, CVQ_BACKEND_CUDA);
}

static void test_context_create_fails(void **state) {
    (void)state;
    SKIP_UNLESS_COMPILED();
    if (has_gpu()) skip();
    cvq_context_params p = cvq_context_default_params();
    p.backend = CVQ_BACKEND_CUDA;
    cvq_context *ctx = (cvq_context *)(uintptr_t)1;
    const cvq_status st = cvq_context_create(&p, &ctx);
    assert_true(st == CVQ_ERR_NO_DEVICE || st == CVQ_ERR_BACKEND_UNAVAILABLE);
    assert_null(ctx);
    if (!strstr(cvq_last_error(), "cuda")) fail_msg("message does not name the backend: %s", cvq_last_error());
    p.device = 3;
    ctx = NULL;
    assert_int_not_equal(cvq_context_create(&p, &ctx), CVQ_OK);
    assert_null(ctx);
}

static void test_auto_picks_other(void **state) {
    (void)state;
    if (has_gpu()) skip();
    cvq_context_params p = cvq_context_default_params();
    cvq_context *ctx = NULL;
    CHECK_OK(cvq_context_create(&p, &ctx));
    assert_int_not_equal(cvq_context_backend(ctx), CVQ_BACKEND_CUDA);
    /* and it works: one key token through the picked backend */
    cvq_geometry g = {1, 2, 1, 64, 2, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_ROTATE_HALF, 0, 64, 0, 0.0f};
    CHECK_OK(cvq_geometry_resolve(&g));
    double theta[32];
    CHECK_OK(cvq_rope_freqs_default(64, 10000.0, theta));
    cvq_codebook *cb = NULL;
    CHECK_OK(cvq_codebook_random(&g, theta, 7, NULL, &cb));
    float k[64];
    for (int i = 0; i < 64; i++) k[i] = (float)(i % 7) - 3.0f;
    uint16_t codes[2];
    float scale;
    CHECK_OK(cvq_encode_keys(ctx, cb, 0, k, CVQ_F32, 1, codes, &scale));
    cvq_codebook_free(cb);
    cvq_context_free(ctx);
}

/* ---- interop argument checks -------------------------------------------------------------------- */

static void test_interop_refuses(void **state) {
    (void)state;
    const cvq_status expect_ctx = cuda_compiled() ? CVQ_ERR_NULL_POINTER : CVQ_ERR_BACKEND_UNAVAILABLE;
    const cvq_status expect_cpu = cuda_compiled() ? CVQ_ERR_INVALID_ARGUMENT : CVQ_ERR_BACKEND_UNAVAILABLE;
    float dummy[4];
    assert_int_equal(cvq_cuda_set_stream(NULL, NULL), expect_ctx);
    assert_int_equal(cvq_cuda_status(NULL), expect_ctx);
    assert_int_equal(cvq_cuda_synchronize(NULL), expect_ctx);
    assert_int_equal(cvq_cuda_prepare(NULL, NULL, 0), expect_ctx);
    assert_int_equal(cvq_cuda_encode_keys(NULL, NULL, 0, dummy, 1, NULL, dummy), expect_ctx);
    assert_int_equal(cvq_cuda_encode_values(NULL, NULL, 0, dummy, 1, NULL, dummy), expect_ctx);
    assert_int_equal(cvq_cuda_attend(NULL, NULL, 0, NULL, dummy, NULL, 1, 0, dummy), expect_ctx);
    cvq_cuda_stream s = (cvq_cuda_stream)(uintptr_t)1;
    assert_int_not_equal(cvq_cuda_get_stream(NULL, &s), CVQ_OK);

    /* a CPU context is not a CUDA context: refused, with the reason */
    cvq_context_params p = cvq_context_default_params();
    p.backend = CVQ_BACKEND_CPU;
    cvq_context *ctx = NULL;
    CHECK_OK(cvq_context_create(&p, &ctx));
    cvq_geometry g = {1, 2, 1, 64, 2, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_ROTATE_HALF, 0, 64, 0, 0.0f};
    CHECK_OK(cvq_geometry_resolve(&g));
    double theta[32];
    CHECK_OK(cvq_rope_freqs_default(64, 10000.0, theta));
    cvq_codebook *cb = NULL;
    CHECK_OK(cvq_codebook_random(&g, theta, 7, NULL, &cb));
    uint16_t codes[2];
    uint8_t bits[8];
    assert_int_equal(cvq_cuda_set_stream(ctx, NULL), expect_cpu);
    assert_int_equal(cvq_cuda_prepare(ctx, cb, 0), expect_cpu);
    assert_int_equal(cvq_cuda_encode_keys(ctx, cb, 0, dummy, 1, codes, dummy), expect_cpu);
    if (cuda_compiled() && !strstr(cvq_last_error(), "not cuda"))
        fail_msg("message does not say why: %s", cvq_last_error());
    assert_int_equal(cvq_cuda_encode_values(ctx, cb, 0, dummy, 1, bits, dummy), expect_cpu);
    cvq_cuda_kv kv;
    memset(&kv, 0, sizeof kv);
    int32_t pos = 0;
    assert_int_equal(cvq_cuda_attend(ctx, cb, 0, &kv, dummy, &pos, 1, 0, dummy), expect_cpu);
    assert_int_equal(cvq_cuda_status(ctx), expect_cpu);
    assert_int_equal(cvq_cuda_synchronize(ctx), expect_cpu);
    assert_int_not_equal(cvq_cuda_get_stream(ctx, &s), CVQ_OK);
    cvq_codebook_free(cb);
    cvq_context_free(ctx);
}

/* ---- numerics: primitives ------------------------------------------------------------------------ */

static void test_sincos_phase(void **state) {
    (void)state;
    SKIP_UNLESS_COMPILED();
    /* every 97th turn (44 million) plus the octant edges and random ones */
    size_t n = 0;
    for (uint64_t t = 0; t <= 0xFFFFFFFFull; t += 97, n++) {
        float c0, s0, c1, s1;
        cvq_sincos_turn((uint32_t)t, &c0, &s0);
        cvq_cuda_host_sincos_turn((uint32_t)t, &c1, &s1);
        if (fbits(c0) != fbits(c1) || fbits(s0) != fbits(s1))
            fail_msg("sincos_turn(0x%08x): C (%a, %a) vs CUDA (%a, %a)", (unsigned)t, c0, s0, c1, s1);
    }
    for (uint32_t q = 0; q < 8; q++) {
        for (int dlt = -40; dlt <= 40; dlt++) {
            const uint32_t t = q * 0x20000000u + (uint32_t)dlt;
            float c0, s0, c1, s1;
            cvq_sincos_turn(t, &c0, &s0);
            cvq_cuda_host_sincos_turn(t, &c1, &s1);
            if (fbits(c0) != fbits(c1) || fbits(s0) != fbits(s1)) fail_msg("sincos_turn(0x%08x) differs", t);
        }
    }
    rng_state = 0x5EED0001u;
    for (int i = 0; i < 1000000; i++) {
        const uint64_t t = rnd_u64();
        const int32_t pos = (int32_t)(rnd_u64() & 0x7FFFFFFF) >> (int)(rnd_u64() % 31);
        if (cvq_rope_phase_hi(t, pos) != cvq_cuda_host_phase_hi(t, pos))
            fail_msg("phase_hi(t=%llu, pos=%d) differs (seed 0x5EED0001)", (unsigned long long)t, pos);
    }
    printf("sincos: %zu turns, phase: 1e6 random (t, pos): bit-identical\n", n);
}

static void check_erf_gelu(float x) {
    const float e0 = cvq_erf_f32(x), e1 = cvq_cuda_host_erf(x);
    if (fbits(e0) != fbits(e1) && !(e0 != e0 && e1 != e1))
        fail_msg("erf(%a): C %a vs CUDA %a", x, e0, e1);
    const float g0 = cvq_gelu_f32(x), g1 = cvq_cuda_host_gelu(x);
    if (fbits(g0) != fbits(g1) && !(g0 != g0 && g1 != g1))
        fail_msg("gelu(%a): C %a vs CUDA %a", x, g0, g1);
}

static void test_erf_gelu(void **state) {
    (void)state;
    SKIP_UNLESS_COMPILED();
    /* every float bit pattern with a stride (all exponents, both signs) and
     * a dense sweep of [-6, 6] where the polynomials change piece */
    size_t n = 0;
    for (uint64_t u = 0; u <= 0xFFFFFFFFull; u += 331, n++) check_erf_gelu(ffrom((uint32_t)u));
    for (float x = -6.0f; x <= 6.0f; x = nextafterf(x, 7.0f) + 1e-6f, n++) check_erf_gelu(x);
    const float edges[] = {0.0f, -0.0f, 1.0f, -1.0f, 2.0f, 3.0f, 4.0f, -4.0f, 1e-45f, INFINITY, -INFINITY, NAN};
    for (size_t i = 0; i < sizeof edges / sizeof edges[0]; i++) check_erf_gelu(edges[i]);
    printf("erf/gelu: %zu inputs bit-identical\n", n);
}

/* ---- numerics: each step against the contract's text ---------------------------------------------- */

/* A float with a random exponent over 2^-20..2^20 and a random sign, so
 * that sums of them depend on their association (a changed order of
 * operations in a step shows up as different bits within a few trials). */
static float rnd_wide(void) {
    const double m = rnd_unit() + 0.5;
    const int e = (int)(rnd_u64() % 41) - 20;
    return (float)((rnd_u64() & 1 ? -m : m) * ldexp(1.0, e));
}

/* The steps as docs/numerics.md writes them (sections 2 and 4), in C. */
static void contract_fg(const float *w, const float *z, uint32_t P, uint32_t layout, float na, float *f, float *g) {
    float dr = 0.0f, di = 0.0f;
    for (uint32_t p = 0; p < P; p++) {
        const uint32_t re = layout ? 2 * p : p, im = layout ? 2 * p + 1 : p + P;
        const float wx = w[2 * p], wy = w[2 * p + 1], zr = z[re], zi = z[im];
        dr = dr + (wx * zr + wy * zi);
        di = di + (wx * zi - wy * zr);
    }
    *f = na - 2.0f * dr;
    *g = na - 2.0f * di;
}

static void test_steps_vs_contract(void **state) {
    (void)state;
    SKIP_UNLESS_COMPILED();
    enum { N = 512 };
    static float w[2 * N], w2[2 * N], z[2 * N], z2[2 * N], x[N], y[N], G[4096], fa[64], ga[64];
    static uint8_t bits[N / 8];
    rng_state = 0x57E95u;
    for (int trial = 0; trial < 400; trial++) {
        const uint32_t P = 32u + (uint32_t)(rnd_u64() % 97), layout = (uint32_t)(trial & 1), n = 2 * P;
        for (uint32_t i = 0; i < n; i++) {
            w[i] = rnd_wide();
            w2[i] = rnd_wide();
            z[i] = rnd_wide();
            x[i] = rnd_wide();
            y[i] = rnd_wide();
        }
        const float na = rnd_wide();
        float f0, g0, f1, g1;
        contract_fg(w, z, P, layout, na, &f0, &g0);
        cvq_cuda_host_subcode_fg(w, z, P, layout, na, &f1, &g1);
        if (fbits(f0) != fbits(f1) || fbits(g0) != fbits(g1))
            fail_msg("trial %d: f/g (%a, %a) vs contract (%a, %a) (seed 0x57E95)", trial, f1, g1, f0, g0);
        /* dist = (f[A] + g[B]) + G[A][B] */
        for (int a = 0; a < 64; a++) {
            fa[a] = rnd_wide();
            ga[a] = rnd_wide();
        }
        for (int k = 0; k < 4096; k++) G[k] = rnd_wide();
        for (uint32_t k = 0; k < 4096; k += 37) {
            const float d0 = (fa[k >> 6] + ga[k & 63]) + G[k];
            if (fbits(d0) != fbits(cvq_cuda_host_dist(fa, ga, G, k))) fail_msg("trial %d: dist of code %u", trial, k);
        }
        /* residual: z_p -= (x_A - y_B, y_A + x_B), components rounded first */
        memcpy(z2, z, n * sizeof(float));
        cvq_cuda_host_residual(w, w2, z2, P, layout);
        for (uint32_t p = 0; p < P; p++) {
            const uint32_t re = layout ? 2 * p : p, im = layout ? 2 * p + 1 : p + P;
            const float cr = w[2 * p] - w2[2 * p + 1], ci = w[2 * p + 1] + w2[2 * p];
            if (fbits(z2[re]) != fbits(z[re] - cr) || fbits(z2[im]) != fbits(z[im] - ci))
                fail_msg("trial %d: residual of pair %u", trial, p);
        }
        /* sums of squares; value ss over x = v * inv_ls */
        float ss = 0.0f, vs = 0.0f;
        for (uint32_t i = 0; i < n; i++) {
            ss = ss + x[i] * x[i];
            const float xi = x[i] * y[i];
            vs = vs + xi * xi;
        }
        if (fbits(ss) != fbits(cvq_cuda_host_sum_squares(x, n))) fail_msg("trial %d: sum of squares", trial);
        if (fbits(vs) != fbits(cvq_cuda_host_value_ss(x, y, n))) fail_msg("trial %d: value sum of squares", trial);
        /* LayerNorm: mean = sum * inv_F; var = (sum (x-mean)^2) * inv_F;
         * rstd = 1 / sqrt(var + 1e-5f); y = ((x - mean) * rstd) * w + b */
        const float inv_F = 1.0f / (float)n;
        float sum = 0.0f, acc = 0.0f;
        for (uint32_t i = 0; i < n; i++) sum = sum + x[i];
        const float mean = sum * inv_F;
        for (uint32_t i = 0; i < n; i++) {
            const float dj = x[i] - mean;
            acc = acc + dj * dj;
        }
        const float rstd = 1.0f / sqrtf(acc * inv_F + 1e-5f);
        float m1, r1;
        cvq_cuda_host_ln_stats(x, n, inv_F, &m1, &r1);
        if (fbits(mean) != fbits(m1) || fbits(rstd) != fbits(r1)) fail_msg("trial %d: LayerNorm statistics", trial);
        const float ya = ((x[3] - mean) * rstd) * y[5] + z[7];
        if (fbits(ya) != fbits(cvq_cuda_host_ln_apply(x[3], mean, rstd, y[5], z[7]))) fail_msg("trial %d: LayerNorm output", trial);
        /* Linear: acc = acc + W[i]*x[i] ascending, bias last */
        float lin = 0.0f;
        for (uint32_t i = 0; i < n; i++) lin = lin + w[i] * x[i];
        lin = lin + na;
        if (fbits(lin) != fbits(cvq_cuda_host_linear(w, x, n, na))) fail_msg("trial %d: linear", trial);
        /* code vector: u = sum of E[b][f] over set bits ascending (column 0, stride 2) */
        for (uint32_t i = 0; i < N / 8; i++) bits[i] = (uint8_t)rnd_u64();
        const uint32_t nc = (n / 2) & ~7u;
        float u = 0.0f;
        for (uint32_t b = 0; b < nc; b++)
            if ((bits[b / 8] >> (b % 8)) & 1u) u = u + x[(size_t)b * 2];
        if (fbits(u) != fbits(cvq_cuda_host_code_vector(bits, x, nc, 2))) fail_msg("trial %d: code vector", trial);
        /* sigma = (pre + 1e-6f) / (sqrt(sum u^2) + 1e-6f) */
        const float pre = fabsf(na);
        const float sg = (pre + 1e-6f) / (sqrtf(ss) + 1e-6f);
        if (fbits(sg) != fbits(cvq_cuda_host_sigma(x, n, pre))) fail_msg("trial %d: sigma", trial);
        /* rotation: (re*c - im*s, re*s + im*c), products rounded */
        float re = x[0], im = x[1];
        const float c = y[0], sn = y[1];
        cvq_cuda_host_rotate(&re, &im, c, sn);
        if (fbits(re) != fbits(x[0] * c - x[1] * sn) || fbits(im) != fbits(x[0] * sn + x[1] * c))
            fail_msg("trial %d: rotation", trial);
    }
    /* argmax of four: strict >, lowest index on ties, NaN never wins;
     * j -> bits (b2t, b2t+1): 0 -> (1,0), 1 -> (0,1), 2 -> (1,1), 3 -> (0,0) */
    const float vals[] = {0.0f, -0.0f, 1.0f, -1.0f, NAN, INFINITY, 2.0f};
    for (int a = 0; a < 7; a++)
        for (int b = 0; b < 7; b++)
            for (int c = 0; c < 7; c++)
                for (int d = 0; d < 7; d++) {
                    const float o[4] = {vals[a], vals[b], vals[c], vals[d]};
                    int j = 0;
                    float best = o[0];
                    for (int k = 1; k < 4; k++)
                        if (o[k] > best) {
                            best = o[k];
                            j = k;
                        }
                    const uint32_t want = j == 0 ? 1u : j == 1 ? 2u : j == 2 ? 3u : 0u;
                    if (cvq_cuda_host_argmax4_bits(o[0], o[1], o[2], o[3]) != want)
                        fail_msg("argmax4(%g, %g, %g, %g)", o[0], o[1], o[2], o[3]);
                }
    printf("steps: 400 trials of each step with wide-range inputs, argmax over 2401 cases: bit-identical\n");
}

/* ---- numerics: whole tokens ---------------------------------------------------------------------- */

typedef struct {
    uint32_t Hq, Hkv, d, R, F, Nc, I;
    cvq_key_scale_mode scale;
    cvq_pair_layout layout;
} geo_case;

static const geo_case k_cases[] = {
    {2, 1, 64, 3, 0, 64, 0, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_ROTATE_HALF},
    {4, 2, 64, 2, 64, 32, 48, CVQ_KEY_SCALE_HEAD, CVQ_PAIRS_INTERLEAVED},
    {3, 1, 80, 2, 0, 40, 0, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_INTERLEAVED},
    {8, 2, 128, 4, 128, 128, 0, CVQ_KEY_SCALE_HEAD, CVQ_PAIRS_ROTATE_HALF},
    {2, 1, 256, 1, 0, 16, 24, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_ROTATE_HALF},
};

static cvq_codebook *make_cb(const geo_case *c, uint64_t seed, cvq_geometry *g) {
    cvq_geometry G = {1, c->Hq, c->Hkv, c->d, c->R, c->scale, c->layout, c->F, c->Nc, c->I, 0.0f};
    CHECK_OK(cvq_geometry_resolve(&G));
    double theta[128];
    CHECK_OK(cvq_rope_freqs_default(c->d, 10000.0, theta));
    cvq_codebook *cb = NULL;
    CHECK_OK(cvq_codebook_random(&G, theta, seed, NULL, &cb));
    *g = G;
    return cb;
}

/* Token kinds: random, a copy of the previous token (same codes), a copy
 * of a scaled sub-code pair (argmin near ties), subnormal, huge, tiny, zero. */
static void fill_token(float *v, size_t kvd, size_t t, const float *prev, const float *w, uint32_t d) {
    const int kind = (int)(t % 9);
    if (kind == 1 && prev) {
        memcpy(v, prev, kvd * sizeof(float));
        return;
    }
    const double scale = kind == 3 ? 1e-40 : kind == 4 ? 1e18 : kind == 5 ? 1e-30 : 1.0;
    for (size_t i = 0; i < kvd; i++) v[i] = kind == 6 ? 0.0f : (float)(rnd_normal() * scale);
    if (kind == 2 && w) {
        for (size_t i = 0; i < d && i < kvd; i++) v[i] = w[i] * 3.0f; /* a sub-code row, as a key */
    }
    if (kind == 3) {
        v[0] = 1e-42f;
        v[kvd - 1] = -3e-41f;
    }
}

static void test_key_tokens(void **state) {
    (void)state;
    SKIP_UNLESS_COMPILED();
    size_t tokens = 0;
    for (size_t ci = 0; ci < sizeof k_cases / sizeof k_cases[0]; ci++) {
        const geo_case *c = &k_cases[ci];
        const uint64_t seed = 0xC0DE0000u + ci;
        cvq_geometry g;
        cvq_codebook *cb = make_cb(c, seed, &g);
        cvq_layer_view lv;
        CHECK_OK(cvq__layer_view(NULL, cb, 0, &lv));
        cvq_cu_geom cg;
        memset(&cg, 0, sizeof cg);
        cg.Hq = g.n_q_heads;
        cg.Hkv = g.n_kv_heads;
        cg.d = g.head_dim;
        cg.P = g.head_dim / 2;
        cg.R = g.key_stages;
        cg.layout = g.pair_layout == CVQ_PAIRS_INTERLEAVED;
        cg.scale_mode = g.key_scale == CVQ_KEY_SCALE_HEAD;
        const size_t kvd = (size_t)g.n_kv_heads * g.head_dim, HR = (size_t)g.n_kv_heads * g.key_stages;
        const size_t ns = g.key_scale == CVQ_KEY_SCALE_HEAD ? g.n_kv_heads : 1;
        float *k = malloc(kvd * 2 * sizeof(float));
        uint16_t c0[256], c1[256];
        float s0[16], s1[16];
        assert_non_null(k);
        rng_state = seed;
        for (size_t t = 0; t < 60; t++, tokens++) {
            float *v = k + (t % 2) * kvd;
            fill_token(v, kvd, t, t ? k + ((t + 1) % 2) * kvd : NULL, lv.key_w, g.head_dim);
            if (!cvq_ref_key_scales(&lv, v, s0)) continue; /* overflow: refused before any kernel */
            cvq_ref_encode_key_token(&lv, v, c0, s0);
            /* the kernel's block sizes: 128 threads, and others to vary the argmin split */
            const uint32_t threads = t % 3 == 0 ? 128u : t % 3 == 1 ? 64u : 7u;
            memset(c1, 0xFF, sizeof c1);
            cvq_cuda_host_encode_key_token(&cg, lv.key_w, lv.key_n, lv.key_G, v, threads, c1, s1);
            for (size_t j = 0; j < HR; j++)
                if (c0[j] != c1[j])
                    fail_msg("case %zu token %zu code %zu: CPU %u vs CUDA %u (seed 0x%llx)", ci, t, j, c0[j], c1[j],
                             (unsigned long long)seed);
            for (size_t j = 0; j < ns; j++)
                if (fbits(s0[j]) != fbits(s1[j]))
                    fail_msg("case %zu token %zu scale %zu: %a vs %a", ci, t, j, s0[j], s1[j]);
        }
        free(k);
        cvq_codebook_free(cb);
    }
    printf("keys: %zu tokens over %zu geometries bit-identical\n", tokens, sizeof k_cases / sizeof k_cases[0]);
}

/* Packs one layer's value tables as [groups][...] (what the device holds). */
static float *pack(const float *src, size_t per, size_t stride, size_t groups) {
    float *o = malloc(per * groups * sizeof(float));
    assert_non_null(o);
    for (size_t gi = 0; gi < groups; gi++) memcpy(o + gi * per, src + gi * stride, per * sizeof(float));
    return o;
}

static void test_value_tokens(void **state) {
    (void)state;
    SKIP_UNLESS_COMPILED();
    size_t tokens = 0;
    for (size_t ci = 0; ci < sizeof k_cases / sizeof k_cases[0]; ci++) {
        const geo_case *c = &k_cases[ci];
        const uint64_t seed = 0xFA1E0000u + ci;
        cvq_geometry g;
        cvq_codebook *cb = make_cb(c, seed, &g);
        cvq_layer_view lv;
        CHECK_OK(cvq__layer_view(NULL, cb, 0, &lv));
        const size_t G = lv.n_groups, F = g.value_group_width, I = g.value_hidden, Nc = g.value_bits;
        cvq_cu_geom cg;
        memset(&cg, 0, sizeof cg);
        cg.F = (uint32_t)F;
        cg.I = (uint32_t)I;
        cg.Nc = (uint32_t)Nc;
        cg.groups = (uint32_t)G;
        cg.inv_F = lv.inv_F;
        float *parts[9];
        cvq_cu_tables t;
        memset(&t, 0, sizeof t);
        t.inv_ls = parts[0] = pack(lv.val_inv_ls, F, lv.s_vec, G);
        t.ln_w = parts[1] = pack(lv.ln_w, F, lv.s_vec, G);
        t.ln_b = parts[2] = pack(lv.ln_b, F, lv.s_vec, G);
        t.w1 = parts[3] = pack(lv.w1, I * F, lv.s_w1, G);
        t.b1 = parts[4] = pack(lv.b1, I, lv.s_b1, G);
        t.w2 = parts[5] = pack(lv.w2, 2 * Nc * I, lv.s_w2, G);
        t.b2 = parts[6] = pack(lv.b2, 2 * Nc, lv.s_b2, G);
        t.E = parts[7] = pack(lv.E, Nc * F, lv.s_E, G);
        t.ls_eps = parts[8] = pack(lv.val_ls_eps, F, lv.s_vec, G);
        const size_t kvd = (size_t)g.n_kv_heads * g.head_dim;
        float *v = malloc(2 * kvd * sizeof(float));
        float *scratch = malloc(cvq_ref_value_scratch(&lv) * sizeof(float));
        uint8_t *b0 = malloc(G * Nc / 8), *b1 = malloc(G * Nc / 8);
        float *s0 = malloc(G * sizeof(float)), *s1 = malloc(G * sizeof(float));
        assert_true(v && scratch && b0 && b1 && s0 && s1);
        rng_state = seed;
        for (size_t tk = 0; tk < 24; tk++, tokens++) {
            float *x = v + (tk % 2) * kvd;
            fill_token(x, kvd, tk, tk ? v + ((tk + 1) % 2) * kvd : NULL, NULL, g.head_dim);
            if (!cvq_ref_value_check(&lv, x)) continue;
            cvq_ref_encode_value_token(&lv, x, b0, s0, scratch);
            memset(b1, 0x5A, G * Nc / 8);
            cvq_cuda_host_encode_value_token(&cg, &t, x, scratch, b1, s1);
            if (memcmp(b0, b1, G * Nc / 8) != 0)
                fail_msg("case %zu token %zu: value bits differ (seed 0x%llx)", ci, tk, (unsigned long long)seed);
            for (size_t gi = 0; gi < G; gi++)
                if (fbits(s0[gi]) != fbits(s1[gi]))
                    fail_msg("case %zu token %zu group %zu: sigma %a vs %a", ci, tk, gi, s0[gi], s1[gi]);
        }
        for (int i = 0; i < 9; i++) free(parts[i]);
        free(v);
        free(scratch);
        free(b0);
        free(b1);
        free(s0);
        free(s1);
        cvq_codebook_free(cb);
    }
    printf("values: %zu tokens over %zu geometries bit-identical\n", tokens, sizeof k_cases / sizeof k_cases[0]);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_device_status),  cmocka_unit_test(test_context_create_fails),
        cmocka_unit_test(test_auto_picks_other),  cmocka_unit_test(test_interop_refuses),
        cmocka_unit_test(test_sincos_phase),      cmocka_unit_test(test_erf_gelu),
        cmocka_unit_test(test_steps_vs_contract), cmocka_unit_test(test_key_tokens),
        cmocka_unit_test(test_value_tokens),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
