/*
 * Element conversions (docs/numerics.md section 1): fp16 and bf16 to fp32
 * are exact; fp32 to fp16 rounds to nearest, ties to even. Pure integer bit
 * manipulation, so the result never depends on compiler support for
 * _Float16 or on the FPU's flush-to-zero setting.
 */
#include "cvq_internal.h"

#include <string.h>

static float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

float cvq_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;  /* binary16 biased exponent (bias 15) */
    uint32_t mant = h & 0x3FFu;        /* 10 stored significand bits */
    if (exp == 0x1Fu) {
        /* Inf, or NaN with its payload moved to the top of fp32's field
         * (the quiet bit stays the quiet bit). */
        return f32_from_bits(sign | 0x7F800000u | (mant << 13));
    }
    if (exp == 0) {
        if (mant == 0) {
            return f32_from_bits(sign); /* +-0 */
        }
        /* Subnormal: mant * 2^-24. Normalise: shift until the leading 1
         * reaches bit 10 (the implicit bit), one exponent step per shift.
         * mant * 2^-24 = 1.f * 2^(-14 - shifts). */
        int e = -14;
        while ((mant & 0x400u) == 0) {
            mant <<= 1;
            --e;
        }
        mant &= 0x3FFu;
        return f32_from_bits(sign | ((uint32_t)(e + 127) << 23) | (mant << 13));
    }
    /* Normal: rebias 15 -> 127. */
    return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
}

float cvq_bf16_to_f32(uint16_t b) {
    /* bfloat16 is the top half of binary32. */
    return f32_from_bits((uint32_t)b << 16);
}

uint16_t cvq_f32_to_f16(float f) {
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t exp = (u >> 23) & 0xFFu;  /* binary32 biased exponent */
    uint32_t mant = u & 0x7FFFFFu;     /* 23 stored significand bits */
    if (exp == 0xFFu) {
        if (mant != 0) {
            /* NaN stays NaN: keep the top payload bits, force quiet. */
            return (uint16_t)(sign | 0x7E00u | (mant >> 13));
        }
        return (uint16_t)(sign | 0x7C00u);
    }
    if (exp == 0) {
        /* +-0 and fp32 subnormals (< 2^-126, far below half of fp16's
         * smallest subnormal 2^-24) round to +-0. */
        return sign;
    }
    int e = (int)exp - 127; /* value = 1.mant * 2^e */
    if (e > 15) {
        return (uint16_t)(sign | 0x7C00u); /* >= 2^16: overflow */
    }
    if (e >= -14) {
        /* Normal fp16: keep 10 bits, round the 13 dropped ones to nearest
         * even. A carry out of the significand bumps the exponent, and out
         * of exponent 30 gives 0x7C00 = Inf: both are what RNE wants. */
        uint32_t h = ((uint32_t)(e + 15) << 10) | (mant >> 13);
        uint32_t rest = mant & 0x1FFFu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) {
            ++h;
        }
        return (uint16_t)(sign | h);
    }
    /* fp16 subnormal or zero: value = sig * 2^(e-23) with the implicit bit,
     * counted in units of 2^-24: sig * 2^(e+1), i.e. shifted right by
     * -(e+1) >= 14 bits. */
    uint32_t sig = mant | 0x800000u;
    int shift = -(e + 1);
    if (shift > 24) {
        return sign; /* below 2^-25: rounds to zero */
    }
    uint32_t h = sig >> shift;
    uint32_t rest = sig & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (h & 1u))) {
        ++h; /* may become 0x400, the smallest normal: correct */
    }
    return (uint16_t)(sign | h);
}

void cvq__to_f32(const void *src, cvq_dtype dtype, size_t count, float *dst) {
    switch (dtype) {
    case CVQ_F16: {
        const uint16_t *s = (const uint16_t *)src;
        for (size_t i = 0; i < count; ++i) {
            dst[i] = cvq_f16_to_f32(s[i]);
        }
        break;
    }
    case CVQ_BF16: {
        const uint16_t *s = (const uint16_t *)src;
        for (size_t i = 0; i < count; ++i) {
            dst[i] = cvq_bf16_to_f32(s[i]);
        }
        break;
    }
    case CVQ_F32:
    default:
        if (count > 0 && (const void *)dst != src) {
            memcpy(dst, src, count * sizeof(float));
        }
        break;
    }
}

size_t cvq__find_nonfinite(const float *x, size_t count) {
    /* On the bits (all exponent bits set), so no compiler flag that assumes
     * finite math can remove the check. */
    for (size_t i = 0; i < count; ++i) {
        if ((f32_bits(x[i]) & 0x7F800000u) == 0x7F800000u) {
            return i;
        }
    }
    return (size_t)-1;
}
