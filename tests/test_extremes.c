/*
 * Numerical robustness (issue 8, item 6): keys and values in f32, f16 and
 * bf16 at their extremes, through every backend present (the conformance
 * harness's list: CPU reference kernels, CPU default kernels, every CUDA and
 * Vulkan device that opens; an absent backend is a visible skip line).
 *
 * For every (case, dtype, backend) the outcome is what docs/numerics.md
 * section 1 prescribes, worked out here from the input bits alone:
 *  - any NaN/Inf element: CVQ_ERR_NONFINITE_INPUT (item 2);
 *  - a key token whose fp32 sum of squares (ascending, each product and sum
 *    rounded) is +Inf, or a value group whose sum of squares of
 *    v[j] * fl(1/fl(ls[j] + 1e-6f)) is +Inf: CVQ_ERR_INPUT_RANGE (item 3);
 *  - otherwise a defined result: key scale == sqrtf(sum of squares) bit for
 *    bit, a token whose sum is 0 (all zeros, or every square underflowed) has
 *    scale 0 and every code 0 and decodes to zeros (item 4); codes, scales,
 *    value bits and sigma bit-identical to the CPU reference kernels on every
 *    backend (section 9); decoded keys and values finite; sigma finite.
 * A failing call writes nothing (guard-banded outputs) and a cache keeps its
 * state (statistics and attention output bit for bit); a cache that accepted
 * the tokens attends to a finite output, with the extreme tokens both in the
 * full-precision window and compressed.
 * Also: signed zeros never change a code (section 8), and attention whose
 * logits overflow binary32 gives CVQ_ERR_INPUT_RANGE with the output zeroed
 * (include/commvq.h, cvq_cache_attend).
 */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commvq.h"
#include "harness.h"

enum { T = 3, NQ = 2, HKV = 2, HQ = 4, D = 64, KVD = HKV * D };

static th_backends g_bs;
/* Two codebooks: key scale per token (mode 0, the paper's) and per KV head
 * (mode 1). select_mode() points the globals below at one of them. */
static const char *const k_mode_names[2] = {"token scale", "head scale"};
static cvq_codebook *g_cbs[2];
static float g_inv_lss[2][KVD];
static cvq_geometry g_geom;
static cvq_codebook *g_cb;
static int g_head;          /* 1: one key scale per KV head */
static float g_inv_ls[KVD]; /* fl(1 / fl(ls + 1e-6f)) per value feature (groups of D) */
static size_t g_n_codes, g_n_scales, g_n_bytes, g_n_sig;
static size_t g_n_bitwise; /* encodes compared bit for bit with the CPU reference */

/* ---- element kinds and their bits in each dtype --------------------------------- */

typedef enum {
    K_NORM,   /* N(0,1) rounded to the dtype                 */
    K_MAX,    /* largest finite                              */
    K_MINN,   /* smallest normal                             */
    K_SUBMIN, /* smallest subnormal                          */
    K_SUBMAX, /* largest subnormal                           */
    K_ZERO,   /* +0                                          */
    K_NZERO,  /* -0                                          */
    K_E18,    /* 1e18 (f16: its largest finite)              */
    K_SSOVF,  /* 5e18: square finite, 64 squares overflow
                 (f16: its largest finite)                   */
    K_NAN,
    K_SNAN,   /* signalling NaN pattern                      */
    K_INF
} kind;

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* Magnitude bits of a kind in a dtype (sign added by the caller). */
static uint32_t kind_bits(kind k, cvq_dtype dt, float normal) {
    switch (dt) {
    case CVQ_F32:
        switch (k) {
        case K_NORM: return f32_bits(fabsf(normal));
        case K_MAX: return 0x7F7FFFFFu;
        case K_MINN: return 0x00800000u;
        case K_SUBMIN: return 0x00000001u;
        case K_SUBMAX: return 0x007FFFFFu;
        case K_ZERO: case K_NZERO: return 0;
        case K_E18: return f32_bits(1e18f);
        case K_SSOVF: return f32_bits(5e18f);
        case K_NAN: return 0x7FC00000u;
        case K_SNAN: return 0x7F800001u;
        case K_INF: return 0x7F800000u;
        }
        break;
    case CVQ_F16:
        switch (k) {
        case K_NORM: return cvq_f32_to_f16(fabsf(normal));
        case K_MAX: case K_E18: case K_SSOVF: return 0x7BFFu;
        case K_MINN: return 0x0400u;
        case K_SUBMIN: return 0x0001u;
        case K_SUBMAX: return 0x03FFu;
        case K_ZERO: case K_NZERO: return 0;
        case K_NAN: return 0x7E00u;
        case K_SNAN: return 0x7C01u;
        case K_INF: return 0x7C00u;
        }
        break;
    case CVQ_BF16:
        switch (k) {
        case K_NORM: return f32_bits(fabsf(normal)) >> 16; /* truncation: a valid bf16 */
        case K_MAX: return 0x7F7Fu;
        case K_MINN: return 0x0080u;
        case K_SUBMIN: return 0x0001u;
        case K_SUBMAX: return 0x007Fu;
        case K_ZERO: case K_NZERO: return 0;
        case K_E18: return f32_bits(1e18f) >> 16;
        case K_SSOVF: return f32_bits(5e18f) >> 16;
        case K_NAN: return 0x7FC0u;
        case K_SNAN: return 0x7F81u;
        case K_INF: return 0x7F80u;
        }
        break;
    }
    return 0;
}

/* The test's own widening to binary32 (exact), written from the formats. */
static float widen(const void *src, cvq_dtype dt, size_t i) {
    if (dt == CVQ_F32) {
        float f;
        memcpy(&f, (const uint8_t *)src + 4 * i, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, (const uint8_t *)src + 2 * i, 2);
    if (dt == CVQ_BF16) {
        uint32_t u = (uint32_t)h << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    const int sign = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 31) v = m ? NAN : INFINITY;
    else if (e == 0) v = ldexp((double)m, -24);
    else v = ldexp(1024.0 + m, e - 25);
    return (float)(sign ? -v : v);
}

/* ---- cases ---------------------------------------------------------------------- */

typedef struct xcase {
    const char *name;
    /* kind of element i of token t (tokens 1 and 2 carry the case; token 0
     * is ordinary data so that one bad token fails the whole call) */
    kind (*at)(size_t t, size_t i);
} xcase;

#define ALL(fn, k) \
    static kind fn(size_t t, size_t i) { (void)i; return t ? (k) : K_NORM; }
ALL(c_max_all, K_MAX)
ALL(c_minn_all, K_MINN)
ALL(c_submin_all, K_SUBMIN)
ALL(c_submax_all, K_SUBMAX)
ALL(c_zero_all, K_ZERO)
ALL(c_nzero_all, K_NZERO)
ALL(c_e18_all, K_E18)
ALL(c_ssovf_all, K_SSOVF)
static kind c_max_one(size_t t, size_t i) { return (t == 1 && i == 5) ? K_MAX : K_NORM; }
static kind c_sub_mixed(size_t t, size_t i) {
    static const kind k[4] = {K_SUBMIN, K_SUBMAX, K_ZERO, K_NZERO};
    return t ? k[i % 4] : K_NORM;
}
static kind c_zero_mixed(size_t t, size_t i) { return t ? (i % 3 ? K_ZERO : K_NZERO) : K_NORM; }
static kind c_huge_tiny(size_t t, size_t i) {
    if (!t) return K_NORM;
    return i == 0 ? K_E18 : (i % 2 ? K_SUBMIN : K_MINN);
}
static kind c_huge_normal(size_t t, size_t i) { return (t && i % D == 3) ? K_E18 : K_NORM; }
static kind c_max_tiny(size_t t, size_t i) { return t ? (i == 70 ? K_MAX : K_SUBMAX) : K_NORM; }
static kind c_head_zero(size_t t, size_t i) { return (t && i < D) ? K_ZERO : K_NORM; }
static kind c_nan(size_t t, size_t i) { return (t == 2 && i == 77) ? K_NAN : K_NORM; }
static kind c_snan(size_t t, size_t i) { return (t == 1 && i == 0) ? K_SNAN : K_NORM; }
static kind c_inf(size_t t, size_t i) { return (t == 2 && i == KVD - 1) ? K_INF : K_NORM; }
static kind c_inf_in_tiny(size_t t, size_t i) { return t ? (i == 9 ? K_INF : K_SUBMIN) : K_NORM; }

static const xcase k_cases[] = {
    {"largest finite, whole tokens", c_max_all},
    {"largest finite, one element", c_max_one},
    {"largest finite among subnormals", c_max_tiny},
    {"smallest normal, whole tokens", c_minn_all},
    {"smallest subnormal, whole tokens", c_submin_all},
    {"largest subnormal, whole tokens", c_submax_all},
    {"subnormals and signed zeros", c_sub_mixed},
    {"+0 tokens", c_zero_all},
    {"-0 tokens", c_nzero_all},
    {"mixed-sign zero tokens", c_zero_mixed},
    {"one zero KV head", c_head_zero},
    {"1e18 with tiny entries", c_huge_tiny},
    {"1e18 among normal entries", c_huge_normal},
    {"1e18 everywhere (sum of squares just fits)", c_e18_all},
    {"5e18 everywhere (sum of squares overflows)", c_ssovf_all},
    {"NaN", c_nan},
    {"signalling NaN", c_snan},
    {"Inf", c_inf},
    {"-Inf among subnormals", c_inf_in_tiny},
};

static const cvq_dtype k_dtypes[] = {CVQ_F32, CVQ_F16, CVQ_BF16};
static const char *const k_dtype_names[] = {"f32", "f16", "bf16"};

/* Builds T tokens [T][Hkv][d] of a case in a dtype; the sign of element
 * (t, i) alternates irregularly (the -0 kinds are always negative). */
static void build(const xcase *c, cvq_dtype dt, uint64_t seed, void *out) {
    th_rng r;
    th_rng_seed(&r, seed);
    for (size_t t = 0; t < T; t++) {
        for (size_t i = 0; i < KVD; i++) {
            const float nv = (float)th_rng_normal(&r);
            const kind k = c->at(t, i);
            int neg = k == K_NORM ? nv < 0.0f : ((i * 7 + t) % 3 == 0);
            if (k == K_NZERO) neg = 1;
            if (k == K_ZERO) neg = 0;
            if (k == K_NAN || k == K_SNAN) neg = 0;
            if (k == K_INF && c->at == c_inf_in_tiny) neg = 1;
            uint32_t b = kind_bits(k, dt, nv);
            const size_t j = t * KVD + i;
            if (dt == CVQ_F32) {
                b |= neg ? 0x80000000u : 0;
                memcpy((uint8_t *)out + 4 * j, &b, 4);
            } else {
                uint16_t h = (uint16_t)(b | (neg ? 0x8000u : 0));
                memcpy((uint8_t *)out + 2 * j, &h, 2);
            }
        }
    }
}

/* ---- the oracle: docs/numerics.md section 1 on the input bits ---------------------- */

typedef struct expect {
    int nonfinite;             /* any NaN/Inf element */
    int key_range, val_range;  /* some sum of squares is +Inf */
    float key_scale[T * HKV];  /* per key span: sqrtf(ss), 0 when ss == 0 */
    int zero_key[T * HKV];     /* span t*ns + s has ss == 0 */
} expect;

/* Key spans per token: 1 (token mode) or Hkv (head mode), of KVD/ns dims. */
static size_t n_spans(void) { return g_head ? HKV : 1; }

static void oracle(const void *x, cvq_dtype dt, expect *e) {
    memset(e, 0, sizeof *e);
    const size_t ns = n_spans(), w = KVD / ns;
    for (size_t t = 0; t < T; t++) {
        for (size_t sp = 0; sp < ns; sp++) {
            float ss = 0.0f;
            for (size_t i = sp * w; i < sp * w + w; i++) {
                const float v = widen(x, dt, t * KVD + i);
                if (isnan(v) || isinf(v)) e->nonfinite = 1;
                const float sq = v * v; /* separate statements: never contracted */
                ss = ss + sq;
            }
            if (isinf(ss)) e->key_range = 1;
            e->key_scale[t * ns + sp] = ss == 0.0f ? 0.0f : sqrtf(ss);
            e->zero_key[t * ns + sp] = ss == 0.0f;
        }
        for (size_t g = 0; g < KVD / D; g++) {
            float vs = 0.0f;
            for (size_t j = g * D; j < g * D + D; j++) {
                const float xs = widen(x, dt, t * KVD + j) * g_inv_ls[j];
                const float sq = xs * xs;
                vs = vs + sq;
            }
            if (isinf(vs)) e->val_range = 1;
        }
    }
}

static cvq_status want_keys(const expect *e) {
    return e->nonfinite ? CVQ_ERR_NONFINITE_INPUT : e->key_range ? CVQ_ERR_INPUT_RANGE : CVQ_OK;
}
static cvq_status want_values(const expect *e) {
    return e->nonfinite ? CVQ_ERR_NONFINITE_INPUT : e->val_range ? CVQ_ERR_INPUT_RANGE : CVQ_OK;
}
/* An append checks keys (finite, then range), then values likewise. */
static cvq_status want_append(const expect *e) {
    cvq_status k = want_keys(e);
    return k ? k : want_values(e);
}
static const char *status_words(cvq_status s) {
    return s == CVQ_ERR_NONFINITE_INPUT ? "NaN or Inf" : s == CVQ_ERR_INPUT_RANGE ? "overflows binary32" : "";
}

static int all_finite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* ---- setup ----------------------------------------------------------------------------- */

static int group_setup(void **state) {
    (void)state;
    if (!th_backends_open(&g_bs)) return -1;
    for (int m = 0; m < 2; m++) {
            memset(&g_geom, 0, sizeof g_geom);
            g_geom.n_layers = 1;
            g_geom.n_q_heads = HQ;
            g_geom.n_kv_heads = HKV;
            g_geom.head_dim = D;
            g_geom.key_stages = 2;
            g_geom.key_scale = m ? CVQ_KEY_SCALE_HEAD : CVQ_KEY_SCALE_TOKEN;
            g_geom.value_bits = 64;
            g_geom.value_group_width = D;
            if (cvq_geometry_resolve(&g_geom)) return -1;
            double theta[D / 2];
            if (cvq_rope_freqs_default(D, 10000.0, theta)) return -1;
            if (cvq_codebook_random(&g_geom, theta, 2026 + (uint64_t)m, NULL, &g_cbs[m])) return -1;
            for (uint32_t g = 0; g < KVD / D; g++) {
                const float *ls = NULL;
                if (cvq_codebook_tensor_cdata(g_cbs[m], CVQ_T_VAL_LS, 0, g, &ls)) return -1;
                for (size_t j = 0; j < D; j++) g_inv_lss[m][g * D + j] = 1.0f / (ls[j] + 1e-6f);
            }
            cvq_record_layout rl;
            if (cvq_record_layout_of(&g_geom, &rl)) return -1;
            if (rl.key_scale_count != (m ? HKV : 1u)) return -1;
            g_n_codes = (size_t)T * HKV * g_geom.key_stages;
            g_n_bytes = (size_t)T * rl.value_bit_bytes;
            g_n_sig = (size_t)T * rl.value_groups;
    }
    return 0;
}

static void select_mode(int m) {
    g_head = m;
    g_cb = g_cbs[m];
    memcpy(g_inv_ls, g_inv_lss[m], sizeof g_inv_ls);
    g_n_scales = (size_t)T * n_spans();
}

static int group_teardown(void **state) {
    (void)state;
    cvq_codebook_free(g_cbs[0]);
    cvq_codebook_free(g_cbs[1]);
    th_backends_close(&g_bs);
    return 0;
}

/* Bit-identical codes are required unless the device itself says it cannot
 * promise them (docs/numerics.md section 9: no float controls); such a
 * device is named once. */
static int exact_expected(const th_backend *b) {
    cvq_device_info di;
    if (cvq_context_device(b->ctx, &di) != CVQ_OK) return 1;
    if (di.exactness == CVQ_EXACT_NOT_GUARANTEED) {
        static char said[TH_MAX_BACKENDS];
        const size_t i = (size_t)(b - g_bs.b);
        if (i < TH_MAX_BACKENDS && !said[i]) {
            said[i] = 1;
            print_message("[%s] reports CVQ_EXACT_NOT_GUARANTEED: codes not compared bit for bit\n", b->name);
        }
        return 0;
    }
    return 1;
}

/* ---- stateless encode/decode at the extremes ---------------------------------------------- */

typedef struct ref_out {
    cvq_status sk, sv;
    uint16_t codes[T * HKV * 32];
    float scales[T * HKV];
    uint8_t bits[T * 2 * 8];
    float sigma[T * 2];
} ref_out;

static void check_encode(const th_backend *b, const char *label, const void *x, cvq_dtype dt,
                         const expect *e, const ref_out *ref, size_t *n_run, size_t *n_skip) {
    uint16_t *codes = th_guard_alloc(g_n_codes * 2);
    float *scales = th_guard_alloc(g_n_scales * 4);
    uint8_t *bits = th_guard_alloc(g_n_bytes);
    float *sigma = th_guard_alloc(g_n_sig * 4);
    float *dec = malloc(T * KVD * sizeof(float));
    assert_true(codes && scales && bits && sigma && dec);
    const int exact = exact_expected(b);

    /* keys */
    cvq_status st = cvq_encode_keys(b->ctx, g_cb, 0, x, dt, T, codes, scales);
    const cvq_status wk = want_keys(e);
    if (st == CVQ_ERR_UNSUPPORTED) {
        (*n_skip)++;
    } else {
        (*n_run)++;
        if (st != wk)
            fail_msg("%s [%s] encode_keys: %s (%s), want %s", label, b->name, cvq_status_name(st),
                     cvq_last_error(), cvq_status_name(wk));
        if (!th_guard_ok(codes) || !th_guard_ok(scales))
            fail_msg("%s [%s] encode_keys wrote outside its outputs", label, b->name);
        if (st) {
            if (!th_guard_untouched(codes) || !th_guard_untouched(scales))
                fail_msg("%s [%s] encode_keys failed but wrote", label, b->name);
            if (!strstr(cvq_last_error(), status_words(st)))
                fail_msg("%s [%s] message \"%s\"", label, b->name, cvq_last_error());
        } else {
            const size_t ns = n_spans(), hps = HKV / ns, R = g_geom.key_stages;
            for (size_t j = 0; j < T * ns; j++) {
                if (f32_bits(scales[j]) != f32_bits(e->key_scale[j]))
                    fail_msg("%s [%s] token %zu span %zu: key scale %a, want sqrtf(sum of squares) = %a", label,
                             b->name, j / ns, j % ns, (double)scales[j], (double)e->key_scale[j]);
                if (e->zero_key[j]) /* the span's heads: codes [t][h][r] */
                    for (size_t i = 0; i < hps * R; i++) {
                        const size_t at = (j / ns) * HKV * R + (j % ns) * hps * R + i;
                        if (codes[at] != 0)
                            fail_msg("%s [%s] token %zu span %zu: zero key, code %zu = %u (want 0)", label,
                                     b->name, j / ns, j % ns, i, codes[at]);
                    }
            }
            if (exact && ref->sk == CVQ_OK) {
                g_n_bitwise++;
                size_t first = 0;
                if (th_cmp_u16(codes, ref->codes, g_n_codes, &first))
                    fail_msg("%s [%s] key code %zu: %u, CPU reference %u", label, b->name, first, codes[first],
                             ref->codes[first]);
                if (memcmp(scales, ref->scales, g_n_scales * 4))
                    fail_msg("%s [%s] key scales differ from the CPU reference", label, b->name);
            }
            assert_int_equal(cvq_decode_keys(b->ctx, g_cb, 0, codes, scales, T, dec), CVQ_OK);
            if (!all_finite(dec, T * KVD)) fail_msg("%s [%s] decoded keys not finite", label, b->name);
            for (size_t j = 0; j < T * ns; j++)
                if (e->zero_key[j])
                    for (size_t i = 0; i < KVD / ns; i++) {
                        const float v = dec[(j / ns) * KVD + (j % ns) * (KVD / ns) + i];
                        if (v != 0.0f)
                            fail_msg("%s [%s] token %zu span %zu: zero key decodes to %g", label, b->name,
                                     j / ns, j % ns, (double)v);
                    }
        }
    }

    /* values */
    st = cvq_encode_values(b->ctx, g_cb, 0, x, dt, T, bits, sigma);
    const cvq_status wv = want_values(e);
    if (st == CVQ_ERR_UNSUPPORTED) {
        (*n_skip)++;
    } else {
        (*n_run)++;
        if (st != wv)
            fail_msg("%s [%s] encode_values: %s (%s), want %s", label, b->name, cvq_status_name(st),
                     cvq_last_error(), cvq_status_name(wv));
        if (!th_guard_ok(bits) || !th_guard_ok(sigma))
            fail_msg("%s [%s] encode_values wrote outside its outputs", label, b->name);
        if (st) {
            if (!th_guard_untouched(bits) || !th_guard_untouched(sigma))
                fail_msg("%s [%s] encode_values failed but wrote", label, b->name);
            if (!strstr(cvq_last_error(), status_words(st)))
                fail_msg("%s [%s] message \"%s\"", label, b->name, cvq_last_error());
        } else {
            if (!all_finite(sigma, g_n_sig)) fail_msg("%s [%s] sigma not finite", label, b->name);
            if (exact && ref->sv == CVQ_OK) {
                g_n_bitwise++;
                size_t first = 0;
                if (th_cmp_bytes(bits, ref->bits, g_n_bytes, &first))
                    fail_msg("%s [%s] value bit byte %zu differs from the CPU reference", label, b->name, first);
                if (memcmp(sigma, ref->sigma, g_n_sig * 4))
                    fail_msg("%s [%s] sigma differs from the CPU reference", label, b->name);
            }
            assert_int_equal(cvq_decode_values(b->ctx, g_cb, 0, bits, sigma, T, dec), CVQ_OK);
            if (!all_finite(dec, T * KVD)) fail_msg("%s [%s] decoded values not finite", label, b->name);
        }
    }
    th_guard_free(codes);
    th_guard_free(scales);
    th_guard_free(bits);
    th_guard_free(sigma);
    free(dec);
}

static void test_encode_extremes(void **state) {
    (void)state;
    uint8_t x[T * KVD * 4];
    size_t n_run = 0, n_skip = 0, n_err = 0;
    for (int m = 0; m < 2; m++) {
        select_mode(m);
        for (size_t c = 0; c < sizeof k_cases / sizeof k_cases[0]; c++) {
            for (size_t d = 0; d < 3; d++) {
                char label[192];
                snprintf(label, sizeof label, "%s, case \"%s\" %s (seed %zu)", k_mode_names[m], k_cases[c].name,
                         k_dtype_names[d], 100 + c);
                build(&k_cases[c], k_dtypes[d], 100 + c, x);
                expect e;
                oracle(x, k_dtypes[d], &e);
                n_err += want_keys(&e) != CVQ_OK;
                /* the CPU reference kernels' answer, for the bitwise comparison */
                ref_out ref;
                memset(&ref, 0, sizeof ref);
                ref.sk = cvq_encode_keys(g_bs.ref, g_cb, 0, x, k_dtypes[d], T, ref.codes, ref.scales);
                ref.sv = cvq_encode_values(g_bs.ref, g_cb, 0, x, k_dtypes[d], T, ref.bits, ref.sigma);
                for (size_t i = 0; i < g_bs.n; i++)
                    check_encode(&g_bs.b[i], label, x, k_dtypes[d], &e, &ref, &n_run, &n_skip);
            }
        }
    }
    print_message("extremes: 2 key scale modes x %zu cases x 3 dtypes (%zu with an error status for keys) "
                  "on %zu backends: %zu encodes checked, %zu of them bit for bit against the CPU reference, "
                  "%zu unsupported\n",
                  sizeof k_cases / sizeof k_cases[0], n_err, g_bs.n, n_run, g_n_bitwise, n_skip);
    assert_true(n_run > 0);
}

/* ---- the same inputs through a cache ------------------------------------------------------- */

static void test_cache_extremes(void **state) {
    (void)state;
    uint8_t x[T * KVD * 4];
    float base_k[2 * KVD], base_v[2 * KVD], q[NQ * HQ * D];
    th_rng r;
    th_rng_seed(&r, 77);
    th_fill_normal(&r, base_k, 2 * KVD, 1.0);
    th_fill_normal(&r, base_v, 2 * KVD, 1.0);
    th_fill_normal(&r, q, NQ * HQ * D, 1.0);
    const int32_t pos0[2] = {0, 1}, pos1[T] = {2, 3, 4}, pos2[2] = {5, 6};
    const int32_t qpos[NQ] = {3, 1000};
    const size_t outn = NQ * HQ * D;
    float *out0 = malloc(outn * 4), *out1 = malloc(outn * 4);
    assert_true(out0 && out1);
    size_t n_run = 0, n_skip = 0;
    for (int m = 0; m < 2; m++) {
        select_mode(m);
        for (size_t i = 0; i < g_bs.n; i++) {
            th_backend *b = &g_bs.b[i];
            for (size_t c = 0; c < sizeof k_cases / sizeof k_cases[0]; c++) {
                for (size_t d = 0; d < 3; d++) {
                    char label[192];
                    snprintf(label, sizeof label, "cache, %s, case \"%s\" %s [%s]", k_mode_names[m],
                             k_cases[c].name, k_dtype_names[d], b->name);
                    build(&k_cases[c], k_dtypes[d], 100 + c, x);
                    expect e;
                    oracle(x, k_dtypes[d], &e);
                    /* sink 1, window 1: the case's tokens land in the compressed
                     * part and in the window; later tokens compress the rest */
                    cvq_cache_params cp = cvq_cache_default_params();
                    cp.sinks = 1;
                    cp.window = 1;
                    cvq_cache *cache = NULL;
                    assert_int_equal(cvq_cache_create(b->ctx, g_cb, &cp, &cache), CVQ_OK);
                    cvq_status st = cvq_cache_append(cache, base_k, base_v, CVQ_F32, pos0, 2);
                    if (st == CVQ_ERR_UNSUPPORTED) {
                        n_skip++;
                        cvq_cache_free(cache);
                        continue;
                    }
                    assert_int_equal(st, CVQ_OK);
                    cvq_cache_stats s0, s1;
                    assert_int_equal(cvq_cache_stats_get(cache, &s0), CVQ_OK);
                    st = cvq_cache_attend(cache, q, qpos, NQ, 0, out0);
                    if (st == CVQ_ERR_UNSUPPORTED) {
                        n_skip++;
                        cvq_cache_free(cache);
                        continue;
                    }
                    assert_int_equal(st, CVQ_OK);
                    n_run++;
                    const cvq_status want = want_append(&e);
                    st = cvq_cache_append(cache, x, x, k_dtypes[d], pos1, T);
                    if (st != want)
                        fail_msg("%s: append %s (%s), want %s", label, cvq_status_name(st), cvq_last_error(),
                                 cvq_status_name(want));
                    assert_int_equal(cvq_cache_stats_get(cache, &s1), CVQ_OK);
                    if (st) {
                        if (!strstr(cvq_last_error(), status_words(st)))
                            fail_msg("%s: message \"%s\"", label, cvq_last_error());
                        if (memcmp(&s0, &s1, sizeof s0)) fail_msg("%s: a failed append changed the cache", label);
                        assert_int_equal(cvq_cache_attend(cache, q, qpos, NQ, 0, out1), CVQ_OK);
                        if (memcmp(out0, out1, outn * 4))
                            fail_msg("%s: attention changed after a failed append", label);
                    } else {
                        if (s1.n_tokens != 5 || s1.n_window != 1 || s1.n_compressed != 3)
                            fail_msg("%s: %llu tokens, %llu in the window, %llu compressed", label,
                                     (unsigned long long)s1.n_tokens, (unsigned long long)s1.n_window,
                                     (unsigned long long)s1.n_compressed);
                        st = cvq_cache_attend(cache, q, qpos, NQ, 0, out1);
                        if (st != CVQ_OK || !all_finite(out1, outn))
                            fail_msg("%s: attention %s (%s), output %s", label, cvq_status_name(st),
                                     cvq_last_error(), all_finite(out1, outn) ? "finite" : "NOT finite");
                        /* compress the window's extreme token too */
                        assert_int_equal(cvq_cache_append(cache, base_k, base_v, CVQ_F32, pos2, 2), CVQ_OK);
                        st = cvq_cache_attend(cache, q, qpos, NQ, 0, out1);
                        if (st != CVQ_OK || !all_finite(out1, outn))
                            fail_msg("%s: attention after compressing %s (%s), output %s", label,
                                     cvq_status_name(st), cvq_last_error(),
                                     all_finite(out1, outn) ? "finite" : "NOT finite");
                    }
                    cvq_cache_free(cache);
                }
            }
        }
    }
    free(out0);
    free(out1);
    print_message("cache extremes: %zu (case, dtype, backend) runs, %zu unsupported\n", n_run, n_skip);
    assert_true(n_run > 0);
}

/* ---- signed zeros never change a code ----------------------------------------------------- */

static void test_signed_zeros(void **state) {
    (void)state;
    float a[T * KVD], bneg[T * KVD];
    th_rng r;
    th_rng_seed(&r, 5);
    th_fill_normal(&r, a, T * KVD, 1.0);
    for (size_t i = 0; i < T * KVD; i += 3) a[i] = 0.0f;
    memcpy(bneg, a, sizeof a);
    for (size_t i = 0; i < T * KVD; i += 3) bneg[i] = -0.0f;
    for (int m = 0; m < 2; m++) {
        select_mode(m);
        for (size_t i = 0; i < g_bs.n; i++) {
            th_backend *b = &g_bs.b[i];
            ref_out pa, pb;
            memset(&pa, 0, sizeof pa);
            memset(&pb, 0, sizeof pb);
            pa.sk = cvq_encode_keys(b->ctx, g_cb, 0, a, CVQ_F32, T, pa.codes, pa.scales);
            pb.sk = cvq_encode_keys(b->ctx, g_cb, 0, bneg, CVQ_F32, T, pb.codes, pb.scales);
            pa.sv = cvq_encode_values(b->ctx, g_cb, 0, a, CVQ_F32, T, pa.bits, pa.sigma);
            pb.sv = cvq_encode_values(b->ctx, g_cb, 0, bneg, CVQ_F32, T, pb.bits, pb.sigma);
            if (pa.sk == CVQ_ERR_UNSUPPORTED || pa.sv == CVQ_ERR_UNSUPPORTED) continue;
            assert_int_equal(pa.sk, CVQ_OK);
            assert_int_equal(pb.sk, CVQ_OK);
            assert_int_equal(pa.sv, CVQ_OK);
            assert_int_equal(pb.sv, CVQ_OK);
            if (memcmp(&pa, &pb, sizeof pa))
                fail_msg("[%s] %s: -0 instead of +0 changed codes, bits or scales", b->name, k_mode_names[m]);
        }
    }
}

/* ---- attention logits that overflow binary32 ------------------------------------------------ */

static void test_logit_overflow(void **state) {
    (void)state;
    float k[2 * KVD], v[2 * KVD], q[NQ * HQ * D], out[NQ * HQ * D];
    th_rng r;
    th_rng_seed(&r, 9);
    th_fill_normal(&r, v, 2 * KVD, 1.0);
    for (size_t i = 0; i < 2 * KVD; i++) k[i] = (i % 2) ? 1e18f : -1e18f;
    for (size_t i = 0; i < NQ * HQ * D; i++) q[i] = (i % 2) ? 1e30f : -1e30f;
    const int32_t pos[2] = {0, 1}, qpos[NQ] = {1, 5};
    select_mode(0);
    for (size_t i = 0; i < g_bs.n; i++) {
        th_backend *b = &g_bs.b[i];
        cvq_cache_params cp = cvq_cache_default_params();
        cp.window = 4; /* full precision keys: |q.k| ~ 1e48 * 64 */
        cvq_cache *cache = NULL;
        assert_int_equal(cvq_cache_create(b->ctx, g_cb, &cp, &cache), CVQ_OK);
        cvq_status st = cvq_cache_append(cache, k, v, CVQ_F32, pos, 2);
        if (st == CVQ_ERR_UNSUPPORTED) {
            cvq_cache_free(cache);
            continue;
        }
        assert_int_equal(st, CVQ_OK);
        memset(out, 0x5A, sizeof out);
        st = cvq_cache_attend(cache, q, qpos, NQ, 0, out);
        if (st != CVQ_ERR_UNSUPPORTED) {
            if (st != CVQ_ERR_INPUT_RANGE)
                fail_msg("[%s] overflowing logits: %s (%s), want CVQ_ERR_INPUT_RANGE", b->name, cvq_status_name(st),
                         cvq_last_error());
            for (size_t j = 0; j < NQ * HQ * D; j++)
                if (f32_bits(out[j]) != 0) fail_msg("[%s] output %zu not zeroed: %g", b->name, j, (double)out[j]);
            /* subnormal queries: a defined, finite result */
            for (size_t j = 0; j < NQ * HQ * D; j++) q[j] = (j % 2) ? 1e-45f : -1e-40f;
            assert_int_equal(cvq_cache_attend(cache, q, qpos, NQ, 0, out), CVQ_OK);
            if (!all_finite(out, NQ * HQ * D)) fail_msg("[%s] subnormal queries: output not finite", b->name);
            for (size_t j = 0; j < NQ * HQ * D; j++) q[j] = (j % 2) ? 1e30f : -1e30f;
        }
        cvq_cache_free(cache);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_encode_extremes),
        cmocka_unit_test(test_cache_extremes),
        cmocka_unit_test(test_signed_zeros),
        cmocka_unit_test(test_logit_overflow),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
