/*
 * Status names, descriptions and the last-error message.
 *
 * The message of the last failure is kept per thread (C11 _Thread_local) so
 * that functions without a context (codebook load, geometry checks) can
 * explain themselves, and copied into the context for calls that have one.
 */
#include "cvq_internal.h"

#include <stdio.h>
#include <string.h>

typedef struct {
    cvq_status s;
    const char *name;
    const char *text;
} status_entry;

static const status_entry k_status[] = {
    {CVQ_OK, "CVQ_OK", "success"},
    {CVQ_ERR_INVALID_ARGUMENT, "CVQ_ERR_INVALID_ARGUMENT", "invalid argument"},
    {CVQ_ERR_NULL_POINTER, "CVQ_ERR_NULL_POINTER", "a required pointer is NULL"},
    {CVQ_ERR_SHAPE, "CVQ_ERR_SHAPE", "tensor shape does not match the geometry"},
    {CVQ_ERR_NONFINITE_INPUT, "CVQ_ERR_NONFINITE_INPUT", "input contains NaN or Inf"},
    {CVQ_ERR_INPUT_RANGE, "CVQ_ERR_INPUT_RANGE", "input magnitude out of range (a sum of squares overflows)"},
    {CVQ_ERR_POSITION, "CVQ_ERR_POSITION", "positions are not strictly increasing or are negative"},
    {CVQ_ERR_LAYER_RANGE, "CVQ_ERR_LAYER_RANGE", "layer index out of range"},
    {CVQ_ERR_SIZE_OVERFLOW, "CVQ_ERR_SIZE_OVERFLOW", "a byte count overflows size_t"},
    {CVQ_ERR_GEOMETRY, "CVQ_ERR_GEOMETRY", "unsupported model geometry"},
    {CVQ_ERR_MISMATCH, "CVQ_ERR_MISMATCH", "objects do not belong together"},
    {CVQ_ERR_UNSUPPORTED, "CVQ_ERR_UNSUPPORTED", "operation not supported by this backend"},
    {CVQ_ERR_BACKEND_UNAVAILABLE, "CVQ_ERR_BACKEND_UNAVAILABLE", "backend not available in this build or disabled"},
    {CVQ_ERR_NO_DEVICE, "CVQ_ERR_NO_DEVICE", "no usable device for this backend"},
    {CVQ_ERR_OUT_OF_MEMORY, "CVQ_ERR_OUT_OF_MEMORY", "host memory allocation failed"},
    {CVQ_ERR_DEVICE_OUT_OF_MEMORY, "CVQ_ERR_DEVICE_OUT_OF_MEMORY", "device memory allocation failed"},
    {CVQ_ERR_DEVICE, "CVQ_ERR_DEVICE", "device or driver error"},
    {CVQ_ERR_DEVICE_LOST, "CVQ_ERR_DEVICE_LOST", "device lost"},
    {CVQ_ERR_IO, "CVQ_ERR_IO", "input/output error"},
    {CVQ_ERR_FORMAT, "CVQ_ERR_FORMAT", "malformed codebook file"},
    {CVQ_ERR_FORMAT_VERSION, "CVQ_ERR_FORMAT_VERSION", "unsupported codebook file version"},
    {CVQ_ERR_FORMAT_TRUNCATED, "CVQ_ERR_FORMAT_TRUNCATED", "codebook file is truncated"},
    {CVQ_ERR_FORMAT_CHECKSUM, "CVQ_ERR_FORMAT_CHECKSUM", "codebook file checksum mismatch"},
    {CVQ_ERR_FORMAT_NONFINITE, "CVQ_ERR_FORMAT_NONFINITE", "codebook contains NaN/Inf or out-of-range values"},
    {CVQ_ERR_CANCELLED, "CVQ_ERR_CANCELLED", "stopped by the caller's progress callback"},
    {CVQ_ERR_INTERNAL, "CVQ_ERR_INTERNAL", "internal error"},
};

static const status_entry *find_status(cvq_status s) {
    for (size_t i = 0; i < sizeof k_status / sizeof k_status[0]; i++)
        if (k_status[i].s == s) return &k_status[i];
    return NULL;
}

const char *cvq_status_name(cvq_status s) {
    const status_entry *e = find_status(s);
    return e ? e->name : "CVQ_ERR_UNKNOWN";
}

const char *cvq_status_string(cvq_status s) {
    const status_entry *e = find_status(s);
    return e ? e->text : "unknown status code";
}

static _Thread_local char tls_error[512];

const char *cvq_last_error(void) { return tls_error; }

const char *cvq_context_last_error(const cvq_context *ctx) {
    return ctx ? ctx->last_error : "";
}

cvq_status cvq__error(cvq_context *ctx, cvq_status s, const char *file,
                      int line, const char *fmt, ...) {
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    /* Keep only the file's base name: messages stay short and stable. */
    const char *base = strrchr(file, '/');
    base = base ? base + 1 : file;
    snprintf(tls_error, sizeof tls_error, "%s: %s (%s:%d)", cvq_status_name(s),
             msg, base, line);
    if (ctx) memcpy(ctx->last_error, tls_error, sizeof ctx->last_error);
    return s;
}

const char *cvq_version_string(void) {
#define CVQ_STR2(x) #x
#define CVQ_STR(x) CVQ_STR2(x)
    return CVQ_STR(CVQ_VERSION_MAJOR) "." CVQ_STR(CVQ_VERSION_MINOR) "." CVQ_STR(CVQ_VERSION_PATCH);
}
