/*
 * Option parsing, error reporting and the steps the subcommands share.
 */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* mkdir, stat */
#endif

#include "cli.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _WIN32
#include <direct.h>
#include <sys/stat.h>
#define tool_mkdir(p) _mkdir(p)
#ifndef S_ISDIR
#define S_ISDIR(m) (((m) & _S_IFMT) == _S_IFDIR)
#endif
#else
#include <sys/stat.h>
#include <sys/types.h>
#define tool_mkdir(p) mkdir((p), 0777)
#endif

/* ---- messages ------------------------------------------------------------ */

int cli_usage_error(const cli_cmd *cmd, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "commvq %s: ", cmd ? cmd->name : "");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n(see 'commvq %s --help')\n", cmd ? cmd->name : "");
    return CLI_USAGE;
}

int cli_fail(const char *fmt, ...) {
    va_list ap;
    fputs("commvq: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return CLI_FAIL;
}

const char *cli_lib_message(cvq_status st) {
    /* The library's messages may already start with the status name; do
     * not print it twice. */
    const char *msg = cvq_last_error();
    const char *name = cvq_status_name(st);
    size_t n = strlen(name);
    if (strncmp(msg, name, n) == 0 && msg[n] == ':') {
        msg += n + 1;
        while (*msg == ' ') msg++;
    }
    return msg[0] ? msg : cvq_status_string(st);
}

int cli_lib_fail(cvq_status st) {
    fprintf(stderr, "commvq: %s: %s\n", cvq_status_name(st), cli_lib_message(st));
    return CLI_FAIL;
}

/* ---- options -------------------------------------------------------------- */

int cli_parse(const cli_cmd *cmd, int argc, char **argv, cli_opt *opts,
              size_t n_opts, const char **pos, size_t max_pos, size_t *n_pos) {
    int i, only_pos = 0;
    size_t k;
    *n_pos = 0;
    for (k = 0; k < n_opts; k++) opts[k].value = NULL;
    for (i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *eq;
        size_t name_len;
        cli_opt *o = NULL;
        if (only_pos || a[0] != '-' || a[1] == '\0') {
            if (*n_pos >= max_pos)
                return cli_usage_error(cmd, "unexpected argument '%s'", a);
            pos[(*n_pos)++] = a;
            continue;
        }
        if (strcmp(a, "--") == 0) {
            only_pos = 1;
            continue;
        }
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(cmd->usage, stdout);
            return CLI_HELP;
        }
        eq = strchr(a, '=');
        name_len = eq ? (size_t)(eq - a) : strlen(a);
        for (k = 0; k < n_opts; k++) {
            if (strlen(opts[k].name) == name_len &&
                strncmp(opts[k].name, a, name_len) == 0) {
                o = &opts[k];
                break;
            }
        }
        if (o == NULL)
            return cli_usage_error(cmd, "unknown option '%.*s'", (int)name_len, a);
        if (o->value != NULL)
            return cli_usage_error(cmd, "option '%s' given twice", o->name);
        if (!o->takes_value) {
            if (eq) return cli_usage_error(cmd, "option '%s' takes no value", o->name);
            o->value = "1";
        } else if (eq) {
            o->value = eq + 1;
        } else {
            if (i + 1 >= argc)
                return cli_usage_error(cmd, "option '%s' needs a value", o->name);
            o->value = argv[++i];
        }
    }
    return CLI_OK;
}

int cli_require(const cli_cmd *cmd, const cli_opt *o) {
    if (o->value == NULL || o->value[0] == '\0')
        return cli_usage_error(cmd, "option '%s' is required", o->name);
    return CLI_OK;
}

int cli_u64(const cli_cmd *cmd, const char *opt, const char *text, uint64_t *out) {
    char *end = NULL;
    unsigned long long v;
    if (text == NULL) return CLI_OK;
    if (text[0] < '0' || text[0] > '9')
        return cli_usage_error(cmd, "%s: '%s' is not a non-negative integer", opt, text);
    errno = 0;
    v = strtoull(text, &end, 0);
    if (errno != 0 || end == text || *end != '\0')
        return cli_usage_error(cmd, "%s: '%s' is not a valid integer", opt, text);
    *out = (uint64_t)v;
    return CLI_OK;
}

int cli_u32(const cli_cmd *cmd, const char *opt, const char *text,
            uint32_t min, uint32_t max, uint32_t *out) {
    uint64_t v = 0;
    int rc;
    if (text == NULL) return CLI_OK;
    rc = cli_u64(cmd, opt, text, &v);
    if (rc != CLI_OK) return rc;
    if (v < min || v > max)
        return cli_usage_error(cmd, "%s: %s is out of range [%u, %u]", opt, text,
                               (unsigned)min, (unsigned)max);
    *out = (uint32_t)v;
    return CLI_OK;
}

int cli_double(const cli_cmd *cmd, const char *opt, const char *text, double *out) {
    char *end = NULL;
    double v;
    if (text == NULL) return CLI_OK;
    errno = 0;
    v = strtod(text, &end);
    if (end == text || *end != '\0' || errno == ERANGE || !isfinite(v))
        return cli_usage_error(cmd, "%s: '%s' is not a finite number", opt, text);
    *out = v;
    return CLI_OK;
}

/* ---- shared steps ---------------------------------------------------------- */

int tool_load_codebook(const char *path, cvq_codebook **cb, cvq_geometry *g) {
    cvq_status st = cvq_codebook_load(path, NULL, cb);
    if (st != CVQ_OK) return cli_lib_fail(st);
    st = cvq_codebook_geometry(*cb, g);
    if (st != CVQ_OK) {
        cvq_codebook_free(*cb);
        *cb = NULL;
        return cli_lib_fail(st);
    }
    return CLI_OK;
}

int tool_pick_layer(const cli_cmd *cmd, const char *text, const cvq_geometry *g,
                    uint32_t *layer) {
    if (text == NULL) {
        if (g->n_layers == 1) {
            *layer = 0;
            return CLI_OK;
        }
        return cli_usage_error(cmd,
                               "the codebook has %u layers: choose one with --layer N "
                               "(0..%u)",
                               (unsigned)g->n_layers, (unsigned)g->n_layers - 1);
    }
    return cli_u32(cmd, "--layer", text, 0, g->n_layers - 1, layer);
}

int tool_context(const cli_cmd *cmd, const char *backend, cvq_context **ctx) {
    cvq_context_params p = cvq_context_default_params();
    cvq_status st;
    if (backend != NULL) {
        if (cvq_backend_from_name(backend, &p.backend) != CVQ_OK)
            return cli_usage_error(cmd, "--backend: unknown backend '%s' (auto, cpu, "
                                        "cuda, vulkan)",
                                   backend);
    }
    st = cvq_context_create(&p, ctx);
    if (st != CVQ_OK) return cli_lib_fail(st);
    return CLI_OK;
}

void tool_tensor_free(tool_tensor *t) {
    if (t == NULL) return;
    npy_free(&t->npy);
    free(t->owned);
    memset(t, 0, sizeof *t);
}

int tool_read_tensor(const char *path, const char *what, uint32_t heads,
                     uint32_t d, int bf16, int need_f32, tool_tensor *out,
                     uint64_t *t) {
    char err[512];
    npy_array *a = &out->npy;
    uint64_t i;
    memset(out, 0, sizeof *out);
    if (npy_load(path, a, err, sizeof err) != 0) return cli_fail("%s", err);
    if (a->ndim != 3 || a->shape[1] != heads || a->shape[2] != d) {
        char got[160];
        size_t n = 0;
        uint32_t k;
        got[0] = '\0';
        for (k = 0; k < a->ndim && n < sizeof got - 24; k++)
            n += (size_t)snprintf(got + n, sizeof got - n, "%s%llu", k ? ", " : "",
                                  (unsigned long long)a->shape[k]);
        cli_fail("%s: %s must have shape [T, %u, %u], this file has [%s]", path, what,
                 (unsigned)heads, (unsigned)d, got);
        tool_tensor_free(out);
        return CLI_FAIL;
    }
    *t = a->shape[0];
    switch (a->dtype) {
    case NPY_F4:
        out->data = a->data;
        out->dtype = CVQ_F32;
        return CLI_OK;
    case NPY_F2:
    case NPY_U2:
        if (a->dtype == NPY_U2 && !bf16) {
            cli_fail("%s: %s are uint16: if these are bfloat16 bit patterns pass --bf16", path,
                     what);
            tool_tensor_free(out);
            return CLI_FAIL;
        }
        out->dtype = a->dtype == NPY_F2 ? CVQ_F16 : CVQ_BF16;
        out->data = a->data;
        if (need_f32 && a->count > 0) {
            const uint16_t *h = (const uint16_t *)a->data;
            out->owned = (float *)malloc((size_t)a->count * sizeof(float));
            if (out->owned == NULL) {
                tool_tensor_free(out);
                return cli_fail("out of memory");
            }
            for (i = 0; i < a->count; i++)
                out->owned[i] = out->dtype == CVQ_F16 ? cvq_f16_to_f32(h[i])
                                                      : cvq_bf16_to_f32(h[i]);
            out->data = out->owned;
            out->dtype = CVQ_F32;
        }
        return CLI_OK;
    case NPY_F8:
        if (a->count > 0) {
            const double *x = (const double *)a->data;
            out->owned = (float *)malloc((size_t)a->count * sizeof(float));
            if (out->owned == NULL) {
                tool_tensor_free(out);
                return cli_fail("out of memory");
            }
            for (i = 0; i < a->count; i++) {
                /* NaN and Inf pass through: the library rejects them */
                if (isfinite(x[i]) && fabs(x[i]) > 3.4028234663852886e38) {
                    cli_fail("%s: %s element %llu (%g) is out of float32 range", path, what,
                             (unsigned long long)i, x[i]);
                    tool_tensor_free(out);
                    return CLI_FAIL;
                }
                out->owned[i] = (float)x[i];
            }
        }
        out->data = out->owned;
        out->dtype = CVQ_F32;
        return CLI_OK;
    case NPY_U1:
    case NPY_I4:
        break;
    }
    cli_fail("%s: %s have dtype %s; expected float32, float16, float64 or (with --bf16) "
             "uint16",
             path, what, npy_dtype_name(a->dtype));
    tool_tensor_free(out);
    return CLI_FAIL;
}

int tool_save(const char *path, npy_dtype dtype, uint32_t ndim,
              const uint64_t *shape, const void *data) {
    char err[512];
    if (npy_save(path, dtype, ndim, shape, data, err, sizeof err) != 0)
        return cli_fail("%s", err);
    return CLI_OK;
}

int tool_make_dir(const char *dir) {
    struct stat sb;
    if (stat(dir, &sb) == 0) {
        if (S_ISDIR(sb.st_mode)) return CLI_OK;
        return cli_fail("%s exists and is not a directory", dir);
    }
    if (tool_mkdir(dir) != 0 && errno != EEXIST)
        return cli_fail("cannot create directory %s: %s", dir, strerror(errno));
    return CLI_OK;
}

int tool_join(char *buf, size_t cap, const char *dir, const char *name) {
    int n = snprintf(buf, cap, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= cap) return cli_fail("path too long: %s/%s", dir, name);
    return CLI_OK;
}
