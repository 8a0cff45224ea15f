"""Sparsifiers (TIES trim, DARE, breadcrumbs) and the per-tensor generator."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from resilient_tune.merging import dare_sparsify, magnitude_sparsify, outlier_sparsify, tensor_generator


def _distinct(n: int, seed: int = 0) -> torch.Tensor:
    """n values with distinct magnitudes and random signs (no ties, so every ranking is unambiguous)."""
    g = torch.Generator().manual_seed(seed)
    magnitudes = (torch.randperm(n, generator=g).float() + 1) / n
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return magnitudes * signs


# --- magnitude (TIES trim) -------------------------------------------------------------------


def test_magnitude_keeps_the_largest_entries() -> None:
    delta = torch.tensor([0.1, -0.5, 0.3, -0.2])
    assert torch.equal(magnitude_sparsify(delta, 0.5), torch.tensor([0.0, -0.5, 0.3, 0.0]))
    assert torch.equal(magnitude_sparsify(delta, 0.75), torch.tensor([0.0, -0.5, 0.3, -0.2]))


def test_magnitude_keeps_at_least_one_entry() -> None:
    delta = torch.tensor([0.1, -0.5, 0.3, -0.2])
    assert torch.equal(magnitude_sparsify(delta, 0.1), torch.tensor([0.0, -0.5, 0.0, 0.0]))


def test_magnitude_density_one_is_an_unchanged_copy() -> None:
    delta = torch.tensor([[0.1, -0.5], [0.3, -0.2]])
    out = magnitude_sparsify(delta, 1.0)
    assert torch.equal(out, delta) and out.data_ptr() != delta.data_ptr()


def test_magnitude_ties_keep_exactly_k_lowest_index_first() -> None:
    out = magnitude_sparsify(torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0]), 0.6)  # k = 3
    assert torch.equal(out, torch.tensor([1.0, -1.0, 0.0, 0.0, 2.0]))
    assert int((magnitude_sparsify(torch.ones(1000), 0.37) != 0).sum()) == 370


def test_magnitude_shapes_dtypes_and_empty() -> None:
    delta = _distinct(24).reshape(2, 3, 4).to(torch.bfloat16)
    out = magnitude_sparsify(delta, 0.5)
    assert out.shape == (2, 3, 4) and out.dtype == torch.bfloat16
    assert int((out != 0).sum()) == 12
    assert magnitude_sparsify(torch.empty(0), 0.5).numel() == 0
    assert torch.equal(magnitude_sparsify(torch.tensor(3.0), 0.5), torch.tensor(3.0))


# --- outliers (breadcrumbs) --------------------------------------------------------------------


def test_outliers_drop_the_top_gamma_and_the_bottom() -> None:
    delta = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    # n = 10, keep int(0.5 * 10) = 5, top int(0.2 * 10) = 2, bottom 3: keep magnitudes 4..8
    expected = torch.tensor([0.0, 0.0, 0.0, -4.0, 5.0, -6.0, 7.0, -8.0, 0.0, 0.0])
    assert torch.equal(outlier_sparsify(delta, 0.5, 0.2), expected)
    # gamma = 0 is plain magnitude trimming
    assert torch.equal(outlier_sparsify(delta, 0.3, 0.0), magnitude_sparsify(delta, 0.3))


def test_outliers_reduce_the_top_when_density_needs_it() -> None:
    delta = torch.arange(1.0, 11.0)
    # keep 9, top 2 would leave -1 at the bottom: bottom = 0, only the largest entry is dropped
    assert torch.equal(
        outlier_sparsify(delta, 0.9, 0.2), torch.cat([torch.arange(1.0, 10.0), torch.zeros(1)])
    )


def test_outliers_may_keep_nothing_in_a_small_tensor() -> None:
    assert torch.equal(outlier_sparsify(torch.tensor([1.0, 2.0, 3.0]), 0.3, 0.01), torch.zeros(3))


def test_outliers_density_one_unchanged_and_keep_count_exact() -> None:
    delta = _distinct(1000)
    assert torch.equal(outlier_sparsify(delta, 1.0, 0.0), delta)
    assert int((outlier_sparsify(delta, 0.4, 0.05) != 0).sum()) == 400
    ties = torch.ones(100)
    assert int((outlier_sparsify(ties, 0.5, 0.1) != 0).sum()) == 50


# --- random (DARE) -----------------------------------------------------------------------------


def test_dare_keeps_entries_rescaled_by_one_over_density() -> None:
    delta = _distinct(20_000)
    out = dare_sparsify(delta, 0.25, torch.Generator().manual_seed(3))
    kept = out != 0
    assert torch.equal(out[kept], delta[kept] / 0.25)
    assert abs(kept.float().mean().item() - 0.25) < 0.015


def test_dare_density_one_is_a_copy_and_draws_nothing() -> None:
    delta = _distinct(10)
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    out = dare_sparsify(delta, 1.0, generator)
    assert torch.equal(out, delta) and out.data_ptr() != delta.data_ptr()
    assert torch.equal(generator.get_state(), state)


def test_dare_mask_is_the_same_for_every_dtype() -> None:
    delta = _distinct(512)
    masks = [
        dare_sparsify(delta.to(dtype), 0.5, tensor_generator(1, "k", 0)) != 0
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
    ]
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])


def test_sparsifiers_do_not_mutate_their_input() -> None:
    delta = _distinct(64)
    before = delta.clone()
    magnitude_sparsify(delta, 0.3)
    outlier_sparsify(delta, 0.3, 0.1)
    dare_sparsify(delta, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(delta, before)


# --- tensor_generator ----------------------------------------------------------------------------


def _draw(generator: torch.Generator) -> torch.Tensor:
    return torch.rand(16, generator=generator)


def test_generator_is_deterministic_per_seed_key_and_index() -> None:
    assert torch.equal(_draw(tensor_generator(0, "w", 0)), _draw(tensor_generator(0, "w", 0)))
    variants = [(1, "w", 0), (0, "v", 0), (0, "w", 1), (0, "w0", 0)]
    for seed, key, index in variants:
        assert not torch.equal(_draw(tensor_generator(0, "w", 0)), _draw(tensor_generator(seed, key, index)))
    assert tensor_generator(0, "w", 0).device.type == "cpu"


def test_generator_is_stable_across_processes() -> None:
    code = "from resilient_tune.merging import tensor_generator as t; print(t(7, 'model.layers.0.w', 2).initial_seed())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # str hashes differ from this process's
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(run.stdout.strip()) == tensor_generator(7, "model.layers.0.w", 2).initial_seed()


# --- peers ---------------------------------------------------------------------------------------


@pytest.mark.peers
@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.99])
@pytest.mark.parametrize("shape", [(7,), (16, 9), (3, 4, 5)])
def test_magnitude_matches_mergekit(density: float, shape: tuple[int, ...]) -> None:
    sparsify = pytest.importorskip("mergekit.sparsify")
    numel = int(torch.tensor(shape).prod())
    delta = _distinct(numel, seed=numel).reshape(shape)
    assert torch.equal(magnitude_sparsify(delta, density), sparsify.magnitude(delta, density))


@pytest.mark.peers
@pytest.mark.parametrize(
    ("density", "gamma"), [(0.5, 0.01), (0.8, 0.1), (0.9, 0.1), (0.2, 0.5), (0.95, 0.05)]
)
@pytest.mark.parametrize("shape", [(200,), (10, 33)])
def test_outliers_match_mergekit(density: float, gamma: float, shape: tuple[int, ...]) -> None:
    sparsify = pytest.importorskip("mergekit.sparsify")
    numel = int(torch.tensor(shape).prod())
    delta = _distinct(numel, seed=numel + 1).reshape(shape)
    expected = sparsify.magnitude_outliers(delta, density, gamma=gamma)
    assert torch.equal(outlier_sparsify(delta, density, gamma), expected)


@pytest.mark.peers
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_matches_peft_random_pruning(density: float) -> None:
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    delta = torch.randn(33, 17, generator=torch.Generator().manual_seed(11))
    for seed in (0, 1234):
        ours = dare_sparsify(delta, density, torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        theirs = merge_utils.random_pruning(delta, density, rescale=True)
        assert torch.equal(ours, theirs)
