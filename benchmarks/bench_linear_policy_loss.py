"""Fused LM-head policy loss: fwd+bwd time and peak memory against naive PyTorch and Liger.

    python -m benchmarks.bench_linear_policy_loss --quick     # N=2048, H=896 only
    python -m benchmarks.bench_linear_policy_loss             # N in {2048, 8192} x H in {896, 1536}

Providers, on the same packed batch (N completion tokens in sequences of --seq-len tokens,
V = 151936, dapo loss, on-policy, beta = 0):
- naive: logits [N, V] materialized, log_softmax, gather, TRL-style dapo loss, autograd;
- liger: liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss on the padded [B, L, H] equivalent
  (every position valid, so padded == packed); compiled=True (torch.compile works on CPU here);
- trl: TRL's own fused LM-head log-prob (trl.kernels.ChunkedLogProbFunction, what
  `add_fused_lm_head` runs: cuBLAS tiles of 4096 tokens x 32768 vocab columns folded by a
  Triton kernel, the backward recomputing each tile), then the same dapo loss as naive;
  skipped with a note where the installed TRL has no such function;
- fastrft: fastrft_kernels.linear_policy_loss (auto backend: torch on CPU, triton on CUDA).
Times: providers interleaved in one process (round-robin), median and spread of the repeats;
compare ratios, not absolute times. Peak memory: each provider in a fresh subprocess (CPU) or
from the allocator (CUDA), above the inputs. On CUDA the rows add TFLOP/s and the fraction of
the 8 N H V floor (forward, one recompute, dX, dW) at the device's dense bf16/fp32 rate.

GPU kit flags (scripts/gpu_check.sh): --shape takes several N,H pairs; --forward also times
the forward alone; --measure-matmul measures an 8192^3 matmul in the run's dtype first and
reports each time against the 2 N H V (forward) and 6 N H V (forward + backward) matmul floors
at that measured rate; --liger-eager runs Liger uncompiled (the CPU dry run).
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import _common as C

V = 151936  # Qwen2/2.5 vocabulary (--vocab changes it, for smoke runs)
SHAPES_FULL = [(2048, 896), (2048, 1536), (8192, 896), (8192, 1536)]
SHAPES_QUICK = [(2048, 896)]
PROVIDERS = ("naive", "liger", "trl", "fastrft")
# naive holds logits, log-softmax and their gradients: about 4 x N x V x 4 bytes in fp32
# (20 GB at N = 8192); above this budget it is skipped and its memory given by that formula.
NAIVE_MAX_BYTES = 8 * 2**30


def make_inputs(n, h, dtype, device, seq_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 0.5).to(dtype).to(device)
    weight = (torch.randn(V, h, generator=g) / h**0.5).to(dtype).to(device)
    targets = torch.randint(0, V, (n,), generator=g).to(device)
    b = n // seq_len
    adv = torch.randn(b, generator=g).to(device)
    cu = torch.arange(0, n + 1, seq_len, dtype=torch.int32, device=device)
    return hidden, weight, targets, adv, cu


def _dapo_from_logp(logp, adv, seq_len, n):
    """TRL's dapo loss (on-policy, beta 0) from per-token log-probs [N]: sum over tokens / N."""
    ratio = torch.exp(logp - logp.detach())
    a = adv.repeat_interleave(seq_len)  # [N]
    per_tok = -torch.min(ratio * a, torch.clamp(ratio, 0.8, 1.2) * a)
    return per_tok.sum() / n


def trl_chunked_logprob():
    """TRL's fused LM-head log-prob function and the vocabulary chunk its trainer passes, or None
    where the installed TRL has none (or TRL is absent). Its backward imports trl.trainer.utils
    (and so `datasets`), so that module must import too."""
    try:
        from trl.kernels import ChunkedLogProbFunction
    except ImportError:
        return None
    from trl.trainer import utils  # ImportError here: TRL is installed without what it needs

    return ChunkedLogProbFunction, getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)


def make_step(provider, hidden, weight, targets, adv, cu, seq_len, backward=True, liger_compiled=True):
    """A closure running one fwd+bwd of `provider` on fresh leaves (grads dropped each call);
    with backward=False the forward alone (the loss, leaves still requiring grad)."""
    n, h = hidden.shape
    b = n // seq_len
    x = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()

    if provider == "naive":
        def step():
            x.grad = w.grad = None
            logits = (x @ w.t()).float()  # [N, V]
            logp = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)  # [N]
            ratio = torch.exp(logp - logp.detach())
            a = adv.repeat_interleave(seq_len)  # [N]
            per_tok = -torch.min(ratio * a, torch.clamp(ratio, 0.8, 1.2) * a)
            loss = per_tok.sum() / n  # dapo: tokens in the batch
            if backward:
                loss.backward()
            return loss
    elif provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo", compiled=liger_compiled,
                                      chunk_size=1)
        mask = torch.ones(b, seq_len, device=hidden.device)
        x3 = x.view(b, seq_len, h)  # the padded [B, L, H] form of the same batch

        def step():
            x.grad = w.grad = None
            loss = fn(x3, w, targets.view(b, seq_len), mask, adv)[0]
            if backward:
                loss.backward()
            return loss
    elif provider == "trl":
        found = trl_chunked_logprob()
        if found is None:
            raise ImportError("the installed TRL has no fused LM-head log-prob (trl.kernels.ChunkedLogProbFunction)")
        fused, chunk = found

        def step():
            x.grad = w.grad = None
            logp = fused.apply(x, w, None, targets, 1.0, chunk, None, 1.0, ())[0]  # [N] fp32
            loss = _dapo_from_logp(logp, adv, seq_len, n)
            if backward:
                loss.backward()
            return loss
    elif provider == "fastrft":
        from fastrft_kernels import LossConfig, linear_policy_loss

        cfg = LossConfig(loss_type="dapo", beta=0.0)

        def step():
            x.grad = w.grad = None
            loss, _ = linear_policy_loss(x, w, targets, adv, cu, config=cfg)
            if backward:
                loss.backward()
            return loss
    else:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    step.leaves = (x, w)
    return step


# Dense peak rates (FLOP/s) for the floor: tensor-core bf16/fp16, and plain fp32 (IEEE, what
# the fp32 kernels use), from the vendors' data sheets (SXM parts).
PEAK_FLOPS = {
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
}


def peak_flops(device, dtype_name):
    name = torch.cuda.get_device_name(device)
    for key, rates in PEAK_FLOPS.items():
        if key in name:
            return rates[dtype_name]
    return None


def naive_bytes(n):
    return 4 * n * V * 4


def child(args):
    """Fresh process: build the inputs, then report the peak of one fwd+bwd above them."""
    device = torch.device(args.device)
    inputs = make_inputs(args.n, args.h, getattr(torch, args.dtype), device, args.seq_len)
    step = make_step(args.child, *inputs, args.seq_len, liger_compiled=not args.liger_eager)
    if args.child == "liger":
        step()  # compile outside the measured call
        # ...and drop the gradients it left, or the base level would hold a dW [V, H] that the
        # measured call frees first, hiding its own dW from the peak (seen: 506 MiB measured
        # for Liger at N=8192, H=896, below the 548 MiB that dW and dX alone hold).
        for t in step.leaves:
            t.grad = None
    C.report_peak(C.peak_memory_of_call(step, device))


def main(argv=None):
    global V
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one shape (N=2048, H=896)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--vocab", type=int, default=V)
    p.add_argument("--shape", nargs="+", default=None, help="N,H pairs instead of the list, e.g. 256,64 512,64")
    p.add_argument("--forward", action="store_true", help="also time the forward alone")
    p.add_argument("--measure-matmul", action="store_true",
                   help="measure the run's matmul rate first; report fractions of the 2NHV / 6NHV floors at it")
    p.add_argument("--liger-eager", action="store_true", help="Liger without torch.compile (CPU dry runs)")
    p.add_argument("--name", default="linear_policy_loss", help="results file: benchmarks/results/<name>-<device>.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--h", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    V = args.vocab
    if args.child:
        return child(args)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    providers = args.providers.split(",")
    rows = []
    shapes = SHAPES_QUICK if args.quick else SHAPES_FULL
    if args.shape:
        shapes = [tuple(int(v) for v in pair.split(",")) for pair in args.shape]
    matmul_rate = None
    if args.measure_matmul:
        matmul_rate = C.measure_matmul_flops(device, dtype, n=8192 if device.type == "cuda" else 512)
        print(f"measured {args.dtype} matmul rate: {matmul_rate / 1e12:.1f} TFLOP/s", flush=True)
    liger_compiled = not args.liger_eager
    for n, h in shapes:
        inputs = make_inputs(n, h, dtype, device, args.seq_len)
        fns, fwd_fns, notes = {}, {}, {}
        for prov in providers:
            if prov == "naive" and naive_bytes(n) > NAIVE_MAX_BYTES and device.type == "cpu":
                notes[prov] = f"naive logits need ~{naive_bytes(n) / 2**30:.0f} GiB"
                continue
            try:
                fns[prov] = make_step(prov, *inputs, args.seq_len, liger_compiled=liger_compiled)
                fns[prov]()  # proves it runs (and compiles) before the timed rounds
                if args.forward:
                    fwd_fns[prov] = make_step(prov, *inputs, args.seq_len, backward=False,
                                              liger_compiled=liger_compiled)
                    fwd_fns[prov]()
            except Exception as e:  # a provider whose package is not installed here, or that fails: a note
                fns.pop(prov, None)
                fwd_fns.pop(prov, None)
                what = "not available" if isinstance(e, ImportError) else "failed"
                notes[prov] = f"{what}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
                print(f"{prov}: {notes[prov]}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        times = C.time_side_by_side(fns, device=device, warmup=1, repeats=args.repeats)
        fwd_times = C.time_side_by_side(fwd_fns, device=device, warmup=1, repeats=args.repeats) if fwd_fns else {}
        flops = 8 * n * h * V
        for prov in providers:
            row = {"provider": prov, "N": n, "H": h, "V": V, "dtype": args.dtype}
            if prov in times:
                t = times[prov]
                row.update(median_s=t["median_s"], min_s=t["min_s"], max_s=t["max_s"], fwd_bwd_ms=t["median_s"] * 1e3)
                if prov in fwd_times:
                    row["fwd_ms"] = fwd_times[prov]["median_s"] * 1e3
                if device.type == "cuda":
                    row["tflops"] = flops / t["median_s"] / 1e12
                    peak = peak_flops(device, args.dtype)
                    if peak:  # the 8 N H V floor at the device's dense peak, over the time taken
                        row["floor_fraction"] = flops / peak / t["median_s"]
                if matmul_rate:  # the matmuls alone at the rate measured in this run: 2NHV fwd, 6NHV fwd+bwd
                    row["matmul_tflops_measured"] = matmul_rate / 1e12
                    row["floor6_fraction"] = 6 * n * h * V / matmul_rate / t["median_s"]
                    if prov in fwd_times:
                        row["fwd_floor2_fraction"] = 2 * n * h * V / matmul_rate / fwd_times[prov]["median_s"]
            else:
                row["skipped"] = notes.get(prov, "not run")
            if not args.no_memory:
                if prov in times:
                    if device.type == "cuda":
                        step = make_step(prov, *inputs, args.seq_len, liger_compiled=liger_compiled)
                        step()
                        for t in step.leaves:  # as in child(): warm-up grads would hide the measured call's
                            t.grad = None
                        row["peak_bytes"] = C.peak_memory_of_call(step, device)
                        del step
                    else:
                        row["peak_bytes"] = C.peak_memory_in_subprocess(
                            "benchmarks.bench_linear_policy_loss",
                            ["--child", prov, "--n", str(n), "--h", str(h), "--device", args.device,
                             "--dtype", args.dtype, "--seq-len", str(args.seq_len), "--vocab", str(V)]
                            + (["--liger-eager"] if args.liger_eager else []),
                        )
                elif prov == "naive" and device.type == "cpu":
                    row["peak_bytes_estimate"] = naive_bytes(n)
            rows.append(row)
            print(row, flush=True)
        ref = {r["provider"]: r for r in rows if r["N"] == n and r["H"] == h}
        for r in ref.values():
            if "median_s" in r and "median_s" in ref.get("liger", {}):
                r["time_vs_liger"] = r["median_s"] / ref["liger"]["median_s"]
            if "peak_bytes" in r and "peak_bytes" in ref.get("liger", {}):
                r["mem_vs_liger"] = r["peak_bytes"] / ref["liger"]["peak_bytes"]
            naive_mem = ref.get("naive", {}).get("peak_bytes") or ref.get("naive", {}).get("peak_bytes_estimate")
            if "peak_bytes" in r and naive_mem:
                r["mem_vs_naive"] = r["peak_bytes"] / naive_mem
        del inputs, fns, fwd_fns
        for r in rows:
            if "peak_bytes" in r:
                r["peak_MiB"] = r["peak_bytes"] / 2**20
        # after each shape, so a run stopped by a time limit keeps the shapes it finished
        path = C.write_results(args.name, rows, command=C.command_line(), device=device,
                               notes=f"fwd+bwd; dapo, on-policy, beta=0; liger compiled={liger_compiled}")
    cols = ["provider", "N", "H", "median_s", "min_s", "max_s", "time_vs_liger", "peak_MiB", "mem_vs_liger",
            "mem_vs_naive"] + (["tflops", "floor_fraction"] if device.type == "cuda" else [])
    cols += (["fwd_ms"] if args.forward else []) + (["floor6_fraction"] if matmul_rate else [])
    cols += (["fwd_floor2_fraction"] if matmul_rate and args.forward else []) + ["skipped"]
    print(C.markdown_table(rows, cols))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
