import os

# FASTRFT_TEST_DEVICE=cpu (the default) runs the suite on CPU tensors, Triton kernels under the
# interpreter. FASTRFT_TEST_DEVICE=cuda (scripts/gpu_check.sh) runs the same tests on CUDA
# tensors with compiled kernels: every tensor a test makes lands on the GPU
# (torch.set_default_device, from before collection on, so module-level tensors do too).
DEVICE = os.environ.get("FASTRFT_TEST_DEVICE", "cpu").strip().lower() or "cpu"
if DEVICE not in ("cpu", "cuda"):
    raise RuntimeError(f"FASTRFT_TEST_DEVICE must be cpu or cuda, got {DEVICE!r}")

# Triton kernels run on CPU tensors under the interpreter; it must be set before triton loads.
# On CUDA the kernels are compiled: the interpreter would copy every tensor to the host.
os.environ.setdefault("TRITON_INTERPRET", "1" if DEVICE == "cpu" else "0")

import pytest  # noqa: E402
import torch  # noqa: E402

if DEVICE == "cuda":
    if os.environ["TRITON_INTERPRET"].strip() not in ("", "0"):
        raise RuntimeError("FASTRFT_TEST_DEVICE=cuda checks compiled kernels: unset TRITON_INTERPRET")
    if not torch.cuda.is_available():
        raise RuntimeError("FASTRFT_TEST_DEVICE=cuda, but torch sees no CUDA device")
    # The tests hold fp32 results to 1e-5 of float64: IEEE fp32 products everywhere (the
    # vision patch embedding is a Conv3d, which cuDNN would otherwise run in TF32).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_default_device("cuda")

    # group_advantages' reference moves the rewards to the host (`.cpu()`) and then builds
    # its index and output with factory calls that follow the default device, so under
    # set_default_device("cuda") it would mix host and device tensors. The reference is a
    # host-side spec: run it with the host as the default device. (A fix inside
    # fastrft_kernels, device=r.device on those two calls, makes this wrapper a no-op.)
    from fastrft_kernels import _group_advantages as _ga

    if hasattr(_ga, "_reference"):
        _reference = _ga._reference

        def _host_reference(*args, **kwargs):
            with torch.device("cpu"):
                return _reference(*args, **kwargs)

        _ga._reference = _host_reference


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only(reason): runs with FASTRFT_TEST_DEVICE=cpu only")


def pytest_collection_modifyitems(config, items):
    if DEVICE == "cpu":
        return
    for item in items:
        marker = item.get_closest_marker("cpu_only")
        if marker is not None:
            reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "CPU-specific")
            item.add_marker(pytest.mark.skip(reason=f"cpu only: {reason}"))


@pytest.fixture(autouse=True)
def _seed():
    if DEVICE == "cuda":
        torch.set_default_device("cuda")  # a test that changed it does not leak into the next
    torch.manual_seed(0)
    yield


# FASTRFT_TEST_REPORT=path: one JSON line per test outcome, appended as tests finish (so a run
# stopped by a time limit still leaves what it checked). Written by the controlling process
# only (with pytest-xdist, the workers' reports reach it).
_REPORT = os.environ.get("FASTRFT_TEST_REPORT")


def pytest_runtest_logreport(report):
    if not _REPORT or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or (
        report.when == "teardown" and report.outcome == "failed"
    ):
        import json

        line = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                "seconds": round(report.duration, 3)}
        if report.outcome == "failed":
            line["error"] = str(report.longrepr)[-1500:]
        elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            line["reason"] = str(report.longrepr[-1])
        with open(_REPORT, "a") as f:
            f.write(json.dumps(line) + "\n")
