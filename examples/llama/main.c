/*
 * commvq-llama: a small inference program for LLaMA-architecture GGUF
 * models whose KV cache is plain fp32 or commvq.
 *
 *   commvq-llama [options] generate            stream an answer to -p
 *   commvq-llama [options] perplexity FILE     teacher-forced perplexity
 *   commvq-llama [options] dump DIR FILE...    q/k/v before RoPE for training
 *   commvq-llama [options] logits              logits of --tokens (or -p) to
 *                                              --dump-logits FILE (.npy)
 *   commvq-llama [options] tokenize            token ids of -p (or --file)
 *
 * Run without arguments for the options.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "commvq.h"
#include "gguf.h"
#include "matmul.h"
#include "model.h"
#include "npy.h"
#include "tokenizer.h"

#define DEFAULT_PROMPT "What is the capital of France, and what is it famous for? Answer in three sentences."
#define SMOL_SYSTEM "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

typedef struct options {
    const char *model, *prompt, *kv, *codebook, *backend, *dump_logits, *tokens, *file;
    const char *system;
    int n_predict, raw, threads, window, ctx, chunks, batch, max_tokens;
    double temp;
    unsigned long long seed;
} options;

static void usage(void) {
    fprintf(stderr,
        "usage: commvq-llama [options] MODE [args]\n"
        "modes:\n"
        "  generate               answer -p (chat template unless --raw), streaming\n"
        "  perplexity FILE        perplexity over FILE in chunks of --ctx tokens\n"
        "  dump DIR FILE...       per layer q_N/k_N/v_N.npy (fp16, before RoPE), pos.npy,\n"
        "                         seq_start.npy; each FILE one sequence (--max-tokens)\n"
        "  logits                 logits of every input token to --dump-logits F.npy\n"
        "  tokenize               print the token ids of -p (or --file)\n"
        "options:\n"
        "  -m, --model F          GGUF model (default: $COMMVQ_MODEL; see scripts/fetch-model.sh)\n"
        "  -p, --prompt TEXT      prompt (default: a built-in question)\n"
        "  --system TEXT          system message of the chat template\n"
        "  --raw                  no chat template (special tokens still parsed)\n"
        "  -n N                   tokens to generate (default 128)\n"
        "  --temp T --seed S      sampling temperature (default 0: greedy) and seed\n"
        "  --kv fp32|commvq       KV cache (default fp32)\n"
        "  --codebook F|random[:R:Nc]  commvq codebook file, or a random one with R key\n"
        "                         stages and Nc value bits (default random:11:384, ~2 bits)\n"
        "  --backend B            commvq backend: auto, cpu, vulkan, cuda (default auto)\n"
        "  --window W             commvq full-precision window (default 128)\n"
        "  --threads N            OpenMP threads for the model (default: all)\n"
        "  --ctx N                perplexity chunk length (default 512)\n"
        "  --chunks K             at most K perplexity chunks (default: all)\n"
        "  --batch B              tokens per forward call (default 32; 1 = token by token)\n"
        "  --max-tokens N         dump: tokens per sequence (default 2048)\n"
        "  --tokens 1,2,3         logits: token ids instead of -p\n"
        "  --file F               tokenize/logits: read the text from F\n"
        "  --dump-logits F        logits: output .npy [n][vocab] float32\n");
}

static double now_s(void) {
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int read_text(const char *path, char **out, size_t *len) {
    FILE *f = fopen(path, "rb");
    long n;
    char *b;
    if (!f) {
        fprintf(stderr, "error: %s: %s\n", path, strerror(errno));
        return -1;
    }
    if (fseek(f, 0, SEEK_END) || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET)) {
        fclose(f);
        fprintf(stderr, "error: %s: cannot size\n", path);
        return -1;
    }
    b = (char *)malloc((size_t)n + 1);
    if (!b || (n && fread(b, 1, (size_t)n, f) != (size_t)n)) {
        fclose(f);
        free(b);
        fprintf(stderr, "error: %s: read failed\n", path);
        return -1;
    }
    fclose(f);
    b[n] = '\0';
    *out = b;
    *len = (size_t)n;
    return 0;
}

static int parse_int(const char *s, const char *name, int lo, int *out) {
    char *end;
    long v;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > 1000000000L) {
        fprintf(stderr, "error: %s: bad value '%s'\n", name, s);
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* splitmix64 for sampling */
static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

static int32_t pick(const float *logits, uint32_t n, double temp, uint64_t *rng) {
    uint32_t i, best = 0;
    double sum = 0.0, u, acc = 0.0;
    for (i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    if (temp <= 0.0) return (int32_t)best;
    for (i = 0; i < n; i++) sum += exp((logits[i] - logits[best]) / temp);
    u = (double)(rng_next(rng) >> 11) * (1.0 / 9007199254740992.0) * sum;
    for (i = 0; i < n; i++) {
        acc += exp((logits[i] - logits[best]) / temp);
        if (acc >= u) return (int32_t)i;
    }
    return (int32_t)best;
}

/* ---- the commvq side -------------------------------------------------------------- */

typedef struct kv_setup {
    cvq_context *ctx;
    cvq_codebook *cb;
    char desc[256];
} kv_setup;

static int setup_commvq(const options *o, const llama_model *m, kv_setup *ks) {
    const llama_hparams *hp = &m->hp;
    cvq_context_params cp = cvq_context_default_params();
    cvq_device_info dev;
    cvq_geometry g;
    cvq_status st;
    char note[64] = "";
    if (cvq_backend_from_name(o->backend, &cp.backend) != CVQ_OK) {
        fprintf(stderr, "error: unknown backend '%s'\n", o->backend);
        return -1;
    }
    st = cvq_context_create(&cp, &ks->ctx);
    if (st != CVQ_OK) {
        fprintf(stderr, "error: backend %s: %s: %s\n", o->backend, cvq_status_name(st),
                cvq_last_error());
        return -1;
    }
    if (strncmp(o->codebook, "random", 6) == 0) {
        unsigned R = 11, Nc = 384;
        if (o->codebook[6] == ':' && sscanf(o->codebook + 7, "%u:%u", &R, &Nc) != 2) {
            fprintf(stderr, "error: --codebook random:R:Nc expected, got '%s'\n", o->codebook);
            return -1;
        }
        memset(&g, 0, sizeof g);
        g.n_layers = hp->n_layers;
        g.n_q_heads = hp->n_heads;
        g.n_kv_heads = hp->n_kv_heads;
        g.head_dim = hp->head_dim;
        g.key_stages = R;
        g.key_scale = CVQ_KEY_SCALE_TOKEN;
        g.pair_layout = CVQ_PAIRS_INTERLEAVED; /* GGUF's permuted Q/K rows */
        g.value_bits = Nc;
        st = cvq_geometry_resolve(&g);
        if (st == CVQ_OK) st = cvq_codebook_random(&g, m->rope_theta, o->seed, NULL, &ks->cb);
        if (st != CVQ_OK) {
            fprintf(stderr, "error: random codebook: %s: %s\n", cvq_status_name(st),
                    cvq_last_error());
            return -1;
        }
        snprintf(note, sizeof note, " (RANDOM: quality meaningless)");
    } else {
        double *theta;
        uint32_t p;
        st = cvq_codebook_load(o->codebook, NULL, &ks->cb);
        if (st != CVQ_OK) {
            fprintf(stderr, "error: %s: %s: %s\n", o->codebook, cvq_status_name(st),
                    cvq_last_error());
            return -1;
        }
        cvq_codebook_geometry(ks->cb, &g);
        if (g.n_layers != hp->n_layers || g.n_q_heads != hp->n_heads ||
            g.n_kv_heads != hp->n_kv_heads || g.head_dim != hp->head_dim) {
            fprintf(stderr, "error: codebook %s is for L=%u Hq=%u Hkv=%u d=%u, the model has "
                    "L=%u Hq=%u Hkv=%u d=%u\n", o->codebook, g.n_layers, g.n_q_heads,
                    g.n_kv_heads, g.head_dim, hp->n_layers, hp->n_heads, hp->n_kv_heads,
                    hp->head_dim);
            return -1;
        }
        if (g.pair_layout != CVQ_PAIRS_INTERLEAVED) {
            fprintf(stderr, "error: codebook %s uses rotate_half RoPE pairs; GGUF models "
                    "need interleaved pairs\n", o->codebook);
            return -1;
        }
        theta = (double *)malloc(sizeof(double) * hp->head_dim / 2);
        if (!theta) return -1;
        cvq_codebook_rope_theta(ks->cb, theta);
        for (p = 0; p < hp->head_dim / 2; p++)
            if (fabs(theta[p] - m->rope_theta[p]) > 1e-9 * fabs(m->rope_theta[p])) {
                fprintf(stderr, "error: codebook %s has RoPE theta[%u] = %g, the model %g\n",
                        o->codebook, p, theta[p], m->rope_theta[p]);
                free(theta);
                return -1;
            }
        free(theta);
    }
    {
        cvq_record_layout rl;
        cvq_record_layout_of(&g, &rl);
        cvq_context_device(ks->ctx, &dev);
        snprintf(ks->desc, sizeof ks->desc,
                 "commvq, backend %s (%s), R=%u Nc=%u, %.3f bits/element, window %d%s",
                 cvq_backend_name(cvq_context_backend(ks->ctx)), dev.name, g.key_stages,
                 g.value_bits, rl.bits_per_element, o->window, note);
    }
    return 0;
}

static int make_state(const options *o, const llama_model *m, uint32_t max_ctx,
                      llama_state *s, kv_setup *ks) {
    char err[512];
    kv_kind kind;
    memset(ks, 0, sizeof *ks);
    if (strcmp(o->kv, "fp32") == 0) {
        kind = KV_FP32;
        snprintf(ks->desc, sizeof ks->desc, "fp32 (model on the CPU, %s kernels)", mm_kernel_name());
    } else if (strcmp(o->kv, "commvq") == 0) {
        kind = KV_COMMVQ;
        if (setup_commvq(o, m, ks)) return -1;
    } else {
        fprintf(stderr, "error: --kv must be fp32 or commvq\n");
        return -1;
    }
    if (llama_state_init(s, m, kind, max_ctx, (uint32_t)o->batch, ks->ctx, ks->cb,
                         (uint32_t)o->window, err, sizeof err)) {
        fprintf(stderr, "error: %s\n", err);
        return -1;
    }
    return 0;
}

static void free_setup(kv_setup *ks) {
    cvq_codebook_free(ks->cb);
    cvq_context_free(ks->ctx);
}

/* ---- modes -------------------------------------------------------------------- */

static int build_prompt(const options *o, char **out) {
    size_t n;
    char *b;
    if (o->raw) {
        n = strlen(o->prompt) + 1;
        b = (char *)malloc(n);
        if (!b) return -1;
        memcpy(b, o->prompt, n);
    } else {
        n = strlen(o->prompt) + strlen(o->system) + 128;
        b = (char *)malloc(n);
        if (!b) return -1;
        snprintf(b, n, "<|im_start|>system\n%s<|im_end|>\n<|im_start|>user\n%s<|im_end|>\n"
                 "<|im_start|>assistant\n", o->system, o->prompt);
    }
    *out = b;
    return 0;
}

static int run_tokens(llama_state *s, const int32_t *ids, size_t n, float *logits,
                      int want_all) {
    char err[512];
    size_t i, B = s->max_batch, vocab = s->m->hp.n_vocab;
    for (i = 0; i < n; i += B) {
        size_t k = n - i < B ? n - i : B;
        float *lg = logits ? (want_all ? logits + i * vocab : logits) : NULL;
        size_t nl = logits ? (want_all ? k : (i + k == n ? 1 : 0)) : 0;
        if (llama_forward(s, ids + i, k, nl ? lg : NULL, nl, err, sizeof err)) {
            fprintf(stderr, "error: %s\n", err);
            return -1;
        }
    }
    return 0;
}

static int mode_generate(const options *o, const llama_model *m, const tokenizer *tk) {
    char *text = NULL, err[512], buf[256];
    int32_t *ids = NULL, next;
    size_t n = 0;
    float *logits = NULL;
    llama_state s;
    kv_setup ks;
    int rc = 1, produced = 0, k;
    uint64_t rng = o->seed;
    double t0, t1, t2;
    uint64_t kvb, fp16b;
    if (build_prompt(o, &text) ||
        tokenizer_encode(tk, text, strlen(text), 1, &ids, &n, err, sizeof err)) {
        fprintf(stderr, "error: tokenizing the prompt: %s\n", err);
        free(text);
        return 1;
    }
    if (n == 0) {
        fprintf(stderr, "error: empty prompt\n");
        goto done0;
    }
    if (make_state(o, m, (uint32_t)(n + (size_t)o->n_predict + 1), &s, &ks)) goto done0;
    logits = (float *)malloc(sizeof(float) * m->hp.n_vocab);
    if (!logits) goto done;
    fprintf(stderr, "prompt: %zu tokens; KV cache: %s\n", n, ks.desc);
    if (n + (size_t)o->n_predict > m->hp.ctx_train)
        fprintf(stderr, "warning: %zu tokens exceed the model's training context (%u)\n",
                n + (size_t)o->n_predict, m->hp.ctx_train);
    t0 = now_s();
    if (run_tokens(&s, ids, n, logits, 0)) goto done;
    t1 = now_s();
    for (k = 0; k < o->n_predict; k++) {
        next = pick(logits, m->hp.n_vocab, o->temp, &rng);
        if (next == tokenizer_eos(tk) || tokenizer_is_control(tk, next)) break;
        {
            int len = tokenizer_decode(tk, next, buf, sizeof buf);
            if (len > 0) fwrite(buf, 1, (size_t)(len < (int)sizeof buf ? len : (int)sizeof buf), stdout);
            fflush(stdout);
        }
        produced++;
        if (k + 1 == o->n_predict) break;
        if (llama_forward(&s, &next, 1, logits, 1, err, sizeof err)) {
            fprintf(stderr, "\nerror: %s\n", err);
            goto done;
        }
    }
    t2 = now_s();
    printf("\n");
    kvb = llama_kv_bytes(&s);
    fp16b = (uint64_t)2 * m->hp.n_layers * s.n_past * m->hp.n_kv_heads * m->hp.head_dim * 2;
    fprintf(stderr,
            "\n[prompt %zu tokens at %.1f tokens/s; generated %d tokens at %.1f tokens/s]\n"
            "[KV cache: %s]\n[KV bytes: %llu for %u tokens, FP16 would take %llu (%.1f%%)]\n",
            n, n / (t1 - t0), produced, produced > 1 ? (produced - 1) / (t2 - t1) : 0.0,
            ks.desc, (unsigned long long)kvb, s.n_past, (unsigned long long)fp16b,
            fp16b ? 100.0 * (double)kvb / (double)fp16b : 0.0);
    {
        cvq_cache_stats cs;
        if (llama_kv_detail(&s, &cs) == 0)
            fprintf(stderr, "[commvq: %llu tokens compressed in %llu bytes (%.3f bits/element), "
                    "%llu in the fp32 window (%llu bytes)]\n",
                    (unsigned long long)cs.n_compressed, (unsigned long long)cs.bytes_compressed,
                    cs.bits_per_element, (unsigned long long)(cs.n_window + cs.n_sink),
                    (unsigned long long)cs.bytes_full);
    }
    rc = 0;
done:
    free(logits);
    llama_state_free(&s);
    free_setup(&ks);
done0:
    free(ids);
    free(text);
    return rc;
}

static int mode_perplexity(const options *o, const llama_model *m, const tokenizer *tk,
                           const char *path) {
    char *text = NULL, err[512];
    int32_t *ids = NULL;
    size_t n = 0, C = (size_t)o->ctx, nchunks, c, i, scored = 0;
    size_t vocab = m->hp.n_vocab;
    float *logits = NULL;
    double nll = 0.0, t0, t1;
    llama_state s;
    kv_setup ks;
    int rc = 1;
    size_t len;
    if (read_text(path, &text, &len)) return 1;
    if (tokenizer_encode(tk, text, len, 0, &ids, &n, err, sizeof err)) {
        fprintf(stderr, "error: %s\n", err);
        goto done0;
    }
    nchunks = n / C;
    if (o->chunks > 0 && (size_t)o->chunks < nchunks) nchunks = (size_t)o->chunks;
    if (nchunks == 0) {
        fprintf(stderr, "error: %s has %zu tokens, fewer than --ctx %zu\n", path, n, C);
        goto done0;
    }
    if (make_state(o, m, (uint32_t)C, &s, &ks)) goto done0;
    logits = (float *)malloc(sizeof(float) * vocab * (size_t)o->batch);
    if (!logits) goto done;
    fprintf(stderr, "%s: %zu tokens; %zu chunks of %zu; KV cache: %s\n", path, n, nchunks,
            C, ks.desc);
    if (C > m->hp.ctx_train)
        fprintf(stderr, "warning: --ctx %zu exceeds the model's training context (%u)\n", C,
                m->hp.ctx_train);
    t0 = now_s();
    for (c = 0; c < nchunks; c++) {
        const int32_t *ch = ids + c * C;
        if (llama_state_reset(&s, err, sizeof err)) {
            fprintf(stderr, "error: %s\n", err);
            goto done;
        }
        for (i = 0; i < C; i += (size_t)o->batch) {
            size_t k = C - i < (size_t)o->batch ? C - i : (size_t)o->batch, t;
            if (llama_forward(&s, ch + i, k, logits, k, err, sizeof err)) {
                fprintf(stderr, "error: %s\n", err);
                goto done;
            }
            /* logits of token i+t predict token i+t+1 */
            for (t = 0; t < k && i + t + 1 < C; t++) {
                const float *lg = logits + t * vocab;
                double mx = lg[0], se = 0.0;
                size_t v;
                for (v = 1; v < vocab; v++)
                    if (lg[v] > mx) mx = lg[v];
                for (v = 0; v < vocab; v++) se += exp(lg[v] - mx);
                nll += mx + log(se) - lg[ch[i + t + 1]];
                scored++;
            }
        }
        fprintf(stderr, "  chunk %zu/%zu: running perplexity %.4f\n", c + 1, nchunks,
                exp(nll / (double)scored));
    }
    t1 = now_s();
    printf("perplexity %.4f over %zu scored tokens (%zu chunks of %zu, kv %s) %.1f tokens/s\n",
           exp(nll / (double)scored), scored, nchunks, C, o->kv,
           (double)(nchunks * C) / (t1 - t0));
    rc = 0;
done:
    free(logits);
    llama_state_free(&s);
    free_setup(&ks);
done0:
    free(ids);
    free(text);
    return rc;
}

/* dump: streams fp16 rows of every layer's q, k, v into open .npy files */
typedef struct dump_ctx {
    FILE **fq, **fk, **fv;
    uint32_t qd, kd;
    uint16_t *tmp;
    int failed;
} dump_ctx;

static void write_f16(FILE *f, const float *x, size_t n, uint16_t *tmp, int *failed) {
    size_t i;
    unsigned char *b = (unsigned char *)tmp;
    for (i = 0; i < n; i++) {
        uint16_t h = cvq_f32_to_f16(x[i]);
        b[2 * i] = (unsigned char)(h & 0xff); /* little-endian on any host */
        b[2 * i + 1] = (unsigned char)(h >> 8);
    }
    if (fwrite(tmp, 2, n, f) != n) *failed = 1;
}

static void dump_hook(void *user, uint32_t layer, size_t n, const float *q, const float *k,
                      const float *v) {
    dump_ctx *d = (dump_ctx *)user;
    write_f16(d->fq[layer], q, n * d->qd, d->tmp, &d->failed);
    write_f16(d->fk[layer], k, n * d->kd, d->tmp, &d->failed);
    write_f16(d->fv[layer], v, n * d->kd, d->tmp, &d->failed);
}

static FILE *open_npy(const char *dir, const char *name, npy_dtype dt, uint32_t nd,
                      const uint64_t *shape) {
    char path[4096], hdr[512];
    size_t hl = npy_format_header(dt, nd, shape, hdr, sizeof hdr);
    FILE *f;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "error: %s: %s\n", path, strerror(errno));
        return NULL;
    }
    if (hl == 0 || fwrite(hdr, 1, hl, f) != hl) {
        fprintf(stderr, "error: %s: cannot write the header\n", path);
        fclose(f);
        return NULL;
    }
    return f;
}

static int mode_dump(const options *o, const llama_model *m, const tokenizer *tk,
                     const char *dir, char **files, int nfiles) {
    const llama_hparams *hp = &m->hp;
    int32_t **ids = NULL, *pos = NULL, *starts = NULL;
    size_t *counts = NULL, T = 0, t;
    uint32_t L = hp->n_layers, l;
    dump_ctx d;
    llama_state s;
    kv_setup ks;
    char err[512], path[4096];
    int rc = 1, i;
    memset(&d, 0, sizeof d);
    memset(&s, 0, sizeof s);
    memset(&ks, 0, sizeof ks);
    ids = (int32_t **)calloc((size_t)nfiles, sizeof(int32_t *));
    counts = (size_t *)calloc((size_t)nfiles, sizeof(size_t));
    starts = (int32_t *)calloc((size_t)nfiles, sizeof(int32_t));
    d.fq = (FILE **)calloc(L, sizeof(FILE *));
    d.fk = (FILE **)calloc(L, sizeof(FILE *));
    d.fv = (FILE **)calloc(L, sizeof(FILE *));
    if (!ids || !counts || !starts || !d.fq || !d.fk || !d.fv) goto done;
    for (i = 0; i < nfiles; i++) {
        char *text;
        size_t len;
        if (read_text(files[i], &text, &len)) goto done;
        if (tokenizer_encode(tk, text, len, 0, &ids[i], &counts[i], err, sizeof err)) {
            fprintf(stderr, "error: %s: %s\n", files[i], err);
            free(text);
            goto done;
        }
        free(text);
        if (counts[i] > (size_t)o->max_tokens) counts[i] = (size_t)o->max_tokens;
        starts[i] = (int32_t)T;
        T += counts[i];
    }
    if (T == 0 || T > INT32_MAX) {
        fprintf(stderr, "error: %zu tokens to dump\n", T);
        goto done;
    }
    pos = (int32_t *)malloc(sizeof(int32_t) * T);
    d.qd = hp->n_heads * hp->head_dim;
    d.kd = hp->n_kv_heads * hp->head_dim;
    d.tmp = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)o->batch * d.qd);
    if (!pos || !d.tmp) goto done;
    for (i = 0; i < nfiles; i++)
        for (t = 0; t < counts[i]; t++) pos[(size_t)starts[i] + t] = (int32_t)t;
    for (l = 0; l < L; l++) {
        uint64_t sq[3] = {T, hp->n_heads, hp->head_dim}, sk[3] = {T, hp->n_kv_heads, hp->head_dim};
        char nm[64];
        snprintf(nm, sizeof nm, "q_%u.npy", l);
        if (!(d.fq[l] = open_npy(dir, nm, NPY_F2, 3, sq))) goto done;
        snprintf(nm, sizeof nm, "k_%u.npy", l);
        if (!(d.fk[l] = open_npy(dir, nm, NPY_F2, 3, sk))) goto done;
        snprintf(nm, sizeof nm, "v_%u.npy", l);
        if (!(d.fv[l] = open_npy(dir, nm, NPY_F2, 3, sk))) goto done;
    }
    {
        options o2 = *o;
        size_t mx = 1;
        for (i = 0; i < nfiles; i++)
            if (counts[i] > mx) mx = counts[i];
        o2.kv = "fp32"; /* the activations of the exact model */
        if (make_state(&o2, m, (uint32_t)mx, &s, &ks)) goto done;
    }
    s.hook = dump_hook;
    s.hook_user = &d;
    for (i = 0; i < nfiles; i++) {
        if (llama_state_reset(&s, err, sizeof err) || run_tokens(&s, ids[i], counts[i], NULL, 0))
            goto done;
        fprintf(stderr, "  %s: %zu tokens\n", files[i], counts[i]);
        if (d.failed) {
            fprintf(stderr, "error: write failed in %s\n", dir);
            goto done;
        }
    }
    {
        uint64_t sp[1] = {T}, ss[1] = {(uint64_t)nfiles};
        char e2[512];
        snprintf(path, sizeof path, "%s/pos.npy", dir);
        if (npy_save(path, NPY_I4, 1, sp, pos, e2, sizeof e2)) {
            fprintf(stderr, "error: %s\n", e2);
            goto done;
        }
        snprintf(path, sizeof path, "%s/seq_start.npy", dir);
        if (npy_save(path, NPY_I4, 1, ss, starts, e2, sizeof e2)) {
            fprintf(stderr, "error: %s\n", e2);
            goto done;
        }
    }
    {
        FILE *f;
        snprintf(path, sizeof path, "%s/meta.txt", dir);
        f = fopen(path, "w");
        if (f) {
            fprintf(f, "n_layers %u\nn_q_heads %u\nn_kv_heads %u\nhead_dim %u\nrope_base %.1f\n"
                    "pair_layout interleaved\ntokens %zu\nsequences %d\n", L, hp->n_heads,
                    hp->n_kv_heads, hp->head_dim, (double)hp->rope_base, T, nfiles);
            fclose(f);
        }
    }
    rc = 0;
    fprintf(stderr, "dumped %zu tokens of %d sequences, %u layers, to %s\n", T, nfiles, L, dir);
done:
    for (l = 0; d.fq && l < L; l++) {
        if (d.fq[l] && fclose(d.fq[l])) rc = 1;
        if (d.fk[l] && fclose(d.fk[l])) rc = 1;
        if (d.fv[l] && fclose(d.fv[l])) rc = 1;
    }
    if (ids)
        for (i = 0; i < nfiles; i++) free(ids[i]);
    free(ids);
    free(counts);
    free(starts);
    free(pos);
    free(d.fq);
    free(d.fk);
    free(d.fv);
    free(d.tmp);
    llama_state_free(&s);
    free_setup(&ks);
    return rc;
}

static int input_ids(const options *o, const tokenizer *tk, int32_t **ids, size_t *n) {
    char err[512];
    if (o->tokens) {
        const char *p = o->tokens;
        size_t cap = 1;
        const char *q;
        for (q = p; *q; q++)
            if (*q == ',') cap++;
        *ids = (int32_t *)malloc(sizeof(int32_t) * cap);
        if (!*ids) return -1;
        *n = 0;
        while (*p) {
            char *end;
            long v = strtol(p, &end, 10);
            if (end == p || v < 0 || v > INT32_MAX) {
                fprintf(stderr, "error: --tokens: bad list\n");
                return -1;
            }
            (*ids)[(*n)++] = (int32_t)v;
            p = *end == ',' ? end + 1 : end;
            if (*end && *end != ',') {
                fprintf(stderr, "error: --tokens: bad list\n");
                return -1;
            }
        }
        return 0;
    }
    if (o->file) {
        char *text;
        size_t len;
        int r;
        if (read_text(o->file, &text, &len)) return -1;
        r = tokenizer_encode(tk, text, len, 0, ids, n, err, sizeof err);
        free(text);
        if (r) fprintf(stderr, "error: %s\n", err);
        return r;
    }
    if (tokenizer_encode(tk, o->prompt, strlen(o->prompt), 1, ids, n, err, sizeof err)) {
        fprintf(stderr, "error: %s\n", err);
        return -1;
    }
    return 0;
}

static int mode_logits(const options *o, const llama_model *m, const tokenizer *tk) {
    int32_t *ids = NULL;
    size_t n = 0;
    float *logits = NULL;
    llama_state s;
    kv_setup ks;
    int rc = 1;
    char err[512];
    if (!o->dump_logits) {
        fprintf(stderr, "error: logits needs --dump-logits FILE\n");
        return 1;
    }
    if (input_ids(o, tk, &ids, &n) || n == 0) goto done0;
    if (make_state(o, m, (uint32_t)n, &s, &ks)) goto done0;
    logits = (float *)malloc(sizeof(float) * n * m->hp.n_vocab);
    if (logits && run_tokens(&s, ids, n, logits, 1) == 0) {
        uint64_t shape[2] = {n, m->hp.n_vocab};
        if (npy_save(o->dump_logits, NPY_F4, 2, shape, logits, err, sizeof err))
            fprintf(stderr, "error: %s\n", err);
        else {
            fprintf(stderr, "wrote logits [%zu][%u] to %s (KV cache: %s)\n", n,
                    m->hp.n_vocab, o->dump_logits, ks.desc);
            rc = 0;
        }
    }
    free(logits);
    llama_state_free(&s);
    free_setup(&ks);
done0:
    free(ids);
    return rc;
}

static int mode_tokenize(const options *o, const tokenizer *tk) {
    int32_t *ids = NULL;
    size_t n = 0, i;
    if (input_ids(o, tk, &ids, &n)) {
        free(ids);
        return 1;
    }
    for (i = 0; i < n; i++) printf("%s%d", i ? "," : "", ids[i]);
    printf("\n");
    free(ids);
    return 0;
}

int main(int argc, char **argv) {
    options o;
    char *pos[4096];
    int npos = 0, i, rc;
    char err[512];
    gguf_file *gf = NULL;
    tokenizer *tk = NULL;
    llama_model m;
    memset(&o, 0, sizeof o);
    o.model = getenv("COMMVQ_MODEL");
    o.prompt = DEFAULT_PROMPT;
    o.system = SMOL_SYSTEM;
    o.kv = "fp32";
    o.codebook = "random";
    o.backend = "auto";
    o.n_predict = 128;
    o.window = 128;
    o.ctx = 512;
    o.batch = 32;
    o.max_tokens = 2048;
    o.seed = 1;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define VAL()                                                        \
        do {                                                         \
            if (!v) {                                                \
                fprintf(stderr, "error: %s needs a value\n", a);     \
                return 2;                                            \
            }                                                        \
            i++;                                                     \
        } while (0)
        if (!strcmp(a, "-m") || !strcmp(a, "--model")) { VAL(); o.model = v; }
        else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) { VAL(); o.prompt = v; }
        else if (!strcmp(a, "--system")) { VAL(); o.system = v; }
        else if (!strcmp(a, "--raw")) o.raw = 1;
        else if (!strcmp(a, "-n")) { VAL(); if (parse_int(v, a, 0, &o.n_predict)) return 2; }
        else if (!strcmp(a, "--temp")) { VAL(); o.temp = atof(v); }
        else if (!strcmp(a, "--seed")) { VAL(); o.seed = strtoull(v, NULL, 10); }
        else if (!strcmp(a, "--kv")) { VAL(); o.kv = v; }
        else if (!strcmp(a, "--codebook")) { VAL(); o.codebook = v; }
        else if (!strcmp(a, "--backend")) { VAL(); o.backend = v; }
        else if (!strcmp(a, "--window")) { VAL(); if (parse_int(v, a, 0, &o.window)) return 2; }
        else if (!strcmp(a, "--threads")) { VAL(); if (parse_int(v, a, 1, &o.threads)) return 2; }
        else if (!strcmp(a, "--ctx")) { VAL(); if (parse_int(v, a, 2, &o.ctx)) return 2; }
        else if (!strcmp(a, "--chunks")) { VAL(); if (parse_int(v, a, 1, &o.chunks)) return 2; }
        else if (!strcmp(a, "--batch")) { VAL(); if (parse_int(v, a, 1, &o.batch)) return 2; }
        else if (!strcmp(a, "--max-tokens")) { VAL(); if (parse_int(v, a, 1, &o.max_tokens)) return 2; }
        else if (!strcmp(a, "--tokens")) { VAL(); o.tokens = v; }
        else if (!strcmp(a, "--file")) { VAL(); o.file = v; }
        else if (!strcmp(a, "--dump-logits")) { VAL(); o.dump_logits = v; }
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(); return 0; }
        else if (a[0] == '-' && a[1] != '\0') {
            fprintf(stderr, "error: unknown option %s\n", a);
            usage();
            return 2;
        } else if (npos < (int)(sizeof pos / sizeof pos[0])) pos[npos++] = argv[i];
#undef VAL
    }
    if (npos == 0) {
        usage();
        return 2;
    }
    if (o.batch > 4096) o.batch = 4096;
    if (!o.model) {
        fprintf(stderr, "error: no model: pass -m FILE.gguf or set COMMVQ_MODEL "
                "(scripts/fetch-model.sh downloads SmolLM2-135M-Instruct)\n");
        return 2;
    }
#ifdef _OPENMP
    if (o.threads > 0) omp_set_num_threads(o.threads);
#endif
    if (gguf_open(o.model, &gf, err, sizeof err)) {
        fprintf(stderr, "error: %s\n", err);
        return 1;
    }
    if (llama_load(gf, &m, err, sizeof err) || tokenizer_load(gf, &tk, err, sizeof err)) {
        fprintf(stderr, "error: %s: %s\n", o.model, err);
        gguf_close(gf);
        return 1;
    }
    if (tokenizer_n_vocab(tk) != m.hp.n_vocab) {
        fprintf(stderr, "error: the tokenizer has %u tokens, the embedding %u\n",
                tokenizer_n_vocab(tk), m.hp.n_vocab);
        rc = 1;
    } else if (!strcmp(pos[0], "generate")) rc = mode_generate(&o, &m, tk);
    else if (!strcmp(pos[0], "perplexity") && npos == 2) rc = mode_perplexity(&o, &m, tk, pos[1]);
    else if (!strcmp(pos[0], "dump") && npos >= 3) rc = mode_dump(&o, &m, tk, pos[1], pos + 2, npos - 2);
    else if (!strcmp(pos[0], "logits")) rc = mode_logits(&o, &m, tk);
    else if (!strcmp(pos[0], "tokenize")) rc = mode_tokenize(&o, tk);
    else {
        fprintf(stderr, "error: bad mode or arguments '%s'\n", pos[0]);
        usage();
        rc = 2;
    }
    tokenizer_free(tk);
    llama_free(&m);
    gguf_close(gf);
    return rc;
}
