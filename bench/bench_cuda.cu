/*
 * bench_cuda: attention time per decode step on the GPU for one
 * LLaMA-3.1-8B layer (32 query heads, 8 KV heads, d = 128) at T = 4K, 32K
 * and 128K cached tokens, CommVQ at 1 bit (R = 11, Nc = 1024) and 2 bits
 * (R = 21, Nc = 2048) through cvq_cuda_attend, beside a dense FP16
 * decode-attention kernel of our own (split-K, same process, same GPU).
 * CommVQ runs with 64 (default), 128 and 256 tokens per tile.
 * For each it prints the time per step, the bytes a step must read (the
 * floor: every cached byte once) and the bandwidth that implies, and the
 * ratio to the dense kernel. Speed is measured here, never in tests.
 * The compressed caches are random codes (attention time does not depend
 * on the values), with 4 sinks and a 128-token full-precision window.
 */
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commvq.h"
#include "commvq_cuda.h"

#define CK(x)                                                                              \
    do {                                                                                   \
        cudaError_t e_ = (x);                                                              \
        if (e_ != cudaSuccess) {                                                           \
            printf("bench_cuda: %s: %s\n", #x, cudaGetErrorName(e_));                      \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)
#define CQ(x)                                                                              \
    do {                                                                                   \
        cvq_status s_ = (x);                                                               \
        if (s_ != CVQ_OK) {                                                                \
            printf("bench_cuda: %s: %s\n", #x, cvq_last_error());                          \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

static const int HQ = 32, HKV = 8, D = 128, G = 4;
static const double HBM_BW = 4.8e12; /* H200 HBM3e, bytes/s */

/* ---- dense FP16 decode attention (our own baseline) -------------------------------- */

/* grid (split, kv); 128 threads. Tile of 128 tokens: thread t computes the
 * G logits of token u0+t (K row read with 16-byte loads), one warp per head
 * keeps the online softmax, then thread f accumulates V[.][kv][f]. */
__global__ void dense_split(const __half *K, const __half *V, const float *q, int T, int split_len, float *part) {
    __shared__ float qs[G][D];
    __shared__ float w[G][128];
    __shared__ float m[G], l[G], resc[G];
    const int tid = threadIdx.x, kv = blockIdx.y, s = blockIdx.x;
    for (int x = tid; x < G * D; x += 128) qs[x / D][x % D] = q[(kv * G + x / D) * D + x % D];
    if (tid < G) { m[tid] = -INFINITY; l[tid] = 0.0f; }
    float acc[G] = {0, 0, 0, 0};
    const float scale = rsqrtf((float)D);
    __syncthreads();
    const int u_end = min(T, (s + 1) * split_len);
    for (int u0 = s * split_len; u0 < u_end; u0 += 128) {
        const int u = u0 + tid;
        float lg[G] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
        if (u < u_end) {
            const uint4 *kr = (const uint4 *)(K + ((size_t)u * HKV + kv) * D);
            float dot[G] = {0, 0, 0, 0};
            for (int j = 0; j < D / 8; j++) {
                uint4 raw = kr[j];
                const __half2 *h2 = (const __half2 *)&raw;
                for (int e = 0; e < 4; e++) {
                    float2 f = __half22float2(h2[e]);
                    for (int g = 0; g < G; g++) dot[g] += qs[g][8 * j + 2 * e] * f.x + qs[g][8 * j + 2 * e + 1] * f.y;
                }
            }
            for (int g = 0; g < G; g++) lg[g] = dot[g] * scale;
        }
        for (int g = 0; g < G; g++) w[g][tid] = lg[g];
        __syncthreads();
        const int warp = tid >> 5, lane = tid & 31;
        if (warp < G) {
            float mx = -INFINITY;
            for (int t = lane; t < 128; t += 32) mx = fmaxf(mx, w[warp][t]);
            for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));
            const float mn = fmaxf(m[warp], mx);
            float sum = 0;
            for (int t = lane; t < 128; t += 32) {
                const float e = w[warp][t] == -INFINITY ? 0.0f : __expf(w[warp][t] - mn);
                w[warp][t] = e;
                sum += e;
            }
            for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, o);
            if (lane == 0) {
                const float r = m[warp] == -INFINITY ? 0.0f : __expf(m[warp] - mn);
                resc[warp] = r;
                l[warp] = l[warp] * r + sum;
                m[warp] = mn;
            }
        }
        __syncthreads();
        for (int g = 0; g < G; g++) acc[g] *= resc[g];
        const int n = min(128, u_end - u0);
        for (int t = 0; t < n; t++) {
            const float vf = __half2float(V[((size_t)(u0 + t) * HKV + kv) * D + tid]);
            for (int g = 0; g < G; g++) acc[g] += w[g][t] * vf;
        }
        __syncthreads();
    }
    for (int g = 0; g < G; g++) {
        float *p = part + ((size_t)(kv * G + g) * gridDim.x + s) * (D + 2);
        p[2 + tid] = acc[g];
        if (tid == 0) { p[0] = m[g]; p[1] = l[g]; }
    }
}

__global__ void dense_reduce(const float *part, int n_split, float *out) {
    const int h = blockIdx.x, f = threadIdx.x;
    const float *p = part + (size_t)h * n_split * (D + 2);
    float M = -INFINITY;
    for (int s = 0; s < n_split; s++) if (p[s * (D + 2) + 1] > 0) M = fmaxf(M, p[s * (D + 2)]);
    float l = 0, o = 0;
    for (int s = 0; s < n_split; s++) {
        if (!(p[s * (D + 2) + 1] > 0)) continue;
        const float w = __expf(p[s * (D + 2)] - M);
        l += w * p[s * (D + 2) + 1];
        o += w * p[s * (D + 2) + 2 + f];
    }
    out[h * D + f] = l > 0 ? o / l : 0.0f;
}

/* ---- helpers -------------------------------------------------------------------------- */

static void *dev_random(size_t bytes, unsigned seed) {
    unsigned char *h = (unsigned char *)malloc(bytes);
    for (size_t i = 0; i < bytes; i++) { seed = seed * 1664525u + 1013904223u; h[i] = (unsigned char)(seed >> 24); }
    void *d;
    CK(cudaMalloc(&d, bytes));
    CK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
    free(h);
    return d;
}
static float *dev_floats(size_t n, float lo, float hi, unsigned seed) {
    float *h = (float *)malloc(n * 4);
    for (size_t i = 0; i < n; i++) { seed = seed * 1664525u + 1013904223u; h[i] = lo + (hi - lo) * (float)(seed >> 8) / 16777216.0f; }
    float *d;
    CK(cudaMalloc(&d, n * 4));
    CK(cudaMemcpy(d, h, n * 4, cudaMemcpyHostToDevice));
    free(h);
    return d;
}
static int32_t *dev_positions(size_t n, int32_t first) {
    int32_t *h = (int32_t *)malloc(n * 4 + 4);
    for (size_t i = 0; i < n; i++) h[i] = first + (int32_t)i;
    int32_t *d;
    CK(cudaMalloc(&d, n * 4 + 4));
    CK(cudaMemcpy(d, h, n * 4 + 4, cudaMemcpyHostToDevice));
    free(h);
    return d;
}

static void row(const char *what, int T, double us, double bytes, double dense_us) {
    const double floor_us = bytes / HBM_BW * 1e6;
    printf("| %-16s | %6dK | %9.1f | %10.2f | %9.1f | %7.1f%% | %6.2fx |\n", what, T / 1024, us, bytes / 1e6, floor_us,
           100.0 * floor_us / us, dense_us / us);
}

int main(int argc, char **argv) {
    int iters = argc > 1 ? atoi(argv[1]) : 20;
    cvq_context *ctx = NULL;
    cvq_context_params p = cvq_context_default_params();
    p.backend = CVQ_BACKEND_CUDA;
    if (cvq_context_create(&p, &ctx)) {
        printf("bench_cuda: no CUDA context: %s\n", cvq_last_error());
        return 2;
    }
    cvq_device_info di;
    cvq_context_device(ctx, &di);
    cudaStream_t stream;
    CK(cudaStreamCreate(&stream));
    CQ(cvq_cuda_set_stream(ctx, (cvq_cuda_stream)stream));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    printf("bench_cuda on %s; one LLaMA-3.1-8B layer (Hq=32, Hkv=8, d=128), one query per step, %d steps each\n",
           di.name, iters);
    printf("floor = bytes a step must read / 4.8 TB/s (H200 HBM3e)\n\n");
    printf("| kernel           |      T | us/step   | MB/step    | floor us  | of floor | vs fp16 |\n");
    printf("|------------------|--------|-----------|------------|-----------|----------|---------|\n");
    const int Ts[3] = {4096, 32768, 131072};
    for (int ti = 0; ti < 3; ti++) {
        const int T = Ts[ti];
        /* dense fp16 */
        __half *K = (__half *)dev_random((size_t)T * HKV * D * 2, 1), *V = (__half *)dev_random((size_t)T * HKV * D * 2, 2);
        /* random bytes as halves can be Inf/NaN: use small floats instead */
        {
            __half *h = (__half *)malloc((size_t)T * HKV * D * 2);
            for (size_t i = 0; i < (size_t)T * HKV * D; i++) h[i] = __float2half((float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f);
            CK(cudaMemcpy(K, h, (size_t)T * HKV * D * 2, cudaMemcpyHostToDevice));
            CK(cudaMemcpy(V, h, (size_t)T * HKV * D * 2, cudaMemcpyHostToDevice));
            free(h);
        }
        float *q = dev_floats((size_t)HQ * D, -1, 1, 3), *out, *part;
        CK(cudaMalloc(&out, (size_t)HQ * D * 4));
        /* about 4 blocks per multiprocessor, at least 256 tokens per block */
        int n_sm = 0;
        CK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, 0));
        int n_split = (4 * n_sm + HKV - 1) / HKV;
        if (n_split > (T + 255) / 256) n_split = (T + 255) / 256;
        const int split_len = ((T + n_split - 1) / n_split + 127) / 128 * 128;
        CK(cudaMalloc(&part, (size_t)HQ * n_split * (D + 2) * 4));
        float dense_ms = 0;
        for (int it = -2; it < iters; it++) {
            if (it == 0) CK(cudaEventRecord(e0, stream));
            dense_split<<<dim3(n_split, HKV), 128, 0, stream>>>(K, V, q, T, split_len, part);
            dense_reduce<<<HQ, D, 0, stream>>>(part, n_split, out);
        }
        CK(cudaEventRecord(e1, stream));
        CK(cudaEventSynchronize(e1));
        CK(cudaGetLastError());
        CK(cudaEventElapsedTime(&dense_ms, e0, e1));
        const double dense_us = dense_ms * 1000.0 / iters;
        row("dense fp16", T, dense_us, (double)T * HKV * D * 2 * 2, dense_us);
        CK(cudaFree(K));
        CK(cudaFree(V));
        /* CommVQ at 1 and 2 bits */
        for (int bits = 1; bits <= 2; bits++) {
            const uint32_t R = bits == 1 ? 11 : 21, Nc = bits == 1 ? 1024 : 2048;
            cvq_geometry g = {1, (uint32_t)HQ, (uint32_t)HKV, (uint32_t)D, R, CVQ_KEY_SCALE_TOKEN,
                              CVQ_PAIRS_ROTATE_HALF, 0, Nc, 0, 0.0f};
            CQ(cvq_geometry_resolve(&g));
            double theta[64];
            CQ(cvq_rope_freqs_default(D, 500000.0, theta));
            cvq_codebook *cb = NULL;
            CQ(cvq_codebook_random(&g, theta, 11, NULL, &cb));
            cvq_record_layout rl;
            CQ(cvq_record_layout_of(&g, &rl));
            const int S = 4, W = 128, C = T - S - W;
            cvq_cuda_kv kv;
            memset(&kv, 0, sizeof kv);
            kv.n_sink = S;
            kv.sink_k = dev_floats((size_t)S * HKV * D, -1, 1, 5);
            kv.sink_v = dev_floats((size_t)S * HKV * D, -1, 1, 6);
            kv.sink_pos = dev_positions(S, 0);
            kv.n_comp = C;
            /* random 12-bit codes are valid codes; scales and sigma positive */
            kv.codes = (const uint8_t *)dev_random((size_t)C * rl.key_code_bytes, 7);
            kv.key_scales = dev_floats((size_t)C * rl.key_scale_count, 5, 15, 8);
            kv.value_bits = (const uint8_t *)dev_random((size_t)C * rl.value_bit_bytes, 9);
            kv.value_sigma = dev_floats((size_t)C * rl.value_groups, 0.5f, 2, 10);
            kv.comp_pos = dev_positions(C, S);
            kv.n_win = W;
            kv.win_k = dev_floats((size_t)W * HKV * D, -1, 1, 12);
            kv.win_v = dev_floats((size_t)W * HKV * D, -1, 1, 13);
            kv.win_pos = dev_positions(W, S + C);
            int32_t *qpos = dev_positions(1, T);
            CQ(cvq_cuda_prepare(ctx, cb, 0));
            /* the default tile (64), then 128 and 256 tokens per tile
             * (COMMVQ_CUDA_ATTEND_TILE): fewer reloads of the stage tables
             * per token against fewer blocks per multiprocessor */
            const int tiles[3] = {0, 128, 256};
            for (int ti2 = 0; ti2 < 3; ti2++) {
                const int tile = tiles[ti2];
                char tv[8];
                snprintf(tv, sizeof tv, "%d", tile);
                setenv("COMMVQ_CUDA_ATTEND_TILE", tile ? tv : "", 1);
                float ms = 0;
                for (int it = -2; it < iters; it++) {
                    if (it == 0) CK(cudaEventRecord(e0, stream));
                    CQ(cvq_cuda_attend(ctx, cb, 0, &kv, q, qpos, 1, 0, out));
                }
                CK(cudaEventRecord(e1, stream));
                CK(cudaEventSynchronize(e1));
                CQ(cvq_cuda_status(ctx));
                CK(cudaEventElapsedTime(&ms, e0, e1));
                const double us = ms * 1000.0 / iters;
                /* every compressed record (and its position) once, the
                 * full-precision tokens' K, V (fp32) and positions once */
                const double bytes = (double)C * (rl.bytes_per_token + 4) + (double)(S + W) * (HKV * D * 8 + 4);
                char name[32];
                if (tile) snprintf(name, sizeof name, "commvq %d bit t%d", bits, tile);
                else snprintf(name, sizeof name, "commvq %d bit", bits);
                row(name, T, us, bytes, dense_us);
            }
            unsetenv("COMMVQ_CUDA_ATTEND_TILE");
            cudaFree((void *)kv.sink_k); cudaFree((void *)kv.sink_v); cudaFree((void *)kv.sink_pos);
            cudaFree((void *)kv.codes); cudaFree((void *)kv.key_scales); cudaFree((void *)kv.value_bits);
            cudaFree((void *)kv.value_sigma); cudaFree((void *)kv.comp_pos);
            cudaFree((void *)kv.win_k); cudaFree((void *)kv.win_v); cudaFree((void *)kv.win_pos);
            cudaFree(qpos);
            cvq_codebook_free(cb);
        }
        CK(cudaFree(q));
        CK(cudaFree(out));
        CK(cudaFree(part));
    }
    cvq_context_free(ctx);
    return 0;
}
