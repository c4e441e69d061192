#!/usr/bin/env bash
# cuda_machine_code: the numerics contract (docs/numerics.md) checked in the
# code that nvcc and ptxas actually produced for the encoders -- the object
# file cuda_kernels_encode.cu.o that goes into the library -- so that a build
# flag or a plain `a*b+c` that would let the GPU round differently from the
# CPU reference fails here, on a machine without a GPU.
#
#   check_machine_code.sh <cuda_kernels_encode.cu.o>
#
# 1. PTX (every PTX the object embeds; compute_90 in the default build):
#    float arithmetic is only add.rn / sub.rn / mul.rn / div.rn / sqrt.rn on
#    f32 (and rcp.rn, the correctly rounded 1/x). The PTX ISA forbids ptxas to fuse an add or mul that carries an
#    explicit rounding modifier, so .rn everywhere means no contraction; and
#    no fma / mad / approximate instruction, no .ftz, no f16 or f64
#    arithmetic.
# 2. SASS (every architecture's machine code: sm_75 ... sm_90 by default),
#    per kernel:
#    - FFMA and flush-to-zero float instructions appear only inside the
#      correctly-rounded division and square root that ptxas expands
#      div.rn / sqrt.rn into: a Newton step after MUFU.RCP (at most 5 FFMA)
#      or MUFU.RSQ (at most 2), within 32 instructions of it and reading its
#      result or a register the sequence computed from it, or a called
#      slow-path subroutine that itself starts from MUFU.RCP / MUFU.RSQ;
#    - no other MUFU (approximate exp, log, sin, cos), no f64 arithmetic, and
#      half-precision FMA only as the constant move `HFMA2.MMA Rx, -RZ, RZ, ...`.
#    The window and quotas are a heuristic (an FFMA right after a division
#    could hide in one); the PTX rule above is the exact one.
#
# Needs cuobjdump and nvdisasm: the CUDA toolkit's, or the PyPI wheels
# nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm that scripts/deps.sh installs.
# Without them: exit 77 (ctest: skipped), or failure when
# COMMVQ_REQUIRE_TOOLS=1 (CI).
set -euo pipefail
obj="${1:?usage: check_machine_code.sh <cuda_kernels_encode.cu.o>}"

tool_dirs=()
[ -n "${CUDA_HOME:-}" ] && tool_dirs+=("$CUDA_HOME/bin")
tool_dirs+=(/usr/local/cuda/bin)
for pkg in nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm; do
  loc=$(python3 -m pip show "$pkg" 2>/dev/null | awk '/^Location:/ {print $2}') || true
  if [ -n "$loc" ]; then
    for d in "$loc"/nvidia/*/bin; do [ -d "$d" ] && tool_dirs+=("$d"); done
  fi
done
for d in "${tool_dirs[@]}"; do PATH="$PATH:$d"; done
export PATH
missing=""
for t in cuobjdump nvdisasm; do command -v "$t" >/dev/null || missing="$missing $t"; done
if [ -n "$missing" ]; then
  echo "cuda_machine_code: SKIP: not found:$missing (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm, or scripts/deps.sh)"
  [ "${COMMVQ_REQUIRE_TOOLS:-0}" = 1 ] && { echo "cuda_machine_code: COMMVQ_REQUIRE_TOOLS=1: failing"; exit 1; }
  exit 77
fi
echo "cuda_machine_code: $(command -v cuobjdump) ($(cuobjdump --version | tail -1))"
echo "cuda_machine_code: object $obj"
echo "cuda_machine_code: embedded: $(cuobjdump -lelf -lptx "$obj" | awk '{print $NF}' | tr '\n' ' ')"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cuobjdump -ptx "$obj" >"$tmp/ptx"
cuobjdump -sass "$obj" >"$tmp/sass"

rc=0
# ---- 1. PTX ----------------------------------------------------------------
awk '
function bad(msg) { if (nbad++ < 40) printf "FAIL ptx line %d: %s: %s\n", NR, msg, $0 }
{
  line = $0
  sub(/\/\/.*/, "", line)
  n = split(line, f, /[ \t]+/)
  op = ""
  for (i = 1; i <= n; i++) {
    if (f[i] == "") continue
    if (f[i] ~ /^@/) continue           # predicate guard
    op = f[i]; break
  }
  if (op == "" || op ~ /^\./ || op ~ /:$/ || op ~ /^[{}]/) next
  nins++
  if (op ~ /\.ftz/) { bad("flush to zero"); next }
  if (op ~ /\.approx/) { bad("approximate instruction"); next }
  if (op ~ /^(add|sub|mul|div|sqrt|fma|mad|rcp|rsqrt|ex2|lg2|sin|cos|tanh|testp|min|max)\./ &&
      op ~ /\.(f16|f16x2|bf16|bf16x2|f32|f64)$/) {
    if (op ~ /^(add|sub|mul|div|sqrt|rcp)\.rn\.f32$/) { ok[op]++; nok++ }
    else if (op ~ /^(min|max|testp)\./ && op ~ /\.f32$/) { }   # exact, no rounding
    else bad("float arithmetic other than add/sub/mul/div/sqrt/rcp.rn.f32")
  }
}
END {
  printf "ptx: %d instructions; f32 arithmetic:", nins
  for (k in ok) printf " %s %d", k, ok[k]
  printf "\n"
  if (nbad > 40) printf "... %d PTX failures in all\n", nbad
  if (nok < 100) { printf "FAIL ptx: only %d rounded f32 operations found: not the encoders?\n", nok; nbad++ }
  exit nbad ? 1 : 0
}' "$tmp/ptx" || { echo "cuda_machine_code: PTX check FAILED"; rc=1; }

# ---- 2. SASS ---------------------------------------------------------------
awk -v W=32 '
function fail(msg) { if (nbad++ < 40) print "FAIL " msg }
# dst: the first register operand; src[1..n]: the registers read
function operands(s,   parts, n, k, r) {
  sub(/^[^ \t]+[ \t]+/, "", s)
  n = split(s, parts, /,[ \t]*/)
  dst = parts[1]; sub(/\..*/, "", dst)
  for (k = 2; k <= n; k++) {
    r = parts[k]; gsub(/[-|]/, "", r); sub(/\..*/, "", r)
    src[k - 1] = r
  }
  return n - 1
}
function flush(   i, j, k, t, start, mufu, last, lastkind, quota, used, issub, taint, nreg, reads, isffma, isftz) {
  if (nf == 0) return
  nfun++
  if (fname ~ /encode_keys/) seen_keys[arch] = 1
  if (fname ~ /encode_values/) seen_values[arch] = 1
  # called subroutines (the slow paths of division / square root): from a
  # CALL target to the next RET
  delete issub
  for (i = 1; i <= nf; i++) {
    if (op[i] !~ /^CALL/) continue
    t = txt[i]; sub(/.*0x/, "", t); t = tolower(t)
    start = 0
    for (j = 1; j <= nf; j++) if (addr[j] == t) { start = j; break }
    if (!start) { fail(sprintf("%s %s: CALL to 0x%s not found", arch, fname, t)); continue }
    # ptxas also uses CALL.REL.NOINC as a jump that reconverges the warp (to
    # an EXIT, to a BRA: seen on sm_80..89); such a target runs into an
    # EXIT of the kernel before any RET and is ordinary kernel code, checked below
    for (j = start; j <= nf && op[j] !~ /^(RET|EXIT)/; j++) ;
    if (j > nf || op[j] ~ /^EXIT/) continue
    mufu = 0
    for (j = start; j <= nf; j++) {
      issub[j] = 1
      if (op[j] ~ /^MUFU\.(RCP|RSQ)/) mufu = 1
      if (op[j] ~ /^RET/) break
    }
    if (!mufu) { fail(sprintf("%s %s: subroutine at 0x%s is not a division / square root", arch, fname, t)) }
  }
  last = -1000; lastkind = ""; used = 0; delete taint
  for (i = 1; i <= nf; i++) {
    if (op[i] ~ /^MUFU/ && op[i] !~ /^MUFU\.(RCP|RSQ)/) {
      fail(sprintf("%s %s: approximate %s", arch, fname, txt[i]))
    }
    if (op[i] ~ /^D(FMA|ADD|MUL)/) { fail(sprintf("%s %s: f64 arithmetic %s", arch, fname, txt[i])) }
    if (op[i] ~ /^H(FMA2|ADD2|MUL2)/ && txt[i] !~ /-RZ, RZ,/) {
      fail(sprintf("%s %s: half-precision arithmetic %s", arch, fname, txt[i]))
    }
    if (issub[i]) { nsub++; continue }
    nreg = operands(txt[i])
    if (op[i] ~ /^MUFU\.(RCP|RSQ)/) {
      last = i; lastkind = substr(op[i], 6, 3); used = 0
      delete taint; taint[dst] = 1
      continue
    }
    isffma = (op[i] ~ /^FFMA/)
    isftz = (op[i] ~ /^F/ && op[i] !~ /^F2I/ && op[i] ~ /\.FTZ/)
    if (!isffma && !isftz) continue
    quota = (lastkind == "RCP") ? 5 : 2
    reads = 0
    for (k = 1; k <= nreg; k++) if (src[k] in taint) reads = 1
    if (i - last > W || !reads || (isffma && used >= quota)) {
      fail(sprintf("%s %s: %s outside a division / square root (%d instructions after MUFU.%s, %s its result, %d FFMA before)",
                   arch, fname, txt[i], i - last, lastkind, reads ? "reads" : "does not read", used))
      continue
    }
    taint[dst] = 1
    if (isffma) { used++; nffma_ok++ } else nftz_ok++
  }
  nf = 0
}
/code for sm_/ { flush(); arch = $NF; archs[arch] = 1; next }
/Function :/ { flush(); fname = $NF; next }
/\/\*[0-9a-f]+\*\/[ \t]+[^ ]/ {
  s = $0
  a = s; sub(/^[^\/]*\/\*/, "", a); sub(/\*\/.*/, "", a)
  sub(/^[^\/]*\/\*[0-9a-f]+\*\/[ \t]+/, "", s); sub(/[ \t]*;.*/, "", s)
  sub(/^@!?U?P[0-9T]+[ \t]+/, "", s)
  nf++; addr[nf] = tolower(a); sub(/^0+/, "", addr[nf]); if (addr[nf] == "") addr[nf] = "0"
  txt[nf] = s; split(s, w, /[ \t]+/); op[nf] = w[1]
  nall++
}
END {
  flush()
  na = 0
  for (a in archs) {
    na++
    if (!seen_keys[a] || !seen_values[a]) { fail(sprintf("%s: encode_keys / encode_values not found", a)) }
  }
  printf "sass: %d architectures, %d kernels, %d instructions; FFMA %d and flush-to-zero %d accepted as division / square root steps; %d in their slow paths\n",
         na, nfun, nall, nffma_ok, nftz_ok, nsub
  if (nbad > 40) printf "... %d SASS failures in all\n", nbad
  if (na == 0 || nall < 1000) { print "FAIL sass: no machine code found"; nbad++ }
  exit nbad ? 1 : 0
}' "$tmp/sass" || { echo "cuda_machine_code: SASS check FAILED"; rc=1; }
[ "$rc" = 0 ] && echo "cuda_machine_code: passed"
exit "$rc"
