#!/usr/bin/env bash
# The tests marked `vllm` (tests/test_vllm.py), for real, in the vLLM venv: set-up (once, see
# scripts/setup_vllm.sh), then pytest on one worker (the tests share one engine per module).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_vllm.sh"
cd "$ROOT"
export TRITON_INTERPRET=1
exec python -m pytest -m vllm tests/test_vllm.py "$@"
