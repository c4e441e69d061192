#version 450
/*
 * Code-domain attention (docs/numerics.md section 6, method note sections
 * 3-4): the Vulkan counterpart of core/ref_attention.c. Attention is checked
 * against a double-precision oracle within a tolerance, not bit for bit, so
 * sums may run in any order here; only catastrophic orders are avoided (the
 * softmax max and denominator use tree reductions).
 *
 * One workgroup per (query i, query head h): qh = qh_base + WorkGroupID.x,
 * i = qh / HQ, h = qh % HQ; it reads KV head kv = floor(h*HKV/HQ).
 * Tokens are one sequence [sinks | compressed | window] indexed by
 * u in 0..n_tok-1; a token is visible iff its position <= the query's.
 *
 * Phases (barriers between them):
 *   1. q' = RoPE(q, qpos) (unless q_rotated) into shared memory, as pairs.
 *   2. logits of all tokens (threads stride over u) into SCRATCH[qh][u];
 *      each thread keeps an online-softmax state (max m, sum of exp(l - m))
 *      of its tokens; the states are merged in a three-level tree (thread
 *      serial, 8 partials, then the 8 in one fixed order by every thread).
 *   3. weights a_u = exp(l_u - m) / sum into SCRATCH (0 for invisible ones).
 *   4. code-space value accumulator acc[b] = sum_t a_t sigma_t bit_b into
 *      SCRATCH[qh][n_tok + b]: a work unit is (32-bit chunk c of the group's
 *      NC bits, token slice s); when there are fewer chunks than threads the
 *      tokens are split into SLICES interleaved slices whose partial sums
 *      go through the compressed weights' SCRATCH slots and are then added.
 *   5. out[f] = sum a_t v_t[f] (sinks) + ls_eps[c0+f] * sum_b acc[b] E[b][c0+f]
 *      + sum a_t v_t[f] (window)   (threads over f), written to OUT[i][h][f].
 * Index names follow core/ref_attention.c: t a token of a segment, r a key
 * stage, p a RoPE pair, g the value group holding kv, c0 its first column in
 * the group, b a value code bit, f an output feature.
 *
 * SCRATCH holds n_q*HQ rows of n_tok + NC floats, row qh (the global index,
 * qh_base included) private to its workgroup.
 *
 * Shared memory: D + 2*WG + 16 floats (WG = local size): 9 KiB at WG = 1024
 * and d = 256, under lavapipe's 32 KiB.
 *
 * Loop trip counts per invocation: llvmpipe (lavapipe) stops *all* loops of
 * an invocation after 65535 back-edges in total (LP_MAX_TGSI_LOOP_ITERATIONS,
 * one counter shared by every loop, per SIMD vector) and then silently
 * produces wrong results. So the inner loops over stages, bits and small
 * blocks of pairs/tokens are unrolled ([[unroll]] with trip counts known at
 * specialization), and the loops that remain iterate at most about
 *     ceil(n_tok/WG) * (P/2 + 4)                                 (phases 2, 3)
 *   + ceil(n_comp/(4*SLICES)) * ceil(NCH/WG) + SLICES * ceil(NC/WG) (phase 4)
 *   + ceil(D/WG) * (n_sink + n_win + NC/8)                       (phase 5)
 *   + WG/8 + 200                                        (reductions, misc.)
 * times, NCH = ceil(NC/32), SLICES = max(1, min(floor(WG/NCH),
 * floor(n_comp/NC))). Measured on lavapipe at WG = 64: d = 256, R = 2,
 * NC = 64 works at 60500 tokens and fails at 61000 (estimate 65600 and
 * 66150); d = 64, NC = 2048 works at 112000 and fails at 116000 (estimate
 * 63500 and 65770). A host using lavapipe must keep this below 65535 with a
 * margin (a larger WG helps: lavapipe allows 1024 invocations per
 * workgroup) or refuse the call. Should a loop still be cut short, the
 * kernel notices (a loop that ends before its bound) and writes NaN to the
 * whole output row of the (query, head) instead of wrong numbers. The
 * pair blocks are only 2 wide because every unrolled copy of the RoPE
 * polynomial costs lavapipe compile time (4 wide: about +35% for the test
 * grid's pipelines).
 */
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require

#include "numerics.glsl"
#include "iface.h"

layout(local_size_x_id = CVQ_SC_WG) in;

layout(constant_id = CVQ_SC_D) const uint D = 64u;
layout(constant_id = CVQ_SC_HKV) const uint HKV = 1u;
layout(constant_id = CVQ_SC_HQ) const uint HQ = 1u;
layout(constant_id = CVQ_SC_R) const uint R = 1u;
layout(constant_id = CVQ_SC_LAYOUT) const uint LAYOUT = 0u;         /* 0 rotate_half, 1 interleaved */
layout(constant_id = CVQ_SC_SCALE_MODE) const uint SCALE_MODE = 0u; /* 0 token, 1 head */
layout(constant_id = CVQ_SC_F) const uint F = 64u;
layout(constant_id = CVQ_SC_NC) const uint NC = 64u;
layout(constant_id = CVQ_SC_GROUPS) const uint GROUPS = 1u;

const uint P = D / 2u;
const uint NS = (SCALE_MODE == 0u) ? 1u : HKV; /* key scales per token */
const uint WG = gl_WorkGroupSize.x;
const uint NCH = (NC + 31u) / 32u;             /* 32-bit chunks of a group's bits */

layout(push_constant) uniform Push {
    uint n_q;
    uint n_sink;
    uint n_comp;
    uint n_win;
    uint q_rotated;
    float logit_scale;
    uint key_code_bytes;
    uint vbit_bytes;
    uint qh_base;
} pc;

layout(std430, set = 0, binding = CVQ_AT_Q) readonly buffer BQ { float q[]; };
layout(std430, set = 0, binding = CVQ_AT_QPOS) readonly buffer BQpos { int q_pos[]; };
layout(std430, set = 0, binding = CVQ_AT_OUT) writeonly buffer BOut { float outv[]; };
layout(std430, set = 0, binding = CVQ_AT_SINK_K) readonly buffer BSinkK { float sink_k[]; };
layout(std430, set = 0, binding = CVQ_AT_SINK_V) readonly buffer BSinkV { float sink_v[]; };
layout(std430, set = 0, binding = CVQ_AT_SINK_POS) readonly buffer BSinkPos { int sink_pos[]; };
layout(std430, set = 0, binding = CVQ_AT_CODES) readonly buffer BCodes { uint codes[]; };
layout(std430, set = 0, binding = CVQ_AT_KSCALE) readonly buffer BKScale { float kscale[]; };
layout(std430, set = 0, binding = CVQ_AT_VBITS) readonly buffer BVBits { uint vbits[]; };
layout(std430, set = 0, binding = CVQ_AT_VSIGMA) readonly buffer BVSigma { float vsigma[]; };
layout(std430, set = 0, binding = CVQ_AT_COMP_POS) readonly buffer BCompPos { int comp_pos[]; };
layout(std430, set = 0, binding = CVQ_AT_WIN_K) readonly buffer BWinK { float win_k[]; };
layout(std430, set = 0, binding = CVQ_AT_WIN_V) readonly buffer BWinV { float win_v[]; };
layout(std430, set = 0, binding = CVQ_AT_WIN_POS) readonly buffer BWinPos { int win_pos[]; };
layout(std430, set = 0, binding = CVQ_AT_KEY_W) readonly buffer BKeyW { float key_w[]; };
layout(std430, set = 0, binding = CVQ_AT_ROPE_T) readonly buffer BRopeT { uint rope_t[]; };
layout(std430, set = 0, binding = CVQ_AT_E) readonly buffer BE { float E[]; };
layout(std430, set = 0, binding = CVQ_AT_LS_EPS) readonly buffer BLsEps { float ls_eps[]; };
/* coherent: phases 4 and 5 read what other invocations of the workgroup
 * wrote (after memoryBarrierBuffer + barrier) */
layout(std430, set = 0, binding = CVQ_AT_SCRATCH) coherent buffer BScratch { float scratch[]; };

/* q' as pairs: qs[2p] = re, qs[2p+1] = im, whatever the layout. */
shared float qs[D];
/* reduction slots: online-softmax states (max, sum) */
shared vec2 red[WG];
shared vec2 red2[8];
/* nonzero when some invocation found one of its loops cut short (below) */
shared uint cut_flag;

/* Indices (ire, iim) of pair p in a head vector of D floats. */
uint pair_re(uint p) { return LAYOUT == 0u ? p : 2u * p; }
uint pair_im(uint p) { return LAYOUT == 0u ? p + P : 2u * p + 1u; }

/* cos/sin of RoPE pair p at position pos (>= 0) from the integer phase. */
void rope_cs(uint p, int pos, out float c, out float s) {
    const uvec2 t = uvec2(rope_t[2u * p], rope_t[2u * p + 1u]);
    cvq_sincos_turn(cvq_rope_phase_hi(t, uint(pos)), c, s);
}

/* Byte k of the key-code stream (little-endian uint words). */
uint code_byte(uint k) { return (codes[k >> 2] >> ((k & 3u) * 8u)) & 0xFFu; }

/* n (1..4) bytes of the value-bit stream from byte k as one uint, byte j of
 * them in bits 8j..8j+7; reads only words that hold one of those bytes (the
 * bytes need not be word-aligned: NC is only a multiple of 8). */
uint vbit_bytes4(uint k, uint n) {
    const uint sh = (k & 3u) * 8u;
    uint v = vbits[k >> 2] >> sh;
    if ((k & 3u) + n > 4u) {
        v |= vbits[(k >> 2) + 1u] << (32u - sh);
    }
    return n >= 4u ? v : v & ((1u << (8u * n)) - 1u);
}

/* Pairs are processed in blocks of PB (unrolled) to cut loop back-edges. */
const uint PB = 2u;

/* Float idx of the full-precision keys: sinks (sel 0) or window (sel 1). */
float full_key(uint sel, uint idx) { return sel == 0u ? sink_k[idx] : win_k[idx]; }

/* q' . RoPE_pos(k) for a full-precision pre-RoPE key of one head whose
 * first float is at k_base in buffer sel (0: sinks, 1: window). */
float dot_full(uint sel, uint k_base, int pos, inout bool cut) {
    float acc = 0.0;
    uint p0;
    for (p0 = 0u; p0 < P; p0 += PB) {
        [[unroll]] for (uint j = 0u; j < PB; j++) {
            const uint p = p0 + j;
            if (p < P) {
                float c, s;
                rope_cs(p, pos, c, s);
                float re = full_key(sel, k_base + pair_re(p));
                float im = full_key(sel, k_base + pair_im(p));
                cvq_rope_rotate(re, im, c, s);
                acc = acc + (qs[2u * p] * re + qs[2u * p + 1u] * im);
            }
        }
    }
    cut = cut || p0 < P;
    return acc;
}

/* Logit of compressed token t for KV head kv, without lambda and scale:
 * q' . RoPE_pos(S), S_p = sum_r c_p(A_r, B_r) with the centre of pair p
 * c_p = (wx_A - wy_B, wy_A + wx_B) (contract section 2, decode). */
float dot_comp(uint t, uint kv, int pos, inout bool cut) {
    /* first float of w[kv][r][A_r] and w[kv][r][B_r] ([64][P][2] each) */
    uint wA[R], wB[R];
    [[unroll]] for (uint r = 0u; r < R; r++) {
        /* code index j = kv*R + r at stream bits [12j, 12j+12): always two
         * bytes of the token's record, which may straddle a word */
        const uint bit = 12u * (kv * R + r);
        const uint k = t * pc.key_code_bytes + (bit >> 3);
        const uint two = code_byte(k) | (code_byte(k + 1u) << 8);
        const uint code = (two >> (bit & 7u)) & 0xFFFu; /* 64*A + B */
        wA[r] = ((kv * R + r) * 64u + (code >> 6)) * P * 2u;
        wB[r] = ((kv * R + r) * 64u + (code & 63u)) * P * 2u;
    }
    float acc = 0.0;
    uint p0;
    for (p0 = 0u; p0 < P; p0 += PB) {
        [[unroll]] for (uint j = 0u; j < PB; j++) {
            const uint p = p0 + j;
            if (p < P) {
                float sre = 0.0, sim = 0.0;
                [[unroll]] for (uint r = 0u; r < R; r++) {
                    const uint ia = wA[r] + 2u * p, ib = wB[r] + 2u * p;
                    sre = sre + (key_w[ia] - key_w[ib + 1u]);
                    sim = sim + (key_w[ia + 1u] + key_w[ib]);
                }
                float c, s;
                rope_cs(p, pos, c, s);
                cvq_rope_rotate(sre, sim, c, s);
                acc = acc + (qs[2u * p] * sre + qs[2u * p + 1u] * sim);
            }
        }
    }
    cut = cut || p0 < P;
    return acc;
}

/* Position of token u of [sinks | compressed | window]. */
int token_pos(uint u) {
    if (u < pc.n_sink) {
        return sink_pos[u];
    }
    u -= pc.n_sink;
    if (u < pc.n_comp) {
        return comp_pos[u];
    }
    return win_pos[u - pc.n_comp];
}

/* OUT[i][h][f] = v for every f of this invocation (f = lid + j*WG). The
 * loop is unrolled (its trip count is a specialization constant), so no
 * loop limit can cut it short. */
void fill_out(uint obase, float v) {
    [[unroll]] for (uint j = 0u; j < (D + WG - 1u) / WG; j++) {
        const uint f = gl_LocalInvocationID.x + j * WG;
        if (f < D) {
            outv[obase + f] = v;
        }
    }
}

/* Online softmax state of a set of logits: m = their max, s = sum of
 * exp(l - m); (-Inf, 0) for the empty set. */
vec2 sm_add_logit(vec2 ms, float l) {
    if (ms.y == 0.0) {
        return vec2(l, 1.0);
    }
    return l > ms.x ? vec2(l, ms.y * exp(ms.x - l) + 1.0) : vec2(ms.x, ms.y + exp(l - ms.x));
}
vec2 sm_merge(vec2 a, vec2 b) {
    if (a.y == 0.0) {
        return b;
    }
    if (b.y == 0.0) {
        return a;
    }
    const float m = max(a.x, b.x);
    return vec2(m, a.y * exp(a.x - m) + b.y * exp(b.x - m));
}

/* Merge of red[0..WG) in three levels: 8 threads each merge every 8th slot,
 * then every thread merges those 8 partials in the same order (so all get
 * the same value). No barrier sits inside a loop: on lavapipe every barrier
 * site costs compile time. red2 holds the 8 partials. */
vec2 sm_reduce() {
    const uint lid = gl_LocalInvocationID.x;
    barrier();
    if (lid < 8u) {
        vec2 v = vec2(0.0);
        uint j;
        for (j = lid; j < WG; j += 8u) {
            v = sm_merge(v, red[j]);
        }
        red2[lid] = v;
        if (j < WG) {
            atomicOr(cut_flag, 1u);
        }
    }
    barrier();
    vec2 r = red2[0];
    [[unroll]] for (uint j = 1u; j < 8u; j++) {
        if (j < WG) { /* slot j exists only if thread j does */
            r = sm_merge(r, red2[j]);
        }
    }
    return r;
}

void main() {
    const uint lid = gl_LocalInvocationID.x;
    const uint qh = pc.qh_base + gl_WorkGroupID.x;
    if (qh >= pc.n_q * HQ) {
        return; /* uniform over the workgroup */
    }
    const uint i = qh / HQ, h = qh % HQ;
    const uint kv = (h * HKV) / HQ;
    const int qpos = q_pos[i];
    const uint n_tok = pc.n_sink + pc.n_comp + pc.n_win;
    const uint sbase = qh * (n_tok + NC); /* this workgroup's SCRATCH row */
    const uint kvd = HKV * D;             /* floats per full-precision token */
    const uint obase = qh * D;            /* OUT[i][h][0] = (i*HQ + h)*D */

    /* Loops cut short: llvmpipe ends every loop of an invocation once
     * 65535 iterations have run in all (see the top of this file). Each
     * long loop checks on exit that it reached its bound; a cut anywhere
     * turns the outputs into NaN, so an undersized workgroup fails loudly
     * instead of returning plausible wrong numbers. */
    bool cut = false;
    if (lid == 0u) {
        cut_flag = 0u;
    }

    /* ---- 1. q' ---- */
    for (uint p = lid; p < P; p += WG) {
        float re = q[obase + pair_re(p)], im = q[obase + pair_im(p)];
        if (pc.q_rotated == 0u) {
            float c, s;
            rope_cs(p, qpos, c, s);
            cvq_rope_rotate(re, im, c, s);
        }
        qs[2u * p] = re;
        qs[2u * p + 1u] = im;
    }
    barrier();

    /* ---- 2. logits, and the softmax's max and sum (online) ---- */
    vec2 ms = vec2(0.0); /* (max, sum of exp(l - max)) of this thread's tokens */
    uint u;
    for (u = lid; u < n_tok; u += WG) {
        const int pos = token_pos(u);
        if (pos > qpos) {
            continue;
        }
        float l;
        if (u < pc.n_sink || u >= pc.n_sink + pc.n_comp) {
            /* one call site for both full-precision segments (code size) */
            const bool sink = u < pc.n_sink;
            const uint t = sink ? u : u - pc.n_sink - pc.n_comp;
            l = pc.logit_scale * dot_full(sink ? 0u : 1u, t * kvd + kv * D, pos, cut);
        } else {
            const uint t = u - pc.n_sink;
            const float s = kscale[t * NS + (NS == 1u ? 0u : kv)];
            l = (s * pc.logit_scale) * dot_comp(t, kv, pos, cut);
        }
        scratch[sbase + u] = l;
        ms = sm_add_logit(ms, l);
    }
    if (cut || u < n_tok) {
        atomicOr(cut_flag, 1u);
    }
    red[lid] = ms;
    ms = sm_reduce();

    const float nan = uintBitsToFloat(0x7FC00000u);
    if (ms.y == 0.0) {
        /* a query that sees no token outputs zeros (uniform branch) */
        fill_out(obase, cut_flag != 0u ? nan : 0.0);
        return;
    }

    /* ---- 3. weights a_u = exp(l_u - max) / sum, 0 when invisible ---- */
    const float inv_sum = 1.0 / ms.y;
    for (u = lid; u < n_tok; u += WG) {
        scratch[sbase + u] = token_pos(u) > qpos ? 0.0 : exp(scratch[sbase + u] - ms.x) * inv_sum;
    }
    if (u < n_tok) {
        atomicOr(cut_flag, 1u);
    }
    memoryBarrierBuffer();
    barrier();

    /* ---- 4. code-space value accumulator ---- */
    const uint g = (kv * D) / F;           /* value group holding head kv */
    const uint c0 = kv * D - g * F;        /* its first column in the group */
    const uint abase = sbase + n_tok;      /* SCRATCH[qh][n_tok + b] */
    const uint wbase = sbase + pc.n_sink;  /* weights of compressed tokens */
    /* Token slices: as many as the threads allow, and no more than fit the
     * compressed segment's weights, whose SCRATCH slots (n_comp floats) hold
     * the slices' partial sums [slice][NC] once every weight has been read. */
    const uint slices = max(1u, min(WG / NCH, pc.n_comp / NC));
    const uint units = NCH * slices; /* <= WG when slices > 1 */
    float acc[32];
    [[unroll]] for (uint k = 0u; k < 32u; k++) {
        acc[k] = 0.0;
    }
    uint unit;
    for (unit = lid; unit < units; unit += WG) {
        const uint c = unit % NCH, s = unit / NCH;
        const uint nbytes = min(4u, NC / 8u - 4u * c);
        const uint byte0 = g * (NC / 8u) + 4u * c; /* within a token's bits */
        [[unroll]] for (uint k = 0u; k < 32u; k++) {
            acc[k] = 0.0;
        }
        /* tokens s, s + slices, ...; four per iteration */
        uint t0;
        for (t0 = s; t0 < pc.n_comp; t0 += 4u * slices) {
            [[unroll]] for (uint j = 0u; j < 4u; j++) {
                const uint t = t0 + j * slices;
                if (t < pc.n_comp) {
                    /* a_t is 0 for an invisible token, and sigma is finite */
                    const float wt = scratch[wbase + t] * vsigma[t * GROUPS + g];
                    const uint bits = vbit_bytes4(t * pc.vbit_bytes + byte0, nbytes);
                    [[unroll]] for (uint k = 0u; k < 32u; k++) {
                        acc[k] = acc[k] + (((bits >> k) & 1u) != 0u ? wt : 0.0);
                    }
                }
            }
        }
        cut = cut || t0 < pc.n_comp;
        if (slices == 1u) {
            [[unroll]] for (uint k = 0u; k < 32u; k++) {
                if (32u * c + k < NC) {
                    scratch[abase + 32u * c + k] = acc[k];
                }
            }
        }
    }
    cut = cut || unit < units;
    if (slices > 1u) { /* uniform: barriers allowed */
        memoryBarrierBuffer();
        barrier(); /* every compressed weight has been read */
        if (lid < units) {
            const uint c = lid % NCH, s = lid / NCH;
            [[unroll]] for (uint k = 0u; k < 32u; k++) {
                if (32u * c + k < NC) {
                    scratch[wbase + s * NC + 32u * c + k] = acc[k];
                }
            }
        }
        memoryBarrierBuffer();
        barrier();
        uint b;
        for (b = lid; b < NC; b += WG) {
            float sum = 0.0;
            uint s;
            for (s = 0u; s < slices; s++) {
                sum = sum + scratch[wbase + s * NC + b];
            }
            scratch[abase + b] = sum;
            cut = cut || s < slices;
        }
        cut = cut || b < NC;
    }
    if (cut) {
        atomicOr(cut_flag, 1u);
    }
    memoryBarrierBuffer();
    barrier();

    /* ---- 5. output features ---- */
    uint f;
    for (f = lid; f < D; f += WG) {
        float o = 0.0;
        uint t;
        for (t = 0u; t < pc.n_sink; t++) {
            o = o + scratch[sbase + t] * sink_v[t * kvd + kv * D + f];
        }
        bool cut_f = t < pc.n_sink;
        if (pc.n_comp > 0u) {
            float sum = 0.0;
            const uint ebase = g * NC * F + c0 + f; /* E[g][b][c0+f] = ebase + b*F */
            uint b0;
            for (b0 = 0u; b0 < NC; b0 += 8u) { /* NC is a multiple of 8 */
                [[unroll]] for (uint k = 0u; k < 8u; k++) {
                    sum = sum + scratch[abase + b0 + k] * E[ebase + (b0 + k) * F];
                }
            }
            cut_f = cut_f || b0 < NC;
            o = o + ls_eps[g * F + c0 + f] * sum;
        }
        const uint u0 = pc.n_sink + pc.n_comp;
        for (t = 0u; t < pc.n_win; t++) {
            o = o + scratch[sbase + u0 + t] * win_v[t * kvd + kv * D + f];
        }
        cut_f = cut_f || t < pc.n_win;
        outv[obase + f] = (cut_f || cut_flag != 0u) ? nan : o;
    }
    if (f < D) {
        /* this loop itself was cut: NaN for every feature of the thread */
        fill_out(obase, nan);
    }
}
