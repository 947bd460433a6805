"""Reward functions: accuracy (exact, numeric, multiple choice, math-verify), format, IoU, user
functions by module:function, and the checks on what a reward function returns."""

import math
import sys
import textwrap

import pytest
import torch

from fastrft import rewards


@pytest.mark.parametrize(
    "completion, solution, expected",
    [
        ("<think>x</think><answer>Paris</answer>", "paris", 1.0),  # exact, case-insensitive
        ("<answer> paris. </answer>", "<answer>Paris</answer>", 1.0),  # tags on both sides
        ("<answer>Lyon</answer>", "Paris", 0.0),
        ("<answer>3.50</answer>", "3.5", 1.0),  # numeric
        ("<answer>1,000</answer>", "1000", 1.0),
        ("the answer is 42", "42", 1.0),  # last number of a sentence
        ("the answer is 41", "42", 0.0),
        ("<answer>(B)</answer>", "B", 1.0),  # multiple-choice letters
        ("<answer>B. blue</answer>", "(B)", 1.0),
        ("The answer is C", "B", 0.0),
        ("<answer>$\\frac{1}{2}$</answer>", "$0.5$", 1.0),  # math-verify
        ("<answer>$x^2+2x+1$</answer>", "$(x+1)^2$", 1.0),
        ("<answer>$x^2+1$</answer>", "$(x+1)^2$", 0.0),
    ],
)
def test_accuracy(completion, solution, expected):
    assert rewards.accuracy([completion], [solution]) == [expected]


def test_accuracy_unscorable_without_solution():
    assert rewards.accuracy(["<answer>1</answer>", "2"], [None, ""]) == [None, None]


def test_format():
    got = rewards.format(["<think>a b</think> <answer>c</answer>", "<answer>c</answer>", "<think>a</think><answer>c"])
    assert got == [1.0, 0.0, 0.0]


def test_iou():
    got = rewards.iou(["<answer>[0, 0, 10, 10]</answer>", "[5, 0, 15, 10]", "no box", "[0,0,1,1]"],
                      [[0, 0, 10, 10], "[0, 0, 10, 10]", [0, 0, 10, 10], None])
    assert got[0] == pytest.approx(1.0)
    assert got[1] == pytest.approx(50 / 150)  # overlap 5x10 over union 150
    assert got[2] == 0.0 and got[3] is None


def test_shapes_reward_shaping():
    got = rewards.shapes(["red", "blue <answer>", "<answer>red</answer>", "circle", "", "top-left"],
                         ["red", "red", "red", "red", "red", "top-right"])
    # 0.5 the right word (0.1 another option) + 0.5 one word, then stop (text only: a one-word text stopped)
    assert got == [1.0, 0.1, 1.0, 0.5, 0.0, 0.6]


def test_compute_rewards_weighted_and_nan():
    funcs = {"a": lambda completions, **kw: [1.0, None, None], "b": lambda completions, **kw: [0.5, 2.0, None]}
    per_func, total = rewards.compute_rewards(funcs, [2.0, 1.0], ["p"] * 3, ["x", "y", "z"], [[1]] * 3, {})
    assert per_func.shape == (3, 2) and math.isnan(per_func[1, 0])
    assert total[0].item() == pytest.approx(2.5) and total[1].item() == pytest.approx(2.0)
    assert math.isnan(total[2].item())  # no function scored it: advantage 0 downstream


def test_columns_reach_reward_functions():
    seen = {}

    def f(prompts, completions, completion_ids, solution, extra, **kw):
        seen.update(prompts=prompts, ids=completion_ids, solution=solution, extra=extra)
        return [0.0] * len(completions)

    rewards.compute_rewards({"f": f}, [1.0], ["p1", "p2"], ["c1", "c2"], [[3], [4, 5]],
                            {"solution": ["s1", "s2"], "extra": [7, 8]})
    assert seen == {"prompts": ["p1", "p2"], "ids": [[3], [4, 5]], "solution": ["s1", "s2"], "extra": [7, 8]}


@pytest.mark.parametrize(
    "returned, message",
    [([1.0], "list of 3"), ("abc", "list of 3"), ([1.0, "x", 2.0], "str 'x' at position 1"), (None, "NoneType")],
)
def test_bad_reward_function_output(returned, message):
    with pytest.raises(ValueError, match=message):
        rewards.compute_rewards({"bad": lambda **kw: returned}, [1.0], ["p"] * 3, ["a", "b", "c"], [[1]] * 3, {})


def test_user_function_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length(completions, **kw):
            return [float(len(c)) for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    f = rewards.load_reward("my_rewards:length")
    assert f(completions=["ab", "abc"]) == [2.0, 3.0]
    with pytest.raises(ValueError, match="has no function 'nope'"):
        rewards.load_reward("my_rewards:nope")
    with pytest.raises(ValueError, match="cannot import module"):
        rewards.load_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="unknown reward 'acuracy'"):
        rewards.load_reward("acuracy")
    sys.modules.pop("my_rewards", None)


def test_tensor_output_accepted():
    _, total = rewards.compute_rewards({"t": lambda **kw: torch.tensor([0.25, 0.75])}, [1.0], ["p"] * 2, ["a", "b"],
                                       [[1]] * 2, {})
    assert total.tolist() == [0.25, 0.75]
