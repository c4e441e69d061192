/*
 * Vulkan physical devices: what each can do (cvq_device_info), which one a
 * context gets, and the logical device with its one compute queue, command
 * buffer, fence and descriptor pool.
 */
#define _POSIX_C_SOURCE 200809L
#include "vk_internal.h"

#include <stdio.h>
#include <string.h>

/* Drivers on which the whole conformance suite (tests/test_conformance.c)
 * has been run and passed with this version of the kernels: their codes are
 * "tested equal" even without the float-controls guarantee. */
static bool driver_tested(const cvq_vk_caps *c) {
    /* driver name, and the start of its driverInfo (the version run) */
    static const struct {
        const char *name, *info;
    } k_tested[] = {
        /* lavapipe: the full suite, codes bit-identical, zero validation
         * messages (tests/test_conformance.c, vulkan:0) */
        {"llvmpipe", "Mesa 22.3"},
    };
    for (size_t i = 0; i < sizeof k_tested / sizeof k_tested[0]; i++)
        if (strcmp(c->driver_name, k_tested[i].name) == 0 &&
            strncmp(c->driver_info, k_tested[i].info, strlen(k_tested[i].info)) == 0)
            return true;
    return false;
}

void cvq_vk_caps_get(const cvq_vk_process *p, uint32_t index, cvq_vk_caps *c) {
    memset(c, 0, sizeof *c);
    c->queue_family = -1;
    VkPhysicalDevice pd = p->phys[index];
    p->fn.GetPhysicalDeviceProperties(pd, &c->props);
    p->fn.GetPhysicalDeviceMemoryProperties(pd, &c->mem);
    uint32_t api = c->props.apiVersion;
    if (api > p->instance_version) api = p->instance_version;
    c->api_version = api;
    c->max_alloc = (uint64_t)1 << 30; /* the guaranteed minimum when unknown */

    if (p->fn.GetPhysicalDeviceProperties2 && api >= VK_API_VERSION_1_2) {
        VkPhysicalDeviceDriverProperties drv;
        VkPhysicalDeviceFloatControlsProperties fc;
        VkPhysicalDeviceSubgroupProperties sg;
        VkPhysicalDeviceMaintenance3Properties m3;
        VkPhysicalDeviceProperties2 p2;
        memset(&drv, 0, sizeof drv);
        memset(&fc, 0, sizeof fc);
        memset(&sg, 0, sizeof sg);
        memset(&m3, 0, sizeof m3);
        memset(&p2, 0, sizeof p2);
        drv.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DRIVER_PROPERTIES;
        fc.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FLOAT_CONTROLS_PROPERTIES;
        sg.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES;
        m3.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_3_PROPERTIES;
        p2.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2;
        drv.pNext = &fc;
        fc.pNext = &sg;
        sg.pNext = &m3;
        p2.pNext = &drv;
        p->fn.GetPhysicalDeviceProperties2(pd, &p2);
        snprintf(c->driver_name, sizeof c->driver_name, "%s", drv.driverName);
        c->driver_id = (uint32_t)drv.driverID;
        snprintf(c->driver_info, sizeof c->driver_info, "%s", drv.driverInfo);
        c->denorm_preserve32 = fc.shaderDenormPreserveFloat32 == VK_TRUE;
        c->rte32 = fc.shaderRoundingModeRTEFloat32 == VK_TRUE;
        c->szinp32 = fc.shaderSignedZeroInfNanPreserveFloat32 == VK_TRUE;
        c->subgroup_size = sg.subgroupSize;
        if (m3.maxMemoryAllocationSize) c->max_alloc = m3.maxMemoryAllocationSize;

        VkPhysicalDeviceVulkan11Features f11;
        VkPhysicalDeviceVulkan12Features f12;
        VkPhysicalDeviceFeatures2 f2;
        memset(&f11, 0, sizeof f11);
        memset(&f12, 0, sizeof f12);
        memset(&f2, 0, sizeof f2);
        f11.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES;
        f12.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES;
        f2.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2;
        f2.pNext = &f11;
        f11.pNext = &f12;
        p->fn.GetPhysicalDeviceFeatures2(pd, &f2);
        c->shader_float64 = f2.features.shaderFloat64 == VK_TRUE;
        c->shader_int64 = f2.features.shaderInt64 == VK_TRUE;
        c->shader_int16 = f2.features.shaderInt16 == VK_TRUE;
        c->storage16 = f11.storageBuffer16BitAccess == VK_TRUE;
        c->storage8 = f12.storageBuffer8BitAccess == VK_TRUE;
        c->shader_int8 = f12.shaderInt8 == VK_TRUE;
        c->shader_float16 = f12.shaderFloat16 == VK_TRUE;
    }

    uint32_t nq = 0;
    p->fn.GetPhysicalDeviceQueueFamilyProperties(pd, &nq, NULL);
    VkQueueFamilyProperties qf[32];
    if (nq > 32) nq = 32;
    p->fn.GetPhysicalDeviceQueueFamilyProperties(pd, &nq, qf);
    /* Prefer a compute-only family (async compute), else any with compute. */
    for (uint32_t i = 0; i < nq && c->queue_family < 0; i++)
        if ((qf[i].queueFlags & VK_QUEUE_COMPUTE_BIT) && !(qf[i].queueFlags & VK_QUEUE_GRAPHICS_BIT) &&
            qf[i].queueCount > 0)
            c->queue_family = (int)i;
    for (uint32_t i = 0; i < nq && c->queue_family < 0; i++)
        if ((qf[i].queueFlags & VK_QUEUE_COMPUTE_BIT) && qf[i].queueCount > 0) c->queue_family = (int)i;

    /* Mesa's llvmpipe (lavapipe) ends every loop of a shader invocation
     * once the invocation has run 65535 loop iterations in total (gallivm's
     * LP_MAX_TGSI_LOOP_ITERATIONS, a hang guard) and carries on with wrong
     * results. The ops size their workgroups to stay under it, or refuse
     * (vk_ops.c). Older Mesa without driver properties: recognised by the
     * device name. */
    if (c->driver_id == VK_DRIVER_ID_MESA_LLVMPIPE || strncmp(c->props.deviceName, "llvmpipe", 8) == 0)
        c->loop_budget = 65535;

    /* Usability: everything the kernels rely on. */
    const VkPhysicalDeviceLimits *L = &c->props.limits;
    char *note = c->note;
    size_t cap = sizeof c->note, used = 0;
#define NOTE(...)                                                                       \
    do {                                                                                \
        if (used < cap) {                                                               \
            int w_ = snprintf(note + used, cap - used, "%s", used ? "; " : "");         \
            if (w_ > 0) used += (size_t)w_;                                             \
            if (used < cap) {                                                           \
                w_ = snprintf(note + used, cap - used, __VA_ARGS__);                    \
                if (w_ > 0) used += (size_t)w_;                                         \
            }                                                                           \
        }                                                                               \
    } while (0)
    bool ok = true;
    if (api < VK_API_VERSION_1_2) {
        NOTE("Vulkan %u.%u < 1.2", VK_API_VERSION_MAJOR(api), VK_API_VERSION_MINOR(api));
        ok = false;
    }
    if (c->queue_family < 0) {
        NOTE("no compute queue");
        ok = false;
    }
    if (L->maxPerStageDescriptorStorageBuffers < CVQ_VK_NEED_STORAGE_BUFFERS) {
        NOTE("maxPerStageDescriptorStorageBuffers %u < %u", L->maxPerStageDescriptorStorageBuffers,
             CVQ_VK_NEED_STORAGE_BUFFERS);
        ok = false;
    }
    if (L->maxComputeWorkGroupSize[0] < CVQ_VK_NEED_WG_SIZE ||
        L->maxComputeWorkGroupInvocations < CVQ_VK_NEED_WG_SIZE) {
        NOTE("max workgroup size %u < %u", L->maxComputeWorkGroupSize[0], CVQ_VK_NEED_WG_SIZE);
        ok = false;
    }
    if (L->maxPushConstantsSize < CVQ_VK_NEED_PUSH_BYTES) {
        NOTE("maxPushConstantsSize %u < %u", L->maxPushConstantsSize, CVQ_VK_NEED_PUSH_BYTES);
        ok = false;
    }
    c->usable = ok;
    if (ok && !cvq_vk_float_controls(c)) {
        char lack[96] = "";
        const char *names[3] = {c->denorm_preserve32 ? NULL : "denorm-preserve", c->rte32 ? NULL : "RTE",
                                c->szinp32 ? NULL : "signed-zero/Inf/NaN-preserve"};
        for (int i = 0; i < 3; i++) {
            if (!names[i]) continue;
            size_t l = strlen(lack);
            snprintf(lack + l, sizeof lack - l, "%s%s", l ? ", " : "", names[i]);
        }
        if (driver_tested(c))
            NOTE("no fp32 float controls (%s); codes tested bit-identical to the CPU reference on this "
                 "driver version (conformance suite)", lack);
        else
            NOTE("no fp32 float controls (%s): codes not guaranteed bit-exact", lack);
    }
#undef NOTE
}

static cvq_device_type type_of(VkPhysicalDeviceType t) {
    switch (t) {
    case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: return CVQ_DEVICE_DISCRETE_GPU;
    case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: return CVQ_DEVICE_INTEGRATED_GPU;
    case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: return CVQ_DEVICE_VIRTUAL_GPU;
    case VK_PHYSICAL_DEVICE_TYPE_CPU: return CVQ_DEVICE_SOFTWARE;
    default: return CVQ_DEVICE_OTHER;
    }
}

static uint64_t device_local_bytes(const VkPhysicalDeviceMemoryProperties *m) {
    uint64_t best = 0;
    for (uint32_t i = 0; i < m->memoryHeapCount; i++)
        if ((m->memoryHeaps[i].flags & VK_MEMORY_HEAP_DEVICE_LOCAL_BIT) && m->memoryHeaps[i].size > best)
            best = m->memoryHeaps[i].size;
    return best;
}

/* Copies src into dst[cap], truncating (device strings may be longer than
 * the public fields). */
static void copy_trunc(char *dst, size_t cap, const char *src) {
    size_t n = strlen(src);
    if (n >= cap) n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = 0;
}

void cvq_vk_device_info(const cvq_vk_process *p, uint32_t index, cvq_device_info *info) {
    cvq_vk_caps c;
    cvq_vk_caps_get(p, index, &c);
    memset(info, 0, sizeof *info);
    info->backend = CVQ_BACKEND_VULKAN;
    info->index = index;
    info->type = type_of(c.props.deviceType);
    copy_trunc(info->name, sizeof info->name, c.props.deviceName);
    const uint32_t v = c.props.apiVersion;
    char drv[VK_MAX_DRIVER_NAME_SIZE + VK_MAX_DRIVER_INFO_SIZE + 64];
    if (c.driver_name[0])
        snprintf(drv, sizeof drv, "%s %s, Vulkan %u.%u.%u", c.driver_name, c.driver_info,
                 VK_API_VERSION_MAJOR(v), VK_API_VERSION_MINOR(v), VK_API_VERSION_PATCH(v));
    else
        snprintf(drv, sizeof drv, "driver 0x%x, Vulkan %u.%u.%u", c.props.driverVersion,
                 VK_API_VERSION_MAJOR(v), VK_API_VERSION_MINOR(v), VK_API_VERSION_PATCH(v));
    copy_trunc(info->driver, sizeof info->driver, drv);
    info->memory_bytes = device_local_bytes(&c.mem);
    info->max_buffer_bytes = c.props.limits.maxStorageBufferRange;
    info->shared_memory_bytes = c.props.limits.maxComputeSharedMemorySize;
    info->subgroup_size = c.subgroup_size;
    info->compute_units = 0; /* Vulkan core does not say */
    if (cvq_vk_float_controls(&c) && cvq_vk_fc_modules_present())
        info->exactness = CVQ_EXACT_GUARANTEED;
    else if (driver_tested(&c))
        info->exactness = CVQ_EXACT_TESTED;
    else
        info->exactness = CVQ_EXACT_NOT_GUARANTEED;
    info->usable = c.usable;
    copy_trunc(info->note, sizeof info->note, c.note);
}

static int rank_of(cvq_device_type t) {
    switch (t) {
    case CVQ_DEVICE_DISCRETE_GPU: return 0;
    case CVQ_DEVICE_INTEGRATED_GPU: return 1;
    case CVQ_DEVICE_VIRTUAL_GPU: return 2;
    case CVQ_DEVICE_OTHER: return 3;
    default: return 4; /* software (CPU) last */
    }
}

int cvq_vk_best_device(const cvq_vk_process *p) {
    int best = -1, best_rank = 1000;
    for (uint32_t i = 0; p->status == CVQ_OK && i < p->n_phys; i++) {
        cvq_vk_caps c;
        cvq_vk_caps_get(p, i, &c);
        if (!c.usable) continue;
        int r = rank_of(type_of(c.props.deviceType));
        if (r < best_rank) {
            best_rank = r;
            best = (int)i;
        }
    }
    return best;
}

/* ---- logical device ------------------------------------------------------------------ */

static cvq_status objects_create(cvq_vk *vk);

cvq_status cvq_vk_device_open(cvq_vk *vk, int index) {
    cvq_context *ctx = vk->ctx;
    const cvq_vk_process *p = vk->proc;
    if (index < 0) {
        index = cvq_vk_best_device(p);
        if (index < 0) return CVQ_FAIL(ctx, CVQ_ERR_NO_DEVICE, "no usable Vulkan device");
    }
    if ((uint32_t)index >= p->n_phys)
        return CVQ_FAIL(ctx, CVQ_ERR_NO_DEVICE, "Vulkan device %d does not exist (%u devices)", index,
                        p->n_phys);
    vk->index = (uint32_t)index;
    vk->phys = p->phys[index];
    cvq_vk_caps_get(p, vk->index, &vk->caps);
    const cvq_vk_caps *c = &vk->caps;
    if (!c->usable)
        return CVQ_FAIL(ctx, CVQ_ERR_NO_DEVICE, "Vulkan device %d (%s) is not usable: %s", index,
                        c->props.deviceName, c->note);

    /* Enable every optional feature the device has that a kernel module may
     * declare (vk_pipeline.c checks each module against these). */
    VkPhysicalDeviceVulkan11Features f11;
    VkPhysicalDeviceVulkan12Features f12;
    VkPhysicalDeviceFeatures2 f2;
    memset(&f11, 0, sizeof f11);
    memset(&f12, 0, sizeof f12);
    memset(&f2, 0, sizeof f2);
    f11.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES;
    f12.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES;
    f2.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2;
    f2.pNext = &f11;
    f11.pNext = &f12;
    f2.features.shaderFloat64 = c->shader_float64;
    f2.features.shaderInt64 = c->shader_int64;
    f2.features.shaderInt16 = c->shader_int16;
    f11.storageBuffer16BitAccess = c->storage16;
    f12.storageBuffer8BitAccess = c->storage8;
    f12.shaderInt8 = c->shader_int8;
    f12.shaderFloat16 = c->shader_float16;

    float prio = 1.0f;
    VkDeviceQueueCreateInfo qci;
    memset(&qci, 0, sizeof qci);
    qci.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO;
    qci.queueFamilyIndex = (uint32_t)c->queue_family;
    qci.queueCount = 1;
    qci.pQueuePriorities = &prio;
    /* A portability (layered) implementation must get its subset extension
     * enabled. */
    const char *exts[1];
    uint32_t n_ext = 0;
    uint32_t n_avail = 0;
    if (p->fn.EnumerateDeviceExtensionProperties(vk->phys, NULL, &n_avail, NULL) == VK_SUCCESS && n_avail) {
        VkExtensionProperties *avail = cvq__calloc(&ctx->alloc, n_avail, sizeof *avail);
        if (!avail) return CVQ_FAIL(ctx, CVQ_ERR_OUT_OF_MEMORY, "device extension list (%u)", n_avail);
        VkResult er = p->fn.EnumerateDeviceExtensionProperties(vk->phys, NULL, &n_avail, avail);
        for (uint32_t i = 0; (er == VK_SUCCESS || er == VK_INCOMPLETE) && i < n_avail; i++)
            if (n_ext == 0 && strcmp(avail[i].extensionName, "VK_KHR_portability_subset") == 0)
                exts[n_ext++] = "VK_KHR_portability_subset";
        cvq__free(&ctx->alloc, avail);
    }
    VkDeviceCreateInfo dci;
    memset(&dci, 0, sizeof dci);
    dci.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO;
    dci.pNext = &f2;
    dci.queueCreateInfoCount = 1;
    dci.pQueueCreateInfos = &qci;
    dci.enabledExtensionCount = n_ext;
    dci.ppEnabledExtensionNames = n_ext ? exts : NULL;
    VkResult r = p->fn.CreateDevice(vk->phys, &dci, NULL, &vk->dev);
    if (r != VK_SUCCESS) {
        vk->dev = VK_NULL_HANDLE;
        return CVQ_VK_FAIL(ctx, r, "vkCreateDevice");
    }
    const char *missing = NULL;
#define CVQ_VK_X(n)                                                                     \
    vk->fn.n = (PFN_vk##n)p->fn.GetDeviceProcAddr(vk->dev, "vk" #n);                    \
    if (!vk->fn.n && !missing) missing = "vk" #n;
    CVQ_VK_DEVICE_FNS(CVQ_VK_X)
#undef CVQ_VK_X
    if (missing) {
        /* DestroyDevice itself may be the missing one. */
        PFN_vkDestroyDevice dd = (PFN_vkDestroyDevice)p->fn.GetDeviceProcAddr(vk->dev, "vkDestroyDevice");
        if (dd) dd(vk->dev, NULL);
        vk->dev = VK_NULL_HANDLE;
        return CVQ_FAIL(ctx, CVQ_ERR_DEVICE, "Vulkan device %d lacks %s", index, missing);
    }
    vk->fn.GetDeviceQueue(vk->dev, (uint32_t)c->queue_family, 0, &vk->queue);
    return objects_create(vk);
}

cvq_status cvq_vk_pool_create(cvq_vk *vk, VkDescriptorPool *out) {
    /* The sets of one command buffer: an op takes one or two per chunk of
     * its work (vk_ops.c) and submits early (or, recording, starts another
     * pool) when the pool runs out. */
    VkDescriptorPoolSize ps;
    ps.type = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
    ps.descriptorCount = CVQ_VK_MAX_SETS * CVQ_VK_NEED_STORAGE_BUFFERS;
    VkDescriptorPoolCreateInfo dpi;
    memset(&dpi, 0, sizeof dpi);
    dpi.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO;
    dpi.maxSets = CVQ_VK_MAX_SETS;
    dpi.poolSizeCount = 1;
    dpi.pPoolSizes = &ps;
    VkResult r = vk->fn.CreateDescriptorPool(vk->dev, &dpi, NULL, out);
    if (r != VK_SUCCESS) {
        *out = VK_NULL_HANDLE;
        return CVQ_VK_FAIL(vk->ctx, r, "vkCreateDescriptorPool");
    }
    return CVQ_OK;
}

/* The context's own objects on vk->dev: command pool and buffer, fence,
 * descriptor pool. On failure everything is released (the device too,
 * when the context owns it). */
static cvq_status objects_create(cvq_vk *vk) {
    cvq_context *ctx = vk->ctx;
    const cvq_vk_caps *c = &vk->caps;
    VkResult r;
    cvq_status st = CVQ_OK;
    VkCommandPoolCreateInfo pci;
    memset(&pci, 0, sizeof pci);
    pci.sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO;
    pci.flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT;
    pci.queueFamilyIndex = (uint32_t)c->queue_family;
    r = vk->fn.CreateCommandPool(vk->dev, &pci, NULL, &vk->cmd_pool);
    if (r != VK_SUCCESS) {
        vk->cmd_pool = VK_NULL_HANDLE;
        st = CVQ_VK_FAIL(ctx, r, "vkCreateCommandPool");
        goto fail;
    }
    VkCommandBufferAllocateInfo cai;
    memset(&cai, 0, sizeof cai);
    cai.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO;
    cai.commandPool = vk->cmd_pool;
    cai.level = VK_COMMAND_BUFFER_LEVEL_PRIMARY;
    cai.commandBufferCount = 1;
    r = vk->fn.AllocateCommandBuffers(vk->dev, &cai, &vk->cmd);
    if (r != VK_SUCCESS) {
        vk->cmd = VK_NULL_HANDLE;
        st = CVQ_VK_FAIL(ctx, r, "vkAllocateCommandBuffers");
        goto fail;
    }
    VkFenceCreateInfo fci;
    memset(&fci, 0, sizeof fci);
    fci.sType = VK_STRUCTURE_TYPE_FENCE_CREATE_INFO;
    r = vk->fn.CreateFence(vk->dev, &fci, NULL, &vk->fence);
    if (r != VK_SUCCESS) {
        vk->fence = VK_NULL_HANDLE;
        st = CVQ_VK_FAIL(ctx, r, "vkCreateFence");
        goto fail;
    }
    if ((st = cvq_vk_pool_create(vk, &vk->desc_pool))) goto fail;
    return CVQ_OK;
fail:
    cvq_vk_device_close(vk);
    return st;
}

void cvq_vk_device_close(cvq_vk *vk) {
    if (!vk->dev) return;
    if (vk->rec_pool) vk->fn.DestroyDescriptorPool(vk->dev, vk->rec_pool, NULL);
    if (vk->desc_pool) vk->fn.DestroyDescriptorPool(vk->dev, vk->desc_pool, NULL);
    if (vk->fence) vk->fn.DestroyFence(vk->dev, vk->fence, NULL);
    if (vk->cmd_pool) vk->fn.DestroyCommandPool(vk->dev, vk->cmd_pool, NULL);
    /* An engine's device is the engine's to destroy. */
    if (!vk->external) vk->fn.DestroyDevice(vk->dev, NULL);
    vk->rec_pool = VK_NULL_HANDLE;
    vk->desc_pool = VK_NULL_HANDLE;
    vk->fence = VK_NULL_HANDLE;
    vk->cmd_pool = VK_NULL_HANDLE;
    vk->cmd = VK_NULL_HANDLE;
    vk->dev = VK_NULL_HANDLE;
}

/* ---- an engine's device (include/commvq_vulkan.h) ------------------------------------- */

/* Keeps of the device's optional features those the engine enabled (a
 * module may only use what the VkDevice was created with). */
static void apply_enabled(cvq_vk_caps *c, const VkPhysicalDeviceFeatures2 *f) {
    bool f64 = false, i64 = false, i16 = false, s16 = false, s8 = false, i8 = false, h16 = false;
    if (f && f->sType == VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2) {
        f64 = f->features.shaderFloat64 == VK_TRUE;
        i64 = f->features.shaderInt64 == VK_TRUE;
        i16 = f->features.shaderInt16 == VK_TRUE;
        for (const VkBaseInStructure *b = f->pNext; b; b = b->pNext) {
            switch (b->sType) {
            case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES:
                s16 = s16 || ((const VkPhysicalDeviceVulkan11Features *)(const void *)b)->storageBuffer16BitAccess;
                break;
            case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES: {
                const VkPhysicalDeviceVulkan12Features *v = (const void *)b;
                s8 = s8 || v->storageBuffer8BitAccess;
                i8 = i8 || v->shaderInt8;
                h16 = h16 || v->shaderFloat16;
                break;
            }
            case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_16BIT_STORAGE_FEATURES:
                s16 = s16 || ((const VkPhysicalDevice16BitStorageFeatures *)(const void *)b)->storageBuffer16BitAccess;
                break;
            case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_8BIT_STORAGE_FEATURES:
                s8 = s8 || ((const VkPhysicalDevice8BitStorageFeatures *)(const void *)b)->storageBuffer8BitAccess;
                break;
            case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES: {
                const VkPhysicalDeviceShaderFloat16Int8Features *v = (const void *)b;
                i8 = i8 || v->shaderInt8;
                h16 = h16 || v->shaderFloat16;
                break;
            }
            default: break;
            }
        }
    }
    c->shader_float64 = c->shader_float64 && f64;
    c->shader_int64 = c->shader_int64 && i64;
    c->shader_int16 = c->shader_int16 && i16;
    c->storage16 = c->storage16 && s16;
    c->storage8 = c->storage8 && s8;
    c->shader_int8 = c->shader_int8 && i8;
    c->shader_float16 = c->shader_float16 && h16;
}

cvq_status cvq_vk_device_adopt(cvq_vk *vk, const cvq_vulkan_device_desc *d) {
    cvq_context *ctx = vk->ctx;
    cvq_vk_process *p = &vk->ext_proc;
    memset(p, 0, sizeof *p);
    vk->external = true;
    PFN_vkGetInstanceProcAddr gipa = d->get_instance_proc_addr;
    p->instance = d->instance;
    p->instance_version = d->api_version ? d->api_version : VK_API_VERSION_1_2;
    const char *missing = NULL;
#define CVQ_VK_X(n)                                                          \
    p->fn.n = (PFN_vk##n)gipa(d->instance, "vk" #n);                         \
    if (!p->fn.n && !missing) missing = "vk" #n;
    CVQ_VK_INSTANCE_FNS(CVQ_VK_X)
#undef CVQ_VK_X
    p->fn.GetPhysicalDeviceProperties2 =
        (PFN_vkGetPhysicalDeviceProperties2)gipa(d->instance, "vkGetPhysicalDeviceProperties2");
    p->fn.GetPhysicalDeviceFeatures2 =
        (PFN_vkGetPhysicalDeviceFeatures2)gipa(d->instance, "vkGetPhysicalDeviceFeatures2");
    if (!missing && !p->fn.GetPhysicalDeviceProperties2) missing = "vkGetPhysicalDeviceProperties2";
    if (!missing && !p->fn.GetPhysicalDeviceFeatures2) missing = "vkGetPhysicalDeviceFeatures2";
    if (missing)
        return CVQ_FAIL(ctx, CVQ_ERR_INVALID_ARGUMENT,
                        "the engine's vkGetInstanceProcAddr gives no %s for its instance", missing);
    p->n_phys = 1;
    p->phys[0] = d->physical_device;
    p->status = CVQ_OK;
    vk->proc = p;
    vk->index = 0;
    vk->phys = d->physical_device;
    cvq_vk_caps_get(p, 0, &vk->caps);
    cvq_vk_caps *c = &vk->caps;

    uint32_t nq = 0;
    p->fn.GetPhysicalDeviceQueueFamilyProperties(vk->phys, &nq, NULL);
    VkQueueFamilyProperties qf[32];
    if (nq > 32) nq = 32;
    p->fn.GetPhysicalDeviceQueueFamilyProperties(vk->phys, &nq, qf);
    if (d->queue_family_index >= nq || !(qf[d->queue_family_index].queueFlags & VK_QUEUE_COMPUTE_BIT))
        return CVQ_FAIL(ctx, CVQ_ERR_INVALID_ARGUMENT,
                        "queue family %u of the engine's device (%s) %s", d->queue_family_index,
                        c->props.deviceName, d->queue_family_index >= nq ? "does not exist" : "has no compute");
    c->queue_family = (int)d->queue_family_index;
    if (!c->usable)
        return CVQ_FAIL(ctx, CVQ_ERR_NO_DEVICE, "the engine's Vulkan device (%s) is not usable: %s",
                        c->props.deviceName, c->note);
    apply_enabled(c, d->enabled_features);

    vk->dev = d->device;
    PFN_vkGetDeviceProcAddr gdpa = p->fn.GetDeviceProcAddr;
#define CVQ_VK_X(n)                                                          \
    vk->fn.n = (PFN_vk##n)gdpa(vk->dev, "vk" #n);                            \
    if (!vk->fn.n && !missing) missing = "vk" #n;
    CVQ_VK_DEVICE_FNS(CVQ_VK_X)
#undef CVQ_VK_X
    if (missing) {
        vk->dev = VK_NULL_HANDLE; /* nothing of ours exists on it yet */
        return CVQ_FAIL(ctx, CVQ_ERR_INVALID_ARGUMENT, "the engine's device gives no %s", missing);
    }
    vk->queue = d->queue;
    return objects_create(vk);
}
