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

Completions are untrusted text. The built-ins run in linear time on any input (no regex with
nested or overlapping repetition: tags are found with `str.find`), hand math-verify at most
the last `MATH_MAX_CHARS` characters of an answer under its own per-expression timeouts, and
never raise on text. `compute_rewards` puts a wall-clock limit on every reward call
(`time_limit`: a watchdog thread that signals the main thread, which interrupts Python code,
`re` matching and blocking system calls) and, with `on_error="skip"`, turns a function that
raises or overruns into NaN for its rows (advantage 0), counted per function; with "raise" it
stops the run naming the function.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import numbers
import re
import signal
import sys
import threading
import time
from collections.abc import Callable

import torch

from .synthetic import ANSWERS, EOS_ID

# End-of-turn token ids the `shapes` reward accepts as "the completion stopped": the tiny
# tokenizer's <|im_end|>, and Qwen2/2.5-VL's <|endoftext|> and <|im_end|>.
END_IDS = frozenset({EOS_ID, 151643, 151645})

# Every regex here matches in time linear in its input: no nested or adjacent unbounded
# repetitions that could match the same text (tests/test_rewards_untrusted.py feeds each one
# its worst case). Tag pairs are found with str.find, not with lazy `.*?` (quadratic when
# an opening tag repeats without its closing one).
_LETTER = re.compile(r"^\(?([A-Z])\)?[.:)]?$")
_LETTER_TEXT = re.compile(r"^\(?([A-Z])[.:)]\s")
_ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-Z])\b", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
MATH_MAX_CHARS = 2000  # math-verify reads at most the last this many characters of an answer
MATH_TIMEOUT_S = 2  # math-verify's own per-parse / per-comparison limit (whole seconds: signal.alarm)


def _tag_spans(text: str, open_tag: str, close_tag: str) -> list[tuple[int, int]]:
    """(start, end) of the contents of non-overlapping open_tag...close_tag pairs, left to
    right, the first close after each open (what `re.findall(open(.*?)close, DOTALL)` finds)."""
    spans, pos = [], 0
    while (start := text.find(open_tag, pos)) >= 0:
        end = text.find(close_tag, start + len(open_tag))
        if end < 0:
            break
        spans.append((start + len(open_tag), end))
        pos = end + len(close_tag)
    return spans


def extract_answer(text: str) -> str:
    """The text inside the last <answer>...</answer>, else the whole text, stripped."""
    spans = _tag_spans(text, "<answer>", "</answer>")
    return (text[spans[-1][0] : spans[-1][1]] if spans else text).strip()


def _is_format(text: str) -> bool:
    """`\\s*<think>.*?</think>\\s*<answer>.*?</answer>\\s*` (DOTALL) as a full match, in linear time."""
    s = text.strip()
    if not (s.startswith("<think>") and s.endswith("</answer>")):
        return False
    last = len(s) - len("</answer>")  # where the closing tag starts
    pos = len("<think>")
    while (i := s.find("</think>", pos)) >= 0:
        k = i + len("</think>")
        j = k
        while j < len(s) and s[j].isspace():
            j += 1
        if s.startswith("<answer>", j) and j + len("<answer>") <= last:
            return True
        pos = k
    return False


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
    m = _LETTER.match(text) or _LETTER_TEXT.match(text)
    if m:
        return m.group(1)
    m = _ANSWER_IS.search(text)
    return m.group(1).upper() if m else None


def _math_equal(answer: str, solution: str) -> bool | None:
    """math-verify's verdict, None when it parses nothing or gives up (then other checks
    decide). It reads the last MATH_MAX_CHARS characters of each side (a final answer sits at
    the end), each parse and comparison under its own MATH_TIMEOUT_S; its log lines, which
    quote the whole input, are silenced."""
    try:
        from math_verify import parse, verify
    except ImportError:  # math-verify is a dependency, but a bare install may lack it
        return None
    answer, solution = answer[-MATH_MAX_CHARS:], solution[-MATH_MAX_CHARS:]
    logger = logging.getLogger("math_verify")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        gold = parse(solution if "$" in solution or "\\" in solution else f"${solution}$",
                     parsing_timeout=MATH_TIMEOUT_S)
        pred = parse(answer if "$" in answer or "\\" in answer else f"${answer}$", parsing_timeout=MATH_TIMEOUT_S)
        if not gold or not pred:
            return None
        return bool(verify(gold, pred, timeout_seconds=MATH_TIMEOUT_S))
    except Exception:  # noqa: BLE001 - text math-verify cannot handle (deep nesting, huge numbers) is no match
        return None
    finally:
        logger.setLevel(level)


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
    if letter is not None and len(sol.strip("().: ")) == 1:  # multiple choice: compare letters only
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
    return [1.0 if _is_format(c) else 0.0 for c in completions]


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


def shapes(completions: list[str], solution: list[str], completion_ids: list | None = None, **_) -> list[float]:
    """The synthetic task's one-word answers, which must end the completion. Two halves, added:
    - the word: 0.5 when the first word of the completion (or of the text inside
      <answer>...</answer>) is the solution, 0.1 when it is one of the question's other options;
    - the stop: 0.5 when the completion is one word and stopped with an end-of-turn token (its
      last id is in `END_IDS`; without `completion_ids` the text alone decides), whatever the word.
    Reward exactly 1 (accuracy) thus means "the right word, then stop".

    Why the stop pays on its own: a random policy stops after its first word ~4% of the time
    (one end token among ~60). When only "right word and stop" paid for the stop, ~1 sample in
    500 carried that signal, and the second token collapsed onto whichever word the rewarded
    samples happened to carry: the demo's vLLM run at seed 0 ended with every completion cut at
    max_completion_length (held-out accuracy 0.000).
    The 0.1 for another option gives a random policy a signal to answer with a colour at all
    (a group of equal rewards carries no GRPO signal)."""
    out = []
    ids_list = completion_ids if completion_ids is not None else [None] * len(completions)
    for text, sol, ids in zip(completions, solution, ids_list):
        words = extract_answer(text).split()
        first = words[0] if words else ""
        options = next((opts for opts in ANSWERS.values() if sol in opts), ())
        ended = ids is None or (len(ids) > 0 and int(ids[-1]) in END_IDS)
        word = 0.5 if first == sol else 0.1 if first in options else 0.0
        out.append(word + (0.5 if len(words) == 1 and ended else 0.0))
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


class RewardTimeout(BaseException):
    """A reward call ran past its time limit. A BaseException, like KeyboardInterrupt, so that
    a reward function's own `except Exception:` does not swallow it."""


class RewardError(ValueError):
    """A reward function raised or overran its time limit, with `reward_errors: raise`."""


# the signal the watchdog sends: a real-time one where there are (no library uses it), else SIGUSR2
_SIGNAL = (signal.SIGRTMIN + 3) if hasattr(signal, "SIGRTMIN") else getattr(signal, "SIGUSR2", None)
_ACTIVE: dict = {}  # the running limit: {"token": object, "message": str}


def _on_signal(signum, frame):
    active = _ACTIVE.pop("fired", None)
    if active is not None:
        raise RewardTimeout(active)


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str = "call"):
    """Raises RewardTimeout in the block after `seconds` of wall time (None or <= 0: no limit).

    A watchdog thread waits on an event; at the deadline it sends the main thread a signal whose
    handler raises. CPython runs signal handlers between bytecodes, inside `re` matching (the
    matcher polls for signals) and on return from an interrupted blocking call (sleep, socket
    reads), so Python code, regexes and I/O are all cut off; C code that never returns to the
    interpreter (one huge arithmetic operation) is not, which is why the built-ins also bound
    their inputs. signal.alarm is left alone: math-verify uses it for its own timeouts, which
    nest inside this limit. Only the main thread can receive Python signals: elsewhere (or
    without pthread_kill) the block runs without a limit."""
    if (not seconds or seconds <= 0 or _SIGNAL is None or not hasattr(signal, "pthread_kill")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return
    if signal.getsignal(_SIGNAL) is not _on_signal:
        signal.signal(_SIGNAL, _on_signal)
    done, main = threading.Event(), threading.get_ident()
    message = f"{what} took longer than its time limit of {seconds:g} s"

    def watchdog():
        if not done.wait(seconds):
            _ACTIVE["fired"] = message
            signal.pthread_kill(main, _SIGNAL)

    thread = threading.Thread(target=watchdog, name="fastrft-reward-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        # a deadline that passed as the block finished: its signal may still be pending; the
        # handler finds nothing to raise once the flag is gone
        _ACTIVE.pop("fired", None)


def _check_values(name: str, values, n: int, bad_rows: list[int] | None = None) -> list[float]:
    """`values` as n floats (None -> NaN). Non-finite numbers (inf) are this function's
    errors: with `bad_rows` they become NaN and their rows are listed there, else they raise."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"length {len(values)}" if isinstance(values, (list, tuple)) else type(values).__name__
        raise ValueError(f"reward function {name!r} must return a list of {n} numbers (or None), got {got}")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(float("nan"))
        elif isinstance(v, numbers.Real) and not isinstance(v, bool):
            v = float(v)
            if math.isinf(v):
                if bad_rows is None:
                    raise ValueError(f"reward function {name!r} returned {v} at position {i}: rewards must be finite")
                bad_rows.append(i)
                v = float("nan")
            out.append(v)
        elif isinstance(v, bool):
            out.append(float(v))
        else:
            raise ValueError(
                f"reward function {name!r} returned {type(v).__name__} {v!r} at position {i}: expected a number or None"
            )
    return out


_WARNED: set = set()


def compute_rewards(
    funcs: dict[str, Callable], weights: list[float], prompts: list, completions: list[str], completion_ids: list,
    columns: dict, *, timeout: float | None = None, on_error: str = "skip", errors: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Calls each reward function once on the whole batch, each call under `timeout` seconds.

    A function that raises, overruns `timeout` or returns an infinite value: with `on_error`
    "skip" its rows (all of them; the infinite ones only) are NaN for it (unscorable) and their
    count goes to `errors[name]` (a dict the caller passes; the first error of each function is
    also printed, with its message); with "raise", RewardError naming the function. A result of
    the wrong length or type is a bug in the function, not in the text: always ValueError.

    Returns (per_function [B, F] float32, NaN where unscorable; total [B] float32: the weighted
    sum over the functions that scored, NaN where none did).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"reward_errors must be 'skip' or 'raise', got {on_error!r}")
    n = len(completions)
    per_func = torch.empty(n, len(funcs), dtype=torch.float32)
    for j, (name, func) in enumerate(funcs.items()):
        failure, bad_rows = None, []
        t0 = time.perf_counter()
        try:
            with time_limit(timeout, f"reward function {name!r}"):
                values = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except RewardTimeout as e:
            failure = str(e)
        except Exception as e:  # noqa: BLE001 - a reward function's failure on untrusted text
            failure = f"reward function {name!r} raised {type(e).__name__}: {e}"
            if on_error == "raise":
                raise RewardError(f"{failure} (reward_errors: raise; 'skip' scores its rows NaN instead)") from e
        if failure is not None:
            if on_error == "raise":
                raise RewardError(f"{failure} (reward_errors: raise; 'skip' scores its rows NaN instead)")
            per_func[:, j] = float("nan")
            bad_rows = list(range(n))
        else:
            per_func[:, j] = torch.tensor(_check_values(name, values, n, bad_rows if on_error == "skip" else None),
                                          dtype=torch.float32)
            if bad_rows:
                failure = f"reward function {name!r} returned a non-finite value for {len(bad_rows)} of {n} rows"
        if errors is not None:
            errors[name] = errors.get(name, 0) + len(bad_rows)
        if failure is not None and name not in _WARNED:
            _WARNED.add(name)
            print(f"warning: {failure[:500]} after {time.perf_counter() - t0:.1f} s; its rows are unscorable "
                  f"(NaN, advantage 0), counted in reward_errors/{name} (reported once per function)",
                  file=sys.stderr, flush=True)
    w = torch.tensor(weights, dtype=torch.float32)  # [F]
    scored = ~per_func.isnan()  # [B, F]
    total = (per_func.nan_to_num(0.0) * w).sum(1)  # [B]
    total[~scored.any(1)] = float("nan")
    return per_func, total
