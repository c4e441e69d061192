/*
 * Conformance harness shared by the tests and, later, by every backend's
 * conformance run (the same case table for each).
 *
 * - th_case: one case of the table. Its canonical parameter string
 *   ("attend(d=128,hq=32,hkv=8,...)") is its name, its filter key and, hashed
 *   with FNV-1a 64, its seed; tests print it on failure.
 * - A seeded, platform-independent generator (splitmix64; normals by
 *   Box-Muller) for keys, values and queries.
 * - Guard bands: output buffers with sentinel bytes before and after (and a
 *   fill pattern inside, to prove "nothing written").
 * - Compare helpers: codes bit for bit; floats by normalised error, any NaN
 *   fails.
 * - Independent double-precision oracles written from the method note
 *   (not from docs/numerics.md; no library kernel is called):
 *   brute-force key stage over the 4096 codes, RoPE in HF and GPT-J form,
 *   key/value decode, the value encoder, and attention over explicit K/V.
 */
#ifndef CVQ_TEST_HARNESS_H
#define CVQ_TEST_HARNESS_H

#include "commvq.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- backends under test ----------------------------------------------------- */

/*
 * The contexts every conformance case runs on, in the manner of ggml's
 * test-backend-ops: each one is checked over the same case table against the
 * same references (the CPU reference kernels, bit for bit, for encoding; the
 * double oracles, within the stated tolerance, for attention). The list is
 *   "cpu-ref"   CPU backend, cpu_reference = 1 (the plain reference kernels);
 *   "cpu"       CPU backend, default kernels;
 *   "cuda:N", "vulkan:N"  every device cvq_list_devices reports for that
 *               backend on which cvq_context_create(backend, N) succeeds,
 *               software devices (lavapipe) included although AUTO never
 *               picks them.
 * A backend or device that cannot be tested gets a "[conformance] skip ..."
 * line with the library's reason. COMMVQ_TEST_BACKENDS (comma list of
 * cpu-ref, cpu, cuda, vulkan, cuda:N, vulkan:N; case-insensitive) restricts
 * the list; "cuda"/"vulkan" select every device of that backend.
 *
 * An op a backend answers with CVQ_ERR_UNSUPPORTED is a skip for that
 * (case, backend), counted apart from the cases run: never a pass, never a
 * failure. Each section resets the tallies and prints them.
 */

#define TH_MAX_BACKENDS 16

typedef struct th_backend {
    char name[24];          /* "cpu-ref", "cpu", "cuda:0", "vulkan:1"            */
    char device[200];       /* device name and type, for the header line         */
    cvq_backend_kind kind;
    int device_index;       /* index within its backend; -1 for the CPU contexts */
    cvq_context *ctx;
    /* tally of the current section (th_tally_reset) */
    size_t n_run, n_skip;
    double worst;           /* a section's own figure (e.g. error / tolerance)   */
    char first_skip[512];   /* case and reason of the section's first skip       */
} th_backend;

typedef struct th_backends {
    th_backend b[TH_MAX_BACKENDS];
    size_t n;               /* backends under test (may be 0 when filtered)      */
    /* The CPU contexts, created whatever the filter says: the oracles use
     * them to produce reference codes (b[] entries named cpu-ref / cpu point
     * at these, not at copies). */
    cvq_context *ref;       /* cpu_reference = 1 */
    cvq_context *cpu;       /* default CPU kernels */
    char filter[256];       /* COMMVQ_TEST_BACKENDS as read ("" = all) */
} th_backends;

/* Builds the list and prints it (one header line, one skip line per backend
 * or device left out, with why). Returns false, with a message printed, when
 * a CPU context cannot be created or COMMVQ_TEST_BACKENDS holds a name that
 * is not a backend; then nothing is held. */
bool th_backends_open(th_backends *bs);
void th_backends_close(th_backends *bs);

/* Tallies: reset at the start of a section, then one th_tally_run or
 * th_tally_skip per (case, backend). */
void th_tally_reset(th_backends *bs);
void th_tally_run(th_backend *b);
void th_tally_skip(th_backend *b, const char *case_name, const char *call, cvq_status st,
                   const char *message);
/* A status a backend answered for a call that must succeed: true (and the
 * skip recorded) when it is CVQ_ERR_UNSUPPORTED, false otherwise. */
bool th_unsupported(th_backend *b, const char *case_name, const char *call, cvq_status st);
/* "cpu-ref 6/0, cpu 6/0" (cases run / skipped per backend; with
 * show_worst, each backend's `worst` in brackets); "none" when the list is
 * empty. Returns buf. */
const char *th_tally_str(const th_backends *bs, int show_worst, char *buf, size_t size);
/* One line per backend that skipped something in this section: how many
 * and the first reason. `section` prefixes the lines. */
void th_tally_print_skips(const th_backends *bs, const char *section);

/* ---- cases ---------------------------------------------------------------- */

typedef struct th_case {
    const char *op;          /* "keys", "values", "attend", ...            */
    uint32_t d, hq, hkv;     /* head dim, query heads, KV heads            */
    uint32_t R;              /* key stages                                 */
    uint32_t Nc, F, I;       /* value bits, group width (0 = Hkv*d), hidden
                                (0 = default)                              */
    cvq_pair_layout layout;
    cvq_key_scale_mode scale;
    uint32_t n_q;            /* queries                                    */
    uint32_t window, sinks;  /* W, S                                       */
    int32_t offset;          /* position of the first token                */
    uint32_t pos_stride;     /* token positions offset + stride*t (0 = 1)  */
    uint32_t T;              /* tokens                                     */
    int q_rotated;           /* queries handed over already rotated        */
    char name[256];          /* canonical parameter string (th_case_finish) */
    uint64_t seed;           /* FNV-1a 64 of name                          */
} th_case;

/* Writes c->name and c->seed. Returns c->name. */
const char *th_case_finish(th_case *c);
uint64_t th_fnv1a64(const char *s);
/* The geometry of a case (1 layer, resolved; lambda default). */
cvq_status th_case_geometry(const th_case *c, cvq_geometry *g);

/* ---- random data ------------------------------------------------------------ */

typedef struct th_rng {
    uint64_t state;
    int has_spare;
    double spare;
} th_rng;

void th_rng_seed(th_rng *r, uint64_t seed);
uint64_t th_rng_u64(th_rng *r);
/* Uniform in [0, 1) with 53 random bits. */
double th_rng_uniform(th_rng *r);
/* Standard normal (Box-Muller). */
double th_rng_normal(th_rng *r);
/* x[i] = stdev * N(0,1), rounded to float. */
void th_fill_normal(th_rng *r, float *x, size_t n, double stdev);

/* ---- guard bands -------------------------------------------------------------- */

#define TH_GUARD_BYTES 64
#define TH_GUARD_BYTE 0xA5   /* sentinel before and after */
#define TH_FILL_BYTE 0xCD    /* initial contents */

/* A buffer of `bytes` usable bytes, filled with TH_FILL_BYTE, with
 * TH_GUARD_BYTES sentinels on each side. NULL on allocation failure. */
void *th_guard_alloc(size_t bytes);
/* True when both sentinel bands are intact. */
bool th_guard_ok(const void *p);
/* True when the contents are still all TH_FILL_BYTE (nothing written). */
bool th_guard_untouched(const void *p);
void th_guard_free(void *p);

/* ---- comparisons ---------------------------------------------------------------- */

/* Number of positions where a[i] != b[i]; *first = first such index. */
size_t th_cmp_u16(const uint16_t *a, const uint16_t *b, size_t n, size_t *first);
size_t th_cmp_bytes(const uint8_t *a, const uint8_t *b, size_t n, size_t *first);

typedef struct th_err {
    double max_abs_err;   /* max |got - want| */
    double max_abs_ref;   /* max |want| */
    double norm_err;      /* max_abs_err / max_abs_ref (0/0 = 0); +Inf on NaN */
    size_t worst;         /* index of max_abs_err */
    size_t n_nan;         /* NaN in got or want */
} th_err;

th_err th_cmp_f32_f64(const float *got, const double *want, size_t n);

/* ---- cache policy ------------------------------------------------------------------ */

/* Where T appended tokens live under the cache policy of the method note
 * (section 5): the first S are sinks; of the rest, a full window of W is
 * compressed as one block when the next token arrives (W = 0: every token
 * compressed on arrival). */
void th_cache_split(uint32_t T, uint32_t S, uint32_t W, size_t *n_sink,
                    size_t *n_comp, size_t *n_win);

/* 12-bit packing, written independently: code i in bits [12i, 12i+12),
 * little endian. out: ceil(12n/8) bytes. */
void th_pack_codes12(const uint16_t *codes, size_t n, uint8_t *out);

/* ---- double-precision oracles ------------------------------------------------------- */

/* Centre conventions. TH_CENTRE_OK is the method note's c_p(A,B) =
 * w_A,p + i*w_B,p = (x_A - y_B, y_A + x_B); the others are the plausible
 * mistakes a test must be able to tell apart. */
typedef enum th_centre {
    TH_CENTRE_OK = 0,
    TH_CENTRE_MINUS_I = 1,   /* w_A - i*w_B   = (x_A + y_B, y_A - x_B) */
    TH_CENTRE_SWAPPED = 2,   /* w_B + i*w_A   = (x_B - y_A, y_B + x_A) */
    TH_CENTRE_CONJ = 3       /* conj(w_A) + i*conj(w_B) = (x_A + y_B, x_B - y_A) */
} th_centre;

/* Pair p of a head vector: indices of (re, im) for the layout. */
void th_pair(cvq_pair_layout layout, uint32_t d, uint32_t p, uint32_t *re, uint32_t *im);

/* Brute force over the 4096 codes of one stage: w is [64][P][2] (float
 * sub-codes), z the residual (d floats, head layout). Computes, in double,
 * dist[k] = ||z - c(A,B)||^2 for k = 64*A + B (dist may be NULL). Returns
 * the best code (lowest index among exact double ties); *best / *second get
 * the two smallest distances (second over the other 4095 codes). */
uint32_t th_bf_key_stage(const float *w, uint32_t d, cvq_pair_layout layout,
                         const float *z, th_centre conv, double *dist,
                         double *best, double *second);

/* RoPE at position pos in double, angle theta[p]*pos (libm cos/sin):
 * HF/NeoX form out = x*cos + rotate_half(x)*sin with cos/sin = cat(f, f),
 * rotate_half(x) = cat(-x[P:], x[:P]); GPT-J form with interleaved pairs,
 * out = x*cos + rotate_every_two(x)*sin, rotate_every_two(x)[2p] = -x[2p+1],
 * [2p+1] = x[2p]. `sign` = +1 normally; -1 rotates the wrong way (for
 * sensitivity checks). */
void th_rope_hf(const double *x, uint32_t d, const double *theta, int64_t pos,
                int sign, double *out);
void th_rope_gptj(const double *x, uint32_t d, const double *theta, int64_t pos,
                  int sign, double *out);
/* Dispatch on layout. */
void th_rope(cvq_pair_layout layout, const double *x, uint32_t d,
             const double *theta, int64_t pos, double *out);

/* Decoded key of one token in double: k_hat[h] pair p = s_h * sum_r
 * c_p(A_r, B_r). key_w [Hkv][R][64][P][2], codes [Hkv][R], scales [ns]. */
void th_decode_key_double(const cvq_geometry *g, const float *key_w,
                          const uint16_t *codes, const float *scales, double *k);

/* One value group's tensors (primary tensors as in the codebook). */
typedef struct th_value_group {
    uint32_t F, I, Nc;
    const float *ls, *ln_w, *ln_b, *w1, *b1, *w2, *b2, *E;
} th_value_group;

/* Decoded value of one group in double: v = sigma * u * (ls + 1e-6),
 * u = sum_b bit_b * E[b]. bits: Nc/8 bytes, LSB first. */
void th_decode_value_double(const th_value_group *vg, const uint8_t *bits,
                            float sigma, double *v);

/* The value encoder in double (method note 4): x = v/(ls+1e-6),
 * x /= (||x||+1e-6), LayerNorm (eps 1e-5, biased), Linear, GELU (libm erf),
 * Linear, 4-way argmax (lowest index on ties), bits, u, sigma.
 * logits: [2*Nc] (double), abs_sum[o] = |b2[o]| + sum_i |W2[o][i] h[i]| (the
 * scale of the rounding error of logit o). bits: Nc/8 bytes. scratch is
 * allocated inside. Returns false on allocation failure. */
bool th_encode_value_double(const th_value_group *vg, const float *v, uint8_t *bits,
                            double *sigma, double *pre, double *logits,
                            double *abs_sum);
/* sigma from given bits in double: (pre + 1e-6) / (||u|| + 1e-6). */
double th_value_sigma_double(const th_value_group *vg, const float *v,
                             const uint8_t *bits);

/* Attention in double over explicit pre-RoPE keys/values:
 * q [n_q][Hq][d] (float; rotated here at q_pos unless q_rotated),
 * k, v [n_tok][Hkv][d] double, pos [n_tok]; causal (pos <= q_pos), one
 * softmax, lambda * q'.RoPE(k). A query that sees nothing gets zeros.
 * out [n_q][Hq][d]. Returns false on allocation failure. */
bool th_attend_double(const cvq_geometry *g, const double *theta, size_t n_q,
                      const float *q, const int32_t *q_pos, int q_rotated,
                      size_t n_tok, const double *k, const double *v,
                      const int32_t *pos, double *out);

#endif
