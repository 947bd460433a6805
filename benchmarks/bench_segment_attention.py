"""Shared-prefix segment attention against the layouts and kernels a GRPO trainer would otherwise use.

    python -m benchmarks.bench_segment_attention --quick   # one group shape
    python -m benchmarks.bench_segment_attention           # three group shapes
    python -m benchmarks.bench_segment_attention --fwd-only   # forward only (FlexAttention on CPU)

One GRPO group: a prompt of P tokens (images included) and G = 8 completions of lengths in
[cmin, cmax] (fixed seed). Attention only, forward + backward, one layer's shapes
(Qwen2.5-VL-3B text: 16 q heads, 2 kv heads, D = 128; on CPU --heads 4,1 by default so a
run takes minutes: the ratios between providers are what to read).

Providers:
- fastrft_shared: `segment_attention` on the group packed once, [prompt | c1 | ... | c8],
  with `shared_prefix_segments` (auto backend: torch chunks on CPU, Triton on CUDA);
- fastrft_repeat: the same kernel on the layout TRL / verl / EasyR1 compute, the prompt
  repeated per completion: 8 causal sequences (`varlen_attention`);
- sdpa_padded_repeat: that repeated layout as TRL feeds it to SDPA, a padded [G, Lmax]
  batch, causal (padding costs as much as real tokens, so is_causal over the padded length
  times what a padding mask would);
- sdpa_dense_shared: SDPA on the shared layout with a dense [T, T] boolean mask;
- flex_shared / flex_shared_compiled: FlexAttention on the shared layout with a block mask
  (eager and torch.compile'd), where they run;
- flash_varlen_repeat (CUDA, if flash_attn is importable): flash_attn_varlen_func on the
  repeated layout (it cannot express the shared layout: one causal flag per call).
Columns: tokens computed per group, median fwd+bwd time, peak memory above the inputs (CPU:
each provider in a fresh subprocess), time and memory relative to fastrft_shared, and on
CUDA TFLOP/s of the useful work (the shared layout's attended pairs x 4 x D x Hq forward,
2.5x that backward, the flash-attn convention).

GPU kit flags (scripts/gpu_check.sh): --shape P,cmin,cmax (several allowed) replaces the shape
list, and P = 0 is the documents layout (G causal documents packed back to back: the shared
layout with an empty prompt; the "repeat" providers then run plain varlen documents);
--group sets G; --split also times the forward alone, so forward and backward TFLOP/s are
reported apart (backward = fwd+bwd minus fwd); --dense-ref T measures dense causal SDPA over
one T-token sequence with the same heads first, and each provider's rates are also given as a
fraction of that dense rate; --name names the results file.
"""

from __future__ import annotations

import argparse
import os
import sys

# Inductor compiles in-process: its worker pool otherwise stays alive next to the timed
# providers (FlexAttention compiled shares the process) and skewed their times by up to 10x here.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from fastrft_kernels import segment_attention, shared_prefix_segments, varlen_attention

G = 8
SHAPES_FULL = [(300, 64, 128), (600, 64, 512), (1200, 256, 512)]  # (prompt, cmin, cmax)
SHAPES_QUICK = [(300, 64, 128)]
PROVIDERS = (
    "fastrft_shared",
    "fastrft_repeat",
    "sdpa_padded_repeat",
    "sdpa_dense_shared",
    "flex_shared",
    "flex_shared_compiled",
    "flash_varlen_repeat",
)


def completion_lens(cmin, cmax, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(cmin, cmax + 1, (G,), generator=g).tolist()


def make_inputs(P, comps, hq, hk, d, dtype, device, seed=0):
    """q, k, v for the shared layout [T, H, D]; the repeated layout is gathered from them."""
    T = P + sum(comps)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, hq, d, generator=g).to(dtype).to(device)
    k = torch.randn(T, hk, d, generator=g).to(dtype).to(device)
    v = torch.randn(T, hk, d, generator=g).to(dtype).to(device)
    return q, k, v


def repeat_index(P, comps, device):
    """Token indices of the repeated layout [prompt, c_j] for j = 1..G, into the shared one."""
    idx, cu, pos = [], [0], P
    for c in comps:
        idx.append(torch.arange(P))
        idx.append(torch.arange(pos, pos + c))
        pos += c
        cu.append(cu[-1] + P + c)
    return torch.cat(idx).to(device), torch.tensor(cu, dtype=torch.int32, device=device)


def flex_block_mask(P, comps, T, device):
    from torch.nn.attention.flex_attention import create_block_mask

    comp = torch.full((T,), -1, dtype=torch.int64)
    pos = P
    for j, c in enumerate(comps):
        comp[pos:pos + c] = j
        pos += c
    comp = comp.to(device)

    def shared_prefix(b, h, q_idx, kv_idx):
        prompt_kv = comp[kv_idx] == -1
        causal = kv_idx <= q_idx
        return (prompt_kv & ((comp[q_idx] != -1) | causal)) | ((comp[kv_idx] == comp[q_idx]) & causal)

    return create_block_mask(shared_prefix, None, None, T, T, device=device)


def make_step(provider, q, k, v, P, comps, device, fwd_only=False):
    """A closure running one fwd+bwd (or fwd only) on fresh leaves; None when the provider
    cannot run here."""
    T, hq, d = q.shape
    leaves = [x.detach().clone().requires_grad_(not fwd_only) for x in (q, k, v)]
    do = torch.randn_like(q)

    def backward(out, idx=None):
        if fwd_only:
            return
        out.backward(do if idx is None else do[idx])

    if provider == "fastrft_shared":
        seg = shared_prefix_segments([P], [comps])

        def step():
            for x in leaves:
                x.grad = None
            backward(segment_attention(*leaves, seg))
        return step
    if provider in ("fastrft_repeat", "flash_varlen_repeat", "sdpa_padded_repeat"):
        idx, cu = repeat_index(P, comps, device)
        if provider == "fastrft_repeat":
            def step():
                for x in leaves:
                    x.grad = None
                qq, kk, vv = (x[idx] for x in leaves)  # the prompt copied G times, as a TRL batch holds it
                backward(varlen_attention(qq, kk, vv, cu, causal=True), idx)
            return step
        if provider == "flash_varlen_repeat":
            if device.type != "cuda":
                return None
            try:
                from flash_attn import flash_attn_varlen_func
            except ImportError:
                return None
            maxlen = P + max(comps)

            def step():
                for x in leaves:
                    x.grad = None
                qq, kk, vv = (x[idx] for x in leaves)
                backward(flash_attn_varlen_func(qq, kk, vv, cu, cu, maxlen, maxlen, causal=True), idx)
            return step
        lmax = P + max(comps)
        pad_idx = torch.zeros(G, lmax, dtype=torch.long, device=device)
        valid = torch.zeros(G, lmax, dtype=torch.bool, device=device)
        pos = P
        for j, c in enumerate(comps):
            row = torch.cat([torch.arange(P), torch.arange(pos, pos + c)]).to(device)
            pad_idx[j, : P + c] = row
            valid[j, : P + c] = True
            pos += c

        def step():
            for x in leaves:
                x.grad = None
            qq, kk, vv = (x[pad_idx].permute(0, 2, 1, 3) for x in leaves)  # [G, H, Lmax, D]
            out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
            out = out.permute(0, 2, 1, 3)[valid]  # [tokens, Hq, D]
            backward(out, pad_idx[valid])
        return step
    if provider == "sdpa_dense_shared":
        mask = shared_prefix_segments([P], [comps]).dense_mask(T, device=device)  # [T, T] bool

        def step():
            for x in leaves:
                x.grad = None
            qq, kk, vv = (x.transpose(0, 1)[None] for x in leaves)  # [1, H, T, D]
            out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, enable_gqa=True)
            backward(out[0].transpose(0, 1))
        return step
    if provider.startswith("flex_shared"):
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError:
            return None
        fn = torch.compile(flex_attention) if provider.endswith("compiled") else flex_attention
        block_mask = flex_block_mask(P, comps, T, device)

        def step():
            for x in leaves:
                x.grad = None
            qq, kk, vv = (x.transpose(0, 1)[None] for x in leaves)
            out = fn(qq, kk, vv, block_mask=block_mask, enable_gqa=True)
            backward(out[0].transpose(0, 1))
        return step
    raise ValueError(f"unknown provider {provider!r}")


def tokens_per_group(provider, P, comps):
    shared = P + sum(comps)
    return shared if provider.endswith("shared") or provider.startswith("flex") else G * P + sum(comps)


def dense_causal_rates(T, hq, hk, d, dtype, device, repeats):
    """(fwd FLOP/s, bwd FLOP/s) of dense causal SDPA over one T-token sequence, heads hq / hk
    (GQA), measured now: the rate the packed layouts are compared against."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, T, d, generator=g).to(dtype).to(device) for h in (hq, hk, hk))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    do = torch.randn_like(q)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        with torch.no_grad():
            sdpa(q, k, v, is_causal=True, enable_gqa=True)

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        sdpa(*leaves, is_causal=True, enable_gqa=True).backward(do)

    t = C.time_side_by_side({"fwd": fwd, "fwd_bwd": fwd_bwd}, device=device, warmup=1, repeats=repeats)
    flop_fwd = 4 * (T * (T + 1) // 2) * d * hq
    t_fwd = t["fwd"]["median_s"]
    t_bwd = max(t["fwd_bwd"]["median_s"] - t_fwd, 1e-9)
    return flop_fwd / t_fwd, 2.5 * flop_fwd / t_bwd


def child(args):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    comps = completion_lens(args.cmin, args.cmax)
    hq, hk = (int(x) for x in args.heads.split(","))
    q, k, v = make_inputs(args.prompt, comps, hq, hk, args.head_dim, dtype, device)
    step = make_step(args.child, q, k, v, args.prompt, comps, device, args.fwd_only)
    step()  # warm-up (compiles) outside the measured call
    C.report_peak(C.peak_memory_of_call(step, device))


def main(argv=None):
    global G
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one group shape (P=300, completions 64-128)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--heads", default=None, help="q,kv heads: 16,2 on CUDA (Qwen2.5-VL-3B), 4,1 on CPU")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--fwd-only", action="store_true",
                   help="time forward passes only (FlexAttention has no CPU backward); "
                   "results in segment_attention_fwd-*.json")
    p.add_argument("--shape", nargs="+", default=None,
                   help="P,cmin,cmax group shapes instead of the list (P=0: documents), e.g. 1024,256,1024 0,512,2048")
    p.add_argument("--group", type=int, default=G, help=f"completions (documents) per group, default {G}")
    p.add_argument("--split", action="store_true", help="also time the forward alone: fwd and bwd TFLOP/s apart")
    p.add_argument("--dense-ref", type=int, default=0, metavar="T",
                   help="measure dense causal SDPA over T tokens first; report rates as fractions of it")
    p.add_argument("--name", default=None, help="results file benchmarks/results/<name>-<device>.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompt", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cmin", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cmax", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    G = args.group
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.heads = args.heads or ("16,2" if cuda else "4,1")
    if args.child:
        return child(args)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    hq, hk = (int(x) for x in args.heads.split(","))
    d = args.head_dim
    rows = []
    shapes = SHAPES_QUICK if args.quick else SHAPES_FULL
    if args.shape:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape]
    def write(rows):
        return C.write_results(
            args.name or ("segment_attention_fwd" if args.fwd_only else "segment_attention"), rows,
            command=C.command_line(), device=device,
            notes=f"attention {'fwd' if args.fwd_only else 'fwd+bwd'} of one layer, G={G}, heads {args.heads}, D={d}, "
            f"{args.dtype}; times are medians of interleaved repeats; CPU memory from a fresh subprocess per provider",
        )

    dense = None
    if args.dense_ref:
        dense = dense_causal_rates(args.dense_ref, hq, hk, d, dtype, device, args.repeats)
        print(f"dense causal SDPA, T={args.dense_ref}: fwd {dense[0] / 1e12:.2f} TFLOP/s, "
              f"bwd {dense[1] / 1e12:.2f} TFLOP/s", flush=True)
    for P, cmin, cmax in shapes:
        comps = completion_lens(cmin, cmax)
        q, k, v = make_inputs(P, comps, hq, hk, d, dtype, device)
        pairs = shared_prefix_segments([P], [comps]).plan(q.shape[0], q.shape[0], 64, 64).visible_pairs
        useful_flop = 3.5 * 4 * pairs * d * hq  # fwd 4 pairs D Hq, bwd 2.5x fwd
        steps, fwd_steps, notes = {}, {}, {}
        for prov in args.providers.split(","):
            try:
                step = make_step(prov, q, k, v, P, comps, device, args.fwd_only)
                if step is None:
                    notes[prov] = ("flash_attn is not installed" if prov.startswith("flash") and cuda
                                   else "not available here")
                    continue
                step()  # warm-up: compiles, and proves it runs
                steps[prov] = step
                if args.split and not args.fwd_only:
                    fwd = make_step(prov, q, k, v, P, comps, device, fwd_only=True)
                    fwd()
                    fwd_steps[prov] = fwd
            except Exception as e:  # report what does not run (e.g. FlexAttention eager on CPU)
                steps.pop(prov, None)
                notes[prov] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        timings = C.time_side_by_side(steps, device=device, warmup=0, repeats=args.repeats)
        fwd_timings = C.time_side_by_side(fwd_steps, device=device, warmup=0, repeats=args.repeats)
        flop_fwd = 4 * pairs * d * hq  # the useful forward work of the layout (its attended pairs)
        shape_rows = []
        for prov in args.providers.split(","):
            row = {"layout": "shared_prefix" if P else "documents",
                   "prompt": P, "completions": f"{cmin}-{cmax}", "G": G, "heads": args.heads, "head_dim": d,
                   "dtype": args.dtype, "provider": prov, "tokens_per_group": tokens_per_group(prov, P, comps),
                   "attended_pairs": pairs}
            if prov not in steps:
                row["note"] = notes.get(prov, "")
                shape_rows.append(row)
                continue
            t = timings[prov]
            row.update(median_ms=t["median_s"] * 1e3, min_ms=t["min_s"] * 1e3, max_ms=t["max_s"] * 1e3)
            if cuda:
                row["tflops"] = useful_flop / (3.5 if args.fwd_only else 1.0) / t["median_s"] / 1e12
            if prov in fwd_timings:  # forward and backward apart, each over its share of the useful work
                t_fwd = fwd_timings[prov]["median_s"]
                t_bwd = max(t["median_s"] - t_fwd, 1e-9)
                row.update(fwd_ms=t_fwd * 1e3, bwd_ms=t_bwd * 1e3, fwd_tflops=flop_fwd / t_fwd / 1e12,
                           bwd_tflops=2.5 * flop_fwd / t_bwd / 1e12)
                if dense:
                    row["fwd_vs_dense"] = flop_fwd / t_fwd / dense[0]
                    row["bwd_vs_dense"] = 2.5 * flop_fwd / t_bwd / dense[1]
            if dense:
                row["dense_fwd_tflops"] = dense[0] / 1e12
                row["dense_bwd_tflops"] = dense[1] / 1e12
            if not args.no_memory:
                if cuda:
                    row["peak_mib"] = C.peak_memory_of_call(steps[prov], device) / 2**20
                else:
                    row["peak_mib"] = C.peak_memory_in_subprocess(
                        "benchmarks.bench_segment_attention",
                        ["--child", prov, "--prompt", str(P), "--cmin", str(cmin), "--cmax", str(cmax),
                         "--device", args.device, "--dtype", args.dtype, "--heads", args.heads,
                         "--head-dim", str(d), "--group", str(G)] + (["--fwd-only"] if args.fwd_only else []),
                    ) / 2**20
            shape_rows.append(row)
        base = next((r for r in shape_rows if r["provider"] == "fastrft_shared" and "median_ms" in r), None)
        for r in shape_rows:
            if base and "median_ms" in r:
                r["time_vs_shared"] = r["median_ms"] / base["median_ms"]
                if "peak_mib" in r and base.get("peak_mib"):
                    r["mem_vs_shared"] = r["peak_mib"] / base["peak_mib"]
        rows += shape_rows
        del steps, fwd_steps
        path = write(rows)  # after each shape, so a run stopped by a time limit keeps the shapes it finished
    cols = ["layout", "prompt", "completions", "provider", "tokens_per_group", "median_ms", "time_vs_shared",
            "peak_mib",
            "mem_vs_shared"] + (["tflops"] if cuda else [])
    if args.split:
        cols += ["fwd_tflops", "bwd_tflops"] + (["fwd_vs_dense", "bwd_vs_dense"] if dense else [])
    cols += ["note"]
    print(C.markdown_table(rows, cols))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
