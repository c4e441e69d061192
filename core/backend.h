/*
 * The backend contract. A backend is a static table of function pointers
 * (cvq_backend_i) registered in core/registry.c. The core validates every
 * argument once (shapes, finiteness, overflow, positions) and hands the
 * backend structs of already-checked inputs; a backend never re-checks
 * shapes. This header is the whole contract for a backend author.
 *
 * Entries marked (optional) may be NULL; the comment says what the core
 * does then. api_version only ever grows; the core reads entries added in a
 * later version only from tables that declare that version.
 */
#ifndef CVQ_BACKEND_H
#define CVQ_BACKEND_H

#include "cvq_internal.h"

#define CVQ_BACKEND_API_VERSION 1

/* A block of backend memory. For backends without buffer entries it is
 * host memory from the context's allocator. */
typedef struct cvq_buffer {
    void *host;     /* host-addressable pointer, or NULL (device-only)    */
    void *handle;   /* backend object (VkBuffer, device pointer ...)      */
    size_t size;    /* bytes                                              */
} cvq_buffer;

/* Byte offset into a buffer. */
typedef struct cvq_view {
    const cvq_buffer *buf;
    size_t offset;
} cvq_view;

typedef enum cvq_op {
    CVQ_OP_ENCODE_KEYS = 0,
    CVQ_OP_ENCODE_VALUES = 1,
    CVQ_OP_ATTEND = 2,
    CVQ_OP_COUNT
} cvq_op;

/* One operation instance, for supports(). */
typedef struct cvq_op_desc {
    cvq_op op;
    const cvq_geometry *g;
    size_t n_tokens;   /* tokens encoded, or cached tokens attended over */
    size_t n_q;        /* queries (attend) */
} cvq_op_desc;

/* encode keys: keys fp32 [n][Hkv][d] (finite, sums of squares finite);
 * codes uint16 [n][Hkv][R]; scales fp32 [n][ns]. */
typedef struct cvq_encode_keys_args {
    const cvq_layer_view *lv;
    const cvq_codebook *cb;   /* for device-side table caches (generation) */
    size_t n;
    cvq_view keys, codes, scales;
} cvq_encode_keys_args;

/* encode values: values fp32 [n][Hkv*d]; bits uint8 [n][groups][Nc/8];
 * sigma fp32 [n][groups]. */
typedef struct cvq_encode_values_args {
    const cvq_layer_view *lv;
    const cvq_codebook *cb;
    size_t n;
    cvq_view values, bits, sigma;
} cvq_encode_values_args;

/* attend: the segments of a cache (see cvq_attend_host in reference.h for
 * the meaning of each array) as views, n_* counts, and the output. */
typedef struct cvq_attend_args {
    const cvq_layer_view *lv;
    const cvq_codebook *cb;
    size_t n_q;
    cvq_view q, q_pos, out;
    int q_rotated;
    size_t n_sink, n_comp, n_win;
    cvq_view sink_k, sink_v, sink_pos;
    cvq_view comp_codes, comp_kscale, comp_vbits, comp_vsigma, comp_pos;
    cvq_view win_k, win_v, win_pos;
} cvq_attend_args;

typedef struct cvq_backend_i {
    uint32_t api_version;      /* CVQ_BACKEND_API_VERSION it was built for */
    cvq_backend_kind kind;
    const char *name;          /* "cpu", "cuda", "vulkan" */

    /* Enumerate devices: writes up to cap entries, *count = total.
     * Must not fail when the runtime or driver is missing: then *count = 0
     * and the return is CVQ_ERR_NO_DEVICE with a message saying why. */
    cvq_status (*list_devices)(cvq_device_info *out, size_t cap, size_t *count);

    /* Open device `device` (-1: backend's choice) for ctx. */
    cvq_status (*init)(cvq_context *ctx, int device, void **state);
    void (*shutdown)(void *state);

    /* (optional) NULL: every op the table has an entry for is supported
     * for every valid geometry. Returns CVQ_OK or CVQ_ERR_UNSUPPORTED
     * (with a message through CVQ_FAIL). */
    cvq_status (*supports)(cvq_context *ctx, const cvq_op_desc *desc);

    /* (optional, all four together) device memory. NULL: buffers are host
     * memory from the context allocator and the core reads/writes them
     * with memcpy. */
    cvq_status (*buffer_alloc)(void *state, size_t size, cvq_buffer *out);
    void (*buffer_free)(void *state, cvq_buffer *buf);
    cvq_status (*buffer_write)(void *state, const cvq_buffer *buf, size_t off,
                               const void *src, size_t n);
    cvq_status (*buffer_read)(void *state, const cvq_buffer *buf, size_t off,
                              void *dst, size_t n);

    /* Kernels. (optional) each: NULL means the op is unsupported on this
     * backend and the call fails with CVQ_ERR_UNSUPPORTED (no fallback). */
    cvq_status (*encode_keys)(cvq_context *ctx, const cvq_encode_keys_args *a);
    cvq_status (*encode_values)(cvq_context *ctx, const cvq_encode_values_args *a);
    cvq_status (*attend)(cvq_context *ctx, const cvq_attend_args *a);
} cvq_backend_i;

/* Registry (core/registry.c): the compiled-in backends, CPU first.
 * COMMVQ_DISABLE_CUDA / COMMVQ_DISABLE_VULKAN (any non-empty value other
 * than "0") hide a compiled-in backend at run time. */
const cvq_backend_i *cvq__backend_find(cvq_backend_kind kind);
/* Compiled in (whether or not disabled): for messages. */
bool cvq__backend_compiled(cvq_backend_kind kind);
bool cvq__backend_disabled(cvq_backend_kind kind);

/* Buffer helpers dispatching to the entries above or to host memory. */
cvq_status cvq__buffer_alloc(cvq_context *ctx, size_t size, cvq_buffer *out);
void cvq__buffer_free(cvq_context *ctx, cvq_buffer *buf);
cvq_status cvq__buffer_write(cvq_context *ctx, const cvq_buffer *buf,
                             size_t off, const void *src, size_t n);
cvq_status cvq__buffer_read(cvq_context *ctx, const cvq_buffer *buf,
                            size_t off, void *dst, size_t n);
/* Host pointer of a view (NULL for device-only buffers). */
static inline void *cvq__view_host(cvq_view v) {
    return (v.buf && v.buf->host) ? (char *)v.buf->host + v.offset : NULL;
}


/* Staging of caller arrays for one call: host-memory backends use the
 * caller's pointer directly (owned = false); device backends get a
 * temporary buffer, written (inputs) or read back (outputs). */
typedef struct cvq_staged {
    cvq_buffer buf;
    bool owned;
} cvq_staged;
cvq_status cvq__stage_in(cvq_context *ctx, const void *host, size_t bytes, cvq_staged *s);
cvq_status cvq__stage_out(cvq_context *ctx, void *host, size_t bytes, cvq_staged *s);
/* Copies a staged output back to host (no-op when not owned). */
cvq_status cvq__stage_finish(cvq_context *ctx, const cvq_staged *s, void *host, size_t bytes);
void cvq__stage_release(cvq_context *ctx, cvq_staged *s);
static inline cvq_view cvq__staged_view(const cvq_staged *s) {
    cvq_view v = {&s->buf, 0};
    return v;
}

/* Shared argument checks (core/validate.c). */
/* ctx and cb non-NULL, same geometry rules, layer in range; fills *lv. */
cvq_status cvq__check_layer(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer,
                            cvq_layer_view *lv);
/* CVQ_ERR_INVALID_ARGUMENT unless dtype is one of cvq_dtype's values. */
cvq_status cvq__check_dtype(cvq_context *ctx, cvq_dtype dtype);
/* Converts n tokens of keys / values ([n][Hkv][d] in dtype, which the
 * caller has checked with cvq__check_dtype) to a new fp32 array (*out, free
 * with cvq__free(&ctx->alloc, .)) and checks the contract's input rules:
 * finite, and no sum of squares overflowing. */
cvq_status cvq__load_keys(cvq_context *ctx, const cvq_layer_view *lv, const void *src,
                          cvq_dtype dtype, size_t n, float **out);
cvq_status cvq__load_values(cvq_context *ctx, const cvq_layer_view *lv, const void *src,
                            cvq_dtype dtype, size_t n, float **out);
/* Runs an encode op (CVQ_OP_ENCODE_KEYS or CVQ_OP_ENCODE_VALUES) of the
 * context's backend on n tokens of checked fp32 input `in`, staging the
 * input and the two outputs (codes/scales, or bits/sigma) through backend
 * buffers when the backend has its own memory. On failure the outputs are
 * not written (device backends) or not meaningful (never for the CPU). */
cvq_status cvq__run_encode(cvq_context *ctx, cvq_op op, const cvq_layer_view *lv,
                           const cvq_codebook *cb, size_t n, const float *in, size_t in_bytes,
                           void *out0, size_t bytes0, void *out1, size_t bytes1);
/* The backend's answer to "can you run this op instance". */
cvq_status cvq__supports(cvq_context *ctx, cvq_op op, const cvq_geometry *g, size_t n_tokens,
                         size_t n_q);

/* The backend tables. Each backend folder defines its own. */
extern const cvq_backend_i cvq_backend_cpu;
#ifdef COMMVQ_HAVE_CUDA
extern const cvq_backend_i cvq_backend_cuda;
#endif
#ifdef COMMVQ_HAVE_VULKAN
extern const cvq_backend_i cvq_backend_vulkan;
#endif

#endif
