/*
 * commvq_vulkan.h: what only the Vulkan backend offers — running inside an
 * engine's own Vulkan device, on the engine's buffers, optionally recorded
 * into the engine's command buffers. Everything else goes through commvq.h
 * (a context made here also runs every commvq.h call, on the engine's
 * device). The full rules are in docs/vulkan.md ("Engine interop"); in
 * short:
 *
 *  - Ownership: the engine keeps its VkInstance, VkPhysicalDevice, VkDevice,
 *    VkQueue, buffers and command buffers; the library never destroys them.
 *    It creates its own pipelines, descriptor pools, command pool, fence and
 *    scratch buffers on the engine's device and destroys them in
 *    cvq_context_free, which must run before the engine destroys its device
 *    and when no work recorded through the context is pending.
 *  - Regions: offsets are multiples of minStorageBufferOffsetAlignment
 *    (cvq_vulkan_offset_alignment), sizes cover the data (outputs: rounded
 *    up to a multiple of 4 bytes; the pad bytes may be overwritten), the
 *    buffer was created with VK_BUFFER_USAGE_STORAGE_BUFFER_BIT and bound to
 *    memory, and the region lies inside it (the library cannot query usage
 *    flags or buffer sizes: the validation layer reports those).
 *  - Calls submit to the engine's queue and wait (immediate mode), or,
 *    between cvq_vulkan_begin_recording and cvq_vulkan_end_recording,
 *    record into the engine's command buffer and return at once.
 *  - Device-side input checks: a NaN/Inf input, or a sum of squares that
 *    overflows, makes the encode call write nothing at all; immediate calls
 *    return the status, recorded calls report it through
 *    cvq_vulkan_collect_status after the engine's fence.
 *
 * The library is built with VK_NO_PROTOTYPES and never links the loader:
 * every entry point comes from the get_instance_proc_addr the engine gives.
 */
#ifndef COMMVQ_VULKAN_H
#define COMMVQ_VULKAN_H

#include <vulkan/vulkan.h>

#include "commvq.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The engine's device. Vulkan >= 1.2 (instance apiVersion and device). */
typedef struct cvq_vulkan_device_desc {
    VkInstance instance;
    VkPhysicalDevice physical_device;
    VkDevice device;
    VkQueue queue;               /* of queue_family_index                   */
    uint32_t queue_family_index; /* must have VK_QUEUE_COMPUTE_BIT           */
    uint32_t api_version;        /* VkApplicationInfo.apiVersion of the
                                    instance; 0 = VK_API_VERSION_1_2         */
    PFN_vkGetInstanceProcAddr get_instance_proc_addr; /* the engine's loader */
    /* The feature chain given to vkCreateDevice (VkPhysicalDeviceFeatures2
     * with any VkPhysicalDeviceVulkan11Features / Vulkan12Features /
     * 16BitStorage / 8BitStorage / ShaderFloat16Int8 structures), or NULL
     * if none. Kernels whose SPIR-V needs a feature the engine did not
     * enable are refused (CVQ_ERR_UNSUPPORTED naming the feature). */
    const VkPhysicalDeviceFeatures2 *enabled_features;
} cvq_vulkan_device_desc;

/* A context on the engine's device. params->backend must be
 * CVQ_BACKEND_VULKAN or CVQ_BACKEND_AUTO; params->device is ignored; NULL
 * params: defaults. Fails with CVQ_ERR_NULL_POINTER (a handle or the proc
 * address is missing), CVQ_ERR_INVALID_ARGUMENT (the queue family has no
 * compute, an entry point is missing), CVQ_ERR_NO_DEVICE (the device lacks
 * what the kernels need, with the reason) or
 * CVQ_ERR_BACKEND_UNAVAILABLE. */
CVQ_API cvq_status cvq_vulkan_context_create(const cvq_context_params *params,
                                             const cvq_vulkan_device_desc *dev,
                                             cvq_context **out);

/* minStorageBufferOffsetAlignment of the context's device (every region
 * offset must be a multiple). CVQ_ERR_UNSUPPORTED on a non-Vulkan context. */
CVQ_API cvq_status cvq_vulkan_offset_alignment(const cvq_context *ctx,
                                               VkDeviceSize *out);

/* Uploads the device tables of (cb, layer) now, so that later calls on
 * them, recorded ones included, do not use the queue for it (the first use
 * of a layer otherwise uploads them then: a memcpy on devices with host-
 * visible device memory, a copy submitted to the queue elsewhere). */
CVQ_API cvq_status cvq_vulkan_prepare(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer);

/* A range of an engine buffer. */
typedef struct cvq_vulkan_region {
    VkBuffer buffer;
    VkDeviceSize offset;
    VkDeviceSize size;
} cvq_vulkan_region;

/* Recording mode. cmd is a primary command buffer in the recording state,
 * outside a render pass, from a pool of the context's queue family. Until
 * cvq_vulkan_end_recording, the cvq_vulkan_* calls below record into it
 * (with their own barriers: see docs/vulkan.md) instead of submitting.
 * The host API (commvq.h) keeps submitting on its own. */
CVQ_API cvq_status cvq_vulkan_begin_recording(cvq_context *ctx,
                                              VkCommandBuffer cmd);
CVQ_API cvq_status cvq_vulkan_end_recording(cvq_context *ctx);

/* Key codes as cvq_encode_keys writes them (uint16 [n][Hkv][R]), or, with
 * this flag, as the 12-bit records of the compressed cache
 * ([n][key_code_bytes] of cvq_record_layout), the layout
 * cvq_vulkan_attend reads. */
#define CVQ_VULKAN_CODES_PACKED12 1u

/* Device-resident encoding of n tokens of one layer.
 *   keys    fp32 [n][Hkv][d] before RoPE
 *   codes   uint16 [n][Hkv][R], or [n][key_code_bytes] with PACKED12
 *   scales  fp32 [n][key_scale_count]
 * Bit-identical to cvq_encode_keys. The input is checked on the device: a
 * NaN/Inf (or a sum of squares overflowing binary32) anywhere in it makes
 * the call write nothing to codes and scales, and yields
 * CVQ_ERR_NONFINITE_INPUT (CVQ_ERR_INPUT_RANGE): returned by an immediate
 * call, collected by cvq_vulkan_collect_status for a recorded one. */
CVQ_API cvq_status cvq_vulkan_encode_keys(cvq_context *ctx, const cvq_codebook *cb,
                                          uint32_t layer, cvq_vulkan_region keys,
                                          size_t n, cvq_vulkan_region codes,
                                          cvq_vulkan_region scales, uint32_t flags);
/*   values fp32 [n][Hkv][d]
 *   bits   uint8 [n][groups][Nc/8]  (the layout cvq_vulkan_attend reads)
 *   sigma  fp32 [n][groups]
 * Same checking and deferred errors as cvq_vulkan_encode_keys. */
CVQ_API cvq_status cvq_vulkan_encode_values(cvq_context *ctx, const cvq_codebook *cb,
                                            uint32_t layer, cvq_vulkan_region values,
                                            size_t n, cvq_vulkan_region bits,
                                            cvq_vulkan_region sigma);

/* Attention over device-resident segments: the compressed segment's
 * arrays are what the encoders above write (codes with
 * CVQ_VULKAN_CODES_PACKED12), the engine keeps sinks and window in full
 * precision. Positions are int32; the order of tokens within the three
 * segments is free, a query sees tokens at positions <= its own, one
 * softmax over all three (as cvq_cache_attend). A segment with n == 0 may
 * leave its regions empty. Inputs are the engine's: they are not checked
 * for NaN/Inf (a non-finite input gives a non-finite output). */
typedef struct cvq_vulkan_attend_desc {
    size_t n_q;
    cvq_vulkan_region queries;   /* fp32 [n_q][Hq][d]                       */
    cvq_vulkan_region q_pos;     /* int32 [n_q]                             */
    cvq_vulkan_region out;       /* fp32 [n_q][Hq][d]                       */
    uint32_t flags;              /* CVQ_ATTEND_QUERIES_ROTATED              */
    size_t n_sink;
    cvq_vulkan_region sink_k, sink_v; /* fp32 [n_sink][Hkv][d], keys before RoPE */
    cvq_vulkan_region sink_pos;  /* int32 [n_sink]                          */
    size_t n_comp;
    cvq_vulkan_region comp_codes;  /* [n_comp][key_code_bytes] 12-bit codes */
    cvq_vulkan_region comp_kscale; /* fp32 [n_comp][key_scale_count]        */
    cvq_vulkan_region comp_vbits;  /* [n_comp][value_bit_bytes]             */
    cvq_vulkan_region comp_vsigma; /* fp32 [n_comp][value_groups]           */
    cvq_vulkan_region comp_pos;    /* int32 [n_comp]                        */
    size_t n_win;
    cvq_vulkan_region win_k, win_v; /* fp32 [n_win][Hkv][d]                 */
    cvq_vulkan_region win_pos;     /* int32 [n_win]                         */
} cvq_vulkan_attend_desc;

CVQ_API cvq_status cvq_vulkan_attend(cvq_context *ctx, const cvq_codebook *cb,
                                     uint32_t layer, const cvq_vulkan_attend_desc *a);

/* Bits of the raw status word. */
#define CVQ_VULKAN_STATUS_NONFINITE 1u   /* NaN/Inf in an input            */
#define CVQ_VULKAN_STATUS_RANGE 2u       /* a sum of squares overflowed    */
#define CVQ_VULKAN_STATUS_LOOP_LIMIT 4u  /* the driver cut a kernel short  */

/* Call after the fence of every submission of work recorded since the last
 * collect, outside recording mode. Returns CVQ_OK when every recorded
 * encode call wrote its outputs; otherwise CVQ_ERR_NONFINITE_INPUT,
 * CVQ_ERR_INPUT_RANGE or CVQ_ERR_DEVICE (a loop limit), and the calls that
 * failed wrote nothing. *flags (may be NULL) gets the OR of the calls'
 * status words; *failed_calls (may be NULL) how many calls failed. Then
 * frees what recorded work held on to and starts over: the next collect
 * reports only calls recorded after this one. */
CVQ_API cvq_status cvq_vulkan_collect_status(cvq_context *ctx, uint32_t *flags,
                                             uint32_t *failed_calls);

#ifdef __cplusplus
}
#endif
#endif /* COMMVQ_VULKAN_H */
