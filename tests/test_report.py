"""Report helpers: the PNG plot (matplotlib optional), the text table, reading a run's report."""

from __future__ import annotations

import json
import sys

import pytest

from resilient_tune.errors import UsageError
from resilient_tune.report import history_table, plot_history, read_report

HISTORY = [
    {"step": 2, "alpha": 1.0, "drift_norm": 0.5, "drift_relative": 0.01, "general_loss": 4.2,
     "general_loss_base": 4.2, "general_loss_finetuned": 4.2, "target_loss": 3.0, "probe_passes": 2},
    {"step": 4, "alpha": 0.6, "drift_norm": 1.5, "drift_relative": 0.03, "general_loss": 4.3,
     "general_loss_base": 4.2, "general_loss_finetuned": 4.9, "target_loss": 2.0, "probe_passes": 4},
]  # fmt: skip


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_history(HISTORY, tmp_path / "sub" / "plot.png")
    assert path == tmp_path / "sub" / "plot.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in path.parent.iterdir()] == ["plot.png"]  # no temporary file left
    # drift-only history (zero-config runs have no probes) still plots
    assert plot_history([{"step": 1, "alpha": 0.5, "drift_norm": 0.1}], tmp_path / "bare.png") is not None


def test_missing_matplotlib_warns_with_the_extra_and_does_not_crash(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.warns(UserWarning, match=r"pip install 'resilient-tune\[demo\]'"):
        assert plot_history(HISTORY, tmp_path / "plot.png") is None
    assert not (tmp_path / "plot.png").exists()


def test_table_shows_the_columns_present():
    table = history_table(HISTORY).splitlines()
    assert table[0].split() == [
        "step",
        "alpha",
        "drift",
        "general",
        "general@base",
        "general@tuned",
        "target",
        "passes",
    ]
    assert table[3].split()[:3] == ["4", "0.6", "1.5"]
    assert "kl" not in table[0]


def test_bad_history_and_missing_reports_are_clear(tmp_path):
    with pytest.raises(UsageError, match="entry 1"):
        history_table([HISTORY[0], {"step": 3}])
    with pytest.raises(UsageError, match=r"no cocktail_report\.json"):
        read_report(tmp_path)
    (tmp_path / "cocktail_report.json").write_text(json.dumps({"history": HISTORY}))
    assert read_report(tmp_path)["history"][1]["alpha"] == 0.6
    (tmp_path / "cocktail_report.json").write_text("{")
    with pytest.raises(UsageError, match="not valid JSON"):
        read_report(tmp_path / "cocktail_report.json")
