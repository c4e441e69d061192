#version 450
#extension GL_GOOGLE_include_directive : require
#include "numerics.glsl"
#include "iface.h"
/*
 * Value encoder (docs/numerics.md section 4; its executable form is
 * cvq_ref_encode_value_token in core/ref_values.c). One workgroup per
 * (token, value group): token n = token_base + gl_WorkGroupID.x, value
 * group g = gl_WorkGroupID.y. The code bits and sigma must equal the CPU
 * reference's BIT FOR BIT, so:
 *  - every sum the contract writes as sequential stays sequential, in
 *    ascending order, from +0.0: one thread runs it (the pre-norm sum of
 *    squares, the two LayerNorm sums, nu2), or one thread per independent
 *    output runs its own (Linear output o, code-vector feature f). No tree
 *    reductions anywhere. Inner loops are written out 8 terms at a time;
 *    that is the same sequence of roundings, only fewer loop back-edges
 *    (see "Loop budget" below).
 *  - every float temporary that feeds a code or sigma is `precise` (SPIR-V
 *    NoContraction): no fused multiply-add, the C code's grouping.
 *  - division and square root go through cvq_div / cvq_sqrt (numerics.glsl,
 *    correctly rounded in integer arithmetic), never OpFDiv, sqrt or
 *    inversesqrt.
 *  - 1e-6f and 1e-5f are loaded by bit pattern; inv_F (push constant),
 *    1/(ls+eps) and every weight come from the host tables.
 *
 * Work vectors live in the SCRATCH buffer, not in shared memory (F, I and
 * Nc can be far larger than 32 KiB of shared memory). Per (token n, group g)
 * the slot at (n*GROUPS + g) * (F + I + 2*NC) floats holds:
 *   [0, F)            x: scaled features, then LayerNorm output y, then u
 *   [F, F+I)          hid = gelu(Linear1(y))
 *   [F+I, F+I+2*NC)   logit = Linear2(hid)
 * BITS[n][g][b] receives one 0/1 uint per code bit (a pack kernel packs
 * them). Phases are separated by memoryBarrierBuffer() + barrier(); SCRATCH
 * and BITS are written by some invocations and read by others of the same
 * workgroup, hence `coherent`.
 *
 * SIGMA is a scratch buffer too: the pack pass (pack_common.glsl) copies
 * sigma and packs the bits only when the call's status word stayed 0.
 * STATUS (atomicOr; the pack pass writes nothing when it is nonzero):
 *   bit 0: an input value of this (token, group) is NaN or Inf;
 *   bit 1: (inputs finite) the pre-norm sum of squares overflowed to +Inf;
 *          for bits 0 and 1 nothing at all is written for this (token, group);
 *   bit 2: a loop stopped before its bound: the device cut the shader short
 *          (see "Loop budget"); outputs of this (token, group) are garbage.
 *
 * Loop budget: Mesa's llvmpipe/lavapipe ends every loop of an invocation
 * once the invocation has run 65535 loop iterations in total, summed over
 * all its loops (gallivm's LP_MAX_TGSI_LOOP_ITERATIONS, a hang guard; the
 * count is per SIMD thread of 8 invocations), and carries on: silently wrong
 * results. Each loop here therefore checks that its counter reached its
 * bound, a final canary loop covers the loops of the last cvq_sqrt/cvq_div,
 * and a cut-short run reports bit 2. With the inner loops written out 8 at
 * a time, the iterations of one invocation are at most about
 * (wg = workgroup size, c(x, y) = ceil(x / y))
 *   F/2 + 40                                  sequential sums (thread 0)
 *   + c(I, wg) * (F/8 + 9 + 50)               Linear1, gelu/erf
 *   + c(2*NC, wg) * (I/8 + 9)                 Linear2
 *   + c(F, wg) * (NC/8 + 9) + 2*c(F, wg) + c(NC/2, wg)
 *   + 150                                     cvq_div/cvq_sqrt loops
 * e.g. about 13,100 for F = 1024, NC = 2048, I = 4096, wg = 256; a host
 * should not send lavapipe a geometry where this exceeds 65535. Measured on
 * lavapipe (a canary run until the budget ends), this is an upper bound:
 * 4,351 used vs 4,876 estimated at F = 1024, NC = 1024, I = 2048, wg = 256;
 * 15,715 vs 17,398 at wg = 64; 944 vs 1,306 at F = 256, NC = 512, I = 1024.
 */

layout(local_size_x_id = CVQ_SC_WG) in;

layout(constant_id = CVQ_SC_D) const uint D = 64;          /* head dim       */
layout(constant_id = CVQ_SC_HKV) const uint HKV = 1;       /* KV heads       */
layout(constant_id = CVQ_SC_F) const uint F = 64;          /* group width    */
layout(constant_id = CVQ_SC_NC) const uint NC = 64;        /* code bits      */
layout(constant_id = CVQ_SC_I) const uint I = 128;         /* hidden width   */
layout(constant_id = CVQ_SC_GROUPS) const uint GROUPS = 1; /* groups/token   */

layout(push_constant) uniform Push {
    uint n_tokens;   /* tokens of the call: a token index is < n_tokens        */
    uint token_base; /* token of workgroup x = token_base + gl_WorkGroupID.x   */
    float inv_F;     /* host constant fl(1.0f / (float)F)                      */
    uint check_only; /* != 0: the input checks only (see encode_keys.comp)     */
} pc;

layout(std430, set = 0, binding = CVQ_EV_VALUES) readonly buffer Values { float values[]; };
layout(std430, set = 0, binding = CVQ_EV_INV_LS) readonly buffer InvLs { float inv_ls[]; };
layout(std430, set = 0, binding = CVQ_EV_LN_W) readonly buffer LnW { float ln_w[]; };
layout(std430, set = 0, binding = CVQ_EV_LN_B) readonly buffer LnB { float ln_b[]; };
layout(std430, set = 0, binding = CVQ_EV_W1) readonly buffer W1 { float w1[]; };
layout(std430, set = 0, binding = CVQ_EV_B1) readonly buffer B1 { float b1[]; };
layout(std430, set = 0, binding = CVQ_EV_W2) readonly buffer W2 { float w2[]; };
layout(std430, set = 0, binding = CVQ_EV_B2) readonly buffer B2 { float b2[]; };
layout(std430, set = 0, binding = CVQ_EV_E) readonly buffer Ecb { float e_cb[]; };
layout(std430, set = 0, binding = CVQ_EV_SCRATCH) coherent buffer Scratch { float scratch[]; };
layout(std430, set = 0, binding = CVQ_EV_BITS) coherent buffer Bits { uint bits[]; };
layout(std430, set = 0, binding = CVQ_EV_SIGMA) writeonly buffer Sigma { float sigma[]; };
layout(std430, set = 0, binding = CVQ_EV_STATUS) coherent buffer Status { uint status_word; };

/* Scalars handed from the one thread that computes them to all threads. */
shared uint s_bad;    /* 0 ok, 1 non-finite input, 2 sum of squares overflow */
shared float s_pre;   /* pre = sqrt(ss)                                      */
shared float s_rp;    /* 1 / (pre + 1e-6f)                                   */
shared float s_mean;  /* LayerNorm mean                                      */
shared float s_rstd;  /* LayerNorm 1 / sqrt(var + 1e-5f)                     */

/* Set when a loop of this invocation ended before its bound (STATUS bit 2). */
bool ev_cut = false;

void ev_phase_barrier() {
    memoryBarrierBuffer();
    memoryBarrierShared();
    barrier();
}

/* 1 if the binary32 pattern is NaN or +-Inf (exponent all ones). Tested on
 * the bits: without SignedZeroInfNanPreserve a compiler may assume finite
 * floats and fold isnan/isinf away. */
uint ev_nonfinite(float v) {
    return (floatBitsToUint(v) & 0x7F800000u) == 0x7F800000u ? 1u : 0u;
}

/* Pre-norm sum of squares of the group, j ascending from +0:
 * x = v[j] * inv_ls[j] (rounded), ss = ss + x*x. *bad = 1 if some v[j] is
 * not finite (the sum is then meaningless and unused). */
float ev_sum_squares(uint vb, uint tb, out uint bad) {
    precise float ss = 0.0;
    uint nf = 0u;
    uint j = 0u;
    for (; j + 8u <= F; j += 8u) {
        float v0 = values[vb + j], v1 = values[vb + j + 1u];
        float v2 = values[vb + j + 2u], v3 = values[vb + j + 3u];
        float v4 = values[vb + j + 4u], v5 = values[vb + j + 5u];
        float v6 = values[vb + j + 6u], v7 = values[vb + j + 7u];
        nf |= ev_nonfinite(v0) | ev_nonfinite(v1) | ev_nonfinite(v2) | ev_nonfinite(v3) |
              ev_nonfinite(v4) | ev_nonfinite(v5) | ev_nonfinite(v6) | ev_nonfinite(v7);
        precise float x0 = v0 * inv_ls[tb + j];
        precise float x1 = v1 * inv_ls[tb + j + 1u];
        precise float x2 = v2 * inv_ls[tb + j + 2u];
        precise float x3 = v3 * inv_ls[tb + j + 3u];
        precise float x4 = v4 * inv_ls[tb + j + 4u];
        precise float x5 = v5 * inv_ls[tb + j + 5u];
        precise float x6 = v6 * inv_ls[tb + j + 6u];
        precise float x7 = v7 * inv_ls[tb + j + 7u];
        ss = ss + x0 * x0;
        ss = ss + x1 * x1;
        ss = ss + x2 * x2;
        ss = ss + x3 * x3;
        ss = ss + x4 * x4;
        ss = ss + x5 * x5;
        ss = ss + x6 * x6;
        ss = ss + x7 * x7;
    }
    for (; j < F; j++) {
        float v = values[vb + j];
        nf |= ev_nonfinite(v);
        precise float x = v * inv_ls[tb + j];
        ss = ss + x * x;
    }
    if (j != F) {
        ev_cut = true;
    }
    bad = nf;
    return ss;
}

/* sum = sum + x[j], j ascending from +0 (x in scratch at xb). */
float ev_sum(uint xb) {
    precise float sum = 0.0;
    uint j = 0u;
    for (; j + 8u <= F; j += 8u) {
        sum = sum + scratch[xb + j];
        sum = sum + scratch[xb + j + 1u];
        sum = sum + scratch[xb + j + 2u];
        sum = sum + scratch[xb + j + 3u];
        sum = sum + scratch[xb + j + 4u];
        sum = sum + scratch[xb + j + 5u];
        sum = sum + scratch[xb + j + 6u];
        sum = sum + scratch[xb + j + 7u];
    }
    for (; j < F; j++) {
        sum = sum + scratch[xb + j];
    }
    if (j != F) {
        ev_cut = true;
    }
    return sum;
}

/* acc = acc + d*d with d = x[j] - mean rounded once, j ascending from +0. */
float ev_sum_sq_dev(uint xb, float mean) {
    precise float acc = 0.0;
    uint j = 0u;
    for (; j + 8u <= F; j += 8u) {
        precise float d0 = scratch[xb + j] - mean;
        precise float d1 = scratch[xb + j + 1u] - mean;
        precise float d2 = scratch[xb + j + 2u] - mean;
        precise float d3 = scratch[xb + j + 3u] - mean;
        precise float d4 = scratch[xb + j + 4u] - mean;
        precise float d5 = scratch[xb + j + 5u] - mean;
        precise float d6 = scratch[xb + j + 6u] - mean;
        precise float d7 = scratch[xb + j + 7u] - mean;
        acc = acc + d0 * d0;
        acc = acc + d1 * d1;
        acc = acc + d2 * d2;
        acc = acc + d3 * d3;
        acc = acc + d4 * d4;
        acc = acc + d5 * d5;
        acc = acc + d6 * d6;
        acc = acc + d7 * d7;
    }
    for (; j < F; j++) {
        precise float d = scratch[xb + j] - mean;
        acc = acc + d * d;
    }
    if (j != F) {
        ev_cut = true;
    }
    return acc;
}

/* nu2 = nu2 + u[f]*u[f], f ascending from +0 (u in scratch at xb). */
float ev_sum_squares_u(uint xb) {
    precise float nu2 = 0.0;
    uint f = 0u;
    for (; f + 8u <= F; f += 8u) {
        precise float u0 = scratch[xb + f];
        precise float u1 = scratch[xb + f + 1u];
        precise float u2 = scratch[xb + f + 2u];
        precise float u3 = scratch[xb + f + 3u];
        precise float u4 = scratch[xb + f + 4u];
        precise float u5 = scratch[xb + f + 5u];
        precise float u6 = scratch[xb + f + 6u];
        precise float u7 = scratch[xb + f + 7u];
        nu2 = nu2 + u0 * u0;
        nu2 = nu2 + u1 * u1;
        nu2 = nu2 + u2 * u2;
        nu2 = nu2 + u3 * u3;
        nu2 = nu2 + u4 * u4;
        nu2 = nu2 + u5 * u5;
        nu2 = nu2 + u6 * u6;
        nu2 = nu2 + u7 * u7;
    }
    for (; f < F; f++) {
        precise float u = scratch[xb + f];
        nu2 = nu2 + u * u;
    }
    if (f != F) {
        ev_cut = true;
    }
    return nu2;
}

/* Linear1 without bias: acc = acc + W1[o][i] * y[i], i ascending from +0;
 * wrow = index of W1[g][o][0], xb = index of y[0] in scratch. */
float ev_dot_w1(uint wrow, uint xb) {
    precise float acc = 0.0;
    uint i = 0u;
    for (; i + 8u <= F; i += 8u) {
        acc = acc + w1[wrow + i] * scratch[xb + i];
        acc = acc + w1[wrow + i + 1u] * scratch[xb + i + 1u];
        acc = acc + w1[wrow + i + 2u] * scratch[xb + i + 2u];
        acc = acc + w1[wrow + i + 3u] * scratch[xb + i + 3u];
        acc = acc + w1[wrow + i + 4u] * scratch[xb + i + 4u];
        acc = acc + w1[wrow + i + 5u] * scratch[xb + i + 5u];
        acc = acc + w1[wrow + i + 6u] * scratch[xb + i + 6u];
        acc = acc + w1[wrow + i + 7u] * scratch[xb + i + 7u];
    }
    for (; i < F; i++) {
        acc = acc + w1[wrow + i] * scratch[xb + i];
    }
    if (i != F) {
        ev_cut = true;
    }
    return acc;
}

/* Linear2 without bias: acc = acc + W2[o][i] * hid[i], i ascending from
 * +0; wrow = index of W2[g][o][0], hb = index of hid[0] in scratch. */
float ev_dot_w2(uint wrow, uint hb) {
    precise float acc = 0.0;
    uint i = 0u;
    for (; i + 8u <= I; i += 8u) {
        acc = acc + w2[wrow + i] * scratch[hb + i];
        acc = acc + w2[wrow + i + 1u] * scratch[hb + i + 1u];
        acc = acc + w2[wrow + i + 2u] * scratch[hb + i + 2u];
        acc = acc + w2[wrow + i + 3u] * scratch[hb + i + 3u];
        acc = acc + w2[wrow + i + 4u] * scratch[hb + i + 4u];
        acc = acc + w2[wrow + i + 5u] * scratch[hb + i + 5u];
        acc = acc + w2[wrow + i + 6u] * scratch[hb + i + 6u];
        acc = acc + w2[wrow + i + 7u] * scratch[hb + i + 7u];
    }
    for (; i < I; i++) {
        acc = acc + w2[wrow + i] * scratch[hb + i];
    }
    if (i != I) {
        ev_cut = true;
    }
    return acc;
}

/* u[f] = u[f] + E[b][f] over the set bits b ascending, from +0.
 * bb = index of bit 0 of this (token, group) in BITS; eb = index of
 * E[g][0][f]. An unset bit adds nothing, as in the CPU reference. */
float ev_code_vector(uint bb, uint eb) {
    precise float u = 0.0;
    uint b = 0u;
    for (; b + 8u <= NC; b += 8u) {
        if (bits[bb + b] != 0u) u = u + e_cb[eb + b * F];
        if (bits[bb + b + 1u] != 0u) u = u + e_cb[eb + (b + 1u) * F];
        if (bits[bb + b + 2u] != 0u) u = u + e_cb[eb + (b + 2u) * F];
        if (bits[bb + b + 3u] != 0u) u = u + e_cb[eb + (b + 3u) * F];
        if (bits[bb + b + 4u] != 0u) u = u + e_cb[eb + (b + 4u) * F];
        if (bits[bb + b + 5u] != 0u) u = u + e_cb[eb + (b + 5u) * F];
        if (bits[bb + b + 6u] != 0u) u = u + e_cb[eb + (b + 6u) * F];
        if (bits[bb + b + 7u] != 0u) u = u + e_cb[eb + (b + 7u) * F];
    }
    for (; b < NC; b++) { /* NC is a multiple of 8; kept for safety */
        if (bits[bb + b] != 0u) u = u + e_cb[eb + b * F];
    }
    if (b != NC) {
        ev_cut = true;
    }
    return u;
}

void main() {
    const uint lid = gl_LocalInvocationID.x;
    const uint wg = gl_WorkGroupSize.x;
    const uint n = pc.token_base + gl_WorkGroupID.x; /* token */
    const uint g = gl_WorkGroupID.y;                 /* value group */
    if (n >= pc.n_tokens || g >= GROUPS) {
        return; /* uniform over the workgroup, before any barrier */
    }
    /* 1e-6f (0x358637BD) and 1e-5f (0x3727C5AC) by bit pattern. */
    const float val_eps = uintBitsToFloat(0x358637BDu);
    const float ln_eps = uintBitsToFloat(0x3727C5ACu);

    const uint v_base = n * (HKV * D) + g * F;       /* values[n][g*F + j]   */
    const uint t_base = g * F;                       /* [g][F] tables        */
    const uint slot = (n * GROUPS + g) * (F + I + 2u * NC);
    const uint x_base = slot;                        /* scratch x / y / u    */
    const uint h_base = slot + F;                    /* scratch hid          */
    const uint l_base = slot + F + I;                /* scratch logits       */
    const uint bit_base = (n * GROUPS + g) * NC;     /* bits[n][g][0]        */

    /* ---- 4.1-4.2: finiteness, ss over x = v * inv_ls (thread 0) -------- */
    if (lid == 0u) {
        uint bad;
        precise float ss = ev_sum_squares(v_base, t_base, bad);
        if (bad == 0u && floatBitsToUint(ss) == 0x7F800000u) {
            bad = 2u; /* +Inf: CVQ_ERR_INPUT_RANGE on the CPU */
        }
        if (bad != 0u) {
            atomicOr(status_word, bad);
        } else {
            precise float pre = cvq_sqrt(ss);
            precise float pe = pre + val_eps;
            s_pre = pre;
            s_rp = cvq_div(1.0, pe);
        }
        s_bad = bad;
    }
    ev_phase_barrier();
    if (s_bad != 0u) {
        return; /* uniform: every invocation reads the same shared value */
    }
    if (pc.check_only != 0u) {
        return; /* uniform: a push constant */
    }

    /* ---- 4.2: x[j] = (v[j] * inv_ls[j]) * rp -- the same rounded product
     * as in the sum of squares, then one multiply ------------------------ */
    {
        const float rp = s_rp;
        uint j = lid;
        for (; j < F; j += wg) {
            precise float xj = values[v_base + j] * inv_ls[t_base + j];
            precise float xs = xj * rp;
            scratch[x_base + j] = xs;
        }
        if (j < F) {
            ev_cut = true;
        }
    }
    ev_phase_barrier();

    /* ---- 4.3: LayerNorm statistics, two sequential passes (thread 0) ---- */
    if (lid == 0u) {
        precise float sum = ev_sum(x_base);
        precise float mean = sum * pc.inv_F;
        precise float acc = ev_sum_sq_dev(x_base, mean);
        precise float var = acc * pc.inv_F;
        precise float ve = var + ln_eps;
        precise float sd = cvq_sqrt(ve);
        s_mean = mean;
        s_rstd = cvq_div(1.0, sd);
    }
    ev_phase_barrier();

    /* ---- 4.3: y[j] = ((x[j] - mean) * rstd) * ln_w[j] + ln_b[j] --------- */
    {
        const float mean = s_mean;
        const float rstd = s_rstd;
        uint j = lid;
        for (; j < F; j += wg) {
            precise float dj = scratch[x_base + j] - mean;
            precise float yj = ((dj * rstd) * ln_w[t_base + j]) + ln_b[t_base + j];
            scratch[x_base + j] = yj;
        }
        if (j < F) {
            ev_cut = true;
        }
    }
    ev_phase_barrier();

    /* ---- 4.4: hid[o] = gelu(Linear1(y)[o]), bias last; thread per o ----- */
    {
        uint o = lid;
        for (; o < I; o += wg) {
            precise float acc = ev_dot_w1((g * I + o) * F, x_base);
            precise float lin = acc + b1[g * I + o];
            precise float h = cvq_gelu(lin);
            scratch[h_base + o] = h;
        }
        if (o < I) {
            ev_cut = true;
        }
    }
    ev_phase_barrier();

    /* ---- 4.4: logit[o] = Linear2(hid)[o], bias last; thread per o ------- */
    {
        uint o = lid;
        for (; o < 2u * NC; o += wg) {
            precise float acc = ev_dot_w2((g * 2u * NC + o) * I, h_base);
            precise float lo = acc + b2[g * 2u * NC + o];
            scratch[l_base + o] = lo;
        }
        if (o < 2u * NC) {
            ev_cut = true;
        }
    }
    ev_phase_barrier();

    /* ---- 4.5: 4-way argmax of logits 4t..4t+3 (strict >: the lowest index
     * wins ties, a NaN never wins), j -> (bit 2t, bit 2t+1):
     * 0 -> (1,0), 1 -> (0,1), 2 -> (1,1), 3 -> (0,0). Thread per t. ------ */
    {
        uint t = lid;
        for (; t < NC / 2u; t += wg) {
            const uint lb = l_base + 4u * t;
            uint jbest = 0u;
            float best = scratch[lb];
            const float o1 = scratch[lb + 1u];
            const float o2 = scratch[lb + 2u];
            const float o3 = scratch[lb + 3u];
            if (o1 > best) {
                best = o1;
                jbest = 1u;
            }
            if (o2 > best) {
                best = o2;
                jbest = 2u;
            }
            if (o3 > best) {
                best = o3;
                jbest = 3u;
            }
            bits[bit_base + 2u * t] = (jbest == 0u || jbest == 2u) ? 1u : 0u;
            bits[bit_base + 2u * t + 1u] = (jbest == 1u || jbest == 2u) ? 1u : 0u;
        }
        if (t < NC / 2u) {
            ev_cut = true;
        }
    }
    ev_phase_barrier();

    /* ---- 4.6: u[f] = sum over set bits of E[b][f]; thread per f -------- */
    {
        uint f = lid;
        for (; f < F; f += wg) {
            precise float u = ev_code_vector(bit_base, g * NC * F + f);
            scratch[x_base + f] = u;
        }
        if (f < F) {
            ev_cut = true;
        }
    }
    ev_phase_barrier();

    /* ---- 4.6: nu2 (thread 0, f ascending); sigma = (pre+eps) / (nu+eps) */
    if (lid == 0u) {
        precise float nu2 = ev_sum_squares_u(x_base);
        precise float nu = cvq_sqrt(nu2);
        precise float num = s_pre + val_eps;
        precise float den = nu + val_eps;
        sigma[n * GROUPS + g] = cvq_div(num, den);
        /* Canary after the last loops of cvq_sqrt / cvq_div: its bound is
         * not a compile-time constant, so it stays a loop; it completes
         * unless the device's loop budget ran out (see above). */
        const uint canary_n = 64u + (pc.n_tokens & 1u);
        uint k = 0u;
        for (; k < canary_n; k++) {
        }
        if (k != canary_n) {
            ev_cut = true;
        }
    }
    if (ev_cut) {
        atomicOr(status_word, 4u);
    }
}
