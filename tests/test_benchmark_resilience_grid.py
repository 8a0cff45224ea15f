"""benchmarks/resilience_grid.py: the grid's runs, the per-run figures from a demo report (held-out general loss against
the budget, gain kept, pairs, domination), the aggregate with its sign test, and a smoke run of the decoder grid."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import resilience_grid as grid  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


def _report(static_loss: float, online_loss: float, online_alpha: float = 0.4) -> dict:
    def row(alpha: float, target: float, general: float, loss: float) -> dict:
        return {
            "alpha": alpha,
            "target": target,
            "general": general,
            "test_loss": {"target": 1.0, "general": loss},
        }

    return {
        "policy": {"name": "budget", "drift_budget": 0.05},
        "models": {
            "base": row(0.0, 0.50, 0.60, 2.0),
            "fine_tuned": row(1.0, 0.70, 0.40, 3.0),
            "static": row(0.5, 0.62, 0.55, static_loss),
            "resilient": row(online_alpha, 0.60, 0.58, online_loss),
        },
        "curve": [
            {"alpha": 0.0, "target": 0.50, "general": 0.60},
            {"alpha": 0.2, "target": 0.55, "general": 0.60},
            {"alpha": online_alpha, "target": 0.60, "general": 0.58},
            {"alpha": 0.5, "target": 0.62, "general": 0.55},
            {"alpha": 0.8, "target": 0.66, "general": 0.50},
            {"alpha": 1.0, "target": 0.70, "general": 0.40},
        ],
        "hits": {
            "resilient": {"target": "1100", "general": "1110"},
            "static": {"target": "1010", "general": "1100"},
        },
        "history": [{"alpha": 0.5, "probe_passes": 4}, {"alpha": online_alpha, "probe_passes": 2}],
        "timing": {"total": 12.0},
    }


RUN = {"name": "encoder-lr0.0001-s75-seed0", "scenario": "encoder", "lr": 1e-4, "steps": 75, "seed": 0}


def test_the_plan_covers_the_grid_with_each_scenarios_recipe() -> None:
    runs = grid.plan(["encoder", "decoder"], [0, 1], smoke=False)
    assert len(runs) == 2 * 3 * 2 * 2
    assert {(r["lr"], r["steps"]) for r in runs if r["scenario"] == "encoder"} == {
        (lr, s) for lr in (3e-5, 1e-4, 3e-4) for s in (75, 200)
    }
    assert {r["decisions"] for r in runs if r["steps"] == 200} == {4}
    assert len({r["name"] for r in runs}) == len(runs)
    assert runs[0]["name"] == "encoder-lr3e-05-s75-seed0"


def test_a_run_reports_the_held_out_loss_against_the_budget_and_the_gain_kept() -> None:
    s = grid.summarize_run(_report(static_loss=2.2, online_loss=2.08), RUN)
    static, online = s["models"]["static"], s["models"]["resilient"]
    assert static["general_loss_ratio"] == pytest.approx(1.1) and static["budget_honoured"] is False
    assert online["general_loss_ratio"] == pytest.approx(1.04) and online["budget_honoured"] is True
    assert static["target_gain_kept"] == pytest.approx(0.6) and online["target_gain_kept"] == pytest.approx(
        0.5
    )
    assert online["general_vs_base"] == pytest.approx(-0.02 / 0.6)
    assert s["online_vs_static_pairs"]["general"] == {"online_only": 1, "static_only": 0, "p": 1.0}
    assert s["probe_passes"] == [4, 2] and s["budget"] == 0.05


def test_the_spread_chunk_loss_is_judged_against_the_bases_own_spread_loss() -> None:
    report = _report(static_loss=2.2, online_loss=2.08)
    assert grid.summarize_run(report, RUN)["models"]["static"]["budget_honoured_spread"] is None  # not measured
    spread = {"base": 1.0, "fine_tuned": 1.3, "static": 1.04, "resilient": 1.06}
    for name, loss in spread.items():
        report["models"][name]["test_loss_spread"] = {"target": 1.0, "general": loss}
    rows = grid.summarize_run(report, RUN)["models"]
    # consecutive chunks: static over (1.1x), online within (1.04x); spread chunks: the reverse
    assert (rows["static"]["budget_honoured"], rows["static"]["budget_honoured_spread"]) == (False, True)
    assert (rows["resilient"]["budget_honoured"], rows["resilient"]["budget_honoured_spread"]) == (True, False)
    totals = grid.aggregate([grid.summarize_run(report, RUN)])["all"]
    assert (totals["static"]["budget_honoured_spread"], totals["resilient"]["budget_honoured_spread"]) == (1, 0)


def test_domination_needs_as_good_on_one_axis_and_more_than_two_points_on_the_other() -> None:
    chosen = {"alpha": 0.4, "target": 0.60, "general": 0.58}
    curve = [
        {"alpha": 0.4, "target": 0.60, "general": 0.58},  # itself
        {"alpha": 0.45, "target": 0.63, "general": 0.58},  # +3 target, same general: dominates
        {"alpha": 0.5, "target": 0.62, "general": 0.58},  # +2 target: not more than 2 points
        {"alpha": 0.2, "target": 0.60, "general": 0.605},  # +2.5 general, same target: dominates
        {
            "alpha": 0.8,
            "target": 0.70,
            "general": 0.50,
        },  # better target, worse general: a trade, not domination
    ]
    assert [d["alpha"] for d in grid.dominated_by(curve, chosen)] == [0.45, 0.2]


def test_the_sign_test_is_exact_and_two_sided() -> None:
    assert grid.sign_test(0, 0) == 1.0
    assert grid.sign_test(6, 0) == pytest.approx(2 / 64)
    assert grid.sign_test(1, 5) == pytest.approx(2 * (1 + 6) / 64)
    assert grid.sign_test(3, 3) == 1.0


def test_the_aggregate_counts_budgets_honoured_wins_and_dominated_runs() -> None:
    a = grid.summarize_run(_report(2.2, 2.08), RUN)
    b = grid.summarize_run(_report(2.05, 2.3, online_alpha=0.45), {**RUN, "name": "b", "scenario": "decoder"})
    totals = grid.aggregate([a, b])
    assert set(totals) == {"encoder", "decoder", "all"}
    everything = totals["all"]
    assert everything["runs"] == 2
    assert (everything["static"]["budget_honoured"], everything["resilient"]["budget_honoured"]) == (1, 1)
    assert everything["online_vs_static_general"]["wins"] == 2  # 0.58 against 0.55 in both
    assert everything["online_vs_static_target"]["losses"] == 2
    assert everything["resilient"]["mean_gain_kept"] == pytest.approx(0.5)
    assert not math.isnan(everything["online_vs_static_target"]["sign_p"])
    assert "| encoder-lr0.0001-s75-seed0 |" in grid.render([a, b], totals)


@pytest.mark.slow
def test_a_smoke_run_of_the_decoder_grid_writes_its_tables_json_and_plot(tmp_path: Path, capsys) -> None:
    pytest.importorskip("transformers")
    assert grid.main(["--scenarios", "decoder", "--seeds", "0", "--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "grid.json").read_text())
    assert len(result["runs"]) == 6 and result["smoke"] is True
    first = result["runs"][0]
    assert first["models"]["resilient"]["general_loss_ratio"] is not None
    later = [r for r in result["runs"][1:]]
    # every later run fine-tuned the first run's pre-trained base, not a new one
    assert all(not (tmp_path / r["name"] / "base").exists() for r in later)
    assert (tmp_path / result["runs"][0]["name"] / "base").is_dir()
    assert "budget honoured" in capsys.readouterr().out


def test_a_metric_budget_reruns_chosen_runs_under_their_own_names() -> None:
    runs = grid.plan(["encoder"], [0, 1], smoke=False, metric_drop=0.02, only=["encoder-lr0.0003-s75-seed1"])
    assert [r["name"] for r in runs] == ["encoder-lr0.0003-s75-seed1-metric0.02"]
    assert runs[0]["metric_drop"] == 0.02 and runs[0]["lr"] == 3e-4
    with pytest.raises(SystemExit, match="not runs of this grid"):
        grid.plan(["encoder"], [0], smoke=False, only=["encoder-lr9-s1-seed0"])
    s = grid.summarize_run(_report(2.2, 2.08), {**RUN, "metric_drop": 0.01})
    assert s["models"]["resilient"]["metric_honoured"] is False  # 0.58 against a floor of 0.60 - 0.01
    assert s["models"]["static"]["metric_honoured"] is False
    assert grid.summarize_run(_report(2.2, 2.08), RUN)["models"]["resilient"]["metric_honoured"] is None


def test_a_confidence_bound_reruns_the_grid_under_its_own_names() -> None:
    runs = grid.plan(["encoder"], [1], smoke=False, only=["encoder-lr0.0003-s75-seed1"], confidence=0.95)
    assert [r["name"] for r in runs] == ["encoder-lr0.0003-s75-seed1-conf0.95"]
    assert runs[0]["confidence"] == 0.95 and runs[0]["metric_drop"] is None
    assert grid.summarize_run(_report(2.2, 2.08), {**RUN, "confidence": 0.95})["confidence"] == 0.95
