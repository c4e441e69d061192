/*
 * commvq: CommVQ (Commutative Vector Quantization) KV-cache compression with
 * code-domain attention. Public C API.
 *
 * Conventions (apply to every function below):
 *  - Every function that can fail returns a cvq_status; CVQ_OK is 0.
 *    On failure a message is available from cvq_last_error() (thread-local:
 *    the last failure on the calling thread) and, for calls that take a
 *    context, from cvq_context_last_error(ctx).
 *  - Handles are opaque. Every *_free(NULL) is a no-op.
 *  - A failed create/load leaves *out == NULL and leaks nothing.
 *  - A call that fails on bad input writes nothing (caches keep their state).
 *  - The library never calls abort() or exit().
 *  - Counts of zero: a call given n = 0 tokens (n_q = 0 queries) checks its
 *    handles, layer, dtype and flags as usual, accepts NULL for the arrays
 *    whose length is proportional to the count, writes nothing and returns
 *    CVQ_OK. With n > 0 every such array is required (CVQ_ERR_NULL_POINTER).
 *  - Shapes are row-major, innermost dimension last. Tensors of keys and
 *    values are [T][Hkv][d]; queries [n_q][Hq][d].
 *
 * The method, its formulas and the numerics every backend follows are in
 * docs/numerics.md; file and record formats in docs/format.md.
 */
#ifndef COMMVQ_H
#define COMMVQ_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(COMMVQ_SHARED)
#  ifdef COMMVQ_BUILDING
#    define CVQ_API __declspec(dllexport)
#  else
#    define CVQ_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__)
#  define CVQ_API __attribute__((visibility("default")))
#else
#  define CVQ_API
#endif

#define CVQ_VERSION_MAJOR 0
#define CVQ_VERSION_MINOR 1
#define CVQ_VERSION_PATCH 0

CVQ_API const char *cvq_version_string(void);

/* ------------------------------------------------------------------------ */
/* Status                                                                    */
/* ------------------------------------------------------------------------ */

/* One enum, grouped by range: 1xx invalid argument, 2xx unsupported,
 * 3xx resources, 4xx device, 5xx data / file format, 6xx stopped by the
 * caller, 9xx internal. */
typedef enum cvq_status {
    CVQ_OK = 0,

    CVQ_ERR_INVALID_ARGUMENT = 100, /* a parameter is out of its domain     */
    CVQ_ERR_NULL_POINTER = 101,     /* a required pointer is NULL           */
    CVQ_ERR_SHAPE = 102,            /* sizes do not match the geometry      */
    CVQ_ERR_NONFINITE_INPUT = 103,  /* NaN or Inf in an input tensor        */
    CVQ_ERR_INPUT_RANGE = 104,      /* a sum of squares overflows binary32  */
    CVQ_ERR_POSITION = 105,         /* positions not strictly increasing    */
    CVQ_ERR_LAYER_RANGE = 106,      /* layer index >= number of layers      */
    CVQ_ERR_SIZE_OVERFLOW = 107,    /* a byte count does not fit size_t     */
    CVQ_ERR_GEOMETRY = 108,         /* model geometry is not supported      */
    CVQ_ERR_MISMATCH = 109,         /* objects from different models/ctxs   */

    CVQ_ERR_UNSUPPORTED = 200,       /* this backend cannot do this op      */
    CVQ_ERR_BACKEND_UNAVAILABLE = 201, /* backend not compiled in / disabled */
    CVQ_ERR_NO_DEVICE = 202,         /* backend present, no usable device   */

    CVQ_ERR_OUT_OF_MEMORY = 300,     /* host allocation failed              */
    CVQ_ERR_DEVICE_OUT_OF_MEMORY = 301,

    CVQ_ERR_DEVICE = 400,            /* driver / runtime error              */
    CVQ_ERR_DEVICE_LOST = 401,

    CVQ_ERR_IO = 500,                /* open/read/write failed              */
    CVQ_ERR_FORMAT = 501,            /* not a .cvq / malformed structure    */
    CVQ_ERR_FORMAT_VERSION = 502,    /* a format version we do not read     */
    CVQ_ERR_FORMAT_TRUNCATED = 503,  /* file ends before its contents       */
    CVQ_ERR_FORMAT_CHECKSUM = 504,   /* CRC32 mismatch                      */
    CVQ_ERR_FORMAT_NONFINITE = 505,  /* NaN/Inf (or overflowing tables)     */

    CVQ_ERR_CANCELLED = 600,         /* a progress callback asked to stop   */

    CVQ_ERR_INTERNAL = 900
} cvq_status;

/* Name of a status ("CVQ_ERR_SHAPE"); never NULL. */
CVQ_API const char *cvq_status_name(cvq_status s);
/* One-line description of a status; never NULL. */
CVQ_API const char *cvq_status_string(cvq_status s);
/* Message of the last failure on this thread ("" if none); never NULL. */
CVQ_API const char *cvq_last_error(void);

/* ------------------------------------------------------------------------ */
/* Allocator hook                                                            */
/* ------------------------------------------------------------------------ */

/* Optional. alloc must return memory aligned to `align` (a power of two,
 * at most 4096) or NULL. free(NULL) is never called. A NULL cvq_allocator*
 * anywhere means the default (aligned malloc/free). */
typedef struct cvq_allocator {
    void *(*alloc)(void *user, size_t size, size_t align);
    void (*free)(void *user, void *ptr);
    void *user;
} cvq_allocator;

/* ------------------------------------------------------------------------ */
/* Element types                                                             */
/* ------------------------------------------------------------------------ */

typedef enum cvq_dtype {
    CVQ_F32 = 0,
    CVQ_F16 = 1,  /* IEEE binary16 */
    CVQ_BF16 = 2  /* bfloat16 */
} cvq_dtype;

/* Exact conversions to binary32 (docs/numerics.md section 1). */
CVQ_API float cvq_f16_to_f32(uint16_t h);
CVQ_API float cvq_bf16_to_f32(uint16_t b);
/* Round to nearest even; overflow gives +-Inf, NaN stays NaN. */
CVQ_API uint16_t cvq_f32_to_f16(float f);

/* ------------------------------------------------------------------------ */
/* Model geometry                                                            */
/* ------------------------------------------------------------------------ */

typedef enum cvq_pair_layout {
    CVQ_PAIRS_ROTATE_HALF = 0, /* HF/NeoX: pair p = (x[p], x[p+d/2])        */
    CVQ_PAIRS_INTERLEAVED = 1  /* GPT-J/llama.cpp: pair p = (x[2p], x[2p+1]) */
} cvq_pair_layout;

typedef enum cvq_key_scale_mode {
    CVQ_KEY_SCALE_TOKEN = 0, /* one scale over all Hkv*d dims (the paper)  */
    CVQ_KEY_SCALE_HEAD = 1   /* one scale per KV head                       */
} cvq_key_scale_mode;

typedef struct cvq_geometry {
    uint32_t n_layers;    /* L >= 1 */
    uint32_t n_q_heads;   /* Hq >= 1 */
    uint32_t n_kv_heads;  /* Hkv >= 1, Hkv <= Hq; query head h reads KV head
                             floor(h*Hkv/Hq) */
    uint32_t head_dim;    /* d in {64, 80, 96, 128, 256} */
    uint32_t key_stages;  /* R in 1..32 */
    cvq_key_scale_mode key_scale;
    cvq_pair_layout pair_layout;
    uint32_t value_group_width; /* F: a multiple of d dividing Hkv*d;
                                   0 = Hkv*d (the paper) */
    uint32_t value_bits;  /* Nc: a multiple of 8, 8..65536 */
    uint32_t value_hidden;/* I; 0 = min(2*Nc, 4096) */
    float logit_scale;    /* lambda; 0 = 1/sqrt(d) */
} cvq_geometry;

/* Fill defaults: zero fields that have defaults get them (F, I, lambda).
 * Validates the geometry; CVQ_ERR_GEOMETRY with a message if invalid. */
CVQ_API cvq_status cvq_geometry_resolve(cvq_geometry *g);

/* ------------------------------------------------------------------------ */
/* RoPE frequency tables (theta_p, p = 0..d/2-1, radians per position)      */
/* ------------------------------------------------------------------------ */

/* theta_p = base^(-2p/d). */
CVQ_API cvq_status cvq_rope_freqs_default(uint32_t head_dim, double base,
                                          double *theta_out);
/* Linear (position interpolation): theta_p = base^(-2p/d) / factor. */
CVQ_API cvq_status cvq_rope_freqs_linear(uint32_t head_dim, double base,
                                         double factor, double *theta_out);
/* LLaMA 3.1 "llama3" scaling. */
CVQ_API cvq_status cvq_rope_freqs_llama3(uint32_t head_dim, double base,
                                         double factor, double low_freq_factor,
                                         double high_freq_factor,
                                         double original_max_pos,
                                         double *theta_out);
/* YaRN (NTK-by-parts). *mscale_out (may be NULL) receives the attention
 * factor 0.1*ln(factor)+1 (1 when factor <= 1); the logit scale is then
 * mscale^2/sqrt(d). */
CVQ_API cvq_status cvq_rope_freqs_yarn(uint32_t head_dim, double base,
                                       double factor, double original_max_pos,
                                       double beta_fast, double beta_slow,
                                       double *theta_out, double *mscale_out);

/* ------------------------------------------------------------------------ */
/* Backends, devices, contexts                                               */
/* ------------------------------------------------------------------------ */

typedef enum cvq_backend_kind {
    CVQ_BACKEND_AUTO = 0,
    CVQ_BACKEND_CPU = 1,
    CVQ_BACKEND_CUDA = 2,
    CVQ_BACKEND_VULKAN = 3
} cvq_backend_kind;

CVQ_API const char *cvq_backend_name(cvq_backend_kind k);
/* "auto", "cpu", "cuda", "vulkan" (case-insensitive). */
CVQ_API cvq_status cvq_backend_from_name(const char *name,
                                         cvq_backend_kind *out);

typedef enum cvq_device_type {
    CVQ_DEVICE_CPU = 0,          /* the host CPU (CPU backend)              */
    CVQ_DEVICE_DISCRETE_GPU = 1,
    CVQ_DEVICE_INTEGRATED_GPU = 2,
    CVQ_DEVICE_VIRTUAL_GPU = 3,
    CVQ_DEVICE_SOFTWARE = 4,     /* a GPU API implemented on the CPU (lavapipe) */
    CVQ_DEVICE_OTHER = 5
} cvq_device_type;

typedef enum cvq_exactness {
    CVQ_EXACT_GUARANTEED = 0,  /* codes bit-identical to the CPU reference  */
    CVQ_EXACT_TESTED = 1,      /* equal on the conformance suite here       */
    CVQ_EXACT_NOT_GUARANTEED = 2
} cvq_exactness;

typedef struct cvq_device_info {
    cvq_backend_kind backend;
    uint32_t index;             /* index within its backend */
    cvq_device_type type;
    char name[128];
    char driver[128];           /* driver / runtime description */
    uint64_t memory_bytes;      /* 0 if unknown */
    uint64_t max_buffer_bytes;  /* largest single allocation; 0 if unknown */
    uint32_t shared_memory_bytes; /* per workgroup/block; 0 if n/a */
    uint32_t subgroup_size;     /* 0 if n/a */
    uint32_t compute_units;     /* cores / SMs / CUs */
    cvq_exactness exactness;
    int usable;                 /* 0: enumerated but cannot run our kernels */
    char note[160];             /* why not usable, or anything notable */
} cvq_device_info;

/* Devices of every compiled-in backend (CPU first). Absent backends simply
 * contribute none. *count receives the total; at most `cap` are written. */
CVQ_API cvq_status cvq_list_devices(cvq_device_info *out, size_t cap,
                                    size_t *count);

/* Backend availability: CVQ_OK if it has a usable device, otherwise the
 * reason (CVQ_ERR_BACKEND_UNAVAILABLE: not compiled in or disabled by
 * COMMVQ_DISABLE_<NAME>; CVQ_ERR_NO_DEVICE) with a message. */
CVQ_API cvq_status cvq_backend_available(cvq_backend_kind k);

typedef struct cvq_context cvq_context;

typedef struct cvq_context_params {
    cvq_backend_kind backend; /* AUTO: env COMMVQ_BACKEND if set, else the
                                 best usable GPU, else CPU. Software GPUs
                                 (lavapipe) are never picked by AUTO. */
    int device;               /* device index within the backend; -1 = the
                                 backend's choice (env COMMVQ_DEVICE) */
    int n_threads;            /* CPU threads; 0 = all */
    int cpu_reference;        /* CPU backend: 1 = plain reference kernels */
    const cvq_allocator *allocator; /* NULL = default; copied */
} cvq_context_params;

CVQ_API cvq_context_params cvq_context_default_params(void);
CVQ_API cvq_status cvq_context_create(const cvq_context_params *params,
                                      cvq_context **out);
CVQ_API void cvq_context_free(cvq_context *ctx);
/* What the context got. */
CVQ_API cvq_backend_kind cvq_context_backend(const cvq_context *ctx);
CVQ_API cvq_status cvq_context_device(const cvq_context *ctx,
                                      cvq_device_info *out);
CVQ_API const char *cvq_context_last_error(const cvq_context *ctx);

/* ------------------------------------------------------------------------ */
/* Codebooks                                                                 */
/* ------------------------------------------------------------------------ */

typedef struct cvq_codebook cvq_codebook;

/* Tensors of one codebook (docs/format.md). For per-layer tensors `layer`
 * selects the layer; for value tensors `group` selects the value group
 * (0..Hkv*d/F-1); otherwise both are ignored. */
typedef enum cvq_tensor_id {
    CVQ_T_ROPE_THETA = 0, /* f64 [d/2] (read-only through cvq_codebook_tensor) */
    CVQ_T_KEY_W = 1,      /* [Hkv][R][64][d/2][2]  sub-codes w = x + i*y     */
    CVQ_T_VAL_LS = 2,     /* [F]  per-channel scale ls                       */
    CVQ_T_VAL_LN_W = 3,   /* [F]  LayerNorm weight                           */
    CVQ_T_VAL_LN_B = 4,   /* [F]  LayerNorm bias                             */
    CVQ_T_VAL_W1 = 5,     /* [I][F]                                         */
    CVQ_T_VAL_B1 = 6,     /* [I]                                            */
    CVQ_T_VAL_W2 = 7,     /* [2*Nc][I]                                      */
    CVQ_T_VAL_B2 = 8,     /* [2*Nc]                                         */
    CVQ_T_VAL_E = 9,      /* [Nc][F] binary additive codebook               */
    CVQ_T_COUNT = 10
} cvq_tensor_id;

typedef struct cvq_tensor_info {
    const char *name;      /* "key_w", "val_ls", ... */
    uint32_t n_dims;
    uint64_t dims[5];
    uint64_t n_elements;
    const char *meaning;   /* one line */
} cvq_tensor_info;

/* A zero-filled codebook of the given geometry and RoPE table (d/2
 * doubles). Fill it through cvq_codebook_tensor_data(). */
CVQ_API cvq_status cvq_codebook_create(const cvq_geometry *geometry,
                                       const double *rope_theta,
                                       const cvq_allocator *allocator,
                                       cvq_codebook **out);
/* A random codebook (seeded, reproducible on every platform): key stage r
 * sub-codes drawn with an RMS that decreases geometrically with r, so that
 * even a random codebook roughly shrinks the residual; value encoder weights
 * random, ls = 1, LayerNorm identity. It does NOT preserve real keys and
 * values: it exists for tests, benchmarks and demos. */
CVQ_API cvq_status cvq_codebook_random(const cvq_geometry *geometry,
                                       const double *rope_theta,
                                       uint64_t seed,
                                       const cvq_allocator *allocator,
                                       cvq_codebook **out);
/* Load a .cvq file. Refuses (never reads past the end of) truncated files,
 * unknown versions, bad checksums and non-finite values. */
CVQ_API cvq_status cvq_codebook_load(const char *path,
                                     const cvq_allocator *allocator,
                                     cvq_codebook **out);
/* Load from memory (the bytes of a .cvq file). */
CVQ_API cvq_status cvq_codebook_load_memory(const void *data, size_t size,
                                            const cvq_allocator *allocator,
                                            cvq_codebook **out);

#define CVQ_SAVE_FP16 1u /* store tensors as binary16 (compact) */
CVQ_API cvq_status cvq_codebook_save(const cvq_codebook *cb, const char *path,
                                     uint32_t flags);
CVQ_API void cvq_codebook_free(cvq_codebook *cb);

CVQ_API cvq_status cvq_codebook_geometry(const cvq_codebook *cb,
                                         cvq_geometry *out);
/* d/2 doubles. */
CVQ_API cvq_status cvq_codebook_rope_theta(const cvq_codebook *cb,
                                           double *theta_out);
/* Free-form provenance text stored in the file (training data, seed ...). */
CVQ_API cvq_status cvq_codebook_set_note(cvq_codebook *cb, const char *text);
CVQ_API const char *cvq_codebook_note(const cvq_codebook *cb);

CVQ_API cvq_status cvq_codebook_tensor_info(const cvq_codebook *cb,
                                            cvq_tensor_id id,
                                            cvq_tensor_info *out);
/* Mutable fp32 view of one tensor (not CVQ_T_ROPE_THETA). The call marks
 * the codebook dirty: its derived tables are rebuilt (and the values
 * checked for finiteness) by the next encode/attend or by
 * cvq_codebook_commit(). Writes made through the pointer after such a
 * rebuild are not noticed: call cvq_codebook_commit() when done writing.
 * A dirty codebook is rebuilt in place on first use, so commit it before
 * sharing it between threads (loaded and random codebooks are committed). */
CVQ_API cvq_status cvq_codebook_tensor_data(cvq_codebook *cb,
                                            cvq_tensor_id id, uint32_t layer,
                                            uint32_t group, float **data);
CVQ_API cvq_status cvq_codebook_tensor_cdata(const cvq_codebook *cb,
                                             cvq_tensor_id id, uint32_t layer,
                                             uint32_t group,
                                             const float **data);
/* Rebuild derived tables (n_a, G[A][B], reciprocal scales); checks values. */
CVQ_API cvq_status cvq_codebook_commit(cvq_codebook *cb);

/* ------------------------------------------------------------------------ */
/* Compressed record of a token (docs/format.md)                             */
/* ------------------------------------------------------------------------ */

typedef struct cvq_record_layout {
    uint32_t key_code_bytes;   /* ceil(12*Hkv*R/8): codes packed at 12 bits */
    uint32_t key_scale_count;  /* 1 (token) or Hkv (head); fp32 each       */
    uint32_t value_groups;     /* Hkv*d/F                                   */
    uint32_t value_bit_bytes;  /* value_groups * Nc/8                       */
    uint32_t value_scale_count;/* value_groups; fp32 each                   */
    uint32_t bytes_per_token;  /* all of the above, plus nothing else       */
    uint64_t code_bits;        /* 12*Hkv*R + groups*Nc                      */
    uint64_t scale_bits;       /* 32*(key_scale_count + value_groups)       */
    double bits_per_element;   /* (code_bits+scale_bits)/(2*Hkv*d)          */
} cvq_record_layout;

CVQ_API cvq_status cvq_record_layout_of(const cvq_geometry *g,
                                        cvq_record_layout *out);

/* ------------------------------------------------------------------------ */
/* Encoding and decoding (stateless; one layer)                              */
/* ------------------------------------------------------------------------ */

/* Keys [n][Hkv][d] before RoPE, in `dtype`. Outputs:
 *   codes  uint16 [n][Hkv][R], code = 64*A + B
 *   scales float  [n] (token mode) or [n][Hkv] (head mode)
 * Any NaN/Inf in the input: CVQ_ERR_NONFINITE_INPUT, nothing written. */
CVQ_API cvq_status cvq_encode_keys(cvq_context *ctx, const cvq_codebook *cb,
                                   uint32_t layer, const void *keys,
                                   cvq_dtype dtype, size_t n,
                                   uint16_t *codes, float *scales);
/* Values [n][Hkv][d]. Outputs:
 *   bits   uint8 [n][groups][Nc/8], bit i of group at byte i/8, bit i%8
 *   sigma  float [n][groups] */
CVQ_API cvq_status cvq_encode_values(cvq_context *ctx, const cvq_codebook *cb,
                                     uint32_t layer, const void *values,
                                     cvq_dtype dtype, size_t n,
                                     uint8_t *bits, float *sigma);
/* Decoded keys before RoPE [n][Hkv][d] (fp32). */
CVQ_API cvq_status cvq_decode_keys(cvq_context *ctx, const cvq_codebook *cb,
                                   uint32_t layer, const uint16_t *codes,
                                   const float *scales, size_t n, float *keys);
/* Decoded values [n][Hkv][d] (fp32). */
CVQ_API cvq_status cvq_decode_values(cvq_context *ctx, const cvq_codebook *cb,
                                     uint32_t layer, const uint8_t *bits,
                                     const float *sigma, size_t n,
                                     float *values);

/* 12-bit packing of key codes (docs/format.md): n codes -> ceil(12n/8)
 * bytes, code i in bits [12i, 12i+12) little-endian. */
/* Codes >= 4096 are refused (CVQ_ERR_INVALID_ARGUMENT, nothing written); a
 * count whose arrays overflow size_t is CVQ_ERR_SIZE_OVERFLOW. */
CVQ_API cvq_status cvq_pack_codes12(const uint16_t *codes, size_t n, uint8_t *out);
CVQ_API cvq_status cvq_unpack_codes12(const uint8_t *in, size_t n, uint16_t *codes);

/* ------------------------------------------------------------------------ */
/* Cache: one layer of one sequence                                          */
/* ------------------------------------------------------------------------ */

typedef struct cvq_cache cvq_cache;

typedef struct cvq_cache_params {
    uint32_t layer;
    uint32_t window;   /* W: recent tokens kept in full precision; when a
                          token arrives and the window holds W, those W are
                          compressed as one block. 0 = compress each token
                          on arrival. Default 128. */
    uint32_t sinks;    /* S: first tokens kept in full precision. Default 0. */
    uint32_t initial_capacity; /* compressed tokens to reserve; 0 = grow */
} cvq_cache_params;

CVQ_API cvq_cache_params cvq_cache_default_params(void);
/* The cache keeps references to ctx and cb: both must outlive it. */
CVQ_API cvq_status cvq_cache_create(cvq_context *ctx, const cvq_codebook *cb,
                                    const cvq_cache_params *params,
                                    cvq_cache **out);
CVQ_API void cvq_cache_free(cvq_cache *cache);

/* Append n tokens: keys and values [n][Hkv][d] before RoPE, positions
 * strictly increasing (also across calls). All-or-nothing: on any error the
 * cache is unchanged. */
CVQ_API cvq_status cvq_cache_append(cvq_cache *cache, const void *keys,
                                    const void *values, cvq_dtype dtype,
                                    const int32_t *positions, size_t n);

#define CVQ_ATTEND_QUERIES_ROTATED 1u /* queries already have RoPE applied */

/* Attention of n_q queries [n_q][Hq][d] (fp32) at positions q_pos[n_q] over
 * [sinks | compressed | window], one softmax, causal (a query sees tokens
 * at positions <= its own). out [n_q][Hq][d] fp32. A query that sees no
 * token gets zeros. Queries and keys so large that a logit overflows binary32
 * give CVQ_ERR_INPUT_RANGE with out zeroed, never NaN/Inf in out. */
CVQ_API cvq_status cvq_cache_attend(cvq_cache *cache, const float *queries,
                                    const int32_t *q_pos, size_t n_q,
                                    uint32_t flags, float *out);

typedef struct cvq_cache_stats {
    uint64_t n_tokens;        /* all appended */
    uint64_t n_sink;          /* full precision sinks */
    uint64_t n_compressed;
    uint64_t n_window;        /* full precision recent tokens */
    uint64_t bytes_compressed;/* compressed records in use (docs/format.md);
                                 their positions (4 B/token) count only in
                                 bytes_allocated */
    uint64_t bytes_full;      /* sinks + window in use (fp32) */
    uint64_t bytes_allocated; /* everything the cache holds, incl. capacity */
    double bits_per_element;  /* compressed records only */
} cvq_cache_stats;

CVQ_API cvq_status cvq_cache_stats_get(const cvq_cache *cache,
                                       cvq_cache_stats *out);
/* Forget every token (keeps allocations). */
CVQ_API cvq_status cvq_cache_clear(cvq_cache *cache);
/* Fork a cache (shared prompt prefix, beam search, parallel sampling): *out
 * is a new cache on the same context and codebook, with the same layer,
 * window and sinks, holding exactly src's state (sinks, window, compressed
 * records, positions, the last position, token counts) and src's capacity.
 * The compressed bytes are copied as they are (no re-encoding): the cost is
 * O(bytes) (device buffers go through a host bounce). Later appends to either
 * cache do not affect the other. Both keep pointing at the same codebook,
 * which must outlive both; use src and *out from src's context's thread.
 * On any error (NULL arguments, CVQ_ERR_OUT_OF_MEMORY, a device error) *out
 * is NULL (when out is non-NULL), nothing is leaked and src is unchanged. */
CVQ_API cvq_status cvq_cache_copy(const cvq_cache *src, cvq_cache **out);

#ifdef __cplusplus
}
#endif
#endif /* COMMVQ_H */
