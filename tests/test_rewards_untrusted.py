"""Completions are untrusted text: every built-in reward finishes quickly on adversarial input
(a megabyte, deeply nested LaTeX, the worst case of each pattern it matches, invalid UTF-8),
the linear-time matchers agree with the regexes they replace, and a reward function that
raises, hangs or returns inf makes its rows unscorable (counted), or stops the run with
`reward_errors: raise`. Timings are printed (pytest -s); the only bound asserted is a
generous "does not hang"."""

import math
import re
import sys
import textwrap
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrft import rewards

HANG = 30.0  # seconds: far above any honest run time here, far below a hang

MB = 1 << 20
ADVERSARIAL = {
    "1 MB of letters": "a" * MB,
    "1 MB of digits": "7" * MB,
    "1 MB of '1.'": "1." * (MB // 2),
    "1 MB of minus signs": "-" * MB,
    "1 MB inside <answer>": "<answer>" + "x " * (MB // 2) + "</answer>",
    "<answer> repeated, never closed": "<answer>" * (MB // 8),
    "</answer> repeated": "</answer>" * (MB // 9),
    "format: many </think><answer> pairs, no end": "<think>" + "</think><answer>" * (MB // 16) + "x",
    "format: many </think> then whitespace": "<think>" + "</think>   " * (MB // 11) + "<answer>",
    "format: valid, huge": "<think>" + "t" * MB + "</think> <answer>" + "a" * MB + "</answer>",
    "answer is + 1 MB of spaces": "answer is" + " " * MB,
    "answer is, repeated": "answer is: (" * (MB // 12),
    "letters and parens": "(A" * (MB // 2),
    "deep LaTeX fractions": "<answer>$" + "\\frac{" * 5000 + "1" + "}{2}" * 5000 + "$</answer>",
    "deep LaTeX braces": "<answer>$" + "{" * 20000 + "1" + "}" * 20000 + "$</answer>",
    "deep parentheses": "<answer>$" + "(" * 20000 + "1" + ")" * 20000 + "$</answer>",
    "nested sqrt": "<answer>$" + "\\sqrt{" * 3000 + "2" + "}" * 3000 + "$</answer>",
    "huge power tower": "<answer>$9^{9^{9^{9^{9}}}}$</answer>",
    "huge factorial": "<answer>$100000000!$</answer>",
    "1 MB of LaTeX sums": "<answer>$" + "x+" * (MB // 2) + "1$</answer>",
    "boxed chain": "\\boxed{" * 20000 + "1" + "}" * 20000,
    "lone surrogates": "<answer>\udcff\udcfe 42 \ud800</answer>",
    "replacement chars": "\ufffd" * 1000 + "<answer>\ufffd42</answer>",
    "invalid UTF-8 bytes decoded":
        b"<think>\xff\xfe</think><answer>\xc3(4\xe2\x82</answer>".decode("utf-8", "surrogateescape"),
    "NUL and controls": "\x00\x01<answer>\x1b[31m42\x00</answer>",
}
SOLUTIONS = {"accuracy": "$\\frac{1}{2}$", "format": None, "iou": "[0, 0, 10, 10]", "shapes": "red"}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_builtin_rewards_survive_adversarial_text(name):
    text = ADVERSARIAL[name]
    for fn_name, fn in rewards.BUILTIN.items():
        t0 = time.perf_counter()
        out = fn(completions=[text], solution=[SOLUTIONS[fn_name]], completion_ids=[[1, 2]])
        dt = time.perf_counter() - t0
        print(f"{fn_name:>9} on {name!r} ({len(text)} chars): {dt:.3f} s -> {out}")
        assert len(out) == 1 and (out[0] is None or (isinstance(out[0], float) and math.isfinite(out[0])))
        assert dt < HANG, f"{fn_name} on {name}: {dt:.1f} s"


def test_builtins_still_score_legitimate_answers_next_to_junk():
    junk = "\\frac{" * 2000 + "x" * 10_000
    assert rewards.accuracy([junk + "<answer>$\\frac{1}{2}$</answer>"], ["$0.5$"]) == [1.0]
    assert rewards.accuracy(["x" * 100_000 + " so the answer is \\boxed{42}"], ["42"]) == [1.0]
    assert rewards.format(["<think>" + "</think>" * 1000 + "</think> <answer>4</answer>"]) == [1.0]


# the regexes the built-ins used before (quadratic or worse on the inputs above), as the spec
OLD_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
OLD_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
PIECES = st.lists(st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "a", "<", ">", "/",
                                   "<answer", "think>", "\t", "\u2003"]), max_size=14).map("".join)


@settings(max_examples=400, deadline=None)
@given(PIECES)
def test_linear_matchers_agree_with_the_regexes(text):
    found = OLD_ANSWER.findall(text)
    assert rewards.extract_answer(text) == (found[-1] if found else text).strip()
    assert rewards._is_format(text) == bool(OLD_FORMAT.fullmatch(text))


def test_old_format_regex_was_pathological():
    """Why the matchers changed: the old format regex on 2,000 tag pairs against the new one on 65,536."""
    small = "<think>" + "</think><answer>" * 2000 + "x"
    t0 = time.perf_counter()
    assert OLD_FORMAT.fullmatch(small) is None
    old = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert not rewards._is_format(ADVERSARIAL["format: many </think><answer> pairs, no end"])
    new = time.perf_counter() - t0
    print(f"old regex, 2,000 pairs: {old:.3f} s; linear matcher, {MB // 16} pairs: {new:.4f} s")


# ----------------------------------------------------------------------------- failing reward functions


def _compute(funcs, n=4, **kw):
    errors = {}
    per, total = rewards.compute_rewards(funcs, [1.0] * len(funcs), ["p"] * n, [f"c{i}" for i in range(n)],
                                         [[1]] * n, {"solution": ["s"] * n}, errors=errors, **kw)
    return per, total, errors


def test_raising_reward_makes_its_rows_unscorable(capsys):
    def boom(completions, **kw):
        raise RuntimeError("cannot parse this")

    good = lambda completions, **kw: [0.5] * len(completions)  # noqa: E731
    per, total, errors = _compute({"boom": boom, "good": good})
    assert all(math.isnan(v) for v in per[:, 0].tolist()) and per[:, 1].tolist() == [0.5] * 4
    assert total.tolist() == [0.5] * 4 and errors == {"boom": 4, "good": 0}
    err = capsys.readouterr().err
    assert "reward function 'boom' raised RuntimeError: cannot parse this" in err and "reward_errors/boom" in err
    _, total, _ = _compute({"boom": boom})
    assert all(math.isnan(v) for v in total.tolist())  # no function scored: advantage 0 downstream
    with pytest.raises(rewards.RewardError, match="reward function 'boom' raised RuntimeError"):
        _compute({"boom": boom}, on_error="raise")


@pytest.mark.parametrize("kind", ["python loop", "sleep", "swallows Exception",
                                  "catastrophic regex (python-level retries)"])
def test_hanging_reward_is_cut_off(kind):
    def hang(completions, **kw):
        if kind == "python loop":
            while True:
                pass
        elif kind == "sleep":
            time.sleep(3600)
        elif kind == "swallows Exception":
            while True:
                try:
                    time.sleep(0.01)
                except Exception:  # noqa: BLE001 - a careless user function: RewardTimeout is not an Exception
                    pass
        else:  # many short regex calls, each quadratic: the limit lands between them
            while True:
                OLD_FORMAT.fullmatch("<think>" + "</think><answer>" * 300 + "x")
        return [1.0] * len(completions)

    t0 = time.perf_counter()
    per, total, errors = _compute({"hang": hang}, timeout=1.0)
    dt = time.perf_counter() - t0
    print(f"{kind}: cut off after {dt:.2f} s (limit 1 s)")
    assert errors == {"hang": 4} and all(math.isnan(v) for v in total.tolist())
    assert dt < HANG
    with pytest.raises(rewards.RewardError, match="took longer than its time limit of 1 s"):
        _compute({"hang": hang}, timeout=1.0, on_error="raise")


def test_time_limit_leaves_fast_calls_and_math_verify_alone():
    t0 = time.perf_counter()
    for _ in range(200):
        with rewards.time_limit(5.0):
            pass
    print(f"200 limits set up and torn down: {time.perf_counter() - t0:.3f} s")
    with rewards.time_limit(10.0):  # math-verify's own signal.alarm nests inside
        assert rewards.accuracy(["<answer>$x^2+2x+1$</answer>"], ["$(x+1)^2$"]) == [1.0]
    time.sleep(0.05)  # no late signal arrives after the block


def test_infinite_reward_values_are_errors():
    f = lambda completions, **kw: [1.0, float("inf"), None, -float("inf")]  # noqa: E731
    per, total, errors = _compute({"f": f})
    assert errors == {"f": 2} and per[0, 0] == 1.0 and all(math.isnan(per[i, 0]) for i in (1, 2, 3))
    with pytest.raises(ValueError, match="rewards must be finite"):
        _compute({"f": f}, on_error="raise")


def test_wrong_shape_is_always_an_error():
    with pytest.raises(ValueError, match="must return a list of 4"):
        _compute({"f": lambda completions, **kw: [1.0]})


REWARDS = """
import time
STATE = {"calls": 0}
def moody(completions, **kw):
    STATE["calls"] += 1
    if STATE["calls"] % 2 == 0:
        raise ValueError("unparseable completion")
    if STATE["calls"] == 3:
        time.sleep(60)
    return [float(len(c) % 3) for c in completions]
"""


def test_training_survives_a_failing_reward(tmp_path, monkeypatch):
    """A real run whose user reward raises on every other call and hangs once: every step runs,
    the failures are counted per step in metrics.jsonl, and `raise` stops at the first."""
    from fastrft.metrics import read_metrics
    from fastrft.train import GRPOConfig, train

    (tmp_path / "moody_rewards.py").write_text(textwrap.dedent(REWARDS))
    monkeypatch.syspath_prepend(str(tmp_path))
    import moody_rewards

    base = dict(prompts_per_step=2, num_generations=2, max_completion_length=2, eval_size=0, progress=False,
                train_size=16, warmup_steps=0, save_steps=0, max_steps=4, reward_funcs=["moody_rewards:moody"],
                reward_timeout=2.0)
    t0 = time.perf_counter()
    train(GRPOConfig(output_dir=str(tmp_path / "run"), **base))
    print(f"4 steps with a failing reward: {time.perf_counter() - t0:.1f} s")
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("kind") == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["reward_errors/moody_rewards:moody"] for r in rows] == [0, 4, 4, 4]  # raised, hung, raised
    assert rows[1]["reward"] is None and rows[0]["reward"] is not None
    moody_rewards.STATE["calls"] = 0
    with pytest.raises(rewards.RewardError, match="unparseable completion"):
        train(GRPOConfig(output_dir=str(tmp_path / "run2"), reward_errors="raise", **base))
    sys.modules.pop("moody_rewards", None)
