"""End to end: CocktailCallback switched on the three ways (code, LightningCLI flag / YAML, RESILIENT_TUNE=1),
under 2-process DDP on the CPU, and across a resume in a new process. Each run is a subprocess of the scripts in
this folder; the resilient weights are checked against θ₀ and the final weights the scripts save.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

from lit_app import write_general  # noqa: E402  (this folder is on sys.path under pytest)

HERE = Path(__file__).resolve().parent
FLAG = "resilient_tune.integrations.lightning.CocktailCallback"
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]

pytestmark = pytest.mark.slow


def _run(
    args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: int = 300
) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RESILIENT_TUNE")}
    environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


def _summaries(root: Path) -> dict[int, dict]:
    """The ``summary-rank<r>.json`` each rank of ``lit_train.py`` wrote (stdout lines of ranks may interleave)."""
    rows = [json.loads(path.read_text()) for path in sorted(root.glob("summary-rank*.json"))]
    return {row["rank"]: row for row in rows}


def _assert_mix(folder: Path, base: dict, tuned: dict) -> float:
    """``folder`` holds θ₀ + α(θ − θ₀) for every state-dict key, α from its cocktail.json, and an ``hf/`` model
    equal to the same mix; returns α."""
    alpha = json.loads((folder / "cocktail.json").read_text())["alpha"]
    written = load_file(str(folder / "model.safetensors"))
    assert sorted(written) == sorted(tuned)
    for key, value in written.items():
        torch.testing.assert_close(value, base[key] + alpha * (tuned[key] - base[key]), rtol=0, atol=1e-6)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf")
    for key, value in hf.state_dict().items():
        torch.testing.assert_close(value, written[f"model.{key}"], rtol=0, atol=0)
    return alpha


def _weights(root: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(root / name))


def _cli_run(root: Path, *extra: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> dict:
    args = [str(HERE / "lit_app.py"), "fit", f"--trainer.default_root_dir={root}", *QUIET]
    args += ["--trainer.max_steps=8", "--trainer.val_check_interval=2", *extra]
    return json.loads(_run(args, cwd=cwd, env=env).strip().splitlines()[-1])


def test_programmatic(tmp_path):
    _run([str(HERE / "lit_train.py"), str(tmp_path), "--alpha", "0.3"])
    summary = _summaries(tmp_path)[0]
    assert [h["step"] for h in summary["history"]] == [2, 4, 6, 8]
    assert summary["writes"] == 5  # one companion per checkpoint and the final folder
    base = _weights(tmp_path, "theta0.safetensors")
    assert _assert_mix(tmp_path / "resilient", base, _weights(tmp_path, "final.safetensors")) == 0.3
    for ckpt in sorted((tmp_path / "ckpts").glob("*.ckpt")):
        weights = torch.load(ckpt, weights_only=False)["state_dict"]
        _assert_mix(ckpt.with_name(ckpt.stem + ".resilient"), base, weights)


def test_lightning_cli_flag(tmp_path):
    out = _cli_run(tmp_path, f"--trainer.callbacks+={FLAG}", "--trainer.callbacks.init_args.alpha=0.3")
    assert out == {"cocktail_callbacks": 1}
    final = _weights(tmp_path, "final.safetensors")
    assert _assert_mix(tmp_path / "resilient", _weights(tmp_path, "theta0.safetensors"), final) == 0.3


def test_lightning_cli_yaml_class_path(tmp_path):
    write_general(str(tmp_path / "general.jsonl"))
    out = _cli_run(tmp_path / "run", f"--config={HERE / 'cocktail.yaml'}", cwd=tmp_path)
    assert out == {"cocktail_callbacks": 1}
    root = tmp_path / "run"
    _assert_mix(root / "resilient", _weights(root, "theta0.safetensors"), _weights(root, "final.safetensors"))
    report = json.loads((root / "cocktail_report.json").read_text())
    assert report["policy"] == {**report["policy"], "name": "budget", "drift_budget": 0.02}
    final = report["final"]
    assert final["general_loss"] <= final["general_loss_base"] * 1.02 * (1 + 1e-6)  # the budget holds


def test_env_flag_needs_no_code_change(tmp_path):
    write_general(str(tmp_path / "general.jsonl"))
    env = {
        "RESILIENT_TUNE": "1",
        "RESILIENT_TUNE_POLICY": "budget",
        "RESILIENT_TUNE_DRIFT_BUDGET": "0.02",
        "RESILIENT_TUNE_GENERAL_DATA": str(tmp_path / "general.jsonl"),
    }
    root = tmp_path / "run"
    assert _cli_run(root, env=env) == {"cocktail_callbacks": 1}
    _assert_mix(root / "resilient", _weights(root, "theta0.safetensors"), _weights(root, "final.safetensors"))
    assert json.loads((root / "resilient" / "cocktail.json").read_text())["policy"]["name"] == "budget"
    env["RESILIENT_TUNE_APLHA"] = "0.3"
    args = [str(HERE / "lit_app.py"), "fit", f"--trainer.default_root_dir={tmp_path / 'typo'}", *QUIET]
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    done = subprocess.run([sys.executable, *args], env=environ, capture_output=True, text=True, timeout=300)
    assert (
        done.returncode != 0
        and "RESILIENT_TUNE_APLHA" in done.stderr
        and "RESILIENT_TUNE_ALPHA" in done.stderr
    )


def test_ddp_two_processes_write_once(tmp_path):
    _run(
        [str(HERE / "lit_train.py"), str(tmp_path), "--ddp", "--seed-per-rank", "--policy", "budget"],
        timeout=600,
    )
    ranks = _summaries(tmp_path)
    assert sorted(ranks) == [0, 1] and ranks[0]["world_size"] == 2
    assert ranks[0]["writes"] == 5 and ranks[1]["writes"] == 0  # global rank 0 writes, once per save
    assert ranks[0]["history"] == ranks[1]["history"]  # every rank decided the same α
    # ranks started from different weights: θ₀ is rank 0's (which DDP broadcast)
    base = _weights(tmp_path, "theta0.safetensors")
    _assert_mix(tmp_path / "resilient", base, _weights(tmp_path, "final.safetensors"))
    assert len(list((tmp_path / "ckpts").glob("*.resilient"))) == len(
        list((tmp_path / "ckpts").glob("*.ckpt"))
    )


def test_ddp_snapshot_on_disk_keeps_a_folder_per_rank_and_resumes(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    flags = ["--ddp", "--policy", "budget", "--snapshot-on-disk"]
    _run([str(HERE / "lit_train.py"), str(first), *flags, "--seed-per-rank"], timeout=600)
    full = _summaries(first)
    assert sorted(p.name for p in (first / "resilient_base").iterdir()) == ["rank0-of-2", "rank1-of-2"]
    assert full[0]["snapshot_bytes"] == full[1]["snapshot_bytes"] == 0  # θ₀ is read from disk, not resident
    assert full[0]["history"] == full[1]["history"]
    base = _weights(
        first, "theta0.safetensors"
    )  # rank 0's weights, which DDP broadcast (ranks started apart)
    _assert_mix(first / "resilient", base, _weights(first, "final.safetensors"))
    ckpt = next(
        iter((first / "ckpts").glob("*step=4.ckpt"))
    )  # the epoch in the name depends on the DDP split
    _run([str(HERE / "lit_train.py"), str(second), *flags, "--resume", str(ckpt), "--seed", "7"], timeout=600)
    resumed = _summaries(second)
    assert resumed[0]["history"] == resumed[1]["history"]
    for a, b in zip(resumed[0]["history"], full[0]["history"]):
        assert a["step"] == b["step"] and a["alpha"] == pytest.approx(b["alpha"], abs=1e-6)
    _assert_mix(second / "resilient", base, _weights(second, "final.safetensors"))


def test_ddp_strict_rank_zero_write_failure_stops_every_rank(tmp_path):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RESILIENT_TUNE")}
    done = subprocess.run(
        [sys.executable, str(HERE / "lit_train.py"), str(tmp_path), "--ddp", "--fail-write", "--strict"],
        env={**environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert (tmp_path / "rank0.error").read_text().startswith("OSError")
    rank1 = (tmp_path / "rank1.error").read_text()
    # rank 1 learned rank 0's failure at the next step (not from a dead connection or a timeout)
    assert rank1.startswith("RankZeroError: rank 0 failed writing") and "No space left" in rank1


def test_ddp_failed_write_is_logged_and_every_rank_goes_on(tmp_path):
    _run([str(HERE / "lit_train.py"), str(tmp_path), "--ddp", "--fail-write"])  # strict=False: the default
    summaries = _summaries(tmp_path)
    assert sorted(summaries) == [0, 1]
    for summary in summaries.values():  # both ranks trained to the end and agree on what failed
        assert [h["step"] for h in summary["history"]] == [2, 4, 6, 8]
        assert len(summary["save_failures"]) == 5  # four companions and the final folder
    assert summaries[0]["save_failures"][-1].endswith("resilient")
    assert not list(tmp_path.rglob("*.resilient*")) and not (tmp_path / "resilient").exists()
    assert len(list((tmp_path / "ckpts").glob("*.ckpt"))) == 4  # the checkpoints themselves are all there
    report = json.loads((tmp_path / "cocktail_report.json").read_text())
    assert len(report["save_failures"]) == 5


def test_resume_in_a_new_process(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    _run([str(HERE / "lit_train.py"), str(first), "--policy", "budget"])
    full = _summaries(first)[0]
    ckpt = first / "ckpts" / "epoch=0-step=4.ckpt"
    args = [
        str(HERE / "lit_train.py"),
        str(second),
        "--policy",
        "budget",
        "--resume",
        str(ckpt),
        "--seed",
        "7",
    ]
    _run(args)
    resumed = _summaries(second)[0]  # other initial weights: the resumed run must not take them as θ₀
    assert [h["step"] for h in resumed["history"]] == [2, 4, 6, 8]
    for a, b in zip(resumed["history"], full["history"]):
        assert a["alpha"] == pytest.approx(b["alpha"], abs=1e-6)
    base = _weights(first, "theta0.safetensors")
    _assert_mix(second / "resilient", base, _weights(second, "final.safetensors"))


# ---------------------------------------------------------------- FSDP2 (ModelParallelStrategy + fully_shard)
@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    """One 2-process FSDP2 run with the budget policy (checkpoints at steps 2, 4, 6, 8)."""
    root = tmp_path_factory.mktemp("fsdp2")
    _run([str(HERE / "lit_sharded.py"), str(root), "--policy", "budget"], timeout=600)
    return root


def test_fsdp2_merges_shards_and_writes_full_companions(fsdp2_run):
    summaries = _summaries(fsdp2_run)
    assert sorted(summaries) == [0, 1]
    assert summaries[0]["sharded"] == ["DTensor"]  # the parameters really were sharded
    assert summaries[0]["history"] == summaries[1]["history"]  # every rank made the same decisions
    assert [h["step"] for h in summaries[0]["history"]] == [2, 4, 6, 8]
    base = _weights(fsdp2_run, "theta0.safetensors")
    alpha = _assert_mix(fsdp2_run / "resilient", base, _weights(fsdp2_run, "final.safetensors"))
    assert alpha == summaries[0]["history"][-1]["alpha"]
    ckpts = sorted((fsdp2_run / "ckpts").glob("*.ckpt"))
    assert len(ckpts) == 4
    for ckpt in ckpts:
        weights = torch.load(ckpt, weights_only=False)["state_dict"]
        _assert_mix(ckpt.with_name(ckpt.stem + ".resilient"), base, weights)
    report = json.loads((fsdp2_run / "cocktail_report.json").read_text())
    assert [h["alpha"] for h in report["history"]] == [h["alpha"] for h in summaries[0]["history"]]


def test_fsdp2_resume_reloads_each_ranks_base_shards(fsdp2_run, tmp_path):
    assert sorted(p.name for p in (fsdp2_run / "resilient_base").iterdir()) == ["rank0-of-2", "rank1-of-2"]
    ckpt = next(iter(sorted((fsdp2_run / "ckpts").glob("*step=4.ckpt"))))
    args = [
        str(HERE / "lit_sharded.py"),
        str(tmp_path),
        "--policy",
        "budget",
        "--resume",
        str(ckpt),
        "--seed",
        "7",
    ]
    _run(args, timeout=600)  # other initial weights: the resumed run must not take them as θ₀
    full, resumed = _summaries(fsdp2_run), _summaries(tmp_path)
    assert resumed[0]["sharded"] == ["DTensor"] and resumed[0]["history"] == resumed[1]["history"]
    assert [h["step"] for h in resumed[0]["history"]] == [2, 4, 6, 8]
    for a, b in zip(resumed[0]["history"], full[0]["history"]):
        assert a["alpha"] == pytest.approx(b["alpha"], abs=1e-6)
    base = _weights(fsdp2_run, "theta0.safetensors")  # the first run's θ₀, reloaded from its per-rank shards
    alpha = _assert_mix(tmp_path / "resilient", base, _weights(tmp_path, "final.safetensors"))
    assert alpha == resumed[0]["history"][-1]["alpha"]


def test_fsdp2_strict_failed_write_stops_every_rank_without_partial_output(tmp_path):
    args = [sys.executable, str(HERE / "lit_sharded.py"), str(tmp_path), "--fail-write", "--strict"]
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode != 0
    assert "No space left" in (tmp_path / "rank0.error").read_text()
    assert "No space left" in (tmp_path / "rank1.error").read_text()  # rank 1 learned it: no hang
    assert not list((tmp_path / "ckpts").glob("*.resilient*"))  # no partial companion, no temp folder


def test_fsdp2_failed_write_is_logged_and_every_rank_goes_on(tmp_path):
    _run([str(HERE / "lit_sharded.py"), str(tmp_path), "--fail-write"], timeout=600)
    summaries = _summaries(tmp_path)
    assert summaries[0]["save_failures"] == summaries[1]["save_failures"]
    assert len(summaries[0]["save_failures"]) == 5 and len(summaries[0]["history"]) == 4
    assert not list(tmp_path.rglob("*.resilient*")) and not (tmp_path / "resilient").exists()
    assert (tmp_path / "final.safetensors").exists()  # training reached its end


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_deepspeed_zero3_partitions_are_merged_locally_and_gathered_to_write(tmp_path):
    pytest.importorskip("deepspeed")
    _run([str(HERE / "lit_sharded.py"), str(tmp_path), "--deepspeed", "--policy", "budget"], timeout=900)
    summaries = _summaries(tmp_path)
    assert summaries[0]["history"] == summaries[1]["history"]
    base = _weights(tmp_path, "theta0.safetensors")
    alpha = _assert_mix(tmp_path / "resilient", base, _weights(tmp_path, "final.safetensors"))
    assert alpha == summaries[0]["history"][-1]["alpha"]
    assert len(list((tmp_path / "ckpts").glob("*.resilient"))) == 4
