/*
 * Host side of the CUDA backend: the context state and the helpers shared
 * by cuda_backend.c (devices, buffers, the table of core/backend.h),
 * cuda_ops.c (device tables, the three ops, deferred status) and
 * cuda_interop.c (include/commvq_cuda.h). Compiled by the C compiler with
 * the CUDA runtime headers; the kernels are reached through cuda_launch.h.
 */
#ifndef CVQ_CUDA_INTERNAL_H
#define CVQ_CUDA_INTERNAL_H

#include "backend.h"
#include "cuda_launch.h"

#define CVQ_CU_TABLE_SLOTS 8 /* (codebook, layer) table sets kept on the device */

typedef struct cvq_cu_table_slot {
    const cvq_codebook *cb;  /* NULL: empty */
    uint64_t generation;     /* cb->generation when uploaded */
    uint32_t layer;
    void *dev;               /* one allocation holding every table */
    cvq_cu_tables t;         /* pointers into dev */
    uint64_t last_use;
} cvq_cu_table_slot;

typedef struct cvq_cuda {
    cvq_context *ctx;
    int device;
    int cc_major, cc_minor;
    uint32_t n_sm;
    size_t smem_max;          /* opt-in dynamic shared memory per block */
    cudaStream_t own_stream;  /* created at init, non-blocking */
    cudaStream_t stream;      /* where calls enqueue (own_stream or the caller's) */
    uint32_t *status;         /* device [2]: word 0 of the call, word 1 sticky */
    void *scratch;            /* values / attention scratch (device) */
    size_t scratch_size;
    cvq_cu_table_slot slots[CVQ_CU_TABLE_SLOTS];
    uint64_t use_clock;
} cvq_cuda;

/* A failed CUDA call as a status: the CUDA error's name and string, what
 * was called and where (file:line of the caller). Clears the runtime's last
 * error so that later calls do not report it again. */
cvq_status cvq_cu_fail(cvq_context *ctx, int err, const char *what, const char *file, int line);
#define CVQ_CU_TRY(ctx, call)                                                     \
    do {                                                                          \
        cudaError_t e_ = (call);                                                  \
        if (e_ != cudaSuccess) return cvq_cu_fail((ctx), (int)e_, #call, __FILE__, __LINE__); \
    } while (0)

/* Makes cu's device current on the calling thread. */
cvq_status cvq_cu_enter(cvq_cuda *cu);

/* The device tables of (cb, layer), uploaded on first use. */
cvq_status cvq_cu_tables_get(cvq_cuda *cu, const cvq_codebook *cb, const cvq_layer_view *lv,
                             const cvq_cu_tables **out);
void cvq_cu_tables_close(cvq_cuda *cu);
/* Geometry of a layer view for the kernels. */
void cvq_cu_geom_of(const cvq_layer_view *lv, cvq_cu_geom *g);
/* Scratch of at least `bytes` (waits for the stream when it must grow). */
cvq_status cvq_cu_scratch(cvq_cuda *cu, size_t bytes, void **out);
/* Reads and clears the sticky status word (waits for the stream). */
cvq_status cvq_cu_collect(cvq_cuda *cu, const char *op);

/* Enqueue the ops (no wait). Device pointers. */
cvq_status cvq_cu_enqueue_keys(cvq_cuda *cu, const cvq_codebook *cb, const cvq_layer_view *lv,
                               const float *keys, size_t n, uint16_t *codes, float *scales);
cvq_status cvq_cu_enqueue_values(cvq_cuda *cu, const cvq_codebook *cb, const cvq_layer_view *lv,
                                 const float *values, size_t n, uint8_t *bits, float *sigma);
cvq_status cvq_cu_enqueue_attend(cvq_cuda *cu, const cvq_codebook *cb, const cvq_layer_view *lv,
                                 cvq_cu_attend *a);

/* The ops of the backend table (wait for their result). */
cvq_status cvq_cu_op_encode_keys(cvq_context *ctx, const cvq_encode_keys_args *a);
cvq_status cvq_cu_op_encode_values(cvq_context *ctx, const cvq_encode_values_args *a);
cvq_status cvq_cu_op_attend(cvq_context *ctx, const cvq_attend_args *a);
cvq_status cvq_cu_supports(cvq_context *ctx, const cvq_op_desc *desc);

#endif
