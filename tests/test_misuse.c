/*
 * API misuse and limits (issue 8, item 4). Every case asserts the exact
 * status, that cvq_last_error() names the problem (a substring), that no
 * output was written (guard-banded buffers from the conformance harness,
 * filled with a pattern) and that the objects still work afterwards (a valid
 * encode gives the bytes of a baseline taken before any misuse, the cache's
 * statistics and attention output are unchanged).
 *
 * Cases: a NULL for every pointer parameter of every public entry point that
 * takes one (one table row each); zero counts; a dtype outside cvq_dtype;
 * layer indices out of range; cache positions negative, repeated or
 * decreasing, within one append and across two; token/query counts whose byte
 * sizes overflow size_t for every function taking a count; a codebook file
 * overwritten, truncated and deleted after cvq_codebook_load (the loader
 * reads the whole file into memory and keeps nothing of it: core/cvq_file.c),
 * and loading a file while it is being replaced.
 *
 * Not expressible in C and so not here: a cache whose geometry differs from
 * its codebook's (a cache takes its geometry from its codebook) and attention
 * on a layer out of range (a cache's layer is fixed when it is created and
 * checked then).
 */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "commvq.h"
#include "harness.h"

/* ---- fixture ------------------------------------------------------------------ */

enum { T = 3, NQ = 2 };

typedef struct fx {
    cvq_geometry g; /* resolved */
    double theta[128];
    cvq_context *ctx;
    cvq_codebook *cb;
    cvq_cache *cache;
    size_t kvd, n_codes, n_scales, n_bytes, n_sig, per_q;
    float *keys, *vals, *q;
    int32_t pos[T], next_pos[T], qpos[NQ];
    /* guard-banded outputs: any write shows */
    uint16_t *codes;
    float *scales, *sigma, *dec, *out;
    uint8_t *bits;
    /* valid inputs for the decoders */
    uint16_t *in_codes;
    float *in_scales, *in_sigma;
    uint8_t *in_bits;
    /* baseline */
    uint16_t *base_codes;
    float *base_scales, *base_attn;
    cvq_cache_stats base_stats;
} fx;

static fx F;

static cvq_geometry test_geometry(void) {
    cvq_geometry g;
    memset(&g, 0, sizeof g);
    g.n_layers = 2;
    g.n_q_heads = 4;
    g.n_kv_heads = 2;
    g.head_dim = 64;
    g.key_stages = 3;
    g.value_bits = 64;
    g.value_group_width = 64;
    return g;
}

static void fill(float *x, size_t n, uint64_t seed) {
    th_rng r;
    th_rng_seed(&r, seed);
    th_fill_normal(&r, x, n, 1.0);
}

static void *guard(size_t bytes) {
    void *p = th_guard_alloc(bytes);
    assert_non_null(p);
    return p;
}

static void reset_guards(void) {
    /* th_guard_alloc fills the inside with TH_FILL_BYTE */
    memset(F.codes, TH_FILL_BYTE, F.n_codes * sizeof(uint16_t));
    memset(F.scales, TH_FILL_BYTE, F.n_scales * sizeof(float));
    memset(F.bits, TH_FILL_BYTE, F.n_bytes);
    memset(F.sigma, TH_FILL_BYTE, F.n_sig * sizeof(float));
    memset(F.dec, TH_FILL_BYTE, T * F.kvd * sizeof(float));
    memset(F.out, TH_FILL_BYTE, NQ * F.per_q * sizeof(float));
}

/* Every output buffer still holds its fill pattern and its guard bands. */
static void assert_outputs_untouched(const char *what) {
    const void *bufs[] = {F.codes, F.scales, F.bits, F.sigma, F.dec, F.out};
    const char *names[] = {"codes", "scales", "bits", "sigma", "decoded", "attention out"};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        if (!th_guard_ok(bufs[i])) fail_msg("%s: guard band of %s overwritten", what, names[i]);
        if (!th_guard_untouched(bufs[i])) fail_msg("%s: %s written by a failing call", what, names[i]);
    }
}

static void attend_now(float *out) {
    assert_int_equal(cvq_cache_attend(F.cache, F.q, F.qpos, NQ, 0, out), CVQ_OK);
}

/* The objects work as before the misuse: a valid encode gives the baseline's
 * bytes, the cache holds the same tokens and attends to the same output. */
static void assert_objects_work(const char *what) {
    uint16_t *c = malloc(F.n_codes * sizeof *c);
    float *s = malloc(F.n_scales * sizeof *s), *o = malloc(NQ * F.per_q * sizeof *o);
    assert_true(c && s && o);
    cvq_status st = cvq_encode_keys(F.ctx, F.cb, 1, F.keys, CVQ_F32, T, c, s);
    if (st) fail_msg("%s: a valid encode afterwards gave %s (%s)", what, cvq_status_name(st), cvq_last_error());
    if (memcmp(c, F.base_codes, F.n_codes * sizeof *c) || memcmp(s, F.base_scales, F.n_scales * sizeof *s))
        fail_msg("%s: encode after the misuse differs from the baseline", what);
    cvq_cache_stats cs;
    assert_int_equal(cvq_cache_stats_get(F.cache, &cs), CVQ_OK);
    if (memcmp(&cs, &F.base_stats, sizeof cs)) fail_msg("%s: cache statistics changed", what);
    attend_now(o);
    if (memcmp(o, F.base_attn, NQ * F.per_q * sizeof *o)) fail_msg("%s: cache attention changed", what);
    free(c);
    free(s);
    free(o);
}

/* A failing call: exact status, a message naming the problem, no output
 * written, objects intact. */
static void expect_fail(const char *what, cvq_status got, cvq_status want, const char *msg) {
    if (got != want)
        fail_msg("%s: got %s (%s), want %s", what, cvq_status_name(got), cvq_last_error(),
                 cvq_status_name(want));
    if (msg && !strstr(cvq_last_error(), msg))
        fail_msg("%s: message \"%s\" does not contain \"%s\"", what, cvq_last_error(), msg);
    assert_outputs_untouched(what);
    assert_objects_work(what);
    reset_guards();
}

static int setup(void **state) {
    (void)state;
    memset(&F, 0, sizeof F);
    F.g = test_geometry();
    assert_int_equal(cvq_geometry_resolve(&F.g), CVQ_OK);
    assert_int_equal(cvq_rope_freqs_default(F.g.head_dim, 10000.0, F.theta), CVQ_OK);
    assert_int_equal(cvq_codebook_random(&F.g, F.theta, 42, NULL, &F.cb), CVQ_OK);
    cvq_context_params p = cvq_context_default_params();
    p.backend = CVQ_BACKEND_CPU;
    p.n_threads = 1;
    assert_int_equal(cvq_context_create(&p, &F.ctx), CVQ_OK);
    cvq_record_layout rl;
    assert_int_equal(cvq_record_layout_of(&F.g, &rl), CVQ_OK);
    F.kvd = (size_t)F.g.n_kv_heads * F.g.head_dim;
    F.n_codes = T * (size_t)F.g.n_kv_heads * F.g.key_stages;
    F.n_scales = T * (size_t)rl.key_scale_count;
    F.n_bytes = T * (size_t)rl.value_bit_bytes;
    F.n_sig = T * (size_t)rl.value_groups;
    F.per_q = (size_t)F.g.n_q_heads * F.g.head_dim;
    F.keys = malloc(T * F.kvd * sizeof(float));
    F.vals = malloc(T * F.kvd * sizeof(float));
    F.q = malloc(NQ * F.per_q * sizeof(float));
    assert_true(F.keys && F.vals && F.q);
    fill(F.keys, T * F.kvd, 1);
    fill(F.vals, T * F.kvd, 2);
    fill(F.q, NQ * F.per_q, 3);
    for (int i = 0; i < T; i++) {
        F.pos[i] = 10 + 2 * i;
        F.next_pos[i] = 100 + i;
    }
    F.qpos[0] = 11;
    F.qpos[1] = 50;
    F.codes = guard(F.n_codes * sizeof(uint16_t));
    F.scales = guard(F.n_scales * sizeof(float));
    F.bits = guard(F.n_bytes);
    F.sigma = guard(F.n_sig * sizeof(float));
    F.dec = guard(T * F.kvd * sizeof(float));
    F.out = guard(NQ * F.per_q * sizeof(float));
    /* valid decoder inputs, and the baseline */
    F.in_codes = malloc(F.n_codes * sizeof(uint16_t));
    F.in_scales = malloc(F.n_scales * sizeof(float));
    F.in_bits = malloc(F.n_bytes);
    F.in_sigma = malloc(F.n_sig * sizeof(float));
    F.base_codes = malloc(F.n_codes * sizeof(uint16_t));
    F.base_scales = malloc(F.n_scales * sizeof(float));
    F.base_attn = malloc(NQ * F.per_q * sizeof(float));
    assert_true(F.in_codes && F.in_scales && F.in_bits && F.in_sigma && F.base_codes && F.base_scales &&
                F.base_attn);
    assert_int_equal(cvq_encode_keys(F.ctx, F.cb, 0, F.keys, CVQ_F32, T, F.in_codes, F.in_scales), CVQ_OK);
    assert_int_equal(cvq_encode_values(F.ctx, F.cb, 0, F.vals, CVQ_F32, T, F.in_bits, F.in_sigma), CVQ_OK);
    assert_int_equal(cvq_encode_keys(F.ctx, F.cb, 1, F.keys, CVQ_F32, T, F.base_codes, F.base_scales), CVQ_OK);
    cvq_cache_params cp = cvq_cache_default_params();
    cp.layer = 1;
    cp.window = 1;
    cp.sinks = 1;
    assert_int_equal(cvq_cache_create(F.ctx, F.cb, &cp, &F.cache), CVQ_OK);
    assert_int_equal(cvq_cache_append(F.cache, F.keys, F.vals, CVQ_F32, F.pos, T), CVQ_OK);
    assert_int_equal(cvq_cache_stats_get(F.cache, &F.base_stats), CVQ_OK);
    assert_true(F.base_stats.n_compressed > 0); /* the window flushed once */
    attend_now(F.base_attn);
    return 0;
}

static int teardown(void **state) {
    (void)state;
    cvq_cache_free(F.cache);
    cvq_codebook_free(F.cb);
    cvq_context_free(F.ctx);
    th_guard_free(F.codes);
    th_guard_free(F.scales);
    th_guard_free(F.bits);
    th_guard_free(F.sigma);
    th_guard_free(F.dec);
    th_guard_free(F.out);
    free(F.keys);
    free(F.vals);
    free(F.q);
    free(F.in_codes);
    free(F.in_scales);
    free(F.in_bits);
    free(F.in_sigma);
    free(F.base_codes);
    free(F.base_scales);
    free(F.base_attn);
    return 0;
}

/* ---- NULL for every pointer parameter ------------------------------------------------ */

/* Scratch targets for the rows' non-NULL out-parameters. They are not the
 * guarded outputs: a call that fails on a NULL may still legitimately clear
 * an out-handle (the header: a failed create leaves *out == NULL). */
static cvq_geometry s_geom;
static cvq_record_layout s_rl;
static double s_theta[64];
static cvq_backend_kind s_kind;
static size_t s_count;
static cvq_device_info s_dev;
static cvq_context *s_ctx;
static cvq_codebook *s_cb;
static cvq_cache *s_cache;
static cvq_tensor_info s_ti;
static float *s_data;
static const float *s_cdata;
static cvq_cache_stats s_stats;
static cvq_context_params s_params;

#define CALL(name, expr) \
    static cvq_status name(void) { return (expr); }

CALL(n_geom_resolve, cvq_geometry_resolve(NULL))
CALL(n_layout_g, cvq_record_layout_of(NULL, &s_rl))
CALL(n_layout_out, cvq_record_layout_of(&F.g, NULL))
CALL(n_freqs_default, cvq_rope_freqs_default(64, 10000.0, NULL))
CALL(n_freqs_linear, cvq_rope_freqs_linear(64, 10000.0, 2.0, NULL))
CALL(n_freqs_llama3, cvq_rope_freqs_llama3(64, 500000.0, 8.0, 1.0, 4.0, 8192.0, NULL))
CALL(n_freqs_yarn, cvq_rope_freqs_yarn(64, 10000.0, 4.0, 4096.0, 32.0, 1.0, NULL, NULL))
CALL(n_from_name_name, cvq_backend_from_name(NULL, &s_kind))
CALL(n_from_name_out, cvq_backend_from_name("cpu", NULL))
CALL(n_list_count, cvq_list_devices(&s_dev, 1, NULL))
CALL(n_list_out, cvq_list_devices(NULL, 1, &s_count))
CALL(n_ctx_create_out, cvq_context_create(&s_params, NULL))
CALL(n_ctx_device_ctx, cvq_context_device(NULL, &s_dev))
CALL(n_ctx_device_out, cvq_context_device(F.ctx, NULL))
CALL(n_cb_create_g, cvq_codebook_create(NULL, F.theta, NULL, &s_cb))
CALL(n_cb_create_theta, cvq_codebook_create(&F.g, NULL, NULL, &s_cb))
CALL(n_cb_create_out, cvq_codebook_create(&F.g, F.theta, NULL, NULL))
CALL(n_cb_random_g, cvq_codebook_random(NULL, F.theta, 1, NULL, &s_cb))
CALL(n_cb_random_theta, cvq_codebook_random(&F.g, NULL, 1, NULL, &s_cb))
CALL(n_cb_random_out, cvq_codebook_random(&F.g, F.theta, 1, NULL, NULL))
CALL(n_cb_load_path, cvq_codebook_load(NULL, NULL, &s_cb))
CALL(n_cb_load_out, cvq_codebook_load("/nonexistent.cvq", NULL, NULL))
CALL(n_cb_loadmem_data, cvq_codebook_load_memory(NULL, 100, NULL, &s_cb))
CALL(n_cb_loadmem_out, cvq_codebook_load_memory(F.theta, sizeof F.theta, NULL, NULL))
CALL(n_cb_save_cb, cvq_codebook_save(NULL, "/tmp/x.cvq", 0))
CALL(n_cb_save_path, cvq_codebook_save(F.cb, NULL, 0))
CALL(n_cb_geom_cb, cvq_codebook_geometry(NULL, &s_geom))
CALL(n_cb_geom_out, cvq_codebook_geometry(F.cb, NULL))
CALL(n_cb_theta_cb, cvq_codebook_rope_theta(NULL, s_theta))
CALL(n_cb_theta_out, cvq_codebook_rope_theta(F.cb, NULL))
CALL(n_cb_note_cb, cvq_codebook_set_note(NULL, "note"))
CALL(n_cb_tinfo_cb, cvq_codebook_tensor_info(NULL, CVQ_T_KEY_W, &s_ti))
CALL(n_cb_tinfo_out, cvq_codebook_tensor_info(F.cb, CVQ_T_KEY_W, NULL))
CALL(n_cb_tdata_cb, cvq_codebook_tensor_data(NULL, CVQ_T_KEY_W, 0, 0, &s_data))
CALL(n_cb_tdata_out, cvq_codebook_tensor_data(F.cb, CVQ_T_KEY_W, 0, 0, NULL))
CALL(n_cb_tcdata_cb, cvq_codebook_tensor_cdata(NULL, CVQ_T_KEY_W, 0, 0, &s_cdata))
CALL(n_cb_tcdata_out, cvq_codebook_tensor_cdata(F.cb, CVQ_T_KEY_W, 0, 0, NULL))
CALL(n_cb_commit, cvq_codebook_commit(NULL))
CALL(n_enck_ctx, cvq_encode_keys(NULL, F.cb, 0, F.keys, CVQ_F32, T, F.codes, F.scales))
CALL(n_enck_cb, cvq_encode_keys(F.ctx, NULL, 0, F.keys, CVQ_F32, T, F.codes, F.scales))
CALL(n_enck_keys, cvq_encode_keys(F.ctx, F.cb, 0, NULL, CVQ_F32, T, F.codes, F.scales))
CALL(n_enck_codes, cvq_encode_keys(F.ctx, F.cb, 0, F.keys, CVQ_F32, T, NULL, F.scales))
CALL(n_enck_scales, cvq_encode_keys(F.ctx, F.cb, 0, F.keys, CVQ_F32, T, F.codes, NULL))
CALL(n_encv_ctx, cvq_encode_values(NULL, F.cb, 0, F.vals, CVQ_F32, T, F.bits, F.sigma))
CALL(n_encv_cb, cvq_encode_values(F.ctx, NULL, 0, F.vals, CVQ_F32, T, F.bits, F.sigma))
CALL(n_encv_vals, cvq_encode_values(F.ctx, F.cb, 0, NULL, CVQ_F32, T, F.bits, F.sigma))
CALL(n_encv_bits, cvq_encode_values(F.ctx, F.cb, 0, F.vals, CVQ_F32, T, NULL, F.sigma))
CALL(n_encv_sigma, cvq_encode_values(F.ctx, F.cb, 0, F.vals, CVQ_F32, T, F.bits, NULL))
CALL(n_deck_ctx, cvq_decode_keys(NULL, F.cb, 0, F.in_codes, F.in_scales, T, F.dec))
CALL(n_deck_cb, cvq_decode_keys(F.ctx, NULL, 0, F.in_codes, F.in_scales, T, F.dec))
CALL(n_deck_codes, cvq_decode_keys(F.ctx, F.cb, 0, NULL, F.in_scales, T, F.dec))
CALL(n_deck_scales, cvq_decode_keys(F.ctx, F.cb, 0, F.in_codes, NULL, T, F.dec))
CALL(n_deck_out, cvq_decode_keys(F.ctx, F.cb, 0, F.in_codes, F.in_scales, T, NULL))
CALL(n_decv_ctx, cvq_decode_values(NULL, F.cb, 0, F.in_bits, F.in_sigma, T, F.dec))
CALL(n_decv_cb, cvq_decode_values(F.ctx, NULL, 0, F.in_bits, F.in_sigma, T, F.dec))
CALL(n_decv_bits, cvq_decode_values(F.ctx, F.cb, 0, NULL, F.in_sigma, T, F.dec))
CALL(n_decv_sigma, cvq_decode_values(F.ctx, F.cb, 0, F.in_bits, NULL, T, F.dec))
CALL(n_decv_out, cvq_decode_values(F.ctx, F.cb, 0, F.in_bits, F.in_sigma, T, NULL))
CALL(n_cache_create_ctx, cvq_cache_create(NULL, F.cb, NULL, &s_cache))
CALL(n_cache_create_cb, cvq_cache_create(F.ctx, NULL, NULL, &s_cache))
CALL(n_cache_create_out, cvq_cache_create(F.ctx, F.cb, NULL, NULL))
CALL(n_append_cache, cvq_cache_append(NULL, F.keys, F.vals, CVQ_F32, F.next_pos, T))
CALL(n_append_keys, cvq_cache_append(F.cache, NULL, F.vals, CVQ_F32, F.next_pos, T))
CALL(n_append_vals, cvq_cache_append(F.cache, F.keys, NULL, CVQ_F32, F.next_pos, T))
CALL(n_append_pos, cvq_cache_append(F.cache, F.keys, F.vals, CVQ_F32, NULL, T))
CALL(n_attend_cache, cvq_cache_attend(NULL, F.q, F.qpos, NQ, 0, F.out))
CALL(n_attend_q, cvq_cache_attend(F.cache, NULL, F.qpos, NQ, 0, F.out))
CALL(n_attend_qpos, cvq_cache_attend(F.cache, F.q, NULL, NQ, 0, F.out))
CALL(n_attend_out, cvq_cache_attend(F.cache, F.q, F.qpos, NQ, 0, NULL))
CALL(n_stats_cache, cvq_cache_stats_get(NULL, &s_stats))
CALL(n_stats_out, cvq_cache_stats_get(F.cache, NULL))
CALL(n_clear, cvq_cache_clear(NULL))
CALL(n_copy_src, cvq_cache_copy(NULL, &s_cache))
CALL(n_copy_out, cvq_cache_copy(F.cache, NULL))
CALL(n_pack_codes, cvq_pack_codes12(NULL, 4, F.bits))
CALL(n_pack_out, cvq_pack_codes12(F.in_codes, 4, NULL))
CALL(n_unpack_in, cvq_unpack_codes12(NULL, 4, F.codes))
CALL(n_unpack_codes, cvq_unpack_codes12(F.in_bits, 4, NULL))

typedef struct null_row {
    const char *what;
    cvq_status (*call)(void);
    const char *msg; /* the message must contain this */
} null_row;

#define ROW(fn, msg) {#fn, fn, msg}

static const null_row k_null_rows[] = {
    ROW(n_geom_resolve, "geometry"),
    ROW(n_layout_g, "cvq_record_layout_of: g is NULL"),
    ROW(n_layout_out, "cvq_record_layout_of: out is NULL"),
    ROW(n_freqs_default, "theta_out"),
    ROW(n_freqs_linear, "theta_out"),
    ROW(n_freqs_llama3, "theta_out"),
    ROW(n_freqs_yarn, "theta_out"),
    ROW(n_from_name_name, "cvq_backend_from_name: name is NULL"),
    ROW(n_from_name_out, "cvq_backend_from_name: out is NULL"),
    ROW(n_list_count, "cvq_list_devices: count is NULL"),
    ROW(n_list_out, "out is NULL"),
    ROW(n_ctx_create_out, "cvq_context_create: out is NULL"),
    ROW(n_ctx_device_ctx, "cvq_context_device: ctx is NULL"),
    ROW(n_ctx_device_out, "cvq_context_device: out is NULL"),
    ROW(n_cb_create_g, "cvq_codebook_create: geometry is NULL"),
    ROW(n_cb_create_theta, "cvq_codebook_create: rope_theta is NULL"),
    ROW(n_cb_create_out, "cvq_codebook_create: out is NULL"),
    ROW(n_cb_random_g, "cvq_codebook_random: geometry is NULL"),
    ROW(n_cb_random_theta, "cvq_codebook_random: rope_theta is NULL"),
    ROW(n_cb_random_out, "cvq_codebook_random: out is NULL"),
    ROW(n_cb_load_path, "path"),
    ROW(n_cb_load_out, "out"),
    ROW(n_cb_loadmem_data, "data"),
    ROW(n_cb_loadmem_out, "out"),
    ROW(n_cb_save_cb, "cvq_codebook_save: cb is NULL"),
    ROW(n_cb_save_path, "cvq_codebook_save: path is NULL"),
    ROW(n_cb_geom_cb, "cvq_codebook_geometry: cb is NULL"),
    ROW(n_cb_geom_out, "cvq_codebook_geometry: out is NULL"),
    ROW(n_cb_theta_cb, "cvq_codebook_rope_theta: cb is NULL"),
    ROW(n_cb_theta_out, "cvq_codebook_rope_theta: theta_out is NULL"),
    ROW(n_cb_note_cb, "cb"),
    ROW(n_cb_tinfo_cb, "cvq_codebook_tensor_info: cb is NULL"),
    ROW(n_cb_tinfo_out, "cvq_codebook_tensor_info: out is NULL"),
    ROW(n_cb_tdata_cb, "cvq_codebook_tensor_data: cb is NULL"),
    ROW(n_cb_tdata_out, "cvq_codebook_tensor_data: data is NULL"),
    ROW(n_cb_tcdata_cb, "cvq_codebook_tensor_cdata: cb is NULL"),
    ROW(n_cb_tcdata_out, "cvq_codebook_tensor_cdata: data is NULL"),
    ROW(n_cb_commit, "cb"),
    ROW(n_enck_ctx, "context"),
    ROW(n_enck_cb, "codebook"),
    ROW(n_enck_keys, "keys"),
    ROW(n_enck_codes, "cvq_encode_keys: codes is NULL"),
    ROW(n_enck_scales, "cvq_encode_keys: scales is NULL"),
    ROW(n_encv_ctx, "context"),
    ROW(n_encv_cb, "codebook"),
    ROW(n_encv_vals, "values"),
    ROW(n_encv_bits, "cvq_encode_values: bits is NULL"),
    ROW(n_encv_sigma, "cvq_encode_values: sigma is NULL"),
    ROW(n_deck_ctx, "context"),
    ROW(n_deck_cb, "codebook"),
    ROW(n_deck_codes, "cvq_decode_keys: codes is NULL"),
    ROW(n_deck_scales, "cvq_decode_keys: scales is NULL"),
    ROW(n_deck_out, "cvq_decode_keys: keys is NULL"),
    ROW(n_decv_ctx, "context"),
    ROW(n_decv_cb, "codebook"),
    ROW(n_decv_bits, "cvq_decode_values: bits is NULL"),
    ROW(n_decv_sigma, "cvq_decode_values: sigma is NULL"),
    ROW(n_decv_out, "cvq_decode_values: values is NULL"),
    ROW(n_cache_create_ctx, "context"),
    ROW(n_cache_create_cb, "codebook"),
    ROW(n_cache_create_out, "cvq_cache_create: out is NULL"),
    ROW(n_append_cache, "cvq_cache_append: cache is NULL"),
    ROW(n_append_keys, "cvq_cache_append: keys is NULL"),
    ROW(n_append_vals, "cvq_cache_append: values is NULL"),
    ROW(n_append_pos, "cvq_cache_append: positions is NULL"),
    ROW(n_attend_cache, "cvq_cache_attend: cache is NULL"),
    ROW(n_attend_q, "cvq_cache_attend: queries is NULL"),
    ROW(n_attend_qpos, "cvq_cache_attend: q_pos is NULL"),
    ROW(n_attend_out, "cvq_cache_attend: out is NULL"),
    ROW(n_stats_cache, "cvq_cache_stats_get: cache is NULL"),
    ROW(n_stats_out, "cvq_cache_stats_get: out is NULL"),
    ROW(n_clear, "cvq_cache_clear: cache is NULL"),
    ROW(n_copy_src, "cvq_cache_copy: src is NULL"),
    ROW(n_copy_out, "cvq_cache_copy: out is NULL"),
    ROW(n_pack_codes, "cvq_pack_codes12: codes is NULL"),
    ROW(n_pack_out, "cvq_pack_codes12: out is NULL"),
    ROW(n_unpack_in, "cvq_unpack_codes12: in is NULL"),
    ROW(n_unpack_codes, "cvq_unpack_codes12: codes is NULL"),
};

static void test_null_pointers(void **state) {
    (void)state;
    s_params = cvq_context_default_params();
    s_params.backend = CVQ_BACKEND_CPU;
    for (size_t i = 0; i < sizeof k_null_rows / sizeof k_null_rows[0]; i++) {
        const null_row *r = &k_null_rows[i];
        /* out-handles start non-NULL so that "left NULL" is visible */
        s_ctx = (cvq_context *)&s_ctx;
        s_cb = (cvq_codebook *)&s_cb;
        s_cache = (cvq_cache *)&s_cache;
        cvq_status st = r->call();
        expect_fail(r->what, st, CVQ_ERR_NULL_POINTER, r->msg);
        /* a failed create/load/copy leaves *out NULL (header convention);
         * the handle it would have returned was never made, nothing leaks */
        if (s_cb != (cvq_codebook *)&s_cb && s_cb != NULL) fail_msg("%s: *out neither untouched nor NULL", r->what);
        if (s_cache != (cvq_cache *)&s_cache && s_cache != NULL)
            fail_msg("%s: *out neither untouched nor NULL", r->what);
    }
    s_cb = NULL;
    s_cache = NULL;
    s_ctx = NULL;
    /* The functions that return a value instead of a status accept NULL. */
    assert_int_equal(cvq_context_backend(NULL), CVQ_BACKEND_AUTO);
    assert_string_equal(cvq_context_last_error(NULL), "");
    assert_string_equal(cvq_codebook_note(NULL), "");
    print_message("NULL for each of %zu pointer parameters: CVQ_ERR_NULL_POINTER, named, nothing written\n",
                  sizeof k_null_rows / sizeof k_null_rows[0]);
}

/* ---- zero counts ------------------------------------------------------------------- */

/* n = 0 (commvq.h, "counts of zero"): CVQ_OK, nothing written, nothing
 * changed, with valid arrays or NULL ones (the calls a caller's loop makes
 * for an empty batch); an invalid handle, layer, dtype or flag still fails
 * with its own status. */
static void test_zero_counts(void **state) {
    (void)state;
    assert_int_equal(cvq_encode_keys(F.ctx, F.cb, 0, F.keys, CVQ_F32, 0, F.codes, F.scales), CVQ_OK);
    assert_int_equal(cvq_encode_values(F.ctx, F.cb, 0, F.vals, CVQ_F32, 0, F.bits, F.sigma), CVQ_OK);
    assert_int_equal(cvq_decode_keys(F.ctx, F.cb, 0, F.in_codes, F.in_scales, 0, F.dec), CVQ_OK);
    assert_int_equal(cvq_decode_values(F.ctx, F.cb, 0, F.in_bits, F.in_sigma, 0, F.dec), CVQ_OK);
    assert_int_equal(cvq_cache_append(F.cache, F.keys, F.vals, CVQ_F32, F.next_pos, 0), CVQ_OK);
    assert_int_equal(cvq_cache_attend(F.cache, F.q, F.qpos, 0, 0, F.out), CVQ_OK);
    assert_int_equal(cvq_pack_codes12(F.in_codes, 0, F.bits), CVQ_OK);
    assert_int_equal(cvq_unpack_codes12(F.in_bits, 0, F.codes), CVQ_OK);
    /* commvq.h, "counts of zero": with n = 0 the arrays may be NULL ... */
    assert_int_equal(cvq_encode_keys(F.ctx, F.cb, 0, NULL, CVQ_F16, 0, NULL, NULL), CVQ_OK);
    assert_int_equal(cvq_encode_values(F.ctx, F.cb, 0, NULL, CVQ_BF16, 0, NULL, NULL), CVQ_OK);
    assert_int_equal(cvq_decode_keys(F.ctx, F.cb, 0, NULL, NULL, 0, NULL), CVQ_OK);
    assert_int_equal(cvq_decode_values(F.ctx, F.cb, 0, NULL, NULL, 0, NULL), CVQ_OK);
    assert_int_equal(cvq_cache_append(F.cache, NULL, NULL, CVQ_F32, NULL, 0), CVQ_OK);
    assert_int_equal(cvq_cache_attend(F.cache, NULL, NULL, 0, CVQ_ATTEND_QUERIES_ROTATED, NULL), CVQ_OK);
    assert_int_equal(cvq_pack_codes12(NULL, 0, NULL), CVQ_OK);
    assert_int_equal(cvq_unpack_codes12(NULL, 0, NULL), CVQ_OK);
    assert_outputs_untouched("zero counts, NULL arrays");
    /* ... but handles, layer, dtype and flags are checked as for any count */
    expect_fail("encode_keys n=0 dtype 9", cvq_encode_keys(F.ctx, F.cb, 0, NULL, (cvq_dtype)9, 0, NULL, NULL),
                CVQ_ERR_INVALID_ARGUMENT, "dtype 9");
    expect_fail("encode_values n=0 dtype -1",
                cvq_encode_values(F.ctx, F.cb, 0, NULL, (cvq_dtype)-1, 0, NULL, NULL),
                CVQ_ERR_INVALID_ARGUMENT, "dtype -1");
    expect_fail("cache_append n=0 dtype 3", cvq_cache_append(F.cache, NULL, NULL, (cvq_dtype)3, NULL, 0),
                CVQ_ERR_INVALID_ARGUMENT, "dtype 3");
    expect_fail("cache_attend n_q=0 flags 2", cvq_cache_attend(F.cache, NULL, NULL, 0, 2u, NULL),
                CVQ_ERR_INVALID_ARGUMENT, "flags");
    expect_fail("encode_keys n=0 layer 7", cvq_encode_keys(F.ctx, F.cb, 7, NULL, CVQ_F32, 0, NULL, NULL),
                CVQ_ERR_LAYER_RANGE, "layer 7");
    expect_fail("decode_values n=0 layer 7", cvq_decode_values(F.ctx, F.cb, 7, NULL, NULL, 0, NULL),
                CVQ_ERR_LAYER_RANGE, "layer 7");
    expect_fail("decode_keys n=0 NULL codebook", cvq_decode_keys(F.ctx, NULL, 0, NULL, NULL, 0, NULL),
                CVQ_ERR_NULL_POINTER, NULL);
    expect_fail("cache_append n=0 NULL cache", cvq_cache_append(NULL, NULL, NULL, CVQ_F32, NULL, 0),
                CVQ_ERR_NULL_POINTER, "cache");
    expect_fail("cache_attend n_q=0 NULL cache", cvq_cache_attend(NULL, NULL, NULL, 0, 0, NULL),
                CVQ_ERR_NULL_POINTER, "cache");
    size_t count = 12345;
    assert_int_equal(cvq_list_devices(NULL, 0, &count), CVQ_OK);
    assert_true(count >= 1); /* the CPU */
    assert_outputs_untouched("zero counts");
    assert_objects_work("zero counts");
    /* an empty append does not consume positions: the next real one may use
     * any position after the last real one */
    int32_t p = F.pos[T - 1] + 1;
    cvq_cache *c2 = NULL;
    assert_int_equal(cvq_cache_copy(F.cache, &c2), CVQ_OK);
    assert_int_equal(cvq_cache_append(c2, F.keys, F.vals, CVQ_F32, &p, 1), CVQ_OK);
    cvq_cache_free(c2);
}

/* ---- dtype out of range -------------------------------------------------------------- */

static void test_dtype_out_of_range(void **state) {
    (void)state;
    const int bad[] = {3, 7, -1, 1000};
    char what[64];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        const cvq_dtype dt = (cvq_dtype)bad[i];
        char msg[48];
        snprintf(msg, sizeof msg, "dtype %d", bad[i]);
        snprintf(what, sizeof what, "encode_keys dtype %d", bad[i]);
        expect_fail(what, cvq_encode_keys(F.ctx, F.cb, 0, F.keys, dt, T, F.codes, F.scales),
                    CVQ_ERR_INVALID_ARGUMENT, msg);
        snprintf(what, sizeof what, "encode_values dtype %d", bad[i]);
        expect_fail(what, cvq_encode_values(F.ctx, F.cb, 0, F.vals, dt, T, F.bits, F.sigma),
                    CVQ_ERR_INVALID_ARGUMENT, msg);
        snprintf(what, sizeof what, "cache_append dtype %d", bad[i]);
        expect_fail(what, cvq_cache_append(F.cache, F.keys, F.vals, dt, F.next_pos, T),
                    CVQ_ERR_INVALID_ARGUMENT, msg);
    }
}

/* ---- layer out of range -------------------------------------------------------------- */

static void test_layer_out_of_range(void **state) {
    (void)state;
    const uint32_t bad[] = {2, 3, UINT32_MAX};
    char what[64], msg[64];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        const uint32_t l = bad[i];
        snprintf(msg, sizeof msg, "layer %u out of range", l);
        snprintf(what, sizeof what, "encode_keys layer %u", l);
        expect_fail(what, cvq_encode_keys(F.ctx, F.cb, l, F.keys, CVQ_F32, T, F.codes, F.scales),
                    CVQ_ERR_LAYER_RANGE, msg);
        assert_non_null(strstr(cvq_context_last_error(F.ctx), msg));
        snprintf(what, sizeof what, "encode_values layer %u", l);
        expect_fail(what, cvq_encode_values(F.ctx, F.cb, l, F.vals, CVQ_F32, T, F.bits, F.sigma),
                    CVQ_ERR_LAYER_RANGE, msg);
        snprintf(what, sizeof what, "decode_keys layer %u", l);
        expect_fail(what, cvq_decode_keys(F.ctx, F.cb, l, F.in_codes, F.in_scales, T, F.dec),
                    CVQ_ERR_LAYER_RANGE, msg);
        snprintf(what, sizeof what, "decode_values layer %u", l);
        expect_fail(what, cvq_decode_values(F.ctx, F.cb, l, F.in_bits, F.in_sigma, T, F.dec),
                    CVQ_ERR_LAYER_RANGE, msg);
        cvq_cache_params cp = cvq_cache_default_params();
        cp.layer = l;
        cvq_cache *c = (cvq_cache *)&c;
        snprintf(what, sizeof what, "cache_create layer %u", l);
        expect_fail(what, cvq_cache_create(F.ctx, F.cb, &cp, &c), CVQ_ERR_LAYER_RANGE, msg);
        assert_null(c);
        /* the codebook's own tensor views refuse it too */
        float *data = (float *)&data;
        snprintf(what, sizeof what, "tensor_data layer %u", l);
        snprintf(msg, sizeof msg, "layer %u, the codebook has 2", l);
        expect_fail(what, cvq_codebook_tensor_data(F.cb, CVQ_T_KEY_W, l, 0, &data), CVQ_ERR_LAYER_RANGE, msg);
    }
}

/* ---- positions ------------------------------------------------------------------------- */

static void test_positions(void **state) {
    (void)state;
    const int32_t last = F.pos[T - 1]; /* the cache's last position */
    struct {
        const char *what;
        int32_t p[T];
        const char *msg;
    } cases[] = {
        {"repeated within one append", {last + 1, last + 1, last + 2}, "strictly increase"},
        {"decreasing within one append", {last + 3, last + 2, last + 4}, "strictly increase"},
        {"negative first", {-1, last + 1, last + 2}, "negative"},
        {"negative later", {last + 1, last + 2, -5}, "negative"},
        {"INT32_MIN", {INT32_MIN, last + 1, last + 2}, "negative"},
        {"repeats the previous append's last", {last, last + 1, last + 2}, "does not follow"},
        {"below the previous append's last", {last - 1, last + 5, last + 6}, "does not follow"},
        {"before every earlier token", {0, 1, 2}, "does not follow"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        expect_fail(cases[i].what, cvq_cache_append(F.cache, F.keys, F.vals, CVQ_F32, cases[i].p, T),
                    CVQ_ERR_POSITION, cases[i].msg);
    /* the message names the offending token and the position it must follow */
    int32_t p[T] = {last + 1, last + 7, last + 7};
    expect_fail("message names token and predecessor",
                cvq_cache_append(F.cache, F.keys, F.vals, CVQ_F32, p, T), CVQ_ERR_POSITION, "token 2");
    char m[64];
    snprintf(m, sizeof m, "position %d of token 2 does not follow %d", last + 7, last + 7);
    cvq_cache_append(F.cache, F.keys, F.vals, CVQ_F32, p, T);
    assert_non_null(strstr(cvq_last_error(), m));
    reset_guards();
    /* negative query positions */
    int32_t qp[NQ] = {5, -2};
    expect_fail("negative query position", cvq_cache_attend(F.cache, F.q, qp, NQ, 0, F.out),
                CVQ_ERR_POSITION, "query position -2");

    /* across two appends on a copy: the second must start after the first */
    cvq_cache *c = NULL;
    assert_int_equal(cvq_cache_copy(F.cache, &c), CVQ_OK);
    int32_t a[1] = {INT32_MAX - 1}, b[1] = {INT32_MAX - 1}, d[1] = {INT32_MAX};
    assert_int_equal(cvq_cache_append(c, F.keys, F.vals, CVQ_F32, a, 1), CVQ_OK);
    cvq_cache_stats s0, s1;
    assert_int_equal(cvq_cache_stats_get(c, &s0), CVQ_OK);
    assert_int_equal(cvq_cache_append(c, F.keys, F.vals, CVQ_F32, b, 1), CVQ_ERR_POSITION);
    assert_non_null(strstr(cvq_last_error(), "does not follow"));
    assert_int_equal(cvq_cache_stats_get(c, &s1), CVQ_OK);
    assert_memory_equal(&s0, &s1, sizeof s0);
    assert_int_equal(cvq_cache_append(c, F.keys, F.vals, CVQ_F32, d, 1), CVQ_OK); /* the largest position */
    assert_int_equal(cvq_cache_append(c, F.keys, F.vals, CVQ_F32, d, 1), CVQ_ERR_POSITION); /* nothing after it */
    /* clear forgets the positions: 0 is valid again */
    assert_int_equal(cvq_cache_clear(c), CVQ_OK);
    int32_t z[1] = {0};
    assert_int_equal(cvq_cache_append(c, F.keys, F.vals, CVQ_F32, z, 1), CVQ_OK);
    cvq_cache_free(c);
    assert_objects_work("positions");
}

/* ---- counts whose byte sizes overflow size_t ---------------------------------------------- */

static void test_count_overflow(void **state) {
    (void)state;
    /* Smallest token count whose fp32 [n][Hkv][d] input overflows, and two
     * larger ones. The inputs are small arrays: a call that read them before
     * checking the count would read far out of bounds (ASan/valgrind see it). */
    const size_t n_in = SIZE_MAX / (F.kvd * sizeof(float)) + 1;
    const size_t counts[] = {n_in, SIZE_MAX / 2 + 1, SIZE_MAX};
    char what[96];
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++) {
        const size_t n = counts[i];
        snprintf(what, sizeof what, "encode_keys n=%zu", n);
        expect_fail(what, cvq_encode_keys(F.ctx, F.cb, 0, F.keys, CVQ_F32, n, F.codes, F.scales),
                    CVQ_ERR_SIZE_OVERFLOW, "overflow size_t");
        snprintf(what, sizeof what, "encode_keys f16 n=%zu", n);
        expect_fail(what, cvq_encode_keys(F.ctx, F.cb, 0, F.keys, CVQ_F16, n, F.codes, F.scales),
                    CVQ_ERR_SIZE_OVERFLOW, "overflow size_t");
        snprintf(what, sizeof what, "encode_values n=%zu", n);
        expect_fail(what, cvq_encode_values(F.ctx, F.cb, 0, F.vals, CVQ_BF16, n, F.bits, F.sigma),
                    CVQ_ERR_SIZE_OVERFLOW, "overflow size_t");
        snprintf(what, sizeof what, "decode_keys n=%zu", n);
        expect_fail(what, cvq_decode_keys(F.ctx, F.cb, 0, F.in_codes, F.in_scales, n, F.dec),
                    CVQ_ERR_SIZE_OVERFLOW, "overflow size_t");
        snprintf(what, sizeof what, "decode_values n=%zu", n);
        expect_fail(what, cvq_decode_values(F.ctx, F.cb, 0, F.in_bits, F.in_sigma, n, F.dec),
                    CVQ_ERR_SIZE_OVERFLOW, "overflow size_t");
    }
    /* 12-bit packing: n codes are 2n bytes in, ceil(3n/2) out */
    const size_t pcounts[] = {SIZE_MAX / 2 + 1, SIZE_MAX};
    for (size_t i = 0; i < sizeof pcounts / sizeof pcounts[0]; i++) {
        snprintf(what, sizeof what, "pack_codes12 n=%zu", pcounts[i]);
        expect_fail(what, cvq_pack_codes12(F.in_codes, pcounts[i], F.bits), CVQ_ERR_SIZE_OVERFLOW,
                    "overflow size_t");
        snprintf(what, sizeof what, "unpack_codes12 n=%zu", pcounts[i]);
        expect_fail(what, cvq_unpack_codes12(F.in_bits, pcounts[i], F.codes), CVQ_ERR_SIZE_OVERFLOW,
                    "overflow size_t");
    }
    /* queries [n_q][Hq][d] */
    const size_t q_in = SIZE_MAX / (F.per_q * sizeof(float)) + 1;
    const size_t qcounts[] = {q_in, SIZE_MAX / 2 + 1, SIZE_MAX};
    for (size_t i = 0; i < sizeof qcounts / sizeof qcounts[0]; i++) {
        snprintf(what, sizeof what, "cache_attend n_q=%zu", qcounts[i]);
        expect_fail(what, cvq_cache_attend(F.cache, F.q, F.qpos, qcounts[i], 0, F.out), CVQ_ERR_SIZE_OVERFLOW,
                    "overflow size_t");
    }
}

/* cvq_cache_append used to read positions[0..n) before it checked that n
 * tokens' bytes fit size_t, so an overflowing count was reported as whatever
 * the positions beyond the caller's array happened to be, or crashed on an
 * unmapped page. The positions here repeat at index 1: a scan that comes
 * first answers CVQ_ERR_POSITION, the size check CVQ_ERR_SIZE_OVERFLOW. */
static void test_append_count_overflow(void **state) {
    (void)state;
    const size_t n_in = SIZE_MAX / (F.kvd * sizeof(float)) + 1;
    const size_t counts[] = {n_in, SIZE_MAX / 2 + 1, SIZE_MAX};
    int32_t p[2] = {F.pos[T - 1] + 1, F.pos[T - 1] + 1};
    char what[96];
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++) {
        cvq_status st = cvq_cache_append(F.cache, F.keys, F.vals, CVQ_F32, p, counts[i]);
        snprintf(what, sizeof what, "cache_append n=%zu", counts[i]);
        expect_fail(what, st, CVQ_ERR_SIZE_OVERFLOW, "overflow");
    }
}

/* ---- limits of the other parameters --------------------------------------------------------- */

static void test_parameter_limits(void **state) {
    (void)state;
    cvq_cache_params cp = cvq_cache_default_params();
    cvq_cache *c = (cvq_cache *)&c;
    cp.window = (1u << 20) + 1;
    expect_fail("window > 2^20", cvq_cache_create(F.ctx, F.cb, &cp, &c), CVQ_ERR_INVALID_ARGUMENT, "window");
    assert_null(c);
    cp.window = 4;
    cp.sinks = UINT32_MAX;
    c = (cvq_cache *)&c;
    expect_fail("sinks = UINT32_MAX", cvq_cache_create(F.ctx, F.cb, &cp, &c), CVQ_ERR_INVALID_ARGUMENT, "sinks");
    assert_null(c);
    expect_fail("unknown attend flag", cvq_cache_attend(F.cache, F.q, F.qpos, NQ, 0x100, F.out),
                CVQ_ERR_INVALID_ARGUMENT, "flags 0x100");
    cvq_context_params p = cvq_context_default_params();
    cvq_context *x = (cvq_context *)&x;
    p.backend = (cvq_backend_kind)9;
    expect_fail("backend 9", cvq_context_create(&p, &x), CVQ_ERR_INVALID_ARGUMENT, "backend 9");
    assert_null(x);
    p = cvq_context_default_params();
    p.backend = CVQ_BACKEND_CPU;
    p.n_threads = -1;
    x = (cvq_context *)&x;
    expect_fail("n_threads -1", cvq_context_create(&p, &x), CVQ_ERR_INVALID_ARGUMENT, "n_threads");
    assert_null(x);
    cvq_tensor_info ti;
    expect_fail("tensor id 10", cvq_codebook_tensor_info(F.cb, CVQ_T_COUNT, &ti), CVQ_ERR_INVALID_ARGUMENT,
                "tensor id 10");
    /* codes >= 4096 and bad decoder scales */
    uint16_t codes[6 * T];
    memcpy(codes, F.in_codes, sizeof codes);
    codes[4] = 4096;
    expect_fail("decode code 4096", cvq_decode_keys(F.ctx, F.cb, 0, codes, F.in_scales, T, F.dec),
                CVQ_ERR_INVALID_ARGUMENT, "key code 4096 at index 4");
    float sc[T];
    memcpy(sc, F.in_scales, sizeof sc);
    sc[1] = -1.0f;
    expect_fail("negative key scale", cvq_decode_keys(F.ctx, F.cb, 0, F.in_codes, sc, T, F.dec),
                CVQ_ERR_NONFINITE_INPUT, "key scale 1");
    float sg[2 * T];
    memcpy(sg, F.in_sigma, sizeof sg);
    sg[3] = INFINITY;
    expect_fail("infinite sigma", cvq_decode_values(F.ctx, F.cb, 0, F.in_bits, sg, T, F.dec),
                CVQ_ERR_NONFINITE_INPUT, "value scale 3");
}

/* ---- a codebook file changed on disk after loading ------------------------------------------ */

static void tmp_file(char *buf, size_t n, const char *tag) {
    const char *d = getenv("COMMVQ_TEST_TMP");
    snprintf(buf, n, "%s/cvq_misuse_%ld_%s.cvq", d && d[0] ? d : "/tmp", (long)getpid(), tag);
}

static void write_bytes(const char *path, const void *b, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    if (n) assert_int_equal(fwrite(b, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static long file_size(const char *path) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    fclose(f);
    return n;
}

/* Encodes with `cb` (keys and values of two layers) and attends through a
 * fresh cache; everything into one byte string for comparison. */
static size_t fingerprint(const cvq_codebook *cb, uint8_t *buf) {
    size_t at = 0;
    for (uint32_t l = 0; l < 2; l++) {
        assert_int_equal(cvq_encode_keys(F.ctx, cb, l, F.keys, CVQ_F32, T, (uint16_t *)(void *)(buf + at),
                                         (float *)(void *)(buf + at + F.n_codes * 2)),
                         CVQ_OK);
        at += F.n_codes * 2 + F.n_scales * 4;
        assert_int_equal(cvq_encode_values(F.ctx, cb, l, F.vals, CVQ_F32, T, buf + at,
                                           (float *)(void *)(buf + at + F.n_bytes)),
                         CVQ_OK);
        at += F.n_bytes + F.n_sig * 4;
    }
    cvq_cache *c = NULL;
    cvq_cache_params cp = cvq_cache_default_params();
    cp.window = 1;
    assert_int_equal(cvq_cache_create(F.ctx, cb, &cp, &c), CVQ_OK);
    assert_int_equal(cvq_cache_append(c, F.keys, F.vals, CVQ_F32, F.pos, T), CVQ_OK);
    assert_int_equal(cvq_cache_attend(c, F.q, F.qpos, NQ, 0, (float *)(void *)(buf + at)), CVQ_OK);
    at += NQ * F.per_q * 4;
    cvq_cache_free(c);
    return at;
}

static void test_codebook_file_changed(void **state) {
    (void)state;
    char path[512];
    tmp_file(path, sizeof path, "changed");
    assert_int_equal(cvq_codebook_save(F.cb, path, 0), CVQ_OK);
    const long size = file_size(path);
    assert_true(size > 64);
    cvq_codebook *cb = NULL;
    assert_int_equal(cvq_codebook_load(path, NULL, &cb), CVQ_OK);
    /* 8-byte aligned scratch for the fingerprints */
    const size_t cap = 4096 + 2 * (F.n_codes * 2 + F.n_scales * 4 + F.n_bytes + F.n_sig * 4) + NQ * F.per_q * 4;
    double *b0 = malloc(cap), *b1 = malloc(cap);
    assert_true(b0 && b1);
    const size_t n = fingerprint(cb, (uint8_t *)b0);
    assert_true(n <= cap);

    /* overwritten in place with garbage of the same size */
    uint8_t *junk = malloc((size_t)size);
    assert_non_null(junk);
    for (long i = 0; i < size; i++) junk[i] = (uint8_t)(i * 131u + 7u);
    write_bytes(path, junk, (size_t)size);
    assert_int_equal(fingerprint(cb, (uint8_t *)b1), n);
    assert_memory_equal(b0, b1, n);
    /* and a reload of what is now there is refused as not a codebook */
    cvq_codebook *other = (cvq_codebook *)&other;
    assert_int_equal(cvq_codebook_load(path, NULL, &other), CVQ_ERR_FORMAT);
    assert_null(other);
    assert_non_null(strstr(cvq_last_error(), "bad magic"));

    /* truncated to nothing: the state of a file being replaced (O_TRUNC,
     * before the new bytes arrive). The loaded codebook does not notice; a
     * load now gets its own status, naming the size. */
    write_bytes(path, junk, 0);
    memset(b1, 0, cap);
    assert_int_equal(fingerprint(cb, (uint8_t *)b1), n);
    assert_memory_equal(b0, b1, n);
    other = (cvq_codebook *)&other;
    assert_int_equal(cvq_codebook_load(path, NULL, &other), CVQ_ERR_FORMAT_TRUNCATED);
    assert_null(other);
    assert_non_null(strstr(cvq_last_error(), "file of 0 bytes"));

    /* half rewritten: the new file's first half only */
    uint8_t *orig = NULL;
    {
        /* the original bytes, from a fresh save elsewhere */
        char p2[512];
        tmp_file(p2, sizeof p2, "orig");
        assert_int_equal(cvq_codebook_save(F.cb, p2, 0), CVQ_OK);
        FILE *f = fopen(p2, "rb");
        assert_non_null(f);
        orig = malloc((size_t)size);
        assert_non_null(orig);
        assert_int_equal(fread(orig, 1, (size_t)size, f), (size_t)size);
        fclose(f);
        remove(p2);
    }
    write_bytes(path, orig, (size_t)size / 2);
    other = (cvq_codebook *)&other;
    assert_int_equal(cvq_codebook_load(path, NULL, &other), CVQ_ERR_FORMAT_TRUNCATED);
    assert_null(other);
    assert_non_null(strstr(cvq_last_error(), "truncated"));

    /* deleted */
    assert_int_equal(remove(path), 0);
    memset(b1, 0, cap);
    assert_int_equal(fingerprint(cb, (uint8_t *)b1), n);
    assert_memory_equal(b0, b1, n);
    other = (cvq_codebook *)&other;
    assert_int_equal(cvq_codebook_load(path, NULL, &other), CVQ_ERR_IO);
    assert_null(other);
    assert_non_null(strstr(cvq_last_error(), "cannot open"));
    assert_non_null(strstr(cvq_last_error(), path));

    /* the loaded codebook equals the one it was saved from, bit for bit */
    uint8_t *b2 = malloc(cap);
    assert_non_null(b2);
    assert_int_equal(fingerprint(F.cb, b2), n);
    assert_memory_equal(b0, b2, n);
    free(b2);
    free(orig);
    free(junk);
    free(b0);
    free(b1);
    cvq_codebook_free(cb);
    reset_guards();
    assert_objects_work("file changed");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_null_pointers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_zero_counts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dtype_out_of_range, setup, teardown),
        cmocka_unit_test_setup_teardown(test_layer_out_of_range, setup, teardown),
        cmocka_unit_test_setup_teardown(test_positions, setup, teardown),
        cmocka_unit_test_setup_teardown(test_count_overflow, setup, teardown),
        cmocka_unit_test_setup_teardown(test_append_count_overflow, setup, teardown),
        cmocka_unit_test_setup_teardown(test_parameter_limits, setup, teardown),
        cmocka_unit_test_setup_teardown(test_codebook_file_changed, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
