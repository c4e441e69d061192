/*
 * Internals of the key trainer (core/train_keys.c) that tests check on their
 * own. Not installed.
 */
#ifndef CVQ_TRAIN_KEYS_INTERNAL_H
#define CVQ_TRAIN_KEYS_INTERNAL_H

#include "train_internal.h"

/* The closed-form M-step of one stage (method note section 6), all in
 * double. Inputs, with C = 64 sub-codes and P pairs:
 *   N      [C][C]      soft counts N[A][B] = sum_t W_t(A,B)
 *   SR     [C][P][2]   sum_t Rw_t(a) z_t,p  (re, im), Rw_t(a) = sum_B W_t(a,B)
 *   SC     [C][P][2]   sum_t Cw_t(a) z_t,p,          Cw_t(a) = sum_A W_t(A,a)
 *   w_prev [C][P][2]   the previous iterate (x, y) of w = x + i*y
 * Solves, for every pair p with one Cholesky factorisation of the 64x64
 * Hermitian matrix M = diag(r_a + c_a + lambda_a) + i*(N - N^T):
 *   M w_p = SR_p - i*SC_p + lambda .* w_prev_p
 * where lambda_a = ridge * max(mean count, 1) + max(0, 1 - (r_a + c_a)):
 * a proximal pull toward the previous iterate that keeps M positive
 * definite and leaves a dead sub-code (r_a + c_a = 0) exactly where it was.
 * Writes w_out [C][P][2]. Returns 0, or -1 if the factorisation failed even
 * after raising the ridge (non-finite input). */
int cvq__key_mstep(uint32_t P, const double *N, const double *SR, const double *SC,
                   const double *w_prev, double ridge, double *w_out);

/* Default relative ridge of cvq__key_mstep used by the trainer. */
#define CVQ__KEY_RIDGE 1e-9

#endif
