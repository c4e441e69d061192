/*
 * The emulated CUDA device: the CUDA runtime functions the library uses,
 * implemented on the host, with the kernels of backends/cuda run by the
 * emulator (cuda_emu.h) through the .cu files' own launchers. Linked instead
 * of libcudart_static into `commvq_fakecuda` (tests/cuda/fake_device.cmake),
 * it lets the whole CUDA backend -- cuda_backend.c, cuda_ops.c,
 * cuda_interop.c, the launch sequences and plans, and programs such as
 * cuda_check -- run and be checked on a machine without a GPU.
 *
 * It is stricter than CUDA where that finds bugs, never looser:
 *   - streams must be destroyed once, by the stream API;
 *   - device memory comes from cudaMalloc only, filled with 0xA5 bytes (CUDA
 *     does not zero it); cudaMemcpy / cudaMemset check that every device
 *     range lies inside one allocation and that the copy kind matches where
 *     each pointer lives; cudaFree refuses a pointer it did not hand out;
 *   - a launch is checked as the runtime checks it (threads per block <=
 *     1024, grid y/z <= 65535, no empty grid, dynamic shared memory <= 48 KiB
 *     unless raised by cudaFuncSetAttribute, and never above the device's
 *     opt-in limit); a bad one does not run and sets the error that
 *     cudaGetLastError returns;
 *   - every failing call also sets the thread's last error, as in CUDA;
 *   - after a "fault" (COMMVQ_FAKE_CUDA_LOSE_AT) every call fails, cudaFree
 *     included, as on a CUDA context with a sticky error.
 * What it does not model: concurrency between streams (all work runs when
 * enqueued, so every stream is always idle), the device's rounding and memory
 * model, kernels dereferencing host memory.
 *
 * The device (environment, read once): COMMVQ_FAKE_CUDA_SM (multiprocessors,
 * default 8), COMMVQ_FAKE_CUDA_SMEM_KIB (opt-in shared memory per block,
 * default 227 = sm_90; 64 models sm_75), COMMVQ_FAKE_CUDA_DEVICES (0: no
 * device, cudaErrorNoDevice). Failure injection, counted from 1 over the
 * process: COMMVQ_FAKE_CUDA_FAIL_MALLOC=N (the N-th cudaMalloc returns
 * cudaErrorMemoryAllocation), COMMVQ_FAKE_CUDA_FAIL_LAUNCH=N (the N-th launch
 * does not run; cudaErrorLaunchOutOfResources), COMMVQ_FAKE_CUDA_LOSE_AT=N
 * (from the N-th launch on, nothing runs and every call returns the sticky
 * cudaErrorIllegalAddress, as after a kernel fault).
 */
#define CVQ_CU_EMULATE 1
#define CVQ_CU_EMULATE_LAUNCHERS 1
#include "cuda_emu.h"

#include "../../backends/cuda/cuda_kernels_encode.cu"
#include "../../backends/cuda/cuda_kernels_attend.cu"
#include "../../backends/cuda/cuda_numerics_host.cu"

#include <stdio.h>
#include <unistd.h>

#include <map>
#include <mutex>

namespace {

struct fake_device {
    std::mutex mu;                           /* allocations, counters, attributes */
    std::recursive_mutex launch_mu;          /* the emulator runs one grid at a time */
    std::map<uintptr_t, size_t> allocs;      /* base -> bytes */
    std::map<const void *, int> smem_attr;   /* kernel -> cudaFuncAttributeMaxDynamicSharedMemorySize */
    std::map<cudaStream_t, int> streams;     /* created, not yet destroyed */
    long n_malloc = 0, n_launch = 0;
    long fail_malloc, fail_launch, lose_at; /* the rest: from the environment */
    bool lost = false;
    int n_sm, smem_optin, n_dev;
    fake_device() {
        n_sm = env("COMMVQ_FAKE_CUDA_SM", 8);
        smem_optin = env("COMMVQ_FAKE_CUDA_SMEM_KIB", 227) * 1024;
        n_dev = env("COMMVQ_FAKE_CUDA_DEVICES", 1);
        fail_malloc = env("COMMVQ_FAKE_CUDA_FAIL_MALLOC", 0);
        fail_launch = env("COMMVQ_FAKE_CUDA_FAIL_LAUNCH", 0);
        lose_at = env("COMMVQ_FAKE_CUDA_LOSE_AT", 0);
    }
    /* Device memory never freed is reported at exit; COMMVQ_FAKE_CUDA_STRICT=1
     * makes it fail the process (exit status 3). */
    ~fake_device() {
        if (allocs.empty() && streams.empty()) return;
        size_t bytes = 0;
        for (const auto &a : allocs) bytes += a.second;
        fprintf(stderr, "fake cuda: %zu device allocations (%zu bytes) and %zu streams never freed\n", allocs.size(),
                bytes, streams.size());
        if (env("COMMVQ_FAKE_CUDA_STRICT", 0)) {
            fflush(NULL);
            _exit(3);
        }
    }
    static int env(const char *name, int dflt) {
        const char *v = getenv(name);
        return v && *v ? atoi(v) : dflt;
    }
    /* the allocation holding [p, p+n), or none */
    bool inside(const void *p, size_t n) {
        const uintptr_t a = (uintptr_t)p;
        auto it = allocs.upper_bound(a);
        if (it == allocs.begin()) return false;
        --it;
        return a >= it->first && n <= it->second && a - it->first <= it->second - n;
    }
    bool is_device(const void *p) { return inside(p, 1); }
};

fake_device &dev() {
    static fake_device d;
    return d;
}

thread_local cudaError_t t_last = cudaSuccess;

cudaError_t fail(cudaError_t e) {
    if (e != cudaSuccess) t_last = e;
    return e;
}
/* After a "fault" every call reports the sticky error. */
bool lost() {
    std::lock_guard<std::mutex> g(dev().mu);
    return dev().lost;
}

} // namespace

/* Failure injection from a test, in place of the environment: the at-th
 * cudaMalloc (kind 0), launch (kind 1), or every call from the at-th launch
 * on (kind 2: a lost device) fails, counted from this call; at = 0 turns it
 * off and revives a lost device. Returns the calls counted so far (mallocs
 * for kind 0, launches otherwise) before the reset. */
extern "C" long cvq_fake_cuda_inject(int kind, long at) {
    fake_device &d = dev();
    std::lock_guard<std::mutex> g(d.mu);
    const long before = kind == 0 ? d.n_malloc : d.n_launch;
    d.n_malloc = d.n_launch = 0;
    d.fail_malloc = kind == 0 ? at : 0;
    d.fail_launch = kind == 1 ? at : 0;
    d.lose_at = kind == 2 ? at : 0;
    d.lost = false;
    return before;
}

/* cudaDeviceReset for tests: every allocation freed, the device revived
 * (after a "lost" run, whose memory no runtime call can free any more). */
extern "C" void cvq_fake_cuda_reset(void) {
    fake_device &d = dev();
    std::lock_guard<std::mutex> g(d.mu);
    for (auto &a : d.allocs) free((void *)a.first);
    d.allocs.clear();
    for (auto &st : d.streams) delete (int *)st.first;
    d.streams.clear();
    d.smem_attr.clear();
    d.n_malloc = d.n_launch = d.fail_malloc = d.fail_launch = d.lose_at = 0;
    d.lost = false;
}

/* Device allocations and streams alive now (tests: nothing leaks on an
 * error path). */
extern "C" size_t cvq_fake_cuda_live_allocations(void) {
    std::lock_guard<std::mutex> g(dev().mu);
    return dev().allocs.size() + dev().streams.size();
}

/* ---- launches ------------------------------------------------------------------------------ */

void cvq_emu_launch_checked(const void *kernel, const char *name, dim3 grid, dim3 block, size_t smem,
                            cudaStream_t stream, const std::function<void()> &body) {
    (void)stream;
    fake_device &d = dev();
    int limit = 48 * 1024;
    bool inject = false;
    {
        std::lock_guard<std::mutex> g(d.mu);
        if (d.lost) {
            t_last = cudaErrorIllegalAddress;
            return;
        }
        d.n_launch++;
        if (d.lose_at && d.n_launch >= d.lose_at) {
            d.lost = true;
            t_last = cudaErrorIllegalAddress;
            return;
        }
        inject = d.fail_launch && d.n_launch == d.fail_launch;
        auto it = d.smem_attr.find(kernel);
        if (it != d.smem_attr.end()) limit = it->second;
    }
    const unsigned long threads = (unsigned long)block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.y > 65535 || grid.z > 65535 || grid.x > 0x7FFFFFFFu) {
        fprintf(stderr, "fake cuda: launch of %s: bad configuration grid (%u,%u,%u) block (%u,%u,%u)\n", name,
                grid.x, grid.y, grid.z, block.x, block.y, block.z);
        t_last = cudaErrorInvalidConfiguration;
        return;
    }
    if (smem > (size_t)limit || smem > (size_t)d.smem_optin) {
        fprintf(stderr, "fake cuda: launch of %s: %zu bytes of dynamic shared memory, limit %d%s\n", name, smem,
                limit, limit == 48 * 1024 ? " (no cudaFuncSetAttribute)" : "");
        t_last = cudaErrorInvalidValue;
        return;
    }
    if (inject) {
        t_last = cudaErrorLaunchOutOfResources;
        return;
    }
    std::lock_guard<std::recursive_mutex> g(d.launch_mu);
    cvq_emu_launch(grid, block, smem, body);
}

/* ---- the runtime API ----------------------------------------------------------------------- */

extern "C" {

cudaError_t CUDARTAPI cudaGetDeviceCount(int *count) {
    *count = 0;
    if (dev().n_dev <= 0) return fail(cudaErrorNoDevice);
    *count = dev().n_dev;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaSetDevice(int device) {
    if (device < 0 || device >= dev().n_dev) return fail(cudaErrorInvalidDevice);
    return lost() ? fail(cudaErrorIllegalAddress) : cudaSuccess;
}

cudaError_t CUDARTAPI cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int device) {
    if (device < 0 || device >= dev().n_dev) return fail(cudaErrorInvalidDevice);
    switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = dev().n_sm; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = dev().smem_optin; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrIntegrated: *value = 0; break;
    default: return fail(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGetDeviceProperties(struct cudaDeviceProp *prop, int device) {
    if (device < 0 || device >= dev().n_dev) return fail(cudaErrorInvalidDevice);
    memset(prop, 0, sizeof *prop);
    snprintf(prop->name, sizeof prop->name, "commvq emulated CUDA device (CPU threads)");
    prop->major = 9;
    prop->minor = 0;
    prop->multiProcessorCount = dev().n_sm;
    prop->sharedMemPerBlockOptin = (size_t)dev().smem_optin;
    prop->sharedMemPerBlock = 48 * 1024;
    prop->warpSize = 32;
    prop->maxThreadsPerBlock = 1024;
    prop->totalGlobalMem = (size_t)16 << 30;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaRuntimeGetVersion(int *v) {
    *v = CUDART_VERSION;
    return cudaSuccess;
}
cudaError_t CUDARTAPI cudaDriverGetVersion(int *v) {
    *v = CUDART_VERSION;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMalloc(void **p, size_t n) {
    *p = NULL;
    fake_device &d = dev();
    std::lock_guard<std::mutex> g(d.mu);
    if (d.lost) return fail(cudaErrorIllegalAddress);
    d.n_malloc++;
    if (d.fail_malloc && d.n_malloc == d.fail_malloc) return fail(cudaErrorMemoryAllocation);
    if (n == 0) return cudaSuccess;
    void *m = NULL; /* exactly n bytes (a sanitizer sees past the end), 256-aligned like cudaMalloc */
    if (posix_memalign(&m, 256, n) != 0 || !m) return fail(cudaErrorMemoryAllocation);
    memset(m, 0xA5, n);
    d.allocs[(uintptr_t)m] = n;
    *p = m;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaFree(void *p) {
    if (!p) return cudaSuccess;
    fake_device &d = dev();
    std::lock_guard<std::mutex> g(d.mu);
    if (d.lost) return fail(cudaErrorIllegalAddress); /* as CUDA: nothing is freed after a fault */
    auto it = d.allocs.find((uintptr_t)p);
    if (it == d.allocs.end()) {
        fprintf(stderr, "fake cuda: cudaFree of %p, not an allocation\n", p);
        return fail(cudaErrorInvalidValue);
    }
    d.allocs.erase(it);
    free(p);
    return cudaSuccess;
}

static cudaError_t copy(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind) {
    fake_device &d = dev();
    {
        std::lock_guard<std::mutex> g(d.mu);
        if (d.lost) return fail(cudaErrorIllegalAddress);
        if (n == 0) return cudaSuccess;
        const bool dd = d.is_device(dst), sd = d.is_device(src);
        bool ok = true;
        switch (kind) {
        case cudaMemcpyHostToDevice: ok = dd && !sd && d.inside(dst, n); break;
        case cudaMemcpyDeviceToHost: ok = sd && !dd && d.inside(src, n); break;
        case cudaMemcpyDeviceToDevice: ok = dd && sd && d.inside(dst, n) && d.inside(src, n); break;
        case cudaMemcpyHostToHost: ok = !dd && !sd; break;
        case cudaMemcpyDefault: ok = (!dd || d.inside(dst, n)) && (!sd || d.inside(src, n)); break;
        default: ok = false;
        }
        if (!ok) {
            fprintf(stderr, "fake cuda: cudaMemcpy kind %d of %zu bytes from %p (%s) to %p (%s): refused\n", (int)kind,
                    n, src, sd ? "device" : "host", dst, dd ? "device" : "host");
            return fail(cudaErrorInvalidValue);
        }
    }
    memmove(dst, src, n);
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMemcpy(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind) {
    return copy(dst, src, n, kind);
}
cudaError_t CUDARTAPI cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind,
                                      cudaStream_t s) {
    (void)s;
    return copy(dst, src, n, kind);
}

static cudaError_t set(void *p, int v, size_t n) {
    fake_device &d = dev();
    {
        std::lock_guard<std::mutex> g(d.mu);
        if (d.lost) return fail(cudaErrorIllegalAddress);
        if (n == 0) return cudaSuccess;
        if (!d.inside(p, n)) {
            fprintf(stderr, "fake cuda: cudaMemset of %zu bytes at %p: not inside one allocation\n", n, p);
            return fail(cudaErrorInvalidValue);
        }
    }
    memset(p, v, n);
    return cudaSuccess;
}
cudaError_t CUDARTAPI cudaMemset(void *p, int v, size_t n) { return set(p, v, n); }
cudaError_t CUDARTAPI cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s) {
    (void)s;
    return set(p, v, n);
}

cudaError_t CUDARTAPI cudaStreamCreateWithFlags(cudaStream_t *s, unsigned int flags) {
    (void)flags;
    fake_device &d = dev();
    std::lock_guard<std::mutex> g(d.mu);
    if (d.lost) return fail(cudaErrorIllegalAddress);
    *s = (cudaStream_t) new int(0);
    d.streams[*s] = 1;
    return cudaSuccess;
}
cudaError_t CUDARTAPI cudaStreamDestroy(cudaStream_t s) {
    fake_device &d = dev();
    std::lock_guard<std::mutex> g(d.mu);
    if (d.lost) return fail(cudaErrorIllegalAddress);
    auto it = d.streams.find(s);
    if (it == d.streams.end()) {
        fprintf(stderr, "fake cuda: cudaStreamDestroy of %p, not a stream\n", (void *)s);
        return fail(cudaErrorInvalidResourceHandle);
    }
    d.streams.erase(it);
    delete (int *)s;
    return cudaSuccess;
}
/* The work ran when it was enqueued: a stream is always idle, and waiting
 * returns the sticky error if the device "faulted". */
cudaError_t CUDARTAPI cudaStreamSynchronize(cudaStream_t s) {
    (void)s;
    return lost() ? fail(cudaErrorIllegalAddress) : cudaSuccess;
}
cudaError_t CUDARTAPI cudaStreamQuery(cudaStream_t s) {
    (void)s;
    return lost() ? fail(cudaErrorIllegalAddress) : cudaSuccess;
}
cudaError_t CUDARTAPI cudaDeviceSynchronize(void) { return lost() ? fail(cudaErrorIllegalAddress) : cudaSuccess; }

cudaError_t CUDARTAPI cudaGetLastError(void) {
    if (lost()) return cudaErrorIllegalAddress;
    const cudaError_t e = t_last;
    t_last = cudaSuccess;
    return e;
}

cudaError_t CUDARTAPI cudaPointerGetAttributes(struct cudaPointerAttributes *a, const void *p) {
    memset(a, 0, sizeof *a);
    std::lock_guard<std::mutex> g(dev().mu);
    if (dev().is_device(p)) {
        a->type = cudaMemoryTypeDevice;
        a->device = 0;
        a->devicePointer = (void *)p;
    } else {
        a->type = cudaMemoryTypeUnregistered;
        a->device = -2;
        a->hostPointer = (void *)p;
    }
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaFuncSetAttribute(const void *func, enum cudaFuncAttribute attr, int value) {
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return fail(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> g(dev().mu);
    if (value < 0 || value > dev().smem_optin) {
        fprintf(stderr, "fake cuda: cudaFuncSetAttribute max dynamic shared memory %d > %d\n", value,
                dev().smem_optin);
        t_last = cudaErrorInvalidValue;
        return cudaErrorInvalidValue;
    }
    dev().smem_attr[func] = value;
    return cudaSuccess;
}

const char *CUDARTAPI cudaGetErrorName(cudaError_t e) {
    switch (e) {
#define N(x) \
    case x: return #x;
        N(cudaSuccess)
        N(cudaErrorInvalidValue)
        N(cudaErrorMemoryAllocation)
        N(cudaErrorInvalidConfiguration)
        N(cudaErrorInvalidDevice)
        N(cudaErrorNoDevice)
        N(cudaErrorInsufficientDriver)
        N(cudaErrorIllegalAddress)
        N(cudaErrorLaunchOutOfResources)
        N(cudaErrorLaunchFailure)
        N(cudaErrorNotReady)
        N(cudaErrorInvalidResourceHandle)
#undef N
    default: return "cudaErrorUnknown";
    }
}
const char *CUDARTAPI cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered (emulated device)";
    case cudaErrorMemoryAllocation: return "out of memory (emulated device)";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch (emulated device)";
    default: return "error (emulated device)";
    }
}

} /* extern "C" */
