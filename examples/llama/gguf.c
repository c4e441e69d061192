/*
 * GGUF reader (see gguf.h). A cursor walks [pos, size) of the image; every
 * read first checks that enough bytes remain, and every count read from the
 * file is checked against the bytes that could possibly hold it before
 * anything is allocated for it.
 */
#include "gguf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void gerr(char *err, size_t errlen, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

static void gerr(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    if (err == NULL || errlen == 0) return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

const char *gguf_type_name(uint32_t type) {
    switch (type) {
    case GGML_F32: return "F32";
    case GGML_F16: return "F16";
    case GGML_Q4_0: return "Q4_0";
    case GGML_Q4_1: return "Q4_1";
    case GGML_Q5_0: return "Q5_0";
    case GGML_Q5_1: return "Q5_1";
    case GGML_Q8_0: return "Q8_0";
    case GGML_Q8_1: return "Q8_1";
    case GGML_Q2_K: return "Q2_K";
    case GGML_Q3_K: return "Q3_K";
    case GGML_Q4_K: return "Q4_K";
    case GGML_Q5_K: return "Q5_K";
    case GGML_Q6_K: return "Q6_K";
    case GGML_Q8_K: return "Q8_K";
    case GGML_I8: return "I8";
    case GGML_I16: return "I16";
    case GGML_I32: return "I32";
    case GGML_I64: return "I64";
    case GGML_F64: return "F64";
    case GGML_BF16: return "BF16";
    default: return "unknown";
    }
}

int gguf_type_block(uint32_t type, uint32_t *bv, uint32_t *bb) {
    uint32_t v = 1, b = 0;
    switch (type) {
    case GGML_F32: b = 4; break;
    case GGML_F16: b = 2; break;
    case GGML_BF16: b = 2; break;
    case GGML_F64: b = 8; break;
    case GGML_I8: b = 1; break;
    case GGML_I16: b = 2; break;
    case GGML_I32: b = 4; break;
    case GGML_I64: b = 8; break;
    case GGML_Q4_0: v = 32; b = 18; break;  /* fp16 d + 16 nibble bytes */
    case GGML_Q4_1: v = 32; b = 20; break;  /* fp16 d, fp16 m + 16 bytes */
    case GGML_Q5_0: v = 32; b = 22; break;
    case GGML_Q5_1: v = 32; b = 24; break;
    case GGML_Q8_0: v = 32; b = 34; break;  /* fp16 d + 32 int8 */
    case GGML_Q8_1: v = 32; b = 36; break;
    case GGML_Q2_K: v = 256; b = 84; break;
    case GGML_Q3_K: v = 256; b = 110; break;
    case GGML_Q4_K: v = 256; b = 144; break;
    case GGML_Q5_K: v = 256; b = 176; break;
    case GGML_Q6_K: v = 256; b = 210; break;
    case GGML_Q8_K: v = 256; b = 292; break;
    default: return -1;
    }
    if (bv) *bv = v;
    if (bb) *bb = b;
    return 0;
}

/* Size in bytes of one scalar of a metadata type; 0 for STRING/ARRAY and
 * unknown types. */
static size_t scalar_size(uint32_t t) {
    switch (t) {
    case GGUF_T_UINT8: case GGUF_T_INT8: case GGUF_T_BOOL: return 1;
    case GGUF_T_UINT16: case GGUF_T_INT16: return 2;
    case GGUF_T_UINT32: case GGUF_T_INT32: case GGUF_T_FLOAT32: return 4;
    case GGUF_T_UINT64: case GGUF_T_INT64: case GGUF_T_FLOAT64: return 8;
    default: return 0;
    }
}

typedef struct cursor {
    const uint8_t *p;
    size_t size, pos;
    char *err;
    size_t errlen;
} cursor;

static int need(cursor *c, uint64_t n, const char *what) {
    if (n > (uint64_t)(c->size - c->pos)) {
        gerr(c->err, c->errlen,
             "truncated file: %s needs %llu bytes at offset %zu, %zu remain",
             what, (unsigned long long)n, c->pos, c->size - c->pos);
        return -1;
    }
    return 0;
}

static uint64_t le(const uint8_t *p, unsigned n) {
    uint64_t v = 0;
    unsigned i;
    for (i = 0; i < n; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static int rd_u32(cursor *c, uint32_t *v, const char *what) {
    if (need(c, 4, what)) return -1;
    *v = (uint32_t)le(c->p + c->pos, 4);
    c->pos += 4;
    return 0;
}

static int rd_u64(cursor *c, uint64_t *v, const char *what) {
    if (need(c, 8, what)) return -1;
    *v = le(c->p + c->pos, 8);
    c->pos += 8;
    return 0;
}

static int rd_str(cursor *c, gguf_str *s, const char *what) {
    if (rd_u64(c, &s->len, what)) return -1;
    if (need(c, s->len, what)) return -1;
    s->ptr = (const char *)(c->p + c->pos);
    c->pos += (size_t)s->len;
    return 0;
}

static char *dup_str(const gguf_str *s) {
    char *r;
    if (s->len >= SIZE_MAX) return NULL;
    r = (char *)malloc((size_t)s->len + 1);
    if (!r) return NULL;
    memcpy(r, s->ptr, (size_t)s->len);
    r[s->len] = '\0';
    return r;
}

static int read_kv(cursor *c, gguf_kv *kv, uint64_t index) {
    gguf_str key;
    uint32_t t;
    size_t es;
    if (rd_str(c, &key, "metadata key")) return -1;
    if (key.len == 0 || memchr(key.ptr, '\0', (size_t)key.len) != NULL) {
        gerr(c->err, c->errlen, "metadata entry %llu: empty key or NUL in key",
             (unsigned long long)index);
        return -1;
    }
    kv->key = dup_str(&key);
    if (!kv->key) {
        gerr(c->err, c->errlen, "out of memory");
        return -1;
    }
    if (rd_u32(c, &t, "metadata type")) return -1;
    if (t >= GGUF_T_COUNT) {
        gerr(c->err, c->errlen, "metadata '%s': bad value type %u", kv->key, t);
        return -1;
    }
    kv->type = t;
    if (t == GGUF_T_STRING) return rd_str(c, &kv->str, kv->key);
    if (t != GGUF_T_ARRAY) {
        es = scalar_size(t);
        if (need(c, es, kv->key)) return -1;
        kv->raw = c->p + c->pos;
        c->pos += es;
        if (t == GGUF_T_BOOL && kv->raw[0] > 1) {
            gerr(c->err, c->errlen, "metadata '%s': bool value %u is not 0 or 1",
                 kv->key, kv->raw[0]);
            return -1;
        }
        return 0;
    }
    if (rd_u32(c, &kv->arr_type, "array element type")) return -1;
    if (rd_u64(c, &kv->arr_count, "array length")) return -1;
    if (kv->arr_type == GGUF_T_ARRAY) {
        gerr(c->err, c->errlen, "metadata '%s': nested arrays are not supported",
             kv->key);
        return -1;
    }
    if (kv->arr_type >= GGUF_T_COUNT) {
        gerr(c->err, c->errlen, "metadata '%s': bad array element type %u",
             kv->key, kv->arr_type);
        return -1;
    }
    kv->raw = c->p + c->pos;
    if (kv->arr_type == GGUF_T_STRING) {
        uint64_t i;
        /* each string takes at least its 8-byte length */
        if (kv->arr_count > (c->size - c->pos) / 8) {
            gerr(c->err, c->errlen,
                 "truncated file: metadata '%s': %llu strings cannot fit in the %zu bytes left",
                 kv->key, (unsigned long long)kv->arr_count, c->size - c->pos);
            return -1;
        }
        kv->strs = (gguf_str *)calloc(kv->arr_count ? (size_t)kv->arr_count : 1,
                                      sizeof(gguf_str));
        if (!kv->strs) {
            gerr(c->err, c->errlen, "out of memory");
            return -1;
        }
        for (i = 0; i < kv->arr_count; i++)
            if (rd_str(c, &kv->strs[i], kv->key)) return -1;
        return 0;
    }
    es = scalar_size(kv->arr_type);
    if (kv->arr_count > (c->size - c->pos) / es) {
        gerr(c->err, c->errlen,
             "truncated file: array '%s' of %llu elements of %zu bytes at offset %zu",
             kv->key, (unsigned long long)kv->arr_count, es, c->pos);
        return -1;
    }
    c->pos += (size_t)kv->arr_count * es;
    return 0;
}

static int read_tensor(cursor *c, gguf_tensor *t, uint64_t index) {
    gguf_str name;
    uint32_t i, bv, bb;
    uint64_t nel = 1, nblocks;
    if (rd_str(c, &name, "tensor name")) return -1;
    if (name.len == 0 || memchr(name.ptr, '\0', (size_t)name.len) != NULL) {
        gerr(c->err, c->errlen, "tensor %llu: empty name or NUL in name",
             (unsigned long long)index);
        return -1;
    }
    t->name = dup_str(&name);
    if (!t->name) {
        gerr(c->err, c->errlen, "out of memory");
        return -1;
    }
    if (rd_u32(c, &t->n_dims, "tensor n_dims")) return -1;
    if (t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS) {
        gerr(c->err, c->errlen, "tensor '%s': %u dimensions (1..%d allowed)",
             t->name, t->n_dims, GGUF_MAX_DIMS);
        return -1;
    }
    for (i = 0; i < GGUF_MAX_DIMS; i++) t->ne[i] = 1;
    for (i = 0; i < t->n_dims; i++) {
        if (rd_u64(c, &t->ne[i], "tensor dimension")) return -1;
        if (t->ne[i] == 0 || t->ne[i] > (UINT64_C(1) << 40)) {
            gerr(c->err, c->errlen, "tensor '%s': dimension %u is %llu", t->name,
                 i, (unsigned long long)t->ne[i]);
            return -1;
        }
        if (nel > UINT64_MAX / t->ne[i]) {
            gerr(c->err, c->errlen, "tensor '%s': element count overflows",
                 t->name);
            return -1;
        }
        nel *= t->ne[i];
    }
    if (rd_u32(c, &t->type, "tensor type")) return -1;
    if (gguf_type_block(t->type, &bv, &bb)) {
        gerr(c->err, c->errlen, "tensor '%s': unknown ggml type %u", t->name,
             t->type);
        return -1;
    }
    if (t->ne[0] % bv != 0) {
        gerr(c->err, c->errlen,
             "tensor '%s': row length %llu is not a multiple of the %s block (%u)",
             t->name, (unsigned long long)t->ne[0], gguf_type_name(t->type), bv);
        return -1;
    }
    nblocks = nel / bv;
    if (nblocks > UINT64_MAX / bb) {
        gerr(c->err, c->errlen, "tensor '%s': byte size overflows", t->name);
        return -1;
    }
    t->n_bytes = nblocks * bb;
    return rd_u64(c, &t->offset, "tensor offset");
}

void gguf_close(gguf_file *f) {
    uint64_t i;
    if (!f) return;
    if (f->kv) {
        for (i = 0; i < f->n_kv; i++) {
            free(f->kv[i].key);
            free(f->kv[i].strs);
        }
        free(f->kv);
    }
    if (f->tensors) {
        for (i = 0; i < f->n_tensors; i++) free(f->tensors[i].name);
        free(f->tensors);
    }
    if (f->owns_image) free(f->image);
    free(f);
}

static int parse(gguf_file *f, char *err, size_t errlen) {
    cursor c;
    uint32_t magic;
    uint64_t i, j, data_size;
    const gguf_kv *al;
    c.p = f->image;
    c.size = f->size;
    c.pos = 0;
    c.err = err;
    c.errlen = errlen;
    if (rd_u32(&c, &magic, "magic")) return -1;
    if (magic != 0x46554747u) { /* "GGUF" little-endian */
        gerr(err, errlen, "not a GGUF file (bad magic)");
        return -1;
    }
    if (rd_u32(&c, &f->version, "version")) return -1;
    if (f->version != 2 && f->version != 3) {
        gerr(err, errlen, "GGUF version %u is not supported (2 and 3 are)",
             f->version);
        return -1;
    }
    if (rd_u64(&c, &f->n_tensors, "tensor count")) return -1;
    if (rd_u64(&c, &f->n_kv, "metadata count")) return -1;
    /* a metadata entry needs at least 8+1+4 bytes, a tensor info 8+1+4+8+4+8 */
    if (f->n_kv > (c.size - c.pos) / 13 || f->n_tensors > (c.size - c.pos) / 33) {
        gerr(err, errlen,
             "truncated file: %llu metadata entries and %llu tensors cannot fit in %zu bytes",
             (unsigned long long)f->n_kv, (unsigned long long)f->n_tensors,
             c.size);
        return -1;
    }
    f->kv = (gguf_kv *)calloc(f->n_kv ? (size_t)f->n_kv : 1, sizeof(gguf_kv));
    f->tensors = (gguf_tensor *)calloc(f->n_tensors ? (size_t)f->n_tensors : 1,
                                       sizeof(gguf_tensor));
    if (!f->kv || !f->tensors) {
        gerr(err, errlen, "out of memory");
        return -1;
    }
    for (i = 0; i < f->n_kv; i++) {
        if (read_kv(&c, &f->kv[i], i)) {
            /* entries after i stay zeroed: gguf_close handles them */
            return -1;
        }
        for (j = 0; j < i; j++)
            if (strcmp(f->kv[j].key, f->kv[i].key) == 0) {
                gerr(err, errlen, "duplicate metadata key '%s'", f->kv[i].key);
                return -1;
            }
    }
    f->alignment = 32;
    al = gguf_find_kv(f, "general.alignment");
    if (al) {
        if (al->type != GGUF_T_UINT32) {
            gerr(err, errlen, "general.alignment must be a uint32 (type %u)",
                 al->type);
            return -1;
        }
        f->alignment = (uint32_t)le(al->raw, 4);
        if (f->alignment == 0 || (f->alignment & (f->alignment - 1)) != 0) {
            gerr(err, errlen, "general.alignment %u is not a power of two",
                 f->alignment);
            return -1;
        }
    }
    for (i = 0; i < f->n_tensors; i++) {
        if (read_tensor(&c, &f->tensors[i], i)) return -1;
        for (j = 0; j < i; j++)
            if (strcmp(f->tensors[j].name, f->tensors[i].name) == 0) {
                gerr(err, errlen, "duplicate tensor name '%s'", f->tensors[i].name);
                return -1;
            }
    }
    /* data section starts at the next multiple of the alignment */
    f->data_offset = c.pos;
    if (f->data_offset % f->alignment)
        f->data_offset += f->alignment - f->data_offset % f->alignment;
    if (f->n_tensors > 0 && f->data_offset > f->size) {
        gerr(err, errlen, "truncated file: tensor data would start at %zu, file has %zu bytes",
             f->data_offset, f->size);
        return -1;
    }
    data_size = f->data_offset <= f->size ? f->size - f->data_offset : 0;
    for (i = 0; i < f->n_tensors; i++) {
        gguf_tensor *t = &f->tensors[i];
        if (t->offset % f->alignment) {
            gerr(err, errlen, "tensor '%s': offset %llu is not a multiple of the alignment %u",
                 t->name, (unsigned long long)t->offset, f->alignment);
            return -1;
        }
        if (t->offset > data_size || t->n_bytes > data_size - t->offset) {
            gerr(err, errlen,
                 "tensor '%s': bytes [%llu, %llu+%llu) lie outside the %llu bytes of tensor data%s",
                 t->name, (unsigned long long)t->offset,
                 (unsigned long long)t->offset, (unsigned long long)t->n_bytes,
                 (unsigned long long)data_size,
                 t->offset <= data_size ? " (truncated file?)" : "");
            return -1;
        }
        t->data = f->image + f->data_offset + t->offset;
    }
    return 0;
}

int gguf_open_memory(const void *buf, size_t size, int copy, gguf_file **out,
                     char *err, size_t errlen) {
    gguf_file *f;
    *out = NULL;
    f = (gguf_file *)calloc(1, sizeof(*f));
    if (!f) {
        gerr(err, errlen, "out of memory");
        return -1;
    }
    if (copy) {
        f->image = (uint8_t *)malloc(size ? size : 1);
        if (!f->image) {
            free(f);
            gerr(err, errlen, "out of memory");
            return -1;
        }
        if (size) memcpy(f->image, buf, size);
        f->owns_image = 1;
    } else {
        f->image = (uint8_t *)(uintptr_t)buf;
    }
    f->size = size;
    if (parse(f, err, errlen)) {
        gguf_close(f);
        return -1;
    }
    *out = f;
    return 0;
}

int gguf_open(const char *path, gguf_file **out, char *err, size_t errlen) {
    FILE *fp;
    long len;
    uint8_t *buf;
    char msg[400];
    gguf_file *f;
    *out = NULL;
    fp = fopen(path, "rb");
    if (!fp) {
        gerr(err, errlen, "%s: cannot open", path);
        return -1;
    }
    if (fseek(fp, 0, SEEK_END) != 0 || (len = ftell(fp)) < 0 ||
        fseek(fp, 0, SEEK_SET) != 0) {
        fclose(fp);
        gerr(err, errlen, "%s: cannot determine the size", path);
        return -1;
    }
    buf = (uint8_t *)malloc(len ? (size_t)len : 1);
    if (!buf) {
        fclose(fp);
        gerr(err, errlen, "%s: out of memory (%ld bytes)", path, len);
        return -1;
    }
    if (len && fread(buf, 1, (size_t)len, fp) != (size_t)len) {
        fclose(fp);
        free(buf);
        gerr(err, errlen, "%s: read error", path);
        return -1;
    }
    fclose(fp);
    if (gguf_open_memory(buf, (size_t)len, 0, &f, msg, sizeof msg)) {
        free(buf);
        gerr(err, errlen, "%s: %s", path, msg);
        return -1;
    }
    f->owns_image = 1;
    *out = f;
    return 0;
}

const gguf_kv *gguf_find_kv(const gguf_file *f, const char *key) {
    uint64_t i;
    for (i = 0; i < f->n_kv; i++)
        if (f->kv[i].key && strcmp(f->kv[i].key, key) == 0) return &f->kv[i];
    return NULL;
}

const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name) {
    uint64_t i;
    for (i = 0; i < f->n_tensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return &f->tensors[i];
    return NULL;
}

/* Integer value of a scalar at p of type t; 0 on success. */
static int int_of(uint32_t t, const uint8_t *p, int64_t *v, int *neg_ok) {
    uint64_t u;
    *neg_ok = 0;
    switch (t) {
    case GGUF_T_UINT8: case GGUF_T_BOOL: *v = p[0]; return 0;
    case GGUF_T_INT8: *v = (int8_t)p[0]; return 0;
    case GGUF_T_UINT16: *v = (int64_t)le(p, 2); return 0;
    case GGUF_T_INT16: *v = (int16_t)(uint16_t)le(p, 2); return 0;
    case GGUF_T_UINT32: *v = (int64_t)le(p, 4); return 0;
    case GGUF_T_INT32: *v = (int32_t)(uint32_t)le(p, 4); return 0;
    case GGUF_T_UINT64:
        u = le(p, 8);
        if (u > (uint64_t)INT64_MAX) return -1;
        *v = (int64_t)u;
        return 0;
    case GGUF_T_INT64: *v = (int64_t)le(p, 8); return 0;
    default: return -1;
    }
}

int64_t gguf_array_int(const gguf_kv *kv, uint64_t i) {
    int64_t v = 0;
    int n;
    size_t es = scalar_size(kv->arr_type);
    if (i >= kv->arr_count || es == 0) return 0;
    if (int_of(kv->arr_type, kv->raw + i * es, &v, &n)) return 0;
    return v;
}

int gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out,
                 char *err, size_t errlen) {
    const gguf_kv *kv = gguf_find_kv(f, key);
    int64_t v;
    int n;
    if (!kv) {
        gerr(err, errlen, "metadata '%s' is missing", key);
        return -1;
    }
    if (int_of(kv->type, kv->raw, &v, &n) || v < 0 || v > (int64_t)UINT32_MAX) {
        gerr(err, errlen, "metadata '%s' is not an unsigned 32-bit integer", key);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

int gguf_get_f32(const gguf_file *f, const char *key, float *out, char *err,
                 size_t errlen) {
    const gguf_kv *kv = gguf_find_kv(f, key);
    if (!kv) {
        gerr(err, errlen, "metadata '%s' is missing", key);
        return -1;
    }
    if (kv->type == GGUF_T_FLOAT32) {
        uint32_t b = (uint32_t)le(kv->raw, 4);
        memcpy(out, &b, 4);
        return 0;
    }
    if (kv->type == GGUF_T_FLOAT64) {
        uint64_t b = le(kv->raw, 8);
        double d;
        memcpy(&d, &b, 8);
        *out = (float)d;
        return 0;
    }
    gerr(err, errlen, "metadata '%s' is not a float (type %u)", key, kv->type);
    return -1;
}

int gguf_get_bool(const gguf_file *f, const char *key, int *out, char *err,
                  size_t errlen) {
    const gguf_kv *kv = gguf_find_kv(f, key);
    if (!kv || kv->type != GGUF_T_BOOL) {
        gerr(err, errlen, "metadata '%s' is %s", key,
             kv ? "not a bool" : "missing");
        return -1;
    }
    *out = kv->raw[0] != 0;
    return 0;
}

int gguf_get_array(const gguf_file *f, const char *key, uint32_t want,
                   const gguf_kv **out, char *err, size_t errlen) {
    const gguf_kv *kv = gguf_find_kv(f, key);
    if (!kv) {
        gerr(err, errlen, "metadata '%s' is missing", key);
        return -1;
    }
    if (kv->type != GGUF_T_ARRAY || (want != GGUF_T_COUNT && kv->arr_type != want)) {
        gerr(err, errlen, "metadata '%s' is not an array of type %u", key, want);
        return -1;
    }
    *out = kv;
    return 0;
}
