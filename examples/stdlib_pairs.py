"""Real text pairs that ship with Python: standard-library docstrings (offline on every machine).

Target task: a docstring's first sentence -> the qualified name it documents (``smtplib.SMTP.connect``).
General task: a docstring's first sentence -> the rest of that docstring, from *other* modules.
Splits are by top-level module (stable hash), so no module leaks between target and general data.
The text depends on the Python version; the version is recorded with every run's results.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import warnings
import zlib
from dataclasses import dataclass

__all__ = ["Pairs", "build_pairs"]

_SKIP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip", "venv",
    "pydoc_data", "msilib", "winreg", "winsound", "nturl2path", "xxsubtype", "crypt", "nis", "spwd",
    "ossaudiodev", "sndhdr", "imghdr", "pipes", "telnetlib", "nntplib", "cgi", "cgitb", "chunk", "mailcap",
    "uu", "xdrlib", "audioop", "aifc", "sunau", "asynchat", "asyncore", "smtpd", "imp", "distutils",
}  # fmt: skip
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Pairs:
    """Query/passage pairs of one task; ``queries[i]`` matches ``passages[i]``."""

    queries: list[str]
    passages: list[str]

    def __len__(self) -> int:
        return len(self.queries)

    def head(self, n: int) -> Pairs:
        return Pairs(self.queries[:n], self.passages[:n])


def _docs() -> list[tuple[str, str, str]]:
    """(top-level module, qualified name, docstring) of public functions, classes and methods."""
    out = []
    seen: set[int] = set()
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(name)
            except Exception:  # platform-specific or optional modules
                continue
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name or id(obj) in seen:
                continue
            seen.add(id(obj))
            if inspect.isclass(obj):
                out.append((name, f"{name}.{attr}", inspect.getdoc(obj) or ""))
                for meth, fn in sorted(vars(obj).items()):
                    if not meth.startswith("_") and callable(fn) and fn.__doc__:
                        out.append((name, f"{name}.{attr}.{meth}", inspect.cleandoc(fn.__doc__)))
            elif inspect.isfunction(obj):
                out.append((name, f"{name}.{attr}", inspect.getdoc(obj) or ""))
    return out


def build_pairs(
    max_target_train: int = 2400, max_test: int = 400, max_general: int = 425
) -> dict[str, Pairs]:
    """Build ``{"target_train", "target_test", "general"}`` pairs from the running Python's stdlib."""
    first_seen: dict[str, int] = {}
    rows = []
    for module, qualname, doc in _docs():
        parts = _SENTENCE.split(doc.strip().replace("\n", " "), maxsplit=1)
        first = parts[0].strip()
        if not 4 <= len(first.split()) <= 40:
            continue
        first_seen[first] = first_seen.get(first, 0) + 1
        rest = parts[1].strip() if len(parts) > 1 else ""
        rows.append((module, qualname, first, rest))
    rows = [
        r for r in rows if first_seen[r[2]] == 1
    ]  # inherited docstrings leak between splits: drop repeats
    bucket = {r[0]: zlib.crc32(r[0].encode()) % 10 for r in rows}  # 0-5 train, 6 test, 7-9 general
    train_rows = [r for r in rows if bucket[r[0]] <= 5][:max_target_train]
    test_rows = [r for r in rows if bucket[r[0]] == 6][:max_test]
    general = [r for r in rows if bucket[r[0]] >= 7 and len(r[3].split()) >= 5][:max_general]
    return {
        "target_train": Pairs([r[2] for r in train_rows], [r[1] for r in train_rows]),
        "target_test": Pairs([r[2] for r in test_rows], [r[1] for r in test_rows]),
        "general": Pairs([r[2] for r in general], [r[3] for r in general]),
    }
