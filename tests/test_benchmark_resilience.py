"""benchmarks/resilience.py keeps running: the summary arithmetic on a hand-made report, and --smoke end to end on
the decoder scenario (tiny settings, seconds; the numbers are meaningless there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import resilience  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


def _report(resilient: tuple[float, float], static: tuple[float, float]) -> dict:
    rows = {"base": (0.40, 0.80), "fine_tuned": (0.90, 0.60), "resilient": resilient, "static": static}
    alphas = {"base": 0.0, "fine_tuned": 1.0, "resilient": 0.7, "static": 0.5}
    return {
        "scenario": "decoder",
        "models": {k: {"target": t, "general": g, "alpha": alphas[k]} for k, (t, g) in rows.items()},
        "curve": [
            {"alpha": 0.0, "target": 0.4, "general": 0.8},
            {"alpha": 1.0, "target": 0.9, "general": 0.6},
        ],
    }


def test_summary_shares_and_aim():
    s = resilience.summarize(_report(resilient=(0.86, 0.796), static=(0.80, 0.80)))
    r = s["models"]["resilient"]
    assert r["target_gain_kept"] == pytest.approx(0.92)  # (0.86 - 0.40) / (0.90 - 0.40)
    assert r["general_drop_recovered"] == pytest.approx(0.98)  # (0.796 - 0.60) / (0.80 - 0.60)
    assert r["general_vs_base"] == pytest.approx(-0.005) and r["meets_aim"]
    assert not s["models"]["static"]["meets_aim"]  # keeps only 80% of the gain
    assert s["models"]["fine_tuned"]["general_drop_recovered"] == 0.0
    assert s["forgetting"] == pytest.approx(-0.25)
    assert s["online_vs_static"] == "not better"  # better target, worse general
    assert resilience.summarize(_report((0.86, 0.80), (0.80, 0.80)))["online_vs_static"] == "better"
    assert "| decoder | online budget | 0.70 |" in resilience.render([s])


def test_online_and_static_are_compared_example_by_example():
    report = _report((0.86, 0.80), (0.80, 0.80))
    report["hits"] = {
        "resilient": {"target": "1101", "general": "1111110000"},
        "static": {"target": "1000", "general": "0000001111"},
    }
    pairs = resilience.summarize(report)["online_vs_static_pairs"]
    assert pairs["target"] == {
        "online_only": 2,
        "static_only": 0,
        "p": pytest.approx(0.5),
    }  # 2 of 2, two-sided
    assert pairs["general"]["online_only"] == 6 and pairs["general"]["static_only"] == 4
    assert 0.7 < pairs["general"]["p"] <= 1.0
    line = resilience.render([resilience.summarize(report, "encoder-200")])
    assert "target +2 examples (2 only online, 0 only static, McNemar p = 0.5)" in line
    assert "| encoder-200 | online budget |" in line
    assert resilience.summarize(_report((0.8, 0.8), (0.8, 0.8)))["online_vs_static_pairs"] is None


def test_each_run_is_a_scenario_with_its_recipe(monkeypatch, tmp_path):
    calls = []

    def fake_run_demo(out, scenario, *, echo, **options):
        calls.append((Path(out).name, scenario, options))
        return {}

    monkeypatch.setattr("resilient_tune.demo.run_demo", fake_run_demo)
    resilience._run("encoder-200", tmp_path, False, print)
    resilience._run("encoder-200", tmp_path, True, print)
    resilience._run("decoder", tmp_path, False, print)
    resilience._run("decoder-lora", tmp_path, True, print)
    (name, scenario, options), (_, _, smoke), (_, dec, dec_options), (lora, lora_scenario, lora_smoke) = calls
    assert (name, scenario, options["steps"], options["decisions"]) == ("encoder-200", "encoder", 200, 4)
    assert smoke["steps"] == 2 and smoke["curve"] == ()  # --smoke shrinks every run
    assert (dec, dec_options) == (
        "decoder",
        {"curve": resilience._CURVE, "slerp_curve": (0.5,)},
    )  # the demo's recipe
    # the LoRA run keeps its adapter under --smoke, on the tiny model
    assert (lora, lora_scenario, lora_smoke["lora_rank"], lora_smoke["n_embd"]) == (
        "decoder-lora",
        "decoder",
        8,
        32,
    )
    # the encoder run is the demo's recipe, with more curve points
    assert resilience.RUNS["encoder"] == ("encoder", {"curve": resilience._CURVE, "slerp_curve": (0.5,)})
    assert "slerp_curve" not in resilience.RUNS["decoder-lora"][1]  # SLERP of merged adapters: not measured


def test_slerp_point_is_a_row_compared_with_the_linear_mix_example_by_example():
    report = _report((0.86, 0.80), (0.80, 0.80))
    report["slerp_curve"] = [{"alpha": 0.5, "target": 0.85, "general": 0.70}]
    report["hits"] = {"static": {"target": "1000", "general": "0000001111"}}
    report["slerp_hits"] = {"0.5": {"target": "1110", "general": "0000001111"}}
    s = resilience.summarize(report)
    r = s["models"]["static_slerp"]
    assert r["alpha"] == 0.5 and r["target_gain_kept"] == pytest.approx(0.9)  # (0.85 - 0.40) / 0.50
    assert r["general_drop_recovered"] == pytest.approx(0.5)  # (0.70 - 0.60) / 0.20
    assert s["slerp_vs_linear_pairs"]["target"] == {
        "slerp_only": 2,
        "linear_only": 0,
        "p": pytest.approx(0.5),
    }
    assert s["slerp_vs_linear_pairs"]["general"]["p"] == 1.0  # identical hits
    text = resilience.render([s])
    assert "| decoder | static SLERP t=0.5 | 0.50 | 85.0 | 70.0 | 90% | 50% |" in text
    assert "SLERP vs linear at the static α: target +2 examples (2 only SLERP, 0 only linear" in text
    report["slerp_curve"] = [{"alpha": 0.3, "target": 0.85, "general": 0.70}]  # not at the static α: no row
    assert "static_slerp" not in resilience.summarize(report)["models"]


def test_no_gain_means_no_share():
    report = _report((0.5, 0.7), (0.5, 0.7))
    report["models"]["fine_tuned"]["target"] = 0.40
    assert resilience.summarize(report)["models"]["resilient"]["target_gain_kept"] is None


def test_smoke_run_writes_table_json_and_plot(tmp_path):
    pytest.importorskip("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [
        sys.executable,
        str(BENCH / "resilience.py"),
        "--smoke",
        "--scenarios",
        "decoder",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run([*args, "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["smoke"] is True and [s["scenario"] for s in result["summaries"]] == ["decoder"]
    assert set(result["summaries"][0]["models"]) == {"fine_tuned", "static", "resilient", "static_slerp"}
    assert set(result["summaries"][0]["slerp_vs_linear_pairs"]) == {"target", "general"}
    assert (tmp_path / "resilience.json").is_file() and (tmp_path / "decoder" / "report.json").is_file()
    again = subprocess.run([*args, "--reuse"], capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "| decoder | static α=0.5 (LM-Cocktail) |" in again.stdout
    assert "| decoder | static SLERP t=0.5 | 0.50 |" in again.stdout
    assert "decoder: SLERP vs linear at the static α: target" in again.stdout
    if resilience_has_matplotlib():
        assert (tmp_path / "resilience.png").read_bytes()[:4] == b"\x89PNG"


def resilience_has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
