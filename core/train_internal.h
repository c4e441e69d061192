/*
 * Helpers shared by the key and value trainers (core/train_keys.c,
 * core/train_values.c): calibration-data validation and conversion, seeded
 * subsampling and random numbers, thread counts and deterministic chunking,
 * progress/timing, and the provenance line appended to a codebook's note.
 * Implemented in core/train_common.c. Not installed.
 *
 * Reproducibility rule of both trainers: results depend on the seed and the
 * data only, never on the thread count. Parallel loops therefore run over
 * fixed-size token chunks (CVQ__TRAIN_CHUNK tokens, the last one shorter)
 * whose partial sums are kept per chunk and merged in ascending chunk order.
 */
#ifndef CVQ_TRAIN_INTERNAL_H
#define CVQ_TRAIN_INTERNAL_H

#include "commvq_train.h"
#include "cvq_internal.h"

#include <stdarg.h>

/* Tokens per work chunk of a parallel loop (the unit of ordered merging). */
#define CVQ__TRAIN_CHUNK 256u

/* Number of chunks covering n tokens: ceil(n / CVQ__TRAIN_CHUNK). */
static inline size_t cvq__train_n_chunks(size_t n) {
    return (n + CVQ__TRAIN_CHUNK - 1) / CVQ__TRAIN_CHUNK;
}

/* ---- validation ------------------------------------------------------------ */

/* What a trainer reads from cvq_train_data (bit flags). */
#define CVQ__TRAIN_NEED_KEYS 1u
#define CVQ__TRAIN_NEED_VALUES 2u
#define CVQ__TRAIN_NEED_QUERIES 4u /* only checked when data->queries != NULL */

/* Checks data against the geometry: T >= 1; the needed arrays non-NULL;
 * dtype one of F32/F16/BF16; every element of the needed arrays finite
 * (CVQ_ERR_NONFINITE_INPUT naming the array, token, head and dim);
 * positions (when given) >= 0 and strictly increasing within each sequence
 * (CVQ_ERR_POSITION); seq_start (when given) n_seq >= 1, seq_start[0] == 0,
 * strictly ascending, every entry < T (CVQ_ERR_INVALID_ARGUMENT).
 * `who` prefixes messages ("train-keys"). Queries are checked when
 * CVQ__TRAIN_NEED_QUERIES is set and data->queries is not NULL. */
cvq_status cvq__train_validate(const cvq_geometry *g, const cvq_train_data *data,
                               unsigned need, const char *who);

/* Number of sequences (1 when seq_start is NULL). */
size_t cvq__train_n_seq(const cvq_train_data *data);
/* Fills seq[T] with each token's sequence index (0..n_seq-1) and pos[T]
 * with its position (data->positions, or the index within its sequence).
 * Either output may be NULL. Data must have passed validation. */
void cvq__train_seq_pos(const cvq_train_data *data, uint32_t *seq, int32_t *pos);

/* Converts rows of a [T][row_elems] array of `dtype` to fp32:
 * dst[i][.] = src[idx[i]][.] for i < n (idx NULL: idx[i] = i). Exact
 * conversion (cvq__to_f32). */
void cvq__train_gather_f32(const void *src, cvq_dtype dtype, size_t row_elems,
                           const size_t *idx, size_t n, float *dst);

/* ---- random numbers (splitmix64; integer-exact on every platform) --------- */

typedef struct cvq__rng {
    uint64_t s;
} cvq__rng;

/* A stream for (seed, stream id): different ids give independent streams,
 * so consumers do not shift each other's draws. */
void cvq__rng_init(cvq__rng *r, uint64_t seed, uint64_t stream);
uint64_t cvq__rng_u64(cvq__rng *r);
/* Uniform double in [0, 1) with 53 random bits. */
double cvq__rng_uniform(cvq__rng *r);
/* Uniform integer in [0, n), n >= 1 (rejection sampling, unbiased). */
uint64_t cvq__rng_below(cvq__rng *r, uint64_t n);
/* Standard normal (Box-Muller on two uniforms; uses libm log/sqrt/cos). */
double cvq__rng_normal(cvq__rng *r);

/* A seeded subsample of token indices: *idx_out receives min(max_tokens, T)
 * distinct indices in ascending order (all of 0..T-1 when max_tokens == 0
 * or >= T), allocated with `a` (free with cvq__free(a, ...)). */
cvq_status cvq__train_subsample(const cvq_allocator *a, uint64_t seed, size_t T,
                                uint64_t max_tokens, size_t **idx_out,
                                size_t *n_out);

/* ---- threads and time ------------------------------------------------------- */

/* Threads to use: requested > 0 as is, otherwise all processors (1 without
 * OpenMP). Never more than max_useful (>= 1). */
int cvq__train_threads(int requested, size_t max_useful);

/* Monotonic seconds (arbitrary origin). */
double cvq__train_now(void);

/* Progress metering over a run of `work_total` equal-cost work units
 * (EM steps, AdamW steps). */
typedef struct cvq__train_meter {
    double t_start;
    uint64_t work_total, work_done;
    double tokens_done;       /* tokens processed since start (for tokens/s) */
} cvq__train_meter;

void cvq__train_meter_start(cvq__train_meter *m, uint64_t work_total);
/* Records `units` finished work units that processed `tokens` tokens, fills
 * p->tokens_per_second and p->seconds_left (< 0 until something is done),
 * then calls fn (if not NULL). Returns nonzero when fn asked to stop. */
int cvq__train_meter_tick(cvq__train_meter *m, uint64_t units, double tokens,
                          cvq_train_progress_fn fn, void *user,
                          cvq_train_progress *p);
/* Seconds since start. */
double cvq__train_meter_elapsed(const cvq__train_meter *m);

/* ---- provenance ----------------------------------------------------------------- */

/* Appends one line (printf format, no trailing newline needed) to the
 * codebook's note, separated from the existing text by a newline. */
cvq_status cvq__train_append_note(cvq_codebook *cb, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Name of a dtype for notes and messages ("f32", "f16", "bf16"). */
const char *cvq__train_dtype_name(cvq_dtype t);

#endif /* CVQ_TRAIN_INTERNAL_H */
