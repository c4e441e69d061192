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

/* Options shared by train-keys and train-values (one text, two usages). */
#define TRAIN_COMMON_HELP \
    "Data folder DIR: per layer N, k_N.npy and v_N.npy [T, Hkv, D] and optionally\n" \
    "q_N.npy [T, Hq, D], all before RoPE (float32, float16, float64, or uint16\n" \
    "holding bfloat16 bits with --bf16); optionally pos.npy (int32 [T]: each\n" \
    "token's position; default: index within its sequence) and seq_start.npy\n" \
    "(int32 [n_seq]: first token of each sequence; default: one sequence).\n" \
    "\n" \
    "  --data DIR          the data folder\n" \
    "  --out FILE          output .cvq, rewritten after every layer (a checkpoint)\n" \
    "  --init FILE         start from this codebook (resume; other layers and the\n" \
    "                      other half are kept); without it a new zero codebook\n" \
    "                      is made from the geometry options below\n" \
    "  --layers LIST       layers to train: all (default) or e.g. 0,2,5-7\n" \
    "  --seed N            seed of every random choice (default 0)\n" \
    "  --samples N         train on N tokens drawn (seeded) from the T of a layer\n" \
    "                      (default: all)\n" \
    "  --threads N         threads (default: all); results do not depend on it\n" \
    "  --fp16              store the codebook as float16 (compact)\n" \
    "  --bf16              uint16 inputs hold bfloat16 bit patterns\n" \
    "  --quiet             no progress lines\n" \
    "Geometry of a new codebook (not with --init): Hkv and D from k_0.npy, Hq\n" \
    "from q_0.npy (else Hkv), layers from the k_N.npy files present, or:\n" \
    "  --key-stages R      key stages, 1..32 (required; 12*R/D key bits per dim)\n" \
    "  --value-bits B      value code bits Nc per value group (required)\n" \
    "  --n-layers L, --hq Q, --hkv H, --head-dim D   override the data's shapes\n" \
    "  --value-group F, --value-hidden I, --pair-layout rotate_half|interleaved,\n" \
    "  --key-scale token|head, --logit-scale S   as for random-codebook\n" \
    "  --rope-base X       theta_p = X^(-2p/D) (default 10000), or\n" \
    "  --rope-theta FILE   the model's RoPE table, float64 [D/2] (llama3, YaRN)\n" \
    "Progress goes to stderr: one live line on a terminal, one line per step\n" \
    "otherwise (stage, step, loss, tokens/s, time left of the layer); one\n" \
    "summary line per layer goes to stdout. docs/training.md: costs per layer.\n"

static const char usage_train_keys[] =
    "usage: commvq train-keys --data DIR --out FILE [--init FILE] [--layers LIST]\n"
    "         [--steps N] [--stages N] [--first-stage N] [--hard] [--samples N]\n"
    "         [--seed N] [--threads N] [--fp16] [geometry options]\n"
    "\n"
    "Trains the key codebooks (EM of the method note, section 6): per layer, per\n"
    "KV head, stage after stage; soft E-step with the temperature schedule, closed\n"
    "form M-step; the best hard-assignment MSE of each stage is kept.\n"
    "\n"
    "  --steps N           EM steps per stage (default 100)\n"
    "  --stages N          stages to train (default: all from the first)\n"
    "  --first-stage N     keep stages below N as they are in --init (resume);\n"
    "                      default 0, or the old stage count when --key-stages\n"
    "                      extends an --init codebook\n"
    "  --hard              hard EM (k-means-like argmin assignments): faster\n"
    "  --tau-start X, --tau-end X   soft temperature schedule, times s_r\n"
    "                      (default 1e-3 and 1e-5)\n"
    "  --plateau X         relative improvement that counts (default 1e-5)\n"
    "  --patience N        stop a stage after N steps without one (default 5;\n"
    "                      0 = run all steps)\n"
    "  --splits N          split rounds per stage against merged clusters\n"
    "                      (default 8; 0 = plain EM)\n"
    "With --init FILE, --key-stages R larger than the file's stage count extends\n"
    "the codebook: the old stages are kept and training starts after them.\n"
    "\n" TRAIN_COMMON_HELP;

static const char usage_train_values[] =
    "usage: commvq train-values --data DIR --out FILE [--init FILE] [--layers LIST]\n"
    "         [--steps N] [--batch N] [--lr X] [--samples N] [--seed N]\n"
    "         [--threads N] [--fp16] [geometry options]\n"
    "\n"
    "Trains the value encoders and codebooks: per-channel scale ls from the data,\n"
    "then LayerNorm, both Linear layers and E of every value group with AdamW and\n"
    "straight-through Gumbel-softmax; loss = MSE of the decoded values plus, when\n"
    "q_N.npy exists, MSE of the attention output computed with decoded values.\n"
    "\n"
    "  --steps N           AdamW steps (default 2000)\n"
    "  --batch N           tokens per step (default 256)\n"
    "  --lr X              learning rate (default 1e-3)\n"
    "  --lr-end X          final rate as a fraction of --lr (cosine; default 0.1)\n"
    "  --weight-decay X    decoupled weight decay (default 0.1)\n"
    "  --warmup N          linear warm-up steps (default 100)\n"
    "  --gumbel-tau X      Gumbel-softmax temperature (default 1)\n"
    "  --attn-weight X     weight of the attention loss (default 1)\n"
    "  --no-queries        ignore q_N.npy (values MSE only)\n"
    "  --keep-ls           keep the codebook's ls instead of computing it\n"
    "  --resume            start from the --init codebook's value weights\n"
    "For train-values, --samples N keeps whole windows of --batch consecutive\n"
    "tokens, drawn (seeded) until N tokens are covered (attention needs context).\n"
    "\n" TRAIN_COMMON_HELP;

static const char usage_extract_stages[] =
    "usage: commvq extract-stages IN --stages R1 --out OUT [--fp16]\n"
    "\n"
    "Writes a codebook with the first R1 key stages of IN (greedy training makes\n"
    "them a valid R1-stage codebook: 12*R1/D key bits per dim); values, RoPE\n"
    "table and note are copied.\n";

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
    {"train-keys", "train key codebooks from .npy calibration dumps", usage_train_keys,
     cmd_train_keys},
    {"train-values", "train value encoders from .npy calibration dumps",
     usage_train_values, cmd_train_values},
    {"extract-stages", "keep the first R1 key stages of a codebook", usage_extract_stages,
     cmd_extract_stages},
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
