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

- ``magnitude_rank`` (DELLA, mergekit ``sparsify.della_magprune`` semantics): within each row (dimension 0 of a
  tensor of two or more dimensions; a vector is one row) the entries are ranked by ``|τ|`` and kept with probability
  ``density - epsilon + 2·epsilon·r`` where ``r`` in ``[0, 1]`` is the normalised rank (larger magnitudes are kept
  more often; a row of one entry gets ``density``); the mask is drawn with :func:`tensor_generator`, and the kept
  entries are rescaled so that the tensor keeps its L1 norm (mergekit's ``rescale``; the paper rescales each entry by
  ``1 / p``, which is equal in expectation). ``density == 1`` keeps the tensor unchanged.

Ties in ``|τ|`` (frequent with low-precision checkpoints) are broken by flat index: among equal
magnitudes the entry with the lowest index ranks higher, so the kept count is always exact and the
result is deterministic. Ranking uses ``torch.kthvalue`` (linear time) rather than a full sort.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

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
    return _on_float32_copy(delta, lambda work: _magnitude_(work, density))


def outlier_sparsify(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the top ``gamma`` fraction by magnitude, keep the next ``density`` fraction.

    Args:
        delta: a task vector tensor, any shape and floating dtype.
        density: fraction kept, in ``(0, 1]``.
        gamma: fraction of largest entries dropped as outliers, in ``[0, 1)``.

    Returns:
        A new tensor, same shape and dtype, with the dropped entries set to zero.
    """
    return _on_float32_copy(delta, lambda work: _outliers_(work, density, gamma))


def dare_sparsify(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE drop-and-rescale: keep each entry with probability ``density``, scale kept ones by ``1/density``.

    Equals ``peft.utils.merge_utils.random_pruning(delta, density, rescale=True)`` run after
    ``torch.manual_seed(s)`` when ``generator`` was seeded with the same ``s`` (for a float32 CPU
    tensor). The mask is drawn on the CPU in float32, so it is the same whatever the tensor's device
    or dtype; the arithmetic is float32 and the result is cast back to ``delta``'s dtype.

    Args:
        delta: a task vector tensor, any shape and floating dtype.
        density: keep probability, in ``(0, 1]``; 1 returns an unchanged copy and draws nothing.
        generator: a CPU generator, e.g. from :func:`tensor_generator`.

    Returns:
        A new tensor, same shape and dtype.
    """
    return _on_float32_copy(delta, lambda work: _dare_(work, density, generator))


def sparsify_(
    kind: str | None,
    delta: torch.Tensor,
    opts: dict[str, float],
    generator: torch.Generator | None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply the sparsifier named by a :class:`MergeMethod` row to ``delta``, in place; returns ``delta``.

    ``delta`` must be a contiguous float32 tensor the caller owns. ``workspace``, when given, is a
    contiguous float32 tensor of at least ``delta.numel()`` entries on the same device, reused for the
    magnitudes or the DARE mask so repeated calls do not allocate (and page-fault) a fresh buffer.
    """
    if kind is None:
        return delta
    flat = delta.view(-1)
    buffer = workspace.view(-1)[: flat.numel()] if workspace is not None else None
    if kind == "magnitude":
        _magnitude_(flat, opts["density"], buffer)
    elif kind == "outliers":
        _outliers_(flat, opts["density"], opts["gamma"], buffer)
    elif kind == "random" and generator is not None:
        _dare_(flat, opts["density"], generator, buffer)
    elif kind == "magnitude_rank" and generator is not None:
        _della_(delta, opts["density"], opts["epsilon"], generator)
    else:
        raise ValueError(f"sparsifier {kind!r} is unknown or lacks its generator")
    return delta


def _della_(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator) -> None:
    """DELLA's magnitude-ranked drop, in place on a float32 tensor (see the module docs)."""
    if density >= 1.0 or delta.numel() == 0:
        return
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, descending=False), dim=1).to(torch.float32) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    span = high - low
    rank = torch.where(span > 0, (ranks - low) / torch.where(span > 0, span, 1.0), 0.5).clamp_(0.0, 1.0)
    probs = ((density - epsilon) + rank * (2.0 * epsilon)).cpu()  # the generator is a CPU one
    keep = torch.bernoulli(probs, generator=generator).to(delta.device)
    before = delta.abs().sum()
    rows.mul_(keep)
    after = delta.abs().sum()
    if before >= 1e-7 and after >= 1e-7:
        delta.mul_(before / after)


def _on_float32_copy(delta: torch.Tensor, apply_: Callable[[torch.Tensor], object]) -> torch.Tensor:
    work = delta.to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
    apply_(work.view(-1))
    return work.to(delta.dtype)


def _magnitude_(flat: torch.Tensor, density: float, buffer: torch.Tensor | None = None) -> None:
    n = flat.numel()
    if density < 1 and n > 0:
        _keep_top_(flat, _magnitudes(flat, buffer), max(1, int(density * n)))


def _outliers_(flat: torch.Tensor, density: float, gamma: float, buffer: torch.Tensor | None = None) -> None:
    n = flat.numel()
    if density >= 1 or n == 0:
        return
    keep = int(density * n)
    bottom = max(0, n - keep - int(gamma * n))
    # Ascending ranks [bottom, bottom + keep) = the top (n - bottom) minus the top (n - bottom - keep).
    mag = _magnitudes(flat, buffer)
    _keep_top_(flat, mag, n - bottom)
    _drop_top_(flat, mag, n - bottom - keep)


def _dare_(
    flat: torch.Tensor, density: float, generator: torch.Generator, buffer: torch.Tensor | None = None
) -> None:
    if density >= 1 or flat.numel() == 0:
        return
    on_cpu = buffer is not None and buffer.device.type == "cpu"
    mask = buffer.fill_(density) if on_cpu else torch.full(flat.shape, density, dtype=torch.float32)
    torch.bernoulli(mask, generator=generator, out=mask)
    flat.mul_(mask.to(flat.device)).div_(density)  # (τ · mask) / density, as peft computes it


def _magnitudes(flat: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    return torch.abs(flat, out=buffer) if buffer is not None else flat.abs()


def _kth_largest(mag: torch.Tensor, m: int) -> float:
    return float(torch.kthvalue(mag, mag.numel() - m + 1).values)


def _keep_top_(flat: torch.Tensor, mag: torch.Tensor, m: int) -> None:
    """Zero all but the ``m`` entries of largest ``mag``; ties go to the lowest flat index."""
    n = flat.numel()
    if m >= n:
        return
    if m <= 0:
        flat.zero_()
        return
    threshold = _kth_largest(mag, m)
    if threshold == 0:
        return  # fewer than m nonzero entries: keeping every nonzero entry is the top m
    ties = torch.nonzero(mag == threshold).squeeze(1)
    tie_values = flat[ties]
    torch.hardshrink(flat, threshold, out=flat)  # keeps |x| > threshold
    # A unique threshold entry means exactly m - 1 entries are above it; otherwise count them.
    missing = 1 if ties.numel() == 1 else m - int(torch.count_nonzero(flat))
    flat[ties[:missing]] = tie_values[:missing]


def _drop_top_(flat: torch.Tensor, mag: torch.Tensor, m: int) -> None:
    """Zero the ``m`` entries of largest ``mag`` (same tie rule as :func:`_keep_top_`)."""
    if m <= 0:
        return
    if m >= flat.numel():
        flat.zero_()
        return
    threshold = _kth_largest(mag, m)
    above = torch.nonzero(mag > threshold).squeeze(1)
    flat[above] = 0
    missing = m - above.numel()
    flat[torch.nonzero(mag == threshold).squeeze(1)[:missing]] = 0
