"""Reward functions, TRL's calling convention: `f(prompts=[B], completions=[B], completion_ids=[B],
**columns) -> [B]` where every dataset column (problem, solution, ...) comes as a list of B.

A reward may be None for a sample it cannot score (a box reward on a row without a box):
that becomes NaN, and a sample with NaN for every function gets advantage 0 (it neither
pushes nor pulls). Several functions combine by a weighted sum over the ones that scored.

Built in, by name: `accuracy` (math-verify for math, exact and numeric match, multiple-choice
letters), `format` (`<think>...</think><answer>...</answer>`), `iou` (boxes), `shapes` (the
synthetic task's one-word answers, with a small reward for answering at all). A user's own
function is named `module:function` (`my_rewards:length_penalty`, importable from the
working directory).
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
import sys
from typing import Callable

import torch

from .synthetic import ANSWERS

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
_LETTER = re.compile(r"^\(?([A-Z])\)?[.:)]?$")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(text: str) -> str:
    """The text inside the last <answer>...</answer>, else the whole text, stripped."""
    found = _ANSWER.findall(text)
    return (found[-1] if found else text).strip()


def _normalize(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("$", "").strip())
    except ValueError:
        return None


def _choice_letter(text: str) -> str | None:
    """'B', '(B)', 'B.', 'B) text', 'The answer is B' -> 'B'; None when there is no lone letter."""
    text = text.strip()
    m = _LETTER.match(text) or re.match(r"^\(?([A-Z])[.:)]\s", text)
    if m:
        return m.group(1)
    m = re.search(r"answer is:?\s*\(?([A-Z])\b\)?", text, re.IGNORECASE)
    return m.group(1).upper() if m else None


def _math_equal(answer: str, solution: str) -> bool | None:
    """math-verify's verdict, None when it parses nothing (then other checks decide)."""
    try:
        from math_verify import parse, verify
    except ImportError:  # math-verify is a dependency, but a bare install may lack it
        return None
    gold = parse(solution if "$" in solution or "\\" in solution else f"${solution}$")
    pred = parse(answer if "$" in answer or "\\" in answer else f"${answer}$")
    if not gold or not pred:
        return None
    return bool(verify(gold, pred))


def accuracy_one(completion: str, solution) -> float | None:
    """1.0 when the completion's answer matches `solution`, else 0.0; None if no solution."""
    if solution is None:
        return None
    sol = extract_answer(str(solution))
    if not sol:
        return None
    ans = extract_answer(completion)
    if _normalize(ans) == _normalize(sol):
        return 1.0
    letter = _choice_letter(sol)
    if letter is not None and len(sol.strip("().:) ")) == 1:  # multiple choice: compare letters only
        return float(_choice_letter(ans) == letter)
    a, s = _as_number(ans), _as_number(sol)
    if s is not None:
        if a is not None:
            return float(math.isclose(a, s, rel_tol=1e-6, abs_tol=1e-9))
        # "the answer is 42" against 42: the last number in the answer decides
        nums = _NUMBER.findall(ans)
        if nums and not any(c in sol for c in "\\$"):
            return float(math.isclose(float(nums[-1]), s, rel_tol=1e-6, abs_tol=1e-9))
    verdict = _math_equal(ans, sol)
    return float(verdict) if verdict is not None else 0.0


def accuracy(completions: list[str], solution: list, **_) -> list[float | None]:
    """Exact, numeric, multiple-choice-letter or math-verify match against `solution`."""
    return [accuracy_one(c, s) for c, s in zip(completions, solution)]


def format(completions: list[str], **_) -> list[float]:  # noqa: A001 (TRL/R1-V's name for it)
    """1.0 for exactly `<think>...</think><answer>...</answer>` (whitespace around allowed)."""
    return [1.0 if _FORMAT.fullmatch(c) else 0.0 for c in completions]


def _box(value) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, str):
        nums = _NUMBER.findall(extract_answer(value))
        value = [float(n) for n in nums[:4]] if len(nums) >= 4 else None
    if value is None or len(value) != 4:
        return None
    return [float(v) for v in value]


def box_iou(a: list[float], b: list[float]) -> float:
    """IoU of two [x1, y1, x2, y2] boxes (0 for degenerate or disjoint ones)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def iou(completions: list[str], solution: list, **_) -> list[float | None]:
    """IoU between the first 4 numbers of the answer and the solution box; None without a box."""
    out = []
    for c, s in zip(completions, solution):
        gold = _box(s)
        if gold is None:
            out.append(None)
            continue
        pred = _box(c)
        out.append(box_iou(pred, gold) if pred is not None else 0.0)
    return out


def shapes(completions: list[str], solution: list[str], **_) -> list[float]:
    """The synthetic task's one-word answers: 1 when the first word of the completion (or of
    the text inside <answer>...</answer>) is the solution, 0.1 when it is one of the question's
    other options (a random policy must first learn to answer at all: with a ~50-token
    vocabulary a bare 0/1 reward is 0 for most groups of 8 at the start, and a group of equal
    rewards carries no GRPO signal), else 0."""
    out = []
    for text, sol in zip(completions, solution):
        words = extract_answer(text).split()
        first = words[0] if words else ""
        options = next((opts for opts in ANSWERS.values() if sol in opts), ())
        out.append(1.0 if first == sol else 0.1 if first in options else 0.0)
    return out


BUILTIN: dict[str, Callable] = {"accuracy": accuracy, "format": format, "iou": iou, "shapes": shapes}


def load_reward(name: str) -> Callable:
    """A built-in reward by name, or `module:function` imported (the working directory first)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a reward function is named by a string, got {name!r}")
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}: use one of {sorted(BUILTIN)} or 'module:function'")
    module_name, func_name = name.split(":", 1)
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # `python -m` and console scripts leave out the working directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r} ({e})") from e
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"reward {name!r}: module {module_name!r} has no function {func_name!r}")
    return func


def _check_values(name: str, values, n: int) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"length {len(values)}" if isinstance(values, (list, tuple)) else type(values).__name__
        raise ValueError(f"reward function {name!r} must return a list of {n} numbers (or None), got {got}")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(float("nan"))
        elif isinstance(v, numbers.Real):
            out.append(float(v))
        else:
            raise ValueError(
                f"reward function {name!r} returned {type(v).__name__} {v!r} at position {i}: expected a number or None"
            )
    return out


def compute_rewards(
    funcs: dict[str, Callable], weights: list[float], prompts: list, completions: list[str], completion_ids: list, columns: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Calls each reward function once on the whole batch.

    Returns (per_function [B, F] float32, NaN where unscorable; total [B] float32: the weighted
    sum over the functions that scored, NaN where none did).
    """
    n = len(completions)
    per_func = torch.empty(n, len(funcs), dtype=torch.float32)
    for j, (name, func) in enumerate(funcs.items()):
        values = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        per_func[:, j] = torch.tensor(_check_values(name, values, n), dtype=torch.float32)
    w = torch.tensor(weights, dtype=torch.float32)  # [F]
    scored = ~per_func.isnan()  # [B, F]
    total = (per_func.nan_to_num(0.0) * w).sum(1)  # [B]
    total[~scored.any(1)] = float("nan")
    return per_func, total
