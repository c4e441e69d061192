/*
 * The Vulkan backend (backends/vulkan/) on whatever Vulkan device this
 * machine has (Mesa's lavapipe in CI), with the Khronos validation layer
 * enabled (COMMVQ_VK_VALIDATION=1, set here before the first context) and
 * every validation warning or error counted as a failure.
 *
 *  - devices: the listing, lavapipe reported as a software device, `auto`
 *    never picking one, explicit vulkan picking one, bad indices refused;
 *  - buffers: round trips through the backend's buffer entries in both
 *    memory modes (mapped, and staging with COMMVQ_VK_STAGING=1), odd sizes
 *    and offsets;
 *  - encoders: cvq_encode_keys / cvq_encode_values on a vulkan context
 *    bit-identical to the CPU context (codes, bits, scales, sigma) over
 *    small geometries (both pair layouts, both key scale modes, GQA, value
 *    groups), random, near-tie, subnormal, large, small and zero inputs,
 *    several hundred tokens, with guard bytes around every output;
 *  - attention: the same cache appends on both contexts, outputs within a
 *    tolerance of the CPU's (sums may run in another order on the device);
 *  - errors: non-finite input refused with nothing written.
 *
 * Without a Vulkan loader or device every test is skipped, visibly
 * ("skip: <reason>" on stdout, and cmocka's skipped status).
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
#include <sys/wait.h>
#include <unistd.h>

#include "backend.h"
#include "commvq.h"
#include "vulkan/vk_backend.h"

static bool g_skip;
static char g_skip_why[512];

#define SKIP_IF_NO_VULKAN()                                                                       \
    do {                                                                                          \
        if (g_skip) {                                                                             \
            printf("skip: %s\n", g_skip_why);                                                     \
            skip();                                                                               \
        }                                                                                         \
    } while (0)

#define CHECK_OK(call)                                                                            \
    do {                                                                                          \
        cvq_status st_ = (call);                                                                  \
        if (st_ != CVQ_OK) fail_msg("%s -> %s: %s", #call, cvq_status_name(st_), cvq_last_error()); \
    } while (0)

/* ---- data --------------------------------------------------------------------------------- */

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

/* Kinds of token data (per token, so one call mixes them). */
enum { D_RANDOM, D_TIE, D_SUBNORMAL, D_LARGE, D_SMALL, D_ZERO, D_KINDS };

/* n tokens of kvd floats: mostly random normal, with runs of the special
 * kinds: duplicated tokens (identical inputs must give identical codes;
 * with a random codebook they also sit on exact ties of the argmin when
 * the token is a sub-code itself), subnormal-scale values (1e-40), huge
 * (1e18) and tiny (1e-30) magnitudes and all-zero tokens. */
static void fill_tokens(float *x, size_t n, size_t kvd, uint64_t seed) {
    rng_state = seed;
    for (size_t t = 0; t < n; t++) {
        float *v = x + t * kvd;
        int kind = (int)(t % 17 == 3 ? D_TIE : t % 17 == 5 ? D_SUBNORMAL : t % 17 == 7 ? D_LARGE
                         : t % 17 == 11 ? D_SMALL : t % 17 == 13 ? D_ZERO : D_RANDOM);
        if (kind == D_TIE && t > 0) {
            memcpy(v, v - kvd, kvd * sizeof(float));
            continue;
        }
        double scale = kind == D_SUBNORMAL ? 1e-40 : kind == D_LARGE ? 1e18 : kind == D_SMALL ? 1e-30 : 1.0;
        for (size_t i = 0; i < kvd; i++) v[i] = kind == D_ZERO ? 0.0f : (float)(rnd_normal() * scale);
        if (kind == D_SUBNORMAL) {
            /* make sure some elements really are subnormal */
            v[0] = 1e-42f;
            v[kvd - 1] = -3e-41f;
        }
    }
}

/* ---- contexts ----------------------------------------------------------------------------- */

static cvq_context *make_ctx(cvq_backend_kind k, int device) {
    cvq_context_params p = cvq_context_default_params();
    p.backend = k;
    p.device = device;
    cvq_context *ctx = NULL;
    CHECK_OK(cvq_context_create(&p, &ctx));
    return ctx;
}

static cvq_codebook *make_cb(cvq_geometry *g, uint64_t seed) {
    CHECK_OK(cvq_geometry_resolve(g));
    double theta[128];
    CHECK_OK(cvq_rope_freqs_default(g->head_dim, 10000.0, theta));
    cvq_codebook *cb = NULL;
    CHECK_OK(cvq_codebook_random(g, theta, seed, NULL, &cb));
    return cb;
}

static void check_validation(void) {
    uint64_t m = cvq_vk_validation_messages();
    if (m) fail_msg("%llu Vulkan validation messages (printed above)", (unsigned long long)m);
}

/* ---- guarded outputs ---------------------------------------------------------------------- */

#define GUARD 64
static const uint8_t GUARD_BYTE = 0xA5;

typedef struct {
    uint8_t *base;
    size_t bytes;
} guarded;

static void *guarded_new(guarded *g, size_t bytes, uint8_t fill) {
    g->bytes = bytes;
    g->base = malloc(bytes + 2 * GUARD);
    assert_non_null(g->base);
    memset(g->base, GUARD_BYTE, GUARD);
    memset(g->base + GUARD, fill, bytes);
    memset(g->base + GUARD + bytes, GUARD_BYTE, GUARD);
    return g->base + GUARD;
}

static void guarded_check(const guarded *g, const char *what) {
    for (size_t i = 0; i < GUARD; i++) {
        if (g->base[i] != GUARD_BYTE) fail_msg("%s: guard byte %zu before the output was written", what, i);
        if (g->base[GUARD + g->bytes + i] != GUARD_BYTE)
            fail_msg("%s: guard byte %zu after the output was written", what, i);
    }
}

static void guarded_free(guarded *g) { free(g->base); }

/* ---- devices ------------------------------------------------------------------------------ */

static void test_devices(void **state) {
    (void)state;
    SKIP_IF_NO_VULKAN();
    cvq_device_info devs[32];
    size_t n = 0;
    CHECK_OK(cvq_list_devices(devs, 32, &n));
    size_t n_vk = 0, n_usable = 0, n_hw = 0;
    for (size_t i = 0; i < n && i < 32; i++) {
        const cvq_device_info *d = &devs[i];
        if (d->backend != CVQ_BACKEND_VULKAN) continue;
        n_vk++;
        printf("vulkan %u: %s [%s] type %d usable %d exactness %d, %s\n", d->index, d->name, d->driver,
               (int)d->type, d->usable, (int)d->exactness, d->note);
        assert_true(d->name[0] != 0);
        assert_true(d->driver[0] != 0);
        if (strstr(d->driver, "llvmpipe") || strstr(d->name, "llvmpipe"))
            assert_int_equal(d->type, CVQ_DEVICE_SOFTWARE);
        if (d->usable) {
            n_usable++;
            assert_true(d->max_buffer_bytes >= (1u << 27) || d->max_buffer_bytes >= (1u << 20));
            assert_true(d->shared_memory_bytes >= 16384);
            if (d->type != CVQ_DEVICE_SOFTWARE) n_hw++;
        }
    }
    assert_true(n_vk > 0);
    assert_int_equal(cvq_backend_available(CVQ_BACKEND_VULKAN), CVQ_OK);

    /* auto never picks a software device: with only software Vulkan
     * devices it is the CPU (unless a hardware GPU exists). */
    const char *env = getenv("COMMVQ_BACKEND");
    if (!env || !env[0]) {
        cvq_context *a = make_ctx(CVQ_BACKEND_AUTO, -1);
        cvq_device_info ai;
        CHECK_OK(cvq_context_device(a, &ai));
        assert_int_not_equal(ai.type, CVQ_DEVICE_SOFTWARE);
        if (n_hw == 0) assert_int_equal(cvq_context_backend(a), CVQ_BACKEND_CPU);
        cvq_context_free(a);
    }

    /* explicit vulkan, backend's choice: a usable device, and the context
     * reports the one it opened */
    cvq_context *v = make_ctx(CVQ_BACKEND_VULKAN, -1);
    assert_int_equal(cvq_context_backend(v), CVQ_BACKEND_VULKAN);
    cvq_device_info vi;
    CHECK_OK(cvq_context_device(v, &vi));
    assert_int_equal(vi.backend, CVQ_BACKEND_VULKAN);
    assert_true(vi.usable);
    if (n_hw > 0) assert_int_not_equal(vi.type, CVQ_DEVICE_SOFTWARE);
    cvq_context_free(v);

    /* every usable device by index */
    for (size_t i = 0; i < n && i < 32; i++) {
        if (devs[i].backend != CVQ_BACKEND_VULKAN || !devs[i].usable) continue;
        cvq_context *c = make_ctx(CVQ_BACKEND_VULKAN, (int)devs[i].index);
        cvq_device_info ci;
        CHECK_OK(cvq_context_device(c, &ci));
        assert_int_equal(ci.index, devs[i].index);
        assert_string_equal(ci.name, devs[i].name);
        cvq_context_free(c);
    }

    /* a device that does not exist */
    cvq_context_params p = cvq_context_default_params();
    p.backend = CVQ_BACKEND_VULKAN;
    p.device = 999;
    cvq_context *bad = NULL;
    assert_int_equal(cvq_context_create(&p, &bad), CVQ_ERR_NO_DEVICE);
    assert_null(bad);
    assert_non_null(strstr(cvq_last_error(), "999"));
    check_validation();
}

/* ---- buffers ------------------------------------------------------------------------------ */

static void buffer_round_trips(cvq_context *ctx) {
    const size_t sizes[] = {1, 2, 3, 4, 5, 7, 64, 1000, 4099, (1u << 20) + 3, (20u << 20) + 1};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        const size_t n = sizes[si];
        cvq_buffer b;
        CHECK_OK(cvq__buffer_alloc(ctx, n, &b));
        assert_non_null(b.handle);
        assert_int_equal(b.size, n);
        uint8_t *src = malloc(n), *dst = malloc(n + 8);
        assert_non_null(src);
        assert_non_null(dst);
        for (size_t i = 0; i < n; i++) src[i] = (uint8_t)(i * 131u + si * 7u + 1u);
        CHECK_OK(cvq__buffer_write(ctx, &b, 0, src, n));
        memset(dst, 0x5A, n + 8);
        CHECK_OK(cvq__buffer_read(ctx, &b, 0, dst, n));
        assert_memory_equal(src, dst, n);
        for (size_t i = n; i < n + 8; i++) assert_int_equal(dst[i], 0x5A);
        /* partial write at an odd offset, then partial read across it */
        if (n >= 7) {
            const size_t off = n / 3 + 1, len = n - off - 1;
            for (size_t i = 0; i < len; i++) src[off + i] = (uint8_t)~src[off + i];
            CHECK_OK(cvq__buffer_write(ctx, &b, off, src + off, len));
            CHECK_OK(cvq__buffer_read(ctx, &b, 1, dst, n - 1));
            assert_memory_equal(src + 1, dst, n - 1);
        }
        /* out of range is refused, not performed */
        assert_int_not_equal(cvq__buffer_write(ctx, &b, n, src, 1), CVQ_OK);
        free(src);
        free(dst);
        cvq__buffer_free(ctx, &b);
        assert_null(b.handle);
    }
}

static void test_buffers(void **state) {
    (void)state;
    SKIP_IF_NO_VULKAN();
    cvq_context *ctx = make_ctx(CVQ_BACKEND_VULKAN, -1);
    buffer_round_trips(ctx);
    cvq_context_free(ctx);
    /* the staging path (device-local buffers and copies) */
    setenv("COMMVQ_VK_STAGING", "1", 1);
    ctx = make_ctx(CVQ_BACKEND_VULKAN, -1);
    unsetenv("COMMVQ_VK_STAGING");
    cvq_buffer b;
    CHECK_OK(cvq__buffer_alloc(ctx, 16, &b));
    assert_null(b.host); /* not mapped in staging mode */
    cvq__buffer_free(ctx, &b);
    buffer_round_trips(ctx);
    cvq_context_free(ctx);
    check_validation();
}

/* ---- encoders ----------------------------------------------------------------------------- */

typedef struct {
    uint32_t Hq, Hkv, d, R, F, Nc;
    cvq_key_scale_mode scale;
    cvq_pair_layout layout;
    size_t n;
} enc_case;

static const enc_case k_enc_cases[] = {
    {4, 2, 64, 3, 64, 64, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_ROTATE_HALF, 300},
    {4, 2, 64, 2, 128, 32, CVQ_KEY_SCALE_HEAD, CVQ_PAIRS_INTERLEAVED, 257},
    {8, 1, 128, 4, 128, 128, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_INTERLEAVED, 200},
    {6, 3, 80, 1, 80, 16, CVQ_KEY_SCALE_HEAD, CVQ_PAIRS_ROTATE_HALF, 131},
    {2, 2, 96, 2, 0, 8, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_ROTATE_HALF, 64},
};

static cvq_geometry enc_geometry(const enc_case *c) {
    cvq_geometry g;
    memset(&g, 0, sizeof g);
    g.n_layers = 2;
    g.n_q_heads = c->Hq;
    g.n_kv_heads = c->Hkv;
    g.head_dim = c->d;
    g.key_stages = c->R;
    g.key_scale = c->scale;
    g.pair_layout = c->layout;
    g.value_group_width = c->F;
    g.value_bits = c->Nc;
    return g;
}

/* Case ci of k_enc_cases, both layers: vulkan keys == CPU keys. */
static void check_keys_case(cvq_context *cpu, cvq_context *vk, size_t ci) {
    const enc_case *c = &k_enc_cases[ci];
    cvq_geometry g = enc_geometry(c);
    cvq_codebook *cb = make_cb(&g, 100 + ci);
    const size_t kvd = (size_t)g.n_kv_heads * g.head_dim, n = c->n;
    const size_t n_codes = n * g.n_kv_heads * g.key_stages;
    const size_t ns = g.key_scale == CVQ_KEY_SCALE_HEAD ? g.n_kv_heads : 1;
    float *keys = malloc(n * kvd * sizeof(float));
    assert_non_null(keys);
    fill_tokens(keys, n, kvd, 1000 + ci);
    for (uint32_t layer = 0; layer < 2; layer++) {
        guarded gc0, gs0, gc1, gs1;
        uint16_t *c0 = guarded_new(&gc0, n_codes * 2, 0x11), *c1 = guarded_new(&gc1, n_codes * 2, 0x22);
        float *s0 = guarded_new(&gs0, n * ns * 4, 0x33), *s1 = guarded_new(&gs1, n * ns * 4, 0x44);
        CHECK_OK(cvq_encode_keys(cpu, cb, layer, keys, CVQ_F32, n, c0, s0));
        cvq_status st = cvq_encode_keys(vk, cb, layer, keys, CVQ_F32, n, c1, s1);
        if (st != CVQ_OK)
            fail_msg("case %zu layer %u: vulkan encode_keys -> %s: %s", ci, layer, cvq_status_name(st),
                     cvq_last_error());
        for (size_t i = 0; i < n_codes; i++)
            if (c0[i] != c1[i])
                fail_msg("case %zu layer %u: code %zu (token %zu) cpu %u vulkan %u", ci, layer, i,
                         i / (g.n_kv_heads * g.key_stages), c0[i], c1[i]);
        for (size_t i = 0; i < n * ns; i++)
            if (memcmp(&s0[i], &s1[i], 4) != 0)
                fail_msg("case %zu layer %u: scale %zu cpu %a vulkan %a", ci, layer, i, (double)s0[i],
                         (double)s1[i]);
        guarded_check(&gc1, "vulkan codes");
        guarded_check(&gs1, "vulkan scales");
        guarded_free(&gc0);
        guarded_free(&gs0);
        guarded_free(&gc1);
        guarded_free(&gs1);
    }
    free(keys);
    cvq_codebook_free(cb);
}

static void test_encode_keys(void **state) {
    (void)state;
    SKIP_IF_NO_VULKAN();
    cvq_context *cpu = make_ctx(CVQ_BACKEND_CPU, -1), *vk = make_ctx(CVQ_BACKEND_VULKAN, -1);
    for (size_t ci = 0; ci < sizeof k_enc_cases / sizeof k_enc_cases[0]; ci++) check_keys_case(cpu, vk, ci);
    cvq_context_free(vk);
    cvq_context_free(cpu);
    check_validation();
}

/* Case ci of k_enc_cases, both layers: vulkan values == CPU values. */
static void check_values_case(cvq_context *cpu, cvq_context *vk, size_t ci) {
    const enc_case *c = &k_enc_cases[ci];
    cvq_geometry g = enc_geometry(c);
    cvq_codebook *cb = make_cb(&g, 200 + ci);
    const size_t kvd = (size_t)g.n_kv_heads * g.head_dim, n = c->n;
    const size_t groups = kvd / g.value_group_width, nb = n * groups * (g.value_bits / 8);
    float *vals = malloc(n * kvd * sizeof(float));
    assert_non_null(vals);
    fill_tokens(vals, n, kvd, 2000 + ci);
    for (uint32_t layer = 0; layer < 2; layer++) {
        guarded gb0, gs0, gb1, gs1;
        uint8_t *b0 = guarded_new(&gb0, nb, 0x11), *b1 = guarded_new(&gb1, nb, 0x22);
        float *s0 = guarded_new(&gs0, n * groups * 4, 0x33), *s1 = guarded_new(&gs1, n * groups * 4, 0x44);
        CHECK_OK(cvq_encode_values(cpu, cb, layer, vals, CVQ_F32, n, b0, s0));
        cvq_status st = cvq_encode_values(vk, cb, layer, vals, CVQ_F32, n, b1, s1);
        if (st != CVQ_OK)
            fail_msg("case %zu layer %u: vulkan encode_values -> %s: %s", ci, layer, cvq_status_name(st),
                     cvq_last_error());
        for (size_t i = 0; i < nb; i++)
            if (b0[i] != b1[i])
                fail_msg("case %zu layer %u: bit byte %zu (token %zu) cpu 0x%02x vulkan 0x%02x", ci, layer, i,
                         i / (groups * (g.value_bits / 8)), b0[i], b1[i]);
        for (size_t i = 0; i < n * groups; i++)
            if (memcmp(&s0[i], &s1[i], 4) != 0)
                fail_msg("case %zu layer %u: sigma %zu cpu %a vulkan %a", ci, layer, i, (double)s0[i],
                         (double)s1[i]);
        guarded_check(&gb1, "vulkan bits");
        guarded_check(&gs1, "vulkan sigma");
        guarded_free(&gb0);
        guarded_free(&gs0);
        guarded_free(&gb1);
        guarded_free(&gs1);
    }
    free(vals);
    cvq_codebook_free(cb);
}

static void test_encode_values(void **state) {
    (void)state;
    SKIP_IF_NO_VULKAN();
    cvq_context *cpu = make_ctx(CVQ_BACKEND_CPU, -1), *vk = make_ctx(CVQ_BACKEND_VULKAN, -1);
    for (size_t ci = 0; ci < sizeof k_enc_cases / sizeof k_enc_cases[0]; ci++) check_values_case(cpu, vk, ci);
    cvq_context_free(vk);
    cvq_context_free(cpu);
    check_validation();
}

/* fp16 input and a codebook changed between calls (the device tables must
 * follow the codebook, not a stale upload). */
static void test_encode_fp16_and_commit(void **state) {
    (void)state;
    SKIP_IF_NO_VULKAN();
    cvq_context *cpu = make_ctx(CVQ_BACKEND_CPU, -1), *vk = make_ctx(CVQ_BACKEND_VULKAN, -1);
    cvq_geometry g = enc_geometry(&k_enc_cases[0]);
    cvq_codebook *cb = make_cb(&g, 77);
    const size_t kvd = (size_t)g.n_kv_heads * g.head_dim, n = 40;
    const size_t n_codes = n * g.n_kv_heads * g.key_stages;
    float *f = malloc(n * kvd * sizeof(float));
    uint16_t *h = malloc(n * kvd * sizeof(uint16_t));
    uint16_t *c0 = malloc(n_codes * 2), *c1 = malloc(n_codes * 2);
    float s0[64], s1[64];
    assert_true(f && h && c0 && c1);
    rng_state = 5; /* binary16 range: plain normal data, some subnormal halves */
    for (size_t i = 0; i < n * kvd; i++) f[i] = (float)(rnd_normal() * (i % 97 == 0 ? 1e-6 : 1.0));
    for (size_t i = 0; i < n * kvd; i++) h[i] = cvq_f32_to_f16(f[i]);
    for (int round = 0; round < 2; round++) {
        CHECK_OK(cvq_encode_keys(cpu, cb, 1, h, CVQ_F16, n, c0, s0));
        CHECK_OK(cvq_encode_keys(vk, cb, 1, h, CVQ_F16, n, c1, s1));
        assert_memory_equal(c0, c1, n_codes * 2);
        assert_memory_equal(s0, s1, n * sizeof(float));
        /* change layer 1's first stage and commit: the next round must
         * use the new sub-codes on the device too */
        float *w;
        CHECK_OK(cvq_codebook_tensor_data(cb, CVQ_T_KEY_W, 1, 0, &w));
        for (size_t i = 0; i < 64 * g.head_dim; i++) w[i] = -w[i] * 0.75f;
        CHECK_OK(cvq_codebook_commit(cb));
    }
    free(f);
    free(h);
    free(c0);
    free(c1);
    cvq_codebook_free(cb);
    cvq_context_free(vk);
    cvq_context_free(cpu);
    check_validation();
}

/* A codebook freed and another created (very likely at the same address,
 * with the same generation count): the device must not reuse the first
 * one's tables. */
static void test_codebook_replaced(void **state) {
    (void)state;
    SKIP_IF_NO_VULKAN();
    cvq_context *cpu = make_ctx(CVQ_BACKEND_CPU, -1), *vk = make_ctx(CVQ_BACKEND_VULKAN, -1);
    cvq_geometry g = enc_geometry(&k_enc_cases[1]);
    const size_t kvd = (size_t)g.n_kv_heads * g.head_dim, n = 50;
    const size_t n_codes = n * g.n_kv_heads * g.key_stages;
    float *x = malloc(n * kvd * 4), s0[100], s1[100];
    uint16_t c0[50 * 2 * 2], c1[50 * 2 * 2];
    assert_non_null(x);
    rng_state = 11;
    for (size_t i = 0; i < n * kvd; i++) x[i] = (float)rnd_normal();
    int differs = 0;
    uint16_t first[50 * 2 * 2];
    for (int round = 0; round < 3; round++) {
        cvq_geometry gg = g;
        cvq_codebook *cb = make_cb(&gg, 1000 + (uint64_t)round);
        CHECK_OK(cvq_encode_keys(cpu, cb, 0, x, CVQ_F32, n, c0, s0));
        CHECK_OK(cvq_encode_keys(vk, cb, 0, x, CVQ_F32, n, c1, s1));
        assert_memory_equal(c0, c1, n_codes * 2);
        if (round == 0) memcpy(first, c0, sizeof first);
        else if (memcmp(first, c0, sizeof first) != 0) differs = 1;
        cvq_codebook_free(cb);
    }
    assert_true(differs); /* the codebooks really were different */
    free(x);
    cvq_context_free(vk);
    cvq_context_free(cpu);
    check_validation();
}

/* ---- attention ---------------------------------------------------------------------------- */

typedef struct {
    uint32_t Hq, Hkv, d, R, F, Nc;
    cvq_pair_layout layout;
    cvq_key_scale_mode scale;
    uint32_t sinks, window;
    size_t T, n_q;
} att_case;

static const att_case k_att_cases[] = {
    {4, 2, 64, 2, 64, 64, CVQ_PAIRS_ROTATE_HALF, CVQ_KEY_SCALE_TOKEN, 4, 32, 200, 3},
    {6, 2, 64, 3, 128, 32, CVQ_PAIRS_INTERLEAVED, CVQ_KEY_SCALE_HEAD, 0, 16, 150, 2},
    {3, 3, 128, 1, 128, 64, CVQ_PAIRS_ROTATE_HALF, CVQ_KEY_SCALE_TOKEN, 2, 0, 100, 1},
    {8, 1, 64, 2, 64, 16, CVQ_PAIRS_INTERLEAVED, CVQ_KEY_SCALE_TOKEN, 0, 8, 5, 4}, /* all in window */
};

/* Case ci of k_att_cases: the same appends on both contexts, attention
 * outputs within a float-reordering tolerance of the CPU's. */
static void check_attend_case(cvq_context *cpu, cvq_context *vk, size_t ci) {
    const att_case *c = &k_att_cases[ci];
    cvq_geometry g;
    memset(&g, 0, sizeof g);
    g.n_layers = 1;
    g.n_q_heads = c->Hq;
    g.n_kv_heads = c->Hkv;
    g.head_dim = c->d;
    g.key_stages = c->R;
    g.key_scale = c->scale;
    g.pair_layout = c->layout;
    g.value_group_width = c->F;
    g.value_bits = c->Nc;
    cvq_codebook *cb = make_cb(&g, 300 + ci);
    const size_t kvd = (size_t)g.n_kv_heads * g.head_dim, T = c->T;
    const size_t qd = (size_t)g.n_q_heads * g.head_dim, nq = c->n_q;
    float *k = malloc(T * kvd * 4), *v = malloc(T * kvd * 4), *q = malloc(nq * qd * 4);
    int32_t *pos = malloc(T * 4), qpos[16];
    assert_true(k && v && q && pos && nq <= 16);
    rng_state = 4000 + ci;
    for (size_t i = 0; i < T * kvd; i++) k[i] = (float)rnd_normal();
    for (size_t i = 0; i < T * kvd; i++) v[i] = (float)rnd_normal();
    for (size_t i = 0; i < nq * qd; i++) q[i] = (float)rnd_normal();
    for (size_t t = 0; t < T; t++) pos[t] = (int32_t)(3 * t + 1);
    /* queries: after everything, in the middle (causal cut), before all */
    for (size_t i = 0; i < nq; i++)
        qpos[i] = i == 0 ? (int32_t)(3 * T + 5) : i == 1 ? (int32_t)(3 * (T / 2)) : i == 2 ? 0 : (int32_t)(7 * i);
    cvq_cache_params cp = cvq_cache_default_params();
    cp.sinks = c->sinks;
    cp.window = c->window;
    cvq_cache *c0 = NULL, *c1 = NULL;
    CHECK_OK(cvq_cache_create(cpu, cb, &cp, &c0));
    CHECK_OK(cvq_cache_create(vk, cb, &cp, &c1));
    /* appends in uneven pieces */
    for (size_t t0 = 0; t0 < T;) {
        size_t m = 1 + (t0 * 7 + 3) % 37;
        if (m > T - t0) m = T - t0;
        CHECK_OK(cvq_cache_append(c0, k + t0 * kvd, v + t0 * kvd, CVQ_F32, pos + t0, m));
        CHECK_OK(cvq_cache_append(c1, k + t0 * kvd, v + t0 * kvd, CVQ_F32, pos + t0, m));
        t0 += m;
    }
    for (uint32_t flags = 0; flags <= CVQ_ATTEND_QUERIES_ROTATED; flags++) {
        float *o0 = malloc(nq * qd * 4);
        guarded go1;
        float *o1 = guarded_new(&go1, nq * qd * 4, 0x7F);
        assert_non_null(o0);
        CHECK_OK(cvq_cache_attend(c0, q, qpos, nq, flags, o0));
        cvq_status st = cvq_cache_attend(c1, q, qpos, nq, flags, o1);
        if (st != CVQ_OK)
            fail_msg("case %zu: vulkan attend -> %s: %s", ci, cvq_status_name(st), cvq_last_error());
        double worst = 0.0;
        for (size_t i = 0; i < nq * qd; i++) {
            /* values are O(1): an absolute bound of float reordering */
            double e = fabs((double)o0[i] - (double)o1[i]);
            if (!(e <= 2e-4 * (1.0 + fabs((double)o0[i]))))
                fail_msg("case %zu flags %u: out %zu (query %zu) cpu %.9g vulkan %.9g", ci, flags, i, i / qd,
                         (double)o0[i], (double)o1[i]);
            if (e > worst) worst = e;
        }
        printf("attend case %zu flags %u: max |cpu - vulkan| = %.3g\n", ci, flags, worst);
        guarded_check(&go1, "vulkan attend out");
        guarded_free(&go1);
        free(o0);
    }
    cvq_cache_free(c0);
    cvq_cache_free(c1);
    free(k);
    free(v);
    free(q);
    free(pos);
    cvq_codebook_free(cb);
}

static void test_attend(void **state) {
    (void)state;
    SKIP_IF_NO_VULKAN();
    cvq_context *cpu = make_ctx(CVQ_BACKEND_CPU, -1), *vk = make_ctx(CVQ_BACKEND_VULKAN, -1);
    for (size_t ci = 0; ci < sizeof k_att_cases / sizeof k_att_cases[0]; ci++) check_attend_case(cpu, vk, ci);
    cvq_context_free(vk);
    cvq_context_free(cpu);
    check_validation();
}

/* The splitting paths: tiny scratch budget (many chunks at aligned
 * offsets, more descriptor sets than one pool holds, so mid-op
 * submissions) and at most 3 workgroups per dispatch; the staging memory
 * mode on top. Results must not change. */
static void test_split_paths(void **state) {
    (void)state;
    SKIP_IF_NO_VULKAN();
    cvq_context *cpu = make_ctx(CVQ_BACKEND_CPU, -1);
    setenv("COMMVQ_VK_SCRATCH_BUDGET", "6000", 1);
    setenv("COMMVQ_VK_MAX_GROUPS", "3", 1);
    cvq_context *vk = make_ctx(CVQ_BACKEND_VULKAN, -1);
    setenv("COMMVQ_VK_STAGING", "1", 1);
    cvq_context *vks = make_ctx(CVQ_BACKEND_VULKAN, -1);
    unsetenv("COMMVQ_VK_STAGING");
    unsetenv("COMMVQ_VK_SCRATCH_BUDGET");
    unsetenv("COMMVQ_VK_MAX_GROUPS");
    check_keys_case(cpu, vk, 0);
    check_keys_case(cpu, vk, 3);
    check_values_case(cpu, vk, 0);
    check_values_case(cpu, vk, 1);
    check_attend_case(cpu, vk, 0);
    check_keys_case(cpu, vks, 1);
    check_values_case(cpu, vks, 2);
    check_attend_case(cpu, vks, 1);
    cvq_context_free(vks);
    cvq_context_free(vk);
    cvq_context_free(cpu);
    check_validation();
}

/* ---- llvmpipe's loop limit ----------------------------------------------------------------
 * llvmpipe stops every loop of a shader invocation after 65535 iterations
 * in total. A window of 50,000 full-precision tokens (about 51,000
 * iterations per invocation at the largest workgroup) must still give the
 * right attention there; one of 70,000 must be refused, not computed
 * wrong. Other drivers have no such limit and must compute both. */
static void test_loop_budget(void **state) {
    (void)state;
    SKIP_IF_NO_VULKAN();
    cvq_context *cpu = make_ctx(CVQ_BACKEND_CPU, -1), *vk = make_ctx(CVQ_BACKEND_VULKAN, -1);
    cvq_device_info di;
    CHECK_OK(cvq_context_device(vk, &di));
    const bool llvmpipe = strstr(di.driver, "llvmpipe") != NULL;
    cvq_geometry g;
    memset(&g, 0, sizeof g);
    g.n_layers = 1;
    g.n_q_heads = 2;
    g.n_kv_heads = 1;
    g.head_dim = 64;
    g.key_stages = 1;
    g.value_bits = 8;
    cvq_codebook *cb = make_cb(&g, 41);
    const size_t sizes[2] = {50000, 70000};
    const size_t kvd = 64, qd = 128;
    float *k = malloc(70000 * kvd * 4), *v = malloc(70000 * kvd * 4), q[128], o0[128], o1[128];
    int32_t *pos = malloc(70000 * 4);
    assert_true(k && v && pos);
    rng_state = 51;
    for (size_t i = 0; i < 70000 * kvd; i++) k[i] = (float)rnd_normal() * 0.1f;
    for (size_t i = 0; i < 70000 * kvd; i++) v[i] = (float)rnd_normal();
    for (size_t i = 0; i < qd; i++) q[i] = (float)rnd_normal();
    for (size_t t = 0; t < 70000; t++) pos[t] = (int32_t)t;
    for (int si = 0; si < 2; si++) {
        const size_t T = sizes[si];
        cvq_cache_params cp = cvq_cache_default_params();
        cp.window = (uint32_t)T; /* everything stays in the window */
        cvq_cache *c0 = NULL, *c1 = NULL;
        CHECK_OK(cvq_cache_create(cpu, cb, &cp, &c0));
        CHECK_OK(cvq_cache_create(vk, cb, &cp, &c1));
        CHECK_OK(cvq_cache_append(c0, k, v, CVQ_F32, pos, T));
        CHECK_OK(cvq_cache_append(c1, k, v, CVQ_F32, pos, T));
        int32_t qp = (int32_t)T;
        CHECK_OK(cvq_cache_attend(c0, q, &qp, 1, 0, o0));
        memset(o1, 0x7F, sizeof o1);
        cvq_status st = cvq_cache_attend(c1, q, &qp, 1, 0, o1);
        if (si == 1 && llvmpipe) {
            assert_int_equal(st, CVQ_ERR_UNSUPPORTED);
            assert_non_null(strstr(cvq_last_error(), "loop"));
            for (size_t i = 0; i < qd; i++) assert_int_equal(memcmp(&o1[i], "\x7f\x7f\x7f\x7f", 4), 0);
        } else {
            if (st != CVQ_OK) fail_msg("window %zu: %s: %s", T, cvq_status_name(st), cvq_last_error());
            for (size_t i = 0; i < qd; i++)
                if (!(fabs((double)o0[i] - (double)o1[i]) <= 1e-4 * (1.0 + fabs((double)o0[i]))))
                    fail_msg("window %zu: out %zu cpu %.9g vulkan %.9g", T, i, (double)o0[i], (double)o1[i]);
        }
        cvq_cache_free(c0);
        cvq_cache_free(c1);
    }
    free(k);
    free(v);
    free(pos);
    cvq_codebook_free(cb);
    cvq_context_free(vk);
    cvq_context_free(cpu);
    check_validation();
}

/* ---- allocation failures ------------------------------------------------------------------
 * Every host allocation of a Vulkan session failed in turn: each must come
 * back as CVQ_ERR_OUT_OF_MEMORY with nothing leaked, neither host memory
 * (counted here) nor Vulkan objects (the validation layer reports children
 * left alive when the device is destroyed). */

typedef struct {
    long n_alloc, n_free, fail_at; /* fail the fail_at-th allocation (1-based), 0 = never */
} counting;

static void *cnt_alloc(void *user, size_t size, size_t align) {
    counting *c = user;
    c->n_alloc++;
    if (c->fail_at && c->n_alloc == c->fail_at) {
        c->n_alloc--;
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

static cvq_status vk_session(const cvq_allocator *a, const cvq_codebook *cb, const cvq_geometry *g) {
    enum { T = 24 };
    const size_t kvd = (size_t)g->n_kv_heads * g->head_dim;
    static float k[T * 128], v[T * 128], q[2 * 4 * 64], out[2 * 4 * 64];
    static uint16_t codes[T * 2 * 3];
    static float scales[T], sig[T * 2];
    static uint8_t bits[T * 2 * 8];
    rng_state = 21;
    for (size_t i = 0; i < T * kvd; i++) k[i] = (float)rnd_normal();
    for (size_t i = 0; i < T * kvd; i++) v[i] = (float)rnd_normal();
    for (size_t i = 0; i < sizeof q / sizeof q[0]; i++) q[i] = (float)rnd_normal();
    int32_t pos[T], qp[2] = {T, T / 2};
    for (int i = 0; i < T; i++) pos[i] = i;
    cvq_context_params p = cvq_context_default_params();
    p.backend = CVQ_BACKEND_VULKAN;
    p.allocator = a;
    cvq_context *ctx = NULL;
    cvq_cache *c = NULL;
    cvq_cache_params cp = cvq_cache_default_params();
    cp.window = 4;
    cp.sinks = 1;
    cvq_status st = cvq_context_create(&p, &ctx);
    if (!st) st = cvq_cache_create(ctx, cb, &cp, &c);
    if (!st) st = cvq_cache_append(c, k, v, CVQ_F32, pos, 9);
    if (!st) st = cvq_cache_append(c, k + 9 * kvd, v + 9 * kvd, CVQ_F32, pos + 9, T - 9);
    if (!st) st = cvq_cache_attend(c, q, qp, 2, 0, out);
    if (!st) st = cvq_encode_keys(ctx, cb, 1, k, CVQ_F32, T, codes, scales);
    if (!st) st = cvq_encode_values(ctx, cb, 1, v, CVQ_F32, T, bits, sig);
    cvq_cache_free(c);
    cvq_context_free(ctx);
    return st;
}

static void test_alloc_failures(void **state) {
    (void)state;
    SKIP_IF_NO_VULKAN();
    cvq_geometry g = enc_geometry(&k_enc_cases[0]);
    cvq_codebook *cb = make_cb(&g, 31);
    counting cnt = {0, 0, 0};
    cvq_allocator a = {cnt_alloc, cnt_free, &cnt};
    CHECK_OK(vk_session(&a, cb, &g));
    const long total = cnt.n_alloc;
    assert_true(total > 10);
    assert_int_equal(cnt.n_alloc, cnt.n_free);
    long failures = 0;
    for (long n = 1; n <= total; n++) {
        cnt.n_alloc = cnt.n_free = 0;
        cnt.fail_at = n;
        cvq_status st = vk_session(&a, cb, &g);
        if (st != CVQ_OK) {
            failures++;
            if (st != CVQ_ERR_OUT_OF_MEMORY)
                fail_msg("failing allocation %ld gave %s (%s)", n, cvq_status_name(st), cvq_last_error());
        }
        if (cnt.n_alloc != cnt.n_free)
            fail_msg("failing allocation %ld: %ld allocations, %ld frees (leak)", n, cnt.n_alloc, cnt.n_free);
    }
    printf("vulkan allocation failure injection: %ld allocations in a session, %ld injected failures, all "
           "CVQ_ERR_OUT_OF_MEMORY without leaks\n", total, failures);
    assert_int_equal(failures, total);
    cvq_codebook_free(cb);
    check_validation();
}

/* ---- errors ------------------------------------------------------------------------------- */

static void test_nonfinite_refused(void **state) {
    (void)state;
    SKIP_IF_NO_VULKAN();
    cvq_context *vk = make_ctx(CVQ_BACKEND_VULKAN, -1);
    cvq_geometry g = enc_geometry(&k_enc_cases[0]);
    cvq_codebook *cb = make_cb(&g, 9);
    const size_t kvd = (size_t)g.n_kv_heads * g.head_dim, n = 8;
    float *x = malloc(n * kvd * 4);
    assert_non_null(x);
    fill_tokens(x, n, kvd, 3);
    x[5 * kvd + 7] = NAN;
    uint16_t codes[8 * 2 * 3];
    float scales[8];
    memset(codes, 0xEE, sizeof codes);
    memset(scales, 0xEE, sizeof scales);
    assert_int_equal(cvq_encode_keys(vk, cb, 0, x, CVQ_F32, n, codes, scales), CVQ_ERR_NONFINITE_INPUT);
    for (size_t i = 0; i < sizeof codes / 2; i++) assert_int_equal(codes[i], 0xEEEE);
    uint8_t bits[8 * 2 * 8];
    float sig[16];
    memset(bits, 0xEE, sizeof bits);
    assert_int_equal(cvq_encode_values(vk, cb, 0, x, CVQ_F32, n, bits, sig), CVQ_ERR_NONFINITE_INPUT);
    for (size_t i = 0; i < sizeof bits; i++) assert_int_equal(bits[i], 0xEE);
    free(x);
    cvq_codebook_free(cb);
    cvq_context_free(vk);
    check_validation();
}

/* ---- without a loader or a driver ---------------------------------------------------------
 * The process-wide instance is made once, so each situation runs in a
 * child process forked before this process touches Vulkan. The child's
 * exit status says which check failed (0: all passed). */

static int child_no_vulkan(const char *env, const char *value, const char *want_msg) {
    setenv(env, value, 1);
    cvq_device_info devs[8];
    size_t n = 99;
    if (cvq_list_devices(devs, 8, &n) != CVQ_OK) return 2; /* still lists the CPU */
    for (size_t i = 0; i < n && i < 8; i++)
        if (devs[i].backend == CVQ_BACKEND_VULKAN) return 3;
    if (cvq_backend_available(CVQ_BACKEND_VULKAN) != CVQ_ERR_NO_DEVICE) return 4;
    if (!strstr(cvq_last_error(), want_msg)) {
        fprintf(stderr, "message: %s\n", cvq_last_error());
        return 5;
    }
    cvq_context_params p = cvq_context_default_params();
    cvq_context *ctx = NULL;
    if (cvq_context_create(&p, &ctx) != CVQ_OK || cvq_context_backend(ctx) != CVQ_BACKEND_CPU) return 6;
    cvq_context_free(ctx);
    p.backend = CVQ_BACKEND_VULKAN;
    ctx = NULL;
    if (cvq_context_create(&p, &ctx) != CVQ_ERR_NO_DEVICE || ctx) return 7;
    if (!strstr(cvq_last_error(), want_msg)) return 8;
    return 0;
}

static int g_no_loader_rc = -1, g_no_driver_rc = -1;

static int run_child(const char *env, const char *value, const char *want_msg) {
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) return 100;
    if (pid == 0) _exit(child_no_vulkan(env, value, want_msg));
    int status = 0;
    if (waitpid(pid, &status, 0) != pid) return 101;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 102;
}

static void test_without_vulkan(void **state) {
    (void)state;
    if (!cvq__backend_compiled(CVQ_BACKEND_VULKAN)) {
        printf("skip: the Vulkan backend is not compiled into this build\n");
        skip();
    }
    if (g_no_loader_rc != 0) fail_msg("no loader: check %d failed", g_no_loader_rc);
    if (g_no_driver_rc != 0) fail_msg("no driver: check %d failed", g_no_driver_rc);
}

int main(void) {
    /* Before anything touches Vulkan in this process. */
    if (cvq__backend_compiled(CVQ_BACKEND_VULKAN)) {
        g_no_loader_rc = run_child("COMMVQ_VULKAN_LOADER", "/nonexistent/libvulkan.so.1", "no Vulkan loader");
        g_no_driver_rc = run_child("VK_ICD_FILENAMES", "/nonexistent/icd.json", "no Vulkan device");
    }
    /* Validation on unless the caller chose otherwise; read when the
     * process's Vulkan instance is created, i.e. before any context. */
    setenv("COMMVQ_VK_VALIDATION", "1", 0);
    if (!cvq__backend_compiled(CVQ_BACKEND_VULKAN)) {
        g_skip = true;
        snprintf(g_skip_why, sizeof g_skip_why, "the Vulkan backend is not compiled into this build");
    } else {
        cvq_status st = cvq_backend_available(CVQ_BACKEND_VULKAN);
        if (st != CVQ_OK) {
            g_skip = true;
            snprintf(g_skip_why, sizeof g_skip_why, "no Vulkan device: %s", cvq_last_error());
        }
    }
    if (g_skip) {
        printf("skip: %s\n", g_skip_why);
    } else {
        printf("vulkan validation layer: %s\n", cvq_vk_validation_enabled() ? "on" : "off (not installed?)");
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_without_vulkan),
        cmocka_unit_test(test_devices),
        cmocka_unit_test(test_buffers),
        cmocka_unit_test(test_encode_keys),
        cmocka_unit_test(test_encode_values),
        cmocka_unit_test(test_encode_fp16_and_commit),
        cmocka_unit_test(test_codebook_replaced),
        cmocka_unit_test(test_attend),
        cmocka_unit_test(test_split_paths),
        cmocka_unit_test(test_nonfinite_refused),
        cmocka_unit_test(test_loop_budget),
        cmocka_unit_test(test_alloc_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
