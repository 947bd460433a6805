"""Run metrics: one JSON object per line in `metrics.jsonl`, and a PNG of the reward and
accuracy curves drawn from it (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLog:
    """Appends rows to `<run_dir>/metrics.jsonl`, flushed per row (a crash loses nothing logged).
    On resume from step s, rows after s are dropped first, so the curves have no duplicates.
    With `tensorboard`, every numeric value is also written as a scalar (tag "train/<key>",
    "eval/<key>") to event files in `<run_dir>/tensorboard` (needs `pip install tensorboard`)."""

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None, tensorboard: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            with open(tmp, "w") as f:  # also repairs a last line a killed run left half-written
                f.write("".join(json.dumps(r) + "\n" for r in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run in an existing folder starts a fresh log
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("report_to: tensorboard needs the tensorboard package: pip install tensorboard "
                                 "(or pip install 'fastrft[tensorboard]')") from e
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)
        self._f = open(self.path, "a")

    def log(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()
        if self._tb is not None and row.get("kind") in ("train", "eval"):
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(f"{row['kind']}/{k}", v, row.get("step", 0))
            self._tb.flush()

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl. A last line cut short (a run killed while writing it: no
    newline at its end) is left out; any other unreadable line is a ValueError naming it."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines) and not line.endswith("\n"):
                break  # the partial last write of a killed run: MetricsLog(resume_step=...) drops it
            raise ValueError(f"{path}:{n}: not a JSON row ({e.msg})") from e
    return rows


# (title, [(metric key or key prefix, label)], eval keys drawn as points): one panel each
PANELS = [
    ("reward per function", [("rewards/", None), ("reward", "total")], []),
    ("accuracy", [("accuracy", "train (sampled)")], [("accuracy", "held-out (greedy)")]),
    ("loss", [("loss", "loss")], []),
    ("KL to the reference", [("kl", "kl")], []),
    ("entropy", [("entropy", "entropy")], []),
    ("completion length", [("completion_length", "mean tokens"), ("truncated_fraction", "truncated fraction")], []),
    ("clip fractions", [("clip_ratio/", None)], []),
    ("tokens / s", [("rollout_tokens_per_s", "rollout"), ("train_tokens_per_s", "training")], []),
]


def plot_curves(run_dir: str | os.PathLike) -> Path | None:
    """Writes `<run_dir>/curves.png`: one autoscaled panel each for the rewards per function,
    accuracy (train and held-out), loss, KL, entropy, completion length, clip fractions and
    tokens/s, the run's folder name in the title; a panel without data says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    rows = read_metrics(path)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (title, keys, eval_keys) in zip(axes.flat, PANELS):
        drawn = 0
        for key, label in keys:
            names = sorted({k for r in train for k in r if k.startswith(key)}) if key.endswith("/") else [key]
            for name in names:
                pts = [(r["step"], r[name]) for r in train if isinstance(r.get(name), (int, float))]
                if pts:
                    ax.plot(*zip(*pts), label=label or name[len(key):], alpha=0.8, lw=1)
                    drawn += 1
        for key, label in eval_keys:
            pts = [(r["step"], r[key]) for r in evals if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), "o-", label=label)
                drawn += 1
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.margins(y=0.08)  # autoscaled: negative rewards and sums above 1 stay in view
            ax.legend(fontsize=7, loc="best", framealpha=0.6)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(f"{Path(run_dir).resolve().name}: {len(train)} steps", fontsize=12)
    out = Path(run_dir) / "curves.png"
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
