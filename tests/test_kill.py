"""SIGKILL at 20 random moments while `fastrft train` writes checkpoints and metrics: after
every kill the newest complete checkpoint loads with transformers and holds a readable
trainer state, metrics.jsonl reads (a cut-short last line is tolerated, and dropped on
resume), config.yaml is whole; `--resume true` continues each time, and the run, finished
after its 20th kill, ends with the weights and per-step metrics of an uninterrupted run, bit
for bit.

Process starts are shared: a fork server imports fastrft, torch and transformers once and
forks one child per run, which calls the console script's entry point,
`fastrft.__main__.main(["train", ...])`, exactly what the `fastrft` command runs (the children
never share threads: the server runs no torch op before it forks). One `fastrft train`
subprocess proper checks the command itself."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from fastrft import checkpoint as ckpt
from fastrft.metrics import read_metrics

KILLS = 20
MAX_STEPS = 8
ARGS = dict(max_steps=MAX_STEPS, save_steps=1, save_total_limit=2, prompts_per_step=2, num_generations=2,
            max_completion_length=2, train_size=16, eval_size=0, warmup_steps=0, log_entropy="false",
            progress="false", num_threads=1, learning_rate=3e-3, seed=11)
TIMING = ("seconds", "tokens_per_s", "peak_memory_mb")

SERVER = textwrap.dedent("""
    import json, os, sys
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch, transformers  # noqa: F401  (imported once; no torch op runs in this process)
    import fastrft.__main__, fastrft.train, fastrft.runs  # noqa: F401
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (what the children import lazily: plots, processors, the model)
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # noqa: F401
    from fastrft import synthetic
    synthetic.make_processor(56)
    out = sys.stdout
    print("ready", file=out, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "start":
            pid = os.fork()
            if pid == 0:  # the child: `fastrft train ...`, its output to a log file
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1), os.dup2(fd, 2)
                code = 1
                try:
                    code = fastrft.__main__.main(req["argv"])
                finally:
                    sys.stdout.flush(), sys.stderr.flush()
                    os._exit(code if isinstance(code, int) else 1)
            print(pid, file=out, flush=True)
        elif req["cmd"] == "wait":
            _, status = os.waitpid(req["pid"], 0)
            print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                              "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), file=out, flush=True)
""")


class ForkServer:
    def __init__(self, tmp: Path):
        (tmp / "fork_server.py").write_text(SERVER)
        self.proc = subprocess.Popen([sys.executable, str(tmp / "fork_server.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=str(tmp))
        assert self.proc.stdout.readline().strip() == "ready"

    def _ask(self, req: dict) -> str:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def start(self, argv: list[str], log: Path) -> int:
        return int(self._ask({"cmd": "start", "argv": argv, "log": str(log)}))

    def wait(self, pid: int) -> dict:
        return json.loads(self._ask({"cmd": "wait", "pid": pid}))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _argv(run: Path, resume: bool) -> list[str]:
    argv = ["train", "--output_dir", str(run)]
    for k, v in ARGS.items():
        argv += [f"--{k}", str(v)]
    return argv + (["--resume", "true"] if resume else [])


def _train_rows(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    try:
        return [r["step"] for r in read_metrics(path) if r.get("kind") == "train"]
    except (ValueError, FileNotFoundError):  # being rewritten this instant (os.replace): next poll
        return []


def _inode(path: Path):
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _check_after_kill(run: Path, seen: dict) -> None:
    """What a kill may leave: the newest checkpoint whole and loadable, metrics readable, the
    config whole."""
    from transformers import AutoModelForImageTextToText

    for d in ckpt.checkpoint_dirs(run):  # every folder named step-N is complete
        assert (d / "model.safetensors").is_file() and (d / ckpt.STATE_JSON).is_file(), d
    latest = ckpt.latest_checkpoint(run)
    if latest is not None:
        AutoModelForImageTextToText.from_pretrained(latest)
        state = ckpt.load_trainer_state(latest)
        assert state["step"] == int(latest.name.split("-")[1])
    seen["tmp_left"] += len(list((run / "checkpoints").glob(".tmp-*"))) if (run / "checkpoints").is_dir() else 0
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        raw = metrics.read_bytes()
        if raw and not raw.endswith(b"\n"):
            seen["partial_lines"] += 1
        read_metrics(metrics)  # no error: a partial last line is tolerated
    cfg = run / "config.yaml"
    if cfg.exists():
        data = yaml.safe_load(cfg.read_text())
        assert isinstance(data, dict) and data["max_steps"] == MAX_STEPS and data["output_dir"] == str(run)


@pytest.mark.slow
def test_sigkill_while_saving_and_logging(tmp_path):
    rng = random.Random(int(os.environ.get("FASTRFT_KILL_SEED", "0")))
    server = ForkServer(tmp_path)
    run, straight = tmp_path / "run", tmp_path / "straight"
    t_start = time.perf_counter()
    try:
        ref = server.start(_argv(straight, False), tmp_path / "straight.log")  # the uninterrupted run, alongside
        seen = {"tmp_left": 0, "partial_lines": 0}
        kills, moments, save_window = 0, [], 0.3  # seconds from a step's metrics row to its checkpoint's rename
        while kills < KILLS:
            resume = (run / "config.yaml").exists()
            latest = ckpt.latest_checkpoint(run)
            target = (int(latest.name.split("-")[1]) if latest is not None else 0) + 1  # the step it logs first
            metrics_ino, cfg_ino = _inode(run / "metrics.jsonl"), _inode(run / "config.yaml")
            pid, t_fork = server.start(_argv(run, resume), tmp_path / f"child-{kills}.log"), time.monotonic()
            # wait for this child's first metrics row (the log write), then kill somewhere in the
            # window that writes the checkpoint after it: a random delay, uniform over [0, 1.3 x
            # the window measured once]; every 5th kill lands in the resume's own writes instead
            # (config.yaml, the metrics rewrite): within 20 ms of config.yaml being replaced
            deadline = time.monotonic() + 120
            # (and always once the step to come is the last: a kill after its save would find the run done)
            early = resume and (kills % 5 == 4 or target >= MAX_STEPS)
            while time.monotonic() < deadline:
                if early:
                    if _inode(run / "config.yaml") not in (None, cfg_ino):
                        break
                elif _inode(run / "metrics.jsonl") not in (None, metrics_ino) and _train_rows(run)[-1:] == [target]:
                    break
                time.sleep(0.002)
            else:
                log = (tmp_path / f"child-{kills}.log").read_text()[-2000:]
                raise AssertionError(f"child {kills} made no progress: {log}")
            t_row = time.monotonic()
            # three windows: "save" (a random moment while the step's checkpoint is written:
            # uniform over [0, 1.3 x the save time measured at the first kill]), "after-save"
            # (every other kill: once the checkpoint is renamed into place, within 0.3 s: the
            # retention deletion, the curves, the next step) and "resume-writes" (above)
            mode = "resume-writes" if early else ("after-save" if kills % 2 else "save")
            if kills == 0 or mode == "after-save":
                while not (run / "checkpoints" / f"step-{target:06d}").is_dir() and time.monotonic() - t_row < 60:
                    time.sleep(0.002)
                if kills == 0:
                    save_window = max(0.05, time.monotonic() - t_row)
            delay = rng.uniform(0, {"resume-writes": 0.02, "after-save": 0.3, "save": 1.3 * save_window}[mode])
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            status = server.wait(pid)
            if status["signal"] != signal.SIGKILL:  # it finished before the kill: the schedule was too short
                raise AssertionError(f"child {kills} was not killed: {status}")
            kills += 1
            moments.append(f"{mode}+{delay * 1000:.0f}ms"
                           f" ({t_row - t_fork:.1f} s after the fork)")
            _check_after_kill(run, seen)
        print(f"{kills} kills survived (save window {save_window * 1000:.0f} ms): {', '.join(moments)}; "
              f"partial metrics lines seen {seen['partial_lines']}, leftover .tmp folders seen {seen['tmp_left']}; "
              f"steps logged before the last resume: {_train_rows(run)[-1:]}")
        # the last resume runs to the end
        pid = server.start(_argv(run, True), tmp_path / "final.log")
        assert server.wait(pid) == {"signal": None, "code": 0}, (tmp_path / "final.log").read_text()[-3000:]
        assert server.wait(ref) == {"signal": None, "code": 0}, (tmp_path / "straight.log").read_text()[-3000:]
    finally:
        server.close()
    print(f"wall time {time.perf_counter() - t_start:.0f} s")

    assert _train_rows(run) == list(range(1, MAX_STEPS + 1))
    rows = lambda r: [{k: v for k, v in x.items() if not any(t in k for t in TIMING)}  # noqa: E731
                      for x in read_metrics(r / "metrics.jsonl") if x.get("kind") == "train"]
    assert rows(run) == rows(straight)
    from safetensors.torch import load_file

    a = load_file(str(ckpt.latest_checkpoint(straight) / "model.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(run) / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_partial_metrics_line_is_repaired_on_resume(tmp_path):
    """A last line cut short by a kill (no newline) is skipped when read and removed on resume."""
    from fastrft.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"kind": "train", "step": 1}) + "\n" + '{"kind": "train", "step": 2, "rew')
    assert read_metrics(path) == [{"kind": "train", "step": 1}]
    log = MetricsLog(tmp_path, resume_step=1)
    log.log({"kind": "train", "step": 2})
    log.close()
    assert read_metrics(path) == [{"kind": "train", "step": 1}, {"kind": "train", "step": 2}]
    path.write_text('{"broken\n' + json.dumps({"step": 1}) + "\n")  # a bad line that is not the last: an error
    with pytest.raises(ValueError, match="metrics.jsonl:1: not a JSON row"):
        read_metrics(path)


def test_fastrft_command_resumes_after_sigkill(tmp_path):
    """The `fastrft` console script itself: killed during its first checkpoint save, then resumed."""
    exe = Path(sys.executable).with_name("fastrft")
    run = tmp_path / "run"
    args = {**ARGS, "max_steps": 2}
    argv = [str(exe), "train", "--output_dir", str(run)] + [x for k, v in args.items() for x in (f"--{k}", str(v))]
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints").is_dir() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = subprocess.run(argv + ["--resume", "true"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _train_rows(run) == [1, 2]
