"""The layering rules of DESIGN.md "Layout", read from the source with ``ast``: nothing
under ``fastcache/`` imports ``bench`` or ``tests`` (or edits ``sys.path`` to reach them),
and ``bench/`` does not import ``tests``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_roots(path: Path) -> set[str]:
    """The top-level package of every module ``path`` imports (anywhere in the file)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def edits_sys_path(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ("insert", "append", "extend")
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "path"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "sys"
        ):
            return True
    return False


def sources(tree: str) -> list[Path]:
    found = sorted((ROOT / tree).rglob("*.py"))
    assert found, f"no sources under {tree}/"
    return found


@pytest.mark.parametrize(
    ("tree", "forbidden"), [("fastcache", {"bench", "tests"}), ("bench", {"tests"})]
)
def test_imports_point_down_only(tree: str, forbidden: set[str]) -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(imported_roots(p) & forbidden)
        for p in sources(tree)
        if imported_roots(p) & forbidden
    }
    assert offenders == {}


def test_fastcache_never_edits_sys_path() -> None:
    assert [str(p.relative_to(ROOT)) for p in sources("fastcache") if edits_sys_path(p)] == []


def test_the_checker_sees_an_import(tmp_path: Path) -> None:
    """The rule cannot pass vacuously: a forbidden import, even nested, is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from tests.helpers import x\n    import bench.harness\n")
    assert imported_roots(bad) == {"tests", "bench"}
    hack = tmp_path / "hack.py"
    hack.write_text("import sys\nsys.path.insert(0, '..')\n")
    assert edits_sys_path(hack)
