/*
 * GPT-2 style byte-level BPE tokenizer built from GGUF metadata
 * (tokenizer.ggml.model == "gpt2": tokens, merges, token_type, bos/eos).
 *
 * Pre-tokenization follows the HF pipeline of SmolLM2 / StarCoder
 * (tokenizer.ggml.pre "smollm", "starcoder", "refact" ...): first every
 * numeric character is split off on its own (HF Digits(individual_digits)),
 * then each piece is split with the GPT-2 pattern
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * implemented by hand (no regex engine). With pre "gpt2" (or "default") the
 * digit split is skipped. The Unicode classes are exact for ASCII and cover
 * the common scripts otherwise (see tokenizer.c); rare scripts may split
 * differently from HF.
 */
#ifndef COMMVQ_EXAMPLE_TOKENIZER_H
#define COMMVQ_EXAMPLE_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "gguf.h"

typedef struct tokenizer tokenizer;

int tokenizer_load(const gguf_file *f, tokenizer **out, char *err, size_t errlen);
void tokenizer_free(tokenizer *t);

uint32_t tokenizer_n_vocab(const tokenizer *t);
int32_t tokenizer_bos(const tokenizer *t);
int32_t tokenizer_eos(const tokenizer *t);
/* 1 when the token is a control token (<|im_end|>, <|endoftext|> ...). */
int tokenizer_is_control(const tokenizer *t, int32_t id);
/* Id of a token given by its exact text, or -1. */
int32_t tokenizer_find(const tokenizer *t, const char *text);

/* Encodes len bytes of text. With parse_special, exact occurrences of
 * control tokens' texts become those tokens. *ids is malloc'd (free it);
 * *n receives the count. */
int tokenizer_encode(const tokenizer *t, const char *text, size_t len,
                     int parse_special, int32_t **ids, size_t *n, char *err,
                     size_t errlen);

/* Bytes of one token into buf (cap bytes); returns the byte count (which
 * may exceed cap: then only cap bytes were written), or -1 for a bad id.
 * Control tokens give their text. */
int tokenizer_decode(const tokenizer *t, int32_t id, char *buf, size_t cap);

#endif
