/*
 * include/commvq_cuda.h: the CUDA backend on caller-owned device memory and
 * a caller-chosen stream. Host-side checks here (context, codebook, layer,
 * NULL and non-device pointers, sizes); the data itself is checked by the
 * kernels (status word, collected by cvq_cuda_status). Nothing here waits
 * for the device except where commvq_cuda.h says so.
 */
#include "commvq_cuda.h"

#include "cuda_internal.h"

#include <string.h>

static cvq_status cuda_of(cvq_context *ctx, cvq_cuda **out) {
    *out = NULL;
    if (!ctx) return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "context is NULL");
    if (ctx->kind != CVQ_BACKEND_CUDA || !ctx->be_state)
        return CVQ_FAIL(ctx, CVQ_ERR_INVALID_ARGUMENT, "the context's backend is %s, not cuda",
                        cvq_backend_name(ctx->kind));
    *out = ctx->be_state;
    return cvq_cu_enter(*out);
}

/* p must be device (or managed) memory of this context's device. */
static cvq_status device_ptr(cvq_cuda *cu, const void *p, const char *what) {
    if (!p) return CVQ_FAIL(cu->ctx, CVQ_ERR_NULL_POINTER, "%s is NULL", what);
    struct cudaPointerAttributes at;
    memset(&at, 0, sizeof at);
    const cudaError_t e = cudaPointerGetAttributes(&at, p);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return CVQ_FAIL(cu->ctx, CVQ_ERR_INVALID_ARGUMENT, "%s (%p) is not CUDA memory (%s)", what, p,
                        cudaGetErrorName(e));
    }
    if (at.type != cudaMemoryTypeDevice && at.type != cudaMemoryTypeManaged)
        return CVQ_FAIL(cu->ctx, CVQ_ERR_INVALID_ARGUMENT, "%s (%p) is not device memory", what, p);
    if (at.type == cudaMemoryTypeDevice && at.device != cu->device)
        return CVQ_FAIL(cu->ctx, CVQ_ERR_MISMATCH, "%s is memory of CUDA device %d, the context uses device %d",
                        what, at.device, cu->device);
    return CVQ_OK;
}

cvq_status cvq_cuda_set_stream(cvq_context *ctx, cvq_cuda_stream stream) {
    cvq_cuda *cu;
    cvq_status st = cuda_of(ctx, &cu);
    if (st) return st;
    cudaStream_t next = stream ? (cudaStream_t)stream : cu->own_stream;
    if (next == cu->stream) return CVQ_OK;
    CVQ_CU_TRY(ctx, cudaStreamSynchronize(cu->stream));
    cu->stream = next;
    return CVQ_OK;
}

cvq_status cvq_cuda_get_stream(const cvq_context *ctx, cvq_cuda_stream *out) {
    if (!ctx || !out) return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "ctx and out are required");
    if (ctx->kind != CVQ_BACKEND_CUDA || !ctx->be_state)
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT, "the context's backend is %s, not cuda",
                        cvq_backend_name(ctx->kind));
    *out = (cvq_cuda_stream)((const cvq_cuda *)ctx->be_state)->stream;
    return CVQ_OK;
}

cvq_status cvq_cuda_prepare(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer) {
    cvq_cuda *cu;
    cvq_status st = cuda_of(ctx, &cu);
    if (st) return st;
    cvq_layer_view lv;
    if ((st = cvq__check_layer(ctx, cb, layer, &lv))) return st;
    const cvq_cu_tables *t;
    return cvq_cu_tables_get(cu, cb, &lv, &t);
}

/* n tokens of `per` elements of `elem` bytes: false on overflow. */
static bool bytes_of(size_t n, size_t per, size_t elem, size_t *out) {
    size_t c;
    return cvq__mul_size(n, per, &c) && cvq__mul_size(c, elem, out);
}

cvq_status cvq_cuda_encode_keys(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer, const float *keys_dev,
                                size_t n, uint16_t *codes_dev, float *scales_dev) {
    cvq_cuda *cu;
    cvq_status st = cuda_of(ctx, &cu);
    if (st) return st;
    cvq_layer_view lv;
    if ((st = cvq__check_layer(ctx, cb, layer, &lv))) return st;
    if (n == 0) return CVQ_OK;
    size_t b;
    if (!bytes_of(n, cvq__kv_dims(lv.g), 4, &b) || !bytes_of(n, (size_t)lv.g->n_kv_heads * lv.g->key_stages, 2, &b))
        return CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "%zu tokens overflow size_t", n);
    if ((st = device_ptr(cu, keys_dev, "keys_dev")) || (st = device_ptr(cu, codes_dev, "codes_dev")) ||
        (st = device_ptr(cu, scales_dev, "scales_dev")))
        return st;
    return cvq_cu_enqueue_keys(cu, cb, &lv, keys_dev, n, codes_dev, scales_dev);
}

cvq_status cvq_cuda_encode_values(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer,
                                  const float *values_dev, size_t n, uint8_t *bits_dev, float *sigma_dev) {
    cvq_cuda *cu;
    cvq_status st = cuda_of(ctx, &cu);
    if (st) return st;
    cvq_layer_view lv;
    if ((st = cvq__check_layer(ctx, cb, layer, &lv))) return st;
    if (n == 0) return CVQ_OK;
    size_t b;
    if (!bytes_of(n, cvq__kv_dims(lv.g), 4, &b))
        return CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "%zu tokens overflow size_t", n);
    if ((st = device_ptr(cu, values_dev, "values_dev")) || (st = device_ptr(cu, bits_dev, "bits_dev")) ||
        (st = device_ptr(cu, sigma_dev, "sigma_dev")))
        return st;
    return cvq_cu_enqueue_values(cu, cb, &lv, values_dev, n, bits_dev, sigma_dev);
}

cvq_status cvq_cuda_attend(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer, const cvq_cuda_kv *kv,
                           const float *q_dev, const int32_t *q_pos_dev, size_t n_q, uint32_t flags,
                           float *out_dev) {
    cvq_cuda *cu;
    cvq_status st = cuda_of(ctx, &cu);
    if (st) return st;
    cvq_layer_view lv;
    if ((st = cvq__check_layer(ctx, cb, layer, &lv))) return st;
    if (!kv) return CVQ_FAIL(ctx, CVQ_ERR_NULL_POINTER, "kv is NULL");
    if (flags & ~CVQ_ATTEND_QUERIES_ROTATED)
        return CVQ_FAIL(ctx, CVQ_ERR_INVALID_ARGUMENT, "unknown flags 0x%x", (unsigned)(flags & ~CVQ_ATTEND_QUERIES_ROTATED));
    size_t n_tok;
    if (!cvq__add_size(kv->n_sink, kv->n_comp, &n_tok) || !cvq__add_size(n_tok, kv->n_win, &n_tok) ||
        n_tok > 0x7FFFFFFFu)
        return CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "too many cached tokens (%zu + %zu + %zu)", kv->n_sink,
                        kv->n_comp, kv->n_win);
    if (n_q == 0) return CVQ_OK;
    size_t b;
    if (!bytes_of(n_q, (size_t)lv.g->n_q_heads * lv.g->head_dim, 4, &b))
        return CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "%zu queries overflow size_t", n_q);
    if ((st = device_ptr(cu, q_dev, "q_dev")) || (st = device_ptr(cu, q_pos_dev, "q_pos_dev")) ||
        (st = device_ptr(cu, out_dev, "out_dev")))
        return st;
    if (kv->n_sink && ((st = device_ptr(cu, kv->sink_k, "kv->sink_k")) || (st = device_ptr(cu, kv->sink_v, "kv->sink_v")) ||
                       (st = device_ptr(cu, kv->sink_pos, "kv->sink_pos"))))
        return st;
    if (kv->n_comp && ((st = device_ptr(cu, kv->codes, "kv->codes")) ||
                       (st = device_ptr(cu, kv->key_scales, "kv->key_scales")) ||
                       (st = device_ptr(cu, kv->value_bits, "kv->value_bits")) ||
                       (st = device_ptr(cu, kv->value_sigma, "kv->value_sigma")) ||
                       (st = device_ptr(cu, kv->comp_pos, "kv->comp_pos"))))
        return st;
    if (kv->n_win && ((st = device_ptr(cu, kv->win_k, "kv->win_k")) || (st = device_ptr(cu, kv->win_v, "kv->win_v")) ||
                      (st = device_ptr(cu, kv->win_pos, "kv->win_pos"))))
        return st;
    cvq_cu_attend a;
    memset(&a, 0, sizeof a);
    a.n_q = n_q;
    a.q = q_dev;
    a.q_pos = q_pos_dev;
    a.q_rotated = (flags & CVQ_ATTEND_QUERIES_ROTATED) ? 1 : 0;
    a.out = out_dev;
    a.n_sink = kv->n_sink;
    a.n_comp = kv->n_comp;
    a.n_win = kv->n_win;
    a.sink_k = kv->sink_k;
    a.sink_v = kv->sink_v;
    a.sink_pos = kv->sink_pos;
    a.comp_codes = kv->codes;
    a.comp_kscale = kv->key_scales;
    a.comp_vbits = kv->value_bits;
    a.comp_vsigma = kv->value_sigma;
    a.comp_pos = kv->comp_pos;
    a.win_k = kv->win_k;
    a.win_v = kv->win_v;
    a.win_pos = kv->win_pos;
    return cvq_cu_enqueue_attend(cu, cb, &lv, &a);
}

cvq_status cvq_cuda_status(cvq_context *ctx) {
    cvq_cuda *cu;
    cvq_status st = cuda_of(ctx, &cu);
    if (st) return st;
    /* an asynchronous error of an earlier kernel surfaces here */
    const cudaError_t e = cudaStreamQuery(cu->stream);
    if (e != cudaSuccess && e != cudaErrorNotReady) return cvq_cu_fail(ctx, (int)e, "an earlier CUDA call on the stream", __FILE__, __LINE__);
    return cvq_cu_collect(cu, "interop call");
}

cvq_status cvq_cuda_synchronize(cvq_context *ctx) {
    cvq_cuda *cu;
    cvq_status st = cuda_of(ctx, &cu);
    if (st) return st;
    CVQ_CU_TRY(ctx, cudaStreamSynchronize(cu->stream));
    return cvq_cu_collect(cu, "interop call");
}
