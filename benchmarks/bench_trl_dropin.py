"""TRL's GRPOTrainer against fastrft's drop-in, side by side on one micro-batch (training phase).

    python -m benchmarks.bench_trl_dropin                 # CPU here; the same on CUDA
    python -m benchmarks.bench_trl_dropin --image_size 112 --hidden 128 --layers 2 --repeats 3

One micro-batch is made by stock TRL's own generation on a random Qwen2.5-VL of the shapes
vocabulary with its LM head widened to --vocab (Qwen's 151,936 by default: the head is where the
fused loss saves memory), then its `_compute_loss` + backward is timed for:
- `trl`: stock trl 1.16, whose GRPOTrainer always scores with its own chunked fused LM head
  (`add_fused_lm_head`; TRL 1.16 has no unfused path to compare against). Off Triton devices
  (CPU) that head scores every position of every row, prompt included;
- `trl-compact` (CPU only): the same head scoring only the completion positions, as trl does on
  CUDA (its `compact` switch, forced on for this trainer's calls; its tiles are still folded in
  torch): what remains of the gap on CPU once the head computes the same rows as fastrft's;
- `fastrft`: `FusedGRPOTrainer`, the loss from hidden states through `linear_policy_loss`;
- `fastrft-shared`: the same with `shared_prompt=True`: the rows that share a prompt packed into
  one sequence, each prompt computed and each image encoded once.
Timed round-robin in one process (medians); peak memory is the resident-set rise of one call
after the warm-up (CPU) or max allocated (CUDA). Tokens and images: what the decoder and the
vision tower computed for the micro-batch; LM-head rows: the positions the head scored.
Results: benchmarks/results/trl_dropin-<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import gc

import torch

from ._common import command_line, markdown_table, peak_memory_of_call, time_side_by_side, write_results


def _dataset(n: int, image_size: int):
    import datasets

    from fastrft import synthetic

    rows = synthetic.make_split(n, seed=0, tasks=("colour",))
    return datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["problem"]}]}],
         "image": synthetic.render(r["objects"], image_size)} for r in rows])


def _reward(completions, **_):
    text = lambda c: c if isinstance(c, str) else c[-1]["content"]  # noqa: E731
    return [float(len(text(c)) % 7) for c in completions]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per micro-batch")
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--completion_length", type=int, default=32)
    ap.add_argument("--image_size", type=int, default=224, help="px, a multiple of 28 (224: 64 image tokens)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from trl import GRPOConfig, GRPOTrainer

    from fastrft import synthetic
    from fastrft_kernels.integrations.trl import FusedGRPOTrainer

    processor = synthetic.make_processor(args.image_size)
    model = synthetic.make_model(processor, seed=0, hidden_size=args.hidden, num_layers=args.layers)
    model.resize_token_embeddings(args.vocab)  # the tokenizer's ids stay < 64; the head is Qwen's width
    model.generation_config.suppress_tokens = list(range(len(processor.tokenizer), args.vocab))
    rows = args.prompts * args.generations
    config = GRPOConfig(
        output_dir="/tmp/fastrft-bench-trl", per_device_train_batch_size=rows, num_generations=args.generations,
        max_completion_length=args.completion_length, max_steps=1, report_to=[], use_cpu=args.device == "cpu",
        bf16=False, save_strategy="no", seed=0, disable_tqdm=True, logging_steps=1, dataloader_num_workers=0)
    data = _dataset(4 * args.prompts, args.image_size)
    stock = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=config, train_dataset=data,
                        processing_class=processor)
    captured = {}
    real = stock._compute_loss

    def capture(m, inputs):  # one micro-batch from TRL's own generation
        captured.setdefault("inputs", {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in inputs.items()})
        return real(m, inputs)

    stock._compute_loss = capture
    stock.train()
    stock._compute_loss = real
    inputs = captured["inputs"]
    # the random model's completions all score alike (advantages 0, a zero loss): time the loss on
    # the advantages a learning run has, so every gradient path carries values
    adv = inputs["advantages"]
    inputs["advantages"] = torch.randn(adv.shape, generator=torch.Generator().manual_seed(0)).to(adv)
    trainers = {
        "trl": stock,
        **({"trl-compact": GRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=config,
                                       train_dataset=data, processing_class=processor)}
           if args.device == "cpu" else {}),
        "fastrft": FusedGRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=config, train_dataset=data,
                                    processing_class=processor),
        "fastrft-shared": FusedGRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=config,
                                           train_dataset=data, processing_class=processor, shared_prompt=True),
    }

    for t in trainers.values():  # set by Trainer.train(), which only the stock one ran
        t.current_gradient_accumulation_steps = stock.current_gradient_accumulation_steps

    import trl.trainer.utils as trl_utils

    def step(trainer, compact=False):
        def run():
            trainer.model.train()
            use_triton = trl_utils._use_triton  # decides `compact` in add_fused_lm_head's forward
            if compact:
                trl_utils._use_triton = lambda device: True
            try:
                loss = trainer._compute_loss(trainer.model, inputs)
            finally:
                trl_utils._use_triton = use_triton
            loss.backward()
            trainer.model.zero_grad(set_to_none=True)
        return run

    fns = {name: step(t, compact=name == "trl-compact") for name, t in trainers.items()}
    times = time_side_by_side(fns, device=args.device, warmup=1, repeats=args.repeats)
    peaks = {}
    for name, fn in fns.items():
        gc.collect()
        peaks[name] = peak_memory_of_call(fn, args.device)
    B, C = inputs["completion_ids"].shape
    P = inputs["prompt_ids"].shape[1]
    scored = int(inputs["completion_mask"].sum())  # completion tokens the loss scores
    out = []
    for name, t in trainers.items():
        metrics = t._metrics["train"]
        if name.startswith("trl"):
            tokens, images = B * (P + C), inputs["image_grid_thw"].shape[0]
        else:
            tokens, images = metrics["fastrft/forward_tokens"][-1], metrics["fastrft/images_encoded"][-1]
        out.append({
            "trainer": name, "rows": B, "prompt_len": P, "completion_len": C, "median_s": times[name]["median_s"],
            "vs_trl": times[name]["median_s"] / times["trl"]["median_s"], "peak_mb": peaks[name] / 2**20,
            "tokens": int(tokens), "images": int(images),
            "head_rows": B * (P + C - 1) if name == "trl" else scored,  # rows through the LM head
        })
    params = sum(p.numel() for p in model.parameters()) / 1e6
    notes = (f"random Qwen2.5-VL {params:.1f}M params (hidden {args.hidden}, {args.layers} layers, "
             f"vocab {args.vocab}), "
             f"{args.prompts} prompts x {args.generations} completions, {args.image_size} px images; "
             f"_compute_loss + backward on one micro-batch from TRL's own generation, medians of {args.repeats}")
    path = write_results("trl_dropin", out, command=command_line(), device=args.device, notes=notes)
    print(notes)
    print(markdown_table(out, ["trainer", "median_s", "vs_trl", "peak_mb", "tokens", "head_rows", "images"],
                         ["trainer", "s / micro-batch", "time vs trl", "peak MiB", "tokens", "LM-head rows", "images"]))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
