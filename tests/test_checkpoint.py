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

    monkeypatch.setattr(torch, "save", boom)
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
