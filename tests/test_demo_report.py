"""The demo's report: statistics, report.json, the text table, the plot, and `resilient-tune report`."""

from __future__ import annotations

import json

import pytest

from resilient_tune.cli import main
from resilient_tune.demo.report import (
    build_report,
    format_report,
    gain_kept,
    load_run,
    mcnemar,
    render_run,
    write_plot,
    write_report,
)
from resilient_tune.errors import UsageError


def _hits(pattern: str) -> list[bool]:
    return [c == "1" for c in pattern]


# base / fine-tuned / resilient / static on 10 target and 10 general examples
HITS = {
    "base": {"target": _hits("1100000000"), "general": _hits("1111100000")},
    "fine_tuned": {"target": _hits("1111110000"), "general": _hits("1110000000")},
    "resilient": {"target": _hits("1111100000"), "general": _hits("1111100000")},
    "static": {"target": _hits("1111000000"), "general": _hits("1111110000")},
}
ALPHAS = {"base": 0.0, "fine_tuned": 1.0, "resilient": 0.75, "static": 0.5}
HISTORY = [
    {"step": 5, "alpha": 1.0, "general_loss": 1.0, "general_loss_base": 1.0, "drift_per_layer": {"x": 1.0}},
    {"step": 10, "alpha": 0.75, "general_loss": 1.04, "general_loss_base": 1.0, "target_loss": 0.5},
]


def _report(**kw):
    curve = {0.0: HITS["base"], 0.5: HITS["static"], 0.75: HITS["resilient"], 1.0: HITS["fine_tuned"]}
    return build_report(
        scenario="encoder",
        hits=HITS,
        alphas=ALPHAS,
        curve=curve,
        history=HISTORY,
        drift_relative=0.02,
        policy={"name": "budget", "drift_budget": 0.05},
        config={"steps": 10},
        **kw,
    )


def test_mcnemar_exact_values():
    assert mcnemar(_hits("1110"), _hits("0000")) == {"a_only": 3, "b_only": 0, "p": 0.25}
    # 8 discordant pairs split 6 / 2: p = 2 · (C(8,0) + C(8,1) + C(8,2)) / 2^8 = 2 · 37 / 256
    a = _hits("1111110000")
    b = _hits("0000001100")
    result = mcnemar(a, b)
    assert (result["a_only"], result["b_only"]) == (6, 2)
    assert result["p"] == pytest.approx(2 * 37 / 256)
    assert mcnemar(a, a)["p"] == 1.0
    assert mcnemar(_hits("1" * 10), _hits("0" * 10))["p"] == pytest.approx(2 / 1024)


def test_mcnemar_refuses_unpaired_lists():
    with pytest.raises(UsageError, match="differ in length"):
        mcnemar([True], [True, False])


def test_gain_kept_and_drop_recovered():
    models = {
        "base": {"target": 0.5, "general": 0.40},
        "fine_tuned": {"target": 0.7, "general": 0.36},
        "mix": {"target": 0.65, "general": 0.41},
    }
    got = gain_kept(models, "mix")
    assert got["target_gain_kept"] == pytest.approx(0.75)
    assert got["general_drop_recovered"] == pytest.approx(1.25)  # above the base
    flat = {**models, "fine_tuned": {"target": 0.5, "general": 0.42}}
    assert gain_kept(flat, "mix") == {"target_gain_kept": None, "general_drop_recovered": None}


def test_build_report_scores_alpha_drift_and_hits():
    report = _report()
    models = report["models"]
    assert set(models) == {"base", "fine_tuned", "resilient", "static"}
    assert models["base"] == {"target": 0.2, "general": 0.5, "alpha": 0.0, "drift": 0.0}
    assert models["fine_tuned"]["target"] == 0.6 and models["fine_tuned"]["general"] == 0.3
    assert models["resilient"]["drift"] == pytest.approx(0.75 * 0.02)
    assert report["alpha"] == 0.75
    assert report["summary"]["resilient"]["target_gain_kept"] == pytest.approx(0.75)
    assert report["summary"]["resilient"]["general_drop_recovered"] == pytest.approx(1.0)
    assert [p["alpha"] for p in report["curve"]] == [0.0, 0.5, 0.75, 1.0]
    assert report["hits"]["fine_tuned"]["general"] == "1110000000"
    assert report["significance"]["general: fine_tuned vs base"] == mcnemar(
        HITS["fine_tuned"]["general"], HITS["base"]["general"]
    )
    assert "drift_per_layer" not in report["history"][0]
    assert report["config"] == {"steps": 10}


def test_build_report_keeps_the_slerp_curve_and_its_hits():
    assert "slerp_curve" not in _report() and "slerp_hits" not in _report()  # none scored: no keys
    report = _report(slerp_curve={0.5: HITS["resilient"], 0.25: HITS["base"]})
    assert report["slerp_curve"] == [
        {"alpha": 0.25, "target": 0.2, "general": 0.5},
        {"alpha": 0.5, "target": 0.5, "general": 0.5},
    ]
    assert report["slerp_hits"]["0.5"] == {"target": "1111100000", "general": "1111100000"}
    assert json.loads(json.dumps(report)) == report


def test_slerp_mix_is_the_engine_slerp_between_base_and_tuned():
    import torch

    from resilient_tune.demo._scenario import mix, slerp_mix
    from resilient_tune.merging import merge_tensor

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 3, generator=g), "ids": torch.arange(3)}
    tuned = {"w": torch.randn(4, 3, generator=g), "ids": torch.arange(3)}
    for a in (0.0, 1.0):
        assert torch.allclose(slerp_mix(base, tuned, a)["w"], mix(base, tuned, a)["w"], atol=1e-6)
    half = slerp_mix(base, tuned, 0.5)
    expected = merge_tensor("slerp", [tuned["w"]], [1.0], base=base["w"], options={"t": 0.5})
    assert torch.equal(half["w"], expected) and torch.equal(half["ids"], tuned["ids"])
    linear = mix(base, tuned, 0.5)["w"]
    assert not torch.allclose(half["w"], linear)  # two random tensors are far from parallel: a real arc
    assert torch.linalg.vector_norm(half["w"]) > torch.linalg.vector_norm(linear)  # SLERP keeps the norm up


def test_build_report_needs_every_model_and_task():
    with pytest.raises(UsageError, match="static/general"):
        build_report(
            scenario="encoder",
            hits={**HITS, "static": {"target": HITS["static"]["target"]}},
            alphas=ALPHAS,
            curve={},
        )


def test_format_report_table():
    text = format_report(_report())
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("fine-tuned"))
    assert row.split() == ["fine-tuned", "1.00", "0.0200", "60.0", "30.0"]
    assert any(line.startswith("resilient (budget)") and "0.75" in line for line in lines)
    assert any(line.startswith("static α=0.5") for line in lines)
    assert "fine-tuned general -40.0% relative to base" in text
    assert "resilient: kept 75% of the target gain, recovered 100% of the general drop" in text
    assert "1.00 → 0.75" in text


def test_write_report_and_plot_round_trip(tmp_path):
    pytest.importorskip("matplotlib")
    report = _report()
    write_report(tmp_path, report)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    png = write_plot(tmp_path, report)
    assert png == tmp_path / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp"))


def test_load_run_kinds(tmp_path):
    demo = tmp_path / "demo"
    write_report(demo, _report())
    assert load_run(demo)[0] == "demo"
    run = tmp_path / "run"
    run.mkdir()
    (run / "cocktail_report.json").write_text(json.dumps({"history": HISTORY}))
    kind, report = load_run(run)
    assert kind == "history" and report["history"][1]["alpha"] == 0.75
    checkpoint = tmp_path / "checkpoint-10"
    checkpoint.mkdir()
    state = {
        "stateful_callbacks": {"CocktailCallback": {"attributes": {"_resume_state": {"history": HISTORY}}}}
    }
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    assert load_run(checkpoint) == ("history", {"history": HISTORY})


def test_load_run_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_run(tmp_path / "missing")
    with pytest.raises(UsageError, match=r"holds no report\.json"):
        load_run(tmp_path)
    (tmp_path / "cocktail_report.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_run(tmp_path)


def test_render_history_run_draws_the_callback_plot(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "cocktail_report.json").write_text(json.dumps({"history": HISTORY}))
    table, plot = render_run(tmp_path)
    assert "alpha" in table.splitlines()[0] and "0.75" in table
    assert plot == tmp_path / "cocktail_report.png" and plot.is_file()


def test_cli_report_rebuilds_table_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_report(tmp_path, _report())
    assert main(["report", str(tmp_path), "--plot", str(tmp_path / "again.png")]) == 0
    out = capsys.readouterr().out
    assert "resilient (budget)" in out and "again.png" in out
    assert (tmp_path / "again.png").is_file()
    assert main(["report", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["alpha"] == 0.75


def test_cli_report_on_an_empty_folder_is_a_usage_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no report.json" in capsys.readouterr().err


def test_cli_demo_rejects_unknown_scenarios(capsys):
    assert main(["demo", "--scenario", "nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_plot_title_names_the_text():
    from resilient_tune.demo._report_plot import _title

    env = {"python": "3.11.7"}
    decoder = {"scenario": "decoder", "model": "m", "config": {"steps": 100}, "environment": env}
    decoder["data"] = {
        "source": "prose and docstrings (general), code (target)",
        "title": "stdlib prose → code",
    }
    assert (
        _title(decoder) == "resilient-tune demo (decoder) · m · 100 steps · Python 3.11.7 stdlib prose → code"
    )
    encoder = {
        "scenario": "encoder",
        "model": "m",
        "environment": env,
        "data": {"source": "stdlib docstrings"},
    }
    assert _title(encoder) == "resilient-tune demo (encoder) · m · Python 3.11.7 docstrings"
    assert _title({"data": {"source": "my data"}}) == "resilient-tune demo (?) · my data"
