/*
 * Running the `commvq` tool from a test (test_tool, test_train_tool): the
 * command goes through the shell with stdout and stderr redirected to files
 * in a scratch folder (so stderr is not a terminal), and both are read back.
 */
#ifndef CVQ_TEST_TOOL_RUN_H
#define CVQ_TEST_TOOL_RUN_H

#include <stdarg.h>
#include <stddef.h>

typedef struct tool_run {
    int status;      /* exit status, or -1 if it did not exit normally */
    char out[16384]; /* stdout (truncated) */
    char err[65536]; /* stderr (truncated) */
} tool_run;

/* Reads up to cap-1 bytes of a file into buf (NUL-terminated; "" if absent). */
void tool_slurp(const char *path, char *buf, size_t cap);

/* Runs "'tool' <args>" (args formatted from fmt; already quoted where
 * needed) in the shell, output files in dir; fills *r and returns
 * r->status. A nonzero status is printed with the arguments and stderr. */
int tool_run_v(tool_run *r, const char *tool, const char *dir, const char *fmt, va_list ap);

#endif
