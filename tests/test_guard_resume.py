"""Nothing NaN, nothing lost: the divergence guard (a step with a non-finite loss or gradient
norm is skipped with the optimizer untouched, counted, and K in a row stop the run, leaving
the last checkpoint intact), and resume reproducing the uninterrupted run bitwise on CPU for
an interruption at any step, between checkpoints or before the first one."""

import math
import sys
import textwrap

import pytest
import torch

from fastrft import checkpoint as ckpt
from fastrft import synthetic
from fastrft.guard import DivergenceError, NonFiniteGuard
from fastrft.metrics import read_metrics
from fastrft.train import GRPOConfig, train

SMALL = dict(prompts_per_step=2, num_generations=2, max_completion_length=2, eval_size=0, progress=False,
             train_size=16, warmup_steps=0, num_threads=1)
TIMING = ("seconds", "tokens_per_s", "peak_memory_mb")


def test_guard_on_real_tensors():
    """The helper's verdicts on losses and gradient norms computed from real tensors."""
    p = torch.nn.Parameter(torch.ones(3))
    for x, ok in ((torch.tensor([1.0, 2.0, 3.0]), True), (torch.tensor([1.0, float("nan"), 3.0]), False),
                  (torch.tensor([3e38, 3e38, 1.0]), False)):  # the last overflows to inf in the sum
        p.grad = None
        loss = (p * x).sum()
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_([p], 1.0))
        assert NonFiniteGuard.finite(float(loss.detach()), norm) is ok, (x, norm)
    guard, history = NonFiniteGuard(3), {}
    for step, skipped in enumerate([True, False, True, True], 1):
        guard.end_step(skipped, history)
        guard.stop_if_diverged(history, step, float("nan"), 1.0)
    assert history == {"skipped_steps": 3, "nonfinite_streak": 2}
    guard.end_step(True, history)
    with pytest.raises(DivergenceError, match=r"stopped at step 5: 3 steps in a row .*loss=nan.*max_nonfinite_steps=3"):
        guard.stop_if_diverged(history, 5, float("nan"), float("inf"), checkpoint="runs/x/checkpoints/step-000004")
    with pytest.raises(ValueError, match="max_nonfinite_steps must be >= 1"):
        NonFiniteGuard(0)


def _poisoned_model(path):
    """The tiny model saved with its final norm's weight NaN: every logit NaN from step 1."""
    from safetensors.torch import load_file, save_file

    synthetic.save_tiny(path, seed=0)
    weights = load_file(str(path / "model.safetensors"))
    key = next(k for k in weights if k in ("model.norm.weight", "model.language_model.norm.weight"))
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return weights


def test_nan_logits_skip_and_stop(tmp_path, capsys):
    """A real run of a model whose logits are NaN from the start (greedy rollouts: sampling
    from NaN probabilities is an error of its own): steps 1-3 are skipped and counted, the
    third stops the run with one line; steps 1-2's checkpoints hold the untouched weights
    and an untouched optimizer."""
    from fastrft.__main__ import main

    weights = _poisoned_model(tmp_path / "nan-model")
    run = tmp_path / "run"
    argv = ["train", "--model", str(tmp_path / "nan-model"), "--output_dir", str(run), "--temperature", "0",
            "--max_steps", "6", "--save_steps", "1", "--max_nonfinite_steps", "3"]
    for k, v in SMALL.items():
        argv += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = next(x for x in err if "stopped at step" in x)
    print(line)
    assert "stopped at step 3: 3 steps in a row had a non-finite loss or gradient norm" in line
    assert "step-000002, is intact" in line
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["skipped_steps"] for r in rows] == [1, 2, 3]
    assert all(r["loss"] is None or r["grad_norm"] is None for r in rows)  # non-finite, logged as null
    assert [p.name for p in ckpt.checkpoint_dirs(run)] == ["step-000001", "step-000002"]
    latest = ckpt.latest_checkpoint(run)
    state = ckpt.load_trainer_state(latest)
    assert state["optimizer"]["state"] == {} and state["scheduler"]["last_epoch"] == 0  # no update, no LR step
    assert state["history"]["skipped_steps"] == 2
    from safetensors.torch import load_file

    saved = load_file(str(latest / "model.safetensors"))
    for k, v in weights.items():
        assert torch.equal(saved[k].nan_to_num(7.0), v.nan_to_num(7.0)), k  # the weights never moved


def _train_rows(run):
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)}
            for r in read_metrics(run / "metrics.jsonl") if r.get("kind") in ("train", "eval")]


STOP = """
from fastrft.rewards import shapes
STATE = {"calls": 0, "stop_at": None}
def stopping(completions, solution, **kw):
    STATE["calls"] += 1
    if STATE["calls"] == STATE["stop_at"]:
        raise KeyboardInterrupt  # the run interrupted in step `stop_at` (Ctrl-C; not a reward error)
    return shapes(completions, solution, **kw)
"""


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    (tmp / "stop_rewards.py").write_text(textwrap.dedent(STOP))
    sys.path.insert(0, str(tmp))
    import stop_rewards

    base = {**SMALL, "max_steps": 5, "save_steps": 2, "eval_size": 4, "eval_steps": 2,
            "reward_funcs": ["stop_rewards:stopping"], "accuracy_reward": "shapes", "learning_rate": 3e-3}
    train(GRPOConfig(output_dir=str(tmp / "straight"), **base))
    yield tmp, base, stop_rewards
    sys.path.remove(str(tmp))
    sys.modules.pop("stop_rewards", None)


@pytest.mark.parametrize("stop_at", [1, 3, 5])
def test_resume_after_interruption_at_any_step_is_bitwise(straight, stop_at):
    """Interrupted in step 1 (no checkpoint yet), 3 (between checkpoints 2 and 4) or 5 (the last,
    before its checkpoint), then resumed: the final weights, optimizer state and every
    non-timing metric equal the uninterrupted run's, bit for bit."""
    tmp, base, stop_rewards = straight
    run = tmp / f"stopped-{stop_at}"
    stop_rewards.STATE.update(calls=0, stop_at=stop_at)
    with pytest.raises(KeyboardInterrupt):
        train(GRPOConfig(output_dir=str(run), **base))
    done = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"]
    assert done == list(range(1, stop_at))
    stop_rewards.STATE.update(stop_at=None)
    train(GRPOConfig(output_dir=str(run), resume=True, **base))
    a, b = ckpt.latest_checkpoint(tmp / "straight"), ckpt.latest_checkpoint(run)
    assert a.name == b.name == "step-000005"
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = ckpt.load_trainer_state(a), ckpt.load_trainer_state(b)
    for i, st in sa["optimizer"]["state"].items():
        assert all(torch.equal(v, sb["optimizer"]["state"][i][k]) for k, v in st.items())
    ra, rb = _train_rows(tmp / "straight"), _train_rows(run)
    assert [r["step"] for r in ra if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert ra == rb  # bitwise: JSON floats round-trip exactly
    assert not any(isinstance(v, float) and math.isnan(v) for r in rb for v in r.values())
