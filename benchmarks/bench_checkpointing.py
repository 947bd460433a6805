"""Gradient checkpointing (`gradient_checkpointing: true`): the activation memory it saves and the
time it costs, on one packed micro-batch (forward + fused loss + backward).

    python -m benchmarks.bench_checkpointing

Memory: the bytes autograd holds for backward at the end of the forward (every tensor saved
for backward, counted once per storage, through `torch.autograd.graph.saved_tensors_hooks`;
parameters left out), which is the activation memory checkpointing trades for recompute. Time:
median of forward+backward seconds. Models: the tiny demo model and a bigger random one.
Results: benchmarks/results/checkpointing-<device>.json.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def measure(sizes: dict, ckpt_on: bool, prompts: int = 4, g: int = 4, completion: int = 16, reps: int = 3) -> dict:
    from fastrft import distributed, packing, synthetic
    from fastrft.data import load_rows
    from fastrft.rollout import sample_completions
    from fastrft.train import GRPOConfig, _prompts_for
    from fastrft_kernels import linear_policy_loss

    cfg = GRPOConfig(output_dir="unused", max_completion_length=completion, eval_size=0)
    processor = synthetic.make_processor(cfg.image_size)
    model = synthetic.make_model(processor, seed=0, **sizes).train()
    if ckpt_on:
        distributed.enable_gradient_checkpointing(model)
    rows = load_rows("shapes", split="train", size=prompts, seed=0, tasks=cfg.synthetic_tasks)
    batch, _ = _prompts_for(processor, rows, list(range(prompts)), cfg, torch.device("cpu"))
    torch.manual_seed(0)
    rollout = sample_completions(model, processor, batch, num_generations=g, max_completion_length=completion)
    (mb,) = packing.pack_groups(packing.make_groups(model, rollout.prompts, rollout.completions), 1 << 30)
    adv = torch.linspace(-1, 1, mb.seq_ids.numel())
    head = model.get_output_embeddings()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seconds, saved_bytes = [], 0
    for _ in range(reps):
        seen = {}

        def pack(t, seen=seen):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = packing.completion_hidden(model, mb)
            loss, _ = linear_policy_loss(hidden, head.weight, mb.targets, adv, mb.cu_seqlens, config=cfg.loss_config())
        saved_bytes = sum(seen.values())
        loss.backward()
        seconds.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return {"tokens": mb.n_tokens, "saved_for_backward_mb": saved_bytes / 2**20,
            "fwd_bwd_seconds_median": statistics.median(seconds)}


def main() -> None:
    torch.set_num_threads(1)
    out = {"device": "cpu", "models": []}
    for name, sizes in (("tiny", {}), ("random-h512-l8", {"hidden_size": 512, "num_layers": 8,
                                                             "vision_hidden_size": 256})):
        off, on = measure(sizes, False), measure(sizes, True)
        out["models"].append({"model": name, "sizes": sizes, "off": off, "on": on,
                              "memory_saved_fraction": 1 - on["saved_for_backward_mb"] / off["saved_for_backward_mb"],
                              "time_cost_ratio": on["fwd_bwd_seconds_median"] / off["fwd_bwd_seconds_median"]})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "checkpointing-cpu.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
