/*
 * commvq_train.h: training codebooks from calibration data, on the CPU
 * (method note section 6; docs/training.md has the commands and costs).
 *
 * - Keys: EM per layer, per KV head, stage after stage (greedy), soft or
 *   hard assignments, closed-form M-step. Greedy stages make the first R1
 *   stages of an R-stage codebook a valid R1-stage codebook
 *   (cvq_codebook_extract_stages).
 * - Values: per-channel scale ls from the data, then LayerNorm, both Linear
 *   layers and E of every value group trained with AdamW, straight-through
 *   Gumbel-softmax over each 4-way group; loss = MSE of decoded values plus,
 *   when queries are given, MSE of the attention output computed with the
 *   decoded values.
 *
 * Both trainers write into a codebook the caller owns (made with
 * cvq_codebook_create, or loaded from a .cvq file to resume), only into the
 * tensors of the layer they train, and append a provenance line to its note
 * (data size, seed, settings). Results depend on the seed and the data only,
 * never on the thread count. On failure the codebook's tensors of that layer
 * may have been partly updated (the status says so); nothing else is touched.
 */
#ifndef COMMVQ_TRAIN_H
#define COMMVQ_TRAIN_H

#include "commvq.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Calibration data for one layer: host arrays, all before RoPE. */
typedef struct cvq_train_data {
    size_t n_tokens;             /* T >= 1 */
    cvq_dtype dtype;             /* of keys, values, queries */
    const void *keys;            /* [T][Hkv][d] */
    const void *values;          /* [T][Hkv][d] */
    const void *queries;         /* [T][Hq][d], or NULL (no attention loss) */
    const int32_t *positions;    /* [T] each token's position (>= 0), or NULL
                                    (= index within its sequence) */
    const int32_t *seq_start;    /* [n_seq] ascending, seq_start[0] == 0, or
                                    NULL (one sequence) */
    size_t n_seq;
} cvq_train_data;

/* One progress report; the callback may be called often (every step). */
typedef struct cvq_train_progress {
    const char *phase;      /* "keys" or "values" */
    uint32_t layer;
    uint32_t part;          /* KV head (keys) or value group (values) */
    uint32_t n_parts;
    uint32_t stage;         /* key stage; 0 for values */
    uint32_t n_stages;
    uint32_t step, n_steps; /* within the stage (keys) or run (values) */
    double loss;            /* keys: hard-assignment MSE per element of the
                               stage's input residual (normalised keys) with
                               the current iterate; values: training loss of
                               the step */
    double tokens_per_second;
    double seconds_left;    /* estimate, < 0 when unknown */
} cvq_train_progress;

/* Return nonzero to stop training early: the call then returns
 * CVQ_ERR_CANCELLED and the layer holds what was trained so far (complete
 * key stages; the value weights of the last finished step). */
typedef int (*cvq_train_progress_fn)(void *user, const cvq_train_progress *p);

typedef struct cvq_train_report {
    double rel_error;       /* keys: sum||k - k_hat||^2 / sum||k||^2 over the
                               data; values: the same for v */
    double attn_rel_error;  /* values with queries: relative MSE of the
                               attention output; otherwise -1 */
    uint64_t steps_run;     /* EM steps (all heads, stages) or AdamW steps */
    uint64_t tokens_used;   /* after subsampling */
    double seconds;
} cvq_train_report;

/* ---- keys ------------------------------------------------------------------ */
typedef struct cvq_key_train_params {
    uint64_t seed;          /* every random choice */
    uint64_t max_tokens;    /* subsample this many tokens (seeded); 0 = all */
    uint32_t steps;         /* EM steps per stage (default 100) */
    uint32_t first_stage;   /* resume: stages below it are kept as they are in
                               the codebook (default 0) */
    uint32_t n_stages;      /* stages to train from first_stage; 0 = to R */
    int hard;               /* 1: hard EM (k-means-like assignments) */
    double tau_start;       /* soft E-step temperature schedule, times s_r;  */
    double tau_end;         /* defaults 1e-3 and 1e-5 (method note)          */
    double plateau;         /* a step "improves" when it lowers the stage's
                               best hard MSE by more than this fraction
                               (default 1e-5); 0 = any decrease counts */
    uint32_t patience;      /* stop a stage after this many steps in a row
                               without improvement (default 5); 0 = never
                               stop early (run all `steps`) */
    uint32_t max_splits;    /* split rounds per stage (default 8): on a
                               plateau, under-used sub-codes are re-seeded to
                               split the most-used ones (k-means split move
                               against merged clusters), then EM goes on;
                               0 = plain EM (dead sub-codes are still
                               re-seeded) */
    int n_threads;          /* 0 = all */
    cvq_train_progress_fn progress; /* or NULL */
    void *progress_user;
    const cvq_allocator *allocator; /* work buffers; NULL = the codebook's */
} cvq_key_train_params;

CVQ_API cvq_key_train_params cvq_key_train_default_params(void);

/* Trains the key codebook of `layer` (all KV heads) in cb: stages
 * first_stage .. first_stage+n_stages-1 of every head, greedily; the other
 * stages and layers are read (residual, report) but not written. params
 * NULL = the defaults. report->rel_error uses every stage of the codebook.
 * Bad input (non-finite keys, positions, parameters) writes nothing. */
CVQ_API cvq_status cvq_train_keys(cvq_codebook *cb, uint32_t layer,
                                  const cvq_train_data *data,
                                  const cvq_key_train_params *params,
                                  cvq_train_report *report /* or NULL */);

/* A new codebook with the first `stages` (1..R) key stages of src
 * (everything else copied: values, RoPE table, note, plus one note line). */
CVQ_API cvq_status cvq_codebook_extract_stages(const cvq_codebook *src, uint32_t stages,
                                               cvq_codebook **out);

/* ---- values ---------------------------------------------------------------- */
typedef struct cvq_value_train_params {
    uint64_t seed;
    uint64_t max_tokens;    /* subsample (seeded): a random subset of whole
                               windows (below) covering this many tokens;
                               0 = all */
    uint32_t steps;         /* AdamW steps (default 2000) */
    uint32_t batch_tokens;  /* tokens per step (default 256). Sequences are
                               cut into windows of this many consecutive
                               tokens; a step draws windows until full, and
                               the attention loss runs causally within each
                               window (cost ~ Hq * batch_tokens^2 * d) */
    double lr;              /* 1e-3 */
    double weight_decay;    /* 0.1 (decoupled) */
    double beta1, beta2;    /* 0.9, 0.95 */
    double clip;            /* global gradient norm clip, 1.0 */
    uint32_t warmup_steps;  /* linear warm-up (default 100) */
    double gumbel_tau;      /* 1.0 */
    double attn_weight;     /* weight of the attention loss (default 1.0; used
                               only when data->queries is set; 0 also turns
                               off attn_rel_error, reported as -1) */
    int keep_ls;            /* 1: keep the codebook's ls (resume); 0: compute
                               ls = mean|v| from the data (default) */
    int resume;             /* 1: start from the codebook's value weights (and
                               keep its ls) instead of a seeded initialisation;
                               AdamW moments start from zero (default 0) */
    double lr_end_factor;   /* after warm-up the rate follows a cosine from lr
                               to lr*lr_end_factor at the last step (default
                               0.1; 1 = constant) */
    int n_threads;          /* 0 = all */
    cvq_train_progress_fn progress;
    void *progress_user;
    const cvq_allocator *allocator;
} cvq_value_train_params;

CVQ_API cvq_value_train_params cvq_value_train_default_params(void);

/* Trains every value group of `layer` in cb. */
CVQ_API cvq_status cvq_train_values(cvq_codebook *cb, uint32_t layer,
                                    const cvq_train_data *data,
                                    const cvq_value_train_params *params,
                                    cvq_train_report *report /* or NULL */);

#ifdef __cplusplus
}
#endif
#endif
