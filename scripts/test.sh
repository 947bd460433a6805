#!/usr/bin/env bash
# The test suite, from nothing: set-up, then pytest on 2 workers.
# Triton kernels run on CPU tensors under the interpreter (TRITON_INTERPRET=1).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
export TRITON_INTERPRET=1
exec python -m pytest -n "${FASTRFT_TEST_WORKERS:-2}" "$@"
