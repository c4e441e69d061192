/*
 * Contexts around a backend state that the backend builds itself from
 * handles given by the caller (the Vulkan backend's engine interop,
 * include/commvq_vulkan.h), instead of opening a device of its own.
 */
#ifndef CVQ_CONTEXT_EXT_H
#define CVQ_CONTEXT_EXT_H

#include "backend.h"

/* Builds *state for ctx (ctx->alloc is set; the callback also fills
 * ctx->device). On failure it leaves nothing allocated. */
typedef cvq_status (*cvq__state_init_fn)(cvq_context *ctx, void *arg, void **state);

/* A context of backend `kind` whose state comes from init(ctx, arg, .).
 * params as for cvq_context_create (backend must be `kind` or AUTO; the
 * device index is ignored). Freed by cvq_context_free (the backend's
 * shutdown entry). */
cvq_status cvq__context_create_with(const cvq_context_params *params, cvq_backend_kind kind,
                                    cvq__state_init_fn init, void *arg, cvq_context **out);

#endif
