/*
 * The SPIR-V modules compiled from shaders/NAME.comp at build time and
 * embedded by cmake/embed_spirv.cmake (the generated vk_spirv_data.c).
 * Names are the shader file names without ".comp"; the encoders also have
 * a "<name>_fc" variant compiled with -DCVQ_FLOAT_CONTROLS=1 (denormals
 * preserved and round-to-nearest-even execution modes). A shader that was
 * in the tree but did not compile has an entry with code == NULL; one that
 * was not in the tree has no entry.
 */
#ifndef CVQ_VK_SPIRV_H
#define CVQ_VK_SPIRV_H

#include <stddef.h>
#include <stdint.h>

typedef struct cvq_vk_spirv {
    const char *name;
    const uint32_t *code; /* NULL: failed to compile at build time */
    size_t words;
} cvq_vk_spirv;

extern const cvq_vk_spirv cvq_vk_spirv_table[];
extern const size_t cvq_vk_spirv_count;

#endif
