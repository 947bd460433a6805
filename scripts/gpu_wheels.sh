#!/usr/bin/env bash
# Fetches into .whl/ the wheels the GPU kit (scripts/gpu_check.sh) needs that the GPU machine
# lacks, for its Python 3.12 on x86_64 Linux; gpu_check.sh installs them there with
# `pip install --no-index --no-deps --target /tmp/site`. The run tool carries .whl (name it in
# `carry`); .whl/ is ignored by git (added to .git/info/exclude here).
#
#   bash scripts/gpu_wheels.sh             # liger-kernel, math-verify and its requirements
#   bash scripts/gpu_wheels.sh --with-trl  # + TRL and the datasets stack it imports (~56 MiB)
#
# The GPU machine has torch 2.11, triton 3.6, transformers 5.17, accelerate, peft, safetensors,
# pytest, pytest-xdist, tqdm, matplotlib, pyyaml, pillow, numpy (and what those require:
# sympy, jinja2, filelock, fsspec, huggingface-hub, packaging, ...). Missing there:
# - liger-kernel (the LM-head benchmark's Liger provider; needs only torch and triton);
# - math-verify, latex2sympy2_extended, antlr4-python3-runtime (fastrft's `accuracy` reward,
#   imported when that reward runs; small, so they travel);
# - trl: imports `datasets` at import, which needs pyarrow (42 MiB at 21.0, the oldest TRL
#   accepts; 55 MiB at 26) and pandas (12 MiB): over the 50 MiB the kit allows itself of the
#   run tool's 64 MiB, so only with --with-trl (and FASTRFT_WHEEL_BUDGET_MIB raised to match).
#   Without it the kit's TRL rows say "not installed".
# The total is checked against FASTRFT_WHEEL_BUDGET_MIB (default 50; 60 with --with-trl).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.whl"
WITH_TRL=0
for arg in "$@"; do
    case "$arg" in
        --with-trl) WITH_TRL=1 ;;
        *) echo "usage: bash scripts/gpu_wheels.sh [--with-trl]" >&2; exit 2 ;;
    esac
done
BUDGET_MIB="${FASTRFT_WHEEL_BUDGET_MIB:-$([ "$WITH_TRL" = 1 ] && echo 60 || echo 50)}"
PY="${PYTHON:-python3}"

# Pure-Python wheels (one file for every platform) and compiled ones (cp312, manylinux x86_64).
PURE=(
    liger-kernel==0.8.5
    math-verify==0.9.0
    latex2sympy2_extended==1.11.0
    antlr4-python3-runtime==4.13.2
)
BINARY=()
if [ "$WITH_TRL" = 1 ]; then
    # trl 1.16 needs datasets >= 4.7 and pyarrow >= 21; datasets 4.7 takes pyarrow 21 (the
    # smallest wheel), dill < 0.4.1, multiprocess < 0.70.19, and imports requests.
    PURE+=(trl==1.16.0 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18 requests==2.32.5)
    BINARY+=(pyarrow==21.0.0 pandas==3.1.1 xxhash==4.1.0)
fi

rm -rf "$DEST"
mkdir -p "$DEST"
common=(download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$DEST")
"$PY" -m pip "${common[@]}" "${PURE[@]}"
if [ "${#BINARY[@]}" -gt 0 ]; then
    "$PY" -m pip "${common[@]}" --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 "${BINARY[@]}"
fi

# never committed: .git/info/exclude (the repository's .gitignore may say so too)
EXCLUDE="$(git -C "$ROOT" rev-parse --git-path info/exclude)"
case "$EXCLUDE" in /*) ;; *) EXCLUDE="$ROOT/$EXCLUDE" ;; esac
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF "/.whl/" "$EXCLUDE" 2>/dev/null || echo "/.whl/" >> "$EXCLUDE"

echo "wheels in $DEST:"
ls -l "$DEST"/*.whl | awk '{printf "  %8.2f MiB  %s\n", $5 / 1048576, $9}' | sed "s|$DEST/||"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
total_mib=$(awk -v b="$total" 'BEGIN { printf "%.2f", b / 1048576 }')
echo "total: $total_mib MiB (budget $BUDGET_MIB MiB)"
if awk -v t="$total" -v b="$BUDGET_MIB" 'BEGIN { exit !(t > b * 1048576) }'; then
    echo "gpu_wheels: $total_mib MiB is over the $BUDGET_MIB MiB budget (the run tool carries 64 MiB in all," \
         "the working tree included)" >&2
    exit 1
fi
echo "carry it: run(command='bash scripts/gpu_check.sh', carry=['.whl'])"
