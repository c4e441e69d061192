/*
 * The Vulkan backend's table (core/backend.h): devices, context state,
 * supports, buffers and the three ops. See vk_internal.h for the files.
 */
#define _POSIX_C_SOURCE 200809L
#include "vk_internal.h"

#include <stdlib.h>
#include <string.h>

/* A positive integer from the environment, or `dflt`. */
static unsigned long long env_count(const char *name, unsigned long long dflt) {
    const char *v = getenv(name);
    if (!v || !v[0]) return dflt;
    char *end;
    unsigned long long x = strtoull(v, &end, 10);
    return (*end || x == 0) ? dflt : x;
}

static cvq_status vk_list_devices(cvq_device_info *out, size_t cap, size_t *count) {
    const cvq_vk_process *p = cvq_vk_process_get();
    *count = 0;
    if (p->status != CVQ_OK)
        return CVQ_FAIL(NULL, p->status == CVQ_ERR_OUT_OF_MEMORY ? p->status : CVQ_ERR_NO_DEVICE, "%s",
                        p->why);
    for (uint32_t i = 0; i < p->n_phys; i++)
        if (out && i < cap) cvq_vk_device_info(p, i, &out[i]);
    *count = p->n_phys;
    return CVQ_OK;
}

void cvq_vk_shutdown(void *state) {
    cvq_vk *vk = state;
    if (!vk) return;
    if (vk->dev) {
        /* Nothing is in flight (every op waits), but a failed op may have
         * left a submission behind. An engine's device is not ours to
         * wait on (other threads may use its queues): the engine finishes
         * the work it recorded through this context before freeing it
         * (docs/vulkan.md). */
        if (!vk->external && vk->fn.DeviceWaitIdle) vk->fn.DeviceWaitIdle(vk->dev);
        cvq_vk_tables_close(vk);
        cvq_vk_scratch_free(vk, &vk->s_codes);
        cvq_vk_scratch_free(vk, &vk->s_vscratch);
        cvq_vk_scratch_free(vk, &vk->s_bits);
        cvq_vk_scratch_free(vk, &vk->s_attend);
        cvq_vk_scratch_free(vk, &vk->s_dummy);
        cvq_vk_scratch_free(vk, &vk->s_scales);
        cvq_vk_pipelines_close(vk);
        cvq_vk_memory_close(vk);
        cvq_vk_device_close(vk);
    }
    cvq_allocator a = vk->ctx->alloc;
    cvq__free(&a, vk);
}

cvq_status cvq_vk_state_setup(cvq_vk *vk) {
    cvq_status st = cvq_vk_memory_init(vk);
    if (st) return st;
    vk->cur = vk->cmd;
    vk->fc = cvq_vk_float_controls(&vk->caps);
    /* Test knobs (vk_backend.h): smaller chunks and dispatches than the
     * device needs, to exercise the splitting paths anywhere. */
    vk->scratch_budget = (size_t)env_count("COMMVQ_VK_SCRATCH_BUDGET", CVQ_VK_SCRATCH_BUDGET);
    if (vk->scratch_budget > CVQ_VK_SCRATCH_BUDGET) vk->scratch_budget = CVQ_VK_SCRATCH_BUDGET;
    vk->max_groups = vk->caps.props.limits.maxComputeWorkGroupCount[0];
    unsigned long long mg = env_count("COMMVQ_VK_MAX_GROUPS", vk->max_groups);
    if (mg < vk->max_groups) vk->max_groups = (uint32_t)mg;
    return CVQ_OK;
}

static cvq_status vk_init(cvq_context *ctx, int device, void **state) {
    *state = NULL;
    const cvq_vk_process *p = cvq_vk_process_get();
    if (p->status != CVQ_OK) return CVQ_FAIL(ctx, p->status, "%s", p->why);
    cvq_vk *vk = cvq__calloc(&ctx->alloc, 1, sizeof *vk);
    if (!vk) return CVQ_FAIL(ctx, CVQ_ERR_OUT_OF_MEMORY, "cannot allocate the Vulkan context state");
    vk->ctx = ctx;
    vk->proc = p;
    cvq_status st = cvq_vk_device_open(vk, device);
    if (!st) st = cvq_vk_state_setup(vk);
    if (st) {
        cvq_vk_shutdown(vk);
        return st;
    }
    *state = vk;
    return CVQ_OK;
}

static cvq_status vk_supports(cvq_context *ctx, const cvq_op_desc *desc) {
    cvq_vk *vk = ctx->be_state;
    if (vk->lost) return CVQ_FAIL(ctx, CVQ_ERR_DEVICE_LOST, "the Vulkan device was lost");
    return cvq_vk_op_supported(vk, desc);
}

const cvq_backend_i cvq_backend_vulkan = {
    .api_version = CVQ_BACKEND_API_VERSION,
    .kind = CVQ_BACKEND_VULKAN,
    .name = "vulkan",
    .list_devices = vk_list_devices,
    .init = vk_init,
    .shutdown = cvq_vk_shutdown,
    .supports = vk_supports,
    .buffer_alloc = cvq_vk_buffer_alloc,
    .buffer_free = cvq_vk_buffer_free,
    .buffer_write = cvq_vk_buffer_write,
    .buffer_read = cvq_vk_buffer_read,
    .encode_keys = cvq_vk_encode_keys,
    .encode_values = cvq_vk_encode_values,
    .attend = cvq_vk_attend,
};
