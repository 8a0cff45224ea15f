"""The demo's offline text: standard-library docstring pairs, split by package, held-out probes, stable."""

from __future__ import annotations

import logging

import pytest

from resilient_tune.demo import data as demo_data_module
from resilient_tune.demo.data import (
    DemoData,
    Pairs,
    build_pairs,
    demo_data,
    fingerprint,
    stdlib_docs,
    validation_data,
)


@pytest.fixture(scope="module")
def docs():
    return stdlib_docs()


@pytest.fixture(scope="module")
def splits(docs, monkeypatch_module):
    monkeypatch_module.setattr(demo_data_module, "stdlib_docs", lambda: docs)  # collect once per module
    return demo_data()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _package(qualname: str) -> str:
    return qualname.split(".")[0]


def test_docs_are_public_stdlib_objects(docs):
    assert len(docs) > 1000
    for doc in docs:
        assert doc.qualname.split(".")[0] == doc.package
        assert not any(part.startswith("_") for part in doc.qualname.split("."))
        assert doc.package not in {"test", "idlelib", "tkinter", "antigravity", "this"}


def test_docs_ignore_what_the_caller_imported_or_patched(docs):
    """Third-party libraries patch the stdlib (transformers adds Logger methods): the text must not change."""
    logging.Logger.resilient_tune_probe = lambda self: None  # type: ignore[attr-defined]
    logging.Logger.resilient_tune_probe.__doc__ = "A method a library bolted onto the standard logger."
    try:
        again = stdlib_docs()
    finally:
        del logging.Logger.resilient_tune_probe
    assert again == docs
    assert not any(d.qualname.endswith("resilient_tune_probe") for d in again)


def test_target_and_general_come_from_different_packages(splits, docs):
    package_of = {first: doc.package for doc, first, _ in demo_data_module._rows(docs)}  # unique sentences
    target = {package_of[q] for pairs in (splits.target_train, splits.target_test) for q in pairs.queries}
    general = {package_of[q] for pairs in (splits.general_test, splits.general_probe) for q in pairs.queries}
    assert len(target) > 20 and len(general) > 10
    assert not target & general
    assert {_package(p) for p in splits.target_test.passages} <= target


def test_target_test_objects_are_never_trained_on(splits):
    train = set(splits.target_train.passages) | set(splits.target_probe.passages)
    assert not train & set(splits.target_test.passages)
    assert not set(splits.target_train.queries) & set(splits.target_test.queries)


def test_probes_are_held_out_from_what_they_sit_next_to(splits):
    assert not set(splits.target_probe.queries) & set(splits.target_train.queries)
    assert not set(splits.general_probe.queries) & set(splits.general_test.queries)
    assert {_package(p) for p in splits.target_probe.passages} <= {
        _package(p) for p in build_pairs()["target_train"].passages
    }


def test_sizes_and_caps(docs, monkeypatch):
    monkeypatch.setattr(demo_data_module, "stdlib_docs", lambda: docs)
    small = demo_data(target_train=100, target_test=30, general_test=20, probe=8)
    assert small.sizes() == {
        "target_train": 100,
        "target_probe": 8,
        "target_test": 30,
        "general_probe": 8,
        "general_test": 20,
    }


def test_pairs_are_well_formed(splits):
    for name, pairs in splits.__dict__.items():
        assert len(pairs.queries) == len(pairs.passages) > 0, name
        for q in pairs.queries:
            assert 4 <= len(q.split()) <= 40
    for p in splits.general_test.passages:
        assert len(p.split()) >= 5
    queries = [q for pairs in splits.__dict__.values() for q in pairs.queries]
    assert len(queries) == len(set(queries))  # repeated first sentences were dropped everywhere


def test_fingerprint_is_stable_and_sensitive(splits):
    assert fingerprint(splits) == fingerprint(DemoData(**splits.__dict__))
    changed = dict(splits.__dict__)
    changed["general_test"] = Pairs(
        splits.general_test.queries, [*splits.general_test.passages[:-1], "something else"]
    )
    assert fingerprint(DemoData(**changed)) != fingerprint(splits)


def test_pairs_head_and_split():
    pairs = Pairs(["a", "b", "c"], ["1", "2", "3"])
    first, rest = pairs.split(1)
    assert (first.queries, rest.passages) == (["a"], ["2", "3"])
    assert len(pairs.head(2)) == 2


def test_validation_data_holds_none_of_the_demos_test_pairs(splits, docs, monkeypatch):
    monkeypatch.setattr(demo_data_module, "stdlib_docs", lambda: docs)
    val = validation_data()
    tested = set(splits.target_test.queries) | set(splits.general_test.queries)
    for name, pairs in val.__dict__.items():
        assert len(pairs) > 0, name
        assert not set(pairs.queries) & tested, name  # no split of it is a demo test pair
    # another partition of the packages: a different scenario of the same construction, with its own hold-outs
    package_of = {first: doc.package for doc, first, _ in demo_data_module._rows(docs)}
    target = {package_of[q] for q in val.target_train.queries + val.target_test.queries}
    general = {package_of[q] for q in val.general_test.queries + val.general_probe.queries}
    assert not target & general
    assert target != {package_of[q] for q in splits.target_train.queries + splits.target_test.queries}
    assert not set(val.target_train.passages) & set(val.target_test.passages)
    assert not set(val.general_probe.queries) & set(val.general_test.queries)
    assert fingerprint(validation_data()) == fingerprint(val)  # stable
    assert val.sizes()["general_probe"] == 64 and val.sizes()["general_test"] > 200
