/*
 * The numerics primitives (core/numerics.c, core/convert.c,
 * core/rope_freqs.c) against independent double / long double references:
 * erf and GELU, cos/sin of a turn, the integer RoPE phase at long
 * positions, RoPE in both pair layouts, fp16/bf16 conversions, frequency
 * tables and the subnormal check. Expected values come from libm in double
 * or long double, from formulas written out here, or from mpmath
 * (tools/dev/gen_erf_coeffs.py), never from the code under test.
 */
#include <float.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "commvq.h"
#include "cvq_internal.h"
#include "numerics.h"

#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
#define TEST_HAVE_MXCSR 1
#endif

static const double PI_D = 3.14159265358979323846264338327950288;
static const long double PI_L = 3.14159265358979323846264338327950288L;

static float f_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* splitmix64: deterministic test data on every platform. */
static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}
static double rng_uniform(uint64_t *s) { /* [-1, 1) */
    return (double)(rng_next(s) >> 11) * 0x1p-52 - 1.0;
}

/* ------------------------------------------------------------------------ */
/* erf                                                                       */
/* ------------------------------------------------------------------------ */

#define ERF_TOL 2e-7

static double erf_err(float x) {
    return fabs((double)cvq_erf_f32(x) - erf((double)x));
}

static void test_erf_dense_sweep(void **state) {
    (void)state;
    double worst = 0.0;
    float worst_x = 0.0f;
    /* Every binary32 in [2^-24, 8): all of erf's pieces, their boundaries
     * and the saturated tail; also the odd symmetry, bit for bit. */
    uint32_t lo = bits_of(0x1p-24f), hi = bits_of(8.0f);
    for (uint32_t b = lo; b < hi; ++b) {
        float x = f_from_bits(b);
        float y = cvq_erf_f32(x);
        double e = fabs((double)y - erf((double)x));
        if (e > worst) {
            worst = e;
            worst_x = x;
        }
        if (bits_of(cvq_erf_f32(-x)) != (bits_of(y) ^ 0x80000000u)) {
            fail_msg("erf(-x) != -erf(x) at x = %.9g", (double)x);
        }
    }
    /* The grid of the brief: [-6, 6] by 1e-5, and a sweep of the tiny
     * values down to the subnormals. */
    for (int i = -600000; i <= 600000; ++i) {
        float x = (float)((double)i * 1e-5);
        double e = erf_err(x);
        if (e > worst) {
            worst = e;
            worst_x = x;
        }
    }
    for (uint32_t b = 1; b < lo; b += b / 1024u + 1u) {
        float x = f_from_bits(b);
        double e = fmax(erf_err(x), erf_err(-x));
        if (e > worst) {
            worst = e;
            worst_x = x;
        }
    }
    printf("# erf: max abs error vs double erf = %.3e at x = %.9g (bound %.0e)\n",
           worst, (double)worst_x, ERF_TOL);
    assert_true(worst <= ERF_TOL);
}

static void test_erf_special_values(void **state) {
    (void)state;
    assert_true(bits_of(cvq_erf_f32(0.0f)) == 0u);
    assert_true(bits_of(cvq_erf_f32(-0.0f)) == 0x80000000u);
    assert_true(cvq_erf_f32(INFINITY) == 1.0f);
    assert_true(cvq_erf_f32(-INFINITY) == -1.0f);
    assert_true(cvq_erf_f32(FLT_MAX) == 1.0f);
    assert_true(cvq_erf_f32(-FLT_MAX) == -1.0f);
    assert_true(isnan(cvq_erf_f32(NAN)));
    assert_true(isnan(cvq_erf_f32(-NAN)));
    /* Subnormal arguments: erf(x) = 2x/sqrt(pi) to far below the bound, and
     * the result must not be flushed to zero. */
    float sub = 0x1p-140f;
    assert_true(cvq_erf_f32(sub) > 0.0f);
    assert_true(erf_err(sub) <= 1e-44);
    /* Piece boundaries and their neighbours, from both sides. */
    const float edges[] = {1.0f, 2.0f, 3.0f, 4.0f};
    for (size_t i = 0; i < sizeof edges / sizeof edges[0]; ++i) {
        for (int k = -3; k <= 3; ++k) {
            float x = f_from_bits(bits_of(edges[i]) + (uint32_t)k);
            assert_true(erf_err(x) <= ERF_TOL);
            assert_true(erf_err(-x) <= ERF_TOL);
        }
    }
    /* Never outside [-1, 1], and monotone over a fine grid. */
    float prev = -1.0f;
    for (int i = -80000; i <= 80000; ++i) {
        float y = cvq_erf_f32((float)i * 1e-4f);
        assert_true(y >= -1.0f && y <= 1.0f);
        assert_true(y >= prev);
        prev = y;
    }
}

/* The algorithm of docs/numerics.md section 7.2, re-typed from the document
 * (coefficients from its table). cvq_erf_f32 must equal it bit for bit:
 * GPU backends port the document, so the code and the document must agree. */
static float doc_erf(float x) {
    static const float P[7] = {1.2837917e-01f, -3.7612626e-01f, 1.1283594e-01f,
                               -2.6854211e-02f, 5.1890872e-03f, -8.0168643e-04f,
                               7.875875e-05f};
    static const float Q1[10] = {3.389485e-02f, -1.1893029e-01f, 1.7839542e-01f,
                                 -1.387521e-01f, 4.459947e-02f, 1.4869261e-02f,
                                 -1.9333558e-02f, 4.709594e-03f, 2.4021883e-03f,
                                 -1.5553908e-03f};
    static const float Q2[10] = {4.0695188e-04f, -2.1782843e-03f, 5.4457374e-03f,
                                 -8.350086e-03f, 8.621515e-03f, -6.117443e-03f,
                                 2.808239e-03f, -5.413816e-04f, -3.0636598e-04f,
                                 2.45938e-04f};
    static const float Q3[8] = {7.4198454e-07f, -5.398954e-06f, 1.9040433e-05f,
                                -4.2356052e-05f, 6.4883556e-05f, -8.0906415e-05f,
                                9.564772e-05f, -6.591919e-05f};
    if (isnan(x)) {
        return x;
    }
    float a = x < 0.0f ? -x : x, r, q;
    const float *c;
    int n;
    float u;
    if (a < 1.0f) {
        c = P, n = 7, u = a * a;
    } else if (a < 2.0f) {
        c = Q1, n = 10, u = a - 1.5f;
    } else if (a < 3.0f) {
        c = Q2, n = 10, u = a - 2.5f;
    } else if (a < 4.0f) {
        c = Q3, n = 8, u = a - 3.5f;
    } else {
        return x < 0.0f ? -1.0f : 1.0f;
    }
    q = c[n - 1];
    for (int i = n - 2; i >= 0; --i) {
        q = q * u + c[i];
    }
    r = a < 1.0f ? a + a * q : 1.0f - q;
    return x < 0.0f ? -r : r;
}

static void test_erf_matches_document(void **state) {
    (void)state;
    uint64_t s = 7;
    for (int i = 0; i < 2000000; ++i) {
        float x = (float)(rng_uniform(&s) * 5.0);
        if (bits_of(cvq_erf_f32(x)) != bits_of(doc_erf(x))) {
            fail_msg("erf(%.9g) differs from the documented algorithm",
                     (double)x);
        }
    }
}

static void test_gelu(void **state) {
    (void)state;
    double worst = 0.0;
    for (int i = -200000; i <= 200000; ++i) {
        float x = (float)i * 5e-5f;
        float g = cvq_gelu_f32(x);
        /* The contract's expression, bit for bit (value codes depend on it). */
        float expect = (0.5f * x) * (1.0f + cvq_erf_f32(x * 0.70710677f));
        assert_true(bits_of(g) == bits_of(expect));
        /* Against double: errors of x/sqrt2 (rel 7e-8, times erf' <= 1.13),
         * of erf (8e-8), of 1 + erf (1.2e-7) and of the last product. */
        double xd = (double)x;
        double ref = 0.5 * xd * (1.0 + erf(xd / sqrt(2.0)));
        double e = fabs((double)g - ref);
        double bound = 0.5 * fabs(xd) * (2.5e-7 + 1e-7 * fabs(xd)) + 1.2e-7 * fabs(ref);
        if (e > bound) {
            fail_msg("gelu(%.9g) = %.9g, double %.17g", xd, (double)g, ref);
        }
        worst = fmax(worst, e);
    }
    printf("# gelu: max abs error on [-10, 10] = %.3e\n", worst);
    assert_true(cvq_gelu_f32(100.0f) == 100.0f);
    assert_true(cvq_gelu_f32(-100.0f) == 0.0f);
    assert_true(bits_of(cvq_gelu_f32(-0.0f)) == 0x80000000u);
    assert_true(isnan(cvq_gelu_f32(NAN)));
}

/* ------------------------------------------------------------------------ */
/* cos / sin of a turn                                                       */
/* ------------------------------------------------------------------------ */

#define SINCOS_TOL 2e-7

static double sincos_err(uint32_t turn) {
    float c, s;
    cvq_sincos_turn(turn, &c, &s);
    double ang = 2.0 * PI_D * ((double)turn * 0x1p-32);
    return fmax(fabs((double)c - cos(ang)), fabs((double)s - sin(ang)));
}

static void test_sincos_turn_sweep(void **state) {
    (void)state;
    double worst = 0.0;
    uint32_t worst_t = 0;
    /* A stride through all 2^32 turns (997 is prime: every residue class of
     * the 32-unit reduction is visited). */
    for (uint64_t t = 0; t < (UINT64_C(1) << 32); t += 997) {
        double e = sincos_err((uint32_t)t);
        if (e > worst) {
            worst = e;
            worst_t = (uint32_t)t;
        }
    }
    /* Every octant and quadrant boundary k * 2^29, +-64 turns around it,
     * and around the rounding points of the reduction. */
    for (uint32_t k = 0; k < 8; ++k) {
        for (int dlt = -64; dlt <= 64; ++dlt) {
            uint32_t t = k * 0x20000000u + (uint32_t)dlt;
            double e = sincos_err(t);
            if (e > worst) {
                worst = e;
                worst_t = t;
            }
        }
    }
    /* The whole first octant at the half-step of the reduction
     * (w = 32m + 16 rounds up), where the reduction error is largest. */
    for (uint32_t m = 0; m < (1u << 24); m += 3) {
        double e = sincos_err(32u * m + 16u);
        if (e > worst) {
            worst = e;
            worst_t = 32u * m + 16u;
        }
    }
    printf("# sincos_turn: max abs error vs double cos/sin = %.3e at turn 0x%08x "
           "(bound %.0e)\n",
           worst, (unsigned)worst_t, SINCOS_TOL);
    assert_true(worst <= SINCOS_TOL);
}

static void test_sincos_turn_exact_points(void **state) {
    (void)state;
    float c, s;
    cvq_sincos_turn(0u, &c, &s);
    assert_true(c == 1.0f && s == 0.0f);
    cvq_sincos_turn(0x40000000u, &c, &s); /* quarter turn */
    assert_true(c == 0.0f && s == 1.0f);
    cvq_sincos_turn(0x80000000u, &c, &s); /* half turn */
    assert_true(c == -1.0f && s == 0.0f);
    cvq_sincos_turn(0xC0000000u, &c, &s); /* three quarters */
    assert_true(c == 0.0f && s == -1.0f);
    /* Positive angles turn counter-clockwise: small turn -> s > 0. */
    cvq_sincos_turn(0x01000000u, &c, &s);
    assert_true(s > 0.0f && c > 0.0f);
    /* Symmetries of the construction: t and -t give (c, -s). */
    uint64_t r = 11;
    for (int i = 0; i < 100000; ++i) {
        uint32_t t = (uint32_t)rng_next(&r);
        float c2, s2;
        if ((t & 0x3FFFFFFFu) == 0x20000000u) {
            continue; /* the octant midpoint pairs sin with cos instead */
        }
        cvq_sincos_turn(t, &c, &s);
        cvq_sincos_turn((uint32_t)0 - t, &c2, &s2);
        assert_true(c == c2 && s == -s2);
    }
}

/* docs/numerics.md section 5.2, re-typed from the document. */
static void doc_sincos(uint32_t hi, float *c, float *s) {
    static const float S[4] = {-1.6666667e-01f, 8.333334e-03f, -1.984127e-04f,
                               2.7557319e-06f};
    static const float C[5] = {-5.0e-01f, 4.1666668e-02f, -1.3888889e-03f,
                               2.4801588e-05f, -2.755732e-07f};
    const float K = 3.14159274101257324f * 0x1p-26f; /* fl32(pi) * 2^-26 */
    uint32_t q = hi >> 30, w = hi & 0x3FFFFFFFu, m;
    int swap = w >= (1u << 29);
    m = swap ? (((1u << 30) - w) + 16u) >> 5 : (w + 16u) >> 5;
    float a = (float)m * K, a2 = a * a;
    float ps = S[3];
    for (int i = 2; i >= 0; --i) {
        ps = ps * a2 + S[i];
    }
    float pc = C[4];
    for (int i = 3; i >= 0; --i) {
        pc = pc * a2 + C[i];
    }
    float sa = a + (a * a2) * ps, ca = 1.0f + a2 * pc;
    if (swap) {
        float t = sa;
        sa = ca;
        ca = t;
    }
    const float cs[4][2] = {{ca, sa}, {-sa, ca}, {-ca, -sa}, {sa, -ca}};
    *c = cs[q][0];
    *s = cs[q][1];
}

static void test_sincos_matches_document(void **state) {
    (void)state;
    uint64_t r = 5;
    for (int i = 0; i < 2000000; ++i) {
        uint32_t t = (uint32_t)rng_next(&r);
        if (i < 1024) {
            t = (uint32_t)(i / 128) * 0x20000000u + (uint32_t)(i % 128) - 64u;
        }
        float c1, s1, c2, s2;
        cvq_sincos_turn(t, &c1, &s1);
        doc_sincos(t, &c2, &s2);
        if (bits_of(c1) != bits_of(c2) || bits_of(s1) != bits_of(s2)) {
            fail_msg("sincos_turn(0x%08x) differs from the document", (unsigned)t);
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Integer RoPE phase                                                        */
/* ------------------------------------------------------------------------ */

/* Exact steps from mpmath (tools/dev/gen_erf_coeffs.py prints them). */
static void test_phase_step_known_answers(void **state) {
    (void)state;
    assert_true(cvq_rope_phase_step(1.0) == UINT64_C(0x28BE60DB9391054A));
    assert_true(cvq_rope_phase_step(0.5) == UINT64_C(0x145F306DC9C882A5));
    assert_true(cvq_rope_phase_step(0x1p-20) == UINT64_C(0x0000028BE60DB939));
    assert_true(cvq_rope_phase_step(2.4e-6) == UINT64_C(0x000006688E815C45));
    assert_true(cvq_rope_phase_step(1000.0) == UINT64_C(0x27AA59B86E7CAB00));
    assert_true(cvq_rope_phase_step(3.0e10) == UINT64_C(0xC1C194ED78061E0A));
    assert_true(cvq_rope_phase_step(1e300) == UINT64_C(0xA705623B8BF4109E));
    assert_true(cvq_rope_phase_step(2.0 * PI_D) == UINT64_C(0xFFFFFFFFFFFFFD31));
    assert_true(cvq_rope_phase_step(0.0) == 0u);
    assert_true(cvq_rope_phase_step(5e-324) == 0u);
    /* A negative frequency is the opposite turn; no phase for Inf/NaN. */
    assert_true(cvq_rope_phase_step(-1.0) == (uint64_t)0 - UINT64_C(0x28BE60DB9391054A));
    assert_true(cvq_rope_phase_step(INFINITY) == 0u);
    assert_true(cvq_rope_phase_step(NAN) == 0u);
}

/* Against long double for a realistic table: |t - t_ld| is bounded by the
 * long double's precision (x87: 64 bits, so about 1 unit; where long double
 * is double: about 2^11 units, still 2^-53 turn). */
static void test_phase_step_vs_long_double(void **state) {
    (void)state;
    long double tol = ldexpl(1.0L, 64 - LDBL_MANT_DIG) * 4.0L + 2.0L;
    for (int p = 0; p < 64; ++p) {
        double theta = 1.0 / pow(500000.0, (double)(2 * p) / 128.0);
        long double v = (long double)theta / (2.0L * PI_L);
        v -= floorl(v);
        long double ref = ldexpl(v, 64);
        long double got = (long double)cvq_rope_phase_step(theta);
        assert_true(fabsl(got - ref) <= tol);
    }
}

static void test_rope_phase_long_positions(void **state) {
    (void)state;
    /* LLaMA-3 style table: base 500000, d = 128, every position up to
     * 131072. Reference: cos/sin of theta*n in long double. */
    enum { P = 64, NMAX = 131072 };
    double theta[P];
    uint64_t t[P];
    for (int p = 0; p < P; ++p) {
        theta[p] = 1.0 / pow(500000.0, (double)(2 * p) / 128.0);
        t[p] = cvq_rope_phase_step(theta[p]);
    }
    double worst = 0.0, worst32 = 0.0;
    for (int32_t n = 0; n <= NMAX; ++n) {
        for (int p = 0; p < P; ++p) {
            float c, s;
            cvq_rope_cos_sin(t[p], n, &c, &s);
            long double ang = (long double)theta[p] * (long double)n;
            double e = fmax(fabs((double)c - (double)cosl(ang)),
                            fabs((double)s - (double)sinl(ang)));
            worst = fmax(worst, e);
            if ((n & 63) == 0 || n > NMAX - 64) {
                /* What the plain fp32 product theta*n would give. */
                float a32 = (float)theta[p] * (float)n;
                double e32 = fmax(fabs((double)cosf(a32) - (double)cosl(ang)),
                                  fabs((double)sinf(a32) - (double)sinl(ang)));
                worst32 = fmax(worst32, e32);
            }
        }
    }
    printf("# rope phase, n <= %d: integer phase max error %.3e; "
           "fp32 theta*n would give %.3e\n",
           NMAX, worst, worst32);
    assert_true(worst <= SINCOS_TOL);
    assert_true(worst32 > 100.0 * worst); /* why the integer phase exists */
}

/* ------------------------------------------------------------------------ */
/* RoPE applied to a head vector                                             */
/* ------------------------------------------------------------------------ */

/* HF: q*cos + rotate_half(q)*sin, cos/sin = cat(f, f) over d dims,
 * rotate_half(q) = cat(-q[P:], q[:P]). */
static void ref_rope_hf(const float *x, uint32_t d, const double *theta,
                        int32_t pos, double sign, double *out) {
    uint32_t P = d / 2;
    for (uint32_t i = 0; i < d; ++i) {
        uint32_t p = i % P;
        long double ang = (long double)theta[p] * (long double)pos;
        double c = (double)cosl(ang), s = sign * (double)sinl(ang);
        double rh = i < P ? -(double)x[i + P] : (double)x[i - P];
        out[i] = (double)x[i] * c + rh * s;
    }
}

/* GPT-J / llama.cpp: out[2p] = x0*c - x1*s, out[2p+1] = x0*s + x1*c. */
static void ref_rope_gptj(const float *x, uint32_t d, const double *theta,
                          int32_t pos, double sign, double *out) {
    for (uint32_t p = 0; p < d / 2; ++p) {
        long double ang = (long double)theta[p] * (long double)pos;
        double c = (double)cosl(ang), s = sign * (double)sinl(ang);
        double x0 = x[2 * p], x1 = x[2 * p + 1];
        out[2 * p] = x0 * c - x1 * s;
        out[2 * p + 1] = x0 * s + x1 * c;
    }
}

static double max_diff(const float *a, const double *b, uint32_t n) {
    double m = 0.0;
    for (uint32_t i = 0; i < n; ++i) {
        m = fmax(m, fabs((double)a[i] - b[i]));
    }
    return m;
}

static void test_rope_apply_layouts(void **state) {
    (void)state;
    const uint32_t dims[] = {64, 80, 128};
    const int32_t positions[] = {0, 1, 5, 4095, 8193, 65537, 131071, 131072};
    uint64_t r = 99;
    double worst = 0.0;
    for (size_t di = 0; di < 3; ++di) {
        uint32_t d = dims[di];
        double theta[128];
        uint64_t t[128];
        for (uint32_t p = 0; p < d / 2; ++p) {
            theta[p] = 1.0 / pow(10000.0, (double)(2 * p) / (double)d);
            t[p] = cvq_rope_phase_step(theta[p]);
        }
        for (size_t pi = 0; pi < sizeof positions / sizeof positions[0]; ++pi) {
            int32_t pos = positions[pi];
            float x[256], y[256];
            double ref[256], wrong[256];
            for (uint32_t i = 0; i < d; ++i) {
                x[i] = (float)rng_uniform(&r);
            }
            /* |x| <= 1: each output is off by <= 2 * 2e-7 from cos/sin
             * plus a few roundings of numbers <= 2. */
            const double tol = 1e-6;

            memcpy(y, x, d * sizeof(float));
            cvq_rope_apply(y, d, CVQ_PAIRS_ROTATE_HALF, t, pos);
            ref_rope_hf(x, d, theta, pos, 1.0, ref);
            double e = max_diff(y, ref, d);
            assert_true(e <= tol);
            worst = fmax(worst, e);
            if (pos > 0) {
                /* The same data under the other convention or conjugated
                 * must not match: the comparison can fail. */
                ref_rope_gptj(x, d, theta, pos, 1.0, wrong);
                assert_true(max_diff(y, wrong, d) > 1e-2);
                ref_rope_hf(x, d, theta, pos, -1.0, wrong);
                assert_true(max_diff(y, wrong, d) > 1e-2);
            }

            memcpy(y, x, d * sizeof(float));
            cvq_rope_apply(y, d, CVQ_PAIRS_INTERLEAVED, t, pos);
            ref_rope_gptj(x, d, theta, pos, 1.0, ref);
            e = max_diff(y, ref, d);
            assert_true(e <= tol);
            worst = fmax(worst, e);
            if (pos > 0) {
                ref_rope_hf(x, d, theta, pos, 1.0, wrong);
                assert_true(max_diff(y, wrong, d) > 1e-2);
                ref_rope_gptj(x, d, theta, pos, -1.0, wrong);
                assert_true(max_diff(y, wrong, d) > 1e-2);
            }
        }
    }
    printf("# rope_apply: max abs error vs HF / GPT-J formulas = %.3e\n", worst);
}

/* ------------------------------------------------------------------------ */
/* Conversions                                                               */
/* ------------------------------------------------------------------------ */

/* binary16 decoded with ldexp, independently of the library's bit code. */
static double ref_f16_value(uint16_t h) {
    int sign = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 31) {
        v = m ? NAN : INFINITY;
    } else if (e == 0) {
        v = ldexp((double)m, -24);
    } else {
        v = ldexp((double)(1024 + m), e - 25);
    }
    return sign ? -v : v;
}

static void test_f16_to_f32_exhaustive(void **state) {
    (void)state;
    for (uint32_t h = 0; h < 65536; ++h) {
        float f = cvq_f16_to_f32((uint16_t)h);
        double ref = ref_f16_value((uint16_t)h);
        if (isnan(ref)) {
            assert_true(isnan(f));
            assert_true((bits_of(f) >> 31) == (h >> 15));
            /* Payload kept: top 10 fraction bits are the fp16 ones. */
            assert_true(((bits_of(f) >> 13) & 0x3FFu) == (h & 0x3FFu));
        } else {
            if ((double)f != ref || !signbit(f) != !signbit(ref)) {
                fail_msg("f16 0x%04x -> %.9g, expected %.9g", (unsigned)h,
                         (double)f, ref);
            }
        }
    }
}

static void test_bf16_to_f32_exhaustive(void **state) {
    (void)state;
    for (uint32_t b = 0; b < 65536; ++b) {
        float f = cvq_bf16_to_f32((uint16_t)b);
        int sign = (int)(b >> 15), e = (int)((b >> 7) & 255), m = (int)(b & 127);
        double ref;
        if (e == 255) {
            ref = m ? NAN : INFINITY;
        } else if (e == 0) {
            ref = ldexp((double)m, -133);
        } else {
            ref = ldexp((double)(128 + m), e - 134);
        }
        ref = sign ? -ref : ref;
        if (isnan(ref)) {
            assert_true(isnan(f));
        } else if ((double)f != ref || !signbit(f) != !signbit(ref)) {
            fail_msg("bf16 0x%04x -> %.9g, expected %.9g", (unsigned)b,
                     (double)f, ref);
        }
    }
}

/* Independent fp32 -> fp16: round |f| in double to the fp16 grid with
 * rint (ties to even), then find its code by bisection over the positive
 * codes 0x0000..0x7C00, which are increasing in value. */
static uint16_t ref_f32_to_f16(float f) {
    uint16_t sign = signbit(f) ? 0x8000u : 0u;
    if (isnan(f)) {
        return (uint16_t)(sign | 0x7E00u);
    }
    double a = fabs((double)f);
    if (a >= 65520.0) {
        return (uint16_t)(sign | 0x7C00u);
    }
    double unit;
    if (a < 0x1p-14) {
        unit = 0x1p-24;
    } else {
        int e;
        frexp(a, &e); /* a in [2^(e-1), 2^e) */
        unit = ldexp(1.0, e - 1 - 10);
    }
    double q = rint(a / unit) * unit;
    uint32_t lo = 0, hi = 0x7C00u;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        if (ref_f16_value((uint16_t)mid) < q) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    assert_true(ref_f16_value((uint16_t)lo) == q);
    return (uint16_t)(sign | lo);
}

static void test_f32_to_f16(void **state) {
    (void)state;
    /* Round trip of every non-NaN fp16. */
    for (uint32_t h = 0; h < 65536; ++h) {
        float f = cvq_f16_to_f32((uint16_t)h);
        uint16_t back = cvq_f32_to_f16(f);
        if (isnan(f)) {
            assert_true((back & 0x7C00u) == 0x7C00u && (back & 0x3FFu) != 0);
            assert_true((back & 0x8000u) == (h & 0x8000u));
        } else {
            assert_int_equal(back, h);
        }
    }
    /* Ties: the midpoint of two neighbouring positive codes (exact in fp32)
     * goes to the even code; one fp32 ulp either side goes to the nearer.
     * The last pair (0x7BFF, 0x7C00) is 65504 | Inf with midpoint 65520. */
    for (uint32_t h = 0; h < 0x7C00u; ++h) {
        double lo = ref_f16_value((uint16_t)h);
        double hi = h + 1 == 0x7C00u ? 65536.0 : ref_f16_value((uint16_t)(h + 1));
        float mid = (float)((lo + hi) / 2.0);
        assert_true((double)mid == (lo + hi) / 2.0);
        uint16_t even = (h & 1u) ? (uint16_t)(h + 1) : (uint16_t)h;
        assert_int_equal(cvq_f32_to_f16(mid), even);
        assert_int_equal(cvq_f32_to_f16(-mid), even | 0x8000u);
        assert_int_equal(cvq_f32_to_f16(nextafterf(mid, 0.0f)), h);
        assert_int_equal(cvq_f32_to_f16(nextafterf(mid, INFINITY)), h + 1);
    }
    /* A stride through every fp32 bit pattern against the reference. */
    for (uint64_t b = 0; b < (UINT64_C(1) << 32); b += 4093) {
        float f = f_from_bits((uint32_t)b);
        uint16_t got = cvq_f32_to_f16(f), ref = ref_f32_to_f16(f);
        if (isnan(f)) {
            assert_true((got & 0x7C00u) == 0x7C00u && (got & 0x3FFu) != 0);
        } else if (got != ref) {
            fail_msg("f32 %.9g (0x%08x) -> 0x%04x, expected 0x%04x", (double)f,
                     (unsigned)b, (unsigned)got, (unsigned)ref);
        }
    }
    assert_int_equal(cvq_f32_to_f16(INFINITY), 0x7C00u);
    assert_int_equal(cvq_f32_to_f16(-INFINITY), 0xFC00u);
    assert_int_equal(cvq_f32_to_f16(1e10f), 0x7C00u);
    assert_int_equal(cvq_f32_to_f16(FLT_TRUE_MIN), 0u);
    assert_int_equal(cvq_f32_to_f16(-0.0f), 0x8000u);
    assert_int_equal(cvq_f32_to_f16(0x1p-24f), 1u);    /* smallest subnormal */
    assert_int_equal(cvq_f32_to_f16(0x1p-25f), 0u);    /* tie to even: 0 */
    assert_int_equal(cvq_f32_to_f16(0x1.000002p-25f), 1u);
    assert_int_equal(cvq_f32_to_f16(0x1p-14f), 0x0400u); /* smallest normal */
}

static void test_to_f32_and_nonfinite(void **state) {
    (void)state;
    const uint16_t h[5] = {0x3C00u, 0xC000u, 0x0001u, 0x7BFFu, 0x8000u};
    const uint16_t bf[5] = {0x3F80u, 0xC000u, 0x0001u, 0x7F7Fu, 0x8000u};
    const float f[5] = {1.0f, -2.0f, 0x1p-140f, 3.0e38f, -0.0f};
    float out[5];
    cvq__to_f32(h, CVQ_F16, 5, out);
    for (int i = 0; i < 5; ++i) {
        assert_true((double)out[i] == ref_f16_value(h[i]));
    }
    assert_true(out[2] == 0x1p-24f);
    cvq__to_f32(bf, CVQ_BF16, 5, out);
    assert_true(out[0] == 1.0f && out[1] == -2.0f && out[2] == 0x1p-133f);
    assert_true(bits_of(out[4]) == 0x80000000u);
    cvq__to_f32(f, CVQ_F32, 5, out);
    assert_memory_equal(out, f, sizeof f);
    assert_true(cvq__find_nonfinite(f, 5) == (size_t)-1);
    assert_true(cvq__find_nonfinite(f, 0) == (size_t)-1);
    float g[6] = {1.0f, FLT_MAX, 0x1p-149f, -0.0f, NAN, INFINITY};
    assert_true(cvq__find_nonfinite(g, 6) == 4);
    g[4] = 0.0f;
    assert_true(cvq__find_nonfinite(g, 6) == 5);
    g[5] = -INFINITY;
    assert_true(cvq__find_nonfinite(g, 6) == 5);
    g[5] = 1.0f;
    assert_true(cvq__find_nonfinite(g, 6) == (size_t)-1);
}

/* ------------------------------------------------------------------------ */
/* Frequency tables                                                          */
/* ------------------------------------------------------------------------ */

static void test_freqs_default_linear(void **state) {
    (void)state;
    double th[128], lin[128];
    assert_int_equal(cvq_rope_freqs_default(128, 10000.0, th), CVQ_OK);
    assert_int_equal(cvq_rope_freqs_linear(128, 10000.0, 4.0, lin), CVQ_OK);
    for (int p = 0; p < 64; ++p) {
        double ref = pow(10000.0, -(double)p / 64.0);
        assert_true(fabs(th[p] - ref) <= 1e-15 * ref);
        assert_true(fabs(lin[p] - ref / 4.0) <= 1e-15 * ref);
    }
    assert_true(th[0] == 1.0);
    /* d = 80: theta_39 = base^(-78/80). */
    assert_int_equal(cvq_rope_freqs_default(80, 500000.0, th), CVQ_OK);
    assert_true(fabs(th[39] - pow(500000.0, -78.0 / 80.0)) <= 1e-15);
}

static void test_freqs_llama3(void **state) {
    (void)state;
    /* LLaMA-3.1: base 500000, factor 8, low 1, high 4, original 8192. */
    double th[64];
    assert_int_equal(cvq_rope_freqs_llama3(128, 500000.0, 8.0, 1.0, 4.0, 8192.0, th),
                     CVQ_OK);
    int n_kept = 0, n_scaled = 0, n_blend = 0;
    for (int p = 0; p < 64; ++p) {
        double f = 1.0 / pow(500000.0, (double)(2 * p) / 128.0);
        /* Re-derived in turns over the original context: rot = number of
         * turns the pair makes in 8192 positions = 8192 * f / (2*pi).
         * Fewer than 1 turn: scaled by 1/8; more than 4: kept; between:
         * f * (1/8 + (1 - 1/8) * (rot - 1) / 3). */
        double rot = 8192.0 * f / (2.0 * PI_D);
        double ref;
        if (rot < 1.0) {
            ref = f / 8.0;
            ++n_scaled;
        } else if (rot > 4.0) {
            ref = f;
            ++n_kept;
        } else {
            ref = f * (0.125 + 0.875 * (rot - 1.0) / 3.0);
            ++n_blend;
        }
        if (fabs(th[p] - ref) > 1e-14 * ref) {
            fail_msg("llama3 theta[%d] = %.17g, expected %.17g", p, th[p], ref);
        }
        if (p > 0) {
            assert_true(th[p] < th[p - 1]);
        }
    }
    /* The known split of LLaMA-3.1 8B: the high band keeps its
     * frequencies, the low band is divided by 8. */
    printf("# llama3 (LLaMA-3.1): kept %d, blended %d, scaled %d pairs\n", n_kept,
           n_blend, n_scaled);
    assert_true(n_kept > 0 && n_blend > 0 && n_scaled > 0);
    assert_true(th[0] == 1.0);
    assert_true(th[63] == 1.0 / pow(500000.0, 126.0 / 128.0) / 8.0);
}

static void test_freqs_yarn(void **state) {
    (void)state;
    double th[64], base_t[64], ms = 0.0;
    const double factor = 4.0, orig = 32768.0, base = 1000000.0;
    assert_int_equal(cvq_rope_freqs_default(128, base, base_t), CVQ_OK);
    assert_int_equal(cvq_rope_freqs_yarn(128, base, factor, orig, 32.0, 1.0, th, &ms),
                     CVQ_OK);
    assert_true(fabs(ms - (0.1 * log(4.0) + 1.0)) <= 1e-15);
    /* Re-derived: pair p turns R_p = orig * theta_p / (2*pi) times over the
     * original context. The ramp runs over pair indices between where R_p
     * = 32 (floor) and R_p = 1 (ceil); theta_p = base^(-2p/d) gives
     * p(R) = (d/2) * ln(orig / (2*pi*R)) / ln(base). */
    double lo = floor(64.0 * log(orig / (2.0 * PI_D * 32.0)) / log(base));
    double hi = ceil(64.0 * log(orig / (2.0 * PI_D * 1.0)) / log(base));
    lo = lo < 0.0 ? 0.0 : lo;
    hi = hi > 127.0 ? 127.0 : hi;
    for (int p = 0; p < 64; ++p) {
        double ramp = fmin(1.0, fmax(0.0, ((double)p - lo) / (hi - lo)));
        /* ramp 0: keep (extrapolate); ramp 1: divide by factor. */
        double ref = base_t[p] * (1.0 - ramp) + (base_t[p] / factor) * ramp;
        assert_true(fabs(th[p] - ref) <= 1e-14 * ref);
        assert_true(th[p] <= base_t[p] * (1.0 + 1e-15));
        assert_true(th[p] >= base_t[p] / factor * (1.0 - 1e-15));
        if (p > 0) {
            assert_true(th[p] < th[p - 1]);
        }
    }
    assert_true(th[0] == 1.0);                        /* fast pairs kept */
    assert_true(fabs(th[63] - base_t[63] / factor) <= 1e-15 * th[63]);
    /* factor 1: the default table, mscale 1. */
    assert_int_equal(cvq_rope_freqs_yarn(128, base, 1.0, orig, 32.0, 1.0, th, &ms),
                     CVQ_OK);
    assert_true(ms == 1.0);
    for (int p = 0; p < 64; ++p) {
        assert_true(fabs(th[p] - base_t[p]) <= 1e-15 * base_t[p]);
    }
    assert_int_equal(cvq_rope_freqs_yarn(64, 10000.0, 8.0, 4096.0, 32.0, 1.0, th, NULL),
                     CVQ_OK);
}

static void test_freqs_invalid(void **state) {
    (void)state;
    double th[64];
    assert_int_equal(cvq_rope_freqs_default(0, 10000.0, th), CVQ_ERR_INVALID_ARGUMENT);
    assert_true(cvq_last_error()[0] != '\0');
    assert_int_equal(cvq_rope_freqs_default(127, 10000.0, th), CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_rope_freqs_default(128, 1.0, th), CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_rope_freqs_default(128, NAN, th), CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_rope_freqs_default(128, INFINITY, th), CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_rope_freqs_default(128, 10000.0, NULL), CVQ_ERR_NULL_POINTER);
    assert_int_equal(cvq_rope_freqs_linear(128, 10000.0, 0.5, th), CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_rope_freqs_linear(128, 10000.0, NAN, th), CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_rope_freqs_llama3(128, 500000.0, 8.0, 4.0, 1.0, 8192.0, th),
                     CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_rope_freqs_llama3(128, 500000.0, 8.0, 0.0, 4.0, 8192.0, th),
                     CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_rope_freqs_llama3(128, 500000.0, 8.0, 1.0, 4.0, 0.0, th),
                     CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_rope_freqs_llama3(128, 500000.0, 0.9, 1.0, 4.0, 8192.0, th),
                     CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_rope_freqs_yarn(128, 10000.0, 4.0, 4096.0, 1.0, 32.0, th, NULL),
                     CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_rope_freqs_yarn(128, 10000.0, 4.0, -1.0, 32.0, 1.0, th, NULL),
                     CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_rope_freqs_yarn(128, 10000.0, 4.0, 4096.0, 32.0, 0.0, th, NULL),
                     CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_rope_freqs_yarn(3, 10000.0, 4.0, 4096.0, 32.0, 1.0, th, NULL),
                     CVQ_ERR_INVALID_ARGUMENT);
}

/* ------------------------------------------------------------------------ */
/* Subnormals                                                                */
/* ------------------------------------------------------------------------ */

static void test_fpu_subnormals(void **state) {
    (void)state;
    assert_int_equal(cvq_fpu_flushes_subnormals(), 0);
#ifdef TEST_HAVE_MXCSR
    /* The check must see FTZ (bit 15) and DAZ (bit 6). */
    unsigned int saved = _mm_getcsr();
    _mm_setcsr(saved | 0x8000u);
    int ftz = cvq_fpu_flushes_subnormals();
    _mm_setcsr(saved | 0x0040u);
    int daz = cvq_fpu_flushes_subnormals();
    _mm_setcsr(saved);
    assert_int_not_equal(ftz, 0);
    assert_int_not_equal(daz, 0);
    assert_int_equal(cvq_fpu_flushes_subnormals(), 0);
#endif
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_erf_special_values),
        cmocka_unit_test(test_erf_matches_document),
        cmocka_unit_test(test_erf_dense_sweep),
        cmocka_unit_test(test_gelu),
        cmocka_unit_test(test_sincos_turn_exact_points),
        cmocka_unit_test(test_sincos_matches_document),
        cmocka_unit_test(test_sincos_turn_sweep),
        cmocka_unit_test(test_phase_step_known_answers),
        cmocka_unit_test(test_phase_step_vs_long_double),
        cmocka_unit_test(test_rope_phase_long_positions),
        cmocka_unit_test(test_rope_apply_layouts),
        cmocka_unit_test(test_f16_to_f32_exhaustive),
        cmocka_unit_test(test_bf16_to_f32_exhaustive),
        cmocka_unit_test(test_f32_to_f16),
        cmocka_unit_test(test_to_f32_and_nonfinite),
        cmocka_unit_test(test_freqs_default_linear),
        cmocka_unit_test(test_freqs_llama3),
        cmocka_unit_test(test_freqs_yarn),
        cmocka_unit_test(test_freqs_invalid),
        cmocka_unit_test(test_fpu_subnormals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
