"""What a run starts from, before its folder exists: the defaults that depend on the data, the
run folder's own config (for `--resume` and `fastrft eval`), the CPU threads, and every row of
the data checked (images decoded, prompts tokenized with their images, lengths).

One source of defaults: the fields of `fastrft.train.GRPOConfig`. A bare `fastrft train` is the
embedded demo (configs/shapes.yaml holds the same values, tests/test_first_day.py checks it).
The fields whose right value depends on the data default to None and are filled here:

| field | dataset "shapes" (the demo) | a user's dataset |
|---|---|---|
| reward_funcs | [shapes] | [accuracy] |
| accuracy_reward | the reward given that is an accuracy: shapes, else accuracy, else the first one | same |
| max_completion_length | 2 (one answer word, then eos) | 256 (TRL's default) |
| beta | 0.04 | 0.0 (TRL's default) |
| scale_rewards | none | group (TRL's default) |
| eval_dataset | the synthetic held-out split | a held-out split of the data (`held_out_rows`) |
| output_dir | runs/shapes | runs/<dataset file stem> |
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

# Keys that define the data a run trains on: a resumed run must keep them.
DATA_KEYS = ("dataset", "train_size", "synthetic_tasks", "seed", "image_size", "eval_dataset", "eval_size")
# The keys `fastrft eval` takes (the rest only mean something to training).
EVAL_KEYS = ("model", "dataset", "eval_dataset", "synthetic_tasks", "eval_size", "image_size", "system_prompt", "seed",
             "max_prompt_length", "max_completion_length", "accuracy_reward", "eval_batch_size", "device",
             "num_threads", "bf16")
REAL_DATA_COMPLETION_LENGTH = 256  # TRL GRPOConfig's max_completion_length
# CPU threads for a small model (the tiny one). Measured on the 2-core development machine
# while other jobs loaded it (load average 8), the demo's median step_seconds over 10 steps:
# 1.13 s with 1 thread, 16.5 s with 2 (steps 7.8-36.8 s):
#   fastrft train --num_threads N --max_steps 10 --eval_size 0 --save_steps 0 --output_dir /tmp/thrN
# (the report: 0.72 s with 1 against 2.9 s with torch's default). The tiny model's ops
# are too small to split across cores and a second thread only waits on a busy core; a real
# model's matmuls are large enough to split, so it keeps torch's default.
SMALL_MODEL_PARAMS = 50_000_000


def resolve_defaults(cfg) -> None:
    """Fills the data-dependent fields left None (the table above), in place."""
    demo = cfg.dataset == "shapes"
    if cfg.reward_funcs is None:
        cfg.reward_funcs = ["shapes"] if demo else ["accuracy"]
    if cfg.accuracy_reward is None:
        funcs = list(cfg.reward_funcs)
        cfg.accuracy_reward = next((f for f in ("shapes", "accuracy") if f in funcs), funcs[0] if funcs else "accuracy")
    if cfg.max_completion_length is None:
        cfg.max_completion_length = 2 if demo else REAL_DATA_COMPLETION_LENGTH
    # The demo learns from a random model. With TRL's beta 0 and per-group std scaling, 4 of 4 runs
    # (seeds 0-1, each engine) collapsed onto one colour (held-out accuracy 0.25-0.5: entropy < 0.5
    # by step 110, and a collapsed group has no variance left to learn from); the KL to the initial
    # policy keeps sampling alive and unscaled advantages do not blow up the last small differences
    # of a nearly collapsed group: 8 of 8 reached 1.000 (seeds 0-4 transformers, 0-2 vLLM).
    if cfg.beta is None:
        cfg.beta = 0.04 if demo else 0.0
    if cfg.scale_rewards is None:
        cfg.scale_rewards = "none" if demo else "group"
    if cfg.output_dir is None:
        cfg.output_dir = "runs/shapes" if demo else f"runs/{Path(str(cfg.dataset)).stem or 'run'}"


def held_out_rows(cfg, n: int) -> int:
    """Rows of a user's dataset held out for evaluation when no eval_dataset is given:
    min(eval_size, 10% of the rows); 0 when eval_size is 0 or the data has under 10 rows."""
    return 0 if cfg.eval_size == 0 else min(cfg.eval_size, n // 10)


def split_rows(rows: list, n_eval: int, seed: int) -> tuple[list, list]:
    """(train, held-out): `n_eval` rows drawn with `seed` (the same rows for training and for a
    later `fastrft eval` of the run), both in file order."""
    import torch

    if n_eval <= 0:
        return rows, []
    g = torch.Generator().manual_seed(seed * 7_919 + 17)
    held = set(torch.randperm(len(rows), generator=g)[:n_eval].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def choose_threads(cfg, model) -> int:
    """CPU threads for torch ops: `num_threads` when > 0; 0 (auto): 1 for a small model (see
    SMALL_MODEL_PARAMS), else torch's default (returns 0)."""
    if cfg.num_threads > 0:
        return cfg.num_threads
    n = sum(p.numel() for p in model.parameters())
    return 1 if n < SMALL_MODEL_PARAMS else 0


# ----------------------------------------------------------------------------- run folders


def read_run_config(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    return data if isinstance(data, dict) else None


def find_run(model: str) -> tuple[Path | None, Path | None]:
    """(run folder, checkpoint) for `fastrft eval --model X`: X a run folder (its latest
    checkpoint) or a checkpoint inside one (runs/r/checkpoints/step-N); (None, None) otherwise."""
    from . import checkpoint as ckpt

    p = Path(model)
    if not p.is_dir():
        return None, None
    if (p / "config.yaml").is_file() and (p / "checkpoints").is_dir():
        return p, ckpt.latest_checkpoint(p)
    if p.parent.name == "checkpoints" and (p.parent.parent / "config.yaml").is_file():
        return p.parent.parent, p
    return None, None


def check_resume(cfg, run_dir: Path, step: int) -> None:
    """A resumed run must train on the data it started with and have steps left."""
    saved = read_run_config(run_dir) or {}
    changed = [f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" for k in DATA_KEYS
               if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        raise ValueError(f"resume: the data differs from the run's ({run_dir / 'config.yaml'}): {'; '.join(changed)}. "
                         "A resumed run continues on its own data; start a new run (another --output_dir) for new data")
    if cfg.max_steps <= step:
        raise ValueError(f"resume: max_steps={cfg.max_steps} but the latest checkpoint of {run_dir} is at step {step}: "
                         f"pass --max_steps above {step} to train further")


# ----------------------------------------------------------------------------- row checks


def check_rows(rows: list, processor, cfg, what: str, *, unk_warning: bool = True) -> tuple[list, dict]:
    """Every row of `rows` checked the way a step would use it: its images opened and decoded,
    its prompt rendered and tokenized with them, its length against max_prompt_length. A bad
    row is an error naming its file and line; with `cfg.skip_bad_rows` bad rows are left out,
    counted and reported. Synthetic rows (generated in code) are checked on the first 64.
    Returns (the good rows, {"rows", "skipped", "bad": [first messages]})."""
    from .data import load_image, render_prompt
    from .rollout import encode_prompts

    synthetic_rows = cfg.dataset == "shapes" and what != "eval_dataset"
    todo = rows[:64] if synthetic_rows else rows
    bad: dict[int, str] = {}
    unk_id = getattr(getattr(processor, "tokenizer", processor), "unk_token_id", None)
    n_unk = n_text = 0
    for start in range(0, len(todo), 64):
        chunk = list(range(start, min(start + 64, len(todo))))
        texts, images, ok = [], [], []
        for i in chunk:
            r = todo[i]
            where = getattr(r, "where", f"{what} row {i + 1}")
            try:
                images.append([load_image(im, where=where, image_size=cfg.image_size) for im in r["images"]])
                texts.append(render_prompt(processor, r, cfg.system_prompt))
                ok.append(i)
            except (ValueError, OSError, TypeError, KeyError) as e:
                images = images[: len(ok)]
                bad[i] = str(e) if str(e).startswith(where) else f"{where}: {e}"
        groups = [ok] if ok else []
        while groups:
            idx = groups.pop()
            try:
                pb = encode_prompts(processor, [texts[ok.index(i)] for i in idx], [images[ok.index(i)] for i in idx],
                                    10**9)
            except Exception as e:  # noqa: BLE001 - the processor refuses something: find the row
                if len(idx) > 1:
                    groups += [idx[: len(idx) // 2], idx[len(idx) // 2 :]]
                else:
                    where = getattr(todo[idx[0]], "where", f"{what} row {idx[0] + 1}")
                    bad[idx[0]] = f"{where}: the processor cannot encode the prompt with its images ({e})"
                continue
            for i, ids in zip(idx, pb.ids):
                if len(ids) > cfg.max_prompt_length:
                    where = getattr(todo[i], "where", f"{what} row {i + 1}")
                    bad[i] = (f"{where}: the prompt is {len(ids)} tokens (image tokens included), longer than "
                              f"max_prompt_length={cfg.max_prompt_length}: raise max_prompt_length or shorten it")
                if unk_id is not None:
                    n_unk += int((ids == unk_id).sum())
                    n_text += len(ids)
    if unk_warning and n_text and n_unk / n_text > 0.25:
        source = cfg.dataset if what == "dataset" else cfg.eval_dataset
        print(f"warning: {n_unk / n_text:.0%} of the prompt tokens of {what} ({source}) "
              "are <unk>: the tokenizer does not know most of their words (the tiny model's word tokenizer knows only "
              "the shapes task's vocabulary, fastrft/synthetic.py WORDS); use a real model for this data",
              file=sys.stderr, flush=True)
    report = {"rows": len(rows), "skipped": 0, "bad": [bad[i] for i in sorted(bad)][:10]}
    if bad and not cfg.skip_bad_rows:
        first = bad[min(bad)]
        more = f" ({len(bad)} bad rows in {what}; --skip_bad_rows true leaves them out)" if len(bad) > 1 else \
            " (--skip_bad_rows true leaves bad rows out)"
        raise ValueError(first + more)
    if bad:
        rows = [r for i, r in enumerate(rows) if i not in bad]
        report["skipped"] = len(bad)
        print(f"skipped {len(bad)} bad rows of {report['rows']} in {what} (skip_bad_rows); "
              f"the first: {report['bad'][0]}",
              file=sys.stderr, flush=True)
        if not rows:
            raise ValueError(f"{what}: every row is bad; the first: {report['bad'][0]}")
    return rows, report


def prepare(cfg, model, processor, train_rows: list, eval_rows: list | None, device):
    """After the model loads, before the run folder: the CPU threads and the row checks.
    Returns (train rows, eval rows, the data report for metrics.jsonl)."""
    import torch

    threads = choose_threads(cfg, model)
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    train_rows, rep = check_rows(train_rows, processor, cfg, "dataset")
    report = {"kind": "data", "train_rows": rep["rows"], "train_skipped": rep["skipped"],
              "threads": torch.get_num_threads()}
    erep = None
    if eval_rows:
        eval_rows, erep = check_rows(eval_rows, processor, cfg,
                                     "eval_dataset" if cfg.eval_dataset else "dataset", unk_warning=False)
        report.update(eval_rows=erep["rows"], eval_skipped=erep["skipped"])
    report["bad"] = rep["bad"] + (erep["bad"] if erep else [])
    return train_rows, eval_rows, report
