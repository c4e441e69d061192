/*
 * Weight products of commvq-llama: out[t][r] = W[r] . x[t].
 *
 * Every weight type goes through one register-blocked kernel: a few rows are
 * dequantized to fp32 once, then dotted with the batch's vectors a small
 * tile of tokens at a time. The arithmetic of one (row, token) product does
 * not depend on the tile it is computed in, on the batch size or on the
 * thread, so logits are bit-identical for any --batch and --threads. The
 * instruction set (AVX2+FMA or portable C) is chosen once per process.
 */
#ifndef COMMVQ_EXAMPLE_MATMUL_H
#define COMMVQ_EXAMPLE_MATMUL_H

#include <stddef.h>

#include "model.h"

/* out[t * w->rows + r] = W[r] . x[t * w->cols ..] for t < n; OpenMP splits
 * the rows. Returns 0, or -1 when a scratch buffer cannot be allocated. */
int mm_matmul(float *out, const weight *w, const float *x, size_t n);

/* Row r of w as fp32 into out[w->cols] (the embedding lookup; the same
 * dequantization as the portable kernels). */
void mm_dequant_row(const weight *w, uint32_t r, float *out);

/* "avx2" or "portable": the kernels mm_matmul uses in this process (the
 * best the CPU supports; COMMVQ_CPU_ISA=portable forces the C one). */
const char *mm_kernel_name(void);

#endif
