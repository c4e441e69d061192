/*
 * The compiled-in backends (a static table, CPU always first) and the
 * buffer helpers that dispatch to a backend's memory entries or to host
 * memory.
 */
#include "backend.h"

#include <stdlib.h>
#include <string.h>

static const cvq_backend_i *const k_backends[] = {
    &cvq_backend_cpu,
#ifdef COMMVQ_HAVE_CUDA
    &cvq_backend_cuda,
#endif
#ifdef COMMVQ_HAVE_VULKAN
    &cvq_backend_vulkan,
#endif
};

bool cvq__backend_compiled(cvq_backend_kind kind) {
    for (size_t i = 0; i < sizeof k_backends / sizeof k_backends[0]; i++)
        if (k_backends[i]->kind == kind) return true;
    return false;
}

/* COMMVQ_DISABLE_CUDA=1 / COMMVQ_DISABLE_VULKAN=1 hide a compiled-in GPU
 * backend (the CPU backend cannot be disabled: it is the reference). */
bool cvq__backend_disabled(cvq_backend_kind kind) {
    const char *var = NULL;
    if (kind == CVQ_BACKEND_CUDA) var = "COMMVQ_DISABLE_CUDA";
    if (kind == CVQ_BACKEND_VULKAN) var = "COMMVQ_DISABLE_VULKAN";
    if (!var) return false;
    const char *v = getenv(var);
    return v && v[0] && strcmp(v, "0") != 0;
}

const cvq_backend_i *cvq__backend_find(cvq_backend_kind kind) {
    if (cvq__backend_disabled(kind)) return NULL;
    for (size_t i = 0; i < sizeof k_backends / sizeof k_backends[0]; i++)
        if (k_backends[i]->kind == kind) return k_backends[i];
    return NULL;
}

static bool has_buffers(const cvq_backend_i *be) {
    return be->buffer_alloc && be->buffer_free && be->buffer_write && be->buffer_read;
}

cvq_status cvq__buffer_alloc(cvq_context *ctx, size_t size, cvq_buffer *out) {
    memset(out, 0, sizeof *out);
    if (has_buffers(ctx->be)) return ctx->be->buffer_alloc(ctx->be_state, size, out);
    out->host = cvq__alloc(&ctx->alloc, size);
    if (!out->host)
        return CVQ_FAIL(ctx, CVQ_ERR_OUT_OF_MEMORY, "cannot allocate %zu bytes", size);
    out->size = size;
    return CVQ_OK;
}

void cvq__buffer_free(cvq_context *ctx, cvq_buffer *buf) {
    if (!buf || (!buf->host && !buf->handle)) return;
    if (has_buffers(ctx->be))
        ctx->be->buffer_free(ctx->be_state, buf);
    else
        cvq__free(&ctx->alloc, buf->host);
    memset(buf, 0, sizeof *buf);
}

cvq_status cvq__buffer_write(cvq_context *ctx, const cvq_buffer *buf,
                             size_t off, const void *src, size_t n) {
    if (n == 0) return CVQ_OK;
    if (has_buffers(ctx->be)) return ctx->be->buffer_write(ctx->be_state, buf, off, src, n);
    memcpy((char *)buf->host + off, src, n);
    return CVQ_OK;
}

cvq_status cvq__buffer_read(cvq_context *ctx, const cvq_buffer *buf,
                            size_t off, void *dst, size_t n) {
    if (n == 0) return CVQ_OK;
    if (has_buffers(ctx->be)) return ctx->be->buffer_read(ctx->be_state, buf, off, dst, n);
    memcpy(dst, (const char *)buf->host + off, n);
    return CVQ_OK;
}
