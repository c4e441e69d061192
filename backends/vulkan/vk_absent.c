/*
 * Built instead of the Vulkan backend when it is not compiled in, so that
 * code using the test hooks of vk_backend.h links either way.
 */
#include "vk_backend.h"

uint64_t cvq_vk_validation_messages(void) { return 0; }
bool cvq_vk_validation_enabled(void) { return false; }
