/*
 * commvq train-keys, commvq train-values and commvq extract-stages: train
 * codebooks from calibration dumps (include/commvq_train.h, docs/training.md).
 *
 * Data folder (one per model run): per layer N, k_N.npy and v_N.npy
 * [T, Hkv, D] and optionally q_N.npy [T, Hq, D] (all before RoPE; float32,
 * float16, float64, or uint16 bfloat16 bits with --bf16), plus optional
 * pos.npy (int32 [T], each token's position) and seq_start.npy (int32
 * [n_seq], where each sequence starts), shared by all layers.
 */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* isatty, fileno */
#endif

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifndef _WIN32
#include <unistd.h>
#endif

#include "cli.h"
#include "commvq_train.h"

/* ---- options ----------------------------------------------------------------- */

/* Every option of the two trainers; each command's table is built from the
 * names it accepts. */
enum {
    O_DATA, O_OUT, O_INIT, O_LAYERS, O_FP16, O_SEED, O_SAMPLES, O_STEPS, O_THREADS,
    O_BF16, O_QUIET,
    /* geometry of a new codebook */
    O_NLAYERS, O_HQ, O_HKV, O_HEAD_DIM, O_KEY_STAGES, O_VALUE_BITS, O_VALUE_GROUP,
    O_VALUE_HIDDEN, O_PAIR_LAYOUT, O_KEY_SCALE, O_ROPE_BASE, O_ROPE_THETA, O_LOGIT_SCALE,
    /* keys */
    O_STAGES, O_FIRST_STAGE, O_HARD, O_TAU_START, O_TAU_END, O_PLATEAU, O_PATIENCE,
    O_SPLITS,
    /* values */
    O_BATCH, O_LR, O_LR_END, O_WD, O_WARMUP, O_GUMBEL, O_ATTN_WEIGHT, O_NO_QUERIES,
    O_KEEP_LS, O_RESUME,
    O_COUNT
};

static const cli_opt k_all_opts[O_COUNT] = {
    {"--data", 1, NULL},        {"--out", 1, NULL},          {"--init", 1, NULL},
    {"--layers", 1, NULL},      {"--fp16", 0, NULL},         {"--seed", 1, NULL},
    {"--samples", 1, NULL},     {"--steps", 1, NULL},        {"--threads", 1, NULL},
    {"--bf16", 0, NULL},        {"--quiet", 0, NULL},
    {"--n-layers", 1, NULL},    {"--hq", 1, NULL},           {"--hkv", 1, NULL},
    {"--head-dim", 1, NULL},    {"--key-stages", 1, NULL},   {"--value-bits", 1, NULL},
    {"--value-group", 1, NULL}, {"--value-hidden", 1, NULL}, {"--pair-layout", 1, NULL},
    {"--key-scale", 1, NULL},   {"--rope-base", 1, NULL},    {"--rope-theta", 1, NULL},
    {"--logit-scale", 1, NULL},
    {"--stages", 1, NULL},      {"--first-stage", 1, NULL},  {"--hard", 0, NULL},
    {"--tau-start", 1, NULL},   {"--tau-end", 1, NULL},      {"--plateau", 1, NULL},
    {"--patience", 1, NULL},    {"--splits", 1, NULL},
    {"--batch", 1, NULL},       {"--lr", 1, NULL},           {"--lr-end", 1, NULL},
    {"--weight-decay", 1, NULL},{"--warmup", 1, NULL},       {"--gumbel-tau", 1, NULL},
    {"--attn-weight", 1, NULL}, {"--no-queries", 0, NULL},   {"--keep-ls", 0, NULL},
    {"--resume", 0, NULL},
};

/* Parses argv with the options of `which` (0 keys, 1 values) into o[O_COUNT]
 * (options of the other trainer stay NULL). */
static int parse_train(const cli_cmd *cmd, int which, int argc, char **argv, cli_opt *o) {
    cli_opt sel[O_COUNT];
    int map[O_COUNT];
    size_t n = 0, n_pos = 0;
    const char *pos[1];
    for (int i = 0; i < O_COUNT; i++) {
        o[i] = k_all_opts[i];
        o[i].value = NULL;
        const int keys_only = i >= O_STAGES && i <= O_SPLITS;
        const int values_only = i >= O_BATCH && i <= O_RESUME;
        if ((which == 0 && values_only) || (which == 1 && keys_only)) continue;
        map[n] = i;
        sel[n++] = k_all_opts[i];
    }
    int rc = cli_parse(cmd, argc, argv, sel, n, pos, 0, &n_pos);
    if (rc != CLI_OK) return rc;
    for (size_t k = 0; k < n; k++) o[map[k]].value = sel[k].value;
    if ((rc = cli_require(cmd, &o[O_DATA])) != CLI_OK) return rc;
    if ((rc = cli_require(cmd, &o[O_OUT])) != CLI_OK) return rc;
    return CLI_OK;
}

/* ---- data files ------------------------------------------------------------------ */

static int file_exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    fclose(f);
    return 1;
}

/* Shape of a .npy file from its header only. */
static int peek_npy(const char *path, npy_array *a) {
    unsigned char *buf = malloc(1u << 20);
    char err[512];
    size_t off = 0;
    if (!buf) return cli_fail("out of memory");
    FILE *f = fopen(path, "rb");
    if (!f) {
        free(buf);
        return cli_fail("%s: cannot open", path);
    }
    const size_t got = fread(buf, 1, 1u << 20, f);
    fclose(f);
    const int r = npy_parse_header(buf, got, a, &off, err, sizeof err);
    free(buf);
    if (r != 0) return cli_fail("%s: %s", path, err);
    return CLI_OK;
}

/* Optional int32 [n] file: *data NULL when absent. */
static int read_i32(const char *dir, const char *name, npy_array *a, int32_t **data,
                    size_t *n) {
    char path[4096], err[512];
    *data = NULL;
    *n = 0;
    memset(a, 0, sizeof *a);
    if (tool_join(path, sizeof path, dir, name) != CLI_OK) return CLI_FAIL;
    if (!file_exists(path)) return CLI_OK;
    if (npy_load(path, a, err, sizeof err) != 0) return cli_fail("%s", err);
    if (a->dtype != NPY_I4 || a->ndim != 1) {
        npy_free(a);
        return cli_fail("%s: must be int32 with one dimension", path);
    }
    *data = (int32_t *)a->data;
    *n = (size_t)a->shape[0];
    return CLI_OK;
}

/* "0,2,5-7" or "all" -> sel[L] flags. */
static int parse_layers(const cli_cmd *cmd, const char *text, uint32_t L, unsigned char *sel) {
    memset(sel, 0, L);
    if (!text || strcmp(text, "all") == 0) {
        memset(sel, 1, L);
        return CLI_OK;
    }
    const char *p = text;
    while (*p) {
        char *end;
        unsigned long a = strtoul(p, &end, 10), b;
        if (end == p) return cli_usage_error(cmd, "--layers: cannot read '%s'", text);
        b = a;
        p = end;
        if (*p == '-') {
            b = strtoul(p + 1, &end, 10);
            if (end == p + 1) return cli_usage_error(cmd, "--layers: cannot read '%s'", text);
            p = end;
        }
        if (a > b || b >= L)
            return cli_usage_error(cmd, "--layers: '%s' is outside 0..%u", text, (unsigned)L - 1);
        for (unsigned long i = a; i <= b; i++) sel[i] = 1;
        if (*p == ',') p++;
        else if (*p) return cli_usage_error(cmd, "--layers: cannot read '%s'", text);
    }
    return CLI_OK;
}

/* ---- the codebook: loaded, extended, or new ------------------------------------------ */

/* A copy of src with R2 >= R key stages: stages below R copied, the new ones
 * zero; values, RoPE table and note copied (public API only). */
static int extend_stages(cvq_codebook *src, uint32_t R2, cvq_codebook **out) {
    cvq_geometry g, g2;
    cvq_status st = cvq_codebook_geometry(src, &g);
    if (st != CVQ_OK) return cli_lib_fail(st);
    g2 = g;
    g2.key_stages = R2;
    double *theta = malloc(g.head_dim / 2 * sizeof(double));
    if (!theta) return cli_fail("out of memory");
    st = cvq_codebook_rope_theta(src, theta);
    if (st == CVQ_OK) st = cvq_codebook_create(&g2, theta, NULL, out);
    free(theta);
    if (st != CVQ_OK) return cli_lib_fail(st);
    const size_t per_stage = (size_t)64 * (g.head_dim / 2) * 2;
    for (uint32_t l = 0; l < g.n_layers && st == CVQ_OK; l++) {
        const float *s = NULL;
        float *d = NULL;
        st = cvq_codebook_tensor_cdata(src, CVQ_T_KEY_W, l, 0, &s);
        if (st == CVQ_OK) st = cvq_codebook_tensor_data(*out, CVQ_T_KEY_W, l, 0, &d);
        if (st != CVQ_OK) break;
        for (uint32_t h = 0; h < g.n_kv_heads; h++)
            memcpy(d + (size_t)h * R2 * per_stage, s + (size_t)h * g.key_stages * per_stage,
                   g.key_stages * per_stage * sizeof(float));
        const uint32_t groups = g.n_kv_heads * g.head_dim / g.value_group_width;
        for (int id = CVQ_T_VAL_LS; id < CVQ_T_COUNT && st == CVQ_OK; id++)
            for (uint32_t grp = 0; grp < groups && st == CVQ_OK; grp++) {
                cvq_tensor_info ti;
                st = cvq_codebook_tensor_info(src, (cvq_tensor_id)id, &ti);
                if (st == CVQ_OK)
                    st = cvq_codebook_tensor_cdata(src, (cvq_tensor_id)id, l, grp, &s);
                if (st == CVQ_OK)
                    st = cvq_codebook_tensor_data(*out, (cvq_tensor_id)id, l, grp, &d);
                if (st == CVQ_OK) memcpy(d, s, (size_t)ti.n_elements * sizeof(float));
            }
    }
    if (st == CVQ_OK) st = cvq_codebook_set_note(*out, cvq_codebook_note(src));
    if (st == CVQ_OK) st = cvq_codebook_commit(*out);
    if (st != CVQ_OK) {
        cvq_codebook_free(*out);
        *out = NULL;
        return cli_lib_fail(st);
    }
    return CLI_OK;
}

/* RoPE table of d/2 entries: --rope-theta FILE (float64 or float32 [d/2]),
 * else base^(-2p/d) with --rope-base (default 10000). */
static int rope_table(const cli_cmd *cmd, const cli_opt *o, uint32_t d, double *theta) {
    if (o[O_ROPE_THETA].value) {
        npy_array a;
        char err[512];
        if (npy_load(o[O_ROPE_THETA].value, &a, err, sizeof err) != 0) return cli_fail("%s", err);
        if (a.ndim != 1 || a.shape[0] != d / 2 || (a.dtype != NPY_F8 && a.dtype != NPY_F4)) {
            npy_free(&a);
            return cli_fail("%s: the RoPE table must be float64 or float32 [%u]",
                            o[O_ROPE_THETA].value, (unsigned)(d / 2));
        }
        for (uint32_t p = 0; p < d / 2; p++)
            theta[p] = a.dtype == NPY_F8 ? ((const double *)a.data)[p]
                                         : (double)((const float *)a.data)[p];
        npy_free(&a);
        return CLI_OK;
    }
    double base = 10000.0;
    int rc = cli_double(cmd, "--rope-base", o[O_ROPE_BASE].value, &base);
    if (rc != CLI_OK) return rc;
    if (!(base > 1.0)) return cli_usage_error(cmd, "--rope-base must be greater than 1");
    cvq_status st = cvq_rope_freqs_default(d, base, theta);
    return st == CVQ_OK ? CLI_OK : cli_lib_fail(st);
}

/* The codebook to train: --init FILE (possibly extended to --key-stages),
 * or a new zero codebook whose geometry comes from the options and the
 * shapes of the data files. *ext_from receives the stage count of --init
 * when it was extended (0 otherwise). */
static int open_codebook(const cli_cmd *cmd, const cli_opt *o, cvq_codebook **cb,
                         cvq_geometry *g, uint32_t *ext_from) {
    int rc;
    *ext_from = 0;
    if (o[O_INIT].value) {
        static const int geo[] = {O_NLAYERS, O_HQ,          O_HKV,          O_HEAD_DIM,
                                  O_VALUE_BITS, O_VALUE_GROUP, O_VALUE_HIDDEN, O_PAIR_LAYOUT,
                                  O_KEY_SCALE, O_ROPE_BASE,  O_ROPE_THETA,   O_LOGIT_SCALE};
        for (size_t i = 0; i < sizeof geo / sizeof geo[0]; i++)
            if (o[geo[i]].value)
                return cli_usage_error(cmd, "%s: the geometry comes from --init %s",
                                       o[geo[i]].name, o[O_INIT].value);
        if ((rc = tool_load_codebook(o[O_INIT].value, cb, g)) != CLI_OK) return rc;
        uint32_t R2 = g->key_stages;
        if ((rc = cli_u32(cmd, "--key-stages", o[O_KEY_STAGES].value, 1, 32, &R2)) != CLI_OK)
            goto fail;
        if (R2 < g->key_stages) {
            rc = cli_usage_error(cmd,
                                 "--key-stages %u is below the %u stages of %s (use "
                                 "'commvq extract-stages')",
                                 (unsigned)R2, (unsigned)g->key_stages, o[O_INIT].value);
            goto fail;
        }
        if (R2 > g->key_stages) {
            cvq_codebook *big = NULL;
            if ((rc = extend_stages(*cb, R2, &big)) != CLI_OK) goto fail;
            *ext_from = g->key_stages;
            cvq_codebook_free(*cb);
            *cb = big;
            g->key_stages = R2;
        }
        return CLI_OK;
    fail:
        cvq_codebook_free(*cb);
        *cb = NULL;
        return rc;
    }

    /* new codebook: shapes from k_0.npy (and q_0.npy) */
    char path[4096];
    npy_array a;
    memset(g, 0, sizeof *g);
    if ((rc = cli_require(cmd, &o[O_KEY_STAGES])) || (rc = cli_require(cmd, &o[O_VALUE_BITS])))
        return rc;
    if ((rc = tool_join(path, sizeof path, o[O_DATA].value, "k_0.npy")) != CLI_OK) return rc;
    if ((rc = peek_npy(path, &a)) != CLI_OK) return rc;
    if (a.ndim != 3) return cli_fail("%s: keys must have shape [T, Hkv, D]", path);
    g->n_kv_heads = (uint32_t)a.shape[1];
    g->head_dim = (uint32_t)a.shape[2];
    g->n_q_heads = g->n_kv_heads;
    if ((rc = tool_join(path, sizeof path, o[O_DATA].value, "q_0.npy")) != CLI_OK) return rc;
    if (file_exists(path)) {
        if ((rc = peek_npy(path, &a)) != CLI_OK) return rc;
        if (a.ndim == 3) g->n_q_heads = (uint32_t)a.shape[1];
    }
    /* layers: --n-layers, or as many consecutive k_N.npy files as exist */
    g->n_layers = 0;
    if (o[O_NLAYERS].value) {
        if ((rc = cli_u32(cmd, "--n-layers", o[O_NLAYERS].value, 1, 1u << 20, &g->n_layers)))
            return rc;
    } else {
        for (;;) {
            char name[64];
            snprintf(name, sizeof name, "k_%u.npy", (unsigned)g->n_layers);
            if ((rc = tool_join(path, sizeof path, o[O_DATA].value, name)) != CLI_OK) return rc;
            if (!file_exists(path)) break;
            g->n_layers++;
        }
    }
    double lscale = 0.0;
    if ((rc = cli_u32(cmd, "--hq", o[O_HQ].value, 1, 1u << 16, &g->n_q_heads)) ||
        (rc = cli_u32(cmd, "--hkv", o[O_HKV].value, 1, 1u << 16, &g->n_kv_heads)) ||
        (rc = cli_u32(cmd, "--head-dim", o[O_HEAD_DIM].value, 2, 1u << 16, &g->head_dim)) ||
        (rc = cli_u32(cmd, "--key-stages", o[O_KEY_STAGES].value, 1, 32, &g->key_stages)) ||
        (rc = cli_u32(cmd, "--value-bits", o[O_VALUE_BITS].value, 1, 1u << 24, &g->value_bits)) ||
        (rc = cli_u32(cmd, "--value-group", o[O_VALUE_GROUP].value, 1, 1u << 24,
                      &g->value_group_width)) ||
        (rc = cli_u32(cmd, "--value-hidden", o[O_VALUE_HIDDEN].value, 1, 1u << 24,
                      &g->value_hidden)) ||
        (rc = cli_double(cmd, "--logit-scale", o[O_LOGIT_SCALE].value, &lscale)))
        return rc;
    g->logit_scale = (float)lscale;
    if (o[O_PAIR_LAYOUT].value) {
        if (strcmp(o[O_PAIR_LAYOUT].value, "rotate_half") == 0)
            g->pair_layout = CVQ_PAIRS_ROTATE_HALF;
        else if (strcmp(o[O_PAIR_LAYOUT].value, "interleaved") == 0)
            g->pair_layout = CVQ_PAIRS_INTERLEAVED;
        else
            return cli_usage_error(cmd, "--pair-layout: '%s' is not rotate_half or interleaved",
                                   o[O_PAIR_LAYOUT].value);
    }
    if (o[O_KEY_SCALE].value) {
        if (strcmp(o[O_KEY_SCALE].value, "token") == 0)
            g->key_scale = CVQ_KEY_SCALE_TOKEN;
        else if (strcmp(o[O_KEY_SCALE].value, "head") == 0)
            g->key_scale = CVQ_KEY_SCALE_HEAD;
        else
            return cli_usage_error(cmd, "--key-scale: '%s' is not token or head",
                                   o[O_KEY_SCALE].value);
    }
    if (g->n_layers == 0) return cli_fail("%s: no k_0.npy: nothing to train", o[O_DATA].value);
    cvq_status st = cvq_geometry_resolve(g);
    if (st != CVQ_OK) return cli_lib_fail(st);
    double *theta = malloc(g->head_dim / 2 * sizeof(double));
    if (!theta) return cli_fail("out of memory");
    if ((rc = rope_table(cmd, o, g->head_dim, theta)) != CLI_OK) {
        free(theta);
        return rc;
    }
    st = cvq_codebook_create(g, theta, NULL, cb);
    free(theta);
    if (st != CVQ_OK) return cli_lib_fail(st);
    return CLI_OK;
}

/* ---- progress ------------------------------------------------------------------------ */

typedef struct progress_state {
    int tty, quiet, live;  /* live: a \r line is on the terminal */
    uint32_t layer_i, layers_n; /* position among the selected layers */
} progress_state;

static void fmt_time(double s, char *buf, size_t cap) {
    if (s < 0) {
        snprintf(buf, cap, "?");
    } else if (s < 60) {
        snprintf(buf, cap, "%.0fs", s);
    } else if (s < 3600) {
        snprintf(buf, cap, "%dm%02ds", (int)(s / 60), (int)fmod(s, 60));
    } else {
        snprintf(buf, cap, "%dh%02dm", (int)(s / 3600), (int)fmod(s / 60, 60));
    }
}

static int on_progress(void *user, const cvq_train_progress *p) {
    progress_state *ps = user;
    char left[32], line[256];
    if (ps->quiet) return 0;
    fmt_time(p->seconds_left, left, sizeof left);
    if (strcmp(p->phase, "keys") == 0)
        snprintf(line, sizeof line,
                 "layer %u (%u/%u) keys head %u/%u stage %u/%u step %u/%u loss %.4e "
                 "%.0f tok/s left %s",
                 (unsigned)p->layer, (unsigned)ps->layer_i + 1, (unsigned)ps->layers_n,
                 (unsigned)p->part + 1, (unsigned)p->n_parts, (unsigned)p->stage + 1,
                 (unsigned)p->n_stages, (unsigned)p->step, (unsigned)p->n_steps, p->loss,
                 p->tokens_per_second, left);
    else
        snprintf(line, sizeof line,
                 "layer %u (%u/%u) values group %u/%u step %u/%u loss %.4e %.0f tok/s "
                 "left %s",
                 (unsigned)p->layer, (unsigned)ps->layer_i + 1, (unsigned)ps->layers_n,
                 (unsigned)p->part + 1, (unsigned)p->n_parts, (unsigned)p->step,
                 (unsigned)p->n_steps, p->loss, p->tokens_per_second, left);
    if (ps->tty) {
        fprintf(stderr, "\r%s\033[K", line);
        ps->live = 1;
    } else {
        fprintf(stderr, "%s\n", line);
    }
    fflush(stderr);
    return 0;
}

static void progress_end_line(progress_state *ps) {
    if (ps->live) {
        fputc('\n', stderr);
        ps->live = 0;
    }
}

/* ---- the shared driver ---------------------------------------------------------------------- */

typedef struct layer_data {
    tool_tensor k, v, q;
    int has_q;
    uint64_t T;
} layer_data;

static void layer_data_free(layer_data *ld) {
    tool_tensor_free(&ld->k);
    tool_tensor_free(&ld->v);
    tool_tensor_free(&ld->q);
    memset(ld, 0, sizeof *ld);
}

/* Reads the layer's files: keys always; values and queries for the value
 * trainer (queries only when q_N.npy exists and --no-queries is absent). */
static int load_layer(const cli_opt *o, const cvq_geometry *g, uint32_t l, int values,
                      layer_data *ld) {
    char name[64], path[4096];
    uint64_t t2 = 0;
    int rc;
    const int bf16 = o[O_BF16].value != NULL;
    memset(ld, 0, sizeof *ld);
    snprintf(name, sizeof name, "k_%u.npy", (unsigned)l);
    if ((rc = tool_join(path, sizeof path, o[O_DATA].value, name)) != CLI_OK) return rc;
    if ((rc = tool_read_tensor(path, "keys", g->n_kv_heads, g->head_dim, bf16, 0, &ld->k,
                               &ld->T)) != CLI_OK)
        return rc;
    if (!values) return CLI_OK;
    snprintf(name, sizeof name, "v_%u.npy", (unsigned)l);
    if ((rc = tool_join(path, sizeof path, o[O_DATA].value, name)) != CLI_OK) goto fail;
    if ((rc = tool_read_tensor(path, "values", g->n_kv_heads, g->head_dim, bf16, 0, &ld->v,
                               &t2)) != CLI_OK)
        goto fail;
    if (t2 != ld->T) {
        rc = cli_fail("%s: %llu tokens, the keys have %llu", path, (unsigned long long)t2,
                      (unsigned long long)ld->T);
        goto fail;
    }
    snprintf(name, sizeof name, "q_%u.npy", (unsigned)l);
    if ((rc = tool_join(path, sizeof path, o[O_DATA].value, name)) != CLI_OK) goto fail;
    if (!o[O_NO_QUERIES].value && file_exists(path)) {
        if ((rc = tool_read_tensor(path, "queries", g->n_q_heads, g->head_dim, bf16, 0, &ld->q,
                                   &t2)) != CLI_OK)
            goto fail;
        if (t2 != ld->T) {
            rc = cli_fail("%s: %llu tokens, the keys have %llu", path, (unsigned long long)t2,
                          (unsigned long long)ld->T);
            goto fail;
        }
        ld->has_q = 1;
    }
    /* the library takes one dtype for all arrays: convert when they differ */
    if (ld->v.dtype != ld->k.dtype || (ld->has_q && ld->q.dtype != ld->k.dtype)) {
        layer_data_free(ld);
        /* reload everything as float32 */
        snprintf(name, sizeof name, "k_%u.npy", (unsigned)l);
        if ((rc = tool_join(path, sizeof path, o[O_DATA].value, name)) != CLI_OK) return rc;
        if ((rc = tool_read_tensor(path, "keys", g->n_kv_heads, g->head_dim, bf16, 1, &ld->k,
                                   &ld->T)) != CLI_OK)
            return rc;
        snprintf(name, sizeof name, "v_%u.npy", (unsigned)l);
        if ((rc = tool_join(path, sizeof path, o[O_DATA].value, name)) != CLI_OK) goto fail;
        if ((rc = tool_read_tensor(path, "values", g->n_kv_heads, g->head_dim, bf16, 1, &ld->v,
                                   &t2)) != CLI_OK)
            goto fail;
        snprintf(name, sizeof name, "q_%u.npy", (unsigned)l);
        if ((rc = tool_join(path, sizeof path, o[O_DATA].value, name)) != CLI_OK) goto fail;
        if (!o[O_NO_QUERIES].value && file_exists(path)) {
            if ((rc = tool_read_tensor(path, "queries", g->n_q_heads, g->head_dim, bf16, 1,
                                       &ld->q, &t2)) != CLI_OK)
                goto fail;
            ld->has_q = 1;
        }
    }
    return CLI_OK;
fail:
    layer_data_free(ld);
    return rc;
}

/* Appends "commvq <cmd> <args>" to the codebook's note. */
static void note_command(cvq_codebook *cb, const char *name, int argc, char **argv) {
    const char *old = cvq_codebook_note(cb);
    size_t n = strlen(old) + strlen(name) + 16;
    for (int i = 0; i < argc; i++) n += strlen(argv[i]) + 1;
    char *buf = malloc(n);
    if (!buf) return;
    size_t k = (size_t)snprintf(buf, n, "%s%scommvq %s", old, old[0] ? "\n" : "", name);
    for (int i = 0; i < argc && k < n; i++) k += (size_t)snprintf(buf + k, n - k, " %s", argv[i]);
    (void)cvq_codebook_set_note(cb, buf);
    free(buf);
}

static int run_train(const cli_cmd *cmd, int which, int argc, char **argv) {
    cli_opt o[O_COUNT];
    cvq_codebook *cb = NULL;
    cvq_geometry g;
    uint32_t ext_from = 0;
    unsigned char *sel = NULL;
    npy_array pos_a, ss_a;
    int32_t *pos = NULL, *ss = NULL;
    size_t n_pos = 0, n_ss = 0;
    int rc = parse_train(cmd, which, argc, argv, o);
    if (rc != CLI_OK) return rc;
    memset(&pos_a, 0, sizeof pos_a);
    memset(&ss_a, 0, sizeof ss_a);

    /* parameters */
    cvq_key_train_params kp = cvq_key_train_default_params();
    cvq_value_train_params vp = cvq_value_train_default_params();
    uint64_t seed = 0, samples = 0;
    uint32_t steps = 0, threads = 0;
    if ((rc = cli_u64(cmd, "--seed", o[O_SEED].value, &seed)) ||
        (rc = cli_u64(cmd, "--samples", o[O_SAMPLES].value, &samples)) ||
        (rc = cli_u32(cmd, "--steps", o[O_STEPS].value, 1, 100000000u, &steps)) ||
        (rc = cli_u32(cmd, "--threads", o[O_THREADS].value, 1, 4096, &threads)))
        return rc;
    if (which == 0) {
        kp.seed = seed;
        kp.max_tokens = samples;
        if (steps) kp.steps = steps;
        kp.n_threads = (int)threads;
        kp.hard = o[O_HARD].value != NULL;
        if ((rc = cli_u32(cmd, "--stages", o[O_STAGES].value, 1, 32, &kp.n_stages)) ||
            (rc = cli_u32(cmd, "--patience", o[O_PATIENCE].value, 0, 1000000, &kp.patience)) ||
            (rc = cli_u32(cmd, "--splits", o[O_SPLITS].value, 0, 1000000, &kp.max_splits)) ||
            (rc = cli_double(cmd, "--tau-start", o[O_TAU_START].value, &kp.tau_start)) ||
            (rc = cli_double(cmd, "--tau-end", o[O_TAU_END].value, &kp.tau_end)) ||
            (rc = cli_double(cmd, "--plateau", o[O_PLATEAU].value, &kp.plateau)))
            return rc;
        kp.progress = on_progress;
    } else {
        vp.seed = seed;
        vp.max_tokens = samples;
        if (steps) vp.steps = steps;
        vp.n_threads = (int)threads;
        vp.keep_ls = o[O_KEEP_LS].value != NULL;
        vp.resume = o[O_RESUME].value != NULL;
        if ((rc = cli_u32(cmd, "--batch", o[O_BATCH].value, 1, 1u << 30, &vp.batch_tokens)) ||
            (rc = cli_u32(cmd, "--warmup", o[O_WARMUP].value, 0, 100000000u, &vp.warmup_steps)) ||
            (rc = cli_double(cmd, "--lr", o[O_LR].value, &vp.lr)) ||
            (rc = cli_double(cmd, "--lr-end", o[O_LR_END].value, &vp.lr_end_factor)) ||
            (rc = cli_double(cmd, "--weight-decay", o[O_WD].value, &vp.weight_decay)) ||
            (rc = cli_double(cmd, "--gumbel-tau", o[O_GUMBEL].value, &vp.gumbel_tau)) ||
            (rc = cli_double(cmd, "--attn-weight", o[O_ATTN_WEIGHT].value, &vp.attn_weight)))
            return rc;
        if (vp.resume && !o[O_INIT].value)
            return cli_usage_error(cmd, "--resume needs --init FILE (the weights to start from)");
        vp.progress = on_progress;
    }

    if ((rc = open_codebook(cmd, o, &cb, &g, &ext_from)) != CLI_OK) return rc;
    if (which == 0) {
        uint32_t first = ext_from;
        if ((rc = cli_u32(cmd, "--first-stage", o[O_FIRST_STAGE].value, 0, g.key_stages - 1,
                          &first)) != CLI_OK)
            goto done;
        kp.first_stage = first;
        if (kp.n_stages > g.key_stages - first) {
            rc = cli_usage_error(cmd, "--stages %u from stage %u: the codebook has %u stages",
                                 (unsigned)kp.n_stages, (unsigned)first,
                                 (unsigned)g.key_stages);
            goto done;
        }
    }
    sel = malloc(g.n_layers);
    if (!sel) {
        rc = cli_fail("out of memory");
        goto done;
    }
    if ((rc = parse_layers(cmd, o[O_LAYERS].value, g.n_layers, sel)) != CLI_OK) goto done;
    if ((rc = read_i32(o[O_DATA].value, "pos.npy", &pos_a, &pos, &n_pos)) != CLI_OK ||
        (rc = read_i32(o[O_DATA].value, "seq_start.npy", &ss_a, &ss, &n_ss)) != CLI_OK)
        goto done;

    progress_state ps;
    memset(&ps, 0, sizeof ps);
#ifndef _WIN32
    ps.tty = isatty(fileno(stderr));
#endif
    ps.quiet = o[O_QUIET].value != NULL;
    for (uint32_t l = 0; l < g.n_layers; l++) ps.layers_n += sel[l];
    kp.progress_user = &ps;
    vp.progress_user = &ps;
    note_command(cb, cmd->name, argc, argv);
    const uint32_t flags = o[O_FP16].value ? CVQ_SAVE_FP16 : 0u;

    for (uint32_t l = 0; l < g.n_layers; l++) {
        if (!sel[l]) continue;
        layer_data ld;
        if ((rc = load_layer(o, &g, l, which == 1, &ld)) != CLI_OK) goto done;
        if ((pos && n_pos != ld.T)) {
            rc = cli_fail("pos.npy has %zu entries, layer %u has %llu tokens", n_pos,
                          (unsigned)l, (unsigned long long)ld.T);
            layer_data_free(&ld);
            goto done;
        }
        cvq_train_data dd;
        memset(&dd, 0, sizeof dd);
        dd.n_tokens = (size_t)ld.T;
        dd.dtype = ld.k.dtype;
        dd.keys = ld.k.data;
        dd.values = which == 1 ? ld.v.data : NULL;
        dd.queries = ld.has_q ? ld.q.data : NULL;
        dd.positions = pos;
        dd.seq_start = ss;
        dd.n_seq = n_ss;
        cvq_train_report rep;
        memset(&rep, 0, sizeof rep);
        cvq_status st = which == 0 ? cvq_train_keys(cb, l, &dd, &kp, &rep)
                                   : cvq_train_values(cb, l, &dd, &vp, &rep);
        progress_end_line(&ps);
        layer_data_free(&ld);
        if (st != CVQ_OK) {
            rc = cli_lib_fail(st);
            goto done;
        }
        if (which == 0)
            printf("layer %u keys: rel_error %.6g, %llu EM steps, %llu tokens, %.1f s\n",
                   (unsigned)l, rep.rel_error, (unsigned long long)rep.steps_run,
                   (unsigned long long)rep.tokens_used, rep.seconds);
        else if (rep.attn_rel_error >= 0)
            printf("layer %u values: rel_error %.6g, attention rel_error %.6g, %llu steps, "
                   "%llu tokens, %.1f s\n",
                   (unsigned)l, rep.rel_error, rep.attn_rel_error,
                   (unsigned long long)rep.steps_run, (unsigned long long)rep.tokens_used,
                   rep.seconds);
        else
            printf("layer %u values: rel_error %.6g, %llu steps, %llu tokens, %.1f s\n",
                   (unsigned)l, rep.rel_error, (unsigned long long)rep.steps_run,
                   (unsigned long long)rep.tokens_used, rep.seconds);
        fflush(stdout);
        /* checkpoint after every layer: an interrupted run keeps its layers */
        st = cvq_codebook_save(cb, o[O_OUT].value, flags);
        if (st != CVQ_OK) {
            rc = cli_lib_fail(st);
            goto done;
        }
        ps.layer_i++;
    }
    printf("wrote %s\n", o[O_OUT].value);
    rc = CLI_OK;
done:
    npy_free(&pos_a);
    npy_free(&ss_a);
    free(sel);
    cvq_codebook_free(cb);
    return rc;
}

int cmd_train_keys(const cli_cmd *cmd, int argc, char **argv) {
    return run_train(cmd, 0, argc, argv);
}

int cmd_train_values(const cli_cmd *cmd, int argc, char **argv) {
    return run_train(cmd, 1, argc, argv);
}

/* ---- extract-stages -------------------------------------------------------------------- */

int cmd_extract_stages(const cli_cmd *cmd, int argc, char **argv) {
    cli_opt o[3] = {{"--stages", 1, NULL}, {"--out", 1, NULL}, {"--fp16", 0, NULL}};
    const char *pos[1];
    size_t n_pos = 0;
    cvq_codebook *cb = NULL, *x = NULL;
    cvq_geometry g;
    uint32_t stages = 0;
    int rc = cli_parse(cmd, argc, argv, o, 3, pos, 1, &n_pos);
    if (rc != CLI_OK) return rc;
    if (n_pos != 1) return cli_usage_error(cmd, "give the input codebook FILE");
    if ((rc = cli_require(cmd, &o[0])) || (rc = cli_require(cmd, &o[1]))) return rc;
    if ((rc = tool_load_codebook(pos[0], &cb, &g)) != CLI_OK) return rc;
    if ((rc = cli_u32(cmd, "--stages", o[0].value, 1, g.key_stages, &stages)) != CLI_OK) {
        cvq_codebook_free(cb);
        return rc;
    }
    cvq_status st = cvq_codebook_extract_stages(cb, stages, &x);
    cvq_codebook_free(cb);
    if (st == CVQ_OK) st = cvq_codebook_save(x, o[1].value, o[2].value ? CVQ_SAVE_FP16 : 0u);
    cvq_codebook_free(x);
    if (st != CVQ_OK) return cli_lib_fail(st);
    printf("wrote %s: the first %u of %u key stages (%.4g key bits per dim)\n", o[1].value,
           (unsigned)stages, (unsigned)g.key_stages, 12.0 * stages / g.head_dim);
    return CLI_OK;
}
