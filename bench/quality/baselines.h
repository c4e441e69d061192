/*
 * The two baseline KV formats of bench/quality, implemented here and not in
 * the library: they only need to tell how much quality a user gives up with
 * the formats they would otherwise pick. Both quantize and dequantize in
 * place (the model then reads the dequantized floats), so what is measured
 * is the format's rounding, with no kernel of ours in between.
 *
 * KIVI-2 (Liu et al., 2024): asymmetric 2-bit integers. Keys per channel
 *   over groups of G consecutive tokens (keys have outlier channels), values
 *   per token over groups of G consecutive channels. Each group stores a
 *   minimum and a step in fp16: 2 + 32/G bits per element (3 at G = 32).
 * q4_0 (llama.cpp's block format): per token, blocks of 32 consecutive
 *   channels, 4-bit integers q in 0..15 with value (q - 8) * d and one fp16
 *   scale d per block: 4.5 bits per element.
 */
#ifndef COMMVQ_BENCH_BASELINES_H
#define COMMVQ_BENCH_BASELINES_H

#include <stddef.h>

/* k, v: [n][kd] rows (kd = Hkv*d). KIVI needs n to be a multiple of G
 * (the cache hands over blocks of the window W = 128 = 4 groups) and kd a
 * multiple of G. Returns 0, or -1 when the shapes do not fit. */
int kivi2_quantize(float *k, float *v, size_t n, size_t kd, size_t group);
/* Round-trip of one row block of 32 values (q4_0). */
int q4_0_quantize(float *k, float *v, size_t n, size_t kd);

/* Bits per element stored (codes plus scales). */
double kivi2_bits(size_t group);
double q4_0_bits(void);

#endif
