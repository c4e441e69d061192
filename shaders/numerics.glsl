/*
 * The numerics contract's primitives for the compute shaders
 * (docs/numerics.md sections 5, 7 and 9): correctly rounded division and
 * square root, erf / GELU, the integer RoPE phase, cos/sin of a phase and the
 * rotation of one pair. Ports of core/numerics.c operation for operation;
 * the CPU functions are the definition, these must give the same bits.
 *
 * Use: right after `#version 450` and
 *     #extension GL_GOOGLE_include_directive : require
 *     #include "numerics.glsl"
 * before any other declaration (the float-controls block below contains an
 * #extension directive, which must precede declarations).
 *
 * Why `precise` everywhere: SPIR-V lets a driver fuse a*b + c into one fma
 * (one rounding instead of two), and GLSL's fma() is a fused operation. The
 * contract counts every product and every sum as its own binary32 rounding,
 * so every float temporary that feeds a code-determining result is declared
 * `precise` (SPIR-V NoContraction on each operation that produces it) and
 * fma() is never used. Intermediate expressions are also kept in `precise`
 * locals before they are passed to a function, so contraction cannot happen
 * across an inlined call either.
 *
 * Why division and square root are done in integers: Vulkan allows OpFDiv
 * 2.5 ulp of error and does not require sqrt to be correctly rounded, and a
 * device without DenormPreserve may flush subnormal operands or results of
 * float operations. cvq_div and cvq_sqrt therefore never use float
 * arithmetic at all: they unpack the bit patterns (floatBitsToUint), compute
 * 24 significant bits plus a guard bit by restoring long division / digit by
 * digit square root on uints, keep the remainder as the sticky bit, and round
 * to nearest even, subnormal results included. The result does not depend on
 * the device's float division, sqrt, rounding or denormal behaviour. Both run
 * a fixed 25-step loop; the encoders call them once or twice per scale span,
 * so their cost is irrelevant next to the dot products. (Those loops have
 * constant trip counts and are unrolled: on lavapipe they use none of the
 * 65535 loop iterations an invocation may run, see encode_keys.comp.)
 *
 * Float controls (CVQ_FLOAT_CONTROLS): when the host compiles the variant with
 * -DCVQ_FLOAT_CONTROLS=1 (for devices that report shaderDenormPreserveFloat32,
 * shaderRoundingModeRTEFloat32 and shaderSignedZeroInfNanPreserveFloat32),
 * every shader that includes this file declares the SPIR-V execution modes
 * DenormPreserve 32, RoundingModeRTE 32 and SignedZeroInfNanPreserve 32
 * (docs/numerics.md section 9.3), so subnormals are kept and + - * round to
 * nearest even by guarantee rather than by the driver's habit. A module that
 * declares a mode the device lacks is invalid, hence the host's choice of
 * variant at run time. SPIR-V 1.4+ (the Vulkan 1.2 target) has float controls
 * in core, so only the capabilities are declared, no OpExtension.
 */
#ifndef CVQ_NUMERICS_GLSL
#define CVQ_NUMERICS_GLSL

#ifdef CVQ_FLOAT_CONTROLS
#extension GL_EXT_spirv_intrinsics : require
/* SPIR-V ids: execution modes DenormPreserve 4459, SignedZeroInfNanPreserve
 * 4461, RoundingModeRTE 4462, each with the capability of the same name
 * (4464, 4466, 4467); the operand 32 is the float width they apply to. */
spirv_execution_mode(capabilities = [4464], 4459, 32);
spirv_execution_mode(capabilities = [4466], 4461, 32);
spirv_execution_mode(capabilities = [4467], 4462, 32);
#endif

/* ------------------------------------------------------------------------ */
/* Correctly rounded division and square root, in integer arithmetic         */
/* ------------------------------------------------------------------------ */

/* Splits a finite nonzero binary32 bit pattern (sign ignored) into a
 * significand m in [2^23, 2^24) and a biased exponent e (may be <= 0 for
 * subnormals) with |value| = m * 2^(e - 150). */
void cvq_num_unpack(uint u, out uint m, out int e) {
    uint be = (u >> 23) & 0xFFu;
    uint f = u & 0x7FFFFFu;
    if (be == 0u) {
        /* subnormal: f * 2^-149; normalise so that bit 23 is set */
        int sh = 23 - findMSB(f);
        m = f << uint(sh);
        e = 1 - sh;
    } else {
        m = f | 0x800000u;
        e = int(be);
    }
}

/* Rounds q * 2^(E - 151) to binary32 (q in [2^24, 2^25): 24 significant
 * bits and a guard bit; sticky: some nonzero value below the guard bit) with
 * round to nearest, ties to even. E is the biased exponent the result has if
 * it is normal; E <= 0 gives a subnormal (or zero) result, E >= 255 (or a
 * rounding carry into 255) gives infinity. */
float cvq_num_round_pack(uint sign, uint q, bool sticky, int E) {
    if (E >= 255) {
        return uintBitsToFloat(sign | 0x7F800000u);
    }
    uint shift, ebase;
    if (E >= 1) {
        shift = 1u;           /* drop the guard bit */
        ebase = uint(E - 1);  /* the significand's leading 1 adds one */
    } else {
        /* subnormal: shift further right; >= 26 leaves less than half an
         * ulp of the smallest subnormal, which rounds to zero */
        shift = uint(min(2 - E, 26));
        ebase = 0u;
    }
    uint m = q >> shift;
    uint rb = (q >> (shift - 1u)) & 1u;                     /* round bit */
    bool st = sticky || (q & ((1u << (shift - 1u)) - 1u)) != 0u;
    if (rb == 1u && (st || (m & 1u) == 1u)) {
        m += 1u; /* a carry into the exponent field is the right result */
    }
    return uintBitsToFloat(sign | ((ebase << 23) + m));
}

/* a / b, correctly rounded (IEEE binary32, round to nearest even), for all
 * finite a and finite nonzero b, subnormal operands and results included.
 * Other inputs follow IEEE 754 as well: x/0 = +-Inf (x != 0), 0/0 = NaN,
 * Inf/Inf = NaN, Inf/x = +-Inf, x/Inf = +-0; a NaN operand gives the
 * canonical quiet NaN 0x7FC00000 (payload not propagated). */
float cvq_div(float a, float b) {
    uint ua = floatBitsToUint(a), ub = floatBitsToUint(b);
    uint sign = (ua ^ ub) & 0x80000000u;
    uint aa = ua & 0x7FFFFFFFu, ab = ub & 0x7FFFFFFFu;
    if (aa > 0x7F800000u || ab > 0x7F800000u) {
        return uintBitsToFloat(0x7FC00000u); /* NaN operand */
    }
    if (aa == 0x7F800000u) {
        return uintBitsToFloat(ab == 0x7F800000u ? 0x7FC00000u : (sign | 0x7F800000u));
    }
    if (ab == 0x7F800000u) {
        return uintBitsToFloat(sign); /* finite / Inf = signed zero */
    }
    if (ab == 0u) {
        return uintBitsToFloat(aa == 0u ? 0x7FC00000u : (sign | 0x7F800000u));
    }
    if (aa == 0u) {
        return uintBitsToFloat(sign);
    }
    uint ma, mb;
    int ea, eb;
    cvq_num_unpack(aa, ma, ea);
    cvq_num_unpack(ab, mb, eb);
    /* |a/b| = (ma/mb) * 2^(ea - eb); make the ratio lie in [1, 2) */
    int e = ea - eb;
    if (ma < mb) {
        ma <<= 1; /* < 2^25 */
        e -= 1;
    }
    /* Restoring long division: q = floor(ma * 2^24 / mb) in [2^24, 2^25),
     * rem = the remainder (< mb < 2^24, so rem << 1 fits easily). */
    uint q = 1u;
    uint rem = ma - mb;
    for (int i = 0; i < 24; ++i) {
        rem <<= 1;
        q <<= 1;
        if (rem >= mb) {
            rem -= mb;
            q |= 1u;
        }
    }
    /* |a/b| = (q + rem/mb) * 2^(e - 24): leading bit of q at 2^e */
    return cvq_num_round_pack(sign, q, rem != 0u, e + 127);
}

/* sqrt(x), correctly rounded, for x >= 0 (subnormal x included; the result
 * of a positive finite x is always normal). sqrt(-0) = -0, sqrt(+Inf) =
 * +Inf; x < 0 or NaN gives the canonical quiet NaN 0x7FC00000. */
float cvq_sqrt(float x) {
    uint ux = floatBitsToUint(x);
    if ((ux & 0x7FFFFFFFu) == 0u) {
        return x; /* +-0 */
    }
    if (ux == 0x7F800000u) {
        return x; /* +Inf */
    }
    if (ux > 0x7F800000u) {
        return uintBitsToFloat(0x7FC00000u); /* negative or NaN */
    }
    uint m;
    int e;
    cvq_num_unpack(ux, m, e);
    /* x = (m / 2^23) * 2^u with u the unbiased exponent; make u even */
    int u = e - 127;
    if ((u & 1) != 0) {
        m <<= 1; /* m in [2^23, 2^25) */
        u -= 1;
    }
    /* sqrt(x) = sqrt(N) * 2^(u/2 - 24) with N = m * 2^25 in [2^48, 2^50):
     * digit-by-digit square root over N's 25 bit pairs (high to low) gives
     * r = floor(sqrt(N)) in [2^24, 2^25) and rem = N - r^2 (<= 2r < 2^26). */
    uint r = 0u, rem = 0u;
    for (int i = 24; i >= 0; --i) {
        int bitpos = 2 * i; /* the pair's low bit in N; N's bit j = m's bit j-25 */
        uint pair = bitpos >= 25 ? (m >> uint(bitpos - 25)) & 3u
                                 : (m << uint(25 - bitpos)) & 3u;
        rem = (rem << 2) | pair;
        uint trial = (r << 2) | 1u;
        if (rem >= trial) {
            rem -= trial;
            r = (r << 1) | 1u;
        } else {
            r <<= 1;
        }
    }
    /* u is even, so u/2 is exact; the leading bit of r stands for 2^(u/2) */
    return cvq_num_round_pack(0u, r, rem != 0u, u / 2 + 127);
}

/* ------------------------------------------------------------------------ */
/* erf and GELU (docs/numerics.md section 7)                                 */
/* ------------------------------------------------------------------------ */

/* The four polynomials of cvq_erf_f32, Horner from the highest coefficient
 * (q = c[n-1]; q = q*u + c[i] for i = n-2 .. 0), each product and each sum
 * rounded on its own. Literals: exactly those of core/numerics.c (shortest
 * round-trip decimals of the binary32 coefficients; bit patterns in
 * docs/numerics.md). */

/* P(t), |x| < 1, t = x*x */
float cvq_num_erf_p(float t) {
    precise float q = 7.875875e-05;
    q = q * t + -8.0168643e-04;
    q = q * t + 5.1890872e-03;
    q = q * t + -2.6854211e-02;
    q = q * t + 1.1283594e-01;
    q = q * t + -3.7612626e-01;
    q = q * t + 1.2837917e-01;
    return q;
}

/* Q1(u), 1 <= |x| < 2, u = |x| - 1.5 */
float cvq_num_erf_q1(float u) {
    precise float q = -1.5553908e-03;
    q = q * u + 2.4021883e-03;
    q = q * u + 4.709594e-03;
    q = q * u + -1.9333558e-02;
    q = q * u + 1.4869261e-02;
    q = q * u + 4.459947e-02;
    q = q * u + -1.387521e-01;
    q = q * u + 1.7839542e-01;
    q = q * u + -1.1893029e-01;
    q = q * u + 3.389485e-02;
    return q;
}

/* Q2(u), 2 <= |x| < 3, u = |x| - 2.5 */
float cvq_num_erf_q2(float u) {
    precise float q = 2.45938e-04;
    q = q * u + -3.0636598e-04;
    q = q * u + -5.413816e-04;
    q = q * u + 2.808239e-03;
    q = q * u + -6.117443e-03;
    q = q * u + 8.621515e-03;
    q = q * u + -8.350086e-03;
    q = q * u + 5.4457374e-03;
    q = q * u + -2.1782843e-03;
    q = q * u + 4.0695188e-04;
    return q;
}

/* Q3(u), 3 <= |x| < 4, u = |x| - 3.5 */
float cvq_num_erf_q3(float u) {
    precise float q = -6.591919e-05;
    q = q * u + 9.564772e-05;
    q = q * u + -8.0906415e-05;
    q = q * u + 6.4883556e-05;
    q = q * u + -4.2356052e-05;
    q = q * u + 1.9040433e-05;
    q = q * u + -5.398954e-06;
    q = q * u + 7.4198454e-07;
    return q;
}

/* cvq_erf_f32 of core/numerics.c. */
float cvq_erf(float x) {
    /* NaN test on the bits: without SignedZeroInfNanPreserve a compiler may
     * assume no NaN and fold x != x to false */
    if ((floatBitsToUint(x) & 0x7FFFFFFFu) > 0x7F800000u) {
        return x;
    }
    precise float a = x < 0.0 ? -x : x; /* exact; -0 stays -0 */
    precise float r;
    if (a < 1.0) {
        precise float t = a * a;
        precise float h = cvq_num_erf_p(t);
        r = a + a * h;
    } else if (a < 2.0) {
        precise float u = a - 1.5;
        precise float h = cvq_num_erf_q1(u);
        r = 1.0 - h;
    } else if (a < 3.0) {
        precise float u = a - 2.5;
        precise float h = cvq_num_erf_q2(u);
        r = 1.0 - h;
    } else if (a < 4.0) {
        precise float u = a - 3.5;
        precise float h = cvq_num_erf_q3(u);
        r = 1.0 - h;
    } else {
        r = 1.0; /* erfc(4) = 1.5e-8: below half an ulp of 1 */
    }
    return x < 0.0 ? -r : r;
}

/* cvq_gelu_f32: (0.5f*x) * (1.0f + erf(x * 0.70710677f)). */
float cvq_gelu(float x) {
    precise float h = 0.5 * x;
    precise float xs = x * 0.70710677; /* fl32(1/sqrt(2)) = 0x3F3504F3 */
    precise float e = cvq_erf(xs);
    precise float r = h * (1.0 + e);
    return r;
}

/* ------------------------------------------------------------------------ */
/* RoPE (docs/numerics.md section 5)                                         */
/* ------------------------------------------------------------------------ */

/* Upper 32 bits of (pos * t) mod 2^64 with t = t_lohi.y * 2^32 + t_lohi.x:
 * pos*t_hi (mod 2^32) plus the high word of pos*t_lo; this is the contract's
 * phase in units of 2^-32 turn (pos >= 0, as the int32 position's bits). */
uint cvq_rope_phase_hi(uvec2 t_lohi, uint pos) {
    uint hi, lo;
    umulExtended(pos, t_lohi.x, hi, lo);
    return pos * t_lohi.y + hi;
}

/* cos and sin of 2*pi*turn/2^32: cvq_sincos_turn of core/numerics.c. */
void cvq_sincos_turn(uint turn, out float c, out float s) {
    uint q = turn >> 30;         /* quadrant */
    uint w = turn & 0x3FFFFFFFu; /* position inside it, 2^-32 turns */
    uint m;
    bool swap;
    /* reduce to [0, pi/4] with the octant's symmetry; m <= 2^24 so that
     * float(m) is exact */
    if (w < 0x20000000u) {
        m = (w + 16u) >> 5;
        swap = false;
    } else {
        m = ((0x40000000u - w) + 16u) >> 5;
        swap = true;
    }
    /* K = fl32(pi) * 2^-26 = 0x1.921fb6p-25 (GLSL has no hex float literal) */
    precise float a = float(m) * uintBitsToFloat(0x33490FDBu);
    precise float a2 = a * a;
    precise float a3 = a * a2;
    /* sin: a^3 .. a^9 coefficients, Horner in a2 */
    precise float hs = 2.7557319e-06;
    hs = hs * a2 + -1.984127e-04;
    hs = hs * a2 + 8.333334e-03;
    hs = hs * a2 + -1.6666667e-01;
    precise float sa = a + a3 * hs;
    /* cos: a^2 .. a^10 coefficients, Horner in a2 */
    precise float hc = -2.755732e-07;
    hc = hc * a2 + 2.4801588e-05;
    hc = hc * a2 + -1.3888889e-03;
    hc = hc * a2 + 4.1666668e-02;
    hc = hc * a2 + -5.0e-01;
    precise float ca = 1.0 + a2 * hc;
    if (swap) {
        precise float tmp = sa;
        sa = ca;
        ca = tmp;
    }
    if (q == 0u) {
        c = ca;
        s = sa;
    } else if (q == 1u) {
        c = -sa;
        s = ca;
    } else if (q == 2u) {
        c = -ca;
        s = -sa;
    } else {
        c = sa;
        s = -ca;
    }
}

/* (re, im) <- (re*c - im*s, re*s + im*c), each product rounded, then the
 * difference / sum (cvq_rope_apply of core/numerics.c, one pair). */
void cvq_rope_rotate(inout float re, inout float im, float c, float s) {
    precise float rc = re * c;
    precise float is_ = im * s;
    precise float rs = re * s;
    precise float ic = im * c;
    precise float nre = rc - is_;
    precise float nim = rs + ic;
    re = nre;
    im = nim;
}

#endif /* CVQ_NUMERICS_GLSL */
