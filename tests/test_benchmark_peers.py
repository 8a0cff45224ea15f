"""benchmarks/peers.py: the per-run figures of each recipe (α, base/peer weights, held-out scores, general loss against
the budget, gain kept, paired tests), the aggregate's means and win counts, the tables, and a smoke run end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import peers  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


def _scores(target: float, general: float, loss: float) -> dict:
    n = 10  # ten test characters per task: hits as many as the score says
    return {
        "target": target,
        "general": general,
        "general_loss": loss,
        "target_loss": 1.0,
        "target_hits": [i < round(target * n) for i in range(n)],
        "general_hits": [i < round(general * n) for i in range(n)],
    }


SCORES = {
    "base": _scores(0.5, 0.6, 2.0),
    "fine_tuned": _scores(0.8, 0.3, 2.6),
    "peer": _scores(0.5, 0.7, 1.9),
    "static": _scores(0.7, 0.5, 2.1),
    "budget": _scores(0.6, 0.6, 2.03),
    "cocktail": _scores(0.7, 0.6, 2.05),
    "budget+peer": _scores(0.7, 0.7, 2.0),
}
ENTRIES = {
    "static": {"alpha": 0.5},
    "budget": {"alpha": 0.35},
    "cocktail": {"alpha": 0.5, "weights": [0.6, 0.4]},
    "budget+peer": {"alpha": 0.4, "weights": [0.5, 0.5]},
}


def test_a_run_reports_each_recipe_against_the_base_and_the_budget() -> None:
    run = peers.summarize("r", 1e-3, 0, SCORES, ENTRIES)
    m = run["models"]
    assert m["base"]["alpha"] == 0.0 and m["fine_tuned"]["alpha"] == 1.0 and m["peer"]["alpha"] is None
    assert m["cocktail"]["weights"] == [0.6, 0.4]
    assert m["budget"]["general_loss_ratio"] == pytest.approx(1.015) and m["budget"]["budget_honoured"]
    assert m["static"]["general_loss_ratio"] == pytest.approx(1.05) and not m["static"]["budget_honoured"]
    assert m["static"]["target_gain_kept"] == pytest.approx(2 / 3)
    assert m["budget+peer"]["general_vs_base"] == pytest.approx(1 / 6)
    pairs = run["pairs"]["budget+peer vs budget"]
    assert pairs["general"]["a_only"] == 1 and pairs["general"]["b_only"] == 0
    assert pairs["target"]["a_only"] == 1 and pairs["target"]["b_only"] == 0


def test_the_aggregate_averages_and_counts_wins() -> None:
    better = peers.summarize("a", 1e-3, 0, SCORES, ENTRIES)
    worse_scores = {**SCORES, "cocktail": _scores(0.6, 0.4, 2.2)}
    worse = peers.summarize("b", 1e-3, 1, worse_scores, ENTRIES)
    totals = peers.aggregate([better, worse])
    assert totals["runs"] == 2
    assert totals["means"]["cocktail"]["general"] == pytest.approx(0.5)
    assert totals["means"]["budget"]["budget_honoured"] == 2 and totals["means"]["static"]["budget_honoured"] == 0
    assert totals["wins"]["cocktail vs static"]["general"] == {"better": 1, "worse": 1, "significant": 0}
    text = peers.render([better, worse], totals)
    assert "| a | cocktail | 0.50 | 0.60 / 0.40 | 70.0 | 60.0 | 1.025 | 67% |" in text
    assert "| budget+peer vs budget | general | 2 | 0 | 0 |" in text


def test_a_smoke_run_fine_tunes_a_peer_and_scores_every_recipe(tmp_path: Path, capsys) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "peers"
    assert peers.main(["--smoke", "--seeds", "0", "--lrs", "1e-3", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # stdout is the result alone (the Trainer's prints go to stderr)
    assert result == json.loads((out / "peers.json").read_text())
    (run,) = result["runs"]
    assert set(run["models"]) == {"base", "fine_tuned", "peer", *peers.RECIPES}
    assert run["models"]["cocktail"]["weights"] is not None and len(run["models"]["cocktail"]["weights"]) == 2
    assert run["models"]["static"]["alpha"] == 0.5
    for recipe in peers.RECIPES:  # each recipe's folder loads with from_pretrained and carries its recipe
        folder = out / run["name"] / recipe.replace("+", "-")
        assert (folder / "model.safetensors").is_file() and (folder / "cocktail.json").is_file()
    assert (out / "base" / "config.json").is_file() and (out / "peer-seed0" / "config.json").is_file()
