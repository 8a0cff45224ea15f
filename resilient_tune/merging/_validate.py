"""Entry checks shared by every merge: weights, and key/shape/dtype compatibility of the models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from resilient_tune.errors import IncompatibleModelsError, UsageError
from resilient_tune.merging._registry import MergeMethod, as_method
from resilient_tune.validation import as_floats, check_weights

__all__ = ["as_floats", "check_compatible", "validate_weights"]

TensorSpec = tuple[tuple[int, ...], torch.dtype]


def validate_weights(
    weights: Sequence[float],
    n_models: int,
    *,
    method: MergeMethod | str = "linear",
    normalize: bool = False,
) -> list[float]:
    """Check merge weights by :func:`resilient_tune.validation.check_weights`'s rule and return them as floats.

    For ``linear`` the weights are mixing proportions: they must sum to 1 within ``1e-3`` (on both sides) unless
    ``normalize=True``. For task-vector methods they are per-task scales and may sum to anything; ``normalize=True``
    still divides them by their sum. Negative weights are allowed.

    Args:
        weights: one weight per model (base excluded for task-vector methods).
        n_models: number of models being merged.
        method: a :class:`MergeMethod` or a registered name.
        normalize: divide the weights by their sum.

    Returns:
        The (possibly normalised) weights as a new list of floats.

    Raises:
        UsageError: wrong count, a non-number, NaN/Inf, a linear sum that is not 1 without ``normalize``, or a sum
            of ~0 with ``normalize``.
    """
    spec = as_method(method)
    if n_models < 1:
        raise UsageError(f"n_models={n_models}: a merge needs at least one model")
    kind = "scales" if spec.needs_base else "mixture"
    return list(check_weights(weights, n_models, kind=kind, normalize=normalize))


def check_compatible(specs: Sequence[Mapping[str, TensorSpec]], names: Sequence[str]) -> None:
    """Check that every model has the same keys, shapes and dtype kinds as model 0.

    Float dtypes may differ between models (merges accumulate in float32). Float vs non-float, or two
    different non-float dtypes, are incompatible: integer and bool buffers are copied, not averaged.

    Args:
        specs: for each model, key -> ``(shape, dtype)``.
        names: a path or label per model, used in messages.

    Raises:
        UsageError: ``specs`` and ``names`` differ in length, or are empty.
        IncompatibleModelsError: the first key one model lacks or has in excess (naming the model),
            or the first shape or dtype mismatch (naming the key and both values).
    """
    if len(specs) != len(names):
        raise UsageError(f"got {len(specs)} specs and {len(names)} names; pass one name per model")
    if not specs:
        raise UsageError("no models to check; pass at least one model")
    ref, ref_name = specs[0], names[0]
    for spec, name in zip(specs[1:], names[1:]):
        for key in ref:
            if key not in spec:
                raise IncompatibleModelsError(
                    f"{name} lacks tensor {key!r}, which {ref_name} has; merge models of the same architecture"
                )
        for key in spec:
            if key not in ref:
                raise IncompatibleModelsError(
                    f"{name} has tensor {key!r}, which {ref_name} lacks; merge models of the same architecture"
                )
        for key, (shape, dtype) in ref.items():
            other_shape, other_dtype = spec[key]
            if tuple(shape) != tuple(other_shape):
                rows_only = len(shape) == len(other_shape) and len(shape) > 0 and shape[1:] == other_shape[1:]
                hint = (
                    " (only rows differ: if tokens were added before fine-tuning, pass allow_grown_vocab=True, "
                    "--allow-grown-vocab on the command line)"
                    if rows_only
                    else ""
                )
                raise IncompatibleModelsError(
                    f"tensor {key!r} has shape {tuple(shape)} in {ref_name} but {tuple(other_shape)} in {name}; "
                    f"merge models of the same architecture and size{hint}"
                )
            if not _dtypes_compatible(dtype, other_dtype):
                raise IncompatibleModelsError(
                    f"tensor {key!r} is {dtype} in {ref_name} but {other_dtype} in {name}; "
                    "only floating-point dtypes may differ between models"
                )


def _dtypes_compatible(a: torch.dtype, b: torch.dtype) -> bool:
    return a == b or (a.is_floating_point and b.is_floating_point)
