"""fastrft_kernels.integrations.trl against stock trl GRPOTrainer on CPU, same seed.

Per micro-batch: the same inputs dict (from stock TRL's own generation) through TRL's
`_compute_loss` and the fused one on twin models: loss within 1e-5 relative, gradients within
1e-4 relative. Training: 3 steps of each trainer from the same seed: identical rollouts
(completion metrics) and parameters within 1e-4.
"""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")

from fastrft_kernels.integrations import trl as fused_trl  # noqa: E402


def _tiny_text_model(seed=0, save_dir=None):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastrft.synthetic import make_tokenizer

    tok = make_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    if save_dir is not None:  # TRL builds its reference model (beta > 0) from the config's path
        model.save_pretrained(save_dir)
        model.config._name_or_path = str(save_dir)
    return model, tok


def _dataset(n=16):
    import datasets

    from fastrft.synthetic import WORDS

    words = [w for w in WORDS if w.isalpha()][:12]
    return datasets.Dataset.from_list([{"prompt": " ".join(words[(i + j) % len(words)] for j in range(3 + i % 3))}
                                       for i in range(n)])


def _reward(completions, **kw):
    return [float(len(c.split()) % 3) - 0.5 * (i % 2) for i, c in enumerate(completions)]


def _args(tmp_path, name, **kw):
    from trl import GRPOConfig

    base = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=6, max_steps=1, learning_rate=5e-3, logging_steps=1, report_to=[],
                use_cpu=True, bf16=False, save_strategy="no", seed=0, dataloader_num_workers=0,
                disable_tqdm=True, temperature=1.0)
    base.update(kw)
    return GRPOConfig(**base)


def _tiny_vlm(seed=0, save_dir=None):
    """fastrft's tiny random Qwen2.5-VL and its processor (word tokenizer, 56 px images)."""
    from fastrft import synthetic

    processor = synthetic.make_processor()
    model = synthetic.make_model(processor, seed=seed)
    if save_dir is not None:
        model.save_pretrained(save_dir)
        model.config._name_or_path = str(save_dir)
    return model, processor


def _vlm_dataset(n=8):
    import datasets

    from fastrft import synthetic

    rows = synthetic.make_split(n, seed=0, tasks=("colour",))
    return datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["problem"]}]}],
         "image": synthetic.render(r["objects"])} for r in rows])


def _vlm_reward(completions, **kw):
    text = lambda c: c if isinstance(c, str) else c[-1]["content"]  # noqa: E731
    return [float(len(text(c)) % 5) - 0.3 * (i % 3) for i, c in enumerate(completions)]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


SETTINGS = {
    "dapo": dict(),
    "grpo-beta-iter2": dict(loss_type="grpo", beta=0.04, num_iterations=2),
    "bnpo-seq-beta": dict(loss_type="bnpo", importance_sampling_level="sequence", beta=0.04),
    "dapo-accum-quantile": dict(gradient_accumulation_steps=2, per_device_train_batch_size=2,
                                top_entropy_quantile=0.5),
    "cispo": dict(loss_type="cispo", epsilon_high=5.0, num_iterations=2),
    "sapo": dict(loss_type="sapo", num_iterations=2),
    "vespo": dict(loss_type="vespo", num_iterations=2),
    "dapo-opsm-entropy": dict(off_policy_mask_threshold=0.0, num_iterations=2, entropy_coef=0.01),
}


def _compare_microbatches(stock, fused):
    """Runs stock.train(); on each micro-batch, TRL's loss and the fused one on the same inputs
    (twin models): returns [(loss rel err, worst grad rel err)]."""
    fmodel, orig, errs = fused.model, stock._compute_loss, []

    def spy(m, inputs):
        loss = orig(m, inputs)
        params = [p for p in m.parameters() if p.requires_grad]
        want = torch.autograd.grad(loss, params, retain_graph=True)
        fused.model.train(m.training)
        fused.current_gradient_accumulation_steps = stock.current_gradient_accumulation_steps
        got_loss = fused._compute_loss(fmodel, inputs)
        got = torch.autograd.grad(got_loss, [p for p in fmodel.parameters() if p.requires_grad])
        gl = max(_rel(g, w) for g, w in zip(got, want) if w.abs().max() > 0)
        # relative to |loss|, or to 1e-2 when the loss is near 0 (on-policy dapo: zero-mean advantages)
        errs.append((abs(got_loss.item() - loss.item()) / max(abs(loss.item()), 1e-2), gl))
        return loss

    stock._compute_loss = spy
    stock.train()
    assert errs
    return errs


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_microbatch_loss_and_grad_equal_stock(setting, tmp_path):
    from trl import GRPOTrainer

    model, tok = _tiny_text_model(save_dir=tmp_path / "model")
    args = _args(tmp_path, setting, **SETTINGS[setting])
    stock = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=args, train_dataset=_dataset(),
                        processing_class=tok)
    fused = fused_trl.FusedGRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=args,
                                       train_dataset=_dataset(), processing_class=tok)
    errs = _compare_microbatches(stock, fused)
    worst_loss, worst_grad = max(e[0] for e in errs), max(e[1] for e in errs)
    print(f"{setting}: {len(errs)} micro-batches, loss rel {worst_loss:.2e}, grad rel {worst_grad:.2e}")
    assert worst_loss <= 1e-5 and worst_grad <= 1e-4
    # TRL's metric names are all logged by the fused trainer as well
    fused_keys = set(fused._metrics["train"])
    stock_loss_keys = {k for k in stock._metrics["train"] if k.startswith(("clip_ratio", "kl", "entropy",
                                                                           "cispo", "vespo", "policy_loss"))}
    if fused_keys:
        assert stock_loss_keys <= fused_keys, stock_loss_keys - fused_keys


def test_text_shared_prompt_equal_stock(tmp_path):
    """shared_prompt=True on a text model: the rows of each prompt packed under segment attention."""
    from trl import GRPOTrainer

    model, tok = _tiny_text_model(save_dir=tmp_path / "model")
    args = _args(tmp_path, "shared", loss_type="grpo", beta=0.04, per_device_train_batch_size=8)
    stock = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=args, train_dataset=_dataset(),
                        processing_class=tok)
    fused = fused_trl.FusedGRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=args,
                                       train_dataset=_dataset(), processing_class=tok, shared_prompt=True)
    errs = _compare_microbatches(stock, fused)
    worst_loss, worst_grad = max(e[0] for e in errs), max(e[1] for e in errs)
    tokens = fused._metrics["train"]["fastrft/forward_tokens"]
    print(f"text shared_prompt: loss rel {worst_loss:.2e}, grad rel {worst_grad:.2e}, forward tokens {tokens}")
    assert worst_loss <= 1e-5 and worst_grad <= 1e-4
    assert all(t < 8 * (5 + 6) for t in tokens)  # fewer than TRL's 8 rows of prompt + completion


VLM_SETTINGS = {
    "dapo": dict(per_device_train_batch_size=8),  # 2 whole groups per micro-batch
    # a generation batch of 8 rows shuffled into 2 micro-batches of 4: groups split across them
    "grpo-beta-iter2-accum": dict(loss_type="grpo", beta=0.04, num_iterations=2, gradient_accumulation_steps=2),
}


@pytest.mark.parametrize("shared_prompt", [False, True])
@pytest.mark.parametrize("setting", list(VLM_SETTINGS))
def test_vlm_microbatch_equal_stock(setting, shared_prompt, tmp_path):
    """The tiny Qwen2.5-VL: TRL's rows as they are, or packed with each prompt and image once."""
    from trl import GRPOTrainer

    model, processor = _tiny_vlm(save_dir=tmp_path / "model")
    args = _args(tmp_path, setting, max_completion_length=4, **VLM_SETTINGS[setting])
    stock = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=_vlm_reward, args=args,
                        train_dataset=_vlm_dataset(), processing_class=processor)
    fused = fused_trl.FusedGRPOTrainer(model=copy.deepcopy(model), reward_funcs=_vlm_reward, args=args,
                                       train_dataset=_vlm_dataset(), processing_class=processor,
                                       shared_prompt=shared_prompt)
    errs = _compare_microbatches(stock, fused)
    worst_loss, worst_grad = max(e[0] for e in errs), max(e[1] for e in errs)
    metrics = fused._metrics["train"]
    rows, images = args.per_device_train_batch_size, metrics["fastrft/images_encoded"]
    print(f"vlm {setting} shared_prompt={shared_prompt}: {len(errs)} micro-batches, loss rel {worst_loss:.2e}, "
          f"grad rel {worst_grad:.2e}; images encoded per micro-batch {images} ({rows} rows)")
    assert worst_loss <= 1e-5 and worst_grad <= 1e-4
    if shared_prompt:  # at most one image per distinct prompt of the micro-batch (G = 4 rows each)
        assert all(n < rows for n in images) and metrics["fastrft/forward_tokens"][0] < rows * 21
    else:
        assert all(n == rows for n in images)


@pytest.mark.parametrize("setting", ["dapo", "grpo-beta-iter2"])
def test_three_steps_equal_stock(setting, tmp_path):
    from trl import GRPOTrainer

    model, tok = _tiny_text_model(save_dir=tmp_path / "model")
    args = _args(tmp_path, setting, max_steps=3, **SETTINGS[setting])
    stock = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=args, train_dataset=_dataset(),
                        processing_class=tok)
    stock.train()
    fused = fused_trl.FusedGRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=args,
                                       train_dataset=_dataset(), processing_class=tok)
    fused.train()
    for key in ("completions/mean_length", "reward"):
        assert stock._metrics["train"][key] == fused._metrics["train"][key] or not stock._metrics["train"][key], key
    worst = max((p - q).abs().max().item() for p, q in zip(fused.model.parameters(), stock.model.parameters()))
    moved = max((p - q).abs().max().item() for p, q in zip(stock.model.parameters(), model.parameters()))
    print(f"{setting}: params max abs diff after 3 steps {worst:.2e} (moved up to {moved:.2e})")
    assert moved > 1e-3 and worst <= 1e-4


def test_vlm_three_steps_shared_prompt_equal_stock(tmp_path):
    """The tiny Qwen2.5-VL, 3 steps: stock TRL and FusedGRPOTrainer(shared_prompt=True) sample the
    same completions and end with the same parameters."""
    from trl import GRPOTrainer

    model, processor = _tiny_vlm(save_dir=tmp_path / "model")
    args = _args(tmp_path, "vlm3", max_steps=3, max_completion_length=4, per_device_train_batch_size=8)
    stock = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=_vlm_reward, args=args,
                        train_dataset=_vlm_dataset(), processing_class=processor)
    stock.train()
    fused = fused_trl.FusedGRPOTrainer(model=copy.deepcopy(model), reward_funcs=_vlm_reward, args=args,
                                       train_dataset=_vlm_dataset(), processing_class=processor, shared_prompt=True)
    fused.train()
    for key in ("completions/mean_length", "reward", "reward_std"):
        assert stock._metrics["train"][key] == fused._metrics["train"][key], key
    worst = max((p - q).abs().max().item() for p, q in zip(fused.model.parameters(), stock.model.parameters()))
    moved = max((p - q).abs().max().item() for p, q in zip(stock.model.parameters(), model.parameters()))
    print(f"vlm shared_prompt: params max abs diff after 3 steps {worst:.2e} (moved up to {moved:.2e})")
    assert moved > 1e-3 and worst <= 1e-4


def test_import_does_not_import_trl():
    import subprocess
    import sys

    code = ("import sys; import fastrft_kernels.integrations.trl as m; "
            "assert 'trl' not in sys.modules, 'trl imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_unsupported_options_are_errors(tmp_path):
    with pytest.raises(RuntimeError, match="supports trl"):
        fused_trl.check_trl_version("1.15.0")
    with pytest.raises(RuntimeError, match="supports trl"):
        fused_trl.check_trl_version("2.0.0")
    model, tok = _tiny_text_model()
    args = _args(tmp_path, "x")
    t = fused_trl.FusedGRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=_dataset(),
                                   processing_class=tok)
    t.use_adaptive_entropy = True
    with pytest.raises(NotImplementedError, match="adaptive entropy"):
        fused_trl.fused_compute_loss(t, t.model, {})


@pytest.mark.parametrize("loss_type,wrap", [("dapo", "ddp"), ("grpo", "ddp"), ("dapo", "fsdp2")])
def test_ddp_two_processes(loss_type, wrap, tmp_path):
    """2 processes over gloo: the fused forward runs through DDP (or FSDP2: the head gathered by the
    root's forward), gradients are all-reduced, the parameters after a step agree on both ranks and
    with one process on the same global batch."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    env.pop("TRITON_INTERPRET", None)
    worker = os.path.join(root, "tests", "_trl_ddp_worker.py")
    run = lambda cmd: subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)  # noqa
    one = run([sys.executable, worker, str(tmp_path), loss_type])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29500 + os.getpid() % 1000), worker, str(tmp_path), loss_type, wrap])
    assert two.returncode == 0, two.stderr[-3000:]
    suffix = "-fsdp2" if wrap == "fsdp2" else ""
    p1 = torch.load(tmp_path / "params-0-of-1.pt")
    r0 = torch.load(tmp_path / f"params-0-of-2{suffix}.pt")
    r1 = torch.load(tmp_path / f"params-1-of-2{suffix}.pt")
    worst_ranks = max(_rel(r0[k], r1[k]) for k in p1)
    worst_one = max(_rel(r0[k], p1[k]) for k in p1)
    print(f"{wrap} {loss_type}: rank0 vs rank1 {worst_ranks:.2e}, 2 procs vs 1 proc {worst_one:.2e}")
    assert worst_ranks == 0.0
    assert worst_one <= 1e-5
