/*
 * The CUDA backend's table (core/backend.h): devices, context state,
 * buffers (device memory, copies ordered on the context's stream), and the
 * ops of cuda_ops.c.
 *
 * The runtime is linked statically; on a machine without the NVIDIA driver
 * cudaGetDeviceCount fails (cudaErrorInsufficientDriver, or
 * cudaErrorNoDevice) and the backend reports CVQ_ERR_NO_DEVICE with the
 * CUDA error's name, so `auto` picks another backend.
 */
#define _POSIX_C_SOURCE 200809L
#include "cuda_internal.h"

#include <stdio.h>
#include <string.h>

cvq_status cvq_cu_fail(cvq_context *ctx, int err, const char *what, const char *file, int line) {
    const cudaError_t e = (cudaError_t)err;
    cvq_status st = CVQ_ERR_DEVICE;
    switch (e) {
    case cudaErrorMemoryAllocation: st = CVQ_ERR_DEVICE_OUT_OF_MEMORY; break;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice: st = CVQ_ERR_NO_DEVICE; break;
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable: st = CVQ_ERR_DEVICE_LOST; break;
    default: break;
    }
    (void)cudaGetLastError(); /* reset the runtime's non-sticky last error */
    return cvq__error(ctx, st, file, line, "CUDA: %s failed: %s (%s)", what, cudaGetErrorName(e),
                      cudaGetErrorString(e));
}

cvq_status cvq_cu_enter(cvq_cuda *cu) {
    CVQ_CU_TRY(cu->ctx, cudaSetDevice(cu->device));
    return CVQ_OK;
}

/* Device count, or the reason there is none. */
static cvq_status device_count(int *n) {
    *n = 0;
    const cudaError_t e = cudaGetDeviceCount(n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        *n = 0;
        return CVQ_FAIL(NULL, CVQ_ERR_NO_DEVICE, "no CUDA device (%s: %s)", cudaGetErrorName(e),
                        cudaGetErrorString(e));
    }
    if (*n == 0) return CVQ_FAIL(NULL, CVQ_ERR_NO_DEVICE, "no CUDA device (cudaGetDeviceCount found none)");
    return CVQ_OK;
}

static int attr(enum cudaDeviceAttr a, int dev) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, a, dev) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return v;
}

static void device_info(int i, cvq_device_info *o) {
    memset(o, 0, sizeof *o);
    o->backend = CVQ_BACKEND_CUDA;
    o->index = (uint32_t)i;
    struct cudaDeviceProp prop;
    memset(&prop, 0, sizeof prop);
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) (void)cudaGetLastError();
    /* the name is cut to fit o->name (128 bytes; CUDA allows 256) */
    const char *nm = prop.name[0] ? prop.name : "CUDA device";
    size_t len = strnlen(nm, sizeof prop.name);
    if (len >= sizeof o->name) len = sizeof o->name - 1;
    memcpy(o->name, nm, len);
    o->name[len] = '\0';
    const int major = attr(cudaDevAttrComputeCapabilityMajor, i);
    const int minor = attr(cudaDevAttrComputeCapabilityMinor, i);
    int drv = 0, rt = 0;
    if (cudaDriverGetVersion(&drv) != cudaSuccess) (void)cudaGetLastError();
    if (cudaRuntimeGetVersion(&rt) != cudaSuccess) (void)cudaGetLastError();
    snprintf(o->driver, sizeof o->driver, "CUDA driver %d.%d, runtime %d.%d (static), sm_%d%d", drv / 1000,
             (drv % 1000) / 10, rt / 1000, (rt % 1000) / 10, major, minor);
    o->type = attr(cudaDevAttrIntegrated, i) ? CVQ_DEVICE_INTEGRATED_GPU : CVQ_DEVICE_DISCRETE_GPU;
    o->memory_bytes = (uint64_t)prop.totalGlobalMem;
    o->max_buffer_bytes = (uint64_t)prop.totalGlobalMem;
    o->shared_memory_bytes = (uint32_t)attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, i);
    o->subgroup_size = (uint32_t)attr(cudaDevAttrWarpSize, i);
    o->compute_units = (uint32_t)attr(cudaDevAttrMultiProcessorCount, i);
    o->exactness = CVQ_EXACT_GUARANTEED;
    o->usable = major > 7 || (major == 7 && minor >= 5);
    if (o->usable)
        snprintf(o->note, sizeof o->note,
                 "codes bit-exact by construction (numerics contract); check with cuda_check on this GPU");
    else
        snprintf(o->note, sizeof o->note, "compute capability %d.%d: the CUDA backend needs 7.5 or newer",
                 major, minor);
}

static cvq_status cu_list_devices(cvq_device_info *out, size_t cap, size_t *count) {
    int n;
    *count = 0;
    cvq_status st = device_count(&n);
    if (st) return st;
    for (int i = 0; i < n; i++)
        if (out && (size_t)i < cap) device_info(i, &out[i]);
    *count = (size_t)n;
    return CVQ_OK;
}

static void cu_shutdown(void *state) {
    cvq_cuda *cu = state;
    if (!cu) return;
    if (cudaSetDevice(cu->device) == cudaSuccess) {
        if (cu->stream) (void)cudaStreamSynchronize(cu->stream);
        cvq_cu_tables_close(cu);
        if (cu->scratch) (void)cudaFree(cu->scratch);
        if (cu->status) (void)cudaFree(cu->status);
        if (cu->own_stream) (void)cudaStreamDestroy(cu->own_stream);
    }
    (void)cudaGetLastError();
    cvq_allocator a = cu->ctx->alloc;
    cvq__free(&a, cu);
}

static cvq_status cu_init(cvq_context *ctx, int device, void **state) {
    *state = NULL;
    int n;
    cvq_status st = device_count(&n);
    if (st) return st; /* the message is set (thread-local); the core prefixes the backend */
    if (device < 0) device = 0;
    if (device >= n) return CVQ_FAIL(ctx, CVQ_ERR_NO_DEVICE, "CUDA device %d does not exist (%d found)", device, n);
    cvq_device_info info;
    device_info(device, &info);
    if (!info.usable) return CVQ_FAIL(ctx, CVQ_ERR_NO_DEVICE, "CUDA device %d (%s): %s", device, info.name, info.note);
    cvq_cuda *cu = cvq__calloc(&ctx->alloc, 1, sizeof *cu);
    if (!cu) return CVQ_FAIL(ctx, CVQ_ERR_OUT_OF_MEMORY, "cannot allocate the CUDA context state");
    cu->ctx = ctx;
    cu->device = device;
    cu->cc_major = attr(cudaDevAttrComputeCapabilityMajor, device);
    cu->cc_minor = attr(cudaDevAttrComputeCapabilityMinor, device);
    cu->n_sm = (uint32_t)attr(cudaDevAttrMultiProcessorCount, device);
    /* the kernels' dynamic shared memory; 1 KiB stays for their static
     * __shared__ variables (the opt-in limit counts both) */
    cu->smem_max = (size_t)attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    cu->smem_max = cu->smem_max > 2048 ? cu->smem_max - 1024 : cu->smem_max;
    st = cvq_cu_enter(cu);
    if (!st) {
        cudaError_t e = cudaStreamCreateWithFlags(&cu->own_stream, cudaStreamNonBlocking);
        if (e != cudaSuccess) st = cvq_cu_fail(ctx, (int)e, "cudaStreamCreateWithFlags", __FILE__, __LINE__);
    }
    if (!st) {
        cudaError_t e = cudaMalloc((void **)&cu->status, 2 * sizeof(uint32_t));
        if (e == cudaSuccess) e = cudaMemsetAsync(cu->status, 0, 2 * sizeof(uint32_t), cu->own_stream);
        if (e == cudaSuccess) e = cudaStreamSynchronize(cu->own_stream);
        if (e != cudaSuccess) st = cvq_cu_fail(ctx, (int)e, "cudaMalloc(status word)", __FILE__, __LINE__);
    }
    cu->stream = cu->own_stream;
    if (st) {
        cu_shutdown(cu);
        return st;
    }
    *state = cu;
    return CVQ_OK;
}

/* ---- buffers: device memory; copies ordered after the stream's work -------------------- */

static cvq_status cu_buffer_alloc(void *state, size_t size, cvq_buffer *out) {
    cvq_cuda *cu = state;
    cvq_status st = cvq_cu_enter(cu);
    if (st) return st;
    void *p = NULL;
    const cudaError_t e = cudaMalloc(&p, size ? size : 1);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return CVQ_FAIL(cu->ctx, e == cudaErrorMemoryAllocation ? CVQ_ERR_DEVICE_OUT_OF_MEMORY : CVQ_ERR_DEVICE,
                        "CUDA: cudaMalloc(%zu bytes) failed: %s", size, cudaGetErrorName(e));
    }
    out->host = NULL;
    out->handle = p;
    out->size = size;
    return CVQ_OK;
}

static void cu_buffer_free(void *state, cvq_buffer *buf) {
    cvq_cuda *cu = state;
    if (!buf || !buf->handle) return;
    if (cudaSetDevice(cu->device) == cudaSuccess) {
        (void)cudaStreamSynchronize(cu->stream); /* kernels may still read it */
        (void)cudaFree(buf->handle);
    }
    (void)cudaGetLastError();
    buf->handle = NULL;
}

static cvq_status cu_buffer_write(void *state, const cvq_buffer *buf, size_t off, const void *src, size_t n) {
    cvq_cuda *cu = state;
    cvq_status st = cvq_cu_enter(cu);
    if (st) return st;
    CVQ_CU_TRY(cu->ctx, cudaMemcpyAsync((char *)buf->handle + off, src, n, cudaMemcpyHostToDevice, cu->stream));
    CVQ_CU_TRY(cu->ctx, cudaStreamSynchronize(cu->stream)); /* src may be freed after return */
    return CVQ_OK;
}

static cvq_status cu_buffer_read(void *state, const cvq_buffer *buf, size_t off, void *dst, size_t n) {
    cvq_cuda *cu = state;
    cvq_status st = cvq_cu_enter(cu);
    if (st) return st;
    CVQ_CU_TRY(cu->ctx, cudaMemcpyAsync(dst, (const char *)buf->handle + off, n, cudaMemcpyDeviceToHost, cu->stream));
    CVQ_CU_TRY(cu->ctx, cudaStreamSynchronize(cu->stream));
    return CVQ_OK;
}

const cvq_backend_i cvq_backend_cuda = {
    CVQ_BACKEND_API_VERSION,
    CVQ_BACKEND_CUDA,
    "cuda",
    cu_list_devices,
    cu_init,
    cu_shutdown,
    cvq_cu_supports,
    cu_buffer_alloc,
    cu_buffer_free,
    cu_buffer_write,
    cu_buffer_read,
    cvq_cu_op_encode_keys,
    cvq_cu_op_encode_values,
    cvq_cu_op_attend,
};
