"""End to end: FSDP2 (``fully_shard`` over gloo, 2 CPU processes) with the callbacks' shared core, driven by a plain
torch loop (``fsdp2_train.py``; the transformers Trainer runs plain DDP on the CPU whatever its ``fsdp`` options).
Shard-local snapshot and merge, one gather per written folder, rank 0 writes, decisions agree across ranks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch.distributed.fsdp")

from _e2e import examples, model  # noqa: E402
from _launch import assert_mix, run, torchrun  # noqa: E402  (this folder is on sys.path)
from fsdp2_train import batches  # noqa: E402

from resilient_tune.probes import probe_loss  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    return out, run("fsdp2_train.py", out, "--policy", "budget", "--drift-budget", "0.002")


def test_snapshot_and_merge_are_shard_local(budget_run):
    _, rows = budget_run
    assert sorted(rows) == [0, 1]
    for row in rows.values():
        assert row["sharded"]  # the parameters are DTensor shards
        assert row["snapshot_bytes"] < 0.6 * row["full_bytes"]  # each rank copied its own shard (about half)
        assert row["gathers_while_deciding"] == 0  # probing and merging never gathered the model
        assert row["swap_deviation"] < 1e-6  # the swapped-in shard is the cut of θ₀ + α(θ − θ₀)
        assert row["gathers"] == 2  # one gather per written folder (steps 2 and 4), on every rank
    assert rows[0]["writes"] == 2 and rows[1]["writes"] == 0


def test_decisions_agree_across_ranks_and_the_budget_bites(budget_run):
    _, rows = budget_run
    assert rows[0]["history"] == rows[1]["history"]  # forwards are collectives: same passes on both ranks
    first = rows[0]["history"][0]
    assert 0 < first["alpha"] < 1 and first["probe_passes"] >= 3  # the bisection ran in step on both ranks
    for entry in rows[0]["history"]:
        assert entry["general_loss"] <= (1 + 0.002) * entry["general_loss_base"] * (1 + 1e-6)
        # the KL reference (a forward on every rank) was taken at the start
        assert entry["general_kl_merged"] > 0 and entry.get("general_kl", 1.0) > 0
    drift = [h["drift_norm"] for h in rows[0]["history"]]
    assert drift[1] > drift[0] > 0  # summed over the shards of both ranks (checked below against the files)


def test_probing_leaves_training_bit_exact(budget_run, tmp_path):
    out, _ = budget_run
    run("fsdp2_train.py", tmp_path / "plain", "--no-callback")
    plain, probed = (
        load_file(str(tmp_path / "plain" / "final.safetensors")),
        load_file(str(out / "final.safetensors")),
    )
    assert plain.keys() == probed.keys()
    for key, value in plain.items():
        assert torch.equal(value, probed[key]), key  # candidates swapped into shards and restored exactly


def test_written_weights_are_the_mix_with_the_base(budget_run):
    out, rows = budget_run
    base, final = load_file(str(out / "theta0.safetensors")), load_file(str(out / "final.safetensors"))
    for entry in rows[0]["history"]:
        folder = out / f"step-{entry['step']}"
        theta = load_file(str(folder / "theta.safetensors"))
        assert assert_mix(folder / "resilient", base, theta) == pytest.approx(entry["alpha"])
    written = load_file(str(out / "step-4" / "resilient" / "model.safetensors"))
    assert "lm_head.weight" not in written and "transformer.wte.weight" in written  # tied weight written once
    drift = sum(float((final[k] - base[k]).pow(2).sum()) for k in base if k != "lm_head.weight") ** 0.5
    assert rows[0]["history"][-1]["drift_norm"] == pytest.approx(drift, rel=1e-4)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out / "step-4" / "resilient")
    torch.testing.assert_close(loaded.lm_head.weight, written["transformer.wte.weight"], rtol=0, atol=0)


def test_cocktail_with_a_peer_mixes_each_shard_with_its_cut_of_the_peer(tmp_path):
    torch.manual_seed(5)
    peer = transformers.GPT2LMHeadModel(model().config)
    peer.save_pretrained(tmp_path / "peer")
    out = tmp_path / "run"
    rows = run(
        "fsdp2_train.py", out, "--policy", "cocktail", "--peer", str(tmp_path / "peer"), "--alpha", "0.4"
    )
    assert rows[0]["history"] == rows[1]["history"]
    target = batches(examples(8, 1, True), 8)
    losses = [probe_loss(model(), target), probe_loss(peer, target)]
    expected = torch.softmax(-torch.tensor(losses) / 5.0, -1).tolist()
    assert rows[0]["history"][0]["weights"] == pytest.approx(expected, rel=1e-5)
    doc = json.loads((out / "step-4" / "resilient" / "cocktail.json").read_text())
    alpha, weights = doc["alpha"], [i["mix_weight"] for i in doc["ingredients"][1:]]
    assert alpha == 0.4 and weights == pytest.approx(expected, rel=1e-5)
    base, final = load_file(str(out / "theta0.safetensors")), load_file(str(out / "final.safetensors"))
    peer_state = load_file(str(tmp_path / "peer" / "model.safetensors"))
    written = load_file(str(out / "step-4" / "resilient" / "model.safetensors"))
    for key, value in written.items():
        mix = weights[0] * base[key] + weights[1] * peer_state[key]
        torch.testing.assert_close(value, alpha * final[key] + (1 - alpha) * mix, rtol=0, atol=1e-6)


def test_a_rank_zero_write_failure_stops_every_rank(tmp_path):
    out = tmp_path / "run"
    done = torchrun(
        "fsdp2_train.py", str(out), "--fail-write"
    )  # a hang would exceed the timeout and fail here
    assert done.returncode != 0
    assert (out / "rank0.error").read_text().startswith("OSError")
    rank1 = (out / "rank1.error").read_text().splitlines()[0]
    assert rank1.startswith("RankZeroError: rank 0 failed writing") and "step-2" in rank1
