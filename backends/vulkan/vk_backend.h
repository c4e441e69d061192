/*
 * Internal hooks of the Vulkan backend that tests may use (no Vulkan
 * headers needed). Defined by the backend when it is built, and by
 * vk_absent.c (answering "nothing") when it is not.
 *
 * Environment variables read by the backend:
 *   COMMVQ_VULKAN_LOADER=PATH  the loader library to dlopen instead of
 *                           libvulkan.so.1 (read once, with the instance).
 *   COMMVQ_VK_VALIDATION=1  enable VK_LAYER_KHRONOS_validation and a
 *                           VK_EXT_debug_utils messenger (read once, when
 *                           the process-wide instance is created); every
 *                           warning or error message is printed to stderr
 *                           and counted.
 *   COMMVQ_VK_STAGING=1     use device-local buffers with staging copies
 *                           even where the device offers host-visible
 *                           device memory.
 *   COMMVQ_VK_SCRATCH_BUDGET=N  (tests) scratch buffers of at most N bytes
 *                           (default 64 MiB): larger calls run in chunks.
 *   COMMVQ_VK_MAX_GROUPS=N  (tests) at most N workgroups per dispatch
 *                           (default the device's maxComputeWorkGroupCount).
 * The last three are read when a context is created.
 */
#ifndef CVQ_VK_BACKEND_H
#define CVQ_VK_BACKEND_H

#include <stdbool.h>
#include <stdint.h>

/* Validation warnings and errors reported so far in this process. */
uint64_t cvq_vk_validation_messages(void);
/* True when the validation layer is enabled on the process's instance
 * (false before an instance exists or when the layer is not installed). */
bool cvq_vk_validation_enabled(void);

#endif
