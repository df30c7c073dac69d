"""The user documentation stays true: links and pictures resolve, the README's code runs, the option
reference lists every option with its current default, and no source cites a file outside the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedmoe.federated import FederatedConfig

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def _links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


def test_the_documentation_pages_exist():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    for page in ["README.md", "CHANGELOG.md", "docs/design.md", "docs/configuration.md", "docs/assign.md",
                 "docs/kernels.md", "docs/flower.md", "docs/experiments/README.md"]:
        assert page in names


def _broken(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of ``page`` to a missing file, a file outside ``root`` or a missing heading."""
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif not resolved.is_relative_to(root):
            broken.append(f"{target} (outside the repository)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no such heading)")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_picture_resolves(page):
    assert not _broken(page), page.name


def test_the_link_checker_catches_broken_links(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    page = root / "page.md"
    (root / "there.md").write_text("# A `heading`: here\n")
    (tmp_path / "outside.md").write_text("# Outside\n")
    page.write_text("[ok](there.md#a-heading-here) [web](https://x.org/a.md) [gone](missing.md) "
                    "![pic](missing.png) [bad](there.md#nope) [out](../outside.md)\n"
                    "```\n[in code](ignored.md)\n```\n")
    assert _broken(page, root) == ["missing.md", "missing.png", "there.md#nope (no such heading)",
                                   "../outside.md (outside the repository)"]


def test_the_readme_is_short_and_gives_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "make run" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_python_runs(tmp_path):
    blocks = [code for lang, code in FENCE.findall((ROOT / "README.md").read_text()) if lang == "python"]
    assert len(blocks) == 2
    script = tmp_path / "readme.py"
    script.write_text("\n\n".join(blocks))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, whichever fedmoe is installed
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "True" in done.stdout  # the assignment's certificate


def _toml(value) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def test_the_option_reference_lists_every_option_with_its_default():
    rows = re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", (ROOT / "docs/configuration.md").read_text(), re.M)
    documented = dict(rows)
    assert len(documented) == len(rows), "an option is listed twice"
    options = FederatedConfig.options()
    assert set(documented) == set(options)
    wrong = {p: (documented[p], _toml(o.default)) for p, o in options.items()}
    assert not {p: pair for p, pair in wrong.items() if pair[0] != pair[1]}


def test_no_source_cites_a_file_outside_the_repository():
    patterns = ("fedmoe*/**/*.py", "csrc/*", "benchmarks/*.py", "tests/*.py", "examples/**/*", "*.toml",
                "Makefile", ".ci/*")
    sources = [p for pattern in patterns for p in ROOT.glob(pattern)
               if p.is_file() and p.suffix not in {".so", ".png", ".json"}]
    assert len(sources) > 40
    outside = re.compile(r"\.\./shared|DESIGN\.md|README_flower")
    cited = [p.relative_to(ROOT).as_posix() for p in sources
             if p != Path(__file__).resolve() and outside.search(p.read_text(errors="replace"))]
    assert not cited
    for doc in re.findall(r"docs/[\w/.-]+\.md", "".join(p.read_text(errors="replace") for p in sources)):
        assert (ROOT / doc).exists(), doc
