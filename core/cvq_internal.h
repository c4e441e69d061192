/*
 * Internal structures shared by the core, the reference kernels and the
 * backends. Not installed. The backend contract is in backend.h.
 */
#ifndef CVQ_INTERNAL_H
#define CVQ_INTERNAL_H

#include "commvq.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CVQ_SUBCODES 64      /* C: sub-codes per half-code               */
#define CVQ_CODES 4096       /* 64*64 codes per key stage                */
#define CVQ_LN_EPS 1e-5f     /* LayerNorm epsilon                        */
#define CVQ_VAL_EPS 1e-6f    /* value scale epsilon (ls, pre, ||u||)     */

/* Keeps a helper out of line. Used where a hot arithmetic loop must be its
 * own function for the fuzz build to leave it out of coverage
 * (fuzz/coverage-ignore.txt); it changes no result. */
#if defined(__GNUC__) || defined(__clang__)
#define CVQ__NOINLINE __attribute__((noinline))
#else
#define CVQ__NOINLINE
#endif

/* ---- errors ------------------------------------------------------------ */

/* Records a message (thread-local, and in ctx when ctx != NULL) and returns
 * s. The message is prefixed with the status name and suffixed with
 * file:line. */
cvq_status cvq__error(cvq_context *ctx, cvq_status s, const char *file,
                      int line, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 5, 6)))
#endif
    ;
#define CVQ_FAIL(ctx, s, ...) cvq__error((ctx), (s), __FILE__, __LINE__, __VA_ARGS__)
/* Returns CVQ_ERR_NULL_POINTER from the enclosing function when p is NULL,
 * with a message naming the function and the argument as the public header
 * spells them (name is a string literal): "cvq_decode_keys: scales
 * is NULL". One check per argument, so the message names the one at fault. */
#define CVQ__NONNULL(ctx, fn, p, name)                                                 \
    do {                                                                               \
        if (!(p)) return CVQ_FAIL((ctx), CVQ_ERR_NULL_POINTER, "%s: " name " is NULL", (fn)); \
    } while (0)
/* Clears the thread-local message (start of each public call is not
 * required to do so; only failures write it). */

/* ---- allocation ---------------------------------------------------------- */

/* Fills a with the default allocator when user == NULL. */
void cvq__allocator_init(cvq_allocator *a, const cvq_allocator *user);
/* Aligned to 64 bytes. NULL on failure or size == 0 is treated as 1. */
void *cvq__alloc(const cvq_allocator *a, size_t size);
void *cvq__calloc(const cvq_allocator *a, size_t n, size_t elem);
void cvq__free(const cvq_allocator *a, void *p);
/* a*b and a+b with overflow detection: false on overflow. */
bool cvq__mul_size(size_t a, size_t b, size_t *out);
/* cvq_pack_codes12 without its checks, for codes the library made (core/record.c). */
void cvq__pack_codes12(const uint16_t *codes, size_t n, uint8_t *out);
bool cvq__add_size(size_t a, size_t b, size_t *out);

/* ---- geometry helpers ----------------------------------------------------- */

static inline uint32_t cvq__pairs(const cvq_geometry *g) { return g->head_dim / 2; }
static inline uint32_t cvq__kv_dims(const cvq_geometry *g) { return g->n_kv_heads * g->head_dim; }
static inline uint32_t cvq__value_groups(const cvq_geometry *g) {
    return cvq__kv_dims(g) / g->value_group_width;
}
static inline uint32_t cvq__key_scale_count(const cvq_geometry *g) {
    return g->key_scale == CVQ_KEY_SCALE_HEAD ? g->n_kv_heads : 1u;
}
/* KV head read by query head h: floor(h*Hkv/Hq). */
static inline uint32_t cvq__kv_of(const cvq_geometry *g, uint32_t h) {
    return (uint32_t)(((uint64_t)h * g->n_kv_heads) / g->n_q_heads);
}
/* Indices of the real and imaginary parts of pair p of a head vector. */
static inline void cvq__pair_index(cvq_pair_layout layout, uint32_t d,
                                   uint32_t p, uint32_t *re, uint32_t *im) {
    if (layout == CVQ_PAIRS_INTERLEAVED) {
        *re = 2 * p;
        *im = 2 * p + 1;
    } else {
        *re = p;
        *im = p + d / 2;
    }
}

/* ---- codebook ------------------------------------------------------------- */

struct cvq_codebook {
    cvq_allocator alloc;
    cvq_geometry geom;         /* resolved */
    double *rope_theta;        /* [P] */
    uint64_t *rope_t;          /* [P] integer phase steps (numerics.md) */
    /* Primary tensors, every layer (and group) contiguous:
     *   tensors[id] has layer stride layer_stride[id] floats, and for value
     *   tensors group stride group_stride[id] floats within a layer. */
    float *tensors[CVQ_T_COUNT];
    size_t layer_stride[CVQ_T_COUNT];
    size_t group_stride[CVQ_T_COUNT];
    /* Derived tables (numerics.md section 3), rebuilt by commit. */
    float *key_n;              /* [L][Hkv][R][64]        n_a              */
    float *key_G;              /* [L][Hkv][R][64][64]    G[A][B]          */
    float *val_inv_ls;         /* [L][groups][F]         1/(ls+eps)       */
    float *val_ls_eps;         /* [L][groups][F]         ls+eps           */
    float inv_F;               /* fl(1/F)                                 */
    bool dirty;                /* primary tensors changed since commit     */
    uint64_t generation;       /* bumped by every commit (device caches)   */
    char *note;                /* provenance text, may be NULL            */
};

/* Everything a kernel needs for one layer; pointers into the codebook. */
typedef struct cvq_layer_view {
    const cvq_geometry *g;
    uint32_t layer;
    uint32_t P;                /* d/2 */
    uint32_t n_groups;         /* value groups */
    const uint64_t *rope_t;    /* [P] */
    const float *key_w;        /* [Hkv][R][64][P][2]  (re, im) */
    const float *key_n;        /* [Hkv][R][64] */
    const float *key_G;        /* [Hkv][R][64][64] */
    /* value tensors: [groups][...] with the strides below (floats) */
    const float *val_inv_ls, *val_ls_eps;   /* [groups][F] */
    const float *ln_w, *ln_b;               /* [groups][F] */
    const float *w1, *b1, *w2, *b2, *E;
    size_t s_vec;              /* F      : stride of ls/ln tensors   */
    size_t s_w1, s_b1, s_w2, s_b2, s_E;    /* group strides          */
    float inv_F;
    float logit_scale;
} cvq_layer_view;

/* Commits if dirty (errors if values are non-finite), then fills *lv.
 * The codebook is logically const: commit only rebuilds caches. */
/* Shape of one (layer, group) view of tensor id under geometry g (resolved):
 * dims[0..*n_dims), the rest 0; returns the element count (core/codebook.c). */
size_t cvq__tensor_view_shape(const cvq_geometry *g, cvq_tensor_id id, uint64_t dims[5],
                              uint32_t *n_dims);
cvq_status cvq__layer_view(cvq_context *ctx, const cvq_codebook *cb,
                           uint32_t layer, cvq_layer_view *lv);

/* ---- context -------------------------------------------------------------- */

struct cvq_backend_i;

struct cvq_context {
    cvq_allocator alloc;
    const struct cvq_backend_i *be;
    void *be_state;
    cvq_backend_kind kind;
    cvq_device_info device;
    int n_threads;
    int cpu_reference;
    char last_error[512];
};

/* ---- input conversion & validation (numerics.md section 1) ---------------- */

/* Converts n*kv_dims elements of `dtype` to fp32 (exact). */
void cvq__to_f32(const void *src, cvq_dtype dtype, size_t count, float *dst);
/* First non-finite element index, or (size_t)-1. */
size_t cvq__find_nonfinite(const float *x, size_t count);

#endif /* CVQ_INTERNAL_H */
