"""Ahead-of-time gate: every shipped Triton kernel configuration, compiled for sm_80 and
sm_90 without a GPU, with its resource use read off the cubin.

The interpreter (TRITON_INTERPRET=1) accepts code that real compilation rejects, and says
nothing about registers: this module closes that gap. Each kernel module lists what it
ships in `aot_configs()` (one `AOTKernel` per configuration and dtype); this module
compiles each one with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`
and runs the `cuobjdump` inside Triton's wheel on the cubin for registers, stack and
local bytes, and its `ptxas -v` for spill stores and loads (cuobjdump counts spills in
STACK, not LOCAL: a kernel at 255 registers with 56 B of stack showed LOCAL:0); the dynamic shared memory comes from the compiled metadata (Triton
allocates shared memory dynamically, so cuobjdump's SHARED column reads 0).

    python -m fastrft_kernels.aot            # the table, markdown
    python -m fastrft_kernels.aot --summary  # one line per kernel and arch, worst case
    python -m fastrft_kernels.aot --json F   # rows as JSON too

It must run without TRITON_INTERPRET (under the interpreter `@triton.jit` yields
interpreted functions that cannot be compiled); `main` clears it before importing triton.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ARCHS = (80, 90)
# Shared memory a block may use (opt-in maximum): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# More than this many registers per thread caps occupancy at one warp group per SM quarter.
REGISTER_LIMIT = 255


@dataclasses.dataclass(frozen=True)
class AOTKernel:
    """One shipped kernel configuration.

    name: a readable id, e.g. "linear_logprob_fwd[bf16,BN=64,BV=128,BH=64]".
    fn: the `@triton.jit` function (for an autotuned kernel, `kernel.fn`).
    signature: parameter -> Triton type string ("*fp32", "*bf16", "i32", "fp32", "constexpr", ...).
    constexprs: values of the constexpr parameters.
    """

    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3


def kernel_modules() -> list[str]:
    """Every module of fastrft_kernels (private helpers included)."""
    pkg = importlib.import_module("fastrft_kernels")
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name != "aot")


def _jit_functions(module) -> dict[str, object]:
    """The module's own `@triton.jit` kernels (autotuned or heuristics-wrapped ones unwrapped)."""
    from triton.runtime.jit import JITFunction

    found = {}
    for attr, obj in vars(module).items():
        inner = obj
        while not isinstance(inner, JITFunction) and hasattr(inner, "fn"):
            inner = inner.fn
        if isinstance(inner, JITFunction) and inner.__module__ == module.__name__:
            found[attr] = inner
    return found


def _called_jit_names(fn) -> set[str]:
    """Names a kernel's source refers to (its `@triton.jit` helpers among them)."""
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(fn.src))
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


def shipped_kernels() -> list[AOTKernel]:
    """Collects `aot_configs()` from every module. A module that fails to import is an
    error, not a skip, and so is a `@triton.jit` function that no configuration compiles,
    neither as a listed kernel nor as a helper a listed kernel calls (transitively): a
    kernel the gate never sees must not ship."""
    kernels: list[AOTKernel] = []
    for name in kernel_modules():
        module = importlib.import_module(f"fastrft_kernels.{name}")
        jitted = _jit_functions(module)
        configs = list(module.aot_configs()) if hasattr(module, "aot_configs") else []
        # Several names may hold one kernel (an autotuned wrapper beside its jit function).
        names_of: dict[int, set[str]] = {}
        for attr, fn in jitted.items():
            names_of.setdefault(id(fn), set()).add(attr)
        frontier = [id(k.fn) for k in configs if id(k.fn) in names_of]
        covered = set(frontier)
        while frontier:  # helpers inlined into a compiled kernel are compiled with it
            refs = _called_jit_names(jitted[next(iter(names_of[frontier.pop()]))]) & jitted.keys()
            for fid in {id(jitted[r]) for r in refs} - covered:
                covered.add(fid)
                frontier.append(fid)
        missing = sorted(a for a, fn in jitted.items() if id(fn) not in covered)
        if missing:
            raise ValueError(
                f"fastrft_kernels.{name} ships Triton kernels that aot_configs() does not compile: {missing}"
            )
        kernels.extend(configs)
    names = [k.name for k in kernels]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"aot_configs() names must be unique, repeated: {sorted(dup)}")
    return kernels


def _nvidia_tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found in Triton's wheel at {path}")
    return str(path)


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(kernel: AOTKernel, cc: int) -> dict:
    """Compiles `kernel` for sm_`cc`; returns its resource row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn
    arg_names = fn.arg_names
    # Pointers from the PyTorch allocator are 16-byte aligned; Triton specializes on that
    # at launch, so the AOT build must too or it measures code that never runs.
    attrs = {
        (arg_names.index(p),): [["tt.divisibility", 16]]
        for p, t in kernel.signature.items()
        if isinstance(t, str) and t.startswith("*")
    }
    src = ASTSource(fn=fn, signature=dict(kernel.signature), constexprs=dict(kernel.constexprs), attrs=attrs)
    target = GPUTarget("cuda", cc, 32)
    compiled = triton.compile(
        src, target=target, options={"num_warps": kernel.num_warps, "num_stages": kernel.num_stages}
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = Path(tmp) / "k.cubin", Path(tmp) / "k.ptx"
        cubin.write_bytes(compiled.asm["cubin"])
        ptx.write_text(compiled.asm["ptx"])
        res = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
        # ptxas -v names spills apart from other stack use (cuobjdump folds them into
        # STACK). Re-run the ptxas Triton picks for this arch with Triton's own flags, and
        # check below that it rebuilt the same binary (same registers and stack).
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        rebuilt = Path(tmp) / "v.cubin"
        verbose = subprocess.run(
            [get_ptxas(cc).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(cc)}", str(ptx), "-o", str(rebuilt)],
            capture_output=True, text=True, check=True,
        ).stderr
        res2 = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", str(rebuilt)], capture_output=True, text=True, check=True).stdout
    m = _RES.search(res)
    if m is None:
        raise RuntimeError(f"could not read resource usage of {kernel.name} from cuobjdump:\n{res}")
    regs, stack, static_shared, local = map(int, m.groups())
    m2 = _RES.search(res2)
    if m2 is None or m2.groups() != m.groups():
        raise RuntimeError(
            f"ptxas -v did not rebuild Triton's cubin for {kernel.name} on sm_{cc} "
            f"(Triton's: {m.group(0)}; rebuilt: {m2.group(0) if m2 else res2}): its spill counts would not apply"
        )
    spills = [tuple(map(int, x)) for x in _SPILL.findall(verbose)]
    if not spills:
        raise RuntimeError(f"could not read spill counts of {kernel.name} from ptxas -v:\n{verbose}")
    return {
        "kernel": kernel.name,
        "arch": f"sm_{cc}",
        "num_warps": kernel.num_warps,
        "num_stages": kernel.num_stages,
        "registers": regs,
        "stack_bytes": stack,
        "local_bytes": local,
        "spill_store_bytes": max(st for st, _ in spills),
        "spill_load_bytes": max(ld for _, ld in spills),
        "shared_bytes": int(compiled.metadata.shared) + static_shared,
    }


def _compile_index(args) -> dict:
    index, cc = args
    return compile_one(shipped_kernels()[index], cc)


def check_row(row: dict) -> list[str]:
    """The problems of one row: spills, too many registers, too much shared memory."""
    cc = int(row["arch"].removeprefix("sm_"))
    problems = []
    spilled = row["spill_store_bytes"] + row["spill_load_bytes"]
    if spilled or row["local_bytes"] or row["stack_bytes"]:
        problems.append(
            f"{row['kernel']} on {row['arch']} uses local memory: spill stores {row['spill_store_bytes']} B, "
            f"spill loads {row['spill_load_bytes']} B, stack {row['stack_bytes']} B, local {row['local_bytes']} B per thread"
        )
    if row["registers"] > REGISTER_LIMIT:
        problems.append(f"{row['kernel']} on {row['arch']} uses {row['registers']} registers")
    if row["shared_bytes"] > SHARED_LIMIT[cc]:
        problems.append(
            f"{row['kernel']} on {row['arch']} needs {row['shared_bytes']} bytes of shared memory, "
            f"above the {SHARED_LIMIT[cc]} available"
        )
    return problems


def run_gate(workers: int = 2) -> list[dict]:
    """Compiles every shipped configuration for every arch (in `workers` processes)."""
    kernels = shipped_kernels()
    jobs = [(i, cc) for i in range(len(kernels)) for cc in ARCHS]
    if workers <= 1:
        return [_compile_index(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_compile_index, jobs))


def format_table(rows: list[dict]) -> str:
    cols = ["kernel", "arch", "num_warps", "num_stages", "registers", "spill_store_bytes", "stack_bytes", "shared_bytes"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    """One line per kernel (the name before its first '[' or dtype tag) and arch: the count
    of configurations and the worst registers, spills, stack and shared memory among them."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        family = re.split(r"\[|_(?:fp32|bf16|fp16)(?:_|$)", r["kernel"])[0]
        groups.setdefault((family, r["arch"]), []).append(r)
    lines = [
        "| kernel | arch | configs | max registers | max spill stores (B) | max stack (B) | max shared (B) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (family, arch), rs in sorted(groups.items()):
        worst = {c: max(r[c] for r in rs) for c in ("registers", "spill_store_bytes", "stack_bytes", "shared_bytes")}
        lines.append(
            f"| {family} | {arch} | {len(rs)} | {worst['registers']} | {worst['spill_store_bytes']} | "
            f"{worst['stack_bytes']} | {worst['shared_bytes']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--summary", action="store_true", help="one line per kernel and arch (worst case)")
    args = parser.parse_args(argv)
    rows = run_gate(args.workers)
    print(summary_table(rows) if args.summary else format_table(rows))
    problems = [p for r in rows for p in check_row(r)]
    for p in problems:
        print("FAIL:", p, file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "problems": problems}, indent=1) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # Re-exec without the interpreter: it must be off before triton is imported.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "fastrft_kernels.aot", *sys.argv[1:]], env)
    sys.exit(main())
