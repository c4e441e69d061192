#version 450
/*
 * Key encoding (docs/numerics.md section 2), bit for bit the CPU reference
 * core/ref_keys.c. One workgroup encodes one token, all KV heads; the
 * bindings, specialization constants and push constants are those of
 * shaders/iface.h (CVQ_EK_*).
 *
 * Index names: tok token (token_base + workgroup x), h KV head, r key stage,
 * a sub-code (0..63), p pair (0..P-1, P = D/2), k = 64*A + B a code.
 *
 * Work split (any workgroup size; the host uses 64):
 *  - every sum that the contract makes sequential is done by one thread in
 *    ascending order from +0.0: the sum of squares of a span (thread 0, or
 *    thread h for head h in the up-front overflow check of head mode) and
 *    the dot product of sub-code a over p (thread a mod WG);
 *  - the 4096-way argmin: thread t scans k = t, t+WG, ... ascending keeping
 *    the first strict minimum, then two shared atomicMin rounds pick the
 *    smallest distance and, among the threads that hold it, the smallest k.
 *    That is the sequential strict-< scan's answer (contract section 8);
 *  - the residual update over pairs p is split across threads (each pair is
 *    independent).
 * No subgroup operations; shared memory ~1.6 KiB.
 *
 * Loop budget: Mesa's llvmpipe/lavapipe (gallivm, at least up to 22.3)
 * stops every loop of a shader invocation once the invocation has run
 * 65535 loop iterations in total (LP_MAX_TGSI_LOOP_ITERATIONS, shared by
 * all loops), silently. So the long sequential loops are unrolled by hand
 * (8 or 16 steps per iteration, same order of operations). Measured on
 * lavapipe with 64 threads: about 28 loop iterations per (head, stage) at
 * d = 128 (15 at d = 64, 37 at d = 256), 7,100 in all for Hkv = 8, R = 32,
 * d = 128; so the budget holds while Hkv*R stays below about 2,300 at
 * d = 128 (4,200 at d = 64, 1,700 at d = 256). A canary loop at the end
 * sets status bit 2 (value 4) if the budget ran out anyway; the codes of
 * that dispatch are then not valid and the host must fail the call.
 *
 * Input errors (the host normally checks before dispatch; these checks are
 * for engine-owned device inputs): a token with a NaN/Inf key element sets
 * bit 0 of the status word, one whose sum of squares overflows to +Inf sets
 * bit 1; nothing at all is written for that token (no codes, no scale).
 * CODES and SCALES are scratch buffers: the pack pass (pack_common.glsl)
 * writes the call's outputs only when the status word stayed 0, so one bad
 * token leaves every output of the call untouched.
 */
#extension GL_GOOGLE_include_directive : require
#include "numerics.glsl"
#include "iface.h"

layout(local_size_x = 64, local_size_x_id = CVQ_SC_WG) in;

layout(constant_id = CVQ_SC_D) const uint D = 128u;          /* head dim d (<= 256) */
layout(constant_id = CVQ_SC_HKV) const uint HKV = 8u;        /* KV heads */
layout(constant_id = CVQ_SC_R) const uint R = 4u;            /* key stages */
layout(constant_id = CVQ_SC_LAYOUT) const uint LAYOUT = 0u;  /* 0 rotate_half, 1 interleaved */
layout(constant_id = CVQ_SC_SCALE_MODE) const uint SCALE_MODE = 0u; /* 0 token, 1 head */
const uint P = D / 2u;

layout(std430, set = 0, binding = CVQ_EK_KEYS) readonly buffer Keys { float k_in[]; };   /* [n][HKV][D] */
layout(std430, set = 0, binding = CVQ_EK_W) readonly buffer SubCodes { float w_tab[]; }; /* [HKV][R][64][P][2] */
layout(std430, set = 0, binding = CVQ_EK_N) readonly buffer Norms { float n_tab[]; };    /* [HKV][R][64] */
layout(std430, set = 0, binding = CVQ_EK_G) readonly buffer Cross { float g_tab[]; };    /* [HKV][R][64][64] */
layout(std430, set = 0, binding = CVQ_EK_CODES) writeonly buffer Codes { uint codes[]; }; /* [n][HKV][R] */
layout(std430, set = 0, binding = CVQ_EK_SCALES) writeonly buffer Scales { float scales[]; }; /* [n][1 or HKV] */
layout(std430, set = 0, binding = CVQ_EK_STATUS) buffer Status { uint status_word[]; };  /* [1] */

layout(push_constant) uniform PushConstants {
    uint n_tokens;   /* tokens in the bound views: tok < n_tokens is encoded */
    uint token_base; /* first token of this dispatch */
    uint check_only; /* != 0: the input checks only (a call in several chunks
                        checks every chunk before any is encoded) */
} pc;

/* Key of "no candidate": the order key of +Inf. A distance wins only when
 * its key is strictly below the best so far, starting from this one, as the
 * reference's `dist < best` with best = +Inf. */
const uint KEY_NONE = 0xFF800000u;

shared float s_z[256];      /* residual of the current head, head layout: s_z[i], i < D */
shared float s_f[64];       /* f[a] = n[a] - 2*Re<w_a, z> */
shared float s_g[64];       /* g[a] = n[a] - 2*Im<w_a, z> */
shared float s_ss;          /* sum of squares of the current span */
shared uint s_flags;        /* bit 0 non-finite input, bit 1 overflow */
shared uint s_best_key;     /* smallest distance key of the stage */
shared uint s_best_idx;     /* smallest code index holding s_best_key */

/* A uint that orders like the float (IEEE <, with -0 == +0); NaN maps to
 * 0xFFFFFFFF, above +Inf (KEY_NONE), so it is never a candidate. Doing the
 * comparison on integers also keeps it independent of how a driver treats
 * NaN in float comparisons without SignedZeroInfNanPreserve. */
uint order_key(float x) {
    uint u = floatBitsToUint(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
        return 0xFFFFFFFFu;
    }
    if (u == 0x80000000u) {
        u = 0u; /* -0 -> +0: equal distances, the index decides */
    }
    return (u & 0x80000000u) != 0u ? ~u : (u | 0x80000000u);
}

/* ss = 0; ss = ss + k[i]*k[i] for i ascending (one thread). Unrolled by
 * 16 for the loop budget; the order of the additions is unchanged. */
#define CVQ_SS_STEP(j)                          \
    {                                           \
        precise float v_ = k_in[base + (j)];    \
        precise float sq_ = v_ * v_;            \
        ss = ss + sq_;                          \
    }
float span_sum_squares(uint base, uint n) {
    precise float ss = 0.0;
    uint i = 0u;
    for (; i + 16u <= n; i += 16u) {
        CVQ_SS_STEP(i) CVQ_SS_STEP(i + 1u) CVQ_SS_STEP(i + 2u) CVQ_SS_STEP(i + 3u)
        CVQ_SS_STEP(i + 4u) CVQ_SS_STEP(i + 5u) CVQ_SS_STEP(i + 6u) CVQ_SS_STEP(i + 7u)
        CVQ_SS_STEP(i + 8u) CVQ_SS_STEP(i + 9u) CVQ_SS_STEP(i + 10u) CVQ_SS_STEP(i + 11u)
        CVQ_SS_STEP(i + 12u) CVQ_SS_STEP(i + 13u) CVQ_SS_STEP(i + 14u) CVQ_SS_STEP(i + 15u)
    }
    for (; i < n; ++i) {
        CVQ_SS_STEP(i)
    }
    return ss;
}

/* Head-layout indices of pair p. */
uint re_index(uint p) { return LAYOUT == 1u ? 2u * p : p; }
uint im_index(uint p) { return LAYOUT == 1u ? 2u * p + 1u : p + P; }

/* One term of sub-code a's complex dot product (wb: a's row in w_tab):
 * dr += Re(conj(w) z) = wx*zr + wy*zi, di += Im(conj(w) z) = wx*zi - wy*zr,
 * each product rounded, the pair's sum/difference rounded, then added. */
#define CVQ_DOT_STEP(pp)                                        \
    {                                                           \
        precise float wx_ = w_tab[wb + 2u * (pp)];              \
        precise float wy_ = w_tab[wb + 2u * (pp) + 1u];         \
        precise float zr_ = s_z[re_index(pp)];                  \
        precise float zi_ = s_z[im_index(pp)];                  \
        precise float tr_ = wx_ * zr_ + wy_ * zi_;              \
        precise float ti_ = wx_ * zi_ - wy_ * zr_;              \
        dr = dr + tr_;                                          \
        di = di + ti_;                                          \
    }

/* Candidate code kk of this thread: dist = (f[A] + g[B]) + G[A][B] with
 * A = kk / 64, B = kk % 64; kept only when strictly smaller, so the thread
 * keeps its lowest kk on ties (its candidates are visited in ascending kk). */
#define CVQ_SCAN_STEP(kk)                                       \
    {                                                           \
        uint kk_ = (kk);                                        \
        precise float fg_ = s_f[kk_ >> 6] + s_g[kk_ & 63u];     \
        precise float gk_ = g_tab[gb + kk_];                    \
        precise float dist_ = fg_ + gk_;                        \
        uint key_ = order_key(dist_);                           \
        if (key_ < my_key) {                                    \
            my_key = key_;                                      \
            my_idx = kk_;                                       \
        }                                                       \
    }

/* One residual stage of head h (table set tb = h*R + r) on s_z; returns the
 * code. Must be called by every thread of the workgroup (it has barriers);
 * s_z must be complete (a barrier after its last write). */
uint key_stage(uint tb, uint lid, uint wg) {
    /* 1. f[a], g[a] from one complex dot product per sub-code, p ascending */
    for (uint a = lid; a < 64u; a += wg) {
        uint wb = (tb * 64u + a) * P * 2u; /* w[a][p] = (w_tab[wb+2p], w_tab[wb+2p+1]) */
        precise float dr = 0.0;
        precise float di = 0.0;
        uint p = 0u;
        for (; p + 8u <= P; p += 8u) { /* unrolled for the loop budget; p ascending */
            CVQ_DOT_STEP(p) CVQ_DOT_STEP(p + 1u) CVQ_DOT_STEP(p + 2u) CVQ_DOT_STEP(p + 3u)
            CVQ_DOT_STEP(p + 4u) CVQ_DOT_STEP(p + 5u) CVQ_DOT_STEP(p + 6u) CVQ_DOT_STEP(p + 7u)
        }
        for (; p < P; ++p) {
            CVQ_DOT_STEP(p)
        }
        precise float na = n_tab[tb * 64u + a];
        precise float fa = na - 2.0 * dr;
        precise float ga = na - 2.0 * di;
        s_f[a] = fa;
        s_g[a] = ga;
    }
    if (lid == 0u) {
        s_best_key = KEY_NONE;
        s_best_idx = 0xFFFFFFFFu;
    }
    barrier();

    /* 2. argmin of dist = (f[A] + g[B]) + G[A][B] over k = 64*A + B */
    uint gb = tb * 4096u; /* G[A][B] = g_tab[gb + k] */
    uint my_key = KEY_NONE;
    uint my_idx = 0xFFFFFFFFu;
    uint k = lid;
    for (; k + 7u * wg < 4096u; k += 8u * wg) { /* unrolled for the loop budget; k ascending */
        CVQ_SCAN_STEP(k) CVQ_SCAN_STEP(k + wg) CVQ_SCAN_STEP(k + 2u * wg) CVQ_SCAN_STEP(k + 3u * wg)
        CVQ_SCAN_STEP(k + 4u * wg) CVQ_SCAN_STEP(k + 5u * wg) CVQ_SCAN_STEP(k + 6u * wg)
        CVQ_SCAN_STEP(k + 7u * wg)
    }
    for (; k < 4096u; k += wg) {
        CVQ_SCAN_STEP(k)
    }
    if (my_key < KEY_NONE) {
        atomicMin(s_best_key, my_key);
    }
    barrier();
    if (my_key < KEY_NONE && my_key == s_best_key) {
        atomicMin(s_best_idx, my_idx);
    }
    barrier();
    /* no finite (or -Inf) distance at all: code 0, as the sequential scan */
    uint code = s_best_key < KEY_NONE ? s_best_idx : 0u;

    /* 3. residual z_p -= c_p(A, B), c_p = (x_A - y_B, y_A + x_B) rounded first */
    uint wA = (tb * 64u + (code >> 6)) * P * 2u;
    uint wB = (tb * 64u + (code & 63u)) * P * 2u;
    for (uint p = lid; p < P; p += wg) {
        precise float cr = w_tab[wA + 2u * p] - w_tab[wB + 2u * p + 1u];
        precise float ci = w_tab[wA + 2u * p + 1u] + w_tab[wB + 2u * p];
        uint ire = re_index(p), iim = im_index(p);
        precise float nr = s_z[ire] - cr;
        precise float ni = s_z[iim] - ci;
        s_z[ire] = nr;
        s_z[iim] = ni;
    }
    barrier();
    return code;
}

void main() {
    const uint lid = gl_LocalInvocationID.x;
    const uint wg = gl_WorkGroupSize.x;
    const uint tok = pc.token_base + gl_WorkGroupID.x;
    if (tok >= pc.n_tokens) {
        return; /* whole workgroup */
    }
    const uint span = HKV * D;      /* the token's key elements */
    const uint kbase = tok * span;  /* k_in index of element (h, i): kbase + h*D + i */

    if (lid == 0u) {
        s_flags = 0u;
    }
    barrier();

    /* Checks before anything is written. Non-finite elements (on the bits) */
    bool bad = false;
    for (uint i = lid; i < span; i += wg) {
        if ((floatBitsToUint(k_in[kbase + i]) & 0x7F800000u) == 0x7F800000u) {
            bad = true;
        }
    }
    if (bad) {
        atomicOr(s_flags, 1u);
    }
    barrier();
    if (s_flags != 0u) {
        if (lid == 0u) {
            atomicOr(status_word[0], 1u);
        }
        return;
    }
    /* ... then overflow of the sums of squares, exactly as the encoder sums */
    if (SCALE_MODE == 0u) {
        if (lid == 0u) {
            float ss = span_sum_squares(kbase, span);
            s_ss = ss;
            if (floatBitsToUint(ss) == 0x7F800000u) {
                s_flags = 2u;
            }
        }
    } else {
        for (uint h = lid; h < HKV; h += wg) {
            float ss = span_sum_squares(kbase + h * D, D);
            if (floatBitsToUint(ss) == 0x7F800000u) {
                atomicOr(s_flags, 2u);
            }
        }
    }
    barrier();
    if (s_flags != 0u) {
        if (lid == 0u) {
            atomicOr(status_word[0], 2u);
        }
        return;
    }
    if (pc.check_only != 0u) {
        return; /* uniform: a push constant */
    }

    /* Token mode: one scale for all heads (every thread derives the same
     * bits from s_ss: cvq_sqrt / cvq_div are integer algorithms). */
    float ss_tok = 0.0;
    if (SCALE_MODE == 0u) {
        ss_tok = s_ss;
        if (lid == 0u) {
            scales[tok] = cvq_sqrt(ss_tok);
        }
    }

    for (uint h = 0u; h < HKV; ++h) {
        float ss;
        if (SCALE_MODE == 0u) {
            ss = ss_tok;
        } else {
            barrier(); /* everyone has read the previous head's s_ss */
            if (lid == 0u) {
                s_ss = span_sum_squares(kbase + h * D, D);
            }
            barrier();
            ss = s_ss;
        }
        float s = cvq_sqrt(ss);
        if (SCALE_MODE != 0u && lid == 0u) {
            scales[tok * HKV + h] = s;
        }
        uint cbase = (tok * HKV + h) * R; /* codes[tok][h][r] = codes[cbase + r] */
        if (floatBitsToUint(ss) == 0u) {
            /* zero span (also when every square underflowed): codes 0 */
            if (lid == 0u) {
                for (uint r = 0u; r < R; ++r) {
                    codes[cbase + r] = 0u;
                }
            }
            continue; /* uniform: ss is the same in every thread */
        }
        /* x = k * (1/s): correctly rounded reciprocal, then one multiply */
        float inv = cvq_div(1.0, s);
        for (uint i = lid; i < D; i += wg) {
            precise float kv = k_in[kbase + h * D + i];
            precise float x = kv * inv;
            s_z[i] = x;
        }
        barrier();
        for (uint r = 0u; r < R; ++r) {
            uint code = key_stage(h * R + r, lid, wg);
            if (lid == 0u) {
                codes[cbase + r] = code;
            }
        }
    }

    /* Loop-budget canary (see the header): a loop whose trip count (2 or 3)
     * the compiler cannot know runs fewer times only if the device cut it
     * short, and then it has cut earlier loops too. */
    uint lim = 2u + (pc.n_tokens >> 31);
    uint ran = 0u;
    for (uint i = 0u; i < lim; ++i) {
        ran += 1u;
    }
    if (ran != lim) {
        atomicOr(status_word[0], 4u);
    }
}
