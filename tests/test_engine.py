"""CocktailEngine: in-place swap with bit-exact restore, drift, merged state dict, written folders."""

from __future__ import annotations

import json

import pytest
import torch

from resilient_tune.engine import CocktailEngine
from resilient_tune.errors import UsageError

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
