/*
 * Tests of the example inference program's GGUF reader and BPE tokenizer
 * (examples/llama). The files are written here byte by byte from the GGUF
 * layout, so the expected values are the ones the test wrote, never ones the
 * reader produced; expected token ids are worked out by hand from the
 * merges (comments give the derivation).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

/* The example's sources are compiled into this test (they are not part of
 * the library). */
#include "../examples/llama/gguf.c"
#include "../examples/llama/tokenizer.c"

/* ---- a little GGUF writer ---------------------------------------------------- */

typedef struct buf {
    uint8_t *p;
    size_t n, cap;
} buf;

static void put(buf *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        size_t nc = (b->n + n) * 2 + 64;
        uint8_t *np = (uint8_t *)realloc(b->p, nc);
        assert_non_null(np);
        b->p = np;
        b->cap = nc;
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}

static void put_le(buf *b, uint64_t v, unsigned bytes) {
    uint8_t t[8];
    unsigned i;
    for (i = 0; i < bytes; i++) t[i] = (uint8_t)(v >> (8 * i));
    put(b, t, bytes);
}

static void put_u32(buf *b, uint32_t v) { put_le(b, v, 4); }
static void put_u64(buf *b, uint64_t v) { put_le(b, v, 8); }

static void put_str(buf *b, const char *s) {
    put_u64(b, strlen(s));
    put(b, s, strlen(s));
}

static void pad_to(buf *b, size_t align) {
    while (b->n % align) put_le(b, 0, 1);
}

/* Offsets of interesting fields in the file made by make_valid(). */
typedef struct layout {
    size_t version_at, n_tensors_at, n_kv_at, kv2_type_at, arr_type_at,
           t0_ndims_at, t0_dim0_at, t0_type_at, t0_offset_at, t1_offset_at,
           data_at;
} layout;

/* A valid file: 3 metadata entries, tensor "a" F32 [4,2] = 0..7, tensor
 * "q" Q8_0 [32,2] (two blocks, d = 0.5 / 2.0, q[j] = j - 16) ending exactly
 * at the end of the file. */
static buf make_valid(layout *L, uint32_t alignment) {
    buf b = {NULL, 0, 0};
    uint32_t i, j;
    put_u32(&b, 0x46554747u);
    L->version_at = b.n;
    put_u32(&b, 3);
    L->n_tensors_at = b.n;
    put_u64(&b, 2);
    L->n_kv_at = b.n;
    put_u64(&b, alignment != 32 ? 4 : 3);
    put_str(&b, "general.architecture");
    put_u32(&b, 8);
    put_str(&b, "llama");
    put_str(&b, "test.count");
    L->kv2_type_at = b.n;
    put_u32(&b, 4);
    put_u32(&b, 42);
    put_str(&b, "test.words");
    put_u32(&b, 9);
    L->arr_type_at = b.n;
    put_u32(&b, 8);
    put_u64(&b, 2);
    put_str(&b, "alpha");
    put_str(&b, "");
    if (alignment != 32) {
        put_str(&b, "general.alignment");
        put_u32(&b, 4);
        put_u32(&b, alignment);
    }
    put_str(&b, "a");
    L->t0_ndims_at = b.n;
    put_u32(&b, 2);
    L->t0_dim0_at = b.n;
    put_u64(&b, 4);
    put_u64(&b, 2);
    L->t0_type_at = b.n;
    put_u32(&b, 0);
    L->t0_offset_at = b.n;
    put_u64(&b, 0);
    put_str(&b, "q");
    put_u32(&b, 2);
    put_u64(&b, 32);
    put_u64(&b, 2);
    put_u32(&b, 8);
    L->t1_offset_at = b.n;
    put_u64(&b, alignment); /* "a" takes 32 bytes <= alignment */
    pad_to(&b, alignment);
    L->data_at = b.n;
    for (i = 0; i < 8; i++) {
        float f = (float)i;
        uint32_t u;
        memcpy(&u, &f, 4);
        put_u32(&b, u);
    }
    pad_to(&b, alignment);
    for (i = 0; i < 2; i++) {
        put_le(&b, i == 0 ? 0x3800 : 0x4000, 2); /* fp16 0.5, 2.0 */
        for (j = 0; j < 32; j++) put_le(&b, (uint8_t)(int8_t)((int)j - 16), 1);
    }
    return b;
}

static void patch(buf *b, size_t at, uint64_t v, unsigned bytes) {
    unsigned i;
    for (i = 0; i < bytes; i++) b->p[at + i] = (uint8_t)(v >> (8 * i));
}

/* Opens b and expects failure with a message containing want. */
static void expect_fail(const buf *b, const char *want) {
    gguf_file *f = (gguf_file *)(uintptr_t)1;
    char err[512] = "";
    int rc = gguf_open_memory(b->p, b->n, 1, &f, err, sizeof err);
    if (rc == 0 || f != NULL || strstr(err, want) == NULL) {
        fprintf(stderr, "expected failure with \"%s\", got rc %d, message \"%s\"\n", want,
                rc, err);
        gguf_close(f);
        fail();
    }
}

static void test_valid_file(void **state) {
    layout L;
    uint32_t al[2] = {32, 64}, k;
    (void)state;
    for (k = 0; k < 2; k++) {
        buf b = make_valid(&L, al[k]);
        gguf_file *f = NULL;
        char err[256] = "";
        const gguf_kv *kv;
        const gguf_tensor *t;
        uint32_t u = 0;
        float x;
        assert_int_equal(gguf_open_memory(b.p, b.n, 1, &f, err, sizeof err), 0);
        assert_int_equal(f->version, 3);
        assert_int_equal(f->alignment, al[k]);
        assert_int_equal(f->data_offset, L.data_at);
        assert_int_equal(gguf_get_u32(f, "test.count", &u, err, sizeof err), 0);
        assert_int_equal(u, 42);
        assert_int_not_equal(gguf_get_u32(f, "test.missing", &u, err, sizeof err), 0);
        assert_non_null(strstr(err, "test.missing"));
        assert_int_not_equal(gguf_get_f32(f, "test.count", &x, err, sizeof err), 0);
        kv = gguf_find_kv(f, "general.architecture");
        assert_non_null(kv);
        assert_int_equal(kv->str.len, 5);
        assert_memory_equal(kv->str.ptr, "llama", 5);
        assert_int_equal(gguf_get_array(f, "test.words", GGUF_T_STRING, &kv, err, sizeof err), 0);
        assert_int_equal(kv->arr_count, 2);
        assert_memory_equal(kv->strs[0].ptr, "alpha", 5);
        assert_int_equal(kv->strs[1].len, 0);
        t = gguf_find_tensor(f, "a");
        assert_non_null(t);
        assert_int_equal(t->n_bytes, 32);
        assert_ptr_equal(t->data, f->image + L.data_at);
        memcpy(&x, t->data + 4 * 7, 4);
        assert_true(x == 7.0f);
        t = gguf_find_tensor(f, "q");
        assert_non_null(t);
        assert_int_equal(t->ne[0], 32);
        assert_int_equal(t->ne[1], 2);
        assert_int_equal(t->n_bytes, 68);
        assert_ptr_equal(t->data + t->n_bytes, f->image + f->size);
        assert_null(gguf_find_tensor(f, "nope"));
        gguf_close(f);
        free(b.p);
    }
}

/* Every strict prefix of a valid file must be refused (the last tensor ends
 * at the end of the file), with a message, and never read out of bounds
 * (the prefix is copied into an exact-size allocation, so ASan/valgrind
 * catch any overread). */
static void test_truncation(void **state) {
    layout L;
    buf b = make_valid(&L, 32);
    size_t n;
    (void)state;
    for (n = 0; n < b.n; n++) {
        gguf_file *f = NULL;
        char err[512] = "";
        uint8_t *copy = (uint8_t *)malloc(n ? n : 1);
        assert_non_null(copy);
        memcpy(copy, b.p, n);
        if (gguf_open_memory(copy, n, 0, &f, err, sizeof err) == 0) {
            fprintf(stderr, "prefix of %zu of %zu bytes was accepted\n", n, b.n);
            fail();
        }
        assert_null(f);
        assert_true(strlen(err) > 0);
        if (n < L.data_at && strstr(err, "truncated") == NULL) {
            fprintf(stderr, "prefix %zu: \"%s\"\n", n, err);
            fail();
        }
        free(copy);
    }
    free(b.p);
}

static void test_malformed(void **state) {
    layout L;
    buf b;
    (void)state;
#define CASE(at, val, bytes, want)         \
    b = make_valid(&L, 32);                \
    patch(&b, (at), (val), (bytes));       \
    expect_fail(&b, want);                 \
    free(b.p);
    CASE(0, 0x46554746u, 4, "bad magic")
    CASE(L.version_at, 1, 4, "version 1")
    CASE(L.version_at, 4, 4, "version 4")
    CASE(L.kv2_type_at, 13, 4, "bad value type 13")
    CASE(L.arr_type_at, 9, 4, "nested arrays")
    CASE(L.arr_type_at, 77, 4, "bad array element type")
    CASE(L.n_kv_at, UINT64_C(1) << 62, 8, "cannot fit")
    CASE(L.n_tensors_at, UINT64_MAX, 8, "cannot fit")
    CASE(L.t0_ndims_at, 0, 4, "0 dimensions")
    CASE(L.t0_ndims_at, 5, 4, "5 dimensions")
    CASE(L.t0_dim0_at, 0, 8, "dimension 0 is 0")
    CASE(L.t0_type_at, 99, 4, "unknown ggml type 99")
    CASE(L.t0_type_at, 8, 4, "not a multiple of the Q8_0 block")
    CASE(L.t0_offset_at, 7, 8, "not a multiple of the alignment")
    CASE(L.t0_offset_at, 4096, 8, "outside")
    CASE(L.t0_offset_at, UINT64_MAX - 31, 8, "outside")
    CASE(L.t1_offset_at, 64, 8, "outside")
#undef CASE
    /* a string longer than the file */
    b = make_valid(&L, 32);
    patch(&b, 24, UINT64_MAX, 8); /* length of the first key */
    expect_fail(&b, "truncated");
    free(b.p);
    /* byte count overflow: 4 dimensions of 2^40 */
    {
        buf c = {NULL, 0, 0};
        put_u32(&c, 0x46554747u);
        put_u32(&c, 3);
        put_u64(&c, 1);
        put_u64(&c, 0);
        put_str(&c, "big");
        put_u32(&c, 4);
        put_u64(&c, UINT64_C(1) << 40);
        put_u64(&c, UINT64_C(1) << 40);
        put_u64(&c, UINT64_C(1) << 40);
        put_u64(&c, UINT64_C(1) << 40);
        put_u32(&c, 0);
        put_u64(&c, 0);
        pad_to(&c, 32);
        expect_fail(&c, "overflows");
        free(c.p);
    }
    /* duplicate key, bad alignment, bad bool */
    {
        const char *what[3] = {"duplicate metadata key", "not a power of two", "bool value"};
        int k;
        for (k = 0; k < 3; k++) {
            buf c = {NULL, 0, 0};
            put_u32(&c, 0x46554747u);
            put_u32(&c, 3);
            put_u64(&c, 0);
            put_u64(&c, 2);
            put_str(&c, k == 1 ? "general.alignment" : "x");
            put_u32(&c, k == 2 ? 7 : 4);
            if (k == 2) put_le(&c, 2, 1);
            else put_u32(&c, k == 1 ? 48 : 1);
            put_str(&c, k == 0 ? "x" : "y");
            put_u32(&c, 4);
            put_u32(&c, 1);
            expect_fail(&c, what[k]);
            free(c.p);
        }
    }
}

/* Random byte mutations: the reader must accept or refuse, never crash, and
 * whatever it accepts must lie inside the image. */
static void test_mutations(void **state) {
    layout L;
    buf b = make_valid(&L, 32);
    uint64_t seed = 12345, s = seed;
    int it, accepted = 0;
    (void)state;
    for (it = 0; it < 3000; it++) {
        uint8_t *copy = (uint8_t *)malloc(b.n);
        gguf_file *f = NULL;
        char err[256];
        int m, k = 1 + it % 3;
        assert_non_null(copy);
        memcpy(copy, b.p, b.n);
        for (m = 0; m < k; m++) {
            s = s * UINT64_C(6364136223846793005) + UINT64_C(1442695040888963407);
            copy[(s >> 33) % b.n] = (uint8_t)(s >> 17);
        }
        if (gguf_open_memory(copy, b.n, 0, &f, err, sizeof err) == 0) {
            uint64_t i;
            accepted++;
            for (i = 0; i < f->n_tensors; i++) {
                const gguf_tensor *t = &f->tensors[i];
                if (!(t->data >= f->image && t->data + t->n_bytes <= f->image + f->size)) {
                    fprintf(stderr, "seed %llu iteration %d: tensor outside the image\n",
                            (unsigned long long)seed, it);
                    fail();
                }
            }
            gguf_close(f);
        }
        free(copy);
    }
    /* most single-byte changes hit data or values and stay valid */
    assert_true(accepted > 0);
    free(b.p);
}

/* ---- tokenizer ------------------------------------------------------------------ */

/* GPT-2's byte -> character table, written out from its definition. */
static uint32_t byte_char(uint32_t b) {
    uint32_t n = 0, x;
    if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255)) return b;
    for (x = 0; x < b; x++)
        if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255))) n++;
    return 256 + n;
}

static void put_utf8_str(buf *b, uint32_t cp) {
    char s[4];
    size_t n = utf8_put(cp, s);
    put_u64(b, n);
    put(b, s, n);
}

/* Ids 0..255: the byte tokens (id == byte). Then the merged tokens below,
 * in this order, and one control token. Merges in rank order. "G" stands
 * for the space character U(32) = U+0120 in the comments. */
static const char *const extra_tokens[] = {
    "he", "ll", "hell", "\xc4\xa0x", "it", "'s", "t'", "\xc4\xa0\xc4\xa0",
    "\xc4\xa0" "b", "\xc4\xa0" "1", "<|im_end|>"};
enum { T_HE = 256, T_LL, T_HELL, T_GX, T_IT, T_APOS_S, T_T_APOS, T_GG, T_GB, T_G1, T_IM_END };
static const char *const merge_list[] = {
    "t '", "\xc4\xa0 \xc4\xa0", "h e", "l l", "he ll", "\xc4\xa0 x", "i t", "' s",
    "\xc4\xa0 b", "\xc4\xa0 1"};

static buf make_tokenizer_file(const char *pre) {
    buf b = {NULL, 0, 0};
    uint32_t i, n_extra = sizeof extra_tokens / sizeof extra_tokens[0];
    uint32_t n_merges = sizeof merge_list / sizeof merge_list[0];
    put_u32(&b, 0x46554747u);
    put_u32(&b, 3);
    put_u64(&b, 0);
    put_u64(&b, 6);
    put_str(&b, "tokenizer.ggml.model");
    put_u32(&b, 8);
    put_str(&b, "gpt2");
    put_str(&b, "tokenizer.ggml.pre");
    put_u32(&b, 8);
    put_str(&b, pre);
    put_str(&b, "tokenizer.ggml.tokens");
    put_u32(&b, 9);
    put_u32(&b, 8);
    put_u64(&b, 256 + n_extra);
    for (i = 0; i < 256; i++) put_utf8_str(&b, byte_char(i));
    for (i = 0; i < n_extra; i++) put_str(&b, extra_tokens[i]);
    put_str(&b, "tokenizer.ggml.token_type");
    put_u32(&b, 9);
    put_u32(&b, 5);
    put_u64(&b, 256 + n_extra);
    for (i = 0; i < 256 + n_extra; i++) put_u32(&b, i == T_IM_END ? 3 : 1);
    put_str(&b, "tokenizer.ggml.merges");
    put_u32(&b, 9);
    put_u32(&b, 8);
    put_u64(&b, n_merges);
    for (i = 0; i < n_merges; i++) put_str(&b, merge_list[i]);
    put_str(&b, "tokenizer.ggml.eos_token_id");
    put_u32(&b, 4);
    put_u32(&b, T_IM_END);
    return b;
}

static void expect_ids(const tokenizer *t, const char *text, int special, const int32_t *want,
                       size_t n_want) {
    int32_t *ids = NULL;
    size_t n = 0, i;
    char err[256];
    assert_int_equal(tokenizer_encode(t, text, strlen(text), special, &ids, &n, err, sizeof err), 0);
    if (n != n_want || memcmp(ids, want, n * sizeof(int32_t)) != 0) {
        fprintf(stderr, "encode(\"%s\"): got", text);
        for (i = 0; i < n; i++) fprintf(stderr, " %d", ids[i]);
        fprintf(stderr, ", want");
        for (i = 0; i < n_want; i++) fprintf(stderr, " %d", want[i]);
        fprintf(stderr, "\n");
        free(ids);
        fail();
    }
    free(ids);
}

#define IDS(...) (const int32_t[]){__VA_ARGS__}, sizeof((const int32_t[]){__VA_ARGS__}) / sizeof(int32_t)

static void test_tokenizer_merges(void **state) {
    buf b = make_tokenizer_file("smollm");
    gguf_file *f = NULL;
    tokenizer *t = NULL;
    char err[256] = "";
    (void)state;
    assert_int_equal(gguf_open_memory(b.p, b.n, 0, &f, err, sizeof err), 0);
    assert_int_equal(tokenizer_load(f, &t, err, sizeof err), 0);
    assert_int_equal(tokenizer_eos(t), T_IM_END);
    /* h e l l o: "h e" (rank 2) -> he, "l l" (3) -> ll, "he ll" (4) -> hell */
    expect_ids(t, "hello", 0, IDS(T_HELL, 'o'));
    /* "it's" splits as "it" + "'s": without the split, "t '" (rank 0) would
     * merge first and give i, t', s */
    expect_ids(t, "it's", 0, IDS(T_IT, T_APOS_S));
    /* two spaces before a word: the first space alone (\s+(?!\S)), the
     * second joins the word; unsplit, "G G" (rank 1) would win */
    expect_ids(t, "  x", 0, IDS(' ', T_GX));
    expect_ids(t, "a  b", 0, IDS('a', ' ', T_GB));
    /* trailing spaces stay together: no merge across a newline */
    expect_ids(t, "a\n  ", 0, IDS('a', '\n', T_GG));
    /* digits are split one by one (smollm): the space before "12" is its
     * own piece, so "G 1" never applies */
    expect_ids(t, "a 12", 0, IDS('a', ' ', '1', '2'));
    /* control tokens only with parse_special */
    expect_ids(t, "x<|im_end|>y", 1, IDS('x', T_IM_END, 'y'));
    expect_ids(t, "<|", 1, IDS('<', '|'));
    assert_true(tokenizer_is_control(t, T_IM_END));
    assert_false(tokenizer_is_control(t, T_HELL));
    assert_int_equal(tokenizer_find(t, "hell"), T_HELL);
    {
        char out[32];
        int n = tokenizer_decode(t, T_IM_END, out, sizeof out);
        assert_int_equal(n, 10);
        assert_memory_equal(out, "<|im_end|>", 10);
        n = tokenizer_decode(t, T_GX, out, sizeof out);
        assert_int_equal(n, 2);
        assert_memory_equal(out, " x", 2);
        assert_int_equal(tokenizer_decode(t, 100000, out, sizeof out), -1);
    }
    tokenizer_free(t);
    gguf_close(f);
    free(b.p);
    /* plain GPT-2 pre-tokenizer: " 12" stays one piece, "G 1" applies */
    b = make_tokenizer_file("gpt2");
    assert_int_equal(gguf_open_memory(b.p, b.n, 0, &f, err, sizeof err), 0);
    assert_int_equal(tokenizer_load(f, &t, err, sizeof err), 0);
    expect_ids(t, "a 12", 0, IDS('a', T_G1, '2'));
    tokenizer_free(t);
    gguf_close(f);
    free(b.p);
}

/* encode then decode gives back the bytes, for random byte strings
 * (invalid UTF-8 included) and for text with every character class. */
static void test_tokenizer_round_trip(void **state) {
    buf b = make_tokenizer_file("smollm");
    gguf_file *f = NULL;
    tokenizer *t = NULL;
    char err[256] = "", text[300], out[1200];
    uint64_t seed = 777, s = seed;
    int it;
    (void)state;
    assert_int_equal(gguf_open_memory(b.p, b.n, 0, &f, err, sizeof err), 0);
    assert_int_equal(tokenizer_load(f, &t, err, sizeof err), 0);
    for (it = 0; it < 400; it++) {
        int32_t *ids = NULL;
        size_t n = 0, len, i, o = 0;
        if (it == 0) {
            strcpy(text, "Hello  world!\n\n\tIt's 2024 \xe2\x80\x94 caf\xc3\xa9 \xe4\xb8\xad "
                         "x'LL <|im_end|> \xff\xfe end  ");
            len = strlen(text);
        } else {
            s = s * UINT64_C(6364136223846793005) + UINT64_C(1442695040888963407);
            len = (size_t)(s >> 33) % 200;
            for (i = 0; i < len; i++) {
                s = s * UINT64_C(6364136223846793005) + UINT64_C(1442695040888963407);
                /* half the strings are mostly ASCII text, half any bytes */
                text[i] = (char)(it % 2 ? (uint8_t)(s >> 40) : " aeht'l1\n"[(s >> 40) % 9]);
            }
        }
        assert_int_equal(tokenizer_encode(t, text, len, 0, &ids, &n, err, sizeof err), 0);
        for (i = 0; i < n; i++) {
            int k = tokenizer_decode(t, ids[i], out + o, sizeof out - o);
            assert_true(k > 0 && o + (size_t)k <= sizeof out);
            o += (size_t)k;
        }
        if (o != len || memcmp(out, text, len) != 0) {
            fprintf(stderr, "round trip failed: seed %llu iteration %d\n",
                    (unsigned long long)seed, it);
            free(ids);
            fail();
        }
        free(ids);
    }
    tokenizer_free(t);
    gguf_close(f);
    free(b.p);
}

static void test_tokenizer_bad_metadata(void **state) {
    layout L;
    buf b = make_valid(&L, 32); /* no tokenizer metadata at all */
    gguf_file *f = NULL;
    tokenizer *t = NULL;
    char err[256] = "";
    (void)state;
    assert_int_equal(gguf_open_memory(b.p, b.n, 0, &f, err, sizeof err), 0);
    assert_int_not_equal(tokenizer_load(f, &t, err, sizeof err), 0);
    assert_null(t);
    assert_non_null(strstr(err, "tokenizer.ggml.model"));
    gguf_close(f);
    free(b.p);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_file),
        cmocka_unit_test(test_truncation),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_mutations),
        cmocka_unit_test(test_tokenizer_merges),
        cmocka_unit_test(test_tokenizer_round_trip),
        cmocka_unit_test(test_tokenizer_bad_metadata),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
