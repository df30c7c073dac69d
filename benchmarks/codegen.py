"""Ahead-of-time GPU code generation of the fedmoe_kernels Triton kernels, on a machine without a GPU
(docs/codegen.md).

* :func:`record` calls a launcher of ``fedmoe_kernels._details`` (``rows_triton.gather``,
  ``route_triton.route``, ...), usually on meta tensors, with the kernels of its module replaced by
  recorders: every launch it would make is kept (:class:`Launch`: kernel, grid, arguments, options), so the
  configurations compiled are exactly those the launcher chooses.
* :func:`specialize` specialises a launch as Triton's JIT does (its own binder: argument dtypes, integers
  and pointers divisible by 16, integers equal to 1; meta tensors count as 16-byte aligned, as CUDA
  allocations are); :func:`compile_launch` compiles it with ``triton.compile`` for an arch (``sm_90a`` or
  ``sm_80``) and reads the result: registers and spills from ``ptxas -v`` (the ptxas Triton runs for that
  arch, with its flags), shared memory from Triton's metadata (dynamic) plus ptxas (static), and the width
  of every global load and store, from the SASS (``cuobjdump -sass``) and from the PTX, where the line info
  attributes each access to a ``tl.load`` / ``tl.store`` of the kernel and so to its pointer argument.

Nothing here launches a kernel; TRITON_INTERPRET must be unset (under the interpreter the kernels are not
compiled, and the launchers choose other tile sizes).
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from fedmoe_kernels._backend import interpreting

ARCHS = {"sm_90a": 90, "sm_80": 80}  # name -> compute capability


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher makes it: ``kernel[grid](*args, **kwargs)``."""

    kernel: JITFunction
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @functools.cached_property
    def arguments(self) -> dict:
        """Kernel parameter name -> value (launch options such as ``num_warps`` left out)."""
        params = {k: v for k, v in self.kwargs.items() if k in self.kernel.arg_names}
        return dict(self.kernel.signature.bind(*self.args, **params).arguments)


def record(module, call: Callable[[], object]) -> list[Launch]:
    """The launches that ``call()`` makes of the Triton kernels of ``module``, which are not run."""
    if interpreting():
        raise RuntimeError("GPU code generation needs the compiled kernels: unset TRITON_INTERPRET")
    kernels = {name: obj for name, obj in vars(module).items() if isinstance(obj, JITFunction)}
    launches: list[Launch] = []

    class Recorder:
        def __init__(self, kernel: JITFunction):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.kernel, tuple(grid), args, kwargs))

    try:
        for name, kernel in kernels.items():
            setattr(module, name, Recorder(kernel))
        call()
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)
    return launches


@functools.cache
def _backend(arch: str):
    return make_backend(GPUTarget("cuda", ARCHS[arch], 32))


@functools.cache
def _binder(kernel: JITFunction, arch: str):
    return create_function_from_signature(kernel.signature, kernel.params, _backend(arch))


def specialize(launch: Launch, arch: str) -> tuple[dict, dict, dict, object]:
    """(signature, constexprs, attrs, options) of ``launch`` as Triton's JIT would compile it for ``arch``."""
    backend = _backend(arch)
    kernel = launch.kernel
    bound, specialization, options = _binder(kernel, arch)(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization,
                                                              options)
    return signature, constexprs, attrs, options


def config_key(launch: Launch, arch: str) -> tuple:
    """What tells two compilations of a kernel apart: its name, specialised signature and options."""
    signature, constexprs, attrs, options = specialize(launch, arch)
    return (launch.name, tuple(signature.items()), tuple(sorted((k, str(v)) for k, v in constexprs.items())),
            tuple(sorted((k, str(v)) for k, v in attrs.items())), options.num_warps, options.num_stages)


def describe(launch: Launch, arch: str) -> dict:
    """The configuration of ``launch`` for a record: constexprs, argument types (``:16`` where Triton knows
    the value or address divisible by 16), and launch options."""
    signature, constexprs, attrs, options = specialize(launch, arch)
    names = list(signature)
    aligned = {names[path[0]] for path, values in attrs.items() if ["tt.divisibility", 16] in values}
    config = {}
    for (index,), value in sorted(constexprs.items()):
        name = names[index]
        config[name] = value if isinstance(value, (int, float, bool, type(None))) else str(value)
    types = {name: ty + (":16" if name in aligned else "")
             for name, ty in signature.items() if ty != "constexpr"}
    return {**config, "types": types, "num_warps": options.num_warps}


# ---------------------------------------------------------------- global accesses in the kernel source


def _is_access(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("load", "store") and bool(node.args))


def _names(node: ast.AST) -> set[str]:
    """The names ``node`` uses, leaving out those inside a ``tl.load`` (a loaded value is no pointer)."""
    if isinstance(node, ast.Name):
        return {node.id}
    if _is_access(node):
        return set()
    return set().union(*map(_names, ast.iter_child_nodes(node)))


@functools.cache
def _source_accesses(kernel: JITFunction) -> dict[tuple[int, int], tuple[str, tuple[str, ...]]]:
    """(line, column) of each ``tl.load`` / ``tl.store`` call of the kernel, as Triton's line info gives it,
    -> ("load" | "store", the ``*_ptr`` arguments its pointer comes from, through local variables)."""
    tree = ast.parse(Path(inspect.getsourcefile(kernel.fn)).read_text())
    (body,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == kernel.__name__]
    assigned: dict[str, set[str]] = {}
    for node in ast.walk(body):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            assigned.setdefault(node.targets[0].id, set()).update(_names(node.value))

    def pointers(name: str, seen: frozenset = frozenset()) -> set[str]:
        if name.endswith("_ptr"):
            return {name}
        return set().union(*(pointers(n, seen | {name}) for n in assigned.get(name, ()) if n not in seen))

    accesses = {}
    for node in ast.walk(body):
        if _is_access(node):
            names = set().union(*map(pointers, _names(node.args[0])))
            accesses[(node.lineno, node.col_offset + 1)] = (node.func.attr, tuple(sorted(names)))
    return accesses


_PTX_ACCESS = re.compile(r"\b(ld|st)\.global\S*?(?:\.v(\d+))?\.[bufs](8|16|32|64)\b")
_PTX_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+(\d+)")
_PTX_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')


def _same_file(ptx_file: str | None, source: str) -> bool:
    """Whether the PTX's ``.file`` is ``source``, by its path within the package: Triton's cache is keyed
    by the kernel's text, not its path, so a kernel compiled from another checkout names that checkout."""
    return ptx_file is not None and Path(ptx_file).parts[-3:] == Path(source).parts[-3:]


def ptx_accesses(ptx: str, kernel: JITFunction) -> list[tuple[str, tuple[str, ...], int]]:
    """Global loads and stores of ``ptx`` as (kind, pointer names, bits); names are empty where an access
    comes from no ``tl.load`` / ``tl.store`` of the kernel's file. Inside an inline-asm block the line info
    of the block (the ``.loc`` before it) counts: LLVM numbers the lines within a block one by one."""
    files = {m.group(1): m.group(2) for m in map(_PTX_FILE.match, ptx.splitlines()) if m}
    source = inspect.getsourcefile(kernel.fn)
    known = _source_accesses(kernel)
    loc, in_asm, found = None, False, []
    for line in ptx.splitlines():
        if "begin inline asm" in line:
            in_asm = True
        elif "end inline asm" in line:
            in_asm = False
        elif (m := _PTX_LOC.match(line)) and not in_asm:
            loc = (files.get(m.group(1)), int(m.group(2)), int(m.group(3)))
        elif m := _PTX_ACCESS.search(line):
            kind = "load" if m.group(1) == "ld" else "store"
            bits = int(m.group(2) or 1) * int(m.group(3))
            names = ()
            if loc and _same_file(loc[0], source) and known.get(loc[1:], (None,))[0] == kind:
                names = known[loc[1:]][1]
            found.append((kind, names, bits))
    return found


_SASS_ACCESS = re.compile(r"\b(LDG|STG)((?:\.[A-Z0-9_:]+)*)")
_SASS_WIDTH = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


def sass_accesses(sass: str) -> list[tuple[str, int]]:
    """Global loads and stores of ``sass`` as (``LDG`` | ``STG``, bits)."""
    found = []
    for m in _SASS_ACCESS.finditer(sass):
        widths = [_SASS_WIDTH[q] for q in m.group(2).split(".") if q in _SASS_WIDTH]
        found.append((m.group(1), widths[0] if widths else 32))
    return found


# ---------------------------------------------------------------- compile and inspect

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class Compiled:
    """One launch compiled for one arch: the ptxas report, the SASS and PTX global accesses."""

    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    ptx: list[tuple[str, tuple[str, ...], int]]
    sass: list[tuple[str, int]]


def compile_launch(launch: Launch, arch: str) -> Compiled:
    """Compile ``launch`` for ``arch`` as the JIT would, run ptxas -v on its PTX and disassemble the cubin."""
    signature, constexprs, attrs, options = specialize(launch, arch)
    target = GPUTarget("cuda", ARCHS[arch], 32)
    kernel = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                            options=options.__dict__)
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "kernel.ptx", Path(tmp) / "kernel.cubin"
        src.write_text(ptx)
        fmad = [] if options.enable_fp_fusion else ["--fmad=false"]
        report = subprocess.run(
            [get_ptxas(ARCHS[arch]).path, "-lineinfo", "-v", "--regAllocOptLevel=2", *fmad,
             f"--gpu-name={arch}", str(src), "-o", str(cubin)],
            capture_output=True, text=True, check=True,
        ).stderr
        sass = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-sass", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
    stores, loads = map(int, _PTXAS_SPILLS.search(report).groups())
    static_smem = sum(int(s) for s in _PTXAS_SMEM.findall(report))
    return Compiled(
        registers=int(_PTXAS_REGS.search(report).group(1)),
        spill_stores=stores,
        spill_loads=loads,
        shared_bytes=kernel.metadata.shared + static_smem,
        ptx=ptx_accesses(ptx, launch.kernel),
        sass=sass_accesses(sass),
    )


def ptxas_version(arch: str) -> str:
    """The CUDA release of the ptxas Triton runs for ``arch`` (e.g. "12.9")."""
    return get_ptxas(ARCHS[arch]).version
