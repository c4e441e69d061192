/*
 * Argument checks shared by the public entry points, staging of caller
 * arrays into backend buffers, and the one place that runs an encode op.
 * The core validates once; backends receive only checked inputs
 * (core/backend.h).
 */
#include "backend.h"
#include "reference.h"

#include <math.h>
#include <string.h>

cvq_status cvq__check_layer(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer,
                            cvq_layer_view *lv) {
    if (!ctx) return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "context is NULL");
    if (!cb) return CVQ_FAIL(ctx, CVQ_ERR_NULL_POINTER, "codebook is NULL");
    if (layer >= cb->geom.n_layers)
        return CVQ_FAIL(ctx, CVQ_ERR_LAYER_RANGE, "layer %u out of range (the codebook has %u layers)",
                        layer, cb->geom.n_layers);
    return cvq__layer_view(ctx, cb, layer, lv);
}

static const char *dtype_name(cvq_dtype t) {
    switch (t) {
    case CVQ_F32: return "f32";
    case CVQ_F16: return "f16";
    case CVQ_BF16: return "bf16";
    }
    return "?";
}

cvq_status cvq__check_dtype(cvq_context *ctx, cvq_dtype dtype) {
    if (dtype != CVQ_F32 && dtype != CVQ_F16 && dtype != CVQ_BF16)
        return CVQ_FAIL(ctx, CVQ_ERR_INVALID_ARGUMENT, "dtype %d is not a cvq_dtype", (int)dtype);
    return CVQ_OK;
}

/* Convert + finite check, shared by keys and values. */
static cvq_status load_f32(cvq_context *ctx, const cvq_layer_view *lv, const void *src,
                           cvq_dtype dtype, size_t n, const char *what, float **out) {
    *out = NULL;
    if (!src) return CVQ_FAIL(ctx, CVQ_ERR_NULL_POINTER, "%s is NULL", what);
    /* dtype: checked by every caller first (cvq__check_dtype), before its
     * zero-count return */
    const size_t kvd = cvq__kv_dims(lv->g);
    size_t count, bytes;
    if (!cvq__mul_size(n, kvd, &count) || !cvq__mul_size(count, sizeof(float), &bytes))
        return CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "%zu tokens of %s overflow size_t", n, what);
    float *f = cvq__alloc(&ctx->alloc, bytes);
    if (!f) return CVQ_FAIL(ctx, CVQ_ERR_OUT_OF_MEMORY, "cannot allocate %zu bytes for %s", bytes, what);
    cvq__to_f32(src, dtype, count, f);
    size_t bad = cvq__find_nonfinite(f, count);
    if (bad != (size_t)-1) {
        cvq__free(&ctx->alloc, f);
        return CVQ_FAIL(ctx, CVQ_ERR_NONFINITE_INPUT,
                        "%s (%s) element %zu (token %zu, head %zu, dim %zu) is NaN or Inf; nothing was written",
                        what, dtype_name(dtype), bad, bad / kvd, (bad % kvd) / lv->g->head_dim,
                        bad % lv->g->head_dim);
    }
    *out = f;
    return CVQ_OK;
}

cvq_status cvq__load_keys(cvq_context *ctx, const cvq_layer_view *lv, const void *src,
                          cvq_dtype dtype, size_t n, float **out) {
    float *f;
    cvq_status st = load_f32(ctx, lv, src, dtype, n, "keys", &f);
    if (st) return st;
    const size_t kvd = cvq__kv_dims(lv->g);
    /* One token's scales at a time (1, or Hkv in head mode). */
    float *scales = cvq__alloc(&ctx->alloc, cvq__key_scale_count(lv->g) * sizeof(float));
    if (!scales) {
        cvq__free(&ctx->alloc, f);
        return CVQ_FAIL(ctx, CVQ_ERR_OUT_OF_MEMORY, "key scale scratch");
    }
    for (size_t t = 0; t < n; t++) {
        if (!cvq_ref_key_scales(lv, f + t * kvd, scales)) {
            cvq__free(&ctx->alloc, scales);
            cvq__free(&ctx->alloc, f);
            return CVQ_FAIL(ctx, CVQ_ERR_INPUT_RANGE,
                            "key of token %zu: its sum of squares overflows binary32; nothing was written", t);
        }
    }
    cvq__free(&ctx->alloc, scales);
    *out = f;
    return CVQ_OK;
}

cvq_status cvq__load_values(cvq_context *ctx, const cvq_layer_view *lv, const void *src,
                            cvq_dtype dtype, size_t n, float **out) {
    float *f;
    cvq_status st = load_f32(ctx, lv, src, dtype, n, "values", &f);
    if (st) return st;
    const size_t kvd = cvq__kv_dims(lv->g);
    for (size_t t = 0; t < n; t++) {
        if (!cvq_ref_value_check(lv, f + t * kvd)) {
            cvq__free(&ctx->alloc, f);
            return CVQ_FAIL(ctx, CVQ_ERR_INPUT_RANGE,
                            "value of token %zu: its scaled sum of squares overflows binary32; nothing was written", t);
        }
    }
    *out = f;
    return CVQ_OK;
}

cvq_status cvq__supports(cvq_context *ctx, cvq_op op, const cvq_geometry *g, size_t n_tokens,
                         size_t n_q) {
    const cvq_backend_i *be = ctx->be;
    bool has = (op == CVQ_OP_ENCODE_KEYS && be->encode_keys) ||
               (op == CVQ_OP_ENCODE_VALUES && be->encode_values) ||
               (op == CVQ_OP_ATTEND && be->attend);
    static const char *const names[] = {"encode_keys", "encode_values", "attend"};
    if (!has)
        return CVQ_FAIL(ctx, CVQ_ERR_UNSUPPORTED, "the %s backend has no %s kernel", be->name,
                        names[op]);
    if (!be->supports) return CVQ_OK;
    cvq_op_desc d = {op, g, n_tokens, n_q};
    return be->supports(ctx, &d);
}

/* ---- staging ---------------------------------------------------------------- */

static bool host_backend(const cvq_context *ctx) { return ctx->be->buffer_alloc == NULL; }

cvq_status cvq__stage_in(cvq_context *ctx, const void *host, size_t bytes, cvq_staged *s) {
    memset(s, 0, sizeof *s);
    if (host_backend(ctx)) {
        s->buf.host = (void *)host; /* read-only use by the kernel */
        s->buf.size = bytes;
        return CVQ_OK;
    }
    cvq_status st = cvq__buffer_alloc(ctx, bytes, &s->buf);
    if (st) return st;
    s->owned = true;
    st = cvq__buffer_write(ctx, &s->buf, 0, host, bytes);
    if (st) cvq__stage_release(ctx, s);
    return st;
}

cvq_status cvq__stage_out(cvq_context *ctx, void *host, size_t bytes, cvq_staged *s) {
    memset(s, 0, sizeof *s);
    if (host_backend(ctx)) {
        s->buf.host = host;
        s->buf.size = bytes;
        return CVQ_OK;
    }
    cvq_status st = cvq__buffer_alloc(ctx, bytes, &s->buf);
    if (st) return st;
    s->owned = true;
    return CVQ_OK;
}

cvq_status cvq__stage_finish(cvq_context *ctx, const cvq_staged *s, void *host, size_t bytes) {
    if (!s->owned) return CVQ_OK;
    return cvq__buffer_read(ctx, &s->buf, 0, host, bytes);
}

void cvq__stage_release(cvq_context *ctx, cvq_staged *s) {
    if (s->owned) cvq__buffer_free(ctx, &s->buf);
    memset(s, 0, sizeof *s);
}

cvq_status cvq__run_encode(cvq_context *ctx, cvq_op op, const cvq_layer_view *lv,
                           const cvq_codebook *cb, size_t n, const float *in, size_t in_bytes,
                           void *out0, size_t bytes0, void *out1, size_t bytes1) {
    cvq_staged si, s0, s1;
    memset(&s0, 0, sizeof s0);
    memset(&s1, 0, sizeof s1);
    cvq_status st = cvq__stage_in(ctx, in, in_bytes, &si);
    if (!st) st = cvq__stage_out(ctx, out0, bytes0, &s0);
    if (!st) st = cvq__stage_out(ctx, out1, bytes1, &s1);
    if (!st) {
        if (op == CVQ_OP_ENCODE_KEYS) {
            cvq_encode_keys_args a = {lv, cb, n, cvq__staged_view(&si), cvq__staged_view(&s0),
                                      cvq__staged_view(&s1)};
            st = ctx->be->encode_keys(ctx, &a);
        } else {
            cvq_encode_values_args a = {lv, cb, n, cvq__staged_view(&si), cvq__staged_view(&s0),
                                        cvq__staged_view(&s1)};
            st = ctx->be->encode_values(ctx, &a);
        }
    }
    if (!st) st = cvq__stage_finish(ctx, &s0, out0, bytes0);
    if (!st) st = cvq__stage_finish(ctx, &s1, out1, bytes1);
    cvq__stage_release(ctx, &s1);
    cvq__stage_release(ctx, &s0);
    cvq__stage_release(ctx, &si);
    return st;
}
