"""benchmarks/probe_size_validation.py: the probe split spread over the set, the two probe batches, each probe
set's α and judgement from per-pair losses, the table per size and statistic, and a smoke run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import probe_size_validation as ps  # benchmarks/ is a folder of scripts, not a package

from resilient_tune.demo.data import Pairs


def test_spread_indices_cover_the_set_from_first_to_end() -> None:
    assert ps.spread_indices(10, 5) == [0, 2, 4, 6, 8]
    assert ps.spread_indices(381, 128)[-1] >= 378  # the last packages are probed too
    assert len(set(ps.spread_indices(381, 128))) == 128
    with pytest.raises(ValueError, match="k=0"):
        ps.spread_indices(10, 0)


def test_the_split_and_the_halves_keep_every_pair_once_in_order() -> None:
    pairs = Pairs([f"q{i}" for i in range(9)], [f"p{i}" for i in range(9)])
    probes, held = ps.probe_split(pairs, 4)
    assert probes.queries == ["q0", "q2", "q4", "q6"] and probes.passages == ["p0", "p2", "p4", "p6"]
    assert held.queries == ["q1", "q3", "q5", "q7", "q8"]
    even, odd = ps.halves(probes)
    assert (even.queries, odd.queries) == (["q0", "q4"], ["q2", "q6"])
    assert ps.probe_sets(4) == {"2a": [0, 1], "2b": [2, 3], "4": [0, 1, 2, 3]}


def _row() -> dict:
    # probe batch a sees no forgetting (its loss falls), batch b sees a steep rise: the halves aim apart
    alphas = [i / 20 for i in range(21)]
    losses = {f"{a:g}": [2.0 * (1 - 0.05 * a)] * 2 + [2.0 * (1 + 0.2 * a)] * 2 for a in alphas}
    scores = {
        f"{a:g}": {"target": 0.5 + 0.2 * a, "general": 0.4 - 0.05 * a, "general_loss": 1.0 + 0.1 * a}
        for a in alphas
    }
    return {"name": "r", "probe_losses": losses, "scores": scores}


def test_each_probe_set_aims_from_its_own_losses() -> None:
    judged = ps.judge_sets(_row())
    assert set(judged) == {"2a", "2b", "4"}
    assert judged["2a"]["0.5"]["alpha"] == 1.0  # never over budget on its probes
    assert judged["2b"]["0.5"]["alpha"] == pytest.approx(0.25)  # 2 × (1 + 0.2α) <= 2.1
    assert judged["4"]["0.5"]["alpha"] == pytest.approx(0.65)  # the mean of both: 2 + 0.15α <= 2.1
    assert judged["2b"]["0.5"]["within_budget"] and not judged["2a"]["0.5"]["within_budget"]


def test_the_table_counts_both_halves_as_trials_of_the_smaller_size() -> None:
    table = ps.summarize([_row(), _row()])
    small = [t for t in table if t["probes"] == 2]
    assert [t["trials"] for t in small] == [4, 4, 4] and [t["level"] for t in small] == [0.5, 0.7, 0.95]
    assert {t["probes"] for t in table} == {2, 4}
    assert "| 2 | mean |" in ps.render([_row()], table)


@pytest.mark.slow
def test_smoke_run_writes_each_run_and_reuses_them(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert ps.main(["--smoke", "--seeds", "0", "--out", str(tmp_path)]) == 0
    first = capsys.readouterr().out
    assert "| 8 | mean |" in first and "| 16 | 0.95 |" in first
    assert ps.main(["--smoke", "--seeds", "0", "--out", str(tmp_path), "--reuse"]) == 0
    assert capsys.readouterr().out == first
