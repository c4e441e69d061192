/*
 * The CPU backend. By default it runs the fast path (cpu_fast.h: SIMD
 * kernels chosen at run time, OpenMP over tokens, heads and context
 * ranges) whose codes are bit-identical to the reference's; with
 * cpu_reference = 1 in the context parameters it runs the reference
 * kernels of core/ref_*.c on one thread, exactly as a reader of
 * core/ref_*.c would.
 *
 * Buffers are host memory (the backend has no buffer entries), so views
 * are plain pointers.
 */
#define _POSIX_C_SOURCE 200809L
#include "backend.h"
#include "cpu_fast.h"
#include "numerics.h"
#include "reference.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>
#ifdef COMMVQ_HAVE_OPENMP
#include <omp.h>
#endif

static uint32_t cpu_count(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (uint32_t)n : 1u;
}

/* CPU model name from /proc/cpuinfo where there is one (Linux). */
static void cpu_name(char *out, size_t cap) {
    snprintf(out, cap, "host CPU");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10) == 0) {
            const char *c = strchr(line, ':');
            if (c) {
                c++;
                while (*c == ' ' || *c == '\t') c++;
                snprintf(out, cap, "%s", c);
                size_t l = strlen(out);
                while (l && (out[l - 1] == '\n' || out[l - 1] == '\r')) out[--l] = 0;
            }
            break;
        }
    }
    fclose(f);
}

static cvq_status cpu_list_devices(cvq_device_info *out, size_t cap, size_t *count) {
    *count = 1;
    if (cap == 0 || !out) return CVQ_OK;
    memset(out, 0, sizeof *out);
    out->backend = CVQ_BACKEND_CPU;
    out->index = 0;
    out->type = CVQ_DEVICE_CPU;
    cpu_name(out->name, sizeof out->name);
#ifdef COMMVQ_HAVE_OPENMP
    snprintf(out->driver, sizeof out->driver, "fast kernels (%s), OpenMP",
             cvq_cpu_kernels_get()->name);
#else
    snprintf(out->driver, sizeof out->driver, "fast kernels (%s), single thread (no OpenMP)",
             cvq_cpu_kernels_get()->name);
#endif
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    out->memory_bytes = (pages > 0 && psz > 0) ? (uint64_t)pages * (uint64_t)psz : 0;
    out->max_buffer_bytes = (uint64_t)SIZE_MAX;
    out->compute_units = cpu_count();
    out->exactness = CVQ_EXACT_GUARANTEED;
    out->usable = 1;
    snprintf(out->note, sizeof out->note,
             "codes bit-identical to the reference (cpu_reference = 1 runs the reference)");
    return CVQ_OK;
}

static cvq_status cpu_init(cvq_context *ctx, int device, void **state) {
    if (device > 0)
        return CVQ_FAIL(ctx, CVQ_ERR_NO_DEVICE, "the CPU backend has one device (0), %d was asked", device);
    *state = NULL;
    return CVQ_OK;
}

static void cpu_shutdown(void *state) { (void)state; }

/* Threads to use for a loop over n independent items. */
static int cpu_threads(const cvq_context *ctx, size_t n) {
    if (ctx->cpu_reference) return 1;
    int t = ctx->n_threads > 0 ? ctx->n_threads : (int)cpu_count();
    if ((size_t)t > n) t = (int)(n ? n : 1);
    return t;
}

/* The contract needs subnormals: refuse to encode under FTZ/DAZ. The check
 * runs on the calling thread; OpenMP workers inherit a fresh FP environment
 * on Linux, which is the default (no flush). */
static cvq_status check_fpu(cvq_context *ctx) {
    if (cvq_fpu_flushes_subnormals())
        return CVQ_FAIL(ctx, CVQ_ERR_UNSUPPORTED,
                        "the FPU flushes subnormals to zero (FTZ/DAZ set, e.g. by -ffast-math "
                        "code in the process); the numerics contract needs them preserved");
    return CVQ_OK;
}

static cvq_status cpu_encode_keys(cvq_context *ctx, const cvq_encode_keys_args *a) {
    cvq_status st = check_fpu(ctx);
    if (st) return st;
    const cvq_layer_view *lv = a->lv;
    const size_t kvd = cvq__kv_dims(lv->g), R = lv->g->key_stages;
    const size_t ns = cvq__key_scale_count(lv->g), nh = lv->g->n_kv_heads;
    const float *keys = cvq__view_host(a->keys);
    uint16_t *codes = cvq__view_host(a->codes);
    float *scales = cvq__view_host(a->scales);
    if (!ctx->cpu_reference)
        return cvq_cpu_fast_encode_keys(ctx, lv, a->n, keys, codes, scales,
                                        cpu_threads(ctx, SIZE_MAX));
    for (size_t t = 0; t < a->n; t++)
        cvq_ref_encode_key_token(lv, keys + t * kvd, codes + t * nh * R, scales + t * ns);
    return CVQ_OK;
}

static cvq_status cpu_encode_values(cvq_context *ctx, const cvq_encode_values_args *a) {
    cvq_status st = check_fpu(ctx);
    if (st) return st;
    const cvq_layer_view *lv = a->lv;
    const size_t kvd = cvq__kv_dims(lv->g), groups = lv->n_groups;
    const size_t bytes = groups * (lv->g->value_bits / 8);
    const float *values = cvq__view_host(a->values);
    uint8_t *bits = cvq__view_host(a->bits);
    float *sigma = cvq__view_host(a->sigma);
    if (!ctx->cpu_reference)
        return cvq_cpu_fast_encode_values(ctx, lv, a->n, values, bits, sigma,
                                          cpu_threads(ctx, a->n));
    const int nt = cpu_threads(ctx, a->n);
    const size_t scratch_n = cvq_ref_value_scratch(lv);
    size_t scratch_bytes;
    if (!cvq__mul_size(scratch_n, sizeof(float) * (size_t)nt, &scratch_bytes))
        return CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "value encoder scratch too large");
    float *scratch = cvq__alloc(&ctx->alloc, scratch_bytes);
    if (!scratch)
        return CVQ_FAIL(ctx, CVQ_ERR_OUT_OF_MEMORY, "value encoder scratch (%zu bytes)", scratch_bytes);
    const long long n = (long long)a->n;
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
#ifdef COMMVQ_HAVE_OPENMP
        float *my = scratch + (size_t)omp_get_thread_num() * scratch_n;
#pragma omp for schedule(dynamic, 1)
#else
        float *my = scratch;
#endif
        for (long long t = 0; t < n; t++)
            cvq_ref_encode_value_token(lv, values + (size_t)t * kvd, bits + (size_t)t * bytes,
                                       sigma + (size_t)t * groups, my);
    }
    cvq__free(&ctx->alloc, scratch);
    return CVQ_OK;
}

static cvq_status cpu_attend(cvq_context *ctx, const cvq_attend_args *a) {
    cvq_attend_host h;
    h.n_q = a->n_q;
    h.q = cvq__view_host(a->q);
    h.q_pos = cvq__view_host(a->q_pos);
    h.q_rotated = a->q_rotated;
    h.n_sink = a->n_sink;
    h.sink_k = cvq__view_host(a->sink_k);
    h.sink_v = cvq__view_host(a->sink_v);
    h.sink_pos = cvq__view_host(a->sink_pos);
    h.n_comp = a->n_comp;
    h.comp_codes = cvq__view_host(a->comp_codes);
    h.comp_kscale = cvq__view_host(a->comp_kscale);
    h.comp_vbits = cvq__view_host(a->comp_vbits);
    h.comp_vsigma = cvq__view_host(a->comp_vsigma);
    h.comp_pos = cvq__view_host(a->comp_pos);
    h.n_win = a->n_win;
    h.win_k = cvq__view_host(a->win_k);
    h.win_v = cvq__view_host(a->win_v);
    h.win_pos = cvq__view_host(a->win_pos);
    h.out = cvq__view_host(a->out);
    if (!ctx->cpu_reference) return cvq_cpu_fast_attend(ctx, a->lv, &h, cpu_threads(ctx, SIZE_MAX));
    return cvq_ref_attend(ctx, a->lv, &h);
}

const cvq_backend_i cvq_backend_cpu = {
    .api_version = CVQ_BACKEND_API_VERSION,
    .kind = CVQ_BACKEND_CPU,
    .name = "cpu",
    .list_devices = cpu_list_devices,
    .init = cpu_init,
    .shutdown = cpu_shutdown,
    .supports = NULL, /* every valid geometry */
    .buffer_alloc = NULL, .buffer_free = NULL, .buffer_write = NULL, .buffer_read = NULL,
    .encode_keys = cpu_encode_keys,
    .encode_values = cpu_encode_values,
    .attend = cpu_attend,
};
