"""The decoder demo's text: prose and stdlib code, split by document name."""

from __future__ import annotations

import ast

import pytest

from resilient_tune.demo.text import (
    SPLITS,
    code_documents,
    corpus,
    prose_documents,
    split_of,
    text_fingerprint,
)

SOURCE = '''"""Module docstring: prose that must not leak."""
import os  # a comment


class A:
    """Class docstring."""

    def f(self, x):
        """Method docstring."""
        return x + 1  # trailing comment


def g():
    """Only a docstring."""
'''


def test_split_is_stable_and_about_80_10_10():
    names = [f"doc:{i}" for i in range(5000)]
    splits = [split_of(n) for n in names]
    assert splits == [split_of(n) for n in names]
    shares = {s: splits.count(s) / len(names) for s in SPLITS}
    assert 0.77 < shares["train"] < 0.83 and 0.08 < shares["val"] < 0.12 and 0.08 < shares["test"] < 0.12


def test_code_documents_drop_docstrings_and_comments(tmp_path):
    (tmp_path / "mod.py").write_text(SOURCE, encoding="utf-8")
    (tmp_path / "broken.py").write_text("def (:\n", encoding="utf-8")  # skipped, not fatal
    (tmp_path / "notes.txt").write_text("not python", encoding="utf-8")
    docs = code_documents(tmp_path)
    assert [name for name, _ in docs] == ["code:mod.py"]
    code = docs[0][1]
    assert "docstring" not in code.lower() and "comment" not in code and "#" not in code
    assert "return x + 1" in code and "import os" in code
    tree = ast.parse(code)  # still valid Python; g's empty body became pass
    g = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "g")
    assert isinstance(g.body[0], ast.Pass)


def test_code_documents_without_source_say_what_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no Python source files in .*install"):
        code_documents(tmp_path)


def test_the_real_domains_are_large_distinct_and_split():
    prose, code = prose_documents(), code_documents()
    assert len(prose) > 1000 and len(code) > 50
    assert all(n.startswith(("topic:", "doc:")) for n, _ in prose) and all(
        n.startswith("code:") for n, _ in code
    )
    texts = corpus(code).texts
    assert min(len(texts[s]) for s in SPLITS) > 50_000
    assert '"""' not in texts["train"][:200_000]  # no docstrings left in the code domain
    # every document lands in exactly the split its name says
    first_val = next(t for n, t in code if split_of(n) == "val")
    assert first_val in texts["val"] and first_val not in texts["train"]


def test_corpus_and_fingerprint():
    docs = [("a", "one"), ("b", "two"), ("c", "three")]
    c = corpus(docs, split=lambda name: {"a": "train", "b": "train", "c": "test"}[name])
    assert c.texts == {"train": "one\n\ntwo", "val": "", "test": "three"}
    assert c.sizes() == {"train": 8, "val": 0, "test": 5}
    same = corpus(list(docs), split=lambda name: {"a": "train", "b": "train", "c": "test"}[name])
    assert text_fingerprint(c) == text_fingerprint(same)
    other = corpus([("a", "one!"), ("b", "two"), ("c", "three")], split=lambda n: "train")
    assert text_fingerprint(c) != text_fingerprint(other)
