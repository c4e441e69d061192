/*
 * The numerics contract (docs/numerics.md) for the CUDA kernels, as
 * __host__ __device__ functions: each one is the operation-for-operation
 * port of core/numerics.c or of one step of core/ref_keys.c /
 * core/ref_values.c. The kernels are built only from these steps, and the
 * host compilation of the same functions (cuda_numerics_host.cu) is
 * compared bit for bit with the C library by tests/test_cuda.c, so the
 * orders of operations are checked on any machine, GPU or not.
 *
 * Rounding: on the device every +, -, * and / goes through the correctly
 * rounded intrinsics __fadd_rn / __fsub_rn / __fmul_rn / __fdiv_rn /
 * __fsqrt_rn, which the compiler never contracts into an FMA (the files are
 * also built with -fmad=false -ftz=false -prec-div=true -prec-sqrt=true, so
 * subnormals survive). On the host the same expressions are plain C++
 * operators built with -ffp-contract=off, i.e. the C library's semantics.
 */
#ifndef CVQ_CUDA_NUMERICS_CUH
#define CVQ_CUDA_NUMERICS_CUH

#include <stdint.h>
#include <math.h>

#if defined(__CUDACC__)
#define CVQ_HD __host__ __device__ __forceinline__
#else
#define CVQ_HD static inline
#endif

#ifdef __CUDA_ARCH__
#define CVQ_ADD(a, b) __fadd_rn((a), (b))
#define CVQ_SUB(a, b) __fsub_rn((a), (b))
#define CVQ_MUL(a, b) __fmul_rn((a), (b))
#define CVQ_DIV(a, b) __fdiv_rn((a), (b))
#define CVQ_SQRT(a) __fsqrt_rn(a)
#else
#define CVQ_ADD(a, b) ((float)((a) + (b)))
#define CVQ_SUB(a, b) ((float)((a) - (b)))
#define CVQ_MUL(a, b) ((float)((a) * (b)))
#define CVQ_DIV(a, b) ((float)((a) / (b)))
#define CVQ_SQRT(a) sqrtf(a)
#endif

/* The dynamic shared memory of a kernel as `type *name`. Under
 * CVQ_CU_EMULATE (tests/cuda/cuda_emu.h: the kernels run on CPU threads)
 * the emulator supplies the block's buffer. */
#ifdef CVQ_CU_EMULATE
#define CVQ_DYN_SMEM(type, name) type *name = (type *)cvq_emu_dyn_smem()
#else
#define CVQ_DYN_SMEM(type, name)                       \
    extern __shared__ __align__(16) type name##_raw_[]; \
    type *name = name##_raw_
#endif

/* A kernel launch, `CVQ_CU_LAUNCH(kernel, grid, block, smem, stream)(args...)`:
 * `kernel<<<grid, block, smem, stream>>>(args...)` under nvcc; under
 * CVQ_CU_EMULATE the emulator's launcher (tests/cuda/cuda_emu.h), so that the
 * launch sequences of the .cu files themselves run on the emulated device. */
#ifdef CVQ_CU_EMULATE
#define CVQ_CU_LAUNCH(k, grid, block, smem, stream) cvq_emu_launcher(k, #k, grid, block, smem, stream)
#else
#define CVQ_CU_LAUNCH(k, grid, block, smem, stream) k<<<grid, block, smem, stream>>>
#endif

/* Float bits <-> uint32 without aliasing problems on host and device. */
CVQ_HD uint32_t cvq_cu_bits(float x) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(x);
#else
    union { float f; uint32_t u; } v;
    v.f = x;
    return v.u;
#endif
}
CVQ_HD float cvq_cu_float(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    union { float f; uint32_t u; } v;
    v.u = u;
    return v.f;
#endif
}
/* NaN or +-Inf (exponent all ones), on the bits. */
CVQ_HD bool cvq_cu_nonfinite(float x) { return (cvq_cu_bits(x) & 0x7F800000u) == 0x7F800000u; }

/* ---- erf / GELU (numerics.md section 7; core/numerics.c) ------------------------- */

/* Horner from the highest coefficient, q = q*u + c[i], each product and sum
 * rounded: written out per polynomial (coefficients of core/numerics.c). */
CVQ_HD float cvq_cu_erf_p(float t) {
    float q = 7.875875e-05f;
    q = CVQ_ADD(CVQ_MUL(q, t), -8.0168643e-04f);
    q = CVQ_ADD(CVQ_MUL(q, t), 5.1890872e-03f);
    q = CVQ_ADD(CVQ_MUL(q, t), -2.6854211e-02f);
    q = CVQ_ADD(CVQ_MUL(q, t), 1.1283594e-01f);
    q = CVQ_ADD(CVQ_MUL(q, t), -3.7612626e-01f);
    q = CVQ_ADD(CVQ_MUL(q, t), 1.2837917e-01f);
    return q;
}
CVQ_HD float cvq_cu_erf_q1(float u) {
    float q = -1.5553908e-03f;
    q = CVQ_ADD(CVQ_MUL(q, u), 2.4021883e-03f);
    q = CVQ_ADD(CVQ_MUL(q, u), 4.709594e-03f);
    q = CVQ_ADD(CVQ_MUL(q, u), -1.9333558e-02f);
    q = CVQ_ADD(CVQ_MUL(q, u), 1.4869261e-02f);
    q = CVQ_ADD(CVQ_MUL(q, u), 4.459947e-02f);
    q = CVQ_ADD(CVQ_MUL(q, u), -1.387521e-01f);
    q = CVQ_ADD(CVQ_MUL(q, u), 1.7839542e-01f);
    q = CVQ_ADD(CVQ_MUL(q, u), -1.1893029e-01f);
    q = CVQ_ADD(CVQ_MUL(q, u), 3.389485e-02f);
    return q;
}
CVQ_HD float cvq_cu_erf_q2(float u) {
    float q = 2.45938e-04f;
    q = CVQ_ADD(CVQ_MUL(q, u), -3.0636598e-04f);
    q = CVQ_ADD(CVQ_MUL(q, u), -5.413816e-04f);
    q = CVQ_ADD(CVQ_MUL(q, u), 2.808239e-03f);
    q = CVQ_ADD(CVQ_MUL(q, u), -6.117443e-03f);
    q = CVQ_ADD(CVQ_MUL(q, u), 8.621515e-03f);
    q = CVQ_ADD(CVQ_MUL(q, u), -8.350086e-03f);
    q = CVQ_ADD(CVQ_MUL(q, u), 5.4457374e-03f);
    q = CVQ_ADD(CVQ_MUL(q, u), -2.1782843e-03f);
    q = CVQ_ADD(CVQ_MUL(q, u), 4.0695188e-04f);
    return q;
}
CVQ_HD float cvq_cu_erf_q3(float u) {
    float q = -6.591919e-05f;
    q = CVQ_ADD(CVQ_MUL(q, u), 9.564772e-05f);
    q = CVQ_ADD(CVQ_MUL(q, u), -8.0906415e-05f);
    q = CVQ_ADD(CVQ_MUL(q, u), 6.4883556e-05f);
    q = CVQ_ADD(CVQ_MUL(q, u), -4.2356052e-05f);
    q = CVQ_ADD(CVQ_MUL(q, u), 1.9040433e-05f);
    q = CVQ_ADD(CVQ_MUL(q, u), -5.398954e-06f);
    q = CVQ_ADD(CVQ_MUL(q, u), 7.4198454e-07f);
    return q;
}

CVQ_HD float cvq_cu_erf(float x) {
    if ((cvq_cu_bits(x) & 0x7FFFFFFFu) > 0x7F800000u) return x; /* NaN in, NaN out */
    const float a = x < 0.0f ? -x : x; /* exact; -0 stays -0 */
    float r;
    if (a < 1.0f) {
        const float t = CVQ_MUL(a, a);
        r = CVQ_ADD(a, CVQ_MUL(a, cvq_cu_erf_p(t)));
    } else if (a < 2.0f) {
        r = CVQ_SUB(1.0f, cvq_cu_erf_q1(CVQ_SUB(a, 1.5f)));
    } else if (a < 3.0f) {
        r = CVQ_SUB(1.0f, cvq_cu_erf_q2(CVQ_SUB(a, 2.5f)));
    } else if (a < 4.0f) {
        r = CVQ_SUB(1.0f, cvq_cu_erf_q3(CVQ_SUB(a, 3.5f)));
    } else {
        r = 1.0f;
    }
    return x < 0.0f ? -r : r;
}

/* (0.5f*x) * (1.0f + erf(x * 0.70710677f)) */
CVQ_HD float cvq_cu_gelu(float x) {
    const float h = CVQ_MUL(0.5f, x);
    const float e = cvq_cu_erf(CVQ_MUL(x, 0.70710677f));
    return CVQ_MUL(h, CVQ_ADD(1.0f, e));
}

/* ---- RoPE (numerics.md section 5) -------------------------------------------------- */

/* Top 32 bits of (pos * t) mod 2^64, pos >= 0: a turn in 2^-32 units. */
CVQ_HD uint32_t cvq_cu_phase_hi(uint64_t t, int32_t pos) {
    return (uint32_t)(((uint64_t)(uint32_t)pos * t) >> 32);
}

/* cos and sin of 2*pi*turn/2^32: cvq_sincos_turn of core/numerics.c. */
CVQ_HD void cvq_cu_sincos_turn(uint32_t turn, float *c, float *s) {
    const uint32_t q = turn >> 30;          /* quadrant */
    const uint32_t w = turn & 0x3FFFFFFFu;  /* position inside it */
    uint32_t m;
    bool swap;
    if (w < 0x20000000u) {
        m = (w + 16u) >> 5;
        swap = false;
    } else {
        m = ((0x40000000u - w) + 16u) >> 5;
        swap = true;
    }
    /* K = fl32(pi) * 2^-26, exact; (float)m exact (m <= 2^24) */
    const float a = CVQ_MUL((float)m, cvq_cu_float(0x33490FDBu));
    const float a2 = CVQ_MUL(a, a);
    const float a3 = CVQ_MUL(a, a2);
    float hs = 2.7557319e-06f;
    hs = CVQ_ADD(CVQ_MUL(hs, a2), -1.984127e-04f);
    hs = CVQ_ADD(CVQ_MUL(hs, a2), 8.333334e-03f);
    hs = CVQ_ADD(CVQ_MUL(hs, a2), -1.6666667e-01f);
    float sa = CVQ_ADD(a, CVQ_MUL(a3, hs));
    float hc = -2.755732e-07f;
    hc = CVQ_ADD(CVQ_MUL(hc, a2), 2.4801588e-05f);
    hc = CVQ_ADD(CVQ_MUL(hc, a2), -1.3888889e-03f);
    hc = CVQ_ADD(CVQ_MUL(hc, a2), 4.1666668e-02f);
    hc = CVQ_ADD(CVQ_MUL(hc, a2), -5.0e-01f);
    float ca = CVQ_ADD(1.0f, CVQ_MUL(a2, hc));
    if (swap) {
        const float tmp = sa;
        sa = ca;
        ca = tmp;
    }
    switch (q) {
    case 0: *c = ca; *s = sa; break;
    case 1: *c = -sa; *s = ca; break;
    case 2: *c = -ca; *s = -sa; break;
    default: *c = sa; *s = -ca; break;
    }
}

/* (re, im) <- (re*c - im*s, re*s + im*c), each product rounded. */
CVQ_HD void cvq_cu_rotate(float *re, float *im, float c, float s) {
    const float rc = CVQ_MUL(*re, c), is = CVQ_MUL(*im, s);
    const float rs = CVQ_MUL(*re, s), ic = CVQ_MUL(*im, c);
    *re = CVQ_SUB(rc, is);
    *im = CVQ_ADD(rs, ic);
}

/* Head-layout indices of pair p (layout 0 rotate_half, 1 interleaved). */
CVQ_HD uint32_t cvq_cu_re(uint32_t layout, uint32_t P, uint32_t p) { return layout ? 2u * p : p; }
CVQ_HD uint32_t cvq_cu_im(uint32_t layout, uint32_t P, uint32_t p) { return layout ? 2u * p + 1u : p + P; }

/* ---- key encoding steps (numerics.md section 2; core/ref_keys.c) ----------------- */

/* ss = 0; ss = ss + x[i]*x[i], i ascending. */
CVQ_HD float cvq_cu_sum_squares(const float *x, uint32_t n) {
    float ss = 0.0f;
    for (uint32_t i = 0; i < n; i++) ss = CVQ_ADD(ss, CVQ_MUL(x[i], x[i]));
    return ss;
}

/* f[a] and g[a] of sub-code a: w = w[a][p][2] (P pairs), z the residual in
 * head layout, na = n[a]. dr = dr + (wx*zr + wy*zi); di = di + (wx*zi -
 * wy*zr), p ascending; f = n - 2*dr; g = n - 2*di. */
CVQ_HD void cvq_cu_subcode_fg(const float *w, const float *z, uint32_t P, uint32_t layout, float na,
                              float *f, float *g) {
    float dr = 0.0f, di = 0.0f;
    for (uint32_t p = 0; p < P; p++) {
        const float wx = w[2 * p], wy = w[2 * p + 1];
        const float zr = z[cvq_cu_re(layout, P, p)], zi = z[cvq_cu_im(layout, P, p)];
        dr = CVQ_ADD(dr, CVQ_ADD(CVQ_MUL(wx, zr), CVQ_MUL(wy, zi)));
        di = CVQ_ADD(di, CVQ_SUB(CVQ_MUL(wx, zi), CVQ_MUL(wy, zr)));
    }
    *f = CVQ_SUB(na, CVQ_MUL(2.0f, dr));
    *g = CVQ_SUB(na, CVQ_MUL(2.0f, di));
}

/* A uint ordering like the float distance (IEEE <, -0 == +0); NaN maps to
 * 0xFFFFFFFF, above +Inf's key, so it never wins. */
#define CVQ_CU_KEY_NONE 0xFF800000u
CVQ_HD uint32_t cvq_cu_order_key(float x) {
    uint32_t u = cvq_cu_bits(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFFFFFFu;
    if (u == 0x80000000u) u = 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* dist of code k = 64*A + B: (f[A] + g[B]) + G[A][B]. */
CVQ_HD float cvq_cu_dist(const float *f, const float *g, const float *G, uint32_t k) {
    return CVQ_ADD(CVQ_ADD(f[k >> 6], g[k & 63u]), G[k]);
}

/* Scan of k = k0, k0+step, ... < 4096 ascending, keeping the first strict
 * minimum of the order key. *key / *idx in: the running best (KEY_NONE /
 * any), out: updated. Merging the per-thread bests by (smallest key, then
 * smallest index) gives the sequential strict-< scan's answer. */
CVQ_HD void cvq_cu_scan(const float *f, const float *g, const float *G, uint32_t k0, uint32_t step,
                        uint32_t *key, uint32_t *idx) {
    for (uint32_t k = k0; k < 4096u; k += step) {
        const uint32_t kk = cvq_cu_order_key(cvq_cu_dist(f, g, G, k));
        if (kk < *key) {
            *key = kk;
            *idx = k;
        }
    }
}

/* Residual of pair p: z -= c_p(A, B), c = (x_A - y_B, y_A + x_B) rounded
 * first. wA, wB: rows w[A], w[B] ([P][2]). */
CVQ_HD void cvq_cu_residual_pair(const float *wA, const float *wB, float *z, uint32_t P, uint32_t layout,
                                 uint32_t p) {
    const float cr = CVQ_SUB(wA[2 * p], wB[2 * p + 1]);
    const float ci = CVQ_ADD(wA[2 * p + 1], wB[2 * p]);
    const uint32_t ire = cvq_cu_re(layout, P, p), iim = cvq_cu_im(layout, P, p);
    z[ire] = CVQ_SUB(z[ire], cr);
    z[iim] = CVQ_SUB(z[iim], ci);
}

/* ---- value encoding steps (numerics.md section 4; core/ref_values.c) -------------- */

#define CVQ_CU_VAL_EPS 1e-6f
#define CVQ_CU_LN_EPS 1e-5f

/* ss of x[j] = v[j] * inv_ls[j], j ascending (the rounded product). */
CVQ_HD float cvq_cu_value_ss(const float *v, const float *inv_ls, uint32_t F) {
    float ss = 0.0f;
    for (uint32_t j = 0; j < F; j++) {
        const float x = CVQ_MUL(v[j], inv_ls[j]);
        ss = CVQ_ADD(ss, CVQ_MUL(x, x));
    }
    return ss;
}
/* rp = 1 / (pre + 1e-6f) */
CVQ_HD float cvq_cu_value_rp(float pre) { return CVQ_DIV(1.0f, CVQ_ADD(pre, CVQ_CU_VAL_EPS)); }
/* x[j] = (v[j] * inv_ls[j]) * rp */
CVQ_HD float cvq_cu_value_x(float v, float inv_ls, float rp) { return CVQ_MUL(CVQ_MUL(v, inv_ls), rp); }
/* LayerNorm statistics, two passes: mean = (sum x) * inv_F; var = (sum
 * (x-mean)^2) * inv_F; rstd = 1 / sqrt(var + 1e-5f). */
CVQ_HD void cvq_cu_ln_stats(const float *x, uint32_t F, float inv_F, float *mean, float *rstd) {
    float sum = 0.0f;
    for (uint32_t j = 0; j < F; j++) sum = CVQ_ADD(sum, x[j]);
    const float m = CVQ_MUL(sum, inv_F);
    float acc = 0.0f;
    for (uint32_t j = 0; j < F; j++) {
        const float dj = CVQ_SUB(x[j], m);
        acc = CVQ_ADD(acc, CVQ_MUL(dj, dj));
    }
    const float var = CVQ_MUL(acc, inv_F);
    *mean = m;
    *rstd = CVQ_DIV(1.0f, CVQ_SQRT(CVQ_ADD(var, CVQ_CU_LN_EPS)));
}
/* y = ((x - mean) * rstd) * ln_w + ln_b */
CVQ_HD float cvq_cu_ln_apply(float x, float mean, float rstd, float w, float b) {
    return CVQ_ADD(CVQ_MUL(CVQ_MUL(CVQ_SUB(x, mean), rstd), w), b);
}
/* Linear output: acc = 0; acc = acc + W[i]*x[i] ascending; out = acc + bias. */
CVQ_HD float cvq_cu_linear(const float *wrow, const float *x, uint32_t n, float bias) {
    float acc = 0.0f;
    for (uint32_t i = 0; i < n; i++) acc = CVQ_ADD(acc, CVQ_MUL(wrow[i], x[i]));
    return CVQ_ADD(acc, bias);
}
/* 4-way argmax of o[0..3] (strict >: lowest index on ties, NaN never wins);
 * returns the two bits (b_{2t} in bit 0, b_{2t+1} in bit 1):
 * j=0 -> (1,0), 1 -> (0,1), 2 -> (1,1), 3 -> (0,0). */
CVQ_HD uint32_t cvq_cu_argmax4_bits(float o0, float o1, float o2, float o3) {
    uint32_t j = 0;
    float best = o0;
    if (o1 > best) { best = o1; j = 1; }
    if (o2 > best) { best = o2; j = 2; }
    if (o3 > best) { best = o3; j = 3; }
    (void)best;
    return j == 0 ? 1u : j == 1 ? 2u : j == 2 ? 3u : 0u;
}
/* u[f] = sum of E[b][f] over set bits b ascending (bits: packed LSB first),
 * E column f with row stride F. */
CVQ_HD float cvq_cu_code_vector(const uint8_t *bits, const float *Ecol, uint32_t Nc, uint32_t F) {
    float u = 0.0f;
    for (uint32_t b = 0; b < Nc; b++)
        if ((bits[b >> 3] >> (b & 7u)) & 1u) u = CVQ_ADD(u, Ecol[(size_t)b * F]);
    return u;
}
/* sigma = (pre + 1e-6f) / (sqrt(nu2) + 1e-6f), nu2 = sum u[f]^2 ascending. */
CVQ_HD float cvq_cu_sigma(const float *u, uint32_t F, float pre) {
    const float nu = CVQ_SQRT(cvq_cu_sum_squares(u, F));
    return CVQ_DIV(CVQ_ADD(pre, CVQ_CU_VAL_EPS), CVQ_ADD(nu, CVQ_CU_VAL_EPS));
}

#endif
