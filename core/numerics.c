/*
 * The numerics contract's shared primitives (docs/numerics.md sections 5 and 7):
 * erf / GELU from the library's own polynomials, the exact integer RoPE
 * phase, cos/sin of a phase, RoPE applied to a head vector, and the check
 * that the FPU keeps subnormals.
 *
 * Everything here is binary32 +, -, * (each rounded, never fused: the build
 * uses -ffp-contract=off), comparisons and integer operations. No libm.
 * GPU backends port these functions operation for operation; any change
 * here is a change of the contract and of docs/numerics.md.
 */
#include "numerics.h"

#include "cvq_internal.h"

#include <string.h>

#if defined(__SSE__) || defined(_M_X64) || (defined(_M_IX86_FP) && _M_IX86_FP >= 1)
#include <xmmintrin.h>
#define CVQ_HAVE_MXCSR 1
#endif

/* ------------------------------------------------------------------------ */
/* erf                                                                       */
/* ------------------------------------------------------------------------ */

/* Coefficients printed by tools/dev/gen_erf_coeffs.py (near-minimax
 * Chebyshev fits, rounded to binary32). Index i multiplies the i-th power.
 * Measured max abs error of cvq_erf_f32 against double erf over every
 * binary32 in [2^-26, 4.25] (and a sweep outside): 7.97e-8. */

/* Piece 0, |x| < 1, t = x*x: erf(x) = x + x*P(t); P(t) ~ erf(x)/x - 1. */
static const float ERF_P[7] = {
    1.2837917e-01f,  -3.7612626e-01f, 1.1283594e-01f, -2.6854211e-02f,
    5.1890872e-03f,  -8.0168643e-04f, 7.875875e-05f,
};
/* Pieces 1..3: lo <= |x| < lo+1, u = |x| - (lo + 0.5) (exact by Sterbenz's
 * lemma), erf(x) = 1 - Q(u); Q(u) ~ erfc(lo + 0.5 + u). */
static const float ERF_Q1[10] = { /* 1 <= |x| < 2, u = |x| - 1.5 */
    3.389485e-02f,   -1.1893029e-01f, 1.7839542e-01f, -1.387521e-01f,
    4.459947e-02f,   1.4869261e-02f,  -1.9333558e-02f, 4.709594e-03f,
    2.4021883e-03f,  -1.5553908e-03f,
};
static const float ERF_Q2[10] = { /* 2 <= |x| < 3, u = |x| - 2.5 */
    4.0695188e-04f,  -2.1782843e-03f, 5.4457374e-03f, -8.350086e-03f,
    8.621515e-03f,   -6.117443e-03f,  2.808239e-03f,  -5.413816e-04f,
    -3.0636598e-04f, 2.45938e-04f,
};
static const float ERF_Q3[8] = { /* 3 <= |x| < 4, u = |x| - 3.5 */
    7.4198454e-07f,  -5.398954e-06f,  1.9040433e-05f, -4.2356052e-05f,
    6.4883556e-05f,  -8.0906415e-05f, 9.564772e-05f,  -6.591919e-05f,
};

/* Horner from the highest coefficient: q = c[n-1]; q = q*u + c[i] for
 * i = n-2 down to 0. Each product and each sum rounded once. */
static float horner(const float *c, int n, float u) {
    float q = c[n - 1];
    for (int i = n - 2; i >= 0; --i) {
        float p = q * u;
        q = p + c[i];
    }
    return q;
}

float cvq_erf_f32(float x) {
    if (x != x) {
        return x; /* NaN in, NaN out */
    }
    /* a = |x| by negation (exact); -0 stays -0 and gives erf(-0) = -0. */
    float a = x < 0.0f ? -x : x;
    float r;
    if (a < 1.0f) {
        float t = a * a;
        r = a + a * horner(ERF_P, 7, t);
    } else if (a < 2.0f) {
        r = 1.0f - horner(ERF_Q1, 10, a - 1.5f);
    } else if (a < 3.0f) {
        r = 1.0f - horner(ERF_Q2, 10, a - 2.5f);
    } else if (a < 4.0f) {
        r = 1.0f - horner(ERF_Q3, 8, a - 3.5f);
    } else {
        r = 1.0f; /* erfc(4) = 1.5e-8: below half an ulp of 1 */
    }
    return x < 0.0f ? -r : r;
}

float cvq_gelu_f32(float x) {
    float h = 0.5f * x;
    float e = cvq_erf_f32(x * 0.70710677f); /* fl32(1/sqrt(2)) */
    return h * (1.0f + e);
}

/* ------------------------------------------------------------------------ */
/* Integer RoPE phase                                                        */
/* ------------------------------------------------------------------------ */

/* 1/(2*pi) in binary: 1/(2*pi) = sum_j INV_2PI[j] * 2^(-32*(j+1)), 1280
 * bits (tools/dev/gen_erf_coeffs.py prints them), enough for the exact
 * fractional turn of any finite double. */
static const uint32_t INV_2PI[40] = {
    0x28BE60DBU, 0x9391054AU, 0x7F09D5F4U, 0x7D4D3770U, 0x36D8A566U,
    0x4F10E410U, 0x7F9458EAU, 0xF7AEF158U, 0x6DC91B8EU, 0x909374B8U,
    0x01924BBAU, 0x82746487U, 0x3F877AC7U, 0x2C4A69CFU, 0xBA208D7DU,
    0x4BAED121U, 0x3A671C09U, 0xAD17DF90U, 0x4E64758EU, 0x60D4CE7DU,
    0x272117E2U, 0xEF7E4A0EU, 0xC7FE25FFU, 0xF7816603U, 0xFBCBC462U,
    0xD6829B47U, 0xDB4D9FB3U, 0xC9F2C26DU, 0xD3D18FD9U, 0xA797FA8BU,
    0x5D49EEB1U, 0xFAF97C5EU, 0xCF41CE7DU, 0xE294A4BAU, 0x9AFED7ECU,
    0x47E35742U, 0x1580CC11U, 0xBF1EDAEAU, 0xFC33EF08U, 0x26BD0D87U,
};

/* acc is a 128-bit fixed-point number modulo 2^64 turns: acc[1] holds the
 * bits 2^0..2^63, acc[0] the bits 2^-64..2^-1. Adds v * 2^s to it, dropping
 * bits at 2^64 and above (whole multiples of 2^64 vanish modulo 2^64) and
 * bits below 2^-64 (truncated). */
static void fixed_add(uint64_t acc[2], uint64_t v, int s) {
    int sh = s + 64; /* position of v's bit 0 inside the 128-bit number */
    if (v == 0 || sh >= 128 || sh <= -64) {
        return;
    }
    uint64_t lo, hi;
    if (sh >= 64) {
        lo = 0;
        hi = v << (sh - 64);
    } else if (sh > 0) {
        lo = v << sh;
        hi = v >> (64 - sh);
    } else if (sh == 0) {
        lo = v;
        hi = 0;
    } else {
        lo = v >> -sh;
        hi = 0;
    }
    uint64_t old = acc[0];
    acc[0] += lo;
    acc[1] += hi + (acc[0] < old ? 1u : 0u);
}

uint64_t cvq_rope_phase_step(double theta) {
    /* t = round(frac(theta / (2*pi)) * 2^64) mod 2^64, exactly (ties, which
     * an irrational ratio cannot produce, would round up). theta = +-M*2^E
     * with an integer M < 2^53 read from the bits, so the result depends on
     * the double alone, never on the host's long double. */
    uint64_t bits;
    memcpy(&bits, &theta, sizeof bits);
    int neg = (int)(bits >> 63);
    int biased = (int)((bits >> 52) & 0x7FF);
    uint64_t mant = bits & ((UINT64_C(1) << 52) - 1);
    if (biased == 0x7FF) {
        return 0; /* Inf / NaN: no phase (codebooks refuse them anyway) */
    }
    int e;
    if (biased == 0) {
        e = -1074; /* subnormal (or zero): M = mant */
    } else {
        mant |= UINT64_C(1) << 52;
        e = biased - 1075;
    }
    /* theta * 2^64 / (2*pi) = sum_j M * INV_2PI[j] * 2^(e + 32 - 32*j);
     * M = mh*2^32 + ml keeps every partial product within 64 bits. */
    uint64_t mh = mant >> 32, ml = mant & 0xFFFFFFFFu;
    uint64_t acc[2] = {0, 0};
    for (int j = 0; j < 40; ++j) {
        int s = e + 32 - 32 * j;
        fixed_add(acc, mh * INV_2PI[j], s + 32);
        fixed_add(acc, ml * INV_2PI[j], s);
    }
    uint64_t t = acc[1] + (acc[0] >> 63); /* round half up */
    return neg ? (uint64_t)0 - t : t;
}

/* ------------------------------------------------------------------------ */
/* cos / sin of a turn                                                       */
/* ------------------------------------------------------------------------ */

/* Taylor coefficients rounded to binary32 (truncation < 2e-9 on
 * [0, pi/4]): sin: a^3, a^5, a^7, a^9; cos: a^2 .. a^10. */
static const float SIN_C[4] = {
    -1.6666667e-01f, 8.333334e-03f, -1.984127e-04f, 2.7557319e-06f,
};
static const float COS_C[5] = {
    -5.0e-01f, 4.1666668e-02f, -1.3888889e-03f, 2.4801588e-05f, -2.755732e-07f,
};
/* K = fl32(pi) * 2^-26 (exact: a power-of-two scale of fl32(pi)); one unit
 * of m is 32 units of 2^-32 turn, i.e. pi/2^26 rad. */
#define CVQ_TURN_K 0x1.921fb6p-25f

void cvq_sincos_turn(uint32_t turn, float *c, float *s) {
    uint32_t q = turn >> 30;          /* quadrant */
    uint32_t w = turn & 0x3FFFFFFFu;  /* position inside it, 2^-32 turns */
    uint32_t m;
    int swap;
    /* Reduce to [0, pi/4] with the octant's symmetry; m <= 2^24 so that
     * (float)m is exact. */
    if (w < 0x20000000u) {
        m = (w + 16u) >> 5;
        swap = 0;
    } else {
        m = ((0x40000000u - w) + 16u) >> 5;
        swap = 1;
    }
    float a = (float)m * CVQ_TURN_K;
    float a2 = a * a;
    float a3 = a * a2;
    float sa = a + a3 * horner(SIN_C, 4, a2);
    float ca = 1.0f + a2 * horner(COS_C, 5, a2);
    if (swap) {
        float tmp = sa;
        sa = ca;
        ca = tmp;
    }
    switch (q) {
    case 0:
        *c = ca;
        *s = sa;
        break;
    case 1:
        *c = -sa;
        *s = ca;
        break;
    case 2:
        *c = -ca;
        *s = -sa;
        break;
    default:
        *c = sa;
        *s = -ca;
        break;
    }
}

void cvq_rope_apply(float *x, uint32_t d, int layout, const uint64_t *t,
                    int32_t pos) {
    for (uint32_t p = 0; p < d / 2; ++p) {
        uint32_t ire, iim;
        float c, s;
        cvq__pair_index((cvq_pair_layout)layout, d, p, &ire, &iim);
        cvq_rope_cos_sin(t[p], pos, &c, &s);
        float re = x[ire], im = x[iim];
        float rc = re * c, is = im * s, rs = re * s, ic = im * c;
        x[ire] = rc - is;
        x[iim] = rs + ic;
    }
}

/* ------------------------------------------------------------------------ */
/* Subnormals                                                                */
/* ------------------------------------------------------------------------ */

int cvq_fpu_flushes_subnormals(void) {
#ifdef CVQ_HAVE_MXCSR
    /* MXCSR bit 15: flush to zero; bit 6: denormals are zero. */
    if (_mm_getcsr() & 0x8040u) {
        return 1;
    }
#endif
    /* Any FPU: a subnormal must survive a multiply by one (DAZ would read it
     * as 0) and a halving must stay subnormal (FTZ would give 0). volatile
     * keeps the compiler from folding the test away. */
    volatile float tiny = 0x1p-140f;
    volatile float one = 1.0f, half = 0.5f;
    float a = tiny * one;
    float b = tiny * half;
    return (a == 0.0f || b == 0.0f) ? 1 : 0;
}
