"""Real text pairs that ship with Python: standard-library docstrings (offline on every machine).

Two retrieval tasks over the docstrings of public functions, classes and methods of the standard library
(top-level modules of ``sys.stdlib_module_names`` and their public submodules, e.g. ``email.message``):

- **target** (the narrow new skill): a docstring's first sentence -> the qualified name it documents
  (``smtplib.SMTP.connect``);
- **general** (what the model must not forget): a docstring's first sentence -> the rest of that docstring.

Target and general text come from different top-level packages (a stable CRC-32 hash of the package name: 70% of
packages target, 30% general), so nothing the model is tuned on leaks into the general test. Within the target
packages, test pairs are other objects of the same packages (a hash of the qualified name): the new skill is
knowing those packages' APIs. Repeated first sentences (inherited or copied docstrings) are dropped everywhere. The text depends on the Python version (and on which optional modules
import on the machine): :func:`fingerprint` identifies the data, and the demo records it with its results.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import astuple, dataclass
from pathlib import Path
from types import ModuleType

__all__ = [
    "DemoData", "Doc", "Pairs", "build_pairs", "demo_data", "fingerprint", "stdlib_docs", "validation_data"
]  # fmt: skip

# Modules with side effects on import (a browser, a GUI, printed text), deprecated ones that warn loudly, the test
# suites, and packages of near-identical docstrings (codecs).
_SKIP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip", "venv",
    "pydoc_data", "msilib", "winreg", "winsound", "nturl2path", "xxsubtype", "crypt", "nis", "spwd",
    "ossaudiodev", "sndhdr", "imghdr", "pipes", "telnetlib", "nntplib", "cgi", "cgitb", "chunk", "mailcap",
    "uu", "xdrlib", "audioop", "aifc", "sunau", "asynchat", "asyncore", "smtpd", "imp", "distutils",
    "test", "encodings",
}  # fmt: skip
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_TARGET_PACKAGES = 7  # crc32(package) % 10 < 7: target packages; the rest: general
_TEST_SHARE = 17  # crc32(qualname) % 100 < 17: a target test pair (about 400 of them)
_VALIDATION_SALT = "validation-2:"  # validation_data()'s partition: of 8 salts tried, the one whose smaller test set
# (target or general) was largest on Python 3.11 (317 general, 314 target test pairs); chosen by the sizes alone


@dataclass(frozen=True)
class Doc:
    """One documented object: its top-level package, qualified name and cleaned docstring."""

    package: str
    qualname: str
    doc: str


@dataclass(frozen=True)
class Pairs:
    """Query/passage pairs of one task; ``queries[i]`` matches ``passages[i]``."""

    queries: list[str]
    passages: list[str]

    def __len__(self) -> int:
        return len(self.queries)

    def head(self, n: int) -> Pairs:
        """The first ``n`` pairs."""
        return Pairs(self.queries[:n], self.passages[:n])

    def split(self, n: int) -> tuple[Pairs, Pairs]:
        """The first ``n`` pairs and the rest."""
        return self.head(n), Pairs(self.queries[n:], self.passages[n:])


@dataclass(frozen=True)
class DemoData:
    """The demo's splits: tune on ``target_train``; probe during training; score on the test sets.

    The probes are held out from the sets they sit next to: ``target_probe`` is not trained on and
    ``general_probe`` (which the ``budget`` policy uses to choose α) shares no pair with ``general_test``.
    """

    target_train: Pairs
    target_probe: Pairs
    target_test: Pairs
    general_probe: Pairs
    general_test: Pairs

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in self.__dataclass_fields__}


def _quiet_import(name: str) -> ModuleType | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # platform-specific or optional modules (ctypes.wintypes, dbm.gnu, ...)
            return None


def _modules() -> Iterator[tuple[str, ModuleType]]:
    """(top-level package, module) for every importable public stdlib module, in a stable order."""
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP:
            continue
        module = _quiet_import(name)
        if module is None:
            continue
        yield name, module
        if not hasattr(module, "__path__"):
            continue
        subs = sorted(info.name for info in pkgutil.walk_packages(module.__path__, f"{name}."))
        for sub in subs:
            parts = sub.split(".")[1:]
            if any(p.startswith("_") or "test" in p for p in parts):
                continue
            submodule = _quiet_import(sub)
            if submodule is not None:
                yield name, submodule


def stdlib_docs() -> list[Doc]:
    """The docstrings of public functions, classes and (public) methods defined in stdlib modules.

    Collected in a fresh interpreter (``python -I -S``: no site-packages), so that libraries imported by the
    caller cannot change the text: transformers, for one, adds methods to ``logging.Logger`` and torch replaces
    ``inspect.getfile``.

    Raises:
        RuntimeError: The child interpreter failed.
    """
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(Path(__file__).resolve())],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise RuntimeError(f"collecting standard-library docstrings failed: {done.stderr.strip()[-1000:]}")
    return [Doc(*row) for row in json.loads(done.stdout)]


def _collect_docs() -> list[Doc]:
    """:func:`stdlib_docs` in this interpreter (as it is: modules already imported or patched count)."""
    out: list[Doc] = []
    seen: set[int] = set()
    for package, module in _modules():
        name = module.__name__
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name or id(obj) in seen:
                continue
            seen.add(id(obj))
            if inspect.isclass(obj):
                out.append(Doc(package, f"{name}.{attr}", inspect.getdoc(obj) or ""))
                for meth, fn in sorted(vars(obj).items()):
                    if not meth.startswith("_") and callable(fn) and getattr(fn, "__doc__", None):
                        out.append(Doc(package, f"{name}.{attr}.{meth}", inspect.cleandoc(fn.__doc__)))
            elif inspect.isfunction(obj):
                out.append(Doc(package, f"{name}.{attr}", inspect.getdoc(obj) or ""))
    return out


def _rows(docs: list[Doc]) -> list[tuple[Doc, str, str]]:
    """(doc, first sentence, rest) with a first sentence of 4-40 words, seen once in all the docs."""
    counts: dict[str, int] = {}
    rows = []
    for doc in docs:
        parts = _SENTENCE.split(doc.doc.strip().replace("\n", " "), maxsplit=1)
        first = parts[0].strip()
        if not 4 <= len(first.split()) <= 40:
            continue
        counts[first] = counts.get(first, 0) + 1
        rows.append((doc, first, parts[1].strip() if len(parts) > 1 else ""))
    return [r for r in rows if counts[r[1]] == 1]  # inherited docstrings would leak between splits


def _bucket(package: str, salt: str = "") -> int:
    return zlib.crc32((salt + package).encode()) % 10


def _is_test(qualname: str, salt: str = "") -> bool:
    return zlib.crc32((salt + qualname).encode()) % 100 < _TEST_SHARE


def build_pairs(
    max_target_train: int = 2400,
    max_test: int = 400,
    max_general: int = 425,
    *,
    salt: str = "",
    exclude: frozenset[str] = frozenset(),
    docs: list[Doc] | None = None,
) -> dict[str, Pairs]:
    """``{"target_train", "target_test", "general"}`` pairs from the running Python's standard library.

    Args:
        max_target_train: Cap on target training pairs.
        max_test: Cap on target test pairs.
        max_general: Cap on general pairs (rest of the docstring at least 5 words).
        salt: Prefix of the hashed names: another salt draws another partition of the packages into target and
            general, and of the target objects into train and test (``""``: the demo's).
        exclude: First sentences (queries) left out of every split.
        docs: The docstrings (default: :func:`stdlib_docs`).
    """
    rows = [r for r in _rows(stdlib_docs() if docs is None else docs) if r[1] not in exclude]
    target = [r for r in rows if _bucket(r[0].package, salt) < _TARGET_PACKAGES]
    train = [r for r in target if not _is_test(r[0].qualname, salt)][:max_target_train]
    test = [r for r in target if _is_test(r[0].qualname, salt)][:max_test]
    general = [r for r in rows if _bucket(r[0].package, salt) >= _TARGET_PACKAGES and len(r[2].split()) >= 5]
    general = general[:max_general]
    return {
        "target_train": Pairs([r[1] for r in train], [r[0].qualname for r in train]),
        "target_test": Pairs([r[1] for r in test], [r[0].qualname for r in test]),
        "general": Pairs([r[1] for r in general], [r[2] for r in general]),
    }


def demo_data(
    *,
    target_train: int = 2400,
    target_test: int = 400,
    general_test: int = 400,
    probe: int = 64,
) -> DemoData:
    """The encoder demo's splits (see :class:`DemoData`).

    Each probe takes every ``k``-th pair of the set it is held out from (spread over its packages):
    ``target_probe`` from the target training pairs, ``general_probe`` from the general pairs; ``target_train``
    and ``general_test`` are the other pairs, capped.

    Args:
        target_train: Cap on target training pairs.
        target_test: Cap on target test pairs.
        general_test: Cap on general test pairs.
        probe: Pairs in each probe set.
    """
    return _demo_splits(build_pairs(10**9, target_test, 10**9), target_train, general_test, probe)


def validation_data(
    *,
    target_train: int = 2400,
    target_test: int = 400,
    general_test: int = 400,
    probe: int = 64,
) -> DemoData:
    """A sibling of the demo's scenario for choosing recipes and defaults, with none of the demo's test pairs.

    The same construction (and sizes) as :func:`demo_data`, over another partition of the packages into target and
    general and of the target objects into train and test (salted hashes), from the pairs that the demo's default
    test sets (``target_test=400, general_test=400``) do not hold. A choice made by scoring on this data has never
    seen the data the benchmarks report on. Its probes and training pairs may be the demo's (they are not test data).

    Args:
        target_train: Cap on target training pairs.
        target_test: Cap on target test pairs (validation: the stand-in for the test set).
        general_test: Cap on general test pairs (validation).
        probe: Pairs in each probe set.
    """
    return _demo_splits(_validation_pairs(target_test), target_train, general_test, probe)


def _validation_pairs(target_test: int = 400) -> dict[str, Pairs]:
    """The validation scenario's pairs before any probe is drawn (:func:`build_pairs` under the validation salt,
    without the demo's default test pairs); the general pairs in package order."""
    docs = stdlib_docs()
    shipped = _demo_splits(build_pairs(10**9, 400, 10**9, docs=docs), 10**9, 400, 64)
    held = frozenset(shipped.target_test.queries) | frozenset(shipped.general_test.queries)
    return build_pairs(10**9, target_test, 10**9, salt=_VALIDATION_SALT, exclude=held, docs=docs)


def _demo_splits(pairs: dict[str, Pairs], target_train: int, general_test: int, probe: int) -> DemoData:
    """The probes spread over the target training and the general pairs; the rest capped."""
    target_probe, train = _spread(pairs["target_train"], probe)
    general_probe, general = _spread(pairs["general"], probe)
    return DemoData(
        target_train=train.head(target_train),
        target_probe=target_probe,
        target_test=pairs["target_test"],
        general_probe=general_probe,
        general_test=general.head(general_test),
    )


def _spread(pairs: Pairs, n: int) -> tuple[Pairs, Pairs]:
    """Every ``k``-th of ``pairs`` (``n`` of them, spread evenly) and the others, both in their order."""
    step = max(2, len(pairs) // max(1, n))
    picked = set(range(0, len(pairs), step)[:n])
    rest = [i for i in range(len(pairs)) if i not in picked]
    return _take(pairs, sorted(picked)), _take(pairs, rest)


def _take(pairs: Pairs, indices: list[int]) -> Pairs:
    return Pairs([pairs.queries[i] for i in indices], [pairs.passages[i] for i in indices])


def fingerprint(data: DemoData | dict[str, Pairs]) -> str:
    """A short SHA-256 of every pair, to tell whether two runs scored the same text."""
    sets = data.__dict__ if isinstance(data, DemoData) else data
    digest = hashlib.sha256()
    for name in sorted(sets):
        for q, p in zip(sets[name].queries, sets[name].passages):
            digest.update(f"{name}\x00{q}\x00{p}\x01".encode())
    return digest.hexdigest()[:16]


if __name__ == "__main__":  # the child of stdlib_docs(): print the docs as JSON rows
    json.dump([astuple(doc) for doc in _collect_docs()], sys.stdout)
