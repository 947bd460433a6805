"""Checkpoints: a `save_pretrained` folder (safetensors weights, config, processor: loadable by
transformers as it is) plus the trainer state (optimizer, LR schedule, RNG states, data
position, step), written atomically and resumed exactly.

No pickle anywhere: the trainer state is `trainer_state.json` (numbers, strings, lists) with
its tensors (Adam moments, the torch/CUDA generator states, numpy's Mersenne-Twister key) in
`trainer_state.safetensors`, so loading a checkpoint from someone else cannot run code. A
`trainer_state.pt` (a pickle) is refused, never opened.

Atomic: everything is written into `checkpoints/.tmp-step-N`, each file fsynced, then renamed
to `checkpoints/step-N` (one `os.rename`, atomic on POSIX within a file system) and the
`checkpoints/` folder fsynced, so a crash (SIGKILL, power loss) leaves either the old set of
checkpoints or the new one, never a half-written `step-N`. An old checkpoint is renamed out
of the `step-N` namespace before it is deleted, so a kill during a deletion never leaves a
half-deleted `step-N` either. Leftover `.tmp-*` folders are removed on the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_STEP = re.compile(r"^step-(\d+)$")
STATE_JSON, STATE_TENSORS, LEGACY_PICKLE = "trainer_state.json", "trainer_state.safetensors", "trainer_state.pt"


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


# ----------------------------------------------------------------------------- pickle-free state


def _encode(obj, tensors: dict, path: str):
    """`obj` as JSON: tensors (and numpy arrays) go to `tensors` under their path and leave a
    reference; tuples and dicts with non-string keys are tagged so they come back as they were."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        tensors[path] = torch.from_numpy(arr.astype(np.int64 if arr.dtype.kind in "iu" else arr.dtype))
        return {"__ndarray__": path, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"trainer state {path}: dict keys must be str or int, got {sorted(map(type, obj))}")
        return {"__items__": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    raise TypeError(f"trainer state {path}: {type(obj).__name__} cannot be stored without pickle")


def _decode(obj, tensors: dict, where: str):
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj or "__ndarray__" in obj:
        key = obj.get("__tensor__", obj.get("__ndarray__"))
        if key not in tensors:
            raise ValueError(f"{where}: tensor {key!r} is missing from {STATE_TENSORS}")
        if "__tensor__" in obj:
            return tensors[key]
        return tensors[key].numpy().astype(np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: _decode(v, tensors, where) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Makes a rename or a new file in folder `path` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def save_trainer_state(folder: str | os.PathLike, state: dict) -> None:
    """`state` as trainer_state.json + trainer_state.safetensors in `folder` (no pickle)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    doc = _encode(state, tensors, "state")
    save_file(tensors, str(folder / STATE_TENSORS), metadata={"format": "fastrft-trainer-state-1"})
    (folder / STATE_JSON).write_text(json.dumps(doc, allow_nan=True))


def load_trainer_state(path: str | os.PathLike) -> dict:
    """The trainer state of checkpoint folder `path`. Reads JSON and safetensors only: a
    checkpoint that carries a pickle (`trainer_state.pt`) instead is refused unopened."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    doc_path, tensor_path = path / STATE_JSON, path / STATE_TENSORS
    if not doc_path.is_file():
        if (path / LEGACY_PICKLE).exists():
            raise ValueError(
                f"checkpoint {str(path)!r} holds its trainer state as {LEGACY_PICKLE}, a pickle file, which fastrft "
                f"does not load (unpickling can run arbitrary code); it expects {STATE_JSON} + {STATE_TENSORS}. "
                f"The weights (model.safetensors) are still usable: start a new run from them with --model {path}"
            )
        raise ValueError(f"checkpoint {str(path)!r} has no {STATE_JSON}")
    try:
        doc = json.loads(doc_path.read_text())
        tensors = load_file(str(tensor_path)) if tensor_path.exists() else {}
    except (ValueError, OSError, SafetensorError) as e:
        raise ValueError(f"checkpoint {str(path)!r}: unreadable trainer state ({e})") from e
    if not isinstance(doc, dict):
        raise ValueError(f"checkpoint {str(path)!r}: {STATE_JSON} must hold an object")
    return _decode(doc, tensors, str(path))


# ----------------------------------------------------------------------------- save and load


def _remove(folder: Path) -> None:
    """Deletes a checkpoint folder; renamed out of the `step-N` names first, so a kill halfway
    leaves a `.tmp-*` (cleaned up later), never an incomplete `step-N`."""
    doomed = folder.with_name(f".tmp-del-{folder.name}")
    os.rename(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(run_dir, step: int, model, processor, trainer_state: dict, keep: int | None = None,
                    extra=None) -> Path:
    """Writes checkpoint `step` atomically; keeps the newest `keep` (None: all). Returns its path.
    `extra(tmp_folder)`, if given, writes more files (a reference model) before the rename."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    model.save_pretrained(tmp, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(tmp)
    if extra is not None:
        extra(tmp)
    save_trainer_state(tmp, dict(trainer_state, step=step, rng=rng_state()))
    return publish(tmp, final, keep)


def publish(tmp: Path, final: Path, keep: int | None) -> Path:
    """Makes the complete folder `tmp` visible as checkpoint `final` (checkpoints/step-N): its
    files and folders fsynced, renamed into place (a `final` that exists is moved aside first,
    never half-replaced), the rename fsynced; then all but the newest `keep` removed."""
    root = final.parent
    for folder, _, files in os.walk(tmp):  # data on disk before the rename makes it visible
        for name in files:
            _fsync_file(Path(folder) / name)
        fsync_dir(folder)
    if final.exists():  # re-saving a step (a resumed run that stopped at the same step)
        old = root / f".tmp-old-{final.name}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(root)  # the rename itself on disk
    if keep is not None and keep > 0:
        for old in checkpoint_dirs(root.parent)[:-keep]:
            _remove(old)
        fsync_dir(root)
    return final


def load_weights(model, path: str | os.PathLike) -> None:
    """Loads a `save_pretrained` folder's safetensors weights into `model` (same architecture)."""
    from safetensors.torch import load_file

    from . import lora

    if lora.is_lora(model) and (Path(path) / lora.ADAPTER_FILE).is_file():  # LoRA: the adapter; the base is frozen
        return lora.load_adapter(model, path)

    files = sorted(Path(path).glob("*.safetensors"))
    files = [f for f in files if f.name != STATE_TENSORS]
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
