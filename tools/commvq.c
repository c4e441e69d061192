/*
 * commvq: command-line tool of the commvq library. It uses only the public
 * API (include/commvq.h) and links the shared library.
 *
 * This file holds the subcommand table with every help text, and main().
 * The subcommands live in cmd_*.c; shared steps in cli.c; .npy I/O in npy.c.
 */
#include <stdio.h>
#include <string.h>

#include "cli.h"

static const char usage_info[] =
    "usage: commvq info\n"
    "\n"
    "Prints the library version, every backend (cpu, cuda, vulkan) with its\n"
    "availability, every device with its capabilities, and what backend `auto`\n"
    "picks (the environment variables COMMVQ_BACKEND / COMMVQ_DEVICE apply).\n";

static const char usage_random_codebook[] =
    "usage: commvq random-codebook --out FILE --seed N --layers L --hq Q --hkv H\n"
    "         --head-dim D --stages R --value-bits B [--value-group F]\n"
    "         [--value-hidden I] [--pair-layout rotate_half|interleaved]\n"
    "         [--key-scale token|head] [--rope-base X] [--logit-scale S] [--fp16]\n"
    "\n"
    "Writes a seeded random codebook (.cvq). Key stage scales decrease\n"
    "geometrically, so even a random codebook roughly shrinks the residual, but\n"
    "a random codebook does NOT preserve real keys and values: it is for tests,\n"
    "benchmarks and demos.\n"
    "\n"
    "  --out FILE          output .cvq file\n"
    "  --seed N            random seed (same seed, same file on every platform)\n"
    "  --layers L          layers (>= 1)\n"
    "  --hq Q, --hkv H     query heads and key/value heads (H <= Q)\n"
    "  --head-dim D        64, 80, 96, 128 or 256\n"
    "  --stages R          key residual stages, 1..32 (12*R/D key bits per dim)\n"
    "  --value-bits B      value code bits Nc per value group (multiple of 8)\n"
    "  --value-group F     value group width: a multiple of D dividing H*D\n"
    "                      (default H*D: one group per token, as in the paper)\n"
    "  --value-hidden I    value encoder hidden width (default min(2*B, 4096))\n"
    "  --pair-layout L     rotate_half (HF/NeoX, default) or interleaved (GPT-J)\n"
    "  --key-scale M       token (one scale per token, default) or head\n"
    "  --rope-base X       RoPE base, theta_p = X^(-2p/D) (default 10000)\n"
    "  --logit-scale S     attention logit scale (default 1/sqrt(D))\n"
    "  --fp16              store tensors as float16 (compact file)\n";

static const char usage_export_codebook[] =
    "usage: commvq export-codebook FILE --npy-dir DIR\n"
    "\n"
    "Writes every tensor of the codebook FILE as a .npy file into DIR (created\n"
    "if absent), all layers (and value groups) in one array each:\n"
    "  key_w.npy        float32 [L, Hkv, R, 64, D/2, 2]\n"
    "  val_*.npy        float32 [L, groups, ...]\n"
    "  rope_theta.npy   float64 [D/2]\n"
    "plus manifest.tsv (file, name, shape, dtype, meaning of each tensor),\n"
    "geometry.tsv (the model geometry and record layout) and note.txt (the\n"
    "codebook's provenance note, when it has one).\n";

static const char usage_encode[] =
    "usage: commvq encode --codebook FILE [--layer N] --keys K.npy --values V.npy\n"
    "         --out-dir DIR [--backend B] [--bf16]\n"
    "\n"
    "Encodes keys and values [T, Hkv, D] (before RoPE) with one layer of the\n"
    "codebook and writes into DIR (created if absent):\n"
    "  key_codes.npy    uint16  [T, Hkv, R]   code 64*A + B of each stage\n"
    "  key_scale.npy    float32 [T] (token scale) or [T, Hkv] (head scale)\n"
    "  value_bits.npy   uint8   [T, groups, Nc]  one 0/1 per code bit\n"
    "  value_scale.npy  float32 [T, groups]   sigma of the method note\n"
    "\n"
    "  --layer N     layer; defaults to 0 for a one-layer codebook, required\n"
    "                otherwise\n"
    "  --backend B   auto (default), cpu, cuda or vulkan\n"
    "  --bf16        uint16 ('<u2') inputs hold bfloat16 bit patterns (numpy has\n"
    "                no bfloat16: save x.view(np.uint16))\n"
    "Input dtypes: float32, float16, float64 (rounded to float32), and bfloat16\n"
    "as above. Non-finite inputs are refused.\n";

static const char usage_attend[] =
    "usage: commvq attend --codebook FILE [--layer N] --keys K.npy --values V.npy\n"
    "         --queries Q.npy --q-pos N [--window W] [--sinks S] [--backend B]\n"
    "         [--queries-rotated] [--bf16] --out O.npy\n"
    "\n"
    "Builds a cache of one layer (window W, default 128; sinks S, default 0;\n"
    "both may be 0), appends the keys and values [T, Hkv, D] (before RoPE) at\n"
    "positions 0..T-1, then attends with the queries [n_q, Hq, D] at positions\n"
    "N, N+1, ..., N+n_q-1 (causal: a query sees tokens at positions <= its own)\n"
    "and writes the output [n_q, Hq, D] as float32 to O.npy.\n"
    "\n"
    "  --queries-rotated  the queries already have RoPE applied\n"
    "  --layer, --backend, --bf16: as for `commvq encode`\n";

static const char usage_demo[] =
    "usage: commvq demo [--backend B] [--seed N] [--tokens T]\n"
    "\n"
    "Runs a synthetic LLaMA-3.1-8B-like layer (Hq=32, Hkv=8, D=128) with random\n"
    "1-bit (R=11, Nc=1024) and 2-bit (R=21, Nc=2048) codebooks on every\n"
    "available backend (or only B), a cache of T tokens (default 512) with a\n"
    "window of 128, and prints bytes per token against FP16, the attention error\n"
    "against attention over the explicitly decoded cache and against FP16\n"
    "attention over the original keys and values, and the time per step.\n"
    "The codebooks are random: they do not preserve keys and values, so the\n"
    "error against FP16 says nothing about the method's quality.\n";

static const cli_cmd commands[] = {
    {"info", "backends, devices and capabilities", usage_info, cmd_info},
    {"random-codebook", "write a seeded random codebook (.cvq)", usage_random_codebook,
     cmd_random_codebook},
    {"export-codebook", "write every tensor of a codebook as .npy",
     usage_export_codebook, cmd_export_codebook},
    {"encode", "encode keys and values (.npy) into codes", usage_encode, cmd_encode},
    {"attend", "code-domain attention over a cache built from .npy K/V",
     usage_attend, cmd_attend},
    {"demo", "synthetic workload: compression, accuracy and speed", usage_demo,
     cmd_demo},
};

#define N_COMMANDS (sizeof commands / sizeof commands[0])

static void print_main_usage(FILE *f) {
    size_t i;
    fprintf(f,
            "usage: commvq <command> [options]\n"
            "       commvq <command> --help\n"
            "\n"
            "commvq %s: CommVQ KV-cache compression with code-domain attention.\n"
            "\n"
            "commands:\n",
            cvq_version_string());
    for (i = 0; i < N_COMMANDS; i++)
        fprintf(f, "  %-17s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\nExit status: 0 success, 1 failure, 2 usage error.\n");
}

int main(int argc, char **argv) {
    size_t i;
    if (argc < 2) {
        print_main_usage(stderr);
        return CLI_USAGE;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        if (strcmp(argv[1], "help") == 0 && argc > 2) {
            for (i = 0; i < N_COMMANDS; i++) {
                if (strcmp(argv[2], commands[i].name) == 0) {
                    fputs(commands[i].usage, stdout);
                    return CLI_OK;
                }
            }
        }
        print_main_usage(stdout);
        return CLI_OK;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("commvq %s\n", cvq_version_string());
        return CLI_OK;
    }
    for (i = 0; i < N_COMMANDS; i++) {
        if (strcmp(argv[1], commands[i].name) == 0) {
            int rc = commands[i].run(&commands[i], argc - 2, argv + 2);
            return rc == CLI_HELP ? CLI_OK : rc;
        }
    }
    fprintf(stderr, "commvq: unknown command '%s'\n\n", argv[1]);
    print_main_usage(stderr);
    return CLI_USAGE;
}
