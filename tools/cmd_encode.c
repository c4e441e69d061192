/*
 * commvq encode and commvq attend: one layer of a codebook applied to keys,
 * values (and queries) read from .npy files.
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

/* malloc of n elements of es bytes, overflow-checked; n == 0 gives a
 * 1-byte block so that callers need no special case. */
static void *alloc_array(uint64_t n, size_t es) {
    if (n > (uint64_t)(SIZE_MAX / es)) return NULL;
    return malloc(n > 0 ? (size_t)n * es : 1);
}

/* ---- encode ----------------------------------------------------------------- */

enum { EN_CODEBOOK, EN_LAYER, EN_KEYS, EN_VALUES, EN_OUT_DIR, EN_BACKEND, EN_BF16, EN_COUNT };

int cmd_encode(const cli_cmd *cmd, int argc, char **argv) {
    cli_opt o[EN_COUNT] = {
        {"--codebook", 1, NULL}, {"--layer", 1, NULL},   {"--keys", 1, NULL},
        {"--values", 1, NULL},   {"--out-dir", 1, NULL}, {"--backend", 1, NULL},
        {"--bf16", 0, NULL},
    };
    const char *pos[1];
    size_t n_pos;
    cvq_codebook *cb = NULL;
    cvq_context *ctx = NULL;
    cvq_geometry g;
    cvq_record_layout rl;
    tool_tensor keys, values;
    uint64_t tk = 0, tv = 0, T, i, shape[3];
    uint16_t *codes = NULL;
    float *kscale = NULL, *sigma = NULL;
    uint8_t *bits = NULL, *bit01 = NULL;
    uint32_t layer = 0, R, Hkv, groups, nc, ksc;
    cvq_status st;
    char path[4096];
    int rc;

    memset(&keys, 0, sizeof keys);
    memset(&values, 0, sizeof values);
    rc = cli_parse(cmd, argc, argv, o, EN_COUNT, pos, 0, &n_pos);
    if (rc != CLI_OK) return rc;
    if ((rc = cli_require(cmd, &o[EN_CODEBOOK])) || (rc = cli_require(cmd, &o[EN_KEYS])) ||
        (rc = cli_require(cmd, &o[EN_VALUES])) || (rc = cli_require(cmd, &o[EN_OUT_DIR])))
        return rc;
    if ((rc = tool_load_codebook(o[EN_CODEBOOK].value, &cb, &g)) != CLI_OK) return rc;
    if ((rc = tool_pick_layer(cmd, o[EN_LAYER].value, &g, &layer)) != CLI_OK) goto done;
    st = cvq_record_layout_of(&g, &rl);
    if (st != CVQ_OK) {
        rc = cli_lib_fail(st);
        goto done;
    }
    R = g.key_stages;
    Hkv = g.n_kv_heads;
    groups = rl.value_groups;
    nc = g.value_bits;
    ksc = rl.key_scale_count;
    if ((rc = tool_read_tensor(o[EN_KEYS].value, "keys", Hkv, g.head_dim,
                               o[EN_BF16].value != NULL, 0, &keys, &tk)) != CLI_OK)
        goto done;
    if ((rc = tool_read_tensor(o[EN_VALUES].value, "values", Hkv, g.head_dim,
                               o[EN_BF16].value != NULL, 0, &values, &tv)) != CLI_OK)
        goto done;
    if (tk != tv) {
        rc = cli_fail("keys have %llu tokens but values have %llu", (unsigned long long)tk,
                      (unsigned long long)tv);
        goto done;
    }
    T = tk;
    if ((rc = tool_context(cmd, o[EN_BACKEND].value, &ctx)) != CLI_OK) goto done;

    codes = (uint16_t *)alloc_array(T * Hkv, (size_t)R * sizeof *codes);
    kscale = (float *)alloc_array(T, (size_t)ksc * sizeof *kscale);
    bits = (uint8_t *)alloc_array(T, rl.value_bit_bytes);
    bit01 = (uint8_t *)alloc_array(T * groups, nc);
    sigma = (float *)alloc_array(T, (size_t)groups * sizeof *sigma);
    if (!codes || !kscale || !bits || !bit01 || !sigma) {
        rc = cli_fail("out of memory for %llu tokens", (unsigned long long)T);
        goto done;
    }
    if (T > 0) {
        st = cvq_encode_keys(ctx, cb, layer, keys.data, keys.dtype, (size_t)T, codes, kscale);
        if (st == CVQ_OK)
            st = cvq_encode_values(ctx, cb, layer, values.data, values.dtype, (size_t)T, bits,
                                   sigma);
        if (st != CVQ_OK) {
            rc = cli_lib_fail(st);
            goto done;
        }
    }
    /* The library packs bit i of a group into byte i/8, bit position i%8;
     * the .npy holds one 0/1 byte per bit: bit01[t][group][i]. */
    for (i = 0; i < T * groups; i++) {
        const uint8_t *src = bits + i * (nc / 8);
        uint8_t *dst = bit01 + i * nc;
        uint32_t b;
        for (b = 0; b < nc; b++) dst[b] = (uint8_t)((src[b / 8] >> (b % 8)) & 1u);
    }

    if ((rc = tool_make_dir(o[EN_OUT_DIR].value)) != CLI_OK) goto done;
    shape[0] = T;
    shape[1] = Hkv;
    shape[2] = R;
    if ((rc = tool_join(path, sizeof path, o[EN_OUT_DIR].value, "key_codes.npy")) ||
        (rc = tool_save(path, NPY_U2, 3, shape, codes)))
        goto done;
    shape[1] = ksc;
    if ((rc = tool_join(path, sizeof path, o[EN_OUT_DIR].value, "key_scale.npy")) ||
        (rc = tool_save(path, NPY_F4, g.key_scale == CVQ_KEY_SCALE_HEAD ? 2u : 1u, shape,
                        kscale)))
        goto done;
    shape[1] = groups;
    shape[2] = nc;
    if ((rc = tool_join(path, sizeof path, o[EN_OUT_DIR].value, "value_bits.npy")) ||
        (rc = tool_save(path, NPY_U1, 3, shape, bit01)))
        goto done;
    if ((rc = tool_join(path, sizeof path, o[EN_OUT_DIR].value, "value_scale.npy")) ||
        (rc = tool_save(path, NPY_F4, 2, shape, sigma)))
        goto done;
    printf("encoded %llu tokens (layer %u, %s backend) into %s: %u bytes per token "
           "compressed, %.4f bits per element\n",
           (unsigned long long)T, (unsigned)layer, cvq_backend_name(cvq_context_backend(ctx)),
           o[EN_OUT_DIR].value, (unsigned)rl.bytes_per_token, rl.bits_per_element);
    rc = CLI_OK;
done:
    free(codes);
    free(kscale);
    free(bits);
    free(bit01);
    free(sigma);
    tool_tensor_free(&keys);
    tool_tensor_free(&values);
    cvq_context_free(ctx);
    cvq_codebook_free(cb);
    return rc;
}

/* ---- attend ----------------------------------------------------------------- */

enum {
    AT_CODEBOOK, AT_LAYER, AT_KEYS, AT_VALUES, AT_QUERIES, AT_Q_POS, AT_WINDOW, AT_SINKS,
    AT_BACKEND, AT_OUT, AT_ROTATED, AT_BF16, AT_COUNT
};

int cmd_attend(const cli_cmd *cmd, int argc, char **argv) {
    cli_opt o[AT_COUNT] = {
        {"--codebook", 1, NULL}, {"--layer", 1, NULL},   {"--keys", 1, NULL},
        {"--values", 1, NULL},   {"--queries", 1, NULL}, {"--q-pos", 1, NULL},
        {"--window", 1, NULL},   {"--sinks", 1, NULL},   {"--backend", 1, NULL},
        {"--out", 1, NULL},      {"--queries-rotated", 0, NULL},
        {"--bf16", 0, NULL},
    };
    const char *pos[1];
    size_t n_pos;
    cvq_codebook *cb = NULL;
    cvq_context *ctx = NULL;
    cvq_cache *cache = NULL;
    cvq_cache_params cp = cvq_cache_default_params();
    cvq_cache_stats cs;
    cvq_geometry g;
    tool_tensor keys, values, queries;
    uint64_t tk = 0, tv = 0, n_q = 0, T, i, shape[3];
    uint32_t q_pos = 0, window = 128, sinks = 0;
    int32_t *kpos = NULL, *qpos = NULL;
    float *out = NULL;
    cvq_status st;
    int rc, bf16;

    memset(&keys, 0, sizeof keys);
    memset(&values, 0, sizeof values);
    memset(&queries, 0, sizeof queries);
    rc = cli_parse(cmd, argc, argv, o, AT_COUNT, pos, 0, &n_pos);
    if (rc != CLI_OK) return rc;
    if ((rc = cli_require(cmd, &o[AT_CODEBOOK])) || (rc = cli_require(cmd, &o[AT_KEYS])) ||
        (rc = cli_require(cmd, &o[AT_VALUES])) || (rc = cli_require(cmd, &o[AT_QUERIES])) ||
        (rc = cli_require(cmd, &o[AT_Q_POS])) || (rc = cli_require(cmd, &o[AT_OUT])))
        return rc;
    if ((rc = cli_u32(cmd, "--q-pos", o[AT_Q_POS].value, 0, INT32_MAX, &q_pos)) ||
        (rc = cli_u32(cmd, "--window", o[AT_WINDOW].value, 0, INT32_MAX, &window)) ||
        (rc = cli_u32(cmd, "--sinks", o[AT_SINKS].value, 0, INT32_MAX, &sinks)))
        return rc;
    bf16 = o[AT_BF16].value != NULL;
    if ((rc = tool_load_codebook(o[AT_CODEBOOK].value, &cb, &g)) != CLI_OK) return rc;
    if ((rc = tool_pick_layer(cmd, o[AT_LAYER].value, &g, &cp.layer)) != CLI_OK) goto done;
    cp.window = window;
    cp.sinks = sinks;

    /* Keys and values go to the library in their own dtype when both share
     * it; otherwise both are converted to float32 here (exactly). */
    if ((rc = tool_read_tensor(o[AT_KEYS].value, "keys", g.n_kv_heads, g.head_dim, bf16, 0,
                               &keys, &tk)) ||
        (rc = tool_read_tensor(o[AT_VALUES].value, "values", g.n_kv_heads, g.head_dim, bf16,
                               0, &values, &tv)))
        goto done;
    if (keys.dtype != values.dtype) {
        tool_tensor_free(&keys);
        tool_tensor_free(&values);
        if ((rc = tool_read_tensor(o[AT_KEYS].value, "keys", g.n_kv_heads, g.head_dim, bf16,
                                   1, &keys, &tk)) ||
            (rc = tool_read_tensor(o[AT_VALUES].value, "values", g.n_kv_heads, g.head_dim,
                                   bf16, 1, &values, &tv)))
            goto done;
    }
    if (tk != tv) {
        rc = cli_fail("keys have %llu tokens but values have %llu", (unsigned long long)tk,
                      (unsigned long long)tv);
        goto done;
    }
    T = tk;
    if (T > (uint64_t)INT32_MAX + 1) {
        rc = cli_fail("%llu tokens: positions would not fit int32", (unsigned long long)T);
        goto done;
    }
    if ((rc = tool_read_tensor(o[AT_QUERIES].value, "queries", g.n_q_heads, g.head_dim, bf16,
                               1, &queries, &n_q)))
        goto done;
    if (n_q > 0 && (uint64_t)q_pos + n_q - 1 > (uint64_t)INT32_MAX) {
        rc = cli_usage_error(cmd, "--q-pos %u with %llu queries: positions would not fit "
                                  "int32",
                             (unsigned)q_pos, (unsigned long long)n_q);
        goto done;
    }

    kpos = (int32_t *)alloc_array(T, sizeof *kpos);
    qpos = (int32_t *)alloc_array(n_q, sizeof *qpos);
    out = (float *)alloc_array(n_q * g.n_q_heads, (size_t)g.head_dim * sizeof *out);
    if (!kpos || !qpos || !out) {
        rc = cli_fail("out of memory");
        goto done;
    }
    for (i = 0; i < T; i++) kpos[i] = (int32_t)i;
    for (i = 0; i < n_q; i++) qpos[i] = (int32_t)(q_pos + i);

    if ((rc = tool_context(cmd, o[AT_BACKEND].value, &ctx)) != CLI_OK) goto done;
    st = cvq_cache_create(ctx, cb, &cp, &cache);
    if (st == CVQ_OK && T > 0)
        st = cvq_cache_append(cache, keys.data, values.data, keys.dtype, kpos, (size_t)T);
    if (st == CVQ_OK && n_q > 0)
        st = cvq_cache_attend(cache, (const float *)queries.data, qpos, (size_t)n_q,
                              o[AT_ROTATED].value ? CVQ_ATTEND_QUERIES_ROTATED : 0u, out);
    if (st == CVQ_OK) st = cvq_cache_stats_get(cache, &cs);
    if (st != CVQ_OK) {
        rc = cli_lib_fail(st);
        goto done;
    }
    shape[0] = n_q;
    shape[1] = g.n_q_heads;
    shape[2] = g.head_dim;
    if ((rc = tool_save(o[AT_OUT].value, NPY_F4, 3, shape, out)) != CLI_OK) goto done;
    printf("attended %llu queries at positions %u.. over %llu tokens (%llu sinks, %llu "
           "compressed, %llu in the window; layer %u, %s backend) -> %s\n",
           (unsigned long long)n_q, (unsigned)q_pos, (unsigned long long)cs.n_tokens,
           (unsigned long long)cs.n_sink, (unsigned long long)cs.n_compressed,
           (unsigned long long)cs.n_window, (unsigned)cp.layer,
           cvq_backend_name(cvq_context_backend(ctx)), o[AT_OUT].value);
    rc = CLI_OK;
done:
    free(kpos);
    free(qpos);
    free(out);
    tool_tensor_free(&keys);
    tool_tensor_free(&values);
    tool_tensor_free(&queries);
    cvq_cache_free(cache);
    cvq_context_free(ctx);
    cvq_codebook_free(cb);
    return rc;
}
