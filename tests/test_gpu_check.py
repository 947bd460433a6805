"""The GPU kit's CPU dry run (`bash scripts/gpu_check.sh --dry-run`): every part runs on tiny
shapes under the Triton interpreter and writes its results, so the kit cannot rot between the
rare runs on a lent GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("imports", "correctness", "lm_head", "segment_attention", "trainer")


@pytest.mark.slow
def test_dry_run_writes_every_part(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, FASTRFT_PYTHON=sys.executable)
    for k in ("FASTRFT_TEST_DEVICE", "FASTRFT_TEST_REPORT", "FASTRFT_BACKEND", "FASTRFT_RESULTS_DIR"):
        env.pop(k, None)  # the outer test run's settings are not the kit's
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    status = json.loads((out / "gpu_check-cpu.json").read_text())
    parts = {r["part"]: r for r in status["rows"]}
    assert set(parts) == set(PARTS), log
    failed = {p: r.get("error") for p, r in parts.items() if r["status"] != "ok"}
    assert not failed, f"{failed}\n{log}"
    assert proc.returncode == 0, log

    # one results file per part, each with rows
    for part in PARTS:
        data = json.loads((out / status["files"][part]).read_text())
        assert data["rows"], part
        assert data["command"] and data["environment"], part
    rows = lambda part: json.loads((out / status["files"][part]).read_text())["rows"]  # noqa: E731
    # correctness: a test of every kernel test file ran and passed; the CUDA-only host-sync check skipped
    corr = rows("correctness")
    assert len(corr) == 8 and all(r["passed"] >= 1 and r["failed"] == 0 for r in corr), corr
    assert any("CUDA only" in r.get("skip_reasons", "") for r in corr)
    # the LM-head loss: every provider row, fastrft timed forward and forward + backward
    lm = {r["provider"]: r for r in rows("lm_head")}
    assert set(lm) == {"naive", "liger", "trl", "fastrft"}
    assert lm["fastrft"]["fwd_ms"] > 0 and lm["fastrft"]["fwd_bwd_ms"] > 0 and lm["fastrft"]["floor6_fraction"] > 0
    # segment attention: both layouts, forward and backward apart, against the dense rate
    seg = [r for r in rows("segment_attention") if r["provider"] == "fastrft_shared"]
    assert {r["layout"] for r in seg} == {"shared_prefix", "documents"}
    assert all(r["fwd_tflops"] > 0 and r["bwd_tflops"] > 0 and r["fwd_vs_dense"] > 0 for r in seg)
    # the trainer: fastrft's step measured
    ours = [r for r in rows("trainer") if r["trainer"] == "fastrft"]
    assert ours and ours[0]["step_s"] > 0 and ours[0]["train_tok_s"] > 0

    summary = (out / "gpu_summary.md").read_text()
    for title in ("Parts", "Correctness", "Fused LM-head loss", "Segment attention", "GRPO trainer step"):
        assert f"## {title}" in summary
    assert "torch" in summary and "transformers" in summary and "gpu_check.sh --dry-run" in summary
    # never over the committed CPU results
    assert not any(p.name.startswith(("linear_policy_loss_kit", "segment_attention_kit", "trainer_kit"))
                   for p in (ROOT / "benchmarks" / "results").iterdir())
