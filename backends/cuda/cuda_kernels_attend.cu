/*
 * Code-domain attention (docs/numerics.md section 6; method note sections
 * 3-4): the CUDA counterpart of core/ref_attention.c. Attention is checked
 * within a tolerance, not bit for bit, so sums run in the order that suits
 * the GPU; the RoPE phase and cos/sin are still the contract's (integer
 * phase, own polynomial: cuda_numerics.cuh).
 *
 * One step = three kernels on the caller's stream:
 *   check_queries  non-finite queries -> status word 0 (then nothing is written)
 *   attend_split   grid (split s, KV head kv x head chunk c, query i); block
 *                  256 threads. It walks the tokens u of its range
 *                  [s*len, (s+1)*len) of [sinks | compressed | window] in
 *                  tiles of TT tokens and keeps, for each of its qg query
 *                  heads, an online softmax state (max m, sum l) and
 *                  unnormalised accumulators: code space acc_code[b] =
 *                  sum_t a_t sigma_t bit_b (compressed tokens) and
 *                  acc_fp[f] = sum_t a_t v_t[f] (sinks and window).
 *                  Per tile:
 *                   A. token metadata; 12-bit codes of KV head kv; the
 *                      full-precision keys into K[TT][P][2];
 *                   B. for r = 0..R-1: stage r's sub-code table w[kv][r]
 *                      (64*P*2 floats, 32 KiB at d = 128) streamed into
 *                      shared memory, K[t][p] += c_p(A_r, B_r): the
 *                      sub-code sums (the decoded key before its scale),
 *                      computed ONCE per token and KV head and shared by
 *                      every query head of the GQA group;
 *                   C. one warp per token: RoPE from the integer phase of
 *                      (pos, t_p), dots with the qg rotated queries, warp
 *                      reduction; logit = lambda * scale * dot;
 *                   D. one warp per head: tile max, rescale factor, weights;
 *                   E. value accumulators rescaled and updated (bytes of
 *                      the value bits: one byte unit of 8 bits per thread).
 *                  It writes (m, l, acc_code, acc_fp) for each head to the
 *                  partials scratch.
 *   attend_reduce  one block per (query, head): merges the splits' partials
 *                  (split-K), then out = (acc_fp + ls_eps (.) (acc_code @ E))
 *                  / l, a query that sees no token -> zeros.
 * So every compressed record is read once per KV head and step (once per
 * head chunk when a group has more than CVQ_CU_QG_MAX heads), no sin/cos
 * table is read, and long contexts spread over n_split blocks per head.
 *
 * Indices: i query, h query head, kv KV head, g head within the block's
 * chunk, u token of the sequence, tt token within the tile, t token within
 * its segment, r stage, p pair, b value code bit, f output feature, gi the
 * value group holding kv and c0 its first column in the group.
 */
#include "cuda_launch.h"
#include "cuda_numerics.cuh"

#ifndef CVQ_CU_EMULATE
#include <cuda_runtime.h>
#endif

namespace {

constexpr uint32_t kThreads = 256;
constexpr uint32_t kWarps = kThreads / 32;
constexpr uint32_t QG = CVQ_CU_QG_MAX;

enum : int { KIND_NONE = 0, KIND_SINK = 1, KIND_COMP = 2, KIND_WIN = 3 };

/* Byte offsets of the split kernel's dynamic shared memory. */
struct smem_layout {
    size_t qs, tab, K, Lw, acc_code, acc_fp, st, pos, kind, idx, scale, sig, codes, total;
};

__host__ __device__ inline void layout_of(smem_layout *L, uint32_t d, uint32_t qg, uint32_t TT, uint32_t Nc,
                                          uint32_t R) {
    size_t o = 0;
    L->qs = o; o += (size_t)qg * d * 4;            /* q' of each head, pairs (re, im) */
    L->tab = o; o += (size_t)64 * d * 4;           /* one stage's sub-codes [64][P][2] */
    L->K = o; o += (size_t)TT * d * 4;             /* tile keys [TT][P][2] */
    L->Lw = o; o += (size_t)qg * TT * 4;           /* logits, then weights [qg][TT] */
    L->acc_code = o; o += (size_t)qg * Nc * 4;     /* [qg][Nc] */
    L->acc_fp = o; o += (size_t)qg * d * 4;        /* [qg][d] */
    L->st = o; o += (size_t)QG * 3 * 4;            /* m, l, rescale of each head */
    L->pos = o; o += (size_t)TT * 4;
    L->kind = o; o += (size_t)TT * 4;
    L->idx = o; o += (size_t)TT * 4;
    L->scale = o; o += (size_t)TT * 4;             /* key scale (1 for full precision) */
    L->sig = o; o += (size_t)TT * 4;               /* value sigma */
    L->codes = o; o += (size_t)TT * R * 2;         /* codes [TT][R] of KV head kv */
    L->total = (o + 15) & ~(size_t)15;
}

/* First query head reading KV head kv: ceil(kv*Hq/Hkv). */
__host__ __device__ inline uint32_t first_head(uint32_t kv, uint32_t Hq, uint32_t Hkv) {
    return (uint32_t)(((uint64_t)kv * Hq + Hkv - 1) / Hkv);
}

__global__ void check_queries(const float *q, size_t n, uint32_t *status) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        if (cvq_cu_nonfinite(q[i])) atomicOr(status, CVQ_CU_ST_NONFINITE);
}

__device__ inline float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}
__device__ inline float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    return v;
}

__global__ void __launch_bounds__(kThreads)
attend_split(cvq_cu_geom g, cvq_cu_tables tb, cvq_cu_attend a, uint32_t q0, uint32_t TT, uint32_t qg,
             uint32_t n_hchunk, uint32_t split_len, uint32_t n_split, const uint32_t *status) {
    CVQ_DYN_SMEM(unsigned char, s_raw);
    if (*status != 0) return;
    smem_layout L;
    layout_of(&L, g.d, qg, TT, g.Nc, g.R);
    float *qs = (float *)(s_raw + L.qs);
    float *tab = (float *)(s_raw + L.tab);
    float *K = (float *)(s_raw + L.K);
    float *Lw = (float *)(s_raw + L.Lw);
    float *acc_code = (float *)(s_raw + L.acc_code);
    float *acc_fp = (float *)(s_raw + L.acc_fp);
    float *st = (float *)(s_raw + L.st); /* st[3g] = m, st[3g+1] = l, st[3g+2] = rescale */
    int32_t *tpos = (int32_t *)(s_raw + L.pos);
    int32_t *tkind = (int32_t *)(s_raw + L.kind);
    uint32_t *tidx = (uint32_t *)(s_raw + L.idx);
    float *tscale = (float *)(s_raw + L.scale);
    float *tsig = (float *)(s_raw + L.sig);
    uint16_t *tcodes = (uint16_t *)(s_raw + L.codes);

    const uint32_t tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const uint32_t d = g.d, P = g.P, R = g.R, Nc = g.Nc;
    const uint32_t split = blockIdx.x;
    const uint32_t kv = blockIdx.y / n_hchunk, hc = blockIdx.y % n_hchunk;
    const size_t i = q0 + blockIdx.z;
    const uint32_t h_lo = first_head(kv, g.Hq, g.Hkv), h_end = first_head(kv + 1, g.Hq, g.Hkv);
    const uint32_t h0 = h_lo + hc * qg;
    if (h0 >= h_end) return; /* a shorter group: this chunk has no head (uniform) */
    const uint32_t nh = (h_end - h0) < qg ? (h_end - h0) : qg;
    const int32_t qpos = a.q_pos[i];
    const size_t n_tok = a.n_sink + a.n_comp + a.n_win;
    const size_t u_begin = (size_t)split * split_len;
    const size_t u_end = u_begin + split_len < n_tok ? u_begin + split_len : n_tok;
    const size_t kvd = (size_t)g.Hkv * d;
    const uint32_t ns = g.scale_mode ? g.Hkv : 1u;
    const uint32_t gi = (uint32_t)(((size_t)kv * d) / g.F);
    const float lambda = g.logit_scale;

    /* q' of each head as pairs; accumulators cleared */
    for (uint32_t x = tid; x < nh * P; x += kThreads) {
        const uint32_t hg = x / P, p = x % P;
        const float *qh = a.q + (i * g.Hq + h0 + hg) * d;
        float re = qh[cvq_cu_re(g.layout, P, p)], im = qh[cvq_cu_im(g.layout, P, p)];
        if (!a.q_rotated) {
            float c, s;
            cvq_cu_sincos_turn(cvq_cu_phase_hi(tb.rope_t[p], qpos), &c, &s);
            cvq_cu_rotate(&re, &im, c, s);
        }
        qs[(hg * P + p) * 2] = re;
        qs[(hg * P + p) * 2 + 1] = im;
    }
    for (uint32_t x = tid; x < nh * Nc; x += kThreads) acc_code[x] = 0.0f;
    for (uint32_t x = tid; x < nh * d; x += kThreads) acc_fp[x] = 0.0f;
    if (tid < QG) {
        st[3 * tid] = -INFINITY;
        st[3 * tid + 1] = 0.0f;
        st[3 * tid + 2] = 1.0f;
    }
    __syncthreads();

    for (size_t u0 = u_begin; u0 < u_end; u0 += TT) {
        /* ---- A. metadata, codes, full-precision keys ---- */
        int has_comp = 0;
        if (tid < TT) {
            const size_t u = u0 + tid;
            int kind = KIND_NONE;
            uint32_t t = 0;
            int32_t pos = 0;
            float scale = 1.0f, sig = 0.0f;
            if (u < u_end) {
                if (u < a.n_sink) {
                    kind = KIND_SINK; t = (uint32_t)u; pos = a.sink_pos[t];
                } else if (u < a.n_sink + a.n_comp) {
                    kind = KIND_COMP; t = (uint32_t)(u - a.n_sink); pos = a.comp_pos[t];
                    scale = a.comp_kscale[(size_t)t * ns + (ns == 1 ? 0 : kv)];
                    sig = a.comp_vsigma[(size_t)t * g.groups + gi];
                } else {
                    kind = KIND_WIN; t = (uint32_t)(u - a.n_sink - a.n_comp); pos = a.win_pos[t];
                }
                if (pos > qpos) kind = KIND_NONE; /* causal: invisible */
            }
            tkind[tid] = kind;
            tidx[tid] = t;
            tpos[tid] = pos;
            tscale[tid] = scale;
            tsig[tid] = sig;
            has_comp = kind == KIND_COMP;
        }
        has_comp = __syncthreads_or(has_comp);
        for (uint32_t x = tid; x < TT * R; x += kThreads) {
            const uint32_t tt = x / R, r = x % R;
            if (tkind[tt] != KIND_COMP) continue;
            const uint32_t j = kv * R + r; /* code j of the record: bits [12j, 12j+12) */
            const uint8_t *rec = a.comp_codes + (size_t)tidx[tt] * g.key_code_bytes + ((12u * j) >> 3);
            const uint32_t two = (uint32_t)rec[0] | ((uint32_t)rec[1] << 8);
            tcodes[x] = (uint16_t)((two >> ((12u * j) & 7u)) & 0xFFFu);
        }
        for (uint32_t x = tid; x < TT * P; x += kThreads) {
            const uint32_t tt = x / P, p = x % P;
            const int kind = tkind[tt];
            float re = 0.0f, im = 0.0f;
            if (kind == KIND_SINK || kind == KIND_WIN) {
                const float *k = (kind == KIND_SINK ? a.sink_k : a.win_k) + (size_t)tidx[tt] * kvd + (size_t)kv * d;
                re = k[cvq_cu_re(g.layout, P, p)];
                im = k[cvq_cu_im(g.layout, P, p)];
            }
            K[2 * x] = re;
            K[2 * x + 1] = im;
        }

        /* ---- B. sub-code sums, one stage table at a time ---- */
        if (has_comp) {
            for (uint32_t r = 0; r < R; r++) {
                __syncthreads(); /* the previous stage's table is no longer read */
                const float4 *src = (const float4 *)(tb.key_w + ((size_t)kv * R + r) * 64 * d);
                float4 *dst = (float4 *)tab;
                for (uint32_t x = tid; x < 64 * d / 4; x += kThreads) dst[x] = src[x];
                __syncthreads();
                for (uint32_t x = tid; x < TT * P; x += kThreads) {
                    const uint32_t tt = x / P, p = x % P;
                    if (tkind[tt] != KIND_COMP) continue;
                    const uint32_t code = tcodes[tt * R + r];
                    const float2 wa = ((const float2 *)tab)[(code >> 6) * P + p];
                    const float2 wb = ((const float2 *)tab)[(code & 63u) * P + p];
                    K[2 * x] += wa.x - wb.y;     /* c_p(A, B) = (x_A - y_B, y_A + x_B) */
                    K[2 * x + 1] += wa.y + wb.x;
                }
            }
        }
        __syncthreads();

        /* ---- C. RoPE and dots, one warp per token ---- */
        for (uint32_t tt = warp; tt < TT; tt += kWarps) {
            const int kind = tkind[tt];
            if (kind == KIND_NONE) {
                if (lane < nh) Lw[lane * TT + tt] = -INFINITY;
                continue;
            }
            const int32_t pos = tpos[tt];
            float part[QG];
#pragma unroll
            for (uint32_t hg = 0; hg < QG; hg++) part[hg] = 0.0f;
            for (uint32_t p = lane; p < P; p += 32) {
                float re = K[2 * (tt * P + p)], im = K[2 * (tt * P + p) + 1];
                float c, s;
                cvq_cu_sincos_turn(cvq_cu_phase_hi(tb.rope_t[p], pos), &c, &s);
                cvq_cu_rotate(&re, &im, c, s);
#pragma unroll
                for (uint32_t hg = 0; hg < QG; hg++)
                    if (hg < nh) part[hg] += qs[(hg * P + p) * 2] * re + qs[(hg * P + p) * 2 + 1] * im;
            }
            const float f = lambda * tscale[tt];
#pragma unroll
            for (uint32_t hg = 0; hg < QG; hg++) {
                if (hg < nh) {
                    const float dot = warp_sum(part[hg]);
                    if (lane == 0) Lw[hg * TT + tt] = f * dot;
                }
            }
        }
        __syncthreads();

        /* ---- D. online softmax, one warp per head ---- */
        for (uint32_t hg = warp; hg < nh; hg += kWarps) {
            float mx = -INFINITY;
            for (uint32_t tt = lane; tt < TT; tt += 32) mx = fmaxf(mx, Lw[hg * TT + tt]);
            mx = warp_max(mx);
            const float m_old = st[3 * hg];
            const float m_new = fmaxf(m_old, mx);
            float sum = 0.0f;
            for (uint32_t tt = lane; tt < TT; tt += 32) {
                const float l = Lw[hg * TT + tt];
                const float w = (l == -INFINITY) ? 0.0f : expf(l - m_new);
                Lw[hg * TT + tt] = w;
                sum += w;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                const float resc = (m_old == -INFINITY) ? 0.0f : expf(m_old - m_new);
                st[3 * hg] = m_new;
                st[3 * hg + 1] = st[3 * hg + 1] * resc + sum;
                st[3 * hg + 2] = resc;
            }
        }
        __syncthreads();

        /* ---- E. values ---- */
        /* code space: thread per byte unit (8 bits) of the group's Nc bits */
        for (uint32_t unit = tid; unit < Nc / 8; unit += kThreads) {
            float acc[QG][8];
#pragma unroll
            for (uint32_t hg = 0; hg < QG; hg++) {
                const float resc = hg < nh ? st[3 * hg + 2] : 0.0f;
#pragma unroll
                for (uint32_t k = 0; k < 8; k++) acc[hg][k] = hg < nh ? acc_code[hg * Nc + 8 * unit + k] * resc : 0.0f;
            }
            if (has_comp) {
                for (uint32_t tt = 0; tt < TT; tt++) {
                    if (tkind[tt] != KIND_COMP) continue;
                    const uint32_t byte =
                        a.comp_vbits[(size_t)tidx[tt] * g.value_bit_bytes + (size_t)gi * (Nc / 8) + unit];
                    if (byte == 0) continue;
                    const float sig = tsig[tt];
#pragma unroll
                    for (uint32_t hg = 0; hg < QG; hg++) {
                        if (hg < nh) {
                            const float wt = Lw[hg * TT + tt] * sig;
#pragma unroll
                            for (uint32_t k = 0; k < 8; k++)
                                if ((byte >> k) & 1u) acc[hg][k] += wt;
                        }
                    }
                }
            }
#pragma unroll
            for (uint32_t hg = 0; hg < QG; hg++)
                if (hg < nh)
#pragma unroll
                    for (uint32_t k = 0; k < 8; k++) acc_code[hg * Nc + 8 * unit + k] = acc[hg][k];
        }
        /* full precision: thread per (head, feature) */
        for (uint32_t x = tid; x < nh * d; x += kThreads) {
            const uint32_t hg = x / d, f = x % d;
            float o = acc_fp[x] * st[3 * hg + 2];
            for (uint32_t tt = 0; tt < TT; tt++) {
                const int kind = tkind[tt];
                if (kind != KIND_SINK && kind != KIND_WIN) continue;
                const float *v = (kind == KIND_SINK ? a.sink_v : a.win_v) + (size_t)tidx[tt] * kvd + (size_t)kv * d;
                o += Lw[hg * TT + tt] * v[f];
            }
            acc_fp[x] = o;
        }
        __syncthreads();
    }

    /* partials of (i, h, split): [m, l, acc_code[Nc], acc_fp[d]] */
    const size_t rec = 2 + (size_t)Nc + d;
    for (uint32_t hg = 0; hg < nh; hg++) {
        float *pr = a.scratch + ((i * g.Hq + h0 + hg) * n_split + split) * rec;
        if (tid == 0) {
            pr[0] = st[3 * hg];
            pr[1] = st[3 * hg + 1];
        }
        for (uint32_t b = tid; b < Nc; b += kThreads) pr[2 + b] = acc_code[hg * Nc + b];
        for (uint32_t f = tid; f < d; f += kThreads) pr[2 + Nc + f] = acc_fp[hg * d + f];
    }
}

/* One block per (query, head): merges the n_split partials, applies E. */
__global__ void __launch_bounds__(kThreads)
attend_reduce(cvq_cu_geom g, cvq_cu_tables tb, cvq_cu_attend a, uint32_t q0, uint32_t n_split,
              const uint32_t *status) {
    CVQ_DYN_SMEM(unsigned char, s_raw);
    __shared__ float s_l;
    if (*status != 0) return;
    const uint32_t tid = threadIdx.x;
    const uint32_t d = g.d, Nc = g.Nc;
    const size_t qh = (size_t)q0 * g.Hq + blockIdx.x; /* (i, h) */
    const uint32_t h = (uint32_t)(qh % g.Hq);
    const uint32_t kv = (uint32_t)(((uint64_t)h * g.Hkv) / g.Hq);
    const uint32_t gi = (uint32_t)(((size_t)kv * d) / g.F), c0 = (uint32_t)((size_t)kv * d - (size_t)gi * g.F);
    float *acc = (float *)s_raw;          /* [Nc] */
    float *scl = acc + Nc;                /* [n_split] */
    const size_t rec = 2 + (size_t)Nc + d;
    const float *pr = a.scratch + qh * n_split * rec;
    float *out = a.out + qh * d;
    if (tid == 0) {
        /* A split's sum l is NaN when one of its logits overflowed binary32
         * (+-Inf products, Inf - Inf in the softmax): the whole head is then
         * NaN, as on the CPU, never the zeros of a head that sees no token
         * (the host API turns a non-finite output into CVQ_ERR_INPUT_RANGE
         * with the output zeroed; interop callers see the NaN). */
        int overflow = 0;
        float M = -INFINITY;
        for (uint32_t s = 0; s < n_split; s++) {
            if (pr[s * rec + 1] != pr[s * rec + 1]) overflow = 1;
            if (pr[s * rec + 1] > 0.0f) M = fmaxf(M, pr[s * rec]);
        }
        float l = 0.0f;
        for (uint32_t s = 0; s < n_split; s++) {
            const float w = pr[s * rec + 1] > 0.0f ? expf(pr[s * rec] - M) : 0.0f;
            scl[s] = w;
            l += pr[s * rec + 1] * w;
        }
        s_l = overflow ? cvq_cu_float(0x7FC00000u) : l;
    }
    __syncthreads();
    if (s_l != s_l) { /* a logit overflowed: NaN */
        for (uint32_t f = tid; f < d; f += kThreads) out[f] = cvq_cu_float(0x7FC00000u);
        return;
    }
    if (!(s_l > 0.0f)) { /* sees no token: zeros */
        for (uint32_t f = tid; f < d; f += kThreads) out[f] = 0.0f;
        return;
    }
    for (uint32_t b = tid; b < Nc; b += kThreads) {
        float s = 0.0f;
        for (uint32_t k = 0; k < n_split; k++) s += scl[k] * pr[k * rec + 2 + b];
        acc[b] = s;
    }
    __syncthreads();
    const float inv_l = 1.0f / s_l;
    const float *E = tb.E + (size_t)gi * Nc * g.F + c0; /* E[gi][b][c0 + f] = E[b*F + f] */
    const float *ls_eps = tb.ls_eps + (size_t)gi * g.F + c0;
    for (uint32_t f = tid; f < d; f += kThreads) {
        float fp = 0.0f;
        for (uint32_t k = 0; k < n_split; k++) fp += scl[k] * pr[k * rec + 2 + Nc + f];
        float sum = 0.0f;
        for (uint32_t b = 0; b < Nc; b++) sum += acc[b] * E[(size_t)b * g.F + f];
        out[f] = (fp + ls_eps[f] * sum) * inv_l;
    }
}

} // namespace

extern "C" int cvq_cu_attend_plan_make(const cvq_cu_geom *g, size_t n_q, size_t n_tok, size_t smem_max,
                                       uint32_t n_sm, uint32_t tile, cvq_cu_attend_plan *p, const char **why) {
    *why = "";
    const uint32_t gmax = (g->Hq + g->Hkv - 1) / g->Hkv; /* largest GQA group */
    uint32_t qg = gmax < QG ? gmax : QG;
    const uint32_t TT0 = (tile >= 16 && tile <= 256 && !(tile & (tile - 1))) ? tile : (g->d <= 128 ? 64u : 32u);
    uint32_t TT = TT0;
    smem_layout L;
    for (;;) {
        layout_of(&L, g->d, qg, TT, g->Nc, g->R);
        if (L.total <= smem_max) break;
        if (TT > 16) {
            TT /= 2;
        } else if (qg > 1) {
            qg = (qg + 1) / 2;
            TT = TT0;
        } else {
            *why = "the attention kernel's shared memory (one stage table, a tile of keys and the code-space "
                   "accumulators) exceeds the device's limit per block";
            return 1;
        }
    }
    p->tile = TT;
    p->qg = qg;
    p->n_hchunk = (gmax + qg - 1) / qg;
    p->smem = L.total;
    /* split-K: about 4 blocks per multiprocessor, at least 4 tiles per split */
    const size_t base = (size_t)g->Hkv * p->n_hchunk * (n_q ? n_q : 1);
    const size_t target = (size_t)(n_sm ? n_sm : 1) * 4;
    size_t n_split = (target + base - 1) / base;
    const size_t most = (n_tok + 4 * (size_t)TT - 1) / (4 * (size_t)TT);
    if (n_split > most) n_split = most;
    if (n_split < 1) n_split = 1;
    size_t len = (n_tok + n_split - 1) / n_split;
    len = (len + TT - 1) / TT * TT;
    if (len == 0) len = TT;
    n_split = n_tok ? (n_tok + len - 1) / len : 1;
    if (len > 0xFFFFFFFFu || n_split > 65535) {
        *why = "too many tokens for one attention call";
        return 1;
    }
    p->split_len = (uint32_t)len;
    p->n_split = (uint32_t)n_split;
    p->smem_reduce = ((size_t)g->Nc + n_split) * 4;
    if (p->smem_reduce > smem_max) {
        *why = "the attention reduction's shared memory (Nc + splits floats) exceeds the device's limit";
        return 1;
    }
    p->scratch_bytes = n_q * g->Hq * n_split * (2 + (size_t)g->Nc + g->d) * 4;
    return 0;
}

/* The launchers. cuda_emulated (tests/cuda) has launchers of its own; the
 * emulated device (tests/cuda/fake_device.cpp) runs these, CVQ_CU_EMULATE_LAUNCHERS. */
#if !defined(CVQ_CU_EMULATE) || defined(CVQ_CU_EMULATE_LAUNCHERS)

extern "C" int cvq_cu_launch_attend(const cvq_cu_geom *g, const cvq_cu_tables *t, const cvq_cu_attend *a,
                                    const cvq_cu_attend_plan *p, uint32_t *status, cudaStream_t s) {
    if (a->n_q == 0) return cudaSuccess;
    cudaError_t e = cudaMemsetAsync(status, 0, sizeof(uint32_t), s);
    if (e != cudaSuccess) return e;
    const size_t nqv = a->n_q * g->Hq * g->d;
    const size_t blocks = (nqv + 255) / 256;
    CVQ_CU_LAUNCH(check_queries, (unsigned)(blocks < 4096 ? blocks : 4096), 256, 0, s)(a->q, nqv, status);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
    if ((e = (cudaError_t)cvq_cu_launch_fold(status, s)) != cudaSuccess) return e;
    if (p->smem > 48 * 1024) {
        e = cudaFuncSetAttribute(attend_split, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)p->smem);
        if (e != cudaSuccess) return e;
    }
    if (p->smem_reduce > 48 * 1024) {
        e = cudaFuncSetAttribute(attend_reduce, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)p->smem_reduce);
        if (e != cudaSuccess) return e;
    }
    /* Queries in chunks of 65535 (grid z); every split kernel first, then
     * the reductions: an error before the reductions leaves `out` untouched. */
    for (size_t q0 = 0; q0 < a->n_q; q0 += 65535) {
        const size_t m = a->n_q - q0 < 65535 ? a->n_q - q0 : 65535;
        dim3 grid(p->n_split, g->Hkv * p->n_hchunk, (unsigned)m);
        CVQ_CU_LAUNCH(attend_split, grid, kThreads, p->smem, s)(*g, *t, *a, (uint32_t)q0, p->tile, p->qg,
                                                                p->n_hchunk, p->split_len, p->n_split, status);
        if ((e = cudaGetLastError()) != cudaSuccess) return e;
    }
    for (size_t q0 = 0; q0 < a->n_q; q0 += 65535) {
        const size_t m = a->n_q - q0 < 65535 ? a->n_q - q0 : 65535;
        CVQ_CU_LAUNCH(attend_reduce, (unsigned)(m * g->Hq), kThreads, p->smem_reduce, s)(*g, *t, *a, (uint32_t)q0,
                                                                                         p->n_split, status);
        if ((e = cudaGetLastError()) != cudaSuccess) return e;
    }
    return cudaSuccess;
}
#endif
