"""End to end: a custom accelerate loop driving a ``Cocktail`` session under 2-process DDP on the CPU
(``torchrun --standalone --nproc_per_node 2``, gloo), as docs/custom-loops.md shows it."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

pytest.importorskip("accelerate")

from _launch import assert_mix, run

pytestmark = pytest.mark.slow

BUDGET = ["--policy", "budget", "--drift-budget", "0.002"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate") / "run"
    return out, run("accelerate_loop.py", out, *BUDGET)


def test_two_ranks_decide_alike_and_only_rank_zero_writes(full_run):
    out, rows = full_run
    assert sorted(rows) == [0, 1] and rows[0]["world_size"] == 2
    assert rows[0]["history"] == rows[1]["history"]  # the probe losses were averaged: the same decisions
    assert [h["step"] for h in rows[0]["history"]] == [2, 4]
    assert 0 < rows[0]["history"][-1]["alpha"] < 1
    assert rows[0]["writes"] == 3 and rows[1]["writes"] == 0  # checkpoint-2, checkpoint-4, final
    base, final = load_file(str(out / "theta0.safetensors")), load_file(str(out / "final.safetensors"))
    assert assert_mix(out / "resilient", base, final) == pytest.approx(rows[0]["history"][-1]["alpha"])
    assert (out / "cocktail_report.json").is_file()


def test_a_resume_in_new_processes_continues_the_history(full_run, tmp_path):
    out, rows = full_run
    resumed = run("accelerate_loop.py", tmp_path, *BUDGET, "--resume", str(out / "checkpoint-2"))
    assert resumed[0]["history"] == resumed[1]["history"] == rows[0]["history"]
    base = load_file(str(out / "theta0.safetensors"))  # the first run's θ₀, reloaded from its resilient_base/
    assert_mix(tmp_path / "resilient", base, load_file(str(tmp_path / "final.safetensors")))
