/*
 * The cache of one layer of one sequence (method note section 5).
 *
 * Layout (all in backend buffers, so GPU backends can keep them resident):
 *   sinks     : the first S tokens, fp32 keys (before RoPE) and values
 *   compressed: one record per token (docs/format.md) split into arrays
 *               codes [n][key_code_bytes], kscale [n][ns] f32,
 *               vbits [n][groups*Nc/8], vsigma [n][groups] f32, pos [n] i32
 *   window    : the most recent tokens, fp32, 1..W after any append (W > 0)
 * When a token arrives and the window already holds W tokens, those W are
 * encoded as one block and appended to the compressed arrays. With W = 0
 * every token is compressed on arrival.
 *
 * Every append is all-or-nothing: inputs are checked and converted, the
 * compressed block is encoded into temporaries and capacity is grown
 * before any state changes. A copy (fork) duplicates every array's bytes
 * as they are, so it never re-encodes.
 */
#include "backend.h"
#include "reference.h"

#include <math.h>
#include <string.h>

struct cvq_cache {
    cvq_context *ctx;
    const cvq_codebook *cb;
    cvq_geometry g;
    cvq_record_layout rl;
    uint32_t layer, window, sinks;
    size_t kvd;                 /* Hkv*d: floats per token of K (or V)   */
    size_t n_sink;
    cvq_buffer sink_k, sink_v, sink_pos;
    size_t n_win;
    cvq_buffer win_k, win_v, win_pos;
    size_t n_comp, cap_comp;
    cvq_buffer c_codes, c_kscale, c_vbits, c_vsigma, c_pos;
    bool has_last;
    int32_t last_pos;
    uint64_t n_total;
};

/* Bytes per token of each compressed array, in the order of comp_bufs(). */
static void comp_sizes(const cvq_cache *c, size_t sz[5]) {
    sz[0] = c->rl.key_code_bytes;
    sz[1] = (size_t)c->rl.key_scale_count * sizeof(float);
    sz[2] = c->rl.value_bit_bytes;
    sz[3] = (size_t)c->rl.value_scale_count * sizeof(float);
    sz[4] = sizeof(int32_t);
}

static void comp_bufs(cvq_cache *c, cvq_buffer *b[5]) {
    b[0] = &c->c_codes;
    b[1] = &c->c_kscale;
    b[2] = &c->c_vbits;
    b[3] = &c->c_vsigma;
    b[4] = &c->c_pos;
}

cvq_cache_params cvq_cache_default_params(void) {
    cvq_cache_params p;
    memset(&p, 0, sizeof p);
    p.window = 128;
    return p;
}

static void release_all(cvq_cache *c) {
    cvq_context *ctx = c->ctx;
    cvq_buffer *b[5];
    comp_bufs(c, b);
    for (int i = 0; i < 5; i++) cvq__buffer_free(ctx, b[i]);
    cvq__buffer_free(ctx, &c->sink_k);
    cvq__buffer_free(ctx, &c->sink_v);
    cvq__buffer_free(ctx, &c->sink_pos);
    cvq__buffer_free(ctx, &c->win_k);
    cvq__buffer_free(ctx, &c->win_v);
    cvq__buffer_free(ctx, &c->win_pos);
}

/* The largest host bounce copy_bytes() allocates: a copy of a long cache
 * held in device memory goes through in pieces of this size rather than
 * one host block as large as the cache. */
#define CVQ_CACHE_BOUNCE_BYTES ((size_t)1 << 20)

/* Copies the first `bytes` bytes of `from` to the start of `to` (buffers of
 * ctx). When both are host-visible this is a memcpy; otherwise the bytes go
 * through a host bounce (read, then write), piece by piece. */
static cvq_status copy_bytes(cvq_context *ctx, const cvq_buffer *from, const cvq_buffer *to,
                             size_t bytes) {
    if (bytes == 0) return CVQ_OK;
    if (from->host && to->host) {
        memcpy(to->host, from->host, bytes);
        return CVQ_OK;
    }
    const size_t piece = bytes < CVQ_CACHE_BOUNCE_BYTES ? bytes : CVQ_CACHE_BOUNCE_BYTES;
    void *tmp = cvq__alloc(&ctx->alloc, piece);
    if (!tmp) return CVQ_FAIL(ctx, CVQ_ERR_OUT_OF_MEMORY, "cache copy bounce (%zu bytes)", piece);
    cvq_status st = CVQ_OK;
    for (size_t off = 0; off < bytes && !st; off += piece) {
        const size_t n = bytes - off < piece ? bytes - off : piece;
        st = cvq__buffer_read(ctx, from, off, tmp, n);
        if (!st) st = cvq__buffer_write(ctx, to, off, tmp, n);
    }
    cvq__free(&ctx->alloc, tmp);
    return st;
}

/* Grows the compressed arrays to hold at least `need` tokens. On failure
 * the cache is unchanged. */
static cvq_status grow(cvq_cache *c, size_t need) {
    if (need <= c->cap_comp) return CVQ_OK;
    cvq_context *ctx = c->ctx;
    size_t cap = c->cap_comp ? c->cap_comp : 64;
    while (cap < need) {
        if (cap > SIZE_MAX / 2) {
            cap = need;
            break;
        }
        cap *= 2;
    }
    size_t sz[5];
    comp_sizes(c, sz);
    cvq_buffer nb[5];
    memset(nb, 0, sizeof nb);
    cvq_status st = CVQ_OK;
    for (int i = 0; i < 5 && !st; i++) {
        size_t bytes;
        if (!cvq__mul_size(cap, sz[i], &bytes))
            st = CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "cache of %zu tokens overflows size_t", cap);
        else
            st = cvq__buffer_alloc(ctx, bytes, &nb[i]);
    }
    cvq_buffer *ob[5];
    comp_bufs(c, ob);
    /* Copy the records in use. */
    for (int i = 0; i < 5 && !st; i++) st = copy_bytes(ctx, ob[i], &nb[i], c->n_comp * sz[i]);
    if (st) {
        for (int i = 0; i < 5; i++) cvq__buffer_free(ctx, &nb[i]);
        return st;
    }
    for (int i = 0; i < 5; i++) {
        cvq__buffer_free(ctx, ob[i]);
        *ob[i] = nb[i];
    }
    c->cap_comp = cap;
    return CVQ_OK;
}

cvq_status cvq_cache_create(cvq_context *ctx, const cvq_codebook *cb,
                            const cvq_cache_params *params, cvq_cache **out) {
    CVQ__NONNULL(ctx, "cvq_cache_create", out, "out");
    *out = NULL;
    cvq_cache_params p = params ? *params : cvq_cache_default_params();
    cvq_layer_view lv;
    cvq_status st = cvq__check_layer(ctx, cb, p.layer, &lv);
    if (st) return st;
    if (p.window > (1u << 20) || p.sinks > (1u << 20))
        return CVQ_FAIL(ctx, CVQ_ERR_INVALID_ARGUMENT, "window (%u) and sinks (%u) must be <= 2^20",
                        p.window, p.sinks);
    cvq_cache *c = cvq__calloc(&ctx->alloc, 1, sizeof *c);
    if (!c) return CVQ_FAIL(ctx, CVQ_ERR_OUT_OF_MEMORY, "cannot allocate a cache");
    c->ctx = ctx;
    c->cb = cb;
    c->g = cb->geom;
    c->layer = p.layer;
    c->window = p.window;
    c->sinks = p.sinks;
    c->kvd = cvq__kv_dims(&c->g);
    st = cvq_record_layout_of(&c->g, &c->rl);
    const size_t tok = c->kvd * sizeof(float);
    if (!st && p.sinks) {
        st = cvq__buffer_alloc(ctx, p.sinks * tok, &c->sink_k);
        if (!st) st = cvq__buffer_alloc(ctx, p.sinks * tok, &c->sink_v);
        if (!st) st = cvq__buffer_alloc(ctx, p.sinks * sizeof(int32_t), &c->sink_pos);
    }
    if (!st && p.window) {
        st = cvq__buffer_alloc(ctx, p.window * tok, &c->win_k);
        if (!st) st = cvq__buffer_alloc(ctx, p.window * tok, &c->win_v);
        if (!st) st = cvq__buffer_alloc(ctx, p.window * sizeof(int32_t), &c->win_pos);
    }
    if (!st && p.initial_capacity) st = grow(c, p.initial_capacity);
    if (st) {
        release_all(c);
        cvq__free(&ctx->alloc, c);
        return st;
    }
    *out = c;
    return CVQ_OK;
}

void cvq_cache_free(cvq_cache *cache) {
    if (!cache) return;
    cvq_context *ctx = cache->ctx;
    release_all(cache);
    cvq__free(&ctx->alloc, cache);
}

cvq_status cvq_cache_clear(cvq_cache *c) {
    CVQ__NONNULL(NULL, "cvq_cache_clear", c, "cache");
    c->n_sink = c->n_win = c->n_comp = 0;
    c->n_total = 0;
    c->has_last = false;
    return CVQ_OK;
}

cvq_status cvq_cache_copy(const cvq_cache *src, cvq_cache **out) {
    if (out) *out = NULL;
    CVQ__NONNULL(NULL, "cvq_cache_copy", src, "src");
    CVQ__NONNULL(src->ctx, "cvq_cache_copy", out, "out");
    cvq_context *ctx = src->ctx;
    cvq_cache_params p = cvq_cache_default_params();
    p.layer = src->layer;
    p.window = src->window;
    p.sinks = src->sinks;
    p.initial_capacity = 0; /* the compressed arrays are sized below */
    cvq_cache *c = NULL;
    cvq_status st = cvq_cache_create(ctx, src->cb, &p, &c);
    if (st) return st;

    /* The same capacity as the source: a fork usually goes on growing the
     * same sequence, and the two caches then report the same statistics. */
    size_t sz[5];
    comp_sizes(c, sz);
    cvq_buffer *nb[5];
    comp_bufs(c, nb);
    const cvq_buffer *ob[5] = {&src->c_codes, &src->c_kscale, &src->c_vbits, &src->c_vsigma, &src->c_pos};
    for (int i = 0; i < 5 && !st && src->cap_comp; i++) {
        size_t bytes;
        if (!cvq__mul_size(src->cap_comp, sz[i], &bytes))
            st = CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "cache of %zu tokens overflows size_t", src->cap_comp);
        else
            st = cvq__buffer_alloc(ctx, bytes, nb[i]);
    }
    if (!st) c->cap_comp = src->cap_comp;

    /* The bytes as they are: records, sinks and window are never re-encoded. */
    const size_t tok = c->kvd * sizeof(float);
    for (int i = 0; i < 5 && !st; i++) st = copy_bytes(ctx, ob[i], nb[i], src->n_comp * sz[i]);
    if (!st) st = copy_bytes(ctx, &src->sink_k, &c->sink_k, src->n_sink * tok);
    if (!st) st = copy_bytes(ctx, &src->sink_v, &c->sink_v, src->n_sink * tok);
    if (!st) st = copy_bytes(ctx, &src->sink_pos, &c->sink_pos, src->n_sink * sizeof(int32_t));
    if (!st) st = copy_bytes(ctx, &src->win_k, &c->win_k, src->n_win * tok);
    if (!st) st = copy_bytes(ctx, &src->win_v, &c->win_v, src->n_win * tok);
    if (!st) st = copy_bytes(ctx, &src->win_pos, &c->win_pos, src->n_win * sizeof(int32_t));
    if (st) {
        cvq_cache_free(c);
        return st;
    }
    c->n_sink = src->n_sink;
    c->n_win = src->n_win;
    c->n_comp = src->n_comp;
    c->has_last = src->has_last;
    c->last_pos = src->last_pos;
    c->n_total = src->n_total;
    *out = c;
    return CVQ_OK;
}

/* The block to compress, gathered on the host: `nb` tokens, the first
 * `from_win` taken from the window, the rest from the new tokens. */
typedef struct {
    size_t nb;
    float *k, *v;
    int32_t *pos;
    uint16_t *codes;  /* [nb][Hkv][R] */
    float *kscale, *vsigma;
    uint8_t *vbits, *packed;
} block;

static void block_free(cvq_context *ctx, block *b) {
    void *ps[] = {b->k, b->v, b->pos, b->codes, b->kscale, b->vsigma, b->vbits, b->packed};
    for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++) cvq__free(&ctx->alloc, ps[i]);
    memset(b, 0, sizeof *b);
}

/* Encodes b->k / b->v into the record arrays of b (temporaries). */
static cvq_status block_encode(cvq_cache *c, const cvq_layer_view *lv, block *b) {
    cvq_context *ctx = c->ctx;
    const size_t nb = b->nb, R = c->g.key_stages, H = c->g.n_kv_heads;
    b->codes = cvq__alloc(&ctx->alloc, nb * H * R * sizeof(uint16_t));
    b->kscale = cvq__alloc(&ctx->alloc, nb * c->rl.key_scale_count * sizeof(float));
    b->vbits = cvq__alloc(&ctx->alloc, nb * c->rl.value_bit_bytes);
    b->vsigma = cvq__alloc(&ctx->alloc, nb * c->rl.value_scale_count * sizeof(float));
    b->packed = cvq__alloc(&ctx->alloc, nb * c->rl.key_code_bytes);
    if (!b->codes || !b->kscale || !b->vbits || !b->vsigma || !b->packed)
        return CVQ_FAIL(ctx, CVQ_ERR_OUT_OF_MEMORY, "cache block of %zu tokens", nb);

    const size_t in_bytes = nb * c->kvd * sizeof(float);
    cvq_status st = cvq__run_encode(ctx, CVQ_OP_ENCODE_KEYS, lv, c->cb, nb, b->k, in_bytes, b->codes,
                                    nb * H * R * sizeof(uint16_t), b->kscale,
                                    nb * c->rl.key_scale_count * sizeof(float));
    if (!st)
        st = cvq__run_encode(ctx, CVQ_OP_ENCODE_VALUES, lv, c->cb, nb, b->v, in_bytes, b->vbits,
                             nb * c->rl.value_bit_bytes, b->vsigma,
                             nb * c->rl.value_scale_count * sizeof(float));
    if (st) return st;

    /* Key codes in the record are packed at 12 bits, token by token. */
    for (size_t t = 0; t < nb; t++)
        cvq__pack_codes12(b->codes + t * H * R, H * R, b->packed + t * c->rl.key_code_bytes);
    return CVQ_OK;
}

cvq_status cvq_cache_append(cvq_cache *c, const void *keys, const void *values,
                            cvq_dtype dtype, const int32_t *positions, size_t n) {
    CVQ__NONNULL(NULL, "cvq_cache_append", c, "cache");
    cvq_context *ctx = c->ctx;
    cvq_status dst = cvq__check_dtype(ctx, dtype);
    if (dst) return dst;
    if (n == 0) return CVQ_OK; /* arrays may be NULL (commvq.h, "counts of zero") */
    CVQ__NONNULL(ctx, "cvq_cache_append", keys, "keys");
    CVQ__NONNULL(ctx, "cvq_cache_append", values, "values");
    CVQ__NONNULL(ctx, "cvq_cache_append", positions, "positions");
    /* Before reading positions[0..n): a count whose fp32 keys overflow
     * size_t cannot describe real arrays (found by test_misuse: the loop
     * below ran off the end of the caller's positions). */
    size_t in_bytes;
    if (!cvq__mul_size(n, c->kvd * sizeof(float), &in_bytes))
        return CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "%zu tokens overflow size_t", n);
    for (size_t i = 0; i < n; i++) {
        int32_t prev = i ? positions[i - 1] : c->last_pos;
        bool has_prev = i || c->has_last;
        if (positions[i] < 0)
            return CVQ_FAIL(ctx, CVQ_ERR_POSITION, "position %d of token %zu is negative", positions[i], i);
        if (has_prev && positions[i] <= prev)
            return CVQ_FAIL(ctx, CVQ_ERR_POSITION,
                            "position %d of token %zu does not follow %d: positions must strictly increase",
                            positions[i], i, prev);
    }
    cvq_layer_view lv;
    cvq_status st = cvq__check_layer(ctx, c->cb, c->layer, &lv);
    if (st) return st;

    float *kf = NULL, *vf = NULL;
    block b;
    memset(&b, 0, sizeof b);
    st = cvq__load_keys(ctx, &lv, keys, dtype, n, &kf);
    if (!st) st = cvq__load_values(ctx, &lv, values, dtype, n, &vf);
    if (st) goto done;

    /* Where the n tokens go: sinks first, then through the window. */
    const size_t to_sink = (c->n_sink < c->sinks) ? (n < c->sinks - c->n_sink ? n : c->sinks - c->n_sink) : 0;
    const size_t rest = n - to_sink;
    const size_t m = c->n_win + rest; /* window tokens followed by the new ones */
    size_t flushed, keep;
    if (c->window == 0) {
        flushed = m;
        keep = 0;
    } else if (m == 0) {
        flushed = keep = 0;
    } else {
        flushed = ((m - 1) / c->window) * c->window;
        keep = m - flushed;
    }
    const size_t tok = c->kvd * sizeof(float);

    if (flushed) {
        st = cvq__supports(ctx, CVQ_OP_ENCODE_KEYS, &c->g, flushed, 0);
        if (!st) st = cvq__supports(ctx, CVQ_OP_ENCODE_VALUES, &c->g, flushed, 0);
        if (!st && c->n_comp + flushed < c->n_comp)
            st = CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "token count overflows");
        if (!st) st = grow(c, c->n_comp + flushed);
        if (st) goto done;
        b.nb = flushed;
        b.k = cvq__alloc(&ctx->alloc, flushed * tok);
        b.v = cvq__alloc(&ctx->alloc, flushed * tok);
        b.pos = cvq__alloc(&ctx->alloc, flushed * sizeof(int32_t));
        if (!b.k || !b.v || !b.pos) {
            st = CVQ_FAIL(ctx, CVQ_ERR_OUT_OF_MEMORY, "cache block of %zu tokens", flushed);
            goto done;
        }
        /* flushed > 0 implies the whole window is flushed (see above). */
        const size_t from_win = c->n_win;
        st = cvq__buffer_read(ctx, &c->win_k, 0, b.k, from_win * tok);
        if (!st) st = cvq__buffer_read(ctx, &c->win_v, 0, b.v, from_win * tok);
        if (!st) st = cvq__buffer_read(ctx, &c->win_pos, 0, b.pos, from_win * sizeof(int32_t));
        if (st) goto done;
        const size_t from_new = flushed - from_win;
        memcpy(b.k + from_win * c->kvd, kf + to_sink * c->kvd, from_new * tok);
        memcpy(b.v + from_win * c->kvd, vf + to_sink * c->kvd, from_new * tok);
        memcpy(b.pos + from_win, positions + to_sink, from_new * sizeof(int32_t));
        st = block_encode(c, &lv, &b);
        if (st) goto done;
    }

    /* Commit: nothing below fails for host-memory backends. */
    if (flushed) {
        size_t sz[5];
        cvq_buffer *cb5[5];
        comp_sizes(c, sz);
        comp_bufs(c, cb5);
        const void *src[5] = {b.packed, b.kscale, b.vbits, b.vsigma, b.pos};
        for (int i = 0; i < 5 && !st; i++)
            st = cvq__buffer_write(ctx, cb5[i], c->n_comp * sz[i], src[i], flushed * sz[i]);
        if (st) goto done;
    }
    if (to_sink) {
        st = cvq__buffer_write(ctx, &c->sink_k, c->n_sink * tok, kf, to_sink * tok);
        if (!st) st = cvq__buffer_write(ctx, &c->sink_v, c->n_sink * tok, vf, to_sink * tok);
        if (!st) st = cvq__buffer_write(ctx, &c->sink_pos, c->n_sink * sizeof(int32_t), positions,
                                        to_sink * sizeof(int32_t));
        if (st) goto done;
    }
    if (keep) {
        /* The window's new content: if anything was flushed it is the last
         * `keep` new tokens written from offset 0, otherwise the new tokens
         * appended after the current window. */
        const size_t win_off = flushed ? 0 : c->n_win;
        const size_t first_new = to_sink + (rest - (flushed ? keep : rest));
        const size_t count = flushed ? keep : rest;
        st = cvq__buffer_write(ctx, &c->win_k, win_off * tok, kf + first_new * c->kvd, count * tok);
        if (!st) st = cvq__buffer_write(ctx, &c->win_v, win_off * tok, vf + first_new * c->kvd, count * tok);
        if (!st) st = cvq__buffer_write(ctx, &c->win_pos, win_off * sizeof(int32_t), positions + first_new,
                                        count * sizeof(int32_t));
        if (st) goto done;
    }
    c->n_sink += to_sink;
    c->n_comp += flushed;
    c->n_win = keep;
    c->n_total += n;
    c->last_pos = positions[n - 1];
    c->has_last = true;

done:
    block_free(ctx, &b);
    cvq__free(&ctx->alloc, kf);
    cvq__free(&ctx->alloc, vf);
    return st;
}

cvq_status cvq_cache_attend(cvq_cache *c, const float *queries, const int32_t *q_pos,
                            size_t n_q, uint32_t flags, float *out) {
    CVQ__NONNULL(NULL, "cvq_cache_attend", c, "cache");
    cvq_context *ctx = c->ctx;
    if (flags & ~(uint32_t)CVQ_ATTEND_QUERIES_ROTATED)
        return CVQ_FAIL(ctx, CVQ_ERR_INVALID_ARGUMENT, "unknown attend flags 0x%x", flags);
    if (n_q == 0) return CVQ_OK; /* arrays may be NULL (commvq.h, "counts of zero") */
    CVQ__NONNULL(ctx, "cvq_cache_attend", queries, "queries");
    CVQ__NONNULL(ctx, "cvq_cache_attend", q_pos, "q_pos");
    CVQ__NONNULL(ctx, "cvq_cache_attend", out, "out");
    const size_t per_q = (size_t)c->g.n_q_heads * c->g.head_dim;
    size_t count, bytes;
    if (!cvq__mul_size(n_q, per_q, &count) || !cvq__mul_size(count, sizeof(float), &bytes))
        return CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "%zu queries overflow size_t", n_q);
    size_t bad = cvq__find_nonfinite(queries, count);
    if (bad != (size_t)-1)
        return CVQ_FAIL(ctx, CVQ_ERR_NONFINITE_INPUT, "query element %zu (query %zu, head %zu) is NaN or Inf",
                        bad, bad / per_q, (bad % per_q) / c->g.head_dim);
    for (size_t i = 0; i < n_q; i++)
        if (q_pos[i] < 0)
            return CVQ_FAIL(ctx, CVQ_ERR_POSITION, "query position %d (query %zu) is negative", q_pos[i], i);
    cvq_layer_view lv;
    cvq_status st = cvq__check_layer(ctx, c->cb, c->layer, &lv);
    if (st) return st;
    st = cvq__supports(ctx, CVQ_OP_ATTEND, &c->g, c->n_sink + c->n_comp + c->n_win, n_q);
    if (st) return st;

    cvq_staged sq, sp, so;
    memset(&sp, 0, sizeof sp);
    memset(&so, 0, sizeof so);
    st = cvq__stage_in(ctx, queries, bytes, &sq);
    if (!st) st = cvq__stage_in(ctx, q_pos, n_q * sizeof(int32_t), &sp);
    if (!st) st = cvq__stage_out(ctx, out, bytes, &so);
    if (!st) {
        cvq_attend_args a;
        memset(&a, 0, sizeof a);
        a.lv = &lv;
        a.cb = c->cb;
        a.n_q = n_q;
        a.q = cvq__staged_view(&sq);
        a.q_pos = cvq__staged_view(&sp);
        a.out = cvq__staged_view(&so);
        a.q_rotated = (flags & CVQ_ATTEND_QUERIES_ROTATED) != 0;
        a.n_sink = c->n_sink;
        a.n_comp = c->n_comp;
        a.n_win = c->n_win;
        a.sink_k = (cvq_view){&c->sink_k, 0};
        a.sink_v = (cvq_view){&c->sink_v, 0};
        a.sink_pos = (cvq_view){&c->sink_pos, 0};
        a.comp_codes = (cvq_view){&c->c_codes, 0};
        a.comp_kscale = (cvq_view){&c->c_kscale, 0};
        a.comp_vbits = (cvq_view){&c->c_vbits, 0};
        a.comp_vsigma = (cvq_view){&c->c_vsigma, 0};
        a.comp_pos = (cvq_view){&c->c_pos, 0};
        a.win_k = (cvq_view){&c->win_k, 0};
        a.win_v = (cvq_view){&c->win_v, 0};
        a.win_pos = (cvq_view){&c->win_pos, 0};
        st = ctx->be->attend(ctx, &a);
    }
    if (!st) st = cvq__stage_finish(ctx, &so, out, bytes);
    cvq__stage_release(ctx, &so);
    cvq__stage_release(ctx, &sp);
    cvq__stage_release(ctx, &sq);
    if (!st) {
        /* Finite queries and keys can still overflow a logit (|q| and |k|
         * near sqrt(FLT_MAX)): never hand back NaN/Inf as a result. The
         * output is zeroed (a defined value) and the call fails. */
        for (size_t i = 0; i < n_q * per_q; i++) {
            if (!isfinite(out[i])) {
                size_t q = i / per_q, h = (i % per_q) / c->g.head_dim;
                memset(out, 0, bytes);
                return CVQ_FAIL(ctx, CVQ_ERR_INPUT_RANGE,
                                "attention overflowed for query %zu, head %zu (queries or keys too "
                                "large for binary32 logits); output zeroed",
                                q, h);
            }
        }
    }
    return st;
}

cvq_status cvq_cache_stats_get(const cvq_cache *c, cvq_cache_stats *out) {
    CVQ__NONNULL(NULL, "cvq_cache_stats_get", c, "cache");
    CVQ__NONNULL(c->ctx, "cvq_cache_stats_get", out, "out");
    memset(out, 0, sizeof *out);
    const size_t tok = c->kvd * sizeof(float);
    out->n_tokens = c->n_total;
    out->n_sink = c->n_sink;
    out->n_compressed = c->n_comp;
    out->n_window = c->n_win;
    out->bytes_compressed = (uint64_t)c->n_comp * c->rl.bytes_per_token;
    out->bytes_full = (uint64_t)(c->n_sink + c->n_win) * (2 * tok);
    size_t sz[5];
    comp_sizes(c, sz);
    uint64_t alloc = sizeof *c;
    for (int i = 0; i < 5; i++) alloc += (uint64_t)c->cap_comp * sz[i];
    alloc += (uint64_t)c->sinks * (2 * tok + sizeof(int32_t));
    alloc += (uint64_t)c->window * (2 * tok + sizeof(int32_t));
    out->bytes_allocated = alloc;
    out->bits_per_element = c->rl.bits_per_element;
    return CVQ_OK;
}
