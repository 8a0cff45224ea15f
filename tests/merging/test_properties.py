"""Hypothesis properties of the merge core."""

from __future__ import annotations

import pytest
import torch
from _contract import fit  # tests/ is on sys.path (tests/conftest.py)
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_tune.merging import METHODS, merge_tensor, method_names

SETTINGS = settings(max_examples=40, deadline=None)

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)
shapes = st.sampled_from([(1,), (7,), (3, 5), (2, 2, 3)])


@st.composite
def models(draw: st.DrawFn, min_models: int = 1, max_models: int = 4) -> list[torch.Tensor]:
    shape = draw(shapes)
    n = draw(st.integers(min_models, max_models))
    numel = int(torch.tensor(shape).prod())
    return [
        torch.tensor(draw(st.lists(finite, min_size=numel, max_size=numel))).reshape(shape) for _ in range(n)
    ]


@SETTINGS
@given(tensors=models(), data=st.data())
def test_one_hot_linear_weights_return_that_model(tensors: list[torch.Tensor], data: st.DataObject) -> None:
    k = data.draw(st.integers(0, len(tensors) - 1))
    weights = [1.0 if i == k else 0.0 for i in range(len(tensors))]
    assert torch.equal(merge_tensor("linear", tensors, weights), tensors[k])


@SETTINGS
@given(
    tensors=models(max_models=1), n=st.integers(1, 4), method=st.sampled_from(method_names()), data=st.data()
)
def test_merging_identical_models_returns_the_model(
    tensors: list[torch.Tensor], n: int, method: str, data: st.DataObject
) -> None:
    model = tensors[0]
    if METHODS[method].needs_base:
        weights = data.draw(st.lists(st.floats(-2, 2, allow_nan=False), min_size=n, max_size=n))
        n = max(n, METHODS[method].inputs[0])  # Model Stock merges two or more
        inputs, weights = fit(method, [model.clone() for _ in range(n)], weights + [1.0] * n)
        out = merge_tensor(method, inputs, weights, base=model, key="k", depth=0.3)
        assert torch.equal(out, model)
    else:
        raw = data.draw(st.lists(st.floats(0.01, 1.0), min_size=n, max_size=n))
        weights = [w / sum(raw) for w in raw]
        out = merge_tensor(method, [model.clone() for _ in range(n)], weights)
        torch.testing.assert_close(out, model, rtol=1e-5, atol=1e-3)


@SETTINGS
@given(tensors=models(min_models=2), a=st.floats(0.0, 1.0), data=st.data())
def test_linear_is_linear_in_the_weights(tensors: list[torch.Tensor], a: float, data: st.DataObject) -> None:
    n = len(tensors)
    w1 = data.draw(st.lists(st.floats(-1, 1, allow_nan=False), min_size=n, max_size=n))
    w2 = data.draw(st.lists(st.floats(-1, 1, allow_nan=False), min_size=n, max_size=n))
    mixed = [a * x + (1 - a) * y for x, y in zip(w1, w2)]
    left = merge_tensor("linear", tensors, mixed)
    right = a * merge_tensor("linear", tensors, w1) + (1 - a) * merge_tensor("linear", tensors, w2)
    torch.testing.assert_close(left, right, rtol=1e-4, atol=1e-2)


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    key=st.text(min_size=1, max_size=12),
    method=st.sampled_from(["dare_linear", "dare_ties"]),
    density=st.floats(0.05, 0.95),
)
def test_dare_is_deterministic_per_seed_and_key(seed: int, key: str, method: str, density: float) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(256, generator=g)
    inputs = [base + torch.randn(256, generator=g) for _ in range(2)]
    opts = {"density": density}
    first = merge_tensor(method, inputs, [1.0, 1.0], base=base, options=opts, key=key, seed=seed)
    again = merge_tensor(method, inputs, [1.0, 1.0], base=base, options=opts, key=key, seed=seed)
    assert torch.equal(first, again)
    other_key = merge_tensor(method, inputs, [1.0, 1.0], base=base, options=opts, key=key + "x", seed=seed)
    assert not torch.equal(first, other_key)
    other_seed = merge_tensor(method, inputs, [1.0, 1.0], base=base, options=opts, key=key, seed=seed + 1)
    assert not torch.equal(first, other_seed)


@SETTINGS
@given(
    values=st.lists(st.floats(30000, 65504, width=16), min_size=2, max_size=6),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
)
def test_half_precision_means_never_overflow(values: list[float], dtype: torch.dtype) -> None:
    tensors = [torch.tensor([v], dtype=dtype) for v in values]
    out = merge_tensor("linear", tensors, [1.0 / len(values)] * len(values))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert min(t.item() for t in tensors) - 64 <= out.item() <= max(t.item() for t in tensors) + 64


@pytest.mark.parametrize(
    "method",
    [
        m
        for m in method_names()
        if METHODS[m].needs_base
        and METHODS[m].sparsify not in ("random", "magnitude_rank")
        and METHODS[m].inputs[1] != 1  # SLERP merges a single model with the base
    ],
)
@SETTINGS
@given(tensors=models(min_models=2, max_models=3))
def test_task_methods_do_not_depend_on_input_order(method: str, tensors: list[torch.Tensor]) -> None:
    """Every task method but DARE and DELLA (whose masks follow the input index by design) is symmetric."""
    base = torch.zeros_like(tensors[0])
    tensors, weights = fit(method, tensors, [1.0 + i for i in range(len(tensors))])
    forward = merge_tensor(method, tensors, weights, base=base, key="k")
    backward = merge_tensor(method, tensors[::-1], weights[::-1], base=base, key="k")
    torch.testing.assert_close(forward, backward, rtol=1e-5, atol=1e-2)
