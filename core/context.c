/*
 * Contexts: one backend, one device. Backend choice is explicit (cpu, cuda,
 * vulkan) or AUTO: the environment variable COMMVQ_BACKEND if set, else the
 * best usable GPU device, else the CPU backend. AUTO never picks a device
 * that is itself a CPU (a software Vulkan driver such as lavapipe), and an
 * explicit request for an absent backend fails; there is no silent
 * fallback.
 */
#include "backend.h"
#include "context_ext.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const k_names[] = {"auto", "cpu", "cuda", "vulkan"};

const char *cvq_backend_name(cvq_backend_kind k) {
    if ((unsigned)k < sizeof k_names / sizeof k_names[0]) return k_names[k];
    return "unknown";
}

static bool name_eq(const char *a, const char *b) {
    for (; *a && *b; a++, b++)
        if (tolower((unsigned char)*a) != tolower((unsigned char)*b)) return false;
    return *a == *b;
}

cvq_status cvq_backend_from_name(const char *name, cvq_backend_kind *out) {
    CVQ__NONNULL(NULL, "cvq_backend_from_name", name, "name");
    CVQ__NONNULL(NULL, "cvq_backend_from_name", out, "out");
    for (unsigned i = 0; i < sizeof k_names / sizeof k_names[0]; i++) {
        if (name_eq(name, k_names[i])) {
            *out = (cvq_backend_kind)i;
            return CVQ_OK;
        }
    }
    return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                    "unknown backend '%s' (expected auto, cpu, cuda or vulkan)", name);
}

/* Why a backend is absent, for messages. */
static cvq_status absent(cvq_context *ctx, cvq_backend_kind k) {
    if (cvq__backend_compiled(k) && cvq__backend_disabled(k))
        return CVQ_FAIL(ctx, CVQ_ERR_BACKEND_UNAVAILABLE,
                        "the %s backend is disabled by COMMVQ_DISABLE_%s", cvq_backend_name(k),
                        k == CVQ_BACKEND_CUDA ? "CUDA" : "VULKAN");
    const char *why = "it was not compiled into this build";
    if (k == CVQ_BACKEND_CUDA)
        why = "it was not compiled into this build (COMMVQ_CUDA=OFF, or no CUDA toolkit (nvcc) "
              "was found at build time)";
    if (k == CVQ_BACKEND_VULKAN)
        why = "it was not compiled into this build (COMMVQ_VULKAN=OFF, or the Vulkan headers or "
              "glslangValidator were missing at build time)";
    return CVQ_FAIL(ctx, CVQ_ERR_BACKEND_UNAVAILABLE, "the %s backend is not available: %s",
                    cvq_backend_name(k), why);
}

cvq_status cvq_list_devices(cvq_device_info *out, size_t cap, size_t *count) {
    CVQ__NONNULL(NULL, "cvq_list_devices", count, "count");
    if (cap && !out) return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "out is NULL but cap > 0");
    size_t total = 0;
    for (int k = CVQ_BACKEND_CPU; k <= CVQ_BACKEND_VULKAN; k++) {
        const cvq_backend_i *be = cvq__backend_find((cvq_backend_kind)k);
        if (!be) continue;
        size_t n = 0, room = total < cap ? cap - total : 0;
        cvq_status st = be->list_devices(room ? out + total : NULL, room, &n);
        if (st != CVQ_OK && st != CVQ_ERR_NO_DEVICE) return st;
        total += n;
    }
    *count = total;
    return CVQ_OK;
}

/* Best usable device of one backend: discrete > integrated > virtual/other;
 * software (CPU-implemented) devices only when allow_software. Returns the
 * device index or -1, and its rank (lower is better). */
static int best_device(const cvq_backend_i *be, bool allow_software, int *rank_out,
                       cvq_status *why) {
    cvq_device_info devs[16];
    size_t n = 0;
    *why = be->list_devices(devs, 16, &n);
    if (*why != CVQ_OK) return -1;
    int best = -1, best_rank = 1000;
    for (size_t i = 0; i < n && i < 16; i++) {
        if (!devs[i].usable) continue;
        int rank;
        switch (devs[i].type) {
        case CVQ_DEVICE_DISCRETE_GPU: rank = 0; break;
        case CVQ_DEVICE_INTEGRATED_GPU: rank = 1; break;
        case CVQ_DEVICE_VIRTUAL_GPU: rank = 2; break;
        case CVQ_DEVICE_OTHER: rank = 3; break;
        default: rank = allow_software ? 4 : 1000; break;
        }
        if (rank < best_rank) {
            best_rank = rank;
            best = (int)devs[i].index;
        }
    }
    *rank_out = best_rank;
    return best; /* *why stays CVQ_OK when devices exist but none fits */
}

cvq_status cvq_backend_available(cvq_backend_kind k) {
    if (k == CVQ_BACKEND_AUTO) return CVQ_OK;
    const cvq_backend_i *be = cvq__backend_find(k);
    if (!be) return absent(NULL, k);
    int rank;
    cvq_status why;
    int dev = best_device(be, true, &rank, &why);
    if (dev >= 0) return CVQ_OK;
    if (why != CVQ_OK) return why; /* the backend's own message (e.g. no driver) */
    return CVQ_FAIL(NULL, CVQ_ERR_NO_DEVICE, "the %s backend found no usable device",
                    cvq_backend_name(k));
}

cvq_context_params cvq_context_default_params(void) {
    cvq_context_params p;
    memset(&p, 0, sizeof p);
    p.backend = CVQ_BACKEND_AUTO;
    p.device = -1;
    p.n_threads = 0;
    p.cpu_reference = 0;
    p.allocator = NULL;
    return p;
}

/* Resolve AUTO: environment first, then the best GPU, then the CPU. */
static cvq_status resolve_auto(cvq_backend_kind *kind, int *device, bool *explicit_env) {
    *explicit_env = false;
    const char *env = getenv("COMMVQ_BACKEND");
    if (env && env[0]) {
        cvq_backend_kind k;
        cvq_status st = cvq_backend_from_name(env, &k);
        if (st) return CVQ_FAIL(NULL, st, "COMMVQ_BACKEND='%s' is not a backend name", env);
        if (k != CVQ_BACKEND_AUTO) {
            *kind = k;
            *explicit_env = true;
            return CVQ_OK;
        }
    }
    int best_rank = 1000;
    *kind = CVQ_BACKEND_CPU;
    *device = 0;
    const cvq_backend_kind gpus[] = {CVQ_BACKEND_CUDA, CVQ_BACKEND_VULKAN};
    for (size_t i = 0; i < 2; i++) {
        const cvq_backend_i *be = cvq__backend_find(gpus[i]);
        if (!be) continue;
        int rank;
        cvq_status why;
        int dev = best_device(be, false, &rank, &why);
        if (dev >= 0 && rank < best_rank) {
            best_rank = rank;
            *kind = gpus[i];
            *device = dev;
        }
    }
    return CVQ_OK;
}

cvq_status cvq_context_create(const cvq_context_params *params, cvq_context **out) {
    CVQ__NONNULL(NULL, "cvq_context_create", out, "out");
    *out = NULL;
    cvq_context_params p = params ? *params : cvq_context_default_params();
    if ((unsigned)p.backend > CVQ_BACKEND_VULKAN)
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT, "backend %d is not a cvq_backend_kind", (int)p.backend);
    if (p.n_threads < 0)
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT, "n_threads must be >= 0");

    cvq_backend_kind kind = p.backend;
    int device = p.device;
    if (device < 0) {
        const char *env = getenv("COMMVQ_DEVICE");
        if (env && env[0]) {
            char *end;
            long v = strtol(env, &end, 10);
            if (*end || v < 0 || v > 1000000)
                return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT, "COMMVQ_DEVICE='%s' is not a device index", env);
            device = (int)v;
        }
    }
    if (kind == CVQ_BACKEND_AUTO) {
        bool from_env;
        int auto_dev = -1;
        cvq_status st = resolve_auto(&kind, &auto_dev, &from_env);
        if (st) return st;
        if (!from_env && device < 0) device = auto_dev;
    }

    const cvq_backend_i *be = cvq__backend_find(kind);
    if (!be) return absent(NULL, kind);
    if (be->api_version < 1 || be->api_version > CVQ_BACKEND_API_VERSION)
        return CVQ_FAIL(NULL, CVQ_ERR_INTERNAL, "backend %s has API version %u (core reads 1..%u)",
                        be->name, be->api_version, CVQ_BACKEND_API_VERSION);
    /* "The backend's choice": its best usable device, software ones
     * included (an explicit request may use lavapipe), resolved here so
     * that the device recorded below is the one the backend opens. */
    if (device < 0 && kind != CVQ_BACKEND_CPU) {
        int rank;
        cvq_status why;
        int best = best_device(be, true, &rank, &why);
        if (best >= 0) device = best;
    }

    cvq_allocator a;
    cvq__allocator_init(&a, p.allocator);
    cvq_context *ctx = cvq__calloc(&a, 1, sizeof *ctx);
    if (!ctx) return CVQ_FAIL(NULL, CVQ_ERR_OUT_OF_MEMORY, "cannot allocate a context");
    ctx->alloc = a;
    ctx->be = be;
    ctx->kind = kind;
    ctx->n_threads = p.n_threads;
    ctx->cpu_reference = p.cpu_reference;

    cvq_status st = be->init(ctx, device, &ctx->be_state);
    if (st) {
        /* Keep the backend's message: copy it out before freeing ctx. */
        char msg[512];
        memcpy(msg, ctx->last_error, sizeof msg);
        cvq__free(&a, ctx);
        return CVQ_FAIL(NULL, st, "%s backend: %s", cvq_backend_name(kind), msg[0] ? msg : cvq_last_error());
    }
    /* Record what we got. */
    cvq_device_info devs[16];
    size_t n = 0;
    if (be->list_devices(devs, 16, &n) == CVQ_OK) {
        int want = device < 0 ? 0 : device;
        for (size_t i = 0; i < n && i < 16; i++)
            if ((int)devs[i].index == want) ctx->device = devs[i];
    }
    ctx->device.backend = kind;
    *out = ctx;
    return CVQ_OK;
}

void cvq_context_free(cvq_context *ctx) {
    if (!ctx) return;
    if (ctx->be && ctx->be->shutdown) ctx->be->shutdown(ctx->be_state);
    cvq_allocator a = ctx->alloc;
    cvq__free(&a, ctx);
}

cvq_backend_kind cvq_context_backend(const cvq_context *ctx) {
    return ctx ? ctx->kind : CVQ_BACKEND_AUTO;
}

cvq_status cvq_context_device(const cvq_context *ctx, cvq_device_info *out) {
    CVQ__NONNULL(NULL, "cvq_context_device", ctx, "ctx");
    CVQ__NONNULL(NULL, "cvq_context_device", out, "out");
    *out = ctx->device;
    return CVQ_OK;
}

cvq_status cvq__context_create_with(const cvq_context_params *params, cvq_backend_kind kind,
                                    cvq__state_init_fn init, void *arg, cvq_context **out) {
    if (!out) return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "out is required");
    *out = NULL;
    cvq_context_params p = params ? *params : cvq_context_default_params();
    if (p.backend != CVQ_BACKEND_AUTO && p.backend != kind)
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT, "params->backend is %s; this call makes a %s context",
                        cvq_backend_name(p.backend), cvq_backend_name(kind));
    if (p.n_threads < 0) return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT, "n_threads must be >= 0");
    const cvq_backend_i *be = cvq__backend_find(kind);
    if (!be) return absent(NULL, kind);
    cvq_allocator a;
    cvq__allocator_init(&a, p.allocator);
    cvq_context *ctx = cvq__calloc(&a, 1, sizeof *ctx);
    if (!ctx) return CVQ_FAIL(NULL, CVQ_ERR_OUT_OF_MEMORY, "cannot allocate a context");
    ctx->alloc = a;
    ctx->be = be;
    ctx->kind = kind;
    ctx->n_threads = p.n_threads;
    ctx->cpu_reference = p.cpu_reference;
    cvq_status st = init(ctx, arg, &ctx->be_state);
    if (st) {
        char msg[512];
        memcpy(msg, ctx->last_error, sizeof msg);
        cvq__free(&a, ctx);
        return CVQ_FAIL(NULL, st, "%s backend: %s", cvq_backend_name(kind), msg[0] ? msg : cvq_last_error());
    }
    ctx->device.backend = kind;
    *out = ctx;
    return CVQ_OK;
}
