/*
 * Device memory of the Vulkan backend: the buffer entries of the backend
 * contract (core/backend.h), scratch buffers, and the one command buffer
 * every op records into and waits for once.
 *
 * Two modes, chosen per context:
 *  - unified: the device has a memory type that is device-local, host-
 *    visible and coherent, and reading it from the host is cheap (a CPU
 *    device such as lavapipe, an integrated GPU, or a host-cached type).
 *    Buffers live there, stay mapped, and cvq_buffer.host points at them.
 *  - staging: buffers are device-local only; writes and reads go through a
 *    host-visible staging buffer in chunks of at most CVQ_VK_STAGING_MAX
 *    bytes (vkCmdCopyBuffer, one fence wait per chunk).
 * COMMVQ_VK_STAGING=1 forces the staging mode (to test it anywhere).
 *
 * Every VkBuffer is at least 4 bytes and a multiple of 4 (the core asks for
 * exact byte counts such as n uint16 codes; shaders address 32-bit words).
 * One VkDeviceMemory per buffer: simple, and the counts stay far below
 * maxMemoryAllocationCount (a cache holds 11 buffers, a layer's tables 13).
 */
#define _POSIX_C_SOURCE 200809L
#include "vk_internal.h"

#include <stdlib.h>
#include <string.h>

#define CVQ_VK_STAGING_MAX ((VkDeviceSize)16 << 20)
/* A fence wait longer than this is reported as CVQ_ERR_DEVICE_LOST (the
 * command buffer may still be pending: the context takes no more work). */
#define CVQ_VK_WAIT_NS (600ull * 1000 * 1000 * 1000)

static bool env_on(const char *name) {
    const char *v = getenv(name);
    return v && v[0] && strcmp(v, "0") != 0;
}

/* A memory type allowed by `bits` with all of `need`, preferring one that
 * also has `prefer`; -1 if none. */
static int find_type(const cvq_vk *vk, uint32_t bits, VkMemoryPropertyFlags need,
                     VkMemoryPropertyFlags prefer) {
    const VkPhysicalDeviceMemoryProperties *m = &vk->caps.mem;
    int fallback = -1;
    for (uint32_t i = 0; i < m->memoryTypeCount; i++) {
        if (!(bits & (1u << i))) continue;
        VkMemoryPropertyFlags f = m->memoryTypes[i].propertyFlags;
        if ((f & need) != need) continue;
        if ((f & prefer) == prefer) return (int)i;
        if (fallback < 0) fallback = (int)i;
    }
    return fallback;
}

cvq_status cvq_vk_memory_init(cvq_vk *vk) {
    const VkMemoryPropertyFlags uni = VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT |
                                      VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT |
                                      VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
    const VkPhysicalDeviceType t = vk->caps.props.deviceType;
    const bool uma = t == VK_PHYSICAL_DEVICE_TYPE_CPU || t == VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU;
    /* Reading uncached device memory from the host is slow on a discrete
     * GPU (PCIe BAR): there, mapped buffers only when the type is cached. */
    const VkMemoryPropertyFlags uni_need = uni | (uma ? 0 : VK_MEMORY_PROPERTY_HOST_CACHED_BIT);
    vk->unified = find_type(vk, ~0u, uni_need, 0) >= 0 && !env_on("COMMVQ_VK_STAGING");
    if (vk->unified) {
        vk->mem_need = uni_need;
        return CVQ_OK;
    }
    if (find_type(vk, ~0u, VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT, 0) < 0)
        return CVQ_FAIL(vk->ctx, CVQ_ERR_NO_DEVICE,
                        "Vulkan device %u has no host-visible coherent memory type", vk->index);
    /* no device-local type at all: whatever memory the device has */
    vk->mem_need = find_type(vk, ~0u, VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT, 0) >= 0
                       ? VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT : 0;
    return CVQ_OK;
}

/* Creates a buffer of `bytes` (rounded up to 4) in a memory type with
 * `need` (preferring `prefer`), mapped when host-visible. */
static cvq_status buf_create(cvq_vk *vk, VkDeviceSize bytes, VkMemoryPropertyFlags need,
                             VkMemoryPropertyFlags prefer, cvq_vk_buf *b) {
    cvq_context *ctx = vk->ctx;
    memset(b, 0, sizeof *b);
    VkDeviceSize size = bytes < 4 ? 4 : (bytes + 3) & ~(VkDeviceSize)3;
    if (size > vk->caps.max_alloc)
        return CVQ_FAIL(ctx, CVQ_ERR_DEVICE_OUT_OF_MEMORY,
                        "a buffer of %llu bytes exceeds the device's maxMemoryAllocationSize (%llu)",
                        (unsigned long long)size, (unsigned long long)vk->caps.max_alloc);
    VkBufferCreateInfo bi;
    memset(&bi, 0, sizeof bi);
    bi.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO;
    bi.size = size;
    bi.usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT |
               VK_BUFFER_USAGE_TRANSFER_DST_BIT;
    bi.sharingMode = VK_SHARING_MODE_EXCLUSIVE;
    VkResult r = vk->fn.CreateBuffer(vk->dev, &bi, NULL, &b->buf);
    if (r != VK_SUCCESS) {
        b->buf = VK_NULL_HANDLE;
        return CVQ_VK_FAIL(ctx, r, "vkCreateBuffer");
    }
    VkMemoryRequirements req;
    vk->fn.GetBufferMemoryRequirements(vk->dev, b->buf, &req);
    int type = find_type(vk, req.memoryTypeBits, need, prefer);
    cvq_status st = CVQ_OK;
    if (type < 0) {
        st = CVQ_FAIL(ctx, CVQ_ERR_DEVICE, "no memory type for a storage buffer (bits 0x%x)",
                      req.memoryTypeBits);
        goto fail;
    }
    VkMemoryAllocateInfo ai;
    memset(&ai, 0, sizeof ai);
    ai.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO;
    ai.allocationSize = req.size;
    ai.memoryTypeIndex = (uint32_t)type;
    r = vk->fn.AllocateMemory(vk->dev, &ai, NULL, &b->mem);
    if (r != VK_SUCCESS) {
        b->mem = VK_NULL_HANDLE;
        st = cvq__error(ctx, cvq_vk_status_of(r), __FILE__, __LINE__,
                        "vkAllocateMemory of %llu bytes failed: %s", (unsigned long long)req.size,
                        cvq_vk_result_name(r));
        goto fail;
    }
    r = vk->fn.BindBufferMemory(vk->dev, b->buf, b->mem, 0);
    if (r != VK_SUCCESS) {
        st = CVQ_VK_FAIL(ctx, r, "vkBindBufferMemory");
        goto fail;
    }
    if (vk->caps.mem.memoryTypes[type].propertyFlags & VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT) {
        r = vk->fn.MapMemory(vk->dev, b->mem, 0, VK_WHOLE_SIZE, 0, &b->map);
        if (r != VK_SUCCESS) {
            b->map = NULL;
            st = CVQ_VK_FAIL(ctx, r, "vkMapMemory");
            goto fail;
        }
    }
    b->size = size;
    return CVQ_OK;
fail:
    if (b->mem) vk->fn.FreeMemory(vk->dev, b->mem, NULL);
    vk->fn.DestroyBuffer(vk->dev, b->buf, NULL);
    memset(b, 0, sizeof *b);
    return st;
}

static void buf_destroy(cvq_vk *vk, cvq_vk_buf *b) {
    if (b->buf) vk->fn.DestroyBuffer(vk->dev, b->buf, NULL);
    if (b->mem) vk->fn.FreeMemory(vk->dev, b->mem, NULL); /* unmaps implicitly */
    memset(b, 0, sizeof *b);
}

void cvq_vk_memory_close(cvq_vk *vk) {
    cvq_vk_retired_free(vk);
    cvq__free(&vk->ctx->alloc, vk->retired);
    vk->retired = NULL;
    vk->cap_retired = 0;
    buf_destroy(vk, &vk->staging);
    buf_destroy(vk, &vk->status);
}

cvq_status cvq_vk_status_buffer(cvq_vk *vk) {
    if (vk->status.buf) return CVQ_OK;
    /* One slot per call, each at an offset a storage buffer may bind at. */
    VkDeviceSize stride = vk->caps.props.limits.minStorageBufferOffsetAlignment;
    if (stride < 4) stride = 4;
    cvq_status st = buf_create(vk, stride * CVQ_VK_STATUS_SLOTS,
                               VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT, 0,
                               &vk->status);
    if (st) return st;
    vk->slot_stride = stride;
    memset(vk->status.map, 0, (size_t)(stride * CVQ_VK_STATUS_SLOTS));
    return CVQ_OK;
}

/* ---- work that recorded commands may still use -------------------------------------- */

cvq_status cvq_vk_retire_reserve(cvq_vk *vk, size_t n) {
    if (vk->cap_retired - vk->n_retired >= n) return CVQ_OK;
    size_t cap = vk->cap_retired ? 2 * vk->cap_retired : 32;
    while (cap - vk->n_retired < n) cap *= 2;
    cvq_vk_retired *r = cvq__calloc(&vk->ctx->alloc, cap, sizeof *r);
    if (!r) return CVQ_FAIL(vk->ctx, CVQ_ERR_OUT_OF_MEMORY, "retired-object list of %zu entries", cap);
    if (vk->n_retired) memcpy(r, vk->retired, vk->n_retired * sizeof *r);
    cvq__free(&vk->ctx->alloc, vk->retired);
    vk->retired = r;
    vk->cap_retired = cap;
    return CVQ_OK;
}

void cvq_vk_buffer_release(cvq_vk *vk, cvq_buffer *buf) {
    if (!cvq_vk_buf_of(buf)) return;
    if (vk->pending && vk->n_retired < vk->cap_retired) {
        cvq_vk_retired *r = &vk->retired[vk->n_retired++];
        memset(r, 0, sizeof *r);
        r->buf = *buf;
        memset(buf, 0, sizeof *buf);
        return;
    }
    cvq_vk_buffer_free(vk, buf);
}

void cvq_vk_retired_free(cvq_vk *vk) {
    for (size_t i = 0; i < vk->n_retired; i++) {
        cvq_vk_retired *r = &vk->retired[i];
        if (r->pool) vk->fn.DestroyDescriptorPool(vk->dev, r->pool, NULL);
        cvq_vk_buffer_free(vk, &r->buf);
    }
    vk->n_retired = 0;
}

/* ---- the contract's buffer entries ---------------------------------------------------- */

cvq_status cvq_vk_buffer_alloc(void *state, size_t size, cvq_buffer *out) {
    cvq_vk *vk = state;
    memset(out, 0, sizeof *out);
    if (vk->lost) return CVQ_FAIL(vk->ctx, CVQ_ERR_DEVICE_LOST, "the Vulkan device was lost");
    cvq_vk_buf *b = cvq__calloc(&vk->ctx->alloc, 1, sizeof *b);
    if (!b) return CVQ_FAIL(vk->ctx, CVQ_ERR_OUT_OF_MEMORY, "cannot allocate a buffer record");
    cvq_status st = buf_create(vk, (VkDeviceSize)size, vk->mem_need, 0, b);
    if (st) {
        cvq__free(&vk->ctx->alloc, b);
        return st;
    }
    if (!vk->unified && b->map) {
        /* Staging mode: the buffer landed in mappable memory anyway; it is
         * still accessed through copies, so that this mode is what it says. */
        vk->fn.UnmapMemory(vk->dev, b->mem);
        b->map = NULL;
    }
    out->host = b->map;
    out->handle = b;
    out->size = size;
    return CVQ_OK;
}

void cvq_vk_buffer_free(void *state, cvq_buffer *buf) {
    cvq_vk *vk = state;
    cvq_vk_buf *b = cvq_vk_buf_of(buf);
    if (!b) return;
    buf_destroy(vk, b);
    cvq__free(&vk->ctx->alloc, b);
    memset(buf, 0, sizeof *buf);
}

/* A staging buffer of at least `bytes` (at most CVQ_VK_STAGING_MAX). */
static cvq_status staging_reserve(cvq_vk *vk, VkDeviceSize bytes) {
    if (bytes > CVQ_VK_STAGING_MAX) bytes = CVQ_VK_STAGING_MAX;
    if (vk->staging.buf && vk->staging.size >= bytes) return CVQ_OK;
    buf_destroy(vk, &vk->staging);
    VkDeviceSize want = bytes < ((VkDeviceSize)1 << 20) ? ((VkDeviceSize)1 << 20) : bytes;
    return buf_create(vk, want,
                      VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT,
                      VK_MEMORY_PROPERTY_HOST_CACHED_BIT, &vk->staging);
}

static cvq_status check_range(cvq_vk *vk, const cvq_buffer *buf, size_t off, size_t n) {
    if (!cvq_vk_buf_of(buf) || off > buf->size || n > buf->size - off)
        return CVQ_FAIL(vk->ctx, CVQ_ERR_INTERNAL, "buffer access [%zu, +%zu) outside its %zu bytes", off,
                        n, buf ? buf->size : (size_t)0);
    if (vk->lost) return CVQ_FAIL(vk->ctx, CVQ_ERR_DEVICE_LOST, "the Vulkan device was lost");
    return CVQ_OK;
}

/* Copies between a device buffer and the staging buffer, chunk by chunk. */
static cvq_status staged_copy(cvq_vk *vk, const cvq_vk_buf *b, size_t off, void *host, size_t n,
                              bool to_device) {
    cvq_status st = staging_reserve(vk, (VkDeviceSize)n);
    if (st) return st;
    char *h = host;
    size_t done = 0;
    while (done < n) {
        size_t chunk = n - done;
        if (chunk > vk->staging.size) chunk = (size_t)vk->staging.size;
        if (to_device) memcpy(vk->staging.map, h + done, chunk);
        st = cvq_vk_cmd_begin(vk);
        if (st) return st;
        cvq_vk_cmd_barrier(vk);
        VkBufferCopy region;
        region.size = chunk;
        if (to_device) {
            region.srcOffset = 0;
            region.dstOffset = off + done;
            vk->fn.CmdCopyBuffer(vk->cmd, vk->staging.buf, b->buf, 1, &region);
        } else {
            region.srcOffset = off + done;
            region.dstOffset = 0;
            vk->fn.CmdCopyBuffer(vk->cmd, b->buf, vk->staging.buf, 1, &region);
            cvq_vk_cmd_barrier_host(vk);
        }
        st = cvq_vk_cmd_submit_wait(vk);
        if (st) return st;
        if (!to_device) memcpy(h + done, vk->staging.map, chunk);
        done += chunk;
    }
    return CVQ_OK;
}

cvq_status cvq_vk_buffer_write(void *state, const cvq_buffer *buf, size_t off, const void *src,
                               size_t n) {
    cvq_vk *vk = state;
    cvq_status st = check_range(vk, buf, off, n);
    if (st || n == 0) return st;
    cvq_vk_buf *b = cvq_vk_buf_of(buf);
    if (b->map) {
        memcpy((char *)b->map + off, src, n);
        return CVQ_OK;
    }
    return staged_copy(vk, b, off, (void *)src, n, true);
}

cvq_status cvq_vk_buffer_read(void *state, const cvq_buffer *buf, size_t off, void *dst, size_t n) {
    cvq_vk *vk = state;
    cvq_status st = check_range(vk, buf, off, n);
    if (st || n == 0) return st;
    cvq_vk_buf *b = cvq_vk_buf_of(buf);
    if (b->map) {
        memcpy(dst, (const char *)b->map + off, n);
        return CVQ_OK;
    }
    return staged_copy(vk, b, off, dst, n, false);
}

/* ---- scratch ---------------------------------------------------------------------------- */

cvq_status cvq_vk_scratch_reserve(cvq_vk *vk, cvq_vk_scratch *s, size_t bytes) {
    if (s->b.handle && s->b.size >= bytes) return CVQ_OK;
    /* Grow by at least half of the old size, so that a run of slowly
     * growing calls does not reallocate every time. */
    size_t want = bytes < 256 ? 256 : bytes;
    size_t grown = s->b.size + s->b.size / 2;
    if (grown > want && grown <= vk->caps.props.limits.maxStorageBufferRange) want = grown;
    cvq_vk_buffer_release(vk, &s->b); /* recorded work may still use it */
    return cvq_vk_buffer_alloc(vk, want, &s->b);
}

void cvq_vk_scratch_free(cvq_vk *vk, cvq_vk_scratch *s) { cvq_vk_buffer_free(vk, &s->b); }

/* ---- command buffer ---------------------------------------------------------------------- */

cvq_status cvq_vk_cmd_begin(cvq_vk *vk) {
    cvq_context *ctx = vk->ctx;
    if (vk->lost) return CVQ_FAIL(ctx, CVQ_ERR_DEVICE_LOST, "the Vulkan device was lost");
    VkResult r = vk->fn.ResetCommandBuffer(vk->cmd, 0);
    if (r != VK_SUCCESS) return CVQ_VK_FAIL(ctx, r, "vkResetCommandBuffer");
    r = vk->fn.ResetDescriptorPool(vk->dev, vk->desc_pool, 0);
    if (r != VK_SUCCESS) return CVQ_VK_FAIL(ctx, r, "vkResetDescriptorPool");
    vk->sets_used = 0;
    VkCommandBufferBeginInfo bi;
    memset(&bi, 0, sizeof bi);
    bi.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO;
    bi.flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT;
    r = vk->fn.BeginCommandBuffer(vk->cmd, &bi);
    if (r != VK_SUCCESS) return CVQ_VK_FAIL(ctx, r, "vkBeginCommandBuffer");
    vk->cur = vk->cmd;
    return CVQ_OK;
}

static cvq_status submit_fail(cvq_vk *vk, VkResult r, const char *what) {
    /* After a lost device, or a wait that never ended (the command buffer
     * may still be pending), nothing may be recorded again. */
    if (r == VK_ERROR_DEVICE_LOST || r == VK_TIMEOUT) vk->lost = true;
    if (r == VK_TIMEOUT)
        return CVQ_FAIL(vk->ctx, CVQ_ERR_DEVICE_LOST, "%s: VK_TIMEOUT after %llu s; the device is "
                        "treated as lost", what, (unsigned long long)(CVQ_VK_WAIT_NS / 1000000000ull));
    return CVQ_VK_FAIL(vk->ctx, r, what);
}

cvq_status cvq_vk_cmd_submit_wait(cvq_vk *vk) {
    VkResult r = vk->fn.EndCommandBuffer(vk->cmd);
    if (r != VK_SUCCESS) return submit_fail(vk, r, "vkEndCommandBuffer");
    r = vk->fn.ResetFences(vk->dev, 1, &vk->fence);
    if (r != VK_SUCCESS) return submit_fail(vk, r, "vkResetFences");
    VkSubmitInfo si;
    memset(&si, 0, sizeof si);
    si.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO;
    si.commandBufferCount = 1;
    si.pCommandBuffers = &vk->cmd;
    r = vk->fn.QueueSubmit(vk->queue, 1, &si, vk->fence);
    if (r != VK_SUCCESS) return submit_fail(vk, r, "vkQueueSubmit");
    r = vk->fn.WaitForFences(vk->dev, 1, &vk->fence, VK_TRUE, CVQ_VK_WAIT_NS);
    if (r != VK_SUCCESS) return submit_fail(vk, r, "vkWaitForFences");
    return CVQ_OK;
}

void cvq_vk_cmd_barrier(cvq_vk *vk) {
    VkMemoryBarrier mb;
    memset(&mb, 0, sizeof mb);
    mb.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER;
    mb.srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT;
    mb.dstAccessMask = VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT |
                       VK_ACCESS_TRANSFER_READ_BIT | VK_ACCESS_TRANSFER_WRITE_BIT;
    const VkPipelineStageFlags st = VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT;
    vk->fn.CmdPipelineBarrier(vk->cur, st, st, 0, 1, &mb, 0, NULL, 0, NULL);
}

void cvq_vk_cmd_barrier_host(cvq_vk *vk) {
    VkMemoryBarrier mb;
    memset(&mb, 0, sizeof mb);
    mb.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER;
    mb.srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT;
    mb.dstAccessMask = VK_ACCESS_HOST_READ_BIT;
    vk->fn.CmdPipelineBarrier(vk->cur,
                              VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT,
                              VK_PIPELINE_STAGE_HOST_BIT, 0, 1, &mb, 0, NULL, 0, NULL);
}
