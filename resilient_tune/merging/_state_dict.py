"""Merge whole in-memory state dicts: the convenience layer over :func:`merge_tensor`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from resilient_tune.errors import UsageError
from resilient_tune.merging._depth import layer_depths
from resilient_tune.merging._merge import merge_tensor
from resilient_tune.merging._registry import as_method, resolve_options
from resilient_tune.merging._validate import check_compatible, validate_weights

__all__ = ["merge_state_dicts"]


def merge_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    method: str = "linear",
    base: Mapping[str, torch.Tensor] | None = None,
    options: Mapping[str, float] | None = None,
    normalize: bool = False,
    seed: int = 0,
    out_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Merge state dicts held in memory, key by key.

    Validates the weights (:func:`validate_weights`) and the key sets, shapes and dtype kinds
    (:func:`check_compatible`, the base included), then merges every key with :func:`merge_tensor`.
    Depths for LiNeS come from :func:`layer_depths` over the keys of ``state_dicts[0]``.

    Args:
        state_dicts: the models to merge (base excluded), key -> tensor.
        weights: one weight per state dict.
        method: a registered method name (or :class:`MergeMethod`).
        base: the base model's state dict; required by task-vector methods, refused by ``linear``.
        options: method options (see :func:`resolve_options`).
        normalize: divide the weights by their sum.
        seed: seed of the DARE masks.
        out_dtype: dtype of the floating results (default: each key's dtype in ``state_dicts[0]``).

    Returns:
        A new dict in the key order of ``state_dicts[0]``; the inputs are not modified.

    Raises:
        UsageError, IncompatibleModelsError, NonFiniteError: as :func:`merge_tensor` and the checks.
    """
    spec = as_method(method)
    if len(state_dicts) == 0:
        raise UsageError("no state dicts to merge; pass at least one")
    opts = resolve_options(spec, options)
    w = validate_weights(weights, len(state_dicts), method=spec, normalize=normalize)
    models = [*state_dicts, base] if base is not None else list(state_dicts)
    names = [f"model {i}" for i in range(len(state_dicts))] + (["the base"] if base is not None else [])
    check_compatible([{k: (tuple(t.shape), t.dtype) for k, t in sd.items()} for sd in models], names)
    depths = layer_depths(state_dicts[0]) if spec.depth_scaling else {}
    return {
        key: merge_tensor(
            spec,
            [sd[key] for sd in state_dicts],
            w,
            base=None if base is None else base[key],
            options=opts,
            key=key,
            depth=depths.get(key, 0.0),
            seed=seed,
            out_dtype=out_dtype,
        )
        for key in state_dicts[0]
    }
