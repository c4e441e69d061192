/*
 * The `commvq` tool, run as a program (path in COMMVQ_TOOL, scratch folder
 * in COMMVQ_TEST_TMP, both set by tests/CMakeLists.txt):
 *   - random-codebook then export-codebook: manifest rows and .npy shapes
 *     against shapes worked out here from the geometry, tensor contents
 *     against the library's own random codebook of the same seed;
 *   - encode on .npy inputs against cvq_encode_keys/values called here on
 *     the same data: bit-exact (same library code path);
 *   - attend against cvq_cache_* called here: bit-exact (memcmp);
 *   - errors: --layer missing on a 2-layer file, truncated and malformed
 *     .npy files, non-finite input, usage errors (exit 2), info;
 *   - demo on a short cache: record sizes, and code-domain attention equal
 *     to attention over the decoded cache.
 *
 * The .npy files are read and written by a minimal reader/writer written
 * here, not by tools/npy.c, so the tool's file format is checked
 * independently.
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
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>

#include "commvq.h"
#include "tool_run.h"

static char g_tool[1024];
static char g_dir[1024];

/* ---- running the tool ------------------------------------------------------ */

static tool_run g_run;

/* Runs "<tool> <args>" (stderr redirected to a file: not a terminal). */
static int run_tool(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    const int rc = tool_run_v(&g_run, g_tool, g_dir, fmt, ap);
    va_end(ap);
    return rc;
}

/* A path in the scratch folder. Rotates over 8 buffers so that one
 * run_tool() call can take up to 8 of them. */
static const char *path_in(const char *name) {
    static char buf[8][1200];
    static int k = 0;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%s/%s", g_dir, name);
    return buf[k];
}

/* ---- minimal .npy reader and writer (independent of tools/npy.c) ------- */

typedef struct tnpy {
    char descr[8];
    int ndim;
    uint64_t shape[8];
    uint64_t count;
    unsigned char *data; /* malloc'd, file byte order (little-endian host) */
    size_t nbytes;
} tnpy;

static size_t descr_size(const char *d) {
    return (size_t)(d[2] - '0');
}

/* Reads a version 1.0 file as the tool writes it. Returns 0 on success. */
static int tnpy_read(const char *path, tnpy *a) {
    unsigned char pre[10];
    char hdr[4096];
    size_t hlen, es;
    const char *p;
    FILE *f = fopen(path, "rb");
    memset(a, 0, sizeof *a);
    if (f == NULL) return -1;
    if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY\x01\x00", 8) != 0) goto bad;
    hlen = (size_t)pre[8] | ((size_t)pre[9] << 8);
    if (hlen >= sizeof hdr || fread(hdr, 1, hlen, f) != hlen) goto bad;
    hdr[hlen] = '\0';
    /* the header is padded so that the data starts on a 64-byte boundary */
    if ((10 + hlen) % 64 != 0 || hdr[hlen - 1] != '\n') goto bad;
    p = strstr(hdr, "'descr': '");
    if (p == NULL) goto bad;
    memcpy(a->descr, p + 10, 3);
    a->descr[3] = '\0';
    if (strstr(hdr, "'fortran_order': False") == NULL) goto bad;
    p = strstr(hdr, "'shape': (");
    if (p == NULL) goto bad;
    p += 10;
    a->count = 1;
    while (*p != ')') {
        char *end;
        unsigned long long v = strtoull(p, &end, 10);
        if (end == p || a->ndim == 8) goto bad;
        a->shape[a->ndim++] = v;
        a->count *= v;
        p = end;
        while (*p == ',' || *p == ' ') p++;
    }
    es = descr_size(a->descr);
    a->nbytes = (size_t)a->count * es;
    a->data = (unsigned char *)malloc(a->nbytes + 1);
    if (a->data == NULL || fread(a->data, 1, a->nbytes, f) != a->nbytes) goto bad;
    if (fgetc(f) != EOF) goto bad; /* nothing after the data */
    fclose(f);
    return 0;
bad:
    fclose(f);
    free(a->data);
    a->data = NULL;
    return -1;
}

static void tnpy_free(tnpy *a) {
    free(a->data);
    a->data = NULL;
}

/* Asserts dtype and shape of a file read by tnpy_read. */
static void check_npy(const tnpy *a, const char *descr, int ndim, const uint64_t *shape) {
    int i;
    assert_string_equal(a->descr, descr);
    assert_int_equal(a->ndim, ndim);
    for (i = 0; i < ndim; i++) assert_int_equal(a->shape[i], shape[i]);
}

static void read_npy(const char *path, tnpy *a) {
    if (tnpy_read(path, a) != 0) fail_msg("cannot read %s with the test's .npy reader", path);
}

/* Writes a version 1.0 file with a header padded to 16 bytes (numpy's
 * older alignment, to show the tool does not depend on 64). */
static void tnpy_write(const char *path, const char *descr, int ndim, const uint64_t *shape,
                       const void *data, size_t nbytes) {
    char dict[512];
    unsigned char pre[10];
    size_t n, total;
    int i;
    FILE *f;
    n = (size_t)snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': (",
                         descr);
    for (i = 0; i < ndim; i++)
        n += (size_t)snprintf(dict + n, sizeof dict - n, "%llu,%s",
                              (unsigned long long)shape[i], i + 1 < ndim ? " " : "");
    n += (size_t)snprintf(dict + n, sizeof dict - n, "), }");
    total = (10 + n + 1 + 15) / 16 * 16;
    while (10 + n + 1 < total) dict[n++] = ' ';
    dict[n++] = '\n';
    memcpy(pre, "\x93NUMPY\x01\x00", 8);
    pre[8] = (unsigned char)(n & 0xff);
    pre[9] = (unsigned char)(n >> 8);
    f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(pre, 1, 10, f), 10);
    assert_int_equal(fwrite(dict, 1, n, f), n);
    if (nbytes) assert_int_equal(fwrite(data, 1, nbytes, f), nbytes);
    assert_int_equal(fclose(f), 0);
}

/* ---- data ------------------------------------------------------------------ */

static uint64_t rng_s;
static double rnd_normal(void) {
    double u[2];
    int i;
    for (i = 0; i < 2; i++) {
        uint64_t z = (rng_s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        u[i] = ((double)(z >> 11) + 0.5) / 9007199254740992.0;
    }
    return sqrt(-2.0 * log(u[0])) * cos(6.283185307179586 * u[1]);
}

static float *normal_floats(size_t n, uint64_t seed) {
    float *x = (float *)malloc(n * sizeof *x);
    size_t i;
    assert_non_null(x);
    rng_s = seed;
    for (i = 0; i < n; i++) x[i] = (float)rnd_normal();
    return x;
}

/* The geometry every test uses for its 2-layer file: GQA ratio 3, head
 * scale, interleaved pairs, per-head value groups. */
#define G_L 2u
#define G_HQ 6u
#define G_HKV 2u
#define G_D 64u
#define G_R 3u
#define G_NC 64u
#define G_F 64u
#define G_I 128u /* min(2*Nc, 4096) */
#define G_GROUPS (G_HKV * G_D / G_F)
#define G_SEED 4242u

static const char g_cb_args[] =
    "--seed 4242 --layers 2 --hq 6 --hkv 2 --head-dim 64 --stages 3 --value-bits 64 "
    "--value-group 64 --pair-layout interleaved --key-scale head";

static cvq_geometry test_geometry(void) {
    cvq_geometry g;
    memset(&g, 0, sizeof g);
    g.n_layers = G_L;
    g.n_q_heads = G_HQ;
    g.n_kv_heads = G_HKV;
    g.head_dim = G_D;
    g.key_stages = G_R;
    g.key_scale = CVQ_KEY_SCALE_HEAD;
    g.pair_layout = CVQ_PAIRS_INTERLEAVED;
    g.value_group_width = G_F;
    g.value_bits = G_NC;
    return g;
}

static cvq_context *cpu_ctx(void) {
    cvq_context_params p = cvq_context_default_params();
    cvq_context *ctx = NULL;
    p.backend = CVQ_BACKEND_CPU;
    assert_int_equal(cvq_context_create(&p, &ctx), CVQ_OK);
    return ctx;
}

static void make_codebook_file(void) {
    static int done = 0;
    if (done) return;
    assert_int_equal(run_tool("random-codebook --out '%s' %s", path_in("cb2.cvq"), g_cb_args), 0);
    assert_non_null(strstr(g_run.out, "cb2.cvq"));
    assert_int_equal(run_tool("random-codebook --out '%s' --seed 5 --layers 1 --hq 4 --hkv 4 "
                              "--head-dim 64 --stages 2 --value-bits 128",
                              path_in("cb1.cvq")),
                     0);
    done = 1;
}

/* ---- info, help, usage ------------------------------------------------------- */

static void test_info(void **state) {
    (void)state;
    assert_int_equal(run_tool("info"), 0);
    assert_non_null(strstr(g_run.out, "cpu"));
    assert_non_null(strstr(g_run.out, "cuda"));
    assert_non_null(strstr(g_run.out, "vulkan"));
    assert_non_null(strstr(g_run.out, "auto"));
    assert_non_null(strstr(g_run.out, cvq_version_string()));
}

static void test_usage(void **state) {
    (void)state;
    assert_int_equal(run_tool("--help"), 0);
    assert_non_null(strstr(g_run.out, "encode"));
    assert_int_equal(run_tool("encode --help"), 0);
    assert_non_null(strstr(g_run.out, "--out-dir"));
    assert_int_equal(run_tool(""), 2);
    assert_int_equal(run_tool("no-such-command"), 2);
    assert_int_equal(run_tool("info --bogus"), 2);
    assert_non_null(strstr(g_run.err, "--bogus"));
    assert_int_equal(run_tool("encode --codebook x.cvq --keys k.npy --values v.npy"), 2);
    assert_non_null(strstr(g_run.err, "--out-dir"));
    assert_int_equal(run_tool("random-codebook --out x.cvq --seed 1"), 2);
    assert_int_equal(run_tool("random-codebook --out x.cvq --seed -1 --layers 1 --hq 1 --hkv 1 "
                              "--head-dim 64 --stages 1 --value-bits 8"),
                     2);
    assert_int_equal(run_tool("attend --q-pos abc"), 2);
    /* a bad geometry is the library's call: status name and exit 1 */
    assert_int_equal(run_tool("random-codebook --out '%s' --seed 1 --layers 1 --hq 2 --hkv 2 "
                              "--head-dim 63 --stages 1 --value-bits 8",
                              path_in("bad.cvq")),
                     1);
    assert_non_null(strstr(g_run.err, "commvq: CVQ_ERR_GEOMETRY: "));
    /* a missing file: the library's IO status */
    assert_int_equal(run_tool("export-codebook '%s' --npy-dir '%s'", path_in("missing.cvq"),
                              path_in("exp_missing")),
                     1);
    assert_non_null(strstr(g_run.err, "commvq: CVQ_ERR_"));
}

/* ---- random-codebook + export-codebook ------------------------------------- */

typedef struct expected_tensor {
    const char *name;
    cvq_tensor_id id;
    int ndim;
    uint64_t shape[6];
} expected_tensor;

static void test_export(void **state) {
    /* Shapes worked out from the method note: key_w [L][Hkv][R][64][P][2],
     * value tensors [L][groups][...] with W1 [I][F], W2 [2Nc][I], E [Nc][F]. */
    const expected_tensor want[] = {
        {"key_w", CVQ_T_KEY_W, 6, {G_L, G_HKV, G_R, 64, G_D / 2, 2}},
        {"val_ls", CVQ_T_VAL_LS, 3, {G_L, G_GROUPS, G_F}},
        {"val_ln_w", CVQ_T_VAL_LN_W, 3, {G_L, G_GROUPS, G_F}},
        {"val_ln_b", CVQ_T_VAL_LN_B, 3, {G_L, G_GROUPS, G_F}},
        {"val_w1", CVQ_T_VAL_W1, 4, {G_L, G_GROUPS, G_I, G_F}},
        {"val_b1", CVQ_T_VAL_B1, 3, {G_L, G_GROUPS, G_I}},
        {"val_w2", CVQ_T_VAL_W2, 4, {G_L, G_GROUPS, 2 * G_NC, G_I}},
        {"val_b2", CVQ_T_VAL_B2, 3, {G_L, G_GROUPS, 2 * G_NC}},
        {"val_E", CVQ_T_VAL_E, 4, {G_L, G_GROUPS, G_NC, G_F}},
    };
    cvq_geometry g = test_geometry();
    cvq_codebook *mine = NULL;
    double theta[G_D / 2], mytheta[G_D / 2];
    char manifest[8192], line[160], file[64];
    size_t i;
    uint32_t l, grp;
    tnpy a;
    (void)state;
    make_codebook_file();
    assert_int_equal(run_tool("export-codebook '%s' --npy-dir '%s'", path_in("cb2.cvq"),
                              path_in("exp")),
                     0);

    /* The same seed and geometry in process: the file holds exactly it. */
    assert_int_equal(cvq_rope_freqs_default(G_D, 10000.0, mytheta), CVQ_OK);
    assert_int_equal(cvq_codebook_random(&g, mytheta, G_SEED, NULL, &mine), CVQ_OK);

    tool_slurp(path_in("exp/manifest.tsv"), manifest, sizeof manifest);
    for (i = 0; i < sizeof want / sizeof want[0]; i++) {
        const expected_tensor *w = &want[i];
        size_t per;
        int k;
        /* manifest row: file, name, shape, dtype */
        char shape_text[128];
        size_t n = (size_t)snprintf(shape_text, sizeof shape_text, "[");
        for (k = 0; k < w->ndim; k++)
            n += (size_t)snprintf(shape_text + n, sizeof shape_text - n, "%s%llu",
                                  k ? ", " : "", (unsigned long long)w->shape[k]);
        snprintf(shape_text + n, sizeof shape_text - n, "]");
        snprintf(file, sizeof file, "%s.npy", w->name);
        snprintf(line, sizeof line, "%s\t%s\t", file, w->name);
        {
            const char *row = strstr(manifest, line);
            if (row == NULL) fail_msg("manifest.tsv has no row for %s", w->name);
            row += strlen(line);
            assert_memory_equal(row, shape_text, strlen(shape_text));
            row += strlen(shape_text);
            assert_memory_equal(row, "\tfloat32\t", 9);
            /* a meaning follows: at least a few characters */
            assert_true(strcspn(row + 9, "\n") > 5);
        }
        snprintf(line, sizeof line, "exp/%s", file);
        read_npy(path_in(line), &a);
        check_npy(&a, "<f4", w->ndim, w->shape);
        /* contents: layer by layer (group by group) equal to the library's */
        per = a.count / (G_L * (w->id == CVQ_T_KEY_W ? 1 : G_GROUPS));
        for (l = 0; l < G_L; l++) {
            for (grp = 0; grp < (w->id == CVQ_T_KEY_W ? 1u : G_GROUPS); grp++) {
                const float *src = NULL;
                size_t at = (l * (w->id == CVQ_T_KEY_W ? 1u : G_GROUPS) + grp) * per;
                assert_int_equal(cvq_codebook_tensor_cdata(mine, w->id, l, grp, &src), CVQ_OK);
                assert_memory_equal(a.data + at * 4, src, per * 4);
            }
        }
        tnpy_free(&a);
    }
    /* rope_theta: float64 [P]; theta_p = 10000^(-2p/d) computed here */
    assert_non_null(strstr(manifest, "rope_theta.npy\trope_theta\t[32]\tfloat64\t"));
    read_npy(path_in("exp/rope_theta.npy"), &a);
    {
        const uint64_t s[1] = {G_D / 2};
        check_npy(&a, "<f8", 1, s);
    }
    memcpy(theta, a.data, sizeof theta);
    for (i = 0; i < G_D / 2; i++) {
        double want_t = pow(10000.0, -2.0 * (double)i / (double)G_D);
        assert_true(fabs(theta[i] - want_t) <= 1e-15 * want_t);
    }
    tnpy_free(&a);

    /* geometry.tsv carries the geometry */
    tool_slurp(path_in("exp/geometry.tsv"), manifest, sizeof manifest);
    assert_non_null(strstr(manifest, "n_layers\t2\n"));
    assert_non_null(strstr(manifest, "n_q_heads\t6\n"));
    assert_non_null(strstr(manifest, "key_scale\thead\n"));
    assert_non_null(strstr(manifest, "pair_layout\tinterleaved\n"));
    assert_non_null(strstr(manifest, "value_groups\t2\n"));
    cvq_codebook_free(mine);
}

/* --fp16: every tensor stored as binary16, read back exactly: the exported
 * key_w is the fp32 random codebook rounded to fp16. */
static void test_export_fp16(void **state) {
    cvq_geometry g = test_geometry();
    cvq_codebook *mine = NULL;
    double theta[G_D / 2];
    const uint64_t want_shape[6] = {G_L, G_HKV, G_R, 64, G_D / 2, 2};
    size_t per = (size_t)G_HKV * G_R * 64 * (G_D / 2) * 2, i;
    uint32_t l;
    tnpy a;
    (void)state;
    assert_int_equal(run_tool("random-codebook --out '%s' %s --fp16", path_in("cb2h.cvq"),
                              g_cb_args),
                     0);
    assert_int_equal(run_tool("export-codebook '%s' --npy-dir '%s'", path_in("cb2h.cvq"),
                              path_in("exph")),
                     0);
    assert_int_equal(cvq_rope_freqs_default(G_D, 10000.0, theta), CVQ_OK);
    assert_int_equal(cvq_codebook_random(&g, theta, G_SEED, NULL, &mine), CVQ_OK);
    read_npy(path_in("exph/key_w.npy"), &a);
    check_npy(&a, "<f4", 6, want_shape);
    for (l = 0; l < G_L; l++) {
        const float *src = NULL;
        assert_int_equal(cvq_codebook_tensor_cdata(mine, CVQ_T_KEY_W, l, 0, &src), CVQ_OK);
        for (i = 0; i < per; i++) {
            float got, want = cvq_f16_to_f32(cvq_f32_to_f16(src[i]));
            memcpy(&got, a.data + (l * per + i) * 4, 4);
            if (memcmp(&got, &want, 4) != 0)
                fail_msg("key_w layer %u element %zu: %g, want %g", l, i, (double)got,
                         (double)want);
        }
    }
    tnpy_free(&a);
    cvq_codebook_free(mine);
}

/* ---- encode ------------------------------------------------------------------ */

/* Runs `encode` on keys/values (written in `descr`) and compares its four
 * outputs with the library called here. raw_k/raw_v hold the file's bytes;
 * lib_k/lib_v and dt are what the library gets in process. */
static void encode_and_compare(const char *cb, uint32_t layer, int pass_layer, uint32_t T,
                               uint32_t hkv, uint32_t R, uint32_t nc, uint32_t groups,
                               int head_scale, const char *descr, const void *raw_k,
                               const void *raw_v, size_t es, const void *lib_k,
                               const void *lib_v, cvq_dtype dt, const char *extra) {
    cvq_codebook *book = NULL;
    cvq_context *ctx = cpu_ctx();
    uint64_t shape[3] = {T, hkv, G_D};
    size_t n_kv = (size_t)T * hkv * G_D;
    uint16_t *codes = (uint16_t *)malloc((size_t)T * hkv * R * 2);
    float *ks = (float *)malloc((size_t)T * hkv * 4);
    uint8_t *bits = (uint8_t *)malloc((size_t)T * groups * nc / 8);
    float *sig = (float *)malloc((size_t)T * groups * 4);
    uint32_t t, grp, i;
    tnpy a;
    assert_true(codes && ks && bits && sig);

    tnpy_write(path_in("in_k.npy"), descr, 3, shape, raw_k, n_kv * es);
    tnpy_write(path_in("in_v.npy"), descr, 3, shape, raw_v, n_kv * es);
    if (pass_layer)
        assert_int_equal(run_tool("encode --codebook '%s' --layer %u --keys '%s' --values '%s' "
                                  "--out-dir '%s' --backend cpu %s",
                                  path_in(cb), (unsigned)layer, path_in("in_k.npy"),
                                  path_in("in_v.npy"), path_in("enc"), extra),
                         0);
    else
        assert_int_equal(run_tool("encode --codebook '%s' --keys '%s' --values '%s' "
                                  "--out-dir '%s' %s",
                                  path_in(cb), path_in("in_k.npy"), path_in("in_v.npy"),
                                  path_in("enc"), extra),
                         0);

    assert_int_equal(cvq_codebook_load(path_in(cb), NULL, &book), CVQ_OK);
    assert_int_equal(cvq_encode_keys(ctx, book, layer, lib_k, dt, T, codes, ks), CVQ_OK);
    assert_int_equal(cvq_encode_values(ctx, book, layer, lib_v, dt, T, bits, sig), CVQ_OK);

    read_npy(path_in("enc/key_codes.npy"), &a);
    {
        const uint64_t s[3] = {T, hkv, R};
        check_npy(&a, "<u2", 3, s);
    }
    assert_memory_equal(a.data, codes, (size_t)T * hkv * R * 2);
    for (i = 0; i < a.count; i++) assert_true(((const uint16_t *)(void *)a.data)[i] < 4096);
    tnpy_free(&a);

    read_npy(path_in("enc/key_scale.npy"), &a);
    {
        const uint64_t s[2] = {T, hkv};
        check_npy(&a, "<f4", head_scale ? 2 : 1, s);
    }
    assert_memory_equal(a.data, ks, (size_t)T * (head_scale ? hkv : 1) * 4);
    tnpy_free(&a);

    /* value_bits: one 0/1 byte per bit; the library packs bit i of a group
     * at byte i/8, bit i%8 */
    read_npy(path_in("enc/value_bits.npy"), &a);
    {
        const uint64_t s[3] = {T, groups, nc};
        check_npy(&a, "|u1", 3, s);
    }
    for (t = 0; t < T; t++)
        for (grp = 0; grp < groups; grp++)
            for (i = 0; i < nc; i++) {
                const uint8_t *pk = bits + ((size_t)t * groups + grp) * (nc / 8);
                uint8_t want = (uint8_t)((pk[i / 8] >> (i % 8)) & 1u);
                uint8_t got = a.data[((size_t)t * groups + grp) * nc + i];
                if (got != want)
                    fail_msg("value bit t=%u group=%u i=%u: tool %u, library %u", t, grp, i,
                             got, want);
            }
    tnpy_free(&a);

    read_npy(path_in("enc/value_scale.npy"), &a);
    {
        const uint64_t s[2] = {T, groups};
        check_npy(&a, "<f4", 2, s);
    }
    assert_memory_equal(a.data, sig, (size_t)T * groups * 4);
    tnpy_free(&a);

    free(codes);
    free(ks);
    free(bits);
    free(sig);
    cvq_codebook_free(book);
    cvq_context_free(ctx);
}

static void test_encode_f32(void **state) {
    const uint32_t T = 37;
    size_t n = (size_t)T * G_HKV * G_D;
    float *k = normal_floats(n, 11), *v = normal_floats(n, 12);
    (void)state;
    make_codebook_file();
    /* a zero key and a tiny one: scale 0 / underflow paths go through too */
    memset(k + 5 * G_HKV * G_D, 0, G_HKV * G_D * sizeof(float));
    k[7 * G_HKV * G_D + 3] = 1e-30f;
    encode_and_compare("cb2.cvq", 1, 1, T, G_HKV, G_R, G_NC, G_GROUPS, 1, "<f4", k, v, 4, k, v,
                       CVQ_F32, "");
    free(k);
    free(v);
}

/* Whole output files of `encode` on the Vulkan backend equal the CPU's
 * byte for byte (issue 3's "same bytes" check); skipped, visibly, without
 * a Vulkan device. */
static int read_whole(const char *path, unsigned char **data, long *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    fseek(f, 0, SEEK_END);
    *size = ftell(f);
    fseek(f, 0, SEEK_SET);
    *data = (unsigned char *)malloc((size_t)*size + 1);
    int ok = *data && fread(*data, 1, (size_t)*size, f) == (size_t)*size;
    fclose(f);
    return ok;
}

static void test_encode_vulkan_same_bytes(void **state) {
    const uint32_t T = 29;
    const size_t n = (size_t)T * G_HKV * G_D;
    const char *files[] = {"key_codes.npy", "key_scale.npy", "value_bits.npy", "value_scale.npy"};
    (void)state;
    if (cvq_backend_available(CVQ_BACKEND_VULKAN) != CVQ_OK) {
        print_message("  skip: no Vulkan device (%s)\n", cvq_last_error());
        skip();
    }
    float *k = normal_floats(n, 21), *v = normal_floats(n, 22);
    uint64_t shape[3] = {T, G_HKV, G_D};
    make_codebook_file();
    k[3] = 1e-41f; /* a subnormal component goes through too */
    tnpy_write(path_in("vk_k.npy"), "<f4", 3, shape, k, n * 4);
    tnpy_write(path_in("vk_v.npy"), "<f4", 3, shape, v, n * 4);
    const char *backends[] = {"cpu", "vulkan"};
    for (int b = 0; b < 2; b++) {
        char dir[32];
        snprintf(dir, sizeof dir, "vk_out_%s", backends[b]);
        assert_int_equal(run_tool("encode --codebook '%s' --layer 1 --keys '%s' --values '%s' "
                                  "--out-dir '%s' --backend %s",
                                  path_in("cb2.cvq"), path_in("vk_k.npy"), path_in("vk_v.npy"),
                                  path_in(dir), backends[b]),
                         0);
    }
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char a_name[64], b_name[64];
        unsigned char *a = NULL, *b = NULL;
        long na = 0, nb = 0;
        snprintf(a_name, sizeof a_name, "vk_out_cpu/%s", files[i]);
        snprintf(b_name, sizeof b_name, "vk_out_vulkan/%s", files[i]);
        assert_true(read_whole(path_in(a_name), &a, &na));
        assert_true(read_whole(path_in(b_name), &b, &nb));
        assert_int_equal(na, nb);
        if (memcmp(a, b, (size_t)na) != 0) fail_msg("%s differs between cpu and vulkan", files[i]);
        free(a);
        free(b);
    }
    free(k);
    free(v);
}

static void test_encode_f16_bf16_f64(void **state) {
    const uint32_t T = 19;
    size_t n = (size_t)T * G_HKV * G_D, i;
    float *k = normal_floats(n, 21), *v = normal_floats(n, 22);
    uint16_t *kh = (uint16_t *)malloc(n * 2), *vh = (uint16_t *)malloc(n * 2);
    double *kd = (double *)malloc(n * 8), *vd = (double *)malloc(n * 8);
    (void)state;
    assert_true(kh && vh && kd && vd);
    make_codebook_file();
    for (i = 0; i < n; i++) {
        kh[i] = cvq_f32_to_f16(k[i]);
        vh[i] = cvq_f32_to_f16(v[i]);
    }
    /* float16 file: the library converts in both cases */
    encode_and_compare("cb2.cvq", 0, 1, T, G_HKV, G_R, G_NC, G_GROUPS, 1, "<f2", kh, vh, 2, kh,
                       vh, CVQ_F16, "");
    /* bfloat16 bits in a uint16 file with --bf16 */
    for (i = 0; i < n; i++) {
        uint32_t bk, bv;
        memcpy(&bk, &k[i], 4);
        memcpy(&bv, &v[i], 4);
        kh[i] = (uint16_t)(bk >> 16); /* truncation: any bf16 pattern will do */
        vh[i] = (uint16_t)(bv >> 16);
    }
    encode_and_compare("cb2.cvq", 1, 1, T, G_HKV, G_R, G_NC, G_GROUPS, 1, "<u2", kh, vh, 2, kh,
                       vh, CVQ_BF16, "--bf16");
    /* float64 holding float32 values: rounding is exact, same codes */
    for (i = 0; i < n; i++) {
        kd[i] = k[i];
        vd[i] = v[i];
    }
    encode_and_compare("cb2.cvq", 1, 1, T, G_HKV, G_R, G_NC, G_GROUPS, 1, "<f8", kd, vd, 8, k, v,
                       CVQ_F32, "");
    free(k);
    free(v);
    free(kh);
    free(vh);
    free(kd);
    free(vd);
}

static void test_encode_one_layer_default(void **state) {
    /* cb1: 1 layer, Hkv = 4, R = 2, Nc = 128 over all 4 heads, token scale;
     * --layer may be omitted */
    const uint32_t T = 9, hkv = 4;
    size_t n = (size_t)T * hkv * G_D;
    float *k = normal_floats(n, 31), *v = normal_floats(n, 32);
    (void)state;
    make_codebook_file();
    encode_and_compare("cb1.cvq", 0, 0, T, hkv, 2, 128, 1, 0, "<f4", k, v, 4, k, v, CVQ_F32, "");
    free(k);
    free(v);
}

/* ---- attend ------------------------------------------------------------------ */

static void attend_case(uint32_t T, uint32_t n_q, uint32_t q_pos, uint32_t window,
                        uint32_t sinks, uint32_t layer, int rotated) {
    size_t n_kv = (size_t)T * G_HKV * G_D, n_qe = (size_t)n_q * G_HQ * G_D, i;
    float *k = normal_floats(n_kv, 41 + T), *v = normal_floats(n_kv, 42 + T);
    float *q = normal_floats(n_qe, 43 + T);
    float *want = (float *)malloc(n_qe * 4 + 4);
    int32_t *kp = (int32_t *)malloc(T * 4 + 4), *qp = (int32_t *)malloc(n_q * 4 + 4);
    uint64_t ks[3] = {T, G_HKV, G_D}, qs[3] = {n_q, G_HQ, G_D};
    cvq_codebook *book = NULL;
    cvq_context *ctx = cpu_ctx();
    cvq_cache *cache = NULL;
    cvq_cache_params cp = cvq_cache_default_params();
    tnpy a;
    assert_true(want && kp && qp);

    tnpy_write(path_in("at_k.npy"), "<f4", 3, ks, k, n_kv * 4);
    tnpy_write(path_in("at_v.npy"), "<f4", 3, ks, v, n_kv * 4);
    tnpy_write(path_in("at_q.npy"), "<f4", 3, qs, q, n_qe * 4);
    assert_int_equal(run_tool("attend --codebook '%s' --layer %u --keys '%s' --values '%s' "
                              "--queries '%s' --q-pos %u --window %u --sinks %u --backend cpu "
                              "--out '%s' %s",
                              path_in("cb2.cvq"), (unsigned)layer, path_in("at_k.npy"),
                              path_in("at_v.npy"), path_in("at_q.npy"), (unsigned)q_pos,
                              (unsigned)window, (unsigned)sinks, path_in("at_o.npy"),
                              rotated ? "--queries-rotated" : ""),
                     0);

    /* the same in process */
    for (i = 0; i < T; i++) kp[i] = (int32_t)i;
    for (i = 0; i < n_q; i++) qp[i] = (int32_t)(q_pos + i);
    cp.layer = layer;
    cp.window = window;
    cp.sinks = sinks;
    assert_int_equal(cvq_codebook_load(path_in("cb2.cvq"), NULL, &book), CVQ_OK);
    assert_int_equal(cvq_cache_create(ctx, book, &cp, &cache), CVQ_OK);
    assert_int_equal(cvq_cache_append(cache, k, v, CVQ_F32, kp, T), CVQ_OK);
    assert_int_equal(cvq_cache_attend(cache, q, qp, n_q, rotated ? CVQ_ATTEND_QUERIES_ROTATED : 0u,
                                      want),
                     CVQ_OK);

    read_npy(path_in("at_o.npy"), &a);
    check_npy(&a, "<f4", 3, qs);
    for (i = 0; i < n_qe; i++) assert_true(isfinite(want[i]));
    /* same library code path on the same data: bit-identical */
    assert_memory_equal(a.data, want, n_qe * 4);
    tnpy_free(&a);

    cvq_cache_free(cache);
    cvq_codebook_free(book);
    cvq_context_free(ctx);
    free(k);
    free(v);
    free(q);
    free(want);
    free(kp);
    free(qp);
}

static void test_attend(void **state) {
    (void)state;
    make_codebook_file();
    /* sinks, compressed blocks and a window; the first query sees only
     * part of the tokens (causal) */
    attend_case(45, 3, 40, 8, 2, 1, 0);
    /* W = 0, S = 0: every token compressed on arrival */
    attend_case(20, 2, 19, 0, 0, 0, 0);
    /* queries already rotated, positions beyond the last token */
    attend_case(30, 4, 100, 16, 0, 1, 1);
}

/* ---- errors -------------------------------------------------------------------- */

static void write_kv(uint32_t T, const char *kname, const char *vname, uint64_t seed) {
    size_t n = (size_t)T * G_HKV * G_D;
    float *k = normal_floats(n, seed), *v = normal_floats(n, seed + 1);
    uint64_t s[3] = {T, G_HKV, G_D};
    tnpy_write(path_in(kname), "<f4", 3, s, k, n * 4);
    tnpy_write(path_in(vname), "<f4", 3, s, v, n * 4);
    free(k);
    free(v);
}

static int exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

static void test_errors(void **state) {
    FILE *f;
    unsigned char buf[8192];
    size_t n;
    (void)state;
    make_codebook_file();
    write_kv(12, "e_k.npy", "e_v.npy", 51);

    /* --layer required on a 2-layer file */
    assert_true(run_tool("encode --codebook '%s' --keys '%s' --values '%s' --out-dir '%s'",
                         path_in("cb2.cvq"), path_in("e_k.npy"), path_in("e_v.npy"),
                         path_in("e_out1")) != 0);
    assert_non_null(strstr(g_run.err, "--layer"));
    assert_false(exists(path_in("e_out1")));
    assert_true(run_tool("attend --codebook '%s' --keys '%s' --values '%s' --queries '%s' "
                         "--q-pos 0 --out '%s'",
                         path_in("cb2.cvq"), path_in("e_k.npy"), path_in("e_v.npy"),
                         path_in("e_k.npy"), path_in("e_o.npy")) != 0);
    assert_non_null(strstr(g_run.err, "--layer"));
    /* a layer out of range */
    assert_true(run_tool("encode --codebook '%s' --layer 2 --keys '%s' --values '%s' "
                         "--out-dir '%s'",
                         path_in("cb2.cvq"), path_in("e_k.npy"), path_in("e_v.npy"),
                         path_in("e_out1")) != 0);

    /* a truncated .npy: header intact, data cut short */
    f = fopen(path_in("e_k.npy"), "rb");
    assert_non_null(f);
    n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    assert_true(n > 600);
    f = fopen(path_in("e_trunc.npy"), "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(buf, 1, 600, f), 600);
    fclose(f);
    assert_int_equal(run_tool("encode --codebook '%s' --layer 0 --keys '%s' --values '%s' "
                              "--out-dir '%s'",
                              path_in("cb2.cvq"), path_in("e_trunc.npy"), path_in("e_v.npy"),
                              path_in("e_out2")),
                     1);
    assert_non_null(strstr(g_run.err, "truncated"));
    assert_non_null(strstr(g_run.err, "e_trunc.npy"));
    assert_false(exists(path_in("e_out2")));
    /* truncated inside the header */
    f = fopen(path_in("e_trunc.npy"), "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(buf, 1, 40, f), 40);
    fclose(f);
    assert_int_equal(run_tool("encode --codebook '%s' --layer 0 --keys '%s' --values '%s' "
                              "--out-dir '%s'",
                              path_in("cb2.cvq"), path_in("e_trunc.npy"), path_in("e_v.npy"),
                              path_in("e_out2")),
                     1);
    assert_non_null(strstr(g_run.err, "truncated"));
    /* not a .npy at all */
    f = fopen(path_in("e_junk.npy"), "wb");
    assert_non_null(f);
    fputs("this is not numpy data at all, just text\n", f);
    fclose(f);
    assert_int_equal(run_tool("encode --codebook '%s' --layer 0 --keys '%s' --values '%s' "
                              "--out-dir '%s'",
                              path_in("cb2.cvq"), path_in("e_junk.npy"), path_in("e_v.npy"),
                              path_in("e_out2")),
                     1);
    assert_non_null(strstr(g_run.err, "not a .npy"));

    /* non-finite input: the library's status, nothing written */
    {
        size_t nn = (size_t)12 * G_HKV * G_D;
        float *k = normal_floats(nn, 61);
        uint64_t s[3] = {12, G_HKV, G_D};
        k[100] = INFINITY;
        tnpy_write(path_in("e_inf.npy"), "<f4", 3, s, k, nn * 4);
        free(k);
    }
    assert_int_equal(run_tool("encode --codebook '%s' --layer 0 --keys '%s' --values '%s' "
                              "--out-dir '%s'",
                              path_in("cb2.cvq"), path_in("e_inf.npy"), path_in("e_v.npy"),
                              path_in("e_out3")),
                     1);
    assert_non_null(strstr(g_run.err, "commvq: CVQ_ERR_NONFINITE_INPUT: "));
    assert_false(exists(path_in("e_out3/key_codes.npy")));
    assert_int_equal(run_tool("attend --codebook '%s' --layer 0 --keys '%s' --values '%s' "
                              "--queries '%s' --q-pos 0 --out '%s'",
                              path_in("cb2.cvq"), path_in("e_k.npy"), path_in("e_inf.npy"),
                              path_in("e_k.npy"), path_in("e_o3.npy")),
                     1);

    /* wrong shape: queries handed as keys ([T, Hq, d] with Hq != Hkv) */
    {
        size_t nn = (size_t)3 * G_HQ * G_D;
        float *q = normal_floats(nn, 71);
        uint64_t s[3] = {3, G_HQ, G_D};
        tnpy_write(path_in("e_q.npy"), "<f4", 3, s, q, nn * 4);
        free(q);
    }
    assert_int_equal(run_tool("encode --codebook '%s' --layer 0 --keys '%s' --values '%s' "
                              "--out-dir '%s'",
                              path_in("cb2.cvq"), path_in("e_q.npy"), path_in("e_v.npy"),
                              path_in("e_out4")),
                     1);
    assert_non_null(strstr(g_run.err, "shape"));
    /* keys and values with different token counts */
    write_kv(5, "e_k5.npy", "e_v5.npy", 81);
    assert_int_equal(run_tool("encode --codebook '%s' --layer 0 --keys '%s' --values '%s' "
                              "--out-dir '%s'",
                              path_in("cb2.cvq"), path_in("e_k.npy"), path_in("e_v5.npy"),
                              path_in("e_out4")),
                     1);
    /* uint16 without --bf16, and an unsupported dtype */
    {
        uint16_t z[12 * G_HKV * G_D];
        int32_t zi[12 * G_HKV * G_D];
        uint64_t s[3] = {12, G_HKV, G_D};
        memset(z, 0, sizeof z);
        memset(zi, 0, sizeof zi);
        tnpy_write(path_in("e_u2.npy"), "<u2", 3, s, z, sizeof z);
        tnpy_write(path_in("e_i4.npy"), "<i4", 3, s, zi, sizeof zi);
    }
    assert_int_equal(run_tool("encode --codebook '%s' --layer 0 --keys '%s' --values '%s' "
                              "--out-dir '%s'",
                              path_in("cb2.cvq"), path_in("e_u2.npy"), path_in("e_v.npy"),
                              path_in("e_out4")),
                     1);
    assert_non_null(strstr(g_run.err, "--bf16"));
    assert_int_equal(run_tool("encode --codebook '%s' --layer 0 --keys '%s' --values '%s' "
                              "--out-dir '%s'",
                              path_in("cb2.cvq"), path_in("e_i4.npy"), path_in("e_v.npy"),
                              path_in("e_out4")),
                     1);
    /* a backend that is not there: an error, never a fallback */
    if (cvq_backend_available(CVQ_BACKEND_VULKAN) != CVQ_OK) {
        assert_int_equal(run_tool("encode --codebook '%s' --layer 0 --keys '%s' --values '%s' "
                                  "--out-dir '%s' --backend vulkan",
                                  path_in("cb2.cvq"), path_in("e_k.npy"), path_in("e_v.npy"),
                                  path_in("e_out5")),
                         1);
        assert_non_null(strstr(g_run.err, "commvq: CVQ_ERR_"));
    }
    assert_int_equal(run_tool("encode --codebook '%s' --layer 0 --keys '%s' --values '%s' "
                              "--out-dir '%s' --backend nosuch",
                              path_in("cb2.cvq"), path_in("e_k.npy"), path_in("e_v.npy"),
                              path_in("e_out5")),
                     2);
}

/* ---- demo ------------------------------------------------------------------------ */

/* The demo on a short cache (150 tokens: 22 compressed, 128 in the window).
 * Its table row for each codebook: bytes per token and bits per element
 * against values worked out here from the record format, and the error
 * against the decoded cache at float rounding level. */
static void test_demo(void **state) {
    static const struct {
        const char *name;
        unsigned R, Nc;
    } cfg[2] = {{"1-bit", 11, 1024}, {"2-bit", 21, 2048}};
    int c;
    (void)state;
    assert_int_equal(run_tool("demo --backend cpu --tokens 150 --seed 3"), 0);
    assert_non_null(strstr(g_run.out, "a random codebook does not preserve keys and values"));
    for (c = 0; c < 2; c++) {
        /* LLaMA-3.1-8B layer: Hkv = 8, d = 128, one value group of 1024 dims;
         * key codes at 12 bits, value bits, 2 fp32 scales */
        unsigned code_bits = 12u * 8u * cfg[c].R + cfg[c].Nc;
        unsigned want_bytes = (12u * 8u * cfg[c].R + 7u) / 8u + cfg[c].Nc / 8u + 8u;
        double want_bpe = (double)(code_bits + 64u) / (2.0 * 8.0 * 128.0);
        char key[32], backend[16], codes[16];
        unsigned bytes;
        double ratio, bpe, mib, err_dec, err_fp16;
        const char *row;
        snprintf(key, sizeof key, "\ncpu     %s", cfg[c].name);
        row = strstr(g_run.out, key);
        if (row == NULL) fail_msg("no demo row for cpu %s:\n%s", cfg[c].name, g_run.out);
        assert_int_equal(sscanf(row + 1, "%15s %15s %u %lfx %lf %lf %lf %lf", backend, codes,
                                &bytes, &ratio, &bpe, &mib, &err_dec, &err_fp16),
                         8);
        assert_int_equal(bytes, want_bytes);
        assert_true(fabs(bpe - want_bpe) < 0.0005);
        assert_true(fabs(ratio - 4096.0 / want_bytes) < 0.05);
        /* code-domain attention = attention over the decoded cache */
        assert_true(err_dec < 1e-5);
        /* a random codebook is far from the original K/V */
        assert_true(err_fp16 > 1e-2);
    }
}

/* ---- main ------------------------------------------------------------------------ */

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_info),
        cmocka_unit_test(test_usage),
        cmocka_unit_test(test_export),
        cmocka_unit_test(test_export_fp16),
        cmocka_unit_test(test_encode_f32),
        cmocka_unit_test(test_encode_vulkan_same_bytes),
        cmocka_unit_test(test_encode_f16_bf16_f64),
        cmocka_unit_test(test_encode_one_layer_default),
        cmocka_unit_test(test_attend),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_demo),
    };
    const char *tool = getenv("COMMVQ_TOOL");
    const char *tmp = getenv("COMMVQ_TEST_TMP");
    if (tool == NULL || tool[0] == '\0' || tmp == NULL || tmp[0] == '\0') {
        fprintf(stderr, "test_tool: COMMVQ_TOOL and COMMVQ_TEST_TMP must be set (ctest sets "
                        "them)\n");
        return 1;
    }
    if (strchr(tool, '\'') || strchr(tmp, '\'')) {
        fprintf(stderr, "test_tool: paths with a quote are not supported\n");
        return 1;
    }
    snprintf(g_tool, sizeof g_tool, "%s", tool);
    snprintf(g_dir, sizeof g_dir, "%s/test_tool_files", tmp);
    {
        /* start from an empty folder: some checks test that nothing was
         * written */
        char cmd[1200];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
        if (system(cmd) != 0) fprintf(stderr, "test_tool: could not clear %s\n", g_dir);
    }
    if (mkdir(g_dir, 0777) != 0) {
        fprintf(stderr, "test_tool: cannot create %s\n", g_dir);
        return 1;
    }
    return cmocka_run_group_tests(tests, NULL, NULL);
}
