/*
 * The .cvq codebook file: writer and reader. The format is specified in
 * docs/format.md; this file follows it field by field.
 *
 *   [0, 64)               header (magic, version, sizes, header CRC)
 *   [64, 64 + 112*n)      section table, n entries of 112 bytes
 *   then the sections, each starting at a multiple of 64 from the file
 *   start, zero bytes in every gap.
 *
 * Every multi-byte field is little-endian and is written and read one byte
 * at a time (no struct dumps), so the code is independent of the host's
 * byte order and struct padding. The reader never touches a byte at or past
 * the end of its input: every offset is checked (with overflow checks)
 * before use.
 */
#include "cvq_internal.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#define CVQ_FILE_MAGIC "COMMVQCB"
#define CVQ_FILE_VERSION 1u
#define CVQ_HEADER_SIZE 64u
#define CVQ_ENTRY_SIZE 112u
#define CVQ_NAME_SIZE 32u
#define CVQ_MAX_RANK 6u
#define CVQ_MAX_SECTIONS 64u
#define CVQ_ALIGN_FILE 64u
#define CVQ_GEOM_WORDS 11u

/* Header field offsets. */
#define H_MAGIC 0
#define H_VERSION 8
#define H_HEADER_SIZE 12
#define H_ENTRY_SIZE 16
#define H_COUNT 20
#define H_TABLE_OFFSET 24
#define H_FILE_SIZE 32
#define H_RESERVED 40 /* 20 bytes, zero */
#define H_CRC 60
/* Section entry field offsets. */
#define E_NAME 0
#define E_DTYPE 32
#define E_RANK 36
#define E_DIMS 40
#define E_OFFSET 88
#define E_SIZE 96
#define E_CRC 104
#define E_RESERVED 108

enum { DT_F32 = 1, DT_F16 = 2, DT_F64 = 3, DT_TEXT = 4, DT_U32 = 5 };

static size_t dtype_size(uint32_t dt) {
    switch (dt) {
    case DT_F32: return 4;
    case DT_F16: return 2;
    case DT_F64: return 8;
    case DT_TEXT: return 1;
    case DT_U32: return 4;
    default: return 0;
    }
}

/* ---- little-endian bytes ------------------------------------------------- */

static void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get_u32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static uint64_t get_u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
/* IEEE binary32 / binary64 bit patterns (the library requires IEEE floats). */
static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint64_t f64_bits(double f) {
    uint64_t u;
    memcpy(&u, &f, 8);
    return u;
}
static double bits_f64(uint64_t u) {
    double f;
    memcpy(&f, &u, 8);
    return f;
}

/* ---- CRC32 (IEEE 802.3, reflected polynomial 0xEDB88320) ------------------ */

/* The table is built per file operation (2048 shifts: negligible next to the
 * data), which keeps this thread-safe without static initialisation. */
static void crc32_table(uint32_t t[256]) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        t[i] = c;
    }
}
/* crc32_update(t, 0, ...) is the CRC32 of a byte string; feeding a string in
 * pieces, each call with the previous result, gives the same value. */
static uint32_t crc32_update(const uint32_t t[256], uint32_t crc,
                             const uint8_t *p, size_t n) {
    uint32_t c = ~crc;
    for (size_t i = 0; i < n; i++) c = t[(c ^ p[i]) & 0xFFu] ^ (c >> 8);
    return ~c;
}

/* ---- sections -------------------------------------------------------------- */

typedef struct section {
    char name[CVQ_NAME_SIZE];
    uint32_t dtype, rank;
    uint64_t dims[CVQ_MAX_RANK];
    uint64_t offset, size;
    uint32_t crc;
    /* writer: source of the bytes */
    const uint8_t *bytes; /* geometry, rope_theta, note: already encoded */
    const float *data;    /* tensors: all layers (groups), size/elem floats */
} section;

/* The 9 tensor kinds in file order, with their section names. */
static const cvq_tensor_id k_file_tensors[] = {
    CVQ_T_KEY_W,  CVQ_T_VAL_LS, CVQ_T_VAL_LN_W, CVQ_T_VAL_LN_B, CVQ_T_VAL_W1,
    CVQ_T_VAL_B1, CVQ_T_VAL_W2, CVQ_T_VAL_B2,   CVQ_T_VAL_E};
#define N_FILE_TENSORS (sizeof k_file_tensors / sizeof k_file_tensors[0])

/* Full file shape of a tensor kind: [L] + view shape for key_w,
 * [L][groups] + view shape for value tensors. */
static void file_shape(const cvq_geometry *g, cvq_tensor_id id,
                       uint32_t *rank, uint64_t dims[CVQ_MAX_RANK]) {
    uint64_t vd[5];
    uint32_t nd = 0;
    (void)cvq__tensor_view_shape(g, id, vd, &nd);
    uint32_t n = 0;
    dims[n++] = g->n_layers;
    if (id != CVQ_T_KEY_W) dims[n++] = cvq__value_groups(g);
    for (uint32_t i = 0; i < nd; i++) dims[n++] = vd[i];
    for (uint32_t i = n; i < CVQ_MAX_RANK; i++) dims[i] = 0;
    *rank = n;
}

static uint64_t align_up(uint64_t x) {
    return (x + (CVQ_ALIGN_FILE - 1)) & ~(uint64_t)(CVQ_ALIGN_FILE - 1);
}

/* ---- writer ------------------------------------------------------------------ */

#define CHUNK_ELEMS 2048u

/* Encodes elements [e0, e1) of a section into buf (at most CHUNK_ELEMS*8
 * bytes); returns the byte count. Small sections are copied from s->bytes. */
static size_t encode_chunk(const section *s, uint64_t e0, uint64_t e1,
                           uint8_t *buf) {
    const size_t es = dtype_size(s->dtype);
    if (s->bytes) {
        memcpy(buf, s->bytes + e0 * es, (size_t)((e1 - e0) * es));
        return (size_t)((e1 - e0) * es);
    }
    size_t n = 0;
    for (uint64_t e = e0; e < e1; e++) {
        if (s->dtype == DT_F16) {
            const uint16_t h = cvq_f32_to_f16(s->data[e]);
            buf[n++] = (uint8_t)(h & 0xFFu);
            buf[n++] = (uint8_t)(h >> 8);
        } else {
            put_u32(buf + n, f32_bits(s->data[e]));
            n += 4;
        }
    }
    return n;
}

/* Streams a section's bytes through CRC (f == NULL) or to f. */
static bool emit_section(section *s, const uint32_t crc_t[256], FILE *f) {
    uint8_t buf[CHUNK_ELEMS * 8];
    const uint64_t count = s->size / dtype_size(s->dtype);
    uint32_t crc = 0;
    for (uint64_t e0 = 0; e0 < count; e0 += CHUNK_ELEMS) {
        const uint64_t e1 = count - e0 < CHUNK_ELEMS ? count : e0 + CHUNK_ELEMS;
        const size_t n = encode_chunk(s, e0, e1, buf);
        if (f) {
            if (fwrite(buf, 1, n, f) != n) return false;
        } else {
            crc = crc32_update(crc_t, crc, buf, n);
        }
    }
    if (!f) s->crc = crc;
    return true;
}

static bool write_zeros(FILE *f, uint64_t n) {
    static const uint8_t zeros[CVQ_ALIGN_FILE];
    while (n > 0) {
        const size_t k = n < CVQ_ALIGN_FILE ? (size_t)n : CVQ_ALIGN_FILE;
        if (fwrite(zeros, 1, k, f) != k) return false;
        n -= k;
    }
    return true;
}

static void set_section(section *s, const char *name, uint32_t dtype,
                        uint32_t rank, const uint64_t *dims) {
    memset(s, 0, sizeof *s);
    /* names are library constants shorter than CVQ_NAME_SIZE */
    memcpy(s->name, name, strlen(name));
    s->dtype = dtype;
    s->rank = rank;
    uint64_t count = 1;
    for (uint32_t i = 0; i < rank; i++) {
        s->dims[i] = dims[i];
        count *= dims[i];
    }
    s->size = count * dtype_size(dtype);
}

/* Every value must be finite (the reader would refuse the file), and with
 * fp16 storage no finite value may round to infinity. This scan does not
 * rely on the dirty flag: a write through a pointer obtained before the last
 * commit is not tracked, and a file is forever. */
static cvq_status check_savable(const cvq_codebook *cb, bool fp16) {
    for (size_t k = 0; k < N_FILE_TENSORS; k++) {
        const cvq_tensor_id id = k_file_tensors[k];
        const size_t per_layer = cb->layer_stride[id];
        const size_t n = cb->geom.n_layers * per_layer;
        const float *x = cb->tensors[id];
        for (size_t j = 0; j < n; j++) {
            const bool bad_value = !isfinite(x[j]);
            if (bad_value || (fp16 && (cvq_f32_to_f16(x[j]) & 0x7FFFu) == 0x7C00u)) {
                cvq_tensor_info info;
                (void)cvq_codebook_tensor_info(cb, id, &info);
                if (bad_value)
                    return CVQ_FAIL(NULL, CVQ_ERR_FORMAT_NONFINITE,
                                    "cannot save: %s layer %zu element %zu (of the "
                                    "layer) is %s",
                                    info.name, j / per_layer, j % per_layer,
                                    isnan(x[j]) ? "NaN" : "infinite");
                return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                                "cannot save as fp16: %s layer %zu element %zu (of "
                                "the layer) = %g overflows binary16 (largest "
                                "finite 65504); save in fp32",
                                info.name, j / per_layer, j % per_layer,
                                (double)x[j]);
            }
        }
    }
    return CVQ_OK;
}

cvq_status cvq_codebook_save(const cvq_codebook *cb, const char *path,
                             uint32_t flags) {
    CVQ__NONNULL(NULL, "cvq_codebook_save", cb, "cb");
    CVQ__NONNULL(NULL, "cvq_codebook_save", path, "path");
    if (flags & ~CVQ_SAVE_FP16)
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                        "cvq_codebook_save: unknown flags 0x%x", flags);
    /* Refuse, before creating anything, to write a file the reader would
     * refuse or that would not hold the values. */
    const bool fp16 = (flags & CVQ_SAVE_FP16) != 0;
    cvq_status st = check_savable(cb, fp16);
    if (st != CVQ_OK) return st;

    const cvq_geometry *g = &cb->geom;
    const uint32_t P = cvq__pairs(g);
    uint8_t geom_bytes[CVQ_GEOM_WORDS * 4];
    const uint32_t words[CVQ_GEOM_WORDS] = {
        g->n_layers,   g->n_q_heads,          g->n_kv_heads,
        g->head_dim,   g->key_stages,         (uint32_t)g->key_scale,
        (uint32_t)g->pair_layout, g->value_group_width, g->value_bits,
        g->value_hidden, f32_bits(g->logit_scale)};
    for (uint32_t i = 0; i < CVQ_GEOM_WORDS; i++) put_u32(geom_bytes + 4 * i, words[i]);
    uint8_t rope_bytes[128 * 8]; /* P <= 128 */
    for (uint32_t p = 0; p < P; p++) put_u64(rope_bytes + 8 * p, f64_bits(cb->rope_theta[p]));

    section secs[3 + N_FILE_TENSORS];
    uint32_t n = 0;
    uint64_t dims[CVQ_MAX_RANK];
    dims[0] = CVQ_GEOM_WORDS;
    set_section(&secs[n], "geometry", DT_U32, 1, dims);
    secs[n++].bytes = geom_bytes;
    dims[0] = P;
    set_section(&secs[n], "rope_theta", DT_F64, 1, dims);
    secs[n++].bytes = rope_bytes;
    if (cb->note && cb->note[0]) {
        dims[0] = strlen(cb->note);
        set_section(&secs[n], "note", DT_TEXT, 1, dims);
        secs[n++].bytes = (const uint8_t *)cb->note;
    }
    for (size_t k = 0; k < N_FILE_TENSORS; k++) {
        const cvq_tensor_id id = k_file_tensors[k];
        cvq_tensor_info info;
        uint32_t rank;
        (void)cvq_codebook_tensor_info(cb, id, &info);
        file_shape(&cb->geom, id, &rank, dims);
        set_section(&secs[n], info.name, fp16 ? DT_F16 : DT_F32, rank, dims);
        secs[n++].data = cb->tensors[id];
    }

    /* Layout: header, table, then each section at the next multiple of 64.
     * The file ends where its last section ends. */
    uint32_t crc_t[256];
    crc32_table(crc_t);
    const uint64_t table_end = CVQ_HEADER_SIZE + (uint64_t)n * CVQ_ENTRY_SIZE;
    uint64_t pos = table_end;
    for (uint32_t i = 0; i < n; i++) {
        secs[i].offset = align_up(pos);
        pos = secs[i].offset + secs[i].size;
        (void)emit_section(&secs[i], crc_t, NULL); /* CRC pass */
    }
    const uint64_t file_size = pos;

    uint8_t head[CVQ_HEADER_SIZE + (3 + N_FILE_TENSORS) * CVQ_ENTRY_SIZE];
    memset(head, 0, sizeof head);
    memcpy(head + H_MAGIC, CVQ_FILE_MAGIC, 8);
    put_u32(head + H_VERSION, CVQ_FILE_VERSION);
    put_u32(head + H_HEADER_SIZE, CVQ_HEADER_SIZE);
    put_u32(head + H_ENTRY_SIZE, CVQ_ENTRY_SIZE);
    put_u32(head + H_COUNT, n);
    put_u64(head + H_TABLE_OFFSET, CVQ_HEADER_SIZE);
    put_u64(head + H_FILE_SIZE, file_size);
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *e = head + CVQ_HEADER_SIZE + (size_t)i * CVQ_ENTRY_SIZE;
        memcpy(e + E_NAME, secs[i].name, CVQ_NAME_SIZE);
        put_u32(e + E_DTYPE, secs[i].dtype);
        put_u32(e + E_RANK, secs[i].rank);
        for (uint32_t k = 0; k < CVQ_MAX_RANK; k++) put_u64(e + E_DIMS + 8 * k, secs[i].dims[k]);
        put_u64(e + E_OFFSET, secs[i].offset);
        put_u64(e + E_SIZE, secs[i].size);
        put_u32(e + E_CRC, secs[i].crc);
    }
    /* Header CRC: bytes [0, 60) of the header, then the whole table. */
    uint32_t hcrc = crc32_update(crc_t, 0, head, H_CRC);
    hcrc = crc32_update(crc_t, hcrc, head + CVQ_HEADER_SIZE,
                        (size_t)(table_end - CVQ_HEADER_SIZE));
    put_u32(head + H_CRC, hcrc);

    FILE *f = fopen(path, "wb");
    if (!f)
        return CVQ_FAIL(NULL, CVQ_ERR_IO, "cannot create '%s': %s", path,
                        strerror(errno));
    bool ok = fwrite(head, 1, (size_t)table_end, f) == (size_t)table_end;
    pos = table_end;
    for (uint32_t i = 0; ok && i < n; i++) {
        ok = write_zeros(f, secs[i].offset - pos) && emit_section(&secs[i], crc_t, f);
        pos = secs[i].offset + secs[i].size;
    }
    int err = ok ? 0 : errno;
    if (fclose(f) != 0 && ok) {
        ok = false;
        err = errno;
    }
    if (!ok) {
        /* A partial file may remain (the path may not be a regular file, so
         * it is not removed); the reader refuses it: the header announces
         * the full size. */
        return CVQ_FAIL(NULL, CVQ_ERR_IO, "cannot write '%s': %s", path,
                        strerror(err));
    }
    return CVQ_OK;
}

/* ---- reader ----------------------------------------------------------------- */

/* Index of a known section name, or -1. 0 geometry, 1 rope_theta, 2 note,
 * 3 + k: tensor k_file_tensors[k]. */
#define SEC_GEOMETRY 0
#define SEC_ROPE 1
#define SEC_NOTE 2
#define SEC_TENSOR0 3
#define N_KNOWN (3 + (int)N_FILE_TENSORS)

static const char *known_name(int k) {
    static const char *const fixed[3] = {"geometry", "rope_theta", "note"};
    static const char *const tensors[N_FILE_TENSORS] = {
        "key_w", "val_ls", "val_ln_w", "val_ln_b", "val_w1",
        "val_b1", "val_w2", "val_b2", "val_E"};
    return k < 3 ? fixed[k] : tensors[k - 3];
}

static int find_known(const char *name) {
    for (int k = 0; k < N_KNOWN; k++)
        if (strcmp(name, known_name(k)) == 0) return k;
    return -1;
}

/* Parses and checks one table entry (structure only; contents later). */
static cvq_status parse_entry(const uint8_t *e, uint32_t index,
                              uint64_t file_size, uint64_t table_end,
                              section *s) {
    memset(s, 0, sizeof *s);
    size_t len = 0;
    while (len < CVQ_NAME_SIZE && e[E_NAME + len] != 0) len++;
    if (len == 0 || len == CVQ_NAME_SIZE)
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT,
                        "section %u: name is empty or not NUL-terminated", index);
    for (size_t i = len; i < CVQ_NAME_SIZE; i++)
        if (e[E_NAME + i] != 0)
            return CVQ_FAIL(NULL, CVQ_ERR_FORMAT,
                            "section %u: name padding is not zero", index);
    for (size_t i = 0; i < len; i++) {
        const uint8_t c = e[E_NAME + i];
        if (c < 0x21 || c > 0x7E)
            return CVQ_FAIL(NULL, CVQ_ERR_FORMAT,
                            "section %u: name has a non-printable byte 0x%02x",
                            index, c);
    }
    memcpy(s->name, e + E_NAME, len);
    s->dtype = get_u32(e + E_DTYPE);
    s->rank = get_u32(e + E_RANK);
    const size_t es = dtype_size(s->dtype);
    if (es == 0)
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT, "section '%s': unknown dtype %u",
                        s->name, s->dtype);
    if (s->rank < 1 || s->rank > CVQ_MAX_RANK)
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT, "section '%s': rank %u not in 1..%u",
                        s->name, s->rank, CVQ_MAX_RANK);
    uint64_t count = 1;
    for (uint32_t k = 0; k < CVQ_MAX_RANK; k++) {
        s->dims[k] = get_u64(e + E_DIMS + 8 * k);
        if (k >= s->rank) {
            if (s->dims[k] != 0)
                return CVQ_FAIL(NULL, CVQ_ERR_FORMAT,
                                "section '%s': dimension %u beyond rank %u is not 0",
                                s->name, k, s->rank);
            continue;
        }
        if (s->dims[k] == 0 || s->dims[k] > UINT64_MAX / count)
            return CVQ_FAIL(NULL, CVQ_ERR_FORMAT,
                            "section '%s': dimension %u = %llu is zero or too large",
                            s->name, k, (unsigned long long)s->dims[k]);
        count *= s->dims[k];
    }
    s->offset = get_u64(e + E_OFFSET);
    s->size = get_u64(e + E_SIZE);
    s->crc = get_u32(e + E_CRC);
    if (get_u32(e + E_RESERVED) != 0)
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT, "section '%s': reserved field not 0",
                        s->name);
    if (count > UINT64_MAX / es || count * es != s->size)
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT,
                        "section '%s': byte size %llu does not match its shape "
                        "and dtype",
                        s->name, (unsigned long long)s->size);
    if (s->offset % CVQ_ALIGN_FILE != 0 || s->offset < table_end ||
        s->offset > file_size || s->size > file_size - s->offset)
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT,
                        "section '%s': bytes [%llu, +%llu) are not 64-aligned "
                        "inside the data area [%llu, %llu)",
                        s->name, (unsigned long long)s->offset,
                        (unsigned long long)s->size,
                        (unsigned long long)table_end,
                        (unsigned long long)file_size);
    return CVQ_OK;
}

/* The sections must not overlap, and every byte between them (and after the
 * last) must be zero, so that every bit of a valid file is covered by a CRC
 * or a zero check. */
static cvq_status check_layout(const uint8_t *data, uint64_t file_size,
                               uint64_t table_end, const section *secs,
                               uint32_t n) {
    uint32_t order[CVQ_MAX_SECTIONS];
    for (uint32_t i = 0; i < n; i++) {
        uint32_t j = i;
        while (j > 0 && secs[order[j - 1]].offset > secs[i].offset) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = i;
    }
    uint64_t pos = table_end;
    for (uint32_t k = 0; k <= n; k++) {
        const uint64_t start = k < n ? secs[order[k]].offset : file_size;
        if (start < pos)
            return CVQ_FAIL(NULL, CVQ_ERR_FORMAT, "section '%s' overlaps another",
                            secs[order[k]].name);
        for (uint64_t b = pos; b < start; b++)
            if (data[b] != 0)
                return CVQ_FAIL(NULL, CVQ_ERR_FORMAT,
                                "non-zero padding byte at offset %llu",
                                (unsigned long long)b);
        if (k < n) pos = start + secs[order[k]].size;
    }
    return CVQ_OK;
}

static cvq_status expect_shape(const section *s, uint32_t rank,
                               const uint64_t *dims) {
    bool same = s->rank == rank;
    for (uint32_t k = 0; same && k < rank; k++) same = s->dims[k] == dims[k];
    if (same) return CVQ_OK;
    char want[160], got[160];
    int w = 0, h = 0;
    for (uint32_t k = 0; k < rank && w >= 0 && w < (int)sizeof want; k++)
        w += snprintf(want + w, sizeof want - (size_t)w, "[%llu]",
                      (unsigned long long)dims[k]);
    for (uint32_t k = 0; k < s->rank && h >= 0 && h < (int)sizeof got; k++)
        h += snprintf(got + h, sizeof got - (size_t)h, "[%llu]",
                      (unsigned long long)s->dims[k]);
    if (rank == 0) want[0] = 0;
    if (s->rank == 0) got[0] = 0;
    return CVQ_FAIL(NULL, CVQ_ERR_FORMAT,
                    "section '%s' has shape %s, the geometry needs %s", s->name,
                    got, want);
}

static cvq_status read_geometry(const uint8_t *data, const section *s,
                                cvq_geometry *g) {
    const uint64_t dims[1] = {CVQ_GEOM_WORDS};
    if (s->dtype != DT_U32)
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT, "section 'geometry' must be u32");
    cvq_status st = expect_shape(s, 1, dims);
    if (st != CVQ_OK) return st;
    uint32_t w[CVQ_GEOM_WORDS];
    for (uint32_t i = 0; i < CVQ_GEOM_WORDS; i++) w[i] = get_u32(data + s->offset + 4 * i);
    memset(g, 0, sizeof *g);
    g->n_layers = w[0];
    g->n_q_heads = w[1];
    g->n_kv_heads = w[2];
    g->head_dim = w[3];
    g->key_stages = w[4];
    if (w[5] > 1 || w[6] > 1)
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT,
                        "geometry: key_scale %u / pair_layout %u not 0 or 1", w[5],
                        w[6]);
    g->key_scale = (cvq_key_scale_mode)w[5];
    g->pair_layout = (cvq_pair_layout)w[6];
    g->value_group_width = w[7];
    g->value_bits = w[8];
    g->value_hidden = w[9];
    g->logit_scale = bits_f32(w[10]);
    /* A file stores the resolved geometry: no field may rely on a default. */
    if (g->value_group_width == 0 || g->value_hidden == 0 || g->logit_scale == 0.0f)
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT,
                        "geometry: value_group_width, value_hidden and "
                        "logit_scale must be stored resolved (non-zero)");
    /* Unsupported values: CVQ_ERR_GEOMETRY with the validator's message. */
    return cvq_geometry_resolve(g);
}

/* Copies (f32) or converts (f16, exactly) a tensor section into dst. */
static void read_tensor(const uint8_t *data, const section *s, float *dst) {
    const uint8_t *p = data + s->offset;
    const size_t es = dtype_size(s->dtype);
    const size_t n = (size_t)(s->size / es);
    if (s->dtype == DT_F16) {
        for (size_t i = 0; i < n; i++)
            dst[i] = cvq_f16_to_f32((uint16_t)(p[2 * i] | (p[2 * i + 1] << 8)));
    } else {
        for (size_t i = 0; i < n; i++) dst[i] = bits_f32(get_u32(p + 4 * i));
    }
}

cvq_status cvq_codebook_load_memory(const void *bytes, size_t size,
                                    const cvq_allocator *allocator,
                                    cvq_codebook **out) {
    if (!out)
        return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "cvq_codebook_load: out is NULL");
    *out = NULL;
    if (!bytes && size > 0)
        return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "cvq_codebook_load: data is NULL");
    const uint8_t *data = bytes;

    /* Header. Magic first (what is present of it), then the version: the
     * rest of the header is only meaningful for a version we know. */
    const size_t magic_have = size < 8 ? size : 8;
    if (magic_have > 0 && memcmp(data, CVQ_FILE_MAGIC, magic_have) != 0)
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT,
                        "not a commvq codebook (.cvq): bad magic");
    if (size < CVQ_HEADER_SIZE)
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT_TRUNCATED,
                        "file of %zu bytes ends inside the %u-byte header", size,
                        CVQ_HEADER_SIZE);
    const uint32_t version = get_u32(data + H_VERSION);
    if (version != CVQ_FILE_VERSION)
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT_VERSION,
                        "codebook file format version %u; this library reads "
                        "version %u",
                        version, CVQ_FILE_VERSION);
    if (get_u32(data + H_HEADER_SIZE) != CVQ_HEADER_SIZE ||
        get_u32(data + H_ENTRY_SIZE) != CVQ_ENTRY_SIZE ||
        get_u64(data + H_TABLE_OFFSET) != CVQ_HEADER_SIZE)
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT,
                        "header/entry sizes or table offset differ from "
                        "version 1 (64, 112, 64)");
    const uint32_t n = get_u32(data + H_COUNT);
    if (n > CVQ_MAX_SECTIONS)
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT, "%u sections (at most %u)", n,
                        CVQ_MAX_SECTIONS);
    const uint64_t table_end = CVQ_HEADER_SIZE + (uint64_t)n * CVQ_ENTRY_SIZE;
    if (size < table_end)
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT_TRUNCATED,
                        "file of %zu bytes ends inside the section table "
                        "(%llu bytes)",
                        size, (unsigned long long)table_end);
    uint32_t crc_t[256];
    crc32_table(crc_t);
    uint32_t hcrc = crc32_update(crc_t, 0, data, H_CRC);
    hcrc = crc32_update(crc_t, hcrc, data + CVQ_HEADER_SIZE,
                        (size_t)(table_end - CVQ_HEADER_SIZE));
    if (hcrc != get_u32(data + H_CRC))
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT_CHECKSUM,
                        "header/section table CRC32 mismatch (stored 0x%08x, "
                        "computed 0x%08x)",
                        get_u32(data + H_CRC), hcrc);
    for (size_t i = H_RESERVED; i < H_CRC; i++)
        if (data[i] != 0)
            return CVQ_FAIL(NULL, CVQ_ERR_FORMAT, "reserved header bytes not zero");
    const uint64_t file_size = get_u64(data + H_FILE_SIZE);
    if (file_size > size)
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT_TRUNCATED,
                        "file is truncated: %zu bytes of %llu", size,
                        (unsigned long long)file_size);
    if (file_size < size)
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT,
                        "%llu unexpected bytes after the end of the file (%llu)",
                        (unsigned long long)(size - file_size),
                        (unsigned long long)file_size);

    /* Section table. */
    section secs[CVQ_MAX_SECTIONS];
    int where[N_KNOWN];
    for (int k = 0; k < N_KNOWN; k++) where[k] = -1;
    for (uint32_t i = 0; i < n; i++) {
        cvq_status s = parse_entry(data + CVQ_HEADER_SIZE + (size_t)i * CVQ_ENTRY_SIZE,
                                   i, file_size, table_end, &secs[i]);
        if (s != CVQ_OK) return s;
        const int k = find_known(secs[i].name);
        if (k < 0)
            return CVQ_FAIL(NULL, CVQ_ERR_FORMAT,
                            "unknown section '%s' (version 1 has no optional "
                            "sections besides 'note')",
                            secs[i].name);
        if (where[k] >= 0)
            return CVQ_FAIL(NULL, CVQ_ERR_FORMAT, "section '%s' appears twice",
                            secs[i].name);
        where[k] = (int)i;
    }
    for (int k = 0; k < N_KNOWN; k++)
        if (k != SEC_NOTE && where[k] < 0)
            return CVQ_FAIL(NULL, CVQ_ERR_FORMAT, "required section '%s' is missing",
                            known_name(k));
    cvq_status s = check_layout(data, file_size, table_end, secs, n);
    if (s != CVQ_OK) return s;
    for (uint32_t i = 0; i < n; i++) {
        const uint32_t c = crc32_update(crc_t, 0, data + secs[i].offset,
                                        (size_t)secs[i].size);
        if (c != secs[i].crc)
            return CVQ_FAIL(NULL, CVQ_ERR_FORMAT_CHECKSUM,
                            "section '%s': CRC32 mismatch (stored 0x%08x, "
                            "computed 0x%08x)",
                            secs[i].name, secs[i].crc, c);
    }

    /* Contents. */
    cvq_geometry g;
    s = read_geometry(data, &secs[where[SEC_GEOMETRY]], &g);
    if (s != CVQ_OK) return s;
    const uint32_t P = cvq__pairs(&g);
    const section *rs = &secs[where[SEC_ROPE]];
    const uint64_t rope_dims[1] = {P};
    if (rs->dtype != DT_F64)
        return CVQ_FAIL(NULL, CVQ_ERR_FORMAT, "section 'rope_theta' must be f64");
    s = expect_shape(rs, 1, rope_dims);
    if (s != CVQ_OK) return s;
    double theta[128];
    for (uint32_t p = 0; p < P; p++) {
        theta[p] = bits_f64(get_u64(data + rs->offset + 8 * p));
        if (!isfinite(theta[p]))
            return CVQ_FAIL(NULL, CVQ_ERR_FORMAT_NONFINITE,
                            "rope_theta[%u] is not finite", p);
    }
    const section *ns = where[SEC_NOTE] >= 0 ? &secs[where[SEC_NOTE]] : NULL;
    if (ns) {
        if (ns->dtype != DT_TEXT || ns->rank != 1)
            return CVQ_FAIL(NULL, CVQ_ERR_FORMAT, "section 'note' must be u8 text [n]");
        if (memchr(data + ns->offset, 0, (size_t)ns->size))
            return CVQ_FAIL(NULL, CVQ_ERR_FORMAT, "section 'note' holds a NUL byte");
    }

    /* Every tensor section must have the shape the geometry implies before
     * anything is allocated: the sections' sizes are bounded by the file,
     * the geometry is not, and a header that promises a huge model with
     * small sections must not cost the caller the huge model's memory
     * (found by fuzz_cvq: a 45 KB input made the loader allocate 2 GB). */
    for (size_t k = 0; k < N_FILE_TENSORS; k++) {
        const section *ts = &secs[where[SEC_TENSOR0 + (int)k]];
        uint32_t rank;
        uint64_t dims[CVQ_MAX_RANK];
        file_shape(&g, k_file_tensors[k], &rank, dims);
        s = (ts->dtype == DT_F32 || ts->dtype == DT_F16)
                ? expect_shape(ts, rank, dims)
                : CVQ_FAIL(NULL, CVQ_ERR_FORMAT, "section '%s' must be f32 or f16",
                           ts->name);
        if (s != CVQ_OK) return s;
    }
    cvq_codebook *cb = NULL;
    s = cvq_codebook_create(&g, theta, allocator, &cb);
    if (s != CVQ_OK) return s;
    for (size_t k = 0; k < N_FILE_TENSORS; k++)
        read_tensor(data, &secs[where[SEC_TENSOR0 + (int)k]], cb->tensors[k_file_tensors[k]]);
    if (ns) {
        cb->note = cvq__alloc(&cb->alloc, (size_t)ns->size + 1);
        if (!cb->note) {
            cvq_codebook_free(cb);
            return CVQ_FAIL(NULL, CVQ_ERR_OUT_OF_MEMORY,
                            "cannot allocate the note (%llu bytes)",
                            (unsigned long long)ns->size);
        }
        memcpy(cb->note, data + ns->offset, (size_t)ns->size);
        cb->note[ns->size] = 0;
    }
    /* Builds the derived tables and refuses NaN/Inf anywhere. */
    s = cvq_codebook_commit(cb);
    if (s != CVQ_OK) {
        cvq_codebook_free(cb);
        return s;
    }
    *out = cb;
    return CVQ_OK;
}

cvq_status cvq_codebook_load(const char *path, const cvq_allocator *allocator,
                             cvq_codebook **out) {
    if (!out)
        return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "cvq_codebook_load: out is NULL");
    *out = NULL;
    if (!path)
        return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "cvq_codebook_load: path is NULL");
    FILE *f = fopen(path, "rb");
    if (!f)
        return CVQ_FAIL(NULL, CVQ_ERR_IO, "cannot open '%s': %s", path,
                        strerror(errno));
    /* Probe one byte first: reading a directory fails here (EISDIR), before
     * its meaningless "size" is used. */
    long end = -1;
    errno = 0;
    if (fgetc(f) == EOF && ferror(f)) {
        const int err = errno;
        fclose(f);
        return CVQ_FAIL(NULL, CVQ_ERR_IO, "cannot read '%s': %s", path,
                        strerror(err));
    }
    if (fseek(f, 0, SEEK_END) != 0 || (end = ftell(f)) < 0 ||
        fseek(f, 0, SEEK_SET) != 0) {
        const int err = errno;
        fclose(f);
        return CVQ_FAIL(NULL, CVQ_ERR_IO, "cannot determine the size of '%s': %s",
                        path, strerror(err));
    }
    cvq_allocator a;
    cvq__allocator_init(&a, allocator);
    const size_t size = (size_t)end;
    uint8_t *buf = cvq__alloc(&a, size);
    if (!buf) {
        fclose(f);
        return CVQ_FAIL(NULL, CVQ_ERR_OUT_OF_MEMORY,
                        "cannot allocate %zu bytes to read '%s'", size, path);
    }
    errno = 0;
    const size_t got = fread(buf, 1, size, f);
    const bool failed = ferror(f) != 0;
    const int read_err = errno;
    fclose(f);
    if (failed) {
        cvq__free(&a, buf);
        return CVQ_FAIL(NULL, CVQ_ERR_IO, "cannot read '%s': %s", path,
                        read_err ? strerror(read_err) : "read error");
    }
    /* A file that shrank while being read is parsed as what was read: the
     * parser then reports it as truncated. */
    cvq_status s = cvq_codebook_load_memory(buf, got, allocator, out);
    cvq__free(&a, buf);
    return s;
}
