/*
 * The CUDA execution emulator's runtime (tests/cuda/cuda_emu.h): a block's
 * threads are POSIX threads, __syncthreads a barrier, a warp's shuffles a
 * per-warp barrier and an exchange array. Linked into cuda_emulated and into
 * the emulated CUDA device (fake_device.cpp). One launch at a time (the
 * state is global; fake_device.cpp serialises its launches).
 */
#include "cuda_emu.h"

#include <stdio.h>

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

static pthread_barrier_t g_bar;
static pthread_barrier_t g_warp_bar[32];
static float g_xchg[32][32];
static int g_or;
/* The block's dynamic shared memory: a fresh allocation of exactly the
 * launch's size for each block, so that a sanitizer (scripts/sanitize.sh
 * emulated) sees an access past its end. */
static unsigned char *g_smem;

void *cvq_emu_dyn_smem(void) { return g_smem; }
void __syncthreads(void) { pthread_barrier_wait(&g_bar); }
int __syncthreads_or(int pred) {
    if (pred) __atomic_store_n(&g_or, 1, __ATOMIC_SEQ_CST);
    pthread_barrier_wait(&g_bar);
    const int r = __atomic_load_n(&g_or, __ATOMIC_SEQ_CST);
    pthread_barrier_wait(&g_bar);
    if (threadIdx.x == 0) __atomic_store_n(&g_or, 0, __ATOMIC_SEQ_CST);
    pthread_barrier_wait(&g_bar);
    return r;
}
float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
    (void)mask;
    const unsigned w = threadIdx.x / 32, l = threadIdx.x % 32;
    g_xchg[w][l] = v;
    pthread_barrier_wait(&g_warp_bar[w]);
    const float r = g_xchg[w][l ^ (unsigned)lane_mask];
    pthread_barrier_wait(&g_warp_bar[w]);
    return r;
}

/* The threads of a launch live for the whole grid: thread t runs lane t of
 * every block in turn (blocks in x, then y, then z, as before one after
 * another), with a block barrier before and after each block; thread 0 swaps
 * the dynamic shared memory in between. Creating threads once per launch
 * instead of once per block is what makes long grids affordable. */
struct emu_grid {
    dim3 grid;
    size_t smem;
    const std::function<void()> *body;
};
struct emu_thread {
    unsigned tid;
    const emu_grid *g;
};

static void new_smem(size_t smem) {
    g_smem = (unsigned char *)malloc(smem ? smem : 1);
    if (!g_smem) {
        printf("cuda emulator: out of memory for %zu bytes of shared memory\n", smem);
        exit(1);
    }
    memset(g_smem, 0xFF, smem ? smem : 1);
}

static void *emu_run(void *p) {
    const emu_thread *t = (const emu_thread *)p;
    const emu_grid *g = t->g;
    threadIdx.x = t->tid;
    threadIdx.y = threadIdx.z = 0;
    for (unsigned z = 0; z < g->grid.z; z++)
        for (unsigned y = 0; y < g->grid.y; y++)
            for (unsigned x = 0; x < g->grid.x; x++) {
                blockIdx.x = x;
                blockIdx.y = y;
                blockIdx.z = z;
                if (t->tid == 0) new_smem(g->smem);
                pthread_barrier_wait(&g_bar); /* the previous block is done, the new one's memory ready */
                (*g->body)();
                pthread_barrier_wait(&g_bar);
                if (t->tid == 0) {
                    free(g_smem);
                    g_smem = NULL;
                }
            }
    return NULL;
}

void cvq_emu_launch(dim3 grid, dim3 block, size_t smem, const std::function<void()> &body) {
    gridDim = grid;
    blockDim = block;
    const unsigned T = block.x, warps = (T + 31) / 32;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || T == 0) return;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1u << 20);
    std::vector<pthread_t> th(T);
    std::vector<emu_thread> args(T);
    const emu_grid g = {grid, smem, &body};
    pthread_barrier_init(&g_bar, NULL, T);
    for (unsigned w = 0; w < warps; w++) pthread_barrier_init(&g_warp_bar[w], NULL, 32);
    for (unsigned i = 0; i < T; i++) {
        args[i].tid = i;
        args[i].g = &g;
        if (pthread_create(&th[i], &attr, emu_run, &args[i]) != 0) {
            printf("cuda emulator: pthread_create failed\n");
            exit(1);
        }
    }
    for (unsigned i = 0; i < T; i++) pthread_join(th[i], NULL);
    pthread_barrier_destroy(&g_bar);
    for (unsigned w = 0; w < warps; w++) pthread_barrier_destroy(&g_warp_bar[w]);
    pthread_attr_destroy(&attr);
}
