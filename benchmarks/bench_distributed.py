"""1 rank against 2 (torchrun, FSDP2, gloo on CPU): seconds per step and memory per rank.

    python -m benchmarks.bench_distributed                    # CPU here; NCCL on a GPU node unchanged
    python -m benchmarks.bench_distributed --hidden 512 --layers 4 --steps 4

The same global batch (P prompts x G samples, keyed sampling) on a random Qwen2.5-VL of the
shapes vocabulary (`fastrft.synthetic.make_model` with --hidden/--layers), saved to a folder so
that both runs load the same weights. Each rank records, per step: step seconds (median after a
warm-up step), its peak RSS (CPU) or max allocated (GPU), and the bytes it holds of parameters,
gradients and AdamW state (an FSDP2 rank holds 1/N of each: its DTensor shards). Results go to
benchmarks/results/distributed-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _local_bytes(t) -> int:
    t = getattr(t, "_local_tensor", t)
    return t.numel() * t.element_size()


def worker(cfg_json: str, out: str) -> None:
    """Runs train() with hooks that record each step's memory figures (one JSON line per step)."""
    import torch

    import fastrft.train as T

    cfg = T.GRPOConfig(**json.loads(cfg_json))
    held = {}
    real_opt, real_row = T._optimizer, T._metrics_row

    def optimizer(c, model):
        opt, sched = real_opt(c, model)
        held.update(model=model, opt=opt)
        return opt, sched

    def row(*a, **k):
        r = real_row(*a, **k)
        model, opt = held["model"], held["opt"]
        params = sum(_local_bytes(p) for p in model.parameters())
        grads = sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        state = sum(_local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        rank = int(os.environ.get("RANK", 0))
        with open(f"{out}.{rank}", "a") as f:
            f.write(json.dumps({"step": r["step"], "step_seconds": r["step_seconds"],
                                "rollout_seconds": r["rollout_seconds"], "train_seconds": r["train_seconds"],
                                "peak_memory_mb": r["peak_memory_mb"], "param_mb": params / 2**20,
                                "grad_mb": grads / 2**20, "optimizer_mb": state / 2**20}) + "\n")
        return r

    T._optimizer, T._metrics_row = optimizer, row
    torch.set_num_threads(1)
    T.train(cfg)


def run(nproc: int, cfg: dict, tmp: Path) -> dict:
    out = tmp / f"n{nproc}"
    cmd = [sys.executable, __file__, "--worker", json.dumps(dict(cfg, output_dir=str(out))), str(out) + ".stats"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + cmd[1:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("TRITON_INTERPRET", "1")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = []
    for r in range(nproc):
        rows = [json.loads(line) for line in open(f"{out}.stats.{r}")]
        timed = rows[1:] or rows
        ranks.append({
            "step_seconds_median": statistics.median(x["step_seconds"] for x in timed),
            "rollout_seconds_median": statistics.median(x["rollout_seconds"] for x in timed),
            "train_seconds_median": statistics.median(x["train_seconds"] for x in timed),
            "peak_memory_mb": max(x["peak_memory_mb"] for x in rows),
            "param_mb": rows[-1]["param_mb"], "grad_mb": rows[-1]["grad_mb"], "optimizer_mb": rows[-1]["optimizer_mb"],
        })
    return {"nproc": nproc, "ranks": ranks}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--completion", type=int, default=8)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args(argv)
    import torch

    from fastrft import synthetic

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        processor = synthetic.make_processor()
        model = synthetic.make_model(processor, seed=0, hidden_size=args.hidden, num_layers=args.layers,
                                     vision_hidden_size=max(64, args.hidden // 2))
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp / "model")
        processor.save_pretrained(tmp / "model")
        cfg = dict(model=str(tmp / "model"), dataset="shapes", prompts_per_step=args.prompts,
                   num_generations=args.generations, max_completion_length=args.completion, eval_size=0,
                   progress=False, train_size=256, warmup_steps=0, save_steps=0, max_steps=args.steps,
                   rank_invariant_sampling=True, gradient_checkpointing=args.gradient_checkpointing,
                   reward_funcs=["shapes"], accuracy_reward="shapes")
        runs = [run(1, cfg, tmp), run(2, cfg, tmp)]
    one, two = runs[0]["ranks"][0], runs[1]["ranks"]
    res = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "model": {"hidden": args.hidden, "layers": args.layers, "parameters": n_params},
        "batch": {"prompts": args.prompts, "generations": args.generations, "completion": args.completion,
                  "steps": args.steps},
        "gradient_checkpointing": args.gradient_checkpointing,
        "runs": runs,
        "param_plus_optimizer_ratio_2_over_1": (two[0]["param_mb"] + two[0]["optimizer_mb"])
        / (one["param_mb"] + one["optimizer_mb"]),
        "step_seconds_ratio_2_over_1": max(r["step_seconds_median"] for r in two) / one["step_seconds_median"],
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"distributed-{res['device']}.json"
    path.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
