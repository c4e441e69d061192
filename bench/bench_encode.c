/*
 * bench_encode: key and value encoding throughput (tokens per second) for
 * one LLaMA-3.1-8B layer (Hq=32, Hkv=8, d=128, one value group F=1024) at
 * 1 bit (R=11, Nc=1024, I=2048) and 2 bits (R=21, Nc=2048, I=4096), random
 * codebooks, uniform inputs in [-1, 1). One table; every ratio is against
 * the single-thread reference (cpu_reference = 1) measured in this run:
 *   - brute force: every stage computes all 4096 distances ||z - c(A,B)||^2
 *     directly (one thread, plain loops): what the decomposition saves;
 *   - reference: core/ref_keys.c and ref_values.c, one thread;
 *   - fast: the CPU backend's default path, each instruction set this CPU
 *     runs (forced through cvq_cpu_isa_force), on 1 and on all threads.
 * The fast rows also check their codes against the reference's (bit for bit).
 * Column tok/cpu-s divides by the process's CPU time instead of wall time
 * (on a loaded machine, a one-thread row's speed on one core).
 *
 *   bench_encode [--min-time S] [--seed S] [--isa avx512|avx2|portable]
 *   (--isa: only that instruction set's fast rows)
 *
 * Not a test: nothing is asserted.
 */
#define _POSIX_C_SOURCE 200809L
#include "bench_util.h"
#include "commvq.h"
#include "cpu_fast.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define CHECK(x)                                                                         \
    do {                                                                                 \
        cvq_status st_ = (x);                                                            \
        if (st_) {                                                                       \
            fprintf(stderr, "bench: %s: %s\n", cvq_status_name(st_), cvq_last_error()); \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

enum { HQ = 32, HKV = 8, D = 128, KVD = HKV * D, P = D / 2 };

static double min_time = 1.0;

/* Brute-force key encoder of one token (token scale mode, rotate_half): per
 * head and stage, the 4096 squared distances summed directly, argmin with
 * the lowest index on ties. Its codes agree with the library's except at
 * near ties (different roundings); it is timed, not trusted. */
static void brute_key_token(const float *w, const float *k, uint32_t R, uint16_t *codes) {
    float ss = 0.0f;
    for (int i = 0; i < KVD; i++) ss = ss + k[i] * k[i];
    const float inv = ss > 0.0f ? 1.0f / sqrtf(ss) : 0.0f;
    float z[D];
    for (int h = 0; h < HKV; h++) {
        for (int i = 0; i < D; i++) z[i] = k[h * D + i] * inv;
        for (uint32_t r = 0; r < R; r++) {
            const float *wr = w + ((size_t)h * R + r) * 64 * P * 2;
            float best = INFINITY;
            int kb = 0;
            for (int A = 0; A < 64; A++)
                for (int B = 0; B < 64; B++) {
                    const float *wA = wr + (size_t)A * P * 2, *wB = wr + (size_t)B * P * 2;
                    float dist = 0.0f;
                    for (int p = 0; p < P; p++) {
                        const float er = z[p] - (wA[2 * p] - wB[2 * p + 1]);
                        const float ei = z[p + P] - (wA[2 * p + 1] + wB[2 * p]);
                        dist = dist + (er * er + ei * ei);
                    }
                    if (dist < best) {
                        best = dist;
                        kb = 64 * A + B;
                    }
                }
            codes[h * R + r] = (uint16_t)kb;
            const float *wA = wr + (size_t)(kb / 64) * P * 2, *wB = wr + (size_t)(kb % 64) * P * 2;
            for (int p = 0; p < P; p++) {
                z[p] = z[p] - (wA[2 * p] - wB[2 * p + 1]);
                z[p + P] = z[p + P] - (wA[2 * p + 1] + wB[2 * p]);
            }
        }
    }
}

typedef struct run {
    cvq_context *ctx;
    const cvq_codebook *cb;
    const float *in;
    size_t batch, n_in;   /* tokens per call; tokens available */
    int values;
    uint16_t *codes;
    float *scales;
    uint8_t *bits;
} run;

/* CPU time of the whole process (all threads), seconds. */
static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Calls of `batch` tokens (walking through the input) until min_time has
 * passed; returns tokens per second of wall time, and in *per_cpu tokens
 * per second of CPU time (summed over threads: on a loaded machine the
 * one-thread figure of a row is its speed on one core). The first call is
 * a warm-up. */
static double measure(run *r, double *per_cpu) {
    size_t off = 0, done = 0;
    double t0 = 0.0, c0 = 0.0;
    for (int call = 0;; call++) {
        if (off + r->batch > r->n_in) off = 0;
        const float *x = r->in + off * KVD;
        if (r->values)
            CHECK(cvq_encode_values(r->ctx, r->cb, 0, x, CVQ_F32, r->batch, r->bits + off * 256 * 8,
                                    r->scales + off));
        else
            CHECK(cvq_encode_keys(r->ctx, r->cb, 0, x, CVQ_F32, r->batch, r->codes + off * HKV * 32,
                                  r->scales + off));
        off += r->batch;
        if (call == 0) {
            t0 = bench_now();
            c0 = cpu_now();
            continue;
        }
        done += r->batch;
        const double el = bench_now() - t0;
        if (el >= min_time) {
            *per_cpu = (double)done / (cpu_now() - c0);
            return (double)done / el;
        }
    }
}

static cvq_context *make_ctx(int reference, int threads) {
    cvq_context_params p = cvq_context_default_params();
    p.backend = CVQ_BACKEND_CPU;
    p.cpu_reference = reference;
    p.n_threads = threads;
    cvq_context *c;
    CHECK(cvq_context_create(&p, &c));
    return c;
}

int main(int argc, char **argv) {
    uint64_t seed = 1;
    const char *only = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--min-time")) min_time = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--isa")) only = argv[i + 1];
        else if (!strcmp(argv[i], "--seed")) seed = (uint64_t)atoll(argv[i + 1]);
        else {
            fprintf(stderr, "usage: bench_encode [--min-time S] [--seed S] [--isa avx512|avx2|portable]\n");
            return 2;
        }
    }
    const int ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN);
    const size_t n_in = 4096;
    float *in = malloc(n_in * KVD * sizeof(float));
    uint64_t rs = seed;
    for (size_t i = 0; i < n_in * KVD; i++) in[i] = bench_rnd(&rs);
    uint16_t *codes = malloc(n_in * HKV * 32 * sizeof(uint16_t));
    uint16_t *codes_ref = malloc(n_in * HKV * 32 * sizeof(uint16_t));
    float *scales = malloc(n_in * sizeof(float)), *scales_ref = malloc(n_in * sizeof(float));
    uint8_t *bits = malloc(n_in * 256 * 8), *bits_ref = malloc(n_in * 256 * 8);
    double theta[64];
    CHECK(cvq_rope_freqs_default(D, 500000.0, theta));

    printf("bench_encode: one LLaMA-3.1-8B layer (Hq=32 Hkv=8 d=128, F=1024), random codebooks, "
           "seed %llu, %d CPUs, min time %.2f s per row\n",
           (unsigned long long)seed, ncpu, min_time);
    printf("%-6s %-6s %-34s %7s %12s %9s %12s %s\n", "bits", "what", "encoder", "threads", "tokens/s",
           "vs ref", "tok/cpu-s", "codes");
    const struct { const char *name; uint32_t R, Nc; } set[] = {{"1-bit", 11, 1024}, {"2-bit", 21, 2048}};
    for (int s = 0; s < 2; s++) {
        cvq_geometry g;
        memset(&g, 0, sizeof g);
        g.n_layers = 1; g.n_q_heads = HQ; g.n_kv_heads = HKV; g.head_dim = D;
        g.key_stages = set[s].R; g.value_bits = set[s].Nc;
        CHECK(cvq_geometry_resolve(&g));
        cvq_codebook *cb;
        CHECK(cvq_codebook_random(&g, theta, seed, NULL, &cb));
        const float *w;
        CHECK(cvq_codebook_tensor_cdata(cb, CVQ_T_KEY_W, 0, 0, &w));
        const size_t ncodes = n_in * HKV * set[s].R, nbytes = n_in * set[s].Nc / 8;

        for (int values = 0; values < 2; values++) {
            const char *what = values ? "values" : "keys";
            /* reference, one thread; its outputs over the whole input are
             * the bits the fast rows must reproduce */
            cvq_context *ref = make_ctx(1, 1);
            run r = {ref, cb, in, values ? 8 : 32, n_in, values, codes_ref, scales_ref, bits_ref};
            double c_ref;
            const double t_ref = measure(&r, &c_ref);
            if (values)
                CHECK(cvq_encode_values(ref, cb, 0, in, CVQ_F32, 256, bits_ref, scales_ref));
            else
                CHECK(cvq_encode_keys(ref, cb, 0, in, CVQ_F32, 1024, codes_ref, scales_ref));
            const size_t n_check = values ? 256 : 1024;
            if (!values) {
                /* brute force: a few tokens, one thread */
                uint16_t bc[HKV * 32];
                size_t done = 0, agree = 0, total = 0;
                const double t0 = bench_now();
                double el = 0.0;
                while (el < min_time || done < 2) {
                    brute_key_token(w, in + done * KVD, set[s].R, bc);
                    for (uint32_t i = 0; i < HKV * set[s].R; i++)
                        agree += bc[i] == codes_ref[done * HKV * set[s].R + i];
                    total += HKV * set[s].R;
                    done++;
                    el = bench_now() - t0;
                }
                printf("%-6s %-6s %-34s %7d %12.1f %8.3fx %12s %zu/%zu codes equal to the reference's\n",
                       set[s].name, what, "brute force (4096 distances)", 1, (double)done / el,
                       (double)done / el / t_ref, "-", agree, total);
            }
            printf("%-6s %-6s %-34s %7d %12.1f %8.3fx %12.1f (the baseline)\n", set[s].name, what,
                   values ? "reference" : "reference (decomposed distances)", 1, t_ref, 1.0, c_ref);
            cvq_context_free(ref);
            for (int isa = CVQ_CPU_ISA_COUNT - 1; isa >= 0; isa--) {
                if (only && strcmp(only, cvq_cpu_isa_name((cvq_cpu_isa)isa))) continue;
                if (!cvq_cpu_isa_force((cvq_cpu_isa)isa)) continue;
                for (int th = 1; th <= ncpu; th = th == ncpu ? ncpu + 1 : ncpu) {
                    cvq_context *fast = make_ctx(0, th);
                    run f = {fast, cb, in, values ? 128 : 1024, n_in, values, codes, scales, bits};
                    double c_f;
                    const double t_f = measure(&f, &c_f);
                    bool same;
                    if (values) {
                        CHECK(cvq_encode_values(fast, cb, 0, in, CVQ_F32, n_check, bits, scales));
                        same = !memcmp(bits, bits_ref, n_check * set[s].Nc / 8) &&
                               !memcmp(scales, scales_ref, n_check * sizeof(float));
                    } else {
                        CHECK(cvq_encode_keys(fast, cb, 0, in, CVQ_F32, n_check, codes, scales));
                        same = !memcmp(codes, codes_ref, n_check * HKV * set[s].R * sizeof(uint16_t)) &&
                               !memcmp(scales, scales_ref, n_check * sizeof(float));
                    }
                    char name[64];
                    snprintf(name, sizeof name, "fast %s", cvq_cpu_isa_name((cvq_cpu_isa)isa));
                    printf("%-6s %-6s %-34s %7d %12.1f %8.2fx %12.1f %s\n", set[s].name, what, name, th,
                           t_f, t_f / t_ref, c_f, same ? "bit-identical" : "DIFFERENT");
                    cvq_context_free(fast);
                }
            }
            cvq_cpu_isa_force(CVQ_CPU_ISA_COUNT);
        }
        (void)ncodes;
        (void)nbytes;
        cvq_codebook_free(cb);
    }
    free(in); free(codes); free(codes_ref); free(scales); free(scales_ref); free(bits); free(bits_ref);
    return 0;
}
