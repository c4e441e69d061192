/*
 * bench_attention: time per decode step (one query token, all 32 query
 * heads) of one LLaMA-3.1-8B layer (Hq=32, Hkv=8, d=128) over a context of
 * T tokens, for
 *   - CommVQ-1 (R=11, Nc=1024) and CommVQ-2 (R=21, Nc=2048): the CPU
 *     backend's code-domain attention (the fast path, all threads) over T
 *     compressed records;
 *   - dense attention over FP32 and over FP16 K/V, written here with the
 *     same effort: all threads split the context, each head's K and V
 *     contiguous ([Hkv][T][d]), AVX2 + FMA, F16C conversion, a vectorised
 *     exp, two passes per block of tokens, partial softmaxes merged.
 * Ratios are to the dense FP16 time of the same run. The records are random
 * (codes, bits, scales): attention cost does not depend on their values.
 *
 *   bench_attention [--max-context T] [--context T] [--min-time S] [--threads N] [--cpu-time 0|1]
 *   (--context T: that row only)
 *
 * Not a test: nothing is asserted. Needs AVX2, FMA and F16C (checked).
 */
#define _POSIX_C_SOURCE 200809L
#include "bench_util.h"
#include "commvq.h"
#include "cpu_fast.h"
#include "reference.h"

#include <cpuid.h>
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef COMMVQ_HAVE_OPENMP
#include <omp.h>
#endif

#define CHECK(x)                                                                         \
    do {                                                                                 \
        cvq_status st_ = (x);                                                            \
        if (st_) {                                                                       \
            fprintf(stderr, "bench: %s: %s\n", cvq_status_name(st_), cvq_last_error()); \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

enum { HQ = 32, HKV = 8, D = 128, GQA = HQ / HKV, NV = D / 8 };

static double min_time = 1.0;
static int use_cpu_time = 0;

/* Wall time, or with --cpu-time the process's CPU time (all threads: on a
 * loaded machine, with --threads 1, the time one core needs). */
static double clock_now(void) {
    if (!use_cpu_time) return bench_now();
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- dense baseline ------------------------------------------------------------ */

/* exp for x <= 0 (softmax), 8 lanes: Cody-Waite reduction and a degree-6
 * polynomial with FMA; 0 below -87. */
static inline __m256 exp8(__m256 x) {
    const __m256 ok = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 q = _mm256_set1_ps(1.0f / 720.0f);
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f / 120.0f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f / 24.0f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f / 6.0f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.5f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(ok, _mm256_mul_ps(q, _mm256_castsi256_ps(e)));
}

static inline float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* 8 floats of row `row` at column v*8, from fp32 or fp16 storage */
static inline __m256 ld8(const void *base, int f16, size_t row, int v) {
    if (f16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + row * D + v * 8)));
    return _mm256_loadu_ps((const float *)base + row * D + v * 8);
}

#define DB 64 /* tokens per block: logits of a block, then its values */

/* One thread's part [c0, c1) of the context, KV head kv: the partial
 * softmax (max m, sum l, weighted value sum o) of its GQA heads. q is
 * pre-scaled by lambda and already rotated; K is stored rotated. */
static void dense_part(const void *K, const void *V, int f16, size_t T, const float *q, int kv,
                       size_t c0, size_t c1, float *m, float *l, float *o) {
    float lg[GQA][DB];
    for (int j = 0; j < GQA; j++) {
        m[j] = -INFINITY;
        l[j] = 0.0f;
        memset(o + j * D, 0, D * sizeof(float));
    }
    for (size_t tb = c0; tb < c1; tb += DB) {
        const size_t nb = c1 - tb < DB ? c1 - tb : DB;
        /* pass 1: logits */
        for (size_t t = 0; t < nb; t++) {
            const size_t row = (size_t)kv * T + tb + t;
            __m256 acc[GQA];
            for (int j = 0; j < GQA; j++) acc[j] = _mm256_setzero_ps();
            for (int v = 0; v < NV; v++) {
                const __m256 k8 = ld8(K, f16, row, v);
                for (int j = 0; j < GQA; j++)
                    acc[j] = _mm256_fmadd_ps(k8, _mm256_loadu_ps(q + (size_t)(kv * GQA + j) * D + v * 8), acc[j]);
            }
            for (int j = 0; j < GQA; j++) lg[j][t] = hsum8(acc[j]);
        }
        for (int j = 0; j < GQA; j++) {
            for (size_t t = nb; t < DB; t++) lg[j][t] = -INFINITY;
            /* online softmax: rescale the running sums to the new max */
            float mb = m[j];
            for (size_t t = 0; t < nb; t++) mb = lg[j][t] > mb ? lg[j][t] : mb;
            if (mb > m[j]) {
                const float sc = expf(m[j] - mb);
                l[j] *= sc;
                for (int f = 0; f < D; f++) o[j * D + f] *= sc;
                m[j] = mb;
            }
            __m256 ls = _mm256_setzero_ps();
            for (size_t t = 0; t < DB; t += 8) {
                const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(&lg[j][t]), _mm256_set1_ps(mb)));
                _mm256_storeu_ps(&lg[j][t], p);
                ls = _mm256_add_ps(ls, p);
            }
            l[j] += hsum8(ls);
        }
        /* pass 2: values, one head at a time over the block (V rows stay
         * in L1 between heads) */
        for (int j = 0; j < GQA; j++) {
            __m256 acc[NV];
            for (int v = 0; v < NV; v++) acc[v] = _mm256_loadu_ps(o + j * D + v * 8);
            for (size_t t = 0; t < nb; t++) {
                const __m256 p = _mm256_set1_ps(lg[j][t]);
                const size_t row = (size_t)kv * T + tb + t;
                for (int v = 0; v < NV; v++) acc[v] = _mm256_fmadd_ps(p, ld8(V, f16, row, v), acc[v]);
            }
            for (int v = 0; v < NV; v++) _mm256_storeu_ps(o + j * D + v * 8, acc[v]);
        }
    }
}

/* One decode step of dense attention: threads split the context; partial
 * softmaxes merged per head. part: [nt][HQ][D + 2] scratch. */
static void dense_step(const void *K, const void *V, int f16, size_t T, const float *q, int nt,
                       float *part, float *out) {
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
#ifdef COMMVQ_HAVE_OPENMP
        const int tid = omp_get_thread_num();
#else
        const int tid = 0;
#endif
        const size_t c0 = T * (size_t)tid / (size_t)nt, c1 = T * ((size_t)tid + 1) / (size_t)nt;
        float *pt = part + (size_t)tid * HQ * (D + 2);
        for (int kv = 0; kv < HKV; kv++) {
            float m[GQA], l[GQA];
            float *o = pt + (size_t)kv * GQA * (D + 2);
            dense_part(K, V, f16, T, q, kv, c0, c1, m, l, o);
            /* store m, l after the o rows of the group: layout per head
             * [o (D) | m | l] rebuilt here */
            for (int j = GQA - 1; j >= 0; j--) {
                memmove(o + j * (D + 2), o + j * D, D * sizeof(float));
            }
            for (int j = 0; j < GQA; j++) {
                o[j * (D + 2) + D] = m[j];
                o[j * (D + 2) + D + 1] = l[j];
            }
        }
    }
    for (int h = 0; h < HQ; h++) {
        float M = -INFINITY;
        for (int k = 0; k < nt; k++) {
            const float mk = part[((size_t)k * HQ + h) * (D + 2) + D];
            M = mk > M ? mk : M;
        }
        float L = 0.0f;
        float *oh = out + (size_t)h * D;
        memset(oh, 0, D * sizeof(float));
        for (int k = 0; k < nt; k++) {
            const float *pk = part + ((size_t)k * HQ + h) * (D + 2);
            if (pk[D] == -INFINITY) continue;
            const float sc = expf(pk[D] - M);
            L += sc * pk[D + 1];
            for (int f = 0; f < D; f++) oh[f] += sc * pk[f];
        }
        for (int f = 0; f < D; f++) oh[f] /= L;
    }
}

/* The dense baseline checked against a plain double-precision attention
 * (so that its speed is not that of a wrong kernel): max |err| / max |out|. */
static double dense_check(const void *K, const void *V, int f16, size_t T, const float *q, int nt,
                          float *part, float *out) {
    dense_step(K, V, f16, T, q, nt, part, out);
    double worst = 0.0, ref_max = 0.0;
    double *lg = malloc(T * sizeof(double));
    for (int h = 0; h < HQ; h++) {
        const int kv = h / GQA;
        double mx = -INFINITY, sum = 0.0;
        for (size_t t = 0; t < T; t++) {
            double acc = 0.0;
            for (int f = 0; f < D; f++) {
                const size_t e = ((size_t)kv * T + t) * D + (size_t)f;
                const double k = f16 ? cvq_f16_to_f32(((const uint16_t *)K)[e]) : ((const float *)K)[e];
                acc += (double)q[h * D + f] * k;
            }
            lg[t] = acc;
            mx = acc > mx ? acc : mx;
        }
        for (size_t t = 0; t < T; t++) {
            lg[t] = exp(lg[t] - mx);
            sum += lg[t];
        }
        for (int f = 0; f < D; f++) {
            double o = 0.0;
            for (size_t t = 0; t < T; t++) {
                const size_t e = ((size_t)kv * T + t) * D + (size_t)f;
                const double v = f16 ? cvq_f16_to_f32(((const uint16_t *)V)[e]) : ((const float *)V)[e];
                o += lg[t] * v;
            }
            o /= sum;
            const double err = fabs(o - (double)out[h * D + f]);
            worst = err > worst ? err : worst;
            ref_max = fabs(o) > ref_max ? fabs(o) : ref_max;
        }
    }
    free(lg);
    return worst / ref_max;
}

/* ---- driver ------------------------------------------------------------------------ */

typedef struct timing {
    double ms;
    int reps;
} timing;

int main(int argc, char **argv) {
    size_t max_ctx = 131072, only_ctx = 0;
    int nt = (int)sysconf(_SC_NPROCESSORS_ONLN);
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--max-context")) max_ctx = (size_t)atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--context")) only_ctx = (size_t)atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--min-time")) min_time = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads")) nt = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--cpu-time")) use_cpu_time = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: bench_attention [--max-context T] [--context T] [--min-time S] "
                            "[--threads N] [--cpu-time 0|1]\n");
            return 2;
        }
    }
    /* AVX2 (with the OS's YMM support) from the compiler; FMA and F16C
     * from CPUID leaf 1, ECX bits 12 and 29 */
    unsigned ea = 0, eb = 0, ec = 0, ed = 0;
    __get_cpuid(1, &ea, &eb, &ec, &ed);
    if (!__builtin_cpu_supports("avx2") || !(ec & (1u << 12)) || !(ec & (1u << 29))) {
        fprintf(stderr, "bench_attention: the dense baseline needs AVX2, FMA and F16C\n");
        return 1;
    }
    if (nt < 1) nt = 1;
    const size_t Ts[] = {1024, 4096, 16384, 32768, 131072};
    uint64_t rs = 7;
    double theta[64];
    CHECK(cvq_rope_freqs_default(D, 500000.0, theta));

    /* CommVQ geometries and contexts */
    cvq_geometry g[2];
    cvq_codebook *cb[2];
    cvq_record_layout rl[2];
    const uint32_t Rs[2] = {11, 21}, Ncs[2] = {1024, 2048};
    cvq_context_params pp = cvq_context_default_params();
    pp.backend = CVQ_BACKEND_CPU;
    pp.n_threads = nt;
    cvq_context *ctx;
    CHECK(cvq_context_create(&pp, &ctx));
    for (int s = 0; s < 2; s++) {
        memset(&g[s], 0, sizeof g[s]);
        g[s].n_layers = 1; g[s].n_q_heads = HQ; g[s].n_kv_heads = HKV; g[s].head_dim = D;
        g[s].key_stages = Rs[s]; g[s].value_bits = Ncs[s];
        CHECK(cvq_geometry_resolve(&g[s]));
        CHECK(cvq_codebook_random(&g[s], theta, 1, NULL, &cb[s]));
        CHECK(cvq_record_layout_of(&g[s], &rl[s]));
    }

    float *q = malloc(HQ * D * sizeof(float)), *qs = malloc(HQ * D * sizeof(float));
    float *out = malloc(HQ * D * sizeof(float));
    float *part = malloc((size_t)nt * HQ * (D + 2) * sizeof(float));
    for (int i = 0; i < HQ * D; i++) {
        q[i] = bench_rnd(&rs);
        qs[i] = q[i] * 0.08838835f; /* lambda = 1/sqrt(128) folded into q */
    }

    printf("bench_attention: one decode step, one LLaMA-3.1-8B layer (Hq=32 Hkv=8 d=128), %d threads, "
           "min time %.2f s per cell; %s ms per step (ratio to dense FP16)\n", nt, min_time,
           use_cpu_time ? "CPU-time" : "wall-clock");
    printf("%8s %12s %12s %20s %20s\n", "T", "dense FP32", "dense FP16", "CommVQ-1", "CommVQ-2");
    for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++) {
        const size_t T = Ts[ti];
        if (T > max_ctx) break;
        if (only_ctx && T != only_ctx) continue;
        float *K32 = malloc((size_t)HKV * T * D * sizeof(float)), *V32 = malloc((size_t)HKV * T * D * sizeof(float));
        uint16_t *K16 = malloc((size_t)HKV * T * D * 2), *V16 = malloc((size_t)HKV * T * D * 2);
        if (!K32 || !V32 || !K16 || !V16) {
            printf("%8zu  (not enough memory)\n", T);
            free(K32); free(V32); free(K16); free(V16);
            break;
        }
        for (size_t i = 0; i < (size_t)HKV * T * D; i++) {
            K32[i] = bench_rnd(&rs);
            V32[i] = bench_rnd(&rs);
            K16[i] = cvq_f32_to_f16(K32[i]);
            V16[i] = cvq_f32_to_f16(V32[i]);
        }
        double ms[4];
        if (ti == 0 || only_ctx)
            printf("(dense baseline vs double attention at T=%zu: normalised error FP32 %.1e, FP16 %.1e)\n",
                   T, dense_check(K32, V32, 0, T, qs, nt, part, out),
                   dense_check(K16, V16, 1, T, qs, nt, part, out));
        for (int f16 = 0; f16 < 2; f16++) {
            dense_step(f16 ? (void *)K16 : (void *)K32, f16 ? (void *)V16 : (void *)V32, f16, T, qs, nt, part, out);
            int reps = 0;
            const double t0 = clock_now();
            double el;
            do {
                dense_step(f16 ? (void *)K16 : (void *)K32, f16 ? (void *)V16 : (void *)V32, f16, T, qs, nt, part, out);
                reps++;
                el = clock_now() - t0;
            } while (el < min_time || reps < 3);
            ms[f16] = el / reps * 1e3;
        }
        free(K32); free(V32); free(K16); free(V16);
        for (int s = 0; s < 2; s++) {
            const size_t cbytes = rl[s].key_code_bytes, vbytes = rl[s].value_bit_bytes;
            uint8_t *codes = malloc(T * cbytes), *vbits = malloc(T * vbytes);
            float *ks = malloc(T * sizeof(float)), *vs = malloc(T * sizeof(float));
            int32_t *pos = malloc(T * sizeof(int32_t));
            for (size_t i = 0; i < T * cbytes; i++) codes[i] = (uint8_t)(bench_rnd(&rs) * 128.0f + 128.0f);
            for (size_t i = 0; i < T * vbytes; i++) vbits[i] = (uint8_t)(bench_rnd(&rs) * 128.0f + 128.0f);
            for (size_t i = 0; i < T; i++) {
                ks[i] = 20.0f + 5.0f * bench_rnd(&rs);
                vs[i] = 1.0f + 0.5f * bench_rnd(&rs);
                pos[i] = (int32_t)i;
            }
            cvq_layer_view lv;
            CHECK(cvq__layer_view(ctx, cb[s], 0, &lv));
            cvq_attend_host h;
            memset(&h, 0, sizeof h);
            const int32_t qpos = (int32_t)T;
            h.n_q = 1; h.q = q; h.q_pos = &qpos; h.q_rotated = 0;
            h.n_comp = T; h.comp_codes = codes; h.comp_kscale = ks; h.comp_vbits = vbits;
            h.comp_vsigma = vs; h.comp_pos = pos; h.out = out;
            CHECK(cvq_cpu_fast_attend(ctx, &lv, &h, nt));
            int reps = 0;
            const double t0 = clock_now();
            double el;
            do {
                CHECK(cvq_cpu_fast_attend(ctx, &lv, &h, nt));
                reps++;
                el = clock_now() - t0;
            } while (el < min_time || reps < 3);
            ms[2 + s] = el / reps * 1e3;
            free(codes); free(vbits); free(ks); free(vs); free(pos);
        }
        printf("%8zu %12.2f %12.2f %11.2f (%5.2fx) %11.2f (%5.2fx)\n", T, ms[0], ms[1], ms[2],
               ms[2] / ms[1], ms[3], ms[3] / ms[1]);
        fflush(stdout);
    }
    for (int s = 0; s < 2; s++) cvq_codebook_free(cb[s]);
    cvq_context_free(ctx);
    free(q); free(qs); free(out); free(part);
    return 0;
}
