/*
 * commvq CUDA interop (docs/cuda.md). For a context created with
 * backend = CVQ_BACKEND_CUDA: run the encoders and code-domain attention on
 * device pointers the caller owns, on a CUDA stream the caller chooses,
 * without synchronizing the device.
 *
 * Protocol
 *  - cvq_cuda_set_stream(ctx, stream): later calls enqueue on `stream`
 *    (NULL: the context's own non-blocking stream, the default).
 *  - cvq_cuda_encode_keys / _values / cvq_cuda_attend: check the arguments
 *    on the host (shapes, NULL pointers, that the pointers are device
 *    memory), enqueue the kernels and return at once. The device checks
 *    the data itself: a call whose input holds a NaN/Inf (or whose sum of
 *    squares overflows) writes nothing at all and records the fact in the
 *    context's status word.
 *  - After synchronizing the stream (or an event after the calls), the
 *    caller collects that status with cvq_cuda_status(ctx): CVQ_OK, or
 *    CVQ_ERR_NONFINITE_INPUT / CVQ_ERR_INPUT_RANGE for the calls since the
 *    last collection (which of them is not recorded), or a CUDA error raised
 *    asynchronously (CVQ_ERR_DEVICE / CVQ_ERR_DEVICE_LOST, with the CUDA
 *    error's name). cvq_cuda_synchronize(ctx) does both.
 *  - The first call for a (codebook, layer) uploads its tables
 *    (cvq_cuda_prepare does it ahead of time); growing the internal
 *    scratch of values/attention to a larger size waits for the stream once.
 *    Nothing else synchronizes.
 *
 * Data layouts are those of commvq.h and docs/format.md; all inputs fp32.
 * This header needs no CUDA header: cvq_cuda_stream is the same type as
 * cudaStream_t (a pointer to struct CUstream_st), so a cudaStream_t is
 * passed as is.
 *
 * In a build without the CUDA backend these functions exist and return
 * CVQ_ERR_BACKEND_UNAVAILABLE.
 */
#ifndef COMMVQ_CUDA_H
#define COMMVQ_CUDA_H

#include "commvq.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st *cvq_cuda_stream; /* == cudaStream_t */

/* Stream of later calls on ctx (NULL: the context's own stream). Waits for
 * the work ctx enqueued on the previous stream (so that the context's
 * scratch and status word are never used by two streams at once). */
CVQ_API cvq_status cvq_cuda_set_stream(cvq_context *ctx, cvq_cuda_stream stream);
CVQ_API cvq_status cvq_cuda_get_stream(const cvq_context *ctx, cvq_cuda_stream *out);

/* Uploads the tables of (cb, layer) to the device now (optional). */
CVQ_API cvq_status cvq_cuda_prepare(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer);

/* keys_dev fp32 [n][Hkv][d] (before RoPE) -> codes_dev uint16 [n][Hkv][R],
 * scales_dev fp32 [n] (token mode) or [n][Hkv] (head mode). Asynchronous. */
CVQ_API cvq_status cvq_cuda_encode_keys(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer,
                                        const float *keys_dev, size_t n, uint16_t *codes_dev,
                                        float *scales_dev);
/* values_dev fp32 [n][Hkv][d] -> bits_dev uint8 [n][groups][Nc/8],
 * sigma_dev fp32 [n][groups]. Asynchronous. */
CVQ_API cvq_status cvq_cuda_encode_values(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer,
                                          const float *values_dev, size_t n, uint8_t *bits_dev,
                                          float *sigma_dev);

/* Cache storage on the device, one layer of one sequence, as three segments
 * in position order [sinks | compressed | window]. Full-precision keys are
 * stored before RoPE. Positions strictly increasing across the segments.
 * A segment with n_* == 0 may have NULL pointers. */
typedef struct cvq_cuda_kv {
    size_t n_sink;
    const float *sink_k, *sink_v;   /* [n_sink][Hkv][d] fp32 */
    const int32_t *sink_pos;        /* [n_sink] */
    size_t n_comp;                  /* compressed records (docs/format.md) */
    const uint8_t *codes;           /* [n_comp][key_code_bytes] 12-bit packed key codes */
    const float *key_scales;        /* [n_comp][key_scale_count] */
    const uint8_t *value_bits;      /* [n_comp][value_bit_bytes] */
    const float *value_sigma;       /* [n_comp][value_groups] */
    const int32_t *comp_pos;        /* [n_comp] */
    size_t n_win;
    const float *win_k, *win_v;     /* [n_win][Hkv][d] fp32 */
    const int32_t *win_pos;         /* [n_win] */
} cvq_cuda_kv;

/* Attention of n_q queries q_dev [n_q][Hq][d] at q_pos_dev [n_q] over kv,
 * one softmax, causal; out_dev [n_q][Hq][d]. flags: CVQ_ATTEND_QUERIES_ROTATED.
 * Asynchronous; a non-finite query: out_dev untouched, status set. */
CVQ_API cvq_status cvq_cuda_attend(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer,
                                   const cvq_cuda_kv *kv, const float *q_dev, const int32_t *q_pos_dev,
                                   size_t n_q, uint32_t flags, float *out_dev);

/* The deferred status of the calls enqueued since the last collection
 * (call after synchronizing); clears it. */
CVQ_API cvq_status cvq_cuda_status(cvq_context *ctx);
/* Waits for the context's stream, then cvq_cuda_status. */
CVQ_API cvq_status cvq_cuda_synchronize(cvq_context *ctx);

#ifdef __cplusplus
}
#endif
#endif
