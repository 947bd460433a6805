#!/usr/bin/env bash
# The GPU proof kit: one command, under 8 minutes on one H100/H200.
#
#   bash scripts/gpu_wheels.sh          # here, once: wheels the GPU machine lacks, into .whl/
#   bash scripts/gpu_check.sh           # on the GPU machine, with .whl carried
#   bash scripts/gpu_check.sh --dry-run # anywhere: the same parts on CPU, tiny shapes (CI runs it)
#
# It runs fastrft from this working tree (the repo root on PYTHONPATH, no pip install) with the
# machine's own python3 (FASTRFT_PYTHON overrides), after installing the wheels in .whl/ (if
# any) into /tmp/site. Parts, each with its own time limit, a failure in one never stopping the
# others: imports (versions; fastrft imports on them), correctness (tests/test_logprob.py ...
# test_segments.py with FASTRFT_TEST_DEVICE=cuda: every op on compiled Triton kernels against
# the float64 reference, fp32/bf16/fp16, forward and every gradient, host-sync checks
# included), lm_head (Qwen2.5-VL-7B head, bf16, N = 8192 and 16384: fastrft vs Liger vs TRL vs
# naive, ms, peak memory, TFLOP/s, fraction of the matmul floor at the bf16 rate measured in the
# same run), segment_attention (shared prefix and documents, D = 128, GQA 16/2: vs FlexAttention
# compiled, SDPA, flash-attn varlen when importable; fwd and bwd TFLOP/s and fraction of dense
# causal SDPA measured in the same run), trainer (GRPO steps of a 3B-shaped 4-layer Qwen2.5-VL,
# bf16 autocast; TRL's GRPOTrainer too when TRL is installed).
# Writes benchmarks/results/*-cuda.json and benchmarks/results/gpu_summary.md (the dry run: a
# temporary folder, printed at the end, or --out DIR); logs under <out>/logs/. Exit status 0
# when every part passed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
OUT=""
PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        --out=*) OUT="${1#--out=}" ;;
        *) PASS+=("$1") ;;
    esac
    shift
done

if [ "$DRY" = 1 ]; then
    # CPU: the project's own environment; Triton kernels under the interpreter
    if [ -z "${FASTRFT_PYTHON:-}" ]; then
        if [ ! -x "$ROOT/.venv/bin/python" ]; then
            source "$ROOT/scripts/setup.sh"
        fi
        FASTRFT_PYTHON="$ROOT/.venv/bin/python"
    fi
    export TRITON_INTERPRET=1
    [ -n "$OUT" ] || OUT="$(mktemp -d "${TMPDIR:-/tmp}/fastrft-gpu-check-dry.XXXXXX")"
    DRYFLAG=(--dry-run)
else
    FASTRFT_PYTHON="${FASTRFT_PYTHON:-python3}"
    unset TRITON_INTERPRET
    [ -n "$OUT" ] || OUT="$ROOT/benchmarks/results"
    DRYFLAG=()
    if ! "$FASTRFT_PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check: $FASTRFT_PYTHON sees no CUDA device (use --dry-run on a machine without one)" >&2
        exit 2
    fi
    # the wheels this machine lacks (scripts/gpu_wheels.sh), never from a registry here
    if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
        SITE="${FASTRFT_KIT_SITE:-/tmp/site}"
        echo "installing $(ls "$ROOT"/.whl/*.whl | wc -l) carried wheels into $SITE"
        "$FASTRFT_PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$ROOT"/.whl/*.whl || echo "gpu_check: installing the carried wheels failed" >&2
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "no .whl/ here: liger-kernel and TRL rows will say not installed (bash scripts/gpu_wheels.sh)"
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export FASTRFT_KIT_COMMAND="bash scripts/gpu_check.sh${DRYFLAG[*]:+ ${DRYFLAG[*]}}${PASS[*]:+ ${PASS[*]}}"
exec "$FASTRFT_PYTHON" "$ROOT/scripts/gpu_check.py" "${DRYFLAG[@]}" --out "$OUT" "${PASS[@]}"
