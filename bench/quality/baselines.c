/* KIVI-2 and q4_0 round trips for bench/quality (see baselines.h). */
#include "baselines.h"

#include <math.h>

#include "commvq.h" /* cvq_f32_to_f16 / cvq_f16_to_f32: the fp16 the formats store */

static float to_f16(float x) { return cvq_f16_to_f32(cvq_f32_to_f16(x)); }

/* Asymmetric 2-bit round trip of n values x[i*stride]: minimum and step
 * (max-min)/3 stored in fp16, codes from the stored (rounded) parameters. */
static void asym2(float *x, size_t n, size_t stride) {
    float mn = x[0], mx = x[0], lo, step;
    size_t i;
    for (i = 1; i < n; i++) {
        float a = x[i * stride];
        if (a < mn) mn = a;
        if (a > mx) mx = a;
    }
    lo = to_f16(mn);
    step = to_f16((mx - mn) / 3.0f);
    for (i = 0; i < n; i++) {
        float q = 0.0f;
        if (step > 0.0f) {
            q = floorf((x[i * stride] - lo) / step + 0.5f);
            if (q < 0.0f) q = 0.0f;
            if (q > 3.0f) q = 3.0f;
        }
        x[i * stride] = lo + q * step;
    }
}

int kivi2_quantize(float *k, float *v, size_t n, size_t kd, size_t group) {
    size_t t, j;
    if (group == 0 || n % group || kd % group) return -1;
    /* keys: channel j, tokens [t, t+group) of the block */
    for (t = 0; t < n; t += group)
        for (j = 0; j < kd; j++) asym2(k + t * kd + j, group, kd);
    /* values: token t, channels [j, j+group) */
    for (t = 0; t < n; t++)
        for (j = 0; j < kd; j += group) asym2(v + t * kd + j, group, 1);
    return 0;
}

/* q4_0 round trip of one block of 32: d = (the value of largest magnitude)
 * / -8 in fp16, q = clamp(round(x/d) + 8, 0, 15), x' = (q - 8) * d. */
static void q40_block(float *x) {
    float amax = 0.0f, mx = 0.0f, d, id;
    int i;
    for (i = 0; i < 32; i++)
        if (fabsf(x[i]) > amax) {
            amax = fabsf(x[i]);
            mx = x[i];
        }
    d = to_f16(mx / -8.0f);
    id = d != 0.0f ? 1.0f / d : 0.0f;
    for (i = 0; i < 32; i++) {
        float q = floorf(x[i] * id + 8.5f);
        if (q < 0.0f) q = 0.0f;
        if (q > 15.0f) q = 15.0f;
        x[i] = (q - 8.0f) * d;
    }
}

int q4_0_quantize(float *k, float *v, size_t n, size_t kd) {
    size_t t, j;
    if (kd % 32) return -1;
    for (t = 0; t < n; t++)
        for (j = 0; j < kd; j += 32) {
            q40_block(k + t * kd + j);
            q40_block(v + t * kd + j);
        }
    return 0;
}

double kivi2_bits(size_t group) { return 2.0 + 32.0 / (double)group; }
double q4_0_bits(void) { return 4.5; }
