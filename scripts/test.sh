#!/usr/bin/env bash
# The test suite, from nothing: set-up, the linter, then pytest on 2 workers.
# Triton kernels run on CPU tensors under the interpreter (TRITON_INTERPRET=1). The tests marked
# `vllm` skip here (vLLM is not in .venv); scripts/test_vllm.sh runs them in .venv-vllm.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
export TRITON_INTERPRET=1
ruff check .
exec python -m pytest -n "${FASTRFT_TEST_WORKERS:-2}" "$@"
