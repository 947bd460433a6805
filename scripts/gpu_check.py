"""The GPU proof kit's driver: run by scripts/gpu_check.sh (read that file first).

Parts, each in its own process under its own time limit, a failure in one never stopping the
next: imports, correctness (the kernel tests on CUDA tensors), lm_head (the fused LM-head loss
at the Qwen2.5-VL-7B head), segment_attention (shared-prefix and documents layouts), trainer
(a GRPO step on a 3B-shaped Qwen2.5-VL). Each writes <out>/<name>-<device>.json; this script
then writes <out>/gpu_summary.md and <out>/gpu_check-<device>.json (the
parts' status), and prints the parts' table last.

--dry-run: the same parts on CPU with tiny shapes, Triton under the interpreter, one
correctness test per file; tests/test_gpu_check.py runs it in CI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

TEST_FILES = [
    "tests/test_logprob.py",
    "tests/test_linear_logprob.py",
    "tests/test_policy_loss.py",
    "tests/test_linear_policy_loss.py",
    "tests/test_group_advantages.py",
    "tests/test_segment_attention.py",
    "tests/test_hf_attention.py",
    "tests/test_segments.py",
]
# The dry run's one test per file: the cheapest that runs the Triton kernel under the
# interpreter (or the file's first test, where these names have changed).
DRY_TESTS = {
    "tests/test_logprob.py": "test_matches_reference[dtype0-triton]",
    "tests/test_linear_logprob.py": "test_no_bias_even_h_and_logp_only_gradient[triton]",
    "tests/test_policy_loss.py": "test_on_policy_gradient_is_the_policy_gradient[triton]",
    "tests/test_linear_policy_loss.py": "test_on_policy_lse_reuse_and_module[triton]",
    "tests/test_group_advantages.py": "test_empty_batch_and_singleton_groups[triton]",
    "tests/test_segment_attention.py": "test_a_table_with_no_entries_gives_zeros_and_no_gradient[triton]",
    "tests/test_hf_attention.py": "test_position_ids_helper_checks_its_arguments",
    "tests/test_segments.py": "test_causal_entries_are_bottom_right_aligned",
}
# ...and the host-sync checks, which skip on CPU (run on CUDA): the skip itself is checked.
DRY_EXTRA = ["tests/test_policy_loss.py::test_no_host_sync_on_cuda[triton]"]

# Seconds per part on the GPU: at most 7.7 minutes in all (FASTRFT_KIT_BUDGET_<PART> overrides).
BUDGETS = {"imports": 40, "correctness": 140, "lm_head": 100, "segment_attention": 95, "trainer": 85}
DRY_BUDGETS = {"imports": 60, "correctness": 120, "lm_head": 120, "segment_attention": 120, "trainer": 150}

IMPORT_CHECK = r"""
import json, platform
out = {"python": platform.python_version()}
import torch
out["torch"] = torch.__version__
out["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=torch.cuda.get_device_name(0), sm_count=p.multi_processor_count,
               gpu_memory_gib=round(p.total_memory / 2**30, 1),
               capability=".".join(map(str, torch.cuda.get_device_capability(0))),
               cuda=torch.version.cuda)
import importlib.metadata as md
for name in ("triton", "transformers", "accelerate", "peft", "liger-kernel", "trl", "datasets", "pyarrow",
             "flash-attn", "math-verify"):
    try:  # the installed distribution (importing each would cost the dry run seconds)
        out[name.replace("-", "_")] = md.version(name)
    except md.PackageNotFoundError:
        out[name.replace("-", "_")] = None
import triton, transformers  # noqa: E401
# the project itself, from the working tree (PYTHONPATH), on these versions
import fastrft_kernels, fastrft_kernels.hf_attention, fastrft_kernels.aot  # noqa: E401
import fastrft.train, fastrft.packing, fastrft.rollout, fastrft.synthetic  # noqa: E401
out["fastrft_kernels_from"] = fastrft_kernels.__file__
print("ENV " + json.dumps(out))
"""


def _env_budget(part: str, default: float) -> float:
    return float(os.environ.get(f"FASTRFT_KIT_BUDGET_{part.upper()}", default))


def run_part(name: str, cmd: list[str], budget: float, out: Path, env: dict) -> dict:
    """Runs one part under its time limit; its output goes to out/logs/<name>.log."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    print(f"\n=== {name} (limit {budget:.0f} s): {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, 15)  # the part's whole process group (pytest workers, benchmark children)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            rc = proc.returncode
    seconds = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    status = "timed out" if timed_out else ("ok" if rc == 0 else "failed")
    res = {"part": name, "status": status, "rc": rc, "seconds": round(seconds, 1), "budget_s": budget,
           "log": str(log.relative_to(out)), "command": shlex.join(cmd)}
    if status != "ok":
        tail = [ln for ln in text.strip().splitlines() if ln.strip()][-12:]
        res["error"] = "\n".join(tail)
    print(text[-3000:] if status != "ok" else "\n".join(text.strip().splitlines()[-14:]), flush=True)
    print(f"=== {name}: {status} in {seconds:.0f} s", flush=True)
    return res


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if v is None:
        return ""
    return str(v).replace("|", "/").replace("\n", " ")


def table(rows: list[dict], cols: list[str]) -> str:
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def write_payload(path: Path, name: str, rows: list[dict], env_info: dict, command: str, notes: str, **extra) -> None:
    payload = {"benchmark": name, "command": command, "environment": env_info, "notes": notes, "rows": rows, **extra}
    path.write_text(json.dumps(payload, indent=1) + "\n")


# ----------------------------------------------------------------------------- correctness
def correctness_tests(dry: bool, env: dict) -> list[str]:
    if not dry:
        return list(TEST_FILES)
    listed = subprocess.run([PY, "-m", "pytest", "--collect-only", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
                             *TEST_FILES], cwd=ROOT, env=env, capture_output=True, text=True)
    ids = [ln.strip() for ln in listed.stdout.splitlines() if "::" in ln]
    chosen = []
    for f in TEST_FILES:
        want = f"{f}::{DRY_TESTS[f]}"
        in_file = [i for i in ids if i.startswith(f + "::")]
        if want in ids:
            chosen.append(want)
        elif in_file:
            chosen.append(in_file[0])
        else:
            chosen.append(f)  # let pytest report why it collected nothing there
    return chosen + [i for i in DRY_EXTRA if i in ids]


def correctness_rows(report: Path) -> tuple[list[dict], list[dict]]:
    """Per-file counts and the failures, from the conftest's JSON-lines report."""
    per_file: dict[str, dict] = {}
    failures = []
    lines = report.read_text().splitlines() if report.exists() else []
    for ln in lines:
        try:
            r = json.loads(ln)
        except ValueError:
            continue
        f = r["nodeid"].split("::")[0]
        row = per_file.setdefault(f, {"file": f, "passed": 0, "failed": 0, "skipped": 0, "seconds": 0.0})
        key = {"passed": "passed", "failed": "failed", "skipped": "skipped"}[r["outcome"]]
        if r["when"] != "call" and r["outcome"] == "failed":
            key = "failed"  # a setup or teardown error
        row[key] += 1
        row["seconds"] = round(row["seconds"] + r.get("seconds", 0.0), 2)
        if r["outcome"] == "failed":
            err = [x for x in r.get("error", "").splitlines() if x.strip()]
            failures.append({"test": r["nodeid"], "when": r["when"],
                             "error": next((x for x in reversed(err) if x.startswith("E ")),
                                           err[-1] if err else "")[:300]})
        if r["outcome"] == "skipped" and r.get("reason"):
            row.setdefault("skip_reasons", set()).add(r["reason"][:120])
    rows = []
    for f in TEST_FILES:
        row = per_file.get(f, {"file": f, "passed": 0, "failed": 0, "skipped": 0, "seconds": 0.0, "note": "no result"})
        if "skip_reasons" in row:
            row["skip_reasons"] = "; ".join(sorted(row["skip_reasons"]))
        rows.append(row)
    return rows, failures


# ----------------------------------------------------------------------------- the run
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--parts", default="imports,correctness,lm_head,segment_attention,trainer")
    p.add_argument("--workers", type=int, default=int(os.environ.get("FASTRFT_KIT_WORKERS", "8")),
                   help="pytest-xdist workers for the correctness part (GPU run)")
    args = p.parse_args(argv)
    dry = args.dry_run
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if dry else "cuda"
    budgets = {k: _env_budget(k, v) for k, v in (DRY_BUDGETS if dry else BUDGETS).items()}
    command = os.environ.get("FASTRFT_KIT_COMMAND") or ("bash scripts/gpu_check.sh" + (" --dry-run" if dry else ""))
    # A kit run from inside pytest-xdist (tests/test_gpu_check.py in the suite) must not pass the
    # worker's variables on: the child pytest would take itself for a worker and write no report.
    parent = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env = dict(parent, FASTRFT_RESULTS_DIR=str(out), PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    if dry:
        env["TRITON_INTERPRET"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        env.pop("TRITON_INTERPRET", None)
    parts = args.parts.split(",")
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t_all = time.perf_counter()
    results: list[dict] = []
    env_info: dict = {"device": device, "date": started}
    files: dict[str, str] = {}

    # imports: versions there, and the project importing from the working tree on them
    if "imports" in parts:
        res = run_part("imports", [PY, "-c", IMPORT_CHECK], budgets["imports"], out, env)
        text = (out / res["log"]).read_text(errors="replace")
        found = [ln for ln in text.splitlines() if ln.startswith("ENV ")]
        if found:
            env_info.update(json.loads(found[-1][4:]))
        elif res["status"] == "ok":
            res.update(status="failed", error="no ENV line")
        rows = [{"package": k, "version": v} for k, v in env_info.items() if k not in ("device", "date")]
        write_payload(out / f"imports-{device}.json", "imports", rows, env_info, command,
                      "versions on this machine; fastrft imported from the working tree")
        res["rows"] = len(rows)
        files["imports"] = f"imports-{device}.json"
        results.append(res)

    if "correctness" in parts:
        report = out / "correctness-report.jsonl"
        report.unlink(missing_ok=True)
        tests = correctness_tests(dry, env)
        cenv = dict(env, FASTRFT_TEST_DEVICE=device, FASTRFT_TEST_REPORT=str(report))
        cmd = [PY, "-m", "pytest", "-q", "-o", "addopts=-ra", "-p", "no:cacheprovider"]
        if not dry and args.workers > 1:
            cmd += ["-n", str(args.workers)]
        elif dry:
            cmd += ["-p", "no:xdist"]
        res = run_part("correctness", cmd + tests, budgets["correctness"], out, cenv)
        rows, failures = correctness_rows(report)
        n_run = sum(r["passed"] + r["failed"] for r in rows)
        if res["status"] == "ok" and n_run == 0:
            res.update(status="failed", error="no test ran")
        write_payload(out / f"correctness-{device}.json", "correctness", rows, env_info, shlex.join(cmd + tests),
                      ("kernel tests on CUDA tensors (FASTRFT_TEST_DEVICE=cuda): every op against the float64 "
                       "reference, fp32/bf16/fp16, forward and every gradient" if not dry else
                       "dry run: one test per file on CPU under the Triton interpreter"), failures=failures)
        res["rows"] = len(rows)
        res["tests"] = {k: sum(r[k] for r in rows) for k in ("passed", "failed", "skipped")}
        files["correctness"] = f"correctness-{device}.json"
        results.append(res)

    bench = []
    if dry:
        bench = [
            ("lm_head", "linear_policy_loss_kit", ["benchmarks.bench_linear_policy_loss", "--device", "cpu",
             "--dtype", "float32", "--shape", "32,16", "--vocab", "256", "--seq-len", "16", "--repeats", "1",
             "--forward", "--measure-matmul", "--liger-eager", "--no-memory"], {"FASTRFT_BACKEND": "triton"}),
            ("segment_attention", "segment_attention_kit", ["benchmarks.bench_segment_attention", "--device", "cpu",
             "--dtype", "float32", "--shape", "24,4,8", "0,8,16", "--group", "2", "--heads", "2,1", "--head-dim", "16",
             "--repeats", "1", "--split", "--dense-ref", "32", "--no-memory",
             "--providers", "fastrft_shared,fastrft_repeat,sdpa_dense_shared,flex_shared,flash_varlen_repeat"],
             {"FASTRFT_BACKEND": "triton"}),
            ("trainer", "trainer_kit", ["benchmarks.bench_trainer", "--shape", "tiny", "--steps", "1", "--prompts", "2",
             "--G", "2", "--completion", "4", "--image-size", "56", "--trainers", "fastrft,trl",
             "--bf16", "false"], {}),
        ]
    else:
        bench = [
            # Qwen2.5-VL-7B's head: H = 3584, V = 152064, bf16
            ("lm_head", "linear_policy_loss_qwen2.5-vl-7b", ["benchmarks.bench_linear_policy_loss", "--device", "cuda",
             "--dtype", "bfloat16", "--shape", "8192,3584", "16384,3584", "--vocab", "152064", "--seq-len", "256",
             "--repeats", "5", "--forward", "--measure-matmul"], {}),
            # shared prefix (prompt 1024, 8 completions of 256-1024) and documents (8 of 512-2048);
            # Qwen2.5-VL-3B attention: 16 q heads, 2 kv heads, D = 128
            ("segment_attention", "segment_attention_kit", ["benchmarks.bench_segment_attention", "--device", "cuda",
             "--dtype", "bfloat16", "--shape", "1024,256,1024", "0,512,2048", "--group", "8", "--heads", "16,2",
             "--head-dim", "128", "--repeats", "5", "--split", "--dense-ref", "8192",
             "--providers", "fastrft_shared,fastrft_repeat,sdpa_padded_repeat,sdpa_dense_shared,flex_shared_compiled,"
             "flash_varlen_repeat"], {}),
            ("trainer", "trainer_qwen2.5-vl-3b-4l", ["benchmarks.bench_trainer", "--shape", "qwen2.5-vl-3b-4l",
             "--steps", "4", "--prompts", "8", "--G", "8", "--completion", "128", "--image-size", "224",
             "--trainers", "fastrft,trl", "--child-timeout", str(int(budgets["trainer"] * 0.62))], {}),
        ]
    for part, name, argv_, extra_env in bench:
        if part not in parts:
            continue
        path = out / f"{name}-{device}.json"
        path.unlink(missing_ok=True)
        res = run_part(part, [PY, "-m", *argv_, "--name", name], budgets[part], out, dict(env, **extra_env))
        data = _read_json(path)
        if data is None:
            if res["status"] == "ok":
                res.update(status="failed", error=f"{path.name} was not written")
        else:
            res["rows"] = len(data["rows"])
            files[part] = path.name
            # the trainer part fails when fastrft's side failed; TRL's side may be absent (not installed)
            errors = [r for r in data["rows"]
                      if r.get("error") and (r.get("trainer") == "fastrft" or part != "trainer")]
            if part == "trainer" and errors:
                res.update(status="failed", error="; ".join(f"{r['trainer']}: {r['error']}" for r in errors))
        results.append(res)

    total = time.perf_counter() - t_all
    summary = write_summary(out, dry, results, files, env_info, command, total)
    write_payload(out / f"gpu_check-{device}.json", "gpu_check", results, env_info, command,
                  "status of each part of the kit", total_seconds=round(total, 1), files=files)
    print(f"\nsummary: {summary}")
    print(table([{**r, "error": (r.get("error") or "").splitlines()[-1][:80] if r.get("error") else ""}
                 for r in results], ["part", "status", "seconds", "budget_s", "rows", "error"]))
    print(f"total {total:.0f} s")
    return 0 if all(r["status"] == "ok" for r in results) else 1


LM_COLS = ["provider", "N", "H", "fwd_ms", "fwd_bwd_ms", "peak_MiB", "tflops", "fwd_floor2_fraction",
           "floor6_fraction", "time_vs_liger", "mem_vs_liger", "skipped"]
SEG_COLS = ["layout", "prompt", "completions", "provider", "tokens_per_group", "median_ms", "fwd_ms", "bwd_ms",
            "fwd_tflops", "bwd_tflops", "fwd_vs_dense", "bwd_vs_dense", "peak_mib", "note"]
TRAIN_COLS = ["trainer", "shape", "image_size", "step_s", "rollout_s", "train_s", "train_tok_s", "forward_tokens",
              "vision_images", "peak_mb", "error"]
CORR_COLS = ["file", "passed", "failed", "skipped", "seconds", "skip_reasons", "note"]


def write_summary(out: Path, dry: bool, results: list[dict], files: dict, env_info: dict, command: str,
                  total: float) -> Path:
    e = env_info
    lines = [f"# fastrft GPU check{' (CPU dry run)' if dry else ''}", ""]
    lines += [
        f"- device: {e.get('gpu') or 'CPU (dry run: Triton under TRITON_INTERPRET=1)'}"
        + (f", {e.get('sm_count')} SMs, {e.get('gpu_memory_gib')} GiB, "
           f"sm_{str(e.get('capability', '')).replace('.', '')}"
           if e.get("gpu") else ""),
        f"- python {e.get('python')}, torch {e.get('torch')} (CUDA {e.get('cuda')}), triton {e.get('triton')}, "
        f"transformers {e.get('transformers')}",
        f"- liger-kernel {e.get('liger_kernel') or 'not installed'}, trl {e.get('trl') or 'not installed'}, "
        f"flash-attn {e.get('flash_attn') or 'not installed'}",
        f"- command: `{command}`",
        f"- date: {e.get('date')}; total {total:.0f} s",
        "",
        "## Parts",
        "",
        table([{**r, "error": (r.get("error") or "").splitlines()[-1][:160] if r.get("error") else ""}
               for r in results],
              ["part", "status", "seconds", "budget_s", "rows", "error"]),
    ]
    by_part = {r["part"]: r for r in results}
    sections = [("correctness", "Correctness on " + ("CPU (interpreter, one test per file)" if dry else "CUDA"),
                 CORR_COLS),
                ("lm_head", "Fused LM-head loss (dapo, fwd and fwd+bwd)", LM_COLS),
                ("segment_attention", "Segment attention (one layer)", SEG_COLS),
                ("trainer", "GRPO trainer step", TRAIN_COLS)]
    for part, title, cols in sections:
        if part not in by_part:
            continue
        lines += ["", f"## {title}", ""]
        r = by_part[part]
        data = _read_json(out / files[part]) if part in files else None
        if data:
            lines += [f"`{data['command']}`", ""]
            if data.get("notes"):
                lines += [data["notes"], ""]
            lines.append(table(data["rows"], cols))
            if part == "correctness" and data.get("failures"):
                lines += ["", "Failures:", ""]
                lines += [f"- `{f['test']}` ({f['when']}): {f['error']}" for f in data["failures"][:60]]
            if part == "lm_head":
                rate = next((x.get("matmul_tflops_measured") for x in data["rows"]
                             if x.get("matmul_tflops_measured")), None)
                if rate:
                    lines += ["", f"Matmul rate measured in this run: {rate:.4g} TFLOP/s; the floor fractions are "
                              "2NHV (forward) and 6NHV (forward + backward) at that rate over the time taken."]
            if part == "segment_attention":
                dense = next((x for x in data["rows"] if x.get("dense_fwd_tflops")), None)
                if dense:
                    lines += ["", f"Dense causal SDPA measured in this run: fwd {dense['dense_fwd_tflops']:.4g}, bwd "
                              f"{dense['dense_bwd_tflops']:.4g} TFLOP/s (the *_vs_dense columns divide by these)."]
        else:
            lines.append("No results file.")
        if r["status"] != "ok":
            lines += ["", f"**{r['status']}** after {r['seconds']} s (log: `{r['log']}`):", "", "```",
                      r.get("error", ""), "```"]
    path = out / "gpu_summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
