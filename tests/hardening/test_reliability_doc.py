"""docs/reliability.md stays true: every test it cites as a proof exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "reliability.md"

# `path/to/test_file.py::test_name[param]`, or `::test_name` continuing the last path named
_REFERENCE = re.compile(r"`(?P<path>(?:tests|integrations)/[\w/]+\.py)?::(?P<name>test_\w+)(?:\[[^\]]*\])?`")


def _cited() -> list[tuple[str, str]]:
    cited, path = [], None
    for match in _REFERENCE.finditer(PAGE.read_text()):
        path = match["path"] or path
        assert path is not None, f"{match[0]} names no file and follows none"
        cited.append((path, match["name"]))
    return cited


def test_every_cited_test_exists() -> None:
    cited = _cited()
    assert len(cited) > 40
    missing = [
        f"{path}::{name}"
        for path, name in cited
        if not (ROOT / path).is_file() or not re.search(rf"^\s*def {name}\(", (ROOT / path).read_text(), re.M)
    ]
    assert missing == []


def test_every_hardening_test_is_cited() -> None:
    cited = {(path, name) for path, name in _cited()}
    here = Path(__file__).parent
    for file in sorted(here.glob("test_*.py")):
        if file.name == Path(__file__).name:
            continue
        for name in re.findall(r"^def (test_\w+)\(", file.read_text(), re.M):
            assert (f"tests/hardening/{file.name}", name) in cited, (
                f"{file.name}::{name} is not in docs/reliability.md"
            )
