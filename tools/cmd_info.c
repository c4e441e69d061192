/*
 * commvq info: version, backends, devices with their capabilities, and the
 * choice of `auto`.
 */
#include <stdio.h>
#include <stdlib.h>

#include "cli.h"

static const char *device_type_name(cvq_device_type t) {
    switch (t) {
    case CVQ_DEVICE_CPU: return "cpu";
    case CVQ_DEVICE_DISCRETE_GPU: return "discrete gpu";
    case CVQ_DEVICE_INTEGRATED_GPU: return "integrated gpu";
    case CVQ_DEVICE_VIRTUAL_GPU: return "virtual gpu";
    case CVQ_DEVICE_SOFTWARE: return "software (gpu api on the cpu)";
    case CVQ_DEVICE_OTHER: return "other";
    }
    return "unknown";
}

static const char *exactness_name(cvq_exactness e) {
    switch (e) {
    case CVQ_EXACT_GUARANTEED: return "guaranteed (codes bit-identical to the cpu reference)";
    case CVQ_EXACT_TESTED: return "tested (codes equal on the conformance suite here)";
    case CVQ_EXACT_NOT_GUARANTEED: return "not guaranteed";
    }
    return "unknown";
}

/* "12.3 GiB"; "unknown" for 0, "no limit" for UINT64_MAX. */
static void format_bytes(uint64_t b, char *buf, size_t cap) {
    if (b == 0) {
        snprintf(buf, cap, "unknown");
    } else if (b == UINT64_MAX) {
        snprintf(buf, cap, "no limit");
    } else if (b >= (1ull << 40)) {
        snprintf(buf, cap, "%.1f TiB", (double)b / (double)(1ull << 40));
    } else if (b >= (1ull << 30)) {
        snprintf(buf, cap, "%.1f GiB", (double)b / (double)(1ull << 30));
    } else if (b >= (1ull << 20)) {
        snprintf(buf, cap, "%.1f MiB", (double)b / (double)(1ull << 20));
    } else {
        snprintf(buf, cap, "%llu bytes", (unsigned long long)b);
    }
}

static void print_device(const cvq_device_info *d) {
    char mem[32], maxbuf[32];
    format_bytes(d->memory_bytes, mem, sizeof mem);
    format_bytes(d->max_buffer_bytes, maxbuf, sizeof maxbuf);
    printf("  %s device %u: %s\n", cvq_backend_name(d->backend), (unsigned)d->index,
           d->name[0] ? d->name : "(unnamed)");
    printf("      type:          %s\n", device_type_name(d->type));
    printf("      usable:        %s\n", d->usable ? "yes" : "no");
    printf("      exactness:     %s\n", exactness_name(d->exactness));
    printf("      driver:        %s\n", d->driver[0] ? d->driver : "-");
    printf("      memory:        %s\n", mem);
    printf("      max buffer:    %s\n", maxbuf);
    if (d->shared_memory_bytes)
        printf("      shared memory: %u bytes per workgroup\n",
               (unsigned)d->shared_memory_bytes);
    else
        printf("      shared memory: n/a\n");
    if (d->subgroup_size)
        printf("      subgroup size: %u\n", (unsigned)d->subgroup_size);
    else
        printf("      subgroup size: n/a\n");
    printf("      compute units: %u\n", (unsigned)d->compute_units);
    if (d->note[0]) printf("      note:          %s\n", d->note);
}

int cmd_info(const cli_cmd *cmd, int argc, char **argv) {
    static const cvq_backend_kind kinds[] = {CVQ_BACKEND_CPU, CVQ_BACKEND_CUDA,
                                             CVQ_BACKEND_VULKAN};
    cli_opt opts[1] = {{"--_none", 0, NULL}};
    const char *pos[1];
    size_t n_pos, count = 0, i;
    cvq_device_info *devs = NULL;
    cvq_status st;
    cvq_context *ctx = NULL;
    cvq_context_params params;
    cvq_device_info got;
    const char *env;
    int rc = cli_parse(cmd, argc, argv, opts, 0, pos, 0, &n_pos);
    if (rc != CLI_OK) return rc;

    printf("commvq %s\n\nbackends:\n", cvq_version_string());
    for (i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        st = cvq_backend_available(kinds[i]);
        if (st == CVQ_OK)
            printf("  %-7s available\n", cvq_backend_name(kinds[i]));
        else
            printf("  %-7s not available: %s: %s\n", cvq_backend_name(kinds[i]),
                   cvq_status_name(st), cli_lib_message(st));
    }

    st = cvq_list_devices(NULL, 0, &count);
    if (st != CVQ_OK) return cli_lib_fail(st);
    printf("\ndevices (%zu):\n", count);
    if (count > 0) {
        size_t n2 = 0;
        devs = (cvq_device_info *)calloc(count, sizeof *devs);
        if (devs == NULL) return cli_fail("out of memory");
        st = cvq_list_devices(devs, count, &n2);
        if (st != CVQ_OK) {
            free(devs);
            return cli_lib_fail(st);
        }
        if (n2 < count) count = n2;
        for (i = 0; i < count; i++) print_device(&devs[i]);
        free(devs);
    }

    env = getenv("COMMVQ_BACKEND");
    printf("\nauto");
    if (env != NULL && env[0] != '\0') printf(" (COMMVQ_BACKEND=%s)", env);
    env = getenv("COMMVQ_DEVICE");
    if (env != NULL && env[0] != '\0') printf(" (COMMVQ_DEVICE=%s)", env);
    params = cvq_context_default_params();
    params.backend = CVQ_BACKEND_AUTO;
    st = cvq_context_create(&params, &ctx);
    if (st != CVQ_OK) {
        printf(": fails\n");
        fflush(stdout);
        return cli_lib_fail(st);
    }
    st = cvq_context_device(ctx, &got);
    if (st != CVQ_OK) {
        cvq_context_free(ctx);
        printf(": fails\n");
        fflush(stdout);
        return cli_lib_fail(st);
    }
    printf(" picks: %s device %u (%s)\n", cvq_backend_name(cvq_context_backend(ctx)),
           (unsigned)got.index, got.name);
    cvq_context_free(ctx);
    return CLI_OK;
}
