"""policy_loss: fastrft's packed GRPO loss (torch, triton) against TRL's padded `_compute_loss` math.

    python -m benchmarks.bench_policy_loss                      # CPU here; unchanged on a GPU
    python -m benchmarks.bench_policy_loss --sequences 256 --mean-len 1024 --repeats 20

Each provider computes loss and d loss / d logp (forward + backward) for the same batch: S
completions with lengths drawn uniformly in [L/2, 3L/2], 10% of tokens ignored, off-policy
(old_logp given), beta = 0.04 (k3 KL against ref_logp), a per-token IS ratio, loss_type dapo, at
the token level and at the sequence level (GSPO). Providers:
- `trl`: trl 1.16's own `GRPOTrainer._compute_loss`, called on the batch padded to [S, max_len]
  (as a TRL trainer holds it), with the stand-in `self` of benchmarks/_trl.py;
- `torch`: fastrft's vectorized packed path (segment sums, autograd);
- `triton`: fastrft's two-phase kernel with the closed-form gradient (CUDA only; the CPU
  interpreter is a correctness tool, not a provider).
Before timing, every provider's loss is checked against `trl` (relative 1e-4).

The floor is the triton path's bytes over an H100 SXM's 3.35 TB/s: per token it reads logp, old,
ref and the IS ratio (4 B each) and mask and entropy mask (1 B each) in each of the two phases
(sequence level: a third read of logp, old and mask), and writes g (4 B): 40 B per token (49 B at
the sequence level). The work is O(T) elementwise, so on a GPU the launches (two kernels plus a
handful of [S]-sized torch ops) dominate at any realistic T. Peak memory: the CUDA allocator's peak
above the inputs; not reported on CPU (a few MB, below what resident-set sampling resolves).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import (  # noqa: E402
    command_line,
    device_info,
    markdown_table,
    peak_memory_of_call,
    time_side_by_side,
    write_results,
)
from benchmarks._trl import trl_self  # noqa: E402

H100_BYTES_PER_S = 3.35e12  # H100 SXM HBM3


def _trl_provider(config, b):
    """A closure running TRL's `_compute_loss` (forward + backward) on the padded batch."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    cu = b["cu"].tolist()
    S = len(cu) - 1
    lengths = torch.tensor([cu[s + 1] - cu[s] for s in range(S)], device=b["logp"].device)
    W = int(lengths.max())
    rows = torch.repeat_interleave(torch.arange(S, device=lengths.device), lengths)  # [T]
    cols = torch.arange(int(cu[-1]), device=lengths.device) - torch.tensor(cu[:-1], device=lengths.device)[rows]

    def pad(x, fill=0.0):
        out = torch.full((S, W), fill, dtype=x.dtype, device=x.device)  # [S, W]
        out[rows, cols] = x
        return out

    completion_mask = (torch.arange(W, device=lengths.device)[None] < lengths[:, None]).long()  # [S, W]
    tool_mask = pad(b["mask"].long(), 0)
    inputs = {
        "prompt_ids": torch.zeros(S, 1, dtype=torch.long, device=lengths.device),
        "prompt_mask": torch.ones(S, 1, dtype=torch.long, device=lengths.device),
        "completion_ids": torch.zeros(S, W, dtype=torch.long, device=lengths.device),
        "completion_mask": completion_mask,
        "tool_mask": tool_mask,
        "advantages": b["adv"],
        "num_items_in_batch": (completion_mask * tool_mask).sum(),
        "ref_per_token_logps": pad(b["ref"]),
        "old_per_token_logps": pad(b["old"]),
        "importance_sampling_ratio": pad(b["isr"], 1.0),
    }
    padded_logp = pad(b["logp"]).requires_grad_(True)  # [S, W] what the model would return
    ns = trl_self(config, padded_logp, torch.zeros_like(padded_logp), use_vllm=True)  # TRL's IS correction on

    def run():
        padded_logp.grad = None
        ns._metrics["train"].clear()  # TRL reads each metric to the host (.item()): part of its cost
        loss = GRPOTrainer._compute_loss(ns, None, inputs)
        loss.backward()
        return loss.detach()

    return run


def _fastrft_provider(backend, config, b):
    from fastrft_kernels import policy_loss, use_backend

    logp = b["logp"].clone().requires_grad_(True)  # [T]

    def run():
        logp.grad = None
        with use_backend(backend):
            loss, _ = policy_loss(logp, b["adv"], b["cu"], old_logp=b["old"], ref_logp=b["ref"],
                                  importance_sampling_ratio=b["isr"], mask=b["mask"], config=config)
        loss.backward()
        return loss.detach()

    return run


def _batch(S, mean_len, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(mean_len // 2, mean_len * 3 // 2 + 1, (S,), generator=g)
    cu = torch.zeros(S + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    T = int(cu[-1])
    logp = -(torch.rand(T, generator=g) * 3 + 0.01)
    b = dict(
        cu=cu, logp=logp, old=logp + 0.2 * torch.randn(T, generator=g), ref=logp + 0.2 * torch.randn(T, generator=g),
        isr=0.8 + 0.4 * torch.rand(T, generator=g), mask=torch.rand(T, generator=g) > 0.1,
        adv=torch.randn(S, generator=g),
    )
    return {k: v.to(device) for k, v in b.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--mean-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    a = parser.parse_args(argv)
    from fastrft_kernels import LossConfig

    device = torch.device(a.device)
    b = _batch(a.sequences, a.mean_len, device)
    T = int(b["cu"][-1])
    rows = []
    for level, bytes_per_token in (("token", 40), ("sequence", 49)):
        config = LossConfig(loss_type="dapo", importance_sampling_level=level, beta=0.04, epsilon_high=0.28,
                            max_completion_length=a.mean_len * 3 // 2)
        fns = {"trl": _trl_provider(config, b), "torch": _fastrft_provider("torch", config, b)}
        if device.type == "cuda":
            fns["triton"] = _fastrft_provider("triton", config, b)
        want = fns["trl"]().item()
        for name, fn in fns.items():
            got = fn().item()
            if abs(got - want) > 1e-4 * max(1.0, abs(want)):
                raise AssertionError(f"{name} loss {got} differs from TRL's {want} ({level} level)")
        timing = time_side_by_side(fns, device=device, warmup=1, repeats=a.repeats)
        floor_s = bytes_per_token * T / H100_BYTES_PER_S
        for name, fn in fns.items():
            median = timing[name]["median_s"]
            rows.append({
                "provider": name, "level": level, "sequences": a.sequences, "tokens": T,
                "median_ms": 1e3 * median, "min_ms": 1e3 * timing[name]["min_s"],
                "tokens_per_s": T / median,
                # CPU resident-set peaks of a few MB are below what page-level sampling resolves
                "peak_mb": peak_memory_of_call(fn, device) / 2**20 if device.type == "cuda" else "n/a",
                "floor_us_h100": 1e6 * floor_s,
            })
    cols = ["provider", "level", "sequences", "tokens", "median_ms", "min_ms", "tokens_per_s", "peak_mb",
            "floor_us_h100"]
    info = device_info(device)
    print(f"policy_loss forward + backward on {info['device_name']} ({info['device']}), dapo, beta 0.04, off-policy")
    print(markdown_table(rows, cols))
    if not a.no_write:
        path = write_results("policy_loss", rows, command=command_line(), device=device,
                             notes="forward + backward; floor = triton bytes / H100 HBM bandwidth")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
