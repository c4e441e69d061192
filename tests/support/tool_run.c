/* See tool_run.h. */
#define _POSIX_C_SOURCE 200809L
#include "tool_run.h"

#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

void tool_slurp(const char *path, char *buf, size_t cap) {
    FILE *f = fopen(path, "rb");
    size_t n = 0;
    buf[0] = '\0';
    if (f == NULL) return;
    n = fread(buf, 1, cap - 1, f);
    buf[n] = '\0';
    fclose(f);
}

int tool_run_v(tool_run *r, const char *tool, const char *dir, const char *fmt, va_list ap) {
    char args[4096], cmd[8192], outp[1200], errp[1200];
    vsnprintf(args, sizeof args, fmt, ap);
    snprintf(outp, sizeof outp, "%s/stdout.txt", dir);
    snprintf(errp, sizeof errp, "%s/stderr.txt", dir);
    snprintf(cmd, sizeof cmd, "'%s' %s >'%s' 2>'%s'", tool, args, outp, errp);
    const int rc = system(cmd);
    tool_slurp(outp, r->out, sizeof r->out);
    tool_slurp(errp, r->err, sizeof r->err);
    r->status = (rc != -1 && WIFEXITED(rc)) ? WEXITSTATUS(rc) : -1;
    if (r->status != 0)
        print_message("  [commvq %s] exit %d\n  stderr: %.2000s\n", args, r->status, r->err);
    return r->status;
}
