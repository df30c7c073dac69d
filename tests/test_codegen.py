"""GPU code generation of the Triton kernels, without a GPU (docs/codegen.md): a few configurations of
every op compile for sm_90a and sm_80 with no spills and 128-bit hot loops on the memory-bound kernels (an
aligned row width and an awkward one), the grid that benchmarks/compile_gpu.py compiles holds every
configuration value the launchers can choose, and the GPU check's benchmark (benchmarks/bench_gpu.py) runs
end to end on tiny shapes.

The scripts run in a subprocess without TRITON_INTERPRET: this session may run the kernels under the
interpreter, where they are not compiled and the launchers choose other tiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOT = {  # the hot accesses that must be found, per memory-bound kernel of the quick configurations
    "_gather_kernel": {"x_ptr load", "out_ptr store"},
    "_combine_kernel": {"y_ptr load", "out_ptr store"},
    "_slot_dot_kernel": {"g_ptr load", "y_ptr load"},
    "_row_stats_kernel": {"rows_ptr load", "base_ptr load"},
    "_aggregate_kernel": {"rows_ptr load", "base_ptr load", "out_ptr store"},
}
MEMORY_BOUND = set(HOT)


def _missing_ptxas() -> str | None:
    spec = find_spec("triton")
    if spec is None or spec.origin is None:
        return "triton is not installed"
    bin_dir = Path(spec.origin).parent / "backends" / "nvidia" / "bin"
    missing = [tool for tool in ("ptxas", "ptxas-blackwell", "cuobjdump") if not (bin_dir / tool).is_file()]
    return f"{', '.join(missing)} missing from {bin_dir}" if missing else None


def _run(script: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    """benchmarks/``script`` with ``args``, without TRITON_INTERPRET; with ``ok``, asserted to succeed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 or not ok, f"{script} {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def _compile_gpu(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    if reason := _missing_ptxas():
        pytest.skip(reason)
    return _run("compile_gpu.py", *args, ok=ok)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("codegen") / "compile_gpu_quick.json"
    done = _compile_gpu("--quick", "--workers", "1", "--out", str(out), ok=False)  # judged by the tests
    assert out.exists(), done.stdout + done.stderr
    return json.loads(out.read_text())["records"]


def test_every_quick_configuration_compiles_for_both_archs(records):
    assert not [r for r in records if "error" in r]
    kernels = {r["kernel"] for r in records}
    assert MEMORY_BOUND <= kernels and "_block_histogram_kernel" in kernels
    for kernel in kernels:
        assert {r["arch"] for r in records if r["kernel"] == kernel} == {"sm_90a", "sm_80"}


def test_no_configuration_spills(records):
    assert not [(r["kernel"], r["arch"]) for r in records if r["spill_stores"] or r["spill_loads"]]


def test_the_memory_bound_hot_loops_are_128_bit_where_rows_are_aligned(records):
    hot = [r for r in records if r["kernel"] in MEMORY_BOUND]
    assert {r["shape"].get("H") for r in hot} >= {7168, 1000}  # 1000: rows 16-byte but not 16-element aligned
    for r in hot:
        assert HOT[r["kernel"]] <= set(r["hot_accesses"]), r["hot_accesses"]
        assert set(r["hot_accesses"].values()) == {128}, (r["kernel"], r["arch"], r["shape"])
        assert 128 in r["sass_access_bits"]["LDG"]
        assert r["ptx_widths_match_sass"]  # so the PTX's attribution of widths to accesses holds for the SASS
        assert not r["missed"]


def test_route_compiles_for_4096_experts(records):
    (histogram, *_) = [r for r in records if r["kernel"] == "_block_histogram_kernel"]
    assert histogram["shape"]["E"] == 4096 and histogram["config"]["NUM_BINS"] == 8192


def test_the_grid_covers_every_configuration_the_launchers_choose():
    _compile_gpu("--check-coverage", "--samples", "200")


def test_the_gpu_check_benchmark_runs_end_to_end_on_tiny_shapes(tmp_path):
    """benchmarks/bench_gpu.py (gpu_check.sh's benchmark) plans its grid and, on tiny shapes, runs every step:
    here on the CPU (the torch path), on a GPU the kernels."""
    shapes = [json.loads(line) for line in _run("bench_gpu.py", "--dry-run").stdout.splitlines()]
    assert {s["kind"] for s in shapes} == {"op", "aggregate", "layer"}
    assert shapes[0]["shape"] == [65536, 7168, 8, 256] and shapes[1]["shape"] == [4096, 1024, 2, 8]
    out = tmp_path / "gpu_check_smoke.json"
    _run("bench_gpu.py", "--smoke", "--out", str(out))
    results = json.loads(out.read_text())
    assert results["copy_roof_gbps"] > 0 and not results["skipped"]
    assert len(results["ops"]) == 2 and results["aggregates"] and results["layers"]
    for op in ("route", "dispatch", "combine", "dispatch_backward", "combine_backward"):
        assert results["ops"][0][op]["fedmoe_ms"] > 0
    assert {"device", "driver", "torch", "triton"} <= set(results["machine"])


def test_line_info_naming_another_checkout_still_attributes_the_access():
    """Triton's cache is keyed by a kernel's text, not its path: a compile in one checkout can return the PTX
    of another, whose ``.file`` names that checkout's copy of the same module."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import codegen
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    source = str(ROOT / "fedmoe_kernels" / "_details" / "rows_triton.py")
    assert codegen._same_file("/elsewhere/clone/fedmoe_kernels/_details/rows_triton.py", source)
    assert not codegen._same_file("/elsewhere/clone/fedmoe_kernels/_details/route_triton.py", source)
    assert not codegen._same_file(None, source)
