/*
 * cuda_check: the CUDA backend against the CPU reference on a real GPU,
 * without cmocka (the GPU machine has none). scripts/gpu-check.sh runs it.
 *
 * For every geometry of a small grid (both pair layouts, both key scale
 * modes, GQA ratios 1..4 and a ragged one, value groups, d = 64..256):
 *   keys    cvq_encode_keys on a cuda context == the CPU context, bit for bit
 *           (codes and scales), over tokens of every kind (random, repeated,
 *           sub-code copies for near ties, subnormal, huge, tiny, zero);
 *   values  cvq_encode_values likewise (bits and sigma);
 *   attend  the same cache appends (sinks, compressed, window) on both
 *           contexts; outputs within a tolerance of the CPU's:
 *           max |cuda - cpu| / (max |cpu| + 1e-6) <= 2e-4;
 *   interop cvq_cuda_encode_keys/values/attend on device pointers give the
 *           same bits/values as the host API; a NaN input writes nothing and
 *           cvq_cuda_synchronize reports CVQ_ERR_NONFINITE_INPUT.
 * Prints one line per check and a summary; exit status 0 only when every
 * check passed, 2 when there is no CUDA device (the reason is printed).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "commvq.h"
#include "commvq_cuda.h"

static int g_fail, g_pass;
static double g_worst_attend;

static uint64_t rng_state;
static uint64_t rnd_u64(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double rnd_unit(void) { return ((double)(rnd_u64() >> 11) + 0.5) / 9007199254740992.0; }
static double rnd_normal(void) {
    double u0 = rnd_unit(), u1 = rnd_unit();
    return sqrt(-2.0 * log(u0)) * cos(6.283185307179586 * u1);
}

#define OK(call)                                                                                   \
    do {                                                                                           \
        cvq_status st_ = (call);                                                                   \
        if (st_ != CVQ_OK) {                                                                       \
            printf("FAIL %s:%d %s -> %s: %s\n", __FILE__, __LINE__, #call, cvq_status_name(st_),   \
                   cvq_last_error());                                                              \
            g_fail++;                                                                              \
            goto done;                                                                             \
        }                                                                                          \
    } while (0)

static void report(int ok, const char *what, const char *name) {
    printf("%s %-8s %s\n", ok ? "pass" : "FAIL", what, name);
    if (ok) g_pass++; else g_fail++;
}

typedef struct {
    uint32_t Hq, Hkv, d, R, F, Nc;
    cvq_key_scale_mode scale;
    cvq_pair_layout layout;
} gcase;

static const gcase k_grid[] = {
    {4, 4, 64, 2, 0, 64, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_ROTATE_HALF},
    {8, 2, 128, 4, 128, 128, CVQ_KEY_SCALE_HEAD, CVQ_PAIRS_ROTATE_HALF},
    {8, 2, 128, 3, 0, 256, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_INTERLEAVED},
    {6, 4, 96, 2, 192, 64, CVQ_KEY_SCALE_HEAD, CVQ_PAIRS_INTERLEAVED},  /* ragged GQA */
    {3, 1, 80, 5, 0, 40, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_ROTATE_HALF},
    {2, 1, 256, 2, 0, 512, CVQ_KEY_SCALE_HEAD, CVQ_PAIRS_ROTATE_HALF},
    {32, 8, 128, 11, 0, 1024, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_ROTATE_HALF}, /* LLaMA-3.1-8B, 1 bit */
};

static void fill(float *x, size_t n, size_t kvd, const float *w, uint32_t d) {
    for (size_t t = 0; t < n; t++) {
        float *v = x + t * kvd;
        const int kind = (int)(t % 11);
        if (kind == 1 && t) {
            memcpy(v, v - kvd, kvd * sizeof(float));
            continue;
        }
        /* kind 4, huge: entries near 1e18 at kvd = 64, scaled so that the sum of
         * squares over a whole token stays near 6e37, below FLT_MAX, at every
         * width (1e18 flat overflowed it at kvd = 1024, and the CPU then
         * refuses the token: found by running this program on the emulated
         * device, tests/cuda/fake_device.cpp) */
        const double huge = 1e18 / sqrt((double)kvd / 64.0);
        const double sc = kind == 3 ? 1e-40 : kind == 4 ? huge : kind == 5 ? 1e-30 : 1.0;
        for (size_t i = 0; i < kvd; i++) v[i] = kind == 6 ? 0.0f : (float)(rnd_normal() * sc);
        if (kind == 2 && w)
            for (uint32_t i = 0; i < d; i++) v[i] = 3.0f * w[i];
        if (kind == 3) v[0] = 1e-42f;
    }
}

static void check_case(cvq_context *cpu, cvq_context *cu, const gcase *c, size_t ci) {
    char name[160];
    snprintf(name, sizeof name, "case %zu (hq=%u hkv=%u d=%u R=%u F=%u Nc=%u %s %s)", ci, c->Hq, c->Hkv, c->d, c->R,
             c->F, c->Nc, c->scale ? "head" : "token", c->layout ? "interleaved" : "rotate_half");
    cvq_geometry g = {1, c->Hq, c->Hkv, c->d, c->R, c->scale, c->layout, c->F, c->Nc, 0, 0.0f};
    cvq_codebook *cb = NULL;
    float *k = NULL, *v = NULL, *s0 = NULL, *s1 = NULL, *sg0 = NULL, *sg1 = NULL, *q = NULL, *o0 = NULL, *o1 = NULL;
    uint16_t *c0 = NULL, *c1 = NULL;
    uint8_t *b0 = NULL, *b1 = NULL;
    cvq_cache *ca = NULL, *cb2 = NULL;
    void *dk = NULL, *dc = NULL, *ds = NULL;
    double theta[128];
    OK(cvq_geometry_resolve(&g));
    OK(cvq_rope_freqs_default(c->d, 10000.0, theta));
    OK(cvq_codebook_random(&g, theta, 0xC0DE + ci, NULL, &cb));
    const float *w;
    OK(cvq_codebook_tensor_cdata(cb, CVQ_T_KEY_W, 0, 0, &w));
    cvq_record_layout rl;
    OK(cvq_record_layout_of(&g, &rl));
    const size_t n = 300, kvd = (size_t)c->Hkv * c->d, HR = (size_t)c->Hkv * c->R;
    const size_t ns = rl.key_scale_count, G = rl.value_groups, vb = rl.value_bit_bytes;
    k = malloc(n * kvd * 4);
    v = malloc(n * kvd * 4);
    c0 = malloc(n * HR * 2);
    c1 = malloc(n * HR * 2);
    s0 = malloc(n * ns * 4);
    s1 = malloc(n * ns * 4);
    b0 = malloc(n * vb);
    b1 = malloc(n * vb);
    sg0 = malloc(n * G * 4);
    sg1 = malloc(n * G * 4);
    if (!k || !v || !c0 || !c1 || !s0 || !s1 || !b0 || !b1 || !sg0 || !sg1) {
        report(0, "alloc", name);
        goto done;
    }
    rng_state = 0x5EED + ci;
    fill(k, n, kvd, w, c->d);
    fill(v, n, kvd, NULL, c->d);
    /* keys */
    OK(cvq_encode_keys(cpu, cb, 0, k, CVQ_F32, n, c0, s0));
    memset(c1, 0xFF, n * HR * 2);
    OK(cvq_encode_keys(cu, cb, 0, k, CVQ_F32, n, c1, s1));
    report(!memcmp(c0, c1, n * HR * 2) && !memcmp(s0, s1, n * ns * 4), "keys", name);
    /* values */
    OK(cvq_encode_values(cpu, cb, 0, v, CVQ_F32, n, b0, sg0));
    memset(b1, 0x5A, n * vb);
    OK(cvq_encode_values(cu, cb, 0, v, CVQ_F32, n, b1, sg1));
    report(!memcmp(b0, b1, n * vb) && !memcmp(sg0, sg1, n * G * 4), "values", name);
    /* interop keys: device pointers, same bits; then a NaN call writes nothing */
    {
        cudaError_t e = cudaMalloc(&dk, n * kvd * 4);
        if (!e) e = cudaMalloc(&dc, n * HR * 2);
        if (!e) e = cudaMalloc(&ds, n * ns * 4);
        if (!e) e = cudaMemcpy(dk, k, n * kvd * 4, cudaMemcpyHostToDevice);
        if (!e) e = cudaMemset(dc, 0xFF, n * HR * 2);
        /* the legacy stream's copies are not ordered with the context's
         * non-blocking stream: wait for them */
        if (!e) e = cudaDeviceSynchronize();
        if (e) {
            printf("FAIL cuda: %s\n", cudaGetErrorName(e));
            g_fail++;
            goto done;
        }
        OK(cvq_cuda_encode_keys(cu, cb, 0, dk, n, dc, ds));
        OK(cvq_cuda_synchronize(cu));
        memset(c1, 0, n * HR * 2);
        cudaMemcpy(c1, dc, n * HR * 2, cudaMemcpyDeviceToHost);
        report(!memcmp(c0, c1, n * HR * 2), "interop", name);
        const float nan = NAN;
        cudaMemcpy((float *)dk + (n / 2) * kvd + 3, &nan, 4, cudaMemcpyHostToDevice);
        cudaMemset(dc, 0x77, n * HR * 2);
        cudaDeviceSynchronize();
        OK(cvq_cuda_encode_keys(cu, cb, 0, dk, n, dc, ds));
        const cvq_status st = cvq_cuda_synchronize(cu);
        cudaMemcpy(c1, dc, n * HR * 2, cudaMemcpyDeviceToHost);
        size_t touched = 0;
        for (size_t i = 0; i < n * HR; i++) touched += c1[i] != 0x7777;
        report(st == CVQ_ERR_NONFINITE_INPUT && touched == 0, "nan", name);
        OK(cvq_cuda_status(cu)); /* collected: clear again */
    }
    /* attention: sinks 4, window 32, the rest compressed; 3 queries */
    {
        cvq_cache_params cp = cvq_cache_default_params();
        cp.sinks = 4;
        cp.window = 32;
        OK(cvq_cache_create(cpu, cb, &cp, &ca));
        OK(cvq_cache_create(cu, cb, &cp, &cb2));
        int32_t *pos = malloc(n * sizeof(int32_t));
        for (size_t t = 0; t < n; t++) pos[t] = (int32_t)(t * 3 + 1);
        /* normal tokens only (the oracle's tolerance is relative) */
        rng_state = 0xA77E + ci;
        for (size_t t = 0; t < n * kvd; t++) {
            k[t] = (float)rnd_normal();
            v[t] = (float)rnd_normal();
        }
        cvq_status st = cvq_cache_append(ca, k, v, CVQ_F32, pos, n);
        if (!st) st = cvq_cache_append(cb2, k, v, CVQ_F32, pos, n);
        free(pos);
        OK(st);
        const size_t nq = 3, qd = (size_t)c->Hq * c->d;
        q = malloc(nq * qd * 4);
        o0 = malloc(nq * qd * 4);
        o1 = malloc(nq * qd * 4);
        for (size_t i = 0; i < nq * qd; i++) q[i] = (float)rnd_normal();
        const int32_t qp[3] = {(int32_t)(n * 3), 200, 5}; /* all, a causal cut, only sinks */
        for (int rot = 0; rot < 2; rot++) {
            OK(cvq_cache_attend(ca, q, qp, nq, rot ? CVQ_ATTEND_QUERIES_ROTATED : 0, o0));
            OK(cvq_cache_attend(cb2, q, qp, nq, rot ? CVQ_ATTEND_QUERIES_ROTATED : 0, o1));
            double mx = 0, err = 0;
            int nan_seen = 0;
            for (size_t i = 0; i < nq * qd; i++) {
                if (o1[i] != o1[i]) nan_seen = 1;
                if (fabs(o0[i]) > mx) mx = fabs(o0[i]);
                if (fabs((double)o1[i] - o0[i]) > err) err = fabs((double)o1[i] - o0[i]);
            }
            const double rel = err / (mx + 1e-6);
            if (rel > g_worst_attend) g_worst_attend = rel;
            char nm[200];
            snprintf(nm, sizeof nm, "%s %s rel.err %.2e", name, rot ? "q rotated" : "q raw", rel);
            report(!nan_seen && rel <= 2e-4, "attend", nm);
        }
    }
done:
    if (dk) cudaFree(dk);
    if (dc) cudaFree(dc);
    if (ds) cudaFree(ds);
    cvq_cache_free(ca);
    cvq_cache_free(cb2);
    free(k); free(v); free(c0); free(c1); free(s0); free(s1); free(b0); free(b1); free(sg0); free(sg1);
    free(q); free(o0); free(o1);
    cvq_codebook_free(cb);
}

int main(void) {
    cvq_context *cpu = NULL, *cu = NULL;
    cvq_context_params p = cvq_context_default_params();
    p.backend = CVQ_BACKEND_CUDA;
    cvq_status st = cvq_context_create(&p, &cu);
    if (st) {
        printf("cuda_check: no CUDA context: %s: %s\n", cvq_status_name(st), cvq_last_error());
        return 2;
    }
    cvq_device_info di;
    cvq_context_device(cu, &di);
    printf("cuda_check on %s (%s)\n", di.name, di.driver);
    p.backend = CVQ_BACKEND_CPU;
    if (cvq_context_create(&p, &cpu)) {
        printf("cuda_check: no CPU context: %s\n", cvq_last_error());
        return 1;
    }
    for (size_t i = 0; i < sizeof k_grid / sizeof k_grid[0]; i++) check_case(cpu, cu, &k_grid[i], i);
    printf("cuda_check: %d passed, %d failed; worst attention rel.err %.3e (tolerance 2e-4)\n", g_pass, g_fail,
           g_worst_attend);
    cvq_context_free(cu);
    cvq_context_free(cpu);
    return g_fail ? 1 : 0;
}
