/*
 * The codebook object, the .cvq file format, geometry validation, the
 * compressed-record layout and 12-bit code packing.
 *
 * The file tests parse the bytes with this file's own reader of the layout
 * written in docs/format.md (offsets, little-endian fields) and its own
 * bitwise CRC32, so the library's writer is checked against the document,
 * not against itself. Every malformed input is handed to the loader in a
 * buffer of exactly its size (malloc), so an over-read shows up under
 * valgrind / ASan.
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
#include <unistd.h>

#include "commvq.h"
#include "cvq_internal.h"

/* ---- helpers ---------------------------------------------------------------- */

static const char *tmp_dir(void) {
    const char *d = getenv("COMMVQ_TEST_TMP");
    return (d && d[0]) ? d : "/tmp";
}

static void tmp_path(char *buf, size_t n, const char *tag) {
    snprintf(buf, n, "%s/cvq_cbfile_%ld_%s.cvq", tmp_dir(), (long)getpid(), tag);
}

static uint8_t *read_all(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    assert_true(n >= 0);
    rewind(f);
    uint8_t *b = malloc((size_t)n + 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *size = (size_t)n;
    return b;
}

static void write_all(const char *path, const uint8_t *b, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

/* Bitwise CRC32 (reflected 0xEDB88320), independent of the library's
 * table-driven one. */
static uint32_t crc32_bitwise(const uint8_t *p, size_t n, uint32_t crc) {
    crc = ~crc;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}
static uint64_t rd64(const uint8_t *p) { return rd32(p) | ((uint64_t)rd32(p + 4) << 32); }
static void wr32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* docs/format.md: header 64 bytes, entries of 112 bytes from offset 64. */
#define HDR 64u
#define ENT 112u

typedef struct fsec {
    char name[33];
    uint32_t dtype, rank;
    uint64_t dims[6], offset, size;
    uint32_t crc;
    size_t entry; /* byte offset of its table entry */
} fsec;

/* Parses the table of a valid file (asserting the documented invariants). */
static uint32_t parse_table(const uint8_t *b, size_t size, fsec *s, uint32_t cap) {
    assert_true(size >= HDR);
    assert_memory_equal(b, "COMMVQCB", 8);
    assert_int_equal(rd32(b + 8), 1);
    assert_int_equal(rd32(b + 12), HDR);
    assert_int_equal(rd32(b + 16), ENT);
    const uint32_t n = rd32(b + 20);
    assert_true(n <= cap);
    assert_int_equal(rd64(b + 24), HDR);
    assert_int_equal(rd64(b + 32), size);
    for (int i = 40; i < 60; i++) assert_int_equal(b[i], 0);
    uint32_t c = crc32_bitwise(b, 60, 0);
    c = crc32_bitwise(b + HDR, (size_t)n * ENT, c);
    assert_int_equal(rd32(b + 60), c);
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *e = b + HDR + (size_t)i * ENT;
        memcpy(s[i].name, e, 32);
        s[i].name[32] = 0;
        s[i].dtype = rd32(e + 32);
        s[i].rank = rd32(e + 36);
        for (int k = 0; k < 6; k++) s[i].dims[k] = rd64(e + 40 + 8 * k);
        s[i].offset = rd64(e + 88);
        s[i].size = rd64(e + 96);
        s[i].crc = rd32(e + 104);
        s[i].entry = HDR + (size_t)i * ENT;
        assert_int_equal(s[i].offset % 64, 0);
        assert_true(s[i].offset + s[i].size <= size);
        assert_int_equal(crc32_bitwise(b + s[i].offset, (size_t)s[i].size, 0), s[i].crc);
    }
    return n;
}

static const fsec *find_sec(const fsec *s, uint32_t n, const char *name) {
    for (uint32_t i = 0; i < n; i++)
        if (strcmp(s[i].name, name) == 0) return &s[i];
    fail_msg("section %s not found", name);
    return NULL;
}

/* Recomputes a section's CRC (in its entry) and the header CRC. */
static void fix_crcs(uint8_t *b, const fsec *s) {
    if (s) wr32(b + s->entry + 104, crc32_bitwise(b + s->offset, (size_t)s->size, 0));
    const uint32_t n = rd32(b + 20);
    uint32_t c = crc32_bitwise(b, 60, 0);
    c = crc32_bitwise(b + HDR, (size_t)n * ENT, c);
    wr32(b + 60, c);
}

/* Loads from a heap copy of exactly n bytes (over-reads become visible). */
static cvq_status load_exact(const uint8_t *b, size_t n, cvq_codebook **out) {
    uint8_t *copy = malloc(n ? n : 1);
    assert_non_null(copy);
    if (n) memcpy(copy, b, n);
    cvq_status s = cvq_codebook_load_memory(copy, n, NULL, out);
    free(copy);
    return s;
}

/* Counting allocator with failure injection at the fail_at-th call. */
typedef struct counting {
    long calls, live, fail_at;
} counting;
static void *c_alloc(void *user, size_t size, size_t align) {
    counting *c = user;
    c->calls++;
    if (c->fail_at > 0 && c->calls == c->fail_at) return NULL;
    const size_t sz = (size + align - 1) / align * align;
    void *p = aligned_alloc(align, sz ? sz : align);
    if (p) c->live++;
    return p;
}
/* The same, recording the largest request (s_biggest) and refusing any
 * over 64 MiB. */
static size_t s_biggest;
static void *c_alloc_capped(void *user, size_t size, size_t align) {
    if (size > s_biggest) s_biggest = size;
    if (size > ((size_t)64 << 20)) {
        ((counting *)user)->calls++;
        return NULL;
    }
    return c_alloc(user, size, align);
}
static void c_free(void *user, void *p) {
    counting *c = user;
    c->live--;
    free(p);
}

static double *rope_default(uint32_t d) {
    double *t = malloc(sizeof(double) * d / 2);
    assert_non_null(t);
    for (uint32_t p = 0; p < d / 2; p++) t[p] = pow(10000.0, -2.0 * p / d);
    return t;
}

static cvq_geometry geom(uint32_t L, uint32_t hq, uint32_t hkv, uint32_t d,
                         uint32_t R, uint32_t Nc, uint32_t F, uint32_t I) {
    cvq_geometry g;
    memset(&g, 0, sizeof g);
    g.n_layers = L;
    g.n_q_heads = hq;
    g.n_kv_heads = hkv;
    g.head_dim = d;
    g.key_stages = R;
    g.value_bits = Nc;
    g.value_group_width = F;
    g.value_hidden = I;
    return g;
}

/* A tiny geometry: one layer, one head, d = 64, R = 1, Nc = 8, I = 8. */
static cvq_codebook *tiny_codebook(uint64_t seed) {
    cvq_geometry g = geom(1, 1, 1, 64, 1, 8, 0, 8);
    double *t = rope_default(64);
    cvq_codebook *cb = NULL;
    assert_int_equal(cvq_codebook_random(&g, t, seed, NULL, &cb), CVQ_OK);
    free(t);
    return cb;
}

/* Two layers, two KV heads, per-head value groups, head scale, interleaved. */
static cvq_codebook *small_codebook(uint64_t seed, const cvq_allocator *a) {
    cvq_geometry g = geom(2, 4, 2, 64, 3, 16, 64, 24);
    g.key_scale = CVQ_KEY_SCALE_HEAD;
    g.pair_layout = CVQ_PAIRS_INTERLEAVED;
    double *t = rope_default(64);
    cvq_codebook *cb = NULL;
    assert_int_equal(cvq_codebook_random(&g, t, seed, a, &cb), CVQ_OK);
    free(t);
    return cb;
}

/* Every tensor of every (layer, group) equal bit for bit; f16 = 1: a's
 * values rounded through binary16 must equal b's. */
static void assert_same_tensors(const cvq_codebook *a, const cvq_codebook *b, int f16) {
    cvq_geometry ga, gb;
    assert_int_equal(cvq_codebook_geometry(a, &ga), CVQ_OK);
    assert_int_equal(cvq_codebook_geometry(b, &gb), CVQ_OK);
    assert_memory_equal(&ga, &gb, sizeof ga);
    double ta[128], tb[128];
    assert_int_equal(cvq_codebook_rope_theta(a, ta), CVQ_OK);
    assert_int_equal(cvq_codebook_rope_theta(b, tb), CVQ_OK);
    assert_memory_equal(ta, tb, sizeof(double) * ga.head_dim / 2);
    const uint32_t groups = ga.n_kv_heads * ga.head_dim / ga.value_group_width;
    for (int id = CVQ_T_KEY_W; id < CVQ_T_COUNT; id++) {
        cvq_tensor_info info;
        assert_int_equal(cvq_codebook_tensor_info(a, (cvq_tensor_id)id, &info), CVQ_OK);
        const uint32_t ng = id == CVQ_T_KEY_W ? 1 : groups;
        for (uint32_t l = 0; l < ga.n_layers; l++)
            for (uint32_t gr = 0; gr < ng; gr++) {
                const float *x, *y;
                assert_int_equal(cvq_codebook_tensor_cdata(a, (cvq_tensor_id)id, l, gr, &x), CVQ_OK);
                assert_int_equal(cvq_codebook_tensor_cdata(b, (cvq_tensor_id)id, l, gr, &y), CVQ_OK);
                for (uint64_t j = 0; j < info.n_elements; j++) {
                    const float want = f16 ? cvq_f16_to_f32(cvq_f32_to_f16(x[j])) : x[j];
                    if (memcmp(&want, &y[j], 4) != 0)
                        fail_msg("%s layer %u group %u element %llu: %a != %a", info.name,
                                 l, gr, (unsigned long long)j, (double)want, (double)y[j]);
                }
            }
    }
}

/* ---- geometry ------------------------------------------------------------------ */

static void test_geometry_defaults(void **state) {
    (void)state;
    cvq_geometry g = geom(32, 32, 8, 128, 11, 1024, 0, 0);
    assert_int_equal(cvq_geometry_resolve(&g), CVQ_OK);
    assert_int_equal(g.value_group_width, 1024);
    assert_int_equal(g.value_hidden, 2048);
    assert_true(g.logit_scale == (float)(1.0 / sqrt(128.0)));
    g = geom(1, 1, 1, 64, 1, 4096, 0, 0);
    assert_int_equal(cvq_geometry_resolve(&g), CVQ_OK);
    assert_int_equal(g.value_hidden, 4096); /* min(8192, 4096) */
    /* explicit values are kept */
    g = geom(1, 6, 3, 96, 2, 24, 96, 7);
    g.logit_scale = 0.25f;
    assert_int_equal(cvq_geometry_resolve(&g), CVQ_OK);
    assert_int_equal(g.value_group_width, 96);
    assert_int_equal(g.value_hidden, 7);
    assert_true(g.logit_scale == 0.25f);
    assert_int_equal(cvq_geometry_resolve(NULL), CVQ_ERR_NULL_POINTER);
}

static void test_geometry_invalid(void **state) {
    (void)state;
    struct {
        cvq_geometry g;
        const char *what;
    } bad[40];
    int n = 0;
    const cvq_geometry ok = geom(2, 8, 2, 64, 4, 64, 0, 0);
#define BAD(field, value, word)                                                    \
    do {                                                                           \
        bad[n].g = ok;                                                             \
        bad[n].g.field = value;                                                    \
        bad[n].what = word;                                                        \
        n++;                                                                       \
    } while (0)
    BAD(n_layers, 0, "n_layers");
    BAD(n_layers, 4097, "n_layers");
    BAD(n_q_heads, 0, "n_q_heads");
    BAD(n_kv_heads, 0, "n_kv_heads");
    BAD(n_kv_heads, 9, "n_kv_heads"); /* > Hq */
    BAD(head_dim, 0, "head_dim");
    BAD(head_dim, 72, "head_dim");
    BAD(head_dim, 512, "head_dim");
    BAD(head_dim, 65, "head_dim");
    BAD(key_stages, 0, "key_stages");
    BAD(key_stages, 33, "key_stages");
    BAD(key_scale, (cvq_key_scale_mode)2, "key_scale");
    BAD(pair_layout, (cvq_pair_layout)7, "pair_layout");
    BAD(value_group_width, 96, "value_group_width");  /* not a multiple of 64 */
    BAD(value_group_width, 256, "value_group_width"); /* > Hkv*d = 128 */
    BAD(value_group_width, 32, "value_group_width");
    BAD(value_bits, 0, "value_bits");
    BAD(value_bits, 4, "value_bits");
    BAD(value_bits, 12, "value_bits");
    BAD(value_bits, 65544, "value_bits");
    BAD(value_hidden, 65537, "value_hidden");
    BAD(logit_scale, -1.0f, "logit_scale");
    BAD(logit_scale, NAN, "logit_scale");
    BAD(logit_scale, INFINITY, "logit_scale");
#undef BAD
    for (int i = 0; i < n; i++) {
        cvq_geometry g = bad[i].g;
        cvq_status s = cvq_geometry_resolve(&g);
        if (s != CVQ_ERR_GEOMETRY)
            fail_msg("case %d (%s): status %s", i, bad[i].what, cvq_status_name(s));
        if (!strstr(cvq_last_error(), bad[i].what))
            fail_msg("case %d: message '%s' does not name %s", i, cvq_last_error(),
                     bad[i].what);
    }
    /* F = 192 with Hkv*d = 384 (3 heads of 64) is fine; 128 does not divide */
    cvq_geometry g = geom(1, 3, 3, 64, 1, 8, 192, 0);
    assert_int_equal(cvq_geometry_resolve(&g), CVQ_OK);
    g = geom(1, 3, 3, 64, 1, 8, 128, 0);
    assert_int_equal(cvq_geometry_resolve(&g), CVQ_ERR_GEOMETRY);
#if SIZE_MAX <= 0xFFFFFFFFu
    /* tensors that cannot be addressed with a 32-bit size_t: W2 of 2^17 x
     * 2^16 floats per group is 2^35 bytes. (With a 64-bit size_t the limits
     * on each field keep every size below 2^64.) */
    g = geom(1, 1, 1, 64, 1, 65536, 64, 65536);
    assert_int_equal(cvq_geometry_resolve(&g), CVQ_ERR_GEOMETRY);
#endif
    /* record layout refuses what resolve refuses */
    cvq_record_layout r;
    g = ok;
    g.head_dim = 72;
    assert_int_equal(cvq_record_layout_of(&g, &r), CVQ_ERR_GEOMETRY);
    assert_int_equal(cvq_record_layout_of(NULL, &r), CVQ_ERR_NULL_POINTER);
}

/* ---- record layout ------------------------------------------------------------------ */

/* Independent arithmetic from docs/format.md. */
static void check_layout(uint32_t hkv, uint32_t d, uint32_t R, uint32_t Nc,
                         uint32_t F, int head_scale, uint32_t want_bytes,
                         double want_bpe) {
    cvq_geometry g = geom(1, hkv, hkv, d, R, Nc, F, 0);
    g.key_scale = head_scale ? CVQ_KEY_SCALE_HEAD : CVQ_KEY_SCALE_TOKEN;
    cvq_record_layout r;
    assert_int_equal(cvq_record_layout_of(&g, &r), CVQ_OK);
    const uint32_t groups = hkv * d / F, ns = head_scale ? hkv : 1;
    assert_int_equal(r.key_code_bytes, (12 * hkv * R + 7) / 8);
    assert_int_equal(r.key_scale_count, ns);
    assert_int_equal(r.value_groups, groups);
    assert_int_equal(r.value_bit_bytes, groups * Nc / 8);
    assert_int_equal(r.value_scale_count, groups);
    assert_int_equal(r.code_bits, 12ull * hkv * R + (uint64_t)groups * Nc);
    assert_int_equal(r.scale_bits, 32ull * (ns + groups));
    assert_int_equal(r.bytes_per_token, want_bytes);
    assert_true(r.bits_per_element == want_bpe);
}

static void test_record_layout(void **state) {
    (void)state;
    /* LLaMA-3.1-8B 1 bit: 12*8*11 + 1024 code bits + 2*32 scale bits = 2144
     * bits over 2*8*128 = 2048 elements; bytes 132 + 4 + 128 + 4. */
    check_layout(8, 128, 11, 1024, 1024, 0, 268, 2144.0 / 2048.0);
    {
        cvq_geometry g = geom(32, 32, 8, 128, 11, 1024, 0, 0);
        cvq_record_layout r;
        assert_int_equal(cvq_record_layout_of(&g, &r), CVQ_OK);
        assert_true(fabs(r.bits_per_element - 1.047) < 0.0005);
    }
    /* LLaMA-3.1-8B 2 bit: 2016 + 2048 + 64 = 4128 bits; 252+4+256+4 bytes */
    check_layout(8, 128, 21, 2048, 1024, 0, 516, 4128.0 / 2048.0);
    /* SmolLM2-135M 1 bit: 180 + 192 + 64 = 436 bits over 384; 23+4+24+4 */
    check_layout(3, 64, 5, 192, 192, 0, 55, 436.0 / 384.0);
    /* SmolLM2-135M 1 bit with R = 6: 216 + 192 + 64 = 472 bits; 27+4+24+4 */
    check_layout(3, 64, 6, 192, 192, 0, 59, 472.0 / 384.0);
    /* SmolLM2-135M 2 bit: 396 + 384 + 64 = 844 bits; 50+4+48+4 */
    check_layout(3, 64, 11, 384, 192, 0, 106, 844.0 / 384.0);
    /* head scales and per-head value groups: 1056 + 8*128 codes,
     * 32*(8+8) scales; 132 + 32 + 128 + 32 bytes */
    check_layout(8, 128, 11, 128, 128, 1, 324, (1056.0 + 1024.0 + 512.0) / 2048.0);
}

/* ---- 12-bit packing ----------------------------------------------------------------- */

static void test_pack_known_answer(void **state) {
    (void)state;
    /* Worked by hand: 0xABC at bits 0..11 -> byte0 = 0xBC, byte1 low nibble
     * = 0xA; 0x123 at bits 12..23 -> byte1 high nibble = 0x3, byte2 = 0x12;
     * 0xFFF at bits 24..35 -> byte3 = 0xFF, byte4 low nibble 0xF, the unused
     * high nibble 0. */
    const uint16_t codes[3] = {0xABC, 0x123, 0xFFF};
    const uint8_t want[5] = {0xBC, 0x3A, 0x12, 0xFF, 0x0F};
    uint8_t out[6];
    memset(out, 0xEE, sizeof out);
    assert_int_equal(cvq_pack_codes12(codes, 3, out), CVQ_OK);
    assert_memory_equal(out, want, 5);
    assert_int_equal(out[5], 0xEE); /* nothing written past ceil(36/8) = 5 */
    uint16_t back[3];
    assert_int_equal(cvq_unpack_codes12(want, 3, back), CVQ_OK);
    assert_memory_equal(back, codes, sizeof codes);
    const uint16_t one = 0x801;
    const uint8_t want1[2] = {0x01, 0x08};
    memset(out, 0xEE, sizeof out);
    assert_int_equal(cvq_pack_codes12(&one, 1, out), CVQ_OK);
    assert_memory_equal(out, want1, 2);
    assert_int_equal(out[2], 0xEE);
    /* a code of 13 bits is refused, not cut to 12: nothing written */
    const uint16_t big[3] = {0x001, 0x1000, 0x002};
    memset(out, 0xEE, sizeof out);
    assert_int_equal(cvq_pack_codes12(big, 3, out), CVQ_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(cvq_last_error(), "code 4096 at index 1"));
    for (size_t i = 0; i < sizeof out; i++) assert_int_equal(out[i], 0xEE);
}

static void test_pack_round_trip(void **state) {
    (void)state;
    uint64_t x = 12345;
    for (size_t n = 0; n <= 67; n++) {
        uint16_t codes[67], back[67];
        uint8_t out[102 + 4];
        for (size_t i = 0; i < n; i++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            codes[i] = (uint16_t)(x >> 52); /* 12 random bits */
        }
        const size_t nb = (12 * n + 7) / 8;
        memset(out, 0xFF, sizeof out);
        assert_int_equal(cvq_pack_codes12(codes, n, out), CVQ_OK);
        for (size_t i = nb; i < sizeof out; i++) assert_int_equal(out[i], 0xFF);
        /* the definition: stream bit b = byte b/8, bit b%8 */
        for (size_t i = 0; i < n; i++)
            for (unsigned k = 0; k < 12; k++) {
                const size_t b = 12 * i + k;
                assert_int_equal((out[b / 8] >> (b % 8)) & 1u, (codes[i] >> k) & 1u);
            }
        if (n % 2) assert_int_equal(out[nb - 1] >> 4, 0); /* unused nibble */
        assert_int_equal(cvq_unpack_codes12(out, n, back), CVQ_OK);
        if (n) assert_memory_equal(back, codes, n * sizeof codes[0]);
    }
}

/* ---- codebook object ------------------------------------------------------------------ */

static void test_codebook_create_and_views(void **state) {
    (void)state;
    cvq_geometry g = geom(3, 6, 3, 64, 2, 16, 64, 10);
    double *t = rope_default(64);
    cvq_codebook *cb = NULL;
    assert_int_equal(cvq_codebook_create(&g, t, NULL, &cb), CVQ_OK);
    cvq_geometry gr;
    assert_int_equal(cvq_codebook_geometry(cb, &gr), CVQ_OK);
    assert_int_equal(gr.value_group_width, 64);
    assert_int_equal(gr.value_hidden, 10);
    assert_true(gr.logit_scale == 0.125f);

    /* shapes of each (layer, group) view */
    const struct {
        cvq_tensor_id id;
        const char *name;
        uint32_t nd;
        uint64_t dims[5];
    } want[] = {
        {CVQ_T_ROPE_THETA, "rope_theta", 1, {32}},
        {CVQ_T_KEY_W, "key_w", 5, {3, 2, 64, 32, 2}},
        {CVQ_T_VAL_LS, "val_ls", 1, {64}},
        {CVQ_T_VAL_LN_W, "val_ln_w", 1, {64}},
        {CVQ_T_VAL_LN_B, "val_ln_b", 1, {64}},
        {CVQ_T_VAL_W1, "val_w1", 2, {10, 64}},
        {CVQ_T_VAL_B1, "val_b1", 1, {10}},
        {CVQ_T_VAL_W2, "val_w2", 2, {32, 10}},
        {CVQ_T_VAL_B2, "val_b2", 1, {32}},
        {CVQ_T_VAL_E, "val_E", 2, {16, 64}},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        cvq_tensor_info info;
        assert_int_equal(cvq_codebook_tensor_info(cb, want[i].id, &info), CVQ_OK);
        assert_string_equal(info.name, want[i].name);
        assert_int_equal(info.n_dims, want[i].nd);
        uint64_t n = 1;
        for (uint32_t k = 0; k < info.n_dims; k++) {
            assert_int_equal(info.dims[k], want[i].dims[k]);
            n *= info.dims[k];
        }
        assert_int_equal(info.n_elements, n);
        assert_non_null(info.meaning);
        assert_true(strlen(info.meaning) > 10);
    }
    cvq_tensor_info info;
    assert_int_equal(cvq_codebook_tensor_info(cb, (cvq_tensor_id)10, &info),
                     CVQ_ERR_INVALID_ARGUMENT);

    /* Write a distinct value through every view, read it back: views are
     * disjoint and zero-filled at creation. */
    for (int id = CVQ_T_KEY_W; id < CVQ_T_COUNT; id++) {
        assert_int_equal(cvq_codebook_tensor_info(cb, (cvq_tensor_id)id, &info), CVQ_OK);
        const uint32_t ng = id == CVQ_T_KEY_W ? 1 : 3;
        for (uint32_t l = 0; l < 3; l++)
            for (uint32_t gi = 0; gi < ng; gi++) {
                float *p;
                assert_int_equal(cvq_codebook_tensor_data(cb, (cvq_tensor_id)id, l, gi, &p), CVQ_OK);
                for (uint64_t j = 0; j < info.n_elements; j++) {
                    assert_true(p[j] == 0.0f);
                    p[j] = (float)(id * 1000 + l * 100 + gi * 10) + 0.5f;
                }
            }
    }
    for (int id = CVQ_T_KEY_W; id < CVQ_T_COUNT; id++) {
        assert_int_equal(cvq_codebook_tensor_info(cb, (cvq_tensor_id)id, &info), CVQ_OK);
        const uint32_t ng = id == CVQ_T_KEY_W ? 1 : 3;
        for (uint32_t l = 0; l < 3; l++)
            for (uint32_t gi = 0; gi < ng; gi++) {
                const float *p;
                assert_int_equal(cvq_codebook_tensor_cdata(cb, (cvq_tensor_id)id, l, gi, &p), CVQ_OK);
                for (uint64_t j = 0; j < info.n_elements; j++)
                    assert_true(p[j] == (float)(id * 1000 + l * 100 + gi * 10) + 0.5f);
            }
    }
    float *p;
    const float *cp;
    assert_int_equal(cvq_codebook_tensor_data(cb, CVQ_T_KEY_W, 3, 0, &p), CVQ_ERR_LAYER_RANGE);
    assert_int_equal(cvq_codebook_tensor_data(cb, CVQ_T_VAL_E, 0, 3, &p), CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_codebook_tensor_data(cb, CVQ_T_KEY_W, 0, 7, &p), CVQ_OK); /* ignored */
    assert_int_equal(cvq_codebook_tensor_data(cb, CVQ_T_ROPE_THETA, 0, 0, &p), CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_codebook_tensor_cdata(cb, (cvq_tensor_id)77, 0, 0, &cp), CVQ_ERR_INVALID_ARGUMENT);
    assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_LS, 0, 0, NULL), CVQ_ERR_NULL_POINTER);

    /* note */
    assert_string_equal(cvq_codebook_note(cb), "");
    assert_int_equal(cvq_codebook_set_note(cb, "trained on nothing"), CVQ_OK);
    assert_string_equal(cvq_codebook_note(cb), "trained on nothing");
    assert_int_equal(cvq_codebook_set_note(cb, NULL), CVQ_OK);
    assert_string_equal(cvq_codebook_note(cb), "");
    assert_string_equal(cvq_codebook_note(NULL), "");
    cvq_codebook_free(cb);
    cvq_codebook_free(NULL);

    /* refusals leave *out NULL */
    cb = (cvq_codebook *)&g;
    g.head_dim = 72;
    assert_int_equal(cvq_codebook_create(&g, t, NULL, &cb), CVQ_ERR_GEOMETRY);
    assert_null(cb);
    g.head_dim = 64;
    assert_int_equal(cvq_codebook_create(&g, NULL, NULL, &cb), CVQ_ERR_NULL_POINTER);
    assert_null(cb);
    t[5] = NAN;
    assert_int_equal(cvq_codebook_create(&g, t, NULL, &cb), CVQ_ERR_INVALID_ARGUMENT);
    assert_null(cb);
    assert_int_equal(cvq_codebook_random(&g, t, 1, NULL, &cb), CVQ_ERR_INVALID_ARGUMENT);
    assert_null(cb);
    assert_int_equal(cvq_codebook_create(&g, t, NULL, NULL), CVQ_ERR_NULL_POINTER);
    free(t);
}

/* Derived tables against sums written here (numerics contract section 3). */
static void test_commit_tables(void **state) {
    (void)state;
    cvq_codebook *cb = small_codebook(7, NULL);
    cvq_geometry g;
    assert_int_equal(cvq_codebook_geometry(cb, &g), CVQ_OK);
    const uint32_t P = 32, groups = 2, F = 64;
    /* non-trivial ls so the value tables are exercised */
    for (uint32_t l = 0; l < 2; l++)
        for (uint32_t gi = 0; gi < groups; gi++) {
            float *ls;
            assert_int_equal(cvq_codebook_tensor_data(cb, CVQ_T_VAL_LS, l, gi, &ls), CVQ_OK);
            for (uint32_t j = 0; j < F; j++) ls[j] = 0.01f * (float)(j + 1) + (float)l + 0.3f * (float)gi;
        }
    const uint64_t gen0 = cb->generation;
    assert_int_equal(cvq_codebook_commit(cb), CVQ_OK);
    assert_int_equal(cb->generation, gen0 + 1);
    assert_false(cb->dirty);
    for (uint32_t l = 0; l < 2; l++) {
        cvq_layer_view lv;
        assert_int_equal(cvq__layer_view(NULL, cb, l, &lv), CVQ_OK);
        const float *kw;
        assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_KEY_W, l, 0, &kw), CVQ_OK);
        assert_ptr_equal(lv.key_w, kw);
        assert_int_equal(lv.P, P);
        assert_int_equal(lv.n_groups, groups);
        assert_true(lv.inv_F == 1.0f / 64.0f);
        assert_true(lv.logit_scale == g.logit_scale);
        for (uint32_t hr = 0; hr < 2 * 3; hr++) { /* (head, stage) blocks */
            const float *w = kw + (size_t)hr * 64 * P * 2;
            const float *n = lv.key_n + (size_t)hr * 64;
            const float *G = lv.key_G + (size_t)hr * 4096;
            for (int a = 0; a < 64; a++) {
                double s = 0;
                for (uint32_t p = 0; p < P; p++) {
                    const double x = w[(a * P + p) * 2], y = w[(a * P + p) * 2 + 1];
                    s += x * x + y * y;
                }
                assert_true(n[a] == (float)s);
            }
            for (int A = 0; A < 64; A++)
                for (int B = 0; B < 64; B++) {
                    double s = 0;
                    for (uint32_t p = 0; p < P; p++) {
                        const double xA = w[(A * P + p) * 2], yA = w[(A * P + p) * 2 + 1];
                        const double xB = w[(B * P + p) * 2], yB = w[(B * P + p) * 2 + 1];
                        s += xA * yB - yA * xB;
                    }
                    assert_true(G[A * 64 + B] == (float)(-2.0 * s));
                    assert_true(G[A * 64 + B] == -G[B * 64 + A]);
                }
        }
        for (uint32_t gi = 0; gi < groups; gi++) {
            const float *ls, *w1, *b1, *w2, *b2, *E, *lnw, *lnb;
            assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_LS, l, gi, &ls), CVQ_OK);
            assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_LN_W, l, gi, &lnw), CVQ_OK);
            assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_LN_B, l, gi, &lnb), CVQ_OK);
            assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_W1, l, gi, &w1), CVQ_OK);
            assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_B1, l, gi, &b1), CVQ_OK);
            assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_W2, l, gi, &w2), CVQ_OK);
            assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_B2, l, gi, &b2), CVQ_OK);
            assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_VAL_E, l, gi, &E), CVQ_OK);
            assert_ptr_equal(lv.ln_w + gi * lv.s_vec, lnw);
            assert_ptr_equal(lv.ln_b + gi * lv.s_vec, lnb);
            assert_ptr_equal(lv.w1 + gi * lv.s_w1, w1);
            assert_ptr_equal(lv.b1 + gi * lv.s_b1, b1);
            assert_ptr_equal(lv.w2 + gi * lv.s_w2, w2);
            assert_ptr_equal(lv.b2 + gi * lv.s_b2, b2);
            assert_ptr_equal(lv.E + gi * lv.s_E, E);
            for (uint32_t j = 0; j < F; j++) {
                const float e = ls[j] + 1e-6f;
                assert_true(lv.val_ls_eps[gi * F + j] == e);
                assert_true(lv.val_inv_ls[gi * F + j] == 1.0f / e);
            }
        }
    }
    cvq_layer_view lv;
    assert_int_equal(cvq__layer_view(NULL, cb, 2, &lv), CVQ_ERR_LAYER_RANGE);

    /* A NaN written through a view: refused by commit and by the next use,
     * naming the tensor, layer and element; the generation is unchanged. */
    float *w2;
    assert_int_equal(cvq_codebook_tensor_data(cb, CVQ_T_VAL_W2, 1, 1, &w2), CVQ_OK);
    assert_true(cb->dirty);
    const float keep = w2[17];
    w2[17] = NAN;
    const uint64_t gen1 = cb->generation;
    assert_int_equal(cvq_codebook_commit(cb), CVQ_ERR_FORMAT_NONFINITE);
    assert_non_null(strstr(cvq_last_error(), "val_w2"));
    assert_non_null(strstr(cvq_last_error(), "layer 1"));
    assert_non_null(strstr(cvq_last_error(), "group 1"));
    assert_non_null(strstr(cvq_last_error(), "element 17"));
    assert_int_equal(cvq__layer_view(NULL, cb, 0, &lv), CVQ_ERR_FORMAT_NONFINITE);
    assert_int_equal(cb->generation, gen1);
    w2[17] = keep;
    assert_int_equal(cvq__layer_view(NULL, cb, 0, &lv), CVQ_OK); /* commits */
    assert_int_equal(cb->generation, gen1 + 1);
    assert_false(cb->dirty);
    /* ls = -1e-6: ls + eps = 0 has no finite reciprocal */
    float *ls;
    assert_int_equal(cvq_codebook_tensor_data(cb, CVQ_T_VAL_LS, 0, 1, &ls), CVQ_OK);
    ls[3] = -1e-6f;
    assert_int_equal(cvq_codebook_commit(cb), CVQ_ERR_FORMAT_NONFINITE);
    assert_non_null(strstr(cvq_last_error(), "val_ls"));
    ls[3] = 1.0f;
    /* finite sub-codes whose squared norm overflows binary32 */
    float *kw;
    assert_int_equal(cvq_codebook_tensor_data(cb, CVQ_T_KEY_W, 1, 0, &kw), CVQ_OK);
    kw[0] = 1e30f;
    assert_int_equal(cvq_codebook_commit(cb), CVQ_ERR_FORMAT_NONFINITE);
    assert_non_null(strstr(cvq_last_error(), "key_w"));
    kw[0] = 0.0f;
    assert_int_equal(cvq_codebook_commit(cb), CVQ_OK);
    cvq_codebook_free(cb);
}

/* ---- random codebooks ------------------------------------------------------------------ */

static void test_random_reproducible(void **state) {
    (void)state;
    cvq_codebook *a = small_codebook(42, NULL), *b = small_codebook(42, NULL);
    cvq_codebook *c = small_codebook(43, NULL);
    assert_same_tensors(a, b, 0);
    const float *x, *y;
    assert_int_equal(cvq_codebook_tensor_cdata(a, CVQ_T_KEY_W, 0, 0, &x), CVQ_OK);
    assert_int_equal(cvq_codebook_tensor_cdata(c, CVQ_T_KEY_W, 0, 0, &y), CVQ_OK);
    size_t diff = 0;
    for (size_t j = 0; j < 100; j++) diff += x[j] != y[j];
    assert_true(diff > 90);
    cvq_geometry g;
    assert_int_equal(cvq_codebook_geometry(a, &g), CVQ_OK);
    for (uint32_t l = 0; l < 2; l++)
        for (uint32_t gi = 0; gi < 2; gi++) {
            const float *ls, *lnw, *lnb, *b1, *b2, *w1, *E;
            assert_int_equal(cvq_codebook_tensor_cdata(a, CVQ_T_VAL_LS, l, gi, &ls), CVQ_OK);
            assert_int_equal(cvq_codebook_tensor_cdata(a, CVQ_T_VAL_LN_W, l, gi, &lnw), CVQ_OK);
            assert_int_equal(cvq_codebook_tensor_cdata(a, CVQ_T_VAL_LN_B, l, gi, &lnb), CVQ_OK);
            assert_int_equal(cvq_codebook_tensor_cdata(a, CVQ_T_VAL_B1, l, gi, &b1), CVQ_OK);
            assert_int_equal(cvq_codebook_tensor_cdata(a, CVQ_T_VAL_B2, l, gi, &b2), CVQ_OK);
            assert_int_equal(cvq_codebook_tensor_cdata(a, CVQ_T_VAL_W1, l, gi, &w1), CVQ_OK);
            assert_int_equal(cvq_codebook_tensor_cdata(a, CVQ_T_VAL_E, l, gi, &E), CVQ_OK);
            for (int j = 0; j < 64; j++) {
                assert_true(ls[j] == 1.0f);
                assert_true(lnw[j] == 1.0f);
                assert_true(lnb[j] == 0.0f);
            }
            for (uint32_t j = 0; j < g.value_hidden; j++) assert_true(b1[j] == 0.0f);
            for (uint32_t j = 0; j < 2 * g.value_bits; j++) assert_true(b2[j] == 0.0f);
            double s = 0, m = 0;
            const size_t n = (size_t)g.value_hidden * 64;
            for (size_t j = 0; j < n; j++) {
                s += (double)w1[j] * w1[j];
                m += w1[j];
            }
            /* W1 ~ N(0, 1/F): RMS 1/8 within sampling error of 1536 draws */
            assert_true(fabs(sqrt(s / n) - 0.125) < 0.125 * 0.1);
            assert_true(fabs(m / n) < 0.125 * 0.1);
        }
    cvq_codebook_free(a);
    cvq_codebook_free(b);
    cvq_codebook_free(c);
}

/* Greedy residual coding of random unit vectors by brute force in double
 * over all 4096 centres c_p(A,B) = (x_A - y_B, y_A + x_B): the mean residual
 * norm must fall stage after stage, and the sub-code RMS falls
 * geometrically. */
static void check_residual_decreases(cvq_geometry g, uint64_t seed, int n_vec) {
    double *t = rope_default(g.head_dim);
    cvq_codebook *cb = NULL;
    assert_int_equal(cvq_codebook_random(&g, t, seed, NULL, &cb), CVQ_OK);
    free(t);
    assert_int_equal(cvq_codebook_geometry(cb, &g), CVQ_OK);
    const uint32_t d = g.head_dim, P = d / 2, R = g.key_stages, H = g.n_kv_heads;
    const float *kw;
    assert_int_equal(cvq_codebook_tensor_cdata(cb, CVQ_T_KEY_W, 0, 0, &kw), CVQ_OK);

    /* sub-code RMS per stage, head 0 */
    double prev_rms = INFINITY, ratio0 = 0;
    for (uint32_t r = 0; r < R; r++) {
        const float *w = kw + (size_t)r * 64 * P * 2;
        double s = 0;
        for (size_t j = 0; j < 64 * P * 2; j++) s += (double)w[j] * w[j];
        const double rms = sqrt(s / (64.0 * P * 2));
        assert_true(rms < prev_rms);
        if (r == 1) ratio0 = rms / prev_rms;
        if (r > 1) assert_true(fabs(rms / prev_rms - ratio0) < 0.1 * ratio0);
        prev_rms = rms;
    }

    double *mean = calloc(R + 1, sizeof(double));
    double *z = malloc(sizeof(double) * H * d);
    assert_non_null(mean);
    assert_non_null(z);
    uint64_t x = seed * 2654435761u + 1;
    for (int v = 0; v < n_vec; v++) {
        /* a unit vector over the scale's span (all heads, or each head) */
        for (uint32_t i = 0; i < H * d; i++) {
            double s = 0;
            for (int k = 0; k < 12; k++) {
                x = x * 6364136223846793005ull + 1442695040888963407ull;
                s += (double)(x >> 11) / 9007199254740992.0;
            }
            z[i] = s - 6.0;
        }
        /* normalise over the scale's span: each head, or the whole token */
        const int per_head = g.key_scale == CVQ_KEY_SCALE_HEAD;
        const uint32_t span = per_head ? d : H * d;
        for (uint32_t s0 = 0; s0 < H * d; s0 += span) {
            double nn = 0;
            for (uint32_t i = 0; i < span; i++) nn += z[s0 + i] * z[s0 + i];
            for (uint32_t i = 0; i < span; i++) z[s0 + i] /= sqrt(nn);
        }
        for (uint32_t h = 0; h < H; h++) {
            double *zh = z + (size_t)h * d; /* pairs (zh[2p], zh[2p+1]) */
            double nz = 0;
            for (uint32_t i = 0; i < d; i++) nz += zh[i] * zh[i];
            mean[0] += sqrt(nz) / (n_vec * H);
            for (uint32_t r = 0; r < R; r++) {
                const float *w = kw + ((size_t)h * R + r) * 64 * P * 2;
                double best = INFINITY;
                int bA = 0, bB = 0;
                for (int A = 0; A < 64; A++)
                    for (int B = 0; B < 64; B++) {
                        double dist = 0;
                        for (uint32_t p = 0; p < P; p++) {
                            const double cr = (double)w[(A * P + p) * 2] - w[(B * P + p) * 2 + 1];
                            const double ci = (double)w[(A * P + p) * 2 + 1] + w[(B * P + p) * 2];
                            /* layout is irrelevant for a norm: any fixed
                             * assignment of pairs to indices works */
                            const double er = zh[2 * p] - cr, ei = zh[2 * p + 1] - ci;
                            dist += er * er + ei * ei;
                        }
                        if (dist < best) {
                            best = dist;
                            bA = A;
                            bB = B;
                        }
                    }
                for (uint32_t p = 0; p < P; p++) {
                    zh[2 * p] -= (double)w[(bA * P + p) * 2] - w[(bB * P + p) * 2 + 1];
                    zh[2 * p + 1] -= (double)w[(bA * P + p) * 2 + 1] + w[(bB * P + p) * 2];
                }
                mean[r + 1] += sqrt(best) / (n_vec * H);
            }
        }
    }
    for (uint32_t r = 0; r < R; r++) {
        if (!(mean[r + 1] < mean[r]))
            fail_msg("d=%u R=%u: mean residual norm after stage %u = %g, before %g", d, R,
                     r, mean[r + 1], mean[r]);
    }
    /* the random codebook roughly shrinks the residual overall */
    assert_true(mean[R] < 0.9 * mean[0]);
    print_message("random codebook d=%u Hkv=%u R=%u %s: mean residual %.4f -> %.4f\n", d,
                  H, R, g.key_scale == CVQ_KEY_SCALE_HEAD ? "head" : "token", mean[0],
                  mean[R]);
    free(mean);
    free(z);
    cvq_codebook_free(cb);
}

static void test_random_residual_decreases(void **state) {
    (void)state;
    cvq_geometry g = geom(1, 2, 2, 64, 8, 8, 0, 8);
    check_residual_decreases(g, 3, 24);
    g = geom(1, 1, 1, 128, 6, 8, 0, 8);
    g.key_scale = CVQ_KEY_SCALE_HEAD;
    check_residual_decreases(g, 4, 16);
}

/* ---- file: round trips ------------------------------------------------------------------ */

static void test_file_round_trip_fp32(void **state) {
    (void)state;
    cvq_codebook *a = small_codebook(11, NULL);
    assert_int_equal(cvq_codebook_set_note(a, "seed 11; test codebook"), CVQ_OK);
    char path[512];
    tmp_path(path, sizeof path, "rt32");
    assert_int_equal(cvq_codebook_save(a, path, 0), CVQ_OK);
    cvq_codebook *b = NULL;
    assert_int_equal(cvq_codebook_load(path, NULL, &b), CVQ_OK);
    assert_same_tensors(a, b, 0);
    assert_string_equal(cvq_codebook_note(b), "seed 11; test codebook");
    assert_false(b->dirty);
    /* the documented layout, independently parsed */
    size_t size;
    uint8_t *bytes = read_all(path, &size);
    fsec s[16];
    const uint32_t n = parse_table(bytes, size, s, 16);
    assert_int_equal(n, 12);
    const char *names[12] = {"geometry", "rope_theta", "note", "key_w", "val_ls",
                             "val_ln_w", "val_ln_b", "val_w1", "val_b1", "val_w2",
                             "val_b2", "val_E"};
    for (uint32_t i = 0; i < n; i++) assert_string_equal(s[i].name, names[i]);
    const fsec *ge = find_sec(s, n, "geometry");
    assert_int_equal(ge->dtype, 5);
    assert_int_equal(ge->dims[0], 11);
    const uint32_t want_geom[10] = {2, 4, 2, 64, 3, 1, 1, 64, 16, 24};
    for (int i = 0; i < 10; i++) assert_int_equal(rd32(bytes + ge->offset + 4 * i), want_geom[i]);
    assert_int_equal(rd32(bytes + ge->offset + 40), 0x3E000000u); /* 0.125f */
    const fsec *kw = find_sec(s, n, "key_w");
    assert_int_equal(kw->dtype, 1);
    assert_int_equal(kw->rank, 6);
    const uint64_t kd[6] = {2, 2, 3, 64, 32, 2};
    assert_memory_equal(kw->dims, kd, sizeof kd);
    const fsec *w2 = find_sec(s, n, "val_w2");
    assert_int_equal(w2->rank, 4);
    const uint64_t wd[4] = {2, 2, 32, 24};
    assert_memory_equal(w2->dims, wd, sizeof wd);
    /* element [1][1][5][7] of val_w2 is the float at that index */
    const float *w2v;
    assert_int_equal(cvq_codebook_tensor_cdata(a, CVQ_T_VAL_W2, 1, 1, &w2v), CVQ_OK);
    const uint32_t bits = rd32(bytes + w2->offset + 4 * (((1 * 2 + 1) * 32 + 5) * 24 + 7));
    float f;
    memcpy(&f, &bits, 4);
    assert_true(f == w2v[5 * 24 + 7]);
    const fsec *rt = find_sec(s, n, "rope_theta");
    assert_int_equal(rt->dtype, 3);
    const fsec *no = find_sec(s, n, "note");
    assert_int_equal(no->dtype, 4);
    assert_memory_equal(bytes + no->offset, "seed 11; test codebook", 22);

    /* load_memory gives the same codebook */
    cvq_codebook *c = NULL;
    assert_int_equal(load_exact(bytes, size, &c), CVQ_OK);
    assert_same_tensors(a, c, 0);
    free(bytes);
    cvq_codebook_free(c);
    /* saving the loaded codebook reproduces the file byte for byte */
    char path2[512];
    tmp_path(path2, sizeof path2, "rt32b");
    assert_int_equal(cvq_codebook_save(b, path2, 0), CVQ_OK);
    size_t s1, s2;
    uint8_t *f1 = read_all(path, &s1), *f2 = read_all(path2, &s2);
    assert_int_equal(s1, s2);
    assert_memory_equal(f1, f2, s1);
    free(f1);
    free(f2);
    remove(path);
    remove(path2);
    cvq_codebook_free(a);
    cvq_codebook_free(b);
}

static void test_file_round_trip_fp16(void **state) {
    (void)state;
    cvq_codebook *a = small_codebook(12, NULL);
    /* values that exercise binary16 rounding: subnormal, tie, max */
    float *ln_b;
    assert_int_equal(cvq_codebook_tensor_data(a, CVQ_T_VAL_LN_B, 1, 0, &ln_b), CVQ_OK);
    ln_b[0] = 1e-6f;
    ln_b[1] = 1.0f + 1.0f / 2048.0f; /* tie between two binary16 values */
    ln_b[2] = 65504.0f;
    ln_b[3] = -65519.0f; /* rounds to -65504 */
    ln_b[4] = 1e-9f;     /* underflows to 0 */
    char path[512];
    tmp_path(path, sizeof path, "rt16");
    assert_int_equal(cvq_codebook_save(a, path, CVQ_SAVE_FP16), CVQ_OK);
    cvq_codebook *b = NULL;
    assert_int_equal(cvq_codebook_load(path, NULL, &b), CVQ_OK);
    assert_same_tensors(a, b, 1);
    const float *lb;
    assert_int_equal(cvq_codebook_tensor_cdata(b, CVQ_T_VAL_LN_B, 1, 0, &lb), CVQ_OK);
    assert_true(lb[1] == 1.0f);
    assert_true(lb[2] == 65504.0f);
    assert_true(lb[3] == -65504.0f);
    assert_true(lb[4] == 0.0f);
    size_t size;
    uint8_t *bytes = read_all(path, &size);
    fsec s[16];
    const uint32_t n = parse_table(bytes, size, s, 16);
    assert_int_equal(find_sec(s, n, "key_w")->dtype, 2);
    assert_int_equal(find_sec(s, n, "rope_theta")->dtype, 3); /* stays f64 */
    free(bytes);
    remove(path);

    /* a value that overflows binary16: refused, no file written */
    ln_b[3] = -65520.0f;
    assert_int_equal(cvq_codebook_save(a, path, CVQ_SAVE_FP16), CVQ_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(cvq_last_error(), "val_ln_b"));
    FILE *f = fopen(path, "rb");
    assert_null(f);
    assert_int_equal(cvq_codebook_save(a, path, 0), CVQ_OK); /* fp32 is fine */
    remove(path);
    assert_int_equal(cvq_codebook_save(a, path, 0x80), CVQ_ERR_INVALID_ARGUMENT);
    /* a NaN in the codebook is refused before anything is written */
    ln_b[3] = NAN;
    assert_int_equal(cvq_codebook_save(a, path, 0), CVQ_ERR_FORMAT_NONFINITE);
    f = fopen(path, "rb");
    assert_null(f);
    cvq_codebook_free(a);
    cvq_codebook_free(b);
}

/* ---- file: refusals ------------------------------------------------------------------- */

static uint8_t *tiny_file(size_t *size, uint32_t flags, const char *note) {
    cvq_codebook *cb = tiny_codebook(5);
    if (note) assert_int_equal(cvq_codebook_set_note(cb, note), CVQ_OK);
    char path[512];
    tmp_path(path, sizeof path, "tiny");
    assert_int_equal(cvq_codebook_save(cb, path, flags), CVQ_OK);
    cvq_codebook_free(cb);
    uint8_t *b = read_all(path, size);
    remove(path);
    return b;
}

static void test_file_truncated(void **state) {
    (void)state;
    size_t size;
    uint8_t *b = tiny_file(&size, CVQ_SAVE_FP16, "x");
    /* every proper prefix, each in a heap block of exactly its size */
    for (size_t n = 0; n < size; n++) {
        cvq_codebook *cb = (cvq_codebook *)b;
        cvq_status s = load_exact(b, n, &cb);
        if (s != CVQ_ERR_FORMAT_TRUNCATED)
            fail_msg("prefix of %zu/%zu bytes: %s (%s)", n, size, cvq_status_name(s),
                     cvq_last_error());
        assert_null(cb);
    }
    cvq_codebook *cb = NULL;
    assert_int_equal(load_exact(b, size, &cb), CVQ_OK);
    cvq_codebook_free(cb);
    /* one byte too many */
    uint8_t *longer = malloc(size + 1);
    assert_non_null(longer);
    memcpy(longer, b, size);
    longer[size] = 0;
    assert_int_equal(load_exact(longer, size + 1, &cb), CVQ_ERR_FORMAT);
    free(longer);
    /* through the file path too, at a few lengths */
    char path[512];
    tmp_path(path, sizeof path, "trunc");
    const size_t lens[] = {0, 7, 63, 64, 100, size / 2, size - 1};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        write_all(path, b, lens[i]);
        assert_int_equal(cvq_codebook_load(path, NULL, &cb), CVQ_ERR_FORMAT_TRUNCATED);
        assert_null(cb);
    }
    remove(path);
    free(b);
}

/* Single bit flips: every bit of the header and table, and a dense sample
 * of the data (the first and last 64 bytes of every section and gap, every
 * 7th byte elsewhere, a rotating bit). Each must be refused with the status
 * the format prescribes for that region. */
static void test_file_bit_flips(void **state) {
    (void)state;
    size_t size;
    uint8_t *b = tiny_file(&size, 0, "provenance");
    fsec s[16];
    const uint32_t n = parse_table(b, size, s, 16);
    const size_t table_end = HDR + (size_t)n * ENT;
    size_t tried = 0;
    for (size_t byte = 0; byte < size; byte++) {
        /* region of this byte */
        int sec = -1;
        size_t rel = 0, len = 0;
        for (uint32_t i = 0; i < n; i++)
            if (byte >= s[i].offset && byte < s[i].offset + s[i].size) {
                sec = (int)i;
                rel = byte - s[i].offset;
                len = (size_t)s[i].size;
            }
        const bool head = byte < table_end;
        if (!head && sec >= 0 && rel >= 64 && rel + 64 < len && rel % 7 != 0) continue;
        const int b0 = head ? 0 : (int)(byte % 8), b1 = head ? 8 : b0 + 1;
        for (int bit = b0; bit < b1; bit++) {
            b[byte] ^= (uint8_t)(1u << bit);
            cvq_codebook *cb = (cvq_codebook *)b;
            const cvq_status st = load_exact(b, size, &cb);
            b[byte] ^= (uint8_t)(1u << bit);
            tried++;
            assert_null(cb);
            cvq_status want;
            if (byte < 8)
                want = CVQ_ERR_FORMAT; /* magic */
            else if (byte < 12)
                want = CVQ_ERR_FORMAT_VERSION;
            else if (head)
                want = (cvq_status)-1; /* any refusal below */
            else if (sec >= 0)
                want = CVQ_ERR_FORMAT_CHECKSUM;
            else
                want = CVQ_ERR_FORMAT; /* padding must be zero */
            if (want == (cvq_status)-1) {
                if (st != CVQ_ERR_FORMAT && st != CVQ_ERR_FORMAT_CHECKSUM &&
                    st != CVQ_ERR_FORMAT_TRUNCATED)
                    fail_msg("flip byte %zu bit %d (header/table): %s", byte, bit,
                             cvq_status_name(st));
            } else if (st != want) {
                fail_msg("flip byte %zu bit %d (%s): %s, expected %s (%s)", byte, bit,
                         sec >= 0 ? s[sec].name : "padding", cvq_status_name(st),
                         cvq_status_name(want), cvq_last_error());
            }
            if (st == CVQ_ERR_FORMAT_CHECKSUM && sec >= 0 && !head)
                assert_non_null(strstr(cvq_last_error(), s[sec].name));
        }
    }
    print_message("bit flips tried: %zu of a %zu-byte file\n", tried, size);
    free(b);
}

static void test_file_version_and_contents(void **state) {
    (void)state;
    size_t size;
    uint8_t *orig = tiny_file(&size, 0, NULL);
    uint8_t *b = malloc(size);
    assert_non_null(b);
    fsec s[16];
    const uint32_t n = parse_table(orig, size, s, 16);
    cvq_codebook *cb = NULL;

    /* unknown versions, with the header CRC made right */
    const uint32_t versions[] = {0, 2, 7, 0xFFFFFFFFu};
    for (size_t i = 0; i < 4; i++) {
        memcpy(b, orig, size);
        wr32(b + 8, versions[i]);
        fix_crcs(b, NULL);
        assert_int_equal(load_exact(b, size, &cb), CVQ_ERR_FORMAT_VERSION);
        char want[32];
        snprintf(want, sizeof want, "version %u", versions[i]);
        assert_non_null(strstr(cvq_last_error(), want));
    }
    /* NaN in a tensor, CRCs recomputed */
    memcpy(b, orig, size);
    const fsec *w1 = find_sec(s, n, "val_w1");
    wr32(b + w1->offset + 4 * 9, 0x7FC00000u);
    fix_crcs(b, w1);
    assert_int_equal(load_exact(b, size, &cb), CVQ_ERR_FORMAT_NONFINITE);
    assert_non_null(strstr(cvq_last_error(), "val_w1"));
    /* +Inf in key_w */
    memcpy(b, orig, size);
    const fsec *kw = find_sec(s, n, "key_w");
    wr32(b + kw->offset + 4 * 1000, 0x7F800000u);
    fix_crcs(b, kw);
    assert_int_equal(load_exact(b, size, &cb), CVQ_ERR_FORMAT_NONFINITE);
    /* NaN rope theta */
    memcpy(b, orig, size);
    const fsec *rt = find_sec(s, n, "rope_theta");
    wr32(b + rt->offset + 8 * 3 + 4, 0x7FF80000u);
    fix_crcs(b, rt);
    assert_int_equal(load_exact(b, size, &cb), CVQ_ERR_FORMAT_NONFINITE);
    /* geometry inconsistent with the tensors: I = 16 instead of 8 */
    memcpy(b, orig, size);
    const fsec *ge = find_sec(s, n, "geometry");
    wr32(b + ge->offset + 4 * 9, 16);
    fix_crcs(b, ge);
    assert_int_equal(load_exact(b, size, &cb), CVQ_ERR_FORMAT);
    assert_non_null(strstr(cvq_last_error(), "val_w1"));
    /* A header promising a far larger model than its sections hold (the
     * fuzz_cvq finding: n_layers raised, sections left as they are) is
     * refused from the section shapes before anything of the model's size
     * is allocated. The allocator records the largest request and refuses
     * any over 64 MiB, so the old order (create, then compare shapes) fails
     * here with a request of gigabytes. */
    const uint32_t layers[] = {1000, 100000, 0x7FFFFFFFu};
    for (size_t i = 0; i < sizeof layers / sizeof layers[0]; i++) {
        memcpy(b, orig, size);
        wr32(b + ge->offset + 4 * 0, layers[i]);
        fix_crcs(b, ge);
        s_biggest = 0;
        counting cnt = {0, 0, 0};
        cvq_allocator al = {c_alloc_capped, c_free, &cnt};
        uint8_t *copy = malloc(size);
        assert_non_null(copy);
        memcpy(copy, b, size);
        const cvq_status st = cvq_codebook_load_memory(copy, size, &al, &cb);
        free(copy);
        if (st != CVQ_ERR_FORMAT && st != CVQ_ERR_GEOMETRY)
            fail_msg("n_layers %u: got %s (%s)", layers[i], cvq_status_name(st), cvq_last_error());
        assert_null(cb);
        assert_int_equal(cnt.live, 0);
        if (s_biggest > ((size_t)1 << 20))
            fail_msg("n_layers %u: the loader asked for %zu bytes before refusing the file", layers[i],
                     s_biggest);
    }
    /* unsupported geometry: d = 72 */
    memcpy(b, orig, size);
    wr32(b + ge->offset + 4 * 3, 72);
    fix_crcs(b, ge);
    assert_int_equal(load_exact(b, size, &cb), CVQ_ERR_GEOMETRY);
    /* unresolved default stored (I = 0) */
    memcpy(b, orig, size);
    wr32(b + ge->offset + 4 * 9, 0);
    fix_crcs(b, ge);
    assert_int_equal(load_exact(b, size, &cb), CVQ_ERR_FORMAT);
    /* unknown dtype in a table entry */
    memcpy(b, orig, size);
    wr32(b + kw->entry + 32, 9);
    fix_crcs(b, NULL);
    assert_int_equal(load_exact(b, size, &cb), CVQ_ERR_FORMAT);
    /* misaligned section */
    memcpy(b, orig, size);
    wr32(b + kw->entry + 88, (uint32_t)kw->offset + 4);
    fix_crcs(b, NULL);
    assert_int_equal(load_exact(b, size, &cb), CVQ_ERR_FORMAT);
    /* overlapping sections: val_ls pointed at key_w's bytes */
    memcpy(b, orig, size);
    const fsec *ls = find_sec(s, n, "val_ls");
    wr32(b + ls->entry + 88, (uint32_t)kw->offset);
    fix_crcs(b, NULL);
    assert_int_equal(load_exact(b, size, &cb), CVQ_ERR_FORMAT);
    /* renamed (unknown) section, so a required one is missing */
    memcpy(b, orig, size);
    b[ls->entry + 4] = 'X';
    fix_crcs(b, NULL);
    assert_int_equal(load_exact(b, size, &cb), CVQ_ERR_FORMAT);
    /* bad magic */
    memcpy(b, orig, size);
    b[0] = 'X';
    assert_int_equal(load_exact(b, size, &cb), CVQ_ERR_FORMAT);
    assert_int_equal(load_exact((const uint8_t *)"GGUF", 4, &cb), CVQ_ERR_FORMAT);
    /* the untouched file still loads */
    assert_int_equal(load_exact(orig, size, &cb), CVQ_OK);
    cvq_codebook_free(cb);
    free(b);
    free(orig);
}

static void test_file_io_errors(void **state) {
    (void)state;
    cvq_codebook *cb = (cvq_codebook *)&cb;
    char path[512];
    snprintf(path, sizeof path, "%s/cvq_no_such_dir_%ld/x.cvq", tmp_dir(), (long)getpid());
    assert_int_equal(cvq_codebook_load(path, NULL, &cb), CVQ_ERR_IO);
    assert_null(cb);
    assert_non_null(strstr(cvq_last_error(), "x.cvq"));
    assert_int_equal(cvq_codebook_load(tmp_dir(), NULL, &cb), CVQ_ERR_IO); /* a folder */
    assert_null(cb);
    cvq_codebook *t = tiny_codebook(1);
    assert_int_equal(cvq_codebook_save(t, path, 0), CVQ_ERR_IO);
    assert_int_equal(cvq_codebook_save(t, NULL, 0), CVQ_ERR_NULL_POINTER);
    assert_int_equal(cvq_codebook_save(NULL, path, 0), CVQ_ERR_NULL_POINTER);
    assert_int_equal(cvq_codebook_load(NULL, NULL, &cb), CVQ_ERR_NULL_POINTER);
    assert_int_equal(cvq_codebook_load(path, NULL, NULL), CVQ_ERR_NULL_POINTER);
    assert_int_equal(cvq_codebook_load_memory(NULL, 10, NULL, &cb), CVQ_ERR_NULL_POINTER);
    cvq_codebook_free(t);
}

/* ---- allocation failures ------------------------------------------------------------- */

static void test_alloc_failures(void **state) {
    (void)state;
    /* a file to load */
    cvq_codebook *src = small_codebook(9, NULL);
    assert_int_equal(cvq_codebook_set_note(src, "note"), CVQ_OK);
    char path[512];
    tmp_path(path, sizeof path, "oom");
    assert_int_equal(cvq_codebook_save(src, path, 0), CVQ_OK);

    for (int which = 0; which < 3; which++) {
        long n_fail = 0;
        for (long k = 1;; k++) {
            counting c = {0, 0, k};
            const cvq_allocator a = {c_alloc, c_free, &c};
            cvq_codebook *cb = (cvq_codebook *)&c;
            cvq_status s;
            if (which == 0)
                s = cvq_codebook_load(path, &a, &cb);
            else if (which == 1) {
                size_t size;
                uint8_t *b = read_all(path, &size);
                s = cvq_codebook_load_memory(b, size, &a, &cb);
                free(b);
            } else {
                cvq_geometry g = geom(2, 4, 2, 64, 3, 16, 64, 24);
                double *t = rope_default(64);
                s = cvq_codebook_random(&g, t, 1, &a, &cb);
                free(t);
            }
            if (s == CVQ_OK) {
                assert_non_null(cb);
                if (which < 2) assert_same_tensors(src, cb, 0);
                assert_true(c.live > 0);
                cvq_codebook_free(cb);
                assert_int_equal(c.live, 0);
                assert_true(c.calls < k); /* the k-th call never happened */
                break;
            }
            if (s != CVQ_ERR_OUT_OF_MEMORY)
                fail_msg("case %d, failing allocation %ld: %s", which, k, cvq_status_name(s));
            assert_null(cb);
            if (c.live != 0) fail_msg("case %d, failing allocation %ld: %ld leaked", which, k, c.live);
            n_fail++;
        }
        assert_true(n_fail >= 10);
    }
    /* set_note out of memory keeps the old note */
    counting c = {0, 0, 0};
    const cvq_allocator a = {c_alloc, c_free, &c};
    cvq_codebook *cb = NULL;
    cvq_geometry g = geom(1, 1, 1, 64, 1, 8, 0, 8);
    double *t = rope_default(64);
    assert_int_equal(cvq_codebook_create(&g, t, &a, &cb), CVQ_OK);
    free(t);
    assert_int_equal(cvq_codebook_set_note(cb, "first"), CVQ_OK);
    c.fail_at = c.calls + 1;
    assert_int_equal(cvq_codebook_set_note(cb, "second"), CVQ_ERR_OUT_OF_MEMORY);
    assert_string_equal(cvq_codebook_note(cb), "first");
    cvq_codebook_free(cb);
    assert_int_equal(c.live, 0);
    remove(path);
    cvq_codebook_free(src);
}

static void test_crc_reference(void **state) {
    (void)state;
    /* the check value of CRC-32/ISO-HDLC, to validate this file's CRC */
    assert_int_equal(crc32_bitwise((const uint8_t *)"123456789", 9, 0), 0xCBF43926u);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crc_reference),
        cmocka_unit_test(test_geometry_defaults),
        cmocka_unit_test(test_geometry_invalid),
        cmocka_unit_test(test_record_layout),
        cmocka_unit_test(test_pack_known_answer),
        cmocka_unit_test(test_pack_round_trip),
        cmocka_unit_test(test_codebook_create_and_views),
        cmocka_unit_test(test_commit_tables),
        cmocka_unit_test(test_random_reproducible),
        cmocka_unit_test(test_random_residual_decreases),
        cmocka_unit_test(test_file_round_trip_fp32),
        cmocka_unit_test(test_file_round_trip_fp16),
        cmocka_unit_test(test_file_truncated),
        cmocka_unit_test(test_file_bit_flips),
        cmocka_unit_test(test_file_version_and_contents),
        cmocka_unit_test(test_file_io_errors),
        cmocka_unit_test(test_alloc_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
