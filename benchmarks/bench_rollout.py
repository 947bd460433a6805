"""Rollout engines side by side: transformers' `generate` (fastrft's hf path, shared prefill)
against colocated vLLM, in one process, on the same model, prompts and sampling.

    .venv-vllm/bin/python -m benchmarks.bench_rollout                   # CPU here; unchanged on a GPU
    .venv-vllm/bin/python -m benchmarks.bench_rollout --shapes tiny --prompts 16 --tokens 32

Needs vLLM (bash scripts/setup_vllm.sh builds .venv-vllm). Per model shape it reports:
- rollout tokens/s: completion tokens sampled / rollout seconds, P prompts x G samples at
  temperature 1, up to --tokens each (a completion stops at eos: the random-weight models
  sample it about once in 50 tokens, so lengths are alike on both sides but not equal);
- sync seconds: vLLM only, loading the trainer's weights into the engine after a step;
- step seconds: one whole GRPO-shaped step, rollout + training (pack, fused loss, backward,
  AdamW) + sync for vLLM; the training phase is the same code on both sides.
The engines are timed round-robin over --repeats (after one warm-up each), medians reported.

Shapes: `tiny` is the embedded model (text hidden 128, 2 layers; vision hidden 64, 2 blocks);
`large` a random-weight Qwen2.5-VL of the same family with text hidden 1024, 8 layers
(intermediate 2048, 4 heads of 256, 2 kv heads) and a vision tower of width 256, over the
synthetic task's word vocabulary. Both in fp32 on CPU, bf16 autocast training / bf16 vLLM on
CUDA (--bf16).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks._common import command_line, markdown_table, write_results

SHAPES = {
    "tiny": {},
    "large": {"hidden_size": 1024, "num_layers": 8, "vision_hidden_size": 256},
}


def _prompts(processor, n, seed=0):
    from fastrft.data import load_image, load_rows, render_prompt
    from fastrft.rollout import encode_prompts

    rows = load_rows("shapes", split="train", size=n, seed=seed)
    texts = [render_prompt(processor, r) for r in rows]
    images = [[load_image(i) for i in r["images"]] for r in rows]
    return encode_prompts(processor, texts, images, 512), images


def _train(model, rollout, optimizer, device, autocast):
    from fastrft import packing
    from fastrft_kernels import LossConfig, linear_policy_loss

    head = model.get_output_embeddings()
    n = sum(len(g) for g in rollout.completions)
    adv = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
    optimizer.zero_grad(set_to_none=True)
    groups = packing.make_groups(model, rollout.prompts, rollout.completions)
    for mb in packing.pack_groups(groups, 16384):
        mb = mb.to(device)
        with autocast:
            hidden = packing.completion_hidden(model, mb)
            loss, _ = linear_policy_loss(hidden, head.weight, mb.targets, adv[mb.seq_ids], mb.cu_seqlens,
                                         bias=head.bias, config=LossConfig(loss_type="dapo"))
        loss.backward()
    optimizer.step()


def run_shape(name, args, device):
    from fastrft import synthetic
    from fastrft.rollout import sample_completions
    from fastrft.vllm_engine import VLLMEngine

    processor = synthetic.make_processor()
    model = synthetic.make_model(processor, seed=0, **SHAPES[name]).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    prompts, images = _prompts(processor, args.prompts)
    prompts.inputs = {k: v.to(device) for k, v in prompts.inputs.items()}
    bf16 = device.type == "cuda" and args.bf16
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    t0 = time.perf_counter()
    from fastrft.vllm_engine import default_memory_fraction

    fraction = args.gpu_memory_utilization or default_memory_fraction(model, device)
    engine = VLLMEngine(model, processor, device=device, gpu_memory_utilization=fraction,
                        dtype=torch.bfloat16 if bf16 else torch.float32, seed=0, max_num_seqs=256)
    engine_start = time.perf_counter() - t0
    kw = dict(num_generations=args.generations, max_completion_length=args.tokens, temperature=1.0)

    def hf_rollout():
        with autocast:
            return sample_completions(model, processor, prompts, **kw)

    def vllm_rollout():
        return engine.generate(prompts, images, **kw)

    def step(engine_name):
        t = time.perf_counter()
        r = hf_rollout() if engine_name == "hf" else vllm_rollout()
        t_roll = time.perf_counter() - t
        _train(model, r, optimizer, device, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_train = time.perf_counter() - t - t_roll
        sync = engine.sync_weights(model) if engine_name == "vllm" else 0.0
        if device.type == "cuda":
            torch.cuda.synchronize()
        return {"tokens": r.new_tokens, "rollout_s": t_roll, "train_s": t_train, "sync_s": sync,
                "step_s": time.perf_counter() - t}

    res = {"hf": [], "vllm": []}
    for e in ("hf", "vllm"):
        step(e)  # warm-up
    for _ in range(args.repeats):
        for e in ("hf", "vllm"):
            res[e].append(step(e))
    engine.close()
    rows = []
    for e, runs in res.items():
        med = lambda k, runs=runs: statistics.median(r[k] for r in runs)  # noqa: E731
        rows.append({
            "shape": name, "params_M": round(n_params / 1e6, 1), "engine": e,
            "prompts": args.prompts, "generations": args.generations, "tokens": args.tokens,
            "completion_tokens": runs[0]["tokens"],
            "rollout_s": med("rollout_s"), "rollout_tokens_per_s": runs[0]["tokens"] / med("rollout_s"),
            "train_s": med("train_s"), "sync_s": med("sync_s") if e == "vllm" else None, "step_s": med("step_s"),
            "engine_start_s": engine_start if e == "vllm" else None,
        })
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="tiny,large")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--large-prompts", type=int, default=4, help="prompts per step for the large shape")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="vLLM's memory share (default: fastrft's, vllm_engine.default_memory_fraction)")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.shapes.split(","):
        a = argparse.Namespace(**vars(args))
        if name == "large":
            a.prompts = args.large_prompts
        try:
            rows += run_shape(name, a, device)
        except Exception as e:  # noqa: BLE001 - a shape that does not fit is recorded, the rest still runs
            rows.append({"shape": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
        print(markdown_table(rows, ["shape", "params_M", "engine", "prompts", "completion_tokens", "rollout_s",
                                    "rollout_tokens_per_s", "train_s", "sync_s", "step_s", "engine_start_s"]),
          flush=True)
    import vllm

    path = write_results("rollout", rows, command=command_line(), device=device,
                         notes=f"vllm {vllm.__version__}; medians of {args.repeats} steps after 1 warm-up each, "
                               "engines interleaved")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
