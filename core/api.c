/*
 * Stateless public entry points: encode and decode keys and values of one
 * layer. Encoding dispatches to the context's backend; decoding is a host
 * utility (the reference decoder) on every backend, since its result is
 * what attention over the codes must equal.
 */
#include "backend.h"
#include "reference.h"

#include <math.h>
#include <string.h>

cvq_status cvq_encode_keys(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer,
                           const void *keys, cvq_dtype dtype, size_t n, uint16_t *codes,
                           float *scales) {
    cvq_layer_view lv;
    cvq_status st = cvq__check_layer(ctx, cb, layer, &lv);
    if (st) return st;
    st = cvq__check_dtype(ctx, dtype);
    if (st) return st;
    if (n == 0) return CVQ_OK; /* arrays may be NULL (commvq.h, "counts of zero") */
    CVQ__NONNULL(ctx, "cvq_encode_keys", codes, "codes");
    CVQ__NONNULL(ctx, "cvq_encode_keys", scales, "scales");
    const cvq_geometry *g = lv.g;
    size_t n_codes, code_bytes, n_scales, scale_bytes;
    if (!cvq__mul_size(n, (size_t)g->n_kv_heads * g->key_stages, &n_codes) ||
        !cvq__mul_size(n_codes, sizeof(uint16_t), &code_bytes) ||
        !cvq__mul_size(n, cvq__key_scale_count(g), &n_scales) ||
        !cvq__mul_size(n_scales, sizeof(float), &scale_bytes))
        return CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "%zu tokens overflow size_t", n);
    st = cvq__supports(ctx, CVQ_OP_ENCODE_KEYS, g, n, 0);
    if (st) return st;
    float *kf = NULL;
    st = cvq__load_keys(ctx, &lv, keys, dtype, n, &kf);
    if (st) return st;

    st = cvq__run_encode(ctx, CVQ_OP_ENCODE_KEYS, &lv, cb, n, kf, n * cvq__kv_dims(g) * sizeof(float),
                         codes, code_bytes, scales, scale_bytes);
    cvq__free(&ctx->alloc, kf);
    return st;
}

cvq_status cvq_encode_values(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer,
                             const void *values, cvq_dtype dtype, size_t n, uint8_t *bits,
                             float *sigma) {
    cvq_layer_view lv;
    cvq_status st = cvq__check_layer(ctx, cb, layer, &lv);
    if (st) return st;
    st = cvq__check_dtype(ctx, dtype);
    if (st) return st;
    if (n == 0) return CVQ_OK; /* arrays may be NULL (commvq.h, "counts of zero") */
    CVQ__NONNULL(ctx, "cvq_encode_values", bits, "bits");
    CVQ__NONNULL(ctx, "cvq_encode_values", sigma, "sigma");
    const cvq_geometry *g = lv.g;
    size_t bit_bytes, n_sig, sig_bytes;
    if (!cvq__mul_size(n, (size_t)lv.n_groups * (g->value_bits / 8), &bit_bytes) ||
        !cvq__mul_size(n, lv.n_groups, &n_sig) ||
        !cvq__mul_size(n_sig, sizeof(float), &sig_bytes))
        return CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "%zu tokens overflow size_t", n);
    st = cvq__supports(ctx, CVQ_OP_ENCODE_VALUES, g, n, 0);
    if (st) return st;
    float *vf = NULL;
    st = cvq__load_values(ctx, &lv, values, dtype, n, &vf);
    if (st) return st;

    st = cvq__run_encode(ctx, CVQ_OP_ENCODE_VALUES, &lv, cb, n, vf, n * cvq__kv_dims(g) * sizeof(float),
                         bits, bit_bytes, sigma, sig_bytes);
    cvq__free(&ctx->alloc, vf);
    return st;
}

cvq_status cvq_decode_keys(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer,
                           const uint16_t *codes, const float *scales, size_t n, float *keys) {
    cvq_layer_view lv;
    cvq_status st = cvq__check_layer(ctx, cb, layer, &lv);
    if (st) return st;
    if (n == 0) return CVQ_OK; /* arrays may be NULL (commvq.h, "counts of zero") */
    CVQ__NONNULL(ctx, "cvq_decode_keys", codes, "codes");
    CVQ__NONNULL(ctx, "cvq_decode_keys", scales, "scales");
    CVQ__NONNULL(ctx, "cvq_decode_keys", keys, "keys");
    const size_t per = (size_t)lv.g->n_kv_heads * lv.g->key_stages;
    const size_t ns = cvq__key_scale_count(lv.g), kvd = cvq__kv_dims(lv.g);
    size_t total;
    if (!cvq__mul_size(n, per, &total) || !cvq__mul_size(n, kvd * sizeof(float), &(size_t){0}))
        return CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "%zu tokens overflow size_t", n);
    for (size_t i = 0; i < total; i++)
        if (codes[i] >= CVQ_CODES)
            return CVQ_FAIL(ctx, CVQ_ERR_INVALID_ARGUMENT, "key code %u at index %zu is >= 4096",
                            (unsigned)codes[i], i);
    for (size_t i = 0; i < n * ns; i++)
        if (!isfinite(scales[i]) || scales[i] < 0.0f)
            return CVQ_FAIL(ctx, CVQ_ERR_NONFINITE_INPUT, "key scale %zu is negative, NaN or Inf", i);
    for (size_t t = 0; t < n; t++)
        cvq_ref_decode_key_token(&lv, codes + t * per, scales + t * ns, keys + t * kvd);
    return CVQ_OK;
}

cvq_status cvq_decode_values(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer,
                             const uint8_t *bits, const float *sigma, size_t n, float *values) {
    cvq_layer_view lv;
    cvq_status st = cvq__check_layer(ctx, cb, layer, &lv);
    if (st) return st;
    if (n == 0) return CVQ_OK; /* arrays may be NULL (commvq.h, "counts of zero") */
    CVQ__NONNULL(ctx, "cvq_decode_values", bits, "bits");
    CVQ__NONNULL(ctx, "cvq_decode_values", sigma, "sigma");
    CVQ__NONNULL(ctx, "cvq_decode_values", values, "values");
    const size_t bytes = (size_t)lv.n_groups * (lv.g->value_bits / 8);
    const size_t kvd = cvq__kv_dims(lv.g);
    if (!cvq__mul_size(n, bytes, &(size_t){0}) || !cvq__mul_size(n, kvd * sizeof(float), &(size_t){0}))
        return CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "%zu tokens overflow size_t", n);
    for (size_t i = 0; i < n * lv.n_groups; i++)
        if (!isfinite(sigma[i]))
            return CVQ_FAIL(ctx, CVQ_ERR_NONFINITE_INPUT, "value scale %zu is NaN or Inf", i);
    float *scratch = cvq__alloc(&ctx->alloc, (size_t)lv.g->value_group_width * sizeof(float));
    if (!scratch) return CVQ_FAIL(ctx, CVQ_ERR_OUT_OF_MEMORY, "decode scratch");
    for (size_t t = 0; t < n; t++)
        cvq_ref_decode_value_token(&lv, bits + t * bytes, sigma + t * lv.n_groups, values + t * kvd,
                                   scratch);
    cvq__free(&ctx->alloc, scratch);
    return CVQ_OK;
}
