"""resilient_tune.distributed in one process: no process group, and the shard arithmetic of ZeRO-3 partitions
(2-process FSDP2/DDP runs are in integrations/hf/)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import resilient_tune.distributed as distributed
from resilient_tune.engine import CocktailEngine
from resilient_tune.errors import UsageError


def test_without_a_process_group_everything_is_local():
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_rank_zero()
    assert distributed.on_rank_zero(lambda: 7, "computing") == 7
    with pytest.raises(OSError, match="disk"):
        distributed.on_rank_zero(lambda: (_ for _ in ()).throw(OSError("disk full")), "writing")
    assert distributed.mean_across_ranks(2.5) == 2.5 and distributed.sum_across_ranks([1.0, 2.0]) == [
        1.0,
        2.0,
    ]
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    plain = torch.nn.Linear(3, 2)
    assert not distributed.is_sharded_model(plain) and distributed.local_tensor(plain.weight) is plain.weight
    full = distributed.full_state_dict(plain)
    assert full.keys() == plain.state_dict().keys() and full["weight"] is not plain.weight


def test_close_process_group_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    distributed.close_process_group()  # no group: nothing to do
    store = f"file://{tmp_path / 'store'}"
    torch.distributed.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    assert torch.distributed.is_initialized()
    distributed.close_process_group()
    assert not torch.distributed.is_initialized()
    distributed.close_process_group()  # already closed: still nothing to do


def test_close_process_group_can_leave_the_process_with_a_status_past_the_teardown(tmp_path):
    script = f"""
import atexit, torch
import resilient_tune.distributed as distributed
torch.distributed.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
atexit.register(print, "atexit ran")
print("saved", end="")  # no newline: only the flush before leaving puts it out
distributed.close_process_group(exit_code=3)
print("after the exit")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stdout == "saved"  # flushed; nothing after the call ran, atexit handlers were skipped


@pytest.mark.parametrize("code", [-1, 256, 1.0, True, "0"])
def test_close_process_group_refuses_a_bad_exit_status_before_closing_anything(tmp_path, code):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(UsageError, match=r"exit_code=.*an exit status is an int from 0 to 255"):
            distributed.close_process_group(exit_code=code)
        assert torch.distributed.is_initialized()  # refused before the barrier: the group is still there
    finally:
        distributed.close_process_group()


class _Zero3Param(torch.nn.Parameter):
    """A stand-in for a DeepSpeed ZeRO-3 parameter: an empty placeholder with ``ds_shape`` and this rank's flat
    partition in ``ds_tensor`` (partition size ``ceil(numel / world)``; the flattened tensor zero-padded)."""


def _zero3(full: torch.Tensor, rank: int, world: int) -> torch.nn.Parameter:
    size = -(-full.numel() // world)
    padded = torch.cat([full.reshape(-1), full.new_zeros(size * world - full.numel())])
    p = _Zero3Param(torch.empty(0))
    p.ds_shape = tuple(full.shape)
    p.ds_tensor = padded[rank * size : (rank + 1) * size].clone()
    return p


@pytest.mark.parametrize("rank", [0, 1])
def test_zero3_local_part_is_the_partition_of_the_flattened_tensor(monkeypatch, rank):
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    full = torch.arange(15.0).reshape(5, 3)
    p = _zero3(full, rank, 2)
    assert distributed.is_sharded(p) and distributed.global_shape(p) == (5, 3)
    assert distributed.local_tensor(p) is p.ds_tensor
    other = full * 10  # e.g. a peer's tensor
    expected = [0, 10, 20, 30, 40, 50, 60, 70] if rank == 0 else [80, 90, 100, 110, 120, 130, 140, 0]
    assert distributed.local_part(p, other).tolist() == expected  # the last partition is zero-padded
    with pytest.raises(UsageError, match=r"shape \(3, 5\)"):
        distributed.local_part(p, other.T)


def test_engine_merges_zero3_partitions_in_place(monkeypatch, tmp_path):
    """The engine's snapshot, swap and peers work on ``ds_tensor`` (rank 1 of 2, simulated)."""
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    torch.manual_seed(0)
    base = {"weight": torch.randn(5, 3), "bias": torch.randn(5)}
    peer = {k: torch.randn_like(v) for k, v in base.items()}
    model = torch.nn.Module()
    for name, value in base.items():
        model.register_parameter(name, _zero3(value, 1, 2))
    from safetensors.torch import save_file

    save_file(peer, str(tmp_path / "peer.safetensors"))
    engine = CocktailEngine(alpha=0.25, peers=[tmp_path / "peer.safetensors"], weights=[0.6, 0.4])
    engine.begin(model)
    assert engine.snapshot.nbytes == (8 + 3) * 4  # this rank's partitions only
    with torch.no_grad():
        for p in model.parameters():
            p.ds_tensor.add_(1.0)  # "training" moves the partition
    live = {n: p.ds_tensor.clone() for n, p in model.named_parameters()}
    with engine.swapped(model, 0.25):
        for name, p in model.named_parameters():
            start = _zero3(base[name], 1, 2).ds_tensor
            cut = distributed.local_part(p, peer[name])
            expected = 0.25 * live[name] + 0.75 * (0.6 * start + 0.4 * cut)
            torch.testing.assert_close(p.ds_tensor, expected, rtol=0, atol=1e-6)
    for name, p in model.named_parameters():
        assert torch.equal(p.ds_tensor, live[name])  # restored bit-exactly


_TWO_RANKS = """
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
from resilient_tune.distributed import agree_on_failure
from resilient_tune.session import Cocktail

rank, root = int(sys.argv[1]), Path(sys.argv[2])
dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2)
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
folder = root / "blocked" / "resilient"  # rank 0's write fails: "blocked" is a file
outcomes = []
for strict in (False, True):
    core = Cocktail(strict=strict)
    core.begin(model)
    outcome = {"rank": rank, "strict": strict}
    try:
        outcome["returned"] = core.write(model, folder, 3)  # every rank; rank 0 writes, all learn the outcome
    except Exception as exc:
        outcome["raised"] = f"{type(exc).__name__}: {exc}"
    outcome["failures"] = core.save_failures
    total = torch.ones(1)
    dist.all_reduce(total)  # both ranks reach the next collective: nobody hangs
    outcome["after"] = float(total)
    outcomes.append(outcome)
# a step only rank 1 fails (its shard's merge, say): both ranks raise together, then meet at the next collective
try:
    agree_on_failure(ValueError("rank 1's shard is NaN") if rank == 1 else None, "merging a shard")
except Exception as exc:
    outcomes.append({"rank": rank, "agreed": f"{type(exc).__name__}: {exc}"})
dist.all_reduce(torch.ones(1))
print(json.dumps(outcomes), flush=True)
dist.barrier()  # neither rank tears gloo down while the other still talks to it (an abort at exit otherwise)
from resilient_tune.distributed import close_process_group
close_process_group(exit_code=0)  # past the teardown where gloo can abort
"""


def test_a_failed_rank_zero_write_keeps_two_ranks_in_agreement(tmp_path):
    """2 processes over gloo: rank 0's resilient write fails. Non-strict, both ranks record it and go on; strict,
    both raise (rank 0 its own error, rank 1 the same class naming rank 0's). Both reach the next collective."""
    from _ranks import run_two_ranks

    (tmp_path / "blocked").write_text("not a folder")
    ranks = run_two_ranks(tmp_path, _TWO_RANKS, hang="a rank hung after rank 0's failed write")
    outcomes = [outcome for printed in ranks for outcome in printed]
    folder = str(tmp_path / "blocked" / "resilient")
    agreed = {o["rank"]: o["agreed"] for o in outcomes if "agreed" in o}
    assert agreed[1] == "ValueError: rank 1's shard is NaN" and agreed[0].startswith(
        "RankError: another rank failed"
    )
    outcomes = [o for o in outcomes if "agreed" not in o]
    assert len(outcomes) == 4 and all(o["after"] == 2.0 for o in outcomes)
    for o in outcomes:
        if o["strict"]:
            assert o["raised"].startswith("UsageError") and "is a file" in o["raised"] and o["failures"] == []
            assert ("rank 0 failed writing" in o["raised"]) == (o["rank"] == 1)
        else:
            assert o["returned"] is None and "raised" not in o
            assert [f["path"] for f in o["failures"]] == [folder]
            assert "is a file" in o["failures"][0]["error"]
    assert (tmp_path / "blocked").read_text() == "not a folder"


def test_a_sharded_resume_state_gives_each_rank_its_own_folder(tmp_path):
    from resilient_tune.session._base import PER_RANK_FORMAT, _rank_state

    state = {
        "format": PER_RANK_FORMAT,
        "ranks": [{"folder": str(tmp_path / "gone" / "rank0-of-1"), "names": []}],
    }
    assert _rank_state(state, None)["folder"].endswith("rank0-of-1")  # this process is rank 0 of 1
    (tmp_path / "moved" / "rank0-of-1").mkdir(parents=True)
    assert _rank_state(state, tmp_path / "moved")["folder"] == str(
        (tmp_path / "moved" / "rank0-of-1").resolve()
    )
    two = {"format": PER_RANK_FORMAT, "ranks": [state["ranks"][0], state["ranks"][0]]}
    with pytest.raises(UsageError, match="in 2 per-rank folders, but this run has 1 process"):
        _rank_state(two, None)
    with pytest.raises(UsageError, match="no base snapshot for rank 0"):
        _rank_state({"format": PER_RANK_FORMAT, "ranks": [None]}, None)
