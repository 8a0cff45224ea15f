"""merge_state_dicts over the whole registry, on small in-code state dicts."""

from __future__ import annotations

import pytest
import torch
from _contract import fit  # tests/ is on sys.path (tests/conftest.py)

from resilient_tune.errors import IncompatibleModelsError, UsageError
from resilient_tune.merging import METHODS, layer_depths, merge_state_dicts, merge_tensor, method_names


def _state_dict(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g),
        "model.layers.0.mlp.weight": torch.randn(4, 4, generator=g).half(),
        "model.layers.1.mlp.weight": torch.randn(4, 4, generator=g).to(torch.bfloat16),
        "model.layers.1.mlp.bias": torch.randn(4, generator=g),
        "model.norm.weight": torch.randn(4, generator=g),
        "model.position_ids": torch.arange(6),
        "lm_head.weight": torch.randn(10, 4, generator=g),
    }


def _call(
    method: str, models: list[dict[str, torch.Tensor]], base: dict[str, torch.Tensor], **kwargs: object
) -> dict[str, torch.Tensor]:
    models, weights = fit(method, models, [1.0 / len(models)] * len(models))
    if METHODS[method].needs_base:
        return merge_state_dicts(models, weights, method=method, base=base, **kwargs)  # type: ignore[arg-type]
    return merge_state_dicts(models, weights, method=method, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", method_names())
def test_every_method_returns_right_keys_shapes_and_dtypes(method: str) -> None:
    models, base = [_state_dict(1), _state_dict(2), _state_dict(3)], _state_dict(0)
    out = _call(method, models, base)
    assert list(out) == list(models[0])
    for key, tensor in out.items():
        assert tensor.shape == models[0][key].shape
        assert tensor.dtype == models[0][key].dtype
        assert torch.isfinite(tensor.float()).all()
    assert torch.equal(out["model.position_ids"], torch.arange(6))
    out32 = _call(method, models, base, out_dtype=torch.float32)
    assert out32["model.layers.0.mlp.weight"].dtype == torch.float32
    assert out32["model.position_ids"].dtype == torch.int64


@pytest.mark.parametrize("method", method_names())
def test_every_method_is_deterministic_and_leaves_inputs_alone(method: str) -> None:
    models, base = [_state_dict(1), _state_dict(2)], _state_dict(0)
    copies = [{k: v.clone() for k, v in sd.items()} for sd in [*models, base]]
    first = _call(method, models, base, seed=5)
    second = _call(method, models, base, seed=5)
    for key in first:
        assert torch.equal(first[key], second[key])
    for sd, copy in zip([*models, base], copies):
        for key in sd:
            assert torch.equal(sd[key], copy[key])


def test_linear_state_dicts_with_normalize() -> None:
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    assert torch.equal(merge_state_dicts([a, b], [1.0, 3.0], normalize=True)["w"], torch.tensor([2.5, 5.0]))
    with pytest.raises(UsageError, match="normalize=True"):
        merge_state_dicts([a, b], [1.0, 3.0])


def test_lines_uses_layer_depths_of_the_keys() -> None:
    base = {k: v for k, v in _state_dict(0).items() if v.is_floating_point()}
    model = {k: v.float() + 1.0 for k, v in base.items()}
    out = merge_state_dicts([model], [1.0], method="lines", base=base, out_dtype=torch.float32)
    depths = layer_depths(base)
    assert depths["model.layers.0.mlp.weight"] == 0.0 and depths["model.layers.1.mlp.weight"] == 1.0
    for key, tensor in out.items():
        torch.testing.assert_close(tensor, base[key].float() + (0.5 + 0.5 * depths[key]))


def test_dare_does_not_depend_on_key_order_or_sharding() -> None:
    models, base = [_state_dict(1), _state_dict(2)], _state_dict(0)
    full = merge_state_dicts(models, [1.0, 1.0], method="dare_ties", base=base, seed=9)
    reversed_models = [dict(reversed(list(sd.items()))) for sd in models]
    reversed_base = dict(reversed(list(base.items())))
    reordered = merge_state_dicts(reversed_models, [1.0, 1.0], method="dare_ties", base=reversed_base, seed=9)
    key = "model.layers.1.mlp.bias"
    shard = merge_state_dicts(
        [{key: sd[key]} for sd in models], [1.0, 1.0], method="dare_ties", base={key: base[key]}, seed=9
    )
    alone = merge_tensor("dare_ties", [sd[key] for sd in models], [1.0, 1.0], base=base[key], key=key, seed=9)
    for k in full:
        assert torch.equal(full[k], reordered[k])
    assert torch.equal(full[key], shard[key]) and torch.equal(full[key], alone)
    other_seed = merge_state_dicts(models, [1.0, 1.0], method="dare_ties", base=base, seed=10)
    assert not torch.equal(full["lm_head.weight"], other_seed["lm_head.weight"])


def test_missing_key_in_a_model_or_the_base_is_named() -> None:
    a, b = _state_dict(1), _state_dict(2)
    del b["model.norm.weight"]
    with pytest.raises(IncompatibleModelsError, match=r"model 1 lacks tensor 'model.norm.weight'"):
        merge_state_dicts([a, b], [0.5, 0.5])
    base = _state_dict(0)
    del base["lm_head.weight"]
    with pytest.raises(IncompatibleModelsError, match=r"the base lacks tensor 'lm_head.weight'"):
        merge_state_dicts([a, _state_dict(2)], [1.0, 1.0], method="ties", base=base)


def test_shape_mismatch_in_state_dicts() -> None:
    a, b = _state_dict(1), _state_dict(2)
    b["lm_head.weight"] = torch.zeros(11, 4)
    with pytest.raises(IncompatibleModelsError, match=r"\(10, 4\).*\(11, 4\)"):
        merge_state_dicts([a, b], [0.5, 0.5])


def test_state_dict_argument_errors() -> None:
    a = _state_dict(1)
    with pytest.raises(UsageError, match="at least one"):
        merge_state_dicts([], [])
    with pytest.raises(UsageError, match="needs a base"):
        merge_state_dicts([a], [1.0], method="ties")
    with pytest.raises(UsageError, match="takes no base"):
        merge_state_dicts([a], [1.0], base=a)
    with pytest.raises(UsageError, match="got 1 weights for 2 models"):
        merge_state_dicts([a, a], [1.0])
    with pytest.raises(UsageError, match="unknown"):
        merge_state_dicts([a], [1.0], method="karcher")
