/*
 * commvq-quality: what KV compression costs a real model (bench/quality).
 *
 * SmolLM2-135M (examples/llama's forward pass) reads the held-out essays
 * with its KV cache in each setting:
 *   FP32      the exact cache
 *   CommVQ-2  the library's cache with the 2-bit codebook (--cb2)
 *   CommVQ-1  the same with the 1-bit codebook (--cb1)
 *   KIVI-2    asymmetric 2-bit, keys per channel / values per token, group 32
 *   q4_0      llama.cpp-style 4-bit blocks of 32 with an fp16 scale
 * Every setting keeps the same full-precision window (W = 128 most recent
 * tokens) and compresses at the same moments (baselines.h, model.h's
 * llama_kv_quantizer): token t reads tokens older than its window from the
 * compressed form. Decoding is teacher-forced, in batches that respect that
 * rule (bit-identical to one token at a time for the cache contents).
 *
 * Perplexity at context L: the held-out essays (file names sorting at or
 * after "l"), joined with blank lines, cut into consecutive chunks of L
 * tokens; each chunk starts from an empty cache; the first half of a chunk
 * is context shared by all settings, the second half is scored (llama.cpp's
 * convention), so every scored token reads at least L/2 - W compressed
 * tokens. --scored N sets the scored tokens per setting and length.
 *
 * Passkey: a 5-digit number hidden at depths 10%, 50% and 90% of about
 * --passkey-tokens tokens of essay text; the question and answer are fed
 * token by token through the cache (teacher forcing); a trial counts when
 * the model's greedy choice is right at every answer token. The haystack
 * before the needle is computed once per depth and setting and forked
 * (llama_state_copy, cvq_cache_copy) for each of the --trials numbers.
 *
 * Writes a Markdown report (--out) and prints it.
 * --check R: exit 1 if CommVQ-2's perplexity exceeds R x FP32's at any
 * length (CI's margin check).
 */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <dirent.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "baselines.h"
#include "commvq.h"
#include "gguf.h"
#include "model.h"
#include "tokenizer.h"

#define MAX_SETTINGS 8
#define MAX_CTX 8
#define N_DEPTHS 3
/* passkey depths in the order they run (--depths may reorder them, so that
 * a run stopped early has the cheapest ones: a late needle leaves few
 * tokens to decode after it) */
static double k_depths[N_DEPTHS] = {0.1, 0.5, 0.9};

typedef enum { S_FP32, S_COMMVQ, S_KIVI, S_Q40 } setting_kind;

typedef struct setting {
    const char *name;
    setting_kind kind;
    const char *codebook;  /* commvq */
    cvq_codebook *cb;
    double bits_k, bits_v; /* stored bits per element of a compressed token */
    char detail[160];
    /* results */
    double ppl[MAX_CTX], tps[MAX_CTX];
    size_t scored[MAX_CTX];
    int pk_ok[N_DEPTHS], pk_n[N_DEPTHS];
    double pk_seconds;
} setting;

typedef struct options {
    const char *model, *essays, *cb1, *cb2, *backend, *out, *settings, *command;
    size_t ctx[MAX_CTX];
    int n_ctx, trials, threads, batch;
    size_t scored, passkey_tokens, window, kvd;
    unsigned long long seed;
    double check;
} options;

static double now_s(void) {
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void usage(void) {
    fprintf(stderr,
        "usage: commvq-quality -m MODEL.gguf --essays DIR --cb1 F --cb2 F [options]\n"
        "  --settings LIST     default FP32,CommVQ-2,CommVQ-1,KIVI-2,q4_0\n"
        "  --ctx LIST          perplexity context lengths (default 512,2048; 0 = none)\n"
        "  --scored N          scored tokens per setting and length (default 4096)\n"
        "  --trials N          passkey trials per depth (default 20; 0 = no passkey)\n"
        "  --passkey-tokens N  passkey context (default 2048)\n"
        "  --window W          full-precision window of every setting (default 128)\n"
        "  --backend B         commvq backend (default cpu)\n"
        "  --batch B           tokens per forward call (default 64)\n"
        "  --threads N         OpenMP threads (default: all)\n"
        "  --seed S            passkey numbers (default 1)\n"
        "  --depths A,B,C      passkey depths in run order (default 0.1,0.5,0.9)\n"
        "  --out FILE          Markdown report (default: stdout only)\n"
        "  --command TEXT      the command to quote in the report (default: this one)\n"
        "  --check R           exit 1 if CommVQ-2 perplexity > R x FP32 at any length\n");
}

/* ---- text ------------------------------------------------------------------------- */

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The held-out essays (names >= "l", *.txt, sorted) joined by blank lines. */
static char *read_eval_text(const char *dir, size_t *len, int *n_files) {
    DIR *d = opendir(dir);
    struct dirent *e;
    char *names[256], *text = NULL;
    int n = 0, i;
    size_t cap = 0;
    *len = 0;
    if (!d) {
        fprintf(stderr, "error: %s: %s\n", dir, strerror(errno));
        return NULL;
    }
    while ((e = readdir(d)) != NULL && n < 256) {
        size_t l = strlen(e->d_name);
        if (l > 4 && !strcmp(e->d_name + l - 4, ".txt") && strcmp(e->d_name, "l") >= 0) {
            names[n] = (char *)malloc(l + 1);
            if (!names[n]) break;
            memcpy(names[n++], e->d_name, l + 1);
        }
    }
    closedir(d);
    qsort(names, (size_t)n, sizeof names[0], cmp_str);
    for (i = 0; i < n; i++) {
        char path[4096];
        FILE *f;
        long sz;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        f = fopen(path, "rb");
        if (!f || fseek(f, 0, SEEK_END) || (sz = ftell(f)) < 0 || fseek(f, 0, SEEK_SET)) {
            fprintf(stderr, "error: %s: %s\n", path, strerror(errno));
            if (f) fclose(f);
            free(text);
            text = NULL;
            break;
        }
        if (*len + (size_t)sz + 3 > cap) {
            char *t;
            cap = (*len + (size_t)sz + 3) * 2;
            t = (char *)realloc(text, cap);
            if (!t) {
                fclose(f);
                free(text);
                text = NULL;
                break;
            }
            text = t;
        }
        if (*len) {
            text[(*len)++] = '\n';
            text[(*len)++] = '\n';
        }
        if (fread(text + *len, 1, (size_t)sz, f) != (size_t)sz) {
            fclose(f);
            free(text);
            text = NULL;
            break;
        }
        *len += (size_t)sz;
        fclose(f);
    }
    for (i = 0; i < n; i++) free(names[i]);
    *n_files = n;
    if (text) text[*len] = '\0';
    if (!text || n == 0) {
        if (n == 0) fprintf(stderr, "error: no held-out essays (*.txt >= \"l\") in %s\n", dir);
        free(text);
        return NULL;
    }
    return text;
}

/* ---- settings --------------------------------------------------------------------- */

typedef struct quant_user {
    setting_kind kind;
    size_t kd;
} quant_user;

static int quantize_cb(void *user, uint32_t layer, size_t n, float *k, float *v) {
    const quant_user *u = (const quant_user *)user;
    (void)layer;
    if (u->kind == S_KIVI) return kivi2_quantize(k, v, n, u->kd, 32);
    return q4_0_quantize(k, v, n, u->kd);
}

static int load_codebook(setting *st, const llama_model *m) {
    cvq_geometry g;
    cvq_record_layout rl;
    size_t kvd = (size_t)m->hp.n_kv_heads * m->hp.head_dim;
    cvq_status s = cvq_codebook_load(st->codebook, NULL, &st->cb);
    if (s != CVQ_OK) {
        fprintf(stderr, "error: %s: %s: %s\n", st->codebook, cvq_status_name(s), cvq_last_error());
        return -1;
    }
    cvq_codebook_geometry(st->cb, &g);
    if (g.n_layers != m->hp.n_layers || g.n_q_heads != m->hp.n_heads ||
        g.n_kv_heads != m->hp.n_kv_heads || g.head_dim != m->hp.head_dim ||
        g.pair_layout != CVQ_PAIRS_INTERLEAVED) {
        fprintf(stderr, "error: %s does not fit the model (layers, heads, head dim or pair layout)\n",
                st->codebook);
        return -1;
    }
    cvq_record_layout_of(&g, &rl);
    st->bits_k = (8.0 * rl.key_code_bytes + 32.0 * rl.key_scale_count) / (double)kvd;
    st->bits_v = (8.0 * rl.value_bit_bytes + 32.0 * rl.value_scale_count) / (double)kvd;
    snprintf(st->detail, sizeof st->detail, "R=%u, values F=%u Nc=%u I=%u", g.key_stages,
             g.value_group_width, g.value_bits, g.value_hidden);
    return 0;
}

/* A state for one setting. The caller frees it with llama_state_free. */
static int make_state(const setting *st, const llama_model *m, cvq_context *ctx,
                      const options *o, uint32_t max_ctx, llama_state *s, quant_user *qu) {
    char err[512];
    kv_kind kind = st->kind == S_COMMVQ ? KV_COMMVQ : KV_FP32;
    if (llama_state_init(s, m, kind, max_ctx, (uint32_t)o->batch, ctx, st->cb,
                         (uint32_t)o->window, err, sizeof err)) {
        fprintf(stderr, "error: %s: %s\n", st->name, err);
        return -1;
    }
    if (st->kind == S_KIVI || st->kind == S_Q40) {
        qu->kind = st->kind;
        qu->kd = (size_t)m->hp.n_kv_heads * m->hp.head_dim;
        s->kvq = quantize_cb;
        s->kvq_user = qu;
    }
    return 0;
}

/* Runs ids[0..n) from the state's current position; logits of the tokens at
 * indices >= first_logit go to nll accumulation against ids[i+1]. */
static int run_score(llama_state *s, const int32_t *ids, size_t n, size_t first_logit,
                     float *logits, double *nll, size_t *scored) {
    char err[512];
    size_t i, B = s->max_batch, vocab = s->m->hp.n_vocab;
    for (i = 0; i < n; i += B) {
        size_t k = n - i < B ? n - i : B, nl = 0, t;
        if (i + k > first_logit) nl = i + k - (first_logit > i ? first_logit : i);
        if (llama_forward(s, ids + i, k, nl ? logits : NULL, nl, err, sizeof err)) {
            fprintf(stderr, "error: %s\n", err);
            return -1;
        }
        for (t = 0; t < nl; t++) {
            size_t pos = i + k - nl + t; /* index in ids of the token whose logits these are */
            const float *lg = logits + t * vocab;
            double mx = lg[0], se = 0.0;
            size_t v;
            if (pos + 1 >= n) continue;
            for (v = 1; v < vocab; v++)
                if (lg[v] > mx) mx = lg[v];
            for (v = 0; v < vocab; v++) se += exp(lg[v] - mx);
            *nll += mx + log(se) - lg[ids[pos + 1]];
            (*scored)++;
        }
    }
    return 0;
}

static int perplexity(setting *st, int ci, const llama_model *m, cvq_context *ctx,
                      const options *o, const int32_t *ids, size_t n, float *logits) {
    size_t L = o->ctx[ci], half = L / 2, nchunks = (o->scored + half - 1) / half, c;
    llama_state s;
    quant_user qu;
    double nll = 0.0, t0;
    size_t scored = 0;
    if (nchunks * L > n) {
        fprintf(stderr, "error: %zu chunks of %zu tokens need %zu tokens, the essays have %zu\n",
                nchunks, L, nchunks * L, n);
        return -1;
    }
    if (make_state(st, m, ctx, o, (uint32_t)L, &s, &qu)) return -1;
    t0 = now_s();
    for (c = 0; c < nchunks; c++) {
        char err[512];
        if (llama_state_reset(&s, err, sizeof err) ||
            run_score(&s, ids + c * L, L, half - 1, logits, &nll, &scored)) {
            llama_state_free(&s);
            return -1;
        }
    }
    st->tps[ci] = (double)(nchunks * L) / (now_s() - t0);
    st->ppl[ci] = exp(nll / (double)scored);
    st->scored[ci] = scored;
    fprintf(stderr, "  %-9s ctx %5zu: perplexity %.4f over %zu scored tokens (%zu chunks), %.1f tokens/s\n",
            st->name, L, st->ppl[ci], scored, nchunks, st->tps[ci]);
    llama_state_free(&s);
    return 0;
}

/* ---- passkey ---------------------------------------------------------------------- */

typedef struct passkey_text {
    int32_t *intro, *question;
    size_t n_intro, n_question;
} passkey_text;

static int encode(const tokenizer *tk, const char *text, int32_t **ids, size_t *n) {
    char err[256];
    if (tokenizer_encode(tk, text, strlen(text), 0, ids, n, err, sizeof err)) {
        fprintf(stderr, "error: tokenizing: %s\n", err);
        return -1;
    }
    return 0;
}

/* First token index >= i that starts a word (its text begins with a space or
 * a newline), so that the needle never splits a word. */
static size_t word_start(const tokenizer *tk, const int32_t *ids, size_t n, size_t i) {
    char buf[64];
    for (; i < n; i++) {
        int k = tokenizer_decode(tk, ids[i], buf, sizeof buf);
        if (k > 0 && (buf[0] == ' ' || buf[0] == '\n')) return i;
    }
    return n;
}

static uint64_t splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static int passkey(setting *st, const llama_model *m, const tokenizer *tk, cvq_context *ctx,
                   const options *o, const int32_t *hay, size_t n_hay, float *logits) {
    int32_t *intro = NULL, *question = NULL;
    size_t n_intro = 0, n_question = 0, max_ctx = o->passkey_tokens + 256;
    llama_state base, trial;
    quant_user qu, qu2;
    int di, rc = -1;
    double t0 = now_s();
    char err[512];
    if (encode(tk, "There is a pass key hidden inside a lot of irrelevant text. Find it and "
                   "memorize it. I will quiz you about the pass key.\n\n", &intro, &n_intro) ||
        encode(tk, "\n\nWhat is the pass key? The pass key is", &question, &n_question))
        goto done0;
    if (make_state(st, m, ctx, o, (uint32_t)max_ctx, &base, &qu)) goto done0;
    if (make_state(st, m, ctx, o, (uint32_t)max_ctx, &trial, &qu2)) {
        llama_state_free(&base);
        goto done0;
    }
    for (di = 0; di < N_DEPTHS; di++) {
        /* haystack tokens [0, n_hay): the needle goes before token `at` */
        size_t at = word_start(tk, hay, n_hay, (size_t)(k_depths[di] * (double)n_hay));
        /* the numbers of a depth do not depend on the run order: stream 0, 1, 2
         * for the default depths 10%, 50%, 90%, else one from the depth */
        uint64_t stream = 100u + (uint64_t)(k_depths[di] * 1000.0 + 0.5), rng;
        {
            static const double k_default[N_DEPTHS] = {0.1, 0.5, 0.9};
            int q;
            for (q = 0; q < N_DEPTHS; q++)
                if (fabs(k_depths[di] - k_default[q]) < 1e-9) stream = (uint64_t)q;
        }
        rng = o->seed * 1000003ull + stream;
        int tr;
        st->pk_ok[di] = st->pk_n[di] = 0;
        if (llama_state_reset(&base, err, sizeof err)) goto fail;
        {
            double nll = 0.0;
            size_t sc = 0;
            if (run_score(&base, intro, n_intro, n_intro, logits, &nll, &sc) ||
                run_score(&base, hay, at, at, logits, &nll, &sc))
                goto done;
        }
        for (tr = 0; tr < o->trials; tr++) {
            char needle[160], answer[16];
            int32_t *nd = NULL, *an = NULL, *seq = NULL;
            size_t n_nd = 0, n_an = 0, n_seq, j, p = 0;
            unsigned key = 10000u + (unsigned)(splitmix(&rng) % 90000u);
            int ok = 1;
            snprintf(needle, sizeof needle, " The pass key is %u. Remember it. %u is the pass key. ",
                     key, key);
            snprintf(answer, sizeof answer, " %u", key);
            if (encode(tk, needle, &nd, &n_nd) || encode(tk, answer, &an, &n_an)) goto done;
            /* the rest after the fork: needle, haystack tail, question, answer */
            n_seq = n_nd + (n_hay - at) + n_question + n_an;
            seq = (int32_t *)malloc(sizeof(int32_t) * n_seq);
            if (!seq) {
                free(nd);
                free(an);
                goto done;
            }
            memcpy(seq + p, nd, sizeof(int32_t) * n_nd), p += n_nd;
            memcpy(seq + p, hay + at, sizeof(int32_t) * (n_hay - at)), p += n_hay - at;
            memcpy(seq + p, question, sizeof(int32_t) * n_question), p += n_question;
            memcpy(seq + p, an, sizeof(int32_t) * n_an), p += n_an;
            if (llama_state_copy(&trial, &base, err, sizeof err)) {
                fprintf(stderr, "error: %s\n", err);
                free(nd), free(an), free(seq);
                goto done;
            }
            /* everything up to the last token before the answer, then the
             * answer tokens one at a time with their predictions checked */
            {
                size_t head = n_seq - n_an, i, B = trial.max_batch;
                for (i = 0; i < head; i += B) {
                    size_t k = head - i < B ? head - i : B;
                    int last = i + k == head;
                    if (llama_forward(&trial, seq + i, k, last ? logits : NULL, last ? 1 : 0, err,
                                      sizeof err)) {
                        fprintf(stderr, "error: %s\n", err);
                        free(nd), free(an), free(seq);
                        goto done;
                    }
                }
                for (j = 0; j < n_an; j++) {
                    const float *lg = logits;
                    size_t v, best = 0;
                    for (v = 1; v < m->hp.n_vocab; v++)
                        if (lg[v] > lg[best]) best = v;
                    if ((int32_t)best != an[j]) ok = 0;
                    if (j + 1 < n_an &&
                        llama_forward(&trial, an + j, 1, logits, 1, err, sizeof err)) {
                        fprintf(stderr, "error: %s\n", err);
                        free(nd), free(an), free(seq);
                        goto done;
                    }
                }
            }
            st->pk_ok[di] += ok;
            st->pk_n[di]++;
            free(nd);
            free(an);
            free(seq);
        }
        fprintf(stderr, "  %-9s passkey depth %2.0f%%: %d/%d\n", st->name, 100.0 * k_depths[di],
                st->pk_ok[di], st->pk_n[di]);
    }
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "error: %s\n", err);
done:
    llama_state_free(&trial);
    llama_state_free(&base);
done0:
    free(intro);
    free(question);
    st->pk_seconds = now_s() - t0;
    return rc;
}

/* ---- report ----------------------------------------------------------------------- */

static void report(FILE *f, setting *S, int n, const options *o, const char *machine,
                   size_t n_tokens, int n_files, double seconds, int argc, char **argv) {
    int i, c, d, fp = -1;
    char date[64];
    time_t now = time(NULL);
    strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", gmtime(&now));
    for (i = 0; i < n; i++)
        if (S[i].kind == S_FP32) fp = i;
    if (o->n_ctx > 0) {
    fprintf(f, "## Perplexity (held-out essays, teacher forcing, W = %zu)\n\n", o->window);
    fprintf(f, "| setting |");
    for (c = 0; c < o->n_ctx; c++) fprintf(f, " PPL @ %zu |", o->ctx[c]);
    if (fp >= 0)
        for (c = 0; c < o->n_ctx; c++) fprintf(f, " vs FP32 @ %zu |", o->ctx[c]);
    fprintf(f, " key bits | value bits | bits/element | codebook |\n|---|");
    for (c = 0; c < o->n_ctx * (fp >= 0 ? 2 : 1); c++) fprintf(f, "---:|");
    fprintf(f, "---:|---:|---:|---|\n");
    for (i = 0; i < n; i++) {
        fprintf(f, "| %s |", S[i].name);
        for (c = 0; c < o->n_ctx; c++) fprintf(f, " %.3f |", S[i].ppl[c]);
        if (fp >= 0)
            for (c = 0; c < o->n_ctx; c++)
                fprintf(f, " %+.1f%% |", 100.0 * (S[i].ppl[c] / S[fp].ppl[c] - 1.0));
        fprintf(f, " %.3f | %.3f | %.3f | %s |\n", S[i].bits_k, S[i].bits_v,
                0.5 * (S[i].bits_k + S[i].bits_v), S[i].detail);
    }
    fprintf(f, "\nScored tokens per setting:");
    for (c = 0; c < o->n_ctx; c++)
        fprintf(f, " %zu at %zu (%zu chunks)%s", S[0].scored[c], o->ctx[c],
                (o->scored + o->ctx[c] / 2 - 1) / (o->ctx[c] / 2), c + 1 < o->n_ctx ? "," : ".");
    fprintf(f, " Bits per element are those of a compressed token (codes and scales; the "
               "commvq cache also keeps a 4-byte position per token, 0.08 bits per element here, "
               "not counted). Counted separately, every setting keeps the %zu most recent "
               "tokens (the window) in fp32: %zu x 2 x %zu x 4 bytes = %.0f KiB per layer.\n\n",
            o->window, o->window, o->kvd, (double)o->window * 2.0 * (double)o->kvd * 4.0 / 1024.0);
    }
    if (o->trials > 0) {
        fprintf(f, "## Passkey retrieval (%zu-token essay context, %d trials per depth)\n\n",
                o->passkey_tokens, o->trials);
        fprintf(f, "| setting |");
        for (d = 0; d < N_DEPTHS; d++) fprintf(f, " depth %.0f%% |", 100.0 * k_depths[d]);
        fprintf(f, " all | FP32 all |\n|---|");
        for (d = 0; d < N_DEPTHS + 2; d++) fprintf(f, "---:|");
        fprintf(f, "\n");
        for (i = 0; i < n; i++) {
            int ok = 0, tot = 0, fok = 0, ftot = 0;
            fprintf(f, "| %s |", S[i].name);
            for (d = 0; d < N_DEPTHS; d++) {
                fprintf(f, " %d/%d |", S[i].pk_ok[d], S[i].pk_n[d]);
                ok += S[i].pk_ok[d];
                tot += S[i].pk_n[d];
                if (fp >= 0) {
                    fok += S[fp].pk_ok[d];
                    ftot += S[fp].pk_n[d];
                }
            }
            fprintf(f, " %.0f%% |", tot ? 100.0 * ok / tot : 0.0);
            if (fp >= 0) fprintf(f, " %.0f%% |\n", ftot ? 100.0 * fok / ftot : 0.0);
            else fprintf(f, " - |\n");
        }
        fprintf(f, "\n");
    }
    fprintf(f, "Measured %s on %s; %zu held-out tokens from %d essays; %.0f s in all.\n\n", date,
            machine, n_tokens, n_files, seconds);
    fprintf(f, "Command:\n\n```\n");
    if (o->command) fprintf(f, "%s\n  # runs:", o->command);
    for (i = 0; i < argc; i++) fprintf(f, "%s%s", i || o->command ? " " : "", argv[i]);
    fprintf(f, "\n```\n");
}

/* ---- main ------------------------------------------------------------------------- */

static int parse_list_size(const char *s, size_t *out, int cap) {
    int n = 0;
    if (!strcmp(s, "0")) return 0; /* no perplexity */
    while (*s && n < cap) {
        char *e;
        unsigned long v = strtoul(s, &e, 10);
        if (e == s || v < 2) return -1;
        out[n++] = v;
        s = *e == ',' ? e + 1 : e;
        if (*e && *e != ',') return -1;
    }
    return n;
}

static void machine_desc(char *buf, size_t cap) {
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[512], model[256] = "unknown CPU";
    int cpus = 0;
    if (f) {
        while (fgets(line, sizeof line, f)) {
            if (!strncmp(line, "model name", 10)) {
                char *c = strchr(line, ':');
                if (c && cpus == 0) {
                    snprintf(model, sizeof model, "%s", c + 2);
                    model[strcspn(model, "\n")] = 0;
                }
                cpus++;
            }
        }
        fclose(f);
    }
    snprintf(buf, cap, "%s, %d logical CPUs", model, cpus);
}

int main(int argc, char **argv) {
    options o;
    setting S[MAX_SETTINGS];
    int n_set = 0, i, c, rc = 0, n_files = 0;
    gguf_file *gf = NULL;
    llama_model m;
    tokenizer *tk = NULL;
    cvq_context *ctx = NULL;
    cvq_context_params cp = cvq_context_default_params();
    char err[512], machine[400], *text = NULL;
    int32_t *ids = NULL;
    size_t n_ids = 0, len = 0;
    float *logits = NULL;
    double t_all = now_s();
    memset(&o, 0, sizeof o);
    memset(S, 0, sizeof S);
    o.settings = "FP32,CommVQ-2,CommVQ-1,KIVI-2,q4_0";
    o.backend = "cpu";
    o.ctx[0] = 512;
    o.ctx[1] = 2048;
    o.n_ctx = 2;
    o.scored = 4096;
    o.trials = 20;
    o.passkey_tokens = 2048;
    o.window = 128;
    o.batch = 64;
    o.seed = 1;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            usage();
            return 2;
        }
        i++;
        if (!strcmp(a, "-m")) o.model = v;
        else if (!strcmp(a, "--essays")) o.essays = v;
        else if (!strcmp(a, "--cb1")) o.cb1 = v;
        else if (!strcmp(a, "--cb2")) o.cb2 = v;
        else if (!strcmp(a, "--settings")) o.settings = v;
        else if (!strcmp(a, "--backend")) o.backend = v;
        else if (!strcmp(a, "--out")) o.out = v;
        else if (!strcmp(a, "--command")) o.command = v;
        else if (!strcmp(a, "--ctx")) {
            o.n_ctx = parse_list_size(v, o.ctx, MAX_CTX);
            if (o.n_ctx < 0) {
                fprintf(stderr, "error: --ctx wants lengths like 512,2048\n");
                return 2;
            }
        } else if (!strcmp(a, "--scored")) o.scored = strtoul(v, NULL, 10);
        else if (!strcmp(a, "--trials")) o.trials = atoi(v);
        else if (!strcmp(a, "--passkey-tokens")) o.passkey_tokens = strtoul(v, NULL, 10);
        else if (!strcmp(a, "--window")) o.window = strtoul(v, NULL, 10);
        else if (!strcmp(a, "--batch")) o.batch = atoi(v);
        else if (!strcmp(a, "--threads")) o.threads = atoi(v);
        else if (!strcmp(a, "--seed")) o.seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--check")) o.check = atof(v);
        else if (!strcmp(a, "--depths")) {
            if (sscanf(v, "%lf,%lf,%lf", &k_depths[0], &k_depths[1], &k_depths[2]) != 3) {
                fprintf(stderr, "error: --depths wants three fractions like 0.9,0.5,0.1\n");
                return 2;
            }
        }
        else {
            fprintf(stderr, "error: unknown option %s\n", a);
            usage();
            return 2;
        }
    }
    if (!o.model || !o.essays || o.batch < 1 || o.batch > 4096 || o.scored < 1 ||
        o.trials < 0 || o.passkey_tokens < 256 || o.window % 32) {
        if (o.window % 32) fprintf(stderr, "error: --window must be a multiple of 32 (KIVI groups)\n");
        usage();
        return 2;
    }
#ifdef _OPENMP
    if (o.threads > 0) omp_set_num_threads(o.threads);
#endif
    /* settings */
    {
        const char *p = o.settings;
        while (*p && n_set < MAX_SETTINGS) {
            size_t l = strcspn(p, ",");
            setting *st = &S[n_set];
            char name[32];
            snprintf(name, sizeof name, "%.*s", (int)(l < 31 ? l : 31), p);
            if (!strcmp(name, "FP32")) st->name = "FP32", st->kind = S_FP32;
            else if (!strcmp(name, "CommVQ-2")) st->name = "CommVQ-2", st->kind = S_COMMVQ, st->codebook = o.cb2;
            else if (!strcmp(name, "CommVQ-1")) st->name = "CommVQ-1", st->kind = S_COMMVQ, st->codebook = o.cb1;
            else if (!strcmp(name, "KIVI-2")) st->name = "KIVI-2", st->kind = S_KIVI;
            else if (!strcmp(name, "q4_0")) st->name = "q4_0", st->kind = S_Q40;
            else {
                fprintf(stderr, "error: unknown setting '%s' (FP32, CommVQ-2, CommVQ-1, KIVI-2, q4_0)\n", name);
                return 2;
            }
            if (st->kind == S_COMMVQ && !st->codebook) {
                fprintf(stderr, "error: %s needs --%s FILE\n", st->name,
                        st->name[7] == '2' ? "cb2" : "cb1");
                return 2;
            }
            n_set++;
            p += l + (p[l] == ',');
        }
    }
    if (gguf_open(o.model, &gf, err, sizeof err)) {
        fprintf(stderr, "error: %s\n", err);
        return 1;
    }
    if (llama_load(gf, &m, err, sizeof err) || tokenizer_load(gf, &tk, err, sizeof err)) {
        fprintf(stderr, "error: %s: %s\n", o.model, err);
        gguf_close(gf);
        return 1;
    }
    o.kvd = (size_t)m.hp.n_kv_heads * m.hp.head_dim;
    if (cvq_backend_from_name(o.backend, &cp.backend) != CVQ_OK ||
        cvq_context_create(&cp, &ctx) != CVQ_OK) {
        fprintf(stderr, "error: backend %s: %s\n", o.backend, cvq_last_error());
        rc = 1;
        goto out;
    }
    for (i = 0; i < n_set; i++) {
        setting *st = &S[i];
        if (st->kind == S_COMMVQ) {
            if (load_codebook(st, &m)) {
                rc = 1;
                goto out;
            }
        } else if (st->kind == S_FP32) {
            st->bits_k = st->bits_v = 32.0;
            snprintf(st->detail, sizeof st->detail, "-");
        } else if (st->kind == S_KIVI) {
            st->bits_k = st->bits_v = kivi2_bits(32);
            snprintf(st->detail, sizeof st->detail, "group 32, fp16 min and step");
        } else {
            st->bits_k = st->bits_v = q4_0_bits();
            snprintf(st->detail, sizeof st->detail, "blocks of 32, fp16 scale");
        }
    }
    text = read_eval_text(o.essays, &len, &n_files);
    if (!text || tokenizer_encode(tk, text, len, 0, &ids, &n_ids, err, sizeof err)) {
        if (text) fprintf(stderr, "error: tokenizing: %s\n", err);
        rc = 1;
        goto out;
    }
    logits = (float *)malloc(sizeof(float) * (size_t)o.batch * m.hp.n_vocab);
    if (!logits) {
        rc = 1;
        goto out;
    }
    fprintf(stderr, "%d held-out essays, %zu tokens; commvq backend %s\n", n_files, n_ids,
            cvq_backend_name(cvq_context_backend(ctx)));
    for (c = 0; c < o.n_ctx; c++)
        for (i = 0; i < n_set; i++)
            if (perplexity(&S[i], c, &m, ctx, &o, ids, n_ids, logits)) {
                rc = 1;
                goto out;
            }
    if (o.trials > 0) {
        size_t n_hay = o.passkey_tokens - 64; /* intro, needle, question and answer ~ 64 */
        if (n_hay > n_ids) n_hay = n_ids;
        for (i = 0; i < n_set; i++)
            if (passkey(&S[i], &m, tk, ctx, &o, ids, n_hay, logits)) {
                rc = 1;
                goto out;
            }
    }
    machine_desc(machine, sizeof machine);
    report(stdout, S, n_set, &o, machine, n_ids, n_files, now_s() - t_all, argc, argv);
    if (o.out) {
        FILE *f = fopen(o.out, "w");
        if (!f) {
            fprintf(stderr, "error: %s: %s\n", o.out, strerror(errno));
            rc = 1;
            goto out;
        }
        report(f, S, n_set, &o, machine, n_ids, n_files, now_s() - t_all, argc, argv);
        fclose(f);
    }
    if (o.check > 0) {
        int fp = -1, q2 = -1;
        for (i = 0; i < n_set; i++) {
            if (S[i].kind == S_FP32) fp = i;
            if (S[i].kind == S_COMMVQ && S[i].codebook == o.cb2) q2 = i;
        }
        if (fp < 0 || q2 < 0) {
            fprintf(stderr, "error: --check needs the FP32 and CommVQ-2 settings\n");
            rc = 1;
        } else
            for (c = 0; c < o.n_ctx; c++) {
                double r = S[q2].ppl[c] / S[fp].ppl[c];
                fprintf(stderr, "check ctx %zu: CommVQ-2 %.4f / FP32 %.4f = %.4f (limit %.4f): %s\n",
                        o.ctx[c], S[q2].ppl[c], S[fp].ppl[c], r, o.check,
                        r <= o.check ? "ok" : "FAIL");
                if (!(r <= o.check)) rc = 1;
            }
    }
out:
    free(logits);
    free(ids);
    free(text);
    for (i = 0; i < n_set; i++) cvq_codebook_free(S[i].cb);
    cvq_context_free(ctx);
    tokenizer_free(tk);
    llama_free(&m);
    gguf_close(gf);
    return rc;
}
