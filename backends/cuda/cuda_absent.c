/*
 * A build without the CUDA backend: the interop entry points of
 * include/commvq_cuda.h exist and say so, and the test hooks of
 * cuda_types.h report that no nvcc-built numerics are present.
 */
#include "commvq_cuda.h"

#include "cuda/cuda_types.h"
#include "cvq_internal.h"

static cvq_status absent(void) {
    return CVQ_FAIL(NULL, CVQ_ERR_BACKEND_UNAVAILABLE,
                    "the cuda backend was not compiled into this build (COMMVQ_CUDA=OFF or no nvcc)");
}

cvq_status cvq_cuda_set_stream(cvq_context *ctx, cvq_cuda_stream stream) {
    (void)ctx;
    (void)stream;
    return absent();
}
cvq_status cvq_cuda_get_stream(const cvq_context *ctx, cvq_cuda_stream *out) {
    (void)ctx;
    if (out) *out = NULL;
    return absent();
}
cvq_status cvq_cuda_prepare(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer) {
    (void)ctx; (void)cb; (void)layer;
    return absent();
}
cvq_status cvq_cuda_encode_keys(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer, const float *keys_dev,
                                size_t n, uint16_t *codes_dev, float *scales_dev) {
    (void)ctx; (void)cb; (void)layer; (void)keys_dev; (void)n; (void)codes_dev; (void)scales_dev;
    return absent();
}
cvq_status cvq_cuda_encode_values(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer,
                                  const float *values_dev, size_t n, uint8_t *bits_dev, float *sigma_dev) {
    (void)ctx; (void)cb; (void)layer; (void)values_dev; (void)n; (void)bits_dev; (void)sigma_dev;
    return absent();
}
cvq_status cvq_cuda_attend(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer, const cvq_cuda_kv *kv,
                           const float *q_dev, const int32_t *q_pos_dev, size_t n_q, uint32_t flags,
                           float *out_dev) {
    (void)ctx; (void)cb; (void)layer; (void)kv; (void)q_dev; (void)q_pos_dev; (void)n_q; (void)flags;
    (void)out_dev;
    return absent();
}
cvq_status cvq_cuda_status(cvq_context *ctx) {
    (void)ctx;
    return absent();
}
cvq_status cvq_cuda_synchronize(cvq_context *ctx) {
    (void)ctx;
    return absent();
}

int cvq_cuda_host_numerics_built(void) { return 0; }
void cvq_cuda_host_sincos_turn(uint32_t turn, float *c, float *s) {
    (void)turn;
    *c = *s = 0.0f;
}
uint32_t cvq_cuda_host_phase_hi(uint64_t t, int32_t pos) {
    (void)t; (void)pos;
    return 0;
}
float cvq_cuda_host_erf(float x) { return x; }
float cvq_cuda_host_gelu(float x) { return x; }
void cvq_cuda_host_encode_key_token(const cvq_cu_geom *g, const float *key_w, const float *key_n,
                                    const float *key_G, const float *k, uint32_t threads, uint16_t *codes,
                                    float *scales) {
    (void)g; (void)key_w; (void)key_n; (void)key_G; (void)k; (void)threads; (void)codes; (void)scales;
}
void cvq_cuda_host_encode_value_token(const cvq_cu_geom *g, const cvq_cu_tables *host_tables, const float *v,
                                      float *scratch, uint8_t *bits, float *sigma) {
    (void)g; (void)host_tables; (void)v; (void)scratch; (void)bits; (void)sigma;
}
void cvq_cuda_host_subcode_fg(const float *w, const float *z, uint32_t P, uint32_t layout, float na, float *f,
                              float *g) {
    (void)w; (void)z; (void)P; (void)layout; (void)na;
    *f = *g = 0.0f;
}
float cvq_cuda_host_dist(const float *f, const float *g, const float *G, uint32_t k) {
    (void)f; (void)g; (void)G; (void)k;
    return 0.0f;
}
void cvq_cuda_host_residual(const float *wA, const float *wB, float *z, uint32_t P, uint32_t layout) {
    (void)wA; (void)wB; (void)z; (void)P; (void)layout;
}
float cvq_cuda_host_sum_squares(const float *x, uint32_t n) {
    (void)x; (void)n;
    return 0.0f;
}
float cvq_cuda_host_value_ss(const float *v, const float *inv_ls, uint32_t F) {
    (void)v; (void)inv_ls; (void)F;
    return 0.0f;
}
void cvq_cuda_host_ln_stats(const float *x, uint32_t F, float inv_F, float *mean, float *rstd) {
    (void)x; (void)F; (void)inv_F;
    *mean = *rstd = 0.0f;
}
float cvq_cuda_host_ln_apply(float x, float mean, float rstd, float w, float b) {
    (void)mean; (void)rstd; (void)w; (void)b;
    return x;
}
float cvq_cuda_host_linear(const float *wrow, const float *x, uint32_t n, float bias) {
    (void)wrow; (void)x; (void)n;
    return bias;
}
uint32_t cvq_cuda_host_argmax4_bits(float o0, float o1, float o2, float o3) {
    (void)o0; (void)o1; (void)o2; (void)o3;
    return 0;
}
float cvq_cuda_host_code_vector(const uint8_t *bits, const float *Ecol, uint32_t Nc, uint32_t F) {
    (void)bits; (void)Ecol; (void)Nc; (void)F;
    return 0.0f;
}
float cvq_cuda_host_sigma(const float *u, uint32_t F, float pre) {
    (void)u; (void)F;
    return pre;
}
void cvq_cuda_host_rotate(float *re, float *im, float c, float s) {
    (void)re; (void)im; (void)c; (void)s;
}
