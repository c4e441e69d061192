/*
 * Minimal NumPy .npy reader and writer for the commvq tool.
 *
 * Reads format versions 1.0, 2.0 and 3.0 (the three numpy writes), C order
 * only, little-endian data of the dtypes below. Writes version 1.0 with the
 * header padded so that the data starts at a multiple of 64 bytes (as numpy
 * itself does).
 *
 * This is tool code, not library code: functions return 0 on success and -1
 * on failure, with a one-line message written into err (never NULL-terminated
 * past errlen). Data is always returned in host byte order.
 */
#ifndef COMMVQ_TOOL_NPY_H
#define COMMVQ_TOOL_NPY_H

#include <stddef.h>
#include <stdint.h>

#define NPY_MAX_DIMS 32            /* numpy < 2.0 limit; enough for us */
#define NPY_MAX_HEADER_LEN 1048576u /* refuse absurd header lengths */

typedef enum npy_dtype {
    NPY_F4 = 0, /* '<f4' float32 */
    NPY_F2 = 1, /* '<f2' float16 (IEEE binary16) */
    NPY_U2 = 2, /* '<u2' uint16 (also bfloat16 bit patterns, see the tool) */
    NPY_U1 = 3, /* '|u1' uint8 */
    NPY_I4 = 4, /* '<i4' int32 */
    NPY_F8 = 5  /* '<f8' float64 */
} npy_dtype;

typedef struct npy_array {
    npy_dtype dtype;
    uint32_t ndim;                 /* 0 for a scalar array */
    uint64_t shape[NPY_MAX_DIMS];  /* shape[0..ndim) */
    uint64_t count;                /* product of the shape (1 when ndim=0) */
    void *data;                    /* count elements, host byte order,
                                      malloc'd; NULL when count == 0 */
} npy_array;

/* "<f4", "|u1", ... */
const char *npy_dtype_descr(npy_dtype t);
/* "float32", "uint8", ... */
const char *npy_dtype_name(npy_dtype t);
size_t npy_dtype_size(npy_dtype t);

/* Parses the preamble and header dict at the start of buf[0..size). Needs
 * the whole header in buf (not the data). Fills dtype, ndim, shape and
 * count of *a (a->data is set to NULL) and *data_offset (where the data
 * starts). Checks that count * element size fits size_t. */
int npy_parse_header(const void *buf, size_t size, npy_array *a,
                     size_t *data_offset, char *err, size_t errlen);

/* Parses a whole .npy image in memory: header, then exactly count elements
 * (a shorter buffer is "truncated", a longer one is refused too). */
int npy_load_memory(const void *buf, size_t size, npy_array *out, char *err,
                    size_t errlen);

/* Reads a .npy file. Messages start with the path. */
int npy_load(const char *path, npy_array *out, char *err, size_t errlen);

/* Frees a->data and zeroes *a. NULL is a no-op. */
void npy_free(npy_array *a);

/* Formats the version 1.0 preamble + header for (dtype, shape) into
 * buf[0..cap). Returns its length (a multiple of 64) or 0 if cap is too
 * small or ndim too large. */
size_t npy_format_header(npy_dtype dtype, uint32_t ndim, const uint64_t *shape,
                         char *buf, size_t cap);

/* Writes a .npy file (version 1.0) of product(shape) elements from data
 * (host byte order). */
int npy_save(const char *path, npy_dtype dtype, uint32_t ndim,
             const uint64_t *shape, const void *data, char *err,
             size_t errlen);

#endif
