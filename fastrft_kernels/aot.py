"""Ahead-of-time gate: every shipped Triton kernel configuration, compiled for sm_80 and
sm_90 without a GPU, with its resource use read off the cubin.

The interpreter (TRITON_INTERPRET=1) accepts code that real compilation rejects, and says
nothing about registers: this module closes that gap. Each kernel module lists what it
ships in `aot_configs()` (one `AOTKernel` per configuration and dtype; the Triton types of
its parameters come from the kernel's own annotations, see `signature`); this module
compiles each one with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`
and runs the `cuobjdump` inside Triton's wheel on the cubin for registers, stack and
local bytes, and its `ptxas -v` for spill stores and loads (cuobjdump counts spills in
STACK, not LOCAL: a kernel at 255 registers with 56 B of stack showed LOCAL:0); the dynamic
shared memory comes from the compiled metadata (Triton
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


def _params(fn) -> list:
    """Triton's view (`KernelParam`: annotation, constexpr or not) of each parameter of a
    `@triton.jit` function: a JITFunction, or under TRITON_INTERPRET=1 an InterpretedFunction."""
    import inspect

    from triton.runtime.jit import KernelParam

    parameters = inspect.signature(fn.fn).parameters.values()
    return [KernelParam(i, p, False, False) for i, p in enumerate(parameters)]


def signature(fn, dtype: str | None) -> dict[str, str]:
    """The Triton type of each parameter of the `@triton.jit` function `fn`, read off its own
    parameter list: a constexpr -> "constexpr"; an annotated one -> its annotation ("i32",
    "i64", "fp32", "*fp32", "*i64", ...: the types Triton also uses at launch); an unannotated
    one, a pointer to the input dtype -> "*" + dtype (e.g. "*bf16")."""
    sig = {}
    for p in _params(fn):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.annotation:
            if not p.annotation_type:
                raise ValueError(
                    f"{fn.__name__}: parameter {p.name} has an annotation Triton does not read: {p.annotation!r}"
                )
            sig[p.name] = p.annotation_type
        elif dtype is None:
            raise ValueError(
                f"{fn.__name__}: parameter {p.name} has no type annotation and the configuration names no dtype "
                "for the input pointers"
            )
        else:
            sig[p.name] = "*" + dtype
    return sig


@dataclasses.dataclass(frozen=True)
class AOTKernel:
    """One shipped kernel configuration.

    fn: the `@triton.jit` function (for an autotuned kernel, the jit function it wraps).
    dtype: "fp32" | "bf16" | "fp16", the element type of the unannotated (input-dtype) pointers;
        None for a kernel whose pointers all carry a type annotation.
    constexprs: values of the constexpr parameters.
    """

    fn: object
    dtype: str | None
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3

    @property
    def signature(self) -> dict[str, str]:
        return signature(self.fn, self.dtype)

    @property
    def name(self) -> str:
        """fn[dtype,FLAG=v,...,w4s3]: the constexprs in parameter order, bools as 0/1."""
        fmt = lambda v: str(int(v)) if isinstance(v, bool) else str(v)  # noqa: E731
        tags = [self.dtype] if self.dtype else []
        tags += [f"{p.name}={fmt(self.constexprs[p.name])}" for p in _params(self.fn) if p.name in self.constexprs]
        tags.append(f"w{self.num_warps}s{self.num_stages}")
        return f"{self.fn.__name__}[{','.join(tags)}]"


def kernel_modules() -> list[str]:
    """Every module of fastrft_kernels (private helpers included)."""
    pkg = importlib.import_module("fastrft_kernels")
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name != "aot")


def _unwrap(obj):
    """The JITFunction inside an autotuned or heuristics-wrapped kernel (or None)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
        obj = obj.fn
    return obj if isinstance(obj, JITFunction) else None


def _jit_functions(module) -> dict[str, object]:
    """The `@triton.jit` functions the module defines (not the ones it imports)."""
    found = {}
    for attr, obj in vars(module).items():
        inner = _unwrap(obj)
        if inner is not None and inner.__module__ == module.__name__:
            found[attr] = inner
    return found


def _called_jit_functions(fn) -> list[object]:
    """The `@triton.jit` functions `fn`'s source calls by name, resolved in `fn`'s own module
    (so a helper imported from `_triton.py` is found where it is defined)."""
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(fn.src))
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    found = (_unwrap(fn.__globals__[n]) for n in sorted(names) if n in fn.__globals__)
    return [f for f in found if f is not None]


def compiled_with(kernels) -> set[int]:
    """ids of the jit functions a build of `kernels` compiles: the kernels themselves and the
    helpers they call, transitively (inlined into them), wherever those are defined."""
    frontier = [k.fn for k in kernels]
    covered = {id(f) for f in frontier}
    while frontier:
        for helper in _called_jit_functions(frontier.pop()):
            if id(helper) not in covered:
                covered.add(id(helper))
                frontier.append(helper)
    return covered


def shipped_kernels() -> list[AOTKernel]:
    """Collects `aot_configs()` from every module. A module that fails to import is an error,
    not a skip, and so is a `@triton.jit` function that no configuration compiles, neither as a
    listed kernel nor as a helper a listed kernel calls (transitively, across modules: the
    helpers of `_triton.py` count where the kernels of the op modules call them): a kernel the
    gate never sees must not ship."""
    kernels: list[AOTKernel] = []
    defined: dict[str, dict[str, object]] = {}
    for name in kernel_modules():
        module = importlib.import_module(f"fastrft_kernels.{name}")
        defined[name] = _jit_functions(module)
        if hasattr(module, "aot_configs"):
            kernels.extend(module.aot_configs())
    covered = compiled_with(kernels)
    for name, jitted in defined.items():
        missing = sorted(a for a, fn in jitted.items() if id(fn) not in covered)
        if missing:
            raise ValueError(
                f"fastrft_kernels.{name} ships Triton functions that no aot_configs() entry compiles "
                f"(as a kernel or a helper a kernel calls): {missing}"
            )
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


def _resources(cubin: Path) -> str:
    """cuobjdump's resource line(s) for a cubin: REG, STACK, SHARED, LOCAL."""
    cmd = [_nvidia_tool("cuobjdump"), "-res-usage", str(cubin)]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(kernel: AOTKernel, cc: int) -> dict:
    """Compiles `kernel` for sm_`cc`; returns its resource row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn
    arg_names = fn.arg_names
    sig = kernel.signature
    # Pointers from the PyTorch allocator are 16-byte aligned; Triton specializes on that
    # at launch, so the AOT build must too or it measures code that never runs.
    attrs = {(arg_names.index(p),): [["tt.divisibility", 16]] for p, t in sig.items() if t.startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(kernel.constexprs), attrs=attrs)
    target = GPUTarget("cuda", cc, 32)
    compiled = triton.compile(
        src, target=target, options={"num_warps": kernel.num_warps, "num_stages": kernel.num_stages}
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = Path(tmp) / "k.cubin", Path(tmp) / "k.ptx"
        cubin.write_bytes(compiled.asm["cubin"])
        ptx.write_text(compiled.asm["ptx"])
        res = _resources(cubin)
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
        res2 = _resources(rebuilt)
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
            f"spill loads {row['spill_load_bytes']} B, stack {row['stack_bytes']} B, "
            f"local {row['local_bytes']} B per thread"
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
    cols = ["kernel", "arch", "num_warps", "num_stages", "registers", "spill_store_bytes", "stack_bytes",
            "shared_bytes"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    """One line per kernel (the name before its '[') and arch: the count of configurations
    and the worst registers, spills, stack and shared memory among them."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        family = r["kernel"].split("[")[0]
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
