/*
 * Shared trainer helpers (train_internal.h): validation of calibration
 * data, conversion, seeded subsampling and random numbers, thread counts,
 * progress metering and the provenance note.
 */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#endif

#include "train_internal.h"

#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#ifdef COMMVQ_HAVE_OPENMP
#include <omp.h>
#endif

/* ---- validation ------------------------------------------------------------ */

const char *cvq__train_dtype_name(cvq_dtype t) {
    switch (t) {
    case CVQ_F32: return "f32";
    case CVQ_F16: return "f16";
    case CVQ_BF16: return "bf16";
    default: return "?";
    }
}

/* Scans one [T][H][d] array for NaN/Inf, converting a row at a time. */
static cvq_status check_finite(const void *src, cvq_dtype dtype, size_t T,
                               uint32_t H, uint32_t d, const char *name,
                               const char *who) {
    float row[256 * 8];
    const size_t row_elems = (size_t)H * d;
    const size_t esz = dtype == CVQ_F32 ? 4 : 2;
    /* convert at most sizeof row floats at a time */
    const size_t step = sizeof row / sizeof row[0];
    const size_t total = T * row_elems;
    for (size_t off = 0; off < total; off += step) {
        const size_t n = total - off < step ? total - off : step;
        cvq__to_f32((const unsigned char *)src + off * esz, dtype, n, row);
        const size_t bad = cvq__find_nonfinite(row, n);
        if (bad != (size_t)-1) {
            const size_t e = off + bad;
            const float v = row[bad];
            return CVQ_FAIL(NULL, CVQ_ERR_NONFINITE_INPUT,
                            "%s: %s[token %zu][head %zu][dim %zu] is %s", who,
                            name, e / row_elems, (e % row_elems) / d, e % d,
                            isnan(v) ? "NaN" : "infinite");
        }
    }
    return CVQ_OK;
}

size_t cvq__train_n_seq(const cvq_train_data *data) {
    return data->seq_start ? data->n_seq : 1;
}

cvq_status cvq__train_validate(const cvq_geometry *g, const cvq_train_data *data,
                               unsigned need, const char *who) {
    if (!g || !data)
        return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "%s: data is NULL", who);
    const size_t T = data->n_tokens;
    if (T < 1)
        return CVQ_FAIL(NULL, CVQ_ERR_SHAPE, "%s: no tokens (n_tokens = 0)", who);
    if (data->dtype != CVQ_F32 && data->dtype != CVQ_F16 && data->dtype != CVQ_BF16)
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT, "%s: unknown dtype %d", who,
                        (int)data->dtype);
    if ((need & CVQ__TRAIN_NEED_KEYS) && !data->keys)
        return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "%s: data->keys is NULL", who);
    if ((need & CVQ__TRAIN_NEED_VALUES) && !data->values)
        return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "%s: data->values is NULL", who);
    /* T * Hq * d elements must be addressable */
    size_t count;
    if (!cvq__mul_size(T, (size_t)g->n_q_heads * g->head_dim, &count) ||
        !cvq__mul_size(count, sizeof(float), &count))
        return CVQ_FAIL(NULL, CVQ_ERR_SIZE_OVERFLOW, "%s: %zu tokens is too many", who, T);

    if (data->seq_start) {
        const size_t ns = data->n_seq;
        if (ns < 1)
            return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                            "%s: seq_start given with n_seq = 0", who);
        if (data->seq_start[0] != 0)
            return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                            "%s: seq_start[0] = %d, must be 0", who,
                            (int)data->seq_start[0]);
        for (size_t i = 1; i < ns; i++) {
            const int32_t a = data->seq_start[i - 1], b = data->seq_start[i];
            if (b <= a || (size_t)b >= T)
                return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                                "%s: seq_start[%zu] = %d: must be > seq_start[%zu] = %d "
                                "and < T = %zu",
                                who, i, (int)b, i - 1, (int)a, T);
        }
    }
    if (data->positions) {
        size_t seq = 0;
        const size_t ns = cvq__train_n_seq(data);
        for (size_t t = 0; t < T; t++) {
            const bool first = t == 0 || (seq + 1 < ns && data->seq_start &&
                                          (size_t)data->seq_start[seq + 1] == t);
            if (t > 0 && first) seq++;
            const int32_t p = data->positions[t];
            if (p < 0)
                return CVQ_FAIL(NULL, CVQ_ERR_POSITION, "%s: positions[%zu] = %d < 0",
                                who, t, (int)p);
            if (!first && p <= data->positions[t - 1])
                return CVQ_FAIL(NULL, CVQ_ERR_POSITION,
                                "%s: positions[%zu] = %d not above positions[%zu] = %d "
                                "within sequence %zu",
                                who, t, (int)p, t - 1, (int)data->positions[t - 1], seq);
        }
    }

    cvq_status s = CVQ_OK;
    if (need & CVQ__TRAIN_NEED_KEYS)
        s = check_finite(data->keys, data->dtype, T, g->n_kv_heads, g->head_dim, "keys", who);
    if (s == CVQ_OK && (need & CVQ__TRAIN_NEED_VALUES))
        s = check_finite(data->values, data->dtype, T, g->n_kv_heads, g->head_dim,
                         "values", who);
    if (s == CVQ_OK && (need & CVQ__TRAIN_NEED_QUERIES) && data->queries)
        s = check_finite(data->queries, data->dtype, T, g->n_q_heads, g->head_dim,
                         "queries", who);
    return s;
}

void cvq__train_seq_pos(const cvq_train_data *data, uint32_t *seq, int32_t *pos) {
    const size_t T = data->n_tokens, ns = cvq__train_n_seq(data);
    size_t s = 0, start = 0;
    for (size_t t = 0; t < T; t++) {
        if (data->seq_start && s + 1 < ns && (size_t)data->seq_start[s + 1] == t) {
            s++;
            start = t;
        }
        if (seq) seq[t] = (uint32_t)s;
        if (pos) pos[t] = data->positions ? data->positions[t] : (int32_t)(t - start);
    }
}

void cvq__train_gather_f32(const void *src, cvq_dtype dtype, size_t row_elems,
                           const size_t *idx, size_t n, float *dst) {
    const size_t esz = dtype == CVQ_F32 ? 4 : 2;
    for (size_t i = 0; i < n; i++) {
        const size_t row = idx ? idx[i] : i;
        cvq__to_f32((const unsigned char *)src + row * row_elems * esz, dtype, row_elems,
                    dst + i * row_elems);
    }
}

/* ---- random numbers ---------------------------------------------------------- */

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
    return z ^ (z >> 31);
}

void cvq__rng_init(cvq__rng *r, uint64_t seed, uint64_t stream) {
    r->s = mix64(seed ^ mix64(0x7261696E5EEDull + stream * 0x9E3779B97F4A7C15u));
}

uint64_t cvq__rng_u64(cvq__rng *r) {
    r->s += 0x9E3779B97F4A7C15u;
    return mix64(r->s);
}

double cvq__rng_uniform(cvq__rng *r) {
    return (double)(cvq__rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
}

uint64_t cvq__rng_below(cvq__rng *r, uint64_t n) {
    if (n <= 1) return 0;
    /* reject the top partial block so every residue is equally likely */
    const uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t x;
    do {
        x = cvq__rng_u64(r);
    } while (x >= limit);
    return x % n;
}

double cvq__rng_normal(cvq__rng *r) {
    const double u1 = 1.0 - cvq__rng_uniform(r); /* (0, 1]: log is finite */
    const double u2 = cvq__rng_uniform(r);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

cvq_status cvq__train_subsample(const cvq_allocator *a, uint64_t seed, size_t T,
                                uint64_t max_tokens, size_t **idx_out,
                                size_t *n_out) {
    *idx_out = NULL;
    *n_out = 0;
    const size_t n = (max_tokens == 0 || max_tokens >= T) ? T : (size_t)max_tokens;
    size_t *idx = cvq__calloc(a, T ? T : 1, sizeof(size_t));
    if (!idx)
        return CVQ_FAIL(NULL, CVQ_ERR_OUT_OF_MEMORY, "subsample: %zu indices", T);
    for (size_t i = 0; i < T; i++) idx[i] = i;
    if (n < T) {
        /* partial Fisher-Yates: the first n entries become a uniform
         * random n-subset; then sort them (ascending keeps data order) */
        cvq__rng r;
        cvq__rng_init(&r, seed, 0x5AB5);
        for (size_t i = 0; i < n; i++) {
            const size_t j = i + (size_t)cvq__rng_below(&r, (uint64_t)(T - i));
            const size_t tmp = idx[i];
            idx[i] = idx[j];
            idx[j] = tmp;
        }
        /* mark chosen, then compact in ascending order */
        unsigned char *mark = cvq__calloc(a, T, 1);
        if (!mark) {
            cvq__free(a, idx);
            return CVQ_FAIL(NULL, CVQ_ERR_OUT_OF_MEMORY, "subsample: %zu marks", T);
        }
        for (size_t i = 0; i < n; i++) mark[idx[i]] = 1;
        size_t k = 0;
        for (size_t t = 0; t < T; t++)
            if (mark[t]) idx[k++] = t;
        cvq__free(a, mark);
    }
    *idx_out = idx;
    *n_out = n;
    return CVQ_OK;
}

/* ---- threads and time --------------------------------------------------------- */

int cvq__train_threads(int requested, size_t max_useful) {
    int t = 1;
#ifdef COMMVQ_HAVE_OPENMP
    t = requested > 0 ? requested : omp_get_num_procs();
#else
    (void)requested;
#endif
    if (max_useful < 1) max_useful = 1;
    if ((size_t)t > max_useful) t = (int)max_useful;
    return t < 1 ? 1 : t;
}

double cvq__train_now(void) {
#if !defined(_WIN32)
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) == 0)
        return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
#endif
    struct timespec tu;
    if (timespec_get(&tu, TIME_UTC) == TIME_UTC)
        return (double)tu.tv_sec + 1e-9 * (double)tu.tv_nsec;
    return 0.0;
}

void cvq__train_meter_start(cvq__train_meter *m, uint64_t work_total) {
    m->t_start = cvq__train_now();
    m->work_total = work_total;
    m->work_done = 0;
    m->tokens_done = 0.0;
}

double cvq__train_meter_elapsed(const cvq__train_meter *m) {
    return cvq__train_now() - m->t_start;
}

int cvq__train_meter_tick(cvq__train_meter *m, uint64_t units, double tokens,
                          cvq_train_progress_fn fn, void *user,
                          cvq_train_progress *p) {
    m->work_done += units;
    m->tokens_done += tokens;
    const double el = cvq__train_meter_elapsed(m);
    p->tokens_per_second = el > 0.0 ? m->tokens_done / el : 0.0;
    if (m->work_done > 0 && m->work_total >= m->work_done && el > 0.0)
        p->seconds_left = el * (double)(m->work_total - m->work_done) / (double)m->work_done;
    else
        p->seconds_left = -1.0;
    return fn ? fn(user, p) : 0;
}

/* ---- provenance ------------------------------------------------------------------ */

cvq_status cvq__train_append_note(cvq_codebook *cb, const char *fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0) line[0] = '\0';
    const char *old = cvq_codebook_note(cb);
    const size_t lo = strlen(old), ll = strlen(line);
    char *buf = cvq__alloc(&cb->alloc, lo + ll + 2);
    if (!buf)
        return CVQ_FAIL(NULL, CVQ_ERR_OUT_OF_MEMORY, "note: cannot allocate %zu bytes",
                        lo + ll + 2);
    size_t k = 0;
    memcpy(buf, old, lo);
    k = lo;
    if (lo > 0 && old[lo - 1] != '\n') buf[k++] = '\n';
    memcpy(buf + k, line, ll);
    buf[k + ll] = '\0';
    cvq_status s = cvq_codebook_set_note(cb, buf);
    cvq__free(&cb->alloc, buf);
    return s;
}
