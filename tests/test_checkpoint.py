"""Checkpoints: save_pretrained layout loadable by transformers, atomic writes, retention,
weights/optimizer/RNG round trip. (Resume equality of a whole run: tests/test_train_loop.py.)"""

import random

import numpy as np
import pytest
import torch

from fastrft import checkpoint as ckpt
from fastrft import models, synthetic


@pytest.fixture(scope="module")
def tiny():
    processor = synthetic.make_processor()
    return synthetic.make_model(processor, seed=2), processor


def _trained_optimizer(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


def test_save_load_roundtrip(tmp_path, tiny):
    from transformers import AutoModelForImageTextToText

    model, processor = tiny
    model = synthetic.make_model(processor, seed=2)
    opt = _trained_optimizer(model)  # weights moved off their init
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    path = ckpt.save_checkpoint(tmp_path, 7, model, processor, {"optimizer": opt.state_dict(), "sampler": {"pos": 3}})
    assert path.name == "step-000007" and (path / "model.safetensors").is_file()
    expect = (random.random(), np.random.rand(), torch.rand(3))

    loaded = AutoModelForImageTextToText.from_pretrained(path)  # plain transformers reads it
    own = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, own[k]), k
    proc = models.load_processor(str(path))
    assert proc.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert proc.image_processor.size == processor.image_processor.size

    other = synthetic.make_model(processor, seed=9)
    ckpt.load_weights(other, path)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), own.values()))

    state = ckpt.load_trainer_state(path)
    assert state["step"] == 7 and state["sampler"] == {"pos": 3}
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ckpt.set_rng_state(state["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expect[0] and got[1] == expect[1] and torch.equal(got[2], expect[2])


def test_atomic_and_retention(tmp_path, tiny, monkeypatch):
    model, processor = tiny
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, processor, {}, keep=2)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step-000002", "step-000003"]

    # a crash in the middle of writing step 4 leaves step 3 as the latest, whole
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_trainer_state", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 4, model, processor, {}, keep=2)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000003"
    assert (tmp_path / "checkpoints" / ".tmp-step-000004").exists()  # the partial write is not a checkpoint
    ckpt.save_checkpoint(tmp_path, 5, model, processor, {}, keep=2)  # the next save clears it
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step-000003", "step-000005"]


def test_load_weights_errors(tmp_path, tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="no .safetensors"):
        ckpt.load_weights(model, tmp_path)


PAYLOAD = """
import os, pickle, torch

class Payload:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))

torch.save({{"step": 1, "optimizer": Payload()}}, {path!r})
"""


def test_pickle_trainer_state_refused_unopened(tmp_path, tiny):
    """A checkpoint whose trainer state is a pickle (here one that would create a marker file
    when unpickled) is refused with a clear error; the payload never runs."""
    import subprocess
    import sys

    model, processor = tiny
    path = ckpt.save_checkpoint(tmp_path / "run", 3, model, processor, {})
    for f in ("trainer_state.json", "trainer_state.safetensors"):
        (path / f).unlink()
    marker = tmp_path / "pwned"
    # the crafted file is written by another interpreter, so this process never holds the class
    subprocess.run([sys.executable, "-c", PAYLOAD.format(marker=marker, path=str(path / "trainer_state.pt"))],
                   check=True)
    assert (path / "trainer_state.pt").stat().st_size > 0 and not marker.exists()
    with pytest.raises(ValueError, match="trainer_state.pt, a pickle file, which fastrft does not load"):
        ckpt.load_trainer_state(path)
    assert not marker.exists()
    # the trainer refuses the resume the same way, and nothing ran
    from fastrft.train import GRPOConfig, train

    with pytest.raises(ValueError, match="a pickle file"):
        train(GRPOConfig(output_dir=str(tmp_path / "run"), resume=True, max_steps=4, eval_size=0, progress=False,
                         train_size=16, prompts_per_step=2, num_generations=2))
    assert not marker.exists()
    # the payload is real: unpickling it (what torch.load(weights_only=False) did) creates the marker
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path / 'trainer_state.pt')!r}, "
                    "weights_only=False)"], check=True)
    assert marker.exists()


def test_state_roundtrip_without_pickle(tmp_path):
    """Every kind of value the trainer stores comes back equal and of the same type."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))], lr=1e-3, betas=(0.9, 0.99))
    opt.param_groups[0]["params"][0].grad = torch.randn(3, 2)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    opt.step()
    sched.step()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": ckpt.rng_state(),
             "history": {"before": {"accuracy": 0.25, "n": 4}}, "x": [float("inf"), None, "s"], "step": 3}
    ckpt.save_trainer_state(tmp_path, state)
    got = ckpt.load_trainer_state(tmp_path)
    assert got["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert set(got["optimizer"]["state"]) == {0}
    for k, v in state["optimizer"]["state"][0].items():
        assert torch.equal(got["optimizer"]["state"][0][k], v) and got["optimizer"]["state"][0][k].dtype == v.dtype
    assert got["scheduler"] == state["scheduler"] and got["history"] == state["history"] and got["step"] == 3
    assert got["x"][0] == float("inf") and got["x"][1:] == [None, "s"]
    assert got["rng"]["python"] == state["rng"]["python"]
    n_got, n_exp = got["rng"]["numpy"], state["rng"]["numpy"]
    assert n_got[0] == n_exp[0] and np.array_equal(n_got[1], n_exp[1]) and n_got[1].dtype == n_exp[1].dtype
    assert n_got[2:] == n_exp[2:]
    ckpt.set_rng_state(got["rng"])
    a = (random.random(), np.random.rand(), torch.rand(2))
    ckpt.set_rng_state(state["rng"])
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])
