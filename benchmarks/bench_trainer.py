"""fastrft's GRPO step against TRL's GRPOTrainer (trl 1.16) on the same model, data and settings.

    python -m benchmarks.bench_trainer                       # CPU here; unchanged on a GPU
    python -m benchmarks.bench_trainer --steps 6 --completion 32 --image-size 112

Both sides: the tiny Qwen2.5-VL of `fastrft.synthetic` (same seed, same weights), the synthetic
shapes prompts, P prompts x G completions per step, the same sampling (temperature 1), the same
max completion length, AdamW at the same learning rate, beta = 0, loss_type dapo, one
optimizer step per rollout, fp32. Each side runs in its own fresh process (peak memory is
that process's peak resident set on CPU, torch.cuda.max_memory_allocated on GPU); the first
step is a warm-up and is left out of the medians.

Per step it reports seconds (whole step, rollout phase, training phase), rollout tokens/s
(completion tokens sampled / rollout seconds), training tokens/s (completion tokens trained /
training seconds: the same numerator on both sides, so the ratio is the speed ratio), and the
tokens each computes in the training forward: TRL runs G padded copies of every prompt and
image ([P*G, prompt + completion] tokens, P*G images through the vision tower); fastrft runs
each prompt and image once, then the completions ([prompt + sum of completions - G] tokens per
group, P images).

GPU kit flags (scripts/gpu_check.sh): --shape qwen2.5-vl-3b-4l swaps the tiny model for a
random-weight Qwen2.5-VL with the 3B text shapes (hidden 2048, 16 heads, 2 kv heads, head dim
128, intermediate 11008) cut to 4 layers and a 2-block vision tower of the real width (1280),
over the synthetic task's word-level vocabulary (~50 tokens: the LM head is the LM-head
benchmark's subject, not this one's); fastrft loads it from a save_pretrained folder. --bf16
(default on CUDA) runs both sides under bf16 autocast over fp32 weights. --trainers picks the
sides; a side that fails (or TRL not installed) is recorded with its error and the other still
runs. --name names the results file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import command_line, device_info, markdown_table, write_results  # noqa: E402

MODEL_SHAPES = ("tiny", "qwen2.5-vl-3b-4l")


def build_model(shape: str, image_size: int, seed: int):
    """(model, processor): the tiny synthetic Qwen2.5-VL, or the 3B-shaped 4-layer one over the
    same tokenizer and processor, randomly initialised from `seed`."""
    from fastrft import synthetic

    processor = synthetic.make_processor(image_size)
    if shape == "tiny":
        return synthetic.make_model(processor, seed=seed), processor
    if shape != "qwen2.5-vl-3b-4l":
        raise ValueError(f"--shape must be one of {MODEL_SHAPES}, got {shape!r}")
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    d = synthetic.make_model_config(processor.tokenizer).to_dict()  # token ids and vocabulary of the tiny one
    for key in ("layer_types", "max_window_layers"):  # per-layer lists of the 2-layer config: rebuilt for 4
        d["text_config"].pop(key, None)
        d.pop(key, None)
    d["text_config"].update(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=2, head_dim=128, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    )
    d["vision_config"].update(
        depth=2, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, window_size=112,
        fullatt_block_indexes=[1], initializer_range=0.02,
    )
    config = Qwen2_5_VLConfig.from_dict(d)
    with torch.random.fork_rng(), torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)  # initialised on the GPU where there is one: seconds
    model.cpu()  # each trainer moves it to its device itself
    text = config.get_text_config()
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.pad_token_id
    return model, processor


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- fastrft side
def child_fastrft(a) -> dict:
    from fastrft.metrics import read_metrics
    from fastrft.train import GRPOConfig, train

    with tempfile.TemporaryDirectory() as out:
        model_name = "tiny"
        if a.shape != "tiny":  # a save_pretrained folder: the trainer's own loading route
            model_name = str(Path(out) / "model")
            model, processor = build_model(a.shape, a.image_size, a.seed)
            model.save_pretrained(model_name)
            processor.save_pretrained(model_name)
            del model
        cfg = GRPOConfig(
            model=model_name, dataset="shapes", bf16=a.bf16, output_dir=str(Path(out) / "run"), train_size=256,
            image_size=a.image_size, seed=a.seed,
            max_steps=a.steps, prompts_per_step=a.prompts, num_generations=a.G, max_completion_length=a.completion,
            learning_rate=1e-5, warmup_steps=0, loss_type="dapo", beta=0.0, eval_size=0, eval_steps=0,
            save_steps=0, save_total_limit=1, progress=False, reward_funcs=["shapes"],
        )
        train(cfg)
        rows = [r for r in read_metrics(Path(out) / "run" / "metrics.jsonl") if r.get("kind") == "train"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = [
        {
            "step_s": r["step_seconds"],
            "rollout_s": r["rollout_seconds"],
            "train_s": r["train_seconds"],
            "completion_tokens": r["completion_tokens"],
            "forward_tokens": r["train_tokens"],
            "vision_images": r["images_encoded"],
        }
        for r in rows
    ]
    return {"steps": steps, "peak_bytes": _peak_bytes(device)}


# ----------------------------------------------------------------------------- TRL side
def child_trl(a) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from fastrft.data import load_image, load_rows
    from fastrft.rewards import load_reward

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = build_model(a.shape, a.image_size, a.seed)
    reward = load_reward("shapes")
    rows = load_rows("shapes", size=256, seed=a.seed)
    ds = datasets.Dataset.from_list([
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["problem"]}]}],
            "image": load_image(r["images"][0], image_size=a.image_size),
            "solution": r["solution"],
        }
        for r in rows
    ])

    def shapes_reward(prompts, completions, solution, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return reward(texts, solution)

    args = TRLConfig(
        output_dir=tempfile.mkdtemp(), max_steps=a.steps, per_device_train_batch_size=a.prompts * a.G,
        gradient_accumulation_steps=1, num_generations=a.G, max_completion_length=a.completion,
        learning_rate=1e-5, warmup_steps=0, lr_scheduler_type="constant", beta=0.0, loss_type="dapo",
        temperature=1.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=device.type == "cpu",
        bf16=a.bf16, seed=a.seed, dataloader_num_workers=0, max_grad_norm=1.0, shuffle_dataset=True,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[shapes_reward], args=args, train_dataset=ds,
                          processing_class=processor)
    record: list[dict] = []
    current: dict = {}
    generate = trainer._generate_and_score_completions

    def timed_generate(inputs):
        t0 = time.perf_counter()
        out = generate(inputs)
        current["rollout_s"] = time.perf_counter() - t0
        mask = out["completion_mask"]  # [P*G, C]
        prompt_mask = out["prompt_mask"]  # [P*G, Lp] (left padded)
        current["completion_tokens"] = int(mask.sum())
        # the training forward runs the padded [P*G, Lp + C] batch, and every image P*G times
        current["forward_tokens"] = int(prompt_mask.numel() + mask.numel())
        current["vision_images"] = int(out["image_grid_thw"].shape[0]) if "image_grid_thw" in out else 0
        return out

    trainer._generate_and_score_completions = timed_generate

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            current.clear()
            current["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_s = time.perf_counter() - current.pop("t0")
            record.append(dict(current, step_s=step_s, train_s=step_s - current["rollout_s"]))

    trainer.add_callback(StepTimer())
    trainer.train()
    return {"steps": record, "peak_bytes": _peak_bytes(device)}


# ----------------------------------------------------------------------------- driver
def _summary(name: str, res: dict) -> dict:
    steps = res["steps"][1:] or res["steps"]  # the first step warms up
    med = lambda k: statistics.median(s[k] for s in steps)  # noqa: E731
    return {
        "trainer": name,
        "step_s": med("step_s"),
        "rollout_s": med("rollout_s"),
        "train_s": med("train_s"),
        "rollout_tok_s": statistics.median(s["completion_tokens"] / s["rollout_s"] for s in steps),
        "train_tok_s": statistics.median(s["completion_tokens"] / s["train_s"] for s in steps),
        "completion_tokens": med("completion_tokens"),
        "forward_tokens": med("forward_tokens"),
        "vision_images": med("vision_images"),
        "peak_mb": res["peak_bytes"] / 2**20,
        "steps_measured": len(steps),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--completion", type=int, default=32)
    p.add_argument("--image-size", type=int, nargs="+", default=[112, 224],
                   help="image side(s) in px: 112 -> 16 image tokens per prompt, 224 -> 64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", choices=MODEL_SHAPES, default="tiny", help="the model: tiny, or 3B shapes with 4 layers")
    p.add_argument("--bf16", choices=["auto", "true", "false"], default="auto",
                   help="bf16 autocast over fp32 weights on both sides (auto: on CUDA only)")
    p.add_argument("--trainers", default="trl,fastrft", help="which sides run, in order")
    p.add_argument("--child-timeout", type=float, default=None, help="seconds each side may run")
    p.add_argument("--name", default="trainer", help="results file benchmarks/results/<name>-<device>.json")
    p.add_argument("--child", choices=["fastrft", "trl"], default=None)
    a = p.parse_args()
    a.bf16 = torch.cuda.is_available() if a.bf16 == "auto" else a.bf16 == "true"
    if a.child:
        a.image_size = a.image_size[0]
        torch.manual_seed(a.seed)
        res = child_fastrft(a) if a.child == "fastrft" else child_trl(a)
        print("RESULT " + json.dumps(res), flush=True)
        return
    rows = []
    trainers = a.trainers.split(",")
    for size in a.image_size:
        pair = {}
        for name in trainers:
            cmd = [sys.executable, "-m", "benchmarks.bench_trainer", "--child", name, "--steps", str(a.steps),
                   "--prompts", str(a.prompts), "--G", str(a.G), "--completion", str(a.completion),
                   "--image-size", str(size), "--seed", str(a.seed), "--shape", a.shape,
                   "--bf16", "true" if a.bf16 else "false"]
            env = dict(os.environ, TQDM_DISABLE="1")
            try:
                out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=a.child_timeout)
            except subprocess.TimeoutExpired:
                pair[name] = {"trainer": name, "error": f"timed out after {a.child_timeout:.0f} s"}
                continue
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
                tail = [ln for ln in (out.stderr or out.stdout).strip().splitlines() if ln.strip()]
                err = tail[-1][:300] if tail else f"exit {out.returncode}"
                if name == "trl" and ("No module named 'trl'" in err or "No module named 'datasets'" in err):
                    err = "TRL is not installed here (its wheels did not travel): " + err
                pair[name] = {"trainer": name, "error": err}
                print(f"{name} run failed: {err}", file=sys.stderr)
                continue
            pair[name] = _summary(name, json.loads(lines[-1][7:]))
        trl, ours = pair.get("trl", {}), pair.get("fastrft", {})
        if "train_s" in trl and "train_s" in ours:
            ours["train_speedup_vs_trl"] = trl["train_s"] / ours["train_s"]
            ours["step_speedup_vs_trl"] = trl["step_s"] / ours["step_s"]
            ours["peak_ratio_vs_trl"] = ours["peak_mb"] / trl["peak_mb"]
        for r in pair.values():
            r.update({"prompts": a.prompts, "G": a.G, "max_completion_length": a.completion, "image_size": size,
                      "steps": a.steps, "shape": a.shape, "bf16": a.bf16})
        rows += list(pair.values())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = write_results(a.name, rows, command=command_line(), device=device,
                         notes=f"{a.shape} Qwen2.5-VL, synthetic shapes, dapo, beta 0, "
                               f"{'bf16 autocast' if a.bf16 else 'fp32'}; medians over steps after the first")
    cols = ["trainer", "image_size", "step_s", "rollout_s", "train_s", "rollout_tok_s", "train_tok_s", "forward_tokens",
            "vision_images", "peak_mb", "error"]
    print(f"device: {device_info(device)}")
    print(markdown_table(rows, cols, ["trainer", "image px", "s/step", "rollout s", "train s", "rollout tok/s",
                                      "train tok/s", "forward tokens/step", "images encoded/step", "peak MB", "error"]))
    for r in rows:
        if r["trainer"] == "fastrft" and "train_speedup_vs_trl" in r:
            print(f"image {r['image_size']} px: fastrft vs TRL: training phase {r['train_speedup_vs_trl']:.2f}x, "
                  f"whole step {r['step_speedup_vs_trl']:.2f}x, peak memory {r['peak_ratio_vs_trl']:.2f}x")
    print(f"-> {path}")

if __name__ == "__main__":
    main()
