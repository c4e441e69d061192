/*
 * Shared pieces of the commvq command-line tool: option parsing, error
 * reporting, and the steps several subcommands share (loading a codebook,
 * choosing a layer, creating a context, reading K/V/Q tensors from .npy).
 *
 * Exit status of every subcommand: 0 success, 1 a failure (library status,
 * file, data), 2 a usage error (unknown option, missing or bad value).
 * Library failures print "commvq: <status name>: <cvq_last_error()>".
 */
#ifndef COMMVQ_TOOL_CLI_H
#define COMMVQ_TOOL_CLI_H

#include <stddef.h>
#include <stdint.h>

#include "commvq.h"
#include "npy.h"

#define CLI_OK 0
#define CLI_FAIL 1
#define CLI_USAGE 2
/* cli_parse only: --help was given and the usage has been printed. */
#define CLI_HELP 3

/* One option of a subcommand. The parser fills `value`: the argument of an
 * option that takes one, "1" for a flag that is present, NULL if absent. */
typedef struct cli_opt {
    const char *name;  /* "--out" */
    int takes_value;
    const char *value;
} cli_opt;

typedef struct cli_cmd {
    const char *name;     /* "encode" */
    const char *summary;  /* one line for `commvq --help` */
    const char *usage;    /* full help text of the subcommand */
    int (*run)(const struct cli_cmd *cmd, int argc, char **argv);
} cli_cmd;

/* Parses argv[0..argc) (the words after the subcommand name): "--name
 * value", "--name=value" and flags; "--" ends the options. Words that are
 * not options go to pos[0..max_pos). Returns CLI_OK, CLI_HELP (usage printed
 * to stdout) or CLI_USAGE (message printed). */
int cli_parse(const cli_cmd *cmd, int argc, char **argv, cli_opt *opts,
              size_t n_opts, const char **pos, size_t max_pos, size_t *n_pos);

/* Prints "commvq <cmd>: <message>" and a pointer to --help; returns
 * CLI_USAGE. */
int cli_usage_error(const cli_cmd *cmd, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* Prints "commvq: <message>"; returns CLI_FAIL. */
int cli_fail(const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;
/* cvq_last_error() without a leading "<status name>: " (the library may
 * add one); the status description when the message is empty. */
const char *cli_lib_message(cvq_status st);
/* Prints "commvq: <status name>: <cvq_last_error()>"; returns CLI_FAIL. */
int cli_lib_fail(cvq_status st);

/* Numeric option values; on a bad value print a usage error and return
 * CLI_USAGE. An absent option (text == NULL) leaves *out unchanged. */
int cli_u32(const cli_cmd *cmd, const char *opt, const char *text,
            uint32_t min, uint32_t max, uint32_t *out);
int cli_u64(const cli_cmd *cmd, const char *opt, const char *text, uint64_t *out);
int cli_double(const cli_cmd *cmd, const char *opt, const char *text, double *out);

/* Requires an option; usage error when absent. */
int cli_require(const cli_cmd *cmd, const cli_opt *o);

/* ---- shared steps --------------------------------------------------------- */

int tool_load_codebook(const char *path, cvq_codebook **cb, cvq_geometry *g);
/* --layer: defaults to 0 for a one-layer codebook, required otherwise. */
int tool_pick_layer(const cli_cmd *cmd, const char *text, const cvq_geometry *g,
                    uint32_t *layer);
/* --backend name (NULL = auto). */
int tool_context(const cli_cmd *cmd, const char *backend, cvq_context **ctx);

/* A tensor read from .npy and checked against an expected shape. */
typedef struct tool_tensor {
    npy_array npy;
    const void *data;  /* what to hand to the library */
    cvq_dtype dtype;   /* its dtype */
    float *owned;      /* converted copy (float64 input), or NULL */
} tool_tensor;

/* Reads keys/values/queries: shape [T][heads][d] with T free (and returned
 * in *t), heads and d given. Accepted: float32, float16, uint16 holding
 * bfloat16 bits when bf16 != 0, and float64 (rounded to float32; a finite
 * value out of float32 range is an error). When need_f32 != 0 the result is
 * converted to float32 (exactly, for float16 and bfloat16). */
int tool_read_tensor(const char *path, const char *what, uint32_t heads,
                     uint32_t d, int bf16, int need_f32, tool_tensor *out,
                     uint64_t *t);
void tool_tensor_free(tool_tensor *t);

/* Writes an .npy file; prints the error and returns CLI_FAIL on failure. */
int tool_save(const char *path, npy_dtype dtype, uint32_t ndim,
              const uint64_t *shape, const void *data);
/* Creates directory dir if absent (one level). */
int tool_make_dir(const char *dir);
/* dir + "/" + name into buf[cap]; CLI_FAIL if too long. */
int tool_join(char *buf, size_t cap, const char *dir, const char *name);

/* ---- subcommands -------------------------------------------------------- */

int cmd_info(const cli_cmd *cmd, int argc, char **argv);
int cmd_random_codebook(const cli_cmd *cmd, int argc, char **argv);
int cmd_export_codebook(const cli_cmd *cmd, int argc, char **argv);
int cmd_encode(const cli_cmd *cmd, int argc, char **argv);
int cmd_attend(const cli_cmd *cmd, int argc, char **argv);
int cmd_demo(const cli_cmd *cmd, int argc, char **argv);
/* tools/cmd_train.c */
int cmd_train_keys(const cli_cmd *cmd, int argc, char **argv);
int cmd_train_values(const cli_cmd *cmd, int argc, char **argv);
int cmd_extract_stages(const cli_cmd *cmd, int argc, char **argv);

#endif
