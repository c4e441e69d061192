/*
 * Host builds of the kernels' numerics (cuda_numerics.cuh), for
 * tests/test_cuda.c: the same __host__ __device__ steps, composed the way
 * the kernels of cuda_kernels_encode.cu compose them (including the key
 * encoder's split of the argmin over threads and its merge), compiled for
 * the host with -ffp-contract=off. The test compares them bit for bit with
 * the C library (core/numerics.c, core/ref_keys.c, core/ref_values.c), so
 * the orders of operations of the device code are checked on any machine.
 * What this cannot check is the device itself (the intrinsics' rounding,
 * the compiler's code for sm_XX): that is cuda_check's job on a GPU.
 */
#include "cuda_launch.h"
#include "cuda_numerics.cuh"

extern "C" void cvq_cuda_host_sincos_turn(uint32_t turn, float *c, float *s) { cvq_cu_sincos_turn(turn, c, s); }
extern "C" uint32_t cvq_cuda_host_phase_hi(uint64_t t, int32_t pos) { return cvq_cu_phase_hi(t, pos); }
extern "C" float cvq_cuda_host_erf(float x) { return cvq_cu_erf(x); }
extern "C" float cvq_cuda_host_gelu(float x) { return cvq_cu_gelu(x); }

extern "C" void cvq_cuda_host_encode_key_token(const cvq_cu_geom *g, const float *key_w, const float *key_n,
                                               const float *key_G, const float *k, uint32_t threads,
                                               uint16_t *codes, float *scales) {
    const uint32_t d = g->d, P = g->P, R = g->R, H = g->Hkv;
    float z[256], f[64], gg[64];
    float ss_tok = 0.0f;
    if (g->scale_mode == 0) {
        ss_tok = cvq_cu_sum_squares(k, H * d);
        scales[0] = CVQ_SQRT(ss_tok);
    }
    for (uint32_t h = 0; h < H; h++) {
        const float *kh = k + (size_t)h * d;
        float ss = ss_tok;
        if (g->scale_mode != 0) {
            ss = cvq_cu_sum_squares(kh, d);
            scales[h] = CVQ_SQRT(ss);
        }
        uint16_t *ch = codes + (size_t)h * R;
        if (ss == 0.0f) {
            for (uint32_t r = 0; r < R; r++) ch[r] = 0;
            continue;
        }
        const float inv = CVQ_DIV(1.0f, CVQ_SQRT(ss));
        for (uint32_t i = 0; i < d; i++) z[i] = CVQ_MUL(kh[i], inv);
        for (uint32_t r = 0; r < R; r++) {
            const size_t tb = (size_t)h * R + r;
            const float *w = key_w + tb * 64 * P * 2;
            for (uint32_t a = 0; a < 64; a++)
                cvq_cu_subcode_fg(w + (size_t)a * P * 2, z, P, g->layout, key_n[tb * 64 + a], &f[a], &gg[a]);
            /* the kernel: each thread's strided scan, then min key, then min index */
            uint32_t best_key = CVQ_CU_KEY_NONE, best_idx = 0xFFFFFFFFu;
            for (uint32_t t = 0; t < threads; t++) {
                uint32_t key = CVQ_CU_KEY_NONE, idx = 0xFFFFFFFFu;
                cvq_cu_scan(f, gg, key_G + tb * 4096, t, threads, &key, &idx);
                if (key < best_key || (key == best_key && key < CVQ_CU_KEY_NONE && idx < best_idx)) {
                    best_key = key;
                    best_idx = idx;
                }
            }
            const uint32_t code = best_key < CVQ_CU_KEY_NONE ? best_idx : 0u;
            const float *wA = w + (size_t)(code >> 6) * P * 2, *wB = w + (size_t)(code & 63u) * P * 2;
            for (uint32_t p = 0; p < P; p++) cvq_cu_residual_pair(wA, wB, z, P, g->layout, p);
            ch[r] = (uint16_t)code;
        }
    }
}

extern "C" void cvq_cuda_host_encode_value_token(const cvq_cu_geom *g, const cvq_cu_tables *t, const float *v,
                                                 float *scratch, uint8_t *bits, float *sigma) {
    const uint32_t F = g->F, I = g->I, Nc = g->Nc;
    float *x = scratch, *hid = scratch + F;
    for (uint32_t gi = 0; gi < g->groups; gi++) {
        const float *vg = v + (size_t)gi * F;
        const float *inv_ls = t->inv_ls + (size_t)gi * F;
        const float *ln_w = t->ln_w + (size_t)gi * F, *ln_b = t->ln_b + (size_t)gi * F;
        const float *w1 = t->w1 + (size_t)gi * I * F, *b1 = t->b1 + (size_t)gi * I;
        const float *w2 = t->w2 + (size_t)gi * 2 * Nc * I, *b2 = t->b2 + (size_t)gi * 2 * Nc;
        const float *E = t->E + (size_t)gi * Nc * F;
        uint8_t *bg = bits + (size_t)gi * (Nc / 8);
        const float pre = CVQ_SQRT(cvq_cu_value_ss(vg, inv_ls, F));
        const float rp = cvq_cu_value_rp(pre);
        for (uint32_t j = 0; j < F; j++) x[j] = cvq_cu_value_x(vg[j], inv_ls[j], rp);
        float mean, rstd;
        cvq_cu_ln_stats(x, F, g->inv_F, &mean, &rstd);
        for (uint32_t j = 0; j < F; j++) x[j] = cvq_cu_ln_apply(x[j], mean, rstd, ln_w[j], ln_b[j]);
        for (uint32_t o = 0; o < I; o++) hid[o] = cvq_cu_gelu(cvq_cu_linear(w1 + (size_t)o * F, x, F, b1[o]));
        for (uint32_t j = 0; j < Nc / 8; j++) bg[j] = 0;
        for (uint32_t q = 0; q < Nc / 2; q++) {
            float o[4];
            for (uint32_t c = 0; c < 4; c++) o[c] = cvq_cu_linear(w2 + (size_t)(4 * q + c) * I, hid, I, b2[4 * q + c]);
            const uint32_t two = cvq_cu_argmax4_bits(o[0], o[1], o[2], o[3]);
            bg[(2 * q) >> 3] = (uint8_t)(bg[(2 * q) >> 3] | (two << ((2 * q) & 7u)));
        }
        for (uint32_t f = 0; f < F; f++) x[f] = cvq_cu_code_vector(bg, E + f, Nc, F);
        sigma[gi] = cvq_cu_sigma(x, F, pre);
    }
}
extern "C" int cvq_cuda_host_numerics_built(void) { return 1; }

/* The single steps, for tests that compare each with the contract's text. */
extern "C" void cvq_cuda_host_subcode_fg(const float *w, const float *z, uint32_t P, uint32_t layout, float na,
                                         float *f, float *g) {
    cvq_cu_subcode_fg(w, z, P, layout, na, f, g);
}
extern "C" float cvq_cuda_host_dist(const float *f, const float *g, const float *G, uint32_t k) {
    return cvq_cu_dist(f, g, G, k);
}
extern "C" void cvq_cuda_host_residual(const float *wA, const float *wB, float *z, uint32_t P, uint32_t layout) {
    for (uint32_t p = 0; p < P; p++) cvq_cu_residual_pair(wA, wB, z, P, layout, p);
}
extern "C" float cvq_cuda_host_sum_squares(const float *x, uint32_t n) { return cvq_cu_sum_squares(x, n); }
extern "C" float cvq_cuda_host_value_ss(const float *v, const float *inv_ls, uint32_t F) {
    return cvq_cu_value_ss(v, inv_ls, F);
}
extern "C" void cvq_cuda_host_ln_stats(const float *x, uint32_t F, float inv_F, float *mean, float *rstd) {
    cvq_cu_ln_stats(x, F, inv_F, mean, rstd);
}
extern "C" float cvq_cuda_host_ln_apply(float x, float mean, float rstd, float w, float b) {
    return cvq_cu_ln_apply(x, mean, rstd, w, b);
}
extern "C" float cvq_cuda_host_linear(const float *wrow, const float *x, uint32_t n, float bias) {
    return cvq_cu_linear(wrow, x, n, bias);
}
extern "C" uint32_t cvq_cuda_host_argmax4_bits(float o0, float o1, float o2, float o3) {
    return cvq_cu_argmax4_bits(o0, o1, o2, o3);
}
extern "C" float cvq_cuda_host_code_vector(const uint8_t *bits, const float *Ecol, uint32_t Nc, uint32_t F) {
    return cvq_cu_code_vector(bits, Ecol, Nc, F);
}
extern "C" float cvq_cuda_host_sigma(const float *u, uint32_t F, float pre) { return cvq_cu_sigma(u, F, pre); }
extern "C" void cvq_cuda_host_rotate(float *re, float *im, float c, float s) { cvq_cu_rotate(re, im, c, s); }
