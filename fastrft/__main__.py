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
import os
import sys

USAGE = """usage: fastrft {train,eval} [--config FILE.yaml] [--key value ...] [--debug]
       fastrft --version

  train   run GRPO (bare: the embedded demo, as bash scripts/train.sh); fastrft train --help lists the keys
  eval    greedy held-out accuracy of --model (a run folder or one of its checkpoints: evaluated
          as that run was, from its config.yaml; flags override); fastrft eval --help

An error in the input is one line on stderr and exit code 2 (--debug adds the traceback);
an unexpected failure is one line and exit code 1.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"fastrft {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in ("train", "eval"):
        print(f"fastrft: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        from .config import help_text
        from .runs import EVAL_KEYS
        from .train import GRPOConfig

        print(help_text(GRPOConfig, command, EVAL_KEYS if command == "eval" else None))
        return 0
    parser = argparse.ArgumentParser(prog=f"fastrft {command}", add_help=False)
    parser.add_argument("--config", default=None)
    parser.add_argument("--debug", action="store_true")
    known, overrides = parser.parse_known_args(rest)
    try:
        return _run(command, known.config, overrides)
    except KeyboardInterrupt:
        print(f"fastrft {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error is one line; --debug shows where it came from
        if known.debug:
            raise
        user = isinstance(e, (ValueError, FileNotFoundError, ImportError))
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        kind = "error" if user else f"unexpected {type(e).__name__}"
        print(f"fastrft {command}: {kind}: {msg}" + ("" if user else " (--debug shows the traceback)"), file=sys.stderr)
        return 2 if user else 1


def _run(command: str, config: str | None, overrides: list[str]) -> int:
    from .config import load_config, parse_overrides
    from .runs import EVAL_KEYS, find_run, read_run_config
    from .train import GRPOConfig

    flags = parse_overrides(overrides)
    if command == "eval":
        bad = sorted(k for k in flags if k.replace("-", "_") not in EVAL_KEYS)
        if bad:
            raise ValueError(f"{', '.join('--' + k for k in bad)}: not an eval key (fastrft eval --help lists them)")
        run_dir, checkpoint = find_run(str(flags.get("model", "")))
        base = None
        if run_dir is not None:
            if checkpoint is None:
                raise ValueError(f"--model {flags['model']}: the run has no checkpoint yet")
            base = {k: v for k, v in (read_run_config(run_dir) or {}).items() if k in EVAL_KEYS}
            flags["model"] = str(checkpoint)
        cfg = load_config(GRPOConfig, config, flags, base=base)
        return run_eval(cfg, run_dir)
    cfg = load_config(GRPOConfig, config, flags)
    if cfg.resume:  # the run's own config, then only the flags given (and --config) override it
        saved = read_run_config(cfg.output_dir)
        if saved is not None:
            saved = {k: v for k, v in saved.items() if k not in ("resume", "overwrite")}
            cfg = load_config(GRPOConfig, config, flags, base=saved)
    if cfg.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:  # one node, N ranks: torchrun runs this again
        from .distributed import launch

        return launch(cfg.nproc_per_node, ["train"] + (["--config", config] if config else []) + overrides, cfg)
    from .train import train

    train(cfg)
    return 0


def run_eval(cfg, run_dir=None) -> int:
    import torch

    from .rewards import load_reward
    from .train import _device, _eval_rows, _evaluate, _model_and_processor

    rows = _eval_rows(cfg)
    if rows is None:
        raise ValueError("no eval data: pass --eval_dataset FILE (or --dataset shapes, or a run folder as --model)")
    data = (f"{cfg.eval_dataset}" if cfg.eval_dataset else
            f"the synthetic shapes held-out split (tasks {','.join(cfg.synthetic_tasks)})" if cfg.dataset == "shapes"
            else f"the held-out rows of {cfg.dataset}")
    source = f"settings from {run_dir}/config.yaml" if run_dir is not None else "default settings"
    print(f"evaluating {cfg.model} on {data}: {len(rows)} prompts, greedy, max_completion_length "
          f"{cfg.max_completion_length}, accuracy = {cfg.accuracy_reward} reward exactly 1 ({source})",
          file=sys.stderr, flush=True)
    torch.manual_seed(cfg.seed)
    model, processor = _model_and_processor(cfg)
    from .runs import check_rows, choose_threads

    if threads := choose_threads(cfg, model):
        torch.set_num_threads(threads)
    rows, _ = check_rows(rows, processor, cfg, "eval_dataset" if cfg.eval_dataset else "dataset", unk_warning=True)
    model.to(_device(cfg)).eval()
    print(json.dumps(_evaluate(cfg, model, processor, rows, load_reward(cfg.accuracy_reward)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
