/*
 * Unit tests of the tool's .npy reader and writer (tools/npy.c).
 *
 * tools/npy.c is internal to the `commvq` tool (it is not part of the
 * library, so neither libcommvq nor the test support library carries it),
 * and tests/CMakeLists.txt builds each test_*.c on its own: the simplest
 * honest way to unit-test it is to compile it into this test, hence the
 * #include of the .c file below.
 *
 * Expected bytes and values are written out here by hand (headers as numpy
 * writes them), never produced by the code under test.
 */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../tools/npy.c"

static char err[512];

/* A .npy image: preamble of the given version + header text (padded with
 * spaces and '\n' to a multiple of 16 when pad != 0) + data bytes. */
static size_t build(unsigned char *out, size_t cap, int major, const char *header, int pad,
                    const void *data, size_t nbytes) {
    size_t pre = major == 1 ? 10 : 12, hl = strlen(header), total;
    size_t padded = hl;
    if (pad) padded = (pre + hl + 1 + 15) / 16 * 16 - pre;
    total = pre + padded + nbytes;
    assert_true(total <= cap);
    memcpy(out, "\x93NUMPY", 6);
    out[6] = (unsigned char)major;
    out[7] = 0;
    out[8] = (unsigned char)(padded & 0xff);
    out[9] = (unsigned char)((padded >> 8) & 0xff);
    if (major != 1) {
        out[10] = (unsigned char)((padded >> 16) & 0xff);
        out[11] = (unsigned char)((padded >> 24) & 0xff);
    }
    memcpy(out + pre, header, hl);
    if (pad) {
        memset(out + pre + hl, ' ', padded - hl - 1);
        out[pre + padded - 1] = '\n';
    }
    if (nbytes) memcpy(out + pre + padded, data, nbytes);
    return total;
}

static void expect_fail(const unsigned char *buf, size_t n, const char *needle) {
    npy_array a;
    err[0] = '\0';
    if (npy_load_memory(buf, n, &a, err, sizeof err) == 0)
        fail_msg("accepted a bad .npy (expected an error containing '%s')", needle);
    assert_null(a.data);
    if (strstr(err, needle) == NULL)
        fail_msg("error '%s' does not mention '%s'", err, needle);
}

/* ---- what numpy writes is read --------------------------------------- */

static void test_read_numpy_headers(void **state) {
    unsigned char buf[1024];
    const float f[6] = {1.0f, -2.0f, 0.5f, 3.0f, 1e-3f, -0.0f};
    const double d[2] = {0.25, -1e300};
    const int32_t i4[3] = {-1, 0, 2147483647};
    const uint16_t u2[2] = {0xffff, 0x3c00};
    const uint8_t u1[3] = {0, 1, 255};
    npy_array a;
    size_t n;
    (void)state;

    /* numpy >= 1.17: padded to 64; 2-D */
    n = build(buf, sizeof buf, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
              1, f, sizeof f);
    assert_int_equal(npy_load_memory(buf, n, &a, err, sizeof err), 0);
    assert_int_equal(a.dtype, NPY_F4);
    assert_int_equal(a.ndim, 2);
    assert_int_equal(a.shape[0], 2);
    assert_int_equal(a.shape[1], 3);
    assert_int_equal(a.count, 6);
    assert_memory_equal(a.data, f, sizeof f);
    npy_free(&a);
    assert_null(a.data);

    /* 1-D tuple with trailing comma, other key order, double quotes, v2.0 */
    n = build(buf, sizeof buf, 2, "{\"shape\": (2,), \"fortran_order\": False, \"descr\": \"<f8\"}",
              1, d, sizeof d);
    assert_int_equal(npy_load_memory(buf, n, &a, err, sizeof err), 0);
    assert_int_equal(a.dtype, NPY_F8);
    assert_int_equal(a.ndim, 1);
    assert_int_equal(a.shape[0], 2);
    assert_memory_equal(a.data, d, sizeof d);
    npy_free(&a);

    /* v3.0, int32, no padding beyond the newline-less dict */
    n = build(buf, sizeof buf, 3, "{'descr':'<i4','fortran_order':False,'shape':(3,)}", 0, i4,
              sizeof i4);
    assert_int_equal(npy_load_memory(buf, n, &a, err, sizeof err), 0);
    assert_int_equal(a.dtype, NPY_I4);
    assert_memory_equal(a.data, i4, sizeof i4);
    npy_free(&a);

    /* Python 2 long suffixes */
    n = build(buf, sizeof buf, 1, "{'descr': '<u2', 'fortran_order': False, 'shape': (1L, 2L), }",
              1, u2, sizeof u2);
    assert_int_equal(npy_load_memory(buf, n, &a, err, sizeof err), 0);
    assert_int_equal(a.dtype, NPY_U2);
    assert_int_equal(a.shape[1], 2);
    assert_memory_equal(a.data, u2, sizeof u2);
    npy_free(&a);

    /* uint8 with '|' */
    n = build(buf, sizeof buf, 1, "{'descr': '|u1', 'fortran_order': False, 'shape': (3,), }", 1,
              u1, sizeof u1);
    assert_int_equal(npy_load_memory(buf, n, &a, err, sizeof err), 0);
    assert_int_equal(a.dtype, NPY_U1);
    assert_memory_equal(a.data, u1, sizeof u1);
    npy_free(&a);

    /* float16 */
    n = build(buf, sizeof buf, 1, "{'descr': '<f2', 'fortran_order': False, 'shape': (2,), }", 1,
              u2, sizeof u2);
    assert_int_equal(npy_load_memory(buf, n, &a, err, sizeof err), 0);
    assert_int_equal(a.dtype, NPY_F2);
    npy_free(&a);

    /* scalar () and an empty array (0, 4) */
    n = build(buf, sizeof buf, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (), }", 1, f,
              4);
    assert_int_equal(npy_load_memory(buf, n, &a, err, sizeof err), 0);
    assert_int_equal(a.ndim, 0);
    assert_int_equal(a.count, 1);
    assert_memory_equal(a.data, f, 4);
    npy_free(&a);
    n = build(buf, sizeof buf, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 4), }",
              1, NULL, 0);
    assert_int_equal(npy_load_memory(buf, n, &a, err, sizeof err), 0);
    assert_int_equal(a.count, 0);
    assert_null(a.data);
    npy_free(&a);
}

/* ---- malformed headers are refused with a clear message ------------------- */

static void test_refuse_malformed(void **state) {
    unsigned char buf[1024];
    const float f[4] = {0};
    size_t n;
    (void)state;

#define HDR(text) build(buf, sizeof buf, 1, text, 1, f, sizeof f)
    n = HDR("{'descr': '<f4', 'fortran_order': True, 'shape': (4,), }");
    expect_fail(buf, n, "fortran_order");
    n = HDR("{'descr': '>f4', 'fortran_order': False, 'shape': (4,), }");
    expect_fail(buf, n, "big-endian");
    n = HDR("{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }");
    expect_fail(buf, n, "not supported");
    n = HDR("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (4,), }");
    expect_fail(buf, n, "structured");
    n = HDR("{'descr': '<f4', 'shape': (4,), }");
    expect_fail(buf, n, "missing key 'fortran_order'");
    n = HDR("{'descr': '<f4', 'fortran_order': False, 'fortran_order': False, 'shape': (4,), }");
    expect_fail(buf, n, "duplicate");
    n = HDR("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), 'extra': 1, }");
    expect_fail(buf, n, "unexpected key");
    n = HDR("{'descr': '<f4', 'fortran_order': False, 'shape': (-4,), }");
    expect_fail(buf, n, "negative");
    n = HDR("{'descr': '<f4', 'fortran_order': False, 'shape': (4, x), }");
    expect_fail(buf, n, "shape");
    n = HDR("{'descr': '<f4', 'fortran_order': False, 'shape': [4], }");
    expect_fail(buf, n, "tuple");
    n = HDR("{'descr': '<f4, 'fortran_order': False, 'shape': (4,), }");
    expect_fail(buf, n, "malformed");
    n = HDR("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), } junk");
    expect_fail(buf, n, "after the dict");
    n = HDR("'descr': '<f4', 'fortran_order': False, 'shape': (4,)");
    expect_fail(buf, n, "dict");
    n = HDR("{'descr': '<f4', 'fortran_order': Maybe, 'shape': (4,), }");
    expect_fail(buf, n, "True or False");
    /* 2^40 * 2^40 elements: the count overflows 64 bits */
    n = HDR("{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, "
            "1099511627776), }");
    expect_fail(buf, n, "overflow");
    /* 2^62 float32 elements: bytes overflow size_t */
    n = HDR("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904,), }");
    expect_fail(buf, n, "overflow");
    /* a dimension beyond 2^64 */
    n = HDR("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }");
    expect_fail(buf, n, "overflow");
    /* the header ends inside a string: the scanner must stop at its end */
    n = build(buf, sizeof buf, 1, "{'descr': '<f4", 0, NULL, 0);
    expect_fail(buf, n, "unterminated");
    n = build(buf, sizeof buf, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4,", 0,
              NULL, 0);
    expect_fail(buf, n, "shape");
#undef HDR

    /* preamble problems */
    memcpy(buf, "\x93NUMPX\x01\x00\x10\x00", 10);
    expect_fail(buf, 64, "magic");
    n = build(buf, sizeof buf, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", 1,
              f, sizeof f);
    buf[6] = 4;
    expect_fail(buf, n, "version 4.0");
    buf[6] = 1;
    buf[7] = 1;
    expect_fail(buf, n, "version 1.1");
    buf[7] = 0;
    expect_fail(buf, 5, "only 5 bytes");
    /* header length pointing past the end of the buffer */
    buf[9] = 0x7f;
    expect_fail(buf, n, "truncated .npy header");
    /* v2 header length over the 1 MiB cap */
    n = build(buf, sizeof buf, 2, "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", 1,
              f, sizeof f);
    buf[11] = 0x10;
    expect_fail(buf, n, "too large");
}

static void test_data_size(void **state) {
    unsigned char buf[1024];
    const float f[5] = {1, 2, 3, 4, 5};
    size_t n;
    (void)state;
    /* shape says 4, data has 3 (truncated) or 5 (trailing bytes) */
    n = build(buf, sizeof buf, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", 1,
              f, 12);
    expect_fail(buf, n, "truncated .npy data");
    n = build(buf, sizeof buf, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", 1,
              f, 20);
    expect_fail(buf, n, "after the data");
}

/* Every prefix of a valid file fails cleanly (never reads past the end);
 * every single-byte corruption of the header either fails or gives a
 * self-consistent array. */
static void test_truncations_and_flips(void **state) {
    unsigned char buf[512], bad[512];
    const float f[6] = {1, 2, 3, 4, 5, 6};
    size_t n, cut, i;
    npy_array a;
    (void)state;
    n = build(buf, sizeof buf, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
              1, f, sizeof f);
    for (cut = 0; cut < n; cut++) {
        /* a copy of exactly cut bytes on the heap, so a checker sees overruns */
        unsigned char *p = (unsigned char *)malloc(cut ? cut : 1);
        assert_non_null(p);
        memcpy(p, buf, cut);
        assert_int_not_equal(npy_load_memory(p, cut, &a, err, sizeof err), 0);
        assert_true(strlen(err) > 0);
        free(p);
    }
    for (i = 0; i < n - sizeof f; i++) {
        int v;
        for (v = 0; v < 256; v += 37) {
            memcpy(bad, buf, n);
            bad[i] = (unsigned char)v;
            if (npy_load_memory(bad, n, &a, err, sizeof err) == 0) {
                assert_true(a.count * npy_dtype_size(a.dtype) <= n);
                npy_free(&a);
            } else {
                assert_true(strlen(err) > 0);
            }
        }
    }
}

/* ---- the writer ------------------------------------------------------------- */

static void test_writer_header(void **state) {
    char hdr[256];
    const uint64_t s2[2] = {3, 5}, s1[1] = {7};
    const char want2[] = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 5), }";
    const char want1[] = "{'descr': '|u1', 'fortran_order': False, 'shape': (7,), }";
    const char want0[] = "{'descr': '<f8', 'fortran_order': False, 'shape': (), }";
    size_t n;
    (void)state;
    n = npy_format_header(NPY_F4, 2, s2, hdr, sizeof hdr);
    assert_int_equal(n % 64, 0);
    assert_memory_equal(hdr, "\x93NUMPY\x01\x00", 8);
    assert_int_equal((size_t)(unsigned char)hdr[8] | ((size_t)(unsigned char)hdr[9] << 8),
                     n - 10);
    assert_memory_equal(hdr + 10, want2, strlen(want2));
    assert_int_equal(hdr[n - 1], '\n');
    assert_int_equal(hdr[n - 2], ' ');
    n = npy_format_header(NPY_U1, 1, s1, hdr, sizeof hdr);
    assert_memory_equal(hdr + 10, want1, strlen(want1));
    n = npy_format_header(NPY_F8, 0, NULL, hdr, sizeof hdr);
    assert_memory_equal(hdr + 10, want0, strlen(want0));
    /* 10 + 55 + 1 = 66 bytes, rounded up to 128 */
    assert_int_equal(n, 128);
    /* too small a buffer */
    assert_int_equal(npy_format_header(NPY_F4, 2, s2, hdr, 40), 0);
}

static void test_round_trip_files(void **state) {
    const char *tmp = getenv("COMMVQ_TEST_TMP");
    char path[1024];
    const npy_dtype types[6] = {NPY_F4, NPY_F2, NPY_U2, NPY_U1, NPY_I4, NPY_F8};
    unsigned char data[8 * 24];
    const uint64_t shape[3] = {2, 3, 4};
    npy_array a;
    size_t t, i;
    FILE *f;
    (void)state;
    snprintf(path, sizeof path, "%s/test_npy_roundtrip.npy", tmp && *tmp ? tmp : ".");
    for (i = 0; i < sizeof data; i++) data[i] = (unsigned char)(i * 7 + 1);
    for (t = 0; t < 6; t++) {
        size_t nb = 24 * npy_dtype_size(types[t]);
        assert_int_equal(npy_save(path, types[t], 3, shape, data, err, sizeof err), 0);
        assert_int_equal(npy_load(path, &a, err, sizeof err), 0);
        assert_int_equal(a.dtype, types[t]);
        assert_int_equal(a.ndim, 3);
        assert_int_equal(a.shape[2], 4);
        assert_memory_equal(a.data, data, nb);
        npy_free(&a);
    }
    /* a file cut inside its data, and one with an extra byte */
    assert_int_equal(npy_save(path, NPY_F4, 3, shape, data, err, sizeof err), 0);
    {
        unsigned char img[256];
        size_t n;
        f = fopen(path, "rb");
        assert_non_null(f);
        n = fread(img, 1, sizeof img, f);
        fclose(f);
        /* 10 + 62 + 1 header bytes rounded up to 128, then 24 floats */
        assert_int_equal(n, 128 + 96);
        f = fopen(path, "wb");
        assert_non_null(f);
        assert_int_equal(fwrite(img, 1, n - 5, f), n - 5);
        fclose(f);
        assert_int_not_equal(npy_load(path, &a, err, sizeof err), 0);
        assert_non_null(strstr(err, "truncated"));
        assert_non_null(strstr(err, path));
        f = fopen(path, "wb");
        assert_non_null(f);
        assert_int_equal(fwrite(img, 1, n, f), n);
        fputc(0, f);
        fclose(f);
        assert_int_not_equal(npy_load(path, &a, err, sizeof err), 0);
        assert_non_null(strstr(err, "longer"));
        /* every prefix of the file fails cleanly */
        for (i = 0; i < n; i += 3) {
            f = fopen(path, "wb");
            assert_non_null(f);
            if (i) assert_int_equal(fwrite(img, 1, i, f), i);
            fclose(f);
            assert_int_not_equal(npy_load(path, &a, err, sizeof err), 0);
            assert_null(a.data);
        }
    }
    assert_int_not_equal(npy_load("/nonexistent/dir/x.npy", &a, err, sizeof err), 0);
    assert_non_null(strstr(err, "cannot open"));
    remove(path);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_read_numpy_headers),
        cmocka_unit_test(test_refuse_malformed),
        cmocka_unit_test(test_data_size),
        cmocka_unit_test(test_truncations_and_flips),
        cmocka_unit_test(test_writer_header),
        cmocka_unit_test(test_round_trip_files),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
