"""One node, every GPU: data parallel over GRPO groups with FSDP2, on N ranks (torchrun).

    torchrun --nproc_per_node 8 -m fastrft train --config configs/shapes.yaml
    fastrft train --nproc_per_node 8 --config configs/shapes.yaml      # launches the same

torch.distributed is the engine: `fully_shard` (FSDP2) shards each text decoder layer, each
vision block, then the root; `torch.distributed.checkpoint` (DCP) holds the sharded optimizer
state. NCCL on GPU, gloo on CPU. Logs, metrics, plots, the progress bar and the exported
model are written by rank 0 only.

What makes N ranks one run (the same update as one process with the same global batch):
- each rank takes a contiguous share (P/N prompts) of the step's P prompts (the same seeded
  permutation everywhere) and rolls out, scores and trains its groups; a group never spans ranks;
- rollouts are keyed (`fastrft.sampling`): the noise of a completion is a hash of (seed, step,
  global prompt index, sample, position), so the completions do not depend on N;
- the rewards are all-gathered before `group_advantages` (scale_rewards=batch sees the batch),
  and the loss normalizers (dapo/cispo tokens, bnpo tokens, sequence counts) are the step's
  totals over the ranks, so the sum of the ranks' losses is the one-process loss (each rank's
  backward is scaled by N, as FSDP's reduce-scatter averages: a divide factor of 1 needs
  PREMUL_SUM, which gloo lacks);
- FSDP2 runs collectives in every forward and backward, so every rank runs the same number of
  micro-batches: a rank with fewer repeats its first one with weight 0;
- the fused LM-head loss reads `lm_head.weight` after a forward of the FSDP root (`PolicyRoot`,
  whose forward is the packed body): the root's parameters (embeddings, LM head, norms, the
  vision merger) are gathered in its pre-forward and, as FSDP2 does for the root, stay gathered
  until its post-backward, which reduce-scatters the head's gradient with the rest;
- rollouts (`generate`, a different number of forward passes per rank) run with every shard
  gathered and no resharding (`gathered`), so they issue no collective.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist

OPTIM_DIR = "optimizer_dcp"


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    enabled: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ---- collectives (no-ops on one process)
    def all_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        tdist.all_reduce(t)
        return t.tolist()

    def sum_dict(self, d: dict) -> dict:
        """Sums of a {name: float} over the ranks; a name some rank lacks counts 0 there."""
        if not self.enabled:
            return dict(d)
        names: list = [None] * self.world
        tdist.all_gather_object(names, sorted(d))
        keys = sorted(set().union(*names))
        return dict(zip(keys, self.all_sum([d.get(k, 0.0) for k in keys])))

    def all_max(self, value: int) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return int(t)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks (rank order) of equal-shaped tensors along dim 0."""
        if not self.enabled:
            return x
        dev = x.device
        y = x.to(_comm_device()).contiguous()
        out = [torch.empty_like(y) for _ in range(self.world)]
        tdist.all_gather(out, y)
        return torch.cat(out).to(dev)

    def local(self, x):
        """This rank's contiguous share (1/world) of a global sequence or tensor."""
        if not self.enabled:
            return x
        n = len(x) // self.world
        return x[self.rank * n : (self.rank + 1) * n]

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(cfg) -> Dist:
    """Joins the process group torchrun describes (WORLD_SIZE > 1), after the checks that need no
    other rank: the prompts must split evenly over the ranks (a group never spans two)."""
    world = world_size()
    if world <= 1:
        return Dist()
    check_split(cfg.prompts_per_step, world)
    if not cfg.share_prefill:
        raise ValueError("several ranks sample with keyed noise, which needs share_prefill true")
    rank = int(os.environ["RANK"])
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda") or str(cfg.device).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        cfg.device = f"cuda:{local}"
    else:
        cfg.device = "cpu"
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if cuda else "gloo",
                                 timeout=datetime.timedelta(seconds=float(getattr(cfg, "dist_timeout", 600))))
    if rank != 0:
        cfg.progress = False
    return Dist(rank, world, True)


def check_split(prompts_per_step: int, world: int) -> None:
    if prompts_per_step % world:
        raise ValueError(f"prompts_per_step={prompts_per_step} does not split over {world} ranks: each rank "
                         f"trains whole groups, so prompts_per_step must be a multiple of the number of ranks")


def launch(nproc: int, argv: list[str], cfg=None) -> int:
    """`fastrft train --nproc_per_node N ...`: runs `torchrun --standalone --nproc_per_node N -m
    fastrft ...` (the same arguments) and returns its exit status. A `prompts_per_step` that does
    not split over N is an error here, before any process starts."""
    import subprocess
    import sys

    if cfg is not None:
        check_split(cfg.prompts_per_step, nproc)

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "fastrft", *argv]
    return subprocess.call(cmd)


def keyed(cfg, dist: Dist) -> bool:
    """Whether rollouts use keyed (rank-invariant) noise: `rank_invariant_sampling`, on by default
    with several ranks and off for one process (transformers' own sampler, as before)."""
    flag = getattr(cfg, "rank_invariant_sampling", None)
    return dist.enabled if flag is None else bool(flag)


# ----------------------------------------------------------------------------- FSDP2


class PolicyRoot(torch.nn.Module):
    """The FSDP root: the policy, with a forward that is the packed body (hidden rows [N, H] that
    predict the completion tokens). The fused LM-head loss then reads `lm_head.weight`, which the
    root's forward gathered."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, mb):
        from . import packing

        return packing.packed_forward(self.model, mb)[mb.rows]


def transformer_blocks(model) -> list[torch.nn.Module]:
    """The text decoder layers and vision blocks of `model` (Qwen2.5-VL and similar)."""
    blocks = []
    for mod in model.modules():
        cls = type(mod).__name__
        if cls.endswith("DecoderLayer") or cls.endswith("VisionBlock") or cls.endswith("VLVisionBlock"):
            blocks.append(mod)
    return blocks


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every text layer and vision block (transformers'
    checkpointing layers; keyword arguments such as `segments=` reach the layers), each layer
    recomputed with the attention its forward ran with
    (`fastrft_kernels.hf_attention.recompute_with_forward_attention`)."""
    from fastrft_kernels import hf_attention

    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    hf_attention.recompute_with_forward_attention(model)


def shard(cfg, model, dist: Dist, device: torch.device) -> PolicyRoot:
    """FSDP2 over `model`: each block, then the root (`PolicyRoot`). bf16 parameters with fp32
    gradient reduction on GPU (cfg.bf16); `fsdp_reshard_after_forward`; `fsdp_cpu_offload`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.world,))
    kw = {"mesh": mesh, "reshard_after_forward": bool(getattr(cfg, "fsdp_reshard_after_forward", True))}
    if device.type == "cuda" and cfg.bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if getattr(cfg, "fsdp_cpu_offload", False):
        # pinned host memory needs an accelerator: on a CPU run (tests) the policy runs unpinned
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for block in transformer_blocks(model):
        fully_shard(block, **kw)
    model.__dict__["_fastrft_reshard"] = kw["reshard_after_forward"]
    root = PolicyRoot(model)
    # the root keeps its parameters (the LM head among them) gathered from its forward to its post-backward
    fully_shard(root, **{**kw, "reshard_after_forward": False})
    model.__dict__["_fastrft_fsdp_root"] = root  # packing.completion_hidden routes through the root
    return root


def is_sharded(model) -> bool:
    return model.__dict__.get("_fastrft_fsdp_root") is not None


@contextlib.contextmanager
def gathered(model):
    """Every FSDP shard of `model` gathered, and kept so across forward passes (no collective
    inside: `generate` may run a different number of passes on each rank); resharded after."""
    root = model.__dict__.get("_fastrft_fsdp_root")
    if root is None:
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    root._get_fsdp_state()._lazy_init()  # the blocks must know they are not roots before their own forwards
    mods = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.unshard()
    root.set_reshard_after_forward(False)  # recursive
    try:
        yield model
    finally:
        for m in mods:  # the blocks' setting back; the root stays gathered after forward
            m.set_reshard_after_forward(_reshard_setting(model) and m is not root, recurse=False)
            m.reshard()


def _reshard_setting(model) -> bool:
    return model.__dict__.get("_fastrft_reshard", True)


def clip_grad_norm_(model, max_norm: float) -> float:
    """Clips the gradients to a global norm of `max_norm`; returns the norm before clipping (a plain
    float: under FSDP the norm of the sharded gradients is reduced over the ranks)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def balance(dist: Dist, batches: list, groups: list, n_valid: int, device) -> tuple[list, int, int | None, int]:
    """The step's totals over the ranks and as many micro-batches on each: returns (batches padded
    with weight-0 repeats, global valid tokens, global sequences, this rank's real count)."""
    n_real = len(batches)
    n_seq = sum(mb.seq_ids.numel() for mb in batches)
    if not dist.enabled:
        return batches, n_valid, None, n_real
    n_valid, n_seq = (int(v) for v in dist.all_sum([n_valid, n_seq]))
    n_max = dist.all_max(n_real)
    if n_real < n_max:
        from . import packing

        filler = batches[0] if batches else packing.pack_groups(groups[:1], 1 << 62)[0].to(device)
        batches = batches + [filler] * (n_max - n_real)
    return batches, n_valid, n_seq, n_real


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(cfg, dist: Dist, run_dir: Path, step: int, model, processor, ref_model, optimizer, scheduler,
                    sampler, history: dict) -> None:
    """A checkpoint of a sharded run: the optimizer state with DCP (each rank its shards, into
    optimizer_dcp/), the weights gathered on rank 0 and exported with `save_pretrained`
    (safetensors, loadable by transformers, and what a resume loads on any number of ranks), the
    trainer state; written into `.tmp-step-N` and renamed by rank 0 after every rank is done (a
    rank that dies first leaves only a `.tmp-*`, removed at the next save)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    from . import checkpoint as ckpt

    root = Path(run_dir) / "checkpoints"
    tmp = root / f".tmp-step-{step:06d}"
    if dist.main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            import shutil

            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    osd = get_optimizer_state_dict(model, optimizer)
    dcp.save({"optimizer": osd}, checkpoint_id=str(tmp / OPTIM_DIR))
    if dist.main:
        _export(model, full, tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        if ref_model is not None:
            ref_model.save_pretrained(tmp / "reference", safe_serialization=True)
        import dataclasses

        state = {"optimizer": None, "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(),
                 "history": history, "config": dataclasses.asdict(cfg), "world_size": dist.world}
        ckpt.save_trainer_state(tmp, dict(state, step=step, rng=ckpt.rng_state()))
        ckpt.publish(tmp, root / f"step-{step:06d}", cfg.save_total_limit)
    dist.barrier()


def _export(model, full_state: dict, folder: Path) -> None:
    """`save_pretrained` of the gathered weights (no DTensor reaches transformers)."""
    model.save_pretrained(folder, state_dict=full_state, safe_serialization=True)


def load_optimizer(model, optimizer, folder: Path) -> None:
    """The DCP optimizer state of checkpoint `folder` into `optimizer` over `model` (sharded or not,
    on any number of ranks: DCP reshards by parameter name)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer)
    state = {"optimizer": osd}
    dcp.load(state, checkpoint_id=str(Path(folder) / OPTIM_DIR))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load_full_optimizer(optimizer, saved: dict) -> None:
    """A one-process checkpoint's optimizer state (`optimizer.state_dict()`: full tensors keyed by
    parameter index, the same order here: both optimizers take `model.parameters()`) into the
    optimizer over the sharded model. Each rank cuts its own shard from its copy of the full tensor
    (`distribute_tensor(src_data_rank=None)`: no communication, so no rank waits on another)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for i, entry in saved["state"].items():
        p = params[int(i)]
        state[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                    if isinstance(p, DTensor) and torch.is_tensor(v) and v.dim() > 0 else v for k, v in entry.items()}
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


class NullLog:
    """The metrics log of ranks other than 0."""

    def log(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def open_run(cfg, dist: Dist, run_dir: Path, model, optimizer, scheduler, sampler, open_run_fn):
    """`train._open_run` on a sharded run: rank 0 checks, cleans and opens the folder (weights were
    loaded before sharding: `resume_weights`); then every rank loads the optimizer state (DCP), the
    schedule, the sampler and the RNGs of the latest checkpoint."""
    from . import checkpoint as ckpt

    if dist.main:
        out = open_run_fn(cfg, run_dir, None, None, optimizer, scheduler, sampler)
    dist.barrier()
    latest = ckpt.latest_checkpoint(run_dir)
    step, history = 0, {}
    if cfg.resume and latest is not None:
        state = ckpt.load_trainer_state(latest)
        if state.get("optimizer") is not None:  # a one-process checkpoint: full tensors
            load_full_optimizer(optimizer, state["optimizer"])
        else:
            load_optimizer(model, optimizer, latest)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        ckpt.set_rng_state(state["rng"])
        step, history = state["step"], state.get("history", {})
    if dist.main:
        return out[0], out[1], out[2]
    return step, history, NullLog()


def resume_weights(cfg, run_dir: Path, model, ref_model=None) -> None:
    """Before sharding: the latest checkpoint's exported weights into the full model (the same on
    every rank), so a checkpoint resumes on any number of ranks."""
    from . import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(run_dir)
    if cfg.resume and latest is not None:
        ckpt.load_weights(model, latest)
        if ref_model is not None:
            ckpt.load_weights(ref_model, latest / "reference")
