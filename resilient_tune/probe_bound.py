"""A confidence bound on the general-probe loss: per-unit losses of a probe pass, and the upper bound of a
candidate's loss from its paired per-unit increase over the base.

A probe set of a few dozen examples estimates the loss on the general data it stands for with noise; the
``budget`` policy with ``confidence`` bounds ``L(α) + z·SE`` instead of the mean ``L(α)``, where ``SE`` is the
standard error of the mean of the paired differences ``ℓᵢ(α) − ℓᵢ(0)`` over the probe **units**:

- the elements of a ``score_fn`` that returns one loss per example (a 1-D tensor);
- the sequences of a language model's own loss (token cross-entropy of the logits against the labels, per
  sequence), when those reproduce the model's reported loss;
- else the probe batches (one unit each).

Units are paired by position: the probe batches are the same at every α. Across ranks the sums of the differences
are added, so every rank computes the same bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import torch
import torch.nn.functional as F

from .distributed import sum_across_ranks
from .errors import NonFiniteError, UsageError

__all__ = ["bounded_loss", "loss_value", "sequence_losses", "z_of"]

_REPRODUCE_TOLERANCE = 5e-3  # per-sequence losses must give the model's own loss back within this (relative)


def loss_value(value: Any, index: int) -> tuple[float, list[float]]:
    """A probe batch's loss and its units from what a score returned: a scalar (one unit, the batch), or a 1-D
    tensor of per-example losses (their mean is the batch's loss, each one a unit).

    Raises:
        UsageError: A tensor of two or more dimensions, or an empty one.
        NonFiniteError: A NaN/Inf loss.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or value.numel() == 0:
            raise UsageError(
                f"probe batch {index}: the loss has shape {tuple(value.shape)}; return a scalar, or a 1-D tensor "
                "of per-example losses"
            )
        units = [float(x) for x in value.detach().float().flatten().tolist()]
    else:
        units = [float(value)]
    if not all(math.isfinite(x) for x in units):
        bad = next(x for x in units if not math.isfinite(x))
        raise NonFiniteError(f"probe batch {index}: the loss is {bad}; check the probe data and the model")
    return sum(units) / len(units), units


def sequence_losses(
    model: torch.nn.Module, output: Any, batch: Mapping[str, Any], loss: float
) -> list[float] | None:
    """Per-sequence token cross-entropy of a language model's logits against the batch's ``labels`` (shifted for a
    decoder-only model, as its loss shifts them; ``-100`` ignored), when their token-weighted mean reproduces the
    model's own ``loss``; ``None`` otherwise (another loss, no logits or labels), so the batch is one unit."""
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    labels = batch.get("labels")
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor) or logits.dim() != 3:
        return None
    if labels.shape != logits.shape[:2]:
        return None
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        logits, labels = logits[:, :-1], labels[:, 1:]
    with torch.no_grad():
        token = F.cross_entropy(
            logits.float().flatten(0, 1),
            labels.flatten().to(logits.device),
            ignore_index=-100,
            reduction="none",
        ).view(labels.shape)
        counted = (labels != -100).to(token.device)
        tokens = counted.sum(dim=1)
        if int(tokens.sum()) == 0:
            return None
        total = float((token * counted).sum()) / float(tokens.sum())
        if not math.isclose(total, loss, rel_tol=_REPRODUCE_TOLERANCE, abs_tol=1e-6):
            return (
                None  # not the loss the model reports (label smoothing, a custom head): batches are the units
            )
        keep = tokens > 0
        per = (token * counted).sum(dim=1)[keep] / tokens[keep]
    return [float(x) for x in per.tolist()]


def z_of(confidence: float) -> float:
    """The one-sided normal quantile of ``confidence`` (1.645 for 0.95)."""
    return NormalDist().inv_cdf(confidence)


def bounded_loss(
    loss: float, units: Sequence[float], base_units: Sequence[float], z: float
) -> tuple[float, int]:
    """``loss + z·SE`` of the paired per-unit increase over the base, summed across ranks; and the number of units.

    With fewer than two units in all there is no spread to estimate: the bound is ``loss`` itself.

    Raises:
        UsageError: The two passes scored different numbers of units (the probe batches changed between them).
    """
    if len(units) != len(base_units):
        raise UsageError(
            f"the probe pass scored {len(units)} units but the base's scored {len(base_units)}; the probe batches "
            "must be the same at every alpha (no shuffling, no random cropping)"
        )
    diffs = [a - b for a, b in zip(units, base_units)]
    n, total, squares = sum_across_ranks([float(len(diffs)), sum(diffs), sum(d * d for d in diffs)])
    count = round(n)
    if count < 2:
        return loss, count
    variance = max(squares - total * total / n, 0.0) / (n - 1)
    return loss + z * math.sqrt(variance / n), count
