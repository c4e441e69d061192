/*
 * `commvq train-keys`, `train-values` and `extract-stages`, run as a
 * program (path in COMMVQ_TOOL, scratch folder in COMMVQ_TEST_TMP, set by
 * tests/CMakeLists.txt):
 *   - train-keys on a data folder written here (own .npy writer): geometry
 *     taken from the files, key_w bit-identical to cvq_train_keys called
 *     here on the same data and parameters, other layers untouched with
 *     --layers, the note records the command and the runs, progress lines
 *     (plain, one per step, when stderr is not a terminal) and --quiet;
 *   - --init resume from --first-stage and --key-stages extension equal to
 *     one uninterrupted run; --fp16 output; bf16 input with --bf16;
 *   - extract-stages keeps exactly the first stages;
 *   - train-values runs and writes value tensors;
 *   - errors: usage (exit 2), non-finite data and mismatched pos.npy (1).
 * Without COMMVQ_TOOL (tools not built) every test is skipped.
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
#include "commvq_train.h"

static char g_tool[1024];
static char g_dir[1024];
static int g_have_tool;

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

static const char *path_in(const char *name) {
    static char buf[8][1200];
    static int k = 0;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%s/%s", g_dir, name);
    return buf[k];
}

/* A .npy writer of its own (version 1.0, header padded to 64 bytes). */
static void npy_write(const char *path, const char *descr, int ndim, const uint64_t *shape,
                      const void *data, size_t nbytes) {
    char dict[512];
    unsigned char pre[10];
    size_t n = (size_t)snprintf(dict, sizeof dict,
                                "{'descr': '%s', 'fortran_order': False, 'shape': (", descr);
    for (int i = 0; i < ndim; i++)
        n += (size_t)snprintf(dict + n, sizeof dict - n, "%llu,%s",
                              (unsigned long long)shape[i], i + 1 < ndim ? " " : "");
    n += (size_t)snprintf(dict + n, sizeof dict - n, "), }");
    const size_t total = (10 + n + 1 + 63) / 64 * 64;
    while (10 + n + 1 < total) dict[n++] = ' ';
    dict[n++] = '\n';
    memcpy(pre, "\x93NUMPY\x01\x00", 8);
    pre[8] = (unsigned char)(n & 0xff);
    pre[9] = (unsigned char)(n >> 8);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(pre, 1, 10, f), 10);
    assert_int_equal(fwrite(dict, 1, n, f), n);
    if (nbytes) assert_int_equal(fwrite(data, 1, nbytes, f), nbytes);
    assert_int_equal(fclose(f), 0);
}

/* ---- data ------------------------------------------------------------------ */

static uint64_t g_rng;
static double rnd_normal(void) {
    double u[2];
    for (int i = 0; i < 2; i++) {
        uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        u[i] = ((double)(z >> 11) + 0.5) / 9007199254740992.0;
    }
    return sqrt(-2.0 * log(u[0])) * cos(6.283185307179586 * u[1]);
}

#define T_TOK 700u
#define HKV 2u
#define HQ 4u
#define HD 64u

static float g_k[2][T_TOK * HKV * HD], g_v[2][T_TOK * HKV * HD], g_q[2][T_TOK * HQ * HD];

/* A folder with 2 layers of keys/values/queries (float32) and positions of
 * two sequences. Keys have an uneven spectrum so that training has work. */
static void write_folder(const char *dir) {
    mkdir(dir, 0777);
    g_rng = 1234;
    for (int l = 0; l < 2; l++) {
        for (size_t i = 0; i < T_TOK * HKV * HD; i++) {
            g_k[l][i] = (float)(rnd_normal() * (0.3 + (double)(i % HD) / HD));
            g_v[l][i] = (float)rnd_normal();
        }
        for (size_t i = 0; i < T_TOK * HQ * HD; i++) g_q[l][i] = (float)rnd_normal();
        char name[1200];
        const uint64_t sk[3] = {T_TOK, HKV, HD}, sq[3] = {T_TOK, HQ, HD};
        snprintf(name, sizeof name, "%s/k_%d.npy", dir, l);
        npy_write(name, "<f4", 3, sk, g_k[l], sizeof g_k[l]);
        snprintf(name, sizeof name, "%s/v_%d.npy", dir, l);
        npy_write(name, "<f4", 3, sk, g_v[l], sizeof g_v[l]);
        snprintf(name, sizeof name, "%s/q_%d.npy", dir, l);
        npy_write(name, "<f4", 3, sq, g_q[l], sizeof g_q[l]);
    }
    int32_t pos[T_TOK], ss[2] = {0, 300};
    for (uint32_t t = 0; t < T_TOK; t++) pos[t] = (int32_t)(t < 300 ? t : t - 300);
    char name[1200];
    const uint64_t sp[1] = {T_TOK}, sss[1] = {2};
    snprintf(name, sizeof name, "%s/pos.npy", dir);
    npy_write(name, "<i4", 1, sp, pos, sizeof pos);
    snprintf(name, sizeof name, "%s/seq_start.npy", dir);
    npy_write(name, "<i4", 1, sss, ss, sizeof ss);
}

static cvq_codebook *load(const char *path) {
    cvq_codebook *cb = NULL;
    cvq_status st = cvq_codebook_load(path, NULL, &cb);
    if (st != CVQ_OK) fail_msg("cannot load %s: %s", path, cvq_last_error());
    return cb;
}

static const float *key_w(const cvq_codebook *cb, uint32_t layer) {
    const float *p = NULL;
    assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_KEY_W, layer, 0, &p), CVQ_OK);
    return p;
}

static size_t key_w_count(const cvq_codebook *cb) {
    cvq_tensor_info ti;
    assert_int_equal(cvq_codebook_tensor_info(cb, CVQ_T_KEY_W, &ti), CVQ_OK);
    return (size_t)ti.n_elements;
}

/* The same training through the library: a zero codebook of the tool's
 * geometry, cvq_train_keys on the layer's data with the tool's defaults. */
static cvq_codebook *direct(const cvq_codebook *like, uint32_t layer, uint32_t steps,
                            uint64_t seed) {
    cvq_geometry g;
    double theta[64];
    assert_int_equal(cvq_codebook_geometry(like, &g), CVQ_OK);
    assert_int_equal(cvq_codebook_rope_theta(like, theta), CVQ_OK);
    cvq_codebook *cb = NULL;
    assert_int_equal(cvq_codebook_create(&g, theta, NULL, &cb), CVQ_OK);
    int32_t pos[T_TOK], ss[2] = {0, 300};
    for (uint32_t t = 0; t < T_TOK; t++) pos[t] = (int32_t)(t < 300 ? t : t - 300);
    cvq_train_data dd;
    memset(&dd, 0, sizeof dd);
    dd.n_tokens = T_TOK;
    dd.dtype = CVQ_F32;
    dd.keys = g_k[layer];
    dd.positions = pos;
    dd.seq_start = ss;
    dd.n_seq = 2;
    cvq_key_train_params kp = cvq_key_train_default_params();
    kp.steps = steps;
    kp.seed = seed;
    assert_int_equal(cvq_train_keys(cb, layer, &dd, &kp, NULL), CVQ_OK);
    return cb;
}

#define SKIP_WITHOUT_TOOL() \
    do {                    \
        if (!g_have_tool) { \
            skip();         \
        }                   \
    } while (0)

/* ---- tests ------------------------------------------------------------------ */

static void test_train_keys_basic(void **state) {
    (void)state;
    SKIP_WITHOUT_TOOL();
    const char *dir = path_in("data");
    write_folder(dir);
    assert_int_equal(run_tool("train-keys --data '%s' --out '%s' --key-stages 2 --value-bits 128 "
                              "--steps 4 --seed 9",
                              dir, path_in("k.cvq")),
                     0);
    /* progress: one plain line per step (stderr is a file) */
    assert_non_null(strstr(g_run.err, "keys head 1/2 stage 1/2 step 0/4 loss"));
    assert_non_null(strstr(g_run.err, "layer 1 (2/2) keys head 2/2 stage 2/2"));
    assert_null(strchr(g_run.err, '\r'));
    assert_non_null(strstr(g_run.out, "layer 0 keys: rel_error"));
    assert_non_null(strstr(g_run.out, "layer 1 keys: rel_error"));

    cvq_codebook *cb = load(path_in("k.cvq"));
    cvq_geometry g;
    assert_int_equal(cvq_codebook_geometry(cb, &g), CVQ_OK);
    assert_int_equal(g.n_layers, 2);
    assert_int_equal(g.n_q_heads, HQ);
    assert_int_equal(g.n_kv_heads, HKV);
    assert_int_equal(g.head_dim, HD);
    assert_int_equal(g.key_stages, 2);
    assert_int_equal(g.value_bits, 128);
    const char *note = cvq_codebook_note(cb);
    assert_non_null(strstr(note, "commvq train-keys --data"));
    assert_non_null(strstr(note, "train-keys layer 0:"));
    assert_non_null(strstr(note, "train-keys layer 1:"));
    assert_non_null(strstr(note, "seed 9"));
    for (uint32_t l = 0; l < 2; l++) {
        cvq_codebook *d = direct(cb, l, 4, 9);
        assert_memory_equal(key_w(cb, l), key_w(d, l), key_w_count(cb) * sizeof(float));
        cvq_codebook_free(d);
    }
    cvq_codebook_free(cb);

    /* --layers 1 --quiet --fp16: layer 0 stays zero, no progress */
    assert_int_equal(run_tool("train-keys --data '%s' --out '%s' --key-stages 2 --value-bits 128 "
                              "--steps 4 --seed 9 --layers 1 --quiet --fp16 --threads 1",
                              dir, path_in("k1.cvq")),
                     0);
    assert_null(strstr(g_run.err, "step"));
    cb = load(path_in("k1.cvq"));
    const size_t n = key_w_count(cb);
    for (size_t i = 0; i < n; i++) assert_true(key_w(cb, 0)[i] == 0.0f);
    cvq_codebook *d = direct(cb, 1, 4, 9);
    for (size_t i = 0; i < n; i++) /* fp16 storage rounds each value */
        assert_true(key_w(cb, 1)[i] == cvq_f16_to_f32(cvq_f32_to_f16(key_w(d, 1)[i])));
    cvq_codebook_free(d);
    cvq_codebook_free(cb);
}

static void test_resume_extend_extract(void **state) {
    (void)state;
    SKIP_WITHOUT_TOOL();
    const char *dir = path_in("data");
    /* one run of 3 stages */
    assert_int_equal(run_tool("train-keys --data '%s' --out '%s' --key-stages 3 --value-bits 128 "
                              "--steps 3 --quiet",
                              dir, path_in("r3.cvq")),
                     0);
    /* 1 stage, then extended to 3 with --init: the same bytes */
    assert_int_equal(run_tool("train-keys --data '%s' --out '%s' --key-stages 1 --value-bits 128 "
                              "--steps 3 --quiet",
                              dir, path_in("r1.cvq")),
                     0);
    assert_int_equal(run_tool("train-keys --data '%s' --init '%s' --key-stages 3 --out '%s' "
                              "--steps 3 --quiet",
                              dir, path_in("r1.cvq"), path_in("r13.cvq")),
                     0);
    /* 3 stages with only the first trained, then --first-stage 1 */
    assert_int_equal(run_tool("train-keys --data '%s' --out '%s' --key-stages 3 --value-bits 128 "
                              "--steps 3 --stages 1 --quiet",
                              dir, path_in("p.cvq")),
                     0);
    assert_int_equal(run_tool("train-keys --data '%s' --init '%s' --first-stage 1 --out '%s' "
                              "--steps 3 --quiet",
                              dir, path_in("p.cvq"), path_in("p2.cvq")),
                     0);
    cvq_codebook *a = load(path_in("r3.cvq")), *b = load(path_in("r13.cvq"));
    cvq_codebook *c = load(path_in("p2.cvq"));
    for (uint32_t l = 0; l < 2; l++) {
        assert_memory_equal(key_w(a, l), key_w(b, l), key_w_count(a) * sizeof(float));
        assert_memory_equal(key_w(a, l), key_w(c, l), key_w_count(a) * sizeof(float));
    }
    assert_non_null(strstr(cvq_codebook_note(b), "(resumed)"));

    /* extract-stages 2 of 3 */
    assert_int_equal(run_tool("extract-stages '%s' --stages 2 --out '%s'", path_in("r3.cvq"),
                              path_in("x2.cvq")),
                     0);
    cvq_codebook *x = load(path_in("x2.cvq"));
    cvq_geometry gx;
    assert_int_equal(cvq_codebook_geometry(x, &gx), CVQ_OK);
    assert_int_equal(gx.key_stages, 2);
    const size_t stage_f = 64 * (HD / 2) * 2;
    for (uint32_t l = 0; l < 2; l++)
        for (uint32_t h = 0; h < HKV; h++)
            assert_memory_equal(key_w(x, l) + h * 2 * stage_f, key_w(a, l) + h * 3 * stage_f,
                                2 * stage_f * sizeof(float));
    assert_non_null(strstr(cvq_codebook_note(x), "first 2 of 3"));
    cvq_codebook_free(x);
    cvq_codebook_free(a);
    cvq_codebook_free(b);
    cvq_codebook_free(c);
    assert_int_equal(run_tool("extract-stages '%s' --stages 4 --out '%s'", path_in("r3.cvq"),
                              path_in("x4.cvq")),
                     2);
}

static void test_bf16_input(void **state) {
    (void)state;
    SKIP_WITHOUT_TOOL();
    const char *dir = path_in("bf");
    mkdir(dir, 0777);
    /* layer 0 keys as bfloat16 bits, and the same values as float32 */
    static uint16_t kb[T_TOK * HKV * HD];
    static float kf[T_TOK * HKV * HD];
    for (size_t i = 0; i < T_TOK * HKV * HD; i++) {
        uint32_t u;
        memcpy(&u, &g_k[0][i], 4);
        kb[i] = (uint16_t)(u >> 16);
        kf[i] = cvq_bf16_to_f32(kb[i]);
    }
    const uint64_t sk[3] = {T_TOK, HKV, HD};
    char name[1200];
    snprintf(name, sizeof name, "%s/k_0.npy", dir);
    npy_write(name, "<u2", 3, sk, kb, sizeof kb);
    assert_int_equal(run_tool("train-keys --data '%s' --out '%s' --key-stages 1 --value-bits 64 "
                              "--steps 2 --quiet",
                              dir, path_in("bf.cvq")),
                     1);
    assert_non_null(strstr(g_run.err, "--bf16"));
    assert_int_equal(run_tool("train-keys --data '%s' --out '%s' --key-stages 1 --value-bits 64 "
                              "--steps 2 --quiet --bf16",
                              dir, path_in("bf.cvq")),
                     0);
    npy_write(name, "<f4", 3, sk, kf, sizeof kf);
    assert_int_equal(run_tool("train-keys --data '%s' --out '%s' --key-stages 1 --value-bits 64 "
                              "--steps 2 --quiet",
                              dir, path_in("f32.cvq")),
                     0);
    cvq_codebook *a = load(path_in("bf.cvq")), *b = load(path_in("f32.cvq"));
    assert_memory_equal(key_w(a, 0), key_w(b, 0), key_w_count(a) * sizeof(float));
    cvq_codebook_free(a);
    cvq_codebook_free(b);
}

static void test_train_values_runs(void **state) {
    (void)state;
    SKIP_WITHOUT_TOOL();
    const char *dir = path_in("data");
    assert_int_equal(run_tool("train-values --data '%s' --init '%s' --out '%s' --steps 3 "
                              "--batch 32 --layers 0",
                              dir, path_in("r3.cvq"), path_in("v.cvq")),
                     0);
    assert_non_null(strstr(g_run.err, "values group 1/1 step"));
    assert_non_null(strstr(g_run.out, "layer 0 values: rel_error"));
    cvq_codebook *a = load(path_in("r3.cvq")), *v = load(path_in("v.cvq"));
    /* keys kept, value scale computed (nonzero) for layer 0 only */
    for (uint32_t l = 0; l < 2; l++)
        assert_memory_equal(key_w(a, l), key_w(v, l), key_w_count(a) * sizeof(float));
    const float *ls0 = NULL, *ls1 = NULL;
    assert_int_equal(cvq_codebook_tensor_cdata(v, CVQ_T_VAL_LS, 0, 0, &ls0), CVQ_OK);
    assert_int_equal(cvq_codebook_tensor_cdata(v, CVQ_T_VAL_LS, 1, 0, &ls1), CVQ_OK);
    assert_true(ls0[0] > 0.0f);
    assert_true(ls1[0] == 0.0f);
    assert_non_null(strstr(cvq_codebook_note(v), "commvq train-values"));
    cvq_codebook_free(a);
    cvq_codebook_free(v);
}

static void test_errors(void **state) {
    (void)state;
    SKIP_WITHOUT_TOOL();
    const char *dir = path_in("data");
    /* usage errors: exit 2 */
    assert_int_equal(run_tool("train-keys --out '%s' --key-stages 1 --value-bits 64",
                              path_in("e.cvq")),
                     2);
    assert_int_equal(run_tool("train-keys --data '%s' --out '%s' --value-bits 64", dir,
                              path_in("e.cvq")),
                     2);
    assert_int_equal(run_tool("train-keys --data '%s' --out '%s' --key-stages 1 --value-bits 64 "
                              "--layers 5",
                              dir, path_in("e.cvq")),
                     2);
    assert_int_equal(run_tool("train-keys --data '%s' --init '%s' --hkv 2 --out '%s'", dir,
                              path_in("r3.cvq"), path_in("e.cvq")),
                     2);
    assert_int_equal(run_tool("train-keys --data '%s' --init '%s' --key-stages 2 --out '%s'",
                              dir, path_in("r3.cvq"), path_in("e.cvq")),
                     2);
    assert_int_equal(run_tool("train-keys --data '%s' --out '%s' --key-stages 1 --value-bits 64 "
                              "--lr 1",
                              dir, path_in("e.cvq")),
                     2);
    assert_int_equal(run_tool("train-values --data '%s' --out '%s' --key-stages 1 "
                              "--value-bits 64 --hard",
                              dir, path_in("e.cvq")),
                     2);
    /* data errors: exit 1 */
    const char *bad = path_in("bad");
    mkdir(bad, 0777);
    static float k[T_TOK * HKV * HD];
    memcpy(k, g_k[0], sizeof k);
    k[5 * HKV * HD + 3] = NAN;
    const uint64_t sk[3] = {T_TOK, HKV, HD};
    char name[1200];
    snprintf(name, sizeof name, "%s/k_0.npy", bad);
    npy_write(name, "<f4", 3, sk, k, sizeof k);
    assert_int_equal(run_tool("train-keys --data '%s' --out '%s' --key-stages 1 --value-bits 64 "
                              "--quiet",
                              bad, path_in("e.cvq")),
                     1);
    assert_non_null(strstr(g_run.err, "CVQ_ERR_NONFINITE_INPUT"));
    k[5 * HKV * HD + 3] = 0.0f;
    npy_write(name, "<f4", 3, sk, k, sizeof k);
    const uint64_t sp[1] = {5};
    int32_t pos[5] = {0, 1, 2, 3, 4};
    snprintf(name, sizeof name, "%s/pos.npy", bad);
    npy_write(name, "<i4", 1, sp, pos, sizeof pos);
    assert_int_equal(run_tool("train-keys --data '%s' --out '%s' --key-stages 1 --value-bits 64 "
                              "--quiet",
                              bad, path_in("e.cvq")),
                     1);
    assert_non_null(strstr(g_run.err, "pos.npy"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_train_keys_basic),
        cmocka_unit_test(test_resume_extend_extract),
        cmocka_unit_test(test_bf16_input),
        cmocka_unit_test(test_train_values_runs),
        cmocka_unit_test(test_errors),
    };
    const char *tool = getenv("COMMVQ_TOOL");
    const char *tmp = getenv("COMMVQ_TEST_TMP");
    g_have_tool = tool && tool[0] && tmp && tmp[0] && !strchr(tool, '\'') && !strchr(tmp, '\'');
    if (g_have_tool) {
        snprintf(g_tool, sizeof g_tool, "%s", tool);
        snprintf(g_dir, sizeof g_dir, "%s/test_train_tool_files", tmp);
        char cmd[1200];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
        if (system(cmd) != 0) fprintf(stderr, "test_train_tool: could not clear %s\n", g_dir);
        if (mkdir(g_dir, 0777) != 0) {
            fprintf(stderr, "test_train_tool: cannot create %s\n", g_dir);
            return 1;
        }
    } else {
        fprintf(stderr, "test_train_tool: COMMVQ_TOOL/COMMVQ_TEST_TMP not set: skipping\n");
    }
    return cmocka_run_group_tests(tests, NULL, NULL);
}
