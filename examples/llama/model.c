/*
 * LLaMA forward pass (see model.h). The weight products are matmul.c's
 * (register-blocked, OpenMP over the rows).
 */
#include "model.h"
#include "matmul.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

static void merr(char *err, size_t errlen, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

static void merr(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    if (err == NULL || errlen == 0) return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Eight partial sums so that the compiler can vectorize without
 * reassociating. */
static float dot(const float *a, const float *b, size_t n) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0}, t = 0.0f;
    size_t i, k;
    for (i = 0; i + 8 <= n; i += 8)
        for (k = 0; k < 8; k++) s[k] += a[i + k] * b[i + k];
    for (; i < n; i++) t += a[i] * b[i];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + t;
}

/* out[t][r] = W[r] . x[t] for t < n (x rows of w->cols, out rows of w->rows):
 * the register-blocked kernels of matmul.c, bit-identical for any n. */
static int matmul(float *out, const weight *w, const float *x, size_t n) {
    return mm_matmul(out, w, x, n);
}

static void rmsnorm(float *out, const float *x, const float *wt, uint32_t dim,
                    float eps) {
    double ss = 0.0;
    float inv;
    uint32_t i;
    for (i = 0; i < dim; i++) ss += (double)x[i] * x[i];
    inv = (float)(1.0 / sqrt(ss / dim + eps));
    for (i = 0; i < dim; i++) out[i] = x[i] * inv * wt[i];
}

/* Interleaved RoPE on one head vector: pair p = (x[2p], x[2p+1]) rotated by
 * pos * theta[p]. */
static void rope_head(float *x, uint32_t d, int32_t pos, const double *theta) {
    uint32_t p;
    for (p = 0; p < d / 2; p++) {
        double a = (double)pos * theta[p], c = cos(a), s = sin(a);
        double x0 = x[2 * p], x1 = x[2 * p + 1];
        x[2 * p] = (float)(x0 * c - x1 * s);
        x[2 * p + 1] = (float)(x0 * s + x1 * c);
    }
}

/* ---- loading ------------------------------------------------------------------ */

static int get_weight(const gguf_file *f, const char *name, uint32_t cols,
                      uint32_t rows, weight *w, char *err, size_t errlen) {
    const gguf_tensor *t = gguf_find_tensor(f, name);
    uint32_t bv, bb;
    if (!t) {
        merr(err, errlen, "tensor '%s' is missing", name);
        return -1;
    }
    if (t->n_dims != 2 || t->ne[0] != cols || t->ne[1] != rows) {
        merr(err, errlen, "tensor '%s' has shape [%llu, %llu] (%u dims), expected [%u, %u]",
             name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
             t->n_dims, cols, rows);
        return -1;
    }
    if (t->type != GGML_F32 && t->type != GGML_F16 && t->type != GGML_BF16 &&
        t->type != GGML_Q4_0 && t->type != GGML_Q4_1 && t->type != GGML_Q8_0) {
        merr(err, errlen,
             "tensor '%s' has type %s, which this program does not support "
             "(F32, F16, BF16, Q4_0, Q4_1, Q8_0)",
             name, gguf_type_name(t->type));
        return -1;
    }
    gguf_type_block(t->type, &bv, &bb);
    w->data = t->data;
    w->type = t->type;
    w->rows = rows;
    w->cols = cols;
    w->row_bytes = (size_t)(cols / bv) * bb;
    return 0;
}

/* Norm weights are copied out of the file image: a file may use an
 * alignment below 4, and a float pointer into it could then be misaligned. */
static int get_norm(const gguf_file *f, const char *name, uint32_t dim, float **pool,
                    const float **out, char *err, size_t errlen) {
    const gguf_tensor *t = gguf_find_tensor(f, name);
    if (!t) {
        merr(err, errlen, "tensor '%s' is missing", name);
        return -1;
    }
    if (t->type != GGML_F32 || t->n_dims != 1 || t->ne[0] != dim) {
        merr(err, errlen, "tensor '%s' must be F32 [%u] (is %s, %llu values)", name,
             dim, gguf_type_name(t->type), (unsigned long long)t->ne[0]);
        return -1;
    }
    memcpy(*pool, t->data, sizeof(float) * dim);
    *out = *pool;
    *pool += dim;
    return 0;
}

void llama_free(llama_model *m) {
    if (!m) return;
    free(m->layers);
    free(m->rope_theta);
    free(m->norms);
    memset(m, 0, sizeof(*m));
}

int llama_load(const gguf_file *f, llama_model *m, char *err, size_t errlen) {
    const gguf_kv *arch = gguf_find_kv(f, "general.architecture");
    char a[64], key[160], name[96];
    llama_hparams *hp = &m->hp;
    uint32_t l, rope_dims;
    float *pool;
    memset(m, 0, sizeof(*m));
    if (!arch || arch->type != GGUF_T_STRING || arch->str.len == 0 ||
        arch->str.len >= sizeof a) {
        merr(err, errlen, "general.architecture is missing");
        return -1;
    }
    memcpy(a, arch->str.ptr, (size_t)arch->str.len);
    a[arch->str.len] = '\0';
    if (strcmp(a, "llama") != 0) {
        merr(err, errlen, "architecture '%s' is not supported (only llama)", a);
        return -1;
    }
#define U32(field, k)                                                   \
    do {                                                                \
        snprintf(key, sizeof key, "%s.%s", a, k);                       \
        if (gguf_get_u32(f, key, &hp->field, err, errlen)) goto fail;   \
    } while (0)
    U32(n_layers, "block_count");
    U32(dim, "embedding_length");
    U32(ffn_dim, "feed_forward_length");
    U32(n_heads, "attention.head_count");
    U32(ctx_train, "context_length");
    snprintf(key, sizeof key, "%s.attention.head_count_kv", a);
    if (gguf_find_kv(f, key)) U32(n_kv_heads, "attention.head_count_kv");
    else hp->n_kv_heads = hp->n_heads;
#undef U32
    snprintf(key, sizeof key, "%s.attention.layer_norm_rms_epsilon", a);
    if (gguf_get_f32(f, key, &hp->rms_eps, err, errlen)) goto fail;
    snprintf(key, sizeof key, "%s.rope.freq_base", a);
    hp->rope_base = 10000.0f;
    if (gguf_find_kv(f, key) && gguf_get_f32(f, key, &hp->rope_base, err, errlen))
        goto fail;
    snprintf(key, sizeof key, "%s.rope.scaling.type", a);
    if (gguf_find_kv(f, key)) {
        merr(err, errlen, "%s is set: RoPE scaling is not supported here", key);
        goto fail;
    }
    if (hp->n_layers == 0 || hp->n_heads == 0 || hp->n_kv_heads == 0 ||
        hp->dim % hp->n_heads != 0 || hp->n_heads % hp->n_kv_heads != 0 ||
        (hp->dim / hp->n_heads) % 2 != 0 || hp->dim > 65536 || hp->ffn_dim == 0 ||
        hp->ffn_dim > 1048576 || hp->n_layers > 1024) {
        merr(err, errlen, "unsupported hyperparameters (layers %u, dim %u, heads %u/%u, ffn %u)",
             hp->n_layers, hp->dim, hp->n_heads, hp->n_kv_heads, hp->ffn_dim);
        goto fail;
    }
    hp->head_dim = hp->dim / hp->n_heads;
    snprintf(key, sizeof key, "%s.rope.dimension_count", a);
    rope_dims = hp->head_dim;
    if (gguf_find_kv(f, key) && gguf_get_u32(f, key, &rope_dims, err, errlen)) goto fail;
    if (rope_dims != hp->head_dim) {
        merr(err, errlen, "partial RoPE (%u of %u dims) is not supported", rope_dims,
             hp->head_dim);
        goto fail;
    }
    {
        const gguf_tensor *te = gguf_find_tensor(f, "token_embd.weight");
        if (!te || te->n_dims != 2) {
            merr(err, errlen, "tensor 'token_embd.weight' is missing or not 2-D");
            goto fail;
        }
        if (te->ne[1] > INT32_MAX) {
            merr(err, errlen, "vocabulary too large");
            goto fail;
        }
        hp->n_vocab = (uint32_t)te->ne[1];
    }
    m->norms = (float *)malloc(sizeof(float) * hp->dim * (2 * (size_t)hp->n_layers + 1));
    if (!m->norms) {
        merr(err, errlen, "out of memory");
        goto fail;
    }
    pool = m->norms;
    if (get_weight(f, "token_embd.weight", hp->dim, hp->n_vocab, &m->tok_embd, err, errlen) ||
        get_norm(f, "output_norm.weight", hp->dim, &pool, &m->output_norm, err, errlen))
        goto fail;
    if (gguf_find_tensor(f, "output.weight")) {
        if (get_weight(f, "output.weight", hp->dim, hp->n_vocab, &m->output, err, errlen))
            goto fail;
    } else {
        m->output = m->tok_embd; /* tied embeddings */
    }
    m->layers = (layer_weights *)calloc(hp->n_layers, sizeof(layer_weights));
    m->rope_theta = (double *)malloc(sizeof(double) * hp->head_dim / 2);
    if (!m->layers || !m->rope_theta) {
        merr(err, errlen, "out of memory");
        goto fail;
    }
    if (cvq_rope_freqs_default(hp->head_dim, hp->rope_base, m->rope_theta) != CVQ_OK) {
        /* head dims commvq does not know: same formula, written out */
        uint32_t p;
        for (p = 0; p < hp->head_dim / 2; p++)
            m->rope_theta[p] = pow((double)hp->rope_base, -2.0 * p / hp->head_dim);
    }
    for (l = 0; l < hp->n_layers; l++) {
        layer_weights *L = &m->layers[l];
        uint32_t qd = hp->n_heads * hp->head_dim, kd = hp->n_kv_heads * hp->head_dim;
#define W(field, nm, c, r)                                                   \
        snprintf(name, sizeof name, "blk.%u.%s.weight", l, nm);              \
        if (get_weight(f, name, c, r, &L->field, err, errlen)) goto fail;
        W(wq, "attn_q", hp->dim, qd)
        W(wk, "attn_k", hp->dim, kd)
        W(wv, "attn_v", hp->dim, kd)
        W(wo, "attn_output", qd, hp->dim)
        W(w_gate, "ffn_gate", hp->dim, hp->ffn_dim)
        W(w_up, "ffn_up", hp->dim, hp->ffn_dim)
        W(w_down, "ffn_down", hp->ffn_dim, hp->dim)
#undef W
        snprintf(name, sizeof name, "blk.%u.attn_norm.weight", l);
        if (get_norm(f, name, hp->dim, &pool, &L->attn_norm, err, errlen)) goto fail;
        snprintf(name, sizeof name, "blk.%u.ffn_norm.weight", l);
        if (get_norm(f, name, hp->dim, &pool, &L->ffn_norm, err, errlen)) goto fail;
    }
    return 0;
fail:
    llama_free(m);
    return -1;
}

/* ---- state ---------------------------------------------------------------------- */

void llama_state_free(llama_state *s) {
    uint32_t l;
    if (!s) return;
    if (s->caches) {
        for (l = 0; l < s->m->hp.n_layers; l++) cvq_cache_free(s->caches[l]);
        free(s->caches);
    }
    free(s->k_cache);
    free(s->v_cache);
    free(s->x);
    free(s->xn);
    free(s->q);
    free(s->k);
    free(s->v);
    free(s->att);
    free(s->hb);
    free(s->hb2);
    free(s->scores);
    memset(s, 0, sizeof(*s));
}

int llama_state_init(llama_state *s, const llama_model *m, kv_kind kind,
                     uint32_t max_ctx, uint32_t max_batch, cvq_context *ctx,
                     const cvq_codebook *cb, uint32_t window, char *err,
                     size_t errlen) {
    const llama_hparams *hp = &m->hp;
    size_t qd = (size_t)hp->n_heads * hp->head_dim, kd = (size_t)hp->n_kv_heads * hp->head_dim;
    size_t B = max_batch;
    uint32_t l;
    memset(s, 0, sizeof(*s));
    s->m = m;
    s->kind = kind;
    s->max_ctx = max_ctx;
    s->max_batch = max_batch;
    s->window = window;
    if (max_batch == 0 || max_ctx == 0) {
        merr(err, errlen, "batch and context must be >= 1");
        return -1;
    }
    s->x = (float *)malloc(sizeof(float) * B * hp->dim);
    s->xn = (float *)malloc(sizeof(float) * B * hp->dim);
    s->q = (float *)malloc(sizeof(float) * B * qd);
    s->k = (float *)malloc(sizeof(float) * B * kd);
    s->v = (float *)malloc(sizeof(float) * B * kd);
    s->att = (float *)malloc(sizeof(float) * B * qd);
    s->hb = (float *)malloc(sizeof(float) * B * hp->ffn_dim);
    s->hb2 = (float *)malloc(sizeof(float) * B * hp->ffn_dim);
    if (!s->x || !s->xn || !s->q || !s->k || !s->v || !s->att || !s->hb || !s->hb2)
        goto oom;
    if (kind == KV_FP32) {
        size_t per = (size_t)hp->n_layers * max_ctx * kd;
        s->k_cache = (float *)malloc(sizeof(float) * per);
        s->v_cache = (float *)malloc(sizeof(float) * per);
        s->scores = (float *)malloc(sizeof(float) * B * hp->n_heads * max_ctx);
        if (!s->k_cache || !s->v_cache || !s->scores) goto oom;
    } else {
        cvq_cache_params cp = cvq_cache_default_params();
        s->caches = (cvq_cache **)calloc(hp->n_layers, sizeof(cvq_cache *));
        if (!s->caches) goto oom;
        cp.window = window;
        for (l = 0; l < hp->n_layers; l++) {
            cvq_status st;
            cp.layer = l;
            st = cvq_cache_create(ctx, cb, &cp, &s->caches[l]);
            if (st != CVQ_OK) {
                merr(err, errlen, "cvq_cache_create(layer %u): %s: %s", l,
                     cvq_status_name(st), cvq_last_error());
                llama_state_free(s);
                return -1;
            }
        }
    }
    return 0;
oom:
    merr(err, errlen, "out of memory for the inference state (context %u)", max_ctx);
    llama_state_free(s);
    return -1;
}

int llama_state_reset(llama_state *s, char *err, size_t errlen) {
    uint32_t l;
    s->n_past = 0;
    if (s->caches)
        for (l = 0; l < s->m->hp.n_layers; l++) {
            cvq_status st = cvq_cache_clear(s->caches[l]);
            if (st != CVQ_OK) {
                merr(err, errlen, "cvq_cache_clear: %s", cvq_last_error());
                return -1;
            }
        }
    return 0;
}

int llama_state_copy(llama_state *dst, const llama_state *src, char *err, size_t errlen) {
    const llama_hparams *hp = &src->m->hp;
    size_t kd = (size_t)hp->n_kv_heads * hp->head_dim;
    uint32_t l;
    if (dst->m != src->m || dst->kind != src->kind) {
        merr(err, errlen, "state copy between different models or KV kinds");
        return -1;
    }
    if (src->kind == KV_FP32) {
        if (src->n_past > dst->max_ctx) {
            merr(err, errlen, "state copy: %u tokens do not fit a context of %u", src->n_past,
                 dst->max_ctx);
            return -1;
        }
        for (l = 0; l < hp->n_layers; l++) {
            size_t so = (size_t)l * src->max_ctx * kd, d0 = (size_t)l * dst->max_ctx * kd;
            memcpy(dst->k_cache + d0, src->k_cache + so, sizeof(float) * src->n_past * kd);
            memcpy(dst->v_cache + d0, src->v_cache + so, sizeof(float) * src->n_past * kd);
        }
    } else {
        for (l = 0; l < hp->n_layers; l++) {
            cvq_cache *c = NULL;
            cvq_status st = cvq_cache_copy(src->caches[l], &c);
            if (st != CVQ_OK) {
                merr(err, errlen, "cvq_cache_copy(layer %u): %s: %s", l, cvq_status_name(st),
                     cvq_last_error());
                return -1;
            }
            cvq_cache_free(dst->caches[l]);
            dst->caches[l] = c;
        }
    }
    dst->n_past = src->n_past;
    return 0;
}

int llama_kv_detail(const llama_state *s, cvq_cache_stats *sum) {
    uint32_t l;
    memset(sum, 0, sizeof(*sum));
    if (s->kind != KV_COMMVQ) return -1;
    for (l = 0; l < s->m->hp.n_layers; l++) {
        cvq_cache_stats st;
        if (cvq_cache_stats_get(s->caches[l], &st) != CVQ_OK) return -1;
        sum->n_tokens = st.n_tokens; /* the same in every layer */
        sum->n_sink = st.n_sink;
        sum->n_compressed = st.n_compressed;
        sum->n_window = st.n_window;
        sum->bytes_compressed += st.bytes_compressed;
        sum->bytes_full += st.bytes_full;
        sum->bytes_allocated += st.bytes_allocated;
        sum->bits_per_element = st.bits_per_element;
    }
    return 0;
}

uint64_t llama_kv_bytes(const llama_state *s) {
    const llama_hparams *hp = &s->m->hp;
    uint64_t total = 0;
    uint32_t l;
    if (s->kind == KV_FP32)
        return (uint64_t)2 * hp->n_layers * s->n_past * hp->n_kv_heads * hp->head_dim * 4;
    for (l = 0; l < hp->n_layers; l++) {
        cvq_cache_stats st;
        if (cvq_cache_stats_get(s->caches[l], &st) == CVQ_OK)
            total += st.bytes_compressed + st.bytes_full;
    }
    return total;
}

/* Plain attention over the fp32 cache of layer l for the batch's n tokens
 * (token t at position n_past + t, already stored): q rotated in place. */
/* Tokens of the first N that a cache with window W (no sinks, as this
 * program creates them) holds compressed: blocks of W leave the window when
 * a token arrives to a full one; W = 0 compresses every token on arrival. */
static size_t compressed_of(size_t N, size_t W) {
    return W ? (N ? (N - 1) / W * W : 0) : N;
}

/* The longest sub-batch of at most k tokens after the first N0 whose
 * queries see the cache of token-by-token decoding: it may start with the
 * arrival that flushes a full window, then only fill the window again. */
static size_t sub_batch(size_t N0, size_t k, size_t W) {
    size_t nwin, allowed;
    if (W == 0) return k;
    nwin = N0 - compressed_of(N0, W);
    allowed = nwin >= W ? W : W - nwin;
    return k < allowed ? k : allowed;
}

static void attend_fp32(llama_state *s, uint32_t l, size_t first, size_t n) {
    const llama_hparams *hp = &s->m->hp;
    uint32_t Hq = hp->n_heads, Hkv = hp->n_kv_heads, d = hp->head_dim;
    size_t kd = (size_t)Hkv * d;
    const float *K = s->k_cache + (size_t)l * s->max_ctx * kd;
    const float *V = s->v_cache + (size_t)l * s->max_ctx * kd;
    float scale = 1.0f / sqrtf((float)d);
    long th;
    /* th runs over (batch token t in [first, first+n), query head h) */
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1)
#endif
    for (th = (long)(first * Hq); th < (long)((first + n) * Hq); th++) {
        size_t t = (size_t)th / Hq, j, npos = s->n_past + t + 1;
        uint32_t h = (uint32_t)((size_t)th % Hq), kvh = h * Hkv / Hq, i;
        const float *q = s->q + (t * Hq + h) * d;
        float *sc = s->scores + (size_t)th * s->max_ctx;
        float *o = s->att + (t * Hq + h) * d, mx = -INFINITY;
        double sum = 0.0;
        for (j = 0; j < npos; j++) {
            sc[j] = dot(q, K + j * kd + (size_t)kvh * d, d) * scale;
            if (sc[j] > mx) mx = sc[j];
        }
        for (j = 0; j < npos; j++) {
            sc[j] = expf(sc[j] - mx);
            sum += sc[j];
        }
        for (i = 0; i < d; i++) o[i] = 0.0f;
        for (j = 0; j < npos; j++) {
            const float *v = V + j * kd + (size_t)kvh * d;
            float w = (float)(sc[j] / sum);
            for (i = 0; i < d; i++) o[i] += w * v[i];
        }
    }
}

int llama_forward(llama_state *s, const int32_t *tokens, size_t n,
                  float *logits, size_t n_logits, char *err, size_t errlen) {
    const llama_model *m = s->m;
    const llama_hparams *hp = &m->hp;
    uint32_t Hq = hp->n_heads, Hkv = hp->n_kv_heads, d = hp->head_dim, l;
    size_t qd = (size_t)Hq * d, kd = (size_t)Hkv * d, t, i;
    int32_t pos[4096];
    if (n == 0 || n > s->max_batch || n > 4096 || n_logits > n) {
        merr(err, errlen, "bad batch size %zu", n);
        return -1;
    }
    if (s->kind == KV_FP32 && s->n_past + n > s->max_ctx) {
        merr(err, errlen, "context full (%u tokens)", s->max_ctx);
        return -1;
    }
    for (t = 0; t < n; t++) {
        if (tokens[t] < 0 || (uint32_t)tokens[t] >= hp->n_vocab) {
            merr(err, errlen, "token id %d out of range", tokens[t]);
            return -1;
        }
        mm_dequant_row(&m->tok_embd, (uint32_t)tokens[t], s->x + t * hp->dim);
        pos[t] = (int32_t)(s->n_past + t);
    }
    for (l = 0; l < hp->n_layers; l++) {
        const layer_weights *L = &m->layers[l];
        for (t = 0; t < n; t++)
            rmsnorm(s->xn + t * hp->dim, s->x + t * hp->dim, L->attn_norm, hp->dim, hp->rms_eps);
        if (matmul(s->q, &L->wq, s->xn, n) || matmul(s->k, &L->wk, s->xn, n) ||
            matmul(s->v, &L->wv, s->xn, n))
            goto oom;
        if (s->hook) s->hook(s->hook_user, l, n, s->q, s->k, s->v);
        if (s->kind == KV_FP32) {
            size_t base = ((size_t)l * s->max_ctx + s->n_past) * kd;
            for (t = 0; t < n; t++) {
                uint32_t h;
                for (h = 0; h < Hq; h++) rope_head(s->q + t * qd + (size_t)h * d, d, pos[t], m->rope_theta);
                for (h = 0; h < Hkv; h++) rope_head(s->k + t * kd + (size_t)h * d, d, pos[t], m->rope_theta);
            }
            memcpy(s->k_cache + base, s->k, sizeof(float) * n * kd);
            memcpy(s->v_cache + base, s->v, sizeof(float) * n * kd);
            if (!s->kvq) {
                attend_fp32(s, l, 0, n);
            } else {
                /* Emulated format: the same sub-batches and flush points as
                 * the commvq cache below. Tokens [0, C(N)) of N are
                 * quantized, C(N) = floor((N-1)/W)*W (W = 0: C(N) = N). */
                size_t done = 0, W = s->window;
                while (done < n) {
                    size_t N0 = s->n_past + done, k = sub_batch(N0, n - done, W);
                    size_t c0 = compressed_of(N0, W), c1 = compressed_of(N0 + k, W);
                    if (c1 > c0) {
                        size_t off = ((size_t)l * s->max_ctx + c0) * kd;
                        if (s->kvq(s->kvq_user, l, c1 - c0, s->k_cache + off, s->v_cache + off)) {
                            merr(err, errlen, "KV quantizer failed (layer %u)", l);
                            return -1;
                        }
                    }
                    attend_fp32(s, l, done, k);
                    done += k;
                }
            }
        } else {
            /* Token-by-token semantics with batched calls: a query must not
             * see a token compressed by an append that, decoding one token
             * at a time, would only happen after that query. The cache
             * compresses its window (W tokens) when a token arrives and the
             * window is full, so a sub-batch may start with such an arrival
             * but then only append until the window is full again. With
             * W = 0 every token is compressed on arrival: any batch is
             * exact. */
            size_t done = 0;
            while (done < n) {
                size_t k = sub_batch(s->n_past + done, n - done, s->window);
                cvq_status st = cvq_cache_append(s->caches[l], s->k + done * kd, s->v + done * kd,
                                          CVQ_F32, pos + done, k);
                if (st == CVQ_OK)
                    st = cvq_cache_attend(s->caches[l], s->q + done * qd, pos + done, k, 0,
                                          s->att + done * qd);
                if (st != CVQ_OK) {
                    merr(err, errlen, "commvq cache (layer %u): %s: %s", l,
                         cvq_status_name(st), cvq_last_error());
                    return -1;
                }
                done += k;
            }
        }
        if (matmul(s->xn, &L->wo, s->att, n)) goto oom;
        for (i = 0; i < n * hp->dim; i++) s->x[i] += s->xn[i];
        for (t = 0; t < n; t++)
            rmsnorm(s->xn + t * hp->dim, s->x + t * hp->dim, L->ffn_norm, hp->dim, hp->rms_eps);
        if (matmul(s->hb, &L->w_gate, s->xn, n) || matmul(s->hb2, &L->w_up, s->xn, n))
            goto oom;
        for (i = 0; i < n * hp->ffn_dim; i++) {
            float g = s->hb[i];
            s->hb[i] = g / (1.0f + expf(-g)) * s->hb2[i]; /* SiLU(gate) * up */
        }
        if (matmul(s->xn, &L->w_down, s->hb, n)) goto oom;
        for (i = 0; i < n * hp->dim; i++) s->x[i] += s->xn[i];
    }
    s->n_past += (uint32_t)n;
    if (logits && n_logits) {
        size_t first = n - n_logits;
        for (t = 0; t < n_logits; t++)
            rmsnorm(s->xn + t * hp->dim, s->x + (first + t) * hp->dim, m->output_norm,
                    hp->dim, hp->rms_eps);
        if (matmul(logits, &m->output, s->xn, n_logits)) goto oom;
    }
    return 0;
oom:
    merr(err, errlen, "out of memory in a matrix product");
    return -1;
}
