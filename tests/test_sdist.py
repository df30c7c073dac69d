"""The source distribution builds the package: it holds every C++ source of the extension and no benchmark
results, and a wheel built from it alone (in a clean directory) imports and solves.

Builds without isolation where the environment has pybind11 (the dev extra: then no registry is needed),
else in pip's isolated build environments (from the package registry). The extension's compile takes most
of the time.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("build", reason="needs the 'build' package (dev extra)")
LOCAL = importlib.util.find_spec("pybind11") is not None  # build with this environment's pybind11


def _run(*args: str, cwd: Path) -> None:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    output = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{output}"


def test_sdist_builds_a_working_wheel(tmp_path):
    sdist_dir, wheel_dir, site = tmp_path / "sdist", tmp_path / "wheel", tmp_path / "site"
    no_isolation = ["--no-isolation"] if LOCAL else []
    _run(sys.executable, "-m", "build", "--sdist", *no_isolation, "--outdir", str(sdist_dir), str(ROOT),
         cwd=tmp_path)
    (sdist,) = sdist_dir.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = [name.split("/", 1)[1] for name in tar.getnames() if "/" in name]
    headers = sorted(path.name for path in (ROOT / "csrc").glob("*.hpp"))
    assert headers, "no headers in csrc/"
    for source in ["csrc/assign.cpp", *(f"csrc/{name}" for name in headers)]:
        assert source in names, f"{source} missing from the sdist"
    for unwanted in ("benchmarks/", "tests/", "build/", ".venv/"):
        assert not [name for name in names if name.startswith(unwanted)], f"{unwanted} in the sdist"
    assert not [name for name in names if name.endswith(".so")], "a compiled extension in the sdist"

    # A wheel from the sdist alone: pip unpacks it into its own temporary directory, away from csrc/.
    no_isolation = ["--no-build-isolation"] if LOCAL else []
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", *no_isolation, "-q",
         "--wheel-dir", str(wheel_dir), str(sdist), cwd=tmp_path)
    (wheel,) = wheel_dir.glob("*.whl")
    with zipfile.ZipFile(wheel) as whl:
        whl.extractall(site)

    check = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(site)!r})
        import numpy as np
        import fedmoe_kernels
        from fedmoe_kernels import _assign, assign
        assert _assign.__file__.startswith({str(site)!r}), _assign.__file__
        assert fedmoe_kernels.__file__.startswith({str(site)!r}), fedmoe_kernels.__file__
        scores = np.array([[3.0, 1.0, 0.0], [2.0, 2.5, -np.inf], [0.5, 0.0, 1.0]])
        result = assign(scores, 1, 1)
        assert result.clients.tolist() == [0, 1, 2] and result.experts.tolist() == [0, 1, 2], result
        assert result.objective == 6.5 and result.certificate.certified
    """)
    _run(sys.executable, "-c", check, cwd=tmp_path)
