/*
 * Built instead of the Vulkan backend when it is not compiled in, so that
 * code using the test hooks of vk_backend.h links either way, and so that
 * a program written against include/commvq_vulkan.h (where the Vulkan
 * headers exist) links and gets CVQ_ERR_BACKEND_UNAVAILABLE.
 */
#include "vk_backend.h"

uint64_t cvq_vk_validation_messages(void) { return 0; }
bool cvq_vk_validation_enabled(void) { return false; }

#if defined(__has_include)
#if __has_include(<vulkan/vulkan.h>)
#define CVQ_VK_ABSENT_STUBS 1
#endif
#endif

#ifdef CVQ_VK_ABSENT_STUBS
#ifndef VK_NO_PROTOTYPES
#define VK_NO_PROTOTYPES
#endif
#include "commvq_vulkan.h"
#include "cvq_internal.h"

static cvq_status absent(cvq_context *ctx) {
    return CVQ_FAIL(ctx, CVQ_ERR_BACKEND_UNAVAILABLE,
                    "the vulkan backend is not available: it was not compiled into this build "
                    "(COMMVQ_VULKAN=OFF, or glslangValidator was missing at build time)");
}

cvq_status cvq_vulkan_context_create(const cvq_context_params *params, const cvq_vulkan_device_desc *dev,
                                     cvq_context **out) {
    (void)params;
    (void)dev;
    if (out) *out = NULL;
    return absent(NULL);
}
cvq_status cvq_vulkan_offset_alignment(const cvq_context *ctx, VkDeviceSize *out) {
    (void)ctx;
    (void)out;
    return absent(NULL);
}
cvq_status cvq_vulkan_prepare(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer) {
    (void)cb, (void)layer;
    return absent(ctx);
}
cvq_status cvq_vulkan_begin_recording(cvq_context *ctx, VkCommandBuffer cmd) {
    (void)cmd;
    return absent(ctx);
}
cvq_status cvq_vulkan_end_recording(cvq_context *ctx) { return absent(ctx); }
cvq_status cvq_vulkan_encode_keys(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer, cvq_vulkan_region keys,
                                  size_t n, cvq_vulkan_region codes, cvq_vulkan_region scales, uint32_t flags) {
    (void)cb, (void)layer, (void)keys, (void)n, (void)codes, (void)scales, (void)flags;
    return absent(ctx);
}
cvq_status cvq_vulkan_encode_values(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer,
                                    cvq_vulkan_region values, size_t n, cvq_vulkan_region bits,
                                    cvq_vulkan_region sigma) {
    (void)cb, (void)layer, (void)values, (void)n, (void)bits, (void)sigma;
    return absent(ctx);
}
cvq_status cvq_vulkan_attend(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer,
                             const cvq_vulkan_attend_desc *a) {
    (void)cb, (void)layer, (void)a;
    return absent(ctx);
}
cvq_status cvq_vulkan_collect_status(cvq_context *ctx, uint32_t *flags, uint32_t *failed_calls) {
    if (flags) *flags = 0;
    if (failed_calls) *failed_calls = 0;
    return absent(ctx);
}
#endif
