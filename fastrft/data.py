"""Datasets: rows of image path(s), problem and solution (the R1-V / EasyR1 / VLM-R1 shape).

Accepted sources:
- `shapes`: the synthetic task of `fastrft.synthetic` (generated in code, images drawn on use);
- a `.jsonl` / `.json` file (one object per line / a list), or a `.parquet` file;
- a local `datasets` folder written by `Dataset.save_to_disk` (or a `DatasetDict` folder, whose
  `train` / `test` split is taken).

Columns, by the names those projects use: the image as `image` (path or PIL image) or `images`
(a list); the question as `problem` (or `prompt`, `question`); the answer as `solution` (or
`answer`). Image paths are relative to the data file's folder. Every other column passes
through to the reward functions. Images are checked to exist when the data loads and are
decoded when used; a missing or unreadable image is a ValueError naming the row and file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import synthetic

PROBLEM_KEYS = ("problem", "prompt", "question")
SOLUTION_KEYS = ("solution", "answer")


class Row(dict):
    """A dataset row (a plain dict to everything that reads it) that knows where it came from:
    `where` is "FILE:LINE" (1-based: the line of a .jsonl, the item of a .json list, the row
    of a parquet file or datasets folder), the one way every error names a row."""

    where: str = "?"


def _where(source: str, index: int, lines: list[int] | None) -> str:
    return f"{source}:{lines[index] if lines is not None else index + 1}"


def _first(row: dict, keys: tuple[str, ...], what: str, where: str):
    for k in keys:
        if k in row and row[k] is not None:
            return row[k]
    raise ValueError(f"{where}: no {what} column (looked for {', '.join(keys)}; the row has {sorted(row)})")


def _read_table(path: Path) -> tuple[list[dict], list[int] | None]:
    """(rows, their 1-based line numbers for a .jsonl, else None)."""
    if path.is_dir():
        try:
            import datasets
        except ImportError as e:  # pragma: no cover - datasets is an optional extra
            raise ValueError(f"{path} is a folder: reading a datasets folder needs `pip install datasets`") from e
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            split = next((s for s in ("train", "test", "validation") if s in ds), None) or next(iter(ds))
            ds = ds[split]
        return [dict(r) for r in ds], None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows, lines = [], []
        with open(path, "rb") as f:  # bytes: a line is what ends in \n, and its encoding is checked here
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad = f"byte 0x{raw[e.start]:02x} at column {e.start + 1}"
                    raise ValueError(f"{path}:{n}: not UTF-8 text ({bad})") from e
                if line.strip():
                    rows.append(_json_value(line, f"{path}:{n}"))
                    lines.append(n)
        return rows, lines
    if suffix == ".json":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from e
        data = _json_value(text, str(path))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        return data, None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist(), None
    raise ValueError(f"dataset {str(path)!r}: expected a .jsonl, .json or .parquet file or a datasets folder")


def _json_value(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = f" (line {e.lineno})" if e.lineno > 1 else ""
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}{line})") from e
    except RecursionError as e:
        raise ValueError(f"{where}: JSON nested too deeply to read") from e


def _check_field(value, field: str, where: str, kinds: tuple, expected: str):
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{where}: field {field!r} must be {expected}, got {type(value).__name__} {_short(value)}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _normalize_row(row: dict, where: str, root: Path | None) -> Row:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: the row is {type(row).__name__}, expected an object")
    out = Row((k, v) for k, v in row.items() if k not in ("image", "images"))
    out.where = where
    key = next((k for k in PROBLEM_KEYS if row.get(k) is not None), "problem")
    out["problem"] = _check_field(_first(row, PROBLEM_KEYS, "problem", where), key, where, (str,), "text")
    key = next((k for k in SOLUTION_KEYS if row.get(k) is not None), "solution")
    solution = _check_field(_first(row, SOLUTION_KEYS, "solution", where), key, where, (str, int, float, list, tuple),
                            "text, a number or a list (a box)")
    if isinstance(solution, (list, tuple)):
        for v in solution:
            _check_field(v, f"{key}[]", where, (str, int, float), "a list of numbers or texts")
    out["solution"] = solution
    field = "images" if "images" in row else "image"
    images = row.get("images", row.get("image"))
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    resolved = []
    for im in images:
        if isinstance(im, dict) and ("path" in im or "bytes" in im):  # datasets' Image feature, undecoded
            im = im.get("path") or im
            if isinstance(im, dict) and not isinstance(im.get("bytes"), (bytes, bytearray)):
                raise ValueError(f"{where}: field {field!r}: an image's 'bytes' must be bytes, got "
                                 f"{type(im.get('bytes')).__name__}")
        elif not (isinstance(im, (str, os.PathLike)) or hasattr(im, "convert")):
            raise ValueError(f"{where}: field {field!r} must hold image paths (or PIL images), got "
                             f"{type(im).__name__} {_short(im)}")
        if isinstance(im, str) and ("\x00" in im or not im.strip()):
            raise ValueError(f"{where}: field {field!r}: {_short(im)} is not a file path")
        if isinstance(im, (str, os.PathLike)):
            p = Path(im)
            if not p.is_absolute() and root is not None:
                p = root / p
            if not p.is_file():
                raise ValueError(f"{where}: image file {str(p)!r} does not exist")
            resolved.append(str(p))
        else:
            resolved.append(im)
    out["images"] = resolved
    return out


def load_rows(source: str, *, split: str = "train", size: int | None = None, seed: int = 0, tasks=None) -> list[dict]:
    """Rows as dicts with `problem`, `solution`, `images` (paths, PIL images or synthetic
    objects) and any other columns. `split`, `size`, `seed`, `tasks` apply to `shapes` only."""
    if source == "shapes":
        n = size if size is not None else (4096 if split == "train" else 192)
        # the held-out split comes from another seed stream: no row of it is a training row
        rows = synthetic.make_split(n, seed if split == "train" else seed + 1_000_003, tasks or synthetic.TASKS)
        rows = [_synthetic_row(r, f"shapes ({split} split):{i + 1}") for i, r in enumerate(rows)]
    else:
        path = Path(source)
        if not path.exists():
            raise ValueError(f"dataset {source!r} does not exist (a file, a datasets folder, or 'shapes')")
        raw, lines = _read_table(path)
        root = path if path.is_dir() else path.parent
        rows = [_normalize_row(r, _where(source, i, lines), root) for i, r in enumerate(raw)]
        if size is not None:
            rows = rows[:size]
    if not rows:
        raise ValueError(f"dataset {source!r} ({split}) has no rows")
    return rows


def _synthetic_row(row: dict, where: str) -> Row:
    out = Row(row, images=[{"objects": row["objects"]}])
    out.where = where
    return out


def load_image(image, *, where: str | None = None, image_size: int = 56):
    """A PIL RGB image from a path, a PIL image or a synthetic {"objects": ...} description,
    decoded (a truncated file fails here, not later); `where` ("FILE:LINE") names the row."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, dict) and "objects" in image:
        return synthetic.render(image["objects"], image_size)
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"{where + ': ' if where else ''}cannot read image {str(image)!r}: {e}") from e
    if isinstance(image, dict) and isinstance(image.get("bytes"), (bytes, bytearray)):  # datasets' Image, undecoded
        import io

        try:
            with Image.open(io.BytesIO(image["bytes"])) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"{where + ': ' if where else ''}cannot read the image's bytes "
                             f"({len(image['bytes'])} bytes): {e}") from e
    if hasattr(image, "convert"):
        return image.convert("RGB")
    prefix = f"{where}: " if where else ""
    raise ValueError(f"{prefix}an image must be a path or a PIL image, got {type(image).__name__}")


def messages_for(row: dict, system_prompt: str | None = None) -> list[dict]:
    """Chat messages for `row`: its images first, then the problem (Qwen-VL's order)."""
    content = [{"type": "image"} for _ in row["images"]] + [{"type": "text", "text": row["problem"]}]
    msgs = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    return msgs + [{"role": "user", "content": content}]


def render_prompt(processor, row: dict, system_prompt: str | None = None) -> str:
    """The prompt text with the generation prompt appended (image placeholders unexpanded)."""
    msgs = messages_for(row, system_prompt)
    target = processor if getattr(processor, "chat_template", None) else getattr(processor, "tokenizer", processor)
    if getattr(target, "chat_template", None):
        if target is getattr(processor, "tokenizer", None) or not hasattr(processor, "tokenizer"):
            # a tokenizer's template takes plain-string content
            msgs = [
                {"role": m["role"], "content": " ".join(p["text"] for p in m["content"] if p["type"] == "text")}
                for m in msgs
            ]
        return target.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    if row["images"]:
        raise ValueError("the processor has no chat template, so image rows cannot be rendered")
    return row["problem"]


class PromptSampler:
    """Prompt indices in a fresh permutation each epoch (seeded). Its `state_dict` (epoch,
    position) makes resume exact: the next batch after a resume is the one that would have come."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError(f"the dataset must have at least one row, got {n}")
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(k - len(out), self.n - self.pos)
            out += self._order[self.pos : self.pos + take]
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(f"resume: the dataset has {self.n} rows, the checkpoint was taken with {state['n']}")
        self.seed, self.epoch, self.pos = state["seed"], state["epoch"], state["pos"]
        self._order = self._permutation()



