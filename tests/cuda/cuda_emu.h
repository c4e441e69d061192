/*
 * A small CUDA execution emulator for the kernels of backends/cuda on CPU
 * threads, so that their logic (indexing, barriers, warp shuffles, shared
 * memory, atomics, split-K) runs and is checked where there is no GPU.
 *
 * Model: blocks run one after another; the threads of a block are POSIX
 * threads (blockDim.x of them) with a barrier for __syncthreads and one per
 * warp for the shuffles. __shared__ variables become `static` (one block at
 * a time, so that is exact); the dynamic shared memory is a fresh
 * allocation of exactly the launch's size for each block (a sanitizer sees
 * an access past its end), filled with 0xFF bytes first (NaN patterns:
 * reading before writing shows). Arithmetic is the host's (the kernels' numerics are the
 * __host__ __device__ steps of cuda_numerics.cuh, which tests/test_cuda.c
 * checks separately); what the GPU itself does differently (rounding of the
 * intrinsics, scheduling, memory model) is not emulated.
 *
 * Include this before the .cu files, with CVQ_CU_EMULATE defined.
 */
#ifndef CVQ_CUDA_EMU_H
#define CVQ_CUDA_EMU_H

#include <cuda_runtime_api.h> /* types only: dim3, uint3, float2, float4 */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <functional>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

void *cvq_emu_dyn_smem(void);
void __syncthreads(void);
int __syncthreads_or(int pred);
float __shfl_xor_sync(unsigned mask, float v, int lane_mask);

static inline unsigned atomicMin(unsigned *p, unsigned v) {
    unsigned old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}
static inline unsigned atomicOr(unsigned *p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }

/* Runs body() as a grid of blocks of `block` threads with `smem` bytes of
 * dynamic shared memory. */
void cvq_emu_launch(dim3 grid, dim3 block, size_t smem, const std::function<void()> &body);

/* ---- the launchers of the .cu files on the emulated device ----------------
 * CVQ_CU_LAUNCH(kernel, grid, block, smem, stream)(args...) (cuda_numerics.cuh)
 * becomes cvq_emu_launcher(...)(args...): the arguments are converted to the
 * kernel's parameter types and copied, as a CUDA launch copies them, and
 * cvq_emu_launch_checked (fake_device.cpp) checks the launch configuration as
 * the CUDA runtime would (block size, grid limits, dynamic shared memory
 * against the kernel's cudaFuncSetAttribute limit), records a failure for
 * cudaGetLastError and otherwise runs the grid before returning. Only the
 * emulated device (CVQ_CU_EMULATE_LAUNCHERS) instantiates these. */
void cvq_emu_launch_checked(const void *kernel, const char *name, dim3 grid, dim3 block, size_t smem,
                            cudaStream_t stream, const std::function<void()> &body);

#include <tuple>
#include <utility>

template <class... P> struct cvq_emu_launch_of {
    void (*kernel)(P...);
    const char *name;
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    template <class... A> void operator()(A &&...a) const {
        void (*k)(P...) = kernel;
        std::tuple<P...> args(std::forward<A>(a)...);
        cvq_emu_launch_checked(reinterpret_cast<const void *>(k), name, grid, block, smem, stream,
                               [k, &args] { std::apply(k, args); });
    }
};
template <class... P>
cvq_emu_launch_of<P...> cvq_emu_launcher(void (*kernel)(P...), const char *name, dim3 grid, dim3 block, size_t smem,
                                         cudaStream_t stream) {
    return cvq_emu_launch_of<P...>{kernel, name, grid, block, smem, stream};
}

/* cuda_runtime.h's C++ overload: a kernel instead of a `const void *`. */
template <class T> static inline cudaError_t cudaFuncSetAttribute(T *kernel, cudaFuncAttribute attr, int value) {
    return cudaFuncSetAttribute(reinterpret_cast<const void *>(kernel), attr, value);
}

#endif
