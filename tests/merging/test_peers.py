"""Parity with the peer implementations: mergekit (non-uniform weights) and peft (weights all 1)."""

from __future__ import annotations

import pytest
import torch

from resilient_tune.merging import merge_tensor, tensor_generator

pytestmark = pytest.mark.peers

WEIGHTS = [0.7, 1.3, 0.4]


def _models(shape: tuple[int, ...] = (12, 10), seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) for _ in WEIGHTS]


@pytest.mark.parametrize(
    ("method", "ours", "theirs"),
    [
        ("task_arithmetic", {"lambda": 0.8}, {}),
        ("ties", {"lambda": 0.8, "density": 0.6}, {}),
        ("ties", {"lambda": 1.0, "density": 0.2}, {}),
        ("breadcrumbs", {"lambda": 1.2, "density": 0.6, "gamma": 0.1}, {}),
        # mergekit's breadcrumbs_ties defaults to normalize=False; we always divide by the agreeing weights
        ("breadcrumbs_ties", {"lambda": 0.9, "density": 0.7, "gamma": 0.05}, {"normalize": True}),
    ],
)
def test_task_vector_methods_match_mergekit(
    method: str, ours: dict[str, float], theirs: dict[str, object]
) -> None:
    api = pytest.importorskip("mergekit.merge_methods")
    base, models = _models()
    parameters = {"weight": WEIGHTS, **{k: v for k, v in ours.items()}, **theirs}
    expected = api.merge_tensors([base, *models], method, parameters=parameters, base_index=0)
    got = merge_tensor(method, models, WEIGHTS, base=base, options=ours, key="w")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_linear_matches_mergekit() -> None:
    api = pytest.importorskip("mergekit.merge_methods")
    _, models = _models()
    weights = [0.2, 0.5, 0.3]
    expected = api.merge_tensors(models, "linear", parameters={"weight": weights, "normalize": False})
    torch.testing.assert_close(merge_tensor("linear", models, weights), expected, rtol=1e-6, atol=1e-6)


def test_sign_consensus_matches_mergekit_get_mask_with_a_negative_weight() -> None:
    gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")
    base, models = _models(seed=3)
    weights = [0.7, -0.4, 1.5]
    deltas = torch.stack([m - base for m in models])
    w = torch.tensor(weights).view(-1, 1, 1)
    mask = gta.get_mask(deltas * w, method="sum")
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1
    expected = base + (deltas * w * mask).sum(0) / divisor
    got = merge_tensor("ties", models, weights, base=base, options={"density": 1.0})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_ties_matches_peft_with_unit_weights(density: float) -> None:
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    base, models = _models(seed=1)
    ones = [1.0] * len(models)
    expected = base + merge_utils.ties([m - base for m in models], torch.tensor(ones), density)
    got = merge_tensor("ties", models, ones, base=base, options={"density": density})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _peft_dare_deltas(
    merge_utils, base: torch.Tensor, models: list[torch.Tensor], density: float, seed: int, key: str
) -> torch.Tensor:
    pruned = []
    for i, model in enumerate(models):
        torch.manual_seed(tensor_generator(seed, key, i).initial_seed())
        pruned.append(merge_utils.random_pruning(model - base, density, rescale=True))
    return torch.stack(pruned)


@pytest.mark.parametrize("density", [0.3, 0.8])
def test_dare_linear_matches_peft_pruning_per_input(density: float) -> None:
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    base, models = _models(seed=2)
    pruned = _peft_dare_deltas(merge_utils, base, models, density, seed=4, key="layers.0.w")
    expected = base + merge_utils.task_arithmetic(list(pruned), torch.tensor(WEIGHTS))
    got = merge_tensor(
        "dare_linear", models, WEIGHTS, base=base, options={"density": density}, key="layers.0.w", seed=4
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("density", [0.3, 0.8])
def test_dare_ties_matches_peft_with_unit_weights(density: float) -> None:
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    base, models = _models(seed=5)
    pruned = _peft_dare_deltas(merge_utils, base, models, density, seed=7, key="k")
    sign_mask = merge_utils.calculate_majority_sign_mask(pruned, method="total")
    expected = base + merge_utils.disjoint_merge(pruned, sign_mask)
    got = merge_tensor(
        "dare_ties", models, [1.0] * len(models), base=base, options={"density": density}, key="k", seed=7
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
