"""The package keeps the shape docs/architecture.md draws: imports run down the layers only, the units form no cycle,
modules and classes stay readable in size. Imports are read from the source (lazy imports inside functions count)."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "resilient_tune"
PACKAGES = {
    "merging",
    "checkpoint",
    "engine",
    "session",
    "integrations",
    "demo",
    "weights",
    "policy",
}  # units that are folders
MAX_MODULE_LINES = 420  # "about 400"
MAX_CLASS_LINES = 320  # "about 300", not counting the class docstring (its arguments' documentation)


def _layers() -> dict[str, int]:
    """Unit -> layer, read from the table of docs/architecture.md (so the page and the test cannot disagree)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    layers = {}
    for row in re.finditer(r"^\| (\d) [^|]*\| ([^|]*) \|", text, re.M):
        for unit in re.findall(r"`([\w]+)/?`", row.group(2)):
            layers[unit] = int(row.group(1))
    return layers


LAYERS = _layers()


def _unit(path: Path) -> str:
    first = path.relative_to(PACKAGE).parts[0]
    return first if first in PACKAGES else Path(first).stem


def _imports(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """``(line, unit)`` of every resilient_tune unit ``path`` imports (relative or absolute, at any depth); ``module``
    is its dotted name (default: from its place in the package)."""
    module = module or ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names = (
                    [".".join([*base, node.module])]
                    if node.module
                    else [".".join([*base, a.name]) for a in node.names]
                )
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "resilient_tune" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in _modules()}
    assert units <= set(LAYERS), f"units missing from docs/architecture.md: {sorted(units - set(LAYERS))}"


def test_imports_run_down_the_layers():
    upward = []
    for path in _modules():
        unit = _unit(path)
        for line, target in _imports(path):
            if target != unit and LAYERS.get(target, -1) > LAYERS[unit]:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {unit} (layer {LAYERS[unit]}) imports {target} "
                              f"(layer {LAYERS[target]})")  # fmt: skip
    assert not upward, "\n".join(upward)


def test_the_units_form_no_cycle():
    graph: dict[str, set[str]] = defaultdict(set)
    for path in _modules():
        unit = _unit(path)
        graph[unit] |= {t for _, t in _imports(path) if t != unit and t in LAYERS}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [unit])


def test_modules_and_classes_stay_readable():
    too_big = []
    for path in _modules():
        source = path.read_text(encoding="utf-8")
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES:
            too_big.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and _class_lines(node) > MAX_CLASS_LINES:
                too_big.append(f"{path.relative_to(ROOT)}: class {node.name}, {_class_lines(node)} lines")
    assert not too_big, "\n".join(too_big)


def _class_lines(node: ast.ClassDef) -> int:
    """Lines of a class without its own docstring."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0] if node.body else None
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_the_detector_sees_upward_imports(tmp_path):
    """The check itself: a core module importing the session, absolutely or relatively, is caught (so the tests above
    cannot pass vacuously)."""
    fake = tmp_path / "_fake.py"
    fake.write_text(
        "from resilient_tune.session import Cocktail\n\ndef f():\n    from ..session import metrics\n"
    )
    found = _imports(fake, "resilient_tune.merging._fake")
    assert found == [(1, "session"), (4, "session")] and LAYERS["session"] > LAYERS["merging"]
