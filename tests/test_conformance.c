/*
 * Conformance of the CPU reference kernels (core/ref_*.c) and of the CPU
 * backend behind the public API against independent double-precision
 * oracles (tests/support/harness.c), written from the method note.
 *
 *  (a) key codes vs a brute force over all 4096 codes, stage by stage on the
 *      library's own fp32 residual; a differing code must be excused by the
 *      rounding bound 1e-6 * (||z||^2 + 2*max_a n_a);
 *  (b) residual after a stage == z - c(k) bit for bit; mean residual energy
 *      decreases stage by stage with a random codebook;
 *  (c) conventions: a known-answer case worked by hand (d = 4, R = 1), the
 *      same case through cvq_codebook_create and the public API, wrong
 *      centre conventions provably caught, RoPE vs the HF and GPT-J formulas;
 *  (d) value encoder vs a double implementation (bits excused only near a
 *      tie of the two top logits, sigma relative error < 1e-5);
 *  (e) code-domain attention through the public cache API vs double
 *      attention over explicitly decoded keys and values, ~40 cases + one
 *      LLaMA-3.1-8B layer;
 *  (f) stress inputs: near ties, subnormals, huge/tiny magnitudes, zeros,
 *      non-finite input and bad arguments rejected with nothing written.
 *
 * Every case is named by its canonical parameter string (harness.h), which
 * seeds its data and is printed on failure. Each section prints one summary
 * line.
 *
 * Backends: every public-API check runs on each context of the harness's
 * backend list (th_backends_open: cpu-ref, cpu, then every CUDA and Vulkan
 * device that opens; COMMVQ_TEST_BACKENDS restricts it), in the manner of
 * ggml's test-backend-ops: encoders bit for bit against the CPU reference,
 * attention within the tolerance of the double oracle, guard bands around
 * every output. CVQ_ERR_UNSUPPORTED is counted as a skip of that (case,
 * backend), and each summary line ends with the per-backend counts
 * "name run/skipped". A new backend joins by being listed by
 * cvq_list_devices; no case needs editing.
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
#include <time.h>

#include "commvq.h"
#include "cvq_internal.h"
#include "harness.h"
#include "vulkan/vk_backend.h"
#include "numerics.h"
#include "reference.h"

#define ROPE_BASE 500000.0

/* ---- shared helpers ------------------------------------------------------------ */

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    assert_non_null(p);
    return p;
}

/* A library call that must succeed; on failure prints the case name, the
 * call and the library's message. */
#define CHECK_OK(name, call)                                                          \
    do {                                                                              \
        cvq_status st_ = (call);                                                      \
        if (st_ != CVQ_OK) {                                                          \
            fail_msg("%s: %s -> %s: %s", (name), #call, cvq_status_name(st_),         \
                     cvq_last_error());                                               \
        }                                                                             \
    } while (0)

/* The contexts under test, built once for the whole run (in main). */
static th_backends g_bk;

/* A backend's answer to a call that must succeed: false when it is
 * CVQ_ERR_UNSUPPORTED (a skip, recorded in the backend's tally), true when
 * CVQ_OK; anything else fails the test with the case and backend named. */
static bool backend_ok(th_backend *b, const char *case_name, const char *call, cvq_status st) {
    if (st == CVQ_OK) {
        return true;
    }
    if (th_unsupported(b, case_name, call, st)) {
        return false;
    }
    fail_msg("%s [%s]: %s -> %s: %s", case_name, b->name, call, cvq_status_name(st),
             cvq_last_error());
    return false;
}

/* Per-backend "run/skipped" counts of the current section. */
static const char *tally(int show_worst) {
    static char buf[1024];
    return th_tally_str(&g_bk, show_worst, buf, sizeof buf);
}

/* Geometry, RoPE table (default, base 500000) and a random codebook of a
 * case, seeded by the case's name. */
static cvq_codebook *case_codebook(th_case *c, cvq_geometry *g, double *theta) {
    th_case_finish(c);
    cvq_status st = th_case_geometry(c, g);
    if (st != CVQ_OK) {
        fail_msg("%s: geometry refused: %s", c->name, cvq_last_error());
    }
    st = cvq_rope_freqs_default(c->d, ROPE_BASE, theta);
    if (st != CVQ_OK) {
        fail_msg("%s: rope freqs: %s", c->name, cvq_last_error());
    }
    cvq_codebook *cb = NULL;
    st = cvq_codebook_random(g, theta, c->seed, NULL, &cb);
    if (st != CVQ_OK) {
        fail_msg("%s: cvq_codebook_random: %s", c->name, cvq_last_error());
    }
    return cb;
}

static void layer_view(const th_case *c, const cvq_codebook *cb, cvq_layer_view *lv) {
    cvq_status st = cvq__layer_view(NULL, cb, 0, lv);
    if (st != CVQ_OK) {
        fail_msg("%s: cvq__layer_view: %s", c->name, cvq_last_error());
    }
}

/* Keys with a per-channel spread (real keys have outlier channels):
 * k[t][j] = N(0,1) * chan[j], chan[j] = exp(0.5 * N(0,1)) fixed per case. */
static void fill_keys(th_rng *rng, float *k, size_t T, size_t kvd) {
    float *chan = xmalloc(kvd * sizeof(float));
    for (size_t j = 0; j < kvd; j++) {
        chan[j] = (float)exp(0.5 * th_rng_normal(rng));
    }
    for (size_t t = 0; t < T; t++) {
        for (size_t j = 0; j < kvd; j++) {
            k[t * kvd + j] = (float)th_rng_normal(rng) * chan[j];
        }
    }
    free(chan);
}

/* Stage tables of (KV head h, stage r) in a layer view. */
static void stage_tables(const cvq_layer_view *lv, uint32_t h, uint32_t r, const float **w,
                         const float **n, const float **G) {
    const size_t hr = (size_t)h * lv->g->key_stages + r;
    *w = lv->key_w + hr * 64 * lv->P * 2;
    *n = lv->key_n + hr * 64;
    *G = lv->key_G + hr * 4096;
}

/* ---- (a)+(b) key codes, stage by stage ------------------------------------------- */

typedef struct key_stats {
    size_t stages;        /* stage evaluations compared */
    size_t excused;       /* code differs from the brute force, within bound */
    double worst_ratio;   /* max (d(lib) - d_min) / bound over excused */
    size_t conv_differs[4]; /* stages where a convention's brute force != lib */
} key_stats;

/* Rounding bound of the fp32 decomposition for a stage with residual z and
 * sub-codes w: 1e-6 * (||z||^2 + 2 * max_a n_a), all in double. */
static double excuse_bound(const float *w, uint32_t d, const float *z) {
    const uint32_t P = d / 2;
    double zz = 0.0, nmax = 0.0;
    for (uint32_t i = 0; i < d; i++) {
        zz += (double)z[i] * z[i];
    }
    for (uint32_t a = 0; a < 64; a++) {
        double na = 0.0;
        for (uint32_t p = 0; p < 2 * P; p++) {
            na += (double)w[(size_t)a * P * 2 + p] * w[(size_t)a * P * 2 + p];
        }
        if (na > nmax) {
            nmax = na;
        }
    }
    return 1e-6 * (zz + 2.0 * nmax);
}

/* Checks one stage of the library on residual z (updated in place):
 * code vs brute force (or excused), residual bitwise z - c(code).
 * Optionally counts stages where wrong conventions pick another code. */
static uint16_t check_stage(const th_case *c, const cvq_layer_view *lv, uint32_t h, uint32_t r,
                            float *z, double *dist, key_stats *ks, int check_conventions) {
    const uint32_t d = c->d, P = d / 2;
    const float *w, *n, *G;
    stage_tables(lv, h, r, &w, &n, &G);
    float zin[256];
    memcpy(zin, z, d * sizeof(float));

    const uint16_t code = cvq_ref_key_stage(w, n, G, d, c->layout, z);
    double best, second;
    const uint32_t kbf = th_bf_key_stage(w, d, c->layout, zin, TH_CENTRE_OK, dist, &best, &second);
    ks->stages++;
    if (code >= 4096) {
        fail_msg("%s: head %u stage %u: code %u >= 4096", c->name, h, r, code);
    }
    if (code != kbf) {
        const double bound = excuse_bound(w, d, zin);
        const double excess = dist[code] - best;
        if (!(excess <= bound)) {
            fail_msg("%s: head %u stage %u: library code %u (dist %.17g) vs brute force %u "
                     "(dist %.17g, second %.17g): excess %.3g > bound %.3g",
                     c->name, h, r, code, dist[code], kbf, best, second, excess, bound);
        }
        ks->excused++;
        if (excess / bound > ks->worst_ratio) {
            ks->worst_ratio = excess / bound;
        }
    }
    /* (b) residual == zin - c(code) exactly, c in float: (x_A - y_B, y_A + x_B) */
    const float *wA = w + (size_t)(code / 64) * P * 2, *wB = w + (size_t)(code % 64) * P * 2;
    for (uint32_t p = 0; p < P; p++) {
        uint32_t ire, iim;
        th_pair(c->layout, d, p, &ire, &iim);
        const float cre = wA[2 * p] - wB[2 * p + 1];
        const float cim = wA[2 * p + 1] + wB[2 * p];
        const float er = zin[ire] - cre, ei = zin[iim] - cim;
        if (memcmp(&er, &z[ire], sizeof er) != 0 || memcmp(&ei, &z[iim], sizeof ei) != 0) {
            fail_msg("%s: head %u stage %u pair %u: residual (%.9g, %.9g) != z - c = (%.9g, %.9g)",
                     c->name, h, r, p, z[ire], z[iim], er, ei);
        }
    }
    if (check_conventions) {
        for (int conv = 1; conv < 4; conv++) {
            if (th_bf_key_stage(w, d, c->layout, zin, (th_centre)conv, NULL, NULL, NULL) != code) {
                ks->conv_differs[conv]++;
            }
        }
    }
    return code;
}

/* Encodes token k stage by stage (scale and x = k * (1/s) per the contract,
 * written here), checking every stage against the brute force; compares
 * with the library's token encoder. If energy is given, adds ||x_h||^2 to
 * energy[0] and the residual energy after stage r to energy[r + 1]. */
static void check_token(const th_case *c, const cvq_layer_view *lv, const float *k, double *dist,
                        key_stats *ks, double *energy, int check_conventions) {
    const uint32_t d = c->d, Hkv = c->hkv, R = c->R;
    const uint32_t ns = c->scale == CVQ_KEY_SCALE_HEAD ? Hkv : 1;
    uint16_t codes_tok[8 * 32];
    float scales_tok[8];
    assert_true(Hkv <= 8 && R <= 32);
    cvq_ref_encode_key_token(lv, k, codes_tok, scales_tok);

    for (uint32_t sidx = 0; sidx < ns; sidx++) {
        /* scale span: all Hkv*d dims (token) or head sidx */
        const size_t len = ns == 1 ? (size_t)Hkv * d : d, off = ns == 1 ? 0 : (size_t)sidx * d;
        float ss = 0.0f;
        for (size_t i = 0; i < len; i++) {
            ss = ss + k[off + i] * k[off + i];
        }
        const float s = sqrtf(ss);
        if (memcmp(&s, &scales_tok[sidx], sizeof s) != 0) {
            fail_msg("%s: scale %u: library %.9g != sqrtf(sum k^2) %.9g", c->name, sidx,
                     scales_tok[sidx], s);
        }
    }
    for (uint32_t h = 0; h < Hkv; h++) {
        const float s = scales_tok[ns == 1 ? 0 : h];
        float z[256];
        if (s == 0.0f) {
            for (uint32_t r = 0; r < R; r++) {
                if (codes_tok[h * R + r] != 0) {
                    fail_msg("%s: zero scale but code[%u][%u] = %u", c->name, h, r,
                             codes_tok[h * R + r]);
                }
            }
            continue;
        }
        const float inv = 1.0f / s;
        double e0 = 0.0;
        for (uint32_t i = 0; i < d; i++) {
            z[i] = k[(size_t)h * d + i] * inv;
            e0 += (double)z[i] * z[i];
        }
        if (energy) {
            energy[0] += e0;
        }
        for (uint32_t r = 0; r < R; r++) {
            const uint16_t code = check_stage(c, lv, h, r, z, dist, ks, check_conventions);
            if (code != codes_tok[h * R + r]) {
                fail_msg("%s: head %u stage %u: token encoder code %u != stage-by-stage %u",
                         c->name, h, r, codes_tok[h * R + r], code);
            }
            if (energy) {
                double e = 0.0;
                for (uint32_t i = 0; i < d; i++) {
                    e += (double)z[i] * z[i];
                }
                energy[r + 1] += e;
            }
        }
    }
}

static void test_key_codes(void **state) {
    (void)state;
    /* Covering set of key geometries; T sized so the double brute force
     * (4096 * P complex terms per stage) stays around a few seconds. */
    th_case cases[] = {
        {.op = "keys", .d = 64, .hq = 3, .hkv = 3, .R = 6, .Nc = 64, .layout = CVQ_PAIRS_ROTATE_HALF,
         .scale = CVQ_KEY_SCALE_TOKEN, .T = 200},
        {.op = "keys", .d = 80, .hq = 4, .hkv = 2, .R = 8, .Nc = 64, .layout = CVQ_PAIRS_INTERLEAVED,
         .scale = CVQ_KEY_SCALE_HEAD, .T = 200},
        {.op = "keys", .d = 96, .hq = 1, .hkv = 1, .R = 4, .Nc = 64, .layout = CVQ_PAIRS_ROTATE_HALF,
         .scale = CVQ_KEY_SCALE_HEAD, .T = 400},
        {.op = "keys", .d = 128, .hq = 32, .hkv = 8, .R = 11, .Nc = 1024, .F = 1024,
         .layout = CVQ_PAIRS_INTERLEAVED, .scale = CVQ_KEY_SCALE_TOKEN, .T = 60},
        {.op = "keys", .d = 128, .hq = 8, .hkv = 4, .R = 21, .Nc = 64, .F = 128,
         .layout = CVQ_PAIRS_ROTATE_HALF, .scale = CVQ_KEY_SCALE_HEAD, .T = 30},
        {.op = "keys", .d = 256, .hq = 4, .hkv = 2, .R = 5, .Nc = 64, .layout = CVQ_PAIRS_ROTATE_HALF,
         .scale = CVQ_KEY_SCALE_TOKEN, .T = 80},
    };
    key_stats ks;
    memset(&ks, 0, sizeof ks);
    double *dist = xmalloc(4096 * sizeof(double));
    th_tally_reset(&g_bk);
    size_t n_tokens = 0;
    double key_decode_err = 0.0;

    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        th_case *c = &cases[ci];
        cvq_geometry g;
        double theta[128];
        cvq_codebook *cb = case_codebook(c, &g, theta);
        cvq_layer_view lv;
        layer_view(c, cb, &lv);
        const size_t kvd = (size_t)c->hkv * c->d, T = c->T, R = c->R;
        const size_t ns = c->scale == CVQ_KEY_SCALE_HEAD ? c->hkv : 1;
        th_rng rng;
        th_rng_seed(&rng, c->seed);
        float *k = xmalloc(T * kvd * sizeof(float));
        fill_keys(&rng, k, T, kvd);

        double energy[33];
        memset(energy, 0, sizeof energy);
        for (size_t t = 0; t < T; t++) {
            check_token(c, &lv, k + t * kvd, dist, &ks, energy, t < 2);
        }
        n_tokens += T;

        /* (b) mean residual energy strictly decreases stage by stage */
        for (size_t r = 0; r < R; r++) {
            if (!(energy[r + 1] < energy[r])) {
                fail_msg("%s: mean residual energy does not decrease at stage %zu: %.6g -> %.6g",
                         c->name, r, energy[r] / (double)(T * c->hkv),
                         energy[r + 1] / (double)(T * c->hkv));
            }
        }

        /* Public API, every backend: codes and scales bit-identical to the
         * CPU reference (the reference token encoder, checked above against
         * the brute force; the cpu-ref context must reproduce it too); guard
         * bands intact. */
        uint16_t *codes_ref = xmalloc(T * c->hkv * R * sizeof(uint16_t));
        float *scales_ref = xmalloc(T * ns * sizeof(float));
        for (size_t t = 0; t < T; t++) {
            cvq_ref_encode_key_token(&lv, k + t * kvd, codes_ref + t * c->hkv * R,
                                     scales_ref + t * ns);
        }
        for (size_t bi = 0; bi < g_bk.n; bi++) {
            th_backend *b = &g_bk.b[bi];
            uint16_t *codes = th_guard_alloc(T * c->hkv * R * sizeof(uint16_t));
            float *scales = th_guard_alloc(T * ns * sizeof(float));
            assert_non_null(codes);
            assert_non_null(scales);
            cvq_status st = cvq_encode_keys(b->ctx, cb, 0, k, CVQ_F32, T, codes, scales);
            if (!th_guard_ok(codes) || !th_guard_ok(scales)) {
                fail_msg("%s [%s]: cvq_encode_keys wrote outside its outputs", c->name, b->name);
            }
            if (backend_ok(b, c->name, "cvq_encode_keys", st)) {
                size_t first = 0;
                if (th_cmp_u16(codes, codes_ref, T * c->hkv * R, &first)) {
                    fail_msg("%s [%s]: cvq_encode_keys code %zu = %u, reference %u", c->name,
                             b->name, first, codes[first], codes_ref[first]);
                }
                if (memcmp(scales, scales_ref, T * ns * sizeof(float)) != 0) {
                    fail_msg("%s [%s]: cvq_encode_keys scales differ from the reference",
                             c->name, b->name);
                }
                th_tally_run(b);
            }
            th_guard_free(codes);
            th_guard_free(scales);
        }

        /* Key decode (reference, float) vs the double decode of the codes. */
        const float *key_w = NULL;
        assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_KEY_W, 0, 0, &key_w), CVQ_OK);
        float *kf = xmalloc(kvd * sizeof(float));
        double *kd = xmalloc(kvd * sizeof(double));
        for (size_t t = 0; t < T; t++) {
            cvq_ref_decode_key_token(&lv, codes_ref + t * c->hkv * R, scales_ref + t * ns, kf);
            th_decode_key_double(&g, key_w, codes_ref + t * c->hkv * R, scales_ref + t * ns, kd);
            th_err e = th_cmp_f32_f64(kf, kd, kvd);
            /* a sum of R float terms then one product: ~R ulps of |k| */
            if (!(e.norm_err <= 1e-5)) {
                fail_msg("%s: token %zu: key decode error %.3g > 1e-5", c->name, t, e.norm_err);
            }
            if (e.norm_err > key_decode_err) {
                key_decode_err = e.norm_err;
            }
        }
        free(kf);
        free(kd);
        free(codes_ref);
        free(scales_ref);
        free(k);
        cvq_codebook_free(cb);
    }
    printf("[conformance a/b] keys: %zu cases, %zu tokens, %zu stages vs brute force, "
           "%zu excused (worst %.2f of bound), residuals exact, energy decreasing, "
           "key decode max err %.2e; public API bit-exact vs reference, backends run/skipped: "
           "%s\n",
           sizeof cases / sizeof cases[0], n_tokens, ks.stages, ks.excused, ks.worst_ratio,
           key_decode_err, tally(0));
    th_tally_print_skips(&g_bk, "[conformance a/b]");
    free(dist);
}

/* ---- (c) conventions ---------------------------------------------------------------- */

/*
 * Known answer, d = 4 (P = 2), R = 1, worked by hand. Sub-codes w_a (pair 0,
 * pair 1), all others zero:
 *   w1 = (-0.25i, 0.5i)   w2 = (-0.25 - 0.25i, -0.5i)   w3 = (0.5i, 0)
 * Residual z = (0.5 + 0.5i, 0.5 - 0.5i), ||z||^2 = 1.
 * Tables: n_a = sum_p |w_a,p|^2: n1 = 0.0625 + 0.25 = 0.3125, n2 = 0.125 +
 * 0.25 = 0.375, n3 = 0.25. G[A][B] = -2 sum_p (x_A y_B - y_A x_B); the only
 * nonzero real part is x(w2, pair 0) = -0.25, so
 *   G[2][1] = -2 * (-0.25 * -0.25) = -0.125, G[1][2] = +0.125,
 *   G[2][3] = -2 * (-0.25 * 0.5)  = +0.25,   G[3][2] = -0.25, all others 0.
 * <w_a, z> = sum_p conj(w_a,p) z_p:
 *   a=1: 0.25i(0.5+0.5i) + (-0.5i)(0.5-0.5i) = (-0.125+0.125i) + (-0.25-0.25i)
 *        = -0.375 - 0.125i  -> f1 = 0.3125 + 0.75 = 1.0625, g1 = 0.3125 + 0.25 = 0.5625
 *   a=2: (-0.25+0.25i)(0.5+0.5i) + 0.5i(0.5-0.5i) = -0.25 + (0.25+0.25i)
 *        = 0 + 0.25i         -> f2 = 0.375,  g2 = 0.375 - 0.5 = -0.125
 *   a=3: (-0.5i)(0.5+0.5i) = 0.25 - 0.25i -> f3 = 0.25 - 0.5 = -0.25, g3 = 0.75
 *   a=0, 4..63: f = g = 0.
 * Best (f[A] + g[B]) + G[A][B]: A=3, B=2: -0.25 - 0.125 - 0.25 = -0.625, i.e.
 * ||z - c||^2 = 1 - 0.625 = 0.375; next best e.g. (3,0): -0.25, (0,2): -0.125.
 * Code 64*3 + 2 = 194. Centre c(3,2) = w3 + i*w2 = (0.5i + i(-0.25-0.25i),
 * 0 + i(-0.5i)) = (0.25 + 0.25i, 0.5), residual z - c = (0.25 + 0.25i, -0.5i).
 * Wrong conventions pick other codes (computed the same way): w_A - i*w_B ->
 * 195, w_B + i*w_A -> 131, conj(w_A) + i*conj(w_B) -> 67.
 */
static const float ka_w[4][2][2] = {
    /* a = 0 */ {{0.0f, 0.0f}, {0.0f, 0.0f}},
    /* a = 1 */ {{0.0f, -0.25f}, {0.0f, 0.5f}},
    /* a = 2 */ {{-0.25f, -0.25f}, {0.0f, -0.5f}},
    /* a = 3 */ {{0.0f, 0.5f}, {0.0f, 0.0f}},
};
static const float ka_z[2][2] = {{0.5f, 0.5f}, {0.5f, -0.5f}};   /* pairs of z */
static const float ka_res[2][2] = {{0.25f, 0.25f}, {0.0f, -0.5f}}; /* expected residual */
static const float ka_centre[2][2] = {{0.25f, 0.25f}, {0.5f, 0.0f}};
#define KA_CODE 194u

static void test_conventions_known_answer(void **state) {
    (void)state;
    th_tally_reset(&g_bk);
    /* 1. The stage kernel on hand-built tables, d = 4, both layouts. */
    float w[64][2][2];
    float n[64], G[64][64];
    memset(w, 0, sizeof w);
    memset(n, 0, sizeof n);
    memset(G, 0, sizeof G);
    memcpy(w, ka_w, sizeof ka_w);
    n[1] = 0.3125f;
    n[2] = 0.375f;
    n[3] = 0.25f;
    G[2][1] = -0.125f;
    G[1][2] = 0.125f;
    G[2][3] = 0.25f;
    G[3][2] = -0.25f;
    for (int lay = 0; lay < 2; lay++) {
        const cvq_pair_layout layout = lay ? CVQ_PAIRS_INTERLEAVED : CVQ_PAIRS_ROTATE_HALF;
        float z[4];
        for (uint32_t p = 0; p < 2; p++) {
            uint32_t re, im;
            th_pair(layout, 4, p, &re, &im);
            z[re] = ka_z[p][0];
            z[im] = ka_z[p][1];
        }
        /* the oracle agrees with the hand computation, and each wrong
         * convention gives another code (the oracle can tell them apart) */
        float zc[4];
        memcpy(zc, z, sizeof z);
        double best, second;
        assert_int_equal(th_bf_key_stage(&w[0][0][0], 4, layout, zc, TH_CENTRE_OK, NULL, &best,
                                         &second),
                         KA_CODE);
        assert_true(fabs(best - 0.375) < 1e-15);
        assert_int_equal(th_bf_key_stage(&w[0][0][0], 4, layout, zc, TH_CENTRE_MINUS_I, NULL, NULL,
                                         NULL),
                         195);
        assert_int_equal(th_bf_key_stage(&w[0][0][0], 4, layout, zc, TH_CENTRE_SWAPPED, NULL, NULL,
                                         NULL),
                         131);
        assert_int_equal(th_bf_key_stage(&w[0][0][0], 4, layout, zc, TH_CENTRE_CONJ, NULL, NULL,
                                         NULL),
                         67);
        const uint16_t code = cvq_ref_key_stage(&w[0][0][0], n, &G[0][0], 4, layout, z);
        assert_int_equal(code, KA_CODE);
        for (uint32_t p = 0; p < 2; p++) {
            uint32_t re, im;
            th_pair(layout, 4, p, &re, &im);
            assert_true(z[re] == ka_res[p][0] && z[im] == ka_res[p][1]);
        }
        /* Tie rule (strict <, lowest index wins), exact ties by hand:
         * z = (-0.375 - 0.5i, -0.625 + 0.75i): <w1,z> = 0.25i(-0.375-0.5i)
         * + (-0.5i)(-0.625+0.75i) = 0.5 + 0.21875i, <w3,z> = -0.5i(-0.375-0.5i)
         * = -0.25 + 0.1875i, so g1 = 0.3125 - 0.4375 = -0.125 = g3 = 0.25 -
         * 0.375, and G[1][1] = G[1][3] = 0: codes 65 = (1,1) and 67 = (1,3) are
         * exactly equidistant (0.53125, next 0.65625). Expect 65, residual
         * z - c(1,1), c(1,1) = w1 + i*w1 = (0.25 - 0.25i, -0.5 + 0.5i). */
        static const float tie_z[2][2] = {{-0.375f, -0.5f}, {-0.625f, 0.75f}};
        static const float tie_res[2][2] = {{-0.625f, -0.25f}, {-0.125f, 0.25f}};
        for (uint32_t p = 0; p < 2; p++) {
            uint32_t re, im;
            th_pair(layout, 4, p, &re, &im);
            z[re] = tie_z[p][0];
            z[im] = tie_z[p][1];
        }
        assert_int_equal(cvq_ref_key_stage(&w[0][0][0], n, &G[0][0], 4, layout, z), 65);
        for (uint32_t p = 0; p < 2; p++) {
            uint32_t re, im;
            th_pair(layout, 4, p, &re, &im);
            assert_true(z[re] == tie_res[p][0] && z[im] == tie_res[p][1]);
        }
        /* z = 0: every code built from zero sub-codes (0, 4..63) is at
         * distance 0, all others farther (e.g. (3,2): 0.25 + 0.375 - 0.25);
         * the lowest index, 0, wins and the residual stays 0. */
        memset(z, 0, sizeof z);
        assert_int_equal(cvq_ref_key_stage(&w[0][0][0], n, &G[0][0], 4, layout, z), 0);
        for (int j = 0; j < 4; j++) {
            assert_true(z[j] == 0.0f);
        }
    }

    /* 2. The same sub-codes in pairs 0 and 1 of a d = 64 codebook made with
     * cvq_codebook_create: the library's derived tables must equal the hand
     * values, and the public API must give code 194, scale 1 (||k|| = 1
     * exactly) and decode to the centre exactly. */
    for (int lay = 0; lay < 2; lay++) {
        cvq_geometry g;
        memset(&g, 0, sizeof g);
        g.n_layers = 1;
        g.n_q_heads = 1;
        g.n_kv_heads = 1;
        g.head_dim = 64;
        g.key_stages = 1;
        g.pair_layout = lay ? CVQ_PAIRS_INTERLEAVED : CVQ_PAIRS_ROTATE_HALF;
        g.value_bits = 8;
        double theta[32];
        assert_int_equal(cvq_rope_freqs_default(64, ROPE_BASE, theta), CVQ_OK);
        cvq_codebook *cb = NULL;
        assert_int_equal(cvq_codebook_create(&g, theta, NULL, &cb), CVQ_OK);
        float *kw = NULL;
        assert_int_equal(cvq_codebook_tensor_data(cb, CVQ_T_KEY_W, 0, 0, &kw), CVQ_OK);
        for (uint32_t a = 0; a < 4; a++) { /* kw[a][p][2], P = 32 */
            for (uint32_t p = 0; p < 2; p++) {
                kw[(a * 32 + p) * 2] = ka_w[a][p][0];
                kw[(a * 32 + p) * 2 + 1] = ka_w[a][p][1];
            }
        }
        float *ls = NULL;
        assert_int_equal(cvq_codebook_tensor_data(cb, CVQ_T_VAL_LS, 0, 0, &ls), CVQ_OK);
        for (int j = 0; j < 64; j++) {
            ls[j] = 1.0f;
        }
        assert_int_equal(cvq_codebook_commit(cb), CVQ_OK);
        cvq_layer_view lv;
        assert_int_equal(cvq__layer_view(NULL, cb, 0, &lv), CVQ_OK);
        assert_true(lv.key_n[0] == 0.0f && lv.key_n[1] == 0.3125f && lv.key_n[2] == 0.375f &&
                    lv.key_n[3] == 0.25f && lv.key_n[4] == 0.0f);
        assert_true(lv.key_G[2 * 64 + 1] == -0.125f && lv.key_G[1 * 64 + 2] == 0.125f &&
                    lv.key_G[2 * 64 + 3] == 0.25f && lv.key_G[3 * 64 + 2] == -0.25f &&
                    lv.key_G[1 * 64 + 3] == 0.0f && lv.key_G[3 * 64 + 3] == 0.0f);

        float k[64];
        memset(k, 0, sizeof k);
        for (uint32_t p = 0; p < 2; p++) {
            uint32_t re, im;
            th_pair(g.pair_layout, 64, p, &re, &im);
            k[re] = ka_z[p][0];
            k[im] = ka_z[p][1];
        }
        char name[48];
        snprintf(name, sizeof name, "known-answer(layout=%s)", lay ? "inter" : "rot");
        for (size_t bi = 0; bi < g_bk.n; bi++) {
            th_backend *b = &g_bk.b[bi];
            uint16_t *code = th_guard_alloc(sizeof(uint16_t));
            float *s = th_guard_alloc(sizeof(float));
            float *kdec = th_guard_alloc(64 * sizeof(float));
            assert_true(code && s && kdec);
            const cvq_status st = cvq_encode_keys(b->ctx, cb, 0, k, CVQ_F32, 1, code, s);
            assert_true(th_guard_ok(code) && th_guard_ok(s));
            if (backend_ok(b, name, "cvq_encode_keys", st)) {
                if (*code != KA_CODE || *s != 1.0f) {
                    fail_msg("%s [%s]: code %u scale %.9g, expected %u and 1", name, b->name,
                             *code, *s, KA_CODE);
                }
                assert_int_equal(cvq_decode_keys(b->ctx, cb, 0, code, s, 1, kdec), CVQ_OK);
                assert_true(th_guard_ok(kdec));
                for (uint32_t j = 0; j < 64; j++) {
                    float want = 0.0f;
                    for (uint32_t p = 0; p < 2; p++) {
                        uint32_t re, im;
                        th_pair(g.pair_layout, 64, p, &re, &im);
                        if (j == re) want = ka_centre[p][0];
                        if (j == im) want = ka_centre[p][1];
                    }
                    if (kdec[j] != want) {
                        fail_msg("%s [%s]: decoded k[%u] = %g, expected %g", name, b->name, j,
                                 kdec[j], want);
                    }
                }
                th_tally_run(b);
            }
            th_guard_free(code);
            th_guard_free(s);
            th_guard_free(kdec);
        }
        cvq_codebook_free(cb);
    }
    printf("[conformance c] known answer d=4 R=1: code %u, residual and decode exact, both "
           "layouts; wrong conventions give 195/131/67; exact ties -> lowest index; backends "
           "run/skipped: %s\n",
           KA_CODE, tally(0));
    th_tally_print_skips(&g_bk, "[conformance c]");
}

/* Wrong centre conventions, on random data: each must disagree with the
 * library somewhere (so the brute-force comparison in (a) is sensitive). */
static void test_conventions_sensitivity(void **state) {
    (void)state;
    th_case c = {.op = "conv", .d = 64, .hq = 2, .hkv = 2, .R = 4, .Nc = 64,
                 .layout = CVQ_PAIRS_ROTATE_HALF, .scale = CVQ_KEY_SCALE_HEAD, .T = 6};
    size_t differs[4] = {0, 0, 0, 0}, stages = 0;
    for (int lay = 0; lay < 2; lay++) {
        c.layout = lay ? CVQ_PAIRS_INTERLEAVED : CVQ_PAIRS_ROTATE_HALF;
        cvq_geometry g;
        double theta[128];
        cvq_codebook *cb = case_codebook(&c, &g, theta);
        cvq_layer_view lv;
        layer_view(&c, cb, &lv);
        const size_t kvd = (size_t)c.hkv * c.d;
        th_rng rng;
        th_rng_seed(&rng, c.seed);
        float *k = xmalloc(c.T * kvd * sizeof(float));
        fill_keys(&rng, k, c.T, kvd);
        double *dist = xmalloc(4096 * sizeof(double));
        key_stats ks;
        memset(&ks, 0, sizeof ks);
        for (size_t t = 0; t < c.T; t++) {
            check_token(&c, &lv, k + t * kvd, dist, &ks, NULL, 1);
        }
        for (int v = 1; v < 4; v++) {
            differs[v] += ks.conv_differs[v];
        }
        stages += ks.stages;
        free(dist);
        free(k);
        cvq_codebook_free(cb);
    }
    for (int v = 1; v < 4; v++) {
        if (differs[v] == 0) {
            fail_msg("centre convention %d is indistinguishable from the library's on %zu stages",
                     v, stages);
        }
    }
    printf("[conformance c] wrong centre conventions differ from the library on %zu/%zu "
           "(w_A-i*w_B), %zu/%zu (swapped), %zu/%zu (conjugated) stages\n",
           differs[1], stages, differs[2], stages, differs[3], stages);
}

/* RoPE: cvq_rope_apply (float, integer phase) vs HF x*cos + rotate_half(x)*sin
 * and GPT-J interleaved, in double with the angle theta_p * n. Tolerance
 * 2e-6 of max|x|: a rotated pair costs two rounded products and one add
 * (~2 ulp) plus the library's sin/cos error (~1e-7) and its 2^-32-turn phase
 * truncation (1.5e-9 rad). A rotation the wrong way or in the other layout's
 * pairs is off by O(1) and must fail. */
static void test_conventions_rope(void **state) {
    (void)state;
    const int32_t positions[] = {0, 1, 2, 7, 100, 4095, 65536, 131071, 131072, 1000000, 2147483647};
    const uint32_t dims[] = {64, 80, 96, 128, 256};
    double worst = 0.0;
    size_t checks = 0;
    th_rng rng;
    th_rng_seed(&rng, th_fnv1a64("rope"));
    for (size_t di = 0; di < 5; di++) {
        const uint32_t d = dims[di];
        double theta[128];
        assert_int_equal(cvq_rope_freqs_default(d, ROPE_BASE, theta), CVQ_OK);
        uint64_t t[128];
        for (uint32_t p = 0; p < d / 2; p++) {
            t[p] = cvq_rope_phase_step(theta[p]);
        }
        for (int lay = 0; lay < 2; lay++) {
            const cvq_pair_layout layout = lay ? CVQ_PAIRS_INTERLEAVED : CVQ_PAIRS_ROTATE_HALF;
            for (size_t pi = 0; pi < sizeof positions / sizeof positions[0]; pi++) {
                const int32_t pos = positions[pi];
                float x[256];
                double xd[256], want[256], wrong[256], other[256];
                th_fill_normal(&rng, x, d, 1.0);
                for (uint32_t j = 0; j < d; j++) {
                    xd[j] = x[j];
                }
                if (lay) {
                    th_rope_gptj(xd, d, theta, pos, 1, want);
                    th_rope_gptj(xd, d, theta, pos, -1, wrong);
                    th_rope_hf(xd, d, theta, pos, 1, other);
                } else {
                    th_rope_hf(xd, d, theta, pos, 1, want);
                    th_rope_hf(xd, d, theta, pos, -1, wrong);
                    th_rope_gptj(xd, d, theta, pos, 1, other);
                }
                cvq_rope_apply(x, d, (int)layout, t, pos);
                th_err e = th_cmp_f32_f64(x, want, d);
                char name[96];
                snprintf(name, sizeof name, "rope(d=%u,layout=%s,pos=%d)", d,
                         lay ? "inter" : "rot", (int)pos);
                if (!(e.norm_err <= 2e-6)) {
                    fail_msg("%s: error %.3g > 2e-6 (index %zu)", name, e.norm_err, e.worst);
                }
                if (e.norm_err > worst) {
                    worst = e.norm_err;
                }
                if (pos != 0) {
                    /* the wrong conventions are far outside the tolerance */
                    const th_err ew = th_cmp_f32_f64(x, wrong, d);
                    const th_err eo = th_cmp_f32_f64(x, other, d);
                    if (!(ew.norm_err > 1e-2) || !(eo.norm_err > 1e-2)) {
                        fail_msg("%s: a wrong RoPE convention passes (%.3g, %.3g)", name,
                                 ew.norm_err, eo.norm_err);
                    }
                }
                checks++;
            }
        }
    }
    printf("[conformance c] RoPE vs HF/GPT-J double formulas: %zu vectors, max norm error %.2e "
           "(tol 2e-6); wrong sign / other layout rejected\n",
           checks, worst);
}

/* ---- (d) value encoding ---------------------------------------------------------- */

/* Group view of the primary value tensors of layer 0, group gi. */
static th_value_group value_group(const cvq_codebook *cb, const cvq_geometry *g, uint32_t gi) {
    th_value_group vg;
    vg.F = g->value_group_width;
    vg.I = g->value_hidden;
    vg.Nc = g->value_bits;
    assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_LS, 0, gi, &vg.ls), CVQ_OK);
    assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_LN_W, 0, gi, &vg.ln_w), CVQ_OK);
    assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_LN_B, 0, gi, &vg.ln_b), CVQ_OK);
    assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_W1, 0, gi, &vg.w1), CVQ_OK);
    assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_B1, 0, gi, &vg.b1), CVQ_OK);
    assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_W2, 0, gi, &vg.w2), CVQ_OK);
    assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_B2, 0, gi, &vg.b2), CVQ_OK);
    assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_E, 0, gi, &vg.E), CVQ_OK);
    return vg;
}

/* Non-trivial ls and LayerNorm (the random codebook has ls = 1 and an
 * identity LayerNorm), so the test sees how they are applied. */
static void perturb_value_tensors(cvq_codebook *cb, const cvq_geometry *g, th_rng *rng) {
    const uint32_t groups = cvq__value_groups(g), F = g->value_group_width;
    for (uint32_t gi = 0; gi < groups; gi++) {
        float *ls, *lw, *lb;
        assert_int_equal(cvq_codebook_tensor_data(cb, CVQ_T_VAL_LS, 0, gi, &ls), CVQ_OK);
        assert_int_equal(cvq_codebook_tensor_data(cb, CVQ_T_VAL_LN_W, 0, gi, &lw), CVQ_OK);
        assert_int_equal(cvq_codebook_tensor_data(cb, CVQ_T_VAL_LN_B, 0, gi, &lb), CVQ_OK);
        for (uint32_t j = 0; j < F; j++) {
            ls[j] = (float)(0.5 + 1.5 * th_rng_uniform(rng));
            lw[j] = (float)(1.0 + 0.2 * th_rng_normal(rng));
            lb[j] = (float)(0.1 * th_rng_normal(rng));
        }
    }
    assert_int_equal(cvq_codebook_commit(cb), CVQ_OK);
}

/* 4-way index j of bits (b_2t, b_2t+1): (1,0)->0, (0,1)->1, (1,1)->2, (0,0)->3 */
static int group_index(const uint8_t *bits, uint32_t t) {
    const int lo = (bits[(2 * t) / 8] >> ((2 * t) % 8)) & 1;
    const int hi = (bits[(2 * t + 1) / 8] >> ((2 * t + 1) % 8)) & 1;
    return lo && !hi ? 0 : (!lo && hi ? 1 : (lo && hi ? 2 : 3));
}

/* Margin for a bit difference: the float logits carry rounding errors of
 * order sqrt(I) * 2^-24 * S (S = |b2| + sum_i |W2[o][i] h_i|, plus the
 * propagated error of h), about 3e-6 * S at I = 2048. A differing group is
 * excused when the double logits of the two choices are within 2e-5 * S. */
#define VALUE_MARGIN 2e-5

static void test_value_encode(void **state) {
    (void)state;
    th_case cases[] = {
        {.op = "values", .d = 64, .hq = 3, .hkv = 3, .R = 1, .Nc = 64, .F = 64, .T = 40},
        {.op = "values", .d = 64, .hq = 9, .hkv = 3, .R = 1, .Nc = 192, .F = 192, .T = 30},
        {.op = "values", .d = 80, .hq = 2, .hkv = 2, .R = 1, .Nc = 96, .F = 160, .I = 200, .T = 30},
        {.op = "values", .d = 128, .hq = 8, .hkv = 4, .R = 1, .Nc = 512, .F = 256, .T = 12},
        {.op = "values", .d = 128, .hq = 32, .hkv = 8, .R = 1, .Nc = 1024, .F = 1024, .T = 6},
    };
    th_tally_reset(&g_bk);
    size_t n_groups_total = 0, n_excused = 0, n_tokens = 0;
    double worst_gap = 0.0, worst_sigma = 0.0, worst_decode = 0.0;
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        th_case *c = &cases[ci];
        cvq_geometry g;
        double theta[128];
        cvq_codebook *cb = case_codebook(c, &g, theta);
        th_rng rng;
        th_rng_seed(&rng, c->seed);
        perturb_value_tensors(cb, &g, &rng);
        cvq_layer_view lv;
        layer_view(c, cb, &lv);
        const uint32_t groups = lv.n_groups, F = g.value_group_width, Nc = g.value_bits;
        const size_t kvd = (size_t)c->hkv * c->d, T = c->T, vbytes = (size_t)groups * Nc / 8;
        float *v = xmalloc(T * kvd * sizeof(float));
        th_fill_normal(&rng, v, T * kvd, 1.0);
        if (T > 1) {
            memset(v + kvd, 0, kvd * sizeof(float)); /* a zero value token */
        }
        float *scratch = xmalloc(cvq_ref_value_scratch(&lv) * sizeof(float));
        uint8_t *bits_ref = xmalloc(T * vbytes);
        float *sigma_ref = xmalloc(T * groups * sizeof(float));
        uint8_t *bits_d = xmalloc(Nc / 8);
        double *logits = xmalloc(2 * Nc * sizeof(double)), *abs_sum = xmalloc(2 * Nc * sizeof(double));
        double *vdec_d = xmalloc(F * sizeof(double));
        float *vdec = xmalloc(kvd * sizeof(float));
        for (size_t t = 0; t < T; t++) {
            const float *vt = v + t * kvd;
            assert_true(cvq_ref_value_check(&lv, vt));
            cvq_ref_encode_value_token(&lv, vt, bits_ref + t * vbytes, sigma_ref + t * groups,
                                       scratch);
            cvq_ref_decode_value_token(&lv, bits_ref + t * vbytes, sigma_ref + t * groups, vdec,
                                       scratch);
            for (uint32_t gi = 0; gi < groups; gi++) {
                const th_value_group vg = value_group(cb, &g, gi);
                const uint8_t *bl = bits_ref + t * vbytes + (size_t)gi * Nc / 8;
                double sigma_d, pre_d;
                assert_true(th_encode_value_double(&vg, vt + (size_t)gi * F, bits_d, &sigma_d,
                                                   &pre_d, logits, abs_sum));
                for (uint32_t q = 0; q < Nc / 2; q++) {
                    const int jl = group_index(bl, q), jd = group_index(bits_d, q);
                    n_groups_total++;
                    if (jl == jd) {
                        continue;
                    }
                    double S = 0.0;
                    for (int m = 0; m < 4; m++) {
                        S = fmax(S, abs_sum[4 * q + m]);
                    }
                    const double gap = logits[4 * q + jd] - logits[4 * q + jl];
                    if (!(gap <= VALUE_MARGIN * S)) {
                        fail_msg("%s: token %zu group %u logit group %u: library picks %d, double "
                                 "%d, gap %.3g > %.1e * %.3g",
                                 c->name, t, gi, q, jl, jd, gap, VALUE_MARGIN, S);
                    }
                    n_excused++;
                    if (gap / S > worst_gap) {
                        worst_gap = gap / S;
                    }
                }
                /* sigma from the library's own bits, in double */
                const double sd = th_value_sigma_double(&vg, vt + (size_t)gi * F, bl);
                const double rel = fabs((double)sigma_ref[t * groups + gi] - sd) / sd;
                if (!(rel < 1e-5)) {
                    fail_msg("%s: token %zu group %u: sigma %.9g vs double %.9g (rel %.3g)",
                             c->name, t, gi, sigma_ref[t * groups + gi], sd, rel);
                }
                if (rel > worst_sigma) {
                    worst_sigma = rel;
                }
                /* decode: (sigma*u)*(ls+eps) in float vs double, 1e-5 of max */
                th_decode_value_double(&vg, bl, sigma_ref[t * groups + gi], vdec_d);
                const th_err e = th_cmp_f32_f64(vdec + (size_t)gi * F, vdec_d, F);
                if (!(e.norm_err <= 1e-5)) {
                    fail_msg("%s: token %zu group %u: value decode error %.3g", c->name, t, gi,
                             e.norm_err);
                }
                if (e.norm_err > worst_decode) {
                    worst_decode = e.norm_err;
                }
            }
        }
        n_tokens += T;
        /* Public API, every backend: bits and sigma bit-identical to the
         * CPU reference (the reference token encoder, checked above against
         * the double encoder); outputs within their bounds. */
        for (size_t bi = 0; bi < g_bk.n; bi++) {
            th_backend *b = &g_bk.b[bi];
            uint8_t *bits = th_guard_alloc(T * vbytes);
            float *sigma = th_guard_alloc(T * groups * sizeof(float));
            assert_non_null(bits);
            assert_non_null(sigma);
            cvq_status st = cvq_encode_values(b->ctx, cb, 0, v, CVQ_F32, T, bits, sigma);
            if (!th_guard_ok(bits) || !th_guard_ok(sigma)) {
                fail_msg("%s [%s]: cvq_encode_values wrote outside its outputs", c->name,
                         b->name);
            }
            if (backend_ok(b, c->name, "cvq_encode_values", st)) {
                size_t first = 0;
                if (th_cmp_bytes(bits, bits_ref, T * vbytes, &first)) {
                    fail_msg("%s [%s]: cvq_encode_values bits differ from the reference encoder "
                             "(first at byte %zu: 0x%02x, reference 0x%02x)",
                             c->name, b->name, first, bits[first], bits_ref[first]);
                }
                if (memcmp(sigma, sigma_ref, T * groups * sizeof(float)) != 0) {
                    fail_msg("%s [%s]: cvq_encode_values sigma differs from the reference encoder",
                             c->name, b->name);
                }
                th_tally_run(b);
            }
            th_guard_free(bits);
            th_guard_free(sigma);
        }
        free(v);
        free(scratch);
        free(bits_ref);
        free(sigma_ref);
        free(bits_d);
        free(logits);
        free(abs_sum);
        free(vdec_d);
        free(vdec);
        cvq_codebook_free(cb);
    }
    printf("[conformance d] values: %zu cases, %zu tokens, %zu 4-way groups vs double, %zu "
           "excused (worst gap %.2e * S, margin %.0e * S), sigma max rel err %.2e (tol 1e-5), "
           "decode max err %.2e; public API bit-exact vs reference, backends run/skipped: %s\n",
           sizeof cases / sizeof cases[0], n_tokens, n_groups_total, n_excused, worst_gap,
           VALUE_MARGIN, worst_sigma, worst_decode, tally(0));
    th_tally_print_skips(&g_bk, "[conformance d]");
}

/* ---- (e) code-domain attention --------------------------------------------------- */

/*
 * Tolerance, per case: max |out - oracle| / max |oracle| <= attn_tol(case).
 * The oracle decodes the same codes in double, so the difference is only
 * the library's float arithmetic: a code-domain logit sums R*P rounded terms
 * (a full-precision one d), the softmax adds expf and a sum over the T
 * tokens, the value side sums up to Nc (code space) or T (full precision)
 * float terms; sin/cos contribute ~1e-7. Rounding errors of independent
 * terms add like a random walk, so the bound is
 *     attn_tol = 16 * 2^-24 * sqrt(R*P + d + Nc + T)
 * (1.7e-5 for d=64, R=4, Nc=64, T=20; 5.4e-5 for the LLaMA layer). The CPU
 * reference measures about 1e-6, under 1/25 of the bound (printed), yet
 * a 1e-4 relative error in the logits fails, and any convention error (wrong
 * rotation, conjugate, wrong head, wrong group column, missing ls, causal
 * mask) gives O(1e-1..1).
 */
static double attn_tol(const cvq_geometry *g, uint32_t T) {
    const double L = (double)g->key_stages * (g->head_dim / 2) + g->head_dim + g->value_bits + T;
    return 16.0 * ldexp(1.0, -24) * sqrt(L);
}

typedef struct attn_stats {
    size_t cases, runs, zero_rows;
    double worst;        /* max norm error */
    double worst_ratio;  /* max norm error / attn_tol */
    char worst_name[256 + 32]; /* case name [backend name] */
} attn_stats;

/* Query positions: n_q = 1: just after the last token; otherwise spread from
 * before the first token (sees nothing when offset > 0) to after the last,
 * so causal masks cut through sinks, compressed tokens and the window. */
static void query_positions(const th_case *c, const int32_t *pos, int32_t *q_pos) {
    const int64_t last = pos[c->T - 1];
    if (c->n_q == 1) {
        q_pos[0] = (int32_t)(last + 1);
        return;
    }
    const int64_t lo = c->offset > 0 ? c->offset - 1 : 0, hi = last + 2;
    for (uint32_t i = 0; i < c->n_q; i++) {
        q_pos[i] = (int32_t)(lo + ((hi - lo) * (int64_t)i) / (int64_t)(c->n_q - 1));
    }
}

/* One attention case's inputs and oracle output, shared by the backends. */
typedef struct attn_data {
    const th_case *c;
    const cvq_geometry *g;
    const cvq_codebook *cb;
    const float *K, *V, *Q;      /* [T][Hkv][d], [T][Hkv][d], [n_q][Hq][d] */
    const int32_t *pos, *q_pos;  /* [T], [n_q] */
    const double *want;          /* oracle output [n_q][Hq][d] */
    size_t n_sink, n_comp, n_win; /* the cache policy's split of the T tokens */
} attn_data;

/* The case through the public cache API on one backend: append in chunks,
 * check the split, attend, compare with the oracle within attn_tol. A call
 * answered CVQ_ERR_UNSUPPORTED makes the (case, backend) a skip. */
static void attend_on_backend(th_backend *b, const attn_data *ad, attn_stats *as) {
    const th_case *c = ad->c;
    const uint32_t T = c->T, nq = c->n_q;
    const size_t kvd = (size_t)c->hkv * c->d, qd = (size_t)c->hq * c->d;
    cvq_cache_params cp = cvq_cache_default_params();
    cp.window = c->window;
    cp.sinks = c->sinks;
    cvq_cache *cache = NULL;
    if (!backend_ok(b, c->name, "cvq_cache_create",
                    cvq_cache_create(b->ctx, ad->cb, &cp, &cache))) {
        return;
    }
    /* append in three uneven chunks, so blocks form across calls */
    const uint32_t cut1 = T / 3, cut2 = T - T / 4;
    const uint32_t cuts[4] = {0, cut1, cut2, T};
    for (int ch = 0; ch < 3; ch++) {
        const uint32_t a0 = cuts[ch], n = cuts[ch + 1] - a0;
        if (n == 0) continue;
        if (!backend_ok(b, c->name, "cvq_cache_append",
                        cvq_cache_append(cache, ad->K + a0 * kvd, ad->V + a0 * kvd, CVQ_F32,
                                         ad->pos + a0, n))) {
            cvq_cache_free(cache);
            return;
        }
    }
    cvq_cache_stats stats;
    assert_int_equal(cvq_cache_stats_get(cache, &stats), CVQ_OK);
    if (stats.n_sink != ad->n_sink || stats.n_compressed != ad->n_comp ||
        stats.n_window != ad->n_win || stats.n_tokens != T) {
        fail_msg("%s [%s]: cache holds %llu sinks / %llu compressed / %llu window, expected %zu / "
                 "%zu / %zu",
                 c->name, b->name, (unsigned long long)stats.n_sink,
                 (unsigned long long)stats.n_compressed, (unsigned long long)stats.n_window,
                 ad->n_sink, ad->n_comp, ad->n_win);
    }
    float *out = th_guard_alloc(nq * qd * sizeof(float));
    assert_non_null(out);
    cvq_status st = cvq_cache_attend(cache, ad->Q, ad->q_pos, nq,
                                     c->q_rotated ? CVQ_ATTEND_QUERIES_ROTATED : 0u, out);
    if (!th_guard_ok(out)) {
        fail_msg("%s [%s]: cvq_cache_attend wrote outside its output", c->name, b->name);
    }
    if (!backend_ok(b, c->name, "cvq_cache_attend", st)) {
        th_guard_free(out);
        cvq_cache_free(cache);
        return;
    }
    const th_err e = th_cmp_f32_f64(out, ad->want, nq * qd);
    const double tol = attn_tol(ad->g, T);
    if (!(e.norm_err <= tol)) {
        fail_msg("%s [%s]: attention error %.3g > %.2g (max abs err %.3g at %zu, max |out| "
                 "%.3g, NaN %zu)",
                 c->name, b->name, e.norm_err, tol, e.max_abs_err, e.worst, e.max_abs_ref,
                 e.n_nan);
    }
    /* rows of queries that see nothing must be exactly zero */
    for (uint32_t i = 0; i < nq; i++) {
        if (ad->q_pos[i] >= ad->pos[0]) continue;
        for (size_t j = 0; j < qd; j++) {
            if (out[i * qd + j] != 0.0f) {
                fail_msg("%s [%s]: query %u sees no token but out[%zu] = %g", c->name, b->name, i,
                         j, out[i * qd + j]);
            }
        }
        as->zero_rows++;
    }
    if (e.norm_err > as->worst) {
        as->worst = e.norm_err;
    }
    if (e.norm_err / tol > as->worst_ratio) {
        as->worst_ratio = e.norm_err / tol;
        snprintf(as->worst_name, sizeof as->worst_name, "%s [%s]", c->name, b->name);
    }
    if (e.norm_err / tol > b->worst) {
        b->worst = e.norm_err / tol;
    }
    as->runs++;
    th_tally_run(b);
    th_guard_free(out);
    cvq_cache_free(cache);
}

/* One case on every backend. The oracle's compressed tokens are the codes
 * of `oracle` (a CPU context: bit-identical to the reference encoders, as
 * (a) and (d) check). with_ref = 0 leaves the cpu-ref context out. */
static void run_attention_case(th_case *c, cvq_context *oracle, int with_ref, attn_stats *as) {
    size_t n_backends = 0;
    for (size_t bi = 0; bi < g_bk.n; bi++) {
        n_backends += (with_ref || g_bk.b[bi].ctx != g_bk.ref);
    }
    if (n_backends == 0) {
        th_case_finish(c);
        return; /* the oracle would compare with nothing */
    }
    cvq_geometry g;
    double theta[128];
    cvq_codebook *cb = case_codebook(c, &g, theta);
    th_rng rng;
    th_rng_seed(&rng, c->seed);
    perturb_value_tensors(cb, &g, &rng); /* ls != 1: the (ls + eps) factor shows */
    const uint32_t d = c->d, Hq = c->hq, Hkv = c->hkv, T = c->T, nq = c->n_q;
    const uint32_t groups = cvq__value_groups(&g), F = g.value_group_width, Nc = g.value_bits;
    const uint32_t R = g.key_stages, ns = cvq__key_scale_count(&g);
    const size_t kvd = (size_t)Hkv * d, qd = (size_t)Hq * d, vbytes = (size_t)groups * Nc / 8;

    float *K = xmalloc(T * kvd * sizeof(float)), *V = xmalloc(T * kvd * sizeof(float));
    float *Q = xmalloc(nq * qd * sizeof(float));
    int32_t *pos = xmalloc(T * sizeof(int32_t)), *q_pos = xmalloc(nq * sizeof(int32_t));
    fill_keys(&rng, K, T, kvd);
    th_fill_normal(&rng, V, T * kvd, 1.0);
    /* queries ~ N(0, 1.5^2): logits spread over a few units, so the softmax
     * is neither flat nor one-hot */
    th_fill_normal(&rng, Q, nq * qd, 1.5);
    const uint32_t stride = c->pos_stride ? c->pos_stride : 1;
    for (uint32_t t = 0; t < T; t++) {
        pos[t] = c->offset + (int32_t)(stride * t);
    }
    query_positions(c, pos, q_pos);
    if (c->q_rotated) {
        /* the engine's own rotation: double RoPE, rounded to float */
        double x[256], y[256];
        for (uint32_t i = 0; i < nq; i++) {
            for (uint32_t h = 0; h < Hq; h++) {
                float *qv = Q + i * qd + (size_t)h * d;
                for (uint32_t j = 0; j < d; j++) x[j] = qv[j];
                th_rope(c->layout, x, d, theta, q_pos[i], y);
                for (uint32_t j = 0; j < d; j++) qv[j] = (float)y[j];
            }
        }
    }

    /* Oracle inputs: the cache policy's split, the compressed part's codes
     * read back through the stateless encoders (deterministic, bit-exact),
     * decoded in double. */
    size_t n_sink, n_comp, n_win;
    th_cache_split(T, c->sinks, c->window, &n_sink, &n_comp, &n_win);
    double *Kd = xmalloc(T * kvd * sizeof(double)), *Vd = xmalloc(T * kvd * sizeof(double));
    for (size_t i = 0; i < T * kvd; i++) {
        Kd[i] = K[i];
        Vd[i] = V[i];
    }
    if (n_comp) {
        uint16_t *codes = xmalloc(n_comp * Hkv * R * sizeof(uint16_t));
        float *ks = xmalloc(n_comp * ns * sizeof(float));
        uint8_t *vb = xmalloc(n_comp * vbytes);
        float *vs = xmalloc(n_comp * groups * sizeof(float));
        CHECK_OK(c->name,
                 cvq_encode_keys(oracle, cb, 0, K + n_sink * kvd, CVQ_F32, n_comp, codes, ks));
        CHECK_OK(c->name,
                 cvq_encode_values(oracle, cb, 0, V + n_sink * kvd, CVQ_F32, n_comp, vb, vs));
        const float *key_w = NULL;
        assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_KEY_W, 0, 0, &key_w), CVQ_OK);
        for (size_t t = 0; t < n_comp; t++) {
            const size_t tt = n_sink + t;
            th_decode_key_double(&g, key_w, codes + t * Hkv * R, ks + t * ns, Kd + tt * kvd);
            for (uint32_t gi = 0; gi < groups; gi++) {
                const th_value_group vg = value_group(cb, &g, gi);
                th_decode_value_double(&vg, vb + t * vbytes + (size_t)gi * Nc / 8,
                                       vs[t * groups + gi], Vd + tt * kvd + (size_t)gi * F);
            }
        }
        free(codes);
        free(ks);
        free(vb);
        free(vs);
    }
    double *want = xmalloc(nq * qd * sizeof(double));
    assert_true(th_attend_double(&g, theta, nq, Q, q_pos, c->q_rotated, T, Kd, Vd, pos, want));

    const attn_data ad = {c, &g, cb, K, V, Q, pos, q_pos, want, n_sink, n_comp, n_win};
    for (size_t bi = 0; bi < g_bk.n; bi++) {
        th_backend *b = &g_bk.b[bi];
        if (b->ctx == g_bk.ref && !with_ref) {
            continue;
        }
        attend_on_backend(b, &ad, as);
    }
    as->cases++;
    free(K);
    free(V);
    free(Q);
    free(pos);
    free(q_pos);
    free(Kd);
    free(Vd);
    free(want);
    cvq_codebook_free(cb);
}

#define ROT CVQ_PAIRS_ROTATE_HALF
#define INT CVQ_PAIRS_INTERLEAVED
#define TOK CVQ_KEY_SCALE_TOKEN
#define HEAD CVQ_KEY_SCALE_HEAD
/* One attention case; F = 0 means Hkv*d (one joint value group). */
#define AC(d_, hq_, hkv_, R_, Nc_, F_, lay_, sc_, nq_, W_, S_, off_, stride_, T_, qrot_)      \
    {.op = "attend", .d = d_, .hq = hq_, .hkv = hkv_, .R = R_, .Nc = Nc_, .F = F_,            \
     .layout = lay_, .scale = sc_, .n_q = nq_, .window = W_, .sinks = S_, .offset = off_,     \
     .pos_stride = stride_, .T = T_, .q_rotated = qrot_}

/* A covering grid, not the full product: every d, every Hq/Hkv ratio in
 * {1,2,3,4,8} (and 9/3, 12/3), both layouts, n_q in {1,4,17}, windows 0 /
 * small / larger than T, sinks 0 / some, offsets 0 .. 131072 (with gaps via
 * stride), token and head key scales, per-head (F = d), partial and joint
 * (F = Hkv*d) value groups, queries rotated by the caller. */
static const th_case attn_grid[] = {
    /* d, hq, hkv, R, Nc, F, layout, scale, nq, W, S, offset, stride, T, qrot */
    AC(64, 1, 1, 4, 64, 0, ROT, TOK, 1, 0, 0, 0, 0, 20, 0),
    AC(64, 2, 1, 3, 64, 64, INT, HEAD, 4, 4, 0, 1, 0, 33, 0),
    AC(64, 3, 1, 5, 128, 0, ROT, HEAD, 17, 8, 2, 100, 0, 41, 0),
    AC(64, 4, 1, 2, 64, 0, INT, TOK, 1, 16, 4, 131072, 0, 50, 0),
    AC(64, 8, 1, 6, 256, 0, ROT, TOK, 4, 1, 1, 65536, 0, 27, 0),
    AC(64, 9, 3, 5, 192, 192, ROT, TOK, 17, 7, 0, 5000, 2, 60, 0),
    AC(64, 9, 3, 6, 64, 64, INT, HEAD, 4, 0, 3, 131000, 0, 19, 1),
    AC(64, 6, 3, 1, 64, 0, ROT, HEAD, 1, 5, 0, 7, 3, 23, 0),
    AC(80, 1, 1, 8, 80, 0, INT, TOK, 4, 3, 1, 1, 0, 30, 0),
    AC(80, 2, 2, 4, 160, 80, ROT, HEAD, 17, 0, 0, 2048, 0, 25, 0),
    AC(80, 6, 2, 7, 64, 160, INT, TOK, 1, 12, 2, 131072, 0, 40, 0),
    AC(80, 8, 1, 3, 128, 0, ROT, TOK, 4, 64, 0, 3, 0, 20, 0),
    AC(80, 4, 4, 5, 96, 160, INT, HEAD, 17, 9, 5, 99999, 0, 45, 0),
    AC(96, 3, 1, 5, 96, 0, INT, HEAD, 1, 2, 0, 0, 0, 11, 0),
    AC(96, 4, 2, 6, 192, 192, ROT, TOK, 4, 10, 1, 131072, 0, 37, 1),
    AC(96, 12, 3, 4, 96, 96, INT, TOK, 17, 6, 0, 77, 0, 29, 0),
    AC(96, 8, 8, 2, 64, 0, ROT, HEAD, 4, 0, 2, 1000, 0, 13, 0),
    AC(96, 16, 2, 3, 128, 96, ROT, TOK, 1, 4, 4, 120000, 5, 22, 0),
    AC(128, 1, 1, 11, 128, 0, ROT, TOK, 17, 16, 0, 131072, 0, 48, 0),
    AC(128, 2, 1, 8, 256, 0, INT, HEAD, 4, 0, 1, 1, 0, 30, 0),
    AC(128, 3, 3, 4, 384, 384, ROT, HEAD, 1, 8, 0, 50000, 0, 21, 0),
    AC(128, 4, 1, 21, 64, 0, INT, TOK, 4, 3, 3, 2, 0, 16, 0),
    AC(128, 8, 2, 6, 128, 128, ROT, HEAD, 17, 5, 1, 131072, 0, 35, 0),
    AC(128, 16, 4, 5, 512, 256, INT, TOK, 4, 20, 0, 9, 0, 44, 0),
    AC(128, 8, 4, 3, 64, 512, ROT, TOK, 1, 1, 0, 65535, 0, 9, 0),
    AC(128, 32, 8, 2, 128, 128, INT, HEAD, 4, 7, 2, 3000, 0, 26, 0),
    AC(256, 1, 1, 3, 256, 0, INT, TOK, 4, 0, 0, 0, 0, 12, 0),
    AC(256, 2, 1, 5, 128, 0, ROT, HEAD, 17, 6, 2, 131072, 0, 24, 0),
    AC(256, 4, 2, 4, 64, 256, INT, TOK, 1, 3, 1, 4242, 0, 15, 0),
    AC(256, 8, 2, 2, 512, 512, ROT, TOK, 4, 32, 0, 10, 0, 18, 1),
    AC(256, 3, 3, 6, 96, 256, ROT, HEAD, 4, 4, 4, 100000, 0, 20, 0),
    /* edge shapes: one token, everything in sinks, everything in the
     * window, window of 1, sinks larger than T, all masked but one */
    AC(64, 2, 2, 2, 64, 64, ROT, TOK, 4, 8, 0, 500, 0, 1, 0),
    AC(64, 4, 2, 3, 64, 128, INT, HEAD, 4, 4, 16, 0, 0, 10, 0),
    AC(80, 2, 1, 4, 64, 0, ROT, TOK, 17, 64, 0, 40, 0, 30, 0),
    AC(96, 3, 3, 5, 64, 96, INT, TOK, 4, 1, 0, 12345, 0, 17, 0),
    AC(128, 4, 2, 1, 64, 0, ROT, HEAD, 17, 0, 0, 131072, 0, 1, 0),
    AC(64, 8, 8, 4, 128, 64, INT, TOK, 17, 2, 2, 31, 7, 40, 0),
    AC(80, 12, 3, 3, 256, 240, ROT, HEAD, 4, 0, 0, 60000, 0, 33, 0),
    AC(256, 16, 8, 2, 64, 512, INT, HEAD, 1, 2, 1, 8, 0, 14, 0),
};

static void test_attention_grid(void **state) {
    (void)state;
    th_tally_reset(&g_bk);
    attn_stats as;
    memset(&as, 0, sizeof as);
    for (size_t i = 0; i < sizeof attn_grid / sizeof attn_grid[0]; i++) {
        th_case c = attn_grid[i];
        run_attention_case(&c, g_bk.ref, 1, &as);
    }
    if (as.runs == 0) {
        printf("[conformance e] attention: %zu cases, no (case, backend) run; backends "
               "run/skipped: %s\n",
               sizeof attn_grid / sizeof attn_grid[0], tally(0));
    } else {
        printf("[conformance e] attention: %zu cases, %zu (case, backend) runs, max norm error "
               "%.2e, max error/tolerance %.3f in %s; %zu all-masked query rows exactly zero; "
               "backends run/skipped [worst error/tolerance]: %s\n",
               sizeof attn_grid / sizeof attn_grid[0], as.runs, as.worst, as.worst_ratio,
               as.worst_name, as.zero_rows, tally(1));
    }
    th_tally_print_skips(&g_bk, "[conformance e]");
}

/* One full LLaMA-3.1-8B layer at 1 bit: Hq=32, Hkv=8, d=128, R=11, Nc=1024,
 * F=1024 (I = 2048), 300 tokens, W=16, S=4, 4 queries at 131072+.
 * It runs on every backend but cpu-ref: the reference is what the others are
 * held to, its attention is covered by the grid, and at this size its plain
 * kernels would double the section's time. */
static void test_attention_llama(void **state) {
    (void)state;
    th_tally_reset(&g_bk);
    attn_stats as;
    memset(&as, 0, sizeof as);
    th_case c = {.op = "attend", .d = 128, .hq = 32, .hkv = 8, .R = 11, .Nc = 1024, .F = 1024,
                 .layout = CVQ_PAIRS_ROTATE_HALF, .scale = CVQ_KEY_SCALE_TOKEN, .n_q = 4,
                 .window = 16, .sinks = 4, .offset = 131072, .T = 300};
    run_attention_case(&c, g_bk.cpu, 0, &as);
    if (as.runs == 0) {
        printf("[conformance e] LLaMA-3.1-8B layer smoke: %s not run (it leaves cpu-ref out and "
               "no other backend is under test); backends run/skipped: %s\n",
               c.name, tally(0));
    } else {
        printf("[conformance e] LLaMA-3.1-8B layer smoke: %s max norm error %.2e (%.3f of "
               "tolerance); backends run/skipped [error/tolerance] (cpu-ref left out): %s\n",
               c.name, as.worst, as.worst_ratio, tally(1));
    }
    th_tally_print_skips(&g_bk, "[conformance e]");
}

/* ---- (f) stress inputs ------------------------------------------------------------ */

/* Near ties: z = midpoint of two centres (+ tiny noise), run one stage. */
static void test_stress_near_ties(void **state) {
    (void)state;
    th_case c = {.op = "ties", .d = 64, .hq = 1, .hkv = 1, .R = 2, .Nc = 64,
                 .layout = CVQ_PAIRS_INTERLEAVED, .scale = CVQ_KEY_SCALE_HEAD, .T = 1};
    cvq_geometry g;
    double theta[128];
    cvq_codebook *cb = case_codebook(&c, &g, theta);
    cvq_layer_view lv;
    layer_view(&c, cb, &lv);
    th_rng rng;
    th_rng_seed(&rng, c.seed);
    double *dist = xmalloc(4096 * sizeof(double));
    key_stats ks;
    memset(&ks, 0, sizeof ks);
    const float *w, *n, *G;
    stage_tables(&lv, 0, 0, &w, &n, &G);
    const uint32_t P = 32;
    size_t picked_pair = 0, trials = 0, near_ties = 0;
    for (int noise_kind = 0; noise_kind < 3; noise_kind++) {
        const double noise = noise_kind == 0 ? 0.0 : (noise_kind == 1 ? 1e-7 : 1e-5);
        for (int trial = 0; trial < 300; trial++) {
            /* k1 and k2 share A (or B): the midpoint is then exactly
             * equidistant from both centres, |w_B1 - w_B2|/2 away (or
             * |w_A1 - w_A2|/2), and in practice closer than any other code */
            const uint32_t k1 = (uint32_t)(th_rng_u64(&rng) % 4096);
            const uint32_t other = (uint32_t)(1 + th_rng_u64(&rng) % 63);
            const uint32_t k2 = (trial % 2) ? (k1 & ~63u) | ((k1 + other) & 63u) /* same A */
                                            : (k1 + 64 * other) % 4096;        /* same B */
            float z[64];
            for (uint32_t p = 0; p < P; p++) {
                const float *a1 = w + (k1 / 64) * P * 2, *b1 = w + (k1 % 64) * P * 2;
                const float *a2 = w + (k2 / 64) * P * 2, *b2 = w + (k2 % 64) * P * 2;
                const double c1r = (double)a1[2 * p] - b1[2 * p + 1];
                const double c1i = (double)a1[2 * p + 1] + b1[2 * p];
                const double c2r = (double)a2[2 * p] - b2[2 * p + 1];
                const double c2i = (double)a2[2 * p + 1] + b2[2 * p];
                uint32_t re, im;
                th_pair(c.layout, 64, p, &re, &im);
                z[re] = (float)(0.5 * (c1r + c2r) + noise * th_rng_normal(&rng));
                z[im] = (float)(0.5 * (c1i + c2i) + noise * th_rng_normal(&rng));
            }
            float zin[64];
            memcpy(zin, z, sizeof z);
            const uint16_t code = check_stage(&c, &lv, 0, 0, z, dist, &ks, 0);
            picked_pair += (code == k1 || code == k2);
            /* a genuine near tie: the two best double distances within the
             * excuse bound, so the fp32 decision is really at stake */
            double b1 = INFINITY, b2 = INFINITY;
            for (uint32_t k = 0; k < 4096; k++) {
                if (dist[k] < b1) {
                    b2 = b1;
                    b1 = dist[k];
                } else if (dist[k] < b2) {
                    b2 = dist[k];
                }
            }
            near_ties += (b2 - b1) <= excuse_bound(w, 64, zin);
            trials++;
        }
    }
    /* the midpoint of two random centres is nearly always closest to those
     * two: the test really lands on ties */
    assert_true(picked_pair * 10 >= trials * 9);
    assert_true(near_ties * 2 >= trials); /* noise 0 and 1e-7 stay within the bound */
    printf("[conformance f] near ties: %zu midpoints (noise 0, 1e-7, 1e-5), %zu pick one of "
           "the two centres, %zu genuine near ties, %zu excused (worst %.2f of bound)\n",
           trials, picked_pair, near_ties, ks.excused, ks.worst_ratio);
    free(dist);
    cvq_codebook_free(cb);
}

/* Magnitudes: subnormal components, tiny, huge; zero vectors. */

/* One token through cvq_encode_keys on a backend into guarded outputs:
 * false when the backend does not support it (a skip). */
static bool mag_encode(th_backend *b, const th_case *c, const cvq_codebook *cb, const float *k,
                       uint16_t *codes, float *sc) {
    const cvq_status st = cvq_encode_keys(b->ctx, cb, 0, k, CVQ_F32, 1, codes, sc);
    if (!th_guard_ok(codes) || !th_guard_ok(sc)) {
        fail_msg("%s [%s]: cvq_encode_keys wrote outside its outputs", c->name, b->name);
    }
    return backend_ok(b, c->name, "cvq_encode_keys", st);
}

/* The public-API magnitude checks on one backend (mode 1: head scales).
 * base: a normal token and its reference codes/scales; k_sub, k_tiny: the
 * subnormal-component and all-subnormal-squares tokens (codes must equal the
 * reference kernel's bit for bit). */
static void magnitudes_on_backend(th_backend *b, const th_case *c, const cvq_codebook *cb,
                                  const cvq_layer_view *lv, int mode, const float *base,
                                  const uint16_t *codes_base, const float *sc_base,
                                  const float *k_sub, const float *k_tiny) {
    const size_t kvd = 192, R = 3, ns = mode ? 3 : 1;
    uint16_t *codes = th_guard_alloc(9 * sizeof(uint16_t));
    float *sc = th_guard_alloc(3 * sizeof(float));
    float *kdec = th_guard_alloc(kvd * sizeof(float));
    assert_true(codes && sc && kdec);
    float k[192];
    bool supported = false;
    /* 1. exact power-of-two rescalings 2^-60 .. 2^60 (tiny 8.7e-19 to huge
     * 1.2e18, squares stay normal): x = k/s is bitwise the same, so the
     * codes are the same */
    const int exps[] = {-60, -30, 30, 60};
    for (size_t e = 0; e < 4; e++) {
        for (size_t j = 0; j < kvd; j++) k[j] = ldexpf(base[j], exps[e]);
        if (!mag_encode(b, c, cb, k, codes, sc)) goto done;
        if (memcmp(codes, codes_base, 9 * sizeof(uint16_t)) != 0) {
            fail_msg("%s [%s]: codes change under scaling by 2^%d", c->name, b->name, exps[e]);
        }
        for (size_t s = 0; s < ns; s++) assert_true(sc[s] == ldexpf(sc_base[s], exps[e]));
    }
    /* 2. subnormal inputs: bit-exact with the reference kernel (a backend
     * that flushes subnormals to zero differs here) */
    const float *const subs[2] = {k_sub, k_tiny};
    for (int i = 0; i < 2; i++) {
        uint16_t want_c[9];
        float want_s[3];
        cvq_ref_encode_key_token(lv, subs[i], want_c, want_s);
        if (!mag_encode(b, c, cb, subs[i], codes, sc)) goto done;
        if (memcmp(codes, want_c, 9 * sizeof(uint16_t)) != 0 ||
            memcmp(sc, want_s, ns * sizeof(float)) != 0) {
            fail_msg("%s [%s]: %s input: codes/scales differ from the reference", c->name,
                     b->name, i ? "all-subnormal-squares" : "subnormal-component");
        }
    }
    /* 3. squares that all underflow (1e-30 -> 1e-60 -> 0): scale 0, codes 0,
     * decode gives zeros */
    for (size_t j = 0; j < kvd; j++) k[j] = (float)(1e-30 * (j % 2 ? 1 : -1));
    if (!mag_encode(b, c, cb, k, codes, sc)) goto done;
    for (size_t s = 0; s < ns; s++) assert_true(sc[s] == 0.0f);
    for (size_t i = 0; i < 9; i++) assert_int_equal(codes[i], 0);
    assert_int_equal(cvq_decode_keys(b->ctx, cb, 0, codes, sc, 1, kdec), CVQ_OK);
    assert_true(th_guard_ok(kdec));
    for (size_t j = 0; j < kvd; j++) assert_true(kdec[j] == 0.0f);
    /* 4. zero vector; in head mode also one zero head among normal ones */
    memset(k, 0, sizeof k);
    if (!mag_encode(b, c, cb, k, codes, sc)) goto done;
    for (size_t s = 0; s < ns; s++) assert_true(sc[s] == 0.0f);
    for (size_t i = 0; i < 9; i++) assert_int_equal(codes[i], 0);
    if (mode) {
        memcpy(k, base, sizeof k);
        memset(k + 64, 0, 64 * sizeof(float)); /* head 1 zero */
        if (!mag_encode(b, c, cb, k, codes, sc)) goto done;
        assert_true(sc[1] == 0.0f && sc[0] == sc_base[0] && sc[2] == sc_base[2]);
        for (size_t r = 0; r < R; r++) {
            assert_int_equal(codes[3 + r], 0);
            assert_int_equal(codes[r], codes_base[r]);
            assert_int_equal(codes[6 + r], codes_base[6 + r]);
        }
    }
    /* 5. huge: 1e30 squares overflow -> CVQ_ERR_INPUT_RANGE, nothing written */
    for (size_t j = 0; j < kvd; j++) k[j] = 1e30f;
    uint16_t *gc = th_guard_alloc(9 * sizeof(uint16_t));
    float *gs = th_guard_alloc(3 * sizeof(float));
    assert_int_equal(cvq_encode_keys(b->ctx, cb, 0, k, CVQ_F32, 1, gc, gs), CVQ_ERR_INPUT_RANGE);
    assert_true(th_guard_untouched(gc) && th_guard_untouched(gs));
    assert_true(th_guard_ok(gc) && th_guard_ok(gs));
    th_guard_free(gc);
    th_guard_free(gs);
    supported = true;
done:
    if (supported) {
        th_tally_run(b);
    }
    th_guard_free(codes);
    th_guard_free(sc);
    th_guard_free(kdec);
}

static void test_stress_magnitudes(void **state) {
    (void)state;
    th_case c = {.op = "magnitudes", .d = 64, .hq = 3, .hkv = 3, .R = 3, .Nc = 64, .F = 64,
                 .layout = CVQ_PAIRS_ROTATE_HALF, .scale = CVQ_KEY_SCALE_TOKEN, .T = 1};
    th_tally_reset(&g_bk);
    size_t excused = 0, stages = 0, checked = 0;
    for (int mode = 0; mode < 2; mode++) {
        c.scale = mode ? CVQ_KEY_SCALE_HEAD : CVQ_KEY_SCALE_TOKEN;
        cvq_geometry g;
        double theta[128];
        cvq_codebook *cb = case_codebook(&c, &g, theta);
        cvq_layer_view lv;
        layer_view(&c, cb, &lv);
        th_rng rng;
        th_rng_seed(&rng, c.seed);
        const size_t kvd = 192, ns = mode ? 3 : 1;
        double *dist = xmalloc(4096 * sizeof(double));
        key_stats ks;
        memset(&ks, 0, sizeof ks);
        float base[192], k[192], k_sub[192], k_tiny[192];
        uint16_t codes_base[9], codes[9];
        float sc_base[3], sc[3];
        th_fill_normal(&rng, base, kvd, 1.0);
        cvq_ref_encode_key_token(&lv, base, codes_base, sc_base);

        /* The reference kernels against the brute force (the public API
         * on every backend follows in magnitudes_on_backend). */
        /* 1. exact power-of-two rescalings 2^-60 .. 2^60 */
        const int exps[] = {-60, -30, 30, 60};
        for (size_t e = 0; e < 4; e++) {
            for (size_t j = 0; j < kvd; j++) k[j] = ldexpf(base[j], exps[e]);
            check_token(&c, &lv, k, dist, &ks, NULL, 0);
        }
        /* 2. subnormal components: half the dims at 1e-39..1e-44 (subnormal
         * inputs, squares underflow), the rest normal; and a vector whose
         * squares are all subnormal (1e-21: squares ~1e-42, sum > 0) */
        for (size_t j = 0; j < kvd; j++) {
            k_sub[j] = (j % 2) ? base[j] : (float)(base[j] * 1e-39 * pow(10.0, -(double)(j % 6)));
        }
        check_token(&c, &lv, k_sub, dist, &ks, NULL, 0);
        for (size_t j = 0; j < kvd; j++) k_tiny[j] = base[j] * 1e-21f;
        check_token(&c, &lv, k_tiny, dist, &ks, NULL, 0);
        cvq_ref_encode_key_token(&lv, k_tiny, codes, sc);
        for (size_t s = 0; s < ns; s++) assert_true(sc[s] > 0.0f);
        /* 4. one zero head among normal ones (head mode) */
        if (mode) {
            memcpy(k, base, sizeof k);
            memset(k + 64, 0, 64 * sizeof(float)); /* head 1 zero */
            check_token(&c, &lv, k, dist, &ks, NULL, 0);
        }
        for (size_t bi = 0; bi < g_bk.n; bi++) {
            magnitudes_on_backend(&g_bk.b[bi], &c, cb, &lv, mode, base, codes_base, sc_base,
                                  k_sub, k_tiny);
        }
        excused += ks.excused;
        stages += ks.stages;
        checked++;
        free(dist);
        cvq_codebook_free(cb);
    }
    printf("[conformance f] magnitudes (2^+-60 rescaling, subnormal, all-underflow, zero, zero "
           "head, 1e30 overflow): %zu geometries, %zu stages vs brute force, %zu excused; "
           "backends run/skipped: %s\n",
           checked, stages, excused, tally(0));
    th_tally_print_skips(&g_bk, "[conformance f]");
}

/* Non-finite input and bad arguments: the right status, nothing written. */
/* The rejection checks on one backend. A bad call answered
 * CVQ_ERR_UNSUPPORTED (the core asks the backend before it reads the data)
 * is a skip of that call; *n_checked counts the rest. */
static void rejections_on_backend(th_backend *b, const th_case *case_in, const cvq_codebook *cb,
                                  size_t *n_checked) {
    const th_case c = *case_in;
    cvq_context *ctx = b->ctx;
    th_rng rng;
    th_rng_seed(&rng, c.seed);
    const size_t T = c.T, kvd = 128, R = 3, groups = 2, vbytes = groups * 8, qd = 4 * 64;
    float *K = xmalloc(T * kvd * sizeof(float)), *V = xmalloc(T * kvd * sizeof(float));
    float Q[2 * 256];
    th_fill_normal(&rng, K, T * kvd, 1.0);
    th_fill_normal(&rng, V, T * kvd, 1.0);
    th_fill_normal(&rng, Q, 2 * qd, 1.0);
    uint16_t *codes = th_guard_alloc(T * 2 * R * sizeof(uint16_t));
    float *scales = th_guard_alloc(T * sizeof(float));
    uint8_t *bits = th_guard_alloc(T * vbytes);
    float *sigma = th_guard_alloc(T * groups * sizeof(float));
    size_t n_rejections = 0;
#define EXPECT_REJECT(call, status)                                                            \
    do {                                                                                       \
        cvq_status st_ = (call);                                                               \
        if (st_ == CVQ_ERR_UNSUPPORTED && (status) != CVQ_ERR_UNSUPPORTED) {                   \
            th_tally_skip(b, c.name, #call, st_, cvq_last_error());                            \
        } else {                                                                               \
            if (st_ != (status)) {                                                             \
                fail_msg("%s [%s]: %s returned %s, expected %s", c.name, b->name, #call,       \
                         cvq_status_name(st_), cvq_status_name(status));                       \
            }                                                                                  \
            n_rejections++;                                                                    \
        }                                                                                      \
        if (!th_guard_untouched(codes) || !th_guard_untouched(scales) ||                       \
            !th_guard_untouched(bits) || !th_guard_untouched(sigma) || !th_guard_ok(codes) ||  \
            !th_guard_ok(scales) || !th_guard_ok(bits) || !th_guard_ok(sigma)) {               \
            fail_msg("%s [%s]: %s wrote to its outputs although it failed", c.name, b->name,   \
                     #call);                                                                   \
        }                                                                                      \
    } while (0)

    /* NaN / Inf anywhere (last token, last element too) */
    const size_t where[] = {0, 77, T * kvd - 1};
    const float bad[] = {NAN, INFINITY, -INFINITY};
    for (size_t wi = 0; wi < 3; wi++) {
        for (size_t bi = 0; bi < 3; bi++) {
            const float keep_k = K[where[wi]], keep_v = V[where[wi]];
            K[where[wi]] = bad[bi];
            EXPECT_REJECT(cvq_encode_keys(ctx, cb, 0, K, CVQ_F32, T, codes, scales),
                          CVQ_ERR_NONFINITE_INPUT);
            K[where[wi]] = keep_k;
            V[where[wi]] = bad[bi];
            EXPECT_REJECT(cvq_encode_values(ctx, cb, 0, V, CVQ_F32, T, bits, sigma),
                          CVQ_ERR_NONFINITE_INPUT);
            V[where[wi]] = keep_v;
        }
    }
    /* fp16 Inf and bf16 NaN */
    uint16_t *h16 = xmalloc(T * kvd * sizeof(uint16_t));
    for (size_t i = 0; i < T * kvd; i++) h16[i] = cvq_f32_to_f16(K[i]);
    h16[5] = 0x7C00; /* +Inf */
    EXPECT_REJECT(cvq_encode_keys(ctx, cb, 0, h16, CVQ_F16, T, codes, scales),
                  CVQ_ERR_NONFINITE_INPUT);
    for (size_t i = 0; i < T * kvd; i++) h16[i] = 0x3F80; /* bf16 1.0 */
    h16[T * kvd - 1] = 0x7FC0;                            /* bf16 NaN */
    EXPECT_REJECT(cvq_encode_values(ctx, cb, 0, h16, CVQ_BF16, T, bits, sigma),
                  CVQ_ERR_NONFINITE_INPUT);
    free(h16);
    /* bad arguments */
    EXPECT_REJECT(cvq_encode_keys(ctx, cb, 1, K, CVQ_F32, T, codes, scales), CVQ_ERR_LAYER_RANGE);
    EXPECT_REJECT(cvq_encode_values(ctx, cb, 7, V, CVQ_F32, T, bits, sigma), CVQ_ERR_LAYER_RANGE);
    EXPECT_REJECT(cvq_encode_keys(ctx, cb, 0, NULL, CVQ_F32, T, codes, scales),
                  CVQ_ERR_NULL_POINTER);
    EXPECT_REJECT(cvq_encode_keys(ctx, cb, 0, K, (cvq_dtype)9, T, codes, scales),
                  CVQ_ERR_INVALID_ARGUMENT);
    EXPECT_REJECT(cvq_encode_keys(ctx, NULL, 0, K, CVQ_F32, T, codes, scales),
                  CVQ_ERR_NULL_POINTER);
    EXPECT_REJECT(cvq_encode_keys(ctx, cb, 0, K, CVQ_F32, SIZE_MAX / 8, codes, scales),
                  CVQ_ERR_SIZE_OVERFLOW);
    {
        uint16_t badc[6] = {0, 1, 4096, 3, 4, 5};
        float s1 = 1.0f;
        float *kout = th_guard_alloc(kvd * sizeof(float));
        assert_int_equal(cvq_decode_keys(ctx, cb, 0, badc, &s1, 1, kout),
                         CVQ_ERR_INVALID_ARGUMENT);
        assert_true(th_guard_untouched(kout));
        th_guard_free(kout);
        n_rejections++;
    }

    /* The cache: a failed append leaves it unchanged (same stats, same
     * attention output bit for bit); a failed attend writes nothing. */
    cvq_cache_params cp = cvq_cache_default_params();
    cp.window = c.window;
    cvq_cache *cache = NULL;
    int32_t pos[10];
    for (int i = 0; i < 10; i++) pos[i] = 3 * i;
    cvq_cache_stats s0, s1;
    int32_t q_pos[2] = {100, 200};
    float *out0 = th_guard_alloc(2 * qd * sizeof(float)), *out1 = th_guard_alloc(2 * qd * sizeof(float));
    float *gout = th_guard_alloc(2 * qd * sizeof(float));
    assert_true(out0 && out1 && gout);
    /* a backend without the cache's kernels skips this part */
    if (!backend_ok(b, c.name, "cvq_cache_create", cvq_cache_create(ctx, cb, &cp, &cache)) ||
        !backend_ok(b, c.name, "cvq_cache_append", cvq_cache_append(cache, K, V, CVQ_F32, pos, 7))) {
        goto cache_done;
    }
    assert_int_equal(cvq_cache_stats_get(cache, &s0), CVQ_OK);
    const cvq_status st0 = cvq_cache_attend(cache, Q, q_pos, 2, 0, out0);
    assert_true(th_guard_ok(out0));
    if (!backend_ok(b, c.name, "cvq_cache_attend", st0)) {
        goto cache_done;
    }
    /* NaN in the values of the last appended token */
    V[9 * kvd + 3] = NAN;
    assert_int_equal(cvq_cache_append(cache, K + 7 * kvd, V + 7 * kvd, CVQ_F32, pos + 7, 3),
                     CVQ_ERR_NONFINITE_INPUT);
    V[9 * kvd + 3] = 0.5f;
    /* positions not increasing (token 7 at position 3 * 5) */
    int32_t bad_pos[3] = {21, 15, 27};
    assert_int_equal(cvq_cache_append(cache, K + 7 * kvd, V + 7 * kvd, CVQ_F32, bad_pos, 3),
                     CVQ_ERR_POSITION);
    bad_pos[0] = 18; /* == the last appended position */
    assert_int_equal(cvq_cache_append(cache, K + 7 * kvd, V + 7 * kvd, CVQ_F32, bad_pos, 1),
                     CVQ_ERR_POSITION);
    /* 1e30 keys overflow the sum of squares */
    float huge[128];
    for (int j = 0; j < 128; j++) huge[j] = 1e30f;
    int32_t p30 = 30;
    assert_int_equal(cvq_cache_append(cache, huge, V, CVQ_F32, &p30, 1), CVQ_ERR_INPUT_RANGE);
    n_rejections += 4;
    assert_int_equal(cvq_cache_stats_get(cache, &s1), CVQ_OK);
    assert_memory_equal(&s0, &s1, sizeof s0);
    assert_int_equal(cvq_cache_attend(cache, Q, q_pos, 2, 0, out1), CVQ_OK);
    assert_true(th_guard_ok(out1));
    assert_memory_equal(out0, out1, 2 * qd * sizeof(float));
    /* attend with a NaN query / unknown flag: error, output untouched */
    Q[qd + 5] = NAN;
    assert_int_equal(cvq_cache_attend(cache, Q, q_pos, 2, 0, gout), CVQ_ERR_NONFINITE_INPUT);
    Q[qd + 5] = 0.25f;
    assert_int_equal(cvq_cache_attend(cache, Q, q_pos, 2, 0x80u, gout), CVQ_ERR_INVALID_ARGUMENT);
    assert_true(th_guard_untouched(gout) && th_guard_ok(gout));
    n_rejections += 2;
    /* and the cache still accepts the good tokens afterwards */
    assert_int_equal(cvq_cache_append(cache, K + 7 * kvd, V + 7 * kvd, CVQ_F32, pos + 7, 3),
                     CVQ_OK);
    assert_int_equal(cvq_cache_stats_get(cache, &s1), CVQ_OK);
    assert_int_equal(s1.n_tokens, 10);

cache_done:
    th_guard_free(gout);
    th_guard_free(out0);
    th_guard_free(out1);
    cvq_cache_free(cache);
    th_guard_free(codes);
    th_guard_free(scales);
    th_guard_free(bits);
    th_guard_free(sigma);
    free(K);
    free(V);
    b->n_run += n_rejections;
    *n_checked += n_rejections;
#undef EXPECT_REJECT
}

static void test_stress_rejections(void **state) {
    (void)state;
    th_case c = {.op = "reject", .d = 64, .hq = 4, .hkv = 2, .R = 3, .Nc = 64, .F = 64,
                 .layout = CVQ_PAIRS_INTERLEAVED, .scale = CVQ_KEY_SCALE_TOKEN, .n_q = 2,
                 .window = 4, .T = 10};
    cvq_geometry g;
    double theta[128];
    cvq_codebook *cb = case_codebook(&c, &g, theta);
    th_tally_reset(&g_bk);
    size_t n_rejections = 0;
    for (size_t bi = 0; bi < g_bk.n; bi++) {
        rejections_on_backend(&g_bk.b[bi], &c, cb, &n_rejections);
    }
    cvq_codebook_free(cb);
    printf("[conformance f] rejections: %zu bad calls (NaN/Inf in f32/f16/bf16, layer, NULL, "
           "dtype, size overflow, code >= 4096, positions, overflow) refused with nothing "
           "written; cache state unchanged; backends bad calls checked/skipped: %s\n",
           n_rejections, tally(0));
    th_tally_print_skips(&g_bk, "[conformance f]");
}

/* An allocator that can be told to fail, and counts live blocks. */
typedef struct fail_alloc {
    int fail;
    long live;
} fail_alloc;
static void *fa_alloc(void *user, size_t size, size_t align) {
    fail_alloc *fa = user;
    if (fa->fail) return NULL;
    void *p = NULL;
    size = (size + align - 1) / align * align;
    p = aligned_alloc(align, size ? size : align);
    if (p) fa->live++;
    return p;
}
static void fa_free(void *user, void *p) {
    fail_alloc *fa = user;
    fa->live--;
    free(p);
}

/* cvq_ref_attend's scratch allocation failing: CVQ_ERR_OUT_OF_MEMORY,
 * nothing leaked, output untouched; then the same call succeeds. */
static void test_attend_out_of_memory(void **state) {
    (void)state;
    th_case c = {.op = "oom", .d = 64, .hq = 2, .hkv = 1, .R = 2, .Nc = 64, .n_q = 1, .T = 3};
    cvq_geometry g;
    double theta[128];
    cvq_codebook *cb = case_codebook(&c, &g, theta);
    fail_alloc fa = {0, 0};
    cvq_allocator al = {fa_alloc, fa_free, &fa};
    cvq_context_params cp = cvq_context_default_params();
    cp.backend = CVQ_BACKEND_CPU;
    cp.cpu_reference = 1;
    cp.allocator = &al;
    cvq_context *ctx = NULL;
    CHECK_OK(c.name, cvq_context_create(&cp, &ctx));
    cvq_layer_view lv;
    layer_view(&c, cb, &lv);
    th_rng rng;
    th_rng_seed(&rng, c.seed);
    float k[3 * 64], v[3 * 64], q[2 * 64];
    th_fill_normal(&rng, k, 3 * 64, 1.0);
    th_fill_normal(&rng, v, 3 * 64, 1.0);
    th_fill_normal(&rng, q, 2 * 64, 1.0);
    const int32_t pos[3] = {0, 1, 2}, qp = 5;
    float *out = th_guard_alloc(2 * 64 * sizeof(float));
    cvq_attend_host h;
    memset(&h, 0, sizeof h);
    h.n_q = 1;
    h.q = q;
    h.q_pos = &qp;
    h.n_sink = 1;
    h.sink_k = k;
    h.sink_v = v;
    h.sink_pos = pos;
    h.n_win = 2;
    h.win_k = k + 64;
    h.win_v = v + 64;
    h.win_pos = pos + 1;
    h.out = out;
    const long live0 = fa.live;
    fa.fail = 1;
    assert_int_equal(cvq_ref_attend(ctx, &lv, &h), CVQ_ERR_OUT_OF_MEMORY);
    fa.fail = 0;
    assert_int_equal(fa.live, live0);
    assert_true(th_guard_untouched(out));
    CHECK_OK(c.name, cvq_ref_attend(ctx, &lv, &h));
    assert_int_equal(fa.live, live0);
    assert_true(th_guard_ok(out) && !th_guard_untouched(out));
    th_guard_free(out);
    cvq_context_free(ctx);
    assert_int_equal(fa.live, 0);
    cvq_codebook_free(cb);
    printf("[conformance] cvq_ref_attend: allocation failure -> CVQ_ERR_OUT_OF_MEMORY, "
           "nothing leaked or written\n");
}

/* 12-bit code packing of the record: the library's packer vs the harness's
 * independent one (bit by bit), and the unpacker's round trip, for every
 * length 1..40 (odd and even code counts end on half bytes differently). */
static void test_record_packing(void **state) {
    (void)state;
    th_rng rng;
    th_rng_seed(&rng, th_fnv1a64("pack12"));
    uint16_t codes[40], back[40];
    uint8_t mine[60], lib[60 + 1];
    for (size_t n = 1; n <= 40; n++) {
        for (size_t i = 0; i < n; i++) codes[i] = (uint16_t)(th_rng_u64(&rng) & 0xFFF);
        codes[0] = 0xFFF;
        const size_t bytes = (12 * n + 7) / 8;
        memset(lib, 0xEE, sizeof lib);
        th_pack_codes12(codes, n, mine);
        assert_int_equal(cvq_pack_codes12(codes, n, lib), CVQ_OK);
        assert_memory_equal(mine, lib, bytes);
        assert_int_equal(lib[bytes], 0xEE); /* nothing written past ceil(12n/8) */
        assert_int_equal(cvq_unpack_codes12(lib, n, back), CVQ_OK);
        assert_memory_equal(codes, back, n * sizeof(uint16_t));
    }
    printf("[conformance] 12-bit packing: lengths 1..40 equal to the independent packer, "
           "round trip exact\n");
}

/* Per-test wall time, printed after each section's summary. */
static struct timespec t_start;
static int timer_start(void **state) {
    (void)state;
    timespec_get(&t_start, TIME_UTC);
    return 0;
}
static int timer_stop(void **state) {
    (void)state;
    struct timespec t;
    timespec_get(&t, TIME_UTC);
    printf("    (%.2f s)\n", (double)(t.tv_sec - t_start.tv_sec) + 1e-9 * (double)(t.tv_nsec - t_start.tv_nsec));
    return 0;
}
#define TIMED(f) cmocka_unit_test_setup_teardown(f, timer_start, timer_stop)

int main(void) {
    const struct CMUnitTest tests[] = {
        TIMED(test_key_codes),
        TIMED(test_conventions_known_answer),
        TIMED(test_conventions_sensitivity),
        TIMED(test_conventions_rope),
        TIMED(test_value_encode),
        TIMED(test_attention_grid),
        TIMED(test_attention_llama),
        TIMED(test_stress_near_ties),
        TIMED(test_stress_magnitudes),
        TIMED(test_stress_rejections),
        TIMED(test_record_packing),
        TIMED(test_attend_out_of_memory),
    };
    /* COMMVQ_TEST_FILTER=test_attention* runs a subset (cmocka pattern) */
    const char *filter = getenv("COMMVQ_TEST_FILTER");
    if (filter && *filter) {
        cmocka_set_test_filter(filter);
    }
    /* The backends under test, once for the run (COMMVQ_TEST_BACKENDS). */
    if (!th_backends_open(&g_bk)) {
        return 1;
    }
    const int failed = cmocka_run_group_tests_name("conformance", tests, NULL, NULL);
    th_backends_close(&g_bk);
    /* With COMMVQ_VK_VALIDATION=1 (set by ctest) every Khronos validation
     * warning or error fails the run. */
    const uint64_t vk_msgs = cvq_vk_validation_messages();
    printf("[conformance] vulkan validation layer: %s, %llu messages\n",
           cvq_vk_validation_enabled() ? "enabled" : "not enabled", (unsigned long long)vk_msgs);
    return failed ? failed : (vk_msgs ? 1 : 0);
}
