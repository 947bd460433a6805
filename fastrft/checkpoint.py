"""Checkpoints: a `save_pretrained` folder (safetensors weights, config, processor: loadable by
transformers as it is) plus `trainer_state.pt` (optimizer, LR schedule, RNG states, data
position, step), written atomically and resumed exactly.

Atomic: everything is written into `checkpoints/.tmp-step-N` and then renamed to
`checkpoints/step-N` (one `os.rename`, atomic on POSIX within a file system), so a crash leaves
either the old set of checkpoints or the new one, never a half-written `step-N`. Leftover
`.tmp-*` folders from a crash are removed on the next save.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_STEP = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir, step: int, model, processor, trainer_state: dict, keep: int | None = None) -> Path:
    """Writes checkpoint `step` atomically; keeps the newest `keep` (None: all). Returns its path."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    model.save_pretrained(tmp, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(tmp)
    torch.save(dict(trainer_state, step=step, rng=rng_state()), tmp / "trainer_state.pt")
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():  # re-saving a step (a resumed run that stopped at the same step)
        old = root / f".tmp-old-{step:06d}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    if keep is not None and keep > 0:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(model, path: str | os.PathLike) -> None:
    """Loads a `save_pretrained` folder's safetensors weights into `model` (same architecture)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"checkpoint {str(path)!r} has no .safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    own = model.state_dict()
    # transformers may store a checkpoint under its own key names (e.g. without the
    # "model." wrapper); match by suffix when the exact key is absent
    remapped = {}
    for k, v in state.items():
        if k in own:
            remapped[k] = v
            continue
        cands = [o for o in own if o.endswith(k) or k.endswith(o)]
        if len(cands) != 1:
            raise ValueError(f"checkpoint {str(path)!r}: weight {k!r} matches no parameter of the model")
        remapped[cands[0]] = v
    missing = set(own) - set(remapped)
    tied = {k for k in missing if "lm_head" in k or "embed_tokens" in k}
    if missing - tied:
        raise ValueError(f"checkpoint {str(path)!r} lacks weights {sorted(missing - tied)[:5]}")
    model.load_state_dict(remapped, strict=False)
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()


def load_trainer_state(path: str | os.PathLike) -> dict:
    return torch.load(Path(path) / "trainer_state.pt", weights_only=False)
