/*
 * The Vulkan loader, opened at run time (the library never links
 * libvulkan), and the one VkInstance of the process.
 *
 * The instance is created on first use under pthread_once and kept until
 * the process exits: drivers such as lavapipe leave allocations behind when
 * an instance is destroyed and their library unloaded, and creating one
 * per context would also cost every context the ICD scan. With
 * COMMVQ_VK_VALIDATION=1 the Khronos validation layer and a debug-utils
 * messenger are enabled; the messenger prints each warning or error to
 * stderr and counts it (cvq_vk_validation_messages()).
 */
#define _POSIX_C_SOURCE 200809L
#include "vk_internal.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static cvq_vk_process g_proc;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static atomic_uint_fast64_t g_messages;

uint64_t cvq_vk_validation_messages(void) { return (uint64_t)atomic_load(&g_messages); }

bool cvq_vk_validation_enabled(void) { return g_proc.validation; }

/* ---- VkResult ------------------------------------------------------------------- */

const char *cvq_vk_result_name(VkResult r) {
    switch (r) {
#define N(x) case x: return #x;
    N(VK_SUCCESS) N(VK_NOT_READY) N(VK_TIMEOUT) N(VK_EVENT_SET) N(VK_EVENT_RESET)
    N(VK_INCOMPLETE) N(VK_ERROR_OUT_OF_HOST_MEMORY) N(VK_ERROR_OUT_OF_DEVICE_MEMORY)
    N(VK_ERROR_INITIALIZATION_FAILED) N(VK_ERROR_DEVICE_LOST) N(VK_ERROR_MEMORY_MAP_FAILED)
    N(VK_ERROR_LAYER_NOT_PRESENT) N(VK_ERROR_EXTENSION_NOT_PRESENT)
    N(VK_ERROR_FEATURE_NOT_PRESENT) N(VK_ERROR_INCOMPATIBLE_DRIVER) N(VK_ERROR_TOO_MANY_OBJECTS)
    N(VK_ERROR_FORMAT_NOT_SUPPORTED) N(VK_ERROR_FRAGMENTED_POOL) N(VK_ERROR_UNKNOWN)
    N(VK_ERROR_OUT_OF_POOL_MEMORY) N(VK_ERROR_INVALID_EXTERNAL_HANDLE) N(VK_ERROR_FRAGMENTATION)
    N(VK_ERROR_INVALID_OPAQUE_CAPTURE_ADDRESS) N(VK_PIPELINE_COMPILE_REQUIRED)
    N(VK_ERROR_VALIDATION_FAILED_EXT) N(VK_ERROR_INVALID_SHADER_NV)
#undef N
    default: return "VK_ERROR_(unknown)";
    }
}

cvq_status cvq_vk_status_of(VkResult r) {
    switch (r) {
    case VK_ERROR_OUT_OF_DEVICE_MEMORY: return CVQ_ERR_DEVICE_OUT_OF_MEMORY;
    case VK_ERROR_OUT_OF_HOST_MEMORY: return CVQ_ERR_OUT_OF_MEMORY;
    case VK_ERROR_DEVICE_LOST: return CVQ_ERR_DEVICE_LOST;
    default: return CVQ_ERR_DEVICE;
    }
}

cvq_status cvq_vk_error(cvq_context *ctx, VkResult r, const char *file, int line,
                        const char *what) {
    return cvq__error(ctx, cvq_vk_status_of(r), file, line, "%s failed: %s (%d)", what,
                      cvq_vk_result_name(r), (int)r);
}

/* ---- validation messenger ------------------------------------------------------- */

static VKAPI_ATTR VkBool32 VKAPI_CALL on_message(
    VkDebugUtilsMessageSeverityFlagBitsEXT severity, VkDebugUtilsMessageTypeFlagsEXT types,
    const VkDebugUtilsMessengerCallbackDataEXT *data, void *user) {
    (void)types;
    (void)user;
    if (severity & (VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT |
                    VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT)) {
        atomic_fetch_add(&g_messages, 1);
        fprintf(stderr, "commvq vulkan validation %s: %s\n",
                (severity & VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT) ? "error" : "warning",
                data && data->pMessage ? data->pMessage : "(no message)");
    }
    return VK_FALSE; /* never abort the call */
}

static void messenger_info(VkDebugUtilsMessengerCreateInfoEXT *mi) {
    memset(mi, 0, sizeof *mi);
    mi->sType = VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT;
    mi->messageSeverity = VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT |
                          VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT;
    mi->messageType = VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT |
                      VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT |
                      VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT;
    mi->pfnUserCallback = on_message;
}

/* ---- instance creation ---------------------------------------------------------- */

static bool env_on(const char *name) {
    const char *v = getenv(name);
    return v && v[0] && strcmp(v, "0") != 0;
}

static void *load_symbol(void *lib, const char *name) {
    return dlsym(lib, name);
}

static bool has_name(const char *const *names, uint32_t n, const char *want) {
    for (uint32_t i = 0; i < n; i++)
        if (strcmp(names[i], want) == 0) return true;
    return false;
}

static void process_fail(cvq_status s, const char *msg) {
    g_proc.status = s;
    snprintf(g_proc.why, sizeof g_proc.why, "%s", msg);
}

static void process_init(void) {
    memset(&g_proc, 0, sizeof g_proc);
    /* COMMVQ_VULKAN_LOADER names the loader library to use instead (a
     * loader shipped next to the application, or none for tests). */
    const char *path = getenv("COMMVQ_VULKAN_LOADER");
    void *lib = NULL;
    if (path && path[0]) {
        lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (!lib) {
            char msg[256];
            snprintf(msg, sizeof msg, "no Vulkan loader (COMMVQ_VULKAN_LOADER=%.160s cannot be opened)", path);
            process_fail(CVQ_ERR_NO_DEVICE, msg);
            return;
        }
    } else {
        lib = dlopen("libvulkan.so.1", RTLD_NOW | RTLD_LOCAL);
        if (!lib) lib = dlopen("libvulkan.so", RTLD_NOW | RTLD_LOCAL);
        if (!lib) {
            process_fail(CVQ_ERR_NO_DEVICE, "no Vulkan loader (libvulkan.so.1 not found)");
            return;
        }
    }
    /* The library stays loaded until exit (see the file comment). */
    PFN_vkGetInstanceProcAddr gipa;
    void *sym = load_symbol(lib, "vkGetInstanceProcAddr");
    if (!sym) {
        process_fail(CVQ_ERR_NO_DEVICE, "the Vulkan loader has no vkGetInstanceProcAddr");
        return;
    }
    memcpy(&gipa, &sym, sizeof gipa); /* POSIX: object and function pointers convert */

    PFN_vkEnumerateInstanceVersion eiv =
        (PFN_vkEnumerateInstanceVersion)gipa(NULL, "vkEnumerateInstanceVersion");
    PFN_vkEnumerateInstanceLayerProperties eilp =
        (PFN_vkEnumerateInstanceLayerProperties)gipa(NULL, "vkEnumerateInstanceLayerProperties");
    PFN_vkEnumerateInstanceExtensionProperties eiep =
        (PFN_vkEnumerateInstanceExtensionProperties)gipa(NULL, "vkEnumerateInstanceExtensionProperties");
    PFN_vkCreateInstance ci = (PFN_vkCreateInstance)gipa(NULL, "vkCreateInstance");
    if (!ci || !eiep) {
        process_fail(CVQ_ERR_NO_DEVICE, "the Vulkan loader lacks vkCreateInstance");
        return;
    }
    uint32_t loader_version = VK_API_VERSION_1_0;
    if (eiv && eiv(&loader_version) != VK_SUCCESS) loader_version = VK_API_VERSION_1_0;
    /* Ask for 1.2 (what the kernels need); a 1.0/1.1 loader still lists
     * devices, which are then reported unusable. */
    uint32_t api = loader_version >= VK_API_VERSION_1_2 ? VK_API_VERSION_1_2 : loader_version;
    if (api < VK_API_VERSION_1_1 && loader_version >= VK_API_VERSION_1_1) api = VK_API_VERSION_1_1;

    const char *exts[4];
    uint32_t n_ext = 0;
    const char *layers[1];
    uint32_t n_layer = 0;
    VkInstanceCreateFlags flags = 0;

    /* Instance extensions present (static: this runs once, and the process
     * has no allocator of its own). */
    static VkExtensionProperties avail[256];
    uint32_t n_avail = 256;
    VkResult er = eiep(NULL, &n_avail, avail);
    if (er != VK_SUCCESS && er != VK_INCOMPLETE) n_avail = 0;
    bool have_portability = false, have_debug = false;
    for (uint32_t i = 0; i < n_avail; i++) {
        if (strcmp(avail[i].extensionName, "VK_KHR_portability_enumeration") == 0)
            have_portability = true;
        if (strcmp(avail[i].extensionName, VK_EXT_DEBUG_UTILS_EXTENSION_NAME) == 0)
            have_debug = true;
    }
    if (have_portability) {
        /* MoltenVK and other layered drivers are listed only when asked. */
        exts[n_ext++] = "VK_KHR_portability_enumeration";
        flags |= 0x00000001; /* VK_INSTANCE_CREATE_ENUMERATE_PORTABILITY_BIT_KHR */
    }

    if (env_on("COMMVQ_VK_VALIDATION")) {
        static VkLayerProperties lp[128];
        uint32_t n_l = 128;
        bool found = false;
        VkResult lr = eilp ? eilp(&n_l, lp) : VK_ERROR_INITIALIZATION_FAILED;
        if (lr == VK_SUCCESS || lr == VK_INCOMPLETE)
            for (uint32_t i = 0; i < n_l; i++)
                if (strcmp(lp[i].layerName, "VK_LAYER_KHRONOS_validation") == 0) found = true;
        if (found) {
            layers[n_layer++] = "VK_LAYER_KHRONOS_validation";
            /* The layer provides VK_EXT_debug_utils itself. */
            have_debug = true;
        } else {
            fprintf(stderr, "commvq vulkan: COMMVQ_VK_VALIDATION is set but "
                            "VK_LAYER_KHRONOS_validation is not installed\n");
        }
    }
    bool messenger = n_layer > 0 && have_debug;
    if (messenger && !has_name(exts, n_ext, VK_EXT_DEBUG_UTILS_EXTENSION_NAME))
        exts[n_ext++] = VK_EXT_DEBUG_UTILS_EXTENSION_NAME;

    VkApplicationInfo app;
    memset(&app, 0, sizeof app);
    app.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO;
    app.pApplicationName = "commvq";
    app.pEngineName = "commvq";
    app.engineVersion = VK_MAKE_API_VERSION(0, CVQ_VERSION_MAJOR, CVQ_VERSION_MINOR, CVQ_VERSION_PATCH);
    app.apiVersion = api;
    VkDebugUtilsMessengerCreateInfoEXT mi;
    messenger_info(&mi);
    VkInstanceCreateInfo ici;
    memset(&ici, 0, sizeof ici);
    ici.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO;
    ici.pNext = messenger ? &mi : NULL; /* covers vkCreateInstance itself */
    ici.flags = flags;
    ici.pApplicationInfo = &app;
    ici.enabledLayerCount = n_layer;
    ici.ppEnabledLayerNames = n_layer ? layers : NULL;
    ici.enabledExtensionCount = n_ext;
    ici.ppEnabledExtensionNames = n_ext ? exts : NULL;
    VkInstance inst = VK_NULL_HANDLE;
    VkResult r = ci(&ici, NULL, &inst);
    if (r == VK_ERROR_INCOMPATIBLE_DRIVER) {
        process_fail(CVQ_ERR_NO_DEVICE, "no Vulkan device (no compatible driver: VK_ERROR_INCOMPATIBLE_DRIVER)");
        return;
    }
    if (r != VK_SUCCESS) {
        char msg[160];
        snprintf(msg, sizeof msg, "no Vulkan device (vkCreateInstance failed: %s)", cvq_vk_result_name(r));
        process_fail(r == VK_ERROR_OUT_OF_HOST_MEMORY ? CVQ_ERR_OUT_OF_MEMORY : CVQ_ERR_NO_DEVICE, msg);
        return;
    }
    g_proc.instance = inst;
    g_proc.instance_version = api;
    g_proc.validation = n_layer > 0;
    if (messenger) {
        PFN_vkCreateDebugUtilsMessengerEXT cm =
            (PFN_vkCreateDebugUtilsMessengerEXT)gipa(inst, "vkCreateDebugUtilsMessengerEXT");
        VkDebugUtilsMessengerEXT m;
        if (!cm || cm(inst, &mi, NULL, &m) != VK_SUCCESS)
            fprintf(stderr, "commvq vulkan: cannot create the validation messenger\n");
        /* kept until exit, like the instance */
    }

    const char *missing = NULL;
#define CVQ_VK_X(n)                                                          \
    g_proc.fn.n = (PFN_vk##n)gipa(inst, "vk" #n);                            \
    if (!g_proc.fn.n && !missing) missing = "vk" #n;
    CVQ_VK_INSTANCE_FNS(CVQ_VK_X)
#undef CVQ_VK_X
    if (missing) {
        char msg[160];
        snprintf(msg, sizeof msg, "no Vulkan device (the loader lacks %s)", missing);
        process_fail(CVQ_ERR_NO_DEVICE, msg);
        return;
    }
    if (api >= VK_API_VERSION_1_1) {
        g_proc.fn.GetPhysicalDeviceProperties2 =
            (PFN_vkGetPhysicalDeviceProperties2)gipa(inst, "vkGetPhysicalDeviceProperties2");
        g_proc.fn.GetPhysicalDeviceFeatures2 =
            (PFN_vkGetPhysicalDeviceFeatures2)gipa(inst, "vkGetPhysicalDeviceFeatures2");
    }

    uint32_t n = CVQ_VK_MAX_DEVICES;
    r = g_proc.fn.EnumeratePhysicalDevices(inst, &n, g_proc.phys);
    if (r != VK_SUCCESS && r != VK_INCOMPLETE) {
        char msg[160];
        snprintf(msg, sizeof msg, "no Vulkan device (vkEnumeratePhysicalDevices failed: %s)",
                 cvq_vk_result_name(r));
        process_fail(CVQ_ERR_NO_DEVICE, msg);
        return;
    }
    g_proc.n_phys = n;
    if (n == 0) {
        process_fail(CVQ_ERR_NO_DEVICE, "no Vulkan device");
        return;
    }
    g_proc.status = CVQ_OK;
}

const cvq_vk_process *cvq_vk_process_get(void) {
    pthread_once(&g_once, process_init);
    return &g_proc;
}
