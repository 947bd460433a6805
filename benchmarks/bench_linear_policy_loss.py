"""Fused LM-head policy loss: fwd+bwd time and peak memory against naive PyTorch and Liger.

    python -m benchmarks.bench_linear_policy_loss --quick     # N=2048, H=896 only
    python -m benchmarks.bench_linear_policy_loss             # N in {2048, 8192} x H in {896, 1536}

Providers, on the same packed batch (N completion tokens in sequences of --seq-len tokens,
V = 151936, dapo loss, on-policy, beta = 0):
- naive: logits [N, V] materialized, log_softmax, gather, TRL-style dapo loss, autograd;
- liger: liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss on the padded [B, L, H] equivalent
  (every position valid, so padded == packed); compiled=True (torch.compile works on CPU here);
- fastrft: fastrft_kernels.linear_policy_loss (auto backend: torch on CPU, triton on CUDA).
Times: providers interleaved in one process (round-robin), median and spread of the repeats;
compare ratios, not absolute times. Peak memory: each provider in a fresh subprocess (CPU) or
from the allocator (CUDA), above the inputs. On CUDA the rows add TFLOP/s and the fraction of
the 8 N H V floor (forward, one recompute, dX, dW) at the device's dense bf16/fp32 rate.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import _common as C

V = 151936  # Qwen2/2.5 vocabulary (--vocab changes it, for smoke runs)
SHAPES_FULL = [(2048, 896), (2048, 1536), (8192, 896), (8192, 1536)]
SHAPES_QUICK = [(2048, 896)]
PROVIDERS = ("naive", "liger", "fastrft")
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


def make_step(provider, hidden, weight, targets, adv, cu, seq_len):
    """A closure running one fwd+bwd of `provider` on fresh leaves (grads dropped each call)."""
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
            loss.backward()
            return loss
    elif provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo", compiled=True, chunk_size=1)
        mask = torch.ones(b, seq_len, device=hidden.device)
        x3 = x.view(b, seq_len, h)  # the padded [B, L, H] form of the same batch

        def step():
            x.grad = w.grad = None
            loss = fn(x3, w, targets.view(b, seq_len), mask, adv)[0]
            loss.backward()
            return loss
    elif provider == "fastrft":
        from fastrft_kernels import LossConfig
        from fastrft_kernels import linear_policy_loss

        cfg = LossConfig(loss_type="dapo", beta=0.0)

        def step():
            x.grad = w.grad = None
            loss, _ = linear_policy_loss(x, w, targets, adv, cu, config=cfg)
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
    step = make_step(args.child, *inputs, args.seq_len)
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
    p.add_argument("--shape", default=None, help="one N,H pair instead of the list, e.g. 256,64")
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
        shapes = [tuple(int(v) for v in args.shape.split(","))]
    for n, h in shapes:
        inputs = make_inputs(n, h, dtype, device, args.seq_len)
        fns = {}
        for prov in providers:
            if prov == "naive" and naive_bytes(n) > NAIVE_MAX_BYTES and device.type == "cpu":
                continue
            fns[prov] = make_step(prov, *inputs, args.seq_len)
        times = C.time_side_by_side(fns, device=device, warmup=1, repeats=args.repeats)
        flops = 8 * n * h * V
        for prov in providers:
            row = {"provider": prov, "N": n, "H": h, "V": V, "dtype": args.dtype}
            if prov in times:
                t = times[prov]
                row.update(median_s=t["median_s"], min_s=t["min_s"], max_s=t["max_s"])
                if device.type == "cuda":
                    row["tflops"] = flops / t["median_s"] / 1e12
                    peak = peak_flops(device, args.dtype)
                    if peak:  # the 8 N H V floor at the device's dense peak, over the time taken
                        row["floor_fraction"] = flops / peak / t["median_s"]
            else:
                row["skipped"] = f"naive logits need ~{naive_bytes(n) / 2**30:.0f} GiB"
            if not args.no_memory:
                if prov in times:
                    if device.type == "cuda":
                        step = make_step(prov, *inputs, args.seq_len)
                        step()
                        row["peak_bytes"] = C.peak_memory_of_call(step, device)
                    else:
                        row["peak_bytes"] = C.peak_memory_in_subprocess(
                            "benchmarks.bench_linear_policy_loss",
                            ["--child", prov, "--n", str(n), "--h", str(h), "--device", args.device,
                             "--dtype", args.dtype, "--seq-len", str(args.seq_len), "--vocab", str(V)],
                        )
                elif prov == "naive":
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
        del inputs, fns
    for r in rows:
        if "peak_bytes" in r:
            r["peak_MiB"] = r["peak_bytes"] / 2**20
    path = C.write_results(args.name, rows, command=C.command_line(), device=device,
                           notes="fwd+bwd; dapo, on-policy, beta=0; liger compiled=True")
    cols = ["provider", "N", "H", "median_s", "min_s", "max_s", "time_vs_liger", "peak_MiB", "mem_vs_liger",
            "mem_vs_naive"] + (["tflops", "floor_fraction"] if device.type == "cuda" else [])
    print(C.markdown_table(rows, cols))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
