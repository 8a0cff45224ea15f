"""benchmarks/grid_rejudge.py: which α each statistic chose per run, the judgement on a shared front with the
held-out loss in both chunk layouts, the aggregate, and the stop on a re-score that differs from a grid's record."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import grid_rejudge as rj  # benchmarks/ is a folder of scripts, not a package


def _grid_run(confidence: float | None, alpha: float, scenario: str = "encoder") -> dict:
    return {
        "name": "x", "scenario": scenario, "lr": 1e-4, "steps": 75, "seed": 1, "confidence": confidence,
        "metric_drop": None,
        "models": {"fine_tuned": {"alpha": 1.0, "target": 0.70, "general": 0.36},
                   "resilient": {"alpha": alpha, "target": 0.66, "general": 0.40}},
    }  # fmt: skip


def _scores() -> dict:
    # target rises, flat from 0.6; general peaks at 0.4 then falls; losses: spread and consecutive differ
    rows = {
        0.0: (0.50, 0.40, 2.00, 1.00), 0.2: (0.60, 0.41, 2.02, 1.01), 0.4: (0.66, 0.42, 2.05, 1.02),
        0.5: (0.67, 0.41, 2.08, 1.04), 0.6: (0.69, 0.40, 2.12, 1.07), 0.8: (0.69, 0.38, 2.20, 1.12),
        0.9: (0.69, 0.37, 2.25, 1.15), 1.0: (0.70, 0.36, 2.30, 1.20),
    }  # fmt: skip
    return {a: {"target": t, "general": g, "general_loss": c, "general_loss_spread": s} for a, (t, g, c, s) in rows.items()}


def test_each_statistic_is_read_from_its_grid_by_plain_run_name() -> None:
    results = [
        {"runs": [_grid_run(None, 0.9), _grid_run(None, 0.5, scenario="decoder")]},
        {"runs": [_grid_run(0.95, 0.4)]},
        {"runs": [{**_grid_run(None, 0.3), "metric_drop": 0.01}]},  # a metric budget: not a loss statistic
    ]
    chosen = rj.chosen_alphas(results)
    assert list(chosen) == ["encoder-lr0.0001-s75-seed1"]
    assert {k: v["models"]["resilient"]["alpha"] for k, v in chosen["encoder-lr0.0001-s75-seed1"].items()} == {
        "mean": 0.9,
        "0.95": 0.4,
    }


def test_judging_uses_each_layouts_own_base_and_the_shared_front() -> None:
    scores = _scores()
    front = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 1.0]
    high = rj.judge(scores, 0.9, 0.05, front)
    assert high["loss_ratio_spread"] == pytest.approx(1.15) and not high["within_budget_spread"]
    assert high["loss_ratio_consecutive"] == pytest.approx(1.125) and not high["within_budget_consecutive"]
    assert high["dominated_by"] == [0.6]  # as good on target, 3 points better on general
    mid = rj.judge(scores, 0.4, 0.05, front)
    assert mid["within_budget_spread"] and mid["within_budget_consecutive"] and mid["dominated_by"] == []
    assert mid["gain_kept"] == pytest.approx(0.8) and mid["general_vs_base"] == pytest.approx(0.02)
    low = rj.judge(scores, 0.0, 0.05, front)
    assert low["dominated_by"] == [0.2, 0.4, 0.5, 0.6]  # more target for general as good


def test_the_aggregate_counts_per_statistic() -> None:
    scores, front = _scores(), [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 1.0]
    rows = [{"name": "r", "judged": {"mean": rj.judge(scores, 0.9, 0.05, front),
                                     "0.7": rj.judge(scores, 0.4, 0.05, front)}}]  # fmt: skip
    table = rj.aggregate(rows)
    assert [t["statistic"] for t in table] == ["mean", "0.7"]
    assert (table[0]["dominated"], table[0]["within_budget_spread"]) == (1, 0)
    assert (table[1]["dominated"], table[1]["within_budget_spread"], table[1]["within_budget_consecutive"]) == (0, 1, 1)
    assert "| mean | 1/1 | 0/1 |" in rj.render(rows, table)


def test_a_re_score_that_differs_from_the_grids_record_stops_the_script() -> None:
    scores = _scores()
    run = _grid_run(None, 0.4)
    run["models"]["fine_tuned"]["general"] = 0.36
    run["models"]["resilient"]["general"] = 0.42
    rj.check(scores, {"mean": run})  # matches
    run["models"]["resilient"]["target"] = 0.65
    with pytest.raises(SystemExit, match=r"re-scored 0\.6600"):
        rj.check(scores, {"mean": run})
