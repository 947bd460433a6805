"""Shared helpers for the benchmark runners: side-by-side timing, peak memory, results as data.

Rules these helpers enforce (STYLE.md, "Benchmarks as data"):
- providers of one comparison are timed interleaved in one process (round-robin over
  repeats), so a noisy machine slows them alike and the ratios stay meaningful;
- peak memory on CUDA is `torch.cuda.max_memory_allocated` above what the inputs hold; on
  CPU, PyTorch has no allocator statistics, so each provider runs once in a fresh
  subprocess and its peak resident set (ru_maxrss) above the level just before the call
  is the figure (the inputs are built before that level is read);
- every results file carries the device, versions, date and the exact command.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_info(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    info = {
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = platform.processor() or platform.machine()
        info["cpu_threads"] = torch.get_num_threads()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(
    fns: dict[str, Callable[[], object]],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    repeats: int = 5,
) -> dict[str, dict]:
    """Times each provider `repeats` times, round-robin, after `warmup` calls each.

    Returns {name: {"median_s", "min_s", "max_s", "times_s"}}.
    """
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
        _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {
        name: {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "max_s": max(ts),
            "times_s": ts,
        }
        for name, ts in times.items()
    }


def _maxrss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_of_call(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes that one call of `fn` holds above what existed just before it.

    CUDA: exact, from the caching allocator's statistics. CPU: the resident set, sampled
    every 0.2 ms by a thread during the call (PyTorch ops release the GIL), together with
    the rise of ru_maxrss; large tensors are mmapped by glibc and given back on free, so
    the resident set follows the live tensors. For an isolated figure, run the call in a
    fresh process with `peak_memory_in_subprocess`.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    import threading

    base = _current_rss_bytes()
    maxrss_before = _maxrss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _current_rss_bytes())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    maxrss_after = _maxrss_bytes()
    if maxrss_after > maxrss_before:  # the call set a new high-water mark: exact
        peak[0] = max(peak[0], maxrss_after)
    return max(0, peak[0] - base)


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_memory_in_subprocess(module: str, args: list[str], timeout: float = 1800) -> int:
    """Runs `python -m module *args` in a fresh process that prints one JSON line
    {"peak_bytes": N} last (via `report_peak`), and returns N."""
    env = dict(os.environ)
    out = subprocess.run(
        [sys.executable, "-m", module, *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    last = [line for line in out.stdout.splitlines() if line.startswith("{")][-1]
    return int(json.loads(last)["peak_bytes"])


def report_peak(peak_bytes: int) -> None:
    """The child side of `peak_memory_in_subprocess`."""
    print(json.dumps({"peak_bytes": int(peak_bytes)}), flush=True)


def write_results(
    name: str, rows: list[dict], *, command: str, device: torch.device | str = "cpu", notes: str = ""
) -> Path:
    """Writes benchmarks/results/<name>-<device>.json with the rows, the device and the command."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = device_info(device)
    path = RESULTS / f"{name}-{info['device']}.json"
    payload = {"benchmark": name, "command": command, "environment": info, "notes": notes, "rows": rows}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)
    return path


def markdown_table(rows: list[dict], columns: list[str], headers: list[str] | None = None) -> str:
    headers = headers or columns
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            if isinstance(v, float):
                v = f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def command_line() -> str:
    """The command that reproduces this run, for the results file."""
    return " ".join(["python", "-m", f"benchmarks.{Path(sys.argv[0]).stem}", *sys.argv[1:]])


# ----------------------------------------------------------------------------- GPU kit helpers
# FASTRFT_RESULTS_DIR redirects every runner's results file (the GPU kit's CPU dry run writes
# to a temporary folder, never over the committed results).
if os.environ.get("FASTRFT_RESULTS_DIR"):
    RESULTS = Path(os.environ["FASTRFT_RESULTS_DIR"])


def measure_matmul_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                         repeats: int = 10) -> float:
    """FLOP/s of one n x n x n matmul in `dtype` on `device`, measured now (median of `repeats`
    after a warm-up): the rate a floor fraction is taken against, on the same GPU in the same run."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    t = time_side_by_side({"mm": lambda: a @ b}, device=device, warmup=2, repeats=repeats)["mm"]["median_s"]
    return 2.0 * n**3 / t


def results_path(name: str, device: torch.device | str = "cpu") -> Path:
    """Where `write_results(name, ..., device=device)` writes."""
    return RESULTS / f"{name}-{torch.device(device).type}.json"
