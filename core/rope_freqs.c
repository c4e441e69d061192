/*
 * RoPE frequency tables theta_p (radians per position), p = 0..d/2-1, in
 * double, for the usual scalings. The library only ever uses the table, so
 * an engine with another scaling passes its own. Formulas follow the
 * reference definitions used by HF transformers (modeling_rope_utils:
 * default, linear, llama3, yarn), written here in double precision from
 * the formulas.
 */
#include "cvq_internal.h"

#include <math.h>

/* A finite double (NaN and +-Inf fail every comparison below or this). */
static int finite_d(double v) {
    return v == v && v - v == 0.0;
}

static cvq_status check_common(uint32_t head_dim, double base,
                               const double *theta_out) {
    if (theta_out == NULL) {
        return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "theta_out is NULL");
    }
    if (head_dim == 0 || (head_dim & 1u) != 0) {
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                        "head_dim must be even and > 0 (got %u)",
                        (unsigned)head_dim);
    }
    if (!finite_d(base) || !(base > 1.0)) {
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                        "rope base must be finite and > 1 (got %g)", base);
    }
    return CVQ_OK;
}

static cvq_status check_factor(double factor) {
    if (!finite_d(factor) || !(factor >= 1.0)) {
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                        "rope scaling factor must be finite and >= 1 (got %g)",
                        factor);
    }
    return CVQ_OK;
}

/* inv_freq[p] = 1 / base^(2p/d): HF's expression order. */
static void fill_default(uint32_t head_dim, double base, double *theta) {
    for (uint32_t p = 0; p < head_dim / 2; ++p) {
        theta[p] = 1.0 / pow(base, (double)(2 * p) / (double)head_dim);
    }
}

cvq_status cvq_rope_freqs_default(uint32_t head_dim, double base,
                                  double *theta_out) {
    cvq_status st = check_common(head_dim, base, theta_out);
    if (st != CVQ_OK) {
        return st;
    }
    fill_default(head_dim, base, theta_out);
    return CVQ_OK;
}

cvq_status cvq_rope_freqs_linear(uint32_t head_dim, double base, double factor,
                                 double *theta_out) {
    cvq_status st = check_common(head_dim, base, theta_out);
    if (st == CVQ_OK) {
        st = check_factor(factor);
    }
    if (st != CVQ_OK) {
        return st;
    }
    fill_default(head_dim, base, theta_out);
    for (uint32_t p = 0; p < head_dim / 2; ++p) {
        theta_out[p] /= factor;
    }
    return CVQ_OK;
}

cvq_status cvq_rope_freqs_llama3(uint32_t head_dim, double base, double factor,
                                 double low_freq_factor,
                                 double high_freq_factor,
                                 double original_max_pos, double *theta_out) {
    cvq_status st = check_common(head_dim, base, theta_out);
    if (st == CVQ_OK) {
        st = check_factor(factor);
    }
    if (st != CVQ_OK) {
        return st;
    }
    if (!finite_d(low_freq_factor) || !finite_d(high_freq_factor) ||
        !(low_freq_factor > 0.0) || !(high_freq_factor > low_freq_factor)) {
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                        "llama3 rope needs 0 < low_freq_factor < "
                        "high_freq_factor (got %g, %g)",
                        low_freq_factor, high_freq_factor);
    }
    if (!finite_d(original_max_pos) || !(original_max_pos > 0.0)) {
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                        "llama3 rope needs original_max_pos > 0 (got %g)",
                        original_max_pos);
    }
    const double two_pi = 6.283185307179586476925287;
    /* Wavelengths (positions per turn) bounding the three bands. */
    double low_freq_wavelen = original_max_pos / low_freq_factor;
    double high_freq_wavelen = original_max_pos / high_freq_factor;
    fill_default(head_dim, base, theta_out);
    for (uint32_t p = 0; p < head_dim / 2; ++p) {
        double inv_freq = theta_out[p];
        double wavelen = two_pi / inv_freq;
        if (wavelen < high_freq_wavelen) {
            continue; /* high frequencies: unchanged */
        }
        if (wavelen > low_freq_wavelen) {
            theta_out[p] = inv_freq / factor; /* low: interpolated */
            continue;
        }
        /* In between: blend, smooth = 0 at the low edge, 1 at the high. */
        double smooth = (original_max_pos / wavelen - low_freq_factor) /
                        (high_freq_factor - low_freq_factor);
        theta_out[p] = (1.0 - smooth) * inv_freq / factor + smooth * inv_freq;
    }
    return CVQ_OK;
}

/* Dimension index (in units of head dims, 0..d) at which the frequency
 * makes num_rotations turns over max_pos positions:
 *   d * ln(max_pos / (num_rotations * 2*pi)) / (2 * ln(base)). */
static double yarn_correction_dim(double num_rotations, uint32_t head_dim,
                                  double base, double max_pos) {
    const double two_pi = 6.283185307179586476925287;
    return ((double)head_dim * log(max_pos / (num_rotations * two_pi))) /
           (2.0 * log(base));
}

cvq_status cvq_rope_freqs_yarn(uint32_t head_dim, double base, double factor,
                               double original_max_pos, double beta_fast,
                               double beta_slow, double *theta_out,
                               double *mscale_out) {
    cvq_status st = check_common(head_dim, base, theta_out);
    if (st == CVQ_OK) {
        st = check_factor(factor);
    }
    if (st != CVQ_OK) {
        return st;
    }
    if (!finite_d(original_max_pos) || !(original_max_pos > 0.0)) {
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                        "yarn rope needs original_max_pos > 0 (got %g)",
                        original_max_pos);
    }
    if (!finite_d(beta_fast) || !finite_d(beta_slow) || !(beta_slow > 0.0) ||
        !(beta_fast > beta_slow)) {
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                        "yarn rope needs beta_fast > beta_slow > 0 (got %g, %g)",
                        beta_fast, beta_slow);
    }
    /* Correction range [low, high] in pair indices: below low the pair turns
     * more than beta_fast times over the original context and is kept
     * (extrapolation); above high it turns fewer than beta_slow times and is
     * interpolated (divided by factor); a linear ramp in between. HF's
     * defaults truncate: floor(low), ceil(high), clamped to [0, d-1]. */
    double low = floor(yarn_correction_dim(beta_fast, head_dim, base,
                                           original_max_pos));
    double high = ceil(yarn_correction_dim(beta_slow, head_dim, base,
                                           original_max_pos));
    if (low < 0.0) {
        low = 0.0;
    }
    if (high > (double)(head_dim - 1)) {
        high = (double)(head_dim - 1);
    }
    if (low == high) {
        high += 0.001; /* HF: prevents a zero-width ramp */
    }
    fill_default(head_dim, base, theta_out);
    for (uint32_t p = 0; p < head_dim / 2; ++p) {
        double extrapolation = theta_out[p];
        double interpolation = extrapolation / factor;
        double ramp = ((double)p - low) / (high - low);
        if (ramp < 0.0) {
            ramp = 0.0;
        } else if (ramp > 1.0) {
            ramp = 1.0;
        }
        /* HF: extrapolation_factor = 1 - ramp;
         * inv_freq = interpolation*(1 - ef) + extrapolation*ef. */
        double ef = 1.0 - ramp;
        theta_out[p] = interpolation * (1.0 - ef) + extrapolation * ef;
    }
    if (mscale_out != NULL) {
        *mscale_out = factor <= 1.0 ? 1.0 : 0.1 * log(factor) + 1.0;
    }
    return CVQ_OK;
}
