#!/usr/bin/env bash
# The main job: the embedded default GRPO run (tiny Qwen2.5-VL built in code, synthetic shapes
# data, no download): `fastrft train` with its defaults. Prints held-out accuracy before and
# after; the run folder is runs/shapes (config.yaml, metrics.jsonl, curves.png, checkpoints/),
# replaced on each run (--overwrite true: this script re-runs the demo). Extra arguments are
# config overrides:
#   bash scripts/train.sh --seed 3 --output_dir runs/seed3
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec fastrft train --overwrite true "$@"
