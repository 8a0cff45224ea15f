"""The merge methods that do not sum task vectors: SLERP and Model Stock (mergekit 0.1.5's computations), and the
input-count and weight contract they add (see :mod:`resilient_tune.merging._registry`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from resilient_tune.errors import UsageError
from resilient_tune.merging._registry import MergeMethod, as_method

__all__ = ["SLERP_DOT_THRESHOLD", "check_inputs", "model_stock", "slerp"]

Load = Callable[[int], torch.Tensor]  # input i (base excluded), loaded when called


def check_inputs(
    method: MergeMethod | str, count: int, weights: Sequence[float] | None, *, key: str | None = None
) -> None:
    """The number of models (base excluded) a method merges, and that SLERP and Model Stock get no weights.

    Raises:
        UsageError: Too few or too many models (names why), or weights for a method that takes none.
    """
    spec = as_method(method)
    low, high = spec.inputs
    where = f" for tensor {key!r}" if key is not None else ""
    if count < low or (high is not None and count > high):
        wanted = f"exactly {low}" if low == high else f"at least {low}"
        why = {
            "slerp": "SLERP interpolates between the base and one model",
            "model_stock": "Model Stock needs two or more fine-tuned models of the base to measure their angle",
        }.get(spec.name, "")
        raise UsageError(
            f"merge method {spec.name!r} takes {wanted} model(s) besides the base, got {count}{where}: {why}"
        )
    if spec.combine != "sum" and weights is not None and any(float(x) != 1.0 for x in weights):
        hint = "pass t= (--t) instead" if spec.combine == "slerp" else "it derives its ratio from the models"
        raise UsageError(f"merge method {spec.name!r} takes no weights (got {list(weights)}); {hint}")


SLERP_DOT_THRESHOLD = (
    0.9995  # |cos| above it: parallel or antiparallel, interpolated linearly (mergekit's rule)
)
_NORM_EPS = 1e-8


def slerp(
    load: Load, count: int, shape: torch.Size, base32: torch.Tensor, opts: dict[str, float]
) -> torch.Tensor:
    """Spherical interpolation from the base (``t = 0``) to input 0 (``t = 1``) over the flattened tensor, in float32
    (float64 inputs stay float64); linear where the two are (anti)parallel or one is a zero vector."""
    t = opts["t"]
    other = load(0)
    dtype = torch.float64 if other.dtype == torch.float64 else torch.float32
    a, b = base32.to(dtype).reshape(-1), other.to(dtype).reshape(-1)
    del other
    if a.numel() == 0:
        return torch.lerp(a, b, t).reshape(shape).to(torch.float32)
    norm_a, norm_b = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    norm_a = norm_a if norm_a > _NORM_EPS else 1.0  # mergekit leaves a (near) zero vector unnormalised
    norm_b = norm_b if norm_b > _NORM_EPS else 1.0
    dot = min(max(float(torch.dot(a, b)) / (norm_a * norm_b), -1.0), 1.0)  # no full-size temporaries
    if abs(dot) > SLERP_DOT_THRESHOLD:
        coef_a, coef_b = 1.0 - t, t
    else:
        theta = math.acos(dot)
        coef_a, coef_b = math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return torch.mul(a, coef_a).add_(b, alpha=coef_b).reshape(shape)  # one new tensor, the result


def model_stock(
    load: Load, count: int, shape: torch.Size, base32: torch.Tensor, opts: dict[str, float]
) -> torch.Tensor:
    """Model Stock over the flattened tensor (mergekit's computation): ``t = N·c / (1 + (N − 1)·c)`` from the mean
    pairwise cosine ``c`` of the task vectors (``t = 0`` where the denominator is about 0), then
    ``t·mean(θᵢ) + (1 − t)·base``. Holds the N task vectors at once."""
    base_flat = base32.reshape(-1)
    models = [load(i).to(torch.float32).reshape(-1) for i in range(count)]
    offsets = [m - base_flat for m in models]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)).clamp(min=1e-6)
            cosines.append(((a * b).sum() / norms).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean()
    count = len(offsets)
    denominator = 1 + (count - 1) * cos
    t = torch.zeros_like(cos) if bool(denominator.abs() < 1e-6) else count * cos / denominator
    average = sum(models) / count
    return (t * average + (1 - t) * base_flat).reshape(shape)
