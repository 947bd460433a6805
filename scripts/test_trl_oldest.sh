#!/usr/bin/env bash
# The TRL integration's tests against the oldest supported trl (fastrft_kernels.integrations.trl.SUPPORTED_TRL).
# Makes a small venv reusing the CPU torch wheel (torch==2.13.0 resolves to the local CPU wheel; a bare
# `torch` requirement would pull GBs of CUDA), installs the oldest trl, and runs the integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST=$(.venv/bin/python -c "from fastrft_kernels.integrations.trl import SUPPORTED_TRL; print(SUPPORTED_TRL[0].lstrip('>='))")
INSTALLED=$(.venv/bin/python -c "import trl; print(trl.__version__)")
if [ "$INSTALLED" = "$OLDEST" ]; then  # .venv's trl is the newest in the range; one version covers both ends
    echo "oldest supported trl ($OLDEST) is the one .venv holds: scripts/test.sh already ran its tests"
    exit 0
fi
VENV=${VENV:-/tmp/fastrft-trl-oldest}
start=$(date +%s)
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==2.13.0" "trl==$OLDEST" "transformers==$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')" \
    pytest pytest-xdist pillow datasets triton
"$VENV/bin/python" -c "import trl; print('trl', trl.__version__)"
TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -q tests/test_trl_dropin.py tests/test_trl_parity.py "$@"
echo "oldest trl ($OLDEST) check took $(( $(date +%s) - start )) s"
