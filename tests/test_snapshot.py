"""Snapshot of the trainable parameters: memory/disk storage, dtypes, sizes, state round trip."""

from __future__ import annotations

import json

import pytest
import torch

from resilient_tune.errors import IncompatibleModelsError, UsageError
from resilient_tune.snapshot import Snapshot, trainable_parameters


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 6), torch.nn.LayerNorm(6))
    model[0].weight.requires_grad_(False)  # frozen: not part of the snapshot
    return model


def test_memory_snapshot_copies_only_trainable_parameters():
    model = _model()
    snap = Snapshot.take(model)
    assert snap.names == ["1.weight", "1.bias", "2.weight", "2.bias"]
    assert snap.storage == "memory"
    for name, p in trainable_parameters(model):
        assert torch.equal(snap.get(name), p.detach())
        assert snap.get(name).data_ptr() != p.data_ptr()  # a copy, not a view
    with torch.no_grad():
        model[1].weight.add_(1.0)
    assert not torch.equal(snap.get("1.weight"), model[1].weight.detach())
    assert snap.nbytes == sum(p.numel() * 4 for _, p in trainable_parameters(model))


def test_half_precision_storage_halves_the_footprint():
    model = _model()
    full = Snapshot.take(model)
    half = Snapshot.take(model, dtype="bf16")
    assert half.nbytes * 2 == full.nbytes
    assert half.get("1.weight").dtype == torch.bfloat16
    assert half.source_dtype("1.weight") == torch.float32
    torch.testing.assert_close(half.get("1.weight").float(), model[1].weight.detach(), rtol=1e-2, atol=1e-2)


def test_disk_snapshot_is_lazy_and_reloads_from_state(tmp_path):
    model = _model()
    snap = Snapshot.take(model, folder=tmp_path / "base")
    assert snap.storage == "disk" and snap.nbytes == 0
    assert snap.stored_bytes == sum(p.numel() * 4 for _, p in trainable_parameters(model))
    assert (tmp_path / "base" / "model.safetensors").is_file()
    state = json.loads(json.dumps(snap.state()))  # JSON-able
    again = Snapshot.load(state)
    for name, p in trainable_parameters(model):
        assert torch.equal(again.get(name), p.detach())
    in_memory = Snapshot.load(state, device="cpu")
    assert in_memory.storage == "memory" and in_memory.nbytes == snap.stored_bytes


def test_memory_snapshot_state_needs_persist(tmp_path):
    model = _model()
    snap = Snapshot.take(model)
    with pytest.raises(UsageError, match="persist"):
        Snapshot.load(snap.state())
    snap.persist(tmp_path / "kept")
    again = Snapshot.load(snap.state())
    assert torch.equal(again.get("2.bias"), model[2].bias.detach())


def test_changed_folder_is_detected(tmp_path):
    model = _model()
    snap = Snapshot.take(model, folder=tmp_path / "base")
    state = snap.state()
    Snapshot.take(_model(seed=1), folder=tmp_path / "base", overwrite=True)
    with pytest.raises(IncompatibleModelsError, match="changed"):
        Snapshot.load(state)


def test_check_names_the_mismatch():
    model = _model()
    snap = Snapshot.take(model)
    model[0].weight.requires_grad_(True)
    with pytest.raises(IncompatibleModelsError, match=r"'0.weight'"):
        snap.check(model)


def test_bad_inputs():
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(UsageError, match="no trainable parameters"):
        Snapshot.take(model)
    with pytest.raises(UsageError, match="dtype"):
        Snapshot.take(_model(), dtype="int8")


def test_peers_pair_by_any_name_of_a_tied_parameter_and_stay_lazy():
    from resilient_tune.errors import IncompatibleModelsError
    from resilient_tune.peers import PeerCheckpoints

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight  # tied: named_parameters() lists "embed.weight" only

    model = Tied()
    peer = {"head.weight": torch.ones(5, 3)}  # the peer stored the tie under the other name
    peers = PeerCheckpoints.open([peer], model)
    assert torch.equal(peers.get(0, "embed.weight"), torch.ones(5, 3))
    assert peers.names == ["peer 1"] and len(peers.fingerprints[0]) == 64
    with pytest.raises(IncompatibleModelsError, match=r"\(5, 3\).*\(4, 3\)|\(4, 3\).*\(5, 3\)"):
        PeerCheckpoints.open([{"embed.weight": torch.ones(4, 3)}], model)
