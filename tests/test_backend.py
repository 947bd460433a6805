import pytest
import torch

from fastrft_kernels import use_backend
from fastrft_kernels._backend import resolve_backend


def test_auto_picks_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTRFT_BACKEND", raising=False)
    assert resolve_backend(torch.device("cpu")) == "torch"
    assert resolve_backend(torch.device("cuda", 0)) == "triton"


def test_env_is_read_at_each_call_and_context_wins(monkeypatch):
    monkeypatch.setenv("FASTRFT_BACKEND", "reference")
    assert resolve_backend(torch.device("cpu")) == "reference"
    with use_backend("torch"):
        assert resolve_backend(torch.device("cpu")) == "torch"
        with use_backend("reference"):
            assert resolve_backend(torch.device("cpu")) == "reference"
        assert resolve_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("FASTRFT_BACKEND", "torch")
    assert resolve_backend(torch.device("cpu")) == "torch"


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend(torch.device("cpu"))


def test_unknown_backend_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("cuda"):
            pass
    monkeypatch.setenv("FASTRFT_BACKEND", "fast")
    with pytest.raises(ValueError, match="'fast'"):
        resolve_backend(torch.device("cpu"))
