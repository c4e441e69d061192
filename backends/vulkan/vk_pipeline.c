/*
 * Kernels of the Vulkan backend: which embedded SPIR-V module each uses
 * (the float-controls variant of an encoder on devices that preserve fp32
 * denormals and round to nearest even), whether the device can run it (the
 * module's OpCapability list against the device's features), its
 * descriptor-set and pipeline layouts (bindings and push constants of
 * shaders/iface.h), and one pipeline per (kernel, specialization constants)
 * cached in the context.
 */
#define _POSIX_C_SOURCE 200809L
#include "vk_internal.h"
#include "vk_spirv.h"

#include <stdio.h>
#include <string.h>

static const struct {
    const char *name;
    uint32_t bindings; /* shaders/iface.h */
    bool has_fc;       /* built twice, with and without float controls */
} k_kernels[CVQ_VK_K_COUNT] = {
    [CVQ_VK_K_ENCODE_KEYS] = {"encode_keys", 7, true},
    [CVQ_VK_K_ENCODE_VALUES] = {"encode_values", 13, true},
    [CVQ_VK_K_PACK_U16] = {"pack_u16", 5, false},
    [CVQ_VK_K_PACK_BITS] = {"pack_bits", 5, false},
    [CVQ_VK_K_ATTEND] = {"attend", 19, false},
    [CVQ_VK_K_PACK_CODES12] = {"pack_codes12", 5, false},
};

const char *cvq_vk_kernel_name(cvq_vk_kernel_id k) { return k_kernels[k].name; }
uint32_t cvq_vk_kernel_bindings(cvq_vk_kernel_id k) { return k_kernels[k].bindings; }

static const cvq_vk_spirv *spirv_find(const char *name) {
    for (size_t i = 0; i < cvq_vk_spirv_count; i++)
        if (cvq_vk_spirv_table[i].name && strcmp(cvq_vk_spirv_table[i].name, name) == 0)
            return &cvq_vk_spirv_table[i];
    return NULL;
}

bool cvq_vk_fc_modules_present(void) {
    for (int k = 0; k < CVQ_VK_K_COUNT; k++) {
        if (!k_kernels[k].has_fc) continue;
        char name[64];
        snprintf(name, sizeof name, "%s_fc", k_kernels[k].name);
        const cvq_vk_spirv *sp = spirv_find(name);
        if (!sp || !sp->code) return false;
    }
    return true;
}

/* The module kernel k runs on this context: the "_fc" variant when the
 * context uses float controls and it compiled. *fc says which. */
static const cvq_vk_spirv *kernel_spirv(const cvq_vk *vk, cvq_vk_kernel_id k, bool *fc) {
    *fc = false;
    if (k_kernels[k].has_fc && vk->fc) {
        char name[64];
        snprintf(name, sizeof name, "%s_fc", k_kernels[k].name);
        const cvq_vk_spirv *s = spirv_find(name);
        if (s && s->code) {
            *fc = true;
            return s;
        }
    }
    return spirv_find(k_kernels[k].name);
}

/* SPIR-V capabilities (the numbers of the SPIR-V specification). */
enum {
    CAP_MATRIX = 0, CAP_SHADER = 1, CAP_FLOAT16 = 9, CAP_FLOAT64 = 10, CAP_INT64 = 11,
    CAP_INT16 = 22, CAP_INT8 = 39, CAP_GROUP_NON_UNIFORM = 61, CAP_GNU_QUAD = 68,
    CAP_STORAGE16 = 4433, CAP_STORAGE8 = 4448, CAP_DENORM_PRESERVE = 4464,
    CAP_SZ_INF_NAN_PRESERVE = 4466, CAP_ROUNDING_RTE = 4467, CAP_VULKAN_MEMORY_MODEL = 5345
};

/* NULL if the device has capability `cap`, else what it lacks. */
static const char *capability_missing(const cvq_vk *vk, uint32_t cap, bool fc) {
    const cvq_vk_caps *c = &vk->caps;
    switch (cap) {
    case CAP_MATRIX:
    case CAP_SHADER: return NULL;
    case CAP_FLOAT16: return c->shader_float16 ? NULL : "shaderFloat16";
    case CAP_FLOAT64: return c->shader_float64 ? NULL : "shaderFloat64";
    case CAP_INT64: return c->shader_int64 ? NULL : "shaderInt64";
    case CAP_INT16: return c->shader_int16 ? NULL : "shaderInt16";
    case CAP_INT8: return c->shader_int8 ? NULL : "shaderInt8";
    case CAP_STORAGE16: return c->storage16 ? NULL : "storageBuffer16BitAccess";
    case CAP_STORAGE8: return c->storage8 ? NULL : "storageBuffer8BitAccess";
    case CAP_DENORM_PRESERVE: return fc && c->denorm_preserve32 ? NULL : "shaderDenormPreserveFloat32";
    case CAP_ROUNDING_RTE: return fc && c->rte32 ? NULL : "shaderRoundingModeRTEFloat32";
    case CAP_SZ_INF_NAN_PRESERVE:
        return fc && c->szinp32 ? NULL : "shaderSignedZeroInfNanPreserveFloat32";
    default: break;
    }
    if (cap >= CAP_GROUP_NON_UNIFORM && cap <= CAP_GNU_QUAD) {
        /* Subgroup operations: Vulkan 1.1 devices all support the basic
         * class in compute; the others are optional. */
        return cap == CAP_GROUP_NON_UNIFORM ? NULL : "a subgroup operation class the kernels do not use";
    }
    return "a SPIR-V capability the backend does not enable";
}

cvq_status cvq_vk_kernel_check(cvq_vk *vk, cvq_vk_kernel_id k) {
    cvq_context *ctx = vk->ctx;
    bool fc;
    const cvq_vk_spirv *s = kernel_spirv(vk, k, &fc);
    const char *name = k_kernels[k].name;
    if (!s)
        return CVQ_FAIL(ctx, CVQ_ERR_UNSUPPORTED,
                        "the Vulkan kernel %s is missing: shaders/%s.comp was not in the source tree "
                        "when this library was built", name, name);
    if (!s->code)
        return CVQ_FAIL(ctx, CVQ_ERR_UNSUPPORTED,
                        "the Vulkan kernel %s is missing: shaders/%s.comp did not compile when this "
                        "library was built (see the build log)", name, name);
    /* Instructions start after the 5-word header; OpCapability = 17. */
    for (size_t i = 5; i < s->words;) {
        uint32_t w = s->code[i], len = w >> 16, op = w & 0xffffu;
        if (len == 0) break;
        if (op == 17 && len >= 2) {
            const char *miss = capability_missing(vk, s->code[i + 1], fc);
            if (miss)
                return CVQ_FAIL(ctx, CVQ_ERR_UNSUPPORTED,
                                "the Vulkan kernel %s needs SPIR-V capability %u, which %s (device %u, %s) "
                                "lacks: %s", name, s->code[i + 1], "this device", vk->index,
                                vk->caps.props.deviceName, miss);
        } else if (op != 17 && op != 11 /* OpExtInstImport */ && op != 10 /* OpExtension */) {
            break; /* capabilities come first */
        }
        i += len;
    }
    return CVQ_OK;
}

/* Module and layouts of kernel k, created on first use. */
static cvq_status kernel_objects(cvq_vk *vk, cvq_vk_kernel_id k) {
    cvq_vk_kernel *K = &vk->kernels[k];
    if (K->layout) return CVQ_OK;
    cvq_context *ctx = vk->ctx;
    cvq_status st = cvq_vk_kernel_check(vk, k);
    if (st) return st;
    bool fc;
    const cvq_vk_spirv *s = kernel_spirv(vk, k, &fc);

    VkShaderModuleCreateInfo mi;
    memset(&mi, 0, sizeof mi);
    mi.sType = VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO;
    mi.codeSize = s->words * sizeof(uint32_t);
    mi.pCode = s->code;
    VkResult r = vk->fn.CreateShaderModule(vk->dev, &mi, NULL, &K->module);
    if (r != VK_SUCCESS) {
        K->module = VK_NULL_HANDLE;
        return CVQ_VK_FAIL(ctx, r, "vkCreateShaderModule");
    }
    VkDescriptorSetLayoutBinding b[32];
    const uint32_t nb = k_kernels[k].bindings;
    for (uint32_t i = 0; i < nb; i++) {
        memset(&b[i], 0, sizeof b[i]);
        b[i].binding = i;
        b[i].descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
        b[i].descriptorCount = 1;
        b[i].stageFlags = VK_SHADER_STAGE_COMPUTE_BIT;
    }
    VkDescriptorSetLayoutCreateInfo di;
    memset(&di, 0, sizeof di);
    di.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO;
    di.bindingCount = nb;
    di.pBindings = b;
    r = vk->fn.CreateDescriptorSetLayout(vk->dev, &di, NULL, &K->dsl);
    if (r != VK_SUCCESS) {
        K->dsl = VK_NULL_HANDLE;
        st = CVQ_VK_FAIL(ctx, r, "vkCreateDescriptorSetLayout");
        goto fail;
    }
    VkPushConstantRange pr;
    pr.stageFlags = VK_SHADER_STAGE_COMPUTE_BIT;
    pr.offset = 0;
    pr.size = CVQ_VK_NEED_PUSH_BYTES;
    VkPipelineLayoutCreateInfo li;
    memset(&li, 0, sizeof li);
    li.sType = VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO;
    li.setLayoutCount = 1;
    li.pSetLayouts = &K->dsl;
    li.pushConstantRangeCount = 1;
    li.pPushConstantRanges = &pr;
    r = vk->fn.CreatePipelineLayout(vk->dev, &li, NULL, &K->layout);
    if (r != VK_SUCCESS) {
        K->layout = VK_NULL_HANDLE;
        st = CVQ_VK_FAIL(ctx, r, "vkCreatePipelineLayout");
        goto fail;
    }
    return CVQ_OK;
fail:
    if (K->dsl) vk->fn.DestroyDescriptorSetLayout(vk->dev, K->dsl, NULL);
    vk->fn.DestroyShaderModule(vk->dev, K->module, NULL);
    K->dsl = VK_NULL_HANDLE;
    K->module = VK_NULL_HANDLE;
    return st;
}

cvq_status cvq_vk_pipeline(cvq_vk *vk, cvq_vk_kernel_id k, const cvq_vk_spec *spec, VkPipeline *out) {
    *out = VK_NULL_HANDLE;
    for (size_t i = 0; i < vk->n_pipes; i++) {
        if (vk->pipes[i].kernel == k && memcmp(&vk->pipes[i].spec, spec, sizeof *spec) == 0) {
            *out = vk->pipes[i].pipeline;
            return CVQ_OK;
        }
    }
    cvq_context *ctx = vk->ctx;
    cvq_status st = kernel_objects(vk, k);
    if (st) return st;
    if (vk->n_pipes == vk->cap_pipes) {
        size_t cap = vk->cap_pipes ? 2 * vk->cap_pipes : 16;
        cvq_vk_pipe *np = cvq__calloc(&ctx->alloc, cap, sizeof *np);
        if (!np) return CVQ_FAIL(ctx, CVQ_ERR_OUT_OF_MEMORY, "pipeline cache of %zu entries", cap);
        if (vk->n_pipes) memcpy(np, vk->pipes, vk->n_pipes * sizeof *np);
        cvq__free(&ctx->alloc, vk->pipes);
        vk->pipes = np;
        vk->cap_pipes = cap;
    }
    VkSpecializationMapEntry me[CVQ_VK_N_SPEC];
    for (uint32_t i = 0; i < CVQ_VK_N_SPEC; i++) {
        me[i].constantID = i;
        me[i].offset = i * (uint32_t)sizeof(uint32_t);
        me[i].size = sizeof(uint32_t);
    }
    VkSpecializationInfo si;
    si.mapEntryCount = CVQ_VK_N_SPEC;
    si.pMapEntries = me;
    si.dataSize = sizeof spec->v;
    si.pData = spec->v;
    VkComputePipelineCreateInfo ci;
    memset(&ci, 0, sizeof ci);
    ci.sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO;
    ci.stage.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO;
    ci.stage.stage = VK_SHADER_STAGE_COMPUTE_BIT;
    ci.stage.module = vk->kernels[k].module;
    ci.stage.pName = "main";
    ci.stage.pSpecializationInfo = &si;
    ci.layout = vk->kernels[k].layout;
    VkPipeline p = VK_NULL_HANDLE;
    VkResult r = vk->fn.CreateComputePipelines(vk->dev, VK_NULL_HANDLE, 1, &ci, NULL, &p);
    if (r != VK_SUCCESS) {
        char what[96];
        snprintf(what, sizeof what, "vkCreateComputePipelines (%s)", k_kernels[k].name);
        return CVQ_VK_FAIL(ctx, r, what);
    }
    vk->pipes[vk->n_pipes].kernel = k;
    vk->pipes[vk->n_pipes].spec = *spec;
    vk->pipes[vk->n_pipes].pipeline = p;
    vk->n_pipes++;
    *out = p;
    return CVQ_OK;
}

void cvq_vk_pipelines_close(cvq_vk *vk) {
    for (size_t i = 0; i < vk->n_pipes; i++) vk->fn.DestroyPipeline(vk->dev, vk->pipes[i].pipeline, NULL);
    cvq__free(&vk->ctx->alloc, vk->pipes);
    vk->pipes = NULL;
    vk->n_pipes = vk->cap_pipes = 0;
    for (int k = 0; k < CVQ_VK_K_COUNT; k++) {
        cvq_vk_kernel *K = &vk->kernels[k];
        if (K->layout) vk->fn.DestroyPipelineLayout(vk->dev, K->layout, NULL);
        if (K->dsl) vk->fn.DestroyDescriptorSetLayout(vk->dev, K->dsl, NULL);
        if (K->module) vk->fn.DestroyShaderModule(vk->dev, K->module, NULL);
        memset(K, 0, sizeof *K);
    }
}

/* ---- bindings -------------------------------------------------------------------------- */

cvq_status cvq_vk_range_of(cvq_vk *vk, cvq_view v, cvq_vk_range *out) {
    const cvq_vk_buf *b = cvq_vk_buf_of(v.buf);
    if (!b || v.offset >= b->size) {
        /* An empty segment: bind a small dummy buffer (a binding must name
         * a valid buffer even when the kernel reads none of it). */
        cvq_status st = cvq_vk_scratch_reserve(vk, &vk->s_dummy, 256);
        if (st) return st;
        b = cvq_vk_buf_of(&vk->s_dummy.b);
        v.offset = 0;
    }
    const VkDeviceSize align = vk->caps.props.limits.minStorageBufferOffsetAlignment;
    if (align && v.offset % align)
        return CVQ_FAIL(vk->ctx, CVQ_ERR_UNSUPPORTED,
                        "a view at byte offset %zu is not aligned to minStorageBufferOffsetAlignment (%llu)",
                        v.offset, (unsigned long long)align);
    VkDeviceSize range = b->size - v.offset;
    const VkDeviceSize max = vk->caps.props.limits.maxStorageBufferRange;
    if (range > max) range = max & ~(VkDeviceSize)3;
    out->buf = b->buf;
    out->offset = v.offset;
    out->range = range;
    return CVQ_OK;
}

cvq_status cvq_vk_range_of_buf(cvq_vk *vk, const cvq_buffer *b, cvq_vk_range *out) {
    cvq_view v = {b, 0};
    return cvq_vk_range_of(vk, v, out);
}

cvq_status cvq_vk_descriptors(cvq_vk *vk, cvq_vk_kernel_id k, const cvq_vk_range *b, uint32_t n,
                              VkDescriptorSet *out) {
    cvq_context *ctx = vk->ctx;
    cvq_status st = kernel_objects(vk, k);
    if (st) return st;
    if (n != k_kernels[k].bindings || n > 32)
        return CVQ_FAIL(ctx, CVQ_ERR_INTERNAL, "kernel %s has %u bindings, %u given", k_kernels[k].name,
                        k_kernels[k].bindings, n);
    VkDescriptorSetAllocateInfo ai;
    memset(&ai, 0, sizeof ai);
    ai.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO;
    /* Work recorded into an engine's command buffer runs later: its sets
     * come from a pool kept until cvq_vulkan_collect_status. */
    const bool rec = vk->cur != VK_NULL_HANDLE && vk->cur == vk->rec;
    uint32_t *used = rec ? &vk->rec_sets_used : &vk->sets_used;
    ai.descriptorPool = rec ? vk->rec_pool : vk->desc_pool;
    ai.descriptorSetCount = 1;
    ai.pSetLayouts = &vk->kernels[k].dsl;
    if (*used >= CVQ_VK_MAX_SETS || !ai.descriptorPool)
        return CVQ_FAIL(ctx, CVQ_ERR_INTERNAL, "descriptor pool exhausted (%u sets)", CVQ_VK_MAX_SETS);
    VkResult r = vk->fn.AllocateDescriptorSets(vk->dev, &ai, out);
    if (r != VK_SUCCESS) return CVQ_VK_FAIL(ctx, r, "vkAllocateDescriptorSets");
    (*used)++;
    VkDescriptorBufferInfo bi[32];
    VkWriteDescriptorSet w[32];
    for (uint32_t i = 0; i < n; i++) {
        bi[i].buffer = b[i].buf;
        bi[i].offset = b[i].offset;
        bi[i].range = b[i].range;
        memset(&w[i], 0, sizeof w[i]);
        w[i].sType = VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET;
        w[i].dstSet = *out;
        w[i].dstBinding = i;
        w[i].descriptorCount = 1;
        w[i].descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
        w[i].pBufferInfo = &bi[i];
    }
    vk->fn.UpdateDescriptorSets(vk->dev, n, w, 0, NULL);
    return CVQ_OK;
}

void cvq_vk_cmd_bind(cvq_vk *vk, cvq_vk_kernel_id k, VkPipeline p, VkDescriptorSet set) {
    vk->fn.CmdBindPipeline(vk->cur, VK_PIPELINE_BIND_POINT_COMPUTE, p);
    vk->fn.CmdBindDescriptorSets(vk->cur, VK_PIPELINE_BIND_POINT_COMPUTE, vk->kernels[k].layout, 0, 1,
                                 &set, 0, NULL);
}

void cvq_vk_cmd_push(cvq_vk *vk, cvq_vk_kernel_id k, const void *data, uint32_t bytes) {
    vk->fn.CmdPushConstants(vk->cur, vk->kernels[k].layout, VK_SHADER_STAGE_COMPUTE_BIT, 0, bytes, data);
}
