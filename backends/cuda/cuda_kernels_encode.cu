/*
 * Key and value encoders (docs/numerics.md sections 2 and 4), bit for bit
 * the CPU reference (core/ref_keys.c, core/ref_values.c). Every piece of
 * arithmetic is a step of cuda_numerics.cuh; what this file adds is only the
 * split of the steps over threads, which never changes an order of
 * operations:
 *  - a sum the contract makes sequential is run by one thread, ascending;
 *  - independent outputs (sub-code a's f/g, Linear output o, code-vector
 *    feature f, pair p of the residual) go to different threads;
 *  - the 4096-way argmin: thread t scans k = t, t+T, ... with strict <,
 *    then two shared atomicMin rounds pick the smallest order key and, among
 *    the threads holding it, the smallest k: the sequential scan's answer.
 *
 * Each op is two kernels on the caller's stream: a check kernel (one thread
 * per scale span / value group: non-finite elements, sums of squares that
 * overflow; status word 0) and the encoder, which writes nothing when the
 * call's status word is set. Tokens are grid-strided over at most
 * CVQ_CU_ENC_MAX_BLOCKS blocks.
 */
#include "cuda_launch.h"
#include "cuda_numerics.cuh"

#ifndef CVQ_CU_EMULATE
#include <cuda_runtime.h>
#endif

namespace {

constexpr uint32_t kKeyThreads = 128; /* threads of the key encoder */
constexpr uint32_t kValThreads = 256; /* threads of the value encoder */

unsigned grid_of(size_t n) {
    return (unsigned)(n < CVQ_CU_ENC_MAX_BLOCKS ? n : CVQ_CU_ENC_MAX_BLOCKS);
}

/* ---- keys ------------------------------------------------------------------------------ */

/* One thread per (token, scale span): span = the token (token mode) or one
 * head (head mode). Sets CVQ_CU_ST_NONFINITE / CVQ_CU_ST_RANGE. */
__global__ void check_keys(cvq_cu_geom g, const float *keys, size_t n, uint32_t *status) {
    const size_t span = g.scale_mode ? g.d : (size_t)g.Hkv * g.d;
    const size_t spans = g.scale_mode ? n * g.Hkv : n;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < spans;
         i += (size_t)gridDim.x * blockDim.x) {
        const float *x = keys + i * span;
        bool bad = false;
        for (size_t j = 0; j < span; j++) bad |= cvq_cu_nonfinite(x[j]);
        if (bad) {
            atomicOr(status, CVQ_CU_ST_NONFINITE);
            continue;
        }
        if (cvq_cu_bits(cvq_cu_sum_squares(x, (uint32_t)span)) == 0x7F800000u)
            atomicOr(status, CVQ_CU_ST_RANGE);
    }
}

/* One block per token (grid-strided): all KV heads, stages in order. */
__global__ void __launch_bounds__(kKeyThreads)
encode_keys(cvq_cu_geom g, cvq_cu_tables t, const float *keys, uint16_t *codes, float *scales, size_t n,
            const uint32_t *status) {
    __shared__ float s_z[256];  /* residual of the current head, head layout (d <= 256) */
    __shared__ float s_f[64];   /* f[a] */
    __shared__ float s_g[64];   /* g[a] */
    __shared__ float s_ss;      /* sum of squares of the current span */
    __shared__ uint32_t s_key;  /* best order key of the stage */
    __shared__ uint32_t s_idx;  /* smallest code holding it */
    if (*status != 0) return;   /* the call's input is bad: write nothing */
    const uint32_t tid = threadIdx.x, T = blockDim.x;
    const uint32_t d = g.d, P = g.P, R = g.R, H = g.Hkv;
    for (size_t tok = blockIdx.x; tok < n; tok += gridDim.x) {
        const float *k = keys + tok * (size_t)H * d; /* k[h*d + i] */
        if (g.scale_mode == 0) {
            __syncthreads(); /* s_ss of the previous token has been read */
            if (tid == 0) {
                s_ss = cvq_cu_sum_squares(k, H * d);
                scales[tok] = CVQ_SQRT(s_ss);
            }
            __syncthreads();
        }
        for (uint32_t h = 0; h < H; h++) {
            const float *kh = k + (size_t)h * d;
            if (g.scale_mode != 0) {
                __syncthreads();
                if (tid == 0) {
                    s_ss = cvq_cu_sum_squares(kh, d);
                    scales[tok * H + h] = CVQ_SQRT(s_ss);
                }
                __syncthreads();
            }
            const float ss = s_ss;
            uint16_t *ch = codes + (tok * H + h) * R; /* codes[tok][h][r] */
            if (ss == 0.0f) { /* zero span: codes 0 (uniform branch) */
                for (uint32_t r = tid; r < R; r += T) ch[r] = 0;
                continue;
            }
            const float inv = CVQ_DIV(1.0f, CVQ_SQRT(ss));
            __syncthreads(); /* the previous head's last stage is done with s_z */
            for (uint32_t i = tid; i < d; i += T) s_z[i] = CVQ_MUL(kh[i], inv);
            __syncthreads();
            for (uint32_t r = 0; r < R; r++) {
                const size_t tb = (size_t)h * R + r;          /* table set (h, r) */
                const float *w = t.key_w + tb * 64 * P * 2;   /* w[a][p][2] */
                for (uint32_t a = tid; a < 64; a += T)
                    cvq_cu_subcode_fg(w + (size_t)a * P * 2, s_z, P, g.layout, t.key_n[tb * 64 + a], &s_f[a],
                                      &s_g[a]);
                if (tid == 0) {
                    s_key = CVQ_CU_KEY_NONE;
                    s_idx = 0xFFFFFFFFu;
                }
                __syncthreads();
                uint32_t key = CVQ_CU_KEY_NONE, idx = 0xFFFFFFFFu;
                cvq_cu_scan(s_f, s_g, t.key_G + tb * 4096, tid, T, &key, &idx);
                if (key < CVQ_CU_KEY_NONE) atomicMin(&s_key, key);
                __syncthreads();
                if (key < CVQ_CU_KEY_NONE && key == s_key) atomicMin(&s_idx, idx);
                __syncthreads();
                /* no finite distance at all: code 0, as the sequential scan */
                const uint32_t code = s_key < CVQ_CU_KEY_NONE ? s_idx : 0u;
                const float *wA = w + (size_t)(code >> 6) * P * 2, *wB = w + (size_t)(code & 63u) * P * 2;
                for (uint32_t p = tid; p < P; p += T) cvq_cu_residual_pair(wA, wB, s_z, P, g.layout, p);
                if (tid == 0) ch[r] = (uint16_t)code;
                __syncthreads(); /* s_z complete, s_key / s_idx read */
            }
        }
    }
}

/* ---- values ------------------------------------------------------------------------------ */

/* One thread per (token, group): non-finite values, overflow of the
 * pre-norm sum of squares. */
__global__ void check_values(cvq_cu_geom g, cvq_cu_tables t, const float *values, size_t n, uint32_t *status) {
    const size_t items = n * g.groups;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < items;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t tok = i / g.groups, gi = i % g.groups;
        const float *v = values + tok * (size_t)g.groups * g.F + gi * g.F;
        bool bad = false;
        for (uint32_t j = 0; j < g.F; j++) bad |= cvq_cu_nonfinite(v[j]);
        if (bad) {
            atomicOr(status, CVQ_CU_ST_NONFINITE);
            continue;
        }
        if (cvq_cu_bits(cvq_cu_value_ss(v, t.inv_ls + gi * g.F, g.F)) == 0x7F800000u)
            atomicOr(status, CVQ_CU_ST_RANGE);
    }
}

/* One block per (token, group): token grid-strided over x, group = y.
 * Dynamic shared memory: the group's code bits as Nc/32 words, then (when
 * `x_in_smem`) x[F] and hid[I]; otherwise x and hid live in this block's
 * slot of the global scratch. */
__global__ void __launch_bounds__(kValThreads)
encode_values(cvq_cu_geom g, cvq_cu_tables t, const float *values, uint8_t *bits, float *sigma, size_t n,
              float *scratch, int x_in_smem, const uint32_t *status) {
    CVQ_DYN_SMEM(uint32_t, s_dyn);
    __shared__ float s_pre, s_rp, s_mean, s_rstd;
    if (*status != 0) return;
    const uint32_t tid = threadIdx.x, T = blockDim.x;
    const uint32_t F = g.F, I = g.I, Nc = g.Nc, gi = blockIdx.y;
    const uint32_t nwords = (Nc + 31) / 32;
    uint32_t *s_words = s_dyn;                 /* packed bits of (token, gi) */
    float *x, *hid;                            /* [F], [I] */
    if (x_in_smem) {
        x = (float *)(s_dyn + nwords);
    } else {
        x = scratch + ((size_t)blockIdx.y * gridDim.x + blockIdx.x) * (F + I);
    }
    hid = x + F;
    const float *inv_ls = t.inv_ls + (size_t)gi * F;
    const float *ln_w = t.ln_w + (size_t)gi * F, *ln_b = t.ln_b + (size_t)gi * F;
    const float *w1 = t.w1 + (size_t)gi * I * F, *b1 = t.b1 + (size_t)gi * I;
    const float *w2 = t.w2 + (size_t)gi * 2 * Nc * I, *b2 = t.b2 + (size_t)gi * 2 * Nc;
    const float *E = t.E + (size_t)gi * Nc * F;
    for (size_t tok = blockIdx.x; tok < n; tok += gridDim.x) {
        const float *v = values + tok * (size_t)g.groups * F + (size_t)gi * F;
        __syncthreads(); /* the previous token is finished with the shared state */
        /* 1-2: pre = ||v * inv_ls||, rp = 1 / (pre + eps) (thread 0) */
        if (tid == 0) {
            const float pre = CVQ_SQRT(cvq_cu_value_ss(v, inv_ls, F));
            s_pre = pre;
            s_rp = cvq_cu_value_rp(pre);
        }
        for (uint32_t w = tid; w < nwords; w += T) s_words[w] = 0;
        __syncthreads();
        for (uint32_t j = tid; j < F; j += T) x[j] = cvq_cu_value_x(v[j], inv_ls[j], s_rp);
        __syncthreads();
        /* 3: LayerNorm statistics (thread 0), then y */
        if (tid == 0) cvq_cu_ln_stats(x, F, g.inv_F, &s_mean, &s_rstd);
        __syncthreads();
        for (uint32_t j = tid; j < F; j += T) x[j] = cvq_cu_ln_apply(x[j], s_mean, s_rstd, ln_w[j], ln_b[j]);
        __syncthreads();
        /* 4: hid = gelu(W1 y + b1) */
        for (uint32_t o = tid; o < I; o += T) hid[o] = cvq_cu_gelu(cvq_cu_linear(w1 + (size_t)o * F, x, F, b1[o]));
        __syncthreads();
        /* 4-5: the four logits of group t, their argmax, two code bits */
        for (uint32_t q = tid; q < Nc / 2; q += T) {
            float o[4];
            for (uint32_t c = 0; c < 4; c++)
                o[c] = cvq_cu_linear(w2 + (size_t)(4 * q + c) * I, hid, I, b2[4 * q + c]);
            const uint32_t two = cvq_cu_argmax4_bits(o[0], o[1], o[2], o[3]);
            if (two) atomicOr(&s_words[(2 * q) >> 5], two << ((2 * q) & 31u));
        }
        __syncthreads();
        /* 6: u[f] = sum over set bits of E[b][f] (into x: y is no longer needed) */
        const uint8_t *bb = (const uint8_t *)s_words; /* little-endian words: byte b/8 holds bit b */
        for (uint32_t f = tid; f < F; f += T) x[f] = cvq_cu_code_vector(bb, E + f, Nc, F);
        __syncthreads();
        if (tid == 0) sigma[tok * g.groups + gi] = cvq_cu_sigma(x, F, s_pre);
        uint8_t *out = bits + (tok * g.groups + gi) * (size_t)(Nc / 8);
        for (uint32_t j = tid; j < Nc / 8; j += T) out[j] = bb[j];
    }
}

/* The call's word 0 into the sticky word 1. */
__global__ void fold_status(uint32_t *status) {
    if (status[0]) atomicOr(&status[1], status[0]);
}

} // namespace

extern "C" void cvq_cu_values_plan(const cvq_cu_geom *g, size_t smem_max, size_t *smem, size_t *scratch_bytes) {
    const size_t words = (size_t)(g->Nc + 31) / 32 * 4;
    const size_t xh = ((size_t)g->F + g->I) * sizeof(float);
    if (words + xh <= smem_max) {
        *smem = words + xh;
        *scratch_bytes = 0;
    } else {
        *smem = words;
        *scratch_bytes = xh * CVQ_CU_ENC_MAX_BLOCKS * g->groups;
    }
}

/* The launchers. cuda_emulated (tests/cuda) has launchers of its own; the
 * emulated device (tests/cuda/fake_device.cpp) runs these, CVQ_CU_EMULATE_LAUNCHERS. */
#if !defined(CVQ_CU_EMULATE) || defined(CVQ_CU_EMULATE_LAUNCHERS)

extern "C" int cvq_cu_launch_fold(uint32_t *status, cudaStream_t s) {
    CVQ_CU_LAUNCH(fold_status, 1, 1, 0, s)(status);
    return cudaGetLastError();
}

extern "C" int cvq_cu_launch_encode_keys(const cvq_cu_geom *g, const cvq_cu_tables *t, const cvq_cu_encode_keys *a,
                                         uint32_t *status, cudaStream_t s) {
    if (a->n == 0) return cudaSuccess;
    cudaError_t e = cudaMemsetAsync(status, 0, sizeof(uint32_t), s);
    if (e != cudaSuccess) return e;
    const size_t spans = g->scale_mode ? a->n * g->Hkv : a->n;
    CVQ_CU_LAUNCH(check_keys, grid_of((spans + 127) / 128), 128, 0, s)(*g, a->keys, a->n, status);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
    if ((e = (cudaError_t)cvq_cu_launch_fold(status, s)) != cudaSuccess) return e;
    CVQ_CU_LAUNCH(encode_keys, grid_of(a->n), kKeyThreads, 0, s)(*g, *t, a->keys, a->codes, a->scales, a->n,
                                                                 status);
    return cudaGetLastError();
}

extern "C" int cvq_cu_launch_encode_values(const cvq_cu_geom *g, const cvq_cu_tables *t,
                                           const cvq_cu_encode_values *a, size_t smem_max, uint32_t *status,
                                           cudaStream_t s) {
    if (a->n == 0) return cudaSuccess;
    size_t smem, scratch_bytes;
    cvq_cu_values_plan(g, smem_max, &smem, &scratch_bytes);
    cudaError_t e = cudaMemsetAsync(status, 0, sizeof(uint32_t), s);
    if (e != cudaSuccess) return e;
    const size_t items = a->n * g->groups;
    CVQ_CU_LAUNCH(check_values, grid_of((items + 127) / 128), 128, 0, s)(*g, *t, a->values, a->n, status);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
    if ((e = (cudaError_t)cvq_cu_launch_fold(status, s)) != cudaSuccess) return e;
    if (smem > 48 * 1024) {
        e = cudaFuncSetAttribute(encode_values, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return e;
    }
    /* The scratch slots are indexed by (blockIdx.y, blockIdx.x): the grid
     * in x is CVQ_CU_ENC_MAX_BLOCKS at most, as cvq_cu_values_plan assumed. */
    dim3 grid(grid_of(a->n), g->groups);
    CVQ_CU_LAUNCH(encode_values, grid, kValThreads, smem, s)(*g, *t, a->values, a->bits, a->sigma, a->n,
                                                             a->scratch, scratch_bytes == 0, status);
    return cudaGetLastError();
}
#endif
