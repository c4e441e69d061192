/*
 * Internal declarations of the Vulkan backend, shared by its files:
 *   vk_loader.c   dlopen of the loader, the process-wide VkInstance, the
 *                 validation-layer messenger, VkResult -> cvq_status
 *   vk_device.c   physical-device capabilities, cvq_device_info, VkDevice
 *   vk_memory.c   buffers (device-local, mapped when the device allows),
 *                 staging copies, one-shot submission
 *   vk_pipeline.c kernels: SPIR-V choice, layouts, pipelines per geometry,
 *                 descriptor sets, recording helpers
 *   vk_tables.c   codebook tables uploaded once per (codebook, layer)
 *   vk_ops.c      encode_keys, encode_values, attend
 *   vk_interop.c  include/commvq_vulkan.h: contexts on an engine's device,
 *                 engine buffers as regions, recording into the engine's
 *                 command buffer, the deferred status
 *   vk_backend.c  the cvq_backend_i table
 * The loader is never linked: VK_NO_PROTOTYPES, every entry point comes
 * from vkGetInstanceProcAddr / vkGetDeviceProcAddr.
 */
#ifndef CVQ_VK_INTERNAL_H
#define CVQ_VK_INTERNAL_H

#ifndef VK_NO_PROTOTYPES
#define VK_NO_PROTOTYPES
#endif
#include <vulkan/vulkan.h>

#include "backend.h"
#include "commvq_vulkan.h"
#include "vk_backend.h"

/* ---- function tables ------------------------------------------------------ */

/* Instance-level entry points (process-wide). Those marked 1.1 are NULL on
 * a Vulkan 1.0 instance. */
#define CVQ_VK_INSTANCE_FNS(X)                                                      \
    X(EnumeratePhysicalDevices)                                                     \
    X(GetPhysicalDeviceProperties)                                                  \
    X(GetPhysicalDeviceFeatures)                                                    \
    X(GetPhysicalDeviceMemoryProperties)                                            \
    X(GetPhysicalDeviceQueueFamilyProperties)                                       \
    X(EnumerateDeviceExtensionProperties)                                           \
    X(CreateDevice)                                                                 \
    X(GetDeviceProcAddr)

typedef struct cvq_vk_ifn {
#define CVQ_VK_X(n) PFN_vk##n n;
    CVQ_VK_INSTANCE_FNS(CVQ_VK_X)
#undef CVQ_VK_X
    PFN_vkGetPhysicalDeviceProperties2 GetPhysicalDeviceProperties2; /* 1.1 */
    PFN_vkGetPhysicalDeviceFeatures2 GetPhysicalDeviceFeatures2;     /* 1.1 */
} cvq_vk_ifn;

#define CVQ_VK_DEVICE_FNS(X)                                                        \
    X(DestroyDevice) X(GetDeviceQueue) X(DeviceWaitIdle) X(QueueSubmit)             \
    X(CreateBuffer) X(DestroyBuffer) X(GetBufferMemoryRequirements)                 \
    X(AllocateMemory) X(FreeMemory) X(BindBufferMemory) X(MapMemory) X(UnmapMemory) \
    X(CreateCommandPool) X(DestroyCommandPool) X(AllocateCommandBuffers)            \
    X(ResetCommandBuffer) X(BeginCommandBuffer) X(EndCommandBuffer)                 \
    X(CmdCopyBuffer) X(CmdFillBuffer) X(CmdPipelineBarrier) X(CmdBindPipeline)      \
    X(CmdBindDescriptorSets) X(CmdPushConstants) X(CmdDispatch)                     \
    X(CreateFence) X(DestroyFence) X(ResetFences) X(WaitForFences)                  \
    X(CreateShaderModule) X(DestroyShaderModule)                                    \
    X(CreateDescriptorSetLayout) X(DestroyDescriptorSetLayout)                      \
    X(CreatePipelineLayout) X(DestroyPipelineLayout)                                \
    X(CreateComputePipelines) X(DestroyPipeline)                                    \
    X(CreateDescriptorPool) X(DestroyDescriptorPool) X(ResetDescriptorPool)         \
    X(AllocateDescriptorSets) X(UpdateDescriptorSets)

typedef struct cvq_vk_dfn {
#define CVQ_VK_X(n) PFN_vk##n n;
    CVQ_VK_DEVICE_FNS(CVQ_VK_X)
#undef CVQ_VK_X
} cvq_vk_dfn;

/* ---- the process: loader and instance (vk_loader.c) --------------------------- */

#define CVQ_VK_MAX_DEVICES 16

typedef struct cvq_vk_process {
    cvq_status status;          /* CVQ_OK, or why Vulkan cannot be used      */
    char why[256];              /* message for status != CVQ_OK              */
    VkInstance instance;
    uint32_t instance_version;  /* the API version the instance was made for */
    cvq_vk_ifn fn;
    uint32_t n_phys;
    VkPhysicalDevice phys[CVQ_VK_MAX_DEVICES];
    bool validation;            /* VK_LAYER_KHRONOS_validation is enabled    */
} cvq_vk_process;

/* The process-wide instance, created on first call (thread-safe) and kept
 * until exit. Never NULL; check ->status. */
const cvq_vk_process *cvq_vk_process_get(void);

/* "VK_ERROR_OUT_OF_DEVICE_MEMORY" ... */
const char *cvq_vk_result_name(VkResult r);
/* Device memory -> CVQ_ERR_DEVICE_OUT_OF_MEMORY, lost -> CVQ_ERR_DEVICE_LOST,
 * host memory -> CVQ_ERR_OUT_OF_MEMORY, anything else -> CVQ_ERR_DEVICE. */
cvq_status cvq_vk_status_of(VkResult r);
/* Records "<what>: <VkResult name>" at file:line and returns the status. */
cvq_status cvq_vk_error(cvq_context *ctx, VkResult r, const char *file, int line,
                        const char *what);
#define CVQ_VK_FAIL(ctx, r, what) cvq_vk_error((ctx), (r), __FILE__, __LINE__, (what))

/* ---- devices (vk_device.c) --------------------------------------------------- */

/* Largest scratch buffer an op allocates; larger calls run in chunks
 * (vk_ops.c). COMMVQ_VK_SCRATCH_BUDGET (bytes) lowers it, for tests. */
#define CVQ_VK_SCRATCH_BUDGET ((size_t)64 << 20)

/* The limits our kernels need (also in docs/backends.md). */
#define CVQ_VK_NEED_STORAGE_BUFFERS 19u /* attend.comp's bindings */
#define CVQ_VK_NEED_WG_SIZE 64u
#define CVQ_VK_NEED_PUSH_BYTES 128u

typedef struct cvq_vk_caps {
    VkPhysicalDeviceProperties props;
    VkPhysicalDeviceMemoryProperties mem;
    uint32_t api_version;       /* min(device, instance) */
    uint32_t subgroup_size;     /* 0 if unknown */
    bool denorm_preserve32, rte32, szinp32; /* fp32 float controls */
    bool shader_float64, shader_int64, shader_int16;
    bool shader_int8, shader_float16, storage8, storage16;
    uint64_t max_alloc;         /* maxMemoryAllocationSize (or a guess)      */
    int queue_family;           /* first family with compute, -1 if none     */
    uint32_t driver_id;         /* VkDriverId (0 if unknown)                 */
    uint32_t loop_budget;       /* loop iterations a shader invocation may run
                                   before the driver cuts it short; 0 = none */
    char driver_name[VK_MAX_DRIVER_NAME_SIZE];
    char driver_info[VK_MAX_DRIVER_INFO_SIZE];
    bool usable;
    char note[160];
} cvq_vk_caps;

/* Capabilities of physical device `index` of the process. */
void cvq_vk_caps_get(const cvq_vk_process *p, uint32_t index, cvq_vk_caps *out);
/* True when the device has the fp32 float controls the encoder variants
 * built with CVQ_FLOAT_CONTROLS declare (shaders/numerics.glsl): denormal
 * preservation, round to nearest even, signed zero / Inf / NaN
 * preservation. */
static inline bool cvq_vk_float_controls(const cvq_vk_caps *c) {
    return c->denorm_preserve32 && c->rte32 && c->szinp32;
}

/* ---- per-context state ------------------------------------------------------ */

/* A device buffer (cvq_buffer.handle points to one). */
typedef struct cvq_vk_buf {
    VkBuffer buf;
    VkDeviceMemory mem;
    VkDeviceSize size;          /* bytes of the VkBuffer (>= 4, multiple of 4) */
    void *map;                  /* persistent mapping, or NULL                 */
} cvq_vk_buf;

/* Kernels (one per shader file the host drives). */
typedef enum cvq_vk_kernel_id {
    CVQ_VK_K_ENCODE_KEYS = 0,
    CVQ_VK_K_ENCODE_VALUES,
    CVQ_VK_K_PACK_U16,
    CVQ_VK_K_PACK_BITS,
    CVQ_VK_K_ATTEND,
    CVQ_VK_K_PACK_CODES12,
    CVQ_VK_K_COUNT
} cvq_vk_kernel_id;

/* Specialization constants, in the order of the CVQ_SC_* ids. */
#define CVQ_VK_N_SPEC 11
typedef struct cvq_vk_spec {
    uint32_t v[CVQ_VK_N_SPEC];
} cvq_vk_spec;

typedef struct cvq_vk_kernel {
    bool tried;                 /* layouts / module creation attempted       */
    VkShaderModule module;
    VkDescriptorSetLayout dsl;
    VkPipelineLayout layout;
} cvq_vk_kernel;

typedef struct cvq_vk_pipe {
    cvq_vk_kernel_id kernel;
    cvq_vk_spec spec;
    VkPipeline pipeline;
} cvq_vk_pipe;

struct cvq_vk_tables;

/* A growable device scratch buffer (reused across calls). */
typedef struct cvq_vk_scratch {
    cvq_buffer b;
} cvq_vk_scratch;

/* Status words: one per call, each in its own slot of the status buffer
 * (slots are minStorageBufferOffsetAlignment apart so that each binds at
 * an aligned offset). Slot 0 serves calls that submit and wait; slots 1..
 * go to calls recorded into an engine's command buffer, one each, until
 * cvq_vulkan_collect_status. */
#define CVQ_VK_STATUS_SLOTS 256u

/* Something recorded work may still use: destroyed at the next collect
 * (or at context free) instead of at once. */
typedef struct cvq_vk_retired {
    VkDescriptorPool pool;      /* or VK_NULL_HANDLE */
    cvq_buffer buf;             /* or empty */
} cvq_vk_retired;

typedef struct cvq_vk {
    cvq_context *ctx;           /* for messages and the allocator            */
    const cvq_vk_process *proc;
    uint32_t index;
    VkPhysicalDevice phys;
    cvq_vk_caps caps;
    VkDevice dev;
    cvq_vk_dfn fn;
    VkQueue queue;
    VkCommandPool cmd_pool;
    VkCommandBuffer cmd;
    VkFence fence;
    VkDescriptorPool desc_pool;
    bool lost;                  /* VK_ERROR_DEVICE_LOST seen: refuse work    */
    size_t scratch_budget;      /* largest scratch buffer of an op (bytes)   */
    uint32_t max_groups;        /* workgroups per vkCmdDispatch along x      */
    /* memory */
    VkMemoryPropertyFlags mem_need; /* properties of device buffers' memory */
    bool unified;               /* device buffers are mapped (no staging)    */
    cvq_vk_buf staging;         /* host-visible bounce buffer, grown on need */
    /* kernels */
    bool fc;                    /* float-controls encoder variants in use    */
    cvq_vk_kernel kernels[CVQ_VK_K_COUNT];
    cvq_vk_pipe *pipes;
    size_t n_pipes, cap_pipes;
    /* codebook tables, most recently used first */
    struct cvq_vk_tables *tables;
    /* scratch */
    cvq_vk_scratch s_codes, s_vscratch, s_bits, s_attend, s_dummy, s_scales;
    cvq_vk_buf status;          /* host-visible status slots of the encoders */
    VkDeviceSize slot_stride;   /* bytes between status slots                */
    uint32_t sets_used;         /* descriptor sets taken since cmd_begin     */
    /* the command buffer the recording helpers write to: vk->cmd, or the
     * engine's (vk->rec) while a call records into it */
    VkCommandBuffer cur;
    /* engine interop (vk_interop.c) */
    bool external;              /* device, queue, instance are the engine's  */
    cvq_vk_process ext_proc;    /* the engine's instance and its functions   */
    VkCommandBuffer rec;        /* engine command buffer between begin/end   */
    bool pending;               /* recorded work not yet collected           */
    uint32_t slots_used;        /* status slots 1..slots_used are recorded   */
    VkDescriptorPool rec_pool;  /* descriptor sets of recorded work          */
    uint32_t rec_sets_used;
    cvq_vk_retired *retired;
    size_t n_retired, cap_retired;
} cvq_vk;

/* ---- the context state (vk_backend.c) ----------------------------------------------- */

/* After the device is open: memory mode, float controls, test knobs. */
cvq_status cvq_vk_state_setup(cvq_vk *vk);
/* Releases everything of the state (the backend's shutdown entry). */
void cvq_vk_shutdown(void *state);

/* ---- device (vk_device.c) ------------------------------------------------------- */

/* Opens physical device `index` (-1: the best usable one) into vk. On
 * failure everything created is released. */
cvq_status cvq_vk_device_open(cvq_vk *vk, int index);
/* Adopts an engine's device (vk->external): fills vk->ext_proc, caps and
 * function tables from the engine's handles and creates the context's own
 * objects on its device (never the device itself). Released by close. */
cvq_status cvq_vk_device_adopt(cvq_vk *vk, const cvq_vulkan_device_desc *d);
void cvq_vk_device_close(cvq_vk *vk);
/* A descriptor pool of CVQ_VK_MAX_SETS sets of up to
 * CVQ_VK_NEED_STORAGE_BUFFERS storage buffers. */
cvq_status cvq_vk_pool_create(cvq_vk *vk, VkDescriptorPool *out);
/* The device index `-1` means: best usable (discrete > integrated >
 * virtual > other > CPU); -1 if none. */
int cvq_vk_best_device(const cvq_vk_process *p);
/* Fills info for device index. */
void cvq_vk_device_info(const cvq_vk_process *p, uint32_t index, cvq_device_info *info);

/* ---- memory (vk_memory.c) -------------------------------------------------------- */

cvq_status cvq_vk_memory_init(cvq_vk *vk);
void cvq_vk_memory_close(cvq_vk *vk);
cvq_status cvq_vk_buffer_alloc(void *state, size_t size, cvq_buffer *out);
void cvq_vk_buffer_free(void *state, cvq_buffer *buf);
cvq_status cvq_vk_buffer_write(void *state, const cvq_buffer *buf, size_t off, const void *src,
                               size_t n);
cvq_status cvq_vk_buffer_read(void *state, const cvq_buffer *buf, size_t off, void *dst,
                              size_t n);
static inline cvq_vk_buf *cvq_vk_buf_of(const cvq_buffer *b) {
    return b ? (cvq_vk_buf *)b->handle : NULL;
}
/* The host-visible, mapped status buffer (created on first use). */
cvq_status cvq_vk_status_buffer(cvq_vk *vk);
/* Frees buf now, or, while recorded work is pending (vk->pending), puts it
 * on the retired list (room reserved by cvq_vk_retire_reserve). */
void cvq_vk_buffer_release(cvq_vk *vk, cvq_buffer *buf);
/* Room for `n` more retired entries (so that retiring never fails). */
cvq_status cvq_vk_retire_reserve(cvq_vk *vk, size_t n);
/* Destroys everything retired (the recorded work has completed). */
void cvq_vk_retired_free(cvq_vk *vk);
/* Makes s at least `bytes` long (contents not kept). */
cvq_status cvq_vk_scratch_reserve(cvq_vk *vk, cvq_vk_scratch *s, size_t bytes);
void cvq_vk_scratch_free(cvq_vk *vk, cvq_vk_scratch *s);

/* Command recording around the context's one command buffer: begin, then
 * record, then submit_wait (one fence wait). */
cvq_status cvq_vk_cmd_begin(cvq_vk *vk);
cvq_status cvq_vk_cmd_submit_wait(cvq_vk *vk);
/* All previous shader/transfer writes visible to later shader/transfer
 * reads and writes. */
void cvq_vk_cmd_barrier(cvq_vk *vk);
/* Device writes visible to the host (before reading mapped memory). */
void cvq_vk_cmd_barrier_host(cvq_vk *vk);

/* ---- kernels and pipelines (vk_pipeline.c) ---------------------------------------------- */

/* Name of a kernel ("encode_keys"), its binding count. */
const char *cvq_vk_kernel_name(cvq_vk_kernel_id k);
uint32_t cvq_vk_kernel_bindings(cvq_vk_kernel_id k);
/* Every encoder has its float-controls variant embedded (then devices with
 * the float controls get codes bit-exact by guarantee). */
bool cvq_vk_fc_modules_present(void);
/* Whether kernel k can run on this device: its SPIR-V is embedded and the
 * device has the capabilities the module declares. CVQ_ERR_UNSUPPORTED with
 * a message otherwise. */
cvq_status cvq_vk_kernel_check(cvq_vk *vk, cvq_vk_kernel_id k);
/* The pipeline of kernel k specialised with spec (cached). */
cvq_status cvq_vk_pipeline(cvq_vk *vk, cvq_vk_kernel_id k, const cvq_vk_spec *spec,
                           VkPipeline *out);
void cvq_vk_pipelines_close(cvq_vk *vk);

/* A storage-buffer binding: a range of a buffer. */
typedef struct cvq_vk_range {
    VkBuffer buf;
    VkDeviceSize offset, range;
} cvq_vk_range;
/* The range of a view (from its offset to the buffer's end, clamped to
 * maxStorageBufferRange); an unallocated view binds the context's dummy
 * buffer. Fails if the offset is not aligned for storage buffers. */
cvq_status cvq_vk_range_of(cvq_vk *vk, cvq_view v, cvq_vk_range *out);
cvq_status cvq_vk_range_of_buf(cvq_vk *vk, const cvq_buffer *b, cvq_vk_range *out);
/* Descriptor sets one command buffer may take (the pool's size). */
#define CVQ_VK_MAX_SETS 128u
/* Allocates a descriptor set of kernel k from the context's pool (reset at
 * cmd_begin) and writes the bindings 0..n-1. */
cvq_status cvq_vk_descriptors(cvq_vk *vk, cvq_vk_kernel_id k, const cvq_vk_range *b, uint32_t n,
                              VkDescriptorSet *out);
/* Binds pipeline and set for the following dispatches. */
void cvq_vk_cmd_bind(cvq_vk *vk, cvq_vk_kernel_id k, VkPipeline p, VkDescriptorSet set);
void cvq_vk_cmd_push(cvq_vk *vk, cvq_vk_kernel_id k, const void *data, uint32_t bytes);

/* ---- codebook tables (vk_tables.c) ------------------------------------------------ */

typedef enum cvq_vk_tab {
    CVQ_VK_T_KEY_W = 0, CVQ_VK_T_KEY_N, CVQ_VK_T_KEY_G, CVQ_VK_T_ROPE_T,
    CVQ_VK_T_INV_LS, CVQ_VK_T_LN_W, CVQ_VK_T_LN_B, CVQ_VK_T_W1, CVQ_VK_T_B1,
    CVQ_VK_T_W2, CVQ_VK_T_B2, CVQ_VK_T_E, CVQ_VK_T_LS_EPS,
    CVQ_VK_T_COUNT
} cvq_vk_tab;

typedef struct cvq_vk_tables {
    struct cvq_vk_tables *next;
    const cvq_codebook *cb;
    uint64_t generation;
    uint32_t layer;
    uint64_t hash[CVQ_VK_T_COUNT]; /* content of each table (vk_tables.c)    */
    cvq_buffer t[CVQ_VK_T_COUNT];
} cvq_vk_tables;

/* Tables each op reads (bit k: cvq_vk_tab k). */
#define CVQ_VK_TB(k) (1u << (k))
#define CVQ_VK_USES_KEYS (CVQ_VK_TB(CVQ_VK_T_KEY_W) | CVQ_VK_TB(CVQ_VK_T_KEY_N) | CVQ_VK_TB(CVQ_VK_T_KEY_G))
#define CVQ_VK_USES_VALUES                                                                       \
    (CVQ_VK_TB(CVQ_VK_T_INV_LS) | CVQ_VK_TB(CVQ_VK_T_LN_W) | CVQ_VK_TB(CVQ_VK_T_LN_B) |            \
     CVQ_VK_TB(CVQ_VK_T_W1) | CVQ_VK_TB(CVQ_VK_T_B1) | CVQ_VK_TB(CVQ_VK_T_W2) |                   \
     CVQ_VK_TB(CVQ_VK_T_B2) | CVQ_VK_TB(CVQ_VK_T_E))
#define CVQ_VK_USES_ATTEND                                                                       \
    (CVQ_VK_TB(CVQ_VK_T_KEY_W) | CVQ_VK_TB(CVQ_VK_T_ROPE_T) | CVQ_VK_TB(CVQ_VK_T_E) |             \
     CVQ_VK_TB(CVQ_VK_T_LS_EPS))
/* The device tables of lv's layer of cb, uploaded on first use and
 * checked against the host tables in `used` on every call. */
cvq_status cvq_vk_tables_get(cvq_vk *vk, const cvq_codebook *cb, const cvq_layer_view *lv, uint32_t used,
                             const cvq_vk_tables **out);
void cvq_vk_tables_close(cvq_vk *vk);

/* ---- ops (vk_ops.c) ----------------------------------------------------------------- */

cvq_status cvq_vk_encode_keys(cvq_context *ctx, const cvq_encode_keys_args *a);
cvq_status cvq_vk_encode_values(cvq_context *ctx, const cvq_encode_values_args *a);
cvq_status cvq_vk_attend(cvq_context *ctx, const cvq_attend_args *a);

/* How an op runs: the host API's ops submit and wait (record = false,
 * slot 0); interop calls may record into vk->rec instead, get a status
 * slot of their own, and check their (device-resident) input in a pass of
 * its own before anything is encoded when the call runs in chunks. */
typedef struct cvq_vk_run {
    bool record;
    bool check_pass;
    bool packed12;      /* encode keys: 12-bit records instead of uint16 */
    uint32_t slot;
} cvq_vk_run;
cvq_status cvq_vk_encode_keys_run(cvq_vk *vk, const cvq_encode_keys_args *a, const cvq_vk_run *run);
cvq_status cvq_vk_encode_values_run(cvq_vk *vk, const cvq_encode_values_args *a, const cvq_vk_run *run);
cvq_status cvq_vk_attend_run(cvq_vk *vk, const cvq_attend_args *a, const cvq_vk_run *run);
/* The status of an encode call from its status word (0: CVQ_OK). */
cvq_status cvq_vk_status_of_word(cvq_vk *vk, uint32_t word, const char *what);

/* The sizes an op instance needs, checked against the device (supports). */
cvq_status cvq_vk_op_supported(cvq_vk *vk, const cvq_op_desc *d);

#endif
