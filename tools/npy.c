/*
 * NumPy .npy reader and writer (see npy.h).
 *
 * File layout (numpy's NEP 1 / numpy.lib.format):
 *   bytes 0..5   magic "\x93NUMPY"
 *   byte  6, 7   major, minor version (1.0, 2.0, 3.0)
 *   v1: bytes 8..9   header length HLEN, uint16 little-endian; header at 10
 *   v2/v3: bytes 8..11 HLEN, uint32 little-endian; header at 12
 *   header: a Python dict literal with exactly the keys 'descr',
 *           'fortran_order' and 'shape', padded with spaces and ended by
 *           '\n' (v3 allows UTF-8; we accept only ASCII inside the dict)
 *   data: product(shape) elements, C order, byte order given by descr.
 *
 * The header parser is a small hand-written scanner over [p, end): every
 * read checks the cursor against end first, so a malformed or truncated
 * header can never make it read past the buffer.
 */
#include "npy.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const unsigned char npy_magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};

static void npy_err(char *err, size_t errlen, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

static void npy_err(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    if (err == NULL || errlen == 0) return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

const char *npy_dtype_descr(npy_dtype t) {
    switch (t) {
    case NPY_F4: return "<f4";
    case NPY_F2: return "<f2";
    case NPY_U2: return "<u2";
    case NPY_U1: return "|u1";
    case NPY_I4: return "<i4";
    case NPY_F8: return "<f8";
    }
    return "?";
}

const char *npy_dtype_name(npy_dtype t) {
    switch (t) {
    case NPY_F4: return "float32";
    case NPY_F2: return "float16";
    case NPY_U2: return "uint16";
    case NPY_U1: return "uint8";
    case NPY_I4: return "int32";
    case NPY_F8: return "float64";
    }
    return "?";
}

size_t npy_dtype_size(npy_dtype t) {
    switch (t) {
    case NPY_F4: return 4;
    case NPY_F2: return 2;
    case NPY_U2: return 2;
    case NPY_U1: return 1;
    case NPY_I4: return 4;
    case NPY_F8: return 8;
    }
    return 0;
}

/* ---- byte order --------------------------------------------------------- */

static int host_is_little_endian(void) {
    const uint16_t probe = 1;
    unsigned char b;
    memcpy(&b, &probe, 1);
    return b == 1;
}

/* Reverses the bytes of each of n elements of size es (2, 4 or 8): .npy
 * data is little-endian, so this only runs on big-endian hosts. */
static void swap_elements(void *data, uint64_t n, size_t es) {
    unsigned char *p = (unsigned char *)data;
    uint64_t i;
    size_t j;
    if (es < 2) return;
    for (i = 0; i < n; i++, p += es) {
        for (j = 0; j < es / 2; j++) {
            unsigned char t = p[j];
            p[j] = p[es - 1 - j];
            p[es - 1 - j] = t;
        }
    }
}

/* ---- header dict scanner ------------------------------------------------ */

typedef struct scan {
    const char *p, *end;
    char *err;
    size_t errlen;
} scan;

static void skip_ws(scan *s) {
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' ||
                             *s->p == '\r'))
        s->p++;
}

/* Offset of the cursor within the header, for messages. */
#define SCAN_AT(s, base) ((long)((s)->p - (base)))

/* A quoted string ('...' or "...") without escapes, into out[0..cap). */
static int scan_string(scan *s, char *out, size_t cap, const char *what) {
    char q;
    size_t n = 0;
    if (s->p >= s->end || (*s->p != '\'' && *s->p != '"')) {
        if (s->p < s->end && *s->p == '[')
            npy_err(s->err, s->errlen,
                    "%s is a list: structured dtypes are not supported", what);
        else
            npy_err(s->err, s->errlen, "malformed header: expected a quoted %s",
                    what);
        return -1;
    }
    q = *s->p++;
    while (s->p < s->end && *s->p != q) {
        if (*s->p == '\\' || (unsigned char)*s->p < 0x20 ||
            (unsigned char)*s->p >= 0x7f) {
            npy_err(s->err, s->errlen,
                    "malformed header: unexpected character in %s", what);
            return -1;
        }
        if (n + 1 >= cap) {
            npy_err(s->err, s->errlen, "malformed header: %s is too long", what);
            return -1;
        }
        out[n++] = *s->p++;
    }
    if (s->p >= s->end) {
        npy_err(s->err, s->errlen, "malformed header: unterminated %s", what);
        return -1;
    }
    s->p++; /* closing quote */
    out[n] = '\0';
    return 0;
}

/* True or False (Python literals). */
static int scan_bool(scan *s, int *out) {
    size_t left = (size_t)(s->end - s->p);
    if (left >= 4 && memcmp(s->p, "True", 4) == 0) {
        s->p += 4;
        *out = 1;
        return 0;
    }
    if (left >= 5 && memcmp(s->p, "False", 5) == 0) {
        s->p += 5;
        *out = 0;
        return 0;
    }
    npy_err(s->err, s->errlen,
            "malformed header: 'fortran_order' must be True or False");
    return -1;
}

/* A non-negative decimal integer (an old Python 2 'L' suffix is allowed). */
static int scan_uint(scan *s, uint64_t *out) {
    uint64_t v = 0;
    int digits = 0;
    if (s->p < s->end && *s->p == '-') {
        npy_err(s->err, s->errlen, "malformed header: negative dimension in 'shape'");
        return -1;
    }
    while (s->p < s->end && *s->p >= '0' && *s->p <= '9') {
        unsigned dgt = (unsigned)(*s->p - '0');
        if (v > (UINT64_MAX - dgt) / 10) {
            npy_err(s->err, s->errlen, "shape overflow: a dimension does not fit 64 bits");
            return -1;
        }
        v = v * 10 + dgt;
        digits++;
        s->p++;
    }
    if (digits == 0) {
        npy_err(s->err, s->errlen, "malformed header: expected an integer in 'shape'");
        return -1;
    }
    if (s->p < s->end && (*s->p == 'L' || *s->p == 'l')) s->p++;
    *out = v;
    return 0;
}

/* "(d0, d1, ...)" with an optional trailing comma; "()" is a scalar. */
static int scan_shape(scan *s, npy_array *a) {
    uint32_t n = 0;
    if (s->p >= s->end || *s->p != '(') {
        npy_err(s->err, s->errlen, "malformed header: 'shape' must be a tuple");
        return -1;
    }
    s->p++;
    for (;;) {
        skip_ws(s);
        if (s->p < s->end && *s->p == ')') {
            s->p++;
            break;
        }
        if (n == NPY_MAX_DIMS) {
            npy_err(s->err, s->errlen, "'shape' has more than %d dimensions",
                    NPY_MAX_DIMS);
            return -1;
        }
        if (scan_uint(s, &a->shape[n]) != 0) return -1;
        n++;
        skip_ws(s);
        if (s->p < s->end && *s->p == ',') {
            s->p++;
            continue;
        }
        if (s->p < s->end && *s->p == ')') {
            s->p++;
            break;
        }
        npy_err(s->err, s->errlen, "malformed header: bad 'shape' tuple");
        return -1;
    }
    a->ndim = n;
    return 0;
}

static int dtype_from_descr(const char *d, npy_dtype *t, char *err, size_t errlen) {
    static const struct {
        const char *descr;
        npy_dtype t;
    } known[] = {{"<f4", NPY_F4}, {"<f2", NPY_F2}, {"<u2", NPY_U2},
                 {"|u1", NPY_U1}, {"<u1", NPY_U1}, {">u1", NPY_U1},
                 {"=u1", NPY_U1}, {"<i4", NPY_I4}, {"<f8", NPY_F8}};
    size_t i;
    for (i = 0; i < sizeof known / sizeof known[0]; i++) {
        if (strcmp(d, known[i].descr) == 0) {
            *t = known[i].t;
            return 0;
        }
    }
    if (d[0] == '>' && d[1] != '\0') {
        npy_err(err, errlen,
                "big-endian dtype '%s' is not supported; convert with "
                "arr.astype('<%s')",
                d, d + 1);
        return -1;
    }
    npy_err(err, errlen,
            "dtype '%s' is not supported (supported: '<f4' float32, '<f2' "
            "float16, '<u2' uint16, '|u1' uint8, '<i4' int32, '<f8' float64)",
            d);
    return -1;
}

int npy_parse_header(const void *buf, size_t size, npy_array *a,
                     size_t *data_offset, char *err, size_t errlen) {
    const unsigned char *b = (const unsigned char *)buf;
    unsigned major, minor;
    size_t hlen, hstart, es;
    scan s;
    char key[32], descr[32];
    int have_descr = 0, have_fortran = 0, have_shape = 0, fortran = 0;
    uint32_t i;
    uint64_t count = 1;

    memset(a, 0, sizeof *a);
    if (buf == NULL || size < 10) {
        npy_err(err, errlen, "not a .npy file: only %zu bytes", size);
        return -1;
    }
    if (memcmp(b, npy_magic, sizeof npy_magic) != 0) {
        npy_err(err, errlen, "not a .npy file (bad magic bytes)");
        return -1;
    }
    major = b[6];
    minor = b[7];
    if ((major != 1 && major != 2 && major != 3) || minor != 0) {
        npy_err(err, errlen, "unsupported .npy format version %u.%u (reads 1.0, 2.0, 3.0)",
                major, minor);
        return -1;
    }
    if (major == 1) {
        hlen = (size_t)b[8] | ((size_t)b[9] << 8);
        hstart = 10;
    } else {
        if (size < 12) {
            npy_err(err, errlen, "truncated .npy header: file ends after %zu bytes", size);
            return -1;
        }
        hlen = (size_t)b[8] | ((size_t)b[9] << 8) | ((size_t)b[10] << 16) |
               ((size_t)b[11] << 24);
        hstart = 12;
    }
    if (hlen > NPY_MAX_HEADER_LEN) {
        npy_err(err, errlen, "malformed .npy: header length %zu is too large", hlen);
        return -1;
    }
    if (hlen > size - hstart) {
        npy_err(err, errlen,
                "truncated .npy header: header needs %zu bytes, only %zu present",
                hlen, size - hstart);
        return -1;
    }

    s.p = (const char *)b + hstart;
    s.end = s.p + hlen;
    s.err = err;
    s.errlen = errlen;
    skip_ws(&s);
    if (s.p >= s.end || *s.p != '{') {
        npy_err(err, errlen, "malformed header: expected a dict starting with '{'");
        return -1;
    }
    s.p++;
    for (;;) {
        skip_ws(&s);
        if (s.p < s.end && *s.p == '}') {
            s.p++;
            break;
        }
        if (scan_string(&s, key, sizeof key, "key") != 0) return -1;
        skip_ws(&s);
        if (s.p >= s.end || *s.p != ':') {
            npy_err(err, errlen, "malformed header: expected ':' after '%s'", key);
            return -1;
        }
        s.p++;
        skip_ws(&s);
        if (strcmp(key, "descr") == 0) {
            if (have_descr++) goto duplicate;
            if (scan_string(&s, descr, sizeof descr, "'descr'") != 0) return -1;
        } else if (strcmp(key, "fortran_order") == 0) {
            if (have_fortran++) goto duplicate;
            if (scan_bool(&s, &fortran) != 0) return -1;
        } else if (strcmp(key, "shape") == 0) {
            if (have_shape++) goto duplicate;
            if (scan_shape(&s, a) != 0) return -1;
        } else {
            npy_err(err, errlen, "malformed header: unexpected key '%s'", key);
            return -1;
        }
        skip_ws(&s);
        if (s.p < s.end && *s.p == ',') {
            s.p++;
            continue;
        }
        if (s.p < s.end && *s.p == '}') {
            s.p++;
            break;
        }
        npy_err(err, errlen, "malformed header: expected ',' or '}' after '%s'", key);
        return -1;
    }
    skip_ws(&s);
    if (s.p != s.end) {
        npy_err(err, errlen, "malformed header: unexpected text after the dict");
        return -1;
    }
    if (!have_descr || !have_fortran || !have_shape) {
        npy_err(err, errlen, "malformed header: missing key '%s'",
                !have_descr ? "descr" : !have_fortran ? "fortran_order" : "shape");
        return -1;
    }
    if (dtype_from_descr(descr, &a->dtype, err, errlen) != 0) return -1;
    if (fortran) {
        npy_err(err, errlen,
                "fortran_order=True (column-major) arrays are not supported; save "
                "np.ascontiguousarray(arr) instead");
        return -1;
    }
    es = npy_dtype_size(a->dtype);
    for (i = 0; i < a->ndim; i++) {
        if (a->shape[i] != 0 && count > UINT64_MAX / a->shape[i]) {
            npy_err(err, errlen, "shape overflow: the element count does not fit 64 bits");
            return -1;
        }
        count *= a->shape[i];
    }
    /* count is exact now; a zero dimension makes it 0 even after a big one */
    for (i = 0; i < a->ndim; i++)
        if (a->shape[i] == 0) count = 0;
    if (count > (uint64_t)(SIZE_MAX / es)) {
        npy_err(err, errlen, "shape overflow: %llu elements of %zu bytes do not fit in memory",
                (unsigned long long)count, es);
        return -1;
    }
    a->count = count;
    a->data = NULL;
    *data_offset = hstart + hlen;
    return 0;

duplicate:
    npy_err(err, errlen, "malformed header: duplicate key '%s'", key);
    return -1;
}

int npy_load_memory(const void *buf, size_t size, npy_array *out, char *err,
                    size_t errlen) {
    size_t off, nbytes;
    npy_array a;
    if (npy_parse_header(buf, size, &a, &off, err, errlen) != 0) {
        memset(out, 0, sizeof *out);
        return -1;
    }
    nbytes = (size_t)a.count * npy_dtype_size(a.dtype);
    if (size - off < nbytes) {
        npy_err(err, errlen, "truncated .npy data: %zu bytes expected, %zu present",
                nbytes, size - off);
        memset(out, 0, sizeof *out);
        return -1;
    }
    if (size - off > nbytes) {
        npy_err(err, errlen, "malformed .npy: %zu bytes after the data",
                size - off - nbytes);
        memset(out, 0, sizeof *out);
        return -1;
    }
    if (nbytes > 0) {
        a.data = malloc(nbytes);
        if (a.data == NULL) {
            npy_err(err, errlen, "out of memory (%zu bytes)", nbytes);
            memset(out, 0, sizeof *out);
            return -1;
        }
        memcpy(a.data, (const unsigned char *)buf + off, nbytes);
        if (!host_is_little_endian()) swap_elements(a.data, a.count, npy_dtype_size(a.dtype));
    }
    *out = a;
    return 0;
}

/* Reads up to n bytes; returns how many were read (short only at EOF or on
 * error, told apart by ferror). */
static size_t read_full(FILE *f, void *dst, size_t n) {
    size_t got = 0;
    while (got < n) {
        size_t r = fread((unsigned char *)dst + got, 1, n - got, f);
        if (r == 0) break;
        got += r;
    }
    return got;
}

int npy_load(const char *path, npy_array *out, char *err, size_t errlen) {
    FILE *f;
    unsigned char pre[12];
    unsigned char *hdr = NULL;
    size_t got, hlen, hstart, off, nbytes;
    npy_array a;
    char msg[384];

    memset(out, 0, sizeof *out);
    f = fopen(path, "rb");
    if (f == NULL) {
        npy_err(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    /* The preamble first, to learn the header length. */
    got = read_full(f, pre, sizeof pre);
    if (ferror(f)) goto read_error;
    if (got < 10 || memcmp(pre, npy_magic, sizeof npy_magic) != 0 ||
        (pre[6] != 1 && got < 12)) {
        /* let the parser word the message */
        if (npy_parse_header(pre, got, &a, &off, msg, sizeof msg) != 0) {
            npy_err(err, errlen, "%s: %s", path, msg);
        } else {
            npy_err(err, errlen, "%s: malformed .npy", path);
        }
        fclose(f);
        return -1;
    }
    if (pre[6] == 1) {
        hlen = (size_t)pre[8] | ((size_t)pre[9] << 8);
        hstart = 10;
    } else {
        hlen = (size_t)pre[8] | ((size_t)pre[9] << 8) | ((size_t)pre[10] << 16) |
               ((size_t)pre[11] << 24);
        hstart = 12;
    }
    if (hlen > NPY_MAX_HEADER_LEN || (pre[6] != 1 && pre[6] != 2 && pre[6] != 3) ||
        pre[7] != 0) {
        /* the parser refuses these from the preamble alone */
        if (npy_parse_header(pre, got, &a, &off, msg, sizeof msg) != 0)
            npy_err(err, errlen, "%s: %s", path, msg);
        else
            npy_err(err, errlen, "%s: malformed .npy", path);
        fclose(f);
        return -1;
    }
    /* at least the 12 preamble bytes: a tiny header leaves data in pre */
    hdr = (unsigned char *)malloc(hstart + hlen > sizeof pre ? hstart + hlen : sizeof pre);
    if (hdr == NULL) {
        npy_err(err, errlen, "%s: out of memory", path);
        fclose(f);
        return -1;
    }
    memcpy(hdr, pre, got);
    if (hstart + hlen > got) {
        got += read_full(f, hdr + got, hstart + hlen - got);
        if (ferror(f)) goto read_error;
    }
    if (npy_parse_header(hdr, got, &a, &off, msg, sizeof msg) != 0) {
        npy_err(err, errlen, "%s: %s", path, msg);
        goto fail;
    }
    /* The preamble may have over-read into the data when the header is
     * shorter than 2 bytes (hstart + hlen < 12): keep those bytes. */
    nbytes = (size_t)a.count * npy_dtype_size(a.dtype);
    a.data = NULL;
    if (nbytes > 0) {
        size_t have = got > off ? got - off : 0;
        if (have > nbytes) have = nbytes;
        a.data = malloc(nbytes);
        if (a.data == NULL) {
            npy_err(err, errlen, "%s: out of memory (%zu bytes of data)", path, nbytes);
            goto fail;
        }
        memcpy(a.data, hdr + off, have);
        got = have + read_full(f, (unsigned char *)a.data + have, nbytes - have);
        if (ferror(f)) {
            free(a.data);
            goto read_error;
        }
        if (got < nbytes) {
            npy_err(err, errlen,
                    "%s: truncated .npy data: shape needs %zu bytes, file has %zu",
                    path, nbytes, got);
            free(a.data);
            goto fail;
        }
    }
    if (fgetc(f) != EOF) {
        npy_err(err, errlen, "%s: malformed .npy: the file is longer than its header says",
                path);
        free(a.data);
        goto fail;
    }
    if (!host_is_little_endian() && a.data != NULL)
        swap_elements(a.data, a.count, npy_dtype_size(a.dtype));
    free(hdr);
    fclose(f);
    *out = a;
    return 0;

read_error:
    npy_err(err, errlen, "%s: read error: %s", path, strerror(errno));
fail:
    free(hdr);
    fclose(f);
    return -1;
}

void npy_free(npy_array *a) {
    if (a == NULL) return;
    free(a->data);
    memset(a, 0, sizeof *a);
}

size_t npy_format_header(npy_dtype dtype, uint32_t ndim, const uint64_t *shape,
                         char *buf, size_t cap) {
    char dict[NPY_MAX_DIMS * 24 + 128];
    size_t n = 0, total, dict_len, hlen;
    uint32_t i;
    int w;

    if (ndim > NPY_MAX_DIMS) return 0;
    w = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': (",
                 npy_dtype_descr(dtype));
    if (w < 0) return 0;
    n = (size_t)w;
    for (i = 0; i < ndim; i++) {
        w = snprintf(dict + n, sizeof dict - n, "%s%llu", i ? ", " : "",
                     (unsigned long long)shape[i]);
        if (w < 0 || (size_t)w >= sizeof dict - n) return 0;
        n += (size_t)w;
    }
    w = snprintf(dict + n, sizeof dict - n, "%s), }", ndim == 1 ? "," : "");
    if (w < 0 || (size_t)w >= sizeof dict - n) return 0;
    dict_len = n + (size_t)w;
    /* preamble (10) + dict + spaces + '\n', rounded up to 64 */
    total = (10 + dict_len + 1 + 63) / 64 * 64;
    hlen = total - 10;
    if (total > cap || hlen > 65535) return 0;
    memcpy(buf, npy_magic, sizeof npy_magic);
    buf[6] = 1;
    buf[7] = 0;
    buf[8] = (char)(hlen & 0xff);
    buf[9] = (char)(hlen >> 8);
    memcpy(buf + 10, dict, dict_len);
    memset(buf + 10 + dict_len, ' ', hlen - dict_len - 1);
    buf[total - 1] = '\n';
    return total;
}

int npy_save(const char *path, npy_dtype dtype, uint32_t ndim,
             const uint64_t *shape, const void *data, char *err,
             size_t errlen) {
    char hdr[NPY_MAX_DIMS * 24 + 256];
    size_t hl, es = npy_dtype_size(dtype), nbytes;
    uint64_t count = 1;
    uint32_t i;
    FILE *f;
    int ok = 1;

    for (i = 0; i < ndim; i++) {
        if (shape[i] != 0 && count > UINT64_MAX / shape[i]) count = UINT64_MAX;
        else count *= shape[i];
    }
    if (count > (uint64_t)(SIZE_MAX / es)) {
        npy_err(err, errlen, "%s: array too large to write", path);
        return -1;
    }
    nbytes = (size_t)count * es;
    hl = npy_format_header(dtype, ndim, shape, hdr, sizeof hdr);
    if (hl == 0) {
        npy_err(err, errlen, "%s: cannot format a .npy header for this shape", path);
        return -1;
    }
    f = fopen(path, "wb");
    if (f == NULL) {
        npy_err(err, errlen, "%s: cannot create: %s", path, strerror(errno));
        return -1;
    }
    if (fwrite(hdr, 1, hl, f) != hl) ok = 0;
    if (ok && nbytes > 0) {
        if (host_is_little_endian() || es == 1) {
            if (fwrite(data, 1, nbytes, f) != nbytes) ok = 0;
        } else {
            /* big-endian host: write little-endian elements one by one */
            const unsigned char *p = (const unsigned char *)data;
            unsigned char tmp[8];
            uint64_t k;
            size_t j;
            for (k = 0; ok && k < count; k++, p += es) {
                for (j = 0; j < es; j++) tmp[j] = p[es - 1 - j];
                if (fwrite(tmp, 1, es, f) != es) ok = 0;
            }
        }
    }
    if (fclose(f) != 0) ok = 0;
    if (!ok) {
        npy_err(err, errlen, "%s: write error: %s", path, strerror(errno));
        remove(path);
        return -1;
    }
    return 0;
}
