/*
 * Byte-level BPE (see tokenizer.h).
 *
 * Byte level: every byte b of the text is first replaced by one printable
 * Unicode character U(b) (GPT-2's table: bytes 33..126, 161..172 and
 * 174..255 map to themselves, the other 68 bytes to 256, 257, ... in
 * increasing byte order); vocabulary entries are UTF-8 strings of such
 * characters. BPE then starts from one symbol per byte and repeatedly merges
 * the adjacent pair whose merge has the lowest rank (its line in
 * tokenizer.ggml.merges), leftmost first, until no pair has a merge.
 */
#include "tokenizer.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- hash tables ----------------------------------------------------------- */

/* token text -> id; open addressing, linear probing, capacity a power of 2 */
typedef struct str_map {
    uint32_t cap;
    int32_t *slot; /* token id or -1 */
} str_map;

/* (left id, right id) -> (rank, merged id) */
typedef struct pair_map {
    uint32_t cap;
    uint64_t *key;   /* (left << 32 | right) + 1; 0 = empty */
    int32_t *rank;
    int32_t *merged;
} pair_map;

struct tokenizer {
    uint32_t n_vocab;
    const gguf_str *text; /* token texts (into the gguf image) */
    uint8_t *control;     /* 1 for control / user-defined tokens */
    int32_t bos, eos;
    int digits_split;
    str_map tok;
    pair_map merges;
    uint32_t byte_cp[256];   /* U(b) */
    int16_t cp_byte[512];    /* inverse of U, -1 elsewhere */
    int32_t byte_tok[256];   /* token id of the one-character string U(b) */
    int32_t *specials;       /* control token ids, longest text first */
    uint32_t n_specials;
};

static void terr(char *err, size_t errlen, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

static void terr(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    if (err == NULL || errlen == 0) return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static uint32_t fnv1a(const char *p, size_t n) {
    uint32_t h = 2166136261u;
    size_t i;
    for (i = 0; i < n; i++) {
        h ^= (uint8_t)p[i];
        h *= 16777619u;
    }
    return h;
}

static uint32_t pow2_at_least(uint64_t n) {
    uint32_t c = 16;
    while (c < n && c < (1u << 30)) c <<= 1;
    return c;
}

static int32_t str_map_get(const tokenizer *t, const char *p, size_t n) {
    uint32_t m = t->tok.cap - 1, i = fnv1a(p, n) & m;
    for (;;) {
        int32_t id = t->tok.slot[i];
        if (id < 0) return -1;
        if (t->text[id].len == n && memcmp(t->text[id].ptr, p, n) == 0) return id;
        i = (i + 1) & m;
    }
}

static uint64_t pair_hash(uint64_t k) {
    k ^= k >> 33;
    k *= UINT64_C(0xff51afd7ed558ccd);
    k ^= k >> 33;
    return k;
}

static int pair_get(const pair_map *pm, int32_t a, int32_t b, int32_t *rank,
                    int32_t *merged) {
    uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    uint32_t m = pm->cap - 1, i = (uint32_t)pair_hash(key) & m;
    for (;;) {
        if (pm->key[i] == 0) return 0;
        if (pm->key[i] == key) {
            *rank = pm->rank[i];
            *merged = pm->merged[i];
            return 1;
        }
        i = (i + 1) & m;
    }
}

/* ---- UTF-8 and character classes ------------------------------------------ */

static size_t utf8_put(uint32_t cp, char *o) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Decodes one code point at s[0..n); returns its byte length (>= 1). An
 * invalid sequence yields one byte with cp = 0xFFFFFFFF (class "other"). */
static size_t utf8_get(const unsigned char *s, size_t n, uint32_t *cp) {
    uint32_t c = s[0], v;
    size_t len, i;
    if (c < 0x80) { *cp = c; return 1; }
    if ((c & 0xE0) == 0xC0) { len = 2; v = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { len = 3; v = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { len = 4; v = c & 0x07; }
    else { *cp = 0xFFFFFFFFu; return 1; }
    if (len > n) { *cp = 0xFFFFFFFFu; return 1; }
    for (i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) { *cp = 0xFFFFFFFFu; return 1; }
        v = (v << 6) | (s[i] & 0x3F);
    }
    if ((len == 2 && v < 0x80) || (len == 3 && v < 0x800) ||
        (len == 4 && (v < 0x10000 || v > 0x10FFFF)) ||
        (v >= 0xD800 && v <= 0xDFFF)) {
        *cp = 0xFFFFFFFFu;
        return 1;
    }
    *cp = v;
    return len;
}

/* \s: Unicode White_Space */
static int is_space(uint32_t c) {
    return (c >= 9 && c <= 13) || c == 32 || c == 0x85 || c == 0xA0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
           c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/* \p{N}: decimal digits, letter numbers and other numbers of the common
 * blocks. */
static int is_number(uint32_t c) {
    if (c < 0x80) return c >= '0' && c <= '9';
    return c == 0xB2 || c == 0xB3 || c == 0xB9 || (c >= 0xBC && c <= 0xBE) ||
           (c >= 0x660 && c <= 0x669) || (c >= 0x6F0 && c <= 0x6F9) ||
           (c >= 0x966 && c <= 0x96F) || c == 0x2070 ||
           (c >= 0x2074 && c <= 0x2079) || (c >= 0x2080 && c <= 0x2089) ||
           (c >= 0x2150 && c <= 0x2182) || (c >= 0x2185 && c <= 0x2189) ||
           (c >= 0x2460 && c <= 0x249B) || (c >= 0x24EA && c <= 0x24FF) ||
           (c >= 0x2776 && c <= 0x2793) || c == 0x3007 ||
           (c >= 0x3021 && c <= 0x3029) || (c >= 0xFF10 && c <= 0xFF19);
}

/* \p{L}: letters of the Latin, Greek, Cyrillic, Armenian, Hebrew, Arabic,
 * Devanagari, Thai, Georgian, Kana, CJK and Hangul blocks. */
static int is_letter(uint32_t c) {
    if (c < 0x80) return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
    if (c == 0xAA || c == 0xB5 || c == 0xBA) return 1;
    if (c >= 0xC0 && c <= 0x24F) return c != 0xD7 && c != 0xF7;
    if (c >= 0x250 && c <= 0x2C1) return 1;
    if (c >= 0x370 && c <= 0x3FF)
        return c != 0x375 && c != 0x37E && c != 0x384 && c != 0x385 &&
               c != 0x387 && c != 0x3F6 && !(c >= 0x378 && c <= 0x379) &&
               !(c >= 0x380 && c <= 0x383) && c != 0x38B && c != 0x38D &&
               c != 0x3A2;
    if ((c >= 0x400 && c <= 0x481) || (c >= 0x48A && c <= 0x52F)) return 1;
    if ((c >= 0x531 && c <= 0x556) || (c >= 0x561 && c <= 0x587)) return 1;
    if (c >= 0x5D0 && c <= 0x5EA) return 1;
    if (c >= 0x620 && c <= 0x64A) return 1;
    if (c >= 0x904 && c <= 0x939) return 1;
    if (c >= 0xE01 && c <= 0xE30) return 1;
    if (c >= 0x10A0 && c <= 0x10FF) return 1;
    if (c >= 0x1E00 && c <= 0x1FBC) return 1;
    if ((c >= 0x3041 && c <= 0x3096) || (c >= 0x30A1 && c <= 0x30FA)) return 1;
    if ((c >= 0x3400 && c <= 0x4DBF) || (c >= 0x4E00 && c <= 0x9FFF)) return 1;
    if (c >= 0xAC00 && c <= 0xD7A3) return 1;
    if (c >= 0xF900 && c <= 0xFAFF) return 1;
    if ((c >= 0xFF21 && c <= 0xFF3A) || (c >= 0xFF41 && c <= 0xFF5A)) return 1;
    if (c >= 0x20000 && c <= 0x2FFFF) return 1;
    return 0;
}

/* [^\s\p{L}\p{N}] */
static int is_other(uint32_t c) {
    return !is_space(c) && !is_letter(c) && !is_number(c);
}

/* Length in code points of the GPT-2 pattern's match at i of cp[0..n). */
static size_t gpt2_match(const uint32_t *cp, size_t n, size_t i) {
    uint32_t c = cp[i];
    size_t j, k;
    if (c == '\'' && i + 1 < n) {
        uint32_t a = cp[i + 1], b = i + 2 < n ? cp[i + 2] : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') ||
            (a == 'l' && b == 'l'))
            return 3;
    }
    j = c == ' ' ? i + 1 : i; /* the optional leading space of ' ?X+' */
    if (j < n) {
        if (is_letter(cp[j])) {
            for (k = j; k < n && is_letter(cp[k]); k++) {}
            return k - i;
        }
        if (is_number(cp[j])) {
            for (k = j; k < n && is_number(cp[k]); k++) {}
            return k - i;
        }
        if (is_other(cp[j])) {
            for (k = j; k < n && is_other(cp[k]); k++) {}
            return k - i;
        }
    }
    if (is_space(c)) {
        for (k = i; k < n && is_space(cp[k]); k++) {}
        if (k == n) return k - i;   /* \s+(?!\S) up to the end */
        if (k - i >= 2) return k - i - 1; /* leave the last one to the word */
        return 1;                   /* \s+ */
    }
    return 1;
}

/* ---- loading ------------------------------------------------------------------ */

static void build_byte_table(tokenizer *t) {
    uint32_t b, extra = 0;
    for (b = 0; b < 512; b++) t->cp_byte[b] = -1;
    for (b = 0; b < 256; b++) {
        int printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) ||
                        (b >= 174 && b <= 255);
        t->byte_cp[b] = printable ? b : 256 + extra++;
        t->cp_byte[t->byte_cp[b]] = (int16_t)b;
    }
}

void tokenizer_free(tokenizer *t) {
    if (!t) return;
    free(t->control);
    free(t->tok.slot);
    free(t->merges.key);
    free(t->merges.rank);
    free(t->merges.merged);
    free(t->specials);
    free(t);
}

int tokenizer_load(const gguf_file *f, tokenizer **out, char *err, size_t errlen) {
    const gguf_kv *model = gguf_find_kv(f, "tokenizer.ggml.model");
    const gguf_kv *pre = gguf_find_kv(f, "tokenizer.ggml.pre");
    const gguf_kv *toks, *merges, *types = NULL;
    tokenizer *t;
    uint32_t i, u;
    char msg[256];
    *out = NULL;
    if (!model || model->type != GGUF_T_STRING || model->str.len != 4 ||
        memcmp(model->str.ptr, "gpt2", 4) != 0) {
        terr(err, errlen, "tokenizer.ggml.model is not \"gpt2\" (only byte-level BPE is supported)");
        return -1;
    }
    if (gguf_get_array(f, "tokenizer.ggml.tokens", GGUF_T_STRING, &toks, err, errlen) ||
        gguf_get_array(f, "tokenizer.ggml.merges", GGUF_T_STRING, &merges, err, errlen))
        return -1;
    if (toks->arr_count == 0 || toks->arr_count > INT32_MAX / 2) {
        terr(err, errlen, "tokenizer.ggml.tokens has %llu entries",
             (unsigned long long)toks->arr_count);
        return -1;
    }
    if (gguf_find_kv(f, "tokenizer.ggml.token_type") &&
        gguf_get_array(f, "tokenizer.ggml.token_type", GGUF_T_COUNT, &types, err, errlen))
        return -1;
    if (types && types->arr_count != toks->arr_count) {
        terr(err, errlen, "tokenizer.ggml.token_type has %llu entries, tokens %llu",
             (unsigned long long)types->arr_count, (unsigned long long)toks->arr_count);
        return -1;
    }
    t = (tokenizer *)calloc(1, sizeof(*t));
    if (!t) goto oom;
    t->n_vocab = (uint32_t)toks->arr_count;
    t->text = toks->strs;
    t->digits_split = 1;
    if (pre && pre->type == GGUF_T_STRING &&
        ((pre->str.len == 4 && memcmp(pre->str.ptr, "gpt2", 4) == 0) ||
         (pre->str.len == 7 && memcmp(pre->str.ptr, "default", 7) == 0)))
        t->digits_split = 0;
    t->control = (uint8_t *)calloc(t->n_vocab, 1);
    t->tok.cap = pow2_at_least((uint64_t)t->n_vocab * 2);
    t->tok.slot = (int32_t *)malloc(sizeof(int32_t) * t->tok.cap);
    t->specials = (int32_t *)malloc(sizeof(int32_t) * t->n_vocab);
    if (!t->control || !t->tok.slot || !t->specials) goto oom;
    for (i = 0; i < t->tok.cap; i++) t->tok.slot[i] = -1;
    for (i = 0; i < t->n_vocab; i++) {
        uint32_t m = t->tok.cap - 1, h = fnv1a(t->text[i].ptr, (size_t)t->text[i].len) & m;
        if (str_map_get(t, t->text[i].ptr, (size_t)t->text[i].len) >= 0)
            continue; /* duplicate text: the first id wins */
        while (t->tok.slot[h] >= 0) h = (h + 1) & m;
        t->tok.slot[h] = (int32_t)i;
        if (types) {
            int64_t ty = gguf_array_int(types, i);
            /* 3 = control, 4 = user defined: matched as whole strings */
            if ((ty == 3 || ty == 4) && t->text[i].len > 0) {
                t->control[i] = 1;
                t->specials[t->n_specials++] = (int32_t)i;
            }
        }
    }
    /* longest special first, so that a prefix never wins */
    for (i = 1; i < t->n_specials; i++) {
        int32_t x = t->specials[i];
        uint32_t j = i;
        while (j > 0 && t->text[t->specials[j - 1]].len < t->text[x].len) {
            t->specials[j] = t->specials[j - 1];
            j--;
        }
        t->specials[j] = x;
    }
    build_byte_table(t);
    for (u = 0; u < 256; u++) {
        char buf[4];
        size_t n = utf8_put(t->byte_cp[u], buf);
        t->byte_tok[u] = str_map_get(t, buf, n);
    }
    t->merges.cap = pow2_at_least(merges->arr_count * 2 + 1);
    t->merges.key = (uint64_t *)calloc(t->merges.cap, sizeof(uint64_t));
    t->merges.rank = (int32_t *)malloc(sizeof(int32_t) * t->merges.cap);
    t->merges.merged = (int32_t *)malloc(sizeof(int32_t) * t->merges.cap);
    if (!t->merges.key || !t->merges.rank || !t->merges.merged) goto oom;
    for (i = 0; i < merges->arr_count; i++) {
        const gguf_str *s = &merges->strs[i];
        const char *sp = (const char *)memchr(s->ptr, ' ', (size_t)s->len);
        char cat[1024];
        int32_t a, b, ab, r0, m0;
        size_t la, lb;
        uint64_t key;
        uint32_t m = t->merges.cap - 1, h;
        if (!sp || sp == s->ptr || (size_t)(sp - s->ptr) + 1 >= s->len) {
            terr(err, errlen, "tokenizer.ggml.merges[%u] is not \"left right\"", i);
            goto fail;
        }
        la = (size_t)(sp - s->ptr);
        lb = (size_t)s->len - la - 1;
        if (la + lb > sizeof cat) continue;
        a = str_map_get(t, s->ptr, la);
        b = str_map_get(t, sp + 1, lb);
        memcpy(cat, s->ptr, la);
        memcpy(cat + la, sp + 1, lb);
        ab = str_map_get(t, cat, la + lb);
        if (a < 0 || b < 0 || ab < 0) continue; /* cannot apply: skip it */
        if (pair_get(&t->merges, a, b, &r0, &m0)) continue; /* first rank wins */
        key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
        h = (uint32_t)pair_hash(key) & m;
        while (t->merges.key[h] != 0) h = (h + 1) & m;
        t->merges.key[h] = key;
        t->merges.rank[h] = (int32_t)i;
        t->merges.merged[h] = ab;
    }
    t->bos = t->eos = -1;
    if (gguf_find_kv(f, "tokenizer.ggml.bos_token_id")) {
        if (gguf_get_u32(f, "tokenizer.ggml.bos_token_id", &u, err, errlen)) goto fail;
        t->bos = u < t->n_vocab ? (int32_t)u : -1;
    }
    if (gguf_find_kv(f, "tokenizer.ggml.eos_token_id")) {
        if (gguf_get_u32(f, "tokenizer.ggml.eos_token_id", &u, err, errlen)) goto fail;
        t->eos = u < t->n_vocab ? (int32_t)u : -1;
    }
    (void)msg;
    *out = t;
    return 0;
oom:
    terr(err, errlen, "out of memory loading the tokenizer");
fail:
    tokenizer_free(t);
    return -1;
}

uint32_t tokenizer_n_vocab(const tokenizer *t) { return t->n_vocab; }
int32_t tokenizer_bos(const tokenizer *t) { return t->bos; }
int32_t tokenizer_eos(const tokenizer *t) { return t->eos; }

int tokenizer_is_control(const tokenizer *t, int32_t id) {
    return id >= 0 && (uint32_t)id < t->n_vocab && t->control[id];
}

int32_t tokenizer_find(const tokenizer *t, const char *text) {
    return str_map_get(t, text, strlen(text));
}

/* ---- encoding ------------------------------------------------------------------ */

typedef struct idvec {
    int32_t *v;
    size_t n, cap;
} idvec;

static int push(idvec *o, int32_t id) {
    if (o->n == o->cap) {
        size_t nc = o->cap ? o->cap * 2 : 256;
        int32_t *nv = (int32_t *)realloc(o->v, nc * sizeof(int32_t));
        if (!nv) return -1;
        o->v = nv;
        o->cap = nc;
    }
    o->v[o->n++] = id;
    return 0;
}

/* BPE of one pre-token (raw bytes); sym is scratch of at least n entries. */
static int bpe_piece(const tokenizer *t, const unsigned char *s, size_t n,
                     int32_t *sym, idvec *o) {
    size_t k = 0, i;
    for (i = 0; i < n; i++) {
        int32_t id = t->byte_tok[s[i]];
        if (id < 0) return -2; /* the vocabulary lacks a byte token */
        sym[k++] = id;
    }
    for (;;) {
        int32_t best = INT32_MAX, best_m = -1, r, m;
        size_t bi = 0;
        for (i = 0; i + 1 < k; i++)
            if (pair_get(&t->merges, sym[i], sym[i + 1], &r, &m) && r < best) {
                best = r;
                best_m = m;
                bi = i;
            }
        if (best_m < 0) break;
        sym[bi] = best_m;
        memmove(sym + bi + 1, sym + bi + 2, (k - bi - 2) * sizeof(int32_t));
        k--;
    }
    for (i = 0; i < k; i++)
        if (push(o, sym[i])) return -1;
    return 0;
}

/* Pre-tokenizes and encodes s[0..n) (no special tokens inside). */
static int encode_plain(const tokenizer *t, const unsigned char *s, size_t n,
                        idvec *o, char *err, size_t errlen) {
    uint32_t *cp = NULL;
    size_t *off = NULL, ncp = 0, i, start;
    int32_t *sym = NULL;
    int rc = -1;
    if (n == 0) return 0;
    cp = (uint32_t *)malloc(n * sizeof(uint32_t));
    off = (size_t *)malloc((n + 1) * sizeof(size_t));
    sym = (int32_t *)malloc(n * sizeof(int32_t));
    if (!cp || !off || !sym) {
        terr(err, errlen, "out of memory");
        goto done;
    }
    for (i = 0; i < n;) {
        off[ncp] = i;
        i += utf8_get(s + i, n - i, &cp[ncp]);
        ncp++;
    }
    off[ncp] = n;
    /* pieces: runs between isolated numeric characters (digit split) */
    start = 0;
    while (start < ncp) {
        size_t end = start, i2;
        if (t->digits_split && is_number(cp[start])) {
            end = start + 1;
        } else {
            while (end < ncp && !(t->digits_split && is_number(cp[end]))) end++;
        }
        for (i2 = start; i2 < end;) {
            size_t len = gpt2_match(cp + start, end - start, i2 - start);
            int r = bpe_piece(t, s + off[i2], off[i2 + len] - off[i2], sym, o);
            if (r == -2) {
                terr(err, errlen, "the vocabulary lacks a byte token");
                goto done;
            }
            if (r) {
                terr(err, errlen, "out of memory");
                goto done;
            }
            i2 += len;
        }
        start = end;
    }
    rc = 0;
done:
    free(cp);
    free(off);
    free(sym);
    return rc;
}

int tokenizer_encode(const tokenizer *t, const char *text, size_t len,
                     int parse_special, int32_t **ids, size_t *n, char *err,
                     size_t errlen) {
    idvec o = {NULL, 0, 0};
    size_t i = 0, seg = 0;
    *ids = NULL;
    *n = 0;
    while (i <= len) {
        int32_t hit = -1;
        uint32_t k;
        if (parse_special && i < len)
            for (k = 0; k < t->n_specials; k++) {
                const gguf_str *s = &t->text[t->specials[k]];
                if (s->len <= len - i && memcmp(text + i, s->ptr, (size_t)s->len) == 0) {
                    hit = t->specials[k];
                    break;
                }
            }
        if (hit >= 0 || i == len) {
            if (encode_plain(t, (const unsigned char *)text + seg, i - seg, &o, err, errlen))
                goto fail;
            if (hit < 0) break;
            if (push(&o, hit)) {
                terr(err, errlen, "out of memory");
                goto fail;
            }
            i += (size_t)t->text[hit].len;
            seg = i;
        } else {
            i++;
        }
    }
    *ids = o.v ? o.v : (int32_t *)malloc(sizeof(int32_t));
    if (!*ids) {
        terr(err, errlen, "out of memory");
        return -1;
    }
    *n = o.n;
    return 0;
fail:
    free(o.v);
    return -1;
}

int tokenizer_decode(const tokenizer *t, int32_t id, char *buf, size_t cap) {
    const gguf_str *s;
    size_t i, n = 0;
    if (id < 0 || (uint32_t)id >= t->n_vocab) return -1;
    s = &t->text[id];
    if (t->control[id]) {
        for (i = 0; i < s->len; i++, n++)
            if (n < cap) buf[n] = s->ptr[i];
        return (int)n;
    }
    for (i = 0; i < s->len;) {
        uint32_t cp;
        i += utf8_get((const unsigned char *)s->ptr + i, (size_t)s->len - i, &cp);
        /* a character outside the byte table passes through as UTF-8 */
        if (cp < 512 && t->cp_byte[cp] >= 0) {
            if (n < cap) buf[n] = (char)t->cp_byte[cp];
            n++;
        } else if (cp != 0xFFFFFFFFu) {
            char tmp[4];
            size_t k, m = utf8_put(cp, tmp);
            for (k = 0; k < m; k++, n++)
                if (n < cap) buf[n] = tmp[k];
        }
    }
    return (int)n;
}
