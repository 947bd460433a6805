#!/usr/bin/env bash
# Creates .venv (once) with fastrft and its dev tools. Sourced by scripts/test.sh and scripts/train.sh.
# On a machine without an NVIDIA GPU it installs the CPU build of torch first: a bare `torch`
# requirement there pulls a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTRFT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.fastrft-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        # No GPU: the CPU wheel (on this workplace's disk, else from the PyTorch CPU index).
        "$VENV/bin/python" -m pip install -q "torch==2.13.0" \
            || "$VENV/bin/python" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    fi
    "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
