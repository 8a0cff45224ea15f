"""Sparsifiers for task vectors, applied tensor by tensor (not globally, as the papers describe).

- ``magnitude`` (TIES trim, mergekit ``sparsify.magnitude`` semantics): keep the ``k = max(1,
  int(density * numel))`` entries of largest ``|τ|``, zero the rest. ``density == 1`` keeps the tensor
  unchanged; a non-empty tensor always keeps at least one entry (peft keeps ``int(density * numel)``,
  which can be 0).
- ``random`` (DARE, peft ``random_pruning(rescale=True)`` and paper semantics): keep each entry
  independently with probability ``density`` (``torch.bernoulli`` on a per-tensor CPU generator from
  :func:`tensor_generator`) and multiply the kept entries by ``1 / density`` so the expected value is
  unchanged. mergekit instead rescales to preserve the L1 norm of the tensor; we do not.
- ``outliers`` (Model Breadcrumbs, mergekit ``sparsify.magnitude_outliers`` semantics): with
  ``n = numel``, ``keep = int(density * n)``, ``top = int(gamma * n)``, sort ``|τ|`` ascending, drop
  the smallest ``max(0, n - keep - top)`` entries, keep the next ``keep`` and drop the rest (the
  largest outliers). ``top`` shrinks when ``density + gamma`` would exceed 1. Unlike ``magnitude``,
  ``keep`` may be 0 for a small tensor, which then becomes all zeros (mergekit does the same).

Ties in ``|τ|`` (frequent with low-precision checkpoints) are broken by flat index: among equal
magnitudes the entry with the lowest index ranks higher, so the kept count is always exact and the
result is deterministic. Ranking uses ``torch.kthvalue`` (linear time) rather than a full sort.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["dare_sparsify", "magnitude_sparsify", "outlier_sparsify", "tensor_generator"]


def tensor_generator(seed: int, key: str, index: int) -> torch.Generator:
    """A deterministic CPU generator for one (seed, tensor key, input index).

    The generator's seed is derived with BLAKE2b (never Python's salted ``hash``), so it is the same in
    every process and run. DARE masks depend only on it: results do not depend on the order in which
    keys are merged, on sharding, or on other tensors.

    Args:
        seed: the user's merge seed.
        key: the tensor's name in the state dict.
        index: position of the input model (0-based, base excluded).

    Returns:
        A fresh ``torch.Generator`` on the CPU.
    """
    digest = hashlib.blake2b(f"{int(seed)}\x00{key}\x00{int(index)}".encode(), digest_size=8).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return generator


def magnitude_sparsify(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the ``max(1, int(density * numel))`` largest-magnitude entries.

    Args:
        delta: a task vector tensor, any shape and floating dtype.
        density: fraction kept, in ``(0, 1]``.

    Returns:
        A new tensor, same shape and dtype, with the other entries set to zero.
    """
    return _magnitude_(delta.clone(), density)


def outlier_sparsify(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the top ``gamma`` fraction by magnitude, keep the next ``density`` fraction.

    Args:
        delta: a task vector tensor, any shape and floating dtype.
        density: fraction kept, in ``(0, 1]``.
        gamma: fraction of largest entries dropped as outliers, in ``[0, 1)``.

    Returns:
        A new tensor, same shape and dtype, with the dropped entries set to zero.
    """
    return _outliers_(delta.clone(), density, gamma)


def dare_sparsify(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE drop-and-rescale: keep each entry with probability ``density``, scale kept ones by ``1/density``.

    Equals ``peft.utils.merge_utils.random_pruning(delta, density, rescale=True)`` run after
    ``torch.manual_seed(s)`` when ``generator`` was seeded with the same ``s`` (for a float32 CPU
    tensor). The mask is drawn on the CPU in float32, so it is the same whatever the tensor's device
    or dtype, and moved to ``delta``'s device.

    Args:
        delta: a task vector tensor, any shape and floating dtype.
        density: keep probability, in ``(0, 1]``; 1 returns an unchanged copy and draws nothing.
        generator: a CPU generator, e.g. from :func:`tensor_generator`.

    Returns:
        A new tensor, same shape and dtype.
    """
    return _dare_(delta.clone(), density, generator)


def sparsify_(
    kind: str | None, delta: torch.Tensor, opts: dict[str, float], generator: torch.Generator | None
) -> torch.Tensor:
    """Apply the sparsifier named by a :class:`MergeMethod` row to ``delta``, in place; returns ``delta``."""
    if kind is None:
        return delta
    if kind == "magnitude":
        return _magnitude_(delta, opts["density"])
    if kind == "outliers":
        return _outliers_(delta, opts["density"], opts["gamma"])
    if kind == "random" and generator is not None:
        return _dare_(delta, opts["density"], generator)
    raise ValueError(f"sparsifier {kind!r} is unknown or lacks its generator")


def _magnitude_(delta: torch.Tensor, density: float) -> torch.Tensor:
    n = delta.numel()
    if density >= 1 or n == 0:
        return delta
    return delta.mul_(_top_mask(delta, max(1, int(density * n))).view_as(delta))


def _outliers_(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = delta.numel()
    if density >= 1 or n == 0:
        return delta
    keep = int(density * n)
    bottom = max(0, n - keep - int(gamma * n))
    # Ascending ranks [bottom, bottom + keep) = the top (n - bottom) minus the top (n - bottom - keep).
    mask = _top_mask(delta, n - bottom)
    mask &= ~_top_mask(delta, n - bottom - keep)
    return delta.mul_(mask.view_as(delta))


def _dare_(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1 or delta.numel() == 0:
        return delta
    mask = torch.bernoulli(torch.full(delta.shape, density, dtype=torch.float32), generator=generator)
    return delta.mul_(mask.to(device=delta.device, dtype=delta.dtype)).div_(density)


def _top_mask(values: torch.Tensor, m: int) -> torch.Tensor:
    """Flat bool mask of the ``m`` entries of largest ``|values|``; ties go to the lowest flat index."""
    mag = values.detach().reshape(-1).abs()
    if mag.dtype != torch.float32 and mag.device.type == "cpu":
        mag = mag.float()
    n = mag.numel()
    if m <= 0:
        return torch.zeros(n, dtype=torch.bool, device=mag.device)
    if m >= n:
        return torch.ones(n, dtype=torch.bool, device=mag.device)
    threshold = torch.kthvalue(mag, n - m + 1).values  # the m-th largest magnitude
    mask = mag > threshold
    missing = m - int(mask.sum())  # >= 1: the threshold entry itself is not > threshold
    ties = torch.nonzero(mag == threshold).squeeze(1)[:missing]
    mask[ties] = True
    return mask
