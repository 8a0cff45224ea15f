"""CocktailEngine: in-place swap with bit-exact restore, drift, merged state dict, written folders."""

from __future__ import annotations

import json

import pytest
import torch

from resilient_tune.engine import CocktailEngine
from resilient_tune.errors import IncompatibleModelsError, UsageError

transformers = pytest.importorskip("transformers")


def _gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


def _train_a_bit(model: torch.nn.Module, seed: int = 1) -> None:
    """Move the trainable weights (as training would), deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _live(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def trained():
    model = _gpt2()
    model.transformer.wpe.weight.requires_grad_(False)  # one frozen parameter
    engine = CocktailEngine(alpha=0.3)
    engine.begin(model)
    base = _live(model)
    _train_a_bit(model)
    return model, engine, base


def test_swapped_puts_the_mix_in_and_restores_bit_exactly(trained):
    model, engine, base = trained
    live = _live(model)
    with engine.swapped(model, 0.3) as swapped:
        assert swapped is model
        for key, value in model.state_dict().items():
            expected = base[key] + 0.3 * (live[key] - base[key])
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
        assert torch.equal(model.transformer.wpe.weight, live["transformer.wpe.weight"])  # frozen, untouched
    for key, value in model.state_dict().items():
        assert torch.equal(value, live[key]), key


def test_swapped_restores_after_an_exception(trained):
    model, engine, _ = trained
    live = _live(model)
    with pytest.raises(RuntimeError, match="boom"), engine.swapped(model, 0.0):
        raise RuntimeError("boom")
    for key, value in model.state_dict().items():
        assert torch.equal(value, live[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_tensor_into_out_equals_the_allocating_path(trained, dtype):
    model, engine, _ = trained
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    current = param.detach().to(dtype)
    out = torch.empty_like(current)
    written = engine.merged_tensor(name, current, 0.3, out=out)
    assert written is out  # float32: computed in place; half precision: copied in
    assert torch.equal(out, engine.merged_tensor(name, current, 0.3))  # what probes see is what is written


def test_a_non_finite_mix_mid_swap_restores_every_parameter(trained):
    from resilient_tune.errors import NonFiniteError

    model, engine, _ = trained
    name = [n for n, p in model.named_parameters() if p.requires_grad][-1]  # written last, in place
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[0] = float("nan")
    live = _live(model)
    with pytest.raises(NonFiniteError, match="NaN or Inf"), engine.swapped(model, 0.5):
        pass
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, live[key], rtol=0, atol=0, equal_nan=True)


def test_alpha_zero_is_the_base_and_one_is_the_live_model(trained):
    model, engine, base = trained
    live = _live(model)
    with engine.swapped(model, 0.0):
        for key, value in model.state_dict().items():
            assert torch.equal(value, base[key]), key
    merged = engine.merged_state_dict(model, 1.0)
    for key, value in merged.items():
        assert torch.equal(value, live[key]), key


def test_merged_state_dict_keeps_tied_names_and_does_not_touch_the_model(trained):
    model, engine, base = trained
    live = _live(model)
    merged = engine.merged_state_dict(model)
    assert set(merged) == set(live)
    assert torch.equal(merged["lm_head.weight"], merged["transformer.wte.weight"])
    expected = base["lm_head.weight"] + 0.3 * (live["lm_head.weight"] - base["lm_head.weight"])
    torch.testing.assert_close(merged["lm_head.weight"], expected, rtol=0, atol=1e-6)
    for key, value in model.state_dict().items():
        assert torch.equal(value, live[key])


def test_task_arithmetic_with_lambda_one_equals_linear(trained):
    model, _, _ = trained
    linear = CocktailEngine(alpha=0.4)
    linear.attach(trained[1].snapshot, model)
    ta = CocktailEngine(alpha=0.4, method="task_arithmetic")
    ta.attach(trained[1].snapshot, model)
    a, b = linear.merged_state_dict(model), ta.merged_state_dict(model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_drift_is_the_norm_of_the_change(trained):
    model, engine, base = trained
    drift = engine.drift(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    sq = {
        n: float((p.detach() - base[n]).pow(2).sum()) for n, p in model.named_parameters() if n in trainable
    }
    assert drift.total == pytest.approx(sum(sq.values()) ** 0.5, rel=1e-5)
    layer0 = sum(v for n, v in sq.items() if n.startswith("transformer.h.0."))
    assert drift.per_layer["transformer.h.0"] == pytest.approx(layer0**0.5, rel=1e-5)
    assert "transformer.wpe.weight" not in drift.per_layer  # frozen
    assert 0 < drift.relative < 1


def test_write_is_loadable_and_carries_the_recipe(trained, tmp_path):
    model, engine, base = trained
    live = _live(model)
    folder = engine.write(model, tmp_path / "resilient", 0.25, metadata={"step": 7})
    doc = json.loads((folder / "cocktail.json").read_text())
    assert doc["alpha"] == 0.25 and doc["step"] == 7
    assert doc["recipe"]["method"] == "linear" and doc["recipe"]["weights"] == [0.25, 0.75]
    assert (folder / "README.md").is_file() and (folder / "config.json").is_file()
    loaded = transformers.GPT2LMHeadModel.from_pretrained(folder)
    for key, value in loaded.state_dict().items():
        expected = base[key] + doc["alpha"] * (live[key] - base[key])
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    with pytest.raises(UsageError, match="exists"):
        engine.write(model, folder, 0.25)


def test_disk_and_half_snapshots_merge_against_what_they_store(tmp_path):
    model = _gpt2()
    disk = CocktailEngine(alpha=0.5, snapshot_dir=tmp_path / "base")
    disk.begin(model)
    half = CocktailEngine(alpha=0.5, snapshot_dtype="bf16")
    half.begin(model)
    base = _live(model)
    _train_a_bit(model)
    live = _live(model)
    d = disk.merged_state_dict(model)
    h = half.merged_state_dict(model)
    for key in d:
        torch.testing.assert_close(d[key], 0.5 * (base[key] + live[key]), rtol=0, atol=1e-6)
        rounded = (
            base[key].to(torch.bfloat16).float() if model.get_parameter(key).requires_grad else base[key]
        )
        torch.testing.assert_close(h[key], 0.5 * (rounded + live[key]), rtol=0, atol=1e-6)
    assert half.snapshot.nbytes * 2 == CocktailEngine().begin(model).nbytes


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "0.5", True])
def test_alpha_outside_the_unit_interval_is_refused(alpha):
    with pytest.raises(UsageError, match="alpha"):
        CocktailEngine(alpha=alpha)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(UsageError, match="linear"):
        CocktailEngine(method="soup")


def test_no_snapshot_yet_is_a_clear_error():
    with pytest.raises(UsageError, match="begin"):
        CocktailEngine().drift(_gpt2())


# ---------------------------------------------------------------------------- peers
@pytest.fixture
def with_peers(tmp_path):
    """A trained GPT-2 (one frozen parameter), its base state, and two peer checkpoints written by
    save_pretrained (tied lm_head stored once)."""
    peers, states = [], []
    for seed in (11, 12):
        peer = _gpt2(seed)
        peer.save_pretrained(tmp_path / f"peer{seed}")
        peers.append(tmp_path / f"peer{seed}")
        states.append(_live(peer))
    model = _gpt2()
    model.transformer.wpe.weight.requires_grad_(False)
    base = _live(model)
    return model, base, peers, states


def _paper_mix(alpha, weights, tuned, base, peers, key):
    """θ = α·θₜ + (1 − α)·Σ wᵢ θᵢ over base and peers (the paper's formula, the test oracle)."""
    rest = weights[0] * base[key] + sum(w * p[key] for w, p in zip(weights[1:], peers))
    return alpha * tuned[key] + (1 - alpha) * rest


def test_peers_mix_trainable_parameters_as_the_paper(with_peers):
    model, base, peers, states = with_peers
    engine = CocktailEngine(alpha=0.4, peers=peers, weights=[0.5, 0.3, 0.2])
    engine.begin(model)
    _train_a_bit(model)
    tuned = _live(model)
    merged = engine.merged_state_dict(model)
    for key, value in merged.items():
        if key == "transformer.wpe.weight":  # frozen: keeps the base value, peers are not mixed in
            assert torch.equal(value, base[key])
            continue
        expected = _paper_mix(0.4, [0.5, 0.3, 0.2], tuned, base, states, key)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    assert torch.equal(merged["lm_head.weight"], merged["transformer.wte.weight"])
    assert engine.recipe_for(0.4).weights == pytest.approx((0.4, 0.3, 0.18, 0.12))


def test_default_peer_weights_are_uniform_and_task_arithmetic_equals_linear(with_peers):
    model, base, peers, states = with_peers
    linear = CocktailEngine(alpha=0.3, peers=peers)
    assert linear.weights == pytest.approx((1 / 3,) * 3)
    linear.begin(model)
    ta = CocktailEngine(alpha=0.3, method="task_arithmetic", peers=peers)
    ta.attach(linear.snapshot, model)
    _train_a_bit(model)
    assert ta.recipe_for(0.3).weights == pytest.approx((0.3, 0.7 / 3, 0.7 / 3))  # base θ₀, inputs [θₜ, peers]
    a, b = linear.merged_state_dict(model), ta.merged_state_dict(model)
    tuned = _live(model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
        if key != "transformer.wpe.weight":
            torch.testing.assert_close(
                a[key], _paper_mix(0.3, [1 / 3] * 3, tuned, base, states, key), rtol=0, atol=1e-6
            )


def test_ingredients_swap_in_as_stored_and_restore_bit_exactly(with_peers):
    model, base, peers, states = with_peers
    engine = CocktailEngine(peers=peers)
    engine.begin(model)
    _train_a_bit(model)
    live = _live(model)
    with engine.swapped_ingredient(model, 2):
        for key, value in model.state_dict().items():
            assert torch.equal(value, base[key] if key == "transformer.wpe.weight" else states[1][key]), key
    with engine.swapped_ingredient(model, 0):
        for key, value in model.state_dict().items():
            assert torch.equal(value, base[key]), key
    with engine.swapped(model, 0.0, weights=[0.0, 1.0, 0.0]):
        torch.testing.assert_close(
            model.transformer.h[0].mlp.c_fc.weight, states[0]["transformer.h.0.mlp.c_fc.weight"]
        )
    for key, value in model.state_dict().items():
        assert torch.equal(value, live[key]), key
    with pytest.raises(UsageError, match=r"\[0, 2\]"), engine.swapped_ingredient(model, 3):
        pass


def test_peers_are_streamed_one_tensor_at_a_time(with_peers, monkeypatch, tmp_path):
    from resilient_tune.peers import PeerCheckpoints

    model, _, peers, _ = with_peers
    engine = CocktailEngine(peers=peers)
    engine.begin(model)
    reads: list[tuple[int, str]] = []
    original = PeerCheckpoints.get

    def spy(self, index, name):
        reads.append((index, name))
        return original(self, index, name)

    monkeypatch.setattr(PeerCheckpoints, "get", spy)
    engine.write(model, tmp_path / "out", 0.5)
    names = [name for _, name in reads]
    # every parameter's peer tensors are read together, once each: never a whole peer at once
    assert len(reads) == 2 * len(set(names))
    for i in range(0, len(reads), 2):
        assert reads[i] == (0, names[i]) and reads[i + 1] == (1, names[i])


def test_write_with_peers_records_identities_and_weights(with_peers, tmp_path):
    model, base, peers, states = with_peers
    engine = CocktailEngine(alpha=0.6, peers=peers)
    engine.begin(model)
    _train_a_bit(model)
    tuned = _live(model)
    folder = engine.write(model, tmp_path / "res", weights=[0.2, 0.2, 0.6])
    doc = json.loads((folder / "cocktail.json").read_text())
    roles = [i["role"] for i in doc["ingredients"]]
    assert roles == ["model", "base", "peer", "peer"]
    from resilient_tune.checkpoint import CheckpointReader

    for entry, path, w in zip(doc["ingredients"][2:], peers, (0.2, 0.6)):
        assert entry["name"] == str(path) and entry["mix_weight"] == pytest.approx(w)
        assert entry["weight"] == pytest.approx(0.4 * w)
        with CheckpointReader(path) as reader:
            assert entry["fingerprint"] == reader.fingerprint()
    assert doc["ingredients"][1]["mix_weight"] == pytest.approx(0.2)
    assert doc["recipe"]["weights"] == pytest.approx([0.6, 0.08, 0.08, 0.24])
    assert list(doc["ingredient_weights"]) == ["base", str(peers[0]), str(peers[1])]
    loaded = transformers.GPT2LMHeadModel.from_pretrained(folder)
    for key, value in loaded.state_dict().items():
        expected = (
            base[key]
            if key == "transformer.wpe.weight"
            else _paper_mix(0.6, [0.2, 0.2, 0.6], tuned, base, states, key)
        )
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)


def test_write_dedupes_tied_weights_unless_asked_not_to(trained, tmp_path):
    from safetensors.torch import load_file

    model, engine, _ = trained
    deduped = load_file(str(engine.write(model, tmp_path / "once", 0.4) / "model.safetensors"))
    every = load_file(
        str(engine.write(model, tmp_path / "all", 0.4, dedupe_tied=False) / "model.safetensors")
    )
    assert "lm_head.weight" not in deduped  # tied to transformer.wte.weight: written once, as save_pretrained
    assert sorted(every) == sorted(model.state_dict())  # every key, as load_state_dict of the module expects
    merged = engine.merged_state_dict(model, 0.4)
    for key, value in every.items():
        torch.testing.assert_close(value, merged[key], rtol=0, atol=0)


def test_peers_pair_with_a_transformers_model_nested_in_a_module(tmp_path):
    class Wrapper(torch.nn.Module):  # e.g. a LightningModule holding self.model
        def __init__(self) -> None:
            super().__init__()
            self.model = _gpt2()

    _gpt2(seed=3).save_pretrained(tmp_path / "peer")  # keys without the wrapper's "model." prefix
    wrapper = Wrapper()
    engine = CocktailEngine(peers=[tmp_path / "peer"])
    engine.begin(wrapper)
    peer = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "peer")
    with engine.swapped_ingredient(wrapper, 1):
        assert torch.equal(wrapper.model.lm_head.weight, peer.lm_head.weight)  # tied: found via its alias
        assert torch.equal(
            wrapper.model.transformer.h[1].mlp.c_fc.weight, peer.transformer.h[1].mlp.c_fc.weight
        )


def test_prefixed_peers_pair_with_the_base_model_names(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    transformers.BertModel(config).save_pretrained(
        tmp_path / "encoder_peer"
    )  # keys without the "bert." prefix
    model = transformers.BertForSequenceClassification(config)
    engine = CocktailEngine(peers=[tmp_path / "encoder_peer"])
    with pytest.raises(IncompatibleModelsError, match=r"'classifier\.weight'"):
        engine.begin(model)  # the trainable head is not in a BertModel checkpoint
    model.classifier.requires_grad_(False)
    engine.begin(model)
    peer = transformers.BertModel.from_pretrained(tmp_path / "encoder_peer")
    with engine.swapped_ingredient(model, 1):
        assert torch.equal(
            model.bert.encoder.layer[0].output.dense.weight, peer.encoder.layer[0].output.dense.weight
        )


def test_peers_of_another_architecture_name_the_first_mismatching_key(tmp_path):
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(IncompatibleModelsError, match=r"bert has no tensor .* 'transformer\.wte\.weight'"):
        CocktailEngine(peers=[tmp_path / "bert"]).begin(_gpt2())
    wide = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    )
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(IncompatibleModelsError, match=r"'transformer.wte.weight'.*\(50, 32\).*\(50, 16\)"):
        CocktailEngine(peers=[tmp_path / "wide"]).begin(_gpt2())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"peers": ["/no/such/peer"]}, "does not exist"),
        ({"peers": "/a/path"}, "list of checkpoint paths"),
        ({"peers": [3]}, "int"),
        ({"weights": [0.5, 0.5]}, "2 weights for 1 ingredients"),
        ({"weights": [1.5, -0.5]}, ">= 0"),
    ],
)
def test_bad_peers_and_weights_are_refused(kwargs, match):
    with pytest.raises(UsageError, match=match):
        CocktailEngine(**kwargs)


def test_weights_must_sum_to_one(with_peers):
    _, _, peers, _ = with_peers
    engine = CocktailEngine(peers=peers)
    with pytest.raises(UsageError, match=r"sum to 0\.9"):
        engine.set_weights([0.3, 0.3, 0.3])
    assert engine.set_weights([0.2, 0.3, 0.5]) == (0.2, 0.3, 0.5)


def test_lines_scales_each_layer_by_its_depth(trained):
    model, snap_engine, base = trained
    engine = CocktailEngine(alpha=1.0, method="lines", options={"lines_alpha": 0.2, "lines_beta": 0.8})
    engine.attach(snap_engine.snapshot, model)
    live = _live(model)
    merged = engine.merged_state_dict(model)
    for key, scale in [("transformer.h.0.mlp.c_fc.weight", 0.2), ("transformer.h.1.mlp.c_fc.weight", 1.0)]:
        torch.testing.assert_close(
            merged[key], base[key] + scale * (live[key] - base[key]), rtol=0, atol=1e-6
        )
