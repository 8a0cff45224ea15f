"""Real text of two domains that ships with Python, for the decoder demo (offline on every machine).

- **prose** (the general domain, what a language model must not forget): the Python reference manual's topics of
  ``pydoc_data.topics`` and the standard library's docstrings (:func:`~resilient_tune.demo.data.stdlib_docs`);
- **code** (the target domain, the new skill): the source of the standard library's top-level modules, with
  docstrings and comments removed by an ``ast`` round trip, so no prose of the general domain leaks into it.

Each document goes to ``train``, ``val`` or ``test`` by a stable CRC-32 hash of its name (10% val, 10% test), so
no held-out document is trained on. The text depends on the Python version: :func:`text_fingerprint` identifies it,
and the demo records it with its results.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SPLITS", "Corpus", "code_documents", "corpus", "prose_documents", "split_of", "text_fingerprint"]

SPLITS = ("train", "val", "test")
Document = tuple[str, str]
"""``(name, text)``; the name decides the split."""


def split_of(name: str) -> str:
    """``"val"`` (10%), ``"test"`` (10%) or ``"train"`` (80%) from a stable CRC-32 hash of ``name``."""
    bucket = zlib.crc32(name.encode()) % 100
    return "val" if bucket < 10 else "test" if bucket < 20 else "train"


def prose_documents() -> list[Document]:
    """The reference manual's topics (``topic:<name>``) and the standard library's docstrings (``doc:<qualname>``),
    in a stable order."""
    import pydoc_data.topics

    from .data import stdlib_docs

    topics = [(f"topic:{k}", v) for k, v in sorted(pydoc_data.topics.topics.items())]
    return topics + [(f"doc:{d.qualname}", d.doc) for d in stdlib_docs() if d.doc.strip()]


class _StripDocstrings(ast.NodeTransformer):
    """Drops the docstring of every module, class and function (an empty body becomes ``pass``)."""

    def _strip(self, node: ast.AST) -> ast.AST:
        self.generic_visit(node)
        body = node.body  # type: ignore[attr-defined]
        first = body[0].value if body and isinstance(body[0], ast.Expr) else None
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
        return node

    visit_Module = visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _strip


def code_documents(stdlib: str | Path | None = None) -> list[Document]:
    """The source of the standard library's top-level modules (``code:<file>``), docstrings and comments removed.

    Args:
        stdlib: The folder of the standard library's ``.py`` files (default: this Python's).

    Raises:
        FileNotFoundError: The folder holds no Python source (some distributions ship only ``.pyc``; install the
            Python source package, e.g. ``libpython3-stdlib``).
    """
    folder = Path(stdlib or sysconfig.get_paths()["stdlib"])
    out: list[Document] = []
    for path in sorted(folder.glob("*.py")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SyntaxWarning on old escape sequences
                tree = ast.parse(path.read_text(encoding="utf-8"))
            out.append((f"code:{path.name}", ast.unparse(_StripDocstrings().visit(tree))))
        except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
            continue  # a file this Python cannot parse (e.g. a test fixture); the others are enough
    if not out:
        raise FileNotFoundError(
            f"no Python source files in {folder}; the decoder demo's target domain is the standard library's "
            "source: install this Python's source files (e.g. the libpython3-stdlib package)"
        )
    return out


@dataclass(frozen=True)
class Corpus:
    """One domain's text per split, documents joined by blank lines: ``texts["train" | "val" | "test"]``."""

    texts: Mapping[str, str]

    def sizes(self) -> dict[str, int]:
        """Characters per split."""
        return {split: len(self.texts[split]) for split in SPLITS}


def corpus(documents: list[Document], split: Callable[[str], str] = split_of) -> Corpus:
    """Join ``documents`` per split (``split(name)`` -> ``"train" | "val" | "test"``)."""
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for name, text in documents:
        parts[split(name)].append(text)
    return Corpus({s: "\n\n".join(texts) for s, texts in parts.items()})


def text_fingerprint(*corpora: Corpus) -> str:
    """A short SHA-256 of every split of ``corpora``, to tell whether two runs used the same text."""
    digest = hashlib.sha256()
    for c in corpora:
        for s in SPLITS:
            digest.update(f"{s}\x00{c.texts[s]}\x01".encode())
    return digest.hexdigest()[:16]
