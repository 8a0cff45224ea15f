"""End to end: CocktailCallback inside a transformers Trainer under 2-process DDP on the CPU
(``torchrun --standalone --nproc_per_node 2``, gloo). Each run is a subprocess of ``hf_train.py``; a run that
does not finish within its timeout is killed (with its workers) and fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

pytest.importorskip("transformers")

from _launch import HERE, TIMEOUT, assert_mix, run, summaries, torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    return out, run("hf_train.py", out, "--policy", "budget", "--drift-budget", "0.002")


def test_two_ranks_decide_alike_and_only_rank_zero_writes(budget_run):
    out, rows = budget_run
    assert sorted(rows) == [0, 1] and rows[0]["world_size"] == 2
    assert rows[0]["history"] == rows[1]["history"]  # probe losses agreed across ranks: the same decisions
    assert [h["step"] for h in rows[0]["history"]] == [2, 4]
    assert 0 < rows[0]["history"][-1]["alpha"] < 1  # the budget bit (bisection ran on both ranks in step)
    assert rows[0]["writes"] == 3 and rows[1]["writes"] == 0  # checkpoint-2, checkpoint-4, final
    assert sorted(p.name for p in out.glob("checkpoint-*/resilient")) == ["resilient", "resilient"]
    assert (out / "cocktail_report.json").is_file()


def test_resilient_weights_are_the_mix_with_the_base(budget_run):
    out, rows = budget_run
    base, final = load_file(str(out / "theta0.safetensors")), load_file(str(out / "final.safetensors"))
    assert assert_mix(out / "resilient", base, final) == pytest.approx(rows[0]["history"][-1]["alpha"])
    step4 = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    assert_mix(out / "checkpoint-4" / "resilient", base, {**final, **step4})
    doc = json.loads((out / "checkpoint-2" / "resilient" / "cocktail.json").read_text())
    assert doc["step"] == 2 and doc["alpha"] == pytest.approx(rows[0]["history"][0]["alpha"])


def test_snapshot_on_disk_keeps_a_folder_per_rank_and_resumes(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    flags = ["--policy", "budget", "--drift-budget", "0.002", "--snapshot-on-disk"]
    full = run("hf_train.py", first, *flags)
    assert sorted(p.name for p in (first / "resilient_base").iterdir()) == ["rank0-of-2", "rank1-of-2"]
    assert full[0]["snapshot_bytes"] == full[1]["snapshot_bytes"] == 0  # θ₀ is read from disk, not resident
    assert full[0]["history"] == full[1]["history"]
    base = load_file(str(first / "theta0.safetensors"))
    assert_mix(first / "resilient", base, load_file(str(first / "final.safetensors")))
    resumed = run("hf_train.py", second, *flags, "--resume", str(first / "checkpoint-2"))
    assert resumed[0]["history"] == resumed[1]["history"]
    assert [h["step"] for h in resumed[0]["history"]] == [2, 4]
    for a, b in zip(resumed[0]["history"], full[0]["history"]):
        assert a["alpha"] == pytest.approx(b["alpha"], abs=1e-6)
    assert_mix(second / "resilient", base, load_file(str(second / "final.safetensors")))


def test_a_strict_rank_zero_write_failure_stops_every_rank(tmp_path):
    out = tmp_path / "run"
    done = torchrun(
        "hf_train.py", str(out), "--fail-write", "--strict"
    )  # a hang would exceed the timeout and fail here
    assert done.returncode != 0
    rank0 = (out / "rank0.error").read_text()
    rank1 = (out / "rank1.error").read_text()
    assert rank0.startswith("OSError") and "No space left" in rank0
    # rank 1 did not wait in the next collective: it learned rank 0's failure from the agreement after the write
    assert rank1.startswith("RankZeroError: rank 0 failed writing") and "No space left" in rank1
    assert "checkpoint-2" in rank1.splitlines()[0]


def test_single_process_run_of_the_same_script(tmp_path):
    environ = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(HERE / "hf_train.py"), str(tmp_path / "one"), "--alpha", "0.3"],
        env=environ, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    row = summaries(tmp_path / "one")[0]
    assert row["world_size"] == 1 and row["writes"] == 3
    base = load_file(str(tmp_path / "one" / "theta0.safetensors"))
    final = load_file(str(tmp_path / "one" / "final.safetensors"))
    assert assert_mix(tmp_path / "one" / "resilient", base, final) == 0.3
