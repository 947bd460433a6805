"""Command line: `fastrft train` and `fastrft eval` (also `python -m fastrft ...`).

    fastrft train                                   # the embedded default (tiny model, shapes data)
    fastrft train --config configs/shapes.yaml --seed 3 --max_steps 200
    fastrft eval --model runs/shapes/checkpoints/step-000400 --eval_dataset data/test.jsonl

Every `--key value` is a field of `fastrft.train.GRPOConfig`; an unknown key is an error that
names the closest valid keys.
"""

from __future__ import annotations

import argparse
import json
import sys

USAGE = """usage: fastrft {train,eval} [--config FILE.yaml] [--key value ...]

  train   run GRPO (config: fastrft/train.py GRPOConfig; YAML file, then --key value overrides)
  eval    greedy held-out accuracy of --model on --eval_dataset (default: the synthetic split)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in ("train", "eval"):
        print(f"fastrft: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        import dataclasses

        from .train import GRPOConfig

        print(f"usage: fastrft {command} [--config FILE.yaml] [--key value ...]\n\nkeys (defaults):")
        for f in dataclasses.fields(GRPOConfig):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            print(f"  --{f.name} {default!r}")
        return 0
    parser = argparse.ArgumentParser(prog=f"fastrft {command}", add_help=False)
    parser.add_argument("--config", default=None)
    known, overrides = parser.parse_known_args(rest)

    from .config import load_config
    from .train import GRPOConfig

    try:
        cfg = load_config(GRPOConfig, known.config, overrides)
    except ValueError as e:
        print(f"fastrft {command}: {e}", file=sys.stderr)
        return 2
    if command == "train":
        from .train import train

        train(cfg)
        return 0
    return run_eval(cfg)


def run_eval(cfg) -> int:
    import torch

    from .rewards import load_reward
    from .train import _device, _eval_rows, _evaluate, _model_and_processor

    rows = _eval_rows(cfg)
    if rows is None:
        print("fastrft eval: no eval data: pass --eval_dataset FILE (or use the synthetic 'shapes' data)",
              file=sys.stderr)
        return 2
    torch.manual_seed(cfg.seed)
    model, processor = _model_and_processor(cfg)
    model.to(_device(cfg)).eval()
    print(json.dumps(_evaluate(cfg, model, processor, rows, load_reward(cfg.accuracy_reward)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
