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
    # Op modules are private (`_policy_loss`, ...): only the integrations and the AOT gate are public.
    public = {m.name for m in pkgutil.iter_modules(fastrft_kernels.__path__) if not m.name.startswith("_")}
    assert public == {"aot", "hf_attention", "integrations"}


_WITHOUT_TRITON = r'''
import importlib, pkgutil, sys


class _NoTriton:  # the first finder on sys.meta_path: `import triton` fails as on a machine without it
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoTriton())

import torch

import fastrft_kernels as fk
from fastrft_kernels import _triton
from fastrft_kernels._backend import resolve_backend

assert not _triton.HAVE_TRITON and _triton.triton is None and _triton.tl is None
for m in pkgutil.iter_modules(fk.__path__):  # every module imports, the AOT gate and the HF integration too
    importlib.import_module(f"fastrft_kernels.{m.name}")
assert "triton" not in sys.modules, "something imported triton"

N, H, V = 6, 8, 11
hidden = torch.randn(N, H, requires_grad=True)  # [N, H]
weight = torch.randn(V, H, requires_grad=True)  # [V, H]
targets = torch.randint(0, V, (N,))  # [N]
targets[1] = -100
cu = torch.tensor([0, 2, 6], dtype=torch.int32)  # two sequences
config = fk.LossConfig(beta=0.04)
ref_logp = torch.randn(N)
q = torch.randn(N, 2, 16, requires_grad=True)  # [T, Hq, D]
k = torch.randn(N, 1, 16)  # [T, Hk, D]
v = torch.randn(N, 1, 16)
calls = {
    "linear_logprob": lambda: fk.linear_logprob(hidden, weight, targets, return_entropy=True)[0],
    "logprob": lambda: fk.logprob(hidden @ weight.t(), targets),
    "group_advantages": lambda: fk.group_advantages(torch.randn(8), group_size=4),
    "policy_loss": lambda: fk.policy_loss(torch.randn(N, requires_grad=True), torch.randn(2), cu, ref_logp=ref_logp,
                                          config=config)[0],
    "linear_policy_loss": lambda: fk.linear_policy_loss(hidden, weight, targets, torch.randn(2), cu, ref_logp=ref_logp,
                                                        config=config)[0],
    "segment_attention": lambda: fk.segment_attention(q, k, v, fk.segments_from_cu_seqlens(cu), return_lse=True)[0],
    "varlen_attention": lambda: fk.varlen_attention(q, k, v, cu),
}
for name, call in calls.items():
    with fk.use_backend("torch"):
        out = call()
        assert torch.isfinite(out).all(), name
        if out.requires_grad:
            out.sum().backward()
    with fk.use_backend("triton"):
        try:
            call()
        except RuntimeError as e:
            assert "pip install triton, or use backend 'torch'" in str(e), (name, e)
        else:
            raise AssertionError(f"{name} ran on backend 'triton' without triton")
try:  # auto on CUDA tensors would pick triton: the same clear error (resolve_backend reads the device type only)
    resolve_backend(torch.device("cuda"))
except RuntimeError as e:
    assert "the triton package, which is not installed" in str(e), e
else:
    raise AssertionError("auto resolved to triton without triton")
print("ok")
'''


def test_without_triton_the_torch_backend_runs_and_triton_is_a_clear_error():
    # A fresh interpreter in which `import triton` fails: the package, every module and every
    # public op on the torch backend work; backend 'triton' says how to get it.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "FASTRFT_BACKEND": "auto"}, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-4000:]
