"""SLERP, Model Stock and DELLA: parity with mergekit 0.1.5's own implementations (its functions, called on the same
tensors; DELLA with mergekit's ``torch.bernoulli`` fed our per-tensor generators, so the masks agree), and the edge
cases by hand."""

from __future__ import annotations

import math

import pytest
import torch

from resilient_tune.errors import UsageError
from resilient_tune.merging import merge_tensor, resolve_options
from resilient_tune.merging._combine import SLERP_DOT_THRESHOLD
from resilient_tune.merging._sparsify import tensor_generator

mergekit = pytest.importorskip("mergekit")
pytestmark = pytest.mark.peers

from mergekit.merge_methods import registry as mk_registry  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.merge_methods.model_stock import model_stock_merge_method  # noqa: E402
from mergekit.merge_methods.slerp import slerp as mk_slerp  # noqa: E402


def _tensors(n: int, shape=(6, 5), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


# ---------------------------------------------------------------------------- SLERP
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.85, 1.0])
@pytest.mark.parametrize("shape", [(6, 5), (7,), (2, 3, 4)])
def test_slerp_matches_mergekit(t, shape):
    base, model = _tensors(2, shape)
    ours = merge_tensor("slerp", [model], [1.0], base=base, options={"t": t})
    theirs = mk_slerp(torch.tensor([t]), base.unsqueeze(0), model.unsqueeze(0))[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_slerp_ends_and_norm_are_spherical():
    base, model = _tensors(2)
    torch.testing.assert_close(
        merge_tensor("slerp", [model], [1.0], base=base, options={"t": 0.0}), base, atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        merge_tensor("slerp", [model], [1.0], base=base, options={"t": 1.0}), model, atol=1e-6, rtol=0
    )
    unit_a, unit_b = base / base.norm(), model / model.norm()  # on the unit sphere the midpoint keeps norm 1
    mid = merge_tensor("slerp", [unit_b], [1.0], base=unit_a, options={"t": 0.5})
    assert float(mid.norm()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("factor", [2.0, -3.0], ids=["parallel", "antiparallel"])
def test_slerp_falls_back_to_linear_within_1_8_degrees(factor):
    base = _tensors(1)[0]
    model = factor * base  # cos = ±1: no arc to follow
    out = merge_tensor("slerp", [model], [1.0], base=base, options={"t": 0.25})
    torch.testing.assert_close(out, 0.75 * base + 0.25 * model)
    assert math.degrees(math.acos(SLERP_DOT_THRESHOLD)) == pytest.approx(
        1.81, abs=0.01
    )  # the documented angle


def test_slerp_of_a_zero_task_vector_and_of_zero_vectors():
    base = _tensors(1)[0]
    torch.testing.assert_close(
        merge_tensor("slerp", [base.clone()], [1.0], base=base, options={"t": 0.7}), base
    )
    # a zero vector has no direction: mergekit's rule (kept here) takes it as orthogonal, so the arc gives sin(t·π/2)
    zero, other = torch.zeros(4, 3), torch.ones(4, 3)
    out = merge_tensor("slerp", [other], [1.0], base=zero, options={"t": 0.4})
    torch.testing.assert_close(out, math.sin(0.4 * math.pi / 2) * other)
    theirs = mk_slerp(torch.tensor([0.4]), zero.unsqueeze(0), other.unsqueeze(0))[0]
    torch.testing.assert_close(out, theirs)


def test_slerp_copies_integer_buffers_and_refuses_bad_calls():
    ids = torch.arange(5)
    assert torch.equal(merge_tensor("slerp", [ids.clone()], [1.0], base=ids, options={"t": 0.5}), ids)
    a, b, c = _tensors(3)
    with pytest.raises(
        UsageError, match=r"exactly 1 model.*SLERP interpolates between the base and one model"
    ):
        merge_tensor("slerp", [b, c], [1.0, 1.0], base=a)
    with pytest.raises(UsageError, match=r"t=1.5 .* in \[0, 1\]"):
        resolve_options("slerp", {"t": 1.5})
    with pytest.raises(UsageError, match=r"takes no weights.*pass t="):
        merge_tensor("slerp", [b], [0.3], base=a)
    with pytest.raises(UsageError, match="needs a base"):
        merge_tensor("slerp", [b], [1.0])


# ---------------------------------------------------------------------------- Model Stock
@pytest.mark.parametrize("n", [2, 3, 5])
def test_model_stock_matches_mergekit(n):
    base, *models = _tensors(n + 1, seed=n)
    models = [base + 0.1 * m for m in models]  # fine-tunes near the base
    ours = merge_tensor("model_stock", models, [1.0] * n, base=base)
    theirs = model_stock_merge_method.merge_group(TensorGroup.from_tensors([base, *models], base_index=0))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_model_stock_by_hand_and_its_edges():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0.0, 1, 0, 0])  # orthogonal task vectors: cos 0, t 0
    torch.testing.assert_close(merge_tensor("model_stock", [a, b], [1, 1], base=base), base)
    same = merge_tensor("model_stock", [a, a.clone()], [1, 1], base=base)  # cos 1: t = 2/(1+1) = 1, the mean
    torch.testing.assert_close(same, a)
    # cos -1 with two models: 1 + (N - 1)·c = 0, no finite ratio: the base is kept
    torch.testing.assert_close(merge_tensor("model_stock", [a, -a], [1, 1], base=base), base)
    torch.testing.assert_close(
        merge_tensor("model_stock", [base.clone(), base.clone()], [1, 1], base=base), base
    )
    with pytest.raises(UsageError, match=r"at least 2 model.*needs two or more fine-tuned models"):
        merge_tensor("model_stock", [a], [1.0], base=base)
    ids = torch.arange(4)
    assert torch.equal(merge_tensor("model_stock", [ids.clone(), ids.clone()], [1, 1], base=ids), ids)


# ---------------------------------------------------------------------------- DELLA
@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(8, 6), (9,)])
def test_della_matches_mergekit_with_the_same_masks(method, shape, monkeypatch):
    base, *models = _tensors(4, shape, seed=7)
    density, epsilon, seed, key = 0.5, 0.2, 3, "layer.weight"
    ours = merge_tensor(
        method,
        models,
        [1.0] * 3,
        base=base,
        options={"density": density, "epsilon": epsilon},
        seed=seed,
        key=key,
    )
    generators = iter(tensor_generator(seed, key, i) for i in range(3))
    original = torch.bernoulli
    monkeypatch.setattr(
        torch, "bernoulli", lambda probs, *a, **k: original(probs, generator=next(generators))
    )
    mk = mk_registry.get(method)
    params = {
        "weight": {i: 1.0 for i in range(1, 4)},
        "density": {i: density for i in range(1, 4)},
        "epsilon": {i: epsilon for i in range(1, 4)},
        "lambda": 1.0,
        "rescale": True,
        "normalize": method == "della",
        "int8_mask": False,
    }
    theirs = mk.merge_group(TensorGroup.from_tensors([base, *models], base_index=0), **params)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_della_keeps_larger_magnitudes_more_often_and_checks_epsilon():
    delta = torch.linspace(0.01, 1.0, 1000).reshape(1, -1)  # one row, ranked by magnitude
    kept = torch.zeros_like(delta)
    for seed in range(40):
        out = merge_tensor(
            "della_linear",
            [delta],
            [1.0],
            base=torch.zeros_like(delta),
            options={"density": 0.5, "epsilon": 0.3},
            seed=seed,
        )
        kept += (out != 0).float()
    low, high = kept[0, :100].mean() / 40, kept[0, -100:].mean() / 40
    assert 0.15 < float(low) < 0.3 and 0.7 < float(high) < 0.85  # density ∓ epsilon at the ends
    unchanged = merge_tensor(
        "della", [delta], [1.0], base=torch.zeros_like(delta), options={"density": 1.0, "epsilon": 0.0}
    )
    torch.testing.assert_close(unchanged, delta)
    with pytest.raises(
        UsageError, match=r"epsilon=0.6 with density=0.5 .* epsilon < min\(density, 1 - density\) = 0.5"
    ):
        resolve_options("della", {"density": 0.5, "epsilon": 0.6})
    with pytest.raises(UsageError, match=r"epsilon=-0.1 .* \[0, 1\)"):
        resolve_options("della", {"epsilon": -0.1})


def test_bad_slerp_and_model_stock_calls_fail_before_reading(tmp_path):
    """Refused from the arguments alone: the paths below do not even exist, and nothing is written."""
    import resilient_tune as rt

    missing = [str(tmp_path / name) for name in ("a", "b", "base")]
    with pytest.raises(UsageError, match="exactly 1 model"):
        rt.merge(missing[:2], method="slerp", base=missing[2], out=tmp_path / "out")
    with pytest.raises(UsageError, match="at least 2 model"):
        rt.merge(missing[:1], method="model_stock", base=missing[2], out=tmp_path / "out")
    with pytest.raises(UsageError, match="takes no weights"):
        rt.merge(missing[:1], [0.3], method="slerp", base=missing[2], out=tmp_path / "out")
    with pytest.raises(UsageError, match=r"t=2.0 .* \[0, 1\]"):
        rt.merge(missing[:1], method="slerp", base=missing[2], t=2.0, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
