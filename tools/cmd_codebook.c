/*
 * commvq random-codebook and commvq export-codebook.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

/* ---- random-codebook ------------------------------------------------------ */

enum {
    RC_OUT, RC_SEED, RC_LAYERS, RC_HQ, RC_HKV, RC_HEAD_DIM, RC_STAGES, RC_VALUE_BITS,
    RC_VALUE_GROUP, RC_VALUE_HIDDEN, RC_PAIR_LAYOUT, RC_KEY_SCALE, RC_ROPE_BASE,
    RC_LOGIT_SCALE, RC_FP16, RC_COUNT
};

static void print_geometry_summary(const cvq_geometry *g) {
    cvq_record_layout rl;
    printf("  layers %u, Hq %u, Hkv %u, head dim %u, key stages %u (%s scale), "
           "%s pairs\n",
           (unsigned)g->n_layers, (unsigned)g->n_q_heads, (unsigned)g->n_kv_heads,
           (unsigned)g->head_dim, (unsigned)g->key_stages,
           g->key_scale == CVQ_KEY_SCALE_HEAD ? "head" : "token",
           g->pair_layout == CVQ_PAIRS_INTERLEAVED ? "interleaved" : "rotate_half");
    printf("  value groups of %u dims, %u code bits each, hidden width %u; "
           "logit scale %.9g\n",
           (unsigned)g->value_group_width, (unsigned)g->value_bits,
           (unsigned)g->value_hidden, (double)g->logit_scale);
    if (cvq_record_layout_of(g, &rl) == CVQ_OK)
        printf("  compressed record: %u bytes per token per layer (FP16 K/V: %u), "
               "%.4f bits per element\n",
               (unsigned)rl.bytes_per_token, (unsigned)(2u * g->n_kv_heads * g->head_dim * 2u),
               rl.bits_per_element);
}

int cmd_random_codebook(const cli_cmd *cmd, int argc, char **argv) {
    cli_opt o[RC_COUNT] = {
        {"--out", 1, NULL},          {"--seed", 1, NULL},
        {"--layers", 1, NULL},       {"--hq", 1, NULL},
        {"--hkv", 1, NULL},          {"--head-dim", 1, NULL},
        {"--stages", 1, NULL},       {"--value-bits", 1, NULL},
        {"--value-group", 1, NULL},  {"--value-hidden", 1, NULL},
        {"--pair-layout", 1, NULL},  {"--key-scale", 1, NULL},
        {"--rope-base", 1, NULL},    {"--logit-scale", 1, NULL},
        {"--fp16", 0, NULL},
    };
    static const int required[] = {RC_OUT, RC_SEED, RC_LAYERS, RC_HQ, RC_HKV,
                                   RC_HEAD_DIM, RC_STAGES, RC_VALUE_BITS};
    const char *pos[1];
    size_t n_pos, i;
    cvq_geometry g;
    uint64_t seed = 0;
    double base = 10000.0, lscale = 0.0;
    double *theta = NULL;
    cvq_codebook *cb = NULL;
    cvq_status st;
    char note[512];
    int rc = cli_parse(cmd, argc, argv, o, RC_COUNT, pos, 0, &n_pos);
    if (rc != CLI_OK) return rc;
    for (i = 0; i < sizeof required / sizeof required[0]; i++)
        if ((rc = cli_require(cmd, &o[required[i]])) != CLI_OK) return rc;

    memset(&g, 0, sizeof g);
    if ((rc = cli_u64(cmd, "--seed", o[RC_SEED].value, &seed)) ||
        (rc = cli_u32(cmd, "--layers", o[RC_LAYERS].value, 1, 1u << 20, &g.n_layers)) ||
        (rc = cli_u32(cmd, "--hq", o[RC_HQ].value, 1, 1u << 16, &g.n_q_heads)) ||
        (rc = cli_u32(cmd, "--hkv", o[RC_HKV].value, 1, 1u << 16, &g.n_kv_heads)) ||
        (rc = cli_u32(cmd, "--head-dim", o[RC_HEAD_DIM].value, 2, 1u << 16, &g.head_dim)) ||
        (rc = cli_u32(cmd, "--stages", o[RC_STAGES].value, 1, 1u << 16, &g.key_stages)) ||
        (rc = cli_u32(cmd, "--value-bits", o[RC_VALUE_BITS].value, 1, 1u << 24,
                      &g.value_bits)) ||
        (rc = cli_u32(cmd, "--value-group", o[RC_VALUE_GROUP].value, 1, 1u << 24,
                      &g.value_group_width)) ||
        (rc = cli_u32(cmd, "--value-hidden", o[RC_VALUE_HIDDEN].value, 1, 1u << 24,
                      &g.value_hidden)) ||
        (rc = cli_double(cmd, "--rope-base", o[RC_ROPE_BASE].value, &base)) ||
        (rc = cli_double(cmd, "--logit-scale", o[RC_LOGIT_SCALE].value, &lscale)))
        return rc;
    g.pair_layout = CVQ_PAIRS_ROTATE_HALF;
    if (o[RC_PAIR_LAYOUT].value != NULL) {
        if (strcmp(o[RC_PAIR_LAYOUT].value, "rotate_half") == 0)
            g.pair_layout = CVQ_PAIRS_ROTATE_HALF;
        else if (strcmp(o[RC_PAIR_LAYOUT].value, "interleaved") == 0)
            g.pair_layout = CVQ_PAIRS_INTERLEAVED;
        else
            return cli_usage_error(cmd, "--pair-layout: '%s' is not rotate_half or interleaved",
                                   o[RC_PAIR_LAYOUT].value);
    }
    g.key_scale = CVQ_KEY_SCALE_TOKEN;
    if (o[RC_KEY_SCALE].value != NULL) {
        if (strcmp(o[RC_KEY_SCALE].value, "token") == 0)
            g.key_scale = CVQ_KEY_SCALE_TOKEN;
        else if (strcmp(o[RC_KEY_SCALE].value, "head") == 0)
            g.key_scale = CVQ_KEY_SCALE_HEAD;
        else
            return cli_usage_error(cmd, "--key-scale: '%s' is not token or head",
                                   o[RC_KEY_SCALE].value);
    }
    if (o[RC_LOGIT_SCALE].value != NULL && !(lscale > 0.0 && lscale <= 3.4e38))
        return cli_usage_error(cmd, "--logit-scale must be positive");
    if (o[RC_ROPE_BASE].value != NULL && !(base > 1.0))
        return cli_usage_error(cmd, "--rope-base must be greater than 1");
    g.logit_scale = (float)lscale;

    /* the library validates the geometry and words the message */
    st = cvq_geometry_resolve(&g);
    if (st != CVQ_OK) return cli_lib_fail(st);

    theta = (double *)malloc((size_t)(g.head_dim / 2) * sizeof *theta);
    if (theta == NULL) return cli_fail("out of memory");
    st = cvq_rope_freqs_default(g.head_dim, base, theta);
    if (st == CVQ_OK) st = cvq_codebook_random(&g, theta, seed, NULL, &cb);
    free(theta);
    if (st != CVQ_OK) return cli_lib_fail(st);
    snprintf(note, sizeof note,
             "random codebook (does not preserve keys and values): commvq random-codebook "
             "--seed %llu --rope-base %.17g%s",
             (unsigned long long)seed, base, o[RC_FP16].value ? " --fp16" : "");
    st = cvq_codebook_set_note(cb, note);
    if (st == CVQ_OK)
        st = cvq_codebook_save(cb, o[RC_OUT].value, o[RC_FP16].value ? CVQ_SAVE_FP16 : 0u);
    if (st != CVQ_OK) {
        cvq_codebook_free(cb);
        return cli_lib_fail(st);
    }
    printf("wrote %s: random codebook, seed %llu%s\n", o[RC_OUT].value,
           (unsigned long long)seed, o[RC_FP16].value ? ", float16 storage" : "");
    print_geometry_summary(&g);
    cvq_codebook_free(cb);
    return CLI_OK;
}

/* ---- export-codebook ---------------------------------------------------- */

/* "[a, b, c]" */
static void format_shape(const uint64_t *dims, uint32_t n, char *buf, size_t cap) {
    size_t k = 0;
    uint32_t i;
    int w = snprintf(buf, cap, "[");
    if (w > 0) k = (size_t)w;
    for (i = 0; i < n && k < cap; i++) {
        w = snprintf(buf + k, cap - k, "%s%llu", i ? ", " : "", (unsigned long long)dims[i]);
        if (w < 0) return;
        k += (size_t)w;
    }
    if (k < cap) snprintf(buf + k, cap - k, "]");
}

/* Tab and newline would break the manifest's columns. */
static void print_field(FILE *f, const char *s) {
    for (; s != NULL && *s; s++) fputc(*s == '\t' || *s == '\n' || *s == '\r' ? ' ' : *s, f);
}

static int export_geometry(const char *dir, const cvq_geometry *g) {
    char path[4096];
    FILE *f;
    cvq_record_layout rl;
    cvq_status st;
    int rc = tool_join(path, sizeof path, dir, "geometry.tsv");
    if (rc != CLI_OK) return rc;
    st = cvq_record_layout_of(g, &rl);
    if (st != CVQ_OK) return cli_lib_fail(st);
    f = fopen(path, "w");
    if (f == NULL) return cli_fail("cannot create %s", path);
    fprintf(f, "key\tvalue\n");
    fprintf(f, "n_layers\t%u\n", (unsigned)g->n_layers);
    fprintf(f, "n_q_heads\t%u\n", (unsigned)g->n_q_heads);
    fprintf(f, "n_kv_heads\t%u\n", (unsigned)g->n_kv_heads);
    fprintf(f, "head_dim\t%u\n", (unsigned)g->head_dim);
    fprintf(f, "key_stages\t%u\n", (unsigned)g->key_stages);
    fprintf(f, "key_scale\t%s\n", g->key_scale == CVQ_KEY_SCALE_HEAD ? "head" : "token");
    fprintf(f, "pair_layout\t%s\n",
            g->pair_layout == CVQ_PAIRS_INTERLEAVED ? "interleaved" : "rotate_half");
    fprintf(f, "value_group_width\t%u\n", (unsigned)g->value_group_width);
    fprintf(f, "value_groups\t%u\n", (unsigned)rl.value_groups);
    fprintf(f, "value_bits\t%u\n", (unsigned)g->value_bits);
    fprintf(f, "value_hidden\t%u\n", (unsigned)g->value_hidden);
    fprintf(f, "logit_scale\t%.9g\n", (double)g->logit_scale);
    fprintf(f, "record_bytes_per_token\t%u\n", (unsigned)rl.bytes_per_token);
    fprintf(f, "record_key_code_bytes\t%u\n", (unsigned)rl.key_code_bytes);
    fprintf(f, "record_value_bit_bytes\t%u\n", (unsigned)rl.value_bit_bytes);
    fprintf(f, "bits_per_element\t%.6f\n", rl.bits_per_element);
    if (fclose(f) != 0) return cli_fail("write error on %s", path);
    return CLI_OK;
}

int cmd_export_codebook(const cli_cmd *cmd, int argc, char **argv) {
    cli_opt o[1] = {{"--npy-dir", 1, NULL}};
    const char *pos[1];
    size_t n_pos;
    cvq_codebook *cb = NULL;
    cvq_geometry g;
    cvq_record_layout rl;
    cvq_tensor_info ti;
    cvq_status st;
    char path[4096], shape_text[160];
    FILE *man = NULL;
    double *theta = NULL;
    float *all = NULL;
    uint64_t shape[8];
    uint32_t groups, id, layer, grp, k, nd;
    const char *dir, *note;
    int rc = cli_parse(cmd, argc, argv, o, 1, pos, 1, &n_pos);
    if (rc != CLI_OK) return rc;
    if (n_pos != 1) return cli_usage_error(cmd, "give the codebook FILE");
    if ((rc = cli_require(cmd, &o[0])) != CLI_OK) return rc;
    dir = o[0].value;

    if ((rc = tool_load_codebook(pos[0], &cb, &g)) != CLI_OK) return rc;
    st = cvq_record_layout_of(&g, &rl);
    if (st != CVQ_OK) {
        rc = cli_lib_fail(st);
        goto done;
    }
    groups = rl.value_groups;
    if ((rc = tool_make_dir(dir)) != CLI_OK) goto done;
    if ((rc = tool_join(path, sizeof path, dir, "manifest.tsv")) != CLI_OK) goto done;
    man = fopen(path, "w");
    if (man == NULL) {
        rc = cli_fail("cannot create %s", path);
        goto done;
    }
    fprintf(man, "file\tname\tshape\tdtype\tmeaning\n");

    /* RoPE frequency table: float64, as the codebook holds it. */
    theta = (double *)malloc((size_t)(g.head_dim / 2) * sizeof *theta);
    if (theta == NULL) {
        rc = cli_fail("out of memory");
        goto done;
    }
    st = cvq_codebook_rope_theta(cb, theta);
    if (st != CVQ_OK) {
        rc = cli_lib_fail(st);
        goto done;
    }
    shape[0] = g.head_dim / 2;
    if ((rc = tool_join(path, sizeof path, dir, "rope_theta.npy")) != CLI_OK) goto done;
    if ((rc = tool_save(path, NPY_F8, 1, shape, theta)) != CLI_OK) goto done;
    format_shape(shape, 1, shape_text, sizeof shape_text);
    fprintf(man, "rope_theta.npy\trope_theta\t%s\tfloat64\t", shape_text);
    if (cvq_codebook_tensor_info(cb, CVQ_T_ROPE_THETA, &ti) == CVQ_OK && ti.meaning)
        print_field(man, ti.meaning);
    else
        fputs("RoPE frequency theta_p of pair p, radians per position", man);
    fputc('\n', man);

    /* Every other tensor: all layers (and, for value tensors, all groups)
     * stacked in front of the tensor's own dims: key_w [L][...], value
     * tensors [L][groups][...]. */
    for (id = CVQ_T_KEY_W; id < CVQ_T_COUNT; id++) {
        int is_value = id != CVQ_T_KEY_W;
        uint32_t n_grp = is_value ? groups : 1;
        size_t per, total;
        char fname[96];
        st = cvq_codebook_tensor_info(cb, (cvq_tensor_id)id, &ti);
        if (st != CVQ_OK) {
            rc = cli_lib_fail(st);
            goto done;
        }
        if (ti.n_dims > 5) {
            rc = cli_fail("tensor %s reports %u dims", ti.name, (unsigned)ti.n_dims);
            goto done;
        }
        nd = 0;
        shape[nd++] = g.n_layers;
        if (is_value) shape[nd++] = groups;
        for (k = 0; k < ti.n_dims; k++) shape[nd++] = ti.dims[k];
        per = (size_t)ti.n_elements;
        total = per * (size_t)g.n_layers * n_grp;
        if (total / n_grp / g.n_layers != per) {
            rc = cli_fail("tensor %s is too large", ti.name);
            goto done;
        }
        all = (float *)malloc(total > 0 ? total * sizeof(float) : 1);
        if (all == NULL) {
            rc = cli_fail("out of memory (%s)", ti.name);
            goto done;
        }
        for (layer = 0; layer < g.n_layers; layer++) {
            for (grp = 0; grp < n_grp; grp++) {
                const float *src = NULL;
                st = cvq_codebook_tensor_cdata(cb, (cvq_tensor_id)id, layer, grp, &src);
                if (st != CVQ_OK) {
                    rc = cli_lib_fail(st);
                    goto done;
                }
                memcpy(all + ((size_t)layer * n_grp + grp) * per, src, per * sizeof(float));
            }
        }
        snprintf(fname, sizeof fname, "%s.npy", ti.name);
        if ((rc = tool_join(path, sizeof path, dir, fname)) != CLI_OK) goto done;
        if ((rc = tool_save(path, NPY_F4, nd, shape, all)) != CLI_OK) goto done;
        free(all);
        all = NULL;
        format_shape(shape, nd, shape_text, sizeof shape_text);
        fprintf(man, "%s\t%s\t%s\tfloat32\t", fname, ti.name, shape_text);
        print_field(man, is_value ? "(stacked: layer, value group) " : "(stacked: layer) ");
        print_field(man, ti.meaning);
        fputc('\n', man);
    }
    if (fclose(man) != 0) {
        man = NULL;
        rc = cli_fail("write error on manifest.tsv");
        goto done;
    }
    man = NULL;
    if ((rc = export_geometry(dir, &g)) != CLI_OK) goto done;
    note = cvq_codebook_note(cb);
    if (note != NULL && note[0] != '\0') {
        FILE *f;
        if ((rc = tool_join(path, sizeof path, dir, "note.txt")) != CLI_OK) goto done;
        f = fopen(path, "w");
        if (f == NULL) {
            rc = cli_fail("cannot create %s", path);
            goto done;
        }
        int werr = fprintf(f, "%s\n", note) < 0;
        if (fclose(f) != 0) werr = 1; /* close even after a failed write */
        if (werr) {
            rc = cli_fail("write error on %s", path);
            goto done;
        }
    }
    printf("exported %u tensors of %s to %s (manifest.tsv, geometry.tsv)\n",
           (unsigned)CVQ_T_COUNT, pos[0], dir);
    rc = CLI_OK;
done:
    if (man != NULL) fclose(man);
    free(all);
    free(theta);
    cvq_codebook_free(cb);
    return rc;
}
