"""The AOT gate: every shipped kernel configuration compiles for sm_80 and sm_90 with no spill.

Compilation needs Triton without the interpreter, so each check runs in a subprocess with
TRITON_INTERPRET removed from its environment.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_gate_catches_a_spilling_kernel(tmp_path):
    # A [64, 128] fp32 tile live in one warp needs 256 values per thread: ptxas spills it.
    (tmp_path / "probe.py").write_text(textwrap.dedent('''
        import json, triton, triton.language as tl
        from fastrft_kernels.aot import AOTKernel, compile_one, check_row

        @triton.jit
        def _probe(x_ptr, y_ptr, R: tl.constexpr, C: tl.constexpr):
            offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
            x = tl.load(x_ptr + offs)
            e = tl.exp(x)
            s = tl.sum(e, axis=1)
            tl.store(y_ptr + offs, x * s[:, None] + e)

        sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "R": "constexpr", "C": "constexpr"}
        out = {}
        for r, c in ((64, 128), (16, 16)):
            row = compile_one(AOTKernel(f"probe{r}", _probe, sig, {"R": r, "C": c}, num_warps=1, num_stages=1), 90)
            out[f"{r}x{c}"] = {"row": row, "problems": check_row(row)}
        print(json.dumps(out))
    '''))
    res = subprocess.run([sys.executable, str(tmp_path / "probe.py")], capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    big, small = out["64x128"], out["16x16"]
    assert big["row"]["spill_store_bytes"] > 0 and big["row"]["registers"] == 255
    assert any("local memory" in p for p in big["problems"])
    assert small["row"]["spill_store_bytes"] == 0 and small["problems"] == []


def test_every_shipped_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    out = tmp_path / "aot.json"
    res = subprocess.run(
        [sys.executable, "-m", "fastrft_kernels.aot", "--json", str(out)],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=900,
    )
    assert out.exists(), res.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["problems"] == [], report["problems"]
    assert res.returncode == 0, res.stderr[-4000:]
    rows = report["rows"]
    # Every configuration appears once per architecture.
    names = sorted({r["kernel"] for r in rows})
    assert names, "no kernel configuration was compiled"
    for name in names:
        assert sorted(r["arch"] for r in rows if r["kernel"] == name) == ["sm_80", "sm_90"]
    for r in rows:
        assert 0 < r["registers"] <= 255
