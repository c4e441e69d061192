/*
 * A small reader for GGUF files (the llama.cpp model format), written from
 * the format description:
 *
 *   uint32 magic "GGUF", uint32 version (2 or 3), uint64 tensor_count,
 *   uint64 kv_count, kv_count x (string key, uint32 type, value),
 *   tensor_count x (string name, uint32 n_dims, uint64 ne[n_dims],
 *   uint32 ggml type, uint64 offset), padding to `general.alignment`
 *   (default 32), then the tensor data; each tensor's offset is relative to
 *   the start of the data and a multiple of the alignment.
 *   A string is uint64 length + bytes (no NUL). An array value is
 *   uint32 element type + uint64 count + elements. All little-endian.
 *
 * Example code, not library code: functions return 0 on success and -1 on
 * failure with a one-line message in err. Every read checks the remaining
 * size first, so a truncated or malformed file can never make the reader
 * read out of bounds; sizes are computed with overflow checks.
 */
#ifndef COMMVQ_EXAMPLE_GGUF_H
#define COMMVQ_EXAMPLE_GGUF_H

#include <stddef.h>
#include <stdint.h>

enum gguf_value_type {
    GGUF_T_UINT8 = 0, GGUF_T_INT8 = 1, GGUF_T_UINT16 = 2, GGUF_T_INT16 = 3,
    GGUF_T_UINT32 = 4, GGUF_T_INT32 = 5, GGUF_T_FLOAT32 = 6, GGUF_T_BOOL = 7,
    GGUF_T_STRING = 8, GGUF_T_ARRAY = 9, GGUF_T_UINT64 = 10, GGUF_T_INT64 = 11,
    GGUF_T_FLOAT64 = 12, GGUF_T_COUNT = 13
};

/* ggml tensor types the reader knows the size of (ggml's numbering). */
enum ggml_type_id {
    GGML_F32 = 0, GGML_F16 = 1, GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6,
    GGML_Q5_1 = 7, GGML_Q8_0 = 8, GGML_Q8_1 = 9, GGML_Q2_K = 10,
    GGML_Q3_K = 11, GGML_Q4_K = 12, GGML_Q5_K = 13, GGML_Q6_K = 14,
    GGML_Q8_K = 15, GGML_I8 = 24, GGML_I16 = 25, GGML_I32 = 26, GGML_I64 = 27,
    GGML_F64 = 28, GGML_BF16 = 30
};

typedef struct gguf_str {
    uint64_t len;
    const char *ptr; /* into the file image; NOT NUL-terminated */
} gguf_str;

typedef struct gguf_kv {
    char *key;           /* NUL-terminated copy */
    uint32_t type;       /* enum gguf_value_type */
    uint32_t arr_type;   /* element type when type == GGUF_T_ARRAY */
    uint64_t arr_count;
    const uint8_t *raw;  /* scalar bytes, or the array's first element */
    gguf_str str;        /* type == STRING */
    gguf_str *strs;      /* arrays of strings: arr_count entries */
} gguf_kv;

#define GGUF_MAX_DIMS 4

typedef struct gguf_tensor {
    char *name;          /* NUL-terminated copy */
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS]; /* ne[0] innermost (row length); unused = 1 */
    uint32_t type;       /* enum ggml_type_id */
    uint64_t offset;     /* relative to the data section */
    uint64_t n_bytes;
    const uint8_t *data; /* into the file image */
} gguf_tensor;

typedef struct gguf_file {
    uint8_t *image;      /* the whole file */
    size_t size;
    int owns_image;
    uint32_t version;
    uint32_t alignment;
    uint64_t n_kv;
    gguf_kv *kv;
    uint64_t n_tensors;
    gguf_tensor *tensors;
    size_t data_offset;
} gguf_file;

/* Name of a ggml type ("Q4_1") or "unknown". */
const char *gguf_type_name(uint32_t type);
/* Block size (values) and bytes per block of a ggml type; 0 if unknown. */
int gguf_type_block(uint32_t type, uint32_t *block_values, uint32_t *block_bytes);

/* Reads and parses a file. Messages start with the path. */
int gguf_open(const char *path, gguf_file **out, char *err, size_t errlen);
/* Parses an image in memory (copied when copy != 0, else borrowed: it must
 * outlive the gguf_file). */
int gguf_open_memory(const void *buf, size_t size, int copy, gguf_file **out,
                     char *err, size_t errlen);
void gguf_close(gguf_file *f);

const gguf_kv *gguf_find_kv(const gguf_file *f, const char *key);
const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name);

/* Typed getters: fail with a message naming the key when it is missing or
 * of an unsuitable type. Integers of any width are accepted when the value
 * fits; floats accept FLOAT32 and FLOAT64. */
int gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out,
                 char *err, size_t errlen);
int gguf_get_f32(const gguf_file *f, const char *key, float *out, char *err,
                 size_t errlen);
int gguf_get_bool(const gguf_file *f, const char *key, int *out, char *err,
                  size_t errlen);
/* An array of the given element type (any element type when want is
 * GGUF_T_COUNT). */
int gguf_get_array(const gguf_file *f, const char *key, uint32_t want,
                   const gguf_kv **out, char *err, size_t errlen);
/* Element i of an integer array as int64. */
int64_t gguf_array_int(const gguf_kv *kv, uint64_t i);

#endif
