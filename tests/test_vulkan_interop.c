/*
 * Engine interop of the Vulkan backend (include/commvq_vulkan.h), the way
 * an engine uses it: this test is the engine. It opens the Vulkan loader
 * itself (dlopen), creates its OWN instance (with the Khronos validation
 * layer and a messenger that counts every warning and error when
 * COMMVQ_VK_VALIDATION is set, as ctest does), device, compute queue,
 * command pool, fence and host-visible buffers, hands them to
 * cvq_vulkan_context_create, records the library's work into its own
 * command buffer, submits it, waits on its fence and collects the status.
 *
 *  - encoders: codes (uint16 and 12-bit records), scales, value bits and
 *    sigma bit-identical to the CPU reference context (cpu_reference = 1)
 *    on two geometries (odd record sizes, both scale modes and pair
 *    layouts), recorded and immediate, one chunk and many (a small scratch
 *    budget), with guard bytes around every output region;
 *  - attention over device-resident sinks, compressed tokens (encoded on
 *    the device in the same command buffer) and window: within a tolerance
 *    of a CPU-reference cache holding the same tokens;
 *  - the deferred-error path: NaN / Inf / an overflowing sum of squares in
 *    device input writes nothing at all (guard pattern intact everywhere,
 *    also in other chunks and for other tokens' scales), collect_status
 *    reports CVQ_ERR_NONFINITE_INPUT (CVQ_ERR_INPUT_RANGE) and how many
 *    calls failed, clean calls of the same command buffer are written, and
 *    the next collect is clean;
 *  - refused arguments: misaligned, short, missing and overlapping
 *    regions, unknown flags, recording misuse, bad device descriptions,
 *    non-interop contexts; nothing written by any of them;
 *  - the host API on an interop context (same codes as the CPU);
 *  - every host allocation of an interop session failed in turn:
 *    CVQ_ERR_OUT_OF_MEMORY, no host leak, and no Vulkan object left on the
 *    engine's device (the validation layer reports those when the engine
 *    destroys it at the end).
 *
 * Without headers, loader or a Vulkan 1.2 device with a compute queue every
 * test is skipped, visibly ("skip: <reason>" and cmocka's skipped status).
 */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commvq.h"

#if defined(__has_include)
#if __has_include(<vulkan/vulkan.h>)
#define HAVE_VK_HEADERS 1
#endif
#endif

#ifndef HAVE_VK_HEADERS

static void test_no_headers(void **state) {
    (void)state;
    printf("skip: the Vulkan headers were not available when this test was built\n");
    skip();
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_no_headers)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}

#else

#define VK_NO_PROTOTYPES
#include <vulkan/vulkan.h>

#include <dlfcn.h>

#include "commvq_vulkan.h"
#include "vulkan/vk_backend.h"

/* ---- the "engine" --------------------------------------------------------------------- */

#define ENGINE_DEVICE_FNS(X)                                                                     \
    X(DestroyDevice) X(GetDeviceQueue) X(DeviceWaitIdle) X(QueueSubmit) X(CreateBuffer)           \
    X(DestroyBuffer) X(GetBufferMemoryRequirements) X(AllocateMemory) X(FreeMemory)               \
    X(BindBufferMemory) X(MapMemory) X(CreateCommandPool) X(DestroyCommandPool)                   \
    X(AllocateCommandBuffers) X(ResetCommandBuffer) X(BeginCommandBuffer) X(EndCommandBuffer)     \
    X(CmdPipelineBarrier) X(CreateFence) X(DestroyFence) X(ResetFences) X(WaitForFences)

typedef struct engine {
    bool ok;
    char why[256];
    void *lib;
    PFN_vkGetInstanceProcAddr gipa;
    VkInstance instance;
    VkDebugUtilsMessengerEXT messenger;
    PFN_vkDestroyDebugUtilsMessengerEXT destroy_messenger;
    PFN_vkDestroyInstance destroy_instance;
    VkPhysicalDevice phys;
    VkPhysicalDeviceProperties props;
    VkPhysicalDeviceMemoryProperties mem;
    uint32_t family;
    VkDevice dev;
    VkQueue queue;
    VkPhysicalDeviceFeatures2 features; /* what the device was created with */
#define X(n) PFN_vk##n n;
    ENGINE_DEVICE_FNS(X)
#undef X
    VkCommandPool pool;
    VkCommandBuffer cmd;
    VkFence fence;
    /* one host-visible, coherent storage buffer that the tests carve into
     * regions */
    VkBuffer buf;
    VkDeviceMemory bmem;
    unsigned char *map;
    VkDeviceSize size;
    VkDeviceSize align;
} engine;

static engine E;
static unsigned long g_messages; /* validation warnings and errors */

static VKAPI_ATTR VkBool32 VKAPI_CALL on_message(VkDebugUtilsMessageSeverityFlagBitsEXT severity,
                                                 VkDebugUtilsMessageTypeFlagsEXT types,
                                                 const VkDebugUtilsMessengerCallbackDataEXT *data, void *user) {
    (void)types;
    (void)user;
    if (severity & (VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT)) {
        g_messages++;
        fprintf(stderr, "test_vulkan_interop: validation %s: %s\n",
                (severity & VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT) ? "error" : "warning",
                data && data->pMessage ? data->pMessage : "(none)");
    }
    return VK_FALSE;
}

static bool env_on(const char *name) {
    const char *v = getenv(name);
    return v && v[0] && strcmp(v, "0") != 0;
}

static int engine_fail(const char *why) {
    snprintf(E.why, sizeof E.why, "%s", why);
    return 0;
}

#define BUF_BYTES ((VkDeviceSize)8 << 20)

/* Creates the engine's instance, device, queue, pool, fence and buffer;
 * 0 (E.ok false, E.why) when this machine cannot. */
static int engine_open(void) {
    memset(&E, 0, sizeof E);
    E.lib = dlopen("libvulkan.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!E.lib) return engine_fail("no Vulkan loader (libvulkan.so.1 not found)");
    void *sym = dlsym(E.lib, "vkGetInstanceProcAddr");
    if (!sym) return engine_fail("the loader has no vkGetInstanceProcAddr");
    memcpy(&E.gipa, &sym, sizeof E.gipa);
    PFN_vkCreateInstance ci = (PFN_vkCreateInstance)E.gipa(NULL, "vkCreateInstance");
    PFN_vkEnumerateInstanceVersion eiv = (PFN_vkEnumerateInstanceVersion)E.gipa(NULL, "vkEnumerateInstanceVersion");
    PFN_vkEnumerateInstanceLayerProperties eilp =
        (PFN_vkEnumerateInstanceLayerProperties)E.gipa(NULL, "vkEnumerateInstanceLayerProperties");
    uint32_t lv = VK_API_VERSION_1_0;
    if (!ci || !eiv || eiv(&lv) != VK_SUCCESS || lv < VK_API_VERSION_1_2)
        return engine_fail("no Vulkan 1.2 loader");

    const char *layers[1], *exts[1];
    uint32_t n_layers = 0, n_exts = 0;
    if (env_on("COMMVQ_VK_VALIDATION")) {
        static VkLayerProperties lp[128];
        uint32_t n = 128;
        bool found = false;
        VkResult r = eilp ? eilp(&n, lp) : VK_ERROR_INITIALIZATION_FAILED;
        for (uint32_t i = 0; (r == VK_SUCCESS || r == VK_INCOMPLETE) && i < n; i++)
            if (strcmp(lp[i].layerName, "VK_LAYER_KHRONOS_validation") == 0) found = true;
        if (found) {
            layers[n_layers++] = "VK_LAYER_KHRONOS_validation";
            exts[n_exts++] = VK_EXT_DEBUG_UTILS_EXTENSION_NAME;
        } else {
            printf("note: COMMVQ_VK_VALIDATION is set but VK_LAYER_KHRONOS_validation is not installed\n");
        }
    }
    VkApplicationInfo app;
    memset(&app, 0, sizeof app);
    app.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO;
    app.pApplicationName = "test_vulkan_interop";
    app.apiVersion = VK_API_VERSION_1_2;
    VkDebugUtilsMessengerCreateInfoEXT mi;
    memset(&mi, 0, sizeof mi);
    mi.sType = VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT;
    mi.messageSeverity = VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT;
    mi.messageType = VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT |
                     VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT;
    mi.pfnUserCallback = on_message;
    VkInstanceCreateInfo ici;
    memset(&ici, 0, sizeof ici);
    ici.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO;
    ici.pNext = n_layers ? &mi : NULL;
    ici.pApplicationInfo = &app;
    ici.enabledLayerCount = n_layers;
    ici.ppEnabledLayerNames = n_layers ? layers : NULL;
    ici.enabledExtensionCount = n_exts;
    ici.ppEnabledExtensionNames = n_exts ? exts : NULL;
    VkResult r = ci(&ici, NULL, &E.instance);
    if (r != VK_SUCCESS) {
        E.instance = VK_NULL_HANDLE;
        return engine_fail("no Vulkan device (vkCreateInstance failed)");
    }
    E.destroy_instance = (PFN_vkDestroyInstance)E.gipa(E.instance, "vkDestroyInstance");
    if (n_layers) {
        PFN_vkCreateDebugUtilsMessengerEXT cm =
            (PFN_vkCreateDebugUtilsMessengerEXT)E.gipa(E.instance, "vkCreateDebugUtilsMessengerEXT");
        E.destroy_messenger =
            (PFN_vkDestroyDebugUtilsMessengerEXT)E.gipa(E.instance, "vkDestroyDebugUtilsMessengerEXT");
        if (cm) cm(E.instance, &mi, NULL, &E.messenger);
    }
    PFN_vkEnumeratePhysicalDevices epd =
        (PFN_vkEnumeratePhysicalDevices)E.gipa(E.instance, "vkEnumeratePhysicalDevices");
    PFN_vkGetPhysicalDeviceProperties gpp =
        (PFN_vkGetPhysicalDeviceProperties)E.gipa(E.instance, "vkGetPhysicalDeviceProperties");
    PFN_vkGetPhysicalDeviceQueueFamilyProperties gqf =
        (PFN_vkGetPhysicalDeviceQueueFamilyProperties)E.gipa(E.instance, "vkGetPhysicalDeviceQueueFamilyProperties");
    PFN_vkGetPhysicalDeviceMemoryProperties gmp =
        (PFN_vkGetPhysicalDeviceMemoryProperties)E.gipa(E.instance, "vkGetPhysicalDeviceMemoryProperties");
    PFN_vkCreateDevice cd = (PFN_vkCreateDevice)E.gipa(E.instance, "vkCreateDevice");
    PFN_vkGetDeviceProcAddr gdpa = (PFN_vkGetDeviceProcAddr)E.gipa(E.instance, "vkGetDeviceProcAddr");
    VkPhysicalDevice phys[16];
    uint32_t n_phys = 16;
    r = epd(E.instance, &n_phys, phys);
    if ((r != VK_SUCCESS && r != VK_INCOMPLETE) || n_phys == 0) return engine_fail("no Vulkan device");
    /* The first Vulkan 1.2 device with a compute queue (lavapipe in CI). */
    bool found = false;
    for (uint32_t i = 0; i < n_phys && !found; i++) {
        VkPhysicalDeviceProperties p;
        gpp(phys[i], &p);
        if (p.apiVersion < VK_API_VERSION_1_2) continue;
        VkQueueFamilyProperties qf[16];
        uint32_t nq = 16;
        gqf(phys[i], &nq, qf);
        for (uint32_t q = 0; q < nq && !found; q++)
            if (qf[q].queueFlags & VK_QUEUE_COMPUTE_BIT) {
                E.phys = phys[i];
                E.props = p;
                E.family = q;
                found = true;
            }
    }
    if (!found) return engine_fail("no Vulkan 1.2 device with a compute queue");
    gmp(E.phys, &E.mem);
    E.align = E.props.limits.minStorageBufferOffsetAlignment;
    if (E.align < 4) E.align = 4;

    float prio = 1.0f;
    VkDeviceQueueCreateInfo qci;
    memset(&qci, 0, sizeof qci);
    qci.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO;
    qci.queueFamilyIndex = E.family;
    qci.queueCount = 1;
    qci.pQueuePriorities = &prio;
    memset(&E.features, 0, sizeof E.features);
    E.features.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2; /* nothing optional enabled */
    VkDeviceCreateInfo dci;
    memset(&dci, 0, sizeof dci);
    dci.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO;
    dci.pNext = &E.features;
    dci.queueCreateInfoCount = 1;
    dci.pQueueCreateInfos = &qci;
    r = cd(E.phys, &dci, NULL, &E.dev);
    if (r != VK_SUCCESS) {
        E.dev = VK_NULL_HANDLE;
        return engine_fail("vkCreateDevice failed");
    }
#define X(n)                                                                                   \
    E.n = (PFN_vk##n)gdpa(E.dev, "vk" #n);                                                     \
    if (!E.n) return engine_fail("missing vk" #n);
    ENGINE_DEVICE_FNS(X)
#undef X
    E.GetDeviceQueue(E.dev, E.family, 0, &E.queue);

    VkCommandPoolCreateInfo pci;
    memset(&pci, 0, sizeof pci);
    pci.sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO;
    pci.flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT;
    pci.queueFamilyIndex = E.family;
    if (E.CreateCommandPool(E.dev, &pci, NULL, &E.pool) != VK_SUCCESS) return engine_fail("vkCreateCommandPool");
    VkCommandBufferAllocateInfo cai;
    memset(&cai, 0, sizeof cai);
    cai.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO;
    cai.commandPool = E.pool;
    cai.level = VK_COMMAND_BUFFER_LEVEL_PRIMARY;
    cai.commandBufferCount = 1;
    if (E.AllocateCommandBuffers(E.dev, &cai, &E.cmd) != VK_SUCCESS) return engine_fail("vkAllocateCommandBuffers");
    VkFenceCreateInfo fci;
    memset(&fci, 0, sizeof fci);
    fci.sType = VK_STRUCTURE_TYPE_FENCE_CREATE_INFO;
    if (E.CreateFence(E.dev, &fci, NULL, &E.fence) != VK_SUCCESS) return engine_fail("vkCreateFence");

    VkBufferCreateInfo bi;
    memset(&bi, 0, sizeof bi);
    bi.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO;
    bi.size = BUF_BYTES;
    bi.usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT |
               VK_BUFFER_USAGE_TRANSFER_DST_BIT;
    bi.sharingMode = VK_SHARING_MODE_EXCLUSIVE;
    if (E.CreateBuffer(E.dev, &bi, NULL, &E.buf) != VK_SUCCESS) return engine_fail("vkCreateBuffer");
    VkMemoryRequirements req;
    E.GetBufferMemoryRequirements(E.dev, E.buf, &req);
    const VkMemoryPropertyFlags need = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
    int type = -1;
    for (uint32_t i = 0; i < E.mem.memoryTypeCount && type < 0; i++)
        if ((req.memoryTypeBits & (1u << i)) && (E.mem.memoryTypes[i].propertyFlags & need) == need) type = (int)i;
    if (type < 0) return engine_fail("no host-visible coherent memory for a storage buffer");
    VkMemoryAllocateInfo ai;
    memset(&ai, 0, sizeof ai);
    ai.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO;
    ai.allocationSize = req.size;
    ai.memoryTypeIndex = (uint32_t)type;
    if (E.AllocateMemory(E.dev, &ai, NULL, &E.bmem) != VK_SUCCESS) return engine_fail("vkAllocateMemory");
    if (E.BindBufferMemory(E.dev, E.buf, E.bmem, 0) != VK_SUCCESS) return engine_fail("vkBindBufferMemory");
    void *map = NULL;
    if (E.MapMemory(E.dev, E.bmem, 0, VK_WHOLE_SIZE, 0, &map) != VK_SUCCESS) return engine_fail("vkMapMemory");
    E.map = map;
    E.size = BUF_BYTES;
    E.ok = true;
    return 1;
}

static void engine_close(void) {
    if (E.dev) {
        if (E.DeviceWaitIdle) E.DeviceWaitIdle(E.dev);
        if (E.buf) E.DestroyBuffer(E.dev, E.buf, NULL);
        if (E.bmem) E.FreeMemory(E.dev, E.bmem, NULL);
        if (E.fence) E.DestroyFence(E.dev, E.fence, NULL);
        if (E.pool) E.DestroyCommandPool(E.dev, E.pool, NULL);
        if (E.DestroyDevice) E.DestroyDevice(E.dev, NULL);
    }
    if (E.messenger && E.destroy_messenger) E.destroy_messenger(E.instance, E.messenger, NULL);
    if (E.instance && E.destroy_instance) E.destroy_instance(E.instance, NULL);
    /* the loader stays loaded (drivers leave allocations behind on unload) */
    memset(&E, 0, sizeof E);
}

static cvq_vulkan_device_desc engine_desc(void) {
    cvq_vulkan_device_desc d;
    memset(&d, 0, sizeof d);
    d.instance = E.instance;
    d.physical_device = E.phys;
    d.device = E.dev;
    d.queue = E.queue;
    d.queue_family_index = E.family;
    d.api_version = VK_API_VERSION_1_2;
    d.get_instance_proc_addr = E.gipa;
    d.enabled_features = &E.features;
    return d;
}

/* Begins the engine's command buffer. */
static void cmd_begin(void) {
    assert_int_equal(E.ResetCommandBuffer(E.cmd, 0), VK_SUCCESS);
    VkCommandBufferBeginInfo bi;
    memset(&bi, 0, sizeof bi);
    bi.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO;
    bi.flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT;
    assert_int_equal(E.BeginCommandBuffer(E.cmd, &bi), VK_SUCCESS);
}

/* The engine's barriers around the library's work: its host writes are
 * made visible by the submission itself; after the work, shader writes ->
 * host reads (the engine maps the results). Then submit and wait. */
static void cmd_submit_wait(void) {
    VkMemoryBarrier mb;
    memset(&mb, 0, sizeof mb);
    mb.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER;
    mb.srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT;
    mb.dstAccessMask = VK_ACCESS_HOST_READ_BIT;
    E.CmdPipelineBarrier(E.cmd, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT,
                         VK_PIPELINE_STAGE_HOST_BIT, 0, 1, &mb, 0, NULL, 0, NULL);
    assert_int_equal(E.EndCommandBuffer(E.cmd), VK_SUCCESS);
    assert_int_equal(E.ResetFences(E.dev, 1, &E.fence), VK_SUCCESS);
    VkSubmitInfo si;
    memset(&si, 0, sizeof si);
    si.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO;
    si.commandBufferCount = 1;
    si.pCommandBuffers = &E.cmd;
    assert_int_equal(E.QueueSubmit(E.queue, 1, &si, E.fence), VK_SUCCESS);
    assert_int_equal(E.WaitForFences(E.dev, 1, &E.fence, VK_TRUE, 600ull * 1000000000ull), VK_SUCCESS);
}

/* ---- regions with guards ----------------------------------------------------------------- */

#define GUARD 0xA5u
#define GUARD_BYTES 64u

/* A bump allocator over E.buf: each region aligned, GUARD_BYTES of guard
 * before and after, the whole span (region included) filled with GUARD. */
static VkDeviceSize g_top;

static void arena_reset(void) {
    g_top = 0;
    memset(E.map, GUARD, (size_t)E.size);
}

static VkDeviceSize align_up(VkDeviceSize x, VkDeviceSize a) { return (x + a - 1) / a * a; }

static cvq_vulkan_region region(size_t bytes) {
    cvq_vulkan_region r;
    r.buffer = E.buf;
    r.offset = align_up(g_top + GUARD_BYTES, E.align);
    r.size = align_up(bytes, 4);
    g_top = r.offset + r.size + GUARD_BYTES;
    assert_true(g_top <= E.size);
    return r;
}

static void *host_of(cvq_vulkan_region r) { return E.map + r.offset; }

static void put(cvq_vulkan_region r, const void *src, size_t bytes) { memcpy(host_of(r), src, bytes); }

/* The guards of r, and its bytes past `used` (rounded up to 4: the pad
 * bytes may be written), still hold the pattern. */
static void check_guards(cvq_vulkan_region r, size_t used, const char *name) {
    const size_t pad = (size_t)align_up(used, 4);
    const unsigned char *p = E.map + r.offset;
    for (size_t i = 1; i <= GUARD_BYTES; i++)
        if (p[-(ptrdiff_t)i] != GUARD) fail_msg("%s: guard byte %zu before the region overwritten", name, i);
    for (size_t i = pad; i < r.size + GUARD_BYTES; i++)
        if (p[i] != GUARD) fail_msg("%s: byte %zu past the data (%zu bytes) overwritten", name, i, used);
}

/* The whole region (and its guards) untouched. */
static void check_untouched(cvq_vulkan_region r, const char *name) {
    const unsigned char *p = E.map + r.offset;
    for (size_t i = 0; i < r.size; i++)
        if (p[i] != GUARD) fail_msg("%s: byte %zu written although the call failed", name, i);
    check_guards(r, 0, name);
}

/* ---- data and models ------------------------------------------------------------------------ */

static uint64_t rng_state;
static uint64_t g_seed;
static uint64_t rnd_u64(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double rnd_unit(void) { return ((double)(rnd_u64() >> 11) + 0.5) / 9007199254740992.0; }
static double rnd_normal(void) {
    double u0 = rnd_unit(), u1 = rnd_unit();
    return sqrt(-2.0 * log(u0)) * cos(6.283185307179586 * u1);
}

/* n tokens of kvd floats: random normal, with a duplicated token, a
 * subnormal-scale token, a large one and a zero one among them. */
static void fill_tokens(float *x, size_t n, size_t kvd) {
    for (size_t t = 0; t < n; t++) {
        float *row = x + t * kvd;
        int kind = (int)(t % 7);
        for (size_t i = 0; i < kvd; i++) {
            double v = rnd_normal();
            if (kind == 3) v *= 1e-40;
            if (kind == 4) v *= 1e15;
            if (kind == 5) v = 0.0;
            row[i] = (float)v;
        }
        if (kind == 6 && t > 0) memcpy(row, row - kvd, kvd * sizeof *row);
    }
}

typedef struct model {
    cvq_geometry g;
    cvq_codebook *cb;
    cvq_record_layout rl;
    size_t kvd, HR, ns, G, bits_per_tok, qd;
} model;

static void model_make(model *m, int which) {
    memset(m, 0, sizeof *m);
    cvq_geometry *g = &m->g;
    if (which == 0) {
        /* token scale, rotate-half, GQA 2:1, two value groups */
        *g = (cvq_geometry){2, 4, 2, 64, 4, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_ROTATE_HALF, 64, 64, 128, 0.0f};
    } else {
        /* head scales, interleaved, GQA 2:1 over 3 KV heads, Hkv*R = 9:
         * 14-byte code records; 3 groups of Nc = 8: 3-byte bit records */
        *g = (cvq_geometry){1, 6, 3, 64, 3, CVQ_KEY_SCALE_HEAD, CVQ_PAIRS_INTERLEAVED, 64, 8, 16, 0.0f};
    }
    assert_int_equal(cvq_geometry_resolve(g), CVQ_OK);
    double theta[128];
    assert_int_equal(cvq_rope_freqs_default(g->head_dim, 10000.0, theta), CVQ_OK);
    assert_int_equal(cvq_codebook_random(g, theta, 1234 + (uint64_t)which, NULL, &m->cb), CVQ_OK);
    assert_int_equal(cvq_record_layout_of(g, &m->rl), CVQ_OK);
    m->kvd = (size_t)g->n_kv_heads * g->head_dim;
    m->HR = (size_t)g->n_kv_heads * g->key_stages;
    m->ns = m->rl.key_scale_count;
    m->G = m->rl.value_groups;
    m->bits_per_tok = m->rl.value_bit_bytes;
    m->qd = (size_t)g->n_q_heads * g->head_dim;
}

static cvq_context *cpu_ref(void) {
    cvq_context_params p = cvq_context_default_params();
    p.backend = CVQ_BACKEND_CPU;
    p.cpu_reference = 1;
    cvq_context *c = NULL;
    assert_int_equal(cvq_context_create(&p, &c), CVQ_OK);
    return c;
}

static cvq_context *interop_ctx(void) {
    cvq_vulkan_device_desc d = engine_desc();
    cvq_context *c = NULL;
    cvq_status st = cvq_vulkan_context_create(NULL, &d, &c);
    if (st) fail_msg("cvq_vulkan_context_create -> %s: %s", cvq_status_name(st), cvq_last_error());
    return c;
}

#define CHECK_OK(call)                                                                                 \
    do {                                                                                               \
        cvq_status st_ = (call);                                                                       \
        if (st_ != CVQ_OK)                                                                             \
            fail_msg("%s -> %s: %s (seed %llu)", #call, cvq_status_name(st_), cvq_last_error(),        \
                     (unsigned long long)g_seed);                                                      \
    } while (0)

#define SKIP_IF_NO_VULKAN()                                                                            \
    do {                                                                                               \
        if (!E.ok) {                                                                                   \
            printf("skip: %s\n", E.why);                                                               \
            skip();                                                                                    \
        }                                                                                              \
    } while (0)

static void expect_no_messages(void) {
    if (g_messages || cvq_vk_validation_messages())
        fail_msg("%lu validation messages from the test's instance, %llu from the library's", g_messages,
                 (unsigned long long)cvq_vk_validation_messages());
}

/* ---- expected encodings (the CPU reference) ---------------------------------------------- */

typedef struct expected {
    uint16_t *codes;
    float *scales;
    uint8_t *codes12; /* [n][key_code_bytes] */
    uint8_t *bits;
    float *sigma;
} expected;

static void expected_make(cvq_context *cpu, const model *m, const float *keys, const float *vals, size_t n,
                          expected *x) {
    x->codes = malloc(n * m->HR * 2);
    x->scales = malloc(n * m->ns * 4);
    x->codes12 = malloc(n * m->rl.key_code_bytes);
    x->bits = malloc(n * m->bits_per_tok);
    x->sigma = malloc(n * m->G * 4);
    assert_non_null(x->codes && x->scales && x->codes12 && x->bits && x->sigma ? x : NULL);
    CHECK_OK(cvq_encode_keys(cpu, m->cb, 0, keys, CVQ_F32, n, x->codes, x->scales));
    CHECK_OK(cvq_encode_values(cpu, m->cb, 0, vals, CVQ_F32, n, x->bits, x->sigma));
    for (size_t t = 0; t < n; t++)
        CHECK_OK(cvq_pack_codes12(x->codes + t * m->HR, m->HR, x->codes12 + t * m->rl.key_code_bytes));
}

static void expected_free(expected *x) {
    free(x->codes);
    free(x->scales);
    free(x->codes12);
    free(x->bits);
    free(x->sigma);
}

static void expect_bytes(const void *got, const void *want, size_t bytes, const char *what) {
    if (memcmp(got, want, bytes) != 0) {
        const unsigned char *a = got, *b = want;
        size_t i = 0;
        while (a[i] == b[i]) i++;
        fail_msg("%s: byte %zu of %zu differs from the CPU reference (0x%02x vs 0x%02x; seed %llu)", what, i,
                 bytes, a[i], b[i], (unsigned long long)g_seed);
    }
}

/* The regions of one encode of n tokens. */
typedef struct enc_regions {
    cvq_vulkan_region keys, vals, codes, codes12, scales, scales12, bits, sigma;
} enc_regions;

static void enc_regions_make(const model *m, size_t n, const float *keys, const float *vals, enc_regions *r) {
    r->keys = region(n * m->kvd * 4);
    r->vals = region(n * m->kvd * 4);
    r->codes = region(n * m->HR * 2);
    r->codes12 = region(n * m->rl.key_code_bytes);
    r->scales = region(n * m->ns * 4);
    r->scales12 = region(n * m->ns * 4);
    r->bits = region(n * m->bits_per_tok);
    r->sigma = region(n * m->G * 4);
    put(r->keys, keys, n * m->kvd * 4);
    put(r->vals, vals, n * m->kvd * 4);
}

static void enc_record(cvq_context *vk, const model *m, size_t n, const enc_regions *r) {
    CHECK_OK(cvq_vulkan_encode_keys(vk, m->cb, 0, r->keys, n, r->codes, r->scales, 0));
    CHECK_OK(cvq_vulkan_encode_keys(vk, m->cb, 0, r->keys, n, r->codes12, r->scales12, CVQ_VULKAN_CODES_PACKED12));
    CHECK_OK(cvq_vulkan_encode_values(vk, m->cb, 0, r->vals, n, r->bits, r->sigma));
}

static void enc_check(const model *m, size_t n, const enc_regions *r, const expected *x, const char *what) {
    char name[96];
    snprintf(name, sizeof name, "%s codes", what);
    expect_bytes(host_of(r->codes), x->codes, n * m->HR * 2, name);
    check_guards(r->codes, n * m->HR * 2, name);
    snprintf(name, sizeof name, "%s 12-bit codes", what);
    expect_bytes(host_of(r->codes12), x->codes12, n * m->rl.key_code_bytes, name);
    check_guards(r->codes12, n * m->rl.key_code_bytes, name);
    snprintf(name, sizeof name, "%s scales", what);
    expect_bytes(host_of(r->scales), x->scales, n * m->ns * 4, name);
    expect_bytes(host_of(r->scales12), x->scales, n * m->ns * 4, name);
    check_guards(r->scales, n * m->ns * 4, name);
    check_guards(r->scales12, n * m->ns * 4, name);
    snprintf(name, sizeof name, "%s value bits", what);
    expect_bytes(host_of(r->bits), x->bits, n * m->bits_per_tok, name);
    check_guards(r->bits, n * m->bits_per_tok, name);
    snprintf(name, sizeof name, "%s sigma", what);
    expect_bytes(host_of(r->sigma), x->sigma, n * m->G * 4, name);
    check_guards(r->sigma, n * m->G * 4, name);
}

/* ---- tests ------------------------------------------------------------------------------------ */

/* Scratch budgets (COMMVQ_VK_SCRATCH_BUDGET): none (one chunk), one that
 * cuts model 0's value encoding into chunks of 2 tokens, one that cuts its
 * key encoding into chunks of 4 (model 1's odd record sizes leave no
 * aligned chunk boundary this small: it runs in one chunk). */
static const char *const k_budgets[3] = {NULL, "6000", "256"};

/* Recorded into the engine's command buffer and immediate, one chunk and
 * (small scratch budget) many: bit-identical to the CPU reference. */
static void test_encode_bit_exact(void **state) {
    (void)state;
    SKIP_IF_NO_VULKAN();
    cvq_context *cpu = cpu_ref();
    for (int budget = 0; budget < 3; budget++) {
        /* read when a context is created: chunks of a few tokens */
        if (budget) setenv("COMMVQ_VK_SCRATCH_BUDGET", k_budgets[budget], 1);
        cvq_context *vk = interop_ctx();
        if (budget) unsetenv("COMMVQ_VK_SCRATCH_BUDGET");
        for (int which = 0; which < 2; which++) {
            model m;
            model_make(&m, which);
            const size_t n = 37;
            g_seed = rng_state = 100 + (uint64_t)(which + 2 * budget);
            float *keys = malloc(n * m.kvd * 4), *vals = malloc(n * m.kvd * 4);
            assert_non_null(keys);
            assert_non_null(vals);
            fill_tokens(keys, n, m.kvd);
            fill_tokens(vals, n, m.kvd);
            expected x;
            expected_make(cpu, &m, keys, vals, n, &x);

            /* recorded (tables uploaded ahead on the second context) */
            if (budget) CHECK_OK(cvq_vulkan_prepare(vk, m.cb, 0));
            arena_reset();
            enc_regions r;
            enc_regions_make(&m, n, keys, vals, &r);
            cmd_begin();
            CHECK_OK(cvq_vulkan_begin_recording(vk, E.cmd));
            enc_record(vk, &m, n, &r);
            CHECK_OK(cvq_vulkan_end_recording(vk));
            cmd_submit_wait();
            uint32_t flags = 99, failed = 99;
            CHECK_OK(cvq_vulkan_collect_status(vk, &flags, &failed));
            assert_int_equal(flags, 0);
            assert_int_equal(failed, 0);
            enc_check(&m, n, &r, &x, budget ? "recorded, chunked" : "recorded");

            /* immediate: the library submits to the engine's queue */
            arena_reset();
            enc_regions_make(&m, n, keys, vals, &r);
            enc_record(vk, &m, n, &r);
            enc_check(&m, n, &r, &x, budget ? "immediate, chunked" : "immediate");
            CHECK_OK(cvq_vulkan_collect_status(vk, NULL, NULL)); /* nothing recorded: clean */

            expected_free(&x);
            free(keys);
            free(vals);
            cvq_codebook_free(m.cb);
        }
        cvq_context_free(vk);
    }
    cvq_context_free(cpu);
    expect_no_messages();
}

/* Sinks, compressed tokens encoded on the device in the same command
 * buffer, window: attention as the CPU reference cache computes it. */
static void test_attend(void **state) {
    (void)state;
    SKIP_IF_NO_VULKAN();
    cvq_context *cpu = cpu_ref();
    cvq_context *vk = interop_ctx();
    for (int which = 0; which < 2; which++) {
        model m;
        model_make(&m, which);
        g_seed = rng_state = 500 + (uint64_t)which;
        /* S = 2 sinks, W = 5: 27 tokens leave 20 compressed and 5 in the
         * window (blocks of W compressed as the window overflows) */
        const size_t S = 2, W = 5, T = 27, NC = T - S - W, NQ = 3;
        float *k = malloc(T * m.kvd * 4), *v = malloc(T * m.kvd * 4);
        float *q = malloc(NQ * m.qd * 4), *o_cpu = malloc(NQ * m.qd * 4);
        int32_t pos[27], qpos[3] = {9, 26, 40};
        assert_true(k && v && q && o_cpu);
        for (size_t i = 0; i < T * m.kvd; i++) k[i] = (float)rnd_normal();
        for (size_t i = 0; i < T * m.kvd; i++) v[i] = (float)rnd_normal();
        for (size_t i = 0; i < NQ * m.qd; i++) q[i] = (float)rnd_normal();
        for (size_t t = 0; t < T; t++) pos[t] = (int32_t)(3 * t + 1);

        cvq_cache_params cp = cvq_cache_default_params();
        cp.sinks = (uint32_t)S;
        cp.window = (uint32_t)W;
        cvq_cache *cache = NULL;
        CHECK_OK(cvq_cache_create(cpu, m.cb, &cp, &cache));
        CHECK_OK(cvq_cache_append(cache, k, v, CVQ_F32, pos, T));
        cvq_cache_stats cs;
        CHECK_OK(cvq_cache_stats_get(cache, &cs));
        assert_int_equal(cs.n_compressed, NC);
        assert_int_equal(cs.n_window, W);
        for (int rot = 0; rot < 2; rot++) {
            const uint32_t flags = rot ? CVQ_ATTEND_QUERIES_ROTATED : 0;
            CHECK_OK(cvq_cache_attend(cache, q, qpos, NQ, flags, o_cpu));
            for (int recorded = 0; recorded < 2; recorded++) {
                arena_reset();
                cvq_vulkan_attend_desc d;
                memset(&d, 0, sizeof d);
                d.n_q = NQ;
                d.queries = region(NQ * m.qd * 4);
                d.q_pos = region(NQ * 4);
                d.out = region(NQ * m.qd * 4);
                d.flags = flags;
                d.n_sink = S;
                d.sink_k = region(S * m.kvd * 4);
                d.sink_v = region(S * m.kvd * 4);
                d.sink_pos = region(S * 4);
                d.n_comp = NC;
                cvq_vulkan_region ck = region(NC * m.kvd * 4), cv = region(NC * m.kvd * 4);
                d.comp_codes = region(NC * m.rl.key_code_bytes);
                d.comp_kscale = region(NC * m.ns * 4);
                d.comp_vbits = region(NC * m.bits_per_tok);
                d.comp_vsigma = region(NC * m.G * 4);
                d.comp_pos = region(NC * 4);
                d.n_win = W;
                d.win_k = region(W * m.kvd * 4);
                d.win_v = region(W * m.kvd * 4);
                d.win_pos = region(W * 4);
                put(d.queries, q, NQ * m.qd * 4);
                put(d.q_pos, qpos, NQ * 4);
                put(d.sink_k, k, S * m.kvd * 4);
                put(d.sink_v, v, S * m.kvd * 4);
                put(d.sink_pos, pos, S * 4);
                put(ck, k + S * m.kvd, NC * m.kvd * 4);
                put(cv, v + S * m.kvd, NC * m.kvd * 4);
                put(d.comp_pos, pos + S, NC * 4);
                put(d.win_k, k + (S + NC) * m.kvd, W * m.kvd * 4);
                put(d.win_v, v + (S + NC) * m.kvd, W * m.kvd * 4);
                put(d.win_pos, pos + S + NC, W * 4);
                if (recorded) {
                    cmd_begin();
                    CHECK_OK(cvq_vulkan_begin_recording(vk, E.cmd));
                }
                /* the compressed segment, encoded on the device */
                CHECK_OK(cvq_vulkan_encode_keys(vk, m.cb, 0, ck, NC, d.comp_codes, d.comp_kscale,
                                                CVQ_VULKAN_CODES_PACKED12));
                CHECK_OK(cvq_vulkan_encode_values(vk, m.cb, 0, cv, NC, d.comp_vbits, d.comp_vsigma));
                CHECK_OK(cvq_vulkan_attend(vk, m.cb, 0, &d));
                if (recorded) {
                    CHECK_OK(cvq_vulkan_end_recording(vk));
                    cmd_submit_wait();
                    CHECK_OK(cvq_vulkan_collect_status(vk, NULL, NULL));
                }
                const float *o = host_of(d.out);
                for (size_t i = 0; i < NQ * m.qd; i++) {
                    const double e = fabs((double)o[i] - (double)o_cpu[i]);
                    if (!(e <= 2e-4 * (1.0 + fabs((double)o_cpu[i]))))
                        fail_msg("model %d rot %d recorded %d: out[%zu] cpu %.9g vulkan %.9g (seed %llu)", which,
                                 rot, recorded, i, (double)o_cpu[i], (double)o[i], (unsigned long long)g_seed);
                }
                check_guards(d.out, NQ * m.qd * 4, "attend out");
            }
        }
        cvq_cache_free(cache);
        free(k);
        free(v);
        free(q);
        free(o_cpu);
        cvq_codebook_free(m.cb);
    }
    cvq_context_free(vk);
    cvq_context_free(cpu);
    expect_no_messages();
}

/* Bad device input: nothing written, the status collected after the
 * fence, clean calls beside it written, the next collect clean. */
static void test_deferred_errors(void **state) {
    (void)state;
    SKIP_IF_NO_VULKAN();
    cvq_context *cpu = cpu_ref();
    for (int budget = 0; budget < 3; budget++) {
        if (budget) setenv("COMMVQ_VK_SCRATCH_BUDGET", k_budgets[budget], 1);
        cvq_context *vk = interop_ctx();
        if (budget) unsetenv("COMMVQ_VK_SCRATCH_BUDGET");
        for (int which = 0; which < 2; which++) {
        model m;
        model_make(&m, which);
        const size_t n = 29;
        g_seed = rng_state = 900 + (uint64_t)(budget + 3 * which);
        float *keys = malloc(n * m.kvd * 4), *vals = malloc(n * m.kvd * 4);
        float *bad_k = malloc(n * m.kvd * 4), *bad_v = malloc(n * m.kvd * 4), *big = malloc(n * m.kvd * 4);
        assert_true(keys && vals && bad_k && bad_v && big);
        fill_tokens(keys, n, m.kvd);
        fill_tokens(vals, n, m.kvd);
        memcpy(bad_k, keys, n * m.kvd * 4);
        memcpy(bad_v, vals, n * m.kvd * 4);
        /* the LAST token bad: with chunks, earlier chunks must not be
         * written either */
        bad_k[(n - 1) * m.kvd + 5] = NAN;
        bad_v[(n - 1) * m.kvd + 7] = INFINITY;
        /* a sum of squares overflowing binary32 in one token */
        memcpy(big, keys, n * m.kvd * 4);
        for (size_t i = 0; i < m.kvd; i++) big[3 * m.kvd + i] = 3e38f;
        expected x;
        expected_make(cpu, &m, keys, vals, n, &x);

        arena_reset();
        enc_regions good, badr;
        enc_regions_make(&m, n, keys, vals, &good);
        enc_regions_make(&m, n, bad_k, bad_v, &badr);
        cmd_begin();
        CHECK_OK(cvq_vulkan_begin_recording(vk, E.cmd));
        CHECK_OK(cvq_vulkan_encode_keys(vk, m.cb, 0, badr.keys, n, badr.codes, badr.scales, 0));
        enc_record(vk, &m, n, &good);
        CHECK_OK(cvq_vulkan_encode_values(vk, m.cb, 0, badr.vals, n, badr.bits, badr.sigma));
        CHECK_OK(cvq_vulkan_encode_keys(vk, m.cb, 0, badr.keys, n, badr.codes12, badr.scales12,
                                        CVQ_VULKAN_CODES_PACKED12));
        CHECK_OK(cvq_vulkan_end_recording(vk));
        cmd_submit_wait();
        uint32_t flags = 0, failed = 0;
        cvq_status st = cvq_vulkan_collect_status(vk, &flags, &failed);
        assert_int_equal(st, CVQ_ERR_NONFINITE_INPUT);
        assert_true(strstr(cvq_context_last_error(vk), "3 of 6") != NULL);
        assert_int_equal(flags, CVQ_VULKAN_STATUS_NONFINITE);
        assert_int_equal(failed, 3);
        check_untouched(badr.codes, "bad keys: codes");
        check_untouched(badr.scales, "bad keys: scales");
        check_untouched(badr.codes12, "bad keys: 12-bit codes");
        check_untouched(badr.scales12, "bad keys: scales (12-bit call)");
        check_untouched(badr.bits, "bad values: bits");
        check_untouched(badr.sigma, "bad values: sigma");
        enc_check(&m, n, &good, &x, "clean calls beside failed ones");

        /* the next round is clean again */
        arena_reset();
        enc_regions_make(&m, n, keys, vals, &good);
        cmd_begin();
        CHECK_OK(cvq_vulkan_begin_recording(vk, E.cmd));
        enc_record(vk, &m, n, &good);
        CHECK_OK(cvq_vulkan_end_recording(vk));
        cmd_submit_wait();
        CHECK_OK(cvq_vulkan_collect_status(vk, &flags, &failed));
        assert_int_equal(flags, 0);
        enc_check(&m, n, &good, &x, "after a failed round");

        /* immediate calls return the device's verdict themselves */
        arena_reset();
        enc_regions_make(&m, n, bad_k, bad_v, &badr);
        cvq_vulkan_region bigr = region(n * m.kvd * 4);
        put(bigr, big, n * m.kvd * 4);
        assert_int_equal(cvq_vulkan_encode_keys(vk, m.cb, 0, badr.keys, n, badr.codes, badr.scales, 0),
                         CVQ_ERR_NONFINITE_INPUT);
        assert_int_equal(cvq_vulkan_encode_values(vk, m.cb, 0, badr.vals, n, badr.bits, badr.sigma),
                         CVQ_ERR_NONFINITE_INPUT);
        assert_int_equal(cvq_vulkan_encode_keys(vk, m.cb, 0, bigr, n, badr.codes12, badr.scales12,
                                                CVQ_VULKAN_CODES_PACKED12),
                         CVQ_ERR_INPUT_RANGE);
        check_untouched(badr.codes, "immediate bad keys: codes");
        check_untouched(badr.scales, "immediate bad keys: scales");
        check_untouched(badr.bits, "immediate bad values: bits");
        check_untouched(badr.sigma, "immediate bad values: sigma");
        check_untouched(badr.codes12, "immediate overflow: codes");
        check_untouched(badr.scales12, "immediate overflow: scales");
        CHECK_OK(cvq_vulkan_collect_status(vk, &flags, NULL));

        /* recorded overflow: CVQ_ERR_INPUT_RANGE collected */
        arena_reset();
        enc_regions_make(&m, n, big, vals, &badr);
        cmd_begin();
        CHECK_OK(cvq_vulkan_begin_recording(vk, E.cmd));
        CHECK_OK(cvq_vulkan_encode_keys(vk, m.cb, 0, badr.keys, n, badr.codes, badr.scales, 0));
        CHECK_OK(cvq_vulkan_end_recording(vk));
        cmd_submit_wait();
        assert_int_equal(cvq_vulkan_collect_status(vk, &flags, &failed), CVQ_ERR_INPUT_RANGE);
        assert_int_equal(flags, CVQ_VULKAN_STATUS_RANGE);
        assert_int_equal(failed, 1);
        check_untouched(badr.codes, "recorded overflow: codes");
        check_untouched(badr.scales, "recorded overflow: scales");

        expected_free(&x);
        free(keys);
        free(vals);
        free(bad_k);
        free(bad_v);
        free(big);
        cvq_codebook_free(m.cb);
        }
        cvq_context_free(vk);
    }
    cvq_context_free(cpu);
    expect_no_messages();
}

/* Refused arguments, each with its status, and nothing written. */
static void test_bad_arguments(void **state) {
    (void)state;
    SKIP_IF_NO_VULKAN();
    cvq_context *vk = interop_ctx();
    model m;
    model_make(&m, 0);
    const size_t n = 5;
    arena_reset();
    cvq_vulkan_region keys = region(n * m.kvd * 4), codes = region(n * m.HR * 2), scales = region(n * m.ns * 4);
    g_seed = rng_state = 77;
    float kbuf[5 * 128];
    fill_tokens(kbuf, n, m.kvd);
    put(keys, kbuf, n * m.kvd * 4);
    memset(E.map + codes.offset, GUARD, (size_t)codes.size);

    VkDeviceSize align = 0;
    CHECK_OK(cvq_vulkan_offset_alignment(vk, &align));
    assert_int_equal(align, E.props.limits.minStorageBufferOffsetAlignment);
    cvq_vulkan_region r;
    if (align > 1) { /* misaligned offset */
        r = codes;
        r.offset += align / 2;
        assert_int_equal(cvq_vulkan_encode_keys(vk, m.cb, 0, keys, n, r, scales, 0), CVQ_ERR_INVALID_ARGUMENT);
        assert_true(strstr(cvq_context_last_error(vk), "minStorageBufferOffsetAlignment") != NULL);
    }
    r = codes; /* too short */
    r.size -= 4;
    assert_int_equal(cvq_vulkan_encode_keys(vk, m.cb, 0, keys, n, r, scales, 0), CVQ_ERR_SHAPE);
    r = keys;
    r.size = n * m.kvd * 4 - 1;
    assert_int_equal(cvq_vulkan_encode_keys(vk, m.cb, 0, r, n, codes, scales, 0), CVQ_ERR_SHAPE);
    r = scales; /* no buffer */
    r.buffer = VK_NULL_HANDLE;
    assert_int_equal(cvq_vulkan_encode_keys(vk, m.cb, 0, keys, n, codes, r, 0), CVQ_ERR_NULL_POINTER);
    /* an output overlapping the input */
    assert_int_equal(cvq_vulkan_encode_keys(vk, m.cb, 0, keys, n, keys, scales, 0), CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_vulkan_encode_keys(vk, m.cb, 0, keys, n, codes, scales, 8u), CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_vulkan_encode_keys(vk, m.cb, 7, keys, n, codes, scales, 0), CVQ_ERR_LAYER_RANGE);
    assert_int_equal(cvq_vulkan_prepare(vk, m.cb, 7), CVQ_ERR_LAYER_RANGE);
    assert_int_equal(cvq_vulkan_encode_values(vk, NULL, 0, keys, n, codes, scales), CVQ_ERR_NULL_POINTER);
    cvq_vulkan_attend_desc d;
    memset(&d, 0, sizeof d);
    d.n_q = 1;
    d.queries = region(m.qd * 4);
    d.q_pos = region(4);
    d.out = region(m.qd * 4 - 8); /* too short */
    assert_int_equal(cvq_vulkan_attend(vk, m.cb, 0, &d), CVQ_ERR_SHAPE);
    d.out = region(m.qd * 4);
    d.n_win = 2; /* a segment without regions */
    assert_int_equal(cvq_vulkan_attend(vk, m.cb, 0, &d), CVQ_ERR_NULL_POINTER);
    assert_int_equal(cvq_vulkan_attend(vk, m.cb, 0, NULL), CVQ_ERR_NULL_POINTER);
    check_untouched(codes, "refused calls");

    /* recording misuse */
    assert_int_equal(cvq_vulkan_end_recording(vk), CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_vulkan_begin_recording(vk, VK_NULL_HANDLE), CVQ_ERR_NULL_POINTER);
    cmd_begin();
    CHECK_OK(cvq_vulkan_begin_recording(vk, E.cmd));
    assert_int_equal(cvq_vulkan_begin_recording(vk, E.cmd), CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_vulkan_collect_status(vk, NULL, NULL), CVQ_ERR_INVALID_ARGUMENT);
    CHECK_OK(cvq_vulkan_end_recording(vk));
    cmd_submit_wait(); /* an empty submission (barrier only) */
    CHECK_OK(cvq_vulkan_collect_status(vk, NULL, NULL));

    /* contexts: not an interop context, bad descriptions */
    cvq_context_params p = cvq_context_default_params();
    p.backend = CVQ_BACKEND_CPU;
    cvq_context *cpu = NULL;
    CHECK_OK(cvq_context_create(&p, &cpu));
    assert_int_equal(cvq_vulkan_encode_keys(cpu, m.cb, 0, keys, n, codes, scales, 0), CVQ_ERR_UNSUPPORTED);
    assert_int_equal(cvq_vulkan_collect_status(cpu, NULL, NULL), CVQ_ERR_UNSUPPORTED);
    assert_int_equal(cvq_vulkan_begin_recording(NULL, E.cmd), CVQ_ERR_NULL_POINTER);
    VkDeviceSize al;
    assert_int_equal(cvq_vulkan_offset_alignment(cpu, &al), CVQ_ERR_UNSUPPORTED);
    cvq_context *c2 = (cvq_context *)&c2;
    cvq_vulkan_device_desc dd = engine_desc();
    assert_int_equal(cvq_vulkan_context_create(&p, &dd, &c2), CVQ_ERR_INVALID_ARGUMENT); /* backend cpu */
    assert_null(c2);
    dd.device = VK_NULL_HANDLE;
    assert_int_equal(cvq_vulkan_context_create(NULL, &dd, &c2), CVQ_ERR_NULL_POINTER);
    dd = engine_desc();
    dd.queue_family_index = 1000;
    assert_int_equal(cvq_vulkan_context_create(NULL, &dd, &c2), CVQ_ERR_INVALID_ARGUMENT);
    dd = engine_desc();
    dd.api_version = VK_API_VERSION_1_1;
    assert_int_equal(cvq_vulkan_context_create(NULL, &dd, &c2), CVQ_ERR_NO_DEVICE);
    assert_int_equal(cvq_vulkan_context_create(NULL, NULL, &c2), CVQ_ERR_NULL_POINTER);
    assert_null(c2);
    /* the interop context reports the engine's device */
    cvq_device_info info;
    CHECK_OK(cvq_context_device(vk, &info));
    assert_int_equal(info.backend, CVQ_BACKEND_VULKAN);
    assert_string_equal(info.name, E.props.deviceName);
    assert_int_equal(cvq_context_backend(vk), CVQ_BACKEND_VULKAN);

    cvq_context_free(cpu);
    cvq_codebook_free(m.cb);
    cvq_context_free(vk);
    expect_no_messages();
}

/* The host API (commvq.h) runs on an interop context too, on the engine's
 * device, and gives the CPU reference's codes. */
static void test_host_api_on_engine_device(void **state) {
    (void)state;
    SKIP_IF_NO_VULKAN();
    cvq_context *cpu = cpu_ref();
    cvq_context *vk = interop_ctx();
    model m;
    model_make(&m, 1);
    const size_t n = 11;
    g_seed = rng_state = 31;
    float *keys = malloc(n * m.kvd * 4), *vals = malloc(n * m.kvd * 4);
    assert_true(keys && vals);
    fill_tokens(keys, n, m.kvd);
    fill_tokens(vals, n, m.kvd);
    expected x;
    expected_make(cpu, &m, keys, vals, n, &x);
    uint16_t codes[11 * 9];
    float scales[11 * 3], sigma[11 * 3];
    uint8_t bits[11 * 3];
    CHECK_OK(cvq_encode_keys(vk, m.cb, 0, keys, CVQ_F32, n, codes, scales));
    CHECK_OK(cvq_encode_values(vk, m.cb, 0, vals, CVQ_F32, n, bits, sigma));
    expect_bytes(codes, x.codes, n * m.HR * 2, "host API codes");
    expect_bytes(scales, x.scales, n * m.ns * 4, "host API scales");
    expect_bytes(bits, x.bits, n * m.bits_per_tok, "host API bits");
    expect_bytes(sigma, x.sigma, n * m.G * 4, "host API sigma");
    expected_free(&x);
    free(keys);
    free(vals);
    cvq_codebook_free(m.cb);
    cvq_context_free(vk);
    cvq_context_free(cpu);
    expect_no_messages();
}

/* ---- host allocation failures ------------------------------------------------------------- */

typedef struct counting {
    long n_alloc, n_free, fail_at; /* fail_at: the n-th allocation fails (0: none) */
} counting;

static void *cnt_alloc(void *user, size_t size, size_t align) {
    counting *c = user;
    if (c->fail_at && c->n_alloc + 1 == c->fail_at) {
        c->fail_at = 0;
        return NULL;
    }
    void *p = NULL;
    if (align < sizeof(void *)) align = sizeof(void *);
    size = (size + align - 1) / align * align;
    p = aligned_alloc(align, size);
    if (p) c->n_alloc++;
    return p;
}

static void cnt_free(void *user, void *ptr) {
    counting *c = user;
    c->n_free++;
    free(ptr);
}

/* One interop session: a context, a recorded key and value encode, an
 * immediate one, the collect. On failure the recording is abandoned (the
 * command buffer is never submitted) and the context freed. */
static cvq_status interop_session(const cvq_allocator *a, const model *m, size_t n) {
    cvq_context_params p = cvq_context_default_params();
    p.allocator = a;
    cvq_vulkan_device_desc d = engine_desc();
    cvq_context *vk = NULL;
    cvq_status st = cvq_vulkan_context_create(&p, &d, &vk);
    if (st) return st;
    arena_reset();
    enc_regions r;
    float *keys = calloc(n * m->kvd, 4);
    assert_non_null(keys);
    for (size_t i = 0; i < n * m->kvd; i++) keys[i] = (float)((i * 7919u) % 1000u) - 500.0f;
    enc_regions_make(m, n, keys, keys, &r);
    free(keys);
    cmd_begin();
    st = cvq_vulkan_begin_recording(vk, E.cmd);
    if (!st) st = cvq_vulkan_encode_keys(vk, m->cb, 0, r.keys, n, r.codes12, r.scales, CVQ_VULKAN_CODES_PACKED12);
    if (!st) st = cvq_vulkan_encode_values(vk, m->cb, 0, r.vals, n, r.bits, r.sigma);
    cvq_status st2 = cvq_vulkan_end_recording(vk);
    if (!st && st2) st = st2;
    if (!st) {
        cmd_submit_wait();
        st = cvq_vulkan_collect_status(vk, NULL, NULL);
    } else {
        assert_int_equal(E.EndCommandBuffer(E.cmd), VK_SUCCESS); /* never submitted */
    }
    if (!st) st = cvq_vulkan_encode_keys(vk, m->cb, 0, r.keys, n, r.codes, r.scales12, 0);
    cvq_context_free(vk);
    return st;
}

/* Every host allocation of a session failed in turn: CVQ_ERR_OUT_OF_MEMORY
 * each time, nothing leaked (host blocks counted here; Vulkan objects left
 * on the engine's device would be reported by the validation layer when
 * the engine destroys it). */
static void test_alloc_failures(void **state) {
    (void)state;
    SKIP_IF_NO_VULKAN();
    model m;
    model_make(&m, 0);
    counting cnt = {0, 0, 0};
    cvq_allocator a = {cnt_alloc, cnt_free, &cnt};
    CHECK_OK(interop_session(&a, &m, 9));
    const long total = cnt.n_alloc;
    assert_true(total > 5);
    assert_int_equal(cnt.n_alloc, cnt.n_free);
    long failures = 0;
    for (long k = 1; k <= total; k++) {
        cnt.n_alloc = cnt.n_free = 0;
        cnt.fail_at = k;
        cvq_status st = interop_session(&a, &m, 9);
        if (st != CVQ_OK) {
            failures++;
            if (st != CVQ_ERR_OUT_OF_MEMORY)
                fail_msg("failing allocation %ld gave %s (%s)", k, cvq_status_name(st), cvq_last_error());
        }
        if (cnt.n_alloc != cnt.n_free)
            fail_msg("failing allocation %ld: %ld allocations, %ld frees (leak)", k, cnt.n_alloc, cnt.n_free);
    }
    printf("interop allocation failure injection: %ld allocations in a session, %ld injected failures, all "
           "CVQ_ERR_OUT_OF_MEMORY without leaks\n", total, failures);
    assert_int_equal(failures, total);
    cvq_codebook_free(m.cb);
    expect_no_messages();
}

static int group_setup(void **state) {
    (void)state;
    /* Let the library create its process-wide Vulkan instance first: it
     * keeps the driver loaded until exit, so that leak checkers can name
     * the driver's own allocations made for this test's instance (the
     * loader unloads a driver when its last instance goes). */
    size_t n_devices = 0;
    (void)cvq_list_devices(NULL, 0, &n_devices);
    if (!engine_open()) {
        char why[256];
        memcpy(why, E.why, sizeof why);
        engine_close();
        snprintf(E.why, sizeof E.why, "%s", why);
        printf("skip: %s\n", E.why);
        return 0;
    }
    /* The library may be built without its Vulkan backend (or have it
     * disabled by COMMVQ_DISABLE_VULKAN): then there is nothing to test. */
    cvq_vulkan_device_desc d = engine_desc();
    cvq_context *probe = NULL;
    cvq_status st = cvq_vulkan_context_create(NULL, &d, &probe);
    cvq_context_free(probe);
    if (st == CVQ_ERR_BACKEND_UNAVAILABLE) {
        char why[256];
        snprintf(why, sizeof why, "%s", cvq_last_error());
        engine_close();
        snprintf(E.why, sizeof E.why, "%s", why);
        printf("skip: %s\n", E.why);
        return 0;
    }
    printf("engine device: %s (minStorageBufferOffsetAlignment %llu)\n", E.props.deviceName,
           (unsigned long long)E.props.limits.minStorageBufferOffsetAlignment);
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    if (E.ok) engine_close();
    if (g_messages) {
        fprintf(stderr, "test_vulkan_interop: %lu validation messages\n", g_messages);
        return 1;
    }
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_encode_bit_exact),
        cmocka_unit_test(test_attend),
        cmocka_unit_test(test_deferred_errors),
        cmocka_unit_test(test_bad_arguments),
        cmocka_unit_test(test_host_api_on_engine_device),
        cmocka_unit_test(test_alloc_failures),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

#endif /* HAVE_VK_HEADERS */
