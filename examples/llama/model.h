/*
 * LLaMA-architecture forward pass over GGUF weights (llama.cpp's layout:
 * token_embd, blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,
 * ffn_gate,ffn_up,ffn_down}, output_norm, output (or tied to token_embd)).
 *
 * llama.cpp's converter permutes the rows of attn_q / attn_k so that RoPE
 * pairs are interleaved, (x[2p], x[2p+1]) rotated by pos * base^(-2p/d):
 * this program applies RoPE that way, and its dumped keys and queries (and
 * a commvq geometry for it) use CVQ_PAIRS_INTERLEAVED.
 *
 * The KV cache is either plain fp32 (keys stored after RoPE) or one commvq
 * cache per layer, which takes keys and queries before RoPE with their
 * positions and applies RoPE itself.
 */
#ifndef COMMVQ_EXAMPLE_MODEL_H
#define COMMVQ_EXAMPLE_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "commvq.h"
#include "gguf.h"

typedef struct weight {
    const uint8_t *data;
    uint32_t type;      /* ggml type: F32, F16, BF16, Q8_0, Q4_1 */
    uint32_t rows, cols;
    size_t row_bytes;
} weight;

typedef struct layer_weights {
    const float *attn_norm, *ffn_norm;
    weight wq, wk, wv, wo, w_gate, w_up, w_down;
} layer_weights;

typedef struct llama_hparams {
    uint32_t n_layers, dim, n_heads, n_kv_heads, head_dim, ffn_dim, n_vocab;
    uint32_t ctx_train;
    float rms_eps, rope_base;
} llama_hparams;

typedef struct llama_model {
    llama_hparams hp;
    weight tok_embd, output;
    const float *output_norm;
    layer_weights *layers;
    double *rope_theta; /* head_dim/2 */
    float *norms;       /* copies of the norm weights (the pointers above) */
} llama_model;

int llama_load(const gguf_file *f, llama_model *m, char *err, size_t errlen);
void llama_free(llama_model *m);

/* Hook called for every layer of every forward call with the projections
 * before RoPE: q [n][Hq*d], k and v [n][Hkv*d] (fp32). */
typedef void (*llama_qkv_hook)(void *user, uint32_t layer, size_t n,
                               const float *q, const float *k, const float *v);

typedef enum kv_kind { KV_FP32 = 0, KV_COMMVQ = 1 } kv_kind;

/* Emulates another KV format on the fp32 cache (bench/quality's baselines):
 * called with each block of n tokens of layer `layer` that leaves the
 * full-precision window, exactly when a commvq cache with the same window
 * would compress it (window W > 0: the W oldest window tokens, once a token
 * arrives to a full window; W = 0: every token on arrival). k and v are
 * [n][Hkv*d] rows of the cache (keys after RoPE, as the cache stores them),
 * quantized and dequantized in place. Returns 0, or -1 to fail the call. */
typedef int (*llama_kv_quantizer)(void *user, uint32_t layer, size_t n, float *k,
                                  float *v);

typedef struct llama_state {
    const llama_model *m;
    kv_kind kind;
    uint32_t max_ctx;      /* fp32 cache capacity (tokens) */
    uint32_t n_past;       /* tokens in the cache; next position */
    float *k_cache, *v_cache; /* fp32: [L][max_ctx][Hkv*d], keys rotated */
    cvq_cache **caches;    /* commvq: one per layer */
    uint32_t window;       /* commvq, or fp32 with kvq: full-precision window W */
    llama_kv_quantizer kvq;/* fp32 only: optional, set after init (NULL: exact) */
    void *kvq_user;
    llama_qkv_hook hook;
    void *hook_user;
    /* scratch, sized for max_batch tokens */
    uint32_t max_batch;
    float *x, *xn, *q, *k, *v, *att, *hb, *hb2, *scores;
} llama_state;

/* An fp32 state (ctx, cb NULL) or a commvq state (caches created from ctx,
 * cb with window W). */
int llama_state_init(llama_state *s, const llama_model *m, kv_kind kind,
                     uint32_t max_ctx, uint32_t max_batch, cvq_context *ctx,
                     const cvq_codebook *cb, uint32_t window, char *err,
                     size_t errlen);
void llama_state_free(llama_state *s);
/* Forgets every token. */
int llama_state_reset(llama_state *s, char *err, size_t errlen);
/* Makes dst hold src's tokens (a fork: later calls on either do not affect
 * the other). dst was initialised for the same model and KV kind (commvq:
 * its caches are replaced by cvq_cache_copy of src's; fp32: max_ctx large
 * enough). Used to share a long prefix between evaluation trials. */
int llama_state_copy(llama_state *dst, const llama_state *src, char *err, size_t errlen);

/* Runs n tokens (n <= max_batch) at positions n_past.. and appends them to
 * the cache. logits (may be NULL) receives [n_logits][n_vocab] for the
 * last n_logits tokens (n_logits <= n). */
int llama_forward(llama_state *s, const int32_t *tokens, size_t n,
                  float *logits, size_t n_logits, char *err, size_t errlen);

/* Bytes the cache holds for its tokens (fp32: keys and values at 4 bytes;
 * commvq: compressed records + full-precision window and sinks). */
uint64_t llama_kv_bytes(const llama_state *s);
/* commvq: the per-layer statistics, token counts of one layer and bytes
 * summed over the layers; -1 for an fp32 state. */
int llama_kv_detail(const llama_state *s, cvq_cache_stats *sum);

#endif
