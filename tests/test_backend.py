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


def test_public_names_are_the_functions_even_after_submodule_imports():
    import importlib
    import pkgutil

    import fastrft_kernels

    # Importing a submodule binds it as a package attribute; the op must still win.
    for m in pkgutil.iter_modules(fastrft_kernels.__path__):
        importlib.import_module(f"fastrft_kernels.{m.name}")
    for name in fastrft_kernels.__all__:
        value = getattr(fastrft_kernels, name)
        assert callable(value) and not isinstance(value, type(fastrft_kernels)), name
    # Op modules are private (`_policy_loss`, ...): only the integration and the AOT gate are public.
    public = {m.name for m in pkgutil.iter_modules(fastrft_kernels.__path__) if not m.name.startswith("_")}
    assert public == {"aot", "hf_attention"}
